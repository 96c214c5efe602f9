"""libvirt peer: the same sandbox scenarios driven through Debian's libvirtd instead of vmctl.

Starts a private libvirtd (Debian 12 ships only the monolithic daemon, no virtqemud) in its own
mount namespace, with its own config, state, cache and log directories in a 0700 temporary
directory, listening only on a unix socket there (no TCP, no systemd units); connects with
libvirt's Python binding over ``qemu+unix:///system?socket=...``; defines domains equivalent to
vmctl's QEMU command line (TCG, q35, 1 vCPU, 256 MiB, direct kernel boot of the default guest,
the vmctl agent on a virtio-serial port, virtio-rng, serial console to a file, free PCIe root
ports for hotplug) and measures, with p50/p95 over several rounds:

* boot to ready: define + start until the agent's ``READY`` line;
* pause and resume: ``suspend()`` / ``resume()`` until the SUSPENDED / RESUMED lifecycle event
  arrives through libvirt's event loop (the call-return times are recorded too);
* disk hotplug: ``attachDeviceFlags`` (virtio-blk, raw file) until the guest agent's WAITDEV sees
  the disk; ``detachDeviceFlags`` until the DEVICE_REMOVED event;
* N domains started concurrently (N = 1, 4, 8, 16 by default): until all are ready;
* stop and cleanup: ``destroy()`` + ``undefine()`` until the QEMU process is gone;
* CPU seconds of libvirtd and of this client (utime+stime from /proc/<pid>/stat), libvirtd RSS.

Needs ``scripts/bench-setup`` (libvirt-daemon, libvirt-daemon-driver-qemu, python3-libvirt, and
the binding made importable from .venv). Standalone:

    VMCTL_CACHE_DIR=/tmp/vc .venv/bin/python bench/libvirt_peer.py --rounds 5 --concurrency 1,4,8,16

prints a table and writes bench/results/libvirt-<timestamp>.json. From another benchmark:

    from libvirt_peer import LibvirtPeer, benchmark
    result = await benchmark(kernel, initrd, rounds=5)          # the whole suite, a dict
    async with LibvirtPeer(kernel, initrd) as peer:             # or piece by piece
        vm = await peer.boot(); await vm.pause_resume(); await peer.stop(vm)

Every libvirt call runs in a worker thread (the binding blocks); events come from libvirt's
default event loop running in one daemon thread and are handed to asyncio futures, so the API
is plain asyncio and works under anyio's asyncio backend. Runs as root (mount namespace, QEMU as
root). While a peer runs, this process is the child subreaper of libvirt's QEMUs (see _Reaper;
``reap_qemu=False`` / ``--no-reap`` turns that off).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import fcntl
import itertools
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import libvirt

RESULTS = Path(__file__).parent / "results"
LIBVIRTD = "/usr/sbin/libvirtd"
AGENT_PORT_NAME = "org.vmctl.agent"
# vmctl's -append for this config (vmctl.hypervisors.cmdline.kernel_cmdline without memory hotplug)
APPEND = "console=ttyS0 panic=1 reboot=t no_timer_check quiet"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Where a privileged libvirtd keeps its things (fixed at build time for root: only libvirtd.conf
# and the pid file can be moved by options). Inside the daemon's mount namespace each of these
# is a bind mount of a directory in our private temp dir, so nothing of ours lands in them.
BIND_DIRS = {
    "etc": "/etc/libvirt",  # qemu.conf, persistent domain XML
    "run": "/run/libvirt",  # runtime state, QEMU pid files, monitor sockets
    "lib": "/var/lib/libvirt",  # per-domain directories
    "cache": "/var/cache/libvirt",  # QEMU capabilities cache (fresh per run: probed once at start)
    "log": "/var/log/libvirt",  # per-domain QEMU logs (with the exact command line)
}

LIBVIRTD_CONF = """\
# private libvirtd: unix sockets in our 0700 directory only, no TCP/TLS, no auth (0700 socket)
unix_sock_dir = "{sock}"
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
unix_sock_admin_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
listen_tls = 0
listen_tcp = 0
log_outputs = "3:file:{log}"
"""

QEMU_CONF = """\
# QEMU runs as root like vmctl's QEMU here: Debian's default user/group is libvirt-qemu, which
# only libvirt-daemon-system creates (we do not install it; see the passwd note in the code).
user = "root"
group = "root"
# do not chown the shared kernel/initrd/disk files to the QEMU user, nor keep xattrs about them
dynamic_ownership = 0
remember_owner = 0
# no AppArmor/SELinux labelling: no profile is loaded here, and vmctl does none either
security_driver = "none"
# no private /dev mount namespace per QEMU (libvirt's default): vmctl's QEMU sees the host /dev
namespaces = [ ]
# no per-domain cgroups: vmctl creates none, and they would be made under the host's
# (writable, v1) /sys/fs/cgroup hierarchy, outside our temp dir
cgroup_controllers = [ ]
# QEMU's stdout/stderr straight to the per-domain log file, so no virtlogd daemon is needed
stdio_handler = "file"
# left at libvirt's defaults: seccomp_sandbox = 1 (the same -sandbox options vmctl passes),
# lock_manager none, no VNC/SPICE (the domains have no graphics)
"""


def _cpu_seconds(pid: int | str) -> float:
    """utime + stime of a whole process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie has exited
    except (FileNotFoundError, ProcessLookupError):
        return True


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50": statistics.median(ordered), "p95": p95, "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


