"""Host side of the guest agent protocol: binary frames over a virtio-serial port.

The format and the frame types are in :mod:`vmctl.agent.protocol`; the guest side is the C program
``guest/files/vmctl-agent.c``. Every request gets an id (a random per-connection prefix and a
counter) and a :class:`Channel` that collects the frames the guest sends for it: the reply,
output data per stream, credits, the exit. One reader task dispatches frames to channels by id;
one writer task sends what the channels post, in order. Sending never outruns the guest: DATA
frames go out only within the credit the guest granted, and output credit is granted back only
as the consumer takes the data (up to a limit buffered unread), so memory stays bounded on both
sides however much flows. The guest is held to the same rule: each channel counts the credit it
granted, and DATA beyond it ends the connection (:class:`~vmctl.agent.protocol.FlowViolation`), so
what the controller keeps of a request's output never exceeds what it offered, whatever the
guest sends. A connection ended by the guest breaking the protocol is reported to
``on_violation`` (the sandbox fails: see the README's guest-agent section).

When the connection drops, every channel is failed; a cancelled caller releases its own channel
(and tells the guest to kill or drop what belonged to it), so no entry is ever left behind.
"""

from __future__ import annotations

import itertools
import math
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import anyio
from anyio.abc import SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from vmctl.agent import protocol as proto
from vmctl.agent.protocol import Frame, FrameType, ProtocolError, pack
from vmctl.agent.results import (
    ExecResult,
    GuestBlockDevice,
    GuestMemory,
    parse_block_devices,
    parse_cpu_list,
    parse_memory,
)
from vmctl.core.waiting import Broadcast, Failure, deadline, make_error
from vmctl.errors import (
    GuestCommandFailed,
    GuestDisconnected,
    GuestError,
    GuestOSError,
    GuestUnresponsive,
    InvalidArgument,
    OutputLimitExceeded,
)

__all__ = ["AgentClient", "Channel", "ExecResult", "GuestBlockDevice", "GuestCommandFailed", "GuestMemory",
           "InvalidArgument"]  # fmt: skip

#: How long after a command's ``timeout`` (or its output limit) the host waits for the guest to
#: confirm the kill: the guest kills it at the deadline and answers once all of it is gone; the host
#: gives up this much later (:class:`GuestUnresponsive`), so a flooded or stopped guest cannot make
#: the call outlast its deadline by more.
TIMEOUT_GRACE = 2.0
#: Output credit per stream a request starts with (and the unit in which credit is granted back).
WINDOW = 1024 * 1024
#: Output a process may have buffered unread in the controller before the guest is made to wait
#: (``sb.process``), and the most an ``exec`` collects before it kills the command.
DEFAULT_OUTPUT_LIMIT = 64 * 1024 * 1024
GUEST_FRAMES = frozenset({FrameType.PONG, FrameType.STARTED, FrameType.DATA, FrameType.EOF, FrameType.CREDIT, FrameType.EXIT, FrameType.RESULT, FrameType.ERROR})
STREAM_NAMES = {1: "stream 1 (stdout, file data)", 2: "stream 2 (stderr)"}

Argv = Sequence[str | bytes]
Env = Mapping[str, str] | Mapping[bytes, bytes] | None


def encode_argv(argv: Argv) -> list[bytes]:
    """argv as bytes, checked: a list (not one string), not empty, no NUL bytes."""
    if isinstance(argv, str | bytes):
        raise InvalidArgument(f"argv: give a list of arguments, e.g. {['sh', '-c', argv]!r}, not one string")
    args = [os.fsencode(a) for a in argv]
    if not args:
        raise InvalidArgument("argv: give at least the program to run, e.g. ['uname', '-a']")
    if any(b"\0" in a for a in args):
        raise InvalidArgument("argv: arguments may not contain NUL bytes")
    return args


