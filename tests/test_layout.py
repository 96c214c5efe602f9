"""The code's layout rules, checked: no import cycles inside vmctl/, no module using another's
private names, the Sandbox class a thin facade, and everything the README shows importable from
the package root."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import vmctl

PACKAGE = Path(vmctl.__file__).parent
README = PACKAGE.parent / "README.md"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
            found |= subs or ({node.module} & set(modules))
    return found - {name}


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    graph["vmctl"] = set()  # the package root re-exports; it is imported by nobody inside
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == [], f"import cycles: {cycles}"


def test_no_module_uses_another_modules_private_names() -> None:
    """``x._name`` is fine on ``self``/``cls`` and on names the same module defines; a private name
    of another module (imported, or reached through an attribute) is not."""
    offences = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        own = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
        own |= {t.attr for n in ast.walk(tree) if isinstance(n, ast.Assign | ast.AnnAssign)
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Attribute)}  # fmt: skip
        own |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vmctl"):
                offences += [f"{name}: imports {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.Attribute) and re.fullmatch(r"_[a-z]\w*", node.attr):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    continue
                if node.attr not in own:
                    offences.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert offences == []


def test_sandbox_is_a_thin_facade() -> None:
    tree = ast.parse((PACKAGE / "sandbox.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Sandbox")
    assert cls.end_lineno is not None and cls.end_lineno - cls.lineno + 1 <= 400


def test_everything_the_readme_imports_is_importable() -> None:
    names = set()
    for match in re.finditer(r"^\s*from (vmctl[\w.]*) import ([\w, ()]+)", README.read_text(), re.MULTILINE):
        module = __import__(match.group(1), fromlist=["_"])
        for item in match.group(2).replace("(", "").replace(")", "").split(","):
            item = item.strip()
            if item:
                assert hasattr(module, item), f"README: from {match.group(1)} import {item}"
                if match.group(1) == "vmctl":
                    names.add(item)
    for item in ("Fleet", "Sandbox", "SandboxConfig", "BlockDevice", "HotplugError", "InvalidArgument", "FleetError"):
        assert item in vmctl.__all__ and hasattr(vmctl, item), item
