"""Files crafted with valid checksums: every one loads cleanly or fails with PackedFileError,
within a memory and time bound; `sgsc inspect` and `load_packed` agree; the CLI prints one line."""

from __future__ import annotations

import functools
import json
import math
import os
import struct
import subprocess
import sys
import time
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_save

from sgsc import export
from sgsc._io import LEGACY_STALE_SECONDS
from sgsc.cli import main
from sgsc.export.architecture import SkipInitOnMeta, rebuild_on_meta
from sgsc.export.writer import build_packed_state
from sgsc.nn import quantized_layers
from sgsc.nn.zoo import build_model

CNN_CONFIG = {"in_channels": 1, "image_size": 8, "num_classes": 10, "channels": [6, 8]}
DECODER_CONFIG = {"vocab_size": 12, "block_size": 8, "n_embd": 16, "n_layer": 2, "head_dim": 4, "n_heads": [4, 2],
                  "mlp_hidden": [32, 24]}


def _crc(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _mixed_bits(model, seed=0):
    """Pruned, narrow and wide groups, so files hold width-0, dense and sparse groups."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            layer.bits.copy_(torch.randint(0, 9, (layer.quant_groups,), generator=gen).float())
            layer.bits[:1] = 0.0
            layer.weight.masked_fill_(torch.rand(layer.weight.shape, generator=gen) < 0.7, 0.0)
    return model.eval()


@functools.cache
def _base(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and header of a small valid file (built once; callers copy before mutating)."""
    torch.manual_seed(0)
    model = _mixed_bits(build_model(name, CNN_CONFIG if name == "paper_cnn" else DECODER_CONFIG))
    return build_packed_state(model, data={"name": "digits", "seed": 0})


def _copy(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, header = _base(name)
    return {key: value.clone() for key, value in tensors.items()}, json.loads(json.dumps(header))


def _write(path, tensors, header, *, recompute_crcs=True):
    """Write a file whose every checksum is right, as the writer computes them, so only the content is wrong.

    ``header`` is a dict (serialised as the writer does) or the exact header text.
    """
    if recompute_crcs and isinstance(header, dict):
        header["crc32"] = {key: _crc(value) for key, value in tensors.items()}
    text = header if isinstance(header, str) else json.dumps(header, sort_keys=True, separators=(",", ":"))
    crc = torch.tensor([zlib.crc32(text.encode())], dtype=torch.int64)
    path.write_bytes(safetensors_save({**tensors, export.HEADER_CRC_TENSOR: crc}, metadata={"sgsc": text}))
    return path


def _refused(path, match, **kwargs):
    """Both readers refuse the file with the same error."""
    with pytest.raises(export.PackedFileError, match=match) as loading:
        export.load_packed(path, **kwargs)
    with pytest.raises(export.PackedFileError) as inspecting:
        export.summarize(path, **kwargs)
    assert str(inspecting.value) == str(loading.value)
    assert str(path) in str(loading.value)


# ---- memory and time bombs --------------------------------------------------------------------


def test_a_small_file_claiming_huge_weights_is_refused_before_allocating(tmp_path):
    tensors, header = _copy("paper_cnn")
    with torch.no_grad():
        tensors["widths"][-10:] = 0  # the head's 10 groups pruned: they store no bytes whatever their size
    header["config"]["image_size"] = 3428 * 4  # a (10, 23.5M) head from a file of a few kilobytes
    path = _write(tmp_path / "bomb.sgsc", tensors, header)
    assert path.stat().st_size < 10_000
    _refused(path, "loading needs [0-9]+,[0-9]{3},[0-9]{3},[0-9]{3} bytes .* over the limit of 67,[0-9,]+ \\(max_bytes\\)")


def test_max_bytes_bounds_what_a_file_may_load(tmp_path):
    path = tmp_path / "m.sgsc"
    export.save_packed(_mixed_bits(build_model("paper_cnn", CNN_CONFIG)), path)
    _refused(path, "over the limit of 1,000 ", max_bytes=1000)
    assert export.summarize(path, max_bytes=10**5).file_bytes == path.stat().st_size
    export.load_packed(path, max_bytes=10**5)


def _pruned_decoder_file(path, blocks):
    """A decoder of ``blocks`` blocks, every head and hidden unit removed: ~40 bytes a block."""
    config = {"vocab_size": 2, "block_size": 1, "n_embd": 1, "n_layer": 1, "head_dim": 1, "n_heads": [0], "mlp_hidden": [0]}
    tensors, header = build_packed_state(build_model("char_decoder", config).eval())
    state, widths, scales = tensors["state.float32"], tensors["widths"], tensors["scales"]
    # per block: 6 plain floats (2 layer norms, 2 output biases) and 2 groups (the output projections')
    tensors["state.float32"] = torch.cat([state[:3], state[3:9].repeat(blocks), state[9:]])
    tensors["widths"] = torch.cat([widths[:2].repeat(blocks), widths[2:]])
    tensors["scales"] = torch.cat([scales[:2].repeat(blocks), scales[2:]])
    header["config"].update(n_layer=blocks, n_heads=[0] * blocks, mlp_hidden=[0] * blocks)
    return _write(path, tensors, header)


def test_a_decoder_of_many_pruned_blocks_is_refused_before_it_is_built(tmp_path, monkeypatch):
    path = _pruned_decoder_file(tmp_path / "deep.sgsc", 1000)
    builds = []  # (tensors created, the limit) of every build the readers start
    count = SkipInitOnMeta.__torch_function__

    def counted(self, *args, **kwargs):
        try:
            return count(self, *args, **kwargs)
        finally:
            if self.max_tensors is not None:
                builds.append((self.created, self.max_tensors))

    monkeypatch.setattr(SkipInitOnMeta, "__torch_function__", counted)
    _refused(path, "the config builds more than [0-9]+ tensors")
    # the work is bounded by the limit, not by the file's 1000 blocks: each build stops one tensor past it
    assert builds and max(created for created, _ in builds) == builds[0][1] + 1
    assert builds[0][1] < 1000 * 6


def test_a_few_pruned_blocks_still_load(tmp_path):
    path = _pruned_decoder_file(tmp_path / "deep.sgsc", 12)
    model = export.load_packed(path)
    assert len(model.blocks) == 12
    with torch.no_grad():
        assert model(torch.zeros(1, 1, dtype=torch.long)).shape == (1, 1, 2)


# ---- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [math.nan, math.inf, -0.5, 0.0])
def test_a_scale_that_is_not_finite_and_positive_is_refused(tmp_path, scale):
    tensors, header = _copy("paper_cnn")
    tensors["scales"][3] = scale
    _refused(_write(tmp_path / "m.sgsc", tensors, header), "group 3's scale .* is not a finite positive number")


def test_weights_that_overflow_are_refused(tmp_path):
    path = _first_conv_file(tmp_path / "m.sgsc", lambda grouped: grouped.fill_(4.0))  # code 4 everywhere
    tensors, header = _copy_file(path)
    tensors["scales"][0] = 3e38  # a finite scale, but 4 * 3e38 is not a float32
    _refused(_write(path, tensors, header), "layer 'blocks.0.0': a weight overflows")


def _plain_entry_slice(name: str, key: str) -> slice:
    """Where plain entry ``key`` lies in its stream (the streams hold entries in state-dict order)."""
    model = rebuild_on_meta(name, _base(name)[1]["config"])
    skip = {f"{n}.{p}" for n, _ in quantized_layers(model) for p in ("weight", "bits", "exponent")}
    offset = 0
    for entry, value in model.state_dict().items():
        if entry in skip or value.dtype != torch.float32:
            continue
        if entry == key:
            return slice(offset, offset + value.numel())
        offset += value.numel()
    raise KeyError(key)


@pytest.mark.parametrize("key,value,match", [
    ("blocks.0.1.running_var", math.nan, "'blocks.0.1.running_var' holds NaN or infinite"),
    ("blocks.0.1.running_var", -1.0, "'blocks.0.1.running_var' holds a negative variance"),
    ("head.bias", math.inf, "'head.bias' holds NaN or infinite"),
])
def test_float_state_must_be_finite(tmp_path, key, value, match):
    tensors, header = _copy("paper_cnn")
    tensors["state.float32"][_plain_entry_slice("paper_cnn", key).start] = value
    _refused(_write(tmp_path / "m.sgsc", tensors, header), match)


@pytest.mark.parametrize("dtype", ["int8", "bool", "complex64", "float8_e4m3fn", "quint8", "int32", "Tensor"])
def test_only_float_dtypes_may_replace_a_float_entry(tmp_path, dtype):
    tensors, header = _copy("paper_cnn")
    header["dtypes"] = {"head.bias": dtype}
    _refused(_write(tmp_path / "m.sgsc", tensors, header), f"names '{dtype}', which is not a torch dtype a file may store")


def test_an_integer_entry_keeps_its_dtype(tmp_path):
    tensors, header = _copy("paper_cnn")
    header["dtypes"] = {"blocks.0.1.num_batches_tracked": "float32"}
    _refused(_write(tmp_path / "m.sgsc", tensors, header), "stores 'blocks.0.1.num_batches_tracked' as float32, but it is int64")


def test_a_stream_of_an_unlisted_dtype_is_refused(tmp_path):
    tensors, header = _copy("paper_cnn")
    tensors["state.float32"] = tensors["state.float32"].to(torch.float8_e4m3fn)
    _refused(_write(tmp_path / "m.sgsc", tensors, header), "'state.float32' is not a tensor of a stored dtype")


# ---- canonical streams ------------------------------------------------------------------------


def _first_conv_file(path, fill):
    """A CNN whose only stored layer is the first conv: 6 groups of 9 codes, ``fill``ed as ``(6, 9)`` weights."""
    model = build_model("paper_cnn", CNN_CONFIG).eval()
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            layer.bits.fill_(0.0)
            layer.exponent.fill_(0.0)
        conv = model.blocks[0][0]
        conv.bits.fill_(8.0)
        conv.weight.zero_()
        fill(conv.weight.view(6, 9))
    export.save_packed(model, path)
    return path


def test_nonzero_padding_bits_in_a_dense_run_are_refused(tmp_path):
    path = _first_conv_file(tmp_path / "m.sgsc", lambda grouped: grouped.fill_(1.0))
    tensors, header = _copy_file(path)
    # code 1 at width 2, nine to a group: 18 bits, so bits 2-7 of each group's third byte are padding
    assert tensors["codes"][:3].tolist() == [0x55, 0x55, 0x01] and tensors["widths"][0] == 2
    tensors["codes"][2] |= 0x80
    _refused(_write(path, tensors, header), "layer 'blocks.0.0': a bit-packed run has nonzero padding bits")


def test_a_zero_in_a_run_of_nonzero_codes_is_refused_by_inspect_and_load(tmp_path):
    path = _first_conv_file(tmp_path / "m.sgsc", lambda grouped: grouped.index_fill_(1, torch.tensor([0, 8]), 4.0))
    tensors, header = _copy_file(path)
    # six sparse groups (width byte 0x84): six 2-byte masks (codes 0 and 8), then twelve 4s at width 4
    assert tensors["widths"][:6].tolist() == [0x84] * 6
    assert tensors["codes"].tolist() == [0x01, 0x01] * 6 + [0x44] * 6
    tensors["codes"][12] = 0x40  # the first nonzero code becomes 0
    _refused(_write(path, tensors, header), "holds a zero, where only nonzero codes belong")


def test_nonzero_padding_bits_in_a_sparse_run_are_refused(tmp_path):
    path = _first_conv_file(tmp_path / "m.sgsc", lambda grouped: grouped[:5, 4].fill_(4.0))
    tensors, header = _copy_file(path)
    # five sparse groups (the sixth is all zero: width 0) with code 4 at index 4: 20 bits of run
    assert tensors["codes"].tolist() == [0x10, 0x00] * 5 + [0x44, 0x44, 0x04]
    tensors["codes"][12] = 0x14
    _refused(_write(path, tensors, header), "nonzero padding bits")


def _copy_file(path):
    from safetensors.torch import load as safetensors_load

    tensors = safetensors_load(path.read_bytes())
    tensors.pop(export.HEADER_CRC_TENSOR)
    return tensors, export.read_header(path)


# ---- strict JSON ------------------------------------------------------------------------------


def _valid_text() -> str:
    _, header = _copy("paper_cnn")
    return json.dumps(header, sort_keys=True, separators=(",", ":"))


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.replace('{"config"', '{"model":"paper_cnn","config"', 1), "duplicate key 'model'"),
    (lambda t: t.replace('"seed":0', '"seed":NaN'), "non-standard literal NaN"),
    (lambda t: t.replace('"version":3', '"version":3.0'), "format version 3.0 is not supported"),
    (lambda t: t.replace('"version":3', '"version":true'), "format version True is not supported"),
    (lambda t: t.replace('"seed":0', '"seed":1e400'), "out of float range"),
    (lambda t: t.replace('"seed":0', '"seed":' + "9" * 5000), "an integer of 5000 digits"),
    (lambda t: t.replace('"seed":0', '"seed":' + "[" * 1100 + "]" * 1100), "nesting deeper than 8 levels"),
    (lambda t: t.replace('"seed":0', '"seed":' + "[" * 9 + "]" * 9), "nesting deeper than 8 levels"),
    (lambda t: t.replace('"seed":0', '"seed":1e30'), "'seed' must be an integer 0..2\\^32-1"),
    (lambda t: t.replace('"seed":0', '"seed":0,"extra":1'), "unknown keys \\['extra'\\]"),
    (lambda t: t.replace('"data":{', '"data":[{').replace('"seed":0}', '"seed":0}]'), "'data' must be a JSON object"),
    (lambda t: t[:-1] + ',"x":1}', "unknown keys \\['x'\\]"),
    (lambda t: '"sgsc-packed"', "the sgsc header is a JSON str, not an object"),
])
def test_header_json_must_be_strict(tmp_path, edit, match):
    tensors, _ = _copy("paper_cnn")
    path = _write(tmp_path / "m.sgsc", tensors, edit(_valid_text()))
    _refused(path, match)
    with pytest.raises(export.PackedFileError, match=match):
        export.read_header(path)


