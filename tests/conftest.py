"""Shared fixtures: the default guest (built once per machine, cached), a private runtime dir per
test, and a leak check that fails any test leaving a QEMU process, socket, file or fd behind."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from vmctl import SandboxConfig, guest

os.environ.setdefault("VMCTL_ACCEL", "tcg")  # KVM hangs on these nested hosts (see DESIGN.md)


@pytest.fixture(scope="session")
def assets() -> guest.GuestAssets:
    return anyio.run(guest.ensure_default_assets)


@pytest.fixture
def make_config(assets: guest.GuestAssets) -> Callable[..., SandboxConfig]:
    def make(**overrides: object) -> SandboxConfig:
        values: dict[str, object] = {"kernel": assets.kernel, "initrd": assets.initrd, "memory_mib": 256}
        values.update(overrides)
        return SandboxConfig(**values)  # type: ignore[arg-type]

    return make


def qemu_processes(marker: str) -> list[int]:
    """Pids of live QEMU processes whose command line mentions ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            status = (entry / "status").read_text()
        except OSError:
            continue
        if b"qemu-system" in cmdline and marker.encode() in cmdline and "State:\tZ" not in status:
            pids.append(int(entry.name))
    return pids


def virtiofsd_processes() -> list[int]:
    """Pids of live virtiofsd processes (of any sandbox: tests run one at a time)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"virtiofsd" in (entry / "cmdline").read_bytes().split(b"\0")[0] \
                    and "State:\tZ" not in (entry / "status").read_text():  # fmt: skip
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def processes_left(pids: set[int]) -> list[str]:
    """Those of ``pids`` that still exist, zombies included (a zombie has no command line)."""
    out = []
    for pid in sorted(pids):
        try:
            state = next(li for li in Path(f"/proc/{pid}/status").read_text().splitlines() if li.startswith("State:"))
        except (OSError, StopIteration):
            continue
        out.append(f"{pid} {state}")
    return out


def cgroups_named(prefixes: list[str]) -> list[str]:
    """Sandbox cgroups (in every hierarchy: each v1 controller, and v2) made for the run
    directories named ``prefixes`` (a cgroup is named ``<run dir name>-<hash>``)."""
    found = []
    for top in Path("/sys/fs/cgroup").iterdir():
        for dirpath, dirnames, _ in os.walk(top):
            if Path(dirpath).name == "vmctl":
                found += [f"{dirpath}/{d}" for d in dirnames if any(d.startswith(p + "-") for p in prefixes)]
                dirnames.clear()
    return sorted(found)


def open_fds_under(path: str) -> list[str]:
    out = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if path in target:
            out.append(target)
    return out


def socket_fd_count() -> int:
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            pass
    return count


@pytest.fixture(autouse=True)
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short private runtime dir per test, checked for leaks afterwards."""
    path = Path(tempfile.mkdtemp(prefix="vt-", dir="/tmp"))
    monkeypatch.setenv("VMCTL_RUNTIME_DIR", str(path))
    sockets_before = socket_fd_count()
    yield path
    try:
        assert qemu_processes(str(path)) == [], "a QEMU process outlived the test"
        assert virtiofsd_processes() == [], "a virtiofsd outlived the test"
        assert list(path.iterdir()) == [], f"left behind in the runtime dir: {list(path.iterdir())}"
        assert open_fds_under(str(path)) == [], "file descriptors left open under the runtime dir"
        assert socket_fd_count() <= sockets_before + 2, "socket file descriptors leaked"
    finally:
        for pid in qemu_processes(str(path)):
            os.kill(pid, 9)
        shutil.rmtree(path, ignore_errors=True)


async def assert_no_stray_tasks() -> None:
    """Every task vmctl started has ended (call at the end of an async test)."""
    for _ in range(5):
        await asyncio.sleep(0)
    current = asyncio.current_task()
    stray = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    assert stray == [], f"tasks still running: {stray}"


@contextmanager
def short_dir() -> Iterator[Path]:
    """A short directory for unix sockets (108-byte path limit), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="vs-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
