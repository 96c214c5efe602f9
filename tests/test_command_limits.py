"""What ends a command early ends all of it, and a command's timeout is the host's promise.

Real QEMU, the default guest (256 MiB). A command ended early (its output limit, its timeout, a
cancelled caller) is killed in the guest with everything it started, even what left its process
group; the error or result says what happened only as far as the agent confirmed it. A
``timeout`` holds on the host too: a guest that is flooded (a fork bomb) or whose agent stops
answering (SIGSTOP from inside) cannot make the call outlast its deadline by more than
``TIMEOUT_GRACE``, and the sandbox is usable afterwards.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import anyio
import pytest

from tests.conftest import assert_no_stray_tasks
from vmctl import (
    GuestCommandFailed,
    GuestOSError,
    GuestUnresponsive,
    OutputLimitExceeded,
    Sandbox,
    SandboxConfig,
    SandboxState,
)
from vmctl.agent.client import TIMEOUT_GRACE

pytestmark = pytest.mark.qemu
MakeConfig = Callable[..., SandboxConfig]
#: what the host may add to a deadline besides TIMEOUT_GRACE (the event loop, a loaded machine)
SLACK = 1.5
#: sleeps started by a command: plain, in the background, and one that left the process group
SPREAD = "setsid sleep 1000 & sleep 1000 & sleep 1000"


async def running(sb: Sandbox, pattern: str, timeout: float = 30) -> list[str]:
    """Pids of the guest's processes whose command line holds ``pattern`` (init's own loop runs
    ``sleep 0.3`` now and then: patterns name the test's commands exactly)."""
    listing = (await sb.exec(["ps", "-o", "pid,args"], timeout=timeout, check=True)).text.splitlines()[1:]
    return [line.split()[0] for line in listing if pattern in line]


async def gone_soon(sb: Sandbox, pattern: str) -> list[str]:
    """For a cancelled caller (no confirmation can come back): what still runs after a bounded wait."""
    with anyio.move_on_after(15):
        while await running(sb, pattern):  # noqa: ASYNC110 - polls the guest
            await anyio.sleep(0.1)
    return await running(sb, pattern)


@pytest.mark.timeout(240)
async def test_what_ends_a_command_early_ends_everything_it_started(make_config: MakeConfig) -> None:
    async with Sandbox(make_config()) as sb:
        # the output limit: both writers (one in the background) are gone when the error says so
        agent = sb.hypervisor.agent
        with anyio.fail_after(60), pytest.raises(OutputLimitExceeded, match="it was killed") as caught:
            await agent.exec(["sh", "-c", "yes AAAA & yes BBBB >&2; wait"], output_limit=2 * 1024 * 1024)
        assert caught.value.killed
        assert await running(sb, "yes AAAA") == []

        # the timeout, through exec and through process: nothing left, not even the setsid one
        result = await sb.exec(["sh", "-c", f"{SPREAD}; wait"], timeout=2)
        assert result.timed_out and result.exit_code == 128 + signal.SIGKILL
        assert await running(sb, "sleep 1000") == []
        async with sb.process(["sh", "-c", f"{SPREAD}; wait"], timeout=2) as p:
            assert await p.wait() == 128 + signal.SIGKILL and p.timed_out
        assert await running(sb, "sleep 1000") == []

        # a cancelled caller: exec and process
        async def started_then_cancelled(run: Callable[[], object]) -> None:
            with anyio.move_on_after(30) as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(run)
                    while len(await running(sb, "sleep 1000")) < 4:  # noqa: ASYNC110 - the shell and its 3
                        await anyio.sleep(0.1)
                    scope.cancel()
            assert scope.cancelled_caught

        await started_then_cancelled(lambda: sb.exec(["sh", "-c", f"{SPREAD}; wait"]))
        assert await gone_soon(sb, "sleep 1000") == []

        async def in_process() -> None:
            async with sb.process(["sh", "-c", f"{SPREAD}; wait"]) as p:
                await p.wait()

        await started_then_cancelled(in_process)
        assert await gone_soon(sb, "sleep 1000") == []

        # a command that ends by itself keeps what it left running in the background (daemons)
        assert (await sb.exec(["sh", "-c", "setsid sleep 1000 </dev/null >/dev/null 2>&1 &"], timeout=10)).ok
        assert len(await running(sb, "sleep 1000")) == 1
        assert sb.pending_waiters == 0
    await assert_no_stray_tasks()


