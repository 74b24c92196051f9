"""Attention through `F.scaled_dot_product_attention` with a chosen backend, and the reference window mask.

Backends: `auto | cudnn | flash | efficient | math | default | fa4 | fa3 | fp8`.
- `auto` on CUDA takes FlashAttention-4 (`fa4`, below) for self-attention lengths when it can run here,
  else FlashAttention-3 (`fa3`), and otherwise tries cuDNN first (about 1.7x flash at LingBot shapes on
  H200), then flash, then memory-efficient, then math, taking the first one that supports the inputs; on
  other devices it leaves the choice to PyTorch's default dispatch.
- `default` is PyTorch's own dispatch everywhere, with no `sdpa_kernel` restriction: what a
  straightforward port gets, the attention of the benchmark's plain path.
- `cudnn`, `flash`, `efficient` and `math` force that SDPA kernel.
- `fa4` calls FlashAttention-4's CuTe kernels (the optional `flash-attn-4` package; Hopper or Blackwell
  GPUs) on the [B, L, H, D] layout as it is, through an opaque custom op so that a compiled block keeps
  one graph around it. On H200 at 4680 queries x 32760 keys it runs at about 650 TFLOP/s against cuDNN's
  550; at the 512 text keys of cross-attention cuDNN is faster, hence `FLASH_MIN_KEYS` for `auto`.
- `fa3` calls FlashAttention-3's Hopper kernels (the optional `fa3-fwd` package, a forward-only build of
  FlashAttention-3) the same way, for every call: about 630 to 710 TFLOP/s at those shapes against cuDNN's
  575 to 600 (same process), and slower than cuDNN at 512 keys too.
- `fp8` is 8-bit self-attention: the model keeps its KV cache in e4m3 (`CausalDiT.make_kv_cache`) and
  casts each pass's queries, keys and values to e4m3, and every call with e4m3 inputs runs
  FlashAttention-3's e4m3 kernel (unscaled, bf16 output; on H200 about 870 TFLOP/s at 4680 x 32760
  against 650 for the bf16 kernels). Calls with wider inputs (the text cross-attention, a pass without a
  cache) are routed as by `auto`.

e4m3 without a scale holds magnitudes from 2^-9 to 448 with 3 mantissa bits: enough for queries and keys,
which are RMS-normalised (|q|, |k| <= sqrt(dim) * max|norm weight|) and for values of the model's
magnitude; larger magnitudes saturate at +-448 (`kv_cache.to_e4m3`), they never overflow.

`visibility_mask` builds the explicit [tokens, tokens] mask of chunked causal generation straight from
the reference rules; the full-sequence forward with this mask is the oracle the rolling cache is tested
against.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from worldgen.models.kv_cache import E4M3, check_window

AttentionBackend = Literal["auto", "cudnn", "flash", "efficient", "math", "default", "fa4", "fa3", "fp8"]
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)

_NAMED_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_CUDA_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


# `auto` uses FlashAttention-4 or -3 from this many keys on (H200, 4680 queries and 40 heads of 128: FA4
# 0.159 ms against cuDNN's 0.131 ms at 512 keys, 0.75 against 1.01 ms at 4680; FA3 0.12 to 0.16 ms at 512).
FLASH_MIN_KEYS = 2048


@dataclass(frozen=True)
class _FlashKernel:
    """A flash-attention kernel outside PyTorch; its module's entry point is `flash_attn_func`."""

    label: str  # its name in messages
    dtypes: tuple[torch.dtype, ...]
    generations: tuple[int, ...]  # CUDA compute capability majors it runs on
    module: str
    package: str  # the pip package (and worldgen extra) that installs the module


_FLASH_KERNELS = {
    "fa4": _FlashKernel(
        "FlashAttention-4 (backend 'fa4')", (torch.float16, torch.bfloat16), (9, 10), "flash_attn.cute",
        "flash-attn-4",
    ),
    # fa3-fwd is built without fp16 kernels.
    "fa3": _FlashKernel(
        "FlashAttention-3 (backends 'fa3' and 'fp8')", (torch.bfloat16, E4M3), (9,), "fa3_fwd_interface",
        "fa3-fwd",
    ),
}  # fmt: skip


def check_backend(backend: str) -> AttentionBackend:
    if backend not in ATTENTION_BACKENDS:
        choices = ", ".join(ATTENTION_BACKENDS)
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {choices}")
    return backend  # type: ignore[return-value]


