"""Preservation set: criteria checked against hand computations, shares, determinism, files."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from own_models import TinyLM, TinyMobileNet, TinyResNet, counting_sequences
from torch import nn
from torch.utils.data import TensorDataset

import sgsc
from sgsc.nn.zoo import CharDecoder, CharDecoderConfig, PaperCNN, PaperCNNConfig
from sgsc.train import preservation
from sgsc.train.data import load_vision
from sgsc.train.preservation import Scores, build, compute_scores, find_layers, quotas, random_subset, select


@pytest.fixture(scope="module")
def digits() -> TensorDataset:
    x, y = load_vision(name="digits").train.tensors
    return TensorDataset(x[:200], y[:200])


@pytest.fixture(scope="module")
def cnn() -> PaperCNN:
    torch.manual_seed(0)
    return PaperCNN(PaperCNNConfig(image_size=8, channels=[4, 8])).eval()


@pytest.fixture(scope="module")
def cnn_scores(cnn, digits) -> Scores:
    return compute_scores(cnn, digits, batch_size=64)


@pytest.fixture(scope="module")
def decoder_and_blocks():
    torch.manual_seed(0)
    model = CharDecoder(CharDecoderConfig(vocab_size=7, block_size=6, n_embd=8, n_layer=1, head_dim=4)).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 7, (40, 6), generator=gen)
    y = torch.randint(0, 7, (40, 6), generator=gen)
    y[::3, 4:] = -1  # padded targets, as make_blocks writes them
    return model, TensorDataset(x, y)


def _top(values: torch.Tensor, k: int) -> list[int]:
    return sorted(np.argsort(-values.numpy(), kind="stable")[:k].tolist())


def test_gradcam_score_matches_a_hand_computation(cnn, digits, cnn_scores):
    for i in (0, 17, 199):
        x, y = digits[i]
        captured = {}
        handle = cnn.attribution_layer.register_forward_hook(lambda m, inp, out: captured.setdefault("a", out))
        logits = cnn(x.unsqueeze(0))
        handle.remove()
        acts = captured["a"]
        (grads,) = torch.autograd.grad(logits[0, y], acts)
        alpha = grads.mean(dim=(2, 3), keepdim=True)
        expected = torch.relu((alpha * acts).sum(dim=1)).sum()
        assert cnn_scores.gradcam[i].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


def test_gradient_x_activation_for_the_decoder(decoder_and_blocks):
    model, blocks = decoder_and_blocks
    scores = compute_scores(model, blocks, batch_size=16)
    for i in (0, 3, 38):
        x, y = blocks[i]
        captured = {}
        handle = model.token_embedding.register_forward_hook(lambda m, inp, out: captured.setdefault("a", out))
        logits = model(x.unsqueeze(0))[0]
        handle.remove()
        valid = y >= 0
        target = logits[valid].gather(1, y[valid].unsqueeze(1)).sum()
        (grads,) = torch.autograd.grad(target, captured["a"])
        expected = torch.relu((grads * captured["a"]).sum(-1)).sum()
        assert scores.gradcam[i].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
        probs = torch.softmax(logits[valid], -1).topk(2).values
        assert scores.uncertainty[i].item() == pytest.approx((1 - (probs[:, 0] - probs[:, 1])).mean().item(), rel=1e-5)
    assert scores.embeddings.shape == (40, 8)


def test_uncertainty_margin_and_entropy(cnn, digits, cnn_scores):
    with torch.no_grad():
        probs = torch.softmax(cnn(digits.tensors[0]), -1)
    top = probs.topk(2).values
    torch.testing.assert_close(cnn_scores.uncertainty, (1 - (top[:, 0] - top[:, 1])).double())
    entropy = compute_scores(cnn, digits, criteria=["uncertainty"], uncertainty="entropy").uncertainty
    torch.testing.assert_close(entropy, -(probs * probs.log()).sum(-1).double(), rtol=1e-5, atol=1e-6)


def test_build_is_deterministic_unique_and_sized(cnn, digits):
    first = build(cnn, digits, fraction=0.13, seed=5)
    assert torch.equal(first, build(cnn, digits, fraction=0.13, seed=5))
    assert first.dtype == torch.int64 and first.numel() == round(0.13 * 200)
    assert first.unique().numel() == first.numel() and torch.equal(first, first.sort().values)
    assert build(cnn, digits, fraction=1.0, weights=(1, 1, 0)).tolist() == list(range(200))


def test_criterion_shares_are_respected(cnn_scores):
    chosen = select(cnn_scores, fraction=0.2, weights=(2, 1, 1), seed=0)
    parts = chosen.by_criterion
    assert {name: len(part) for name, part in parts.items()} == {"gradcam": 20, "uncertainty": 10, "diversity": 10}
    assert parts["gradcam"].tolist() == _top(cnn_scores.gradcam, 20)
    # uncertainty takes its best examples that gradcam has not already taken
    ranked = np.argsort(-cnn_scores.uncertainty.numpy(), kind="stable")
    fresh = [i for i in ranked.tolist() if i not in set(parts["gradcam"].tolist())][:10]
    assert parts["uncertainty"].tolist() == sorted(fresh)
    union = torch.cat(list(parts.values()))
    assert union.unique().numel() == 40 and torch.equal(union.sort().values, chosen.indices)


@pytest.mark.parametrize("weights,criterion", [((1, 0, 0), "gradcam"), ((0, 1, 0), "uncertainty")])
def test_single_criterion_builds_take_its_top_examples(cnn, digits, cnn_scores, weights, criterion):
    indices = build(cnn, digits, fraction=0.1, weights=weights)
    assert indices.tolist() == _top(getattr(cnn_scores, criterion), 20)


def test_diversity_takes_the_example_nearest_each_cluster():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + torch.randn(10, 2, generator=gen) for c in centres]).double()
    chosen = select(Scores(embeddings=points), fraction=0.1, weights=(0, 0, 1), seed=0).indices
    blobs = points.view(3, 10, 2)
    expected = [10 * b + int((blobs[b] - blobs[b].mean(0)).norm(dim=1).argmin()) for b in range(3)]
    assert chosen.tolist() == expected
    # with more places than clusters' nearest points, the next round takes the second nearest
    assert select(Scores(embeddings=points), fraction=0.2, weights=(0, 0, 1), seed=0).indices.numel() == 6


class _UserConvNet(torch.nn.Module):
    """No zoo interface: Grad-CAM finds the rectified maps, diversity what ``fc`` reads."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(inplace=True), torch.nn.Flatten())
        self.fc = torch.nn.Linear(3 * 6 * 6, 10)

    def embed(self, x):
        return self.features(x)

    def forward(self, x):
        return self.fc(self.embed(x))


