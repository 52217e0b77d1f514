# SPDX-License-Identifier: Apache-2.0
"""CUDA-graph decode of MosaicAttnBackend, emulated on the CPU as SGLang 0.5.17's decode graph runner drives it.

Per step the runner pads the batch to a captured size (``req_pool_indices`` 0, ``seq_lens`` 1 on padded rows,
``out_cache_loc`` of the real rows only, ``num_padding``), calls ``init_forward_metadata_out_graph`` and replays
the layers, which may read nothing but the static buffers. Here the layers are run on the padded batch after that
same call, and compared with the eager path (and SGLang's torch_native backend at ratio 1).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import List

import pytest
import torch

pytest.importorskip("sglang")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helper modules (importlib import mode)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench.host_syncs

import mkv_backend_cases  # noqa: E402
import test_kv_pool  # noqa: E402
from bench.host_syncs import HostSyncCounter  # noqa: E402
from mkv_backend_cases import Scenario, config, layer  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

TOL = dict(atol=3e-3, rtol=3e-3)
PROMPTS = [1, 16, 37, 80, 5, 50]
CAPTURE_BS = [1, 2, 4, 8]
# requests decoded per step: the batch size changes, and with it the captured size and the padding
STEPS = [[0, 1, 2, 3, 4, 5], [1, 3], [0, 2, 3, 4, 5], [5], [0, 1, 2], [0, 1, 2, 3, 4, 5], [2, 4, 5], [3]]
SEAL_AFTER = 2  # seal every due page after this step, in both scenarios


@pytest.fixture(params=[64, 128], ids=["d64", "d128"])
def head_dim(request, monkeypatch):
    for mod in (mkv_backend_cases, test_kv_pool):
        monkeypatch.setattr(mod, "D", request.param)
    return request.param


def _decode_subset(sc: Scenario, reqs: List[int]) -> SimpleNamespace:
    """One new token for the requests ``reqs`` only (SGLang's alloc_decode)."""
    new = torch.tensor([sc.lens[b] + 1 for b in reqs], dtype=torch.int64)
    last = torch.tensor([int(sc.req_to_token[b, sc.lens[b] - 1]) for b in reqs])
    out = sc.alloc.alloc_decode(new, new, last)
    assert out is not None
    for i, b in enumerate(reqs):
        sc.req_to_token[b, sc.lens[b]] = int(out[i])
        sc.lens[b] += 1
    return SimpleNamespace(forward_mode=ForwardMode.DECODE, out_cache_loc=out, req_pool_indices=torch.tensor(reqs),
                           seq_lens=new, seq_lens_cpu=new, encoder_lens=None, batch_size=len(reqs))  # fmt: skip


def _pad(batch: SimpleNamespace) -> SimpleNamespace:
    """The runner's replay view (build_replay_fb_view) of ``batch`` padded to the next captured size."""
    raw = batch.batch_size
    bs = next(c for c in CAPTURE_BS if c >= raw)
    pad = bs - raw
    seq = torch.cat([batch.seq_lens, torch.ones(pad, dtype=torch.int64)])
    return SimpleNamespace(
        forward_mode=ForwardMode.DECODE, batch_size=bs, num_padding=pad, out_cache_loc=batch.out_cache_loc,
        req_pool_indices=torch.cat([batch.req_pool_indices, torch.zeros(pad, dtype=torch.int64)]),
        seq_lens=seq, seq_lens_cpu=seq.clone(), encoder_lens=None,
    )  # fmt: skip


def _capture_batch(bs: int) -> SimpleNamespace:
    """What capture_prepare hands the backend: every row padding-like (request 0, one token, slot 0)."""
    one = torch.ones(bs, dtype=torch.int64)
    zero = torch.zeros(bs, dtype=torch.int64)
    return SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=bs, out_cache_loc=zero, req_pool_indices=zero,
                           seq_lens=one, seq_lens_cpu=one, encoder_lens=None)  # fmt: skip


def _qkv(sc: Scenario, n: int, pad: int):
    q, k, v = sc.qkv(n)
    d = mkv_backend_cases.D
    z = torch.randn(pad, q.shape[1]).to(q.dtype), torch.randn(pad, *k.shape[1:]).to(k.dtype)
    padded = torch.cat([q, z[0]]), torch.cat([k, z[1]]), torch.cat([v, z[1]])
    assert q.shape[1] % d == 0
    return (q, k, v), padded


