"""SGSC_CPU_ISA: every instruction-set path of the C++ kernels that this CPU can run computes the same
bits (the packed runtime's two paths within its fp32 bound), `sgsc doctor` names the path, and a
value that is not a level is refused by name."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sgsc.ops import native

pytestmark = pytest.mark.skipif(not native.available(), reason="needs the C++ extension")

# Each level writes what its kernels compute on the same inputs; the test compares the files.
_KERNELS = textwrap.dedent(
    """
    import sys, torch, sgsc
    from sgsc.ops import native, packed
    torch.manual_seed(0)
    out = {"isa": native.cpu_isa()}
    w = torch.randn(37, 1029) * 3
    b = torch.linspace(-1, 12, 37)
    e = torch.linspace(-6, 1, 37)
    for rounding in ("floor", "nearest"):
        ww, bb, ee = (t.clone().requires_grad_() for t in (w, b, e))
        q = sgsc.fake_quantize(ww, bb, ee, rounding=rounding)
        (q * torch.randn(q.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        out[rounding] = [q.detach(), ww.grad, bb.grad, ee.grad]
    widths = torch.arange(33, dtype=torch.int32) % 33
    lo = -(2 ** (widths.long().clamp(min=1) - 1)) * (widths > 0)
    codes = ((torch.rand(33, 100, dtype=torch.float64) * 2.0 ** widths[:, None]).floor().long() + lo[:, None]).int()
    stream = sgsc.ops.pack(codes, widths)
    out["codes"], out["stream"], out["unpacked"] = codes, stream, sgsc.ops.unpack(stream, widths, 1, 100)
    weight = packed.pack_weight(torch.randint(-7, 8, (64, 300), dtype=torch.int32), torch.full((8,), 0.125))
    out["packed_linear"] = packed.packed_linear(torch.randn(5, 300), weight)
    mixed = packed.pack_weight(torch.randint(-128, 128, (64, 300), dtype=torch.int32) >> torch.arange(8).repeat(8)[:, None],
                               torch.full((64,), 0.125))  # widths 8 down to 1: every integer path and the float one
    out["packed_linear_q8"] = packed.packed_linear(torch.randn(5, 300), mixed, activations="int8")
    torch.save(out, sys.argv[1])
    """
)


def _levels() -> list[str]:
    """The levels this CPU can run, best first."""
    return list(native.ISA_LEVELS[native.ISA_LEVELS.index(native.cpu_isa_detected()):])


def _run(tmp_path, level: str) -> dict:
    path = tmp_path / f"{level}.pt"
    env = {**os.environ, "SGSC_CPU_ISA": level}
    done = subprocess.run([sys.executable, "-c", _KERNELS, str(path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(path, weights_only=True)


def test_every_level_computes_the_same_bits(tmp_path):
    levels = _levels()
    results = {level: _run(tmp_path, level) for level in levels}
    assert [results[level]["isa"] for level in levels] == levels  # each ran the level it asked for
    first = results[levels[0]]
    for level in levels[1:]:
        other = results[level]
        for key in ("floor", "nearest"):
            for mine, theirs in zip(first[key], other[key]):
                assert torch.equal(mine, theirs), (level, key)
        assert torch.equal(other["unpacked"].view(33, 100), other["codes"]), level  # round trip, widths 0..32
        assert torch.equal(first["stream"], other["stream"]), level
        # avx2 and up multiply-add with FMA, the portable path in two roundings
        torch.testing.assert_close(other["packed_linear"], first["packed_linear"], rtol=1e-5, atol=1e-5)
        # int8 activations: the same x_hat on every level; the sums are exact integers where a level multiplies
        # in integers (3-, 5-, 6-bit rows only with AVX-512 VBMI) and fp32 elsewhere, so equal within fp32 rounding
        torch.testing.assert_close(other["packed_linear_q8"], first["packed_linear_q8"], rtol=1e-4, atol=1e-4)


def test_doctor_names_the_level_and_what_asked_for_it():
    lowest = native.ISA_LEVELS[-1]
    env = {**os.environ, "SGSC_CPU_ISA": lowest}
    done = subprocess.run([sys.executable, "-m", "sgsc", "doctor"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "CPU kernels ISA" in done.stdout and f"{lowest} (SGSC_CPU_ISA={lowest}; CPU supports " in done.stdout


def test_a_value_that_is_not_a_level_is_refused_by_name():
    env = {**os.environ, "SGSC_CPU_ISA": "avx1024"}
    done = subprocess.run([sys.executable, "-c", "import sgsc.ops.native"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    expected = "ValueError: SGSC_CPU_ISA must be one of avx512, avx2, sse41, scalar (or unset), got 'avx1024'"
    assert expected in done.stderr
