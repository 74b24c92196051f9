"""Render one job into its output folder: `OUT/<job_id>/{video.mp4, timings.parquet, job.json}`, its prompt's
text embedding into `OUT/.prompt-cache/` (shared by every job under OUT).

Every file is written to a temp name and renamed into place; `job.json` comes last and is the "done"
marker: it holds the job's settings hash and the outputs it vouches for, and a job whose marker matches,
with those outputs present, is skipped. A re-render leaves the previous finished render whole until its own
files are complete under their temp names: only then does the old marker go, before the first new file is
renamed into place.
A crash or a kill at any point leaves the previous finished render, or a folder without a marker (which the
next run renders again), never a half-written file under a final name.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

import worldgen
from worldgen.config import PRESETS, Job, job_settings_hash, job_to_dict
from worldgen.files import atomic_output, remove_stale_temps, temp_glob
from worldgen.generator import Chunk, ChunkedGenerator, EngineSettings
from worldgen.profiling import device_environment, named_range, profile_ranges
from worldgen.timing import DEFAULT_WARMUP_CHUNKS, TimingLog
from worldgen.video import VideoWriter

MARKER = "job.json"
VIDEO = "video.mp4"
TIMINGS = "timings.parquet"
# The temps a killed render leaves: worldgen.files' names, and those of the writers before it (to 2026-11-30:
# `.NAME.*.tmp`, the video's `.video.*.mp4.tmp`), which name no writer and go once idle.
_TEMPS = (
    *(pattern for name in (VIDEO, TIMINGS, MARKER) for pattern in (temp_glob(name), f".{name}.*.tmp")),
    ".video.*.mp4.tmp",
)
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


def _outputs(write_video: bool) -> list[str]:
    return [TIMINGS, VIDEO] if write_video else [TIMINGS]


def _paths(job_dir: Path, outputs: list[str]) -> dict[str, str | None]:
    """Where a render's results are, as the caller named the output folder (never stored: folders move)."""
    return {"job_dir": str(job_dir), "video": str(job_dir / VIDEO) if VIDEO in outputs else None}


def _skipped(job: Job, job_dir: Path, settings_hash: str, write_video: bool) -> dict[str, Any] | None:
    """The skip result of `job` if its done-marker matches `settings_hash` and vouches for the outputs this
    run wants (a render without video does not count for one with), all present."""
    try:
        marker = json.loads((job_dir / MARKER).read_text())
        outputs = list(marker["outputs"])
        if marker["settings_hash"] != settings_hash:
            return None
    except (OSError, ValueError, KeyError, TypeError):  # no marker, or not one of ours
        return None
    wanted = _outputs(write_video)
    if not set(wanted) <= set(outputs) or not all((job_dir / name).is_file() for name in wanted):
        return None
    present = [name for name in outputs if (job_dir / name).is_file()]
    return {"job_id": job.job_id, "status": "skipped", **marker["result"], **_paths(job_dir, present)}


def remove_killed_renders_temps(job_dir: Path) -> None:
    """Remove the temp files that killed renders of the job left (worldgen.files.remove_stale_temps)."""
    remove_stale_temps(job_dir, _TEMPS)


def _replace_outputs(job_dir: Path, writer: VideoWriter | None, log: TimingLog) -> None:
    """Put the new render's files in place of the previous one's. Every new file is complete under its temp
    name by now, so only renames remain: the old marker goes first (a folder without one is rendered again by
    the next run, whatever mix of files a kill in here leaves), and so does an old video this run does not
    replace."""
    with atomic_output(job_dir / TIMINGS) as timings:
        log.save(timings)
        (job_dir / MARKER).unlink(missing_ok=True)
        if writer:
            writer.publish()
        else:
            (job_dir / VIDEO).unlink(missing_ok=True)


def finished_result(
    job: Job, out_dir: Path, engine: EngineSettings, write_video: bool = True
) -> dict[str, Any] | None:
    """The result of `job` if it is already rendered under `out_dir` with these settings (and a video, when
    `write_video`), else None.

    Needs no model: a batch can tell what is left to do before loading anything.
    """
    return _skipped(job, Path(out_dir) / job.job_id, render_settings_hash(job, engine), write_video)


def render_job(
    generator: ChunkedGenerator,
    job: Job,
    out_dir: Path,
    *,
    write_video: bool = True,
    warmup_chunks: int = DEFAULT_WARMUP_CHUNKS,
    progress: bool = True,
    force: bool = False,
    on_chunk: Callable[[Chunk, int], None] | None = None,
) -> dict[str, Any]:
    """Render `job` into `out_dir/<job_id>/` unless its marker says it is done; a small result dict.

    `progress` draws a progress bar on the terminal; `on_chunk(chunk, num_chunks)` is called after each
    chunk is written (a flow logs it)."""
    job_dir = Path(out_dir) / job.job_id
    settings_hash = render_settings_hash(job, generator.settings)
    if not force and (skipped := _skipped(job, job_dir, settings_hash, write_video)):
        remove_killed_renders_temps(job_dir)  # say, of a forced re-render that left this render whole
        return skipped
    job_dir.mkdir(parents=True, exist_ok=True)

    run_id = uuid.uuid4().hex
    writer: VideoWriter | None = None
    try:
        # WORLDGEN_PROFILE selects the ranges traced by the torch profiler (none by default).
        with profile_ranges(job_dir / "traces"), named_range("workloop"):
            started = time.perf_counter()
            runtime = generator.create_runtime(job, Path(out_dir) / PROMPT_CACHE)
            create_seconds = time.perf_counter() - started
            log = TimingLog(settings={"job": job_to_dict(job), **runtime.settings, "run_id": run_id})
            run = runtime.run_info(run_id)
            if write_video:
                writer = VideoWriter(
                    job_dir / VIDEO,
                    height=runtime.height,
                    width=runtime.width,
                    fps=job.fps,
                    expected_frames=runtime.video_frames,
                )
                writer.open()
            with tqdm(total=runtime.num_chunks, desc=job.job_id, unit="chunk", disable=not progress) as bar:
                for chunk in runtime.chunks():
                    write_started = time.perf_counter()
                    if writer:
                        writer.write(chunk.frames)
                    write_seconds = time.perf_counter() - write_started
                    log.append(chunk.timing_row(run, write_seconds, warmup_chunks))
                    bar.update()
                    if on_chunk:
                        on_chunk(chunk, runtime.num_chunks)
            if writer:
                writer.finish()  # checked, under its temp name: the previous render is still the finished one
        _replace_outputs(job_dir, writer, log)
    except BaseException:
        if writer:
            writer.abort()  # removes its temp file (nothing once it is published)
        raise
    summary = log.summary(warmup_chunks)
    steady = summary.stages.get("generate_next_chunk")
    result = {
        "chunks": runtime.num_chunks,
        "video_frames": runtime.video_frames,
        "create_runtime_seconds": create_seconds,
        "steady_seconds_per_chunk": steady.mean if steady else None,
        "warmup_chunks_skipped": summary.warmup_skipped,
    }
    outputs = _outputs(write_video)
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
    remove_killed_renders_temps(job_dir)
    return {"job_id": job.job_id, "status": "rendered", **result, **_paths(job_dir, outputs)}
