# SPDX-License-Identifier: Apache-2.0
"""Count, on any device (the CPU included), the aten ops a code path dispatches and the ones that launch a kernel.

:class:`OpCensus` is a :class:`~torch.utils._python_dispatch.TorchDispatchMode`: it sees every aten op that reaches
a backend while it is active (after autograd and after composite ops are decomposed, so the same ops on the CPU and
on CUDA, up to dtype casts that are no-ops when the dtype already matches). Each op falls in one kind:

* ``view``: returns an alias of an input and writes nothing (``view``, ``slice``, ``select``, ``expand``,
  ``transpose``, ``detach``, ``split``...: the schema's return alias info; also ``_unsafe_view``, which
  ``reshape`` dispatches after a copy), or only changes metadata in place (ops tagged ``inplace_view``, e.g.
  ``resize_``);
* ``alloc``: allocation without a kernel (``empty``, ``empty_like``, ``empty_strided``, ``new_empty``...);
* ``transfer``: a copy between devices (``_to_copy``/``copy_`` across devices, ``_local_scalar_dense`` i.e.
  ``item``), a memcpy rather than a kernel (and on a GPU often a host synchronisation, see
  :mod:`bench.host_syncs`);
* ``kernel``: everything else; on a GPU each of these launches at least one kernel (some, e.g. ``sort``,
  ``topk``, ``index_add_`` or ``cumsum``, launch several: the profiler's device table says how many);
* ``triton``: a launch of a Triton kernel (one kernel, compiled or, on the CPU, run by the interpreter: the aten ops
  the interpreter dispatches inside it are not counted). Its traffic is not counted.

``by_name`` tallies ``"<kind>:<op>"``; ``by_site`` tallies the kernel ops by the innermost frame of the code under
study (the first frame whose file path contains one of ``site_roots``), as ``"file:line (function)"``, to point at
the loops that dispatch them.

``bytes_by_name`` and ``bytes_by_site`` tally the memory traffic of the kernel ops the same ways: each op's tensor
arguments and results, an argument counted once per distinct element it addresses (a broadcast, stride-0 dimension
counts once), at their element sizes. It is what a kernel of that op reads and writes at least, so at a GPU's copy
bandwidth ``total_bytes`` bounds the GPU time a memory-bound path needs from below, and the sites with the most
bytes are where a fused kernel saves the most. ``flops`` counts the matrix products' multiply-adds times two.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["KINDS", "OpCensus", "classify", "code_site"]

KINDS = ("kernel", "view", "alloc", "transfer", "triton")

_ALLOC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
_VIEW_LIKE = {"_unsafe_view", "_reshape_alias"}  # views whose schema does not say so
_CROSS_DEVICE = {"_to_copy", "copy_", "_copy_from", "_copy_from_and_resize"}


def _devices(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> set:
    devs = set()
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            devs.add(a.device.type)
        elif isinstance(a, torch.device):
            devs.add(a.type)
    return devs


def classify(func: Any, args: Tuple[Any, ...] = (), kwargs: Optional[Dict[str, Any]] = None) -> str:
    """The kind (one of :data:`KINDS`) of one dispatched aten op, called as ``func(*args, **kwargs)``."""
    kwargs = kwargs or {}
    name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
    if name in _ALLOC:
        return "alloc"
    if name == "_local_scalar_dense":
        return "transfer"
    if name in _CROSS_DEVICE and len(_devices(args, kwargs)) > 1:
        return "transfer"
    if name in _VIEW_LIKE or torch.Tag.inplace_view in getattr(func, "tags", ()):
        return "view"
    returns = func._schema.returns if hasattr(func, "_schema") else ()
    if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
        return "view"
    return "kernel"


class OpCensus(TorchDispatchMode):
    """Context manager counting dispatched aten ops by kind, name and (for kernels) code site; see the module
    docstring.

    Parameters
    ----------
    site_roots : sequence of str
        Path fragments of the code under study (default ``("mosaickv_sglang",)``); kernel ops are attributed to the
        innermost frame whose file path contains one of them, or to ``"<other>"``.

    Attributes
    ----------
    counts : collections.Counter
        kind -> ops.
    by_name : collections.Counter
        ``"<kind>:<op>"`` -> ops (``op`` the aten overload packet, e.g. ``"kernel:bmm"``).
    by_site : collections.Counter
        ``"file:line (function)"`` -> kernel ops and Triton launches.
    """

    def __init__(self, site_roots: Sequence[str] = ("mosaickv_sglang",)) -> None:
        super().__init__()
        self.site_roots = tuple(site_roots)
        self.counts: Counter = Counter({k: 0 for k in KINDS})
        self.by_name: Counter = Counter()
        self.by_site: Counter = Counter()
        self.bytes_by_name: Counter = Counter()
        self.bytes_by_site: Counter = Counter()
        self.flops = 0
        self._in_triton = 0
        self._saved_runs: List[Tuple[type, Callable]] = []

    def __enter__(self) -> "OpCensus":
        for cls in _triton_launch_classes():
            self._saved_runs.append((cls, cls.run))
            cls.run = self._counted_run(cls.run)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            for cls, run in reversed(self._saved_runs):
                cls.run = run
            self._saved_runs.clear()

    def _counted_run(self, run: Callable) -> Callable:
        census = self

        def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
            if not census._in_triton and not kwargs.get("warmup", False):
                name = getattr(getattr(fn, "fn", fn), "__name__", "?")
                census.counts["triton"] += 1
                census.by_name[f"triton:{name}"] += 1
                census.by_site[code_site(census.site_roots)] += 1
            census._in_triton += 1
            try:
                return run(fn, *args, **kwargs)
            finally:
                census._in_triton -= 1

        return counted

    @property
    def total(self) -> int:
        """All dispatched ops."""
        return sum(self.counts.values())

    def __torch_dispatch__(
        self, func: Callable, types: Any, args: Tuple[Any, ...] = (), kwargs: Optional[Dict[str, Any]] = None
    ) -> Any:
        kwargs = kwargs or {}
        if self._in_triton:
            return func(*args, **kwargs)
        kind = classify(func, args, kwargs)
        name = func.overloadpacket.__name__
        self.counts[kind] += 1
        self.by_name[f"{kind}:{name}"] += 1
        out = func(*args, **kwargs)
        if kind == "kernel":
            site = code_site(self.site_roots)
            self.by_site[site] += 1
            moved = traffic_bytes(args, kwargs, out)
            self.bytes_by_name[name] += moved
            self.bytes_by_site[site] += moved
            self.flops += matmul_flops(name, args, out)
        return out

    def report(self, top: int = 20) -> Dict[str, object]:
        """JSON-ready summary: ``ops`` (all), ``ops_by_kind``, and the ``top`` entries of ``ops_by_name`` (every
        kind), ``kernel_ops_by_name`` and ``kernel_ops_by_site``, each most frequent first; the traffic totals; and
        every function's kernel ops and traffic (``kernel_ops_by_function``, ``bytes_by_function``: its sites
        summed, keyed ``"file (function)"``)."""
        kernels = Counter({k.split(":", 1)[1]: v for k, v in self.by_name.items() if k.startswith("kernel:")})
        return {
            "ops": self.total,
            "ops_by_kind": dict(self.counts),
            "ops_by_name": dict(self.by_name.most_common(top)),
            "kernel_ops_by_name": dict(kernels.most_common(top)),
            "kernel_ops_by_site": dict(self.by_site.most_common(top)),
            "total_bytes": self.total_bytes,
            "flops": self.flops,
            "bytes_by_name": dict(self.bytes_by_name.most_common(top)),
            "bytes_by_site": dict(self.bytes_by_site.most_common(top)),
            "kernel_ops_by_function": dict(by_function(self.by_site).most_common()),
            "bytes_by_function": dict(by_function(self.bytes_by_site).most_common()),
        }

    @property
    def total_bytes(self) -> int:
        """Memory traffic of every kernel op (see the module docstring)."""
        return sum(self.bytes_by_name.values())


def _triton_launch_classes() -> List[type]:
    """The classes whose ``run`` launches a Triton kernel: the JIT's and, under ``TRITON_INTERPRET=1``, the
    interpreter's."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        return []
    return [JITFunction, InterpretedFunction]


