"""Peer parity: with the tiny weights in `parity/`, the VAE reproduces an independent implementation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from worldgen.config import VAEConfig
from worldgen.models.vae import WanVAE


def _parity_config(path: Path) -> VAEConfig:
    meta = json.loads(path.read_text())
    config = meta["config"]
    return VAEConfig(
        dim=config["dim"],
        z_dim=config["z_dim"],
        dim_mult=tuple(config["dim_mult"]),
        num_res_blocks=config["num_res_blocks"],
        attn_scales=tuple(config["attn_scales"]),
        temporal_downsample=tuple(config["temperal_downsample"]),  # upstream's spelling
        latent_mean=tuple(meta["latent_mean"]),
        latent_std=tuple(meta["latent_std"]),
    )


@pytest.mark.parametrize("channels_last", [True, False])
def test_vae_reproduces_peer_outputs(shared_dir: Path, channels_last: bool) -> None:
    parity = shared_dir / "parity"
    vae = WanVAE(_parity_config(parity / "vae.json"), channels_last=channels_last)
    vae.load_state_dict(load_file(parity / "vae.safetensors"))  # strict: every tensor present and shaped
    io = load_file(parity / "vae_io.safetensors")

    latents, decoded = vae.encode(io["video"]), vae.decode(io["z"])
    # Float32 rounding: errors ~1e-6 of the output's scale after ~40 layers; 2e-5 leaves margin.
    for name, ours in (("latents", latents), ("decoded", decoded)):
        theirs = io[name]
        assert ours.shape == theirs.shape, name
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * theirs.abs().max().item(), msg=name)
