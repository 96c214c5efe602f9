"""The per-sandbox hotplug queue and device table.

Theory of operation. Requests from any number of tasks take one FIFO lock to *submit* their QMP
commands, so QEMU sees them in arrival order; the *wait* for QEMU's acknowledgement happens
outside the lock, so slow acknowledgements do not serialise the queue. Every request that waits
registers its own one-slot waiter, keyed by device id, before it sends the command that will trigger
the event (the qemu.qmp listener pattern):

* unplug: ``DEVICE_DELETED`` for its id completes it; ``DEVICE_UNPLUG_GUEST_ERROR`` fails it;
* CPU and memory plug: ``ACPI_DEVICE_OST`` for its id completes it (status 0) or fails it;
* disk and NIC plug: the command's return, then the guest showing the device (via the agent).

A waiter is removed in ``finally`` whatever happens, so a cancelled or timed-out caller never
leaves a stale entry. A request not acknowledged in time raises :class:`HotplugTimeout`; the
device then stays ``unplug-pending`` and a late ``DEVICE_DELETED`` still completes the
bookkeeping (slot freed, record dropped; the backend deletion runs before the next request).
When the sandbox fails, every waiter is woken with the failure.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from vmctl.devices import Device, DeviceContext, Placement, QmpCommand
from vmctl.errors import QMPCommandError, VmctlError, VmctlTimeout
from vmctl.qmp import QmpEvent

ACPI_EJECT = 3
ACPI_EJECT_REFUSED = frozenset({0x80, 0x81, 0x82, 0x83})


class HotplugError(VmctlError):
    """A hotplug or unplug request failed (QEMU or the guest refused, no slot left, ...)."""


class HotplugTimeout(HotplugError, VmctlTimeout):
    """QEMU or the guest did not acknowledge a hotplug request in time."""


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


class Executor(Protocol):
    async def __call__(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...


class _Waiter:
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def resolve(self, value: Any = None, error: BaseException | None = None) -> None:
        if not self.done.is_set():
            self.value, self.error = value, error
            self.done.set()


class _WaiterTable:
    """Waiters by device id. Each caller has its own waiter, so one caller giving up (timeout,
    cancellation, error) never removes another caller's waiter for the same id."""

    def __init__(self) -> None:
        self._by_id: dict[str, list[_Waiter]] = {}

    def __len__(self) -> int:
        return sum(len(waiters) for waiters in self._by_id.values())

    def add(self, dev_id: str) -> _Waiter:
        waiter = _Waiter()
        self._by_id.setdefault(dev_id, []).append(waiter)
        return waiter

    def remove(self, dev_id: str, waiter: _Waiter) -> None:
        waiters = self._by_id.get(dev_id, [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            self._by_id.pop(dev_id, None)

    def resolve(self, dev_id: str, value: Any = None, error: BaseException | None = None) -> bool:
        """Resolve every waiter for ``dev_id``; whether there was one."""
        waiters = self._by_id.get(dev_id, [])
        for waiter in waiters:
            waiter.resolve(value, error)
        return bool(waiters)

    def resolve_all(self, error: BaseException) -> None:
        for waiters in self._by_id.values():
            for waiter in waiters:
                waiter.resolve(error=error)


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

    def claim(self, kind: str, owner: str, placement: Placement) -> None:
        """Mark a place taken by a cold-plugged device."""
        self._owner[owner] = (kind, placement)

    def release(self, owner: str) -> None:
        self._owner.pop(owner, None)


class HotplugQueue:
    """One per sandbox: orders requests, tracks devices, completes waiters from QMP events."""

    def __init__(
        self, execute: Executor, ctx: DeviceContext, slots: SlotAllocator, *, ack_timeout: float = 30.0
    ) -> None:
        self._execute = execute
        self.ctx = ctx
        self.slots = slots
        self.ack_timeout = ack_timeout
        self.devices: dict[str, PluggedDevice] = {}
        self._submit = anyio.Lock()
        self._deleted = _WaiterTable()
        self._ost = _WaiterTable()
        self._late_cleanup: list[QmpCommand] = []
        #: called when a device goes with nobody waiting, so its backends can go at once
        self.on_late_cleanup: Callable[[], None] | None = None
        self._failure: BaseException | None = None
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

    # -- events -----------------------------------------------------------------------------

    def on_event(self, event: QmpEvent) -> None:
        if event.name == "DEVICE_DELETED":
            dev_id = event.data.get("device") or _peripheral_id(str(event.data.get("path", "")))
            if dev_id:
                self._device_gone(str(dev_id))
        elif event.name == "DEVICE_UNPLUG_GUEST_ERROR":
            dev_id = event.data.get("device") or _peripheral_id(str(event.data.get("path", "")))
            self._deleted.resolve(str(dev_id), error=HotplugError(f"the guest refused to release {dev_id}"))
        elif event.name == "ACPI_DEVICE_OST":
            info = event.data.get("info")
            if not isinstance(info, Mapping):
                return  # malformed: nobody can be waiting for it
            dev_id = str(info.get("device", ""))
            self._ost.resolve(dev_id, dict(info))
            if info.get("source") == ACPI_EJECT and info.get("status") in ACPI_EJECT_REFUSED:
                # the guest will not let go (e.g. memory onlined unmovable): no DEVICE_DELETED will come
                error = HotplugError(f"the guest refused to release {dev_id} (ACPI status {info.get('status')})")
                self._deleted.resolve(dev_id, error=error)

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

    def fail_all(self, error: BaseException) -> None:
        self._failure = error
        self._deleted.resolve_all(error)
        self._ost.resolve_all(error)

    # -- requests ----------------------------------------------------------------------------

    async def _run(self, commands: list[QmpCommand]) -> None:
        for command in commands:
            await self._execute(command.name, dict(command.arguments))

    async def _flush_late_cleanup(self) -> None:
        todo, self._late_cleanup = self._late_cleanup, []
        for command in todo:
            try:
                await self._execute(command.name, dict(command.arguments))
            except QMPCommandError:
                pass  # already gone

    def record_cold(self, dev_id: str, device: Device, placement: Placement) -> PluggedDevice:
        """Enter a device that was on QEMU's command line, holding its SCSI target if it has one
        (cold PCI devices sit on the root bus, outside the hotplug slots)."""
        return self._record(dev_id, device, placement, hotplugged=False)

    def record_restored(self, dev_id: str, device: Device, placement: Placement,
                        guest_path: str | None) -> PluggedDevice:  # fmt: skip
        """Enter a device another controller hot-plugged (attaching to a detached sandbox)."""
        return self._record(dev_id, device, placement, hotplugged=True, guest_path=guest_path)

    def _record(self, dev_id: str, device: Device, placement: Placement, *, hotplugged: bool,
                guest_path: str | None = None) -> PluggedDevice:  # fmt: skip
        record = PluggedDevice(dev_id, device, placement, hotplugged=hotplugged, guest_path=guest_path,
                               cleanup=device.cleanup_commands(dev_id, self.ctx))  # fmt: skip
        kind = device.needs_slot(self.ctx)
        if kind == "scsi" or (kind and hotplugged):
            self.slots.claim(kind, dev_id, placement)
        self.devices[dev_id] = record
        return record

    async def plug(self, device: Device, dev_id: str,
                   confirm: Callable[[PluggedDevice], Awaitable[str | None]] | None = None,
                   timeout: float | None = None) -> PluggedDevice:  # fmt: skip
        """Plug ``device``; return once QEMU accepted it and ``confirm`` saw it in the guest."""
        async with self._submit:
            if self._failure is not None:
                raise self._failure
            if dev_id in self.devices:  # checked under the lock: two plugs of one id cannot race
                raise HotplugError(f"device id {dev_id!r} is already in use in this sandbox")
            await self._flush_late_cleanup()
            kind = device.needs_slot(self.ctx)
            placement = self.slots.allocate(kind, dev_id) if kind else Placement()
            record = PluggedDevice(dev_id, device, placement, hotplugged=True,
                                   cleanup=device.cleanup_commands(dev_id, self.ctx))  # fmt: skip
            *backends, frontend = device.plug_commands(dev_id, self.ctx, placement)
            sent: list[QmpCommand] = []
            try:
                for command in backends:
                    sent.append(command)  # counted before the reply: it may be in QEMU even if we hear nothing
                    await self._execute(command.name, dict(command.arguments))
            except BaseException:
                await self._undo_plug(dev_id, sent)
                raise
            # From here the device may exist in QEMU even if we do not hear back, so the table
            # has it until QEMU says otherwise.
            self.devices[dev_id] = record
            try:
                await self._execute(frontend.name, dict(frontend.arguments))
            except QMPCommandError:
                await self._undo_plug(dev_id, sent)
                raise
            except BaseException:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    if await self._exists(dev_id) is False:
                        await self._undo_plug(dev_id, sent)
                raise
        if confirm is not None:
            try:
                with anyio.fail_after(self.ack_timeout if timeout is None else timeout):
                    record.guest_path = await confirm(record)
            except TimeoutError as exc:
                if isinstance(exc, VmctlError):
                    raise
                raise HotplugTimeout(f"the guest did not show {dev_id} within {timeout or self.ack_timeout}s") from None
        return record

    async def _undo_plug(self, dev_id: str, sent: list[QmpCommand]) -> None:
        """Forget a plug that did not happen: table row, slot, and the backends QEMU may have."""
        self.devices.pop(dev_id, None)
        self.slots.release(dev_id)
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            for command in reversed(sent):
                delete = _undo(command)
                if delete is not None:
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

    async def unplug(self, dev_id: str, timeout: float | None = None) -> None:
        """``device_del`` and wait for ``DEVICE_DELETED``; then delete the backends, free the slot."""
        if self._failure is not None:
            raise self._failure
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
            limit = self.ack_timeout if timeout is None else timeout
            with anyio.move_on_after(limit) as scope:
                await waiter.done.wait()
            if scope.cancelled_caught:
                raise HotplugTimeout(f"QEMU did not confirm the removal of {dev_id} within {limit}s; "
                                     "it stays unplug-pending and is cleaned up if the event comes later")  # fmt: skip
            if waiter.error is not None:
                if record.state is DeviceState.UNPLUG_PENDING:
                    record.state = DeviceState.PLUGGED
                raise waiter.error
        finally:
            self._deleted.remove(dev_id, waiter)
            if waiter.done.is_set() and waiter.error is None:
                with anyio.CancelScope(shield=True):  # the backends go even if the caller gives up now
                    async with self._submit:
                        await self._flush_late_cleanup()

    async def add_and_wait_ost(self, driver_props: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """``device_add`` a CPU or DIMM and wait for its ``ACPI_DEVICE_OST``; raise unless status 0."""
        if self._failure is not None:
            raise self._failure
        dev_id = str(driver_props["id"])
        waiter = self._ost.add(dev_id)
        try:
            async with self._submit:
                await self._execute("device_add", driver_props)
            limit = self.ack_timeout if timeout is None else timeout
            with anyio.move_on_after(limit) as scope:
                await waiter.done.wait()
            if scope.cancelled_caught:
                raise HotplugTimeout(f"no ACPI acknowledgement for {dev_id} within {limit}s")
            if waiter.error is not None:
                raise waiter.error
            info: dict[str, Any] = waiter.value
            if info.get("status", 0) != 0:
                raise HotplugError(f"the guest's ACPI refused {dev_id} (status {info.get('status')})")
            return info
        finally:
            self._ost.remove(dev_id, waiter)

    async def submit(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one plain command in queue order (object-add and friends)."""
        async with self._submit:
            return await self._execute(command, arguments)


def _undo(command: QmpCommand) -> QmpCommand | None:
    args = command.arguments
    return {
        "blockdev-add": lambda: QmpCommand("blockdev-del", {"node-name": args.get("node-name")}),
        "netdev_add": lambda: QmpCommand("netdev_del", {"id": args.get("id")}),
        "object-add": lambda: QmpCommand("object-del", {"id": args.get("id")}),
        "chardev-add": lambda: QmpCommand("chardev-remove", {"id": args.get("id")}),
    }.get(command.name, lambda: None)()


def _peripheral_id(path: str) -> str | None:
    """The device a path-only event is about: ``/machine/peripheral/ID`` itself, or a CPU's
    ``/machine/peripheral/cpu1/lapic`` (CPU DEVICE_DELETED carries only that path). Children such
    as ``.../disk1/virtio-backend`` go first and are not the device."""
    parts = path.split("/")
    if len(parts) >= 4 and parts[1] == "machine" and parts[2] == "peripheral":
        if len(parts) == 4 or (len(parts) == 5 and parts[4] == "lapic"):
            return parts[3]
    return None
