"""The exporter layer: the packed file of integer weights, written, read back, inspected.

- :mod:`~sgsc.export.codec`: one layer's codes as bytes, each group dense or sparse;
- :mod:`~sgsc.export.format`: names, versions, header checks, where each layer sits;
- :mod:`~sgsc.export.record`: the architecture record of a file for any model (format version 4);
- :mod:`~sgsc.export.architecture`: the architecture of a file on the meta device: a zoo model rebuilt, or
  the user's float architecture quantized and cut to the file's record;
- :mod:`~sgsc.export.writer`: ``save_packed``;
- :mod:`~sgsc.export.packed_file`: a file read and checked, header first;
- :mod:`~sgsc.export.reader`: ``load_packed``, ``read_header``;
- :mod:`~sgsc.export.inspect`: ``summarize``, ``format_summary`` (`sgsc inspect`);
- :mod:`~sgsc.export.onnx`: ``export_onnx``, the model as ONNX with integer weights (the ``[onnx]`` extra),
  imported on first use since it loads ``torch.onnx`` (its op, twin and ModelProto surgery: ``onnx_op``,
  ``onnx_twin``, ``onnx_proto``).

The file is a safetensors file (no pickle: loading can never run code); docs/FORMAT.md specifies it.
Imports :mod:`sgsc.ops` and :mod:`sgsc.nn` only.
"""

from sgsc.export.format import CODES, FORMAT_NAME, FORMAT_VERSION, HEADER_CRC_TENSOR, PackedFileError
from sgsc.export.inspect import LayerSummary, PackedSummary, format_summary, summarize
from sgsc.export.reader import float_layer, load_packed, read_header
from sgsc.export.record import ArchitectureMismatch
from sgsc.export.writer import build_packed_state, integer_codes, save_packed


def __getattr__(name: str):
    if name == "export_onnx":
        from sgsc.export.onnx import export_onnx

        return export_onnx
    raise AttributeError(f"module 'sgsc.export' has no attribute {name!r}")


__all__ = [
    "ArchitectureMismatch",
    "CODES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HEADER_CRC_TENSOR",
    "LayerSummary",
    "PackedFileError",
    "PackedSummary",
    "build_packed_state",
    "export_onnx",
    "float_layer",
    "format_summary",
    "integer_codes",
    "load_packed",
    "read_header",
    "save_packed",
    "summarize",
]