def attention(
    query: Tensor, key: Tensor, value: Tensor, backend: AttentionBackend = "auto", mask: Tensor | None = None
) -> Tensor:
    """Multi-head attention. query [B, Lq, H, D], key/value [B, Lk, H, D] -> [B, Lq, H, D].

    `mask` (bool, True = may attend) broadcasts to [B, H, Lq, Lk]; the fused CUDA kernels take no
    arbitrary mask, so a masked call falls through to a backend that does (it is only used by the oracle).
    e4m3 inputs (backend `fp8`'s cache) always run FlashAttention-3's e4m3 kernel, whose output is bf16.
    """
    flash = "fa3" if query.dtype == E4M3 else backend if backend in _FLASH_KERNELS else None
    if flash is None and backend in ("auto", "fp8") and mask is None and key.shape[1] >= FLASH_MIN_KEYS:
        usable = (k for k in _FLASH_KERNELS if flash_supports(k, query) and flash_usable(k, query.device))
        flash = next(usable, None)  # FlashAttention-4 first
    if flash is not None:
        if mask is not None:
            raise ValueError(f"attention with {flash!r} takes no mask; use 'math' for the masked oracle")
        return (fa4_attention if flash == "fa4" else fa3_attention)(query, key, value)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if backend in _NAMED_BACKENDS:
        with sdpa_kernel(_NAMED_BACKENDS[backend]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    elif backend in ("auto", "fp8") and q.device.type == "cuda":
        with sdpa_kernel(_CUDA_PRIORITY, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:  # "default", and "auto" off CUDA
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


def flash_supports(kernel: str, query: Tensor) -> bool:
    """The inputs a flash kernel (`fa4` or `fa3`) takes: CUDA, its dtypes, head_dim up to 256 and a multiple
    of 8 (16 in e4m3)."""
    head_dim = query.shape[-1]
    alignment = 16 if query.dtype == E4M3 else 8
    dtypes = _FLASH_KERNELS[kernel].dtypes
    return query.is_cuda and query.dtype in dtypes and head_dim % alignment == 0 and head_dim <= 256


@torch.compiler.assume_constant_result  # a compiled block asks once, at trace time
def flash_usable(kernel: str, device: torch.device) -> bool:
    """True when the flash kernel (`fa4` or `fa3`) can run on `device`: its GPU generation, and its package
    imports."""
    return device.type == "cuda" and torch.cuda.is_available() and _flash_usable(kernel, device)


@functools.cache  # asked before every eager self-attention call: the device query and the import run once
def _flash_usable(kernel: str, device: torch.device) -> bool:
    flash = _FLASH_KERNELS[kernel]
    if torch.cuda.get_device_capability(device)[0] not in flash.generations:
        return False
    try:
        importlib.import_module(flash.module)
    except Exception as error:
        top = flash.module.split(".")[0]
        if not (isinstance(error, ModuleNotFoundError) and error.name in (top, flash.module)):
            # Installed but broken: a missing dependency, a CUDA build that does not match, ...
            message = f"{flash.package} does not import ({error}); attention runs without it"
            warnings.warn(message, stacklevel=2)
        return False
    return True


def _flash_attn_func(kernel: str, query: Tensor) -> Callable[..., Any]:
    """The kernel's `flash_attn_func`, after checking the inputs; a clear error for what it cannot run."""
    flash = _FLASH_KERNELS[kernel]
    if not flash_supports(kernel, query):
        names = " or ".join(str(dtype).removeprefix("torch.") for dtype in flash.dtypes)
        raise RuntimeError(
            f"{flash.label} needs CUDA tensors in {names} with head_dim up to 256 and a multiple of 8 (16 in "
            f"e4m3), got {query.device.type} {query.dtype} head_dim {query.shape[-1]}"
        )
    try:
        return importlib.import_module(flash.module).flash_attn_func
    except ImportError as error:
        raise RuntimeError(
            f"{flash.label} needs the {flash.package} package (pip install 'worldgen[{kernel}]'): {error}"
        ) from error


# Both kernels run through opaque custom ops: a compiled block keeps one graph around them. A custom op gets
# no device guard, and the kernels launch on the current device's stream, hence `torch.cuda.device`.
@torch.library.custom_op("worldgen::fa4_attention", mutates_args=())
def fa4_attention(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """FlashAttention-4 forward, [B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, D], softmax scale 1/sqrt(D)."""
    flash_attn_func = _flash_attn_func("fa4", query)
    with torch.cuda.device(query.device):
        return flash_attn_func(query, key, value)[0]


@torch.library.custom_op("worldgen::fa3_attention", mutates_args=())
def fa3_attention(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """FlashAttention-3 forward, [B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, D], softmax scale 1/sqrt(D).

    e4m3 inputs are taken as they are (no descale given: the kernel reads it as 1) and give a bf16 output.
    """
    flash_attn_func = _flash_attn_func("fa3", query)
    with torch.cuda.device(query.device):
        return flash_attn_func(query, key, value)


@fa4_attention.register_fake
def _fa4_attention_shape(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


@fa3_attention.register_fake
def _fa3_attention_shape(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    dtype = torch.bfloat16 if query.dtype == E4M3 else query.dtype
    return query.new_empty((*query.shape[:-1], value.shape[-1]), dtype=dtype)


def visibility_mask(
    num_frames: int,
    frame_tokens: int,
    chunk_size: int,
    local_attn_size: int,
    sink_size: int,
    device: torch.device | str | None = None,
) -> Tensor:
    """Bool [num_frames * frame_tokens]^2 mask: True where a query token may attend to a key token.

    The queries of chunk i (frames [i*chunk, end_i), end_i = (i+1)*chunk) see every frame < end_i when
    local_attn_size is -1; otherwise the sink frames {0..sink-1} and the (local_attn_size - sink) most
    recent frames ending at end_i. Attention is bidirectional within a chunk and causal across chunks.
    """
    check_window(chunk_size, local_attn_size, sink_size)
    frames = torch.arange(num_frames, device=device)
    query_end = torch.clamp((frames // chunk_size + 1) * chunk_size, max=num_frames)[:, None]
    key = frames[None, :]
    visible = key < query_end
    if local_attn_size != -1:
        recent = key >= query_end - (local_attn_size - sink_size)
        visible &= (key < sink_size) | recent
    return visible.repeat_interleave(frame_tokens, dim=0).repeat_interleave(frame_tokens, dim=1)
