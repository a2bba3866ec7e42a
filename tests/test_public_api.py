"""The public API: every advertised name imports, the layers import only downward, optional extras are named."""

import importlib
import subprocess
import sys
import textwrap

import pytest

import sgsc
from sgsc._deps import require

SUBPACKAGES = ("sgsc.ops", "sgsc.nn", "sgsc.export", "sgsc.train", "sgsc.cli")


@pytest.mark.parametrize("name", sgsc.__all__)
def test_every_top_level_name_resolves(name):
    assert getattr(sgsc, name) is not None


@pytest.mark.parametrize("package", SUBPACKAGES[:-1])
def test_every_subpackage_name_resolves(package):
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'fake_quantise'"):
        sgsc.fake_quantise  # noqa: B018


def test_top_level_names_are_the_subpackages_objects():
    assert sgsc.fake_quantize is sgsc.ops.fake_quantize
    assert sgsc.quantize_model is sgsc.nn.quantize_model
    assert sgsc.load_packed is sgsc.export.load_packed
    assert sgsc.TrainConfig is sgsc.train.TrainConfig


# Each layer may import the ones before it and none after (docs/ARCHITECTURE.md).
_LAYER_IMPORTS = textwrap.dedent(
    """
    import sys
    import {module}
    loaded = sorted({{name.split(".")[1] for name in sys.modules if name.startswith("sgsc.")}})
    print(",".join(loaded))
    """
)


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("sgsc", set()),
        ("sgsc.ops", {"ops", "_C"}),
        ("sgsc.nn", {"ops", "_C", "nn"}),
        ("sgsc.export", {"ops", "_C", "nn", "export", "_io"}),
        ("sgsc.train", {"ops", "_C", "nn", "export", "_io", "_deps", "train"}),
    ],
)
def test_a_layer_imports_no_layer_above_it(module, allowed):
    done = subprocess.run([sys.executable, "-c", _LAYER_IMPORTS.format(module=module)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = set(filter(None, done.stdout.strip().split(",")))
    assert loaded <= allowed, f"importing {module} loaded {sorted(loaded - allowed)}"


def test_a_missing_optional_dependency_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # an entry of None makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'sgsc\[train\]'"):
        require("tqdm", "train")
