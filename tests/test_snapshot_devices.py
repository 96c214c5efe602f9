"""Snapshots of sandboxes with hot-plugged devices: a restore brings back every device the sandbox
had (disks, NICs, vCPUs, DIMMs), at the same place, so QEMU accepts the saved state and the guest
finds its devices as it left them; the restored sandbox can go on plugging and unplugging."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from vmctl import BlockDevice, NetworkDevice, Sandbox, SandboxConfig, SandboxState

pytestmark = pytest.mark.qemu

MIB = 1024 * 1024


def make_disk(path: Path, mib: int = 8) -> Path:
    with path.open("wb") as f:
        f.truncate(mib * MIB)
    return path


def hotplug_config(make_config: Callable[..., SandboxConfig]) -> SandboxConfig:
    return make_config(vcpus=1, max_vcpus=3, memory_slots=4, max_memory_mib=1024, pci_bridges=3)


async def read_disk(sb: Sandbox, guest_path: str, size: int) -> str:
    """The first ``size`` bytes of a guest disk, read from the device (not the page cache)."""
    result = await sb.exec(["sh", "-c", f"sync; echo 3 > /proc/sys/vm/drop_caches; head -c {size} {guest_path}"],
                           check=True)  # fmt: skip
    return result.stdout.decode(errors="replace")


async def write_disk(sb: Sandbox, guest_path: str, text: str) -> None:
    await sb.exec(["sh", "-c", f"printf %s {text} | dd of={guest_path} conv=fsync 2>/dev/null"], check=True)


def rows(sb: Sandbox) -> dict[str, tuple[str, object, str | None]]:
    """The disks and NICs in the device table: id -> (kind, placement, guest name)."""
    return {d.id: (d.device.kind, d.placement, d.guest_path) for d in sb.devices
            if d.device is not None and d.device.kind in ("block", "network")}  # fmt: skip


def resized(sb: Sandbox) -> list[tuple[str, str]]:
    """The CPUs and DIMMs in the device table (resize makes them rows like any device)."""
    return sorted((d.id, d.device.kind) for d in sb.devices if d.device is not None and d.device.kind in ("cpu", "memory"))


async def test_restore_brings_back_every_hotplugged_device(
    make_config: Callable[..., SandboxConfig], tmp_path: Path
) -> None:
    scsi_img, blk_img = make_disk(tmp_path / "scsi.img"), make_disk(tmp_path / "blk.img")
    snap = tmp_path / "snap"
    async with Sandbox(hotplug_config(make_config)) as sb:
        scsi = await sb.hotplug(BlockDevice(path=scsi_img))  # the default driver: virtio-scsi
        blk = await sb.hotplug(BlockDevice(path=blk_img, driver="virtio-blk"))  # on a PCIe root port
        nic = await sb.hotplug(NetworkDevice())
        assert await sb.resize_vcpus(2) == (1, 2)
        assert await sb.resize_memory(384) == 384
        assert scsi.guest_path and blk.guest_path and nic.guest_path
        await write_disk(sb, scsi.guest_path, "scsi-before")
        await write_disk(sb, blk.guest_path, "blk-before")
        memory_before = (await sb.guest_memory()).total_kib
        table_before = rows(sb)
        cpus_and_dimms = resized(sb)
        assert [kind for _, kind in cpus_and_dimms] == ["cpu", "memory"]
        assert set(table_before) == {scsi.id, blk.id, nic.id}
        await sb.snapshot(snap)

    # Before the fix QEMU exits with code 1 here: "Unknown ramblock" / "Unknown savevm section".
    async with Sandbox.restore(snap) as sb2:
        assert sb2.state is SandboxState.RUNNING

        # vmctl's device table: the same disks and NIC, with the same ids, places and guest names
        assert rows(sb2) == table_before
        assert resized(sb2) == cpus_and_dimms
        restored = {d.id: d for d in sb2.devices}
        assert isinstance(restored[scsi.id].device, BlockDevice) and restored[scsi.id].device.path == scsi_img
        assert isinstance(restored[nic.id].device, NetworkDevice) and restored[nic.id].device.mac == nic.device.mac

        # the guest: its disks (wired to the same image files), its NIC, its CPUs, its memory
        names = {d.path for d in await sb2.guest_block_devices()}
        assert {scsi.guest_path, blk.guest_path} <= names
        assert await read_disk(sb2, scsi.guest_path, 11) == "scsi-before"
        assert await read_disk(sb2, blk.guest_path, 10) == "blk-before"
        await write_disk(sb2, blk.guest_path, "blk-after!")
        assert blk_img.read_bytes()[:10] == b"blk-after!", "the restored virtio-blk disk is not blk.img"
        mac = await sb2.exec(["cat", f"/sys/class/net/{nic.guest_path}/address"], check=True)
        assert mac.text.strip() == nic.device.mac
        assert await sb2.guest_online_cpus() == [0, 1]
        assert (await sb2.guest_memory()).total_kib == memory_before

        # and it goes on: new devices get free places and new ids, resizes work both ways
        more_blk = await sb2.hotplug(BlockDevice(path=make_disk(tmp_path / "more-blk.img"), driver="virtio-blk"))
        more_scsi = await sb2.hotplug(BlockDevice(path=make_disk(tmp_path / "more-scsi.img")))
        assert more_blk.id not in table_before and more_scsi.id not in table_before
        assert more_blk.placement != blk.placement and more_scsi.placement != scsi.placement
        assert await sb2.resize_vcpus(3) == (2, 3)
        assert await sb2.resize_memory(256) == 256, "the restored DIMM can be removed again"

        # the restored devices are still hot-unpluggable
        for device in (scsi, blk, nic, more_blk, more_scsi):
            await sb2.unplug(device.id)
        assert rows(sb2) == {}
        left = {d.path for d in await sb2.guest_block_devices()}
        assert not {scsi.guest_path, blk.guest_path} & left


async def test_snapshot_of_a_restored_sandbox_keeps_its_devices(
    make_config: Callable[..., SandboxConfig], tmp_path: Path
) -> None:
    blk_img = make_disk(tmp_path / "blk.img")
    async with Sandbox(hotplug_config(make_config)) as sb:
        blk = await sb.hotplug(BlockDevice(path=blk_img, driver="virtio-blk"))
        nic = await sb.hotplug(NetworkDevice())
        assert await sb.resize_vcpus(2) == (1, 2)
        assert await sb.resize_memory(384) == 384
        assert blk.guest_path is not None
        await write_disk(sb, blk.guest_path, "first")
        table = rows(sb)
        await sb.snapshot(tmp_path / "snap1")

    async with Sandbox.restore(tmp_path / "snap1") as sb2:
        assert rows(sb2) == table
        await sb2.snapshot(tmp_path / "snap2")

    async with Sandbox.restore(tmp_path / "snap2") as sb3:
        assert sb3.state is SandboxState.RUNNING
        assert rows(sb3) == table
        assert await read_disk(sb3, blk.guest_path, 5) == "first"
        assert await sb3.guest_online_cpus() == [0, 1]
        assert await sb3.resize_memory(256) == 256
        await sb3.unplug(nic.id)
        await sb3.unplug(blk.id)
        assert rows(sb3) == {}
