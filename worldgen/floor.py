"""What the DiT computes per chunk, counted from the shapes, and how fast this GPU runs those kernels.

`forward_ops`/`chunk_ops` list every matmul and attention call of a forward or a chunk (elementwise work is
not counted); `KernelClock` times each shape on the spot, as the model runs it, and `floor_seconds` sums
them: the matmul and attention kernels alone, back to back, with nothing else. The benchmark
(worldgen/bench.py) reports its chunks against that floor.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from worldgen.config import DiTConfig
from worldgen.models.attention import attention
from worldgen.models.fp8_rows import quantize_rows
from worldgen.models.kv_cache import E4M3
from worldgen.profiling import StageTimer
from worldgen.quant import Fp8Linear

# ------------------------------------------------------------------------------------------------ FLOPs
CATEGORIES = ("linear", "self_attention", "cross_attention", "camera", "text")
_PER_PASS = frozenset(("linear", "self_attention", "cross_attention"))


@dataclass(frozen=True)
class Matmul:
    """`count` products [m, k] x [k, n]: a Linear over m rows (the strided patch Conv3d is one too).
    `fp8`: the layers are among those `--fp8` quantises (worldgen.quant.FP8_LAYERS)."""

    category: str
    m: int
    k: int
    n: int
    count: int = 1
    fp8: bool = False

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n * self.count


@dataclass(frozen=True)
class AttentionCall:
    """`count` attention calls: QK^T and PV over `queries` x `keys` in every head."""

    category: str
    queries: int
    keys: int
    heads: int
    head_dim: int
    count: int = 1

    @property
    def flops(self) -> int:
        return 4 * self.queries * self.keys * self.heads * self.head_dim * self.count


Op = Matmul | AttentionCall


def forward_ops(config: DiTConfig, *, frames: int, frame_tokens: int, kv_tokens: int) -> list[Op]:
    """Every matmul and attention call of one plain-path forward (batch 1) over `frames` latent frames
    whose self-attention sees `kv_tokens` keys, its own included. Elementwise work is not counted.

    Categories: `linear` (patch embedding, time MLP, q/k/v/o, cross-attention q/o, FFN, head),
    `self_attention`, `cross_attention`, `camera` (control tokens and every block's camera modulation),
    `text` (text embedding and every block's cross-attention K/V).
    """
    dim, layers, heads, head_dim = config.dim, config.num_layers, config.num_heads, config.head_dim
    tokens, text = frames * frame_tokens, config.text_len
    patch = math.prod(config.patch_size)
    return [
        Matmul("linear", tokens, config.in_dim * patch, dim),
        Matmul("linear", frames, config.freq_dim, dim),  # the time MLP runs once per frame
        Matmul("linear", frames, dim, dim),
        Matmul("linear", frames, dim, 6 * dim),
        Matmul("linear", tokens, dim, dim, 6 * layers, fp8=True),  # self-attention q k v o, cross q o
        Matmul("linear", tokens, dim, config.ffn_dim, layers, fp8=True),
        Matmul("linear", tokens, config.ffn_dim, dim, layers, fp8=True),
        Matmul("linear", tokens, dim, config.out_dim * patch),
        AttentionCall("self_attention", tokens, kv_tokens, heads, head_dim, layers),
        AttentionCall("cross_attention", tokens, text, heads, head_dim, layers),
        Matmul("camera", tokens, config.control_channels * patch, dim),
        # The control MLP's 2 layers and every block's injector 1, 2, scale and shift.
        Matmul("camera", tokens, dim, dim, 2 + 4 * layers, fp8=True),
        Matmul("text", text, config.text_dim, dim),
        Matmul("text", text, dim, dim, 1 + 2 * layers),  # text MLP's second layer; cross-attention K V
    ]


def update_cache_skips(config: DiTConfig, *, frames: int, frame_tokens: int, kv_tokens: int) -> list[Op]:
    """What `CausalDiT.update_cache` leaves out of a forward: the last block after its K/V, and the head."""
    dim, heads, head_dim = config.dim, config.num_heads, config.head_dim
    tokens = frames * frame_tokens
    return [
        Matmul("linear", tokens, dim, dim, 4, fp8=True),  # self-attention q o, cross q o
        Matmul("linear", tokens, dim, config.ffn_dim, fp8=True),
        Matmul("linear", tokens, config.ffn_dim, dim, fp8=True),
        Matmul("linear", tokens, dim, config.out_dim * math.prod(config.patch_size)),
        AttentionCall("self_attention", tokens, kv_tokens, heads, head_dim),
        AttentionCall("cross_attention", tokens, config.text_len, heads, head_dim),
    ]


def chunk_ops(
    config: DiTConfig, *, frames: int, frame_tokens: int, kv_tokens: int, passes: int, plain: bool
) -> list[Op]:
    """What the DiT computes for one chunk of `passes` forwards (4 denoising + 1 cache update).

    The plain path recomputes everything in every pass and runs the cache update as a whole forward; the
    fast path computes the camera modulation once per chunk and the text K/V once per video (left out
    here: see `forward_ops`' `text` category), and cuts its cache update short (`update_cache_skips`).
    """
    shape = {"frames": frames, "frame_tokens": frame_tokens, "kv_tokens": kv_tokens}
    counts: Counter[Op] = Counter()  # calls per chunk of each shape (an op with count 1)
    for op in forward_ops(config, **shape):
        if plain or op.category in _PER_PASS:
            counts[replace(op, count=1)] += op.count * passes
        elif op.category == "camera":
            counts[replace(op, count=1)] += op.count
    if not plain:  # `passes` includes the one cache update
        counts.subtract({replace(op, count=1): op.count for op in update_cache_skips(config, **shape)})
    return [replace(op, count=count) for op, count in counts.items() if count > 0]


def flops_by_category(ops: Iterable[Op]) -> dict[str, int]:
    totals = dict.fromkeys(CATEGORIES, 0)
    for op in ops:
        totals[op.category] += op.flops
    return totals


# ------------------------------------------------------------------------------------ kernel floor
def seconds_per_call(
    fn: Callable[[], object], device: torch.device, calls: int = 10, rounds: int = 3
) -> float:
    """Seconds of one call of `fn`: the best mean of `rounds` rounds of `calls` back-to-back calls, after
    two untimed ones (autotuning, caches). The best round, because the floor is what the kernel can do."""
    fn()
    fn()
    best = math.inf
    for _ in range(rounds):
        timer = StageTimer(device)
        with timer.stage("calls"):
            for _ in range(calls):
                fn()
        best = min(best, timer.seconds["calls"] / calls)
    return best


class KernelClock:
    """Seconds per call of each GEMM and attention shape, each measured once on the device when first asked.

    GEMMs run as the model's Linears do (a Linear with a bias, in the compute dtype), and with `fp8` the
    quantised ones as the model's `Fp8Linear` multiplies (its scaled matmul on an already quantised
    activation: the compiled blocks fuse the quantisation into the ops before it);
    attention through the model's `attention()` with the given backend, in the same dtype (e4m3 for the
    self-attention of backend `fp8`, whose KV cache is e4m3). `fp8_fast_accum`: the fp8 GEMMs' accumulation,
    as the model's layers run it.
    `floor_seconds(ops)` sums them: the time of the chunk's matmul and attention kernels alone, back to back.
    """

    def __init__(
        self, device: torch.device, dtype: torch.dtype, calls: int = 10, fp8_fast_accum: bool = True
    ) -> None:
        self.device, self.dtype, self.calls = device, dtype, calls
        self.fp8_fast_accum = fp8_fast_accum
        self._matmuls: dict[tuple[int, int, int, bool], float] = {}
        self._attention: dict[tuple[str, torch.dtype, int, int, int, int], float] = {}

    def _random(self, *shape: int) -> Tensor:
        return torch.randn(shape, device=self.device, dtype=self.dtype)

    def seconds(self, op: Op, backend: str, fp8: bool = False) -> float:
        """Seconds of one call of `op`'s shape; `fp8`: a quantisable matmul runs as an fp8 layer."""
        if isinstance(op, Matmul):
            as_fp8 = fp8 and op.fp8
            key = (op.m, op.k, op.n, as_fp8)
            if key not in self._matmuls:
                x = self._random(op.m, op.k)
                linear = nn.Linear(op.k, op.n, device=self.device, dtype=self.dtype)
                # fp8: the scaled matmul alone, as compiled blocks fuse the activation's quantisation.
                call = (
                    partial(
                        Fp8Linear.from_linear(linear, fast_accum=self.fp8_fast_accum).product,
                        *quantize_rows(x),
                    )
                    if as_fp8
                    else partial(linear, x)
                )
                self._matmuls[key] = seconds_per_call(call, self.device, self.calls)
            return self._matmuls[key]
        # Backend `fp8` keeps the KV cache in e4m3: its self-attention calls take e4m3 inputs.
        dtype = E4M3 if backend == "fp8" and op.category == "self_attention" else self.dtype
        key = (backend, dtype, op.queries, op.keys, op.heads, op.head_dim)
        if key not in self._attention:
            query = self._random(1, op.queries, op.heads, op.head_dim).to(dtype)
            key_, value = (self._random(1, op.keys, op.heads, op.head_dim).to(dtype) for _ in range(2))
            self._attention[key] = seconds_per_call(
                lambda: attention(query, key_, value, backend), self.device, self.calls
            )
        return self._attention[key]

    def floor_seconds(self, ops: Iterable[Op], backend: str, fp8: bool = False) -> float:
        return sum(op.count * self.seconds(op, backend, fp8) for op in ops)

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        """Every shape measured so far with its seconds per call and TFLOP/s."""
        matmuls = [
            {
                "m": m,
                "k": k,
                "n": n,
                "fp8": fp8,
                "fast_accum": fp8 and self.fp8_fast_accum,
                "seconds": s,
                "tflops": 2 * m * k * n / s / 1e12,
            }
            for (m, k, n, fp8), s in self._matmuls.items()
        ]
        attention_calls = [
            {
                "backend": backend,
                "dtype": str(dtype).removeprefix("torch."),
                "queries": q,
                "keys": k,
                "heads": h,
                "head_dim": d,
                "seconds": s,
                "tflops": 4 * q * k * h * d / s / 1e12,
            }
            for (backend, dtype, q, k, h, d), s in self._attention.items()
        ]
        return {"matmul": matmuls, "attention": attention_calls}
