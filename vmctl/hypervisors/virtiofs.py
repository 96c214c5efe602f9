"""virtiofsd, one per shared directory: started before QEMU connects to it (before QEMU starts
for a share in the config, before ``chardev-add`` for a hot-plugged one), jailed, watched, and
stopped with its device.

vmctl makes the vhost-user socket itself (listening, in QEMU's own ``run_dir/q``) and hands
virtiofsd the listening descriptor, so virtiofsd never sees a host path but its share. As root,
virtiofsd starts through the jail helper: the sandbox's cgroup, its own mount, PID, IPC and
network namespaces, a minimal root holding only the share (bound read-only for a read-only
share: enforced on the host, whatever the guest mounts), and then virtiofsd's own sandbox
(``-o sandbox=namespace``: it pivots into the share). It gives up the capabilities to make device
nodes and set file capabilities, which a guest could otherwise plant in the host's directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from vmctl.devices import SharedDirectory, virtiofs_share
from vmctl.errors import HostError, NotSupported
from vmctl.hypervisors.base import PlacedDevice
from vmctl.hypervisors.jail import MINIMAL_ENV, Jail, kill_inner

#: where Debian's QEMU 7.2 puts it (qemu-system-common), then the separate package's place
VIRTIOFSD_PATHS = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd")
#: how long virtiofsd may take to say it waits for QEMU
START_TIMEOUT = 10.0
#: the line virtiofsd prints once it listens (log_level=info)
READY_LINE = b"Waiting for vhost-user socket connection"
#: where the share is inside virtiofsd's jail
SHARE_ROOT = "/share"
#: capabilities virtiofsd keeps by default that a guest could turn against the host
DROPPED_CAPS = "-mknod:-setfcap"
#: what of virtiofsd's output is kept for an error message
STDERR_TAIL = 4096


# $1 the share; the rest virtiofsd's argv. Bound onto itself read-only in virtiofsd's own mount
# namespace, so a guest's writes fail on the host, whatever the guest remounts. No shell parses
# a path: each is an argument.
_READ_ONLY_BIND = 'mount --bind -- "$1" "$1" && mount -o remount,bind,ro -- "$1" && shift && exec "$@"'


def virtiofsd_path() -> str | None:
    for candidate in VIRTIOFSD_PATHS:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("virtiofsd")


@dataclass
class Daemon:
    """One share's virtiofsd."""

    dev_id: str
    process: anyio.abc.Process
    listener: socket.socket
    socket_path: Path
    log_path: Path
    tail: bytearray = field(default_factory=bytearray)


