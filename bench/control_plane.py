"""Control-plane scale without guests: 1000 QMP sessions in one controller process.

Fake QMP peers (a lean asyncio server speaking the QMP wire protocol, in separate processes so
the controller measures only itself) answer like QEMU: ``STOP`` / ``RESUME`` before the reply to
``stop`` / ``cont``, ``DEVICE_DELETED`` shortly after ``device_del``, ``SHUTDOWN`` on ``quit``,
and ``RTC_CHANGE`` noise on every connection. Each event carries the peer's CLOCK_MONOTONIC
timestamp, so the controller measures event-to-waiter latency on receipt.

Two controllers drive the same load, each in a fresh process:

* vmctl: one process, one event loop, one :class:`vmctl.core.qmp.QmpSession` per VM with an event
  pump feeding a :class:`vmctl.core.state.StateMachine`, exactly how ``Sandbox.pause()`` works
  (check the table, send ``stop``, wait for the state QEMU's ``STOP`` event produces);
* baseline: ``qemu.qmp.legacy.QEMUMonitorProtocol``, one blocking connection and one thread per
  VM (how QEMU's own ``QEMUMachine`` drives a VM): ``cmd("stop")``, then ``get_events`` until
  ``STOP`` is among them (batch reads: ``pull_event`` one event at a time, as
  ``QEMUMachine.event_wait`` does, collapses under the noise an idle connection piles up).

Two phases: *flat out* (every session does ``--rounds`` round trips back to back; vmctl's
sessions begin at random moments within the phase's first ``--flat-spread`` seconds, 50 ms by
default, or all in one pass of the loop with ``+burst``: throughput, and latency under
saturation) and *paced* (``--paced-rate`` transitions/s offered by all sessions together for
``--paced-seconds``: latency and CPU at a load both can carry).

Metrics: transitions per second (a pause or a resume confirmed by its event), event-to-waiter
latency p50/p99, memory per session (RSS delta / N, thread stacks included as touched), CPU per
transition, and the longest stall of the controller (a ticker sleeping 1 ms: a task in vmctl's
loop, a thread in the baseline). Prints a table with ratios, writes JSON to
bench/results/control-plane-<time>.json.

    python bench/control_plane.py [--sandboxes 1000] [--rounds 20] [--peers 2] [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from boot import old_tree  # bench scripts run with bench/ on sys.path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "control-plane-peer"},
                    "capabilities": ["oob"]}}  # fmt: skip


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # one clock for every process on the host


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def vm_size_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1])
    return 0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def socket_path(directory: Path, index: int) -> Path:
    return directory / f"vm{index}.sock"


# -- the fake QMP peer ---------------------------------------------------------------------------


class PeerConnection(asyncio.Protocol):
    """One QEMU's QMP monitor: greeting, negotiation, commands with ids, events."""

    decoder = json.JSONDecoder()

    def __init__(self, connections: set[PeerConnection]) -> None:
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.buffer = ""
        self.running = True
        self.negotiated = False  # QEMU sends no event before qmp_capabilities is answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.connections.add(self)
        self.write(GREETING)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.transport = None

    def write(self, message: dict[str, Any]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(json.dumps(message).encode() + b"\n")

    def event(self, name: str, data: dict[str, Any] | None = None) -> None:
        wall = time.time()
        self.write({"event": name, "data": {**(data or {}), "peer_emit_ns": now_ns()},
                    "timestamp": {"seconds": int(wall), "microseconds": int(wall % 1 * 1e6)}})  # fmt: skip

    def data_received(self, data: bytes) -> None:
        self.buffer += data.decode()
        while True:  # QMP is a JSON stream: commands need no newline between them
            text = self.buffer.lstrip()
            if not text:
                self.buffer = ""
                return
            try:
                command, end = self.decoder.raw_decode(text)
            except ValueError:
                self.buffer = text
                return
            self.buffer = text[end:]
            self.command(command)

    def command(self, command: dict[str, Any]) -> None:
        name, args = command.get("execute"), command.get("arguments") or {}
        result: Any = {}
        after = None
        if name == "stop":  # QEMU emits the event before it answers
            self.running = False
            self.event("STOP")
        elif name == "cont":
            self.running = True
            self.event("RESUME")
        elif name == "query-status":
            result = {"status": "running" if self.running else "paused", "running": self.running}
        elif name == "device_del":
            dev_id = str(args.get("id"))
            loop = asyncio.get_running_loop()
            loop.call_later(0.002, self.event, "DEVICE_DELETED",
                            {"device": dev_id, "path": f"/machine/peripheral/{dev_id}"})  # fmt: skip
        elif name == "quit":
            self.event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
            after = self.transport.close if self.transport else None
        elif name == "qmp_capabilities":
            self.negotiated = True
        else:
            reply_error = {"class": "CommandNotFound", "desc": f"The command {name} has not been found"}
            self.write({"error": reply_error, **({"id": command["id"]} if "id" in command else {})})
            return
        self.write({"return": result, **({"id": command["id"]} if "id" in command else {})})
        if after is not None:
            after()


async def run_peer(directory: Path, first: int, count: int, noise_interval: float) -> None:
    connections: set[PeerConnection] = set()
    loop = asyncio.get_running_loop()
    servers = [await loop.create_unix_server(lambda: PeerConnection(connections), str(socket_path(directory, i)),
                                             backlog=64) for i in range(first, first + count)]  # fmt: skip
    print("ready", flush=True)

    async def noise() -> None:  # RTC_CHANGE on every connection about once per noise_interval
        tick, turn = 0.01, 0
        while True:
            await asyncio.sleep(tick)
            live = [conn for conn in connections if conn.negotiated]
            if not live:
                continue
            share = max(1, round(len(live) * tick / noise_interval))
            for k in range(share):
                live[(turn + k) % len(live)].event("RTC_CHANGE", {"offset": 0})
            turn += share

    noise_task = asyncio.create_task(noise())
    stop = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), stop.set)  # the parent closes our stdin to end us
    await stop.wait()
    noise_task.cancel()
    for server in servers:
        server.close()


