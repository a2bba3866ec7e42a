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
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


# Errors a user's input causes (a damaged or hostile file, a missing path, a bad value, a run that diverged):
# one line, exit 2.
# Anything else is a bug in sgsc and keeps its traceback.
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError)
ERROR_STATUS = 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except EXPECTED_ERRORS as exc:
        if args.debug:
            raise
        print(f"sgsc: {exc}", file=sys.stderr)  # the messages name their file: "<file>: <what is wrong>"
        return ERROR_STATUS
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
