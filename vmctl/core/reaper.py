"""The reaper: removes what a controller made once the controller is gone, however it went.

Theory of operation. A controller that dies by SIGKILL cleans up nothing itself. Its QEMU and
passt processes die with it (their parent-death signal), but its run directories, its cgroups
(one per v1 hierarchy, or the v2 one), passt's socket directories in /tmp and a pool's template
files stay, and a later start only sweeps run directories. So the first thing of a process that
needs removing starts one small process, the reaper (this file run as a script by the same
Python, ``-I -S``, importing only the standard library: 8 MiB PSS, 13 MiB RSS, once per
controller, not per sandbox; spawned in 1-3 ms), in a session of its own (a Ctrl-C or a kill of
the controller's process group does not reach it). The controller tells it, one JSON line per message on a pipe, what to remove
should it die (``add``: a directory, or a cgroup directory), what it removed itself
(``forget``), and which detached QEMU keeps a directory and cgroup alive (``watch``).

The reaper holds a pidfd of the controller: it becomes readable the moment the controller is
gone (even while a forked child still holds the pipe). Then the reaper reads what is left in
the pipe, kills any QEMU still serving from a registered directory and whatever is left in a
registered cgroup, removes the directories at once and each cgroup as soon as its last process
has exited (QEMU dying of its death signal takes some milliseconds), and exits. Measured with
two sandboxes (one with a passt NIC) and a two-member pool: 5 run directories, 12 cgroups and a
passt directory gone 0.08-0.10 s after the SIGKILL (``tests/test_controller_death.py``). The
controller's dead children stay zombies until the host's init reaps them (~2 s here): only a
parent can reap, and theirs is gone.

Why this and not the alternatives: the jail's outer process sees QEMU exit, but it dies with
the controller (its death signal), runs as the jail user (it could not remove the controller's
run directory or a root cgroup) and exists only for a jailed QEMU (not for a pool's template
files, an unjailed run directory or passt's directory); a cgroup v1 ``release_agent`` is one
program per hierarchy for the whole host (systemd's own on v1), run by the kernel in the host's
initial namespaces (the wrong paths inside a container), and it removes cgroups only; v2's
``cgroup.events`` needs a process watching it, which is what this is.

A detached sandbox outlives its controller on purpose: when the controller lets it go, its
directory and cgroup become a *watch*: the reaper keeps them while that QEMU (pid and start
time, so a reused pid is never mistaken for it) runs, and removes them when it exits, unless a
record of another QEMU has taken the directory over or a controller holds the sandbox's attach
lock (that controller removes them itself). One reaper watches a sandbox (an ``flock`` on its
``.reaper`` file): each ``vmctl exec`` attaching to it does not leave one more behind. A reaper
whose controller is gone lives on only while it watches.

If the reaper itself is killed, the older sweeps still apply: the next start removes stale run
directories, and empty cgroups once two minutes old; ``vmctl ps`` removes stale detached ones.
"""

from __future__ import annotations

import _thread
import errno
import fcntl
import json
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: how long the reaper waits for a cgroup's processes to be gone before giving up on it
CGROUP_WAIT_S = 30.0
WATCH_LOCK = ".reaper"

# -- the controller's side -----------------------------------------------------------------

_lock = _thread.allocate_lock()
_reaper: int | None = None  # its pid
_pipe = -1  # our end of its stdin
_owner = 0  # the pid that started _reaper (a forked child needs a reaper of its own)
_entries: dict[str, dict[str, Any]] = {}  # what the reaper knows, to tell a restarted one


def add_dir(path: Path) -> None:
    """Remove ``path`` (and kill any QEMU serving from it) should this process die first."""
    _tell({"op": "add", "kind": "dir", "path": str(path)})


def add_cgroup(path: Path) -> None:
    """Remove the cgroup directory ``path`` (killing what is left in it) should this process die first."""
    _tell({"op": "add", "kind": "cgroup", "path": str(path)})


