"""Every sgsc operator: schema, fake kernel, device kernels and autograd, declared in one place.

``torch.ops.sgsc.*`` dispatch by device: the C++ kernels of ``sgsc._C`` on CPU (the PyTorch
reference when the extension is not built), the Triton kernels of ``sgsc.kernels`` on CUDA. The
Python functions at the bottom are the public API; they check their arguments and raise
``TypeError``/``ValueError`` naming the bad one before anything reaches a kernel.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch

from sgsc import _native, reference
from sgsc.reference import ROUNDING_MODES

WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

torch.library.define(
    "sgsc::fake_quantize",
    "(Tensor w, Tensor b, Tensor e, str rounding) -> Tensor",
)
torch.library.define(
    "sgsc::fake_quantize_out",
    "(Tensor w, Tensor b, Tensor e, str rounding, Tensor(a!) out) -> ()",
)
torch.library.define(
    "sgsc::fake_quantize_backward",
    "(Tensor grad_q, Tensor w, Tensor b, Tensor e, str rounding) -> (Tensor, Tensor, Tensor)",
)


# ---- fake (meta) kernels: shapes only, so torch.compile traces the ops -----------------------


def _check_shapes(w: torch.Tensor, b: torch.Tensor, e: torch.Tensor) -> None:
    torch._check(w.dim() >= 1, lambda: "w must have at least one dimension")
    torch._check(b.dim() == 1, lambda: f"b must be 1-D, got shape {tuple(b.shape)}")
    torch._check(e.shape == b.shape, lambda: f"e must have b's shape {tuple(b.shape)}, got {tuple(e.shape)}")
    torch._check(b.shape[0] > 0, lambda: "b must have at least one group")
    torch._check(
        w.shape[0] % b.shape[0] == 0,
        lambda: f"{b.shape[0]} groups do not divide w's first dimension {w.shape[0]}",
    )


@torch.library.register_fake("sgsc::fake_quantize")
def _fake_quantize_fake(w, b, e, rounding):
    _check_shapes(w, b, e)
    return torch.empty_like(w, memory_format=torch.contiguous_format)


@torch.library.register_fake("sgsc::fake_quantize_out")
def _fake_quantize_out_fake(w, b, e, rounding, out):
    _check_shapes(w, b, e)
    torch._check(out.shape == w.shape, lambda: f"out must have w's shape {tuple(w.shape)}")


@torch.library.register_fake("sgsc::fake_quantize_backward")
def _fake_quantize_backward_fake(grad_q, w, b, e, rounding):
    _check_shapes(w, b, e)
    return (
        torch.empty_like(w, memory_format=torch.contiguous_format),
        torch.empty_like(b),
        torch.empty_like(e),
    )


# ---- autograd ------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    w, b, e, rounding = inputs
    ctx.rounding = rounding
    if any(ctx.needs_input_grad[:3]):
        ctx.save_for_backward(w, b, e)


def _backward(ctx, grad_q):
    w, b, e = ctx.saved_tensors
    grad_w, grad_b, grad_e = torch.ops.sgsc.fake_quantize_backward(grad_q, w, b, e, ctx.rounding)
    needs = ctx.needs_input_grad
    return (grad_w if needs[0] else None, grad_b if needs[1] else None, grad_e if needs[2] else None, None)


torch.library.register_autograd("sgsc::fake_quantize", _backward, setup_context=_setup_context)


# ---- CUDA: Triton kernels, imported on first use -------------------------------------------


@functools.cache
def _triton_kernels():
    try:
        return importlib.import_module("sgsc.kernels.fake_quantize")
    except ImportError as exc:
        raise RuntimeError(
            "sgsc's CUDA kernels need Triton, which could not be imported "
            f"({type(exc).__name__}: {exc}); install it with `pip install triton`"
        ) from exc


@torch.library.register_kernel("sgsc::fake_quantize", "cuda")
def _fake_quantize_cuda(w, b, e, rounding):
    q = torch.empty_like(w, memory_format=torch.contiguous_format)
    _triton_kernels().forward(w, b, e, rounding, q)
    return q


@torch.library.register_kernel("sgsc::fake_quantize_out", "cuda")
def _fake_quantize_out_cuda(w, b, e, rounding, out):
    _triton_kernels().forward(w, b, e, rounding, out)


@torch.library.register_kernel("sgsc::fake_quantize_backward", "cuda")
def _fake_quantize_backward_cuda(grad_q, w, b, e, rounding):
    return _triton_kernels().backward(grad_q, w, b, e, rounding)


# ---- CPU without the C++ extension: the reference stands in ---------------------------------


def check_finite_params(b: torch.Tensor, e: torch.Tensor) -> None:
    """Raise ``ValueError`` for NaN/Inf in ``b`` or ``e``: eq. (1) would silently clamp to nothing."""
    for name, values in (("b", b), ("e", e)):
        bad = (~torch.isfinite(values)).nonzero()
        if bad.numel():
            group = int(bad[0, 0])
            raise ValueError(f"sgsc.fake_quantize: {name} must be finite, found {values[group].item()} at group {group}")


def _reference_forward(w, b, e, rounding):
    check_finite_params(b, e)
    with torch.no_grad():
        return reference.fake_quantize(w, b, e, rounding).contiguous()


def _reference_backward(grad_q, w, b, e, rounding):
    check_finite_params(b, e)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (w, b, e)]
        q = reference.fake_quantize(*leaves, rounding)
        return torch.autograd.grad(q, leaves, grad_q)


if not _native.available():
    warnings.warn(
        f"sgsc: C++ kernels unavailable ({_native.load_error}); CPU ops fall back to the PyTorch reference",
        RuntimeWarning,
        stacklevel=2,
    )
    torch.library.register_kernel("sgsc::fake_quantize", "cpu", _reference_forward)
    torch.library.register_kernel("sgsc::fake_quantize_backward", "cpu", _reference_backward)

    @torch.library.register_kernel("sgsc::fake_quantize_out", "cpu")
    def _fake_quantize_out_reference(w, b, e, rounding, out):
        out.copy_(_reference_forward(w, b, e, rounding))


# ---- public API ----------------------------------------------------------------------------


def validate_quantizer_args(w: torch.Tensor, b: torch.Tensor, e: torch.Tensor, rounding: str) -> None:
    """Check everything about the arguments that is known without reading tensor values."""
    for name, value in (("w", w), ("b", b), ("e", e)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if w.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"w must be float32, float16 or bfloat16, got {w.dtype}")
    for name, value in (("b", b), ("e", e)):
        if value.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {value.dtype}")
    if w.dim() < 1:
        raise ValueError("w must have at least one dimension (rows are grouped along dim 0)")
    if b.dim() != 1 or b.shape[0] == 0:
        raise ValueError(f"b must be a non-empty 1-D tensor of per-group bit depths, got shape {tuple(b.shape)}")
    if e.shape != b.shape:
        raise ValueError(f"e must have the same shape as b {tuple(b.shape)}, got {tuple(e.shape)}")
    if w.shape[0] % b.shape[0] != 0:
        raise ValueError(f"b has {b.shape[0]} groups, which do not divide w's first dimension {w.shape[0]}")
    if not (w.device == b.device == e.device):
        raise ValueError(f"w, b and e must be on one device, got {w.device}, {b.device} and {e.device}")
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")


def fake_quantize(
    w: torch.Tensor,
    b: torch.Tensor,
    e: torch.Tensor,
    *,
    rounding: str = "nearest",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize ``w`` per group of rows with learnable bit depths ``b`` and exponents ``e``.

    ``q = 2^e * round(clamp(2^-e * w, -2^(b-1), 2^(b-1) - 1))`` (eq. 1 of the paper; ``rounding``
    is ``"nearest"``, half to even, or ``"floor"`` as the paper writes it), with ``b`` and ``e`` of
    shape ``(G,)`` and group ``g`` covering rows ``[g*O/G, (g+1)*O/G)`` of ``w``. Groups with
    ``b <= 0`` are pruned to exact zeros. Gradients to ``w``, ``b`` and ``e`` follow the
    straight-through estimator. NaN in ``w`` propagates to ``q``; NaN/Inf in ``b`` or ``e`` is a
    ``ValueError`` on CPU and, on CUDA where checking would cost a device sync, turns that group of
    ``q`` into NaN. ``out`` (no autograd) receives the result in place.
    """
    validate_quantizer_args(w, b, e, rounding)
    if out is None:
        return torch.ops.sgsc.fake_quantize(w, b, e, rounding)
    if not isinstance(out, torch.Tensor) or out.shape != w.shape or out.dtype != w.dtype or out.device != w.device:
        raise ValueError("out must be a tensor with w's shape, dtype and device")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    torch.ops.sgsc.fake_quantize_out(w, b, e, rounding, out)
    return out
