"""One exception hierarchy for everything vmctl raises.

::

    VmctlError
     +-- ConfigError            invalid configuration; lists every problem, raised before any process starts
     +-- HostError              the host lacks something (a package, /dev/kvm, hugepages); says how to fix it
     +-- IllegalTransition      a call or event not allowed in the current state; nothing changed
     +-- SandboxFailed          the sandbox is in FAILED (QEMU died, guest panicked, lost QMP)
     +-- SandboxNotFound        no detached sandbox by that id (or its QEMU is gone: the record was removed)
     +-- SandboxBusy            another controller is attached to that detached sandbox
     +-- QMPError               QMP trouble
     |    +-- QMPCommandError   QEMU answered a command with an error
     |    +-- QMPDisconnected   the QMP connection is gone
     +-- GuestError             the guest agent failed or answered nonsense
     |    +-- GuestCommandFailed    exec(check=True) and the command failed
     |    +-- GuestDisconnected     the agent connection is gone (the guest or QEMU went away)
     |    +-- GuestOSError          the guest refused a file or process request: errno and its reason
     |    +-- OutputLimitExceeded   a command wrote more than its output limit (``killed``: confirmed gone)
     +-- HotplugError           a hotplug or unplug request failed (refused, no slot left, ...)
     +-- InvalidArgument        (also a ValueError) a call's argument is unusable
     +-- FleetError             (also a ValueError) a fleet could not do what was asked
     +-- PoolError              a sandbox pool could not do what was asked (closed, bad arguments)
     +-- NotSupported           the backend or machine cannot do this
     +-- NodeLost               a cluster node (or its host actor) is gone, and its sandboxes with it
     +-- VmctlTimeout           (also a TimeoutError) something did not happen in time
          +-- ReadyTimeout      the guest did not report ready in time
          +-- GuestUnresponsive (also a GuestError) a command's deadline passed, the agent did not answer
          +-- HotplugTimeout    (also a HotplugError) QEMU or the guest did not acknowledge in time
          +-- PoolTimeout       (also a PoolError) no pooled sandbox became free in time

Cancellation is never wrapped: ``anyio.get_cancelled_exc_class()`` always propagates as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class VmctlError(Exception):
    """Root of every error vmctl raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One reason a configuration is invalid: the field, what is wrong, and how to fix it."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class ConfigError(VmctlError, ValueError):
    """The configuration is invalid; ``problems`` lists every reason, each naming its field."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid sandbox configuration ({len(self.problems)} problem(s)):\n{lines}")

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(p.field for p in self.problems)


class HostError(VmctlError):
    """The host lacks something vmctl needs; the message says what to install or change."""


class IllegalTransition(VmctlError):
    """A call or event that the transition table does not allow from the current state."""

    def __init__(self, state: object, trigger: object) -> None:
        self.state = state
        self.trigger = trigger
        super().__init__(f"{trigger} is not allowed while the sandbox is {state}")


class SandboxFailed(VmctlError):
    """The sandbox failed (QEMU exited, the guest panicked, QMP was lost); later calls fail fast."""

    def __init__(self, reason: str, *, stderr_tail: str = "") -> None:
        self.reason = reason
        self.stderr_tail = stderr_tail
        detail = f"\nQEMU stderr (last lines):\n{stderr_tail}" if stderr_tail else ""
        super().__init__(f"sandbox failed: {reason}{detail}")


class SandboxNotFound(VmctlError, LookupError):
    """No detached sandbox has this id, or its QEMU is gone (its stale record was removed)."""


class SandboxBusy(VmctlError):
    """Another controller is attached to this detached sandbox; QEMU serves one at a time."""


class QMPError(VmctlError):
    """Trouble talking QMP to QEMU."""


class QMPCommandError(QMPError):
    """QEMU answered a command with an error; carries what was sent and what came back."""

    def __init__(self, command: str, arguments: object, error_class: str, description: str) -> None:
        self.command = command
        self.arguments = arguments
        self.error_class = error_class
        self.description = description
        super().__init__(f"QMP {command} failed: {error_class}: {description}")


class QMPDisconnected(QMPError):
    """The QMP connection closed (usually because QEMU exited)."""


class GuestError(VmctlError):
    """The guest agent failed, disconnected or answered something we cannot parse."""


class GuestDisconnected(GuestError):
    """The agent connection is gone: the guest, QEMU or this controller's hold on it ended."""


