# SPDX-License-Identifier: Apache-2.0
"""The pool's argument check for integers, shared by its modules and the sealer."""

from __future__ import annotations


def check_int(x: object, name: str, lo: int) -> int:
    """``x``, an integer of at least ``lo`` (not a bool); else ``ValueError`` naming ``name``."""
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {x!r}")
    return x
