"""The layout's import rules (issue 31): each package's `__init__` docstring says what it may import, in a line
`May import: a, b.`; every import in the package (at any depth, lazy ones included) keeps to it, and the
packages' allowed imports form no cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
TOPS = ("workers", "orchestrator")


def _packages() -> dict[str, set[str]]:
    """Each package (dotted) → the packages or root modules it may import, read from its docstring."""
    out = {}
    for init in sorted(p for top in TOPS for p in (ROOT / top).rglob("__init__.py")):
        name = ".".join(init.parent.relative_to(ROOT).parts)
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        found = re.search(r"^May import: (.*)\.$", doc, re.M)
        if name.count(".") <= 1:  # a package of the layout (families is a part of models)
            assert found, f"{init.relative_to(ROOT)}: its docstring has no 'May import:' line"
            out[name] = {m.strip() for m in found.group(1).split(",")} - {"none"}
    return out


def _owner(module: str, packages: dict[str, set[str]]) -> str:
    """The layout unit a dotted module belongs to: its package, or itself for a root module."""
    parts = module.split(".")
    if len(parts) >= 2 and ".".join(parts[:2]) in packages:
        return ".".join(parts[:2])
    return module if len(parts) == 2 else parts[0]


def _imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
            mods |= {f"{node.module}.{a.name}" for a in node.names}  # `from workers.data import synth`
    return {m for m in mods if m.split(".")[0] in TOPS}


def _allowed(unit: str, target: str, packages: dict[str, set[str]]) -> bool:
    """Whether the layout unit `unit` may import the dotted module `target`."""
    if unit.split(".")[0] == "workers" and target.split(".")[0] == "orchestrator":
        return False
    if target == unit or target.startswith(unit + "."):
        return True
    owner = _owner(target, packages)
    if unit not in packages and owner not in packages and owner.split(".")[0] == unit.split(".")[0]:
        return True  # root modules of one top (cli, plan, bases) may use each other
    rules = packages[unit] if unit in packages else packages[unit.split(".")[0]]
    return any(target == r or target.startswith(r + ".") for r in rules)


def test_every_import_keeps_to_its_package_rules():
    packages = _packages()
    broken = []
    for top in TOPS:
        for path in sorted((ROOT / top).rglob("*.py")):
            module = ".".join(path.with_suffix("").relative_to(ROOT).parts).removesuffix(".__init__")
            unit = _owner(module, packages)
            for target in _imports(path):
                if target in packages or _owner(target, packages) == target.split(".")[0]:
                    continue  # a bare package name (its __init__ is docstring only), not a module of it
                if not _allowed(unit, target, packages):
                    broken.append(f"{path.relative_to(ROOT)} ({unit}) imports {target}")
    assert not broken, "imports against the layout's rules:\n" + "\n".join(broken)


def test_packages_allowed_imports_have_no_cycle():
    packages = _packages()
    edges = {p: {r for r in rules if r in packages and r != p} for p, rules in packages.items()}
    done, stack = set(), []

    def visit(p: str) -> None:
        assert p not in stack, "cycle: " + " → ".join(stack[stack.index(p):] + [p])
        if p in done:
            return
        stack.append(p)
        for q in sorted(edges[p]):
            visit(q)
        stack.pop()
        done.add(p)

    for p in sorted(edges):
        visit(p)


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: an import from workers.data of workers.training is against the rules."""
    packages = _packages()
    assert not _allowed("workers.data", "workers.training.loop", packages)
    assert not _allowed("workers.models", "orchestrator.run.stages", packages)
    assert _allowed("workers.training", "workers.models.prompts", packages)
    assert _allowed("orchestrator.run", "orchestrator.report.console", packages)
    assert not _allowed("orchestrator.report", "orchestrator.run.pipeline", packages)
