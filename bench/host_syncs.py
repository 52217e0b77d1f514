# SPDX-License-Identifier: Apache-2.0
"""Count, on any device (the CPU included), the torch calls that would make the host wait for a GPU.

:class:`HostSyncCounter` is a :class:`~torch.overrides.TorchFunctionMode` that sees every torch call made while it
is active and tallies four kinds:

* ``reads``: a tensor's value brought to the host (``item``, ``tolist``, ``numpy``, ``cpu``, ``bool(t)``,
  ``int(t)``, ``float(t)``, ``t.__index__``, printing);
* ``sized``: ops whose output size depends on the values (``nonzero``, ``unique``, ``masked_select``, indexing with
  a bool tensor, ``repeat_interleave`` with tensor repeats and no ``output_size``...), which read a count back;
* ``puts``: a host scalar stored through an index tensor or list (``t[idx] = -1``, ``index_put_`` with a 0-dim
  host value): torch 2.11 turns the scalar into a 0-dim host tensor and copies it to a CUDA target with a blocking
  copy (``_index_put_impl_``'s ``value.to(self.device())``), which waits for every kernel queued on the stream;
  ``index_fill_`` takes the scalar as a kernel argument and waits for nothing;
* ``copies``: explicit moves to a device (``to``/``cuda``/``copy_`` towards a device, ``torch.tensor``/``as_tensor``
  with a device): a pageable host-to-device copy waits for the stream too (an upper bound: on the CPU these are
  no-ops).

On a GPU each of the first three is one synchronisation; the counts on the CPU are the same, so a CPU test can bound
the synchronisations of a code path. ``by_name`` keeps the tally per function name, ``by_site`` the synchronisations
per code site (the innermost frame under one of ``site_roots``, as ``"file:line (function)"``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from bench.op_census import code_site

__all__ = ["HostSyncCounter"]

_READS = {
    "item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__array__", "__repr__",
    "__format__", "__str__",
}
_SIZED = {"nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "_unique2", "bincount"}
_COPY_METHODS = {"to", "cuda", "copy_"}
_FACTORIES = {"tensor", "as_tensor"}


def _has_bool_index(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _has_advanced_index(index: Any) -> bool:
    """Whether indexing with ``index`` gathers or scatters (an integer tensor, a list or an array among its parts)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any((isinstance(p, torch.Tensor) and p.dim() > 0) or isinstance(p, (list, np.ndarray)) for p in parts)


def _host_scalar(value: Any) -> bool:
    """A Python number, or a 0-dim tensor on the host: what ``index_put_`` copies to a CUDA target, blocking."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and value.device.type == "cpu"
    return isinstance(value, (bool, int, float)) or isinstance(value, np.generic)


def _names_device(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
    for a in list(args[1:]) + list(kwargs.values()):
        if isinstance(a, torch.device) or (isinstance(a, str) and a.split(":")[0] in ("cpu", "cuda")):
            return True
    return "device" in kwargs


class HostSyncCounter(TorchFunctionMode):
    """Context manager counting host reads, value-sized ops, scalar puts and device copies (see the module docstring).

    Attributes
    ----------
    reads, sized, puts, copies : int
    by_name : collections.Counter
        ``"<kind>:<function>"`` -> calls.
    by_site : collections.Counter
        ``"<kind>:<function> file:line (function)"`` -> synchronisations (reads, sized ops, puts), at the innermost
        frame whose file path contains one of ``site_roots`` (default ``("mosaickv_sglang",)``), or ``<other>``.
    """

    def __init__(self, site_roots: Sequence[str] = ("mosaickv_sglang",)) -> None:
        super().__init__()
        self.site_roots = tuple(site_roots)
        self.reads = 0
        self.sized = 0
        self.puts = 0
        self.copies = 0
        self.by_name: Counter = Counter()
        self.by_site: Counter = Counter()

    @property
    def syncs(self) -> int:
        """Reads, value-sized ops and scalar puts: the synchronisations the code would make on a GPU."""
        return self.reads + self.sized + self.puts

    def _count(self, kind: str, name: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        self.by_name[f"{kind}:{name}"] += 1
        if kind != "copies":
            self.by_site[f"{kind}:{name} {code_site(self.site_roots)}"] += 1

    def __torch_function__(
        self, func: Callable, types: Any, args: Tuple[Any, ...] = (), kwargs: Optional[Dict[str, Any]] = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in _READS:
            self._count("reads", name)
        elif name in _SIZED or (name == "where" and len(args) + len(kwargs) == 1):
            self._count("sized", name)
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and len(args) > 1 \
                and _has_bool_index(args[1]):  # fmt: skip
            self._count("sized", f"{name}[bool]")
        elif name in ("__setitem__", "index_put_") and len(args) > 2 and _has_advanced_index(args[1]) \
                and _host_scalar(args[2]):  # fmt: skip
            self._count("puts", name)
        elif name == "repeat_interleave" and "output_size" not in kwargs and len(args) > 1 \
                and isinstance(args[1], torch.Tensor):  # fmt: skip
            self._count("sized", name)
        elif name in _COPY_METHODS and _names_device(args, kwargs):
            self._count("copies", name)
        elif name in _FACTORIES and "device" in kwargs:
            self._count("copies", name)
        return func(*args, **kwargs)
