# SPDX-License-Identifier: Apache-2.0
"""The plugin is discovered by SGLang, applies its hooks, and changes nothing when the compressor is 'none'."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import multiprocessing as mp
import os
import queue as queue_module
import subprocess
import sys
import time
from pathlib import Path

from mosaickv_sglang.config import MosaicKVConfig
from mosaickv_sglang.patches import seam

REPO = Path(__file__).resolve().parents[1]


def test_entry_point_is_discovered():
    """importlib.metadata lists exactly our entry point in SGLang's plugin group, and it loads register()."""
    eps = [ep for ep in importlib.metadata.entry_points(group="sglang.srt.plugins") if ep.name == "mosaic"]
    assert len(eps) == 1
    assert eps[0].value == "mosaickv_sglang.plugin:register"
    assert eps[0].dist is not None and eps[0].dist.name == "mosaickv-sglang"
    from mosaickv_sglang.plugin import register

    assert eps[0].load() is register


def test_kernels_ship_under_our_namespace():
    """`kernels/` is importable as mosaickv_sglang.kernels, and the distribution has no top-level `kernels`."""
    spec = importlib.util.find_spec("mosaickv_sglang.kernels")
    assert spec is not None and Path(spec.origin).parent == REPO / "kernels"
    top_level = importlib.metadata.distribution("mosaickv-sglang").read_text("top_level.txt")
    assert top_level is None or "kernels" not in top_level.split()


def test_top_level_kernels_from_repo_root_is_hugging_face():
    """Run from the repo root (as on the GPU machine), `import kernels` still gives SGLang's dependency."""
    probe = "import kernels, mosaickv_sglang.kernels as ours; print(kernels.__file__); print(ours.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    theirs, ours = out.stdout.split()
    assert not Path(theirs).is_relative_to(REPO / "kernels") and "site-packages" in theirs
    assert Path(ours) == REPO / "kernels" / "__init__.py"


def test_hooks_apply_after_load_plugins(sglang_with_plugin):
    """After SGLang's load_plugins(), every target in the seam is wrapped by our hook."""
    import pkgutil

    for target in seam.HOOK_TARGETS:
        fn = pkgutil.resolve_name(target)
        assert hasattr(fn, "__wrapped__"), f"{target} is not hooked"


def test_mosaic_attention_backend_is_registered(sglang_with_plugin):
    """register() adds 'mosaic' to --attention-backend's choices and SGLang's registry, pointing at our factory."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

    from mosaickv_sglang.plugin import create_mosaic_attention_backend

    assert ATTENTION_BACKEND_CHOICES.count("mosaic") == 1
    assert ATTENTION_BACKENDS["mosaic"] is create_mosaic_attention_backend


def test_mosaic_attention_backend_refuses_a_stock_pool(sglang_with_plugin):
    """The registered factory refuses a runner whose pool is not MosaicKV's, naming --kv-compressor."""
    import types

    import pytest

    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    runner = types.SimpleNamespace(token_to_kv_pool=object(), server_args=None)
    with pytest.raises(ValueError, match="--kv-compressor mosaic"):
        ATTENTION_BACKENDS["mosaic"](runner)


_PROBE = r"""
import json, sys
import mosaickv_sglang, mosaickv_sglang.config, mosaickv_sglang.plugin
from sglang.srt.plugins.hook_registry import HookRegistry
print(json.dumps(sorted(HookRegistry._hooks)))
"""


def test_import_has_no_side_effects():
    """Importing the package registers no hook; only register() does."""
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


_STOCK_ARGS = r"""
import dataclasses, json, sys
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.server_args import prepare_server_args
sa = prepare_server_args(sys.argv[1:])
print("FIELDS=" + json.dumps(dataclasses.asdict(sa), default=repr, sort_keys=True))
"""


def test_none_leaves_server_args_unchanged(sglang_with_plugin, cpu_args):
    """--kv-compressor none resolves every ServerArgs field exactly as SGLang without the plugin does."""
    import dataclasses

    argv = cpu_args("--kv-compressor", "none", "--random-seed", "0")  # unset, SGLang draws a random seed
    ours = sglang_with_plugin.prepare_server_args(argv)
    stock_env = {**os.environ, "SGLANG_PLUGINS": "no-such-plugin"}  # SGLang's whitelist: skip ours
    out = subprocess.run(
        [sys.executable, "-c", _STOCK_ARGS, *cpu_args("--random-seed", "0")], capture_output=True, text=True, timeout=300, env=stock_env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    stock = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("FIELDS="))[7:])
    ours_fields = json.loads(json.dumps(dataclasses.asdict(ours), default=repr, sort_keys=True))
    differing = {k: (stock[k], ours_fields.get(k)) for k in stock if stock[k] != ours_fields.get(k)}
    assert differing == {}, f"(stock, ours) of differing fields: {differing}"
    assert set(stock) == set(ours_fields)
    assert seam.config_of(ours) == MosaicKVConfig()


def test_options_reach_spawned_scheduler_process(sglang_with_plugin, cpu_args, monkeypatch):
    """Values parsed in the launcher arrive in a child spawned the way SGLang spawns its scheduler.

    SGLang forces the 'spawn' start method and passes ServerArgs to run_scheduler_process by pickling;
    the child starts from a fresh interpreter and loads the plugins itself.
    """
    server_args = sglang_with_plugin.prepare_server_args(
        cpu_args("--kv-compressor", "mosaic", "--mosaic-compression-ratio", "5", "--mosaic-segment-size", "128",
                 "--mosaic-sink-tokens", "16", "--mosaic-sidecar", "off")
    )
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])))
    import spawn_probe

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=spawn_probe.scheduler_like_child, args=(server_args, queue))
    proc.start()
    deadline = time.monotonic() + 600
    while True:
        try:
            options, hooked, child_pid = queue.get(timeout=5)
            break
        except queue_module.Empty:
            assert proc.is_alive(), f"child exited with {proc.exitcode} before reporting"
            assert time.monotonic() < deadline, "child did not report within 600 s"
    proc.join(timeout=60)
    assert proc.exitcode == 0 and child_pid != os.getpid()
    assert hooked
    assert MosaicKVConfig.from_options(options) == MosaicKVConfig("mosaic", 5.0, 128, 512, 16, 4096, False)