# -- controller A: vmctl -------------------------------------------------------------------------


class Phases:
    """Latencies and the longest stall per phase (flat-out, paced), CPU and time per phase."""

    def __init__(self) -> None:
        self.current = "setup"
        self.latencies: dict[str, list[float]] = {"flat-out": [], "paced": []}
        self.stall: dict[str, float] = {"setup": 0.0, "flat-out": 0.0, "paced": 0.0}
        self.elapsed: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.transitions: dict[str, int] = {}
        self.failures: dict[str, list[str]] = {"flat-out": [], "paced": []}  # round trips that timed out
        self.gc_pause: dict[str, float] = {"setup": 0.0, "flat-out": 0.0, "paced": 0.0}
        self.gc_total: dict[str, float] = {"setup": 0.0, "flat-out": 0.0, "paced": 0.0}
        #: phase -> generation -> [collections, longest (s)]
        self.gc_generations: dict[str, dict[int, list[float]]] = {p: {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
                                                                  for p in ("setup", "flat-out", "paced")}  # fmt: skip
        self.stall_at: dict[str, float] = {"setup": 0.0, "flat-out": 0.0, "paced": 0.0}
        #: the longest stall counting only the controller's own CPU time in it (not time the OS gave
        #: other processes: on a shared machine a wall-clock stall may be a preemption)
        self.busy_stall: dict[str, float] = {"setup": 0.0, "flat-out": 0.0, "paced": 0.0}
        self.one_loop = True  # the baseline's ticker is a thread of its own: its CPU time says nothing
        self._started = (0.0, 0.0)
        self._gc_start = 0.0
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        """The longest garbage collection per phase (a cause of loop stalls worth telling apart)."""
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            pause = time.perf_counter() - self._gc_start
            self.gc_pause[self.current] = max(self.gc_pause[self.current], pause)
            self.gc_total[self.current] += pause
            generation = self.gc_generations[self.current][info["generation"]]
            generation[0] += 1
            generation[1] = max(generation[1], pause)

    def begin(self, name: str) -> None:
        self.current = name
        self._started = (time.perf_counter(), cpu_seconds())

    def end(self) -> None:
        wall, cpu = self._started
        self.elapsed[self.current] = time.perf_counter() - wall
        self.cpu[self.current] = cpu_seconds() - cpu
        self.transitions[self.current] = len(self.latencies[self.current])
        self.current = "setup"

    def tick(self, lateness: float, busy: float = 0.0) -> None:
        self.busy_stall[self.current] = max(self.busy_stall[self.current], busy)
        if lateness > self.stall[self.current]:
            self.stall[self.current] = lateness
            self.stall_at[self.current] = time.perf_counter() - self._started[0]


#: drivers begin this long after their phase does: uvloop rounds timers to the millisecond, so a
#: driver due at the phase's start could otherwise finish a round trip before the phase began
TIMER_MARGIN = 0.002


def paced_period(n: int, rate: float) -> float:
    """Seconds between one session's round trips so that n sessions offer ``rate`` transitions/s."""
    return 2 * n / rate


async def vmctl_controller(directory: Path, n: int, rounds: int, rate: float, seconds: float,
                           gc_mode: str = "plain", inflight: int = 0, bound: str = "default",
                           flat_spread: float = 0.05) -> dict[str, Any]:  # fmt: skip
    import random

    import anyio

    if bound != "default":  # vmctl's own bound on commands in flight (the default applies otherwise)
        from vmctl import limit_commands_in_flight

        limit_commands_in_flight(None if bound == "none" else int(bound))

    from vmctl.core.qmp import QmpSession
    from vmctl.core.state import SandboxState, StateMachine, Trigger
    from vmctl.core.watcher import StateWatcher

    rss_start, vsz_start = rss_kib(), vm_size_kib()
    sessions = [QmpSession(f"cp{i}") for i in range(n)]
    machines = [StateMachine() for _ in range(n)]
    watchers = [StateWatcher(m) for m in machines]
    emitted = [0] * n
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i, session in enumerate(sessions):
            tg.start_soon(session.connect, socket_path(directory, i))
    connect_s = time.perf_counter() - started
    triggers = {"STOP": Trigger.QMP_STOP, "RESUME": Trigger.QMP_RESUME}
    phases = Phases()

    async def pump(i: int) -> None:  # what the hypervisor's event pump does for a Sandbox
        async for event in sessions[i].events():
            trigger = triggers.get(event.name)
            if trigger is not None:
                emitted[i] = int(event.data.get("peer_emit_ns", 0))
                machines[i].fire_if_allowed(trigger, event.name.lower())

    # what an application can do to keep its loop responsive: bound the operations in flight
    limiter = anyio.CapacityLimiter(inflight) if inflight else None

    async def round_trip(i: int) -> None:  # what Sandbox.pause() then Sandbox.resume() do
        session, machine, watcher = sessions[i], machines[i], watchers[i]
        for trigger, command, target in ((Trigger.PAUSE, "stop", SandboxState.PAUSED),
                                         (Trigger.RESUME, "cont", SandboxState.RUNNING)):  # fmt: skip
            machine.check(trigger)
            with anyio.fail_after(60):
                if limiter is None:
                    await session.execute(command)
                else:
                    async with limiter:
                        await session.execute(command)
                await watcher.wait_for(target)
            phases.latencies[phases.current].append((now_ns() - emitted[i]) / 1e6)

    async def flat_out(i: int, start: float) -> None:
        await anyio.sleep(max(0.0, start - time.perf_counter()))
        try:
            for _ in range(rounds):
                await round_trip(i)
        except TimeoutError as exc:  # counted, and this session sits the phase out
            phases.failures["flat-out"].append(repr(exc))

    async def paced(i: int, start: float, until: float) -> None:
        period = paced_period(n, rate)
        due = start + TIMER_MARGIN + random.uniform(0, period)
        while due < until:  # (a session due after the deadline ends now: the phase ends when it says)
            await anyio.sleep(max(0.0, due - time.perf_counter()))
            try:
                await round_trip(i)
            except TimeoutError as exc:
                phases.failures["paced"].append(repr(exc))
                return
            due += period

    async def ticker() -> None:
        while True:
            before, cpu_before = time.perf_counter(), time.thread_time()
            await anyio.sleep(0.001)
            phases.tick(time.perf_counter() - before - 0.001, time.thread_time() - cpu_before - 0.001)

    for machine in machines:
        machine.fire(Trigger.START)
        machine.fire(Trigger.GUEST_READY)
    if gc_mode == "freeze":  # what an application can do once its long-lived objects exist (see the README)
        gc.collect()
        gc.freeze()
    elif gc_mode == "settle":  # the same, as vmctl offers it
        from vmctl import settle_gc

        settle_gc()
    rss_connected = rss_kib()
    async with anyio.create_task_group() as background:
        for i in range(n):
            background.start_soon(pump, i)
        background.start_soon(ticker)
        await anyio.sleep(0.2)  # let the pumps start
        # the drivers exist before the phase (starting a thousand tasks is not part of it) and begin
        # at random moments within its first `flat_spread` seconds (0: all in one pass of the loop)
        start = time.perf_counter() + 0.5
        async with anyio.create_task_group() as drivers:
            for i in range(n):
                drivers.start_soon(flat_out, i, start + TIMER_MARGIN + random.uniform(0, flat_spread))
            await anyio.sleep(max(0.0, start - time.perf_counter()))
            phases.begin("flat-out")
        phases.end()
        rss_after = rss_kib()
        start = time.perf_counter() + 0.5  # starting a thousand tasks is not part of the phase
        until = start + seconds
        async with anyio.create_task_group() as drivers:
            for i in range(n):
                drivers.start_soon(paced, i, start, until)
            await anyio.sleep(max(0.0, start - time.perf_counter()))
            phases.begin("paced")
        phases.end()
        background.cancel_scope.cancel()
    threads = threading.active_count()
    for session in sessions:
        await session.close()
    return result_record("vmctl", n, connect_s, phases, rss_start, rss_connected, rss_after,
                         vsz_start, vm_size_kib(), threads)  # fmt: skip


# -- controller B: qemu.qmp.legacy, a thread per VM ----------------------------------------------


def legacy_controller(directory: Path, n: int, rounds: int, rate: float, seconds: float) -> dict[str, Any]:
    import random

    from qemu.qmp.legacy import QEMUMonitorProtocol

    rss_start, vsz_start = rss_kib(), vm_size_kib()
    gate = threading.Barrier(n + 1)  # all connected / flat-out done / paced done
    phases = Phases()
    phases.one_loop = False
    paced_until = [0.0]
    errors: list[BaseException] = []

    def round_trip(monitor: QEMUMonitorProtocol, out: list[float]) -> None:
        for command, wanted in (("stop", "STOP"), ("cont", "RESUME")):
            monitor.cmd(command)
            found = None
            while found is None:  # take every queued event at once (pull_event, one _sync per event, as
                # QEMUMachine.event_wait does, drowns in the noise an idle connection piles up)
                found = next((e for e in monitor.get_events(wait=60.0) if e["event"] == wanted), None)
            out.append((now_ns() - int(found["data"]["peer_emit_ns"])) / 1e6)

    def worker(i: int) -> None:
        monitor = None
        try:
            monitor = QEMUMonitorProtocol(str(socket_path(directory, i)), nickname=f"legacy{i}")
            monitor.connect()
            monitor.settimeout(60)
        except Exception as exc:
            errors.append(exc)
            gate.abort()
            return
        try:
            gate.wait()
            flat: list[float] = []
            try:
                for _ in range(rounds):
                    round_trip(monitor, flat)
            except TimeoutError as exc:  # counted; this session sits the phase out
                phases.failures["flat-out"].append(repr(exc))
            phases.latencies["flat-out"].extend(flat)  # list.extend is atomic under the GIL
            gate.wait()
            gate.wait()  # the paced phase's deadline is set
            paced: list[float] = []
            period = paced_period(n, rate)
            due = time.perf_counter() + random.uniform(0, period)
            try:
                while True:
                    time.sleep(max(0.0, due - time.perf_counter()))
                    if time.perf_counter() >= paced_until[0]:
                        break
                    round_trip(monitor, paced)
                    due += period
            except TimeoutError as exc:
                phases.failures["paced"].append(repr(exc))
            phases.latencies["paced"].extend(paced)
            gate.wait()
        except Exception as exc:
            errors.append(exc)
            gate.abort()
        finally:
            monitor.close()

    stop_ticker = threading.Event()

    def ticker() -> None:
        while not stop_ticker.is_set():
            before = time.perf_counter()
            time.sleep(0.001)
            phases.tick(time.perf_counter() - before - 0.001)

    def wait_gate() -> None:
        try:
            gate.wait()
        except threading.BrokenBarrierError:
            raise RuntimeError(f"{len(errors)} baseline sessions failed, first: {errors[0]!r}") from None

    started = time.perf_counter()
    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for thread in workers:
        thread.start()
    wait_gate()  # all connected
    connect_s = time.perf_counter() - started
    rss_connected = rss_kib()
    ticking = threading.Thread(target=ticker, daemon=True)
    ticking.start()
    phases.begin("flat-out")
    wait_gate()  # flat-out done: the workers start it as soon as they pass the first gate
    phases.end()
    rss_after, vsz_after = rss_kib(), vm_size_kib()
    threads = threading.active_count()
    phases.begin("paced")
    paced_until[0] = time.perf_counter() + seconds
    wait_gate()
    wait_gate()
    phases.end()
    stop_ticker.set()
    for thread in workers:
        thread.join(30)
    ticking.join()
    return result_record("qemu.qmp.legacy (thread per VM)", n, connect_s, phases, rss_start, rss_connected,
                         rss_after, vsz_start, vsz_after, threads)  # fmt: skip


def result_record(name: str, n: int, connect_s: float, phases: Phases, rss_start: int, rss_connected: int,
                  rss_after: int, vsz_start: int, vsz_after: int, threads: int) -> dict[str, Any]:  # fmt: skip
    def latency(values: list[float]) -> dict[str, float]:
        return {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99), "max": max(values, default=0.0),
                "n": len(values)}  # fmt: skip

    flat, paced = phases.latencies["flat-out"], phases.latencies["paced"]
    return {
        "controller": name,
        "sessions": n,
        "connect_all_s": connect_s,
        "flat_out": {
            "transitions": len(flat),
            "elapsed_s": phases.elapsed["flat-out"],
            "transitions_per_s": len(flat) / phases.elapsed["flat-out"],
            "cpu_us_per_transition": phases.cpu["flat-out"] / max(1, len(flat)) * 1e6,
            "latency_ms": latency(flat),
            "max_stall_ms": phases.stall["flat-out"] * 1e3,
            "max_stall_at_s": phases.stall_at["flat-out"],
            "max_busy_stall_ms": phases.busy_stall["flat-out"] * 1e3 if phases.one_loop else float("nan"),
            "max_gc_ms": phases.gc_pause["flat-out"] * 1e3,
            "gc_total_ms": phases.gc_total["flat-out"] * 1e3,
            "gc_by_generation": {
                g: {"collections": c, "longest_ms": m * 1e3} for g, (c, m) in phases.gc_generations["flat-out"].items()
            },  # fmt: skip
            "timed_out": len(phases.failures["flat-out"]),
        },
        "paced": {
            "transitions": len(paced),
            "elapsed_s": phases.elapsed["paced"],
            "transitions_per_s": len(paced) / phases.elapsed["paced"],
            "cpu_us_per_transition": phases.cpu["paced"] / max(1, len(paced)) * 1e6,
            "cpu_share": phases.cpu["paced"] / phases.elapsed["paced"],
            "latency_ms": latency(paced),
            "max_stall_ms": phases.stall["paced"] * 1e3,
            "max_stall_at_s": phases.stall_at["paced"],
            "max_busy_stall_ms": phases.busy_stall["paced"] * 1e3 if phases.one_loop else float("nan"),
            "max_gc_ms": phases.gc_pause["paced"] * 1e3,
            "gc_total_ms": phases.gc_total["paced"] * 1e3,
            "gc_by_generation": {
                g: {"collections": c, "longest_ms": m * 1e3} for g, (c, m) in phases.gc_generations["paced"].items()
            },  # fmt: skip
            "timed_out": len(phases.failures["paced"]),
        },
        "rss_kib": {"start": rss_start, "connected": rss_connected, "after_flat_out": rss_after},
        "rss_per_session_kib": (rss_connected - rss_start) / n,
        "rss_per_session_after_load_kib": (rss_after - rss_start) / n,
        "virtual_per_session_kib": (vsz_after - vsz_start) / n,
        "threads": threads,
        "loadavg": os.getloadavg(),
    }


