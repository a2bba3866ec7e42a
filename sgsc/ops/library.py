"""Every sgsc operator's registration: schema, fake kernel, device kernels and autograd, in one place.

``torch.ops.sgsc.*`` dispatch by device: the C++ kernels of ``sgsc._C`` on CPU (the PyTorch
reference when the extension is not built), the Triton kernels of ``sgsc.kernels`` on CUDA.
Importing this module registers them; :mod:`sgsc.ops.functional` holds the public wrappers, which
check their arguments before anything reaches a kernel.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch

from sgsc.ops import native as _native
from sgsc.ops import reference
from sgsc.ops.spec import MAX_EXPONENT

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
    # A meta b/e beside a real w dispatches here, not to w's kernel: without this the op would return
    # an uninitialised tensor on w's device.
    torch._check_value(
        b.device == w.device and e.device == w.device,
        lambda: f"sgsc.fake_quantize: w, b and e must be on one device, got {w.device}, {b.device} and {e.device}",
    )
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
    torch._check_value(grad_q.device == w.device,
                       lambda: f"sgsc.fake_quantize backward: grad_q is on {grad_q.device}, w on {w.device}")
    return (
        torch.empty_like(w, memory_format=torch.contiguous_format),
        torch.empty_like(b),
        torch.empty_like(e),
    )


# ---- autograd ------------------------------------------------------------------------------
#
# One straight-through backward for every device and for the reference: the C++ extension is built on
# the LibTorch stable ABI, which has no C++ autograd, so the gradient is attached here whether or not
# it loaded.


def _setup_context(ctx, inputs, output):
    w, b, e, rounding = inputs
    ctx.rounding = rounding
    if any(ctx.needs_input_grad[:3]):
        ctx.save_for_backward(w, b, e)


class _BackwardOnce(torch.autograd.Function):
    """The backward op under create_graph=True: its gradients are linear in grad_q, and the op has no
    autograd of its own, so a graph through it would differentiate as if it were constant (silently
    wrong). First-order gradients still come, and any attempt to differentiate them is an error."""

    @staticmethod
    def forward(ctx, grad_q, w, b, e, rounding):
        return torch.ops.sgsc.fake_quantize_backward(grad_q, w, b, e, rounding)

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            "sgsc.fake_quantize: double backward (differentiating its gradients, e.g. create_graph=True) "
            "is not supported"
        )


def _backward(ctx, grad_q):
    w, b, e = ctx.saved_tensors
    backward = _BackwardOnce.apply if torch.is_grad_enabled() else torch.ops.sgsc.fake_quantize_backward
    grad_w, grad_b, grad_e = backward(grad_q, w, b, e, ctx.rounding)
    needs = ctx.needs_input_grad
    return (grad_w if needs[0] else None, grad_b if needs[1] else None, grad_e if needs[2] else None, None)


torch.library.register_autograd("sgsc::fake_quantize", _backward, setup_context=_setup_context)


# ---- CUDA: Triton kernels, imported on first use -------------------------------------------


@functools.cache
def _triton_module(name: str):
    """``sgsc.kernels.<name>``, imported on first CUDA use so CPU-only installs never need Triton."""
    try:
        return importlib.import_module(f"sgsc.kernels.{name}")
    except ImportError as exc:
        raise RuntimeError(
            "sgsc's CUDA kernels need Triton, which could not be imported "
            f"({type(exc).__name__}: {exc}); install it with `pip install triton`"
        ) from exc


def _triton_kernels():
    return _triton_module("fake_quantize")


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
    """``ValueError`` for NaN/Inf in ``b`` or ``e``, or ``|e| > MAX_EXPONENT``: eq. (1) would silently clamp to nothing."""
    for name, values, bound in (("b", b, None), ("e", e, MAX_EXPONENT)):
        bad = (~torch.isfinite(values)).nonzero()
        if bad.numel():
            group = int(bad[0, 0])
            raise ValueError(f"sgsc.fake_quantize: {name} must be finite, found {values[group].item()} at group {group}")
        if bound is not None:
            outside = (values.abs() > bound).nonzero()
            if outside.numel():
                group = int(outside[0, 0])
                raise ValueError(f"sgsc.fake_quantize: {name} must lie in [{-bound:g}, {bound:g}], found "
                                 f"{values[group].item()} at group {group}")


def _check_devices(w: torch.Tensor, *others: torch.Tensor) -> None:
    """The CPU kernels read every operand's values; an operand on another device (meta) has none here."""
    if any(t.device != w.device for t in others):
        raise ValueError(f"sgsc.fake_quantize: every operand must be on w's device {w.device}, got "
                         f"{[str(t.device) for t in others]}")


