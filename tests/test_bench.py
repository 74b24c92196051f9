"""The benchmark: FLOP counting against torch's counter and the reference page, the kernel floor, the
sync check, the plain-path generator sharing the weights, and an end-to-end run on the tiny preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_pass_inputs, two_chunk_cache
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import worldgen.bench as bench_module
import worldgen.generator as generator_module
import worldgen.quant as quant_module
from worldgen.bench import (
    BenchSettings,
    bench_generator,
    dit_sync_check,
    random_text,
    run_bench,
    write_inputs,
)
from worldgen.cli import main
from worldgen.compile import WarmupReport
from worldgen.config import get_preset
from worldgen.control import check_actions, check_intrinsics, check_poses
from worldgen.floor import (
    CATEGORIES,
    AttentionCall,
    KernelClock,
    Matmul,
    chunk_ops,
    flops_by_category,
    forward_ops,
    update_cache_skips,
)
from worldgen.models.attention import attention
from worldgen.models.random_init import random_dit, random_vae
from worldgen.quant import Fp8Linear, quantize_dit, scaled_mm_emulated
from worldgen.timing import read_timings

REPO = Path(__file__).resolve().parents[1]
TINY, FULL = get_preset("tiny"), get_preset("lingbot-world-fast")
# A tiny run: 32x32 pixels (2x2 tokens per latent frame), 13 frames = 4 latent frames = 4 chunks of 1.
TINY_ARGS = [
    "--preset", "tiny", "--device", "cpu", "--height", "32", "--width", "32", "--frame-num", "13",
    "--chunk-size", "1", "--window", "3", "--sink", "1",
]  # fmt: skip
TINY_SETTINGS = dict(
    preset="tiny", device="cpu", height=32, width=32, frame_num=13, chunk_size=1, window=3, sink=1
)

SUMMARY_KEYS = {
    "run_id", "settings", "environment", "build", "compile_seconds", "fp8_latent_error",
    "text_tflop_per_video", "kernels", "paths", "plain_over_fast",
}  # fmt: skip
PATH_KEYS = {
    "engine", "timings", "create_runtime_seconds", "chunks", "warmup_skipped", "steady_chunks",
    "passes_per_chunk", "stages", "frames_per_second", "dit_seconds_per_chunk", "tflop_per_chunk",
    "tflop_per_chunk_by_category", "tflop_per_pass_by_category", "achieved_tflops",
    "floor_seconds_per_chunk", "floor_fraction", "peak_memory_bytes", "energy_joules_per_chunk",
    "mean_power_watts", "sync_check", "profile", "per_chunk",
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ FLOPs
def _counted(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_forward_ops_match_torch_flop_counter() -> None:
    """Chunk 1 of 2-frame chunks (kv = 4 frames), 2x3 tokens per frame: every category against torch."""
    dit = random_dit(TINY.dit, "cpu", torch.float32, seed=0)
    dit.attention_backend = "math"  # decomposes into bmm, which the counter sees
    frames, height, width = 2, 4, 6
    x, y, context, control = tiny_pass_inputs(frames, height, width)
    cache = two_chunk_cache(dit, frames, height, width)
    with torch.no_grad():
        dit(x, 999, y, context, control, cache=cache, first_latent_frame=0)
    ours = flops_by_category(forward_ops(TINY.dit, frames=frames, frame_tokens=6, kv_tokens=2 * frames * 6))

    plain = _counted(lambda: dit(x, 999, y, context, control, cache=cache, first_latent_frame=frames))
    assert plain == sum(ours.values())
    text, camera = dit.prepare_text(context), dit.prepare_control(control)
    fast = _counted(lambda: dit(x, 999, y, text, camera, cache=cache, first_latent_frame=frames))
    assert fast == ours["linear"] + ours["self_attention"] + ours["cross_attention"]
    assert _counted(lambda: dit.prepare_text(context)) == ours["text"]
    assert _counted(lambda: dit.prepare_control(control)) == ours["camera"]
    skipped = update_cache_skips(TINY.dit, frames=frames, frame_tokens=6, kv_tokens=2 * frames * 6)
    update = _counted(lambda: dit.update_cache(x, y, text, camera, cache=cache, first_latent_frame=frames))
    assert update == fast - sum(op.flops for op in skipped)


def test_forward_ops_match_a_hand_count_on_tiny() -> None:
    # tiny: dim 64, ffn 128, 2 layers, 2 heads of 32, in_dim 36, out 16, text 512 x 32, freq 256,
    # control 384 channels; one frame of 4 tokens attending to 8 keys.
    ops = flops_by_category(forward_ops(TINY.dit, frames=1, frame_tokens=4, kv_tokens=8))
    patch = 2 * 4 * (36 * 4) * 64
    time_mlp = 2 * 1 * 256 * 64 + 2 * 1 * 64 * 64 + 2 * 1 * 64 * (6 * 64)
    projections = 2 * 6 * (2 * 4 * 64 * 64)  # 2 layers x (q k v o + cross q o)
    ffn = 2 * (2 * 4 * 64 * 128 + 2 * 4 * 128 * 64)
    head = 2 * 4 * 64 * 64
    assert ops["linear"] == patch + time_mlp + projections + ffn + head == 851_968
    assert ops["self_attention"] == 2 * 4 * 4 * 8 * 64 == 16_384  # 2 layers x 4 Lq Lk (heads x head_dim)
    assert ops["cross_attention"] == 2 * 4 * 4 * 512 * 64
    assert ops["camera"] == 2 * 4 * 1536 * 64 + (2 + 4 * 2) * 2 * 4 * 64 * 64
    assert ops["text"] == 2 * 512 * 32 * 64 + (1 + 2 * 2) * 2 * 512 * 64 * 64


def test_full_size_flops_match_the_reference_page() -> None:
    """832x480 (1560 tokens per frame), chunk 3 = 4680 queries, full window of 21 frames = 32760 keys."""
    ops = flops_by_category(forward_ops(FULL.dit, frames=3, frame_tokens=1560, kv_tokens=21 * 1560))
    assert ops["linear"] == pytest.approx(112e12, rel=0.01)
    assert ops["self_attention"] == pytest.approx(126e12, rel=0.01)
    assert ops["cross_attention"] == pytest.approx(2e12, rel=0.03)
    assert ops["camera"] == pytest.approx(39e12, rel=0.03)

    def per_chunk(plain: bool) -> float:
        ops = chunk_ops(FULL.dit, frames=3, frame_tokens=1560, kv_tokens=32760, passes=5, plain=plain)
        return sum(op.flops for op in ops)

    assert per_chunk(plain=False) == pytest.approx(1.24e15, rel=0.01)
    # The page's 1.39 PFLOP recomputes the camera only; the plain path also recomputes the text K/V.
    assert per_chunk(plain=True) - 5 * ops["text"] == pytest.approx(1.39e15, rel=0.01)


def test_chunk_ops_repeat_per_pass_work_and_do_the_rest_once() -> None:
    one = flops_by_category(forward_ops(TINY.dit, frames=3, frame_tokens=4, kv_tokens=24))
    fast = flops_by_category(
        chunk_ops(TINY.dit, frames=3, frame_tokens=4, kv_tokens=24, passes=5, plain=False)
    )
    plain = flops_by_category(
        chunk_ops(TINY.dit, frames=3, frame_tokens=4, kv_tokens=24, passes=5, plain=True)
    )
    skipped = flops_by_category(update_cache_skips(TINY.dit, frames=3, frame_tokens=4, kv_tokens=24))
    assert plain == {category: 5 * one[category] for category in CATEGORIES}
    assert fast == {
        **{
            category: 5 * one[category] - skipped[category]
            for category in ("linear", "self_attention", "cross_attention")
        },
        "camera": one["camera"],
        "text": 0,
    }
    assert 0 < skipped["linear"] < one["linear"] and skipped["camera"] == skipped["text"] == 0


def test_kernel_clock_measures_each_shape_once_and_sums_the_floor() -> None:
    clock = KernelClock(torch.device("cpu"), torch.float32, calls=2)
    matmul, call = Matmul("linear", 8, 16, 32, count=3), AttentionCall("self_attention", 8, 24, 2, 8, count=2)
    seconds = clock.seconds(matmul, "auto"), clock.seconds(call, "default")
    assert all(s > 0 for s in seconds)
    assert clock.seconds(Matmul("camera", 8, 16, 32), "auto") == seconds[0]  # same shape, measured once
    assert clock.floor_seconds([matmul, call], "default") == pytest.approx(3 * seconds[0] + 2 * seconds[1])
    table = clock.to_dict()
    assert [(m["m"], m["k"], m["n"]) for m in table["matmul"]] == [(8, 16, 32)]
    assert table["matmul"][0]["tflops"] == pytest.approx(2 * 8 * 16 * 32 / seconds[0] / 1e12)
    assert [(a["backend"], a["keys"]) for a in table["attention"]] == [("default", 24)]


def test_kernel_clock_times_fp8_self_attention_on_e4m3_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backend fp8 keeps the cache in e4m3: its self-attention is timed so, its cross-attention in bf16."""
    seen: list[tuple[str, torch.dtype, torch.dtype]] = []

    def recorder(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str) -> torch.Tensor:
        seen.append((backend, query.dtype, key.dtype))
        return query

    monkeypatch.setattr("worldgen.floor.attention", recorder)
    clock = KernelClock(torch.device("cpu"), torch.bfloat16, calls=1)
    for backend in ("fp8", "auto"):
        for category in ("self_attention", "cross_attention"):
            clock.seconds(AttentionCall(category, 8, 24, 2, 8), backend)
    e4m3, bf16 = torch.float8_e4m3fn, torch.bfloat16
    assert set(seen) == {("fp8", e4m3, e4m3), ("fp8", bf16, bf16), ("auto", bf16, bf16)}
    table = clock.to_dict()["attention"]
    assert [(a["backend"], a["dtype"]) for a in table] == [("fp8", "float8_e4m3fn"), ("fp8", "bfloat16"),
                                                          ("auto", "bfloat16")]  # fmt: skip


