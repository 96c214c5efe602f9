"""A fake QEMU for tests of code that embeds vmctl: no QEMU, no guest, real sockets.

:class:`FakeQemu` is a sandbox backend. It serves the real QMP wire protocol (greeting,
capabilities negotiation, commands with ids, events) and the vmctl agent protocol on the same
listening unix sockets a real QEMU would inherit, so everything above the process (QMP session,
event pump, state machine, agent client) is the production code. Replies, events, delays and
faults are scriptable::

    fake = FakeQemu(exec_handler=lambda argv, stdin: ExecResult(0, b"hi\\n", b""))
    async with Sandbox(config, backend=fake) as sb:
        await fake.emit("GUEST_PANICKED", {"action": "pause"})
        await sb.wait_for_state(SandboxState.FAILED)

``fake_config(tmp_path)`` makes a valid config whose kernel and initrd are placeholder files.
"""

from __future__ import annotations

import errno
import inspect
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
from anyio.abc import SocketListener, SocketStream, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream

from vmctl.agent import protocol as proto
from vmctl.agent.protocol import FrameType, pack
from vmctl.agent.results import ExecResult
from vmctl.config import SandboxConfig
from vmctl.hypervisors.base import VmProcess
from vmctl.hypervisors.qemu import QemuHypervisor

ExecHandler = Callable[[list[bytes], bytes], "ExecResult | Awaitable[ExecResult]"]
CommandHandler = Callable[[Mapping[str, Any]], Any]
#: How a scripted reply goes wrong: answered under an id nobody asked for, without its id, as a
#: line that is not JSON, cut off halfway with the connection closed, or as one line longer than
#: the QMP client reads (qemu.qmp's limit is 10 MiB).
ReplyFault = Literal["wrong-id", "no-id", "garbage", "truncate", "huge"]
HUGE_REPLY_BYTES = 11 * 1024 * 1024


@dataclass(frozen=True)
class QmpErrorReply:
    """Script a QMP error reply: ``{"error": {"class": ..., "desc": ...}}``."""

    error_class: str = "GenericError"
    desc: str = "scripted failure"


def fake_config(directory: Path, **overrides: Any) -> SandboxConfig:
    """A valid config for the fake: placeholder kernel and initrd files in ``directory``."""
    for name in ("fake-kernel", "fake-initrd"):
        (directory / name).write_bytes(b"not a kernel\n")
    values: dict[str, Any] = {"kernel": directory / "fake-kernel", "initrd": directory / "fake-initrd",
                              "memory_mib": 256, "accel": "tcg"}  # fmt: skip
    values.update(overrides)
    return SandboxConfig(**values)


async def default_exec(argv: list[bytes], stdin: bytes) -> ExecResult:
    """A few commands, enough for most tests: echo, cat, true, false, sleep N, exit N."""
    prog, args = argv[0].decode(), argv[1:]
    if prog == "echo":
        return ExecResult(0, b" ".join(args) + b"\n", b"")
    if prog == "cat":
        return ExecResult(0, stdin, b"")
    if prog in ("true", "false"):
        return ExecResult(int(prog == "false"), b"", b"")
    if prog == "sleep":
        await anyio.sleep(float(args[0]))
        return ExecResult(0, b"", b"")
    if prog == "exit":
        return ExecResult(int(args[0]), b"", b"")
    return ExecResult(127, b"", f"sh: {prog}: not found\n".encode())


