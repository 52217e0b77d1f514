# SPDX-License-Identifier: Apache-2.0
"""Shared driver of the MosaicAttnBackend CPU tests: one request batch served twice, by MosaicKV's backend on the
compressed pool and by SGLang's ``TorchNativeAttnBackend`` on a stock ``MHATokenToKVPool``.

Logical slots come from SGLang's real ``PagedTokenToKVPoolAllocator`` over the MosaicKV pool; the stock pool has as
many rows as there are logical slots, so both backends see the same ``req_to_token`` table and ``out_cache_loc``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import List, Tuple

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from test_kv_pool import D, DT, H_KV, LAYERS, S, build_pool

from mosaickv_sglang.attention_backend import MosaicAttnBackend
from mosaickv_sglang.config import MosaicKVConfig
from mosaickv_sglang.kernels.format import SegmentPlan

SIZE, HOT = 512, 384  # logical slots, dense capacity (24 physical pages)
MAX_REQS, MAX_CTX = 8, 256


def config(ratio: float = 1.0, read_budget: int = 0, hot_window: int = 16, sidecar: bool = False) -> MosaicKVConfig:
    """S = 16, hot window one segment (default), one sink segment; no sidecar process unless asked."""
    return MosaicKVConfig("mosaic", compression_ratio=ratio, segment_size=S, hot_window=hot_window, sink_tokens=16,
                          decode_read_budget=read_budget, sidecar=sidecar)  # fmt: skip


def layer(layer_id: int, group: int) -> SimpleNamespace:
    """The attributes of a ``RadixAttention`` that both backends read."""
    return SimpleNamespace(
        layer_id=layer_id, tp_q_head_num=H_KV * group, tp_k_head_num=H_KV, qk_head_dim=D, v_head_dim=D,
        scaling=D**-0.5, is_cross_attention=False, sliding_window_size=None, attn_type=AttentionType.DECODER,
    )  # fmt: skip


class Scenario:
    """Requests allocated by SGLang's paged allocator, planned and run through both backends layer by layer."""

    def __init__(
        self, cfg: MosaicKVConfig, group: int, seed: int, auto_seal: bool = False, hot: int = HOT,
        min_seal_pages: int = 1, **pool_extra,
    ) -> None:  # fmt: skip
        self.group = group
        self.pool = build_pool(SIZE, hot, cfg, **pool_extra)
        self.stock = MHATokenToKVPool(SIZE, S, DT, H_KV, D, LAYERS, "cpu", False, v_head_dim=D)
        self.alloc = PagedTokenToKVPoolAllocator(SIZE, page_size=S, dtype=DT, device="cpu", kvcache=self.pool,
                                                 need_sort=False)  # fmt: skip
        self.req_to_token = torch.zeros(MAX_REQS, MAX_CTX, dtype=torch.int32)
        self.lens: List[int] = []
        rtp = SimpleNamespace(req_to_token=self.req_to_token)
        self.mosaic = MosaicAttnBackend(
            SimpleNamespace(device="cpu", req_to_token_pool=rtp, token_to_kv_pool=self.pool), num_q_heads=H_KV * group,
            auto_seal=auto_seal,
        )
        self.mosaic.sealer.min_seal_pages = min_seal_pages  # 1: every due page at once (tests of the policy's limits)
        self.native = TorchNativeAttnBackend(
            SimpleNamespace(device="cpu", req_to_token_pool=rtp, token_to_kv_pool=self.stock)
        )
        self.gen = torch.Generator().manual_seed(seed)

    def slots(self, b: int) -> torch.Tensor:
        return self.req_to_token[b, : self.lens[b]].long()

    def extend_batch(self, ext: List[int]) -> SimpleNamespace:
        """New requests (first call) or chunked-prefill continuations of every request by ``ext`` tokens."""
        if not self.lens:
            self.lens = [0] * len(ext)
        prefix = torch.tensor(self.lens, dtype=torch.int64)
        ext_t = torch.tensor(ext, dtype=torch.int64)
        seq = prefix + ext_t
        last = torch.tensor([int(self.req_to_token[b, n - 1]) if n else -1 for b, n in enumerate(self.lens)])
        out = self.alloc.alloc_extend(prefix, prefix, seq, seq, last, int(ext_t.sum()))
        assert out is not None
        for b, part in enumerate(torch.split(out, ext)):
            self.req_to_token[b, self.lens[b] : self.lens[b] + ext[b]] = part.to(torch.int32)
        self.lens = seq.tolist()
        return SimpleNamespace(
            forward_mode=ForwardMode.EXTEND, out_cache_loc=out, req_pool_indices=torch.arange(len(ext)),
            seq_lens=seq, seq_lens_cpu=seq, extend_prefix_lens=prefix, extend_seq_lens=ext_t,
            extend_prefix_lens_cpu=prefix.tolist(), extend_seq_lens_cpu=list(ext), encoder_lens=None,
        )  # fmt: skip

    def decode_batch(self) -> SimpleNamespace:
        """One new token per request (SGLang's alloc_decode); seq_lens include it, as in SGLang."""
        new = torch.tensor([n + 1 for n in self.lens], dtype=torch.int64)
        last = torch.tensor([int(self.req_to_token[b, n - 1]) for b, n in enumerate(self.lens)])
        out = self.alloc.alloc_decode(new, new, last)
        assert out is not None
        for b, n in enumerate(self.lens):
            self.req_to_token[b, n] = int(out[b])
        self.lens = new.tolist()
        return SimpleNamespace(forward_mode=ForwardMode.DECODE, out_cache_loc=out,
                               req_pool_indices=torch.arange(len(self.lens)), seq_lens=new, seq_lens_cpu=new,
                               encoder_lens=None)  # fmt: skip

    def qkv(self, n: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = torch.randn(n, H_KV * self.group * D, generator=self.gen).to(DT)
        k = torch.randn(n, H_KV, D, generator=self.gen).to(DT)
        v = torch.randn(n, H_KV, D, generator=self.gen).to(DT)
        return q, k, v

    def run_both(self, batch: SimpleNamespace) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Plan both backends, then per layer ``(mosaic_out, native_out, q)``; the same K/V goes to both pools."""
        self.mosaic.init_forward_metadata(batch)
        self.native.init_forward_metadata(batch)
        decode = batch.forward_mode.is_decode()
        res = []
        for li in range(LAYERS):
            q, k, v = self.qkv(batch.out_cache_loc.numel())
            lay = layer(li, self.group)
            fm = self.mosaic.forward_decode if decode else self.mosaic.forward_extend
            fn = self.native.forward_decode if decode else self.native.forward_extend
            res.append((fm(q, k, v, lay, batch), fn(q, k, v, lay, batch), q))
        return res

    def served(self, prompts: List[int], decode_steps: int, after_launch: bool = False) -> Tuple[List[int], float]:
        """An extend of ``prompts``, then ``decode_steps`` decode steps, through both backends: the mosaic sealer's
        pages sealed after each step, and the largest difference between the two backends' outputs. With
        ``after_launch``, the sealer's :meth:`~mosaickv_sglang.sealer.Sealer.after_launch` after each step (where
        SGLang's hook after ``Scheduler.run_batch`` calls it)."""
        sealed, worst = [], 0.0
        for batch in [self.extend_batch(prompts)] + [None] * decode_steps:
            batch = batch if batch is not None else self.decode_batch()
            for mosaic_out, native_out, _ in self.run_both(batch):
                worst = max(worst, float((mosaic_out.float() - native_out.float()).abs().max()))
            if after_launch:
                self.mosaic.sealer.after_launch()
            sealed.append(self.mosaic.sealer.pages_sealed)
        return sealed, worst

    def run_mosaic(self, batch: SimpleNamespace) -> None:
        """Plan and run the mosaic backend alone (it writes its K/V and observes its queries), every layer."""
        self.mosaic.init_forward_metadata(batch)
        fm = self.mosaic.forward_decode if batch.forward_mode.is_decode() else self.mosaic.forward_extend
        for li in range(LAYERS):
            q, k, v = self.qkv(batch.out_cache_loc.numel())
            fm(q, k, v, layer(li, self.group), batch)

    def seal(self, kind: str) -> torch.Tensor:
        """Seal every page ``pages_to_seal`` lists, with a uniform plan: ``dense`` (exact) or ``chan`` (16 of 64
        channels kept on both sides); returns the pages."""
        pages = torch.cat([self.pool.pages_to_seal(self.slots(b)).pages for b in range(len(self.lens))])
        n = pages.numel() * H_KV
        kw = {} if kind == "dense" else dict(k_form=1, k_param=16, v_form=1, v_param=16)
        dev = self.pool.k_buffer[0].device
        self.pool.seal_pages(pages, [SegmentPlan.uniform(n, S, D, device=dev, **kw) for _ in range(LAYERS)])
        return pages


def prefilled(seed: int, ratio: float = 3.0, group: int = 2) -> Scenario:
    """Three requests' prefills (70, 53 and 90 tokens) through the mosaic backend, nothing sealed: complete pages out
    of the hot window, ready for a seal."""
    sc = Scenario(config(ratio=ratio), group=group, seed=seed)
    sc.run_mosaic(sc.extend_batch([70, 53, 90]))
    return sc
