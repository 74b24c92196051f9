"""Prefect flow: a timing report over every `timings.parquet` under a render folder.

    python -m flows.report out/demo

Writes `report.parquet` (one row per job), `report.md` (the table) and `report.png` (per-chunk and
steady-state stage seconds) into the folder, and publishes the table and the markdown as artifacts. Timing
files that do not read are left out; the markdown and the table artifact's description list them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows import exit_status
from worldgen.report import build_report, summary_table
from worldgen.timing import DEFAULT_WARMUP_CHUNKS, atomic_output


@flow(name="timing-report", log_prints=True)
def timing_report(out_dir: str, warmup_chunks: int = DEFAULT_WARMUP_CHUNKS) -> dict[str, Any]:
    """Summarise every job's timings under `out_dir`; returns the paths written and the files skipped."""
    folder = Path(out_dir)
    report = build_report(folder, plot_path=folder / "report.png", warmup_chunks=warmup_chunks, markdown=True)
    table = summary_table(report.jobs)
    with atomic_output(folder / "report.parquet") as temp:
        pq.write_table(table, temp)
    markdown = f"# worldgen timing report\n\n{report.table}\n\nPlot: `{report.plot}`\n"
    with atomic_output(folder / "report.md") as temp:
        temp.write_text(markdown)
    skipped = [str(file.path) for file in report.skipped]
    description = f"{folder} (skipped: {', '.join(skipped)})" if skipped else str(folder)
    create_table_artifact(table=table.to_pylist(), key="worldgen-timing-report", description=description)
    create_markdown_artifact(markdown=markdown, key="worldgen-timing-report-md")
    print(report.table)
    return {
        "jobs": len(report.jobs),
        "parquet": str(folder / "report.parquet"),
        "markdown": str(folder / "report.md"),
        "plot": str(report.plot),
        "skipped": skipped,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.report", description=timing_report.__doc__)
    parser.add_argument("out_dir", help="a render folder (one subfolder per job)")
    parser.add_argument("--warmup-chunks", type=int, default=DEFAULT_WARMUP_CHUNKS)
    args = parser.parse_args(argv)
    state = timing_report(args.out_dir, warmup_chunks=args.warmup_chunks, return_state=True)
    return exit_status("timing-report", state)


if __name__ == "__main__":
    sys.exit(main())
