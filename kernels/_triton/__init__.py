# SPDX-License-Identifier: Apache-2.0
"""``@triton.jit`` code only; the launchers live one level up (``mosaickv_sglang.kernels.<op>``)."""
