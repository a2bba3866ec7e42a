"""The packed model file: bit-exact round trips, honest size accounting, and every kind of damage
detected with a clear error."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from sgsc import export
from sgsc.export import architecture, codec
from sgsc.nn import quantized_layers
from sgsc.nn.zoo import build_model

CNN_CONFIG = {"in_channels": 1, "image_size": 8, "num_classes": 10, "channels": [6, 8]}
DECODER_CONFIG = {"vocab_size": 12, "block_size": 8, "n_embd": 16, "n_layer": 2, "head_dim": 4, "n_heads": [4, 2], "mlp_hidden": [32, 24]}


def _scramble_quantizers(model, seed, rounding="nearest"):
    """Mixed bit depths (pruned groups, fractional and wide ones) and shifted exponents."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            groups = layer.quant_groups
            layer.bits.copy_(torch.randint(0, 12, (groups,), generator=gen).float() + 0.5 * torch.rand(groups, generator=gen))
            layer.bits[:1] = 0.0
            layer.exponent.add_(torch.randint(-1, 3, (groups,), generator=gen).float() + 0.3)
            layer.rounding = rounding
    return model


def _trained_cnn(seed=0, rounding="nearest", head_groups="output"):
    torch.manual_seed(seed)
    model = build_model("paper_cnn", {**CNN_CONFIG, "head_groups": head_groups})
    # a few steps so batch-norm statistics and biases are not at their initial values
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        loss = model(torch.randn(16, 1, 8, 8)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _scramble_quantizers(model, seed, rounding).eval()


def _decoder(seed=0):
    torch.manual_seed(seed)
    return _scramble_quantizers(build_model("char_decoder", DECODER_CONFIG), seed).eval()


@pytest.mark.parametrize("rounding,head_groups", [("nearest", "output"), ("floor", "output"), ("nearest", "channel")])
def test_cnn_round_trip_is_bit_exact(tmp_path, rounding, head_groups):
    model = _trained_cnn(rounding=rounding, head_groups=head_groups)
    path = tmp_path / "cnn.sgsc"
    export.save_packed(model, path)
    loaded = export.load_packed(path)
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for name, layer in quantized_layers(model):
        assert torch.equal(loaded.get_submodule(name).weight, layer.quantized_weight().detach())


def test_decoder_round_trip_is_bit_exact(tmp_path):
    model = _decoder()
    path = tmp_path / "decoder.sgsc"
    export.save_packed(model, path)
    loaded = export.load_packed(path)
    idx = torch.randint(0, DECODER_CONFIG["vocab_size"], (4, DECODER_CONFIG["block_size"]))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))



