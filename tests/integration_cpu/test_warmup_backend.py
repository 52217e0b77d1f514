# SPDX-License-Identifier: Apache-2.0
"""Warmup at backend construction: skipped on the CPU; on the CPU interpreter, every Triton specialization key the
real backend launches while serving (extend, sealing, decode) is one the warmup runner launches; on a GPU, the
backend compiles at construction and logs it."""

from __future__ import annotations

import collections
import itertools
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helper modules (importlib import mode)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mkv_compile_keys, shared with ../test_warmup.py

from mkv_backend_cases import Scenario, config  # noqa: E402
from mkv_compile_keys import Recorder  # noqa: E402

import mosaickv_sglang.attention_backend as ab  # noqa: E402
from mosaickv_sglang import warmup  # noqa: E402
from mosaickv_sglang.kernels import extend, pack, segment_scores, sparse_decode, unpack  # noqa: E402

KERNELS = [(sparse_decode, "_sparse_decode_split_kernel"), (sparse_decode, "_sparse_decode_merge_kernel"),
           (segment_scores, "_segment_scores_main_kernel"), (segment_scores, "_segment_select_kernel"),
           (extend, "_extend_attn_main_kernel"),
           (unpack, "_unpack_segments_main_kernel"), (pack, "_pack_segments_main_kernel")]  # fmt: skip


@pytest.fixture
def record(monkeypatch):
    keys = set()
    for mod, name in KERNELS:
        monkeypatch.setattr(mod, name, Recorder(name, getattr(mod, name), keys))
    return keys


@pytest.mark.parametrize("budget", [0, pytest.param(32, marks=pytest.mark.slow)], ids=["read-all", "budget-2-segs"])
def test_warmup_launches_every_key_serving_launches(record, budget):
    sc = Scenario(config(read_budget=budget), group=2, seed=3, auto_seal=True)
    sc.run_mosaic(sc.extend_batch([1, 16, 37, 80]))
    for _ in range(10):
        sc.run_mosaic(sc.decode_batch())
    sc.run_mosaic(sc.extend_batch([5, 40, 1, 17]))
    for _ in range(3):
        sc.run_mosaic(sc.decode_batch())
    served = set(record)
    assert {k[0] for k in served} == {name for _, name in KERNELS}
    record.clear()
    shape = warmup.backend_shape(sc.mosaic)
    warmup.run_warmup(warmup.enumerate_variants(shape), shape, "cpu")
    missing = served - record
    assert not missing, f"served but not warmed: {sorted(missing)[:3]}"


def test_table_widths_and_split_counts_do_not_change_the_compile_keys(record):
    """The decode kernels launched with many selection widths, segment-table widths and split counts compile one
    variant each (the split kernel two: one split or several; the merge kernel one per split count)."""
    shape = warmup.WarmupShape(num_kv_heads=3, group=2, head_dim=64, seg_size=16, dtype=torch.float16,
                               q_dtype=torch.float16, num_layers=2, num_sms=132, read_budget_segments=0)  # fmt: skip
    inp = warmup._Inputs(shape, torch.device("cpu"))
    for width, splits in itertools.product((1, 2, 3, 16, 17, 32, 48), (1, 2, 4, 16)):
        for kernel in ("score_and_select", "extend", "sparse_decode_split"):
            warmup._run_one(inp, warmup.VariantSpec(kernel, num_splits=splits, width=width))
    decode = ("_segment_scores_main_kernel", "_segment_select_kernel", "_extend_attn_main_kernel",
              "_sparse_decode_split_kernel", "_sparse_decode_merge_kernel")  # fmt: skip
    count = collections.Counter(k[0] for k in record if k[0] in decode)
    assert count == {"_segment_scores_main_kernel": 1, "_segment_select_kernel": 1, "_extend_attn_main_kernel": 1,
                     "_sparse_decode_split_kernel": 2, "_sparse_decode_merge_kernel": 3}  # fmt: skip


