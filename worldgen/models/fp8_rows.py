"""Row-wise e4m3 quantisation of activations: the reference ops, and one fused op for the fp8 fast path.

An fp8 layer (worldgen/quant.py) multiplies e4m3 codes with one float32 scale per row (per token):
x ≈ codes * scale, scale = amax(|row|) / 448, so every row uses e4m3's whole range.

- `quantize_rows(x)`: the reference, in PyTorch ops (a compiled block fuses them with what precedes them).
- `fused_quantize(x, eps=, mul=, add=, gelu=)`: the op `worldgen::quantize_rows`, which quantises
  LayerNorm(x) * mul + add, GELU(x) or x itself in one pass over each row. On CUDA it is one Triton kernel
  (worldgen/models/triton_kernels.py), where torch.compile's reduction kernels read a row two or three
  times (once per statistic: mean, variance, amax). Elsewhere it runs the reference ops. It is an opaque
  custom op, so a compiled block calls the kernel as it is.
- `fused_residual_quantize(stream, update, gate=, camera=, eps=, mul=, add=)`: the op
  `worldgen::residual_quantize_rows`: a residual update of the float32 stream (stream + gate * update, then
  the camera's * (1 + scale) + shift if given) written back, and the updated rows quantised as above, by
  the same kernel: the stream is read once where an update kernel and the quantisation each read it.
- `Quantized(codes, scale)`: what an fp8 layer takes instead of a tensor when its input is quantised already.

The kernel quantises the float32 values it computes; the unfused path rounds a bf16 activation first
(the attention input, the GELU output) and quantises that, so the two may differ by one e4m3 step at
rounding ties.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from worldgen.models.kv_cache import E4M3, E4M3_MAX, to_e4m3

# A row of zeros gets this amax instead of 0, so its scale is finite and its codes are zeros.
MIN_AMAX = 1e-12


class Quantized(NamedTuple):
    """An activation as e4m3 codes [..., K] and float32 row scales [..., 1]: x ≈ codes * scale."""

    codes: Tensor
    scale: Tensor

    def flatten(self, start_dim: int, end_dim: int) -> Quantized:
        """Both tensors with the leading dims start_dim..end_dim merged (rows keep their order)."""
        return Quantized(self.codes.flatten(start_dim, end_dim), self.scale.flatten(start_dim, end_dim))


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (e4m3 codes [M, K], float32 scales [M, 1]) with x ≈ codes * scales, row by row."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=MIN_AMAX)
    scale = amax / E4M3_MAX
    # Divide in float32 (bf16 would round before e4m3 does); saturating keeps a quotient a rounding step
    # above 448 from becoming NaN, as e4m3fn has no infinity.
    codes = to_e4m3(x / scale)
    return codes, scale


def dequantize_rows(codes: Tensor, scale: Tensor) -> Tensor:
    """The float32 values that e4m3 `codes` [M, K] with row scales [M, 1] stand for."""
    return codes.float() * scale


def fused_quantize(
    x: Tensor,
    *,
    eps: float | None = None,
    mul: Tensor | None = None,
    add: Tensor | None = None,
    gelu: bool = False,
) -> Quantized:
    """Quantise f(x) row by row, for x [..., K]; the result keeps x's leading dims.

    f is, in this order: LayerNorm without affine if `eps` is given; `* mul + add` if given; tanh GELU if
    `gelu`. mul and add are one [K] row for every row of x, or, for x [..., S, K], tables [..., 1, K] with
    one row per group of S rows (the modulation of a frame's S tokens: x [B, F, S, K], tables [B, F, 1, K]).
    """
    mul, add = _affine_tables("fused_quantize", x, mul, add)
    codes, scale = torch.ops.worldgen.quantize_rows(x.reshape(-1, x.shape[-1]), eps, mul, add, gelu)
    return _quantized(codes, scale, x.shape)


def fused_residual_quantize(
    stream: Tensor,
    update: Tensor,
    *,
    gate: Tensor | None = None,
    camera: tuple[Tensor, Tensor] | None = None,
    eps: float,
    mul: Tensor,
    add: Tensor,
) -> tuple[Tensor, Quantized]:
    """The residual update new = stream + gate * update (then new * (1 + scale) + shift for camera =
    (scale, shift)), and LayerNorm(new) * mul + add quantised row by row: (new, its Quantized rows).

    stream [..., S, K] float32 (float64 stays float64); update, and the camera's scale and shift, any float
    dtype of stream's shape; gate, mul and add [K] or per-group tables [..., 1, K] as in `fused_quantize`.
    """
    # Checked here, before the reshapes to rows, which would let an update of another shape with as many
    # elements through.
    if update.shape != stream.shape or (camera is not None and any(t.shape != stream.shape for t in camera)):
        shapes = [list(update.shape)] + ([] if camera is None else [list(t.shape) for t in camera])
        raise ValueError(
            f"fused_residual_quantize: update and camera tensors {shapes} must have the stream's shape "
            f"{list(stream.shape)}"
        )
    gate = None if gate is None else _table("fused_residual_quantize", stream, "gate", gate)
    mul, add = _affine_tables("fused_residual_quantize", stream, mul, add)
    width = stream.shape[-1]
    camera_scale, camera_shift = (None, None) if camera is None else (t.reshape(-1, width) for t in camera)
    new_stream, codes, scale = torch.ops.worldgen.residual_quantize_rows(
        stream.reshape(-1, width), update.reshape(-1, width), gate, camera_scale, camera_shift, eps, mul, add
    )
    return new_stream.view(stream.shape), _quantized(codes, scale, stream.shape)


def _affine_tables(
    caller: str, x: Tensor, mul: Tensor | None, add: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """mul and add as the ops take them (`_table`), or both None."""
    if (mul is None) != (add is None):
        raise ValueError(f"{caller}: give both mul and add, or neither")
    if mul is None or add is None:
        return None, None
    return _table(caller, x, "mul", mul), _table(caller, x, "add", add)


def _table(caller: str, x: Tensor, name: str, table: Tensor) -> Tensor:
    """A per-row table for x [..., S, K], [K] or [..., 1, K], as the ops take it: [R, K]."""
    width = x.shape[-1]
    per_group = (*x.shape[:-2], 1, width)
    if table.shape not in ((width,), per_group):
        raise ValueError(
            f"{caller}: {name} {list(table.shape)} must be [{width}] or {list(per_group)} "
            f"for x {list(x.shape)}"
        )
    return table.reshape(-1, width)


def _quantized(codes: Tensor, scale: Tensor, shape: torch.Size) -> Quantized:
    return Quantized(codes.view(shape), scale.view(*shape[:-1], 1))


def _check_rows(x: Tensor, mul: Tensor | None, add: Tensor | None, op: str = "quantize_rows") -> None:
    """What the op needs: x [M, K]; mul and add the same [R, K] on x's device, R dividing M."""
    if mul is None and add is None:
        return
    if mul is None or add is None or mul.shape != add.shape:
        shapes = [None if t is None else list(t.shape) for t in (mul, add)]
        raise ValueError(f"{op}: mul and add must be tables of one shape, got {shapes}")
    _check_table(x, mul, "mul and add", op)
    _check_table(x, add, "mul and add", op)


def _check_table(x: Tensor, table: Tensor, name: str, op: str) -> None:
    """table [R, K] on x's device, for x [M, K] with R dividing M."""
    rows, width = x.shape
    if table.dim() != 2 or table.shape[1] != width or rows % table.shape[0]:
        raise ValueError(
            f"{op}: {name} {list(table.shape)} must be [R, {width}] with R dividing the {rows} rows of x"
        )
    if table.device != x.device:
        raise ValueError(f"{op}: {name} must be on x's device {x.device}")


def _check_residual(
    x: Tensor,
    update: Tensor,
    gate: Tensor | None,
    camera_scale: Tensor | None,
    camera_shift: Tensor | None,
    mul: Tensor,
    add: Tensor,
) -> None:
    """What the residual op needs: a float32 (or float64) stream x [M, K]; update (and the camera pair, both
    or neither) of x's shape and device; gate an [R, K] table, R dividing M; mul and add as `_check_rows`."""
    op = "residual_quantize_rows"
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: the stream x must be float32 (or float64), got {x.dtype}")
    if (camera_scale is None) != (camera_shift is None):
        raise ValueError(f"{op}: give both camera_scale and camera_shift, or neither")
    rows = [t for t in (update, camera_scale, camera_shift) if t is not None]
    if any(t.shape != x.shape or t.device != x.device for t in rows):
        raise ValueError(
            f"{op}: update and camera tensors {[list(t.shape) for t in rows]} must be x's {list(x.shape)} "
            f"on {x.device}"
        )
    if gate is not None:
        _check_table(x, gate, "gate", op)
    _check_rows(x, mul, add, op)


def _table_rows(rows: Tensor, table: Tensor) -> Tensor:
    """Table [R, K] expanded to rows [M, K]: table row r serves rows r * M/R .. (r+1) * M/R - 1."""
    return table[:, None].expand(-1, rows.shape[0] // table.shape[0], -1).reshape(rows.shape)


@torch.library.custom_op("worldgen::quantize_rows", mutates_args=())
def _quantize_rows_op(
    x: Tensor, eps: float | None, mul: Tensor | None, add: Tensor | None, gelu: bool
) -> tuple[Tensor, Tensor]:
    """The reference (CPU and other devices): PyTorch ops in float32, float64 stays float64. x [M, K],
    mul/add [R, K] (R dividing M: table row r serves rows r * M/R .. (r+1) * M/R - 1)."""
    _check_rows(x, mul, add)
    return _reference(x.to(torch.promote_types(x.dtype, torch.float32)), eps, mul, add, gelu)


def _reference(rows: Tensor, eps: float | None, mul: Tensor | None, add: Tensor | None, gelu: bool) -> Tensor:
    if eps is not None:
        rows = F.layer_norm(rows, rows.shape[-1:], eps=eps)
    if mul is not None and add is not None:
        rows = rows * _table_rows(rows, mul) + _table_rows(rows, add)
    if gelu:
        rows = F.gelu(rows, approximate="tanh")
    return quantize_rows(rows)


@_quantize_rows_op.register_kernel("cuda")
def _quantize_rows_cuda(
    x: Tensor, eps: float | None, mul: Tensor | None, add: Tensor | None, gelu: bool
) -> tuple[Tensor, Tensor]:
    _check_rows(x, mul, add)
    from worldgen.models.triton_kernels import quantize_rows as kernel  # Triton: imported where it runs

    return kernel(x, eps, mul, add, gelu)


@_quantize_rows_op.register_fake
def _quantize_rows_shape(
    x: Tensor, eps: float | None, mul: Tensor | None, add: Tensor | None, gelu: bool
) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=E4M3), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@torch.library.custom_op("worldgen::residual_quantize_rows", mutates_args=())
def _residual_quantize_rows_op(
    x: Tensor,
    update: Tensor,
    gate: Tensor | None,
    camera_scale: Tensor | None,
    camera_shift: Tensor | None,
    eps: float,
    mul: Tensor,
    add: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The reference: new = x + gate * update (gate table [R, K] or None for 1), then
    new * (1 + camera_scale) + camera_shift if given, in x's dtype (float32 or float64); returns new and
    the quantised LayerNorm(new) * mul + add, as `worldgen::quantize_rows` does."""
    _check_residual(x, update, gate, camera_scale, camera_shift, mul, add)
    step = update.to(x.dtype)
    new = x + (step if gate is None else _table_rows(x, gate.to(x.dtype)) * step)
    if camera_scale is not None and camera_shift is not None:
        new = new * (1 + camera_scale.to(x.dtype)) + camera_shift.to(x.dtype)
    new = new.contiguous()  # as the kernel writes it
    return (new, *_reference(new, eps, mul, add, False))


@_residual_quantize_rows_op.register_kernel("cuda")
def _residual_quantize_rows_cuda(
    x: Tensor,
    update: Tensor,
    gate: Tensor | None,
    camera_scale: Tensor | None,
    camera_shift: Tensor | None,
    eps: float,
    mul: Tensor,
    add: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_residual(x, update, gate, camera_scale, camera_shift, mul, add)
    from worldgen.models.triton_kernels import residual_quantize_rows as kernel  # Triton: where it runs

    return kernel(x, update, gate, camera_scale, camera_shift, eps, mul, add)


@_residual_quantize_rows_op.register_fake
def _residual_quantize_rows_shape(
    x: Tensor,
    update: Tensor,
    gate: Tensor | None,
    camera_scale: Tensor | None,
    camera_shift: Tensor | None,
    eps: float,
    mul: Tensor,
    add: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    return (x.new_empty(x.shape), *_quantize_rows_shape(x, eps, mul, add, False))
