"""The `worldgen` command line: render | report | checkpoint write."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worldgen import __version__
from worldgen.config import PRESETS


def _render(args: argparse.Namespace) -> int:
    from worldgen.generator import ChunkedGenerator, EngineSettings
    from worldgen.manifest import ManifestError, load_manifest
    from worldgen.render import render_job

    try:
        jobs = load_manifest(args.job or args.manifest)
    except ManifestError as error:
        print(error, file=sys.stderr)
        return 2
    out = Path(args.out)
    settings = EngineSettings(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        attention=args.attention,
        prompt_cache=str(out / ".prompt-cache"),
    )
    generator = ChunkedGenerator(settings)
    for job in jobs:
        result = render_job(generator, job, out, write_video=args.write_video, force=args.force)
        print(f"{job.job_id}: {result['status']} -> {result['job_dir']}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from worldgen.report import build_report

    report = build_report(args.folder, plot_path=args.plot, warmup_chunks=args.warmup_chunks)
    print(report.table)
    print(f"plot: {report.plot}")
    return 0


def _checkpoint_write(args: argparse.Namespace) -> int:
    from worldgen.checkpoints import write_checkpoint

    files = write_checkpoint(args.preset, Path(args.out), seed=args.seed, num_shards=args.shards)
    print(f"wrote a random {args.preset} checkpoint to {files.root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worldgen", description="Render videos with a chunked, causal LingBot-World-Fast world model."
    )
    parser.add_argument("--version", action="version", version=f"worldgen {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    render = commands.add_parser("render", help="render one job or a whole manifest, without Prefect")
    source = render.add_mutually_exclusive_group(required=True)
    source.add_argument("--job", help="a one-job .json file (same fields as a manifest row)")
    source.add_argument("--manifest", help="a .jsonl or .yaml manifest")
    render.add_argument("--out", required=True, help="output folder; one subfolder per job")
    render.add_argument("--model", default="tiny", help="preset name (random weights) or model folder")
    render.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    render.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA, else f32)")
    render.add_argument("--attention", default="auto", help="auto|cudnn|flash|efficient|math")
    render.add_argument("--no-write-video", dest="write_video", action="store_false")
    render.add_argument("--force", action="store_true", help="re-render jobs whose outputs are up to date")
    render.set_defaults(handler=_render)

    report = commands.add_parser("report", help="summarise every timings.parquet under a folder")
    report.add_argument("folder")
    report.add_argument("--plot", default=None, help="PNG path (default: FOLDER/timings.png)")
    report.add_argument("--warmup-chunks", type=int, default=1)
    report.set_defaults(handler=_report)

    checkpoint = commands.add_parser("checkpoint", help="checkpoint tools")
    checkpoint_commands = checkpoint.add_subparsers(
        dest="checkpoint_command", metavar="ACTION", required=True
    )
    write = checkpoint_commands.add_parser("write", help="write a random checkpoint in the release layout")
    write.add_argument("out")
    write.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--shards", type=int, default=16)
    write.set_defaults(handler=_checkpoint_write)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
