# SPDX-License-Identifier: Apache-2.0
"""2-D sparse decode kernel vs the float64 ``ref_sparse_decode``; dense-equivalence and budget properties;
CUDA-graph replay (GPU)."""

import math

import pytest
import torch

from mkv_kernel_cases import build_packed, gpu_only, ragged_indices, random_selection
from mosaickv_sglang.kernels.format import SegmentPlan
from mosaickv_sglang.kernels.reference import ref_pack_segments, ref_sparse_decode
from mosaickv_sglang.kernels.segment_scores import segment_scores_fwd, select_segments
from mosaickv_sglang.kernels.sparse_decode import (
    CHAN_MODE_NAMES,
    CHAN_WORD_BLOCKS,
    sparse_decode_fwd,
    suggest_num_splits,
)

H_KV = 2

# (seed, head_dim, group, q dtype, seg size, num_splits, tail lengths, selected per request, NSEL, tail dtype)
DECODE_CASES = [
    (0, 64, 1, torch.float16, 16, 1, [0, 17, 1], [3, 0, 5], 6, torch.float16),
    (1, 128, 3, torch.float32, 32, 3, [97, 0], [4, 2], 5, torch.float32),
    (2, 64, 4, torch.float32, 64, 2, [1, 33, 0], [1, 5, 5], 5, torch.float16),
    (3, 128, 8, torch.float16, 16, 5, [17], [7], 8, torch.float16),
    (4, 64, 8, torch.float32, 32, 1, [5, 64], [2, 6], 6, torch.float32),
    (5, 128, 1, torch.float16, 64, 4, [0, 0, 3], [0, 3, 1], 3, torch.float32),
]


# low-rank-heavy cases, ranks up to rmax over several 16-rank steps (fields as DECODE_CASES, then rmax as (K, V))
LOWRANK_CASES = [
    (50, 64, 1, torch.float16, 64, 2, [0, 19, 1], [6, 2, 9], 10, torch.float16, (40, 33)),
    (51, 128, 3, torch.float32, 64, 1, [33], [10], 10, torch.float32, (17, 48)),
    (52, 128, 4, torch.float16, 128, 3, [97, 5], [4, 9], 10, torch.float16, (64, 16)),
    (53, 64, 8, torch.float32, 32, 2, [1, 0], [7, 3], 8, torch.float16, (31, 32)),
]


class DecodeInputs:
    """Everything sparse_decode_fwd takes, for one seeded case."""

    def __init__(self, seed, d, group, qdt, s, num_splits, tail_lens, counts, nsel, tail_dtype, device, n_seg=12,
                 strided=False, forms="mixed", rmax=16):  # fmt: skip
        bsz = len(counts)
        pool = n_seg * s + sum(tail_lens) + 7
        self.case = build_packed(seed, n=n_seg, seg_size=s, head_dim=d, h_kv=H_KV, pool=pool, device=device,
                                 forms=forms, rmax=rmax)  # fmt: skip
        gen = torch.Generator().manual_seed(seed + 1000)
        self.kt = torch.randn(pool, H_KV, d, generator=gen).to(tail_dtype).to(device)
        self.vt = torch.randn(pool, H_KV, d, generator=gen).to(tail_dtype).to(device)
        self.indptr, self.indices = ragged_indices(gen, tail_lens, pool, device)
        self.sel = random_selection(gen, n_seg, bsz, H_KV, counts, nsel, device)
        h_q = H_KV * group
        if strided:
            self.q = torch.randn(bsz, h_q, 2 * d, generator=gen).to(qdt).to(device)[..., ::2]
        else:
            self.q = torch.randn(bsz, h_q, d, generator=gen).to(qdt).to(device)
        self.out = torch.full((bsz, h_q, d), float("nan"), dtype=qdt, device=device)
        self.po = torch.full((bsz, h_q, num_splits, d), float("nan"), device=device)
        self.pl = torch.full((bsz, h_q, num_splits), float("nan"), device=device)
        self.lse = torch.full((bsz, h_q), float("nan"), device=device)
        self.num_splits = num_splits

    def args(self):
        c = self.case
        return (self.q, c.arena, c.desc, self.sel, self.kt, self.vt, self.indptr, self.indices, self.out, self.po,
                self.pl)  # fmt: skip

    def run(self, **kw):
        return sparse_decode_fwd(*self.args(), None, self.num_splits, out_lse=self.lse, **kw)

    def ref(self):
        return ref_sparse_decode(*self.args(), return_lse=True)


