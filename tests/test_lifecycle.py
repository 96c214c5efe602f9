"""Real sandboxes on real QEMU (TCG): boot, exec, pause/resume, stop, failures and cancellation."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from tests.conftest import assert_no_stray_tasks, cgroups_named, processes_left, qemu_processes
from vmctl import (
    BlockDevice,
    IllegalTransition,
    Sandbox,
    SandboxConfig,
    SandboxFailed,
    SandboxState,
    Trigger,
    VmctlError,
    guest,
    limit_commands_in_flight,
)
from vmctl.core.qmp import DEFAULT_COMMANDS_IN_FLIGHT
from vmctl.hypervisors import jail

pytestmark = pytest.mark.qemu
MakeConfig = Callable[..., SandboxConfig]


async def test_issue_example_boot_exec_pause_resume_stop(make_config: MakeConfig, runtime_dir: Path) -> None:
    async with Sandbox(make_config(vcpus=1, memory_mib=256)) as sb:
        assert sb.state is SandboxState.RUNNING
        assert sb.pid is not None and set(qemu_processes(str(runtime_dir))) == {sb.pid, sb.hypervisor.pid}
        result = await sb.exec(["cat", "/proc/version"])
        assert result.exit_code == 0
        assert result.stdout.startswith(b"Linux version ")
        assert result.stderr == b""
        await sb.pause()
        assert sb.state is SandboxState.PAUSED
        status = await sb.hypervisor.qmp.execute("query-status")  # type: ignore[attr-defined]
        assert status["status"] == "paused"
        await sb.resume()
        assert sb.state is SandboxState.RUNNING
        run_dir = sb.run_dir
        assert run_dir is not None and run_dir.is_dir()
        assert (run_dir.stat().st_mode & 0o777) == 0o700
    assert sb.state is SandboxState.STOPPED
    assert not run_dir.exists()
    assert [t.new for t in sb.history] == [
        SandboxState.STARTING,
        SandboxState.RUNNING,
        SandboxState.PAUSED,
        SandboxState.RUNNING,
        SandboxState.STOPPING,
        SandboxState.STOPPED,
    ]
    await assert_no_stray_tasks()


async def test_exec_stdin_stderr_exit_code_and_timeout(make_config: MakeConfig) -> None:
    async with Sandbox(make_config()) as sb:
        r = await sb.exec(["sh", "-c", "tr a-z A-Z; echo oops >&2; exit 7"], stdin=b"hello\n")
        assert (r.exit_code, r.stdout, r.stderr, r.timed_out) == (7, b"HELLO\n", b"oops\n", False)
        # arguments survive spaces, quotes, newlines and non-ASCII bytes exactly
        tricky = ["a b", "'\"$HOME\"'", "line1\nline2\n", "\u00e9*?", ""]
        r = await sb.exec(["sh", "-c", 'for a in "$@"; do printf "[%s]" "$a"; done', "sh", *tricky])
        assert r.stdout == "".join(f"[{a}]" for a in tricky).encode()
        r = await sb.exec(["sleep", "30"], timeout=1)
        assert r.timed_out and not r.ok
        missing = await sb.exec(["no-such-program"])
        assert missing.exit_code == 127
        for builtin in (["exit", "0"], ["exec", "true"], ["reply", "1", "x"]):
            assert (await sb.exec(builtin, timeout=10)).exit_code == 127, "argv runs programs, not shell builtins"
        with pytest.raises(ValueError, match="list of arguments"):
            await sb.exec("echo hi")  # type: ignore[arg-type]


@pytest.fixture
def one_command_at_a_time() -> Iterator[None]:
    limit_commands_in_flight(1)
    try:
        yield
    finally:
        limit_commands_in_flight(DEFAULT_COMMANDS_IN_FLIGHT)


@pytest.mark.usefixtures("one_command_at_a_time")
async def test_three_sandboxes_at_once_in_one_loop(make_config: MakeConfig, runtime_dir: Path, tmp_path: Path) -> None:
    """Also with one QMP command in flight at a time across all three (hotplugs, pauses and execs
    running at once): nothing vmctl does holds a command slot while it waits for another."""
    boot_ids: dict[int, str] = {}
    disks: dict[int, str | None] = {}

    async def one(i: int) -> None:
        disk = tmp_path / f"disk{i}.img"
        disk.write_bytes(b"\0" * (4 << 20))
        async with Sandbox(make_config(), id=f"trio-{i}") as sb:

            async def plug() -> None:
                disks[i] = (await sb.hotplug(BlockDevice(path=disk))).guest_path

            async with anyio.create_task_group() as tg:
                tg.start_soon(plug)
                r = await sb.exec(["cat", "/proc/sys/kernel/random/boot_id"], check=True)
                boot_ids[i] = r.text.strip()
                await sb.pause()
                await sb.resume()

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(one, i)
    assert sorted(boot_ids) == [0, 1, 2]
    assert len(set(boot_ids.values())) == 3, "each sandbox is its own guest"
    assert all(str(path).startswith("/dev/") for path in disks.values()), disks
    await assert_no_stray_tasks()


async def test_illegal_transitions_raise_and_change_nothing(make_config: MakeConfig) -> None:
    async with Sandbox(make_config()) as sb:
        with pytest.raises(IllegalTransition):
            await sb.start()
        assert sb.state is SandboxState.RUNNING
        with pytest.raises(IllegalTransition):
            await sb.resume()
        assert sb.state is SandboxState.RUNNING
        await sb.pause()
        with pytest.raises(IllegalTransition):
            await sb.pause()
        with pytest.raises(IllegalTransition):
            await sb.exec(["true"])
        assert sb.state is SandboxState.PAUSED
        await sb.stop()
        assert sb.state is SandboxState.STOPPED
        with pytest.raises(IllegalTransition) as info:
            await sb.pause()
        assert info.value.state is SandboxState.STOPPED and info.value.trigger is Trigger.PAUSE
        assert sb.state is SandboxState.STOPPED
        await sb.stop()  # idempotent


async def test_sigkill_moves_to_failed_and_wakes_every_waiter(make_config: MakeConfig, runtime_dir: Path) -> None:
    errors: list[BaseException] = []
    async with Sandbox(make_config()) as sb:
        pid = sb.pid
        assert pid is not None

        async def waiter(coro: object) -> None:
            try:
                await coro  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter, sb.exec(["sleep", "60"]))
            tg.start_soon(waiter, sb.wait_for_state(SandboxState.PAUSED))
            await sb.exec(["true"])  # both waiters are in flight by now
            os.kill(pid, signal.SIGKILL)
            assert await sb.wait_for_state(SandboxState.FAILED, timeout=10) is SandboxState.FAILED
        assert "killed" in sb.failure or "-9" in sb.failure
        assert len(errors) == 2 and all(isinstance(e, SandboxFailed) for e in errors), errors
        with pytest.raises(SandboxFailed):
            await sb.exec(["true"])  # fails fast now
        assert qemu_processes(str(runtime_dir)) == []
    assert sb.state is SandboxState.FAILED
    assert sb.run_dir is not None and not sb.run_dir.exists()
    await assert_no_stray_tasks()


@pytest.mark.parametrize("cancel_after", ["create", "launch", "qmp", "cont", "boot"])
async def test_cancelling_start_leaves_nothing(make_config: MakeConfig, runtime_dir: Path, cancel_after: str) -> None:
    """Cancel the start at each phase it goes through, seen from the state machine and QEMU:
    when the cancelled start returns, its processes are reaped (not even a zombie is left), its
    cgroups and its run directory are gone."""
    sb = Sandbox(make_config())
    reached = anyio.Event()
    pids: set[int] = set()

    async def watch() -> None:
        if cancel_after == "create":
            reached.set()
            return
        step = {"launch": "spawned", "qmp": "qmp", "cont": "cont"}.get(cancel_after)
        while True:  # the start's steps as the hypervisor reports them (startup_timings)
            try:
                hv = sb.hypervisor
            except VmctlError:  # not created yet
                hv = None
            if hv is not None and hv.pid is not None:
                pids.update({hv.pid, jail.inner_pid(hv.pid)})  # the jail's outer process, QEMU
            timings = getattr(hv, "startup_timings", {})
            if step in timings and hv is not None and hv.pid is not None or cancel_after == "boot" and any(
                    "Run /init" in line or "vmctl-init" in line for line in sb.console_tail):  # fmt: skip
                reached.set()
                return
            await anyio.sleep(0.005)

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)

            async def canceller() -> None:
                await reached.wait()
                scope.cancel()

            tg.start_soon(canceller)
            async with sb:
                pytest.fail("start should have been cancelled")
    assert scope.cancelled_caught
    assert sb.state is SandboxState.STOPPED, sb.history
    assert SandboxState.FAILED not in [t.new for t in sb.history], "a cancelled start is a stop, not a failure"
    assert qemu_processes(str(runtime_dir)) == []
    assert processes_left(pids) == [], "the cancelled start returned before its processes were reaped"
    assert sb.run_dir is not None and not sb.run_dir.exists()
    assert cgroups_named([sb.run_dir.name]) == []
    await assert_no_stray_tasks()


async def test_stop_inside_block_then_exit(make_config: MakeConfig) -> None:
    async with Sandbox(make_config()) as sb:
        seen: list[SandboxState] = []

        async def follow() -> None:
            async for step in sb.transitions():
                seen.append(step.new)

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await anyio.lowlevel.checkpoint()
            await sb.stop()
        assert seen == [SandboxState.STOPPING, SandboxState.STOPPED]
        assert sb.state is SandboxState.STOPPED


async def test_user_exception_in_block_propagates_unchanged(make_config: MakeConfig, runtime_dir: Path) -> None:
    with pytest.raises(KeyError, match="boom"):
        async with Sandbox(make_config()) as sb:
            raise KeyError("boom")
    assert sb.state is SandboxState.STOPPED
    assert qemu_processes(str(runtime_dir)) == []


async def test_console_stream_and_log_file(make_config: MakeConfig, tmp_path: Path) -> None:
    async with Sandbox(make_config(), log_dir=tmp_path) as sb:
        lines: list[str] = []

        async def read() -> None:
            async for line in sb.console_lines():
                lines.append(line)
                if "marker-42" in line:
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await anyio.lowlevel.checkpoint()
            await sb.exec(["sh", "-c", "echo marker-42 > /dev/console"])
        assert any("marker-42" in line for line in lines)
        # a guest that floods the console without newlines cannot stall the controller
        await sb.exec(["sh", "-c", "head -c 200000 /dev/zero | tr '\\0' x > /dev/console; echo > /dev/console"])
        assert (await sb.exec(["echo", "alive"])).stdout == b"alive\n"
        log_path = sb.console_log_path
    assert log_path is not None and log_path.parent == tmp_path / sb.id
    text = log_path.read_text()
    assert "vmctl-agent: ready" in text and "marker-42" in text
    assert "Power down" in text, "stop was graceful: the guest powered itself off"
    assert [line async for line in sb.console_lines()] == [], "a finished sandbox's console ends at once"


async def test_vcpu_thread_ids_are_qemu_threads(make_config: MakeConfig) -> None:
    async with Sandbox(make_config(vcpus=2, max_vcpus=2)) as sb:
        tids = await sb.vcpu_thread_ids()
        assert sorted(tids) == [0, 1]
        tasks = {int(p.name) for p in Path(f"/proc/{sb.hypervisor.qemu_pid}/task").iterdir()}  # host tids
        assert set(tids.values()) <= tasks
        assert await sb.guest_online_cpus() == [0, 1]
        caps = sb.capabilities()
        assert caps.pause and not caps.cpu_hotplug  # vcpus == max_vcpus: nothing to plug


async def test_guest_queries(make_config: MakeConfig) -> None:
    async with Sandbox(make_config(memory_mib=320)) as sb:
        mem = await sb.guest_memory()
        assert 150 * 1024 < mem.total_kib <= 320 * 1024
        assert await sb.guest_online_cpus() == [0]
        assert await sb.guest_block_devices() == []


async def test_issue_snippet_runs_as_written(assets: guest.GuestAssets) -> None:
    async def main() -> None:
        assets = await guest.ensure_default_assets()
        config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, vcpus=1, memory_mib=256)
        async with Sandbox(config) as sb:
            assert sb.state is SandboxState.RUNNING
            result = await sb.exec(["cat", "/proc/version"])
            assert result.exit_code == 0 and b"Linux" in result.stdout
            await sb.pause()
            assert sb.state is SandboxState.PAUSED
            await sb.resume()
            assert sb.state is SandboxState.RUNNING

    await main()


@pytest.mark.timeout(120)
async def test_each_waiter_of_a_failed_sandbox_gets_its_own_exception(make_config) -> None:
    """Two execs wait in the guest; QEMU is SIGKILLed. Both get SandboxFailed, as distinct objects
    with distinct causes (one instance raised in two tasks mixes their tracebacks).
    Base: the agent's fail_all hands one GuestError (or one SandboxFailed) to every waiter."""
    errors: dict[int, BaseException] = {}
    async with Sandbox(make_config()) as sb:

        async def call(n: int) -> None:
            try:
                await sb.exec(["sh", "-c", f"touch /tmp/started{n}; sleep 30"])
            except Exception as exc:  # noqa: BLE001
                errors[n] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 1)
            tg.start_soon(call, 2)
            # returns once both commands run in the guest (a guest-side wait, not a host sleep)
            await sb.exec(["sh", "-c", "until [ -e /tmp/started1 ] && [ -e /tmp/started2 ]; do sleep 0.05; done"],
                          timeout=60, check=True)  # fmt: skip
            os.kill(sb.pid, 9)  # type: ignore[arg-type]
    assert isinstance(errors.get(1), SandboxFailed) and isinstance(errors.get(2), SandboxFailed), errors
    first, second = errors[1], errors[2]
    assert first is not second, "one exception instance raised into two tasks"
    assert first.__cause__ is None or first.__cause__ is not second.__cause__, (
        f"both share the cause {first.__cause__!r} (one instance, two tracebacks)"
    )
