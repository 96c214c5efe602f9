"""Regression tests for the bugs and suspicions of the structure issue (a-m). Each test states
the expected behaviour; each failed before its fix, for the reason given in its docstring."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio
import pytest

from vmctl import (
    ConfigError,
    ExecResult,
    GuestCommandFailed,
    Sandbox,
    SandboxConfig,
    SandboxFailed,
    SandboxState,
    VmctlTimeout,
)
from vmctl.testing import FakeQemu, default_exec, fake_config

VMCTL = str(Path(sys.executable).with_name("vmctl"))
TRANSITION_BUFFER_BOUND = 1000  # proposed: a subscriber's buffer holds as many as `history` keeps


def process_alive(pid: int | None) -> bool:
    """Whether ``pid`` is a live (non-zombie) process, read from /proc as a user would."""
    if pid is None:
        return False
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def cli_env() -> dict[str, str]:
    return dict(os.environ)


# -- (a) a failed detached sandbox leaves QEMU running --------------------------------------------


@pytest.mark.timeout(180)
async def test_a_failed_detached_sandbox_leaves_no_qemu_and_no_record(make_config, monkeypatch) -> None:
    """The guest panics inside a detached sandbox's block: SandboxFailed is raised, and since the
    block ended with an exception nothing may be left behind (README: "Leaving it with an
    exception stops it"). Base: QEMU (paused by panic=pause) keeps running and its record stays."""
    state_root = Path(tempfile.mkdtemp(prefix="vs-", dir="/tmp"))  # short: sockets live there
    monkeypatch.setenv("VMCTL_STATE_DIR", str(state_root / "d"))
    pid = None
    try:
        with pytest.raises(SandboxFailed):
            async with Sandbox(make_config(), id="x", detached=True) as sb:
                pid = sb.pid
                await sb.exec(["sh", "-c", "echo c > /proc/sysrq-trigger"])
        qemu_left = process_alive(pid)
        ps = await anyio.run_process([VMCTL, "ps", "--json"], env=cli_env(), check=False)
        ps_out = ps.stdout.decode()
        listed = [row.get("id") for row in json.loads(ps_out or "[]")] if ps.returncode == 0 else ps.stderr
        assert not qemu_left, f"QEMU pid {pid} still runs after the detached sandbox failed; vmctl ps: {listed}"
        assert listed == [], f"vmctl ps still lists {listed}"
        leftovers = list((state_root / "d").rglob("*")) if (state_root / "d").exists() else []
        assert leftovers == [], f"left in the state dir: {leftovers}"
    finally:
        if process_alive(pid):
            os.kill(pid, 9)  # type: ignore[arg-type]
        shutil.rmtree(state_root, ignore_errors=True)


# -- (b) concurrent vCPU resizes race ---------------------------------------------------------------


@pytest.mark.timeout(300)
async def test_b_concurrent_vcpu_resizes_both_succeed(make_config) -> None:
    """resize_vcpus(n) and resize_vcpus(n + 1) at once: both succeed and the guest ends with the
    count of whichever finished last. Three rounds (2|3, 4|5, 6|7), each plugging new CPUs, since
    one round does not always hit the race. Base: both tasks plan from their own
    query-hotpluggable-cpus answer and one fails with QMPCommandError "Duplicate device ID 'cpuN'"."""
    async with Sandbox(make_config(vcpus=1, max_vcpus=7)) as sb:
        for low in (2, 4, 6):
            finished: list[int] = []
            errors: list[BaseException] = []

            async def resize(count: int, finished: list[int], errors: list[BaseException]) -> None:
                try:
                    await sb.resize_vcpus(count)
                    finished.append(count)
                except Exception as exc:  # noqa: BLE001 - collected and asserted below
                    errors.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(resize, low, finished, errors)
                tg.start_soon(resize, low + 1, finished, errors)
            assert errors == [], f"resize_vcpus({low}) | resize_vcpus({low + 1}): {errors!r}"
            online = await sb.guest_online_cpus()
            assert len(online) == finished[-1], f"guest has {online} online; the last resize to finish asked {finished[-1]}"


# -- (c) microvm templates -------------------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_c_microvm_template_is_refused_up_front(make_config, tmp_path) -> None:
    """capabilities() says microvm offers no templates, so boot_to_be_template on microvm must be
    refused with a ConfigError naming the field before any QEMU starts, writing nothing.
    Base: the config is accepted, QEMU boots, and both template files are written."""
    memory, devices_state = tmp_path / "tpl.mem", tmp_path / "tpl.state"
    error: ConfigError | None = None
    booted_pid = None
    try:
        config = make_config(machine="microvm", boot_to_be_template=True, memory_path=memory,
                             devices_state_path=devices_state)  # fmt: skip
        async with Sandbox(config) as sb:
            booted_pid = sb.pid
    except ConfigError as exc:
        error = exc
    written = sorted(p.name for p in tmp_path.iterdir())
    assert error is not None, f"accepted: QEMU pid {booted_pid} booted a microvm template and wrote {written}"
    assert {"boot_to_be_template", "machine"} & set(error.fields), error.fields
    assert booted_pid is None
    assert not memory.exists() and not devices_state.exists(), written


# -- (f) snapshot of a paused sandbox --------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_f_paused_sandbox_can_be_snapshotted_and_restored(make_config, tmp_path) -> None:
    """snapshot() of a paused sandbox works and leaves it paused; the snapshot restores and runs.
    Base: snapshot() raises IllegalTransition (it insists on a running sandbox)."""
    snap = tmp_path / "snap"
    async with Sandbox(make_config()) as sb:
        await sb.exec(["sh", "-c", "echo hello > /root/note"], check=True)
        await sb.pause()
        await sb.snapshot(snap)
        assert sb.state is SandboxState.PAUSED
    async with Sandbox.restore(snap) as restored:
        assert (await restored.exec(["cat", "/root/note"], check=True)).text == "hello\n"


# -- (g1) config: every problem of a TOML file at once ---------------------------------------------


def test_g1_from_toml_reports_every_bad_field(tmp_path) -> None:
    """Both `vcpus = 0` and `memory_mib = "lots"` are reported in one ConfigError.
    Base: a type error in memory_mib skips the size checks, so vcpus is not reported."""
    kernel, initrd = tmp_path / "k", tmp_path / "i"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    path = tmp_path / "sandbox.toml"
    path.write_text(f'[sandbox]\nkernel = "{kernel}"\ninitrd = "{initrd}"\nvcpus = 0\nmemory_mib = "lots"\n')
    with pytest.raises(ConfigError) as info:
        SandboxConfig.from_toml(path)
    assert "memory_mib" in info.value.fields
    assert "vcpus" in info.value.fields, info.value.fields


# -- (g2) vmctl run --config without kernel/initrd ------------------------------------------------


@pytest.mark.timeout(180)
def test_g2_run_config_defaults_to_the_default_guest(assets, tmp_path) -> None:
    """`vmctl run --config FILE` whose [sandbox] table has no kernel/initrd uses the default guest,
    as a fleet spec's [sandbox] does. Base: ConfigError demanding kernel and initrd, exit 2."""
    path = tmp_path / "sandbox.toml"
    path.write_text("[sandbox]\nmemory_mib = 256\n")
    proc = subprocess.run([VMCTL, "run", "--config", str(path), "--", "uname", "-r"],
                          capture_output=True, text=True, env=cli_env(), timeout=170)  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}"
    assert proc.stdout.strip() == assets.kernel_version


