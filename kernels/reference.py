# SPDX-License-Identifier: Apache-2.0
"""Plain-PyTorch references (oracles) of the MosaicKV kernels.

Each ``ref_<op>`` takes the arguments of the launcher ``<op>_fwd`` and loops over requests and heads for
readability. Pack references write the same outputs in place (the packed bytes must match the kernel's bit for
bit); attention references compute in float64 and *return* a new float64 tensor, accepting but ignoring the
launcher's ``out`` and scratch arguments. None of this is meant to be fast.
"""

from __future__ import annotations

import logging
import math
from typing import List, Optional, Tuple, Union

import torch

from .format import (
    FLAG_ALWAYS_READ,
    FLAGS,
    FORM_CHAN,
    FORM_DENSE,
    FORM_LOWRANK,
    GRANULE_ELEMS,
    K_FORM,
    K_OFF,
    K_PARAM,
    MASK_BITS,
    N_ROWS,
    V_FORM,
    V_OFF,
    V_PARAM,
    SegmentPlan,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ref_chan_rank",
    "ref_chan_terms",
    "ref_chan_select",
    "ref_pack_segments",
    "ref_unpack_segment",
    "ref_unpack_segments",
    "ref_segment_scores",
    "ref_sparse_decode",
    "ref_extend",
]


