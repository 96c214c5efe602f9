"""Soak: sandboxes doing random lifecycle and hotplug work for a while, then a leak check.

Each of ``size`` slots holds one sandbox and works on it in its own task, all slots at once:
execs (single, several at once, one killed by its timeout, with stdin), pause/resume (an exec
while paused must be refused), disk hotplug/unplug of small raw files (data written in the
guest must reach the file; QEMU must have closed the file after the unplug), a disk plugged
while execs run, and stop + restart of the slot's sandbox (a new ``Sandbox``: a stopped one
cannot start again). Every slot first does each operation once, in a seeded order, then picks
at random (seeded RNG, weights below). An operation that fails is recorded and the slot's
sandbox is restarted.

At the end, with every sandbox gone, it checks for leaks: the controller's open fds against
the count before, QEMU processes left (ours, by run directory, and every pid it started),
files left in the runtime dir (VMCTL_RUNTIME_DIR), asyncio tasks still running, and the
controller's RSS growth between a warmed-up sample and the last sample with all sandboxes
running. Prints a summary, writes JSON, exits 1 on a leak and 2 if operations failed.

    python bench/soak.py --minutes 30 [--size 4] [--seed 1] [--out bench/results]

``run_soak(minutes, size, seed)`` is the same run as a function (tests/test_soak.py uses it).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from accel import pin_accel  # (bench/ is run as scripts)

from vmctl import BlockDevice, IllegalTransition, Sandbox, SandboxConfig, SandboxState, guest
from vmctl.core.paths import runtime_dir

RESULTS = Path(__file__).resolve().parent / "results"
#: operation -> weight of the random picks after the first round
WEIGHTS = {
    "exec": 30,
    "exec_batch": 12,
    "exec_stdin": 8,
    "exec_timeout": 3,
    "pause_resume": 15,
    "disk": 18,
    "disk_during_exec": 8,
    "restart": 4,
}
OP_TIMEOUT = 240.0  # one operation, restarts included (TCG on a loaded 2-core host is slow)
START_TIMEOUT = 180.0
RSS_LEAK_MIB = 32.0  # RSS growth (warm -> last running sample) above this is reported as a leak
FD_TOLERANCE = 2
MAX_FAILED_STARTS = 5  # a slot whose sandbox fails to start this many times in a row stops


class CheckFailed(AssertionError):
    """The sandbox did something other than what the operation expected."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def fd_table() -> dict[int, str]:
    out = {}
    for fd in Path("/proc/self/fd").iterdir():
        try:
            out[int(fd.name)] = os.readlink(fd)
        except OSError:
            pass  # the directory's own fd, gone by now
    return out


def pid_alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return "State:\tZ" not in status and b"qemu-system" in cmdline


def qemu_pids_under(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and pid_alive(int(entry.name)):
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def qemu_holds(pid: int, path: Path) -> bool:
    """Whether QEMU process ``pid`` still has ``path`` open."""
    target = str(path)
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) == target:
                return True
        except OSError:
            pass
    return False


