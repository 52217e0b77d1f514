# SPDX-License-Identifier: Apache-2.0
"""The MosaicKV objects of this process, for scheduler-side hooks (idle ticks, metrics) that SGLang does not hand
them to.

SGLang runs one scheduler per process (one per TP rank), and each builds one ``mosaic`` attention backend, which
owns the :class:`~mosaickv_sglang.sealer.Sealer` (and through it the pool and, when enabled, the sidecar bridge).
The backend registers its sealer here when it is built; hooks on the scheduler read it back with
:func:`current_sealer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from mosaickv_sglang.sealer import Sealer

__all__ = ["current_sealer", "register_sealer"]

_sealer: Optional["Sealer"] = None


def register_sealer(sealer: Optional["Sealer"]) -> None:
    """Make ``sealer`` this process's sealer (``None``: forget it); its :class:`~mosaickv_sglang.host_stalls.HostStalls`
    times this process's garbage collections from now on (the previous sealer's stop)."""
    global _sealer
    previous = getattr(_sealer, "stalls", None)
    if previous is not None:
        previous.uninstall()
    _sealer = sealer
    stalls = getattr(sealer, "stalls", None)
    if stalls is not None:
        stalls.install()


def current_sealer() -> Optional["Sealer"]:
    """The sealer of this process's ``mosaic`` attention backend, or ``None`` when none was built."""
    return _sealer
