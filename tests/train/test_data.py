"""Data readers: IDX files written here byte by byte, the digits fallback and the names corpus."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from sgsc.train import data
from sgsc.train.data import CharVocab, load_names, load_vision, make_blocks, parse_idx, read_idx


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    big_endian = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(big_endian).tobytes()


def write_idx_dir(directory, n_train=30, n_test=10, size=4, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 3, n, dtype=np.uint8)
        (directory / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (directory / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))  # raw: both forms are read
    return directory


@pytest.fixture
def no_data_found(tmp_path, monkeypatch):
    """Neither $SGSC_DATA_DIR nor the repo's shared data holds anything."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "_REPO_DATA_DIR", tmp_path / "nothing-here")


# ---- IDX ------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_raw_and_gzip(tmp_path, compress):
    images = np.arange(3 * 2 * 5, dtype=np.uint8).reshape(3, 2, 5)
    raw = idx_bytes(images)
    assert raw[:8] == b"\x00\x00\x08\x03\x00\x00\x00\x03"  # magic, then the first size, big-endian
    path = tmp_path / "images.idx"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    np.testing.assert_array_equal(read_idx(path), images)


@pytest.mark.parametrize(
    "type_code,values",
    [(0x09, [-3, 7]), (0x0B, [-300, 2]), (0x0C, [70000, -1]), (0x0D, [1.5, -2.25]), (0x0E, [0.1, 3.0])],
)
def test_parse_idx_big_endian_types(type_code, values):
    array = np.array(values)
    np.testing.assert_array_equal(parse_idx(idx_bytes(array, type_code)), array)


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda raw: b"\x01" + raw[1:], "not an IDX file"),
        (lambda raw: raw[:2] + b"\x07" + raw[3:], "unknown IDX data type"),
        (lambda raw: raw[:-1], "payload is 11 bytes"),
        (lambda raw: raw + b"\x00", "payload is 13 bytes"),
        (lambda raw: raw[:6], "truncated IDX header"),
        (lambda raw: b"", "magic number missing"),
        (lambda raw: gzip.compress(raw)[:-6], "corrupt gzip"),
    ],
)
def test_corrupt_idx_files_name_the_path(tmp_path, corrupt, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(corrupt(idx_bytes(np.zeros((3, 4), dtype=np.uint8))))
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_missing_idx_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gz"):
        read_idx(tmp_path / "missing.gz")


# ---- vision ---------------------------------------------------------------------------------


def test_load_vision_from_a_directory(tmp_path):
    directory = write_idx_dir(tmp_path / "fmnist")
    vision = load_vision(directory, val_fraction=0.2, seed=3)
    assert (len(vision.train), len(vision.val), len(vision.test)) == (24, 6, 10)
    x, y = vision.train.tensors
    assert x.shape == (24, 1, 4, 4) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 1e-5 and x.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-4)
    assert vision.source == str(directory) and vision.image_size == 4 and vision.num_classes <= 3
    # the same seed gives the same split, another seed another one
    again = load_vision(directory, val_fraction=0.2, seed=3)
    assert torch.equal(again.val.tensors[0], vision.val.tensors[0])
    assert not torch.equal(load_vision(directory, val_fraction=0.2, seed=4).val.tensors[0], vision.val.tensors[0])


def test_load_vision_finds_the_data_root_from_the_environment(tmp_path, monkeypatch, no_data_found):
    write_idx_dir(tmp_path / "root" / "fashion-mnist")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "root"))
    vision = load_vision()
    assert vision.name == "fashion-mnist" and vision.source == str(tmp_path / "root" / "fashion-mnist")


def test_load_vision_falls_back_to_digits(no_data_found):
    vision = load_vision()
    assert vision.name == "digits"
    assert len(vision.train) + len(vision.val) + len(vision.test) == 1797
    assert vision.train.tensors[0].shape[1:] == (1, 8, 8) and vision.num_classes == 10
    assert len(vision.test) == round(0.2 * 1797)
    assert torch.equal(load_vision(name="digits").test.tensors[0], vision.test.tensors[0])
    with pytest.raises(FileNotFoundError, match="fashion-mnist IDX files not found"):
        load_vision(name="fashion-mnist")


def test_load_vision_bad_arguments_and_mismatched_files(tmp_path):
    with pytest.raises(ValueError, match="name"):
        load_vision(name="cifar")
    with pytest.raises(ValueError, match="val_fraction"):
        load_vision(name="digits", val_fraction=1.0)
    with pytest.raises(ValueError, match="data_dir"):
        load_vision(tmp_path, name="digits")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_vision(tmp_path / "nowhere")
    directory = write_idx_dir(tmp_path / "bad")
    (directory / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(ValueError, match="test images"):
        load_vision(directory)


# ---- names ----------------------------------------------------------------------------------


def test_load_names_splits_and_vocab(tmp_path):
    path = tmp_path / "names.txt"
    words = [f"{a}{b}" for a in "abcde" for b in "xyz"] + ["Quinn"]
    path.write_text("\n".join(words) + "\n\n")
    names = load_names(path, val_fraction=0.2, test_fraction=0.25, seed=1)
    assert (len(names.train), len(names.val), len(names.test)) == (9, 3, 4)
    assert sorted(names.train + names.val + names.test) == sorted(w.lower() for w in words)
    assert names.vocab.chars == (".", "a", "b", "c", "d", "e", "i", "n", "q", "u", "x", "y", "z")
    assert names.source == str(path)
    assert load_names(path, val_fraction=0.2, test_fraction=0.25, seed=1).test == names.test


def test_make_blocks_shift_pad_and_long_words():
    vocab = CharVocab.from_words(["abc", "ab"])
    x, y = make_blocks(["ab", "abcab"], vocab, block_size=4)
    # ". a b ." -> one block; ". a b c a b ." -> two blocks of 4 targets, the second padded
    assert x.tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [1, 2, 0, 0]]
    assert y.tolist() == [[1, 2, 0, -1], [1, 2, 3, 1], [2, 0, -1, -1]]
    assert vocab.decode(x[1, 1:]) == "abc"
    with pytest.raises(ValueError, match="block_size"):
        make_blocks(["ab"], vocab, 0)
    with pytest.raises(ValueError, match="'q'"):
        vocab.encode("aq")


def test_names_blocks_dataset(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("anna\nbob\ncarl\ndave\neve\nfred\ngina\nhal\nida\njon\n")
    names = load_names(path)
    blocks = names.blocks("train", 6)
    x, y = blocks.tensors
    assert x.shape == y.shape and x.shape[1] == 6 and len(blocks) == len(names.train)
    valid = y >= 0
    assert torch.equal(x[:, 1:][valid[:, :-1]], y[:, :-1][valid[:, :-1]])  # y is x shifted by one
    with pytest.raises(ValueError, match="split"):
        names.blocks("dev", 6)


def test_names_errors_and_embedded_fallback(tmp_path, no_data_found):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_names(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        load_names(empty)
    with pytest.warns(UserWarning, match="embedded fallback"):
        names = load_names()
    assert names.source == data.EMBEDDED_SOURCE and len(names.train) > 0


def test_the_shared_data_beside_the_checkout_is_searched():
    beside_checkout = Path(__file__).resolve().parents[3] / "shared" / "data"
    assert beside_checkout in data.data_roots()
