"""Accuracy under input perturbations: Gaussian noise, FGSM and PGD (L-infinity), own implementations.

Sizes are given in pixel units (images scaled to [0, 1]) and converted to the normalised inputs the
models read through the data set's ``mean``/``std``; perturbed images are kept inside the valid
pixel range. Attacks are untargeted, on the loaded (plain float) models, so gradients are exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NOISE_LEVELS = (0.05, 0.1, 0.2)  # Gaussian sigma, pixel units
EPSILONS = (0.01, 0.03, 0.1)  # L-infinity radius, pixel units


def _check_sizes(name: str, values) -> tuple[float, ...]:
    values = tuple(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of numbers >= 0, got {values!r}")
    return values


class Perturber:
    """Noise and attacks for inputs normalised as ``(pixel - mean) / std``."""

    def __init__(self, mean: float, std: float, *, pgd_steps: int = 10, seed: int = 0) -> None:
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std!r}")
        if isinstance(pgd_steps, bool) or not isinstance(pgd_steps, int) or pgd_steps < 1:
            raise ValueError(f"pgd_steps must be an int >= 1, got {pgd_steps!r}")
        self.mean, self.std, self.pgd_steps, self.seed = mean, std, pgd_steps, seed
        self.low, self.high = (0.0 - mean) / std, (1.0 - mean) / std

    def _clip(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(self.low, self.high)

    def noise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        return self._clip(x + torch.randn(x.shape, generator=generator, device=x.device) * (sigma / self.std))

    @staticmethod
    def _loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), y)
            (grad,) = torch.autograd.grad(loss, x)
        return grad

    def fgsm(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float) -> torch.Tensor:
        """One signed-gradient step of size ``epsilon`` (Goodfellow et al.)."""
        return self._clip(x + (epsilon / self.std) * self._loss_gradient(model, x, y).sign())

    def pgd(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float) -> torch.Tensor:
        """``pgd_steps`` signed steps of ``2.5 * epsilon / steps``, projected on the epsilon ball (Madry et al.).

        Starts from the clean input (no random start), so the result is deterministic.
        """
        radius = epsilon / self.std
        step = 2.5 * radius / self.pgd_steps
        adversarial = x.clone()
        for _ in range(self.pgd_steps):
            adversarial = adversarial + step * self._loss_gradient(model, adversarial, y).sign()
            adversarial = self._clip(torch.max(torch.min(adversarial, x + radius), x - radius))
        return adversarial


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(-1) == y).float().mean())


def robustness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, perturber: Perturber, *,
               noise_levels=NOISE_LEVELS, epsilons=EPSILONS, batch_size: int = 250) -> dict:
    """Accuracy of ``model`` (eval mode) on ``(x, y)``: clean, per noise level, per FGSM and PGD epsilon."""
    noise_levels, epsilons = _check_sizes("noise_levels", noise_levels), _check_sizes("epsilons", epsilons)
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"x and y must be non-empty and of equal length, got {len(x)} and {len(y)}")
    model.eval()
    sums: dict[str, float] = {}

    def add(key: str, value: float, n: int) -> None:
        sums[key] = sums.get(key, 0.0) + value * n

    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        add("clean", _accuracy(model, xb, yb), len(xb))
        for sigma in noise_levels:
            add(f"noise {sigma:g}", _accuracy(model, perturber.noise(xb, sigma), yb), len(xb))
        for epsilon in epsilons:
            add(f"fgsm {epsilon:g}", _accuracy(model, perturber.fgsm(model, xb, yb, epsilon), yb), len(xb))
            add(f"pgd {epsilon:g}", _accuracy(model, perturber.pgd(model, xb, yb, epsilon), yb), len(xb))
    return {key: total / len(x) for key, total in sums.items()}
