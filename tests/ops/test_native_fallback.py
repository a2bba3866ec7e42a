"""Native code is optional: without sgsc._C the CPU ops run on the reference, and the GPU path
fails with a reason when Triton is missing."""

import subprocess
import sys
import textwrap

import pytest
import torch

from sgsc import ops
from sgsc.ops import library
from sgsc.ops import native as _native

_WITHOUT_EXTENSION = textwrap.dedent(
    """
    import importlib.abc, sys, warnings

    class HideExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "sgsc._C":
                raise ImportError("hidden by the test")
            return None

    sys.meta_path.insert(0, HideExtension())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch, sgsc
        from sgsc.ops import native as _native
        from sgsc.ops import reference
    assert not _native.available() and "hidden by the test" in _native.load_error
    assert any("fall back to the PyTorch reference" in str(w.message) for w in caught)
    w = torch.randn(6, 10, requires_grad=True)
    b = torch.tensor([0.0, 3.0, 8.0], requires_grad=True)
    e = torch.tensor([0.0, -2.0, -5.0], requires_grad=True)
    q = sgsc.fake_quantize(w, b, e)
    assert torch.equal(q, reference.fake_quantize(w, b, e))
    q.sum().backward()
    assert w.grad is not None and b.grad is not None and e.grad is not None
    (grad_w,) = torch.autograd.grad(sgsc.fake_quantize(w, b, e).square().sum(), w, create_graph=True)
    try:
        grad_w.sum().backward()
    except NotImplementedError as exc:
        assert "double backward" in str(exc)
    else:
        raise AssertionError("double backward allowed without an autograd of the backward op")
    try:
        sgsc.fake_quantize(w, torch.tensor([1.0, float("nan"), 1.0]), e.detach())
    except ValueError as exc:
        assert "b must be finite" in str(exc)
    else:
        raise AssertionError("NaN bits accepted")
    print("fallback ok")
    """
)


def test_cpu_ops_fall_back_to_the_reference_without_the_extension():
    result = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


def test_gpu_path_explains_a_missing_triton(monkeypatch):
    def no_triton(name, *args, **kwargs):
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(library.importlib, "import_module", no_triton)
    with pytest.raises(RuntimeError, match="need Triton.*pip install triton"):
        library._triton_module.__wrapped__("fake_quantize")


def test_out_variant_rejects_a_mismatched_out():
    w, b, e = torch.randn(4, 3), torch.ones(4), torch.zeros(4)
    with pytest.raises(ValueError, match="out must hold 12 elements on cpu .w's shape"):
        ops.fake_quantize(w, b, e, out=torch.empty(4, 2))
    with pytest.raises(ValueError, match="out must be contiguous"):
        ops.fake_quantize(w, b, e, out=torch.empty(3, 4).t())


OPS = ("fake_quantize", "fake_quantize_backward", "fake_quantize_out", "pack", "unpack", "unpack_out",
       "unpack_dequantize", "unpack_dequantize_out", "nonzero_select", "nonzero_expand", "packed_linear",
       "packed_dequantize", "packed_dequantize_out")


@pytest.mark.parametrize("op", OPS)
def test_the_reference_is_every_ops_default_kernel_and_the_cpp_one_serves_the_cpu(op):
    import sgsc.ops.packed  # noqa: F401  (registers the packed runtime's ops)

    qualname = f"sgsc::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CompositeExplicitAutograd")  # any device
    table = torch._C._dispatch_dump_table(qualname)
    cpu = next(line for line in table.splitlines() if line.startswith("CPU:"))
    if _native.available():
        assert "csrc/" in cpu, cpu
