"""The one owner of a sandbox's devices: its table, its hotplug queue and every rule about them.

It decides what may be plugged (capabilities), fills what the user left out (ids, MACs, socket
paths), knows how the guest finds each device (virtio disks by serial, SCSI disks by target,
NICs by MAC), confirms cold devices at start, deletes the backends of devices removed while
nobody waited, resizes vCPUs and memory, and rebuilds the table of a sandbox it did not start
(attach, snapshot restore). A caller's ``timeout`` bounds the whole call, the wait for the queue
included; the guest side is given a little longer, so the host's deadline is the one that fires.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any

import anyio

from vmctl.agent.client import AgentClient
from vmctl.config import SandboxConfig
from vmctl.core.qmp import QmpEvent
from vmctl.core.waiting import Failure, deadline
from vmctl.devices import (
    RESIZE_KINDS,
    BlockDevice,
    Device,
    NetworkDevice,
    Placement,
    SharedDirectory,
    VfioDevice,
    VhostUserBlockDevice,
    VhostUserNetDevice,
    virtiofs_share,
)
from vmctl.errors import ConfigError, GuestError, HotplugError, HotplugTimeout, InvalidArgument, NotSupported
from vmctl.hypervisors.base import Capabilities, Hypervisor, PlacedDevice
from vmctl.hypervisors.placement import ROOT_DISK_ID, id_prefix, vfio_hotplug_place, with_defaults
from vmctl.machine import shares
from vmctl.machine.hotplug import HotplugQueue, PluggedDevice, SlotAllocator, row_device
from vmctl.machine.resize import Resizer

GUEST_GRACE = 5.0  # the guest-side wait outlasts the caller's deadline by this much
DEFAULT_GUEST_WAIT = 30.0

# The disk behind a PCI function ($1), waited for up to $2 tenths of a second. A vhost-user disk
# has no serial of its own (the backend answers one for all of them), but QEMU knows its address.
_PCI_DISK = r"""
n=0
while [ "$n" -lt "$2" ]; do
    for b in /sys/bus/pci/devices/$1/virtio*/block/*; do [ -e "$b" ] && { echo "${b##*/}"; exit 0; }; done
    n=$((n + 1)); sleep 0.1
done
exit 1
"""

# The IPv4 address of NIC $1 (MAC $3), waited for up to $2 tenths of a second while the guest's
# init asks for a lease (it marks each NIC it saw in /run); a guest without that init is not waited for.
_NIC_ADDRESS = r"""
n=0
while [ "$n" -lt "$2" ]; do
    a=$(ip -4 -o addr show dev "$1" 2>/dev/null | sed -n 's/.* inet \([0-9.\/]*\) .*/\1/p')
    [ -n "$a" ] && { echo "$a"; exit 0; }
    [ -e "/run/vmctl-net.$3" ] || [ "$n" -lt 20 ] || exit 1
    n=$((n + 1)); sleep 0.1
done
exit 1
"""
#: how long a NIC's lease may take (the user-mode stack answers at once; passt too)
NIC_ADDRESS_WAIT = 15.0


def _pci_address(devices: list[dict[str, Any]], dev_id: str) -> str | None:
    """``query-pci``'s address of ``dev_id`` (the bus numbers the guest programmed)."""
    for device in devices:
        if device.get("qdev_id") == dev_id:
            return f"0000:{device['bus']:02x}:{device['slot']:02x}.{device['function']:x}"
        found = _pci_address((device.get("pci_bridge") or {}).get("devices") or [], dev_id)
        if found:
            return found
    return None


def disk_name(prefix: str, index: int) -> str:
    """Linux's disk names: vda..vdz, vdaa..vdaz, vdba..."""
    letters = ""
    index += 1
    while index > 0:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return prefix + letters


