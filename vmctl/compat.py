"""Old import paths, kept for one release: ``import vmctl.fleet`` still works, warns once with a
:class:`DeprecationWarning` naming the new path, and gives the module that now lives there.

The modules moved into folders by layer (``core/``, ``agent/``, ``machine/``, ``sandbox/``,
``fleets/``, ``cli/``). An old name is a small module whose attributes are the new module's
(PEP 562 ``__getattr__``), so ``from vmctl.pool import SandboxPool`` gives the same class as
``from vmctl import SandboxPool``."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

MOVED = {
    "vmctl.agentproto": "vmctl.agent.protocol",
    "vmctl.console": "vmctl.agent.console",
    "vmctl.detached": "vmctl.machine.registry",
    "vmctl.detachedcli": "vmctl.cli.detached",
    "vmctl.devicemanager": "vmctl.machine.devicetable",
    "vmctl.events": "vmctl.sandbox.events",
    "vmctl.fleet": "vmctl.fleets.fleet",
    "vmctl.fleetcli": "vmctl.cli.fleet",
    "vmctl.fleetspec": "vmctl.fleets.spec",
    "vmctl.guestfiles": "vmctl.agent.files",
    "vmctl.guestproc": "vmctl.agent.processes",
    "vmctl.heap": "vmctl.core.heap",
    "vmctl.hotplug": "vmctl.machine.hotplug",
    "vmctl.lines": "vmctl.core.lines",
    "vmctl.log": "vmctl.core.log",
    "vmctl.members": "vmctl.fleets.members",
    "vmctl.migration": "vmctl.machine.migration",
    "vmctl.origin": "vmctl.sandbox.origin",
    "vmctl.overlays": "vmctl.machine.overlays",
    "vmctl.paths": "vmctl.core.paths",
    "vmctl.pool": "vmctl.fleets.pool",
    "vmctl.qmp": "vmctl.core.qmp",
    "vmctl.reaper": "vmctl.core.reaper",
    "vmctl.resize": "vmctl.machine.resize",
    "vmctl.runcontrol": "vmctl.sandbox.runstate",
    "vmctl.runtask": "vmctl.sandbox.hvtask",
    "vmctl.state": "vmctl.core.state",
    "vmctl.template": "vmctl.fleets.template",
    "vmctl.waiting": "vmctl.core.waiting",
    "vmctl.watcher": "vmctl.core.watcher",
}


class _OldName(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        new = MOVED[module.__name__]
        warnings.warn(f"{module.__name__} is now {new}: the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)  # fmt: skip
        target = importlib.import_module(new)

        def forward(name: str) -> Any:
            return getattr(target, name)

        module.__getattr__ = forward  # type: ignore[method-assign]
        module.__doc__ = f"Moved to :mod:`{new}`."
        own = [n for n, v in vars(target).items() if not n.startswith("_") and getattr(v, "__module__", None) == new]
        module.__dict__["__all__"] = list(getattr(target, "__all__", own))


def install() -> None:
    """Make the old names importable (once per process)."""
    if not any(isinstance(finder, _OldName) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OldName())  # it answers for the old names only
