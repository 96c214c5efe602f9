"""Warm pools: ready sandboxes handed out once, refilled in the background with bounded starts,
failed starts retried with a backoff, and nothing left behind on any path (cancellation swept)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from tests.conftest import assert_no_stray_tasks, qemu_processes
from tests.test_cancellation import Sweep, cancel_after_steps
from vmctl import (
    ExecResult,
    PoolError,
    PoolEvent,
    PoolEventKind,
    PoolTimeout,
    SandboxConfig,
    SandboxPool,
    SandboxState,
    guest,
)
from vmctl.testing import FakeQemu, fake_config

K = PoolEventKind


async def test_acquire_hands_out_a_ready_sandbox_once_and_the_pool_refills(tmp_path: Path) -> None:
    events: list[PoolEvent] = []
    fake = FakeQemu(exec_handler=lambda argv, stdin: ExecResult(0, argv[0], b""))
    async with SandboxPool(fake_config(tmp_path), size=2, template=False, backend=fake,
                           on_event=events.append) as pool:  # fmt: skip
        await pool.wait_ready(timeout=5)
        assert (pool.ready, pool.in_use, pool.starting) == (2, 0, 0)
        seen = []
        for _ in range(3):
            async with pool.acquire(timeout=5) as sb:
                assert sb.state is SandboxState.RUNNING and pool.in_use == 1
                assert (await sb.exec(["hello"])).stdout == b"hello"
                seen.append(sb)
            assert sb.state in (SandboxState.RUNNING, SandboxState.STOPPING, SandboxState.STOPPED)
            await pool.wait_ready(timeout=5)
        await anyio.wait_all_tasks_blocked()
        assert all(sb.state is SandboxState.STOPPED for sb in seen), "a released sandbox is destroyed"
        assert len({sb.id for sb in seen}) == 3, "never handed out twice"
        stats = pool.stats()
        assert (stats.ready, stats.in_use, stats.started, stats.failed) == (2, 0, 5, 0)
    kinds = [e.kind for e in events]
    assert kinds.count(K.ACQUIRED) == kinds.count(K.RELEASED) == 3
    assert kinds.count(K.STOPPED) == 5, "the pool's exit stopped the two ready ones too"
    acquired = next(e for e in events if e.kind is K.ACQUIRED)
    assert acquired.stats.in_use == 1 and acquired.sandbox_id == seen[0].id
    assert all(p.returncode is not None for p in fake.processes)
    await assert_no_stray_tasks()


async def test_starts_are_bounded_and_an_empty_pool_makes_acquire_wait(tmp_path: Path) -> None:
    starting = peak = 0

    def on_event(event: PoolEvent) -> None:
        nonlocal starting, peak
        starting += {K.STARTING: 1, K.READY: -1, K.START_FAILED: -1}.get(event.kind, 0)
        peak = max(peak, starting)

    fake = FakeQemu(ready_delay=0.2)
    async with SandboxPool(fake_config(tmp_path), size=3, max_concurrent_starts=1, template=False,
                           backend=fake, on_event=on_event) as pool:  # fmt: skip
        with pytest.raises(PoolTimeout, match="no pooled sandbox became ready within 0.05s"):
            async with pool.acquire(timeout=0.05):
                pytest.fail("nothing is ready yet")
        waited = anyio.current_time()
        async with pool.acquire(timeout=5) as sb:  # waits for the first start
            assert anyio.current_time() - waited > 0.1
            assert (await sb.exec(["true"])).ok
        await pool.wait_ready(timeout=10)
    assert peak == 1, "never more than max_concurrent_starts starts at once"
    await assert_no_stray_tasks()


async def test_failed_starts_are_reported_and_retried_with_backoff(tmp_path: Path) -> None:
    events: list[PoolEvent] = []
    fake = FakeQemu(ready_delay=None)  # never ready: every start times out
    async with SandboxPool(fake_config(tmp_path), size=1, template=False, backend=fake, start_timeout=0.05,
                           backoff=0.1, max_backoff=0.4, on_event=events.append) as pool:  # fmt: skip
        with pytest.raises(PoolTimeout) as info:
            async with pool.acquire(timeout=1.6):
                pytest.fail("no start succeeds")
        assert "did not report ready" in str(info.value.last_error)
        assert "last start failure" in str(info.value)
    starts = [e.at for e in events if e.kind is K.STARTING]
    failures = [e for e in events if e.kind is K.START_FAILED]
    assert 3 <= len(starts) <= 8, f"retried, not spinning: {len(starts)} starts in 1.6 s"
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps[0] >= 0.1 and max(gaps) >= 0.35, f"the backoff doubles up to max_backoff: {gaps}"
    assert "next start in 0.1s" in failures[0].detail and pool.stats().failed == len(failures)
    await assert_no_stray_tasks()


async def test_a_ready_sandbox_that_dies_is_replaced(tmp_path: Path) -> None:
    events: list[PoolEvent] = []
    died = anyio.Event()

    def on_event(event: PoolEvent) -> None:
        events.append(event)
        if event.kind is K.DIED:
            died.set()

    fake = FakeQemu()
    async with SandboxPool(fake_config(tmp_path), size=1, template=False, backend=fake, on_event=on_event) as pool:
        await pool.wait_ready(timeout=5)
        fake.crash(-9, stderr="boom")
        with anyio.fail_after(5):
            await died.wait()
        await pool.wait_ready(timeout=5)
        async with pool.acquire(timeout=5) as sb:
            assert sb.id == "pool-1" and (await sb.exec(["true"])).ok
    assert [e.sandbox_id for e in events if e.kind is K.DIED] == ["pool-0"]
    await assert_no_stray_tasks()


async def test_an_error_in_the_pool_block_stops_everything_and_waiters_are_told(tmp_path: Path,
                                                                                runtime_dir: Path) -> None:  # fmt: skip
    fake = FakeQemu(ready_delay=30)
    outcome: list[BaseException] = []

    async def waiter(pool: SandboxPool) -> None:
        try:
            async with pool.acquire():
                pass
        except PoolError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        with pytest.raises(RuntimeError, match="user error"):
            async with SandboxPool(fake_config(tmp_path), size=2, template=False, backend=fake) as pool:
                tg.start_soon(waiter, pool)
                await anyio.wait_all_tasks_blocked()  # the waiter is blocked in acquire (no member is ready)
                raise RuntimeError("user error")
    assert len(outcome) == 1 and "closed" in str(outcome[0])
    assert list(runtime_dir.iterdir()) == []
    assert fake.processes and all(p.returncode is not None for p in fake.processes)
    with pytest.raises(PoolError, match="closed"):
        async with pool.acquire():
            pass
    await assert_no_stray_tasks()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    from vmctl import BlockDevice

    with pytest.raises(PoolError, match="size"):
        SandboxPool(fake_config(tmp_path), size=0)
    with pytest.raises(PoolError, match="max_concurrent_starts"):
        SandboxPool(fake_config(tmp_path), max_concurrent_starts=0)
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 512)
    with pytest.raises(PoolError, match="writable disks"):
        SandboxPool(fake_config(tmp_path, devices=[BlockDevice(path=disk)]))
    assert SandboxPool(fake_config(tmp_path)).template and not SandboxPool(fake_config(tmp_path, machine="microvm")).template


async def test_cancelling_the_pool_at_every_step(tmp_path: Path, runtime_dir: Path) -> None:
    """Cancel a pool's whole life (enter, fill, acquire, exec, release, exit) after k steps."""
    config = fake_config(tmp_path)
    sweep = Sweep(tmp_path, runtime_dir)

    async def trial(steps: int) -> bool:
        fake = FakeQemu()

        async def life() -> None:
            async with SandboxPool(config, size=2, template=False, backend=fake) as pool:
                await pool.wait_ready()
                async with pool.acquire() as sb:
                    await sb.exec(["true"])

        finished = await cancel_after_steps(life, steps)
        assert all(p.returncode is not None for p in fake.processes), f"k={steps}: a fake QEMU outlived the pool"
        return finished

    last = await sweep.run(trial)
    assert last > 20


