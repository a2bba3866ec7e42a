"""What every experiment shares: run metadata, JSON output, float models and files, latency, statistics.

The float baseline is the zoo model with its quantizers out of the way (:func:`float_mode`): bits
and exponents frozen so that the rounding step is ``2^-23`` of a channel's largest initial weight
(float32's own resolution at that magnitude) and the clamp bound 256 times that weight, so training
sees float weights. It is stored and timed as a plain float32 model (``nn.Conv2d``/``nn.Linear``
holding the raw weights), which is what a user would ship without sgsc.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

import sgsc
from sgsc._io import atomic_write
from sgsc.export import float_layer
from sgsc.nn import quantized_layers, replace_submodule
from sgsc.nn.zoo import build_model, model_name

FLOAT_BITS = 32.0  # clamp bound 2^31 steps: 2^23 steps for the largest weight, 2^8 of headroom
_FLOAT_MANTISSA = 23
_REPO = Path(__file__).resolve().parent.parent.parent


# ---- metadata and output --------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The checkout's commit, with ``-dirty`` when tracked files differ from it (None outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {_cpu_name()}"


def metadata(device: torch.device, commit: str | None) -> dict:
    """Where and with what the numbers were measured: machine, device, threads, versions, time, and
    ``commit``, which the caller reads with :func:`git_commit` when its run starts: the code that ran,
    not whatever is checked out when a long run ends."""
    return {
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} logical CPUs, {_cpu_name()}",
        "device": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sgsc": sgsc.__version__,
        "commit": commit,
        "finished_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "argv": sys.argv,
    }


def safety_rule(settings: dict) -> str:
    """How a results file's safety checks judged: the guard contract, or (files written before it) the old
    threshold on the preservation set."""
    if "max_drop" in settings:
        return f"max_drop {settings['max_drop']:g} on the guard set"
    return f"threshold {settings['threshold']:g} on the preservation set"


def write_json(path: str | os.PathLike, record: dict) -> Path:
    """Write ``record`` as indented JSON, atomically."""
    path = Path(path)
    atomic_write(path, (json.dumps(record, indent=1, sort_keys=False) + "\n").encode("utf-8"))
    return path


def mean_std(values: list[float]) -> dict:
    """``{"mean", "std", "n"}``; the sample standard deviation, 0 for a single value."""
    if not values:
        raise ValueError("values must not be empty")
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


# ---- float models ---------------------------------------------------------------------------


@torch.no_grad()
def float_mode(model: nn.Module) -> nn.Module:
    """Put every quantized layer out of the way: bits and exponents fixed, nothing left to learn.

    The exponent must not train here: with Adam, the straight-through gradient it gets from rounding
    errors (random in sign, tiny) still moves it by about the learning rate per step, and a drifting
    grid turns the "float" model into a coarsely quantized one whose raw weights no longer match it.
    """
    for _, layer in quantized_layers(model):
        peak = layer.grouped(layer.weight.detach().float()).abs().amax(dim=1)
        exponent = torch.ceil(torch.log2(peak)) - _FLOAT_MANTISSA
        layer.bits.fill_(FLOAT_BITS)
        layer.exponent.copy_(torch.where(peak > 0, exponent, torch.zeros_like(exponent)))
        layer.bits.requires_grad_(False)
        layer.exponent.requires_grad_(False)
    return model


def _learnable_quantizers(model: nn.Module, bits: float, train_bits: bool) -> nn.Module:
    """Every quantized layer restarted at ``bits`` (exponents re-fitted), exponents trainable."""
    for _, layer in quantized_layers(model):
        layer.reset_quantizer(bits)
        layer.bits.requires_grad_(train_bits)
        layer.exponent.requires_grad_(True)
    return model


def freeze_bits(model: nn.Module, bits: float) -> nn.Module:
    """Set every quantized layer to ``bits`` (exponents re-fitted) and stop ``bits`` from training.

    Exponents train, so a channel's step size can follow its weights: fixed-bit QAT.
    """
    return _learnable_quantizers(model, bits, train_bits=False)


def thaw_bits(model: nn.Module, init_bits: float) -> nn.Module:
    """Every quantized layer back to learnable bits and exponents, starting at ``init_bits``: ready to self-compress."""
    return _learnable_quantizers(model, init_bits, train_bits=True)


def plain_float(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose quantized layers are plain ``nn`` layers holding the raw float weights."""
    plain = copy.deepcopy(model)
    for name, layer in list(quantized_layers(plain)):
        replace_submodule(plain, name, float_layer(layer, layer.weight.detach().clone()))
    return plain.eval()


def save_float(model: nn.Module, path: str | os.PathLike) -> int:
    """Store ``model``'s float weights (no bits or exponents) as a float32 safetensors file; its bytes."""
    state = {key: (value.float() if value.is_floating_point() else value).detach().cpu().contiguous()
             for key, value in plain_float(model).state_dict().items()}
    header = {"model": model_name(model), "config": json.dumps(dataclasses.asdict(model.config))}
    atomic_write(path, safetensors_save(state, metadata=header))
    return Path(path).stat().st_size


def load_float(path: str | os.PathLike) -> nn.Module:
    """The plain float model of a file written by :func:`save_float`, in eval mode."""
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    model = plain_float(build_model(header["model"], json.loads(header["config"])))
    model.load_state_dict(state)
    return model.eval()


def zlib_bytes(path: str | os.PathLike) -> int:
    """Size of the file after zlib level 9: what entropy coding would still save (e.g. on pruned zeros)."""
    return len(zlib.compress(Path(path).read_bytes(), 9))


# ---- latency --------------------------------------------------------------------------------


@torch.inference_mode()
def latencies_ms(models: list[nn.Module], example: torch.Tensor, batch: int, repeats: int,
                 rounds: int = 5) -> list[float]:
    """Median wall time in milliseconds of one forward of ``batch`` copies of ``example``, per model.

    The models are timed side by side: in each of ``min(rounds, repeats)`` rounds every model in turn
    runs its share of the ``repeats`` timed calls, so a slow spell of a shared machine falls on all of
    them rather than on whichever model was being timed then. Two warm-up calls per model come first.
    """
    for name, value in (("repeats", repeats), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    x = example.unsqueeze(0).expand(batch, *example.shape).contiguous()
    for model in models:
        model.eval()
        for _ in range(2):
            model(x)
    rounds = min(rounds, repeats)
    calls = -(-repeats // rounds)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for model, model_times in zip(models, times):
            for _ in range(calls):
                started = time.perf_counter()
                model(x)
                if x.is_cuda:
                    torch.cuda.synchronize()
                model_times.append(time.perf_counter() - started)
    return [1000 * statistics.median(model_times) for model_times in times]
