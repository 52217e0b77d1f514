# SPDX-License-Identifier: Apache-2.0
"""The shared strategy test matrix (style rule R13): every strategy with kwargs ordered easy to hard.

Kept in a uniquely named module (not ``conftest``) so tests can import it by name from this folder.
"""

from __future__ import annotations

from typing import Any, Dict, List

from mosaickv_sglang.strategies import ChanKStrategy, LowRankStrategy, TokMStrategy

# kwargs are for segment_size=64, head_dim=128; ordered easy (little compression) to hard.
STRATEGY_MATRIX: List[Dict[str, Any]] = [
    {"name": "dense", "kwargs": [{}]},
    {"name": "chan-k", "kwargs": [{"k": 64}, {"k": 32}, {"k": 16}, {"k": 1}]},
    {"name": "tok-m", "kwargs": [{"m": 48}, {"m": 32}, {"m": 16}, {"m": 1}]},
    {
        "name": "tok-m/chan-k",
        "kwargs": [
            {"members": (TokMStrategy(48), ChanKStrategy(64))},
            {"members": (TokMStrategy(16), ChanKStrategy(16))},
            {"members": (ChanKStrategy(8), TokMStrategy(8))},
            {"members": (TokMStrategy(16), LowRankStrategy(8))},
        ],
    },
    {"name": "lowrank-r", "kwargs": [{"r": 32}, {"r": 16}, {"r": 8}, {"r": 1}]},
]
