"""`sgsc inspect`: per-layer widths, bytes and totals of a packed model file."""

from __future__ import annotations

from sgsc import export


def _inspect(args) -> int:
    print(export.format_summary(export.summarize(args.file)))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="per-layer widths, bytes and totals of a packed model file")
    parser.add_argument("file", help="a .sgsc file written by `sgsc export`")
    parser.set_defaults(func=_inspect)
