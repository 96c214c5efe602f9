"""The fast boot path and the TCG translation cache: each piece reaches QEMU or the guest."""

from __future__ import annotations

import lzma
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from vmctl import ConfigError, Sandbox, SandboxConfig, guest
from vmctl.guest import vmlinux
from vmctl.hypervisors.base import RunPaths
from vmctl.hypervisors.cmdline import FAST_BOOT_PARAMS, build_command, kernel_cmdline

MakeConfig = Callable[..., SandboxConfig]
FDS = {"qmp": 3, "console": 4, "agent": 5}


def argv_for(config: SandboxConfig, tmp_path: Path, **resolved: Any) -> list[str]:
    values = {"accel": "tcg", "qemu_binary": Path(shutil.which("qemu-system-x86_64") or sys.executable), **resolved}
    return build_command(config.replace(**values), RunPaths(tmp_path, tmp_path), "t", FDS)


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_accel_option_carries_the_tb_size(make_config: MakeConfig, tmp_path: Path) -> None:
    config = make_config(tcg_tb_size_mib=64)
    assert config.tcg_tb_size_mib == 64
    argv = argv_for(config, tmp_path)
    assert option(argv, "-accel") == "tcg,tb-size=64"
    assert "accel=" not in option(argv, "-machine"), "-accel and -machine accel= do not mix"
    assert option(argv_for(config, tmp_path, accel="kvm"), "-accel") == "kvm"
    assert SandboxConfig.from_mapping(config.to_mapping()).tcg_tb_size_mib == 64
    with pytest.raises(ConfigError) as info:
        make_config(tcg_tb_size_mib=0)
    assert [p.field for p in info.value.problems] == ["tcg_tb_size_mib"]


def test_firmware_and_kernel_parameters(make_config: MakeConfig, tmp_path: Path) -> None:
    assert "-bios" not in argv_for(make_config(), tmp_path), "QEMU's own firmware (measured: qboot gains nothing)"
    line = kernel_cmdline(make_config().replace(accel="tcg"))
    assert all(p in line.split() for p in FAST_BOOT_PARAMS) and "tsc=reliable" in line.split()
    assert "tsc=reliable" not in kernel_cmdline(make_config().replace(accel="kvm"))
    from vmctl.devices import SerialPort

    assert "vmctl.sync_modules=1" in kernel_cmdline(make_config(devices=[SerialPort(name="x")]))
    template = make_config(boot_to_be_template=True, memory_path=tmp_path / "m", devices_state_path=tmp_path / "s")
    assert "vmctl.sync_modules=1" in kernel_cmdline(template), "clones must not inherit half-loaded modules"
    assert "vmctl.sync_modules=1" not in line
    assert make_config(kernel_params=["swiotlb=force"]).kernel_cmdline().endswith("swiotlb=force"), "yours come last"


def test_resumed_guests_go_without_the_initramfs(make_config: MakeConfig, tmp_path: Path) -> None:
    assert "-initrd" in argv_for(make_config(), tmp_path)
    resolved = make_config().replace(accel="tcg", qemu_binary=Path(sys.executable))
    restore = build_command(resolved, RunPaths(tmp_path, tmp_path), "t", FDS, incoming=True)
    assert "-initrd" not in restore and "-kernel" in restore, "the kernel stays: its option ROM is in the state"


def test_default_guest_kernel_is_an_unpacked_pvh_image(assets: guest.GuestAssets) -> None:
    assert assets.bzimage is not None and assets.kernel.name == "vmlinux"
    head = assets.kernel.read_bytes()
    assert vmlinux.has_pvh_entry(head)
    found = vmlinux.payload(assets.bzimage.read_bytes())
    assert found is not None and found[0] in ("lz4", "zstd", "gzip", "xz", "lzma")


