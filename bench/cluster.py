"""What the Ray path costs: fleets through vmctl.cluster against a local Fleet, and remote exec.

All on this machine: a three-node ``ray.cluster_utils.Cluster`` on loopback (each node declares
``vmctl_host``), the default guest (256 MiB, 1 vCPU, TCG unless VMCTL_ACCEL says), template
clones everywhere (a template per node for cluster fleets), so the guests stay cheap.

    fleet     for N in --sizes: time from entering the fleet's block until every member answered
              ``exec(["true"])`` and the block was left (members stopped), for
                local     ``Fleet(config, size=N, template=True)``
                one-node  ``ClusterFleet(..., strategy="PACK")`` (all members on one node)
                spread    ``ClusterFleet(..., strategy="SPREAD")`` (over the three nodes)
              host actors are warm (a driver keeps them: one untimed fleet first); rounds
              alternate the three modes; the best round of each is compared.
              The ratio is cluster / local (goal: at most 1.10).
    exec      ``exec(["true"])`` latency, p50 and p99 of --n calls: a local sandbox, and a remote
              one on another node of the cluster; the added latency is the difference of p50s
              (goal: at most 5 ms).

Prints a table and the load average (before and after), writes JSON to bench/results/cluster-<ts>.json.

    python bench/cluster.py [--sizes 4,8] [--rounds 2] [--n 50] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when Ray is imported
os.environ.setdefault("VMCTL_ACCEL", "tcg")

import anyio  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from vmctl import Fleet, Sandbox, SandboxConfig, cluster, guest  # noqa: E402

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def local_fleet(config: SandboxConfig, size: int) -> float:
    started = time.monotonic()
    async with Fleet(config, size=size, template=True, max_concurrent_starts=4) as fleet:
        results = await fleet.map(lambda sb: sb.exec(["true"], check=True))
    assert all(o.ok for _, o in results), [o.error for _, o in results]
    return time.monotonic() - started


async def cluster_fleet(config: SandboxConfig, size: int, strategy: str) -> tuple[float, int]:
    started = time.monotonic()
    async with cluster.ClusterFleet(config, size=size, template=True, strategy=strategy,
                                    max_concurrent_starts=4) as fleet:  # fmt: skip
        results = await fleet.map(lambda sb: sb.exec(["true"], check=True))
        nodes = len(set(fleet.nodes))
    assert all(o.ok for _, o in results), [o.error for _, o in results]
    return time.monotonic() - started, nodes


async def exec_latency(config: SandboxConfig, n: int, head: str) -> dict[str, Any]:
    local: list[float] = []
    async with Sandbox(config) as sb:
        await sb.exec(["true"])
        for _ in range(n):
            t = time.perf_counter()
            await sb.exec(["true"])
            local.append(time.perf_counter() - t)
    remote: list[float] = []
    async with cluster.ClusterFleet(config, size=1, strategy="PACK") as fleet:
        rsb = fleet.sandboxes[0]
        await rsb.exec(["true"])
        for _ in range(n):
            t = time.perf_counter()
            await rsb.exec(["true"])
            remote.append(time.perf_counter() - t)
        remote_node = rsb.node
    ms = 1000.0
    out = {"local_p50_ms": percentile(local, 0.5) * ms, "local_p99_ms": percentile(local, 0.99) * ms,
           "remote_p50_ms": percentile(remote, 0.5) * ms, "remote_p99_ms": percentile(remote, 0.99) * ms,
           "remote_on_head_node": remote_node == head, "n": n}  # fmt: skip
    out["added_p50_ms"] = out["remote_p50_ms"] - out["local_p50_ms"]
    return out


async def run(args: argparse.Namespace, head: str) -> dict[str, Any]:
    assets = await guest.ensure_default_assets()
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, memory_mib=256)
    # Warm host actors, as a driver keeps them for its life: each has looked up its node's guest
    # (the first fleet on a node pays ~1 s for that, once); not timed.
    await cluster_fleet(config, 3, "SPREAD")
    await local_fleet(config, 1)
    fleets: list[dict[str, Any]] = []
    for size in args.sizes:
        times: dict[str, list[float]] = {"local": [], "one-node": [], "spread": []}
        spread_nodes = 0
        for _ in range(args.rounds):
            times["local"].append(await local_fleet(config, size))
            times["one-node"].append((await cluster_fleet(config, size, "PACK"))[0])
            seconds, spread_nodes = await cluster_fleet(config, size, "SPREAD")
            times["spread"].append(seconds)
        best = {k: min(v) for k, v in times.items()}
        fleets.append({"size": size, "seconds": times, "best": best, "spread_nodes": spread_nodes,
                       "ratio_one_node": best["one-node"] / best["local"],
                       "ratio_spread": best["spread"] / best["local"]})  # fmt: skip
    latency = await exec_latency(config, args.n, head)
    await cluster.shutdown_hosts()
    return {"fleets": fleets, "exec": latency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4,8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    load_before = os.getloadavg()
    node = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "resources": {cluster.HOST_RESOURCE: 1}}
    c = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        c.add_node(**node)
        c.add_node(**node)
        c.wait_for_nodes()
        ray.init(address=c.address, _node_ip_address="127.0.0.1", log_to_driver=False)
        result = anyio.run(run, args, c.head_node.node_id)
    finally:
        ray.shutdown()
        c.shutdown()
    load_after = os.getloadavg()
    report = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.node(), "cpus": os.cpu_count(),
              "ray": ray.__version__, "accel": os.environ.get("VMCTL_ACCEL"), "load_before": load_before,
              "load_after": load_after, **result}  # fmt: skip
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f}"
          f" ({os.cpu_count()} CPUs); best of {args.rounds} rounds, template clones")  # fmt: skip
    print(f"{'N':>3} {'local':>8} {'one-node':>9} {'ratio':>6} {'3 nodes':>8} {'ratio':>6}")
    for f in result["fleets"]:
        b = f["best"]
        print(f"{f['size']:>3} {b['local']:>7.2f}s {b['one-node']:>8.2f}s {f['ratio_one_node']:>6.2f}"
              f" {b['spread']:>7.2f}s {f['ratio_spread']:>6.2f}")  # fmt: skip
    e = result["exec"]
    print(f"exec(['true']) p50/p99: local {e['local_p50_ms']:.1f}/{e['local_p99_ms']:.1f} ms, remote "
          f"{e['remote_p50_ms']:.1f}/{e['remote_p99_ms']:.1f} ms; added at p50: {e['added_p50_ms']:.1f} ms")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
