# SPDX-License-Identifier: Apache-2.0
"""The strategy interface shared by every per-segment compression strategy, plus the byte accounting.

A *strategy* says how one segment (``S`` tokens of one layer and KV head, ``d`` channels) is stored in the packed
format of :mod:`mosaickv_sglang.kernels.format`: which token rows are kept (the token axis, shared by K and V) and in
which *form* the kept rows of one tensor (K or V) are stored (the per-vector axis: dense, per-vector top-k channels,
low rank). Strategies are small frozen dataclasses (the kvpress pattern, style rule R6): hyper-parameters are fields,
``__post_init__`` checks ranges, and :meth:`Strategy.select` is a pure function of (segment data, importance
statistics) that returns a :class:`Selection`.

Byte accounting (:func:`segment_bytes`) mirrors the packed format exactly: each K and V payload is rounded up to whole
granules of :data:`~mosaickv_sglang.kernels.format.GRANULE_ELEMS` 16-bit elements, and every segment also pays a
descriptor row (``DESC_WIDTH`` int32) and its Quest bounds (``2 * d`` 16-bit elements). The *dense bytes* that a
compression ratio refers to are the bytes of the all-dense packed segment (overhead included), so that ratio 1 means
"every segment dense".
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from typing import Optional, Tuple, Union

import torch

from mosaickv_sglang.kernels import format as fmt
from mosaickv_sglang.kernels._checks import check_int, check_tensor

logger = logging.getLogger(__name__)

IntOrTensor = Union[int, torch.Tensor]
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def overhead_bytes(head_dim: int) -> int:
    """Per-segment metadata bytes: one descriptor row (``DESC_WIDTH`` int32) plus bounds ``[2, d]`` (16-bit)."""
    return 4 * fmt.DESC_WIDTH + 2 * 2 * head_dim


def segment_bytes(
    rows: IntOrTensor,
    k_form: IntOrTensor,
    k_param: IntOrTensor,
    v_form: IntOrTensor,
    v_param: IntOrTensor,
    head_dim: int,
) -> IntOrTensor:
    """Packed bytes of one segment: granule-rounded K and V payloads plus :func:`overhead_bytes`.

    Parameters
    ----------
    rows : int or torch.Tensor
        Kept token rows ``m``; any integer tensor computes element-wise.
    k_form, k_param, v_form, v_param : int or torch.Tensor
        Forms and parameters of the K and V payloads (see :func:`~mosaickv_sglang.kernels.format.payload_elems`).
    head_dim : int
        ``d``, a multiple of 32.

    Returns
    -------
    int or torch.Tensor
        Bytes; an int64 tensor when any input is a tensor.
    """
    kg = fmt.payload_granules(k_form, k_param, rows, head_dim)
    vg = fmt.payload_granules(v_form, v_param, rows, head_dim)
    return fmt.GRANULE_BYTES * (kg + vg) + overhead_bytes(head_dim)  # type: ignore[operator]


def dense_segment_bytes(seg_size: int, head_dim: int) -> int:
    """Bytes of an all-dense packed segment (the reference for compression ratios)."""
    return int(segment_bytes(seg_size, fmt.FORM_DENSE, 0, fmt.FORM_DENSE, 0, head_dim))


def check_segment_shape(seg_size: int, head_dim: int, s_name: str = "segment_size", d_name: str = "head_dim") -> None:
    """``seg_size`` a power of two in ``[MIN_SEG_SIZE, MAX_SEG_SIZE]``; ``head_dim`` a positive multiple of 32."""
    check_int(seg_size, s_name, lo=fmt.MIN_SEG_SIZE, hi=fmt.MAX_SEG_SIZE)
    if seg_size & (seg_size - 1):
        raise ValueError(f"{s_name}: expected a power of two, got {seg_size}")
    check_int(head_dim, d_name, lo=fmt.MASK_BITS)
    if head_dim % fmt.MASK_BITS:
        raise ValueError(f"{d_name}: expected a multiple of {fmt.MASK_BITS}, got {head_dim}")


def descending_rank(score: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last dim when sorted by decreasing score, ties broken by the lower index.

    Parameters
    ----------
    score : torch.Tensor
        shape ``[..., L]``, floating dtype.

    Returns
    -------
    torch.Tensor
        shape ``[..., L]``, dtype ``torch.int64``; 0 for the largest entry. ``rank < k`` is the top-k mask.
    """
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    ar = torch.arange(score.shape[-1], device=score.device).expand_as(order)
    return rank.scatter_(-1, order, ar)


