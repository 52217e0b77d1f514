# SPDX-License-Identifier: Apache-2.0
"""Quality of MosaicKV's compressed KV cache on a real model: attention error and greedy-token agreement.

For every RULER-style prompt (:mod:`bench.ruler`) and SmolLM2-135M-Instruct (:mod:`bench.smollm2`, fp32, CPU):

1. **Prefill** the context densely and keep each layer's K (post-RoPE) and V, plus the queries of the last ``W``
   context tokens (the planner's "observed queries"; the question is *not* seen, as for a shared prefix).
2. **Compress** the cached context with every method at every ratio. The context is cut into segments of ``S``
   tokens per KV head; the first ``--sinks`` tokens and the segments that reach into the last ``--hot`` tokens
   (plus the partial last segment) stay dense, everything in between (the *region*) is compressed. A ratio ``r``
   means: the region's packed bytes (payloads, bitmasks, factors, descriptors, Quest bounds) are at most
   ``1 / r`` of its raw 16-bit dense K+V bytes, as in ``--mosaic-compression-ratio`` ("sealed segments").
   Methods: the 2-D planner (``mosaic-exact`` = :func:`~mosaickv_sglang.planner.plan_exact`, ``mosaic-fast`` =
   :func:`~mosaickv_sglang.planner.plan_fast`, ``mosaic-2d`` = ``plan_exact`` without low-rank candidates), the
   single-axis baselines on the same optimiser, objective and budget (``token-only`` = SnapKV-like
   :func:`~mosaickv_sglang.planner.plan_token_only`, ``channel-only`` = ThinK-like
   :func:`~mosaickv_sglang.planner.plan_channel_only`), and casts (``fp8`` = e4m3 with one scale per layer and
   tensor, ratio 2; ``fp8-token`` = one bf16 scale per token and head; ``bf16`` = the 16-bit arena alone, ratio 1).
   Approximated segments come from :func:`~mosaickv_sglang.planner.apply_plan_reference`, with what is kept
   rounded to the arena dtype (``--arena-dtype``, bf16 by default; low-rank factors too) as the packed cache holds it.
3. **Evaluate**: the question (and the answer tokens) run through the model with a custom attention function
   (``AttentionInterface.register("mosaic_eval", ...)``) that attends over [compressed prefix, each KV head with its
   own kept rows ; exact K/V of the new tokens]. Measured against the dense cache:

   * ``attn_err``: relative attention-output error ``||o_c - o_d|| / ||o_d||`` per layer, query head and new
     token, with the *same* inputs (teacher-forced on the dense run), averaged;
   * ``agree_tf``: top-1 agreement of the compressed model's next-token predictions with dense greedy tokens,
     teacher-forced on the dense answer; ``dnll``: mean change of the dense answer tokens' negative log-likelihood;
   * ``agree_free``: token-by-token agreement of free-running greedy generation; ``em``: whether that generation
     contains the expected answer (the dense model's own ``em`` is reported alongside);
   * ``ratio``: achieved region ratio (raw dense bytes / bytes kept incl. metadata) and ``ratio_all``: the whole
     context (sinks, hot window and tail counted as raw dense).

Before measuring, every planner at ratio 1 (all segments dense, fp32 storage) must reproduce the dense run: zero
attention error and identical tokens (asserted).

Run ``python -m bench.quality --help``. Results: a JSON file (``--out``) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

logger = logging.getLogger("bench.quality")

ATTN_IMPL = "mosaic_eval"
PLANNER_METHODS = ("mosaic-exact", "mosaic-fast", "mosaic-2d", "token-only", "channel-only")
CAST_METHODS = ("fp8", "fp8-token", "bf16")
ALL_METHODS = PLANNER_METHODS + ("think",) + CAST_METHODS
DEFAULT_METHODS = (
    "mosaic-exact", "mosaic-fast", "mosaic-2d", "token-only", "channel-only", "think", "fp8", "fp8-token", "bf16"
)
SINGLE_AXIS_METHODS = ("token-only", "channel-only", "think")
TWO_D_METHODS = ("mosaic-exact", "mosaic-fast", "mosaic-2d")
CAST_RATIOS = {"fp8": 2.0, "fp8-token": 2.0, "bf16": 1.0}
FP8_MAX = 448.0
ARENA_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# =====================================================================================================================
# segment layout
# =====================================================================================================================
@dataclass(frozen=True)
class Layout:
    """How a context of ``length`` tokens is cut into segments.

    Segment ``i`` covers tokens ``[i S, (i + 1) S)`` for ``i < num_segments = length // S``; the tail
    (``length % S`` tokens) is not a segment and stays dense. A segment is *fixed* (kept dense, flagged
    always-read) when it holds one of the first ``sinks`` tokens or one of the last ``hot`` tokens; the others form
    the compressible *region*.
    """

    length: int
    seg_size: int = 64
    sinks: int = 64
    hot: int = 256

    @property
    def num_segments(self) -> int:
        return self.length // self.seg_size

    def fixed(self) -> torch.Tensor:
        """shape ``[num_segments]``, bool: sink and hot-window segments."""
        s = self.seg_size
        start = torch.arange(self.num_segments) * s
        return (start < self.sinks) | (start + s > self.length - self.hot)

    @property
    def region_segments(self) -> int:
        return int((~self.fixed()).sum())

    @property
    def region_tokens(self) -> int:
        return self.region_segments * self.seg_size

    def region_token_mask(self) -> torch.Tensor:
        """shape ``[length]``, bool: tokens of the compressible region."""
        m = torch.zeros(self.length, dtype=torch.bool)
        seg = ~self.fixed()
        m[: self.num_segments * self.seg_size] = seg.repeat_interleave(self.seg_size)
        return m


def raw_bytes(tokens: int, kv_heads: int, head_dim: int) -> int:
    """Bytes of dense K+V in a 16-bit cache."""
    return 2 * 2 * tokens * kv_heads * head_dim


# =====================================================================================================================
# compressed prefix and the custom attention function
# =====================================================================================================================
@dataclass
class CompressedPrefix:
    """The cached context as a method leaves it, per layer: what attention reads.

    Attributes
    ----------
    keys, values : list of torch.Tensor
        Per layer ``[H_kv, T, d]``, fp32: approximated rows (dropped rows arbitrary).
    keep : list of torch.Tensor or None
        Per layer ``[H_kv, T]``, bool: rows present (``None``: all).
    region_bytes : int
        Bytes the method stores for the region (metadata included).
    """

    keys: List[torch.Tensor]
    values: List[torch.Tensor]
    keep: Optional[List[torch.Tensor]]
    region_bytes: int
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[1])


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, key_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Causal GQA attention of the last ``Lq`` positions, in fp32.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, Hq, Lq, d]``; query ``i`` sits at position ``L - Lq + i``.
    k, v : torch.Tensor
        ``[B, Hkv, L, d]``; query head ``j`` reads KV head ``j // (Hq / Hkv)`` (transformers' ``repeat_kv`` layout).
    key_mask : torch.Tensor, optional
        ``[B, Hkv, L]`` bool; rows each head may read (``None``: all).

    Returns
    -------
    torch.Tensor
        ``[B, Hq, Lq, d]``, fp32.
    """
    b, hq, lq, d = q.shape
    _, hkv, length, _ = k.shape
    g = hq // hkv
    s = torch.matmul(q.float().reshape(b, hkv, g * lq, d), k.float().transpose(-1, -2)) * scaling
    s = s.view(b, hkv, g, lq, length)
    pos = torch.arange(length, device=q.device)
    allowed = pos[None, :] <= (length - lq + torch.arange(lq, device=q.device))[:, None]  # [Lq, L]
    allowed = allowed[None, None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, :, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p.view(b, hkv, g * lq, length), v.float()).view(b, hq, lq, d)


