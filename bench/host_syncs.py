# SPDX-License-Identifier: Apache-2.0
"""Count, on any device (the CPU included), the torch calls that would make the host wait for a GPU.

:class:`HostSyncCounter` is a :class:`~torch.overrides.TorchFunctionMode` that sees every torch call made while it
is active and tallies three kinds:

* ``reads``: a tensor's value brought to the host (``item``, ``tolist``, ``numpy``, ``cpu``, ``bool(t)``,
  ``int(t)``, ``float(t)``, ``t.__index__``, printing);
* ``sized``: ops whose output size depends on the values (``nonzero``, ``unique``, ``masked_select``, indexing with
  a bool tensor, ``repeat_interleave`` with tensor repeats and no ``output_size``...), which read a count back;
* ``copies``: explicit moves to a device (``to``/``cuda``/``copy_`` towards a device, ``torch.tensor``/``as_tensor``
  with a device): a pageable host-to-device copy waits for the stream too (an upper bound: on the CPU these are
  no-ops).

On a GPU each of the first two is one synchronisation; the counts on the CPU are the same, so a CPU test can bound
the synchronisations of a code path. ``by_name`` keeps the tally per function name, ``by_site`` the synchronisations
per code site (the innermost frame under one of ``site_roots``, as ``"file:line (function)"``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

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


def _names_device(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
    for a in list(args[1:]) + list(kwargs.values()):
        if isinstance(a, torch.device) or (isinstance(a, str) and a.split(":")[0] in ("cpu", "cuda")):
            return True
    return "device" in kwargs


class HostSyncCounter(TorchFunctionMode):
    """Context manager counting host reads, value-sized ops and device copies (see the module docstring).

    Attributes
    ----------
    reads, sized, copies : int
    by_name : collections.Counter
        ``"<kind>:<function>"`` -> calls.
    by_site : collections.Counter
        ``"<kind>:<function> file:line (function)"`` -> synchronisations (reads and sized ops), at the innermost frame
        whose file path contains one of ``site_roots`` (default ``("mosaickv_sglang",)``), or ``<other>``.
    """

    def __init__(self, site_roots: Sequence[str] = ("mosaickv_sglang",)) -> None:
        super().__init__()
        self.site_roots = tuple(site_roots)
        self.reads = 0
        self.sized = 0
        self.copies = 0
        self.by_name: Counter = Counter()
        self.by_site: Counter = Counter()

    @property
    def syncs(self) -> int:
        """Reads plus value-sized ops: the synchronisations the code would make on a GPU."""
        return self.reads + self.sized

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
        elif name == "repeat_interleave" and "output_size" not in kwargs and len(args) > 1 \
                and isinstance(args[1], torch.Tensor):  # fmt: skip
            self._count("sized", name)
        elif name in _COPY_METHODS and _names_device(args, kwargs):
            self._count("copies", name)
        elif name in _FACTORIES and "device" in kwargs:
            self._count("copies", name)
        return func(*args, **kwargs)
