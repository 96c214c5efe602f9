"""Fault injection on real QEMU (TCG): QEMU SIGKILLed in every phase, QMP cut under us, a guest
that ignores an unplug request, a hung guest agent, a full disk under a snapshot.

For each fault the sandbox ends in a defined state, every caller that was waiting gets a vmctl
error that says what happened, and nothing is left behind (the autouse fixture in conftest.py
checks processes, sockets, fds and the runtime dir; each test checks waiters and tasks).

A few faults a real QEMU will not produce at a chosen moment are driven with the fake QEMU at
the end of this file.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import assert_no_stray_tasks, qemu_processes
from vmctl import GuestError, Sandbox, SandboxConfig, SandboxFailed, SandboxState, VmctlError, VmctlTimeout
from vmctl.devices import BlockDevice
from vmctl.errors import QMPError
from vmctl.machine.hotplug import DeviceState, HotplugError, HotplugTimeout
from vmctl.testing import FakeQemu, fake_config

MakeConfig = Callable[..., SandboxConfig]
S = SandboxState
#: the ACPI event that carries QEMU's q35 PCI hotplug requests; a guest that disables it ignores them
GPE_PCI_HOTPLUG = "/sys/firmware/acpi/interrupts/gpe01"


def kill_qemu(sb: Sandbox) -> None:
    assert sb.pid is not None
    os.kill(sb.pid, signal.SIGKILL)


async def until(condition: Callable[[], bool], timeout: float = 60) -> None:
    """Wait (bounded) for a condition on the sandbox that no event announces."""
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 - vmctl has no event for these (a pid, a pending count, a file)
            await anyio.sleep(0.001)


class Callers:
    """Calls that wait on the sandbox while a fault hits it; collects how each one ended."""

    def __init__(self) -> None:
        self.errors: dict[str, BaseException] = {}
        self.returned: list[str] = []

    async def call(self, name: str, call: Awaitable[Any]) -> None:
        try:
            await call
        except VmctlError as exc:
            self.errors[name] = exc
        else:
            self.returned.append(name)


def assert_nothing_pending(sb: Sandbox) -> None:
    assert sb.hypervisor.agent.pending == 0, "an agent request was left waiting"
    assert sb.pending_waiters == 0, "a hotplug waiter was left"  # noqa: SLF001


def assert_killed(sb: Sandbox, error: BaseException) -> None:
    """The sandbox failed because QEMU was SIGKILLed, and the error says so."""
    assert sb.state is S.FAILED, sb.history
    assert isinstance(error, SandboxFailed), repr(error)
    assert "QEMU exited with code -9" in str(error), str(error)
    assert "-9" in sb.failure


# -- SIGKILL of QEMU -----------------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("phase", ["launched", "guest-booting"])
async def test_sigkill_during_boot_fails_the_start(make_config: MakeConfig, runtime_dir: Path, phase: str) -> None:
    """QEMU killed right after it was launched, or while the guest kernel boots (debug makes it
    print): the start raises SandboxFailed, and so does a task waiting for RUNNING."""
    sb = Sandbox(make_config(debug=phase == "guest-booting"))
    # subscribed before the start, so no console line is missed
    console = aclosing(sb.console_lines()) if phase == "guest-booting" else None
    callers = Callers()

    async def kill_in_phase() -> None:
        if console is None:
            await until(lambda: sb.pid is not None)
        else:
            async with console as lines:
                async for line in lines:
                    if "Linux version" in line:  # the guest kernel runs; its agent is seconds away
                        break
        assert sb.state is S.STARTING
        kill_qemu(sb)

    async with anyio.create_task_group() as tg:
        tg.start_soon(kill_in_phase)
        tg.start_soon(callers.call, "wait_for_state", sb.wait_for_state(S.RUNNING, timeout=120))
        try:
            async with sb:
                pytest.fail("the start should have failed")
        except SandboxFailed as exc:
            callers.errors["start"] = exc
    assert callers.returned == [], "nothing may report the sandbox ready"
    assert_killed(sb, callers.errors["start"])
    assert isinstance(callers.errors["wait_for_state"], SandboxFailed)
    assert [t.new for t in sb.history] == [S.STARTING, S.FAILED]
    assert sb.hypervisor.agent.pending == 0
    assert qemu_processes(str(runtime_dir)) == [] and sb.run_dir is not None and not sb.run_dir.exists()
    await assert_no_stray_tasks()


@pytest.mark.qemu
async def test_sigkill_during_hotplug_fails_the_waiting_hotplug(make_config: MakeConfig, tmp_path: Path) -> None:
    disk = tmp_path / "data.img"
    disk.write_bytes(b"\0" * (1 << 20))
    callers = Callers()
    async with Sandbox(make_config(block_driver="virtio-blk", pci_bridges=1)) as sb:
        agent = sb.hypervisor.agent
        # the guest stops handling ACPI hotplug events, so the hotplug stays in flight until the kill
        await sb.exec(["sh", "-c", f"echo disable > {GPE_PCI_HOTPLUG}"], check=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(callers.call, "hotplug", sb.hotplug(BlockDevice(path=disk, id="data")))
            await until(lambda: agent.pending > 0)  # QEMU took the disk; hotplug waits for the guest to see it
            kill_qemu(sb)
        assert callers.returned == []
        assert_killed(sb, callers.errors["hotplug"])
        assert_nothing_pending(sb)
        with pytest.raises(SandboxFailed):  # later calls fail at once
            await sb.hotplug(BlockDevice(path=disk, id="other"))
        with pytest.raises(SandboxFailed):
            await sb.unplug("data")
    assert sb.state is S.FAILED
    await assert_no_stray_tasks()


@pytest.mark.qemu
async def test_sigkill_while_paused(make_config: MakeConfig, runtime_dir: Path) -> None:
    callers = Callers()
    async with Sandbox(make_config()) as sb:
        await sb.pause()
        async with anyio.create_task_group() as tg:
            tg.start_soon(callers.call, "wait_running", sb.wait_for_state(S.RUNNING))
            await anyio.wait_all_tasks_blocked()
            kill_qemu(sb)
            assert await sb.wait_for_state(S.FAILED, timeout=10) is S.FAILED
        assert_killed(sb, callers.errors["wait_running"])
        assert (sb.history[-1].old, sb.history[-1].trigger.value) == (S.PAUSED, "process-exit")
        with pytest.raises(SandboxFailed, match="code -9"):
            await sb.resume()
        await sb.stop()  # stopping a failed sandbox is allowed and changes nothing
        assert sb.state is S.FAILED
        assert_nothing_pending(sb)
        assert qemu_processes(str(runtime_dir)) == []
    await assert_no_stray_tasks()


@pytest.mark.qemu
async def test_sigkill_during_snapshot_leaves_no_snapshot(make_config: MakeConfig, tmp_path: Path) -> None:
    target = tmp_path / "snap"
    callers = Callers()
    async with Sandbox(make_config()) as sb:
        async with anyio.create_task_group() as tg:
            tg.start_soon(callers.call, "snapshot", sb.snapshot(target))
            # QEMU is paused and vmctl has opened the state file it is about to hand over: the save is on
            await until(lambda: bool(list(tmp_path.glob(".snap.partial-*/.state.partial"))), timeout=30)
            assert sb.state is S.PAUSED
            kill_qemu(sb)
        assert callers.returned == []
        assert_killed(sb, callers.errors["snapshot"])
        assert not target.exists(), "no snapshot may appear"
        assert list(tmp_path.iterdir()) == [], "no partial snapshot directory may be left"
        assert_nothing_pending(sb)
    await assert_no_stray_tasks()


# -- QMP lost while QEMU lives --------------------------------------------------------------------


@pytest.mark.qemu
async def test_qmp_connection_cut_under_us_fails_the_sandbox(make_config: MakeConfig, runtime_dir: Path) -> None:
    """The QMP socket is shut down from our side while QEMU keeps running (what a QEMU monitor
    bug or a stray close of the fd would look like): the sandbox fails after the grace period,
    waiters are woken, and leaving the block kills the QEMU that is still there."""
    callers = Callers()
    async with Sandbox(make_config()) as sb:
        pid = sb.pid
        qmp_client = sb.hypervisor.qmp._client  # type: ignore[attr-defined]  # noqa: SLF001
        qmp_socket = qmp_client._writer.get_extra_info("socket")  # noqa: SLF001
        async with anyio.create_task_group() as tg:
            tg.start_soon(callers.call, "exec", sb.exec(["sleep", "60"]))
            tg.start_soon(callers.call, "wait_paused", sb.wait_for_state(S.PAUSED))
            await until(lambda: sb.hypervisor.agent.pending == 1)
            qmp_socket.shutdown(socket.SHUT_RDWR)
            assert await sb.wait_for_state(S.FAILED, timeout=15) is S.FAILED
        assert "QMP connection lost while QEMU still runs" in sb.failure
        for name in ("exec", "wait_paused"):
            error = callers.errors[name]
            assert isinstance(error, SandboxFailed) and "QMP connection lost" in str(error), (name, error)
        outer = sb.hypervisor.pid  # the jail's outer process around QEMU (QEMU itself unjailed)
        assert set(qemu_processes(str(runtime_dir))) == {pid, outer}, "QEMU itself was not touched by the fault"
        with pytest.raises(SandboxFailed):
            await sb.pause()
        assert_nothing_pending(sb)
    assert qemu_processes(str(runtime_dir)) == [], "leaving the block killed the orphaned QEMU"
    await assert_no_stray_tasks()


# -- a guest that does not let go of a device -----------------------------------------------------


@pytest.mark.qemu
async def test_guest_ignoring_the_unplug_request_times_out_and_keeps_the_slot(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    """The guest disables the ACPI event that carries QEMU's eject request, so it never releases
    the disk: unplug raises HotplugTimeout, the device stays unplug-pending with its slot, and
    the sandbox keeps running and stops cleanly."""
    disk = tmp_path / "data.img"
    disk.write_bytes(b"\0" * (1 << 20))
    async with Sandbox(make_config(block_driver="virtio-blk", pci_bridges=1)) as sb:
        plugged = await sb.hotplug(BlockDevice(path=disk, id="data"))
        assert plugged.guest_path == "/dev/vda"
        await sb.exec(["sh", "-c", f"echo disable > {GPE_PCI_HOTPLUG}"], check=True)
        with pytest.raises(HotplugTimeout) as info:
            await sb.unplug(plugged, timeout=2)
        assert "data" in str(info.value) and "unplug-pending" in str(info.value)
        assert sb.state is S.RUNNING
        assert plugged.state is DeviceState.UNPLUG_PENDING and sb.devices == [plugged]
        assert (await sb.exec(["ls", "/dev/vda"])).ok, "the guest still has the disk"
        with pytest.raises(HotplugError, match="no free PCIe root port"):
            await sb.hotplug(BlockDevice(path=disk, id="second"))  # its slot is still taken
        assert_nothing_pending(sb)
    assert sb.state is S.STOPPED
    assert [t.new for t in sb.history][-2:] == [S.STOPPING, S.STOPPED]
    await assert_no_stray_tasks()


# -- a hung guest agent -----------------------------------------------------------------------------


@pytest.mark.qemu
async def test_hung_guest_agent_gives_a_timeout_and_stop_still_works(make_config: MakeConfig) -> None:
    """The agent is SIGSTOPped inside the guest (by a background child of an exec, once that exec
    was answered; the test waits until pings go unanswered). An exec with a timeout raises VmctlTimeout naming the command;
    one without a timeout waits until stop() ends the sandbox and then gets a GuestError; stop()
    falls back from the agent's power-off to QMP quit within its timeout."""
    callers = Callers()
    async with Sandbox(make_config()) as sb:
        agent = sb.hypervisor.agent
        # $PPID is the agent; the background child stops it after the exec's answer went out
        await sb.exec(["sh", "-c", "(sleep 0.2; kill -STOP $PPID) </dev/null >/dev/null 2>&1 &"], check=True)
        while True:
            with anyio.move_on_after(1) as scope:
                await agent.ping()
            if scope.cancelled_caught:
                break
        with pytest.raises(VmctlTimeout, match="did not answer exec .*echo.* within 1s"):
            await sb.exec(["echo", "hello"], timeout=1)
        assert agent.pending == 0 and sb.state is S.RUNNING
        async with anyio.create_task_group() as tg:
            tg.start_soon(callers.call, "exec", sb.exec(["echo", "never answered"]))
            await until(lambda: agent.pending == 1)
            started = anyio.current_time()
            await sb.stop(timeout=2)
            assert anyio.current_time() - started < 2 + 5 + 1, "power-off timeout, then quit (within 5 s)"
        assert sb.state is S.STOPPED
        assert [t.new for t in sb.history][-2:] == [S.STOPPING, S.STOPPED], "a clean stop, not a failure"
        error = callers.errors["exec"]
        assert isinstance(error, GuestError) and ("closed" in str(error) or "disconnected" in str(error)), error
        assert agent.pending == 0
    await assert_no_stray_tasks()


