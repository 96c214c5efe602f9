"""The QEMU backend (q35 / pc with PCI): launch, QMP, console, agent channel, stop.

``run`` is one task in the sandbox's task group; every pump it needs lives in its own task
group, so cancelling ``run`` ends them all, and its ``finally`` makes sure the process is dead
(unless the sandbox was let go, detached) and the QMP session closed whatever happened.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from vmctl.config import SandboxConfig
from vmctl.core.lines import read_lines, tail_lines
from vmctl.core.qmp import QmpSession
from vmctl.devices import Device, virtiofs_share
from vmctl.errors import GuestDisconnected, GuestError, QMPError, SandboxFailed
from vmctl.hypervisors import cgroups, handover, jail, jailhelper
from vmctl.hypervisors.base import Capabilities, Hypervisor, Launcher, Start, VmProcess
from vmctl.hypervisors.cmdline import build_command
from vmctl.hypervisors.process import PidProcess, QemuLauncher, listen_unix
from vmctl.hypervisors.savestate import MigrationTracker, load_device_state, save_device_state
from vmctl.hypervisors.virtiofs import ShareDaemons

STDERR_TAIL_LINES = 40


class CappedLog:
    """An append-only log that never grows past ``limit`` bytes: when full it becomes
    ``NAME.1`` (replacing the one before) and a new file starts. Opened without following
    symlinks, created 0600."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)

    def write(self, data: bytes) -> None:
        if self._fd < 0:
            return
        if self._size + len(data) > self.limit:
            os.close(self._fd)
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self._fd = self._open()
            self._size = 0
            data = data[: self.limit]
        try:
            self._size += os.write(self._fd, data)
        except OSError:  # a full disk must not stop the console stream
            pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
CHANNELS = ("qmp", "console", "agent")


