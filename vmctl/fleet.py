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
from typing import Any, Generic, TypeVar

import anyio
from anyio.abc import TaskGroup

from vmctl.config import SandboxConfig, shared_writable_disks
from vmctl.errors import FleetError
from vmctl.hypervisors.base import Backend
from vmctl.sandbox import Sandbox
from vmctl.state import SandboxState
from vmctl.template import boot_template
from vmctl.waiting import deadline

T = TypeVar("T")


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


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What one member produced: a value, or the error that stopped it (never both, never lost)."""

    value: T | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(eq=False)
class Member:
    """One place in the fleet: its current sandbox (a restart puts a new one here) and its boot."""

    index: int
    sandbox: Sandbox
    boot_seconds: float | None = None
    boot_error: BaseException | None = None
    boot_done: bool = False
    restarts: int = 0  # how many times restart() replaced the sandbox
    _restarting: bool = field(default=False, repr=False)
    # one set per run of the member task (made when it starts: events need the event loop)
    _booted: anyio.Event | None = field(default=None, repr=False)
    _stop: anyio.Event | None = field(default=None, repr=False)
    _gone: anyio.Event | None = field(default=None, repr=False)


def refuse_shared_writable_disks(configs: list[SandboxConfig]) -> None:
    """Members opening one image read-write would be refused by QEMU's locks (or corrupt it)."""
    shared = shared_writable_disks(configs)
    if shared:
        raise FleetError(f"members would share writable disks {shared}: give each its own copy, "
                         "mark data disks read_only, or use overlays (image_overlay=True, "
                         "BlockDevice(overlay=True)) over a shared read-only base")  # fmt: skip


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
        self._configs = configs
        self._template = template
        #: ``async with`` waits for every boot (False: use :meth:`as_ready`)
        self.wait = wait
        self._member_configs = configs
        self._id_prefix, self._backend, self._start_timeout = id_prefix, backend, start_timeout
        #: how long the template took to boot and save (template fleets only)
        self.template_seconds: float | None = None
        # with a template the members exist once it does (a clone's config names its files)
        self.members = [] if template else self._make_members(configs)
        self.fail_fast = fail_fast
        self._limiter = anyio.CapacityLimiter(max_concurrent_starts)
        self._on_event = on_event
        self._stack: AsyncExitStack | None = None
        self._tg: TaskGroup | None = None
        self._booting = 0  # set when the members exist (after the template, if any)
        self._all_booted: anyio.Event | None = None
        self._closing: anyio.Event | None = None
        self._changed: anyio.Event | None = None  # replaced on every boot outcome (as_ready waits on it)
        self._ready_log: list[Member] = []  # members in the order they became ready
        self._first_failure: BaseException | None = None

    def _make_members(self, configs: list[SandboxConfig]) -> list[Member]:
        self._member_configs = configs
        return [
            Member(i, Sandbox(c, id=f"{self._id_prefix}-{i}", backend=self._backend, start_timeout=self._start_timeout))
            for i, c in enumerate(configs)
        ]

    async def _boot_template(self, stack: AsyncExitStack) -> None:
        """Boot one sandbox to be the template (it saves its state and stops); members clone it."""
        started = time.monotonic()
        clone = await boot_template(self._configs[0], stack, id=f"{self._id_prefix}-template",
                                    backend=self._backend, start_timeout=self._start_timeout)  # fmt: skip
        self.template_seconds = time.monotonic() - started
        self.members = self._make_members([clone] * len(self._configs))

    # -- introspection -----------------------------------------------------------------------

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
        if self._on_event is not None:
            try:
                self._on_event(FleetEvent(kind, sandbox.id, detail))
            except Exception as exc:  # a broken progress display must not take the fleet down
                sandbox.log.warning("fleet on_event callback failed", error=repr(exc))

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Fleet:
        self._all_booted = anyio.Event()
        self._closing = anyio.Event()
        self._changed = anyio.Event()
        stack = AsyncExitStack()
        await stack.__aenter__()
        self._stack = stack
        try:
            if self._template:
                await self._boot_template(stack)
            self._booting = len(self.members)
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            for member in self.members:
                self._start_member(member)
            if self.wait:
                await self._all_booted.wait()
            if self.wait and self.fail_fast and self._first_failure is not None:
                raise FleetError(f"a member failed to boot: {self._first_failure}") from self._first_failure
        except BaseException:
            if self._tg is not None:
                self._tg.cancel_scope.cancel()  # stop boots under way; teardowns are shielded
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _close(self) -> None:
        stack, self._stack = self._stack, None
        if stack is None:
            return
        assert self._closing is not None
        self._closing.set()
        for member in self.members:
            if member._stop is not None:
                member._stop.set()
        self._notify()
        await stack.__aexit__(None, None, None)  # members tear down in their own tasks

    def _start_member(self, member: Member) -> None:
        """Start the task that owns ``member.sandbox`` (synchronous: no await between the checks
        of a caller and the start)."""
        assert self._tg is not None
        member._booted, member._stop, member._gone = anyio.Event(), anyio.Event(), anyio.Event()
        self._tg.start_soon(self._run_member, member, member._stop, member._gone, name=member.sandbox.id)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = anyio.Event()

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
                        member.boot_error = exc
                        self._emit(FleetEventKind.BOOT_FAILED, sandbox, str(exc))
                        self._note_failure(exc)
                    else:
                        member.boot_seconds = time.monotonic() - started
                        self._ready_log.append(member)
                        self._emit(FleetEventKind.READY, sandbox, f"{member.boot_seconds:.2f}s")
                self._boot_finished(member)
                if member.boot_error is None:
                    await stop.wait()  # the fleet closes, or restart() wants this sandbox gone
        finally:
            self._boot_finished(member)  # also when cancelled while booting
            self._emit(FleetEventKind.STOPPED, sandbox, str(sandbox.state))
            gone.set()

    def _boot_finished(self, member: Member) -> None:
        if member.boot_done:
            return
        member.boot_done = True
        if member._booted is not None:
            member._booted.set()
        self._booting -= 1
        if self._booting == 0 and self._all_booted is not None:
            self._all_booted.set()
        self._notify()

    def _note_failure(self, exc: BaseException) -> None:
        if self._first_failure is None:
            self._first_failure = exc
        if self.fail_fast and self._all_booted is not None:
            self._all_booted.set()  # __aenter__ raises and closes everyone

    def _check_open(self) -> None:
        if self._stack is None:
            raise FleetError("the fleet is not open: use it inside 'async with Fleet(...) as fleet:'")

    # -- readiness and restarts -----------------------------------------------------------------

    async def as_ready(self) -> AsyncIterator[Member]:
        """Members as they become ready (their :class:`Member`, with ``.sandbox``), in that order.

        Members whose boot fails are not yielded (they are in :attr:`failed` with their
        ``boot_error``); with ``fail_fast`` the first such failure raises :class:`FleetError`
        here instead. The iteration ends once no boot is under way and every ready member was
        yielded. A member restarted meanwhile is yielded again when its new sandbox is ready.
        With ``wait=True`` (the default) every boot is already done: this yields the ready
        members in the order they became ready.
        """
        self._check_open()
        seen = 0
        while True:
            while seen < len(self._ready_log):
                seen += 1
                yield self._ready_log[seen - 1]
            if self.fail_fast and self._first_failure is not None:
                raise FleetError(f"a member failed to boot: {self._first_failure}") from self._first_failure
            if self._booting == 0:
                return
            assert self._changed is not None
            await self._changed.wait()

    async def restart(self, index: int, *, timeout: float | None = None) -> Sandbox:
        """Stop member ``index`` and start it again: a new sandbox with the same id, in the
        member's own task. Returns the new sandbox once it is ready; if it fails to boot, raises
        :class:`FleetError` (the member is then in :attr:`failed`, and may be restarted again).
        Events: ``restarting``, ``stopped`` (the old sandbox), ``booting``, ``ready`` or
        ``boot-failed``. Cancelled (or timed out) after the old sandbox stopped, the new one goes
        on booting in the fleet."""
        self._check_open()
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
                assert self._closing is not None
                if self._closing.is_set():
                    raise FleetError("the fleet closed during the restart")
                member.sandbox = Sandbox(self._member_configs[index], id=old.id, backend=self._backend,
                                         start_timeout=self._start_timeout)  # fmt: skip
                member.boot_seconds, member.boot_error, member.boot_done = None, None, False
                member.restarts += 1
                self._booting += 1
                self._start_member(member)
                assert member._booted is not None
                await member._booted.wait()
            finally:
                member._restarting = False
        if member.boot_error is not None:
            raise FleetError(f"{old.id} failed to boot again: {member.boot_error}") from member.boot_error
        return member.sandbox

    # -- work ---------------------------------------------------------------------------------

    async def map(self, fn: Callable[[Sandbox], Awaitable[T]]) -> list[tuple[Sandbox, Outcome[T]]]:
        """Run ``fn`` on every member at once; one (sandbox, outcome) per member, in order.

        Members that failed to boot are in the list with their boot error. A member whose ``fn``
        raises does not stop the others (unless ``fail_fast``, where the rest are cancelled).
        """
        outcomes: list[Outcome[T] | None] = [None] * len(self.members)

        async def one(member: Member, tg: TaskGroup) -> None:
            if member._booted is not None:
                await member._booted.wait()  # with wait=False a member may still be booting
            sandbox = member.sandbox
            if member.boot_error is not None:
                outcomes[member.index] = Outcome(error=member.boot_error)
                return
            self._emit(FleetEventKind.RUNNING, sandbox)
            try:
                value = await fn(sandbox)
            except Exception as exc:  # noqa: BLE001 - kept as this member's outcome
                outcomes[member.index] = Outcome(error=exc)
                self._emit(FleetEventKind.ERROR, sandbox, str(exc))
                if self.fail_fast:
                    tg.cancel_scope.cancel()
            else:
                outcomes[member.index] = Outcome(value=value)
                self._emit(FleetEventKind.DONE, sandbox)

        async with anyio.create_task_group() as tg:
            for member in self.members:
                tg.start_soon(one, member, tg)
        cancelled = FleetError("cancelled because another member failed (fail_fast)")
        return [(m.sandbox, outcomes[m.index] or Outcome(error=cancelled)) for m in self.members]

    def summary(self) -> list[dict[str, Any]]:
        return [
            {"id": m.sandbox.id, "state": str(m.sandbox.state), "boot_seconds": m.boot_seconds,
             "error": str(m.boot_error) if m.boot_error else (m.sandbox.failure or None)}
            for m in self.members
        ]  # fmt: skip
