"""Where vmctl keeps things: a user cache for built assets, private run directories for sandboxes.

Every directory vmctl creates is mode 0700: sockets and logs inside are reachable only by the user.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path

from vmctl.core import reaper
from vmctl.errors import HostError


def private_dir(path: Path) -> Path:
    """Create ``path`` 0700, or accept an existing one only if it is ours, real and private.

    A shared /tmp lets anyone create /tmp/vmctl-UID first; using such a directory would let its
    owner swap our sockets or plant symlinks for QEMU to write through.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:  # a plain file or a dangling symlink: refused just below
        pass
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise HostError(f"{path} is a symlink or not a directory: refusing to use it")
    if info.st_uid != os.getuid():
        raise HostError(f"{path} belongs to uid {info.st_uid}, not to us: refusing to use it (set VMCTL_RUNTIME_DIR)")
    if info.st_mode & 0o077:
        path.chmod(0o700)
    return path


def cache_dir() -> Path:
    """``$VMCTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/vmctl``, else ``~/.cache/vmctl``."""
    env = os.environ.get("VMCTL_CACHE_DIR")
    if env:
        return private_dir(Path(env).expanduser())
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return private_dir(Path(base) / "vmctl")


def runtime_dir() -> Path:
    """Parent of the sandboxes' run directories: short, so socket paths stay under 108 bytes."""
    env = os.environ.get("VMCTL_RUNTIME_DIR")
    if env:
        return private_dir(Path(env).expanduser())
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        return private_dir(Path(xdg) / "vmctl")
    return private_dir(Path(tempfile.gettempdir()) / f"vmctl-{os.getuid()}")


OWNER_FILE = "owner"


def process_identity(pid: int) -> str | None:
    """``pid:starttime``: survives pid reuse, unlike the pid alone. None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return f"{pid}:{fields[19]}"


def make_run_dir() -> Path:
    """A fresh private directory for one sandbox's sockets and logs, marked with its owner.

    Should this process die without removing it, its reaper does (:mod:`vmctl.core.reaper`);
    directories left where even that failed (the reaper killed too, power loss) are removed
    here, together with any QEMU still holding them.
    """
    base = runtime_dir()
    sweep_stale_run_dirs(base)
    path = Path(tempfile.mkdtemp(prefix="sb-", dir=base))
    write_owner(path)
    reaper.add_dir(path)
    return path


def write_owner(path: Path) -> None:
    """Mark ``path`` as this process's: a sweeper removes it once the process is gone."""
    partial = path / f".{OWNER_FILE}"
    partial.write_text(process_identity(os.getpid()) or "")
    partial.replace(path / OWNER_FILE)  # a sweeper never reads a half-written owner


def owner_alive(path: Path) -> bool:
    """Whether the process that wrote ``path``'s owner file still runs (True while it is being written)."""
    try:
        owner = (path / OWNER_FILE).read_text().strip()
    except OSError:
        return True
    pid = owner.split(":")[0]
    return bool(owner) and pid.isdigit() and process_identity(int(pid)) == owner


def kill_qemu_in(path: Path) -> None:
    for qemu_pid in _qemu_processes_in(path):
        try:
            os.kill(qemu_pid, signal.SIGKILL)
        except OSError:
            pass


def sweep_stale_run_dirs(base: Path) -> list[Path]:
    """Remove run directories whose owning process is gone; kill QEMU processes still in them."""
    removed = []
    for path in base.glob("sb-*"):
        if owner_alive(path):
            continue  # its controller runs, or it is being created right now
        kill_qemu_in(path)
        remove_tree(path)
        removed.append(path)
    return removed


#: uids QEMU runs as besides ours (the jail user, noted by the jail when it picks it)
QEMU_UIDS: set[int] = set()


def _qemu_processes_in(run_dir: Path) -> list[int]:
    """QEMU processes of ours (our uid, or the jail user's) whose sockets or logs live in ``run_dir``."""
    needle = f"{run_dir}/".encode()
    pids = []
    for pid, argv in reaper.command_lines():
        if b"qemu-system" in argv[0] and any(needle in a for a in argv):
            try:
                if os.stat(f"/proc/{pid}").st_uid in {os.getuid(), *QEMU_UIDS}:
                    pids.append(pid)
            except OSError:
                pass
    return pids


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    reaper.forget(path)