def forget(path: Path) -> None:
    """``path`` is gone, or no longer this process's to remove."""
    key = str(path)
    with _lock:
        if key in _entries and os.getpid() == _owner:
            del _entries[key]
            _write({"op": "forget", "path": key})


def watch(pid: int, directory: Path, cgroups: list[Path]) -> None:
    """QEMU ``pid`` (a detached sandbox let go) keeps ``directory`` and ``cgroups``: remove them when it ends."""
    for path in (directory, *cgroups):
        forget(path)
    if held_elsewhere(directory / WATCH_LOCK) and reaper_pid() is None:
        return  # another process's reaper watches it: no need to start one just to learn that
    _tell({"op": "watch", "pid": pid, "path": str(directory), "cgroups": [str(c) for c in cgroups]})


def reaper_pid() -> int | None:
    """This process's reaper, if it has started one."""
    return _reaper if _owner == os.getpid() else None


def _tell(message: dict[str, Any]) -> None:
    with _lock:
        if _owner != os.getpid():  # a forked child: its parent's entries are its parent's
            _entries.clear()
        if message["op"] != "watch":
            _entries[message["path"]] = message
        if not _running():
            if not _start():
                return
            for entry in list(_entries.values()):
                if entry is not message:
                    _write(entry)
        _write(message)


def _running() -> bool:
    if _reaper is None or _owner != os.getpid():
        return False
    try:
        return os.waitpid(_reaper, os.WNOHANG)[0] == 0
    except ChildProcessError:  # reaped by someone else's waitpid(-1): is it still there?
        try:
            os.kill(_reaper, 0)
        except ProcessLookupError:
            return False
        return True


