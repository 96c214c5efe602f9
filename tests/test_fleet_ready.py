"""Fleets that are usable before every boot finished: as_ready() hands out members as they become
ready, restart() replaces one member's sandbox; ordering, failures and cancellation on the fake,
one small real fleet."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from tests.conftest import assert_no_stray_tasks, qemu_processes
from tests.test_cancellation import Sweep, cancel_after_steps
from vmctl import FleetError, SandboxConfig, SandboxState, guest
from vmctl.fleets.fleet import Fleet, FleetEvent, FleetEventKind
from vmctl.testing import FakeQemu, fake_config

E = FleetEventKind


def backends(*fakes: FakeQemu) -> object:
    """A backend that gives the n-th sandbox started the n-th fake (members start in order)."""
    queue = iter(fakes)

    def backend(*args: object, **kwargs: object) -> object:
        return next(queue)(*args, **kwargs)

    return backend


async def test_as_ready_yields_members_in_the_order_they_become_ready(tmp_path: Path) -> None:
    slow, fast, middle = FakeQemu(ready_delay=0.6), FakeQemu(ready_delay=0.05), FakeQemu(ready_delay=0.3)
    started = anyio.current_time()
    order, first_at = [], None
    async with Fleet(fake_config(tmp_path), size=3, wait=False, backend=backends(slow, fast, middle)) as fleet:  # type: ignore[arg-type]
        assert anyio.current_time() - started < 0.1, "wait=False returns before the boots finish"
        async for member in fleet.as_ready():
            first_at = first_at or anyio.current_time() - started
            assert member.sandbox.state is SandboxState.RUNNING and member.boot_seconds is not None
            assert (await member.sandbox.exec(["echo", member.sandbox.id])).stdout == f"{member.sandbox.id}\n".encode()
            order.append(member.index)
        assert [i for i, _ in enumerate(fleet.members)] == [0, 1, 2]
        again = [m.index async for m in fleet.as_ready()]
    assert order == [1, 2, 0] and again == order
    assert first_at is not None and first_at < 0.3, "work starts at the first ready member, not the slowest"
    assert all(sb.state is SandboxState.STOPPED for sb in fleet.sandboxes)
    await assert_no_stray_tasks()


async def test_members_that_fail_to_boot_are_not_yielded(tmp_path: Path) -> None:
    good, bad = FakeQemu(), FakeQemu(ready_delay=None)
    async with Fleet(fake_config(tmp_path), size=3, wait=False, start_timeout=0.3,
                     backend=backends(good, bad, good)) as fleet:  # type: ignore[arg-type]  # fmt: skip
        yielded = [m.index async for m in fleet.as_ready()]
        assert sorted(yielded) == [0, 2]
        assert [m.index for m in fleet.failed] == [1] and "did not report ready" in str(fleet.members[1].boot_error)
        results = await fleet.map(lambda sb: sb.exec(["true"]))
        assert [o.ok for _, o in results] == [True, False, True]
    async with Fleet(fake_config(tmp_path), size=3, wait=True, start_timeout=0.3,
                     backend=backends(good, bad, good)) as fleet:  # type: ignore[arg-type]  # fmt: skip
        assert sorted([m.index async for m in fleet.as_ready()]) == [0, 2], "after the boots: the ready ones"
    await assert_no_stray_tasks()


async def test_fail_fast_makes_as_ready_raise_at_the_first_boot_failure(tmp_path: Path) -> None:
    bad, slow = FakeQemu(ready_delay=None), FakeQemu(ready_delay=30)
    with anyio.fail_after(10):
        async with Fleet(fake_config(tmp_path), size=2, wait=False, fail_fast=True, start_timeout=0.2,
                         backend=backends(bad, slow)) as fleet:  # type: ignore[arg-type]  # fmt: skip
            with pytest.raises(FleetError, match="failed to boot"):
                async for _member in fleet.as_ready():
                    pytest.fail("nothing was ready")
    await assert_no_stray_tasks()


async def test_map_waits_for_members_still_booting(tmp_path: Path) -> None:
    async with Fleet(fake_config(tmp_path), size=2, wait=False, backend=FakeQemu(ready_delay=0.2)) as fleet:
        results = await fleet.map(lambda sb: sb.exec(["echo", "hi"]))
    assert [o.value.stdout for _, o in results] == [b"hi\n", b"hi\n"]  # type: ignore[union-attr]


async def test_restart_replaces_a_member_with_a_new_sandbox_of_the_same_id(tmp_path: Path) -> None:
    events: list[FleetEvent] = []
    fake = FakeQemu()
    async with Fleet(fake_config(tmp_path), size=2, backend=fake, on_event=events.append) as fleet:
        old = fleet.sandboxes[1]
        events.clear()
        new = await fleet.restart(1)
        assert new is fleet.sandboxes[1] and new is not old and new.id == old.id == "fleet-1"
        assert old.state is SandboxState.STOPPED and new.state is SandboxState.RUNNING
        assert fleet.members[1].restarts == 1 and fleet.members[1].boot_seconds is not None
        assert (await new.exec(["echo", "again"])).stdout == b"again\n"
        assert fleet.sandboxes[0].state is SandboxState.RUNNING, "the others go on"
        assert [(e.kind, e.sandbox_id) for e in events] == [
            (E.RESTARTING, "fleet-1"), (E.STOPPED, "fleet-1"), (E.BOOTING, "fleet-1"), (E.READY, "fleet-1")]  # fmt: skip
        results = await fleet.map(lambda sb: sb.exec(["true"]))
        assert [sb for sb, _ in results] == [fleet.sandboxes[0], new]
    assert new.state is SandboxState.STOPPED
    await assert_no_stray_tasks()


async def test_restart_retries_a_failed_member_and_reports_a_failed_reboot(tmp_path: Path) -> None:
    good, bad = FakeQemu(), FakeQemu(ready_delay=None)
    async with Fleet(fake_config(tmp_path), size=2, start_timeout=0.2,
                     backend=backends(good, bad, good, bad)) as fleet:  # type: ignore[arg-type]  # fmt: skip
        assert [m.index for m in fleet.failed] == [1]
        assert (await fleet.restart(1)).state is SandboxState.RUNNING, "a failed member can boot again"
        assert fleet.failed == []
        with pytest.raises(FleetError, match="fleet-0 failed to boot again"):
            await fleet.restart(0)
        assert [m.index for m in fleet.failed] == [0]
    await assert_no_stray_tasks()


async def test_one_restart_at_a_time_per_member(tmp_path: Path) -> None:
    restarting = anyio.Event()

    def on_event(event: FleetEvent) -> None:
        if event.kind is FleetEventKind.RESTARTING:
            restarting.set()

    async with Fleet(fake_config(tmp_path), size=1, backend=FakeQemu(ready_delay=0.2), on_event=on_event) as fleet:
        async with anyio.create_task_group() as tg:
            tg.start_soon(fleet.restart, 0)
            await restarting.wait()
            with pytest.raises(FleetError, match="already restarting"):
                await fleet.restart(0)
        assert fleet.members[0].restarts == 1 and fleet.sandboxes[0].state is SandboxState.RUNNING
    with pytest.raises(FleetError, match="not open"):
        await fleet.restart(0)


async def test_cancelling_as_ready_and_restart_at_every_step(tmp_path: Path, runtime_dir: Path) -> None:
    """A fleet's life with wait=False (iterate as_ready, exec, restart one member) cancelled after
    k steps: nothing is left, every fake QEMU ended, and what the fleet reports stays coherent."""
    config = fake_config(tmp_path)
    sweep = Sweep(tmp_path, runtime_dir)

    async def trial(steps: int) -> bool:
        fake = FakeQemu()
        fleets: list[Fleet] = []

        async def life() -> None:
            async with Fleet(config, size=2, wait=False, backend=fake) as fleet:
                fleets.append(fleet)
                async for member in fleet.as_ready():
                    await member.sandbox.exec(["true"])
                await fleet.restart(0)
                await fleet.sandboxes[0].exec(["true"])

        finished = await cancel_after_steps(life, steps)
        assert all(p.returncode is not None for p in fake.processes), f"k={steps}: a fake QEMU outlived the fleet"
        for fleet in fleets:
            assert all(sb.state in (SandboxState.STOPPED, SandboxState.CREATED) for sb in fleet.sandboxes), (
                f"k={steps}: {[sb.state for sb in fleet.sandboxes]}"
            )
        return finished

    last = await sweep.run(trial)
    assert last > 50


async def test_cancelling_a_restart_leaves_the_fleet_whole(tmp_path: Path, runtime_dir: Path) -> None:
    """A restart cancelled at any step: afterwards the member is booting or ready again (its new
    sandbox goes on in the fleet), or stopping / stopped if the cancel came before the new one
    started, and then a new restart brings it back."""
    async with Fleet(fake_config(tmp_path), size=1, backend=FakeQemu(ready_delay=0.01)) as fleet:
        for steps in range(0, 300, 5):
            await cancel_after_steps(lambda: fleet.restart(0), steps)
            member = fleet.members[0]
            assert not member._restarting
            if member.sandbox.state in (SandboxState.STOPPING, SandboxState.STOPPED):
                await fleet.restart(0)  # cancelled before the new one started: restart it again
            else:  # a new one is booting (or ready): it goes on in the fleet
                with anyio.fail_after(5):
                    await member.booted.wait()  # type: ignore[union-attr]
            assert member.sandbox.state is SandboxState.RUNNING
            assert (await fleet.sandboxes[0].exec(["true"])).ok
    assert list(runtime_dir.iterdir()) == []
    await assert_no_stray_tasks()


@pytest.mark.qemu
async def test_a_real_fleet_hands_out_members_as_they_become_ready_and_restarts_one(
    assets: guest.GuestAssets, runtime_dir: Path
) -> None:
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, memory_mib=256)
    events: list[FleetEvent] = []
    async with Fleet(config, size=2, max_concurrent_starts=2, template=True, wait=False,
                     on_event=events.append) as fleet:  # fmt: skip
        ready = []
        async for member in fleet.as_ready():
            await member.sandbox.exec(["sh", "-c", "echo mine > /root/x"], check=True)
            ready.append(member.index)
        assert sorted(ready) == [0, 1]
        old = fleet.sandboxes[0]
        new = await fleet.restart(0, timeout=120)
        assert new.id == old.id and old.state is SandboxState.STOPPED
        assert (await new.exec(["cat", "/root/x"])).exit_code == 1, "a new guest, not the old one"
        assert (await fleet.sandboxes[1].exec(["cat", "/root/x"], check=True)).text == "mine\n"
    assert [e.kind for e in events if e.sandbox_id == "fleet-0"][-5:] == [
        E.RESTARTING, E.STOPPED, E.BOOTING, E.READY, E.STOPPED]  # fmt: skip
    assert qemu_processes(str(runtime_dir)) == []
