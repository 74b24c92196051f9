"""fp8 (e4m3, row-wise scaled) linear layers for the DiT, as an opt-in (gpt-fast style).

    model.set_compute_dtype(torch.bfloat16)   # fp8 sits on top of bf16 compute
    quantize_dit(model)                       # after loading the weights, before compiling

`quantize_dit` swaps the token-wise `Linear`s that run on every pass or every chunk for `Fp8Linear`s:

- per block: self-attention q/k/v/o, cross-attention q/o, the FFN, the camera layers
  (cam_injector_layer1/2, cam_scale_layer, cam_shift_layer);
- the control path's c2ws_hidden_states_layer1/2.

Left in bf16: cross-attention k/v and the text embedding (they run once per video on 512 text tokens, so fp8
would save nothing measurable, while their output is reused by every pass of every chunk and any error there
would persist), the patch embeddings (raw latent and Plücker features), the time embedding/projection
(float32 modulation tables) and the head (its output is the velocity itself).

An `Fp8Linear` holds its weight as float8_e4m3fn [out, in] with one float32 scale per output row
(`weight_scale` [out]), and quantises its input per row (per token) on the fly: q = x / s with
s = amax(|row|) / 448, so every row uses e4m3's whole range (worldgen/models/fp8_rows.py), unless it is
given a `Quantized` input. Its output is bf16.
On CUDA with compute capability >= 8.9 it calls `torch._scaled_mm(x_q, w_q.t(), scale_a=s_x [M, 1],
scale_b=s_w [1, N], bias=bf16, out_dtype=bf16, use_fast_accum=...)`; the row-wise recipe needs both scales
float32 and contiguous, K and N multiples of 16, `x_q` row-major, `w_q.t()` column-major, and bf16 output:
the one output every row-wise backend takes (the CUTLASS kernel that serves sm89, and sm90 with
cuBLAS < 12.9, takes nothing else). Elsewhere the same quantised tensors are multiplied exactly in float32
(products of e4m3 numbers are exact in float32; only the summation order differs from the kernel).

Fast accumulation (`fast_accum`, on by default): the kernel keeps its partial sums in the tensor cores'
accumulators instead of promoting them to float32 registers every few K-steps. On an H200, the model's
layers at full size ran 10 to 14% faster (the benchmark's floor, run B7 against B7x: 1362 against 1231
TFLOP/s for 5120 -> 5120, 1451 against 1277 for the FFN's up projection, 1398 against 1270 for its down
projection), 53 ms less per chunk. On one 4680 x 5120 x 5120 product of random data, the error against
the exact sum of the codes went from 0.0017 to 0.0020 (0.0026 at K = 13824), next to the ~0.03 of the
e4m3 roundings themselves (docs/benchmarks.md, seventh round).

State dict: the keys of the swapped layers stay (`weight` now float8_e4m3fn, `bias` bf16), and every swapped
layer adds `<layer>.weight_scale`. A quantised model therefore loads only its own state dict; load the
checkpoint first, then quantise. Do not cast the model (`.to(dtype)`, `.double()`) after quantising: that
would turn the fp8 weights back into wider floats.

The quantised activations are computed in eager mode by a few elementwise kernels per layer; under
`torch.compile` (worldgen/compile.py) they fuse with the norm and modulation before each layer. With the
model's `triton_kernels`, the DiT hands its fp8 layers inputs quantised by one Triton kernel each, fused
with the LayerNorm and modulation, the affine LayerNorm or the GELU before them.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from worldgen.models.dit import CausalDiT, Linear
from worldgen.models.fp8_rows import Quantized, quantize_rows

_KERNEL_MULTIPLE = 16  # torch._scaled_mm: K and N must be multiples of 16

# Names (relative to CausalDiT) of the Linear layers that quantize_dit swaps; see the module docstring.
FP8_LAYERS = re.compile(
    r"blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qo]|ffn\.[02]"
    r"|cam_injector_layer[12]|cam_scale_layer|cam_shift_layer)"
    r"|c2ws_hidden_states_layer[12]"
)


def scaled_mm(
    x_codes: Tensor,
    x_scale: Tensor,
    w_codes: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    *,
    fast_accum: bool,
) -> Tensor:
    """bf16 [M, N] = (x_codes * x_scale) @ (w_codes * w_scale[:, None]).T + bias through torch._scaled_mm.

    x_codes [M, K] and w_codes [N, K] e4m3, x_scale [M, 1] and w_scale [N] float32, bias [N] bf16 or None;
    `fast_accum`: the kernel's fast accumulation (see the module docstring).
    """
    return torch._scaled_mm(
        x_codes.contiguous(),
        w_codes.t(),  # column-major [K, N], as the kernel requires
        scale_a=x_scale,
        scale_b=w_scale.unsqueeze(0),
        bias=bias,
        out_dtype=torch.bfloat16,
        use_fast_accum=fast_accum,
    )


def scaled_mm_emulated(
    x_codes: Tensor,
    x_scale: Tensor,
    w_codes: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    *,
    fast_accum: bool,
) -> Tensor:
    """`scaled_mm` computed in float32 on any device: the products of e4m3 codes are exact, the scales and
    the bias are applied after the sum as the kernel's epilogue does, and the result is rounded once.
    `fast_accum` changes nothing here: it is the GPU kernel's way of summing."""
    out = (x_codes.float() @ w_codes.float().t()) * x_scale * w_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(torch.bfloat16)


