"""torch.compile for the DiT, one block at a time, with static shapes and the compile time reported apart.

    compile_dit(model)                        # after loading, set_compute_dtype and quantize_dit
    report = warmup(model, latent_frames=3, latent_height=60, latent_width=104)
    report.compile_seconds                    # tracing + code generation, apart from the chunk timings

Every block is compiled with `dynamic=False`: the token count of a pass is fixed by the job (chunk_size x
latent height x width), so the kernels are specialised to it.

What keeps it compiling once: the rolling KV cache works with host-integer cursors (write slots, visible
length) that change from chunk to chunk, and every block has its own layer index. Traced, each of those
ints would become a guard: one recompile per layer and per cache state (7 states while a window of 21
fills, 6 ring positions after), far past dynamo's limit of 8 entries per code object, after which it runs
eager without failing. So `SelfAttention.attend` (cache write + SDPA, in worldgen/models/dit.py) is
`torch.compiler.disable`d: the ints never reach a guard, and the two ops it runs are single kernels that
compilation would not fuse anyway. Everything else in a block is compiled: the norms, modulation, RoPE,
gates and residuals, the q/k/v/o, camera and FFN projections (and their fp8 quantisation), cross-attention.
With the model's `triton_kernels`, the q/k RMSNorm + RoPE move into `attend` as well: one Triton kernel
each, which writes the keys into the cache (worldgen/models/triton_kernels.py); with fp8 layers, their inputs
come from the opaque custom ops `worldgen::quantize_rows` and `worldgen::residual_quantize_rows`
(worldgen/models/fp8_rows.py), which the graphs call as they are (no graph break).

Graphs to expect, per distinct pass shape (batch, latent frames, latent height x width) and dtype: 4,
shared by all blocks (the block up to its self-attention; q/k/v, with RoPE unless the Triton kernel does
it; the o projection; the rest of the block). They are graph breaks at `attend`, which dynamo
(nested_graph_breaks off, the default) resolves by compiling the self-attention frame on its own, hence 4
graphs and 3 breaks per block instead of 2 and 1.
No recompiles as the cache fills or the window rolls, from layer to layer, between the denoising and the
cache-update passes, or with local_attn_size -1. A job with another resolution or chunk size compiles its
own 4 graphs; `compile_dit` raises the limit to RECOMPILE_LIMIT entries per code object (16 shapes per
process) and makes hitting it an error instead of a silent fall-back to eager.

Call the compiled model under `torch.no_grad()` (as the generator does): grad mode is part of the guards,
so `warmup` under no_grad warms up exactly the graphs a chunk uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._dynamo.utils import counters

from worldgen.models.dit import CausalDiT
from worldgen.profiling import StageTimer

# Entries per code object: 4 per pass shape for the block and its self-attention frames.
RECOMPILE_LIMIT = 64


def compile_dit(model: CausalDiT, mode: str | None = None) -> CausalDiT:
    """Compile every block of `model` in place with `torch.compile(mode=mode, dynamic=False)`.

    `mode`: None (inductor defaults) or a torch.compile mode such as "max-autotune-no-cudagraphs" (longer
    compile, autotuned GEMM templates). Compilation happens on the first forward; see `warmup`.
    """
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_config.fail_on_recompile_limit_hit = True
    for block in model.blocks:
        block.compile(mode=mode, dynamic=False)
    return model


@dataclass(frozen=True)
class WarmupReport:
    """What the first forward of a compiled model cost, against the same forward once compiled."""

    first_pass_seconds: float  # tracing, code generation and one pass
    second_pass_seconds: float  # the same pass again, from the compiled graphs
    graphs: int  # graphs dynamo compiled during the warm-up
    graph_breaks: int  # graph breaks dynamo met while tracing them

    @property
    def compile_seconds(self) -> float:
        return self.first_pass_seconds - self.second_pass_seconds


def dynamo_graph_count() -> int:
    """Graphs dynamo has compiled in this process: unchanged across a chunk means no recompile."""
    return counters["stats"]["unique_graphs"]


@torch.no_grad()
def warmup(
    model: CausalDiT,
    *,
    latent_frames: int,
    latent_height: int,
    latent_width: int,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
) -> WarmupReport:
    """Run two identical passes of the shape a job's chunks have, on random inputs and a scratch cache.

    `latent_frames` is the job's chunk_size; `dtype` that of the latents x and y (the generator's float32).
    The compiled graphs never see the cache, so the scratch cache (whole video, one chunk) compiles exactly
    what the job's rolling cache will use.
    """
    config = model.config
    device = next(model.parameters()).device
    shape = (batch_size, config.out_dim, latent_frames, latent_height, latent_width)
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    y = torch.randn(
        (batch_size, config.in_dim - config.out_dim, *shape[2:]),
        generator=generator,
        device=device,
        dtype=dtype,
    )
    text = model.prepare_text(
        torch.zeros(batch_size, config.text_len, config.text_dim, device=device, dtype=dtype)
    )
    control = model.prepare_control(
        torch.zeros(batch_size, config.control_channels, *shape[2:], device=device, dtype=dtype)
    )
    cache = model.make_kv_cache(
        batch_size=batch_size,
        latent_height=latent_height,
        latent_width=latent_width,
        chunk_size=latent_frames,
        local_attn_size=-1,
        sink_size=0,
        num_frames=latent_frames,
    )
    graphs, breaks = dynamo_graph_count(), sum(counters["graph_break"].values())
    timer = StageTimer(device)
    for name in ("first", "second"):
        with timer.stage(name):
            model(x, 500.0, y, text, control, cache=cache, first_latent_frame=0)
    return WarmupReport(
        first_pass_seconds=timer.seconds["first"],
        second_pass_seconds=timer.seconds["second"],
        graphs=dynamo_graph_count() - graphs,
        graph_breaks=sum(counters["graph_break"].values()) - breaks,
    )
