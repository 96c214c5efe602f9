"""What a jailed QEMU gets by descriptor instead of by path: disks as fd sets, egress NICs
through passt (on the command line and on hotplug alike).

QEMU then never opens a disk by path and never runs the user-mode network stack itself, so
neither depends on its uid or namespaces (:mod:`vmctl.hypervisors.jail` decides those).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from vmctl.core import reaper
from vmctl.errors import HostError, NotSupported
from vmctl.hypervisors.cmdline import opt
from vmctl.hypervisors.jail import MINIMAL_ENV, Jail, jail_user, passt_path

PASST_START_TIMEOUT = 5.0
PASST_DIR_PREFIX = "vmctl-passt-"
#: a passt directory no process names is stale once this old (younger: a start may be under way)
PASST_DIR_STALE_AFTER_S = 120.0

_PASST_CHILDREN: set[subprocess.Popen[bytes]] = set()


class Handover:
    """Disk images passed as descriptors (fd sets) and egress NICs served by passt over a socket
    pair, for the command line and for hotplug alike. QEMU never opens a disk by path and never
    runs the user-mode network stack itself, so neither depends on its uid or namespaces.

    ``fd_disks``: pass disks by descriptor (the jail drops the user or hides the host's paths).
    ``network``: the sandbox's mode; ``egress`` NICs get passt (or fall back to ``none``)."""

    def __init__(self, *, fd_disks: bool, network: str, jail: Jail, detached: bool, log_path: Path,
                 socket_dir: Path, log: Any, attached: bool = False) -> None:  # fmt: skip
        self.attached = attached
        self.socket_dir = socket_dir
        self.fd_disks = fd_disks
        self.network = network
        self.jail = jail
        self.detached = detached
        self.log_path = log_path
        self.log = log
        self._next_set = 10
        self._sets: dict[str, tuple[int, list[int]]] = {}  # node name -> fd set id, our fds
        self._passt: dict[str, subprocess.Popen[bytes]] = {}  # netdev id -> its passt
        self._held: list[int] = []  # fds to close once QEMU has them
        self.egress_fallback = False
        self._tmp_dir: Path | None = None
        self._fdsets_known = False

    # the command line

    async def command_line(self, argv: list[str]) -> tuple[list[str], list[int]]:
        """``argv`` with its disks and egress NICs handed over, and the descriptors QEMU must inherit."""
        fds: list[int] = []
        out = list(argv)
        extra: list[str] = []
        for i in range(len(out) - 1):
            if out[i] not in ("-blockdev", "-netdev") or not out[i + 1].startswith("{"):
                continue
            spec = json.loads(out[i + 1])
            if out[i] == "-blockdev":
                new, passed = self._disk(spec)
                for fd in passed:  # opaque: the file's name, for people reading the command line
                    extra += ["-add-fd", f"fd={fd},set={new['filename'].rsplit('/', 1)[1]},opaque={opt(spec['filename'])}"]
            else:
                new, passed = await self._nic(spec), []
            fds += passed
            out[i + 1] = json.dumps(new, separators=(",", ":"))
        return out[:1] + extra + out[1:], fds

    def _disk(self, spec: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        if not self.fd_disks or spec.get("driver") != "file" or str(spec.get("filename", "")).startswith("/dev/fdset/"):
            return spec, []
        path = str(spec["filename"])
        flags = [os.O_RDONLY] if spec.get("read-only") else [os.O_RDWR, os.O_RDONLY]
        fds = [os.open(path, f | os.O_CLOEXEC) for f in flags]
        set_id = self._next_set
        self._next_set += 1
        self._sets[str(spec.get("node-name"))] = (set_id, fds)
        self._held += fds
        return {**spec, "filename": f"/dev/fdset/{set_id}"}, fds

    async def _nic(self, spec: dict[str, Any]) -> dict[str, Any]:
        if spec.get("type") != "user" or self.network != "egress":
            return spec
        if self.attached:
            raise NotSupported("an egress NIC cannot be hot-plugged into a jailed QEMU this controller attached to "
                               "(its passt socket directory is not in QEMU's mount namespace): plug it before "
                               "detaching, or use network='none' or 'host'")  # fmt: skip
        passt = passt_path()
        if passt is None:
            if not self.egress_fallback:
                self.log.warning("passt is not installed: network='egress' NICs get no network (as 'none')")
            self.egress_fallback = True
            return {**spec, "restrict": True}
        # passt listens on a socket (this passt cannot take a connected descriptor) in a
        # directory of its own user: as root, passt never runs as root but as the jail user, who
        # cannot reach the controller's run directory, so the directory is a fresh one in /tmp
        sock = self._passt_dir() / f"{spec['id']}.sock"
        sock.unlink(missing_ok=True)
        argv = [passt, "--foreground", "--one-off", "--quiet", "--ipv4-only", "--no-map-gw", "--socket", str(sock)]
        for rule in spec.get("hostfwd", []):
            argv += _passt_forward(str(rule["str"]))
        if os.geteuid() == 0:
            uid, gid = (self.jail.uid, self.jail.gid) if self.jail.uid is not None else jail_user()[:2]
            argv += ["--runas", f"{uid}:{gid}"]
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv and not self.detached else []
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            proc = subprocess.Popen(  # noqa: ASYNC220 - fork+exec only; it ends when QEMU disconnects
                prefix + argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                start_new_session=True, env=dict(MINIMAL_ENV),
            )  # fmt: skip
        finally:
            os.close(log_fd)
        _PASST_CHILDREN.difference_update([p for p in _PASST_CHILDREN if p.poll() is not None])
        _PASST_CHILDREN.add(proc)
        self._passt[str(spec["id"])] = proc
        await _wait_for(lambda: sock.exists() or proc.poll() is not None, PASST_START_TIMEOUT)
        if not sock.exists():
            proc.kill()
            raise HostError(f"passt did not start for NIC {spec['id']} (exit code {proc.poll()}); see {self.log_path}")
        return {"type": "stream", "id": spec["id"], "server": False, "addr": {"type": "unix", "path": str(sock)}}

    def _passt_dir(self) -> Path:
        if os.geteuid() != 0:
            return self.socket_dir
        if self._tmp_dir is None:
            uid, gid = (self.jail.uid, self.jail.gid) if self.jail.uid is not None else jail_user()[:2]
            sweep_stale_passt_dirs(Path("/tmp"), uid)
            self._tmp_dir = Path(tempfile.mkdtemp(prefix=PASST_DIR_PREFIX, dir="/tmp"))
            reaper.add_dir(self._tmp_dir)  # removed by the reaper should the controller die first
            os.chown(self._tmp_dir, uid, gid if gid is not None else -1)
        return self._tmp_dir

    @property
    def extra_binds(self) -> list[Path]:
        """What QEMU's mount namespace must show besides its own directory (passt's sockets)."""
        return [self._passt_dir()] if os.geteuid() == 0 and self.network == "egress" else []

    # hotplug

    async def command(self, name: str, arguments: dict[str, Any] | None, qmp: Any) -> dict[str, Any] | None:  # noqa: C901
        """A hotplug command's arguments with its disk or NIC handed over to QEMU first."""
        if arguments is None:
            return arguments
        if name == "blockdev-add" and self.fd_disks and arguments.get("driver") == "file":
            if not self._fdsets_known:  # another controller may have started QEMU: take fresh set ids
                sets = await qmp.execute("query-fdsets")
                self._next_set = max([int(f["fdset-id"]) for f in sets] + [self._next_set - 1]) + 1
                self._fdsets_known = True
            new, fds = self._disk(arguments)
            set_id = int(new["filename"].rsplit("/", 1)[1]) if fds else None
            for fd in fds:
                assert set_id is not None
                await qmp.add_fd(fd, set_id, opaque=str(arguments["filename"]))
            self.release_held()
            return new
        if name == "netdev_add":
            if arguments.get("type") == "tap" and (self.jail.uid is not None or "net" in self.jail.namespaces):
                raise NotSupported("a tap NIC needs QEMU outside the jail (the host's network and privileges): "
                                   "cold-plug it in SandboxConfig(devices=[...]) and the jail steps back, "
                                   "or set jail=False")  # fmt: skip
            return await self._nic(arguments)
        return arguments

    async def forget(self, name: str, arguments: dict[str, Any] | None, qmp: Any) -> None:
        """After ``blockdev-del`` / ``netdev_del``: QEMU's copies of the descriptors go too."""
        if arguments is None:
            return
        if name == "blockdev-del":
            entry = self._sets.pop(str(arguments.get("node-name")), None)
            if entry is not None:
                try:
                    await qmp.execute("remove-fd", {"fdset-id": entry[0]})
                except Exception:  # noqa: BLE001 - already gone with its last user
                    pass
        elif name == "netdev_del":
            proc = self._passt.pop(str(arguments.get("id")), None)
            if proc is not None and proc.poll() is None:
                proc.kill()

    def release_held(self) -> None:
        """Close our copies once QEMU holds the descriptors."""
        for fd in self._held:
            try:
                os.close(fd)
            except OSError:
                pass
        self._held.clear()

    def close(self, *, keep_running: bool) -> None:
        self.release_held()
        if not keep_running:
            for proc in self._passt.values():
                if proc.poll() is None:
                    proc.kill()
                    try:
                        proc.wait(timeout=2)
                    except subprocess.TimeoutExpired:
                        pass
        self._passt.clear()
        if self._tmp_dir is not None:  # a QEMU left running keeps its own mount of it
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            reaper.forget(self._tmp_dir)
            self._tmp_dir = None


def sweep_stale_passt_dirs(base: Path, uid: int) -> list[Path]:
    """Remove passt directories (``uid``'s, the jail user's) that a controller left when even its
    reaper could not remove them (the reaper killed too): old enough not to be starting, and
    named by no process (neither a jail helper's bind mount nor a passt's socket)."""
    now = time.time()
    candidates = []
    for path in base.glob(PASST_DIR_PREFIX + "*"):
        try:
            info = path.lstat()
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == uid and now - info.st_mtime > PASST_DIR_STALE_AFTER_S:
            candidates.append(path)
    if not candidates:
        return []
    named = _named_by_processes([str(p) for p in candidates])
    stale = [p for p in candidates if str(p) not in named]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _named_by_processes(paths: list[str]) -> set[str]:
    """Those of ``paths`` that some process's command line names."""
    needles = {p: p.encode() for p in paths}
    named: set[str] = set()
    for _, argv in reaper.command_lines():
        named.update(p for p, n in needles.items() if any(n in a for a in argv))
    return named


def _passt_forward(rule: str) -> list[str]:
    """A slirp ``hostfwd`` rule as passt's ``-t`` / ``-u`` (loopback unless an address is given)."""
    proto, host_part, guest_part = rule.split(":", 1)[0], *rule.split(":", 1)[1].split("-", 1)
    addr, _, port = host_part.rpartition(":")
    guest_port = guest_part.rpartition(":")[2]
    flag = "-t" if proto == "tcp" else "-u"
    return [flag, f"{addr or '127.0.0.1'}/{port}:{guest_port}"]


async def _wait_for(condition: Callable[[], bool], timeout: float) -> None:
    """Poll ``condition`` (a file appearing has no event to wait on)."""
    with anyio.move_on_after(timeout):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.005)