def _prefill(g: Scenario, e: Scenario) -> None:
    bg, be = g.extend_batch(PROMPTS), e.extend_batch(PROMPTS)
    for sc, b in ((g, bg), (e, be)):
        sc.mosaic.init_forward_metadata(b)
    g.native.init_forward_metadata(bg)
    for li in range(test_kv_pool.LAYERS):
        q, k, v = g.qkv(bg.out_cache_loc.numel())
        lay = layer(li, g.group)
        g.mosaic.forward_extend(q, k, v, lay, bg)
        e.mosaic.forward_extend(q, k, v, lay, be)
        g.native.forward_extend(q, k, v, lay, bg)


def _static_ptrs(backend) -> dict:
    gs = backend._graph
    return {n: getattr(gs, n).data_ptr() for n in ("seg_ids", "seg_counts", "tail_indptr", "tail_indices", "scores",
                                                   "sel_ids", "partial_out", "partial_lse", "write_slots", "ring_rows")}


@pytest.mark.parametrize("ratio", [1.0, 3.0], ids=["ratio1", "ratio3"])
@pytest.mark.parametrize("group", [1, 4], ids=["mha", "gqa4"])
def test_graph_decode_matches_eager(group, ratio, head_dim):
    """Graph-mode decode over changing, padded batches of ragged requests, with a seal midway: outputs equal eager
    mosaic's (and torch_native's at ratio 1), no host synchronisation in the layers, the query windows equal, and
    the static buffers keep their addresses."""
    budget = 0 if ratio == 1.0 else 2 * test_kv_pool.S
    cfg = config(ratio=ratio, read_budget=budget)
    g, e = Scenario(cfg, group, seed=11), Scenario(cfg, group, seed=11)
    g.mosaic.init_cuda_graph_state(max_bs=max(CAPTURE_BS), max_num_tokens=max(CAPTURE_BS))
    ptrs = _static_ptrs(g.mosaic)
    _prefill(g, e)
    # capture (and the runner's warmup runs): padding rows only, no host state touched
    window_before = [w.clone() for w in (g.mosaic.sealer.window.ring, g.mosaic.sealer.window.owner)]
    next_before = list(g.mosaic.sealer.window._next)
    for bs in reversed(CAPTURE_BS):
        cap = _capture_batch(bs)
        g.mosaic.init_forward_metadata_out_graph(cap, in_capture=True)
        for li in range(test_kv_pool.LAYERS):
            _, (q, k, v) = _qkv(g, 0, bs)
            g.mosaic.forward_decode(q, k, v, layer(li, group), cap)
    win = g.mosaic.sealer.window
    assert win._next == next_before
    torch.testing.assert_close(win.ring[:, : win.window], window_before[0][:, : win.window])
    sealed_seen = 0
    for step, reqs in enumerate(STEPS):
        bg, be = _decode_subset(g, reqs), _decode_subset(e, reqs)
        view = _pad(bg)
        g.mosaic.init_forward_metadata_out_graph(view)
        e.mosaic.init_forward_metadata(be)
        g.native.init_forward_metadata(bg)
        md = g.mosaic.forward_metadata
        assert md.graph and md.seg_ids_padded.shape[0] == view.batch_size
        sealed_seen += int(md.seg_counts.sum())
        assert md.seg_ids_padded.data_ptr() == ptrs["seg_ids"] and md.write_slots.data_ptr() == ptrs["write_slots"]
        for li in range(test_kv_pool.LAYERS):
            (q, k, v), (qp, kp, vp) = _qkv(g, len(reqs), view.num_padding)
            lay = layer(li, group)
            with HostSyncCounter() as count:
                og = g.mosaic.forward_decode(qp, kp, vp, lay, view)
            assert count.syncs == 0 and count.sized == 0, dict(count.by_name)
            oe = e.mosaic.forward_decode(q, k, v, lay, be)
            torch.testing.assert_close(og[: len(reqs)].float(), oe.float(), **TOL)
            if ratio == 1.0:
                on = g.native.forward_decode(q, k, v, lay, bg)
                torch.testing.assert_close(og[: len(reqs)].float(), on.float(), **TOL)
        assert _static_ptrs(g.mosaic) == ptrs
        if step == SEAL_AFTER:
            kind = "dense" if ratio == 1.0 else "chan"
            assert torch.equal(g.seal(kind), e.seal(kind))
    assert sealed_seen > 0  # the steps after the seal read sealed segments through the static tables
    wg, we = g.mosaic.sealer.window, e.mosaic.sealer.window
    assert wg._next == we._next and wg._count == we._count
    for li in range(test_kv_pool.LAYERS):
        torch.testing.assert_close(wg.queries(li), we.queries(li), atol=0, rtol=0)
    g.pool.check_invariants()