# ---------------------------------------------------------------------------------------------
# libvirt's event loop: the default implementation, run by one daemon thread for the process.
# It must be registered before the first connection is opened, and only once per process.

_event_lock = threading.Lock()
_event_thread: threading.Thread | None = None


def _ensure_event_loop() -> None:
    global _event_thread
    with _event_lock:
        if _event_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        # errors arrive as exceptions: do not also print each one to stderr (libvirt's default)
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        _event_thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _event_thread.start()


# ---------------------------------------------------------------------------------------------
# Reaping QEMU. libvirtd daemonizes QEMU (double fork), so QEMU is re-parented to PID 1, and
# destroy() polls kill(pid, 0) every 200 ms until the process is reaped, not just dead. The PID 1
# of this machine reaps zombies only every second or so, which made every destroy() take 1.2-2 s
# although QEMU was dead within 5 ms. A normal init reaps at once. So (by default) this process
# becomes a child subreaper while the peer runs: the QEMUs are re-parented to us instead, and a
# thread reaps each one (only the pids it was given: never a child someone else waits for) as soon
# as its pidfd says it exited.

PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(on: bool) -> bool:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0)


class _Reaper:
    def __init__(self) -> None:
        self._pidfds: dict[int, int] = {}  # pidfd -> pid
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="libvirt-peer-reaper", daemon=True)
        self._thread.start()

    def add(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return  # already gone (reaped by someone)
        with self._lock:
            self._pidfds[fd] = pid
        os.write(self._wake_w, b"x")

    def _run(self) -> None:
        import select

        while True:
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            with self._lock:
                if self._closed:
                    break
                for fd in self._pidfds:
                    poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(1000):
                if fd == self._wake_r:
                    os.read(self._wake_r, 4096)
                    continue
                with self._lock:
                    pid = self._pidfds.pop(fd)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)  # ours only if the subreaper took it
                os.close(fd)

    def close(self) -> None:
        """Reap what is left (after the daemon and QEMUs are gone), stop the thread."""
        with self._lock:
            self._closed = True
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        with self._lock:
            for fd, pid in self._pidfds.items():
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                os.close(fd)
            self._pidfds.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)


# ---------------------------------------------------------------------------------------------
# The private daemon


