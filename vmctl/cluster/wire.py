"""What crosses Ray between a driver and a host actor: replies, and errors as plain data.

vmctl's errors take structured arguments (``ConfigError(problems)``, ``SandboxFailed(reason,
stderr_tail=...)``), so pickling them as exceptions would lose or break them. A host actor never
lets an error escape a method: it returns a :class:`Reply` holding a :class:`WireError` (the
class name, the message and the picklable attributes), and the driver rebuilds the same vmctl
error type from it. Anything that is not a vmctl error arrives as a plain :class:`VmctlError`
naming the original type; a timeout as :class:`VmctlTimeout`. Cancellation is never sent.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

from vmctl import errors
from vmctl.core.state import SandboxState


@dataclass(frozen=True)
class WireError:
    """An exception as data: enough to raise the same vmctl error type on the other side."""

    kind: str
    message: str
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    """A host actor's answer: a value or an error, and the sandbox's state after the call."""

    value: Any = None
    error: WireError | None = None
    state: SandboxState | None = None


def _picklable(value: object) -> bool:
    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 - anything unpicklable stays behind
        return False
    return True


def to_wire(exc: BaseException) -> WireError:
    attrs = {k: v for k, v in vars(exc).items() if not k.startswith("__") and _picklable(v)}
    if isinstance(exc, errors.VmctlError):
        return WireError(type(exc).__name__, str(exc), attrs)
    if isinstance(exc, TimeoutError):
        return WireError("VmctlTimeout", str(exc) or "timed out")
    return WireError("VmctlError", f"{type(exc).__name__}: {exc}")


def from_wire(wire: WireError) -> errors.VmctlError:
    """The vmctl error ``wire`` describes, built without calling its ``__init__`` (whose arguments
    differ by type): the message and attributes are set as they were."""
    cls = getattr(errors, wire.kind, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.VmctlError)):
        cls = errors.VmctlError
    exc = cls.__new__(cls)
    Exception.__init__(exc, wire.message)
    for key, value in wire.attrs.items():
        setattr(exc, key, value)
    return exc
