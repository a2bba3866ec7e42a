"""The command line: doctor reports the build, demo compresses, exports and reloads a model."""

import re

import pytest
import torch

from sgsc.cli import main
from sgsc.ops import native as _native


def test_doctor_reports_extension_and_isa(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^torch\s+\S+", out, re.M)
    expected = "loaded" if _native.available() else "NOT loaded"
    assert re.search(rf"^C\+\+ extension\s+{expected}", out, re.M)
    assert re.search(r"^CPU kernels ISA\s+\S+", out, re.M)
    assert re.search(r"^CPU kernels threads\s+\d+", out, re.M)


@pytest.mark.skipif(not _native.available(), reason="the C++ extension is not built")
def test_cpp_kernels_run_on_every_torch_thread():
    # A build without OpenMP compiles at::parallel_for to a serial loop, silently halving throughput here.
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _native.parallel_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_demo_compresses_exports_and_reloads_the_same_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--data", "digits", "--steps", "40", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "identical to the trained model" in printed
    assert re.search(r"^blocks\.0\.0\s+\d+x1x3x3", printed, re.M)  # the per-layer table of the packed file
    size = int(re.search(r"model\.sgsc: (\d+) bytes", printed).group(1))
    assert size == (out / "model.sgsc").stat().st_size
