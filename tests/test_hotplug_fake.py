"""The hotplug queue against the fake QMP peer: faults QEMU will not produce on demand."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from tests.conftest import assert_no_stray_tasks
from vmctl import Sandbox, SandboxFailed
from vmctl.devices import BlockDevice
from vmctl.machine.hotplug import DeviceState, HotplugError, HotplugTimeout
from vmctl.testing import FakeQemu, fake_config


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\0" * 4096)
    return path


async def test_unplug_never_acknowledged_times_out_and_a_late_event_reconciles(tmp_path: Path, disk: Path) -> None:
    fake = FakeQemu(unplug="never")
    async with Sandbox(fake_config(tmp_path, block_driver="virtio-blk", pci_bridges=1), backend=fake) as sb:
        plugged = await sb.hotplug(BlockDevice(path=disk))
        assert plugged.guest_path == "/dev/vda"
        with pytest.raises(HotplugTimeout):
            await sb.unplug(plugged, timeout=0.3)
        assert plugged.state is DeviceState.UNPLUG_PENDING and sb.devices == [plugged]
        with pytest.raises(HotplugError, match="no free PCIe root port"):
            await sb.hotplug(BlockDevice(path=disk))  # its one slot is still taken
        await fake.emit("DEVICE_DELETED", {"device": plugged.id, "path": f"/machine/peripheral/{plugged.id}"})
        with anyio.fail_after(5):
            while sb.devices:
                await anyio.lowlevel.checkpoint()
        assert plugged.state is DeviceState.REMOVED
        again = await sb.hotplug(BlockDevice(path=disk))  # the slot came back
        assert again.placement == plugged.placement
        deleted = [c["arguments"] for c in fake.received if c["execute"] == "blockdev-del"]
        assert {"node-name": f"{plugged.id}-fmt"} in deleted, "the late cleanup ran before the next request"
        assert sb.hypervisor.agent.pending == 0
    await assert_no_stray_tasks()


async def test_guest_refusal_is_a_clear_failure(tmp_path: Path, disk: Path) -> None:
    fake = FakeQemu(unplug="guest-error")
    async with Sandbox(fake_config(tmp_path, block_driver="virtio-blk"), backend=fake) as sb:
        plugged = await sb.hotplug(BlockDevice(path=disk))
        with pytest.raises(HotplugError, match="guest refused"):
            await sb.unplug(plugged)
        assert plugged.state is DeviceState.PLUGGED and sb.devices == [plugged]


async def test_fifty_concurrent_requests_complete_in_order(tmp_path: Path, disk: Path) -> None:
    fake = FakeQemu(delays={"device_add": 0.002})
    async with Sandbox(fake_config(tmp_path, block_driver="virtio-scsi"), backend=fake) as sb:
        results: dict[int, str] = {}

        async def plug(i: int) -> None:
            results[i] = (await sb.hotplug(BlockDevice(path=disk, id=f"d{i:02d}"))).guest_path or ""

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(plug, i)
        assert fake.added_devices() == [f"d{i:02d}" for i in range(50)]
        assert len(results) == 50 and all(path.startswith("/dev/sd") for path in results.values())
        assert sorted(d.placement.scsi_id for d in sb.devices) == list(range(50))  # type: ignore[type-var]

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(sb.unplug, f"d{i:02d}")
        assert sb.devices == []


async def test_cancelled_unplug_leaves_no_waiter_and_a_consistent_table(tmp_path: Path, disk: Path) -> None:
    fake = FakeQemu(unplug_delay=0.5)
    async with Sandbox(fake_config(tmp_path, block_driver="virtio-blk"), backend=fake) as sb:
        plugged = await sb.hotplug(BlockDevice(path=disk))
        with anyio.move_on_after(0.05):
            await sb.unplug(plugged)
        queue = sb._live().devices.queue  # noqa: SLF001
        assert queue.pending_waiters == 0
        assert plugged.state is DeviceState.UNPLUG_PENDING
        with anyio.fail_after(5):
            await sb.unplug(plugged)  # waiting again picks up the same removal
        assert sb.devices == []


async def test_failed_plug_rolls_back_backends(tmp_path: Path, disk: Path) -> None:
    from vmctl.testing import QmpErrorReply

    fake = FakeQemu(replies={"device_add": QmpErrorReply("GenericError", "Bus 'rp0' is full")})
    async with Sandbox(fake_config(tmp_path, block_driver="virtio-blk"), backend=fake) as sb:
        with pytest.raises(Exception, match="is full"):
            await sb.hotplug(BlockDevice(path=disk, id="d1"))
        assert sb.devices == []
        assert [c["arguments"]["node-name"] for c in fake.received if c["execute"] == "blockdev-del"] == [
            "d1-fmt", "d1-file",
        ]  # fmt: skip


async def test_sandbox_failure_wakes_hotplug_waiters(tmp_path: Path, disk: Path) -> None:
    fake = FakeQemu(unplug="never")
    async with Sandbox(fake_config(tmp_path, block_driver="virtio-blk"), backend=fake) as sb:
        plugged = await sb.hotplug(BlockDevice(path=disk))
        errors: list[Exception] = []

        async def unplug() -> None:
            try:
                await sb.unplug(plugged, timeout=30)
            except SandboxFailed as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(unplug)
            await anyio.wait_all_tasks_blocked()
            fake.crash(-9)
        assert len(errors) == 1
        assert sb.pending_waiters == 0  # noqa: SLF001


def test_path_only_events_name_the_device_not_its_children() -> None:
    from vmctl.machine.hotplug import _peripheral_id

    assert _peripheral_id("/machine/peripheral/disk1") == "disk1"
    assert _peripheral_id("/machine/peripheral/cpu1/lapic") == "cpu1"
    assert _peripheral_id("/machine/peripheral/disk1/virtio-backend") is None
    assert _peripheral_id("/machine/unattached/device[3]") is None


def test_devices_render_the_same_description_both_ways(disk: Path) -> None:
    import json

    from vmctl.devices import DeviceContext, NetworkDevice, Placement

    ctx = DeviceContext(block_driver="virtio-blk", cache_set=True, cache_direct=True)
    for device, where in ((BlockDevice(path=disk, read_only=True), Placement(bus="rp0")),
                          (NetworkDevice(hostfwd=("tcp:127.0.0.1:2222-:22",)), Placement(bus="rp1"))):  # fmt: skip
        args = device.cold_args("d0", ctx, where)
        commands = device.plug_commands("d0", ctx, where)
        cold = [json.loads(args[i + 1]) for i in range(0, len(args), 2)]
        assert cold == [dict(c.arguments) for c in commands], "cold plug and hotplug cannot drift apart"
        assert [c.name for c in commands][-1] == "device_add"
        deletes = device.cleanup_commands("d0", ctx)
        assert len(deletes) == len(commands) - 1


def test_tap_uses_vhost_net_unless_disabled() -> None:
    from vmctl.devices import DeviceContext, NetworkDevice

    tap = NetworkDevice(backend="tap", tap_name="tap0")
    assert tap.backends("n0", DeviceContext(vhost_net=True))[0].spec["vhost"] is True
    assert "vhost" not in tap.backends("n0", DeviceContext(vhost_net=False))[0].spec


async def test_two_plugs_of_one_id_cannot_corrupt_the_slots(tmp_path: Path, disk: Path) -> None:
    async with Sandbox(
        fake_config(tmp_path, block_driver="virtio-scsi"), backend=FakeQemu(delays={"device_add": 0.05})
    ) as sb:
        errors: list[Exception] = []

        async def plug() -> None:
            try:
                await sb.hotplug(BlockDevice(path=disk, id="data"))
            except HotplugError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(plug)
            tg.start_soon(plug)
        assert len(errors) == 1 and "already in use" in str(errors[0])
        queue = sb._live().devices.queue  # noqa: SLF001
        assert [d.id for d in sb.devices] == ["data"] and queue.slots.free("scsi") == 255
        other = await sb.hotplug(BlockDevice(path=disk, id="other"))
        assert other.placement.scsi_id == 1, "the first disk's target is still taken"


async def test_cancel_while_device_add_is_in_flight_keeps_the_table_true(tmp_path: Path, disk: Path) -> None:
    fake = FakeQemu(delays={"device_add": 0.3})
    async with Sandbox(fake_config(tmp_path, block_driver="virtio-blk"), backend=fake) as sb:
        with anyio.move_on_after(0.1):
            await sb.hotplug(BlockDevice(path=disk, id="late"))
        in_qemu = "late" in fake.process.devices
        assert ([d.id for d in sb.devices] == ["late"]) == in_qemu, "the table follows what QEMU did"
        if in_qemu:
            await sb.unplug("late")
        assert sb.devices == [] and "late" not in fake.process.devices
        again = await sb.hotplug(BlockDevice(path=disk, id="late"))  # no stale node names or slots
        assert again.guest_path == "/dev/vda"


def test_reserved_ids_and_no_format_guessing(tmp_path: Path, disk: Path) -> None:
    from vmctl.devices import DeviceContext

    assert "uses itself" in str(BlockDevice(path=disk, id="rp0").problems(DeviceContext()))
    assert "uses itself" in str(BlockDevice(path=disk, id="cpu1").problems(DeviceContext()))
    planted = tmp_path / "planted.img"
    planted.write_bytes(b"QFI\xfb" + b"\0" * 508)  # a guest could write a qcow2 header into its disk
    assert BlockDevice(path=planted).image_format() == "raw"
    qcow = BlockDevice(path=planted, format="qcow2").backends("d", DeviceContext())
    assert qcow[1].spec["backing"] is None


async def test_a_hotplug_timeout_covers_its_wait_in_the_queue(tmp_path) -> None:
    """A hotplug behind another one that QEMU is slow to answer gives up at its own timeout with
    HotplugTimeout. Before: the timeout covered only the acknowledgement, so the call waited for
    the queue (here 20 s) however short its timeout. FakeQemu: a slow reply on demand."""
    from vmctl import BlockDevice, HotplugTimeout

    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    fake = FakeQemu(delays={"device_add": 20})
    async with Sandbox(fake_config(tmp_path, block_driver="virtio-blk"), backend=fake) as sb:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: sb.hotplug(BlockDevice(path=disk, id="slow"), timeout=None))
            await anyio.wait_all_tasks_blocked()
            with anyio.fail_after(10), pytest.raises(HotplugTimeout):
                await sb.hotplug(BlockDevice(path=disk, id="queued", read_only=True), timeout=0.5)
            tg.cancel_scope.cancel()
        assert "queued" not in {d.id for d in sb.devices}
        assert sb.pending_waiters == 0