async def test_cancelling_an_acquire_at_every_step_loses_no_sandbox(tmp_path: Path, runtime_dir: Path) -> None:
    """An acquire cancelled while it waits (or just as it gets one) leaves the pool whole."""
    config = fake_config(tmp_path)
    fake = FakeQemu(ready_delay=0.01)
    async with SandboxPool(config, size=1, template=False, backend=fake) as pool:
        for steps in range(0, 400, 7):
            await pool.wait_ready(timeout=5)

            async def acquire_and_hold() -> None:
                async with pool.acquire() as sb:
                    assert sb.state is SandboxState.RUNNING
                    await anyio.sleep(0.001)

            await cancel_after_steps(acquire_and_hold, steps)
            stats = pool.stats()
            assert stats.in_use == 0, f"k={steps}: a cancelled acquire kept its sandbox"
            assert stats.ready + stats.starting == 1, f"k={steps}: {stats}"
        taken = pool.stats().started
    assert taken > 10, "the sweep reached the acquire's success path"
    assert list(runtime_dir.iterdir()) == []
    await assert_no_stray_tasks()


@pytest.mark.qemu
async def test_a_real_warm_pool_hands_out_fresh_clones(assets: guest.GuestAssets, runtime_dir: Path) -> None:
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, memory_mib=256)
    events: list[PoolEvent] = []
    async with SandboxPool(config, size=2, on_event=events.append) as pool:
        assert pool.template and pool.template_seconds is not None
        await pool.wait_ready(timeout=120)
        async with pool.acquire(timeout=5) as first:
            await first.exec(["sh", "-c", "echo mine > /root/x"], check=True)
        started = anyio.current_time()
        async with pool.acquire(timeout=60) as second:
            answered = await second.exec(["cat", "/root/x"])
            warm = anyio.current_time() - started
            assert second.id != first.id and answered.exit_code == 1, "a new clone, not the used one"
        assert warm < 2.0, f"a warm acquire answers at once, not after a start ({warm:.2f}s)"
        await pool.wait_ready(timeout=60)
    assert first.state is SandboxState.STOPPED and second.state is SandboxState.STOPPED
    assert [e.kind for e in events][0] is K.TEMPLATE
    assert qemu_processes(str(runtime_dir)) == []


@pytest.mark.qemu
async def test_cancelling_a_real_pool_while_the_template_boots_or_the_clones_start(
    assets: guest.GuestAssets, runtime_dir: Path
) -> None:
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, memory_mib=256)
    with anyio.move_on_after(1.0) as scope:  # QEMU runs, the template's guest is booting
        async with SandboxPool(config, size=2):
            pytest.fail("the template takes longer than that")
    assert scope.cancelled_caught
    assert qemu_processes(str(runtime_dir)) == [] and list(runtime_dir.iterdir()) == []

    kinds: list[PoolEventKind] = []
    with anyio.CancelScope() as scope:

        def on_event(event: PoolEvent) -> None:
            kinds.append(event.kind)
            if event.kind is K.STARTING and kinds.count(K.STARTING) == 2:
                scope.cancel()  # both clones are starting (one may be ready already)

        async with SandboxPool(config, size=2, on_event=on_event) as pool:
            await pool.wait_ready()
            pytest.fail("cancelled while the clones start")
    assert kinds[0] is K.TEMPLATE and kinds.count(K.STOPPED) == 2
    assert qemu_processes(str(runtime_dir)) == [] and list(runtime_dir.iterdir()) == []
