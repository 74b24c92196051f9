"""fp8 linear layers (worldgen/quant.py): e4m3 rounding bounds, the layers swapped, and the error of a
quantised DiT against float32, on CPU through the exact emulation; the kernel path on a GPU."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from helpers import TIMESTEPS, cuda_test, rollout_velocities, tiny_inputs, tiny_model

from worldgen import quant as quant_module
from worldgen.config import get_preset
from worldgen.models import fp8_rows
from worldgen.models.dit import CausalDiT, Linear
from worldgen.models.fp8_rows import (
    Quantized,
    dequantize_rows,
    fused_quantize,
    fused_residual_quantize,
    quantize_rows,
)
from worldgen.models.kv_cache import E4M3
from worldgen.quant import (
    Fp8Linear,
    fp8_error,
    quantize_dit,
    scaled_mm,
    scaled_mm_emulated,
    supports_scaled_mm,
)

# Every layer the swap must cover in the 2-block tiny model, listed here rather than derived from the
# pattern under test.
PER_BLOCK = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o",
    "ffn.0", "ffn.2", "cam_injector_layer1", "cam_injector_layer2", "cam_scale_layer", "cam_shift_layer",
)  # fmt: skip
EXPECTED_FP8 = {f"blocks.{block}.{name}" for block in (0, 1) for name in PER_BLOCK} | {
    "c2ws_hidden_states_layer1",
    "c2ws_hidden_states_layer2",
}
EXPECTED_KEPT = {f"blocks.{block}.cross_attn.{name}" for block in (0, 1) for name in "kv"} | {
    "patch_embedding_wancamctrl", "text_embedding.0", "text_embedding.2", "time_embedding.0",
    "time_embedding.2", "time_projection.1", "head.head",
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ helpers
def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _fp8_model(reference: CausalDiT, use_scaled_mm: bool | None = False) -> CausalDiT:
    return quantize_dit(copy.deepcopy(reference).set_compute_dtype(torch.bfloat16), use_scaled_mm)


# ---------------------------------------------------------------------------------------------- rounding
def test_quantize_rows_round_trip_is_within_e4m3_rounding() -> None:
    # Rows of very different magnitudes, plus a row of zeros: each row must get its own scale.
    x = _randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]
    x[5] = 0.0
    codes, scale = quantize_rows(x)
    assert codes.dtype == E4M3 and scale.dtype == torch.float32 and scale.shape == (64, 1)
    scaled = x / scale
    assert torch.allclose(scaled.abs().amax(dim=1)[x.abs().amax(dim=1) > 0], torch.tensor(448.0))
    error = (dequantize_rows(codes, scale) - x).abs()
    # e4m3: 3 mantissa bits, so a normal number (|code| >= 2^-6) is off by at most half an ulp = 2^-4 of
    # itself; subnormals are off by at most half the smallest step 2^-9.
    normal = scaled.abs() >= 2**-6
    assert (error[normal] <= 2**-4 * x.abs()[normal]).all()
    assert (error <= torch.maximum(2**-4 * x.abs(), 2**-10 * scale)).all()
    assert (dequantize_rows(codes, scale)[5] == 0).all()
    assert not torch.isnan(codes.float()).any()


def test_fp8_linear_output_error_is_small_on_random_data() -> None:
    linear = Linear(512, 384).bfloat16().requires_grad_(False)
    x = _randn(300, 512, seed=1)
    exact = torch.nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
    fp8 = Fp8Linear.from_linear(linear, use_scaled_mm=False)
    out = fp8(x.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == (300, 384)
    assert fp8.weight.dtype == E4M3 and fp8.weight_scale.shape == (384,)
    error = fp8_error(exact, out)
    # Two e4m3 roundings of ~2^-5 relative rms each; bf16 alone is ~10x better.
    assert 0.01 < error < 0.05
    assert fp8_error(exact, linear(x.bfloat16())) < error / 5
    # Leading dimensions pass through, as for nn.Linear.
    torch.testing.assert_close(fp8(x.bfloat16().view(3, 100, 512)), out.view(3, 100, 384), rtol=0, atol=0)


def test_emulation_is_the_scaled_matmul_of_the_dequantised_operands() -> None:
    x_codes, x_scale = quantize_rows(_randn(40, 64, seed=2))
    w_codes, w_scale = quantize_rows(_randn(48, 64, seed=3))
    bias = _randn(48, seed=4).bfloat16()
    expected = dequantize_rows(x_codes, x_scale).double() @ dequantize_rows(w_codes, w_scale).double().t()
    out = scaled_mm_emulated(x_codes, x_scale, w_codes, w_scale.squeeze(1), bias, fast_accum=False)
    torch.testing.assert_close(out, (expected + bias.double()).bfloat16(), rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("fast_accum", [False, True])
def test_scaled_mm_call_matches_the_emulation_on_cpu(fast_accum: bool) -> None:
    """The arguments handed to torch._scaled_mm (scale shapes, transposed weight, bias) mean what the
    emulation computes. CPU builds with a row-wise _scaled_mm check it without a GPU; their kernel takes
    fast accumulation and sums exactly all the same (the GPU test checks what it changes there)."""
    x_codes, x_scale = quantize_rows(_randn(40, 64, seed=5))
    w_codes, w_scale = quantize_rows(_randn(48, 64, seed=6))
    bias = _randn(48, seed=7).bfloat16()
    try:
        kernel = scaled_mm(x_codes, x_scale, w_codes, w_scale.squeeze(1), bias, fast_accum=fast_accum)
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"this CPU build has no row-wise torch._scaled_mm: {error}")
    emulated = scaled_mm_emulated(x_codes, x_scale, w_codes, w_scale.squeeze(1), bias, fast_accum=False)
    torch.testing.assert_close(kernel, emulated, rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("fast_accum", [False, True])
def test_fp8_linear_hands_its_fast_accumulation_to_the_kernel(monkeypatch, fast_accum: bool) -> None:
    calls = []

    def recorded(*args, fast_accum: bool):
        calls.append(fast_accum)
        return scaled_mm_emulated(*args, fast_accum=fast_accum)

    monkeypatch.setattr(quant_module, "scaled_mm", recorded)
    layer = Fp8Linear.from_linear(Linear(64, 48).bfloat16(), use_scaled_mm=True, fast_accum=fast_accum)
    layer(_randn(5, 64).bfloat16())
    assert calls == [fast_accum]


# ------------------------------------------------------------------------------------ fused quantisation
def _fused_forms(x: torch.Tensor) -> dict[str, tuple[dict, torch.Tensor]]:
    """fused_quantize's arguments for x [B, F, S, K], and the float64 values each form must quantise."""
    batch, frames, _, width = x.shape
    mul, add = _randn(batch, frames, 1, width, seed=3), _randn(batch, frames, 1, width, seed=4)
    weight, bias = _randn(width, seed=5), _randn(width, seed=6)
    wide = x.double()
    normed = torch.nn.functional.layer_norm(wide, (width,), eps=1e-6)
    return {
        "plain": ({}, wide),
        "layer norm": ({"eps": 1e-6}, normed),
        "modulation per frame": ({"eps": 1e-6, "mul": mul, "add": add}, normed * mul.double() + add.double()),
        "affine layer norm": (
            {"eps": 1e-6, "mul": weight, "add": bias},
            normed * weight.double() + bias.double(),
        ),
        "gelu": ({"gelu": True}, torch.nn.functional.gelu(wide, approximate="tanh")),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_quantize_quantises_each_form_within_e4m3_rounding(dtype: torch.dtype) -> None:
    """Each form of the op against float64 values: within half an e4m3 step (2^-4 relative) of each value,
    or of the row's subnormal step (scale * 2^-9); the scales are the rows' amax / 448."""
    x = (_randn(2, 3, 4, 64, seed=2) * 3).to(dtype)
    x[1, 2, 3] = 0.0
    for form, (arguments, expected) in _fused_forms(x).items():
        codes, scale = fused_quantize(x, **arguments)
        assert codes.shape == x.shape and codes.dtype == E4M3 and scale.shape == (*x.shape[:-1], 1), form
        amax = expected.abs().amax(-1, keepdim=True).clamp(min=fp8_rows.MIN_AMAX)
        torch.testing.assert_close(scale.double(), amax / 448, rtol=1e-6, atol=0, msg=form)
        error = (dequantize_rows(codes, scale).double() - expected).abs()
        assert (error <= 2**-4 * expected.abs() + scale * 2**-9).all(), form
        if not expected[1, 2, 3].any():  # forms with f(0) = 0: a row of zeros stays zeros
            assert not codes[1, 2, 3].float().any() and scale[1, 2, 3].isfinite().all(), form


def test_fused_quantize_checks_its_tables() -> None:
    x = _randn(2, 3, 4, 32)
    with pytest.raises(ValueError, match="give both mul and add, or neither"):
        fused_quantize(x, mul=torch.ones(32))
    # Tables grouped for another batch, or flat, would silently serve the wrong rows.
    for shape in ((1, 3, 1, 32), (64,), (6, 32)):
        message = (
            rf"mul \[{', '.join(map(str, shape))}\] must be \[32\] or \[2, 3, 1, 32\] for x \[2, 3, 4, 32\]"
        )
        with pytest.raises(ValueError, match=message):
            fused_quantize(x, mul=torch.ones(shape), add=torch.zeros(shape))
    rows = x.reshape(-1, 32)
    with pytest.raises(
        ValueError, match=r"mul and add must be tables of one shape, got \[\[6, 32\], \[1, 32\]\]"
    ):
        torch.ops.worldgen.quantize_rows(rows, None, torch.ones(6, 32), torch.zeros(1, 32), False)
    with pytest.raises(ValueError, match=r"\[5, 32\] must be \[R, 32\] with R dividing the 24 rows of x"):
        torch.ops.worldgen.quantize_rows(rows, None, torch.ones(5, 32), torch.zeros(5, 32), False)


@pytest.mark.parametrize("form", ["plain", "modulation per frame", "affine layer norm", "gelu"])
def test_quantize_rows_op_passes_opcheck(form: str) -> None:
    """The custom op's schema, fake (shape) implementation and dispatch agree with its real outputs."""
    x = _randn(2, 3, 4, 64, seed=7)
    arguments, _ = _fused_forms(x)[form]
    width = x.shape[-1]
    tables = [arguments[name].reshape(-1, width) if name in arguments else None for name in ("mul", "add")]
    op_arguments = (x.reshape(-1, width), arguments.get("eps"), *tables, arguments.get("gelu", False))
    torch.library.opcheck(torch.ops.worldgen.quantize_rows.default, op_arguments)


def _residual_forms(stream: torch.Tensor) -> dict[str, tuple[tuple, dict, torch.Tensor]]:
    """fused_residual_quantize's (update,), keyword arguments and the float64 new stream, for the two ways
    the DiT block calls it: the self-attention's gated update with the camera (then the affine norm3), and
    the cross-attention's plain update (then the FFN's per-frame modulation)."""
    batch, frames, tokens, width = stream.shape
    update = _randn(batch, frames, tokens, width, seed=40).bfloat16()
    gate = _randn(batch, frames, 1, width, seed=41)
    camera = (_randn(*stream.shape, seed=42).bfloat16() / 4, _randn(*stream.shape, seed=43).bfloat16())
    mul, add = _randn(batch, frames, 1, width, seed=44), _randn(batch, frames, 1, width, seed=45)
    weight, bias = _randn(width, seed=46), _randn(width, seed=47)
    wide = stream.double() + gate.double() * update.double()
    wide = wide * (1 + camera[0].double()) + camera[1].double()
    return {
        "gate and camera, affine norm": (
            (update,),
            {"gate": gate, "camera": camera, "eps": 1e-6, "mul": weight, "add": bias},
            wide,
        ),
        "plain update, modulation": (
            (update,),
            {"eps": 1e-6, "mul": mul, "add": add},
            stream.double() + update.double(),
        ),
    }


def test_fused_residual_quantize_updates_the_stream_and_quantises_its_norm() -> None:
    """The new stream to float32 rounding; its LayerNorm * mul + add within half an e4m3 step."""
    stream = _randn(2, 3, 4, 64, seed=8) * 3
    for form, (updates, arguments, expected_stream) in _residual_forms(stream).items():
        new, (codes, scale) = fused_residual_quantize(stream, *updates, **arguments)
        assert new.dtype == torch.float32 and codes.shape == stream.shape and scale.shape == (2, 3, 4, 1)
        torch.testing.assert_close(new.double(), expected_stream, rtol=1e-6, atol=1e-6, msg=form)
        normed = torch.nn.functional.layer_norm(expected_stream, (64,), eps=1e-6)
        expected = normed * arguments["mul"].double() + arguments["add"].double()
        error = (dequantize_rows(codes, scale).double() - expected).abs()
        assert (error <= 2**-4 * expected.abs() + scale * 2**-9 + 1e-5).all(), form


def test_fused_residual_quantize_checks_its_inputs() -> None:
    stream = _randn(2, 3, 4, 32)
    table = {"eps": 1e-6, "mul": torch.ones(32), "add": torch.zeros(32)}
    with pytest.raises(ValueError, match=r"update and camera tensors \[\[2, 3, 4, 16\]\] must have"):
        fused_residual_quantize(stream, _randn(2, 3, 4, 16), **table)
    with pytest.raises(ValueError, match=r"gate \[3, 32\] must be \[32\] or \[2, 3, 1, 32\]"):
        fused_residual_quantize(stream, stream, gate=torch.ones(3, 32), **table)
    rows = stream.reshape(-1, 32)
    with pytest.raises(ValueError, match="give both camera_scale and camera_shift, or neither"):
        torch.ops.worldgen.residual_quantize_rows(rows, rows, None, rows, None, 1e-6, *torch.ones(2, 1, 32))
    with pytest.raises(ValueError, match=r"residual_quantize_rows: gate \[5, 32\] must be \[R, 32\]"):
        torch.ops.worldgen.residual_quantize_rows(
            rows, rows, torch.ones(5, 32), None, None, 1e-6, *torch.ones(2, 1, 32)
        )
    with pytest.raises(ValueError, match=r"residual_quantize_rows: mul and add \[5, 32\] must be \[R, 32\]"):
        torch.ops.worldgen.residual_quantize_rows(rows, rows, None, None, None, 1e-6, *torch.ones(2, 5, 32))
    with pytest.raises(ValueError, match=r"the stream x must be float32 \(or float64\), got torch.bfloat16"):
        torch.ops.worldgen.residual_quantize_rows(
            rows.bfloat16(), rows, None, None, None, 1e-6, *torch.ones(2, 1, 32)
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_residual_quantize_stream_is_the_blocks_unfused_update(dtype: torch.dtype) -> None:
    """The op's new stream (on a CPU, its reference) is the DiT block's unfused update bit for bit: the same
    ops in the same order, in the stream's dtype (float32 in the model, float64 in tests)."""
    stream = (_randn(2, 3, 4, 64, seed=10) * 3).to(dtype)
    (update,), arguments, _ = _residual_forms(stream.float())["gate and camera, affine norm"]
    gate, (scale, shift) = arguments["gate"].to(dtype), arguments["camera"]
    new, _ = fused_residual_quantize(stream, update, **{**arguments, "gate": gate})
    assert new.dtype == dtype
    unfused = (stream + gate * update) * (1 + scale.to(dtype)) + shift
    assert torch.equal(new, unfused)
    plain, _ = fused_residual_quantize(stream, update, eps=1e-6, mul=arguments["mul"], add=arguments["add"])
    assert torch.equal(plain, stream + update)


@pytest.mark.parametrize("form", ["gate and camera, affine norm", "plain update, modulation"])
def test_residual_quantize_rows_op_passes_opcheck(form: str) -> None:
    stream = _randn(2, 3, 4, 64, seed=9)
    (update,), arguments, _ = _residual_forms(stream)[form]
    rows = [t.reshape(-1, 64) for t in (stream, update)]
    gate = arguments.get("gate")
    camera = [t.reshape(-1, 64) for t in arguments.get("camera", ())] or [None, None]
    tables = [arguments[name].reshape(-1, 64) for name in ("mul", "add")]
    op_arguments = (*rows, None if gate is None else gate.reshape(-1, 64), *camera, 1e-6, *tables)
    torch.library.opcheck(torch.ops.worldgen.residual_quantize_rows.default, op_arguments)


def test_fp8_linear_takes_a_quantized_input() -> None:
    """A Quantized input skips the layer's own quantisation: the same codes give the same output."""
    layer = Fp8Linear.from_linear(Linear(64, 48).bfloat16(), use_scaled_mm=False)
    x = _randn(2, 5, 64).bfloat16()
    codes, scale = quantize_rows(x.reshape(-1, 64))
    given = layer(Quantized(codes.view(2, 5, 64), scale.view(2, 5, 1)))
    assert given.shape == (2, 5, 48) and torch.equal(given, layer(x))


@torch.no_grad()
def test_fused_quantize_path_of_the_model_matches_its_unfused_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp8 layers (emulated) with `triton_kernels`: on a CPU the op runs its reference ops, so this checks
    the plumbing. Every fp8 layer gets its input from the op (counted; the layers' own quantisation never
    runs), and the rollout is as close to float32 as the unfused one: the fused path quantises float32 rows
    where the unfused one rounds some to bf16 first, which moves codes at rounding ties only."""
    reference = tiny_model()
    model = _fp8_model(reference)
    inputs = tiny_inputs(model.config, 6)
    forms: list[str] = []
    own_quantisations = 0

    def counted(x: torch.Tensor, **arguments: object) -> Quantized:
        forms.append("gelu" if arguments.get("gelu") else "norm" if "eps" in arguments else "plain")
        return fused_quantize(x, **arguments)

    def counted_residual(*tensors: torch.Tensor, **arguments: object) -> tuple[torch.Tensor, Quantized]:
        forms.append("residual and camera" if arguments.get("camera") else "residual")
        return fused_residual_quantize(*tensors, **arguments)

    def layer_quantises(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal own_quantisations
        own_quantisations += 1
        return quantize_rows(x)

    monkeypatch.setattr(fp8_rows, "fused_quantize", counted)
    monkeypatch.setattr(fp8_rows, "fused_residual_quantize", counted_residual)
    monkeypatch.setattr(quant_module, "quantize_rows", layer_quantises)
    velocities = {}
    for fused in (False, True):
        model.triton_kernels = fused
        own_quantisations = 0
        velocities[fused] = torch.stack(rollout_velocities(model, inputs, 2, 4))
        assert (own_quantisations == 0) == fused
    blocks, chunks, passes = model.config.num_layers, 3, len(TIMESTEPS) + 1
    # Per block and pass: the q/k/v input (norm); the cross-attention query input after the self-attention's
    # residual and the camera, and the FFN input after the cross-attention's residual; the self- and
    # cross-attention outputs (plain); the GELU. Per block and chunk, the camera layers' 3 inputs; per
    # chunk, the control path's 2.
    assert forms.count("norm") == blocks * chunks * passes
    assert forms.count("residual and camera") == forms.count("residual") == blocks * chunks * passes
    assert forms.count("gelu") == blocks * chunks * passes
    assert forms.count("plain") == (2 * passes + 3) * blocks * chunks + 2 * chunks
    exact = torch.stack(rollout_velocities(reference, inputs, 2, 4))
    # Measured: fused vs unfused 0.007, each against float32 about 0.08.
    assert fp8_error(velocities[False], velocities[True]) < 0.02
    assert fp8_error(exact, velocities[True]) < 1.1 * fp8_error(exact, velocities[False])


# ---------------------------------------------------------------------------------------------- the model
def test_quantize_dit_swaps_exactly_the_token_wise_layers() -> None:
    reference = tiny_model()
    model = _fp8_model(reference)
    swapped = {name for name, module in model.named_modules() if isinstance(module, Fp8Linear)}
    kept = {name for name, module in model.named_modules() if isinstance(module, Linear)}
    assert swapped == EXPECTED_FP8
    assert kept == EXPECTED_KEPT
    bf16 = copy.deepcopy(reference).set_compute_dtype(torch.bfloat16).state_dict()
    for name in kept:  # untouched: same dtype (bf16, or float32 for the time MLP) and values
        assert torch.equal(model.get_submodule(name).weight, bf16[f"{name}.weight"])
    # State dict: every original key stays; each swapped layer adds its weight_scale.
    keys, reference_keys = set(model.state_dict()), set(reference.state_dict())
    assert keys - reference_keys == {f"{name}.weight_scale" for name in EXPECTED_FP8}
    assert reference_keys <= keys
    assert model.state_dict()["blocks.0.ffn.0.weight"].dtype == E4M3
    # The parameter count is unchanged (fp8 weights stay parameters), and a second call changes nothing.
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    assert quantize_dit(model) is model
    assert {name for name, module in model.named_modules() if isinstance(module, Fp8Linear)} == EXPECTED_FP8
    # Fast accumulation by default; `fast_accum=False` reaches every layer.
    assert all(model.get_submodule(name).fast_accum for name in EXPECTED_FP8)
    exact_sums = quantize_dit(copy.deepcopy(reference).set_compute_dtype(torch.bfloat16), fast_accum=False)
    assert not any(exact_sums.get_submodule(name).fast_accum for name in EXPECTED_FP8)


def test_quantize_dit_rejects_models_it_cannot_serve() -> None:
    with pytest.raises(
        ValueError, match=r"c2ws_hidden_states_layer1\.weight is torch\.float32; .* bf16 model"
    ):
        quantize_dit(tiny_model())
    config = get_preset("tiny").dit
    odd = CausalDiT(replace(config, ffn_dim=120)).set_compute_dtype(torch.bfloat16)
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.0 is 64 -> 120 features; .* multiples of 16"):
        quantize_dit(odd)


@torch.no_grad()
def test_fp8_rollout_stays_close_to_float32() -> None:
    """A 3-chunk rollout through the rolling cache: fp8 (emulated) vs float32, with bf16 as the yardstick."""
    reference = tiny_model()
    inputs = tiny_inputs(reference.config, 6)
    exact = rollout_velocities(reference, inputs, 2, 4)
    bf16 = rollout_velocities(copy.deepcopy(reference).set_compute_dtype(torch.bfloat16), inputs, 2, 4)
    fp8 = rollout_velocities(_fp8_model(reference), inputs, 2, 4)
    bf16_errors = [fp8_error(e, b) for e, b in zip(exact, bf16, strict=True)]
    fp8_errors = [fp8_error(e, f) for e, f in zip(exact, fp8, strict=True)]
    assert all(v.dtype == torch.float32 for v in fp8)
    # Measured per pass: bf16 0.006-0.011, fp8 0.06-0.105 (each e4m3 rounding costs ~2^-5 relative rms, and
    # a pass goes through ~10 quantised layers). The ratio shows the fp8 rounding is really there.
    assert max(fp8_errors) < 0.15
    assert min(f / b for f, b in zip(fp8_errors, bf16_errors, strict=True)) > 2


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and supports_scaled_mm(torch.device("cuda"))),
    reason="needs a CUDA device with compute capability >= 8.9",
)
@torch.no_grad()
def test_scaled_mm_kernel_matches_emulation_on_gpu() -> None:
    device = torch.device("cuda")
    # Layer level, at a full-size shape: same codes, so only the summation order differs.
    x_codes, x_scale = quantize_rows(_randn(4680, 5120, seed=20).to(device, torch.bfloat16))
    w_codes, w_scale = quantize_rows(_randn(5120, 5120, seed=21).to(device, torch.bfloat16) / 70)
    bias = _randn(5120, seed=22).to(device, torch.bfloat16)
    emulated = scaled_mm_emulated(x_codes, x_scale, w_codes, w_scale.squeeze(1), bias, fast_accum=False)
    kernel = scaled_mm(x_codes, x_scale, w_codes, w_scale.squeeze(1), bias, fast_accum=False)
    assert kernel.dtype == torch.bfloat16
    assert fp8_error(emulated, kernel) < 2**-8  # one bf16 rounding of a different float32 sum
    # Fast accumulation sums in the tensor cores' accumulators: a little less exact (0.0020 against 0.0017
    # measured at this shape on an H200), far below the e4m3 roundings' ~0.03.
    fast = scaled_mm(x_codes, x_scale, w_codes, w_scale.squeeze(1), bias, fast_accum=True)
    assert fp8_error(emulated, fast) < 2**-7
    if torch.cuda.get_device_capability(device) == (9, 0):  # Hopper, where the flag was seen to change sums
        assert not torch.equal(fast, kernel)
    # Model level: the kernel path (picked by default on this device) vs the emulation.
    reference = tiny_model().to(device)
    inputs = tiny_inputs(reference.config, 4).to(device)
    with_kernel = _fp8_model(reference, use_scaled_mm=None)  # with fast accumulation, the default
    assert all(m.use_scaled_mm and m.fast_accum for m in with_kernel.modules() if isinstance(m, Fp8Linear))
    kernel_out = rollout_velocities(with_kernel, inputs, 2, 4)
    emulated_out = rollout_velocities(_fp8_model(reference, use_scaled_mm=False), inputs, 2, 4)
    exact = rollout_velocities(reference, inputs, 2, 4)
    for k, e, x in zip(kernel_out, emulated_out, exact, strict=True):
        # Another summation order can move a bf16 output by one ulp, and the next layer's e4m3 code of it
        # by one step: such flips compound over the passes (0.030 seen on an H200) but stay well below the
        # fp8 error itself (~0.1).
        assert fp8_error(x, k) < 0.15
        assert fp8_error(e, k) < 0.5 * fp8_error(x, k)


@cuda_test
def test_fused_quantize_kernel_matches_the_reference_on_gpu() -> None:
    """The Triton kernel against the op's reference ops (run on the CPU) at the full model's widths: the
    float32 stream's per-frame modulation and affine norm at 5120, the GELU of the FFN's bf16 hidden
    state at 13824. Scales agree to float32 rounding; a code may move one e4m3 step where the two
    computations of a value straddle a rounding tie."""
    stream = _randn(2, 3, 1560, 5120, seed=30).cuda() * 4 + 1  # batch 2: tables [2, 3, 1, 5120]
    hidden = (_randn(4680, 13824, seed=31) * 2).cuda().bfloat16()
    cases = {form: (stream, arguments) for form, (arguments, _) in _fused_forms(stream.cpu()).items()}
    cases["gelu"] = (hidden, {"gelu": True})
    cases["plain bf16"] = (hidden[:, :5120], {})
    for form, (x, arguments) in cases.items():
        on_gpu = {name: t.cuda() if isinstance(t, torch.Tensor) else t for name, t in arguments.items()}
        codes, scale = fused_quantize(x, **on_gpu)
        expected_codes, expected_scale = fused_quantize(x.cpu(), **arguments)
        torch.testing.assert_close(scale.cpu(), expected_scale, rtol=1e-5, atol=0, msg=form)
        assert (codes.cpu().float() != expected_codes.float()).float().mean() < 1e-3, form
        result, expected = (
            dequantize_rows(codes.cpu(), scale.cpu()),
            dequantize_rows(expected_codes, expected_scale),
        )
        assert ((result - expected).abs() <= 2**-3 * expected.abs() + expected_scale * 2**-9).all(), form


@cuda_test
def test_fused_residual_quantize_kernel_matches_the_reference_on_gpu() -> None:
    """The Triton kernel's residual part against the op's reference ops (on the CPU) at the model's width,
    batch 2: the new stream to float32 rounding (an FMA may round once where the reference rounds twice),
    the codes as in the test above."""
    stream = _randn(2, 3, 1560, 5120, seed=32) * 4 + 1
    for form, ((update,), arguments, _) in _residual_forms(stream).items():

        def on_gpu(value: object) -> object:
            if isinstance(value, tuple):
                return tuple(t.cuda() for t in value)
            return value.cuda() if isinstance(value, torch.Tensor) else value

        new, (codes, scale) = fused_residual_quantize(
            stream.cuda(), update.cuda(), **{name: on_gpu(value) for name, value in arguments.items()}
        )
        expected_new, (expected_codes, expected_scale) = fused_residual_quantize(stream, update, **arguments)
        torch.testing.assert_close(new.cpu(), expected_new, rtol=1e-6, atol=1e-5, msg=form)
        torch.testing.assert_close(scale.cpu(), expected_scale, rtol=1e-5, atol=0, msg=form)
        assert (codes.cpu().float() != expected_codes.float()).float().mean() < 1e-3, form
