"""Model zoo: configs round-trip through JSON, shapes, embeddings, pruned widths, torch.compile."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from sgsc.nn import QConv2d, QLinear, quantized_layers
from sgsc.nn.zoo import (
    CharDecoder,
    CharDecoderConfig,
    PaperCNN,
    PaperCNNConfig,
    available_models,
    build_model,
    model_name,
)

SMALL = {
    "paper_cnn": PaperCNNConfig(in_channels=1, image_size=8, num_classes=10, channels=[4, 6]),
    "char_decoder": CharDecoderConfig(vocab_size=11, block_size=8, n_embd=16, n_layer=2, head_dim=4),
}


def _input(name: str, batch: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if name == "paper_cnn":
        return torch.randn(batch, 1, 8, 8, generator=gen)
    return torch.randint(0, 11, (batch, 8), generator=gen)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_build_model_round_trips_through_json(name):
    torch.manual_seed(0)
    model = build_model(name, dataclasses.asdict(SMALL[name])).eval()
    assert model_name(model) == name
    stored = json.loads(json.dumps({"name": model_name(model), "config": dataclasses.asdict(model.config)}))
    rebuilt = build_model(stored["name"], stored["config"]).eval()
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())
    x = _input(name)
    assert torch.equal(rebuilt(x), model(x))


def test_paper_cnn_shapes_embedding_and_layers():
    model = PaperCNN(SMALL["paper_cnn"])
    x = _input("paper_cnn")
    features = model.embed(x)
    assert features.shape == (3, 6 * 2 * 2)
    assert torch.equal(model(x), model.head(features))
    assert [type(layer) for _, layer in quantized_layers(model)] == [QConv2d, QConv2d, QLinear]
    assert isinstance(model.attribution_layer, nn.ReLU)


def test_char_decoder_shapes_embedding_and_causality():
    model = CharDecoder(SMALL["char_decoder"]).eval()
    x = _input("char_decoder")
    assert model.config.n_heads == [4, 4] and model.config.mlp_hidden == [64, 64]
    assert model.embed(x).shape == (3, 8, 16)
    logits = model(x)
    assert logits.shape == (3, 8, 11)
    changed = x.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 11
    assert torch.equal(model(changed)[:, :5], logits[:, :5])  # position t never sees t+1..
    assert model.blocks[0].attn.q_proj.quant_groups == 4
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_pruned_widths_are_described_by_the_config():
    config = CharDecoderConfig(
        vocab_size=11, block_size=8, n_embd=16, n_layer=2, head_dim=4, n_heads=[0, 2], mlp_hidden=[5, 0]
    )
    model = build_model("char_decoder", json.loads(json.dumps(dataclasses.asdict(config))))
    assert model.blocks[1].attn.q_proj.out_features == 8
    assert model.blocks[0].mlp[0].out_features == 5
    assert model(_input("char_decoder")).shape == (3, 8, 11)
    cnn = build_model("paper_cnn", {"image_size": 8, "channels": [3, 1]})
    assert cnn.head.in_features == 1 * 2 * 2


def test_bad_configs_and_names():
    with pytest.raises(ValueError, match="unknown model name"):
        build_model("resnet", {})
    with pytest.raises(ValueError, match="chanels"):
        build_model("paper_cnn", {"chanels": [4]})
    with pytest.raises(ValueError, match="too small"):
        PaperCNNConfig(image_size=4, channels=[4, 4, 4])
    with pytest.raises(ValueError, match=r"channels\[1\]"):
        PaperCNNConfig(channels=[4, 0])
    with pytest.raises(ValueError, match="n_heads"):
        CharDecoderConfig(n_layer=3, n_heads=[1, 1])
    with pytest.raises(TypeError, match="not a registered"):
        model_name(nn.Linear(2, 2))
    assert available_models() == ["char_decoder", "paper_cnn"]


def test_paper_cnn_compiles_fullgraph_with_gradients():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = PaperCNN(PaperCNNConfig(image_size=8, channels=[4]))
    x = _input("paper_cnn", batch=4)
    model(x).square().sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)


def test_paper_cnn_compiles_with_inductor():
    torch._dynamo.reset()
    model = PaperCNN(PaperCNNConfig(image_size=8, channels=[2])).eval()
    x = _input("paper_cnn", batch=2)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


def test_char_decoder_compiles_fullgraph():
    torch._dynamo.reset()
    config = CharDecoderConfig(vocab_size=11, block_size=8, n_embd=8, n_layer=1, head_dim=4)
    model = CharDecoder(config).eval()
    x = _input("char_decoder", batch=2)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), model(x))