def test_loading_initialises_nothing_and_never_imports_dynamo(tmp_path):
    """The architecture is built on meta, where init would only import torch._dynamo (seconds) for no values."""
    cnn, decoder = tmp_path / "cnn.sgsc", tmp_path / "decoder.sgsc"
    export.save_packed(_trained_cnn(), cnn)
    export.save_packed(_decoder(), decoder)
    script = textwrap.dedent(f"""
        import sys
        import torch, sgsc
        from sgsc import export
        if "torch._dynamo" in sys.modules:
            print("imported by torch itself")
            sys.exit(0)
        for path in ({str(cnn)!r}, {str(decoder)!r}):
            export.load_packed(path)
            assert "torch._dynamo" not in sys.modules, path
        print("not imported")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    if "imported by torch itself" in result.stdout:
        pytest.skip("this torch imports torch._dynamo on import")
    assert "not imported" in result.stdout

def test_physically_pruned_config_round_trips(tmp_path):
    config = dict(DECODER_CONFIG, n_heads=[3, 0], mlp_hidden=[20, 0])
    torch.manual_seed(1)
    model = _scramble_quantizers(build_model("char_decoder", config), 1).eval()
    path = tmp_path / "pruned.sgsc"
    export.save_packed(model, path)
    loaded = export.load_packed(path)
    assert loaded.config == model.config
    idx = torch.randint(0, 12, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


@pytest.mark.parametrize("head_groups", ["output", "channel"])
def test_codes_match_the_forward_kernel_exactly(head_groups):
    model = _trained_cnn(seed=3, head_groups=head_groups)
    for _, layer in quantized_layers(model):
        codes, scales = export.integer_codes(layer)
        rebuilt = layer.ungrouped(codes.float() * scales.unsqueeze(1))
        assert torch.equal(rebuilt, layer.quantized_weight().detach())


def test_minimal_widths_are_the_smallest_that_hold_the_codes():
    codes = torch.tensor([[0, 0], [0, -1], [1, 0], [-2, 1], [3, -4], [-5, 0], [2**30, 0], [-(2**31), 2**31 - 1]])
    assert codec.minimal_widths(codes).tolist() == [0, 1, 2, 2, 3, 4, 32, 32]
    assert codec.minimal_widths(codes.to(torch.int32)).tolist() == [0, 1, 2, 2, 3, 4, 32, 32]  # -(-2^31) in int32


def test_exported_width_can_be_below_the_learned_bits(tmp_path):
    model = _trained_cnn()
    layer = model.head
    with torch.no_grad():
        layer.bits.fill_(16.0)  # codes of a 16-bit grid but tiny weights: far fewer bits needed
        layer.weight.mul_(1e-3)
    summary = export.save_packed(model, tmp_path / "m.sgsc")
    head = next(entry for entry in summary.layers if entry.name == "head")
    assert max(head.width_histogram) < 16


def test_size_accounting_bounds_the_file(tmp_path):
    model = _trained_cnn()
    with torch.no_grad():  # half of the head's rows mostly zero: those groups go sparse, the rest stay dense
        model.head.weight[:5, 8:] = 0
    summary = export.save_packed(model, tmp_path / "m.sgsc")
    expected_packed, sparse_groups = 0, 0
    for _, layer in quantized_layers(model):
        codes, _ = export.integer_codes(layer)
        length = codes.shape[1]
        sparse_codes = {}  # width -> nonzero codes of the sparse groups of that width
        for w, nonzero in zip(codec.minimal_widths(codes).tolist(), (codes != 0).sum(1).tolist()):
            dense, sparse = (w * length + 7) // 8, (length + 7) // 8 + (w * nonzero + 7) // 8
            if nonzero and sparse < dense:  # a mask per sparse group, then one run per width
                expected_packed += (length + 7) // 8
                sparse_codes[w] = sparse_codes.get(w, 0) + nonzero
                sparse_groups += 1
            else:
                expected_packed += dense
        expected_packed += sum((w * n + 7) // 8 for w, n in sparse_codes.items())
    assert sparse_groups > 0  # both forms are accounted for
    assert summary.packed_bytes == expected_packed
    assert summary.file_bytes == (tmp_path / "m.sgsc").stat().st_size
    # the streams are indexed by the architecture, so the framing stays well under a KiB
    assert 0 < summary.overhead_bytes <= 1024
    text = export.format_summary(summary)
    assert f"on disk: {summary.file_bytes} bytes" in text and "head" in text


def test_export_is_atomic_and_leaves_no_partial_file(tmp_path, monkeypatch):
    model = _trained_cnn()
    target = tmp_path / "m.sgsc"
    target.write_bytes(b"previous")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.save_packed(model, target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.sgsc"]


# ---- damage ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _packed_bytes(tmp_path_factory) -> bytes:
    """One export per test run: the tests below damage a copy of these bytes."""
    path = tmp_path_factory.mktemp("packed") / "m.sgsc"
    export.save_packed(_trained_cnn(), path)
    return path.read_bytes()


@pytest.fixture
def packed_file(tmp_path, _packed_bytes):
    path = tmp_path / "m.sgsc"
    path.write_bytes(_packed_bytes)
    return path


def _header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def test_truncated_file_is_rejected(packed_file):
    data = packed_file.read_bytes()
    for cut in (4, 8 + _header_length(data) // 2, len(data) - 3):
        packed_file.write_bytes(data[:cut])
        with pytest.raises(export.PackedFileError, match="not a readable safetensors file"):
            export.load_packed(packed_file)


def test_flipped_byte_in_a_packed_stream_is_detected(packed_file):
    data = bytearray(packed_file.read_bytes())
    start = 8 + _header_length(data)
    header = json.loads(data[8:start])
    begin, _ = header[export.CODES]["data_offsets"]
    data[start + begin + 3] ^= 0x10
    packed_file.write_bytes(bytes(data))
    with pytest.raises(export.PackedFileError, match="'codes' fails its CRC-32"):
        export.load_packed(packed_file)


def test_flipped_byte_in_the_header_is_detected(packed_file):
    data = bytearray(packed_file.read_bytes())
    position = data.index(b"channels") + 2
    data[position] ^= 0x01
    packed_file.write_bytes(bytes(data))
    with pytest.raises(export.PackedFileError):
        export.load_packed(packed_file)



def test_read_header_checks_the_header_without_reading_the_weights(packed_file):
    header = export.read_header(packed_file)
    assert header["format"] == export.FORMAT_NAME and header["model"] == "paper_cnn"
    data = bytearray(packed_file.read_bytes())
    start = 8 + _header_length(data)
    begin, _ = json.loads(data[8:start])[export.CODES]["data_offsets"]
    data[start + begin] ^= 0x10  # damaged weights: the header alone still reads, loading does not
    packed_file.write_bytes(bytes(data))
    assert export.read_header(packed_file) == header
    with pytest.raises(export.PackedFileError, match="'codes' fails its CRC-32"):
        export.load_packed(packed_file)
    data[data.index(b"channels") + 2] ^= 0x01
    packed_file.write_bytes(bytes(data))
    with pytest.raises(export.PackedFileError, match="header fails its CRC-32"):
        export.read_header(packed_file)
    with pytest.raises(FileNotFoundError):
        export.read_header(packed_file.with_name("absent.sgsc"))

def _rewrite(path, mutate_header=None, mutate_tensors=None):
    """Rewrite a packed file with every checksum made consistent, so only the mutation is wrong."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors.pop(export.HEADER_CRC_TENSOR)
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["sgsc"])
    if mutate_tensors:
        mutate_tensors(tensors)
    header["crc32"] = {name: zlib.crc32(t.contiguous().view(torch.uint8).numpy().tobytes()) for name, t in tensors.items()}
    if mutate_header:
        mutate_header(header)
    text = json.dumps(header, sort_keys=True)
    tensors[export.HEADER_CRC_TENSOR] = torch.tensor([zlib.crc32(text.encode())], dtype=torch.int64)
    save_file(tensors, str(path), metadata={"sgsc": text})


