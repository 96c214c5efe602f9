"""The body of a host actor: the sandboxes of one node, owned where their QEMU runs.

Theory of operation. :mod:`vmctl.cluster` wraps :class:`HostService` with ``ray.remote`` and
places one instance per node and driver (the ``vmctl_host`` custom resource marks the nodes that
can run QEMU). Ray runs its ``async def`` methods as tasks on the actor's event loop. A sandbox
holds a task group and sockets, so it never leaves this process: each one is owned by one task
(its *owner*) in the actor's task group, which enters the sandbox's ``async with`` and leaves it
when told to stop, as :class:`~vmctl.Sandbox` requires. Drivers hold remote handles that name a
sandbox by id and call :meth:`HostService.call`.

No method lets an error escape: each returns a :class:`~vmctl.cluster.wire.Reply` carrying the
value or the error as data, and the sandbox's state. The actor builds what it needs locally:
the default guest (``ensure_default_assets``, once per node) and, for a template fleet, one
template per fleet on this node.

Faults. QEMU runs under ``setpriv --pdeathsig KILL``, so when this worker dies (the actor
killed) its QEMUs die with it; their run directories are swept by the next sandbox started on
the node. A worker whose raylet is killed does not die by itself (it is reparented and runs on),
while the cluster declares its sandboxes lost: the actor notices the new parent within half a
second, kills its QEMUs, removes their run directories and exits (fencing). When the driver ends, Ray terminates its host actors:
``__ray_shutdown__`` kills the QEMUs and removes the run directories at once. A host actor that
Ray restarts (``max_restarts``) comes back empty and says so (:attr:`HostInfo.restarted`): calls
naming a sandbox of the earlier incarnation raise :class:`~vmctl.errors.NodeLost`.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import secrets
import shutil
import signal
import socket
import tarfile
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from vmctl.agent.processes import GuestProcess, ProcessContext
from vmctl.cluster.wire import Reply, to_wire
from vmctl.config import SandboxConfig
from vmctl.core import reaper
from vmctl.core.paths import kill_qemu_in, remove_tree, runtime_dir
from vmctl.errors import InvalidArgument, NodeLost, SandboxNotFound
from vmctl.fleets.template import boot_template
from vmctl.guest import GuestAssets, ensure_default_assets
from vmctl.sandbox.facade import Sandbox

FENCE_INTERVAL = 0.5  # seconds between checks that this worker's raylet still runs
CHUNK = 8 * 1024 * 1024  # snapshot bytes travel through the object store in chunks of this size

#: what a driver may call on a sandbox through :meth:`HostService.call`
CALLS = frozenset({
    "exec", "pause", "resume", "stop", "hotplug", "unplug", "resize_vcpus", "resize_memory", "snapshot",
    "write_file", "read_file", "guest_block_devices", "guest_online_cpus", "guest_memory", "vcpu_thread_ids",
    "wait_for_state", "capabilities", "devices", "config", "failure", "pid", "console_tail",
})  # fmt: skip


@dataclass(frozen=True)
class HostInfo:
    """What a host actor reports: where it runs, its capacity, and what it owns."""

    node_id: str
    hostname: str
    incarnation: str  # changes when Ray restarts the actor
    restarted: bool  # True: Ray restarted this actor; sandboxes of the earlier one are gone
    pid: int
    cpus: int
    free_memory_mib: int
    load: tuple[float, float, float]
    sandboxes: tuple[str, ...]


@dataclass(eq=False)
class _Owned:
    sandbox: Sandbox
    fleet: str | None
    booted: anyio.Event = field(default_factory=anyio.Event)
    stop: anyio.Event = field(default_factory=anyio.Event)
    gone: anyio.Event = field(default_factory=anyio.Event)
    boot_seconds: float | None = None
    error: BaseException | None = None
    processes: dict[str, tuple[ProcessContext, GuestProcess]] = field(default_factory=dict)


def _free_memory_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


class HostService:
    """One node's sandboxes (the body of a Ray actor; see the module docstring)."""

    def __init__(self) -> None:
        import ray  # only ever constructed inside a Ray worker

        context = ray.get_runtime_context()
        self.node_id: str = context.get_node_id()
        self.restarted: bool = bool(context.was_current_actor_reconstructed)
        self.incarnation = secrets.token_hex(6)
        self._owned: dict[str, _Owned] = {}
        self._templates: dict[str, SandboxConfig] = {}
        self._template_stacks: dict[str, AsyncExitStack] = {}
        self._template_lock: anyio.Lock | None = None
        self._assets: GuestAssets | None = None
        self._tg: TaskGroup | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._group_ready: anyio.Event | None = None

    # -- the task group that owns the sandboxes ------------------------------------------------

    async def _group(self) -> TaskGroup:
        """The actor's task group, opened by one supervisor task on first use (the actor has no
        enclosing task of its own: Ray runs each method call as a separate task)."""
        if self._group_ready is None:
            self._group_ready = anyio.Event()
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise(self._group_ready))
        await self._group_ready.wait()
        assert self._tg is not None
        return self._tg

    async def _supervise(self, ready: anyio.Event) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._fence_when_orphaned, os.getppid())
            ready.set()
            await anyio.sleep_forever()

    async def _fence_when_orphaned(self, raylet: int) -> None:
        """A Ray worker whose raylet died runs on as an orphan (seen here after a cluster's
        shutdown too), and the cluster has already declared its sandboxes lost: stop them (kill
        QEMU, remove run dirs) and exit."""
        while os.getppid() == raylet:  # noqa: ASYNC110 - a poll: nothing signals a parent's death
            await anyio.sleep(FENCE_INTERVAL)
        self.__ray_shutdown__()
        os.kill(os.getpid(), signal.SIGKILL)  # the worker must go: its node is gone

    async def _own(self, entry: _Owned) -> None:
        """Enter the sandbox's block, report the boot, keep it open until told to stop."""
        sandbox = entry.sandbox
        started = time.monotonic()
        try:
            async with sandbox:
                entry.boot_seconds = time.monotonic() - started
                entry.booted.set()
                await entry.stop.wait()
        except Exception as exc:  # noqa: BLE001 - the start's error goes back to the caller
            entry.error = exc
        finally:
            entry.booted.set()
            if self._owned.get(sandbox.id) is entry:
                del self._owned[sandbox.id]
            entry.gone.set()

    # -- what drivers call -------------------------------------------------------------------

    async def info(self) -> HostInfo:
        await self._group()  # from the first call on, the actor watches its raylet (fencing)
        return HostInfo(self.node_id, socket.gethostname(), self.incarnation, self.restarted, os.getpid(),
                        os.cpu_count() or 1, _free_memory_mib(), os.getloadavg(),
                        tuple(sorted(self._owned)))  # fmt: skip

    async def prepare(self, fleet: str, config: SandboxConfig, default_guest: bool, template: bool,
                      start_timeout: float) -> Reply:  # fmt: skip
        """The config members of ``fleet`` start from on this node: the node's own default guest
        where the driver used its default guest, and a clone of this node's template (booted
        once per fleet and node) with ``template``."""
        try:
            if self._template_lock is None:
                self._template_lock = anyio.Lock()
            async with self._template_lock:
                if fleet in self._templates:
                    return Reply(self._templates[fleet])
                local = await self._localize(config, default_guest)
                if template:
                    stack = AsyncExitStack()
                    try:
                        local = await boot_template(local, stack, id=f"{fleet}-template-{self.node_id[:6]}",
                                                    backend=None, start_timeout=start_timeout)  # fmt: skip
                    except BaseException:
                        await stack.aclose()
                        raise
                    self._template_stacks[fleet] = stack
                self._templates[fleet] = local
                return Reply(local)
        except Exception as exc:  # noqa: BLE001 - sent back as data
            return Reply(error=to_wire(exc))

    async def _localize(self, config: SandboxConfig, default_guest: bool) -> SandboxConfig:
        if not default_guest:
            return config
        if self._assets is None:  # built (or found in the node's cache) once per host actor
            self._assets = await ensure_default_assets()
        return config.replace(kernel=self._assets.kernel, initrd=self._assets.initrd)

    async def start(self, sandbox_id: str, config: SandboxConfig | None, *, fleet: str | None = None,
                    start_timeout: float = 300.0, restore_from: str | None = None) -> Reply:  # fmt: skip
        """Start a sandbox owned by this actor (from ``config``, or restored from a snapshot
        directory on this node); returns its boot seconds once it is ready."""
        try:
            if sandbox_id in self._owned:
                raise InvalidArgument(f"a sandbox {sandbox_id!r} already runs on node {self.node_id[:8]}")
            if fleet is not None and config is None and restore_from is None:
                config = self._templates[fleet]
            if restore_from is not None:
                sandbox = Sandbox.restore(restore_from, id=sandbox_id, start_timeout=start_timeout)
            elif config is not None:
                sandbox = Sandbox(config, id=sandbox_id, start_timeout=start_timeout)
            else:
                raise InvalidArgument("start needs a config, a prepared fleet or a snapshot")
            entry = self._owned[sandbox_id] = _Owned(sandbox, fleet)
            (await self._group()).start_soon(self._own, entry, name=f"own {sandbox_id}")
            await entry.booted.wait()
            if entry.error is not None:
                raise entry.error
            return Reply(entry.boot_seconds, state=sandbox.state)
        except Exception as exc:  # noqa: BLE001 - sent back as data
            return Reply(error=to_wire(exc))

    def _find(self, sandbox_id: str) -> _Owned:
        entry = self._owned.get(sandbox_id)
        if entry is not None:
            return entry
        if self.restarted:
            raise NodeLost(f"sandbox {sandbox_id} is gone: the host actor on node {self.node_id[:8]} was "
                           "restarted and owns none of the earlier one's sandboxes", node=self.node_id)  # fmt: skip
        raise SandboxNotFound(f"no sandbox {sandbox_id!r} on node {self.node_id[:8]}")

    async def call(self, sandbox_id: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Reply:
        """Call sandbox method (or read property) ``name``; the value or the error, as data."""
        entry = None
        try:
            if name not in CALLS:
                raise InvalidArgument(f"{name!r} cannot be called on a remote sandbox")
            entry = self._find(sandbox_id)
            if name == "stop":
                await entry.sandbox.stop(**kwargs)  # the caller's timeout (checked there) for the power-off
                await self._stop(entry)  # the owner task leaves the block and cleans up
                return Reply(None, state=entry.sandbox.state)
            value = getattr(entry.sandbox, name)
            if callable(value):
                value = value(*args, **kwargs)
            if inspect.isawaitable(value):
                value = await value
            return Reply(value, state=entry.sandbox.state)
        except Exception as exc:  # noqa: BLE001 - sent back as data
            return Reply(error=to_wire(exc), state=entry.sandbox.state if entry else None)

    async def proc(self, sandbox_id: str, proc_id: str, op: str, args: tuple[Any, ...] = ()) -> Reply:
        """A guest process with live streams, driven a step at a time (``sb.process`` remotely):
        ``start`` (argv, options), ``read`` (stream number, max bytes; None at its end),
        ``write`` (bytes), ``eof``, ``signal`` (number), ``wait`` (-> exit code, timed out), ``close``
        (kills its process group unless it ended)."""
        try:
            entry = self._find(sandbox_id)
            if op == "start":
                argv, options = args
                context = entry.sandbox.process(argv, **options)
                process = await context.__aenter__()
                entry.processes[proc_id] = (context, process)
                return Reply(process.pid, state=entry.sandbox.state)
            context, process = entry.processes[proc_id]
            value: Any = None
            if op == "read":
                stream = process.stdout if args[0] == 1 else process.stderr
                try:
                    value = await stream.receive(args[1])
                except anyio.EndOfStream:
                    value = None
            elif op == "write":
                await process.stdin.send(args[0])
            elif op == "eof":
                await process.stdin.aclose()
            elif op == "signal":
                await process.signal(args[0])
            elif op == "wait":
                value = (await process.wait(), process.timed_out)
            elif op == "close":
                del entry.processes[proc_id]
                await context.__aexit__(None, None, None)
            else:
                raise InvalidArgument(f"unknown process operation {op!r}")
            return Reply(value, state=entry.sandbox.state)
        except KeyError:
            return Reply(error=to_wire(InvalidArgument(f"no process {proc_id!r} in sandbox {sandbox_id!r}")))
        except Exception as exc:  # noqa: BLE001 - sent back as data
            return Reply(error=to_wire(exc))

    async def _stop(self, entry: _Owned) -> None:
        entry.stop.set()
        await entry.gone.wait()

    async def stop_fleet(self, fleet: str) -> None:
        """Stop every sandbox of ``fleet`` here (each in its owner task) and drop its template."""
        async with anyio.create_task_group() as tg:
            for entry in [e for e in self._owned.values() if e.fleet == fleet]:
                tg.start_soon(self._stop, entry)
        self._templates.pop(fleet, None)
        stack = self._template_stacks.pop(fleet, None)
        if stack is not None:
            await stack.aclose()

    async def stop_all(self) -> None:
        async with anyio.create_task_group() as tg:
            for entry in list(self._owned.values()):
                tg.start_soon(self._stop, entry)
        for fleet in list(self._template_stacks):
            await self.stop_fleet(fleet)

    # -- moving a sandbox: its snapshot through the object store ---------------------------------

    async def export_snapshot(self, sandbox_id: str) -> Reply:
        """Pause the sandbox, save a snapshot and put it into Ray's object store in chunks; the
        value is the list of object refs. The sandbox stays here, paused, until the driver stops
        it (moved) or resumes it (the move failed)."""
        import ray

        try:
            entry = self._find(sandbox_id)
            work = Path(tempfile.mkdtemp(prefix="move-", dir=runtime_dir()))
            reaper.add_dir(work)  # removed by the reaper should this actor die first
            try:
                # the save pauses it (after its guest unmounted its shares) and leaves it paused;
                # a failed move resumes it and the shares come back
                await entry.sandbox.snapshot(work / "snap", leave_paused=True)
                archive = work / "snap.tar"
                await anyio.to_thread.run_sync(_pack, work / "snap", archive)
                refs = []
                with archive.open("rb") as f:
                    while chunk := f.read(CHUNK):
                        refs.append(ray.put(chunk))
                return Reply(refs, state=entry.sandbox.state)
            finally:
                remove_tree(work)
        except Exception as exc:  # noqa: BLE001 - sent back as data
            return Reply(error=to_wire(exc))

    async def missing_dirs(self, paths: list[str]) -> Reply:
        """Which of ``paths`` are not directories on this node (a moved sandbox's shares)."""
        return Reply([p for p in paths if not Path(p).is_dir()])

    async def import_snapshot(self, sandbox_id: str, chunks: list[Any], *, fleet: str | None,
                              start_timeout: float = 300.0) -> Reply:  # fmt: skip
        """Fetch a snapshot's chunks, unpack it here and start the sandbox from it."""
        try:
            work = Path(tempfile.mkdtemp(prefix="move-", dir=runtime_dir()))
            reaper.add_dir(work)  # removed by the reaper should this actor die first
            try:
                archive = work / "snap.tar"
                with archive.open("wb") as f:
                    for ref in chunks:
                        f.write(await ref)
                await anyio.to_thread.run_sync(_unpack, archive, work)
                archive.unlink()
                return await self.start(sandbox_id, None, fleet=fleet, start_timeout=start_timeout,
                                        restore_from=str(work / "snap"))  # fmt: skip
            finally:
                remove_tree(work)  # the restored QEMU has read its state; overlays were copied
        except Exception as exc:  # noqa: BLE001 - sent back as data
            return Reply(error=to_wire(exc))

    # -- the end ------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop everything this actor owns (the driver is done with it)."""
        await self.stop_all()

    def __ray_shutdown__(self) -> None:
        """Ray terminates the actor (its driver ended): QEMUs and their run directories go now."""
        for entry in list(self._owned.values()):
            run_dir = entry.sandbox.run_dir
            if run_dir is not None:
                kill_qemu_in(run_dir)
                remove_tree(run_dir)
        for fleet in self._template_stacks:  # each template's files live in a directory of their own
            memory = self._templates[fleet].memory_path if fleet in self._templates else None
            if memory is not None:
                shutil.rmtree(Path(memory).parent, ignore_errors=True)


def _pack(source: Path, archive: Path) -> None:
    with tarfile.open(archive, "w") as tar:
        tar.add(source, arcname="snap")


def _unpack(archive: Path, into: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