class Slot:
    """One sandbox at a time, worked on by one task.

    The sandbox's ``async with`` lives entirely in this slot's task (a Sandbox owns a task group,
    which anyio requires to be entered and left in one task, outside any scope opened after it):
    a restart or a failed operation leaves the block and opens a new sandbox.
    """

    def __init__(self, index: int, seed: int, base: SandboxConfig, disk_dir: Path, soak: Soak) -> None:
        self.index = index
        self.rng = random.Random(seed * 1000 + index)
        self.base = base
        self.disk_dir = disk_dir
        self.soak = soak
        self._disks = 0
        self.starts = 0

    # -- operations ---------------------------------------------------------------------------

    async def _one_exec(self, sb: Sandbox) -> None:
        kind = self.rng.randrange(4)
        if kind == 0:
            r = await sb.exec(["true"], timeout=60)
            expect(r.exit_code == 0, f"true exited {r.exit_code}")
        elif kind == 1:
            token = f"tok-{self.rng.getrandbits(64):x}"
            r = await sb.exec(["echo", token], timeout=60)
            expect(r.stdout == f"{token}\n".encode(), f"echo gave {r.stdout[:80]!r}")
        elif kind == 2:
            size = self.rng.randrange(1, 200_000)
            r = await sb.exec(["sh", "-c", f"head -c {size} /dev/urandom | wc -c"], timeout=60)
            expect(r.stdout.strip() == str(size).encode(), f"wc gave {r.stdout[:80]!r}, wanted {size}")
        else:
            code = self.rng.randrange(0, 256)
            r = await sb.exec(["sh", "-c", f"echo err >&2; exit {code}"], timeout=60)
            expect(r.exit_code == code and r.stderr == b"err\n", f"exit {r.exit_code} / {r.stderr!r}, wanted {code}")

    async def op_exec(self, sb: Sandbox) -> None:
        await self._one_exec(sb)

    async def op_exec_batch(self, sb: Sandbox) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(self.rng.randrange(2, 7)):
                tg.start_soon(self._one_exec, sb)

    async def op_exec_stdin(self, sb: Sandbox) -> None:
        data = self.rng.randbytes(self.rng.randrange(0, 100_000))
        r = await sb.exec(["cat"], stdin=data, timeout=60)
        expect(r.exit_code == 0 and r.stdout == data, f"cat returned {len(r.stdout)} of {len(data)} bytes")

    async def op_exec_timeout(self, sb: Sandbox) -> None:
        r = await sb.exec(["sleep", "30"], timeout=1)
        expect(r.timed_out, f"sleep 30 with timeout=1 was not killed: {r}")
        r = await sb.exec(["true"], timeout=60)
        expect(r.exit_code == 0, "the guest answers after a killed command")

    async def op_pause_resume(self, sb: Sandbox) -> None:
        await sb.pause()
        expect(sb.state is SandboxState.PAUSED, f"state {sb.state} after pause")
        try:
            await sb.exec(["true"])
        except IllegalTransition:
            pass
        else:
            raise CheckFailed("exec on a paused sandbox was not refused")
        expect(sb.state is SandboxState.PAUSED, f"state {sb.state} after a refused exec")
        await anyio.sleep(self.rng.uniform(0, 0.5))
        await sb.resume()
        expect(sb.state is SandboxState.RUNNING, f"state {sb.state} after resume")
        await self._one_exec(sb)

    def _new_disk(self) -> tuple[Path, int]:
        self._disks += 1
        path = self.disk_dir / f"s{self.index}-{self._disks}.img"
        mib = self.rng.randrange(1, 9)
        with path.open("wb") as f:
            f.truncate(mib << 20)
        return path, mib

    async def _disk_cycle(self, sb: Sandbox) -> None:
        """Plug 1-2 disks, check them in the guest (size; data for writable ones), unplug."""
        disks = [self._new_disk() for _ in range(self.rng.randrange(1, 3))]
        plugged = []
        tokens: dict[str, str] = {}
        try:
            for path, mib in disks:
                read_only = self.rng.random() < 0.3
                record = await sb.hotplug(BlockDevice(path=path, read_only=read_only))
                plugged.append((record, path, mib, read_only))
            for record, _path, mib, read_only in plugged:
                dev = record.guest_path
                expect(dev is not None and dev.startswith("/dev/"), f"{record.id} has guest path {dev!r}")
                assert dev is not None
                r = await sb.exec(["cat", f"/sys/block/{dev.removeprefix('/dev/')}/size"], timeout=60)
                expect(r.stdout.strip() == str(mib * 2048).encode(), f"{dev} size {r.stdout!r}, wanted {mib} MiB")
                if not read_only:
                    token = f"soak-{self.rng.getrandbits(48):x}"
                    r = await sb.exec(["sh", "-c", f"echo {token} | dd of={dev} conv=fsync 2>/dev/null"], timeout=60)
                    expect(r.exit_code == 0, f"writing {dev} failed: {r.stderr[-200:]!r}")
                    tokens[record.id] = token
            self.rng.shuffle(plugged)
            while plugged:
                record, path, _, read_only = plugged.pop()
                await sb.unplug(record)
                expect(record.id not in {d.id for d in sb.devices}, f"{record.id} still in the device table")
                expect(sb.pid is None or not qemu_holds(sb.pid, path), f"QEMU still holds {path.name} after unplug")
                if not read_only:
                    token = tokens[record.id]
                    head = path.read_bytes()[: len(token) + 1]
                    expect(head == f"{token}\n".encode(), f"{path.name} starts with {head!r}, wanted {token!r}")
        finally:
            for record, _, _, _ in plugged:  # an error above: do not leave them plugged
                with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                    try:
                        await sb.unplug(record)
                    except Exception:  # noqa: BLE001 - the error that brought us here is reported
                        pass
            for path, _ in disks:
                path.unlink(missing_ok=True)

    async def op_disk(self, sb: Sandbox) -> None:
        await self._disk_cycle(sb)

    async def op_disk_during_exec(self, sb: Sandbox) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._disk_cycle, sb)
            for _ in range(self.rng.randrange(1, 4)):
                tg.start_soon(self._one_exec, sb)

    async def op_restart(self, sb: Sandbox) -> bool:
        """Stop the sandbox; the slot's loop then starts a new one (and checks that it answers)."""
        await sb.stop()
        expect(sb.state is SandboxState.STOPPED, f"state {sb.state} after stop")
        expect(sb.pid is None or not pid_alive(sb.pid), "QEMU still runs after stop")
        await sb.stop()  # idempotent
        return True

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        soak = self.soak
        first_round = list(WEIGHTS)
        self.rng.shuffle(first_round)
        names, weights = list(WEIGHTS), list(WEIGHTS.values())
        booted = False
        failed_starts = 0
        while not booted or time.monotonic() < soak.deadline:
            driver = self.rng.choice(["virtio-scsi", "virtio-blk"])
            sandbox = Sandbox(self.base.replace(block_driver=driver), id=f"soak{self.index}-{self.starts}",
                              start_timeout=START_TIMEOUT)  # fmt: skip
            self.starts += 1
            opened = time.monotonic()
            try:
                async with sandbox as sb:
                    if sb.pid is not None:
                        soak.pids.add(sb.pid)
                    started = await soak.do(self, "start", self.check_started, sb, since=opened) is not False
                    if started and not booted:
                        booted = True
                        await soak.booted()
                    while started and time.monotonic() < soak.deadline:
                        op = first_round.pop() if first_round else self.rng.choices(names, weights)[0]
                        outcome = await soak.do(self, op, getattr(self, f"op_{op}"), sb)
                        if outcome is not None:  # failed (False) or restart (True): a new sandbox
                            break
            except Exception as exc:  # noqa: BLE001 - a start that failed: recorded, tried again
                soak.record_error(self, "start", exc, sandbox)
                started = False
            finally:
                soak.max_history = max(soak.max_history, len(sandbox.history))
            if not booted:
                booted = True
                await soak.booted()  # the others must not wait for this one
            failed_starts = 0 if started else failed_starts + 1
            if failed_starts >= MAX_FAILED_STARTS:
                soak.record_error(self, "start", RuntimeError(f"{failed_starts} starts failed in a row: slot gave up"),
                                  sandbox)  # fmt: skip
                return
            if not started:
                await anyio.sleep(2 * failed_starts)

    async def check_started(self, sb: Sandbox) -> None:
        expect(sb.state is SandboxState.RUNNING, f"state {sb.state} after start")
        r = await sb.exec(["true"], timeout=60)
        expect(r.exit_code == 0, "a new sandbox answers")


