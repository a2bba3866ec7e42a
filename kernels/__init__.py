"""Triton GPU kernels of sgsc, installed as ``sgsc.kernels`` and dispatched through ``sgsc.ops``."""
