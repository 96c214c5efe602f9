"""The member ledger that :class:`~vmctl.Fleet`, :class:`~vmctl.SandboxPool` and
:class:`~vmctl.cluster.ClusterFleet` share: one copy of the bookkeeping they all need.

What is here, and only here: the checks of a fleet's configs and size; the user's event callback
and what happens when it raises (logged as a warning, never taken down with it); the "something
changed" broadcast that ``as_ready``, ``map`` and acquirers wait on; boot accounting (how many
boots are under way, the order members became ready, the first failure); ``as_ready`` and
``map``; and entering and leaving the owner's block through one exit stack, so that a failure
half-way through ``__aenter__`` closes exactly what was opened.

Bookkeeping is synchronous: a boot's outcome is recorded in one step with no await inside, so a
cancelled caller never leaves the counts half-updated.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
from anyio.abc import TaskGroup

from vmctl.config import SandboxConfig, shared_writable_disks
from vmctl.core.log import get_logger
from vmctl.core.waiting import Broadcast
from vmctl.errors import FleetError, VmctlError

S = TypeVar("S")  # the member's sandbox: a local Sandbox or a cluster's RemoteSandbox
E = TypeVar("E")  # the owner's event type (FleetEvent, PoolEvent)
R = TypeVar("R")  # what a map function returns


@dataclass(frozen=True)
class Outcome(Generic[R]):
    """What one member produced: a value, or the error that stopped it (never both, never lost)."""

    value: R | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(eq=False)
class LedgerMember(Generic[S]):
    """One place in a fleet: its sandbox and how its (latest) boot went."""

    index: int
    sandbox: S
    boot_seconds: float | None = None
    boot_error: BaseException | None = None
    boot_done: bool = False
    #: set once the current boot has an outcome (made when the boot starts: events need a loop)
    booted: anyio.Event | None = field(default=None, repr=False)


M = TypeVar("M", bound=LedgerMember[Any])


def fleet_configs(config: SandboxConfig | Sequence[SandboxConfig], size: int | None, *,
                  max_concurrent_starts: int, template: bool) -> list[SandboxConfig]:  # fmt: skip
    """One config per member, checked as every fleet checks them (a :class:`FleetError` naming
    the argument otherwise)."""
    configs = [config] * (size or 1) if isinstance(config, SandboxConfig) else list(config)
    if size is not None and not isinstance(config, SandboxConfig) and size != len(configs):
        raise FleetError("size: give either one config and a size, or a list of configs")
    if not configs:
        raise FleetError("size: a fleet needs at least one sandbox")
    if max_concurrent_starts < 1:
        raise FleetError("max_concurrent_starts: must be at least 1")
    refuse_shared_writable_disks(configs)
    if template and any(c != configs[0] for c in configs):
        raise FleetError("template: members started from one template share one config")
    return configs


def refuse_shared_writable_disks(configs: list[SandboxConfig]) -> None:
    """Members opening one image read-write would be refused by QEMU's locks (or corrupt it)."""
    shared = shared_writable_disks(configs)
    if shared:
        raise FleetError(f"members would share writable disks {shared}: give each its own copy, "
                         "mark data disks read_only, or use overlays (image_overlay=True, "
                         "BlockDevice(overlay=True)) over a shared read-only base")  # fmt: skip


class EventReporter(Generic[E]):
    """Hands events to the user's ``on_event``. A callback that raises is logged as a warning
    (``on_event callback failed``, with the event and the error) and the owner goes on: a broken
    progress display must not take a fleet or a pool down."""

    def __init__(self, on_event: Callable[[E], None] | None, owner: str, **bound: Any) -> None:
        self._on_event = on_event
        self.owner = owner
        self.log = get_logger(f"vmctl.{owner}", **bound)

    @property
    def wanted(self) -> bool:
        return self._on_event is not None

    def __call__(self, event: E) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception as exc:  # noqa: BLE001 - reported, never raised into the owner
            self.log.warning(f"{self.owner} on_event callback failed", for_event=repr(event), error=repr(exc))


