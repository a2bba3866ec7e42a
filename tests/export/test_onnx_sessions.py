"""What onnxruntime needs to compute the exported model exactly, and a batch axis the model fixed."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import sgsc  # noqa: E402
from sgsc.export.onnx import EXACT_SESSION_OPTION  # noqa: E402

RELATIVE_BOUND = 1e-5


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10))


def _exported(bits: tuple[int, ...], tmp_path) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """An MLP whose groups take ``bits`` in turn (each group's peak weight lands on its top code, so its width
    is its bits), exported, with its load_packed outputs and the warnings about onnxruntime."""
    torch.manual_seed(sum(bits))
    model = sgsc.quantize_model(_mlp(), init_bits=max(bits)).eval()
    for layer in (model[0], model[2]):
        groups = torch.tensor(bits, dtype=torch.float32).repeat(layer.quant_groups)[:layer.quant_groups]
        peak = layer.weight.detach().abs().amax(dim=1)
        with torch.no_grad():
            layer.bits.copy_(groups)
            layer.exponent.copy_(torch.ceil(torch.log2(peak / (2 ** (groups - 1) - 1).clamp_min(1))))
    x = torch.randn(8, 128)
    sgsc.save_packed(model, tmp_path / "model.sgsc")
    reference = sgsc.load_packed(tmp_path / "model.sgsc", model=_mlp())(x).detach().numpy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sgsc.export_onnx(model, tmp_path / "model.onnx", x)
    return x, reference, [str(w.message) for w in caught if "onnxruntime" in str(w.message)]


def _run(path, x: torch.Tensor, exact: bool) -> np.ndarray:
    options = ort.SessionOptions()
    if exact:
        options.add_session_config_entry(*EXACT_SESSION_OPTION)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.mark.slow
@pytest.mark.parametrize("bits", [(2,), (3,), (4,), (8,), (9,), (16,), (3, 7), (2, 12)])
def test_the_named_session_option_gives_every_width_within_the_bound(bits, tmp_path):
    x, reference, warned = _exported(bits, tmp_path)
    exact = _run(tmp_path / "model.onnx", x, exact=True)
    assert np.abs(exact - reference).max() / np.abs(reference).max() <= RELATIVE_BOUND
    # a layer of one type of <= 8 bits is what onnxruntime fuses: warned about, naming the option
    assert bool(warned) == (len(bits) == 1 and bits[0] <= 8)
    if warned:
        assert EXACT_SESSION_OPTION[0] in warned[0] and "0, 2" in warned[0]
    else:  # what is not warned about is exact in the default session
        default = _run(tmp_path / "model.onnx", x, exact=False)
        assert np.abs(default - reference).max() / np.abs(reference).max() <= RELATIVE_BOUND


class _FixedBatch(nn.Module):
    """Reads its batch size as a Python int, which torch.export specializes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = int(x.shape[0])
        return self.fc(x).reshape(batch, 4) + torch.zeros(batch, 1)


@pytest.mark.slow
def test_a_batch_axis_the_model_fixes_is_refused_or_warned_about(tmp_path):
    model = sgsc.quantize_model(_FixedBatch(), init_bits=12).eval()
    with pytest.raises(ValueError, match="fixes the batch axis at 2, not the example's 1"):
        sgsc.export_onnx(model, tmp_path / "one.onnx", torch.randn(1, 16))
    assert not (tmp_path / "one.onnx").exists()
    with pytest.warns(UserWarning, match="runs only batches of 3"):
        sgsc.export_onnx(model, tmp_path / "three.onnx", torch.randn(3, 16))
    assert onnx.load(tmp_path / "three.onnx").graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
