"""The exported ModelProto made smaller, in place: narrow codes retyped, debugging records dropped.

After ``torch.onnx.export``: :func:`_retype_narrow_codes` stores the int8 codes that fit 4 or 2 bits
as INT4/INT2 (torch has no such dtypes), :func:`strip_debug_info` drops node names, stack traces and
intermediate shapes and shortens intermediate value names, :func:`_narrow_gather_indices` stores
the group orders as int32.
"""

from __future__ import annotations

import torch

from sgsc.export import codec
from sgsc.export.onnx_op import onnx_integer_type


def _retype_narrow_codes(proto, opset: int) -> None:
    """Retype the int8 codes of each ``DequantizeLinear`` that fit INT4 (or INT2) to that type, in place."""
    import ml_dtypes
    from onnx import numpy_helper

    narrow = {"INT2": ml_dtypes.int2, "INT4": ml_dtypes.int4}
    initializers = {init.name: init for init in proto.graph.initializer}
    retyped = set()
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers or node.input[0] in retyped:
            continue
        init = initializers[node.input[0]]
        values = numpy_helper.to_array(init)
        if values.dtype.name != "int8":
            continue
        width = int(codec.minimal_widths(torch.tensor([[int(values.min()), int(values.max())]])).max())
        onnx_type = onnx_integer_type(max(width, 1), opset)
        if onnx_type in narrow:
            init.CopyFrom(numpy_helper.from_array(values.astype(narrow[onnx_type]), init.name))
            retyped.add(init.name)


def strip_debug_info(proto) -> None:
    """Drop what the exporter records for debugging, in place: node names, each node's stack trace and
    module path (``metadata_props``, ``doc_string``), the exported program's signature and the
    intermediate shapes (``value_info``, which onnxruntime infers again). For the zoo models they
    are 2-5x the weights' bytes."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        node.name = ""
    del proto.graph.value_info[:]
    del proto.graph.metadata_props[:]
    _shorten_intermediate_names(proto)


def _shorten_intermediate_names(proto) -> None:
    """Rename the values that flow between nodes to short ids, in place; graph inputs, outputs and
    initializers keep their names. The exporter's names (module paths and op names) were about a
    tenth of a small model's file."""
    keep = {v.name for v in (*proto.graph.input, *proto.graph.output)} | {i.name for i in proto.graph.initializer}
    renamed: dict[str, str] = {}
    for node in proto.graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name and name not in keep:
                    names[i] = renamed.setdefault(name, f"t{len(renamed):x}")


def _narrow_gather_indices(proto) -> None:
    """Store the group orders of the width classes as int32, in place: the exporter widens ``index_select``'s
    indices to int64, twice the bytes, and ``Gather`` takes either."""
    from onnx import numpy_helper

    consumers: dict[str, set[str]] = {}
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, set()).add(f"{node.op_type}:{i}")
    for init in proto.graph.initializer:
        if init.data_type == onnx_tensor_type("INT64") and consumers.get(init.name) == {"Gather:1"}:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype("int32"), init.name))


def onnx_tensor_type(name: str) -> int:
    from onnx import TensorProto

    return getattr(TensorProto, name)
