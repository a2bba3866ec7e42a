"""The packed file for any architecture (format version 4): no registry, pruning replayed on load.

Each model is quantized, trained a few steps (so BatchNorm statistics move), given zero-bit groups
and, for the CNNs, physically pruned; loading its file into a fresh *unpruned* float architecture
must give the trained model's outputs bit for bit in eval mode. Zoo files keep their exact bytes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import sgsc
from sgsc import export
from sgsc.cli import main
from sgsc.export import HEADER_CRC_TENSOR, ArchitectureMismatch, PackedFileError
from sgsc.nn import quantized_layers
from sgsc.nn.packed import PackedEmbedding, PackedStreamLinear
from sgsc.nn.zoo import build_model

sys.path.insert(0, str(Path(__file__).parents[1]))
from own_models import TinyLM, TinyMobileNet, TinyResNet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n=8, seed=0):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _tokens(n=4, seed=0):
    return torch.randint(0, 11, (n, 12), generator=torch.Generator().manual_seed(seed))


def _trained(factory, inputs, seed=0):
    torch.manual_seed(seed)
    model = sgsc.quantize_model(factory())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(3):
        loss = model(inputs(seed=step)).float().logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _zero_bits(model, names_and_groups):
    with torch.no_grad():
        for name, groups in names_and_groups.items():
            model.get_submodule(name).bits[groups] = 0.0


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _prune(model, example):
    from sgsc.nn.graph_pruning import prune_zero_bit_units  # needs torch-pruning (the [train] extra)

    report = prune_zero_bit_units(model, example)
    assert report.parameters_removed > 0, str(report)


def _pruned_resnet():
    model = _trained(TinyResNet, _images)
    # an inner channel of each block and a channel of the residual stream of layer2 (coupled with its shortcut)
    _zero_bits(model, {"layer1.conv1": [1], "layer2.conv1": [0, 5], "layer2.conv2": [3], "layer2.shortcut.0": [3]})
    _prune(model, _images())
    return model.eval()


def _pruned_mobilenet():
    model = _trained(TinyMobileNet, _images)
    _zero_bits(model, {"features.1.expand.0": [2, 7], "features.1.depthwise.0": [2, 7], "features.2.expand.0": [0],
                       "features.2.depthwise.0": [0], "classifier.0": [4]})
    _prune(model, _images())
    return model.eval()


@pytest.mark.parametrize("factory,prune", [(TinyResNet, _pruned_resnet), (TinyMobileNet, _pruned_mobilenet)])
def test_a_pruned_cnn_loads_into_its_unpruned_architecture_bit_for_bit(tmp_path, factory, prune):
    pytest.importorskip("torch_pruning")
    model = prune()
    assert _params(model) < _params(sgsc.quantize_model(factory())), "the test must prune something"
    path = tmp_path / "model.sgsc"
    sgsc.save_packed(model, path)
    assert export.read_header(path)["version"] == 4
    loaded = sgsc.load_packed(path, model=factory())
    x = _images(16, seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    quantizers = sum(layer.bits.numel() + layer.exponent.numel() for _, layer in quantized_layers(model))
    assert _params(loaded) == _params(model) - quantizers
    assert not loaded.training
    packed = sgsc.load_packed(path, model=factory(), runtime="packed")
    with torch.no_grad():
        torch.testing.assert_close(packed(x), loaded(x), rtol=1e-5, atol=1e-5)


def _batchnorm_variants():
    """BatchNorm without running statistics and without an affine weight: both cut on load too."""
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6, track_running_stats=False), nn.ReLU(),
                         nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
                         nn.Conv2d(4, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))


def test_batchnorm_without_statistics_or_affine_weight_is_pruned_exactly_and_reloads(tmp_path):
    pytest.importorskip("torch_pruning")
    model = _trained(_batchnorm_variants, _images)
    _zero_bits(model, {"0": [1, 4], "3": [2]})
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():  # the test's own silencing: the affine entries, and the mean where there is no weight
        reference[1].weight[[1, 4]] = reference[1].bias[[1, 4]] = 0.0
        reference[4].running_mean[2] = 0.0
    _prune(model, _images())
    assert (model[1].num_features, model[4].num_features, model[4].running_mean.shape) == (4, 3, (3,))
    x = _images(16, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), rtol=1e-5, atol=1e-5)
    sgsc.save_packed(model, tmp_path / "bn.sgsc")
    loaded = sgsc.load_packed(tmp_path / "bn.sgsc", model=_batchnorm_variants())
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _lm():
    model = _trained(TinyLM, _tokens)
    _zero_bits(model, {"tok": [3], "block.linear1": [0, 9], "block.self_attn.in_proj": [1]})
    return model.eval()


def test_a_transformer_with_a_tied_head_loads_tied_and_bit_for_bit(tmp_path):
    model = _lm()
    assert model.head.weight is model.tok.weight
    path = tmp_path / "lm.sgsc"
    sgsc.save_packed(model, path, data={"name": "names", "seed": 1})
    header = export.read_header(path)
    assert header["architecture"]["tied"]["head.weight"] == "tok.weight"
    loaded = sgsc.load_packed(path, model=TinyLM())
    assert loaded.head.weight is loaded.tok.weight
    assert isinstance(loaded.tok, nn.Embedding) and isinstance(loaded.block.self_attn.in_proj, nn.Linear)
    idx = _tokens(6, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    # the tied table is stored once: codes for one of the two layers
    assert [layer.name for layer in export.summarize(path).layers].count("head") == 0
    packed = sgsc.load_packed(path, model=TinyLM(), runtime="packed")
    # the tied table runs packed on both sides: a lookup and a product from the same codes
    assert isinstance(packed.tok, PackedEmbedding) and isinstance(packed.pos, PackedEmbedding)
    # attention computes from its projections' codes, dequantized on each call
    assert isinstance(packed.head, PackedStreamLinear) and isinstance(packed.block.self_attn.in_proj, PackedStreamLinear)
    assert torch.equal(packed.tok.weight, loaded.tok.weight) and torch.equal(packed.head.weight, loaded.head.weight)
    with torch.no_grad():
        assert torch.equal(packed.tok(idx), loaded.tok(idx))
        torch.testing.assert_close(packed(idx), loaded(idx), rtol=1e-5, atol=1e-5)
    assert packed.tok.weight_nbytes < loaded.tok.weight.numel() * 4 / 2  # 8-bit codes, 9 bytes a token besides


def test_an_architecture_that_does_not_match_names_the_first_mismatch(tmp_path):
    pytest.importorskip("torch_pruning")
    path = tmp_path / "resnet.sgsc"
    sgsc.save_packed(_pruned_resnet(), path)
    with pytest.raises(ArchitectureMismatch, match=r"module 'stem\.0': the file has QConv2d with 4 groups by output, "
                                                   r"the architecture QConv2d with 3 groups"):
        sgsc.load_packed(path, model=TinyResNet(width=3))
    with pytest.raises(ArchitectureMismatch, match=r"module 'stem\.0': the file has QConv2d .* the architecture "
                                                   r"no quantized layer"):
        sgsc.load_packed(path, model=TinyMobileNet())
    with pytest.raises(ArchitectureMismatch, match="'fc'"):
        other = TinyResNet()
        other.fc = nn.Sequential(nn.Linear(8, 10))
        sgsc.load_packed(path, model=other)


def test_a_record_file_needs_a_model_and_a_zoo_file_refuses_one(tmp_path):
    path = tmp_path / "lm.sgsc"
    sgsc.save_packed(_lm(), path)
    with pytest.raises(ValueError, match="pass model="):
        sgsc.load_packed(path)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sgsc.load_packed(path, model=TinyLM)
    zoo = tmp_path / "cnn.sgsc"
    sgsc.save_packed(build_model("paper_cnn", {"image_size": 8, "channels": [4, 4]}), zoo)
    with pytest.raises(ValueError, match="zoo model 'paper_cnn'"):
        sgsc.load_packed(zoo, model=TinyResNet())


def test_a_file_of_any_model_is_inspected_without_the_model(tmp_path, capsys):
    path = tmp_path / "lm.sgsc"
    sgsc.save_packed(_lm(), path)
    summary = export.summarize(path)
    assert summary.file_bytes == path.stat().st_size
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "block.self_attn.in_proj" in out and "tok" in out


def test_the_memory_bound_applies_before_the_architecture_is_touched(tmp_path):
    path = tmp_path / "lm.sgsc"
    sgsc.save_packed(_lm(), path)
    architecture = TinyLM()
    before = {k: v.clone() for k, v in architecture.state_dict().items()}
    with pytest.raises(PackedFileError, match="max_bytes"):
        sgsc.load_packed(path, model=architecture, max_bytes=1000)
    assert all(torch.equal(before[k], v) for k, v in architecture.state_dict().items())


def _rewrite_record(path, mutate):
    """Rewrite the file's architecture record with valid checksums, as a hostile writer would."""
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["sgsc"])
    tensors = load_file(str(path))
    mutate(header["architecture"])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"))
    tensors[HEADER_CRC_TENSOR] = torch.tensor([zlib.crc32(text.encode())], dtype=torch.int64)
    save_file(tensors, str(path), metadata={"sgsc": text})


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a["layers"][0].__setitem__(1, "QLSTM"), "kind 'QLSTM'"),
    (lambda a: a["layers"][0].__setitem__(2, 5), r"bits must be float32 of shape \(5,\)"),
    (lambda a: a["state"].append(a["state"][0]), "listed twice"),
    (lambda a: a["tied"].__setitem__("ln.weight", "pos.weight"), "ln.weight"),
    (lambda a: a["state"][0].__setitem__(2, "complex64"), "dtype"),
    (lambda a: a.__setitem__("extra", 1), "exactly layers, state, tied"),
])
def test_a_hostile_record_is_refused_with_its_reason(tmp_path, mutate, message):
    path = tmp_path / "lm.sgsc"
    sgsc.save_packed(_lm(), path)
    _rewrite_record(path, mutate)
    with pytest.raises(PackedFileError, match=message):
        export.read_header(path)
    with pytest.raises(PackedFileError, match=message):
        sgsc.load_packed(path, model=TinyLM())


