"""The hypervisor's run task, as the sandbox holds it.

It lives in the sandbox's task group, not in the caller's scope: a cancelled or timed-out start
is handled by the sandbox, which first records why, then ends this task. A launch error goes
back to whoever waits for the launch, never to the task group; a failure after the launch is a
fault of the sandbox.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
from anyio.abc import TaskGroup

from vmctl.core.state import SandboxState
from vmctl.core.watcher import StateWatcher
from vmctl.errors import ReadyTimeout
from vmctl.hypervisors.base import Hypervisor


class _LaunchStatus:
    """The ``task_status`` handed to :meth:`Hypervisor.run`: sets an event when QEMU is up."""

    def __init__(self, event: anyio.Event) -> None:
        self._event = event

    def started(self, value: object = None) -> None:
        self._event.set()


class RunTask:
    def __init__(self, hv: Hypervisor, on_fault: Callable[[str], None]) -> None:
        self._hv = hv
        self._on_fault = on_fault
        self._launched = anyio.Event()
        self._error: Exception | None = None
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()

    def start(self, tg: TaskGroup) -> None:
        tg.start_soon(self._run)

    async def launched(self) -> None:
        """Return once QEMU runs the guest; raise what stopped the launch."""
        await self._launched.wait()
        if self._error is not None:
            raise self._error

    async def end(self) -> None:
        """End the task (the hypervisor reaps its process on the way out) and wait for it."""
        self._scope.cancel()
        await self._done.wait()

    async def guest_ready(self, watcher: StateWatcher) -> bool:
        """Wait for the guest's agent to report ready; False if the sandbox failed or stopped first."""
        ready = False
        async with anyio.create_task_group() as tg:

            async def agent_ready() -> None:
                nonlocal ready
                await self._hv.wait_ready()
                ready = True
                tg.cancel_scope.cancel()

            tg.start_soon(agent_ready)
            await watcher.wait_for(SandboxState.FAILED, SandboxState.STOPPING, SandboxState.STOPPED)
            tg.cancel_scope.cancel()
        return ready

    async def _run(self) -> None:
        try:
            with self._scope:
                await self._hv.run(task_status=_LaunchStatus(self._launched))
        except Exception as exc:
            while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]  # a bug in a pump: report the cause, not the wrapper
            if self._launched.is_set():
                self._on_fault(f"hypervisor task failed: {exc!r}")
            else:
                self._error = exc
        finally:
            self._launched.set()
            self._done.set()


def ready_timeout(limit: float, accel: str, console_tail: list[str]) -> ReadyTimeout:
    """The error for a guest that did not report ready: it names the accelerator and the fix."""
    fix = (
        "KVM can hang on nested hosts: set accel='tcg' (or VMCTL_ACCEL=tcg)"
        if accel == "kvm"
        else "TCG is slow: raise start_timeout or run fewer sandboxes at once"
    )
    tail = "\n".join(console_tail)
    return ReadyTimeout(
        f"guest did not report ready within {limit}s under accel={accel}; {fix}"
        + (f"\nconsole (last lines):\n{tail}" if tail else "")
    )
