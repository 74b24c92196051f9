"""Attention through `F.scaled_dot_product_attention` with a chosen backend, and the reference window mask.

Backends: `auto | cudnn | flash | efficient | math | default | fa4`.
- `auto` on CUDA takes FlashAttention-4 (`fa4`, below) for self-attention lengths when it can run here,
  and otherwise tries cuDNN first (about 1.7x flash at LingBot shapes on H200), then flash, then
  memory-efficient, then math, taking the first one that supports the inputs; on other devices it leaves
  the choice to PyTorch's default dispatch.
- `default` is PyTorch's own dispatch everywhere, with no `sdpa_kernel` restriction: what a
  straightforward port gets, the attention of the benchmark's plain path.
- `cudnn`, `flash`, `efficient` and `math` force that SDPA kernel.
- `fa4` calls FlashAttention-4's CuTe kernels (the optional `flash-attn-4` package; Hopper or Blackwell
  GPUs) on the [B, L, H, D] layout as it is, through an opaque custom op so that a compiled block keeps
  one graph around it. On H200 at 4680 queries x 32760 keys it runs at about 650 TFLOP/s against cuDNN's
  550; at the 512 text keys of cross-attention cuDNN is faster, hence `FA4_MIN_KEYS` for `auto`.

`visibility_mask` builds the explicit [tokens, tokens] mask of chunked causal generation straight from
the reference rules; the full-sequence forward with this mask is the oracle the rolling cache is tested
against.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from worldgen.models.kv_cache import check_window

AttentionBackend = Literal["auto", "cudnn", "flash", "efficient", "math", "default", "fa4"]
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


# `auto` uses FlashAttention-4 from this many keys on (H200: 0.159 ms against cuDNN's 0.131 ms at 512
# keys, 0.75 against 1.01 ms at 4680, both with 4680 queries and 40 heads of 128).
FA4_MIN_KEYS = 2048
_FA4_DTYPES = (torch.float16, torch.bfloat16)


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
    """
    if backend == "fa4" and mask is not None:
        raise ValueError("attention backend 'fa4' takes no mask; use 'math' for the masked oracle")
    if backend == "fa4" or (
        backend == "auto"
        and mask is None
        and key.shape[1] >= FA4_MIN_KEYS
        and fa4_supports(query)
        and fa4_usable(query.device)
    ):
        return fa4_attention(query, key, value)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if backend in _NAMED_BACKENDS:
        with sdpa_kernel(_NAMED_BACKENDS[backend]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    elif backend == "auto" and q.device.type == "cuda":
        with sdpa_kernel(_CUDA_PRIORITY, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:  # "default", and "auto" off CUDA
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


def fa4_supports(query: Tensor) -> bool:
    """The inputs FlashAttention-4's kernels take: CUDA, fp16 or bf16, head_dim a multiple of 8 up to 256."""
    head_dim = query.shape[-1]
    return query.is_cuda and query.dtype in _FA4_DTYPES and head_dim % 8 == 0 and head_dim <= 256


@torch.compiler.assume_constant_result  # a compiled block asks once, at trace time
def fa4_usable(device: torch.device) -> bool:
    """True when FlashAttention-4 can run on `device`: a Hopper or Blackwell GPU, and flash-attn-4 imports."""
    return device.type == "cuda" and _fa4_usable(device)


@functools.cache  # asked before every eager self-attention call: the device query and the import run once
def _fa4_usable(device: torch.device) -> bool:
    if torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return False
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as error:
        if not (isinstance(error, ModuleNotFoundError) and error.name in ("flash_attn", "flash_attn.cute")):
            # Installed but broken: a missing dependency, a CUDA build that does not match, ...
            warnings.warn(f"flash-attn-4 does not import ({error}); attention uses cuDNN", stacklevel=2)
        return False
    return True


@torch.library.custom_op("worldgen::fa4_attention", mutates_args=())
def fa4_attention(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """FlashAttention-4 forward, [B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, D], softmax scale 1/sqrt(D)."""
    if not fa4_supports(query):
        raise RuntimeError(
            "attention backend 'fa4' needs CUDA tensors in float16 or bfloat16 with head_dim a multiple of 8 "
            f"up to 256, got {query.device.type} {query.dtype} head_dim {query.shape[-1]}"
        )
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError as error:
        raise RuntimeError(
            f"attention backend 'fa4' needs the flash-attn-4 package (pip install 'worldgen[fa4]'): {error}"
        ) from error
    # A custom op gets no device guard, and the kernel launches on the current device's stream.
    with torch.cuda.device(query.device):
        return flash_attn_func(query, key, value)[0]


@fa4_attention.register_fake
def _fa4_attention_shape(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


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