def test_a_record_claiming_huge_shapes_is_refused_by_the_memory_bound(tmp_path):
    path = tmp_path / "lm.sgsc"
    sgsc.save_packed(_lm(), path)

    def grow(record):
        for entry in record["state"]:
            if entry[0] == "pos.weight":
                entry[1] = [12 * 10**8, 16]
    _rewrite_record(path, grow)
    with pytest.raises(PackedFileError, match="over the limit"):
        export.summarize(path)


def factory():
    """The float architecture of the CLI test's file: `--model test_export_any_model:factory`."""
    return TinyLM()


def test_cli_eval_and_export_accept_a_model_factory(tmp_path, capsys, monkeypatch):
    path = tmp_path / "lm.sgsc"
    sgsc.save_packed(_lm(), path, data={"name": "names", "seed": 0})
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1]))
    monkeypatch.setenv("SGSC_DATA_DIR", str(tmp_path / "no-data"))
    assert main(["eval", str(path), "--model", "nope_module:factory"]) == 2
    assert "--model 'nope_module:factory': cannot import nope_module" in capsys.readouterr().err
    assert main(["eval", str(path), "--model", "test_export_any_model"]) == 2
    assert "pkg.module:factory" in capsys.readouterr().err
    assert main(["eval", str(path), "--model", "test_export_any_model:no_such_factory"]) == 2
    assert "no_such_factory" in capsys.readouterr().err
    assert main(["export", str(path), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "pass --model" in capsys.readouterr().err


def test_cli_eval_scores_a_record_file_with_its_factory(tmp_path, capsys, monkeypatch):
    from sgsc.cli import eval as eval_command

    path = tmp_path / "lm.sgsc"
    model = _lm()
    sgsc.save_packed(model, path, data={"name": "names", "seed": 0})
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1]))
    scored = []

    def fake_data(args, header):  # the scoring itself is the trainer's; here: the model it is handed
        class Data:
            source, val, test = "fake", [], []
        return Data()
    monkeypatch.setattr(eval_command, "_data_for", fake_data)
    monkeypatch.setattr(eval_command, "evaluate", lambda m, split: scored.append(m) or {"loss": 0.0, "accuracy": 1.0})
    assert main(["eval", str(path), "--model", "test_export_any_model:factory", "--json"]) == 0
    idx = _tokens(3, seed=4)
    with torch.no_grad():
        assert torch.equal(scored[0](idx), model(idx))
    assert json.loads(capsys.readouterr().out)["file"] == str(path)


