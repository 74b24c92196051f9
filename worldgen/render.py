"""Render one job into its output folder: `OUT/<job_id>/{video.mp4, timings.parquet, job.json}`, its prompt's
text embedding into `OUT/.prompt-cache/` (shared by every job under OUT).

Every file is written to a temp name and renamed into place; `job.json` comes last and is the "done"
marker: it holds the job's settings hash, and a job whose marker matches is skipped. A crash or a kill at
any point leaves either the previous finished outputs or none, never a half-written file under a final name.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

import worldgen
from worldgen.config import PRESETS, Job, job_settings_hash, job_to_dict
from worldgen.generator import ChunkedGenerator, EngineSettings
from worldgen.profiling import device_environment, named_range, profile_ranges
from worldgen.timing import DEFAULT_WARMUP_CHUNKS, TimingLog, atomic_output
from worldgen.video import VideoWriter

MARKER = "job.json"
VIDEO = "video.mp4"
TIMINGS = "timings.parquet"
PROMPT_CACHE = ".prompt-cache"  # under the output folder: the prompt embeddings of all its jobs


def render_settings_hash(job: Job, engine: EngineSettings) -> str:
    """The job's settings hash extended by what of the engine changes the pixels."""
    engine = engine.resolved()
    identity = {
        "job": job_settings_hash(job),
        "model": engine.model if engine.model in PRESETS else str(Path(engine.model).resolve()),
        "weights_seed": engine.weights_seed,
        "dtype": engine.dtype,
        "vae_dtype": engine.vae_dtype,
        "fp8": engine.fp8,
        "device_type": engine.device.split(":")[0],
    }
    # 8-bit attention rounds like fp8 layers; a choice among the exact kernels leaves the hash as it was,
    # and so do compile, the fused kernels (`triton_kernels`, `gelu_epilogue`) and the fp8 GEMMs'
    # accumulation (`fp8_fast_accum`): they round differently, computing the same functions.
    if engine.attention == "fp8":
        identity["attention"] = "fp8"
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _skipped(job: Job, job_dir: Path, settings_hash: str) -> dict[str, Any] | None:
    """The skip result of `job` if its done-marker matches `settings_hash` and its outputs exist."""
    try:
        marker = json.loads((job_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("settings_hash") != settings_hash:
        return None
    if not all((job_dir / name).is_file() for name in marker.get("outputs", [])):
        return None
    return {"job_id": job.job_id, "status": "skipped", **marker["result"]}


def finished_result(job: Job, out_dir: Path, engine: EngineSettings) -> dict[str, Any] | None:
    """The result of `job` if it is already rendered under `out_dir` with these settings, else None.

    Needs no model: a batch can tell what is left to do before loading anything.
    """
    return _skipped(job, Path(out_dir) / job.job_id, render_settings_hash(job, engine))


def render_job(
    generator: ChunkedGenerator,
    job: Job,
    out_dir: Path,
    *,
    write_video: bool = True,
    warmup_chunks: int = DEFAULT_WARMUP_CHUNKS,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Render `job` into `out_dir/<job_id>/` unless its marker says it is done; a small result dict."""
    job_dir = Path(out_dir) / job.job_id
    settings_hash = render_settings_hash(job, generator.settings)
    if not force and (skipped := _skipped(job, job_dir, settings_hash)):
        return skipped
    job_dir.mkdir(parents=True, exist_ok=True)
    # The old marker no longer describes what the folder will hold: remove it before touching anything.
    (job_dir / MARKER).unlink(missing_ok=True)

    run_id = uuid.uuid4().hex
    # WORLDGEN_PROFILE selects the ranges traced by the torch profiler (none by default).
    with profile_ranges(job_dir / "traces"), named_range("workloop"):
        started = time.perf_counter()
        runtime = generator.create_runtime(job, Path(out_dir) / PROMPT_CACHE)
        create_seconds = time.perf_counter() - started
        log = TimingLog(settings={"job": job_to_dict(job), **runtime.settings, "run_id": run_id})
        run = runtime.run_info(run_id)
        writer = (
            VideoWriter(
                job_dir / VIDEO,
                height=runtime.height,
                width=runtime.width,
                fps=job.fps,
                expected_frames=runtime.video_frames,
            )
            if write_video
            else None
        )
        bar = tqdm(total=runtime.num_chunks, desc=job.job_id, unit="chunk", disable=not progress)
        try:
            if writer:
                writer.open()
            for chunk in runtime.chunks():
                write_started = time.perf_counter()
                if writer:
                    writer.write(chunk.frames)
                write_seconds = time.perf_counter() - write_started
                log.append(chunk.timing_row(run, write_seconds, warmup_chunks))
                bar.update()
            if writer:
                writer.close()
        except BaseException:
            if writer:
                writer.abort()
            raise
        finally:
            bar.close()
    log.write(job_dir / TIMINGS)
    summary = log.summary(warmup_chunks)
    steady = summary.stages.get("generate_next_chunk")
    result = {
        "job_dir": str(job_dir),
        "chunks": runtime.num_chunks,
        "video_frames": runtime.video_frames,
        "video": str(job_dir / VIDEO) if write_video else None,
        "create_runtime_seconds": create_seconds,
        "steady_seconds_per_chunk": steady.mean if steady else None,
        "warmup_chunks_skipped": summary.warmup_skipped,
    }
    outputs = [TIMINGS, VIDEO] if write_video else [TIMINGS]
    marker = {
        "settings_hash": settings_hash,
        "job": job_to_dict(job),
        "settings": runtime.settings,
        "engine": generator.settings.to_dict(),
        "versions": {"worldgen": worldgen.__version__, **device_environment(generator.device)},
        "run_id": run_id,
        "finished_at": datetime.now(UTC).isoformat(),
        "outputs": outputs,
        "result": result,
    }
    with atomic_output(job_dir / MARKER) as temp:
        temp.write_text(json.dumps(marker, indent=2, default=str))
    return {"job_id": job.job_id, "status": "rendered", **result}
