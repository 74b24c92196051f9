"""Peer parity (oracle 7): the DiT loaded with ../shared/parity/dit.safetensors replays every recorded call of
an independent implementation (TeleFuser's LingBot-World-Fast DiT, float32, CPU) through ONE rolling cache
(chunk 3, window 6, sink 3: the window rolls and evicts) and reproduces each output to float32 rounding.

About the time embedding: the fixture was recorded with integer timestep tensors, and the peer's sinusoid
casts cos/sin back to the timestep's dtype, so they were truncated to integers: [1.., 0..] at t = 0 (the
same as in float) and all zeros at every t > 0. Upstream LingBot-World keeps the sinusoid in float64, and so
does worldgen. The replay therefore emulates the truncation (`_peer_sinusoid`); the cache-update calls,
at t = 0, match without it; `test_dit.py` checks our sinusoid against the float formula.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from worldgen.config import DiTConfig
from worldgen.models import dit
from worldgen.models.dit import CausalDiT

PARITY = Path(__file__).resolve().parents[2] / "shared" / "parity"
_float_sinusoid = dit.sinusoidal_embedding


def _peer_sinusoid(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    return _float_sinusoid(timesteps, dim).trunc()


@pytest.fixture(scope="module")
def fixture() -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    if not (PARITY / "dit_io.json").is_file():
        pytest.skip(f"{PARITY} is absent")
    meta = json.loads((PARITY / "dit_io.json").read_text())
    return meta, load_file(PARITY / "dit.safetensors"), load_file(PARITY / "dit_io.safetensors")


def _replay(fixture, *, prepared: bool, only_cache_updates: bool = False) -> None:
    meta, weights, io = fixture
    config = DiTConfig(
        **meta["config"],
        patch_size=tuple(meta["patch_size"]),
        text_len=meta["text_len"],
        control_type=meta["control_type"],
    )
    model = CausalDiT(config).eval()
    model.load_state_dict(weights, strict=True)
    chunk = meta["chunk_size"]
    cache = model.make_kv_cache(
        batch_size=1,
        latent_height=meta["lat_h"],
        latent_width=meta["lat_w"],
        chunk_size=chunk,
        local_attn_size=meta["local_attn_size"],
        sink_size=meta["sink_size"],
        num_frames=meta["latent_frames"],
    )
    sigma_of = dict(zip(meta["timesteps"], meta["sigmas"], strict=True))
    text = model.prepare_text(io["context"]) if prepared else io["context"]
    checked = 0
    for call in meta["calls"]:
        if only_cache_updates and call["kind"] != "cache_update":
            continue
        first = call["first_latent_frame"]
        frames = slice(first, first + chunk)
        control = (
            model.prepare_control(io["control"][:, :, frames]) if prepared else io["control"][:, :, frames]
        )
        x = io[f"call{call['index']}.x"]
        with torch.no_grad():
            out = model(
                x,
                call["timestep"],
                io["y"][:, :, frames],
                text,
                control,
                cache=cache,
                first_latent_frame=first,
            )
        expected = io[f"call{call['index']}.out"]
        relative_error = ((out - expected).norm() / expected.norm()).item()
        assert relative_error < 1e-5, (
            f"call {call['index']} ({call['kind']}): relative error {relative_error:.2e}"
        )
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        if call["kind"] == "denoise" and call["timestep"] == meta["timesteps"][-1]:
            x0 = x.double() - sigma_of[call["timestep"]] * out.double()
            torch.testing.assert_close(x0.float(), io[f"chunk{call['chunk']}.x0"], rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked == (meta["latent_frames"] // chunk if only_cache_updates else len(meta["calls"]))


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared-states", "plain-path"])
def test_replay_reproduces_every_call(fixture, prepared: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dit, "sinusoidal_embedding", _peer_sinusoid)
    _replay(fixture, prepared=prepared)


def test_cache_update_calls_match_with_the_float_sinusoid(fixture) -> None:
    """At t = 0 the truncation is exact, and the cache-update calls depend only on earlier ones."""
    _replay(fixture, prepared=True, only_cache_updates=True)