def test_factor_ranks_do_not_change_the_pack_compile_key(record):
    """Plans with low-rank factors of any width (below, at and above R_PAD = min(S, d)) on K, V or both pack with one
    compiled variant, plus the one without factors."""
    shape = warmup.WarmupShape(num_kv_heads=4, group=2, head_dim=64, seg_size=32, dtype=torch.float16,
                               q_dtype=torch.float16, num_layers=2, num_sms=132, read_budget_segments=0)  # fmt: skip
    inp = warmup._Inputs(shape, torch.device("cpu"))
    for k_rank, v_rank in itertools.product((0, 1, 8, 12, 16, 32, 48), repeat=2):
        inp.pack(warmup._lowrank_plan(inp, k_rank, v_rank))
    keys = [k for k in record if k[0] == "_pack_segments_main_kernel"]
    assert sorted(dict(k[2])["HAS_FACTORS"] for k in keys) == ["False", "True"]


def test_backend_construction_on_cpu_does_not_warm_up(monkeypatch):
    monkeypatch.setattr(ab, "run_warmup", lambda *a, **k: pytest.fail("warmup ran on the CPU"))
    sc = Scenario(config(), group=2, seed=0)
    assert sc.mosaic.device.type == "cpu"


def test_a_failing_warmup_is_logged_and_serving_goes_on(monkeypatch, caplog):
    """The warmup is an optimisation: if it raises, the error is logged with its traceback and the backend serves
    (its kernels then compile on first use)."""
    sc = Scenario(config(), group=2, seed=0)

    def broken(*args, **kwargs):
        raise RuntimeError("no such variant")

    monkeypatch.setattr(ab, "run_warmup", broken)
    with caplog.at_level(logging.INFO, logger=ab.logger.name):
        sc.mosaic._warmup(None)
    failed = [r for r in caplog.records if "kernel warmup failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None and "no such variant" in str(failed[0].exc_info[1])
    assert not [r for r in caplog.records if r.getMessage().startswith("MosaicKV: compiled")]


def test_the_seal_graphs_captured_before_serving_are_logged_and_a_failure_is_not_fatal(monkeypatch, caplog):
    """The backend's warm-up captures the seal graphs ahead (``Sealer.capture_seal_graphs_ahead``) and logs how many;
    if that raises, the error is logged with its traceback and the backend serves (graphs captured at first seals)."""
    sc = Scenario(config(), group=2, seed=0)
    calls = []
    monkeypatch.setattr(sc.mosaic.sealer, "capture_seal_graphs_ahead", lambda: calls.append(1) or 12)
    with caplog.at_level(logging.INFO, logger=ab.logger.name):
        sc.mosaic._capture_seal_graphs()
    assert calls == [1] and [r for r in caplog.records if "captured 12 seal graphs before serving" in r.getMessage()]

    def broken():
        raise RuntimeError("out of memory")

    caplog.clear()
    monkeypatch.setattr(sc.mosaic.sealer, "capture_seal_graphs_ahead", broken)
    with caplog.at_level(logging.INFO, logger=ab.logger.name):
        sc.mosaic._capture_seal_graphs()
    failed = [r for r in caplog.records if "capturing the seal graphs before serving failed" in r.getMessage()]
    assert len(failed) == 1 and "out of memory" in str(failed[0].exc_info[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("env", ["1", "0"])
def test_backend_construction_on_gpu_warms_up_and_logs(monkeypatch, caplog, env):
    import test_kv_pool as tkp

    monkeypatch.setenv("MOSAICKV_WARMUP", env)
    real = tkp.build_mha_kv_pool

    def on_cuda(stub, size, cls):
        stub.device = "cuda"
        return real(stub, size, cls)

    monkeypatch.setattr(tkp, "build_mha_kv_pool", on_cuda)
    pool = tkp.build_pool(512, 384, config())
    rtp = SimpleNamespace(req_to_token=torch.zeros(8, 256, dtype=torch.int32, device="cuda"))
    with caplog.at_level(logging.INFO, logger=ab.logger.name):
        backend = ab.MosaicAttnBackend(SimpleNamespace(device="cuda", req_to_token_pool=rtp, token_to_kv_pool=pool),
                                       num_q_heads=tkp.H_KV * 2, auto_seal=False)  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MosaicKV: compiled")]
    if env == "0":
        assert not lines
        return
    n = len(warmup.enumerate_variants(warmup.backend_shape(backend)))
    assert len(lines) == 1 and lines[0].startswith(f"MosaicKV: compiled {n} kernel variants in ")