# --------------------------------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------------------------------
def ref_chan_select(x: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """Per-row top-k channel mask of the chan form.

    Parameters
    ----------
    x : torch.Tensor
        shape ``[m, d]``, any float dtype.
    weight : torch.Tensor
        shape ``[d]``, dtype ``torch.float32``.
    k : int
        Channels kept per row.

    Returns
    -------
    torch.Tensor
        shape ``[m, d]``, dtype ``torch.bool``; exactly ``k`` channels per row with the largest
        ``|x_c| * w_c`` (fp32), ties broken towards the lower channel index.
    """
    score = x.float().abs() * weight.float()[None, :]
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
    sel = torch.zeros_like(score, dtype=torch.bool)
    sel.scatter_(1, order, True)
    return sel


def ref_chan_rank(score: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference of :func:`mosaickv_sglang.kernels.chan_rank.chan_rank_fwd`: the descending rank of every score in
    its row, ties broken towards the lower index (a stable sort).

    Parameters
    ----------
    score : torch.Tensor
        shape ``[..., d]``, dtype ``torch.float32``.
    out : torch.Tensor, optional
        shape ``score.shape``, dtype ``torch.uint8``; written too when given.

    Returns
    -------
    torch.Tensor
        shape ``score.shape``, dtype ``torch.uint8`` for ``d <= 256``, else ``torch.int64``. Scores are sorted as
        their sign-magnitude bits read as integers (``-0.0`` and ``+0.0`` both 0): the order of the floats, with a
        NaN placed by its bits (a positive NaN above ``+inf``).
    """
    bits = score.float().contiguous().view(torch.int32).to(torch.int64)
    key = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    ar = torch.arange(score.shape[-1], device=score.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, ar)
    rank = rank.to(torch.uint8) if score.shape[-1] <= 256 else rank
    if out is not None:
        out.copy_(rank)
    return rank


def _words_from_mask(sel: torch.Tensor) -> torch.Tensor:
    """``[m, d]`` bool -> ``[m, d / 32]`` int32 words, bit ``b`` of word ``w`` = channel ``32 w + b``."""
    m, d = sel.shape
    shifts = torch.arange(MASK_BITS, device=sel.device, dtype=torch.int64)
    w = (sel.view(m, d // MASK_BITS, MASK_BITS).to(torch.int64) << shifts).sum(-1)
    w = torch.where(w >= 2**31, w - 2**32, w)  # reinterpret as two's complement int32
    return w.to(torch.int32)


def _mask_from_words(words: torch.Tensor, d: int) -> torch.Tensor:
    shifts = torch.arange(MASK_BITS, device=words.device, dtype=torch.int64)
    bits = (words.to(torch.int64)[:, :, None] >> shifts) & 1
    return bits.reshape(words.shape[0], d).bool()


def ref_pack_segments(
    k_src: torch.Tensor,
    v_src: torch.Tensor,
    seg_token_index: torch.Tensor,
    seg_heads: torch.Tensor,
    plan: SegmentPlan,
    arena: torch.Tensor,
    desc: torch.Tensor,
    bounds: torch.Tensor,
    seg_ids: torch.Tensor,
    k_offsets: torch.Tensor,
    v_offsets: torch.Tensor,
) -> None:
    """Reference of :func:`mosaickv_sglang.kernels.pack.pack_segments_fwd` (same arguments, writes in place)."""
    d = plan.head_dim
    a32 = arena.view(torch.int32)
    tok_all = seg_token_index.cpu().to(torch.int64)
    heads = seg_heads.cpu().tolist()
    sids = seg_ids.cpu().tolist()
    koffs = k_offsets.cpu().tolist()
    voffs = v_offsets.cpu().tolist()
    for n in range(plan.num_segments):
        tok = tok_all[n].to(k_src.device)
        keep = plan.token_keep[n]
        kx = k_src[tok, heads[n], :]
        vx = v_src[tok, heads[n], :]
        m = int(keep.sum())
        sid = sids[n]
        bounds[sid, 0] = kx.float().min(0).values.to(bounds.dtype)
        bounds[sid, 1] = kx.float().max(0).values.to(bounds.dtype)
        params = []
        for side, x, goff in (("k", kx, koffs[n]), ("v", vx, voffs[n])):
            form = int(getattr(plan, f"{side}_form")[n])
            param = 0 if form == FORM_DENSE else int(getattr(plan, f"{side}_param")[n])
            params.append((form, param))
            off = goff * GRANULE_ELEMS
            rows = x[keep]
            if form == FORM_DENSE:
                arena[off : off + m * d] = rows.reshape(-1).to(arena.dtype)
            elif form == FORM_CHAN:
                sel = ref_chan_select(rows, getattr(plan, f"{side}_chan_weight")[n], param)
                words = _words_from_mask(sel)
                nw = m * (d // MASK_BITS)
                a32[off // 2 : off // 2 + nw] = words.reshape(-1)
                vbase = off + 2 * nw
                arena[vbase : vbase + m * param] = rows[sel].to(arena.dtype)  # row-major: ascending channels
            elif form == FORM_LOWRANK:
                a_full, b_full = getattr(plan, f"{side}_factors")
                a = a_full[n, :m, :param]
                b = b_full[n, :param, :]
                arena[off : off + m * param] = a.reshape(-1).to(arena.dtype)
                arena[off + m * param : off + m * param + param * d] = b.reshape(-1).to(arena.dtype)
            else:
                raise ValueError(f"plan.{side}_form: expected a form code, got {form}")
        (kf, kp), (vf, vp) = params
        row = [0] * 8
        row[N_ROWS], row[K_FORM], row[K_PARAM], row[V_FORM], row[V_PARAM] = m, kf, kp, vf, vp
        row[K_OFF], row[V_OFF], row[FLAGS] = koffs[n], voffs[n], int(plan.flags[n])
        desc[sid] = torch.tensor(row, dtype=torch.int32, device=desc.device)


def _unpack_payload(
    arena: torch.Tensor, form: int, param: int, m: int, goff: int, d: int, out_dtype: torch.dtype
) -> torch.Tensor:
    off = goff * GRANULE_ELEMS
    if form == FORM_DENSE:
        return arena[off : off + m * d].view(m, d).to(out_dtype)
    if form == FORM_CHAN:
        nw = m * (d // MASK_BITS)
        words = arena.view(torch.int32)[off // 2 : off // 2 + nw].view(m, d // MASK_BITS)
        sel = _mask_from_words(words, d)
        vals = arena[off + 2 * nw : off + 2 * nw + m * param].to(out_dtype)
        out = torch.zeros(m, d, dtype=out_dtype, device=arena.device)
        out[sel] = vals
        return out
    if form == FORM_LOWRANK:
        a = arena[off : off + m * param].view(m, param).to(out_dtype)
        b = arena[off + m * param : off + m * param + param * d].view(param, d).to(out_dtype)
        return a @ b
    raise ValueError(f"form: expected one of {FORM_DENSE, FORM_CHAN, FORM_LOWRANK}, got {form}")


def ref_unpack_segment(
    arena: torch.Tensor, desc_row: Union[torch.Tensor, List[int]], d: int, out_dtype: torch.dtype = torch.float32
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode one packed segment.

    Parameters
    ----------
    arena : torch.Tensor
        shape ``[arena_elems]``, dtype ``torch.float16`` or ``torch.bfloat16``.
    desc_row : torch.Tensor or list of int
        shape ``[8]``, dtype ``torch.int32``; the segment's descriptor row.
    d : int
        Head dim.
    out_dtype : torch.dtype
        Dtype of the result; low-rank products ``A @ B`` are computed in it.

    Returns
    -------
    tuple of torch.Tensor
        ``(K, V)``, each shape ``[m, d]``, dtype ``out_dtype``; dropped channels of chan rows are 0.
    """
    row = desc_row.tolist() if isinstance(desc_row, torch.Tensor) else list(desc_row)
    m = row[N_ROWS]
    k = _unpack_payload(arena, row[K_FORM], row[K_PARAM], m, row[K_OFF], d, out_dtype)
    v = _unpack_payload(arena, row[V_FORM], row[V_PARAM], m, row[V_OFF], d, out_dtype)
    return k, v


def ref_unpack_segments(
    arena: torch.Tensor, desc: torch.Tensor, seg_ids: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor
) -> None:
    """Reference of :func:`mosaickv_sglang.kernels.unpack.unpack_segments_fwd`: rows ``[:m]`` of slot ``i`` get the
    decoded segment ``seg_ids[i]``, rows ``[m:]`` zeros; slots with id ``-1`` are left untouched."""
    d = k_out.shape[-1]
    ids = seg_ids.reshape(-1).tolist()
    ko = k_out.view(-1, k_out.shape[-2], d)
    vo = v_out.view(-1, v_out.shape[-2], d)
    desc_rows = desc.cpu()
    for i, sid in enumerate(ids):
        if sid < 0:
            continue
        k, v = ref_unpack_segment(arena, desc_rows[sid], d, torch.float32)
        m = k.shape[0]
        ko[i].zero_()
        vo[i].zero_()
        ko[i, :m] = k.to(ko.dtype)
        vo[i, :m] = v.to(vo.dtype)


# --------------------------------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------------------------------
def ref_segment_scores(
    q: torch.Tensor,
    desc: torch.Tensor,
    bounds: torch.Tensor,
    seg_ids_padded: torch.Tensor,
    seg_counts: torch.Tensor,
    out_scores: Optional[torch.Tensor] = None,
    sm_scale: Optional[float] = None,
) -> torch.Tensor:
    """Reference of :func:`mosaickv_sglang.kernels.segment_scores.segment_scores_fwd`; returns float64
    ``[B, H_kv, MAX_SEGS]`` (``out_scores`` is ignored)."""
    bsz, h_q, d = q.shape
    _, h_kv, max_segs = seg_ids_padded.shape
    g = h_q // h_kv
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    out = torch.full((bsz, h_kv, max_segs), float("-inf"), dtype=torch.float64)
    ids = seg_ids_padded.cpu()
    counts = seg_counts.cpu().tolist()
    flags = desc[:, FLAGS].cpu()
    lo = bounds[:, 0].double().cpu()
    hi = bounds[:, 1].double().cpu()
    qd = q.double().cpu()
    for b in range(bsz):
        for h in range(h_kv):
            for i in range(min(counts[b], max_segs)):
                sid = int(ids[b, h, i])
                if sid < 0:
                    continue
                if int(flags[sid]) & FLAG_ALWAYS_READ:
                    out[b, h, i] = float("inf")
                    continue
                qg = qd[b, h * g : (h + 1) * g]  # [G, d]
                ub = torch.maximum(qg * lo[sid], qg * hi[sid]).sum(-1)  # [G]
                out[b, h, i] = ub.max() * scale
    return out


# --------------------------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------------------------
def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: Optional[torch.Tensor] = None):
    """fp64 softmax attention; returns (out [Mq, d], lse [Mq]); empty or fully-masked rows give (0, -inf)."""
    if k.shape[0] == 0:
        return torch.zeros(q.shape[0], v.shape[1], dtype=torch.float64), torch.full((q.shape[0],), float("-inf"))
    s = (q @ k.T) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[:, None])
    return p @ v, lse.double()