class DeviceManager:
    """Devices of one running sandbox (cold, hot, CPUs and DIMMs alike)."""

    def __init__(self, hv: Hypervisor, agent: AgentClient, *, sandbox_id: str, cold: Sequence[PlacedDevice],
                 spawn: Callable[[Callable[[], Coroutine[Any, Any, None]]], None], log: Any) -> None:  # fmt: skip
        self._hv = hv
        self._agent = agent
        self._sandbox_id = sandbox_id
        self._log = log
        config = hv.effective_config()
        self._config: SandboxConfig = config
        self.queue = HotplugQueue(hv.execute, config.device_context(), SlotAllocator(config.machine, config.pci_bridges))
        for dev_id, device, where in cold:
            self.queue.record(dev_id, device, where, hotplugged=False)
        self.queue.on_late_cleanup = lambda: spawn(self._late_cleanup)
        #: devices with host helpers running (a share's virtiofsd), ended once QEMU drops the device
        self._with_helpers: set[str] = set()
        self._resizer = Resizer(self.queue, agent, hv.execute, config)

    # -- the table ---------------------------------------------------------------------------

    @property
    def devices(self) -> list[PluggedDevice]:
        return list(self.queue.devices.values())

    @property
    def pending_waiters(self) -> int:
        return self.queue.pending_waiters

    def hotplugged_rows(self) -> list[dict[str, Any]]:
        """What a detached record or a snapshot keeps: every hot-plugged device and its place."""
        return [r.to_row() for r in self.devices if r.hotplugged and r.device is not None]

    def adopt(self, rows: Iterable[Mapping[str, Any]], present: set[str] | None = None) -> None:
        """Enter devices another controller plugged (attach) or a snapshot recreated (restore);
        with ``present`` (what QEMU lists), rows QEMU no longer has are dropped."""
        for row in rows:
            dev_id, device, where, guest_path = row_device(row)
            if present is not None and dev_id not in present:
                self._log.warning("recorded device is gone from QEMU; dropped", device=dev_id)
                continue
            record = self.queue.record(dev_id, device, where, hotplugged=True, guest_path=guest_path)
            record.address = row.get("address")

    def note_cold_shares_mounted(self) -> None:
        """An attached sandbox's config shares: mounted at their guest paths by the controller
        that started it (its record is written once the start, mounts included, is done)."""
        for record in self.devices:
            if isinstance(record.device, SharedDirectory) and not record.hotplugged and record.guest_path is None:
                record.guest_path = record.device.guest_path

    def on_event(self, event: QmpEvent) -> None:
        self.queue.on_event(event)

    def fail_all(self, failure: Failure) -> None:
        self.queue.fail_all(failure)

    async def _late_cleanup(self) -> None:
        try:
            await self.queue.flush_late_cleanup()
        except Exception as exc:  # noqa: BLE001 - QEMU went away meanwhile: its backends went with it
            self._log.debug("late backend cleanup skipped", error=str(exc))
        for dev_id in sorted(self._with_helpers - set(self.queue.devices)):  # an unplug QEMU confirmed late
            self._with_helpers.discard(dev_id)
            await self._hv.stop_helpers(dev_id)

    # -- how the guest finds a device ----------------------------------------------------------

    def _guest_key(self, record: PluggedDevice) -> tuple[str, str] | None:
        device = record.device
        if isinstance(device, BlockDevice):
            if device.effective_driver(self.queue.ctx) == "virtio-scsi":
                return "scsi", str(record.placement.scsi_id)
            return "virtio", record.id
        if isinstance(device, NetworkDevice | VhostUserNetDevice):
            return "net", str(device.mac)
        if isinstance(device, VhostUserBlockDevice):
            return "pci", record.id
        if isinstance(device, SharedDirectory):
            return "share", device.guest_path
        return None

    async def _guest_name(self, record: PluggedDevice, wait: float) -> str | None:
        key = self._guest_key(record)
        if key is None:
            return None
        if key[0] == "share":
            assert isinstance(record.device, SharedDirectory)
            return await shares.mount(self._agent, record.id, record.device, wait, msize_9p=self._config.msize_9p)
        if key[0] == "pci":
            address = None
            for bus in await self._hv.execute("query-pci"):
                address = address or _pci_address(bus.get("devices", []), record.id)
            if address is None:
                return None
            result = await self._agent.exec(["sh", "-c", _PCI_DISK, "sh", address, str(int(wait * 10))],
                                            timeout=wait + GUEST_GRACE)  # fmt: skip
            return f"/dev/{result.text.strip()}" if result.ok and result.text.strip() else None
        found = await self._agent.wait_block_device(*key, timeout=wait)
        return found.removeprefix("/dev/") if found and key[0] == "net" else found

    async def _note_address(self, record: PluggedDevice) -> None:
        """A NIC's address once the guest holds a lease (None where nobody asks for one)."""
        if record.guest_path is None or not isinstance(record.device, NetworkDevice | VhostUserNetDevice):
            return
        tenths = str(int(NIC_ADDRESS_WAIT * 10))
        result = await self._agent.exec(["sh", "-c", _NIC_ADDRESS, "sh", record.guest_path, tenths,
                                         str(record.device.mac)], timeout=NIC_ADDRESS_WAIT + GUEST_GRACE)  # fmt: skip
        record.address = result.text.strip() or None if result.ok else None
        if record.address is None:
            self._log.info("no address for the NIC (the guest asked for no lease, or got none)", device=record.id)

    async def confirm_cold(self) -> None:
        """Ask the guest what it calls each cold-plugged disk and NIC.

        virtio-mmio disks have no address the guest could be told about: they get names in the
        order they were attached (the root disk first), so vmctl predicts the name and the agent
        confirms it by serial. A mismatch fails the start rather than mounting the wrong disk.
        """
        mmio_index = 0
        for record in self.devices:
            if self._guest_key(record) is None:
                continue
            actual = await self._guest_name(record, DEFAULT_GUEST_WAIT)
            device = record.device
            if isinstance(device, BlockDevice) and device.effective_driver(self.queue.ctx) == "virtio-mmio":
                predicted = f"/dev/{disk_name('vd', mmio_index)}"
                mmio_index += 1
                if actual != predicted:
                    raise GuestError(f"disk {record.id} ({device.path}) was predicted to be {predicted} "
                                     f"but the guest shows it as {actual or 'nothing'}")  # fmt: skip
            elif actual is None:
                raise GuestError(f"the guest does not show the cold-plugged device {record.id}")
            record.guest_path = actual
            await self._note_address(record)

    # -- hotplug -----------------------------------------------------------------------------

    def _check_pluggable(self, device: Device, caps: Capabilities) -> None:
        if device.kind in RESIZE_KINDS:
            raise InvalidArgument(f"{device.kind} devices come from resize_vcpus / resize_memory, not hotplug")
        allowed = {"block": caps.block_hotplug, "network": caps.network_hotplug,
                   "vsock": caps.network_hotplug, "serial": True,
                   "share": caps.share_hotplug}.get(device.kind, caps.network_hotplug)  # fmt: skip
        if not allowed:
            raise NotSupported(f"this sandbox cannot hotplug {device.kind} devices (see capabilities())")
        if isinstance(device, SharedDirectory) and not device.over_virtiofs:
            raise NotSupported(shares.NINE_P_COLD_ONLY)
        if isinstance(device, BlockDevice) and device.overlay:
            raise NotSupported("overlay disks are cold-plugged only: put it in SandboxConfig(devices=[...]), "
                               "or hotplug a disk without overlay=True")  # fmt: skip
        problems = device.problems(self.queue.ctx)
        if problems:
            raise ConfigError(problems)

    async def hotplug(self, device: Device, timeout: float | None) -> PluggedDevice:
        self._check_pluggable(device, self._hv.capabilities())
        if isinstance(device, SharedDirectory) and device.member_template()[1]:  # {id}: this sandbox's
            device = shares.member_share(device, "share.host_path", sandbox_id=self._sandbox_id)
        dev_id = device.id or self.queue.new_id(id_prefix(device))
        device = with_defaults(device, dev_id, self._sandbox_id, self._hv.paths.run_dir)
        wait = (timeout or DEFAULT_GUEST_WAIT) + (GUEST_GRACE if timeout else 0)
        where = vfio_hotplug_place(self._config) if isinstance(device, VfioDevice) else None
        with deadline(timeout, f"hotplug of {dev_id}", HotplugTimeout):
            return await self._plug(device, dev_id, self._confirmer(wait), where)

    def _confirmer(self, wait: float) -> Callable[[PluggedDevice], Coroutine[Any, Any, str | None]]:
        async def confirm(record: PluggedDevice) -> str | None:
            if self._guest_key(record) is None:
                return None
            found = await self._guest_name(record, wait)
            if found is None:
                raise HotplugError(f"QEMU plugged {record.id} but the guest never showed it")
            record.guest_path = found
            await self._note_address(record)
            return found

        return confirm

    async def _plug(self, device: Device, dev_id: str, confirm: Callable[[PluggedDevice], Coroutine[Any, Any, str | None]],
                    placement: Placement | None = None, hotplugged: bool = True) -> PluggedDevice:  # fmt: skip
        """Plug with the device's host helpers (a share's virtiofsd) started first, and stopped
        again if the device did not get in."""
        if dev_id in self.queue.devices:  # the queue refuses it; nothing of ours may start first
            return await self.queue.plug(device, dev_id, confirm)
        if dev_id in self._with_helpers:  # a concurrent plug of the same id is starting them
            raise HotplugError(f"device id {dev_id!r} is already in use in this sandbox")
        self._with_helpers.add(dev_id)
        try:
            await self._hv.start_helpers(dev_id, device)
            return await self.queue.plug(device, dev_id, confirm, placement=placement, hotplugged=hotplugged)
        except BaseException:
            if dev_id not in self.queue.devices:  # not plugged (a plug QEMU confirms later keeps them)
                self._with_helpers.discard(dev_id)
                with anyio.CancelScope(shield=True):
                    await self._hv.stop_helpers(dev_id)
            raise

    # -- shares around a saved state -----------------------------------------------------------

    async def plug_deferred(self, deferred: Sequence[tuple[str, Device, Placement | None, bool]]) -> None:
        """Plug and mount the shares a restored or cloned guest gets once it runs."""
        for dev_id, device, where, hotplugged in deferred:
            problems = device.problems(self.queue.ctx)
            if problems:
                raise ConfigError(problems)
            with deadline(DEFAULT_GUEST_WAIT, f"plugging share {dev_id} back", HotplugTimeout):
                await self._plug(device, dev_id, self._confirmer(DEFAULT_GUEST_WAIT), where, hotplugged)

    async def set_aside_shares(self, timeout: float | None) -> list[PluggedDevice]:
        """Unmount and unplug every share for a save (QEMU cannot save virtio-fs); the rows, to
        give to :meth:`plug_back` afterwards. A share the guest is using refuses it before
        anything is touched, with the guest's processes named; a failure part-way plugs back
        what was already set aside."""
        nine_p = [r.id for r in self.devices if isinstance(r.device, SharedDirectory) and not r.device.over_virtiofs]
        if nine_p:
            raise NotSupported(f"a sandbox with 9p shares ({', '.join(nine_p)}) cannot be saved: QEMU cannot save a "
                               "mounted 9p export, and a 9p share cannot be plugged back; use protocol='virtiofs'")  # fmt: skip
        taken = [r for r in self.devices if virtiofs_share(r.device)]
        if taken and not self._hv.can_start_helpers():
            raise NotSupported(f"this controller attached to the sandbox and cannot start virtiofsd for its shares "
                               f"({', '.join(r.id for r in taken)}) again after a save; unplug them first, or save "
                               "it from the controller that started it")  # fmt: skip
        for record in taken:
            if not record.hotplugged and self.queue.ctx.pci and record.placement.bus is None:
                raise NotSupported(f"share {record.id} sits on the root bus of this {self._config.machine} machine and "
                                   "cannot be unplugged for the save: use machine='q35' (the default)")  # fmt: skip
        if taken:
            await shares.check_unused(self._agent, [(r.id, r.device) for r in taken if r.device is not None], timeout)
        out: list[PluggedDevice] = []
        try:
            for record in taken:
                await self.unplug(record.id, timeout)
                out.append(record)
        except BaseException:
            await self.plug_back(out, quietly=True)
            raise
        return out

    async def plug_back(self, records: Sequence[PluggedDevice], *, quietly: bool = False) -> None:
        """Plug and mount set-aside shares where they were (shielded: it runs on every path).
        ``quietly``: after another failure, which is the one to report; this one is logged."""
        with anyio.CancelScope(shield=True):
            try:
                await self.plug_deferred([(r.id, r.device, r.placement, r.hotplugged)
                                          for r in records if r.device is not None])  # fmt: skip
            except Exception as exc:
                if not quietly:
                    raise
                self._log.warning("could not plug a share back after a failed save", error=str(exc))

    async def unplug(self, device: PluggedDevice | str, timeout: float | None) -> None:
        dev_id = device if isinstance(device, str) else device.id
        record = self.queue.devices.get(dev_id)
        if record is not None and record.device is not None and record.device.kind in RESIZE_KINDS:
            raise InvalidArgument(f"{dev_id} is a CPU or memory device: use resize_vcpus / resize_memory")
        if dev_id == ROOT_DISK_ID:
            raise InvalidArgument("the root disk cannot be unplugged from a running sandbox")
        key = self._guest_key(record) if record is not None else None
        if record is not None and isinstance(record.device, SharedDirectory):
            if not record.device.over_virtiofs:
                raise NotSupported(shares.NINE_P_COLD_ONLY)
            await shares.unmount(self._agent, dev_id, record.device, timeout)
        with deadline(timeout, f"unplug of {dev_id}", lambda why: HotplugTimeout(
                f"{why}; it stays unplug-pending and is cleaned up if QEMU confirms later")):  # fmt: skip
            await self.queue.unplug(dev_id)
            # A SCSI disk leaves QEMU before the guest has let it go: wait for the guest as well.
            # (PCI devices are only deleted after the guest released them, so the event suffices.)
            wait = (timeout or DEFAULT_GUEST_WAIT) + (GUEST_GRACE if timeout else 0)
            if key is not None and key[0] == "scsi" and not await self._agent.wait_device_gone(*key, timeout=wait):
                raise HotplugError(f"QEMU removed {dev_id} but the guest still shows it")
        self._with_helpers.discard(dev_id)
        await self._hv.stop_helpers(dev_id)

    # -- resize ------------------------------------------------------------------------------

    async def resize_vcpus(self, count: int, timeout: float | None) -> tuple[int, int]:
        with deadline(timeout, "resize_vcpus", HotplugTimeout):
            return await self._resizer.resize_vcpus(count, can_plug=self._hv.capabilities().cpu_hotplug)

    async def resize_memory(self, mib: int, timeout: float | None) -> int:
        if not self._hv.capabilities().memory_hotplug:
            raise NotSupported(
                "this sandbox cannot hotplug memory: set memory_slots and max_memory_mib above memory_mib"
            )
        with deadline(timeout, "resize_memory", HotplugTimeout):
            return await self._resizer.resize_memory(mib)
