"""The main job for now: a small fleet of real sandboxes on the default guest, run concurrently.

Each sandbox boots, runs a job, reports; one failing sandbox does not take the others down,
and every sandbox is torn down when its block ends. Usage: python examples/small_fleet.py [N]
"""

import sys
import time

import anyio

from vmctl import Sandbox, SandboxConfig, VmctlError, guest

JOB = [
    "sh",
    "-c",
    "echo host=$(hostname) cpus=$(nproc) mem_kb=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)",
]


async def run_one(index: int, config: SandboxConfig, results: dict[int, str]) -> None:
    started = time.monotonic()
    try:
        async with Sandbox(config, id=f"fleet-{index}") as sb:
            booted = time.monotonic() - started
            result = await sb.exec(JOB, timeout=30, check=True)
            results[index] = f"boot {booted:5.2f}s  exit {result.exit_code}  {result.text.strip()}"
    except VmctlError as exc:
        results[index] = f"FAILED: {exc}"


async def main(size: int) -> int:
    assets = await guest.ensure_default_assets()
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, vcpus=1, memory_mib=256)
    results: dict[int, str] = {}
    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for i in range(size):
            tg.start_soon(run_one, i, config, results)
    for i in sorted(results):
        print(f"fleet-{i}  {results[i]}")
    print(f"{size} sandboxes in {time.monotonic() - started:.1f}s")
    return 1 if any(r.startswith("FAILED") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(anyio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 3))
