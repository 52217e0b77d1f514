# SPDX-License-Identifier: Apache-2.0
"""Decode attention speed: MosaicKV 2-D sparse decode vs FlashInfer dense decode, one layer, same shapes.

Run on the GPU machine (``python -m bench.decode_speed --help``). For every model shape, context length and
batch size it builds one layer's KV cache with distinct random data per request, compresses it to the target
memory ratio with a fixed, seeded mix of segment strategies (the kernel's speed depends on the forms it reads,
not on which planner chose them), checks the kernels against the torch references, and then times, side by
side in the same process:

* ``flashinfer``: ``BatchDecodeWithPagedKVCacheWrapper`` over the dense bf16 cache (page 16, tensor cores);
* ``mosaic``: segment upper-bound scores + top-k selection + split-K sparse decode (+ merge) over the packed
  cache and the dense hot tail, reading ``--read-budget`` compressed tokens per request and KV head;
* ``mosaic-decode``: the sparse decode kernel alone (selection reused);
* ``select`` against ``select-topk``: the selection alone, as the decode makes it
  (:func:`~mosaickv_sglang.kernels.segment_scores.score_and_select`: a request within the read budget neither scored
  nor sorted, the others' top-k by the Triton sort) and as it was before (every request scored, then
  ``torch.topk``), checked to keep segments of the same scores;
* ``copy``: a device-to-device copy, for the achievable bandwidth.

It also times the pack kernel against one 8B-shape layer's prefill (attention + the layer's GEMMs) on the same
tokens. Results go to a JSON file and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger("bench.decode_speed")

SHAPES = {  # name: (q heads, kv heads, head_dim, hidden, intermediate)
    "llama-3.1-8b": (32, 8, 128, 4096, 14336),
    "llama-3.2-1b": (32, 8, 64, 2048, 8192),
}
SEG = 64
SINK_SEGMENTS = 1
TAIL_TOKENS = 512
FI_PAGE = 16


@dataclass(frozen=True)
class MenuEntry:
    name: str
    keep_frac: float
    k_form: int
    k_param_frac: float  # k or r as a fraction of head_dim
    v_form: int
    v_param_frac: float


def _menu() -> list[MenuEntry]:
    from mosaickv_sglang.kernels.format import FORM_CHAN, FORM_DENSE, FORM_LOWRANK

    return [
        MenuEntry("tok-m/chan-k (m=S/2, k=d/4)", 0.5, FORM_CHAN, 0.25, FORM_CHAN, 0.25),
        MenuEntry("tok-m/chan-k (m=3S/4, kK=d/2, kV=d/4)", 0.75, FORM_CHAN, 0.5, FORM_CHAN, 0.25),
        MenuEntry("chan-k (kK=d/4, kV=d/2)", 1.0, FORM_CHAN, 0.25, FORM_CHAN, 0.5),
        MenuEntry("lowrank-r K (r=d/8) + chan-k V (d/4)", 1.0, FORM_LOWRANK, 0.125, FORM_CHAN, 0.25),
        MenuEntry("tok-m (m=S/2) dense", 0.5, FORM_DENSE, 0.0, FORM_DENSE, 0.0),
        MenuEntry("dense", 1.0, FORM_DENSE, 0.0, FORM_DENSE, 0.0),
    ]


def build_plan(n: int, d: int, ratio: float, gen: torch.Generator, device: torch.device):
    """A seeded mix of menu strategies whose stored bytes (payloads + bounds + descriptor) hit ``ratio``."""
    from mosaickv_sglang.kernels.format import DESC_WIDTH, FORM_DENSE, GRANULE_BYTES, SegmentPlan, payload_granules

    menu = _menu()
    seg_bytes = []
    for e in menu:
        m = int(SEG * e.keep_frac)
        kg = payload_granules(e.k_form, int(d * e.k_param_frac), m, d)
        vg = payload_granules(e.v_form, int(d * e.v_param_frac), m, d)
        seg_bytes.append((kg + vg) * GRANULE_BYTES + 2 * d * 2 + DESC_WIDTH * 4)
    dense_bytes = SEG * d * 2 * 2
    target = dense_bytes / ratio
    choice = torch.randint(0, len(menu), (n,), generator=gen)
    cost = torch.tensor(seg_bytes, dtype=torch.float64)
    total = cost[choice].sum().item()
    # Repair towards the budget: move random segments to the smallest (or largest) entry until it is crossed.
    towards = int(torch.argmin(cost)) if total > target * n else int(torch.argmax(cost))
    for i in torch.randperm(n, generator=gen).tolist():
        if (total <= target * n) if towards == int(torch.argmin(cost)) else (total >= target * n):
            break
        total += (cost[towards] - cost[choice[i]]).item()
        choice[i] = towards
    choice[:SINK_SEGMENTS] = -1  # marker: dense sinks (fixed up below)

    keep = torch.zeros(n, SEG, dtype=torch.bool)
    kf, kp, vf, vp = (torch.zeros(n, dtype=torch.int32) for _ in range(4))
    rmax = max(1, int(d * max(e.k_param_frac for e in menu if e.k_form == 2)))
    a = torch.zeros(n, SEG, rmax)
    b = torch.zeros(n, rmax, d)
    for idx, e in enumerate(menu):
        sel = choice == idx
        cnt = int(sel.sum())
        if cnt == 0:
            continue
        m = int(SEG * e.keep_frac)
        rows = torch.rand(cnt, SEG, generator=gen).argsort(1)[:, :m]
        keep[sel] = torch.zeros(cnt, SEG, dtype=torch.bool).scatter_(1, rows, True)
        kf[sel], kp[sel] = e.k_form, int(d * e.k_param_frac)
        vf[sel], vp[sel] = e.v_form, int(d * e.v_param_frac)
        if e.k_form == 2:
            r = int(d * e.k_param_frac)
            a[sel, :, :r] = torch.randn(cnt, SEG, r, generator=gen) / math.sqrt(r)
            b[sel, :r, :] = torch.randn(cnt, r, d, generator=gen)
    sinks = choice == -1
    keep[sinks] = True
    kf[sinks] = vf[sinks] = FORM_DENSE
    flags = sinks.to(torch.int32)
    plan = SegmentPlan(
        token_keep=keep.to(device),
        k_form=kf.to(device), k_param=kp.to(device), v_form=vf.to(device), v_param=vp.to(device),
        k_chan_weight=torch.ones(n, d, device=device), v_chan_weight=torch.ones(n, d, device=device),
        k_factors=(a.to(device), b.to(device)) if (kf == 2).any() else None,
        flags=flags.to(device),
    )  # fmt: skip
    mix = {e.name: int((choice == i).sum()) for i, e in enumerate(menu)}
    mix["dense sinks"] = int(sinks.sum())
    return plan, mix


TUNE_WARPS = (2, 4, 8)
TUNE_STAGES = (1, 2, 3)
TUNE_SPLIT_FACTORS = (0.5, 1, 2, 4)
TUNE_MAXNREG = (None, 168, 128)  # register caps per thread timed at the best configuration (None: ptxas chooses)


def tune_variants(splits: int, max_splits: int = 64) -> list[tuple[int, int, int]]:
    """Launch configurations ``(num_warps, num_stages, num_splits)`` that ``--tune`` times: every warp and stage
    count of :data:`TUNE_WARPS` x :data:`TUNE_STAGES`, with the suggested split count scaled by
    :data:`TUNE_SPLIT_FACTORS` (powers of two within ``[1, max_splits]``, duplicates dropped)."""
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits: expected an integer >= 1, got {splits!r}")
    counts = sorted({min(max_splits, max(1, int(splits * f))) for f in TUNE_SPLIT_FACTORS})
    return [(w, s, n) for w in TUNE_WARPS for s in TUNE_STAGES for n in counts]


def timed(fn: Callable[[], Any], rep_ms: int, cuda_graph: bool = False) -> float:
    """Median milliseconds per call; with ``cuda_graph`` the calls are captured and replayed (no launch cost)."""
    import triton.testing

    if cuda_graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))


def same_selection_scores(
    sel_a: torch.Tensor, sel_b: torch.Tensor, scores: torch.Tensor, seg_ids_padded: torch.Tensor
) -> bool:
    """Whether two selections ``[B, H_kv, budget]`` (``-1``: none) keep, in every request and head, segments of the
    same scores (in any order: two top-k selections may differ only among ties). ``scores[b, h, j]`` scores segment
    ``seg_ids_padded[b, h, j]`` (``-1``: no candidate; the ids distinct)."""
    if sel_a.shape != sel_b.shape:
        return False
    ids = seg_ids_padded.reshape(-1).long()
    valid = ids >= 0
    n_ids = int(ids.max()) + 1 if bool(valid.any()) else 0
    score_of = torch.full((n_ids + 1,), float("nan"), dtype=torch.float32, device=scores.device)
    score_of[ids[valid]] = scores.reshape(-1)[valid].float()
    score_of[n_ids] = float("-inf")  # where nothing was selected

    def kept_scores(sel: torch.Tensor) -> torch.Tensor:
        sel = sel.long()
        if bool((sel >= n_ids).any()):
            return torch.full(sel.shape, float("nan"), device=scores.device)
        return score_of[torch.where(sel < 0, n_ids, sel)]

    a, b = kept_scores(sel_a), kept_scores(sel_b)
    if bool(torch.isnan(a).any() | torch.isnan(b).any()):  # an id that is not a candidate
        return False
    return torch.equal(a.sort(-1).values, b.sort(-1).values)


def copy_bandwidth(device: torch.device, rep_ms: int) -> float:
    """Bytes moved (read + write) per second by a 2 GiB device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), rep_ms)
    return 2 * src.numel() * 2 / (ms * 1e-3)


