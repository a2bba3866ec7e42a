"""The preservation criteria scored per example (Grad-CAM or gradient x activation, uncertainty, the
penultimate embeddings that diversity clusters), and the layers they read found from one forward pass.
:mod:`sgsc.train.preservation` describes each criterion and chooses the set from these scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from sgsc.train.task import model_device

CRITERIA = ("gradcam", "uncertainty", "diversity")
UNCERTAINTY_MEASURES = ("margin", "entropy")
IGNORE_INDEX = -1  # sequence targets below 0 are padding (sgsc.train.data.IGNORE_INDEX)


@dataclass
class Scores:
    """Per-example criterion values (higher = more worth preserving); ``None`` when not computed."""

    gradcam: torch.Tensor | None = None
    uncertainty: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None


# ---- scoring --------------------------------------------------------------------------------


def _as_dataset(dataset: Dataset | Sequence[torch.Tensor]) -> Dataset:
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and all(isinstance(t, torch.Tensor) for t in dataset):
        return TensorDataset(*dataset)
    if not isinstance(dataset, Dataset):
        raise TypeError(
            "dataset must be a torch Dataset of (input, target) pairs or an (inputs, targets) pair, "
            f"got {type(dataset).__name__}"
        )
    return dataset


_PROBE_EXAMPLES = 8  # inputs of the pass that finds the layers


@dataclass
class Layers:
    """What the criteria read: Grad-CAM the output of ``attribution``, diversity the input of ``embedding``."""

    attribution: nn.Module | None = None
    embedding: nn.Module | None = None


def _is_feature_map(output) -> bool:
    # a 1x1 map (global pooling, a squeeze-excitation gate) has no spatial evidence to weigh
    return (isinstance(output, torch.Tensor) and output.is_floating_point() and output.dim() == 4
            and output.shape[2] * output.shape[3] > 1)


def _reads_input(module: nn.Module, inputs: tuple, x: torch.Tensor) -> bool:
    """An ``nn.Embedding`` looking up the model's input ids (not positions, which only share the shape)."""
    if not isinstance(module, nn.Embedding) or not inputs or not isinstance(inputs[0], torch.Tensor):
        return False
    ids = inputs[0]
    return ids is x or (ids.shape == x.shape and torch.equal(ids, x))


