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
#
# With the C++ extension, csrc/fake_quantize_autograd.cpp registers the autograd of
# sgsc::fake_quantize for every device: a Python-registered backward costs more than the kernels
# on layer-sized weights. Without it, the same straight-through backward is registered here.


def _setup_context(ctx, inputs, output):
    w, b, e, rounding = inputs
    ctx.rounding = rounding
    if any(ctx.needs_input_grad[:3]):
        ctx.save_for_backward(w, b, e)


def _backward(ctx, grad_q):
    if torch.is_grad_enabled():
        # The gradients are linear in grad_q; the backward op has no autograd of its own, so a
        # graph through it would differentiate as if it were constant: silently wrong.
        raise NotImplementedError(
            "sgsc.fake_quantize: double backward (differentiating its gradients, e.g. create_graph=True) "
            "is not supported"
        )
    w, b, e = ctx.saved_tensors
    grad_w, grad_b, grad_e = torch.ops.sgsc.fake_quantize_backward(grad_q, w, b, e, ctx.rounding)
    needs = ctx.needs_input_grad
    return (grad_w if needs[0] else None, grad_b if needs[1] else None, grad_e if needs[2] else None, None)


if not _native.available():
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


# =============================================================================================
# Bit packing (issue 3): sgsc::pack / sgsc::unpack
# =============================================================================================
#
# Codes of each group stored with that group's own bit width, densely in one byte stream. The
# layout is documented with a worked example in `pack` below; csrc/bitpack.cpp (CPU),
# kernels/bitpack.py (Triton) and sgsc.reference.pack/unpack (NumPy, the test oracle and the CPU
# fallback without the C++ build) all implement it.

PACK_WIDTH_DTYPES = (torch.uint8, torch.int32, torch.int64)
MAX_PACK_WIDTH = 32

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


if not _native.available():
    # The warning about the missing extension is given once, above, for every op.
    torch.library.register_kernel("sgsc::pack", "cpu", reference.pack)
    torch.library.register_kernel("sgsc::unpack", "cpu", reference.unpack)

    @torch.library.register_kernel("sgsc::unpack_out", "cpu")
    def _unpack_out_reference(packed, widths, rows_per_group, row_len, out):
        out.copy_(reference.unpack(packed, widths, rows_per_group, row_len).reshape(out.shape))


def _validate_widths(widths: torch.Tensor) -> None:
    if not isinstance(widths, torch.Tensor):
        raise TypeError(f"widths must be a torch.Tensor, got {type(widths).__name__}")
    if widths.dtype not in PACK_WIDTH_DTYPES:
        raise TypeError(f"widths must be uint8, int32 or int64, got {widths.dtype}")
    if widths.dim() != 1 or widths.shape[0] == 0:
        raise ValueError(
            f"widths must be a non-empty 1-D tensor of per-group bit widths, got shape {tuple(widths.shape)}"
        )
    if torch.compiler.is_compiling():
        return  # value checks would break the graph; the kernels guard against bad widths themselves
    bad = ((widths < 0) | (widths > MAX_PACK_WIDTH)).nonzero()
    if bad.numel():
        group = int(bad[0, 0])
        raise ValueError(f"widths must be in [0, {MAX_PACK_WIDTH}], got {int(widths[group])} at group {group}")


def packed_group_offsets(widths: torch.Tensor, group_len: int) -> torch.Tensor:
    """Byte offset of every group's stream in :func:`pack`'s output, as an int64 ``(G + 1,)`` tensor.

    ``offsets[g] = sum_{h < g} ceil(widths[h] * group_len / 8)`` and ``offsets[G]`` is the total
    size, so group ``g``'s stream is ``packed[offsets[g]:offsets[g + 1]]`` (empty for width 0).
    ``group_len`` is the number of codes per group, ``ints.numel() // G``. On ``widths``' device.
    """
    _validate_widths(widths)
    if isinstance(group_len, bool) or not isinstance(group_len, int):
        raise TypeError(f"group_len must be an int, got {type(group_len).__name__}")
    if group_len < 0:
        raise ValueError(f"group_len must be >= 0, got {group_len}")
    sizes = (widths.to(torch.int64) * group_len + 7) // 8
    return torch.cat([sizes.new_zeros(1), torch.cumsum(sizes, 0)])


