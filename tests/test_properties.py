"""Property tests: the state machine under random trigger sequences, and the hotplug queue under
random interleavings of concurrent callers and QMP events, against the fake QMP peer.

Every run is bounded by a timeout, so a hang is a failure, not a stuck suite.
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from vmctl import IllegalTransition, Sandbox, SandboxFailed, SandboxState, Trigger
from vmctl.core.state import TERMINAL_STATES, TRANSITIONS, StateMachine, Transition, reachable_from
from vmctl.core.watcher import StateWatcher
from vmctl.devices import BlockDevice
from vmctl.errors import QMPError, VmctlError
from vmctl.machine.hotplug import DeviceState, HotplugQueue, HotplugTimeout
from vmctl.testing import FakeQemu, fake_config

S, T = SandboxState, Trigger
ALL_TARGETS = [frozenset(c) for n in (1, 2) for c in itertools.combinations(SandboxState, n)]

# -- (a) the state machine ------------------------------------------------------------------


@st.composite
def trigger_steps(draw: st.DrawFn) -> list[tuple[Trigger, bool, str]]:
    """A walk through the table: mostly legal triggers (to get deep), some illegal ones; each
    applied with ``fire`` or ``fire_if_allowed``. The table is walked from CREATED as we draw."""
    state = S.CREATED
    steps = []
    for _ in range(draw(st.integers(0, 40))):
        legal = sorted(TRANSITIONS[state], key=lambda t: t.value)
        if legal and draw(st.booleans()):
            trigger = draw(st.sampled_from(legal))
        else:
            trigger = draw(st.sampled_from(list(Trigger)))
        steps.append((trigger, draw(st.booleans()), draw(st.sampled_from(["", "why", "QEMU exited with code -9"]))))
        state = TRANSITIONS[state].get(trigger, state)
    return steps


@settings(max_examples=150, deadline=None)
@given(trigger_steps())
def test_random_trigger_sequences_follow_the_table(steps: list[tuple[Trigger, bool, str]]) -> None:
    seen: list[Transition] = []
    m = StateMachine()
    m.listen(seen.append)
    first_failure_reason: str | None = None
    for trigger, strict, reason in steps:
        before, history, failure = m.state, list(m.history), m.failure
        expected = TRANSITIONS[before].get(trigger)
        if strict:
            if expected is None:
                with pytest.raises(IllegalTransition) as info:
                    m.fire(trigger, reason)
                assert info.value.state is before and info.value.trigger is trigger
            else:
                assert m.fire(trigger, reason) == Transition(before, expected, trigger, reason)
        else:
            step = m.fire_if_allowed(trigger, reason)
            assert (step is None) == (expected is None)
        if expected is None:
            assert (m.state, list(m.history), m.failure) == (before, history, failure), (
                "an illegal trigger changed something"
            )
        else:
            assert m.state is expected
            if expected is not before:
                assert list(m.history) == [*history, Transition(before, expected, trigger, reason)]
            else:
                assert list(m.history) == history, "a self-loop is not a transition"
        if m.state is S.FAILED and first_failure_reason is None:
            first_failure_reason = reason or str(trigger)
        assert m.state in TRANSITIONS
        if before in TERMINAL_STATES:
            assert m.state is before, f"terminal state {before} was left"
    # the history is one connected walk from CREATED through the table, without self-loops
    assert seen == list(m.history)
    previous = S.CREATED
    for step in m.history:
        assert step.old is previous and step.new is not step.old
        assert TRANSITIONS[step.old][step.trigger] is step.new
        previous = step.new
    assert previous is m.state
    assert m.failure == (first_failure_reason or ""), "failure keeps the first reason and only on FAILED"


@settings(max_examples=80, deadline=None)
@given(trigger_steps())
def test_waiting_for_an_unreachable_state_raises_at_once(steps: list[tuple[Trigger, bool, str]]) -> None:
    """For every state on the walk and every target it can no longer reach, ``wait_for`` raises
    without ever suspending (so it cannot hang); a reachable or current target does suspend or
    return, as it should."""

    async def check(m: StateMachine) -> None:
        w = StateWatcher(m)
        for targets in ALL_TARGETS:
            coro = w.wait_for(*targets)
            try:
                coro.send(None)  # one step: done without suspending, or suspended
            except StopIteration as done:
                assert m.state in targets and done.value is m.state
                continue
            except SandboxFailed as exc:
                assert m.state is S.FAILED and not (reachable_from(m.state) & targets)
                assert m.failure and m.failure in str(exc)
                continue
            except IllegalTransition:
                assert m.state is not S.FAILED and not (reachable_from(m.state) & targets)
                continue
            coro.close()
            assert m.state not in targets and reachable_from(m.state) & targets, (
                f"a waiter for {set(targets)} from {m.state} suspended although it cannot be reached"
            )

    async def walk() -> None:
        m = StateMachine()
        await check(m)
        for trigger, _, reason in steps:
            m.fire_if_allowed(trigger, reason)
            await check(m)

    anyio.run(walk)


@settings(max_examples=60, deadline=None)
@given(trigger_steps(), st.lists(st.tuples(st.integers(0, 40), st.sampled_from(ALL_TARGETS)), max_size=6))
def test_waiters_started_anywhere_all_finish(
    steps: list[tuple[Trigger, bool, str]], waits: list[tuple[int, frozenset[SandboxState]]]
) -> None:
    """Waiters started at random points see the first target state reached after they start (the
    loop runs between steps), or fail once it is unreachable; driving the sandbox to a terminal
    state at the end leaves none waiting."""

    async def run() -> None:
        m = StateMachine()
        w = StateWatcher(m)
        outcomes: dict[int, object] = {}
        expected: dict[int, object] = {}
        watching: dict[int, frozenset[SandboxState]] = {}

        async def wait(i: int, targets: frozenset[SandboxState]) -> None:
            try:
                outcomes[i] = await w.wait_for(*targets)
            except (SandboxFailed, IllegalTransition) as exc:
                outcomes[i] = type(exc)

        def judge() -> None:  # what each open waiter must have seen in the state just reached
            for i, targets in list(watching.items()):
                if m.state in targets:
                    expected[i] = m.state
                elif not reachable_from(m.state) & targets:
                    expected[i] = SandboxFailed if m.state is S.FAILED else IllegalTransition
                else:
                    continue
                del watching[i]

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for index, (trigger, _, reason) in enumerate([*steps, (T.FAULT, False, "end"), (T.STOP, False, ""),
                                                              (T.PROCESS_EXIT, False, "")]):  # fmt: skip
                    for i, (at, targets) in enumerate(waits):
                        if at == index:
                            watching[i] = targets
                            tg.start_soon(wait, i, targets)
                    judge()
                    await anyio.wait_all_tasks_blocked()
                    m.fire_if_allowed(trigger, reason)
                    judge()
                    await anyio.wait_all_tasks_blocked()
                    assert {i: outcomes.get(i) for i in expected} == expected
                    assert set(outcomes) == set(expected)
        assert m.state in TERMINAL_STATES
        started = {i for i, (at, _) in enumerate(waits) if at < len(steps) + 3}
        assert set(outcomes) == started and not watching, "a waiter outlived the terminal state"

    anyio.run(run)


# -- (b) the hotplug queue under concurrent callers and QMP events ----------------------------

IDS = ["d0", "d1", "d2"]
Op = tuple[str, str, float]  # (plug | unplug, device id, timeout)

caller_ops = st.lists(
    st.tuples(st.sampled_from(["plug", "unplug"]), st.sampled_from(IDS), st.sampled_from([0.02, 0.1, 0.3])),
    min_size=1,
    max_size=5,
)
event_kinds = st.sampled_from(
    [
        "deleted-held",  # QEMU really removed a device it holds (guest eject, late acknowledgement)
        "deleted-held-twice",  # ... and says so twice
        "deleted-unknown",  # an id vmctl never used
        "deleted-child-path",  # a child of a device (path only): not the device itself
        "deleted-no-data",
        "guest-error",  # DEVICE_UNPLUG_GUEST_ERROR for a pool id
        "ost-eject-refused",  # ACPI_DEVICE_OST: the guest refuses an eject
        "ost-other",  # ACPI_DEVICE_OST that means nothing for disks
        "noise",  # RTC_CHANGE and an unknown event
        "yield",  # let the callers run
    ]
)


@dataclass
class Scenario:
    unplug: str
    unplug_delay: float
    driver: str
    callers: list[list[Op]]
    events: list[tuple[str, str]]
    disconnect: str | None
    outcomes: list[tuple[str, str, object]] = field(default_factory=list)


scenarios = st.builds(
    Scenario,
    unplug=st.sampled_from(["ack", "ack", "never", "guest-error"]),
    unplug_delay=st.sampled_from([0.0, 0.01]),
    driver=st.sampled_from(["virtio-scsi", "virtio-blk"]),  # virtio-blk: two root ports, so slots run out
    callers=st.lists(caller_ops, min_size=1, max_size=4),
    events=st.lists(st.tuples(event_kinds, st.sampled_from(IDS)), max_size=12),
    # mostly none; losing QMP while QEMU lives costs the production 2 s grace, so it is rarer
    disconnect=st.sampled_from([None] * 8 + ["crash"] * 3 + ["close-qmp"]),
)

#: what a caller may get instead of a result: each a clear vmctl error
EXPECTED_ERRORS = (VmctlError,)


async def _inject(fake: FakeQemu, kind: str, dev_id: str) -> None:
    process = fake.process
    if kind.startswith("deleted-held"):
        held = [d for d in IDS if d in process.devices]
        if not held:
            return
        target = held[IDS.index(dev_id) % len(held)]
        process.devices.pop(target)  # QEMU removes first, then reports
        for _ in range(2 if kind.endswith("twice") else 1):
            await fake.emit("DEVICE_DELETED", {"device": target, "path": f"/machine/peripheral/{target}"})
    elif kind == "deleted-unknown":
        await fake.emit("DEVICE_DELETED", {"device": "ghost7", "path": "/machine/peripheral/ghost7"})
    elif kind == "deleted-child-path":
        await fake.emit("DEVICE_DELETED", {"path": f"/machine/peripheral/{dev_id}/virtio-backend"})
    elif kind == "deleted-no-data":
        await fake.emit("DEVICE_DELETED")
    elif kind == "guest-error":
        await fake.emit("DEVICE_UNPLUG_GUEST_ERROR", {"device": dev_id, "path": f"/machine/peripheral/{dev_id}"})
    elif kind == "ost-eject-refused":
        info = {"device": dev_id, "slot": "0", "slot-type": "PCI", "source": 3, "status": 0x82}
        await fake.emit("ACPI_DEVICE_OST", {"info": info})
    elif kind == "ost-other":
        await fake.emit("ACPI_DEVICE_OST", {"info": {"device": dev_id, "source": 1, "status": 0}})
    elif kind == "noise":
        await fake.emit("RTC_CHANGE", {"offset": 1})
        await fake.emit("SOMETHING_NEW_IN_QEMU_9", {"x": [1, 2]})
    for _ in range(3):
        await anyio.lowlevel.checkpoint()


async def _peripheral_ids(sb: Sandbox) -> set[str]:
    children = await sb.hypervisor.execute("qom-list", {"path": "/machine/peripheral"})
    return {str(c["name"]) for c in children}


async def _run_scenario(sc: Scenario, directory: Path) -> None:
    disk = directory / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    fake = FakeQemu(unplug=sc.unplug, unplug_delay=sc.unplug_delay)  # type: ignore[arg-type]
    config = fake_config(directory, block_driver=sc.driver, pci_bridges=2)
    async with Sandbox(config, backend=fake) as sb:
        queue: HotplugQueue = sb._live().devices.queue  # noqa: SLF001
        baseline = await _peripheral_ids(sb)
        finished: list[int] = []

        async def caller(index: int, ops: list[Op]) -> None:
            for kind, dev_id, timeout in ops:
                try:
                    if kind == "plug":
                        record = await sb.hotplug(BlockDevice(path=disk, id=dev_id), timeout=timeout)
                        assert record.id == dev_id and record.guest_path, "a plug returns the guest's name"
                        outcome: object = "plugged"
                    else:
                        await sb.unplug(dev_id, timeout=timeout)
                        outcome = "unplugged"
                except EXPECTED_ERRORS as exc:
                    outcome = exc
                sc.outcomes.append((kind, dev_id, outcome))
                event(f"{kind}: {outcome if isinstance(outcome, str) else type(outcome).__name__}")
            finished.append(index)

        async def events() -> None:
            for kind, dev_id in sc.events:
                await _inject(fake, kind, dev_id)
            if sc.disconnect == "close-qmp":
                await fake.close_qmp()
            elif sc.disconnect == "crash":
                fake.crash(-9, stderr="killed by the test")

        with anyio.fail_after(20):  # every call ends: a hang fails here
            async with anyio.create_task_group() as tg:
                for index, ops in enumerate(sc.callers):
                    tg.start_soon(caller, index, ops)
                tg.start_soon(events)
        assert sorted(finished) == list(range(len(sc.callers)))
        assert len(sc.outcomes) == sum(len(ops) for ops in sc.callers), "every call completed exactly once"
        assert queue.pending_waiters == 0, "a hotplug waiter was left behind"
        assert sb.hypervisor.agent.pending == 0, "an agent waiter was left behind"
        for _, dev_id, outcome in sc.outcomes:
            if isinstance(outcome, VmctlError):
                clear = dev_id in str(outcome) or isinstance(outcome, SandboxFailed | QMPError)
                assert clear, f"an error that names neither the device nor the lost sandbox: {outcome!r}"

        table = {d.id: d for d in sb.devices}
        assert all(d.state is not DeviceState.REMOVED for d in table.values()), "a removed device stayed in the table"
        if sc.driver == "virtio-blk":
            assert queue.slots.free("pci") == 2 - len(table), "slots held == devices in the table"
        else:
            assert queue.slots.free("scsi") == 256 - len(table)
            assert len({d.placement.scsi_id for d in table.values()}) == len(table), "two disks on one target"
        if sc.disconnect is not None:
            await sb.wait_for_state(SandboxState.FAILED, timeout=10)
        if sb.state is SandboxState.RUNNING:
            # let acknowledgements the fake still owes arrive, then QEMU and vmctl must agree
            with anyio.fail_after(5):
                while set(table) != (await _peripheral_ids(sb)) - baseline:
                    await anyio.lowlevel.checkpoint()
                    table = {d.id: d for d in sb.devices}
            assert queue.pending_waiters == 0
        else:
            assert sc.disconnect is not None, f"the sandbox failed on its own: {sb.failure}"
            assert sb.state is SandboxState.FAILED
            held = set(fake.process.devices) - baseline
            assert held <= set(table), "QEMU holds a device vmctl forgot: its slot could be given twice"
            unsure = {dev_id for _, dev_id, outcome in sc.outcomes if isinstance(outcome, VmctlError)}
            assert set(table) - held <= unsure, "vmctl lists a device QEMU never took"
            with pytest.raises(SandboxFailed):
                await sb.hotplug(BlockDevice(path=disk, id="late"))
            with pytest.raises(SandboxFailed):
                await sb.unplug("d0")


# No shrink phase: an example takes up to ~2 s, so shrinking a failure would run for minutes;
# the failing scenario is printed as found (add Phase.shrink locally to minimise it).
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # fmt: skip
@given(scenarios)
def test_hotplug_queue_under_random_interleavings(sc: Scenario) -> None:
    with tempfile.TemporaryDirectory(prefix="vmctl-prop-") as directory:
        anyio.run(_run_scenario, sc, Path(directory))


async def test_two_unplugs_of_one_device_both_see_the_removal(tmp_path: Path) -> None:
    """A caller giving up (short timeout) must not take the other caller's waiter with it."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    fake = FakeQemu(unplug="never")
    async with Sandbox(fake_config(tmp_path, block_driver="virtio-blk"), backend=fake) as sb:
        await sb.hotplug(BlockDevice(path=disk, id="d0"))
        results: dict[str, Any] = {}

        async def unplug(name: str, timeout: float) -> None:
            try:
                await sb.unplug("d0", timeout=timeout)
                results[name] = "unplugged"
            except VmctlError as exc:
                results[name] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(unplug, "patient", 10.0)
            tg.start_soon(unplug, "hasty", 0.05)
            with anyio.fail_after(5):
                while "hasty" not in results:
                    await anyio.lowlevel.checkpoint()
            assert isinstance(results["hasty"], HotplugTimeout)
            fake.process.devices.pop("d0")
            await fake.emit("DEVICE_DELETED", {"device": "d0", "path": "/machine/peripheral/d0"})
        assert results["patient"] == "unplugged", "the removal QEMU confirmed was reported as a timeout"
        assert sb.devices == [] and sb.pending_waiters == 0  # noqa: SLF001
