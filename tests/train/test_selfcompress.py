"""SelfCompression on architectures the zoo does not have: bits fall, restore and prune act, the
penalty is its formula, the optimiser groups are right, bad input is refused by name."""

from __future__ import annotations

import copy
import math
import warnings
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from own_models import TinyLM, TinyMobileNet, TinyResNet, counting_sequences
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sgsc
from sgsc.nn import QConv2d, QLinear
from sgsc.nn.zoo import PaperCNN, PaperCNNConfig
from sgsc.train import Pruner, SelfCompression, evaluate
from sgsc.train.batches import seeded_generator
from sgsc.train.guard import Outcomes, subset

pytestmark = pytest.mark.usefixtures("one_thread")

FIT = 994  # the loop trains on digits' first 994 training examples; the last 300 are the guard


def _train(model, comp, x, y, steps, *, lr=3e-3, batch=32, seed=0, optimizer=None):
    """The user's loop from the README, on random batches of ``x``."""
    optimizer = optimizer or torch.optim.Adam(comp.param_groups(lr))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(0, len(x), (batch,), generator=generator)
        logits = model(x[pick])
        loss = F.cross_entropy(logits.flatten(0, -2), y[pick].flatten(), ignore_index=-1) + comp.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        comp.step(optimizer)
    return optimizer


class Trained(NamedTuple):
    model: nn.Module  # a quantized TinyResNet trained without compression
    preserve: tuple  # its preservation set (training examples)
    guard: tuple  # examples the loop never trains on
    untrained: float  # the untrained model's accuracy on the guard: the baseline "trained" is judged against


@pytest.fixture(scope="module")
def trained_resnet(digits_split):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    (x, y), _ = digits_split
    torch.manual_seed(0)
    model = sgsc.quantize_model(TinyResNet())
    guard = (x[FIT:], y[FIT:])
    untrained = evaluate(model, guard)["accuracy"]
    _train(model, SelfCompression(model, gamma=0.0, prune=False), x[:FIT], y[:FIT], 150)
    torch.set_num_threads(threads)
    return Trained(model, (x[:100], y[:100]), guard, untrained)