# -- (h) a command failure is not a lost connection --------------------------------------------------


@pytest.mark.timeout(60)
async def test_h_guest_command_failure_inside_a_call_is_raised_at_once(tmp_path) -> None:
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


# -- (k) guest queries have a deadline -------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_k_guest_query_on_a_hung_agent_times_out(make_config) -> None:
    """With the agent's main loop SIGSTOPped, guest_memory(timeout=2) raises VmctlTimeout.
    Base: guest_memory() takes no timeout (TypeError), and without one it waits forever."""
    async with Sandbox(make_config(), stop_timeout=3) as sb:
        # $PPID is the agent; the background child stops it after the exec's answer went out
        await sb.exec(["sh", "-c", "(sleep 0.2; kill -STOP $PPID) </dev/null >/dev/null 2>&1 &"], check=True)
        agent = sb.hypervisor.agent
        while True:  # until the agent stops answering (nothing to wait on but its silence)
            with anyio.move_on_after(1) as scope:
                await agent.ping()
            if scope.cancelled_caught:
                break
        with anyio.fail_after(30), pytest.raises(VmctlTimeout):
            await sb.guest_memory(timeout=2)  # type: ignore[call-arg]
        assert sb.state is SandboxState.RUNNING


# -- (l) each waiter gets its own exception ----------------------------------------------------------


