"""ONNX export with integer weights, checked in onnxruntime against load_packed's float model."""

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import sgsc  # noqa: E402
from sgsc.export import load_packed, save_packed  # noqa: E402
from sgsc.export.onnx import export_onnx, onnx_integer_type, zoo_example_input  # noqa: E402
from sgsc.nn import QLinear, quantized_layers  # noqa: E402
from sgsc.nn.zoo import build_model  # noqa: E402

RELATIVE_BOUND = 1e-5  # max |onnxruntime - load_packed| / max |load_packed|
INTEGER_TYPES = {onnx.TensorProto.INT2, onnx.TensorProto.INT4, onnx.TensorProto.INT8, onnx.TensorProto.INT16,
                 onnx.TensorProto.INT32}


def _compressed(name: str, config: dict, seed: int) -> nn.Module:
    """A zoo model with mixed bit depths: pruned groups, 1-2, 3-4, 5-8 and 9-12 bit groups in most layers."""
    torch.manual_seed(seed)
    model = build_model(name, config).eval()
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            groups = layer.quant_groups
            layer.bits.copy_(torch.tensor([0.0, 2.0, 4.0, 6.0, 11.0])[torch.randint(0, 5, (groups,))])
            if name == "paper_cnn":  # trained-like BN statistics, so a wrong channel would show
                for module in model.modules():
                    if isinstance(module, nn.BatchNorm2d):
                        module.running_mean.uniform_(-0.1, 0.1)
                        module.running_var.uniform_(0.5, 2.0)
    return model


