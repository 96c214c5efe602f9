"""QEMU dies with the controller, and nothing a dead controller made outlives it for long: not
its run directories, cgroups or passt directories (removed by its reaper, without waiting for a
later start), nor a detached sandbox's once its QEMU ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.conftest import cgroups_named, processes_left, qemu_processes
from vmctl import Sandbox, SandboxConfig, guest
from vmctl.hypervisors import jail

pytestmark = pytest.mark.qemu

CHILD = """
import sys, anyio
from vmctl import Sandbox, SandboxConfig
async def main():
    config = SandboxConfig(kernel=sys.argv[1], initrd=sys.argv[2], memory_mib=256)
    async with Sandbox(config) as sb:
        from vmctl.core import reaper
        # the process started, QEMU itself, its run dir, the controller's reaper
        print(sb.hypervisor.pid, sb.pid, sb.run_dir, reaper.reaper_pid(), flush=True)
        await anyio.sleep_forever()
anyio.run(main)
"""


async def wait_for_exit(pid: int) -> None:
    """Event-driven wait for a process that is not our child."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # gone already
    try:
        await anyio.wait_readable(fd)
    finally:
        os.close(fd)


async def test_qemu_dies_with_a_killed_controller_and_the_next_start_sweeps_what_a_killed_reaper_left(
    assets: guest.GuestAssets, make_config: Callable[..., SandboxConfig], runtime_dir: Path
) -> None:
    async with await anyio.open_process(
        [sys.executable, "-c", CHILD, str(assets.kernel), str(assets.initrd)], stderr=subprocess.DEVNULL
    ) as child:
        assert child.stdout is not None
        line = (await BufferedByteReceiveStream(child.stdout).receive_until(b"\n", 4096)).decode()
        started, inner, run_dir = int(line.split()[0]), int(line.split()[1]), Path(line.split()[2])
        assert inner == jail.inner_pid(started)  # QEMU itself, behind the jail's outer process (as root)
        assert set(qemu_processes(str(runtime_dir))) == {started, inner}
        os.kill(int(line.split()[3]), signal.SIGKILL)  # the reaper first, so that nothing removes the run dir
        child.send_signal(signal.SIGKILL)
        await child.wait()
    with anyio.fail_after(10):
        await wait_for_exit(started)
        await wait_for_exit(inner)
    assert run_dir.exists(), "a SIGKILLed controller without its reaper cannot clean up after itself..."
    async with Sandbox(make_config()):
        assert not run_dir.exists(), "...so the next start does"


BUSY_CHILD = """
import json, sys, anyio
from vmctl import Sandbox, SandboxConfig, SandboxPool
from vmctl.devices import NetworkDevice
async def main():
    config = SandboxConfig(kernel=sys.argv[1], initrd=sys.argv[2], memory_mib=256)
    async with Sandbox(config) as plain, Sandbox(config.replace(devices=[NetworkDevice()])) as nic, \\
            SandboxPool(config, size=2) as pool:
        await pool.wait_ready(2, timeout=120)
        passt = [a for a in nic.hypervisor.command_line if "vmctl-passt-" in a]
        print(json.dumps({"passt": passt, "network": nic.config.network}), flush=True)
        await anyio.sleep_forever()
anyio.run(main)
"""


