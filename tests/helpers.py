"""Builders shared by the test modules (`from helpers import ...`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parents[1] / "manifests" / "assets"


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