def encode_env(env: Env) -> dict[bytes, bytes]:
    """Extra environment variables, checked: names without ``=``, nothing with NUL bytes."""
    out: dict[bytes, bytes] = {}
    for key, value in (env or {}).items():
        k, v = os.fsencode(key), os.fsencode(value)
        if not k or b"=" in k or b"\0" in k or b"\0" in v:
            raise InvalidArgument(f"env: {key!r}: names must be non-empty without '=' and no NUL bytes anywhere")
        out[k] = v
    return out


def encode_path(path: str | bytes | os.PathLike[str] | None, what: str) -> bytes:
    raw = b"" if path is None else os.fsencode(path)
    if b"\0" in raw:
        raise InvalidArgument(f"{what}: may not contain NUL bytes")
    if path is not None and not raw:
        raise InvalidArgument(f"{what}: give a path")
    return raw


def check_timeout(timeout: float | None) -> None:
    if timeout is not None and not 0 < timeout < math.inf:
        raise InvalidArgument("timeout: must be a positive, finite number of seconds (or None for no limit)")


def unresponsive(what: str, command: bytes, timeout: float) -> GuestUnresponsive:
    """The host's deadline for a command passed without the guest's answer."""
    name = os.fsdecode(command)
    return GuestUnresponsive(
        f"the guest agent did not answer {what} {name!r} within {timeout:g}s (its timeout) and {TIMEOUT_GRACE:g}s "
        "more: the command may still run in the guest (vmctl told the agent to kill it); a guest that keeps doing "
        "this is flooded or hostile: stop it", command=name, timeout=timeout)  # fmt: skip


def _is_disconnect(failure: Failure | None) -> bool:
    return failure is not None and isinstance(make_error(failure), GuestDisconnected)


