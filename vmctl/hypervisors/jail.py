"""The jail around QEMU: its own uid/gid, namespaces, a cgroup, a minimal environment.

What a sandbox's jail holds is worked out once, before QEMU starts (:func:`plan`), from three
things: what the host allows (root or not, cgroups, passt: :func:`host_status`, which ``vmctl
doctor`` prints), what the operator allows (``VMCTL_JAIL``: ``off``, or the parts to keep, such
as ``user,cgroup``), and what the sandbox needs (``SandboxConfig.jail``; a tap NIC needs the
host's network namespace, a vhost-user backend a socket path the jail user cannot reach...).
Every part left out is written down with its reason (``Jail.skipped``).

QEMU then starts through the jail helper (:mod:`vmctl.hypervisors.jailhelper`, a small compiled
program), which joins the cgroup, enters the namespaces, pivots into a minimal root, drops to the
jail user and execs QEMU.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import resource
import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmctl.config import SandboxConfig
from vmctl.core import paths as run_dirs
from vmctl.devices import (
    Device,
    NetworkDevice,
    SerialPort,
    SharedDirectory,
    VfioDevice,
    VhostUserBlockDevice,
    VhostUserNetDevice,
)
from vmctl.hypervisors import cgroups, jailhelper
from vmctl.hypervisors.base import RunPaths
from vmctl.hypervisors.placement import clone_ram

JAIL_ENV = "VMCTL_JAIL"
USER_ENV = "VMCTL_JAIL_USER"
OVERHEAD_ENV = "VMCTL_JAIL_MEMORY_OVERHEAD_MIB"
PARTS = ("user", "namespaces", "netns", "cgroup", "env")
DEFAULT_USER = "vmctl-qemu"
FALLBACK_ID = 64_099  # a uid/gid nothing else uses, when no vmctl-qemu user exists
#: room for QEMU's own memory beyond guest RAM (translation cache, device state, thread stacks,
#: page cache of the boot files). Measured here (TCG): a 256 MiB and a 512 MiB guest, booted and
#: hashing 50 MB, peaked at 277 MiB in all (the guests touch little of their RAM); a guest that
#: touches all of it needs RAM plus QEMU's share, which this leaves room for
MEMORY_OVERHEAD_MIB = 320
PIDS_MAX = 512
CAP_SYS_RESOURCE = 24
#: QEMU's whole environment
MINIMAL_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


def operator_parts() -> set[str]:
    """The parts ``VMCTL_JAIL`` allows (all by default; ``off``/``0``/``none``: none)."""
    raw = os.environ.get(JAIL_ENV, "").strip().lower()
    if raw in ("", "on", "1", "all", "yes"):
        return set(PARTS)
    if raw in ("off", "0", "none", "no"):
        return set()
    return {p.strip() for p in raw.split(",") if p.strip() in PARTS}


def jail_user() -> tuple[int, int, str]:
    """The uid and gid QEMU runs as, and where they come from."""
    raw = os.environ.get(USER_ENV, "").strip()
    if raw:
        uid_s, _, gid_s = raw.partition(":")
        if uid_s.isdigit():
            uid = int(uid_s)
            return uid, int(gid_s) if gid_s.isdigit() else uid, f"{USER_ENV}={raw}"
        try:
            entry = pwd.getpwnam(uid_s)
        except KeyError:
            raise ValueError(f"{USER_ENV}={raw}: no such user") from None
        return entry.pw_uid, int(gid_s) if gid_s.isdigit() else entry.pw_gid, f"user {uid_s}"
    try:
        entry = pwd.getpwnam(DEFAULT_USER)
        return entry.pw_uid, entry.pw_gid, f"user {DEFAULT_USER}"
    except KeyError:
        return FALLBACK_ID, FALLBACK_ID, f"uid/gid {FALLBACK_ID} (no {DEFAULT_USER} user; set {USER_ENV})"


def host_status() -> dict[str, tuple[bool, str]]:
    """Each part of the jail: whether this host and operator allow it, and why (or why not)."""
    allowed = operator_parts()
    root = os.geteuid() == 0
    out: dict[str, tuple[bool, str]] = {}

    def put(part: str, ok: bool, why: str) -> None:
        if part in PARTS and part not in allowed:
            out[part] = (False, f"left out by {JAIL_ENV}={os.environ.get(JAIL_ENV)}")
        else:
            out[part] = (ok, why)

    if root:
        try:
            uid, gid, source = jail_user()
            put("user", True, f"QEMU runs as uid {uid} gid {gid} ({source})")
        except ValueError as exc:
            put("user", False, str(exc))
    else:
        put("user", False, f"the controller runs as uid {os.geteuid()}, not root: QEMU keeps its uid")
    ns_ok = root and Path("/proc/self/ns/mnt").exists() and Path("/proc/self/ns/pid").exists()
    put("namespaces", ns_ok, "mount, PID and IPC namespaces, a minimal root" if ns_ok else "needs root")
    put("netns", ns_ok, "an empty network namespace unless a NIC needs the host's" if ns_ok else "needs root")
    version, why = cgroups.detect()
    put("cgroup", version is not None, why)
    if root and not jailhelper.compiler_available():  # the helper that applies them is compiled
        for part in ("user", "namespaces", "netns", "cgroup"):
            put(part, False, f"the jail helper is built with gcc: {jailhelper.COMPILER_PACKAGES}")
    put("env", True, "QEMU gets only " + ", ".join(sorted(MINIMAL_ENV)))
    passt = passt_path()
    out["passt"] = (passt is not None, f"egress NICs use {passt}" if passt else
                    "passt is not installed: network='egress' NICs fall back to 'none' (no egress)")  # fmt: skip
    return out


def status_allows(part: str) -> bool:
    try:
        jail_user()
    except ValueError:
        return False
    return part in operator_parts()


def passt_path() -> str | None:
    return shutil.which("passt")


@dataclass
class Jail:
    """What one sandbox's QEMU gets: decided by :func:`plan`, applied by the launcher."""

    uid: int | None = None
    gid: int | None = None
    extra_gids: tuple[int, ...] = ()
    namespaces: tuple[str, ...] = ()
    cgroup: cgroups.Cgroup | None = None
    minimal_env: bool = True
    root: Path | None = None
    #: the compiled jail helper (vmctl.hypervisors.jailhelper) that enters the jail and execs QEMU
    helper: Path | None = None
    #: the file QEMU is run from (its argv[0] may be a link to it)
    exe: Path | None = None
    #: RLIMIT_MEMLOCK QEMU gets (bytes, -1: unlimited), for mlock=True under a jail user (8 MiB by default)
    memlock: int | None = None
    #: (host path, path inside the jail, writable)
    binds: list[tuple[Path, Path, bool]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.uid is not None or bool(self.namespaces) or self.cgroup is not None

    @property
    def drops_user(self) -> bool:
        return self.uid is not None

    def parts(self) -> dict[str, str]:
        """Part -> ``on`` or the reason it is off (logged, and shown by ``Sandbox.jail``)."""
        on = {"user": self.uid is not None, "namespaces": "mount" in self.namespaces,
              "netns": "net" in self.namespaces, "cgroup": self.cgroup is not None, "env": self.minimal_env}  # fmt: skip
        return {p: "on" if on[p] else self.skipped.get(p, "off") for p in PARTS}

    def env(self) -> dict[str, str] | None:
        return dict(MINIMAL_ENV) if self.minimal_env else None

    def wrap(self, argv: list[str], *, pdeathsig: bool) -> list[str]:
        """The command that starts QEMU inside this jail (``argv`` itself when nothing needs the helper)."""
        if self.uid is None and not self.namespaces and self.cgroup is None:
            return argv
        assert self.helper is not None, "jailhelper.ensure() first"
        uid = self.uid if self.uid is not None else os.geteuid()
        gid = self.gid if self.gid is not None else os.getegid()
        groups = list(self.extra_gids) if self.uid is not None else os.getgroups()
        out = [str(self.helper), "--uid", str(uid), "--gid", str(gid), "--groups", ",".join(map(str, groups)),
               "--unshare", ",".join(self.namespaces), "--exe", str(self.exe) if self.exe else argv[0]]  # fmt: skip
        for procs in self.cgroup.procs_files if self.cgroup else []:
            out += ["--cgroup", procs]
        if self.root is not None:
            out += ["--root", str(self.root)]
        for path, at, writable in self.binds:
            out += ["--bind", str(path), str(at), "rw" if writable else "ro"]
        for key, value in (self.env() or dict(os.environ)).items():
            out += ["--env", f"{key}={value}"]
        if self.memlock is not None:
            out += ["--memlock", str(self.memlock)]
        if pdeathsig:
            out.append("--pdeathsig")
        return [*out, "--", *argv]


def cgroup_name(paths: RunPaths) -> str:
    """Stable for a run directory, so a controller attaching to a detached sandbox finds it."""
    digest = hashlib.sha256(str(paths.run_dir).encode()).hexdigest()[:10]
    return f"{paths.run_dir.name}-{digest}"


def memory_limit_mib(config: SandboxConfig) -> int:
    """Guest RAM at start plus QEMU's overhead (hot-added RAM raises the limit as it comes);
    with ``mlock`` under TCG the whole translation cache is resident too."""
    if config.memory_limit_mib is not None:
        return config.memory_limit_mib
    locked_cache = config.tcg_tb_size_mib if config.mlock and config.effective_accel() == "tcg" else 0
    return config.memory_mib + int(os.environ.get(OVERHEAD_ENV, MEMORY_OVERHEAD_MIB)) + locked_cache


def plan(config: SandboxConfig, run: RunPaths, devices: Sequence[Device], *, nic_netns: bool) -> Jail:
    """Decide this sandbox's jail. ``nic_netns``: its NICs can live in an empty network namespace."""
    status = host_status()
    jail = Jail()
    if not config.jail:
        for p in PARTS:
            jail.skipped[p] = "turned off for this sandbox (SandboxConfig.jail=False)"
        jail.minimal_env = False
        return jail
    for part, (ok, why) in status.items():
        if not ok:
            jail.skipped[part] = why
    jail.minimal_env = status["env"][0]
    path_bound = _needs_host_paths(config, devices)
    if status["user"][0]:
        if path_bound:
            jail.skipped["user"] = path_bound
        elif config.mlock and not _may_raise_memlock():
            jail.skipped["user"] = ("mlock=True: locking guest RAM as another user needs a higher RLIMIT_MEMLOCK, "
                                    "and this controller lacks CAP_SYS_RESOURCE to grant it")  # fmt: skip
        else:
            jail.uid, jail.gid, _ = jail_user()
            run_dirs.QEMU_UIDS.add(jail.uid)  # the stale sweep kills QEMU processes of this uid too
            if config.effective_accel() != "tcg" or config.accel == "kvm":
                kvm = _group_of("/dev/kvm")
                jail.extra_gids = (kvm,) if kvm is not None else ()
    if status["namespaces"][0]:
        if path_bound:
            jail.skipped["namespaces"] = path_bound
        else:
            jail.namespaces = ("mount", "pid", "ipc")
            jail.root = run.run_dir / "root"
    if jail.uid is not None and "mount" not in jail.namespaces:
        jail.uid = jail.gid = None
        jail.extra_gids = ()
        jail.skipped["user"] = "needs the mount namespace: the jail user could not reach the run directory"
    if status["netns"][0] and "mount" in jail.namespaces:
        if nic_netns:
            jail.namespaces += ("net",)
        else:
            jail.skipped["netns"] = "a NIC needs the host's network (tap, network='host', or slirp port forwarding)"
    elif status["netns"][0]:
        jail.skipped["netns"] = "comes with the mount namespace, which is off"
    if config.mlock and jail.uid is not None:  # root could lock all it wanted; the cgroup still caps it
        jail.memlock = -1
    if status["cgroup"][0]:
        version, _ = cgroups.detect()
        assert version is not None
        jail.cgroup = cgroups.Cgroup(cgroup_name(run), version)
    return jail


def _may_raise_memlock() -> bool:
    """Whether this process may lift RLIMIT_MEMLOCK for QEMU (CAP_SYS_RESOURCE, or no cap at all)."""
    if resource.getrlimit(resource.RLIMIT_MEMLOCK)[1] == resource.RLIM_INFINITY:
        return True
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    except (OSError, ValueError):
        pass
    return False


def _group_of(path: str) -> int | None:
    try:
        return os.stat(path).st_gid
    except OSError:
        return None


def _needs_host_paths(config: SandboxConfig, devices: Sequence[Device]) -> str | None:
    """Why QEMU must see the host's paths as the controller does (None: the jail can serve it)."""
    for device in devices:
        if isinstance(device, VhostUserBlockDevice | VhostUserNetDevice):
            return "a vhost-user device: QEMU connects to its socket by path"
        if isinstance(device, VfioDevice):
            return "a VFIO device: QEMU opens /dev/vfio by path"
        if isinstance(device, SerialPort) and device.socket is not None and device.socket.parent.name != "q":
            return "a serial port socket outside the run directory"
        if isinstance(device, NetworkDevice) and device.backend == "tap":
            return "a tap NIC: QEMU opens /dev/net/tun as the controller"
    if config.huge_pages:
        return "huge pages: QEMU maps /dev/hugepages by path"
    if config.shared_memory:  # what vhost-user needs: a backend plugged later is reached by its socket path
        return "shared memory for vhost-user backends: QEMU connects to their sockets by path, hot-plugged ones too"
    if config.vsock:
        return "vsock: /dev/vhost-vsock is the controller's"
    return None


def nic_netns(config: SandboxConfig, devices: Sequence[Device]) -> bool:
    """Whether this sandbox's NICs work from an empty network namespace: passt (egress) and
    restricted slirp (none) do, unless slirp must listen for a port forward on the host."""
    if config.network == "host":
        return False
    if config.network == "egress" and passt_path() is not None:
        return True
    return not any(isinstance(d, NetworkDevice) and d.backend == "user" and d.hostfwd for d in devices)


def prepare(jail: Jail, config: SandboxConfig, paths: RunPaths) -> dict[str, Path]:
    """Make what the jail needs on disk before QEMU starts; returns where QEMU finds its boot
    files (kernel, initrd, firmware) when not at the config's paths.

    The run directory stays the controller's (0700): QEMU gets ``run_dir/q`` (its own, for the
    sockets it creates) and, in its mount namespace, only that, the boot files and a template's
    memory file."""
    q = paths.qemu_dir
    q.mkdir(mode=0o700, exist_ok=True)
    if os.geteuid() == 0 and status_allows("user"):  # QEMU's (and passt's) user, even unjailed
        uid, gid, _ = (jail.uid, jail.gid, "") if jail.uid is not None else jail_user()
        os.chown(q, uid, gid if gid is not None else -1)
    if jail.uid is None and not jail.namespaces:
        return {}
    jail.binds = [(q, q, True)]
    boot_files: dict[str, Path] = {}
    for name in ("kernel", "initrd", "firmware"):  # inside QEMU's own directory: the host's paths stay unseen
        path: Path | None = getattr(config, name)
        if path is None:
            continue
        inside = q / name
        if jail.uid is not None and not _readable_by(path, jail.uid):
            shutil.copyfile(path, inside)  # a copy the jail user can read
            os.chown(inside, jail.uid, jail.gid if jail.gid is not None else -1)
        else:
            os.close(os.open(inside, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o400))  # what the bind covers
            jail.binds.append((path.resolve(), inside, False))
        boot_files[name] = inside
    if config.boot_from_template and config.guest_ram_shared:  # a clone's own copy (see placement.clone_ram)
        own = clone_ram(paths.run_dir)
        if jail.uid is not None:
            os.chown(own, jail.uid, jail.gid if jail.gid is not None else -1)
        jail.binds.append((own, own, True))
    elif config.memory_path is not None and (config.boot_to_be_template or config.boot_from_template):
        mem = config.memory_path
        if config.boot_to_be_template and not mem.exists():
            os.close(os.open(mem, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        if jail.uid is not None:
            os.chown(mem, jail.uid, jail.gid if jail.gid is not None else -1)
        jail.binds.append((mem, mem, True))
    for device in config.devices:  # QEMU serves a 9p share itself: its directory, at the same path
        if isinstance(device, SharedDirectory) and not device.over_virtiofs:
            jail.binds.append((device.host_path, device.host_path, not device.read_only))
    entropy = config.entropy_source
    if not str(entropy).startswith("/dev/"):
        jail.binds.append((entropy, entropy, False))
    qemu = config.qemu_binary
    if qemu is not None:  # run by its real path: QEMU finds its modules relative to it
        jail.exe = Path(qemu).resolve()
        if not str(jail.exe).startswith("/usr/"):
            jail.binds.append((jail.exe, jail.exe, False))
    if jail.root is not None:
        jail.root.mkdir(mode=0o700, exist_ok=True)
    return boot_files


def _readable_by(path: Path, uid: int) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return bool(st.st_mode & 0o004) or (st.st_uid == uid and bool(st.st_mode & 0o400))


def limits_for(config: SandboxConfig) -> cgroups.Limits:
    vcpus = config.max_vcpus or config.vcpus
    return cgroups.Limits(memory_bytes=memory_limit_mib(config) * 1024 * 1024, cpus=vcpus + 1.0, pids=PIDS_MAX)


def inner_pid(pid: int) -> int:
    """QEMU's own pid on the host: ``pid`` itself, or the jail helper's child (PID namespace)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid
    if children and cmdline.split(b"\0", 1)[0].endswith(b"/" + jailhelper.NAME.encode()):
        return int(children[0])
    return pid


def kill_inner(pid: int) -> bool:
    """SIGKILL QEMU itself behind the jail's outer process ``pid``, which then reaps it and exits
    the same way. Killing the outer process first would orphan QEMU: a zombie until the host's
    init reaps it (about 2 s here), after the caller thought it gone. False: no such QEMU (not
    jailed in a PID namespace, not forked yet, or gone), so the caller kills ``pid`` itself."""
    inner = inner_pid(pid)
    if inner == pid:
        return False
    try:
        pidfd = os.pidfd_open(inner)
    except OSError:
        return False
    try:
        if inner_pid(pid) != inner:  # asked again once the pidfd pins it: no pid-reuse race
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def host_thread_ids(pid: int, tids: dict[int, int]) -> dict[int, int]:
    """vCPU thread ids as QEMU sees them (inside its PID namespace) turned into the host's."""
    qemu = inner_pid(pid)
    if qemu == pid:
        return tids
    mapping: dict[int, int] = {}
    try:
        for task in Path(f"/proc/{qemu}/task").iterdir():
            for line in (task / "status").read_text().splitlines():
                if line.startswith("NSpid:"):
                    ids = [int(x) for x in line.split()[1:]]
                    mapping[ids[-1]] = ids[0]
    except OSError:
        return tids
    return {cpu: mapping.get(tid, tid) for cpu, tid in tids.items()}


def existing_cgroup(paths: RunPaths) -> cgroups.Cgroup | None:
    """The cgroup a detached sandbox's QEMU was started in, for the controller that attaches."""
    version, _ = cgroups.detect()
    if version is None:
        return None
    group = cgroups.Cgroup(cgroup_name(paths), version)
    return group if group.exists() else None
