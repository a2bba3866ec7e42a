"""`sgsc export FILE.sgsc --onnx OUT --model pkg.module:factory --input-shape ...` for a model outside the zoo.

The packed file (format version 4) records its own architecture; ``--model`` rebuilds it and
``--input-shape``/``--input-dtype`` give the example input the ONNX export traces. onnxruntime must
compute what ``load_packed(path, model=factory())`` computes, on another batch size than the traced
one, with every quantized weight stored as integer codes.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import sgsc  # noqa: E402
from sgsc import export  # noqa: E402
from sgsc.cli import main  # noqa: E402
from sgsc.export.onnx import export_onnx  # noqa: E402
from sgsc.nn import quantized_layers  # noqa: E402
from sgsc.nn.zoo import build_model  # noqa: E402

TESTS = Path(__file__).parents[1]  # where own_models.py lives
sys.path.insert(0, str(TESTS))
from own_models import TinyLM, TinyResNet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

RELATIVE_BOUND = 1e-5  # export_onnx's promise: max |onnxruntime - load_packed| / max |load_packed|
INTEGER_TYPES = {onnx.TensorProto.INT2, onnx.TensorProto.INT4, onnx.TensorProto.INT8, onnx.TensorProto.INT16,
                 onnx.TensorProto.INT32}
BITS = torch.tensor([0.0, 2.0, 4.0, 6.0, 11.0])  # pruned, INT2, INT4, INT8 and INT16 groups


def _varied_bits(model: nn.Module, seed: int) -> nn.Module:
    """Every quantized layer's groups drawn from :data:`BITS`, BatchNorm statistics like a trained model's
    (so a channel put in the wrong place would show)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            layer.bits.copy_(BITS[torch.randint(0, len(BITS), (layer.quant_groups,), generator=generator)])
            layer.bits[0] = 6.0  # no layer entirely pruned
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
    return model.eval()


def _resnet_file(tmp_path: Path, prune: bool = False) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = _varied_bits(sgsc.quantize_model(TinyResNet()), seed=1)
    if prune:
        from sgsc.nn.graph_pruning import prune_zero_bit_units  # needs torch-pruning (the [train] extra)

        before = sum(p.numel() for p in model.parameters())
        prune_zero_bit_units(model, torch.randn(2, 1, 8, 8))
        assert sum(p.numel() for p in model.parameters()) < before, "the test must prune something"
    path = tmp_path / "resnet.sgsc"
    sgsc.save_packed(model, path)
    assert export.read_header(path)["version"] == 4 and "model" not in export.read_header(path)
    return path, model


def _lm_file(tmp_path: Path) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = _varied_bits(sgsc.quantize_model(TinyLM()), seed=2)
    path = tmp_path / "lm.sgsc"
    sgsc.save_packed(model, path)
    assert export.read_header(path)["architecture"]["tied"]["head.weight"] == "tok.weight"
    return path, model


def _session(path: Path):
    """onnxruntime with its 4-bit MatMul fusion computing in float32: the default quantizes activations to int8."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _matches_load_packed(onnx_path: Path, packed: Path, factory, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = sgsc.load_packed(packed, model=factory())(x).numpy()
    got = _session(onnx_path).run(None, {"input": x.numpy()})[0]
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= RELATIVE_BOUND * np.abs(expected).max()


def _assert_integer_weights(onnx_path: Path, model: nn.Module) -> None:
    """Every quantized weight is stored as integer codes, each nonzero group's once per layer, pruned ones not."""
    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    initializers = {init.name: init for init in proto.graph.initializer}
    dequantized = [node for node in proto.graph.node if node.op_type == "DequantizeLinear"]
    assert dequantized
    stored = 0
    for node in dequantized:
        codes = initializers[node.input[0]]
        assert codes.data_type in INTEGER_TYPES, codes.name
        stored += int(np.prod(codes.dims))
    expected = 0
    for _, layer in quantized_layers(model):  # a tied head counts again: MatMul reads its own (in, out) copy
        codes = layer.grouped(layer.quantized_weight().detach())
        expected += int((codes != 0).any(dim=1).sum()) * layer.elements_per_group
    assert stored == expected
    weights = tuple(f"{name}.weight" for name, _ in quantized_layers(model))
    floats = [name for name, init in initializers.items() if init.data_type == onnx.TensorProto.FLOAT]
    assert [name for name in floats if name.startswith(weights) and ".scale_" not in name] == []
    assert any(init.data_type == onnx.TensorProto.INT2 for init in initializers.values())


@pytest.mark.parametrize("prune", [False, True], ids=["masked", "pruned"])
def test_cli_exports_an_own_cnn_file_that_onnxruntime_runs_like_load_packed(tmp_path, capsys, prune):
    if prune:
        pytest.importorskip("torch_pruning")
    packed, model = _resnet_file(tmp_path, prune)
    out = tmp_path / "resnet.onnx"
    assert main(["export", str(packed), "--onnx", str(out), "--model", "own_models:TinyResNet",
                 "--input-shape", "1,1,8,8"]) == 0
    printed = capsys.readouterr().out
    assert "layer2.shortcut.0" in printed and f"{out}: {out.stat().st_size} bytes, ONNX opset 25" in printed
    _matches_load_packed(out, packed, TinyResNet, torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3)))
    _assert_integer_weights(out, model)


