"""Prefect flow: render every job of a manifest, resumably, one job at a time per device.

    python -m flows.render manifests/demo.jsonl --out out/demo [--model tiny|PATH] [--device cpu|cuda:0]
    python -m flows.render MANIFEST --out DIR --device cuda --runner ray --ray-address auto

The flow validates the whole manifest first (nothing renders when a row is bad), then maps one task per job.
A job whose `job.json` marker matches its settings hash is skipped, so a re-run after a crash or a kill
finishes the batch without redoing work. Tasks take and return paths and small dicts, never tensors; the
generator is loaded once per worker process and reused across jobs. The `ray` runner renders on a Ray
cluster, one job at a time per long-lived worker holding one GPU (flows/ray_runner.py).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.settings import PREFECT_API_URL
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows import exit_status
from worldgen.cli import add_engine_arguments, engine_options
from worldgen.config import Job, job_from_dict, job_to_dict
from worldgen.generator import (
    Chunk,
    EngineSettings,
    check_control_modes,
    generator_loads,
    model_preset,
    shared_generator,
)
from worldgen.manifest import load_manifest
from worldgen.render import PROMPT_CACHE, finished_result, remove_killed_renders_temps, render_job

RUNNERS = ("local", "ray")


def _retry_transient(task, task_run, state) -> bool:
    """Retry transient failures (a device error, I/O); not a ValueError: bad inputs (JobInputError), a bad
    model folder (CheckpointError) or settings this machine cannot run fail the same way every time."""
    try:
        state.result()
    except ValueError:
        return False
    except Exception:
        return True
    return False


@task(
    task_run_name="render-{job[job_id]}",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_transient,
)
def render_job_task(
    job: dict[str, Any], out_dir: str, engine: dict[str, Any], write_video: bool = True
) -> dict[str, Any]:
    started_at = datetime.now(UTC).isoformat()
    settings, job_to_render = EngineSettings(**engine), job_from_dict(job)
    logger = get_run_logger()

    def log_chunk(chunk: Chunk, num_chunks: int) -> None:
        seconds = chunk.seconds["generate_next_chunk"]
        logger.info("%s: chunk %d of %d (%.2f s)", job["job_id"], chunk.index + 1, num_chunks, seconds)

    # A finished job is skipped before any model is loaded.
    result = finished_result(job_to_render, Path(out_dir), settings, write_video)
    if result:
        remove_killed_renders_temps(Path(result["job_dir"]))
    else:
        result = render_job(
            shared_generator(settings),
            job_to_render,
            Path(out_dir),
            write_video=write_video,
            progress=False,
            on_chunk=log_chunk,
        )
    logger.info("%s: %s", result["job_id"], result["status"])
    return {**result, **_worker_record(started_at)}


def _worker_record(started_at: str) -> dict[str, Any]:
    """Which worker ran the task, on which GPU, and how many models its process has loaded so far."""
    return {
        "worker_host": socket.gethostname(),
        "worker_pid": os.getpid(),
        "worker_gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),  # set by Ray for a Ray worker's GPUs
        "model_loads": generator_loads(),
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(),
    }


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_transient)
def embed_prompts_task(prompts: list[str], out_dir: str, engine: dict[str, Any]) -> int:
    """Fill the batch's prompt-embedding cache (the one `render_job` reads) with one load of the text
    encoder."""
    shared_generator(EngineSettings(**engine)).embed_prompts(prompts, Path(out_dir) / PROMPT_CACHE)
    return len(set(prompts))


def _markdown_summary(results: list[dict[str, Any]], failed: dict[str, str]) -> str:
    lines = [
        "# worldgen batch",
        "",
        "| job | status | chunks | s/chunk (steady) | video | worker |",
        "|---|---|---|---|---|---|",
    ]
    for row in results:
        seconds = row.get("steady_seconds_per_chunk")
        shown = f"{seconds:.3f}" if seconds is not None else "-"
        worker = f"{row['worker_host']}:{row['worker_pid']} GPU {row['worker_gpus'] or '-'}"
        cells = [row["job_id"], row["status"], row.get("chunks", "-"), shown, row.get("video") or "-", worker]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    for job_id, reason in failed.items():
        one_line = " ".join(reason.split()).replace("|", "\\|")  # a traceback's lines would break the table
        lines.append(f"| {job_id} | failed: {one_line} | - | - | - | - |")
    return "\n".join(lines)


def _unfinished(jobs: list[Job], out_dir: str, settings: EngineSettings, write_video: bool) -> list[Job]:
    """The jobs not yet rendered under `out_dir` with these settings (their markers say; no model loads)."""
    return [job for job in jobs if not finished_result(job, Path(out_dir), settings, write_video)]


def render_jobs(
    manifest: str, jobs: list[dict[str, Any]], out_dir: str, engine: dict[str, Any], write_video: bool
) -> list[dict[str, Any]]:
    """Submit one task per job to the running flow's task runner; publish the results as artifacts."""
    progress = create_progress_artifact(progress=0.0, description=f"{len(jobs)} jobs from {manifest}")
    # A task like the renders, so that on Ray the text encoder runs on a worker, not on the flow's machine.
    left = _unfinished([job_from_dict(job) for job in jobs], out_dir, EngineSettings(**engine), write_video)
    if left:  # a batch with nothing left to render loads no model at all
        embed_prompts_task.submit([job.prompt for job in left], out_dir, engine).result()
    futures = [render_job_task.submit(job, out_dir, engine, write_video) for job in jobs]
    results: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    for finished, (job, future) in enumerate(zip(jobs, futures, strict=True), start=1):
        future.wait()
        if future.state.is_completed():
            results.append(future.result())
        else:
            failed[job["job_id"]] = future.state.message or future.state.name
        update_progress_artifact(progress, progress=100.0 * finished / len(jobs))
    create_table_artifact(
        table=results
        + [{"job_id": job_id, "status": "failed", "error": why} for job_id, why in failed.items()],
        key="worldgen-jobs",
        description=f"per-job results of {manifest}",
    )
    create_markdown_artifact(markdown=_markdown_summary(results, failed), key="worldgen-batch-summary")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(jobs)} jobs failed: {', '.join(failed)}")
    return results


