# SPDX-License-Identifier: Apache-2.0
"""Triton compile keys of kernel launches, recorded by stand-ins for the kernels (not a test module)."""

from __future__ import annotations

from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend


def unspecialized(kernel, what: str = "do_not_specialize") -> set:
    """Names of the kernel's arguments declared ``do_not_specialize`` (or ``what``, e.g.
    ``do_not_specialize_on_alignment``), compiled or interpreted kernel."""
    if hasattr(kernel, "params"):
        return {p.name for p in kernel.params if getattr(p, what)}
    names = kernel.kwargs.get(what) or ()
    return {kernel.arg_names[n] if isinstance(n, int) else n for n in names}


def compile_key(kernel, args, kwargs) -> tuple:
    """What Triton compiles a variant per: each positional argument's specialization (none for a
    ``do_not_specialize`` one, no alignment for a ``do_not_specialize_on_alignment`` one), the constexprs and
    options."""
    skip, unaligned = unspecialized(kernel), unspecialized(kernel, "do_not_specialize_on_alignment")
    names = kernel.arg_names
    spec = tuple(native_specialize_impl(BaseBackend, a, False, names[i] not in skip, names[i] not in unaligned)
                 for i, a in enumerate(args))  # fmt: skip
    return spec, tuple(sorted((k, str(v)) for k, v in kwargs.items()))


class Recorder:
    """Stands in for a Triton kernel: records the compile key of each launch into ``keys`` as ``(name, *key)``, then
    launches the real kernel (``launch=False``: records only)."""

    def __init__(self, name, kernel, keys, launch=True):
        self.name, self.kernel, self.keys, self.launch = name, kernel, keys, launch

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.keys.add((self.name, *compile_key(self.kernel, args, kwargs)))
            if self.launch:
                return self.kernel[grid](*args, **kwargs)

        return launch
