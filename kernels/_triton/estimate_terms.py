# SPDX-License-Identifier: Apache-2.0
"""Triton kernel of the fast error estimator's channel terms for one top-``k`` setting (the seal planner's per-k step).

For segment ``n`` (one program each), tokens ``t < S``, channels ``c < HEAD_DIM`` and token-count options ``m < M``,
with ``dk = k * [k dropped]`` and ``dv = v * [v dropped]`` (the channels outside each vector's top-k):

* ``coh[n, t] = p_t * scale * sum_c qbar_c dk_tc``
* ``lost_k[n, t] = sum_c dk_tc^2``, ``lost_v[n, t] = sum_c dv_tc^2``
* ``kvar[n, m] = sum_t kept_mt * p_t^2 * scale^2 * (sum_c var_q_c dk_tc^2) * resid_t``
* ``vvec[n, m, :] = sum_t kept_mt * p_t * dv_t``

The tokens are taken ``BLOCK_S`` at a time; ``vvec`` accumulates in fp32 through an IEEE ``tl.dot`` of the
``[BLOCK_M, BLOCK_S]`` weights and the ``[BLOCK_S, HEAD_DIM]`` dropped values, ``kvar`` through a reduction.
"""

import triton
import triton.language as tl


@triton.jit
def _chan_terms_kernel(
    K, V, KDROP, VDROP, P, QBAR, VARQ, RESID, KEPT,
    COH, LOST_K, LOST_V, KVAR, VVEC,
    S, M, scale,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, HEAD_DIM)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    qbar = tl.load(QBAR + n * HEAD_DIM + offs_c)
    var_q = tl.load(VARQ + n * HEAD_DIM + offs_c)
    kvar = tl.zeros([BLOCK_M], dtype=tl.float32)
    vvec = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < S
        tile = (n * S + offs_s[:, None]) * HEAD_DIM + offs_c[None, :]
        mask_t = mask_s[:, None]
        kdrop = tl.load(KDROP + tile, mask=mask_t, other=0) != 0
        vdrop = tl.load(VDROP + tile, mask=mask_t, other=0) != 0
        dk = tl.where(kdrop, tl.load(K + tile, mask=mask_t, other=0.0), 0.0)
        dv = tl.where(vdrop, tl.load(V + tile, mask=mask_t, other=0.0), 0.0)
        p = tl.load(P + n * S + offs_s, mask=mask_s, other=0.0)
        resid = tl.load(RESID + n * S + offs_s, mask=mask_s, other=0.0)
        dk2 = dk * dk
        tl.store(COH + n * S + offs_s, p * scale * tl.sum(dk * qbar[None, :], 1), mask=mask_s)
        tl.store(LOST_K + n * S + offs_s, tl.sum(dk2, 1), mask=mask_s)
        tl.store(LOST_V + n * S + offs_s, tl.sum(dv * dv, 1), mask=mask_s)
        kept = tl.load(KEPT + (n * M + offs_m[:, None]) * S + offs_s[None, :],
                       mask=mask_m[:, None] & mask_s[None, :], other=0.0)  # fmt: skip
        w = p * p * (scale * scale) * tl.sum(dk2 * var_q[None, :], 1) * resid
        kvar += tl.sum(kept * w[None, :], 1)
        vvec += tl.dot(kept * p[None, :], dv, input_precision="ieee")
    tl.store(KVAR + n * M + offs_m, kvar, mask=mask_m)
    tl.store(VVEC + (n * M + offs_m[:, None]) * HEAD_DIM + offs_c[None, :], vvec, mask=mask_m[:, None])
