"""Faults a real QEMU will not produce on demand, against the fake QMP peer on real sockets."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from tests.conftest import assert_no_stray_tasks
from vmctl import (
    ConfigError,
    ExecResult,
    GuestCommandFailed,
    ReadyTimeout,
    Sandbox,
    SandboxFailed,
    SandboxState,
    VmctlTimeout,
    limit_commands_in_flight,
)
from vmctl.core.qmp import DEFAULT_COMMANDS_IN_FLIGHT
from vmctl.errors import QMPCommandError
from vmctl.testing import FakeQemu, QmpErrorReply, default_exec, fake_config


async def test_fake_drives_the_real_lifecycle(tmp_path: Path) -> None:
    fake = FakeQemu(exec_handler=lambda argv, stdin: ExecResult(0, b"hi " + stdin, b""))
    async with Sandbox(fake_config(tmp_path), backend=fake) as sb:
        assert sb.state is SandboxState.RUNNING
        assert (await sb.exec(["anything"], stdin=b"there")).stdout == b"hi there"
        await sb.pause()
        assert sb.state is SandboxState.PAUSED
        await sb.resume()
        lines = sb.console_lines()
        await fake.console_write(b"hello from the console\r\n" + b"x" * 100_000 + b"\n")
        assert await lines.__anext__() == "hello from the console"
        assert len(await lines.__anext__()) == 64 * 1024, "an endless line comes in bounded pieces"
    assert sb.state is SandboxState.STOPPED
    assert fake.commands()[:2] == ["qmp_capabilities", "cont"]
    assert "stop" in fake.commands()
    await assert_no_stray_tasks()


async def test_reply_that_never_comes_times_out_and_changes_nothing(tmp_path: Path) -> None:
    fake = FakeQemu(hang={"stop"})
    async with Sandbox(fake_config(tmp_path), backend=fake) as sb:
        with pytest.raises(VmctlTimeout, match="pause"):
            await sb.pause(timeout=0.3)
        assert sb.state is SandboxState.RUNNING
        assert sb.hypervisor.qmp.connected  # type: ignore[attr-defined]
    assert sb.state is SandboxState.STOPPED
    await assert_no_stray_tasks()


async def test_lost_event_is_a_timeout_not_a_wrong_state(tmp_path: Path) -> None:
    fake = FakeQemu(drop_events={"STOP"})
    async with Sandbox(fake_config(tmp_path), backend=fake) as sb:
        with pytest.raises(VmctlTimeout):
            await sb.pause(timeout=0.3)
        assert sb.state is SandboxState.RUNNING, "no STOP event, no PAUSED state"


async def test_qmp_error_reply_is_mapped(tmp_path: Path) -> None:
    fake = FakeQemu(replies={"stop": QmpErrorReply("GenericError", "nope")})
    async with Sandbox(fake_config(tmp_path), backend=fake) as sb:
        with pytest.raises(QMPCommandError) as info:
            await sb.pause()
        assert (info.value.command, info.value.error_class, info.value.description) == ("stop", "GenericError", "nope")
        assert sb.state is SandboxState.RUNNING


async def test_garbage_on_the_socket_fails_the_sandbox_and_its_waiters(tmp_path: Path) -> None:
    fake = FakeQemu()
    errors: list[Exception] = []
    async with Sandbox(fake_config(tmp_path), backend=fake) as sb:

        async def wait_paused() -> None:
            try:
                await sb.wait_for_state(SandboxState.PAUSED)
            except SandboxFailed as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_paused)
            await anyio.wait_all_tasks_blocked()
            await fake.send_raw(b"\x00{not json at all\n")
        assert sb.state is SandboxState.FAILED
        assert "QMP" in sb.failure
        assert len(errors) == 1
    await assert_no_stray_tasks()


async def test_crash_reports_exit_code_and_stderr(tmp_path: Path) -> None:
    fake = FakeQemu(exec_handler=lambda argv, stdin: anyio.sleep(30))  # type: ignore[arg-type,return-value]
    async with Sandbox(fake_config(tmp_path), backend=fake) as sb:
        errors: list[Exception] = []

        async def run() -> None:
            try:
                await sb.exec(["sleep"])
            except SandboxFailed as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await anyio.wait_all_tasks_blocked()
            fake.crash(-11, stderr="qemu: assertion failed: something broke")
        assert sb.state is SandboxState.FAILED and "code -11" in sb.failure
        assert len(errors) == 1 and "something broke" in str(errors[0])
        assert sb.hypervisor.agent.pending == 0


async def test_guest_panic_event_fails_the_sandbox(tmp_path: Path) -> None:
    fake = FakeQemu()
    async with Sandbox(fake_config(tmp_path), backend=fake) as sb:
        await fake.emit("GUEST_PANICKED", {"action": "pause"})
        assert await sb.wait_for_state(SandboxState.FAILED, timeout=5) is SandboxState.FAILED
        assert "panic" in sb.failure
        with pytest.raises(SandboxFailed):
            await sb.pause()


async def test_guest_power_off_is_a_clean_stop(tmp_path: Path) -> None:
    fake = FakeQemu()
    async with Sandbox(fake_config(tmp_path), backend=fake) as sb:
        await fake.emit("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
        fake.crash(0)
        assert await sb.wait_for_state(SandboxState.STOPPED, timeout=5) is SandboxState.STOPPED


async def test_late_or_illegal_events_are_ignored(tmp_path: Path) -> None:
    fake = FakeQemu()
    async with Sandbox(fake_config(tmp_path), backend=fake) as sb:
        await fake.emit("RESUME")
        await fake.emit("SOMETHING_NEW", {"x": 1})
        await sb.pause()  # the pump is still healthy and ordered
        assert sb.state is SandboxState.PAUSED


async def test_never_ready_gives_ready_timeout_naming_the_accelerator(tmp_path: Path, runtime_dir: Path) -> None:
    fake = FakeQemu(ready_delay=None)
    sb = Sandbox(fake_config(tmp_path), backend=fake, start_timeout=0.5)
    with pytest.raises(ReadyTimeout) as info:
        async with sb:
            pytest.fail("should not start")
    assert "accel=tcg" in str(info.value) and "start_timeout" in str(info.value)
    assert sb.state is SandboxState.FAILED
    assert list(runtime_dir.iterdir()) == []
    await assert_no_stray_tasks()


async def test_qmp_closed_under_us_while_process_lives(tmp_path: Path) -> None:
    fake = FakeQemu()
    async with Sandbox(fake_config(tmp_path), backend=fake) as sb:
        await fake.close_qmp()
        assert await sb.wait_for_state(SandboxState.FAILED, timeout=10) is SandboxState.FAILED
        assert "QMP connection lost" in sb.failure
    await assert_no_stray_tasks()


async def test_cancelled_exec_leaves_no_waiter(tmp_path: Path) -> None:
    fake = FakeQemu()
    async with Sandbox(fake_config(tmp_path), backend=fake) as sb:
        with anyio.move_on_after(0.05):
            await sb.exec(["sleep", "10"])
        assert sb.hypervisor.agent.pending == 0
        assert (await sb.exec(["echo", "still", "fine"])).stdout == b"still fine\n"


async def test_launch_failure_is_one_clear_error_not_a_group(tmp_path: Path, runtime_dir: Path) -> None:
    fake = FakeQemu(replies={"cont": QmpErrorReply("GenericError", "cannot continue")})
    sb = Sandbox(fake_config(tmp_path), backend=fake)
    with pytest.raises(QMPCommandError, match="cannot continue"):
        async with sb:
            pytest.fail("should not start")
    assert sb.state is SandboxState.FAILED
    assert list(runtime_dir.iterdir()) == []


async def test_qemu_dying_at_launch_reports_its_stderr(tmp_path: Path) -> None:
    fake = FakeQemu(hang={"qmp_capabilities"}, stderr=["qemu-system-x86_64: -device foo: 'foo' is not a valid device"])
    errors: list[SandboxFailed] = []

    async def crash_soon() -> None:
        while not fake.processes:
            await anyio.lowlevel.checkpoint()
        fake.crash(1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(crash_soon)
        try:
            async with Sandbox(fake_config(tmp_path), backend=fake):
                pytest.fail("should not start")
        except SandboxFailed as exc:
            errors.append(exc)
    assert len(errors) == 1
    assert "code 1" in str(errors[0]) and "not a valid device" in str(errors[0])


async def test_setup_error_before_launch_leaves_nothing(tmp_path: Path, runtime_dir: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    sb = Sandbox(fake_config(tmp_path), backend=FakeQemu(), log_dir=blocker)
    with pytest.raises(OSError):
        async with sb:
            pass
    assert sb.state is SandboxState.FAILED and "start failed" in sb.failure
    assert list(runtime_dir.iterdir()) == []


async def test_predicted_mmio_disk_names_are_confirmed_and_a_mismatch_fails(tmp_path: Path, runtime_dir: Path) -> None:
    from vmctl import BlockDevice, GuestError
    from vmctl.machine.devicetable import disk_name

    assert [disk_name("vd", i) for i in (0, 1, 25, 26, 27, 52)] == ["vda", "vdb", "vdz", "vdaa", "vdab", "vdba"]
    disks = []
    for name in "abc":
        path = tmp_path / f"{name}.img"
        path.write_bytes(b"\0" * 512)
        disks.append(BlockDevice(path=path, id=f"disk{name}"))
    config = fake_config(tmp_path, machine="microvm", devices=disks)
    async with Sandbox(config, backend=FakeQemu()) as sb:
        assert [(d.id, d.guest_path) for d in sb.devices] == [("diska", "/dev/vda"), ("diskb", "/dev/vdb"),
                                                               ("diskc", "/dev/vdc")]  # fmt: skip
    sb = Sandbox(config, backend=FakeQemu(guest_names={"diskb": "vdc", "diskc": "vdb"}))
    with pytest.raises(GuestError, match="diskb .* predicted to be /dev/vdb but the guest shows it as /dev/vdc"):
        async with sb:
            pytest.fail("a wrong disk name must not start")
    assert sb.state is SandboxState.FAILED


async def test_commands_past_the_bound_wait_for_a_slot_within_their_timeout(tmp_path: Path) -> None:
    """With one command in flight at a time, a QEMU that never answers holds the only slot: another
    sandbox's command is not sent, times out naming the bound, and goes through once it is free."""
    hung, healthy = FakeQemu(hang={"stop"}), FakeQemu()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with Sandbox(fake_config(tmp_path / "a"), backend=hung) as a, \
            Sandbox(fake_config(tmp_path / "b"), backend=healthy) as b:  # fmt: skip
        limit_commands_in_flight(1)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.pause)  # holds the slot: no reply ever comes
                await anyio.wait_all_tasks_blocked()
                with pytest.raises(VmctlTimeout, match="pause"):
                    await b.pause(timeout=0.3)
                with pytest.raises(VmctlTimeout, match="waited 0.3s for a command slot.*limit_commands_in_flight"):
                    await b.hypervisor.qmp.execute("query-status", timeout=0.3)  # type: ignore[attr-defined]
                assert not {"stop", "query-status"} & set(healthy.commands()), "a command past the bound is not sent"
                assert b.state is SandboxState.RUNNING
                tg.cancel_scope.cancel()  # the hung pause gives its slot back when cancelled
            await b.pause(timeout=5)
            assert b.state is SandboxState.PAUSED and "stop" in healthy.commands()
        finally:
            limit_commands_in_flight(DEFAULT_COMMANDS_IN_FLIGHT)
    await assert_no_stray_tasks()


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "8"])
def test_a_bad_bound_names_itself(bad: object) -> None:
    with pytest.raises(ConfigError, match="limit: commands in flight must be a whole number"):
        limit_commands_in_flight(bad)  # type: ignore[arg-type]


