"""Cold plug, hotplug and resize on real QEMU (TCG), checked from inside the guest."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from tests.conftest import assert_no_stray_tasks
from vmctl import ConfigError, NotSupported, Sandbox, SandboxConfig
from vmctl.devices import BlockDevice, NetworkDevice, VfioDevice, VhostUserBlockDevice, VhostUserNetDevice
from vmctl.machine.hotplug import DeviceState

pytestmark = pytest.mark.qemu
MakeConfig = Callable[..., SandboxConfig]


def make_disk(path: Path, label: str, size_mib: int = 8) -> Path:
    with path.open("wb") as f:
        f.write(label.encode() + b"\n")
        f.truncate(size_mib << 20)
    return path


@pytest.mark.parametrize("driver", ["virtio-blk", "virtio-scsi"])
async def test_three_disks_hot_added_at_once_and_removed(make_config: MakeConfig, tmp_path: Path, driver: str) -> None:
    disks = {n: make_disk(tmp_path / f"{n}.img", f"data-{n}", size_mib=8 + i) for i, n in enumerate("abc")}
    async with Sandbox(make_config(block_driver=driver, pci_bridges=3)) as sb:
        plugged = {}

        async def plug(name: str) -> None:
            plugged[name] = await sb.hotplug(BlockDevice(path=disks[name]))

        async with anyio.create_task_group() as tg:
            for name in disks:
                tg.start_soon(plug, name)
        prefix = "/dev/vd" if driver == "virtio-blk" else "/dev/sd"
        seen = {d.path: d.size_bytes for d in await sb.guest_block_devices()}
        for i, (name, record) in enumerate(sorted(plugged.items())):
            assert record.guest_path is not None and record.guest_path.startswith(prefix)
            head = await sb.exec(["head", "-n", "1", record.guest_path], check=True)
            assert head.text == f"data-{name}\n", "the guest name leads to the right disk"
            assert seen[record.guest_path] == (8 + i) << 20
        async with anyio.create_task_group() as tg:
            for record in plugged.values():
                tg.start_soon(sb.unplug, record)
        assert await sb.guest_block_devices() == []
        assert sb.devices == [] and all(r.state is DeviceState.REMOVED for r in plugged.values())
        await assert_no_stray_tasks_in(sb)


async def assert_no_stray_tasks_in(sb: Sandbox) -> None:
    assert sb.hypervisor.agent.pending == 0
    assert sb.pending_waiters == 0  # noqa: SLF001


async def test_cold_plugged_disk_is_visible_at_boot(make_config: MakeConfig, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "cold.img", "cold-data")
    config = make_config(devices=[BlockDevice(path=disk, id="cold", read_only=True)], block_driver="virtio-blk")
    async with Sandbox(config) as sb:
        blocks = await sb.guest_block_devices()
        assert [(b.name, b.serial) for b in blocks] == [("vda", "cold")]
        assert (await sb.exec(["head", "-n", "1", "/dev/vda"], check=True)).text == "cold-data\n"
        ro = await sb.exec(["cat", "/sys/block/vda/ro"], check=True)
        assert ro.text.strip() == "1"
        assert [d.id for d in sb.devices] == ["cold"] and not sb.devices[0].hotplugged
    await assert_no_stray_tasks()


async def test_user_mode_nic_hot_added_and_seen_by_the_guest(make_config: MakeConfig) -> None:
    async with Sandbox(make_config(pci_bridges=2)) as sb:
        nic = await sb.hotplug(NetworkDevice(hostfwd=("tcp:127.0.0.1:0-:23",)))
        assert nic.guest_path == "eth0"
        assert nic.device is not None
        mac = (await sb.exec(["cat", "/sys/class/net/eth0/address"], check=True)).text.strip()
        assert mac == nic.device.mac  # type: ignore[attr-defined]
        assert nic.address is not None and re.fullmatch(r"\d+\.\d+\.\d+\.\d+/\d+", nic.address), "DHCP, no hand-work"
        shown = (await sb.exec(["ip", "-4", "-o", "addr", "show", "dev", "eth0"], check=True)).text
        assert f" inet {nic.address} " in shown and [d.address for d in sb.devices if d.id == nic.id] == [nic.address]
        await sb.unplug(nic)
        assert (await sb.exec(["ls", "/sys/class/net"], check=True)).text.split() == ["lo"]


@pytest.mark.skipif(os.getuid() != 0 or not Path("/dev/net/tun").exists(), reason="creating a tap needs root")
async def test_tap_nic_where_the_host_allows_it(make_config: MakeConfig) -> None:
    async with Sandbox(make_config(pci_bridges=1, jail=False)) as sb:  # a jailed QEMU cannot make a tap
        nic = await sb.hotplug(NetworkDevice(backend="tap", tap_name="vmctl-t0"))
        assert nic.guest_path == "eth0"
        assert Path("/sys/class/net/vmctl-t0").exists(), "QEMU created the host side"
        await sb.unplug(nic)
        assert not Path("/sys/class/net/vmctl-t0").exists(), "and removed it with the netdev"


async def test_vcpus_up_and_down_in_the_guest(make_config: MakeConfig) -> None:
    async with Sandbox(make_config(vcpus=1, max_vcpus=3)) as sb:
        assert await sb.resize_vcpus(3) == (1, 3)
        assert await sb.guest_online_cpus() == [0, 1, 2]
        assert (await sb.exec(["nproc"], check=True)).text.strip() == "3"
        assert await sb.resize_vcpus(1) == (3, 1)
        assert await sb.guest_online_cpus() == [0]
        assert await sb.resize_vcpus(2) == (1, 2), "growing again reuses the offlined CPU, no new device_add"
        assert len([d for d in sb.devices if d.id.startswith("cpu")]) == 2
        with pytest.raises(ValueError, match="max_vcpus"):
            await sb.resize_vcpus(4)
        assert len(await sb.vcpu_thread_ids()) == 3


async def test_memory_grows_in_block_steps_and_shrinks(make_config: MakeConfig) -> None:
    async with Sandbox(make_config(memory_mib=256, memory_slots=2, max_memory_mib=768)) as sb:
        before = (await sb.guest_memory()).total_kib
        assert await sb.resize_memory(400) == 512, "rounded up to 128 MiB blocks"
        after = (await sb.guest_memory()).total_kib
        assert after - before >= 250 * 1024
        with pytest.raises(ValueError, match="max_memory_mib"):
            await sb.resize_memory(1024)
        assert await sb.resize_memory(256) == 256
        assert (await sb.guest_memory()).total_kib <= before + 1024


async def test_hotplug_refused_where_the_machine_cannot(make_config: MakeConfig, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "x.img", "x")
    async with Sandbox(make_config(disable_block_devices=True, memory_slots=0)) as sb:
        with pytest.raises(NotSupported):
            await sb.hotplug(BlockDevice(path=disk))
        with pytest.raises(NotSupported):
            await sb.resize_memory(512)
        assert sb.devices == []


async def test_device_paths_that_do_not_exist_are_refused(make_config: MakeConfig, tmp_path: Path) -> None:
    async with Sandbox(make_config()) as sb:
        with pytest.raises(ConfigError) as info:
            await sb.hotplug(VfioDevice(host_address="0000:7f:1f.7"))
        assert "vfio.host_address" in info.value.fields
        with pytest.raises(ConfigError, match="start the vhost-user backend"):
            await sb.hotplug(VhostUserBlockDevice(socket=tmp_path / "nope.sock"))
        with pytest.raises(ConfigError, match="vhost-user-net.socket"):
            await sb.hotplug(VhostUserNetDevice(socket=tmp_path / "nope.sock"))
        with pytest.raises(ConfigError, match="block.path"):
            await sb.hotplug(BlockDevice(path=tmp_path / "missing.img"))
        assert sb.devices == []
    with pytest.raises(ConfigError) as info:
        make_config(devices=[VfioDevice(host_address="bogus")])
    assert info.value.fields == ("devices[0].host_address",)


@pytest.mark.timeout(300)
async def test_two_vcpu_resizes_at_once_both_succeed(make_config) -> None:
    """resize_vcpus(n) and resize_vcpus(n + 1) at once: both succeed and the guest ends with the
    count of whichever finished last. Three rounds (2|3, 4|5, 6|7), each plugging new CPUs, since
    one round does not always hit the race. Base: both tasks plan from their own
    query-hotpluggable-cpus answer and one fails with QMPCommandError "Duplicate device ID 'cpuN'"."""
    async with Sandbox(make_config(vcpus=1, max_vcpus=7)) as sb:
        for low in (2, 4, 6):
            finished: list[int] = []
            errors: list[BaseException] = []

            async def resize(count: int, finished: list[int], errors: list[BaseException]) -> None:
                try:
                    await sb.resize_vcpus(count)
                    finished.append(count)
                except Exception as exc:  # noqa: BLE001 - collected and asserted below
                    errors.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(resize, low, finished, errors)
                tg.start_soon(resize, low + 1, finished, errors)
            assert errors == [], f"resize_vcpus({low}) | resize_vcpus({low + 1}): {errors!r}"
            online = await sb.guest_online_cpus()
            assert len(online) == finished[-1], f"guest has {online} online; the last resize to finish asked {finished[-1]}"
