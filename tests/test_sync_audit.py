# SPDX-License-Identifier: Apache-2.0
"""The sync audit (``MOSAICKV_SYNC_AUDIT``): each synchronizing CUDA call counted by the stack that made it."""

from __future__ import annotations

import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from bench import stack_summary
from mosaickv_sglang import sync_audit
from mosaickv_sglang.sync_audit import SYNC_WARNING, SyncAudit

# torch's own text, as the warning reaches Python
TORCH_TEXT = SYNC_WARNING + " (Triggered internally at /pytorch/c10/cuda/CUDAFunctions.cpp:151.)"


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _waits_here() -> int:
    warnings.warn(TORCH_TEXT, UserWarning)  # as torch warns from inside an op called on this line
    return sys._getframe().f_lineno - 1


def _calls_twice() -> None:
    for _ in range(2):
        _waits_here()


@pytest.fixture
def audit(tmp_path):
    modes = []
    clock = _Clock()
    with warnings.catch_warnings():
        a = SyncAudit(str(tmp_path / "waits"), write_every_s=5.0, clock=clock, set_mode=modes.append)
        a.modes, a.clock = modes, clock
        yield a.install()
        a.uninstall()


def test_each_wait_is_counted_at_the_line_that_made_it_every_time(audit):
    """The 'always' filter: a line warned twice counts twice (the default filter would show it once); the stack
    ends at the calling function's line, not in the warnings module or the audit."""
    _calls_twice()
    line = _waits_here()
    assert audit.modes == ["warn"] and audit.waits == 3
    (twice, n2), (once, n1) = sorted(audit.counts.items(), key=lambda kv: -kv[1])
    assert (n2, n1) == (2, 1)
    here = "/".join(__file__.split("/")[-2:])
    assert twice.endswith(f";_waits_here ({here}:{_waits_here.__code__.co_firstlineno}) @{line}")
    assert "_calls_twice" in twice.rsplit(";", 2)[-2] and "_calls_twice" not in once


def test_other_warnings_go_where_they_went_before(audit):
    shown = []
    audit._previous_show = lambda *a: shown.append(str(a[0]))
    warnings.warn("something else", UserWarning)
    assert shown == ["something else"] and audit.waits == 0


def test_the_counts_are_written_when_due_when_idle_and_at_the_end(audit):
    path = audit.path
    assert open(path).read() == ""  # written at install: an audit with no wait is told from none
    _waits_here()
    assert open(path).read() == ""  # not due yet
    audit.clock.t = 5.0
    _waits_here()
    counts = stack_summary.read_collapsed(open(path).read())
    assert sum(counts.values()) == 2
    _waits_here()
    audit.write()  # as the idle hook does
    assert sum(stack_summary.read_collapsed(open(path).read()).values()) == 3
    audit.uninstall()
    assert audit.modes == ["warn", "default"]
    with pytest.warns(UserWarning, match=SYNC_WARNING):  # shown as before, no longer counted
        warnings.warn(TORCH_TEXT, UserWarning)
    assert audit.waits == 3


def test_write_every_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="write_every_s: expected a number of seconds > 0, got 0"):
        SyncAudit(str(tmp_path / "w"), write_every_s=0)


@pytest.fixture
def fresh_audit(monkeypatch):
    monkeypatch.setattr(sync_audit, "_started", None)
    monkeypatch.setattr(sync_audit, "_set_sync_debug_mode", lambda mode: None)
    with warnings.catch_warnings():
        yield
        if sync_audit._started is not None:
            sync_audit._started.uninstall()


def test_run_batch_hook_starts_at_the_first_decode_batch_with_the_rank(tmp_path, monkeypatch, fresh_audit):
    from mosaickv_sglang.patches.scheduler import audit_syncs, write_sync_audit

    scheduler = SimpleNamespace(ps=SimpleNamespace(tp_rank=1, tp_size=2))
    decode = SimpleNamespace(forward_mode=SimpleNamespace(is_decode=lambda: True))
    extend = SimpleNamespace(forward_mode=SimpleNamespace(is_decode=lambda: False))
    monkeypatch.delenv(sync_audit.ENV_VAR, raising=False)
    audit_syncs(scheduler, decode)
    assert sync_audit.started() is None
    write_sync_audit(None, scheduler)  # nothing started: nothing to write
    monkeypatch.setenv(sync_audit.ENV_VAR, str(tmp_path / "waits"))
    audit_syncs(scheduler, extend)
    assert sync_audit.started() is None  # prefill and start-up waits are not counted
    audit_syncs(scheduler, decode)
    audit = sync_audit.started()
    assert audit is not None and audit.path == str(tmp_path / "waits.tp1")
    audit_syncs(scheduler, decode)
    assert sync_audit.started() is audit
    _waits_here()
    write_sync_audit(None, scheduler)
    assert sum(stack_summary.read_collapsed((tmp_path / "waits.tp1").read_text()).values()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torchs_own_warning_is_counted_on_cuda(tmp_path):
    """A real ``.item()`` and ``torch.bincount`` of CUDA tensors under torch's sync debug mode; a queued add is not."""
    x = torch.arange(8, device="cuda")
    with warnings.catch_warnings():
        audit = SyncAudit(str(tmp_path / "waits")).install()
        try:
            x.add_(1)
            x.sum().item()
            torch.bincount(x)
        finally:
            audit.uninstall()
    assert audit.waits >= 2
    leaves = [stack.rsplit(";", 1)[-1] for stack in audit.counts]
    assert all(leaf.startswith("test_torchs_own_warning_is_counted_on_cuda") for leaf in leaves), leaves
