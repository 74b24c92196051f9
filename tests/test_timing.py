"""Timing rows: the exact DESIGN schema, Parquet round trips with settings metadata, steady-state summary."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from worldgen.timing import (
    SETTINGS_METADATA_KEY,
    TIMING_SCHEMA,
    ChunkTiming,
    RunInfo,
    TimingLog,
    read_settings,
    read_timings,
    summarize,
)

# DESIGN.md "Timing row per chunk", in order, with the settings/environment names this project gives them.
DESIGN_COLUMNS = [
    "run_id", "job_id", "chunk_index", "first_latent_frame", "latent_frames", "video_frames", "kv_frames",
    "is_warmup", "generate_next_chunk_seconds", "denoise_seconds", "update_cache_seconds", "decode_seconds",
    "write_seconds", "total_seconds", "peak_memory_bytes",
    "model", "height", "width", "frame_num", "chunk_size", "local_attn_size", "sink_size", "steps", "seed",
    "dtype", "attention", "compile", "fp8", "triton_kernels", "gelu_epilogue", "device_name", "torch_version",
    "worldgen_version", "started_at",
    "host", "gpu",
]  # fmt: skip

RUN = RunInfo(
    run_id="run-1",
    job_id="job-a",
    model="tiny",
    height=32,
    width=48,
    frame_num=17,
    chunk_size=1,
    local_attn_size=3,
    sink_size=1,
    steps=4,
    seed=7,
    dtype="float32",
    attention="sdpa",
    compile=False,
    fp8=False,
    triton_kernels=False,
    gelu_epilogue=False,
    device_name="cpu",
    torch_version="2.13.0",
    worldgen_version="0.1.0",
    # Not UTC on purpose: the file stores UTC and must read back the same instant.
    started_at=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2))),
    host="node-1",
    gpu=None,
)
SETTINGS = {
    "job_id": "job-a",
    "frame_num": 17,
    "timestep_indices": (0, 179, 358, 679),
    "image": Path("a.png"),
}


def chunk(index: int, denoise: float, write: float = 0.01, peak: int | None = None) -> ChunkTiming:
    """A chunk row whose stage times are simple functions of `denoise`, so summaries have exact oracles."""
    generate = denoise + 0.5 + 0.25
    return ChunkTiming.from_run(
        RUN,
        chunk_index=index,
        first_latent_frame=index,
        latent_frames=1,
        video_frames=1 if index == 0 else 4,
        kv_frames=min(index + 1, 3),
        is_warmup=index == 0,
        generate_next_chunk_seconds=generate,
        denoise_seconds=denoise,
        update_cache_seconds=0.5,
        decode_seconds=0.25,
        write_seconds=write,
        total_seconds=generate + write,
        peak_memory_bytes=peak,
    )


def test_schema_has_exactly_the_design_columns_and_the_dataclass_fields():
    assert TIMING_SCHEMA.names == DESIGN_COLUMNS
    assert {f.name for f in fields(ChunkTiming)} == set(DESIGN_COLUMNS)
    started_at = TIMING_SCHEMA.field("started_at").type
    assert pa.types.is_timestamp(started_at) and started_at.tz == "UTC"
    assert TIMING_SCHEMA.field("seed").type == pa.int64()
    assert TIMING_SCHEMA.field("denoise_seconds").type == pa.float64()
    assert TIMING_SCHEMA.field("is_warmup").type == pa.bool_()
    nullable = {f.name for f in TIMING_SCHEMA if f.nullable}
    assert nullable == {"peak_memory_bytes", "gpu"}


def test_rows_round_trip_through_parquet_with_schema_and_settings(tmp_path):
    log = TimingLog(SETTINGS)
    rows = [chunk(0, 3.0, peak=123), chunk(1, 1.0, peak=2**40), replace(chunk(2, 1.5), gpu="GPU-1234")]
    for row in rows:
        log.append(row)
    path = log.write(tmp_path / "timings.parquet")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["timings.parquet"]  # no temp file left
    table = read_timings(path)
    assert table.schema.remove_metadata().equals(TIMING_SCHEMA)
    assert pq.read_schema(path).remove_metadata().equals(TIMING_SCHEMA)
    assert [ChunkTiming(**row) for row in table.to_pylist()] == rows  # the same instants, now in UTC
    assert table["started_at"][0].as_py().utcoffset() == timedelta(0)
    expected_settings = {**SETTINGS, "timestep_indices": [0, 179, 358, 679], "image": "a.png"}
    assert read_settings(path) == expected_settings
    assert json.loads(table.schema.metadata[SETTINGS_METADATA_KEY]) == expected_settings


def test_write_replaces_an_existing_file_atomically(tmp_path):
    path = tmp_path / "timings.parquet"
    TimingLog(SETTINGS).write(path)
    log = TimingLog({"job_id": "job-a", "seed": 8})
    log.append(chunk(0, 2.0))
    log.write(path)
    assert read_timings(path).num_rows == 1
    assert read_settings(path) == {"job_id": "job-a", "seed": 8}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timings.parquet"]


def test_failed_write_leaves_no_file(tmp_path):
    log = TimingLog(SETTINGS)
    log.append(replace(chunk(0, 1.0), chunk_index=2**40))  # too large for int32: the write fails
    with pytest.raises(pa.ArrowInvalid):
        log.write(tmp_path / "timings.parquet")
    assert list(tmp_path.iterdir()) == []


def test_rows_reject_naive_timestamps_and_missing_values():
    with pytest.raises(ValueError, match="started_at must be timezone-aware"):
        replace(chunk(0, 1.0), started_at=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match=r"\['model'\] must not be None"):
        replace(chunk(0, 1.0), model=None)


def test_reader_names_the_file_and_the_bad_columns(tmp_path):
    table = TimingLog(SETTINGS).to_table()
    bad = table.drop_columns(["kv_frames"]).append_column("extra", pa.array([], pa.int8()))
    bad = bad.set_column(bad.schema.get_field_index("seed"), "seed", pa.array([], pa.int32()))
    path = tmp_path / "timings.parquet"
    pq.write_table(bad, path)
    with pytest.raises(ValueError, match=r"timings\.parquet") as info:
        read_timings(path)
    message = str(info.value)
    assert "missing column 'kv_frames'" in message
    assert "unexpected column 'extra'" in message
    assert "column 'seed' is int32" in message


def test_summary_skips_the_warmup_chunk():
    denoise = [5.0, 1.0, 2.0, 3.0, 4.0]
    log = TimingLog(SETTINGS)
    for index, seconds in enumerate(denoise):
        log.append(chunk(index, seconds, write=0.1 * index))
    summary = log.summary()

    assert (summary.chunks, summary.warmup_skipped, summary.steady_chunks) == (5, 1, 4)
    steady = np.array(denoise[1:], dtype=np.float64)
    writes = 0.1 * np.arange(1, 5, dtype=np.float64)
    totals = steady + 0.75 + writes
    assert summary.stages["denoise"].mean == pytest.approx(steady.mean())
    assert summary.stages["denoise"].p90 == pytest.approx(np.quantile(steady, 0.9))
    assert summary.stages["update_cache"].mean == pytest.approx(0.5)
    assert summary.stages["write"].p90 == pytest.approx(np.quantile(writes, 0.9))
    assert summary.stages["generate_next_chunk"].mean == pytest.approx((steady + 0.75).mean())
    assert summary.stages["total"].mean == pytest.approx(totals.mean())
    assert summary.frames_per_second == pytest.approx(4 * 4 / totals.sum())

    everything = summarize(log.to_table(), warmup_chunks=0)
    assert everything.warmup_skipped == 0
    assert everything.stages["denoise"].mean == pytest.approx(np.mean(denoise))
    assert summarize(log.to_table(), warmup_chunks=2).stages["denoise"].mean == pytest.approx(3.0)


@pytest.mark.parametrize("chunks, warmup", [(1, 1), (2, 2), (0, 1)])
def test_summary_with_only_warmup_chunks_reports_no_steady_state(chunks, warmup):
    log = TimingLog(SETTINGS)
    for index in range(chunks):
        log.append(chunk(index, 1.0))
    summary = log.summary(warmup)
    assert (summary.chunks, summary.warmup_skipped, summary.steady_chunks) == (chunks, chunks, 0)
    assert summary.stages == {}
    assert summary.frames_per_second is None


def test_summary_refuses_mixed_jobs_and_negative_warmup():
    log = TimingLog(SETTINGS)
    log.append(chunk(0, 1.0))
    log.append(replace(chunk(1, 1.0), job_id="job-b"))
    with pytest.raises(ValueError, match="one job"):
        log.summary()
    with pytest.raises(ValueError, match="warmup_chunks must be >= 0"):
        summarize(TimingLog(SETTINGS).to_table(), -1)


def test_run_info_and_rows_share_their_fields():
    row = chunk(3, 1.0)
    assert all(getattr(row, f.name) == getattr(RUN, f.name) for f in fields(RunInfo))
    assert row.started_at.astimezone(UTC) == datetime(2026, 1, 2, 1, 4, 5, 678901, tzinfo=UTC)
