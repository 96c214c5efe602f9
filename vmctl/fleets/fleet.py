"""Fleets: many sandboxes at once, with bounded boots, failure isolation and structured teardown.

Each member is one task in the fleet's task group, and that task owns its sandbox's ``async
with`` from boot to teardown, so nothing outlives the fleet: leaving the fleet's block (normally,
by an error, or by cancellation) tears every member down. Boots go through a capacity limiter;
a member that fails to boot is recorded with its error while the others go on, unless
``fail_fast`` asks to stop them all. Progress is reported as :class:`FleetEvent` values to an
optional callback.

By default ``async with`` returns once every boot finished. With ``wait=False`` it returns at
once, and :meth:`Fleet.as_ready` hands out members as they become ready, so work starts at the
first ready guest rather than after the slowest boot. :meth:`Fleet.restart` replaces one member's
sandbox (stopped, then a new one with the same id started in the member's own task).
"""

from __future__ import annotations

import enum
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup

from vmctl.config import SandboxConfig
from vmctl.core.state import SandboxState
from vmctl.core.waiting import deadline
from vmctl.errors import FleetError
from vmctl.fleets.members import (
    EventReporter,
    LedgerMember,
    MemberLedger,
    Outcome,
    fleet_configs,
    refuse_shared_writable_disks,
)
from vmctl.fleets.template import boot_template
from vmctl.hypervisors.base import Backend
from vmctl.machine.shares import member_config
from vmctl.sandbox.facade import Sandbox

__all__ = ["Fleet", "FleetEvent", "FleetEventKind", "Member", "Outcome", "refuse_shared_writable_disks"]

R = TypeVar("R")  # what a map function returns


class FleetEventKind(enum.Enum):
    BOOTING = "booting"
    READY = "ready"
    BOOT_FAILED = "boot-failed"
    RUNNING = "running"
    DONE = "done"
    ERROR = "error"
    STOPPED = "stopped"
    RESTARTING = "restarting"
    LOST = "lost"  # cluster fleets: the member's node (or its host actor) is gone


@dataclass(frozen=True)
class FleetEvent:
    kind: FleetEventKind
    sandbox_id: str
    detail: str = ""
    at: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class Member(LedgerMember[Sandbox]):
    """One place in the fleet: its current sandbox (a restart puts a new one here) and its boot."""

    restarts: int = 0  # how many times restart() replaced the sandbox
    _restarting: bool = field(default=False, repr=False)
    # one each per run of the member task (made when it starts: events need the event loop)
    _stop: anyio.Event | None = field(default=None, repr=False)
    _gone: anyio.Event | None = field(default=None, repr=False)


