"""Boot-to-ready: vmctl against a plain qemu.qmp script on the same QEMU command line.

Both sides start QEMU paused (-S), connect QMP, send `cont`, and wait for the guest agent's
READY line on the virtio-serial socket. Rounds alternate between the two so drift in machine
load hits both alike. Prints a table and writes JSON to bench/results/.

    python bench/boot.py --rounds 5 [--machines q35,microvm]
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
from plain import plain_vm  # noqa: E402  (bench/ is run as scripts)

from vmctl import Sandbox, SandboxConfig, guest

RESULTS = Path(__file__).parent / "results"


async def vmctl_boot(config: SandboxConfig) -> tuple[float, float]:
    started = time.perf_counter()
    sb = Sandbox(config)
    async with sb:
        ready = time.perf_counter() - started
        stop_started = time.perf_counter()
    return ready, time.perf_counter() - stop_started


async def plain_boot(config: SandboxConfig) -> tuple[float, float]:
    async with plain_vm(config) as vm:
        ready = vm.ready_seconds
        stop_started = time.perf_counter()
    return ready, time.perf_counter() - stop_started


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50": statistics.median(ordered), "p95": p95, "min": ordered[0], "max": ordered[-1]}


async def main(rounds: int, memory: int, machines: list[str]) -> None:
    os.environ.setdefault("VMCTL_ACCEL", "tcg")
    assets = await guest.ensure_default_assets()
    samples: dict[str, dict[str, list[float]]] = {}
    for i in range(rounds):
        for machine in machines:
            config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, vcpus=1, memory_mib=memory,
                                   accel="tcg", machine=machine)  # fmt: skip
            order = [(f"vmctl {machine}", vmctl_boot), (f"plain {machine}", plain_boot)]
            for name, fn in order if i % 2 == 0 else reversed(order):
                ready, stop = await fn(config)
                samples.setdefault(name, {"ready": [], "stop": []})
                samples[name]["ready"].append(ready)
                samples[name]["stop"].append(stop)
    table = {name: {k: summary(v) for k, v in s.items()} for name, s in samples.items()}
    print(f"boot to guest ready (seconds), {rounds} rounds, TCG, {memory} MiB, {platform.node()}")
    print(f"{'':16} {'ready p50':>10} {'ready p95':>10} {'stop p50':>10} {'stop p95':>10}")
    for name, t in table.items():
        print(
            f"{name:16} {t['ready']['p50']:10.3f} {t['ready']['p95']:10.3f} {t['stop']['p50']:10.3f} {t['stop']['p95']:10.3f}"
        )
    ratios = {}
    for machine in machines:
        ratios[machine] = table[f"vmctl {machine}"]["ready"]["p50"] / table[f"plain {machine}"]["ready"]["p50"]
        print(
            f"ratio vmctl / plain, {machine} (ready p50): {ratios[machine]:.3f}  ({(ratios[machine] - 1) * 100:+.1f}%)"
        )
    if len(machines) > 1:
        a, b = machines[0], machines[1]
        print(f"{b} / {a} through vmctl (ready p50): "
              f"{table[f'vmctl {b}']['ready']['p50'] / table[f'vmctl {a}']['ready']['p50']:.3f}")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"boot-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "rounds": rounds, "memory_mib": memory,
                               "samples": samples, "summary": table, "ratio_ready_p50": ratios}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory", type=int, default=256)
    parser.add_argument("--machines", default="q35,microvm", help="comma-separated machine types")
    args = parser.parse_args()
    anyio.run(main, args.rounds, args.memory, args.machines.split(","))