def _reference_forward(w, b, e, rounding):
    _check_devices(w, b, e)
    check_finite_params(b, e)
    with torch.no_grad():
        return reference.fake_quantize(w, b, e, rounding).contiguous()


def _reference_backward(grad_q, w, b, e, rounding):
    _check_devices(w, grad_q, b, e)
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

# The reference is every op's default kernel (device_types=None): it serves the CPU when the C++ build is
# missing and any device without a kernel of its own (MPS, XPU, ...), as bitsandbytes does; the C++ CPU
# kernel and the Triton CUDA kernel, registered for their own device, take precedence over it.
torch.library.register_kernel("sgsc::fake_quantize", None, _reference_forward)
torch.library.register_kernel("sgsc::fake_quantize_backward", None, _reference_backward)


@torch.library.register_kernel("sgsc::fake_quantize_out", None)
def _fake_quantize_out_reference(w, b, e, rounding, out):
    out.copy_(_reference_forward(w, b, e, rounding))


# =============================================================================================
# Bit packing: sgsc::pack / sgsc::unpack
# =============================================================================================
#
# Codes of each group stored with that group's own bit width, densely in one byte stream. The
# layout is documented with a worked example in `sgsc.ops.functional.pack`; csrc/bitpack.cpp (CPU),
# kernels/bitpack.py (Triton) and sgsc.ops.reference.pack/unpack (NumPy, the test oracle and the CPU
# fallback without the C++ build) all implement it.

torch.library.define("sgsc::pack", "(Tensor ints, Tensor widths) -> Tensor")
torch.library.define("sgsc::unpack", "(Tensor packed, Tensor widths, int rows_per_group, int row_len) -> Tensor")
torch.library.define(
    "sgsc::unpack_out",
    "(Tensor packed, Tensor widths, int rows_per_group, int row_len, Tensor(a!) out) -> ()",
)


@torch.library.register_fake("sgsc::pack")
def _pack_fake(ints, widths):
    torch._check(ints.dtype == torch.int32, lambda: f"ints must be int32, got {ints.dtype}")
    torch._check(ints.dim() >= 1, lambda: "ints must have at least one dimension")
    torch._check(widths.dim() == 1, lambda: f"widths must be 1-D, got shape {tuple(widths.shape)}")
    torch._check(widths.shape[0] > 0, lambda: "widths must have at least one group")
    torch._check(
        ints.shape[0] % widths.shape[0] == 0,
        lambda: f"{widths.shape[0]} groups do not divide ints' first dimension {ints.shape[0]}",
    )
    # The size depends on the values of widths: sum over groups of ceil(width * L / 8).
    num_bytes = torch.library.get_ctx().new_dynamic_size()
    return ints.new_empty((num_bytes,), dtype=torch.uint8)


def _check_unpack_args(packed, widths, rows_per_group, row_len):
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    torch._check(packed.dim() == 1, lambda: f"packed must be 1-D, got shape {tuple(packed.shape)}")
    torch._check(widths.dim() == 1, lambda: f"widths must be 1-D, got shape {tuple(widths.shape)}")
    torch._check(widths.shape[0] > 0, lambda: "widths must have at least one group")
    torch._check(rows_per_group >= 0, lambda: f"rows_per_group must be >= 0, got {rows_per_group}")
    torch._check(row_len >= 0, lambda: f"row_len must be >= 0, got {row_len}")


