# SPDX-License-Identifier: Apache-2.0
"""Triton compile keys of kernel launches, recorded by stand-ins for the kernels (not a test module)."""

from __future__ import annotations

from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend


def unspecialized(kernel) -> set:
    """Names of the kernel's arguments declared ``do_not_specialize`` (compiled or interpreted kernel)."""
    if hasattr(kernel, "params"):
        return {p.name for p in kernel.params if p.do_not_specialize}
    names = kernel.kwargs.get("do_not_specialize") or ()
    return {kernel.arg_names[n] if isinstance(n, int) else n for n in names}


def compile_key(kernel, args, kwargs) -> tuple:
    """What Triton compiles a variant per: each positional argument's specialization (none for a
    ``do_not_specialize`` one), the constexprs and options."""
    skip = unspecialized(kernel)
    names = kernel.arg_names
    spec = tuple(native_specialize_impl(BaseBackend, a, False, names[i] not in skip, True) for i, a in enumerate(args))
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
