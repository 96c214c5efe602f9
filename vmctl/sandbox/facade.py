"""Sandbox: a config, a hypervisor and a state machine, as an async context manager.

The sandbox is a thin facade. It owns the lifecycle (start, stop, release) and the task group in
which the hypervisor's ``run`` task lives; every other job has its own owner: the device manager
(devices, hotplug, resize), :mod:`vmctl.machine.migration` (snapshots, templates), :mod:`vmctl.machine.registry`
(records of sandboxes that outlive their controller), the agent client (the guest), the console
fan-out and the state machine with its watcher. Each public call declares the request it is
(``@requires``), which the transition table allows or refuses; state then changes only through
what the hypervisor reports (QMP events, process exit, faults). Leaving the ``async with``
block stops QEMU and removes the run directory, on every path, cancellation included.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import anyio
from anyio.abc import TaskGroup

from vmctl.agent import files as guestfiles
from vmctl.agent import processes as guestproc
from vmctl.agent.client import DEFAULT_OUTPUT_LIMIT, AgentClient, Argv, Env
from vmctl.agent.console import ConsoleFanout
from vmctl.agent.files import GuestPath
from vmctl.agent.processes import GuestProcess, ProcessContext
from vmctl.agent.results import ExecResult, GuestBlockDevice, GuestMemory
from vmctl.config import SandboxConfig
from vmctl.core.log import get_logger
from vmctl.core.paths import process_identity
from vmctl.core.state import SandboxState, StateMachine, Transition, Trigger
from vmctl.core.waiting import deadline
from vmctl.core.watcher import StateWatcher
from vmctl.devices import Device
from vmctl.errors import (
    InvalidArgument,
    NotSupported,
    SandboxFailed,
    VmctlError,
)
from vmctl.hypervisors.base import Backend, Capabilities, Hypervisor
from vmctl.hypervisors.microvm import MicrovmHypervisor
from vmctl.hypervisors.qemu import QemuHypervisor
from vmctl.machine import guesthooks, migration
from vmctl.machine import registry as registry
from vmctl.machine.devicetable import DeviceManager
from vmctl.machine.hotplug import PluggedDevice
from vmctl.sandbox.events import SandboxEvents
from vmctl.sandbox.hvtask import RunTask, ready_timeout
from vmctl.sandbox.origin import Origin
from vmctl.sandbox.runstate import RunControl

DEFAULT_START_TIMEOUT = 120.0
DEFAULT_STOP_TIMEOUT = 10.0
DEFAULT_CALL_TIMEOUT = 30.0
DEFAULT_RESIZE_TIMEOUT = 120.0
DEFAULT_SNAPSHOT_TIMEOUT = 300.0
TEARDOWN_GRACE = 30.0

P = ParamSpec("P")
R = TypeVar("R")


Method = Callable[Concatenate["Sandbox", P], Coroutine[Any, Any, R]]


def requires(trigger: Trigger) -> Callable[[Method[P, R]], Method[P, R]]:
    """Declare which request a public coroutine is: the transition table says where it is legal."""

    def wrap(method: Method[P, R]) -> Method[P, R]:
        @functools.wraps(method)
        async def checked(self: Sandbox, /, *args: P.args, **kwargs: P.kwargs) -> R:
            self._request(trigger)
            return await method(self, *args, **kwargs)

        return checked

    return wrap


@dataclass(frozen=True)
class _Parts:
    """The owners a sandbox delegates to, all present once QEMU runs."""

    agent: AgentClient
    devices: DeviceManager
    control: RunControl


class Sandbox:
    """One sandbox VM. Use ``async with Sandbox(config) as sb:``; it is running inside the block."""

    def __init__(self, config: SandboxConfig, *, id: str | None = None, backend: Backend | None = None,  # noqa: A002
                 log_dir: str | Path | None = None, start_timeout: float = DEFAULT_START_TIMEOUT,
                 stop_timeout: float = DEFAULT_STOP_TIMEOUT, detached: bool = False) -> None:  # fmt: skip
        if id is not None:
            registry.check_id(id)
        self.id = id or f"sb-{secrets.token_hex(4)}"
        self._config = config
        self._backend: Backend = backend or (MicrovmHypervisor if config.machine == "microvm" else QemuHypervisor)
        logs = Path(log_dir).expanduser().absolute() / self.id if log_dir is not None else None
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        #: QEMU outlives the controller: leaving the block detaches instead of stopping
        self.detached = detached
        self.log = get_logger("vmctl.sandbox.facade", sandbox=self.id)
        self._machine = StateMachine()
        self._console = ConsoleFanout()
        self._origin = Origin(self.id, config, detached=detached, log_dir=logs)
        self._events = SandboxEvents(self._machine, self._console, self._origin, self.log)
        self._watcher = StateWatcher(self._machine, failure_detail=lambda: self._events.stderr_tail)
        self._hv: Hypervisor | None = None
        self._run: RunTask | None = None
        self._parts: _Parts | None = None  # once QEMU runs
        self._released: anyio.Event | None = None
        self._tg: TaskGroup | None = None
        self._stack: AsyncExitStack | None = None
        self._graceful_exit = True

    async def __aenter__(self) -> Sandbox:
        if self._stack is not None:
            raise VmctlError("this Sandbox is already open")
        stack = AsyncExitStack()
        await stack.__aenter__()
        self._stack = stack
        self._tg = await stack.enter_async_context(anyio.create_task_group())
        stack.push_async_callback(self._teardown)
        try:
            await self.start()
        except BaseException:
            await self._close_stack(graceful=False)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        await self._close_stack(graceful=exc_type is None)

    async def _close_stack(self, *, graceful: bool) -> None:
        # Our failures never pass through the task group (no ExceptionGroup): the caller's goes on as is.
        stack, self._stack = self._stack, None
        if stack is None:
            return
        self._graceful_exit = graceful
        await stack.__aexit__(None, None, None)

    async def _teardown(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.stop_timeout + TEARDOWN_GRACE):
            try:
                # A detached sandbox is kept if the block ended normally or attached to it (else stopped).
                keep = self._graceful_exit or self._origin.attaching
                if self.detached and keep and self.state in (SandboxState.RUNNING, SandboxState.PAUSED):
                    await self.detach()
                else:
                    await self._stop(graceful=self._graceful_exit, timeout=self.stop_timeout)
            except Exception as err:  # teardown must finish; the cause is logged
                self.log.warning("stop on exit failed", error=repr(err))
        with anyio.CancelScope(shield=True):
            await self._release()
        self._tg = None

    @property
    def state(self) -> SandboxState:
        return self._machine.state

    @property
    def config(self) -> SandboxConfig:
        """The effective config once created (defaults filled, accelerator resolved)."""
        return self._hv.effective_config() if self._hv else self._config

    def capabilities(self) -> Capabilities:
        return self.hypervisor.capabilities()

    @property
    def pid(self) -> int | None:
        """QEMU's own pid on the host, jailed or not (for ``/proc`` and ``kill``)."""
        return self._hv.qemu_pid if self._hv else None

    @property
    def run_dir(self) -> Path | None:
        return self._origin.paths.run_dir if self._origin.paths else None

    @property
    def console_path(self) -> Path | None:
        """The console's unix socket (one reader at a time; vmctl holds it while running)."""
        return self._origin.paths.console_socket if self._origin.paths else None

    @property
    def console_log_path(self) -> Path | None:
        return self._origin.paths.console_log if self._origin.paths else None

    @property
    def failure(self) -> str:
        return self._machine.failure

    @property
    def command_line(self) -> list[str]:
        return self.hypervisor.command_line

    @property
    def history(self) -> list[Transition]:
        return list(self._machine.history)

    @property
    def console_tail(self) -> list[str]:
        return list(self._console.tail)

    @property
    def hypervisor(self) -> Hypervisor:
        if self._hv is None:
            raise VmctlError("the sandbox has not been started")
        return self._hv

    @property
    def devices(self) -> list[PluggedDevice]:
        """The device table: cold and hot-plugged devices (CPUs and DIMMs too) with their guest names."""
        return self._parts.devices.devices if self._parts else []

    @property
    def pending_waiters(self) -> int:
        """Requests waiting for the guest or QEMU right now (0 whenever no call is under way)."""
        return self._parts.agent.pending + self._parts.devices.pending_waiters if self._parts else 0

    def _live(self) -> _Parts:
        if self._parts is None:
            raise VmctlError("the sandbox has not been started")
        return self._parts

    async def start(self, *, timeout: float | None = None) -> None:
        """Launch QEMU and return once the guest agent reports ready (state RUNNING)."""
        if self._tg is None:
            raise VmctlError("open the sandbox with 'async with Sandbox(config) as sb:'; it starts there")
        self._request(Trigger.START)
        limit = self.start_timeout if timeout is None else timeout
        try:
            with anyio.fail_after(limit):
                confirmation = await self._launch(self._tg)
            self._machine.fire(*confirmation)
            if self._config.boot_to_be_template:
                await self._live().control.become_template(self._origin.config, self.devices, DEFAULT_CALL_TIMEOUT)
            if self.detached:
                self._save_record()
        except BaseException as exc:
            timed_out = isinstance(exc, TimeoutError) and not isinstance(exc, VmctlError)
            reason = f"guest not ready within {limit}s" if timed_out else f"start failed: {exc!s}"[:2000]
            with anyio.CancelScope(shield=True):
                await self._abort_start(exc, reason)
            if timed_out:
                raise ready_timeout(limit, self.config.accel, self.console_tail) from None
            raise

    async def _launch(self, tg: TaskGroup) -> tuple[Trigger, str]:
        """Everything a start does before the guest is confirmed: run dir, plan, QEMU, devices."""
        paths, plan = await self._origin.prepare()
        # an agent that breaks the protocol fails the sandbox: its channel is gone for good
        agent = self._events.agent = AgentClient(paths.agent_socket, on_violation=self._events.on_fault)
        self._hv = hv = self._backend(self._origin.config, paths, self.id, self._events, self.log, plan=plan, agent=agent)
        if self._config.boot_to_be_template and not hv.capabilities().templates:
            raise NotSupported(f"the {hv.name} backend cannot boot VM templates (see capabilities())")
        await hv.create()
        if self._released is not None:  # stopped meanwhile: QEMU must not start after the release
            raise SandboxFailed(self._machine.failure or "stopped while starting")
        self._run = RunTask(hv, self._events.on_fault)
        self._run.start(tg)
        await self._run.launched()
        devices = self._events.devices = DeviceManager(hv, agent, sandbox_id=self.id, cold=plan.devices,
                                                       spawn=self._spawn, log=self.log)  # fmt: skip
        self._parts = _Parts(agent, devices, RunControl(hv, self._machine, self._watcher, self.log, devices))
        adopted = await self._origin.adopt(hv, agent, devices)
        if adopted is not None:
            return adopted
        if not await self._run.guest_ready(self._watcher):
            raise self._events.failed(self._machine.failure or "stopped while starting")
        await self._origin.settle(agent, devices, plan)
        return Trigger.GUEST_READY, "agent ready"

    def _save_record(self) -> None:
        pid = self._hv.pid if self._hv else None  # the process vmctl started (a jail's outer one)
        self._origin.save_record(pid=pid, config=self.config.to_mapping(),
                                 devices=self._live().devices.hotplugged_rows(), state=str(self.state))  # fmt: skip

    def _spawn(self, job: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a short background job in the sandbox's task group (while it is open)."""
        if self._tg is not None and self._released is None:
            self._tg.start_soon(job)

    async def _abort_start(self, exc: BaseException, reason: str) -> None:
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            self._machine.fire_if_allowed(Trigger.STOP, "start cancelled")
        else:
            self._machine.fire_if_allowed(Trigger.FAULT, reason)
        await self._release()

    async def stop(self, *, timeout: float | None = None) -> None:
        """Stop the guest: power-off through the agent (within ``timeout``, default ``stop_timeout``),
        then ``quit``, then SIGKILL. Idempotent."""
        if timeout is not None and not 0 <= timeout < math.inf:
            raise InvalidArgument("timeout: seconds the guest may take to power off, at least 0 (or None)")
        await self._stop(graceful=True, timeout=self.stop_timeout if timeout is None else timeout)

    async def _stop(self, *, graceful: bool, timeout: float) -> None:
        state = self.state
        if state is SandboxState.STOPPED:
            return
        if state is SandboxState.CREATED:
            self._machine.fire(Trigger.STOP, "closed before start")
            return
        try:
            if graceful and state is SandboxState.RUNNING and self._parts is not None:  # the guest's stop hooks
                await guesthooks.before_stop(self._parts.agent, self.config, self.id, timeout, self.log)
            if state is not SandboxState.FAILED:
                self._machine.fire(Trigger.STOP, "stop requested")
                if self._hv is not None:
                    await self._hv.stop(graceful=graceful and state is SandboxState.RUNNING, timeout=timeout)
                with anyio.move_on_after(5):
                    await self._watcher.wait_for(SandboxState.STOPPED, SandboxState.FAILED)
        finally:
            with anyio.CancelScope(shield=True):
                await self._release()

    async def _release(self) -> None:
        """Kill and reap QEMU unless kept, close connections, end pumps, remove the run dir (once)."""
        if self._released is not None:
            await self._released.wait()
            return
        self._released = anyio.Event()
        try:
            hv, keep = self._hv, self._origin.keeps_running(self.state)
            if hv is not None:
                await hv.close(keep_running=keep)
            if self._run is not None:
                await self._run.end()
            if hv is None or hv.pid is None:
                self._machine.fire_if_allowed(Trigger.PROCESS_EXIT, "no QEMU process was started")
            self._console.close()
            alive = keep and hv is not None and hv.pid is not None and process_identity(hv.pid) is not None
            if alive and self.state is SandboxState.DETACHED:
                self._save_record()  # the last state and devices, for the next attach
            self._origin.release(qemu_lives=alive)
        finally:
            self._released.set()

    @requires(Trigger.PAUSE)
    async def pause(self, *, timeout: float | None = DEFAULT_CALL_TIMEOUT) -> None:
        """Pause the vCPUs; returns once QEMU confirms with a STOP event (state PAUSED)."""
        await self._guest_call(self._live().control.pause(timeout))

    @requires(Trigger.RESUME)
    async def resume(self, *, timeout: float | None = DEFAULT_CALL_TIMEOUT) -> None:
        """Resume the vCPUs; returns once QEMU confirms with a RESUME event (state RUNNING)."""
        await self._guest_call(self._live().control.resume(timeout))

    @requires(Trigger.SNAPSHOT)
    async def snapshot(self, directory: str | Path, *, timeout: float = DEFAULT_SNAPSHOT_TIMEOUT,
                       leave_paused: bool = False) -> Path:  # fmt: skip
        """Save memory, device state and the device table to ``directory`` (which must not exist; a failed or
        cancelled save leaves none). ``leave_paused``: stay paused after it (a move); shares return on resume."""
        target = migration.check_target(directory)
        return await self._guest_call(self._live().control.snapshot(
            target, sandbox_id=self.id, config=self.config, timeout=timeout, leave_paused=leave_paused))  # fmt: skip

    @classmethod
    def restore(cls, directory: str | Path, **options: Any) -> Sandbox:
        """A sandbox that starts from a snapshot instead of booting (use it with ``async with``)."""
        snapshot = migration.read_snapshot(directory)
        sandbox = cls(snapshot.config, **options)
        sandbox._origin.snapshot = snapshot
        return sandbox

    @classmethod
    def attach(cls, sandbox_id: str, *, start_timeout: float = DEFAULT_START_TIMEOUT,
               stop_timeout: float = DEFAULT_STOP_TIMEOUT) -> Sandbox:  # fmt: skip
        """The detached sandbox ``sandbox_id`` (from any process), for ``async with``; leaving detaches
        again unless :meth:`stop` was called. :class:`SandboxNotFound`, :class:`SandboxBusy`."""
        record = registry.find(sandbox_id)  # checks the id before it names anything
        config = SandboxConfig.from_mapping(record.config)
        sandbox = cls(config, id=sandbox_id, detached=True, start_timeout=start_timeout, stop_timeout=stop_timeout)
        sandbox._origin.record = record
        return sandbox

    async def detach(self) -> None:
        """Let go of a detached sandbox: its QEMU runs on, :meth:`attach` takes it up again."""
        if not self.detached:
            raise NotSupported("only a sandbox started with Sandbox(config, detached=True) can be detached: "
                               "the others die with their controller")  # fmt: skip
        self._machine.fire(Trigger.DETACH, "detached: QEMU runs on")
        if self._parts is not None:
            self._parts.devices.fail_all(lambda: VmctlError("the sandbox was detached"))
        with anyio.CancelScope(shield=True):
            await self._release()

    async def wait_for_state(self, *states: SandboxState, timeout: float | None = None) -> SandboxState:
        """Wait until the sandbox is in one of ``states``; fails fast once none can be reached."""
        with deadline(timeout, f"waiting for {'/'.join(map(str, states))}"):
            return await self._watcher.wait_for(*states)

    def transitions(self) -> AsyncIterator[Transition]:
        """Every transition from now on, ending after a terminal one (bounded: see ``.dropped``)."""
        return self._watcher.transitions()

    def console_lines(self) -> AsyncIterator[str]:
        """Console output lines from the moment of this call; ends when the sandbox is torn down."""
        return self._console.follow()

    @requires(Trigger.EXEC)
    async def exec(self, argv: Argv, *, stdin: bytes | str = b"", timeout: float | None = None, check: bool = False,
                   env: Env = None, cwd: str | None = None) -> ExecResult:  # fmt: skip
        """Run ``argv`` in the guest (see :meth:`AgentClient.exec`); ``check`` raises unless it exits 0."""
        result = await self._guest_call(self._live().agent.exec(argv, stdin=stdin, timeout=timeout, env=env, cwd=cwd))
        return result.check() if check else result

    def process(self, argv: Argv, *, env: Env = None, cwd: str | None = None, timeout: float | None = None,
                output_limit: int = DEFAULT_OUTPUT_LIMIT) -> ProcessContext:  # fmt: skip
        """``async with sb.process(argv) as p``: a command with live streams (:mod:`vmctl.agent.processes`)."""
        options = {"env": env, "cwd": cwd, "timeout": timeout, "output_limit": output_limit}
        return ProcessContext(lambda: self._start_process(argv, **options))

    @requires(Trigger.EXEC)
    async def _start_process(self, /, argv: Argv, **options: Any) -> GuestProcess:
        return await self._guest_call(guestproc.start(self._live().agent, argv, guard=self._guest_call, **options))

    @requires(Trigger.EXEC)
    async def write_file(self, path: GuestPath, data: bytes, *, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` in the guest, atomically (:mod:`vmctl.agent.files`)."""
        await self._guest_call(guestfiles.write_file(self._live().agent, path, data, mode=mode))

    @requires(Trigger.EXEC)
    async def read_file(self, path: GuestPath) -> bytes:
        """The contents of ``path`` in the guest."""
        return await self._guest_call(guestfiles.read_file(self._live().agent, path))

    @requires(Trigger.EXEC)
    async def upload(self, local: str | Path, remote: GuestPath) -> list[Path]:
        """Copy a local file or tree into the guest, modes kept (a tree merges into a directory
        there: :func:`vmctl.agent.files.upload`); returns what was not copied."""
        return await self._guest_call(guestfiles.upload(self._live().agent, local, remote))

    @requires(Trigger.EXEC)
    async def download(self, remote: GuestPath, local: str | Path, *, keep_modes: bool = False) -> list[str]:
        """Copy a guest file or tree to ``local``; returns what was not copied (links, devices,
        fifos, sockets). Never setuid, setgid or sticky; the umask applies unless ``keep_modes``."""
        return await self._guest_call(guestfiles.download(self._live().agent, remote, local, keep_modes=keep_modes))

    @requires(Trigger.EXEC)
    async def guest_block_devices(self, *, timeout: float | None = DEFAULT_CALL_TIMEOUT) -> list[GuestBlockDevice]:
        """Block devices the guest sees (name, size, serial)."""
        return await self._guest_call(self._live().agent.block_devices(timeout))

    @requires(Trigger.EXEC)
    async def guest_online_cpus(self, *, timeout: float | None = DEFAULT_CALL_TIMEOUT) -> list[int]:
        """CPU numbers the guest has online."""
        return await self._guest_call(self._live().agent.online_cpus(timeout))

    @requires(Trigger.EXEC)
    async def guest_memory(self, *, timeout: float | None = DEFAULT_CALL_TIMEOUT) -> GuestMemory:
        """The guest's own view of its memory (from /proc/meminfo)."""
        return await self._guest_call(self._live().agent.memory(timeout))

    async def _guest_call(self, call: Awaitable[R]) -> R:
        return await self._events.guest_call(call, self.hypervisor.wait_exited)

    @requires(Trigger.HOTPLUG)
    async def hotplug(self, device: Device, *, timeout: float | None = DEFAULT_CALL_TIMEOUT) -> PluggedDevice:
        """Plug ``device``; returns once QEMU took it and the guest sees it (``guest_path``)."""
        return await self._guest_call(self._live().devices.hotplug(device, timeout))

    @requires(Trigger.HOTPLUG)
    async def unplug(self, device: PluggedDevice | str, *, timeout: float | None = DEFAULT_CALL_TIMEOUT) -> None:
        """Remove a device; returns once QEMU confirms with ``DEVICE_DELETED`` for it."""
        await self._guest_call(self._live().devices.unplug(device, timeout))

    @requires(Trigger.HOTPLUG)
    async def resize_vcpus(self, count: int, *, timeout: float | None = DEFAULT_RESIZE_TIMEOUT) -> tuple[int, int]:
        """Set the number of online vCPUs; returns ``(old, new)`` as the guest counts them."""
        return await self._guest_call(self._live().devices.resize_vcpus(count, timeout))

    @requires(Trigger.HOTPLUG)
    async def resize_memory(self, mib: int, *, timeout: float | None = DEFAULT_RESIZE_TIMEOUT) -> int:
        """Grow (DIMMs in block-size steps) or shrink (remove DIMMs) memory; returns the new MiB."""
        return await self._guest_call(self._live().devices.resize_memory(mib, timeout))

    async def vcpu_thread_ids(self) -> dict[int, int]:
        """vCPU index -> host thread id (for pinning or cgroup placement)."""
        return await self.hypervisor.vcpu_thread_ids()

    def _request(self, trigger: Trigger) -> None:
        if self._machine.state is SandboxState.FAILED:
            raise self._events.failed()
        self._machine.fire(trigger)
