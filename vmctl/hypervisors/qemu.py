"""The QEMU backend (q35 / pc with PCI): launch, QMP, console, agent channel, stop.

``run`` is one task in the sandbox's task group; every pump it needs lives in its own task
group, so cancelling ``run`` ends them all, and its ``finally`` makes sure the process is dead
and the QMP session closed whatever happened.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import anyio
from anyio.abc import TaskStatus

from vmctl import host
from vmctl.config import SandboxConfig
from vmctl.errors import ConfigError, GuestError, HostError, Problem, QMPError, SandboxFailed
from vmctl.hypervisors.base import Capabilities, Hypervisor
from vmctl.hypervisors.cmdline import build_command
from vmctl.lines import read_lines
from vmctl.migration import MigrationTracker, load_device_state, save_device_state
from vmctl.qmp import QmpSession

STDERR_TAIL_LINES = 40
CHANNELS = ("qmp", "console", "agent")


class VmProcess(Protocol):
    """What the backend needs of a running QEMU (real or fake)."""

    @property
    def pid(self) -> int | None: ...
    @property
    def returncode(self) -> int | None: ...
    async def wait(self) -> int: ...
    def kill(self) -> None: ...
    def stderr_lines(self) -> AsyncIterator[str]: ...


class _OsProcess:
    """A real QEMU process started by anyio."""

    def __init__(self, process: anyio.abc.Process) -> None:
        self._process = process

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def wait(self) -> int:
        return await self._process.wait()

    def kill(self) -> None:
        if self._process.returncode is None:
            try:
                self._process.kill()
            except ProcessLookupError:
                pass

    async def stderr_lines(self) -> AsyncIterator[str]:
        assert self._process.stderr is not None
        async for line in read_lines(self._process.stderr):
            yield line.decode(errors="replace")

    async def aclose(self) -> None:
        await self._process.aclose()


class _PidProcess:
    """A QEMU we do not reap through asyncio: a detached one we started, or one we attach to.

    asyncio kills a child whose transport is closed, so a QEMU meant to outlive us is started
    with :class:`subprocess.Popen` instead, and watched (like an adopted one) through a pidfd,
    which also makes signals immune to pid reuse. Its stderr goes to ``qemu.log`` directly.
    """

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self._pid = pid
        self._popen = popen
        self._pidfd: int | None = os.pidfd_open(pid)
        self._rc: int | None = None
        self._lock = anyio.Lock()

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def returncode(self) -> int | None:
        if self._rc is None and self._pidfd is not None and select.select([self._pidfd], [], [], 0)[0]:
            self._rc = self._collect()
        return self._rc

    def _collect(self) -> int:
        if self._popen is not None:
            return self._popen.wait()
        try:  # our own child after all (a detached QEMU attached to by the process that started it)
            pid, status = os.waitpid(self._pid, os.WNOHANG)
            return os.waitstatus_to_exitcode(status) if pid else -1
        except ChildProcessError:
            return -1  # not our child: its exit code is not ours to read

    async def wait(self) -> int:
        async with self._lock:
            if self._rc is None:
                assert self._pidfd is not None
                await anyio.wait_readable(self._pidfd)
                self._rc = self._collect()
        return self._rc

    def kill(self) -> None:
        if self._pidfd is not None and self.returncode is None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def stderr_lines(self) -> AsyncIterator[str]:
        return
        yield  # pragma: no cover

    async def aclose(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def listen_unix(path: Path) -> socket.socket:
    """A listening unix socket at ``path``, readable only by this user."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(8)
    except BaseException:
        sock.close()
        raise
    return sock


