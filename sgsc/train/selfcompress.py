"""Safety-guided self-compression in your own model and training loop.

::

    model = sgsc.quantize_model(my_model)
    comp = SelfCompression(model, preserve=preservation_set, guard=held_out, gamma=0.03, max_drop=0.01)
    opt = torch.optim.Adam(comp.param_groups(lr=1e-3))  # bits and exponents at their own rate
    for x, y in loader:                                   # never the guard's examples
        loss = F.cross_entropy(model(x), y) + comp.penalty()  # lambda*preservation + gamma*bits + alpha*L1
        opt.zero_grad(); loss.backward(); opt.step()
        comp.step(opt)   # every k steps: the guard check (pass and prune, or roll back and change course)
    comp.finish(opt)     # the model is now the last state that passed: within max_drop of the reference

This is Algorithm 1 without the trainer: the same objective terms (:func:`sgsc.nn.average_bits`,
:func:`sgsc.train.task.mean_abs_weight`), the same check (:func:`sgsc.train.safety.judge` and
:func:`~sgsc.train.safety.carry_out`) and the same preservation-batch stream as :func:`sgsc.compress`.

Safety is a contract: with a ``guard`` (examples the loop never trains on) the model :meth:`finish`
leaves is within ``max_drop`` of the reference (the model as handed over) on the guard, at the
stated confidence (:mod:`sgsc.train.guard`). ``preserve`` chooses what the preservation term trains
on. Neither given: unsafe self-compression (no preservation term, no contract). Under
``torch.distributed`` the decisions are taken on rank 0 and broadcast, so the constructor, every
``k``-th :meth:`step` and :meth:`finish` are collective (every rank calls them); pass the unwrapped
model, and rebuild the ``DistributedDataParallel`` wrapper after an event that pruned or rolled back.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from sgsc.nn import average_bits, quantized_layers
from sgsc.train import guard as guards
from sgsc.train.arguments import Metric, metric_of, quantized_model, tensor_pairs
from sgsc.train.batches import batch, seeded_generator
from sgsc.train.config import CompressConfig
from sgsc.train.data import IGNORE_INDEX
from sgsc.train.distributed import from_rank0, rank_world
from sgsc.train.pruners import Pruner, default_pruner
from sgsc.train.safety import Pace, Policy, RunState, bits_snapshot, carry_out, judge, keep_passed, roll_back
from sgsc.train.task import EVAL_BATCH, mean_abs_weight, model_device
from sgsc.train.task import task_loss as cross_entropy

DISTILL_TEMPERATURE = 2.0  # softens the reference's outputs, as in Hinton et al.'s distillation


def method_config(config: CompressConfig | None, overrides: dict, who: str) -> CompressConfig:
    """``config`` (default: :class:`CompressConfig`'s defaults) with ``overrides``, which must be fields
    ``who`` reads; a field only the loop reads, or no field at all, is a TypeError naming it."""
    if config is not None and not isinstance(config, CompressConfig):
        raise TypeError(f"config must be an sgsc.CompressConfig or None, got {type(config).__name__}")
    allowed = CompressConfig.method_fields()
    fields = {f.name for f in dataclasses.fields(CompressConfig)}
    for name in overrides:
        if name not in fields:
            raise TypeError(f"{who} got an unexpected keyword argument {name!r}")
        if name not in allowed:
            raise TypeError(f"{who}: {name} is a setting of sgsc.compress's loop, which {who} does not run")
    return dataclasses.replace(config or CompressConfig(), **overrides)


def param_groups(model: nn.Module, lr: float, quant_lr: float = 0.05, exponent_lr: float | None = None) -> list[dict]:
    """Adam param groups for a quantized model: everything else at ``lr``, bits and exponents faster.

    Bits and exponents move in steps of whole units while weights move by 1e-3: at one learning
    rate the size term barely moves the bits. Groups are named as the trainer names them:
    ``"weights"`` (``lr``) and ``"quantizers"`` (``quant_lr``), or ``"bits"`` (``quant_lr``) and
    ``"exponents"`` (``exponent_lr``) when ``exponent_lr`` is given.
    """
    CompressConfig(lr=lr, quant_lr=quant_lr, exponent_lr=exponent_lr)  # checks them
    layers = [layer for _, layer in quantized_layers(model)]
    bits, exponents = {id(layer.bits) for layer in layers}, {id(layer.exponent) for layer in layers}
    params = list(model.parameters())

    def group(name: str, ids: set[int], rate: float) -> dict:
        return {"params": [p for p in params if id(p) in ids], "lr": rate, "name": name}

    weights = group("weights", {id(p) for p in params} - bits - exponents, lr)
    if exponent_lr is None:
        return [weights, group("quantizers", bits | exponents, quant_lr)]
    return [weights, group("bits", bits, quant_lr), group("exponents", exponents, exponent_lr)]


class SelfCompression:
    """Safety-guided self-compression of a quantized ``model`` inside the caller's training loop.

    ``preserve`` is the preservation set the preservation term trains on (a Dataset, a DataLoader,
    an ``(inputs, targets)`` pair; :func:`sgsc.train.preservation.build` chooses one). ``guard`` is
    data the loop never trains on: with it every ``k`` steps the model is compared with the
    reference on it, and :meth:`finish` returns the last state within ``max_drop``. The hyper-
    parameters are :class:`~sgsc.CompressConfig`'s method fields, given as ``config`` and/or as
    keywords (``gamma=0.03, max_drop=0.005, ...``). ``metric`` is ``"accuracy"``, ``"loss"`` (the
    per-example ``task_loss``: by default cross-entropy over the last dimension with targets of -1
    unscored) or ``metric(model, data) -> float`` with ``higher_is_better`` given (compared as one
    number, without a paired bound). Zero-bit units are removed by ``pruner``: by default
    :func:`~sgsc.train.pruners.graph_pruner`, the zoo's models included, which traces the model on
    ``example_inputs`` (default: the inputs of its latest forward
    with autograd on, i.e. a training step's). Use it as a context manager, or call :meth:`close`,
    to remove the hook that records those inputs.
    """

    def __init__(
        self,
        model: nn.Module,
        preserve: Dataset | DataLoader | tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        guard: Dataset | DataLoader | tuple[torch.Tensor, torch.Tensor] | None = None,
        config: CompressConfig | None = None,
        task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        metric: str | Metric = "accuracy",
        higher_is_better: bool | None = None,
        pruner: Pruner | None = None,
        example_inputs: torch.Tensor | Sequence | Mapping | None = None,
        **hyper,
    ) -> None:
        self.model = quantized_model(model)
        self.config = method_config(config, hyper, "SelfCompression")
        if task_loss is not None and not callable(task_loss):
            raise TypeError(f"task_loss must be a callable (logits, targets) -> loss, got {type(task_loss).__name__}")
        self.task_loss = task_loss if task_loss is not None else cross_entropy
        self._metric, higher = metric_of(metric, higher_is_better, task_loss)
        if pruner is not None and not isinstance(pruner, Pruner):
            raise TypeError(f"pruner must be an sgsc.train.pruners.Pruner or None, got {type(pruner).__name__}")
        self.preserved = _nonempty("preserve", preserve)
        self.guard = _nonempty("guard", guard)
        max_drop = self._max_drop(metric)
        self._score = guards.per_example(metric, task_loss) if isinstance(metric, str) else None
        self._traced = None
        if pruner is None and self.config.prune:
            self._traced = TracedInputs(model, example_inputs)
            pruner = default_pruner(self._traced)
        self.policy = Policy(max_drop, self.config.confidence, self.config.patience, self.config.restore,
                             self.config.prune, higher, pruner, self._look_order())
        self.terms: dict[str, torch.Tensor] = {}
        self._warned_masked = False
        # the reference: the model as it is handed over, which the contract is about
        self.state = RunState(snapshot=bits_snapshot(model))
        self.teacher = self._teacher_outputs()
        if max_drop is not None:
            self.state.reference = from_rank0(self._measure)
            if isinstance(metric, str) and rank_world()[0] == 0:
                guards.warn_if_unresolvable(self.state.reference, metric=metric, max_drop=max_drop,
                                            confidence=self.config.confidence)
            keep_passed(model, None, self.state, None)
        self._pace = Pace(model, self.state)

    def _max_drop(self, metric) -> float | None:
        """The contract's tolerance, or None when there is no contract (no guard)."""
        c = self.config
        if self.guard is None:
            if c.max_drop is not None and c.restore:
                raise ValueError("max_drop needs guard=, data the training loop never sees, to be checked on")
            if self.preserved is not None and c.restore:
                raise ValueError(
                    "SelfCompression: a preservation set with restore=True needs guard=, examples your loop never "
                    "trains on (e.g. a split of your training data you leave out), for the check to watch; "
                    "sgsc.compress holds one out itself. restore=False keeps the preservation term alone")
            return None
        if c.max_drop is None and not isinstance(metric, str):
            raise ValueError("a metric callable has no default tolerance: give max_drop in its units")
        return c.max_drop_for(metric) if c.max_drop is None else c.max_drop

    @property
    def history(self) -> list[dict]:
        """Every safety check's event, in order (what :meth:`step` returned)."""
        return self.state.history

    def param_groups(self, lr: float) -> list[dict]:
        """Adam param groups: weights at ``lr``, bits and exponents at ``quant_lr`` (and ``exponent_lr``)."""
        return param_groups(self.model, lr, self.config.quant_lr, self.config.exponent_lr)

    def penalty(self, preservation_output: torch.Tensor | None = None) -> torch.Tensor:
        """``lambda_ * preservation + gamma * average_bits + alpha * mean|w|``, to add to the task loss.

        Terms with a zero weight are not computed; the preservation term needs ``preserve``, and runs
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
        pick = self._preservation_pick()
        return None if pick is None else batch(self.preserved, pick, model_device(self.model))

    def step(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """Count a training step (call it after ``optimizer.step()``); every ``k``-th runs the check.

        Each step the slowed layers' change of bits is scaled by their pace, and bits or exponents that
        are not finite stop the run with a ``FloatingPointError`` naming the layer. The check's event
        holds ``step``, ``guard`` (the metric now and for the reference, ``drop``, its upper
        ``bound``, ``n``) and ``verdict`` with a contract; on a pass (or without a contract) ``pruned``
        (units removed; ``optimizer``'s param groups and state are cut to match; layer ->
        quantization groups for a model outside the zoo) with ``kept`` (zero-bit units that could not
        go exactly), or ``masked`` without a pruner; on a fail ``rolled_back_to`` (the step of the
        state put back) and ``slowed`` (layer -> its new pace).
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.state.step += 1
        self._check_finite()
        self._pace.apply()
        if self.state.step % self.config.k:
            return None
        self._check_optimizer(optimizer)
        measure = self._measure if self.policy.max_drop is not None else None
        decision = from_rank0(lambda: judge(self.model, self.state, self.policy, measure))
        event = carry_out(self.model, optimizer, self.state, decision, pruner=self.policy.pruner)
        self._pace.mark()  # rolled back or pruned: the next step starts from these bits
        self.state.history.append(event)
        if event.get("masked"):
            self._warn_masked(event["masked"])
        return event

    def finish(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """End of training: the model becomes the last state that passed, unless it passes now.

        Returns the contract's record (also appended to :attr:`history` as ``kind="final"``): the
        final model's ``guard`` comparison, ``returned_step`` (the step of the model now held),
        ``returned`` (its guard comparison; None when no compressed state passed and the reference
        came back), ``max_drop`` and ``confidence``; None without a contract (no guard, or
        ``restore=False``).
        """
        if self.policy.max_drop is None or not self.policy.restore:
            return None
        check = from_rank0(lambda: guards.compare(self.state.reference, self._measure(),
                                                  higher_is_better=self.policy.higher_is_better,
                                                  max_drop=self.policy.max_drop, confidence=self.policy.confidence))
        record = {"kind": "final", "step": self.state.step, "max_drop": self.policy.max_drop,
                  "confidence": self.policy.confidence, "guard": check.to_record()}
        if check.verdict == "pass":
            keep_passed(self.model, optimizer, self.state, check)
            record["returned_step"] = self.state.step
        else:
            record["returned_step"] = roll_back(self.model, optimizer, self.state)
            self._pace.mark()
        record["returned"] = self.state.passed["check"]  # None: the reference came back
        self.state.history.append(record)
        return record

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume the checks: the :class:`~sgsc.train.safety.RunState` and
        the reference's outputs the distillation term uses."""
        return {"state": self.state.to_record(), "teacher": self.teacher}

    def load_state_dict(self, state_dict: dict) -> None:
        self.state = RunState.from_record(state_dict["state"])
        self._pace = Pace(self.model, self.state)
        if "teacher" in state_dict:
            self.teacher = state_dict["teacher"]

    def close(self) -> None:
        """Remove the forward hook that records training inputs for the pruner's trace."""
        if self._traced is not None:
            self._traced.close()

    def __enter__(self) -> SelfCompression:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals ----

    def _preservation_pick(self) -> torch.Tensor | None:
        if self.config.lambda_ == 0 or self.preserved is None or self.config.preservation_loss == "none":
            return None
        generator = seeded_generator(self.config.seed, self.state.step, rank_world()[0], 1)
        return torch.randint(0, len(self.preserved), (self.config.preservation_batch,), generator=generator)

    @torch.no_grad()
    def _teacher_outputs(self) -> torch.Tensor | None:
        """The reference's outputs on the preservation set (CPU), which the distillation term matches."""
        if self.preserved is None or self.config.preservation_loss != "distill" or self.config.lambda_ == 0:
            return None
        was_training = self.model.training
        self.model.eval()
        try:
            inputs = self.preserved.tensors[0]
            return torch.cat([self.model(inputs[i : i + EVAL_BATCH].to(model_device(self.model))).float().cpu()
                              for i in range(0, len(inputs), EVAL_BATCH)])
        finally:
            self.model.train(was_training)

    def _preservation_term(self, output: torch.Tensor, targets: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
        if self.config.preservation_loss == "task":
            return self.task_loss(output, targets)
        teacher = self.teacher[pick].to(output.device)
        t = DISTILL_TEMPERATURE
        per_position = F.kl_div(F.log_softmax(output.float() / t, -1), F.log_softmax(teacher / t, -1),
                                log_target=True, reduction="none").sum(-1)
        scored = (targets != IGNORE_INDEX).to(per_position.dtype) if targets.dim() == per_position.dim() else None
        if scored is None:
            return per_position.mean() * t * t
        return (per_position * scored).sum() / scored.sum().clamp(min=1) * t * t

    def _look_order(self) -> torch.Tensor | None:
        """The guard's examples in a fixed random order (the seed's), for the checks' two looks; None
        for a custom metric, which gives one number for the whole guard."""
        if self.guard is None or self._score is None:
            return None
        return torch.randperm(len(self.guard), generator=seeded_generator(self.config.seed, 0, 0, 2))

    def _measure(self, examples: torch.Tensor | None = None) -> guards.Outcomes:
        """The current model's outcomes on the guard (the examples at indices ``examples``)."""
        if self._score is not None:
            return guards.outcomes(self.model, self.guard, self._score, examples=examples)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                value = self._metric(self.model, self.guard)
        finally:
            self.model.train(was_training)
        value = float(value.item() if isinstance(value, torch.Tensor) else value)
        if not math.isfinite(value):
            raise ValueError(f"metric must return a finite number, got {value!r}")
        return guards.point(value)

    def _add_terms(self, total: torch.Tensor | None, preservation_output: torch.Tensor | None) -> torch.Tensor:
        self.terms = {}
        pick = self._preservation_pick()
        if pick is None and preservation_output is not None:
            raise ValueError("preservation_output given, but the penalty has no preservation term "
                             "(preserve is None, lambda_ is 0 or preservation_loss is 'none')")
        if pick is not None:
            inputs, targets = batch(self.preserved, pick, model_device(self.model))
            output = self.model(inputs) if preservation_output is None else preservation_output
            value = self._preservation_term(output, targets, pick)
            total = self._add(total, "preservation", self.config.lambda_, value)
        if self.config.gamma > 0:
            total = self._add(total, "size", self.config.gamma, average_bits(self.model))
        if self.config.alpha > 0:
            total = self._add(total, "l1", self.config.alpha, mean_abs_weight(self.model))
        return total if total is not None else torch.zeros((), device=model_device(self.model))

    def _add(self, total: torch.Tensor | None, name: str, weight: float, value: torch.Tensor) -> torch.Tensor:
        self.terms[name] = value.detach()
        return weight * value if total is None else total + weight * value

    def _check_finite(self) -> None:
        for name, layer in quantized_layers(self.model):
            for kind in ("bits", "exponent"):
                values = getattr(layer, kind)
                if values.numel() and not bool(torch.isfinite(values).all()):
                    raise FloatingPointError(
                        f"step {self.state.step}: the {kind} of {name} are not finite after the optimiser step "
                        "(a non-finite loss or gradient reached them); the run stops here")

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        # rollback loads the optimizer's state and pruning swaps Parameters in it: both would silently
        # miss an optimizer that does not hold them
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


def _nonempty(name: str, data) -> TensorDataset | None:
    """``data`` as one TensorDataset of ``(inputs, targets)``, read once (a DataLoader in its order).

    Held whole because it is small (a few percent of the data) and needs random access."""
    if data is None:
        return None
    pairs = tensor_pairs(name, data)
    if len(pairs) == 0:
        raise ValueError(f"{name} is empty; pass None for {'unsafe self-compression' if name == 'preserve' else 'no guard'}")
    return pairs


class TracedInputs:
    """What the graph pruner traces the model with: ``given``, else the inputs of the model's latest
    forward run with autograd on (a training step's, recorded by a forward pre-hook)."""

    def __init__(self, model: nn.Module, given: torch.Tensor | Sequence | Mapping | None) -> None:
        if given is not None and not isinstance(given, (torch.Tensor, Sequence, Mapping)):
            raise TypeError(f"example_inputs must be a tensor, a sequence or a mapping of inputs, got {type(given).__name__}")
        self.given, self.latest, self._hook = given, None, None
        if given is None:
            self._hook = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled():
            self.latest = (args, kwargs)

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook, self.latest = None, None

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