class Soak:
    def __init__(self, minutes: float, size: int, seed: int) -> None:
        self.minutes, self.size, self.seed = minutes, size, seed
        self.counts: Counter[str] = Counter()
        self.durations: dict[str, list[float]] = {}
        self.errors: list[dict[str, Any]] = []
        self.pids: set[int] = set()
        self.max_history = 0
        self.rss_samples: list[tuple[float, int]] = []
        self.started = time.monotonic()
        self.deadline = float("inf")  # set once every slot has booted (or failed to)
        self.work_started: float | None = None
        self._waiting_boots = size
        self._all_booted = anyio.Event()

    async def booted(self) -> None:
        """Called once per slot after its first start; the work's clock starts with the last."""
        self._waiting_boots -= 1
        if self._waiting_boots == 0:
            self.deadline = time.monotonic() + self.minutes * 60
            self.work_started = time.monotonic()
            self._all_booted.set()
        await self._all_booted.wait()

    def record_error(self, slot: Slot, op: str, exc: BaseException, sb: Sandbox) -> None:
        self.errors.append({"op": op, "slot": slot.index, "sandbox": sb.id, "state": str(sb.state),
                            "at_s": round(time.monotonic() - self.started, 1),
                            "error": f"{type(exc).__name__}: {exc}"[:1000]})  # fmt: skip

    async def do(self, slot: Slot, op: str, fn: Callable[[Sandbox], Awaitable[bool | None]], sb: Sandbox,
                 since: float | None = None) -> bool | None:  # fmt: skip
        """Run one operation; None to go on, True to restart the sandbox, False if it failed."""
        started = time.monotonic() if since is None else since
        try:
            with anyio.fail_after(OP_TIMEOUT):
                restart = await fn(sb)
                if sb.state is SandboxState.RUNNING:
                    pending = sb.hypervisor.agent.pending
                    expect(pending == 0, f"{pending} agent requests still waiting after {op}")
        except Exception as exc:  # noqa: BLE001 - recorded; the slot starts a new sandbox
            self.record_error(slot, op, exc, sb)
            return False
        self.counts[op] += 1
        self.durations.setdefault(op, []).append(time.monotonic() - started)
        return True if restart else None

    async def sample_rss(self, stop: anyio.Event) -> None:
        while not stop.is_set():
            self.rss_samples.append((round(time.monotonic() - self.started, 1), rss_kib()))
            with anyio.move_on_after(5):
                await stop.wait()


