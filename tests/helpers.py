"""Builders shared by the test modules (`from helpers import ...`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
import torch

from worldgen.config import DiTConfig, get_preset
from worldgen.models.dit import CausalDiT
from worldgen.models.kv_cache import KVCache

ASSETS = Path(__file__).resolve().parents[1] / "manifests" / "assets"
TIMESTEPS = (999.0, 978.0, 947.0, 825.0)  # the denoising passes of a rollout
LATENT_HW = (4, 6)  # 2 x 3 tokens per latent frame of the tiny DiT


def cuda_test(test: Callable[..., None]) -> Callable[..., None]:
    """What every CUDA test here wears: the `gpu` marker, a skip where no CUDA device is, and no_grad."""
    needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.gpu(needs_cuda(torch.no_grad()(test)))


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative L2 error ||result - reference|| / ||reference||, in float64."""
    reference = reference.double()
    return ((result.double() - reference).norm() / reference.norm()).item()


def job_row(job_id: str, **changes: Any) -> dict[str, Any]:
    """A manifest row of a tiny 64x48 camera job over the demo assets: 9 frames -> 3 latent frames -> 3
    chunks of 1."""
    row = {
        "job_id": job_id,
        "prompt": f"a red house, {job_id}",
        "image": str(ASSETS / "image.png"),
        "poses": str(ASSETS / "poses.npy"),
        "intrinsics": str(ASSETS / "intrinsics.npy"),
        "frame_num": 9,
        "chunk_size": 1,
        "local_attn_size": 2,
        "sink_size": 1,
        "height": 48,
        "width": 64,
        "seed": 1,
    }
    return {**row, **changes}


def tiny_pass_inputs(frames: int, height: int, width: int) -> tuple[torch.Tensor, ...]:
    """Seeded x, y, text context and control of one pass of the tiny DiT (or any DiT with its text and
    control sizes) over `frames` latent frames of height x width."""
    config = get_preset("tiny").dit
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, frames, height, width, generator=generator)
    y = torch.randn(1, 20, frames, height, width, generator=generator)
    context = torch.randn(1, config.text_len, config.text_dim, generator=generator)
    control = torch.randn(1, config.control_channels, frames, height, width, generator=generator)
    return x, y, context, control


def two_chunk_cache(dit: CausalDiT, frames: int, height: int, width: int) -> KVCache:
    """A whole-video KV cache for two chunks of `frames` latent frames."""
    return dit.make_kv_cache(
        batch_size=1,
        latent_height=height,
        latent_width=width,
        chunk_size=frames,
        local_attn_size=-1,
        sink_size=0,
        num_frames=2 * frames,
    )


# ------------------------------------------------------------------- the tiny DiT, its inputs, a rollout
def tiny_model(dtype: torch.dtype = torch.float32) -> CausalDiT:
    """The tiny DiT with exact attention and every weight moved off its default (norms, modulation)."""
    torch.manual_seed(0)
    model = CausalDiT(get_preset("tiny").dit, attention_backend="math").to(dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class Inputs:
    noise: torch.Tensor  # [1, 16, F, h, w]
    renoise: torch.Tensor  # [steps, 1, 16, F, h, w]: fresh noise for the re-noising steps
    y: torch.Tensor
    control: torch.Tensor
    context: torch.Tensor

    def to(self, device: torch.device | str) -> Inputs:
        return Inputs(*(getattr(self, field.name).to(device) for field in fields(self)))


def tiny_inputs(config: DiTConfig, frames: int, dtype: torch.dtype = torch.float32) -> Inputs:
    """Seeded latents, re-noising noise, conditioning, control and text context over `frames` frames."""
    generator = torch.Generator().manual_seed(frames)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype)

    height, width = LATENT_HW
    return Inputs(
        noise=randn(1, config.out_dim, frames, height, width),
        renoise=randn(len(TIMESTEPS), 1, config.out_dim, frames, height, width),
        y=randn(1, config.in_dim - config.out_dim, frames, height, width),
        control=randn(1, config.control_channels, frames, height, width),
        context=randn(1, 20, config.text_dim),
    )


@dataclass
class Call:
    first_frame: int
    x: torch.Tensor
    timestep: float
    velocity: torch.Tensor


def rollout(
    model: CausalDiT,
    inputs: Inputs,
    chunk: int,
    window: int,
    sink: int = 0,
    *,
    prepare_text: bool = True,
    prepare_control: bool = True,
    kv_only_update: bool = False,
) -> tuple[list[Call], list[torch.Tensor]]:
    """Chunked generation as the generator runs it: 4 denoising passes and one cache update per chunk
    (a whole forward at timestep 0, whose call is recorded, or with `kv_only_update` `update_cache`).
    Returns the calls and each chunk's clean latent."""
    frames = inputs.noise.shape[2]
    cache = model.make_kv_cache(
        batch_size=1,
        latent_height=LATENT_HW[0],
        latent_width=LATENT_HW[1],
        chunk_size=chunk,
        local_attn_size=window,
        sink_size=sink,
        num_frames=frames,
    )
    text = model.prepare_text(inputs.context) if prepare_text else inputs.context
    calls, clean_chunks = [], []
    for first in range(0, frames, chunk):
        frames_of_chunk = slice(first, first + chunk)
        control_chunk = inputs.control[:, :, frames_of_chunk]
        control = model.prepare_control(control_chunk) if prepare_control else control_chunk
        y = inputs.y[:, :, frames_of_chunk]
        x = inputs.noise[:, :, frames_of_chunk]
        for step, timestep in enumerate(TIMESTEPS):
            velocity = model(x, timestep, y, text, control, cache=cache, first_latent_frame=first)
            calls.append(Call(first, x, timestep, velocity))
            x0 = x - timestep / 1000 * velocity
            if step + 1 < len(TIMESTEPS):
                sigma_next = TIMESTEPS[step + 1] / 1000
                x = (1 - sigma_next) * x0 + sigma_next * inputs.renoise[step + 1][:, :, frames_of_chunk]
        if kv_only_update:
            model.update_cache(x0, y, text, control, cache=cache, first_latent_frame=first)
        else:
            velocity = model(x0, 0.0, y, text, control, cache=cache, first_latent_frame=first)
            calls.append(Call(first, x0, 0.0, velocity))
        clean_chunks.append(x0)
    return calls, clean_chunks


def rollout_velocities(model: CausalDiT, inputs: Inputs, chunk: int, window: int, sink: int = 0) -> list:
    """The velocity of every pass of `rollout` (its denoising passes and whole cache-update forwards)."""
    return [call.velocity for call in rollout(model, inputs, chunk, window, sink)[0]]
