"""What the jail costs: boot to ready and template-clone start, jailed vs not, in one run.

Both variants use the same guest and config (256 MiB, 1 vCPU, TCG unless VMCTL_ACCEL says);
``jail=False`` is the unjailed one. Runs alternate (jailed, unjailed, jailed, ...) so that load
from other work hits both alike. Timed: from ``Sandbox(...).__aenter__`` until the first
``exec(["true"])`` answers. Prints a table (p50, mean, ratio) with the load average before and
after, and writes JSON to bench/results/jail-<timestamp>.json. The goal: jailed/unjailed <= 1.05.
Run as root (otherwise there is no jail to measure).

    python bench/jail.py [--boots 5] [--clones 10] [--out bench/results]
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

from vmctl import Sandbox, SandboxConfig, guest
from vmctl.fleets.template import boot_template
from vmctl.hypervisors import jail

RESULTS = Path(__file__).resolve().parent / "results"


#: QEMU's start to its QMP greeting (startup_timings["qmp"]): where the jail helper's own work shows
SPAWN = "spawn_to_qmp"


async def timed_start(config: SandboxConfig, spawn: list[float]) -> float:
    start = time.perf_counter()
    async with Sandbox(config, start_timeout=300) as sb:
        await sb.exec(["true"], check=True)
        took = time.perf_counter() - start
        spawn.append(sb.hypervisor.startup_timings.get("qmp", 0.0))  # type: ignore[attr-defined]
        return took


async def alternate(config: SandboxConfig, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"jailed": [], "unjailed": [], f"jailed_{SPAWN}": [], f"unjailed_{SPAWN}": []}
    for _ in range(n):
        for name, on in (("jailed", True), ("unjailed", False)):
            out[name].append(await timed_start(config.replace(jail=on), out[f"{name}_{SPAWN}"]))
    return out


def row(name: str, samples: dict[str, list[float]]) -> dict[str, Any]:
    j, u = statistics.median(samples["jailed"]), statistics.median(samples["unjailed"])
    return {"what": name, "n": len(samples["jailed"]), "jailed_p50_s": round(j, 4), "unjailed_p50_s": round(u, 4),
            "jailed_mean_s": round(statistics.mean(samples["jailed"]), 4),
            "unjailed_mean_s": round(statistics.mean(samples["unjailed"]), 4),
            "ratio_p50": round(j / u, 3),
            f"jailed_{SPAWN}_p50_s": round(statistics.median(samples[f"jailed_{SPAWN}"]), 4),
            f"unjailed_{SPAWN}_p50_s": round(statistics.median(samples[f"unjailed_{SPAWN}"]), 4),
            "samples": samples}  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--clones", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("VMCTL_ACCEL", "tcg")
    assets = await guest.ensure_default_assets()
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, memory_mib=256, vcpus=1, max_vcpus=1)
    load_before = os.getloadavg()
    rows = [row("boot to ready", await alternate(config, args.boots))]
    async with AsyncExitStack() as stack:
        clone_config = await boot_template(config, stack, id="bench-jail-template", backend=None, start_timeout=300)
        rows.append(row("clone start", await alternate(clone_config, args.clones)))
    load_after = os.getloadavg()
    print(f"{'':<14} {'n':>3} {'jailed p50':>11} {'unjailed p50':>13} {'ratio':>6} {'spawn->QMP jailed':>18} {'unjailed':>9}")
    for r in rows:
        print(f"{r['what']:<14} {r['n']:>3} {r['jailed_p50_s']:>10.3f}s {r['unjailed_p50_s']:>12.3f}s {r['ratio_p50']:>6.3f}"
              f" {r[f'jailed_{SPAWN}_p50_s']:>17.3f}s {r[f'unjailed_{SPAWN}_p50_s']:>8.3f}s")  # fmt: skip
    print(f"load average before {load_before}, after {load_after}")
    print("jail parts:", {p: ok for p, (ok, _) in jail.host_status().items()})
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"jail-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"bench": "jail", "host": platform.node(), "accel": os.environ["VMCTL_ACCEL"],
                               "euid": os.geteuid(), "load_before": load_before, "load_after": load_after,
                               "jail": {p: ok for p, (ok, _) in jail.host_status().items()}, "rows": rows},
                              indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    anyio.run(main)