class Fleet:
    """``async with Fleet(config, size=8, max_concurrent_starts=4) as fleet:`` boots them all."""

    def __init__(
        self,
        config: SandboxConfig | Sequence[SandboxConfig],
        *,
        size: int | None = None,
        max_concurrent_starts: int = 4,
        fail_fast: bool = False,
        on_event: Callable[[FleetEvent], None] | None = None,
        id_prefix: str = "fleet",
        start_timeout: float = 300.0,
        backend: Backend | None = None,
        template: bool = False,
        wait: bool = True,
    ) -> None:
        configs = fleet_configs(config, size, max_concurrent_starts=max_concurrent_starts, template=template)
        self._configs = configs
        self._template = template
        #: ``async with`` waits for every boot (False: use :meth:`as_ready`)
        self.wait = wait
        self._member_configs = configs
        self._id_prefix, self._backend, self._start_timeout = id_prefix, backend, start_timeout
        #: how long the template took to boot and save (template fleets only)
        self.template_seconds: float | None = None
        self._ledger: MemberLedger[Member] = MemberLedger(fail_fast=fail_fast, owner="Fleet")
        # with a template the members exist once it does (a clone's config names its files)
        self._ledger.members = [] if template else self._make_members(configs)
        self._limiter = anyio.CapacityLimiter(max_concurrent_starts)
        self._report: EventReporter[FleetEvent] = EventReporter(on_event, "fleet", fleet=id_prefix)
        self._tg: TaskGroup | None = None
        self._closing = False

    @property
    def fail_fast(self) -> bool:
        return self._ledger.fail_fast

    @fail_fast.setter
    def fail_fast(self, value: bool) -> None:
        self._ledger.fail_fast = value

    def _make_members(self, configs: list[SandboxConfig]) -> list[Member]:
        self._member_configs = configs
        return [Member(i, self._sandbox(i, c)) for i, c in enumerate(configs)]

    def _sandbox(self, index: int, config: SandboxConfig, sandbox_id: str | None = None) -> Sandbox:
        """Member ``index``'s sandbox, its shares' ``{index}`` and ``{id}`` filled in."""
        sandbox_id = sandbox_id or f"{self._id_prefix}-{index}"
        config = member_config(config, sandbox_id=sandbox_id, index=index)
        return Sandbox(config, id=sandbox_id, backend=self._backend, start_timeout=self._start_timeout)

    async def _boot_template(self, stack: AsyncExitStack) -> None:
        """Boot one sandbox to be the template (it saves its state and stops); members clone it."""
        started = time.monotonic()
        clone = await boot_template(self._configs[0], stack, id=f"{self._id_prefix}-template",
                                    backend=self._backend, start_timeout=self._start_timeout)  # fmt: skip
        self.template_seconds = time.monotonic() - started
        self._ledger.members = self._make_members([clone] * len(self._configs))

    # -- introspection -----------------------------------------------------------------------

    @property
    def members(self) -> list[Member]:
        return self._ledger.members

    @property
    def sandboxes(self) -> list[Sandbox]:
        return [m.sandbox for m in self.members]

    @property
    def running(self) -> list[Sandbox]:
        return [m.sandbox for m in self.members if m.sandbox.state is SandboxState.RUNNING]

    @property
    def failed(self) -> list[Member]:
        return [m for m in self.members if m.boot_error is not None or m.sandbox.state is SandboxState.FAILED]

    def _emit(self, kind: FleetEventKind, sandbox: Sandbox, detail: str = "") -> None:
        self._report(FleetEvent(kind, sandbox.id, detail))

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Fleet:
        await self._ledger.open(self._setup)
        return self

    async def _setup(self, stack: AsyncExitStack) -> None:
        self._closing = False
        if self._template:
            await self._boot_template(stack)
        self._ledger.boots_begin(len(self.members))
        self._tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(self._tell_members_to_stop)  # first on the way out: members tear down
        for member in self.members:
            self._start_member(member)
        if self.wait:
            try:
                await self._ledger.wait_booted()
            except BaseException:
                self._tg.cancel_scope.cancel()  # stop boots under way; teardowns are shielded
                raise

    async def __aexit__(self, *exc: object) -> None:
        await self._ledger.close()

    def _tell_members_to_stop(self) -> None:
        self._closing = True
        for member in self.members:
            if member._stop is not None:
                member._stop.set()

    def _start_member(self, member: Member) -> None:
        """Start the task that owns ``member.sandbox`` (synchronous: no await between the checks
        of a caller and the start)."""
        assert self._tg is not None
        self._ledger.boot_started(member)
        member._stop, member._gone = anyio.Event(), anyio.Event()
        self._tg.start_soon(self._run_member, member, member._stop, member._gone, name=member.sandbox.id)

    async def _run_member(self, member: Member, stop: anyio.Event, gone: anyio.Event) -> None:
        """Own one sandbox from boot to teardown; never let its failure reach the group."""
        sandbox = member.sandbox
        try:
            async with AsyncExitStack() as stack:
                async with self._limiter:
                    self._emit(FleetEventKind.BOOTING, sandbox)
                    started = time.monotonic()
                    try:
                        await stack.enter_async_context(sandbox)
                    except Exception as exc:  # noqa: BLE001 - recorded, reported, isolated
                        self._ledger.boot_failed(member, exc)
                        self._emit(FleetEventKind.BOOT_FAILED, sandbox, str(exc))
                    else:
                        self._ledger.boot_succeeded(member, time.monotonic() - started)
                        self._emit(FleetEventKind.READY, sandbox, f"{member.boot_seconds:.2f}s")
                self._ledger.boot_finished(member)
                if member.boot_error is None:
                    await stop.wait()  # the fleet closes, or restart() wants this sandbox gone
        finally:
            self._ledger.boot_finished(member)  # also when cancelled while booting
            self._emit(FleetEventKind.STOPPED, sandbox, str(sandbox.state))
            gone.set()

    # -- readiness and restarts -----------------------------------------------------------------

    def as_ready(self) -> AsyncIterator[Member]:
        """Members as they become ready (their :class:`Member`, with ``.sandbox``), in that order.

        Members whose boot fails are not yielded (they are in :attr:`failed` with their
        ``boot_error``); with ``fail_fast`` the first such failure raises :class:`FleetError`
        here instead. The iteration ends once no boot is under way and every ready member was
        yielded. A member restarted meanwhile is yielded again when its new sandbox is ready.
        With ``wait=True`` (the default) every boot is already done: this yields the ready
        members in the order they became ready.
        """
        return self._ledger.as_ready()

    async def restart(self, index: int, *, timeout: float | None = None) -> Sandbox:
        """Stop member ``index`` and start it again: a new sandbox with the same id, in the
        member's own task. Returns the new sandbox once it is ready; if it fails to boot, raises
        :class:`FleetError` (the member is then in :attr:`failed`, and may be restarted again).
        Events: ``restarting``, ``stopped`` (the old sandbox), ``booting``, ``ready`` or
        ``boot-failed``. Cancelled (or timed out) after the old sandbox stopped, the new one goes
        on booting in the fleet."""
        self._ledger.check_open()
        member = self.members[index]
        if member._gone is None or member._stop is None:
            raise FleetError(f"member {index} has not started yet")
        if member._restarting:
            raise FleetError(f"member {index} is already restarting")
        old = member.sandbox
        self._emit(FleetEventKind.RESTARTING, old)
        member._restarting = True
        with deadline(timeout, f"restart of {old.id}"):
            try:
                member._stop.set()
                await member._gone.wait()
                if self._closing or not self._ledger.is_open:
                    raise FleetError("the fleet closed during the restart")
                member.sandbox = self._sandbox(index, self._member_configs[index], old.id)
                member.restarts += 1
                self._ledger.boots_begin(1)
                self._start_member(member)
                assert member.booted is not None
                await member.booted.wait()
            finally:
                member._restarting = False
        if member.boot_error is not None:
            raise FleetError(f"{old.id} failed to boot again: {member.boot_error}") from member.boot_error
        return member.sandbox

    # -- work ---------------------------------------------------------------------------------

    async def map(self, fn: Callable[[Sandbox], Awaitable[R]]) -> list[tuple[Sandbox, Outcome[R]]]:
        """Run ``fn`` on every member at once; one (sandbox, outcome) per member, in order.

        Members that failed to boot are in the list with their boot error. A member whose ``fn``
        raises does not stop the others (unless ``fail_fast``, where the rest are cancelled).
        """

        def report(kind: str, member: Member, detail: str) -> None:
            self._emit(FleetEventKind(kind), member.sandbox, detail)

        return await self._ledger.map(fn, report)

    def summary(self) -> list[dict[str, Any]]:
        return [
            {"id": m.sandbox.id, "state": str(m.sandbox.state), "boot_seconds": m.boot_seconds,
             "error": str(m.boot_error) if m.boot_error else (m.sandbox.failure or None)}
            for m in self.members
        ]  # fmt: skip