def processes_mentioning(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker``."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                out.append(int(entry.name))
        except OSError:
            pass
    return out


async def test_nothing_a_killed_controller_made_outlives_it_for_long(
    assets: guest.GuestAssets, runtime_dir: Path
) -> None:
    async with await anyio.open_process(
        [sys.executable, "-c", BUSY_CHILD, str(assets.kernel), str(assets.initrd)], stderr=subprocess.DEVNULL
    ) as child:
        assert child.stdout is not None
        with anyio.fail_after(240):
            line = (await BufferedByteReceiveStream(child.stdout).receive_until(b"\n", 65536)).decode()
        info = json.loads(line)
        run_dirs = sorted(p.name for p in runtime_dir.iterdir())
        passt_dirs = sorted({Path(a.split('"path":"')[1].split('"')[0]).parent for a in info["passt"]})
        assert info["network"] == "egress" and len(passt_dirs) == 1
        assert len(run_dirs) == 5, run_dirs  # two sandboxes, two pool members, the pool's template
        groups = cgroups_named(run_dirs)
        assert len(groups) == 12, groups  # cpu, memory and pids for each of the four QEMUs
        pids = set(qemu_processes(str(runtime_dir))) | set(processes_mentioning(str(passt_dirs[0])))
        assert len(qemu_processes(str(runtime_dir))) == 8  # four QEMUs, each behind its jail's outer process
        assert len(pids) == 9  # and passt
        # every jailed QEMU gets a passt directory mounted (a NIC may be hot-plugged later)
        passt_dirs = sorted({Path(a) for p in qemu_processes(str(runtime_dir))
                             for a in Path(f"/proc/{p}/cmdline").read_bytes().decode().split("\0")
                             if a.startswith("/tmp/vmctl-passt-")})  # fmt: skip
        assert len(passt_dirs) == 4 and all(d.is_dir() for d in passt_dirs), passt_dirs
        child.send_signal(signal.SIGKILL)
        await child.wait()
        killed = time.monotonic()

    def left() -> list[str]:
        # QEMU, the jails' outer processes and passt: the controller's orphans, dead at once, are
        # zombies until the host's init reaps them (~2 s here), which no one else can do
        return ([str(p) for p in runtime_dir.iterdir()] + cgroups_named(run_dirs)
                + [str(d) for d in passt_dirs if d.exists()]
                + [p for p in processes_left(pids) if "zombie" not in p])  # fmt: skip

    while left() and time.monotonic() - killed < 3:  # noqa: ASYNC110 - nothing to wait on but the files
        await anyio.sleep(0.02)
    assert left() == [], f"still there {time.monotonic() - killed:.1f}s after the controller was killed"
    print(f"everything gone {time.monotonic() - killed:.2f}s after the SIGKILL")


DETACHING_CHILD = """
import sys, anyio
from vmctl import Sandbox, SandboxConfig
async def main():
    config = SandboxConfig(kernel=sys.argv[1], initrd=sys.argv[2], memory_mib=256)
    async with Sandbox(config, id="lives-on", detached=True) as sb:
        print(sb.hypervisor.pid, sb.run_dir, flush=True)
        await anyio.sleep_forever()
anyio.run(main)
"""


async def test_a_detached_sandbox_keeps_its_files_while_its_qemu_runs_and_they_go_when_it_ends(
    assets: guest.GuestAssets, runtime_dir: Path
) -> None:
    async with await anyio.open_process(
        [sys.executable, "-c", DETACHING_CHILD, str(assets.kernel), str(assets.initrd)], stderr=subprocess.DEVNULL
    ) as child:
        assert child.stdout is not None
        with anyio.fail_after(120):
            line = (await BufferedByteReceiveStream(child.stdout).receive_until(b"\n", 4096)).decode()
        pid, run_dir = int(line.split()[0]), Path(line.split()[1])
        groups = cgroups_named([run_dir.name])
        assert len(groups) == 3 and run_dir.is_dir()
        child.send_signal(signal.SIGKILL)
        await child.wait()
    await anyio.sleep(1)  # ten times what the reaper took to remove a killed controller's files above
    assert cgroups_named([run_dir.name]) == groups and run_dir.is_dir(), "a detached QEMU keeps its files"
    assert pid in qemu_processes(str(run_dir))
    os.kill(pid, signal.SIGKILL)  # the sandbox ends; nobody calls vmctl
    killed = time.monotonic()
    while (run_dir.exists() or cgroups_named([run_dir.name])) and time.monotonic() - killed < 3:  # noqa: ASYNC110
        await anyio.sleep(0.02)
    assert not run_dir.exists() and cgroups_named([run_dir.name]) == [], "its files went with its QEMU"
    assert not (runtime_dir / "detached").exists()
    print(f"gone {time.monotonic() - killed:.2f}s after its QEMU")
