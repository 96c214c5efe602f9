"""Acquire latency: from asking for a sandbox until its first ``exec(["true"])`` answers.

Three ways, in one run, on one guest and config (256 MiB, 1 vCPU, TCG unless VMCTL_ACCEL says):

    warm    ``SandboxPool(config, size=K)``: ``async with pool.acquire() as sb: await sb.exec(["true"])``;
            before each acquisition the pool is let settle (K ready, nothing starting or stopping),
            so this is the latency a user sees from a full pool
    clone   a template clone started on demand: ``async with Sandbox(clone_config) as sb:`` + exec
            (one template built first, not timed)
    cold    a cold boot on demand: ``async with Sandbox(config) as sb:`` + exec

Only the acquisition is timed; teardown happens after the clock stops. Prints a table with p50,
p99 (with N < 100 samples p99 is the largest but one, by linear interpolation) and the load average
before and after, and writes JSON to bench/results/pool-<timestamp>.json. The goal: warm p50 at
most 20 ms under TCG.

    python bench/pool.py [--n 30] [--cold-n 5] [--size 2] [--modes warm,clone,cold] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio

from vmctl import Sandbox, SandboxConfig, SandboxPool, guest, host
from vmctl.fleets.template import boot_template

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
MODES = ("warm", "clone", "cold")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": percentile(values, 0.5), "p99": percentile(values, 0.99),
            "mean": statistics.fmean(values), "min": min(values), "max": max(values), "all": values}  # fmt: skip


async def settle(pool: SandboxPool) -> None:
    """Wait until the pool is full and quiet: K ready, nothing starting or being destroyed."""
    await pool.wait_ready(timeout=300)
    with anyio.fail_after(120):
        while (s := pool.stats()).starting or s.stopping or s.ready < pool.size:  # noqa: ASYNC110 - a bench polls
            await anyio.sleep(0.02)
    await anyio.sleep(0.2)  # let the guests' own start-up work die down


async def warm(config: SandboxConfig, n: int, size: int) -> list[float]:
    samples = []
    async with SandboxPool(config, size=size, max_concurrent_starts=min(size, 2), id_prefix="bench") as pool:
        for _ in range(n):
            await settle(pool)
            started = time.perf_counter()
            async with pool.acquire(timeout=60) as sb:
                await sb.exec(["true"], check=True)
                samples.append(time.perf_counter() - started)
    return samples


async def on_demand(config: SandboxConfig, n: int) -> list[float]:
    samples = []
    for i in range(n):
        started = time.perf_counter()
        async with Sandbox(config, id=f"bench-{i}") as sb:
            await sb.exec(["true"], check=True)
            samples.append(time.perf_counter() - started)
    return samples


async def clone(config: SandboxConfig, n: int) -> list[float]:
    async with AsyncExitStack() as stack:
        clone_config = await boot_template(config, stack, id="bench-template", backend=None, start_timeout=300)
        return await on_demand(clone_config, n)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=30, help="acquisitions for warm and clone")
    parser.add_argument("--cold-n", type=int, default=5, help="cold boots (about 6 s each under TCG)")
    parser.add_argument("--size", type=int, default=2, help="the warm pool's size")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    assets = await guest.ensure_default_assets()
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, vcpus=1, memory_mib=256)
    load_start = os.getloadavg()
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        load_before = os.getloadavg()
        if mode == "warm":
            values = await warm(config, args.n, args.size)
        elif mode == "clone":
            values = await clone(config, args.n)
        elif mode == "cold":
            values = await on_demand(config, args.cold_n)
        else:
            raise SystemExit(f"unknown mode {mode!r}; choose from {MODES}")
        results[mode] = {**summary(values), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
        print(f"{mode}: done", flush=True)
    report = {
        "bench": "pool",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"machine": platform.machine(), "cpus": host.cpu_count(), "qemu": await host.qemu_version(host.find_qemu()),
                 "accel": os.environ.get("VMCTL_ACCEL", config.accel)},
        "config": {"vcpus": 1, "memory_mib": 256, "pool_size": args.size},
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "results": results,
    }  # fmt: skip
    print()
    print(f"acquire until the first exec(['true']) answers (load average {load_start[0]:.2f} -> "
          f"{report['loadavg_end'][0]:.2f}, {report['host']['accel']})")  # fmt: skip
    print(f"{'mode':<8} {'n':>4} {'p50':>10} {'p99':>10} {'min':>10} {'max':>10}  load before/after")
    for mode, r in results.items():
        print(f"{mode:<8} {r['n']:>4} {r['p50'] * 1000:>8.1f}ms {r['p99'] * 1000:>8.1f}ms {r['min'] * 1000:>8.1f}ms "
              f"{r['max'] * 1000:>8.1f}ms  {r['loadavg_before'][0]:.2f}/{r['loadavg_after'][0]:.2f}")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"pool-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    os.environ.setdefault("VMCTL_ACCEL", "tcg")
    anyio.run(main)
