"""Where each device sits and what vmctl fills in for it: ids, SCSI targets, a serial port's
socket and a disk's overlay in the run directory, a NIC's stable MAC. The command line (cold
plug) and the device table (hotplug) both come through here, so the two cannot disagree."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from vmctl.config import SandboxConfig
from vmctl.devices import (
    BlockDevice,
    Device,
    NetworkDevice,
    Placement,
    SerialPort,
    VhostUserNetDevice,
    virtiofs_share,
)
from vmctl.hypervisors.base import PlacedDevice, RunPaths

ROOT_DISK_ID = "root"


def stable_mac(sandbox_id: str, dev_id: str) -> str:
    """A stable, locally administered MAC per sandbox and device (QEMU's 52:54:00 prefix)."""
    digest = hashlib.sha256(f"{sandbox_id}/{dev_id}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def id_prefix(device: Device) -> str:
    return {"block": "disk", "network": "net", "vsock": "vsock", "vfio": "vfio", "vhost-user-block": "vublk",
            "vhost-user-net": "vunet", "serial": "port", "share": "share", "cpu": "cpu", "memory": "dimm"}[device.kind]  # fmt: skip


def with_defaults(device: Device, dev_id: str, sandbox_id: str, run_dir: Path) -> Device:
    """Fill what a device leaves to vmctl: a serial port's socket and a disk's overlay (in the run
    directory), a NIC's MAC (stable per sandbox and device). Cold plug and hotplug both come through here."""
    if virtiofs_share(device):  # vmctl listens there for virtiofsd (never a path the user names)
        return dataclasses.replace(device, socket=run_dir / "q" / f"{dev_id}.fs.sock")
    if isinstance(device, SerialPort) and device.socket is None:
        return dataclasses.replace(device, socket=run_dir / "q" / f"{dev_id}.sock")  # QEMU makes it: its dir
    if isinstance(device, NetworkDevice | VhostUserNetDevice) and device.mac is None:
        return dataclasses.replace(device, mac=stable_mac(sandbox_id, dev_id))
    if isinstance(device, BlockDevice) and device.overlay and device.overlay_file is None:
        return dataclasses.replace(device, overlay_file=run_dir / f"{dev_id}.overlay.qcow2")
    return device
def vfio_hotplug_place(config: SandboxConfig) -> Placement | None:
    """Where a hot-plugged VFIO device goes: the root bus with ``hotplug_vfio_on_root_bus`` (the
    original's option, for devices that must sit there; QEMU hot-plugs onto ``pci.0`` of a pc
    machine, and says so when ``pcie.0`` of q35 cannot), else a free root port (None)."""
    if not config.hotplug_vfio_on_root_bus:
        return None
    return Placement(bus="pcie.0" if config.machine == "q35" else "pci.0")


def clone_ram(run_dir: Path) -> Path:
    """A clone's own copy of its template's memory file, when a share must map its RAM."""
    return run_dir / "clone.ram"


def share_port(index: int) -> str:
    """The root port of the config's ``index``-th share (q35): its own, so that the share can be
    unplugged for a snapshot and plugged back where the guest knew it."""
    return f"fs{index}"


def cold_share_ports(config: SandboxConfig) -> list[str]:
    """The root ports the command line adds for the config's shares: none on a template clone,
    whose guest never saw them (its shares go to ``pci_bridges`` ports once it runs)."""
    if config.machine != "q35" or config.boot_from_template:
        return []
    return [share_port(i) for i in range(sum(virtiofs_share(d) for d in config.devices))]


def cold_devices(config: SandboxConfig, paths: RunPaths, sandbox_id: str) -> list[PlacedDevice]:
    """Ids and places of the config's devices, the same on every call (the sandbox's device
    table is filled from this too). PCI devices sit on the root bus (shares on q35 on a root port
    of their own, see share_port), SCSI disks take targets from 0 up, serial ports without a socket get one in the run directory, NICs without a MAC
    get a stable one."""
    ctx = config.device_context()
    used = {d.id for d in config.devices if d.id} | {ROOT_DISK_ID}
    counters: dict[str, int] = {}
    scsi = 0
    out: list[PlacedDevice] = []
    listed = list(config.devices)
    if config.image is not None:  # the root disk comes first, so the guest names it vda / sda
        listed.insert(0, BlockDevice(path=config.image, id=ROOT_DISK_ID, overlay=config.image_overlay))
    for device in listed:
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
        elif virtiofs_share(device) and ctx.machine == "q35" and not config.boot_from_template:
            where = Placement(bus=share_port(len([p for p in out if virtiofs_share(p[1])])))
        out.append((dev_id, with_defaults(device, dev_id, sandbox_id, paths.run_dir), where))
    return out