def code_site(site_roots: Sequence[str]) -> str:
    """``"file:line (function)"`` of the innermost frame of the caller's stack whose file path contains one of
    ``site_roots``, or ``"<other>"``."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if any(root in path for root in site_roots):
            return f"{os.path.basename(path)}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "<other>"


def by_function(by_site: Counter) -> Counter:
    """A ``"file:line (function)"`` tally summed per ``"file (function)"`` (``<other>`` kept as it is)."""
    out: Counter = Counter()
    for site, value in by_site.items():
        where, _, function = site.partition(" ")
        out[f"{where.split(':')[0]} {function}".strip()] += value
    return out


def addressed_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements ``t`` addresses: its numel without its stride-0 (broadcast) dimensions."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return 0 if t.numel() == 0 else n * t.element_size()


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def traffic_bytes(args: Tuple[Any, ...], kwargs: Dict[str, Any], out: Any) -> int:
    """Bytes one kernel op reads and writes at least: its tensor arguments and results (a tensor passed twice, e.g.
    an in-place op's result, once)."""
    seen = set()
    total = 0
    for t in _tensors((args, kwargs, out)):
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += addressed_bytes(t)
    return total


_MATMULS = {"mm", "bmm", "addmm", "baddbmm", "addbmm"}


def matmul_flops(name: str, args: Tuple[Any, ...], out: Any) -> int:
    """``2 * M * N * K`` (times the batch) for a matrix product op, else 0."""
    if name not in _MATMULS or not isinstance(out, torch.Tensor):
        return 0
    a = args[1] if name in {"addmm", "baddbmm", "addbmm"} else args[0]
    return 2 * out.numel() * int(a.shape[-1]) * (int(a.shape[0]) if name == "addbmm" else 1)
