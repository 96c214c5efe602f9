"""Records of detached sandboxes: sandboxes whose QEMU outlives the controller that started it.

Each detached sandbox owns a private (0700) directory under :func:`state_dir`, named after its
id, holding QEMU's sockets and logs, ``record.json`` (what another process needs to attach:
QEMU's pid and start time, the effective config, hot-plugged devices) and ``lock``. A controller
attached to the sandbox holds an exclusive ``flock`` on ``lock``: QEMU serves one QMP client at
a time, and the kernel drops the lock when the controller dies, so a crash never wedges it.

A directory is *stale* when its QEMU is gone (the record's pid and start time no longer match a
live process), or when it has no record and the controller that was starting it died. Listing
reports stale sandboxes once and removes them, killing a QEMU left by a half-finished start.
"""

from __future__ import annotations

import enum
import fcntl
import json
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmctl.core import reaper
from vmctl.core.paths import (
    OWNER_FILE,
    kill_qemu_in,
    owner_alive,
    private_dir,
    process_identity,
    remove_tree,
    runtime_dir,
    write_owner,
)
from vmctl.core.state import Trigger, status_trigger
from vmctl.errors import InvalidArgument, QMPCommandError, SandboxBusy, SandboxNotFound
from vmctl.hypervisors import jail
from vmctl.hypervisors.base import Hypervisor, RunPaths

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
RECORD = "record.json"
LOCK = "lock"


def state_dir(*, create: bool = True) -> Path:
    """``$VMCTL_STATE_DIR``, else ``detached/`` in the runtime dir (short, for socket paths).

    Created on demand, checked (ours, private, no symlink) whenever it exists, and removed again
    when its last sandbox goes."""
    env = os.environ.get("VMCTL_STATE_DIR")
    path = Path(env).expanduser() if env else runtime_dir() / "detached"
    return private_dir(path) if create or path.exists() else path


@dataclass(frozen=True)
class Record:
    """What a new controller needs to find and rebuild a detached sandbox."""

    id: str
    pid: int
    process: str  # "pid:starttime", so a reused pid is never mistaken for our QEMU
    config: dict[str, Any]
    created: float
    devices: list[dict[str, Any]] = field(default_factory=list)
    last_state: str = "running"
    directory: Path = Path()
    log_dir: str | None = None

    @property
    def alive(self) -> bool:
        return process_identity(self.pid) == self.process

    @property
    def paths(self) -> RunPaths:
        """Its sockets and logs (the logs may live in a log dir of the user's)."""
        return RunPaths(self.directory, Path(self.log_dir) if self.log_dir else self.directory)

    def to_json(self) -> str:
        data = {"vmctl_detached": 1, "id": self.id, "pid": self.pid, "process": self.process,
                "config": self.config, "created": self.created, "devices": self.devices,
                "last_state": self.last_state, "log_dir": self.log_dir}  # fmt: skip
        return json.dumps(data, indent=2)


class Status(enum.Enum):
    LIVE = "live"  # QEMU runs; nobody attached
    ATTACHED = "attached"  # QEMU runs; a controller holds the lock
    STARTING = "starting"  # being started right now (no record yet)
    STALE = "stale"  # QEMU is gone: reported once, then removed


@dataclass(frozen=True)
class Entry:
    id: str
    status: Status
    record: Record | None


