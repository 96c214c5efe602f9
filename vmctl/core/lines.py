"""Reading lines from streams whose other end we do not trust (guest console, QEMU stderr)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from anyio.abc import ByteReceiveStream

MAX_LINE = 64 * 1024


async def read_lines(stream: ByteReceiveStream, max_line: int = MAX_LINE) -> AsyncIterator[bytes]:
    """Lines without their newline; a line longer than ``max_line`` comes out in pieces.

    Ends quietly when the stream ends or breaks. Never holds more than ``max_line`` bytes, so a
    peer that sends no newline cannot make the reader spin or grow without bound.
    """
    buffer = b""
    while True:
        try:
            chunk = await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            break
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            for start in range(0, max(len(line), 1), max_line):
                yield line[start : start + max_line]
        while len(buffer) >= max_line:
            yield buffer[:max_line]
            buffer = buffer[max_line:]
    if buffer:
        yield buffer


def tail_lines(path: Path, count: int) -> list[str]:
    """The last ``count`` lines of a log file ([] if it cannot be read)."""
    try:
        return path.read_text(errors="replace").splitlines()[-count:]
    except OSError:
        return []