class OwnerBlock:
    """The ``async with`` block of a fleet or a pool: one exit stack, entered once.

    :meth:`open` runs the owner's set-up with the stack; a failure (or cancellation) half-way
    closes exactly what the set-up had pushed, last first, and re-raises. :meth:`close` does the
    same on the way out. ``changes`` is notified when the block closes, so that every waiter
    re-checks."""

    def __init__(self, changes: Broadcast, *, error: type[VmctlError], already_open: str, not_open: str) -> None:
        self.changes = changes
        self._error, self._already_open, self._not_open = error, already_open, not_open
        self._stack: AsyncExitStack | None = None

    @property
    def is_open(self) -> bool:
        return self._stack is not None

    def check_open(self) -> None:
        if self._stack is None:
            raise self._error(self._not_open)

    async def open(self, setup: Callable[[AsyncExitStack], Awaitable[None]]) -> None:
        if self._stack is not None:
            raise self._error(self._already_open)
        stack = self._stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            await setup(stack)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Leave the block: everything pushed on the stack unwinds, last first. Idempotent."""
        stack, self._stack = self._stack, None
        self.changes.notify()  # waiters re-check: the owner is closing
        if stack is not None:
            await stack.__aexit__(None, None, None)


class MemberLedger(Generic[M]):
    """A fleet's members, their boots, and its block (see the module docstring)."""

    def __init__(self, *, fail_fast: bool, owner: str) -> None:
        self.members: list[M] = []
        self.fail_fast = fail_fast
        self.changes = Broadcast()
        #: members in the order they became ready (a restarted member appears again)
        self.ready_order: list[M] = []
        self.first_failure: BaseException | None = None
        self.booting = 0
        self._all_booted: anyio.Event | None = None
        self.block = OwnerBlock(self.changes, error=FleetError, already_open=f"this {owner} is already open",
                                not_open=f"the fleet is not open: use it inside 'async with {owner}(...) as fleet:'")  # fmt: skip

    @property
    def is_open(self) -> bool:
        return self.block.is_open

    def check_open(self) -> None:
        self.block.check_open()

    async def open(self, setup: Callable[[AsyncExitStack], Awaitable[None]]) -> None:
        self._all_booted = anyio.Event()
        await self.block.open(setup)

    async def close(self) -> None:
        await self.block.close()

    # -- boots ----------------------------------------------------------------------------------

    def boots_begin(self, count: int) -> None:
        """``count`` boots are about to start (the members exist now)."""
        self.booting += count
        if self.booting == 0 and self._all_booted is not None:
            self._all_booted.set()

    def boot_started(self, member: M) -> None:
        """A (re)boot of ``member`` begins: a fresh ``booted`` event, no outcome yet."""
        member.booted = anyio.Event()
        member.boot_seconds, member.boot_error, member.boot_done = None, None, False

    def boot_succeeded(self, member: M, seconds: float) -> None:
        member.boot_seconds = seconds
        self.ready_order.append(member)

    def boot_failed(self, member: M, error: BaseException) -> None:
        member.boot_error = error
        if self.first_failure is None:
            self.first_failure = error
        if self.fail_fast and self._all_booted is not None:
            self._all_booted.set()  # the owner's __aenter__ raises and closes everyone

    def boot_finished(self, member: M) -> None:
        """The boot has its outcome (or was cancelled): count it once."""
        if member.boot_done:
            return
        member.boot_done = True
        if member.booted is not None:
            member.booted.set()
        self.booting -= 1
        if self.booting == 0 and self._all_booted is not None:
            self._all_booted.set()
        self.changes.notify()

    def raise_first_failure(self) -> None:
        """With ``fail_fast``, a member's boot failure is the whole fleet's."""
        if self.fail_fast and self.first_failure is not None:
            raise FleetError(f"a member failed to boot: {self.first_failure}") from self.first_failure

    async def wait_booted(self) -> None:
        """Until every boot has its outcome (or, with ``fail_fast``, the first failure: raised)."""
        assert self._all_booted is not None
        await self._all_booted.wait()
        self.raise_first_failure()

    # -- readiness and work ----------------------------------------------------------------------

    async def as_ready(self) -> AsyncIterator[M]:
        """Members as they become ready, in that order, until no boot is under way and every
        ready member was yielded; with ``fail_fast`` the first boot failure raises here."""
        self.check_open()
        seen = 0
        while True:
            while seen < len(self.ready_order):
                seen += 1
                yield self.ready_order[seen - 1]
            self.raise_first_failure()
            if self.booting == 0:
                return
            await self.changes.wait()

    async def map(self, fn: Callable[[Any], Awaitable[R]], report: Callable[[str, M, str], None], *,
                  lost: Callable[[M], Awaitable[BaseException]] | None = None,
                  ) -> list[tuple[Any, Outcome[R]]]:  # fmt: skip
        """Run ``fn`` on every member at once; one (sandbox, outcome) per member, in order.

        A member that failed to boot gets its boot error; one whose ``fn`` raises does not stop
        the others (with ``fail_fast`` the rest are cancelled). ``report(kind, member, detail)``
        announces ``running``, ``done`` and ``error``. ``lost(member)``, where given, returns once
        the member is gone (a cluster node died) with the error that is then its outcome: its
        call is ended at once, whatever it waits for."""
        outcomes: list[Outcome[R] | None] = [None] * len(self.members)

        async def call(member: M) -> Outcome[R]:
            try:
                return Outcome(value=await fn(member.sandbox))
            except Exception as exc:  # noqa: BLE001 - kept as this member's outcome
                return Outcome(error=exc)

        async def call_unless_lost(member: M) -> Outcome[R]:
            assert lost is not None
            got: list[Outcome[R]] = []
            async with anyio.create_task_group() as inner:

                async def watch() -> None:
                    got.append(Outcome(error=await lost(member)))
                    inner.cancel_scope.cancel()

                inner.start_soon(watch)
                got.append(await call(member))
                inner.cancel_scope.cancel()
            return got[0]

        async def one(member: M, tg: TaskGroup) -> None:
            if member.booted is not None:
                await member.booted.wait()  # with wait=False a member may still be booting
            if member.boot_error is not None:
                outcomes[member.index] = Outcome(error=member.boot_error)
                return
            report("running", member, "")
            outcome = outcomes[member.index] = await (call(member) if lost is None else call_unless_lost(member))
            if outcome.error is None:
                report("done", member, "")
            else:
                report("error", member, str(outcome.error))
                if self.fail_fast:
                    tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            for member in self.members:
                tg.start_soon(one, member, tg)
        cancelled = FleetError("cancelled because another member failed (fail_fast)")
        return [(m.sandbox, outcomes[m.index] or Outcome(error=cancelled)) for m in self.members]
