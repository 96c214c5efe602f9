"""vmctl side by side with its peers, in one run, on the same guest and QEMU command line.

Peers: vmctl; a plain script of qemu-system + qemu.qmp (bench/plain.py); libvirt (its own
private libvirtd, bench/libvirt_peer.py; needs scripts/bench-setup, skipped with a note if the
binding is missing). Scenarios: boot to ready, pause/resume round trip (until QEMU's / libvirt's
event), disk hotplug add (until the guest sees it) and remove (until the removal event), N
sandboxes started at once (N = 1, 4, 8, 16), stop and cleanup. For each peer also the controller
CPU seconds (this process, plus libvirtd for libvirt) and memory. Prints one table with ratios
against vmctl and writes JSON to bench/results/peers-<time>.json.

    python bench/peers.py [--rounds 5] [--sizes 1,4,8,16] [--skip-libvirt]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
from accel import pin_accel, pinned  # noqa: E402  (bench/ is run as scripts)
from plain import plain_disk_add, plain_disk_remove, plain_vm  # noqa: E402  (bench/ is run as scripts)
from qemu.qmp import EventListener

from vmctl import BlockDevice, Sandbox, SandboxConfig, guest, host

RESULTS = Path(__file__).parent / "results"
Samples = dict[str, list[float]]


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
            "n": len(ordered)}  # fmt: skip


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """CPU seconds this process spent per scenario."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        before = own_cpu()
        yield
        self.cpu[name] = self.cpu.get(name, 0.0) + own_cpu() - before

    async def run(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        with self.measure(name):
            await work()


# -- vmctl ---------------------------------------------------------------------------------------


async def vmctl_peer(config: SandboxConfig, disk: Path, rounds: int, sizes: list[int]) -> dict[str, Any]:
    s: Samples = {}
    meter = Meter()

    def add(key: str, value: float) -> None:
        s.setdefault(key, []).append(value)

    async def boots() -> None:
        for _ in range(rounds):
            started = time.perf_counter()
            async with Sandbox(config):
                add("boot_ready", time.perf_counter() - started)
                stop_started = time.perf_counter()
            add("stop_cleanup", time.perf_counter() - stop_started)

    async def pause_and_plug() -> None:
        async with Sandbox(config) as sb:
            with meter.measure("pause/resume"):
                for _ in range(rounds):
                    started = time.perf_counter()
                    await sb.pause()
                    await sb.resume()
                    add("round_trip", time.perf_counter() - started)
            with meter.measure("hotplug"):
                await plug_rounds(sb)

    async def plug_rounds(sb: Sandbox) -> None:
        for _ in range(rounds):
            started = time.perf_counter()
            plugged = await sb.hotplug(BlockDevice(path=disk))
            add("hotplug_add", time.perf_counter() - started)
            started = time.perf_counter()
            await sb.unplug(plugged)
            add("hotplug_remove", time.perf_counter() - started)

    await meter.run("boot+stop", boots)
    await pause_and_plug()
    for n in sizes:
        await meter.run(f"concurrent {n}", lambda n=n: start_at_once(n, lambda: vmctl_ready(config), add))  # type: ignore[misc]
    return {"samples": s, "cpu_seconds": meter.cpu}


@asynccontextmanager
async def vmctl_ready(config: SandboxConfig) -> AsyncIterator[float]:
    started = time.perf_counter()
    async with Sandbox(config):
        yield time.perf_counter() - started


# -- plain qemu.qmp ------------------------------------------------------------------------------


async def plain_peer(config: SandboxConfig, disk: Path, rounds: int, sizes: list[int]) -> dict[str, Any]:
    s: Samples = {}
    meter = Meter()

    def add(key: str, value: float) -> None:
        s.setdefault(key, []).append(value)

    async def boots() -> None:
        for _ in range(rounds):
            async with plain_vm(config) as vm:
                add("boot_ready", vm.ready_seconds)
                stop_started = time.perf_counter()
            add("stop_cleanup", time.perf_counter() - stop_started)

    async def pause_and_plug() -> None:
        async with plain_vm(config) as vm:
            events = EventListener(("STOP", "RESUME", "DEVICE_DELETED"))
            vm.qmp.register_listener(events)
            with meter.measure("pause/resume"):
                for _ in range(rounds):
                    started = time.perf_counter()
                    await vm.qmp.execute("stop")
                    while (await events.get())["event"] != "STOP":
                        pass
                    await vm.qmp.execute("cont")
                    while (await events.get())["event"] != "RESUME":
                        pass
                    add("round_trip", time.perf_counter() - started)
            with meter.measure("hotplug"):
                await plug_rounds(vm, events)

    async def plug_rounds(vm: Any, events: EventListener) -> None:
        for i in range(rounds):
            dev = f"p{i}"
            started = time.perf_counter()
            await plain_disk_add(vm, disk, dev, f"w{i}")
            add("hotplug_add", time.perf_counter() - started)
            started = time.perf_counter()
            await plain_disk_remove(vm, dev, events)
            add("hotplug_remove", time.perf_counter() - started)

    await meter.run("boot+stop", boots)
    await pause_and_plug()
    for n in sizes:
        await meter.run(f"concurrent {n}", lambda n=n: start_at_once(n, lambda: plain_ready(config), add))  # type: ignore[misc]
    return {"samples": s, "cpu_seconds": meter.cpu}


@asynccontextmanager
async def plain_ready(config: SandboxConfig) -> AsyncIterator[float]:
    async with plain_vm(config) as vm:
        yield vm.ready_seconds


async def start_at_once(n: int, open_ready: Callable[[], AbstractAsyncContextManager[float]],
                        add: Callable[[str, float], None]) -> None:  # fmt: skip
    """N started together and kept until all are ready, then torn down together (any peer)."""
    started = time.perf_counter()
    all_up = anyio.Event()
    count = 0
    stopped_at: list[float] = []

    async def one() -> None:
        nonlocal count
        async with open_ready() as ready_seconds:
            add(f"concurrent_{n}_each_ready", ready_seconds)
            count += 1
            if count == n:
                add(f"concurrent_{n}_all_ready", time.perf_counter() - started)
                stopped_at.append(time.perf_counter())
                all_up.set()
            await all_up.wait()

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    add(f"concurrent_{n}_all_stopped", time.perf_counter() - stopped_at[0])


# -- libvirt -------------------------------------------------------------------------------------


async def libvirt_peer(assets: guest.GuestAssets, rounds: int, sizes: list[int]) -> dict[str, Any] | str:
    try:
        import libvirt_peer as lv  # noqa: PLC0415 - optional: needs scripts/bench-setup
    except ImportError as exc:
        return f"skipped: {exc} (run scripts/bench-setup)"
    result = await lv.benchmark(assets.kernel, assets.initrd, rounds=rounds, concurrency=sizes)
    cpu = {k: v.get("libvirtd", 0.0) + v.get("client", 0.0) for k, v in result["cpu_seconds"].items()}
    rss = result["libvirtd_kib"]
    peak = max((v.get("peak", v.get("rss", 0)) for v in rss.values() if isinstance(v, dict)), default=0)
    result["cpu_total"] = cpu
    result["controller_rss_kib"] = peak
    return result


# -- the table -----------------------------------------------------------------------------------

ROWS = [("boot to ready", "boot_ready"), ("pause+resume round trip", "round_trip"),
        ("disk add (guest sees it)", "hotplug_add"), ("disk remove (event)", "hotplug_remove"),
        ("stop + cleanup", "stop_cleanup")]  # fmt: skip


def print_table(peers: dict[str, dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    rows = list(ROWS)
    for n in sizes:
        rows.append((f"{n} at once: all ready", f"concurrent_{n}_all_ready"))
        rows.append((f"{n} at once: all stopped", f"concurrent_{n}_all_stopped"))
    names = list(peers)
    print(f"{'scenario (seconds)':28}" + "".join(f"{n + ' p50':>16}{'p95':>8}" for n in names)
          + "".join(f"{n + '/vmctl':>16}" for n in names[1:]))  # fmt: skip
    ratios: dict[str, dict[str, float]] = {}
    for label, key in rows:
        cells = ""
        for name in names:
            values = peers[name]["samples"].get(key)
            cells += f"{summary(values)['p50']:16.3f}{summary(values)['p95']:8.3f}" if values else f"{'-':>16}{'-':>8}"
        base = peers["vmctl"]["samples"].get(key)
        for name in names[1:]:
            other = peers[name]["samples"].get(key)
            if base and other:
                ratio = statistics.median(other) / statistics.median(base)
                ratios.setdefault(key, {})[name] = ratio
                cells += f"{ratio:16.2f}"
            else:
                cells += f"{'-':>16}"
        print(f"{label:28}{cells}")
    print("\ncontroller CPU seconds by scenario (vmctl and plain: this process; libvirt: libvirtd + client)")
    scenarios = sorted({k for p in peers.values() for k in p["cpu_seconds"]})
    print(f"{'':28}" + "".join(f"{n:>16}" for n in names))
    for scenario in scenarios:
        print(f"{scenario:28}" + "".join(f"{peers[n]['cpu_seconds'].get(scenario, float('nan')):16.2f}" for n in names))
    print(f"{'controller peak RSS (MiB)':28}" + "".join(f"{peers[n]['memory_mib']:16.1f}" for n in names))
    print("  (each peer runs in its own process; libvirt: libvirtd + its Python client)")
    return ratios


async def main(rounds: int, sizes: list[int], skip_libvirt: bool) -> None:
    await pin_accel()  # every peer process inherits it
    await guest.ensure_default_assets()
    load_start = os.getloadavg()
    peers: dict[str, dict[str, Any]] = {}
    for peer in ["vmctl", "plain"] + ([] if skip_libvirt else ["libvirt"]):
        out = RESULTS / f".peers-{peer}-{os.getpid()}.json"
        argv = [sys.executable, __file__, "--only", peer, "--rounds", str(rounds),
                "--sizes", ",".join(map(str, sizes)), "--json-out", str(out)]  # fmt: skip
        print(f"running {peer} ...", flush=True)
        await anyio.run_process(argv, stdout=None, stderr=None)
        result = json.loads(out.read_text())
        out.unlink()
        if "skipped" in result:
            print(f"{peer}: {result['skipped']}")
        else:
            peers[peer] = result
    print(f"\nvmctl and its peers, {time.strftime('%Y-%m-%d')}, {platform.node()}, QEMU {await qemu_version()}, "
          f"{pinned().upper()}, q35, 1 vCPU, 256 MiB, {rounds} rounds, {os.cpu_count()} cores")  # fmt: skip
    ratios = print_table(peers, sizes)
    out = RESULTS / f"peers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "rounds": rounds, "sizes": sizes,
                               "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
                               "ratios_p50_vs_vmctl": ratios,
                               "peers": {k: {kk: vv for kk, vv in v.items()} for k, v in peers.items()}},
                              indent=2, default=str))  # fmt: skip
    print(f"wrote {out}")


