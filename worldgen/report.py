"""Timing reports over a render folder: one table row per job and a PNG of per-chunk stage times.

Every `timings.parquet` under the folder is read and checked against TIMING_SCHEMA one by one: an unreadable
or foreign file is skipped with a warning, and the report lists it. Used by `worldgen report DIR` and the
Prefect report flow; imports neither torch nor Prefect.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from worldgen.timing import (
    DEFAULT_WARMUP_CHUNKS,
    TimingSummary,
    atomic_output,
    check_timing_schema,
    summarize,
)

TIMINGS_FILE = "timings.parquet"
DEFAULT_PLOT_NAME = "timings.png"

# The stages a chunk's total time is made of (generate_next_chunk = denoise + update_cache + decode + glue).
PART_STAGES = ("denoise", "update_cache", "decode", "write")
REPORTED_STAGES = (*PART_STAGES, "total")
_STAGE_COLORS = dict(
    zip(REPORTED_STAGES, ("tab:blue", "tab:orange", "tab:green", "tab:red", "black"), strict=True)
)


SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("job_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("chunks", pa.int32(), nullable=False),
        pa.field("warmup_skipped", pa.int32(), nullable=False),
        *(
            pa.field(f"{stage}_{stat}_seconds", pa.float64())
            for stage in REPORTED_STAGES
            for stat in ("mean", "p90")
        ),
        pa.field("frames_per_second", pa.float64()),
    ]
)


def find_timing_files(folder: str | os.PathLike[str]) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    files = sorted(folder.rglob(TIMINGS_FILE))
    if not files:
        raise FileNotFoundError(f"{folder}: no {TIMINGS_FILE} files under it")
    return files


@dataclass(frozen=True)
class SkippedFile:
    """A timing file left out of the report, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Timings:
    rows: pa.Table  # the chunk rows of every readable file, without schema metadata
    skipped: list[SkippedFile]


def load_timings(folder: str | os.PathLike[str]) -> Timings:
    """All chunk rows of every readable timings.parquet under `folder`, as one table.

    A file that does not read (empty, truncated, corrupt pages) or is not a worldgen timing table is skipped
    with a warning naming it: one bad job does not hide the others. None readable is an error.
    """
    tables, skipped = [], []
    for path in find_timing_files(folder):
        try:
            tables.append(_read_timing_file(path))
        except (OSError, ValueError, pa.ArrowException) as error:
            # check_timing_schema's message starts with the path, which the warning and report give once;
            # Arrow's may span lines, which would break the report's list.
            reason = " ".join(str(error).removeprefix(f"{path}: ").split())
            skipped.append(SkippedFile(path, reason))
            warnings.warn(f"skipped {path}: {reason}", stacklevel=2)
    if not tables:
        listed = "; ".join(f"{file.path} ({file.reason})" for file in skipped)
        raise ValueError(f"{folder}: no readable {TIMINGS_FILE} under it; skipped {listed}")
    return Timings(pa.concat_tables(tables), skipped)


def _read_timing_file(path: Path) -> pa.Table:
    """Every row of one file: reading it whole finds corrupt pages, which the footer alone would not show."""
    with pq.ParquetFile(path) as parquet:  # unlike pq.read_table, its errors do not repeat the path
        table = parquet.read()
    check_timing_schema(table.schema, str(path))
    return table.replace_schema_metadata()  # each job's settings differ; the columns are the same


@dataclass(frozen=True)
class JobSummary:
    job_id: str
    run_id: str
    summary: TimingSummary


def summarize_jobs(table: pa.Table, warmup_chunks: int = DEFAULT_WARMUP_CHUNKS) -> list[JobSummary]:
    """One steady-state summary per (job_id, run_id), sorted by job_id."""
    keys = sorted({(r["job_id"], r["run_id"]) for r in table.select(["job_id", "run_id"]).to_pylist()})
    return [
        JobSummary(job_id, run_id, summarize(_job_rows(table, job_id, run_id), warmup_chunks))
        for job_id, run_id in keys
    ]


def _job_rows(table: pa.Table, job_id: str, run_id: str) -> pa.Table:
    mask = pc.and_(pc.equal(table["job_id"], job_id), pc.equal(table["run_id"], run_id))
    return table.filter(mask).sort_by("chunk_index")


