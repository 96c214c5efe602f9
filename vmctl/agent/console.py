"""The guest console as seen by callers: the last lines, and live followers.

A slow follower loses lines rather than stalling the console reader, and what it holds unread is
bounded in lines and in bytes: console lines come from the guest (each up to 64 KiB), and a
follower nobody reads must not hold the 64 MiB that a thousand long lines would be. Every
follower ends when the sandbox is torn down.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator

from vmctl.core.waiting import Broadcast

TAIL_LINES = 50
FOLLOWER_BUFFER = 1000
#: what one follower may hold unread; a line that would go over it is dropped
FOLLOWER_BYTES = 1024 * 1024


class _Follower:
    """One reader's unread lines (new lines are dropped while it is full, as before)."""

    def __init__(self, closed: bool) -> None:
        self.lines: deque[str] = deque()
        self.size = 0
        self.dropped = 0
        self.closed = closed
        self.changed = Broadcast()

    def push(self, line: str) -> None:
        if len(self.lines) >= FOLLOWER_BUFFER or self.size + len(line) > FOLLOWER_BYTES:
            self.dropped += 1  # a slow reader loses lines rather than stalling the console
            return
        self.lines.append(line)
        self.size += len(line)
        self.changed.notify()

    def close(self) -> None:
        self.closed = True
        self.changed.notify()


async def _iterate(follower: _Follower, fanout: ConsoleFanout) -> AsyncIterator[str]:
    try:
        while True:
            while follower.lines:
                line = follower.lines.popleft()
                follower.size -= len(line)
                yield line
            if follower.closed:
                return
            await follower.changed.wait()
    finally:
        fanout.forget(follower)


class ConsoleFanout:
    def __init__(self) -> None:
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._followers: list[_Follower] = []
        self._closed = False

    def push(self, line: str) -> None:
        self.tail.append(line)
        for follower in self._followers:
            follower.push(line)

    def follow(self) -> AsyncIterator[str]:
        follower = _Follower(closed=self._closed)
        if not self._closed:
            self._followers.append(follower)
        return _iterate(follower, self)

    def forget(self, follower: _Follower) -> None:
        """A reader that stopped (or finished) holds nothing any more."""
        follower.lines.clear()
        follower.size = 0
        if follower in self._followers:
            self._followers.remove(follower)

    def close(self) -> None:
        self._closed = True
        for follower in self._followers:
            follower.close()
        self._followers.clear()
