# SPDX-License-Identifier: Apache-2.0
"""Shared setup of the compressed-pool tests.

Without CUDA the pack/decode kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` must be set before any
``@triton.jit`` function is created, i.e. before ``mosaickv_sglang.kernels`` (and so ``mosaickv_sglang.pool``) is
imported, so it is set here at import time (``setdefault``: an explicit setting wins). The interpreter's bf16 is
broken, so these CPU tests use fp16.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# --import-mode=importlib puts no test folder on sys.path; the scenario builders in mkv_pool_cases.py (uniquely
# named to avoid clashes) are imported by name from this folder.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda") if ON_GPU else torch.device("cpu")


def pytest_configure(config):
    # Triton's interpreter turns 1-element arrays into loop bounds via __index__, which NumPy >= 1.25 deprecates.
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.fixture
def device() -> torch.device:
    """Where the store lives: the GPU when there is one, else the CPU (Triton interpreter)."""
    return DEVICE