# The same batch as a subflow, for a task runner chosen at run time (the Ray one).
render_batch = flow(render_jobs, name="render-batch", log_prints=True)


def ray_task_runner(
    engine: EngineSettings, ray_address: str | None, gpus_per_job: float | None, jobs: int
) -> TaskRunner:
    """The task runner of `runner="ray"`, after checking what it needs before any cluster starts."""
    try:
        import prefect_ray  # noqa: F401
        import ray  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            f"runner='ray' needs Ray and prefect-ray: pip install 'worldgen[ray]' ({error})"
        ) from error
    from flows.ray_runner import RayActorTaskRunner, prefect_api_problem

    device = torch.device(engine.device)
    gpus = gpus_per_job if gpus_per_job is not None else float(device.type == "cuda")
    if device.type == "cuda" and gpus <= 0:
        raise ValueError(f"device {engine.device} on Ray needs gpus_per_job > 0, got {gpus_per_job}")
    # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gave the worker: "cuda" is the first of them.
    if device.type == "cuda" and (device.index or 0) >= math.ceil(gpus):
        raise ValueError(
            f"device {engine.device}: a Ray worker sees only the {math.ceil(gpus)} GPU(s) Ray gave it "
            "(use cuda)"
        )
    api_url = PREFECT_API_URL.value()
    if problem := prefect_api_problem(api_url):
        raise RuntimeError(
            f"runner='ray' needs a Prefect server that every Ray worker reaches, but {problem}: start one "
            "(prefect server start --host 0.0.0.0) and set PREFECT_API_URL=http://HOST:4200/api; without it "
            "each worker would start a temporary server of its own"
        )
    return RayActorTaskRunner(
        ray_address,
        max_workers=jobs,
        num_gpus=gpus,
        env_vars={"PREFECT_API_URL": api_url},
        # Every worker loads its model while the others load theirs, before the first job is handed out.
        initializer=functools.partial(shared_generator, engine),
    )


