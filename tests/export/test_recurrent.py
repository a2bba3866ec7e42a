"""nn.LSTM and nn.GRU: one bit depth per gate row, written, loaded on both runtimes and exported."""

import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import sgsc
from sgsc.nn.recurrent import QGRU, QLSTM


class CharRNN(nn.Module):
    def __init__(self, kind: type[nn.RNNBase] = nn.LSTM, bidirectional: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(64, 32)
        self.rnn = kind(32, 128, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(128 * (1 + bidirectional), 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embedding(ids))[0])


CASES = [(nn.LSTM, False), (nn.GRU, False), (nn.LSTM, True), (nn.GRU, True)]


@pytest.mark.parametrize("kind, bidirectional", CASES)
def test_a_recurrent_layer_is_quantized_per_gate_row_and_computes_what_it_did(kind, bidirectional):
    torch.manual_seed(0)
    model = CharRNN(kind, bidirectional).eval()
    rnn, ids = model.rnn, torch.randint(0, 64, (3, 10))
    expected = model(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left float
        sgsc.quantize_model(model, init_bits=16)
    assert isinstance(model.rnn, QLSTM if kind is nn.LSTM else QGRU)
    assert model.rnn.hh_l1.weight is rnn.weight_hh_l1 and model.rnn.ih_l0.bias is rnn.bias_ih_l0
    assert model.rnn.hh_l0.quant_groups == (4 if kind is nn.LSTM else 3) * 128  # one per gate of each unit
    assert torch.allclose(model(ids), expected, atol=1e-4)  # 16 bits: the float model's outputs
    hidden = torch.randn(1, 128) if kind is nn.GRU else (torch.randn(1, 128), torch.randn(1, 128))
    single = kind(32, 128)
    layer = (QLSTM if kind is nn.LSTM else QGRU).from_float(single, init_bits=16)
    x = torch.randn(5, 32)  # unbatched input and state, as nn.LSTM/nn.GRU take them
    (out, state), (reference, expected_state) = layer(x, hidden), single(x, hidden)
    assert out.shape == reference.shape and torch.allclose(out, reference, atol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(state, expected_state))


@pytest.mark.parametrize("kind, bidirectional", CASES[:2])
def test_a_char_rnns_file_at_4_bits_is_at_most_20_percent_of_float32_and_reloads_exactly(kind, bidirectional, tmp_path):
    torch.manual_seed(0)
    model = CharRNN(kind, bidirectional)
    float_bytes = sum(4 * p.numel() for p in model.parameters())
    sgsc.quantize_model(model, init_bits=4).eval()
    ids = torch.randint(0, 64, (3, 10))
    sgsc.save_packed(model, tmp_path / "rnn.sgsc")
    assert os.path.getsize(tmp_path / "rnn.sgsc") <= 0.20 * float_bytes
    loaded = sgsc.load_packed(tmp_path / "rnn.sgsc", model=CharRNN(kind, bidirectional))
    assert torch.equal(loaded(ids), model(ids))
    # the packed runtime's recurrent matrices are dequantized exactly; its small head multiplies from the
    # stream in its own order, within fp32 rounding
    packed = sgsc.load_packed(tmp_path / "rnn.sgsc", model=CharRNN(kind, bidirectional), runtime="packed")
    torch.testing.assert_close(packed(ids), model(ids), rtol=1e-5, atol=1e-6)


def test_lstm_with_projections_stays_float_and_is_named():
    model = nn.Sequential(nn.LSTM(8, 16, proj_size=4), nn.Identity())
    with pytest.warns(UserWarning, match=r"0 \(LSTM: only exact nn.LSTM \(without proj_size\) and nn.GRU"):
        sgsc.quantize_model(model)


@pytest.mark.slow
@pytest.mark.parametrize("kind, bidirectional", CASES[2:])
def test_a_char_rnn_exports_to_onnx_within_the_bound(kind, bidirectional, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from sgsc.export.onnx import EXACT_SESSION_OPTION

    torch.manual_seed(2)
    model = sgsc.quantize_model(CharRNN(kind, bidirectional), init_bits=5).eval()
    sgsc.save_packed(model, tmp_path / "rnn.sgsc")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sgsc.export_onnx(tmp_path / "rnn.sgsc", tmp_path / "rnn.onnx", torch.zeros(2, 6, dtype=torch.int64),
                         model=CharRNN(kind, bidirectional))
    options = ort.SessionOptions()
    if any(EXACT_SESSION_OPTION[0] in str(w.message) for w in caught):
        options.add_session_config_entry(*EXACT_SESSION_OPTION)
    session = ort.InferenceSession(str(tmp_path / "rnn.onnx"), options, providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 64, (3, 6))
    reference = model(ids).detach().numpy()
    output = session.run(None, {"input": ids.numpy()})[0]
    assert np.abs(output - reference).max() / np.abs(reference).max() <= 1e-5


def test_pruning_keeps_a_recurrent_layers_zero_bit_gate_rows_and_says_why():
    pytest.importorskip("torch_pruning")
    from sgsc.nn.graph_pruning import prune_zero_bit_units

    torch.manual_seed(0)
    model = sgsc.quantize_model(CharRNN(), init_bits=4).eval()
    with torch.no_grad():
        model.rnn.hh_l0.bits[:10] = 0
    ids = torch.randint(0, 64, (2, 7))
    expected = model(ids)
    report = prune_zero_bit_units(model, ids)
    kept = {unit.layer: unit for unit in report.kept}
    assert kept["rnn.hh_l0"].indices == list(range(10)) and "recurrent" in kept["rnn.hh_l0"].reason
    assert report.parameters_removed == 0 and torch.equal(model(ids), expected)