def test_a_user_model_without_the_zoo_interface(digits):
    torch.manual_seed(0)
    model = _UserConvNet()
    default = compute_scores(model, digits, batch_size=64)
    # the in-place ReLU's output is the last 4-D map: its rectified maps, as PaperCNN names its own
    explicit = compute_scores(model, digits, batch_size=64, attribution_layer=model.features[1],
                              embedding_layer=model.fc)
    torch.testing.assert_close(default.gradcam, explicit.gradcam)
    conv = compute_scores(model, digits, batch_size=64, criteria=["gradcam"], attribution_layer=model.features[0])
    assert not torch.allclose(conv.gradcam, default.gradcam)  # so the choice of layer is visible
    with torch.no_grad():
        torch.testing.assert_close(default.embeddings, model.embed(digits.tensors[0]))
    assert (default.gradcam > 0).any()
    assert build(model, digits, fraction=0.1).numel() == 20


def test_quotas():
    assert quotas(10, (1, 1, 1)) == {"gradcam": 4, "uncertainty": 3, "diversity": 3}
    assert quotas(7, {"uncertainty": 1}) == {"gradcam": 0, "uncertainty": 7, "diversity": 0}
    assert quotas(5, (0.5, 0.3, 0.2)) == {"gradcam": 3, "uncertainty": 1, "diversity": 1}


def test_scoring_leaves_the_model_as_it_was(digits):
    torch.manual_seed(0)
    model = PaperCNN(PaperCNNConfig(image_size=8, channels=[2])).train()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    compute_scores(model, digits.tensors, batch_size=100)  # an (inputs, targets) pair works too
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())  # BN stats untouched
    assert not model.attribution_layer._forward_hooks


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan"), True])
def test_bad_fraction(cnn, digits, fraction):
    with pytest.raises(ValueError, match="fraction"):
        build(cnn, digits, fraction=fraction)


def test_bad_arguments(cnn, digits, cnn_scores):
    with pytest.raises(ValueError, match="selects nothing"):
        select(cnn_scores, fraction=0.001)
    with pytest.raises(ValueError, match="positive share"):
        build(cnn, digits, weights=(0, 0, 0))
    with pytest.raises(ValueError, match="uncertainty share"):
        build(cnn, digits, weights=(1, -1, 0))
    with pytest.raises(ValueError, match="3 shares"):
        build(cnn, digits, weights=(1, 1))
    with pytest.raises(ValueError, match="not computed"):
        select(Scores(gradcam=cnn_scores.gradcam), fraction=0.1, weights=(1, 1, 0))
    with pytest.raises(ValueError, match="does not match targets"):
        compute_scores(cnn, TensorDataset(digits.tensors[0][:4], torch.zeros(4, 2, dtype=torch.long)))


