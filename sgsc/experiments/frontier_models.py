"""The models the frontier compares methods on: what is model-specific in :mod:`sgsc.experiments.frontier`.

Each seed needs a float model and its snapshot (where every method starts), the float, PTQ and
reference rows, a preservation set, fixed-bit QAT from the snapshot, and a way to export a model,
load it back and score it. The paper CNN does these through the zoo trainer and Table I's code
(:mod:`sgsc.experiments.vision`); ResNet-20 through the public API only, as a user's own model
(:mod:`sgsc.experiments.resnet`: plain PyTorch float training, ``sgsc.quantize_model``,
``sgsc.save_packed``, ``sgsc.load_packed(path, model=...)``).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

import sgsc
from sgsc.experiments import baselines, resnet, vision
from sgsc.experiments.common import thaw_bits
from sgsc.nn.zoo import build_model
from sgsc.train import preservation

MODELS = ("paper_cnn", "resnet20")
TITLES = {"paper_cnn": "Paper CNN", "resnet20": "ResNet-20"}


class PaperCNN:
    """The paper's CNN through the zoo trainer, as Table I trains and measures it."""

    def __init__(self, settings) -> None:
        self.settings = settings

    def data(self, seed: int) -> vision.VisionRunData:
        return vision.load_run_data(self.settings.vision(), seed)

    @staticmethod
    def train_split(run: vision.VisionRunData):
        return run.data.train

    @staticmethod
    def describe(run: vision.VisionRunData) -> dict:
        return {"source": run.data.source, "train": len(run.data.train), "test": len(run.data.test)}

    def prepare(self, seed: int, run: vision.VisionRunData, seed_dir: Path) -> tuple[dict, list[int], dict]:
        """The float, PTQ and reference rows, the preservation set and the float training record."""
        s = self.settings
        final, start, seconds = vision.train_float(s.vision(), seed, run)
        torch.save({"config": dataclasses.asdict(start.config), "state": start.state_dict()}, seed_dir / "start.pt")
        rows = {"float": {**vision.measure("float", final, run, seed_dir)[0], "train_seconds": seconds}}
        for bits in s.ptq_bits:
            rows[f"ptq_{bits}"] = vision.measure(f"ptq_{bits}", baselines.post_training_quantize(final, bits), run,
                                                 seed_dir)[0]
        reference = thaw_bits(copy.deepcopy(start), s.init_bits)
        rows["reference"] = vision.measure("reference", reference, run, seed_dir)[0]
        keep = preservation.build(reference, run.data.train, s.fraction, seed=seed).tolist()
        return rows, keep, {"steps": s.float_steps + s.steps}

    def start(self, seed_dir: Path, run: vision.VisionRunData) -> tuple[nn.Module, nn.Module]:
        """The float snapshot and a copy with learnable bits from ``init_bits``."""
        saved = torch.load(seed_dir / "start.pt", weights_only=True)
        model = build_model("paper_cnn", saved["config"])
        model.load_state_dict(saved["state"])
        return model, thaw_bits(copy.deepcopy(model), self.settings.init_bits)

    def qat(self, snapshot: nn.Module, bits: int, seed: int, run: vision.VisionRunData) -> nn.Module:
        plain = dataclasses.replace(self.settings.vision().train_config(seed), rounding="nearest")
        return baselines.fixed_bit_qat(snapshot, bits, plain, run.trainer_view).model

    def measure(self, name: str, model: nn.Module, run: vision.VisionRunData, seed_dir: Path) -> dict:
        return vision.measure(name, model, run, seed_dir)[0]


class ResNet20:
    """He et al.'s ResNet-20 as a user's model: only the public API touches it."""

    def __init__(self, settings) -> None:
        self.settings = settings
        s = settings
        self.table = resnet.ResNetSettings(
            data=s.data, data_dir=s.data_dir, seeds=s.seeds, float_steps=s.float_steps, steps=s.steps,
            batch_size=s.batch_size, lr=s.lr, quant_lr=s.quant_lr, lr_schedule=s.lr_schedule, k=s.k,
            max_drop=s.max_drop, init_bits=s.init_bits, progress=False, **s.model_config)

    def data(self, seed: int):
        return resnet.load_data(self.table, seed)

    @staticmethod
    def train_split(run):
        return run.train

    @staticmethod
    def describe(run) -> dict:
        return {"source": run.source, "train": len(run.train), "test": len(run.test)}

    def prepare(self, seed: int, run, seed_dir: Path) -> tuple[dict, list[int], dict]:
        """As :class:`PaperCNN`; the preservation set is chosen from a seeded pool of the training split
        (the ResNet table's ``preserve_pool``/``preserve_examples``), as scoring all of it would cost minutes."""
        s, table = self.settings, self.table
        rows = {"float": resnet.run_method("float", table, seed, run, seed_dir)}
        for bits in s.ptq_bits:
            name = f"ptq_{bits}"
            model = baselines.post_training_quantize(
                sgsc.quantize_model(resnet.load_float(resnet.float_paths(seed_dir)[0], table, run)), bits)
            rows[name] = resnet.measure_packed(name, model, run, table, seed_dir)
        _, reference = self.start(seed_dir, run)
        rows["reference"] = resnet.measure_packed("reference", copy.deepcopy(reference), run, table, seed_dir)
        x, y = run.train.tensors
        keep = resnet.preservation_indices(reference, x, y, table, seed)
        return rows, keep, {"steps": rows["float"]["steps"], "loss_curve": rows["float"].get("loss_curve")}

    def start(self, seed_dir: Path, run) -> tuple[nn.Module, nn.Module]:
        snapshot = resnet.load_float(resnet.float_paths(seed_dir)[1], self.table, run)
        return snapshot, sgsc.quantize_model(copy.deepcopy(snapshot), init_bits=self.settings.init_bits)

    def qat(self, snapshot: nn.Module, bits: int, seed: int, run) -> nn.Module:
        return resnet.fixed_bit_qat(snapshot, bits, self.table, seed, run).model

    def measure(self, name: str, model: nn.Module, run, seed_dir: Path) -> dict:
        return resnet.measure_packed(name, model, run, self.table, seed_dir)


def adapter(settings):
    """The model-specific half of the frontier for ``settings.model``."""
    return {"paper_cnn": PaperCNN, "resnet20": ResNet20}[settings.model](settings)
