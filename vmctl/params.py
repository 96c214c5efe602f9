"""Key/value parameters (kernel command line, extra QEMU options) and their string forms.

Kept with the original's semantics: an empty pair is dropped, a pair with only a key or only a
value serialises to that one string, and a delimiter of ``""`` yields key and value as two items
(how QEMU options are passed as separate argv entries).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, TypeAlias


class Param(NamedTuple):
    key: str
    value: str = ""


ParamsInput: TypeAlias = Mapping[str, object] | Iterable["Param | tuple[str, str] | str"]


def serialize_params(params: Iterable[Param], delim: str) -> list[str]:
    """Turn params into strings: ``key<delim>value``, or two items when ``delim`` is empty."""
    out: list[str] = []
    for key, value in params:
        if not key and not value:
            continue
        if not key:
            out.append(value)
        elif not value:
            out.append(key)
        elif delim == "":
            out.extend((key, value))
        else:
            out.append(f"{key}{delim}{value}")
    return out


def deserialize_params(parameters: Iterable[str]) -> list[Param]:
    """Parse ``key=value`` strings back into params; ``key`` alone gets an empty value."""
    out: list[Param] = []
    for item in parameters:
        if not item:
            continue
        key, sep, value = item.partition("=")
        out.append(Param(key, value if sep else ""))
    return out


def normalize_params(value: ParamsInput | None) -> tuple[Param, ...]:
    """Accept a mapping, ``key=value`` strings, pairs or :class:`Param` and return params.

    Raises ``TypeError`` naming the bad item so config validation can report it.
    """
    if value is None:
        return ()
    if isinstance(value, Mapping):
        return tuple(Param(str(k), "" if v is None else _scalar(v)) for k, v in value.items())
    if isinstance(value, str | bytes):
        raise TypeError("expected a list of 'key=value' strings or a table, not a single string")
    out: list[Param] = []
    for item in value:
        if isinstance(item, str):
            out.extend(deserialize_params([item]))
        elif isinstance(item, Sequence) and len(item) == 2 and all(isinstance(x, str) for x in item):
            out.append(Param(item[0], item[1]))
        else:
            raise TypeError(f"cannot read {item!r} as a parameter; use 'key=value' or (key, value)")
    return tuple(out)


def _scalar(v: object) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, int | float | str):
        return str(v)
    raise TypeError(f"parameter value {v!r} must be a string, number or boolean")


#: ``-machine`` options ``machine_accelerators`` may add (the original's MachineAccelerators), per
#: machine, and the values each takes. An allowlist: none of them opens a host file, and the ones
#: vmctl relies on (``acpi`` for hotplug and power-off, ``memory-backend``) are not in it.
_ON_OFF = ("on", "off")
_ON_OFF_AUTO = ("on", "off", "auto")
_PC_OPTIONS: dict[str, tuple[str, ...]] = {
    "nvdimm": _ON_OFF, "usb": _ON_OFF, "dump-guest-core": _ON_OFF, "mem-merge": _ON_OFF, "graphics": _ON_OFF,
    "hpet": _ON_OFF, "i8042": _ON_OFF, "sata": _ON_OFF, "smbus": _ON_OFF, "suppress-vmdesc": _ON_OFF,
    "vmport": _ON_OFF_AUTO, "smm": _ON_OFF_AUTO, "pic": _ON_OFF_AUTO, "pit": _ON_OFF_AUTO,
}  # fmt: skip
MACHINE_OPTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "q35": _PC_OPTIONS,
    "pc": _PC_OPTIONS,
    "microvm": {"usb": _ON_OFF, "dump-guest-core": _ON_OFF, "mem-merge": _ON_OFF, "graphics": _ON_OFF,
                "isa-serial": _ON_OFF, "x-option-roms": _ON_OFF, "pic": _ON_OFF_AUTO, "pit": _ON_OFF_AUTO,
                "rtc": _ON_OFF_AUTO, "ioapic2": _ON_OFF_AUTO, "smm": _ON_OFF_AUTO},  # fmt: skip
}


def normalize_machine_options(value: object) -> tuple[str, ...]:
    """``"usb=off,nvdimm"`` (the original's comma-separated form) or a list, as a tuple of
    ``key=value`` items (a bare key means ``key=on``)."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    out = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{item!r}: each machine accelerator is a string such as 'usb=off'")
        item = item.strip()
        if item:
            out.append(item if "=" in item else f"{item}=on")
    return tuple(out)


def machine_option_problem(machine: str, item: str) -> str | None:
    """Why ``item`` may not be added to ``-machine`` for ``machine`` (None: it may)."""
    allowed = MACHINE_OPTIONS.get(machine, {})
    key, _, value = item.partition("=")
    if key not in allowed:
        return f"{key!r} is not allowed on {machine}; allowed: {', '.join(sorted(allowed))}"
    if value not in allowed[key]:
        return f"{key}={value!r}: use {' or '.join(allowed[key])}"
    return None
