"""The agent side of :class:`~vmctl.testing.FakeQemu`: the vmctl agent protocol served on the
agent socket a real QEMU would inherit, enough of it for tests (processes run by an
``exec_handler``, files kept in memory, queries with fixed answers)."""

from __future__ import annotations

import errno
import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import anyio
from anyio.abc import SocketStream, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream

from vmctl.agent import protocol as proto
from vmctl.agent.protocol import FrameType, pack
from vmctl.agent.results import ExecResult


class FakeProcess(Protocol):
    """What the agent needs of the fake QEMU process it runs in (:class:`vmctl.testing.FakeProcess`)."""

    fake: Any  # the FakeQemu: exec_handler, files, ready_delay

    def guest_name(self, bus: str, key: str) -> str | None: ...

    async def emit(self, event: str, data: Mapping[str, Any] | None = None) -> None: ...

    def exit(self, returncode: int) -> None: ...


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


class FakeAgent:
    """Serves one agent connection for a fake QEMU process (its devices, files and exit)."""

    def __init__(self, process: FakeProcess) -> None:
        self.process = process

    async def serve(self, stream: SocketStream) -> None:
        """The agent protocol (:mod:`vmctl.agent.protocol`): enough of it for tests. Output is sent
        without waiting for credit; stdin is credited back as it arrives."""
        lock = anyio.Lock()

        async def send(kind: int, request_id: int, payload: bytes = b"", stream_no: int = 0) -> None:
            async with lock:
                await stream.send(pack(kind, request_id, payload, stream_no))

        async with anyio.create_task_group() as tg:
            if self.process.fake.ready_delay is not None:

                async def ready() -> None:
                    await anyio.sleep(self.process.fake.ready_delay or 0)
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
                        sessions[request_id] = _FakeSession(self.process, frame, tg, send)
                        await sessions[request_id].opened(send)
                    elif kind not in (FrameType.DATA, FrameType.EOF, FrameType.CLOSE, FrameType.KILL, FrameType.SIGNAL, FrameType.CREDIT):
                        tg.start_soon(self._request, frame, send)
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, anyio.ClosedResourceError,
                    proto.ProtocolError):  # fmt: skip
                tg.cancel_scope.cancel()

    async def _request(self, frame: proto.Frame, send: Callable[..., Awaitable[None]]) -> None:
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
            name = self.process.guest_name(bus, key)
            if op == FrameType.WAITDEV:
                if name is None:
                    await anyio.sleep(tenths / 10)
                    name = self.process.guest_name(bus, key)
                await send(FrameType.RESULT, request_id, bytes([name is not None]) + (name or "").encode())
            else:
                await send(FrameType.RESULT, request_id, bytes([name is None]))
        elif op == FrameType.FREAD:
            path = payload[4:].decode(errors="replace")
            if path not in self.process.fake.files:
                await send(FrameType.ERROR, request_id, proto.i32(errno.ENOENT) + f"{path}: No such file or directory".encode())
                return
            data, mode = self.process.fake.files[path]
            await send(FrameType.RESULT, request_id, proto.u32(mode) + len(data).to_bytes(8, "little"))
            for pos in range(0, len(data), proto.CHUNK):
                await send(FrameType.DATA, request_id, data[pos:pos + proto.CHUNK], proto.STDOUT)
            await send(FrameType.EOF, request_id, b"", proto.STDOUT)
        elif op == FrameType.POWEROFF:
            await send(FrameType.RESULT, request_id)
            await self.process.emit("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
            self.process.exit(0)
        else:
            await send(FrameType.ERROR, request_id, proto.i32(errno.EINVAL) + f"unknown request type 0x{op:02x}".encode())
