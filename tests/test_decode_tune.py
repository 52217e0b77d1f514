# SPDX-License-Identifier: Apache-2.0
"""The startup choice of the sparse decode's chan mode and register cap: every candidate decodes a chan-compressed
batch to the same output bit for bit (so the choice cannot change an answer), the fastest becomes the kernel's default,
a candidate with another output or an error is dropped; ``MOSAICKV_DECODE_TUNE=0`` turns the timing off and a variant
named there is fixed without it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mosaickv_sglang import decode_tune as T
from mosaickv_sglang.kernels import sparse_decode as sd
from mosaickv_sglang.kernels.format import FORM_CHAN, K_FORM, V_FORM
from mosaickv_sglang.kernels.reference import ref_sparse_decode
from mosaickv_sglang.warmup import WarmupShape

SHAPE = WarmupShape(num_kv_heads=2, group=4, head_dim=64, seg_size=16, dtype=torch.float16, q_dtype=torch.float16,
                    num_layers=2, num_sms=4, read_budget_segments=0)  # fmt: skip


@pytest.fixture(autouse=True)
def keep_defaults(monkeypatch):
    monkeypatch.setattr(sd, "CHAN_MODE", sd.CHAN_PTR_GATHER)
    monkeypatch.setattr(sd, "MAXNREG", None)


@pytest.fixture(scope="module")
def batch():
    return T.DecodeBatch(SHAPE, torch.device("cpu"), batch=2, segments=3, tail=5)


def test_the_timed_batch_is_chan_compressed_and_decodes_as_the_reference(batch):
    assert (batch.desc[:, K_FORM] == FORM_CHAN).all() and (batch.desc[:, V_FORM] == FORM_CHAN).all()
    got = batch.run((sd.CHAN_PTR_GATHER, None)).double()
    ref = ref_sparse_decode(batch.q, batch.arena, batch.desc, batch.sel, batch.k_buf, batch.v_buf, batch.tail_indptr,
                            batch.tail_indices)  # fmt: skip
    torch.testing.assert_close(got, ref, atol=3e-3, rtol=3e-3)


def test_every_candidate_gives_the_same_output_and_gets_a_time(batch):
    times = T.time_decode_variants(batch, repeats=1, launches=1)
    assert set(times) == set(T.CANDIDATES) and all(t > 0 for t in times.values())
    assert sd.CHAN_WORD_BLOCKS not in {v[0] for v in T.CANDIDATES}  # it rounds differently


def test_a_candidate_with_another_output_or_an_error_is_dropped(batch, monkeypatch):
    real = batch.run

    def run(v):
        if v[0] == sd.CHAN_POPCOUNT and v[1] is None:
            raise RuntimeError("cannot compile")
        out = real(v)
        return out + 1 if v[0] == sd.CHAN_TL_GATHER else out

    monkeypatch.setattr(batch, "run", run)
    times = T.time_decode_variants(batch, repeats=1, launches=1)
    assert set(times) == set(T.CANDIDATES) - {(sd.CHAN_TL_GATHER, None), (sd.CHAN_POPCOUNT, None)}


def test_the_fastest_becomes_the_kernel_default():
    timings = {(sd.CHAN_PTR_GATHER, None): 3e-4, (sd.CHAN_POPCOUNT, 168): 1e-4, (sd.CHAN_ROW_COMPACT, None): 2e-4}
    assert T.select_decode_variant(SHAPE, torch.device("cpu"), timings) == (sd.CHAN_POPCOUNT, 168)
    assert (sd.CHAN_MODE, sd.MAXNREG) == (sd.CHAN_POPCOUNT, 168)
    assert sd.resolve_chan_mode(None) == sd.CHAN_POPCOUNT  # read at the call, not at import
    assert T.select_decode_variant(SHAPE, torch.device("cpu"), {}) == (sd.CHAN_POPCOUNT, 168)  # no timing: unchanged


def test_the_environment_turns_the_timing_off(monkeypatch):
    assert T.tune_enabled()
    monkeypatch.setenv(T.ENV_VAR, "0")
    assert not T.tune_enabled()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_dim, dtype", [(128, torch.bfloat16), (64, torch.float16)])
def test_every_candidate_gives_the_same_output_on_the_gpu(head_dim, dtype):
    """Compiled for the GPU, every candidate's output is bit for bit the first's (none dropped), so the startup
    choice cannot change an answer; the chosen variant is one of them."""
    shape = WarmupShape(num_kv_heads=8, group=4, head_dim=head_dim, seg_size=64, dtype=dtype, q_dtype=dtype,
                        num_layers=32, num_sms=torch.cuda.get_device_properties(0).multi_processor_count,
                        read_budget_segments=64)  # fmt: skip
    times = T.time_decode_variants(T.DecodeBatch(shape, torch.device("cuda")), repeats=2, launches=5)
    assert set(times) == set(T.CANDIDATES), times
    assert T.select_decode_variant(shape, torch.device("cuda"), times) in T.CANDIDATES


def test_the_environment_can_fix_a_variant_without_timing(monkeypatch):
    """``MODE`` or ``MODE/CAP`` of a candidate is made the default and logged, nothing timed; ``0`` keeps the defaults
    untimed; anything else is refused with the accepted spellings."""
    monkeypatch.setattr(sd, "CHAN_MODE", sd.CHAN_PTR_GATHER)
    monkeypatch.setattr(sd, "MAXNREG", None)
    monkeypatch.setattr(T, "select_decode_variant", lambda *a: pytest.fail("timed a fixed variant"))
    for raw, want in ((" Popcount ", (sd.CHAN_POPCOUNT, None)), ("ptr-gather/168", (sd.CHAN_PTR_GATHER, 168))):
        monkeypatch.setenv(T.ENV_VAR, raw)
        assert not T.tune_enabled() and T.fixed_variant() == want
        assert T.configure_decode_variant(SHAPE, torch.device("cpu")) == want
        assert (sd.CHAN_MODE, sd.MAXNREG) == want
    monkeypatch.setenv(T.ENV_VAR, "0")
    assert T.fixed_variant() is None and T.configure_decode_variant(SHAPE, torch.device("cpu")) is None
    assert (sd.CHAN_MODE, sd.MAXNREG) == (sd.CHAN_PTR_GATHER, 168)  # left as it was
    for bad in ("popcount/200", "word-blocks", "fast"):
        monkeypatch.setenv(T.ENV_VAR, bad)
        with pytest.raises(ValueError, match=r"MOSAICKV_DECODE_TUNE: expected 1 or auto .* popcount/168, got"):
            T.fixed_variant()


def test_unset_or_auto_times_the_candidates(monkeypatch):
    timed = []
    monkeypatch.setattr(T, "select_decode_variant", lambda shape, device: timed.append(device) or (1, None))
    for raw in (None, "auto", "1"):
        if raw is None:
            monkeypatch.delenv(T.ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(T.ENV_VAR, raw)
        assert T.configure_decode_variant(SHAPE, torch.device("cpu")) == (1, None)
    assert len(timed) == 3


def test_the_backend_stops_on_a_bad_value_and_logs_a_timing_failure(monkeypatch, caplog):
    """At start-up a misspelt ``MOSAICKV_DECODE_TUNE`` raises (not taken for a failed timing); a timing that fails
    is logged and the defaults serve."""
    from mosaickv_sglang import attention_backend as ab

    monkeypatch.setattr(ab, "backend_shape", lambda backend, dtype: SHAPE)
    backend = SimpleNamespace(device=torch.device("cpu"))
    monkeypatch.setenv(T.ENV_VAR, "popcnt")
    with pytest.raises(ValueError, match="MOSAICKV_DECODE_TUNE"):
        ab.MosaicAttnBackend._tune_decode(backend, None)
    monkeypatch.setenv(T.ENV_VAR, "1")
    monkeypatch.setattr(T, "select_decode_variant", lambda *a: 1 / 0)
    ab.MosaicAttnBackend._tune_decode(backend, None)
    assert "timing the sparse decode variants failed" in caplog.text
