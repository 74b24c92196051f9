"""Full-size benchmark with seeded random weights: seconds per chunk against the FLOP count and a floor.

    PYTHONPATH=. python -m worldgen.cli bench --compare plain --out OUT/bench

The default configuration is the one of the published 2.862 s/chunk figure: `lingbot-world-fast` built
directly on the GPU with random weights (`models/random_init.py`), a synthetic 832x480 image (1560 tokens
per latent frame) and a smooth synthetic camera path, frame_num 201, chunk_size 3, local_attn_size 21,
sink_size 3, 4 denoising passes + the cache-update pass, no video writing, the first chunk a warm-up.

What it writes under OUT: `<path>/timings.parquet` (one row per timed chunk, the project's timing schema)
for the `fast` path and, with `--compare plain`, the `plain` path (the yardstick: PyTorch's default
attention dispatch, text K/V and camera modulation recomputed every pass, NCDHW Conv3d inputs), and
`bench.json` (see docs/benchmarks.md for its keys):
- steady-state mean and p90 of every stage, peak GPU memory, and on an NVIDIA GPU the energy per chunk
  and the mean power over the chunks (NVML's counter, `profiling.energy_meter`);
- DiT FLOPs per chunk counted from the shapes (`chunk_ops`), with each chunk's real KV length, and the
  achieved TFLOP/s over the DiT stages (denoise + cache update);
- the floor: the same GEMMs and attention calls timed one by one on the spot (`KernelClock`), summed;
  and the fraction of it reached;
- plain/fast ratios; with `--profile` a torch profiler trace of one extra chunk per path and its kernel
  time by family; on CUDA a check that one chunk's DiT passes never synchronise with the host.

Runs where only torch, numpy, pyarrow, safetensors and pillow are installed: no text encoder (a seeded
random text embedding stands in), no video writer, no progress bar.
"""

from __future__ import annotations

import json
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from worldgen.config import DiTConfig, Job, get_preset, job_to_dict
from worldgen.control import SIZE_MULTIPLE, latent_frame_count
from worldgen.floor import CATEGORIES, KernelClock, chunk_ops, flops_by_category, forward_ops
from worldgen.generator import DTYPES, ChunkedGenerator, EngineSettings, Runtime, parse_device
from worldgen.models.dit import CausalDiT
from worldgen.models.random_init import random_dit, random_vae
from worldgen.models.text import PromptEmbeddingCache
from worldgen.models.vae import WanVAE
from worldgen.profiling import (
    ProfilerSettings,
    device_environment,
    energy_meter,
    peak_memory_bytes,
    profile_ranges,
    reset_peak_memory,
    summarize_trace,
)
from worldgen.quant import fp8_error
from worldgen.timing import TimingLog, atomic_output

SUMMARY_FILE = "bench.json"
TIMINGS_FILE = "timings.parquet"
PLAIN_ATTENTION = "default"  # the plain path's attention: PyTorch's own SDPA dispatch
# Calibration of the synthetic intrinsics (fx, fy, cx, cy) at the default intrinsics_size 832x480.
SYNTHETIC_INTRINSICS = (500.0, 500.0, 416.0, 240.0)
_SYNC_ERROR = "synchronizing"  # in torch's message for a sync under set_sync_debug_mode("error")