# One worker thread: jobs on one device run one after another, sharing the loaded model. The Ray runner
# renders in a subflow whose task runner has one long-lived worker per GPU.
@flow(name="render-manifest", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def render_manifest(
    manifest: str,
    out_dir: str,
    model: str = "tiny",
    device: str = "cpu",
    dtype: str | None = None,
    vae_dtype: str | None = None,
    attention: str = "auto",
    compile: bool | None = None,
    fp8: bool = False,
    fp8_fast_accum: bool = True,
    triton_kernels: bool | None = None,
    gelu_epilogue: bool | None = None,
    overlap: bool = False,
    write_video: bool = True,
    runner: str = "local",
    ray_address: str | None = None,
    gpus_per_job: float | None = None,
) -> list[dict[str, Any]]:
    """Render every job of `manifest` into `out_dir/<job_id>/`; fail naming the jobs that failed.

    runner="ray" renders on the Ray cluster at `ray_address` ("auto", "ray://HOST:10001", "HOST:PORT", or
    None to start a local one), one job at a time per worker of `gpus_per_job` GPUs (default: 1 on CUDA,
    0 on CPU); PREFECT_API_URL must name a Prefect server that every Ray node reaches. `compile`,
    `triton_kernels` and `gelu_epilogue` left None are on for a bf16 model on CUDA (EngineSettings).
    """
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    # Absolute: Ray workers run in the raylet's folder, not in this one.
    out_dir = str(Path(out_dir).resolve())
    jobs = load_manifest(manifest)
    engine = EngineSettings(
        model=model,
        device=device,
        dtype=dtype,
        vae_dtype=vae_dtype,
        attention=attention,
        compile=compile,
        fp8=fp8,
        fp8_fast_accum=fp8_fast_accum,
        triton_kernels=triton_kernels,
        gelu_epilogue=gelu_epilogue,
        overlap=overlap,
    ).resolved()
    check_control_modes(jobs, model_preset(engine.model))  # no task starts while a job cannot run
    batch = {
        "manifest": manifest,
        "jobs": [job_to_dict(job) for job in jobs],
        "out_dir": out_dir,
        "engine": engine.to_dict(),
        "write_video": write_video,
    }
    if runner == "ray" and (left := _unfinished(jobs, out_dir, engine, write_video)):
        task_runner = ray_task_runner(engine, ray_address, gpus_per_job, jobs=len(left))
        return render_batch.with_options(task_runner=task_runner)(**batch)
    return render_jobs(**batch)  # here; a Ray batch with nothing left starts no worker and loads no model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.render", description=render_manifest.__doc__)
    parser.add_argument("manifest", help="JSONL or YAML manifest of jobs")
    parser.add_argument("--out", required=True, help="output folder; one subfolder per job")
    add_engine_arguments(parser)
    parser.add_argument("--runner", choices=RUNNERS, default="local", help="where tasks run (default: local)")
    parser.add_argument(
        "--ray-address",
        default=None,
        help="auto, ray://HOST:10001 or HOST:PORT (default: start a local cluster)",
    )
    parser.add_argument(
        "--gpus-per-job", type=float, default=None, help="GPUs per Ray worker (default: 1 on CUDA, 0 on CPU)"
    )
    args = parser.parse_args(argv)
    state = render_manifest(
        args.manifest,
        args.out,
        **engine_options(args),
        write_video=args.write_video,
        runner=args.runner,
        ray_address=args.ray_address,
        gpus_per_job=args.gpus_per_job,
        return_state=True,
    )
    return exit_status("render-manifest", state)


if __name__ == "__main__":
    sys.exit(main())