TRANSITION_BUFFER_BOUND = 1000  # a subscriber's buffer holds as many as `history` keeps


@pytest.mark.timeout(60)
async def test_a_failing_guest_command_inside_a_call_is_raised_at_once(tmp_path) -> None:
    """A GuestCommandFailed from a healthy sandbox is raised as soon as the agent answers.
    Only observable as time: Sandbox._guest_call takes every GuestError for a lost connection
    and waits up to 2 s for QEMU to exit. exec(check=True) checks outside _guest_call (no
    delay: the baseline); resize_vcpus runs exec(check=True) inside it. FakeQemu scripts the
    failing `cat .../present`; the bound is generous (1 s over the baseline)."""

    def handler(argv: list[bytes], stdin: bytes):  # noqa: ANN202
        if argv[:1] == [b"cat"] and argv[1:2] == [b"/sys/devices/system/cpu/present"]:
            return ExecResult(1, b"", b"cat: read error\n")
        return default_exec(argv, stdin)

    fake = FakeQemu(exec_handler=handler)
    async with Sandbox(fake_config(tmp_path, vcpus=1, max_vcpus=2), backend=fake) as sb:
        started = anyio.current_time()
        with pytest.raises(GuestCommandFailed):
            await sb.exec(["false"], check=True)
        baseline = anyio.current_time() - started
        started = anyio.current_time()
        with anyio.fail_after(30), pytest.raises(GuestCommandFailed):
            await sb.resize_vcpus(2)
        took = anyio.current_time() - started
        assert took < baseline + 1.0, f"GuestCommandFailed took {took:.2f}s (a failing exec: {baseline:.3f}s)"
        assert sb.state is SandboxState.RUNNING


@pytest.mark.timeout(120)
async def test_an_unread_transitions_stream_is_bounded(tmp_path) -> None:
    """A transitions() iterator nobody reads while the sandbox pauses and resumes 1500 times
    (3000 transitions) holds at most as many as `history` keeps (1000), dropping the oldest,
    and still ends with the terminal transition. Base: an unbounded stream buffers all 3002."""
    cycles = 1500
    async with Sandbox(fake_config(tmp_path), backend=FakeQemu()) as sb:
        follower = sb.transitions()
        for _ in range(cycles):
            await sb.pause()
            await sb.resume()
    seen = [t async for t in follower]
    assert seen and seen[-1].new is SandboxState.STOPPED
    assert len(seen) <= TRANSITION_BUFFER_BOUND, f"the subscriber buffered {len(seen)} transitions"
