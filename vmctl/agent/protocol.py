"""The guest agent's wire format (shared by the host client, the fake agent and the C agent).

Every message is one frame: a 16-byte header, then ``length`` payload bytes::

    u32 length | u8 type | u8 stream | u16 reserved (0) | u64 id      (little endian)

``id`` names a request and everything that belongs to it (a process, a file transfer). The host
makes its ids from a random per-connection prefix (high 32 bits) and a counter, so a late frame
meant for an earlier controller never reaches a later one's request. ``stream`` is 0 (stdin, or
the data of a file being written), 1 (stdout, or the data of a file being read) or 2 (stderr).

Flow control is by credits, per stream, in both directions: a sender may only send as many
DATA bytes as the receiver granted. A process starts with ``window`` bytes of credit for its
stdout and stderr (given in the SPAWN request) and ``STDIN_WINDOW`` for its stdin (implicit);
more is granted with CREDIT frames as the receiver consumes data. So neither side ever buffers
more than a window per stream, and a slow reader makes the writer wait, never the whole port.
DATA beyond the credit granted is a :class:`FlowViolation`: the receiver ends the connection,
as for a frame over the size limit, rather than keep or silently drop what it was not offered.

This module is pure: packing and unpacking, no I/O. The C agent (guest/files/vmctl-agent.c)
implements the same table; a frame longer than ``MAX_PAYLOAD`` is a protocol error on both sides.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

HEADER = struct.Struct("<IBBHQ")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 1 << 20
#: The longest boot id a READY frame may carry (the C agent sends the kernel's, 36 characters).
MAX_BOOT_ID = 256
#: The longest guest message kept from an ERROR frame (the rest is cut off).
MAX_MESSAGE = 4096
#: The largest DATA frame either side sends.
CHUNK = 64 * 1024
#: Credit the guest grants for a new process's stdin (or a file being written) before it says so.
STDIN_WINDOW = 256 * 1024
PROTOCOL_VERSION = 1


class FrameType(enum.IntEnum):
    """Frame types. Host to guest below 0x40, guest to host from 0x40."""

    PING = 0x01
    SPAWN = 0x02  # payload: spawn_payload(); replies STARTED or ERROR, later EXIT
    DATA = 0x03  # both directions: bytes of ``stream``
    EOF = 0x04  # both directions: ``stream`` ends
    CREDIT = 0x05  # both directions: u32 more bytes may be sent on ``stream``
    SIGNAL = 0x06  # i32 signal number, to the process
    CLOSE = 0x07  # the host is done with ``id``: kill the process group / drop the temp file
    QUERY = 0x08  # name: block, cpus, memory -> RESULT text
    WAITDEV = 0x09  # u32 tenths + bus NUL key -> RESULT u8 found + name
    WAITGONE = 0x0A  # u32 tenths + bus NUL key -> RESULT u8 gone
    POWEROFF = 0x0B
    FREAD = 0x0C  # u32 window + path -> RESULT (u32 mode, u64 size), DATA/EOF on stream 1
    FWRITE = 0x0D  # u32 mode + path -> CREDIT on stream 0; DATA/EOF on stream 0 -> RESULT
    STAT = 0x0E  # path -> RESULT u8 kind, u32 mode, u64 size
    LIST = 0x0F  # path -> RESULT entries: u8 kind, u32 mode, name NUL
    MKDIR = 0x10  # u32 mode + path -> RESULT; a directory that exists is kept as it is (its mode too)
    KILL = 0x11  # kill the process's whole tree (its cgroup), drop its output -> EXIT once it is gone
    SOURCE = 0x20  # benchmarks: u64 n -> n zero bytes on stream 1 (ignoring credit), EOF
    SINK = 0x21  # benchmarks: -> CREDIT; DATA on stream 0 is dropped; EOF -> RESULT
    READY = 0x40  # u32 version + boot id (id 0), once per agent start
    PONG = 0x41
    STARTED = 0x42  # i32 pid
    EXIT = 0x43  # i32 exit code (128+N when killed by signal N), u8 timed out
    RESULT = 0x44
    ERROR = 0x45  # i32 errno + message


KIND_FILE, KIND_DIR, KIND_OTHER = 0, 1, 2
STDIN, STDOUT, STDERR = 0, 1, 2


class ProtocolError(ValueError):
    """A frame that breaks the format."""


class FlowViolation(ProtocolError):
    """DATA beyond the credit the receiver granted: the connection cannot be trusted any more."""


@dataclass(frozen=True)
class Frame:
    type: int
    id: int
    payload: bytes = b""
    stream: int = 0


def pack(kind: int, request_id: int, payload: bytes = b"", stream: int = 0) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), kind, stream, 0, request_id) + payload


def unpack_header(header: bytes) -> tuple[int, int, int, int]:
    """``(length, type, stream, id)``; :class:`ProtocolError` for a length over the limit."""
    length, kind, stream, _, request_id = HEADER.unpack(header)
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"a frame of {length} bytes (the limit is {MAX_PAYLOAD})")
    return length, kind, stream, request_id


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def i32(value: int) -> bytes:
    return struct.pack("<i", value)


def spawn_payload(argv: Sequence[bytes], env: Mapping[bytes, bytes], cwd: bytes, timeout_ms: int,
                  window: int) -> bytes:  # fmt: skip
    """timeout (0: none), stdout/stderr window, argc, envc; then NUL-terminated argv, env, cwd."""
    head = struct.pack("<IIII", timeout_ms, window, len(argv), len(env))
    strings = [*argv, *(k + b"=" + v for k, v in env.items()), cwd]
    return head + b"".join(s + b"\0" for s in strings)


def parse_spawn(payload: bytes) -> tuple[list[bytes], dict[bytes, bytes], bytes, int, int]:
    """The inverse of :func:`spawn_payload` (for the fake agent)."""
    timeout_ms, window, argc, envc = struct.unpack_from("<IIII", payload)
    strings = payload[16:].split(b"\0")
    argv = strings[:argc]
    env = dict(s.partition(b"=")[::2] for s in strings[argc:argc + envc])
    return argv, env, strings[argc + envc], timeout_ms, window


def parse_error(payload: bytes) -> tuple[int, str]:
    if len(payload) < 4:
        raise ProtocolError("an ERROR frame without its errno")
    (errno,) = struct.unpack_from("<i", payload)
    return errno, payload[4:4 + MAX_MESSAGE].decode(errors="replace")


def parse_exit(payload: bytes) -> tuple[int, bool]:
    if len(payload) != 5:
        raise ProtocolError(f"an EXIT frame of {len(payload)} bytes (expected 5)")
    code, timed_out = struct.unpack("<iB", payload)
    return code, bool(timed_out)


def parse_u32(payload: bytes, what: str) -> int:
    if len(payload) != 4:
        raise ProtocolError(f"a {what} frame of {len(payload)} bytes (expected 4)")
    return int(struct.unpack("<I", payload)[0])


def parse_stat(payload: bytes) -> tuple[int, int, int]:
    """``(kind, mode, size)``."""
    if len(payload) != 13:
        raise ProtocolError(f"a STAT result of {len(payload)} bytes (expected 13)")
    kind, mode, size = struct.unpack("<BIQ", payload)
    return kind, mode, size


def parse_list(payload: bytes) -> list[tuple[int, int, bytes]]:
    """``[(kind, mode, name), ...]`` from a LIST result."""
    out = []
    pos = 0
    while pos < len(payload):
        if pos + 5 > len(payload):
            raise ProtocolError("a truncated LIST entry")
        kind, mode = struct.unpack_from("<BI", payload, pos)
        end = payload.find(b"\0", pos + 5)
        if end < 0:
            raise ProtocolError("a LIST entry without its NUL")
        name = payload[pos + 5:end]
        if not name or b"/" in name or name in (b".", b".."):
            raise ProtocolError(f"a LIST entry with the name {name[:100]!r}")
        out.append((kind, mode, name))
        pos = end + 1
    return out
