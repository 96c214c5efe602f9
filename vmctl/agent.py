"""Host side of the guest agent protocol (over a virtio-serial port, see guest/files/vmctl-agent).

One line per request or reply, space-separated fields, binary fields base64 ("-" for empty).
Each request gets an id and a one-slot waiter; the reader task resolves waiters by id. When the
connection drops, every waiter is woken with an error; a cancelled caller removes its own
waiter, so no entry is ever left behind.
"""

from __future__ import annotations

import base64
import itertools
import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from vmctl.errors import GuestCommandFailed, GuestDisconnected, GuestError, InvalidArgument, VmctlTimeout
from vmctl.waiting import Failure, Waiter, deadline, make_error

__all__ = ["AgentClient", "ExecResult", "GuestBlockDevice", "GuestCommandFailed", "GuestMemory", "InvalidArgument"]

MAX_LINE = 64 * 1024 * 1024
MAX_STDIN = 16 * 1024 * 1024
ARGV_WORDS = "argv-words"  # the agent feature: EXEC takes argv as plain shell words
TIMEOUT_GRACE = 5.0


@dataclass(frozen=True)
class ExecResult:
    """What a command run in the guest produced."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    duration: float = 0.0

    @property
    def returncode(self) -> int:
        """Alias of ``exit_code``, as in :mod:`subprocess`."""
        return self.exit_code

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def text(self) -> str:
        """stdout decoded as UTF-8 (invalid bytes replaced)."""
        return self.stdout.decode(errors="replace")

    def check(self) -> ExecResult:
        """Return self if the command succeeded, else raise :class:`GuestCommandFailed`."""
        if not self.ok:
            raise GuestCommandFailed(self)
        return self


@dataclass(frozen=True)
class GuestBlockDevice:
    name: str
    size_bytes: int
    serial: str = ""

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"


@dataclass(frozen=True)
class GuestMemory:
    total_kib: int
    free_kib: int
    available_kib: int

    @property
    def total_mib(self) -> int:
        return self.total_kib // 1024


def parse_block_devices(text: str) -> list[GuestBlockDevice]:
    out = []
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        sectors, _, serial = rest.partition(" ")
        if name and sectors.isascii() and sectors.isdigit():
            out.append(GuestBlockDevice(name, int(sectors) * 512, serial.strip()))
    return out


MAX_CPUS = 1 << 16


def parse_cpu_list(text: str) -> list[int]:
    """``0-2,4`` -> ``[0, 1, 2, 4]`` (the kernel's cpulist format); :class:`GuestError` if the
    guest sent something else (or more CPUs than any kernel has)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise GuestError(f"guest sent a malformed CPU list: {text[:100]!r}") from None
        if not 0 <= low <= high < MAX_CPUS or len(cpus) + high - low >= MAX_CPUS:
            raise GuestError(f"guest sent an impossible CPU list: {text[:100]!r}")
        cpus.extend(range(low, high + 1))
    return cpus


def parse_memory(text: str) -> GuestMemory:
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isascii() and fields[0].isdigit():
            values[key.strip()] = int(fields[0])
    try:
        return GuestMemory(values["MemTotal"], values["MemFree"], values["MemAvailable"])
    except KeyError as exc:
        raise GuestError(f"guest meminfo lacks {exc}") from None


def shell_words(args: Sequence[bytes]) -> bytes:
    """argv as single-quoted POSIX shell words, which the agent splits with ``eval "set -- ..."``."""
    return b" ".join(b"'" + a.replace(b"'", b"'\\''") + b"'" for a in args)


def split_shell_words(words: bytes) -> list[bytes]:
    """The inverse of :func:`shell_words` (used by the fake agent)."""
    import shlex

    text = words.decode("utf-8", "surrogateescape")
    return [w.encode("utf-8", "surrogateescape") for w in shlex.split(text)]


def argv_field(args: Sequence[bytes], *, plain: bool) -> str:
    """The EXEC request's argv: shell words as they are when the agent takes them and they are
    printable ASCII (the guest then needs no fork to decode them, a few ms under TCG), else base64."""
    words = shell_words(args)
    if plain and all(0x20 <= byte < 0x7F for byte in words):
        return words.decode()
    return b64(words)


def parse_argv_field(field: str) -> list[bytes]:
    """The inverse of :func:`argv_field` (used by the fake agent)."""
    return split_shell_words(field.encode() if field.startswith("'") else unb64(field))


def b64(data: bytes) -> str:
    """A binary protocol field ("-" for empty)."""
    return base64.b64encode(data).decode() if data else "-"


def unb64(field: str) -> bytes:
    """The inverse of :func:`b64`."""
    return base64.b64decode(field, validate=True) if field and field != "-" else b""


class AgentClient:
    """Talks to the vmctl agent in one guest."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.boot_id: str | None = None
        self._stream: SocketStream | None = None
        self._ready = anyio.Event()
        # Ids differ per connection: a reply to a request of a previous controller (attached to
        # the same detached guest) can never complete one of ours.
        self._prefix = secrets.token_hex(3)
        self._ids = itertools.count(1)
        self._waiters: dict[str, Waiter[list[str]]] = {}
        self._send_lock = anyio.Lock()
        self._closed_reason: Failure | None = None
        #: the agent takes argv as plain shell words (it said "argv-words" in READY or PONG);
        #: older agents (in a restored snapshot or an attached guest) get base64
        self.plain_argv = False

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def pending(self) -> int:
        """Requests waiting for a reply (0 whenever nobody is waiting: checked by the leak tests)."""
        return len(self._waiters)

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, then read replies until the connection ends; fail every waiter at the end."""
        try:
            self._stream = await anyio.connect_unix(self.path)
        except OSError as exc:
            raise GuestDisconnected(f"cannot connect to the agent socket {self.path}: {exc}") from exc
        task_status.started()
        reason: Failure = lambda: GuestDisconnected("guest agent connection closed")  # noqa: E731
        try:
            reader = BufferedByteReceiveStream(self._stream)
            while True:
                try:
                    line = await reader.receive_until(b"\n", MAX_LINE)
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError,
                        anyio.ClosedResourceError, OSError):  # fmt: skip
                    break
                except anyio.DelimiterNotFound:
                    reason = lambda: GuestDisconnected("guest agent sent a line longer than 64 MiB")  # noqa: E731
                    break
                self._dispatch(line.decode(errors="replace"))
        finally:
            self.fail_all(reason)
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()

    def _dispatch(self, line: str) -> None:
        fields = line.split(" ")
        kind = fields[0]
        if kind == "READY" and len(fields) >= 2:
            if self._ready.is_set():  # the agent restarted: what it was running is gone
                for stale in self._waiters.values():
                    stale.fail(lambda: GuestError("the guest agent restarted while this request ran"))
            self.boot_id = fields[1]
            self.plain_argv = ARGV_WORDS in fields[2:]
            self._ready.set()
            return
        if len(fields) < 2:
            return
        waiter = self._waiters.get(fields[1])
        if waiter is None:
            return
        if kind in ("R", "PONG", "OK"):
            if kind == "PONG":
                self.plain_argv = ARGV_WORDS in fields[2:]
            waiter.resolve(fields)
        else:
            waiter.fail(GuestError(f"guest agent refused the request: {line[:200]}"))

    def fail_all(self, failure: Failure) -> None:
        """Wake every waiter with ``failure`` (the connection or the sandbox is gone); a factory
        gives each waiting task its own exception."""
        self._closed_reason = self._closed_reason or failure
        for waiter in self._waiters.values():
            waiter.fail(failure)

    def mark_ready(self, boot_id: str = "restored") -> None:
        """Ready without a READY line (a guest restored from a template already sent it)."""
        self.boot_id = self.boot_id or boot_id
        self._ready.set()

    async def wait_ready(self) -> str:
        """Wait for the agent's READY line; returns the guest boot id."""
        await self._ready.wait()
        assert self.boot_id is not None
        return self.boot_id

    async def _request(self, op: str, *fields: str) -> list[str]:
        if self._closed_reason is not None:
            raise make_error(self._closed_reason)
        if self._stream is None:
            raise GuestDisconnected("guest agent not connected")
        request_id = f"{self._prefix}{next(self._ids)}"
        waiter: Waiter[list[str]] = Waiter()
        self._waiters[request_id] = waiter
        try:
            line = " ".join((op, request_id, *fields)) + "\n"
            async with self._send_lock:
                try:
                    await self._stream.send(line.encode())
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                    raise GuestDisconnected(f"cannot send to the guest agent: {exc}") from exc
            return await waiter.wait()
        finally:
            del self._waiters[request_id]

    async def ping(self) -> None:
        await self._request("PING")

    async def exec(self, argv: Sequence[str | bytes], *, stdin: bytes = b"",
                   timeout: float | None = None) -> ExecResult:  # fmt: skip
        """Run ``argv`` in the guest; ``timeout`` kills it there (result has ``timed_out``)."""
        if isinstance(argv, str | bytes):
            raise InvalidArgument(f"argv: give a list of arguments, e.g. {['sh', '-c', argv]!r}, not one string")
        args = [a.encode() if isinstance(a, str) else bytes(a) for a in argv]
        if not args:
            raise InvalidArgument("argv: give at least the program to run, e.g. ['uname', '-a']")
        if any(b"\0" in a for a in args):
            raise InvalidArgument("argv: arguments may not contain NUL bytes")
        if len(stdin) > MAX_STDIN:
            raise InvalidArgument(f"stdin: at most {MAX_STDIN} bytes; copy larger data with a disk")
        if timeout is not None and not 0 < timeout < math.inf:
            raise InvalidArgument("timeout: must be a positive, finite number of seconds (or None for no limit)")
        guest_timeout = 0 if timeout is None else max(1, math.ceil(timeout))
        started = time.monotonic()
        fields = (str(guest_timeout), b64(stdin), argv_field(args, plain=self.plain_argv))
        # the guest kills the command at ``timeout``; the host gives its answer a grace period
        host_limit = None if timeout is None else guest_timeout + TIMEOUT_GRACE
        with deadline(host_limit, "exec", lambda _: VmctlTimeout(
                f"guest agent did not answer exec {args[0]!r} within {timeout}s")):  # fmt: skip
            reply = await self._request("EXEC", *fields)
        return self._result(reply, time.monotonic() - started)

    async def query(self, name: str) -> str:
        """One of the agent's fixed queries (``block``, ``cpus``, ``memory``): its text output."""
        result = self._result(await self._request("QUERY", name), 0.0)
        if result.exit_code != 0:
            raise GuestError(f"guest query {name!r} failed: {result.stderr.decode(errors='replace')}")
        return result.text

    async def block_devices(self, timeout: float | None = None) -> list[GuestBlockDevice]:
        with deadline(timeout, "the guest's block device query"):
            return parse_block_devices(await self.query("block"))

    async def online_cpus(self, timeout: float | None = None) -> list[int]:
        with deadline(timeout, "the guest's CPU query"):
            return parse_cpu_list(await self.query("cpus"))

    async def memory(self, timeout: float | None = None) -> GuestMemory:
        with deadline(timeout, "the guest's memory query"):
            return parse_memory(await self.query("memory"))

    async def check_exec(self, argv: Sequence[str | bytes]) -> ExecResult:
        """``exec`` that raises :class:`GuestCommandFailed` unless the command exits 0 (vmctl's own
        guest-side steps)."""
        return (await self.exec(argv)).check()

    async def wait_block_device(self, bus: str, key: str, timeout: float) -> str | None:
        """Wait in the guest for a disk (virtio: by serial; scsi: by target); its /dev path or None."""
        tenths = max(1, int(timeout * 10))
        reply = await self._request("WAITDEV", bus, key, str(tenths))
        result = self._result(reply, 0.0)
        return f"/dev/{result.text}" if result.exit_code == 0 and result.text else None

    async def wait_device_gone(self, bus: str, key: str, timeout: float) -> bool:
        """Wait in the guest until a disk or NIC is gone; False if it is still there."""
        reply = await self._request("WAITGONE", bus, key, str(max(1, int(timeout * 10))))
        return self._result(reply, 0.0).exit_code == 0

    async def poweroff(self) -> None:
        """Ask the guest to power off; the reply may be lost as the guest goes down."""
        if self._stream is None or self._closed_reason is not None:
            raise GuestDisconnected("guest agent not connected")
        async with self._send_lock:
            try:
                await self._stream.send(f"POWEROFF {next(self._ids)}\n".encode())
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise GuestDisconnected(f"cannot send to the guest agent: {exc}") from exc

    @staticmethod
    def _result(reply: list[str], duration: float) -> ExecResult:
        try:
            _, _, code, timed_out, out, err = reply
            return ExecResult(int(code), unb64(out), unb64(err), timed_out == "1", duration)
        except (ValueError, TypeError) as exc:
            raise GuestError(f"guest agent sent a malformed reply: {' '.join(reply)[:200]!r}") from exc
