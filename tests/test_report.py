"""Report over a render folder: per-job summary table and the PNG plot."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime

import numpy as np
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

from flows.report import timing_report
from worldgen.report import build_report, format_table, load_timings, summarize_jobs
from worldgen.timing import ChunkTiming, RunInfo, TimingLog

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_job(folder, job_id: str, denoise: list[float], write: float = 0.5) -> None:
    """One job's timings.parquet: 12 frames per chunk (1 in chunk 0), cache update 0.5 s, decode 1 s."""
    run = RunInfo(
        run_id=f"run-of-{job_id}", job_id=job_id, model="tiny", height=32, width=48, frame_num=41,
        chunk_size=3, local_attn_size=9, sink_size=3, steps=4, seed=0, dtype="float32", attention="sdpa",
        compile=False, fp8=False, triton_kernels=False, gelu_epilogue=False, device_name="cpu",
        torch_version="2.13.0", worldgen_version="0.1.0",
        started_at=datetime(2026, 1, 1, tzinfo=UTC), host="node", gpu=None,
    )  # fmt: skip
    log = TimingLog({"job_id": job_id})
    for index, seconds in enumerate(denoise):
        generate = seconds + 1.5
        log.append(
            ChunkTiming.from_run(
                run,
                chunk_index=index,
                first_latent_frame=3 * index,
                latent_frames=3,
                video_frames=1 if index == 0 else 12,
                kv_frames=min(3 * index + 3, 9),
                is_warmup=index == 0,
                generate_next_chunk_seconds=generate,
                denoise_seconds=seconds,
                update_cache_seconds=0.5,
                decode_seconds=1.0,
                write_seconds=write,
                total_seconds=generate + write,
                peak_memory_bytes=None,
            )
        )
    (folder / job_id).mkdir(parents=True)
    log.write(folder / job_id / "timings.parquet")


@pytest.fixture
def render_folder(tmp_path):
    out = tmp_path / "out"
    write_job(out, "job-b", [9.0, 2.0, 4.0], write=0.25)
    write_job(out, "job-a", [7.0, 1.0, 1.0, 4.0])
    write_job(out / "nested", "job-c", [3.0])  # one chunk: warm-up only
    (out / "job-a" / "video.mp4").write_bytes(b"not read")
    return out


def test_all_timing_files_are_read_as_one_table(render_folder):
    timings = load_timings(render_folder)
    assert timings.skipped == []
    table = timings.rows
    assert table.num_rows == 8
    assert sorted(set(table["job_id"].to_pylist())) == ["job-a", "job-b", "job-c"]


def test_per_job_summaries(render_folder):
    jobs = summarize_jobs(load_timings(render_folder).rows)
    assert [job.job_id for job in jobs] == ["job-a", "job-b", "job-c"]
    a, b, c = (job.summary for job in jobs)
    assert (a.chunks, a.warmup_skipped, b.chunks, b.warmup_skipped) == (4, 1, 3, 1)
    assert a.stages["denoise"].mean == pytest.approx(2.0)
    assert a.stages["total"].mean == pytest.approx(4.0)  # 2 + 0.5 + 1 + 0.5
    assert b.stages["denoise"].mean == pytest.approx(3.0)
    assert a.frames_per_second == pytest.approx(36 / 12.0)
    assert b.frames_per_second == pytest.approx(24 / np.sum([3.75, 5.75]))
    assert (c.chunks, c.warmup_skipped, c.stages, c.frames_per_second) == (1, 1, {}, None)


def test_report_prints_the_table_and_writes_a_png(render_folder):
    report = build_report(render_folder)
    lines = report.table.splitlines()
    assert lines[0].split() == [
        "job", "run", "chunks", "warm-up", "denoise", "s", "update_cache", "s", "decode", "s", "write", "s",
        "total", "s", "total", "p90", "s", "frames/s",
    ]  # fmt: skip
    # job-a steady totals are 3, 3, 6 s: p90 (linear) 5.4 s; 36 frames in 12 s.
    assert lines[1].split() == ["job-a", "run-of-j", "4", "1", "2.000", "0.500", "1.000", "0.500", "4.000",
                                "5.400", "3.00"]  # fmt: skip
    assert lines[2].split()[:5] == ["job-b", "run-of-j", "3", "1", "3.000"]
    assert lines[3].split() == ["job-c", "run-of-j", "1", "1", *["-"] * 7]
    assert "no steady state" in lines[5]

    assert report.plot == render_folder / "timings.png"
    assert report.plot.read_bytes().startswith(PNG_SIGNATURE)
    assert not [p for p in render_folder.iterdir() if p.name.endswith(".tmp")]


