"""What a hypervisor reports, routed: the :class:`~vmctl.hypervisors.base.Events` of a sandbox.

QMP events go to the device table and, through their meaning (:func:`vmctl.core.state.event_trigger`),
to the state machine; a process exit and faults go to the machine; console lines to the console
fan-out. When the sandbox fails, every waiting caller (agent requests, hotplug waiters) is woken,
each with its own :class:`~vmctl.errors.SandboxFailed`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from vmctl.agent.client import AgentClient
from vmctl.agent.console import ConsoleFanout
from vmctl.core.qmp import QmpEvent
from vmctl.core.state import SandboxState, StateMachine, Transition, Trigger, event_trigger, exit_triggers
from vmctl.errors import GuestDisconnected, QMPDisconnected, SandboxFailed
from vmctl.machine.devicetable import DeviceManager
from vmctl.sandbox.origin import Origin

R = TypeVar("R")


class SandboxEvents:
    def __init__(self, machine: StateMachine, console: ConsoleFanout, origin: Origin, log: Any) -> None:
        self._machine = machine
        self._console = console
        self._origin = origin
        self._log = log
        #: QEMU's last stderr lines, once it exited
        self.stderr_tail = ""
        #: the parts that hold waiters, once the sandbox has them
        self.agent: AgentClient | None = None
        self.devices: DeviceManager | None = None
        machine.listen(self._on_transition)

    async def guest_call(self, call: Awaitable[R], wait_exited: Callable[[], Awaitable[None]]) -> R:
        """Await ``call``; a lost connection that turns out to be a dead sandbox says so."""
        try:
            return await call
        except (GuestDisconnected, QMPDisconnected) as exc:
            # The agent or QMP connection usually drops a moment before the process exit is noticed.
            with anyio.move_on_after(2):
                await wait_exited()
            if self._machine.state is SandboxState.FAILED:
                raise self.failed() from exc
            raise

    def failed(self, reason: str | None = None) -> SandboxFailed:
        """The error a caller of a failed sandbox gets (a new one each time)."""
        return SandboxFailed(reason or self._machine.failure or "sandbox failed", stderr_tail=self.stderr_tail)

    def on_qmp_event(self, event: QmpEvent) -> None:
        if self.devices is not None:
            self.devices.on_event(event)
        meaning = event_trigger(event.name, event.data)
        if meaning is not None and self._machine.fire_if_allowed(*meaning) is None:
            self._log.debug("event ignored in this state", qmp_event=event.name, state=str(self._machine.state))

    def on_process_exit(self, returncode: int, stderr_tail: str, *, requested: bool) -> None:
        self.stderr_tail = stderr_tail
        for trigger, reason in exit_triggers(returncode, requested=requested):
            self._machine.fire_if_allowed(trigger, reason)

    def on_fault(self, reason: str) -> None:
        self._machine.fire_if_allowed(Trigger.FAULT, reason)

    def on_console_line(self, line: str) -> None:
        self._console.push(line)

    def _on_transition(self, step: Transition) -> None:
        self._log.info("state", old=str(step.old), new=str(step.new), trigger=str(step.trigger), reason=step.reason)
        if step.new in (SandboxState.RUNNING, SandboxState.PAUSED):
            self._origin.took_over = True
        if step.new is SandboxState.FAILED:
            self._log.error("sandbox failed", reason=step.reason, qemu_stderr=self.stderr_tail)

            def failure() -> SandboxFailed:
                return self.failed(step.reason)

            if self.agent is not None:
                self.agent.fail_all(failure)
            if self.devices is not None:
                self.devices.fail_all(failure)
