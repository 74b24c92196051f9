"""Builders shared by the test modules (`from helpers import ...`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from worldgen.config import get_preset
from worldgen.models.dit import CausalDiT
from worldgen.models.kv_cache import KVCache

ASSETS = Path(__file__).resolve().parents[1] / "manifests" / "assets"


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