CASES = {
    "cnn": ("paper_cnn", {"channels": [6, 10]}),
    "cnn_channel_head": ("paper_cnn", {"channels": [6, 10], "head_groups": "channel"}),
    "decoder": ("char_decoder", {"n_embd": 32, "n_layer": 2, "head_dim": 8, "block_size": 12}),
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    name, config = CASES[request.param]
    model = _compressed(name, config, seed=len(request.param))
    out = tmp_path_factory.mktemp(request.param)
    save_packed(model, out / "model.sgsc")
    summary = export_onnx(out / "model.sgsc", out / "model.onnx", zoo_example_input(name, config))
    return name, config, model, out, summary


def _inputs(name: str, config: dict, batch: int, time: int | None = None) -> torch.Tensor:
    built = build_model(name, config).config
    if name == "paper_cnn":
        return torch.randn(batch, built.in_channels, built.image_size, built.image_size)
    return torch.randint(0, built.vocab_size, (batch, time or built.block_size))


def _run(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("batch", [1, 33])
def test_onnxruntime_matches_load_packed(exported, batch):
    name, config, _, out, _ = exported
    reference = load_packed(out / "model.sgsc")
    torch.manual_seed(batch)
    x = _inputs(name, config, batch)
    with torch.no_grad():
        expected = reference(x).numpy()
    assert _relative_error(_run(out / "model.onnx", x), expected) < RELATIVE_BOUND


def test_decoder_time_dimension_is_dynamic(exported):
    name, config, _, out, _ = exported
    if name != "char_decoder":
        pytest.skip("only the decoder has a time dimension")
    x = _inputs(name, config, 3, time=5)
    with torch.no_grad():
        expected = load_packed(out / "model.sgsc")(x).numpy()
    assert _relative_error(_run(out / "model.onnx", x), expected) < RELATIVE_BOUND


def test_weights_are_integer_codes_and_pruned_groups_are_gone(exported):
    _, _, model, out, summary = exported
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    initializers = {init.name: init for init in proto.graph.initializer}
    dequantized = [node for node in proto.graph.node if node.op_type == "DequantizeLinear"]
    assert dequantized
    stored_codes = 0
    for node in dequantized:
        codes = initializers[node.input[0]]
        assert codes.data_type in INTEGER_TYPES
        assert len(node.input) == 2  # no zero point: it is 0
        stored_codes += int(np.prod(codes.dims))
    # every nonzero group's codes are stored once, no pruned group's (but a layer with no nonzero
    # group keeps its zero codes so its graph keeps its shape)
    expected = 0
    for _, layer in quantized_layers(model):
        codes = layer.grouped(layer.quantized_weight().detach())
        live = int((codes != 0).any(dim=1).sum())
        expected += (live or layer.quant_groups) * layer.elements_per_group if layer.weight.numel() else 0
    assert stored_codes == expected
    float_names = [init.name for init in proto.graph.initializer if init.data_type == onnx.TensorProto.FLOAT]
    weights = tuple(f"{name}.weight" for name, _ in quantized_layers(model))
    assert [name for name in float_names if name.startswith(weights) and ".scale_" not in name] == []
    assert summary.opset == 25  # some groups are 2-bit: INT2
    assert any(init.data_type == onnx.TensorProto.INT2 for init in initializers.values())


def test_model_and_packed_file_give_the_same_onnx_outputs(exported, tmp_path):
    name, config, model, out, _ = exported
    summary = export_onnx(model, tmp_path / "from_model.onnx", zoo_example_input(name, config), opset=21)
    assert summary.opset == 21
    proto = onnx.load(str(tmp_path / "from_model.onnx"))
    assert not any(init.data_type == onnx.TensorProto.INT2 for init in proto.graph.initializer)  # INT4 at opset 21
    x = _inputs(name, config, 4)
    np.testing.assert_allclose(_run(tmp_path / "from_model.onnx", x), _run(out / "model.onnx", x), rtol=0,
                               atol=RELATIVE_BOUND * float(np.abs(_run(out / "model.onnx", x)).max()))


@pytest.mark.parametrize("width,opset,expected", [
    (1, 25, "INT2"), (2, 25, "INT2"), (2, 21, "INT4"), (4, 21, "INT4"), (5, 25, "INT8"), (8, 21, "INT8"),
    (9, 21, "INT16"), (16, 21, "INT16"), (17, 21, "INT32"), (32, 21, "INT32"),
])
def test_onnx_integer_type(width, opset, expected):
    assert onnx_integer_type(width, opset) == expected


def test_uncompressed_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no quantized layers"):
        export_onnx(nn.Sequential(nn.Linear(4, 2)), tmp_path / "m.onnx", torch.zeros(1, 4))
    assert list(tmp_path.iterdir()) == []


def test_group_wider_than_32_bits_is_refused(tmp_path):
    layer = QLinear(4, 2, init_bits=32)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.exponent.fill_(-40.0)  # every code clamps to 2^31, 33 bits
    with pytest.raises(ValueError, match="group 0 needs 33 bits"):
        export_onnx(nn.Sequential(layer), tmp_path / "m.onnx", torch.zeros(1, 4))
    assert list(tmp_path.iterdir()) == []


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = QLinear(4, 2)

    def forward(self, x):
        y = self.layer(x)
        return y if bool(y.sum() > 0) else -y  # a branch on values: torch.export cannot capture it


def test_inexpressible_model_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(RuntimeError, match="torch.onnx cannot express _DataDependent"):
        export_onnx(_DataDependent(), tmp_path / "m.onnx", torch.ones(2, 4))
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_a_packed_file(exported, tmp_path, capsys):
    from sgsc.cli import main

    name, config, _, out, _ = exported
    if name != "paper_cnn" or "head_groups" in config:
        pytest.skip("one CLI run is enough")
    assert main(["export", str(out / "model.sgsc"), "--onnx", str(tmp_path / "cli.onnx")]) == 0
    assert "ONNX opset" in capsys.readouterr().out
    x = _inputs(name, config, 2)
    with torch.no_grad():
        expected = load_packed(out / "model.sgsc")(x).numpy()
    assert _relative_error(_run(tmp_path / "cli.onnx", x), expected) < RELATIVE_BOUND


# ---- models outside the zoo ----------------------------------------------------------------------


def _float32_session(path):
    """onnxruntime with its 4-bit MatMul fusion computing in float32: the default quantizes activations to int8."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", ["TinyResNet", "TinyMobileNet", "TinyLM"])
def test_models_outside_the_zoo_export_with_integer_weights(name, tmp_path):
    """Conv1d/Conv2d/Linear/Embedding/MultiheadAttention layers of a user's model, some groups pruned."""
    import own_models

    torch.manual_seed(0)
    model = sgsc.quantize_model(getattr(own_models, name)(), init_bits=5).eval()
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            layer.bits[::3] = 0.0  # pruned groups: stored as nothing
    example = torch.randn(2, 1, 28, 28) if name != "TinyLM" else torch.randint(0, 10, (2, 8))
    path = tmp_path / f"{name}.onnx"
    summary = export_onnx(model, path, example)
    assert all(layer.dropped for layer in summary.layers)
    session = _float32_session(path)
    for batch in (1, 5):
        x = example[:1].expand(batch, *example.shape[1:]).contiguous()
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