@dataclass(frozen=True)
class BenchSettings:
    out: Path
    preset: str = "lingbot-world-fast"
    device: str = "cuda"
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 on CPU
    vae_dtype: str | None = None  # the fast path's (EngineSettings' default); the plain path keeps float32
    attention: str = "auto"  # the fast path's backend; the plain path always uses PyTorch's default
    height: int = 480
    width: int = 832
    frame_num: int = 201
    chunk_size: int = 3
    window: int = 21  # local_attn_size, latent frames
    sink: int = 3
    chunks: int | None = None  # time only the first N chunks; None: the whole video
    warmup_chunks: int = 1
    seed: int = 0  # the job's noise seed
    weights_seed: int = 0
    compare_plain: bool = False
    # The fast path's switches; None: EngineSettings' default (on for bf16 on CUDA). The plain path has none.
    compile: bool | None = None  # the blocks compiled
    fp8: bool = False  # the token-wise matmuls in fp8
    fp8_fast_accum: bool = True  # their kernel's fast accumulation (the floor's fp8 GEMMs run the same)
    triton_kernels: bool | None = None  # Triton kernels (DiT norms, fp8 quantisation, VAE norms)
    gelu_epilogue: bool | None = None  # the FFN GELU in the GEMM epilogue
    overlap: bool = False  # the fast path decodes chunk i on a side stream during chunk i+1's DiT
    profile: bool = False
    sync_check: bool | None = None  # None: on for CUDA (the check needs CUDA's sync debug mode)

    def resolved(self) -> BenchSettings:
        """These settings checked, with the device-dependent defaults filled in."""
        device = parse_device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"bench: device {self.device!r} but no CUDA device is available "
                "(a CPU dry run: --device cpu --preset tiny with small sizes)"
            )
        for side, pixels in (("height", self.height), ("width", self.width)):
            if pixels < SIZE_MULTIPLE or pixels % SIZE_MULTIPLE:
                raise ValueError(f"bench: --{side} {pixels} is not a positive multiple of {SIZE_MULTIPLE}")
        if self.chunks is not None and self.chunks < 1:
            raise ValueError(f"bench: chunks must be >= 1, got {self.chunks}")
        self.timed_chunks()  # raises on a bad chunk count before any model is built
        sync_check = device.type == "cuda" if self.sync_check is None else self.sync_check
        if self.overlap and sync_check:
            # Sync debug mode is process-wide: the decode thread's host copy would trip it mid-pass.
            raise ValueError("bench: --overlap needs --no-sync-check (check the DiT without overlap)")
        fast = self.engine()  # the fast path's switches as they will run (bench.json records these)
        return replace(
            self,
            out=Path(self.out),
            sync_check=sync_check,
            compile=fast.compile,
            triton_kernels=fast.triton_kernels,
            gelu_epilogue=fast.gelu_epilogue,
            fp8_fast_accum=fast.fp8_fast_accum,
        )

    @property
    def eight_bit(self) -> bool:
        """The fast path runs fp8 matmuls or fp8 attention: the bench reports its error against bf16."""
        return self.fp8 or self.attention == "fp8"

    def timed_chunks(self) -> int:
        """Chunks timed per path: `chunks`, or all of the video (all but the last one with `profile`)."""
        video_chunks = latent_frame_count(self.frame_num, self.chunk_size) // self.chunk_size
        # --profile runs one more chunk, after the one an overlapped pipeline has already generated ahead.
        available = video_chunks - (1 + self.overlap if self.profile else 0)
        if self.chunks is not None and self.chunks > available:
            raise ValueError(
                f"bench: --chunks {self.chunks}, but the video has {video_chunks} chunks"
                + (" (one more is needed for --profile)" if self.profile else "")
            )
        if available < 1:
            raise ValueError(f"bench: the video has {video_chunks} chunk(s); --profile needs at least 2")
        return self.chunks or available

    def engine(self, plain: bool = False) -> EngineSettings:
        """The generator settings of the fast path, or of the plain path with `plain`."""
        return EngineSettings(
            model=self.preset,
            device=self.device,
            dtype=self.dtype,
            vae_dtype=None if plain else self.vae_dtype,
            attention=PLAIN_ATTENTION if plain else self.attention,
            plain=plain,
            compile=False if plain else self.compile,
            fp8=self.fp8 and not plain,
            fp8_fast_accum=self.fp8_fast_accum,
            triton_kernels=False if plain else self.triton_kernels,
            gelu_epilogue=False if plain else self.gelu_epilogue,
            overlap=self.overlap and not plain,
            weights_seed=self.weights_seed,
        ).resolved()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "out": str(self.out)}