def test_fp8_matmuls_are_the_layers_fp8_quantises() -> None:
    dit = quantize_dit(random_dit(TINY.dit, "cpu", torch.bfloat16, seed=0))
    quantised = sorted((m.in_features, m.out_features) for m in dit.modules() if isinstance(m, Fp8Linear))
    ops = forward_ops(TINY.dit, frames=1, frame_tokens=4, kv_tokens=4)
    counted = sorted((op.k, op.n) for op in ops if isinstance(op, Matmul) and op.fp8 for _ in range(op.count))
    assert counted == quantised


@pytest.mark.parametrize("fast_accum", [True, False])
def test_kernel_clock_times_quantisable_matmuls_as_fp8_layers(
    fast_accum: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    accumulations = []

    def emulated(*args: torch.Tensor | None, fast_accum: bool) -> torch.Tensor:
        accumulations.append(fast_accum)
        return scaled_mm_emulated(*args, fast_accum=fast_accum)

    monkeypatch.setattr(quant_module, "scaled_mm_emulated", emulated)
    clock = KernelClock(torch.device("cpu"), torch.bfloat16, calls=1, fp8_fast_accum=fast_accum)
    quantisable, kept = Matmul("linear", 8, 16, 32, fp8=True), Matmul("linear", 8, 16, 32)
    for op in (quantisable, kept):
        for fp8 in (False, True):
            assert clock.seconds(op, "auto", fp8) > 0
    # The bf16 and fp8 timings of the quantisable shape; the kept layer reuses the bf16 one under --fp8.
    # The fp8 one ran, and is reported, with the clock's accumulation.
    matmuls = [(m["m"], m["fp8"], m["fast_accum"]) for m in clock.to_dict()["matmul"]]
    assert matmuls == [(8, False, False), (8, True, fast_accum)]
    assert accumulations and set(accumulations) == {fast_accum}
    assert clock.seconds(kept, "auto", fp8=True) == clock.seconds(quantisable, "auto")


def test_default_attention_backend_equals_math() -> None:
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, n, 2, 8, dtype=torch.float64, generator=generator) for n in (5, 7, 7))
    mask = torch.rand(5, 7, generator=generator) > 0.3
    mask[:, 0] = True  # every query sees at least one key
    for m in (None, mask):
        torch.testing.assert_close(attention(q, k, v, "default", m), attention(q, k, v, "math", m))


