"""`sgsc inspect`: per-layer widths, bytes and totals of a packed model file."""

from __future__ import annotations

import importlib

from torch import nn

from sgsc import export

MAX_BYTES_HELP = "refuse a model that would need more memory than this (default: 64 MiB + 256 x the file's size)"


MODEL_HELP = ("pkg.module:factory, a zero-argument callable returning the float architecture the file was saved "
              "from (before quantize_model and pruning); needed for files of models outside the zoo")


def architecture(spec: str | None) -> nn.Module | None:
    """The model ``--model pkg.module:factory`` builds; imported only when the flag is given."""
    if spec is None:
        return None
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--model {spec!r}: expected pkg.module:factory")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except ImportError as exc:
        raise ValueError(f"--model {spec!r}: cannot import {module_name}: {exc}") from None
    except AttributeError:
        raise ValueError(f"--model {spec!r}: {module_name} has no attribute {attribute!r}") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec!r}: the factory returned a {type(model).__name__}, not an nn.Module")
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes a loaded model keeps for its quantized layers' weights: float tensors, or packed codes and tables."""
    from sgsc.nn.packed import packed_weight_bytes

    packed = packed_weight_bytes(model)
    floats = sum(module.weight.numel() * module.weight.element_size() for module in model.modules()
                 if isinstance(module, (nn.Linear, nn.Conv2d)))
    return packed + floats


def _inspect(args) -> int:
    from sgsc.nn.packed import workspace_bytes

    print(export.format_summary(export.summarize(args.file, max_bytes=args.max_bytes)))
    if "model" not in export.read_header(args.file):  # reading the file needs no architecture; loading it does
        return 0
    packed = export.load_packed(args.file, runtime="packed", max_bytes=args.max_bytes)
    float_model = export.load_packed(args.file, max_bytes=args.max_bytes)
    print(f"resident weights when loaded: {weight_bytes(packed)} bytes on the packed runtime (codes and tables, plus "
          f"{workspace_bytes(packed)} bytes of one dequantization buffer per thread that convolutions and small linear layers "
          f"share), {weight_bytes(float_model)} "
          "bytes on the float runtime")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="per-layer widths, bytes and totals of a packed model file")
    parser.add_argument("file", help="a .sgsc file written by `sgsc export`")
    parser.add_argument("--max-bytes", type=int, help=MAX_BYTES_HELP)
    parser.set_defaults(func=_inspect)
