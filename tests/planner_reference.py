# SPDX-License-Identifier: Apache-2.0
"""Frozen copy of the fast estimator as it was before its sorts were replaced by one top-k per side (commit ea9cf84):
the reference that tests compare :func:`mosaickv_sglang.planner._estimate_fast` against."""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

from mosaickv_sglang.importance import SegmentImportance
from mosaickv_sglang.kernels import format as fmt
from mosaickv_sglang.planner import _EPS, _fast_indices, retrieval_prior
from mosaickv_sglang.planner import ErrorEstimate
from mosaickv_sglang.strategies import Candidate, descending_rank
from mosaickv_sglang.strategies.base import chan_scores


def _row_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of each row's energy an approximation loses, ``||x - x_hat||^2 / ||x||^2`` clamped to ``[0, 1]``.

    ``x``, ``x_hat``: shape ``[N, S, d]``, fp32. Returns shape ``[N, S]``, fp32 (0 for all-zero rows).
    """
    den = x.pow(2).sum(-1)
    return ((x - x_hat).pow(2).sum(-1) / den.clamp(min=_EPS)).clamp(max=1.0) * (den > 0)


def _unseen_error(
    keys: torch.Tensor,
    values: torch.Tensor,
    menu: Sequence[Candidate],
    importance: SegmentImportance,
    labels: torch.Tensor,
    ng: int,
    unseen_prior: str,
) -> torch.Tensor:
    """:func:`unseen_query_error` on checked inputs, contexts given as ``labels`` in ``[0, ng)`` (no host read)."""
    n, s, _ = keys.shape
    order = torch.sort(importance.token_mass, dim=1, descending=True, stable=True).indices
    prior = retrieval_prior(values, labels, ng, unseen_prior)
    dropped = _prefix(prior, order)
    dropped = dropped[:, -1:] - dropped  # [N, S+1]: prior mass of the tokens after the top m
    half: Dict[Tuple[int, int, int], torch.Tensor] = {}  # (side, form, param) -> [N, S+1] prefix of loss / 2

    def kept_loss(side: int, x: torch.Tensor, weight: torch.Tensor, form: int, param: int) -> torch.Tensor:
        key = (side, form, param)
        if key not in half:
            if form == fmt.FORM_DENSE:
                loss = torch.zeros(n, s, device=x.device)
            elif form == fmt.FORM_CHAN:
                xf = x.float()
                loss = _row_loss(xf, xf * (descending_rank(chan_scores(xf, weight)) < param))
            else:
                raise ValueError(f"menu: expected dense or chan forms (no SVD here), got {fmt.FORM_NAMES[form]}")
            half[key] = _prefix(prior * loss * 0.5, order)
        return half[key]

    cols = []
    for c in menu:
        lk = kept_loss(0, keys, importance.k_chan_weight, c.k_form, c.k_param)[:, c.m]
        lv = kept_loss(1, values, importance.v_chan_weight, c.v_form, c.v_param)[:, c.m]
        cols.append(lk + lv + dropped[:, c.m])
    return (torch.stack(cols, 1) if cols else torch.zeros(n, 0, device=keys.device)).float()


def _prefix(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Cumulative sums of ``x`` (``[N, S, ...]``) over tokens in ``order``, with a leading zero: ``[N, S+1, ...]``."""
    idx = order.view(order.shape + (1,) * (x.dim() - 2)).expand_as(x)
    cs = x.gather(1, idx).cumsum(1)
    return torch.cat([torch.zeros_like(cs[:, :1]), cs], 1)