def test_random_subset():
    subset = random_subset(50, 10, seed=3)
    assert torch.equal(subset, random_subset(50, 10, seed=3))
    assert not torch.equal(subset, random_subset(50, 10, seed=4))
    assert subset.unique().numel() == 10 and 0 <= subset.min() and subset.max() < 50
    with pytest.raises(ValueError, match="size"):
        random_subset(5, 6)
    with pytest.raises(ValueError, match="size"):
        random_subset(5, 0)


def test_random_method_draws_the_seeded_subset_without_scoring(digits):
    # nn.Identity has no layer for Grad-CAM: scoring would raise, the random baseline never scores
    drawn = build(torch.nn.Identity(), digits, fraction=0.1, method="random", seed=5)
    assert torch.equal(drawn, random_subset(200, 20, seed=5))
    with pytest.raises(ValueError, match="method"):
        build(torch.nn.Identity(), digits, method="uniform")


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "keep.json"
    preservation.save(torch.tensor([7, 1, 3]), path, dataset_size=10, meta={"fraction": 0.3})
    assert preservation.load(path).tolist() == [7, 1, 3]
    assert preservation.load(path, dataset_size=10).tolist() == [7, 1, 3]
    assert os.listdir(tmp_path) == ["keep.json"]  # the temporary file was renamed, not left behind
    assert json.loads(path.read_text())["meta"] == {"fraction": 0.3}
    with pytest.raises(ValueError, match="10 examples, but this one has 12"):
        preservation.load(path, dataset_size=12)


def test_save_and_load_reject_bad_sets(tmp_path):
    path = tmp_path / "keep.json"
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        preservation.save([3, 10], path, dataset_size=10)
    with pytest.raises(ValueError, match="duplicates"):
        preservation.save([3, 3], path, dataset_size=10)
    with pytest.raises(ValueError, match="empty"):
        preservation.save([], path, dataset_size=10)
    assert not path.exists()
    preservation.save([1, 2], path, dataset_size=10)
    record = json.loads(path.read_text())
    corruptions = [("indices", [1, 99], "lie in"), ("size", 5, "records size"), ("format", "x", "not an sgsc")]
    for key, value, message in corruptions:
        path.write_text(json.dumps({**record, key: value}))
        with pytest.raises(ValueError, match=message):
            preservation.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a preservation-set JSON"):
        preservation.load(path)
    with pytest.raises(FileNotFoundError, match="gone.json"):
        preservation.load(tmp_path / "gone.json")


# ---- any model: the layers the criteria read are found, or an argument is asked for ------------


def _names(model, layers):
    names = {id(module): name for name, module in model.named_modules()}
    return names[id(layers.attribution)], names[id(layers.embedding)]


@pytest.mark.parametrize("quantized", [False, True])
def test_find_layers_on_a_resnet_a_mobilenet_and_a_transformer(quantized):
    torch.manual_seed(0)
    cases = [(TinyResNet(), torch.randn(4, 1, 8, 8)), (TinyMobileNet(), torch.randn(4, 1, 8, 8)),
             (TinyLM(), counting_sequences(4)[0])]
    found = []
    for model, x in cases:
        if quantized:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = sgsc.quantize_model(model)
        found.append(_names(model, find_layers(model, x)))
    # ResNet: the last block's output after the residual add, not its shortcut conv (which runs last)
    # nor the pool's 1x1 map; MobileNet: the feature stack, not the squeeze-excitation's 1x1 convs;
    # the LM: the token embedding (not the positions'), and the tied head
    assert found == [("layer2", "fc"), ("features", "classifier.3"), ("tok", "head")]


def test_a_criterion_without_a_layer_asks_for_the_argument():
    torch.manual_seed(0)
    x, y = counting_sequences(20)
    no_head = TinyLM(tied_linear=True)  # logits from F.linear: the last nn.Linear is the block's MLP
    with pytest.raises(ValueError, match="embedding_layer: the last nn.Linear to run, 'block.linear2'"):
        build(no_head, (x, y), fraction=0.2)
    assert build(no_head, (x, y), fraction=0.2, weights=(1, 1, 0)).numel() == 4
    assert build(no_head, (x, y), fraction=0.2, embedding_layer=no_head.ln).numel() == 4
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    flat = (torch.randn(20, 4), torch.randint(0, 3, (20,)))
    with pytest.raises(ValueError, match="attribution_layer: the model has no 4-D feature map"):
        build(mlp, flat, fraction=0.2)
    assert build(mlp, flat, fraction=0.2, attribution_layer=mlp[1]).numel() == 4
    with pytest.raises(ValueError, match="attribution_layer is not a submodule"):
        build(mlp, flat, attribution_layer=torch.nn.ReLU())
    with pytest.raises(TypeError, match="embedding_layer must be an nn.Module"):
        build(mlp, flat, embedding_layer="2")
    with pytest.raises(ValueError, match="dataset is empty"):
        build(mlp, (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)))


