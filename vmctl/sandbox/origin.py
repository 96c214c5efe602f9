"""Where a sandbox's guest comes from (a boot, a template clone, a snapshot, a running detached
QEMU) and what follows from that: which run directory it uses, the launch plan its hypervisor
gets, how its start is confirmed, and whether its QEMU goes on when this controller lets go.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from vmctl.agent.client import AgentClient
from vmctl.config import SandboxConfig
from vmctl.core.paths import make_run_dir, remove_tree
from vmctl.core.state import SandboxState, Trigger
from vmctl.devices import virtiofs_share
from vmctl.errors import ConfigError, SandboxFailed
from vmctl.hypervisors.base import Hypervisor, LaunchPlan, PlacedDevice, RunPaths, Start
from vmctl.hypervisors.placement import clone_ram, cold_devices, with_defaults
from vmctl.machine import guesthooks, migration, overlays, shares
from vmctl.machine import registry as registry
from vmctl.machine.devicetable import DeviceManager


class Origin:
    """One sandbox's origin; set up before the start, consulted until the release."""

    def __init__(self, sandbox_id: str, config: SandboxConfig, *, detached: bool, log_dir: Path | None,
                 snapshot: migration.Snapshot | None = None, record: registry.Record | None = None) -> None:  # fmt: skip
        self.sandbox_id = sandbox_id
        self.config = config
        self.detached = detached
        self.log_dir = log_dir
        self.snapshot = snapshot
        self.record = record
        self.paths: RunPaths | None = None
        self.hold: registry.Hold | None = None
        #: an attach reached the guest: from then on a failure kills it like any other
        self.took_over = False

    @property
    def attaching(self) -> bool:
        return self.record is not None

    def claim_paths(self) -> RunPaths:
        """A fresh run dir; for a detached sandbox its named, locked directory in the state dir.
        Each is recorded as soon as it exists, so a failure from here on removes it."""
        if self.record is not None:
            self.hold = registry.Hold.attach(self.record)
            if self.record.log_dir:
                self.log_dir = Path(self.record.log_dir)
        elif self.detached:
            self.hold = registry.Hold.claim(self.sandbox_id)
        run_dir = self.hold.directory if self.hold is not None else make_run_dir()
        self.paths = RunPaths(run_dir, run_dir)
        if self.log_dir is not None:
            self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.paths = RunPaths(run_dir, self.log_dir)
            if self.hold is not None:
                self.hold.log_dir = str(self.log_dir)
        return self.paths

    def plan(self, paths: RunPaths) -> LaunchPlan:
        """The launch plan; from here on ``config`` is the one that runs on this host (limits
        left unset filled from the template or the host, see SandboxConfig.for_host)."""
        self.config = shares.member_config(self.config, sandbox_id=self.sandbox_id)  # {id} in a share's path
        if self.config.boot_from_template:
            self.config = migration.template_clone_config(self.config)
        else:
            self.config = self.config.for_host()
        config = self.config
        cold = cold_devices(config, paths, self.sandbox_id)  # worked out once: command line and table alike
        if self.snapshot is not None or config.boot_from_template:
            cold = overlays.in_run_dir(cold, paths.run_dir)  # a copy of their own, made by prepare_disks
        if self.record is not None:
            return LaunchPlan(Start.ATTACH, attach_pid=self.record.pid, detached=True, devices=cold)
        if self.snapshot is not None:
            unsaved, cold = _split_shares(cold)
            deferred = [(i, d, w, False) for i, d, w in unsaved]
            deferred += [(i, with_defaults(d, i, self.sandbox_id, paths.run_dir), w, True)  # this run dir's socket
                         for i, d, w in self.snapshot.restored_shares()]  # fmt: skip
            ctx = config.device_context()  # a share's directory gone since the save: said before QEMU starts
            problems = [dataclasses.replace(p, field=f"devices.{i}.{p.field.removeprefix('share.')}")
                        for i, d, _, _ in deferred for p in d.problems(ctx)]  # fmt: skip
            if problems:
                raise ConfigError(problems)
            return LaunchPlan(Start.RESTORE, incoming=self.snapshot.state, detached=self.detached, devices=cold,
                              restored=self.snapshot.restored_devices(), deferred=deferred)  # fmt: skip
        if config.boot_from_template:
            unsaved, cold = _split_shares(cold)
            return LaunchPlan(Start.CLONE, incoming=config.devices_state_path, detached=self.detached, devices=cold,
                              deferred=[(i, d, None, True) for i, d, _ in unsaved])  # fmt: skip
        return LaunchPlan(Start.BOOT, detached=self.detached, devices=cold)

    async def prepare(self) -> tuple[RunPaths, LaunchPlan]:
        """The run directory, the launch plan, and the disks that plan needs made."""
        paths = self.claim_paths()
        plan = self.plan(paths)
        await self.prepare_disks(plan)
        return paths, plan

    async def prepare_disks(self, plan: LaunchPlan) -> None:
        """Make the overlay disks' overlays before QEMU opens them: empty on a boot, copies of
        the snapshot's or the template's on a restore or a clone (an attach finds them in use);
        and a clone with shares its own copy of the template's RAM."""
        if plan.start is Start.ATTACH:
            return
        snapshot, config = self.snapshot, self.config
        if snapshot is not None:
            await overlays.prepare(plan.devices, source=snapshot.overlay)
        elif plan.start is Start.CLONE:
            await overlays.prepare(plan.devices, source=lambda dev_id: migration.template_overlay(config, dev_id))
            if config.guest_ram_shared and config.memory_path is not None and self.paths is not None:
                await migration.copy_template_ram(config.memory_path, clone_ram(self.paths.run_dir))
        else:
            await overlays.prepare(plan.devices)

    async def adopt(self, hv: Hypervisor, agent: AgentClient, devices: DeviceManager) -> tuple[Trigger, str] | None:
        """Rebuild what a sandbox not booted here had: an attached one's run state and devices
        (its confirmation, returned), or a restored snapshot's devices (None: wait for the guest)."""
        if self.snapshot is not None:
            devices.adopt(self.snapshot.devices)
        if self.record is None:
            return None
        status, meaning, present = await registry.rebuild(hv)
        if meaning is None:
            self.took_over = True  # a guest QEMU calls dead is of no use to anyone: it goes
            raise SandboxFailed(f"attached, but QEMU reports the guest as {status!r}")
        devices.adopt(self.record.devices, present)
        devices.note_cold_shares_mounted()  # the controller that started it mounted them before its record
        if meaning[0] is Trigger.GUEST_READY:
            await hv.wait_ready()  # the agent answers a ping
        else:
            agent.mark_ready()  # a paused guest cannot answer; it will once resumed
        return meaning

    async def settle(self, agent: AgentClient, devices: DeviceManager, plan: LaunchPlan) -> None:
        """Once the guest answers: its cold devices confirmed, a restored or cloned guest's
        shares plugged, a new guest's start hooks run."""
        await devices.confirm_cold()
        await devices.plug_deferred(plan.deferred)
        await guesthooks.at_start(agent, self.config, plan.start, self.sandbox_id)

    def keeps_running(self, state: SandboxState) -> bool:
        """Whether QEMU goes on after this controller lets go: a detached sandbox, or one whose
        attach failed before it took the guest over (someone else's sandbox is not ours to kill)."""
        if state is SandboxState.DETACHED:
            return True
        return self.attaching and not self.took_over and state is not SandboxState.STOPPED

    def save_record(self, *, pid: int | None, config: dict[str, Any], devices: list[dict[str, Any]], state: str) -> None:
        """Write down what another process needs to attach (a detached sandbox only)."""
        assert self.hold is not None and pid is not None
        self.hold.save(sandbox_id=self.sandbox_id, pid=pid, config=config, devices=devices, state=state)

    def release(self, *, qemu_lives: bool) -> None:
        """Remove what this sandbox left on disk unless its QEMU lives on; drop the attach lock."""
        if not qemu_lives:
            if self.hold is not None:
                self.hold.forget()
            elif self.paths is not None:
                remove_tree(self.paths.run_dir)
        if self.hold is not None:
            self.hold.release()


def _split_shares(placed: list[PlacedDevice]) -> tuple[list[PlacedDevice], list[PlacedDevice]]:
    """(shares, the rest): a saved state has no shares, so they are plugged once the guest runs."""
    shares = [p for p in placed if virtiofs_share(p[1])]
    return shares, [p for p in placed if not virtiofs_share(p[1])]
