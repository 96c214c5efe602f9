"""The guest console as seen by callers: the last lines, and live followers.

A slow follower loses lines rather than stalling the console reader (its buffer is bounded);
every follower ends when the sandbox is torn down.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

TAIL_LINES = 50
FOLLOWER_BUFFER = 1000


async def _iterate(receive: MemoryObjectReceiveStream[str]) -> AsyncIterator[str]:
    async with receive:
        async for item in receive:
            yield item


class ConsoleFanout:
    def __init__(self) -> None:
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._followers: list[MemoryObjectSendStream[str]] = []
        self._closed = False

    def push(self, line: str) -> None:
        self.tail.append(line)
        for stream in list(self._followers):
            try:
                stream.send_nowait(line)
            except anyio.WouldBlock:
                pass  # a slow reader loses lines rather than stalling the console
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._followers.remove(stream)

    def follow(self) -> AsyncIterator[str]:
        send, receive = anyio.create_memory_object_stream[str](FOLLOWER_BUFFER)
        if self._closed:
            send.close()
        else:
            self._followers.append(send)
        return _iterate(receive)

    def close(self) -> None:
        self._closed = True
        for stream in self._followers:
            stream.close()
        self._followers.clear()