@dataclass
class PrefixBank:
    """Several cached prefixes stacked for one batched run: row ``b`` of a batch reads prefix ``b``.

    Attributes
    ----------
    keys, values : list of torch.Tensor
        Per layer ``[B, H_kv, T, d]``, fp32.
    keep : list of torch.Tensor
        Per layer ``[B, H_kv, T]``, bool.
    names : list of str
    """

    keys: List[torch.Tensor]
    values: List[torch.Tensor]
    keep: List[torch.Tensor]
    names: List[str]

    @classmethod
    def stack(cls, prefixes: Sequence[CompressedPrefix], names: Sequence[str]) -> "PrefixBank":
        n_layers = len(prefixes[0].keys)

        def keep_of(p: CompressedPrefix, i: int) -> torch.Tensor:
            return p.keep[i] if p.keep is not None else torch.ones(p.keys[i].shape[:2], dtype=torch.bool)

        return cls(
            [torch.stack([p.keys[i] for p in prefixes]) for i in range(n_layers)],
            [torch.stack([p.values[i] for p in prefixes]) for i in range(n_layers)],
            [torch.stack([keep_of(p, i) for p in prefixes]) for i in range(n_layers)],
            list(names),
        )

    @property
    def size(self) -> int:
        return int(self.keys[0].shape[0])

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[2])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of ``q`` over [prefix ; new tokens] for a batch whose cache holds only the new tokens ``k``, ``v``
        ``[B, H_kv, n, d]`` (batch row ``b`` reads prefix ``b``; a one-prefix bank serves any batch)."""
        return attend_prefix(q, self.keys[layer], self.values[layer], self.keep[layer], k, v, scaling)


def attend_prefix(
    q: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    pmask: Optional[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """:func:`attend` over [prefix ; new tokens] without concatenating the (large, per-row) prefix K/V.

    ``pk``, ``pv`` ``[B or 1, H_kv, T, d]``, ``pmask`` ``[B or 1, H_kv, T]`` bool (rows present); ``k``, ``v``
    ``[B, H_kv, n, d]`` the new tokens, causal among themselves (query ``i`` is new token ``n - Lq + i``).
    """
    b, hq, lq, d = q.shape
    hkv, n, t = k.shape[1], k.shape[2], pk.shape[2]
    g = hq // hkv
    qf = q.float().reshape(b, hkv, g * lq, d)
    s1 = torch.matmul(qf, pk.transpose(-1, -2)) * scaling  # [B, Hkv, G*Lq, T]
    if pmask is not None:
        s1 = s1.masked_fill(~pmask[:, :, None, :], float("-inf"))
    s2 = (torch.matmul(qf, k.float().transpose(-1, -2)) * scaling).view(b, hkv, g, lq, n)
    causal = torch.arange(n)[None, :] <= (n - lq + torch.arange(lq))[:, None]  # [Lq, n]
    s2 = s2.masked_fill(~causal, float("-inf")).view(b, hkv, g * lq, n)
    p = torch.softmax(torch.cat([s1, s2], -1), dim=-1)
    out = torch.matmul(p[..., :t], pv) + torch.matmul(p[..., t:], v.float())
    return out.view(b, hq, lq, d)


class _Hook:
    """What the attention function does in one model call (set through :func:`active`): plain causal attention."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
        return attend(q, k, v, scaling)


class BankHook(_Hook):
    """Attention over [prefix of the row's bank entry ; exact K/V of the new tokens in the cache]."""

    def __init__(self, bank: PrefixBank) -> None:
        self.bank = bank

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
        return self.bank.attend(layer, q, k, v, scaling)


class CaptureHook(_Hook):
    """Records the last ``window`` queries of every layer (``queries[layer]`` ``[Hq, W, d]``, batch row 0).

    Without a bank: dense causal attention over the cache (prefill, SDPA); with one: a :class:`BankHook`.
    """

    def __init__(self, window: int, bank: Optional[PrefixBank] = None) -> None:
        self.window = window
        self.inner = BankHook(bank) if bank is not None else None
        self.queries: Dict[int, torch.Tensor] = {}

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
        self.queries[layer] = q[0, :, -self.window :].detach().float().contiguous().clone()
        if self.inner is not None:
            return self.inner(layer, q, k, v, scaling)
        if q.shape[2] != k.shape[2]:
            return attend(q, k, v, scaling)
        return torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), is_causal=True, scale=scaling, enable_gqa=True
        )


class ProbeHook(_Hook):
    """Dense run (batch 1, ``dense`` prefix) that also measures every probed prefix on the *same* inputs.

    ``err_sum[name]`` is ``[num_layers]``: the sum over query heads and new tokens of ``||o_c - o_d|| / ||o_d||``
    for the probed prefix ``name``; ``count`` the number of (head, token) pairs per layer. ``answer_sum`` /
    ``answer_count``: the same restricted to single-token calls (greedy decode steps, i.e. the queries of the
    answer tokens after the first).
    """

    def __init__(self, dense: PrefixBank, probes: Sequence[PrefixBank], num_layers: int) -> None:
        self.dense = dense
        self.probes = list(probes)
        names = [n for bank in probes for n in bank.names]
        self.err_sum = {n: torch.zeros(num_layers, dtype=torch.float64) for n in names}
        self.answer_sum = {n: 0.0 for n in names}
        self.count = torch.zeros(num_layers, dtype=torch.float64)
        self.answer_count = 0

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
        o_d = self.dense.attend(layer, q, k, v, scaling)
        den = o_d.norm(dim=-1).clamp(min=1e-30)
        decode = q.shape[2] == 1
        for bank in self.probes:
            b = bank.size
            o_c = bank.attend(layer, q.expand(b, -1, -1, -1), k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), scaling)
            err = ((o_c - o_d).norm(dim=-1) / den).double().sum(dim=(1, 2))
            for name, e in zip(bank.names, err.tolist()):
                self.err_sum[name][layer] += e
                if decode:
                    self.answer_sum[name] += e
        self.count[layer] += q.shape[1] * q.shape[2]
        if decode:
            self.answer_count += q.shape[1] * q.shape[2]
        return o_d

    def mean_error(self, name: str) -> float:
        return float(self.err_sum[name].sum() / self.count.sum().clamp(min=1))

    def answer_error(self, name: str) -> float:
        return self.answer_sum[name] / max(self.answer_count, 1)

    def layer_error(self, name: str) -> List[float]:
        return (self.err_sum[name] / self.count.clamp(min=1)).tolist()


