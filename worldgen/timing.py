"""Per-chunk timing rows, their Arrow schema, atomic Parquet files, and steady-state summaries.

One row per generated chunk (DESIGN.md "Timing row per chunk"). The Arrow schema is written out by hand
so every `timings.parquet` has the same column names and types whatever values a run happened to produce;
the job's resolved settings travel as JSON in the schema metadata. This module does not import torch, so
reports read timing files without loading the engine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from worldgen.files import atomic_output

DEFAULT_WARMUP_CHUNKS = 1
SETTINGS_METADATA_KEY = b"worldgen.settings"

# The summarised stages, each stored as the column `<stage>_seconds`.
STAGES = ("denoise", "update_cache", "decode", "write", "generate_next_chunk", "total")


def _field(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


# Column order follows DESIGN.md; `host` and `gpu` tell apart the machines and devices of multi-GPU runs.
TIMING_SCHEMA = pa.schema(
    [
        _field("run_id", pa.string()),
        _field("job_id", pa.string()),
        _field("chunk_index", pa.int32()),
        _field("first_latent_frame", pa.int32()),
        _field("latent_frames", pa.int32()),
        _field("video_frames", pa.int32()),
        _field("kv_frames", pa.int32()),
        _field("is_warmup", pa.bool_()),
        _field("generate_next_chunk_seconds", pa.float64()),
        _field("denoise_seconds", pa.float64()),
        _field("update_cache_seconds", pa.float64()),
        _field("decode_seconds", pa.float64()),
        _field("write_seconds", pa.float64()),
        _field("total_seconds", pa.float64()),
        _field("peak_memory_bytes", pa.int64(), nullable=True),  # null where the device keeps no peak
        _field("model", pa.string()),
        _field("height", pa.int32()),
        _field("width", pa.int32()),
        _field("frame_num", pa.int32()),
        _field("chunk_size", pa.int32()),
        _field("local_attn_size", pa.int32()),
        _field("sink_size", pa.int32()),
        _field("steps", pa.int32()),
        _field("seed", pa.int64()),
        _field("dtype", pa.string()),
        _field("attention", pa.string()),
        _field("compile", pa.bool_()),
        _field("fp8", pa.bool_()),
        _field("triton_kernels", pa.bool_()),
        _field("gelu_epilogue", pa.bool_()),
        _field("device_name", pa.string()),
        _field("torch_version", pa.string()),
        _field("worldgen_version", pa.string()),
        _field("started_at", pa.timestamp("us", tz="UTC")),
        _field("host", pa.string()),
        _field("gpu", pa.string(), nullable=True),  # CUDA device uuid (or index); null on a CPU
    ]
)


@dataclass(frozen=True, kw_only=True)
class RunInfo:
    """What every row of one job's run shares: identity, resolved settings and environment."""

    run_id: str
    job_id: str
    model: str
    height: int
    width: int
    frame_num: int
    chunk_size: int
    local_attn_size: int
    sink_size: int
    steps: int
    seed: int
    dtype: str
    attention: str
    compile: bool
    fp8: bool
    triton_kernels: bool
    gelu_epilogue: bool
    device_name: str
    torch_version: str
    worldgen_version: str
    started_at: datetime
    host: str
    gpu: str | None


@dataclass(frozen=True, kw_only=True)
class ChunkTiming(RunInfo):
    """One chunk's row: the run's shared fields plus what was measured for this chunk."""

    chunk_index: int
    first_latent_frame: int
    latent_frames: int
    video_frames: int
    kv_frames: int
    is_warmup: bool
    generate_next_chunk_seconds: float
    denoise_seconds: float
    update_cache_seconds: float
    decode_seconds: float
    write_seconds: float
    total_seconds: float
    peak_memory_bytes: int | None

    def __post_init__(self) -> None:
        # pyarrow neither enforces non-null columns nor refuses naive datetimes (it would read them as UTC).
        missing = [f.name for f in TIMING_SCHEMA if not f.nullable and getattr(self, f.name) is None]
        if missing:
            raise ValueError(f"ChunkTiming: fields {missing} must not be None")
        if self.started_at.tzinfo is None:
            raise ValueError(f"ChunkTiming.started_at must be timezone-aware, got {self.started_at!r}")

    @classmethod
    def from_run(cls, run: RunInfo, **measured: Any) -> ChunkTiming:
        """A row of `run` with this chunk's measured fields."""
        return cls(**{f.name: getattr(run, f.name) for f in fields(RunInfo)}, **measured)