def _graph_buffers(backend, bs: int) -> dict:
    """The static buffers a graph plan of ``bs`` rows fills, on the host (the tail indices up to its length)."""
    gs = backend._graph
    total = int(gs.tail_indptr[bs])
    return {"seg_ids": gs.seg_ids[:bs].cpu(), "seg_counts": gs.seg_counts[:bs].cpu(),
            "tail_indptr": gs.tail_indptr[: bs + 1].cpu(), "tail_indices": gs.tail_indices[:total].cpu(),
            "write_slots": gs.write_slots[:bs].cpu(), "ring_rows": gs.ring_rows[:bs].cpu()}  # fmt: skip


def test_graph_plan_reads_the_noted_batch(monkeypatch):
    """A batch noted by the overlap hook (batch_inputs.note_scheduled_batch, here without a stream) is read through
    read_rows_and_slots when the forward batch borrows its out_cache_loc tensor, with the same plan as the plain
    reads; a note for another batch is ignored."""
    import mosaickv_sglang.attention_backend as backend_mod
    from mosaickv_sglang.batch_inputs import clear_scheduled_batch, note_scheduled_batch

    calls = []
    real_read = backend_mod.read_rows_and_slots

    def counted(*args, **kwargs):
        calls.append(args[2])
        return real_read(*args, **kwargs)

    monkeypatch.setattr(backend_mod, "read_rows_and_slots", counted)
    cfg = config(ratio=3.0, read_budget=2 * test_kv_pool.S)
    noted, plain = Scenario(cfg, 4, seed=11), Scenario(cfg, 4, seed=11)
    for sc in (noted, plain):
        sc.mosaic.init_cuda_graph_state(max_bs=max(CAPTURE_BS), max_num_tokens=max(CAPTURE_BS))
    _prefill(noted, plain)
    try:
        for step, reqs in enumerate(STEPS):
            bn, bp = _decode_subset(noted, reqs), _decode_subset(plain, reqs)
            vn, vp = _pad(bn), _pad(bp)
            if step % 3 == 2:  # a note for another batch (one request more): not used
                loc = bn.out_cache_loc
                note_scheduled_batch(torch.tensor(reqs + reqs[:1]), torch.cat([loc, loc[:1]]), None)
            else:
                note_scheduled_batch(torch.tensor(reqs), bn.out_cache_loc, None)
            noted.mosaic.init_forward_metadata_out_graph(vn)
            clear_scheduled_batch()  # as the hook after run_batch does
            plain.mosaic.init_forward_metadata_out_graph(vp)
            got, want = _graph_buffers(noted.mosaic, vn.batch_size), _graph_buffers(plain.mosaic, vp.batch_size)
            for name in want:
                assert torch.equal(got[name], want[name]), (step, name)
    finally:
        clear_scheduled_batch()
    assert calls == [len(r) for i, r in enumerate(STEPS) if i % 3 != 2]
    noted.pool.check_invariants()


def test_in_capture_without_graph_state_raises():
    sc = Scenario(config(), 1, seed=0)
    with pytest.raises(NotImplementedError, match="--mosaic-cuda-graph on"):
        sc.mosaic.init_forward_metadata_out_graph(_capture_batch(2), in_capture=True)


class _CudaSide:
    """One mosaic backend on a CUDA pool (no stock pool): the GPU test's graph side and eager side."""

    def __init__(self, cfg, group: int, monkeypatch) -> None:
        from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator

        from mosaickv_sglang.attention_backend import MosaicAttnBackend

        real = test_kv_pool.build_mha_kv_pool

        def on_cuda(stub, size, cls):
            stub.device = "cuda"
            return real(stub, size, cls)

        monkeypatch.setattr(test_kv_pool, "build_mha_kv_pool", on_cuda)
        S = test_kv_pool.S
        self.group = group
        self.pool = test_kv_pool.build_pool(mkv_backend_cases.SIZE, mkv_backend_cases.HOT, cfg)
        self.alloc = PagedTokenToKVPoolAllocator(mkv_backend_cases.SIZE, page_size=S, dtype=test_kv_pool.DT,
                                                 device="cuda", kvcache=self.pool, need_sort=False)  # fmt: skip
        self.req_to_token = torch.zeros(mkv_backend_cases.MAX_REQS, mkv_backend_cases.MAX_CTX, dtype=torch.int32,
                                        device="cuda")  # fmt: skip
        self.lens: List[int] = []
        rtp = SimpleNamespace(req_to_token=self.req_to_token)
        runner = SimpleNamespace(device="cuda", req_to_token_pool=rtp, token_to_kv_pool=self.pool)
        self.mosaic = MosaicAttnBackend(runner, num_q_heads=test_kv_pool.H_KV * group, auto_seal=False)
        alloc = self.alloc
        extend, decode = alloc.alloc_extend, alloc.alloc_decode
        # the harness passes host tensors; on CUDA the allocator's device arguments must be on the device
        alloc.alloc_extend = lambda p, p_cpu, s, s_cpu, last, n: extend(p.cuda(), p_cpu, s.cuda(), s_cpu,
                                                                         last.cuda(), n)
        alloc.alloc_decode = lambda s, s_cpu, last: decode(s.cuda(), s_cpu, last.cuda())

    extend_batch = Scenario.extend_batch
    seal = Scenario.seal
    slots = Scenario.slots


