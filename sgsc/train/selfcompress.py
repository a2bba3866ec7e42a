"""Safety-guided self-compression in your own model and training loop.

::

    model = sgsc.quantize_model(my_model)
    comp = SelfCompression(model, preserve=preservation_set, gamma=0.03, k=50, threshold=0.02)
    opt = torch.optim.Adam(comp.param_groups(lr=1e-3))  # bits and exponents at their own rate
    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + comp.penalty()  # gamma*bits + alpha*L1 + lambda*preservation
        opt.zero_grad(); loss.backward(); opt.step()
        comp.step(opt)  # every k steps: the safety check (restore, or prune)

This is Algorithm 1 without the trainer: the same objective terms (:func:`sgsc.nn.average_bits`,
:func:`sgsc.train.task.mean_abs_weight`), the same safety check (:func:`sgsc.train.safety.judge` and
:func:`~sgsc.train.safety.carry_out`) and the same preservation-batch stream as
:func:`sgsc.train.train`. ``preserve=None`` is unsafe self-compression: no preservation loss, no
restore. Under ``torch.distributed`` the safety decision is taken on rank 0 and broadcast, so the
constructor and every ``k``-th :meth:`~SelfCompression.step` are collective (every rank calls them);
pass the unwrapped model, and rebuild the ``DistributedDataParallel`` wrapper after an event that pruned.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from numbers import Real

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from sgsc.nn import average_bits, quantized_layers
from sgsc.train.arguments import Metric, flag, integer, metric_of, number, quantized_model, tensor_pairs
from sgsc.train.batches import batch, seeded_generator
from sgsc.train.distributed import from_rank0, rank_world
from sgsc.train.safety import Policy, Pruner, RunState, bits_snapshot, carry_out, default_pruner, judge
from sgsc.train.task import mean_abs_weight
from sgsc.train.task import task_loss as cross_entropy

# ---- arguments ------------------------------------------------------------------------------


def _preserved_set(preserve) -> TensorDataset | None:
    """``preserve`` as one TensorDataset of ``(inputs, targets)``, read once (a DataLoader in its order).

    Held whole because it is small (a few percent of the data) and both the safety metric (all of
    it) and the preservation loss (seeded random batches) need random access.
    """
    if preserve is None:
        return None
    data = tensor_pairs("preserve", preserve)
    if len(data) == 0:
        raise ValueError("preserve is empty; pass None for unsafe self-compression")
    return data


# ---- optimiser groups -----------------------------------------------------------------------


def param_groups(model: nn.Module, lr: float, quant_lr: float = 0.05, exponent_lr: float | None = None) -> list[dict]:
    """Adam param groups for a quantized model: everything else at ``lr``, bits and exponents faster.

    Bits and exponents move in steps of whole units while weights move by 1e-3: at one learning
    rate the size term barely moves the bits. Groups are named as the trainer names them:
    ``"weights"`` (``lr``) and ``"quantizers"`` (``quant_lr``), or ``"bits"`` (``quant_lr``) and
    ``"exponents"`` (``exponent_lr``) when ``exponent_lr`` is given.
    """
    lr = number("lr", lr, low=0, strict=True)
    quant_lr = number("quant_lr", quant_lr, low=0, strict=True)
    layers = [layer for _, layer in quantized_layers(model)]
    bits, exponents = {id(layer.bits) for layer in layers}, {id(layer.exponent) for layer in layers}
    params = list(model.parameters())

    def group(name: str, ids: set[int], rate: float) -> dict:
        return {"params": [p for p in params if id(p) in ids], "lr": rate, "name": name}

    weights = group("weights", {id(p) for p in params} - bits - exponents, lr)
    if exponent_lr is None:
        return [weights, group("quantizers", bits | exponents, quant_lr)]
    exponent_lr = number("exponent_lr", exponent_lr, low=0, strict=True)
    return [weights, group("bits", bits, quant_lr), group("exponents", exponents, exponent_lr)]


# ---- the API --------------------------------------------------------------------------------


class SelfCompression:
    """Safety-guided self-compression of a quantized ``model`` inside the caller's training loop.

    ``preserve`` is the preservation set (a Dataset, a DataLoader, an ``(inputs, targets)`` pair;
    :func:`sgsc.train.preservation.build` chooses one), or None for unsafe self-compression.
    ``gamma`` weighs the average bits, ``alpha`` the mean ``|w|`` and ``lambda_`` the task loss on a
    preservation batch of ``preservation_batch`` examples, drawn from ``seed`` and the step.
    Every ``k`` steps the safety check measures ``metric`` on the whole set (``"accuracy"``,
    ``"loss"`` (the mean ``task_loss``: by default the cross-entropy of :func:`sgsc.train.evaluate`), or ``metric(model, preserved)``
    with ``higher_is_better`` given); when it is more than ``threshold`` worse than the best seen
    it restores the groups lowered since the last safe check (``restore``), else it removes the
    units that stayed at zero bits (``prune``) with ``pruner``: by default :mod:`sgsc.nn.pruning` for
    the zoo's models and :func:`~sgsc.train.safety.graph_pruner` for any other, which traces the model
    on ``example_inputs`` (default: the inputs of its latest forward with autograd on, i.e. a training
    step's). ``task_loss(logits, targets)`` defaults to cross-entropy over the last dimension with
    targets of -1 unscored (sequence padding). ``quant_lr`` and ``exponent_lr`` are the rates
    :meth:`param_groups` gives bits and exponents.
    """

    def __init__(
        self,
        model: nn.Module,
        preserve: Dataset | DataLoader | tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        gamma: float,
        alpha: float = 0.0,
        lambda_: float = 1.0,
        k: int = 50,
        threshold: float = 0.02,
        restore: bool = True,
        prune: bool = True,
        quant_lr: float = 0.05,
        exponent_lr: float | None = None,
        task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        metric: str | Metric = "accuracy",
        higher_is_better: bool | None = None,
        preservation_batch: int = 32,
        seed: int = 0,
        pruner: Pruner | None = None,
        example_inputs: torch.Tensor | Sequence | Mapping | None = None,
    ) -> None:
        self.model = quantized_model(model)
        self.gamma = number("gamma", gamma, low=0)
        self.alpha = number("alpha", alpha, low=0)
        self.lambda_ = number("lambda_", lambda_, low=0)
        self.k = integer("k", k, low=1)
        self.quant_lr = number("quant_lr", quant_lr, low=0, strict=True)
        self.exponent_lr = None if exponent_lr is None else number("exponent_lr", exponent_lr, low=0, strict=True)
        self.preservation_batch = integer("preservation_batch", preservation_batch, low=1)
        self.seed = integer("seed", seed, low=0)
        if task_loss is not None and not callable(task_loss):
            raise TypeError(f"task_loss must be a callable (logits, targets) -> loss, got {type(task_loss).__name__}")
        self.task_loss = task_loss if task_loss is not None else cross_entropy
        self._metric, higher = metric_of(metric, higher_is_better, task_loss)
        if pruner is not None and not isinstance(pruner, Pruner):
            raise TypeError(f"pruner must be an sgsc.train.safety.Pruner or None, got {type(pruner).__name__}")
        threshold, restore, prune = number("threshold", threshold, low=0), flag("restore", restore), flag("prune", prune)
        self.preserved = _preserved_set(preserve)
        if pruner is None and prune:  # last: the default for a user's model hooks into it
            pruner = default_pruner(model, TracedInputs(model, example_inputs))
        self.policy = Policy(threshold, restore, prune, higher, pruner)
        self.terms: dict[str, torch.Tensor] = {}
        self._warned_masked = False
        # the first safety reference: the model as it is handed over
        self.state = RunState(snapshot=bits_snapshot(model))
        self.state.best = from_rank0(self._measure)

    @property
    def history(self) -> list[dict]:
        """Every safety check's event, in order (what :meth:`step` returned)."""
        return self.state.history

    def param_groups(self, lr: float) -> list[dict]:
        """Adam param groups: weights at ``lr``, bits and exponents at ``quant_lr`` (and ``exponent_lr``)."""
        return param_groups(self.model, lr, self.quant_lr, self.exponent_lr)

    def penalty(self, preservation_output: torch.Tensor | None = None) -> torch.Tensor:
        """``lambda_ * preservation loss + gamma * average_bits + alpha * mean|w|``, to add to the task loss.

        Terms with a zero weight are not computed; the preservation loss needs ``preserve``, and runs
        the model on :meth:`preservation_inputs` unless ``preservation_output`` (the model's output on
        them, from the caller's own forward) is given. The detached terms are kept in :attr:`terms`
        (``"preservation"``, ``"size"``, ``"l1"``) for logging.
        """
        return self._add_terms(None, preservation_output)

    def objective(self, task_loss: torch.Tensor, preservation_output: torch.Tensor | None = None) -> torch.Tensor:
        """``task_loss + penalty(preservation_output)``, added one term at a time in that order.

        The order fixes the rounding: :func:`sgsc.compress` minimises and logs this sum.
        """
        return self._add_terms(task_loss, preservation_output)

    def preservation_inputs(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This step's preservation batch ``(inputs, targets)``, None when the penalty has no such term.

        A pure function of ``(seed, step, rank)``. A loop may run it through the model together with
        its training batch (one forward: DDP allows one per backward) and pass the outputs to
        :meth:`penalty` or :meth:`objective`.
        """
        if self.lambda_ == 0 or self.preserved is None:
            return None
        generator = seeded_generator(self.seed, self.state.step, rank_world()[0], 1)
        pick = torch.randint(0, len(self.preserved), (self.preservation_batch,), generator=generator)
        return batch(self.preserved, pick, _device(self.model))

    def step(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """Count a training step; every ``k``-th runs the safety check and returns its event, else None.

        The event holds ``step``, ``metric``, ``best`` and ``restored`` (groups given back their
        bits, Adam's first moment zeroed), or ``pruned`` (units removed; ``optimizer``'s param
        groups and state are cut to match; for a model outside the zoo, layer -> quantization groups)
        with ``kept`` (units at zero bits at both checks that could not go exactly, e.g. coupled to a
        live channel; :func:`sgsc.nn.graph_pruning.prune_zero_bit_units` reports why), or, without a
        pruner, ``masked`` (layer -> zero-bit groups that stay in place).
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.state.step += 1
        if self.state.step % self.k:
            return None
        self._check_optimizer(optimizer)
        decision = from_rank0(lambda: judge(self.model, self.state, self._measure(), self.policy))
        event = carry_out(self.model, optimizer, self.state, decision, higher_is_better=self.policy.higher_is_better,
                          pruner=self.policy.pruner)
        self.state.history.append(event)
        if event.get("masked"):
            self._warn_masked(event["masked"])
        return event

    def state_dict(self) -> dict:
        """Step, best metric, bits snapshot and history: what a checkpoint needs to resume the checks."""
        return {"state": self.state.to_record()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.state = RunState.from_record(state_dict["state"])

    # ---- internals ----

    def _measure(self) -> float | None:
        """The preservation metric, in eval mode without gradients (None without a set)."""
        if self.preserved is None:
            return None
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                value = self._metric(self.model, self.preserved)
        finally:
            self.model.train(was_training)
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"metric must return a finite number, got {value!r}")
        return float(value)

    def _add_terms(self, total: torch.Tensor | None, preservation_output: torch.Tensor | None) -> torch.Tensor:
        self.terms = {}
        drawn = self.preservation_inputs()
        if drawn is None and preservation_output is not None:
            raise ValueError("preservation_output given, but the penalty has no preservation term "
                             "(preserve is None or lambda_ is 0)")
        if drawn is not None:
            inputs, targets = drawn
            output = self.model(inputs) if preservation_output is None else preservation_output
            total = self._add(total, "preservation", self.lambda_, self.task_loss(output, targets))
        if self.gamma > 0:
            total = self._add(total, "size", self.gamma, average_bits(self.model))
        if self.alpha > 0:
            total = self._add(total, "l1", self.alpha, mean_abs_weight(self.model))
        return total if total is not None else torch.zeros((), device=_device(self.model))

    def _add(self, total: torch.Tensor | None, name: str, weight: float, value: torch.Tensor) -> torch.Tensor:
        self.terms[name] = value.detach()
        return weight * value if total is None else total + weight * value

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        # restore edits the bits' Adam moments and pruning swaps Parameters in the optimizer: both
        # would silently miss an optimizer that does not hold them
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, layer in quantized_layers(self.model) if id(layer.bits) not in held]
        if missing:
            raise ValueError(
                f"optimizer does not hold the bits of {missing[:3]}{' ...' if len(missing) > 3 else ''}; "
                "build it from param_groups(lr) after sgsc.quantize_model"
            )

    def _warn_masked(self, masked: dict[str, list[int]]) -> None:
        if self._warned_masked or rank_world()[0] != 0:
            return
        self._warned_masked = True
        count = sum(len(groups) for groups in masked.values())
        warnings.warn(
            f"sgsc.SelfCompression: torch-pruning is not installed, so the {count} zero-bit groups of "
            f"{type(self.model).__name__} stay masked (exact zeros, no bits in the size term, but their memory and "
            "compute remain); checks report them as event['masked']; pip install 'sgsc[train]' to remove them",
            stacklevel=3,
        )


class TracedInputs:
    """What the graph pruner traces the model with: ``given``, else the inputs of the model's latest
    forward run with autograd on (a training step's, recorded by a forward pre-hook)."""

    def __init__(self, model: nn.Module, given: torch.Tensor | Sequence | Mapping | None) -> None:
        if given is not None and not isinstance(given, (torch.Tensor, Sequence, Mapping)):
            raise TypeError(f"example_inputs must be a tensor, a sequence or a mapping of inputs, got {type(given).__name__}")
        self.given, self.latest = given, None
        if given is None:
            model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled():
            self.latest = (args, kwargs)

    def __call__(self) -> torch.Tensor | Sequence | Mapping:
        if self.given is not None:
            return self.given
        if self.latest is None:
            raise ValueError("SelfCompression: pruning traces the model on the inputs of a training step, and the "
                             "model has not run one yet; pass example_inputs=")
        args, kwargs = self.latest
        if args and kwargs:
            raise ValueError("SelfCompression: the model was called with positional and keyword inputs, which "
                             "the graph pruner cannot replay; pass example_inputs=")
        return kwargs or args


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
