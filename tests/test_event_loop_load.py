"""What a controller with many sessions in one event loop relies on (bench/control_plane.py).

No timings here: each test checks the mechanism that keeps the loop's work and the garbage
collector's walks small (replies routed to the right waiter, nothing kept per message or per
session name, equal transitions shared, objects taken out of collections on request).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import SocketStream

from tests.conftest import assert_no_stray_tasks, short_dir
from vmctl import Sandbox, VmctlTimeout, limit_commands_in_flight, settle_gc
from vmctl.core.qmp import DEFAULT_COMMANDS_IN_FLIGHT, QmpSession, _give_up, _Slots, _slots
from vmctl.core.state import StateMachine, Transition, Trigger
from vmctl.errors import QMPCommandError, QMPDisconnected
from vmctl.testing import FakeQemu, fake_config

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}}


class Peer:
    """A QMP peer that holds replies back until told, then sends them in reverse order, each after
    an event; ``fail`` names commands answered with an error; ``hang_up`` closes instead."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.fail = fail or set()
        self.commands: list[dict[str, Any]] = []
        self.release = anyio.Event()
        self.stream: SocketStream | None = None

    async def send(self, message: dict[str, Any]) -> None:
        assert self.stream is not None
        await self.stream.send(json.dumps(message).encode() + b"\n")

    async def serve(self, stream: SocketStream, expected: int, hang_up: bool) -> None:
        self.stream = stream
        decoder, buffer = json.JSONDecoder(), ""
        await self.send(GREETING)
        while len(self.commands) < expected + 1:  # qmp_capabilities first
            buffer += (await stream.receive()).decode()
            while buffer.strip():
                try:
                    command, end = decoder.raw_decode(buffer.lstrip())
                except ValueError:
                    break
                buffer = buffer.lstrip()[end:]
                self.commands.append(command)
                if command["execute"] == "qmp_capabilities":  # sent without an id
                    await self.send({"return": {}})
        await self.release.wait()
        if hang_up:
            await stream.aclose()
            return
        for command in reversed(self.commands[1:]):
            name = command["execute"]
            await self.send({"event": "RTC_CHANGE", "data": {"for": name}, "timestamp": {"seconds": 1, "microseconds": 0}})
            if name in self.fail:
                await self.send({"error": {"class": "GenericError", "desc": f"no {name}"}, "id": command["id"]})
            else:
                await self.send({"return": {"name": name}, "id": command["id"]})
        await anyio.sleep_forever()


@asynccontextmanager
async def peer_at(peer: Peer, expected: int, *, hang_up: bool = False) -> AsyncIterator[Path]:
    with short_dir() as directory:
        path = directory / "qmp.sock"
        listener = await anyio.create_unix_listener(path)

        async def serve() -> None:
            async with listener, await listener.accept() as stream:
                try:
                    await peer.serve(stream, expected, hang_up)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
                    pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            try:
                yield path
            finally:
                tg.cancel_scope.cancel()


async def test_concurrent_commands_each_get_their_own_reply_and_events_stay_in_order() -> None:
    """Twenty commands in flight on one session, answered in reverse order with an event before
    each reply: every caller gets the reply with its id (or its error), the events come in the
    order sent, and no reply slot is left behind."""
    names = [f"cmd-{i}" for i in range(20)]
    peer = Peer(fail={"cmd-7", "cmd-13"})
    session = QmpSession("order")
    results: dict[str, object] = {}

    async def call(name: str) -> None:
        try:
            results[name] = await session.execute(name)
        except QMPCommandError as exc:
            results[name] = exc

    async with peer_at(peer, len(names)) as path:
        await session.connect(path)
        events = session.events()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for name in names:
                    tg.start_soon(call, name)
                await anyio.wait_all_tasks_blocked()
                peer.release.set()
            received = [(await events.__anext__()).data["for"] for _ in names]
        pending = dict(session._client._pending)  # noqa: SLF001
        await session.close()
    await assert_no_stray_tasks()
    assert received == list(reversed(names))
    for name in names:
        if name in peer.fail:
            assert isinstance(results[name], QMPCommandError) and f"no {name}" in str(results[name])
        else:
            assert results[name] == {"name": name}
    assert pending == {}, "reply slots left behind"


