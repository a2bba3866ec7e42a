"""`sgsc train` and `sgsc compress`: the trainer's command line, one flag per TrainConfig field.

`sgsc compress --init-from CKPT` starts from a trained checkpoint instead of a fresh model. Run
under `torchrun --nproc_per_node=N -m sgsc train ...` for DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from sgsc.ops.reference import ROUNDING_MODES
from sgsc.train import DATA_NAMES, LR_SCHEDULES, TrainConfig, train
from sgsc.train.preservation import METHODS as PRESERVATION_METHODS

HELP = {
    "data": "digits (bundled), fashion-mnist, mnist, auto (IDX files if found, else digits) or names",
    "data_dir": "directory of the four IDX files (or the names.txt file for --data names)",
    "model": "model name, if given it must be the data's: paper_cnn, or char_decoder for names",
    "model_config": 'JSON overrides of the model config, e.g. \'{"channels": [16, 32]}\'',
    "init_bits": "bits every group starts with",
    "rounding": "quantizer rounding: nearest or floor",
    "init_from": "checkpoint whose model to start from",
    "steps": "total optimiser steps (a resumed run continues up to this many)",
    "batch_size": "training examples per step and process",
    "lr": "Adam learning rate of weights, biases and norms",
    "quant_lr": "Adam learning rate of bits and exponents",
    "exponent_lr": "Adam learning rate of exponents apart from bits (unset: they train at --quant-lr)",
    "lr_schedule": "learning-rate schedule of every group: constant, or cosine (decays to 0 at the last step)",
    "warmup_steps": "plain training steps before compression starts",
    "alpha": "weight of the L1 term (mean |w|)",
    "gamma": "weight of the size term (bits per weight)",
    "lambda_": "weight of the preservation loss",
    "restore": "raise the bits of recently lowered groups when preservation accuracy drops",
    "prune": "physically remove channels/heads/units whose bits stay at zero",
    "fraction": "preservation set size as a fraction of the training set, in (0, 1]",
    "preservation_method": "criteria (scored by --preservation-weights) or random (same-size ablation)",
    "preservation_weights": "shares of the gradcam, uncertainty and diversity criteria",
    "preservation_batch": "preservation examples per step",
    "k": "steps between safety checks",
    "threshold": "tolerated drop of preservation accuracy (or rise of loss, for names)",
    "seed": "seed of initialisation, data order and preservation set",
    "eval_every": "steps between evaluations (metrics log, progress bar)",
    "checkpoint_every": "steps between checkpoints (0: only at the end)",
    "out_dir": "output directory (default runs/<timestamp>)",
    "resume": "continue the run whose checkpoint is in --out, bit for bit",
    "plots": "write PNG plots at the end",
    "progress": "show a progress bar",
    "threads": "torch CPU threads",
    "device": "auto, cpu or cuda",
}
CHOICES = {"data": DATA_NAMES, "rounding": ROUNDING_MODES, "lr_schedule": LR_SCHEDULES, "preservation_method": PRESERVATION_METHODS,
           "device": ("auto", "cpu", "cuda")}
FLAGS = {"lambda_": ["--lambda"], "out_dir": ["--out"], "k": ["-k", "--k"]}
OPTIONAL_NUMBERS = {"threads": int, "exponent_lr": float}  # default None, so the type can't be read off it


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, defaults: TrainConfig) -> None:
    flags = FLAGS.get(f.name, ["--" + f.name.replace("_", "-")])
    default = getattr(defaults, f.name)
    kwargs = {"dest": f.name, "default": default, "help": HELP[f.name] + " (default: %(default)s)"}
    if f.name in CHOICES:
        kwargs["choices"] = CHOICES[f.name]
    if isinstance(default, bool):
        kwargs["action"] = argparse.BooleanOptionalAction
    elif f.name == "model_config":
        kwargs["type"] = json.loads
    elif f.name == "preservation_weights":
        kwargs.update(type=float, nargs=3, metavar=("GRADCAM", "UNCERTAINTY", "DIVERSITY"))
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
        kwargs["type"] = type(default)
    elif f.name in OPTIONAL_NUMBERS:
        kwargs["type"] = OPTIONAL_NUMBERS[f.name]
    parser.add_argument(*flags, **kwargs)


def _add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        _add_field(parser, f, defaults)
    parser.add_argument("--unsafe", action="store_true", help="the unsafe baseline: --lambda 0 --no-restore")
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
            f"test accuracy {result['test_accuracy']:.4f}  test loss {result['test_loss']:.4f}  "
            f"bits/weight {result['average_bits']:.3f}  model.sgsc {result['file_bytes']} bytes  "
            f"steps {result['steps']} in {result['seconds']:.1f}s  -> {result['out_dir']}"
        )
    return 0


def _run_compress(args: argparse.Namespace) -> int:
    if args.init_from is None and not args.resume:
        raise SystemExit("sgsc compress: --init-from CHECKPOINT is required (the trained model to compress)")
    return run(args)


def register(subparsers) -> None:
    """Add the `train` and `compress` subcommands."""
    _add_parser(subparsers, "train", "train a model with safety-guided self-compression").set_defaults(func=run)
    compress = _add_parser(subparsers, "compress", "compress a trained checkpoint (--init-from) with safety guidance")
    compress.set_defaults(func=_run_compress)