def _to_cuda(batch: SimpleNamespace) -> SimpleNamespace:
    out = SimpleNamespace(**vars(batch))
    for name in ("out_cache_loc", "req_pool_indices", "seq_lens", "extend_prefix_lens", "extend_seq_lens"):
        if isinstance(getattr(out, name, None), torch.Tensor):
            setattr(out, name, getattr(out, name).cuda())
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("ratio", [1.0, 3.0], ids=["ratio1", "ratio3"])
@pytest.mark.parametrize("group", [1, 4], ids=["mha", "gqa4"])
def test_captured_decode_graph_replays_like_eager(group, ratio, monkeypatch):
    """One decode step of every layer captured in a torch.cuda.CUDAGraph per batch size, after the out-of-graph
    step with in_capture=True, then replayed over changing, padded batches (out-of-graph step with the runner's
    replay view, inputs copied into static tensors) with a seal midway: outputs and query windows equal eager's."""
    monkeypatch.setenv("MOSAICKV_WARMUP", "0")
    budget = 0 if ratio == 1.0 else 2 * test_kv_pool.S
    cfg = config(ratio=ratio, read_budget=budget)
    g, e = _CudaSide(cfg, group, monkeypatch), _CudaSide(cfg, group, monkeypatch)
    h_q, h_kv, d, layers = test_kv_pool.H_KV * group, test_kv_pool.H_KV, test_kv_pool.D, test_kv_pool.LAYERS
    gen = torch.Generator(device="cuda").manual_seed(5)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(test_kv_pool.DT)

    bg, be = _to_cuda(g.extend_batch(PROMPTS)), _to_cuda(e.extend_batch(PROMPTS))
    g.mosaic.init_forward_metadata(bg)
    e.mosaic.init_forward_metadata(be)
    for li in range(layers):
        n = bg.out_cache_loc.numel()
        q, k, v = rnd(n, h_q * d), rnd(n, h_kv, d), rnd(n, h_kv, d)
        g.mosaic.forward_extend(q, k, v, layer(li, group), bg)
        e.mosaic.forward_extend(q, k, v, layer(li, group), be)
    g.mosaic.init_cuda_graph_state(max_bs=max(CAPTURE_BS), max_num_tokens=max(CAPTURE_BS))
    graphs, static_in, static_out = {}, {}, {}
    for bs in reversed(CAPTURE_BS):
        cap = _to_cuda(_capture_batch(bs))
        g.mosaic.init_forward_metadata_out_graph(cap, in_capture=True)
        ins = [(rnd(bs, h_q * d), rnd(bs, h_kv, d), rnd(bs, h_kv, d)) for _ in range(layers)]

        def run(ins=ins, cap=cap):
            return [g.mosaic.forward_decode(q, k, v, layer(li, group), cap) for li, (q, k, v) in enumerate(ins)]

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()  # warmup (Triton compilation) outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = run()
        graphs[bs], static_in[bs], static_out[bs] = graph, ins, outs
    for step, reqs in enumerate(STEPS):
        raw = _decode_subset(g, reqs)
        bg, be, view = _to_cuda(raw), _to_cuda(_decode_subset(e, reqs)), _to_cuda(_pad(raw))
        g.mosaic.init_forward_metadata_out_graph(view)
        e.mosaic.init_forward_metadata(be)
        ins = [(rnd(len(reqs), h_q * d), rnd(len(reqs), h_kv, d), rnd(len(reqs), h_kv, d)) for _ in range(layers)]
        for (sq, sk, sv), (q, k, v) in zip(static_in[view.batch_size], ins):
            sq[: len(reqs)].copy_(q)
            sk[: len(reqs)].copy_(k)
            sv[: len(reqs)].copy_(v)
        graphs[view.batch_size].replay()
        for li, (q, k, v) in enumerate(ins):
            oe = e.mosaic.forward_decode(q, k, v, layer(li, group), be)
            torch.testing.assert_close(static_out[view.batch_size][li][: len(reqs)].float(), oe.float(), **TOL)
        if step == SEAL_AFTER:
            kind = "dense" if ratio == 1.0 else "chan"
            assert torch.equal(g.seal(kind).cpu(), e.seal(kind).cpu())
    wg, we = g.mosaic.sealer.window, e.mosaic.sealer.window
    assert wg._next == we._next and wg._count == we._count
    for li in range(layers):
        torch.testing.assert_close(wg.queries(li), we.queries(li), atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_plan_does_not_wait_for_the_step_in_flight(monkeypatch):
    """The overlap scheduler's case: the batch noted with the scheduler's stream, a kernel of about a second still
    running on the forward stream (the step in flight). The out-of-graph decode plan, made on the forward stream,
    returns before that kernel ends (nothing in it waits for the stream), and its static buffers equal those of the
    same plan made with the GPU idle."""
    from mosaickv_sglang.batch_inputs import clear_scheduled_batch, note_scheduled_batch

    monkeypatch.setenv("MOSAICKV_WARMUP", "0")
    cfg = config(ratio=3.0, read_budget=2 * test_kv_pool.S)
    group = 4
    busy, idle = _CudaSide(cfg, group, monkeypatch), _CudaSide(cfg, group, monkeypatch)
    h_q, h_kv, d = test_kv_pool.H_KV * group, test_kv_pool.H_KV, test_kv_pool.D
    gen = torch.Generator(device="cuda").manual_seed(9)
    bb, bi = _to_cuda(busy.extend_batch(PROMPTS)), _to_cuda(idle.extend_batch(PROMPTS))
    busy.mosaic.init_forward_metadata(bb)
    idle.mosaic.init_forward_metadata(bi)
    for li in range(test_kv_pool.LAYERS):
        n = bb.out_cache_loc.numel()
        q, k, v = (torch.randn(*shape, generator=gen, device="cuda").to(test_kv_pool.DT)
                   for shape in ((n, h_q * d), (n, h_kv, d), (n, h_kv, d)))  # fmt: skip
        busy.mosaic.forward_extend(q, k, v, layer(li, group), bb)
        idle.mosaic.forward_extend(q, k, v, layer(li, group), bi)
    for sc in (busy, idle):
        sc.mosaic.init_cuda_graph_state(max_bs=max(CAPTURE_BS), max_num_tokens=max(CAPTURE_BS))
    scheduler, forward = torch.cuda.Stream(), torch.cuda.Stream()
    # a server's pinned-memory cache is warm; here every staging copy of a plan made while the forward stream sleeps
    # holds its pinned block until the sleep ends, so give the cache blocks of each size class first
    warm = [torch.empty(1 << p, dtype=torch.uint8, pin_memory=True) for p in range(9, 21) for _ in range(16)]
    del warm
    try:
        for step, reqs in enumerate(STEPS):
            rb, ri = _decode_subset(busy, reqs), _decode_subset(idle, reqs)
            vb, vi = _to_cuda(_pad(rb)), _to_cuda(_pad(ri))
            assert vb.out_cache_loc is rb.out_cache_loc
            torch.cuda.synchronize()
            note_scheduled_batch(torch.tensor(reqs), rb.out_cache_loc, scheduler)
            forward.wait_stream(scheduler)
            with torch.cuda.stream(forward):
                torch.cuda._sleep(2_000_000_000)  # about a second: the step in flight
                busy.mosaic.init_forward_metadata_out_graph(vb)
                in_flight = not forward.query()
            clear_scheduled_batch()
            torch.cuda.synchronize()
            idle.mosaic.init_forward_metadata_out_graph(vi)
            torch.cuda.synchronize()
            assert in_flight, f"step {step}: the plan waited for the forward stream"
            got, want = _graph_buffers(busy.mosaic, vb.batch_size), _graph_buffers(idle.mosaic, vi.batch_size)
            for name in want:
                assert torch.equal(got[name], want[name]), (step, name)
    finally:
        clear_scheduled_batch()