_ACTIVE: contextvars.ContextVar[Optional[_Hook]] = contextvars.ContextVar("mosaic_eval_hook", default=None)


@contextlib.contextmanager
def active(hook: Optional[_Hook]) -> Iterator[Optional[_Hook]]:
    """Route the model's attention (implementation ``mosaic_eval``) through ``hook`` inside the block."""
    token = _ACTIVE.set(hook)
    try:
        yield hook
    finally:
        _ACTIVE.reset(token)


def mosaic_eval_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> Tuple[torch.Tensor, None]:
    """transformers attention function: ``query`` ``[B, Hq, Lq, d]``, ``key``/``value`` ``[B, Hkv, L, d]`` (what the
    cache holds, new tokens included). No padding: the causal mask is built here, ``attention_mask`` is ignored."""
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    hook = _ACTIVE.get() or _Hook()
    out = hook(int(module.layer_idx), query, key, value, scale)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register :func:`mosaic_eval_attention` as ``"mosaic_eval"`` with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL, mosaic_eval_attention)
    return ATTN_IMPL


def use_mosaic_attention(model: torch.nn.Module) -> None:
    """Switch a loaded transformers model to the ``mosaic_eval`` attention function."""
    register_attention()
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(ATTN_IMPL)
            return
        except Exception as exc:  # older/newer transformers may refuse custom names here
            logger.debug("set_attn_implementation(%s) failed (%s); setting the config field", ATTN_IMPL, exc)
    model.config._attn_implementation = ATTN_IMPL


# =====================================================================================================================
# model runs
# =====================================================================================================================
def _new_cache(model: torch.nn.Module) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.inference_mode()
def prefill(model: torch.nn.Module, ids: Sequence[int], window: int) -> Tuple[CompressedPrefix, List[torch.Tensor]]:
    """Dense prefill of ``ids``: the dense prefix (per layer K post-RoPE and V, ``[H_kv, T, d]`` fp32) and per layer
    the queries of the last ``window`` tokens ``[Hq, W, d]``."""
    cap = CaptureHook(window)
    cache = _new_cache(model)
    with active(cap):
        model(input_ids=torch.tensor([list(ids)]), past_key_values=cache, use_cache=True)
    n = model.config.num_hidden_layers
    keys = [cache.layers[i].keys[0].float().clone() for i in range(n)]
    values = [cache.layers[i].values[0].float().clone() for i in range(n)]
    return CompressedPrefix(keys, values, None, 0), [cap.queries[i] for i in range(n)]


@torch.inference_mode()
def run_tokens(model: torch.nn.Module, cache: Any, ids: torch.Tensor, prefix_len: int, hook: _Hook) -> torch.Tensor:
    """Logits ``[B, L, V]`` (fp32) of ``ids`` ``[B, L]`` placed after a prefix of ``prefix_len`` tokens that ``hook``
    supplies; ``cache`` holds only the tokens run so far (and grows)."""
    start = prefix_len + cache.get_seq_length()
    pos = torch.arange(start, start + ids.shape[1])[None].expand(ids.shape[0], -1)
    with active(hook):
        out = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
    return out.logits.float()


