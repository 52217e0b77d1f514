# SPDX-License-Identifier: Apache-2.0
"""``lowrank-r``: the kept rows of K (or V) of a segment as ``A (m x r) @ B (r x d)``, from a truncated SVD.

By Eckart-Young the rank-``r`` truncated SVD is the best rank-``r`` approximation in Frobenius norm. Low-rank KV is
used by ShadowKV (Sun et al., "ShadowKV: KV Cache in Shadows for High-Throughput Long-Context LLM Inference",
arXiv 2410.21465), which factors the pre-RoPE keys of a whole sequence. Differences: here the factorisation is per
segment (``S`` tokens of one head) and of the cached (post-RoPE) rows, so no projection has to be shared across
segments and shared prefixes keep their factors. Limitations: Frobenius-optimal is not attention-optimal (the
planner measures the attention error before choosing it); it pays ``r * d`` elements for ``B`` per segment, so it
only wins for ``r << min(m, d)``; the SVD is too slow for the decode path (``plan_exact`` only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from mosaickv_sglang.kernels import format as fmt
from mosaickv_sglang.kernels._checks import check_int

from .base import Selection, Strategy, check_segment_shape, compact_rows

logger = logging.getLogger(__name__)

Svd = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def masked_svd(x: torch.Tensor, token_keep: torch.Tensor) -> Svd:
    """Thin SVD of the kept rows of each segment, kept rows first and in order (dropped rows as zero rows).

    Parameters
    ----------
    x : torch.Tensor
        shape ``[N, S, d]``, floating.
    token_keep : torch.Tensor
        shape ``[N, S]``, dtype ``torch.bool``.

    Returns
    -------
    tuple of torch.Tensor
        ``(U, sigma, Vh)``: shapes ``[N, S, q]``, ``[N, q]``, ``[N, q, d]`` with ``q = min(S, d)``, fp32.
    """
    n, s, d = x.shape
    rows = compact_rows(x.float() * token_keep[:, :, None], token_keep)
    m_max = int(token_keep.sum(1).max()) if n else s
    if m_max >= s or m_max == 0:
        return torch.linalg.svd(rows, full_matrices=False)
    u, sv, vh = torch.linalg.svd(rows[:, :m_max], full_matrices=False)  # dropped rows are zero: same factors
    q = min(s, d)
    u = torch.nn.functional.pad(u, (0, q - u.shape[2], 0, s - m_max))
    return u, torch.nn.functional.pad(sv, (0, q - sv.shape[1])), torch.nn.functional.pad(vh, (0, 0, 0, q - vh.shape[1]))


def factors_from_svd(svd: Svd, token_keep: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors ``A = U_r diag(sigma_r)`` (shape ``[N, S, r]``) and ``B = Vh_r`` (shape ``[N, r, d]``).

    Rows of ``A`` beyond each segment's kept count are zeroed, so ``A[n, :m]`` are the kept rows in order.
    """
    u, sv, vh = svd
    a = u[:, :, :rank] * sv[:, None, :rank]
    rows = token_keep.sum(1)
    a = a * (torch.arange(a.shape[1], device=a.device)[None, :] < rows[:, None])[:, :, None]
    return a, vh[:, :rank, :].contiguous()


@dataclass(frozen=True)
class LowRankStrategy(Strategy):
    """Store the kept rows as rank-``r`` factors.

    Parameters
    ----------
    r : int
        Rank, in ``[1, min(segment_size, head_dim)]``.
    segment_size : int
        ``S``, tokens per segment.
    head_dim : int
        ``d``, a multiple of 32.
    """

    r: int
    segment_size: int = fmt.DEFAULT_SEG_SIZE
    head_dim: int = 128

    def __post_init__(self) -> None:
        check_segment_shape(self.segment_size, self.head_dim)
        check_int(self.r, "r", lo=1, hi=min(self.segment_size, self.head_dim))

    @property
    def form(self) -> int:
        return fmt.FORM_LOWRANK

    @property
    def param(self) -> int:
        return self.r

    def select(
        self,
        x: torch.Tensor,
        *,
        token_score: Optional[torch.Tensor] = None,
        chan_weight: Optional[torch.Tensor] = None,
        token_keep: Optional[torch.Tensor] = None,
    ) -> Selection:
        """Truncated SVD of the rows of ``x`` (shape ``[N, S, d]``) kept by ``token_keep`` (default all)."""
        _, s, d = self._check_x(x)
        if self.r > min(s, d):
            raise ValueError(f"r: expected <= min(S, d) = {min(s, d)} for x, got {self.r}")
        keep = self._keep_or_all(x, token_keep)
        factors = factors_from_svd(masked_svd(x, keep), keep, self.r)
        return Selection(token_keep=keep, form=fmt.FORM_LOWRANK, param=self.r, factors=factors)