class TimingLog:
    """Collects one job's chunk rows and writes them as one Parquet file."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        # Non-JSON values (paths, tuples) are stored the way json/str writes them.
        self.settings_json = json.dumps(dict(settings), sort_keys=True, default=str)
        self.rows: list[ChunkTiming] = []

    def append(self, row: ChunkTiming) -> None:
        self.rows.append(row)

    def to_table(self) -> pa.Table:
        names = TIMING_SCHEMA.names
        table = pa.Table.from_pylist(
            [{n: getattr(row, n) for n in names} for row in self.rows], TIMING_SCHEMA
        )
        return table.replace_schema_metadata({SETTINGS_METADATA_KEY: self.settings_json})

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the table to `path` atomically."""
        path = Path(path)
        with atomic_output(path) as tmp_path:
            self.save(tmp_path)
        return path

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the table to `path` as it is (a render writes it under a temp name it publishes itself)."""
        pq.write_table(self.to_table(), path)

    def summary(self, warmup_chunks: int = DEFAULT_WARMUP_CHUNKS) -> TimingSummary:
        return summarize(self.to_table(), warmup_chunks)


def check_timing_schema(schema: pa.Schema, source: str) -> None:
    """Raise a ValueError naming `source` and every column that differs from TIMING_SCHEMA."""
    if schema.remove_metadata().equals(TIMING_SCHEMA):
        return
    found = {f.name: f for f in schema}
    problems = [f"missing column {f.name!r}" for f in TIMING_SCHEMA if f.name not in found]
    problems += [f"unexpected column {name!r}" for name in found if name not in TIMING_SCHEMA.names]
    problems += [
        f"column {f.name!r} is {found[f.name].type}{'' if found[f.name].nullable else ' not null'}, "
        f"expected {f.type}{'' if f.nullable else ' not null'}"
        for f in TIMING_SCHEMA
        if f.name in found and not found[f.name].equals(f)
    ]
    if not problems:
        problems = ["columns are out of order"]
    raise ValueError(f"{source}: not a worldgen timing table: {'; '.join(problems)}")


def read_timings(path: str | os.PathLike[str]) -> pa.Table:
    """A timing file's rows, checked against TIMING_SCHEMA; the schema metadata is kept."""
    table = pq.read_table(path)
    check_timing_schema(table.schema, str(path))
    return table


def read_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The job settings stored in a timing file's schema metadata."""
    metadata = pq.read_schema(path).metadata or {}
    if SETTINGS_METADATA_KEY not in metadata:
        key = SETTINGS_METADATA_KEY.decode()
        raise ValueError(f"{path}: no {key!r} entry in the Parquet schema metadata")
    return json.loads(metadata[SETTINGS_METADATA_KEY])


@dataclass(frozen=True)
class StageStats:
    mean: float
    p90: float


@dataclass(frozen=True)
class TimingSummary:
    """Steady-state statistics of one job; `stages` is empty when every chunk was a warm-up chunk."""

    chunks: int
    warmup_skipped: int
    stages: dict[str, StageStats]
    frames_per_second: float | None  # steady video frames / steady total seconds

    @property
    def steady_chunks(self) -> int:
        return self.chunks - self.warmup_skipped


def summarize(table: pa.Table, warmup_chunks: int = DEFAULT_WARMUP_CHUNKS) -> TimingSummary:
    """Mean and p90 seconds per stage over one job's chunks, skipping those with chunk_index < warmup_chunks.

    The first chunks pay for allocation, autotuning and compilation, so they are left out of the
    steady state; the summary says how many were skipped.
    """
    if warmup_chunks < 0:
        raise ValueError(f"warmup_chunks must be >= 0, got {warmup_chunks}")
    jobs = {(r["run_id"], r["job_id"]) for r in table.select(["run_id", "job_id"]).to_pylist()}
    if len(jobs) > 1:
        raise ValueError(f"summarize takes one job's rows; got {len(jobs)} (run_id, job_id) pairs")
    chunk_index = table.column("chunk_index").to_numpy()
    steady = chunk_index >= warmup_chunks
    if not steady.any():
        return TimingSummary(len(chunk_index), len(chunk_index), {}, None)
    seconds = {stage: table.column(f"{stage}_seconds").to_numpy()[steady] for stage in STAGES}
    stages = {
        stage: StageStats(float(values.mean()), float(np.percentile(values, 90)))
        for stage, values in seconds.items()
    }
    total = seconds["total"].sum()
    frames = table.column("video_frames").to_numpy()[steady].sum()
    fps = float(frames / total) if total > 0 else None
    return TimingSummary(len(chunk_index), int((~steady).sum()), stages, fps)