# ---- the zoo's files are unchanged ------------------------------------------------------------

CNN_CONFIG = {"in_channels": 1, "image_size": 8, "num_classes": 10, "channels": [6, 8]}
DECODER_CONFIG = {"vocab_size": 12, "block_size": 8, "n_embd": 16, "n_layer": 2, "head_dim": 4, "n_heads": [4, 2],
                  "mlp_hidden": [32, 24]}


def _exact_values(model, seed):
    """Values from integer draws divided by 8 (exact in any float arithmetic), half of them zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                ints = torch.randint(-40, 41, value.shape, generator=gen)
                ints[torch.rand(value.shape, generator=gen) < 0.5] = 0  # sparse groups
                value.copy_(ints.float().abs() / 8 if key.endswith("running_var") else ints.float() / 8)
        for _, layer in quantized_layers(model):
            g = layer.quant_groups
            layer.bits.copy_(torch.randint(0, 9, (g,), generator=gen).float())
            layer.exponent.copy_(torch.randint(-4, 1, (g,), generator=gen).float())
    return model.eval()


def _bf16_decoder():
    model = _exact_values(build_model("char_decoder", DECODER_CONFIG), 3)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not name.endswith(("bits", "exponent")):
            tensor.data = tensor.data.bfloat16()
    return model


# SHA-256 of the files these models gave before version 4 existed (computed with that writer)
ZOO_FILES = {
    "cnn": (lambda: _exact_values(build_model("paper_cnn", CNN_CONFIG), 0), None,
            "772ed7f375ab56edefe288fdd94f700f7d360615eff8bb8d1eee7dc4673a6d8e"),
    "cnn_channel_floor": (lambda: _exact_values(build_model("paper_cnn", {**CNN_CONFIG, "head_groups": "channel",
                                                                          "rounding": "floor"}), 1),
                          {"name": "digits", "seed": 3},
                          "65ee3239acec15a56788e467d282c0ca9d31670e43cfd2dc1ada7553ec6a0f71"),
    "decoder": (lambda: _exact_values(build_model("char_decoder", DECODER_CONFIG), 2), None,
                "24a196330e122492a42945b54ade05f4531760a4fa797fbb8cec5a3c1ba8ec35"),
    "decoder_bf16": (_bf16_decoder, {"name": "names"}, "2d1fa649340c2d28eab6d39a9077b9615aa9e82292b20a3007db1783dabc61eb"),
}


@pytest.mark.parametrize("name", ZOO_FILES)
def test_zoo_files_keep_their_exact_bytes_and_version_3(tmp_path, name):
    build, data, digest = ZOO_FILES[name]
    path = tmp_path / f"{name}.sgsc"
    export.save_packed(build(), path, data=data)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert export.read_header(path)["version"] == 3
    assert export.save_packed is export.save_packed
