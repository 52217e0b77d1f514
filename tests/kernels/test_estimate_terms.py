# SPDX-License-Identifier: Apache-2.0
"""The estimator's fused channel terms (``chan_terms_fwd``) vs ``ref_chan_terms`` and vs the planner's torch ops."""

import pytest
import torch

from mkv_kernel_cases import gpu_only
from mosaickv_sglang.kernels.estimate_terms import chan_terms_fwd
from mosaickv_sglang.kernels.reference import ref_chan_terms

# (seed, N, S, d, M): head_dim 64 and 128 (and 16, 256), page-unaligned and ragged token counts (S not a multiple of
# BLOCK_S), one to more token-count options than BLOCK_M's minimum of 16
CASES = [
    (0, 5, 64, 128, 4),
    (1, 3, 40, 64, 1),
    (2, 7, 16, 64, 9),
    (3, 2, 33, 128, 17),
    (4, 4, 64, 16, 3),
    (5, 1, 7, 256, 2),
    (6, 6, 48, 64, 6),
]


def _inputs(seed, n, s, d, m, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, s, d, generator=g) * torch.rand(n, 1, d, generator=g) * 3
    values = torch.randn(n, s, d, generator=g)
    k_drop = torch.rand(n, s, d, generator=g) < torch.rand(n, 1, 1, generator=g)
    v_drop = torch.rand(n, s, d, generator=g) < torch.rand(n, 1, 1, generator=g)
    p = torch.softmax(torch.randn(n, s, generator=g) * 2, 1)
    qbar = torch.randn(n, d, generator=g)
    var_q = torch.rand(n, d, generator=g) * 2
    resid = torch.rand(n, s, generator=g) * 4
    counts = torch.randint(1, s + 1, (m,), generator=g)
    rank = torch.argsort(torch.rand(n, s, generator=g), 1).argsort(1)
    kept = (rank[:, None, :] < counts[None, :, None]).float()
    scale = float(d) ** -0.5
    ts = [keys, values, k_drop, v_drop, p, qbar, var_q, resid, kept]
    return [t.to(device).contiguous() for t in ts] + [scale]


