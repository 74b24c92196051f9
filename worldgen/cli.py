"""The `worldgen` command line: render | bench | report | checkpoint write."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from worldgen import __version__
from worldgen.config import PRESETS


def _render(args: argparse.Namespace) -> int:
    from worldgen.generator import (
        ChunkedGenerator,
        EngineSettings,
        JobInputError,
        check_control_modes,
        model_preset,
    )
    from worldgen.manifest import ManifestError, load_manifest
    from worldgen.render import render_job

    try:
        jobs = load_manifest(args.job or args.manifest)
    except ManifestError as error:
        return _refused(error)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _refused(f"--out {out}: not a folder")
    try:  # what cannot run is refused before the model loads: nothing renders while anything is wrong
        settings = EngineSettings(**engine_options(args))
        check_control_modes(jobs, model_preset(settings.model))
        generator = ChunkedGenerator(settings)
    except ValueError as error:
        return _refused(error)
    failed = []
    for job in jobs:
        try:
            result = render_job(generator, job, out, write_video=args.write_video, force=args.force)
        except Exception as error:  # one job's failure does not stop the batch (as in the Prefect flow)
            if not isinstance(error, JobInputError):  # bad input explains itself; anything else, in full
                traceback.print_exc()
            print(f"{job.job_id}: failed: {error}", file=sys.stderr)
            failed.append(job.job_id)
            continue
        print(f"{job.job_id}: {result['status']} -> {result['job_dir']}")
    if failed:
        print(f"{len(failed)} of {len(jobs)} jobs failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _refused(error: object) -> int:
    """A usage or input error: its message, no traceback (nothing ran yet)."""
    print(f"worldgen: error: {error}", file=sys.stderr)
    return 2


def _bench(args: argparse.Namespace) -> int:
    import torch

    from worldgen.bench import BenchSettings, format_summary, run_bench

    settings = BenchSettings(
        out=Path(args.out),
        preset=args.preset,
        device=args.device,
        dtype=args.dtype,
        vae_dtype=args.vae_dtype,
        attention=args.attention,
        **geometry_options(args),
        chunks=args.chunks,
        warmup_chunks=args.warmup_chunks,
        seed=args.seed,
        weights_seed=args.weights_seed,
        compare_plain=args.compare == "plain",
        compile=args.compile,
        fp8=args.fp8,
        fp8_fast_accum=args.fp8_fast_accum,
        triton_kernels=args.triton_kernels,
        gelu_epilogue=args.gelu_epilogue,
        overlap=args.overlap,
        profile=args.profile,
        sync_check=args.sync_check,
    )
    try:
        settings = settings.resolved()  # bad settings are refused before any model is built
    except ValueError as error:
        return _refused(error)
    if settings.sync_check and torch.device(settings.device).type != "cuda":
        return _refused(f"--sync-check is CUDA's sync debug mode, not for --device {settings.device}")
    summary = run_bench(settings)
    print(format_summary(summary))
    print(f"results: {Path(args.out) / 'bench.json'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from worldgen.report import build_report

    try:
        report = build_report(args.folder, plot_path=args.plot, warmup_chunks=args.warmup_chunks)
    except (ValueError, OSError) as error:  # a folder without timing files, a bad option
        return _refused(error)
    print(report.table)
    print(f"plot: {report.plot}")
    return 0


def _checkpoint_write(args: argparse.Namespace) -> int:
    from worldgen.checkpoints import write_checkpoint

    files = write_checkpoint(args.preset, Path(args.out), seed=args.seed, num_shards=args.shards)
    print(f"wrote a random {args.preset} checkpoint to {files.root}")
    return 0


VAE_DTYPE_HELP = "float32|bfloat16 (default: bf16 on CUDA, float32 on a CPU and on the bench's plain path)"
# Spelled out rather than imported: `--help` needs no torch (tests keep it equal to ATTENTION_BACKENDS).
ATTENTION_HELP = "auto|cudnn|flash|efficient|math|default|fa4|fa3|fp8"


def add_engine_arguments(
    parser: argparse.ArgumentParser, model: str = "tiny", device: str = "cpu", model_folders: bool = True
) -> None:
    """The options of a render, shared by `worldgen render`, `python -m flows.render` and `flows.scaleout`
    (which renders presets only: `model_folders=False`)."""
    models = "preset name (random weights)" + (" or model folder" if model_folders else "")
    parser.add_argument("--model", default=model, help=f"{models} (default: {model})")
    parser.add_argument("--device", default=device, help=f"cpu, cuda or cuda:N (default: {device})")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA, else f32)")
    parser.add_argument("--vae-dtype", default=None, help=VAE_DTYPE_HELP)
    parser.add_argument("--attention", default="auto", help=ATTENTION_HELP)
    add_fast_arguments(parser)
    parser.add_argument("--overlap", action="store_true", help="decode each chunk during the next one's DiT")
    parser.add_argument("--no-write-video", dest="write_video", action="store_false")


FAST_DEFAULT = "default: on for a bf16 model on CUDA"


def add_fast_arguments(parser: argparse.ArgumentParser) -> None:
    """The fast path's switches, shared by render and bench: compile and the fused kernels (None when not
    given: EngineSettings.resolved picks), fp8 layers and their accumulation."""
    on_off = argparse.BooleanOptionalAction
    parser.add_argument(
        "--compile", action=on_off, default=None, help=f"torch.compile the DiT blocks ({FAST_DEFAULT})"
    )
    parser.add_argument(
        "--triton-kernels",
        action=on_off,
        default=None,
        help="DiT q/k norm + RoPE (with --fp8: norm + fp8 quantisation), VAE norm + SiLU in Triton "
        f"({FAST_DEFAULT})",
    )
    parser.add_argument(
        "--gelu-epilogue",
        action=on_off,
        default=None,
        help=f"the FFN's GELU in its GEMM's epilogue ({FAST_DEFAULT}, without --fp8)",
    )
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="fp8 (e4m3, row-scaled) matmuls in the DiT (bf16 model; e4m3 kernels on CUDA sm89+, else "
        "emulated)",
    )
    parser.add_argument(
        "--fp8-fast-accum",
        action=on_off,
        default=True,
        help="the fp8 GEMMs' fast accumulation (default: on; off sums as exactly as bf16 GEMMs do, "
        "10-14%% slower)",
    )


def add_geometry_arguments(parser: argparse.ArgumentParser, frame_num: int) -> None:
    """The synthetic job's geometry (the published figure's by default), shared by `worldgen bench` and
    `python -m flows.scaleout`."""
    parser.add_argument("--height", type=int, default=480, help="frame height in pixels (default: 480)")
    parser.add_argument("--width", type=int, default=832, help="frame width in pixels (default: 832)")
    parser.add_argument(
        "--frame-num", type=int, default=frame_num, help=f"video frames (default: {frame_num})"
    )
    parser.add_argument("--chunk-size", type=int, default=3, help="latent frames per chunk (default: 3)")
    parser.add_argument(
        "--window", type=int, default=21, help="local_attn_size in latent frames; -1: all (default: 21)"
    )
    parser.add_argument("--sink", type=int, default=3, help="sink_size in latent frames (default: 3)")


ENGINE_OPTIONS = (
    "model",
    "device",
    "dtype",
    "vae_dtype",
    "attention",
    "compile",
    "fp8",
    "fp8_fast_accum",
    "triton_kernels",
    "gelu_epilogue",
    "overlap",
)


def engine_options(args: argparse.Namespace) -> dict[str, object]:
    """The EngineSettings fields that `add_engine_arguments` parsed."""
    return {name: getattr(args, name) for name in ENGINE_OPTIONS}


# BenchSettings fields of `add_geometry_arguments`' options.
GEOMETRY_OPTIONS = ("height", "width", "frame_num", "chunk_size", "window", "sink")


def geometry_options(args: argparse.Namespace) -> dict[str, int]:
    """The BenchSettings fields that `add_geometry_arguments` parsed."""
    return {name: getattr(args, name) for name in GEOMETRY_OPTIONS}


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
    add_engine_arguments(render)
    render.add_argument("--force", action="store_true", help="re-render jobs whose outputs are up to date")
    render.set_defaults(handler=_render)

    bench = commands.add_parser(
        "bench", help="full-size benchmark with seeded random weights (see docs/benchmarks.md)"
    )
    bench.add_argument("--out", required=True, help="output folder: bench.json, <path>/timings.parquet")
    bench.add_argument("--preset", default="lingbot-world-fast", choices=sorted(PRESETS))
    bench.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    bench.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: bf16 on CUDA, else f32)")
    bench.add_argument("--vae-dtype", default=None, help=f"fast path: {VAE_DTYPE_HELP}")
    bench.add_argument("--attention", default="auto", help=f"fast path: {ATTENTION_HELP}")
    add_geometry_arguments(bench, frame_num=201)
    bench.add_argument("--chunks", type=int, default=None, help="time only the first N chunks")
    bench.add_argument("--warmup-chunks", type=int, default=1, help="left out of the steady state")
    bench.add_argument("--seed", type=int, default=0, help="noise seed of the job")
    bench.add_argument("--weights-seed", type=int, default=0)
    bench.add_argument("--compare", choices=["plain"], default=None, help="also run the plain path")
    add_fast_arguments(bench)  # the fast path's (the plain path has none of them)
    bench.add_argument(
        "--overlap",
        action="store_true",
        help="decode each chunk during the next one's DiT (on CUDA with --no-sync-check)",
    )
    bench.add_argument("--profile", action="store_true", help="profile one more chunk per path")
    bench.add_argument(
        "--sync-check",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the last timed chunk's DiT passes under sync debug mode 'error' (default: on CUDA)",
    )
    bench.set_defaults(handler=_bench)

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
