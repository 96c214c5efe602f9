"""The code's layout rules, checked: every module in one layer and no import of a higher layer,
no import cycles inside vmctl/, no module using another module's private names, the Sandbox class
a thin facade, the README's layout table in step with the layers, and everything the README shows
importable from the package root."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import vmctl

PACKAGE = Path(vmctl.__file__).parent
README = PACKAGE.parent / "README.md"

#: The layers, lowest first, and the modules in each (``fnmatch`` patterns on dotted names). A
#: module may import its own layer and the ones below it, never one above. Calls go down, events
#: come up: a lower layer hears from a higher one only through callbacks and protocols it defines
#: itself (``hypervisors.base.Events``, ``hypervisors.base.AgentLink``).
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["vmctl.errors", "vmctl.params", "vmctl.devices", "vmctl.config", "vmctl.host", "vmctl.core",
              "vmctl.core.*"]),
    ("hypervisors", ["vmctl.hypervisors", "vmctl.hypervisors.*"]),
    ("owners", ["vmctl.agent", "vmctl.agent.*", "vmctl.machine", "vmctl.machine.*", "vmctl.guest", "vmctl.guest.*"]),
    ("sandbox", ["vmctl.sandbox", "vmctl.sandbox.*"]),
    ("front", ["vmctl", "vmctl.compat", "vmctl.fleets", "vmctl.fleets.*", "vmctl.cluster", "vmctl.cluster.*",
               "vmctl.cli", "vmctl.cli.*", "vmctl.testing", "vmctl.testing.*"]),
]


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


def _layer_of(module: str) -> int:
    found = [i for i, (_, patterns) in enumerate(LAYERS) if any(fnmatch.fnmatchcase(module, p) for p in patterns)]
    assert len(found) == 1, f"{module} must be in exactly one layer of LAYERS, it is in {found}"
    return found[0]


def _layer_table() -> str:
    rows = [f"{'layer':<12} modules (may import this layer and those below)"]
    for name, patterns in reversed(LAYERS):
        rows.append(f"{name:<12} {', '.join(patterns)}")
    return "\n".join(rows)


def test_no_module_imports_a_higher_layer() -> None:
    print(_layer_table())  # shown with ``pytest -s``: the table this test checks
    modules = _modules()
    upward = []
    for name, path in sorted(modules.items()):
        mine = _layer_of(name)
        for imported in sorted(_imports(name, path, modules)):
            theirs = _layer_of(imported)
            if theirs > mine:
                upward.append(f"{name} ({LAYERS[mine][0]}) imports {imported} ({LAYERS[theirs][0]})")
    assert upward == [], "imports of a higher layer:\n" + "\n".join(upward)


def test_the_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The check above can fail: a module of the base layer importing the sandbox is reported."""
    fake = tmp_path / "state.py"
    fake.write_text("from vmctl.sandbox.facade import Sandbox\n")
    modules = {**_modules(), "vmctl.core.state": fake}
    imported = _imports("vmctl.core.state", fake, modules)
    assert imported == {"vmctl.sandbox.facade"}
    assert _layer_of("vmctl.sandbox.facade") > _layer_of("vmctl.core.state")


def _readme_layout_rows() -> list[tuple[str, str]]:
    """(layer, module) for every module the README's layout table names."""
    text = README.read_text()
    section = text.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    rows, layer = [], ""
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or cells[0] in ("layer", "---") or set(cells[0]) <= {"-"} and cells[0]:
            continue
        layer = cells[0] or layer
        folder = ""
        for token in re.findall(r"`([^`]+)`", cells[1]):
            token = token.split(" ")[0]
            if token.endswith("/"):
                folder = token
                continue
            if not token.endswith(".py"):
                continue
            if "/" in token:
                folder, token = token.rsplit("/", 1)[0] + "/", token.rsplit("/", 1)[1]
            dotted = "vmctl." + (folder + token[:-3]).replace("/", ".")
            if dotted.endswith(".__init__"):
                dotted = dotted[: -len(".__init__")]
            rows.append((layer, dotted))
    return rows


def test_the_readme_layout_table_matches_the_layers() -> None:
    rows = _readme_layout_rows()
    named = {module for _, module in rows}
    named |= {module.rsplit(".", 1)[0] for module in named}  # a folder's modules name its package
    wrong = [f"{module}: README says {layer}, LAYERS says {LAYERS[_layer_of(module)][0]}"
             for layer, module in rows if LAYERS[_layer_of(module)][0] != layer]  # fmt: skip
    missing = sorted(m for m in _modules() if m not in named)
    assert wrong == [] and missing == [], f"wrong layer: {wrong}; not in the README's table: {missing}"


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
    tree = ast.parse((PACKAGE / "sandbox" / "facade.py").read_text())
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