class QemuHypervisor(Hypervisor):
    name = "qemu"

    def __init__(self, *args: Any, launcher: Launcher | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._launcher: Launcher = launcher or QemuLauncher()
        #: when each start-up step ended, in seconds after QEMU was spawned (for benchmarks and logs)
        self.startup_timings: dict[str, float] = {}
        self._t0 = 0.0  # when QEMU was spawned
        self._qmp = QmpSession(f"vmctl-{self.sandbox_id}")
        self._effective = self.config
        self._argv: list[str] = []
        self._process: VmProcess | None = None
        self._stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._stderr_done = anyio.Event()
        self._exited = anyio.Event()
        self._scope: anyio.CancelScope | None = None
        self._closing = False
        self._keep_running = False
        self._migration = MigrationTracker()
        self._jail: jail.Jail | None = None
        self._cgroup: cgroups.Cgroup | None = None
        self._handover: handover.Handover | None = None
        self._shares: ShareDaemons | None = None
        self._backend_sizes: dict[str, int] = {}
        self._boot_files: dict[str, Path] = {}  # kernel, initrd, firmware inside the jail (config: the user's)

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
    def qmp(self) -> QmpSession:
        return self._qmp

    def effective_config(self) -> SandboxConfig:
        return self._effective

    def capabilities(self) -> Capabilities:
        return Capabilities.of_pci_machine(self._effective)

    async def start_helpers(self, dev_id: str, device: Device) -> None:
        if virtiofs_share(device):  # (no daemons when attached: this controller did not make QEMU's jail)
            await ShareDaemons.start_in(self._shares, dev_id, device)

    def can_start_helpers(self) -> bool:
        return self._shares is not None

    async def stop_helpers(self, dev_id: str) -> None:
        if self._shares is not None:
            await self._shares.stop(dev_id)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if self._handover is None:
            return await self._qmp.execute(command, arguments)
        arguments = await self._handover.command(command, arguments, self._qmp)
        self._follow_memory(command, arguments, before=True)
        try:
            reply = await self._qmp.execute(command, arguments)
        except BaseException:
            self._follow_memory(command, arguments, before=False, failed=True)
            raise
        self._follow_memory(command, arguments, before=False)
        await self._handover.forget(command, arguments, self._qmp)
        return reply

    def _follow_memory(self, command: str, arguments: dict[str, Any] | None, *, before: bool,
                       failed: bool = False) -> None:  # fmt: skip
        """Hot-added RAM (a memory backend) raises the cgroup's limit before QEMU allocates it;
        a removed one, or one QEMU refused, lowers it again."""
        group = self._cgroup
        if group is None or group.limits is None or not arguments or self._effective.memory_limit_mib is not None:
            return
        if command == "object-add" and str(arguments.get("qom-type", "")).startswith("memory-backend"):
            size = int(arguments.get("size", 0))
            if before:
                self._backend_sizes[str(arguments.get("id"))] = size
                group.set_memory(group.limits.memory_bytes + size)
            elif failed:
                group.set_memory(group.limits.memory_bytes - self._backend_sizes.pop(str(arguments.get("id")), 0))
        elif command == "object-del" and not before and not failed:
            group.set_memory(group.limits.memory_bytes - self._backend_sizes.pop(str(arguments.get("id")), 0))

    async def vcpu_thread_ids(self) -> dict[int, int]:
        cpus = await self._qmp.execute("query-cpus-fast")
        tids = {int(cpu["cpu-index"]): int(cpu["thread-id"]) for cpu in cpus}
        return jail.host_thread_ids(self.pid, tids) if self.pid is not None else tids

    @property
    def jail(self) -> dict[str, str]:
        """Each part of the jail: ``on``, or why it is off for this sandbox."""
        return self._jail.parts() if self._jail is not None else {}

    @property
    def qemu_pid(self) -> int | None:
        """QEMU's own pid on the host (``pid`` is the jail's outer process with a PID namespace)."""
        return jail.inner_pid(self.pid) if self.pid is not None else None

    # -- lifecycle -------------------------------------------------------------------------

    async def create(self) -> None:
        if self.plan.start is Start.ATTACH:  # already running: the recorded config is the effective one
            return
        self._effective = await self._launcher.resolve(self.config, self.log)
        self._argv = self._command({n: -1 for n in CHANNELS})

    def _command(self, fds: dict[str, int]) -> list[str]:
        return build_command(self._effective, self.paths, self.sandbox_id, fds,
                             incoming=self.plan.incoming is not None, devices=self.plan.devices,
                             restored=self.plan.restored, boot_files=self._boot_files)  # fmt: skip

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        listeners: dict[str, socket.socket] = {}
        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                try:
                    if self.plan.attach_pid is not None:
                        self._process = PidProcess(self.plan.attach_pid)
                        self._cgroup = jail.existing_cgroup(self.paths)
                        if jail.inner_pid(self.plan.attach_pid) != self.plan.attach_pid:  # a jailed QEMU
                            self._handover = handover.Handover(
                                fd_disks=True, network=self._effective.network, jail=jail.Jail(), detached=True,
                                log_path=self.paths.qemu_log, socket_dir=self.paths.qemu_dir, log=self.log,
                                attached=True)  # fmt: skip
                    else:
                        for log in (self.paths.console_log, self.paths.qemu_log):
                            os.close(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600))
                        await self._spawn(listeners, tg)
                    assert self._process is not None
                    self.log = self.log.bind(pid=self._process.pid)
                    for sock in listeners.values():
                        sock.close()
                    if self._handover is not None:
                        self._handover.release_held()
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
                try:  # each step runs even if one before it raised: nothing may be left behind
                    await self._reap()
                finally:
                    try:
                        await self._qmp.close()
                    finally:
                        await self._release_jail()
        if failure is not None:
            raise failure

    def _stamp(self, step: str) -> None:
        """Note when a start-up step ended (``startup_timings``: seconds since ``spawn``)."""
        now = time.perf_counter()
        self._t0 = now if step == "spawn" else self._t0
        self.startup_timings[step] = round(now - self._t0, 4)

    async def _spawn(self, listeners: dict[str, socket.socket], tg: anyio.abc.TaskGroup) -> None:
        """Jail, command line, start: the cgroup exists before QEMU does, and the disks and
        egress NICs are handed over by descriptor."""
        self.paths.qemu_dir.mkdir(mode=0o700, exist_ok=True)
        if self._launcher.jails:  # a real QEMU: a test double has nothing to jail
            await self._enter_jail()
        for name in CHANNELS:
            listeners[name] = listen_unix(getattr(self.paths, f"{name}_socket"))
        argv = self._command({name: s.fileno() for name, s in listeners.items()})
        self._argv, extra_fds = await self._handover.command_line(argv) if self._handover else (argv, [])
        if self._shares is not None:  # each share's virtiofsd listens before QEMU connects (its own length)
            self.startup_timings["shares"] = await self._shares.start_cold(tg, self.plan.devices or ())
        self.log.debug("launching qemu", argv=self._argv, jail=self._jail.parts() if self._jail else None)
        self._stamp("spawn")
        self._process = await self._launcher.spawn(self._argv, listeners, detached=self.plan.detached,
                                                   log_path=self.paths.qemu_log, tg=tg, jail=self._jail,
                                                   extra_fds=extra_fds)  # fmt: skip

    async def _enter_jail(self) -> None:
        devices = [d for _, d, _ in [*(self.plan.devices or ()), *self.plan.restored]]
        self._jail = jail.plan(self._effective, self.paths, devices, nic_netns=jail.nic_netns(self._effective, devices))
        if self._jail.active:
            self._jail.helper = await jailhelper.ensure()
        self._boot_files = jail.prepare(self._jail, self._effective, self.paths)
        if self._jail.cgroup is not None:
            self._jail.cgroup.create(jail.limits_for(self._effective))
            self._cgroup = self._jail.cgroup
        self._handover = handover.Handover(fd_disks=self._jail.drops_user or "mount" in self._jail.namespaces,
                                       network=self._effective.network, jail=self._jail, detached=self.plan.detached,
                                       log_path=self.paths.qemu_log, socket_dir=self.paths.qemu_dir,
                                       log=self.log)  # fmt: skip
        if "mount" in self._jail.namespaces:
            self._jail.binds += [(p, p, True) for p in self._handover.extra_binds]
        self._shares = ShareDaemons(run_dir=self.paths.run_dir, log_dir=self.paths.log_dir, jail=self._jail,
                                    qemu_uid=self._jail.uid, detached=self.plan.detached, log=self.log,
                                    on_failure=self.events.on_fault)  # fmt: skip

    async def _release_jail(self) -> None:
        """After QEMU is gone (or let go): passt processes and descriptors, then the cgroup."""
        kept = self._keep_running and self._process is not None and self._process.returncode is None
        if self._handover is not None:
            self._handover.close(keep_running=kept)
        if self._shares is not None:
            await self._shares.close(keep_running=kept)
        if self._cgroup is not None and not kept:
            # removal kills what is left in it first: nothing of this sandbox outlives it
            if not await self._cgroup.remove_async():
                self.log.warning("cgroup not removed", cgroup=str(self._cgroup.path))

    async def _launch(self, tg: anyio.abc.TaskGroup) -> None:
        self._stamp("spawned")
        await self._qmp.connect(self.paths.qmp_socket)
        self._stamp("qmp")
        tg.start_soon(self._pump_events)
        tg.start_soon(self._watch_qmp)
        await tg.start(self.agent.serve)
        self._stamp("agent_connected")
        try:  # connected before the guest runs, so console.log has its first line
            console = await anyio.connect_unix(self.paths.console_socket)
        except OSError:
            pass
        else:
            tg.start_soon(self._pump_console, console)
        if self.plan.start is Start.ATTACH:
            return  # a running guest: nothing to load, nothing to release
        if self.plan.incoming is not None:
            skip_shared = self.plan.start is Start.CLONE  # a clone maps the template's RAM file
            await load_device_state(self._qmp, self._migration, self.plan.incoming, skip_shared=skip_shared)
            self._stamp("state_loaded")
        await self._qmp.execute("cont")
        self._stamp("cont")

    async def _launch_failure(self, exc: Exception) -> Exception:
        """If QEMU died while starting, say so with its stderr instead of the socket error."""
        with anyio.move_on_after(2):
            await self._exited.wait()
        if self._exited.is_set():
            rc = self._process.returncode if self._process else None
            return SandboxFailed(f"QEMU exited with code {rc} while starting", stderr_tail=self.stderr_tail)
        return exc

    async def _reap(self) -> None:
        """Make sure the process is gone (SIGKILL if needed) and collected, unless it is kept."""
        if self._process is None:
            return
        if self._keep_running and self._process.returncode is None:
            self.log.info("left running (detached)")
        else:
            if self._process.returncode is None:
                self._closing = True
                self._process.kill()
                with anyio.move_on_after(2):
                    await self._process.wait()
                self._process.kill()  # the jail's outer process, should it not have followed QEMU
            with anyio.move_on_after(10):
                self._note_exit(await self._process.wait())
        with anyio.move_on_after(2):
            await self._process.aclose()

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
        if self._cgroup is not None and rc != 0 and self._cgroup.oom_killed():
            limit = self._cgroup.limits.memory_bytes // 2**20 if self._cgroup.limits else "?"
            self._stderr_tail.append(f"vmctl: QEMU was killed by its cgroup's memory limit ({limit} MiB, "
                                     f"{self._cgroup.path}): raise memory_limit_mib")  # fmt: skip
        if isinstance(self._process, PidProcess):  # attached: QEMU's stderr went to its log only
            self._stderr_tail.extend(tail_lines(self.paths.qemu_log, STDERR_TAIL_LINES))
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

    async def _pump_console(self, stream: anyio.abc.SocketStream) -> None:
        """The console's lines to the live stream and to console.log (capped, rotated once)."""
        log = CappedLog(self.paths.console_log, self._effective.console_log_limit_mib * 2**20)
        try:
            async with stream:
                async for line in read_lines(stream):
                    log.write(line + b"\n")
                    self.events.on_console_line(line.decode(errors="replace").rstrip("\r"))
        finally:
            log.close()

    async def wait_ready(self) -> None:
        if self.plan.resumes_a_guest:
            # A clone, a restored snapshot or an attached sandbox resumes a guest whose agent
            # announced itself long ago: ask it instead.
            await self.agent.ping()
            self.agent.mark_ready()
        await self.agent.wait_ready()
        if "spawn" in self.startup_timings:
            self._stamp("ready")
            self.log.debug("guest ready", timings=self.startup_timings)

    async def query_status(self) -> str:
        reply = await self._qmp.execute("query-status")
        return str(reply.get("status", "unknown"))

    async def save_state(self, path: Path, *, skip_shared: bool) -> None:
        await save_device_state(self._qmp, self._migration, path, skip_shared=skip_shared)

    async def wait_exited(self) -> None:
        await self._exited.wait()

    async def pause(self) -> None:
        await self._qmp.execute("stop")

    async def resume(self) -> None:
        await self._qmp.execute("cont")

    async def stop(self, *, graceful: bool, timeout: float) -> None:
        self._keep_running = False  # stop means stop, detached or not
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
            with anyio.move_on_after(2):
                await self._exited.wait()
            self._process.kill()  # the jail's outer process, should it not have followed QEMU
            with anyio.move_on_after(10):
                await self._exited.wait()

    async def close(self, *, keep_running: bool) -> None:
        self._keep_running = keep_running
        self._closing = True
        await self._qmp.close()
        self.agent.fail_all(lambda: GuestDisconnected("disconnected from the sandbox"))
        if self._scope is not None:
            self._scope.cancel()