class FakeQemu:
    """Scriptable fake QEMU; pass it as ``Sandbox(config, backend=fake)``."""

    def __init__(
        self,
        *,
        ready_delay: float | None = 0.0,
        exec_handler: ExecHandler = default_exec,
        replies: Mapping[str, Any] | None = None,
        delays: Mapping[str, float] | None = None,
        hang: set[str] | frozenset[str] = frozenset(),
        drop_events: set[str] | frozenset[str] = frozenset(),
        stderr: list[str] | None = None,
        version: tuple[int, int, int] = (7, 2, 0),
        unplug: Literal["ack", "never", "guest-error"] = "ack",
        unplug_delay: float = 0.0,
        guest_names: Mapping[str, str] | None = None,
        reply_faults: Mapping[str, ReplyFault] | None = None,
    ) -> None:
        self.ready_delay = ready_delay
        self.exec_handler = exec_handler
        self.replies = dict(replies or {})
        self.delays = dict(delays or {})
        self.hang = set(hang)
        self.drop_events = set(drop_events)
        self.stderr = list(stderr or [])
        self.version = version
        self.unplug = unplug
        self.unplug_delay = unplug_delay
        self.guest_names = dict(guest_names or {})
        self.reply_faults = dict(reply_faults or {})
        self.received: list[dict[str, Any]] = []
        self.processes: list[FakeProcess] = []
        #: the fake guest's files (path -> (data, mode)), for write_file / read_file
        self.files: dict[str, tuple[bytes, int]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> QemuHypervisor:
        hv = QemuHypervisor(*args, launcher=_FakeLauncher(self), **kwargs)
        hv.name = "fake"
        return hv

    @property
    def process(self) -> FakeProcess:
        if not self.processes:
            raise RuntimeError("no sandbox has been started with this FakeQemu")
        return self.processes[-1]

    def commands(self) -> list[str]:
        return [str(c.get("execute")) for c in self.received]

    def added_devices(self) -> list[str]:
        """Ids of ``device_add`` requests in the order QEMU received them."""
        return [str(c["arguments"]["id"]) for c in self.received if c.get("execute") == "device_add"]

    async def emit(self, event: str, data: Mapping[str, Any] | None = None) -> None:
        """Send an event to the current sandbox's QMP client."""
        await self.process.emit(event, data)

    def crash(self, returncode: int = -9, stderr: str = "") -> None:
        """The process dies now: connections drop, ``returncode`` is reported."""
        if stderr:
            self.process.stderr_send(stderr)
        self.process.exit(returncode)

    async def close_qmp(self) -> None:
        """Close the QMP connection while the process stays alive."""
        await self.process.close_qmp()

    async def send_raw(self, data: bytes) -> None:
        """Write raw bytes on the QMP connection (garbage, partial JSON, huge lines)."""
        await self.process.send_qmp_raw(data)

    async def console_write(self, data: bytes) -> None:
        """Write bytes to the guest console, as the guest's serial port would."""
        await self.process.console_write(data)


class _FakeLauncher:
    """Plugs the fake into the real QEMU backend where a real QEMU process would start."""

    jails = False

    def __init__(self, fake: FakeQemu) -> None:
        self._fake = fake

    async def resolve(self, config: SandboxConfig, log: Any) -> SandboxConfig:
        return config.replace(accel="tcg", qemu_binary=Path(sys.executable))

    async def spawn(self, argv: list[str], listeners: Mapping[str, socket.socket], *, detached: bool,
                    log_path: Path, tg: TaskGroup, jail: Any = None, extra_fds: Sequence[int] = ()) -> VmProcess:  # fmt: skip
        process = FakeProcess(self._fake, {name: sock.dup() for name, sock in listeners.items()})
        for flag, value in zip(argv, argv[1:], strict=False):  # cold-plugged devices, as QEMU would see them
            if flag == "-device" and value.startswith("{"):
                props = json.loads(value)
                process.devices[str(props["id"])] = props
        self._fake.processes.append(process)
        try:
            await tg.start(process.serve)
        except BaseException:
            process.kill()  # not handed over yet: nobody else would reap it
            raise
        return process


class _FakeSession:
    """A process (run by ``exec_handler`` once its stdin ended) or a file being written."""

    _pids = iter(range(1000, 1 << 30))

    def __init__(self, process: FakeProcess, frame: proto.Frame, tg: TaskGroup,
                 send: Callable[..., Awaitable[None]]) -> None:  # fmt: skip
        self.process = process
        self.frame = frame
        self.tg = tg
        self.stdin = bytearray()
        self.done = False
        self.scope = anyio.CancelScope()

    async def opened(self, send: Callable[..., Awaitable[None]]) -> None:
        if self.frame.type == FrameType.SPAWN:
            await send(FrameType.STARTED, self.frame.id, proto.i32(next(self._pids)))
        else:
            await send(FrameType.CREDIT, self.frame.id, proto.u32(proto.STDIN_WINDOW), proto.STDIN)

    async def on_frame(self, frame: proto.Frame, send: Callable[..., Awaitable[None]]) -> None:
        if frame.type == FrameType.DATA and frame.stream == proto.STDIN:
            self.stdin += frame.payload
            await send(FrameType.CREDIT, frame.id, proto.u32(len(frame.payload)), proto.STDIN)
        elif frame.type == FrameType.EOF and frame.stream == proto.STDIN:
            self.done = True
            if self.frame.type == FrameType.SPAWN:
                self.tg.start_soon(self.run, send)
            else:
                path = self.frame.payload[4:].decode(errors="replace")
                self.process.fake.files[path] = (bytes(self.stdin), int.from_bytes(self.frame.payload[:4], "little"))
                await send(FrameType.RESULT, frame.id)
        elif frame.type == FrameType.CLOSE:
            self.done = True
            self.scope.cancel()
        elif frame.type == FrameType.KILL and self.frame.type == FrameType.SPAWN:  # killed; EXIT says it is gone
            self.done = True
            self.scope.cancel()
            await send(FrameType.EXIT, frame.id, proto.i32(128 + 9) + b"\0")

    async def run(self, send: Callable[..., Awaitable[None]]) -> None:
        argv = proto.parse_spawn(self.frame.payload)[0]
        with self.scope:
            outcome = self.process.fake.exec_handler(argv, bytes(self.stdin))
            result = await outcome if inspect.isawaitable(outcome) else outcome
            assert isinstance(result, ExecResult)
            rid = self.frame.id
            for number, data in ((proto.STDOUT, result.stdout), (proto.STDERR, result.stderr)):
                for pos in range(0, len(data), proto.CHUNK):
                    await send(FrameType.DATA, rid, data[pos:pos + proto.CHUNK], number)
                await send(FrameType.EOF, rid, b"", number)
            await send(FrameType.EXIT, rid, proto.i32(result.exit_code) + bytes([result.timed_out]))


class FakeProcess:
    """The fake's stand-in for a QEMU process: serves QMP, agent and console until it 'exits'."""

    pid = None

    def __init__(self, fake: FakeQemu, listeners: dict[str, socket.socket]) -> None:
        self.fake = fake
        self._listeners = listeners
        self.returncode: int | None = None
        self.running = True
        self._exited = anyio.Event()
        self._qmp: SocketStream | None = None
        self._qmp_lock = anyio.Lock()
        self._tg: TaskGroup | None = None
        self.devices: dict[str, dict[str, Any]] = {}
        self._console: SocketStream | None = None
        self._stderr_send, self._stderr_receive = anyio.create_memory_object_stream[str](1000)
        for line in fake.stderr:
            self.stderr_send(line)

    def stderr_send(self, text: str) -> None:
        for line in text.splitlines():
            try:
                self._stderr_send.send_nowait(line)
            except (anyio.WouldBlock, anyio.ClosedResourceError):
                pass

    async def aclose(self) -> None:
        pass

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        self.exit(-9)

    def exit(self, returncode: int) -> None:
        if self.returncode is not None:
            return
        self.returncode = returncode
        self._stderr_send.close()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        self._exited.set()

    async def stderr_lines(self) -> AsyncIterator[str]:
        async with self._stderr_receive:
            async for line in self._stderr_receive:
                yield line

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        if self.returncode is not None:  # died before it could serve
            for sock in self._listeners.values():
                sock.close()
            task_status.started()
            return
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._accept, "qmp", self._serve_qmp)
            tg.start_soon(self._accept, "agent", self._serve_agent)
            tg.start_soon(self._accept, "console", self._serve_console)
            task_status.started()

    async def _accept(self, name: str, handler: Callable[[SocketStream], Awaitable[None]]) -> None:
        """Serve one client at a time, like a QEMU chardev socket."""
        async with await SocketListener.from_socket(self._listeners[name]) as listener:
            while True:
                async with await listener.accept() as stream:
                    await handler(stream)

    # -- QMP -------------------------------------------------------------------------------

    async def _serve_qmp(self, stream: SocketStream) -> None:
        self._qmp = stream
        major, minor, micro = self.fake.version
        greeting = {"QMP": {"version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                                        "package": "vmctl-fake"}, "capabilities": ["oob"]}}  # fmt: skip
        await self._send(greeting)
        decoder = json.JSONDecoder()
        buffer = ""
        try:
            async for chunk in stream:  # QMP is a JSON stream: objects need no newline between them
                buffer += chunk.decode()
                while buffer.strip():
                    try:
                        msg, end = decoder.raw_decode(buffer.lstrip())
                    except json.JSONDecodeError:
                        break
                    buffer = buffer.lstrip()[end:]
                    await self._command(msg)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            self._qmp = None

    async def _command(self, msg: dict[str, Any]) -> None:
        self.fake.received.append(msg)
        name, args, msg_id = msg.get("execute", ""), msg.get("arguments", {}), msg.get("id")
        if name in self.fake.hang:
            return
        if name in self.fake.delays:
            await anyio.sleep(self.fake.delays[name])
        result: Any = {}
        after: Callable[[], Awaitable[None]] | None = None
        if name in self.fake.replies:
            scripted = self.fake.replies[name]
            result = scripted(args) if callable(scripted) else scripted
            if inspect.isawaitable(result):
                result = await result
        elif name == "qmp_capabilities":
            pass
        elif name == "stop":
            self.running = False
            await self.emit("STOP")
        elif name == "cont":
            self.running = True
            await self.emit("RESUME")
        elif name == "query-status":
            result = {"status": "running" if self.running else "paused", "running": self.running,
                      "singlestep": False}  # fmt: skip
        elif name == "query-cpus-fast":
            result = [{"cpu-index": 0, "thread-id": 1, "qom-path": "/machine/unattached/device[0]",
                       "target": "x86_64"}]  # fmt: skip
        elif name == "device_add":
            if args.get("id") in self.devices:
                result = QmpErrorReply("GenericError", f"Duplicate device ID '{args.get('id')}'")
            else:
                self.devices[str(args.get("id"))] = dict(args)
        elif name == "qom-list" and args.get("path") == "/machine/peripheral":
            result = [
                {"name": dev_id, "type": f"child<{props.get('driver')}>"} for dev_id, props in self.devices.items()
            ]
        elif name == "device_del":
            dev_id = str(args.get("id"))
            if dev_id not in self.devices:
                result = QmpErrorReply("DeviceNotFound", f"Device '{dev_id}' not found")
            else:
                after = self._unplug_later(dev_id)
        elif name in ("blockdev-add", "blockdev-del", "netdev_add", "netdev_del", "object-add", "object-del",
                      "chardev-add", "chardev-remove"):  # fmt: skip
            pass
        elif name == "quit":

            async def after_quit() -> None:
                await self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
                self.exit(0)

            after = after_quit
        else:
            result = QmpErrorReply("CommandNotFound", f"The command {name} has not been found")
        reply: dict[str, Any]
        if isinstance(result, QmpErrorReply):
            reply = {"error": {"class": result.error_class, "desc": result.desc}}
        else:
            reply = {"return": result}
        if msg_id is not None:
            reply["id"] = msg_id
        fault = self.fake.reply_faults.get(name)
        if fault is not None:
            await self._send_faulty(reply, fault)
        else:
            await self._send(reply)
        if after is not None:
            await after()

    async def _send_faulty(self, reply: dict[str, Any], fault: ReplyFault) -> None:
        if fault == "wrong-id":
            await self._send({**reply, "id": "nobody-asked"})
        elif fault == "no-id":
            await self._send({k: v for k, v in reply.items() if k != "id"})
        elif fault == "garbage":
            await self.send_qmp_raw(b"\x00}{ this is not JSON\n")
        elif fault == "truncate":
            data = json.dumps(reply).encode()
            await self.send_qmp_raw(data[: len(data) // 2])
            await self.close_qmp()
        elif fault == "huge":
            await self._send({**reply, "return": "x" * HUGE_REPLY_BYTES})
        else:
            raise ValueError(f"unknown reply fault {fault!r}")

    def _unplug_later(self, dev_id: str) -> Callable[[], Awaitable[None]]:
        props = self.devices[dev_id]

        async def unplug() -> None:
            if self.fake.unplug == "never":
                return
            if self._tg is None:
                return

            async def acknowledge() -> None:
                await anyio.sleep(self.fake.unplug_delay)
                if self.fake.unplug == "guest-error":
                    await self.emit(
                        "DEVICE_UNPLUG_GUEST_ERROR", {"device": dev_id, "path": f"/machine/peripheral/{dev_id}"}
                    )
                    return
                if self.devices.get(dev_id) is not props:
                    return  # already gone (or gone and plugged again): QEMU reports a removal once
                del self.devices[dev_id]
                await self.emit("DEVICE_DELETED", {"device": dev_id, "path": f"/machine/peripheral/{dev_id}"})

            self._tg.start_soon(acknowledge)

        return unplug

    def guest_name(self, bus: str, key: str) -> str | None:
        """What the fake guest calls a plugged disk or NIC (vdX / sdX / ethN by plug order)."""
        if key in self.fake.guest_names:
            return self.fake.guest_names[key]
        matches = {
            "virtio": [d for d in self.devices.values() if d.get("driver") in ("virtio-blk-pci", "virtio-blk-device")],
            "scsi": [d for d in self.devices.values() if d.get("driver") == "scsi-hd"],
            "net": [d for d in self.devices.values() if str(d.get("driver", "")).startswith("virtio-net")],
        }[bus]
        field = {"virtio": "serial", "scsi": "scsi-id", "net": "mac"}[bus]
        for index, props in enumerate(matches):
            if str(props.get(field)) == key:
                return {"virtio": f"vd{chr(97 + index)}", "scsi": f"sd{chr(97 + index)}", "net": f"eth{index}"}[bus]
        return None

    async def emit(self, event: str, data: Mapping[str, Any] | None = None) -> None:
        if event in self.fake.drop_events:
            return
        now = time.time()
        message: dict[str, Any] = {
            "event": event,
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
        }
        if data is not None:
            message["data"] = dict(data)
        await self._send(message)

    async def _send(self, message: Mapping[str, Any]) -> None:
        await self.send_qmp_raw(json.dumps(message).encode() + b"\n")

    async def send_qmp_raw(self, data: bytes) -> None:
        if self._qmp is None:
            return
        async with self._qmp_lock:
            try:
                await self._qmp.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

    async def close_qmp(self) -> None:
        if self._qmp is not None:
            await self._qmp.aclose()

    # -- agent and console -----------------------------------------------------------------

    async def _serve_agent(self, stream: SocketStream) -> None:
        """The agent protocol (:mod:`vmctl.agent.protocol`): enough of it for tests. Output is sent
        without waiting for credit; stdin is credited back as it arrives."""
        lock = anyio.Lock()

        async def send(kind: int, request_id: int, payload: bytes = b"", stream_no: int = 0) -> None:
            async with lock:
                await stream.send(pack(kind, request_id, payload, stream_no))

        async with anyio.create_task_group() as tg:
            if self.fake.ready_delay is not None:

                async def ready() -> None:
                    await anyio.sleep(self.fake.ready_delay or 0)
                    await send(FrameType.READY, 0, proto.u32(proto.PROTOCOL_VERSION) + b"fake-boot-id")

                tg.start_soon(ready)
            reader = BufferedByteReceiveStream(stream)
            sessions: dict[int, _FakeSession] = {}
            try:
                while True:
                    length, kind, stream_no, request_id = proto.unpack_header(
                        await reader.receive_exactly(proto.HEADER_SIZE))  # fmt: skip
                    payload = await reader.receive_exactly(length) if length else b""
                    frame = proto.Frame(kind, request_id, payload, stream_no)
                    session = sessions.get(request_id)
                    if session is not None and kind in (FrameType.DATA, FrameType.EOF, FrameType.CLOSE, FrameType.KILL, FrameType.SIGNAL, FrameType.CREDIT):
                        await session.on_frame(frame, send)
                        if session.done:
                            del sessions[request_id]
                    elif kind in (FrameType.SPAWN, FrameType.FWRITE):
                        sessions[request_id] = _FakeSession(self, frame, tg, send)
                        await sessions[request_id].opened(send)
                    elif kind not in (FrameType.DATA, FrameType.EOF, FrameType.CLOSE, FrameType.KILL, FrameType.SIGNAL, FrameType.CREDIT):
                        tg.start_soon(self._agent_request, frame, send)
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, anyio.ClosedResourceError,
                    proto.ProtocolError):  # fmt: skip
                tg.cancel_scope.cancel()

    async def _agent_request(self, frame: proto.Frame, send: Callable[..., Awaitable[None]]) -> None:
        op, request_id, payload = frame.type, frame.id, frame.payload
        if op == FrameType.PING:
            await send(FrameType.PONG, request_id)
        elif op == FrameType.QUERY:
            text = {b"block": b"", b"cpus": b"0\n", b"memory": b"MemTotal: 200000 kB\nMemFree: 150000 kB\n"
                    b"MemAvailable: 160000 kB\n"}.get(payload)  # fmt: skip
            if text is None:
                await send(FrameType.ERROR, request_id, proto.i32(errno.EINVAL) + b"unknown query")
            else:
                await send(FrameType.RESULT, request_id, text)
        elif op in (FrameType.WAITDEV, FrameType.WAITGONE):
            tenths = int.from_bytes(payload[:4], "little")
            bus, _, key = payload[4:].decode().partition("\0")
            name = self.guest_name(bus, key)
            if op == FrameType.WAITDEV:
                if name is None:
                    await anyio.sleep(tenths / 10)
                    name = self.guest_name(bus, key)
                await send(FrameType.RESULT, request_id, bytes([name is not None]) + (name or "").encode())
            else:
                await send(FrameType.RESULT, request_id, bytes([name is None]))
        elif op == FrameType.FREAD:
            path = payload[4:].decode(errors="replace")
            if path not in self.fake.files:
                await send(FrameType.ERROR, request_id, proto.i32(errno.ENOENT) + f"{path}: No such file or directory".encode())
                return
            data, mode = self.fake.files[path]
            await send(FrameType.RESULT, request_id, proto.u32(mode) + len(data).to_bytes(8, "little"))
            for pos in range(0, len(data), proto.CHUNK):
                await send(FrameType.DATA, request_id, data[pos:pos + proto.CHUNK], proto.STDOUT)
            await send(FrameType.EOF, request_id, b"", proto.STDOUT)
        elif op == FrameType.POWEROFF:
            await send(FrameType.RESULT, request_id)
            await self.emit("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
            self.exit(0)
        else:
            await send(FrameType.ERROR, request_id, proto.i32(errno.EINVAL) + f"unknown request type 0x{op:02x}".encode())

    async def _serve_console(self, stream: SocketStream) -> None:
        self._console = stream
        try:
            await stream.send(b"fake console: booting\r\nvmctl-agent: ready on /dev/vport0p1\r\n")
            await anyio.sleep_forever()
        finally:
            self._console = None

    async def console_write(self, data: bytes) -> None:
        if self._console is not None:
            await self._console.send(data)

