# SPDX-License-Identifier: Apache-2.0
"""bench.host_syncs: reads, value-sized ops and device copies are counted by kind and name, and the
synchronisations by the code site that made them."""

from __future__ import annotations

import torch

from bench.host_syncs import HostSyncCounter


def _reads_twice(x: torch.Tensor) -> float:
    total = float(x.sum())  # this line: one read
    return total + x.max().item()  # and this one


def test_kinds_names_and_sites():
    x = torch.arange(6.0)
    here = __file__.rsplit("/", 1)[-1]
    with HostSyncCounter(site_roots=(here,)) as count:
        _reads_twice(x)
        x[x > 2]  # sized: a bool index
        torch.nonzero(x)
        x.to("cpu")  # a copy towards a device
        x + 1  # nothing
    assert (count.reads, count.sized, count.copies, count.syncs) == (2, 2, 1, 4)
    assert count.by_name == {"reads:__float__": 1, "reads:item": 1, "sized:__getitem__[bool]": 1,
                             "sized:nonzero": 1, "copies:to": 1}  # fmt: skip
    line = _reads_twice.__code__.co_firstlineno
    assert count.by_site[f"reads:__float__ {here}:{line + 1} (_reads_twice)"] == 1
    assert count.by_site[f"reads:item {here}:{line + 2} (_reads_twice)"] == 1
    assert sum(count.by_site.values()) == count.syncs  # copies are not synchronisations: not by site


def test_sites_outside_the_roots_are_other():
    with HostSyncCounter(site_roots=("no/such/path",)) as count:
        torch.ones(2).sum().item()
    assert dict(count.by_site) == {"reads:item <other>": 1}


def test_scalar_puts_through_an_index_are_synchronisations():
    """``t[idx] = scalar`` with an index tensor or list copies the scalar to a CUDA target with a blocking copy in
    torch 2.11; slices, integers, bool masks and tensor values do not count as puts, nor does ``index_fill_``."""
    x = torch.zeros(8, dtype=torch.int32)
    idx = torch.tensor([1, 5])
    with HostSyncCounter(site_roots=("test_host_syncs.py",)) as count:
        x[idx] = -1  # a put
        x[[0, 2]] = 3  # a put (a list index)
        x[:, None][idx, 0] = 7  # a put (an index tensor among other parts)
        x.index_put_((idx,), torch.tensor(2, dtype=torch.int32))  # a put (a 0-dim host value)
        x[2:4] = 1  # a fill: no put
        x[3] = 4  # a select: no put
        x[idx] = torch.tensor([8, 9], dtype=torch.int32)  # a tensor value: no put
        x.index_fill_(0, idx, -1)  # the scalar as a kernel argument: no put
    assert (count.puts, count.reads, count.sized, count.syncs) == (4, 0, 0, 4)
    assert count.by_name == {"puts:__setitem__": 3, "puts:index_put_": 1}
    assert x.tolist() == [3, -1, 1, 4, 0, -1, 0, 0]
