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
* *Requests* made by a caller (``PAUSE``, ``RESUME``, ``EXEC``, ``HOTPLUG``, ``START``, ``STOP``,
  ``DETACH``).
  ``PAUSE``, ``RESUME``, ``EXEC`` and ``HOTPLUG`` map a state to itself: they only ask "is this call legal now?"; the state changes when QEMU's
  event arrives. ``START`` and ``STOP`` record the controller's intent (``STARTING``,
  ``STOPPING``) so that a process exit can be told apart from a crash. ``DETACH`` ends this
  controller's hold on a sandbox whose QEMU runs on (``DETACHED``).

This module does no I/O, so it is tested without QEMU.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from vmctl.errors import IllegalTransition, SandboxFailed


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
HISTORY_LENGTH = 1000

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


def reachable_from(state: SandboxState) -> frozenset[SandboxState]:
    """Every state that some sequence of triggers can lead to from ``state`` (itself included)."""
    seen = {state}
    todo = [state]
    while todo:
        for nxt in TRANSITIONS[todo.pop()].values():
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return frozenset(seen)


@dataclass(frozen=True)
class Transition:
    """One step the sandbox took: from ``old`` to ``new`` because of ``trigger``."""

    old: SandboxState
    new: SandboxState
    trigger: Trigger
    reason: str = ""


class StateMachine:
    """Holds the current state, applies the table, and wakes whoever waits on a change."""

    def __init__(self, on_transition: Callable[[Transition], None] | None = None) -> None:
        self._state = SandboxState.CREATED
        self._changed: anyio.Event | None = None
        self._subscribers: list[MemoryObjectSendStream[Transition]] = []
        self._on_transition = on_transition
        self.failure: str = ""
        #: the latest transitions (a long-lived sandbox pausing often must not grow without bound)
        self.history: deque[Transition] = deque(maxlen=HISTORY_LENGTH)

    @property
    def state(self) -> SandboxState:
        return self._state

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
        new = TRANSITIONS[old][trigger]
        step = Transition(old, new, trigger, reason)
        if new is old:
            return step
        self._state = new
        if new is SandboxState.FAILED and not self.failure:
            self.failure = reason or str(trigger)
        self.history.append(step)
        if self._on_transition is not None:
            self._on_transition(step)
        for stream in list(self._subscribers):
            try:
                stream.send_nowait(step)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.remove(stream)
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        return step

    def fire_if_allowed(self, trigger: Trigger, reason: str = "") -> Transition | None:
        """Apply an event from QEMU that may legitimately arrive late (ignored where illegal)."""
        if self.allows(trigger):
            return self.fire(trigger, reason)
        return None

    async def wait_for(self, *targets: SandboxState) -> SandboxState:
        """Wait until the state is one of ``targets``.

        Raises :class:`SandboxFailed` as soon as none of ``targets`` can be reached any more, so
        no waiter hangs on a sandbox that died.
        """
        wanted = frozenset(targets)
        while True:
            if self._state in wanted:
                return self._state
            if not (reachable_from(self._state) & wanted):
                if self._state is SandboxState.FAILED:
                    raise SandboxFailed(self.failure or "sandbox failed")
                raise IllegalTransition(self._state, f"waiting for {'/'.join(map(str, targets))}")
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    def transitions(self) -> AsyncIterator[Transition]:
        """Every transition from the moment of this call (not of the first ``__anext__``);
        ends after a terminal state."""
        send, receive = anyio.create_memory_object_stream[Transition](math.inf)
        if self._state in TERMINAL_STATES:
            send.close()
        else:
            self._subscribers.append(send)
        return self._follow(send, receive)

    async def _follow(
        self, send: MemoryObjectSendStream[Transition], receive: MemoryObjectReceiveStream[Transition]
    ) -> AsyncIterator[Transition]:
        try:
            async with receive:
                async for step in receive:
                    yield step
                    if step.new in TERMINAL_STATES:
                        return
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
            send.close()


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
