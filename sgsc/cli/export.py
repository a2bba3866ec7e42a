"""`sgsc export`: a training checkpoint written as a packed model file, and either as an ONNX file."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from sgsc import export
from sgsc.cli.inspect import MODEL_HELP, architecture
from sgsc.nn.zoo import model_name
from sgsc.train.checkpoint import load_checkpoint, model_from_checkpoint

# The dtypes of the example input `--input-dtype` names: images and features, or token ids.
INPUT_DTYPES = {"float32": torch.float32, "int64": torch.int64}
SHAPE_EXAMPLE = "1,3,32,32"


def _is_packed(path: Path) -> bool:
    # a packed file is safetensors (8-byte header length, then JSON); a checkpoint is a torch zip
    with open(path, "rb") as handle:
        return handle.read(9)[8:] == b"{"


def parse_shape(text: str) -> tuple[int, ...]:
    """``--input-shape``'s value, e.g. ``"1,3,32,32"``: positive integers separated by commas."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isascii() and part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"--input-shape {text!r}: expected positive integers separated by commas, batch first, "
                         f"e.g. --input-shape {SHAPE_EXAMPLE}")
    return tuple(int(part) for part in parts)


def _own_model_flags(args) -> list[str]:
    """The flags given that only a packed file of a model outside the zoo takes."""
    return [flag for flag, value in (("--model", args.model), ("--input-shape", args.input_shape),
                                     ("--input-dtype", args.input_dtype)) if value is not None]


def _refuse_own_model_flags(args, what: str) -> None:
    given = _own_model_flags(args)
    if given:
        raise ValueError(f"{what}, which knows its architecture and input: {' and '.join(given)} "
                         f"{'is' if len(given) == 1 else 'are'} for a packed file of a model outside the zoo")


def _example_input(source: Path, model, shape: tuple[int, ...], dtype_name: str) -> torch.Tensor:
    """Zeros of ``shape`` (token id 0 for int64: valid for every vocabulary), checked to run through ``model``.

    The values do not shape the traced graph, only the shape and dtype do; a model that cannot run on
    them fails here with the flags named, not inside torch.onnx.
    """
    described = f"a {dtype_name} input of shape {','.join(map(str, shape))}"
    try:
        example = torch.zeros(shape, dtype=INPUT_DTYPES[dtype_name])
        with torch.no_grad():
            model(example)
    except Exception as exc:  # the user's model on the user's shape: any failure means the wrong input
        reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ValueError(f"{source}: the model does not run on {described} ({type(exc).__name__}: {reason}); "
                         "check --input-shape and --input-dtype") from exc
    return example


def _export_own_model(source: Path, path: str, args, shape: tuple[int, ...] | None) -> None:
    """ONNX of a packed file that records its own architecture (format version 4): ``--model`` rebuilds
    it, ``--input-shape``/``--input-dtype`` give the example input to trace."""
    from sgsc.export.onnx import export_onnx, format_onnx_summary

    missing = [flag for flag, value in (
        ("--model pkg.module:factory", args.model),
        (f"--input-shape, the shape of the example input ONNX export traces (e.g. --input-shape {SHAPE_EXAMPLE}; "
         "--input-dtype int64 for token ids)", shape),
    ) if value is None]
    if missing:
        raise ValueError(f"{source}: the file records a model outside the zoo: pass {' and '.join(missing)}")
    user_model = architecture(args.model)
    loaded = export.load_packed(source, model=copy.deepcopy(user_model))  # the architecture is checked against the file
    example = _example_input(source, loaded, shape, args.input_dtype or "float32")
    print(format_onnx_summary(export_onnx(source, path, example, model=user_model)))


def _export_onnx(source, path: str, args, shape: tuple[int, ...] | None = None) -> None:
    """``source``: a model or a packed file's path; ``shape``: ``--input-shape``, parsed."""
    from sgsc.export.onnx import export_onnx, format_onnx_summary, zoo_example_input

    if isinstance(source, Path):
        header = export.read_header(source)
        if "model" not in header:
            _export_own_model(source, path, args, shape)
            return
        _refuse_own_model_flags(args, f"{source}: the file names zoo model {header['model']!r}")
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
    shape = None if args.input_shape is None else parse_shape(args.input_shape)  # before any file is read
    if _is_packed(source):
        if args.output is not None:
            raise SystemExit(f"sgsc export: {source} is already a packed file; -o takes a checkpoint")
        _export_onnx(source, args.onnx, args, shape)
        return 0
    _refuse_own_model_flags(args, f"{source}: a checkpoint's model is rebuilt from the zoo")  # before anything is written
    record = load_checkpoint(args.checkpoint)
    trained_on = record["config"]
    data = {"name": trained_on["data"], "seed": trained_on["seed"]}
    model = model_from_checkpoint(record)
    if args.output is not None:
        print(export.format_summary(export.save_packed(model, args.output, data=data)))
    if args.onnx is not None:
        _export_onnx(model, args.onnx, args)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write a training checkpoint as a packed model file or ONNX file")
    parser.add_argument("checkpoint", help="checkpoint.pt written by `sgsc train` / `sgsc compress`, or a packed "
                                           "file (with --onnx only)")
    parser.add_argument("-o", "--output", help="the packed file to write (written atomically)")
    parser.add_argument("--onnx", metavar="PATH", help="also (or only) write an ONNX file with integer weights "
                                                       "(needs pip install 'sgsc[onnx]'; written atomically)")
    zoo = "; a zoo model's file or checkpoint knows its own and refuses it"
    parser.add_argument("--model", metavar="PKG.MODULE:FACTORY", help=MODEL_HELP + " (with --onnx)" + zoo)
    parser.add_argument("--input-shape", metavar="N,...", help="the shape of the example input ONNX export traces, "
                        f"batch first, e.g. {SHAPE_EXAMPLE}: needed, with --model, for a file of a model outside the "
                        "zoo (the ONNX file's batch dimension is dynamic, the others fixed as given)" + zoo)
    parser.add_argument("--input-dtype", choices=tuple(INPUT_DTYPES), help="the example input's dtype with "
                        "--input-shape: float32 (default), or int64 for token ids (the example is zeros, token id 0)"
                        + zoo)
    parser.set_defaults(func=_export)