def _manual_scores(model, x, y, attribution, head) -> Scores:
    """Grad-CAM (or gradient x activation), margin and head-input features, one example at a time."""
    gradcam, margin, features = [], [], []
    model.eval()
    for i in range(len(x)):
        seen = {}
        hooks = [attribution.register_forward_hook(lambda m, inp, out: seen.setdefault("a", out)),
                 head.register_forward_pre_hook(lambda m, inp: seen.setdefault("f", inp[0]))]
        logits = model(x[i : i + 1])[0]
        for hook in hooks:
            hook.remove()
        valid = y[i] >= 0
        target = logits[valid].gather(-1, y[i][valid].reshape(-1, 1)).sum() if y[i].dim() else logits[y[i]]
        (grads,) = torch.autograd.grad(target, seen["a"])
        acts = seen["a"]
        if acts.dim() == 4:
            gradcam.append(torch.relu((grads.mean(dim=(2, 3), keepdim=True) * acts).sum(1)).sum())
        else:
            gradcam.append(torch.relu((grads * acts).sum(-1)).sum())
        top = torch.softmax(logits.detach().reshape(-1, logits.shape[-1])[valid.reshape(-1)], -1).topk(2).values
        margin.append((1 - (top[:, 0] - top[:, 1])).mean())
        f = seen["f"].detach()[0]
        features.append(f[valid].mean(0) if f.dim() == 2 else f)
    return Scores(torch.stack(gradcam).double().detach(), torch.stack(margin).double(), torch.stack(features))


@pytest.mark.parametrize("case", ["resnet", "transformer"])
def test_build_selects_what_a_manual_computation_selects(case, digits):
    torch.manual_seed(0)
    if case == "resnet":
        model = sgsc.quantize_model(TinyResNet())
        x, y = digits.tensors[0][:60], digits.tensors[1][:60]
        attribution, head = model.layer2, model.fc
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = sgsc.quantize_model(TinyLM())
        x, y = counting_sequences(60, seed=3)
        attribution, head = model.tok, model.head
    manual = _manual_scores(model, x, y, attribution, head)
    scores = compute_scores(model, (x, y), batch_size=16)
    torch.testing.assert_close(scores.gradcam, manual.gradcam, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores.uncertainty, manual.uncertainty, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.embeddings, manual.embeddings, rtol=1e-5, atol=1e-6)
    for weights in ((1, 0, 0), (0, 1, 0)):
        criterion = "gradcam" if weights[0] else "uncertainty"
        assert build(model, (x, y), 0.2, weights).tolist() == _top(getattr(manual, criterion), 12)
    assert torch.equal(build(model, (x, y), 0.2, seed=2), select(manual, 0.2, seed=2).indices)


def test_a_pool_scores_a_random_subset_and_keeps_the_set_size(digits):
    torch.manual_seed(0)
    model = sgsc.quantize_model(TinyResNet())
    x, y = digits.tensors[0][:80], digits.tensors[1][:80]
    pool = random_subset(80, 40, seed=5)  # the pool build draws with the same seed
    manual = _manual_scores(model, x[pool], y[pool], model.layer2, model.fc)
    for weights in ((1, 0, 0), (0, 1, 0)):
        criterion = "gradcam" if weights[0] else "uncertainty"
        chosen = build(model, (x, y), 0.1, weights, seed=5, pool=40)
        assert chosen.tolist() == sorted(pool[_top(getattr(manual, criterion), 8)].tolist())
    assert torch.equal(build(model, (x, y), 0.1, seed=5, pool=80), build(model, (x, y), 0.1, seed=5))
    assert len(build(model, (x, y), 0.5, seed=5, pool=10)) == 40  # a pool smaller than the set grows to it


def test_outputs_that_are_not_class_scores_are_scored_by_each_examples_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 3, padding=1)).eval()
    x = torch.randn(6, 1, 5, 5)
    target = torch.randn(6, 1, 5, 5)
    mse = torch.nn.functional.mse_loss
    scores = preservation.compute_scores(model, (x, target), task_loss=mse)
    with torch.no_grad():
        outputs = model(x)
    expected = torch.stack([mse(outputs[i : i + 1], target[i : i + 1]) for i in range(6)]).double()
    torch.testing.assert_close(scores.uncertainty, expected)  # the loss itself: the first to suffer
    torch.testing.assert_close(scores.embeddings, outputs.flatten(1))  # no head: the outputs are clustered
    assert scores.gradcam.shape == (6,) and (scores.gradcam >= 0).all()
    with pytest.raises(ValueError, match="targets are floats, not class indices: pass task_loss="):
        preservation.compute_scores(model, (x, target))
    assert len(preservation.build(model, (x, target), 0.5, task_loss=mse)) == 3
