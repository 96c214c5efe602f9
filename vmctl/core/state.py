"""Sandbox states and the one table of legal transitions.

Theory of operation. Everything that changes a sandbox's state goes through
:meth:`StateMachine.fire` with a :class:`Trigger`, and the only place that says what a trigger
does is :data:`TRANSITIONS`. A missing entry means "not allowed": ``fire`` raises
:class:`~vmctl.errors.IllegalTransition` and the state stays as it was.

Triggers come in two kinds:

* *Confirmations* from QEMU or the guest (``QMP_STOP``, ``QMP_RESUME``, ``QMP_SHUTDOWN``,
  ``PROCESS_EXIT``, ``GUEST_PANICKED``, ``GUEST_READY``, ``FOUND_PAUSED``, ``FAULT``). Only these
  move a sandbox between running, paused and stopped. ``FOUND_PAUSED`` is what attaching to a
  detached sandbox learns from QEMU's ``query-status``.
* *Requests* made by a caller (``PAUSE``, ``RESUME``, ``EXEC``, ``HOTPLUG``, ``SNAPSHOT``, ``START``,
  ``STOP``, ``DETACH``).
  ``PAUSE``, ``RESUME``, ``EXEC``, ``HOTPLUG`` and ``SNAPSHOT`` map a state to itself: they only ask "is this call legal now?"; the state changes when QEMU's
  event arrives. ``START`` and ``STOP`` record the controller's intent (``STARTING``,
  ``STOPPING``) so that a process exit can be told apart from a crash. ``DETACH`` ends this
  controller's hold on a sandbox whose QEMU runs on (``DETACHED``).

It is also the one place that says what QEMU's news *means*: :func:`event_trigger` maps a QMP
event to a trigger (judging ``SHUTDOWN`` reasons), :func:`status_trigger` maps a ``query-status``
answer (attaching to a running QEMU), :func:`exit_triggers` a process exit. Waiting for a state
and following transitions live beside it, in :mod:`vmctl.core.watcher`.

This module does no I/O and imports no async library, so it is tested without QEMU.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vmctl.errors import IllegalTransition


class SandboxState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    DETACHED = "detached"

    def __str__(self) -> str:
        return self.value

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


class Trigger(enum.Enum):
    # requests from callers
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    EXEC = "exec"
    HOTPLUG = "hotplug"
    SNAPSHOT = "snapshot"
    STOP = "stop"
    DETACH = "detach"
    # confirmations from QEMU, the guest or the process
    GUEST_READY = "guest-ready"
    FOUND_PAUSED = "found-paused"
    QMP_STOP = "qmp-stop"
    QMP_RESUME = "qmp-resume"
    QMP_SHUTDOWN = "qmp-shutdown"
    GUEST_PANICKED = "guest-panicked"
    PROCESS_EXIT = "process-exit"
    FAULT = "fault"

    def __str__(self) -> str:
        return self.value


S = SandboxState
T = Trigger
HISTORY_LENGTH = 100  # enough to read what happened; a thousand sandboxes keep 100k, not 1M

#: state -> trigger -> next state. Everything not listed is illegal.
TRANSITIONS: dict[SandboxState, dict[Trigger, SandboxState]] = {
    S.CREATED: {
        T.START: S.STARTING,
        T.STOP: S.STOPPED,  # closing a sandbox that never started
    },
    S.STARTING: {
        T.GUEST_READY: S.RUNNING,
        T.FOUND_PAUSED: S.PAUSED,  # attaching to a detached sandbox that QEMU reports paused
        T.QMP_RESUME: S.STARTING,  # the `cont` that releases the -S boot pause
        T.QMP_STOP: S.STARTING,
        T.STOP: S.STOPPING,
        T.QMP_SHUTDOWN: S.STOPPING,
        T.GUEST_PANICKED: S.FAILED,
        T.PROCESS_EXIT: S.FAILED,
        T.FAULT: S.FAILED,
    },
    S.RUNNING: {
        T.PAUSE: S.RUNNING,
        T.EXEC: S.RUNNING,
        T.HOTPLUG: S.RUNNING,
        T.SNAPSHOT: S.RUNNING,
        T.QMP_STOP: S.PAUSED,
        T.QMP_RESUME: S.RUNNING,
        T.STOP: S.STOPPING,
        T.DETACH: S.DETACHED,
        T.QMP_SHUTDOWN: S.STOPPING,
        T.GUEST_PANICKED: S.FAILED,
        T.PROCESS_EXIT: S.FAILED,
        T.FAULT: S.FAILED,
    },
    S.PAUSED: {
        T.RESUME: S.PAUSED,
        T.SNAPSHOT: S.PAUSED,  # paused is the natural state to save; the snapshot leaves it paused
        T.QMP_RESUME: S.RUNNING,
        T.QMP_STOP: S.PAUSED,
        T.STOP: S.STOPPING,
        T.DETACH: S.DETACHED,
        T.QMP_SHUTDOWN: S.STOPPING,
        T.GUEST_PANICKED: S.FAILED,
        T.PROCESS_EXIT: S.FAILED,
        T.FAULT: S.FAILED,
    },
    S.STOPPING: {
        T.STOP: S.STOPPING,
        T.QMP_STOP: S.STOPPING,
        T.QMP_RESUME: S.STOPPING,
        T.QMP_SHUTDOWN: S.STOPPING,
        T.GUEST_PANICKED: S.STOPPING,
        T.FAULT: S.STOPPING,
        T.PROCESS_EXIT: S.STOPPED,
    },
    S.STOPPED: {},
    # a detached sandbox runs on without this controller; Sandbox.attach gives a new one
    S.DETACHED: {},
    S.FAILED: {
        T.PROCESS_EXIT: S.FAILED,
        T.FAULT: S.FAILED,
        T.QMP_SHUTDOWN: S.FAILED,
        T.QMP_STOP: S.FAILED,
        T.QMP_RESUME: S.FAILED,
        T.GUEST_PANICKED: S.FAILED,
    },
}

#: States from which no other state can be reached.
TERMINAL_STATES = frozenset(state for state, row in TRANSITIONS.items() if all(nxt is state for nxt in row.values()))


def _reachable(state: SandboxState) -> frozenset[SandboxState]:
    seen = {state}
    todo = [state]
    while todo:
        for nxt in TRANSITIONS[todo.pop()].values():
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return frozenset(seen)


_REACHABLE = {state: _reachable(state) for state in SandboxState}


def reachable_from(state: SandboxState) -> frozenset[SandboxState]:
    """Every state that some sequence of triggers can lead to from ``state`` (itself included)."""
    return _REACHABLE[state]


@dataclass(frozen=True)
class Transition:
    """One step the sandbox took: from ``old`` to ``new`` because of ``trigger``."""

    old: SandboxState
    new: SandboxState
    trigger: Trigger
    reason: str = ""


#: Transitions are values: equal ones are shared instead of made anew for every step, so the
#: histories of a thousand sandboxes pausing and resuming hold a few dozen objects instead of
#: 100,000 (each one more for the garbage collector to walk on every full collection). Bounded:
#: emptied when full (reasons may carry free text).
_SHARED: dict[tuple[SandboxState, Trigger, str], Transition] = {}
SHARED_TRANSITIONS_MAX = 1024


def _step(old: SandboxState, trigger: Trigger, reason: str) -> Transition:
    key = (old, trigger, reason)
    step = _SHARED.get(key)
    if step is None:
        if len(_SHARED) >= SHARED_TRANSITIONS_MAX:
            _SHARED.clear()
        step = _SHARED[key] = Transition(old, TRANSITIONS[old][trigger], trigger, reason)
    return step


class StateMachine:
    """Holds the current state and applies the table; tells its listeners about every change."""

    def __init__(self) -> None:
        self._state = SandboxState.CREATED
        self._listeners: list[Callable[[Transition], None]] = []
        self.failure: str = ""
        #: the latest transitions (a long-lived sandbox pausing often must not grow without bound)
        self.history: deque[Transition] = deque(maxlen=HISTORY_LENGTH)

    @property
    def state(self) -> SandboxState:
        return self._state

    def listen(self, listener: Callable[[Transition], None]) -> None:
        """Call ``listener`` with every transition (in order of registration, synchronously)."""
        self._listeners.append(listener)

    def allows(self, trigger: Trigger) -> bool:
        return trigger in TRANSITIONS[self._state]

    def check(self, trigger: Trigger) -> None:
        """Raise :class:`IllegalTransition` unless ``trigger`` is legal now (changes nothing)."""
        if trigger not in TRANSITIONS[self._state]:
            raise IllegalTransition(self._state, trigger)

    def fire(self, trigger: Trigger, reason: str = "") -> Transition:
        """Apply ``trigger``; raise :class:`IllegalTransition` and change nothing if it is illegal."""
        self.check(trigger)
        old = self._state
        step = _step(old, trigger, reason)
        new = step.new
        if new is old:
            return step
        self._state = new
        if new is SandboxState.FAILED and not self.failure:
            self.failure = reason or str(trigger)
        self.history.append(step)
        for listener in list(self._listeners):
            listener(step)
        return step

    def fire_if_allowed(self, trigger: Trigger, reason: str = "") -> Transition | None:
        """Apply news from QEMU that may legitimately arrive late (ignored where illegal)."""
        if self.allows(trigger):
            return self.fire(trigger, reason)
        return None


# -- what QEMU's news means ------------------------------------------------------------------

_EVENT_TRIGGERS = {"STOP": Trigger.QMP_STOP, "RESUME": Trigger.QMP_RESUME}
#: SHUTDOWN reasons that mean the sandbox failed (QEMU runs with reboot=shutdown, so a reset is a
#: panic or a crash in practice); any other reason is a clean power-off.
FAILED_SHUTDOWN_REASONS = {
    "host-signal": "QEMU was stopped by a signal vmctl did not send",
    "host-error": "QEMU stopped on a host error",
    "guest-reset": "the guest reset (a kernel panic, or a reboot, which sandboxes do not do)",
    "guest-panic": "guest kernel panicked",
}
#: query-status answers that mean "vCPUs stopped, guest intact" (an attach finds it PAUSED)
PAUSED_STATUSES = frozenset({"paused", "suspended", "postmigrate", "finish-migrate", "prelaunch", "debug", "save-vm"})


def event_trigger(name: str, data: Mapping[str, Any]) -> tuple[Trigger, str] | None:
    """What a QMP event means for the sandbox's state, and why; None for events that mean nothing here."""
    if name == "SHUTDOWN":
        why = str(data.get("reason", ""))
        if why in FAILED_SHUTDOWN_REASONS:
            return Trigger.FAULT, FAILED_SHUTDOWN_REASONS[why]
        return Trigger.QMP_SHUTDOWN, f"shutdown: {why}"
    if name == "GUEST_PANICKED":
        return Trigger.GUEST_PANICKED, "guest kernel panicked"
    trigger = _EVENT_TRIGGERS.get(name)
    return (trigger, name.lower()) if trigger is not None else None