def _start() -> bool:
    """Start a reaper for this process: ``posix_spawn`` (no Popen object to warn at exit, no
    descriptor of ours but its end of the pipe), in a session of its own."""
    global _reaper, _pipe, _owner
    if _pipe >= 0:
        os.close(_pipe)  # a dead reaper's pipe, or (in a forked child) our copy of the parent's
    _reaper, _pipe, _owner = None, -1, os.getpid()
    if not sys.executable:
        return False  # an embedded interpreter: the sweeps of later starts remain
    read_end, write_end = os.pipe()
    try:
        _reaper = os.posix_spawn(sys.executable, [sys.executable, "-I", "-S", __file__, str(os.getpid())],
                                 {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}, setsid=True,
                                 file_actions=[(os.POSIX_SPAWN_DUP2, read_end, 0),
                                               (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                                               (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])  # fmt: skip
    except OSError:
        os.close(write_end)
        return False
    finally:
        os.close(read_end)
    _pipe = write_end
    return True


def _write(message: dict[str, Any]) -> None:
    try:
        os.write(_pipe, (json.dumps(message) + "\n").encode())
    except OSError:
        pass  # the reaper is gone; the next message starts another


# -- the reaper's side ---------------------------------------------------------------------


def _identity(pid: int) -> str | None:
    """``pid:starttime`` of a live process (as vmctl.core.paths.process_identity), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else f"{pid}:{fields[19]}"


def command_lines() -> Iterator[tuple[int, list[bytes]]]:
    """``(pid, argv)`` of every process whose command line can be read (processes come and go)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield int(entry.name), (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                pass


def _kill_qemu_in(directory: str) -> None:
    """SIGKILL QEMU processes (or jail helpers starting one) whose command line names ``directory``."""
    needle = f"{directory}/".encode()
    for pid, argv in command_lines():
        if any(b"qemu-system" in a for a in argv) and any(needle in a for a in argv):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _remove_cgroups(paths: list[str]) -> None:
    """Kill what is in each cgroup and remove it once empty (retrying while its processes exit)."""
    deadline = time.monotonic() + CGROUP_WAIT_S
    left = list(paths)
    while left and time.monotonic() < deadline:
        for path in list(left):
            try:
                for pid in Path(path, "cgroup.procs").read_text().split():
                    os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError:
                continue
            left.remove(path)
        if left:
            time.sleep(0.01)


def held_elsewhere(lock_file: Path) -> bool:
    """Whether another open file holds the ``flock`` on ``lock_file`` (the lock taken to find out goes with the descriptor)."""
    try:
        fd = os.open(lock_file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class _Watch:
    def __init__(self, message: dict[str, Any]) -> None:
        self.pid = int(message["pid"])
        self.directory = Path(message["path"])
        self.cgroups = [str(c) for c in message.get("cgroups", [])]
        self.pidfd = os.pidfd_open(self.pid)  # raises if gone already
        self.identity = _identity(self.pid)
        self.lock = os.open(self.directory / WATCH_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise

    def ours(self) -> bool:
        """The directory still belongs to this QEMU: its record names it, and no controller is attached."""
        try:
            record = json.loads((self.directory / "record.json").read_text())
        except (OSError, ValueError):
            return False
        return self.identity is not None and record.get("process") == self.identity and not held_elsewhere(
            self.directory / "lock"
        )

    def finish(self) -> None:
        if self.ours():
            _remove_cgroups(self.cgroups)
            shutil.rmtree(self.directory, ignore_errors=True)
            try:
                self.directory.parent.rmdir()  # the state dir, once its last sandbox is gone
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        for fd in (self.pidfd, self.lock):
            try:
                os.close(fd)
            except OSError:
                pass


class _Reaper:
    def __init__(self) -> None:
        self.entries: dict[str, str] = {}  # path -> "dir" | "cgroup"
        self.watches: dict[int, _Watch] = {}  # pidfd -> watch
        self.buffer = b""

    def take(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            op, path = message.get("op"), str(message.get("path"))
            if op == "add":
                self.entries[path] = str(message.get("kind"))
            elif op == "forget":
                self.entries.pop(path, None)
            elif op == "watch":
                self.entries.pop(path, None)
                for cgroup in message.get("cgroups", []):
                    self.entries.pop(str(cgroup), None)
                try:
                    w = _Watch(message)
                except OSError:  # gone already, or watched by another reaper
                    continue
                if w.identity is None:
                    w.finish()
                else:
                    self.watches[w.pidfd] = w

    def reap(self) -> None:
        """The controller is gone: remove what it left."""
        dirs = [p for p, kind in self.entries.items() if kind == "dir"]
        for path in dirs:
            _kill_qemu_in(path)
        for path in dirs:
            shutil.rmtree(path, ignore_errors=True)
        _remove_cgroups([p for p, kind in self.entries.items() if kind == "cgroup"])
        self.entries.clear()

    def finish_exited(self, ready: list[int]) -> None:
        for fd in ready:
            w = self.watches.pop(fd, None)
            if w is not None:
                w.finish()


def _read_all(fd: int) -> tuple[bytes, bool]:
    """What the pipe holds now, and whether it is closed."""
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return b"".join(chunks), False
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            return b"".join(chunks), True
        if not data:
            return b"".join(chunks), True
        chunks.append(data)


def main(controller: int) -> None:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)  # only the controller's end ends this process
    reaper = _Reaper()
    try:
        parent: int | None = os.pidfd_open(controller)
    except OSError:
        parent = None
    if os.getppid() != controller and parent is not None:  # it died before the pidfd pinned it
        os.close(parent)
        parent = None
    os.set_blocking(0, False)
    stdin_open = True
    while parent is not None:
        ready = select.select([*([0] if stdin_open else []), parent, *reaper.watches], [], [])[0]
        if 0 in ready:
            data, closed = _read_all(0)
            reaper.take(data)
            stdin_open = not closed
        reaper.finish_exited([fd for fd in ready if fd in reaper.watches])
        if parent in ready:
            break
    if stdin_open:
        reaper.take(_read_all(0)[0])  # what the controller said just before it went
    reaper.reap()
    while reaper.watches:  # detached QEMUs: their files go when they end
        reaper.finish_exited(select.select(list(reaper.watches), [], [])[0])


if __name__ == "__main__":
    main(int(sys.argv[1]))
