"""The driver's side of a sandbox on another node: remote sandbox handles, their processes' stream
proxies, and detached remote sandboxes.

A driver gets one host actor per node that declares the ``vmctl_host`` resource
(:mod:`vmctl.cluster.hosts`; placed there with a hard node affinity, they need no CPU). They are
owned by the driver: when it ends, Ray terminates them and they stop their sandboxes. The
``VMCTL_*`` variables of the driver's environment are forwarded to them (``runtime_env``), so
their runtime and state directories are the driver's where the machines share a layout, and a
driver using other values gets its own host actors.

A :class:`RemoteSandbox` names a sandbox by id and the host actor that owns it; its coroutines
are the local sandbox's, proxied. A Ray error saying the actor is gone (its node died, it was
killed or restarted) becomes :class:`~vmctl.errors.NodeLost`, and the handle stays lost.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteReceiveStream, ByteSendStream

from vmctl.agent import files as guestfiles
from vmctl.agent.client import DEFAULT_OUTPUT_LIMIT
from vmctl.agent.results import ExecResult, GuestBlockDevice, GuestMemory
from vmctl.cluster.hosts import (
    Host,
    host_on,
    host_reply,
)
from vmctl.cluster.hostservice import HostService
from vmctl.cluster.raysetup import (
    DETACHED_PREFIX,
    HOST_RESOURCE,
    MARK,
    NAMESPACE,
    check_connected,
    find_node,
    forwarded_env,
    require_ray,
)
from vmctl.cluster.wire import Reply, from_wire
from vmctl.config import SandboxConfig
from vmctl.core.state import SandboxState
from vmctl.core.waiting import deadline
from vmctl.devices import Device, SharedDirectory
from vmctl.errors import ConfigError, InvalidArgument, NodeLost, NotSupported, Problem, SandboxNotFound
from vmctl.guest import GuestAssets, ensure_default_assets
from vmctl.machine.hotplug import PluggedDevice
from vmctl.machine.registry import check_id
from vmctl.sandbox.facade import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_RESIZE_TIMEOUT,
    DEFAULT_SNAPSHOT_TIMEOUT,
    DEFAULT_START_TIMEOUT,
)

#: seconds a cleanup on the way out (a process killed, a half-moved sandbox stopped) may take
CLEANUP_LIMIT = 30.0


_driver_assets: list[GuestAssets] = []  # this driver's default guest, looked up once


async def portable(config: SandboxConfig) -> tuple[SandboxConfig, bool]:
    """``(config, default_guest)``: whether ``config`` boots this machine's default guest, which
    each node replaces with its own build (the lookup hashes every input: once per driver)."""
    if not _driver_assets:
        _driver_assets.append(await ensure_default_assets())
    assets = _driver_assets[0]
    return config, (Path(config.kernel) == assets.kernel and config.initrd is not None
                    and Path(config.initrd) == assets.initrd)  # fmt: skip


class RemoteSandbox:
    """A sandbox owned by a host actor on some node: the local sandbox's coroutines, proxied."""

    def __init__(self, sandbox_id: str, host: Host, *, fleet: str | None = None,
                 start_timeout: float = DEFAULT_START_TIMEOUT) -> None:  # fmt: skip
        self.id = sandbox_id
        self.host = host
        self.fleet = fleet
        self.start_timeout = start_timeout
        self._state = SandboxState.CREATED
        self._lost = ""
        #: called with the new host after a move (a cluster fleet starts watching it)
        self.on_move: Callable[[Host], None] | None = None

    def __repr__(self) -> str:
        return f"<RemoteSandbox {self.id} on {self.node[:8]} {self.state}>"

    @property
    def node(self) -> str:
        """The id of the Ray node it runs on."""
        return self.host.node_id

    @property
    def state(self) -> SandboxState:
        """The state after the last call (``failed`` once its node is lost)."""
        return self._state

    @property
    def lost(self) -> str:
        """Why the sandbox is lost with its node or host actor ("" while it is not)."""
        return self._lost

    def mark_lost(self, reason: str) -> None:
        self._lost = self._lost or reason
        self._state = SandboxState.FAILED

    def mark_stopped(self) -> None:
        if not self._lost:
            self._state = SandboxState.STOPPED

    def _unwrap(self, reply: Reply) -> Any:
        if reply.state is not None:
            self._state = reply.state
        if reply.error is not None:
            exc = from_wire(reply.error)
            if isinstance(exc, NodeLost):
                self.mark_lost(str(exc))
            raise exc
        return reply.value

    async def _ask(self, method: str, *args: Any) -> Any:
        """One request to the host actor for this sandbox: :class:`NodeLost` at once if its node
        is known to be gone, and the sandbox marked lost when the request finds out."""
        if self._lost:
            raise NodeLost(f"sandbox {self.id}: {self._lost}", node=self.node)
        try:
            reply = await self.host.ask(method, self.id, *args)
        except NodeLost as exc:
            self.mark_lost(str(exc))
            raise NodeLost(f"sandbox {self.id} is lost: {exc}", node=self.node) from None
        return self._unwrap(reply)

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return await self._ask("call", name, args, kwargs)

    async def start(self, config: SandboxConfig | None) -> float:
        """Start it on its host (``config``, or the fleet's prepared one); the boot seconds."""
        try:
            reply = await self.host.ask("start", self.id, config, fleet=self.fleet, start_timeout=self.start_timeout)
        except NodeLost as exc:
            self.mark_lost(str(exc))
            raise
        seconds: float = self._unwrap(reply)
        return seconds

    # -- the sandbox's coroutines ----------------------------------------------------------------

    async def exec(self, argv: Sequence[str], *, stdin: bytes | str = b"", timeout: float | None = None,
                   check: bool = False, env: dict[str, str] | None = None, cwd: str | None = None) -> ExecResult:  # fmt: skip
        result: ExecResult = await self._call("exec", list(argv), stdin=stdin, timeout=timeout, check=check,
                                              env=env, cwd=cwd)  # fmt: skip
        return result

    async def pause(self, *, timeout: float | None = DEFAULT_CALL_TIMEOUT) -> None:
        await self._call("pause", timeout=timeout)

    async def resume(self, *, timeout: float | None = DEFAULT_CALL_TIMEOUT) -> None:
        await self._call("resume", timeout=timeout)

    async def stop(self, *, timeout: float | None = None) -> None:
        """Stop the sandbox on its node (a detached one's actor ends too). Idempotent."""
        if self._lost:
            return
        try:
            await self._call("stop", timeout=timeout)
        except SandboxNotFound:
            pass
        self._state = SandboxState.STOPPED
        if self.host.detached:
            require_ray().kill(self.host.actor)
            self.host.lost = "stopped"

    async def wait_for_state(self, *states: SandboxState, timeout: float | None = None) -> SandboxState:
        state: SandboxState = await self._call("wait_for_state", *states, timeout=timeout)
        return state

    async def hotplug(self, device: Device, *, timeout: float | None = DEFAULT_CALL_TIMEOUT) -> PluggedDevice:
        plugged: PluggedDevice = await self._call("hotplug", device, timeout=timeout)
        return plugged

    async def unplug(self, device: PluggedDevice | str, *, timeout: float | None = DEFAULT_CALL_TIMEOUT) -> None:
        await self._call("unplug", device.id if isinstance(device, PluggedDevice) else device, timeout=timeout)

    async def resize_vcpus(self, count: int, *, timeout: float | None = DEFAULT_RESIZE_TIMEOUT) -> tuple[int, int]:
        counts: tuple[int, int] = await self._call("resize_vcpus", count, timeout=timeout)
        return counts

    async def resize_memory(self, mib: int, *, timeout: float | None = DEFAULT_RESIZE_TIMEOUT) -> int:
        size: int = await self._call("resize_memory", mib, timeout=timeout)
        return size

    async def snapshot(self, directory: str | Path, *, timeout: float = DEFAULT_SNAPSHOT_TIMEOUT) -> Path:
        """Save a snapshot into ``directory`` on the sandbox's node."""
        path: Path = await self._call("snapshot", str(directory), timeout=timeout)
        return path

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        await self._call("write_file", path, data, mode=mode)

    async def read_file(self, path: str) -> bytes:
        data: bytes = await self._call("read_file", path)
        return data

    async def upload(self, local: str | Path, remote: str) -> list[Path]:
        """Copy a local file (on the driver) into the guest; trees are not supported remotely."""
        source = Path(local)
        if not source.is_file():
            raise InvalidArgument(f"{source}: a remote sandbox takes single files (use write_file per file)")
        await self.write_file(remote, source.read_bytes(), mode=source.stat().st_mode & 0o7777)
        return []

    async def download(self, remote: str, local: str | Path, *, keep_modes: bool = False) -> list[str]:
        """Copy a guest file to ``local`` on the driver: mode 0o666 minus the umask (the guest's
        mode does not travel, so ``keep_modes=True`` is refused), replacing a file or symlink at
        ``local`` without writing through it."""
        if keep_modes:
            raise NotSupported("a remote download does not carry the guest's modes: give keep_modes=False")
        data = await self.read_file(remote)
        await anyio.to_thread.run_sync(guestfiles.write_local, Path(local), data)
        return []

    async def guest_block_devices(self, *, timeout: float | None = DEFAULT_CALL_TIMEOUT) -> list[GuestBlockDevice]:
        found: list[GuestBlockDevice] = await self._call("guest_block_devices", timeout=timeout)
        return found

    async def guest_online_cpus(self, *, timeout: float | None = DEFAULT_CALL_TIMEOUT) -> list[int]:
        found: list[int] = await self._call("guest_online_cpus", timeout=timeout)
        return found

    async def guest_memory(self, *, timeout: float | None = DEFAULT_CALL_TIMEOUT) -> GuestMemory:
        found: GuestMemory = await self._call("guest_memory", timeout=timeout)
        return found

    async def vcpu_thread_ids(self) -> dict[int, int]:
        found: dict[int, int] = await self._call("vcpu_thread_ids")
        return found

    def process(self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                timeout: float | None = None, output_limit: int = DEFAULT_OUTPUT_LIMIT) -> RemoteProcessContext:  # fmt: skip
        """``async with sb.process(argv) as p``: a guest command with live streams, as on a local
        sandbox (each chunk is one call to the host actor); leaving the block kills it."""
        options = {"env": env, "cwd": cwd, "timeout": timeout, "output_limit": output_limit}
        return RemoteProcessContext(self, list(argv), options)

    async def proc(self, proc_id: str, op: str, *args: Any) -> Any:
        """One step of a remote process (see :meth:`HostService.proc`)."""
        return await self._ask("proc", proc_id, op, args)

    async def refresh(self) -> SandboxState:
        """Ask the node for the sandbox's state (:attr:`state` is the one after the last call)."""
        await self._call("pid")
        return self._state

    async def devices(self) -> list[PluggedDevice]:
        """The device table (a coroutine here: it lives on the node)."""
        found: list[PluggedDevice] = await self._call("devices")
        return found

    async def pid(self) -> int | None:
        """QEMU's pid on the sandbox's node."""
        pid: int | None = await self._call("pid")
        return pid

    async def move_to(self, node: str, *, timeout: float | None = DEFAULT_SNAPSHOT_TIMEOUT) -> None:
        """Move the sandbox to ``node`` (an id or a unique prefix): pause, snapshot, carry the
        snapshot through Ray's object store in chunks, restore there, stop it here. The guest
        keeps its state (boot id, files, processes). If the restore fails the sandbox resumes
        here and the error is raised."""
        target = host_on(find_node(node))
        if target is self.host:
            return
        was_running = self._state is SandboxState.RUNNING
        with deadline(timeout, f"move of {self.id}"):
            await self._check_shares_on(target)
            try:
                chunks = self._unwrap(await self.host.ask("export_snapshot", self.id))
            except NodeLost as exc:
                self.mark_lost(str(exc))
                raise
            except BaseException:  # the export paused it (its shares set aside): it goes on here
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_LIMIT):
                    if was_running and not self._lost and self._state is SandboxState.PAUSED:
                        await self._call("resume")
                raise
            try:
                reply = await target.ask("import_snapshot", self.id, chunks, fleet=self.fleet,
                                         start_timeout=self.start_timeout)  # fmt: skip
                if reply.error is not None:
                    raise from_wire(reply.error)
            except BaseException:
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_LIMIT):
                    if was_running and not self._lost:
                        await self._call("resume")
                raise
            source, self.host = self.host, target
            self._state = reply.state or self._state
            if self.on_move is not None:
                self.on_move(target)
            with anyio.CancelScope(shield=True):
                try:
                    reply = await source.ask("call", self.id, "stop", (), {})
                except NodeLost:
                    pass
            if was_running and self._state is SandboxState.PAUSED:
                await self.resume()


    async def _check_shares_on(self, target: Host) -> None:
        """A share's directory must exist on the node the sandbox moves to (the same path: a
        checkout made there too, or a network file system): checked before anything is saved."""
        shares = {d.id: str(d.device.host_path) for d in await self.devices() if isinstance(d.device, SharedDirectory)}
        if not shares:
            return
        reply = await target.ask("missing_dirs", sorted(set(shares.values())))
        missing = set(self._unwrap(reply) or ())
        problems = [Problem(f"devices.{dev_id}.host_path", f"{path} is not a directory on node {target.node_id[:12]}; "
                                                           "make it there (the same path) before moving")
                    for dev_id, path in shares.items() if path in missing]  # fmt: skip
        if problems:
            raise ConfigError(problems)


