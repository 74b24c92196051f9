"""Seeded random weights built on the device: run dtypes per parameter, determinism, finite deep forwards."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import tiny_pass_inputs, two_chunk_cache
from torch import nn

from worldgen.config import get_preset
from worldgen.models.dit import CausalDiT
from worldgen.models.random_init import materialize_random, random_dit, random_vae
from worldgen.models.vae import WanVAE

TINY = get_preset("tiny")


def _dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dit_parameters_have_the_layout_of_set_compute_dtype(dtype: torch.dtype) -> None:
    dit = random_dit(TINY.dit, "cpu", dtype, seed=0)
    expected = CausalDiT(TINY.dit).set_compute_dtype(dtype)
    assert _dtypes(dit) == _dtypes(expected)
    assert list(dit.state_dict()) == list(expected.state_dict())
    if dtype == torch.bfloat16:  # token-wise matmuls in bf16; time MLP, modulation and norms in float32
        assert dit.blocks[0].ffn[0].weight.dtype == torch.bfloat16
        assert dit.patch_embedding.weight.dtype == torch.bfloat16
        assert dit.time_projection[1].weight.dtype == torch.float32
        assert dit.blocks[0].modulation.dtype == torch.float32
        assert dit.blocks[0].self_attn.norm_q.weight.dtype == torch.float32
    assert all(p.device.type == "cpu" and not p.requires_grad for p in dit.parameters())
    assert not dit.training


def test_float64_dit_is_all_float64() -> None:
    dit = random_dit(TINY.dit, "cpu", torch.float64, seed=0)
    assert set(_dtypes(dit).values()) == {torch.float64}


def test_same_seed_same_weights_and_another_seed_other_weights() -> None:
    first, second = (random_dit(TINY.dit, "cpu", torch.bfloat16, seed=3) for _ in range(2))
    other = random_dit(TINY.dit, "cpu", torch.bfloat16, seed=4)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert not torch.equal(first.blocks[1].ffn[2].weight, other.blocks[1].ffn[2].weight)
    vae_a, vae_b = (random_vae(TINY.vae, "cpu", seed=3) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(vae_a.parameters(), vae_b.parameters(), strict=True))


def test_init_scales() -> None:
    dit = random_dit(replace(TINY.dit, dim=256, ffn_dim=512), "cpu", torch.float32, seed=0)
    block = dit.blocks[0]
    # Linear weights ~ N(0, 1/(3 fan_in)), biases zero, norm gains one, modulation ~ N(0, 1/dim).
    assert block.ffn[2].weight.std().item() == pytest.approx((3 * 512) ** -0.5, rel=0.05)
    assert block.self_attn.q.weight.std().item() == pytest.approx((3 * 256) ** -0.5, rel=0.05)
    assert torch.equal(block.self_attn.q.bias, torch.zeros(256))
    assert torch.equal(block.self_attn.norm_k.weight, torch.ones(256))
    assert torch.equal(block.norm3.bias, torch.zeros(256))
    assert block.modulation.std().item() == pytest.approx(256**-0.5, rel=0.1)


def test_a_40_layer_random_forward_is_finite_and_moderate() -> None:
    config = replace(TINY.dit, num_layers=40)  # as deep as the full-size model, in its run dtypes
    dit = random_dit(config, "cpu", torch.bfloat16, seed=0)
    frames, height, width = 2, 4, 6
    x, y, context, control = tiny_pass_inputs(frames, height, width)
    cache = two_chunk_cache(dit, frames, height, width)
    text, camera = dit.prepare_text(context), dit.prepare_control(control)
    with torch.no_grad():
        for first in (0, frames):  # two chunks, the second attending to the first through the cache
            velocity = dit(x, 999, y, text, camera, cache=cache, first_latent_frame=first)
            assert torch.isfinite(velocity).all()
            assert 1e-2 < velocity.std().item() < 1e2


def test_vae_is_float32_with_latent_statistics_and_channels_last_weights() -> None:
    vae = random_vae(TINY.vae, "cpu", seed=0)
    assert {p.dtype for p in vae.parameters()} == {torch.float32}
    assert torch.equal(vae.latent_mean.flatten(), torch.tensor(TINY.vae.latent_mean))
    assert torch.equal(vae.latent_std.flatten(), torch.tensor(TINY.vae.latent_std))
    assert vae.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert not any(t.is_meta for t in [*vae.parameters(), *vae.buffers()])
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        video = vae.decode(latents)
    assert video.shape == (1, 3, 5, 32, 32) and torch.isfinite(video).all()
    # The random VAE takes any dtype it is asked for.
    assert random_vae(TINY.vae, "cpu", torch.bfloat16).conv1.weight.dtype == torch.bfloat16
    assert isinstance(vae, WanVAE)


def test_a_parameter_without_a_rule_is_named() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Module()
            self.inner.table = nn.Parameter(torch.zeros(3))

    with torch.device("meta"):
        model = Odd()
    with pytest.raises(ValueError, match=r"no rule for parameter 'inner\.table' of Module"):
        materialize_random(model, "cpu", seed=0)
