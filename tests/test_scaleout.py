"""The scale-out measurement: one manifest through the Ray runner on 1 and 2 logical GPUs; its arithmetic."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.scaleout import SUMMARY_FILE, add_scaling, format_table, measure, scaleout
from worldgen.bench import BenchSettings
from worldgen.cli import add_engine_arguments, engine_options
from worldgen.generator import EngineSettings
from worldgen.render import TIMINGS

TINY_GEOMETRY = {"height": 48, "width": 64, "frame_num": 9, "chunk_size": 1, "window": 2, "sink": 1}


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


def test_measure_counts_the_renders_and_the_jobs_after_each_workers_first():
    # Worker 0: a 30 s first job (compiling), then two of 10 s; worker 1: 30 s, then one of 10 s.
    rows = [result(0, 0, 30), result(0, 30, 40), result(0, 40, 50), result(1, 2, 32), result(1, 32, 42)]
    run = measure(rows, gpus=2, flow_seconds=80.0)
    assert (run["jobs"], run["workers"], run["flow_seconds"], run["render_seconds"]) == (5, 2, 80.0, 50)
    assert run["jobs_per_hour"] == pytest.approx(3600 * 5 / 50)
    assert run["steady_jobs_per_hour"] == pytest.approx(3600 * (2 / 20 + 1 / 10))
    per_gpu = [(gpu["cuda_visible_devices"], gpu["jobs"], gpu["first_job_seconds"]) for gpu in run["per_gpu"]]
    assert per_gpu == [("0", 3, 30), ("1", 2, 30)]

    single = measure([result(0, 0, 30), result(0, 30, 40), result(0, 40, 50)], gpus=1, flow_seconds=60.0)
    one, two = add_scaling([single, run])
    assert one["scaling_efficiency"] == {"render": 1.0, "steady": 1.0}
    assert two["scaling_efficiency"]["steady"] == pytest.approx((3600 * 0.2) / (2 * 3600 * 0.1))
    assert "0.833/1.000" in format_table([one, two]).replace(" ", "")


def test_no_steady_figure_unless_every_gpu_rendered_two_jobs():
    # Both GPUs as fast as one, but one worker got a single job: summing only the others would halve the
    # efficiency. The same with a worker that got none (2 GPUs, 1 worker).
    uneven = measure([result(0, 0, 30), result(0, 30, 40), result(0, 40, 50), result(1, 0, 30)], 2, 60.0)
    idle = measure([result(0, 0, 30), result(0, 30, 40)], gpus=2, flow_seconds=60.0)
    for run in (uneven, idle):
        assert run["steady_jobs_per_hour"] is None
        assert add_scaling([run])[0]["scaling_efficiency"] == {"render": None, "steady": None}


def test_measure_refuses_jobs_this_run_did_not_render():
    rows = [result(0, 0, 30), {**result(0, 30, 40), "job_id": "old", "status": "skipped"}]
    with pytest.raises(ValueError, match="jobs old were not rendered by this run"):
        measure(rows, gpus=1, flow_seconds=60.0)
    with pytest.raises(ValueError, match="no job results"):
        measure([], gpus=1, flow_seconds=60.0)


@pytest.mark.parametrize(
    ("gpus", "jobs", "engine", "message"),
    [
        ([0], 4, {}, "distinct and >= 1"),
        ([1, 1], 4, {}, "distinct and >= 1"),
        ([1, 2], 3, {}, "at least 4 jobs"),
        ([1], 2, {"model": "/models/lingbot"}, "renders a preset"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_written(tmp_path, gpus, jobs, engine, message):
    geometry = BenchSettings(out=tmp_path, **TINY_GEOMETRY)
    with pytest.raises(ValueError, match=message):
        scaleout(gpus, jobs, tmp_path / "out", geometry, {**default_engine(), **engine}, write_video=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api", "no_ray_token")
def test_the_same_manifest_on_one_and_two_gpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative output folder, as a user types it
    geometry = BenchSettings(out=tmp_path, **TINY_GEOMETRY)
    runs = scaleout([1, 2], 4, Path("out"), geometry, default_engine(), write_video=False)
    one, two = runs
    assert (one["gpus"], one["workers"], two["gpus"], two["workers"]) == (1, 1, 2, 2)
    assert [gpu["cuda_visible_devices"] for gpu in two["per_gpu"]] == ["0", "1"]
    # Every worker loaded its model once, for all the jobs it rendered.
    assert [gpu["model_loads"] for run in runs for gpu in run["per_gpu"]] == [1, 1, 1]
    assert one["per_gpu"][0]["jobs"] == 4 and sum(gpu["jobs"] for gpu in two["per_gpu"]) == 4
    assert one["scaling_efficiency"] == {"render": 1.0, "steady": 1.0}
    assert two["scaling_efficiency"]["render"] > 0
    assert all(run["flow_seconds"] > run["render_seconds"] for run in runs)
    out = tmp_path / "out"
    for gpus in (1, 2):
        for job in range(4):
            assert pq.read_metadata(out / f"gpus-{gpus}" / f"scale-{job}" / TIMINGS).num_rows == 3
    written = json.loads((out / SUMMARY_FILE).read_text())
    assert written["runs"] == runs
    # The engine as it ran: the CPU's defaults resolved (no switch left unset).
    assert written["engine"] == EngineSettings(**default_engine()).resolved().to_dict()
    assert written["engine"]["compile"] is False and None not in written["engine"].values()

    summary = (out / SUMMARY_FILE).read_text()
    with pytest.raises(ValueError, match="is not empty: a scale-out run writes into a new or empty folder"):
        scaleout([2], 4, out, geometry, default_engine(), write_video=False)
    assert (out / SUMMARY_FILE).read_text() == summary  # refused before writing anything
