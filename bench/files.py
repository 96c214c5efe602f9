"""File transfer throughput and exec latency through the C guest agent.

For 1, 16 and 256 MiB: upload (host file -> guest tmpfs) and download (guest tmpfs -> host
file) through ``sb.upload`` / ``sb.download``, against the raw channel measured in the same
run (the agent sending N zero bytes over the port with no processing, and swallowing N bytes
sent to it). Then exec latency: a trivial command, median of 30; and, when git has it, the same
through the old shell agent (``git show f1b7f15:vmctl/guest/files/vmctl-agent``), booted with
an initramfs that carries it, spoken to in its line protocol. Prints a table with the load
average and writes JSON to bench/results/.

    python bench/files.py [--sizes 1,16,256] [--no-old-agent]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import anyio
from plain import plain_vm  # noqa: E402  (bench/ is run as scripts)

from vmctl import Sandbox, SandboxConfig, guest
from vmctl.guest import cpio

RESULTS = Path(__file__).parent / "results"
MIB = 1024 * 1024
OLD_AGENT_COMMIT = "f1b7f15"


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / MIB / seconds


async def transfers(config: SandboxConfig, sizes: list[int], work: Path) -> tuple[list[dict[str, float]], float]:
    rows = []
    async with Sandbox(config) as sb:
        agent = sb.hypervisor.agent
        latencies = []
        for _ in range(30):
            started = time.perf_counter()
            await sb.exec(["true"])
            latencies.append(time.perf_counter() - started)
        for size in sizes:
            nbytes = size * MIB
            started = time.perf_counter()
            await agent.channel_source(nbytes)
            raw_down = mbps(nbytes, time.perf_counter() - started)
            started = time.perf_counter()
            await agent.channel_sink(nbytes)
            raw_up = mbps(nbytes, time.perf_counter() - started)
            local = work / f"up-{size}"
            with local.open("wb") as f:
                for _ in range(size):
                    f.write(os.urandom(MIB))
            started = time.perf_counter()
            await sb.upload(local, "/tmp/up")
            up = mbps(nbytes, time.perf_counter() - started)
            local.unlink()
            await sb.exec(["rm", "/tmp/up"], check=True)
            await sb.exec(["dd", "if=/dev/urandom", "of=/tmp/down", "bs=1048576", f"count={size}"], check=True)
            started = time.perf_counter()
            await sb.download("/tmp/down", work / "down")
            down = mbps(nbytes, time.perf_counter() - started)
            (work / "down").unlink()
            await sb.exec(["rm", "/tmp/down"], check=True)
            rows.append({"mib": size, "upload_mib_s": up, "raw_up_mib_s": raw_up, "download_mib_s": down,
                         "raw_down_mib_s": raw_down})  # fmt: skip
            print(f"  {size} MiB done", flush=True)
    return rows, statistics.median(latencies)


def old_initrd(assets: guest.GuestAssets, work: Path) -> Path | None:
    """The default initramfs with the old shell agent appended (a later cpio entry wins)."""
    done = subprocess.run(["git", "show", f"{OLD_AGENT_COMMIT}:vmctl/guest/files/vmctl-agent"],
                          capture_output=True, cwd=Path(__file__).parent)  # fmt: skip
    if done.returncode != 0:
        return None
    extra = work / "old-agent.cpio.gz"
    cpio.write_initramfs(extra, [cpio.file_entry("sbin/vmctl-agent", done.stdout, 0o755)])
    target = work / "initrd-old-agent.img"
    target.write_bytes(assets.initrd.read_bytes() + extra.read_bytes())
    return target


async def old_agent_latency(config: SandboxConfig) -> float:
    words = base64.b64encode(b"'true'").decode()
    latencies = []
    async with plain_vm(config, legacy=True) as vm:
        for n in range(30):
            started = time.perf_counter()
            vm.agent_writer.write(f"EXEC x{n} 0 - {words}\n".encode())
            await vm.agent_writer.drain()
            reply = (await vm.agent_reader.readline()).split()
            latencies.append(time.perf_counter() - started)
            if reply[:3] != [b"R", f"x{n}".encode(), b"0"]:
                raise RuntimeError(f"unexpected reply from the old agent: {reply!r}")
    return statistics.median(latencies)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16,256")
    parser.add_argument("--no-old-agent", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    assets = await guest.ensure_default_assets()
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, memory_mib=1024, accel="tcg")
    work = Path(tempfile.mkdtemp(prefix="bench-files-"))
    try:
        load_before = os.getloadavg()
        rows, latency = await transfers(config, sizes, work)
        old_latency = None
        initrd = None if args.no_old_agent else old_initrd(assets, work)
        if initrd is not None:
            old_latency = await old_agent_latency(config.replace(initrd=initrd, memory_mib=256))
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"{'size':>8} {'upload':>10} {'raw up':>10} {'ratio':>6} {'download':>10} {'raw down':>10} {'ratio':>6}")
    for r in rows:
        print(f"{r['mib']:>5} MiB {r['upload_mib_s']:>6.1f} MiB/s {r['raw_up_mib_s']:>6.1f} MiB/s "
              f"{r['upload_mib_s'] / r['raw_up_mib_s']:>6.2f} {r['download_mib_s']:>6.1f} MiB/s "
              f"{r['raw_down_mib_s']:>6.1f} MiB/s {r['download_mib_s'] / r['raw_down_mib_s']:>6.2f}")  # fmt: skip
    print(f"exec latency (true, median of 30): {latency * 1000:.1f} ms"
          + (f"; old shell agent: {old_latency * 1000:.1f} ms" if old_latency is not None else ""))  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"files-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"host": platform.node(), "load_before": load_before, "load_after": load_after,
                               "transfers": rows, "exec_latency_s": latency, "old_agent_exec_latency_s": old_latency},
                              indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    anyio.run(main)