def chan_scores(x: torch.Tensor, chan_weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-vector channel importance ``|x_c| * w_c`` in fp32 (the packed format's selection rule).

    Parameters
    ----------
    x : torch.Tensor
        shape ``[N, S, d]``, fp32/fp16/bf16.
    chan_weight : torch.Tensor, optional
        shape ``[N, d]``, float; ``None`` means all ones.
    """
    s = x.float().abs()
    return s if chan_weight is None else s * chan_weight.float()[:, None, :]


def kept_row_index(token_keep: torch.Tensor) -> torch.Tensor:
    """For each position, the index of its row among the kept rows (kept rows are stored in order).

    Parameters
    ----------
    token_keep : torch.Tensor
        shape ``[N, S]``, dtype ``torch.bool``.

    Returns
    -------
    torch.Tensor
        shape ``[N, S]``, dtype ``torch.int64``; ``j`` for the ``j``-th kept position, clamped to 0 for dropped ones.
    """
    return (token_keep.long().cumsum(1) - 1).clamp_(min=0)


def compact_rows(x: torch.Tensor, token_keep: torch.Tensor) -> torch.Tensor:
    """Move the kept rows of each segment to the front, in their original order (the packed row order).

    Parameters
    ----------
    x : torch.Tensor
        shape ``[N, S, D]``.
    token_keep : torch.Tensor
        shape ``[N, S]``, dtype ``torch.bool``.

    Returns
    -------
    torch.Tensor
        shape ``[N, S, D]``, same dtype; row ``j < m`` is the ``j``-th kept row, the rest are the dropped rows.
    """
    order = torch.sort((~token_keep).to(torch.int8), dim=1, stable=True).indices
    return x.gather(1, order[:, :, None].expand(-1, -1, x.shape[2]))


@dataclasses.dataclass(frozen=True, eq=False)
class Selection:
    """What a strategy keeps of one tensor (K or V) of ``N`` segments.

    Attributes
    ----------
    token_keep : torch.Tensor
        shape ``[N, S]``, dtype ``torch.bool``; kept token rows.
    form : int
        Packed form code (``FORM_DENSE``, ``FORM_CHAN``, ``FORM_LOWRANK``).
    param : int
        ``k`` for chan, ``r`` for lowrank, 0 for dense.
    chan_keep : torch.Tensor, optional
        shape ``[N, S, d]``, dtype ``torch.bool``; kept elements of each vector (chan form only).
    factors : tuple of torch.Tensor, optional
        ``(A, B)``, ``A`` shape ``[N, S, r]``, ``B`` shape ``[N, r, d]``, fp32 (lowrank only); ``A[n, :m]`` holds the
        kept rows in order, the remaining rows of ``A`` are zero.
    """

    token_keep: torch.Tensor
    form: int
    param: int
    chan_keep: Optional[torch.Tensor] = None
    factors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The segment as the decode kernel sees it: shape ``[N, S, d]``, fp32, dropped rows zero."""
        keep = self.token_keep[:, :, None]
        if self.form == fmt.FORM_LOWRANK:
            if self.factors is None:
                raise ValueError("factors: expected (A, B) for a lowrank selection, got None")
            a, b = self.factors
            rows = torch.bmm(a.float(), b.float())
            idx = kept_row_index(self.token_keep)[:, :, None].expand(-1, -1, rows.shape[2])
            return rows.gather(1, idx) * keep
        y = x.float() * keep
        return y * self.chan_keep if self.form == fmt.FORM_CHAN and self.chan_keep is not None else y


class Strategy(abc.ABC):
    """Interface of all strategies: token and per-vector strategies share it (R6).

    Concrete strategies are frozen dataclasses with fields ``segment_size`` and ``head_dim`` (the shape their ratio
    is quoted for) plus their own hyper-parameters.
    """

    segment_size: int
    head_dim: int

    @property
    @abc.abstractmethod
    def form(self) -> int:
        """Packed form of the kept rows."""

    @property
    def param(self) -> int:
        """Form parameter (``k`` or ``r``; 0 for dense)."""
        return 0

    def rows(self, seg_size: int) -> int:
        """Kept token rows for a segment of ``seg_size`` tokens (all of them unless a token strategy)."""
        return seg_size

    def bytes_per_segment(self, seg_size: Optional[int] = None, head_dim: Optional[int] = None) -> int:
        """Packed bytes of a segment whose K and V both use this strategy (default: the strategy's own shape)."""
        s = self.segment_size if seg_size is None else seg_size
        d = self.head_dim if head_dim is None else head_dim
        check_segment_shape(s, d)
        return int(segment_bytes(self.rows(s), self.form, self.param, self.form, self.param, d))

    @property
    def compression_ratio(self) -> float:
        """Dense packed bytes over this strategy's packed bytes, at ``(segment_size, head_dim)``."""
        return dense_segment_bytes(self.segment_size, self.head_dim) / self.bytes_per_segment()

    @abc.abstractmethod
    def select(
        self,
        x: torch.Tensor,
        *,
        token_score: Optional[torch.Tensor] = None,
        chan_weight: Optional[torch.Tensor] = None,
        token_keep: Optional[torch.Tensor] = None,
    ) -> Selection:
        """Choose what to keep of ``x``.

        Parameters
        ----------
        x : torch.Tensor
            shape ``[N, S, d]``, fp32/fp16/bf16; K or V of ``N`` segments.
        token_score : torch.Tensor, optional
            shape ``[N, S]``, float; token importance (attention mass received). Needed by token strategies.
        chan_weight : torch.Tensor, optional
            shape ``[N, d]``, float ``>= 0``; channel weights ``w_c`` (elements ranked by ``|x_c| * w_c``).
        token_keep : torch.Tensor, optional
            shape ``[N, S]``, dtype ``torch.bool``; rows already chosen by a token strategy (default: all).
        """

    def _check_x(self, x: torch.Tensor) -> Tuple[int, int, int]:
        check_tensor(x, "x", ndim=3, dtype=FLOAT_DTYPES)
        n, s, d = x.shape
        check_segment_shape(s, d, s_name="x (dim 1, segment size)", d_name="x (dim 2, head_dim)")
        return n, s, d

    @staticmethod
    def _keep_or_all(x: torch.Tensor, token_keep: Optional[torch.Tensor]) -> torch.Tensor:
        if token_keep is None:
            return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return check_tensor(token_keep, "token_keep", shape=tuple(x.shape[:2]), dtype=torch.bool, device=x.device)