@torch.library.register_fake("sgsc::unpack")
def _unpack_fake(packed, widths, rows_per_group, row_len):
    _check_unpack_args(packed, widths, rows_per_group, row_len)
    return packed.new_empty((widths.shape[0] * rows_per_group, row_len), dtype=torch.int32)


@torch.library.register_fake("sgsc::unpack_out")
def _unpack_out_fake(packed, widths, rows_per_group, row_len, out):
    _check_unpack_args(packed, widths, rows_per_group, row_len)
    torch._check(out.dtype == torch.int32, lambda: f"out must be int32, got {out.dtype}")
    torch._check(
        out.numel() == widths.shape[0] * rows_per_group * row_len,
        lambda: f"out must have {widths.shape[0] * rows_per_group * row_len} elements, got shape {tuple(out.shape)}",
    )


def _bitpack_kernels():
    return _triton_module("bitpack")


@torch.library.register_kernel("sgsc::pack", "cuda")
def _pack_cuda(ints, widths):
    return _bitpack_kernels().pack(ints, widths)


@torch.library.register_kernel("sgsc::unpack", "cuda")
def _unpack_cuda(packed, widths, rows_per_group, row_len):
    return _bitpack_kernels().unpack(packed, widths, rows_per_group, row_len)


@torch.library.register_kernel("sgsc::unpack_out", "cuda")
def _unpack_out_cuda(packed, widths, rows_per_group, row_len, out):
    _bitpack_kernels().unpack(packed, widths, rows_per_group, row_len, out=out)


torch.library.register_kernel("sgsc::pack", None, reference.pack)  # the default kernels: see fake_quantize's
torch.library.register_kernel("sgsc::unpack", None, reference.unpack)


@torch.library.register_kernel("sgsc::unpack_out", None)
def _unpack_out_reference(packed, widths, rows_per_group, row_len, out):
    out.copy_(reference.unpack(packed, widths, rows_per_group, row_len).reshape(out.shape))


# The packed runtime's dequantization from the stream: float32 code * scales[group], the int32 codes
# never a tensor of their own (the CPU kernel unpacks a cached chunk at a time). Elsewhere (CUDA, or
# CPU without the C++ build) it is unpack followed by the multiply.
torch.library.define(
    "sgsc::unpack_dequantize",
    "(Tensor packed, Tensor widths, Tensor scales, int rows_per_group, int row_len) -> Tensor",
)
torch.library.define(
    "sgsc::unpack_dequantize_out",
    "(Tensor packed, Tensor widths, Tensor scales, int rows_per_group, int row_len, Tensor(a!) out) -> ()",
)


def _check_scales(scales, widths):
    torch._check(scales.dtype == torch.float32, lambda: f"scales must be float32, got {scales.dtype}")
    torch._check(scales.dim() == 1 and scales.shape[0] == widths.shape[0],
                 lambda: f"scales must have one scale per group ({widths.shape[0]}), got shape {tuple(scales.shape)}")


@torch.library.register_fake("sgsc::unpack_dequantize")
def _unpack_dequantize_fake(packed, widths, scales, rows_per_group, row_len):
    _check_unpack_args(packed, widths, rows_per_group, row_len)
    _check_scales(scales, widths)
    return packed.new_empty((widths.shape[0] * rows_per_group, row_len), dtype=torch.float32)


@torch.library.register_fake("sgsc::unpack_dequantize_out")
def _unpack_dequantize_out_fake(packed, widths, scales, rows_per_group, row_len, out):
    _check_unpack_args(packed, widths, rows_per_group, row_len)
    _check_scales(scales, widths)
    torch._check(out.dtype == torch.float32, lambda: f"out must be float32, got {out.dtype}")
    torch._check(
        out.numel() == widths.shape[0] * rows_per_group * row_len,
        lambda: f"out must have {widths.shape[0] * rows_per_group * row_len} elements, got shape {tuple(out.shape)}",
    )


def _unpack_then_scale(packed, widths, scales, rows_per_group, row_len):
    codes = torch.ops.sgsc.unpack(packed, widths, rows_per_group, row_len)
    return codes.to(torch.float32) * scales.repeat_interleave(rows_per_group).unsqueeze(1)


