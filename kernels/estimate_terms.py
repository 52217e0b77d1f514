# SPDX-License-Identifier: Apache-2.0
"""Launcher of the fast error estimator's channel terms for one top-``k`` setting, in one pass over a segment's K and V.

The seal planner's estimator (``mosaickv_sglang.planner._estimate_fast``) otherwise builds them from about ten
torch ops per ``k``, each a pass over ``[N, S, d]`` fp32 tensors (masking, squaring, three batched products). The
Triton code is in ``mosaickv_sglang.kernels._triton.estimate_terms``; the oracle is
:func:`mosaickv_sglang.kernels.reference.ref_chan_terms`.

Fixed heuristics: :data:`BLOCK_S` tokens a step, ``BLOCK_M`` the menu's token counts padded to a power of two of at
least 16 (the ``tl.dot`` minimum), :data:`NUM_WARPS` warps. Not yet timed on a GPU.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton

from . import _checks
from ._triton.estimate_terms import _chan_terms_kernel

__all__ = ["chan_terms_fwd", "ESTIMATE_TERMS_HEAD_DIMS", "BLOCK_S", "NUM_WARPS"]

ESTIMATE_TERMS_HEAD_DIMS = (16, 32, 64, 128, 256)
BLOCK_S = 16
NUM_WARPS = 4


def chan_terms_fwd(
    keys: torch.Tensor,
    values: torch.Tensor,
    k_drop: torch.Tensor,
    v_drop: torch.Tensor,
    p: torch.Tensor,
    qbar: torch.Tensor,
    var_q: torch.Tensor,
    resid: torch.Tensor,
    kept: torch.Tensor,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The channel terms of one top-``k`` setting (see the Triton module's docstring for the formulas).

    Parameters
    ----------
    keys, values : torch.Tensor
        shape ``[N, S, d]``, dtype ``torch.float32``, contiguous; ``d`` a power of two in 16..256.
    k_drop, v_drop : torch.Tensor
        shape ``[N, S, d]``, dtype ``torch.bool``, contiguous: the channels outside each vector's top-k.
    p : torch.Tensor
        shape ``[N, S]``, float32: token mass.
    qbar, var_q : torch.Tensor
        shape ``[N, d]``, float32: mean query and per-channel query variance.
    resid : torch.Tensor
        shape ``[N, S]``, float32: ``||v_t - O||^2``.
    kept : torch.Tensor
        shape ``[N, M, S]``, float32: 1 for the tokens kept by each of the ``M`` token-count options.
    scale : float
        The softmax scale.

    Returns
    -------
    tuple
        ``(coh [N, S], kvar [N, M], lost_k [N, S], vvec [N, M, d], lost_v [N, S])``, float32.
    """
    _checks.check_tensor(keys, "keys", ndim=3, dtype=torch.float32, contiguous=True)
    n, s, d = keys.shape
    dev = keys.device
    if d not in ESTIMATE_TERMS_HEAD_DIMS:
        raise ValueError(f"keys: expected last dim in {ESTIMATE_TERMS_HEAD_DIMS}, got {d}")
    _checks.check_tensor(values, "values", shape=(n, s, d), dtype=torch.float32, device=dev, contiguous=True)
    for name, t in (("k_drop", k_drop), ("v_drop", v_drop)):
        _checks.check_tensor(t, name, shape=(n, s, d), dtype=torch.bool, device=dev, contiguous=True)
    for name, t, shape in (("p", p, (n, s)), ("qbar", qbar, (n, d)), ("var_q", var_q, (n, d)),
                           ("resid", resid, (n, s))):  # fmt: skip
        _checks.check_tensor(t, name, shape=shape, dtype=torch.float32, device=dev, contiguous=True)
    _checks.check_tensor(kept, "kept", ndim=3, dtype=torch.float32, device=dev, contiguous=True)
    if kept.shape[0] != n or kept.shape[1] == 0 or kept.shape[2] != s:
        raise ValueError(f"kept: expected shape [{n}, M, {s}] with M >= 1, got {list(kept.shape)}")
    m = kept.shape[1]
    coh = torch.empty(n, s, device=dev)
    lost_k = torch.empty(n, s, device=dev)
    lost_v = torch.empty(n, s, device=dev)
    kvar = torch.empty(n, m, device=dev)
    vvec = torch.empty(n, m, d, device=dev)
    if n == 0 or s == 0:
        return coh, kvar.zero_(), lost_k, vvec.zero_(), lost_v
    block_m = max(16, triton.next_power_of_2(m))
    _chan_terms_kernel[(n,)](
        keys, values, k_drop.view(torch.uint8), v_drop.view(torch.uint8), p, qbar, var_q, resid, kept,
        coh, lost_k, lost_v, kvar, vvec, s, m, float(scale),
        HEAD_DIM=d, BLOCK_S=BLOCK_S, BLOCK_M=block_m, num_warps=NUM_WARPS,
    )  # fmt: skip
    return coh, kvar, lost_k, vvec, lost_v