@pytest.mark.timeout(240)
async def test_a_timeout_holds_against_a_fork_bomb(make_config: MakeConfig) -> None:
    """A fork bomb under ``timeout=3`` in a 256 MiB guest, each of its processes in a session of its
    own (out of the process group): the call returns by the deadline plus the grace, says how the
    command ended, and the guest answers again afterwards with the bomb gone."""
    bomb = ["sh", "-c", 'echo "setsid sh /tmp/bomb & exec sh /tmp/bomb" > /tmp/bomb; exec sh /tmp/bomb']
    async with Sandbox(make_config(memory_mib=256), stop_timeout=5) as sb:
        for how in ("exec", "process"):
            started = anyio.current_time()
            with anyio.fail_after(60):
                try:
                    if how == "exec":
                        result = await sb.exec(bomb, timeout=3)
                        assert result.timed_out
                    else:
                        async with sb.process(bomb, timeout=3) as p:
                            await p.wait()
                            assert p.timed_out
                    outcome = "killed"
                except GuestUnresponsive:
                    outcome = "unconfirmed"
            took = anyio.current_time() - started
            assert took < 3 + TIMEOUT_GRACE + SLACK, f"{how}: returned after {took:.1f}s ({outcome})"
            with anyio.fail_after(60):
                while True:  # the guest comes back: the bomb is gone
                    try:
                        if not await running(sb, "/tmp/bomb", timeout=5):
                            break
                    except (GuestUnresponsive, GuestCommandFailed, GuestOSError):
                        pass  # still flooded: ps could not start or finish in time
                    await anyio.sleep(0.2)
            assert sb.state is SandboxState.RUNNING
    await assert_no_stray_tasks()


@pytest.mark.timeout(240)
async def test_a_timeout_holds_when_the_agent_stops_answering(make_config: MakeConfig) -> None:
    """The command SIGSTOPs the agent (its parent), and a helper it started resumes it a few
    seconds after the deadline: the call gives up at the deadline plus the grace with
    GuestUnresponsive; once the agent runs again the command is gone and the sandbox works."""
    stall = "sleep 0.5; kill -STOP $PPID; (sleep 7; kill -CONT $PPID) & sleep 1000"
    async with Sandbox(make_config(), stop_timeout=5) as sb:
        for how in ("exec", "process"):
            started = anyio.current_time()
            with anyio.fail_after(60), pytest.raises(GuestUnresponsive, match="did not answer") as caught:
                if how == "exec":
                    await sb.exec(["sh", "-c", stall], timeout=3)
                else:
                    async with sb.process(["sh", "-c", stall], timeout=3) as p:
                        await p.wait()
            took = anyio.current_time() - started
            assert took < 3 + TIMEOUT_GRACE + SLACK, f"{how}: returned after {took:.1f}s"
            assert caught.value.timeout == 3
            assert (await sb.exec(["true"], timeout=30)).ok  # the agent runs again
            assert await gone_soon(sb, "sleep 1000") == []
        assert sb.pending_waiters == 0

        # a process whose agent stops before it even started: start() has the host's deadline too
        stall_soon = "(sleep 0.3; kill -STOP $PPID; sleep 7; kill -CONT $PPID) </dev/null >/dev/null 2>&1 &"
        await sb.exec(["sh", "-c", stall_soon])
        while True:  # until the agent stops answering (nothing to wait on but its silence)
            with anyio.move_on_after(1) as silent:
                await sb.hypervisor.agent.ping()
            if silent.cancelled_caught:
                break
        started = anyio.current_time()
        with anyio.fail_after(60), pytest.raises(GuestUnresponsive):
            async with sb.process(["true"], timeout=2):
                pass
        assert anyio.current_time() - started < 2 + TIMEOUT_GRACE + SLACK
        assert (await sb.exec(["true"], timeout=30)).ok
        assert sb.pending_waiters == 0
    await assert_no_stray_tasks()