async def test_commands_pending_when_the_peer_hangs_up_are_disconnected_errors() -> None:
    peer = Peer()
    session = QmpSession("hangup")
    errors: list[BaseException] = []

    async def call(name: str) -> None:
        try:
            await session.execute(name)
        except QMPDisconnected as exc:
            errors.append(exc)

    async with peer_at(peer, 3, hang_up=True) as path:
        await session.connect(path)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for name in ("a", "b", "c"):
                    tg.start_soon(call, name)
                await anyio.wait_all_tasks_blocked()
                peer.release.set()
        await session.close()
    await assert_no_stray_tasks()
    assert len(errors) == 3 and all("connection lost" in str(e) for e in errors)


def test_sessions_leave_no_logger_behind() -> None:
    """qemu.qmp made a child logger per connection name, which the logging module keeps for the
    life of the process: one per sandbox ever run."""
    before = set(logging.Logger.manager.loggerDict)
    sessions = [QmpSession(f"logger-test-{i}") for i in range(50)]
    assert set(logging.Logger.manager.loggerDict) == before
    assert len(sessions) == 50


def test_equal_transitions_are_shared() -> None:
    """A thousand machines pausing and resuming hold a handful of Transition objects, not one per step."""
    machines = [StateMachine() for _ in range(1000)]
    for m in machines:
        m.fire(Trigger.START)
        m.fire(Trigger.GUEST_READY)
        for _ in range(20):
            m.fire(Trigger.QMP_STOP, "stop")
            m.fire(Trigger.QMP_RESUME, "resume")
    steps = [step for m in machines for step in m.history]
    assert len(steps) == 1000 * 42
    assert len({id(step) for step in steps}) <= 4
    assert steps[-1] == Transition(steps[-1].old, steps[-1].new, Trigger.QMP_RESUME, "resume")


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def unfreeze() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_settle_gc_takes_live_objects_out_of_collections(unfreeze: None) -> None:
    """settle_gc() collects what is garbage, then the survivors are no longer walked by
    collections (gc.get_objects() lists exactly what collections walk); later objects are."""
    garbage = _Cycle()
    dead = weakref.ref(garbage)
    del garbage
    kept = StateMachine()
    frozen = settle_gc()
    assert dead() is None, "garbage was collected first, not frozen"
    assert frozen > 0 and gc.get_freeze_count() >= frozen
    walked = gc.get_objects()
    assert not any(o is kept for o in walked)
    later = StateMachine()
    assert any(o is later for o in gc.get_objects())
    gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())


@pytest.fixture
def five_in_flight() -> Iterator[None]:
    limit_commands_in_flight(5)
    yield
    limit_commands_in_flight(DEFAULT_COMMANDS_IN_FLIGHT)