def estimate_fast_reference(
    keys: torch.Tensor,
    values: torch.Tensor,
    menu: Tuple[Candidate, ...],
    importance: SegmentImportance,
    labels: torch.Tensor,
    ng: int,
    scale: float,
    weight: float,
    unseen_prior: str,
    blocks: int = 1,
) -> ErrorEstimate:
    """:func:`estimate_errors_fast` on checked inputs, contexts given as ``labels`` in ``[0, ng)`` (no host read;
    the menu's index tensors are cached per device, so steady-state calls copy nothing to the device).

    ``blocks``: the rows are that many independent problems of equal size (layers, contexts not shared between
    them); each gets exactly the estimate it would get alone."""
    n, s, d = keys.shape
    dev = keys.device
    kf, vf = keys.float(), values.float()
    p = importance.token_mass.float()
    w2 = importance.k_chan_weight.float().pow(2)
    qbar = torch.zeros(n, d, device=dev) if importance.q_mean is None else importance.q_mean.float()
    var_q = (w2 - qbar.pow(2)).clamp(min=0)
    out_g = torch.zeros(ng, d, device=dev).index_add_(0, labels, (p[:, :, None] * vf).sum(1))
    resid = vf - out_g[labels][:, None, :]  # v_t - O
    c = resid.pow(2).sum(-1)
    var_g = torch.zeros(ng, device=dev).index_add_(0, labels, (p.pow(2) * c).sum(1))
    energy = vf.pow(2).sum(-1).reshape(blocks, -1).mean(1)  # one floor per block, as if planned alone
    norm = (out_g.pow(2).sum(-1) + var_g)[labels] + energy.repeat_interleave(n // blocks) * 1e-12 + _EPS

    ks, ms, mt, mi, ki, vi = _fast_indices(menu, dev)
    order = torch.sort(p, dim=1, descending=True, stable=True).indices
    k_rank = descending_rank(chan_scores(kf, importance.k_chan_weight))
    v_rank = descending_rank(chan_scores(vf, importance.v_chan_weight))
    # Three families of vectors, each [N, len(ms), d] per option; the change of a candidate is delta = -a + b - c:
    #   a = sum_{dropped} p_t (v_t - O)             (dropped tokens)
    #   b = -sum_{kept} p_t s (q_bar . dk_t)(v_t - O)  (K top-k, dk_t the dropped elements, s = sm_scale)
    #   c = sum_{kept} p_t dv_t                      (V top-k, dv_t the dropped elements)
    pr = _prefix(p[:, :, None] * resid, order)  # [N, S+1, d]
    avec = pr[:, -1:, :] - pr[:, mt, :]
    zero = torch.zeros(n, len(ms), d, device=dev)
    kvec, vvec = [zero], [zero]
    kvar = [torch.zeros(n, len(ms), device=dev)]
    for k in ks:
        dk = kf * (k_rank >= k)
        coh = p * scale * (dk * qbar[:, None, :]).sum(-1)
        kvec.append(-_prefix(coh[:, :, None] * resid, order)[:, mt, :])
        kvar.append(_prefix(p.pow(2) * scale**2 * (dk.pow(2) * var_q[:, None, :]).sum(-1) * c, order)[:, mt])
        vvec.append(_prefix(p[:, :, None] * vf * (v_rank >= k), order)[:, mt, :])
    allv = torch.cat([avec] + kvec + vvec, 1)  # [N, M * (1 + 2 * (nk + 1)), d]
    gram = torch.bmm(allv, allv.transpose(1, 2))
    nm, nk = len(ms), len(ks) + 1
    ia, ib, ic = mi, nm + ki * nm + mi, nm + nk * nm + vi * nm + mi
    sq = (
        gram[:, ia, ia] + gram[:, ib, ib] + gram[:, ic, ic]
        - 2 * gram[:, ia, ib] + 2 * gram[:, ia, ic] - 2 * gram[:, ib, ic]
    ).clamp(min=0)
    err = (sq + torch.stack(kvar, 1)[:, ki, mi]) / norm[:, None]
    pm = _prefix(p, order)  # [N, S+1]
    dmass = (pm[:, mt] - pm[:, -1:])[:, mi].clamp(max=0)
    dense_i = list(menu).index(Candidate(s))
    err[:, dense_i] = 0.0
    dmass[:, dense_i] = 0.0
    unseen = _unseen_error(keys, values, menu, importance, labels, ng, unseen_prior)
    return ErrorEstimate(err.float(), dmass.float(), p.sum(1), unseen, weight)
