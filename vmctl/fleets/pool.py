"""Warm pools: ``size`` sandboxes kept ready, each handed to one user and destroyed afterwards.

Theory of operation. Every pooled sandbox is a *member*: one task in the pool's task group that
enters the sandbox's ``async with`` (its start) and later leaves it (its teardown), so a
sandbox's block is entered and left in one task, as :class:`~vmctl.Sandbox` requires. In between
the member is *ready* (waiting to be taken), then *in use* once :meth:`SandboxPool.acquire` took
it: the acquirer drives the running sandbox from its own task while the member task keeps the
block open and waits for the release. After the release the member leaves the block (QEMU stops,
the run directory goes) and ends: a sandbox is never handed out twice.

A refill task keeps ``ready + starting`` at ``size``: whenever a member is taken, fails to start
or dies while waiting, it starts another. Starts go through a capacity limiter
(``max_concurrent_starts``). A failed start is reported (a ``start-failed`` event,
``stats().last_error``) and the next start waits a backoff that doubles up to ``max_backoff``
and resets after a success, so a broken config never spins.

Members are template clones when the machine offers templates (every machine but ``microvm``,
and not with a 9p share, which a clone cannot take):
the pool boots one template sandbox first, whose files live in a private run directory and go
with the pool. Otherwise each member cold-boots. A member counts as ready once its guest has run
``true``: that proves the agent answers, and a guest's first command (slower, on fresh
copy-on-write pages) is not on the acquirer's clock.

Bookkeeping is synchronous (as httpcore's pool does it): taking a ready member and releasing it
are single steps with no await inside, so a cancelled ``acquire`` never loses a sandbox or hands
one out twice. Leaving the pool's block cancels its task group: starts under way are cancelled,
every member tears down (sandbox teardown is shielded), and the template's files are removed, on
every path (normal exit, error, cancellation).
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup, TaskStatus

from vmctl.config import SandboxConfig, shared_writable_disks
from vmctl.core.state import SandboxState
from vmctl.core.waiting import Broadcast
from vmctl.devices import SharedDirectory
from vmctl.errors import PoolError, PoolTimeout, VmctlError
from vmctl.fleets.members import EventReporter, OwnerBlock
from vmctl.fleets.template import boot_template
from vmctl.hypervisors.base import Backend
from vmctl.machine.shares import member_config
from vmctl.sandbox.facade import Sandbox

WARM_UP_TIMEOUT = 30.0
RELEASE_LIMIT = 30.0  # seconds a release waits for the sandbox to be gone


class PoolEventKind(enum.Enum):
    TEMPLATE = "template"  # the template is saved; members are clones of it
    STARTING = "starting"  # a member's start began (it holds a start slot)
    READY = "ready"  # a member is ready to be acquired
    START_FAILED = "start-failed"  # a start failed; the next one waits a backoff
    ACQUIRED = "acquired"  # an acquire took a ready member
    RELEASED = "released"  # its user is done; it is being destroyed
    DIED = "died"  # a ready member failed or stopped before anyone took it
    STOPPED = "stopped"  # a member is gone (QEMU stopped, run directory removed)


class _Phase(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    IN_USE = "in-use"
    STOPPING = "stopping"


@dataclass(frozen=True)
class PoolStats:
    """How many members are in each phase right now, and what happened so far."""

    size: int
    ready: int
    in_use: int
    starting: int
    stopping: int
    started: int  # successful starts so far
    failed: int  # failed starts so far
    last_error: BaseException | None = None


@dataclass(frozen=True)
class PoolEvent:
    kind: PoolEventKind
    sandbox_id: str
    stats: PoolStats  # the counts just after this event
    detail: str = ""
    at: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Member:
    sandbox: Sandbox
    phase: _Phase = _Phase.STARTING
    released: anyio.Event = field(default_factory=anyio.Event)
    gone: anyio.Event = field(default_factory=anyio.Event)  # its sandbox stopped and cleaned up


class SandboxPool:
    """``async with SandboxPool(config, size=2) as pool:`` then ``async with pool.acquire() as sb:``."""

    def __init__(
        self,
        config: SandboxConfig,
        *,
        size: int = 2,
        max_concurrent_starts: int = 2,
        template: bool | None = None,
        on_event: Callable[[PoolEvent], None] | None = None,
        id_prefix: str = "pool",
        start_timeout: float = 300.0,
        backend: Backend | None = None,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        if size < 1:
            raise PoolError("size: a pool keeps at least one sandbox ready")
        if max_concurrent_starts < 1:
            raise PoolError("max_concurrent_starts: must be at least 1")
        if backoff <= 0 or max_backoff < backoff:
            raise PoolError("backoff: must be positive and at most max_backoff")
        shared = shared_writable_disks([config, config])
        if shared:
            raise PoolError(f"members would share writable disks {shared}: a pooled config may only have "
                            "read-only disks and overlays (image_overlay=True, BlockDevice(overlay=True))")  # fmt: skip
        self.size = size
        self.max_concurrent_starts = max_concurrent_starts
        #: members are clones of one template (default: wherever the machine offers templates)
        # (a 9p share cannot be plugged into a clone: such a pool boots its members)
        nine_p = any(isinstance(d, SharedDirectory) and not d.over_virtiofs for d in config.devices)
        self.template = config.machine != "microvm" and not nine_p if template is None else template
        #: how long the template took to boot and save (template pools only)
        self.template_seconds: float | None = None
        self._config = self._member_config = config
        self._report: EventReporter[PoolEvent] = EventReporter(on_event, "pool", pool=id_prefix)
        self._id_prefix, self._backend, self._start_timeout = id_prefix, backend, start_timeout
        self._backoff, self._max_backoff = backoff, max_backoff
        self.log = self._report.log
        self._members: list[_Member] = []
        self._numbers = itertools.count()
        self._started = self._failed = self._failures_in_a_row = 0
        self._last_error: BaseException | None = None
        self._retry_at = 0.0
        self._tg: TaskGroup | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._changes = Broadcast()
        self._block = OwnerBlock(self._changes, error=PoolError, already_open="this SandboxPool is already open",
                                 not_open="the pool is closed: use it inside 'async with SandboxPool(...) as pool:'")  # fmt: skip

    # -- introspection -----------------------------------------------------------------------

    def stats(self) -> PoolStats:
        counts = {phase: 0 for phase in _Phase}
        for member in self._members:
            counts[member.phase] += 1
        return PoolStats(self.size, counts[_Phase.READY], counts[_Phase.IN_USE], counts[_Phase.STARTING],
                         counts[_Phase.STOPPING], self._started, self._failed, self._last_error)  # fmt: skip

    @property
    def ready(self) -> int:
        return self.stats().ready

    @property
    def in_use(self) -> int:
        return self.stats().in_use

    @property
    def starting(self) -> int:
        return self.stats().starting

    def _emit(self, kind: PoolEventKind, sandbox_id: str, detail: str = "") -> None:
        self._changes.notify()  # acquirers, the refill task and wait_ready re-check
        if self._report.wanted:
            self._report(PoolEvent(kind, sandbox_id, self.stats(), detail))

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> SandboxPool:
        await self._block.open(self._setup)
        return self

    async def _setup(self, stack: AsyncExitStack) -> None:
        self._limiter = anyio.CapacityLimiter(self.max_concurrent_starts)
        if self.template:
            started = time.monotonic()
            self._member_config = await boot_template(self._config, stack, id=f"{self._id_prefix}-template",
                                                      backend=self._backend, start_timeout=self._start_timeout)  # fmt: skip
            self.template_seconds = time.monotonic() - started
            self._emit(PoolEventKind.TEMPLATE, f"{self._id_prefix}-template", f"{self.template_seconds:.2f}s")
        stack.callback(self._forget_task_group)  # after the task group has ended
        tg = self._tg = await stack.enter_async_context(anyio.create_task_group())
        # first on the way out: starts stop; members tear down (shielded)
        stack.callback(tg.cancel_scope.cancel)
        await tg.start(self._refill)

    async def __aexit__(self, *exc: object) -> None:
        await self._block.close()

    def _forget_task_group(self) -> None:
        self._tg = None

    async def wait_ready(self, count: int | None = None, *, timeout: float | None = None) -> None:
        """Wait until at least ``count`` members (default: ``size``) are ready."""
        want = self.size if count is None else count
        with anyio.move_on_after(math.inf if timeout is None else timeout):
            while self.ready < want:
                self._block.check_open()
                await self._changes.wait()
            return
        raise PoolTimeout(f"{want} ready sandboxes did not come within {timeout:g}s ({self._describe()})",
                          last_error=self._last_error)  # fmt: skip

    def _describe(self) -> str:
        s = self.stats()
        last = f"; last start failure: {s.last_error}" if s.last_error is not None else ""
        return f"ready {s.ready}, in use {s.in_use}, starting {s.starting}{last}"

    # -- handing out ----------------------------------------------------------------------------

    @asynccontextmanager
    async def acquire(self, *, timeout: float | None = None) -> AsyncIterator[Sandbox]:
        """A running sandbox for the block, for this caller alone; destroyed after the block.

        Waits while none is ready; after ``timeout`` seconds raises :class:`PoolTimeout`. Leaving
        the block hands the sandbox back to its member task, which stops it at once, and returns
        when it is gone (QEMU and its files)."""
        member = await self._take(timeout)
        try:
            yield member.sandbox
        finally:
            self._give_back(member)
            # the block ends when the sandbox is gone (QEMU quits at once: tens of milliseconds)
            with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_LIMIT):
                await member.gone.wait()

    async def _take(self, timeout: float | None) -> _Member:
        with anyio.move_on_after(math.inf if timeout is None else timeout):
            while True:
                self._block.check_open()
                member = self._pop_ready()
                if member is not None:
                    return member
                await self._changes.wait()
        raise PoolTimeout(f"no pooled sandbox became ready within {timeout:g}s ({self._describe()})",
                          last_error=self._last_error)  # fmt: skip

    def _pop_ready(self) -> _Member | None:
        """Take the oldest ready member (synchronous: nothing can interrupt it half-way)."""
        for member in self._members:
            if member.phase is _Phase.READY and member.sandbox.state is SandboxState.RUNNING:
                member.phase = _Phase.IN_USE
                self._emit(PoolEventKind.ACQUIRED, member.sandbox.id)
                return member
        return None

    def _give_back(self, member: _Member) -> None:
        member.phase = _Phase.STOPPING
        member.released.set()
        self._emit(PoolEventKind.RELEASED, member.sandbox.id)

    # -- members ----------------------------------------------------------------------------------

    async def _refill(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep ``ready + starting`` at ``size``; after failed starts, wait the backoff first."""
        task_status.started()
        while True:
            wait = self._retry_at - anyio.current_time()
            if wait > 0:
                await anyio.sleep(wait)
                continue
            stats = self.stats()
            if stats.ready + stats.starting < self.size:
                self._spawn()
                continue
            await self._changes.wait()

    def _spawn(self) -> None:
        assert self._tg is not None
        index = next(self._numbers)
        sandbox_id = f"{self._id_prefix}-{index}"
        sandbox = Sandbox(member_config(self._member_config, sandbox_id=sandbox_id, index=index), id=sandbox_id,
                          backend=self._backend, start_timeout=self._start_timeout)  # fmt: skip
        member = _Member(sandbox)
        self._members.append(member)
        self._tg.start_soon(self._run_member, member, name=sandbox.id)

    async def _run_member(self, member: _Member) -> None:
        """Own one sandbox from start to teardown; never let its failure reach the task group."""
        assert self._limiter is not None
        sandbox = member.sandbox
        try:
            async with AsyncExitStack() as stack:
                async with self._limiter:
                    self._emit(PoolEventKind.STARTING, sandbox.id)
                    started = time.monotonic()
                    try:
                        await stack.enter_async_context(sandbox)
                        # a member is ready once its agent has run a command: that proves it
                        # works, and the guest's first exec (slow: fresh copy-on-write pages)
                        # is not on an acquirer's clock
                        await sandbox.exec(["true"], timeout=WARM_UP_TIMEOUT, check=True)
                    except Exception as exc:  # noqa: BLE001 - reported, counted, retried after a backoff
                        self._start_failed(member, exc)
                        return
                self._start_succeeded(member, time.monotonic() - started)
                await self._hold(member)
                # Nobody will see this guest again: skip the guest's own power-off (no grace
                # period) and have QEMU quit at once; the block's exit then only cleans up.
                try:
                    await sandbox.stop(timeout=0)
                except Exception as exc:  # noqa: BLE001 - the block's exit still tears it down
                    self.log.warning("stopping a released sandbox failed", sandbox=sandbox.id, error=repr(exc))
        finally:
            self._members.remove(member)
            member.gone.set()
            self._emit(PoolEventKind.STOPPED, sandbox.id, str(sandbox.state))

    def _start_failed(self, member: _Member, exc: Exception) -> None:
        member.phase = _Phase.STOPPING
        self._failed += 1
        self._failures_in_a_row += 1
        self._last_error = exc
        delay = min(self._max_backoff, self._backoff * 2 ** (self._failures_in_a_row - 1))
        self._retry_at = anyio.current_time() + delay
        self.log.warning("pooled sandbox failed to start", sandbox=member.sandbox.id, error=str(exc)[:500],
                         retry_in=delay)  # fmt: skip
        self._emit(PoolEventKind.START_FAILED, member.sandbox.id, f"{exc} (next start in {delay:g}s)")

    def _start_succeeded(self, member: _Member, seconds: float) -> None:
        member.phase = _Phase.READY
        self._started += 1
        self._failures_in_a_row = 0
        self._retry_at = 0.0
        self._emit(PoolEventKind.READY, member.sandbox.id, f"{seconds:.2f}s")

    async def _hold(self, member: _Member) -> None:
        """Keep the sandbox's block open until its user releases it, or until it dies unclaimed."""
        sandbox = member.sandbox

        async def watch(scope: anyio.CancelScope) -> None:
            try:
                await sandbox.wait_for_state(SandboxState.FAILED, SandboxState.STOPPED)
            except VmctlError:
                pass  # it reached a state from which neither is possible: it is gone as well
            if member.phase is _Phase.READY:  # nobody took it: replace it
                member.phase = _Phase.STOPPING
                self._emit(PoolEventKind.DIED, sandbox.id, sandbox.failure or str(sandbox.state))
                scope.cancel()
            # in use: its user sees the failure; the member waits for the release as usual

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, tg.cancel_scope)
            await member.released.wait()
            tg.cancel_scope.cancel()
