"""SelfCompression on architectures the zoo does not have: bits fall, restore and prune act, the
penalty is its formula, the optimiser groups are right, bad input is refused by name."""

from __future__ import annotations

import copy
import math
import warnings

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
from sgsc.train.safety import dropped

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(model, comp, x, y, steps, *, lr=3e-3, batch=32, seed=0, optimizer=None):
    """The user's loop from the README, on random batches."""
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


@pytest.fixture(scope="module")
def trained_resnet(digits_split):
    """A quantized TinyResNet trained without compression, its preservation set, and the untrained model's
    accuracy on that set (the baseline "trained" is judged against)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    (x, y), _ = digits_split
    torch.manual_seed(0)
    model = sgsc.quantize_model(TinyResNet())
    preserve = (x[:100], y[:100])
    untrained = evaluate(model, preserve)["accuracy"]
    _train(model, SelfCompression(model, gamma=0.0, prune=False), x, y, 150)
    torch.set_num_threads(threads)
    return model, preserve, untrained


def _bits(model) -> float:
    """Bits per quantized weight, computed from the layers' own tensors (not sgsc.average_bits)."""
    layers = [m for m in model.modules() if isinstance(m, (QLinear, QConv2d))]
    paid = sum(float(m.bits.detach().clamp(min=0).sum()) * (m.weight.numel() // m.bits.numel()) for m in layers)
    return paid / sum(m.weight.numel() for m in layers)


# ---- compression works on any architecture ---------------------------------------------------


@pytest.mark.parametrize("case", ["resnet", pytest.param("mobilenet", marks=pytest.mark.xfail(
    strict=False, reason="issue 29, the safety contract: the checks watch examples the model trains on, and on some "
    "CPUs (AVX-512 Zen 4) held-out accuracy falls to 0.21 unseen")), "transformer"])
def test_bits_fall_under_the_size_term_with_safety_on(digits_split, case):
    torch.manual_seed(0)
    if case == "transformer":
        model, (x, y), (test_x, test_y) = TinyLM(), counting_sequences(600), counting_sequences(100, seed=1)
        metric, higher = "loss", False
    else:
        model, ((x, y), (test_x, test_y)) = {"resnet": TinyResNet, "mobilenet": TinyMobileNet}[case](), digits_split
        metric, higher = "accuracy", True
    model = sgsc.quantize_model(model)
    comp = SelfCompression(model, (x[:100], y[:100]), gamma=0.05, k=25, threshold=0.05, quant_lr=0.1, metric=metric)
    _train(model, comp, x, y, 150)
    print(f"\n{case}: {_bits(model):.2f} bits, {evaluate(model, (test_x, test_y))}")
    assert _bits(model) < 6.0  # from 8
    assert [e["step"] for e in comp.history] == list(range(25, 151, 25))
    for event in comp.history:  # a restore exactly where the library's rule says the metric fell
        assert ("restored" in event) == dropped(event["metric"], event["best"], 0.05, higher), event
    result = evaluate(model, (test_x, test_y))
    assert result["accuracy"] > 0.4 if higher else result["loss"] < 1.0  # digits: chance is 0.1


# ---- the safety check ------------------------------------------------------------------------


def test_restore_gives_the_snapshot_bits_back_and_zeroes_adams_momentum(trained_resnet):
    model, preserve, untrained = copy.deepcopy(trained_resnet[0]), trained_resnet[1], trained_resnet[2]
    comp = SelfCompression(model, preserve, gamma=0.03, k=1, threshold=0.02)
    healthy = evaluate(model, preserve)["accuracy"]
    assert comp.state.best == healthy > untrained + 0.3  # trained: far from what 1-bit layers keep
    optimizer = torch.optim.Adam(comp.param_groups(1e-3))
    snapshot = {name: layer.bits.detach().clone() for name, layer in sgsc.quantized_layers(model)}
    broken = {"layer2.conv1": model.layer2.conv1, "layer2.conv2": model.layer2.conv2, "fc": model.fc}
    with torch.no_grad():
        for layer in broken.values():
            layer.bits.fill_(1.0)
            optimizer.state[layer.bits]["exp_avg"] = torch.full_like(layer.bits, -0.5)  # momentum pushing down
    untouched = optimizer.state[model.layer1.conv1.bits]["exp_avg"] = torch.full_like(model.layer1.conv1.bits, -0.5)

    event = comp.step(optimizer)

    assert dropped(event["metric"], healthy, 0.02, True) and event["best"] == healthy
    assert event["restored"] == sum(layer.quant_groups for layer in broken.values())
    for name, layer in sgsc.quantized_layers(model):
        assert torch.equal(layer.bits.detach(), snapshot[name]), name
    for layer in broken.values():
        assert torch.equal(optimizer.state[layer.bits]["exp_avg"], torch.zeros_like(layer.bits))
    assert torch.equal(optimizer.state[model.layer1.conv1.bits]["exp_avg"], untouched)  # not lowered: kept
    assert evaluate(model, preserve)["accuracy"] == healthy
    assert comp.history == [event]


def test_without_a_preservation_set_nothing_is_restored(trained_resnet):
    model = copy.deepcopy(trained_resnet[0])
    comp = SelfCompression(model, None, gamma=0.03, k=1)
    optimizer = torch.optim.Adam(comp.param_groups(1e-3))
    with torch.no_grad():
        model.fc.bits.fill_(1.0)
    event = comp.step(optimizer)
    assert event["metric"] is None and "restored" not in event
    assert torch.equal(model.fc.bits.detach(), torch.ones_like(model.fc.bits))


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
    model, preserve = copy.deepcopy(trained_resnet[0]), trained_resnet[1]
    with torch.no_grad():
        model.layer1.conv1.bits[[0, 2]] = -1.0
        model.fc.bits[7] = -1.0  # a logit: it feeds the output, so it stays (masked)
    comp = SelfCompression(model, preserve, gamma=0.03, k=1, threshold=1.0)
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
    model, preserve = copy.deepcopy(trained_resnet[0]), trained_resnet[1]
    with torch.no_grad():
        model.layer2.conv1.bits[1] = -1.0
    comp = SelfCompression(model, preserve, gamma=0.03, k=1, threshold=1.0)
    optimizer = torch.optim.Adam(comp.param_groups(1e-3))
    with torch.no_grad():
        model(preserve[0][:4])  # an evaluation is not a training step
    with pytest.raises(ValueError, match="has not run one yet; pass example_inputs="):
        comp.step(optimizer)
    assert model.layer2.conv1.out_channels == 8  # nothing cut

    given = SelfCompression(model, preserve, gamma=0.03, k=1, threshold=1.0, example_inputs=preserve[0][:2])
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

    monkeypatch.setattr(selfcompress, "default_pruner", lambda model, example_inputs: None)
    model, preserve = copy.deepcopy(trained_resnet[0]), trained_resnet[1]
    comp = SelfCompression(model, preserve, gamma=0.03, k=1, threshold=1.0)
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
    comp = SelfCompression(model, (x8[:50], y[:50]), gamma=0.01, k=2, threshold=1.0)
    optimizer = _train(model, comp, x8, y, 2)
    assert comp.history[0]["pruned"] == {"blocks.0": [1], "blocks.1": [2, 5]}
    assert model.config.channels == [3, 6] and model.blocks[1][0].weight.shape == (6, 3, 3, 3)
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}
    for param in held:
        for value in optimizer.state[param].values():
            if value.dim():
                assert value.shape == param.shape
    _train(model, comp, x8, y, 2, optimizer=optimizer)  # and training goes on


def test_a_pruner_plugs_in_as_one_argument(trained_resnet):
    model, preserve = copy.deepcopy(trained_resnet[0]), trained_resnet[1]
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
    comp = SelfCompression(model, preserve, gamma=0.03, k=1, threshold=1.0, pruner=Pruner(dead_units, prune))
    optimizer = torch.optim.Adam(comp.param_groups(1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pruner is given: no "stay masked" warning
        event = comp.step(optimizer)
    assert event["pruned"] == {"layer1": [1, 3]} and "masked" not in event
    assert calls == [("dead", False), ("dead", True), ("prune", optimizer, {"layer1": [1, 3]})]


# ---- penalty, optimiser groups, state ----------------------------------------------------------


def test_penalty_equals_its_formula(trained_resnet):
    model, (px, py) = copy.deepcopy(trained_resnet[0]).eval(), trained_resnet[1]
    comp = SelfCompression(model, (px, py), gamma=0.03, alpha=0.01, lambda_=0.5, k=1000, preservation_batch=16, seed=4)
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
    comp = SelfCompression(model, (x, y), gamma=0.0, lambda_=1.0, metric="loss", preservation_batch=8)
    pick = torch.randint(0, 30, (8,), generator=seeded_generator(0, 0, 0, 1))
    logits, targets = model(x[pick]), y[pick]
    valid = targets >= 0
    expected = -torch.log_softmax(logits, -1)[valid].gather(1, targets[valid].unsqueeze(1)).mean()
    torch.testing.assert_close(comp.penalty(), expected)


def test_param_groups_give_bits_and_exponents_their_own_rates(trained_resnet):
    model = trained_resnet[0]
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
    model, preserve = copy.deepcopy(trained_resnet[0]).eval(), trained_resnet[1]
    first = SelfCompression(model, preserve, gamma=0.03, k=2)
    optimizer = torch.optim.Adam(first.param_groups(1e-3))
    for _ in range(5):
        first.step(optimizer)
    second = SelfCompression(model, preserve, gamma=0.03, k=2)
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
        SelfCompression(trained_resnet[0], preserve, gamma=0.1)


def test_every_kind_of_preservation_set_gives_the_same_set(trained_resnet):
    model, (px, py), _ = trained_resnet
    kinds = [(px, py), TensorDataset(px, py), DataLoader(TensorDataset(px, py), batch_size=7),
             torch.utils.data.Subset(TensorDataset(px, py), range(len(px)))]  # a Dataset of pairs
    for kind in kinds:
        comp = SelfCompression(model, kind, gamma=0.1)
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
        ({"gamma": 0.1, "threshold": float("nan")}, ValueError, "threshold"),
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
        SelfCompression(trained_resnet[0], trained_resnet[1], **options)


def test_bad_calls_name_the_argument(trained_resnet):
    model, preserve, _ = trained_resnet
    comp = SelfCompression(model, preserve, gamma=0.1, k=1)
    with pytest.raises(ValueError, match="lr"):
        comp.param_groups(0.0)
    with pytest.raises(TypeError, match="optimizer must be"):
        comp.step(comp.param_groups(1e-3))
    forgot_bits = torch.optim.Adam([p for n, p in model.named_parameters() if not n.endswith(".bits")])
    with pytest.raises(ValueError, match="optimizer does not hold the bits"):
        comp.step(forgot_bits)
    with pytest.raises(ValueError, match="metric must return a finite number"):
        SelfCompression(model, preserve, gamma=0.1, metric=lambda m, d: float("nan"), higher_is_better=True)
