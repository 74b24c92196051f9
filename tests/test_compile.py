"""The compiled DiT (worldgen/compile.py): equal to eager over a rolling-cache rollout, compiled once (no
recompile as the cache fills and rolls, nor from layer to layer), and graph breaks only where intended."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from helpers import LATENT_HW, cuda_test, rollout_velocities, tiny_inputs, tiny_model

from worldgen.compile import compile_dit, dynamo_graph_count, warmup
from worldgen.quant import fp8_error, quantize_dit

# Graphs per pass shape, shared by every block: the block up to its self-attention, q/k/v (+ RoPE unless
# the Triton kernel does it), the o projection, the rest of the block (the compiler-disabled cache
# attention splits the block).
GRAPHS_PER_SHAPE = 4


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Empty dynamo caches, and the global limits that compile_dit raises restored afterwards."""
    config = torch._dynamo.config
    torch._dynamo.reset()
    with config.patch(
        recompile_limit=config.recompile_limit, fail_on_recompile_limit_hit=config.fail_on_recompile_limit_hit
    ):
        yield
    torch._dynamo.reset()


def _attend_only(reasons: list[str]) -> bool:
    return all("SelfAttention.attend" in reason and "torch.compiler.disable" in reason for reason in reasons)


@pytest.mark.parametrize("layers", ["bf16", "fp8", "fp8 quantised in kernel"])
@torch.no_grad()
def test_block_graph_breaks_only_at_the_cache_attention(fresh_dynamo: None, layers: str) -> None:
    model = tiny_model()
    if layers != "bf16":  # the fp8 layers (emulated here) add no graph break either
        quantize_dit(model.set_compute_dtype(torch.bfloat16))
    # The fused quantisation (the reference ops on a CPU) is an opaque custom op inside the graphs.
    model.triton_kernels = layers == "fp8 quantised in kernel"
    inputs = tiny_inputs(model.config, 2)
    captured: dict[str, tuple] = {}
    hook = model.blocks[0].register_forward_pre_hook(lambda _, args: captured.setdefault("args", args))
    cache = model.make_kv_cache(
        batch_size=1, latent_height=LATENT_HW[0], latent_width=LATENT_HW[1], chunk_size=2, local_attn_size=-1,
        sink_size=0, num_frames=2,
    )  # fmt: skip
    model(inputs.noise, 500.0, inputs.y, inputs.context, inputs.control, cache=cache)
    hook.remove()
    explained = torch._dynamo.explain(model.blocks[0])(*captured["args"])
    reasons = [reason.reason for reason in explained.break_reasons]
    assert reasons and _attend_only(reasons), reasons
    assert explained.graph_count == GRAPHS_PER_SHAPE


@pytest.mark.slow  # ~15 s with a warm inductor cache, ~40 s cold on 2 busy cores
@torch.no_grad()
def test_compiled_rollout_equals_eager_without_recompiling(fresh_dynamo: None) -> None:
    """5 chunks of 2 frames, window 5 with 1 sink frame: the cache fills, then its ring wraps inside a
    chunk. The compiled model gives the eager velocities, from the graphs of the warm-up alone."""
    model = tiny_model()
    inputs = tiny_inputs(model.config, 10)
    eager = rollout_velocities(model, inputs, 2, 5, 1)

    compile_dit(model)
    report = warmup(model, latent_frames=2, latent_height=LATENT_HW[0], latent_width=LATENT_HW[1])
    assert report.graphs == GRAPHS_PER_SHAPE  # both blocks share them
    assert report.graph_breaks > 0
    graphs_after_warmup = dynamo_graph_count()
    compiled = rollout_velocities(model, inputs, 2, 5, 1)
    assert dynamo_graph_count() == graphs_after_warmup
    for eager_velocity, compiled_velocity in zip(eager, compiled, strict=True):
        torch.testing.assert_close(compiled_velocity, eager_velocity, rtol=1e-4, atol=1e-5)


@cuda_test
def test_compiled_bf16_and_fp8_match_eager_on_gpu(fresh_dynamo: None) -> None:
    """The GPU setting: bf16 compute, cuDNN/flash attention, fp8 layers on the kernel path where available;
    then the fused kernels (Triton norm+RoPE, GELU epilogue), alone and with fp8 layers."""
    for quantise, fused in ((False, False), (True, False), (False, True), (True, True)):
        model = tiny_model().cuda().set_compute_dtype(torch.bfloat16)
        model.attention_backend = "auto"
        model.triton_kernels = model.gelu_epilogue = fused
        if quantise:
            quantize_dit(model)
        inputs = tiny_inputs(model.config, 10).to("cuda")
        eager = rollout_velocities(model, inputs, 2, 5, 1)
        compile_dit(model)
        graphs = dynamo_graph_count()
        compiled = rollout_velocities(model, inputs, 2, 5, 1)
        assert dynamo_graph_count() - graphs == GRAPHS_PER_SHAPE
        for eager_velocity, compiled_velocity in zip(eager, compiled, strict=True):
            # Fused kernels keep intermediates in float32 where eager rounds them to bf16 (bf16 vs float32
            # is ~0.01 on this model), and a moved input can flip an e4m3 code by one step.
            assert fp8_error(eager_velocity, compiled_velocity) < (0.05 if quantise else 0.02)
        torch._dynamo.reset()