@pytest.mark.skipif(shutil.which("lz4") is None, reason="needs the lz4 tool")
def test_lz4_legacy_fallback_matches_the_tool() -> None:
    data = b"".join(struct.pack("<I", i % 1000) + b"vmctl" * (i % 7) for i in range(20000))
    packed = subprocess.run(["lz4", "-l", "-c"], input=data, capture_output=True, check=True).stdout
    assert vmlinux.lz4_legacy_decompress(packed + struct.pack("<I", len(data))) == data


def test_an_xz_payload_with_the_kernels_size_after_it_unpacks() -> None:
    """Debian's generic kernel is xz: its payload ends with the 4-byte size, which is not a stream."""
    data = b"".join(struct.pack("<I", i) for i in range(50000))
    packed = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    assert vmlinux.decompress("xz", packed + struct.pack("<I", len(data))) == data


@pytest.mark.qemu
async def test_fast_boot_reaches_qemu_and_guest(make_config: MakeConfig) -> None:
    async with Sandbox(make_config(memory_mib=256, tcg_tb_size_mib=48)) as sb:
        assert option(sb.command_line, "-accel") == "tcg,tb-size=48"
        jit = await sb.hypervisor.qmp.execute("human-monitor-command", {"command-line": "info jit"})  # type: ignore[attr-defined]
        total = int(next(line for line in jit.splitlines() if line.startswith("gen code size")).split("/")[1])
        assert 40 << 20 < total <= 48 << 20, "QEMU's translation buffer has the configured size"
        cmdline = (await sb.exec(["cat", "/proc/cmdline"], check=True)).text.split()
        assert set(FAST_BOOT_PARAMS) <= set(cmdline) and "tsc=reliable" in cmdline
        clock = await sb.exec(["cat", "/sys/devices/system/clocksource/clocksource0/current_clocksource"])
        assert clock.text.strip() in ("tsc", "tsc-early")
        times = (await sb.exec(["cat", "/run/vmctl-boot-times"], check=True)).text
        assert times.startswith("init=") and " modules=" in times
        with anyio.fail_after(30):  # the drivers the agent does not need follow in the background
            while "pvpanic_pci" not in (await sb.exec(["cat", "/proc/modules"])).text:  # noqa: ASYNC110  (the last)
                await anyio.sleep(0.2)
        assert {"virtio_blk", "virtio_scsi", "virtio_net"} <= set((await sb.exec(["cut", "-d ", "-f1", "/proc/modules"])).text.split())
        assert sb.hypervisor.startup_timings.keys() >= {"spawned", "qmp", "agent_connected", "cont", "ready"}  # type: ignore[attr-defined]


@pytest.mark.qemu
@pytest.mark.parametrize("machine", ["q35", "microvm"])
async def test_guest_modprobe_brings_back_a_driver_with_what_it_needs(make_config: MakeConfig, machine: str) -> None:
    """The default guest's modprobe knows the drivers vmctl ships: after the background batch (which
    also loads the virtio transport the machine lacks), a driver unloaded with its dependencies
    comes back by name, and they with it."""
    async with Sandbox(make_config(machine=machine)) as sb:
        # the guest-side wait vmctl itself uses before a CPU or memory hotplug (vmctl.machine.resize)
        await sb.exec(["sh", "-c", "while [ -e /run/vmctl-modules-loading ]; do sleep 0.05; done"], check=True)
        loaded = set((await sb.exec(["cut", "-d ", "-f1", "/proc/modules"], check=True)).text.split())
        assert {"virtio_pci", "virtio_mmio", "virtio_console", "pvpanic_pci"} <= loaded
        vsock = ["vmw_vsock_virtio_transport", "vmw_vsock_virtio_transport_common", "vsock"]
        await sb.exec(["rmmod", *vsock], check=True)
        assert not set(vsock) & set((await sb.exec(["cut", "-d ", "-f1", "/proc/modules"])).text.split())
        await sb.exec(["modprobe", "vmw_vsock_virtio_transport"], check=True)
        assert set(vsock) <= set((await sb.exec(["cut", "-d ", "-f1", "/proc/modules"])).text.split())