# ------------------------------------------------------------------------------------- inputs and hooks
@pytest.mark.parametrize("preset", ["lingbot-world-fast", "lingbot-world-fast-act"])
def test_synthetic_inputs_are_valid(tmp_path: Path, preset: str) -> None:
    settings = BenchSettings(out=tmp_path, height=48, width=80, frame_num=21)
    job = write_inputs(tmp_path, settings, get_preset(preset).dit.control_type)
    with Image.open(job.image) as image:
        assert image.size == (80, 48)
    poses = check_poses(np.load(job.poses))
    assert len(poses) == 21 and np.abs(np.diff(poses[:, :3, 3], axis=0)).max() < 0.2  # smooth
    assert len(check_intrinsics(np.load(job.intrinsics))) == 21
    assert (job.actions is not None) == (preset == "lingbot-world-fast-act")
    if job.actions:
        assert check_actions(np.load(job.actions))[:, 0].all()
    assert (job.height, job.width, job.local_attn_size, job.sink_size) == (48, 80, 21, 3)


def _tiny_generators(tmp_path: Path):
    settings = BenchSettings(out=tmp_path, **TINY_SETTINGS).resolved()
    dit, vae = random_dit(TINY.dit, "cpu", torch.float32), random_vae(TINY.vae, "cpu")
    text = random_text(TINY.dit, seed=0)
    job = write_inputs(tmp_path, settings, "cam")
    return settings, dit, vae, text, job


