"""Test-wide set-up: Triton kernels run in the CPU interpreter when no GPU is present.

The variable must be set before anything imports triton, which is why it lives here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
