"""The TOML fleet spec behind ``vmctl fleet``: a ``[fleet]`` table and a ``[sandbox]`` table.

::

    [fleet]
    size = 4                     # how many sandboxes
    max_concurrent_starts = 2    # boots at once
    template = false             # boot one template, then start clones from it
    fail_fast = false            # stop everything at the first failure
    command_timeout = 60         # seconds per command in the guest
    commands = [["sh", "-c", "nproc; free -m"], ["uname", "-r"]]
    devices = [{type = "block", path = "data.img", read_only = true}]   # plugged into each

    [sandbox]                    # any SandboxConfig field; kernel/initrd default to the default guest
    vcpus = 1
    memory_mib = 256
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmctl.config import SandboxConfig
from vmctl.core.tomlfile import fill_defaults, read_toml_text, relative_to
from vmctl.devices import Device, device_from_mapping
from vmctl.errors import ConfigError, Problem, VmctlError
from vmctl.fleets.members import refuse_shared_writable_disks

FLEET_FIELDS = {"size", "max_concurrent_starts", "template", "fail_fast", "command_timeout", "commands", "devices"}


@dataclass(frozen=True)
class FleetSpec:
    sandbox: SandboxConfig
    size: int = 1
    max_concurrent_starts: int = 4
    template: bool = False
    fail_fast: bool = False
    command_timeout: float | None = 300.0
    commands: tuple[tuple[str, ...], ...] = ()


def load_fleet_spec(path: str | Path, *, default_kernel: Path | None = None,
                    default_initrd: Path | None = None) -> FleetSpec:  # fmt: skip
    """Read and validate a fleet spec; every problem is reported at once, naming its field."""
    path = Path(path)
    text = read_toml_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(str(path), f"not valid TOML: {exc}")]) from None
    problems: list[Problem] = []
    fleet = data.get("fleet")
    if not isinstance(fleet, dict):
        raise ConfigError([Problem("fleet", "missing [fleet] table (size, commands, ...)")])
    for key in sorted(set(data) - {"fleet", "sandbox"}):
        problems.append(Problem(key, "unknown table; a fleet spec has [fleet] and [sandbox]"))
    for key in sorted(set(fleet) - FLEET_FIELDS):
        problems.append(Problem(f"fleet.{key}", f"unknown field; known: {', '.join(sorted(FLEET_FIELDS))}"))
    size = _int(fleet, "size", 1, problems, minimum=1, maximum=256)
    starts = _int(fleet, "max_concurrent_starts", 4, problems, minimum=1, maximum=256)
    template = _bool(fleet, "template", False, problems)
    fail_fast = _bool(fleet, "fail_fast", False, problems)
    timeout = fleet.get("command_timeout", 300.0)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                or not 0 < timeout < math.inf):  # fmt: skip
        problems.append(Problem("fleet.command_timeout", "must be a positive number of seconds"))
        timeout = 300.0
    commands = _commands(fleet.get("commands", []), problems)
    devices = _devices(fleet.get("devices", []), problems, path.parent)
    raw_sandbox = data.get("sandbox", {})
    sandbox_data: dict[str, Any] = dict(raw_sandbox) if isinstance(raw_sandbox, dict) else {}
    if not isinstance(raw_sandbox, dict):
        problems.append(Problem("sandbox", "must be a table of SandboxConfig fields"))
    defaults = {k: v for k, v in (("kernel", default_kernel), ("initrd", default_initrd)) if v is not None}
    sandbox_data = fill_defaults(sandbox_data, defaults)
    own_devices = sandbox_data.get("devices", [])
    own = len(own_devices) if isinstance(own_devices, list) else 0
    if devices and isinstance(own_devices, list):  # anything else is reported by SandboxConfig
        sandbox_data["devices"] = [*own_devices, *devices]
    try:
        sandbox = SandboxConfig.from_mapping(sandbox_data, base_dir=path.parent.absolute())
    except ConfigError as exc:
        for p in exc.problems:
            field, _, rest = p.field.partition("]")
            if field.startswith("devices[") and int(field[8:]) >= own:  # one of [fleet] devices
                problems.append(Problem(f"fleet.devices[{int(field[8:]) - own}]{rest}", p.message))
            else:
                problems.append(Problem(f"sandbox.{p.field}", p.message))
    else:
        if size > 1:
            try:
                refuse_shared_writable_disks([sandbox] * size)
            except VmctlError as exc:
                problems.append(Problem("fleet.devices", str(exc)))
    if problems:
        raise ConfigError(problems)
    return FleetSpec(sandbox, size, starts, template, fail_fast, timeout, commands)


def _int(table: dict[str, Any], key: str, default: int, problems: list[Problem], *, minimum: int,
         maximum: int) -> int:  # fmt: skip
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        problems.append(Problem(f"fleet.{key}", f"must be an integer from {minimum} to {maximum}"))
        return default
    return value


def _bool(table: dict[str, Any], key: str, default: bool, problems: list[Problem]) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        problems.append(Problem(f"fleet.{key}", "must be true or false"))
        return default
    return value


def _commands(value: object, problems: list[Problem]) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list):
        problems.append(Problem("fleet.commands", 'a list of argv lists, e.g. [["uname", "-r"]]'))
        return ()
    out = []
    for i, argv in enumerate(value):
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            problems.append(Problem(f"fleet.commands[{i}]", 'an argv list of strings, e.g. ["sh", "-c", "nproc"]'))
            continue
        out.append(tuple(argv))
    return tuple(out)


def _devices(value: object, problems: list[Problem], base: Path) -> list[Device]:
    if not isinstance(value, list):
        problems.append(Problem("fleet.devices", 'a list of tables, e.g. [{type = "block", path = "a.img"}]'))
        return []
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            problems.append(Problem(f"fleet.devices[{i}]", "must be a table with a 'type'"))
            continue
        try:
            out.append(device_from_mapping(relative_to(item, base)))
        except TypeError as exc:
            problems.append(Problem(f"fleet.devices[{i}]", str(exc)))
    return out
