"""Each hyper-parameter is declared once, in CompressConfig, and every entry point takes it from there:
SelfCompression (the method's fields), compress (all of them), the zoo trainer's TrainConfig and the CLI."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from own_models import TinyResNet

import sgsc
from sgsc.cli import build_parser
from sgsc.cli.train import config_from_args
from sgsc.train import CompressConfig, SelfCompression, TrainConfig, compress, load_checkpoint

FIELDS = dataclasses.fields(CompressConfig)
# a value each field accepts other than its default, and one it refuses
OTHER = {"gamma": 0.05, "alpha": 0.01, "lambda_": 0.5, "preservation_loss": "task", "max_drop": 0.02,
         "confidence": 0.9, "guard_fraction": 0.2, "k": 7, "patience": 3, "restore": False, "prune": False,
         "preservation_method": "random", "preservation_weights": (1.0, 0.0, 2.0), "preservation_batch": 8,
         "preservation_pool": 5000,
         "steps": 12, "batch_size": 16, "lr": 2e-3, "quant_lr": 0.1, "exponent_lr": 0.02, "lr_schedule": "cosine",
         "warmup_steps": 3, "seed": 5, "eval_every": 4, "checkpoint_every": 6, "progress": False, "device": "cpu"}
BAD = {"gamma": -1.0, "alpha": float("nan"), "lambda_": -0.1, "preservation_loss": "kl", "max_drop": -0.01,
       "confidence": 1.0, "guard_fraction": 0.0, "k": 0, "patience": 0, "restore": "yes", "prune": 1, "preservation_method": "all",
       "preservation_weights": (0.0, 0.0, 0.0), "preservation_batch": 0, "preservation_pool": 0, "steps": -1,
       "batch_size": 0, "lr": 0.0,
       "quant_lr": -1.0, "exponent_lr": 0.0, "lr_schedule": "step", "warmup_steps": -2, "seed": -1,
       "eval_every": 0, "checkpoint_every": -1, "progress": None, "device": "tpu"}


def test_the_tables_above_cover_every_field():
    assert set(OTHER) == set(BAD) == {f.name for f in FIELDS}


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_every_field_has_its_help_default_and_check(field):
    assert field.metadata["help"] and callable(field.metadata["check"])
    with pytest.raises((ValueError, TypeError), match=field.name):
        CompressConfig(**{field.name: BAD[field.name]})
    assert getattr(CompressConfig(**{field.name: OTHER[field.name]}), field.name) == OTHER[field.name]


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_the_cli_flag_of_every_field_is_generated_from_it(field):
    parser = build_parser()
    default = config_from_args(parser.parse_args(["train"]))
    assert getattr(default, field.name) == getattr(TrainConfig(), field.name)
    flag = field.metadata.get("flags", ["--" + field.name.replace("_", "-")])[-1]
    value = OTHER[field.name]
    if isinstance(value, bool):
        argv = [f"--{'' if value else 'no-'}{flag[2:]}"]
    elif isinstance(value, tuple):
        argv = [flag, *map(str, value)]
    else:
        argv = [flag, str(value)]
    assert getattr(config_from_args(parser.parse_args(["train", *argv])), field.name) == value
    subcommand = parser._subparsers._group_actions[0].choices["train"]
    action = next(a for a in subcommand._actions if a.dest == field.name)
    assert action.help.startswith(field.metadata["help"])


def test_no_entry_point_restates_a_hyper_parameter():
    names = {f.name for f in FIELDS}
    for entry in (compress, SelfCompression.__init__):
        parameters = inspect.signature(entry).parameters
        assert not names & set(parameters), entry  # they come in through **hyper or config=
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    assert issubclass(TrainConfig, CompressConfig) and sgsc.CompressConfig is CompressConfig


def test_self_compression_takes_the_methods_fields_and_refuses_the_loops():
    model = sgsc.quantize_model(TinyResNet())
    method = set(CompressConfig.method_fields())
    for field in FIELDS:
        value = OTHER[field.name]
        if field.name in ("max_drop", "restore"):
            continue  # the contract needs a guard; tested with one in test_selfcompress
        if field.name in method:
            comp = SelfCompression(model, None, **{field.name: value})
            assert getattr(comp.config, field.name) == value
            comp.close()
        else:
            with pytest.raises(TypeError, match=f"{field.name} is a setting of sgsc.compress's loop"):
                SelfCompression(model, None, **{field.name: value})


def test_compress_takes_a_config_and_keywords_on_top_of_it(digits_split, tmp_path):
    (x, y), _ = digits_split
    torch.manual_seed(0)
    model = sgsc.quantize_model(TinyResNet())
    config = CompressConfig(steps=3, batch_size=16, gamma=0.2, progress=False, eval_every=3)
    result = compress(model, (x[:100], y[:100]), config, gamma=0.4, lr=1e-2, out_dir=tmp_path)
    assert result.steps == 3 and isinstance(result, sgsc.CompressResult)
    recorded = load_checkpoint(tmp_path / "checkpoint.pt")["config"]
    assert {key: recorded[key] for key in ("gamma", "lr", "batch_size", "steps")} == {
        "gamma": 0.4, "lr": 1e-2, "batch_size": 16, "steps": 3}
    with pytest.raises(TypeError, match="unexpected keyword argument 'gama'"):
        compress(model, (x[:100], y[:100]), config, gama=0.4)
