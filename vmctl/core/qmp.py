"""The QMP session: the only module that imports ``qemu.qmp``.

It adds what ``QMPClient`` leaves to us: a timeout on every command, errors mapped into vmctl's
hierarchy at this edge, and an event stream registered before the connection so no event is
missed. Cancellation is never wrapped.

A controller may hold a thousand sessions in one event loop, so the per-message path is kept
short: one read loop per connection instead of a chain of coroutines per message, one future per
pending command instead of a queue, and a command serialised once. Everything a session keeps
while it waits is collected by Python's garbage collector over and over (see
``bench/control_plane.py``), so fewer objects per wait mean shorter collections.

The commands in flight at once are bounded per event loop (:func:`limit_commands_in_flight`):
when a thousand sessions move in lock-step, one pass of the loop runs every session's reply,
event and waiter before a timer can fire, and the longest stall grows with how many move together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import weakref
from collections import deque
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPClient,
    Runstate,
)
from qemu.qmp import QMPError as _LibQMPError
from qemu.qmp import StateError as _LibStateError
from qemu.qmp.models import ErrorResponse
from qemu.qmp.qmp_client import BadReplyError

from vmctl.errors import ConfigError, Problem, QMPCommandError, QMPDisconnected, QMPError, VmctlTimeout

DEFAULT_COMMAND_TIMEOUT = 30.0

#: Commands in flight at once in one event loop, across all sessions (see
#: :func:`limit_commands_in_flight`; measured best at 1000 sessions, ``bench/README.md``).
DEFAULT_COMMANDS_IN_FLIGHT = 100

_commands_in_flight: int | None = DEFAULT_COMMANDS_IN_FLIGHT


def limit_commands_in_flight(limit: int | None) -> None:
    """Bound the QMP commands in flight at once in each event loop, across all sandboxes.

    A command past the bound waits for a free slot (in order) before it is sent, and that wait
    counts towards its timeout. With a thousand sandboxes moving at once, the bound keeps the
    loop's longest stall short (``bench/control_plane.py``, ``bench/README.md``). A QEMU that
    never answers holds its slot until the command times out (30 s by default), so a bound far
    below the number of sandboxes that may hang at once would slow the healthy ones. ``None``
    removes the bound. Applies to commands started after the call; the default is
    :data:`DEFAULT_COMMANDS_IN_FLIGHT`.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError([Problem("limit", f"commands in flight must be a whole number >= 1 or None, not {limit!r}")])
    global _commands_in_flight  # noqa: PLW0603 - one setting for the process, like the loop policy
    _commands_in_flight = limit


