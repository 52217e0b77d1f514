# SPDX-License-Identifier: Apache-2.0
"""Query statistics that drive the planner's choices: channel weights, token importance, recent queries.

Per layer and KV head (all heads of one layer live in one :class:`QueryStats`), pooled over the GQA group (the
``G`` query heads that read the same KV head):

* **K channel weights** ``w_c = sqrt(E[q_c^2])``: the running second moment of the queries per channel. Dropping
  element ``k_c`` of a key changes the score ``q . k`` by ``q_c k_c``, whose RMS over the observed queries is
  ``|k_c| * w_c``; per-vector channel selection (``chan-k``) ranks the elements of each key by it (ThinK's criterion,
  arXiv 2407.21018, with a second moment instead of a window norm, so it can be merged and decayed).
* **V channel weights** are all ones. An element ``v_c`` of token ``t`` moves the output by ``p_t * v_c``: it matters
  by ``|v_c| *`` the attention ``p_t`` of its token. Within one vector ``p_t`` is a common factor, so it does not
  change which channels a vector keeps; it is used where it does matter, in token selection and in the planner's
  error estimate. (With the output projection ``W_o`` known, its column norms would be the natural weights; the
  attention backend does not see ``W_o``, so we do not use it.)
* **Token importance**: the attention mass each cached token received from the observed queries (mean over the
  group's query heads and over queries, normalised over the whole context, so a value is the token's average
  attention probability since it was cached).
* **Recent queries**: a ring buffer of the last ``W`` queries (``W = 32`` by default) of each group, for the
  planner's error estimate on "what the model has been asking".

Statistics of several requests sharing a prefix (radix cache) combine with :meth:`QueryStats.merge`, so decisions
about a shared segment do not depend on one request's question alone. Nothing here is global: every object belongs
to its owner (the pool or the sidecar).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

import torch

from mosaickv_sglang.kernels._checks import check_int, check_tensor

logger = logging.getLogger(__name__)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int32, torch.int64)


# --- attention helpers shared with the planner -----------------------------------------------------------------------
def normalize_group_ids(group_ids: Optional[torch.Tensor], n: int, device: torch.device) -> Tuple[torch.Tensor, int]:
    """Contiguous group labels ``0..num_groups-1`` (all segments in group 0 when ``group_ids`` is ``None``).

    Parameters
    ----------
    group_ids : torch.Tensor, optional
        shape ``[N]``, integer dtype; segments with the same id are parts of one attention context (same request,
        layer and KV head) and were observed by the same queries.

    Returns
    -------
    tuple
        ``(labels, num_groups)``; ``labels`` shape ``[N]``, dtype ``torch.int64``.
    """
    if group_ids is None:
        return torch.zeros(n, dtype=torch.int64, device=device), 1
    check_tensor(group_ids, "group_ids", shape=(n,), dtype=INT_DTYPES, device=device)
    if n == 0:
        return group_ids.long(), 0
    uniq, labels = torch.unique(group_ids, return_inverse=True)
    return labels.long(), int(uniq.numel())


def group_logsumexp(x: torch.Tensor, labels: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Log-sum-exp of the rows of ``x`` within each group.

    Parameters
    ----------
    x : torch.Tensor
        shape ``[N, Q]``, fp32; per-segment log-sum-exp of ``Q`` queries (``-inf`` allowed).
    labels : torch.Tensor
        shape ``[N]``, dtype ``torch.int64``, values in ``[0, num_groups)``.

    Returns
    -------
    torch.Tensor
        shape ``[num_groups, Q]``, fp32.
    """
    q = x.shape[1]
    idx = labels[:, None].expand(-1, q)
    mx = torch.full((num_groups, q), float("-inf"), device=x.device, dtype=x.dtype)
    mx = mx.scatter_reduce(0, idx, x, reduce="amax", include_self=True)
    safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    s = torch.zeros_like(mx).index_add_(0, labels, torch.exp(x - safe[labels]))
    return torch.log(s) + safe


def flatten_queries(queries: torch.Tensor, n: int, d: int, name: str = "queries") -> torch.Tensor:
    """``[N, W, G, d]`` (or ``[N, Q, d]``) queries as fp32 ``[N, W * G, d]``.

    Also ``[P, H, W, G, d]`` with ``P * H == N``: segment ``p * H + h`` reads ``queries[p, h]``. Pages that share
    their heads' queries pass ``q.expand(P, H, W, G, d)`` of one ``[H, W, G, d]``, a view: the ``[N, W * G, d]`` copy
    is made here, when (and only while) it is needed, not held for every layer of a seal at once."""
    check_tensor(queries, name, dtype=FLOAT_DTYPES)
    per_segment = queries.dim() == 4 and queries.shape[0] == n
    per_page_head = queries.dim() == 5 and queries.shape[0] * queries.shape[1] == n
    if (per_segment or per_page_head) and queries.shape[-1] == d:
        return queries.reshape(n, -1, d).float()
    if queries.dim() == 3 and queries.shape[0] == n and queries.shape[2] == d:
        return queries.float()
    raise ValueError(
        f"{name}: expected shape [{n}, W, G, {d}] (or [{n}, Q, {d}], or [P, H, W, G, {d}] with P * H = {n}), got "
        f"{list(queries.shape)}"
    )