class PrivateLibvirtd:
    """libvirtd in its own mount namespace with everything in one 0700 temp dir. Synchronous."""

    def __init__(self, libvirtd: str = LIBVIRTD, *, reap_qemu: bool = True) -> None:
        self.libvirtd = libvirtd
        self.reap_qemu = reap_qemu
        self._reaper: _Reaper | None = None
        self.token = secrets.token_hex(3)  # in every domain name: lets cleanup find only ours
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._created_mountpoints: list[str] = []
        self._lock_file: Any = None

    @property
    def socket(self) -> Path:
        assert self.dir is not None
        return self.dir / "sock" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, lines: int = 15) -> str:
        out: list[str] = []
        for name in ("daemon.out", "libvirtd.log"):
            with contextlib.suppress(OSError, TypeError):
                out += (self.dir / name).read_text(errors="replace").splitlines()[-lines:]  # type: ignore[operator]
        return "\n".join(out)

    def start(self) -> None:
        d = self.dir = Path(tempfile.mkdtemp(prefix="vmctl-libvirt-"))
        os.chmod(d, 0o700)
        atexit.register(self.stop)  # last resort if the caller never got to stop(); idempotent
        for sub in ["sock", "vms", *BIND_DIRS]:
            (d / sub).mkdir(mode=0o700)
        (d / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(sock=d / "sock", log=d / "libvirtd.log"))
        (d / "etc" / "qemu.conf").write_text(QEMU_CONF)
        binds = [(str(d / sub), target) for sub, target in BIND_DIRS.items()]
        # Debian's libvirtd resolves its built-in default QEMU user (libvirt-qemu) before it reads
        # qemu.conf, and fails to start when that user does not exist (only libvirt-daemon-system
        # creates it). Rather than add a user to the host, the daemon's namespace gets private
        # copies of /etc/passwd and /etc/group with that entry; QEMU still runs as root (qemu.conf).
        passwd, group = Path("/etc/passwd").read_text(), Path("/etc/group").read_text()
        if not any(line.startswith("libvirt-qemu:") for line in passwd.splitlines()):
            (d / "passwd").write_text(
                passwd + "libvirt-qemu:x:64055:64055:libvirt peer:/nonexistent:/usr/sbin/nologin\n"
            )
            binds.append((str(d / "passwd"), "/etc/passwd"))
        if not any(line.startswith("libvirt-qemu:") for line in group.splitlines()):
            (d / "group").write_text(group + "libvirt-qemu:x:64055:\n")
            binds.append((str(d / "group"), "/etc/group"))
        self._prepare_mountpoints()
        script = "set -e\n" + "".join(f"mount --bind {shlex.quote(s)} {shlex.quote(t)}\n" for s, t in binds)
        script += f"exec {shlex.quote(self.libvirtd)} --config {shlex.quote(str(d / 'libvirtd.conf'))} " \
                  f"--pid-file {shlex.quote(str(d / 'libvirtd.pid'))}\n"  # fmt: skip
        with open(d / "daemon.out", "wb") as out:
            # unshare and sh both exec: the Popen pid is libvirtd's own pid
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def open(self, timeout: float = 60) -> libvirt.virConnect:
        """Connect once the daemon has finished its start-up (or raise with its log)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.socket.exists():
                try:
                    return libvirt.open(self.uri)
                except libvirt.libvirtError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"libvirtd did not come up in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.01)

    def start_reaping(self) -> None:
        """Become the subreaper of libvirtd's daemonized QEMUs from now on (see _Reaper). Called
        after the capabilities probe, whose probe QEMU libvirt kills without waiting: that one
        stays PID 1's to reap, since this process only reaps pids it is given."""
        if self.reap_qemu and self._reaper is None and _set_subreaper(True):
            self._reaper = _Reaper()

    def qemu_pid(self, name: str) -> int | None:
        """The pid of a started domain's QEMU (from libvirt's pid file); registers it for reaping."""
        assert self.dir is not None
        try:
            pid = int((self.dir / "run" / "qemu" / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        if self._reaper is not None:
            self._reaper.add(pid)
        return pid

    def stop(self, conn: libvirt.virConnect | None = None) -> list[str]:
        """Destroy and undefine our domains, stop the daemon, kill any QEMU of ours that is left,
        remove the temp dir. Idempotent; never raises; returns what it had to clean up by force."""
        notes: list[str] = []
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                for dom in conn.listAllDomains():
                    if self.token not in dom.name():
                        continue
                    notes.append(f"domain {dom.name()} was left: destroyed")
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.destroy()
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.undefine()
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                notes.append("libvirtd ignored SIGTERM: killed")
                self.proc.kill()
                self.proc.wait()
        # QEMU is daemonized by libvirt (not our child): find ours by the unique token in -name
        for pid in self._our_qemu_pids():
            notes.append(f"QEMU {pid} was left running: killed")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if self._reaper is not None:
                self._reaper.add(pid)
        if self._reaper is not None:
            time.sleep(0.05)  # let the reaper take the last ones, then stop being a subreaper
            self._reaper.close()
            self._reaper = None
            _set_subreaper(False)
        self._release_mountpoints()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        atexit.unregister(self.stop)
        return notes

    def _our_qemu_pids(self) -> list[int]:
        pids = []
        needle = f"guest=lvp{self.token}-".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if needle in cmdline and not _process_gone(int(entry)):
                pids.append(int(entry))
        return pids

    # The bind targets must exist on the host. On a machine without libvirt-daemon-system they
    # do not: create them (empty) and remove them again at the end, unless another peer run is
    # still using them (shared lock while running, exclusive try at the end).
    def _prepare_mountpoints(self) -> None:
        self._lock_file = open(Path(tempfile.gettempdir()) / "vmctl-libvirt-peer.lock", "a")  # noqa: SIM115
        fcntl.flock(self._lock_file, fcntl.LOCK_SH)
        for target in BIND_DIRS.values():
            if not os.path.isdir(target):
                os.makedirs(target, mode=0o755)
                self._created_mountpoints.append(target)

    def _release_mountpoints(self) -> None:
        if self._lock_file is None:
            return
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # another run holds it: leave the (empty) directories to it
        else:
            for target in reversed(self._created_mountpoints):
                with contextlib.suppress(OSError):
                    os.rmdir(target)  # only if still empty
        self._created_mountpoints = []
        self._lock_file.close()
        self._lock_file = None


# ---------------------------------------------------------------------------------------------
# Domain XML


def domain_xml(name: str, kernel: Path, initrd: Path, *, agent_socket: Path, console_log: Path,
               memory_mib: int = 256, vcpus: int = 1, max_vcpus: int | None = None, root_ports: int = 3,
               append: str = APPEND, entropy_source: str = "/dev/urandom") -> str:  # fmt: skip
    """A domain equivalent to vmctl's command line for SandboxConfig(vcpus=1, memory_mib=256).

    Placed like vmctl's devices: virtio-serial and virtio-rng on the root complex (libvirt would
    otherwise put each on a root port of its own), and ``root_ports`` free pcie-root-ports for
    hotplug. Differences that remain: no pvpanic-pci (libvirt 9.0 has only ISA pvpanic), no
    memory-hotplug slots (libvirt needs a NUMA topology for them), reboot handled by libvirt
    (-no-shutdown, on_reboot=destroy) instead of -action reboot=shutdown; libvirt adds its own
    -cpu qemu64 (QEMU's TCG default anyway), -uuid, -rtc base=utc, -boot strict=on, a master-key
    secret object and an audiodev of type none.
    """
    max_vcpus = max_vcpus or os.cpu_count() or 1  # vmctl's default: maxcpus = host CPUs
    e = escape
    ports = "".join(f"    <controller type='pci' index='{i + 1}' model='pcie-root-port'/>\n" for i in range(root_ports))
    domain_type = "kvm" if os.environ.get("VMCTL_ACCEL") == "kvm" else "qemu"  # qemu: TCG
    return f"""<domain type='{domain_type}'>
  <name>{e(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu placement='static' current='{vcpus}'>{max_vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{e(str(kernel))}</kernel>
    <initrd>{e(str(initrd))}</initrd>
    <cmdline>{e(append)}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <cpu><topology sockets='1' dies='1' cores='{max_vcpus}' threads='1'/></cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{e(shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64")}</emulator>
    <controller type='pci' index='0' model='pcie-root'/>
{ports}    <controller type='usb' model='none'/>
    <controller type='virtio-serial' index='0'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </controller>
    <serial type='file'><source path='{e(str(console_log))}'/><target port='0'/></serial>
    <console type='file'><source path='{e(str(console_log))}'/><target type='serial' port='0'/></console>
    <channel type='unix'>
      <source mode='bind' path='{e(str(agent_socket))}'/>
      <target type='virtio' name='{AGENT_PORT_NAME}'/>
    </channel>
    <rng model='virtio'>
      <backend model='random'>{e(entropy_source)}</backend>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </rng>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def disk_xml(path: Path, serial: str) -> str:
    """A raw file as virtio-blk; libvirt picks a free root port. The user alias ("ua-" prefix)
    is what the DEVICE_REMOVED event reports."""
    return f"""<disk type='file' device='disk'>
  <driver name='qemu' type='raw'/>
  <source file='{escape(str(path))}'/>
  <target dev='vdb' bus='virtio'/>
  <serial>{escape(serial)}</serial>
  <alias name='ua-{escape(serial)}'/>
</disk>"""


# ---------------------------------------------------------------------------------------------
# The async API


class AgentError(RuntimeError):
    pass


@dataclass
class PeerVm:
    """One running domain: its libvirt handle, its agent connection, what start-up took."""

    peer: LibvirtPeer
    name: str
    dom: libvirt.virDomain
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    qemu_pid: int | None
    ready_seconds: float
    boot_id: str
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    stopped: bool = False

    async def request(self, line: str, timeout: float = 30) -> list[str]:
        """Send one agent request (its id is added), return the reply's fields."""
        rid = str(next(self._ids))
        op, _, rest = line.partition(" ")
        self.writer.write(f"{op} {rid} {rest}\n".encode())
        await self.writer.drain()
        async with asyncio.timeout(timeout):
            while True:
                reply = (await self.reader.readline()).decode()
                if not reply:
                    raise AgentError(f"{self.name}: agent connection closed")
                parts = reply.rstrip("\n").split(" ")
                if len(parts) > 1 and parts[1] == rid:
                    return parts

    async def pause_resume(self) -> dict[str, float]:
        """suspend() until the SUSPENDED event, resume() until the RESUMED event."""
        p = self.peer
        out = {}
        for what, call, event in (("pause", self.dom.suspend, libvirt.VIR_DOMAIN_EVENT_SUSPENDED),
                                  ("resume", self.dom.resume, libvirt.VIR_DOMAIN_EVENT_RESUMED)):  # fmt: skip
            seen = p._expect(self.name, "lifecycle", event)
            started = time.perf_counter()
            await p._call(call)
            out[f"{what}_call"] = time.perf_counter() - started
            await asyncio.wait_for(seen, 30)
            out[what] = time.perf_counter() - started
        out["round_trip"] = out["pause"] + out["resume"]
        return out

    async def hotplug_disk(self, path: Path, serial: str) -> tuple[float, str]:
        """attachDeviceFlags until the guest sees the disk; returns (seconds, guest name)."""
        started = time.perf_counter()
        await self.peer._call(self.dom.attachDeviceFlags, disk_xml(path, serial), libvirt.VIR_DOMAIN_AFFECT_LIVE)
        reply = await self.request(f"WAITDEV virtio {serial} 100")
        if reply[:4] != ["R", reply[1], "0", "0"]:
            raise AgentError(f"{self.name}: guest did not see disk {serial}: {reply}")
        return time.perf_counter() - started, base64.b64decode(reply[4]).decode() if len(reply) > 4 else ""

    async def unplug_disk(self, path: Path, serial: str) -> tuple[float, float]:
        """detachDeviceFlags until the DEVICE_REMOVED event; returns (until event, until call returned)."""
        removed = self.peer._expect(self.name, "removed", f"ua-{serial}")
        started = time.perf_counter()
        await self.peer._call(self.dom.detachDeviceFlags, disk_xml(path, serial), libvirt.VIR_DOMAIN_AFFECT_LIVE)
        call = time.perf_counter() - started
        await asyncio.wait_for(removed, 30)
        return time.perf_counter() - started, call

    async def stop(self) -> float:
        """destroy() + undefine() until the QEMU process is gone; idempotent."""
        if self.stopped:
            return 0.0
        self.stopped = True
        started = time.perf_counter()
        self.writer.close()
        try:
            await self.peer._call(self.dom.destroy)
        except libvirt.libvirtError:
            if await self.peer._call(self.dom.isActive):
                raise
        await self.peer._call(self.dom.undefine)
        while self.qemu_pid is not None and not _process_gone(self.qemu_pid):  # noqa: ASYNC110 (no event for this)
            await asyncio.sleep(0.002)
        return time.perf_counter() - started


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class LibvirtPeer:
    """``async with LibvirtPeer(kernel, initrd) as peer``: a private libvirtd and a connection."""

    def __init__(self, kernel: Path, initrd: Path, *, memory_mib: int = 256, vcpus: int = 1,
                 root_ports: int = 3, boot_timeout: float = 300, reap_qemu: bool = True) -> None:  # fmt: skip
        self.kernel, self.initrd = Path(kernel), Path(initrd)
        self.memory_mib, self.vcpus, self.root_ports = memory_mib, vcpus, root_ports
        self.boot_timeout = boot_timeout
        self.daemon = PrivateLibvirtd(reap_qemu=reap_qemu)
        self.conn: libvirt.virConnect | None = None
        self.vms: list[PeerVm] = []
        self.start_seconds: dict[str, float] = {}
        self.cleanup_notes: list[str] = []
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="libvirt-peer")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[tuple[str, str, object], list[asyncio.Future[None]]] = {}
        self._waiters_lock = threading.Lock()
        self._callbacks: list[int] = []
        self._seq = itertools.count()

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._pool, fn, *args)

    async def __aenter__(self) -> LibvirtPeer:
        self._loop = asyncio.get_running_loop()
        try:
            await self._call(self._start)
        except BaseException:
            await asyncio.shield(self.aclose())
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.shield(self.aclose())

    def _start(self) -> None:
        _ensure_event_loop()
        started = time.perf_counter()
        self.daemon.start()
        self.conn = self.daemon.open()
        self.start_seconds["daemon_to_connection"] = time.perf_counter() - started
        t = time.perf_counter()
        self.conn.getCapabilities()  # the private cache is empty: libvirt probes QEMU here
        self.start_seconds["qemu_capabilities_probe"] = time.perf_counter() - t
        self.start_seconds["total"] = time.perf_counter() - started
        self.daemon.start_reaping()
        self.libvirt_version = self.conn.getLibVersion()
        self.qemu_version = self.conn.getVersion()
        self._callbacks = [
            self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None),
            self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_removed, None),
        ]

    async def aclose(self) -> None:
        """Stop every domain, then the daemon; remove everything. Safe to call twice."""
        for vm in list(self.vms):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(vm.stop(), 30)
        await self._call(self._stop_daemon)
        self._pool.shutdown(wait=False)

    def _stop_daemon(self) -> None:
        if self.conn is not None:
            for cb in self._callbacks:
                with contextlib.suppress(libvirt.libvirtError):
                    self.conn.domainEventDeregisterAny(cb)
            self._callbacks = []
        self.cleanup_notes += self.daemon.stop(self.conn)
        self.conn = None

    # events: called on the libvirt event thread; hand over to the asyncio loop
    def _expect(self, name: str, kind: str, key: object) -> asyncio.Future[None]:
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        with self._waiters_lock:
            self._waiters.setdefault((name, kind, key), []).append(fut)
        return fut

    def _fire(self, name: str, kind: str, key: object) -> None:
        with self._waiters_lock:
            futs = self._waiters.pop((name, kind, key), [])
        assert self._loop is not None
        for fut in futs:
            self._loop.call_soon_threadsafe(_settle, fut)

    def _on_lifecycle(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        self._fire(dom.name(), "lifecycle", event)

    def _on_removed(self, conn: Any, dom: Any, alias: str, opaque: Any) -> None:
        self._fire(dom.name(), "removed", alias)

    def rss_kib(self) -> dict[str, int]:
        return {"rss": _status_kib(self.daemon.pid, "VmRSS"), "peak": _status_kib(self.daemon.pid, "VmHWM")}

    def cpu_seconds(self) -> dict[str, float]:
        return {"libvirtd": _cpu_seconds(self.daemon.pid), "client": _cpu_seconds("self")}

    def qemu_command_line(self, name: str) -> str:
        """The QEMU command line libvirt used for a domain, from its private log."""
        assert self.daemon.dir is not None
        with contextlib.suppress(OSError):
            text = (self.daemon.dir / "log" / "qemu" / f"{name}.log").read_text()
            start = text.find("\n") + 1
            return text[start : text.find("\n", text.find("-msg timestamp=on", start))].strip()
        return ""

    async def boot(self) -> PeerVm:
        """define + start (paused, as vmctl starts QEMU with -S), connect the agent socket,
        resume, until the agent's READY line."""
        assert self.conn is not None
        name = f"lvp{self.daemon.token}-{next(self._seq)}"
        assert self.daemon.dir is not None
        vm_dir = self.daemon.dir / "vms" / name
        vm_dir.mkdir()
        agent = vm_dir / "agent.sock"
        xml = domain_xml(name, self.kernel, self.initrd, agent_socket=agent, console_log=vm_dir / "console.log",
                         memory_mib=self.memory_mib, vcpus=self.vcpus, root_ports=self.root_ports)  # fmt: skip
        started = time.perf_counter()
        dom = await self._call(self.conn.defineXML, xml)
        writer = None
        try:
            await self._call(dom.createWithFlags, libvirt.VIR_DOMAIN_START_PAUSED)
            pid = self.daemon.qemu_pid(name)
            reader, writer = await asyncio.open_unix_connection(str(agent))
            await self._call(dom.resume)
            async with asyncio.timeout(self.boot_timeout):
                while not (line := (await reader.readline()).decode()).startswith("READY"):
                    if not line:
                        raise AgentError(f"{name}: agent closed before READY")
            vm = PeerVm(self, name, dom, reader, writer, pid, time.perf_counter() - started,
                        line.split()[1])  # fmt: skip
        except BaseException:
            if writer is not None:
                writer.close()
            with contextlib.suppress(libvirt.libvirtError):
                await asyncio.shield(self._call(dom.destroy))
            with contextlib.suppress(libvirt.libvirtError):
                await asyncio.shield(self._call(dom.undefine))
            raise
        self.vms.append(vm)
        return vm

    async def stop(self, vm: PeerVm) -> float:
        seconds = await vm.stop()
        if vm in self.vms:
            self.vms.remove(vm)
        return seconds

    async def boot_many(self, n: int) -> tuple[float, list[PeerVm]]:
        """n domains started at once; seconds until all are ready. On a failure the others are
        cancelled; the ones already up are stopped by aclose."""
        started = time.perf_counter()
        async with asyncio.TaskGroup() as tg:  # one failure cancels the rest (each undoes itself)
            tasks = [tg.create_task(self.boot()) for _ in range(n)]
        return time.perf_counter() - started, [t.result() for t in tasks]


# ---------------------------------------------------------------------------------------------
# The suite


async def benchmark(kernel: Path, initrd: Path, *, rounds: int = 5, concurrency: Iterable[int] = (1, 4, 8, 16),
                    memory_mib: int = 256, disk_dir: Path | None = None, reap_qemu: bool = True,
                    progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:  # fmt: skip
    """Run every scenario; return samples, summaries, CPU and memory as a JSON-able dict."""
    concurrency = list(concurrency)
    samples: dict[str, list[float]] = {}
    cpu: dict[str, dict[str, float]] = {}
    rss: dict[str, dict[str, int]] = {}

    def add(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    disk_dir = disk_dir or RESULTS
    disk_dir.mkdir(parents=True, exist_ok=True)
    disk = disk_dir / f".libvirt-disk-{os.getpid()}.img"
    with disk.open("wb") as f:
        f.truncate(16 << 20)
    extra: dict[str, Any] = {"reap_qemu": reap_qemu}
    extra["load_average_at_start"] = os.getloadavg()
    try:
        async with LibvirtPeer(kernel, initrd, memory_mib=memory_mib, reap_qemu=reap_qemu) as peer:
            extra["daemon_start"] = peer.start_seconds
            extra["libvirt_version"] = peer.libvirt_version
            extra["qemu_version"] = peer.qemu_version
            rss["after_start"] = peer.rss_kib()

            def scenario(name: str) -> Callable[[], None]:
                before = peer.cpu_seconds()

                def done() -> None:
                    after = peer.cpu_seconds()
                    cpu[name] = {k: after[k] - before[k] for k in after}
                    rss[name] = peer.rss_kib()

                return done

            done = scenario("boot+stop")
            for i in range(rounds):
                vm = await peer.boot()
                add("boot_ready", vm.ready_seconds)
                if i == 0:
                    extra["qemu_command_line"] = peer.qemu_command_line(vm.name)
                add("stop_cleanup", await peer.stop(vm))
                progress(f"boot {i + 1}/{rounds}: ready {vm.ready_seconds:.3f}s")
            done()

            vm = await peer.boot()
            done = scenario("pause/resume")
            for _ in range(rounds):
                for k, v in (await vm.pause_resume()).items():
                    add(k, v)
            await vm.request("PING")  # the guest runs again
            done()
            progress("pause/resume done")

            done = scenario("hotplug")
            for i in range(rounds):
                seconds, guest_name = await vm.hotplug_disk(disk, f"lv{i}")
                add("hotplug_add", seconds)
                seconds, call = await vm.unplug_disk(disk, f"lv{i}")
                add("hotplug_remove", seconds)
                add("hotplug_remove_call", call)
                extra["hotplug_guest_name"] = guest_name
            done()
            progress("hotplug done")
            await peer.stop(vm)

            for n in concurrency:
                done = scenario(f"concurrent {n}")
                all_ready, vms = await peer.boot_many(n)
                add(f"concurrent_{n}_all_ready", all_ready)
                for vm in vms:
                    add(f"concurrent_{n}_each_ready", vm.ready_seconds)
                started = time.perf_counter()
                await asyncio.gather(*(peer.stop(vm) for vm in vms))
                add(f"concurrent_{n}_all_stopped", time.perf_counter() - started)
                done()
                progress(f"{n} at once: all ready in {all_ready:.3f}s")
            rss["end"] = peer.rss_kib()
            extra["load_average_at_end"] = os.getloadavg()
            extra["qemu_conf"] = QEMU_CONF
        extra["cleanup_forced"] = peer.cleanup_notes
    finally:
        disk.unlink(missing_ok=True)
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(), "rounds": rounds,
            "memory_mib": memory_mib, "concurrency": list(concurrency), "samples": samples,
            "summary": {k: summary(v) for k, v in samples.items()}, "cpu_seconds": cpu, "libvirtd_kib": rss,
            "pause_resume_timing": "until the libvirt lifecycle event (SUSPENDED / RESUMED) arrives",
            **extra}  # fmt: skip


def print_table(result: dict[str, Any]) -> None:
    s = result["summary"]
    lv, qv = result["libvirt_version"], result["qemu_version"]
    print(f"libvirt peer: libvirt {lv // 1000000}.{lv // 1000 % 1000}.{lv % 1000}, QEMU {qv // 1000000}.{qv // 1000 % 1000}"
          f".{qv % 1000}, {'KVM' if os.environ.get('VMCTL_ACCEL') == 'kvm' else 'TCG'}, q35, {result['memory_mib']} MiB, {result['rounds']} rounds, {result['host']}")  # fmt: skip
    ds = result["daemon_start"]
    print(f"daemon start: {ds['daemon_to_connection']:.3f}s to a connection + {ds['qemu_capabilities_probe']:.3f}s "
          f"QEMU capabilities probe (private, empty cache)")  # fmt: skip
    print(f"{'scenario (seconds)':36} {'p50':>8} {'p95':>8} {'min':>8} {'max':>8} {'n':>4}")
    labels = [("boot_ready", "boot to ready (define+start)"), ("stop_cleanup", "stop+cleanup (destroy+undefine)"),
              ("pause", "pause (until SUSPENDED event)"), ("resume", "resume (until RESUMED event)"),
              ("round_trip", "pause+resume round trip"), ("pause_call", "  suspend() call returned"),
              ("resume_call", "  resume() call returned"), ("hotplug_add", "disk add (until guest sees it)"),
              ("hotplug_remove", "disk remove (until DEVICE_REMOVED)"),
              ("hotplug_remove_call", "  detachDeviceFlags() returned")]  # fmt: skip
    for n in result["concurrency"]:
        labels += [(f"concurrent_{n}_all_ready", f"{n} at once: all ready"),
                   (f"concurrent_{n}_each_ready", f"{n} at once: each ready"),
                   (f"concurrent_{n}_all_stopped", f"{n} at once: all stopped")]  # fmt: skip
    for key, label in labels:
        if key in s and s[key]["n"]:
            t = s[key]
            print(f"{label:36} {t['p50']:8.3f} {t['p95']:8.3f} {t['min']:8.3f} {t['max']:8.3f} {t['n']:4d}")
    print(f"{'CPU seconds by scenario':36} {'libvirtd':>8} {'client':>8}   libvirtd RSS after (peak) MiB")
    for name, c in result["cpu_seconds"].items():
        r = result["libvirtd_kib"].get(name, {})
        print(
            f"{name:36} {c['libvirtd']:8.3f} {c['client']:8.3f}   {r.get('rss', 0) / 1024:.1f} ({r.get('peak', 0) / 1024:.1f})"
        )
    r = result["libvirtd_kib"]["after_start"]
    print(f"libvirtd RSS after start: {r['rss'] / 1024:.1f} MiB")
    la, lb = result["load_average_at_start"], result.get("load_average_at_end", ["?"])
    print(f"host load average (1 min) at start {la[0]:.2f}, at end {lb[0]:.2f}; "
          f"QEMU reaped by {'this process (subreaper)' if result['reap_qemu'] else 'PID 1'}")  # fmt: skip
    if result.get("cleanup_forced"):
        print("forced cleanup:", "; ".join(result["cleanup_forced"]))


async def _main(rounds: int, concurrency: list[int], memory: int, reap_qemu: bool) -> None:
    from accel import pin_accel  # (bench/ is run as scripts)

    await pin_accel()  # the domain type follows it
    from vmctl import guest  # only the standalone run needs vmctl: for the default guest

    assets = await guest.ensure_default_assets()
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)  # tear down on SIGTERM too, not just ^C
    result = await benchmark(assets.kernel, assets.initrd, rounds=rounds, concurrency=concurrency,
                             memory_mib=memory, reap_qemu=reap_qemu, progress=lambda s: print(s, flush=True))  # fmt: skip
    print_table(result)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"libvirt-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", default="1,4,8,16", help="comma-separated domain counts")
    parser.add_argument("--memory", type=int, default=256)
    parser.add_argument("--no-reap", action="store_true",
                        help="leave QEMU's zombies to PID 1 (see _Reaper: destroy() then waits for PID 1)")  # fmt: skip
    args = parser.parse_args()
    concurrency = [int(n) for n in args.concurrency.split(",") if n]
    asyncio.run(_main(args.rounds, concurrency, args.memory, not args.no_reap))