class RemoteStream(ByteReceiveStream):
    """A remote command's stdout or stderr: ``async for chunk in stream`` while it runs."""

    def __init__(self, sandbox: RemoteSandbox, proc_id: str, number: int) -> None:
        self._sandbox, self._proc_id, self._number = sandbox, proc_id, number
        self._ended = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._ended:
            raise anyio.EndOfStream
        data: bytes | None = await self._sandbox.proc(self._proc_id, "read", self._number, max_bytes)
        if data is None:
            self._ended = True
            raise anyio.EndOfStream
        return data

    async def read_all(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        self._ended = True


class RemoteStdin(ByteSendStream):
    """A remote command's stdin: ``await stdin.send(data)``, ``await stdin.aclose()``."""

    def __init__(self, sandbox: RemoteSandbox, proc_id: str) -> None:
        self._sandbox, self._proc_id = sandbox, proc_id

    async def send(self, item: bytes) -> None:
        await self._sandbox.proc(self._proc_id, "write", bytes(item))

    async def aclose(self) -> None:
        await self._sandbox.proc(self._proc_id, "eof")


class RemoteProcess:
    """A command running in a remote sandbox's guest (as :class:`~vmctl.GuestProcess`)."""

    def __init__(self, sandbox: RemoteSandbox, proc_id: str, pid: int) -> None:
        self._sandbox, self._proc_id = sandbox, proc_id
        self.pid = pid
        self.stdin = RemoteStdin(sandbox, proc_id)
        self.stdout = RemoteStream(sandbox, proc_id, 1)
        self.stderr = RemoteStream(sandbox, proc_id, 2)
        self.returncode: int | None = None
        self.timed_out = False

    async def wait(self) -> int:
        code, self.timed_out = await self._sandbox.proc(self._proc_id, "wait")
        self.returncode = int(code)
        return self.returncode

    async def signal(self, sig: int) -> None:
        await self._sandbox.proc(self._proc_id, "signal", int(sig))

    async def kill(self) -> None:
        await self.signal(9)

    async def aclose(self) -> None:
        await self._sandbox.proc(self._proc_id, "close")


class RemoteProcessContext:
    """What ``sb.process(...)`` returns on a remote sandbox: ``async with`` starts the command and
    kills it on the way out (also when cancelled, or when its node is gone: nothing to kill)."""

    def __init__(self, sandbox: RemoteSandbox, argv: list[str], options: dict[str, Any]) -> None:
        self._sandbox, self._argv, self._options = sandbox, argv, options
        self._process: RemoteProcess | None = None

    async def __aenter__(self) -> RemoteProcess:
        proc_id = secrets.token_hex(6)
        pid = await self._sandbox.proc(proc_id, "start", self._argv, self._options)
        self._process = RemoteProcess(self._sandbox, proc_id, int(pid))
        return self._process

    async def __aexit__(self, *exc: object) -> None:
        if self._process is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_LIMIT):
                try:
                    await self._process.aclose()
                except NodeLost:
                    pass