def format_table(jobs: list[JobSummary], markdown: bool = False, skipped: Sequence[SkippedFile] = ()) -> str:
    """Per job: chunks, warm-up chunks skipped, steady-state mean seconds per stage, frames per second;
    below it, the timing files left out and why."""
    stage_columns = [f"{stage} s" for stage in REPORTED_STAGES]
    header = ["job", "run", "chunks", "warm-up", *stage_columns, "total p90 s", "frames/s"]
    rows = []
    for job in jobs:
        s = job.summary
        if s.stages:
            seconds = [f"{s.stages[stage].mean:.3f}" for stage in REPORTED_STAGES]
            p90 = f"{s.stages['total'].p90:.3f}"
        else:  # no steady state to report: every chunk was a warm-up chunk
            seconds, p90 = ["-"] * len(stage_columns), "-"
        fps = "-" if s.frames_per_second is None else f"{s.frames_per_second:.2f}"
        rows.append([job.job_id, job.run_id[:8], str(s.chunks), str(s.warmup_skipped), *seconds, p90, fps])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
        lines = [
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in [header, *rows]
        ]
    if any(not job.summary.stages for job in jobs):
        lines += ["", "-: no steady state (every chunk is a warm-up chunk)"]
    if skipped:
        lines += ["", f"skipped {len(skipped)} timing file(s):"]
        lines += [f"- {file.path}: {file.reason}" for file in skipped]  # a list in markdown too
    return "\n".join(lines)


def summary_table(jobs: list[JobSummary]) -> pa.Table:
    """One row per job: chunk counts, steady-state mean and p90 seconds per stage, frames per second."""
    rows = []
    for job in jobs:
        s = job.summary
        row = {
            "job_id": job.job_id,
            "run_id": job.run_id,
            "chunks": s.chunks,
            "warmup_skipped": s.warmup_skipped,
        }
        for stage in REPORTED_STAGES:
            stats = s.stages.get(stage)
            row[f"{stage}_mean_seconds"] = stats.mean if stats else None
            row[f"{stage}_p90_seconds"] = stats.p90 if stats else None
        row["frames_per_second"] = s.frames_per_second
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)


def plot_timings(
    table: pa.Table,
    jobs: list[JobSummary],
    path: str | os.PathLike[str],
    warmup_chunks: int = DEFAULT_WARMUP_CHUNKS,
) -> Path:
    """A PNG: per-chunk stage seconds of every job (left), steady-state mean seconds per stage (right)."""
    path = Path(path)
    figure = Figure(figsize=(13, max(4.0, 1.5 + 0.4 * len(jobs))), layout="constrained")
    per_chunk, per_job = figure.subplots(1, 2, width_ratios=(3, 2))

    for job in jobs:
        rows = _job_rows(table, job.job_id, job.run_id)
        chunk_index = rows["chunk_index"].to_numpy()
        for stage in REPORTED_STAGES:
            per_chunk.plot(
                chunk_index,
                rows[f"{stage}_seconds"].to_numpy(),
                color=_STAGE_COLORS[stage],
                marker=".",
                alpha=0.7,
                label=stage if job is jobs[0] else None,
            )
    if warmup_chunks > 0:
        per_chunk.axvspan(-0.5, warmup_chunks - 0.5, color="0.9", label="warm-up")
    per_chunk.set(title="seconds per chunk", xlabel="chunk index", ylabel="seconds")
    per_chunk.legend(loc="upper right")

    def steady_means(stage: str) -> np.ndarray:
        return np.array([j.summary.stages[stage].mean if j.summary.stages else 0.0 for j in jobs])

    y = np.arange(len(jobs))
    left = np.zeros(len(jobs))
    for stage in PART_STAGES:
        means = steady_means(stage)
        per_job.barh(y, means, left=left, color=_STAGE_COLORS[stage], label=stage)
        left += means
    # What the stage timers do not cover (noise, host glue), so each bar ends at the mean total.
    per_job.barh(y, np.maximum(steady_means("total") - left, 0.0), left=left, color="0.7", label="other")
    labels = [j.job_id if j.summary.stages else f"{j.job_id} (warm-up only)" for j in jobs]
    per_job.set_yticks(y, labels)
    per_job.invert_yaxis()
    per_job.set(
        title="steady-state mean per chunk", xlabel=f"seconds (warm-up chunks skipped: {warmup_chunks})"
    )
    per_job.legend(loc="lower right")

    with atomic_output(path) as tmp_path:
        figure.savefig(tmp_path, format="png", dpi=100)
    return path


@dataclass(frozen=True)
class Report:
    jobs: list[JobSummary]
    table: str  # ends with the skipped files, if any
    plot: Path
    skipped: list[SkippedFile]


def build_report(
    folder: str | os.PathLike[str],
    plot_path: str | os.PathLike[str] | None = None,
    warmup_chunks: int = DEFAULT_WARMUP_CHUNKS,
    markdown: bool = False,
) -> Report:
    """Summary table and plot (default `folder/timings.png`) over every readable timings.parquet under
    `folder`; the plot's folder is created if missing."""
    timings = load_timings(folder)
    jobs = summarize_jobs(timings.rows, warmup_chunks)
    plot = plot_timings(
        timings.rows,
        jobs,
        Path(folder) / DEFAULT_PLOT_NAME if plot_path is None else plot_path,
        warmup_chunks,
    )
    return Report(jobs, format_table(jobs, markdown, timings.skipped), plot, timings.skipped)
