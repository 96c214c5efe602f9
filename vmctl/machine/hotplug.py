"""The per-sandbox hotplug queue and device table.

Theory of operation. Requests from any number of tasks take one FIFO lock to *submit* their QMP
commands, so QEMU sees them in arrival order; the *wait* for QEMU's acknowledgement happens
outside the lock, so slow acknowledgements do not serialise the queue. Every request that waits
registers its own one-slot waiter (:class:`vmctl.core.waiting.Waiter`), keyed by device id, before it
sends the command that will trigger the event (the qemu.qmp listener pattern):

* unplug: ``DEVICE_DELETED`` for its id completes it; ``DEVICE_UNPLUG_GUEST_ERROR`` fails it;
* CPU and memory plug: ``ACPI_DEVICE_OST`` for its id completes it (status 0) or fails it;
* disk and NIC plug: the command's return, then the guest showing the device (via a confirmer).

A waiter is removed in ``finally`` whatever happens, so a cancelled or timed-out caller never
leaves a stale entry. Time limits are the caller's (the device manager bounds each whole call);
a request given up on leaves the device ``unplug-pending``, and a late ``DEVICE_DELETED`` still
completes the bookkeeping (slot freed, record dropped, backends deleted). When the sandbox
fails, every waiter is woken, each with its own error.

CPUs and DIMMs are rows of the same table (:class:`~vmctl.devices.CpuDevice`,
:class:`~vmctl.devices.DimmDevice`), so everything that reads the table (attach, snapshots) knows them.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from vmctl.core.qmp import QmpEvent
from vmctl.core.waiting import Failure, WaiterTable, make_error
from vmctl.devices import Backend, Device, DeviceContext, Placement, QmpCommand, device_from_mapping, device_to_mapping
from vmctl.errors import HotplugError, HotplugTimeout, QMPCommandError, VmctlError

__all__ = ["DeviceState", "HotplugError", "HotplugQueue", "HotplugTimeout", "PluggedDevice", "SlotAllocator"]

ACPI_EJECT = 3
ACPI_EJECT_REFUSED = frozenset({0x80, 0x81, 0x82, 0x83})
CLEANUP_LIMIT = 10.0  # seconds a shielded cleanup may take before it is abandoned


class DeviceState(enum.Enum):
    PLUGGED = "plugged"
    UNPLUG_PENDING = "unplug-pending"
    REMOVED = "removed"


@dataclass
class PluggedDevice:
    """A row of the device table: what was plugged, where, and what the guest calls it."""

    id: str
    device: Device | None
    placement: Placement
    hotplugged: bool
    state: DeviceState = DeviceState.PLUGGED
    guest_path: str | None = None
    cleanup: list[QmpCommand] = field(default_factory=list)
    #: a NIC's IPv4 address in the guest (``10.0.2.15/24``), as its DHCP lease configured it
    address: str | None = None

    def to_row(self) -> dict[str, Any]:
        """The record a snapshot or a detached sandbox keeps of a hot-plugged device."""
        assert self.device is not None
        return {"id": self.id, "device": device_to_mapping(self.device), "bus": self.placement.bus,
                "addr": self.placement.addr, "scsi_id": self.placement.scsi_id, "guest_path": self.guest_path,
                "address": self.address}  # fmt: skip


def row_device(row: Mapping[str, Any]) -> tuple[str, Device, Placement, str | None]:
    """The inverse of :meth:`PluggedDevice.to_row`."""
    where = Placement(bus=row.get("bus"), addr=row.get("addr"), scsi_id=row.get("scsi_id"))
    return str(row["id"]), device_from_mapping(row["device"]), where, row.get("guest_path")


class Executor(Protocol):
    async def __call__(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...


class SlotAllocator:
    """PCIe root ports (q35), bridge slots (pc) and SCSI targets, allocated on plug, freed on unplug."""

    def __init__(self, machine: str, pci_bridges: int, scsi_targets: int = 256) -> None:
        if machine == "q35":
            self._pci = [Placement(bus=f"rp{i}") for i in range(pci_bridges)]
        elif machine == "pc":
            self._pci = [Placement(bus=f"br{b}", addr=hex(a)) for b in range(pci_bridges) for a in range(1, 32)]
        else:
            self._pci = []
        self._scsi = [Placement(scsi_id=i) for i in range(scsi_targets)]
        self._owner: dict[str, tuple[str, Placement]] = {}

    def free(self, kind: str) -> int:
        used = {p for k, p in self._owner.values() if k == kind}
        return len([p for p in self._pool(kind) if p not in used])

    def _pool(self, kind: str) -> list[Placement]:
        return self._pci if kind == "pci" else self._scsi

    def allocate(self, kind: str, owner: str) -> Placement:
        if owner in self._owner:
            raise HotplugError(f"{owner} already holds a slot")
        used = {p for k, p in self._owner.values() if k == kind}
        for placement in self._pool(kind):
            if placement not in used:
                self._owner[owner] = (kind, placement)
                return placement
        what = "PCIe root port (raise pci_bridges)" if kind == "pci" else "SCSI target"
        raise HotplugError(f"no free {what} for {owner}: {len(self._pool(kind))} in use")

    def places(self, kind: str) -> list[Placement]:
        """Every place of ``kind`` the allocator hands out (a cold share's own port is not one)."""
        return list(self._pool(kind))

    def claim(self, kind: str, owner: str, placement: Placement) -> None:
        """Mark a place taken by a cold-plugged device."""
        self._owner[owner] = (kind, placement)

    def release(self, owner: str) -> None:
        self._owner.pop(owner, None)


class HotplugQueue:
    """One per sandbox: orders requests, tracks devices, completes waiters from QMP events."""

    def __init__(self, execute: Executor, ctx: DeviceContext, slots: SlotAllocator) -> None:
        self._execute = execute
        self.ctx = ctx
        self.slots = slots
        self.devices: dict[str, PluggedDevice] = {}
        self._submit = anyio.Lock()
        self._deleted: WaiterTable[str, bool] = WaiterTable()
        self._ost: WaiterTable[str, dict[str, Any]] = WaiterTable()
        self._late_cleanup: list[QmpCommand] = []
        #: called when a device goes with nobody waiting, so its backends can go at once
        self.on_late_cleanup: Callable[[], None] | None = None
        self._failure: Failure | None = None
        self._counter = 0

    @property
    def pending_waiters(self) -> int:
        return len(self._deleted) + len(self._ost)

    def new_id(self, prefix: str) -> str:
        while True:
            self._counter += 1
            candidate = f"{prefix}{self._counter}"
            if candidate not in self.devices:
                return candidate

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise make_error(self._failure)

    # -- events -----------------------------------------------------------------------------

    def on_event(self, event: QmpEvent) -> None:
        if event.name == "DEVICE_DELETED":
            dev_id = event.data.get("device") or _peripheral_id(str(event.data.get("path", "")))
            if dev_id:
                self._device_gone(str(dev_id))
        elif event.name == "DEVICE_UNPLUG_GUEST_ERROR":
            dev_id = str(event.data.get("device") or _peripheral_id(str(event.data.get("path", ""))))
            self._deleted.fail(dev_id, lambda: HotplugError(f"the guest refused to release {dev_id}"))
        elif event.name == "ACPI_DEVICE_OST":
            info = event.data.get("info")
            if not isinstance(info, Mapping):
                return  # malformed: nobody can be waiting for it
            dev_id = str(info.get("device", ""))
            self._ost.resolve(dev_id, dict(info))
            status = info.get("status")
            if info.get("source") == ACPI_EJECT and status in ACPI_EJECT_REFUSED:
                # the guest will not let go (e.g. memory onlined unmovable): no DEVICE_DELETED will come
                self._deleted.fail(
                    dev_id, lambda: HotplugError(f"the guest refused to release {dev_id} (ACPI status {status})")
                )

    def _device_gone(self, dev_id: str) -> None:
        record = self.devices.get(dev_id)
        waited_for = self._deleted.resolve(dev_id, True)
        if record is not None and record.state is not DeviceState.REMOVED:
            record.state = DeviceState.REMOVED
            self.slots.release(dev_id)
            del self.devices[dev_id]
            # the backends are deleted by the waiting unplug; with nobody waiting (a late event),
            # by whoever owns the queue (on_late_cleanup), or at the latest before the next request
            self._late_cleanup.extend(record.cleanup)
            if not waited_for and record.cleanup and self.on_late_cleanup is not None:
                self.on_late_cleanup()

    async def flush_late_cleanup(self) -> None:
        """Delete the backends of devices QEMU removed while nobody waited (they hold files open)."""
        async with self._submit:
            await self._flush_late_cleanup()

    def fail_all(self, failure: Failure) -> None:
        """Wake every waiter with ``failure`` (a factory gives each its own exception)."""
        self._failure = failure
        self._deleted.fail_all(failure)
        self._ost.fail_all(failure)

    # -- the table ----------------------------------------------------------------------------

    async def _flush_late_cleanup(self) -> None:
        todo, self._late_cleanup = self._late_cleanup, []
        for command in todo:
            try:
                await self._execute(command.name, dict(command.arguments))
            except QMPCommandError:
                pass  # already gone

    def record(self, dev_id: str, device: Device, placement: Placement, *, hotplugged: bool,
               guest_path: str | None = None) -> PluggedDevice:  # fmt: skip
        """Enter a device QEMU already has: cold-plugged (on its command line), or hot-plugged by
        another controller (attach) or before a snapshot (restore). It holds its SCSI target, and
        a hot-pluggable one its PCI slot (cold PCI devices sit on the root bus, outside the slots)."""
        record = PluggedDevice(dev_id, device, placement, hotplugged=hotplugged, guest_path=guest_path,
                               cleanup=device.cleanup_commands(dev_id, self.ctx))  # fmt: skip
        kind = device.needs_slot(self.ctx)
        if kind == "scsi" or (kind and hotplugged):
            self.slots.claim(kind, dev_id, placement)
        self.devices[dev_id] = record
        return record

    # -- requests ----------------------------------------------------------------------------

    async def plug(self, device: Device, dev_id: str,
                   confirm: Callable[[PluggedDevice], Awaitable[str | None]] | None = None, *,
                   placement: Placement | None = None, hotplugged: bool = True) -> PluggedDevice:  # fmt: skip
        """Plug ``device``; return once QEMU acknowledged it (its command's return, or its
        ``ACPI_DEVICE_OST`` for CPUs and DIMMs) and ``confirm`` saw it in the guest.

        ``placement``: a place the guest already knows (a share plugged back after a snapshot),
        instead of a free slot; ``hotplugged=False``: a device of the config, plugged late.
        Unbounded here: the caller's deadline bounds the whole call."""
        self._check_alive()
        ost = self._ost.add(dev_id) if device.ack() == "acpi" else None
        try:
            record = await self._submit_plug(device, dev_id, placement, hotplugged)
            if ost is not None:
                info = await ost.wait()
                if info.get("status", 0) != 0:
                    raise HotplugError(f"the guest's ACPI refused {dev_id} (status {info.get('status')})")
        finally:
            if ost is not None:
                self._ost.remove(dev_id, ost)
        if confirm is not None:
            record.guest_path = await confirm(record)
        return record

    async def _submit_plug(self, device: Device, dev_id: str, placement: Placement | None,
                           hotplugged: bool) -> PluggedDevice:  # fmt: skip
        async with self._submit:
            self._check_alive()
            if dev_id in self.devices:  # checked under the lock: two plugs of one id cannot race
                raise HotplugError(f"device id {dev_id!r} is already in use in this sandbox")
            await self._flush_late_cleanup()
            kind = device.needs_slot(self.ctx)
            if placement is None:
                placement = self.slots.allocate(kind, dev_id) if kind else Placement()
            elif kind and placement in self.slots.places(kind):
                self.slots.claim(kind, dev_id, placement)
            record = PluggedDevice(dev_id, device, placement, hotplugged=hotplugged,
                                   cleanup=device.cleanup_commands(dev_id, self.ctx))  # fmt: skip
            sent: list[Backend] = []
            try:
                for backend in device.backends(dev_id, self.ctx):
                    sent.append(backend)  # counted before the reply: it may be in QEMU even if we hear nothing
                    command = backend.add_command()
                    await self._execute(command.name, dict(command.arguments))
            except BaseException:
                await self._undo_plug(dev_id, sent)
                raise
            # From here the device may exist in QEMU even if we do not hear back, so the table
            # has it until QEMU says otherwise.
            self.devices[dev_id] = record
            try:
                await self._execute("device_add", device.frontend(dev_id, self.ctx, placement))
            except QMPCommandError:
                await self._undo_plug(dev_id, sent)
                raise
            except BaseException:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    if await self._exists(dev_id) is False:
                        await self._undo_plug(dev_id, sent)
                raise
        return record

    async def _undo_plug(self, dev_id: str, sent: list[Backend]) -> None:
        """Forget a plug that did not happen: table row, slot, and the backends QEMU may have."""
        self.devices.pop(dev_id, None)
        self.slots.release(dev_id)
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            for backend in reversed(sent):
                delete = backend.del_command()
                try:
                    await self._execute(delete.name, dict(delete.arguments))
                except VmctlError:
                    pass  # it never got in

    async def _exists(self, dev_id: str) -> bool | None:
        """Whether QEMU has a device with this id (None: cannot tell)."""
        try:
            children = await self._execute("qom-list", {"path": "/machine/peripheral"})
        except VmctlError:
            return None
        return any(child.get("name") == dev_id for child in children)

    async def unplug(self, dev_id: str) -> None:
        """``device_del`` and wait for ``DEVICE_DELETED``; then delete the backends, free the slot.

        Unbounded here: the caller's deadline bounds it. Given up on, the device stays
        ``unplug-pending`` and a later event completes the removal."""
        self._check_alive()
        record = self.devices.get(dev_id)
        if record is None:
            raise HotplugError(f"no device {dev_id!r} in this sandbox")
        if not record.hotplugged and self.ctx.pci and record.placement.bus is None and record.placement.scsi_id is None:
            raise HotplugError(f"{dev_id} was cold-plugged on the root bus, which cannot hot-unplug")
        waiter = self._deleted.add(dev_id)
        try:
            async with self._submit:
                await self._flush_late_cleanup()
                if record.state is DeviceState.PLUGGED:
                    record.state = DeviceState.UNPLUG_PENDING  # before the reply: the event may come first
                    try:
                        await self._execute("device_del", {"id": dev_id})
                    except QMPCommandError:
                        if record.state is DeviceState.UNPLUG_PENDING:
                            record.state = DeviceState.PLUGGED
                        raise
                elif record.state is DeviceState.UNPLUG_PENDING:
                    try:  # a retry: ask again, the guest may have missed or ignored the first eject
                        await self._execute("device_del", {"id": dev_id})
                    except QMPCommandError:
                        pass  # QEMU still has the first request in progress: keep waiting for it
            try:
                await waiter.wait()
            except HotplugError:
                if record.state is DeviceState.UNPLUG_PENDING:
                    record.state = DeviceState.PLUGGED
                raise
        finally:
            self._deleted.remove(dev_id, waiter)
            if waiter.done and not waiter.failed:
                # the backends go even if the caller gives up now, but never hold up a teardown for long
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_LIMIT):
                    async with self._submit:
                        await self._flush_late_cleanup()

    async def submit(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one plain command in queue order."""
        async with self._submit:
            return await self._execute(command, arguments)


def _peripheral_id(path: str) -> str | None:
    """The device a path-only event is about: ``/machine/peripheral/ID`` itself, or a CPU's
    ``/machine/peripheral/cpu1/lapic`` (CPU DEVICE_DELETED carries only that path). Children such
    as ``.../disk1/virtio-backend`` go first and are not the device."""
    parts = path.split("/")
    if len(parts) >= 4 and parts[1] == "machine" and parts[2] == "peripheral":
        if len(parts) == 4 or (len(parts) == 5 and parts[4] == "lapic"):
            return parts[3]
    return None