def _unpack_then_scale_out(packed, widths, scales, rows_per_group, row_len, out):
    out.copy_(_unpack_then_scale(packed, widths, scales, rows_per_group, row_len).reshape(out.shape))


torch.library.register_kernel("sgsc::unpack_dequantize", None, _unpack_then_scale)
torch.library.register_kernel("sgsc::unpack_dequantize_out", None, _unpack_then_scale_out)

# The packed runtime's small linear layers: y = x W^T + bias with W unpack_dequantize's, in one call. The CPU
# kernel (csrc/unpack_linear.cpp) decodes 8 rows of W at a time into a per-thread buffer and never writes W
# whole; its result is F.linear's within the fp32 bound of a dot product of length in_features. Elsewhere it is
# the dequantization followed by F.linear.
torch.library.define(
    "sgsc::unpack_linear",
    "(Tensor x, Tensor packed, Tensor widths, Tensor scales, int rows_per_group, int in_features, Tensor? bias) "
    "-> Tensor",
)


@torch.library.register_fake("sgsc::unpack_linear")
def _unpack_linear_fake(x, packed, widths, scales, rows_per_group, in_features, bias):
    torch._check(x.dtype == torch.float32, lambda: f"x must be float32, got {x.dtype}")
    torch._check(x.dim() >= 1 and x.shape[-1] == in_features,
                 lambda: f"x must have shape (..., {in_features}), got {tuple(x.shape)}")
    torch._check(x.device == packed.device, lambda: f"x must be on packed's device {packed.device}, got {x.device}")
    _check_unpack_args(packed, widths, rows_per_group, in_features)
    _check_scales(scales, widths)
    out_features = widths.shape[0] * rows_per_group
    torch._check(bias is None or tuple(bias.shape) == (out_features,),
                 lambda: f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    return x.new_empty((*x.shape[:-1], out_features))


def _unpack_linear_reference(x, packed, widths, scales, rows_per_group, in_features, bias):
    weight = torch.ops.sgsc.unpack_dequantize(packed, widths, scales, rows_per_group, in_features)
    return torch.nn.functional.linear(x, weight, bias)


torch.library.register_kernel("sgsc::unpack_linear", None, _unpack_linear_reference)


# =============================================================================================
# Sparse groups of the packed format: sgsc::nonzero_select / sgsc::nonzero_expand
# =============================================================================================
#
# sgsc.export.codec stores a mostly-zero group as a bitmask of its nonzero codes plus those codes. These two
# ops move between the codes and that form: csrc/nonzero.cpp on CPU, sgsc.ops.reference's NumPy twins
# (the test oracle, and the CPU kernels without the C++ build). The codec runs them on the host, so
# they have no CUDA kernel.

torch.library.define("sgsc::nonzero_select", "(Tensor codes, Tensor rows) -> Tensor")
torch.library.define("sgsc::nonzero_expand", "(Tensor masks, Tensor values, int group_len) -> Tensor")


@torch.library.register_fake("sgsc::nonzero_select")
def _nonzero_select_fake(codes, rows):
    torch._check(codes.dtype == torch.int32, lambda: f"codes must be int32, got {codes.dtype}")
    torch._check(codes.dim() == 2, lambda: f"codes must be 2-D, got shape {tuple(codes.shape)}")
    return codes.new_empty((torch.library.get_ctx().new_dynamic_size(),))


@torch.library.register_fake("sgsc::nonzero_expand")
def _nonzero_expand_fake(masks, values, group_len):
    torch._check(masks.dim() == 2 and masks.shape[1] == (group_len + 7) // 8,
                 lambda: f"masks must have ceil(group_len / 8) bytes per row, got shape {tuple(masks.shape)}")
    return values.new_empty((masks.shape[0], group_len))


torch.library.register_kernel("sgsc::nonzero_select", None, reference.nonzero_select)
torch.library.register_kernel("sgsc::nonzero_expand", None, reference.nonzero_expand)