@pytest.mark.parametrize("seed, d, group, qdt, s, splits, tails, counts, nsel, tdt", DECODE_CASES)
def test_sparse_decode_matches_reference(seed, d, group, qdt, s, splits, tails, counts, nsel, tdt, device, tol):
    """Output and LSE match the fp64 reference over mixed K/V forms, ragged tails (0, 1, 17, 97), per-request
    selection counts with interleaved -1, GQA 1/3/4/8 and split counts 1..5; a request with nothing to attend
    gets 0 and LSE -inf."""
    x = DecodeInputs(seed, d, group, qdt, s, splits, tails, counts, nsel, tdt, device)
    assert x.run() is x.out
    ref, ref_lse = x.ref()
    torch.testing.assert_close(x.out.double().cpu(), ref, **tol(qdt))
    got_lse = x.lse.double().cpu()
    assert torch.equal(torch.isneginf(got_lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(got_lse[fin], ref_lse[fin], **tol(qdt))


@pytest.mark.parametrize("seed, d, group, qdt, s, splits, tails, counts, nsel, tdt, rmax", LOWRANK_CASES)
def test_sparse_decode_low_rank_matches_reference(seed, d, group, qdt, s, splits, tails, counts, nsel, tdt, rmax,
                                                  device, tol):  # fmt: skip
    """Low-rank K is scored as ``(q B^T) A^T`` and low-rank V applied as ``(p A) B`` without rebuilding rows: same
    output and LSE as the fp64 reference, for ranks 1 to 64 (one to four 16-rank steps, ragged last step), kept rows
    1 to S, mixed with dense and chan sides."""
    x = DecodeInputs(seed, d, group, qdt, s, splits, tails, counts, nsel, tdt, device, n_seg=14, forms="lowrank",
                     rmax=rmax)  # fmt: skip
    ref, ref_lse = x.ref()
    x.run()
    torch.testing.assert_close(x.out.double().cpu(), ref, **tol(qdt))
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(x.lse.double().cpu()), torch.isneginf(ref_lse))
    torch.testing.assert_close(x.lse.double().cpu()[fin], ref_lse[fin], **tol(qdt))


# chan-heavy cases for the chan modes (fields as DECODE_CASES)
CHAN_CASES = [
    (40, 64, 1, torch.float16, 16, 2, [0, 19, 1], [6, 2, 9], 10, torch.float16),
    (41, 128, 3, torch.float32, 64, 1, [33], [10], 10, torch.float32),
    (42, 128, 4, torch.float16, 32, 3, [97, 5], [4, 9], 10, torch.float16),
    (43, 64, 8, torch.float32, 64, 2, [1, 0], [7, 3], 8, torch.float16),
]


@pytest.mark.parametrize("seed, d, group, qdt, s, splits, tails, counts, nsel, tdt", CHAN_CASES)
def test_sparse_decode_chan_modes_match_reference(seed, d, group, qdt, s, splits, tails, counts, nsel, tdt, device,
                                                  tol):  # fmt: skip
    """Every chan mode matches the fp64 reference on chan-heavy caches (chan k of 1, d - 1, d/4, d/2, one above each
    and random; ragged m and tails; GQA 1/3/4/8); in the interpreter the modes that rebuild rows give the same
    output bit for bit (the same rows); word-blocks sums its products 32 channels at a time (other rounding)."""
    x = DecodeInputs(seed, d, group, qdt, s, splits, tails, counts, nsel, tdt, device, n_seg=14, forms="chan")
    ref, ref_lse = x.ref()
    first = None
    for mode in CHAN_MODE_NAMES:
        x.out.fill_(float("nan"))
        x.run(chan_mode=mode)
        torch.testing.assert_close(x.out.double().cpu(), ref, **tol(qdt), msg=lambda m: f"chan_mode {mode}: {m}")
        fin = torch.isfinite(ref_lse)
        torch.testing.assert_close(x.lse.double().cpu()[fin], ref_lse[fin], **tol(qdt))
        if first is None:
            first = x.out.clone()
        elif device.type == "cpu" and mode != CHAN_WORD_BLOCKS:
            assert torch.equal(x.out, first), f"chan_mode {mode} differs from chan_mode 0"


def test_sparse_decode_strided_q_and_out(device, tol):
    """Non-contiguous q and a user-provided strided out (a view into a larger buffer) work; nothing else in the
    buffer is touched."""
    x = DecodeInputs(7, 64, 4, torch.float32, 16, 2, [9, 40], [4, 3], 4, torch.float16, device, strided=True)
    assert not x.q.is_contiguous()
    big = torch.zeros(2, 8, 3, 64, device=device)
    x.out = big[:, :, 1]
    x.run()
    ref, _ = x.ref()
    torch.testing.assert_close(x.out.double().cpu(), ref, **tol(torch.float32))
    assert (big[:, :, 0] == 0).all() and (big[:, :, 2] == 0).all()


def test_sparse_decode_tail_only(device, tol):
    """With an empty selection (NSEL = 0: nothing compressed yet) decode is dense attention over the tail."""
    x = DecodeInputs(9, 128, 3, torch.float16, 16, 3, [97, 1], [0, 0], 0, torch.float16, device, n_seg=2)
    x.run()
    ref, _ = x.ref()
    torch.testing.assert_close(x.out.double().cpu(), ref, **tol(torch.float16))


def _dense_cache(seed, d, group, s, seg_counts, tail_lens, device, qdt):
    """Requests whose first seg_counts[b] * S tokens are packed as full dense segments and whose last tail_lens[b]
    tokens stay in the pool; also returns the plain per-request K/V of the whole context."""
    gen = torch.Generator().manual_seed(seed)
    bsz = len(seg_counts)
    ctx = [c * s + t for c, t in zip(seg_counts, tail_lens)]
    pool = sum(ctx) + 5
    k_pool = torch.randn(pool, H_KV, d, generator=gen).half().to(device)
    v_pool = torch.randn(pool, H_KV, d, generator=gen).half().to(device)
    perm = torch.randperm(pool, generator=gen)
    slots, start = [], 0
    for n in ctx:
        slots.append(perm[start : start + n])
        start += n
    tok, heads, owner = [], [], []
    for b in range(bsz):
        for h in range(H_KV):
            for j in range(seg_counts[b]):
                tok.append(slots[b][j * s : (j + 1) * s])
                heads.append(h)
                owner.append((b, h))
    n = len(tok)
    plan = SegmentPlan.uniform(n, s, d, device=device)
    k_off, v_off, end = plan.bump_offsets(0)
    arena = torch.zeros(max(end, 1) * 64, dtype=torch.float16, device=device)
    desc = torch.zeros(n, 8, dtype=torch.int32, device=device)
    bounds = torch.zeros(n, 2, d, dtype=torch.float16, device=device)
    seg_ids = torch.arange(n, dtype=torch.int32, device=device)
    heads_t = torch.tensor(heads, dtype=torch.int32, device=device)
    ref_pack_segments(k_pool, v_pool, torch.stack(tok).to(device), heads_t, plan, arena, desc, bounds, seg_ids,
                      k_off.to(device), v_off.to(device))  # fmt: skip
    width = max(seg_counts)
    sel = torch.full((bsz, H_KV, width), -1, dtype=torch.int32)
    fill = {}
    for i, (b, h) in enumerate(owner):
        sel[b, h, fill.get((b, h), 0)] = i
        fill[(b, h)] = fill.get((b, h), 0) + 1
    tails = [slots[b][seg_counts[b] * s :] for b in range(bsz)]
    indptr = torch.tensor([0] + [int(x) for x in torch.tensor(tail_lens).cumsum(0)], dtype=torch.int32)
    indices = torch.cat(tails).to(device)
    q = torch.randn(bsz, H_KV * group, d, generator=gen).to(qdt).to(device)
    return dict(q=q, arena=arena, desc=desc, bounds=bounds, sel=sel.to(device), k_pool=k_pool, v_pool=v_pool,
                indptr=indptr.to(device), indices=indices, slots=slots)  # fmt: skip


@pytest.mark.parametrize("d, group, qdt, splits", [(64, 3, torch.float32, 3), (128, 4, torch.float16, 1)])
def test_all_dense_full_selection_equals_dense_attention(d, group, qdt, splits, device, tol):
    """With every segment dense, m = S, and all segments selected, sparse decode equals plain softmax attention
    over the original context tokens (independent of the packed-format reference)."""
    s = 16
    x = _dense_cache(3, d, group, s, [3, 1], [17, 0], device, qdt)
    bsz, h_q = x["q"].shape[:2]
    out = torch.empty(bsz, h_q, d, dtype=qdt, device=device)
    po = torch.empty(bsz, h_q, splits, d, device=device)
    pl = torch.empty(bsz, h_q, splits, device=device)
    sparse_decode_fwd(x["q"], x["arena"], x["desc"], x["sel"], x["k_pool"], x["v_pool"], x["indptr"], x["indices"],
                      out, po, pl, None, splits)  # fmt: skip
    for b in range(bsz):
        slot = x["slots"][b].to(device)
        for hq in range(h_q):
            h = hq // group
            k = x["k_pool"][slot, h].double()
            v = x["v_pool"][slot, h].double()
            p = torch.softmax((k @ x["q"][b, hq].double()) / math.sqrt(d), 0)
            torch.testing.assert_close(out[b, hq].double(), p @ v, **tol(qdt))


def test_budgeted_decode_equals_reference_on_selected(device, tol):
    """Scores -> select_segments(budget) -> decode equals the reference computed on the same selected segments;
    always-read segments are among the selected ones."""
    d, group, s, n = 64, 4, 16, 12
    case = build_packed(17, n=n, seg_size=s, head_dim=d, h_kv=H_KV, pool=n * s + 40, device=device,
                        always_read_frac=0.15)  # fmt: skip
    gen = torch.Generator().manual_seed(17)
    counts = [10, 6]
    cand = random_selection(gen, n, 2, H_KV, counts, 10, device)
    cand = torch.sort(cand, dim=-1, descending=True).values  # valid ids first
    q = torch.randn(2, H_KV * group, d, generator=gen).half().to(device)
    scores = torch.empty(2, H_KV, 10, device=device)
    segment_scores_fwd(q, case.desc, case.bounds, cand, torch.tensor(counts, dtype=torch.int32, device=device), scores)
    sel = select_segments(scores, cand, 4)
    always = case.desc[:, 7] & 1
    for b in range(2):
        for h in range(H_KV):
            ids = [i for i in cand[b, h, : counts[b]].tolist() if i >= 0]
            pinned = [i for i in ids if always[i]]
            chosen = set(sel[b, h].tolist())
            assert set(pinned[:4]) <= chosen
    indptr, indices = ragged_indices(gen, [5, 30], n * s + 40, device)
    out = torch.empty(2, H_KV * group, d, dtype=torch.float16, device=device)
    po = torch.empty(2, H_KV * group, 2, d, device=device)
    pl = torch.empty(2, H_KV * group, 2, device=device)
    args = (q, case.arena, case.desc, sel, case.k_src, case.v_src, indptr, indices, out, po, pl, None, 2)
    sparse_decode_fwd(*args)
    torch.testing.assert_close(out.double().cpu(), ref_sparse_decode(*args), **tol(torch.float16))


def test_suggest_num_splits():
    """The heuristic aims at ~8 programs per SM and never gives a split under two segments."""
    assert suggest_num_splits(1, 8, 64) == 32
    assert suggest_num_splits(1, 8, 2048) == 64
    assert suggest_num_splits(8, 8, 512) == 16  # 17 wanted, rounded down to a power of two
    assert suggest_num_splits(64, 8, 64) == 2  # 3 wanted
    assert suggest_num_splits(1, 1, 3) == 1
    assert 1 <= suggest_num_splits(4, 2, 1000) <= 64
    # every batch size, head count and length a server meets gives one of a handful of values (each value is a
    # compile of the kernels: a new one mid-serving stalls the scheduler)
    seen = {suggest_num_splits(b, h, w) for b in range(1, 257) for h in (1, 2, 3, 4, 8) for w in range(1, 300, 7)}
    assert seen <= {1, 2, 4, 8, 16, 32, 64}


@pytest.mark.parametrize(
    "idx, bad, match",
    [
        (0, lambda t: t[:, :3], "sel_ids: expected H_kv"),
        (0, lambda t: t.to(torch.int32), "q: expected dtype"),
        (3, lambda t: t.long(), "sel_ids: expected dtype torch.int32"),
        (4, lambda t: t[:, :1], r"k_tail_buf: expected shape \[\*, 2, 64\]"),
        (6, lambda t: t[:2], r"tail_indptr: expected shape \[3\]"),
        (8, lambda t: t[:1], r"out: expected shape \[2, 8, 64\]"),
        (9, lambda t: t[:, :, :1], r"partial_out: expected shape \[2, 8, 2, 64\]"),
        (10, lambda t: t.half(), "partial_lse: expected dtype torch.float32"),
        (1, lambda t: t.float(), "arena: expected dtype"),
    ],
)
def test_sparse_decode_rejects_bad_arguments(idx, bad, match, device):
    """Bad metadata raises ValueError naming the argument (positive control first)."""
    x = DecodeInputs(8, 64, 4, torch.float16, 16, 2, [3, 0], [2, 1], 3, torch.float16, device, n_seg=4)
    args = list(x.args()) + [None, 2]
    sparse_decode_fwd(*args)
    args[idx] = bad(args[idx])
    with pytest.raises(ValueError, match=match):
        sparse_decode_fwd(*args)


def test_sparse_decode_rejects_bad_scalars(device):
    x = DecodeInputs(8, 64, 4, torch.float16, 16, 2, [3, 0], [2, 1], 3, torch.float16, device, n_seg=4)
    with pytest.raises(ValueError, match=r"partial_out: expected shape \[2, 8, 3, 64\]"):
        sparse_decode_fwd(*x.args(), None, 3)
    with pytest.raises(ValueError, match="num_splits: expected >= 1, got 0"):
        sparse_decode_fwd(*x.args(), None, 0)
    with pytest.raises(ValueError, match="sm_scale: expected a positive finite float"):
        sparse_decode_fwd(*x.args(), float("nan"), 2)
    with pytest.raises(ValueError, match=r"out_lse: expected shape \[2, 8\]"):
        sparse_decode_fwd(*x.args(), None, 2, out_lse=x.lse[:1])
    with pytest.raises(ValueError, match=r"num_warps: expected one of \(1, 2, 4, 8, 16\), got 3"):
        sparse_decode_fwd(*x.args(), None, 2, num_warps=3)
    with pytest.raises(ValueError, match="num_stages: expected <= 6, got 7"):
        sparse_decode_fwd(*x.args(), None, 2, num_stages=7)
    for bad in (5, -1, True, "popcount", 2.0):
        with pytest.raises(ValueError, match=rf"chan_mode: expected one of 0 \(ptr-gather\), 1 \(tl-gather\), "
                                             rf"2 \(popcount\), 3 \(row-compact\), 4 \(word-blocks\), "
                                             rf"got {bad!r}"):  # fmt: skip
            sparse_decode_fwd(*x.args(), None, 2, chan_mode=bad)
    with pytest.raises(ValueError, match="maxnreg: expected >= 32, got 16"):
        sparse_decode_fwd(*x.args(), None, 2, maxnreg=16)
    with pytest.raises(TypeError, match="maxnreg: expected int, got float"):
        sparse_decode_fwd(*x.args(), None, 2, maxnreg=128.0)


@pytest.mark.parametrize("warps, stages, maxnreg", [(2, 1, None), (8, 3, None), (4, 2, 128)])
def test_sparse_decode_launch_config_keeps_results(warps, stages, maxnreg, device, tol):
    """Another launch configuration (the tuning bench's alternatives, a register cap) gives the reference's output."""
    x = DecodeInputs(11, 128, 4, torch.float16, 16, 2, [17, 0], [5, 2], 6, torch.float16, device)
    x.run(num_warps=warps, num_stages=stages, maxnreg=maxnreg)
    ref, _ = x.ref()
    torch.testing.assert_close(x.out.double().cpu(), ref, **tol(torch.float16))


def test_sparse_decode_debug_checks(device, monkeypatch):
    """With MOSAICKV_DEBUG_CHECKS=1, out-of-range segment ids and tail slots are refused before launch."""
    monkeypatch.setenv("MOSAICKV_DEBUG_CHECKS", "1")
    x = DecodeInputs(8, 64, 4, torch.float16, 16, 2, [3, 0], [2, 1], 3, torch.float16, device, n_seg=4)
    x.run()
    x.sel[0, 0, 0] = 4
    with pytest.raises(ValueError, match=r"sel_ids: expected entries in \[0, 4\)"):
        x.run()
    x.sel[0, 0, 0] = -1
    x.indices[0] = x.kt.shape[0]
    with pytest.raises(ValueError, match="tail_indices: expected entries in"):
        x.run()


@gpu_only
@pytest.mark.parametrize("d, group", [(128, 4), (64, 8), (128, 1)])
def test_sparse_decode_bf16_gpu(d, group):
    """bf16 arena, q and tail on the GPU match the fp64 reference at 64-token segments and long tails."""
    dev = torch.device("cuda")
    x = DecodeInputs(21, d, group, torch.bfloat16, 64, 4, [0, 97, 513, 2047], [12, 3, 0, 20], 24, torch.bfloat16,
                     dev, n_seg=30)  # fmt: skip
    # bf16 arena: rebuild the case with a bf16 pool
    x.case = build_packed(21, n=30, seg_size=64, head_dim=d, h_kv=H_KV, pool=x.kt.shape[0], device=dev,
                          dtype=torch.bfloat16, rmax=32)  # fmt: skip
    x.run()
    ref, _ = x.ref()
    torch.testing.assert_close(x.out.double().cpu(), ref, atol=2e-2, rtol=2e-2)


@gpu_only
def test_sparse_decode_cuda_graph_replay_after_replan():
    """Captured once with fixed buffers, replays follow new selections and tail lengths copied into them."""
    dev = torch.device("cuda")
    d, group, s, n, nsel, splits, bsz = 128, 4, 64, 24, 8, 4, 3
    max_tail = 300
    case = build_packed(31, n=n, seg_size=s, head_dim=d, h_kv=H_KV, pool=n * s + 3 * max_tail, device=dev,
                        dtype=torch.bfloat16, rmax=32)  # fmt: skip
    pool = case.k_src.shape[0]
    h_q = H_KV * group
    q = torch.randn(bsz, h_q, d, device=dev, dtype=torch.bfloat16)
    sel = torch.full((bsz, H_KV, nsel), -1, dtype=torch.int32, device=dev)
    indptr = torch.zeros(bsz + 1, dtype=torch.int32, device=dev)
    indices = torch.zeros(bsz * max_tail, dtype=torch.int64, device=dev)
    out = torch.empty(bsz, h_q, d, dtype=torch.bfloat16, device=dev)
    po = torch.empty(bsz, h_q, splits, d, device=dev)
    pl = torch.empty(bsz, h_q, splits, device=dev)
    args = (q, case.arena, case.desc, sel, case.k_src, case.v_src, indptr, indices, out, po, pl, None, splits)

    def replan(seed, counts, tails):
        gen = torch.Generator().manual_seed(seed)
        sel.copy_(random_selection(gen, n, bsz, H_KV, counts, nsel, dev))
        ip, idx = ragged_indices(gen, tails, pool, dev)
        indptr.copy_(ip)
        indices[: idx.numel()].copy_(idx)
        q.copy_(torch.randn(bsz, h_q, d, generator=gen).to(torch.bfloat16))

    replan(0, [8, 2, 0], [1, 17, 0])
    sparse_decode_fwd(*args)  # warm-up compiles before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sparse_decode_fwd(*args)
    for seed, counts, tails in [(1, [3, 8, 5], [97, 0, 300]), (2, [0, 0, 1], [0, 0, 0]), (3, [8, 8, 8], [300, 2, 5])]:
        replan(seed, counts, tails)
        graph.replay()
        torch.cuda.synchronize()
        ref = ref_sparse_decode(*args)
        torch.testing.assert_close(out.double().cpu(), ref, atol=2e-2, rtol=2e-2)
