"""`sgsc demo`: quantize a small trained network with the fused op and show what each bit depth costs.

Trains a small MLP on scikit-learn's bundled digits (seconds, no download), then quantizes every
layer per output channel at several bit depths, printing each layer's relative error and the
test accuracy of the whole quantized model.
"""

from __future__ import annotations

import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from sgsc.ops import fake_quantize

BIT_DEPTHS = (8, 6, 4, 3, 2)


def _digits(seed: int):
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.25, random_state=seed, stratify=y)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def _train(model, x, y, steps: int, seed: int):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def exponent_for(weight: torch.Tensor, bits: float) -> torch.Tensor:
    """Per-row exponent whose grid just covers the row's largest magnitude at `bits` bits."""
    peak = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.ceil(torch.log2(peak / (2 ** (bits - 1) - 1)))


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def run(seed: int = 0, steps: int = 400) -> int:
    x_train, y_train, x_test, y_test = _digits(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    start = time.perf_counter()
    _train(model, x_train, y_train, steps, seed)
    print(f"trained a 64-128-64-10 MLP on digits in {time.perf_counter() - start:.1f}s: float32 test accuracy {_accuracy(model, x_test, y_test):.4f}\n")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    originals = {name: m.weight.detach().clone() for name, m in layers}
    header = f"{'bits':>4} " + " ".join(f"{'layer ' + name + ' rel.err':>18}" for name, _ in layers) + f" {'test acc':>9}"
    print(header)
    for bits in BIT_DEPTHS:
        errors = []
        for name, layer in layers:
            w = originals[name]
            b = torch.full((w.shape[0],), float(bits))
            q = fake_quantize(w, b, exponent_for(w, bits))
            errors.append(((q - w).norm() / w.norm()).item())
            layer.weight.data.copy_(q)
        acc = _accuracy(model, x_test, y_test)
        print(f"{bits:>4} " + " ".join(f"{err:>18.4f}" for err in errors) + f" {acc:>9.4f}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="quantize a small trained model at several bit depths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=400)
    parser.set_defaults(func=lambda args: run(args.seed, args.steps))
