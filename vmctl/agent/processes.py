"""Processes in the guest with live streams: ``async with sb.process(argv) as p``.

A process is a channel of the agent client (:mod:`vmctl.agent.client`): the guest sends stdout and
stderr as the command writes them, each within the credit the controller granted; credit goes
back as the caller reads, and at once while less than ``output_limit`` is buffered unread, so a
caller that reads slowly (or only one of the two streams) makes the command wait in its pipe,
never fills the controller's memory, and loses nothing. stdin goes the other way within the
guest's credit. Leaving the block, or cancelling it, kills the command's process group in the
guest (SIGKILL: its cgroup, so also what it started) and frees the channel; a failing sandbox
fails every stream at once.

A ``timeout`` is held on both sides: the guest kills the command at it (``timed_out``), and every
call on the process (start, wait, the streams, stdin) gives up ``TIMEOUT_GRACE`` later with
:class:`GuestUnresponsive` if the guest has not answered by then, so no call outlasts the
deadline by more however busy or hostile the guest is.
"""

from __future__ import annotations

import os
import signal as signals
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import anyio
from anyio.abc import ByteReceiveStream, ByteSendStream

from vmctl.agent import protocol as proto
from vmctl.agent.client import (
    DEFAULT_OUTPUT_LIMIT,
    TIMEOUT_GRACE,
    WINDOW,
    AgentClient,
    Argv,
    Channel,
    Env,
    check_timeout,
    encode_argv,
    encode_env,
    encode_path,
    unresponsive,
)
from vmctl.agent.protocol import FrameType, pack
from vmctl.errors import InvalidArgument

__all__ = ["GuestProcess", "GuestStdin", "GuestStream", "ProcessContext"]

R = TypeVar("R")
Guard = Callable[[Awaitable[Any]], Awaitable[Any]]


async def _unguarded(call: Awaitable[R]) -> R:
    return await call


class GuestStream(ByteReceiveStream):
    """A command's stdout or stderr, delivered while it runs: ``async for chunk in stream``."""

    def __init__(self, channel: Channel, number: int, guard: Guard) -> None:
        self._channel = channel
        self._number = number
        self._guard = guard
        self._closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._closed:
            raise anyio.ClosedResourceError
        data: bytes = await self._guard(self._channel.receive(self._number, max_bytes))
        return data

    async def read_all(self) -> bytes:
        """Everything up to the end of the stream."""
        return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        self._closed = True


class GuestStdin(ByteSendStream):
    """A command's stdin: ``await stdin.send(data)`` (waits for the guest's credit), ``aclose()``
    ends it. :class:`anyio.BrokenResourceError` once the command no longer reads it."""

    def __init__(self, channel: Channel, guard: Guard) -> None:
        self._channel = channel
        self._guard = guard
        self._closed = False

    async def send(self, item: bytes) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        await self._guard(self._channel.send(bytes(item)))

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if not self._channel.finished:
                self._channel.send_eof()


class GuestProcess:
    """A command running in the guest. ``stdout`` and ``stderr`` stream its output, ``stdin`` feeds
    it; :meth:`wait` returns its exit code (128 + N when a signal N ended it)."""

    def __init__(self, client: AgentClient, channel: Channel, pid: int, guard: Guard,
                 limit: HostLimit | None = None) -> None:  # fmt: skip
        self._client = client
        self._channel = channel
        self._outer_guard = guard
        self._limit = limit
        #: the command's pid in the guest
        self.pid = pid
        self.stdin = GuestStdin(channel, self._guard)
        self.stdout = GuestStream(channel, proto.STDOUT, self._guard)
        self.stderr = GuestStream(channel, proto.STDERR, self._guard)

    async def _guard(self, call: Awaitable[R]) -> R:
        """The sandbox's guard, within the host's deadline while the command has not ended."""
        if self._limit is None or self._channel.finished:
            result: R = await self._outer_guard(call)
            return result
        return await self._limit.bound(self._outer_guard(call))

    @property
    def returncode(self) -> int | None:
        """The exit code once the command ended, else None."""
        return self._channel.exit[0] if self._channel.exit else None

    @property
    def timed_out(self) -> bool:
        """The guest killed the command at its ``timeout``."""
        return bool(self._channel.exit and self._channel.exit[1])

    async def wait(self) -> int:
        """Wait for the command to end (its output streams end first); its exit code."""
        code, _ = await self._guard(self._channel.wait_exit())
        return int(code)

    async def signal(self, sig: int | signals.Signals) -> None:
        """Send ``sig`` to the command (not to its children); nothing happens if it already ended."""
        if not 0 < int(sig) < 65:
            raise InvalidArgument(f"signal: {sig!r} is not a signal number")
        if self._channel.exit is None:
            self._client.post(pack(FrameType.SIGNAL, self._channel.id, proto.i32(int(sig))))
            await self._guard(self._client.flush())

    async def kill(self) -> None:
        await self.signal(signals.SIGKILL)

    async def aclose(self) -> None:
        """Kill the command's process group in the guest unless it ended, and free its channel."""
        self._client.release(self._channel)

    async def __aenter__(self) -> GuestProcess:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
        await self.aclose()


class HostLimit:
    """The host's deadline for a command with a ``timeout``: its timeout plus ``TIMEOUT_GRACE``
    after it was requested."""

    def __init__(self, command: bytes, timeout: float) -> None:
        self.command = command
        self.timeout = timeout
        self.at = anyio.current_time() + timeout + TIMEOUT_GRACE

    async def bound(self, call: Awaitable[R]) -> R:
        with anyio.move_on_at(self.at):
            return await call
        raise unresponsive("process", self.command, self.timeout)


async def start(client: AgentClient, argv: Argv, *, env: Env = None, cwd: str | os.PathLike[str] | None = None,
                timeout: float | None = None, output_limit: int = DEFAULT_OUTPUT_LIMIT,
                guard: Guard = _unguarded) -> GuestProcess:  # fmt: skip
    """Start ``argv`` in the guest; returns once the guest started it (its pid known)."""
    args = encode_argv(argv)
    check_timeout(timeout)
    if output_limit < WINDOW:
        raise InvalidArgument(f"output_limit: at least {WINDOW} bytes")
    timeout_ms = 0 if timeout is None else max(1, int(timeout * 1000))
    payload = proto.spawn_payload(args, encode_env(env), encode_path(cwd, "cwd"), timeout_ms, WINDOW)
    channel = client.open_channel(credit_out=proto.STDIN_WINDOW, output=(1, 2), limit=output_limit)
    limit = None if timeout is None else HostLimit(args[0], timeout)
    try:
        client.post(pack(FrameType.SPAWN, channel.id, payload))
        started = guard(channel.wait_reply())
        reply = await (started if limit is None else limit.bound(started))
        pid = int.from_bytes(reply.payload[:4], "little", signed=True)
    except BaseException:
        client.release(channel)
        raise
    return GuestProcess(client, channel, pid, guard, limit)


class ProcessContext:
    """What ``sb.process(...)`` returns: ``async with`` starts the command and kills it on exit."""

    def __init__(self, starting: Callable[[], Awaitable[GuestProcess]]) -> None:
        self._starting = starting
        self._process: GuestProcess | None = None

    async def __aenter__(self) -> GuestProcess:
        self._process = await self._starting()
        return self._process

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
        if self._process is not None:
            await self._process.aclose()