def test_markdown_table_and_custom_plot_path(render_folder, tmp_path):
    report = build_report(render_folder, plot_path=tmp_path / "plot.png", warmup_chunks=0, markdown=True)
    lines = report.table.splitlines()
    assert lines[0].startswith("| job | run | chunks | warm-up |") and lines[1].startswith("|---|")
    assert lines[2].startswith("| job-a | run-of-j | 4 | 0 | 3.250 |")  # mean of 7, 1, 1, 4
    assert lines[4].startswith("| job-c | run-of-j | 1 | 0 | 3.000 |")
    assert report.plot.read_bytes().startswith(PNG_SIGNATURE)
    assert format_table(report.jobs, markdown=True) == report.table


def test_missing_or_empty_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_timings(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no timings\.parquet files"):
        build_report(tmp_path / "empty")


def damage_timing_files(folder, valid) -> dict[str, str]:
    """Four jobs under `folder` whose timing files (made from the `valid` one) are no use, each with what the
    report should say about it."""
    data = valid.read_bytes()
    footer = pq.read_metadata(valid).serialized_size + 8  # the metadata, its length and the magic bytes
    damaged = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "corrupt-pages": data[:4] + b"\xab" * (len(data) - 4 - footer) + data[-footer:],
    }
    for job_id, content in damaged.items():
        (folder / job_id).mkdir(parents=True)
        (folder / job_id / "timings.parquet").write_bytes(content)
    (folder / "foreign").mkdir()
    pq.write_table(pq.read_table(valid).drop_columns(["host"]), folder / "foreign" / "timings.parquet")
    return {
        "corrupt-pages": "deserialize",
        "empty": "Parquet file size is 0 bytes",
        "foreign": "not a worldgen timing table: missing column 'host'",
        "truncated": "magic bytes not found",
    }


def test_unreadable_or_foreign_timing_files_are_skipped_and_listed(render_folder):
    reasons = damage_timing_files(render_folder, render_folder / "job-a" / "timings.parquet")
    with pytest.warns(UserWarning) as warned:
        report = build_report(render_folder)
    assert [job.job_id for job in report.jobs] == ["job-a", "job-b", "job-c"]
    assert [file.path for file in report.skipped] == [render_folder / j / "timings.parquet" for j in reasons]
    for file, reason in zip(report.skipped, reasons.values(), strict=True):
        assert reason in file.reason and str(file.path) not in file.reason  # the path is given once
        assert f"skipped {file.path}: {file.reason}" in [str(w.message) for w in warned]
    footnote = report.table.splitlines()[-5:]
    assert footnote == ["skipped 4 timing file(s):", *(f"- {f.path}: {f.reason}" for f in report.skipped)]
    assert report.plot.read_bytes().startswith(PNG_SIGNATURE)


def test_no_readable_timing_file_is_an_error_naming_the_folder_and_the_files(tmp_path, render_folder):
    damage_timing_files(tmp_path / "bad", render_folder / "job-a" / "timings.parquet")
    message = re.escape(f"{tmp_path / 'bad'}: no readable timings.parquet under it; skipped ")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=message) as raised:
        build_report(tmp_path / "bad")
    for job_id in ("corrupt-pages", "empty", "foreign", "truncated"):
        assert f"{tmp_path / 'bad' / job_id / 'timings.parquet'} (" in str(raised.value)


def test_the_plot_folder_is_created(render_folder, tmp_path):
    report = build_report(render_folder, plot_path=tmp_path / "new" / "folder" / "plot.png")
    assert report.plot == tmp_path / "new" / "folder" / "plot.png"
    assert report.plot.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.usefixtures("prefect_api")
def test_the_report_flow_lists_the_skipped_files(render_folder):
    damage_timing_files(render_folder, render_folder / "job-a" / "timings.parquet")
    with pytest.warns(UserWarning):
        result = timing_report(str(render_folder))
    assert result["jobs"] == 3
    skipped = [
        str(render_folder / j / "timings.parquet") for j in ("corrupt-pages", "empty", "foreign", "truncated")
    ]
    assert result["skipped"] == skipped
    markdown = (render_folder / "report.md").read_text()
    assert "skipped 4 timing file(s):" in markdown
    assert all(f"- {path}: " in markdown for path in skipped)
    assert pq.read_table(render_folder / "report.parquet").num_rows == 3

    async def table_artifact():
        async with get_client() as client:
            key = ArtifactCollectionFilterKey(any_=["worldgen-timing-report"])
            return await client.read_latest_artifacts(artifact_filter=ArtifactCollectionFilter(key=key))

    latest = asyncio.run(table_artifact())[0]
    assert latest.description == f"{render_folder} (skipped: {', '.join(skipped)})"
