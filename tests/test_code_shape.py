"""Code-shape rules of issue 14: no long functions in the product, each paper part one named function, and the
GPU bench measures the product's own classes (it defines no model, teacher or loss of its own)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
MAX_LINES = 60


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_no_function_over_sixty_lines_outside_bench_and_tests():
    long = [f"{p.relative_to(ROOT)}:{name} ({n} lines)"
            for p in sorted(ROOT.glob("*/**/*.py")) if p.relative_to(ROOT).parts[0] in ("workers", "orchestrator")
            for name, n in _functions(p)
            if n > MAX_LINES]
    assert not long, "functions over 60 lines: " + ", ".join(long)


def test_method_page_paper_parts_point_to_functions_that_exist():
    """Every `module:function` (or `module:Class`) in the paper-part table of docs/method.md exists, and so does
    the test."""
    text = (ROOT / "docs" / "method.md").read_text()
    table = text[text.index("| Paper part"):]
    table = table[:table.index("\n\n")]
    refs = re.findall(r"`((?:workers|orchestrator)\.[a-z_.]+):([A-Za-z_]+)`", table)
    tests = re.findall(r"`(tests/test_[a-z_]+\.py)(?:::([a-z_]+))?`", table)
    assert len(refs) >= 6 and len(tests) >= 4
    import importlib

    for module, name in refs:
        assert hasattr(importlib.import_module(module), name), f"{module}:{name}"
    for path, name in tests:
        assert (ROOT / path).is_file(), path
        if name:
            assert f"def {name}(" in (ROOT / path).read_text(), f"{path}::{name}"


@pytest.mark.parametrize("kind", ["Module", "Teacher", "Loss", "Pool"])
def test_gpu_bench_defines_no_model_teacher_or_loss_of_its_own(kind):
    tree = ast.parse((ROOT / "bench" / "gpu.py").read_text())
    classes = [n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    assert not [c for c in classes if kind.lower() in c.lower()], classes
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                for b in n.bases if ast.unparse(b).endswith(("nn.Module", "Module"))]
