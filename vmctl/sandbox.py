"""Sandbox: a config, a hypervisor and a state machine, as an async context manager.

The sandbox owns a task group in which the hypervisor's ``run`` task lives. Calls check the
transition table before doing anything; state then changes only through events the hypervisor
reports (QMP events, process exit, faults). Leaving the ``async with`` block stops QEMU
(gracefully when it can) and removes the run directory, on every path, cancellation included.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from vmctl import detached as registry
from vmctl import resize
from vmctl.agent import (
    ExecResult,
    GuestBlockDevice,
    GuestMemory,
    InvalidArgument,
    parse_block_devices,
    parse_cpu_list,
    parse_memory,
)
from vmctl.config import SandboxConfig
from vmctl.devices import (
    BlockDevice,
    Device,
    NetworkDevice,
    Placement,
    SerialPort,
    device_from_mapping,
    device_to_mapping,
    id_prefix,
    stable_mac,
)
from vmctl.errors import (
    ConfigError,
    GuestError,
    NotSupported,
    Problem,
    QMPCommandError,
    QMPDisconnected,
    QMPError,
    SandboxFailed,
    VmctlError,
    VmctlTimeout,
)
from vmctl.hotplug import HotplugError, HotplugQueue, PluggedDevice, SlotAllocator
from vmctl.hypervisors.base import Backend, Capabilities, Hypervisor, RunPaths
from vmctl.hypervisors.cmdline import ROOT_DISK_ID, cold_devices
from vmctl.hypervisors.microvm import MicrovmHypervisor
from vmctl.hypervisors.qemu import QemuHypervisor
from vmctl.log import get_logger
from vmctl.paths import make_run_dir, process_identity, remove_tree
from vmctl.qmp import QmpEvent
from vmctl.state import SandboxState, StateMachine, Transition, Trigger

DEFAULT_START_TIMEOUT = 120.0
DEFAULT_STOP_TIMEOUT = 10.0
DEFAULT_CALL_TIMEOUT = 30.0
CONSOLE_TAIL_LINES = 50
SNAPSHOT_STATE = "state"
SNAPSHOT_CONFIG = "sandbox.json"

_QMP_TRIGGERS = {"STOP": Trigger.QMP_STOP, "RESUME": Trigger.QMP_RESUME, "GUEST_PANICKED": Trigger.GUEST_PANICKED}
_FAILED_SHUTDOWN_REASONS = {"guest-reset", "guest-panic", "host-signal", "host-error"}
# query-status answers that mean "vCPUs stopped, guest intact" (an attach finds it PAUSED)
_PAUSED_STATUSES = {"paused", "suspended", "postmigrate", "finish-migrate", "prelaunch", "debug", "save-vm"}


async def _iterate(receive: MemoryObjectReceiveStream[str]) -> AsyncIterator[str]:
    async with receive:
        async for item in receive:
            yield item


_TEMPLATE_FIELDS = ("boot_to_be_template", "boot_from_template", "memory_path", "devices_state_path", "accel")


def _template_record(state: Path) -> Path:
    return state.with_name(state.name + ".vmctl.json")


def _template_identity(config: SandboxConfig) -> dict[str, Any]:
    """What a clone must share with its template (everything but the template fields)."""
    return {k: v for k, v in config.to_mapping().items() if k not in _TEMPLATE_FIELDS}


def _check_template_matches(config: SandboxConfig) -> None:
    """A clone whose config drifted from its template is refused, never cold-booted instead."""
    assert config.devices_state_path is not None
    record = _template_record(config.devices_state_path)
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):
        raise ConfigError(
            [Problem("devices_state_path", f"no template record at {record}: boot the template again")]
        ) from None
    mine = _template_identity(config)
    problems = [Problem(key, f"the template has {saved.get(key)!r}, this config {mine.get(key)!r}")
                for key in sorted(set(saved) | set(mine)) if saved.get(key) != mine.get(key)]  # fmt: skip
    if problems:
        raise ConfigError(problems)


def disk_name(prefix: str, index: int) -> str:
    """Linux's disk names: vda..vdz, vdaa..vdaz, vdba..."""
    letters = ""
    index += 1
    while index > 0:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return prefix + letters


@contextmanager
def deadline(seconds: float | None, what: str) -> Iterator[None]:
    """``anyio.fail_after`` that raises our :class:`VmctlTimeout` naming what timed out."""
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError as exc:
        if isinstance(exc, VmctlError):
            raise
        raise VmctlTimeout(f"{what} did not finish within {seconds}s") from None


class _LaunchStatus:
    """The ``task_status`` handed to :meth:`Hypervisor.run`: sets an event when QEMU is up."""

    def __init__(self, event: anyio.Event) -> None:
        self._event = event

    def started(self, value: object = None) -> None:
        self._event.set()


