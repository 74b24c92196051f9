"""The render flow on a Ray cluster of 2 logical GPUs (CPU device) against a real Prefect server."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from datetime import datetime
from itertools import combinations
from pathlib import Path

import imageio_ffmpeg
import pyarrow.parquet as pq
import pytest
import ray
import torch
from helpers import job_row
from test_flows import statuses, write_manifest

from flows import free_port
from flows.ray_runner import RayActorTaskRunner, prefect_api_problem, ray_head
from flows.render import render_manifest
from worldgen.render import TIMINGS, VIDEO

pytestmark = pytest.mark.usefixtures("prefect_api", "no_ray_token")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory, no_ray_token: None) -> Iterator[str]:
    """`ray start --head` with 4 CPUs and 2 logical GPUs on this machine; yields its address."""
    with ray_head(2, 4, tmp_path_factory.mktemp("ray") / "head.log") as address:
        yield address


def decoded_frames(video: Path) -> list[bytes]:
    frames = imageio_ffmpeg.read_frames(str(video))
    next(frames)  # the stream's metadata
    return list(frames)


def interval(row: dict) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(row["started_at"]), datetime.fromisoformat(row["finished_at"])


def overlap(a: dict, b: dict) -> bool:
    (start_a, end_a), (start_b, end_b) = interval(a), interval(b)
    return start_a < end_b and start_b < end_a


def test_two_gpu_workers_render_two_jobs_at_a_time_as_the_local_runner_does(tmp_path, ray_cluster):
    manifest = write_manifest(tmp_path / "jobs.jsonl", [job_row(f"r{i}", seed=i) for i in range(4)])
    results = render_manifest(
        str(manifest), str(tmp_path / "ray"), runner="ray", ray_address=ray_cluster, gpus_per_job=1
    )
    assert statuses(results) == {f"r{i}": "rendered" for i in range(4)}

    # Two long-lived workers, one logical GPU each, each with its model loaded once for all its jobs.
    gpu_of_worker = {(row["worker_host"], row["worker_pid"]): row["worker_gpus"] for row in results}
    assert len(gpu_of_worker) == 2 and sorted(gpu_of_worker.values()) == ["0", "1"]
    assert all(row["worker_gpus"] == gpu_of_worker[row["worker_host"], row["worker_pid"]] for row in results)
    assert os.getpid() not in {pid for _, pid in gpu_of_worker}
    assert [row["model_loads"] for row in results] == [1, 1, 1, 1]
    # Two jobs at a time: some jobs of different workers ran during each other.
    assert any(overlap(a, b) for a, b in combinations(results, 2) if a["worker_pid"] != b["worker_pid"])

    # A batch with nothing left to render starts no Ray worker and loads no model: this process skips it.
    again = render_manifest(
        str(manifest), str(tmp_path / "ray"), runner="ray", ray_address=ray_cluster, gpus_per_job=1
    )
    assert statuses(again) == {f"r{i}": "skipped" for i in range(4)}
    assert {row["worker_pid"] for row in again} == {os.getpid()}

    # The timing rows name the host that rendered each job.
    for row in results:
        assert set(pq.read_table(Path(row["job_dir"]) / TIMINGS).column("host").to_pylist()) == {
            row["worker_host"]
        }

    # A Ray worker of 1 CPU runs torch on 1 thread: so does the reference, so that only the runner differs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = render_manifest(str(manifest), str(tmp_path / "local"))
    finally:
        torch.set_num_threads(threads)
    assert statuses(local) == statuses(results)
    for row in results:
        job = row["job_id"]
        assert decoded_frames(tmp_path / "ray" / job / VIDEO) == decoded_frames(
            tmp_path / "local" / job / VIDEO
        )


def test_a_worker_that_cannot_reach_prefect_is_a_clear_error(ray_cluster):
    dead_api = f"http://127.0.0.1:{free_port()}/api"
    assert "does not answer" in prefect_api_problem(dead_api)
    assert prefect_api_problem(None) == "PREFECT_API_URL is not set"
    runner = RayActorTaskRunner(ray_cluster, max_workers=1, env_vars={"PREFECT_API_URL": dead_api})
    with pytest.raises(RuntimeError, match=r"Ray worker on .* cannot report to Prefect: the Prefect API at"):
        runner.__enter__()
    assert not ray.is_initialized()


def test_a_cuda_device_on_a_cluster_without_gpus_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the local cluster the flow starts then has no GPU
    manifest = write_manifest(tmp_path / "jobs.jsonl", [job_row("gpu")])
    state = render_manifest(
        str(manifest), str(tmp_path / "out"), device="cuda", runner="ray", return_state=True
    )
    assert state.is_failed()
    assert "the Ray cluster has 0 GPUs, but each render worker asks for 1" in state.message
    assert not (tmp_path / "out" / "gpu").exists()
    assert not ray.is_initialized()


def test_ray_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if Ray were not installed
    manifest = write_manifest(tmp_path / "jobs.jsonl", [job_row("no-ray")])
    state = render_manifest(str(manifest), str(tmp_path / "out"), runner="ray", return_state=True)
    assert state.is_failed() and "pip install 'worldgen[ray]'" in state.message