def run_case(shape: str, ctx: int, bsz: int, args, device, copy_bw: float) -> dict:
    import flashinfer

    from mosaickv_sglang.kernels import reference as ref
    from mosaickv_sglang.kernels.format import K_OFF, V_OFF, GRANULE_BYTES
    from mosaickv_sglang.kernels.pack import pack_segments_fwd
    from mosaickv_sglang.kernels.segment_scores import score_and_select, segment_scores_fwd, select_segments
    from mosaickv_sglang.kernels.sparse_decode import CHAN_MODE, CHAN_MODE_NAMES, sparse_decode_fwd, suggest_num_splits

    hq, hkv, d, _, _ = SHAPES[shape]
    dt = torch.bfloat16
    gen = torch.Generator().manual_seed(args.seed + ctx + bsz)
    torch.manual_seed(args.seed + ctx + bsz)
    n_seg = (ctx - TAIL_TOKENS) // SEG  # per request and KV head
    tail = ctx - n_seg * SEG
    # Dense cache in FlashInfer's paged NHD layout: [pages, 2, page, H_kv, d], pages of each request contiguous.
    pages_per_req = ctx // FI_PAGE
    kv = torch.randn(bsz * pages_per_req, 2, FI_PAGE, hkv, d, dtype=dt, device=device)
    q = torch.randn(bsz, hq, d, dtype=dt, device=device)

    # --- FlashInfer dense decode ---
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    indptr = torch.arange(bsz + 1, dtype=torch.int32, device=device) * pages_per_req
    indices = torch.arange(bsz * pages_per_req, dtype=torch.int32, device=device)
    last = torch.full((bsz,), FI_PAGE, dtype=torch.int32, device=device)
    wrapper.plan(indptr, indices, last, hq, hkv, d, FI_PAGE, q_data_type=dt, kv_data_type=dt)
    o_fi = wrapper.run(q, kv)

    # --- MosaicKV: pack each request's first n_seg*SEG tokens, keep the rest as the dense tail ---
    tok = kv.permute(0, 2, 1, 3, 4).reshape(bsz, ctx, 2, hkv, d)  # [B, L, 2, H, d] view order of tokens
    k_all = tok[:, :, 0].reshape(bsz * ctx, hkv, d)
    v_all = tok[:, :, 1].reshape(bsz * ctx, hkv, d)
    n_total = bsz * hkv * n_seg
    plan, mix = build_plan(n_total, d, args.ratio, gen, device)
    req = torch.arange(bsz, device=device).repeat_interleave(hkv * n_seg)
    head = torch.arange(hkv, device=device).repeat_interleave(n_seg).repeat(bsz)
    seg = torch.arange(n_seg, device=device).repeat(bsz * hkv)
    seg_token_index = (req * ctx + seg * SEG)[:, None] + torch.arange(SEG, device=device)[None, :]
    k_off, v_off, end = plan.bump_offsets(0)
    arena = torch.zeros(end * (GRANULE_BYTES // 2), dtype=dt, device=device)
    desc = torch.zeros(n_total, 8, dtype=torch.int32, device=device)
    bounds = torch.zeros(n_total, 2, d, dtype=dt, device=device)
    seg_ids = torch.arange(n_total, dtype=torch.int32, device=device)
    pack = lambda: pack_segments_fwd(  # noqa: E731
        k_all, v_all, seg_token_index, head.to(torch.int32), plan, arena, desc, bounds, seg_ids, k_off, v_off
    )
    pack()
    torch.cuda.synchronize()
    stored = arena.numel() * 2 + bounds.numel() * 2 + desc.numel() * 4
    dense_compressed_part = n_total * SEG * d * 2 * 2
    achieved_ratio = dense_compressed_part / stored

    seg_ids_padded = seg_ids.view(bsz, hkv, n_seg)
    counts = torch.full((bsz,), n_seg, dtype=torch.int32, device=device)
    scores = torch.empty(bsz, hkv, n_seg, dtype=torch.float32, device=device)
    budget = n_seg if args.read_budget == 0 else max(1, min(n_seg, args.read_budget // SEG))
    tail_slots = (torch.arange(bsz, device=device)[:, None] * ctx + n_seg * SEG + torch.arange(tail, device=device))
    tail_indices = tail_slots.reshape(-1).to(torch.int32)
    tail_indptr = torch.arange(bsz + 1, dtype=torch.int32, device=device) * tail
    splits = suggest_num_splits(bsz, hkv, budget + tail // SEG + 1)
    out = torch.empty(bsz, hq, d, dtype=dt, device=device)
    p_out = torch.empty(bsz, hq, splits, d, dtype=torch.float32, device=device)
    p_lse = torch.empty(bsz, hq, splits, dtype=torch.float32, device=device)
    sel = torch.empty(bsz, hkv, budget, dtype=torch.int32, device=device)

    def mosaic_full():
        score_and_select(q, desc, bounds, seg_ids_padded, counts, scores, budget, sel)
        sparse_decode_fwd(q, arena, desc, sel, k_all, v_all, tail_indptr, tail_indices, out, p_out, p_lse,
                          num_splits=splits)  # fmt: skip

    def mosaic_decode():
        sparse_decode_fwd(q, arena, desc, sel, k_all, v_all, tail_indptr, tail_indices, out, p_out, p_lse,
                          num_splits=splits)  # fmt: skip

    sel_topk = torch.empty_like(sel)

    def select_fused():
        score_and_select(q, desc, bounds, seg_ids_padded, counts, scores, budget, sel)

    def select_topk():
        segment_scores_fwd(q, desc, bounds, seg_ids_padded, counts, scores)
        select_segments(scores, seg_ids_padded, budget, out=sel_topk)

    mosaic_full()
    select_topk()  # after: it scores every request into ``scores``, the check's scores
    torch.cuda.synchronize()
    if not same_selection_scores(sel, sel_topk, scores, seg_ids_padded):
        raise AssertionError("score_and_select kept segments of other scores than segment_scores_fwd + torch.topk")
    o_check = out[:1].clone() if args.tune else None  # request 0's output under the default chan mode

    # --- correctness before timing (request 0 against the fp64 references) ---
    check = {}
    if ctx <= args.check_max_ctx:
        r_sel = sel[:1]
        o_ref = ref.ref_sparse_decode(q[:1], arena, desc, r_sel, k_all, v_all, tail_indptr[:2], tail_indices[:tail])
        check["mosaic_vs_ref_max_abs"] = float((out[:1].double().cpu() - o_ref.double().cpu()).abs().max())
        s_ref = ref.ref_segment_scores(q[:1], desc, bounds, seg_ids_padded[:1], counts[:1])
        s_got = segment_scores_fwd(q[:1], desc, bounds, seg_ids_padded[:1], counts[:1], torch.empty_like(scores[:1]))
        s_ref, s_got = s_ref.double().cpu(), s_got.double().cpu()
        finite = torch.isfinite(s_ref)
        check["scores_vs_ref_max_rel"] = float(
            ((s_got[finite] - s_ref[finite]).abs() / s_ref[finite].abs().clamp_min(1e-3)).max()
        )
        kd = kv[:pages_per_req, 0].reshape(ctx, hkv, d).float()
        vd = kv[:pages_per_req, 1].reshape(ctx, hkv, d).float()
        g = hq // hkv
        att = torch.einsum("hd,lhd->hl", q[0].float(), kd.repeat_interleave(g, 1)) / math.sqrt(d)
        o_dense = torch.einsum("hl,lhd->hd", att.softmax(-1), vd.repeat_interleave(g, 1))
        check["flashinfer_vs_torch_max_abs"] = float((o_fi[0].float() - o_dense).abs().max())
        if check["mosaic_vs_ref_max_abs"] > 3e-2 or check["flashinfer_vs_torch_max_abs"] > 3e-2:
            raise AssertionError(f"correctness check failed before timing: {check}")

    # bytes each provider reads per decode step
    sel_cpu = sel.reshape(-1).cpu()
    sel_cpu = sel_cpu[sel_cpu >= 0]
    desc_cpu = desc.cpu()
    v_end = desc_cpu[:, V_OFF].long()
    k_gran = (v_end - desc_cpu[:, K_OFF].long())
    v_gran = torch.empty_like(k_gran)
    v_gran[:-1] = desc_cpu[1:, K_OFF].long() - v_end[:-1]
    v_gran[-1] = end - v_end[-1]
    payload = int(((k_gran + v_gran)[sel_cpu]).sum()) * GRANULE_BYTES
    tail_bytes = bsz * tail * hkv * d * 2 * 2
    scan_bytes = n_total * (2 * d * 2 + 4)  # bounds + flags of every segment
    mosaic_bytes = payload + tail_bytes + scan_bytes + bsz * hq * d * 2
    dense_bytes = bsz * ctx * hkv * d * 2 * 2

    graph = args.cuda_graph
    t_fi = timed(lambda: wrapper.run(q, kv, out=o_fi), args.rep_ms, graph)
    t_full = timed(mosaic_full, args.rep_ms, graph)
    t_dec = timed(mosaic_decode, args.rep_ms, graph)
    t_sel = timed(select_fused, args.rep_ms, graph)
    t_sel_topk = timed(select_topk, args.rep_ms, graph)
    row = dict(
        shape=shape, context=ctx, batch=bsz, cuda_graph=graph, ratio_target=args.ratio, ratio_achieved=round(achieved_ratio, 3),
        read_budget_tokens=budget * SEG, segments_per_head=n_seg, num_splits=splits,
        flashinfer_ms=t_fi, mosaic_ms=t_full, mosaic_decode_ms=t_dec, speedup=t_fi / t_full,
        speedup_decode_only=t_fi / t_dec, select_ms=t_sel, select_topk_ms=t_sel_topk,
        dense_bytes_per_req_token=dense_bytes / (bsz * ctx), mosaic_bytes_per_req_token=mosaic_bytes / (bsz * ctx),
        flashinfer_tbps=dense_bytes / (t_fi * 1e-3) / 1e12, mosaic_tbps=mosaic_bytes / (t_full * 1e-3) / 1e12,
        mosaic_decode_tbps=(payload + tail_bytes) / (t_dec * 1e-3) / 1e12,
        mosaic_bw_fraction_of_copy=(mosaic_bytes / (t_full * 1e-3)) / copy_bw,
        mix=mix, check=check,
    )  # fmt: skip
    if args.tune:
        row["tune"] = []
        for warps, stages, n_splits in tune_variants(splits):
            po = torch.empty(bsz, hq, n_splits, d, dtype=torch.float32, device=device)
            pl = torch.empty(bsz, hq, n_splits, dtype=torch.float32, device=device)

            def variant(po=po, pl=pl, n=n_splits, w=warps, s=stages):
                sparse_decode_fwd(q, arena, desc, sel, k_all, v_all, tail_indptr, tail_indices, out, po, pl,
                                  num_splits=n, num_warps=w, num_stages=s)  # fmt: skip

            variant()
            torch.cuda.synchronize()
            row["tune"].append(dict(num_warps=warps, num_stages=stages, num_splits=n_splits,
                                    ms=timed(variant, args.rep_ms, graph)))  # fmt: skip
        best = min(row["tune"], key=lambda t: t["ms"])
        row["tune_best"] = dict(best, speedup_vs_default=t_dec / best["ms"],
                                tbps=(payload + tail_bytes) / (best["ms"] * 1e-3) / 1e12)  # fmt: skip
        # every chan reconstruction mode at the best launch configuration (the default mode timed again, so that
        # all modes are single samples of the same kind, not one of them a minimum over the sweep)
        po = torch.empty(bsz, hq, best["num_splits"], d, dtype=torch.float32, device=device)
        pl = torch.empty(bsz, hq, best["num_splits"], dtype=torch.float32, device=device)

        def best_launch(**kw: Any) -> Callable[[], Any]:
            """The best launch configuration with ``kw`` added, run once (its output is in ``out``)."""

            def variant() -> Any:
                return sparse_decode_fwd(q, arena, desc, sel, k_all, v_all, tail_indptr, tail_indices, out, po, pl,
                                         num_splits=best["num_splits"], num_warps=best["num_warps"],
                                         num_stages=best["num_stages"], **kw)  # fmt: skip

            variant()
            torch.cuda.synchronize()
            return variant

        row["tune_chan"] = []
        for mode, name in CHAN_MODE_NAMES.items():
            variant = best_launch(chan_mode=mode)
            err = float((out[:1].double() - o_check.double()).abs().max()) if o_check is not None else None
            ms = timed(variant, args.rep_ms, graph)
            row["tune_chan"].append(dict(chan_mode=mode, name=name, ms=ms, default=mode == CHAN_MODE,
                                         tbps=(payload + tail_bytes) / (ms * 1e-3) / 1e12,
                                         max_abs_vs_default=err))  # fmt: skip
            if err is not None and err > 3e-2:  # recorded and reported: one broken mode must not lose the run
                row["tune_chan"][-1]["mismatch"] = True
                logger.error("chan mode %s: output differs from the default mode's by %g (its time is not valid)",
                             name, err)  # fmt: skip
        logger.info("tune %s ctx=%d bs=%d chan modes at the best configuration: %s", shape, ctx, bsz,
                    ", ".join(f"{c['name']} {c['ms']:.3f} ms" for c in row["tune_chan"]))  # fmt: skip
        row["tune_maxnreg"] = []
        for cap in TUNE_MAXNREG:
            try:
                ms = timed(best_launch(maxnreg=cap), args.rep_ms, graph)
            except Exception as e:  # recorded and reported: one cap that does not compile must not lose the run
                logger.error("register cap %s failed: %r", cap, e)
                row["tune_maxnreg"].append(dict(maxnreg=cap, ms=None, failed=repr(e)[:300]))
                continue
            row["tune_maxnreg"].append(dict(maxnreg=cap, ms=ms, tbps=(payload + tail_bytes) / (ms * 1e-3) / 1e12))
        logger.info("tune %s ctx=%d bs=%d register caps at the best configuration: %s", shape, ctx, bsz,
                    ", ".join(f"{c['maxnreg'] or 'none'} {c['ms'] if c['ms'] is None else round(c['ms'], 3)} ms"
                              for c in row["tune_maxnreg"]))  # fmt: skip
        logger.info("tune %s ctx=%d bs=%d: default %.3f ms (4 warps, 2 stages, %d splits), best %.3f ms %s", shape,
                    ctx, bsz, t_dec, splits, best["ms"], best)  # fmt: skip
    kv = arena = tok = k_all = v_all = None  # free the cache before the next case (the closures hold these names)
    torch.cuda.empty_cache()
    return row


def pack_vs_prefill(args, device) -> dict:
    """Pack throughput vs one 8B-shape layer's prefill (causal attention + the layer's GEMMs), same tokens."""
    import flashinfer

    from mosaickv_sglang.kernels.format import GRANULE_BYTES
    from mosaickv_sglang.kernels.pack import pack_segments_fwd

    hq, hkv, d, hidden, inter = SHAPES["llama-3.1-8b"]
    dt = torch.bfloat16
    n_tok = args.pack_tokens
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(n_tok, hidden, dtype=dt, device=device)
    w_qkv = torch.randn(hidden, (hq + 2 * hkv) * d, dtype=dt, device=device) * 0.02
    w_o = torch.randn(hq * d, hidden, dtype=dt, device=device) * 0.02
    w_gu = torch.randn(hidden, 2 * inter, dtype=dt, device=device) * 0.02
    w_d = torch.randn(inter, hidden, dtype=dt, device=device) * 0.02
    qh = torch.randn(n_tok, hq, d, dtype=dt, device=device)
    k = torch.randn(n_tok, hkv, d, dtype=dt, device=device)
    v = torch.randn(n_tok, hkv, d, dtype=dt, device=device)

    def prefill_layer():
        _ = x @ w_qkv
        flashinfer.single_prefill_with_kv_cache(qh, k, v, causal=True)
        _ = (qh.view(n_tok, -1) @ w_o)
        gu = x @ w_gu
        _ = gu[:, :inter] @ w_d

    n_seg = n_tok // SEG
    n_total = n_seg * hkv
    plan, _ = build_plan(n_total, d, args.ratio, gen, device)
    head = torch.arange(hkv, device=device, dtype=torch.int32).repeat_interleave(n_seg)
    seg = torch.arange(n_seg, device=device).repeat(hkv)
    idx = (seg * SEG)[:, None] + torch.arange(SEG, device=device)[None, :]
    k_off, v_off, end = plan.bump_offsets(0)
    arena = torch.zeros(end * (GRANULE_BYTES // 2), dtype=dt, device=device)
    desc = torch.zeros(n_total, 8, dtype=torch.int32, device=device)
    bounds = torch.zeros(n_total, 2, d, dtype=dt, device=device)
    ids = torch.arange(n_total, dtype=torch.int32, device=device)
    t_pre = timed(prefill_layer, args.rep_ms)
    t_pack = timed(lambda: pack_segments_fwd(k, v, idx, head, plan, arena, desc, bounds, ids, k_off, v_off),
                   args.rep_ms)  # fmt: skip
    # The fast planner that chooses those strategies on the hot path, on the same segments.
    from mosaickv_sglang.planner import plan_fast

    seg_k = k[idx, head.long()[:, None]]  # [N, S, d]
    seg_v = v[idx, head.long()[:, None]]
    queries = torch.randn(n_total, 32, hq // hkv, d, device=device)
    groups = head.long()
    plan_fast(seg_k, seg_v, ratio=args.ratio, queries=queries, group_ids=groups)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        plan_fast(seg_k, seg_v, ratio=args.ratio, queries=queries, group_ids=groups)
    torch.cuda.synchronize()
    t_plan = (time.perf_counter() - t0) / reps * 1e3
    return dict(tokens=n_tok, prefill_layer_ms=t_pre, pack_layer_ms=t_pack, pack_tokens_per_s=n_tok / (t_pack * 1e-3),
                pack_overhead_fraction=t_pack / t_pre, plan_fast_layer_ms=t_plan,
                plan_overhead_fraction=t_plan / t_pre)  # fmt: skip


def markdown(rows: list[dict], pack: dict, copy_bw: float, device_name: str) -> str:
    lines = [
        f"device: {device_name}; copy bandwidth (read+write) {copy_bw / 1e12:.2f} TB/s",
        "",
        "| shape | context | batch | ratio | read budget | FlashInfer ms | mosaic ms | speedup | decode-only speedup "
        "| dense B/token | mosaic B/token | mosaic TB/s | % of copy BW |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['shape']} | {r['context']} | {r['batch']} | | | skipped: {r['skipped']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['shape']} | {r['context']} | {r['batch']} | {r['ratio_achieved']:.2f}x | {r['read_budget_tokens']} "
            f"| {r['flashinfer_ms']:.3f} | {r['mosaic_ms']:.3f} | {r['speedup']:.2f}x | {r['speedup_decode_only']:.2f}x "
            f"| {r['dense_bytes_per_req_token']:.0f} | {r['mosaic_bytes_per_req_token']:.1f} | {r['mosaic_tbps']:.2f} "
            f"| {100 * r['mosaic_bw_fraction_of_copy']:.0f}% |"
        )
    selections = [r for r in rows if "select_ms" in r]
    if selections:
        lines += ["", "the selection alone (one layer): score_and_select against the scores and torch.topk of every "
                  "request (same segments kept, checked)", "",
                  "| shape | context | batch | segments a head | read budget (segments) | score_and_select ms "
                  "| scores + torch.topk ms | speed-up |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in selections:
            lines.append(f"| {r['shape']} | {r['context']} | {r['batch']} | {r['segments_per_head']} "
                         f"| {r['read_budget_tokens'] // SEG} | {r['select_ms']:.4f} | {r['select_topk_ms']:.4f} "
                         f"| {r['select_topk_ms'] / r['select_ms']:.2f}x |")  # fmt: skip
    tuned = [r for r in rows if "tune_best" in r]
    if tuned:
        lines += ["", "| shape | context | batch | decode-only ms (4 warps, 2 stages, suggested splits) | best ms | "
                  "warps | stages | splits | speed-up | best TB/s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in tuned:
            b = r["tune_best"]
            lines.append(f"| {r['shape']} | {r['context']} | {r['batch']} | {r['mosaic_decode_ms']:.3f} "
                         f"({r['num_splits']} splits) | {b['ms']:.3f} | {b['num_warps']} | {b['num_stages']} "
                         f"| {b['num_splits']} | {b['speedup_vs_default']:.2f}x | {b['tbps']:.2f} |")  # fmt: skip
    chan = [r for r in rows if r.get("tune_chan")]
    if chan:
        names = [c["name"] for c in chan[0]["tune_chan"]]
        lines += ["", "chan reconstruction modes at each case's best launch configuration (decode-only ms; "
                  "* = current default)", "",
                  "| shape | context | batch | warps/stages/splits | " + " | ".join(names) + " | fastest | TB/s |",
                  "|---|---|---|---|" + "---|" * len(names) + "---|---|"]  # fmt: skip
        for r in chan:
            b, cs = r["tune_best"], r["tune_chan"]
            fast = min((c for c in cs if not c.get("mismatch")), key=lambda c: c["ms"])
            cells = " | ".join(f"{c['ms']:.3f}{'*' if c['default'] else ''}{' (WRONG)' if c.get('mismatch') else ''}"
                               for c in cs)  # fmt: skip
            lines.append(f"| {r['shape']} | {r['context']} | {r['batch']} | {b['num_warps']}/{b['num_stages']}/"
                         f"{b['num_splits']} | {cells} | {fast['name']} | {fast['tbps']:.2f} |")  # fmt: skip
    caps = [r for r in rows if r.get("tune_maxnreg")]
    if caps:
        names = [str(c["maxnreg"] or "none") for c in caps[0]["tune_maxnreg"]]
        lines += ["", "register caps per thread (maxnreg) at each case's best launch configuration (decode-only ms)",
                  "", "| shape | context | batch | " + " | ".join(names) + " | fastest |",
                  "|---|---|---|" + "---|" * len(names) + "---|"]  # fmt: skip
        for r in caps:
            cs = r["tune_maxnreg"]
            ok = [c for c in cs if c["ms"] is not None]
            fast = (min(ok, key=lambda c: c["ms"])["maxnreg"] or "none") if ok else "-"
            lines.append(f"| {r['shape']} | {r['context']} | {r['batch']} | "
                         + " | ".join("failed" if c["ms"] is None else f"{c['ms']:.3f}" for c in cs)
                         + f" | {fast} |")  # fmt: skip
    if pack:
        lines += [
            "",
            f"pack: {pack['tokens']} tokens of one 8B-shape layer in {pack['pack_layer_ms']:.3f} ms "
            f"({pack['pack_tokens_per_s'] / 1e6:.1f} M tokens/s) vs that layer's prefill {pack['prefill_layer_ms']:.3f} ms "
            f"-> +{100 * pack['pack_overhead_fraction']:.1f}% prefill time; fast planner {pack['plan_fast_layer_ms']:.1f} ms "
            f"(+{100 * pack['plan_overhead_fraction']:.0f}%)",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode_speed", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 131072, 524288])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--ratio", type=float, default=3.0, help="target memory compression ratio (default 3)")
    p.add_argument("--read-budget", type=int, default=4096, help="compressed tokens read per request and KV head")
    p.add_argument("--max-dense-gib", type=float, default=20.0, help="skip cases whose dense layer cache is larger")
    p.add_argument("--check-max-ctx", type=int, default=32768, help="verify against references up to this context")
    p.add_argument("--pack-tokens", type=int, default=32768)
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays (as SGLang decodes)")
    p.add_argument("--skip-pack", action="store_true", help="skip the pack/planner vs prefill measurement")
    p.add_argument("--tune", action="store_true",
                   help="also time the sparse decode kernel under other launch configurations (warps x stages x "
                        "splits, see tune_variants), report the best per case, and time every chan reconstruction "
                        "mode (sparse_decode.CHAN_MODE_NAMES) and register cap (TUNE_MAXNREG) at that best "
                        "configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/decode_speed.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (run it on the device machine)")
    device = torch.device("cuda")
    copy_bw = copy_bandwidth(device, args.rep_ms)
    logger.info("copy bandwidth %.2f TB/s", copy_bw / 1e12)
    rows = []
    for shape in args.shapes:
        hq, hkv, d, _, _ = SHAPES[shape]
        for ctx in args.contexts:
            for bsz in args.batches:
                gib = bsz * ctx * hkv * d * 2 * 2 / 2**30
                if gib > args.max_dense_gib:
                    rows.append(dict(shape=shape, context=ctx, batch=bsz, skipped=f"dense cache {gib:.0f} GiB"))
                    logger.info("skip %s ctx=%d bs=%d (%.0f GiB dense)", shape, ctx, bsz, gib)
                    continue
                t0 = time.time()
                row = run_case(shape, ctx, bsz, args, device, copy_bw)
                rows.append(row)
                logger.info("%s ctx=%d bs=%d: flashinfer %.3f ms, mosaic %.3f ms (%.2fx), ratio %.2f [%.0fs]", shape,
                            ctx, bsz, row["flashinfer_ms"], row["mosaic_ms"], row["speedup"], row["ratio_achieved"],
                            time.time() - t0)  # fmt: skip
    pack = {} if args.skip_pack else pack_vs_prefill(args, device)
    import flashinfer
    import triton

    meta = dict(date=time.strftime("%Y-%m-%d"), device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, flashinfer=flashinfer.__version__, python=platform.python_version(),
                command=" ".join(["python -m bench.decode_speed", *(argv if argv is not None else sys.argv[1:])]),
                copy_bandwidth_tbps=copy_bw / 1e12, args={k: str(v) for k, v in vars(args).items()})  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows, pack=pack), indent=1))
    sys.stdout.write(markdown(rows, pack, copy_bw, meta["device"]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
