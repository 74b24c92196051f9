"""The scale-out measurement: one manifest through the Ray runner on 1 and 2 logical GPUs; its arithmetic."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pyarrow.parquet as pq
import pytest

from flows.scaleout import SUMMARY_FILE, add_scaling, measure, scaleout
from worldgen.bench import BenchSettings
from worldgen.cli import add_engine_arguments, engine_options
from worldgen.render import TIMINGS


@pytest.fixture(autouse=True)
def no_ray_token(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # as the command line sets it: no ~/.ray/auth_token
    yield


def default_engine() -> dict:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return engine_options(parser.parse_args([]))  # the tiny preset on the CPU


def result(pid: int, start: float, end: float, seconds_per_chunk: float | None = 0.5) -> dict:
    """A render task's result row for a job run by worker `pid` from `start` to `end` seconds."""
    origin = datetime(2026, 1, 1, tzinfo=UTC)
    return {
        "job_id": f"job-{pid}-{start}",
        "status": "rendered",
        "steady_seconds_per_chunk": seconds_per_chunk,
        "worker_host": "node",
        "worker_pid": pid,
        "worker_gpus": str(pid),
        "model_loads": 1,
        "started_at": (origin + timedelta(seconds=start)).isoformat(),
        "finished_at": (origin + timedelta(seconds=end)).isoformat(),
    }


def test_measure_counts_the_batch_and_the_jobs_after_each_workers_first():
    # Worker 0: a 30 s first job (compiling), then two of 10 s; worker 1: 30 s, then one of 10 s.
    rows = [result(0, 0, 30), result(0, 30, 40), result(0, 40, 50), result(1, 2, 32), result(1, 32, 42)]
    run = measure(rows, gpus=2)
    assert run["jobs"] == 5 and run["workers"] == 2
    assert run["batch_seconds"] == 50
    assert run["jobs_per_hour"] == pytest.approx(3600 * 5 / 50)
    assert run["steady_jobs_per_hour"] == pytest.approx(3600 * (2 / 20 + 1 / 10))
    assert [(gpu["gpus"], gpu["jobs"], gpu["first_job_seconds"]) for gpu in run["per_gpu"]] == [
        ("0", 3, 30),
        ("1", 2, 30),
    ]

    single = measure([result(0, 0, 30), result(0, 30, 40), result(0, 40, 50)], gpus=1)
    one, two = add_scaling([single, run])
    assert one["scaling_efficiency"] == {"batch": 1.0, "steady": 1.0}
    assert two["scaling_efficiency"]["steady"] == pytest.approx((3600 * 0.2) / (2 * 3600 * 0.1))
    # One job per worker: no steady figure, and no efficiency from it.
    lone = add_scaling([measure([result(0, 0, 30)], gpus=1)])[0]
    assert lone["steady_jobs_per_hour"] is None and lone["scaling_efficiency"]["steady"] is None


def test_measure_refuses_a_batch_with_skipped_jobs():
    rows = [result(0, 0, 30), {**result(0, 30, 40), "status": "skipped"}]
    with pytest.raises(ValueError, match="1 jobs were skipped"):
        measure(rows, gpus=1)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_the_same_manifest_on_one_and_two_gpus(tmp_path):
    geometry = BenchSettings(out=tmp_path, height=48, width=64, frame_num=9, chunk_size=1, window=2, sink=1)
    runs = scaleout([1, 2], 4, tmp_path, geometry, default_engine(), write_video=False)
    one, two = runs
    assert (one["gpus"], one["workers"], two["gpus"], two["workers"]) == (1, 1, 2, 2)
    assert [gpu["gpus"] for gpu in two["per_gpu"]] == ["0", "1"]
    # Every worker loaded its model once, for all the jobs it rendered.
    assert [gpu["model_loads"] for run in runs for gpu in run["per_gpu"]] == [1, 1, 1]
    assert one["per_gpu"][0]["jobs"] == 4 and sum(gpu["jobs"] for gpu in two["per_gpu"]) == 4
    assert one["scaling_efficiency"] == {"batch": 1.0, "steady": 1.0}
    assert two["scaling_efficiency"]["steady"] > 0
    for gpus in (1, 2):
        for job in range(4):
            assert pq.read_metadata(tmp_path / f"gpus-{gpus}" / f"scale-{job}" / TIMINGS).num_rows == 3
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["runs"] == runs

    with pytest.raises(ValueError, match="exists: a scale-out run renders into fresh folders"):
        scaleout([1], 1, tmp_path, geometry, default_engine(), write_video=False)
    with pytest.raises(ValueError, match="GPU counts must be >= 1"):
        scaleout([0], 1, tmp_path / "none", geometry, default_engine(), write_video=False)
