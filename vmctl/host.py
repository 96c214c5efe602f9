"""Facts about the host: memory, CPUs, nesting, QEMU, and whether KVM really boots a guest.

``/dev/kvm`` answering ioctls is not enough: on nested hosts a guest under KVM can hang right
after the kernel is loaded. So the ``auto`` accelerator asks :func:`kvm_boots_guests`, which boots
a real kernel under KVM once with a short timeout and caches the verdict per host.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio

from vmctl.core.log import get_logger
from vmctl.core.paths import cache_dir
from vmctl.errors import HostError

log = get_logger("vmctl.host")

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_PROBE_TIMEOUT = 15.0


def total_memory_mib(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemTotal in MiB, from /proc/meminfo."""
    return _meminfo_kib(meminfo).get("MemTotal", 0) // 1024


def hugepages_total(meminfo: Path = Path("/proc/meminfo")) -> int:
    return _meminfo_kib(meminfo).get("HugePages_Total", 0)


def _meminfo_kib(meminfo: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in meminfo.read_text().splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[key.strip()] = int(fields[0])
    return out


def running_in_vm(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU flags carry ``hypervisor``: this host is itself a guest (nesting)."""
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return "hypervisor" in line.split(":", 1)[1].split()
    return False


def cpu_count() -> int:
    """CPUs this process may run on (honours affinity and cgroup cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The TSC frequency: the kernel's own figure where it exports one, else "cpu MHz"."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    except (OSError, ValueError):
        pass
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":", 1)[1]) * 1000)
    return None


def find_qemu(binary: str | os.PathLike[str] | None = None) -> Path:
    """The QEMU binary to use: the one given, or ``qemu-system-x86_64`` on PATH."""
    if binary is not None:
        path = Path(binary)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise HostError(f"QEMU binary {path} is not an executable file")
        return path
    found = shutil.which("qemu-system-x86_64")
    if found is None:
        raise HostError(
            "qemu-system-x86_64 not found on PATH: install it with 'apt-get install qemu-system-x86' or set qemu_binary"
        )
    return Path(found)


@functools.cache
def _qemu_version_cached(binary: str, mtime: float) -> str:
    out = subprocess.run([binary, "-version"], capture_output=True, text=True, timeout=30, check=False)
    match = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out.stdout)
    if match is None:
        raise HostError(f"cannot read the version of {binary}: {out.stdout or out.stderr!r}")
    return match.group(1)


@functools.cache
def _machines_cached(binary: str, mtime: float) -> frozenset[str]:
    out = subprocess.run([binary, "-machine", "help"], capture_output=True, text=True, timeout=30, check=False)
    names = set()
    for line in out.stdout.splitlines()[1:]:
        if line.strip():
            names.add(line.split()[0])
    return frozenset(names)


async def qemu_machines(binary: Path) -> frozenset[str]:
    """Machine types this QEMU offers (``-machine help``), cached per binary."""
    return await anyio.to_thread.run_sync(_machines_cached, str(binary), binary.stat().st_mtime)


async def qemu_version(binary: Path) -> str:
    """QEMU's version string (``7.2.22``), cached per binary and modification time."""
    return await anyio.to_thread.run_sync(_qemu_version_cached, str(binary), binary.stat().st_mtime)