def test_crcs_must_be_integers(tmp_path):
    tensors, header = _copy("paper_cnn")
    header["crc32"] = {key: _crc(value) for key, value in tensors.items()}
    text = json.dumps(header, sort_keys=True, separators=(",", ":"))
    text = text.replace(f'"widths":{header["crc32"]["widths"]}', f'"widths":{header["crc32"]["widths"]}.0')
    _refused(_write(tmp_path / "m.sgsc", tensors, text), "\\['widths'\\] are not")


def test_duplicate_tensor_names_are_refused(tmp_path):
    tensors, header = _copy("paper_cnn")
    path = _write(tmp_path / "m.sgsc", tensors, header)
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    index = data[8 : 8 + length].decode()
    scales = index[index.index('"scales":') : index.index("}", index.index('"scales":')) + 1]
    widened = index.replace("{", "{" + scales + ",", 1)  # the same name a second time, first
    widened += " " * ((8 - len(widened) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(widened)) + widened.encode() + data[8 + length :])
    _refused(path, "duplicate key 'scales'")


# ---- the command line -------------------------------------------------------------------------


def test_cli_reports_a_bad_file_in_one_line(tmp_path, capsys):
    tensors, header = _copy("paper_cnn")
    tensors["scales"][0] = math.nan
    path = _write(tmp_path / "m.sgsc", tensors, header)
    for command in (["inspect", str(path)], ["eval", str(path), "--data", "digits"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"sgsc: {path}: tensor 'scales': group 0's scale nan") and err.count("\n") == 1
    assert main(["inspect", str(tmp_path / "absent.sgsc")]) == 2
    assert capsys.readouterr().err == f"sgsc: {tmp_path / 'absent.sgsc'}: no packed model file there\n"
    with pytest.raises(export.PackedFileError):
        main(["--debug", "inspect", str(path)])


def test_the_cli_prints_no_traceback_in_a_fresh_process(tmp_path):
    tensors, header = _copy("paper_cnn")
    header["config"]["image_size"] = 10**6
    path = _write(tmp_path / "m.sgsc", tensors, header)
    result = subprocess.run([sys.executable, "-m", "sgsc", "inspect", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(f"sgsc: {path}: loading needs") and "Traceback" not in result.stderr


def test_eval_opens_no_path_the_file_names(tmp_path, monkeypatch, capsys):
    import sgsc.cli.eval as eval_command

    tensors, header = _copy("paper_cnn")
    header["data"] = {"name": "digits", "dir": str(tmp_path / "secret.txt"), "seed": 7}
    path = _write(tmp_path / "m.sgsc", tensors, header)
    seen = []

    def record(config):
        seen.append(config)
        raise ValueError("stop here")

    monkeypatch.setattr(eval_command, "load_data", record)
    assert main(["eval", str(path)]) == 2
    assert (seen[0].data, seen[0].data_dir, seen[0].seed) == ("digits", None, 7)
    header["data"] = {"name": "../etc", "seed": 0}
    _write(path, tensors, header)
    assert main(["eval", str(path)]) == 2
    assert "records data set '../etc', which is not one of" in capsys.readouterr().err


def test_the_writer_records_no_data_directory(tmp_path):
    path = tmp_path / "m.sgsc"
    export.save_packed(build_model("paper_cnn", CNN_CONFIG).eval(), path, data={"name": "digits", "dir": "/x", "seed": 3})
    assert export.read_header(path)["data"] == {"name": "digits", "seed": 3}
    with pytest.raises(ValueError, match="'seed' must be an integer"):
        export.save_packed(build_model("paper_cnn", CNN_CONFIG).eval(), path, data={"name": "digits", "seed": -1})


def test_the_writer_refuses_a_model_the_reader_would_refuse(tmp_path):
    model = build_model("paper_cnn", CNN_CONFIG).eval()
    model.blocks[0][1].running_var[0] = math.nan
    with pytest.raises(ValueError, match="cannot export this model: .*'blocks.0.1.running_var' holds NaN"):
        export.save_packed(model, tmp_path / "m.sgsc")
    assert list(tmp_path.iterdir()) == []


# ---- temporaries of killed writes -------------------------------------------------------------


def test_a_write_removes_the_temporaries_of_killed_writes_only(tmp_path):
    target = tmp_path / "m.sgsc"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    dead = tmp_path / f".m.sgsc.{dead_pid}.k1l2m3n4.tmp"
    alive = tmp_path / f".m.sgsc.{os.getpid()}.a1b2c3d4.tmp"  # a concurrent write, still running
    old_legacy, new_legacy = tmp_path / ".m.sgsc.oldabcde.tmp", tmp_path / ".m.sgsc.newabcde.tmp"
    other_target = tmp_path / f".n.sgsc.{dead_pid}.k1l2m3n4.tmp"
    for path in (dead, alive, old_legacy, new_legacy, other_target):
        path.write_bytes(b"partial")
    past = time.time() - LEGACY_STALE_SECONDS - 60
    os.utime(old_legacy, (past, past))
    export.save_packed(build_model("paper_cnn", CNN_CONFIG).eval(), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (target, alive, new_legacy, other_target))


# ---- fuzzing ----------------------------------------------------------------------------------

FUZZ_MAX_BYTES = 32 * 2**20
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
SIZES = st.integers(-2, 70) | st.sampled_from([0, 2**31, 2**40, 10**6, 3428])


@st.composite
def mutations(draw):
    """One valid-CRC file: a small CNN or decoder with one header field or tensor byte changed."""
    name = draw(st.sampled_from(["paper_cnn", "char_decoder"]))
    tensors, header = _copy(name)
    kind = draw(st.sampled_from(["config", "header", "byte", "dtype", "data"]))
    if kind == "config":
        key = draw(st.sampled_from(sorted(header["config"])))
        value = header["config"][key]
        if isinstance(value, list) and value and draw(st.booleans()):
            value = list(value)
            value[draw(st.integers(0, len(value) - 1))] = draw(SIZES)
            header["config"][key] = value
        else:
            header["config"][key] = draw(SIZES | JSON_VALUES)
    elif kind == "header":
        header[draw(st.sampled_from(["format", "version", "model", "config", "dtypes", "data", "crc32", "other"]))] = draw(JSON_VALUES)
    elif kind == "byte":
        stream = draw(st.sampled_from(sorted(tensors)))
        raw = tensors[stream].view(torch.uint8)
        if raw.numel():
            raw[draw(st.integers(0, raw.numel() - 1))] = draw(st.integers(0, 255))
    elif kind == "dtype":
        keys = sorted(rebuild_on_meta(name, header["config"]).state_dict())
        header["dtypes"] = {draw(st.sampled_from(keys)): draw(st.sampled_from(
            ["float16", "bfloat16", "float64", "int8", "int32", "bool", "complex64", "float8_e5m2", "quint8", "nope"]))}
    else:
        header["data"] = draw(st.dictionaries(st.sampled_from(["name", "seed", "dir", "x"]), JSON_VALUES | SIZES, max_size=3))
    return name, tensors, header


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutations())
def test_a_crafted_file_loads_as_its_header_says_or_is_refused(tmp_path, mutation):
    _, tensors, header = mutation
    path = _write(tmp_path / "fuzz.sgsc", tensors, header)
    try:
        model = export.load_packed(path, max_bytes=FUZZ_MAX_BYTES)
    except export.PackedFileError as exc:
        with pytest.raises(export.PackedFileError) as inspected:
            export.summarize(path, max_bytes=FUZZ_MAX_BYTES)
        assert str(inspected.value) == str(exc)  # inspect and load agree on every file
        return
    export.summarize(path, max_bytes=FUZZ_MAX_BYTES)
    promised = rebuild_on_meta(header["model"], header["config"]).state_dict()
    loaded = model.state_dict()
    assert {key: tuple(value.shape) for key, value in loaded.items()} == {
        key: tuple(promised[key].shape) for key in loaded
    }
    assert set(promised) - set(loaded) == {key for key in promised if key.endswith((".bits", ".exponent"))}
    assert sum(value.numel() * value.element_size() for value in loaded.values()) <= FUZZ_MAX_BYTES
    assert all(torch.isfinite(value).all() for value in loaded.values() if value.is_floating_point())
