"""Hostile and broken inputs, round two (issue 30): the packed file and its command line.

Every crafted file is built here, most from a model through the writer's own ``build_packed_state``
(which runs none of the reader's checks) with one part changed and every checksum made right again, so
that only the content is wrong. Each is refused with one ``PackedFileError`` naming the problem by every
reader alike, or handled correctly by both runtimes.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_save
from torch import nn

import sgsc
from sgsc import export
from sgsc.cli import main
from sgsc.export import codec
from sgsc.export.writer import build_packed_state
from sgsc.nn.packed import PackedEmbedding, PackedLinear, PackedStreamLinear

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE = Path(__file__).stem  # `--model MODULE:mlp` imports the factories below


def mlp() -> nn.Module:
    """A model on the packed runtime holds no Parameters: its layers keep their codes as buffers."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def wide_linear() -> nn.Module:
    return nn.Sequential(nn.Linear(300, 256))  # more codes than the stream form takes: the fused kernel's tiles


def embedding() -> nn.Module:
    return nn.Sequential(nn.Embedding(8, 4))


def _crc(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _write(path: Path, tensors: dict[str, torch.Tensor], header: dict) -> Path:
    """A file of ``tensors`` and ``header`` whose every checksum is right."""
    header["crc32"] = {key: _crc(value) for key, value in tensors.items()}
    text = json.dumps(header, sort_keys=True, separators=(",", ":"))
    crc = torch.tensor([zlib.crc32(text.encode())], dtype=torch.int64)
    path.write_bytes(safetensors_save({**tensors, export.HEADER_CRC_TENSOR: crc}, metadata={"sgsc": text}))
    return path


def _state(factory) -> tuple[dict[str, torch.Tensor], dict]:
    torch.manual_seed(0)
    return build_packed_state(sgsc.quantize_model(factory()).eval())


def _with_first_layer(tensors: dict, header: dict, codes: torch.Tensor, scales: torch.Tensor) -> dict:
    """``tensors`` with the first quantized layer's codes ``(G, L)`` and scales replaced (its stream re-encoded)."""
    groups = header["architecture"]["layers"][0][2]
    old_end = codec.stream_length(tensors["codes"], 0, tensors["widths"][:groups], codes.shape[1])
    stream, width_bytes = codec.encode(codes, codec.minimal_widths(codes))
    return {**tensors, "codes": torch.cat([stream, tensors["codes"][old_end:]]),
            "widths": torch.cat([width_bytes, tensors["widths"][groups:]]),
            "scales": torch.cat([scales, tensors["scales"][groups:]])}


def _refused_alike(path: Path, factory, match: str, **kwargs) -> str:
    """Both runtimes and inspection refuse ``path`` with one and the same PackedFileError; returns its message."""
    messages = []
    for runtime in ("float", "packed"):
        with pytest.raises(export.PackedFileError, match=match) as refused:
            export.load_packed(path, runtime=runtime, model=factory(), **kwargs)
        messages.append(str(refused.value))
    with pytest.raises(export.PackedFileError) as inspected:
        export.summarize(path, **kwargs)
    assert messages == [str(inspected.value)] * 2
    return messages[0]


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("sgsc: ") and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    return captured.err


# ---- 1. one validator: both runtimes accept exactly the same files ------------------------------


@pytest.mark.parametrize("factory,packed_type", [(mlp, PackedStreamLinear), (wide_linear, PackedLinear),
                                                 (embedding, PackedEmbedding)])
def test_a_code_of_minus_2_31_that_overflows_is_refused_by_both_runtimes(tmp_path, factory, packed_type):
    tensors, header = _state(factory)
    name, _, groups, *_ = header["architecture"]["layers"][0]
    group_len = math.prod(header["architecture"]["state"][0][1]) // groups
    codes = torch.zeros(groups, group_len, dtype=torch.int32)
    codes[0, 0] = -(2**31)  # int32's abs() of it is itself, negative: it passed the packed runtime's check
    scales = torch.ones(groups)
    scales[0] = 1e30  # -2^31 * 1e30 is -2.1e39: -inf in float32

    path = _write(tmp_path / "overflow.sgsc", _with_first_layer(tensors, header, codes, scales), header)
    message = _refused_alike(path, factory, f"layer '{name}': a weight overflows to infinity in float32")
    assert "group 0: a code of magnitude 2147483648" in message

    scales[0] = 1e29  # -2.1e38 is a float32: both runtimes load it, with the same weights
    path = _write(tmp_path / "finite.sgsc", _with_first_layer(tensors, header, codes, scales), header)
    on_floats, on_codes = (export.load_packed(path, runtime=rt, model=factory()) for rt in ("float", "packed"))
    layer_on_codes, layer_on_floats = on_codes.get_submodule(name), on_floats.get_submodule(name)
    assert isinstance(layer_on_codes, packed_type)
    assert torch.equal(layer_on_codes.weight, layer_on_floats.weight)
    assert layer_on_floats.weight.min() == torch.tensor(-(2.0**31)) * torch.tensor(1e29)


def test_eval_on_the_packed_runtime_refuses_an_overflowing_file(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    tensors, header = _state(mlp)
    codes = torch.zeros(16, 64, dtype=torch.int32)  # layer '1': 16 groups (output rows) of 64 codes
    codes[3, 5] = -(2**31)
    scales = torch.ones(16)
    scales[3] = 1e30
    path = _write(tmp_path / "overflow.sgsc", _with_first_layer(tensors, header, codes, scales), header)
    err = _one_line_error(capsys, ["eval", str(path), "--runtime", "packed", "--model", f"{MODULE}:mlp",
                                   "--data", "digits"])
    assert "layer '1': a weight overflows to infinity in float32 (group 3" in err


# ---- 8. dtypes the two runtimes would treat differently ------------------------------------------


def test_a_bias_of_another_dtype_than_its_weight_is_refused_everywhere(tmp_path):
    model = sgsc.quantize_model(mlp()).eval()
    model[1].bias.data = model[1].bias.data.double()  # F.linear refuses it; the packed runtime cast it to float32
    with pytest.raises(ValueError, match="cannot export this model: .*layer '1': its bias is float64 and its weight "
                                         "float32; a layer computes in one dtype"):
        sgsc.save_packed(model, tmp_path / "refused.sgsc")
    assert not (tmp_path / "refused.sgsc").exists()
    path = _write(tmp_path / "m.sgsc", *build_packed_state(model))
    _refused_alike(path, mlp, "layer '1': its bias is float64 and its weight float32")


def test_a_float16_layer_loads_on_the_float_runtime_and_is_refused_by_name_on_the_packed_one(tmp_path):
    model = sgsc.quantize_model(mlp()).eval()
    model[3].weight.data, model[3].bias.data = model[3].weight.data.half(), model[3].bias.data.half()
    path = tmp_path / "m.sgsc"
    sgsc.save_packed(model, path)
    loaded = export.load_packed(path, model=mlp())
    assert (loaded[3].weight.dtype, loaded[3].bias.dtype) == (torch.float16, torch.float16)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(loaded[3](loaded[:3](x).half()), model[3](model[:3](x).half()))
    with pytest.raises(ValueError, match="layer '3': its weight is float16; the packed runtime computes in float32 "
                                         "only: load the file with runtime='float'"):
        export.load_packed(path, runtime="packed", model=mlp())


# ---- 4. the header first, every bound before the data is read -----------------------------------


class _CountedReads:
    """A file whose reads are counted, and refused past ``limit`` bytes so a regression fails fast."""

    def __init__(self, handle, limit: int, counts: list[int]):
        self.handle, self.limit, self.counts = handle, limit, counts

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size if size >= 0 else self.limit + 1)
        self.counts.append(len(data))
        assert sum(self.counts) <= self.limit, f"read {sum(self.counts):,} bytes of the file"
        return data

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


GIB3 = 3 * 2**30


def _over_3_gib(sgsc_header: str, crc: int) -> bytes:
    """The start of a 3 GiB file whose safetensors header lays one uint8 tensor over all of its data."""
    codes = GIB3
    for _ in range(2):  # the index's length depends on the tensor's, which fills what the index leaves
        index = json.dumps({"__metadata__": {"sgsc": sgsc_header},
                            export.HEADER_CRC_TENSOR: {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
                            "codes": {"dtype": "U8", "shape": [codes], "data_offsets": [8, 8 + codes]}})
        codes = GIB3 - 8 - len(index) - 8
    return len(index).to_bytes(8, "little") + index.encode() + crc.to_bytes(8, "little", signed=True)


def _bad_headers(tmp_path: Path) -> dict[str, Path]:
    """Files of 3 GiB (sparse: no disk) whose first bytes say they are not valid packed files."""
    valid = tmp_path / "valid.sgsc"
    sgsc.save_packed(sgsc.quantize_model(mlp()), valid)
    data = valid.read_bytes()
    text = json.dumps(export.read_header(valid), sort_keys=True, separators=(",", ":"))
    version_99 = text.replace('"version":4', '"version":99')
    files = {
        "a header whose checksum fails": _over_3_gib(text, zlib.crc32(text.encode()) ^ 1),
        "a header of an unknown version": _over_3_gib(version_99, zlib.crc32(version_99.encode())),
        "a valid header, over data it does not describe": data,
        "not JSON": (16).to_bytes(8, "little") + b"\x89PNG\r\n\x1a\n" + bytes(8),
        "a header longer than safetensors reads": (2**31).to_bytes(8, "little"),
        "a header claiming more bytes than the index holds": (int.from_bytes(data[:8], "little") + 64).to_bytes(
            8, "little") + data[8:],
    }
    paths = {}
    for i, (what, head) in enumerate(files.items()):
        paths[what] = tmp_path / f"bad{i}.sgsc"
        with open(paths[what], "wb") as handle:
            handle.write(head)
            handle.truncate(GIB3)
    return paths


def test_a_3_gib_file_with_a_bad_header_is_refused_from_its_header(tmp_path, monkeypatch, capsys):
    import tracemalloc

    files = _bad_headers(tmp_path)
    counts: list[int] = []
    reasons: set[str] = set()
    opened = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: _CountedReads(opened(self, *a, **k), 2**20, counts))
    for what, path in files.items():
        for read in (lambda: export.load_packed(path, model=mlp()), lambda: export.summarize(path),
                     lambda: export.read_header(path)):
            counts.clear()
            tracemalloc.start()
            try:
                with pytest.raises(export.PackedFileError, match=f"^{re.escape(str(path))}: ") as refused:
                    read()
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert 0 < sum(counts) <= 2**20, what  # the file was opened and its header read, nothing more
            assert peak < 16 * 2**20, what
            reasons.add(str(refused.value))
        counts.clear()
        assert main(["inspect", str(path)]) == 2 and capsys.readouterr().err.count("\n") == 1
        assert 0 < sum(counts) <= 2**20
    for reason in ("the sgsc header fails its CRC-32 check", "format version 99 is not supported",
                   "the tensors take 1,", "more than safetensors reads", "not UTF-8 text"):
        assert any(reason in refusal for refusal in reasons), reason


# ---- 5. a model with no Parameters ----------------------------------------------------------------


def test_eval_scores_a_model_left_with_no_parameters_on_the_packed_runtime(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    path = tmp_path / "mlp.sgsc"
    sgsc.save_packed(sgsc.quantize_model(mlp()).eval(), path, data={"name": "digits", "seed": 0})
    assert list(export.load_packed(path, runtime="packed", model=mlp()).parameters()) == []
    assert main(["eval", str(path), "--runtime", "packed", "--model", f"{MODULE}:mlp", "--json"]) == 0
    packed = json.loads(capsys.readouterr().out)
    assert main(["eval", str(path), "--model", f"{MODULE}:mlp", "--json"]) == 0
    floats = json.loads(capsys.readouterr().out)
    assert math.isfinite(packed["test"]["loss"])
    assert packed["test"]["loss"] == pytest.approx(floats["test"]["loss"], rel=1e-5)


# ---- 6. names from a file never reach the terminal raw ------------------------------------------

ERASING_NAME = "\x1b[2K\r\x1b[1Aall checks passed\x07"


def _named(name: str) -> nn.Module:
    model = nn.Sequential()
    model.add_module(name, nn.Linear(4, 3))
    return model


def test_inspect_prints_layer_names_escaped(tmp_path, capsys):
    path = tmp_path / "m.sgsc"
    sgsc.save_packed(sgsc.quantize_model(_named(ERASING_NAME)), path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\\x1b[2K\\r\\x1b[1Aall checks passed\\x07" in out
    assert not any(character in out for character in "\x1b\r\x07")


def test_a_long_name_is_shortened_in_messages_and_in_the_table(tmp_path, capsys):
    name = "x" * 100_000
    path = tmp_path / "m.sgsc"
    sgsc.save_packed(sgsc.quantize_model(_named(name)), path)
    assert main(["inspect", str(path)]) == 0
    assert max(map(len, capsys.readouterr().out.splitlines())) < 400

    with pytest.raises(export.ArchitectureMismatch) as mismatch:
        export.load_packed(path, model=_named("y"))
    assert "'xxxxx" in str(mismatch.value) and "(100,002 characters)" in str(mismatch.value)
    assert len(str(mismatch.value)) < 600

    tensors, header = build_packed_state(sgsc.quantize_model(_named(name)))
    tensors["scales"][0] = 3e38  # the layer's weights overflow: an error naming it
    _write(path, tensors, header)
    err = _one_line_error(capsys, ["inspect", str(path)])
    assert "a weight overflows" in err and len(err) < 400


def test_escape_sequences_in_a_record_stay_escaped_in_errors(tmp_path, capsys):
    tensors, header = _state(mlp)
    header["architecture"]["layers"][0][0] = ERASING_NAME + "y" * 5000  # a layer with no state entries
    path = _write(tmp_path / "m.sgsc", tensors, header)
    err = _one_line_error(capsys, ["inspect", str(path)])
    assert "has no state entries" in err and "\\x1b[2K" in err
    assert not any(character in err for character in "\x1b\r\x07") and len(err) < 1000


# ---- 7. loading is linear in the number of layers -----------------------------------------------


def _deep(layers: int) -> nn.Module:
    return nn.Sequential(*[module for _ in range(layers) for module in (nn.Linear(4, 4), nn.ReLU())])


@pytest.mark.parametrize("runtime", ["float", "packed"])
def test_loading_walks_the_model_a_fixed_number_of_times(tmp_path, monkeypatch, runtime):
    files = {layers: tmp_path / f"deep{layers}.sgsc" for layers in (10, 40)}
    for layers, path in files.items():
        sgsc.save_packed(sgsc.quantize_model(_deep(layers)), path)
    walks, named_modules = {}, nn.Module.named_modules

    def counted(self, *args, **kwargs):
        if self is architecture:  # a walk of the whole model, not the recursive call on a submodule
            walks[layers] = walks.get(layers, 0) + 1
        return named_modules(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "named_modules", counted)
    for layers, path in files.items():
        architecture = _deep(layers)
        loaded = export.load_packed(path, runtime=runtime, model=architecture)
        assert loaded is architecture and len(loaded) == 2 * layers
    assert walks[10] == walks[40] > 0  # four times the layers, the same walks: none per layer


def _pruned_layers_file(path: Path, layers: int) -> Path:
    """A record of ``layers`` linear layers of one pruned group each: about 130 bytes a layer."""
    model = sgsc.quantize_model(nn.Sequential(nn.Linear(1, 1, bias=False)))
    with torch.no_grad():
        model[0].weight.zero_()
    tensors, header = build_packed_state(model)
    (layer,), state = header["architecture"]["layers"], header["architecture"]["state"]
    header["architecture"]["layers"] = [[str(i), *layer[1:]] for i in range(layers)]
    header["architecture"]["state"] = [[f"{i}.{key[2:]}", *rest] for i in range(layers) for key, *rest in state]
    tensors.update(widths=tensors["widths"].repeat(layers), scales=tensors["scales"].repeat(layers))
    return _write(path, tensors, header)


def test_a_record_of_more_layers_than_its_size_pays_for_is_refused_before_any_is_read(tmp_path, monkeypatch):
    from sgsc.export.validate import build_budget

    loads = export.load_packed(_pruned_layers_file(tmp_path / "few.sgsc", 50), model=nn.Sequential(
        *[nn.Linear(1, 1, bias=False) for _ in range(50)]))
    assert len(loads) == 50 and not loads[49].weight.any()
    path = _pruned_layers_file(tmp_path / "many.sgsc", 5000)
    assert 5000 > build_budget(path.stat().st_size)
    decoded = []
    monkeypatch.setattr(codec, "_layout", lambda *args: decoded.append(args))
    for read in (export.summarize, lambda path: export.load_packed(path, runtime="packed", model=nn.Linear(1, 1))):
        with pytest.raises(export.PackedFileError, match="header 'architecture' lists 5,000 quantized layers, more "
                                                         "than the [0-9,]+ a file of [0-9,]+ bytes may"):
            read(path)
    assert decoded == []  # refused from the header: no layer's stream was looked at


# ---- 9. sizes that wrap in int64 ------------------------------------------------------------------


def test_a_layer_whose_stream_length_wraps_int64_is_refused_before_allocating(tmp_path, capsys):
    tensors, header = _state(lambda: nn.Sequential(nn.Linear(2, 1)))
    state = header["architecture"]["state"]
    assert state[0][0] == "0.weight" and header["architecture"]["layers"][0][2] == 1
    state[0][1] = [2**29, 2**30]  # one group of 2^59 codes: at width 32, 2^64 bits, which int64 wraps to 0
    tensors.update(codes=torch.zeros(0, dtype=torch.uint8), widths=torch.tensor([32], dtype=torch.uint8))
    path = _write(tmp_path / "wrap.sgsc", tensors, header)
    huge = 2**70  # a bound that admits the layer's 2^61 bytes: the stream check must not wrap
    _refused_alike(path, lambda: nn.Sequential(nn.Linear(2, 1)), "the dense groups need 2305843009213693952 bytes, past the end",
                   max_bytes=huge)
    assert "past the end of the stream" in _one_line_error(capsys, ["inspect", str(path), "--max-bytes", str(huge)])

    state[0][1] = [2**40, 2**40]  # more elements than torch counts
    path = _write(tmp_path / "numel.sgsc", tensors, header)
    with pytest.raises(export.PackedFileError, match=r"'0.weight' of shape .* has more elements than a tensor holds"):
        export.read_header(path)


def test_a_memory_bound_above_int64_is_capped(tmp_path, capsys):
    tensors, header = _state(lambda: nn.Sequential(nn.Linear(2, 1)))
    header["architecture"]["state"][0][1] = [2**31, 2**31]  # 2^62 weights: 2^64 bytes in float32
    tensors["widths"] = torch.tensor([0], dtype=torch.uint8)
    tensors["codes"] = torch.zeros(0, dtype=torch.uint8)
    path = _write(tmp_path / "m.sgsc", tensors, header)
    with pytest.raises(export.PackedFileError, match="over the limit of 9,223,372,036,854,775,807 "
                                                     "\\(the most an int64 counts\\)"):
        export.summarize(path, max_bytes=2**80)
    with pytest.raises(TypeError, match="max_bytes must be an int or None, got float"):
        export.summarize(path, max_bytes=1.5)
    err = _one_line_error(capsys, ["inspect", str(path), "--max-bytes", "-1"])
    assert "max_bytes must be non-negative, got -1" in err


# ---- buffers of every dtype a user registers -----------------------------------------------------

EXTREMES = {
    torch.bool: [True, False, True, True, False],
    torch.uint8: [0, 255, 1, 128, 7],
    torch.int8: [-128, 127, 0, -1, 1],
    torch.int16: [-(2**15), 2**15 - 1, 0, -1, 1],
    torch.int32: [-(2**31), 2**31 - 1, 0, -1, 1],
    torch.int64: [-(2**63), 2**63 - 1, 0, -1, 1],
    torch.float16: [65504.0, -6e-8, 0.1, -0.0, 1.0],
    torch.bfloat16: [3.3e38, -1e-38, 0.1, -0.0, 1.0],
    torch.float32: [3.4e38, -1e-45, 0.1, -0.0, 1.0],
    torch.float64: [1.7e308, -5e-324, 0.1, -0.0, 1.0],
}


class Masked(nn.Module):
    """A causal mask as a bool buffer, as transformers register it, and a buffer of every other dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("mask", torch.ones(4, 4, dtype=torch.bool).tril())
        for dtype in EXTREMES:
            self.register_buffer(f"table_{str(dtype).removeprefix('torch.')}", torch.zeros(5, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).masked_fill(~self.mask, 0.0)  # x: (batch, 4, 4)


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("runtime", ["float", "packed"])
def test_buffers_of_every_stored_dtype_round_trip_bit_for_bit(tmp_path, runtime):
    model = sgsc.quantize_model(Masked()).eval()
    for dtype, values in EXTREMES.items():
        getattr(model, f"table_{str(dtype).removeprefix('torch.')}").copy_(torch.tensor(values, dtype=dtype))
    path = tmp_path / "masked.sgsc"
    sgsc.save_packed(model, path)
    dtypes = {key: dtype for key, _, dtype in export.read_header(path)["architecture"]["state"]}
    assert dtypes["mask"] == "bool" and dtypes["table_int16"] == "int16"
    loaded = export.load_packed(path, runtime=runtime, model=Masked())
    saved = dict(model.named_buffers())
    for name, buffer in loaded.named_buffers():
        if name in saved:
            assert buffer.dtype == saved[name].dtype and _bytes(buffer) == _bytes(saved[name]), name
    x = torch.randn(2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_bool_byte_other_than_0_or_1_is_refused(tmp_path):
    tensors, header = build_packed_state(sgsc.quantize_model(Masked()).eval())
    tensors["state.bool"].view(torch.uint8)[4] = 2
    _refused_alike(_write(tmp_path / "m.sgsc", tensors, header), Masked, "'mask' holds a bool byte that is neither")


def test_a_tensor_table_that_does_not_cover_the_data_is_refused(tmp_path):
    tensors, header = _state(mlp)
    path = _write(tmp_path / "m.sgsc", tensors, header)
    export.read_header(path)
    path.write_bytes(path.read_bytes() + b"\0")  # a byte past the last tensor, which safetensors would refuse too
    with pytest.raises(export.PackedFileError, match="the tensors take [0-9,]+ bytes, the file has [0-9,]+ after"):
        export.read_header(path)
