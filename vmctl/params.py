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
