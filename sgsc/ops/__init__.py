"""The op layer: eq. (1) and the bit packing, as ``torch.ops.sgsc.*`` with checked public wrappers.

- :mod:`~sgsc.ops.spec`: the shared numbers (width limit, rounding modes, byte offsets);
- :mod:`~sgsc.ops.reference`: the PyTorch twin of every kernel (oracle, fallback, baseline);
- :mod:`~sgsc.ops.native`: the guarded load of the C++ extension ``sgsc._C``;
- :mod:`~sgsc.ops.library`: schemas, fake kernels and device registrations;
- :mod:`~sgsc.ops.functional`: the public functions below.

Nothing here imports a layer above it (``sgsc.nn``, ``sgsc.train``, ``sgsc.export``).
"""

from sgsc.ops.functional import fake_quantize, pack, packed_group_offsets, unpack, validate_quantizer_args
from sgsc.ops.library import check_finite_params
from sgsc.ops.packed import PackedWeight, pack_weight, packed_dequantize, packed_linear
from sgsc.ops.spec import MAX_WIDTH, ROUNDING_MODES, WEIGHT_DTYPES

__all__ = [
    "MAX_WIDTH",
    "PackedWeight",
    "ROUNDING_MODES",
    "WEIGHT_DTYPES",
    "check_finite_params",
    "fake_quantize",
    "pack",
    "pack_weight",
    "packed_dequantize",
    "packed_group_offsets",
    "packed_linear",
    "unpack",
    "validate_quantizer_args",
]
