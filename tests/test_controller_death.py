"""QEMU dies with the controller, and what a dead controller left behind is swept on the next start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.conftest import qemu_processes
from vmctl import Sandbox, SandboxConfig, guest
from vmctl.hypervisors import jail

pytestmark = pytest.mark.qemu

CHILD = """
import sys, anyio
from vmctl import Sandbox, SandboxConfig
async def main():
    config = SandboxConfig(kernel=sys.argv[1], initrd=sys.argv[2], memory_mib=256)
    async with Sandbox(config) as sb:
        print(sb.hypervisor.pid, sb.pid, sb.run_dir, flush=True)  # the process started, QEMU itself
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


async def test_qemu_dies_with_a_killed_controller_and_leftovers_are_swept(
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
        child.send_signal(signal.SIGKILL)
        await child.wait()
    with anyio.fail_after(10):
        await wait_for_exit(started)
        await wait_for_exit(inner)
    assert run_dir.exists(), "a SIGKILLed controller cannot clean up after itself..."
    async with Sandbox(make_config()):
        assert not run_dir.exists(), "...so the next start does"