def _bits(model) -> float:
    """Bits per quantized weight, computed from the layers' own tensors (not sgsc.average_bits)."""
    layers = [m for m in model.modules() if isinstance(m, (QLinear, QConv2d))]
    paid = sum(float(m.bits.detach().clamp(min=0).sum()) * (m.weight.numel() // m.bits.numel()) for m in layers)
    return paid / sum(m.weight.numel() for m in layers)


def _test_error(value: float, n: int) -> float:
    """The binomial standard error of an accuracy on ``n`` test examples."""
    return math.sqrt(max(value * (1 - value), 1e-12) / n)


# ---- compression works on any architecture, within its contract ----------------------------------


@pytest.mark.parametrize("case", ["resnet", "mobilenet", "transformer"])
def test_bits_fall_and_the_model_returned_keeps_its_contract_on_held_out_data(digits_split, case):
    torch.manual_seed(0)
    if case == "transformer":
        model, (x, y), test = TinyLM(), counting_sequences(900), counting_sequences(200, seed=1)
        metric, max_drop, fit = "loss", 0.1, 600
    else:
        model, ((x, y), test) = {"resnet": TinyResNet, "mobilenet": TinyMobileNet}[case](), digits_split
        metric, max_drop, fit = "accuracy", 0.05, FIT
    model = sgsc.quantize_model(model)
    _train(model, SelfCompression(model, gamma=0.0, prune=False), x[:fit], y[:fit], 300)  # a trained start
    reference = evaluate(model, test)
    comp = SelfCompression(model, (x[:100], y[:100]), guard=(x[fit:], y[fit:]), gamma=0.05, k=25, quant_lr=0.1,
                           metric=metric, max_drop=max_drop)
    optimizer = _train(model, comp, x[:fit], y[:fit], 150)
    contract = comp.finish(optimizer)
    after = evaluate(model, test)
    print(f"\n{case}: {_bits(model):.2f} bits, {reference} -> {after}, {contract['returned']}")
    assert _bits(model) < 7.0  # from 8
    assert [e["step"] for e in comp.history if e["kind"] == "check"] == list(range(25, 151, 25))
    failing = 0  # a rollback exactly at the patience-th failed check in a row, and only there
    for event in comp.history[:-1]:
        failing = failing + 1 if event["verdict"] == "fail" else 0
        assert ("rolled_back_to" in event) == (failing == comp.config.patience), event
        failing = 0 if "rolled_back_to" in event else failing
    returned = contract["returned"]
    assert returned is None or returned["bound"] <= max_drop  # the last state that passed, or the reference
    if case == "transformer":  # the contract, on the test split, within its noise
        assert after["loss"] - reference["loss"] <= max_drop + 0.05
    else:
        assert reference["accuracy"] - after["accuracy"] <= max_drop + 2 * _test_error(reference["accuracy"], len(test[0]))


def test_the_model_returned_is_the_last_state_that_passed(trained_resnet):
    model, preserve, guard, _ = trained_resnet
    model = copy.deepcopy(model)
    comp = SelfCompression(model, preserve, guard=guard, gamma=0.03, k=1, max_drop=0.02, quant_lr=1e-7)
    optimizer = torch.optim.Adam(comp.param_groups(1e-7))
    model(preserve[0][:8]).sum().backward()
    optimizer.step()
    assert comp.step(optimizer)["verdict"] == "pass"  # one tiny step: within the contract
    passed = {key: value.clone() for key, value in model.state_dict().items()}
    passed_optimizer = copy.deepcopy(optimizer.state_dict())
    with torch.no_grad():
        model.fc.bits.fill_(1.0)  # compression that went too far, after the check
    contract = comp.finish(optimizer)
    assert contract["guard"]["verdict"] == "fail" and contract["returned_step"] == 1
    assert all(torch.equal(model.state_dict()[key], value) for key, value in passed.items())
    assert optimizer.state_dict()["state"].keys() == passed_optimizer["state"].keys()
    for index, moments in passed_optimizer["state"].items():
        for name, value in moments.items():
            assert torch.equal(optimizer.state_dict()["state"][index][name], value), (index, name)
    assert comp.history[-1] == contract


def test_when_no_compressed_state_passes_the_reference_comes_back(trained_resnet):
    model, preserve, guard, _ = trained_resnet
    model = copy.deepcopy(model)
    reference = {key: value.clone() for key, value in model.state_dict().items()}
    comp = SelfCompression(model, preserve, guard=guard, gamma=0.03, k=1000, max_drop=0.02)
    optimizer = torch.optim.Adam(comp.param_groups(1e-3))
    with torch.no_grad():
        for _, layer in sgsc.quantized_layers(model):
            layer.bits.fill_(1.0)
    model(preserve[0][:8]).sum().backward()
    optimizer.step()
    contract = comp.finish(optimizer)
    assert contract["returned"] is None and contract["returned_step"] == 0
    assert all(torch.equal(model.state_dict()[key], value) for key, value in reference.items())
    assert optimizer.state == {}  # the reference has no optimiser state: Adam starts afresh


# ---- the safety check ------------------------------------------------------------------------


def test_a_failed_check_rolls_back_and_slows_the_layer_that_did_the_harm(trained_resnet):
    model, (preserve, guard, untrained) = copy.deepcopy(trained_resnet.model), trained_resnet[1:]
    comp = SelfCompression(model, preserve, guard=guard, gamma=0.03, k=1, max_drop=0.02, quant_lr=1e-7, patience=1)
    healthy = evaluate(model, guard)["accuracy"]
    assert comp.state.reference.metric == pytest.approx(healthy) and healthy > untrained + 0.3  # trained
    optimizer = torch.optim.Adam(comp.param_groups(1e-7))
    model(preserve[0][:8]).sum().backward()
    optimizer.step()
    first = comp.step(optimizer)
    assert first["verdict"] == "pass" and comp.state.passed["step"] == 1
    passed = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        model.layer2.conv2.bits.fill_(1.0)  # the harm: one layer at 1 bit
        model.fc.bits -= 0.2  # a lowered layer that did no harm (its storage width falls by one)

    event = comp.step(optimizer)

    assert event["verdict"] == "fail" and event["guard"]["drop"] > 0.02 and event["rolled_back_to"] == 1
    assert event["slowed"] == {"layer2.conv2": 0.5}  # restoring it alone recovers the guard, fc's does not
    assert all(torch.equal(model.state_dict()[key], value) for key, value in passed.items())
    with torch.no_grad():  # what the next optimiser step does to the bits
        model.layer2.conv2.bits -= 1.0
        model.fc.bits -= 0.2
    assert "rolled_back_to" not in comp.step(optimizer)  # the slowed layer moves at half the pace, the others at full
    torch.testing.assert_close(model.layer2.conv2.bits.detach(), passed["layer2.conv2.bits"] - 0.5, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.fc.bits.detach(), passed["fc.bits"] - 0.2, rtol=0, atol=1e-6)
    assert comp.history == [first, event, comp.history[-1]] and comp.state.pace == {"layer2.conv2": 0.5}


def test_an_uncertain_check_neither_rolls_back_nor_counts_as_passed(trained_resnet, monkeypatch):
    model, preserve, guard = copy.deepcopy(trained_resnet.model), trained_resnet.preserve, trained_resnet.guard
    comp = SelfCompression(model, preserve, guard=guard, gamma=0.03, k=1, max_drop=0.02)
    optimizer = torch.optim.Adam(comp.param_groups(1e-3))
    reference = comp.state.reference
    # the model now loses 6 of the guard's examples: a drop whose bounds straddle max_drop
    lost = reference.values.clone()
    lost[(lost > 0).nonzero().flatten()[:6]] = 0
    now = Outcomes(lost, reference.weights)
    monkeypatch.setattr(comp, "_measure", lambda examples=None: now if examples is None else subset(now, examples))
    with torch.no_grad():
        model.layer1.conv1.bits[[0, 2]] = -1.0  # dead now: pruned on a pass, not on an uncertain check
    width = model.layer1.conv1.out_channels
    event = comp.step(optimizer)
    assert event["verdict"] == "uncertain" and event["guard"]["drop"] == pytest.approx(6 / len(guard[0]))
    assert "rolled_back_to" not in event and "pruned" not in event and comp.state.passed["step"] == 0
    assert model.layer1.conv1.out_channels == width


def test_without_a_guard_nothing_is_checked_and_a_preservation_set_needs_one(trained_resnet):
    model, preserve = copy.deepcopy(trained_resnet.model), trained_resnet.preserve
    comp = SelfCompression(model, None, gamma=0.03, k=1)
    optimizer = torch.optim.Adam(comp.param_groups(1e-3))
    with torch.no_grad():
        model.fc.bits.fill_(1.0)
    event = comp.step(optimizer)
    assert "guard" not in event and "rolled_back_to" not in event and comp.finish(optimizer) is None
    assert torch.equal(model.fc.bits.detach(), torch.ones_like(model.fc.bits))
    with pytest.raises(ValueError, match="a preservation set with restore=True needs guard="):
        SelfCompression(model, preserve, gamma=0.03)
    with pytest.raises(ValueError, match="max_drop needs guard="):
        SelfCompression(model, None, gamma=0.03, max_drop=0.01)
    alone = SelfCompression(model, preserve, gamma=0.03, restore=False)  # the preservation term alone
    assert alone.preservation_inputs() is not None and alone.finish(optimizer) is None


def test_bits_or_exponents_that_are_not_finite_stop_the_run_naming_the_layer(trained_resnet):
    model = copy.deepcopy(trained_resnet.model)
    comp = SelfCompression(model, None, gamma=0.03, k=10)
    optimizer = torch.optim.Adam(comp.param_groups(1e-3))
    with torch.no_grad():
        model.layer2.conv1.exponent[1] = float("nan")
    with pytest.raises(FloatingPointError, match="step 1: the exponent of layer2.conv1 are not finite"):
        comp.step(optimizer)


def _silenced_copy(model):
    """The masked model as the graph pruner leaves it: layer1.conv1's channels 0 and 2 zero-bit, and the
    BatchNorm entries after them zeroed (their constant shift would otherwise reach conv2)."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked.layer1.conv1.bits[[0, 2]] = -1.0
        masked.fc.bits[7] = -1.0
        masked.layer1.bn1.weight[[0, 2]] = 0.0
        masked.layer1.bn1.bias[[0, 2]] = 0.0
    return masked.eval()


def test_a_users_model_is_pruned_physically_and_its_file_loads_into_a_fresh_architecture(trained_resnet, tmp_path):
    model, preserve = copy.deepcopy(trained_resnet.model), trained_resnet.preserve
    with torch.no_grad():
        model.layer1.conv1.bits[[0, 2]] = -1.0
        model.fc.bits[7] = -1.0  # a logit: it feeds the output, so it stays (masked)
    comp = SelfCompression(model, preserve, gamma=0.03, k=1, restore=False)
    optimizer = torch.optim.Adam(comp.param_groups(1e-3))
    width = model.layer1.conv1.out_channels
    model(preserve[0][:8])  # a training step's forward: the pruner traces the model on its inputs
    masked = _silenced_copy(model)

    event = comp.step(optimizer)

    assert event["pruned"] == {"layer1.conv1": [0, 2]} and event["kept"] == {"fc": [7]}
    assert model.layer1.conv1.weight.shape[0] == model.layer1.bn1.num_features == width - 2
    assert model.layer1.conv2.weight.shape[1] == width - 2 and model.layer1.conv1.bits.shape == (width - 2,)
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}
    for param in held:
        assert all(v.shape == param.shape for v in optimizer.state[param].values() if v.dim())
    x = preserve[0][:32]
    with torch.no_grad():
        expected = masked(x)
        torch.testing.assert_close(model.eval()(x), expected, rtol=1e-5, atol=1e-5)
    assert comp.step(optimizer)["pruned"] == {}  # nothing new: fc's group still cannot go

    sgsc.save_packed(model, tmp_path / "own.sgsc")
    restored = sgsc.load_packed(tmp_path / "own.sgsc", model=TinyResNet())
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))


def test_pruning_traces_the_given_example_inputs_or_asks_for_them(trained_resnet):
    model, preserve = copy.deepcopy(trained_resnet.model), trained_resnet.preserve
    with torch.no_grad():
        model.layer2.conv1.bits[1] = -1.0
    comp = SelfCompression(model, preserve, gamma=0.03, k=1, restore=False)
    optimizer = torch.optim.Adam(comp.param_groups(1e-3))
    with torch.no_grad():
        model(preserve[0][:4])  # an evaluation is not a training step
    with pytest.raises(ValueError, match="has not run one yet; pass example_inputs="):
        comp.step(optimizer)
    assert model.layer2.conv1.out_channels == 8  # nothing cut

    given = SelfCompression(model, preserve, gamma=0.03, k=1, restore=False, example_inputs=preserve[0][:2])
    assert given.step(torch.optim.Adam(given.param_groups(1e-3)))["pruned"] == {"layer2.conv1": [1]}
    assert model.layer2.conv1.out_channels == 7


class NumpyGate(nn.Module):
    """A custom layer that leaves torch for numpy: torch-pruning cannot trace through it."""

    def forward(self, x):
        return torch.from_numpy(x.detach().numpy() * 0.5)


def test_a_model_torch_pruning_cannot_trace_is_warned_about_once_and_trains_on_masked():
    torch.manual_seed(0)
    model = sgsc.quantize_model(nn.Sequential(nn.Linear(4, 8), NumpyGate(), nn.ReLU(), nn.Linear(8, 3)))
    with torch.no_grad():
        model[0].bits[[1, 5]] = -1.0
    comp = SelfCompression(model, None, gamma=0.01, k=1)
    optimizer = torch.optim.Adam(comp.param_groups(1e-3))
    x = torch.randn(16, 4)
    with pytest.warns(UserWarning, match="stay masked for the rest of the run, since torch-pruning cannot trace") as caught:
        for _ in range(3):
            model(x).sum().backward()  # the gate cuts the graph: only the head learns, as the user built it
            optimizer.step()
            event = comp.step(optimizer)
    assert len([w for w in caught if "stay masked" in str(w.message)]) == 1
    assert event["pruned"] == {} and event["kept"]["0"] == [1, 5]
    assert model[0].out_features == 8


def test_without_torch_pruning_zero_bit_groups_stay_masked_and_are_reported_once(trained_resnet, monkeypatch):
    import sgsc.train.selfcompress as selfcompress

    monkeypatch.setattr(selfcompress, "default_pruner", lambda example_inputs: None)
    model, preserve = copy.deepcopy(trained_resnet.model), trained_resnet.preserve
    comp = SelfCompression(model, preserve, gamma=0.03, k=1, restore=False)
    optimizer = torch.optim.Adam(comp.param_groups(1e-3))
    with torch.no_grad():
        model.layer1.conv1.bits[[0, 2]] = 0.0
        model.fc.bits[7] = -0.5
    shapes = {name: p.shape for name, p in model.named_parameters()}
    with pytest.warns(UserWarning, match=r"torch-pruning is not installed, so the 3 zero-bit groups") as caught:
        first, second = comp.step(optimizer), comp.step(optimizer)
    assert len([w for w in caught if "stay masked" in str(w.message)]) == 1
    assert first["masked"] == second["masked"] == {"layer1.conv1": [0, 2], "fc": [7]}
    assert "pruned" not in first
    assert {name: p.shape for name, p in model.named_parameters()} == shapes


def test_a_zoo_model_is_pruned_physically_with_the_optimizer_state_cut(digits_split):
    (x, y), _ = digits_split
    x8 = x[:, :, :8, :8]
    torch.manual_seed(0)
    model = PaperCNN(PaperCNNConfig(image_size=8, channels=[4, 8]))
    with torch.no_grad():
        model.blocks[0][0].bits[1] = 0
        model.blocks[1][0].bits[[2, 5]] = 0
    comp = SelfCompression(model, (x8[:50], y[:50]), gamma=0.01, k=2, restore=False)
    optimizer = _train(model, comp, x8, y, 2)
    assert comp.history[0]["pruned"] == {"blocks.0.0": [1], "blocks.1.0": [2, 5]}
    assert model.config.channels == [3, 6] and model.blocks[1][0].weight.shape == (6, 3, 3, 3)
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}
    for param in held:
        for value in optimizer.state[param].values():
            if value.dim():
                assert value.shape == param.shape
    _train(model, comp, x8, y, 2, optimizer=optimizer)  # and training goes on


def test_a_pruner_plugs_in_as_one_argument(trained_resnet):
    model, preserve = copy.deepcopy(trained_resnet.model), trained_resnet.preserve
    calls = []

    def dead_units(model, bits=None):
        judged = model.layer1.conv1.bits if bits is None else bits["layer1.conv1"]
        calls.append(("dead", bits is not None))
        return {"layer1": (judged.detach() <= 0).nonzero().flatten().tolist()}

    def prune(model, optimizer, units):
        calls.append(("prune", optimizer, units))
        return units

    with torch.no_grad():
        model.layer1.conv1.bits[[1, 3]] = 0.0
    comp = SelfCompression(model, preserve, gamma=0.03, k=1, restore=False, pruner=Pruner(dead_units, prune))
    optimizer = torch.optim.Adam(comp.param_groups(1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pruner is given: no "stay masked" warning
        event = comp.step(optimizer)
    assert event["pruned"] == {"layer1": [1, 3]} and "masked" not in event
    assert calls == [("dead", False), ("dead", True), ("prune", optimizer, {"layer1": [1, 3]})]


# ---- penalty, optimiser groups, state ----------------------------------------------------------


def test_penalty_equals_its_formula(trained_resnet):
    model, (px, py) = copy.deepcopy(trained_resnet.model).eval(), trained_resnet.preserve
    comp = SelfCompression(model, (px, py), gamma=0.03, alpha=0.01, lambda_=0.5, k=1000, preservation_batch=16, seed=4,
                           restore=False, preservation_loss="task")
    optimizer = torch.optim.Adam(comp.param_groups(1e-3))
    for _ in range(7):
        comp.step(optimizer)
    penalty = comp.penalty()

    layers = [m for m in model.modules() if isinstance(m, (QLinear, QConv2d))]
    count = sum(m.weight.numel() for m in layers)
    size = sum(torch.relu(m.bits).sum() * (m.weight.numel() // m.bits.numel()) for m in layers) / count
    l1 = sum(m.weight.abs().sum() for m in layers) / count
    # the documented stream: the batch of step 7 (rank 0), as the trainer draws it
    pick = torch.randint(0, 100, (16,), generator=seeded_generator(4, 7, 0, 1))
    preservation = F.cross_entropy(model(px[pick]), py[pick])
    torch.testing.assert_close(penalty, 0.03 * size + 0.01 * l1 + 0.5 * preservation)
    assert set(comp.terms) == {"size", "l1", "preservation"}
    torch.testing.assert_close(comp.terms["preservation"], preservation.detach())
    unsafe = SelfCompression(model, None, gamma=0.03, alpha=0.0, lambda_=0.5)
    torch.testing.assert_close(unsafe.penalty(), 0.03 * size)
    assert set(unsafe.terms) == {"size"}


def test_the_preservation_loss_of_a_sequence_model_skips_padding():
    torch.manual_seed(0)
    model = sgsc.quantize_model(TinyLM()).eval()
    x, y = counting_sequences(30)
    comp = SelfCompression(model, (x, y), gamma=0.0, lambda_=1.0, metric="loss", preservation_batch=8, restore=False,
                           preservation_loss="task")
    pick = torch.randint(0, 30, (8,), generator=seeded_generator(0, 0, 0, 1))
    logits, targets = model(x[pick]), y[pick]
    valid = targets >= 0
    expected = -torch.log_softmax(logits, -1)[valid].gather(1, targets[valid].unsqueeze(1)).mean()
    torch.testing.assert_close(comp.penalty(), expected)


def test_the_distillation_term_is_kl_to_the_references_outputs_at_its_temperature(trained_resnet):
    model, (px, py) = copy.deepcopy(trained_resnet.model).eval(), trained_resnet.preserve
    with torch.no_grad():
        teacher = model(px)
    comp = SelfCompression(model, (px, py), gamma=0.0, lambda_=1.0, preservation_loss="distill", preservation_batch=16,
                           restore=False)
    assert torch.equal(comp.teacher, teacher)
    torch.testing.assert_close(comp.penalty(), torch.zeros(()), atol=1e-6, rtol=0)  # the reference itself: no term
    with torch.no_grad():
        model.fc.bias += torch.linspace(-1, 1, 10)
    pick = torch.randint(0, 100, (16,), generator=seeded_generator(0, 0, 0, 1))
    t = 2.0
    p_teacher = torch.softmax(teacher[pick] / t, -1)
    log_student = torch.log_softmax(model(px[pick]) / t, -1)
    expected = (p_teacher * (torch.log(p_teacher) - log_student)).sum(-1).mean() * t * t
    torch.testing.assert_close(comp.penalty(), expected)
    none = SelfCompression(model, (px, py), gamma=0.0, preservation_loss="none", restore=False)
    assert none.preservation_inputs() is None and none.terms == {}


def test_param_groups_give_bits_and_exponents_their_own_rates(trained_resnet):
    model = trained_resnet.model
    comp = SelfCompression(model, gamma=0.03, quant_lr=0.07)
    quantizers = {id(p) for name, p in model.named_parameters() if name.endswith((".bits", ".exponent"))}
    everything = {id(p) for p in model.parameters()}
    groups = {g["name"]: g for g in comp.param_groups(1e-3)}
    assert {name: g["lr"] for name, g in groups.items()} == {"weights": 1e-3, "quantizers": 0.07}
    assert {id(p) for p in groups["quantizers"]["params"]} == quantizers
    assert {id(p) for p in groups["weights"]["params"]} == everything - quantizers
    split = SelfCompression(model, gamma=0.03, exponent_lr=0.01).param_groups(1e-3)
    assert [(g["name"], g["lr"]) for g in split] == [("weights", 1e-3), ("bits", 0.05), ("exponents", 0.01)]
    bits = {id(p) for name, p in model.named_parameters() if name.endswith(".bits")}
    assert {id(p) for p in split[1]["params"]} == bits
    torch.optim.Adam(split)  # what the groups are for


def test_state_dict_resumes_the_checks_and_the_preservation_stream(trained_resnet):
    model, preserve, guard = copy.deepcopy(trained_resnet.model).eval(), trained_resnet.preserve, trained_resnet.guard
    first = SelfCompression(model, preserve, guard=guard, gamma=0.03, k=2, max_drop=1.0)
    optimizer = torch.optim.Adam(first.param_groups(1e-3))
    for _ in range(5):
        first.step(optimizer)
    second = SelfCompression(model, preserve, guard=guard, gamma=0.03, k=2, max_drop=1.0)
    second.load_state_dict(first.state_dict())
    assert second.state.step == 5 and second.history == first.history and len(first.history) == 2
    torch.testing.assert_close(second.penalty(), first.penalty())


# ---- bad input --------------------------------------------------------------------------------


def test_a_model_without_quantized_layers_is_refused():
    with pytest.raises(ValueError, match="quantize_model"):
        SelfCompression(torch.nn.Sequential(torch.nn.Linear(3, 2)), gamma=0.1)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        SelfCompression("resnet", gamma=0.1)


@pytest.mark.parametrize(
    ("preserve", "error", "message"),
    [
        ((torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), ValueError, "preserve is empty"),
        (TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), ValueError, "preserve is empty"),
        (DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0))), ValueError, "preserve is empty"),
        ((torch.zeros(5, 1, 8, 8), torch.zeros(4, dtype=torch.long)), ValueError, "5 inputs but 4 targets"),
        ((torch.zeros(5, 1, 8, 8),), TypeError, "preserve"),
        ("digits", TypeError, "preserve must be"),
        (DataLoader([torch.zeros(1, 8, 8)] * 3), TypeError, r"\(input, target\) tensor pairs"),
    ],
)
def test_bad_preservation_sets_are_refused(trained_resnet, preserve, error, message):
    with pytest.raises(error, match=message):
        SelfCompression(trained_resnet.model, preserve, gamma=0.1, restore=False)


def test_every_kind_of_preservation_set_gives_the_same_set(trained_resnet):
    model, (px, py) = trained_resnet.model, trained_resnet.preserve
    kinds = [(px, py), TensorDataset(px, py), DataLoader(TensorDataset(px, py), batch_size=7),
             torch.utils.data.Subset(TensorDataset(px, py), range(len(px)))]  # a Dataset of pairs
    for kind in kinds:
        comp = SelfCompression(model, kind, gamma=0.1, restore=False)
        assert torch.equal(comp.preserved.tensors[0], px) and torch.equal(comp.preserved.tensors[1], py)


@pytest.mark.parametrize(
    ("options", "error", "name"),
    [
        ({"gamma": "0.1"}, TypeError, "gamma"),
        ({"gamma": -0.1}, ValueError, "gamma"),
        ({"gamma": 0.1, "alpha": math.inf}, ValueError, "alpha"),
        ({"gamma": 0.1, "lambda_": -1}, ValueError, "lambda_"),
        ({"gamma": 0.1, "k": 0}, ValueError, "k"),
        ({"gamma": 0.1, "k": 2.5}, TypeError, "k"),
        ({"gamma": 0.1, "max_drop": float("nan")}, ValueError, "max_drop"),
        ({"gamma": 0.1, "max_drop": -0.01}, ValueError, "max_drop"),
        ({"gamma": 0.1, "confidence": 1.0}, ValueError, "confidence"),
        ({"gamma": 0.1, "preservation_loss": "kl"}, ValueError, "preservation_loss"),
        ({"gamma": 0.1, "steps": 100}, TypeError, "steps is a setting of sgsc.compress's loop"),
        ({"gamma": 0.1, "gama": 0.1}, TypeError, "unexpected keyword argument 'gama'"),
        ({"gamma": 0.1, "config": {"gamma": 0.1}}, TypeError, "config must be an sgsc.CompressConfig"),
        ({"gamma": 0.1, "restore": "yes"}, TypeError, "restore"),
        ({"gamma": 0.1, "prune": 1}, TypeError, "prune"),
        ({"gamma": 0.1, "quant_lr": 0}, ValueError, "quant_lr"),
        ({"gamma": 0.1, "exponent_lr": -1e-3}, ValueError, "exponent_lr"),
        ({"gamma": 0.1, "preservation_batch": 0}, ValueError, "preservation_batch"),
        ({"gamma": 0.1, "seed": -1}, ValueError, "seed"),
        ({"gamma": 0.1, "task_loss": "cross_entropy"}, TypeError, "task_loss"),
        ({"gamma": 0.1, "metric": "f1"}, ValueError, "metric"),
        ({"gamma": 0.1, "metric": "loss", "higher_is_better": True}, ValueError, "higher_is_better"),
        ({"gamma": 0.1, "metric": lambda m, d: 0.5}, ValueError, "higher_is_better"),
        ({"gamma": 0.1, "pruner": "zoo"}, TypeError, "pruner"),
    ],
)
def test_bad_settings_name_the_argument(trained_resnet, options, error, name):
    with pytest.raises(error, match=name):
        SelfCompression(trained_resnet.model, trained_resnet.preserve, guard=trained_resnet.guard, **options)


def test_bad_calls_name_the_argument(trained_resnet):
    model, preserve, guard = trained_resnet.model, trained_resnet.preserve, trained_resnet.guard
    comp = SelfCompression(model, preserve, gamma=0.1, k=1, restore=False)
    with pytest.raises(ValueError, match="lr"):
        comp.param_groups(0.0)
    with pytest.raises(TypeError, match="optimizer must be"):
        comp.step(comp.param_groups(1e-3))
    forgot_bits = torch.optim.Adam([p for n, p in model.named_parameters() if not n.endswith(".bits")])
    with pytest.raises(ValueError, match="optimizer does not hold the bits"):
        comp.step(forgot_bits)
    with pytest.raises(ValueError, match="metric must return a finite number"):
        SelfCompression(model, preserve, guard=guard, gamma=0.1, max_drop=0.1, metric=lambda m, d: float("nan"),
                        higher_is_better=True)
    with pytest.raises(ValueError, match="a metric callable has no default tolerance"):
        SelfCompression(model, preserve, guard=guard, gamma=0.1, metric=lambda m, d: 0.5, higher_is_better=True)


def test_close_removes_the_hook_that_records_training_inputs(trained_resnet):
    model = copy.deepcopy(trained_resnet.model)
    hooks = len(model._forward_pre_hooks)
    with SelfCompression(model, None, gamma=0.1) as comp:
        assert len(model._forward_pre_hooks) == hooks + 1
        model(trained_resnet.preserve[0][:2])
    assert len(model._forward_pre_hooks) == hooks and comp._traced.latest is None  # nor keeps the batch alive
