"""The command line: doctor reports the build, demo runs end to end."""

import re

from sgsc import _native
from sgsc.cli import main


def test_doctor_reports_extension_and_isa(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^torch\s+\S+", out, re.M)
    expected = "loaded" if _native.available() else "NOT loaded"
    assert re.search(rf"^C\+\+ extension\s+{expected}", out, re.M)
    assert re.search(r"^CPU kernels ISA\s+\S+", out, re.M)


def test_demo_prints_one_row_per_bit_depth_with_error_growing_as_bits_fall(capsys):
    assert main(["demo", "--steps", "60"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"^\s+\d+\s+\d", line)]
    assert [int(r[0]) for r in rows] == [8, 6, 4, 3, 2]
    first_layer_error = [float(r[1]) for r in rows]
    assert first_layer_error == sorted(first_layer_error)
    assert first_layer_error[0] < 0.02