def ref_sparse_decode(
    q: torch.Tensor,
    arena: torch.Tensor,
    desc: torch.Tensor,
    sel_ids: torch.Tensor,
    k_tail_buf: torch.Tensor,
    v_tail_buf: torch.Tensor,
    tail_indptr: torch.Tensor,
    tail_indices: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    partial_out: Optional[torch.Tensor] = None,
    partial_lse: Optional[torch.Tensor] = None,
    sm_scale: Optional[float] = None,
    num_splits: Optional[int] = None,
    *,
    out_lse: Optional[torch.Tensor] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Reference of :func:`mosaickv_sglang.kernels.sparse_decode.sparse_decode_fwd`, in float64.

    For each request and KV head: decode the selected segments (``-1`` skipped), append the dense tail
    ``k_tail_buf[tail_indices[tail_indptr[b]:tail_indptr[b+1]], h]``, and run softmax attention for the group's
    query heads. Returns float64 ``[B, H_q, d]`` (and the natural-log LSE ``[B, H_q]`` with ``return_lse``).
    """
    bsz, h_q, d = q.shape
    _, h_kv, nsel = sel_ids.shape
    g = h_q // h_kv
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    res = torch.zeros(bsz, h_q, d, dtype=torch.float64)
    lse = torch.full((bsz, h_q), float("-inf"), dtype=torch.float64)
    desc_rows = desc.cpu()
    ids = sel_ids.cpu()
    ip = tail_indptr.cpu().tolist()
    tidx = tail_indices.cpu().to(torch.int64)
    kt, vt = k_tail_buf.double().cpu(), v_tail_buf.double().cpu()
    ar = arena.cpu()
    qd = q.double().cpu()
    for b in range(bsz):
        slots = tidx[ip[b] : ip[b + 1]]
        for h in range(h_kv):
            ks, vs = [], []
            for i in range(nsel):
                sid = int(ids[b, h, i])
                if sid >= 0:
                    k, v = ref_unpack_segment(ar, desc_rows[sid], d, torch.float64)
                    ks.append(k)
                    vs.append(v)
            ks.append(kt[slots, h])
            vs.append(vt[slots, h])
            o, lse_bh = _attend(qd[b, h * g : (h + 1) * g], torch.cat(ks), torch.cat(vs), scale)
            res[b, h * g : (h + 1) * g] = o
            lse[b, h * g : (h + 1) * g] = lse_bh
    return (res, lse) if return_lse else res


def ref_extend(
    q_extend: torch.Tensor,
    k_extend: torch.Tensor,
    v_extend: torch.Tensor,
    out: Optional[torch.Tensor],
    qo_indptr: torch.Tensor,
    max_extend_len: int,
    arena: torch.Tensor,
    desc: torch.Tensor,
    seg_ids: torch.Tensor,
    k_tail_buf: torch.Tensor,
    v_tail_buf: torch.Tensor,
    tail_indptr: torch.Tensor,
    tail_indices: torch.Tensor,
    k_scratch: Optional[torch.Tensor] = None,
    v_scratch: Optional[torch.Tensor] = None,
    sm_scale: Optional[float] = None,
    causal: bool = True,
) -> torch.Tensor:
    """Reference of :func:`mosaickv_sglang.kernels.extend.extend_fwd`, in float64.

    New token ``i`` of request ``b`` attends to every prefix segment of ``seg_ids[b, h]`` (decoded), the dense
    prefix tail, and the new tokens ``j <= i`` (all new tokens when ``causal`` is False). Returns float64
    ``[T, H_q, d]``.
    """
    t, h_q, d = q_extend.shape
    h_kv = k_extend.shape[1]
    g = h_q // h_kv
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    res = torch.zeros(t, h_q, d, dtype=torch.float64)
    qo = qo_indptr.cpu().tolist()
    ip = tail_indptr.cpu().tolist()
    tidx = tail_indices.cpu().to(torch.int64)
    desc_rows = desc.cpu()
    ids = seg_ids.cpu()
    ar = arena.cpu()
    qd, kn, vn = q_extend.double().cpu(), k_extend.double().cpu(), v_extend.double().cpu()
    kt, vt = k_tail_buf.double().cpu(), v_tail_buf.double().cpu()
    for b in range(len(qo) - 1):
        q0, q1 = qo[b], qo[b + 1]
        n_new = q1 - q0
        slots = tidx[ip[b] : ip[b + 1]]
        for h in range(h_kv):
            ks, vs = [], []
            for sid in ids[b, h].tolist():
                if sid >= 0:
                    k, v = ref_unpack_segment(ar, desc_rows[sid], d, torch.float64)
                    ks.append(k)
                    vs.append(v)
            ks += [kt[slots, h], kn[q0:q1, h]]
            vs += [vt[slots, h], vn[q0:q1, h]]
            k_all, v_all = torch.cat(ks), torch.cat(vs)
            n_prefix = k_all.shape[0] - n_new
            mask = torch.ones(n_new, k_all.shape[0], dtype=torch.bool)
            if causal:
                mask[:, n_prefix:] = torch.ones(n_new, n_new, dtype=torch.bool).tril()
            for hq in range(h * g, (h + 1) * g):
                o, _ = _attend(qd[q0:q1, hq], k_all, v_all, scale, mask)
                res[q0:q1, hq] = o
    return res


def ref_chan_terms(
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
    """Reference of :func:`mosaickv_sglang.kernels.estimate_terms.chan_terms_fwd`, in float64, segment by segment:
    ``(coh [N, S], kvar [N, M], lost_k [N, S], vvec [N, M, d], lost_v [N, S])``."""
    n, s, d = keys.shape
    m = kept.shape[1]
    f = torch.float64
    out = (torch.zeros(n, s, dtype=f), torch.zeros(n, m, dtype=f), torch.zeros(n, s, dtype=f),
           torch.zeros(n, m, d, dtype=f), torch.zeros(n, s, dtype=f))  # fmt: skip
    coh, kvar, lost_k, vvec, lost_v = out
    for i in range(n):
        dk = keys[i].cpu().to(f) * k_drop[i].cpu()
        dv = values[i].cpu().to(f) * v_drop[i].cpu()
        pi, keep = p[i].cpu().to(f), kept[i].cpu().to(f)
        coh[i] = pi * scale * (dk @ qbar[i].cpu().to(f))
        lost_k[i] = (dk * dk).sum(1)
        lost_v[i] = (dv * dv).sum(1)
        kvar[i] = keep @ (pi * pi * scale * scale * ((dk * dk) @ var_q[i].cpu().to(f)) * resid[i].cpu().to(f))
        vvec[i] = (keep * pi) @ dv
    return out
