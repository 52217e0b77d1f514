# SPDX-License-Identifier: Apache-2.0
"""The candidate menu: contents, byte accounting against the packed format, strategies per candidate."""

from __future__ import annotations

import pytest

from mosaickv_sglang.kernels import format as fmt
from mosaickv_sglang.strategies import (
    Candidate,
    default_menu,
    dense_index,
    dense_segment_bytes,
    menu_max_ratio,
    overhead_bytes,
    restrict_menu,
)


@pytest.mark.parametrize("s, d", [(16, 64), (32, 64), (64, 64), (64, 128), (256, 128)])
def test_default_menu_contents(s, d):
    """Dense first; m in {S, 3S/4, S/2, S/4, S/8}; k in {d/2, d/4, d/8}; lowrank only where r < min(m, d) and it
    saves payload; K and V forms vary independently; no duplicates."""
    menu = default_menu(s, d)
    assert menu[0] == Candidate(s)
    assert len(set(menu)) == len(menu)
    assert {c.m for c in menu} == {s, 3 * s // 4, s // 2, s // 4, max(1, s // 8)}
    assert {c.k_param for c in menu if c.k_form == fmt.FORM_CHAN} == {d // 2, d // 4, d // 8}
    for c in menu:
        for form, p in ((c.k_form, c.k_param), (c.v_form, c.v_param)):
            if form == fmt.FORM_LOWRANK:
                assert p < min(c.m, d) and fmt.payload_elems(form, p, c.m, d) < c.m * d
    assert any(c.k_form != c.v_form for c in menu)
    assert all(c.bytes(d) <= menu[0].bytes(d) for c in menu)
    assert not any(fmt.FORM_LOWRANK in (c.k_form, c.v_form) for c in default_menu(s, d, lowrank=False))


def test_bytes_follow_the_format():
    """Candidate bytes = 128 * (K granules + V granules) + descriptor (32 B) + bounds (4 d B)."""
    d = 128
    c = Candidate(48, fmt.FORM_CHAN, 32, fmt.FORM_LOWRANK, 16)
    kg = -(-(48 * d // 16 + 48 * 32) // 64)
    vg = -(-(48 * 16 + 16 * d) // 64)
    assert c.bytes(d) == 128 * (kg + vg) + 32 + 4 * d == 128 * (kg + vg) + overhead_bytes(d)
    assert Candidate(64).bytes(d) == dense_segment_bytes(64, d) == 2 * 64 * d * 2 + 32 + 4 * d


@pytest.mark.parametrize("s, d", [(32, 64), (64, 128)])
def test_candidate_strategies_agree_on_bytes(s, d):
    """The K and V strategies of a candidate have the candidate's rows and forms."""
    for c in default_menu(s, d):
        ks, vs = c.strategies(s, d)
        assert (ks.rows(s), ks.form, ks.param) == (c.m, c.k_form, c.k_param)
        assert (vs.rows(s), vs.form, vs.param) == (c.m, c.v_form, c.v_param)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"m": 0}, "m: expected >= 1"),
        ({"m": 8, "k_form": 7}, "k_form: expected one of"),
        ({"m": 8, "v_form": fmt.FORM_DENSE, "v_param": 3}, "v_param: expected 0"),
        ({"m": 8, "k_form": fmt.FORM_CHAN, "k_param": 0}, "k_param: expected >= 1"),
    ],
)
def test_candidate_checks(kwargs, match):
    """Candidate refuses unknown forms and out-of-range parameters, naming the field."""
    with pytest.raises(ValueError, match=match):
        Candidate(**kwargs)


def test_default_menu_checks_shape():
    """default_menu validates S (power of two in [16, 256]) and d (multiple of 32)."""
    with pytest.raises(ValueError, match="segment_size: expected a power of two"):
        default_menu(48, 64)
    with pytest.raises(ValueError, match="head_dim: expected a multiple of 32"):
        default_menu(64, 80)


@pytest.mark.parametrize("seg_size, head_dim", [(16, 64), (64, 128)])
def test_restricted_menus_keep_one_axis_each(seg_size, head_dim):
    """--mosaic-axes: 'token' keeps the candidates with both sides dense (tokens dropped only), 'channel' those that
    keep every token with no low-rank side (channels pruned only); 'both' is the menu itself. Each single-axis menu
    keeps the dense candidate first and reaches a lower ratio than the 2-D menu."""
    full = default_menu(seg_size, head_dim, lowrank=True)
    token = restrict_menu(full, "token", seg_size)
    channel = restrict_menu(full, "channel", seg_size)
    assert restrict_menu(full, "both", seg_size) == full
    assert token[0] == channel[0] == Candidate(seg_size)
    assert all(c.k_form == c.v_form == fmt.FORM_DENSE for c in token)
    assert sorted({c.m for c in token}) == sorted({c.m for c in full})  # every token count of the menu
    assert all(c.m == seg_size and fmt.FORM_LOWRANK not in (c.k_form, c.v_form) for c in channel)
    assert {c.k_form for c in channel} == {fmt.FORM_DENSE, fmt.FORM_CHAN}
    assert set(token) | set(channel) < set(full) and set(token) & set(channel) == {Candidate(seg_size)}
    fast = default_menu(seg_size, head_dim, lowrank=False)
    both_reach = menu_max_ratio(fast, seg_size, head_dim)
    for axes in ("token", "channel"):
        reach = menu_max_ratio(restrict_menu(fast, axes, seg_size), seg_size, head_dim)
        assert 2.0 < reach < both_reach
    with pytest.raises(ValueError, match=r"axes: expected one of \('both', 'token', 'channel'\), got 'tokens'"):
        restrict_menu(full, "tokens", seg_size)
    with pytest.raises(ValueError, match="menu: expected at least one candidate, got none"):
        menu_max_ratio((), seg_size, head_dim)


def test_dense_index_finds_the_dense_candidate_by_its_fields():
    menu = default_menu(64, 128)
    i = dense_index(menu, 64)
    assert menu[i] == Candidate(64) and list(menu).index(Candidate(64)) == i
    assert dense_index(tuple(reversed(menu)), 64) == len(menu) - 1 - i
    with pytest.raises(ValueError, match="menu: expected the dense candidate of 64 tokens, got none"):
        dense_index([c for c in menu if c != Candidate(64)], 64)