@torch.inference_mode()
def greedy(
    model: torch.nn.Module, ids: Sequence[int], steps: int, prefix_len: int, hook: _Hook, batch: int = 1
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuation of ``ids`` (the same for every batch row) after the hook's prefix.

    Returns ``(tokens [B, steps], logits [B, steps, V])``.
    """
    cache = _new_cache(model)
    logits = run_tokens(model, cache, torch.tensor([list(ids)]).expand(batch, -1), prefix_len, hook)[:, -1]
    toks, rows = [], []
    for i in range(steps):
        rows.append(logits)
        toks.append(logits.argmax(-1))
        if i + 1 < steps:
            logits = run_tokens(model, cache, toks[-1][:, None], prefix_len, hook)[:, -1]
    return torch.stack(toks, 1), torch.stack(rows, 1)


@torch.inference_mode()
def teacher_forced(
    model: torch.nn.Module, ids: Sequence[int], targets: Sequence[int], prefix_len: int, hook: _Hook, batch: int = 1
) -> torch.Tensor:
    """Logits ``[B, len(targets), V]`` predicting each of ``targets`` after ``ids`` (fed with the targets)."""
    full = list(ids) + list(targets[:-1])
    cache = _new_cache(model)
    logits = run_tokens(model, cache, torch.tensor([full]).expand(batch, -1), prefix_len, hook)
    return logits[:, len(ids) - 1 :]


# =====================================================================================================================
# compression methods
# =====================================================================================================================
@dataclass(frozen=True)
class CompressSettings:
    seg_size: int = 64
    sinks: int = 64
    hot: int = 256
    arena_dtype: str = "bf16"
    budget_scope: str = "layer"  # "layer": each layer gets the ratio; "global": one budget for all layers
    baseline_estimator: str = "exact"
    unseen_weight: Optional[float] = None  # every planner method; None: the planner's DEFAULT_UNSEEN_WEIGHT


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if dtype == torch.float32 else x.to(dtype).float()


def _round_factors(plan: Any, dtype: torch.dtype) -> Any:
    if dtype == torch.float32 or (plan.k_factors is None and plan.v_factors is None):
        return plan
    rf = lambda f: None if f is None else (f[0].to(dtype).float(), f[1].to(dtype).float())  # noqa: E731
    return dataclasses.replace(plan, k_factors=rf(plan.k_factors), v_factors=rf(plan.v_factors))


def _planner_fn(method: str, baseline_estimator: str, unseen_weight: Optional[float] = None) -> Callable[..., Any]:
    from mosaickv_sglang import planner as pl

    if unseen_weight is not None:
        inner = _planner_fn(method, baseline_estimator)
        return lambda k, v, q, **kw: inner(k, v, q, unseen_weight=unseen_weight, **kw)

    if method == "mosaic-exact":
        return lambda k, v, q, **kw: pl.plan_exact(k, v, q, **kw)
    if method == "mosaic-fast":
        return lambda k, v, q, **kw: pl.plan_fast(k, v, queries=q, **kw)
    if method == "mosaic-2d":
        from mosaickv_sglang.kernels import format as fmt
        from mosaickv_sglang.strategies import default_menu

        def no_lowrank(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, **kw: Any) -> Any:
            menu = [c for c in default_menu(k.shape[1], k.shape[2]) if fmt.FORM_LOWRANK not in (c.k_form, c.v_form)]
            return pl.plan_exact(k, v, q, menu=menu, **kw)

        return no_lowrank
    if method == "token-only":
        return lambda k, v, q, **kw: pl.plan_token_only(k, v, q, estimator=baseline_estimator, **kw)
    if method == "channel-only":
        return lambda k, v, q, **kw: pl.plan_channel_only(k, v, q, estimator=baseline_estimator, **kw)
    raise ValueError(f"method: expected one of {PLANNER_METHODS}, got {method!r}")


class _EstimateCache:
    """Reuse the planner's error estimates across the budgets of one method (they do not depend on the budget).

    The public entry points (``plan_exact`` etc.) take one budget and re-estimate every time; the estimate is most
    of their cost. Inside this context the module-level estimators of :mod:`mosaickv_sglang.planner` are wrapped
    with a memo keyed by the identity of the input tensors, the menu and a fingerprint of the importance statistics,
    and restored afterwards. If the planner has no such functions, nothing is cached.
    """

    NAMES = ("estimate_errors_exact", "estimate_errors_fast")

    def __init__(self) -> None:
        self.memo: Dict[Tuple[Any, ...], Any] = {}
        self.hits = 0
        self.saved: Dict[str, Callable[..., Any]] = {}

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def key_of(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return ("t", id(x), tuple(x.shape))
            if hasattr(x, "token_mass") and hasattr(x, "k_chan_weight"):
                return ("imp", float(x.token_mass.double().sum()), float(x.k_chan_weight.double().sum()),
                        float(x.v_chan_weight.double().sum()))
            if isinstance(x, (list, tuple)):
                return tuple(key_of(y) for y in x)
            return x

        def cached(*args: Any, **kwargs: Any) -> Any:
            key = (name, key_of(args), tuple(sorted((k, key_of(v)) for k, v in kwargs.items())))
            if key not in self.memo:
                self.memo[key] = fn(*args, **kwargs)
            else:
                self.hits += 1
            return self.memo[key]

        return cached

    def __enter__(self) -> "_EstimateCache":
        from mosaickv_sglang import planner as pl

        for name in self.NAMES:
            fn = getattr(pl, name, None)
            if callable(fn):
                self.saved[name] = fn
                setattr(pl, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc: Any) -> None:
        from mosaickv_sglang import planner as pl

        for name, fn in self.saved.items():
            setattr(pl, name, fn)
        self.memo.clear()


def compress_with_planner(
    method: str,
    ratios: Sequence[float],
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    queries: Sequence[torch.Tensor],
    settings: CompressSettings,
) -> Dict[float, Any]:
    """Plan and reconstruct every layer's context with a planner method at each ratio (region bytes vs raw dense).

    A ratio of 1 asks the planner for its all-dense plan (``ratio=1.0``), the exactness check.

    Parameters
    ----------
    keys, values : sequence of torch.Tensor
        Per layer ``[H_kv, T, d]``.
    queries : sequence of torch.Tensor
        Per layer ``[Hq, W, d]``, post-RoPE.

    Returns
    -------
    dict
        ``ratio -> CompressedPrefix``, or ``ratio -> str`` (the planner's reason) where the method's menu cannot
        reach the ratio.
    """
    from mosaickv_sglang.planner import apply_plan_reference
    from mosaickv_sglang.strategies import dense_segment_bytes

    plan_fn = _planner_fn(method, settings.baseline_estimator, settings.unseen_weight)
    adt = ARENA_DTYPES[settings.arena_dtype]
    hkv, t, d = keys[0].shape
    hq = queries[0].shape[0]
    g = hq // hkv
    s = settings.seg_size
    lay = Layout(t, s, settings.sinks, settings.hot)
    n = lay.num_segments
    fixed_seg = lay.fixed()
    n_layers = len(keys)
    dense_seg = dense_segment_bytes(s, d)
    region_raw_per_layer = raw_bytes(lay.region_tokens, hkv, d)

    def segs(x: torch.Tensor) -> torch.Tensor:  # [Hkv, T, d] -> [Hkv * n, S, d]
        return x[:, : n * s].reshape(hkv * n, s, d)

    def seg_queries(q: torch.Tensor) -> torch.Tensor:  # [Hq, W, d] -> [Hkv * n, W, G, d]
        w = q.shape[1]
        qq = q.view(hkv, g, w, d).permute(0, 2, 1, 3)
        return qq[:, None].expand(hkv, n, w, g, d).reshape(hkv * n, w, g, d)

    layer_groups = [list(range(n_layers))] if settings.budget_scope == "global" else [[i] for i in range(n_layers)]
    ratios = [float(r) for r in ratios]
    out_k = {r: [torch.empty(0)] * n_layers for r in ratios}
    out_v = {r: [torch.empty(0)] * n_layers for r in ratios}
    out_keep = {r: [torch.empty(0)] * n_layers for r in ratios}
    region_bytes = {r: 0 for r in ratios}
    choices: Dict[float, Dict[str, int]] = {r: {} for r in ratios}
    failed: Dict[float, str] = {}
    for group in layer_groups:
        k_src = [_round(keys[i].float(), adt) for i in group]
        v_src = [_round(values[i].float(), adt) for i in group]
        kk = torch.cat([segs(x) for x in k_src])
        vv = torch.cat([segs(x) for x in v_src])
        qq = torch.cat([seg_queries(queries[i].float()) for i in group])
        gid = torch.arange(len(group) * hkv).repeat_interleave(n)
        always = fixed_seg.repeat(len(group) * hkv)
        n_fixed = int(always.sum())
        per = hkv * n
        with _EstimateCache():
            for r in ratios:
                if r in failed:
                    continue
                kw: Dict[str, Any] = dict(group_ids=gid, always_dense=always)
                if r == 1.0:
                    kw["ratio"] = 1.0
                else:
                    kw["budget_bytes"] = n_fixed * dense_seg + int(math.floor(len(group) * region_raw_per_layer / r))
                try:
                    res = plan_fn(kk, vv, qq, **kw)
                except ValueError as exc:
                    if "budget" not in str(exc):
                        raise
                    failed[r] = str(exc)
                    logger.debug("%s@%g: %s", method, r, exc)
                    continue
                plan = _round_factors(res.plan, adt)
                k_hat, v_hat, keep = apply_plan_reference(kk, vv, plan)
                region_bytes[r] += res.total_bytes - n_fixed * dense_seg
                for c in res.choice[~always].tolist():
                    name = res.menu[c].name
                    choices[r][name] = choices[r].get(name, 0) + 1
                for j, i in enumerate(group):
                    sl = slice(j * per, (j + 1) * per)
                    tail_k, tail_v = k_src[j][:, n * s :], v_src[j][:, n * s :]
                    out_k[r][i] = torch.cat([_round(k_hat[sl].reshape(hkv, n * s, d), adt), tail_k], dim=1)
                    out_v[r][i] = torch.cat([_round(v_hat[sl].reshape(hkv, n * s, d), adt), tail_v], dim=1)
                    tail = torch.ones(hkv, t - n * s, dtype=torch.bool)
                    out_keep[r][i] = torch.cat([keep[sl].reshape(hkv, n * s), tail], dim=1)
    result: Dict[float, Any] = {}
    for r in ratios:
        if r in failed:
            result[r] = failed[r]
        else:
            info = {"choices": dict(sorted(choices[r].items(), key=lambda x: -x[1]))}
            result[r] = CompressedPrefix(out_k[r], out_v[r], out_keep[r], region_bytes[r], info)
    return result


def compress_think(
    ratio: float,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    queries: Sequence[torch.Tensor],
    settings: CompressSettings,
) -> CompressedPrefix:
    """ThinK-style channel pruning (arXiv 2407.21018): one channel set per layer and KV head for the whole region.

    K keeps the ``k_K`` channels of largest ``||Q_c|| * ||K_c||`` (observed queries of the GQA group, region keys),
    V the ``k_V`` channels of largest ``||V_c||``, with ``k_K + k_V = floor(2 d / ratio)`` (``k_K`` the larger half).
    Bytes: the kept channels in the arena dtype plus one ``d``-bit mask per layer, head and tensor.
    """
    adt = ARENA_DTYPES[settings.arena_dtype]
    hkv, t, d = keys[0].shape
    lay = Layout(t, settings.seg_size, settings.sinks, settings.hot)
    reg = lay.region_token_mask()
    total = int(math.floor(2 * d / ratio))
    k_k, k_v = (total + 1) // 2, total // 2
    if k_k < 1 or k_v < 1:
        raise ValueError(f"ratio: expected <= {d} for ThinK-style pruning of head_dim {d}, got {ratio}")
    out_k, out_v = [], []
    region_bytes = 0
    for kl, vl, ql in zip(keys, values, queries):
        hq, w, _ = ql.shape
        qn = ql.float().reshape(hkv, (hq // hkv) * w, d).norm(dim=1)  # [Hkv, d]
        ks, vs = _round(kl.float(), adt).clone(), _round(vl.float(), adt).clone()
        kr, vr = ks[:, reg], vs[:, reg]
        k_score = qn * kr.norm(dim=1)
        v_score = vr.norm(dim=1)
        k_mask = torch.zeros(hkv, d, dtype=torch.bool).scatter_(1, k_score.topk(k_k, dim=1).indices, True)
        v_mask = torch.zeros(hkv, d, dtype=torch.bool).scatter_(1, v_score.topk(k_v, dim=1).indices, True)
        ks[:, reg] = kr * k_mask[:, None, :]
        vs[:, reg] = vr * v_mask[:, None, :]
        out_k.append(ks)
        out_v.append(vs)
        region_bytes += 2 * hkv * lay.region_tokens * (k_k + k_v) + 2 * hkv * d // 8
    return CompressedPrefix(out_k, out_v, None, region_bytes, {"channels": {"k": k_k, "v": k_v}})


def compress_cast(
    method: str, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], settings: CompressSettings
) -> CompressedPrefix:
    """``fp8`` (e4m3, one fp32 scale per layer for K and one for V, SGLang's ``fp8_e4m3`` style), ``fp8-token`` (one
    bf16 scale per token, head and tensor) or ``bf16`` (the arena dtype alone) applied to the region; the rest of the
    context is kept in the arena dtype like every other method."""
    adt = ARENA_DTYPES[settings.arena_dtype]
    hkv, t, d = keys[0].shape
    lay = Layout(t, settings.seg_size, settings.sinks, settings.hot)
    reg = lay.region_token_mask()
    n_reg = lay.region_tokens
    out_k, out_v = [], []
    region_bytes = 0
    for kl, vl in zip(keys, values):
        pair = []
        for x in (kl.float(), vl.float()):
            y = _round(x, adt).clone()
            xr = x[:, reg]
            if method == "fp8":
                scale = (xr.abs().amax() / FP8_MAX).clamp(min=1e-12)
                y[:, reg] = (xr / scale).to(torch.float8_e4m3fn).float() * scale
                region_bytes += xr.numel() + 4
            elif method == "fp8-token":
                scale = (xr.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12).to(torch.bfloat16).float()
                y[:, reg] = (xr / scale).to(torch.float8_e4m3fn).float() * scale
                region_bytes += xr.numel() + 2 * hkv * n_reg
            elif method == "bf16":
                y[:, reg] = xr.to(torch.bfloat16).float()
                region_bytes += 2 * xr.numel()
            else:
                raise ValueError(f"method: expected one of {CAST_METHODS}, got {method!r}")
            pair.append(y)
        out_k.append(pair[0])
        out_v.append(pair[1])
    return CompressedPrefix(out_k, out_v, None, region_bytes, {})


def _with_ratios(p: CompressedPrefix, keys: Sequence[torch.Tensor], settings: CompressSettings, seconds: float) -> None:
    hkv, t, d = keys[0].shape
    lay = Layout(t, settings.seg_size, settings.sinks, settings.hot)
    n_layers = len(keys)
    region_raw = n_layers * raw_bytes(lay.region_tokens, hkv, d)
    rest_raw = n_layers * raw_bytes(t - lay.region_tokens, hkv, d)
    p.info.update(
        region_raw_bytes=region_raw,
        region_bytes=p.region_bytes,
        ratio=region_raw / max(p.region_bytes, 1),
        ratio_all=(region_raw + rest_raw) / max(p.region_bytes + rest_raw, 1),
        plan_seconds=seconds,
    )


def compress_all(
    method: str,
    ratios: Sequence[float],
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    queries: Sequence[torch.Tensor],
    settings: CompressSettings,
) -> Dict[float, Any]:
    """``ratio -> CompressedPrefix`` (``info`` holds the achieved byte ratios) or ``ratio -> str`` (unreachable)."""
    t0 = time.perf_counter()
    if method in PLANNER_METHODS:
        out = compress_with_planner(method, ratios, keys, values, queries, settings)
    elif method == "think":
        out = {}
        for r in ratios:
            try:
                out[float(r)] = compress_think(r, keys, values, queries, settings)
            except ValueError as exc:
                out[float(r)] = str(exc)
    elif method in CAST_METHODS:
        out = {CAST_RATIOS[method]: compress_cast(method, keys, values, settings)}
    else:
        raise ValueError(f"method: expected one of {ALL_METHODS}, got {method!r}")
    per = (time.perf_counter() - t0) / max(len(out), 1)
    for p in out.values():
        if isinstance(p, CompressedPrefix):
            _with_ratios(p, keys, settings, per)
    return out


def compress(
    method: str,
    ratio: float,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    queries: Sequence[torch.Tensor],
    settings: CompressSettings,
) -> CompressedPrefix:
    """One method at one ratio (casts ignore ``ratio``); ``ValueError`` if the method cannot reach it."""
    out = compress_all(method, [ratio], keys, values, queries, settings)
    p = next(iter(out.values()))
    if isinstance(p, str):
        raise ValueError(p)
    return p


# =====================================================================================================================
# evaluation of one sample
# =====================================================================================================================
@dataclass(frozen=True)
class Variant:
    method: str
    ratio: float

    @property
    def name(self) -> str:
        return f"{self.method}@{self.ratio:g}"


def variants(methods: Sequence[str], ratios: Sequence[float]) -> List[Variant]:
    out = []
    for m in methods:
        if m in CAST_METHODS:
            out.append(Variant(m, CAST_RATIOS[m]))
        else:
            out.extend(Variant(m, float(r)) for r in ratios)
    return out


def _tok_len(tok: Any, text: str) -> int:
    return len(tok(text, add_special_tokens=False).input_ids)


def needle_positions(tok: Any, sample: Any) -> List[int]:
    """Context token indices that overlap the first occurrence of each expected answer (the needle values)."""
    try:
        enc = tok(sample.context, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
        return []
    pos: List[int] = []
    for ans in sample.answers:
        start = sample.context.find(ans)
        if start < 0:
            continue
        end = start + len(ans)
        pos.extend(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start)
    return sorted(set(pos))


def evaluate_sample(
    model: torch.nn.Module,
    tok: Any,
    sample: Any,
    vars_: Sequence[Variant],
    settings: CompressSettings,
    *,
    window: int = 32,
    gen_tokens: int = 8,
    observe: str = "context",
    batch: int = 32,
    check_exact: bool = False,
    other_context: Optional[str] = None,
) -> Dict[str, Any]:
    """Run one RULER sample through dense and every variant; returns a JSON-able record.

    Parameters
    ----------
    observe : str
        Queries the planners see: ``"context"`` (the last ``window`` context tokens; the question is unknown when the
        cache is compressed, as for a shared prefix) or ``"question"`` (the last ``window`` tokens of the question,
        SnapKV's observation window), or ``"other"`` (the last ``window`` tokens of ``other_context``, another
        sample's context: what a server's shared query window gives a request's pages when another request's tokens
        came last in the batch).
    batch : int
        Variants evaluated together in one batched model run.
    check_exact : bool
        Also run every planner at ratio 1 with fp32 storage (and the dense prefix itself through the batched path);
        they must reproduce the dense run (zero attention error, identical tokens), else ``AssertionError``.
    """
    t0 = time.perf_counter()
    ctx = tok(sample.context, add_special_tokens=False).input_ids
    qry = tok(sample.query, add_special_tokens=False).input_ids
    t = len(ctx)
    steps = max(gen_tokens, _tok_len(tok, " " + sample.answer) + 2)
    n_layers = model.config.num_hidden_layers
    dense, queries = prefill(model, ctx, window)
    dense_bank = PrefixBank.stack([dense], ["dense"])
    if observe == "question":
        cap = CaptureHook(window, dense_bank)
        run_tokens(model, _new_cache(model), torch.tensor([qry]), t, cap)
        queries = [cap.queries[i] for i in range(n_layers)]
    elif observe == "other":
        if not other_context:
            raise ValueError("other_context: expected another sample's context with observe='other', got none")
        _, queries = prefill(model, tok(other_context, add_special_tokens=False).input_ids, window)
    elif observe != "context":
        raise ValueError(f"observe: expected 'context', 'question' or 'other', got {observe!r}")
    keys, values = dense.keys, dense.values
    t_prefill = time.perf_counter() - t0

    prefixes: Dict[str, CompressedPrefix] = {}
    unreachable: Dict[str, str] = {}
    for method in dict.fromkeys(v.method for v in vars_):
        mine = [v for v in vars_ if v.method == method]
        got = compress_all(method, [v.ratio for v in mine], keys, values, queries, settings)
        for v in mine:
            p = got[float(v.ratio)]
            if isinstance(p, str):
                unreachable[v.name] = p
            else:
                prefixes[v.name] = p
    checks: List[str] = []
    if check_exact:
        exact = dataclasses.replace(settings, arena_dtype="fp32")
        prefixes["check:dense"] = dense
        checks.append("check:dense")
        for m in sorted({v.method for v in vars_ if v.method in PLANNER_METHODS}):
            prefixes[f"check:{m}@1"] = compress(m, 1.0, keys, values, queries, exact)
            checks.append(f"check:{m}@1")
    t_plan = time.perf_counter() - t0 - t_prefill

    names = list(prefixes)
    infos = {n: prefixes[n].info for n in names}
    pos = needle_positions(tok, sample)
    needle_kept: Dict[str, Optional[float]] = {}
    for n in names:
        p = prefixes[n]
        needle_kept[n] = None if not pos else (
            1.0 if p.keep is None else float(torch.stack([kp[:, pos].float().mean() for kp in p.keep]).mean())
        )
    banks = [
        PrefixBank.stack([prefixes[n] for n in names[i : i + batch]], names[i : i + batch])
        for i in range(0, len(names), batch)
    ]
    prefixes.clear()  # the banks hold copies

    # dense run with probes: the question and the dense greedy answer; every prefix's error on the same inputs
    probe = ProbeHook(dense_bank, banks, n_layers)
    dense_toks_t, dense_logits = greedy(model, qry, steps, t, probe)
    dense_toks = dense_toks_t[0].tolist()
    target = torch.tensor(dense_toks)
    dense_nll = -torch.log_softmax(dense_logits[0], -1)[torch.arange(steps), target]
    dense_text = tok.decode(dense_toks, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    record: Dict[str, Any] = {
        "task": sample.task,
        "index": sample.index,
        "context_tokens": t,
        "query_tokens": len(qry),
        "answer": sample.answer,
        "gen_tokens": steps,
        "dense": {"text": dense_text, "tokens": dense_toks, "em": sample.exact_match(dense_text),
                  "score": sample.score(dense_text), "nll": float(dense_nll.mean())},
        "variants": {},
        "checks": {},
    }
    t_dense = time.perf_counter() - t0 - t_prefill - t_plan

    results: Dict[str, Dict[str, Any]] = {}
    for bank in banks:
        hook = BankHook(bank)
        b = bank.size
        tf = teacher_forced(model, qry, dense_toks, t, hook, b)  # [B, steps, V]
        nll = -torch.log_softmax(tf, -1)[:, torch.arange(steps), target]  # [B, steps]
        agree_tf = (tf.argmax(-1) == target[None]).float().mean(1)
        del tf
        toks, _ = greedy(model, qry, steps, t, hook, b)
        for j, name in enumerate(bank.names):
            row = toks[j].tolist()
            same = [x == y for x, y in zip(row, dense_toks)]
            text = tok.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            results[name] = {
                "attn_err": probe.mean_error(name),
                "attn_err_answer": probe.answer_error(name),
                "needle_kept": needle_kept.get(name),
                "agree_tf": float(agree_tf[j]),
                "dnll": float((nll[j] - dense_nll).mean()),
                "agree_free": sum(same) / steps,
                "match_prefix": same.index(False) if False in same else steps,
                "text": text,
                "em": sample.exact_match(text),
                "score": sample.score(text),
            }
    for name in checks:
        r = results[name]
        record["checks"][name] = {k: r[k] for k in ("attn_err", "agree_tf", "agree_free", "dnll")}
        if not (r["attn_err"] < 1e-5 and r["agree_tf"] == 1.0 and r["agree_free"] == 1.0):
            raise AssertionError(
                f"{name}: an all-dense plan must reproduce the dense run, got attention error {r['attn_err']:.3g}, "
                f"teacher-forced agreement {r['agree_tf']:.3f}, free-running agreement {r['agree_free']:.3f}"
            )
    for v in vars_:
        if v.name in unreachable:
            record["variants"][v.name] = {
                "method": v.method, "target_ratio": v.ratio, "unreachable": unreachable[v.name]
            }
            continue
        info = infos[v.name]
        record["variants"][v.name] = {
            "method": v.method,
            "target_ratio": v.ratio,
            **results[v.name],
            "attn_err_layers": probe.layer_error(v.name),
            **{k: info[k] for k in ("ratio", "ratio_all", "region_bytes", "region_raw_bytes", "plan_seconds")},
            "choices": info.get("choices", {}),
        }
    total = time.perf_counter() - t0
    record["seconds"] = {"prefill": t_prefill, "plan": t_plan, "dense_probe": t_dense,
                         "variants": total - t_prefill - t_plan - t_dense, "total": total}
    return record


# =====================================================================================================================
# summary
# =====================================================================================================================
def summarize(records: Sequence[Dict[str, Any]], vars_: Sequence[Variant]) -> Dict[str, Any]:
    """Mean of every metric per variant over all samples, and the equal-bytes comparison per ratio."""
    rows = []
    for v in vars_:
        all_rs = [r["variants"][v.name] for r in records if v.name in r["variants"]]
        rs = [x for x in all_rs if "unreachable" not in x]
        if not rs:
            if all_rs:
                rows.append({"variant": v.name, "method": v.method, "target_ratio": v.ratio, "samples": 0,
                             "unreachable": all_rs[0]["unreachable"]})
            continue
        mean = lambda key: sum(float(x[key]) for x in rs) / len(rs)  # noqa: E731
        rows.append({
            "variant": v.name, "method": v.method, "target_ratio": v.ratio, "samples": len(rs),
            "ratio": mean("ratio"), "ratio_all": mean("ratio_all"), "attn_err": mean("attn_err"),
            "agree_tf": mean("agree_tf"), "agree_free": mean("agree_free"), "dnll": mean("dnll"),
            "attn_err_answer": mean("attn_err_answer") if all("attn_err_answer" in x for x in rs) else None,
            "needle_kept": (sum(x["needle_kept"] for x in rs) / len(rs)
                            if all(x.get("needle_kept") is not None for x in rs) else None),
            "em": sum(bool(x["em"]) for x in rs), "score": mean("score"), "plan_seconds": mean("plan_seconds"),
        })
    dense_em = sum(bool(r["dense"]["em"]) for r in records)
    by = {(row["method"], row["target_ratio"]): row for row in rows if row["samples"]}
    verdicts = []
    for ratio in sorted({row["target_ratio"] for row in rows if row["method"] in PLANNER_METHODS}):
        singles = {m: by[(m, ratio)] for m in SINGLE_AXIS_METHODS if (m, ratio) in by}
        if not singles:
            continue
        best_err = min(singles.values(), key=lambda x: x["attn_err"])
        best_agree = max(singles.values(), key=lambda x: x["agree_tf"])
        for m in TWO_D_METHODS:
            row = by.get((m, ratio))
            if row is None:
                continue
            verdicts.append({
                "ratio": ratio, "method": m,
                "attn_err": row["attn_err"],
                "beats": {k: row["attn_err"] < x["attn_err"] for k, x in singles.items()},
                "beats_all_err": all(row["attn_err"] < x["attn_err"] for x in singles.values()),
                "best_single_err": [best_err["method"], best_err["attn_err"]],
                "agree_tf_minus_best_single": row["agree_tf"] - best_agree["agree_tf"],
                "unreachable_singles": [m2 for m2 in SINGLE_AXIS_METHODS if (m2, ratio) not in by],
            })
    tasks = list(dict.fromkeys(r["task"] for r in records))
    em_by_task: Dict[str, Dict[str, Any]] = {
        "dense": {t: sum(bool(r["dense"]["em"]) for r in records if r["task"] == t) for t in tasks}
    }
    for v in vars_:
        em_by_task[v.name] = {
            t: sum(bool(r["variants"][v.name].get("em", False)) for r in records if r["task"] == t) for t in tasks
        }
    summary_tasks = {t: sum(r["task"] == t for r in records) for t in tasks}
    return {
        "rows": rows, "em_by_task": em_by_task, "task_samples": summary_tasks, "dense_em": dense_em,
        "samples": len(records), "verdicts": verdicts,
    }


def markdown_table(summary: Dict[str, Any]) -> str:
    n = summary["samples"]

    def opt(x: Optional[float], fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = [
        "| method | target | ratio (region) | ratio (whole ctx) | attn rel. err | attn err, answer tokens | "
        "needle rows kept | top-1 agree (TF) | greedy agree | ΔNLL | answer EM |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| dense (fp32) | 1x | 1.00 | 1.00 | 0 | 0 | 100% | 100.0% | 100.0% | 0 | {summary['dense_em']}/{n} |",
    ]
    for r in summary["rows"]:
        if not r["samples"]:
            lines.append(f"| {r['method']} | {r['target_ratio']:g}x | unreachable (menu) | | | | | | | | |")
            continue
        kept = r.get("needle_kept")
        lines.append(
            f"| {r['method']} | {r['target_ratio']:g}x | {r['ratio']:.2f} | {r['ratio_all']:.2f} | "
            f"{r['attn_err']:.4f} | {opt(r.get('attn_err_answer'), '.4f')} | "
            f"{'-' if kept is None else format(100 * kept, '.0f') + '%'} | "
            f"{100 * r['agree_tf']:.1f}% | {100 * r['agree_free']:.1f}% | {r['dnll']:+.3f} | {r['em']}/{r['samples']} |"
        )
    return "\n".join(lines)


def em_table(summary: Dict[str, Any]) -> str:
    """Answer exact matches per task (free-running greedy output contains the needle value(s))."""
    tasks = list(summary["task_samples"])
    head = "| variant | " + " | ".join(f"{t} (/{summary['task_samples'][t]})" for t in tasks) + " |"
    lines = [head, "|---|" + "---:|" * len(tasks)]
    for name, per in summary["em_by_task"].items():
        lines.append(f"| {name} | " + " | ".join(str(per[t]) for t in tasks) + " |")
    return "\n".join(lines)


def environment() -> Dict[str, Any]:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    for mod in ("gguf", "accelerate"):
        try:
            from importlib.metadata import version

            env[mod] = version(mod)
        except Exception:  # not installed
            env[mod] = None
    return env


# =====================================================================================================================
# CLI
# =====================================================================================================================
def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    from bench.ruler import TASKS

    p = argparse.ArgumentParser(
        prog="python -m bench.quality",
        description="Attention-output error and greedy-token agreement of MosaicKV vs single-axis baselines and fp8 "
        "on SmolLM2-135M-Instruct with RULER-style prompts (CPU, fp32).",
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[2048], help="prompt lengths in tokens (default 2048)")
    p.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey", "niah_multivalue"], choices=TASKS,
                   help="RULER-style tasks (default: the three needle tasks, which the dense model solves at 2k)")
    p.add_argument("--samples", type=int, default=4, help="samples per task and length (default 4)")
    p.add_argument("--ratios", type=float, nargs="+", default=[2, 3, 4, 6], help="compression ratios (default 2 3 4 6)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=ALL_METHODS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", choices=["noise", "words"], default="noise")
    p.add_argument("--window", type=int, default=32, help="observed queries: the last W tokens (default 32)")
    p.add_argument("--observe", choices=["context", "question", "other"], default="context",
                   help="queries the planners see: the last W context tokens (default; question unknown, as for a "
                   "shared prefix), the last W question tokens (SnapKV-style observation window), or the last W "
                   "context tokens of the next sample (another request's queries)")
    p.add_argument("--batch", type=int, default=32, help="variants run together in one batched forward (default 32)")
    p.add_argument("--gen-tokens", type=int, default=8, help="greedy tokens (at least answer length + 2; default 8)")
    p.add_argument("--seg-size", type=int, default=64)
    p.add_argument("--sinks", type=int, default=64, help="first tokens kept dense (default 64)")
    p.add_argument("--hot", type=int, default=256, help="last tokens kept dense (default 256)")
    p.add_argument("--arena-dtype", choices=sorted(ARENA_DTYPES), default="bf16",
                   help="storage dtype of what is kept (default bf16, as the packed arena)")
    p.add_argument("--budget-scope", choices=["layer", "global"], default="layer",
                   help="one byte budget per layer (default) or one for all layers")
    p.add_argument("--baseline-estimator", choices=["exact", "fast"], default="exact",
                   help="error estimator of the token-only/channel-only baselines (default exact)")
    p.add_argument("--unseen-weight", type=float, default=None,
                   help="unseen_weight of every planner method (default: the planner's DEFAULT_UNSEEN_WEIGHT; 0 is "
                   "the observed-query planner of before)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--cache-dir", default=None, help="model cache (default $MOSAICKV_CACHE or ~/.cache/mosaickv)")
    p.add_argument("--out", default="bench/results/quality.json",
                   help="JSON results (default bench/results/quality.json)")
    p.add_argument("--no-check", action="store_true", help="skip the ratio-1 exactness check (not recommended)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if any(r < 1 for r in args.ratios):
        p.error("--ratios: expected values >= 1")
    if args.unseen_weight is not None and not (math.isfinite(args.unseen_weight) and args.unseen_weight >= 0):
        p.error(f"--unseen-weight: expected a finite number >= 0, got {args.unseen_weight}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    for noisy in ("mosaickv_sglang", "transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench.ruler import generate_suite
    from bench.smollm2 import load_smollm2

    t_start = time.perf_counter()
    model, tok = load_smollm2(args.cache_dir)
    use_mosaic_attention(model)
    count = lambda s: _tok_len(tok, s)  # noqa: E731
    settings = CompressSettings(args.seg_size, args.sinks, args.hot, args.arena_dtype, args.budget_scope,
                                args.baseline_estimator, args.unseen_weight)
    vars_ = variants(args.methods, args.ratios)
    samples = [
        s for length in args.lengths
        for s in generate_suite(args.tasks, num_samples=args.samples, target_tokens=length, seed=args.seed,
                                count_tokens=count, haystack=args.haystack)
    ]
    logger.info("%d samples x %d variants (%s); model loaded in %.1fs", len(samples), len(vars_),
                ", ".join(v.name for v in vars_), time.perf_counter() - t_start)
    records = []
    for i, sample in enumerate(samples):
        rec = evaluate_sample(model, tok, sample, vars_, settings, window=args.window, gen_tokens=args.gen_tokens,
                              observe=args.observe, batch=args.batch, check_exact=not args.no_check and i == 0,
                              other_context=samples[(i + 1) % len(samples)].context)  # fmt: skip
        rec["length"] = sample.target_tokens
        records.append(rec)
        if rec["checks"]:
            logger.info("exactness check passed: %s", ", ".join(
                f"{k} err {v['attn_err']:.1e}" for k, v in rec["checks"].items()))
        logger.info(
            "[%d/%d] %s #%d (%d tok): dense %r em=%s | prefill %.1fs plan %.1fs dense %.1fs variants %.1fs "
            "total %.1fs", i + 1, len(samples), sample.task, sample.index, rec["context_tokens"], rec["dense"]["text"],
            rec["dense"]["em"], rec["seconds"]["prefill"], rec["seconds"]["plan"], rec["seconds"]["dense_probe"],
            rec["seconds"]["variants"], rec["seconds"]["total"],
        )
        logger.info("    err/agree/em: %s", "  ".join(
            f"{k} {v['attn_err']:.3f}/{v['agree_tf']:.2f}/{int(v['em'])}" if "attn_err" in v else f"{k} n/a"
            for k, v in rec["variants"].items()))
    summary = summarize(records, vars_)
    out = {
        "command": "python -m bench.quality " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": vars(args),
        "environment": environment(),
        "seconds": time.perf_counter() - t_start,
        "summary": summary,
        "records": records,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    sys.stdout.write("\n" + markdown_table(summary) + "\n\n" + em_table(summary) + "\n\n")
    for v in summary["verdicts"]:
        beats = ", ".join(f"{k}: {'yes' if b else 'NO'}" for k, b in v["beats"].items())
        sys.stdout.write(f"ratio {v['ratio']:g}: {v['method']} lower attention error than {beats}\n")
    sys.stdout.write(f"\nwrote {path} in {out['seconds']:.0f}s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
