"""`sgsc export`: a training checkpoint written as a packed model file."""

from __future__ import annotations

from sgsc import export
from sgsc.train.checkpoint import load_checkpoint, model_from_checkpoint


def _export(args) -> int:
    record = load_checkpoint(args.checkpoint)
    trained_on = record["config"]
    data = {"name": trained_on["data"], "dir": trained_on["data_dir"], "seed": trained_on["seed"]}
    summary = export.export_packed(model_from_checkpoint(record), args.output, data=data)
    print(export.format_summary(summary))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write a training checkpoint as a packed model file")
    parser.add_argument("checkpoint", help="checkpoint.pt written by `sgsc train` / `sgsc compress`")
    parser.add_argument("-o", "--output", required=True, help="the packed file to write (written atomically)")
    parser.set_defaults(func=_export)