async def start_detached(config: SandboxConfig, name: str, *, node: str | None = None,
                         start_timeout: float = DEFAULT_START_TIMEOUT) -> RemoteSandbox:  # fmt: skip
    """A sandbox in a named, detached actor of its own: it outlives this driver until stopped.
    Ray places it on a ``vmctl_host`` node (or on ``node``); :func:`attach` finds it by name."""
    ray = check_connected()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check_id(name)
    options: dict[str, Any] = {
        "name": DETACHED_PREFIX + name, "namespace": NAMESPACE, "lifetime": "detached", "num_cpus": 0,
        "resources": {HOST_RESOURCE: MARK}, "max_concurrency": 1000, "runtime_env": {"env_vars": forwarded_env()},
    }  # fmt: skip
    if node is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(find_node(node), soft=False)
    try:
        ray.get_actor(DETACHED_PREFIX + name, namespace=NAMESPACE)
    except ValueError:
        pass
    else:
        raise InvalidArgument(f"a detached sandbox named {name!r} exists already: attach to it")
    actor = ray.remote(HostService).options(**options).remote()
    local, default_guest = await portable(config)
    host = Host("", actor, detached=True)
    info = await host.info()
    host.node_id = info.node_id
    sandbox = RemoteSandbox(name, host, start_timeout=start_timeout)
    try:
        prepared = host_reply(await host.ask("prepare", f"detached-{name}", local, default_guest, False, start_timeout))
        await sandbox.start(prepared)
    except BaseException:
        ray.kill(actor)
        raise
    return sandbox


async def attach(name: str) -> RemoteSandbox:
    """The detached sandbox ``name``, from any driver of the cluster: :class:`SandboxNotFound`
    if there is none."""
    ray = check_connected()
    try:
        actor = ray.get_actor(DETACHED_PREFIX + name, namespace=NAMESPACE)
    except ValueError:
        raise SandboxNotFound(f"no detached cluster sandbox named {name!r}") from None
    host = Host("", actor, detached=True)
    info = await host.info()
    host.node_id = info.node_id
    if name not in info.sandboxes:
        raise SandboxNotFound(f"the actor of detached sandbox {name!r} runs but owns no sandbox"
                              + (" (it was restarted)" if info.restarted else ""))  # fmt: skip
    sandbox = RemoteSandbox(name, host)
    await sandbox.refresh()
    return sandbox