@pytest.mark.usefixtures("five_in_flight")
async def test_commands_wait_for_a_slot_and_leave_the_line_when_they_give_up() -> None:
    """Five in flight at a time: a peer holding its replies sees exactly five commands; callers in
    line that time out or are cancelled leave it at once, the rest all get their replies once the
    peer answers, and every slot is free again afterwards."""
    received: list[dict[str, Any]] = []
    release, five_arrived = anyio.Event(), anyio.Event()

    async def serve(stream: SocketStream) -> None:
        await stream.send(json.dumps(GREETING).encode() + b"\n")
        decoder, buffer = json.JSONDecoder(), ""
        async with anyio.create_task_group() as tg:
            while True:
                buffer += (await stream.receive()).decode()
                while buffer.strip():
                    try:
                        command, end = decoder.raw_decode(buffer.lstrip())
                    except ValueError:
                        break  # the rest of this message is still on its way
                    buffer = buffer.lstrip()[end:]
                    if command["execute"] == "qmp_capabilities":
                        await stream.send(b'{"return": {}}\n')
                        continue
                    received.append(command)
                    five_arrived.set() if len(received) == 5 else None
                    tg.start_soon(answer, stream, command)

    async def answer(stream: SocketStream, command: dict[str, Any]) -> None:
        await release.wait()
        await stream.send(json.dumps({"return": command["execute"], "id": command["id"]}).encode() + b"\n")

    session = QmpSession("slots")
    replies: list[object] = []
    gave_up: list[str] = []

    async def call(name: str, timeout: float | None = None) -> None:
        try:
            replies.append(await session.execute(name, timeout=timeout))
        except VmctlTimeout as exc:
            gave_up.append(str(exc))

    with short_dir() as directory:
        listener = await anyio.create_unix_listener(directory / "qmp.sock")
        async with anyio.create_task_group() as outer:

            async def accept() -> None:
                async with listener, await listener.accept() as stream:
                    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                        await serve(stream)

            outer.start_soon(accept)
            await session.connect(directory / "qmp.sock")
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    for i in range(12):
                        tg.start_soon(call, f"cmd-{i}")
                    await five_arrived.wait()
                    tg.start_soon(call, "impatient", 0.2)
                    async with anyio.create_task_group() as doomed:
                        for i in range(3):
                            doomed.start_soon(call, f"doomed-{i}")
                        await anyio.wait_all_tasks_blocked()
                        doomed.cancel_scope.cancel()
                    while not gave_up:
                        await anyio.wait_all_tasks_blocked()
                        await anyio.lowlevel.checkpoint()
                    slots = _slots()
                    assert slots is not None
                    assert len(received) == 5, "no more than five sent while five are unanswered"
                    assert len(slots.waiting) == 7, "the impatient and the cancelled callers left the line"
                    release.set()
            await session.close()
            outer.cancel_scope.cancel()
    await assert_no_stray_tasks()
    assert sorted(replies) == sorted(f"cmd-{i}" for i in range(12))  # type: ignore[type-var]
    assert len(gave_up) == 1 and "waited 0.2s for a command slot" in gave_up[0]
    assert slots.free == 5 and not slots.waiting


@pytest.mark.parametrize("how", ["gives up", "is cancelled"])
async def test_a_waiter_passed_over_by_a_release_leaves_quietly(how: str) -> None:
    """A release skips waiters that are done; one that gave up or was cancelled in the same pass
    of the loop, before its task resumed, is then no longer in the line when it leaves it."""
    slots = _Slots(1)
    assert await slots.acquire(None)
    task = asyncio.ensure_future(slots.acquire(None))
    await asyncio.sleep(0)  # the task now waits in line
    (waiter,) = slots.waiting
    if how == "gives up":
        _give_up(waiter)  # what its timer does
    else:
        task.cancel()
    slots.release()  # in the same pass, before the task resumes
    if how == "gives up":
        assert await task is False
    else:
        with pytest.raises(asyncio.CancelledError):
            await task
    assert slots.free == 1 and not slots.waiting


async def test_qmp_events_do_not_pile_up_in_the_controller(tmp_path) -> None:
    """qemu.qmp's event listener keeps every event it ever saw; with many long-lived sessions
    that grew memory without bound and made garbage collection stall the loop for 0.3-0.7 s
    (bench/control_plane.py). After 2000 events the controller holds a handful, not 2000."""
    import gc

    fake = FakeQemu()
    async with Sandbox(fake_config(tmp_path), backend=fake) as sb:
        for _ in range(2000):
            await fake.emit("RTC_CHANGE", {"offset": 0})
        await sb.pause()  # its STOP event comes after the 2000: the pump has seen them all
        await sb.resume()
        held = sum(1 for o in gc.get_objects() if type(o).__name__ == "Message")
        assert held < 100, f"{held} QMP messages still held after 2000 events"