def test_rewriting_unchanged_gives_a_loadable_file(packed_file):
    """The damage tests below rely on _rewrite producing a valid file when nothing is mutated."""
    _rewrite(packed_file)
    model, x = _trained_cnn(), torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(export.load_packed(packed_file)(x), model(x))


def _magnitude_pruned_cnn(sparsity=0.8):
    """Every group at 8 bits, then the smallest ``sparsity`` of each layer's weights zeroed."""
    model = _trained_cnn()
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            layer.bits.fill_(8.0)
            layer.exponent.fill_(-6.0)
            magnitude = layer.weight.abs().flatten()
            cut = magnitude.kthvalue(int(sparsity * magnitude.numel())).values
            layer.weight.masked_fill_(layer.weight.abs() <= cut, 0.0)
    return model


def test_mostly_zero_groups_are_stored_sparse_and_load_bit_exactly(tmp_path):
    model = _magnitude_pruned_cnn()
    summary = export.save_packed(model, tmp_path / "sparse.sgsc")
    assert all(layer.sparse_groups == layer.groups for layer in summary.layers)
    dense_bytes = 0
    for _, layer in quantized_layers(model):
        codes, _ = export.integer_codes(layer)
        dense_bytes += sum((int(w) * codes.shape[1] + 7) // 8 for w in codec.minimal_widths(codes))
    # a bitmask plus a fifth of the codes: well under half of storing every zero at full width
    assert summary.packed_bytes < 0.5 * dense_bytes
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(export.load_packed(tmp_path / "sparse.sgsc")(x), model(x))
    assert " sparse " in export.format_summary(summary).splitlines()[0]


def test_a_version_2_file_loads_unless_it_has_sparse_groups(tmp_path):
    dense, sparse = tmp_path / "dense.sgsc", tmp_path / "sparse.sgsc"
    model = _trained_cnn()
    assert sum(layer.sparse_groups for layer in export.save_packed(model, dense).layers) == 0
    export.save_packed(_magnitude_pruned_cnn(), sparse)
    for path in (dense, sparse):
        _rewrite(path, mutate_header=lambda h: h.update(version=2))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(export.load_packed(dense)(x), model(x))
    with pytest.raises(export.PackedFileError, match="'widths': width byte 1[3-9][0-9] of group 0 is not a width 0..32$"):
        export.load_packed(sparse)


def test_wrong_format_version_is_rejected(packed_file):
    _rewrite(packed_file, mutate_header=lambda h: h.update(version=1))
    with pytest.raises(export.PackedFileError, match="format version 1 is not supported"):
        export.load_packed(packed_file)


def test_widths_of_the_wrong_length_are_rejected(packed_file):
    _rewrite(packed_file, mutate_tensors=lambda t: t.update(widths=t["widths"][:-1]))
    with pytest.raises(export.PackedFileError, match="'widths' must be uint8 of shape \\(24,\\)"):
        export.load_packed(packed_file)


def test_scales_of_the_wrong_dtype_are_rejected(packed_file):
    _rewrite(packed_file, mutate_tensors=lambda t: t.update(scales=t["scales"].double()))
    with pytest.raises(export.PackedFileError, match="'scales' must be float32 of shape"):
        export.load_packed(packed_file)


def test_widths_that_need_more_bytes_than_the_stream_holds_are_rejected(packed_file):
    def widen_first_group(tensors):
        tensors["widths"] = tensors["widths"].clone()
        tensors["widths"][0] += 1

    _rewrite(packed_file, mutate_tensors=widen_first_group)
    with pytest.raises(export.PackedFileError, match="tensor 'codes'.* past the end of the stream"):
        export.load_packed(packed_file)


def test_a_width_above_32_is_rejected(packed_file):
    def too_wide(tensors):
        tensors["widths"] = tensors["widths"].clone()
        tensors["widths"][0] = 40

    _rewrite(packed_file, mutate_tensors=too_wide)
    with pytest.raises(export.PackedFileError, match="width byte 40 of group 0 is not a width 0..32"):
        export.load_packed(packed_file)


def test_missing_tensor_is_rejected(packed_file):
    _rewrite(packed_file, mutate_tensors=lambda t: t.pop("state.float32"))
    with pytest.raises(export.PackedFileError, match="'state.float32' is missing"):
        export.load_packed(packed_file)


def test_a_tensor_the_header_does_not_list_is_rejected(packed_file):
    _rewrite(packed_file, mutate_tensors=lambda t: t.update(extra=torch.zeros(2)),
             mutate_header=lambda h: h["crc32"].pop("extra"))
    with pytest.raises(export.PackedFileError, match="unlisted \\['extra'\\]"):
        export.load_packed(packed_file)


def test_a_config_that_does_not_rebuild_is_rejected(packed_file):
    _rewrite(packed_file, mutate_header=lambda h: h["config"].update(depth=3))
    with pytest.raises(export.PackedFileError, match="cannot rebuild model 'paper_cnn'"):
        export.load_packed(packed_file)


def test_a_config_of_another_architecture_is_rejected(packed_file):
    _rewrite(packed_file, mutate_header=lambda h: h["config"].update(channels=[6, 9]))
    with pytest.raises(export.PackedFileError, match="must be .* for this architecture"):
        export.load_packed(packed_file)


def test_an_unknown_dtype_in_the_header_is_rejected(packed_file):
    _rewrite(packed_file, mutate_header=lambda h: h.update(dtypes={"head.bias": "nn"}))
    with pytest.raises(export.PackedFileError, match="'nn', which is not a torch dtype"):
        export.load_packed(packed_file)



def test_state_the_file_does_not_hold_is_an_error_not_garbage(packed_file, monkeypatch):
    """Loading fills a storage-less architecture; a tensor no file entry fills must not stay unset."""
    build = architecture.build_model

    def with_scratch_buffer(name, config):
        model = build(name, config)
        model.register_buffer("scratch", torch.zeros(3), persistent=False)  # in no state dict, so in no file
        return model

    monkeypatch.setattr(architecture, "build_model", with_scratch_buffer)
    with pytest.raises(export.PackedFileError, match="tensors the file does not hold: \\['scratch'\\]"):
        export.load_packed(packed_file)

def test_a_model_that_its_config_does_not_describe_cannot_be_exported(tmp_path):
    model = _trained_cnn()
    model.register_buffer("calibration", torch.zeros(3))
    with pytest.raises(ValueError, match="calibration"):
        export.save_packed(model, tmp_path / "m.sgsc")
    assert not (tmp_path / "m.sgsc").exists()


def test_tensors_keep_the_dtype_they_were_exported_with(tmp_path):
    model = _trained_cnn()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not name.endswith(("bits", "exponent")):
            tensor.data = tensor.data.bfloat16()
    path = tmp_path / "bf16.sgsc"
    export.save_packed(model, path)
    loaded = export.load_packed(path)
    assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    x = torch.randn(8, 1, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_non_safetensors_file_is_rejected(tmp_path):
    path = tmp_path / "not.sgsc"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(export.PackedFileError):
        export.load_packed(path)
    with pytest.raises(FileNotFoundError):
        export.load_packed(tmp_path / "absent.sgsc")


def test_a_plain_safetensors_file_is_rejected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(export.PackedFileError, match="not an sgsc packed model"):
        export.load_packed(path)


def test_header_claiming_more_bytes_than_present_is_rejected(packed_file):
    data = bytearray(packed_file.read_bytes())
    packed_file.write_bytes(struct.pack("<Q", _header_length(data) + 4096) + bytes(data[8:]))
    with pytest.raises(export.PackedFileError, match="not a readable safetensors file"):
        export.load_packed(packed_file)


def test_inspect_command_prints_the_table(packed_file, capsys):
    from sgsc.cli import main

    assert main(["inspect", str(packed_file)]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.0" in out and "head" in out
    assert f"on disk: {packed_file.stat().st_size} bytes" in out


def test_training_run_exports_and_cli_round_trips(tmp_path, capsys):
    from sgsc.cli import main
    from sgsc.train import (
        TrainConfig,
        evaluate,
        load_checkpoint,
        load_data,
        model_from_checkpoint,
        train,
    )

    config = TrainConfig(steps=20, warmup_steps=5, k=5, eval_every=10, model_config={"channels": [6, 8]},
                         progress=False, plots=False, gamma=0.5, quant_lr=0.2, out_dir=str(tmp_path / "run"))
    result = train(config)
    written = tmp_path / "run" / "model.sgsc"
    assert result.file_bytes == written.stat().st_size
    trained = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "checkpoint.pt")).eval()
    test_x, _ = load_data(config).test.tensors
    with torch.no_grad():
        assert torch.equal(export.load_packed(written)(test_x), trained(test_x))

    assert main(["export", str(tmp_path / "run" / "checkpoint.pt"), "-o", str(tmp_path / "again.sgsc")]) == 0
    assert "on disk:" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "again.sgsc"), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["test"] == evaluate(trained, load_data(config).test)
    assert scored["file_bytes"] == (tmp_path / "again.sgsc").stat().st_size
    assert main(["inspect", str(written)]) == 0
    assert "blocks.0.0" in capsys.readouterr().out


def test_eval_needs_a_data_set_when_the_file_records_none(tmp_path, capsys):
    from sgsc.cli import main

    path = tmp_path / "cnn.sgsc"
    export.save_packed(_trained_cnn(), path)
    assert main(["eval", str(path)]) == 2
    assert capsys.readouterr().err == f"sgsc: {path}: the file does not record its data set; pass --data\n"


def test_exporting_the_same_model_gives_the_same_bytes(tmp_path):
    model = _trained_cnn()
    contents = set()
    for i in range(4):
        export.save_packed(model, tmp_path / f"{i}.sgsc", data={"name": "digits", "seed": 0})
        contents.add((tmp_path / f"{i}.sgsc").read_bytes())
    assert len(contents) == 1