class GuestOSError(GuestError):
    """The guest refused a request with an OS error (a missing path, a full disk, no permission):
    ``errno`` is the guest's error number and ``reason`` its text (strerror)."""

    def __init__(self, errno: int, reason: str, message: str) -> None:
        self.errno = errno
        self.reason = reason
        super().__init__(message)


class OutputLimitExceeded(GuestError):
    """A command's output went over its ``output_limit``. ``killed`` is True once the agent
    confirmed that the command and everything it started are gone; False if it did not confirm
    within ``TIMEOUT_GRACE`` (vmctl told it to kill them; a guest that does not answer may not)."""

    def __init__(self, message: str, *, killed: bool = False) -> None:
        self.killed = killed
        super().__init__(message)


class GuestCommandFailed(GuestError):
    """``exec(..., check=True)`` and the command failed or timed out; ``result`` has its output."""

    def __init__(self, result: Any) -> None:
        self.result = result
        why = "timed out" if result.timed_out else f"exited with {result.exit_code}"
        tail = result.stderr.decode(errors="replace").strip()[-500:]
        super().__init__(f"guest command {why}" + (f": {tail}" if tail else ""))


class HotplugError(VmctlError):
    """A hotplug or unplug request failed (QEMU or the guest refused, no slot left, ...)."""


class InvalidArgument(VmctlError, ValueError):
    """A call's argument is unusable (for example an empty argv or one holding NUL)."""


class FleetError(VmctlError, ValueError):
    """A fleet could not do what was asked (bad arguments, or with ``fail_fast``: a member failed)."""


class PoolError(VmctlError):
    """A sandbox pool could not do what was asked (it is closed, or an argument is unusable)."""


class NotSupported(VmctlError):
    """The backend or machine type cannot do what was asked."""


class NodeLost(VmctlError):
    """The cluster node holding a sandbox, or its host actor, is gone: so is the sandbox
    (``node`` names the node; ``vmctl.cluster``)."""

    def __init__(self, message: str, *, node: str = "") -> None:
        self.node = node
        super().__init__(message)


class VmctlTimeout(VmctlError, TimeoutError):
    """Something vmctl waited for did not happen in time."""


class ReadyTimeout(VmctlTimeout):
    """The guest did not report ready in time; the message names the accelerator and the fix."""


class GuestUnresponsive(GuestError, VmctlTimeout):
    """A command's ``timeout`` passed and the guest agent did not answer within ``TIMEOUT_GRACE``
    more (the guest is flooded, or its agent stopped): the host gave up waiting, so the call returns
    on time whatever the guest does. What became of the command is unknown: vmctl told the agent to
    kill it, which a recovering agent does. ``command`` is its program, ``timeout`` its limit."""

    def __init__(self, message: str, *, command: str = "", timeout: float | None = None) -> None:
        self.command = command
        self.timeout = timeout
        super().__init__(message)


class HotplugTimeout(HotplugError, VmctlTimeout):
    """QEMU or the guest did not acknowledge a hotplug request in time."""


class PoolTimeout(PoolError, VmctlTimeout):
    """No pooled sandbox was ready within an ``acquire`` timeout; ``last_error`` is the last start
    failure, if any (a pool whose starts keep failing times out with the reason)."""

    def __init__(self, message: str, *, last_error: BaseException | None = None) -> None:
        self.last_error = last_error
        super().__init__(message)
