"""A hostile agent inside a real guest (tests/hostile_agent.c in place of vmctl's): what it sends
beyond the credit the controller granted ends the channel and fails the sandbox, the controller's
memory stays bounded by the credit, and a pool replaces a member whose agent broke the protocol."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from tests import hostile
from tests.conftest import assert_no_stray_tasks
from vmctl import PoolEvent, PoolEventKind, Sandbox, SandboxConfig, SandboxFailed, SandboxPool, SandboxState, guest
from vmctl.agent.client import WINDOW

pytestmark = pytest.mark.qemu
MakeConfig = Callable[..., SandboxConfig]
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return hostile.binary(tmp_path_factory.mktemp("hostile"))


def rss() -> int:
    """This controller's resident memory, bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
async def test_output_beyond_the_granted_credit_fails_the_sandbox_with_memory_bounded(
        make_config: MakeConfig, program: bytes, stream: str) -> None:  # fmt: skip
    """The agent answers a spawn and sends 256 MiB for it against a 1 MiB credit nobody reads."""
    async with Sandbox(make_config()) as sb:
        await hostile.take_over(sb, program, f"{stream} {256 * MiB}")
        before = rss()
        async with sb.process(["sleep", "100"], output_limit=WINDOW) as p:
            with anyio.fail_after(120):
                assert await sb.wait_for_state(SandboxState.FAILED) is SandboxState.FAILED
            grown = rss() - before
            print(f"controller RSS {before / MiB:.0f} MiB before the flood, +{grown / MiB:.1f} MiB after")
            assert "beyond the credit" in sb.failure
            assert grown < 32 * MiB, "the controller kept what the guest sent beyond its credit"
            with pytest.raises(SandboxFailed, match="beyond the credit"):
                await getattr(p, stream).receive()
        assert sb.hypervisor.agent.pending == 0
    await assert_no_stray_tasks()


async def test_a_file_read_beyond_the_granted_credit_fails_the_sandbox(make_config: MakeConfig, program: bytes) -> None:
    async with Sandbox(make_config()) as sb:
        await hostile.take_over(sb, program, f"fread {64 * MiB}")
        with anyio.fail_after(120), pytest.raises(SandboxFailed, match="beyond the credit"):
            await sb.read_file("/etc/passwd")
        assert sb.state is SandboxState.FAILED
        assert sb.hypervisor.agent.pending == 0
    await assert_no_stray_tasks()


async def test_a_pool_replaces_a_ready_member_whose_agent_broke_the_protocol(
        assets: guest.GuestAssets, program: bytes, tmp_path: Path) -> None:  # fmt: skip
    """Every member's agent passes the readiness check, then sends a 1 GB frame header."""
    initrd = hostile.initrd(assets.initrd, program, "pool 20", tmp_path / "hostile.img")
    config = SandboxConfig(kernel=assets.kernel, initrd=initrd, memory_mib=256)
    events: list[PoolEvent] = []
    replaced = anyio.Event()

    def on_event(event: PoolEvent) -> None:
        events.append(event)
        dead = [e.sandbox_id for e in events if e.kind is PoolEventKind.DIED]
        if dead and event.kind is PoolEventKind.READY and event.sandbox_id not in dead:
            replaced.set()

    async with SandboxPool(config, size=1, template=False, on_event=on_event):
        with anyio.fail_after(150):
            await replaced.wait()  # and its replacement breaks the protocol in turn: it is hostile too
    dead = next(e for e in events if e.kind is PoolEventKind.DIED)
    assert [e.kind for e in events if e.sandbox_id == dead.sandbox_id][:3] == [
        PoolEventKind.STARTING, PoolEventKind.READY, PoolEventKind.DIED]
    assert "broke the protocol" in dead.detail and dead.stats.ready == 0
    await assert_no_stray_tasks()
