"""Transposed convolutions: quantized per output channel (dim 1 of their weight), written, loaded and exported."""

import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgsc
from sgsc.nn import QConvTranspose1d, QConvTranspose2d


def _autoencoder() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
        nn.ConvTranspose2d(16, 1, 3, stride=2, padding=1, output_padding=1),
    )


@pytest.mark.parametrize("kind", [nn.ConvTranspose1d, nn.ConvTranspose2d])
def test_a_transposed_conv_is_quantized_per_output_channel(kind):
    torch.manual_seed(0)
    conv = kind(6, 10, 3, stride=2, padding=1, output_padding=1, dilation=1)
    layer = (QConvTranspose2d if kind is nn.ConvTranspose2d else QConvTranspose1d).from_float(conv, init_bits=4)
    assert layer.weight is conv.weight and layer.quant_groups == 10
    with torch.no_grad():
        layer.bits[3] = 0  # output channel 3 pruned: its column of the (in, out, k) weight is zero
    weight = layer.quantized_weight()
    assert not weight[:, 3].any() and weight[:, 2].any()
    rows = sgsc.fake_quantize(conv.weight.transpose(0, 1).reshape(10, -1), layer.bits, layer.exponent)
    assert torch.equal(weight, rows.reshape(10, 6, *conv.kernel_size).transpose(0, 1))
    x = torch.randn(2, 6, *([5] * (conv.weight.dim() - 2)))
    transpose = F.conv_transpose2d if kind is nn.ConvTranspose2d else F.conv_transpose1d
    assert torch.equal(layer(x), transpose(x, weight, conv.bias, 2, 1, 1))


def test_grouped_transposed_convs_stay_float_with_a_reason():
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1))
    with pytest.warns(UserWarning, match="0 .ConvTranspose2d: a transposed convolution is quantized only with groups=1"):
        sgsc.quantize_model(model)


def test_an_autoencoders_file_at_4_bits_is_at_most_20_percent_of_float32_and_reloads_exactly(tmp_path):
    torch.manual_seed(0)
    model = _autoencoder()
    float_bytes = sum(4 * p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every weight is quantized: nothing to warn about
        sgsc.quantize_model(model, init_bits=4)
    model.eval()
    x = torch.randn(3, 1, 16, 16)
    sgsc.save_packed(model, tmp_path / "ae.sgsc")
    assert os.path.getsize(tmp_path / "ae.sgsc") <= 0.20 * float_bytes
    for runtime in ("float", "packed"):
        loaded = sgsc.load_packed(tmp_path / "ae.sgsc", model=_autoencoder(), runtime=runtime)
        assert isinstance(loaded[4], nn.ConvTranspose2d)  # both runtimes hold its dequantized weight
        assert torch.equal(loaded(x), model(x))


@pytest.mark.slow
def test_an_autoencoder_exports_to_onnx_within_the_bound(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(1)
    model = sgsc.quantize_model(_autoencoder(), init_bits=5).eval()
    sgsc.save_packed(model, tmp_path / "ae.sgsc")
    summary = sgsc.export_onnx(tmp_path / "ae.sgsc", tmp_path / "ae.onnx", torch.randn(2, 1, 16, 16),
                               model=_autoencoder())
    assert {layer.name: layer.stored for layer in summary.layers}["4"] == {"INT8": 16}
    session = ort.InferenceSession(str(tmp_path / "ae.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 16, 16)
    reference = model(x).detach().numpy()
    output = session.run(None, {"input": x.numpy()})[0]
    assert np.abs(output - reference).max() / np.abs(reference).max() <= 1e-5


def test_pruning_keeps_a_transposed_convs_zero_bit_channels_and_says_why():
    pytest.importorskip("torch_pruning")
    from sgsc.nn.graph_pruning import prune_zero_bit_units

    torch.manual_seed(0)
    model = sgsc.quantize_model(_autoencoder(), init_bits=4).eval()
    with torch.no_grad():
        model[4].bits[:3] = 0
        model[2].bits[:5] = 0  # the conv feeding it: its channels are the transposed conv's inputs
    x = torch.randn(2, 1, 16, 16)
    expected = model(x)
    report = prune_zero_bit_units(model, x)
    kept = {unit.layer: unit for unit in report.kept}
    assert kept["4"].indices == [0, 1, 2] and "transposed convolution" in kept["4"].reason
    assert kept["2"].indices == [0, 1, 2, 3, 4]  # no cut reaches into a transposed conv
    assert model[4].weight.shape == (32, 16, 3, 3) and torch.equal(model(x), expected)
