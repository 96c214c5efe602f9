"""Starting QEMU: the real :class:`~vmctl.hypervisors.base.Launcher`, and the process handles.

QEMU is started from an argument list (never a shell), in its own session, with ``umask 077``,
inheriting only the listening sockets vmctl made for it. An attached sandbox's QEMU and a
detached one's are watched through a pidfd instead of being reaped by asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from vmctl import host
from vmctl.config import SandboxConfig
from vmctl.core.lines import read_lines
from vmctl.errors import ConfigError, HostError, Problem
from vmctl.hypervisors.base import VmProcess
from vmctl.hypervisors.jail import MINIMAL_ENV, Jail, kill_inner


class OsProcess:
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
        """SIGKILL QEMU; jailed, QEMU itself, so that the jail's outer process reaps it before
        exiting (:func:`~vmctl.hypervisors.jail.kill_inner`); called again, the outer one too."""
        if self._process.returncode is None and not kill_inner(self._process.pid):
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


class PidProcess:
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
        if self._pidfd is not None and self.returncode is None and not kill_inner(self._pid):
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


@contextlib.contextmanager
def private_umask() -> Iterator[dict[str, Any]]:
    """``umask 077`` for the child, however the running loop starts processes: asyncio's takes a
    ``umask`` argument; uvloop's (Ray's async actors run on it when it is installed) rejects it,
    so there this process's umask is 077 while the child is started."""
    if isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop):
        yield {"umask": 0o077}
        return
    old = os.umask(0o077)
    try:
        yield {}
    finally:
        os.umask(old)


_WARNED: set[str] = set()
_DETACHED_CHILDREN: set[subprocess.Popen[bytes]] = set()

class QemuLauncher:
    """Starts a real QEMU. Not detached, it dies with this process (``setpriv --pdeathsig``)."""

    #: QEMU started here goes into the jail the hypervisor plans (vmctl.hypervisors.jail)
    jails = True

    async def resolve(self, config: SandboxConfig, log: Any) -> SandboxConfig:
        qemu = host.find_qemu(config.qemu_binary)
        machines = await host.qemu_machines(qemu)
        if config.machine not in machines:
            raise ConfigError([Problem("machine", f"{config.machine!r} is not offered by {qemu} "
                                                  f"(it has: {', '.join(sorted(machines)[:12])}...)")])  # fmt: skip
        accel = await resolve_accel(config, qemu, log)
        return config.replace(accel=accel, qemu_binary=qemu)

    async def spawn(self, argv: list[str], listeners: Mapping[str, socket.socket], *, detached: bool,
                    log_path: Path, tg: TaskGroup, jail: Jail | None = None,
                    extra_fds: Sequence[int] = ()) -> VmProcess:  # fmt: skip
        """Start QEMU, inside ``jail`` when given (its helper sets the death signal itself)."""
        fds = [s.fileno() for s in listeners.values()] + list(extra_fds)
        env = jail.env() if jail is not None else dict(MINIMAL_ENV)
        wrapped = jail.wrap(argv, pdeathsig=not detached) if jail is not None else argv
        if detached:
            return self._spawn_detached(wrapped, fds, log_path, env)
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv and wrapped is argv else []
        with private_umask() as umask:  # what QEMU creates (a template's memory file: guest RAM) is ours alone
            process = await anyio.open_process(
                prefix + wrapped, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=fds, env=env,
                start_new_session=True,  # a Ctrl-C aimed at the controller must not kill the VMs behind its back
                **umask,
            )  # fmt: skip
        return OsProcess(process)

    @staticmethod
    def _spawn_detached(argv: list[str], fds: list[int], log_path: Path, env: dict[str, str] | None) -> VmProcess:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            popen = subprocess.Popen(  # noqa: ASYNC220 - fork+exec only; asyncio would kill it on exit
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fd,
                pass_fds=fds, start_new_session=True, umask=0o077, env=env,
            )  # fmt: skip
        finally:
            os.close(fd)
        # Held (not dropped) so Python neither warns about a running child nor forgets to reap
        # it: finished ones are collected on the next detached start.
        _DETACHED_CHILDREN.difference_update([p for p in _DETACHED_CHILDREN if p.poll() is not None])
        _DETACHED_CHILDREN.add(popen)
        return PidProcess(popen.pid, popen)
