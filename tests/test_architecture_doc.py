"""docs/ARCHITECTURE.md is true to the tree: every file a layer's row names exists in that layer's folders,
and every source file of those folders is named in its row."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (".py", ".cpp", ".h")


def _rows() -> list[tuple[str, list[str], set[str]]]:
    """``(layer, folders, files named)`` of each row of the layer table."""
    rows = []
    for line in (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[1].startswith("`"):
            continue
        folders = [name for name in re.findall(r"`([^`]+)`", cells[1]) if name.endswith("/")]
        named = {name.rsplit("/", 1)[-1] for name in re.findall(r"`([^`]+)`", cells[2]) if name.endswith(SOURCES)}
        rows.append((cells[0], folders, named))
    return rows


ROWS = _rows()


def test_the_table_covers_every_source_folder():
    folders = {folder for _, row_folders, _ in ROWS for folder in row_folders}
    assert folders == {"csrc/", "kernels/", "sgsc/ops/", "sgsc/nn/", "sgsc/export/", "sgsc/train/",
                       "sgsc/experiments/", "sgsc/cli/"}


@pytest.mark.parametrize(("layer", "folders", "named"), ROWS, ids=[row[0] for row in ROWS])
def test_a_rows_files_are_its_folders_files(layer, folders, named):
    present = {path.name for folder in folders for path in (ROOT / folder).iterdir()
               if path.suffix in SOURCES and path.name != "__init__.py"}
    assert sorted(named - present) == [], f"{layer}: named in docs/ARCHITECTURE.md, but not in {folders}"
    assert sorted(present - named) == [], f"{layer}: in {folders}, but not named in docs/ARCHITECTURE.md"