def test_plain_generator_shares_the_weights_and_gives_the_same_frames(tmp_path: Path) -> None:
    settings, dit, vae, text, job = _tiny_generators(tmp_path)
    prompts = tmp_path / "prompts"
    fast = bench_generator(settings.engine(), (dit, vae), text, job, prompts)
    fast_frames = fast.create_runtime(job, prompts).generate_next_chunk().frames
    assert dit.attention_backend == "auto" and vae.channels_last
    plain = bench_generator(settings.engine(plain=True), (dit, vae), text, job, prompts)
    assert plain.dit is dit and plain.vae is vae
    assert dit.attention_backend == "default" and not vae.channels_last
    assert torch.equal(plain.embed_prompts([job.prompt], prompts)[0], text)  # from the cache: no encoder
    plain_frames = plain.create_runtime(job, prompts).generate_next_chunk().frames
    np.testing.assert_allclose(plain_frames.astype(int), fast_frames.astype(int), atol=1)


def test_sync_check_covers_the_dit_passes_but_not_the_stage_edge(tmp_path: Path) -> None:
    settings, dit, vae, text, job = _tiny_generators(tmp_path)
    generator = bench_generator(settings.engine(), (dit, vae), text, job, tmp_path / "prompts")
    runtime = generator.create_runtime(job, tmp_path / "prompts")
    events: list[str] = []
    with dit_sync_check(dit, len(runtime.schedule), set_mode=events.append):
        # Block 0 runs in every pass (the fast path's `update_cache` too), after the check's hooks.
        dit.blocks[0].register_forward_pre_hook(lambda *_: events.append("pass"))
        runtime.generate_next_chunk()
    # 4 denoising passes under "error" without a break, off for the denoise/cache-update stage edge,
    # on again for the cache-update pass, and off when the block ends.
    assert events == [
        "error", "pass", "error", "pass", "error", "pass", "error", "pass", "default",
        "error", "pass", "default", "default",
    ]  # fmt: skip
    runtime.generate_next_chunk()  # the check's hooks are gone
    assert events[13:] == ["pass"] * 5


