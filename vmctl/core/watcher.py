"""Waiting for states and following transitions: the async side of :mod:`vmctl.core.state`.

The state machine itself is pure; this watcher listens to it and wakes tasks. A follower of
:meth:`StateWatcher.transitions` has a bounded buffer, like the machine's history: a subscriber
that never reads cannot grow memory without limit; when its buffer overflows the oldest
transitions go and :attr:`TransitionStream.dropped` counts them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable

import anyio

from vmctl.core.state import TERMINAL_STATES, SandboxState, StateMachine, Transition, reachable_from
from vmctl.core.waiting import Broadcast
from vmctl.errors import IllegalTransition, SandboxFailed

STREAM_BUFFER = 1000


class TransitionStream(AsyncIterator[Transition]):
    """Transitions from the moment it was made; ends after a terminal state."""

    def __init__(self, watcher: StateWatcher, buffer: int) -> None:
        self._watcher = watcher
        self._items: deque[Transition] = deque(maxlen=buffer)
        self._arrived = anyio.Event()
        self._ended = False
        #: transitions lost because the reader fell more than ``buffer`` behind
        self.dropped = 0

    def _push(self, step: Transition) -> None:
        if len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append(step)
        self._arrived.set()

    def _end(self) -> None:
        self._ended = True
        self._arrived.set()

    def __aiter__(self) -> TransitionStream:
        return self

    async def __anext__(self) -> Transition:
        while not self._items:
            if self._ended:
                raise StopAsyncIteration
            self._arrived = anyio.Event()
            await self._arrived.wait()
        step = self._items.popleft()
        if step.new in TERMINAL_STATES:
            self.aclose_now()
        return step

    def aclose_now(self) -> None:
        self._watcher.unsubscribe(self)
        self._ended = True

    async def aclose(self) -> None:
        self.aclose_now()


class StateWatcher:
    """Wakes tasks waiting for a state and feeds transition streams."""

    def __init__(self, machine: StateMachine, *, failure_detail: Callable[[], str] = lambda: "") -> None:
        self._machine = machine
        self._changed = Broadcast()
        self._streams: list[TransitionStream] = []
        self._failure_detail = failure_detail
        machine.listen(self._on_transition)

    def _on_transition(self, step: Transition) -> None:
        for stream in list(self._streams):
            stream._push(step)  # noqa: SLF001 - the stream's feeding side, in this module
        self._changed.notify()

    def unsubscribe(self, stream: TransitionStream) -> None:
        if stream in self._streams:
            self._streams.remove(stream)

    async def wait_for(self, *targets: SandboxState) -> SandboxState:
        """Wait until the state is one of ``targets``.

        Raises :class:`SandboxFailed` as soon as none of ``targets`` can be reached any more
        because the sandbox failed (:class:`IllegalTransition` if it stopped), so no waiter
        hangs on a sandbox that died.
        """
        wanted = frozenset(targets)
        while True:
            state = self._machine.state
            if state in wanted:
                return state
            if not (reachable_from(state) & wanted):
                if state is SandboxState.FAILED:
                    raise SandboxFailed(self._machine.failure or "sandbox failed", stderr_tail=self._failure_detail())
                raise IllegalTransition(state, f"waiting for {'/'.join(map(str, targets))}")
            await self._changed.wait()

    def transitions(self, *, buffer: int = STREAM_BUFFER) -> TransitionStream:
        """Every transition from the moment of this call (not of the first ``__anext__``)."""
        stream = TransitionStream(self, buffer)
        if self._machine.state in TERMINAL_STATES:
            stream._end()  # noqa: SLF001
        else:
            self._streams.append(stream)
        return stream
