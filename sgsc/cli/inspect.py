"""`sgsc inspect`: per-layer widths, bytes and totals of a packed model file."""

from __future__ import annotations

from sgsc import export

MAX_BYTES_HELP = "refuse a model that would need more memory than this (default: 64 MiB + 256 x the file's size)"


def _inspect(args) -> int:
    print(export.format_summary(export.summarize(args.file, max_bytes=args.max_bytes)))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="per-layer widths, bytes and totals of a packed model file")
    parser.add_argument("file", help="a .sgsc file written by `sgsc export`")
    parser.add_argument("--max-bytes", type=int, help=MAX_BYTES_HELP)
    parser.set_defaults(func=_inspect)
