# SPDX-License-Identifier: Apache-2.0
"""CPU integration tests against the installed SGLang (0.5.17): MosaicKV parts driven by SGLang's own classes.

Without CUDA the Triton kernels (ours and SGLang's paged allocator kernels) run in Triton's interpreter, which must
be switched on before any ``@triton.jit`` function is created, so it is set here at import time (``setdefault``: an
explicit setting wins). The interpreter's bf16 is broken, so these tests use fp16.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # Triton's interpreter turns 1-element arrays into loop bounds via __index__, which NumPy >= 1.25 deprecates.
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0:DeprecationWarning")
