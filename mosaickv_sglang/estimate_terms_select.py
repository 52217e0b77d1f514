# SPDX-License-Identifier: Apache-2.0
"""Pick, on the server's own GPU, how the seal planner's fast estimator computes its per-``k`` channel terms.

:func:`~mosaickv_sglang.planner._estimate_fast` has two ways (torch ops, :func:`~mosaickv_sglang.planner.
_chan_terms_torch`; one Triton pass, :func:`~mosaickv_sglang.kernels.estimate_terms.chan_terms_fwd`) that give the
same terms within fp32 rounding. The attention backend calls :func:`select_estimate_terms_method` once at startup on
CUDA: it times both on synthetic segments of the server's head dim and segment size, checks the kernel's terms
against the torch ops' (a kernel whose terms differ is not chosen, and a warning says so), and makes the faster the
planner's default (:data:`~mosaickv_sglang.planner.ESTIMATE_TERMS_ON_CUDA`). Plans may differ between the two in
rare near-ties of the budgeted choice; each tensor-parallel rank plans only its own heads, so ranks that choose
differently stay consistent. ``MOSAICKV_ESTIMATE_TERMS=torch|kernel`` fixes the method without timing; ``auto``
(the default) times.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from mosaickv_sglang import planner
from mosaickv_sglang.device_timer import best_seconds_in_rounds
from mosaickv_sglang.startup_choice import choose_fastest

logger = logging.getLogger(__name__)

__all__ = ["ENV_VAR", "select_estimate_terms_method", "time_estimate_terms_methods", "MATCH_RTOL"]

ENV_VAR = "MOSAICKV_ESTIMATE_TERMS"
TIMED_SEGMENTS = 1024  # a chunk of a typical seal: 16 pages x 8 KV heads x 8 layers
TIMED_TOKEN_OPTIONS = 6  # token counts of the default menu (m of 1/8 .. 1 of the segment)
TIMED_REPEATS = 3
MATCH_RTOL = 1e-3  # largest error of a kernel term relative to the largest magnitude of the torch term


def _synthetic_case(
    device: torch.device, head_dim: int, seg_size: int, segments: int
) -> Tuple[Dict[str, Callable[[], Tuple[torch.Tensor, ...]]], Tuple[torch.Tensor, ...]]:
    """One chunk's inputs of the channel terms (fp16-rounded vectors, the top half of the channels kept, token
    masses of a softmax) and a call per method."""
    gen = torch.Generator().manual_seed(0)
    n, s, d = segments, seg_size, head_dim
    kf = torch.randn(n, s, d, generator=gen).half().float().to(device)
    vf = torch.randn(n, s, d, generator=gen).half().float().to(device)
    k_drop = (torch.rand(n, s, d, generator=gen) < 0.5).to(device)
    v_drop = (torch.rand(n, s, d, generator=gen) < 0.5).to(device)
    p = torch.softmax(torch.randn(n, s, generator=gen), 1).to(device)
    qbar = torch.randn(n, d, generator=gen).to(device)
    var_q = torch.rand(n, d, generator=gen).to(device)
    c = torch.rand(n, s, generator=gen).to(device)
    counts = torch.linspace(s / TIMED_TOKEN_OPTIONS, s, TIMED_TOKEN_OPTIONS).round().long()
    kept = (torch.arange(s)[None, None, :] < counts[None, :, None]).expand(n, -1, -1).float().contiguous().to(device)
    k_stats = torch.stack([qbar, var_q, torch.ones_like(qbar)], 2)
    kept_p = kept * p[:, None, :]
    scale = d**-0.5

    def torch_terms() -> Tuple[torch.Tensor, ...]:
        return planner._chan_terms_torch(kf, vf, k_drop, v_drop, p, k_stats, c, kept, kept_p, scale)

    def kernel_terms() -> Tuple[torch.Tensor, ...]:
        from mosaickv_sglang.kernels.estimate_terms import chan_terms_fwd

        return chan_terms_fwd(kf, vf, k_drop, v_drop, p, qbar, var_q, c, kept, scale)

    return {"torch": torch_terms, "kernel": kernel_terms}, torch_terms()


def _mismatch(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """Largest error of any term, relative to the largest magnitude of that term."""
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        scale = float(w.abs().max()) or 1.0
        worst = max(worst, float((g - w).abs().max()) / scale)
    return worst


def time_estimate_terms_methods(
    device: torch.device,
    head_dim: int,
    seg_size: int,
    methods: Sequence[str] = planner.ESTIMATE_TERMS_METHODS,
    segments: int = TIMED_SEGMENTS,
    repeats: int = TIMED_REPEATS,
) -> Dict[str, float]:
    """Seconds of one call of the channel terms per method (the best of ``repeats`` rounds that time every method
    once, after one untimed call each, which also compiles the kernel). A method that raises, or whose terms differ
    from the torch ops' by more than :data:`MATCH_RTOL`, is logged and left out; so is the kernel where the head dim
    has no variant. When the torch ops themselves fail, nothing is timed (the kernel could not be checked)."""
    from mosaickv_sglang.kernels.estimate_terms import ESTIMATE_TERMS_HEAD_DIMS

    try:
        calls, want = _synthetic_case(device, head_dim, seg_size, segments)
    except Exception:  # noqa: BLE001 - without the torch ops' terms the kernel cannot be checked: time nothing
        logger.warning("MosaicKV: the estimate terms' torch ops failed on %s; nothing timed", device, exc_info=True)
        return {}

    def failed(method: str) -> None:
        logger.warning("MosaicKV: estimate terms method %s failed on %s; not chosen", method, device, exc_info=True)

    checked: Dict[str, Callable[[], object]] = {}
    for method in methods:
        if method == "kernel" and head_dim not in ESTIMATE_TERMS_HEAD_DIMS:
            continue
        try:
            err = _mismatch(calls[method](), want)
        except Exception:  # noqa: BLE001 - a method that cannot run here is not chosen; the other still can be
            failed(method)
            continue
        if not err <= MATCH_RTOL:
            logger.warning("MosaicKV: estimate terms method %s differs from the torch ops by %.3g (relative) "
                           "on %s; not chosen", method, err, device)  # fmt: skip
            continue
        checked[method] = calls[method]
    return best_seconds_in_rounds(checked, device, repeats, on_error=failed)


def select_estimate_terms_method(
    device: torch.device,
    head_dim: int,
    seg_size: int,
    timings: Optional[Dict[str, float]] = None,
) -> str:
    """Set :data:`~mosaickv_sglang.planner.ESTIMATE_TERMS_ON_CUDA` to ``MOSAICKV_ESTIMATE_TERMS``'s method, or else
    to the fastest of ``timings`` (default: :func:`time_estimate_terms_methods` on ``device``); returns it. With no
    timing (every method failed) the default stays."""
    planner.ESTIMATE_TERMS_ON_CUDA = choose_fastest(
        "estimate terms", ENV_VAR, planner.ESTIMATE_TERMS_METHODS, planner.ESTIMATE_TERMS_ON_CUDA, device,
        lambda: time_estimate_terms_methods(device, head_dim, seg_size), timings,
    )  # fmt: skip
    return planner.ESTIMATE_TERMS_ON_CUDA
