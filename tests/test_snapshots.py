"""Snapshots: save a running sandbox, restore it from another process, find the guest as it was."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from vmctl import InvalidArgument, Sandbox, SandboxConfig, SandboxState, VmctlTimeout, guest

pytestmark = pytest.mark.qemu

SAVER = """
import sys, anyio
from vmctl import Sandbox, SandboxConfig
async def main():
    config = SandboxConfig(kernel=sys.argv[1], initrd=sys.argv[2], memory_mib=256)
    async with Sandbox(config) as sb:
        await sb.exec(["sh", "-c", "echo written-before > /root/marker"], check=True)
        boot_id = (await sb.exec(["cat", "/proc/sys/kernel/random/boot_id"], check=True)).text.strip()
        await sb.snapshot(sys.argv[3])
        assert (await sb.exec(["cat", "/root/marker"], check=True)).text == "written-before\\n"  # still running
        print(boot_id, flush=True)
anyio.run(main)
"""


async def test_snapshot_round_trip_across_two_processes(assets: guest.GuestAssets, tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    saver = await anyio.run_process([sys.executable, "-c", SAVER, str(assets.kernel), str(assets.initrd), str(snap)],
                                    stderr=subprocess.PIPE)  # fmt: skip
    boot_id = saver.stdout.decode().strip()
    assert sorted(p.name for p in snap.iterdir()) == ["sandbox.json", "state"]
    assert not list(tmp_path.glob(".snap.partial-*"))
    async with Sandbox.restore(snap) as sb:
        assert sb.state is SandboxState.RUNNING
        assert (await sb.exec(["cat", "/root/marker"], check=True)).text == "written-before\n"
        same_boot = (await sb.exec(["cat", "/proc/sys/kernel/random/boot_id"], check=True)).text.strip()
        assert same_boot == boot_id, "the guest was resumed, not booted again"


async def test_failed_save_leaves_the_sandbox_running_and_no_snapshot(
    make_config: Callable[..., SandboxConfig], tmp_path: Path
) -> None:
    async with Sandbox(make_config()) as sb:
        with pytest.raises(VmctlTimeout):  # the save is cut short while QEMU writes it
            await sb.snapshot(tmp_path / "snap", timeout=0.005)
        assert sb.state is SandboxState.RUNNING
        assert not (tmp_path / "snap").exists() and not list(tmp_path.glob(".snap.partial-*"))
        with pytest.raises(InvalidArgument, match="already exists"):
            await sb.snapshot(tmp_path)
        assert (await sb.exec(["true"])).ok
    with pytest.raises(InvalidArgument, match="not a vmctl snapshot"):
        Sandbox.restore(tmp_path / "nothing-here")


@pytest.mark.timeout(240)
async def test_a_paused_sandbox_can_be_snapshotted_stays_paused_and_restores(make_config, tmp_path) -> None:
    """snapshot() of a paused sandbox works and leaves it paused; the snapshot restores and runs.
    Base: snapshot() raises IllegalTransition (it insists on a running sandbox)."""
    snap = tmp_path / "snap"
    async with Sandbox(make_config()) as sb:
        await sb.exec(["sh", "-c", "echo hello > /root/note"], check=True)
        await sb.pause()
        await sb.snapshot(snap)
        assert sb.state is SandboxState.PAUSED
    async with Sandbox.restore(snap) as restored:
        assert (await restored.exec(["cat", "/root/note"], check=True)).text == "hello\n"
