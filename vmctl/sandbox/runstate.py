"""Run-state control: pause, resume, and saving a VM's state (snapshots, VM templates).

Commands never change state on their own: ``pause`` returns once QEMU's ``STOP`` event moved the
machine to PAUSED, ``resume`` once ``RESUME`` moved it back. A snapshot of a running sandbox
pauses it for the save and resumes it afterwards on every path (including a cancelled save whose
``stop`` was still on its way to QEMU); a paused sandbox is saved as it is and stays paused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from vmctl.config import SandboxConfig
from vmctl.core.state import SandboxState, StateMachine
from vmctl.core.waiting import deadline
from vmctl.core.watcher import StateWatcher
from vmctl.devices import SharedDirectory
from vmctl.errors import GuestError, NotSupported, VmctlError
from vmctl.hypervisors.base import Hypervisor
from vmctl.machine import migration
from vmctl.machine.devicetable import DeviceManager
from vmctl.machine.hotplug import PluggedDevice

UNDO_LIMIT = 10.0


class RunControl:
    def __init__(self, hv: Hypervisor, machine: StateMachine, watcher: StateWatcher, log: Any,
                 devices: DeviceManager) -> None:  # fmt: skip
        self._hv = hv
        self._devices = devices
        #: shares a save that left the sandbox paused set aside, plugged back on resume
        self._set_aside: list[PluggedDevice] = []
        self._machine = machine
        self._watcher = watcher
        self._log = log

    async def pause(self, timeout: float | None) -> None:
        if not self._hv.capabilities().pause:
            raise NotSupported(f"the {self._hv.name} backend cannot pause")
        with deadline(timeout, "pause"):
            await self._hv.pause()
            await self._watcher.wait_for(SandboxState.PAUSED)

    async def resume(self, timeout: float | None) -> None:
        """Resume; shares set aside by a save that left the sandbox paused come back once it runs."""
        with deadline(timeout, "resume"):
            await self._hv.resume()
            await self._watcher.wait_for(SandboxState.RUNNING)
        taken, self._set_aside = self._set_aside, []
        await self._devices.plug_back(taken)

    async def snapshot(self, target: Path, *, sandbox_id: str, config: SandboxConfig, timeout: float | None,
                       leave_paused: bool = False) -> Path:  # fmt: skip
        """Shares are set aside first (unmounted and unplugged while the guest runs) and plugged
        back after the save, whatever happened to it; with ``leave_paused`` the sandbox stays
        paused after a save and they come back when it is resumed."""
        if not self._hv.capabilities().snapshots:
            raise NotSupported(f"the {self._hv.name} backend cannot save snapshots")
        was_running = self._machine.state is SandboxState.RUNNING
        devices = self._devices
        shared = [d.id for d in devices.devices if isinstance(d.device, SharedDirectory)]
        if shared and not was_running:
            raise NotSupported(f"resume the sandbox before saving it: its guest must unmount {', '.join(shared)} "
                               "for the save (QEMU cannot save a shared directory)")  # fmt: skip
        with deadline(timeout, "snapshot"):
            taken = await devices.set_aside_shares(timeout)
            try:
                if was_running:
                    await self.pause(timeout)
                await migration.write_snapshot(self._hv, target, sandbox_id=sandbox_id, config=config,
                                               devices=devices.devices, shares=[*self._set_aside, *taken])  # fmt: skip
            except BaseException:
                if was_running:
                    with anyio.CancelScope(shield=True):
                        await self._undo_pause()
                await devices.plug_back(taken, quietly=True)
                raise
        if leave_paused and was_running:
            self._set_aside = taken
        else:
            if was_running:
                with anyio.CancelScope(shield=True):
                    await self._undo_pause()
            try:
                await devices.plug_back(taken)
            except VmctlError as exc:
                raise GuestError(f"the snapshot was saved to {target}, but plugging its shares back into the running "
                                 f"sandbox failed: {exc}") from exc  # fmt: skip
        self._log.info("snapshot saved", directory=str(target), shares=shared or None)
        return target

    async def _undo_pause(self) -> None:
        """Resume after a save, including one cancelled while ``stop`` was on its way to QEMU."""
        if self._machine.state not in (SandboxState.RUNNING, SandboxState.PAUSED):
            return
        with anyio.move_on_after(UNDO_LIMIT):
            try:
                if self._machine.state is SandboxState.RUNNING:
                    if await self._hv.query_status() == "running":
                        return  # the stop never reached QEMU
                    await self._watcher.wait_for(SandboxState.PAUSED)  # its STOP event is on the way
                await self.resume(UNDO_LIMIT)
            except VmctlError as exc:
                self._log.warning("could not resume after the snapshot", error=str(exc))

    async def become_template(self, config: SandboxConfig, devices: Sequence[PluggedDevice],
                              timeout: float | None) -> None:  # fmt: skip
        """Boot-to-be-template: pause at the ready point and save the device state for clones
        (and the overlay disks, which clones start from)."""
        assert config.devices_state_path is not None
        await self.pause(timeout)
        await self._hv.save_state(config.devices_state_path, skip_shared=True)
        await migration.write_template_record(config, devices)
        self._log.info("template saved", devices_state=str(config.devices_state_path))