async def qemu_version() -> str:
    return await host.qemu_version(host.find_qemu(None))


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def run_one(peer: str, rounds: int, sizes: list[int], out: Path) -> None:
    """One peer in this (fresh) process, so its CPU and memory are its own."""
    assets = await guest.ensure_default_assets()
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, vcpus=1, memory_mib=256, accel=pinned(),
                           block_driver="virtio-blk", pci_bridges=3)  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    disk = RESULTS / f".peers-disk-{os.getpid()}.img"
    with disk.open("wb") as f:
        f.truncate(16 << 20)
    try:
        if peer == "libvirt":
            lv = await libvirt_peer(assets, rounds, sizes)
            if isinstance(lv, str):
                result: dict[str, Any] = {"skipped": lv}
            else:
                result = {"samples": lv["samples"], "cpu_seconds": lv["cpu_total"],
                          "memory_mib": (lv["controller_rss_kib"] + peak_rss_kib()) / 1024, "detail": lv}  # fmt: skip
        else:
            result = await (vmctl_peer if peer == "vmctl" else plain_peer)(config, disk, rounds, sizes)
            result["memory_mib"] = peak_rss_kib() / 1024
    finally:
        disk.unlink(missing_ok=True)
    out.write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default="1,4,8,16")
    parser.add_argument("--skip-libvirt", action="store_true")
    parser.add_argument("--only", choices=["vmctl", "plain", "libvirt"], help=argparse.SUPPRESS)
    parser.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    if args.only:
        anyio.run(run_one, args.only, args.rounds, sizes, args.json_out)
    else:
        anyio.run(main, args.rounds, sizes, args.skip_libvirt)
