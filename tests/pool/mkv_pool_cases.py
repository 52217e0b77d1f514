# SPDX-License-Identifier: Apache-2.0
"""Seeded scenario builders for the compressed-pool tests (not a test module).

A scenario is a :class:`~mosaickv_sglang.pool.CompressedKVStore` plus the dense pool buffers it compresses from and a
batch of ragged requests. Logical page ``p`` maps to a random set of physical dense slots (``slot_of_page``), so the
store's page -> slot bookkeeping is exercised, not just an identity map.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch

from mosaickv_sglang.kernels.format import SegmentPlan
from mosaickv_sglang.planner import plan_fast
from mosaickv_sglang.pool import CompressedKVStore
from mosaickv_sglang.strategies.base import dense_segment_bytes

# kernel (fp16 products) vs float64 reference; the fp16 entry of the kernel tests' tolerance table
FP16_TOL = dict(atol=3e-3, rtol=3e-3)


@dataclasses.dataclass
class Scenario:
    store: CompressedKVStore
    k_bufs: List[torch.Tensor]  # per layer [pool, H_kv, d]
    v_bufs: List[torch.Tensor]
    slot_of_page: torch.Tensor  # [num_pages, S] int64, physical slot of each logical page token
    req_pages: List[torch.Tensor]  # per request: its logical pages, in order
    seq_lens: List[int]
    gen: torch.Generator

    @property
    def s(self) -> int:
        return self.store.page_size

    def token_slots(self, b: int) -> torch.Tensor:
        """Physical slots of request ``b``'s tokens, in order: shape ``[seq_len]``."""
        return self.slot_of_page[self.req_pages[b]].reshape(-1)[: self.seq_lens[b]]

    def tails(self) -> List[torch.Tensor]:
        """Dense slots of every token of each request whose page is not sealed (all layers)."""
        out = []
        for b, pages in enumerate(self.req_pages):
            sealed = self.store.is_sealed(pages)
            tok_sealed = sealed.repeat_interleave(self.s)[: self.seq_lens[b]]
            out.append(self.token_slots(b)[~tok_sealed])
        return out

    def segment_kv(self, layer: int, pages: torch.Tensor):
        """Dense K, V of the segments of ``pages`` in page-major, head-minor order: ``[P * H_kv, S, d]`` each."""
        slots = self.slot_of_page[pages]  # [P, S]
        k = self.k_bufs[layer][slots].permute(0, 2, 1, 3)  # [P, H, S, d]
        v = self.v_bufs[layer][slots].permute(0, 2, 1, 3)
        d = k.shape[-1]
        return k.reshape(-1, self.s, d), v.reshape(-1, self.s, d)

    def plans(self, pages: torch.Tensor, kind: str, always_dense: Optional[torch.Tensor] = None,
              ratio: float = 3.0, layers: Optional[Sequence[int]] = None) -> List[SegmentPlan]:  # fmt: skip
        """One plan per layer for ``pages``: ``"dense"`` (ratio 1), ``"chan"`` (chan k=16 both sides) or
        ``"fast"`` (``plan_fast`` at ``ratio`` with random queries; ``always_dense`` per page -> sink segments)."""
        st = self.store
        n = pages.numel() * st.num_kv_heads
        layers = range(st.num_layers) if layers is None else layers
        out = []
        for li in layers:
            if kind == "dense":
                out.append(SegmentPlan.uniform(n, self.s, st.head_dim, device=st.device))
            elif kind == "chan":
                out.append(SegmentPlan.uniform(n, self.s, st.head_dim, device=st.device, k_form=1, k_param=16,
                                               v_form=1, v_param=16))  # fmt: skip
            elif kind == "fast":
                k, v = self.segment_kv(li, pages)
                q = torch.randn(n, 4, 2, st.head_dim, generator=self.gen).to(st.device)
                ad = None if always_dense is None else always_dense.repeat_interleave(st.num_kv_heads).to(st.device)
                # the ratio applies to the planned (non-sink) segments; sinks are charged dense on top
                n_fixed = 0 if ad is None else int(ad.sum())
                seg_b = dense_segment_bytes(self.s, st.head_dim)
                budget = n_fixed * seg_b + int((n - n_fixed) * seg_b / ratio)
                out.append(plan_fast(k.float(), v.float(), budget_bytes=budget, queries=q, always_dense=ad).plan)
            else:
                raise ValueError(f"kind: expected 'dense', 'chan' or 'fast', got {kind!r}")
        return out


def make_scenario(
    seed: int,
    *,
    seq_lens: Sequence[int],
    num_layers: int = 2,
    h_kv: int = 2,
    head_dim: int = 64,
    page_size: int = 16,
    spare_pages: int = 3,
    arena_granules: Optional[int] = None,
    device: torch.device = torch.device("cpu"),
) -> Scenario:
    """Requests of the given token lengths, each on random distinct logical pages (pages marked dense)."""
    gen = torch.Generator().manual_seed(seed)
    s = page_size
    n_req_pages = [max(1, -(-n // s)) for n in seq_lens]
    num_pages = sum(n_req_pages) + spare_pages
    pool = num_pages * s
    if arena_granules is None:  # room for everything dense, twice (reseal)
        arena_granules = 2 * num_pages * h_kv * 2 * s * head_dim // 64 + 8
    store = CompressedKVStore(num_layers, num_pages, s, h_kv, head_dim, torch.float16, device, arena_granules)
    k_bufs = [torch.randn(pool, h_kv, head_dim, generator=gen).half().to(device) for _ in range(num_layers)]
    v_bufs = [torch.randn(pool, h_kv, head_dim, generator=gen).half().to(device) for _ in range(num_layers)]
    slot_of_page = torch.randperm(pool, generator=gen).view(num_pages, s)
    perm = torch.randperm(num_pages, generator=gen)
    req_pages, at = [], 0
    for n in n_req_pages:
        req_pages.append(perm[at : at + n].clone())
        at += n
    for pages in req_pages:
        store.mark_dense(pages)
    return Scenario(store, k_bufs, v_bufs, slot_of_page, req_pages, list(seq_lens), gen)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float64 softmax attention of ``q`` ``[H_q, d]`` over ``k``/``v`` ``[n, H_kv, d]`` (GQA), ``[H_q, d]``."""
    h_q, d = q.shape
    g = h_q // k.shape[1]
    kk = k.double().repeat_interleave(g, dim=1)  # [n, H_q, d]
    vv = v.double().repeat_interleave(g, dim=1)
    sc = torch.einsum("hd,nhd->hn", q.double(), kk) / d**0.5
    return torch.einsum("hn,nhd->hd", torch.softmax(sc, -1), vv)
