# SPDX-License-Identifier: Apache-2.0
"""Shared setup of the kernel tests.

Without CUDA the kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` must be set before any ``@triton.jit``
function is created, i.e. before ``mosaickv_sglang.kernels`` is imported, so it is set here at import time
(``setdefault``: an explicit setting wins). The interpreter's bf16 is broken, so bf16 cases are GPU-only.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The project runs pytest with --import-mode=importlib, which puts no test folder on sys.path; the seeded case
# builders in mkv_kernel_cases.py (uniquely named to avoid clashes) are imported by name from this folder.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402

# Tolerances of kernel vs float64 reference, keyed by the dtype the kernel computes its products in (the q dtype
# for attention). fp16/bf16 round P (softmax probabilities) to 16 bits before P @ V; fp32 uses IEEE dots.
TOLERANCES = {
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
}

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda") if ON_GPU else torch.device("cpu")


def pytest_configure(config):
    # Triton's interpreter turns 1-element arrays into loop bounds via __index__, which NumPy >= 1.25 deprecates.
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.fixture
def device() -> torch.device:
    """Where the kernel tests run: the GPU when there is one, else the CPU (Triton interpreter)."""
    return DEVICE


@pytest.fixture
def tol():
    """``tol(dtype) -> dict(atol=..., rtol=...)`` from :data:`TOLERANCES`."""
    return lambda dtype: TOLERANCES[dtype]
