"""Cluster fleets: a :class:`~vmctl.Fleet` whose members run on the nodes of a Ray cluster.

Placement is Ray's: the fleet asks for a placement group with one bundle per member (a marker
share of the ``vmctl_host`` resource and the member's memory) and a strategy (``SPREAD``,
``PACK``, ``STRICT_SPREAD``, ``STRICT_PACK``); each member then starts on the node Ray chose for
its bundle, in that node's host actor. The interface is the local fleet's: ``map``, ``as_ready``,
per-member :class:`~vmctl.fleets.fleet.Outcome`, :class:`~vmctl.fleets.fleet.FleetEvent`, ``summary()`` (with
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
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup

from vmctl.cluster.hosts import Host, host_on, host_reply
from vmctl.cluster.raysetup import HOST_RESOURCE, MARK, qemu_nodes, require_ray
from vmctl.cluster.remote import RemoteSandbox, portable
from vmctl.config import SandboxConfig
from vmctl.errors import FleetError, NodeLost, VmctlError
from vmctl.fleets.fleet import FleetEvent, FleetEventKind
from vmctl.fleets.members import EventReporter, LedgerMember, MemberLedger, Outcome, fleet_configs

R = TypeVar("R")  # what a map function returns
STRATEGIES = ("SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK")
CLOSE_LIMIT = 60.0  # seconds closing waits for one host to stop its members


@dataclass(eq=False)
class ClusterMember(LedgerMember[RemoteSandbox]):
    """One place in a cluster fleet: its remote sandbox, the node it runs on, its boot."""

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
        configs = fleet_configs(config, size, max_concurrent_starts=max_concurrent_starts, template=template)
        if strategy not in STRATEGIES:
            raise FleetError(f"strategy: one of {', '.join(STRATEGIES)}")
        self._configs = configs
        self._one_config = all(c == configs[0] for c in configs)
        self.strategy = strategy
        self.template = template
        self.wait = wait
        self._bundle = bundle
        self._id_prefix, self._start_timeout = id_prefix, start_timeout
        self._placement_timeout, self._watch_interval = placement_timeout, watch_interval
        self._fleet_id = f"{id_prefix}-{secrets.token_hex(3)}"
        self._max_concurrent_starts = max_concurrent_starts
        self._limiter: anyio.CapacityLimiter | None = None
        self._ledger: MemberLedger[ClusterMember] = MemberLedger(fail_fast=fail_fast, owner="ClusterFleet")
        self._report: EventReporter[FleetEvent] = EventReporter(on_event, "fleet", fleet=self._fleet_id)
        self._hosts: dict[str, Host] = {}
        self._pg: Any = None
        self._lost_reported: set[int] = set()
        #: how long preparing the nodes took (their guest builds and, with ``template``, templates)
        self.prepare_seconds: float | None = None

    # -- introspection -----------------------------------------------------------------------

    @property
    def fail_fast(self) -> bool:
        return self._ledger.fail_fast

    @property
    def members(self) -> list[ClusterMember]:
        return self._ledger.members

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
        self._report(FleetEvent(kind, sandbox_id, detail))

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
        await self._ledger.open(self._setup)
        return self

    async def _setup(self, stack: AsyncExitStack) -> None:
        self._limiter = anyio.CapacityLimiter(self._max_concurrent_starts)
        stack.push_async_callback(self._stop_members_shielded)  # last on the way out
        nodes = await self._place()
        for node in nodes:
            self._hosts.setdefault(node, host_on(node))
        self._ledger.members = [ClusterMember(i, RemoteSandbox(f"{self._id_prefix}-{i}", self._hosts[node],
                                                               fleet=self._fleet_id, start_timeout=self._start_timeout))
                                for i, node in enumerate(nodes)]  # fmt: skip
        for member in self.members:
            self._ledger.boot_started(member)
        started = time.monotonic()
        await self._prepare_hosts()
        self.prepare_seconds = time.monotonic() - started
        self._ledger.boots_begin(len(self.members))
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)  # first on the way out: the watchers, and boots under way
        for host in self._hosts.values():
            tg.start_soon(self._watch, host, tg)

        def watch_new_host(host: Host) -> None:
            self._watch_new_host(host, tg)

        for member in self.members:
            member.sandbox.on_move = watch_new_host
            tg.start_soon(self._boot, member)
        if self.wait:
            await self._ledger.wait_booted()

    async def __aexit__(self, *exc: object) -> None:
        await self._ledger.close()

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
        assert self._limiter is not None
        try:
            async with self._limiter:
                self._emit(FleetEventKind.BOOTING, sandbox.id, sandbox.node[:8])
                config = None if self._one_config or self.template else self._configs[member.index]
                try:
                    seconds = await sandbox.start(config)
                except VmctlError as exc:
                    self._ledger.boot_failed(member, exc)
                    self._emit(FleetEventKind.BOOT_FAILED, sandbox.id, str(exc))
                else:
                    self._ledger.boot_succeeded(member, seconds)
                    self._emit(FleetEventKind.READY, sandbox.id, f"{seconds:.2f}s")
        finally:
            self._ledger.boot_finished(member)

    def _watch_new_host(self, host: Host, tg: TaskGroup) -> None:
        """A member moved to ``host``: watch it too (once)."""
        if self._ledger.is_open and all(h is not host for h in self._hosts.values()):
            self._hosts[f"{host.node_id}-{id(host)}"] = host
            tg.start_soon(self._watch, host, tg)

    async def _watch(self, host: Host, tg: TaskGroup) -> None:
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
                self._ledger.changes.notify()
                return
            await anyio.sleep(self._watch_interval)

    async def _stop_members_shielded(self) -> None:
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

    def as_ready(self) -> AsyncIterator[ClusterMember]:
        """Members as they become ready, in that order (see :meth:`vmctl.Fleet.as_ready`)."""
        return self._ledger.as_ready()

    async def map(self, fn: Callable[[RemoteSandbox], Awaitable[R]]) -> list[tuple[RemoteSandbox, Outcome[R]]]:
        """Run ``fn`` on every member at once; one (sandbox, outcome) per member, in order. A
        member whose node is lost gets :class:`NodeLost` as its outcome; the others go on."""

        def report(kind: str, member: ClusterMember, detail: str) -> None:
            self._emit(FleetEventKind(kind), member.sandbox.id, detail)

        async def lost(member: ClusterMember) -> BaseException:
            """A call on a lost node fails by itself; this ends one that waits on something else."""
            while not member.sandbox.lost:
                await self._ledger.changes.wait()
            return NodeLost(f"sandbox {member.sandbox.id}: {member.sandbox.lost}", node=member.node)

        return await self._ledger.map(fn, report, lost=lost)

    def summary(self) -> list[dict[str, Any]]:
        """State, node, boot time and error per member."""
        return [
            {"id": m.sandbox.id, "node": m.node, "state": "lost" if m.sandbox.lost else str(m.sandbox.state),
             "boot_seconds": m.boot_seconds,
             "error": m.sandbox.lost or (str(m.boot_error) if m.boot_error else None)}
            for m in self.members
        ]  # fmt: skip
