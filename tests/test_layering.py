"""Dependencies point one way: the ONNX passes need onnx-ir and SubFit's shared vocabulary, and nothing reaches up.

Read from the source with ``ast`` (function-level imports included), so a new upward import fails here before it
turns into an import cycle or drags torch into the rewrite.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# where each package's source lives (pyproject's package-dir maps passes/ and exporters/ under subfit_onnx)
PACKAGES = {"subfit_onnx": REPO / "subfit_onnx", "subfit_onnx.passes": REPO / "passes",
            "subfit_onnx.exporters": REPO / "exporters"}
# what every layer may use: names, types and tables with no behaviour of their own
# gated_ffn: the activations a bypass with kept FFN neurons computes, which the bypass and the ONNX pass both need
VOCABULARY = {"subfit_onnx.architectures", "subfit_onnx.bypass", "subfit_onnx.errors", "subfit_onnx.gated_ffn",
              "subfit_onnx.names"}


def modules(package: str) -> dict[str, Path]:
    root = PACKAGES[package]
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((package, *parts))] = path
    return found


def imports(module: str, path: Path) -> set[str]:
    """Absolute names of every module ``module`` imports (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import x` imports a module
    return names


def first_party(names: set[str]) -> set[str]:
    return {n for n in names if n == "subfit_onnx" or n.startswith("subfit_onnx.")}


def known_module(name: str) -> bool:
    return name in {m for p in PACKAGES for m in modules(p)}


def test_the_import_reader_resolves_relative_imports():
    found = imports("subfit_onnx.passes.bypass", PACKAGES["subfit_onnx.passes"] / "bypass.py")
    assert "subfit_onnx.bypass" in found and "onnx_ir" in found and "subfit_onnx.passes.structure" in found


@pytest.mark.parametrize("module,path", sorted(modules("subfit_onnx.passes").items()))
def test_passes_use_onnx_ir_and_the_vocabulary_only(module, path):
    mine = imports(module, path)
    upward = {n for n in first_party(mine) if known_module(n)} - VOCABULARY
    upward = {n for n in upward if not n.startswith("subfit_onnx.passes")}
    assert not upward, f"{module} imports {sorted(upward)}"
    third_party = {n.split(".")[0] for n in mine - first_party(mine)} - set(sys.stdlib_module_names)
    assert third_party <= {"onnx_ir", "numpy", "__future__"}, third_party


@pytest.mark.parametrize("module", sorted(VOCABULARY))
def test_the_vocabulary_depends_on_nothing_else_of_subfit(module):
    path = modules("subfit_onnx")[module]
    assert {n for n in first_party(imports(module, path)) if known_module(n)} <= VOCABULARY


@pytest.mark.parametrize("module,path", sorted((m, p) for m, p in modules("subfit_onnx").items()
                                                if m.startswith("subfit_onnx.calibration")))
def test_calibration_does_not_import_the_exporters(module, path):
    assert not {n for n in imports(module, path) if n.startswith("subfit_onnx.exporters")}


@pytest.mark.parametrize("module", ["subfit_onnx.plan", "subfit_onnx.config", "subfit_onnx.identity",
                                    "subfit_onnx.model_config"])
def test_the_plan_and_settings_do_not_import_calibration(module):
    """The plan is the bridge between calibration and the rewrite; it must not need either side's code."""
    path = modules("subfit_onnx")[module]
    assert not {n for n in imports(module, path) if n.startswith(("subfit_onnx.calibration", "subfit_onnx.passes"))}