@pytest.mark.timeout(120)
async def test_l_each_waiter_gets_its_own_exception(make_config) -> None:
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


# -- (m1) the agent's unknown-request replies share one file name ----------------------------------


@pytest.mark.timeout(180)
async def test_m1_agent_answers_every_unknown_request(make_config) -> None:
    """The agent protocol (vmctl/agentproto.py) promises an answer per request; an unknown frame
    type gets an ERROR frame for its id. Not reachable through Sandbox (vmctl only sends requests
    the agent knows, and holds the agent socket), so this speaks the protocol itself on a detached
    sandbox's agent socket once vmctl let go of it. Three unknown requests, then a PING: the
    agent answers in order, so PONG marks the end. Base (the shell agent): every unknown
    request's reply went through the same file, so replies were overwritten and lost."""
    from vmctl import agentproto as proto

    sandbox_id = "m1probe"
    async with Sandbox(make_config(), id=sandbox_id, detached=True) as sb:
        agent_socket = sb.run_dir / "agent.sock"  # type: ignore[operator]
    replies: list[tuple[int, int, bytes]] = []
    try:
        with anyio.fail_after(60):
            async with await anyio.connect_unix(agent_socket) as stream:
                await stream.send(b"".join(proto.pack(0x3E, n) for n in (1, 2, 3)) + proto.pack(proto.T.PING, 4))
                buffer = b""
                while not any(kind == proto.T.PONG for kind, _, _ in replies):
                    buffer += await stream.receive()
                    while len(buffer) >= proto.HEADER_SIZE:
                        length, kind, _, rid = proto.unpack_header(buffer[:proto.HEADER_SIZE])
                        if len(buffer) < proto.HEADER_SIZE + length:
                            break
                        replies.append((kind, rid, buffer[proto.HEADER_SIZE:proto.HEADER_SIZE + length]))
                        buffer = buffer[proto.HEADER_SIZE + length:]
    finally:
        async with Sandbox.attach(sandbox_id) as again:
            await again.stop()
    errs = sorted((rid, proto.parse_error(payload)[1]) for kind, rid, payload in replies if kind == proto.T.ERROR)
    assert errs == [(n, "unknown request type 0x3e") for n in (1, 2, 3)], replies


# -- (m2) a slow transitions() subscriber is bounded -----------------------------------------------


@pytest.mark.timeout(120)
async def test_m2_unread_transitions_subscriber_is_bounded(tmp_path) -> None:
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



# -- (i) a hotplug timeout bounds the whole call ------------------------------------------------------


async def test_i_hotplug_timeout_covers_the_wait_for_the_queue(tmp_path) -> None:
    """A hotplug behind another one that QEMU is slow to answer gives up at its own timeout with
    HotplugTimeout. Before: the timeout covered only the acknowledgement, so the call waited for
    the queue (here 20 s) however short its timeout. FakeQemu: a slow reply on demand."""
    from vmctl import BlockDevice, HotplugTimeout

    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    fake = FakeQemu(delays={"device_add": 20})
    async with Sandbox(fake_config(tmp_path, block_driver="virtio-blk"), backend=fake) as sb:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: sb.hotplug(BlockDevice(path=disk, id="slow"), timeout=None))
            await anyio.wait_all_tasks_blocked()
            with anyio.fail_after(10), pytest.raises(HotplugTimeout):
                await sb.hotplug(BlockDevice(path=disk, id="queued", read_only=True), timeout=0.5)
            tg.cancel_scope.cancel()
        assert "queued" not in {d.id for d in sb.devices}
        assert sb.pending_waiters == 0


# -- the event loop: QMP events are not kept for the session's life ---------------------------------


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
