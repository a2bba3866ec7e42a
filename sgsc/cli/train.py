"""`sgsc train` and `sgsc compress`: the trainer's command line, one flag per TrainConfig field, generated
from the field (its help, default, choices and type are declared once, in sgsc.train.config).

`sgsc compress --init-from CKPT` starts from a trained checkpoint instead of a fresh model. Run
under `torchrun --nproc_per_node=N -m sgsc train ...` for DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from sgsc.train import TrainConfig, train


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, defaults: TrainConfig) -> None:
    """One flag from a config field: its help, default, choices and type all come from the field."""
    meta = f.metadata
    default = getattr(defaults, f.name)
    kwargs = {"dest": f.name, "default": default, "help": meta["help"] + " (default: %(default)s)"}
    choices = getattr(meta["check"], "choices", None)
    if choices is not None:
        kwargs["choices"] = choices
    if isinstance(default, bool):
        kwargs["action"] = argparse.BooleanOptionalAction
    elif isinstance(default, dict):
        kwargs["type"] = json.loads
    elif "nargs" in meta:
        kwargs.update(type=float, nargs=meta["nargs"], metavar=meta["metavar"])
    elif "type" in meta:  # default None, so the type can't be read off it
        kwargs["type"] = meta["type"]
    elif default is not None:
        kwargs["type"] = type(default)
    parser.add_argument(*meta.get("flags", ["--" + f.name.replace("_", "-")]), **kwargs)


def _add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        _add_field(parser, f, defaults)
    parser.add_argument("--unsafe", action="store_true", help="the unsafe baseline: --lambda 0 --no-restore "
                        "(no preservation term, no guard, no contract)")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig an argparse namespace of `sgsc train`/`compress` describes."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["preservation_weights"] = tuple(values["preservation_weights"])
    if getattr(args, "unsafe", False):
        values.update(lambda_=0.0, restore=False)
    if values["out_dir"] is None:
        if values["resume"]:
            raise ValueError("--resume needs --out, the directory of the run to continue")
        values["out_dir"] = f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    """Train with the parsed arguments and print a one-line summary (rank 0)."""
    result = train(config_from_args(args))
    if os.environ.get("RANK", "0") == "0":  # torchrun's rank; the process group is gone by now
        print(
            f"test accuracy {result.scores['test_accuracy']:.4f}  test loss {result.scores['test_loss']:.4f}  "
            f"bits/weight {result.average_bits:.3f}  model.sgsc {result.file_bytes} bytes  "
            f"steps {result.steps} in {result.seconds:.1f}s  -> {result.out_dir}"
        )
        if result.contract is not None:
            print(_contract_line(result.contract))
    return 0


def _contract_line(contract: dict) -> str:
    """One line on the contract: what came back and how far it is from the reference on the guard."""
    if contract["returned"] is None:
        return (f"contract max_drop {contract['max_drop']:g}: no compressed state was within it on the guard; "
                f"returned the reference (the model as compression started, step {contract['returned_step']})")
    guard = contract["returned"]
    return (f"contract max_drop {contract['max_drop']:g} at confidence {contract['confidence']:g}: returned the state "
            f"of step {contract['returned_step']}, guard drop {guard['drop']:+.4f} (bound {guard['bound']:.4f}, "
            f"n={guard['n']})")


def _run_compress(args: argparse.Namespace) -> int:
    if args.init_from is None and not args.resume:
        raise SystemExit("sgsc compress: --init-from CHECKPOINT is required (the trained model to compress)")
    return run(args)


def register(subparsers) -> None:
    """Add the `train` and `compress` subcommands."""
    _add_parser(subparsers, "train", "train a model with safety-guided self-compression").set_defaults(func=run)
    compress = _add_parser(subparsers, "compress", "compress a trained checkpoint (--init-from) with safety guidance")
    compress.set_defaults(func=_run_compress)