class _Slots:
    """One event loop's command slots: a counter and a line of waiting futures.

    Not an ``anyio.Semaphore`` under a cancel scope: measured at 1000 sessions flat out, entering a
    scope for every waiting command cost a third more CPU per transition; a loop timer on the
    waiter's future costs next to nothing (the same choice as ``_Reply``)."""

    __slots__ = ("free", "limit", "waiting")

    def __init__(self, limit: int) -> None:
        self.limit = self.free = limit
        self.waiting: deque[asyncio.Future[bool]] = deque()

    async def acquire(self, timeout: float | None) -> bool:
        """Take a slot; False if none came free within ``timeout`` seconds."""
        if self.free and not self.waiting:
            self.free -= 1
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self.waiting.append(waiter)
        timer = None if timeout is None else loop.call_at(loop.time() + timeout, _give_up, waiter)
        try:
            granted = await waiter
        except asyncio.CancelledError:
            if not waiter.cancelled() and waiter.result():
                self.release()  # handed a slot in the same pass as the cancellation: pass it on
            else:
                self._leave(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if not granted:
            self._leave(waiter)  # gave up: out of the line now, not at the next release
        return granted

    def _leave(self, waiter: asyncio.Future[bool]) -> None:
        # a release may have passed over it already (it skips waiters that are done)
        with contextlib.suppress(ValueError):
            self.waiting.remove(waiter)

    def release(self) -> None:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        self.free += 1


def _give_up(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


_loop_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Slots] = weakref.WeakKeyDictionary()


def _slots() -> _Slots | None:
    """The running loop's command slots for the current bound (made on first use in each loop)."""
    limit = _commands_in_flight
    if limit is None:
        return None
    loop = asyncio.get_running_loop()
    slots = _loop_slots.get(loop)
    if slots is None or slots.limit != limit:
        slots = _loop_slots[loop] = _Slots(limit)
    return slots


@dataclass(frozen=True)
class QmpEvent:
    name: str
    data: Mapping[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0


def _timestamp(value: object) -> float:
    try:
        return float(value["seconds"]) + float(value["microseconds"]) / 1e6  # type: ignore[index]
    except (TypeError, ValueError, KeyError, IndexError, OverflowError):
        return 0.0


class _Message(Message):
    """qemu.qmp's ``Message`` with direct lookups.

    ``Message`` is a ``MutableMapping`` whose ``in`` and ``get`` go through the mixin's
    ``__getitem__``, raising and catching a ``KeyError`` each time a key is absent: qemu.qmp asks
    ``'event' in msg`` of every reply."""

    def __contains__(self, key: object) -> bool:
        return key in self._object

    def get(self, key: str, default: Any = None) -> Any:
        return self._object.get(key, default)


class _EventStream(EventListener):
    """All events, in order, without the history ``EventListener`` keeps.

    qemu.qmp's listener appends every event it ever accepted to a history list that is never
    trimmed: a long-lived session grows without bound, and with a thousand sessions the garbage
    collector walks millions of old messages (stalls of 0.3-0.7 s measured). Nobody reads that
    history here: events go straight to the queue."""

    def put_nowait(self, event: Message) -> None:
        self._queue.put_nowait(event)

    async def put(self, event: Message) -> None:
        self._queue.put_nowait(event)


_EXPIRED = object()


class _Reply:
    """One pending command's reply slot (``QMPClient`` makes an ``asyncio.Queue`` per command:
    four deques and an event where one future does). qemu.qmp's reader puts the reply here, its
    disconnect an ``ExecInterruptedError``, the timer ``_EXPIRED`` (a result, not an exception: a
    caller cancelled at the same moment would leave an exception nobody retrieves)."""

    __slots__ = ("future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[Any] = loop.create_future()

    def put_nowait(self, msg: object) -> None:
        if not self.future.done():
            self.future.set_result(msg)

    async def put(self, msg: object) -> None:
        self.put_nowait(msg)

    def expire(self) -> None:
        self.put_nowait(_EXPIRED)


class _SessionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """qemu.qmp's log lines for one session, named in the message.

    qemu.qmp makes a child logger per connection name (``qemu.qmp.protocol.<name>``), which the
    logging module keeps for the life of the process: one more logger for every sandbox ever run."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return f"[{self.extra['session'] if self.extra else '-'}] {msg}", kwargs


_PROTOCOL_LOG = logging.getLogger("qemu.qmp.protocol")


class _Client(QMPClient):
    """``QMPClient`` with a short path per message.

    Overridden (qemu.qmp's hooks and internals, all in this class): the read loop, the pending
    reply slots, event dispatch to our stream, per-message debug lines formatted only when debug
    logging is on (qemu.qmp pretty-prints every message as JSON for a ``logger.debug`` nobody
    reads), and one logger adapter instead of a logger per session. ``command`` is ``execute``
    without copying and serialising the message three times."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        # the default all-events listener, without its unbounded history (see _EventStream)
        self._listeners.remove(self.events)
        self.events: _EventStream = _EventStream()
        self.register_listener(self.events)

    @property
    def name(self) -> str | None:
        return self._name

    @name.setter
    def name(self, name: str | None) -> None:
        self._name = name
        self.logger = _SessionLog(_PROTOCOL_LOG, {"session": name or "-"})  # type: ignore[assignment]

    def _cb_outbound(self, msg: Any) -> Any:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", str(msg))
        return msg

    def _cb_inbound(self, msg: Any) -> Any:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", str(msg))
        return msg

    def send_fd_scm(self, fd: int) -> None:
        """qemu.qmp's, also where the transport's socket is uvloop's stand-in (no ``_sock`` to
        send on): the same message then goes out on a duplicate of it."""
        transport_sock = self._writer.transport.get_extra_info("socket") if self._writer is not None else None
        if transport_sock is None or hasattr(transport_sock, "_sock"):
            super().send_fd_scm(fd)
            return
        with socket.socket(fileno=os.dup(transport_sock.fileno())) as sock:
            sock.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("@i", fd))])

    async def _bh_recv_message(self) -> None:
        """Read and route messages until the stream ends.

        qemu.qmp's reader task calls this once per message, through three more coroutines; each
        chain lives until the next message arrives. One loop for the connection's life instead
        (it ends the way qemu.qmp's does: ``EOFError`` at end of stream, or the error raised)."""
        reader = self._reader
        assert reader is not None
        while True:
            try:  # StreamReader.readline, less one coroutine
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                line = exc.partial
                if not line:
                    raise EOFError from None
            except asyncio.LimitOverrunError as exc:
                raise ValueError(exc.args[0]) from None
            # no local keeps the message while the next one is awaited
            await self._on_message(self._cb_inbound(_Message(line, eager=True)))

    async def _event_dispatch(self, msg: Message) -> None:
        for listener in self._listeners:
            if listener is self.events:
                self.events.put_nowait(msg)
            else:
                await listener.put(msg)

    async def command(self, cmd: str, arguments: Mapping[str, object] | None, timeout: float | None) -> object:
        """``execute`` in one coroutine: the reply's ``return`` value; ``ExecuteError`` for an error
        reply, ``TimeoutError`` when none came within ``timeout`` seconds (``None``: no limit)."""
        if self._runstate is not Runstate.RUNNING:  # what qemu.qmp's @require(RUNNING) checks
            raise _LibStateError(f"{type(self).__name__} is not running ({self._runstate.name}).", self._runstate,
                                 Runstate.RUNNING)  # fmt: skip
        exec_id = self._get_exec_id()
        msg = _Message({"execute": cmd, "id": exec_id} if arguments is None else
                       {"execute": cmd, "arguments": arguments, "id": exec_id}, eager=False)  # fmt: skip
        loop = asyncio.get_running_loop()
        slot = _Reply(loop)
        self._pending[exec_id] = slot  # type: ignore[assignment]
        # a timer instead of a cancel scope: a fifth of the cost, and the same effect here
        timer = None if timeout is None else loop.call_at(loop.time() + timeout, slot.expire)
        try:
            self._outgoing.put_nowait(msg)  # unbounded: never blocks; qemu.qmp's writer task sends it
            reply = await slot.future
        finally:
            self._pending.pop(exec_id, None)
            if timer is not None:
                timer.cancel()
        if reply is _EXPIRED:
            raise TimeoutError(f"no reply to {cmd} within {timeout}s")
        if isinstance(reply, ExecInterruptedError):
            raise reply
        if "error" in reply:
            try:
                error_response = ErrorResponse(reply)
            except (KeyError, TypeError) as err:
                raise BadReplyError("QMP error reply is malformed", reply, msg) from err
            raise ExecuteError(error_response, msg, reply)
        if "return" not in reply:
            raise BadReplyError("QMP reply is missing a 'error' or 'return' member", reply, msg)
        return reply["return"]


class _Events:
    """``QmpSession.events()``: one coroutine per event awaited (an async generator over the
    listener stacks four)."""

    __slots__ = ("_queue",)

    def __init__(self, queue: asyncio.Queue[Message]) -> None:
        self._queue = queue

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> QmpEvent:
        raw = self._queue.get_nowait() if self._queue.qsize() else await self._queue.get()
        data = raw.get("data")  # three lookups: converting the whole Message costs more
        return QmpEvent(str(raw["event"]), dict(data) if isinstance(data, Mapping) else {},
                        _timestamp(raw.get("timestamp")))  # fmt: skip


CLOSE_TIMEOUT = 5.0


class QmpSession:
    """One QMP connection to one QEMU."""

    def __init__(self, name: str, *, command_timeout: float = DEFAULT_COMMAND_TIMEOUT) -> None:
        self._client = _Client(name)
        # QMPClient always keeps every event in its default all-events listener: that one is
        # ours. (A second listener would leave the default one growing for the session's life.)
        self._listener: _EventStream = self._client.events
        self.command_timeout = command_timeout
        self._hand_over_lock = anyio.Lock()

    @property
    def connected(self) -> bool:
        return self._client.runstate is Runstate.RUNNING

    async def connect(self, path: Path | socket.socket, *, timeout: float = 10.0) -> None:
        """Connect and negotiate capabilities."""
        try:
            with anyio.fail_after(timeout):
                await self._client.connect(path if isinstance(path, socket.socket) else str(path))
        except TimeoutError:
            await self.close()
            raise VmctlTimeout(f"QMP did not answer within {timeout}s at {path}") from None
        except (ConnectError, _LibQMPError, OSError) as exc:
            await self.close()
            raise QMPDisconnected(f"cannot connect QMP at {path}: {exc}") from exc

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None,
                      *, timeout: float | None = None) -> Any:  # fmt: skip
        """Run one command; :class:`VmctlTimeout` if no reply in ``timeout`` (default 30 s)."""
        limit = self.command_timeout if timeout is None else timeout
        try:
            slots = _slots()
            if slots is None:
                return await self._client.command(command, arguments, limit)
            started = asyncio.get_running_loop().time()
            if not await slots.acquire(limit):
                raise VmctlTimeout(f"QMP {command} waited {limit}s for a command slot: all {slots.limit} were in "
                                   "flight (vmctl.limit_commands_in_flight)")  # fmt: skip
            try:
                remaining = None if limit is None else max(0.0, limit - (asyncio.get_running_loop().time() - started))
                return await self._client.command(command, arguments, remaining)
            finally:
                slots.release()
        except ExecuteError as exc:
            raise QMPCommandError(command, arguments, exc.error.error.class_, exc.error.error.desc) from None
        except (ExecInterruptedError, _LibStateError, EOFError, ConnectionError) as exc:
            raise QMPDisconnected(f"QMP connection lost during {command}: {exc or type(exc).__name__}") from exc
        except _LibQMPError as exc:
            raise QMPError(f"QMP {command} failed: {exc}") from exc
        except VmctlTimeout:
            raise  # no slot came free (ours already)
        except TimeoutError:
            raise VmctlTimeout(f"QMP {command} got no reply within {limit}s") from None

    async def send_fd(self, fd: int, name: str) -> None:
        """Hand an open file to QEMU under ``name`` (for ``fd:`` migration URIs)."""
        await self._hand_over(fd, "getfd", {"fdname": name})

    async def add_fd(self, fd: int, fdset_id: int, *, opaque: str | None = None) -> None:
        """Add an open file to QEMU's fd set ``fdset_id`` (a disk then opens ``/dev/fdset/ID``);
        ``opaque`` is shown by ``query-fdsets`` (the file's name)."""
        await self._hand_over(fd, "add-fd", {"fdset-id": fdset_id, **({"opaque": opaque} if opaque else {})})

    async def _hand_over(self, fd: int, command: str, arguments: dict[str, Any]) -> None:
        """The descriptor, then the command that takes it, one pair at a time: QEMU gives a
        received descriptor to the next command that asks for one, and a second descriptor
        arriving first replaces the first (concurrent hotplugs lost disks or swapped them)."""
        async with self._hand_over_lock:
            self._client.send_fd_scm(fd)
            await self.execute(command, arguments)

    def events(self) -> _Events:
        """Every event QEMU sends, in order, for as long as the session lives (an async iterator).

        An event's name is all that is trusted: malformed ``data`` reads as empty and a malformed
        ``timestamp`` as 0, so one bad event cannot stop the stream."""
        return _Events(self._listener._queue)  # noqa: SLF001 - our own listener

    async def wait_disconnected(self) -> None:
        """Return once the connection is gone (QEMU closed it or exited)."""
        while self._client.runstate is Runstate.RUNNING:
            await self._client.runstate_changed()

    async def drain(self) -> None:
        """Wait until QEMU's last words are read and every received event went to the pump.

        Called after the process exited, so a ``SHUTDOWN`` sent just before the exit is applied
        before the exit itself is judged.
        """
        with anyio.move_on_after(2):
            await self.wait_disconnected()
            while not self._listener.empty():
                await anyio.lowlevel.checkpoint()

    async def close(self) -> None:
        """Disconnect; never raises (the error that broke the connection was already reported)."""
        # Bounded: a teardown must finish even if qemu.qmp's disconnect waits on a stuck peer
        # (the socket goes with the QEMU process anyway).
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
            try:
                await self._client.disconnect()
            except (Exception, asyncio.CancelledError):  # noqa: BLE001,S110 - the cause was reported where it happened
                # (a CancelledError here is not ours, shielded as we are: qemu.qmp re-raises the
                # one that interrupted a connect; it must not skip the rest of a teardown)
                pass
