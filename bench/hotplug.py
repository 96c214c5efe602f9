"""Disk hotplug: add (until the guest sees the disk) and remove (until DEVICE_DELETED).

vmctl's `hotplug`/`unplug` against a plain qemu.qmp script doing the same QMP commands and the same
guest check (the agent's WAITDEV request) on the same QEMU command line, in one run; then vmctl
again with three callers plugging at once. Prints a table, writes JSON to bench/results/.

    python bench/hotplug.py --rounds 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import anyio
from accel import pin_accel
from plain import plain_disk_add, plain_disk_remove, plain_vm  # noqa: E402  (bench/ is run as scripts)
from qemu.qmp import EventListener

from vmctl import Sandbox, SandboxConfig, guest
from vmctl.devices import BlockDevice

RESULTS = Path(__file__).parent / "results"


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
            "n": len(ordered)}  # fmt: skip


async def vmctl_rounds(config: SandboxConfig, disks: list[Path], rounds: int, callers: int) -> dict[str, list[float]]:
    add: list[float] = []
    remove: list[float] = []
    async with Sandbox(config) as sb:

        async def one(disk: Path) -> None:
            started = time.perf_counter()
            record = await sb.hotplug(BlockDevice(path=disk))
            add.append(time.perf_counter() - started)
            started = time.perf_counter()
            await sb.unplug(record)
            remove.append(time.perf_counter() - started)

        for _ in range(rounds):
            async with anyio.create_task_group() as tg:
                for disk in disks[:callers]:
                    tg.start_soon(one, disk)
    return {"add": add, "remove": remove}


async def plain_rounds(config: SandboxConfig, disk: Path, rounds: int) -> dict[str, list[float]]:
    """A careful hand-written script: QMP by qemu.qmp, the guest check over the agent socket."""
    add: list[float] = []
    remove: list[float] = []
    async with plain_vm(config) as vm:
        deleted = EventListener(("DEVICE_DELETED",))
        vm.qmp.register_listener(deleted)
        for i in range(rounds):
            dev = f"p{i}"
            started = time.perf_counter()
            await plain_disk_add(vm, disk, dev, str(i + 1))
            add.append(time.perf_counter() - started)
            started = time.perf_counter()
            await plain_disk_remove(vm, dev, deleted)
            remove.append(time.perf_counter() - started)
    return {"add": add, "remove": remove}


async def main(rounds: int) -> None:
    accel = await pin_accel()
    assets = await guest.ensure_default_assets()
    RESULTS.mkdir(exist_ok=True)
    disks = []
    for i in range(3):
        disk = RESULTS / f".bench-disk{i}.img"
        with disk.open("wb") as f:
            f.truncate(16 << 20)
        disks.append(disk)
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, memory_mib=256, block_driver="virtio-blk",
                           pci_bridges=3)  # fmt: skip
    try:
        runs = {
            "plain qemu.qmp": await plain_rounds(config, disks[0], rounds),
            "vmctl": await vmctl_rounds(config, disks, rounds, callers=1),
            "vmctl, 3 callers at once": await vmctl_rounds(config, disks, max(1, rounds // 3), callers=3),
        }
    finally:
        for disk in disks:
            disk.unlink(missing_ok=True)
    table = {name: {k: summary(v) for k, v in r.items()} for name, r in runs.items()}
    print(f"disk hotplug, virtio-blk on a PCIe root port, {accel.upper()}, load average {os.getloadavg()[0]:.1f}, {platform.node()}, times in ms")
    print(f"{'':26} {'add p50':>8} {'add p95':>8} {'rm p50':>8} {'rm p95':>8} {'n':>4}")
    for name, t in table.items():
        a, r = t["add"], t["remove"]
        print(
            f"{name:26} {a['p50'] * 1e3:8.1f} {a['p95'] * 1e3:8.1f} {r['p50'] * 1e3:8.1f} {r['p95'] * 1e3:8.1f} {a['n']:4.0f}"
        )
    base = table["plain qemu.qmp"]
    for key in ("add", "remove"):
        ratio = table["vmctl"][key]["p50"] / base[key]["p50"]
        print(f"ratio vmctl / plain ({key} p50): {ratio:.3f} ({(ratio - 1) * 100:+.1f}%)")
    out = RESULTS / f"hotplug-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "rounds": rounds, "runs": runs,
                               "summary": table}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    anyio.run(main, parser.parse_args().rounds)