def segment_scores(q: torch.Tensor, keys: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Attention logits of ``q`` (shape ``[N, Q, d]``) against ``keys`` (shape ``[N, S, d]``): ``[N, Q, S]``, fp32."""
    return torch.bmm(q, keys.float().transpose(1, 2)) * sm_scale


def default_scale(head_dim: int, sm_scale: Optional[float]) -> float:
    if sm_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"sm_scale: expected a finite float > 0, got {sm_scale!r}")
    return float(sm_scale)


@dataclass(frozen=True, eq=False)
class SegmentImportance:
    """Importance statistics of ``N`` segments, as consumed by the planner.

    Attributes
    ----------
    token_mass : torch.Tensor
        shape ``[N, S]``, dtype ``torch.float32``, ``>= 0``; average attention probability each token received
        (normalised over its whole context, pooled over the GQA group).
    k_chan_weight : torch.Tensor
        shape ``[N, d]``, dtype ``torch.float32``, ``>= 0``; ``sqrt(E[q_c^2])`` of the segment's GQA group.
    v_chan_weight : torch.Tensor
        shape ``[N, d]``, dtype ``torch.float32``; ones (see the module docstring).
    q_mean : torch.Tensor, optional
        shape ``[N, d]``, dtype ``torch.float32``; mean query of the group (used by the fast error proxy; ``None``
        means unknown, treated as 0).
    """

    token_mass: torch.Tensor
    k_chan_weight: torch.Tensor
    v_chan_weight: torch.Tensor
    q_mean: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        check_tensor(self.token_mass, "token_mass", ndim=2, dtype=torch.float32)
        n = self.token_mass.shape[0]
        dev = self.token_mass.device
        check_tensor(self.k_chan_weight, "k_chan_weight", shape=(n, None), dtype=torch.float32, device=dev)
        d = self.k_chan_weight.shape[1]
        check_tensor(self.v_chan_weight, "v_chan_weight", shape=(n, d), dtype=torch.float32, device=dev)
        if self.q_mean is not None:
            check_tensor(self.q_mean, "q_mean", shape=(n, d), dtype=torch.float32, device=dev)


def importance_from_queries(
    keys: torch.Tensor,
    queries: torch.Tensor,
    *,
    group_ids: Optional[torch.Tensor] = None,
    sm_scale: Optional[float] = None,
) -> SegmentImportance:
    """Segment importance measured directly from observed queries (one dense attention pass).

    Parameters
    ----------
    keys : torch.Tensor
        shape ``[N, S, d]``, fp32/fp16/bf16; K of the segments.
    queries : torch.Tensor
        shape ``[N, W, G, d]``, float; the recent queries of each segment's GQA group.
    group_ids : torch.Tensor, optional
        shape ``[N]``, integer; segments of one attention context (default: all one context). Token mass is
        normalised over the context, so it is comparable across the segments of a context.
    sm_scale : float, optional
        Softmax scale (default ``1 / sqrt(d)``).
    """
    check_tensor(keys, "keys", ndim=3, dtype=FLOAT_DTYPES)
    n, _, d = keys.shape
    q = flatten_queries(queries, n, d)
    labels, ng = normalize_group_ids(group_ids, n, keys.device)
    return importance_from_labels(keys, q, labels, ng, default_scale(d, sm_scale))


def uniform_importance(n: int, s: int, d: int, device: torch.device) -> SegmentImportance:
    """Importance of ``n`` segments of ``s`` tokens when no query has been seen yet: every token and channel alike
    (mean query 0)."""
    ones = torch.ones(n, d, device=device)
    return SegmentImportance(torch.full((n, s), 1.0 / s, device=device), ones, ones.clone(),
                             torch.zeros(n, d, device=device))  # fmt: skip


def query_stats(queries: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Of each row of ``queries`` (shape ``[X, Q, d]``, fp32): the root mean square of each channel over its queries
    (the keys' channel weights) and its mean query, each ``[X, d]``."""
    return queries.pow(2).mean(1).sqrt(), queries.mean(1)


def importance_from_labels(
    keys: torch.Tensor,
    queries: torch.Tensor,
    labels: torch.Tensor,
    num_groups: int,
    sm_scale: float,
    stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> SegmentImportance:
    """:func:`importance_from_queries` with the contexts already as ``labels`` (shape ``[N]``, int64, values in
    ``[0, num_groups)``) and ``queries`` flattened to ``[N, Q, d]`` fp32: no host read (no ``unique``). ``stats``:
    :func:`query_stats` of ``queries``, if already known (e.g. measured once per head of segments that share their
    head's queries)."""
    scores = segment_scores(queries, keys, sm_scale)
    lse = torch.logsumexp(scores, dim=2)
    ctx = group_logsumexp(lse, labels, num_groups)[labels]
    mass = torch.exp(scores - ctx[:, :, None]).mean(1)
    w, q_mean = query_stats(queries) if stats is None else stats
    return SegmentImportance(mass.contiguous(), w.contiguous(), torch.ones_like(w), q_mean.contiguous())


# --- running statistics ----------------------------------------------------------------------------------------------
@dataclass(eq=False)
class QueryStats:
    """Running query statistics of one layer (all KV heads) of one request, or merged over several.

    Parameters
    ----------
    num_kv_heads : int
        ``H``, KV heads of the layer.
    group_size : int
        ``G``, query heads per KV head (query head ``h * G + g`` reads KV head ``h``, SGLang's layout).
    head_dim : int
        ``d``.
    window : int
        ``W``, queries kept in the ring buffer (default 32).
    decay : float
        In ``(0, 1]``; every :meth:`observe` call multiplies the previous sums by it (1: plain averages).
    device : str or torch.device
        Where the statistics live.

    Attributes
    ----------
    q2_sum : torch.Tensor
        shape ``[H, d]``, fp32; decayed sum of ``q_c^2`` over observed queries of the group.
    q_sum : torch.Tensor
        shape ``[H, d]``, fp32; decayed sum of ``q_c`` (for the mean query).
    q_weight : torch.Tensor
        shape ``[H]``, fp32; decayed count of those queries.
    ring : torch.Tensor
        shape ``[H, W, G, d]``, fp32; ring buffer of recent queries (slot ``ring_next`` is the oldest once full).
    mass_sum : torch.Tensor
        shape ``[H, T_cap]``, fp32; decayed sum of the attention probability of each token (mean over the group).
    mass_weight : torch.Tensor
        shape ``[T_cap]``, fp32; decayed count of observations that could see each token.
    """

    num_kv_heads: int
    group_size: int
    head_dim: int
    window: int = 32
    decay: float = 1.0
    device: Union[str, torch.device] = "cpu"
    q2_sum: torch.Tensor = field(init=False, repr=False)
    q_sum: torch.Tensor = field(init=False, repr=False)
    q_weight: torch.Tensor = field(init=False, repr=False)
    ring: torch.Tensor = field(init=False, repr=False)
    ring_len: int = field(init=False, default=0)
    ring_next: int = field(init=False, default=0)
    mass_sum: torch.Tensor = field(init=False, repr=False)
    mass_weight: torch.Tensor = field(init=False, repr=False)
    num_tokens: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        check_int(self.num_kv_heads, "num_kv_heads", lo=1)
        check_int(self.group_size, "group_size", lo=1)
        check_int(self.head_dim, "head_dim", lo=1)
        check_int(self.window, "window", lo=1)
        if not (isinstance(self.decay, (int, float)) and 0.0 < self.decay <= 1.0):
            raise ValueError(f"decay: expected a float in (0, 1], got {self.decay!r}")
        self.device = torch.device(self.device)
        h, g, d, w, dev = self.num_kv_heads, self.group_size, self.head_dim, self.window, self.device
        self.q2_sum = torch.zeros(h, d, device=dev)
        self.q_sum = torch.zeros(h, d, device=dev)
        self.q_weight = torch.zeros(h, device=dev)
        self.ring = torch.zeros(h, w, g, d, device=dev)
        self.mass_sum = torch.zeros(h, 0, device=dev)
        self.mass_weight = torch.zeros(0, device=dev)

    @property
    def num_q_heads(self) -> int:
        return self.num_kv_heads * self.group_size

    # --- updates -----------------------------------------------------------------------------------------------------
    def _grow(self, t: int) -> None:
        cap = self.mass_weight.numel()
        if t > cap:
            new = max(t, 2 * cap, 64)
            self.mass_sum = torch.nn.functional.pad(self.mass_sum, (0, new - cap))
            self.mass_weight = torch.nn.functional.pad(self.mass_weight, (0, new - cap))
        self.num_tokens = max(self.num_tokens, t)

    def observe(self, q: torch.Tensor, attn: Optional[torch.Tensor] = None) -> None:
        """Record queries (and optionally the attention they paid).

        Parameters
        ----------
        q : torch.Tensor
            shape ``[B, Hq, d]`` or ``[Hq, d]``, float; ``B`` query rows (decode steps) of all ``Hq = H * G`` query
            heads of this layer.
        attn : torch.Tensor, optional
            shape ``[B, Hq, T]`` (or ``[Hq, T]``), float; their attention probabilities over the first ``T`` cached
            tokens (rows sum to 1 over the whole context).
        """
        h, g, d = self.num_kv_heads, self.group_size, self.head_dim
        if isinstance(q, torch.Tensor) and q.dim() == 2:
            q = q[None]
        check_tensor(q, "q", shape=(None, self.num_q_heads, d), dtype=FLOAT_DTYPES)
        b = q.shape[0]
        qf = q.to(self.device, torch.float32).view(b, h, g, d)
        self.q2_sum.mul_(self.decay).add_(qf.pow(2).sum(dim=(0, 2)))
        self.q_sum.mul_(self.decay).add_(qf.sum(dim=(0, 2)))
        self.q_weight.mul_(self.decay).add_(float(b * g))
        take = min(b, self.window)
        slots = (self.ring_next + torch.arange(take, device=self.device)) % self.window
        self.ring[:, slots] = qf[b - take :].permute(1, 0, 2, 3)
        self.ring_next = (self.ring_next + take) % self.window
        self.ring_len = min(self.window, self.ring_len + take)
        if attn is not None:
            if attn.dim() == 2:
                attn = attn[None]
            check_tensor(attn, "attn", shape=(b, self.num_q_heads, None), dtype=FLOAT_DTYPES)
            t = attn.shape[2]
            self._grow(t)
            self.mass_sum.mul_(self.decay)
            self.mass_weight.mul_(self.decay)
            self.mass_sum[:, :t] += attn.to(self.device, torch.float32).view(b, h, g, t).mean(2).sum(0)
            self.mass_weight[:t] += float(b)

    def observe_with_keys(self, q: torch.Tensor, keys: torch.Tensor, sm_scale: Optional[float] = None) -> None:
        """:meth:`observe` with the attention computed here from the cached keys.

        Parameters
        ----------
        q : torch.Tensor
            shape ``[B, Hq, d]`` or ``[Hq, d]``, float.
        keys : torch.Tensor
            shape ``[T, H, d]``, float (SGLang's per-layer K buffer layout, the request's tokens in order).
        """
        h, g, d = self.num_kv_heads, self.group_size, self.head_dim
        if isinstance(q, torch.Tensor) and q.dim() == 2:
            q = q[None]
        check_tensor(q, "q", shape=(None, self.num_q_heads, d), dtype=FLOAT_DTYPES)
        check_tensor(keys, "keys", shape=(None, h, d), dtype=FLOAT_DTYPES)
        qf = q.float().view(q.shape[0], h, g, d)
        logits = torch.einsum("bhgd,thd->bhgt", qf, keys.float()) * default_scale(d, sm_scale)
        attn = torch.softmax(logits, dim=-1).reshape(q.shape[0], h * g, -1)
        self.observe(q, attn)

    # --- read-outs ---------------------------------------------------------------------------------------------------
    def k_channel_weight(self) -> torch.Tensor:
        """``sqrt(E[q_c^2])`` per KV head: shape ``[H, d]``, fp32 (ones before any observation)."""
        w = self.q_weight[:, None]
        return torch.where(w > 0, (self.q2_sum / w.clamp(min=1e-30)).sqrt(), torch.ones_like(self.q2_sum))

    def q_mean(self) -> torch.Tensor:
        """Mean query per KV head: shape ``[H, d]``, fp32 (zeros before any observation)."""
        return self.q_sum / self.q_weight[:, None].clamp(min=1e-30)

    def v_channel_weight(self) -> torch.Tensor:
        """Ones, shape ``[H, d]``, fp32 (per-vector V selection ranks by ``|v_c|``; see the module docstring)."""
        return torch.ones(self.num_kv_heads, self.head_dim, device=self.device)

    def token_importance(self, heads: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Average attention probability of tokens; 0 for tokens never observed.

        Parameters
        ----------
        heads : torch.Tensor
            shape ``[N]``, integer; KV head of each row.
        positions : torch.Tensor
            shape ``[N, S]``, integer; token positions in the request.

        Returns
        -------
        torch.Tensor
            shape ``[N, S]``, fp32.
        """
        check_tensor(heads, "heads", ndim=1, dtype=INT_DTYPES)
        check_tensor(positions, "positions", shape=(heads.shape[0], None), dtype=INT_DTYPES)
        cap = self.mass_weight.numel()
        pos = positions.to(self.device).long()
        inside = (pos >= 0) & (pos < cap)
        p = pos.clamp(0, max(cap - 1, 0))
        if cap == 0:
            return torch.zeros(pos.shape, device=self.device)
        num = self.mass_sum[heads.to(self.device).long()[:, None], p]
        den = self.mass_weight[p]
        return torch.where(inside & (den > 0), num / den.clamp(min=1e-30), torch.zeros_like(num))

    def segment_importance(self, heads: torch.Tensor, starts: torch.Tensor, seg_size: int) -> SegmentImportance:
        """:class:`SegmentImportance` of segments ``[starts[i], starts[i] + seg_size)`` of KV head ``heads[i]``.

        Parameters
        ----------
        heads, starts : torch.Tensor
            shape ``[N]``, integer.
        seg_size : int
            ``S``.
        """
        check_int(seg_size, "seg_size", lo=1)
        check_tensor(starts, "starts", shape=tuple(heads.shape), dtype=INT_DTYPES)
        pos = starts.to(self.device).long()[:, None] + torch.arange(seg_size, device=self.device)
        hv = heads.to(self.device).long()
        mass = self.token_importance(hv, pos)
        return SegmentImportance(mass, self.k_channel_weight()[hv], self.v_channel_weight()[hv], self.q_mean()[hv])

    def recent_queries(self) -> torch.Tensor:
        """Ring buffer contents, oldest first: shape ``[H, w, G, d]``, fp32, ``w = min(observed, W)``."""
        idx = (self.ring_next - self.ring_len + torch.arange(self.ring_len, device=self.device)) % self.window
        return self.ring[:, idx]

    def segment_queries(self, heads: torch.Tensor) -> torch.Tensor:
        """Recent queries of each segment's KV head, as the planner takes them: shape ``[N, w, G, d]``, fp32.

        Parameters
        ----------
        heads : torch.Tensor
            shape ``[N]``, integer; KV head of each segment.
        """
        check_tensor(heads, "heads", ndim=1, dtype=INT_DTYPES)
        return self.recent_queries()[heads.to(self.device).long()]

    # --- merging -----------------------------------------------------------------------------------------------------
    def merge(self, other: "QueryStats") -> "QueryStats":
        """Statistics of both requests pooled, for segments they share; neither input is modified.

        Sums and counts add (so averages are over all observed queries of both); token mass is aligned by position
        (shared prefixes start at position 0). The ring buffer interleaves the two, newest first, up to ``W``, so
        both requests' questions inform the plan. ``window``, ``decay`` and ``device`` are taken from ``self``.
        """
        if not isinstance(other, QueryStats):
            raise TypeError(f"other: expected QueryStats, got {type(other).__name__}")
        mine = (self.num_kv_heads, self.group_size, self.head_dim)
        theirs = (other.num_kv_heads, other.group_size, other.head_dim)
        if mine != theirs:
            raise ValueError(f"other: expected (num_kv_heads, group_size, head_dim) = {mine}, got {theirs}")
        out = dataclasses.replace(self)
        dev = self.device
        out.q2_sum = self.q2_sum + other.q2_sum.to(dev)
        out.q_sum = self.q_sum + other.q_sum.to(dev)
        out.q_weight = self.q_weight + other.q_weight.to(dev)
        t = max(self.mass_weight.numel(), other.mass_weight.numel())
        out.mass_sum = torch.zeros(self.num_kv_heads, t, device=dev)
        out.mass_weight = torch.zeros(t, device=dev)
        for src in (self, other):
            n = src.mass_weight.numel()
            out.mass_sum[:, :n] += src.mass_sum.to(dev)
            out.mass_weight[:n] += src.mass_weight.to(dev)
        out.num_tokens = max(self.num_tokens, other.num_tokens)
        a, b = self.recent_queries().flip(1), other.recent_queries().to(dev).flip(1)  # newest first
        la, lb = a.shape[1], b.shape[1]
        rank = torch.cat([torch.arange(la, device=dev) * 2, torch.arange(lb, device=dev) * 2 + 1])
        newest = torch.cat([a, b], 1)[:, torch.argsort(rank)][:, : self.window]
        k = newest.shape[1]
        out.ring[:, :k] = newest.flip(1)  # oldest first from slot 0
        out.ring_len, out.ring_next = k, k % self.window
        return out
