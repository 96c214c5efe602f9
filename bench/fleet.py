"""Fleet readiness: how long until N sandboxes have each answered a first exec of `true`.

Four ways, side by side, on one guest and one QEMU command line (256 MiB, 1 vCPU, TCG):

    plain-seq      raw qemu-system-x86_64 + plain qemu.qmp (bench/plain.py), one VM after
                   another; all are kept running until N are ready, then all are torn down
    plain-threads  the same script in a ThreadPoolExecutor, each thread with its own asyncio
                   loop, N at a time
    vmctl-cold     vmctl.Fleet(config, size=N, max_concurrent_starts=...)
    vmctl-clone    vmctl.Fleet(..., template=True): the template's build is reported apart;
                   "total" is from the first clone's start until every clone answered

Every mode boots with vmctl's kernel command line, which has ``no_timer_check``: without it, under
TCG on a loaded host the guest kernel's IO-APIC timer check can fail and panic the boot ("IO-APIC +
timer doesn't work", seen here with 16 boots at once). --kernel-params adds parameters.

Also measured when all N are ready: QEMU's PSS per sandbox (sum of smaps_rollup "Pss:" over
the QEMU processes / N) and the controller's RSS growth per sandbox (VmRSS now minus VmRSS
before the fleet, / N).

Every (mode, N) runs in a fresh worker process (this script with --worker), so the controller
RSS baseline is clean and one failure cannot spoil the rest. Each worker gets its own runtime
and temp directory; after it ends, any QEMU still running under them is killed and reported.
Prints a table and writes JSON to bench/results/fleet-<timestamp>.json.

    python bench/fleet.py [--sizes 1,4,8,16] [--modes plain-seq,...] [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
from accel import pin_accel, pinned
from plain import PlainVm, plain_vm  # noqa: E402  (bench/ is run as scripts)

from vmctl import Param, Sandbox, SandboxConfig, guest, host
from vmctl.agent import protocol as proto
from vmctl.fleets.fleet import Fleet, FleetEvent, FleetEventKind

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
MODES = ("plain-seq", "plain-threads", "vmctl-cold", "vmctl-clone")
EXEC_TIMEOUT = 120.0


# -- measurements ---------------------------------------------------------------------------------


def rss_kib() -> int:
    """This process's resident set (VmRSS), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def rollup(pid: int) -> dict[str, int]:
    """The Pss* lines of /proc/PID/smaps_rollup, KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key.startswith("Pss") or key == "Rss":
            out[key] = int(rest.split()[0])
    return out


def sample_memory(pids: list[int], rss_before: int, n: int) -> dict[str, Any]:
    """QEMU PSS and controller RSS growth, taken at the moment all N are ready."""
    rss_now = rss_kib()
    comms = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in pids}
    bad = {pid: comm for pid, comm in comms.items() if not comm.startswith("qemu-system")}
    if bad:
        raise RuntimeError(f"not QEMU processes: {bad}")
    rolls = [rollup(pid) for pid in pids]
    total = {key: sum(r.get(key, 0) for r in rolls) for key in ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Rss")}
    return {
        "pss": {"total_kib": total["Pss"], "anon_kib": total["Pss_Anon"], "file_kib": total["Pss_File"],
                "shmem_kib": total["Pss_Shmem"], "rss_kib": total["Rss"], "processes": len(pids),
                "per_sandbox_mib": total["Pss"] / n / 1024},
        "controller": {"rss_before_kib": rss_before, "rss_ready_kib": rss_now, "growth_kib": rss_now - rss_before,
                       "per_sandbox_kib": (rss_now - rss_before) / n},
    }  # fmt: skip


def latency_summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def qemu_pids_under(marker: str) -> list[int]:
    """Live QEMU processes whose command line mentions ``marker`` (a worker's private directory)."""
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


# -- the plain script -----------------------------------------------------------------------------


async def plain_first_exec(vm: PlainVm) -> None:
    """`true` through the agent protocol by hand (what vmctl's exec sends)."""
    spawn = proto.spawn_payload([b"true"], {}, b"", 0, 1 << 20)
    vm.agent_writer.write(proto.pack(proto.FrameType.SPAWN, 1, spawn) + proto.pack(proto.FrameType.EOF, 1))
    await vm.agent_writer.drain()
    while True:  # STARTED, EOF x2, then EXIT
        length, kind, _, _ = proto.unpack_header(await vm.agent_reader.readexactly(proto.HEADER_SIZE))
        payload = await vm.agent_reader.readexactly(length)
        if kind == proto.FrameType.EXIT:
            if proto.parse_exit(payload) != (0, False):
                raise RuntimeError(f"unexpected exit of exec true: {payload!r}")
            return
        if kind == proto.FrameType.ERROR:
            raise RuntimeError(f"the agent refused exec true: {payload!r}")


async def plain_sequential(config: SandboxConfig, n: int, boot_timeout: float) -> dict[str, Any]:
    latencies: list[float] = []
    pids: list[int] = []
    gc.collect()
    rss_before = rss_kib()
    async with AsyncExitStack() as stack:  # tears down every VM, in reverse order, on every path
        t0 = time.monotonic()
        for _ in range(n):
            started = time.monotonic()
            # the plain way: asyncio's own timeout
            async with asyncio.timeout(boot_timeout):
                vm = await stack.enter_async_context(plain_vm(config))
                await plain_first_exec(vm)
            latencies.append(time.monotonic() - started)
            pids.append(vm.process.pid)
        total = time.monotonic() - t0
        result = {"total_s": total, "latency_s": latency_summary(latencies), **sample_memory(pids, rss_before, n)}
        down = time.monotonic()
    result["teardown_s"] = time.monotonic() - down
    return result


def plain_threads(config: SandboxConfig, n: int, boot_timeout: float) -> dict[str, Any]:
    """N threads, each running its own asyncio loop with one plain VM; all hold until released."""
    release = threading.Event()
    # (index, ready at, latency, qemu pid, error)
    ready: queue.Queue[tuple[int, float, float, int, BaseException | None]] = queue.Queue()

    def one(index: int) -> None:
        reported = False

        async def body() -> None:
            nonlocal reported
            async with AsyncExitStack() as stack:
                started = time.monotonic()
                async with asyncio.timeout(boot_timeout):
                    vm = await stack.enter_async_context(plain_vm(config))
                    await plain_first_exec(vm)
                done = time.monotonic()
                ready.put((index, done, done - started, vm.process.pid, None))
                reported = True
                await asyncio.to_thread(release.wait)

        try:
            asyncio.run(body())
        except BaseException as exc:
            if not reported:
                ready.put((index, time.monotonic(), 0.0, 0, exc))
            raise

    gc.collect()
    rss_before = rss_kib()
    pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="plain-vm")
    t0 = time.monotonic()
    futures = [pool.submit(one, i) for i in range(n)]
    try:
        got = []
        for _ in range(n):
            got.append(ready.get(timeout=max(1.0, t0 + boot_timeout + 60 - time.monotonic())))
        errors = [g[4] for g in got if g[4] is not None]
        if errors:
            distinct = sorted({repr(e) for e in errors})
            raise RuntimeError(f"{len(errors)} of {n} plain VMs failed: {'; '.join(distinct[:3])}")
        total = max(g[1] for g in got) - t0
        result = {"total_s": total, "latency_s": latency_summary([g[2] for g in got]),
                  **sample_memory([g[3] for g in got], rss_before, n)}  # fmt: skip
    finally:
        release.set()
        down = time.monotonic()
        pool.shutdown(wait=True)
    result["teardown_s"] = time.monotonic() - down
    for future in futures:
        future.result()  # a teardown that failed is a failed run
    return result


