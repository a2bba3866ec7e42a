"""The `sgsc` command line: one module per command, each adding its subcommand through `register`.

The CLI is the one layer that may import from every other; nothing below imports it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that provide `register(subparsers)`; each sets `func(args) -> int | None` on its parser.
COMMAND_MODULES = [f"sgsc.cli.{name}" for name in ("doctor", "demo", "train", "export", "inspect", "eval", "experiment")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgsc", description="Safety-Guided Self Compression for PyTorch")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = args.func(args)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