def check_id(sandbox_id: str) -> None:
    """Ids name directories and reach QEMU's ``-name``: a strict pattern, checked before any use."""
    if not isinstance(sandbox_id, str) or not ID_PATTERN.fullmatch(sandbox_id):
        raise InvalidArgument(
            f"id: {sandbox_id!r} must be 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )


def sandbox_dir(sandbox_id: str, *, create: bool = True) -> Path:
    check_id(sandbox_id)
    return state_dir(create=create) / sandbox_id


def claim(sandbox_id: str) -> tuple[Path, AttachLock]:
    """Create the directory for a new detached sandbox, marked as being started by us, and lock it.

    An id whose QEMU still runs is refused; a stale directory of that id is cleaned first.
    """
    for _ in range(3):
        path = sandbox_dir(sandbox_id)
        try:
            path.mkdir(mode=0o700)
        except FileNotFoundError:
            continue  # the empty state dir was just pruned by another process: make it again
        except FileExistsError:
            entry = inspect(path)
            if entry.status is not Status.STALE:
                raise SandboxBusy(
                    f"id: a detached sandbox named {sandbox_id!r} already exists ({entry.status.value}); "
                    f"pick another id or stop it with 'vmctl stop {sandbox_id}'"
                ) from None
            continue
        lock = AttachLock(path, sandbox_id)
        write_owner(path)
        reaper.add_dir(path)  # a start cut short by our death: its half-started QEMU and directory go
        return path, lock
    raise SandboxBusy(f"id: could not claim a directory for {sandbox_id!r} in {state_dir()}")


def write_record(record: Record) -> None:
    """Atomically (a reader never sees half a record), readable only by us."""
    partial = record.directory / f".{RECORD}.partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(record.to_json())
    partial.replace(record.directory / RECORD)
    (record.directory / OWNER_FILE).unlink(missing_ok=True)  # the record, not a controller, owns it now


def read_record(path: Path) -> Record | None:
    try:
        data = json.loads((path / RECORD).read_text())
        if data.get("vmctl_detached") != 1:
            return None
        return Record(id=str(data["id"]), pid=int(data["pid"]), process=str(data["process"]),
                      config=dict(data["config"]), created=float(data["created"]),
                      devices=list(data.get("devices", [])), last_state=str(data.get("last_state", "running")),
                      directory=path, log_dir=data.get("log_dir"))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None


def inspect(path: Path) -> Entry:
    """The status of one directory (without cleaning it)."""
    record = read_record(path)
    if record is None:
        if (path / OWNER_FILE).exists():
            starting = owner_alive(path)
        else:  # just created, owner not written yet (or a leftover nobody will finish)
            try:
                starting = time.time() - path.stat().st_mtime < 30 or AttachLock.held_elsewhere(path)
            except OSError:
                starting = False
        return Entry(path.name, Status.STARTING if starting else Status.STALE, None)
    if not record.alive:
        return Entry(path.name, Status.STALE, record)
    return Entry(path.name, Status.ATTACHED if AttachLock.held_elsewhere(path) else Status.LIVE, record)


def remove(path: Path) -> None:
    """Remove a sandbox's directory, killing any QEMU still serving from it."""
    record = read_record(path)
    if record is not None:
        try:
            pidfd = os.pidfd_open(record.pid)
        except OSError:
            pidfd = -1
        if pidfd >= 0:
            try:
                if record.alive:  # checked after the pidfd pins the process: no pid-reuse race
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            finally:
                os.close(pidfd)
    kill_qemu_in(path)  # a QEMU whose start never got as far as a record
    group = jail.existing_cgroup(RunPaths(path, path))
    if group is not None:  # the jail's cgroup goes with the directory (and whatever is left in it)
        group.remove()
    remove_tree(path)
    prune(path.parent)


def prune(base: Path) -> None:
    """Remove the state dir once its last sandbox is gone (nothing of ours lingers)."""
    try:
        base.rmdir()
    except OSError:
        pass  # not empty, or already gone


def entries() -> list[Entry]:
    """Every detached sandbox, stale ones included (and removed as they are reported)."""
    base = state_dir(create=False)
    if not base.is_dir():
        return []
    out = []
    for path in sorted(base.iterdir()):
        if not path.is_dir():
            continue
        entry = inspect(path)
        if entry.status is Status.STALE:
            remove(path)
        out.append(entry)
    return out


def find(sandbox_id: str) -> Record:
    """The live record of ``sandbox_id``; a stale one is removed and reported as not found."""
    path = sandbox_dir(sandbox_id, create=False)
    if not path.is_dir():
        raise SandboxNotFound(f"no detached sandbox named {sandbox_id!r} (see 'vmctl ps')")
    entry = inspect(path)
    if entry.status is Status.STALE:
        remove(path)
        pid = f" (pid {entry.record.pid})" if entry.record else ""
        raise SandboxNotFound(f"the QEMU of detached sandbox {sandbox_id!r} is gone{pid}; its record was removed")
    if entry.record is None:
        raise SandboxBusy(f"detached sandbox {sandbox_id!r} is still being started")
    return entry.record


def uptime(record: Record) -> float:
    return max(0.0, time.time() - record.created)


class AttachLock:
    """An exclusive, non-blocking ``flock`` on the sandbox's lock file, held while attached."""

    def __init__(self, path: Path, sandbox_id: str) -> None:
        self._fd: int | None = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise SandboxBusy(
                f"detached sandbox {sandbox_id!r} is attached by another controller; "
                "QEMU serves one at a time: wait for it to detach"
            ) from None

    @staticmethod
    def held_elsewhere(path: Path) -> bool:
        return reaper.held_elsewhere(path / LOCK)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Hold:
    """This controller's hold on a detached sandbox's directory: the attach lock, and the record
    it writes so that another process can attach later."""

    def __init__(self, directory: Path, lock: AttachLock, *, created: float, process: str = "",
                 log_dir: str | None = None) -> None:  # fmt: skip
        self.directory = directory
        self.created = created
        self.process = process
        self.log_dir = log_dir
        self._lock: AttachLock | None = lock
        self._watched = False

    @classmethod
    def claim(cls, sandbox_id: str) -> Hold:
        """A new detached sandbox's directory, marked as being started by us, locked."""
        path, lock = claim(sandbox_id)
        return cls(path, lock, created=time.time())

    @classmethod
    def attach(cls, record: Record) -> Hold:
        """The lock on a running detached sandbox (:class:`SandboxBusy` if another holds it)."""
        lock = AttachLock(record.directory, record.id)
        return cls(record.directory, lock, created=record.created, process=record.process, log_dir=record.log_dir)

    def save(self, *, sandbox_id: str, pid: int, config: dict[str, Any], devices: list[dict[str, Any]],
             state: str) -> None:  # fmt: skip
        """Write down what another process needs to attach."""
        if not self.process:
            self.process = process_identity(pid) or ""
        write_record(Record(id=sandbox_id, pid=pid, process=self.process, config=config, created=self.created,
                            devices=devices, last_state=state, directory=self.directory, log_dir=self.log_dir))  # fmt: skip
        if not self._watched:  # from now on QEMU keeps the directory and cgroup, and they go with it
            group = jail.existing_cgroup(RunPaths(self.directory, self.directory))
            reaper.watch(pid, self.directory, list(group.dirs.values()) if group is not None else [])
            self._watched = True

    def forget(self) -> None:
        """The sandbox is gone: remove its directory (and the state dir, if it was the last)."""
        remove_tree(self.directory)
        prune(self.directory.parent)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


async def rebuild(hv: Hypervisor) -> tuple[str, tuple[Trigger, str] | None, set[str]]:
    """What QEMU says about an attached sandbox: its run state, what that means (None: the guest
    is dead) and which devices it still has (their ids)."""
    status = await hv.query_status()
    try:
        present = {child["name"] for child in await hv.execute("qom-list", {"path": "/machine/peripheral"})}
    except QMPCommandError:  # no user-created devices at all
        present = set()
    return status, status_trigger(status), present
