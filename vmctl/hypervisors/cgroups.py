"""Per-sandbox cgroups: memory, CPU and pids limits, v1 or v2 behind one small interface.

A sandbox's cgroup is made below the controller's own (``<own>/vmctl/<name>``), so the limits
of whatever runs the controller still hold for its QEMU processes. It is created before QEMU
starts (the jail's last step joins it before ``exec``), and removed once QEMU is gone.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import anyio

from vmctl.core import reaper

ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "cpu", "pids")
V2_CONTROLLERS = ("memory", "cpu", "pids")
CPU_PERIOD_US = 100_000
STALE_AFTER_S = 120.0


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    cpus: float
    pids: int


def _own_paths() -> dict[str, str]:
    """This process's cgroup per v1 controller, and ``""`` for the v2 one."""
    out: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, names, path = line.split(":", 2)
        for name in names.split(",") if names else [""]:
            out[name] = path
    return out


@functools.cache
def detect() -> tuple[int | None, str]:
    """The cgroup version usable here (1 or 2, or None) and why: the host's mounts and this
    process's uid, asked once (every start asks, through the jail's plan and its host status)."""
    if os.geteuid() != 0:
        return None, "the controller is not root (cgroups need root or a delegated subtree)"
    controllers = ROOT / "cgroup.controllers"
    if controllers.is_file():
        have = set(controllers.read_text().split())
        missing = [c for c in V2_CONTROLLERS if c not in have]
        if missing:
            return None, f"cgroup v2 lacks the {', '.join(missing)} controller(s)"
        return 2, "cgroup v2"
    missing = [c for c in V1_CONTROLLERS if not (ROOT / c / "cgroup.procs").is_file()]
    if missing:
        return None, f"no writable cgroup v1 hierarchy for {', '.join(missing)}"
    return 1, "cgroup v1 (" + ", ".join(V1_CONTROLLERS) + ")"


class Cgroup:
    """One sandbox's cgroup (in each v1 hierarchy, or the one v2 directory)."""

    def __init__(self, name: str, version: int) -> None:
        self.name = name
        self.version = version
        own = _own_paths()
        if version == 2:
            self.dirs = {"": ROOT / own.get("", "/").lstrip("/") / "vmctl" / name}
        else:
            self.dirs = {c: ROOT / c / own.get(c, "/").lstrip("/") / "vmctl" / name for c in V1_CONTROLLERS}
        self.limits: Limits | None = None

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    @property
    def path(self) -> Path:
        return next(iter(self.dirs.values()))

    def create(self, limits: Limits) -> None:
        """Make the directories and write the limits; on any error nothing is left."""
        self.limits = limits
        try:
            for controller, d in self.dirs.items():
                _sweep(d.parent)
                if self.version == 2:
                    _enable_v2(d.parent)
                d.mkdir(mode=0o755, parents=True, exist_ok=True)
                reaper.add_cgroup(d)  # removed by the reaper should the controller die first
                self._write_limits(controller, d, limits)
        except BaseException:
            self.remove(wait=0)
            raise

    def _write_limits(self, controller: str, d: Path, limits: Limits) -> None:
        quota = max(1000, int(limits.cpus * CPU_PERIOD_US))
        if self.version == 2:
            (d / "memory.max").write_text(str(limits.memory_bytes))
            if (d / "memory.swap.max").exists():
                (d / "memory.swap.max").write_text("0")
            (d / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
            (d / "pids.max").write_text(str(limits.pids))
        elif controller == "memory":
            (d / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
        elif controller == "cpu":
            (d / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            (d / "cpu.cfs_quota_us").write_text(str(quota))
        elif controller == "pids":
            (d / "pids.max").write_text(str(limits.pids))

    def set_memory(self, limit_bytes: int) -> None:
        """A new memory limit (hot-added guest RAM raises it, removed RAM lowers it again)."""
        assert self.limits is not None
        self.limits = Limits(limit_bytes, self.limits.cpus, self.limits.pids)
        d = self.dirs.get("memory") or self.dirs[""]
        (d / ("memory.max" if self.version == 2 else "memory.limit_in_bytes")).write_text(str(limit_bytes))

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.dirs.values())

    def oom_killed(self) -> bool:
        """Whether the memory limit killed a process in this cgroup."""
        d = self.dirs.get("memory") or self.dirs.get("")
        if d is None:
            return False
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            fields = dict(line.split() for line in (d / name).read_text().splitlines() if line.strip())
        except (OSError, ValueError):
            return False
        if fields.get("oom_kill", "0") != "0":
            return True
        if self.version == 1:
            try:
                return (d / "memory.failcnt").read_text().strip() not in ("", "0") and fields.get("under_oom") == "1"
            except OSError:
                return False
        return False

    def kill(self) -> None:
        """SIGKILL every process still in the cgroup (whatever escaped the usual reaping)."""
        for d in self.dirs.values():
            try:
                pids = (d / "cgroup.procs").read_text().split()
            except OSError:
                continue
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass

    def remove(self, *, wait: float = 5.0) -> bool:
        """Kill what is left in the cgroup and remove its directories once those processes are
        gone (a killed QEMU takes a moment). Blocks while it waits: for callers outside an event
        loop (the CLI's ``rm``)."""
        deadline = time.monotonic() + wait
        while not self._try_remove() and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.exists()

    async def remove_async(self, *, wait: float = 5.0) -> bool:
        """:meth:`remove` that waits without blocking the event loop."""
        with anyio.move_on_after(wait):
            while not self._try_remove():  # noqa: ASYNC110 - an emptied cgroup sends no event
                await anyio.sleep(0.02)
        return not self.exists()

    def _try_remove(self) -> bool:
        self.kill()  # whatever joined since the last look (a jail helper that was still starting)
        for d in list(self.dirs.values()):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                continue
            reaper.forget(d)
        return not self.exists()


def _enable_v2(parent: Path) -> None:
    """Turn the controllers on down to ``parent`` (v2 hands them down one level at a time)."""
    chain = [parent, *parent.parents]
    chain = [p for p in chain if p == ROOT or ROOT in p.parents]
    for level in reversed(chain):
        level.mkdir(mode=0o755, exist_ok=True)
        control = level / "cgroup.subtree_control"
        have = set(control.read_text().split())
        for c in V2_CONTROLLERS:
            if c not in have:
                control.write_text(f"+{c}")


def _sweep(parent: Path) -> None:
    """Remove empty sandbox cgroups a crashed controller left (old enough not to be starting)."""
    try:
        children = list(parent.iterdir())
    except OSError:
        return
    for child in children:
        try:
            if child.is_dir() and time.time() - child.stat().st_mtime > STALE_AFTER_S:
                if not (child / "cgroup.procs").read_text().strip():
                    child.rmdir()
        except OSError:
            pass
