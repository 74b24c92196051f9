"""The Prefect flows against a real Prefect server: batch render, resume, failures, kill -9, deployments."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio_ffmpeg
import pyarrow.parquet as pq
import pytest
from helpers import ASSETS, job_row
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey
from prefect.states import Completed, Failed

from flows import exit_status
from flows.render import render_manifest
from flows.report import timing_report
from worldgen.generator import JobInputError
from worldgen.render import MARKER, TIMINGS, VIDEO

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("prefect_api")


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def statuses(results: list[dict]) -> dict[str, str]:
    return {row["job_id"]: row["status"] for row in results}


def assert_finished(job_dir: Path, frames: int) -> None:
    assert json.loads((job_dir / MARKER).read_text())["outputs"]
    assert imageio_ffmpeg.count_frames_and_secs(str(job_dir / VIDEO))[0] == frames
    assert pq.read_metadata(job_dir / TIMINGS).num_rows >= 1
    assert not [p.name for p in job_dir.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_batch_renders_resumes_and_rerenders_only_changed_jobs(tmp_path):
    manifest = write_manifest(tmp_path / "jobs.jsonl", [job_row("a"), job_row("b")])
    out = tmp_path / "out"
    assert statuses(render_manifest(str(manifest), str(out))) == {"a": "rendered", "b": "rendered"}
    for job_id in "ab":
        assert_finished(out / job_id, frames=9)
    assert statuses(render_manifest(str(manifest), str(out))) == {"a": "skipped", "b": "skipped"}

    write_manifest(manifest, [job_row("a"), job_row("b", seed=2)])
    assert statuses(render_manifest(str(manifest), str(out))) == {"a": "skipped", "b": "rendered"}

    report = timing_report(str(out))
    assert report["jobs"] == 2
    table = pq.read_table(out / "report.parquet")
    assert sorted(table.column("job_id").to_pylist()) == ["a", "b"]
    assert (out / "report.md").read_text().count("| a |") == 1 and (out / "report.png").is_file()


def test_artifacts_are_published(tmp_path):
    manifest = write_manifest(tmp_path / "jobs.jsonl", [job_row("artifacts")])
    render_manifest(str(manifest), str(tmp_path / "out"))

    async def latest(key: str):
        async with get_client() as client:
            key_filter = ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=[key]))
            return await client.read_latest_artifacts(artifact_filter=key_filter)

    for key in ("worldgen-jobs", "worldgen-batch-summary"):
        artifacts = asyncio.run(latest(key))
        assert artifacts and "artifacts" in str(artifacts[0].data)


def test_a_failing_job_is_reported_and_the_others_complete(tmp_path, monkeypatch):
    import flows.render

    real, tries = flows.render.render_job, []

    def bad_input_in_bad(generator, job, *args, **kwargs):
        if job.job_id == "bad":
            tries.append(job.job_id)
            raise JobInputError("job bad: its image went missing after the manifest was checked")
        return real(generator, job, *args, **kwargs)

    monkeypatch.setattr(flows.render, "render_job", bad_input_in_bad)
    manifest = write_manifest(tmp_path / "jobs.jsonl", [job_row("bad"), job_row("good")])
    out = tmp_path / "out"
    state = render_manifest(str(manifest), str(out), return_state=True)
    assert state.is_failed()
    assert "1 of 2 jobs failed: bad" in state.message
    assert tries == ["bad"]  # bad input fails the same way every time: not retried
    assert_finished(out / "good", frames=9)
    assert not (out / "bad" / MARKER).exists()


def test_the_batch_summary_keeps_a_failure_on_one_table_row():
    from flows.render import _markdown_summary

    text = _markdown_summary([], {"bad": "ActorDiedError: it died\n\tpid: 12 | class_name: TaskWorker"})
    (row,) = [line for line in text.splitlines() if line.startswith("| bad")]
    assert (
        row == "| bad | failed: ActorDiedError: it died pid: 12 \\| class_name: TaskWorker | - | - | - | - |"
    )


def test_settings_the_machine_cannot_run_are_not_retried(tmp_path, monkeypatch):
    import flows.render

    loads = []

    def no_such_device(settings):
        loads.append(settings.device)
        raise ValueError("device cuda, but this machine has no CUDA device\n(--device cpu runs here) | here")

    monkeypatch.setattr(flows.render, "shared_generator", no_such_device)
    manifest = write_manifest(tmp_path / "jobs.jsonl", [job_row("one")])
    state = render_manifest(str(manifest), str(tmp_path / "out"), return_state=True)
    assert state.is_failed() and loads == ["cpu"]  # the prompt task tried once, and was not retried


def test_a_relative_output_folder_is_the_callers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = write_manifest(tmp_path / "jobs.jsonl", [job_row("here")])
    (result,) = render_manifest(str(manifest), "relative")
    assert result["job_dir"] == str(tmp_path / "relative" / "here")
    assert_finished(tmp_path / "relative" / "here", frames=9)


def test_a_job_the_model_cannot_render_stops_the_batch_before_it_starts(tmp_path):
    # Key presses for a camera model: the manifest is valid, but the model cannot take that job.
    bad = job_row("bad", actions=str(ASSETS / "actions.npy"))
    manifest = write_manifest(tmp_path / "jobs.jsonl", [job_row("good"), bad])
    state = render_manifest(str(manifest), str(tmp_path / "out"), return_state=True)
    assert state.is_failed() and "job bad: `actions` given, but model tiny takes the camera" in state.message
    assert not (tmp_path / "out").exists()


def test_transient_failures_are_retried(tmp_path, monkeypatch):
    import flows.render

    calls = {"n": 0}
    real = flows.render.render_job

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("disk hiccup")
        return real(*args, **kwargs)

    monkeypatch.setattr(flows.render, "render_job", flaky)
    monkeypatch.setattr(flows.render.render_job_task, "retry_delay_seconds", 0)
    manifest = write_manifest(tmp_path / "jobs.jsonl", [job_row("flaky")])
    assert statuses(render_manifest(str(manifest), str(tmp_path / "out"))) == {"flaky": "rendered"}
    assert calls["n"] == 2


def test_a_bad_manifest_renders_nothing(tmp_path):
    rows = [job_row("ok"), job_row("odd", height=50)]
    manifest = write_manifest(tmp_path / "jobs.jsonl", rows)
    state = render_manifest(str(manifest), str(tmp_path / "out"), return_state=True)
    assert state.is_failed() and f"{manifest}:2: height" in state.message
    assert not (tmp_path / "out").exists()


def run_cli(manifest: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.render", str(manifest), "--out", str(out)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def test_kill_mid_batch_then_rerun_completes_without_corrupt_outputs(tmp_path):
    rows = [job_row(f"k{i}", frame_num=13, seed=i) for i in range(3)]  # 4 latent frames = 4 chunks each
    manifest = write_manifest(tmp_path / "jobs.jsonl", rows)
    out = tmp_path / "out"
    process = run_cli(manifest, out)
    deadline = time.monotonic() + 300
    while not (out / "k0" / MARKER).exists():
        assert process.poll() is None, "the flow ended before the first job finished"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the whole flow process, mid-batch
    process.wait()
    finished_before = {p.parent.name for p in out.glob(f"*/{MARKER}")}
    assert "k0" in finished_before and finished_before != {"k0", "k1", "k2"}
    for job_dir in out.iterdir():
        if job_dir.is_dir() and not (job_dir / MARKER).exists():
            assert not (job_dir / VIDEO).exists()  # a half-rendered job never has a video under its name

    rerun = run_cli(manifest, out)
    assert rerun.wait(timeout=300) == 0
    for row in rows:
        assert_finished(out / row["job_id"], frames=13)


def prefect_cli(*args: str, cwd: Path = REPO) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "prefect", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_deployment_runs_on_a_process_worker(tmp_path):
    manifest = write_manifest(tmp_path / "jobs.jsonl", [job_row("deployed")])
    out = tmp_path / "out"
    prefect_cli("work-pool", "create", "worldgen", "--type", "process")
    prefect_cli("--no-prompt", "deploy", "--all")
    prefect_cli(
        "deployment", "run", "render-manifest/render", "-p", f"manifest={manifest}", "-p", f"out_dir={out}"
    )
    prefect_cli("worker", "start", "--pool", "worldgen", "--run-once")
    assert_finished(out / "deployed", frames=9)

    async def last_run_state() -> str:
        async with get_client() as client:
            runs = await client.read_flow_runs(sort="EXPECTED_START_TIME_DESC", limit=1)  # type: ignore[arg-type]
            return runs[0].state.type.value

    assert asyncio.run(last_run_state()) == "COMPLETED"


def test_exit_status_is_0_for_a_completed_run_and_1_with_the_message_otherwise(capsys) -> None:
    assert exit_status("render-manifest", Completed()) == 0
    assert capsys.readouterr().err == ""
    assert exit_status("render-manifest", Failed(message="2 of 3 jobs failed: a, b")) == 1
    assert capsys.readouterr().err == "render-manifest failed: 2 of 3 jobs failed: a, b\n"
