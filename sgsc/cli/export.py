"""`sgsc export`: a training checkpoint written as a packed model file, and either as an ONNX file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sgsc import export
from sgsc.cli.inspect import MODEL_HELP, architecture
from sgsc.nn.zoo import model_name
from sgsc.train.checkpoint import load_checkpoint, model_from_checkpoint


def _is_packed(path: Path) -> bool:
    # a packed file is safetensors (8-byte header length, then JSON); a checkpoint is a torch zip
    with open(path, "rb") as handle:
        return handle.read(9)[8:] == b"{"


def _export_onnx(source, path: str, model_spec: str | None = None) -> None:
    """``source``: a model or a packed file's path; ``model_spec``: ``--model``, for a file of a model outside the zoo."""
    from sgsc.export.onnx import export_onnx, format_onnx_summary, zoo_example_input

    if isinstance(source, Path):
        header = export.read_header(source)
        if "model" not in header:
            if model_spec is None:
                raise ValueError(f"{source}: the file records a model outside the zoo: pass --model pkg.module:factory")
            export.load_packed(source, model=architecture(model_spec))  # the architecture is checked against the file
            raise ValueError(f"{source}: ONNX export of a model outside the zoo is not supported yet: sgsc.export.onnx "
                             "takes its example input and layer grouping from the zoo")
        name, config = header["model"], header["config"]
    else:
        name, config = model_name(source), dataclasses.asdict(source.config)
    print(format_onnx_summary(export_onnx(source, path, zoo_example_input(name, config))))


def _export(args) -> int:
    if args.output is None and args.onnx is None:
        raise SystemExit("sgsc export: give -o/--output FILE.sgsc, --onnx FILE.onnx, or both")
    source = Path(args.checkpoint)
    if not source.is_file():
        raise SystemExit(f"sgsc export: no such file: {source}")
    if _is_packed(source):
        if args.output is not None:
            raise SystemExit(f"sgsc export: {source} is already a packed file; -o takes a checkpoint")
        _export_onnx(source, args.onnx, args.model)
        return 0
    record = load_checkpoint(args.checkpoint)
    trained_on = record["config"]
    data = {"name": trained_on["data"], "seed": trained_on["seed"]}
    model = model_from_checkpoint(record)
    if args.output is not None:
        print(export.format_summary(export.export_packed(model, args.output, data=data)))
    if args.onnx is not None:
        _export_onnx(model, args.onnx)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write a training checkpoint as a packed model file or ONNX file")
    parser.add_argument("checkpoint", help="checkpoint.pt written by `sgsc train` / `sgsc compress`, or a packed "
                                           "file (with --onnx only)")
    parser.add_argument("-o", "--output", help="the packed file to write (written atomically)")
    parser.add_argument("--onnx", metavar="PATH", help="also (or only) write an ONNX file with integer weights "
                                                       "(needs pip install 'sgsc[onnx]'; written atomically)")
    parser.add_argument("--model", metavar="PKG.MODULE:FACTORY", help=MODEL_HELP + " (with a packed file and --onnx)")
    parser.set_defaults(func=_export)
