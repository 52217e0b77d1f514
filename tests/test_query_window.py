# SPDX-License-Identifier: Apache-2.0
"""The sealer's query window: a ring of each layer's last queries, each with the request that asked it."""

import torch

from mosaickv_sglang.sealer import QueryWindow

H_KV, G, D, W = 2, 3, 8, 5


def _q(t: int, seed: int) -> torch.Tensor:
    return torch.randn(t, H_KV * G * D, generator=torch.Generator().manual_seed(seed))


def _rows(window: QueryWindow, layer: int, readers=None) -> torch.Tensor:
    """``[W', H_kv * G * d]``: the window's queries back in the layout they were observed in."""
    q = window.queries(layer) if readers is None else window.reader_queries(layer, readers)
    return q.permute(1, 0, 2, 3).reshape(q.shape[1], -1)


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731 - the ring keeps rows, not their order
    return key(a) == key(b)


def test_the_ring_keeps_the_last_rows_and_their_owners():
    win = QueryWindow(2, H_KV, G, D, W, torch.device("cpu"))
    assert win.queries(0) is None and win.reader_queries(0, [1]) is None
    a, b = _q(3, 0), _q(4, 1)
    win.set_owners(torch.tensor([1, 1, 2]))
    win.observe(0, a)
    win.set_owners(torch.tensor([3, 2, 3, 3]))
    win.observe(0, b)
    assert _same_rows(_rows(win, 0), torch.cat([a, b])[-W:])  # 7 rows seen, the last 5 kept
    assert _same_rows(_rows(win, 0, [2]), torch.cat([a[2:3], b[1:2]]))
    assert _same_rows(_rows(win, 0, [3, 2]), torch.cat([a[2:3], b]))
    assert win.reader_queries(0, [3]) is not None and win.reader_queries(1, [3]) is None
    assert win.reader_queries(0, [1]) is None and win.reader_queries(0, []) is None  # none of request 1's left


def test_rows_without_matching_owners_are_unowned():
    """Owners given for a different number of rows (or none) do not label the rows: a prefill's owners never leak
    onto another forward's queries."""
    win = QueryWindow(1, H_KV, G, D, W, torch.device("cpu"))
    win.set_owners(torch.tensor([4, 4]))
    win.observe(0, _q(3, 2))
    win.set_owners(None)
    win.observe(0, _q(1, 3))
    assert win.owner[0, :4].tolist() == [-1, -1, -1, -1] and win.reader_queries(0, [4]) is None


def test_a_long_extend_keeps_the_owners_of_its_last_rows():
    win = QueryWindow(1, H_KV, G, D, W, torch.device("cpu"))
    q = _q(8, 4)
    win.set_owners(torch.tensor([5, 5, 5, 5, 5, 6, 6, 6]))
    win.observe(0, q)
    assert _same_rows(_rows(win, 0, [6]), q[5:]) and _same_rows(_rows(win, 0, [5]), q[3:5])


def test_the_snapshot_is_the_window_the_planned_step_finds():
    """An eager step observes after its plan: the snapshot taken at the plan's end holds what was observed before it,
    and reading_snapshot serves it while later rows go into the live ring."""
    win = QueryWindow(2, H_KV, G, D, W, torch.device("cpu"))
    with win.reading_snapshot():  # no snapshot yet: the live ring
        assert win.queries(0) is None
    a, b = _q(3, 2), _q(2, 3)
    win.observe(0, a)
    win.mark_plan_start()
    win.take_snapshot()
    win.observe(0, b)  # the step in flight
    win.observe(1, b)
    assert _same_rows(_rows(win, 0), torch.cat([a, b]))
    with win.reading_snapshot():
        assert _same_rows(_rows(win, 0), a)
        assert win.queries(1) is None
    assert _same_rows(_rows(win, 0), torch.cat([a, b]))  # back to the live ring


def test_the_snapshot_of_a_graph_plan_leaves_out_the_rows_its_step_will_write():
    """plan_rows advances the ring in the plan, before its step writes the rows: the snapshot keeps the counts the
    plan started with, so the rows of the step in flight (stale in the copy) are not read."""
    win = QueryWindow(2, H_KV, G, D, W, torch.device("cpu"))
    a = _q(2, 4)
    for layer in range(2):
        win.observe(layer, a)
    win.mark_plan_start()
    rows = win.plan_rows(2, 2)
    win.take_snapshot()
    b = _q(2, 5)
    for layer in range(2):
        win.observe_rows(layer, b, rows)
    with win.reading_snapshot():
        for layer in range(2):
            assert _same_rows(_rows(win, layer), a)
    assert _same_rows(_rows(win, 0), torch.cat([a, b]))
