"""Waiting, done one way: a one-slot waiter that every path resolves, a broadcast of "something
changed" for loops that re-check a condition, and one timeout helper.

A :class:`Waiter` is what qemu.qmp gives each command: created *before* the request that will
resolve it is sent, resolved at most once (with a value or an error), and removed by its owner in
``finally``, so a cancelled caller never leaves one behind. Errors are given as factories where
several tasks may wait: each task then raises its own exception object (one shared instance
would mix their tracebacks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

import anyio

from vmctl.errors import VmctlError, VmctlTimeout

T = TypeVar("T")
K = TypeVar("K")
Failure = BaseException | Callable[[], BaseException]


def make_error(failure: Failure) -> BaseException:
    """A fresh exception from a factory (or the instance itself when one was given)."""
    return failure if isinstance(failure, BaseException) else failure()


class Waiter(Generic[T]):
    """A one-slot future: resolved or failed once; :meth:`wait` returns the value or raises."""

    __slots__ = ("_done", "_failure", "_value")

    def __init__(self) -> None:
        self._done = anyio.Event()
        self._value: T | None = None
        self._failure: Failure | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def resolve(self, value: T | None = None) -> None:
        if not self._done.is_set():
            self._value = value
            self._done.set()

    def fail(self, failure: Failure) -> None:
        if not self._done.is_set():
            self._failure = failure
            self._done.set()

    async def wait(self) -> T:
        await self._done.wait()
        return self.result()

    def result(self) -> T:
        """The value of a resolved waiter (raises its error if it failed)."""
        if self._failure is not None:
            raise make_error(self._failure)
        return self._value  # type: ignore[return-value]


class Broadcast:
    """Wakes every task waiting for the next change; each re-checks its own condition after.

    The event is made on the first wait and dropped on the notify, so a change nobody waits for
    costs nothing (the agent's channels notify on every frame), and one can be built outside an
    event loop."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def notify(self) -> None:
        event, self._event = self._event, None
        if event is not None:
            event.set()

    async def wait(self) -> None:
        """Return at the next :meth:`notify` after this call."""
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()


class WaiterTable(Generic[K, T]):
    """Waiters by key. Each caller has its own waiter, so one caller giving up (timeout,
    cancellation, error) never removes another caller's waiter for the same key."""

    def __init__(self) -> None:
        self._by_key: dict[K, list[Waiter[T]]] = {}

    def __len__(self) -> int:
        return sum(len(waiters) for waiters in self._by_key.values())

    def add(self, key: K) -> Waiter[T]:
        waiter: Waiter[T] = Waiter()
        self._by_key.setdefault(key, []).append(waiter)
        return waiter

    def remove(self, key: K, waiter: Waiter[T]) -> None:
        waiters = self._by_key.get(key, [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            self._by_key.pop(key, None)

    def resolve(self, key: K, value: T | None = None) -> bool:
        """Resolve every waiter for ``key``; whether there was one."""
        waiters = self._by_key.get(key, [])
        for waiter in waiters:
            waiter.resolve(value)
        return bool(waiters)

    def fail(self, key: K, failure: Failure) -> bool:
        waiters = self._by_key.get(key, [])
        for waiter in waiters:
            waiter.fail(failure)
        return bool(waiters)

    def fail_all(self, failure: Failure) -> None:
        for waiters in self._by_key.values():
            for waiter in waiters:
                waiter.fail(failure)


@contextmanager
def deadline(seconds: float | None, what: str, error: Callable[[str], BaseException] = VmctlTimeout) -> Iterator[None]:
    """``anyio.fail_after`` that raises ``error`` (a :class:`VmctlTimeout` by default) naming what
    timed out; ``None`` means no limit. A vmctl timeout raised inside passes through unchanged."""
    if seconds is None:
        yield
        return
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError as exc:
        if isinstance(exc, VmctlError):
            raise
        raise error(f"{what} did not finish within {seconds:g}s") from None

