"""The microvm backend and disk roots on real QEMU (TCG)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import assert_no_stray_tasks
from vmctl import BlockDevice, ConfigError, NotSupported, Sandbox, SandboxConfig, SandboxState, guest

pytestmark = pytest.mark.qemu
MakeConfig = Callable[..., SandboxConfig]


@pytest.fixture(scope="session")
def image_assets() -> guest.GuestAssets:
    import anyio

    return anyio.run(lambda: guest.ensure_default_assets(image=True))


def disks(tmp_path: Path) -> list[BlockDevice]:
    out = []
    for i, name in enumerate("ABC"):
        path = tmp_path / f"{name}.img"
        with path.open("wb") as f:
            f.write(f"disk-{name}\n".encode())
            f.truncate((8 + i) << 20)
        out.append(BlockDevice(path=path, id=f"disk{name}"))
    return out


async def test_microvm_boots_the_default_guest(make_config: MakeConfig) -> None:
    async with Sandbox(make_config(machine="microvm")) as sb:
        assert sb.state is SandboxState.RUNNING and sb.hypervisor.name == "microvm"
        r = await sb.exec(["sh", "-c", "ls /sys/bus/pci/devices 2>/dev/null | wc -l; cat /proc/cmdline"], check=True)
        count, cmdline = r.text.split("\n", 1)
        assert count.strip() == "0", "no PCI at all"
        assert "tsc_early_khz=" in cmdline
        await sb.pause()
        await sb.resume()
    assert sb.state is SandboxState.STOPPED
    await assert_no_stray_tasks()


async def test_initrd_root_disks_are_vda_vdb_vdc_in_order(make_config: MakeConfig, tmp_path: Path) -> None:
    async with Sandbox(make_config(machine="microvm", devices=disks(tmp_path))) as sb:
        assert [(d.id, d.guest_path) for d in sb.devices] == [
            ("diskA", "/dev/vda"), ("diskB", "/dev/vdb"), ("diskC", "/dev/vdc")]  # fmt: skip
        for name, dev in (("A", "vda"), ("B", "vdb"), ("C", "vdc")):
            head = await sb.exec(["head", "-n", "1", f"/dev/{dev}"], check=True)
            assert head.text == f"disk-{name}\n"


async def test_disk_root_shifts_the_others_to_vdb_vdc_vdd(
    make_config: MakeConfig, image_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    assert image_assets.image is not None
    root = tmp_path / "root.img"
    shutil.copyfile(image_assets.image, root)
    config = make_config(machine="microvm", image=root, devices=disks(tmp_path))
    async with Sandbox(config) as sb:
        assert [(d.id, d.guest_path) for d in sb.devices] == [
            ("root", "/dev/vda"), ("diskA", "/dev/vdb"), ("diskB", "/dev/vdc"), ("diskC", "/dev/vdd")]  # fmt: skip
        mounts = (await sb.exec(["cat", "/proc/mounts"], check=True)).text
        assert "/dev/vda / ext4" in mounts
        assert (await sb.exec(["head", "-n", "1", "/dev/vdd"], check=True)).text == "disk-C\n"


@pytest.mark.parametrize("machine", ["q35", "microvm"])
async def test_both_backends_boot_from_the_ext4_image(
    make_config: MakeConfig, image_assets: guest.GuestAssets, tmp_path: Path, machine: str
) -> None:
    assert image_assets.image is not None
    root = tmp_path / "root.img"
    shutil.copyfile(image_assets.image, root)
    async with Sandbox(make_config(machine=machine, image=root)) as sb:
        assert (await sb.exec(["cat", "/etc/vmctl-disk-root"])).exit_code == 0, (
            "running from the disk, not the initramfs"
        )
        await sb.exec(["sh", "-c", "echo persisted > /root/note; sync"], check=True)
    async with Sandbox(make_config(machine=machine, image=root)) as sb:
        assert (await sb.exec(["cat", "/root/note"], check=True)).text == "persisted\n"


async def test_hotplug_on_microvm_is_refused_and_changes_nothing(make_config: MakeConfig, tmp_path: Path) -> None:
    async with Sandbox(make_config(machine="microvm", vcpus=1, max_vcpus=2)) as sb:
        caps = sb.capabilities()
        assert not (caps.block_hotplug or caps.cpu_hotplug or caps.memory_hotplug or caps.network_hotplug)
        with pytest.raises(NotSupported):
            await sb.hotplug(disks(tmp_path)[0])
        with pytest.raises(NotSupported):
            await sb.resize_memory(512)
        with pytest.raises(NotSupported):
            await sb.resize_vcpus(2)
        assert sb.devices == [] and sb.state is SandboxState.RUNNING
        assert await sb.guest_block_devices() == []


async def test_machine_is_checked_against_the_qemu_binary(make_config: MakeConfig, tmp_path: Path) -> None:
    fake_qemu = tmp_path / "old-qemu"
    fake_qemu.write_text('#!/bin/sh\necho "Supported machines are:"\necho "pc   Standard PC"\n')
    fake_qemu.chmod(0o755)
    sb = Sandbox(make_config(machine="microvm", qemu_binary=fake_qemu))
    with pytest.raises(ConfigError) as info:
        async with sb:
            pass
    assert info.value.fields == ("machine",) and "not offered" in str(info.value)
