"""Row-wise e4m3 quantisation of activations: the reference ops, and one fused op for the fp8 fast path.

An fp8 layer (worldgen/quant.py) multiplies e4m3 codes with one float32 scale per row (per token):
x ≈ codes * scale, scale = amax(|row|) / 448, so every row uses e4m3's whole range.

- `quantize_rows(x)`: the reference, in PyTorch ops (a compiled block fuses them with what precedes them).
- `fused_quantize(x, eps=, mul=, add=, gelu=)`: the op `worldgen::quantize_rows`, which quantises
  LayerNorm(x) * mul + add, GELU(x) or x itself in one pass over each row. On CUDA it is one Triton kernel
  (worldgen/models/triton_kernels.py), where torch.compile's reduction kernels read a row two or three
  times (once per statistic: mean, variance, amax). Elsewhere it runs the reference ops. It is an opaque
  custom op, so a compiled block calls the kernel as it is.
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
    width = x.shape[-1]
    if (mul is None) != (add is None):
        raise ValueError("fused_quantize: give both mul and add, or neither")
    if mul is not None and add is not None:
        per_group = (*x.shape[:-2], 1, width)
        for name, table in (("mul", mul), ("add", add)):
            if table.shape not in ((width,), per_group):
                raise ValueError(
                    f"fused_quantize: {name} {list(table.shape)} must be [{width}] or {list(per_group)} "
                    f"for x {list(x.shape)}"
                )
        mul, add = mul.reshape(-1, width), add.reshape(-1, width)
    codes, scale = torch.ops.worldgen.quantize_rows(x.reshape(-1, width), eps, mul, add, gelu)
    return Quantized(codes.view(*x.shape[:-1], width), scale.view(*x.shape[:-1], 1))


def _check_rows(x: Tensor, mul: Tensor | None, add: Tensor | None) -> None:
    """What the op needs: x [M, K]; mul and add the same [R, K] on x's device, R dividing M."""
    rows, width = x.shape
    if mul is None and add is None:
        return
    if mul is None or add is None or mul.shape != add.shape:
        shapes = [None if t is None else list(t.shape) for t in (mul, add)]
        raise ValueError(f"quantize_rows: mul and add must be tables of one shape, got {shapes}")
    if mul.dim() != 2 or mul.shape[1] != width or rows % mul.shape[0]:
        raise ValueError(
            f"quantize_rows: mul and add {list(mul.shape)} must be [R, {width}] with R dividing the "
            f"{rows} rows of x"
        )
    if mul.device != x.device or add.device != x.device:
        raise ValueError(f"quantize_rows: mul and add must be on x's device {x.device}")


@torch.library.custom_op("worldgen::quantize_rows", mutates_args=())
def _quantize_rows_op(
    x: Tensor, eps: float | None, mul: Tensor | None, add: Tensor | None, gelu: bool
) -> tuple[Tensor, Tensor]:
    """The reference (CPU and other devices): PyTorch ops in float32, float64 stays float64. x [M, K],
    mul/add [R, K] (R dividing M: table row r serves rows r * M/R .. (r+1) * M/R - 1)."""
    _check_rows(x, mul, add)
    rows = x.to(torch.promote_types(x.dtype, torch.float32))
    if eps is not None:
        rows = F.layer_norm(rows, rows.shape[-1:], eps=eps)
    if mul is not None and add is not None:
        per_table_row = rows.view(mul.shape[0], -1, rows.shape[-1])
        rows = (per_table_row * mul[:, None] + add[:, None]).view(rows.shape)
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