def supports_scaled_mm(device: torch.device) -> bool:
    """Whether torch._scaled_mm runs row-wise scaled e4m3 on `device`: NVIDIA compute capability >= 8.9."""
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Module):
    """A Linear with e4m3 weights (one scale per output row) and per-row e4m3 activations; bf16 output."""

    output_dtype = torch.bfloat16

    def __init__(
        self,
        weight: Tensor,
        weight_scale: Tensor,
        bias: Tensor | None,
        use_scaled_mm: bool,
        fast_accum: bool = True,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # Fixed when the layer is built: Python bools, so a compiled graph holds one branch only.
        self.use_scaled_mm = use_scaled_mm
        self.fast_accum = fast_accum

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls, linear: nn.Linear, use_scaled_mm: bool | None = None, fast_accum: bool = True
    ) -> Fp8Linear:
        """Quantise `linear` on its device; `use_scaled_mm` None: the kernel wherever it runs."""
        codes, scale = quantize_rows(linear.weight)
        bias = None if linear.bias is None else linear.bias.to(torch.bfloat16)
        if use_scaled_mm is None:
            use_scaled_mm = supports_scaled_mm(linear.weight.device)
        return cls(codes, scale.squeeze(1), bias, use_scaled_mm, fast_accum)

    def forward(self, x: Tensor | Quantized) -> Tensor:
        """x [..., in] -> bf16 [..., out]; x may come quantised already (`fp8_rows.fused_quantize`)."""
        if isinstance(x, Quantized):
            leading, (codes, scale) = x.codes.shape[:-1], x
        else:
            leading, (codes, scale) = x.shape[:-1], quantize_rows(x.reshape(-1, self.in_features))
        out = self.product(codes.reshape(-1, self.in_features), scale.reshape(-1, 1))
        return out.view(*leading, self.out_features)

    def product(self, x_codes: Tensor, x_scale: Tensor) -> Tensor:
        """The layer's matmul of an already quantised activation [M, K] -> bf16 [M, N]."""
        matmul = scaled_mm if self.use_scaled_mm else scaled_mm_emulated
        return matmul(x_codes, x_scale, self.weight, self.weight_scale, self.bias, fast_accum=self.fast_accum)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, use_scaled_mm={self.use_scaled_mm}, fast_accum={self.fast_accum}"
        )


def quantize_dit(model: CausalDiT, use_scaled_mm: bool | None = None, fast_accum: bool = True) -> CausalDiT:
    """Swap the layers named by FP8_LAYERS for Fp8Linear, in place; returns the model.

    The model must compute in bf16 (`set_compute_dtype(torch.bfloat16)`): fp8 layers output bf16, and the
    attention of a block mixes their outputs with those of the bf16 layers kept (cross-attention k/v).
    `use_scaled_mm`: None picks torch._scaled_mm where the device supports it and the float32 emulation
    elsewhere; True/False force one (tests). `fast_accum`: the kernel's fast accumulation (module docstring).
    """
    swaps = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, Linear) and FP8_LAYERS.fullmatch(name)
    ]
    for name, linear in swaps:
        if linear.weight.dtype != torch.bfloat16:
            raise ValueError(
                f"quantize_dit: {name}.weight is {linear.weight.dtype}; fp8 layers need a bf16 model "
                "(call set_compute_dtype(torch.bfloat16) before quantize_dit)"
            )
        if linear.in_features % _KERNEL_MULTIPLE or linear.out_features % _KERNEL_MULTIPLE:
            raise ValueError(
                f"quantize_dit: {name} is {linear.in_features} -> {linear.out_features} features; "
                f"torch._scaled_mm needs both to be multiples of {_KERNEL_MULTIPLE}"
            )
    for name, linear in swaps:
        parent_name, _, child = name.rpartition(".")
        fp8 = Fp8Linear.from_linear(linear, use_scaled_mm, fast_accum)
        setattr(model.get_submodule(parent_name), child, fp8)
    return model


def fp8_error(reference: Tensor, quantised: Tensor) -> float:
    """Relative L2 error ||quantised - reference|| / ||reference||, computed in float64."""
    if reference.shape != quantised.shape:
        raise ValueError(f"fp8_error: shapes differ, {list(reference.shape)} vs {list(quantised.shape)}")
    reference = reference.detach().double()
    return float((quantised.detach().double() - reference).norm() / reference.norm())