class _Probe:
    """Forward hooks on every submodule that record, in the order modules finish:

    * each 4-D feature map, swapped for a fresh leaf, so a backward pass tells which maps the logits
      depend on *directly* (a map feeding a later recorded map reaches the logits only through that
      map's leaf, so the last map reached is the one nearest the head);
    * each ``nn.Embedding`` that reads the input ids;
    * each ``nn.Linear`` with its output shape.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.x = x
        self.maps: list[tuple[nn.Module, torch.Tensor]] = []
        self.token_embeddings: list[nn.Module] = []
        self.linears: list[tuple[nn.Module, torch.Size]] = []
        self.handles = [m.register_forward_hook(self.hook) for m in model.modules() if m is not model]

    def hook(self, module: nn.Module, inputs: tuple, output):
        if isinstance(module, nn.Linear) and isinstance(output, torch.Tensor):
            self.linears.append((module, output.shape))
        if _reads_input(module, inputs, self.x):
            self.token_embeddings.append(module)
        if not _is_feature_map(output):
            return None
        leaf = output.detach().requires_grad_()
        self.maps.append((module, leaf))
        return leaf.clone()  # a non-leaf, so an in-place op after the module stays legal

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _name(model: nn.Module, module: nn.Module) -> str:
    return next((name for name, m in model.named_modules() if m is module), "?") or "<model>"


def _attribution_from(model: nn.Module, probe: _Probe, logits: torch.Tensor) -> nn.Module:
    leaves = [leaf for _, leaf in probe.maps]
    reached = []
    if leaves and logits.requires_grad:
        grads = torch.autograd.grad(logits.float().sum(), leaves, allow_unused=True)
        reached = [module for (module, _), grad in zip(probe.maps, grads) if grad is not None]
    if reached:
        return reached[-1]
    if probe.token_embeddings:
        return probe.token_embeddings[0]
    raise ValueError(
        "attribution_layer: the model has no 4-D feature map (B, C, H, W) with H*W > 1 that reaches the logits "
        "and no nn.Embedding reading its input; pass attribution_layer=<module whose output Grad-CAM weighs>, "
        "or give gradcam a zero share in weights"
    )


def _embedding_from(model: nn.Module, probe: _Probe, logits: torch.Tensor) -> nn.Module:
    fix = ("pass embedding_layer=<the head: the module whose input are the penultimate features>, "
           "or give diversity a zero share in weights")
    if not probe.linears:
        raise ValueError(f"embedding_layer: no nn.Linear ran in the model's forward pass to read features from; {fix}")
    head, shape = probe.linears[-1]
    if shape != logits.shape:
        raise ValueError(
            f"embedding_layer: the last nn.Linear to run, {_name(model, head)!r}, outputs shape {tuple(shape)}, not "
            f"the logits' {tuple(logits.shape)}, so it is not the model's head; {fix}"
        )
    return head


def find_layers(model: nn.Module, x: torch.Tensor, *, attribution: bool = True, embedding: bool = True) -> Layers:
    """The layers the criteria read, found from one forward (and backward) pass of ``model`` on inputs ``x``.

    ``attribution``: the module that produced the last 4-D feature map ``(B, C, H, W)``, ``H*W > 1``,
    that the logits depend on, in execution order (module order would pick a residual block's
    shortcut conv, which runs last, or a squeeze-excitation conv, whose map is 1x1); where a
    container and its last child produce the same map, the container (e.g. a ResNet's last block or
    stage). Without one, the first ``nn.Embedding`` that looks up the input ids (gradient x
    activation on tokens). ``embedding``: the last ``nn.Linear`` to run (``QLinear`` included),
    whose input are the penultimate features; it must output the logits' shape.
    A ``ValueError`` names the argument to pass when either is not found. The model runs in eval
    mode (restored afterwards); parameters receive no gradients.
    """
    was_training = model.training
    probe = _Probe(model, x)
    try:
        model.eval()
        with torch.enable_grad():
            logits = model(x)
            if not isinstance(logits, torch.Tensor):
                raise TypeError(f"model(x) must return a logits tensor, got {type(logits).__name__}")
            found = Layers(attribution=_attribution_from(model, probe, logits) if attribution else None)
        if embedding:
            found.embedding = _embedding_from(model, probe, logits)
        return found
    finally:
        probe.remove()
        model.train(was_training)


class _Capture:
    """Forward hook that swaps the layer's output for a fresh leaf, so its gradient is all we pay for."""

    def __init__(self, layer: nn.Module) -> None:
        self.leaf: torch.Tensor | None = None
        self.handle = layer.register_forward_hook(self)

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        self.leaf = output.detach().requires_grad_()
        return self.leaf.clone()  # a non-leaf, so an in-place op after the layer stays legal


class _InputCapture:
    """Forward pre-hook keeping the (detached) input of the head: the penultimate features."""

    def __init__(self, layer: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = layer.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, inputs: tuple) -> None:
        self.value = inputs[0].detach()


def _target_mask(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"model output {tuple(logits.shape)} does not match targets {tuple(target.shape)} "
            "(expected the targets' shape plus a class dimension)"
        )
    valid = target > IGNORE_INDEX
    return target.clamp(min=0), valid


