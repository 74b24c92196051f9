"""The `worldgen` command line: render | report | checkpoint | bench."""

from __future__ import annotations

import argparse
import sys

from worldgen import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worldgen", description="Render videos with a chunked, causal LingBot-World-Fast world model."
    )
    parser.add_argument("--version", action="version", version=f"worldgen {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
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
