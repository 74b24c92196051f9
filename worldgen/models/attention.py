"""Attention through `F.scaled_dot_product_attention` with a chosen backend, and the reference window mask.

Backends: `auto | cudnn | flash | efficient | math | default`. `auto` on CUDA tries cuDNN first (about
1.7x flash at LingBot shapes on H200), then flash, then memory-efficient, then math, taking the first one
that supports the inputs; on other devices it leaves the choice to PyTorch's default dispatch. `default`
is PyTorch's own dispatch everywhere, with no `sdpa_kernel` restriction: what a straightforward port gets,
the attention of the benchmark's plain path. The others force that one kernel.

`visibility_mask` builds the explicit [tokens, tokens] mask of chunked causal generation straight from
the reference rules; the full-sequence forward with this mask is the oracle the rolling cache is tested
against.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from worldgen.models.kv_cache import check_window

AttentionBackend = Literal["auto", "cudnn", "flash", "efficient", "math", "default"]
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
