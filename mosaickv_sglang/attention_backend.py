# SPDX-License-Identifier: Apache-2.0
"""MosaicKV's SGLang attention backend: :class:`MosaicAttnBackend` (``--attention-backend mosaic``).

It reads the compressed pool :class:`~mosaickv_sglang.kv_pool.MosaicMHATokenToKVPool`: sealed pages live as packed
segments in the store's per-layer arenas, the rest of every request (the *dense tail*) in the pool's physical dense
buffers. The backend follows SGLang 0.5.17's ``AttentionBackend`` contract with a plan/run split:

* **plan** (:meth:`MosaicAttnBackend.init_forward_metadata_out_graph`, host work, once per batch): seal the pages
  that left the hot window or that hot-pool pressure calls for (:class:`~mosaickv_sglang.sealer.Sealer`), give the
  pages of ``out_cache_loc`` a physical page (:meth:`~MosaicMHATokenToKVPool.ensure_physical`, before any KV
  write), read each request's logical slots from ``req_to_token``, build the segment table and physical tail with
  :meth:`~MosaicMHATokenToKVPool.decode_metadata` / :meth:`~MosaicMHATokenToKVPool.extend_metadata` (all-layers seal
  view, so one table serves every layer), choose ``num_splits`` and allocate the scratch.
* **run** (:meth:`~MosaicAttnBackend.forward_decode` / :meth:`~MosaicAttnBackend.forward_extend`, per layer): write the
  new K/V at logical slots, then launch ``score_and_select -> sparse_decode_fwd`` (decode) or
  ``extend_fwd`` (extend) on the layer's arena/descriptor/bounds tables and dense buffers. No host reads.

Decode reads at most ``decode_read_budget // S`` sealed segments per request and KV head (``0`` = all; the dense tail
is always read; ``FLAG_ALWAYS_READ`` sink segments rank first); a request with no more sealed segments than that is
neither scored nor sorted. Extend reads every prefix segment.

Decode CUDA graphs (``--mosaic-cuda-graph on``, the default) use static buffers: see :class:`_GraphState`. Not
supported (each raises ``NotImplementedError``): prefill CUDA graphs, decode CUDA graphs unless ``--mosaic-cuda-graph
on``, speculative decoding modes (target verify / draft extend), cross-attention, sliding-window layers,
``qk_head_dim != v_head_dim``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from mosaickv_sglang.batch_inputs import read_rows_and_slots, scheduled_batch_for, unmatched_reason
from mosaickv_sglang.call_profile import CallProfile
from mosaickv_sglang.kernels._checks import debug_checks_enabled
from mosaickv_sglang.kv_pool import MosaicMHATokenToKVPool
from mosaickv_sglang.late_compiles import LateCompileWatch
from mosaickv_sglang.pool import to_device
from mosaickv_sglang.pool.device import copy_seconds
from mosaickv_sglang.runtime import register_sealer
from mosaickv_sglang.sealer import Sealer, seal_beside_step_enabled
from mosaickv_sglang.warmup import backend_shape, enumerate_variants, run_warmup, warmup_enabled

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

logger = logging.getLogger(__name__)

__all__ = ["MosaicAttnBackend", "MosaicForwardMetadata", "create_mosaic_backend"]

# SGLang 0.5.17's ModelRunner attribute holding a forward's read-done event for the scheduler's WAR barrier.
WAR_READ_DONE_ATTR = "war_fastpath_read_done_event"
_CUDA_GRAPH_MSG = (
    "MosaicAttnBackend: decode CUDA graphs need --mosaic-cuda-graph on (the default); otherwise pass "
    "--disable-decode-cuda-graph (--kv-compressor mosaic sets it with --mosaic-cuda-graph off)"
)


@dataclass
class MosaicForwardMetadata:
    """Per-batch state built by :meth:`MosaicAttnBackend.init_forward_metadata_out_graph` and read by every layer.

    ``B`` = requests, ``H_kv`` / ``H_q`` = KV / query heads on this rank, ``d`` = head dim, ``S`` = segment size,
    ``MAX_SEGS`` = widest segment table of the batch (at least 1). All tensors live on the pool's device.
    """

    is_decode: bool  # decode batch (one new token per request) or extend batch
    seg_ids_padded: torch.Tensor  # [B, H_kv, MAX_SEGS] int32: sealed segments (page * H_kv + head), -1 padded
    seg_counts: torch.Tensor  # [B] int32: sealed pages per request
    tail_indptr: torch.Tensor  # [B + 1] int32: dense tail of request b is tail_indices[indptr[b]:indptr[b + 1]]
    tail_indices: torch.Tensor  # [num_tail_tokens] int64: physical dense slots of the unsealed (prefix) tokens
    max_segs: int  # MAX_SEGS
    # --- decode only (None / 0 for extend) ---
    read_budget: int = 0  # segments read per (request, KV head), 1 <= read_budget <= MAX_SEGS
    num_splits: int = 1  # split-K factor of sparse_decode_fwd (suggest_num_splits)
    scores: Optional[torch.Tensor] = None  # [B, H_kv, MAX_SEGS] float32: score_and_select's scratch (per layer)
    sel_ids: Optional[torch.Tensor] = None  # [B, H_kv, read_budget] int32: score_and_select output (per layer)
    partial_out: Optional[torch.Tensor] = None  # [B, H_q, num_splits, d] float32: split-K scratch
    partial_lse: Optional[torch.Tensor] = None  # [B, H_q, num_splits] float32: split-K scratch
    # --- extend only (None / 0 for decode) ---
    qo_indptr: Optional[torch.Tensor] = None  # [B + 1] int32: new tokens of request b are qo_indptr[b]:[b + 1]
    max_extend_len: int = 0  # longest extend length of the batch
    k_scratch: Optional[torch.Tensor] = None  # [B, H_kv, MAX_SEGS, S, d] pool dtype: decoded prefix (per layer)
    v_scratch: Optional[torch.Tensor] = None  # [B, H_kv, MAX_SEGS, S, d] pool dtype
    # --- the batch's KV writes, translated once for every layer (None: translate per layer) ---
    write_loc: Optional[torch.Tensor] = None  # out_cache_loc the plan was made for (logical slots)
    write_slots: Optional[torch.Tensor] = None  # its physical slots (pool.physical_slots), valid at pool_version
    pool_version: int = -1
    # --- CUDA-graph decode: every tensor above is a view of _GraphState's static buffers ---
    graph: bool = False
    ring_rows: Optional[torch.Tensor] = None  # [B] int64: QueryWindow ring row of each batch row (observe_rows)


@dataclass
class _GraphState:
    """Static buffers of CUDA-graph decode, allocated once by :meth:`MosaicAttnBackend.init_cuda_graph_state`.

    A captured kernel keeps the addresses it was captured with, so every tensor a decode layer reads lives here and
    the out-of-graph step (:meth:`MosaicAttnBackend._plan_decode_graph`, host work as in eager decode: sealing,
    physical pages, ``pool.decode_metadata_rows``) copies the batch's metadata into them in place. The metadata of a
    batch of ``B <= max_bs`` rows are prefix views (``[:B]``, same ``data_ptr``) of these buffers, so capture and
    replay of the same padded size see the same addresses.

    Fixed shapes: ``M = ceil(context_len / S)`` segment columns (every request fits), read budget
    ``read_budget_segments(M)`` (segments beyond a request's count score ``-inf`` and are not read, so the
    selection equals eager's), split count per batch size (:meth:`MosaicAttnBackend._graph_splits`), tail index
    capacity ``max_bs * context_len + max_bs``.

    Padded rows (SGLang's ``num_padding`` rows at the end of a replay batch, every row at capture) get zero
    segments, a one-token tail on physical slot 0 (the padding page, which no request's tail reads), a KV write to
    that slot and the query window's trash row; their outputs are garbage that SGLang drops.
    """

    max_bs: int
    max_segs: int
    read_budget: int
    seg_ids: torch.Tensor  # [max_bs, H_kv, M] int32
    seg_counts: torch.Tensor  # [max_bs] int32
    tail_indptr: torch.Tensor  # [max_bs + 1] int32
    tail_indices: torch.Tensor  # [max_bs * (context_len + 1)] int64
    scores: torch.Tensor  # [max_bs, H_kv, M] float32
    sel_ids: torch.Tensor  # [max_bs, H_kv, read_budget] int32
    partial_out: torch.Tensor  # [max_bs * H_q * max_splits * d] float32, viewed per batch size
    partial_lse: torch.Tensor  # [max_bs * H_q * max_splits] float32
    write_slots: torch.Tensor  # [max_bs] int64: physical slots of the batch's new tokens
    ring_rows: torch.Tensor  # [max_bs] int64: QueryWindow rows
    splits: Dict[int, int] = field(default_factory=dict)  # batch size -> num_splits


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 132  # suggest_num_splits' default (H100/H200); irrelevant off the GPU


def _attn_tp_size() -> int:
    """Attention tensor-parallel size from SGLang's runtime context (as ``triton_backend`` reads it)."""
    from sglang.srt.runtime_context import get_parallel

    return int(get_parallel().attn_tp_size)


def _host_list(x: Any, name: str) -> List[int]:
    if x is None:
        raise ValueError(f"{name}: expected a tensor or list of ints, got None")
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.detach().cpu().tolist()]
    return [int(v) for v in x]


def _batch_list(forward_batch: Any, name: str) -> List[int]:
    """``forward_batch.<name>`` as a host list, from its ``<name>_cpu`` copy when SGLang keeps one."""
    host = getattr(forward_batch, f"{name}_cpu", None)
    return _host_list(host if host is not None else getattr(forward_batch, name), name)


def _slice_lens(lens: List[int], width: int) -> np.ndarray:
    """``len(row[:n])`` for a row of ``width`` columns and each ``n`` of ``lens`` (Python slice semantics)."""
    n = np.asarray(lens, dtype=np.int64).reshape(-1)
    return np.where(n >= 0, np.minimum(n, width), np.maximum(0, width + n))


class MosaicAttnBackend(AttentionBackend):
    """Attention over MosaicKV's compressed pool: sparse decode over selected segments + dense tail, and extend over
    decompressed prefix + dense prefix tail + new tokens.

    Parameters
    ----------
    model_runner : ModelRunner
        SGLang's model runner (or an object with the same attributes): ``device``, ``token_to_kv_pool`` (a
        :class:`~mosaickv_sglang.kv_pool.MosaicMHATokenToKVPool`), ``req_to_token_pool`` (``req_to_token``: ``[R,
        max_context_len]`` int32 logical slots) and ``model_config`` (``get_max_num_attention_heads()``).
    num_q_heads : int, optional
        Query heads on this rank; default ``model_config.get_max_num_attention_heads() // attn_tp_size``.
    auto_seal : bool
        Seal pages in the plan step (:class:`~mosaickv_sglang.sealer.Sealer`): those that left the hot window, and
        more under hot-pool pressure. ``False`` leaves sealing to the caller (tests). With ``--mosaic-sidecar on``
        (the pool's config), the sealer's CPU sidecar is started here (:class:`~mosaickv_sglang.sidecar.bridge.
        SidecarBridge`); extend batches tell it their readers unless ``--mosaic-resegment off``.

    Attributes
    ----------
    forward_metadata : MosaicForwardMetadata or None
        State of the current batch (``None`` before the first plan and for idle batches).

    Examples
    --------
    >>> backend = create_mosaic_backend(model_runner)  # doctest: +SKIP
    >>> backend.init_forward_metadata(forward_batch)  # doctest: +SKIP
    >>> o = backend.forward_decode(q, k, v, layer, forward_batch)  # [B, H_q * d]  # doctest: +SKIP
    """

    # SGLang capability flags: we read seq_lens_cpu / extend_*_cpu when present (fall back to device copies).
    needs_cpu_seq_lens: bool = True
    supports_ragged_verify_graph: bool = False
    # MosaicKV capabilities, checked by the factory.
    supported_dtypes = (torch.float16, torch.bfloat16)
    supports_cuda_graph: bool = True  # decode only, with --mosaic-cuda-graph on

    def __init__(self, model_runner: Any, num_q_heads: Optional[int] = None, auto_seal: bool = True) -> None:
        super().__init__()
        pool = getattr(model_runner, "token_to_kv_pool", None)
        if not isinstance(pool, MosaicMHATokenToKVPool):
            raise ValueError(
                f"token_to_kv_pool: expected MosaicMHATokenToKVPool, got {type(pool).__name__}; the mosaic attention "
                "backend needs the compressed pool: pass --kv-compressor mosaic (or use another --attention-backend)"
            )
        self.pool: MosaicMHATokenToKVPool = pool
        self.token_to_kv_pool = pool
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.model_runner = model_runner
        self.device = torch.device(getattr(model_runner, "device", pool.device))
        self.config = pool.mosaic_config
        self.page_size = int(pool.page_size)
        self.num_kv_heads = int(pool.head_num)
        self.head_dim = int(pool.head_dim)
        if num_q_heads is None:
            num_q_heads = int(model_runner.model_config.get_max_num_attention_heads()) // _attn_tp_size()
        if isinstance(num_q_heads, bool) or not isinstance(num_q_heads, int) or num_q_heads < 1:
            raise ValueError(f"num_q_heads: expected a positive integer, got {num_q_heads!r}")
        if num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads: expected a multiple of the pool's KV heads ({self.num_kv_heads}), got {num_q_heads}"
            )
        self.num_q_heads = num_q_heads
        self.num_sms = _num_sms(self.device)
        self.forward_metadata: Optional[MosaicForwardMetadata] = None
        self._graph: Optional[_GraphState] = None
        # Lazy kernel imports, as SGLang's triton backend does (no CUDA context at import time).
        from mosaickv_sglang.kernels.extend import extend_fwd
        from mosaickv_sglang.kernels.segment_scores import score_and_select
        from mosaickv_sglang.kernels.sparse_decode import sparse_decode_fwd, suggest_num_splits

        self._score_and_select = score_and_select
        self._sparse_decode_fwd = sparse_decode_fwd
        self._suggest_num_splits = suggest_num_splits
        self._extend_fwd = extend_fwd
        self.sealer = Sealer(self.pool, num_q_heads)
        self.sealer.seal_beside_step = (self.config.overlap_schedule and self.device.type == "cuda"
                                        and seal_beside_step_enabled())  # fmt: skip
        self.rows_read_seconds = 0.0  # the plans' reads of their batches' rows (_read_rows) so far
        self.call_profile = CallProfile.from_env(int(getattr(model_runner, "tp_rank", 0) or 0),
                                                 int(getattr(model_runner, "tp_size", 1) or 1))  # fmt: skip
        self.late_compiles: Optional[LateCompileWatch] = None  # installed after the warmup (CUDA)
        self.auto_seal = bool(auto_seal)
        if self.auto_seal and self.config.sidecar:
            from mosaickv_sglang.sidecar.bridge import SidecarBridge

            self.sealer.attach_sidecar(SidecarBridge.create(self.pool, self.sealer.window).start())
        register_sealer(self.sealer)
        if self.device.type == "cuda" and warmup_enabled():
            self._tune_decode(model_runner)
            self._warmup(model_runner)
            self._choose_planner_methods()
            self._capture_seal_graphs()
            self.late_compiles = LateCompileWatch().install()

    def _tune_decode(self, model_runner: Any) -> None:
        """Make the sparse decode's fastest output-invariant variant on this GPU, or the one ``MOSAICKV_DECODE_TUNE``
        names, its default (:mod:`.decode_tune`), before the warmup compiles the defaults."""
        from mosaickv_sglang.decode_tune import configure_decode_variant

        configure_decode_variant(backend_shape(self, getattr(model_runner, "dtype", None)), self.device)

    def _warmup(self, model_runner: Any) -> None:
        """Compile every kernel variant serving can hit (:mod:`mosaickv_sglang.warmup`) before taking traffic."""
        shape = backend_shape(self, getattr(model_runner, "dtype", None))
        try:
            count, seconds = run_warmup(enumerate_variants(shape), shape, self.device)
        except Exception:  # noqa: BLE001 - an optimisation: serving works without it, compiling on first use
            logger.exception("MosaicKV: kernel warmup failed; kernels will compile on first use (MOSAICKV_WARMUP=0 "
                             "skips the warmup)")  # fmt: skip
            return
        logger.info("MosaicKV: compiled %d kernel variants in %.1f s", count, seconds)

    def _capture_seal_graphs(self) -> None:
        """Capture the seal planner's CUDA graphs before traffic (:meth:`Sealer.capture_seal_graphs_ahead`), after its
        methods are chosen: the graphs hold the chosen kernels."""
        t0 = time.perf_counter()
        try:
            count = self.sealer.capture_seal_graphs_ahead()
        except Exception:  # noqa: BLE001 - an optimisation: a graph missing is captured at its bucket's first seal
            logger.exception("MosaicKV: capturing the seal graphs before serving failed; each is captured at its first "
                             "seal (MOSAICKV_WARMUP=0 skips the warmup)")  # fmt: skip
            return
        if count:
            logger.info("MosaicKV: captured %d seal graphs before serving in %.1f s", count, time.perf_counter() - t0)

    def _choose_planner_methods(self) -> None:
        """Make the seal planner's fastest equivalent methods on this GPU its defaults: how it finds each vector's top
        channels (:mod:`.chan_drop_select`) and how the fast estimator computes its channel terms, if the kernel's
        terms match the torch ops' (:mod:`.estimate_terms_select`)."""
        from mosaickv_sglang.chan_drop_select import select_chan_drop_method
        from mosaickv_sglang.estimate_terms_select import select_estimate_terms_method

        for what, select in (("chan drop", select_chan_drop_method),
                             ("estimate terms", select_estimate_terms_method)):  # fmt: skip
            try:
                select(self.device, self.head_dim, self.page_size)
            except ValueError:
                raise  # a bad MOSAICKV_CHAN_DROP / MOSAICKV_ESTIMATE_TERMS: the user's mistake, named
            except Exception:  # noqa: BLE001 - an optimisation: the planner's default method serves without it
                logger.exception("MosaicKV: timing the %s methods failed; the planner keeps its default", what)

    # --- plan ------------------------------------------------------------------------------------------------------
    def read_budget_segments(self, max_segs: int) -> int:
        """Sealed segments read per (request, KV head) for a batch whose widest segment table is ``max_segs``.

        ``decode_read_budget // S`` (``0`` = all), clamped to ``[1, max_segs]``.
        """
        budget = int(self.config.decode_read_budget) // self.page_size
        return max_segs if budget <= 0 else max(1, min(budget, max_segs))

    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        """Eager entry point: :meth:`init_forward_metadata_out_graph` (the in-graph part is empty)."""
        self.init_forward_metadata_out_graph(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch: "ForwardBatch", in_capture: bool = False) -> None:
        """Plan one batch (host work; syncs): physical pages for the new tokens, segment table, tail, scratch. A
        decode batch's plan (sealing and the sidecar's tick included) is counted in the sealer's
        ``decode_plans`` / ``decode_plan_seconds``, with its sealing and sidecar parts.

        Parameters
        ----------
        forward_batch : ForwardBatch
            Reads ``forward_mode``, ``out_cache_loc`` (``[N]`` int64 logical slots), ``req_pool_indices`` (``[B]``),
            ``seq_lens`` / ``seq_lens_cpu`` (``[B]``, new tokens included) and, for extend,
            ``extend_prefix_lens(_cpu)`` / ``extend_seq_lens(_cpu)``.
        in_capture : bool
            ``True`` under CUDA-graph capture (after :meth:`init_cuda_graph_state`): every row is padding, nothing
            is sealed or written to the host state.
        """
        mode = forward_batch.forward_mode
        if in_capture and (self._graph is None or not mode.is_decode()):
            raise NotImplementedError(_CUDA_GRAPH_MSG)
        sealer = self.sealer
        t0, seal0, sidecar0 = time.perf_counter(), sealer.seal_seconds, sealer.sidecar_seconds()
        rows0, gc0, copies0 = self.rows_read_seconds, sealer.stalls.gc_seconds_total, copy_seconds()
        kind = "decode" if mode.is_decode() else mode.name.lower()
        with contextlib.nullcontext() if in_capture else self.call_profile.section(kind):
            if in_capture:
                self._plan_batch(forward_batch, in_capture)
            else:
                sealer.begin_plan()
                try:
                    self._plan_batch(forward_batch, in_capture)
                finally:
                    sealer.end_plan()
        if mode.is_decode() and not in_capture:
            took = time.perf_counter() - t0
            seal, sidecar = sealer.seal_seconds - seal0, sealer.sidecar_seconds() - sidecar0
            sealer.decode_plans += 1
            sealer.decode_plan_seconds += took
            sealer.decode_plan_seal_seconds += seal
            sealer.decode_plan_sidecar_seconds += sidecar
            sealer.stalls.note_plan(took, seal, sidecar, self.rows_read_seconds - rows0,
                                    sealer.stalls.gc_seconds_total - gc0, copy_seconds() - copies0)  # fmt: skip

    def _plan_batch(self, forward_batch: "ForwardBatch", in_capture: bool) -> None:
        mode = forward_batch.forward_mode
        g = self._graph
        if g is not None and mode.is_decode() and int(forward_batch.batch_size) <= g.max_bs:
            self.forward_metadata = self._plan_decode_graph(forward_batch, in_capture)
            return
        if mode.is_idle():
            self.forward_metadata = None
            return
        if not mode.is_decode() and mode.name not in ("EXTEND", "MIXED"):
            raise NotImplementedError(
                f"MosaicAttnBackend: forward mode {mode.name} is not supported with --kv-compressor mosaic (decode, "
                "extend and mixed only; no speculative decoding)"
            )
        seq = _batch_list(forward_batch, "seq_lens")
        step = self._decode_row_step(seq) if mode.is_decode() else 1
        rows, loc_cpu, noted_ids = self._read_rows(forward_batch, seq, step, forward_batch.out_cache_loc.numel())
        width = rows.shape[1] * step
        if mode.is_decode():
            pre_l = [n - 1 for n in seq]
        else:
            pre_l = _batch_list(forward_batch, "extend_prefix_lens")
            ext_l = _batch_list(forward_batch, "extend_seq_lens")
            if len(pre_l) != len(seq) or len(ext_l) != len(seq) or any(
                p + e != s for p, e, s in zip(pre_l, ext_l, seq)
            ):
                raise ValueError(
                    f"forward_batch: expected extend_prefix_lens + extend_seq_lens == seq_lens, got {pre_l} + "
                    f"{ext_l} vs {seq}"
                )
        reads = None
        if self.sealer.sidecar is not None and self.sealer.sidecar.resegment:
            # who asks each query row of this forward: re-segmentation plans a shared page with its readers' queries
            owners = forward_batch.req_pool_indices.long()
            if not mode.is_decode():
                ids = (noted_ids if noted_ids is not None else forward_batch.req_pool_indices).tolist()
                reads = [(r, rows[b, : seq[b]]) for b, r in enumerate(ids)]
                # repeats copied without waiting and the output's size given: nothing here waits for the device
                owners = torch.repeat_interleave(owners, to_device(torch.tensor(ext_l), owners.device),
                                                 output_size=sum(ext_l))  # fmt: skip
            self.sealer.window.set_owners(owners)
        rows_np = rows.numpy()
        loc = forward_batch.out_cache_loc
        self._prepare_writes(loc, rows_np, _slice_lens(pre_l, width), reads, step, loc_cpu=loc_cpu)
        if mode.is_decode():
            md = self._plan_decode(rows_np, _slice_lens(seq, width), step)
        else:
            md = self._plan_extend([rows[b, : pre_l[b]] for b in range(len(seq))], ext_l)
        if isinstance(loc, torch.Tensor) and not debug_checks_enabled():
            md.write_loc, md.write_slots = loc, self.pool.physical_slots(loc)
            md.pool_version = self.pool.version
        self.forward_metadata = md
        if not in_capture:
            self._publish_read_done()

    def _publish_read_done(self) -> None:
        """With sealing beside the step in flight, tell SGLang's overlap scheduler that this eager forward is done
        reading what the scheduler's stream writes (``req_to_token``, the batch's inputs) once its plan ends, as
        SGLang's CUDA-graph decode runner does: the scheduler's stream then waits for this event rather than for
        the whole forward (``Scheduler._apply_war_barrier``), so the next batch's rows and slots are ready, and its
        plan and seal run, while this forward runs. The plan's own reads have finished (the host waited for them);
        the forward reads only this backend's metadata, ``out_cache_loc`` and the pool."""
        if not self.sealer.seal_beside_step or self.device.type != "cuda":
            return
        done = torch.cuda.Event()
        done.record()
        setattr(self.model_runner, WAR_READ_DONE_ATTR, done)

    def _plan_decode_graph(self, forward_batch: "ForwardBatch", in_capture: bool) -> MosaicForwardMetadata:
        """Out-of-graph step of a CUDA-graph decode batch: eager decode's host work for the real rows, then their
        metadata copied into the static buffers (:class:`_GraphState`), padded rows as described there."""
        g = self._graph
        bs = int(forward_batch.batch_size)
        real = 0 if in_capture else bs - int(getattr(forward_batch, "num_padding", 0) or 0)
        g.seg_ids[:bs].fill_(-1)
        g.seg_counts[:bs].zero_()
        g.write_slots[:bs].zero_()
        total = 0
        if real > 0:
            seq = _batch_list(forward_batch, "seq_lens")[:real]
            loc = forward_batch.out_cache_loc[:real]
            step = self._decode_row_step(seq)
            rows, loc_cpu, _ = self._read_rows(forward_batch, seq, step)
            width = rows.shape[1] * step
            owners = None
            if self.sealer.sidecar is not None and self.sealer.sidecar.resegment:
                owners = forward_batch.req_pool_indices[:real].long()
            rows_np = rows.numpy()
            self._prepare_writes(loc, rows_np, _slice_lens([n - 1 for n in seq], width), step=step, loc_cpu=loc_cpu)
            meta, tail_lens = self.pool.decode_metadata_rows(rows_np, _slice_lens(seq, width), step)
            if meta.max_segs > g.max_segs:
                raise ValueError(
                    f"max_segs: expected at most {g.max_segs} (init_cuda_graph_state), got {meta.max_segs}"
                )
            m = meta.seg_ids_padded.shape[2]
            g.seg_ids[:real, :, :m].copy_(meta.seg_ids_padded)
            g.seg_counts[:real].copy_(meta.seg_counts)
            total = int(tail_lens.sum())
            g.tail_indptr[: real + 1].copy_(meta.tail_indptr)
            g.tail_indices[:total].copy_(meta.tail_indices)
            g.write_slots[:real].copy_(self.pool.physical_slots(loc.to(self.device, torch.int64)))
            ring = self.sealer.window.plan_rows(real, bs, owners)
        else:
            g.tail_indptr[:1].zero_()
            ring = torch.full((bs,), self.sealer.window.trash_row, dtype=torch.int64)
        pad = bs - real
        if total + pad > g.tail_indices.numel():
            raise ValueError(f"tail tokens: expected at most {g.tail_indices.numel()}, got {total + pad}")
        if pad:
            g.tail_indptr[real + 1 : bs + 1].copy_(
                to_device(torch.arange(total + 1, total + pad + 1, dtype=torch.int32), self.device)
            )
            g.tail_indices[total : total + pad].zero_()
        g.ring_rows[:bs].copy_(to_device(ring, self.device))
        splits = self._graph_splits(bs)
        h_q, d = self.num_q_heads, self.head_dim
        return MosaicForwardMetadata(
            is_decode=True,
            seg_ids_padded=g.seg_ids[:bs],
            seg_counts=g.seg_counts[:bs],
            tail_indptr=g.tail_indptr[: bs + 1],
            tail_indices=g.tail_indices,
            max_segs=g.max_segs,
            read_budget=g.read_budget,
            num_splits=splits,
            scores=g.scores[:bs],
            sel_ids=g.sel_ids[:bs],
            partial_out=g.partial_out[: bs * h_q * splits * d].view(bs, h_q, splits, d),
            partial_lse=g.partial_lse[: bs * h_q * splits].view(bs, h_q, splits),
            write_slots=g.write_slots[:bs],
            graph=True,
            ring_rows=g.ring_rows[:bs],
        )

    def _graph_splits(self, bs: int) -> int:
        """Split-K factor of a graph batch of ``bs`` rows (fixed per captured size): the read budget plus a tail of
        about the hot window and sinks."""
        g = self._graph
        tail_pages = -(-(int(self.config.hot_window) + int(self.config.sink_tokens)) // self.page_size) + 1
        splits = g.splits.get(bs)
        if splits is None:
            splits = g.splits[bs] = int(self._suggest_num_splits(bs, self.num_kv_heads, g.read_budget + tail_pages,
                                                                 self.num_sms))  # fmt: skip
        return splits

    def _decode_row_step(self, seq: List[int]) -> int:
        """Slots per column of a decode batch's rows: ``page_size`` (each page's first slot only, ``page_size`` times
        fewer to copy and scan; see :mod:`mosaickv_sglang.pool.rows`), or 1 (every slot, each one checked) under
        ``MOSAICKV_DEBUG_CHECKS`` and for lengths below 1."""
        return self.page_size if seq and min(seq) >= 1 and not debug_checks_enabled() else 1

    def _read_rows(
        self, forward_batch: "ForwardBatch", seq: List[int], step: int, slots: Optional[int] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(rows, loc_cpu, noted_ids)`` of the batch's first ``len(seq)`` requests: their :meth:`_req_rows`; from
        the overlap scheduler's note of this batch when there is one (read on a side stream, not behind the step in
        flight; ``loc_cpu`` its first ``slots`` new slots, default one a request, ``noted_ids`` its host request
        indices), else ``None`` for both. With the overlap scheduler, counts how the rows were read. Its time, mostly a
        wait for the device, adds up in :attr:`rows_read_seconds`."""
        t0, n = time.perf_counter(), len(seq)
        scheduled = scheduled_batch_for(forward_batch.out_cache_loc)
        if scheduled is not None and scheduled.req_pool_indices.numel() == n:
            rows, loc_cpu = read_rows_and_slots(self.req_to_token_pool.req_to_token, scheduled, n,
                                                self._row_width(seq), step, slots)  # fmt: skip
            why, noted_ids = "", scheduled.req_pool_indices[:n]
        else:
            rows, loc_cpu, noted_ids = self._req_rows(forward_batch.req_pool_indices[:n], seq, step), None, None
            why = "size" if scheduled is not None else unmatched_reason(forward_batch.out_cache_loc)
        if self.config.overlap_schedule:
            self.sealer.note_rows_read(forward_batch.forward_mode.name.lower(), why)
        self.rows_read_seconds += time.perf_counter() - t0
        return rows, loc_cpu, noted_ids

    def _req_rows(self, req_pool_indices: torch.Tensor, seq: List[int], step: int = 1) -> torch.Tensor:
        """``req_to_token`` rows of the batch on the host, only the page-rounded columns that ``seq`` reaches (all of
        them when a length is negative: slices then count from the end), every ``step``-th of them."""
        return self.req_to_token_pool.req_to_token[req_pool_indices.long(), : self._row_width(seq) : step].cpu()

    def _row_width(self, seq: List[int]) -> int:
        """Columns of ``req_to_token`` that :meth:`_req_rows` reads for lengths ``seq``."""
        width = int(self.req_to_token_pool.req_to_token.shape[1])
        if seq and min(seq) >= 1:
            width = min(width, -(-max(seq) // self.page_size) * self.page_size)
        return width

    def _prepare_writes(
        self, loc: Optional[torch.Tensor], rows: np.ndarray, written: np.ndarray,
        reads: Optional[List[Tuple[int, torch.Tensor]]] = None, step: int = 1, loc_cpu: Optional[torch.Tensor] = None,
    ) -> None:  # fmt: skip
        """Before any KV write of the forward: seal what the policy and hot-pool pressure call for, then give every
        page the batch writes a physical dense page and record the writes. Request ``b`` has written its first
        ``written[b]`` slots, whose every ``step``-th is in ``rows[b]``. ``loc_cpu``: ``loc`` already on the host
        (int64), when the caller read it."""
        if loc is None or loc.numel() == 0:
            return
        if loc_cpu is None:
            loc_cpu = loc.detach().to("cpu", torch.int64)
        new_pages = torch.unique(torch.div(loc_cpu, self.page_size, rounding_mode="floor")).numpy()
        if self.auto_seal:
            self.sealer.before_forward_rows(rows, written, new_pages, reads, step)
        self.pool.ensure_physical(torch.from_numpy(new_pages))
        self.pool.note_writes(loc_cpu)

    def _plan_decode(self, rows: np.ndarray, lens: np.ndarray, step: int = 1) -> MosaicForwardMetadata:
        meta, tail_lens = self.pool.decode_metadata_rows(rows, lens, step)
        bsz, dev = len(lens), self.device
        budget = self.read_budget_segments(meta.max_segs)
        max_tail = int(tail_lens.max()) if bsz else 0
        work = budget + -(-max_tail // self.page_size)
        splits = self._suggest_num_splits(bsz, self.num_kv_heads, work, self.num_sms)
        h_q, h_kv, d = self.num_q_heads, self.num_kv_heads, self.head_dim
        return MosaicForwardMetadata(
            is_decode=True,
            seg_ids_padded=meta.seg_ids_padded,
            seg_counts=meta.seg_counts,
            tail_indptr=meta.tail_indptr,
            tail_indices=meta.tail_indices,
            max_segs=meta.max_segs,
            read_budget=budget,
            num_splits=splits,
            scores=torch.empty((bsz, h_kv, meta.max_segs), dtype=torch.float32, device=dev),
            sel_ids=torch.empty((bsz, h_kv, budget), dtype=torch.int32, device=dev),
            partial_out=torch.empty((bsz, h_q, splits, d), dtype=torch.float32, device=dev),
            partial_lse=torch.empty((bsz, h_q, splits), dtype=torch.float32, device=dev),
        )

    def _plan_extend(self, prefix_slots: Sequence[torch.Tensor], extend_lens: List[int]) -> MosaicForwardMetadata:
        meta = self.pool.extend_metadata(prefix_slots, extend_lens)
        k_scratch, v_scratch = meta.alloc_scratch(self.pool.dtype)
        return MosaicForwardMetadata(
            is_decode=False,
            seg_ids_padded=meta.seg_ids,
            seg_counts=meta.seg_counts,
            tail_indptr=meta.tail_indptr,
            tail_indices=meta.tail_indices,
            max_segs=int(meta.scratch_shape[2]),
            qo_indptr=meta.qo_indptr,
            max_extend_len=int(meta.max_extend_len),
            k_scratch=k_scratch,
            v_scratch=v_scratch,
        )

    def init_forward_metadata_in_graph(self, forward_batch: "ForwardBatch") -> None:
        """Nothing to record: every per-batch tensor is built by the out-of-graph plan."""

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        """Allocate the static buffers of CUDA-graph decode (:class:`_GraphState`) for batches of up to ``max_bs``
        requests; from then on decode batches that fit are planned into them."""
        if isinstance(max_bs, bool) or not isinstance(max_bs, int) or max_bs < 1:
            raise ValueError(f"max_bs: expected a positive integer, got {max_bs!r}")
        width = int(self.req_to_token_pool.req_to_token.shape[1])
        m = max(1, -(-width // self.page_size))
        budget = self.read_budget_segments(m)
        h_q, h_kv, d, dev = self.num_q_heads, self.num_kv_heads, self.head_dim, self.device
        self._graph = g = _GraphState(
            max_bs=max_bs,
            max_segs=m,
            read_budget=budget,
            seg_ids=torch.full((max_bs, h_kv, m), -1, dtype=torch.int32, device=dev),
            seg_counts=torch.zeros(max_bs, dtype=torch.int32, device=dev),
            tail_indptr=torch.zeros(max_bs + 1, dtype=torch.int32, device=dev),
            tail_indices=torch.zeros(max_bs * (width + 1), dtype=torch.int64, device=dev),
            scores=torch.zeros((max_bs, h_kv, m), dtype=torch.float32, device=dev),
            sel_ids=torch.full((max_bs, h_kv, budget), -1, dtype=torch.int32, device=dev),
            partial_out=torch.zeros(0, device=dev),
            partial_lse=torch.zeros(0, device=dev),
            write_slots=torch.zeros(max_bs, dtype=torch.int64, device=dev),
            ring_rows=torch.full((max_bs,), self.sealer.window.trash_row, dtype=torch.int64, device=dev),
        )
        max_splits = max(self._graph_splits(bs) for bs in range(1, max_bs + 1))
        g.partial_out = torch.zeros(max_bs * h_q * max_splits * d, dtype=torch.float32, device=dev)
        g.partial_lse = torch.zeros(max_bs * h_q * max_splits, dtype=torch.float32, device=dev)

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        """Padded requests of a graph batch would have one token (as in SGLang's triton backend)."""
        return 1

    # --- run -------------------------------------------------------------------------------------------------------
    def _check_layer(self, layer: "RadixAttention", q: torch.Tensor, want_decode: bool) -> MosaicForwardMetadata:
        md = self.forward_metadata
        if md is None or md.is_decode != want_decode:
            kind = "decode" if want_decode else "extend"
            raise ValueError(f"forward_metadata: expected a {kind} plan (init_forward_metadata), got "
                             f"{'none' if md is None else ('decode' if md.is_decode else 'extend')}")  # fmt: skip
        if layer.tp_q_head_num != self.num_q_heads or layer.tp_k_head_num != self.num_kv_heads:
            raise ValueError(
                f"layer {layer.layer_id}: expected {self.num_q_heads} q / {self.num_kv_heads} KV heads, got "
                f"{layer.tp_q_head_num} / {layer.tp_k_head_num}"
            )
        if layer.qk_head_dim != self.head_dim or layer.v_head_dim != self.head_dim:
            raise NotImplementedError(
                f"MosaicAttnBackend: layer {layer.layer_id} has qk_head_dim {layer.qk_head_dim} / v_head_dim "
                f"{layer.v_head_dim}; only qk_head_dim == v_head_dim == {self.head_dim} (the pool's) is supported"
            )
        if getattr(layer, "is_cross_attention", False):
            raise NotImplementedError("MosaicAttnBackend: cross-attention (encoder-decoder models) is not supported")
        sw = getattr(layer, "sliding_window_size", None)
        if sw is not None and sw > -1:
            raise NotImplementedError("MosaicAttnBackend: sliding-window attention layers are not supported")
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"q: expected dtype float16, bfloat16 or float32, got {q.dtype}")
        return md

    def _layer_tables(
        self, layer: "RadixAttention"
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(arena, desc, bounds, k_buf, v_buf)`` of SGLang layer ``layer.layer_id`` (store tables are local)."""
        local = layer.layer_id - self.pool.start_layer
        st = self.pool.store
        k_buf, v_buf = self.pool.get_kv_buffer(layer.layer_id)
        return st.arenas[local], st.desc[local], st.bounds[local], k_buf, v_buf

    def _write_kv(
        self, md: MosaicForwardMetadata, layer: "RadixAttention", loc: Any, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """``pool.set_kv_buffer(layer, loc, k, v)``, with the plan's physical slots when it was made for ``loc`` and
        the page table has not changed since."""
        if md.graph:
            self.pool.set_kv_buffer_physical(layer, md.write_slots[: k.shape[0]], k, v)
        elif md.write_loc is not None and md.write_loc is loc and md.pool_version == self.pool.version:
            self.pool.set_kv_buffer_physical(layer, md.write_slots, k, v)
        else:
            self.pool.set_kv_buffer(layer, loc, k, v)

    def forward_decode(
        self,
        q: torch.Tensor,
        k: Optional[torch.Tensor],
        v: Optional[torch.Tensor],
        layer: "RadixAttention",
        forward_batch: "ForwardBatch",
        save_kv_cache: bool = True,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Decode attention of one layer: write the new K/V, select segments, sparse decode over them + the tail.

        Parameters
        ----------
        q : torch.Tensor
            shape ``[B, H_q * d]`` (or ``[B, H_q, d]``), dtype ``torch.float16`` / ``torch.bfloat16``; RoPE applied.
        k, v : torch.Tensor or None
            shape ``[B, H_kv, d]`` (or ``[B, H_kv * d]``); the new token of each request, written at
            ``forward_batch.out_cache_loc`` (logical slots) when ``save_kv_cache``.
        layer : RadixAttention
            Reads ``layer_id``, ``scaling`` (softmax scale), ``tp_q_head_num``, ``tp_k_head_num``, head dims.
        forward_batch : ForwardBatch
            The planned batch.
        save_kv_cache : bool
            Write ``k`` / ``v`` first.

        Returns
        -------
        torch.Tensor
            shape ``[B, H_q * d]``, dtype of ``q``.
        """
        md = self._check_layer(layer, q, want_decode=True)
        h_q, h_kv, d = self.num_q_heads, self.num_kv_heads, self.head_dim
        if save_kv_cache and k is not None and v is not None:
            self._write_kv(md, layer, forward_batch.out_cache_loc, k.view(-1, h_kv, d), v.view(-1, h_kv, d))
        q3 = q.reshape(-1, h_q, d)
        if md.graph:
            self.sealer.window.observe_rows(layer.layer_id - self.pool.start_layer, q3, md.ring_rows)
        else:
            self.sealer.window.observe(layer.layer_id - self.pool.start_layer, q3)
        arena, desc, bounds, k_buf, v_buf = self._layer_tables(layer)
        self._score_and_select(q3, desc, bounds, md.seg_ids_padded, md.seg_counts, md.scores, md.read_budget,
                               md.sel_ids, sm_scale=layer.scaling)  # fmt: skip
        o = torch.empty_like(q3)
        self._sparse_decode_fwd(
            q3, arena, desc, md.sel_ids, k_buf, v_buf, md.tail_indptr, md.tail_indices, o,
            md.partial_out, md.partial_lse, sm_scale=layer.scaling, num_splits=md.num_splits,
        )  # fmt: skip
        return o.view(-1, h_q * d)

    def forward_extend(
        self,
        q: torch.Tensor,
        k: Optional[torch.Tensor],
        v: Optional[torch.Tensor],
        layer: "RadixAttention",
        forward_batch: "ForwardBatch",
        save_kv_cache: bool = True,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Extend (prefill) attention of one layer over (compressed prefix + dense prefix tail + new tokens).

        Parameters
        ----------
        q : torch.Tensor
            shape ``[T, H_q * d]`` (or ``[T, H_q, d]``), ``T`` = new tokens of the batch, ragged by request.
        k, v : torch.Tensor
            shape ``[T, H_kv, d]`` (or ``[T, H_kv * d]``); the new tokens' keys/values (required: they are attended
            directly), written at ``forward_batch.out_cache_loc`` when ``save_kv_cache``.
        layer : RadixAttention
            As in :meth:`forward_decode`; ``attn_type`` ``ENCODER_ONLY`` turns the causal mask off.
        forward_batch : ForwardBatch
            The planned batch.
        save_kv_cache : bool
            Write ``k`` / ``v`` to the pool first.

        Returns
        -------
        torch.Tensor
            shape ``[T, H_q * d]``, dtype of ``q``.
        """
        md = self._check_layer(layer, q, want_decode=False)
        if k is None or v is None:
            raise ValueError("k, v: expected the new tokens' keys and values, got None")
        h_q, h_kv, d = self.num_q_heads, self.num_kv_heads, self.head_dim
        k3, v3 = k.view(-1, h_kv, d), v.view(-1, h_kv, d)
        if save_kv_cache:
            self._write_kv(md, layer, forward_batch.out_cache_loc, k3, v3)
        q3 = q.reshape(-1, h_q, d)
        self.sealer.window.observe(layer.layer_id - self.pool.start_layer, q3)
        causal = getattr(getattr(layer, "attn_type", None), "name", "DECODER") != "ENCODER_ONLY"
        arena, desc, _, k_buf, v_buf = self._layer_tables(layer)
        o = torch.empty_like(q3)
        self._extend_fwd(
            q3, k3, v3, o, md.qo_indptr, md.max_extend_len, arena, desc, md.seg_ids_padded, k_buf, v_buf,
            md.tail_indptr, md.tail_indices, md.k_scratch, md.v_scratch, sm_scale=layer.scaling, causal=causal,
        )  # fmt: skip
        return o.view(-1, h_q * d)


def create_mosaic_backend(runner: Any) -> MosaicAttnBackend:
    """Factory in the shape of SGLang's ``create_<name>_backend(runner)`` (not registered yet).

    Validates that the runner's KV pool is MosaicKV's, that its dtype is supported and that CUDA graphs are off, then
    constructs :class:`MosaicAttnBackend`.

    Raises
    ------
    ValueError
        The pool is not a :class:`~mosaickv_sglang.kv_pool.MosaicMHATokenToKVPool` (message names
        ``--kv-compressor``) or its dtype is unsupported.
    NotImplementedError
        Decode CUDA graphs are enabled (neither ``disable_cuda_graph`` nor ``disable_decode_cuda_graph`` is set)
        without ``--mosaic-cuda-graph on``.
    """
    pool = getattr(runner, "token_to_kv_pool", None)
    if not isinstance(pool, MosaicMHATokenToKVPool):
        raise ValueError(
            f"token_to_kv_pool: expected MosaicMHATokenToKVPool, got {type(pool).__name__}; --attention-backend "
            "mosaic needs --kv-compressor mosaic"
        )
    if pool.dtype not in MosaicAttnBackend.supported_dtypes:
        raise ValueError(
            f"kv dtype: expected one of {[str(t) for t in MosaicAttnBackend.supported_dtypes]}, got {pool.dtype}"
        )
    server_args = getattr(runner, "server_args", None)
    decode_graphs = server_args is not None and not (
        getattr(server_args, "disable_cuda_graph", False) or getattr(server_args, "disable_decode_cuda_graph", False)
    )
    if decode_graphs and not pool.mosaic_config.cuda_graph:
        raise NotImplementedError(_CUDA_GRAPH_MSG)
    backend = MosaicAttnBackend(runner)
    logger.info(
        "MosaicKV attention backend: %d q / %d KV heads, head dim %d, segment size %d, decode read budget %d tokens",
        backend.num_q_heads, backend.num_kv_heads, backend.head_dim, backend.page_size,
        backend.config.decode_read_budget,
    )  # fmt: skip
    return backend
