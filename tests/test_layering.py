# SPDX-License-Identifier: Apache-2.0
"""Import direction (style rule R1): kernels/ needs only torch and triton; only patches/ hooks SGLang."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STDLIB_OK = {
    "__future__", "collections", "dataclasses", "enum", "functools", "importlib", "logging", "math", "os", "pathlib",
    "sys", "typing",
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def py_files(folder: str) -> list[Path]:
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, folder
    return files


def test_kernels_import_only_torch_and_triton():
    """kernels/ never imports sglang or the rest of mosaickv_sglang."""
    for path in py_files("kernels"):
        for name in imported_modules(path):
            root = name.split(".")[0]
            allowed = root in {"torch", "triton", "numpy"} | STDLIB_OK or name.startswith("mosaickv_sglang.kernels")
            assert allowed, f"{path.relative_to(REPO)} imports {name}"


def test_only_patches_touch_the_hook_registry_and_private_attrs():
    """HookRegistry and the config attribute on ServerArgs are used in patches/ only."""
    for folder in ("mosaickv_sglang", "kernels", "bench"):
        if not (REPO / folder).exists():
            continue
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            rel = path.relative_to(REPO)
            assert "hook_registry" not in text and "HookRegistry" not in text, f"{rel} uses the HookRegistry"
            assert "_mosaic_config" not in text, f"{rel} reads the private config attribute"


def test_every_python_file_has_spdx_header():
    """Every .py file starts with the SPDX licence line."""
    for folder in ("mosaickv_sglang", "kernels", "patches", "tests", "bench"):
        if not (REPO / folder).exists():
            continue
        for path in (REPO / folder).rglob("*.py"):
            first = path.read_text().splitlines()[:1]
            assert first == ["# SPDX-License-Identifier: Apache-2.0"], path.relative_to(REPO)


def test_every_package_is_in_the_wheel():
    """pyproject lists every folder with an __init__.py under its packaged name, so the wheel misses none."""
    import tomllib

    setuptools_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {folder: name for name, folder in setuptools_cfg["package-dir"].items()}
    found = set()
    for folder, name in roots.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([name, *rel.parts]))
    assert found == set(setuptools_cfg["packages"])
