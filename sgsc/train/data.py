"""Data readers: MNIST-format (IDX) images, scikit-learn's digits, and a names corpus.

Nothing is ever downloaded. Files are looked for, in order, where the caller says, under the
directory in ``$SGSC_DATA_DIR``, then in ``shared/data`` beside the repository checkout
(``<repo>/../shared/data``). Vision data falls back to scikit-learn's bundled 8x8 digits, so a fresh
install always runs; the names corpus falls back to a tiny embedded list that is clearly marked.

Every split is seeded and validation sets are carved from the training data: experiments tune on
``val`` and report ``test``, never tune on it.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from sgsc._deps import require

DATA_DIR_ENV = "SGSC_DATA_DIR"
# <checkout>/../shared/data: this file is <checkout>/sgsc/train/data.py
_REPO_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"

# ---- IDX ------------------------------------------------------------------------------------

# IDX type byte -> big-endian dtype of the payload (the format of LeCun's MNIST files).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):  # judged by content, not by the .gz suffix
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: corrupt gzip data ({exc})") from exc


def parse_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes: magic ``00 00 <type> <ndim>``, ``ndim`` big-endian uint32 sizes, payload.

    Raises ``ValueError`` naming ``source`` on a bad magic number, an unknown type, or a payload
    whose length does not match the header.
    """
    if len(raw) < 4 or raw[0:2] != b"\x00\x00":
        raise ValueError(f"{source}: not an IDX file (magic number {raw[:4].hex() or 'missing'})")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{source}: unknown IDX data type 0x{type_code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{source}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions declared)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{source}: IDX payload is {len(raw) - header} bytes but shape {shape} of {dtype} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw) into a native-endian NumPy array."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


# ---- where data lives -----------------------------------------------------------------------


def data_roots() -> list[Path]:
    """Directories searched when no path is given: ``$SGSC_DATA_DIR``, then the repo's shared data."""
    roots = []
    if os.environ.get(DATA_DIR_ENV):
        roots.append(Path(os.environ[DATA_DIR_ENV]))
    roots.append(_REPO_DATA_DIR)
    return roots


# ---- vision ---------------------------------------------------------------------------------

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_DATASETS = ("fashion-mnist", "mnist")
VISION_NAMES = ("auto", *IDX_DATASETS, "digits")


@dataclass
class VisionData:
    """Normalised ``(N, C, H, W)`` float32 images with int64 labels, split three ways."""

    name: str
    source: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: float
    std: float


def _idx_file(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{directory}: neither {stem}.gz nor {stem} exists")


def _has_idx_files(directory: Path) -> bool:
    return all((directory / f"{s}.gz").is_file() or (directory / s).is_file() for s in IDX_FILES.values())


def find_idx_dir(name: str = "fashion-mnist") -> Path | None:
    """The first of ``<root>/<name>`` or ``<root>`` holding the four IDX files, over :func:`data_roots`."""
    for root in data_roots():
        for directory in (root / name, root):
            if _has_idx_files(directory):
                return directory
    return None


def read_idx_split(directory: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_images, train_labels, test_images, test_labels)`` from an MNIST-format directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"data directory not found: {directory}")
    arrays = {key: read_idx(_idx_file(directory, stem)) for key, stem in IDX_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{directory}: {split} images {images.shape} and labels {labels.shape} do not match "
                "(expected (N, H, W) images and N labels)"
            )
    return arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"]