# -- disk full under a snapshot ---------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Any:
    """A 1 MiB tmpfs (root only); unmounted afterwards."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "vmctl-test-tiny", str(mount_point)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.qemu
async def test_disk_full_during_snapshot_fails_the_save_and_keeps_running(
    make_config: MakeConfig, tiny_fs: Path
) -> None:
    target = tiny_fs / "snap"
    async with Sandbox(make_config()) as sb:
        with pytest.raises(QMPError) as info:
            await sb.snapshot(target)
        assert "saving device state" in str(info.value) and str(tiny_fs) in str(info.value)
        assert "failed" in str(info.value)
        assert sb.state is S.RUNNING, "a failed save leaves the sandbox running"
        assert list(tiny_fs.iterdir()) == [], "neither the snapshot nor a partial one is left"
        assert (await sb.exec(["echo", "alive"])).stdout == b"alive\n"
        assert_nothing_pending(sb)
    assert sb.state is S.STOPPED
    await assert_no_stray_tasks()


# -- on the fake: moments a real QEMU does not let us pick -------------------------------------------


def migration_replies(**overrides: Any) -> dict[str, Any]:
    """The fake has no migration: script the commands a save sends."""
    replies: dict[str, Any] = {"migrate-set-capabilities": {}, "migrate-set-parameters": {}, "getfd": {},
                               "migrate": {}, "migrate_cancel": {}, "query-migrate": {"status": "active"}}  # fmt: skip
    replies.update(overrides)
    return replies


async def test_qemu_dying_while_the_save_waits_for_its_end_fails_the_snapshot_at_once(tmp_path: Path) -> None:
    fake = FakeQemu(replies=migration_replies())
    callers = Callers()
    async with Sandbox(fake_config(tmp_path), backend=fake) as sb:
        with anyio.move_on_after(3) as bound:
            async with anyio.create_task_group() as tg:
                tg.start_soon(callers.call, "snapshot", sb.snapshot(tmp_path / "snap", timeout=30))
                await until(lambda: "query-migrate" in fake.commands(), timeout=5)
                await anyio.wait_all_tasks_blocked()  # the save now waits for the end of the migration
                fake.crash(-9)
        assert not bound.cancel_called, "snapshot() was still waiting 3 s after QEMU died"
        assert isinstance(callers.errors["snapshot"], SandboxFailed), callers.errors
        assert not list(tmp_path.glob(".snap.partial-*"))


async def test_retrying_an_unacknowledged_unplug_asks_qemu_again(tmp_path: Path) -> None:
    disk = tmp_path / "data.img"
    disk.write_bytes(b"\0" * 4096)
    fake = FakeQemu(unplug="never")
    async with Sandbox(fake_config(tmp_path, block_driver="virtio-blk"), backend=fake) as sb:
        plugged = await sb.hotplug(BlockDevice(path=disk, id="data"))
        with pytest.raises(HotplugTimeout):
            await sb.unplug(plugged, timeout=0.3)
        fake.unplug = "ack"  # the guest handles eject requests again
        await sb.unplug(plugged, timeout=1)
        assert sb.devices == [] and plugged.state is DeviceState.REMOVED


async def test_a_failed_save_says_why(tmp_path: Path) -> None:
    reason = "Unable to write to file: No space left on device"
    fake = FakeQemu(replies=migration_replies(**{"query-migrate": {"status": "failed", "error-desc": reason}}))
    async with Sandbox(fake_config(tmp_path), backend=fake) as sb:
        with pytest.raises(QMPError) as info:
            await sb.snapshot(tmp_path / "snap")
        assert sb.state is S.RUNNING
        assert "No space left on device" in str(info.value), str(info.value)
