"""Config fields reach QEMU and the guest: checked through QMP and inside the guest, not by argv."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from vmctl import (
    GuestError,
    QMPError,
    ReadyTimeout,
    Sandbox,
    SandboxConfig,
    SandboxFailed,
    SandboxState,
    SharedDirectory,
    VfioDevice,
)
from vmctl.hypervisors.placement import vfio_hotplug_place

from .conftest import virtiofsd_processes

pytestmark = pytest.mark.qemu
MakeConfig = Callable[..., SandboxConfig]


async def qmp(sb: Sandbox, command: str, **arguments: Any) -> Any:
    return await sb.hypervisor.qmp.execute(command, arguments or None)  # type: ignore[attr-defined]


async def test_fields_reach_qemu_and_guest(make_config: MakeConfig) -> None:
    config = make_config(
        vcpus=2, max_vcpus=4, memory_mib=256, memory_slots=4, max_memory_mib=1024, pci_bridges=3,
        io_threads=True, mem_prealloc=True, mlock=True, debug=True,
        kernel_params={"vmctl.test": "42"}, hypervisor_params={"rtc": "base=2020-06-01T00:00:00"},
    )  # fmt: skip
    async with Sandbox(config) as sb:
        cmdline = (await sb.exec(["cat", "/proc/cmdline"], check=True)).text
        assert "vmctl.test=42" in cmdline and " debug" in cmdline and "quiet" not in cmdline
        assert (await sb.exec(["date", "+%Y"], check=True)).text.strip() == "2020"
        assert await sb.guest_online_cpus() == [0, 1]
        assert len(await qmp(sb, "query-hotpluggable-cpus")) == 4
        summary = await qmp(sb, "query-memory-size-summary")
        assert summary["base-memory"] == 256 * 1024 * 1024
        memdevs = await qmp(sb, "query-memdev")
        assert memdevs[0]["prealloc"] is True and memdevs[0]["size"] == 256 * 1024 * 1024
        peripherals = {p["name"] for p in await qmp(sb, "qom-list", path="/machine/peripheral")}
        assert {"rp0", "rp1", "rp2", "scsi0", "vser0"} <= peripherals
        assert [t["id"] for t in await qmp(sb, "query-iothreads")] == ["iothread0"]
        status = Path(f"/proc/{sb.pid}/status").read_text()
        locked_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmLck")))
        assert locked_kib >= 256 * 1024, "mlock: guest memory is locked"
        rng = await sb.exec(["cat", "/sys/class/misc/hw_random/rng_current"], check=True)
        assert rng.text.startswith("virtio_rng")
        caps = sb.capabilities()
        assert caps.cpu_hotplug and caps.memory_hotplug and caps.block_hotplug
        assert sb.config.accel == "tcg" and sb.config.max_vcpus == 4


async def test_pc_machine_and_no_block_devices(make_config: MakeConfig) -> None:
    async with Sandbox(make_config(machine="pc", disable_block_devices=True, pci_bridges=1)) as sb:
        product = await sb.exec(["cat", "/sys/class/dmi/id/product_name"], check=True)
        assert "i440FX" in product.text
        peripherals = {p["name"] for p in await qmp(sb, "qom-list", path="/machine/peripheral")}
        assert "br0" in peripherals and "scsi0" not in peripherals
        assert not sb.capabilities().block_hotplug
        # max_vcpus left unset: the host's CPU count, worked out where the sandbox started
        assert sb.config.max_vcpus == len(os.sched_getaffinity(0))
        assert len(await qmp(sb, "query-hotpluggable-cpus")) == sb.config.max_vcpus


async def test_custom_qemu_binary_is_the_one_running(make_config: MakeConfig, tmp_path: Path) -> None:
    link = tmp_path / "my-qemu"
    link.symlink_to("/usr/bin/qemu-system-x86_64")
    async with Sandbox(make_config().with_custom_assets(qemu_binary=link)) as sb:
        assert sb.command_line[0] == str(link)
        assert os.path.samefile(f"/proc/{sb.pid}/exe", "/usr/bin/qemu-system-x86_64")  # (jailed: bound there)


async def test_image_root_reaches_qemu_and_a_kernel_that_cannot_mount_it_fails_fast(
    make_config: MakeConfig, tmp_path: Path, runtime_dir: Path
) -> None:
    """Without vmctl's initramfs this kernel cannot reach a virtio disk (its drivers are modules):
    it panics and resets, and the sandbox fails at once instead of waiting for its timeout."""
    image = tmp_path / "root.img"
    image.write_bytes(b"\0" * (8 << 20))
    config = make_config(initrd=None, image=image, block_driver="virtio-scsi",
                         block_cache_set=True, block_cache_direct=False, block_cache_noflush=True)  # fmt: skip
    sb = Sandbox(config, start_timeout=60)
    seen: list[Any] = []
    opened: list[str] = []  # what QEMU holds open (a jailed QEMU gets its disks as descriptors)

    async def inspect_block() -> None:
        while True:
            hv = sb._hv  # noqa: SLF001 - peeking while the start is still under way
            if hv is not None and hv.qmp.connected:  # type: ignore[attr-defined]
                seen.extend(await hv.qmp.execute("query-block"))  # type: ignore[attr-defined]
                opened.extend(os.readlink(fd) for fd in Path(f"/proc/{sb.pid}/fd").iterdir())
                return
            await anyio.sleep(0.01)

    errors: list[SandboxFailed] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(inspect_block)
        try:
            async with sb:
                pytest.fail("this guest cannot become ready")
        except SandboxFailed as exc:
            errors.append(exc)
        finally:
            tg.cancel_scope.cancel()
    assert len(errors) == 1 and "reset" in str(errors[0])
    assert sb.state is SandboxState.FAILED
    root = next(b for b in seen if b.get("qdev") == "root" or b["inserted"]["node-name"] == "root-fmt")
    name = root["inserted"]["file"]
    assert name.endswith(str(image)) or name.startswith("/dev/fdset/") and str(image) in opened
    assert root["inserted"]["cache"] == {"writeback": True, "direct": False, "no-flush": True}


async def test_a_guest_that_never_readies_times_out_naming_the_accelerator(make_config: MakeConfig) -> None:
    sb = Sandbox(make_config(kernel_params={"rdinit": "/bin/sh"}), start_timeout=8)  # a shell waiting on the console
    with pytest.raises(ReadyTimeout) as info:
        async with sb:
            pytest.fail("no agent, no ready")
    assert "accel=tcg" in str(info.value) and "start_timeout" in str(info.value)
    assert sb.state is SandboxState.FAILED and "not ready within 8" in sb.failure


async def test_machine_accelerators_realtime_and_vfio_on_the_root_bus_reach_qemu(make_config: MakeConfig) -> None:
    config = make_config(machine_accelerators="usb=off,nvdimm,dump-guest-core=off", realtime=True, mlock=False,
                         hotplug_vfio_on_root_bus=True)  # fmt: skip
    async with Sandbox(config) as sb:
        assert await qmp(sb, "qom-get", path="/machine", property="usb") is False
        assert await qmp(sb, "qom-get", path="/machine", property="nvdimm") is True
        assert await qmp(sb, "qom-get", path="/machine", property="dump-guest-core") is False
        status = Path(f"/proc/{sb.pid}/status").read_text()
        locked_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmLck")))
        assert locked_kib == 0, "realtime without mlock: guest memory stays swappable"
        # VFIO onto the root bus: the command vmctl sends names pcie.0, and q35's root bus cannot take it
        where = vfio_hotplug_place(sb.config)
        command = VfioDevice(host_address="0000:00:02.0").frontend("vfio0", sb.config.device_context(), where)
        assert command["bus"] == "pcie.0"
        with pytest.raises(QMPError, match="pcie.0"):
            await qmp(sb, "device_add", **command)
    async with Sandbox(make_config(machine="pc", hotplug_vfio_on_root_bus=True)) as sb:
        command = VfioDevice(host_address="0000:00:02.0").frontend("vfio0", sb.config.device_context(),
                                                                   vfio_hotplug_place(sb.config))  # fmt: skip
        assert command["bus"] == "pci.0"
        with pytest.raises(QMPError) as info:  # pc's root bus hot-plugs: what fails is this host's missing IOMMU group
            await qmp(sb, "device_add", **command)
        assert "pci.0" not in str(info.value) and "vfio" in str(info.value).lower()


def hook_tree(top: Path, hooks: dict[str, str]) -> Path:
    for rel, body in hooks.items():
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
    return top


async def test_guest_hooks_run_at_start_and_before_a_clean_stop(make_config: MakeConfig, tmp_path: Path,
                                                                runtime_dir: Path) -> None:  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    hooks = hook_tree(tmp_path / "hooks", {
        "start/10-hello": 'echo "hello from the start hook of $VMCTL_SANDBOX_ID"; echo started > /tmp/started',
        "start/20-second": "test -e /tmp/started",  # in name order
        "start/README": "exit 1",  # not executable: skipped
        "stop/10-bye": "echo stopped-cleanly > /out/bye"})  # fmt: skip
    (hooks / "start" / "README").chmod(0o644)
    shares = [SharedDirectory(host_path=hooks, guest_path="/hooks"),
              SharedDirectory(host_path=out, guest_path="/out", read_only=False)]  # fmt: skip
    async with Sandbox(make_config(guest_hook_path="/hooks", devices=shares)) as sb:
        assert (await sb.exec(["cat", "/tmp/started"], check=True)).text == "started\n"
        assert any(f"hello from the start hook of {sb.id}" in line for line in sb.console_tail)
        assert not (out / "bye").exists()
    assert (out / "bye").read_text() == "stopped-cleanly\n", "the stop hook ran before the guest went"

    failing = hook_tree(tmp_path / "failing", {"start/10-ok": "true", "start/20-broken": "echo no; exit 7",
                                               "start/30-never": "touch /tmp/never"})  # fmt: skip
    sb = Sandbox(make_config(guest_hook_path="/hooks", devices=[SharedDirectory(host_path=failing, guest_path="/hooks")]))
    with pytest.raises(GuestError, match=r"'20-broken'.*exit code 7"):
        async with sb:
            pytest.fail("a failing start hook fails the start")
    assert sb.state in (SandboxState.FAILED, SandboxState.STOPPED)
    assert virtiofsd_processes() == []