# -- vmctl ----------------------------------------------------------------------------------------


async def vmctl_fleet(config: SandboxConfig, n: int, *, template: bool, max_starts: int,
                      start_timeout: float) -> dict[str, Any]:  # fmt: skip
    booting: dict[str, float] = {}
    exec_done: dict[str, float] = {}
    exec_rtt: dict[str, float] = {}

    def on_event(event: FleetEvent) -> None:
        if event.kind is FleetEventKind.BOOTING:
            booting.setdefault(event.sandbox_id, event.at)

    async def first_exec(sb: Sandbox) -> None:
        started = time.monotonic()
        await sb.exec(["true"], timeout=EXEC_TIMEOUT, check=True)
        exec_done[sb.id] = time.monotonic()
        exec_rtt[sb.id] = exec_done[sb.id] - started

    gc.collect()
    rss_before = rss_kib()
    t0 = time.monotonic()
    fleet = Fleet(config, size=n, max_concurrent_starts=max_starts, start_timeout=start_timeout, on_event=on_event,
                  template=template, id_prefix="bench")  # fmt: skip
    async with fleet:
        outcomes = await fleet.map(first_exec)
        failed = [(sb.id, repr(o.error)) for sb, o in outcomes if not o.ok]
        if failed:
            raise RuntimeError(f"{len(failed)} of {n} members failed; first: {failed[0]}")
        phase_start = min(booting.values()) if template else t0
        all_ready = max(exec_done.values())
        # Fleet runs work only once every member booted (map), so a member's own time to its first
        # answer is its boot (from BOOTING to ready) plus the exec's round trip
        latencies = [(m.boot_seconds or 0.0) + exec_rtt[m.sandbox.id] for m in fleet.members]
        pids = [sb.pid for sb in fleet.sandboxes if sb.pid is not None]
        result: dict[str, Any] = {
            "total_s": all_ready - phase_start,
            "wall_s": all_ready - t0,
            "template_s": fleet.template_seconds,
            "latency_s": latency_summary(latencies),
            "max_concurrent_starts": max_starts,
            **sample_memory(pids, rss_before, n),
        }
        down = time.monotonic()
    result["teardown_s"] = time.monotonic() - down
    return result


