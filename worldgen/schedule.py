"""Flow-matching schedule of LingBot-World-Fast: the shifted sigma table, the step list, x0 and re-noising.

The distilled model runs a few steps picked by index from a 1000-entry table. Per step the DiT predicts
the velocity v = noise - x0 of the path x_sigma = (1 - sigma) * x0 + sigma * noise, so
x0 = x - sigma * v, and the next step re-noises x0 to the next sigma with fresh noise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
SIGMA_MAX = 0.999  # the training table's first sigma (1 - 1/1000)


def shifted_sigmas(shift: float) -> np.ndarray:
    """The 1000-entry table, float64: linspace(0.999, 0, 1001)[:-1] shifted by s*sigma / (1 + (s-1)*sigma)."""
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    sigmas = np.linspace(SIGMA_MAX, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1]
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass(frozen=True)
class Schedule:
    """The denoising steps: `timesteps[i]` is fed to the DiT, `sigmas[i]` is the noise level of step i."""

    timesteps: tuple[int, ...]
    sigmas: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.timesteps)


def make_schedule(indices: Sequence[int], shift: float) -> Schedule:
    """Steps at strictly increasing `indices` of the shifted table; timesteps are int(sigma * 1000)."""
    indices = tuple(indices)
    if not indices:
        raise ValueError("timestep_indices must not be empty")
    if any(isinstance(i, bool) or not isinstance(i, int | np.integer) for i in indices):
        raise ValueError(f"timestep_indices must be integers, got {indices!r}")
    if any(not 0 <= i < NUM_TRAIN_TIMESTEPS for i in indices):
        raise ValueError(f"timestep_indices must lie in [0, {NUM_TRAIN_TIMESTEPS}), got {indices!r}")
    if any(b <= a for a, b in itertools.pairwise(indices)):
        raise ValueError(f"timestep_indices must be strictly increasing, got {indices!r}")
    sigmas = shifted_sigmas(shift)[list(indices)]
    # int() truncates, as the reference scheduler's cast to int64 does.
    timesteps = tuple(int(s * NUM_TRAIN_TIMESTEPS) for s in sigmas)
    return Schedule(timesteps=timesteps, sigmas=tuple(float(s) for s in sigmas))


def predict_x0(x: torch.Tensor, velocity: torch.Tensor, sigma: float) -> torch.Tensor:
    """x0 = x - sigma * v, computed in float64 (as upstream does) and returned in x's dtype."""
    return (x.double() - sigma * velocity.double()).to(x.dtype)


def renoise(x0: torch.Tensor, noise: torch.Tensor, sigma_next: float) -> torch.Tensor:
    """The next step's input, x0 moved back onto the flow path: (1 - sigma_next) * x0 + sigma_next * noise."""
    return (1 - sigma_next) * x0 + sigma_next * noise