class Sandbox:
    """One sandbox VM. Use ``async with Sandbox(config) as sb:``; it is running inside the block."""

    def __init__(
        self,
        config: SandboxConfig,
        *,
        id: str | None = None,  # noqa: A002 - the natural name for users
        backend: Backend | None = None,
        log_dir: str | Path | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        detached: bool = False,
    ) -> None:
        if id is not None:
            registry.check_id(id)
        self.id = id or f"sb-{secrets.token_hex(4)}"
        self._config = config
        self._backend: Backend = backend or (MicrovmHypervisor if config.machine == "microvm" else QemuHypervisor)
        self._log_dir = Path(log_dir).expanduser().absolute() / self.id if log_dir is not None else None
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.log = get_logger("vmctl.sandbox", sandbox=self.id)
        self._machine = StateMachine(on_transition=self._on_transition)
        self._hv: Hypervisor | None = None
        self._queue: HotplugQueue | None = None
        self._launched = anyio.Event()
        self._launch_error: Exception | None = None
        self._run_scope: anyio.CancelScope | None = None
        self._run_done: anyio.Event | None = None
        self._released = False
        self._incoming: Path | None = None
        self._paths: RunPaths | None = None
        self._tg: TaskGroup | None = None
        self._stack: AsyncExitStack | None = None
        self._graceful_exit = True
        self._stderr_tail = ""
        self._console_tail: deque[str] = deque(maxlen=CONSOLE_TAIL_LINES)
        self._console_subscribers: list[MemoryObjectSendStream[str]] = []
        #: QEMU outlives the controller: leaving the block detaches instead of stopping
        self.detached = detached
        self._attach_to: registry.Record | None = None
        self._lock: registry.AttachLock | None = None
        self._created = 0.0
        self._process_identity = ""

    # -- context manager ---------------------------------------------------------------------

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

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
        await self._close_stack(graceful=exc_type is None)

    async def _close_stack(self, *, graceful: bool) -> None:
        # Our own failures never pass through the task group (anyio would wrap them in an
        # ExceptionGroup): the stack always closes cleanly and the caller's exception goes on as is.
        stack, self._stack = self._stack, None
        if stack is None:
            return
        self._graceful_exit = graceful
        await stack.__aexit__(None, None, None)

    async def _teardown(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.stop_timeout + 30):
            try:
                # A detached sandbox this block started is detached only if the block ended
                # normally (a failure leaves nothing behind); one it attached to is always let go.
                keep = self._graceful_exit or self._attach_to is not None
                if self.detached and keep and self.state in (SandboxState.RUNNING, SandboxState.PAUSED):
                    await self.detach()
                else:
                    await self._stop(graceful=self._graceful_exit, timeout=self.stop_timeout)
            except Exception as err:  # teardown must finish; the cause is logged
                self.log.warning("stop on exit failed", error=repr(err))
        with anyio.CancelScope(shield=True):
            await self._release()
        self._tg = None

    # -- introspection -------------------------------------------------------------------------

    @property
    def state(self) -> SandboxState:
        return self._machine.state

    @property
    def config(self) -> SandboxConfig:
        """The effective config once created (defaults filled, accelerator resolved)."""
        return self._hv.effective_config() if self._hv else self._config

    def capabilities(self) -> Capabilities:
        return self._hypervisor().capabilities()

    @property
    def pid(self) -> int | None:
        return self._hv.pid if self._hv else None

    @property
    def run_dir(self) -> Path | None:
        return self._paths.run_dir if self._paths else None

    @property
    def console_path(self) -> Path | None:
        """The console's unix socket (one reader at a time; vmctl holds it while running)."""
        return self._paths.console_socket if self._paths else None

    @property
    def console_log_path(self) -> Path | None:
        return self._paths.console_log if self._paths else None

    @property
    def failure(self) -> str:
        return self._machine.failure

    @property
    def command_line(self) -> list[str]:
        return self._hypervisor().command_line

    @property
    def history(self) -> list[Transition]:
        return list(self._machine.history)

    @property
    def console_tail(self) -> list[str]:
        return list(self._console_tail)

    @property
    def hypervisor(self) -> Hypervisor:
        return self._hypervisor()

    def _hypervisor(self) -> Hypervisor:
        if self._hv is None:
            raise VmctlError("the sandbox has not been started")
        return self._hv

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, *, timeout: float | None = None) -> None:
        """Launch QEMU and return once the guest agent reports ready (state RUNNING)."""
        if self._tg is None:
            raise VmctlError("open the sandbox with 'async with Sandbox(config) as sb:'; it starts there")
        self._request(Trigger.START)
        limit = self.start_timeout if timeout is None else timeout
        try:
            with anyio.fail_after(limit):
                run_dir = self._claim_run_dir()
                self._paths = RunPaths(run_dir, run_dir)
                if self._log_dir is not None:
                    self._log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                    self._paths = RunPaths(run_dir, self._log_dir)
                if self._config.boot_from_template:
                    _check_template_matches(self._config)
                self._hv = self._backend(self._config, self._paths, self.id, self, self.log)
                self._hv.incoming = self._incoming
                self._hv.detached = self.detached
                if self._attach_to is not None:
                    self._hv.attach_pid = self._attach_to.pid
                    self._hv.keep_running = True  # a failed attach must not take the sandbox down
                await self._hv.create()
                self._run_done = anyio.Event()
                self._tg.start_soon(self._run_hypervisor, self._hv)
                await self._launched.wait()
                if self._launch_error is not None:
                    raise self._launch_error
                self._queue = self._make_queue(self._hv)
                if self._attach_to is not None:
                    confirmation, how = await self._adopt(self._attach_to)
                else:
                    await self._wait_guest_ready()
                    await self._confirm_cold_devices()
                    confirmation, how = Trigger.GUEST_READY, "agent ready"
            self._machine.fire(confirmation, how)
            if self._config.boot_to_be_template:
                await self._become_template()
            if self.detached:
                self._hv.keep_running = True  # from here on it outlives us
                self._save_record()
        except BaseException as exc:
            timed_out = isinstance(exc, TimeoutError) and not isinstance(exc, VmctlError)
            with anyio.CancelScope(shield=True):
                await self._abort_start(
                    exc, f"guest not ready within {limit}s" if timed_out else f"start failed: {exc!s}"[:2000]
                )
            if timed_out:
                raise self._ready_timeout(limit) from None
            raise

    def _claim_run_dir(self) -> Path:
        """A fresh run dir; for a detached sandbox its named, locked directory in the state dir."""
        if self._attach_to is not None:
            self._lock = registry.AttachLock(self._attach_to.directory, self.id)
            if self._attach_to.log_dir is not None:
                self._log_dir = Path(self._attach_to.log_dir)
            return self._attach_to.directory
        if self.detached:
            path, self._lock = registry.claim(self.id)
            self._created = time.time()
            return path
        return make_run_dir()

    async def _adopt(self, record: registry.Record) -> tuple[Trigger, str]:
        """Rebuild an attached sandbox's state from QEMU: its run state and its devices."""
        hv = self._hypervisor()
        self._created, self._process_identity = record.created, record.process
        status = str((await hv.execute("query-status")).get("status", "unknown"))
        try:
            present = {child["name"] for child in await hv.execute("qom-list", {"path": "/machine/peripheral"})}
        except QMPCommandError:  # no user-created devices at all
            present = set()
        queue = self._require_queue()
        for row in record.devices:
            if row["id"] not in present:
                self.log.warning("recorded device is gone from QEMU; dropped", device=row["id"])
                continue
            where = Placement(bus=row.get("bus"), addr=row.get("addr"), scsi_id=row.get("scsi_id"))
            queue.record_restored(row["id"], device_from_mapping(row["device"]), where, row.get("guest_path"))
        if status == "running":
            await hv.wait_ready()  # the agent answers a ping
            return Trigger.GUEST_READY, "attached: QEMU reports running"
        if status in _PAUSED_STATUSES:
            hv.agent.mark_ready()  # a paused guest cannot answer; it will once resumed
            return Trigger.FOUND_PAUSED, f"attached: QEMU reports {status}"
        hv.keep_running = False  # a guest QEMU calls dead is of no use to anyone
        raise SandboxFailed(f"attached, but QEMU reports the guest as {status!r}")

    def _save_record(self) -> None:
        """Write down what another process needs to attach (a detached sandbox only)."""
        hv = self._hypervisor()
        assert self._paths is not None and hv.pid is not None
        if not self._process_identity:
            self._process_identity = process_identity(hv.pid) or ""
        rows = [{"id": r.id, "device": device_to_mapping(r.device), "bus": r.placement.bus,
                 "addr": r.placement.addr, "scsi_id": r.placement.scsi_id, "guest_path": r.guest_path}
                for r in self.devices if r.hotplugged and r.device is not None]  # fmt: skip
        registry.write_record(registry.Record(
            id=self.id, pid=hv.pid, process=self._process_identity, config=self.config.to_mapping(),
            created=self._created, devices=rows, last_state=str(self.state), directory=self._paths.run_dir,
            log_dir=str(self._paths.log_dir) if self._paths.log_dir != self._paths.run_dir else None,
        ))  # fmt: skip

    @classmethod
    def attach(cls, sandbox_id: str, *, start_timeout: float = DEFAULT_START_TIMEOUT,
               stop_timeout: float = DEFAULT_STOP_TIMEOUT) -> Sandbox:  # fmt: skip
        """The detached sandbox ``sandbox_id``, to use with ``async with``, from any process.

        Entering the block reconnects to its QEMU (QMP, console, agent) and rebuilds its state
        from QEMU (``query-status``, the devices it still has); leaving it detaches again, unless
        :meth:`stop` was called. A sandbox whose QEMU is gone raises :class:`SandboxNotFound`
        (and its record is removed); one attached elsewhere raises :class:`SandboxBusy`.
        """
        record = registry.find(sandbox_id)  # checks the id before it names anything
        sandbox = cls(SandboxConfig.from_mapping(record.config), id=sandbox_id, detached=True,
                      start_timeout=start_timeout, stop_timeout=stop_timeout)  # fmt: skip
        sandbox._attach_to = record
        return sandbox

    async def detach(self) -> None:
        """Let go of a detached sandbox: its QEMU runs on, :meth:`attach` takes it up again."""
        if not self.detached:
            raise NotSupported("only a sandbox started with Sandbox(config, detached=True) can be detached: "
                               "the others die with their controller")  # fmt: skip
        self._machine.fire(Trigger.DETACH, "detached: QEMU runs on")
        self._hypervisor().keep_running = True
        if self._queue is not None:
            self._queue.fail_all(VmctlError("the sandbox was detached"))
        with anyio.CancelScope(shield=True):
            await self._release()

    def _make_queue(self, hv: Hypervisor) -> HotplugQueue:
        config = hv.effective_config()
        queue = HotplugQueue(hv.execute, config.device_context(), SlotAllocator(config.machine, config.pci_bridges))
        assert self._paths is not None
        for dev_id, device, where in cold_devices(config, self._paths, self.id):
            queue.record_cold(dev_id, device, where)
        queue.on_late_cleanup = self._schedule_late_cleanup
        return queue

    def _schedule_late_cleanup(self) -> None:
        if self._tg is not None and not self._released:
            self._tg.start_soon(self._late_cleanup)

    async def _late_cleanup(self) -> None:
        try:
            await self._require_queue().flush_late_cleanup()
        except VmctlError as exc:  # QEMU went away meanwhile: its backends went with it
            self.log.debug("late backend cleanup skipped", error=str(exc))

    async def _confirm_cold_devices(self) -> None:
        """Ask the guest what it calls each cold-plugged disk and NIC.

        virtio-mmio disks have no address the guest could be told about: they get names in the
        order they were attached (the root disk first), so vmctl predicts the name and the agent
        confirms it by serial. A mismatch fails the start rather than mounting the wrong disk.
        """
        queue = self._require_queue()
        agent = self._hypervisor().agent
        mmio_index = 0
        for record in queue.devices.values():
            key = self._guest_key(record.device, record)
            if key is None:
                continue
            found = await agent.wait_block_device(*key, timeout=DEFAULT_CALL_TIMEOUT)
            actual = found if key[0] != "net" else (found or "").removeprefix("/dev/") or None
            if isinstance(record.device, BlockDevice) and record.device.effective_driver(queue.ctx) == "virtio-mmio":
                predicted = f"/dev/{disk_name('vd', mmio_index)}"
                mmio_index += 1
                if actual != predicted:
                    raise GuestError(f"disk {record.id} ({record.device.path}) was predicted to be {predicted} "
                                     f"but the guest shows it as {actual or 'nothing'}")  # fmt: skip
            elif actual is None:
                raise GuestError(f"the guest does not show the cold-plugged device {record.id}")
            record.guest_path = actual

    def _require_queue(self) -> HotplugQueue:
        if self._queue is None:
            raise VmctlError("the sandbox has not been started")
        return self._queue

    async def _become_template(self) -> None:
        """Boot-to-be-template: pause at the ready point and save device state for clones."""
        assert self._config.devices_state_path is not None
        await self.pause()
        save = getattr(self._hypervisor(), "save_device_state", None)
        if save is None:
            raise NotSupported(f"the {self._hypervisor().name} backend cannot save templates")
        await save(self._config.devices_state_path, skip_shared=True)
        _template_record(self._config.devices_state_path).write_text(json.dumps(_template_identity(self._config)))
        self.log.info("template saved", devices_state=str(self._config.devices_state_path))

    async def _run_hypervisor(self, hv: Hypervisor) -> None:
        """The hypervisor's task. It lives in the sandbox's task group, not in the caller's
        scope: a cancelled or timed-out start is handled by :meth:`_abort_start`, which first
        records why, then releases. Launch errors go back to :meth:`start`, never to the group."""
        assert self._run_done is not None
        try:
            with anyio.CancelScope() as self._run_scope:
                if not self._released:
                    await hv.run(task_status=_LaunchStatus(self._launched))
        except Exception as exc:
            while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]  # a bug in a pump: report the cause, not the wrapper
            if self._launched.is_set():
                self.on_fault(f"hypervisor task failed: {exc!r}")
            else:
                self._launch_error = exc
        finally:
            self._launched.set()
            self._run_done.set()

    async def _wait_guest_ready(self) -> None:
        assert self._hv is not None
        hv = self._hv
        ready = False
        async with anyio.create_task_group() as tg:

            async def agent_ready() -> None:
                nonlocal ready
                await hv.wait_ready()
                ready = True
                tg.cancel_scope.cancel()

            tg.start_soon(agent_ready)
            await self._machine.wait_for(SandboxState.FAILED, SandboxState.STOPPING, SandboxState.STOPPED)
            tg.cancel_scope.cancel()
        if not ready:
            raise SandboxFailed(self._machine.failure or "stopped while starting", stderr_tail=self._stderr_tail)

    def _ready_timeout(self, limit: float) -> VmctlError:
        from vmctl.errors import ReadyTimeout

        accel = self.config.accel
        fix = (
            "KVM can hang on nested hosts: set accel='tcg' (or VMCTL_ACCEL=tcg)"
            if accel == "kvm"
            else "TCG is slow: raise start_timeout or run fewer sandboxes at once"
        )
        tail = "\n".join(self._console_tail)
        return ReadyTimeout(
            f"guest did not report ready within {limit}s under accel={accel}; {fix}"
            + (f"\nconsole (last lines):\n{tail}" if tail else "")
        )

    async def _abort_start(self, exc: BaseException, reason: str) -> None:
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            self._machine.fire_if_allowed(Trigger.STOP, "start cancelled")
        else:
            self._machine.fire_if_allowed(Trigger.FAULT, reason)
        await self._release()

    async def stop(self, *, timeout: float | None = None) -> None:
        """Stop the guest: power-off through the agent, then ``quit``, then SIGKILL. Idempotent."""
        await self._stop(graceful=True, timeout=self.stop_timeout if timeout is None else timeout)

    async def _stop(self, *, graceful: bool, timeout: float) -> None:
        state = self.state
        if state is SandboxState.STOPPED:
            return
        if state is SandboxState.CREATED:
            self._machine.fire(Trigger.STOP, "closed before start")
            return
        try:
            if state is not SandboxState.FAILED:
                self._machine.fire(Trigger.STOP, "stop requested")
                if self._hv is not None:
                    self._hv.keep_running = False  # stop means stop, detached or not
                if self._hv is not None:
                    await self._hv.stop(graceful=graceful and state is SandboxState.RUNNING, timeout=timeout)
                with anyio.move_on_after(5):
                    await self._machine.wait_for(SandboxState.STOPPED, SandboxState.FAILED)
        finally:
            with anyio.CancelScope(shield=True):
                await self._release()

    async def _release(self) -> None:
        """Kill and reap QEMU if still there, close connections, end pumps, remove the run dir."""
        self._released = True
        if self._hv is not None:
            await self._hv.disconnect()
        if self._run_scope is not None:
            self._run_scope.cancel()
        if self._run_done is not None:
            with anyio.CancelScope(shield=True):
                await self._run_done.wait()
        if self._hv is None or self._hv.pid is None:
            self._machine.fire_if_allowed(Trigger.PROCESS_EXIT, "no QEMU process was started")
        for stream in self._console_subscribers:
            stream.close()
        self._console_subscribers.clear()
        if self._paths is not None:
            hv = self._hv
            if hv is not None and hv.keep_running and hv.pid is not None and process_identity(hv.pid):
                if self.state is SandboxState.DETACHED:
                    self._save_record()  # the last state and devices, for the next attach
            else:
                remove_tree(self._paths.run_dir)
                if self.detached:
                    registry.prune(self._paths.run_dir.parent)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    async def pause(self, *, timeout: float | None = DEFAULT_CALL_TIMEOUT) -> None:
        """Pause the vCPUs; returns once QEMU confirms with a STOP event (state PAUSED)."""
        self._request(Trigger.PAUSE)
        with deadline(timeout, "pause"):
            await self._guest_call(self._hypervisor().pause())
            await self._machine.wait_for(SandboxState.PAUSED)

    async def resume(self, *, timeout: float | None = DEFAULT_CALL_TIMEOUT) -> None:
        """Resume the vCPUs; returns once QEMU confirms with a RESUME event (state RUNNING)."""
        self._request(Trigger.RESUME)
        with deadline(timeout, "resume"):
            await self._guest_call(self._hypervisor().resume())
            await self._machine.wait_for(SandboxState.RUNNING)

    async def snapshot(self, directory: str | Path, *, timeout: float = 300.0) -> Path:
        """Save memory and device state to ``directory`` (which must not exist); keep running.

        The snapshot is written into a hidden sibling directory and renamed into place at the
        end, so a failed or cancelled save leaves no directory that looks like a snapshot, and
        the sandbox running. :meth:`restore` starts it again, from any process.
        """
        target = Path(directory).expanduser().absolute()
        if target.exists():
            raise InvalidArgument(f"directory: {target} already exists; snapshots never overwrite")
        save = getattr(self._hypervisor(), "save_device_state", None)
        if save is None:
            raise NotSupported(f"the {self._hypervisor().name} backend cannot save snapshots")
        self._machine.check(Trigger.PAUSE)  # a running sandbox only
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            try:
                await self.pause()
                with deadline(timeout, "snapshot"):
                    await self._guest_call(save(partial / SNAPSHOT_STATE, skip_shared=False))
                    record = {"vmctl_snapshot": 1, "sandbox_id": self.id, "config": self.config.to_mapping()}
                    (partial / SNAPSHOT_CONFIG).write_text(json.dumps(record, indent=2))
                    partial.rename(target)
            except QMPError as exc:
                if type(exc) is not QMPError:  # a command error or a lost connection says enough
                    raise
                raise QMPError(f"snapshot to {target} failed: {exc}") from exc
            finally:
                with anyio.CancelScope(shield=True):
                    await self._undo_pause()
        finally:
            remove_tree(partial)
        self.log.info("snapshot saved", directory=str(target))
        return target

    async def _undo_pause(self) -> None:
        """Resume after a save, including one cancelled while ``stop`` was on its way to QEMU."""
        if self.state not in (SandboxState.RUNNING, SandboxState.PAUSED):
            return
        with anyio.move_on_after(10):
            try:
                if self.state is SandboxState.RUNNING:
                    status = (await self._hypervisor().execute("query-status")).get("status")
                    if status == "running":
                        return  # the stop never reached QEMU
                    await self._machine.wait_for(SandboxState.PAUSED)  # its STOP event is on the way
                await self.resume()
            except VmctlError as exc:
                self.log.warning("could not resume after the snapshot", error=str(exc))

    @classmethod
    def restore(cls, directory: str | Path, **options: Any) -> Sandbox:
        """A sandbox that starts from a snapshot instead of booting (use it with ``async with``)."""
        source = Path(directory).expanduser().absolute()
        try:
            record = json.loads((source / SNAPSHOT_CONFIG).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"directory: {source} is not a vmctl snapshot ({exc})") from None
        if record.get("vmctl_snapshot") != 1 or not (source / SNAPSHOT_STATE).is_file():
            raise InvalidArgument(f"directory: {source} is not a complete vmctl snapshot")
        sandbox = cls(SandboxConfig.from_mapping(record["config"]), **options)
        sandbox._incoming = source / SNAPSHOT_STATE
        return sandbox

    async def wait_for_state(self, *states: SandboxState, timeout: float | None = None) -> SandboxState:
        """Wait until the sandbox is in one of ``states``; fails fast once none can be reached."""
        with deadline(timeout, f"waiting for {'/'.join(map(str, states))}"):
            try:
                return await self._machine.wait_for(*states)
            except SandboxFailed as exc:
                raise SandboxFailed(exc.reason, stderr_tail=self._stderr_tail) from None

    def transitions(self) -> AsyncIterator[Transition]:
        """Every transition from the moment of this call, as it happens; ends after a terminal state."""
        return self._machine.transitions()

    def console_lines(self) -> AsyncIterator[str]:
        """Console output lines from the moment of this call; ends when the sandbox is torn down."""
        send, receive = anyio.create_memory_object_stream[str](1000)
        if self._released or self._machine.state.is_terminal:
            send.close()
        else:
            self._console_subscribers.append(send)
        return _iterate(receive)

    # -- guest ---------------------------------------------------------------------------------

    async def exec(self, argv: Sequence[str | bytes], *, stdin: bytes | str = b"", timeout: float | None = None,
                   check: bool = False) -> ExecResult:  # fmt: skip
        """Run ``argv`` in the guest and return its exit code, stdout and stderr.

        ``timeout`` kills the command in the guest (the result says ``timed_out``); ``check``
        raises :class:`~vmctl.agent.GuestCommandFailed` unless it exits 0.
        """
        self._request(Trigger.EXEC)
        data = stdin.encode() if isinstance(stdin, str) else stdin
        result: ExecResult = await self._guest_call(self._hypervisor().agent.exec(argv, stdin=data, timeout=timeout))
        return result.check() if check else result

    async def guest_block_devices(self) -> list[GuestBlockDevice]:
        """Block devices the guest sees (name, size, serial)."""
        self._request(Trigger.EXEC)
        return parse_block_devices(await self._guest_call(self._hypervisor().agent.query("block")))

    async def guest_online_cpus(self) -> list[int]:
        """CPU numbers the guest has online."""
        self._request(Trigger.EXEC)
        return parse_cpu_list(await self._guest_call(self._hypervisor().agent.query("cpus")))

    async def guest_memory(self) -> GuestMemory:
        """The guest's own view of its memory (from /proc/meminfo)."""
        self._request(Trigger.EXEC)
        return parse_memory(await self._guest_call(self._hypervisor().agent.query("memory")))

    async def _guest_call(self, call: Any) -> Any:
        try:
            return await call
        except (GuestError, QMPDisconnected) as exc:
            # The agent or QMP connection usually drops a moment before the process exit is noticed.
            hv = self._hypervisor()
            waiter = getattr(hv, "wait_exited", None)
            if waiter is not None:
                with anyio.move_on_after(2):
                    await waiter()
            if self.state is SandboxState.FAILED:
                raise SandboxFailed(self._machine.failure, stderr_tail=self._stderr_tail) from exc
            raise

    # -- devices -------------------------------------------------------------------------------

    @property
    def devices(self) -> list[PluggedDevice]:
        """The device table: cold-plugged and hot-plugged devices with their guest names."""
        return list(self._queue.devices.values()) if self._queue else []

    async def hotplug(self, device: Device, *, timeout: float | None = DEFAULT_CALL_TIMEOUT) -> PluggedDevice:
        """Plug ``device`` into the running sandbox; returns once QEMU took it and the guest sees it.

        The result's ``guest_path`` is the guest's name for it (``/dev/vdb``, ``eth1``), as
        reported by the guest agent.
        """
        self._request(Trigger.HOTPLUG)
        queue = self._require_queue()
        caps = self.capabilities()
        allowed = {"block": caps.block_hotplug, "network": caps.network_hotplug,
                   "vsock": caps.network_hotplug, "serial": True}.get(device.kind, caps.network_hotplug)  # fmt: skip
        if not allowed:
            raise NotSupported(f"this sandbox cannot hotplug {device.kind} devices (see capabilities())")
        problems = device.problems(queue.ctx)
        if problems:
            raise ConfigError(problems)
        dev_id = device.id or queue.new_id(id_prefix(device))
        if isinstance(device, SerialPort) and device.socket is None:
            assert self._paths is not None
            device = dataclasses.replace(device, socket=self._paths.run_dir / f"{dev_id}.sock")
        if isinstance(device, NetworkDevice) and device.mac is None:
            device = dataclasses.replace(device, mac=stable_mac(self.id, dev_id))
        confirm = self._confirmer(device, timeout or DEFAULT_CALL_TIMEOUT)
        return await self._guest_call(queue.plug(device, dev_id, confirm, timeout=timeout))  # type: ignore[no-any-return]

    def _guest_key(self, device: Device | None, record: PluggedDevice) -> tuple[str, str] | None:
        """How the agent finds a device in the guest: virtio disks by serial, SCSI disks by
        target, NICs by MAC."""
        if isinstance(device, BlockDevice):
            if device.effective_driver(self._require_queue().ctx) == "virtio-scsi":
                return "scsi", str(record.placement.scsi_id)
            return "virtio", record.id
        if isinstance(device, NetworkDevice):
            return "net", str(device.mac)
        return None

    def _confirmer(self, device: Device, timeout: float) -> Any:
        agent = self._hypervisor().agent

        async def confirm(record: PluggedDevice) -> str | None:
            key = self._guest_key(device, record)
            if key is None:
                return None
            found = await agent.wait_block_device(*key, timeout=timeout)
            if found is None:
                raise HotplugError(f"QEMU plugged {record.id} but the guest never showed it")
            return found if key[0] != "net" else found.removeprefix("/dev/")

        return confirm

    async def unplug(self, device: PluggedDevice | str, *, timeout: float | None = DEFAULT_CALL_TIMEOUT) -> None:
        """Remove a device; returns once QEMU confirms with ``DEVICE_DELETED`` for it."""
        self._request(Trigger.HOTPLUG)
        dev_id = device if isinstance(device, str) else device.id
        queue = self._require_queue()
        record = queue.devices.get(dev_id)
        if record is not None and record.device is None:
            raise InvalidArgument(f"{dev_id} is a CPU or memory device: use resize_vcpus / resize_memory")
        if dev_id == ROOT_DISK_ID:
            raise InvalidArgument("the root disk cannot be unplugged from a running sandbox")
        key = self._guest_key(record.device, record) if record is not None else None
        await self._guest_call(queue.unplug(dev_id, timeout=timeout))
        # A SCSI disk leaves QEMU before the guest has let it go: wait for the guest as well.
        # (PCI devices are only deleted after the guest released them, so the event suffices.)
        agent = self._hypervisor().agent
        if (
            key is not None
            and key[0] == "scsi"
            and not await self._guest_call(agent.wait_device_gone(*key, timeout=timeout or 30.0))
        ):
            raise HotplugError(f"QEMU removed {dev_id} but the guest still shows it")

    async def resize_vcpus(self, count: int, *, timeout: float = 120.0) -> tuple[int, int]:
        """Set the number of online vCPUs; returns ``(old, new)`` as the guest counts them."""
        self._request(Trigger.HOTPLUG)
        if (
            count > self.config.vcpus
            and not self.capabilities().cpu_hotplug
            and count > len(await self.guest_online_cpus())
        ):
            raise NotSupported("this sandbox cannot hotplug CPUs (max_vcpus == vcpus)")
        with deadline(timeout, "resize_vcpus"):
            return await self._guest_call(resize.resize_vcpus(self, count, timeout))  # type: ignore[no-any-return]

    async def resize_memory(self, mib: int, *, timeout: float = 120.0) -> int:
        """Grow (DIMMs in block-size steps) or shrink (remove DIMMs) memory; returns the new MiB."""
        self._request(Trigger.HOTPLUG)
        if not self.capabilities().memory_hotplug:
            raise NotSupported(
                "this sandbox cannot hotplug memory: set memory_slots and max_memory_mib above memory_mib"
            )
        with deadline(timeout, "resize_memory"):
            return await self._guest_call(resize.resize_memory(self, mib, timeout))  # type: ignore[no-any-return]

    async def vcpu_thread_ids(self) -> dict[int, int]:
        """vCPU index -> host thread id (for pinning or cgroup placement)."""
        return await self._hypervisor().vcpu_thread_ids()

    # -- events from the hypervisor (the Events protocol) --------------------------------------

    def _request(self, trigger: Trigger) -> None:
        if self._machine.state is SandboxState.FAILED:
            raise SandboxFailed(self._machine.failure, stderr_tail=self._stderr_tail)
        self._machine.fire(trigger)

    def on_qmp_event(self, event: QmpEvent) -> None:
        if self._queue is not None:
            self._queue.on_event(event)
        trigger = _QMP_TRIGGERS.get(event.name)
        reason = event.name.lower()
        if event.name == "SHUTDOWN":
            # A reset (we run with reboot=shutdown) or a signal from outside is a failure; while
            # vmctl itself is stopping the sandbox the table absorbs it (STOPPING stays STOPPING).
            why = str(event.data.get("reason", ""))
            trigger = Trigger.FAULT if why in _FAILED_SHUTDOWN_REASONS else Trigger.QMP_SHUTDOWN
            reason = {"host-signal": "QEMU was stopped by a signal vmctl did not send",
                      "host-error": "QEMU stopped on a host error",
                      "guest-reset": "the guest reset (a kernel panic, or a reboot, which sandboxes do not do)",
                      "guest-panic": "guest kernel panicked"}.get(why, f"shutdown: {why}")  # fmt: skip
        if event.name == "GUEST_PANICKED":
            reason = "guest kernel panicked"
        if trigger is not None and self._machine.fire_if_allowed(trigger, reason) is None:
            self.log.debug("event ignored in this state", qmp_event=event.name, state=str(self.state))

    def on_process_exit(self, returncode: int, stderr_tail: str, *, requested: bool) -> None:
        self._stderr_tail = stderr_tail
        if requested:
            self._machine.fire_if_allowed(Trigger.STOP, "stopped by vmctl")
        self._machine.fire_if_allowed(Trigger.PROCESS_EXIT, f"QEMU exited with code {returncode}")

    def on_fault(self, reason: str) -> None:
        self._machine.fire_if_allowed(Trigger.FAULT, reason)

    def on_console_line(self, line: str) -> None:
        self._console_tail.append(line)
        for stream in list(self._console_subscribers):
            try:
                stream.send_nowait(line)
            except anyio.WouldBlock:
                pass  # a slow reader loses lines rather than stalling the console
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._console_subscribers.remove(stream)

    def _on_transition(self, step: Transition) -> None:
        self.log.info("state", old=str(step.old), new=str(step.new), trigger=str(step.trigger), reason=step.reason)
        if step.new is SandboxState.FAILED:
            self.log.error("sandbox failed", reason=step.reason, qemu_stderr=self._stderr_tail)
            failure = SandboxFailed(step.reason, stderr_tail=self._stderr_tail)
            if self._hv is not None:
                self._hv.agent.fail_all(failure)
            if self._queue is not None:
                self._queue.fail_all(failure)
