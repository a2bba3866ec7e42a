"""Checkpoints: everything a bit-exact resume needs, written atomically; and the model one holds.

A checkpoint holds model, optimiser, RNG states, the :class:`~sgsc.train.safety.RunState` (step,
best value, bits snapshot, preservation set, history) and the config; ``resume=True`` continues a
run bit for bit. Only plain containers and tensors are stored, so it loads with ``weights_only``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import platform
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sgsc._io import atomic_write
from sgsc.export.architecture import ArchitectureTooLarge, rebuild_on_meta
from sgsc.export.validate import build_budget
from sgsc.nn.surgery import freeze_empty_layers
from sgsc.nn.zoo import build_model, model_name
from sgsc.ops import native
from sgsc.train.config import RESUMABLE_CHANGES, TrainConfig
from sgsc.train.distributed import rank_world
from sgsc.train.safety import RunState

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "sgsc.train"


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_state(saved: dict) -> None:
    torch.set_rng_state(saved["torch"])
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, state: RunState, config: dict, *,
                    teacher: torch.Tensor | None = None, continuation: dict | None = None) -> None:
    """Write everything a bit-exact resume needs, atomically (temp file, then ``os.replace``).

    ``config`` is the run's settings (plain values), checked on resume. A zoo model's architecture
    is recorded so :func:`model_from_checkpoint` can rebuild it; any other model is resumed by
    loading the state into a model the caller builds. ``teacher``: the reference's outputs on the
    preservation set, which the distillation term matches (the reference itself is gone by then).
    ``continuation``: at the end of a run, the training state before the model was rolled back to
    the last state that passed (``model_state``, ``optimizer_state``, ``state``), which a resume
    that trains on continues from; ``model_state`` is then the model the run returned.
    """
    name, architecture = _architecture(model)
    record = {
        "format": CHECKPOINT_FORMAT,
        "config": config,
        "model_name": name,
        "model_config": architecture,
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "state": state.to_record(),
        "teacher": teacher,
        "continuation": continuation,
        "rng": rng_state(),
        "world_size": rank_world()[1],  # the data order depends on it: resume on as many processes
        "numerics": numerics(),
    }
    atomic_write(path, lambda handle: torch.save(record, handle))


def numerics() -> dict[str, str | int]:
    """What decides a run's floating-point results besides its inputs and seed: the CPU, torch and the
    instruction sets its kernels and ours run, the thread count. Resuming where any differs continues
    the run, but not bit for bit as it would have gone on where it was written."""
    return {"cpu": _cpu_model(), "torch": str(torch.__version__),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "sgsc_cpu_isa": native.cpu_isa(),
            "threads": torch.get_num_threads()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def warn_if_numerics_differ(saved: dict, path: Path) -> None:
    """Warn when the checkpoint ``saved`` was written where floating point rounds differently from here."""
    then, now = saved.get("numerics"), numerics()
    if not isinstance(then, dict):  # written before checkpoints recorded it
        return
    differ = [f"{key} {then.get(key)!r} then, {value!r} now" for key, value in now.items() if then.get(key) != value]
    if differ:
        warnings.warn(f"resume: {path} was written where floating point may round differently ({'; '.join(differ)}): "
                      "the run continues, but not bit for bit as it would have where it was written", stacklevel=3)


def _architecture(model: nn.Module) -> tuple[str | None, dict | None]:
    try:
        name = model_name(model)
    except TypeError:  # not a zoo model: nothing to rebuild it from
        return None, None
    return name, dataclasses.asdict(model.config)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors on the CPU), checked as a stranger's file
    is: only tensors and plain containers (``weights_only``), every field of its type, a step no further
    than the run it records, and a zoo architecture whose tensors fit in ``2 x`` the file's size + 64 MiB
    (built on the meta device, stopped as soon as it outgrows that). Anything else is a ``ValueError``
    naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    file_bytes = path.stat().st_size
    if file_bytes == 0:
        raise ValueError(f"{path}: empty (0 bytes), not an sgsc training checkpoint")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path}: holds objects other than tensors and plain containers, which a checkpoint "
                         "never does (refused: loading them could run code)") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a readable sgsc training checkpoint ({type(exc).__name__}: "
                         f"{_first_line(exc)})") from None
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an sgsc training checkpoint")
    _check_fields(path, record)
    _check_architecture(path, record, file_bytes)
    return record


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if len(text) <= 200 else text[:200] + "..."


_FIELDS = {"config": dict, "model_state": dict, "optimizer_state": dict, "state": dict, "rng": dict,
           "world_size": int}


def _check_fields(path: Path, record: dict) -> None:
    for key, kind in _FIELDS.items():
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            raise ValueError(f"{path}: field {key!r} must be a {kind.__name__}, got {type(record.get(key)).__name__}")
    if record["world_size"] < 1:
        raise ValueError(f"{path}: world_size must be >= 1, got {record['world_size']}")
    bad = [key for key, value in record["model_state"].items() if not isinstance(key, str)
           or not isinstance(value, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: model_state entry {str(bad[0])[:80]!r} is not a named tensor")
    step, steps = record["state"].get("step"), record["config"].get("steps")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{path}: state step must be an int >= 0, got {step!r}")
    if isinstance(steps, int) and step > steps:
        raise ValueError(f"{path}: state step {step} is past the {steps} steps its run was configured for")
    name, config = record.get("model_name"), record.get("model_config")
    if name is not None and (not isinstance(name, str) or not isinstance(config, dict)):
        raise ValueError(f"{path}: model_name must be a zoo model's name with a model_config dict")


# A checkpoint's architecture may build this much beyond twice the file's own size (its optimiser state and
# history make a checkpoint larger than its model, never smaller).
_BUILD_ALLOWANCE = 64 << 20


def _check_architecture(path: Path, record: dict, file_bytes: int) -> None:
    name = record.get("model_name")
    if name is None:
        return
    try:
        meta = rebuild_on_meta(name, record["model_config"], max_tensors=build_budget(file_bytes))
    except ArchitectureTooLarge as exc:
        raise ValueError(f"{path}: model_config {exc} (a file of {file_bytes:,} bytes may build fewer)") from None
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: model_config does not describe a {str(name)[:40]}: {_first_line(exc)}") from None
    needed = sum(t.numel() * t.element_size() for t in meta.state_dict().values())
    if needed > 2 * file_bytes + _BUILD_ALLOWANCE:
        raise ValueError(f"{path}: model_config builds {needed:,} bytes of tensors from a {file_bytes:,}-byte "
                         f"checkpoint (at most 2x its size + {_BUILD_ALLOWANCE >> 20} MiB)")


def model_from_checkpoint(record: dict, device: torch.device | str = "cpu") -> nn.Module:
    """The (possibly pruned) model a checkpoint holds, rebuilt from its config (zoo models only)."""
    if record.get("model_name") is None:
        raise ValueError("the checkpoint holds a model from outside sgsc's zoo, which cannot be rebuilt from it; "
                         "build the model and load_state_dict(record['model_state']) into it")
    model = build_model(record["model_name"], record["model_config"])
    model.load_state_dict(record["model_state"])
    freeze_empty_layers(model)
    return model.to(device)


def check_resumable(config: TrainConfig, saved: dict, path: Path) -> None:
    """Refuse to resume ``saved`` (a checkpoint's config) under a ``config`` that would change its trajectory."""
    # a field a checkpoint predates ran at its default: new fields default to the old behaviour
    check_settings(dataclasses.asdict(config), {**dataclasses.asdict(TrainConfig()), **saved}, path)


def check_settings(current: dict, saved: dict, path: Path) -> None:
    """Refuse a resume whose ``current`` settings differ from the ``saved`` ones outside
    :data:`~sgsc.train.config.RESUMABLE_CHANGES`; settings ``saved`` lacks are not compared."""
    free = RESUMABLE_CHANGES if current.get("lr_schedule") == "constant" else tuple(
        k for k in RESUMABLE_CHANGES if k != "steps")
    # a decaying schedule is a function of the run's length, so a longer resume would change its past
    differ = [k for k in current if k not in free and k in saved and json.dumps(current[k]) != json.dumps(saved[k])]
    if differ:
        detail = ", ".join(f"{k}={saved[k]!r} in the checkpoint, {current[k]!r} now" for k in differ)
        raise ValueError(f"resume: {path} was written by a different config ({detail})")