def _split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded ``(kept, carved)`` split of ``range(n)``, ``carved`` holding ``round(fraction * n)``."""
    order = np.random.default_rng(seed).permutation(n)
    carved = int(round(fraction * n))
    return np.sort(order[carved:]), np.sort(order[:carved])


def _check_fraction(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value}")


def _to_dataset(images: np.ndarray, labels: np.ndarray, mean: float, std: float) -> TensorDataset:
    x = torch.from_numpy(((images - mean) / std).astype(np.float32)).unsqueeze(1)
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


def _vision_data(name: str, source: str, train_x, train_y, test_x, test_y, val_fraction, seed) -> VisionData:
    kept, val = _split_indices(len(train_x), val_fraction, seed)
    # statistics of the training split only, so nothing about val/test leaks into the inputs
    mean, std = float(train_x[kept].mean()), float(train_x[kept].std())
    std = std if std > 0 else 1.0
    return VisionData(
        name=name,
        source=source,
        train=_to_dataset(train_x[kept], train_y[kept], mean, std),
        val=_to_dataset(train_x[val], train_y[val], mean, std),
        test=_to_dataset(test_x, test_y, mean, std),
        num_classes=int(max(train_y.max(), test_y.max())) + 1,
        in_channels=1,
        image_size=int(train_x.shape[-1]),
        mean=mean,
        std=std,
    )


def _load_digits(val_fraction: float, test_fraction: float, seed: int) -> VisionData:
    digits = require("sklearn.datasets", "train").load_digits()
    images = digits.images.astype(np.float32) / 16.0  # pixel values are 0..16
    labels = digits.target
    # digits has no official test split: carve one with its own seed stream, then val from the rest
    train, test = _split_indices(len(images), test_fraction, seed + 1)
    source = "sklearn.datasets.load_digits"
    return _vision_data(
        "digits", source, images[train], labels[train], images[test], labels[test], val_fraction, seed
    )


def load_vision(
    data_dir: str | os.PathLike | None = None,
    name: str = "auto",
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> VisionData:
    """Load an image classification data set, normalised with training-split statistics.

    ``name`` is ``"fashion-mnist"`` or ``"mnist"`` (the four standard IDX files, read from
    ``data_dir`` or found by :func:`find_idx_dir`), ``"digits"`` (scikit-learn's bundled 8x8
    digits) or ``"auto"``: the IDX files from ``data_dir`` when given, else Fashion-MNIST when
    found, else digits. ``val_fraction`` of the training data becomes ``val`` (seeded);
    ``test_fraction`` only applies to digits, which has no official test split.
    """
    if name not in VISION_NAMES:
        raise ValueError(f"name must be one of {VISION_NAMES}, got {name!r}")
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    if name == "digits":
        if data_dir is not None:
            raise ValueError("data_dir only applies to IDX data sets; digits ships with scikit-learn")
        return _load_digits(val_fraction, test_fraction, seed)
    idx_name = "fashion-mnist" if name == "auto" else name
    directory = Path(data_dir) if data_dir is not None else find_idx_dir(idx_name)
    if directory is None:
        if name == "auto":
            return _load_digits(val_fraction, test_fraction, seed)
        searched = ", ".join(str(r / idx_name) for r in data_roots())
        raise FileNotFoundError(
            f"{name} IDX files not found (searched {searched}); pass data_dir or set ${DATA_DIR_ENV}"
        )
    train_x, train_y, test_x, test_y = read_idx_split(directory)
    scale = np.float32(255.0)  # IDX image files hold 0..255 bytes
    return _vision_data(
        idx_name, str(directory), train_x / scale, train_y, test_x / scale, test_y, val_fraction, seed
    )


# ---- names ----------------------------------------------------------------------------------

END_TOKEN = "."

# Only for smoke tests on an install without the corpus: far too small to learn names from.
EMBEDDED_NAMES = (
    "emma olivia ava isabella sophia charlotte mia amelia harper evelyn abigail emily elizabeth mila ella "
    "avery sofia camila aria scarlett victoria madison luna grace chloe penelope layla riley zoey nora lily "
    "liam noah william james oliver benjamin elijah lucas mason logan alexander ethan jacob michael daniel "
    "henry jackson sebastian aiden matthew samuel david joseph carter owen wyatt john jack luke jayden"
).split()
EMBEDDED_SOURCE = "embedded fallback (64 names, smoke tests only)"


@dataclass(frozen=True)
class CharVocab:
    """Characters to ids; id 0 is the end token, which also starts every sequence."""

    chars: tuple[str, ...]

    @classmethod
    def from_words(cls, words: list[str]) -> CharVocab:
        chars = sorted(set("".join(words)))
        if END_TOKEN in chars:
            raise ValueError(f"words may not contain the end token {END_TOKEN!r}")
        return cls((END_TOKEN, *chars))

    @property
    def size(self) -> int:
        return len(self.chars)

    @property
    def end(self) -> int:
        return 0

    @functools.cached_property
    def stoi(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.chars)}

    def encode(self, word: str) -> list[int]:
        """Character ids of ``word`` (no end tokens); ``ValueError`` on a character not in the vocab."""
        try:
            return [self.stoi[c] for c in word]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} of {word!r} is not in the vocabulary") from None

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Characters of ``ids``, stopping at the first end token."""
        out = []
        for i in [int(i) for i in ids]:
            if i == self.end:
                break
            out.append(self.chars[i])
        return "".join(out)