# -- orchestration -------------------------------------------------------------------------------


def controller_main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.CRITICAL)
    options = (args.dir, args.sandboxes, args.rounds, args.paced_rate, args.paced_seconds)
    if args.role == "vmctl":
        import anyio

        backend_options = {"use_uvloop": True} if args.loop == "uvloop" else {}
        record = anyio.run(vmctl_controller, *options, args.gc, args.inflight, args.bound, args.flat_spread,
                           backend_options=backend_options)  # fmt: skip
    else:
        record = legacy_controller(*options)
    record["loadavg_start"] = args.loadavg_start
    print(json.dumps(record), flush=True)


def start_peers(directory: Path, n: int, processes: int, noise_interval: float) -> list[subprocess.Popen[str]]:
    peers = []
    per = -(-n // processes)
    for first in range(0, n, per):
        peers.append(subprocess.Popen(
            [sys.executable, __file__, "--role", "peer", "--dir", str(directory), "--first", str(first),
             "--count", str(min(per, n - first)), "--noise-interval", str(noise_interval)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))  # fmt: skip
    for peer in peers:
        assert peer.stdout is not None
        if peer.stdout.readline().strip() != "ready":
            raise RuntimeError("a peer process did not start")
    return peers


#: a variant: the tree ("new" is this one, "old" the --old ref) and modifiers: "+uvloop" runs the
#: controller on uvloop, "+freeze" calls gc.freeze() after start-up, "+settle" vmctl.settle_gc(),
#: "+limitN" lets at most N commands be in flight at once (an anyio.CapacityLimiter in the bench's
#: round trip, as an application would bound its own calls), "+boundN" sets vmctl's own bound
#: (``vmctl.limit_commands_in_flight(N)``; "new" without it runs vmctl's default) and "+unbounded"
#: removes it; "+burst" starts the flat-out phase's 1000 sessions in one pass of the loop instead
#: of spread over its first 50 ms. "legacy" is the thread-per-VM baseline.
MODIFIERS = ("uvloop", "freeze", "settle", "unbounded", "burst")


def inflight_limit(mods: list[str], prefix: str = "limit") -> int:
    limits = [int(m.removeprefix(prefix)) for m in mods if m.startswith(prefix) and m[len(prefix):].isdigit()]
    return limits[-1] if limits else 0


def vmctl_bound(mods: list[str]) -> str:
    """The --bound a variant's controller passes to vmctl: default, none, or a number."""
    return "none" if "unbounded" in mods else str(inflight_limit(mods, "bound") or "default")


def variant_command(variant: str, args: argparse.Namespace, directory: Path) -> tuple[list[str], dict[str, str]]:
    common = ["--dir", str(directory), "--sandboxes", str(args.sandboxes), "--rounds", str(args.rounds),
              "--paced-rate", str(args.paced_rate), "--paced-seconds", str(args.paced_seconds),
              "--loadavg-start", str(os.getloadavg()[0])]  # fmt: skip
    if variant == "legacy":
        return [sys.executable, __file__, "--role", "legacy", *common], dict(os.environ)
    tree, *mods = variant.split("+")
    if tree not in ("new", "old") or any(m not in MODIFIERS and not inflight_limit([m])
                                         and not inflight_limit([m], "bound") for m in mods):  # fmt: skip
        raise SystemExit(f"unknown variant {variant!r}: new or old, then +uvloop, +freeze, +settle, +limitN, "
                         "+boundN, +unbounded or +burst; or legacy")  # fmt: skip
    if tree == "old" and vmctl_bound(mods) != "default":
        raise SystemExit(f"{variant}: the old tree has no bound of its own (use +limitN)")
    root = old_tree(args.old) if tree == "old" else REPO
    gc_mode = "freeze" if "freeze" in mods else "settle" if "settle" in mods else "plain"
    command = [sys.executable, __file__, "--role", "vmctl", "--loop", "uvloop" if "uvloop" in mods else "asyncio",
               "--gc", gc_mode, "--inflight", str(inflight_limit(mods)), "--bound", vmctl_bound(mods),
               "--flat-spread", "0" if "burst" in mods else str(args.flat_spread), *common]  # fmt: skip
    return command, dict(os.environ, PYTHONPATH=str(root))  # that tree's vmctl


def run_controller(variant: str, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    command, env = variant_command(variant, args, directory)
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"the {variant} controller failed:\n{out.stderr[-3000:]}")
    record: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    record["variant"] = variant
    return record


def table(records: list[dict[str, Any]]) -> str:
    rows = [
        ("flat out: transitions/s", lambda r: r["flat_out"]["transitions_per_s"], "{:,.0f}", "higher"),
        ("flat out: CPU per transition (us)", lambda r: r["flat_out"]["cpu_us_per_transition"], "{:.0f}", "lower"),
        ("flat out: event-to-waiter p50 (ms)", lambda r: r["flat_out"]["latency_ms"]["p50"], "{:.1f}", "lower"),
        ("flat out: event-to-waiter p99 (ms)", lambda r: r["flat_out"]["latency_ms"]["p99"], "{:.1f}", "lower"),
        ("flat out: longest stall (ms)", lambda r: r["flat_out"]["max_stall_ms"], "{:.1f}", "lower"),
        ("flat out: longest stall, controller CPU only (ms)", lambda r: r["flat_out"].get("max_busy_stall_ms", 0.0),
         "{:.1f}", "lower"),
        ("flat out: longest garbage collection (ms)", lambda r: r["flat_out"]["max_gc_ms"], "{:.1f}", "lower"),
        ("flat out: all garbage collections (ms)", lambda r: r["flat_out"].get("gc_total_ms", 0.0), "{:.0f}",
         "lower"),
        ("flat out: sessions timed out (60 s)", lambda r: r["flat_out"]["timed_out"], "{:.0f}", "lower"),
        ("paced: transitions/s achieved", lambda r: r["paced"]["transitions_per_s"], "{:,.0f}", "higher"),
        ("paced: event-to-waiter p50 (ms)", lambda r: r["paced"]["latency_ms"]["p50"], "{:.2f}", "lower"),
        ("paced: event-to-waiter p99 (ms)", lambda r: r["paced"]["latency_ms"]["p99"], "{:.2f}", "lower"),
        ("paced: longest stall (ms)", lambda r: r["paced"]["max_stall_ms"], "{:.1f}", "lower"),
        ("paced: longest stall, controller CPU only (ms)", lambda r: r["paced"].get("max_busy_stall_ms", 0.0),
         "{:.1f}", "lower"),
        ("paced: longest garbage collection (ms)", lambda r: r["paced"]["max_gc_ms"], "{:.1f}", "lower"),
        ("paced: sessions timed out (60 s)", lambda r: r["paced"]["timed_out"], "{:.0f}", "lower"),
        ("paced: controller CPU (cores)", lambda r: r["paced"]["cpu_share"], "{:.2f}", "lower"),
        ("memory per session, RSS connected (KiB)", lambda r: r["rss_per_session_kib"], "{:.1f}", "lower"),
        ("memory per session, RSS after flat out (KiB)", lambda r: r["rss_per_session_after_load_kib"], "{:.1f}",
         "lower"),
        ("virtual memory per session (KiB)", lambda r: r["virtual_per_session_kib"], "{:,.0f}", "lower"),
        ("connect all sessions (s)", lambda r: r["connect_all_s"], "{:.2f}", "lower"),
        ("threads in the controller", lambda r: r["threads"], "{:.0f}", "lower"),
        ("load average (1 min) at start / end", None, "", ""),
    ]  # fmt: skip
    names = [r["variant"] for r in records]
    ratio = len(records) == 2
    out = [f"| metric | {' | '.join(names)} |" + (f" {names[1]} / {names[0]} |" if ratio else ""),
           "| --- |" + " --- |" * (len(records) + ratio)]  # fmt: skip
    for label, get, fmt, better in rows:
        if get is None:
            cells = [f"{r.get('loadavg_start', float('nan')):.2f} / {r['loadavg'][0]:.2f}" for r in records]
            out.append(f"| {label} | {' | '.join(cells)} |" + (" |" if ratio else ""))
            continue
        values = [get(r) for r in records]
        line = f"| {label} ({better} is better) | {' | '.join(fmt.format(v) for v in values)} |"
        if ratio:
            line += f" {values[1] / values[0]:.2f} |" if values[0] else " - |"
        out.append(line)
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sandboxes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20, help="flat out: pause+resume round trips per session")
    parser.add_argument("--paced-rate", type=float, default=200.0, help="paced: transitions/s offered by all sessions")
    parser.add_argument("--paced-seconds", type=float, default=15.0, help="paced: how long")
    parser.add_argument("--peers", type=int, default=2, help="peer processes hosting the fake QMP servers")
    parser.add_argument("--noise-interval", type=float, default=1.0, help="seconds between RTC_CHANGE per VM")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--variants", default="new,legacy",
                        help="controllers to run, in this order: new or old (the --old ref's vmctl), each with "
                             "+uvloop, +freeze (gc.freeze() after start-up), +settle (vmctl.settle_gc()) or "
                             "+limitN (at most N commands in flight, bounded by the bench), +boundN (vmctl's "
                             "own bound set to N) or +unbounded (vmctl's bound removed); "
                             "legacy (qemu.qmp.legacy, a thread per VM)")  # fmt: skip
    parser.add_argument("--old", default="159661b", help="git ref of the vmctl the 'old' variants run")
    parser.add_argument("--gc-freeze", action="store_true", help="add the variant new+freeze")
    parser.add_argument("--uvloop", action="store_true", help="add the variant new+uvloop (pip install 'vmctl[fast]')")
    parser.add_argument("--role", choices=["main", "peer", "vmctl", "legacy"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio", help=argparse.SUPPRESS)
    parser.add_argument("--gc", choices=["plain", "freeze", "settle"], default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--inflight", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--bound", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--flat-spread", type=float, default=0.05,
                        help="flat out: sessions begin at random moments within this many seconds (+burst: 0)")  # fmt: skip
    parser.add_argument("--loadavg-start", type=float, default=float("nan"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    limit = raise_fd_limit()
    if args.role == "peer":
        asyncio.run(run_peer(args.dir, args.first, args.count, args.noise_interval))
        return
    if args.role in ("vmctl", "legacy"):
        controller_main(args)
        return
    variants = [v for v in args.variants.split(",") if v]
    extra = [v for v, on in (("new+freeze", args.gc_freeze), ("new+uvloop", args.uvloop)) if on]
    variants += [v for v in extra if v not in variants]
    for variant in variants:
        variant_command(variant, args, Path("/"))  # refuse an unknown variant before starting anything
    needed = args.sandboxes * (5 if "legacy" in variants else 1) + 100  # the baseline's threads each hold an
    if limit < needed:  # event loop (epoll + self-pipe)
        sys.exit(f"the open-file limit is {limit}; {needed} are needed (raise the hard limit: ulimit -Hn)")
    directory = Path(tempfile.mkdtemp(prefix="vmctl-cp-", dir="/tmp"))
    peers = start_peers(directory, args.sandboxes, args.peers, args.noise_interval)
    records = []
    try:
        print(f"{args.sandboxes} fake QMP peers in {len(peers)} processes, RTC_CHANGE every {args.noise_interval}s "
              f"per VM. Flat out: {args.rounds} pause/resume round trips per session, all at once. Paced: "
              f"{args.paced_rate:g} transitions/s offered for {args.paced_seconds:g}s.", flush=True)  # fmt: skip
        for variant in variants:
            records.append(run_controller(variant, args, directory))
            print(f"{variant} done (load average {records[-1]['loadavg_start']:.2f} at start, "
                  f"{records[-1]['loadavg'][0]:.2f} at end)", flush=True)  # fmt: skip
    finally:
        for peer in peers:
            assert peer.stdin is not None
            peer.stdin.close()
        for peer in peers:
            try:
                peer.wait(10)
            except subprocess.TimeoutExpired:
                peer.kill()
                peer.wait()
        shutil.rmtree(directory, ignore_errors=True)
    print()
    print(table(records))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"control-plane-{stamp}.json"
    record = {
        "benchmark": "control-plane",
        "date": stamp,
        "host": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
        },
        "args": {
            "sandboxes": args.sandboxes,
            "rounds": args.rounds,
            "peer_processes": len(peers),
            "noise_interval_s": args.noise_interval,
            "paced_rate": args.paced_rate,
            "paced_seconds": args.paced_seconds,
            "old": args.old,
        },
        "variants": records,
    }
    path.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
