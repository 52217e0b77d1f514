# SPDX-License-Identifier: Apache-2.0
"""CallProfile (``MOSAICKV_PROFILE``): disabled by default, per-kind profiles of the scheduler's calls written every
``dump_every`` calls, nested sections counted once, write errors logged; the attention backend's plans profiled."""

import logging
import os
import pstats

import pytest

from mosaickv_sglang.call_profile import ENV_VAR, CallProfile


def _work_named_for_the_profile(n: int) -> int:
    return sum(i * i for i in range(n))


def test_disabled_by_default_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    prof = CallProfile.from_env()
    assert not prof.enabled
    for _ in range(3):
        with prof.section("decode"):
            _work_named_for_the_profile(100)
    prof.dump()
    assert prof.calls == {} and list(tmp_path.iterdir()) == []


def test_each_kind_is_written_every_dump_every_calls(tmp_path):
    prefix = str(tmp_path / "prof")
    prof = CallProfile(prefix, dump_every=2)
    with prof.section("decode"):
        _work_named_for_the_profile(1000)
    assert not os.path.exists(prefix + ".decode")  # not yet: one call of two
    with prof.section("decode"):
        with prof.section("extend"):  # nested: counted in the outer call only
            _work_named_for_the_profile(1000)
    text = open(prefix + ".decode").read()
    assert "kind decode: 2 profiled" in text and "_work_named_for_the_profile" in text
    assert prof.calls == {"decode": 2} and not os.path.exists(prefix + ".extend")
    with prof.section("extend"):
        _work_named_for_the_profile(10)
    prof.dump()
    assert "kind extend: 1 profiled" in open(prefix + ".extend").read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prof.decode", "prof.decode.prof", "prof.extend",
                                                          "prof.extend.prof"]  # no .tmp left behind
    # who calls the functions of most own time, and the whole profile for pstats
    assert "was called by..." in text
    whole = pstats.Stats(prefix + ".decode.prof")
    assert any(name == "_work_named_for_the_profile" for _, _, name in whole.stats)


def test_tensor_parallel_ranks_write_their_own_files(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "p"))
    assert CallProfile.from_env(tp_rank=1, tp_size=2).path == str(tmp_path / "p.tp1")
    assert CallProfile.from_env(tp_rank=0, tp_size=1).path == str(tmp_path / "p")
    monkeypatch.setenv(ENV_VAR, "  ")
    assert not CallProfile.from_env().enabled


def test_a_write_error_is_logged_not_raised(tmp_path, caplog):
    prof = CallProfile(str(tmp_path / "missing-dir" / "p"), dump_every=1)
    with caplog.at_level(logging.WARNING, logger="mosaickv_sglang.call_profile"):
        with prof.section("decode"):
            _work_named_for_the_profile(10)
    assert "could not write the host-call profile" in caplog.text
    assert prof.calls == {"decode": 1}


def test_an_exception_in_the_body_still_counts_and_stops_the_profiler(tmp_path):
    prof = CallProfile(str(tmp_path / "p"), dump_every=1)
    with pytest.raises(RuntimeError):
        with prof.section("decode"):
            raise RuntimeError("boom")
    with prof.section("decode"):  # a profiler left enabled would refuse to be enabled again in another section
        _work_named_for_the_profile(10)
    assert prof.calls == {"decode": 2}


def test_bad_dump_every_is_refused():
    with pytest.raises(ValueError, match="dump_every: expected an integer >= 1, got 0"):
        CallProfile("x", dump_every=0)


def test_another_active_profiler_stops_profiling_instead_of_failing(tmp_path, monkeypatch, caplog):
    """If the interpreter's profiling hooks are taken (``enable`` raises ``ValueError`` on Python 3.12+), the body
    still runs, a warning names the variable, and later sections do nothing."""
    prof = CallProfile(str(tmp_path / "p"), dump_every=1)

    class Taken:
        def enable(self):
            raise ValueError("Another profiling tool is already active")

    prof._profilers["decode"] = Taken()
    ran = []
    with caplog.at_level(logging.WARNING, logger="mosaickv_sglang.call_profile"):
        with prof.section("decode"):
            ran.append(1)
    assert ran == [1] and "MOSAICKV_PROFILE profiling stopped" in caplog.text and not prof.enabled
    with prof.section("decode"):
        ran.append(2)
    assert ran == [1, 2] and list(tmp_path.iterdir()) == []