def test_cli_exports_an_own_token_model_with_int64_input(tmp_path, capsys):
    packed, model = _lm_file(tmp_path)
    out = tmp_path / "lm.onnx"
    assert main(["export", str(packed), "--onnx", str(out), "--model", "own_models:TinyLM",
                 "--input-shape", "1,12", "--input-dtype", "int64"]) == 0
    assert "block.self_attn.in_proj" in capsys.readouterr().out
    graph_input = onnx.load(str(out)).graph.input[0].type.tensor_type
    assert graph_input.elem_type == onnx.TensorProto.INT64
    tokens = torch.randint(0, 11, (3, 12), generator=torch.Generator().manual_seed(4))
    _matches_load_packed(out, packed, TinyLM, tokens)
    _assert_integer_weights(out, model)


@pytest.mark.parametrize("flags,named", [
    (["--model", "own_models:TinyResNet"], ["--input-shape"]),
    (["--input-shape", "1,1,8,8"], ["--model"]),
    ([], ["--model", "--input-shape"]),
    (["--model", "own_models:TinyResNet", "--input-dtype", "int64"], ["--input-shape"]),
])
def test_a_missing_option_is_named_and_nothing_is_written(tmp_path, capsys, flags, named):
    packed, _ = _resnet_file(tmp_path)
    out = tmp_path / "m.onnx"
    assert main(["export", str(packed), "--onnx", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert "the file records a model outside the zoo: pass" in err
    assert all(option in err for option in named), err
    assert not out.exists()


@pytest.mark.parametrize("shape", ["1,x,8,8", "1,0,8,8", "1,-1", "1.5,8", "", "1,,8", "1_0,8", "²,8"])
def test_a_bad_shape_is_refused_with_the_option_named(tmp_path, capsys, shape):
    packed, _ = _resnet_file(tmp_path)
    out = tmp_path / "m.onnx"
    assert main(["export", str(packed), "--onnx", str(out), "--model", "own_models:TinyResNet",
                 "--input-shape", shape]) == 2
    err = capsys.readouterr().err
    assert f"--input-shape {shape!r}: expected positive integers separated by commas" in err
    assert not out.exists()


@pytest.mark.parametrize("factory,flags", [
    ("TinyResNet", ["--input-shape", "1,3,8,8"]),  # three channels for a one-channel stem
    ("TinyLM", ["--input-shape", "1,12"]),  # float32 token ids
])
def test_an_input_the_model_cannot_run_on_names_the_options(tmp_path, capsys, factory, flags):
    packed, _ = _resnet_file(tmp_path) if factory == "TinyResNet" else _lm_file(tmp_path)
    out = tmp_path / "m.onnx"
    assert main(["export", str(packed), "--onnx", str(out), "--model", f"own_models:{factory}", *flags]) == 2
    err = capsys.readouterr().err
    assert "the model does not run on a float32 input of shape" in err and "--input-shape and --input-dtype" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_the_wrong_architecture_is_refused_before_anything_is_written(tmp_path, capsys):
    packed, _ = _resnet_file(tmp_path)
    out = tmp_path / "m.onnx"
    assert main(["export", str(packed), "--onnx", str(out), "--model", "own_models:TinyLM",
                 "--input-shape", "1,1,8,8"]) == 2
    assert "does not match the file" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flags", [["--input-shape", "1,1,8,8"], ["--input-dtype", "float32"],
                                   ["--model", "own_models:TinyResNet"]])
def test_a_zoo_file_refuses_the_options_of_an_own_model(tmp_path, capsys, flags):
    packed = tmp_path / "cnn.sgsc"
    sgsc.save_packed(build_model("paper_cnn", {"image_size": 8, "channels": [4, 4]}), packed)
    out = tmp_path / "m.onnx"
    assert main(["export", str(packed), "--onnx", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert f"names zoo model 'paper_cnn', which knows its architecture and input: {flags[0]} is for a packed file " \
           "of a model outside the zoo" in err
    assert not out.exists()


def test_a_checkpoint_refuses_them_before_it_is_read_or_anything_written(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"not read: the flags are refused first")
    outputs = [tmp_path / "m.sgsc", tmp_path / "m.onnx"]
    assert main(["export", str(checkpoint), "-o", str(outputs[0]), "--onnx", str(outputs[1]),
                 "--input-shape", "1,1,8,8", "--input-dtype", "int64"]) == 2
    assert "checkpoint's model is rebuilt from the zoo, which knows its architecture and input: --input-shape and " \
           "--input-dtype are for a packed file of a model outside the zoo" in capsys.readouterr().err
    assert not any(path.exists() for path in outputs)


def test_an_unknown_input_dtype_is_an_argparse_error(tmp_path, capsys):
    packed, _ = _resnet_file(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(packed), "--onnx", str(tmp_path / "m.onnx"), "--model", "own_models:TinyResNet",
              "--input-shape", "1,1,8,8", "--input-dtype", "float16"])
    assert exit_info.value.code == 2
    assert "--input-dtype: invalid choice: 'float16'" in capsys.readouterr().err


def test_export_onnx_asks_for_the_architecture_of_an_own_model_file(tmp_path):
    packed, model = _resnet_file(tmp_path)
    example = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="pass model="):
        export_onnx(packed, tmp_path / "m.onnx", example)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        export_onnx(packed, tmp_path / "m.onnx", example, model=TinyResNet)
    with pytest.raises(ValueError, match="model= is for a packed file's path"):
        export_onnx(model, tmp_path / "m.onnx", example, model=TinyResNet())
    zoo = tmp_path / "cnn.sgsc"
    sgsc.save_packed(build_model("paper_cnn", {"image_size": 8, "channels": [4, 4]}), zoo)
    with pytest.raises(ValueError, match="names zoo model 'paper_cnn'.*model= is for files of other"):
        export_onnx(zoo, tmp_path / "m.onnx", example, model=TinyResNet())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.sgsc", "resnet.sgsc"]
