"""QEMU's argument list for a config: one pure function, so every field's effect is testable.

The monitor, console and agent chardevs take listening sockets vmctl created itself and passes
by file descriptor: the socket files exist (mode 0600 inside a 0700 directory) before QEMU runs,
and connecting never races QEMU's start-up.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping
from pathlib import Path

from vmctl import host
from vmctl.config import SandboxConfig
from vmctl.devices import Device, Placement, SerialPort, id_prefix
from vmctl.hypervisors.base import RunPaths

AGENT_PORT_NAME = "org.vmctl.agent"
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def kernel_cmdline(config: SandboxConfig) -> str:
    """Our base parameters first, the user's after them (so the user's win)."""
    base = ["console=ttyS0", "panic=1", "reboot=t"]
    base += ["debug", "vmctl.debug=1"] if config.debug else ["quiet"]
    if config.memory_hotplug_possible:
        base.append("memhp_default_state=online_movable")  # hot-added memory stays removable
    if config.image is not None:
        root = "/dev/sda" if config.block_driver == "virtio-scsi" else "/dev/vda"
        base += [f"root={root}", "rw", "rootwait"]
    user = config.kernel_cmdline()
    return " ".join(base + ([user] if user else []))


def opt(value: object) -> str:
    """A value safe inside a QEMU option list (commas doubled)."""
    return str(value).replace(",", ",,")


def image_format(path: Path) -> str:
    with path.open("rb") as f:
        return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"


def build_command(config: SandboxConfig, paths: RunPaths, sandbox_id: str, fds: Mapping[str, int]) -> list[str]:
    """The full argv (binary first) for ``config``; ``fds`` maps qmp/console/agent to listening fds."""
    assert config.qemu_binary is not None and config.accel in ("kvm", "tcg"), "resolve the config first"
    c = config
    machine = [c.machine, f"accel={c.accel}", "memory-backend=mem0"]
    argv = [str(c.qemu_binary), "-name", f"{sandbox_id},debug-threads=on", "-S", "-nodefaults",
            "-no-user-config", "-display", "none", "-msg", "timestamp=on",
            "-machine", ",".join(machine)]  # fmt: skip
    if c.accel == "kvm":
        nested = host.running_in_vm() and not c.disable_nesting_checks
        argv += ["-cpu", "host,pmu=off" if nested else "host"]
    argv += ["-smp", f"{c.vcpus},maxcpus={c.max_vcpus},sockets=1,dies=1,cores={c.max_vcpus},threads=1"]
    argv += _memory(c)
    if c.mlock:
        argv += ["-overcommit", "mem-lock=on"]
    argv += ["-kernel", str(c.kernel), "-append", kernel_cmdline(c)]
    if c.initrd is not None:
        argv += ["-initrd", str(c.initrd)]
    if c.firmware is not None:
        argv += ["-bios", str(c.firmware)]
    argv += [
        "-chardev", f"socket,id=qmp,fd={fds['qmp']},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"socket,id=console0,fd={fds['console']},server=on,wait=off,"
                    f"logfile={opt(paths.console_log)},logappend=on",
        "-serial", "chardev:console0",
        "-chardev", f"socket,id=agent0,fd={fds['agent']},server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser0",
        "-device", f"virtserialport,bus=vser0.0,chardev=agent0,name={AGENT_PORT_NAME}",
        "-object", f"rng-random,id=rng0,filename={opt(c.entropy_source)}",
        "-device", "virtio-rng-pci,rng=rng0",
        "-device", "pvpanic-pci",
        "-action", "reboot=shutdown,panic=pause",
    ]  # fmt: skip
    argv += _bridges(c)
    if c.io_threads:
        argv += ["-object", "iothread,id=iothread0"]
    argv += _block(c)
    for dev_id, device, where in cold_devices(c, paths):
        argv += device.cold_args(dev_id, c.device_context(), where)
    if c.vsock:
        argv += ["-device", f"vhost-vsock-pci,id=vsock0,guest-cid={secrets.randbelow(2**31) + 3}"]
    if c.boot_from_template:
        argv += ["-incoming", "defer"]
    argv += ["-sandbox", SECCOMP]
    argv += c.qemu_extra_args()
    return argv


def cold_devices(config: SandboxConfig, paths: RunPaths) -> list[tuple[str, Device, Placement]]:
    """Ids and places of the config's devices, the same on every call (the sandbox's device
    table is filled from this too). PCI devices sit on the root bus, SCSI disks take targets
    from 0 up, serial ports without a socket get one in the run directory."""
    ctx = config.device_context()
    used = {d.id for d in config.devices if d.id}
    counters: dict[str, int] = {}
    scsi = 0
    out = []
    for device in config.devices:
        dev_id = device.id
        while dev_id is None or (dev_id in used and device.id is None):
            prefix = id_prefix(device)
            counters[prefix] = counters.get(prefix, -1) + 1
            candidate = f"{prefix}{counters[prefix]}"
            dev_id = None if candidate in used else candidate
        used.add(dev_id)
        where = Placement()
        if device.needs_slot(ctx) == "scsi":
            where = Placement(scsi_id=scsi)
            scsi += 1
        if isinstance(device, SerialPort) and device.socket is None:
            device = dataclasses.replace(device, socket=paths.run_dir / f"{dev_id}.sock")
        out.append((dev_id, device, where))
    return out


def _memory(c: SandboxConfig) -> list[str]:
    size = f"{c.memory_mib}M"
    mem = [f"size={size}"]
    if c.memory_slots > 0 and (c.max_memory_mib or 0) > c.memory_mib:
        mem += [f"slots={c.memory_slots}", f"maxmem={c.max_memory_mib}M"]
    if c.boot_to_be_template or c.boot_from_template:
        share = "on" if c.boot_to_be_template else "off"
        backend = f"memory-backend-file,id=mem0,size={size},mem-path={opt(c.memory_path)},share={share}"
    elif c.huge_pages:
        backend = f"memory-backend-file,id=mem0,size={size},mem-path=/dev/hugepages,share=on"
    else:
        backend = f"memory-backend-ram,id=mem0,size={size}"
    if c.mem_prealloc:
        backend += ",prealloc=on"
    return ["-m", ",".join(mem), "-object", backend]


def _bridges(c: SandboxConfig) -> list[str]:
    out: list[str] = []
    for i in range(c.pci_bridges):
        if c.machine == "q35":
            out += ["-device", f"pcie-root-port,id=rp{i},bus=pcie.0,chassis={i + 1}"]
        else:
            out += ["-device", f"pci-bridge,id=br{i},bus=pci.0,chassis_nr={i + 1}"]
    return out


def _block(c: SandboxConfig) -> list[str]:
    if c.disable_block_devices:
        return []
    iothread = ",iothread=iothread0" if c.io_threads else ""
    out: list[str] = []
    if c.block_driver == "virtio-scsi":
        out += ["-device", f"virtio-scsi-pci,id=scsi0{iothread}"]
    if c.image is not None:
        drive = [f"file={opt(c.image)}", "if=none", "id=rootfs", f"format={image_format(c.image)}"]
        if c.block_cache_set:
            drive += [f"cache.direct={'on' if c.block_cache_direct else 'off'}",
                      f"cache.no-flush={'on' if c.block_cache_noflush else 'off'}"]  # fmt: skip
        out += ["-drive", ",".join(drive)]
        if c.block_driver == "virtio-scsi":
            out += ["-device", "scsi-hd,bus=scsi0.0,drive=rootfs,id=rootdisk"]
        else:
            out += ["-device", f"virtio-blk-pci,drive=rootfs,id=rootdisk{iothread}"]
    return out