def _attribution(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    if acts.dim() == 4:  # Grad-CAM on (B, C, H, W) feature maps
        alpha = grads.mean(dim=(2, 3), keepdim=True)
        return torch.relu((alpha * acts).sum(dim=1)).flatten(1).sum(dim=1)
    per_position = torch.relu((grads * acts).sum(dim=-1))  # gradient x activation
    return per_position.reshape(acts.shape[0], -1).sum(dim=1)


def _uncertainty(logits: torch.Tensor, valid: torch.Tensor, measure: str) -> torch.Tensor:
    probs = torch.softmax(logits.float(), dim=-1)
    if measure == "margin":
        top = probs.topk(2, dim=-1).values
        value = 1 - (top[..., 0] - top[..., 1])
    else:
        value = -(probs * torch.log(probs.clamp(min=1e-12))).sum(dim=-1)
    return _mean_over_positions(value, valid)


def _mean_over_positions(value: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    if value.dim() == 1:
        return value
    mask = valid.reshape(value.shape).to(value.dtype)
    return (value * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)


def _pool_embeddings(features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    features = features.detach().float()
    if features.dim() == 2:
        return features
    # a sequence: average its scored positions' features into one vector
    mask = valid.unsqueeze(-1).to(features.dtype)
    return (features * mask).sum(1) / mask.sum(1).clamp(min=1)


def _score_by_loss(model, x, target, capture: _Capture | None, features: _InputCapture | None, want,
                   task_loss) -> dict[str, torch.Tensor]:
    """The criteria for outputs that are not class scores (regression, reconstruction), from each example's
    own task loss: gradcam weighs the features by the gradient that lowers it, uncertainty is the loss
    itself (the examples compression would hurt first), diversity clusters the head's input or, without
    a head, the outputs."""
    with torch.enable_grad():
        outputs = model(x)
        losses = torch.stack([task_loss(outputs[i : i + 1], target[i : i + 1]) for i in range(len(x))]).float()
        out = {}
        if "gradcam" in want:
            if capture.leaf is None:
                raise ValueError("attribution_layer did not run in the model's forward pass")
            (grads,) = torch.autograd.grad(-losses.sum(), capture.leaf, allow_unused=True)
            if grads is None:
                raise ValueError("attribution_layer: its output does not reach the task loss")
            out["gradcam"] = _attribution(capture.leaf.detach(), grads)
    if "uncertainty" in want:
        out["uncertainty"] = losses.detach()
    if "diversity" in want:
        chosen = features.value if features is not None else outputs
        out["embeddings"] = chosen.detach().float().flatten(1)
    return out


def _score_batch(model, x, target, capture: _Capture | None, features: _InputCapture | None, want,
                 measure) -> dict[str, torch.Tensor]:
    with torch.enable_grad():
        logits = model(x)
        target, valid = _target_mask(logits, target)
        out = {}
        if "gradcam" in want:
            if capture.leaf is None:
                raise ValueError("attribution_layer did not run in the model's forward pass")
            chosen = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            (grads,) = torch.autograd.grad((chosen * valid).sum(), capture.leaf, allow_unused=True)
            if grads is None:
                raise ValueError("attribution_layer: its output does not reach the logits")
            out["gradcam"] = _attribution(capture.leaf.detach(), grads)
    logits = logits.detach()
    if "uncertainty" in want:
        out["uncertainty"] = _uncertainty(logits, valid, measure)
    if "diversity" in want:
        if features.value is None:
            raise ValueError("embedding_layer did not run in the model's forward pass")
        out["embeddings"] = _pool_embeddings(features.value, valid)
    return out


def _check_layer(model: nn.Module, layer, name: str) -> None:
    if layer is None:
        return
    if not isinstance(layer, nn.Module):
        raise TypeError(f"{name} must be an nn.Module of the model or None, got {type(layer).__name__}")
    if not any(m is layer for m in model.modules()):
        raise ValueError(f"{name} is not a submodule of model")


def _resolve_layers(model: nn.Module, dataset: Dataset, criteria, attribution_layer, embedding_layer,
                    device, by_loss: bool) -> Layers:
    """The explicit layers, else the model's own ``attribution_layer``, else :func:`find_layers`. Scoring by
    the task loss (``by_loss``), a model with no head has none: diversity then clusters its outputs."""
    declared = getattr(model, "attribution_layer", None)
    layers = Layers(
        attribution_layer or (declared if isinstance(declared, nn.Module) else None), embedding_layer
    )
    need_attribution = "gradcam" in criteria and layers.attribution is None
    need_embedding = "diversity" in criteria and layers.embedding is None
    if need_attribution or need_embedding:
        x, _ = next(iter(DataLoader(dataset, batch_size=_PROBE_EXAMPLES, shuffle=False)))
        found = find_layers(model, x.to(device), attribution=need_attribution, embedding=False)
        if need_embedding:
            try:
                found.embedding = find_layers(model, x.to(device), attribution=False, embedding=True).embedding
            except ValueError:
                if not by_loss:
                    raise
        layers = Layers(layers.attribution or found.attribution, layers.embedding or found.embedding)
    return layers


def compute_scores(
    model: nn.Module,
    dataset: Dataset | Sequence[torch.Tensor],
    *,
    criteria: Sequence[str] = CRITERIA,
    batch_size: int = 256,
    uncertainty: str = "margin",
    attribution_layer: nn.Module | None = None,
    embedding_layer: nn.Module | None = None,
    task_loss=None,
) -> Scores:
    """Score every example of ``dataset`` (``(input, target)`` pairs) under ``criteria``.

    ``task_loss(outputs, targets)`` scores outputs that are not class scores (a regression or an
    autoencoder) from each example's own loss instead of its logits; float targets ask for it.

    ``attribution_layer`` is the module whose output Grad-CAM inspects (default
    ``model.attribution_layer`` where the model names one, else :func:`find_layers`'s);
    ``embedding_layer`` the module whose *input* diversity clusters, the model's head (default
    :func:`find_layers`'s: the last ``nn.Linear`` to run). The model runs in eval mode (so
    BatchNorm treats examples independently) and is put back in its previous mode afterwards; its
    parameters receive no gradients.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(criteria, str):
        raise TypeError("criteria must be a collection of criterion names, not a single string")
    unknown = sorted(set(criteria) - set(CRITERIA))
    if unknown:
        raise ValueError(f"criteria has unknown names {unknown}; known: {CRITERIA}")
    if uncertainty not in UNCERTAINTY_MEASURES:
        raise ValueError(f"uncertainty must be one of {UNCERTAINTY_MEASURES}, got {uncertainty!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    _check_layer(model, attribution_layer, "attribution_layer")
    _check_layer(model, embedding_layer, "embedding_layer")
    dataset = _as_dataset(dataset)
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    if task_loss is not None and not callable(task_loss):
        raise TypeError(f"task_loss must be a callable (outputs, targets) -> loss or None, got {type(task_loss).__name__}")
    if task_loss is None and torch.as_tensor(dataset[0][1]).is_floating_point():
        raise ValueError("targets are floats, not class indices: pass task_loss= to score examples by it")
    device = model_device(model)
    layers = _resolve_layers(model, dataset, criteria, attribution_layer, embedding_layer, device,
                             task_loss is not None)
    capture = _Capture(layers.attribution) if "gradcam" in criteria else None
    features = _InputCapture(layers.embedding) if "diversity" in criteria and layers.embedding is not None else None
    was_training = model.training
    parts: dict[str, list[torch.Tensor]] = {}
    try:
        model.eval()
        for x, target in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            x, target = x.to(device), target.to(device)
            batch = (_score_batch(model, x, target, capture, features, set(criteria), uncertainty) if task_loss is None
                     else _score_by_loss(model, x, target, capture, features, set(criteria), task_loss))
            for key, value in batch.items():
                dtype = torch.float32 if key == "embeddings" else torch.float64  # embeddings are big
                parts.setdefault(key, []).append(value.detach().to("cpu", dtype))
    finally:
        model.train(was_training)
        for hook in (capture, features):
            if hook is not None:
                hook.handle.remove()
    return Scores(**{key: torch.cat(values) for key, values in parts.items()})
