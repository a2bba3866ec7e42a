"""Test-wide set-up: Triton kernels run in the CPU interpreter when no GPU is present; training
tests run on one torch thread.

The variable must be set before anything imports triton, which is why it lives here.
"""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `python -m pytest` puts the checkout's root on sys.path, where the Triton sources' folder `kernels/`
# (installed as sgsc.kernels) would shadow the `kernels` package transformers imports; sgsc is installed.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _ROOT]


@pytest.fixture
def one_thread():
    """One torch thread for the test: on a shared machine, two contending OpenMP threads run ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_split():
    """scikit-learn's digits as ``((train x, train y), (test x, test y))``: small data any test may train on."""
    from sgsc.train.data import load_vision

    data = load_vision(name="digits")
    return data.train.tensors, data.test.tensors


@pytest.fixture
def free_port() -> int:
    """A TCP port free on this machine now, for a test's torch.distributed rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
