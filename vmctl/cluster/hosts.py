"""The driver's handles on host actors: one per node that runs QEMU, created on first use and
reused; a call to an actor that is gone (its node died, it was killed or restarted) raises
:class:`~vmctl.errors.NodeLost`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio

from vmctl.cluster.hostservice import HostInfo, HostService
from vmctl.cluster.raysetup import HOST_RESOURCE, MARK, check_connected, forwarded_env, qemu_nodes, require_ray
from vmctl.cluster.wire import Reply, from_wire
from vmctl.errors import NodeLost, VmctlError


@dataclass(eq=False)
class Host:
    """One node's host actor, as this driver sees it."""

    node_id: str
    actor: Any
    detached: bool = False
    lost: str = ""  # why it is gone, once it is

    async def ask(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call a host actor method; a vanished actor raises :class:`NodeLost`. Cancelling the
        caller cancels the call in the actor too."""
        ray = require_ray()
        if self.lost:
            raise NodeLost(self.lost, node=self.node_id)
        ref = getattr(self.actor, method).remote(*args, **kwargs)
        try:
            return await ref
        except anyio.get_cancelled_exc_class():
            ray.cancel(ref)
            raise
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError) as exc:
            self.lost = f"node {self.node_id[:8]} (or its host actor) is gone: {type(exc).__name__}"
            raise NodeLost(self.lost, node=self.node_id) from None
        except ray.exceptions.RayError as exc:
            raise VmctlError(f"Ray failed a call to node {self.node_id[:8]}: {exc}") from None

    async def info(self) -> HostInfo:
        info: HostInfo = await self.ask("info")
        return info


_hosts: dict[tuple[str, tuple[tuple[str, str], ...]], Host] = {}


def host_on(node_id: str) -> Host:
    """This driver's host actor on ``node_id`` (created on first use, then reused)."""
    ray = check_connected()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    env = forwarded_env()
    key = (node_id, tuple(env.items()))
    host = _hosts.get(key)
    if host is not None and host.lost:
        ray.kill(host.actor)  # restarted (and empty) or dead: a new one takes its place
    if host is None or host.lost:
        actor = ray.remote(HostService).options(
            num_cpus=0, resources={HOST_RESOURCE: MARK}, max_restarts=1, max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            runtime_env={"env_vars": env},
        ).remote()  # fmt: skip
        host = _hosts[key] = Host(node_id, actor)
    return host


async def hosts() -> list[HostInfo]:
    """What every ``vmctl_host`` node's host actor reports (creating them if needed)."""
    found: list[HostInfo] = []
    for node in qemu_nodes():
        try:
            found.append(await host_on(node).info())
        except NodeLost:
            pass
    return found


async def shutdown_hosts(*, timeout: float = 60.0) -> None:
    """Stop every sandbox this driver's host actors own and end those actors (idempotent)."""
    ray = require_ray()
    for key, host in list(_hosts.items()):
        del _hosts[key]
        if not host.lost:
            with anyio.move_on_after(timeout):
                try:
                    await host.ask("shutdown")
                except VmctlError:
                    pass
            ray.kill(host.actor)


def host_reply(reply: Reply) -> Any:
    if reply.error is not None:
        raise from_wire(reply.error)
    return reply.value