# -- one worker: one (mode, N) --------------------------------------------------------------------


def worker(mode: str, n: int, memory: int, max_starts: int, start_timeout: float,
           kernel_params: list[str]) -> dict[str, Any]:  # fmt: skip
    assets = anyio.run(guest.ensure_default_assets)
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, vcpus=1, memory_mib=memory, accel=pinned(),
                           kernel_params=tuple(Param(p) for p in kernel_params))  # fmt: skip
    if mode == "plain-seq":
        return anyio.run(plain_sequential, config, n, start_timeout)
    if mode == "plain-threads":
        return plain_threads(config, n, start_timeout)
    if mode in ("vmctl-cold", "vmctl-clone"):
        template = mode == "vmctl-clone"

        async def go() -> dict[str, Any]:
            return await vmctl_fleet(config, n, template=template, max_starts=max_starts, start_timeout=start_timeout)

        return anyio.run(go)
    raise SystemExit(f"unknown mode {mode!r}")


def run_worker(mode: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one (mode, N) in a fresh process with private dirs; kill whatever QEMU it left."""
    work = Path(tempfile.mkdtemp(prefix="bf-", dir="/tmp"))
    (work / "tmp").mkdir()
    env = dict(os.environ, VMCTL_RUNTIME_DIR=str(work / "rt"), TMPDIR=str(work / "tmp"))
    max_starts = args.max_concurrent_starts or n
    start_timeout = args.start_timeout or 120.0 + 40.0 * n
    limit = args.worker_timeout or 300.0 + 120.0 * n
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--size", str(n), "--memory",
           str(args.memory), "--max-concurrent-starts", str(max_starts), "--start-timeout", str(start_timeout),
           "--kernel-params", args.kernel_params]  # fmt: skip
    started = time.monotonic()
    result: dict[str, Any] = {"mode": mode, "n": n, "ok": False}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        try:
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # asyncio cancels the main task: every mode tears down
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            timed_out = f"worker timed out after {limit:.0f}s"
        else:
            timed_out = ""
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if lines:
            result.update(json.loads(lines[-1]))
        else:
            result["error"] = f"worker exited with {proc.returncode} and no result"
        if timed_out:
            result.update(ok=False, error=f"{timed_out} ({result.get('error')})")
        if not result.get("ok"):
            result["stderr_tail"] = err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = qemu_pids_under(str(work))
        for pid in left:
            os.kill(pid, signal.SIGKILL)  # started by our worker (its private dirs are in the argv)
        leftover_files = (
            sorted(str(p.relative_to(work)) for p in (work / "rt").glob("*")) if (work / "rt").exists() else []
        )
        shutil.rmtree(work, ignore_errors=True)
    result["worker_s"] = time.monotonic() - started
    result["leftover_qemu"] = left
    result["leftover_runtime_files"] = leftover_files
    if left or leftover_files:
        result["ok"] = False
        result["error"] = (result.get("error") or "") + f" left behind: qemu {left}, files {leftover_files}"
    return result


# -- the report -----------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    qemu = host.find_qemu()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "")  # fmt: skip
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=BENCH, timeout=10).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cores": host.cpu_count(),
        "cpu_model": model,
        "memory_mib": host.total_memory_mib(),
        "kernel": platform.release(),
        "running_in_vm": host.running_in_vm(),
        "qemu": str(qemu),
        "qemu_version": anyio.run(host.qemu_version, qemu),
        "accel": pinned(),
        "python": platform.python_version(),
        "git_commit": commit,
        "loadavg_start": os.getloadavg(),
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def clone_vs_cold(results: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    by = {(r["mode"], r["n"]): r for r in results if r.get("ok")}
    out = {}
    for n in sorted({r["n"] for r in results}):
        cold, clone = by.get(("vmctl-cold", n)), by.get(("vmctl-clone", n))
        if cold and clone:
            out[n] = {
                "cold_per_sandbox_s": cold["total_s"] / n,
                "clone_per_sandbox_s": clone["total_s"] / n,
                "ratio_per_sandbox": cold["total_s"] / clone["total_s"],
                "cold_latency_median_s": cold["latency_s"]["median"],
                "clone_latency_median_s": clone["latency_s"]["median"],
                "ratio_latency_median": cold["latency_s"]["median"] / clone["latency_s"]["median"],
                "template_s": clone["template_s"],
            }
    return out


def print_report(results: list[dict[str, Any]], info: dict[str, Any], memory: int,
                 kernel_params: str) -> dict[int, dict[str, float]]:  # fmt: skip
    from rich.console import Console
    from rich.table import Table

    plain_seq = {r["n"]: r["total_s"] for r in results if r["mode"] == "plain-seq" and r.get("ok")}
    table = Table(title=f"N sandboxes until each answered a first exec of `true` ({memory} MiB, 1 vCPU, {info['accel'].upper()}, "
                        f"{info['cores']} cores, QEMU {info['qemu_version']}, extra kernel params: {kernel_params or 'none'})")  # fmt: skip
    for name, justify in [("mode", "left"), ("N", "right"), ("total s", "right"), ("per-sandbox s", "right"),
                          ("median own s", "right"), ("÷ plain-seq", "right"), ("PSS MiB/sb", "right"),
                          ("ctl KiB/sb", "right"), ("notes", "left")]:  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in results:
        n = r["n"]
        if not r.get("ok"):
            table.add_row(r["mode"], str(n), "FAILED", "", "", "", "", "", str(r.get("error", ""))[:80])
            continue
        notes = [f"teardown {r['teardown_s']:.1f}s"]
        if r.get("template_s") is not None:
            notes.insert(0, f"template {r['template_s']:.1f}s")
        if r["mode"] == "vmctl-cold":
            notes.append(f"max_concurrent_starts={r['max_concurrent_starts']}")
        ratio = r["total_s"] / plain_seq[n] if n in plain_seq else None
        table.add_row(r["mode"], str(n), fmt(r["total_s"], ".2f"), fmt(r["total_s"] / n, ".2f"),
                      fmt(r["latency_s"]["median"], ".2f"), fmt(ratio, ".3f"),
                      fmt(r["pss"]["per_sandbox_mib"], ".1f"), fmt(r["controller"]["per_sandbox_kib"], ".0f"),
                      ", ".join(notes))  # fmt: skip
    console = Console(width=200)
    console.print(table)
    console.print("total: first start until the last of N answered (clones: from the first clone's start, "
                  "template build in notes); per-sandbox = total / N; median own = each sandbox's own start "
                  "to its first answer; ÷ plain-seq = total / plain-seq total at the same N")  # fmt: skip
    ratios = clone_vs_cold(results)
    for n, c in ratios.items():
        verdict = "met" if c["ratio_per_sandbox"] >= 8 and c["ratio_latency_median"] >= 8 else "NOT met"
        console.print(f"clone vs cold, N={n}: per-sandbox {c['cold_per_sandbox_s']:.2f}s vs "
                      f"{c['clone_per_sandbox_s']:.2f}s = {c['ratio_per_sandbox']:.1f}x sooner; own start to first "
                      f"answer (median) {c['cold_latency_median_s']:.2f}s vs {c['clone_latency_median_s']:.2f}s = "
                      f"{c['ratio_latency_median']:.1f}x; goal >= 8x: {verdict}")  # fmt: skip
    return ratios


def main(args: argparse.Namespace) -> int:
    anyio.run(pin_accel)  # every worker process inherits it
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    info = machine_info()
    results = []
    for n in sizes:
        for mode in modes:
            print(f"[{time.strftime('%H:%M:%S')}] {mode} N={n} ...", file=sys.stderr, flush=True)
            r = run_worker(mode, n, args)
            results.append(r)
            status = f"{r['total_s']:.2f}s" if r.get("ok") else f"FAILED: {r.get('error')}"
            print(f"[{time.strftime('%H:%M:%S')}]   {status} (worker {r['worker_s']:.1f}s)", file=sys.stderr,
                  flush=True)  # fmt: skip
    info["loadavg_end"] = os.getloadavg()
    ratios = print_report(results, info, args.memory, args.kernel_params)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"fleet-{time.strftime('%Y%m%d-%H%M%S')}.json"
    options = {"sizes": sizes, "modes": modes, "memory_mib": args.memory, "vcpus": 1,
               "max_concurrent_starts": args.max_concurrent_starts or "N",
               "start_timeout": args.start_timeout or "120 + 40*N", "kernel_params": args.kernel_params}  # fmt: skip
    out.write_text(json.dumps({"machine": info, "options": options, "results": results,
                               "clone_vs_cold": {str(n): c for n, c in ratios.items()}}, indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,8,16", help="comma-separated fleet sizes")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    parser.add_argument("--out", default=str(RESULTS), help="directory for the JSON result")
    parser.add_argument("--memory", type=int, default=256, help="guest MiB (all modes)")
    parser.add_argument("--max-concurrent-starts", type=int, default=0,
                        help="vmctl-cold/clone boot bound (default: N, like plain-threads)")  # fmt: skip
    parser.add_argument("--start-timeout", type=float, default=0, help="per-VM boot limit (default 120 + 40*N s)")
    parser.add_argument("--worker-timeout", type=float, default=0, help="per (mode, N) limit (default 300 + 120*N s)")
    parser.add_argument("--kernel-params", default="",
                        help="comma-separated extra kernel parameters for every mode ('' for none)")  # fmt: skip
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        try:
            params = [p for p in args.kernel_params.split(",") if p]
            res = worker(args.worker, args.size, args.memory, args.max_concurrent_starts, args.start_timeout, params)
            res.update(ok=True)
        except (Exception, KeyboardInterrupt) as exc:  # reported to the parent, which shows it
            import traceback

            traceback.print_exc()
            res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(json.dumps(res), flush=True)
        sys.exit(0 if res["ok"] else 1)
    sys.exit(main(args))