def pack(ints: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Store integer codes with one bit width per group, densely, in a uint8 byte stream.

    ``ints`` is an int32 tensor of shape ``(O, ...)`` grouped along dim 0 like the weights of
    :func:`fake_quantize`: with ``G = widths.numel()`` groups, group ``g`` is the contiguous run of
    ``L = ints.numel() / G`` codes holding rows ``[g*O/G, (g+1)*O/G)``. ``widths`` (uint8, int32 or
    int64, shape ``(G,)``, on ``ints``' device) gives each group's width ``w`` in ``[0, 32]``; every
    code must lie in ``[-2^(w-1), 2^(w-1) - 1]`` (only 0 for ``w = 0``), otherwise a ``ValueError``
    names the group. Returns a 1-D uint8 tensor of ``sum_g ceil(w_g * L / 8)`` bytes.

    Layout:

    * Group streams follow each other in group order; group ``g``'s stream starts on a byte
      boundary at ``packed_group_offsets(widths, L)[g]`` and is ``ceil(w_g * L / 8)`` bytes long.
      A group of width 0 is pruned and stores nothing.
    * Within a stream, code ``i`` occupies bits ``[i*w, (i+1)*w)`` with the low ``w`` bits of its
      two's complement, least significant bit first; stream bit ``k`` is bit ``k % 8`` (value
      ``2^(k % 8)``) of the stream's byte ``k // 8``. No padding between codes; the unused high bits
      of a group's last byte are zero.

    Worked example (pinned in ``tests/test_bitpack.py``): ``widths = [3, 0, 5]``,
    ``ints = [[1, -2], [0, 0], [-16, 13]]`` (``L = 2``)::

        group 0, w=3:  1 -> 001, -2 -> 110        stream bits 0..5 = 1,0,0 | 0,1,1
                       byte 0 = 0b00_110_001 = 0x31
        group 1, w=0:  nothing stored
        group 2, w=5:  -16 -> 10000, 13 -> 01101  stream bits 0..9 = 0,0,0,0,1 | 1,0,1,1,0
                       byte 0 = 0b101_10000 = 0xB0, byte 1 = 0b0000000_1 = 0x01
        packed  = [0x31, 0xB0, 0x01]
        offsets = packed_group_offsets(widths, 2) = [0, 1, 1, 3]

    On CPU this runs the C++ kernel (parallel over blocks of codes), on CUDA the Triton kernel,
    which needs one device sync for the output size and the range check.
    """
    if not isinstance(ints, torch.Tensor):
        raise TypeError(f"ints must be a torch.Tensor, got {type(ints).__name__}")
    if ints.dtype != torch.int32:
        raise TypeError(f"ints must be int32, got {ints.dtype}")
    _validate_widths(widths)
    if ints.dim() < 1:
        raise ValueError("ints must have at least one dimension (rows are grouped along dim 0)")
    if ints.shape[0] % widths.shape[0] != 0:
        raise ValueError(
            f"widths has {widths.shape[0]} groups, which do not divide ints' first dimension {ints.shape[0]}"
        )
    if ints.device != widths.device:
        raise ValueError(f"ints and widths must be on one device, got {ints.device} and {widths.device}")
    return torch.ops.sgsc.pack(ints, widths)


def unpack(
    packed: torch.Tensor,
    widths: torch.Tensor,
    rows_per_group: int,
    row_len: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`pack`: the int32 codes, shape ``(G * rows_per_group, row_len)``.

    ``rows_per_group * row_len`` is the group length ``L`` that :func:`pack` saw; reshape the result
    to the original ``(O, ...)`` shape (``O = G * rows_per_group``). ``packed`` must be the 1-D uint8
    stream of exactly ``packed_group_offsets(widths, L)[-1]`` bytes, on ``widths``' device. Codes
    come back sign-extended; groups of width 0 are all zeros. ``out``, a contiguous int32 tensor of
    any shape with ``G * L`` elements (the original ``(O, ...)`` shape, say), receives the codes in
    place and is returned; reusing it skips allocating (and first touching) a fresh output.
    """
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    _validate_widths(widths)
    for name, value in (("rows_per_group", rows_per_group), ("row_len", row_len)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if packed.dim() != 1:
        raise ValueError(f"packed must be 1-D, got shape {tuple(packed.shape)}")
    if packed.device != widths.device:
        raise ValueError(f"packed and widths must be on one device, got {packed.device} and {widths.device}")
    # The stream's size depends on the values of widths; under torch.compile the kernel checks it.
    expected = packed.numel()
    if not torch.compiler.is_compiling():
        expected = int(packed_group_offsets(widths, rows_per_group * row_len)[-1])
    if packed.numel() != expected:
        raise ValueError(
            f"packed must hold {expected} bytes for these widths and rows_per_group * row_len = "
            f"{rows_per_group * row_len} codes per group, got {packed.numel()}"
        )
    if out is None:
        return torch.ops.sgsc.unpack(packed, widths, rows_per_group, row_len)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != torch.int32:
        raise TypeError(f"out must be int32, got {out.dtype}")
    if out.numel() != widths.shape[0] * rows_per_group * row_len or out.device != packed.device:
        raise ValueError(
            f"out must hold {widths.shape[0] * rows_per_group * row_len} elements on {packed.device}, "
            f"got shape {tuple(out.shape)} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    torch.ops.sgsc.unpack_out(packed, widths, rows_per_group, row_len, out)
    return out


# =============================================================================================
# Sparse groups of the packed format: sgsc::nonzero_select / sgsc::nonzero_expand
# =============================================================================================
#
# sgsc.codec stores a mostly-zero group as a bitmask of its nonzero codes plus those codes. These two
# ops move between the codes and that form: csrc/nonzero.cpp on CPU, sgsc.reference's NumPy twins
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


if not _native.available():
    torch.library.register_kernel("sgsc::nonzero_select", "cpu", reference.nonzero_select)
    torch.library.register_kernel("sgsc::nonzero_expand", "cpu", reference.nonzero_expand)