@pytest.mark.parametrize("seed,n,s,d,m", CASES)
def test_chan_terms_match_the_float64_reference(device, seed, n, s, d, m):
    args = _inputs(seed, n, s, d, m, device)
    got = chan_terms_fwd(*args)
    want = ref_chan_terms(*args)
    for name, g, w in zip(("coh", "kvar", "lost_k", "vvec", "lost_v"), got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        torch.testing.assert_close(g.double().cpu(), w.cpu(), rtol=2e-5, atol=1e-5, msg=name)


def test_chan_terms_match_the_planners_torch_ops(device):
    """The ops of ``_estimate_fast``'s per-k loop, as written there, give the kernel's outputs."""
    keys, values, k_drop, v_drop, p, qbar, var_q, resid, kept, scale = _inputs(11, 6, 64, 64, 5, device)
    coh, kvar, lost_k, vvec, lost_v = chan_terms_fwd(keys, values, k_drop, v_drop, p, qbar, var_q, resid, kept, scale)
    k_stats = torch.stack([qbar, var_q, torch.ones_like(qbar)], 2)
    dk = keys * k_drop
    want_coh = p * scale * torch.bmm(dk, k_stats[:, :, :1]).squeeze(2)
    sums = torch.bmm(dk.pow(2), k_stats[:, :, 1:])
    want_kvar = torch.bmm(kept, (p.pow(2) * scale**2 * sums[:, :, 0] * resid)[:, :, None]).squeeze(2)
    dv = values * v_drop
    torch.testing.assert_close(coh, want_coh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kvar, want_kvar, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lost_k, sums[:, :, 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vvec, torch.bmm(kept * p[:, None, :], dv), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lost_v, dv.pow(2).sum(-1), rtol=1e-5, atol=1e-6)


def test_chan_terms_refuse_bad_inputs(device):
    args = _inputs(0, 2, 16, 64, 2, device)
    with pytest.raises(ValueError, match="keys: expected last dim in"):
        chan_terms_fwd(*[a[..., :48].contiguous() if i in (0, 1, 2, 3) else a for i, a in enumerate(args)])
    bad = list(args)
    bad[2] = args[2].float()
    with pytest.raises((TypeError, ValueError), match="k_drop"):
        chan_terms_fwd(*bad)
    bad = list(args)
    bad[8] = args[8][:, :0]
    with pytest.raises(ValueError, match="M >= 1"):
        chan_terms_fwd(*bad)


@gpu_only
@pytest.mark.parametrize("seed,n,s,d,m", CASES)
def test_chan_terms_on_gpu(seed, n, s, d, m):
    args = _inputs(seed, n, s, d, m, device="cuda")
    got = chan_terms_fwd(*args)
    want = ref_chan_terms(*args)
    for name, g, w in zip(("coh", "kvar", "lost_k", "vvec", "lost_v"), got, want):
        torch.testing.assert_close(g.double().cpu(), w, rtol=2e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("seed,n_seg,s,d,groups", [(0, 6, 64, 128, 2), (1, 9, 32, 64, 3), (2, 4, 16, 64, 1)])
def test_fast_estimator_with_the_fused_terms_equals_the_torch_ops(monkeypatch, device, seed, n_seg, s, d, groups):
    """``_estimate_fast`` with the kernel (forced; on the CPU through the interpreter) gives the torch path's
    estimates within fp32 rounding, and so the same plans' errors, for the whole default menu (mixed strategies)."""
    from mosaickv_sglang import planner
    from mosaickv_sglang.importance import importance_from_queries
    from mosaickv_sglang.kernels import format as fmt
    from mosaickv_sglang.strategies import default_menu

    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n_seg, s, d, generator=g) * torch.rand(n_seg, 1, d, generator=g) * 2
    v = torch.randn(n_seg, s, d, generator=g)
    gid = torch.arange(n_seg) % groups
    q = torch.randn(n_seg, 8, d, generator=g)  # each segment's observed queries
    k, v, gid, q = k.to(device), v.to(device), gid.to(device), q.to(device)
    imp = importance_from_queries(k, q, group_ids=gid)
    menu = [c for c in default_menu(s, d) if fmt.FORM_LOWRANK not in (c.k_form, c.v_form)]
    assert any(c.k_form == fmt.FORM_CHAN for c in menu)
    want = planner.estimate_errors_fast(k, v, menu, imp, group_ids=gid)
    calls = []
    real = chan_terms_fwd

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr("mosaickv_sglang.kernels.estimate_terms.chan_terms_fwd", counted)
    monkeypatch.setattr(planner, "_fused_estimate_terms", lambda x: True)
    got = planner.estimate_errors_fast(k, v, menu, imp, group_ids=gid)
    assert calls, "the fused path was not taken"
    torch.testing.assert_close(got.first_order, want.first_order, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.mass_delta, want.mass_delta)
    torch.testing.assert_close(got.unseen, want.unseen, rtol=1e-4, atol=1e-6)


def test_estimate_terms_method_is_checked(monkeypatch):
    from mosaickv_sglang import planner

    monkeypatch.setattr(planner, "ESTIMATE_TERMS_ON_CUDA", "triton")
    with pytest.raises(ValueError, match="ESTIMATE_TERMS_ON_CUDA: expected one of"):
        planner._fused_estimate_terms(torch.zeros(1, 1, 64))
    monkeypatch.setattr(planner, "ESTIMATE_TERMS_ON_CUDA", "kernel")
    assert not planner._fused_estimate_terms(torch.zeros(1, 1, 64))  # CPU tensors: always torch


def test_startup_timing_checks_the_kernel_against_the_torch_ops(monkeypatch, caplog, device):
    """On the test device (on the CPU, the kernel through the interpreter) both methods are timed on matching terms; a kernel whose terms
    differ is left out with a warning, and the kernel is skipped for a head dim it has no variant for."""
    import logging

    from mosaickv_sglang import estimate_terms_select as E
    from mosaickv_sglang.kernels import estimate_terms

    got = E.time_estimate_terms_methods(device, 64, 16, segments=4, repeats=1)
    assert set(got) == {"torch", "kernel"} and all(t > 0 for t in got.values())
    assert set(E.time_estimate_terms_methods(device, 48, 16, segments=2, repeats=1)) == {"torch"}
    real = estimate_terms.chan_terms_fwd

    def off_by_a_little(*args):
        coh, kvar, lost_k, vvec, lost_v = real(*args)
        return coh, kvar, lost_k * 1.01, vvec, lost_v

    monkeypatch.setattr(estimate_terms, "chan_terms_fwd", off_by_a_little)
    with caplog.at_level(logging.WARNING, logger="mosaickv_sglang.estimate_terms_select"):
        assert set(E.time_estimate_terms_methods(device, 64, 16, segments=2, repeats=1)) == {"torch"}
    assert any("differs from the torch ops" in r.message for r in caplog.records)
