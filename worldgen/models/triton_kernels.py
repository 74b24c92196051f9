"""Hand-written Triton kernels (CUDA) where they beat what torch.compile or eager PyTorch runs.

- `norm_rope`: the DiT self-attention's RMSNorm over a token's full width, then its 3-D RoPE, in one pass
  that writes where it is told: for keys that is the KV cache's slots, which also saves the cache write's
  copy. torch.compile's kernel for the same ops runs at half this one's speed on an H200 at 4680 x 5120.
- `rms_norm_channels`: the VAE's RMSNorm over the channels of a channels-last tensor, optionally followed by
  SiLU. PyTorch's layer-norm kernel runs rows of 96 to 384 channels at a fraction of the bandwidth bound,
  and the SiLU after it is another pass over the same tensor.
- `quantize_rows`: row-wise e4m3 quantisation for the fp8 layers, fused with the LayerNorm and modulation
  (or the affine LayerNorm, or the GELU) before them: one read of each row, where torch.compile's kernels
  read it once per statistic (worldgen/models/fp8_rows.py), and where the camera layers, outside the
  compiled blocks, quantised in five eager kernels.
- `residual_quantize_rows`: the same, after the residual update of the float32 stream that precedes those
  norms (and the camera modulation after self-attention), which it writes back: the stream is read once,
  where torch.compile's update kernel and the quantisation each read it.

The models call them on CUDA only; their own ops are the reference elsewhere, and the GPU tests hold the
two together (tests/test_dit.py, tests/test_vae.py, tests/test_quant.py). Timings: docs/benchmarks.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from worldgen.models.fp8_rows import MIN_AMAX
from worldgen.models.kv_cache import E4M3, E4M3_MAX

# One program per token row; 2 to 8 warps all run 37 us at 4680 x 5120 on an H200, 16 and 32 slower.
NUM_WARPS = 8
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # inputs the kernels compute in float32
_SATURATION = tl.constexpr(E4M3_MAX)  # a kernel reads module globals only as constexpr
_MIN_AMAX = tl.constexpr(MIN_AMAX)
_GELU_TANH = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
# One row per program. An H200 sweep at 4680 rows (docs/benchmarks.md): 4 warps for rows up to 8192
# columns, 8 for the FFN's 13824; 2 or 4 rows per program and more warps were slower.
_QUANTIZE_WARPS = 4


@triton.jit
def _norm_rope_kernel(
    x_ptr,
    out_ptr,
    weight_ptr,
    cos_ptr,
    sin_ptr,
    x_batch_stride,
    x_token_stride,
    out_batch_stride,
    out_token_stride,
    eps,
    WIDTH: tl.constexpr,
    HALF_HEAD: tl.constexpr,
    PAIRS: tl.constexpr,  # WIDTH / 2 rounded up to a power of two
    SATURATE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(1).to(tl.int64)
    pair = tl.arange(0, PAIRS)
    channel = pair[:, None] * 2 + tl.arange(0, 2)[None, :]  # [PAIRS, 2]: (real, imaginary) channels
    in_row = channel < WIDTH
    row = tl.load(x_ptr + batch * x_batch_stride + token * x_token_stride + channel, mask=in_row, other=0.0)
    row = row.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(tl.sum(row * row, axis=1), axis=0) / WIDTH + eps)
    weight = tl.load(weight_ptr + channel, mask=in_row, other=0.0)
    real, imag = tl.split(row * inv_rms * weight)
    angle = token * HALF_HEAD + pair % HALF_HEAD
    cos = tl.load(cos_ptr + angle, mask=pair < WIDTH // 2, other=0.0)
    sin = tl.load(sin_ptr + angle, mask=pair < WIDTH // 2, other=0.0)
    rotated = tl.join(real * cos - imag * sin, real * sin + imag * cos)
    if SATURATE:
        rotated = tl.clamp(rotated, -_SATURATION, _SATURATION)
    destination = out_ptr + batch * out_batch_stride + token * out_token_stride + channel
    tl.store(destination, rotated.to(out_ptr.dtype.element_ty), mask=in_row)


def norm_rope(x: Tensor, weight: Tensor, eps: float, cos: Tensor, sin: Tensor, out: Tensor) -> None:
    """out[b, t] = RoPE_t(RMSNorm(x[b, t]) * weight), for x and out [B, T, width] with unit channel stride.

    `cos`/`sin` [T, head_dim / 2] float32 hold token t's angles (the same for every batch row); channel pair
    (2j, 2j+1) of each head turns by pair j's angle. `out` may be bf16, float32 or e4m3 (saturated at
    +-448, as `kv_cache.to_e4m3` does)."""
    _check_inputs("norm_rope", x, weight, cos, sin, out)
    if x.dim() != 3 or out.shape != x.shape or x.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError(
            f"norm_rope: x {list(x.shape)} and out {list(out.shape)} must be the same [batch, tokens, width] "
            "with contiguous channels"
        )
    batch, tokens, width = x.shape
    half_head = cos.shape[-1]
    if weight.shape != (width,) or width % (2 * half_head):
        raise ValueError(
            f"norm_rope: weight {list(weight.shape)} must be [{width}], and the width whole heads of "
            f"{2 * half_head}"
        )
    tables_ok = cos.shape == sin.shape == (tokens, half_head) and cos.is_contiguous() and sin.is_contiguous()
    if not tables_ok:
        raise ValueError(f"norm_rope: cos and sin must be contiguous [{tokens}, {half_head}]")
    # Triton launches on the current device: make it the tensors' (cuda:N), as the flash kernels do.
    with torch.cuda.device(x.device):
        _norm_rope_kernel[(tokens, batch)](
            x,
            out,
            weight,
            cos,
            sin,
            x.stride(0),
            x.stride(1),
            out.stride(0),
            out.stride(1),
            eps,
            WIDTH=width,
            HALF_HEAD=half_head,
            PAIRS=triton.next_power_of_2(width // 2),
            SATURATE=out.dtype == E4M3,
            num_warps=NUM_WARPS,
        )


# Elements of one program's tile: rows of the VAE's 96..384 channels, a few dozen rows per program.
_CHANNEL_TILE = 4096
_CHANNEL_NUM_WARPS = 4


@triton.jit
def _rms_norm_channels_kernel(
    x_ptr,
    gamma_ptr,
    out_ptr,
    rows,
    eps,
    CHANNELS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    SILU: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    channel = tl.arange(0, BLOCK_CHANNELS)
    mask = (row[:, None] < rows) & (channel[None, :] < CHANNELS)
    offsets = row[:, None] * CHANNELS + channel[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / CHANNELS + eps)
    gamma = tl.load(gamma_ptr + channel, mask=channel < CHANNELS, other=0.0).to(tl.float32)
    y = x * inv_rms[:, None] * gamma[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_channels(x: Tensor, gamma: Tensor, eps: float, silu: bool) -> Tensor:
    """x * rsqrt(mean over channels of x^2 + eps) * gamma (then SiLU), for x [N, C, ...] whose channels are
    innermost in memory (channels-last), gamma [C]; the result has x's shape and layout."""
    _check_inputs("rms_norm_channels", x, gamma)
    if x.dim() < 2 or not x.movedim(1, -1).is_contiguous():
        raise ValueError(f"rms_norm_channels: x {list(x.shape)} must be channels-last (channels innermost)")
    channels = x.shape[1]
    if gamma.shape != (channels,):
        raise ValueError(f"rms_norm_channels: gamma {list(gamma.shape)} must be [{channels}]")
    out = torch.empty_like(x)  # keeps x's channels-last strides
    rows = x.numel() // channels
    block_channels = triton.next_power_of_2(channels)
    block_rows = max(1, _CHANNEL_TILE // block_channels)
    with torch.cuda.device(x.device):  # Triton launches on the current device
        _rms_norm_channels_kernel[(triton.cdiv(rows, block_rows),)](
            x.movedim(1, -1),
            gamma,
            out.movedim(1, -1),
            rows,
            eps,
            CHANNELS=channels,
            BLOCK_CHANNELS=block_channels,
            BLOCK_ROWS=block_rows,
            SILU=silu,
            num_warps=_CHANNEL_NUM_WARPS,
        )
    return out


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    update_ptr,
    gate_ptr,
    camera_scale_ptr,
    camera_shift_ptr,
    stream_ptr,
    mul_ptr,
    add_ptr,
    codes_ptr,
    scale_ptr,
    x_row_stride,
    rows_per_gate_row,
    rows_per_table_row,
    eps,
    WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,  # WIDTH rounded up to a power of two: the whole row sits in registers
    RESIDUAL: tl.constexpr,  # x += gate * update (then the camera's scale and shift), written to stream
    GATE: tl.constexpr,
    CAMERA: tl.constexpr,
    LAYER_NORM: tl.constexpr,
    AFFINE: tl.constexpr,
    GELU: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    column = tl.arange(0, BLOCK)
    in_row = column < WIDTH
    x = tl.load(x_ptr + row * x_row_stride + column, mask=in_row, other=0.0).to(tl.float32)
    if RESIDUAL:  # update, camera and stream rows are contiguous [M, WIDTH]
        step = tl.load(update_ptr + row * WIDTH + column, mask=in_row, other=0.0).to(tl.float32)
        if GATE:
            step *= tl.load(gate_ptr + (row // rows_per_gate_row) * WIDTH + column, mask=in_row, other=0.0)
        x += step
        if CAMERA:
            camera_scale = tl.load(camera_scale_ptr + row * WIDTH + column, mask=in_row, other=0.0)
            camera_shift = tl.load(camera_shift_ptr + row * WIDTH + column, mask=in_row, other=0.0)
            x = x * (1.0 + camera_scale.to(tl.float32)) + camera_shift.to(tl.float32)
        tl.store(stream_ptr + row * WIDTH + column, x, mask=in_row)
    if LAYER_NORM:
        centred = tl.where(in_row, x - tl.sum(x, axis=0) / WIDTH, 0.0)
        x = centred * tl.rsqrt(tl.sum(centred * centred, axis=0) / WIDTH + eps)
    if AFFINE:
        table = (row // rows_per_table_row) * WIDTH + column
        mul = tl.load(mul_ptr + table, mask=in_row, other=0.0)
        x = x * mul + tl.load(add_ptr + table, mask=in_row, other=0.0)
    if GELU:  # tanh GELU: 0.5 x (1 + tanh(u)) = x sigmoid(2u)
        x = x * tl.sigmoid(2.0 * _GELU_TANH * (x + 0.044715 * x * x * x))
    # Padding lanes hold zeros through every step, so they never raise the row's amax.
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), _MIN_AMAX)
    # Codes multiply by the reciprocal scale: within an ulp of the reference's division, so a code can
    # differ only at an exact rounding tie. An IEEE division per element (tl.div_rn) doubled the kernel's
    # time on an H200.
    codes = tl.clamp(x * tl.div_rn(_SATURATION, amax), -_SATURATION, _SATURATION)
    tl.store(codes_ptr + row * WIDTH + column, codes.to(codes_ptr.dtype.element_ty), mask=in_row)
    tl.store(scale_ptr + row, tl.div_rn(amax, _SATURATION))


def quantize_rows(
    x: Tensor, eps: float | None, mul: Tensor | None, add: Tensor | None, gelu: bool
) -> tuple[Tensor, Tensor]:
    """e4m3 codes [M, K] and float32 scales [M, 1] of f(x) row by row, for x [M, K] with unit column stride;
    f as `fp8_rows.fused_quantize` says (LayerNorm if eps, then * mul + add with [R, K] tables, then GELU)."""
    _check_inputs("quantize_rows", x, *(t for t in (mul, add) if t is not None))
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"quantize_rows: x {list(x.shape)} must be [rows, width] with contiguous rows")
    _, codes, scale = _launch(x, None, None, None, None, eps, mul, add, gelu)
    return codes, scale


def residual_quantize_rows(
    x: Tensor,
    update: Tensor,
    gate: Tensor | None,
    camera_scale: Tensor | None,
    camera_shift: Tensor | None,
    eps: float,
    mul: Tensor,
    add: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """new = x + gate * update (then * (1 + camera_scale) + camera_shift), for float32 x [M, K], update and
    the camera pair [M, K] in a float dtype, gate [R, K] or None; returns new and the codes and scales of
    LayerNorm(new) * mul + add, as `fp8_rows.fused_residual_quantize` says."""
    others = (t for t in (update, gate, camera_scale, camera_shift, mul, add) if t is not None)
    _check_inputs("residual_quantize_rows", x, *others)
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"residual_quantize_rows: x must be a float32 [rows, width] stream, got {x.dtype}")
    rows = (t.contiguous() for t in (x, update))
    camera = (None, None) if camera_scale is None else (t.contiguous() for t in (camera_scale, camera_shift))
    return _launch(*rows, gate, *camera, eps, mul, add, False)


def _launch(
    x: Tensor,
    update: Tensor | None,
    gate: Tensor | None,
    camera_scale: Tensor | None,
    camera_shift: Tensor | None,
    eps: float | None,
    mul: Tensor | None,
    add: Tensor | None,
    gelu: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """One program per row of x [M, K]; the residual part when `update` is given (the stream is then
    returned first). Tables go in as contiguous float32; an absent tensor's pointer is x, never read."""
    rows, width = x.shape
    codes = x.new_empty((rows, width), dtype=E4M3)
    scale = x.new_empty((rows, 1), dtype=torch.float32)
    stream = None if update is None else torch.empty_like(x)
    gate_table = x if gate is None else gate.float().contiguous()
    affine = mul is not None and add is not None
    mul, add = (t.float().contiguous() for t in (mul, add)) if affine else (x, x)
    block = triton.next_power_of_2(width)
    with torch.cuda.device(x.device):  # Triton launches on the current device
        _quantize_rows_kernel[(rows,)](
            x,
            x if update is None else update,
            gate_table,
            x if camera_scale is None else camera_scale,
            x if camera_shift is None else camera_shift,
            x if stream is None else stream,
            mul,
            add,
            codes,
            scale,
            x.stride(0),
            rows // gate_table.shape[0] if gate is not None else 1,
            rows // mul.shape[0] if affine else 1,
            0.0 if eps is None else eps,
            WIDTH=width,
            BLOCK=block,
            RESIDUAL=update is not None,
            GATE=gate is not None,
            CAMERA=camera_scale is not None,
            LAYER_NORM=eps is not None,
            AFFINE=affine,
            GELU=gelu,
            num_warps=_QUANTIZE_WARPS if block <= 8192 else 2 * _QUANTIZE_WARPS,
        )
    return stream, codes, scale


def _check_inputs(kernel: str, x: Tensor, *others: Tensor) -> None:
    """x in a dtype the kernels take, and every tensor on x's CUDA device."""
    if not x.is_cuda or x.dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"{kernel}: x must be a CUDA tensor in bf16, fp16 or float32, got {x.dtype} on {x.device}"
        )
    if any(t.device != x.device for t in others):
        raise ValueError(
            f"{kernel}: every tensor must be on {x.device}, got {[str(t.device) for t in others]}"
        )