@dataclass
class NamesData:
    """A names corpus split into train/val/test words, with the vocabulary of all of them."""

    train: list[str]
    val: list[str]
    test: list[str]
    vocab: CharVocab
    source: str

    def blocks(self, split: str, block_size: int) -> TensorDataset:
        """``(context, target)`` blocks of one split; see :func:`make_blocks`."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        return TensorDataset(*make_blocks(getattr(self, split), self.vocab, block_size))


IGNORE_INDEX = -1


def make_blocks(words: list[str], vocab: CharVocab, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-character training blocks: ``x`` and ``y`` int64 of shape ``(N, block_size)``.

    Each word becomes the sequence ``. w o r d .``; ``x`` holds it and ``y`` the same shifted by
    one, so ``y[t]`` is the character following ``x[:t+1]`` and the final target is the end token.
    Short sequences are padded (``x`` with the end token, ``y`` with ``IGNORE_INDEX`` = -1, the
    ``ignore_index`` to give ``cross_entropy``). A word longer than ``block_size - 1`` characters
    spans several blocks, each scoring its own targets once, with the context cut at block edges.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    xs, ys = [], []
    for word in words:
        sequence = [vocab.end, *vocab.encode(word), vocab.end]
        for start in range(0, len(sequence) - 1, block_size):
            chunk = sequence[start : start + block_size + 1]
            x = chunk[:-1] + [vocab.end] * (block_size + 1 - len(chunk))
            y = chunk[1:] + [IGNORE_INDEX] * (block_size + 1 - len(chunk))
            xs.append(x)
            ys.append(y)
    if not xs:
        return torch.zeros(0, block_size, dtype=torch.int64), torch.zeros(0, block_size, dtype=torch.int64)
    return torch.tensor(xs, dtype=torch.int64), torch.tensor(ys, dtype=torch.int64)


def _read_words(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"names file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc
    words = [line.strip().lower() for line in text.splitlines() if line.strip()]
    if not words:
        raise ValueError(f"{path}: no names (the file is empty)")
    return words


def find_names_file() -> Path | None:
    """``names.txt`` in the first of :func:`data_roots` that has one."""
    for root in data_roots():
        if (root / "names.txt").is_file():
            return root / "names.txt"
    return None


def load_names(
    path: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> NamesData:
    """Read a names corpus (one name per line, lower-cased) and split it, seeded, three ways.

    Without ``path`` it uses :func:`find_names_file`, and when that finds nothing the tiny embedded
    list, with a warning and ``source`` set to say so. The vocabulary covers every split, so val
    and test never hold an unknown character.
    """
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    resolved = Path(path) if path is not None else find_names_file()
    if resolved is None:
        warnings.warn(f"sgsc: no names.txt found; using the {EMBEDDED_SOURCE}", stacklevel=2)
        words, source = list(EMBEDDED_NAMES), EMBEDDED_SOURCE
    else:
        words, source = _read_words(resolved), str(resolved)
    vocab = CharVocab.from_words(words)
    order = np.random.default_rng(seed).permutation(len(words))
    n_test, n_val = int(round(test_fraction * len(words))), int(round(val_fraction * len(words)))
    pick = lambda idx: [words[i] for i in idx]  # noqa: E731 - keeps the three splits on one line each
    return NamesData(
        train=pick(order[n_test + n_val :]),
        val=pick(order[n_test : n_test + n_val]),
        test=pick(order[:n_test]),
        vocab=vocab,
        source=source,
    )
