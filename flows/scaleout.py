"""Batch throughput against GPU count: the same manifest rendered through the Ray runner on 1, 2, ... GPUs.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.scaleout --gpus 1 2 --out OUT \
        --fp8 --attention fp8 --no-write-video

It writes one synthetic manifest of `--jobs` jobs (8 by default) with the benchmark's image and camera path
(worldgen/bench.py) at the benchmark's geometry (832x480, chunk 3, window 21, sink 3), `--frame-num` frames
each (81 = 7 chunks by default) and one seed per job, for the full-size `lingbot-world-fast` with random
weights on CUDA unless `--model`/`--device` say otherwise. For each GPU count K it starts a Ray head on this
machine with K GPUs, renders the manifest with `render_manifest(runner="ray")`, one job at a time per GPU,
into OUT/gpus-K, and stops the cluster. OUT must be new or empty. A GPU count above the machine's GPUs is
an error, not a smaller run.

Every worker should render at least two jobs, so `--jobs` must be at least twice the largest GPU count.
It renders a preset (random weights); a model folder is refused.

Per GPU count, OUT/scaleout.json (rewritten after each count) and the printed table give:
- `render_seconds`: from the first render's start to the last one's end, and `jobs_per_hour` over it. Each
  worker's first job includes compiling the blocks for the job's shape (on CUDA by default).
  `flow_seconds` is all of it: the Ray cluster's start, the workers' model loads, the prompt embedding.
- `steady_jobs_per_hour`: the jobs after each worker's first, over the time from that first job's end to the
  worker's last, summed over workers; none unless each of the K workers rendered at least two jobs.
- `scaling_efficiency`: jobs per hour over K times those of one GPU (render and steady), when 1 is a count.
- per GPU (`cuda_visible_devices`, as Ray set it): its jobs, its first job's seconds, their mean steady
  seconds per chunk, and the models its worker loaded (1 when each worker keeps its model).
The flow needs a Prefect server every Ray worker reaches (PREFECT_API_URL), as `--runner ray` does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from flows.ray_runner import ray_head
from flows.render import render_manifest
from worldgen.bench import BenchSettings, write_inputs
from worldgen.cli import add_engine_arguments, add_geometry_arguments, engine_options, geometry_options
from worldgen.config import PRESETS, get_preset, job_to_dict
from worldgen.generator import EngineSettings
from worldgen.timing import atomic_output

SUMMARY_FILE = "scaleout.json"


def write_manifest(folder: Path, jobs: int, geometry: BenchSettings, model: str) -> Path:
    """`jobs` jobs over one synthetic image and camera path (the benchmark's), seeds 0..jobs-1."""
    folder.mkdir(parents=True, exist_ok=True)
    control_type = get_preset(model).dit.control_type
    job = write_inputs(folder, geometry, control_type)
    rows = [
        {k: v for k, v in job_to_dict(replace(job, job_id=f"scale-{i}", seed=i)).items() if v is not None}
        for i in range(jobs)
    ]
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def _times(row: dict[str, Any]) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(row["started_at"]), datetime.fromisoformat(row["finished_at"])


def _device_order(devices: str) -> tuple[int, str]:
    return len(devices), devices  # "2" before "10"


def measure(results: list[dict[str, Any]], gpus: int, flow_seconds: float) -> dict[str, Any]:
    """Throughput and per-GPU figures of one batch from the flow's per-job results (their worker records)."""
    if not results:
        raise ValueError("no job results to measure")
    not_rendered = sorted(row["job_id"] for row in results if row["status"] != "rendered")
    if not_rendered:
        raise ValueError(
            f"jobs {', '.join(not_rendered)} were not rendered by this run: render into fresh folders"
        )
    starts, ends = zip(*map(_times, results), strict=True)
    render_seconds = (max(ends) - min(starts)).total_seconds()
    per_worker: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in sorted(results, key=lambda row: _times(row)[0]):
        per_worker[row["worker_host"], row["worker_pid"]].append(row)
    steady_rate = 0.0  # jobs per second after each worker's first, summed over workers
    workers = []
    for (host, pid), rows in per_worker.items():
        (first_start, first_end), last_end = _times(rows[0]), _times(rows[-1])[1]
        if len(rows) > 1:
            steady_rate += (len(rows) - 1) / (last_end - first_end).total_seconds()
        chunk_seconds = [row["steady_seconds_per_chunk"] for row in rows if row["steady_seconds_per_chunk"]]
        workers.append(
            {
                "host": host,
                "pid": pid,
                "cuda_visible_devices": rows[0]["worker_gpus"],
                "jobs": len(rows),
                "first_job_seconds": (first_end - first_start).total_seconds(),
                "steady_seconds_per_chunk": statistics.mean(chunk_seconds) if chunk_seconds else None,
                "model_loads": max(row["model_loads"] for row in rows),
            }
        )
    # A worker with one job (or none) adds no steady rate: the sum would understate what K GPUs do.
    steady = len(workers) == gpus and all(worker["jobs"] > 1 for worker in workers)
    return {
        "gpus": gpus,
        "jobs": len(results),
        "workers": len(workers),
        "flow_seconds": flow_seconds,
        "render_seconds": render_seconds,
        "jobs_per_hour": 3600 * len(results) / render_seconds,
        "steady_jobs_per_hour": 3600 * steady_rate if steady else None,
        "per_gpu": sorted(workers, key=lambda worker: _device_order(str(worker["cuda_visible_devices"]))),
    }


def add_scaling(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run with `scaling_efficiency` against the one-GPU run (None without one): jobs per hour over K
    times the one-GPU figure, over the renders and over the steady jobs."""
    single = next((run for run in runs if run["gpus"] == 1), None)

    def efficiency(run: dict[str, Any], key: str) -> float | None:
        if single is None or not run[key] or not single[key]:
            return None
        return run[key] / (run["gpus"] * single[key])

    return [
        {
            **run,
            "scaling_efficiency": {
                "render": efficiency(run, "jobs_per_hour"),
                "steady": efficiency(run, "steady_jobs_per_hour"),
            },
        }
        for run in runs
    ]


def format_table(runs: list[dict[str, Any]]) -> str:
    def shown(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "GPUs  jobs  flow s  render s  jobs/h  steady jobs/h  efficiency render/steady  "
        "first job s | s/chunk | model loads, per GPU"
    ]
    for run in runs:
        efficiency = run["scaling_efficiency"]
        per_gpu = " ".join(
            f"{gpu['first_job_seconds']:.1f}|{shown(gpu['steady_seconds_per_chunk'], 3)}|{gpu['model_loads']}"
            for gpu in run["per_gpu"]
        )
        lines.append(
            f"{run['gpus']:>4}  {run['jobs']:>4}  {run['flow_seconds']:>6.1f}  "
            f"{run['render_seconds']:>8.1f}  "
            f"{run['jobs_per_hour']:>6.1f}  {shown(run['steady_jobs_per_hour']):>13}  "
            f"{shown(efficiency['render'], 3):>11}/{shown(efficiency['steady'], 3):<12}  {per_gpu}"
        )
    return "\n".join(lines)


def scaleout(
    gpu_counts: list[int],
    jobs: int,
    out_dir: Path,
    geometry: BenchSettings,
    engine: dict[str, Any],
    write_video: bool,
) -> list[dict[str, Any]]:
    """Render the same manifest on a Ray cluster of each GPU count in turn; the measured runs.

    Everything is checked before anything is written; the summary is rewritten after each GPU count, so a
    failed count keeps the ones before it.
    """
    if not gpu_counts or min(gpu_counts) < 1 or len(set(gpu_counts)) != len(gpu_counts):
        raise ValueError(f"GPU counts must be distinct and >= 1, got {gpu_counts}")
    if jobs < 2 * max(gpu_counts):
        raise ValueError(
            f"{jobs} jobs for up to {max(gpu_counts)} GPUs: each worker needs two jobs or more for a steady "
            f"figure (at least {2 * max(gpu_counts)} jobs)"
        )
    if engine["model"] not in PRESETS:
        raise ValueError(f"the scale-out renders a preset ({', '.join(PRESETS)}), not {engine['model']!r}")
    resolved_engine = EngineSettings(**engine).resolved().to_dict()  # checked now; recorded as it runs
    physical = torch.cuda.device_count()
    if torch.device(engine["device"]).type == "cuda" and max(gpu_counts) > physical:
        raise ValueError(f"{max(gpu_counts)} GPUs asked for, but this machine has {physical}")
    # Absolute: the manifest's paths are read relative to the manifest's own folder.
    out_dir = out_dir.resolve()
    if out_dir.exists() and any(out_dir.iterdir()):  # an earlier run's renders and summary stay as they are
        raise ValueError(f"{out_dir} is not empty: a scale-out run writes into a new or empty folder")
    batch_dirs = {gpus: out_dir / f"gpus-{gpus}" for gpus in gpu_counts}
    manifest = write_manifest(out_dir / "inputs", jobs, geometry, engine["model"])
    runs: list[dict[str, Any]] = []
    for gpus, batch_dir in batch_dirs.items():
        batch_dir.mkdir(parents=True)
        started = time.perf_counter()
        # One CPU per worker, as the runner asks of each.
        with ray_head(gpus, gpus, batch_dir / "ray-head.log") as address:
            results = render_manifest(
                str(manifest),
                str(batch_dir),
                **engine,
                write_video=write_video,
                runner="ray",
                ray_address=address,
                gpus_per_job=1,
            )
        runs = add_scaling([*runs, measure(results, gpus, time.perf_counter() - started)])
        with atomic_output(out_dir / SUMMARY_FILE) as temp:
            summary = {"manifest": str(manifest), "engine": resolved_engine, "runs": runs}
            temp.write_text(json.dumps(summary, indent=2))
        print(f"{gpus} GPU(s): {runs[-1]['jobs_per_hour']:.1f} jobs/h over the renders", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.scaleout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="GPU counts (default: 1 2)")
    parser.add_argument("--jobs", type=int, default=8, help="jobs in the manifest (default: 8)")
    parser.add_argument("--out", required=True, type=Path, help="output folder, new or empty")
    add_geometry_arguments(parser, frame_num=81)
    add_engine_arguments(parser, model="lingbot-world-fast", device="cuda", model_folders=False)
    args = parser.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        parser.error(
            "PREFECT_API_URL must name a Prefect server (prefect server start) the Ray workers reach"
        )
    # The heads run without token auth, so must this driver (Ray 2.60 would write ~/.ray/auth_token).
    os.environ["RAY_AUTH_MODE"] = "disabled"
    geometry = BenchSettings(out=args.out, **geometry_options(args))
    try:
        runs = scaleout(args.gpus, args.jobs, args.out, geometry, engine_options(args), args.write_video)
    except ValueError as error:
        parser.error(str(error))
    print(format_table(runs))
    print(f"results: {args.out / SUMMARY_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
