"""Cluster fleets: a :class:`~vmctl.Fleet` whose members run on the nodes of a Ray cluster.

Placement is Ray's: the fleet asks for a placement group with one bundle per member (a marker
share of the ``vmctl_host`` resource and the member's memory) and a strategy (``SPREAD``,
``PACK``, ``STRICT_SPREAD``, ``STRICT_PACK``); each member then starts on the node Ray chose for
its bundle, in that node's host actor. The interface is the local fleet's: ``map``, ``as_ready``,
per-member :class:`~vmctl.fleet.Outcome`, :class:`~vmctl.fleet.FleetEvent`, ``summary()`` (with
each member's node), ``template=True`` (one template per node), ``fail_fast``.

Faults. One watcher task per host actor asks it how it is every ``watch_interval`` seconds. When
an actor is gone (its node died, it was killed) or comes back restarted (empty), every member on
it is marked lost at once: a ``lost`` event, state ``failed``, and :class:`~vmctl.errors.NodeLost`
from any call on it, including calls already waiting; the other members go on. Closing the
fleet stops the members on every host still alive, with a time limit per host, so a dead node
never hangs the driver.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup

from vmctl.cluster.remote import (
    HOST_RESOURCE,
    MARK,
    Host,
    RemoteSandbox,
    host_on,
    host_reply,
    portable,
    qemu_nodes,
    require_ray,
)
from vmctl.config import SandboxConfig
from vmctl.errors import FleetError, NodeLost, VmctlError
from vmctl.fleet import FleetEvent, FleetEventKind, Outcome, refuse_shared_writable_disks

T = TypeVar("T")
STRATEGIES = ("SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK")
CLOSE_LIMIT = 60.0  # seconds closing waits for one host to stop its members


@dataclass(eq=False)
class ClusterMember:
    """One place in a cluster fleet: its remote sandbox, the node it runs on, its boot."""

    index: int
    sandbox: RemoteSandbox
    boot_seconds: float | None = None
    boot_error: BaseException | None = None
    boot_done: bool = False
    booted: anyio.Event = field(default_factory=anyio.Event, repr=False)

    @property
    def node(self) -> str:
        return self.sandbox.node


class ClusterFleet:
    """``async with ClusterFleet(config, size=8, strategy="SPREAD") as fleet:`` boots them on the
    cluster this process is connected to (:func:`vmctl.cluster.connect`)."""

    def __init__(
        self,
        config: SandboxConfig | Sequence[SandboxConfig],
        *,
        size: int | None = None,
        strategy: str = "SPREAD",
        max_concurrent_starts: int = 4,
        fail_fast: bool = False,
        on_event: Callable[[FleetEvent], None] | None = None,
        id_prefix: str = "fleet",
        start_timeout: float = 300.0,
        template: bool = False,
        wait: bool = True,
        bundle: dict[str, float] | None = None,
        placement_timeout: float = 60.0,
        watch_interval: float = 1.0,
    ) -> None:
        configs = [config] * (size or 1) if isinstance(config, SandboxConfig) else list(config)
        if size is not None and not isinstance(config, SandboxConfig) and size != len(configs):
            raise FleetError("size: give either one config and a size, or a list of configs")
        if not configs:
            raise FleetError("size: a fleet needs at least one sandbox")
        if max_concurrent_starts < 1:
            raise FleetError("max_concurrent_starts: must be at least 1")
        if strategy not in STRATEGIES:
            raise FleetError(f"strategy: one of {', '.join(STRATEGIES)}")
        refuse_shared_writable_disks(configs)
        if template and any(c != configs[0] for c in configs):
            raise FleetError("template: members started from one template share one config")
        self._configs = configs
        self._one_config = all(c == configs[0] for c in configs)
        self.strategy = strategy
        self.template = template
        self.wait = wait
        self.fail_fast = fail_fast
        self._bundle = bundle
        self._id_prefix, self._start_timeout = id_prefix, start_timeout
        self._placement_timeout, self._watch_interval = placement_timeout, watch_interval
        self._fleet_id = f"{id_prefix}-{secrets.token_hex(3)}"
        self._max_concurrent_starts = max_concurrent_starts
        self._limiter: anyio.CapacityLimiter | None = None
        self._all_booted: anyio.Event | None = None
        self._changed: anyio.Event | None = None  # replaced on every change (as_ready, map wait on it)
        self._on_event = on_event
        self.members: list[ClusterMember] = []
        self._hosts: dict[str, Host] = {}
        self._pg: Any = None
        self._tg: TaskGroup | None = None
        self._booting = 0
        self._ready_log: list[ClusterMember] = []
        self._lost_reported: set[int] = set()
        self._first_failure: BaseException | None = None
        self._open = False
        #: how long preparing the nodes took (their guest builds and, with ``template``, templates)
        self.prepare_seconds: float | None = None

    # -- introspection -----------------------------------------------------------------------

    @property
    def sandboxes(self) -> list[RemoteSandbox]:
        return [m.sandbox for m in self.members]

    @property
    def running(self) -> list[RemoteSandbox]:
        return [m.sandbox for m in self.members if m.boot_done and m.boot_error is None and not m.sandbox.lost]

    @property
    def failed(self) -> list[ClusterMember]:
        return [m for m in self.members if m.boot_error is not None or m.sandbox.lost]

    @property
    def nodes(self) -> list[str]:
        """The node of each member, in member order."""
        return [m.node for m in self.members]

    def _emit(self, kind: FleetEventKind, sandbox_id: str, detail: str = "") -> None:
        if self._on_event is not None:
            try:
                self._on_event(FleetEvent(kind, sandbox_id, detail))
            except Exception:  # noqa: BLE001,S110 - a broken progress display must not take the fleet down
                pass

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = anyio.Event()

    async def _next_change(self) -> None:
        assert self._changed is not None
        await self._changed.wait()

    # -- lifecycle ---------------------------------------------------------------------------

    async def _place(self) -> list[str]:
        """A placement group of one bundle per member; the node Ray chose for each."""
        require_ray()
        from ray.util.placement_group import placement_group, placement_group_table

        if not qemu_nodes():
            raise FleetError(f"no live node declares the {HOST_RESOURCE!r} resource: start Ray on each QEMU "
                             f"host with: ray start ... --resources '{{\"{HOST_RESOURCE}\": 1}}'")  # fmt: skip
        bundles = []
        for config in self._configs:
            bundle = {HOST_RESOURCE: MARK, "memory": float(config.memory_mib * 1024 * 1024)}
            bundles.append({**bundle, **(self._bundle or {})})
        self._pg = placement_group(bundles, strategy=self.strategy, name=self._fleet_id)
        with anyio.move_on_after(self._placement_timeout):
            await self._pg.ready()
            table = placement_group_table(self._pg)
            return [table["bundles_to_node_id"][i] for i in range(len(bundles))]
        raise FleetError(f"Ray could not place {len(bundles)} members ({self.strategy}) within "
                         f"{self._placement_timeout:g}s: not enough {HOST_RESOURCE} nodes or memory")  # fmt: skip

    async def __aenter__(self) -> ClusterFleet:
        if self._open:
            raise FleetError("this ClusterFleet is already open")
        self._limiter = anyio.CapacityLimiter(self._max_concurrent_starts)
        self._all_booted = anyio.Event()
        self._changed = anyio.Event()
        self._open = True
        try:
            nodes = await self._place()
            for node in nodes:
                self._hosts.setdefault(node, host_on(node))
            self.members = [ClusterMember(i, RemoteSandbox(f"{self._id_prefix}-{i}", self._hosts[node],
                                                           fleet=self._fleet_id, start_timeout=self._start_timeout))
                            for i, node in enumerate(nodes)]  # fmt: skip
            started = time.monotonic()
            await self._prepare_hosts()
            self.prepare_seconds = time.monotonic() - started
            self._booting = len(self.members)
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
            for host in self._hosts.values():
                self._tg.start_soon(self._watch, host)
            for member in self.members:
                member.sandbox.on_move = self._watch_new_host
                self._tg.start_soon(self._boot, member)
            if self.wait:
                await self._all_booted.wait()  # fmt: skip
            if self.wait and self.fail_fast and self._first_failure is not None:
                raise FleetError(f"a member failed to boot: {self._first_failure}") from self._first_failure
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _prepare_hosts(self) -> None:
        """Each node's config for this fleet (its own default guest; its template)."""
        config, default_guest = await portable(self._configs[0])
        if not self._one_config and not self.template:
            return  # members with configs of their own start from them
        errors: list[BaseException] = []

        async def prepare(host: Host) -> None:
            try:
                host_reply(await host.ask("prepare", self._fleet_id, config, default_guest, self.template,
                                          self._start_timeout))  # fmt: skip
            except VmctlError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for host in self._hosts.values():
                tg.start_soon(prepare, host)
        if errors and (self.fail_fast or len(errors) == len(self._hosts)):
            raise FleetError(f"preparing the nodes failed: {errors[0]}") from errors[0]

    async def _boot(self, member: ClusterMember) -> None:
        sandbox = member.sandbox
        assert self._limiter is not None and self._all_booted is not None
        try:
            async with self._limiter:
                self._emit(FleetEventKind.BOOTING, sandbox.id, sandbox.node[:8])
                config = None if self._one_config or self.template else self._configs[member.index]
                try:
                    member.boot_seconds = await sandbox.start(config)
                except VmctlError as exc:
                    member.boot_error = exc
                    self._emit(FleetEventKind.BOOT_FAILED, sandbox.id, str(exc))
                    if self._first_failure is None:
                        self._first_failure = exc
                    if self.fail_fast:
                        self._all_booted.set()
                else:
                    self._ready_log.append(member)
                    self._emit(FleetEventKind.READY, sandbox.id, f"{member.boot_seconds:.2f}s")
        finally:
            member.boot_done = True
            member.booted.set()
            self._booting -= 1
            if self._booting == 0:
                self._all_booted.set()
            self._notify()

    def _watch_new_host(self, host: Host) -> None:
        """A member moved to ``host``: watch it too (once)."""
        if self._tg is not None and all(h is not host for h in self._hosts.values()):
            self._hosts[f"{host.node_id}-{id(host)}"] = host
            self._tg.start_soon(self._watch, host)

    async def _watch(self, host: Host) -> None:
        """Ask ``host`` how it is until the fleet closes; mark its members lost once it is gone."""
        incarnation = None
        while True:
            reason = ""
            try:
                with anyio.fail_after(max(10.0, 5 * self._watch_interval)):
                    info = await host.info()
                if incarnation is None:
                    incarnation = info.incarnation
                elif info.incarnation != incarnation or info.restarted:
                    reason = f"the host actor on node {host.node_id[:8]} was restarted: its sandboxes are gone"
            except NodeLost as exc:
                reason = str(exc)
            except TimeoutError:
                pass  # slow is not lost (its QEMUs may run): Ray says when the actor is gone
            if reason:
                host.lost = host.lost or reason
                for member in self.members:
                    if member.sandbox.host is host and member.index not in self._lost_reported:
                        self._lost_reported.add(member.index)  # its own call may have found out first
                        member.sandbox.mark_lost(reason)
                        self._emit(FleetEventKind.LOST, member.sandbox.id, member.sandbox.lost)
                self._notify()
                return
            await anyio.sleep(self._watch_interval)

    async def _close(self) -> None:
        if not self._open:
            return
        self._open = False
        tg, self._tg = self._tg, None
        try:
            if tg is not None:  # the watchers, and boots still under way
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop_members()

    async def _stop_members(self) -> None:
        hosts = {id(m.sandbox.host): m.sandbox.host for m in self.members} | {id(h): h for h in self._hosts.values()}

        async def stop(host: Host) -> None:
            with anyio.move_on_after(CLOSE_LIMIT):
                try:
                    await host.ask("stop_fleet", self._fleet_id)
                except VmctlError:
                    pass

        async with anyio.create_task_group() as tg:
            for host in hosts.values():
                if not host.lost:
                    tg.start_soon(stop, host)
        for member in self.members:
            if not member.sandbox.lost and member.boot_error is None:
                member.sandbox.mark_stopped()
            self._emit(FleetEventKind.STOPPED, member.sandbox.id, str(member.sandbox.state))
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
            self._pg = None

    # -- work ---------------------------------------------------------------------------------

    async def as_ready(self) -> AsyncIterator[ClusterMember]:
        """Members as they become ready, in that order (see :meth:`vmctl.Fleet.as_ready`)."""
        if not self._open:
            raise FleetError("the fleet is not open: use it inside 'async with ClusterFleet(...) as fleet:'")
        seen = 0
        while True:
            while seen < len(self._ready_log):
                seen += 1
                yield self._ready_log[seen - 1]
            if self.fail_fast and self._first_failure is not None:
                raise FleetError(f"a member failed to boot: {self._first_failure}") from self._first_failure
            if self._booting == 0:
                return
            await self._next_change()

    async def map(self, fn: Callable[[RemoteSandbox], Awaitable[T]]) -> list[tuple[RemoteSandbox, Outcome[T]]]:
        """Run ``fn`` on every member at once; one (sandbox, outcome) per member, in order. A
        member whose node is lost gets :class:`NodeLost` as its outcome; the others go on."""
        outcomes: list[Outcome[T] | None] = [None] * len(self.members)

        async def one(member: ClusterMember, tg: TaskGroup) -> None:
            await member.booted.wait()
            sandbox = member.sandbox
            if member.boot_error is not None:
                outcomes[member.index] = Outcome(error=member.boot_error)
                return
            self._emit(FleetEventKind.RUNNING, sandbox.id)
            try:
                value = await fn(sandbox)
            except Exception as exc:  # noqa: BLE001 - kept as this member's outcome
                outcomes[member.index] = Outcome(error=exc)
                self._emit(FleetEventKind.ERROR, sandbox.id, str(exc))
                if self.fail_fast:
                    tg.cancel_scope.cancel()
            else:
                outcomes[member.index] = Outcome(value=value)
                self._emit(FleetEventKind.DONE, sandbox.id)

        async def lost_watch(member: ClusterMember, scope: anyio.CancelScope) -> None:
            """A call on a lost node fails by itself; this ends one that waits on something else."""
            while not member.sandbox.lost:
                await self._next_change()
            scope.cancel()

        async def guarded(member: ClusterMember, tg: TaskGroup) -> None:
            async with anyio.create_task_group() as inner:
                inner.start_soon(lost_watch, member, inner.cancel_scope)
                await one(member, tg)
                inner.cancel_scope.cancel()
            if outcomes[member.index] is None and member.sandbox.lost:
                outcomes[member.index] = Outcome(error=NodeLost(f"sandbox {member.sandbox.id}: {member.sandbox.lost}",
                                                                node=member.node))  # fmt: skip

        async with anyio.create_task_group() as tg:
            for member in self.members:
                tg.start_soon(guarded, member, tg)
        cancelled = FleetError("cancelled because another member failed (fail_fast)")
        return [(m.sandbox, outcomes[m.index] or Outcome(error=cancelled)) for m in self.members]

    def summary(self) -> list[dict[str, Any]]:
        """State, node, boot time and error per member."""
        return [
            {"id": m.sandbox.id, "node": m.node, "state": "lost" if m.sandbox.lost else str(m.sandbox.state),
             "boot_seconds": m.boot_seconds,
             "error": m.sandbox.lost or (str(m.boot_error) if m.boot_error else None)}
            for m in self.members
        ]  # fmt: skip
