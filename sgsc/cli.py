"""The `sgsc` command line. Each feature module adds its own subcommand through `register`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that provide `register(subparsers)`; each sets `func(args) -> int | None` on its parser.
COMMAND_MODULES = ["sgsc.doctor", "sgsc.demo", "sgsc.packed_cli", "sgsc.train_cli", "sgsc.experiment_cli"]


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
