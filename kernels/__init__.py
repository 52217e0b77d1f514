# SPDX-License-Identifier: Apache-2.0
"""MosaicKV Triton kernels and their torch references, shipped as ``mosaickv_sglang.kernels``.

This folder sits at the repository root, so a ``python -m ...`` started there finds it as a top-level
``kernels`` ahead of the Hugging Face ``kernels`` package that SGLang imports (its FA3 backend does
``from kernels import get_kernel``). When that happens this module hands the name back to the installed
package, or to nothing, so that SGLang never sees our folder under the wrong name.
"""

if __name__ == "kernels":
    import importlib.util
    import sys
    from importlib.machinery import PathFinder
    from pathlib import Path

    _ours = Path(__file__).resolve().parent
    _elsewhere = [p for p in sys.path if (Path(p or ".").resolve() / "kernels") != _ours]
    _spec = PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _real = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _real
    _spec.loader.exec_module(_real)
