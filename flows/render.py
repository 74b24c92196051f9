"""Prefect flow: render every job of a manifest, resumably, one job at a time per device.

    python -m flows.render manifests/demo.jsonl --out out/demo [--model tiny|PATH] [--device cpu|cuda:0]

The flow validates the whole manifest first (nothing renders when a row is bad), then maps one task per job.
A job whose `job.json` marker matches its settings hash is skipped, so a re-run after a crash or a kill
finishes the batch without redoing work. Tasks take and return paths and small dicts, never tensors; the
generator is loaded once per worker process and reused across jobs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.task_runners import ThreadPoolTaskRunner

from worldgen.config import job_from_dict, job_to_dict
from worldgen.generator import EngineSettings, JobInputError, shared_generator
from worldgen.manifest import load_manifest
from worldgen.render import render_job


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry transient failures (device, I/O); a job whose inputs are wrong fails the same way every time."""
    try:
        state.result()
    except JobInputError:
        return False
    except Exception:
        return True
    return False


@task(
    task_run_name="render-{job[job_id]}",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_unless_bad_input,
)
def render_job_task(
    job: dict[str, Any], out_dir: str, engine: dict[str, Any], write_video: bool = True
) -> dict[str, Any]:
    generator = shared_generator(EngineSettings(**engine))
    result = render_job(generator, job_from_dict(job), Path(out_dir), write_video=write_video, progress=False)
    get_run_logger().info("%s: %s", result["job_id"], result["status"])
    return result


@task(retries=2, retry_delay_seconds=5)
def embed_prompts_task(prompts: list[str], engine: dict[str, Any]) -> int:
    """Fill the prompt-embedding cache for the whole batch with one load of the text encoder."""
    shared_generator(EngineSettings(**engine)).embed_prompts(prompts)
    return len(set(prompts))


def _markdown_summary(results: list[dict[str, Any]], failed: dict[str, str]) -> str:
    lines = [
        "# worldgen batch",
        "",
        "| job | status | chunks | s/chunk (steady) | video |",
        "|---|---|---|---|---|",
    ]
    for row in results:
        seconds = row.get("steady_seconds_per_chunk")
        shown = f"{seconds:.3f}" if seconds is not None else "-"
        cells = [row["job_id"], row["status"], row.get("chunks", "-"), shown, row.get("video") or "-"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += [f"| {job_id} | failed: {reason} | - | - | - |" for job_id, reason in failed.items()]
    return "\n".join(lines)


# One worker thread: jobs on one device run one after another, sharing the loaded model. The Ray runner
# swaps in a task runner with one worker per GPU.
@flow(name="render-manifest", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def render_manifest(
    manifest: str,
    out_dir: str,
    model: str = "tiny",
    device: str = "cpu",
    dtype: str | None = None,
    attention: str = "auto",
    write_video: bool = True,
) -> list[dict[str, Any]]:
    """Render every job of `manifest` into `out_dir/<job_id>/`; fail naming the jobs that failed."""
    jobs = load_manifest(manifest)
    engine = EngineSettings(
        model=model,
        device=device,
        dtype=dtype,
        attention=attention,
        prompt_cache=str(Path(out_dir) / ".prompt-cache"),
    ).resolved()
    progress = create_progress_artifact(progress=0.0, description=f"{len(jobs)} jobs from {manifest}")
    embed_prompts_task([job.prompt for job in jobs], engine.to_dict())
    futures = [
        render_job_task.submit(job_to_dict(job), out_dir, engine.to_dict(), write_video) for job in jobs
    ]
    results: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    for finished, (job, future) in enumerate(zip(jobs, futures, strict=True), start=1):
        future.wait()
        if future.state.is_completed():
            results.append(future.result())
        else:
            failed[job.job_id] = future.state.message or future.state.name
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.render", description=render_manifest.__doc__)
    parser.add_argument("manifest", help="JSONL or YAML manifest of jobs")
    parser.add_argument("--out", required=True, help="output folder; one subfolder per job")
    parser.add_argument("--model", default="tiny", help="preset name or checkpoint folder (default: tiny)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: per device)")
    parser.add_argument("--attention", default="auto", help="auto|cudnn|flash|efficient|math")
    parser.add_argument("--no-write-video", dest="write_video", action="store_false")
    args = parser.parse_args(argv)
    state = render_manifest(
        args.manifest,
        args.out,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        attention=args.attention,
        write_video=args.write_video,
        return_state=True,
    )
    if not state.is_completed():
        print(f"render-manifest failed: {state.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