# --------------------------------------------------------------------------------- synthetic inputs
def write_inputs(folder: Path, settings: BenchSettings, control_type: str) -> Job:
    """A smooth synthetic image of the output size, a smooth camera path (and key presses in action mode)."""
    height, width, frames = settings.height, settings.width, settings.frame_num
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = cols / max(width - 1, 1), rows / max(height - 1, 1)
    rgb = np.stack([u, v, 0.5 + 0.5 * np.sin(6 * u + 4 * v)], axis=-1)
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(folder / "image.png")

    # A slow yaw sway while moving forward and side to side: smooth, rigid, non-trivial.
    phase = 2 * np.pi * np.arange(frames) / max(frames - 1, 1)
    yaw = 0.25 * np.sin(phase)
    poses = np.tile(np.eye(4), (frames, 1, 1))
    poses[:, 0, 0], poses[:, 0, 2] = np.cos(yaw), np.sin(yaw)
    poses[:, 2, 0], poses[:, 2, 2] = -np.sin(yaw), np.cos(yaw)
    poses[:, 0, 3], poses[:, 2, 3] = 0.3 * np.sin(phase), 2.0 * phase / (2 * np.pi)
    np.save(folder / "poses.npy", poses.astype(np.float32))
    np.save(folder / "intrinsics.npy", np.tile(np.float32(SYNTHETIC_INTRINSICS), (frames, 1)))
    actions = None
    if control_type == "act":  # w held throughout, a in the first third, d in the last third
        keys = np.zeros((frames, 4), dtype=np.float32)
        keys[:, 0] = 1
        keys[: frames // 3, 1] = 1
        keys[2 * frames // 3 :, 3] = 1
        np.save(folder / "actions.npy", keys)
        actions = str(folder / "actions.npy")
    return Job(
        job_id="bench",
        prompt="benchmark",
        image=str(folder / "image.png"),
        poses=str(folder / "poses.npy"),
        intrinsics=str(folder / "intrinsics.npy"),
        actions=actions,
        frame_num=frames,
        chunk_size=settings.chunk_size,
        local_attn_size=settings.window,
        sink_size=settings.sink,
        seed=settings.seed,
        height=height,
        width=width,
    )


def random_text(config: DiTConfig, seed: int) -> Tensor:
    """A seeded stand-in for the umT5 output of one prompt: [text_len, text_dim] float32 on the host."""
    return torch.randn(config.text_len, config.text_dim, generator=torch.Generator().manual_seed(seed))


def bench_generator(
    engine: EngineSettings, models: tuple[CausalDiT, WanVAE], text: Tensor, job: Job, prompt_cache: Path
) -> ChunkedGenerator:
    """A generator over the shared models, with the job's random text embedding stored in `prompt_cache` under
    its encoder identity: a runtime created with that folder runs the real prompt path and no text encoder
    (or tokenizer) is ever loaded."""
    generator = ChunkedGenerator(engine, models=models)
    cache = PromptEmbeddingCache(prompt_cache, generator.encoder_identity)
    cache.store(job.prompt, text, num_tokens=text.shape[0])
    return generator


# ------------------------------------------------------------------------------------ sync check
@contextmanager
def dit_sync_check(
    dit: CausalDiT, denoising_steps: int, set_mode: Callable[[str], None] | None = None
) -> Iterator[None]:
    """CUDA sync debug mode "error" around the DiT passes of the one chunk generated inside the block.

    On from the start of the first denoising pass to the end of the last one (the x0 prediction and
    re-noising between passes included), and around the cache-update pass (a whole forward on the plain
    path, `update_cache` on the fast one); the stage timer's deliberate synchronisation between denoising
    and cache update falls outside. Any device-to-host sync in there (`.item()`, a blocking copy, ...)
    raises a RuntimeError. `set_mode`: torch.cuda.set_sync_debug_mode.
    """
    set_mode = set_mode or torch.cuda.set_sync_debug_mode
    passes = 0

    def before_pass(*_: object) -> None:
        set_mode("error")

    def after_pass(*_: object) -> None:
        nonlocal passes
        passes += 1
        if passes >= denoising_steps:
            set_mode("default")

    update_cache = dit.update_cache

    def checked_update_cache(*args: Any, **kwargs: Any) -> None:
        set_mode("error")
        try:
            update_cache(*args, **kwargs)
        finally:
            set_mode("default")

    handles = [dit.register_forward_pre_hook(before_pass), dit.register_forward_hook(after_pass)]
    dit.update_cache = checked_update_cache  # an instance attribute: it shadows the method until removed
    try:
        yield
    finally:
        set_mode("default")
        for handle in handles:
            handle.remove()
        vars(dit).pop("update_cache", None)


def _where(error: BaseException) -> str:
    """The innermost worldgen frame of the error's traceback: where the sync was asked for."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "worldgen" in f.filename]
    if not frames:
        return str(error)
    frame = frames[-1]
    return f"{error} at {frame.filename}:{frame.lineno} in {frame.name}: {frame.line}"


# ------------------------------------------------------------------------------------- one path
@dataclass
class PathRun:
    """What one path's run recorded."""

    name: str
    engine: EngineSettings
    passes: int  # DiT forwards per chunk
    create_runtime_seconds: float
    log: TimingLog
    timings: Path
    frame_tokens: int  # DiT tokens per latent frame
    sync_check: dict[str, Any]
    profile: dict[str, Any] | None
    # Per row of `log`, the energy meter's window around that chunk: (joules or None where a read failed,
    # seconds); None without a meter.
    energy: list[tuple[float | None, float]] | None


def _profile_chunk(runtime: Runtime, out_dir: Path, name: str) -> dict[str, Any]:
    """Run the next chunk under the torch profiler; its trace and kernel time by family."""
    profiler_settings = replace(ProfilerSettings.from_env(), ranges=frozenset({"generate_next_chunk"}))
    with profile_ranges(out_dir / "trace", profiler_settings) as profiler:
        chunk = runtime.generate_next_chunk()
    assert profiler.last_profile is not None
    table = summarize_trace(profiler.last_profile)
    top = "\n".join(
        f"{k.seconds * 1e3:>10.3f} ms {k.count:>5}x  {k.family:<11} {k.name[:90]}" for k in table.kernels
    )
    print(f"{name} path, chunk {chunk.index} under the profiler:\n{table.format()}\n{top}", flush=True)
    return {
        "chunk_index": chunk.index,
        "trace": str(profiler.traces[-1]),
        "source": table.source,
        "families": [asdict(family) for family in table.families],
        "top_kernels": [asdict(kernel) for kernel in table.kernels],
    }


def run_path(
    name: str,
    generator: ChunkedGenerator,
    job: Job,
    prompt_cache: Path,
    settings: BenchSettings,
    run_id: str,
) -> PathRun:
    """Render the timed chunks of `job` (then the sync check's and profiler's); write the Parquet."""
    out_dir = settings.out / name
    out_dir.mkdir(parents=True, exist_ok=True)
    job = replace(job, job_id=f"bench-{name}")
    started = time.perf_counter()
    runtime = generator.create_runtime(job, prompt_cache)
    create_seconds = time.perf_counter() - started
    timed = settings.timed_chunks()
    run = runtime.run_info(run_id)
    log = TimingLog(
        {"job": job_to_dict(job), **runtime.settings, "run_id": run_id, "bench": settings.to_dict()}
    )
    # The check runs on the last timed chunk: if it fails, only that chunk's row is lost.
    checked_chunk = timed - 1 if settings.sync_check else None
    sync: dict[str, Any] = {"enabled": bool(settings.sync_check), "chunk_index": checked_chunk, "held": None}
    # With overlap, chunk i's decode runs during chunk i+1's DiT: the chunks come from the pipelined iterator.
    pipelined = runtime.chunks() if generator.settings.overlap else None
    meter = energy_meter(generator.device)
    energy: list[tuple[float | None, float]] = []
    for index in range(timed):
        checked = index == checked_chunk
        joules_before, window_started = meter() if meter else None, time.perf_counter()
        try:
            with dit_sync_check(generator.dit, len(runtime.schedule)) if checked else nullcontext():
                chunk = next(pipelined) if pipelined else runtime.generate_next_chunk()
        except RuntimeError as error:
            if not checked or _SYNC_ERROR not in str(error):
                raise
            sync.update(held=False, error=_where(error))
            print(f"{name} path: a DiT pass synchronised with the host: {sync['error']}", flush=True)
            break
        if checked:
            sync["held"] = True
        if meter:  # the chunk's frames are on the host (with --overlap, the next chunk's DiT has begun)
            joules_after = meter()
            spent = None if joules_before is None or joules_after is None else joules_after - joules_before
            energy.append((spent, time.perf_counter() - window_started))
        log.append(chunk.timing_row(run, 0.0, settings.warmup_chunks))  # video writing is off
        print(f"{name} chunk {chunk.index}: {chunk.seconds['generate_next_chunk']:.3f} s", flush=True)
    if pipelined:
        pipelined.close()  # waits for the decode in flight
    profile = (
        _profile_chunk(runtime, out_dir, name) if settings.profile and sync["held"] is not False else None
    )
    timings = log.write(out_dir / TIMINGS_FILE)
    stride = generator.vae.config.spatial_stride
    return PathRun(
        name=name,
        engine=generator.settings,
        passes=len(runtime.schedule) + 1,
        create_runtime_seconds=create_seconds,
        log=log,
        timings=timings,
        frame_tokens=generator.dit.frame_tokens(runtime.height // stride, runtime.width // stride),
        sync_check=sync,
        profile=profile,
        energy=energy if meter else None,
    )


# ------------------------------------------------------------------------------------- figures
def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def _tflop(flops: dict[str, int]) -> dict[str, float]:
    return {category: value / 1e12 for category, value in flops.items()}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def path_figures(run: PathRun, config: DiTConfig, clock: KernelClock, warmup_chunks: int) -> dict[str, Any]:
    """The JSON summary of one path: stages, FLOPs, achieved TFLOP/s, floor and its fraction, memory."""
    summary = run.log.summary(warmup_chunks)
    chunks = []
    energy = run.energy or [(None, None)] * len(run.log.rows)
    for row, (joules, energy_seconds) in zip(run.log.rows, energy, strict=True):
        shape = {
            "frames": row.latent_frames,
            "frame_tokens": run.frame_tokens,
            "kv_tokens": row.kv_frames * run.frame_tokens,
        }
        ops = chunk_ops(config, **shape, passes=run.passes, plain=run.engine.plain)
        flops = flops_by_category(ops)
        chunks.append(
            {
                "chunk_index": row.chunk_index,
                "kv_frames": row.kv_frames,
                "dit_seconds": row.denoise_seconds + row.update_cache_seconds,
                "tflop": sum(flops.values()) / 1e12,
                "tflop_by_category": _tflop(flops),
                # One forward with everything computed in it, as the plain path's passes are.
                "tflop_per_pass_by_category": _tflop(flops_by_category(forward_ops(config, **shape))),
                "floor_seconds": clock.floor_seconds(ops, run.engine.attention, run.engine.fp8),
                "energy_joules": joules,
                "energy_seconds": energy_seconds,  # the meter's window: the chunk and the reads around it
            }
        )
    steady = [c for c in chunks if c["chunk_index"] >= warmup_chunks]
    metered = [c for c in steady if c["energy_joules"] is not None]
    dit_seconds = sum(c["dit_seconds"] for c in steady)
    tflop = sum(c["tflop"] for c in steady)
    floor = sum(c["floor_seconds"] for c in steady)
    peaks = [row.peak_memory_bytes for row in run.log.rows if row.peak_memory_bytes is not None]
    return {
        "engine": run.engine.to_dict(),
        "timings": str(run.timings),
        "create_runtime_seconds": run.create_runtime_seconds,
        "chunks": summary.chunks,
        "warmup_skipped": summary.warmup_skipped,
        "steady_chunks": summary.steady_chunks,
        "passes_per_chunk": run.passes,
        "stages": {stage: asdict(stats) for stage, stats in summary.stages.items()},
        "frames_per_second": summary.frames_per_second,
        "dit_seconds_per_chunk": _mean([c["dit_seconds"] for c in steady]),
        "tflop_per_chunk": _mean([c["tflop"] for c in steady]),
        "tflop_per_chunk_by_category": {
            category: _mean([c["tflop_by_category"][category] for c in steady]) for category in CATEGORIES
        },
        "tflop_per_pass_by_category": {
            category: _mean([c["tflop_per_pass_by_category"][category] for c in steady])
            for category in CATEGORIES
        },
        "achieved_tflops": _ratio(tflop, dit_seconds),
        "floor_seconds_per_chunk": _mean([c["floor_seconds"] for c in steady]),
        "floor_fraction": _ratio(floor, dit_seconds),
        "peak_memory_bytes": max(peaks) if peaks else None,
        # On a GPU at its power cap, seconds follow joules: less energy per chunk is the way to less time.
        "energy_joules_per_chunk": _mean([c["energy_joules"] for c in metered]),
        "mean_power_watts": _ratio(
            sum(c["energy_joules"] for c in metered), sum(c["energy_seconds"] for c in metered)
        ),
        "sync_check": run.sync_check,
        "profile": run.profile,
        "per_chunk": chunks,
    }


def _plain_over_fast(fast: dict[str, Any], plain: dict[str, Any]) -> dict[str, float | None]:
    """plain / fast of every steady stage mean, the DiT seconds and the peak memory (> 1: fast is better)."""
    ratios = {
        f"{stage}_seconds": _ratio(plain["stages"][stage]["mean"], fast["stages"][stage]["mean"])
        for stage in fast["stages"]
        if stage in plain["stages"]
    }
    for key in ("dit_seconds_per_chunk", "peak_memory_bytes"):
        ratios[key] = _ratio(plain[key], fast[key])
    return ratios


def _environment(device: torch.device) -> dict[str, Any]:
    environment: dict[str, Any] = dict(device_environment(device))
    if device.type == "cuda":
        environment.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return environment


def _models_info(dit: nn.Module, vae: nn.Module) -> dict[str, int]:
    def count(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    return {
        "dit_parameters": count(dit),
        "dit_bytes": sum(p.numel() * p.element_size() for p in dit.parameters()),
        "vae_parameters": count(vae),
    }


ERROR_CHUNKS = 3  # chunks compared for the fp8 error: the error of later chunks builds on earlier ones


def first_latents(
    generator: ChunkedGenerator, job: Job, prompt_cache: Path, chunks: int = ERROR_CHUNKS
) -> list[Tensor]:
    """The clean latents of the first `chunks` chunks of `job`, on the host."""
    runtime = generator.create_runtime(replace(job, job_id=f"{job.job_id}-error"), prompt_cache)
    return [runtime.generate_next_chunk().latent.cpu() for _ in range(min(chunks, runtime.num_chunks))]


def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Build the models once, run the fast path (and the plain one), measure the kernels, write the results.

    Returns the summary also written to OUT/bench.json.
    """
    settings = settings.resolved()
    settings.out.mkdir(parents=True, exist_ok=True)
    # The plain path runs first: compiling and fp8 change the shared DiT in place for the fast path.
    engines = {"plain": settings.engine(plain=True)} if settings.compare_plain else {}
    engines["fast"] = settings.engine()
    device, dtype = torch.device(engines["fast"].device), DTYPES[engines["fast"].dtype]
    preset = get_preset(settings.preset)

    reset_peak_memory(device)
    started = time.perf_counter()
    dit = random_dit(preset.dit, device, dtype, settings.weights_seed)
    vae = random_vae(preset.vae, device, seed=settings.weights_seed)
    build = {
        "seconds": time.perf_counter() - started,
        "peak_memory_bytes": peak_memory_bytes(device),
        **_models_info(dit, vae),
    }
    text = random_text(preset.dit, settings.seed)
    run_id = uuid.uuid4().hex
    runs = {}
    with tempfile.TemporaryDirectory(prefix="worldgen-bench-") as inputs:
        job = write_inputs(Path(inputs), settings, preset.dit.control_type)
        prompts = Path(inputs) / "prompts"
        if settings.eight_bit:  # the bf16 reference runs before fp8 replaces the shared DiT's layers
            exact = "auto" if settings.attention == "fp8" else engines["fast"].attention  # as bf16 kernels
            bf16 = replace(
                engines["fast"],
                compile=False,
                fp8=False,
                triton_kernels=False,
                gelu_epilogue=False,
                overlap=False,
                attention=exact,
            )
            reference = first_latents(bench_generator(bf16, (dit, vae), text, job, prompts), job, prompts)
        for name, engine in engines.items():
            generator = bench_generator(engine, (dit, vae), text, job, prompts)
            if name == "fast" and settings.eight_bit:
                quantised = first_latents(generator, job, prompts)
                fp8_latent_error = [fp8_error(r, q) for r, q in zip(reference, quantised, strict=True)]
            runs[name] = run_path(name, generator, job, prompts, settings, run_id)
            compile_seconds = sum(generator.compile_seconds.values())

    clock = KernelClock(device, dtype, fp8_fast_accum=settings.fp8_fast_accum)
    paths = {name: path_figures(run, preset.dit, clock, settings.warmup_chunks) for name, run in runs.items()}
    text_ops = forward_ops(
        preset.dit, frames=settings.chunk_size, frame_tokens=runs["fast"].frame_tokens, kv_tokens=0
    )
    text_flops = flops_by_category(text_ops)["text"]
    summary = {
        "run_id": run_id,
        "settings": settings.to_dict(),
        "environment": _environment(device),
        "build": build,
        "compile_seconds": compile_seconds if engines["fast"].compile else None,  # before chunk 0
        # Relative L2 of the fast path's clean latents with fp8 matmuls and/or fp8 attention against bf16
        # eager (the same attention backend, `auto` for `fp8`), chunk by chunk, same job and seed.
        "fp8_latent_error": fp8_latent_error if settings.eight_bit else None,
        "text_tflop_per_video": text_flops / 1e12,  # the fast path's once-per-video text K/V
        "kernels": clock.to_dict(),
        "paths": paths,
        "plain_over_fast": _plain_over_fast(paths["fast"], paths["plain"]) if "plain" in paths else None,
    }
    path = settings.out / SUMMARY_FILE
    with atomic_output(path) as temp:
        temp.write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of each path's steady-state figures (seconds per chunk unless marked)."""
    columns = (  # (heading, figure of a path's summary, scale, digits)
        ("chunk s", lambda p: p["stages"].get("generate_next_chunk", {}).get("mean"), 1, 3),
        ("p90", lambda p: p["stages"].get("generate_next_chunk", {}).get("p90"), 1, 3),
        ("denoise", lambda p: p["stages"].get("denoise", {}).get("mean"), 1, 3),
        ("cache", lambda p: p["stages"].get("update_cache", {}).get("mean"), 1, 3),
        ("decode", lambda p: p["stages"].get("decode", {}).get("mean"), 1, 3),
        ("DiT s", lambda p: p["dit_seconds_per_chunk"], 1, 3),
        ("floor s", lambda p: p["floor_seconds_per_chunk"], 1, 3),
        ("floor %", lambda p: p["floor_fraction"], 100, 1),
        ("TFLOP/s", lambda p: p["achieved_tflops"], 1, 1),
        ("peak GB", lambda p: p["peak_memory_bytes"], 1e-9, 1),
        ("J/chunk", lambda p: p["energy_joules_per_chunk"], 1, 0),
        ("W", lambda p: p["mean_power_watts"], 1, 0),
    )
    lines = [" ".join([f"{'path':<6}", *(f"{heading:>8}" for heading, *_ in columns), " sync"])]
    for name, path in summary["paths"].items():
        cells = []
        for _, figure, scale, digits in columns:
            value = figure(path)
            cells.append(f"{'-' if value is None else f'{value * scale:.{digits}f}':>8}")
        sync = path["sync_check"]
        verdict = {True: "held", False: "FAILED", None: "-"}[sync["held"]] if sync["enabled"] else "off"
        lines.append(" ".join([f"{name:<6}", *cells, f" {verdict}"]))
    return "\n".join(lines)
