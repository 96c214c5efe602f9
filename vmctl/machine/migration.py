"""Snapshots and VM templates: what is saved, where, and how a saved guest is found again.

A snapshot directory holds the device and memory state (``state``) and ``sandbox.json``: the
effective config and every hot-plugged device with its place (disks, NICs, vCPUs, DIMMs), so a
restore recreates them on QEMU's command line where the saved state expects them. Shares are not
in the saved state (QEMU cannot save virtio-fs): they are unmounted and unplugged for the save,
and plugged back and mounted at their places once the restored guest runs. It is written
into a hidden sibling directory and renamed into place at the end: a failed or cancelled save
leaves nothing that looks like a snapshot.

A VM template keeps guest RAM in its memory file and its device state beside a record of its
config; a clone whose config differs is refused (naming each field), never cold-booted instead.

Overlay disks (copy-on-write over a read-only base) are part of what a guest is: a snapshot keeps
each overlay in ``overlays/<id>.qcow2``, a template next to its state file
(``<state>.<id>.qcow2``), and a restore or a clone starts from a copy of its own. They are copied
after the VM's state is saved, while QEMU has the disks flushed and inactive.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from vmctl.config import SandboxConfig
from vmctl.core import reaper
from vmctl.core.paths import remove_tree
from vmctl.errors import ConfigError, HostError, InvalidArgument, Problem, QMPError
from vmctl.hypervisors.base import Hypervisor, PlacedDevice
from vmctl.machine import overlays
from vmctl.machine.hotplug import PluggedDevice, row_device

SNAPSHOT_STATE = "state"
SNAPSHOT_RECORD = "sandbox.json"
SNAPSHOT_OVERLAYS = "overlays"
SNAPSHOT_VERSION = 1
_TEMPLATE_FIELDS = ("boot_to_be_template", "boot_from_template", "memory_path", "devices_state_path", "accel")


@dataclass(frozen=True)
class Snapshot:
    """A saved sandbox: its config, its state file and the devices it had hot-plugged."""

    directory: Path
    config: SandboxConfig
    devices: Sequence[dict[str, Any]] = field(default_factory=tuple)

    @property
    def state(self) -> Path:
        return self.directory / SNAPSHOT_STATE

    def overlay(self, dev_id: str) -> Path:
        """Where this snapshot keeps the overlay of disk ``dev_id``."""
        return self.directory / SNAPSHOT_OVERLAYS / f"{dev_id}.qcow2"

    #: the hot-plugged shares, unplugged for the save and plugged back after a restore
    shares: Sequence[dict[str, Any]] = field(default_factory=tuple)

    def restored_devices(self) -> list[PlacedDevice]:
        out = []
        for row in self.devices:
            dev_id, device, where, _ = row_device(row)
            out.append((dev_id, device, where))
        return out

    def restored_shares(self) -> list[PlacedDevice]:
        return [row_device(row)[:3] for row in self.shares]


def check_target(directory: str | Path) -> Path:
    target = Path(directory).expanduser().absolute()
    if target.exists():
        raise InvalidArgument(f"directory: {target} already exists; snapshots never overwrite")
    if not target.parent.is_dir():
        raise InvalidArgument(f"directory: {target.parent} does not exist")
    return target




async def write_snapshot(hv: Hypervisor, target: Path, *, sandbox_id: str, config: SandboxConfig,
                         devices: Sequence[PluggedDevice], shares: Sequence[PluggedDevice] = ()) -> Path:  # fmt: skip
    """Save a paused VM into ``target`` atomically (a hidden sibling renamed at the end).
    ``shares``: the shares set aside for the save (the hot-plugged ones are recorded)."""
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    reaper.add_dir(partial)  # a save cut short by our death leaves no half-written snapshot
    try:
        try:
            await hv.save_state(partial / SNAPSHOT_STATE, skip_shared=False)
        except QMPError as exc:
            if type(exc) is not QMPError:  # a command error or a lost connection says enough
                raise
            raise QMPError(f"snapshot to {target} failed: {exc}") from exc
        await overlays.save(((d.id, d.device) for d in devices), lambda i: partial / SNAPSHOT_OVERLAYS / f"{i}.qcow2")
        config, share_rows = standalone(config, shares)
        record = {"vmctl_snapshot": SNAPSHOT_VERSION, "sandbox_id": sandbox_id, "config": config.to_mapping(),
                  "devices": [d.to_row() for d in devices if d.hotplugged and d.device is not None],
                  "shares": share_rows}  # fmt: skip
        (partial / SNAPSHOT_RECORD).write_text(json.dumps(record, indent=2))
        partial.rename(target)
    finally:
        remove_tree(partial)
    return target


def standalone(config: SandboxConfig, shares: Sequence[PluggedDevice]) -> tuple[SandboxConfig, list[dict[str, Any]]]:
    """What a snapshot records of its config and its shares. A clone's snapshot holds all of its
    RAM, so it restores without the template (which may be gone by then): its config loses the
    template fields, and its shares (on the root ports any hot device takes, not ports of their
    own) are recorded with their places, as hot-plugged ones are."""
    if not config.boot_from_template:
        return config, [d.to_row() for d in shares if d.hotplugged]
    own = config.replace(boot_from_template=False, memory_path=None, devices_state_path=None,
                         devices=config.unshared_devices)  # fmt: skip
    return own, [d.to_row() for d in shares]


def read_snapshot(directory: str | Path) -> Snapshot:
    source = Path(directory).expanduser().absolute()
    try:
        record = json.loads((source / SNAPSHOT_RECORD).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"directory: {source} is not a vmctl snapshot ({exc})") from None
    if not isinstance(record, dict) or record.get("vmctl_snapshot") != SNAPSHOT_VERSION \
            or not (source / SNAPSHOT_STATE).is_file():  # fmt: skip
        raise InvalidArgument(f"directory: {source} is not a complete vmctl snapshot")
    devices, shares = record.get("devices", []), record.get("shares", [])
    for rows in (devices, shares):
        if not isinstance(rows, list) or not all(isinstance(d, dict) for d in rows):
            raise InvalidArgument(f"directory: {source} has a malformed device list")
    return Snapshot(source, SandboxConfig.from_mapping(record["config"]), tuple(devices), tuple(shares))


# -- templates ---------------------------------------------------------------------------------


def _template_record(state: Path) -> Path:
    return state.with_name(state.name + ".vmctl.json")


def _template_identity(config: SandboxConfig) -> dict[str, Any]:
    """What a clone must share with its template (everything but the template fields and the
    host-side ones: how QEMU is jailed and capped changes nothing the guest sees)."""
    out = {k: v for k, v in config.to_mapping().items() if k not in _TEMPLATE_FIELDS and k not in _HOST_SIDE}
    kept = [d for d in out.pop("devices", []) if d.get("type") != "share"]  # a clone's shares come once it runs
    return {**out, "devices": kept} if kept else out


_HOST_SIDE = frozenset({"jail", "memory_limit_mib", "console_log_limit_mib"})


def template_overlay(config: SandboxConfig, dev_id: str) -> Path:
    """Where a template keeps the overlay of disk ``dev_id`` (next to its device state)."""
    assert config.devices_state_path is not None
    state = config.devices_state_path
    return state.with_name(f"{state.name}.{dev_id}.qcow2")


async def write_template_record(config: SandboxConfig, devices: Sequence[PluggedDevice] = ()) -> None:
    """The template's config record and its overlay disks (after its state was saved)."""
    assert config.devices_state_path is not None
    await overlays.save(((d.id, d.device) for d in devices), lambda i: template_overlay(config, i))
    _template_record(config.devices_state_path).write_text(json.dumps(_template_identity(config)))


