"""The transition table, without QEMU."""

from __future__ import annotations

import anyio
import pytest

from vmctl import IllegalTransition, SandboxFailed, SandboxState, Trigger
from vmctl.core.state import TERMINAL_STATES, TRANSITIONS, StateMachine, state_diagram
from vmctl.core.watcher import StateWatcher

S, T = SandboxState, Trigger


def machine_in(*path: Trigger) -> StateMachine:
    m = StateMachine()
    for trigger in path:
        m.fire(trigger)
    return m


def test_every_state_has_a_row_and_terminals_are_stopped_failed_and_detached() -> None:
    assert set(TRANSITIONS) == set(SandboxState)
    assert TERMINAL_STATES == {S.STOPPED, S.FAILED, S.DETACHED}


def test_happy_path_is_driven_by_confirmations() -> None:
    m = machine_in(T.START)
    assert m.state is S.STARTING
    m.fire(T.QMP_RESUME)  # the cont that releases -S does not mean "ready"
    assert m.state is S.STARTING
    m.fire(T.GUEST_READY)
    m.fire(T.PAUSE)  # a request: legal, but only QEMU's STOP event changes the state
    assert m.state is S.RUNNING
    m.fire(T.QMP_STOP)
    assert m.state is S.PAUSED
    m.fire(T.QMP_RESUME)
    m.fire(T.STOP)
    assert m.state is S.STOPPING
    m.fire(T.PROCESS_EXIT)
    assert m.state is S.STOPPED


@pytest.mark.parametrize(
    ("path", "trigger"),
    [
        ((), T.PAUSE),
        ((T.START,), T.START),
        ((T.START, T.GUEST_READY), T.START),
        ((T.START, T.GUEST_READY), T.RESUME),
        ((T.START, T.GUEST_READY, T.QMP_STOP), T.PAUSE),
        ((T.START, T.GUEST_READY, T.QMP_STOP), T.EXEC),
        ((T.START, T.GUEST_READY, T.STOP, T.PROCESS_EXIT), T.PAUSE),
        ((T.START, T.GUEST_READY, T.STOP, T.PROCESS_EXIT), T.START),
        ((T.START, T.PROCESS_EXIT), T.RESUME),
    ],
)
def test_illegal_trigger_raises_and_changes_nothing(path: tuple[Trigger, ...], trigger: Trigger) -> None:
    m = machine_in(*path)
    before, history = m.state, list(m.history)
    with pytest.raises(IllegalTransition) as info:
        m.fire(trigger)
    assert info.value.state is before and info.value.trigger is trigger
    assert m.state is before and list(m.history) == history


def test_unexpected_exit_is_failure_and_remembers_why() -> None:
    m = machine_in(T.START, T.GUEST_READY)
    m.fire(T.PROCESS_EXIT, "QEMU exited with code -9")
    assert m.state is S.FAILED and m.failure == "QEMU exited with code -9"
    m.fire(T.PROCESS_EXIT, "again")  # late events are absorbed
    assert m.failure == "QEMU exited with code -9"


def test_guest_panic_fails_even_when_paused() -> None:
    m = machine_in(T.START, T.GUEST_READY, T.QMP_STOP)
    m.fire(T.GUEST_PANICKED, "panic")
    assert m.state is S.FAILED


async def test_waiters_wake_on_the_state_and_fail_fast_when_unreachable() -> None:
    m = machine_in(T.START, T.GUEST_READY)
    w = StateWatcher(m)
    got: list[object] = []

    async def wait(*targets: SandboxState) -> None:
        try:
            got.append(await w.wait_for(*targets))
        except SandboxFailed as exc:
            got.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait, S.PAUSED)
        tg.start_soon(wait, S.STOPPED)
        await anyio.wait_all_tasks_blocked()
        m.fire(T.QMP_STOP)
        await anyio.wait_all_tasks_blocked()
        assert got == [S.PAUSED]
        m.fire(T.FAULT, "pump died")
    assert isinstance(got[1], SandboxFailed) and "pump died" in str(got[1])


async def test_transitions_iterator_sees_every_step_in_order() -> None:
    m = machine_in(T.START)
    w = StateWatcher(m)
    seen: list[tuple[SandboxState, SandboxState]] = []

    async def follow() -> None:
        async for step in w.transitions():
            seen.append((step.old, step.new))

    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        await anyio.wait_all_tasks_blocked()
        for trigger in (T.GUEST_READY, T.QMP_STOP, T.QMP_RESUME, T.STOP, T.PROCESS_EXIT):
            m.fire(trigger)
    assert seen == [(S.STARTING, S.RUNNING), (S.RUNNING, S.PAUSED), (S.PAUSED, S.RUNNING),
                    (S.RUNNING, S.STOPPING), (S.STOPPING, S.STOPPED)]  # fmt: skip


def test_readme_diagram_is_generated_from_the_table() -> None:
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert state_diagram() in readme, "run 'vmctl state-diagram' and paste it into the README"
    for state, row in TRANSITIONS.items():
        for trigger, nxt in row.items():
            if nxt is not state:
                assert f"{state.value} --> {nxt.value}: {trigger.value}" in state_diagram()
