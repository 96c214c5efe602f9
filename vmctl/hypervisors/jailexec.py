"""The jail's last step before QEMU: run as root, end as QEMU in its own namespaces and uid.

This file is run as a script (``python -I -S jailexec.py SPEC``), never imported by vmctl: it
uses the standard library only, so it starts in a few milliseconds and reads nothing of the
controller's. ``SPEC`` is one JSON argument (built by :mod:`vmctl.jail`):

* ``cgroups``: ``cgroup.procs`` files this process joins first (QEMU inherits them);
* ``unshare``: namespaces to enter (``mount``, ``pid``, ``ipc``, ``net``);
* ``root``: an empty directory that becomes the new root (a tmpfs holding only ``binds``,
  ``/usr`` read-only, a few device nodes, a private ``/tmp`` and, with a PID namespace, ``/proc``);
* ``binds``: ``[path, target, writable]``: ``path`` mounted at ``target`` under the new root;
* ``uid``, ``gid``, ``groups``: who QEMU runs as (only the groups named, no new privileges);
* ``env``: QEMU's whole environment; ``argv``: QEMU's command line; ``exe``: the file run;
* ``memlock``: RLIMIT_MEMLOCK in bytes, -1 unlimited (``mlock=True``: the jail user's default is too small);
* ``pdeathsig``: die with the parent (the controller), unless the sandbox is detached.

With a PID namespace this process forks: the child becomes PID 1 of the new namespace and
execs QEMU; this process stays outside as its parent, drops to the same uid, and exits the way
QEMU exits (the same code, or the same signal), so the controller watches it as it would watch
QEMU. Killing it kills QEMU (the child's parent-death signal), and QEMU's death ends it.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import signal
import sys
from typing import Any

CLONE = {"mount": 0x00020000, "ipc": 0x08000000, "net": 0x40000000, "pid": 0x20000000}
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SYS_PIVOT_ROOT = 155  # x86_64
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/kvm", "/dev/net/tun",
           "/dev/vhost-net", "/dev/vhost-vsock")  # fmt: skip

libc = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    check(libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {source} on {target}")


def make_point(path: str, like: str) -> None:
    """An empty directory or file at ``path`` to mount ``like`` on."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if os.path.isdir(like):
        os.makedirs(path, mode=0o755, exist_ok=True)
    elif not os.path.exists(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def bind(source: str, root: str, *, writable: bool, at: str | None = None) -> None:
    target = root + (at or source)
    make_point(target, source)
    mount(source, target, None, MS_BIND)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | (0 if writable else MS_RDONLY)
    flags |= 0 if source.startswith("/dev/") else MS_NODEV
    mount(None, target, None, flags)


def build_root(root: str, binds: list[list[object]], *, proc: bool) -> None:
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do here reaches the host
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    bind("/usr", root, writable=False)
    for name in ("bin", "lib", "lib64", "lib32", "libx32", "sbin"):  # merged /usr: links; else bind
        if os.path.islink("/" + name):
            os.symlink(os.readlink("/" + name), f"{root}/{name}")
        elif os.path.isdir("/" + name):
            bind("/" + name, root, writable=False)
    if os.path.isfile("/etc/ld.so.cache"):
        bind("/etc/ld.so.cache", root, writable=False)
    for dev in DEVICES:
        if os.path.exists(dev):
            bind(dev, root, writable=True)
    os.makedirs(root + "/tmp", mode=0o755, exist_ok=True)  # before the binds: a run dir may be under /tmp
    mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=4m")
    for path, at, writable in binds:
        bind(str(path), root, writable=bool(writable), at=str(at))
    if proc:
        os.makedirs(root + "/proc", mode=0o555, exist_ok=True)
        mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)  # the tmpfs itself
    os.chdir(root)
    check(libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    check(libc.umount2(b".", MNT_DETACH), "umount the old root")
    os.chdir("/")


def drop(uid: int, gid: int, groups: list[int]) -> None:
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def wait_and_mirror(child: int) -> None:
    """Outside the PID namespace: wait for QEMU and exit as it did."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # passed on, as if sent to QEMU
        signal.signal(sig, lambda s, _f: os.kill(child, s))
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        killed_by = os.WTERMSIG(status)
        if killed_by not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be caught (nor set back)
            signal.signal(killed_by, signal.SIG_DFL)
        os.kill(os.getpid(), killed_by)
    sys.exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def main(spec: dict[str, Any]) -> None:
    parent = os.getppid()
    alive_r: int | None = None
    if spec.get("pdeathsig"):
        check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
    for procs in spec.get("cgroups", []):
        with open(str(procs), "w") as f:
            f.write(str(os.getpid()))
    if spec.get("memlock") is not None:  # raised while still root; kept across the uid change
        limit = int(spec["memlock"])
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))
    kinds = [str(k) for k in spec.get("unshare", [])]
    flags = 0
    for kind in kinds:
        flags |= CLONE[kind]
    if flags:
        check(libc.unshare(flags), "unshare " + ",".join(kinds))
    uid, gid = int(spec["uid"]), int(spec["gid"])
    groups = [int(g) for g in spec.get("groups", [])]
    if "pid" in kinds:
        alive_r, alive_w = os.pipe()  # the child sees EOF here once this process is gone
        child = os.fork()
        if child:
            os.close(alive_r)
            os.closerange(3, alive_w)  # only QEMU holds the sockets and disks
            os.closerange(alive_w + 1, 65536)
            devnull = os.open("/dev/null", os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            drop(uid, gid, groups)
            if spec.get("pdeathsig"):  # cleared by the uid change: set again, then check the parent
                check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
                if os.getppid() != parent:
                    os.kill(child, signal.SIGKILL)
                    sys.exit(1)
            wait_and_mirror(child)
        os.close(alive_w)
    root = spec.get("root")
    if root and "mount" in kinds:
        umask = os.umask(0o022)  # the root's directories must be searchable; QEMU keeps its own umask
        build_root(str(root), spec.get("binds", []), proc="pid" in kinds)
        os.umask(umask)
    drop(uid, gid, groups)
    # The death signal is set after the uid change, which clears it: QEMU dies with the outer
    # process (PID namespace), or with the controller (unless detached).
    if "pid" in kinds or spec.get("pdeathsig"):
        check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
        # (getppid() is 0 from inside the new namespace: the parent is checked through the pipe)
        if alive_r is not None and select.select([alive_r], [], [], 0)[0]:
            sys.exit(1)  # the outer process died before the death signal was set
        if alive_r is None and os.getppid() != parent:
            sys.exit(1)
    if alive_r is not None:
        os.close(alive_r)
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")
    argv = [str(a) for a in spec["argv"]]
    os.execve(str(spec.get("exe") or argv[0]), argv, {str(k): str(v) for k, v in spec["env"].items()})


if __name__ == "__main__":
    try:
        main(json.loads(sys.argv[1]))
    except Exception as exc:  # noqa: BLE001 - one clear line in qemu.log, whatever went wrong
        step = exc.__traceback__
        while step is not None and step.tb_next is not None:
            step = step.tb_next
        where = f" (in {step.tb_frame.f_code.co_name}, line {step.tb_lineno})" if step is not None else ""
        sys.stderr.write(f"vmctl jail: {exc}{where}\n")
        sys.exit(125)