def kvm_device_usable(device: Path = Path("/dev/kvm")) -> bool:
    """``/dev/kvm`` opens and creates a VM. Necessary, not sufficient (see :func:`kvm_boots_guests`)."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if fcntl.ioctl(fd, KVM_GET_API_VERSION) != 12:
            return False
        vm_fd = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        os.close(vm_fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@dataclass(frozen=True)
class KvmVerdict:
    usable: bool
    reason: str
    checked_at: float
    host_key: str


def _host_key(qemu: Path, version: str, kernel: Path) -> str:
    """What the verdict depends on: host kernel, boot, QEMU build and the probing guest kernel."""
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    parts = [platform.release(), boot_id, str(qemu), version, str(kernel), str(kernel.stat().st_size)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _verdict_dir() -> Path:
    return cache_dir() / "kvm-verdicts"


async def kvm_boots_guests(qemu: Path, kernel: Path, *, timeout: float = KVM_PROBE_TIMEOUT) -> KvmVerdict:
    """Whether a guest kernel really boots under KVM here; probed once, then cached per host.

    The probe boots ``kernel`` without a root filesystem under ``accel=kvm``: a working KVM gets to
    the kernel's "no root" panic in well under a second; a broken nested setup hangs, and the
    probe gives up after ``timeout`` seconds.
    """
    version = await qemu_version(qemu)
    key = _host_key(qemu, version, kernel)
    async with _probe_lock():  # many sandboxes starting at once share one probe
        cached = _read_verdict(key)
        if cached is not None:
            return cached
        if not kvm_device_usable():
            verdict = KvmVerdict(False, "/dev/kvm missing or not usable", time.time(), key)
        else:
            verdict = await _boot_probe(qemu, kernel, timeout, key)
        _write_verdict(verdict)
        return verdict


_PROBE_LOCKS: dict[int, anyio.Lock] = {}


def _probe_lock() -> anyio.Lock:
    """One lock per event loop (anyio locks belong to the loop that made them)."""
    import asyncio

    loop_id = id(asyncio.get_running_loop())
    lock = _PROBE_LOCKS.get(loop_id)
    if lock is None:
        _PROBE_LOCKS.clear()
        lock = _PROBE_LOCKS[loop_id] = anyio.Lock()
    return lock


#: verdicts kept: one file per probing kernel (and QEMU and host boot), so hosts (and benchmarks)
#: that start guests with several kernels do not re-probe, 15 s each, every time the kernel changes
VERDICTS_KEPT = 16


def _read_verdict(key: str) -> KvmVerdict | None:
    try:
        verdict = KvmVerdict(**json.loads((_verdict_dir() / f"{key}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return verdict if verdict.host_key == key else None


def _write_verdict(verdict: KvmVerdict) -> None:
    """Write ``verdict`` to its own file (atomically); keep the newest ``VERDICTS_KEPT``."""
    directory = _verdict_dir()
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / f"{verdict.host_key}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(verdict)))
    tmp.replace(path)
    for stale in sorted(directory.glob("*.json"), key=_mtime)[:-VERDICTS_KEPT]:
        stale.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # another process pruned it meanwhile
        return 0.0


async def _boot_probe(qemu: Path, kernel: Path, timeout: float, key: str) -> KvmVerdict:
    setpriv = shutil.which("setpriv")
    argv = [
        *([setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []),
        str(qemu), "-machine", "q35,accel=kvm", "-cpu", "host", "-m", "128", "-smp", "1",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 root=/dev/vmctl-no-root",
    ]  # fmt: skip
    started = time.monotonic()
    seen = b""
    async with await anyio.open_process(
        argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        with anyio.move_on_after(timeout):
            async for chunk in proc.stdout:
                seen = (seen + chunk)[-4096:]
                if b"Kernel panic" in seen or b"VFS:" in seen:
                    break
        if proc.returncode is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
        with anyio.CancelScope(shield=True):
            rc = await proc.wait()
            stderr = ""
            if rc != -9:
                try:
                    stderr = (await proc.stderr.receive(65536)).decode(errors="replace")
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass
    elapsed = time.monotonic() - started
    if b"Kernel panic" in seen or b"VFS:" in seen:
        log.info("kvm probe", usable=True, seconds=round(elapsed, 2))
        return KvmVerdict(True, f"a guest kernel booted under KVM in {elapsed:.1f}s", time.time(), key)
    if rc != -9:
        last = stderr.strip().splitlines()[-1:] or [""]
        reason = f"QEMU under KVM exited with code {rc} before the guest kernel ran: {last[0]}"
    else:
        reason = f"a guest kernel did not boot under KVM within {timeout:.0f}s (nested virtualisation?)"
    log.warning("kvm probe", usable=False, reason=reason)
    return KvmVerdict(False, reason, time.time(), key)


@dataclass(frozen=True)
class HostReport:
    total_memory_mib: int
    cpu_count: int
    running_in_vm: bool
    qemu_binary: str | None
    qemu_version: str | None
    kvm_device_usable: bool
    kvm_boots_guests: bool | None
    kvm_reason: str
    vhost_vsock: bool
    hugepages_total: int


async def report(kernel: Path | None = None) -> HostReport:
    """Everything ``vmctl doctor`` shows."""
    try:
        qemu: Path | None = find_qemu()
    except HostError:
        qemu = None
    version = await qemu_version(qemu) if qemu else None
    boots: bool | None = None
    reason = "no guest kernel to probe with (run 'vmctl guest build')"
    if qemu is not None and kernel is not None:
        verdict = await kvm_boots_guests(qemu, kernel)
        boots, reason = verdict.usable, verdict.reason
    return HostReport(
        total_memory_mib=total_memory_mib(),
        cpu_count=cpu_count(),
        running_in_vm=running_in_vm(),
        qemu_binary=str(qemu) if qemu else None,
        qemu_version=version,
        kvm_device_usable=kvm_device_usable(),
        kvm_boots_guests=boots,
        kvm_reason=reason,
        vhost_vsock=Path("/dev/vhost-vsock").exists(),
        hugepages_total=hugepages_total(),
    )
