"""The causal DiT: checkpoint layout, building blocks, the rolling-cache oracle and the fast paths.

Oracle 1 (DESIGN.md): a chunk-by-chunk rollout through the rolling cache gives the same velocities as one
full-sequence forward over [clean chunks 0..i-1, chunk i] with the explicit visibility mask (float64).
Oracle 3: the per-video text state and the per-chunk control state give the same outputs as the plain path
that recomputes them in every pass.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    LATENT_HW,
    TIMESTEPS,
    Call,
    Inputs,
    cuda_test,
    relative_error,
    rollout,
    tiny_inputs,
    tiny_model,
)

import worldgen.models.attention as attention_module
import worldgen.models.dit as dit_module
from worldgen.config import get_preset
from worldgen.models.attention import (
    FLASH_MIN_KEYS,
    attention,
    check_backend,
    flash_supports,
    flash_usable,
    visibility_mask,
)
from worldgen.models.dit import (
    CausalDiT,
    FeedForward,
    RMSNorm,
    apply_rope,
    norm_rope_into,
    rope_split,
    rope_tables,
    sinusoidal_embedding,
)
from worldgen.models.kv_cache import E4M3, KVCache, to_e4m3
from worldgen.quant import quantize_dit

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
TINY_CACHE = {
    "batch_size": 1, "latent_height": 4, "latent_width": 6, "chunk_size": 1, "local_attn_size": -1,
    "sink_size": 0, "num_frames": 2,
}  # fmt: skip


# --------------------------------------------------------------------------------------- checkpoint layout
@pytest.mark.parametrize(
    ("preset", "keys_file"),
    [
        ("lingbot-world-fast", "lingbot_world_fast_dit_cam.keys.json"),
        ("lingbot-world-fast-act", "lingbot_world_fast_dit_act.keys.json"),
    ],
)
def test_full_size_model_matches_reference_keys(preset: str, keys_file: str) -> None:
    if not (REFERENCE / keys_file).is_file():
        pytest.skip(f"{REFERENCE / keys_file} is absent")
    reference = json.loads((REFERENCE / keys_file).read_text())
    with torch.device("meta"):
        model = CausalDiT(get_preset(preset).dit)
    ours = {
        name: (list(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in model.state_dict().items()
    }
    theirs = {name: (spec["shape"], spec["dtype"]) for name, spec in reference["tensors"].items()}
    assert ours == theirs
    assert list(ours) == list(theirs)  # same order, so a saved state dict reads like the checkpoint
    assert sum(p.numel() for p in model.parameters()) == reference["num_params"]


# ------------------------------------------------------------------------------------------ building blocks
def test_sinusoidal_embedding_is_cos_then_sin_of_geometric_frequencies() -> None:
    t = np.array([0.0, 1.0, 500.5, 999.0])
    angles = t[:, None] * 10000.0 ** (-np.arange(128) / 128)
    expected = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
    ours = sinusoidal_embedding(torch.tensor(t), 256)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-12)


def test_rope_split_and_tables() -> None:
    assert rope_split(128) == (44, 42, 42)
    assert rope_split(32) == (12, 10, 10)
    first_frame, grid = 5, (2, 3, 4)
    cos, sin = rope_tables(128, first_frame, grid, torch.device("cpu"), torch.float64)
    assert cos.shape == (24, 1, 64)
    for token, (f, h, w) in enumerate(np.ndindex(*grid)):
        angles = np.concatenate(
            [
                (first_frame + f) * 10000.0 ** (-np.arange(0, 44, 2) / 44),
                h * 10000.0 ** (-np.arange(0, 42, 2) / 42),
                w * 10000.0 ** (-np.arange(0, 42, 2) / 42),
            ]
        )
        np.testing.assert_allclose(cos[token, 0].numpy(), np.cos(angles), atol=1e-12)
        np.testing.assert_allclose(sin[token, 0].numpy(), np.sin(angles), atol=1e-12)


def test_apply_rope_rotates_interleaved_pairs_as_complex_numbers() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 3, 128, dtype=torch.float64, generator=generator)
    cos, sin = rope_tables(128, 7, (2, 3, 4), torch.device("cpu"), torch.float64)
    as_complex = torch.view_as_complex(x.reshape(2, 24, 3, 64, 2))
    expected = torch.view_as_real(as_complex * torch.complex(cos, sin)).flatten(-2)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected, rtol=0, atol=1e-12)


def test_visibility_mask_follows_the_reference_rules() -> None:
    # chunk 2, window 4, sink 1: chunk 2 (frames 4, 5) sees the sink frame 0 and frames 3..5.
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 0, 0, 1, 1, 1],
            [1, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(visibility_mask(6, 1, chunk_size=2, local_attn_size=4, sink_size=1), expected)
    whole = visibility_mask(6, 2, chunk_size=3, local_attn_size=-1, sink_size=0)
    assert whole.shape == (12, 12) and whole[:6, :6].all() and not whole[:6, 6:].any() and whole[6:].all()


def test_attention_backends() -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'fast'; choose one of auto, cudnn"):
        check_backend("fast")
    with pytest.raises(ValueError, match="unknown attention backend 'sdpa'"):
        tiny_model(torch.float64).attention_backend = "sdpa"
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 5, 2, 8, dtype=torch.float64, generator=generator) for _ in range(3))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    for backend in ("auto", "math"):
        torch.testing.assert_close(attention(q, k, v, backend), expected)


def test_flash_backends_refuse_what_they_cannot_run() -> None:
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match=r"4 \(backend 'fa4'\) needs CUDA tensors in float16 or bfloat16 "):
        attention(q, q, q, "fa4")
    with pytest.raises(RuntimeError, match=r"3 \(backends 'fa3' and 'fp8'\) needs CUDA tensors in bfloat16 "):
        attention(q, q, q, "fa3")
    for kernel in ("fa4", "fa3"):  # `auto` never takes them here
        assert not flash_usable(kernel, q.device) and not flash_supports(kernel, q)
        with pytest.raises(ValueError, match=f"attention with '{kernel}' takes no mask"):
            attention(q, q, q, kernel, mask=torch.ones(4, 4, dtype=torch.bool))  # type: ignore[arg-type]
    # e4m3 inputs (backend fp8's cache) have one kernel, FlashAttention-3's, whatever the backend asked.
    with pytest.raises(RuntimeError, match=r"FlashAttention-3 .* needs CUDA .* got cpu torch.float8_e4m3fn"):
        attention(q.to(E4M3), q.to(E4M3), q.to(E4M3), "cudnn")


def test_attention_routes_to_the_flash_kernels_where_they_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The routing alone, on a CPU: the flash kernels' checks say yes, and the kernels are recorders."""
    seen: list[tuple[str, int]] = []

    def recorder(kernel: str):
        def record(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            seen.append((kernel, key.shape[1]))
            return torch.zeros(query.shape, dtype=torch.float32)

        return record

    monkeypatch.setattr(attention_module, "flash_supports", lambda kernel, query: True)
    monkeypatch.setattr(attention_module, "flash_usable", lambda kernel, device: True)
    monkeypatch.setattr(attention_module, "fa4_attention", recorder("fa4"))
    monkeypatch.setattr(attention_module, "fa3_attention", recorder("fa3"))
    q = torch.randn(1, 4, 2, 8)
    long, short = torch.randn(1, FLASH_MIN_KEYS, 2, 8), torch.randn(1, FLASH_MIN_KEYS - 1, 2, 8)
    assert not attention(q, long, long, "auto").any()
    attention(q, short, short, "auto")  # short keys: SDPA
    attention(q, long, long, "auto", mask=torch.ones(4, FLASH_MIN_KEYS, dtype=torch.bool))  # masked: SDPA
    attention(q, long, long, "math")  # a named SDPA backend is kept
    attention(q, short, short, "fa4")  # forced, whatever the length
    attention(q, short, short, "fa3")
    attention(q, long, long, "fp8")  # wider inputs under `fp8`: as `auto`
    attention(q, short, short, "fp8")
    eight_bit = short.to(E4M3)
    attention(q.to(E4M3), eight_bit, eight_bit, "fp8")  # e4m3: FlashAttention-3
    long_keys, short_keys = FLASH_MIN_KEYS, FLASH_MIN_KEYS - 1
    assert seen == [
        ("fa4", long_keys), ("fa4", short_keys), ("fa3", short_keys), ("fa4", long_keys), ("fa3", short_keys),
    ]  # fmt: skip
    # Without FlashAttention-4 (not installed, or not this GPU), `auto` takes FlashAttention-3.
    monkeypatch.setattr(attention_module, "flash_usable", lambda kernel, device: kernel == "fa3")
    seen.clear()
    attention(q, long, long, "auto")
    attention(q, short, short, "auto")
    assert seen == [("fa3", FLASH_MIN_KEYS)]


def test_fp8_attention_keeps_an_e4m3_cache_that_saturates() -> None:
    model = tiny_model(torch.float32)
    assert model.make_kv_cache(**TINY_CACHE).keys.dtype == torch.float32
    model.attention_backend = "fp8"
    cache = model.make_kv_cache(**TINY_CACHE)
    assert cache.keys.dtype == cache.values.dtype == E4M3
    cache.begin_pass(0, 1)
    key = torch.full((1, 6, 2, 32), 1000.0)
    value = torch.linspace(-3, 3, 6 * 2 * 32).reshape(1, 6, 2, 32)
    keys, values = cache.update(0, key, value)
    assert keys.dtype == E4M3 and torch.equal(keys.float(), torch.full_like(key, 448.0))  # saturated
    torch.testing.assert_close(values.float(), value, rtol=2**-4, atol=2**-9)  # e4m3: 3 mantissa bits
    # (A CPU's cast saturates by itself; the GPU test checks the clamp that CUDA's cast needs.)


def test_fp8_attention_hands_e4m3_queries_keys_and_values_to_flashattention3(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a CPU, with FlashAttention-3 replaced by a recorder: the cached passes' self-attention is e4m3."""
    seen: list[tuple[torch.dtype, ...]] = []

    def recorder(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        seen.append((query.dtype, key.dtype, value.dtype))
        return torch.zeros(query.shape, dtype=torch.bfloat16)

    monkeypatch.setattr(attention_module, "fa3_attention", recorder)
    model = tiny_model(torch.float32)
    model.attention_backend = "fp8"
    inputs = tiny_inputs(model.config, 1, torch.float32)
    cache = model.make_kv_cache(**TINY_CACHE)
    text, control = model.prepare_text(inputs.context), model.prepare_control(inputs.control)
    with torch.no_grad():
        model(inputs.noise, 999.0, inputs.y, text, control, cache=cache, first_latent_frame=0)
        model.update_cache(inputs.noise, inputs.y, text, control, cache=cache, first_latent_frame=0)
    layers = model.config.num_layers
    assert seen == [(E4M3, E4M3, E4M3)] * (2 * layers - 1)  # the cache update's last block only writes
    assert cache.keys.dtype == E4M3 and cache.keys[-1].float().abs().sum() > 0


@cuda_test
def test_fa4_backend_matches_exact_attention_and_auto_takes_it_for_long_keys() -> None:
    if not flash_usable("fa4", torch.device("cuda")):
        pytest.skip("needs the flash-attn-4 package and a Hopper or Blackwell GPU")
    generator = torch.Generator(device="cuda").manual_seed(2)
    # 3 frames of 130 queries against 7 frames of keys: lengths that are no multiple of the kernel's tiles
    q, k, v = (
        torch.randn(1, length, 4, 128, device="cuda", generator=generator) for length in (390, 910, 910)
    )
    expected = attention(q, k, v, "math")
    bf16 = [t.bfloat16() for t in (q, k, v)]
    for result in (attention(*bf16, "fa4"), torch.compile(attention, fullgraph=True)(*bf16, "fa4")):
        error = relative_error(result, expected)
        assert result.shape == expected.shape and error < 1e-2, error

    long_keys = [t.bfloat16() for t in (q, k.repeat(1, 3, 1, 1), v.repeat(1, 3, 1, 1))]
    assert k.shape[1] < FLASH_MIN_KEYS <= long_keys[1].shape[1]
    assert torch.equal(attention(*long_keys, "auto"), attention(*long_keys, "fa4"))
    assert torch.equal(attention(*bf16, "auto"), attention(*bf16, "cudnn"))
    # float32 never reaches FA4 (it takes fp16 and bf16 only): `auto` falls back to SDPA.
    long32 = [t.float() for t in long_keys]
    torch.testing.assert_close(attention(*long32, "auto"), attention(*long32, "math"), rtol=1e-4, atol=1e-4)

    # Batch 2 with K/V the visible part of a longer buffer, as the rolling cache hands them over.
    buffer = torch.randn(2, 1200, 4, 128, device="cuda", generator=generator, dtype=torch.bfloat16)
    query = torch.randn(2, 390, 4, 128, device="cuda", generator=generator, dtype=torch.bfloat16)
    key, value = buffer[:, :910], buffer[:, 290:1200]
    expected = attention(query.float(), key.float(), value.float(), "math")
    error = relative_error(attention(query, key, value, "fa4"), expected)
    assert error < 1e-2, error


@cuda_test
def test_fa3_kernels_match_exact_attention_in_bf16_and_e4m3() -> None:
    if not flash_usable("fa3", torch.device("cuda")):
        pytest.skip("needs the fa3-fwd package and a Hopper GPU")
    generator = torch.Generator(device="cuda").manual_seed(3)
    # Batch 2, K/V the visible part of a longer buffer (as the rolling cache hands them over), lengths that
    # are no multiple of the kernel's tiles.
    buffer = torch.randn(2, 1200, 4, 128, device="cuda", generator=generator)
    query = torch.randn(2, 390, 4, 128, device="cuda", generator=generator)
    key, value = buffer[:, :910], buffer[:, 290:1200]
    expected = attention(query, key, value, "math")

    def error(result: torch.Tensor) -> float:
        assert result.shape == expected.shape and result.dtype == torch.bfloat16, (result.shape, result.dtype)
        return relative_error(result, expected)

    bf16 = [t.bfloat16() for t in (query, key, value)]
    e4m3_buffer = buffer.to(E4M3)
    e4m3 = [query.to(E4M3), e4m3_buffer[:, :910], e4m3_buffer[:, 290:1200]]
    compiled = torch.compile(attention, fullgraph=True)
    errors = {
        "bf16": error(attention(*bf16, "fa3")),
        "bf16 compiled": error(compiled(*bf16, "fa3")),
        "e4m3": error(attention(*e4m3, "fp8")),
        "e4m3 compiled": error(compiled(*e4m3, "auto")),
    }
    # 3 mantissa bits in Q, K, V and the probabilities: a few percent (0.07 at the model's shapes).
    limits = {"bf16": 1e-2, "bf16 compiled": 1e-2, "e4m3": 0.1, "e4m3 compiled": 0.1}
    assert all(errors[name] < limits[name] for name in errors), errors
    if not flash_usable("fa4", torch.device("cuda")):  # `auto` takes FlashAttention-3 for long keys only
        long_keys = [query.bfloat16(), *(buffer.bfloat16().repeat(1, 2, 1, 1) for _ in range(2))]
        assert long_keys[1].shape[1] >= FLASH_MIN_KEYS > bf16[1].shape[1]
        assert torch.equal(attention(*long_keys, "auto"), attention(*long_keys, "fa3"))
        assert torch.equal(attention(*bf16, "auto"), attention(*bf16, "cudnn"))
    # CUDA's own cast to e4m3 turns 1000 into NaN: the cache and the queries saturate first.
    assert to_e4m3(torch.tensor([1000.0, -1000.0], device="cuda")).float().tolist() == [448.0, -448.0]
    cache = KVCache(num_layers=1, batch_size=1, frame_tokens=4, num_heads=1, head_dim=8, chunk_size=1,
                    local_attn_size=-1, sink_size=0, num_frames=1, dtype=E4M3, device="cuda")  # fmt: skip
    cache.begin_pass(0, 1)
    big = torch.full((1, cache.frame_tokens, 1, 8), 1000.0, device="cuda")
    keys, values = cache.update(0, big, -big)
    assert keys.float().eq(448).all() and values.float().eq(-448).all()


@cuda_test
def test_fp8_attention_rollout_stays_close_to_bf16() -> None:
    """The tiny model's chunked rollout over an e4m3 cache against the same rollout in bf16 attention."""
    if not flash_usable("fa3", torch.device("cuda")):
        pytest.skip("needs the fa3-fwd package and a Hopper GPU")
    model = tiny_model(torch.float32).cuda().set_compute_dtype(torch.bfloat16)
    inputs = tiny_inputs(model.config, 12).to("cuda")
    velocities = {}
    for backend in ("auto", "fp8"):
        model.attention_backend = backend
        calls, _ = rollout(model, inputs, chunk=3, window=6, sink=3, kv_only_update=True)
        velocities[backend] = torch.stack([call.velocity for call in calls])
    reference, eight_bit = velocities["auto"], velocities["fp8"]
    error = relative_error(eight_bit, reference)
    assert eight_bit.isfinite().all() and 0 < error < 0.05, error


@cuda_test
def test_norm_rope_kernel_matches_the_model_ops() -> None:
    """The Triton kernel at the full model's width, into a fresh tensor and into a strided slice of a
    batch-2 cache, in bf16 and e4m3 (with magnitudes past 448 that must saturate, not turn NaN)."""
    generator = torch.Generator(device="cuda").manual_seed(4)
    grid, width, head_dim = (2, 6, 10), 5120, 128
    tokens = grid[0] * grid[1] * grid[2]
    x = (3 * torch.randn(2, tokens, width, device="cuda", generator=generator)).bfloat16()
    norm = RMSNorm(width, 1e-6).cuda()
    norm.weight.copy_(1 + torch.randn(width, device="cuda", generator=generator))
    rope = rope_tables(head_dim, 17, grid, torch.device("cuda"), torch.float32)
    exact = apply_rope(norm(x).unflatten(-1, (-1, head_dim)), *rope).flatten(2)
    fresh = norm_rope_into(x, norm, rope, torch.empty_like(x))
    torch.testing.assert_close(fresh.float(), exact, rtol=2**-7, atol=1e-5)  # one bf16 rounding
    cache = torch.zeros(2, 3 * tokens, width, device="cuda", dtype=torch.bfloat16)
    norm_rope_into(x, norm, rope, cache[:, tokens : 2 * tokens])
    assert torch.equal(cache[:, tokens : 2 * tokens], fresh) and not cache[:, :tokens].any()
    assert not cache[:, 2 * tokens :].any()
    norm.weight.mul_(200.0)  # magnitudes up to ~2000: past e4m3's 448
    exact = apply_rope(norm(x).unflatten(-1, (-1, head_dim)), *rope).flatten(2)
    e4m3 = norm_rope_into(x, norm, rope, torch.empty_like(x, dtype=E4M3)).float()
    assert e4m3.isfinite().all() and e4m3.abs().max() == 448.0
    torch.testing.assert_close(e4m3, exact.clamp(-448, 448), rtol=2**-4, atol=2**-6)  # 3 mantissa bits
    from worldgen.models.triton_kernels import norm_rope  # Triton: on CUDA machines only

    cos, sin = (table[:, 0] for table in rope)
    with pytest.raises(ValueError, match="must be the same"):
        norm_rope(x, norm.weight, norm.eps, cos, sin, torch.empty_like(x[:, 1:]))
    with pytest.raises(ValueError, match="cos and sin must be contiguous"):
        norm_rope(x, norm.weight, norm.eps, cos[1:], sin[1:], torch.empty_like(x))
    with pytest.raises(ValueError, match=r"a CUDA tensor in bf16, fp16 or float32, got torch\.float64"):
        norm_rope(x.double(), norm.weight, norm.eps, cos, sin, torch.empty_like(x))


@cuda_test
def test_gelu_epilogue_matches_linear_then_gelu() -> None:
    """In float32 the epilogue is the tanh GELU (the checkpoint's), told apart from the exact one; in bf16,
    eager and compiled, it matches linear-then-GELU to rounding."""
    generator = torch.Generator(device="cuda").manual_seed(5)
    ffn = FeedForward(256, 1024, 256).cuda()
    x = torch.randn(2, 3, 40, 256, device="cuda", generator=generator)
    up, _, down = ffn
    tanh_gelu, exact_gelu = ffn(x), down(torch.nn.functional.gelu(up(x)))
    # The two GELUs differ by up to ~5e-4 per element; float32 GEMMs' summation order by far less.
    assert relative_error(ffn(x, gelu_epilogue=True), tanh_gelu) < 0.1 * relative_error(exact_gelu, tanh_gelu)
    ffn.bfloat16()
    for compiled in (False, True):
        forward = torch.compile(ffn, fullgraph=True, dynamic=False) if compiled else ffn
        fused, unfused = forward(x, gelu_epilogue=True), forward(x)
        assert fused.shape == tanh_gelu.shape and fused.dtype == torch.bfloat16
        # The hidden state rounds to bf16 once (after the epilogue) instead of twice: ~2^-8 apart.
        assert relative_error(fused, unfused) < 1e-2 and relative_error(fused, tanh_gelu) < 1e-2


@cuda_test
@pytest.mark.parametrize("compiled", [False, True])
def test_fused_kernels_rollout_matches_the_model_ops(compiled: bool) -> None:
    """The tiny model's chunked rollout in bf16 with the Triton norm+RoPE and the GELU epilogue against
    the same rollout without them: equal up to bf16 rounding, eager and with compiled blocks."""
    model = tiny_model(torch.float32).cuda().set_compute_dtype(torch.bfloat16)
    inputs = tiny_inputs(model.config, 8).to("cuda")
    velocities = {}
    for fused in (False, True):
        model.triton_kernels = model.gelu_epilogue = fused
        if compiled and fused:
            for block in model.blocks:
                block.compile(dynamic=False)
        calls, _ = rollout(model, inputs, chunk=2, window=5, sink=1, kv_only_update=True)
        velocities[fused] = torch.stack([call.velocity for call in calls])
    error = relative_error(velocities[True], velocities[False])
    assert velocities[True].isfinite().all() and error < 1e-2, error


# ------------------------------------------------------------------------------------- tiny model rollouts
@torch.no_grad()
def test_update_cache_writes_what_the_whole_timestep_0_forward_writes() -> None:
    """Every later pass sees the cache: equal velocities over 4 chunks mean equal K/V in every layer."""
    model = tiny_model(torch.float64)
    inputs = tiny_inputs(model.config, 12, torch.float64)
    whole, whole_chunks = rollout(model, inputs, chunk=3, window=6, sink=3)
    kv_only, kv_only_chunks = rollout(model, inputs, chunk=3, window=6, sink=3, kv_only_update=True)
    denoising = [call for call in whole if call.timestep != 0.0]
    assert len(kv_only) == len(denoising) == 16
    for expected, call in zip(denoising, kv_only, strict=True):
        assert torch.equal(call.velocity, expected.velocity)
    assert all(torch.equal(a, b) for a, b in zip(kv_only_chunks, whole_chunks, strict=True))


@pytest.mark.parametrize("backend", ["math", "fp8"])
@torch.no_grad()
def test_triton_norm_rope_writes_the_cache_the_model_ops_write(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU `norm_rope_into` runs the model's own ops, so this checks the path's plumbing: Q normed and
    rotated in `attend`, K written straight into the cache's slots (2-frame chunks in a 4-frame ring cross
    its end: two runs per write) by the denoising passes and by `update_cache`; with `fp8`, Q and K cast
    to e4m3 into an e4m3 cache (FlashAttention-3 replaced by exact attention over the e4m3 values)."""
    dtype = torch.float64
    if backend == "fp8":

        def exact(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            assert query.dtype == key.dtype == value.dtype == E4M3
            return attention(*(t.float() for t in (query, key, value)), "math").bfloat16()

        monkeypatch.setattr(attention_module, "fa3_attention", exact)
        dtype = torch.float32
    model = tiny_model(dtype)
    model.attention_backend = backend
    inputs = tiny_inputs(model.config, 8, dtype)
    writes: list[torch.dtype] = []

    def counted(x: torch.Tensor, *args: object) -> torch.Tensor:
        out = norm_rope_into(x, *args)
        writes.append(out.dtype)
        return out

    monkeypatch.setattr(dit_module, "norm_rope_into", counted)
    rollouts = {}
    for fused in (False, True):
        model.triton_kernels = fused
        calls, clean = rollout(model, inputs, chunk=2, window=5, sink=1, kv_only_update=True)
        rollouts[fused] = torch.stack([call.velocity for call in calls]), torch.cat(clean, dim=2)
    # Per chunk, every layer of the 5 passes writes Q and K's slot runs, but the cache update's last layer
    # writes no Q. Slots of frames 0..7 with sink 1 in a 5-frame window: 0 1 | 2 3 | 4 1 (2 runs) | 2 3.
    runs_per_chunk = (1, 1, 2, 1)
    layers = model.config.num_layers
    assert len(writes) == sum(5 * layers * (1 + runs) - 1 for runs in runs_per_chunk)
    assert set(writes) == {E4M3 if backend == "fp8" else dtype}
    # float64 agrees to rounding; e4m3 codes are the same bits both ways (one rounding from float32).
    tolerance = 1e-12 if backend == "math" else 1e-6
    for expected, fused in zip(rollouts[False], rollouts[True], strict=True):
        torch.testing.assert_close(fused, expected, rtol=tolerance, atol=tolerance)


def test_update_cache_needs_a_cache() -> None:
    model = tiny_model(torch.float64)
    inputs = tiny_inputs(model.config, 3, torch.float64)
    text, control = model.prepare_text(inputs.context), model.prepare_control(inputs.control)
    with pytest.raises(ValueError, match="update_cache needs the KV cache to write, got NoneType"):
        model.update_cache(inputs.noise, inputs.y, text, control, cache=None, first_latent_frame=0)


def _full_sequence(
    model: CausalDiT,
    inputs: Inputs,
    call: Call,
    clean_chunks: list[torch.Tensor],
    chunk: int,
    mask: torch.Tensor,
) -> torch.Tensor:
    """One forward over [clean chunks before the call's chunk, its input], sliced to the call's chunk."""
    first, end = call.first_frame, call.first_frame + chunk
    x = torch.cat([*clean_chunks[: first // chunk], call.x], dim=2)
    timesteps = torch.zeros(1, end, dtype=torch.float64)
    timesteps[:, first:] = call.timestep
    out = model(
        x, timesteps, inputs.y[:, :, :end], inputs.context, inputs.control[:, :, :end], attn_mask=mask
    )
    return out[:, :, first:]


@pytest.mark.parametrize(
    ("chunk", "window", "sink", "frames"),
    [
        (3, -1, 0, 9),  # whole video visible
        (2, 4, 0, 8),  # window smaller than the video, no sink
        (3, 6, 3, 12),  # sink + rolling window (the parity setting)
        (3, 7, 1, 12),  # the ring of window frames wraps in the middle of a chunk
    ],
)
@torch.no_grad()
def test_rollout_matches_full_sequence_with_visibility_mask(chunk: int, window: int, sink: int, frames: int):
    model = tiny_model(torch.float64)
    inputs = tiny_inputs(model.config, frames, torch.float64)
    calls, clean_chunks = rollout(model, inputs, chunk, window, sink)
    frame_tokens = model.frame_tokens(*LATENT_HW)
    for call in calls:
        end = call.first_frame + chunk
        mask = visibility_mask(end, frame_tokens, chunk, window, sink)
        expected = _full_sequence(model, inputs, call, clean_chunks, chunk, mask)
        torch.testing.assert_close(call.velocity, expected, rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_window_changes_what_late_chunks_see() -> None:
    """The oracle is sensitive: the last chunk of a rolling-window rollout differs from a whole-video one."""
    model = tiny_model(torch.float64)
    inputs = tiny_inputs(model.config, 8, torch.float64)
    calls, clean_chunks = rollout(model, inputs, 2, 4, 0)
    whole_video = visibility_mask(8, model.frame_tokens(*LATENT_HW), 2, -1, 0)
    last_denoise = calls[-2]
    unwindowed = _full_sequence(model, inputs, last_denoise, clean_chunks, 2, whole_video)
    assert (last_denoise.velocity - unwindowed).abs().max() > 1e-4


@pytest.mark.parametrize(("prepare_text", "prepare_control"), [(True, True), (True, False), (False, True)])
@torch.no_grad()
def test_prepared_states_match_plain_path(prepare_text: bool, prepare_control: bool) -> None:
    model = tiny_model(torch.float64)
    inputs = tiny_inputs(model.config, 6, torch.float64)
    plain, _ = rollout(model, inputs, 3, 3, 0, prepare_text=False, prepare_control=False)
    fast, _ = rollout(model, inputs, 3, 3, 0, prepare_text=prepare_text, prepare_control=prepare_control)
    for plain_call, fast_call in zip(plain, fast, strict=True):
        torch.testing.assert_close(fast_call.velocity, plain_call.velocity, rtol=1e-12, atol=1e-12)


@torch.no_grad()
def test_bf16_compute_keeps_modulation_and_stream_in_float32() -> None:
    reference = tiny_model(torch.float32)
    model = copy.deepcopy(reference).set_compute_dtype(torch.bfloat16)
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert model.patch_embedding.weight.dtype == torch.bfloat16
    assert model.head.head.weight.dtype == torch.bfloat16
    for kept in (
        model.time_embedding[0].weight,
        model.time_projection[1].weight,
        model.blocks[0].modulation,
        model.blocks[0].norm3.weight,
        model.blocks[0].self_attn.norm_q.weight,
        model.head.modulation,
    ):
        assert kept.dtype == torch.float32
    inputs = tiny_inputs(model.config, 3, torch.float32)
    outputs = []
    for dit in (reference, model):
        cache = dit.make_kv_cache(
            batch_size=1, latent_height=4, latent_width=6, chunk_size=3, local_attn_size=-1, sink_size=0,
            num_frames=3,
        )  # fmt: skip
        assert cache.keys.dtype == dit.blocks[0].self_attn.k.weight.dtype
        outputs.append(dit(inputs.noise, 999.0, inputs.y, inputs.context, inputs.control, cache=cache))
    assert outputs[1].dtype == torch.float32
    assert relative_error(outputs[1], outputs[0]) < 0.05


@torch.no_grad()
def test_bad_inputs_raise_clear_errors() -> None:
    model = tiny_model(torch.float64)
    inputs = tiny_inputs(model.config, 3, torch.float64)
    x, y, context, control = inputs.noise, inputs.y, inputs.context, inputs.control
    with pytest.raises(ValueError, match=r"x must be \[batch, 16, frames, height, width\]"):
        model(x[:, :8], 1.0, y, context, control)
    with pytest.raises(ValueError, match=r"y must be \[1, 20, 3, 4, 6\]"):
        model(x, 1.0, y[:, :, :2], context, control)
    with pytest.raises(ValueError, match=r"control must be \[batch, 384, frames, height, width\]"):
        model(x, 1.0, y, context, control[:, :6])
    with pytest.raises(ValueError, match=r"control state is for \[batch, frames, tokens\] = \[1, 2, 6\]"):
        model(x, 1.0, y, context, model.prepare_control(control[:, :, :2]))
    with pytest.raises(ValueError, match="text state is for batch 2, x has batch 1"):
        model(x, 1.0, y, model.prepare_text(context.expand(2, -1, -1)), control)
    with pytest.raises(ValueError, match=r"context must be \[batch, tokens <= 512, 32\]"):
        model(x, 1.0, y, torch.zeros(1, 513, 32, dtype=torch.float64), control)
    with pytest.raises(ValueError, match=r"timestep must be a number, \[batch\] or \[batch, frames\]"):
        model(x, torch.ones(2, 3), y, context, control)
    cache = model.make_kv_cache(
        batch_size=2, latent_height=4, latent_width=6, chunk_size=3, local_attn_size=-1, sink_size=0,
        num_frames=3,
    )  # fmt: skip
    with pytest.raises(ValueError, match="KV cache is for batch 2 x 6 tokens per frame, x gives 1 x 6"):
        model(x, 1.0, y, context, control, cache=cache)


@cuda_test
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("fp8_layers", [False, True])
@pytest.mark.parametrize("backend", ["auto", "fp8"])
def test_cached_passes_never_synchronise_with_the_device(backend: str, fp8_layers: bool, fused: bool) -> None:
    if backend == "fp8" and not flash_usable("fa3", torch.device("cuda")):
        pytest.skip("needs the fa3-fwd package and a Hopper GPU")
    model = tiny_model(torch.float32).cuda().set_compute_dtype(torch.bfloat16)
    model.attention_backend = backend
    model.triton_kernels = model.gelu_epilogue = fused
    if fp8_layers:  # with `fused`, their inputs come from the Triton quantisation kernel
        quantize_dit(model)
    inputs = tiny_inputs(model.config, 6, torch.float32)
    x, y, control = (t.cuda() for t in (inputs.noise, inputs.y, inputs.control))
    text = model.prepare_text(inputs.context.cuda())
    cache = model.make_kv_cache(
        batch_size=1, latent_height=4, latent_width=6, chunk_size=3, local_attn_size=3, sink_size=0,
        num_frames=6,
    )  # fmt: skip
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for first in (0, 3):
            frames = slice(first, first + 3)
            control_state = model.prepare_control(control[:, :, frames])
            for timestep in (*TIMESTEPS, 0.0):
                model(x[:, :, frames], timestep, y[:, :, frames], text, control_state, cache=cache,
                      first_latent_frame=first)  # fmt: skip
            model.update_cache(
                x[:, :, frames], y[:, :, frames], text, control_state, cache=cache, first_latent_frame=first
            )
    finally:
        torch.cuda.set_sync_debug_mode("default")