async def _soak(minutes: float, size: int, seed: int) -> dict[str, Any]:
    accel = await pin_accel()
    print(f"accelerator: {accel}, load average {os.getloadavg()[0]:.1f}")
    assets = await guest.ensure_default_assets()
    base = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, vcpus=1, memory_mib=256, pci_bridges=2)
    run_root = runtime_dir()
    soak = Soak(minutes, size, seed)
    for _ in range(5):
        await asyncio.sleep(0)
    gc.collect()
    fds_before = fd_table()
    rss_start = rss_kib()
    tasks_before = {t for t in asyncio.all_tasks() if not t.done()}
    disk_dir = Path(tempfile.mkdtemp(prefix="vmctl-soak-"))
    slots = [Slot(i, seed, base, disk_dir, soak) for i in range(size)]
    try:
        stop_sampling = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(soak.sample_rss, stop_sampling)
            async with anyio.create_task_group() as workers:  # each slot tears its sandbox down itself
                for slot in slots:
                    workers.start_soon(slot.run)
            work_ended = time.monotonic()
            stop_sampling.set()
    finally:
        shutil.rmtree(disk_dir, ignore_errors=True)
    work_started = soak.work_started or soak.started
    work_seconds = work_ended - work_started
    # RSS with the sandboxes running: the samples taken between the last first boot and the deadline
    window = (work_started - soak.started, soak.deadline - soak.started)
    rss_running = [s for s in soak.rss_samples if window[0] <= s[0] <= window[1]] or soak.rss_samples
    # -- leak checks, with every sandbox gone --------------------------------------------------
    for _ in range(5):
        await asyncio.sleep(0)
    await anyio.sleep(0.5)
    gc.collect()
    fds_after = fd_table()
    new_fds = {fd: target for fd, target in fds_after.items() if fds_before.get(fd) != target}
    current = asyncio.current_task()
    stray = [repr(t) for t in asyncio.all_tasks() if t is not current and not t.done() and t not in tasks_before]
    qemu_left = sorted(set(qemu_pids_under(f"{run_root}/")) | {p for p in soak.pids if pid_alive(p)})
    runtime_left = sorted(p.name for p in run_root.iterdir())
    # warm: the first sample at least a minute (or a fifth of the run) into the work
    warm_at = min(60.0, minutes * 60 / 5)
    samples = [s for s in rss_running if s[0] - rss_running[0][0] >= warm_at] or rss_running[-1:]
    rss_warm, rss_last = samples[0][1], rss_running[-1][1]
    leaks: dict[str, Any] = {
        "fds_before": len(fds_before),
        "fds_after": len(fds_after),
        "fd_growth": len(fds_after) - len(fds_before),
        "new_fds": {str(fd): target for fd, target in sorted(new_fds.items())},
        "qemu_left": qemu_left,
        "runtime_dir_left": runtime_left,
        "disk_dir_left": disk_dir.exists(),
        "stray_tasks": stray,
        "rss_start_kib": rss_start,
        "rss_warm_kib": rss_warm,
        "rss_last_running_kib": rss_last,
        "rss_end_kib": rss_kib(),
        "rss_growth_running_kib": rss_last - rss_warm,
    }
    problems = []
    if leaks["fd_growth"] > FD_TOLERANCE:
        problems.append(f"{leaks['fd_growth']} more open fds than before: {sorted(set(new_fds.values()))[:10]}")
    if qemu_left:
        problems.append(f"QEMU processes left: {qemu_left}")
    if runtime_left:
        problems.append(f"left in the runtime dir {run_root}: {runtime_left}")
    if leaks["disk_dir_left"]:
        problems.append(f"disk dir {disk_dir} left")
    if stray:
        problems.append(f"tasks still running: {stray[:5]}")
    if leaks["rss_growth_running_kib"] > RSS_LEAK_MIB * 1024:
        problems.append(f"controller RSS grew {leaks['rss_growth_running_kib'] / 1024:.1f} MiB while running")
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "minutes": minutes,
        "size": size,
        "seed": seed,
        "work_seconds": work_seconds,
        "counts": dict(soak.counts),
        "op_seconds": {
            op: {"n": len(v), "median": sorted(v)[len(v) // 2], "max": max(v)}
            for op, v in sorted(soak.durations.items())
        },  # fmt: skip
        "errors": soak.errors,
        "sandboxes_started": len(soak.pids),
        "max_history_len": soak.max_history,
        "rss_samples": soak.rss_samples,
        "leaks": leaks,
        "leak_problems": problems,
        "leak": bool(problems),
        "ok": not problems and not soak.errors,
    }


def run_soak(minutes: float, size: int, seed: int) -> dict[str, Any]:
    """Run the soak (in a fresh event loop) and return its result: counts, errors, leak checks."""
    result: dict[str, Any] = anyio.run(_soak, minutes, size, seed)
    return result


def print_summary(result: dict[str, Any]) -> None:
    print(f"soak: {result['size']} slots, {result['work_seconds']:.0f}s of work, seed {result['seed']}, "
          f"{result['sandboxes_started']} sandboxes started")  # fmt: skip
    print(f"{'operation':18} {'done':>6} {'median s':>9} {'max s':>8}")
    for op, stats in result["op_seconds"].items():
        print(f"{op:18} {stats['n']:6d} {stats['median']:9.3f} {stats['max']:8.3f}")
    print(f"errors: {len(result['errors'])}")
    for error in result["errors"][:20]:
        print(f"  slot {error['slot']} {error['op']} at {error['at_s']}s: {error['error'][:300]}")
    leaks = result["leaks"]
    print(f"fds {leaks['fds_before']} -> {leaks['fds_after']}; QEMU left {leaks['qemu_left']}; runtime dir left "
          f"{leaks['runtime_dir_left']}; RSS {leaks['rss_start_kib']} -> warm {leaks['rss_warm_kib']} -> last running "
          f"{leaks['rss_last_running_kib']} -> end {leaks['rss_end_kib']} KiB; longest history "
          f"{result['max_history_len']} transitions")  # fmt: skip
    print("leaks: " + ("; ".join(result["leak_problems"]) if result["leak"] else "none"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS), help="directory for the JSON result")
    args = parser.parse_args()
    outcome = run_soak(args.minutes, args.size, args.seed)
    print_summary(outcome)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(outcome, indent=2))
    print(f"wrote {out}")
    sys.exit(1 if outcome["leak"] else 2 if outcome["errors"] else 0)
