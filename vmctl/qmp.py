"""The QMP session: the only module that imports ``qemu.qmp``.

It adds what ``QMPClient`` leaves to us: a timeout on every command, errors mapped into vmctl's
hierarchy at this edge, and an event stream registered before the connection so no event is
missed. Cancellation is never wrapped.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
from qemu.qmp import ConnectError, EventListener, ExecInterruptedError, ExecuteError, QMPClient, Runstate
from qemu.qmp import QMPError as _LibQMPError
from qemu.qmp import StateError as _LibStateError

from vmctl.errors import QMPCommandError, QMPDisconnected, QMPError, VmctlTimeout
from vmctl.waiting import deadline

DEFAULT_COMMAND_TIMEOUT = 30.0


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


class _EventStream(EventListener):
    """All events, in order, without the history ``EventListener`` keeps.

    qemu.qmp's listener appends every event it ever accepted to a history list that is never
    trimmed: a long-lived session grows without bound, and with a thousand sessions the garbage
    collector walks millions of old messages (stalls of 0.3-0.7 s measured). Nobody reads that
    history here, so it is dropped as each event arrives."""

    async def put(self, event: Any) -> None:
        await super().put(event)
        self._history.clear()


class _Client(QMPClient):
    """``QMPClient`` whose per-message debug lines are formatted only when debug logging is on.

    qemu.qmp's message hooks (documented for subclasses to override) do nothing but
    ``logger.debug("--> %s", str(msg))``, so every message is pretty-printed as JSON even when
    nobody logs it: about half the CPU a controller with many sessions spends per command."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        # the default all-events listener, without its unbounded history (see _EventStream)
        self._listeners.remove(self.events)
        self.events = _EventStream()
        self.register_listener(self.events)

    def _cb_outbound(self, msg: Any) -> Any:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", str(msg))
        return msg

    def _cb_inbound(self, msg: Any) -> Any:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", str(msg))
        return msg


CLOSE_TIMEOUT = 5.0


class QmpSession:
    """One QMP connection to one QEMU."""

    def __init__(self, name: str, *, command_timeout: float = DEFAULT_COMMAND_TIMEOUT) -> None:
        self._client = _Client(name)
        # QMPClient always keeps every event in its default all-events listener: that one is
        # ours. (A second listener would leave the default one growing for the session's life.)
        self._listener: EventListener = self._client.events
        self.command_timeout = command_timeout

    @property
    def connected(self) -> bool:
        return self._client.runstate is Runstate.RUNNING

    async def connect(self, path: Path | socket.socket, *, timeout: float = 10.0) -> None:
        """Connect and negotiate capabilities."""
        try:
            with deadline(timeout, "connect", lambda _: VmctlTimeout(f"QMP did not answer within {timeout}s at {path}")):
                await self._client.connect(path if isinstance(path, socket.socket) else str(path))
        except VmctlTimeout:
            await self.close()
            raise
        except (ConnectError, _LibQMPError, OSError) as exc:
            await self.close()
            raise QMPDisconnected(f"cannot connect QMP at {path}: {exc}") from exc

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None,
                      *, timeout: float | None = None) -> Any:  # fmt: skip
        """Run one command; :class:`VmctlTimeout` if no reply in ``timeout`` (default 30 s)."""
        limit = self.command_timeout if timeout is None else timeout
        try:
            with deadline(limit, command, lambda _: VmctlTimeout(f"QMP {command} got no reply within {limit}s")):
                return await self._client.execute(command, arguments)
        except ExecuteError as exc:
            raise QMPCommandError(command, arguments, exc.error.error.class_, exc.error.error.desc) from None
        except (ExecInterruptedError, _LibStateError, EOFError, ConnectionError) as exc:
            raise QMPDisconnected(f"QMP connection lost during {command}: {exc or type(exc).__name__}") from exc
        except _LibQMPError as exc:
            raise QMPError(f"QMP {command} failed: {exc}") from exc

    async def send_fd(self, fd: int, name: str) -> None:
        """Hand an open file to QEMU under ``name`` (for ``fd:`` migration URIs)."""
        self._send_fd_scm(fd)
        await self.execute("getfd", {"fdname": name})

    async def add_fd(self, fd: int, fdset_id: int, *, opaque: str | None = None) -> None:
        """Add an open file to QEMU's fd set ``fdset_id`` (a disk then opens ``/dev/fdset/ID``);
        ``opaque`` is shown by ``query-fdsets`` (the file's name)."""
        self._send_fd_scm(fd)
        await self.execute("add-fd", {"fdset-id": fdset_id, **({"opaque": opaque} if opaque else {})})

    def _send_fd_scm(self, fd: int) -> None:
        """qemu.qmp's ``send_fd_scm``, also where the transport's socket is uvloop's stand-in
        (no ``_sock`` to send on): the same message then goes out on a duplicate of it."""
        writer = self._client._writer  # noqa: SLF001 - the one way to reach the socket
        transport_sock = writer.transport.get_extra_info("socket") if writer is not None else None
        if transport_sock is None or hasattr(transport_sock, "_sock"):
            self._client.send_fd_scm(fd)
            return
        with socket.socket(fileno=os.dup(transport_sock.fileno())) as sock:
            sock.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("@i", fd))])

    async def events(self) -> AsyncIterator[QmpEvent]:
        """Every event QEMU sends, in order, for as long as the session lives.

        An event's name is all that is trusted: malformed ``data`` reads as empty and a malformed
        ``timestamp`` as 0, so one bad event cannot stop the stream."""
        async for raw in self._listener:
            data = raw.get("data")  # three lookups: converting the whole Message costs more
            yield QmpEvent(str(raw["event"]), dict(data) if isinstance(data, Mapping) else {},
                           _timestamp(raw.get("timestamp")))  # fmt: skip

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
            except Exception:  # noqa: BLE001,S110 - the cause was reported where it happened
                pass