class Channel:
    """Everything the guest sends for one request id, as it arrives (called by the reader task).

    Output (stream 1 and 2) is buffered per stream; credit for it goes back to the guest as the
    consumer takes it, and at once while less than ``limit`` is buffered unread. ``hard_limit``
    (for ``exec``, which collects everything): once the total goes over it, what came is dropped,
    no more credit goes out and the guest is told to kill the command (``over_limit``).
    The request itself grants ``window`` bytes on each stream in ``output`` (none on the others);
    DATA beyond what was granted is a :class:`~vmctl.agent.protocol.FlowViolation` unless the
    channel is not ``metered`` (the benchmarks' SOURCE, which ignores credit by design).
    Input (stream 0) goes out within ``credit_out``, which the guest raises with CREDIT frames.
    """

    def __init__(self, client: AgentClient, request_id: int, *, credit_out: int = 0, output: tuple[int, ...] = (),
                 window: int = WINDOW, limit: int | None = None, hard_limit: int | None = None,
                 metered: bool = True) -> None:  # fmt: skip
        self.id = request_id
        self._client = client
        self._changed = Broadcast()
        self.reply: Frame | None = None
        self.failure: Failure | None = None
        self.exit: tuple[int, bool] | None = None
        #: the guest will send nothing more (exit, final result or error): no CLOSE needed
        self.finished = False
        self.credit_out = credit_out
        self.input_closed = False
        self.window = window
        self.limit = limit
        self.hard_limit = hard_limit
        #: the output went over ``hard_limit``: the guest was told to kill the command (KILL)
        self.over_limit = False
        self.total = 0
        self._chunks: dict[int, deque[bytes]] = {1: deque(), 2: deque()}
        self._buffered = {1: 0, 2: 0}
        self._ungranted = {1: 0, 2: 0}
        #: output credit granted to the guest and not yet used, per stream
        self._credit_in = {s: window if s in output else 0 for s in (1, 2)}
        self.metered = metered
        self.eof = {1: False, 2: False}

    @property
    def buffered(self) -> int:
        """Output bytes received and not yet taken."""
        return self._buffered[1] + self._buffered[2]

    def _notify(self) -> None:
        self._changed.notify()

    def fail(self, failure: Failure) -> None:
        """Fail every waiter on this channel. A lost connection gives way to a more precise reason
        (the sandbox failed) that arrives later."""
        if self.failure is None or _is_disconnect(self.failure):
            self.failure = failure
            self.finished = True
            for stream in (1, 2):  # nobody can take it any more (waiters raise the failure first)
                self._chunks[stream].clear()
                self._buffered[stream] = 0
            self._notify()

    def on_frame(self, frame: Frame) -> None:
        """Take one frame; a :class:`~vmctl.agent.protocol.FlowViolation` ends the connection (the
        reader's caller), any other malformed frame only this request."""
        try:
            self._on_frame(frame)
        except proto.FlowViolation:
            raise
        except ProtocolError as exc:
            message = f"guest agent sent a malformed frame: {exc}"
            self.fail(lambda: GuestError(message))
        self._notify()

    def _on_frame(self, frame: Frame) -> None:
        kind, stream, payload = frame.type, frame.stream, frame.payload
        if kind == FrameType.DATA and stream in (1, 2):
            if self.metered:
                if len(payload) > self._credit_in[stream]:
                    raise proto.FlowViolation(
                        f"it sent {len(payload)} bytes on {STREAM_NAMES[stream]} beyond the credit granted "
                        f"({self._credit_in[stream]} bytes left)")  # fmt: skip
                self._credit_in[stream] -= len(payload)
            if not payload or self.eof[stream] or self.finished:
                return
            self._chunks[stream].append(payload)
            self._buffered[stream] += len(payload)
            self._ungranted[stream] += len(payload)
            self.total += len(payload)
            if self.hard_limit is not None and self.total > self.hard_limit:
                self._over_limit()
                return
            self._grant(stream)
        elif kind == FrameType.EOF:
            if stream == 0:
                self.input_closed = True
            elif stream in (1, 2):
                self.eof[stream] = True
        elif kind == FrameType.CREDIT and stream == 0:
            self.credit_out += proto.parse_u32(payload, "CREDIT")
        elif kind == FrameType.EXIT:
            self.exit = proto.parse_exit(payload)
            self.finished = True
        elif kind == FrameType.ERROR:
            errno, message = proto.parse_error(payload)
            reason = message.rpartition(": ")[2] or os.strerror(errno)
            self.fail(lambda: GuestOSError(errno, reason, f"guest: {message}"))
        elif kind in (FrameType.RESULT, FrameType.PONG, FrameType.STARTED) and self.reply is None:
            self.reply = frame
        else:
            raise ProtocolError(f"an unexpected frame (type 0x{kind:02x}, stream {stream}) for this request")

    def _over_limit(self) -> None:
        """Drop the output (the caller gets an error instead) and have the guest kill the command;
        its EXIT then confirms that it is gone."""
        for chunks in self._chunks.values():
            chunks.clear()
        self._buffered = {1: 0, 2: 0}
        if not self.over_limit:
            self.over_limit = True
            self._client.post(pack(FrameType.KILL, self.id))

    def limit_error(self) -> OutputLimitExceeded:
        """The error for a command that went over ``hard_limit``: killed once its EXIT came."""
        killed = self.exit is not None
        outcome = ("it was killed, with everything it started" if killed else
                   f"the guest agent did not confirm within {TIMEOUT_GRACE:g}s that it was killed (vmctl told it to)")  # fmt: skip
        return OutputLimitExceeded(f"the command wrote more than its output limit of {self.hard_limit} bytes; "
                                   f"{outcome}", killed=killed)  # fmt: skip

    def _grant(self, stream: int) -> None:
        owed = self._ungranted[stream]
        if not owed or self.finished:
            return
        if self.limit is not None and self.buffered > max(self.limit - self.window, 0):
            return  # the consumer is behind: the guest waits until it catches up
        if owed >= self.window // 4 or self._buffered[stream] == 0:
            self._ungranted[stream] = 0
            self._credit_in[stream] += owed
            self._client.post(pack(FrameType.CREDIT, self.id, proto.u32(owed), stream))

    async def wait_for(self, ready: Callable[[], object]) -> None:
        """Wait until ``ready()`` holds; raise the channel's failure first if it has one."""
        while True:
            if self.failure is not None:
                raise make_error(self.failure)
            if ready():
                return
            await self._changed.wait()

    async def wait_reply(self) -> Frame:
        await self.wait_for(lambda: self.reply is not None)
        assert self.reply is not None
        return self.reply

    async def wait_exit(self) -> tuple[int, bool]:
        await self.wait_for(lambda: self.exit is not None)
        assert self.exit is not None
        return self.exit

    def take(self, stream: int, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of what ``stream`` buffered (may be empty)."""
        chunks = self._chunks[stream]
        parts: list[bytes] = []
        size = 0
        while chunks and size < max_bytes:
            first = chunks.popleft()
            if size + len(first) > max_bytes:
                chunks.appendleft(first[max_bytes - size:])
                first = first[:max_bytes - size]
            parts.append(first)
            size += len(first)
        self._buffered[stream] -= size
        self._grant(stream)
        if self.limit is not None:
            self._grant(3 - stream)  # room again for the other stream's owed credit
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def take_all(self, stream: int) -> bytes:
        data = b"".join(self._chunks[stream])
        self._chunks[stream].clear()
        self._buffered[stream] = 0
        return data

    async def receive(self, stream: int, max_bytes: int = 65536) -> bytes:
        """The next bytes of ``stream``; :class:`anyio.EndOfStream` once it ended."""
        await self.wait_for(lambda: self._chunks[stream] or self.eof[stream])
        if not self._chunks[stream]:
            raise anyio.EndOfStream
        return self.take(stream, max_bytes)

    async def send(self, data: bytes) -> None:
        """Send ``data`` on stream 0 within the guest's credit; :class:`anyio.BrokenResourceError`
        once the guest said it takes no more (the process closed its stdin or ended)."""
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            await self.wait_for(lambda: self.credit_out > 0 or self.input_closed or self.exit is not None
                                or self.over_limit)  # fmt: skip
            if self.input_closed or self.exit is not None or self.over_limit:
                raise anyio.BrokenResourceError("the guest process no longer reads its stdin")
            n = min(self.credit_out, proto.CHUNK, len(view) - pos)
            self._client.post(pack(FrameType.DATA, self.id, bytes(view[pos:pos + n]), 0))
            self.credit_out -= n
            pos += n

    def send_eof(self) -> None:
        self._client.post(pack(FrameType.EOF, self.id, b"", 0))


class AgentClient:
    """Talks to the vmctl agent in one guest."""

    def __init__(self, path: Path, *, on_violation: Callable[[str], None] | None = None) -> None:
        self.path = path
        #: told (before any waiter is failed) when the guest ended the connection by breaking the protocol
        self._on_violation = on_violation
        self.boot_id: str | None = None
        self._stream: SocketStream | None = None
        self._ready = anyio.Event()
        # Ids differ per connection: a reply to a request of a previous controller (attached to
        # the same detached guest) can never complete one of ours.
        self._prefix = secrets.randbits(31) + 1
        self._ids = itertools.count(1)
        self._channels: dict[int, Channel] = {}
        self._outq: list[bytes] = []
        self._out_wake = anyio.Event()
        self._posted = 0
        self._sent = 0
        self._sent_wake = anyio.Event()
        self._closed_reason: Failure | None = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def pending(self) -> int:
        """Requests, processes and transfers under way (0 whenever none is: checked by the leak tests)."""
        return len(self._channels)

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, then read and write frames until the connection ends; fail every channel then."""
        try:
            self._stream = stream = await anyio.connect_unix(self.path)
        except OSError as exc:
            raise GuestDisconnected(f"cannot connect to the agent socket {self.path}: {exc}") from exc
        task_status.started()
        reason: list[Failure] = [lambda: GuestDisconnected("guest agent connection closed")]
        violation: str | None = None
        try:
            async with anyio.create_task_group() as tg:

                async def write() -> None:
                    await self._write_loop(stream, reason)
                    tg.cancel_scope.cancel()

                tg.start_soon(write)
                reason[0], violation = await self._read_loop(stream)
                tg.cancel_scope.cancel()
        finally:
            if violation is not None and self._on_violation is not None:
                self._on_violation(violation)  # first: waiters then get the sandbox's own error
            self.fail_all(reason[0])
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _read_loop(self, stream: SocketStream) -> tuple[Failure, str | None]:
        """Dispatch frames until the connection ends: why it ended, and the protocol violation
        that ended it (None if the connection closed)."""
        reader = BufferedByteReceiveStream(stream)
        while True:
            try:
                length, kind, stream_no, request_id = proto.unpack_header(await reader.receive_exactly(proto.HEADER_SIZE))
                payload = await reader.receive_exactly(length) if length else b""
                self._dispatch(Frame(kind, request_id, payload, stream_no))
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, anyio.ClosedResourceError,
                    OSError):  # fmt: skip
                return (lambda: GuestDisconnected("guest agent connection closed")), None
            except ProtocolError as exc:
                message = f"guest agent broke the protocol: {exc}"
                return (lambda message=message: GuestDisconnected(message)), message

    async def _write_loop(self, stream: SocketStream, reason: list[Failure]) -> None:
        while True:
            await self._out_wake.wait()
            self._out_wake = anyio.Event()
            batch, self._outq = self._outq, []
            try:
                await stream.send(b"".join(batch))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                message = f"cannot send to the guest agent: {exc}"
                reason[0] = lambda message=message: GuestDisconnected(message)  # type: ignore[misc]
                return
            self._sent += len(batch)
            self._sent_wake.set()
            self._sent_wake = anyio.Event()

    def _dispatch(self, frame: Frame) -> None:
        if frame.type == FrameType.READY:
            if frame.id != 0 or not 4 <= len(frame.payload) <= 4 + proto.MAX_BOOT_ID:
                raise ProtocolError("a malformed READY frame")
            if self._ready.is_set():  # the agent restarted: what it was running is gone
                for stale in self._channels.values():
                    stale.fail(lambda: GuestError("the guest agent restarted while this request ran"))
            self.boot_id = frame.payload[4:].decode(errors="replace")
            self._ready.set()
            return
        if frame.type not in GUEST_FRAMES:
            raise ProtocolError(f"a frame of unknown type 0x{frame.type:02x}")
        if frame.stream > 2:
            raise ProtocolError(f"a frame for stream {frame.stream}")
        channel = self._channels.get(frame.id)
        if channel is not None:  # else: late, for a request that is over (or an earlier controller's)
            channel.on_frame(frame)

    def fail_all(self, failure: Failure) -> None:
        """Fail every channel with ``failure`` (the connection or the sandbox is gone); a factory
        gives each waiting task its own exception."""
        if self._closed_reason is None or _is_disconnect(self._closed_reason):
            self._closed_reason = failure
        for channel in self._channels.values():
            channel.fail(failure)

    def mark_ready(self, boot_id: str = "restored") -> None:
        """Ready without a READY frame (a guest restored from a template already sent it)."""
        self.boot_id = self.boot_id or boot_id
        self._ready.set()

    async def wait_ready(self) -> str:
        """Wait for the agent's READY frame; returns the guest boot id."""
        await self._ready.wait()
        assert self.boot_id is not None
        return self.boot_id

    # -- channels (used by guestproc and guestfiles too) ----------------------------------------

    def open_channel(self, *, credit_out: int = 0, output: tuple[int, ...] = (), limit: int | None = None,
                     hard_limit: int | None = None, metered: bool = True) -> Channel:  # fmt: skip
        """A channel under a fresh id (options: :class:`Channel`); release it with :meth:`release`
        in ``finally``."""
        if self._closed_reason is not None:
            raise make_error(self._closed_reason)
        if self._stream is None:
            raise GuestDisconnected("guest agent not connected")
        request_id = (self._prefix << 32) | next(self._ids)
        channel = self._channels[request_id] = Channel(self, request_id, credit_out=credit_out, output=output,
                                                       limit=limit, hard_limit=hard_limit, metered=metered)  # fmt: skip
        return channel

    def release(self, channel: Channel) -> None:
        """Forget a channel; unless the guest finished it, tell the guest to kill or drop it."""
        if self._channels.pop(channel.id, None) is not None and not channel.finished:
            self.post(pack(FrameType.CLOSE, channel.id))

    def post(self, frame: bytes) -> None:
        """Queue a frame for the writer (callers keep DATA within credit, so this stays bounded)."""
        if self._closed_reason is not None:
            return
        self._outq.append(frame)
        self._posted += 1
        self._out_wake.set()

    async def flush(self) -> None:
        """Wait until everything posted so far went out."""
        target = self._posted
        while self._sent < target:
            if self._closed_reason is not None:
                raise make_error(self._closed_reason)
            await self._sent_wake.wait()

    async def request(self, kind: FrameType, payload: bytes = b"") -> bytes:
        """One request, one reply (RESULT or PONG): its payload; :class:`GuestOSError` if refused."""
        channel = self.open_channel()
        try:
            self.post(pack(kind, channel.id, payload))
            reply = await channel.wait_reply()
            channel.finished = True
            return reply.payload
        finally:
            self.release(channel)

    # -- requests -------------------------------------------------------------------------------

    async def ping(self) -> None:
        await self.request(FrameType.PING)

    async def exec(self, argv: Argv, *, stdin: bytes | str = b"", timeout: float | None = None, env: Env = None,
                   cwd: str | os.PathLike[str] | None = None,
                   output_limit: int = DEFAULT_OUTPUT_LIMIT) -> ExecResult:  # fmt: skip
        """Run ``argv`` in the guest, ``env`` added to its environment, in ``cwd``: exit code, stdout,
        stderr. ``timeout`` kills it there with everything it started (the result has ``timed_out``
        once the guest confirmed they are gone); the host holds the deadline too: without the
        guest's answer ``TIMEOUT_GRACE`` after it, :class:`GuestUnresponsive`. Output over
        ``output_limit`` kills it too and raises :class:`OutputLimitExceeded` (``killed`` says
        whether the guest confirmed it). A cancelled call kills it in the guest (unconfirmed)."""
        args = encode_argv(argv)
        stdin = stdin.encode() if isinstance(stdin, str) else bytes(stdin)
        spawn = proto.spawn_payload(args, encode_env(env), encode_path(cwd, "cwd"),
                                    0 if timeout is None else max(1, math.ceil(timeout * 1000)), WINDOW)  # fmt: skip
        check_timeout(timeout)
        started = time.monotonic()
        channel = self.open_channel(credit_out=proto.STDIN_WINDOW, output=(1, 2), hard_limit=output_limit)
        try:
            with anyio.move_on_after(math.inf if timeout is None else timeout + TIMEOUT_GRACE) as host_deadline:
                self.post(pack(FrameType.SPAWN, channel.id, spawn))
                try:
                    await channel.send(stdin)
                    channel.send_eof()
                except anyio.BrokenResourceError:
                    pass  # the command did not read all of its stdin (or went over its output limit)
                await channel.wait_for(lambda: channel.exit is not None or channel.over_limit)
                if channel.over_limit:
                    with anyio.move_on_after(TIMEOUT_GRACE):  # the guest's EXIT confirms the kill
                        await channel.wait_for(lambda: channel.exit is not None)
                    raise channel.limit_error()
            if channel.over_limit:
                raise channel.limit_error()
            if host_deadline.cancelled_caught:
                assert timeout is not None
                raise unresponsive("exec", args[0], timeout)
            assert channel.exit is not None
            code, timed_out = channel.exit
            return ExecResult(code, channel.take_all(1), channel.take_all(2), timed_out, time.monotonic() - started)
        finally:
            self.release(channel)

    async def query(self, name: str) -> str:
        """One of the agent's fixed queries (``block``, ``cpus``, ``memory``): its text output."""
        try:
            return (await self.request(FrameType.QUERY, name.encode())).decode(errors="replace")
        except GuestOSError as exc:
            raise GuestError(f"guest query {name!r} failed: {exc.reason}") from exc

    async def block_devices(self, timeout: float | None = None) -> list[GuestBlockDevice]:
        with deadline(timeout, "the guest's block device query"):
            return parse_block_devices(await self.query("block"))

    async def online_cpus(self, timeout: float | None = None) -> list[int]:
        with deadline(timeout, "the guest's CPU query"):
            return parse_cpu_list(await self.query("cpus"))

    async def memory(self, timeout: float | None = None) -> GuestMemory:
        with deadline(timeout, "the guest's memory query"):
            return parse_memory(await self.query("memory"))

    async def check_exec(self, argv: Argv) -> ExecResult:
        """``exec`` that raises :class:`GuestCommandFailed` unless the command exits 0 (vmctl's own
        guest-side steps)."""
        return (await self.exec(argv)).check()

    async def _wait(self, kind: FrameType, bus: str, key: str, timeout: float) -> bytes:
        tenths = max(1, int(timeout * 10))
        reply = await self.request(kind, proto.u32(tenths) + bus.encode() + b"\0" + key.encode())
        if not reply or reply[0] not in (0, 1):
            raise GuestError(f"guest agent sent a malformed device-wait reply: {reply[:100]!r}")
        return reply

    async def wait_block_device(self, bus: str, key: str, timeout: float) -> str | None:
        """Wait in the guest for a disk (virtio: by serial; scsi: by target); its /dev path or None."""
        reply = await self._wait(FrameType.WAITDEV, bus, key, timeout)
        return f"/dev/{reply[1:].decode(errors='replace')}" if reply[0] and len(reply) > 1 else None

    async def wait_device_gone(self, bus: str, key: str, timeout: float) -> bool:
        """Wait in the guest until a disk or NIC is gone; False if it is still there."""
        return (await self._wait(FrameType.WAITGONE, bus, key, timeout))[0] == 1

    async def poweroff(self) -> None:
        """Ask the guest to power off; the reply may be lost as the guest goes down."""
        if self._stream is None or self._closed_reason is not None:
            raise GuestDisconnected("guest agent not connected")
        self.post(pack(FrameType.POWEROFF, (self._prefix << 32) | next(self._ids)))
        await self.flush()

    async def channel_source(self, nbytes: int) -> int:
        """Benchmarks: the agent sends ``nbytes`` of zeros as fast as the port goes, ignoring
        credit and doing nothing else; returns the bytes received."""
        channel = self.open_channel(output=(1,), metered=False)
        received = 0
        try:
            self.post(pack(FrameType.SOURCE, channel.id, nbytes.to_bytes(8, "little")))
            while True:
                await channel.wait_for(lambda: channel.buffered or channel.eof[1])
                received += len(channel.take_all(1))
                if channel.eof[1]:
                    channel.finished = True
                    return received
        finally:
            self.release(channel)

    async def channel_sink(self, nbytes: int) -> None:
        """Benchmarks: send ``nbytes`` of zeros that the agent throws away (credit still applies)."""
        channel = self.open_channel()
        zeros = bytes(proto.CHUNK)
        try:
            self.post(pack(FrameType.SINK, channel.id))
            left = nbytes
            while left > 0:
                await channel.wait_for(lambda: channel.credit_out > 0)
                n = min(channel.credit_out, len(zeros), left)
                self.post(pack(FrameType.DATA, channel.id, zeros[:n]))
                channel.credit_out -= n
                left -= n
            channel.send_eof()
            await channel.wait_reply()
            channel.finished = True
        finally:
            self.release(channel)