# ------------------------------------------------------------------------------------------ end to end
def test_bench_end_to_end_on_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("WORLDGEN_TORCH_PROFILER_WITH_STACK", "0")
    monkeypatch.setenv("WORLDGEN_TORCH_PROFILER_PROFILE_MEMORY", "0")
    out = tmp_path / "bench"
    assert (
        main(["bench", *TINY_ARGS, "--chunks", "2", "--compare", "plain", "--profile", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "floor %" in printed and f"results: {out / 'bench.json'}" in printed

    summary = json.loads((out / "bench.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    # The switches as they ran: a CPU runs no compile or Triton kernels, and no fp8 GEMMs to accumulate fast.
    switches = ("compile", "triton_kernels", "gelu_epilogue", "fp8_fast_accum")
    ran = {k: summary["settings"][k] for k in switches}
    assert ran == dict.fromkeys(ran, False)
    assert summary["build"]["dit_parameters"] == sum(
        p.numel() for p in random_dit(TINY.dit, "cpu").parameters()
    )
    for name, attention_backend in (("fast", "auto"), ("plain", "default")):
        path = summary["paths"][name]
        assert set(path) == PATH_KEYS
        assert (
            path["engine"]["plain"] == (name == "plain") and path["engine"]["attention"] == attention_backend
        )
        rows = read_timings(out / name / "timings.parquet").to_pylist()
        assert [r["chunk_index"] for r in rows] == [0, 1] and [r["is_warmup"] for r in rows] == [True, False]
        assert {r["job_id"] for r in rows} == {f"bench-{name}"} and {r["attention"] for r in rows} == {
            attention_backend
        }
        assert (path["chunks"], path["warmup_skipped"], path["steady_chunks"]) == (2, 1, 1)
        steady = rows[1]
        assert path["stages"]["generate_next_chunk"]["mean"] == steady["generate_next_chunk_seconds"]
        assert path["dit_seconds_per_chunk"] == pytest.approx(
            steady["denoise_seconds"] + steady["update_cache_seconds"]
        )
        ops = chunk_ops(TINY.dit, frames=1, frame_tokens=4, kv_tokens=2 * 4, passes=5, plain=name == "plain")
        assert path["per_chunk"][1]["kv_frames"] == 2
        assert path["tflop_per_chunk"] == pytest.approx(sum(op.flops for op in ops) / 1e12)
        per_pass = flops_by_category(forward_ops(TINY.dit, frames=1, frame_tokens=4, kv_tokens=2 * 4))
        assert path["tflop_per_pass_by_category"] == pytest.approx({k: v / 1e12 for k, v in per_pass.items()})
        assert path["passes_per_chunk"] == 5
        assert path["achieved_tflops"] == pytest.approx(
            path["tflop_per_chunk"] / path["dit_seconds_per_chunk"]
        )
        assert path["floor_seconds_per_chunk"] > 0
        assert path["floor_fraction"] == pytest.approx(
            path["floor_seconds_per_chunk"] / path["dit_seconds_per_chunk"]
        )
        assert path["peak_memory_bytes"] is None  # a CPU keeps no peak
        assert path["energy_joules_per_chunk"] is path["mean_power_watts"] is None  # nor an energy counter
        assert [c["energy_joules"] for c in path["per_chunk"]] == [None, None]
        assert path["sync_check"] == {"enabled": False, "chunk_index": None, "held": None}
        assert path["profile"]["chunk_index"] == 2 and Path(path["profile"]["trace"]).is_file()
        assert {f["family"] for f in path["profile"]["families"]} >= {"matmul", "attention", "conv"}
    assert summary["paths"]["plain"]["tflop_per_chunk"] > summary["paths"]["fast"]["tflop_per_chunk"]
    assert summary["plain_over_fast"]["generate_next_chunk_seconds"] == pytest.approx(
        summary["paths"]["plain"]["stages"]["generate_next_chunk"]["mean"]
        / summary["paths"]["fast"]["stages"]["generate_next_chunk"]["mean"]
    )
    backends = {a["backend"] for a in summary["kernels"]["attention"]}
    assert backends == {"auto", "default"}


def test_a_failed_sync_check_is_reported_and_the_run_still_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modes: list[str] = []

    def fake_set_mode(mode: str) -> None:  # what CUDA does when a pass synchronises under "error"
        modes.append(mode)
        if mode == "error":
            raise RuntimeError("called a synchronizing CUDA operation")

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", fake_set_mode)
    summary = run_bench(BenchSettings(out=tmp_path, chunks=2, sync_check=True, **TINY_SETTINGS))
    check = summary["paths"]["fast"]["sync_check"]
    assert check["enabled"] and check["chunk_index"] == 1 and check["held"] is False
    assert "synchronizing" in check["error"] and "bench.py" in check["error"]
    assert len(read_timings(tmp_path / "fast" / "timings.parquet")) == 1  # the checked chunk's row is lost
    assert modes[-1] == "default"


def test_settings_that_cannot_run_are_refused_before_any_model_is_built(tmp_path: Path, capsys) -> None:
    assert main(["bench", *TINY_ARGS, "--sync-check", "--out", str(tmp_path)]) == 2
    assert "--sync-check is CUDA's sync debug mode, not for --device cpu" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    for size in ({"height": 24}, {"width": 0}):
        ((side, value),) = size.items()
        with pytest.raises(ValueError, match=f"--{side} {value} is not a positive multiple of 16"):
            BenchSettings(out=tmp_path, device="cpu", **size).resolved()


def test_bad_chunk_counts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--chunks 9, but the video has 4 chunks"):
        run_bench(BenchSettings(out=tmp_path, chunks=9, **TINY_SETTINGS))
    with pytest.raises(ValueError, match="chunks must be >= 1"):
        BenchSettings(out=tmp_path, device="cpu", chunks=0).resolved()


def test_bench_imports_without_the_orchestration_packages() -> None:
    """The GPU box has torch, numpy, pyarrow, safetensors and pillow only."""
    blocked = ["prefect", "pydantic", "yaml", "tqdm", "tokenizers", "imageio_ffmpeg", "matplotlib"]
    code = (
        f"import sys; sys.modules.update(dict.fromkeys({blocked!r}));"
        "import worldgen.bench, worldgen.cli; worldgen.cli.build_parser().parse_args(['bench', '--out', 'x'])"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_bench_with_overlap_times_every_chunk_and_refuses_the_sync_check(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--overlap needs --no-sync-check"):
        BenchSettings(out=tmp_path, overlap=True, sync_check=True, **TINY_SETTINGS).resolved()
    out = tmp_path / "bench"
    with pytest.raises(ValueError, match="one more is needed for --profile"):
        BenchSettings(out=tmp_path, overlap=True, chunks=3, profile=True, **TINY_SETTINGS).resolved()
    assert main(["bench", *TINY_ARGS, "--chunks", "2", "--overlap", "--profile", "--out", str(out)]) == 0
    fast = json.loads((out / "bench.json").read_text())["paths"]["fast"]
    assert fast["engine"]["overlap"] and fast["chunks"] == 2
    assert [row["chunk_index"] for row in fast["per_chunk"]] == [0, 1]
    assert fast["profile"]["chunk_index"] == 3  # chunk 2 was generated ahead by the pipeline


def test_bench_reports_compile_seconds_when_the_fast_path_compiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast engine's resolved `compile` decides (the setting may be None: on for bf16 on CUDA); the
    compilation itself is stood in for, so this checks the report, not torch.compile."""
    monkeypatch.setattr(generator_module, "compile_dit", lambda model: model)
    monkeypatch.setattr(generator_module, "warmup", lambda model, **_: WarmupReport(5.0, 1.0, 4, 3))
    settings = {**TINY_SETTINGS, "chunks": 2, "sync_check": False}
    assert run_bench(BenchSettings(out=tmp_path / "off", **settings))["compile_seconds"] is None
    compiled = run_bench(BenchSettings(out=tmp_path / "on", **settings, compile=True))
    assert compiled["compile_seconds"] == 4.0 and compiled["paths"]["fast"]["engine"]["compile"]


def test_bench_reports_energy_per_chunk_from_the_meter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each chunk's joules are the counter's rise over it (a stand-in counter that rises 7 J per read, and
    fails one read); the mean over the steady chunks, and their joules over the meter's windows around
    them as the mean power. A chunk with a failed read has no joules and stays out of both."""
    readings = iter([0.0, 7.0, 14.0, 21.0, 28.0, 35.0, None, 49.0])
    monkeypatch.setattr(bench_module, "energy_meter", lambda device: lambda: next(readings))
    summary = run_bench(BenchSettings(out=tmp_path, **TINY_SETTINGS, chunks=4, sync_check=False))
    chunks = summary["paths"]["fast"]["per_chunk"]
    assert [c["energy_joules"] for c in chunks] == [7.0, 7.0, 7.0, None]
    fast = summary["paths"]["fast"]
    assert fast["energy_joules_per_chunk"] == 7.0
    metered_seconds = sum(c["energy_seconds"] for c in chunks[1:3])
    assert fast["mean_power_watts"] == pytest.approx(14.0 / metered_seconds)
    # Each window holds its chunk (and the meter's own reads).
    rows = read_timings(tmp_path / "fast" / "timings.parquet").to_pylist()
    assert all(
        c["energy_seconds"] >= r["generate_next_chunk_seconds"] for c, r in zip(chunks, rows, strict=True)
    )


def test_bench_reports_the_fp8_latent_error_against_bf16(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = [
        *TINY_ARGS,
        "--dtype",
        "bfloat16",
        "--chunks",
        "2",
        "--fp8",
        "--no-fp8-fast-accum",
        "--out",
        str(out),
    ]
    assert main(["bench", *args]) == 0
    summary = json.loads((out / "bench.json").read_text())
    errors = summary["fp8_latent_error"]
    assert len(errors) == 3 and all(0 < error < 0.5 for error in errors)
    engine = summary["paths"]["fast"]["engine"]
    assert engine["fp8"] and engine["fp8_fast_accum"] is False
    fp8_matmuls = [m for m in summary["kernels"]["matmul"] if m["fp8"]]
    assert fp8_matmuls and not any(m["fast_accum"] for m in fp8_matmuls)