class ShareDaemons:
    """The virtiofsd processes of one sandbox.

    ``jail``: QEMU's jail (its cgroup and helper are reused); ``qemu_uid``: who must be able to
    connect to the sockets (QEMU's user); ``detached``: they outlive this controller, as QEMU does."""

    def __init__(self, *, run_dir: Path, log_dir: Path, jail: Jail | None, qemu_uid: int | None, detached: bool,
                 log: Any, on_failure: Callable[[str], None] = lambda why: None) -> None:  # fmt: skip
        self.run_dir = run_dir
        #: told when a daemon ends by itself with an error: the share's I/O would hang in the guest
        self.on_failure = on_failure
        self.log_dir = log_dir
        self.jail = jail
        self.qemu_uid = qemu_uid
        self.detached = detached
        self.log = log
        self._daemons: dict[str, Daemon] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    def bind(self, tg: anyio.abc.TaskGroup) -> None:
        """The task group that pumps the daemons' output (the hypervisor's)."""
        self._tg = tg

    async def start_cold(self, tg: anyio.abc.TaskGroup, placed: Iterable[PlacedDevice]) -> float:
        """Start the virtiofsd of each share on QEMU's command line (before QEMU, which connects
        at once); the seconds it took."""
        self.bind(tg)
        began = time.perf_counter()
        for dev_id, device, _ in placed:
            if virtiofs_share(device):
                await self.start(dev_id, device)
        return round(time.perf_counter() - began, 4)

    @staticmethod
    async def start_in(daemons: ShareDaemons | None, dev_id: str, share: SharedDirectory) -> None:
        """A hot-plugged share's virtiofsd; none where this controller did not make QEMU's jail."""
        if daemons is None:
            raise NotSupported("a share cannot be hot-plugged into a sandbox this controller attached to "
                               "(its virtiofsd would run outside the sandbox's jail): plug it before detaching")
        await daemons.start(dev_id, share)

    def __contains__(self, dev_id: str) -> bool:
        return dev_id in self._daemons

    async def start(self, dev_id: str, share: SharedDirectory) -> None:
        """Start virtiofsd for ``share`` and return once it waits for QEMU."""
        binary = virtiofsd_path()
        if binary is None:
            raise HostError("a shared directory needs virtiofsd: apt-get install qemu-system-common "
                            "(Debian 12) or virtiofsd")  # fmt: skip
        assert share.socket is not None, "with_defaults fills in the socket"
        if dev_id in self._daemons:
            raise HostError(f"share {dev_id} already has a virtiofsd")
        listener = _listen(share.socket, self.qemu_uid)
        log_path = self.log_dir / f"{dev_id}.virtiofsd.log"
        try:
            argv = self._command(binary, share, listener.fileno())
            process = await anyio.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=[listener.fileno()], env=dict(MINIMAL_ENV), start_new_session=True,
            )  # fmt: skip
        except BaseException:
            listener.close()
            share.socket.unlink(missing_ok=True)
            raise
        daemon = Daemon(dev_id, process, listener, share.socket, log_path)
        self._daemons[dev_id] = daemon
        try:
            await self._wait_listening(daemon, share)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.stop(dev_id)
            raise
        self.log.debug("virtiofsd started", device=dev_id, pid=process.pid, host_path=str(share.host_path),
                       read_only=share.read_only)  # fmt: skip

    def _command(self, binary: str, share: SharedDirectory, fd: int) -> list[str]:
        jailed = self.jail is not None and self.jail.helper is not None and os.geteuid() == 0 \
            and "mount" in self.jail.namespaces  # fmt: skip
        source = SHARE_ROOT if jailed else str(share.host_path)
        argv = [binary, f"--fd={fd}", "-o", f"source={source}", "-o", "sandbox=namespace",
                "-o", f"cache={share.cache}", "-o", "log_level=info", "-o", f"modcaps={DROPPED_CAPS}",
                "-o", "no_posix_lock", "-o", "no_xattr"]  # fmt: skip
        if not jailed:  # no jail helper (QEMU unjailed, or not root): virtiofsd's own sandbox, and
            # a mount namespace of its own in which a read-only share is a read-only bind
            user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]  # its namespaces need one
            if share.read_only:
                argv = ["sh", "-c", _READ_ONLY_BIND, "sh", str(share.host_path), *argv]
            return ["unshare", *user, "--mount", "--propagation", "private", "--", *argv]
        assert self.jail is not None
        root = self.run_dir / f"{share_dir_name(share)}"
        root.mkdir(mode=0o700, exist_ok=True)
        own = Jail(namespaces=("mount", "pid", "ipc", "net"), cgroup=self.jail.cgroup, root=root,
                   helper=self.jail.helper, exe=Path(binary).resolve(),
                   binds=[(share.host_path.resolve(), Path(SHARE_ROOT), not share.read_only)])  # fmt: skip
        return own.wrap(argv, pdeathsig=not self.detached)

    async def _wait_listening(self, daemon: Daemon, share: SharedDirectory) -> None:
        stream = daemon.process.stderr
        assert stream is not None
        with anyio.move_on_after(START_TIMEOUT):
            pending = b""
            async for chunk in stream:
                daemon.tail += chunk
                del daemon.tail[:-STDERR_TAIL]
                pending += chunk
                if READY_LINE in pending:
                    assert self._tg is not None, "bind() the task group first"
                    self._tg.start_soon(self._pump, daemon)
                    return
                pending = pending[-len(READY_LINE):]
        why = daemon.tail.decode(errors="replace").strip()[-600:] or "no output"
        raise HostError(f"virtiofsd did not start for share {daemon.dev_id} ({share.host_path}): {why}")

    async def _pump(self, daemon: Daemon) -> None:
        """virtiofsd's output into its log in the run directory; its end is noted."""
        stream = daemon.process.stderr
        assert stream is not None
        fd = os.open(daemon.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, bytes(daemon.tail))
            written = len(daemon.tail)
            async for chunk in stream:
                daemon.tail += chunk
                del daemon.tail[:-STDERR_TAIL]
                if written < 1 << 20:  # bounded: the guest decides how much it logs
                    os.write(fd, chunk)
                    written += len(chunk)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            pass
        finally:
            os.close(fd)
        code = await daemon.process.wait()
        if self._daemons.get(daemon.dev_id) is daemon:  # 0: QEMU let go of it (a stop); else it failed
            report = self.log.debug if code == 0 else self.log.warning
            report("virtiofsd ended", device=daemon.dev_id, exit_code=code, log=str(daemon.log_path))
            if code != 0:
                last = daemon.tail.decode(errors="replace").strip().splitlines()[-1:] or [""]
                self.on_failure(f"virtiofsd of share {daemon.dev_id} ended with code {code} ({last[0][-200:]}; "
                                f"its log: {daemon.log_path})")  # fmt: skip

    async def stop(self, dev_id: str) -> None:
        """End ``dev_id``'s virtiofsd and remove its socket (it ends by itself once QEMU lets go)."""
        daemon = self._daemons.pop(dev_id, None)
        if daemon is None:
            return
        with anyio.CancelScope(shield=True):
            # virtiofsd itself first: the jail's outer process then reaps it (killed first, it
            # would leave virtiofsd a zombie for the host's init), as for QEMU
            if daemon.process.returncode is None and not kill_inner(daemon.process.pid):
                daemon.process.kill()
            await daemon.process.wait()
            await daemon.process.aclose()
        daemon.listener.close()
        daemon.socket_path.unlink(missing_ok=True)

    async def close(self, *, keep_running: bool) -> None:
        """Every daemon ends, unless QEMU is left running (a detached sandbox keeps its shares)."""
        if keep_running:
            for daemon in self._daemons.values():
                daemon.listener.close()
            self._daemons.clear()
            return
        for dev_id in list(self._daemons):
            await self.stop(dev_id)


def share_dir_name(share: SharedDirectory) -> str:
    assert share.socket is not None
    return share.socket.name.removesuffix(".fs.sock") + ".fsroot"


def _listen(path: Path, uid: int | None) -> socket.socket:
    """The listening socket virtiofsd serves on; QEMU (``uid``) connects to it by path."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)  # made 0600, never chmod-ed by path: QEMU's user owns the directory
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        if uid is not None and os.geteuid() == 0:
            os.chown(path, uid, -1, follow_symlinks=False)  # a link swapped in meanwhile is not followed
        sock.listen(1)
    except BaseException:
        sock.close()
        path.unlink(missing_ok=True)
        raise
    return sock