def status_trigger(status: str) -> tuple[Trigger, str] | None:
    """What QEMU's ``query-status`` says about a guest found running (attach); None: it is dead."""
    if status == "running":
        return Trigger.GUEST_READY, "attached: QEMU reports running"
    if status in PAUSED_STATUSES:
        return Trigger.FOUND_PAUSED, f"attached: QEMU reports {status}"
    return None


def exit_triggers(returncode: int, *, requested: bool) -> list[tuple[Trigger, str]]:
    """What a QEMU process exit means: a stop vmctl asked for, or (otherwise) a failure."""
    steps = [(Trigger.STOP, "stopped by vmctl")] if requested else []
    return steps + [(Trigger.PROCESS_EXIT, f"QEMU exited with code {returncode}")]


def state_diagram() -> str:
    """A Mermaid state diagram of :data:`TRANSITIONS` (the README embeds it, so it cannot drift)."""
    lines = ["stateDiagram-v2", "    [*] --> created"]
    for state, row in TRANSITIONS.items():
        for trigger, nxt in row.items():
            if nxt is not state:
                lines.append(f"    {state.value} --> {nxt.value}: {trigger.value}")
    for state in sorted(TERMINAL_STATES, key=lambda s: s.value):
        lines.append(f"    {state.value} --> [*]")
    return "\n".join(lines)