def template_clone_config(config: SandboxConfig) -> SandboxConfig:
    """A clone's config as it runs: the limits it leaves unset taken from its template, and
    refused, never cold-booted instead, if it drifted from the template in anything else."""
    assert config.devices_state_path is not None
    record = _template_record(config.devices_state_path)
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):
        raise ConfigError(
            [Problem("devices_state_path", f"no template record at {record}: boot the template again")]
        ) from None
    if not isinstance(saved, dict):
        raise ConfigError([Problem("devices_state_path", f"{record} is not a template record: boot the template again")])
    config = config.for_host(saved)
    mine = _template_identity(config)
    problems = [Problem(key, f"the template has {saved.get(key)!r}, this config {mine.get(key)!r}")
                for key in sorted(set(saved) | set(mine)) if saved.get(key) != mine.get(key)]  # fmt: skip
    if problems:
        raise ConfigError(problems)
    return config


async def copy_template_ram(template_ram: Path, own: Path) -> None:
    """A clone's own copy of its template's RAM (holes stay holes), for a clone whose RAM a
    share's virtiofsd must map: the template's file is mapped privately by every other clone."""
    try:
        await anyio.run_process(["cp", "--sparse=always", "--reflink=auto", "--", str(template_ram), str(own)])
    except subprocess.CalledProcessError as exc:
        why = exc.stderr.decode(errors="replace").strip()[-300:]
        raise HostError(f"could not copy the template's RAM ({template_ram}) for a clone with shares: {why}") from None
