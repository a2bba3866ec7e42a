"""`sgsc eval`: load a packed model file and score it on a data set."""

from __future__ import annotations

import json
import os
import time

import torch

from sgsc import export
from sgsc.cli.inspect import MAX_BYTES_HELP, MODEL_HELP, architecture, weight_bytes
from sgsc.export.reader import RUNTIMES
from sgsc.train.config import DATA_NAMES, TrainConfig
from sgsc.train.task import evaluate, load_data


def _data_for(args, header: dict):
    """The data set to score on: the flags where given, else the name and seed the file records.

    Paths come from the flags and ``$SGSC_DATA_DIR`` only, never from the file: a file that named a
    directory would choose what its reader opens. (The header's checks bound the recorded seed.)
    """
    recorded = header.get("data") or {}
    name = args.data or recorded.get("name")
    if name is None:
        raise ValueError(f"{args.file}: the file does not record its data set; pass --data")
    if name not in DATA_NAMES:
        raise ValueError(f"{args.file}: the file records data set {name!r}, which is not one of {DATA_NAMES}; "
                         "pass --data")
    seed = args.seed if args.seed is not None else recorded.get("seed", 0)
    return load_data(TrainConfig(data=name, data_dir=args.data_dir, seed=seed, progress=False))


def _eval(args) -> int:
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:  # torch's error for a device string it cannot parse
        raise ValueError(f"--device {args.device!r}: {exc}") from None
    header = export.read_header(args.file)
    user_model = architecture(args.model)  # before the data set is read, as are the checks below
    if "model" not in header and user_model is None:
        raise ValueError(f"{args.file}: the file records a model outside the zoo: pass --model pkg.module:factory")
    data = _data_for(args, header)
    started = time.perf_counter()
    model = export.load_packed(args.file, device=device, runtime=args.runtime, max_bytes=args.max_bytes,
                               model=user_model)
    loaded_in = time.perf_counter() - started
    result = {split: evaluate(model, getattr(data, split)) for split in ("val", "test")}
    file_bytes = os.path.getsize(args.file)
    weights = weight_bytes(model)
    if args.json:
        print(json.dumps({"file": args.file, "file_bytes": file_bytes, "runtime": args.runtime,
                          "resident_weight_bytes": weights, "data": data.source, **result}))
        return 0
    print(f"{args.file}: {file_bytes} bytes, loaded in {loaded_in * 1000:.1f} ms on the {args.runtime} runtime "
          f"({weights} bytes of weights resident), data {data.source}")
    for split, scores in result.items():
        print(f"  {split:<5} loss {scores['loss']:.4f}  accuracy {scores['accuracy']:.4f}  ({len(getattr(data, split))} examples)")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="load a packed model file and score it on a data set")
    parser.add_argument("file", help="a .sgsc file written by `sgsc export`")
    parser.add_argument("--data", choices=DATA_NAMES, help="data set (default: the one recorded in the file)")
    parser.add_argument("--data-dir", help="directory of the IDX files, or the names file (default: $SGSC_DATA_DIR, then ../shared/data)")
    parser.add_argument("--seed", type=int, help="split seed (default: as recorded)")
    parser.add_argument("--device", default="cpu", help="device to run on (default: cpu)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="float",
                        help="float: dequantized float layers; packed: layers that compute from the bit-packed "
                             "codes, memory at about the file's size (default: %(default)s)")
    parser.add_argument("--max-bytes", type=int, help=MAX_BYTES_HELP)
    parser.add_argument("--model", metavar="PKG.MODULE:FACTORY", help=MODEL_HELP)
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    parser.set_defaults(func=_eval)
