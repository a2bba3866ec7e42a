"""Layers beyond Linear/Conv2d: Conv1d, Embedding, nn.MultiheadAttention, and tied weights quantized once.

Each quantized layer must compute exactly what its float twin computes with the weight replaced by
the reference quantizer's output (``sgsc.ops.reference.fake_quantize``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgsc
from sgsc.nn import QConv1d, QEmbedding, QMultiheadAttention, average_bits, model_bits_report, quantize_model
from sgsc.ops import reference

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_weight(layer) -> torch.Tensor:
    grouped = reference.fake_quantize(layer.grouped(layer.weight.detach()), layer.bits.detach(), layer.exponent.detach(),
                                      layer.rounding)
    return layer.ungrouped(grouped)


def _with_reference_weights(model: nn.Module, quantized: nn.Module) -> nn.Module:
    """A float copy of ``model`` whose weights are ``quantized``'s quantized weights."""
    twin = copy.deepcopy(model)
    for name, layer in sgsc.quantized_layers(quantized):
        for module_name, module in twin.named_modules():
            if module_name == name:
                module.weight.data.copy_(_reference_weight(layer))
    return twin


def test_conv1d_is_swapped_and_computes_with_the_quantized_weight():
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 6, 5, stride=2, padding=1, groups=3)
    model = quantize_model(nn.Sequential(conv), init_bits=4)
    layer = model[0]
    assert isinstance(layer, QConv1d) and layer.quant_groups == 6 and layer.weight is conv.weight
    x = torch.randn(2, 3, 17)
    assert torch.equal(layer(x), F.conv1d(x, _reference_weight(layer), conv.bias, 2, 1, 1, 3))
    layer(x).sum().backward()
    assert layer.bits.grad is not None and layer.exponent.grad is not None


def test_embedding_is_quantized_per_token_row():
    torch.manual_seed(0)
    embedding = nn.Embedding(11, 8, padding_idx=0)
    layer = quantize_model(nn.Sequential(embedding), init_bits=3)[0]
    assert isinstance(layer, QEmbedding) and layer.quant_groups == 11 and layer.padding_idx == 0
    idx = torch.tensor([[0, 3, 10], [5, 5, 1]])
    assert torch.equal(layer(idx), F.embedding(idx, _reference_weight(layer), padding_idx=0))
    layer(idx).square().sum().backward()
    assert layer.bits.grad is not None and layer.bits.grad.shape == (11,)


def test_embedding_with_max_norm_stays_float_and_says_why():
    model = nn.Sequential(nn.Embedding(5, 4, max_norm=1.0), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="max_norm"):
        quantize_model(model)
    assert type(model[0]) is nn.Embedding
    assert model_bits_report(model)["float_weights"] == [{"name": "0.weight", "shape": [5, 4]}]


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_is_quantized_per_head(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    float_copy = copy.deepcopy(mha)
    layer = quantize_model(nn.Sequential(mha), init_bits=5)[0]
    assert isinstance(layer, QMultiheadAttention)
    assert layer.in_proj.quant_groups == 12 and layer.out_proj.quant_groups == 4 and layer.out_proj.group_by == "input"
    assert layer.in_proj.weight is mha.in_proj_weight and layer.out_proj.weight is mha.out_proj.weight
    float_copy.in_proj_weight.data.copy_(_reference_weight(layer.in_proj))
    float_copy.out_proj.weight.data.copy_(_reference_weight(layer.out_proj))
    shape = (2, 7, 16) if batch_first else (7, 2, 16)
    q, kv = torch.randn(shape), torch.randn(shape)
    mask = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)
    ours, our_weights = layer(q, kv, kv, attn_mask=mask)
    theirs, their_weights = float_copy(q, kv, kv, attn_mask=mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(our_weights, their_weights, rtol=1e-6, atol=1e-6)
    ours.square().sum().backward()
    assert layer.in_proj.bits.grad.shape == (12,) and layer.out_proj.bits.grad.shape == (4,)


def test_transformer_encoder_runs_the_quantized_weights_in_eval_mode_too():
    """nn.TransformerEncoderLayer's eval fast path reads its float weights directly; it must not bypass the quantizer."""
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(block, num_layers=1, enable_nested_tensor=False)
    twin_source = copy.deepcopy(model)
    quantize_model(model, init_bits=3)
    twin = copy.deepcopy(twin_source)
    ours, theirs = model.layers[0], twin.layers[0]
    theirs.self_attn.in_proj_weight.data.copy_(_reference_weight(ours.self_attn.in_proj))
    theirs.self_attn.out_proj.weight.data.copy_(_reference_weight(ours.self_attn.out_proj))
    for name in ("linear1", "linear2"):
        getattr(theirs, name).weight.data.copy_(_reference_weight(getattr(ours, name)))
    x = torch.randn(3, 5, 16)
    model.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), rtol=1e-5, atol=1e-5)


class _TiedLM(nn.Module):
    def __init__(self, vocab: int = 13, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.head(x + y)


def test_tied_embedding_and_head_share_one_quantizer_and_are_counted_once():
    torch.manual_seed(0)
    model = quantize_model(_TiedLM(), init_bits=6)
    assert model.embed.weight is model.head.weight
    assert model.embed.bits is model.head.bits and model.embed.exponent is model.head.exponent
    report = model_bits_report(model)
    assert [row["name"] for row in report["layers"]] == ["embed", "attn.in_proj", "attn.out_proj"]
    assert report["total_weights"] == 13 * 8 + 3 * 8 * 8 + 8 * 8
    assert report["float_weights"] == []  # every matrix of this model is quantized
    with torch.no_grad():
        model.embed.bits[:4] = 2.0
    per_weight = (4 * 2 + 9 * 6) * 8 + 6 * (3 * 8 * 8 + 8 * 8)
    assert float(average_bits(model).detach()) == pytest.approx(per_weight / report["total_weights"])
    # one optimiser step moves the shared bits once, with gradient from both uses
    idx = torch.randint(0, 13, (2, 5))
    model(idx).sum().backward()
    assert model.embed.bits.grad is not None
    assert sum(1 for p in model.parameters() if p is model.embed.bits) == 1


def test_a_tied_weight_grouped_two_ways_is_refused():
    model = _TiedLM()
    with pytest.raises(ValueError, match="share a weight but group it differently"):
        quantize_model(model, groups={"head": 1})


def test_report_names_the_weights_left_in_float():
    model = nn.Sequential(nn.Linear(4, 8), nn.RNN(8, 8))  # LSTM and GRU are quantized; a plain RNN stays float
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_model(model)
    floats = {row["name"] for row in model_bits_report(model)["float_weights"]}
    assert floats == {"1.weight_ih_l0", "1.weight_hh_l0"}