async def resolve_accel(config: SandboxConfig, qemu: Path, log: Any) -> str:
    """``auto`` becomes KVM only where a guest really boots under it; else TCG with a warning."""
    wanted = config.effective_accel()
    if wanted == "tcg":
        return "tcg"
    if wanted == "kvm":
        if not host.kvm_device_usable():
            raise HostError("accel=kvm but /dev/kvm is missing or unusable: set accel='tcg' (or VMCTL_ACCEL=tcg)")
        return "kvm"
    verdict = await host.kvm_boots_guests(qemu, config.kernel)
    if verdict.usable:
        return "kvm"
    if verdict.host_key not in _WARNED:  # once per process, not once per sandbox
        _WARNED.add(verdict.host_key)
        log.warning("KVM not usable, falling back to TCG", reason=verdict.reason)
    return "tcg"


_WARNED: set[str] = set()
_DETACHED_CHILDREN: set[subprocess.Popen[bytes]] = set()


class QemuHypervisor(Hypervisor):
    name = "qemu"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._qmp = QmpSession(f"vmctl-{self.sandbox_id}")
        self._effective = self.config
        self._argv: list[str] = []
        self._process: VmProcess | None = None
        self._stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._stderr_done = anyio.Event()
        self._exited = anyio.Event()
        self._scope: anyio.CancelScope | None = None
        self._closing = False
        self._migration = MigrationTracker()

    # -- introspection ---------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def command_line(self) -> list[str]:
        return list(self._argv)

    @property
    def stderr_tail(self) -> str:
        return "\n".join(self._stderr_tail)

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    @property
    def qmp(self) -> QmpSession:
        return self._qmp

    def effective_config(self) -> SandboxConfig:
        return self._effective

    def capabilities(self) -> Capabilities:
        c = self._effective
        return Capabilities(
            block_hotplug=not c.disable_block_devices and (c.pci_bridges > 0 or c.block_driver == "virtio-scsi"),
            cpu_hotplug=(c.max_vcpus or 1) > c.vcpus,
            memory_hotplug=c.memory_hotplug_possible,
            network_hotplug=c.pci_bridges > 0,
            vsock=c.vsock,
        )

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self._qmp.execute(command, arguments)

    async def vcpu_thread_ids(self) -> dict[int, int]:
        cpus = await self._qmp.execute("query-cpus-fast")
        return {int(cpu["cpu-index"]): int(cpu["thread-id"]) for cpu in cpus}

    # -- lifecycle -------------------------------------------------------------------------

    async def create(self) -> None:
        if self.attach_pid is not None:  # already running: the recorded config is the effective one
            return
        qemu = host.find_qemu(self.config.qemu_binary)
        machines = await host.qemu_machines(qemu)
        if self.config.machine not in machines:
            raise ConfigError([Problem("machine", f"{self.config.machine!r} is not offered by {qemu} "
                                                  f"(it has: {', '.join(sorted(machines)[:12])}...)")])  # fmt: skip
        accel = await resolve_accel(self.config, qemu, self.log)
        self._effective = self.config.replace(accel=accel, qemu_binary=qemu)
        self._argv = build_command(self._effective, self.paths, self.sandbox_id, {n: -1 for n in CHANNELS},
                                   incoming=self.incoming is not None)  # fmt: skip

    async def _spawn(self, argv: list[str], listeners: Mapping[str, socket.socket]) -> VmProcess:
        """Start QEMU; it inherits the listening sockets and dies with this process (PDEATHSIG)."""
        if self.detached:
            return self._spawn_detached(argv, listeners)
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
        if not setpriv:
            self.log.warning("setpriv not found (util-linux): QEMU will outlive a crashed controller")
        process = await anyio.open_process(
            prefix + argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            pass_fds=[s.fileno() for s in listeners.values()],
            start_new_session=True,  # a Ctrl-C aimed at the controller must not kill the VMs behind its back
            umask=0o077,  # what QEMU creates (a template's memory file: guest RAM) is ours alone
        )  # fmt: skip
        return _OsProcess(process)

    def _spawn_detached(self, argv: list[str], listeners: Mapping[str, socket.socket]) -> VmProcess:
        fd = os.open(self.paths.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            popen = subprocess.Popen(  # noqa: ASYNC220 - fork+exec only; asyncio would kill it on exit
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fd,
                pass_fds=[s.fileno() for s in listeners.values()], start_new_session=True, umask=0o077,
            )  # fmt: skip
        finally:
            os.close(fd)
        # Held (not dropped) so Python neither warns about a running child nor forgets to reap
        # it: finished ones are collected on the next detached start.
        _DETACHED_CHILDREN.difference_update([p for p in _DETACHED_CHILDREN if p.poll() is not None])
        _DETACHED_CHILDREN.add(popen)
        return _PidProcess(popen.pid, popen)

    def _read_log_tail(self) -> None:
        try:
            lines = self.paths.qemu_log.read_text(errors="replace").splitlines()
        except OSError:
            return
        self._stderr_tail.extend(lines[-STDERR_TAIL_LINES:])

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        listeners: dict[str, socket.socket] = {}
        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                try:
                    if self.attach_pid is not None:
                        self._process = _PidProcess(self.attach_pid)
                    else:
                        for log in (self.paths.console_log, self.paths.qemu_log):  # QEMU would make them 0644
                            os.close(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600))
                        for name in CHANNELS:
                            listeners[name] = listen_unix(getattr(self.paths, f"{name}_socket"))
                        fds = {name: s.fileno() for name, s in listeners.items()}
                        self._argv = build_command(self._effective, self.paths, self.sandbox_id, fds,
                                                   incoming=self.incoming is not None)  # fmt: skip
                        self.log.debug("launching qemu", argv=self._argv)
                        self._process = await self._spawn(self._argv, listeners)
                    self.log = self.log.bind(pid=self._process.pid)
                    for sock in listeners.values():
                        sock.close()
                    tg.start_soon(self._pump_stderr)
                    tg.start_soon(self._watch_process)
                    await self._launch(tg)
                except Exception as exc:  # raised after the group closes, so callers never see a group
                    failure = await self._launch_failure(exc) if self._process is not None else exc
                    self.events.on_fault(f"start failed: {failure}"[:2000])  # before the reap below
                    tg.cancel_scope.cancel()
                else:
                    task_status.started()
                    await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                for sock in listeners.values():
                    sock.close()
                await self._reap()
                await self._qmp.close()
        if failure is not None:
            raise failure

    async def _launch(self, tg: anyio.abc.TaskGroup) -> None:
        await self._qmp.connect(self.paths.qmp_socket)
        tg.start_soon(self._pump_events)
        tg.start_soon(self._watch_qmp)
        await tg.start(self.agent.run)
        tg.start_soon(self._pump_console)
        if self.attach_pid is not None:
            return  # a running guest: nothing to load, nothing to release
        if self.incoming is not None:
            await load_device_state(self._qmp, self._migration, self.incoming, skip_shared=False)
        elif self._effective.boot_from_template:
            assert self._effective.devices_state_path is not None
            await load_device_state(self._qmp, self._migration, self._effective.devices_state_path, skip_shared=True)
        await self._qmp.execute("cont")

    async def _launch_failure(self, exc: Exception) -> Exception:
        """If QEMU died while starting, say so with its stderr instead of the socket error."""
        with anyio.move_on_after(2):
            await self._exited.wait()
        if self._exited.is_set():
            rc = self._process.returncode if self._process else None
            return SandboxFailed(f"QEMU exited with code {rc} while starting", stderr_tail=self.stderr_tail)
        return exc

    async def _reap(self) -> None:
        """Make sure the process is gone (SIGKILL if needed) and collected."""
        if self._process is None:
            return
        if self.keep_running and self._process.returncode is None:
            self.log.info("left running (detached)")
        else:
            if self._process.returncode is None:
                self._closing = True
                self._process.kill()
            with anyio.move_on_after(10):
                self._note_exit(await self._process.wait())
        closer = getattr(self._process, "aclose", None)
        if closer is not None:
            with anyio.move_on_after(2):
                await closer()

    async def _pump_stderr(self) -> None:
        assert self._process is not None
        try:
            with open(self.paths.qemu_log, "a", encoding="utf-8") as log_file:
                async for line in self._process.stderr_lines():
                    self._stderr_tail.append(line)
                    log_file.write(line + "\n")
                    log_file.flush()
                    self.log.debug("qemu stderr", line=line)
        finally:
            self._stderr_done.set()

    async def _watch_process(self) -> None:
        assert self._process is not None
        rc = await self._process.wait()
        if isinstance(self._process, _PidProcess):
            self._read_log_tail()
        with anyio.move_on_after(1):
            await self._stderr_done.wait()
        await self._qmp.drain()
        self._note_exit(rc)

    def _note_exit(self, rc: int) -> None:
        if not self._exited.is_set():
            self._exited.set()
            self.events.on_process_exit(rc, self.stderr_tail, requested=self._closing)

    async def _pump_events(self) -> None:
        try:
            async for event in self._qmp.events():
                self.log.debug("qmp event", name=event.name, data=event.data)
                self._migration.on_event(event)
                self.events.on_qmp_event(event)
        except Exception as exc:  # an event we could not handle must not go unnoticed
            self.events.on_fault(f"QMP event pump failed: {exc!r}")

    async def _watch_qmp(self) -> None:
        await self._qmp.wait_disconnected()
        if self._closing:
            return
        with anyio.move_on_after(2):
            await self._exited.wait()  # QEMU exiting explains the lost connection
        if not self._exited.is_set() and not self._closing:
            self.events.on_fault("QMP connection lost while QEMU still runs")

    async def _pump_console(self) -> None:
        try:
            stream = await anyio.connect_unix(self.paths.console_socket)
        except OSError:
            return
        async with stream:
            async for line in read_lines(stream):
                self.events.on_console_line(line.decode(errors="replace").rstrip("\r"))

    async def wait_ready(self) -> None:
        if self._effective.boot_from_template or self.incoming is not None or self.attach_pid is not None:
            # A clone or a restored snapshot resumes a guest whose agent announced itself long
            # ago: ask it instead.
            await self.agent.ping()
            self.agent.mark_ready()
        await self.agent.wait_ready()

    async def query_status(self) -> str:
        """QEMU's run state (``running``, ``paused``, ``shutdown``, ...), from ``query-status``."""
        reply = await self._qmp.execute("query-status")
        return str(reply.get("status", "unknown"))

    async def save_device_state(self, path: Path, *, skip_shared: bool) -> None:
        """Save the (paused) VM's state; with ``skip_shared`` (templates) RAM in the shared
        memory file is left out, since clones map that file."""
        await save_device_state(self._qmp, self._migration, path, skip_shared=skip_shared)

    async def wait_exited(self) -> None:
        await self._exited.wait()

    async def pause(self) -> None:
        await self._qmp.execute("stop")

    async def resume(self) -> None:
        await self._qmp.execute("cont")

    async def stop(self, *, graceful: bool, timeout: float) -> None:
        if self._process is None or self._exited.is_set():
            return
        self._closing = True
        if graceful and self.agent.ready:
            with anyio.move_on_after(timeout):
                try:
                    await self.agent.poweroff()
                    await self._exited.wait()
                except GuestError:
                    pass
        if not self._exited.is_set() and self._qmp.connected:
            with anyio.move_on_after(5):
                try:
                    await self._qmp.execute("quit", timeout=2)
                except QMPError:
                    pass
                await self._exited.wait()
        if not self._exited.is_set():
            self.log.warning("QEMU did not exit, killing it")
            self._process.kill()
            with anyio.move_on_after(10):
                await self._exited.wait()

    async def disconnect(self) -> None:
        self._closing = True
        await self._qmp.close()
        self.agent.fail_all(GuestError("disconnected from the sandbox"))
        if self._scope is not None:
            self._scope.cancel()
