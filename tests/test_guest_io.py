"""Guest I/O on real QEMU: processes with live streams, file transfers, the C agent.

Three boots: one for processes, one for files, one disk-image guest that is then killed under
running streams. Nothing here sleeps in place of an event: each wait is for something the
guest or the controller reports.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from tests.conftest import assert_no_stray_tasks
from vmctl import GuestOSError, Sandbox, SandboxConfig, SandboxFailed, SandboxState, VmctlTimeout, guest

pytestmark = pytest.mark.qemu
MakeConfig = Callable[..., SandboxConfig]


async def gone_in_guest(sb: Sandbox, pid: int) -> bool:
    """Wait (bounded) until ``pid`` has left the guest's /proc; whether it did."""
    with anyio.move_on_after(20):
        while (await sb.exec(["test", "-e", f"/proc/{pid}"])).exit_code == 0:  # noqa: ASYNC110 - polls the guest
            await anyio.sleep(0.05)
        return True
    return False


async def test_processes_stream_while_they_run(make_config: MakeConfig) -> None:
    async with Sandbox(make_config()) as sb:
        r = await sb.exec(["sh", "-c", 'pwd; echo "$GREETING"'], env={"GREETING": "hi there"}, cwd="/proc/self")
        assert r.ok and r.stdout.splitlines()[1] == b"hi there" and r.stdout.startswith(b"/proc/")

        # output arrives before the command ends: it waits for stdin after its first line
        script = 'echo first; read line; echo "got $line"; echo done >&2'
        async with sb.process(["sh", "-c", script]) as p:
            assert p.pid > 1
            assert await p.stdout.receive() == b"first\n"
            assert p.returncode is None
            await p.stdin.send(b"hello\n")
            await p.stdin.aclose()
            assert await p.stdout.read_all() == b"got hello\n"
            assert await p.stderr.read_all() == b"done\n"
            assert await p.wait() == 0

        # a few MiB of stdin, streamed and checked in the guest
        data = os.urandom(3 * 1024 * 1024 + 17)
        async with sb.process(["sha256sum"]) as p:
            for pos in range(0, len(data), 200_000):
                await p.stdin.send(data[pos:pos + 200_000])
            await p.stdin.aclose()
            assert (await p.stdout.read_all()).split()[0].decode() == hashlib.sha256(data).hexdigest()
            assert await p.wait() == 0

        # a signal reaches the command
        trap = 'trap "echo caught; exit 3" TERM; echo ready; while :; do sleep 0.1; done'
        async with sb.process(["sh", "-c", trap]) as p:
            assert await p.stdout.receive() == b"ready\n"
            await p.signal(signal.SIGTERM)
            assert await p.stdout.read_all() == b"caught\n"
            assert await p.wait() == 3

        # many at once, each with its own streams
        async def one(i: int, results: dict[int, bytes]) -> None:
            async with sb.process(["sh", "-c", 'read x; echo "$x-$0"; echo "e$0" >&2', str(i)]) as p:
                await p.stdin.send(f"in{i}\n".encode())
                await p.stdin.aclose()
                results[i] = await p.stdout.read_all() + await p.stderr.read_all()
                assert await p.wait() == 0

        results: dict[int, bytes] = {}
        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(one, i, results)
        assert results == {i: f"in{i}-{i}\ne{i}\n".encode() for i in range(12)}

        # leaving the block (here: cancelled) kills the command in the guest
        with anyio.move_on_after(30) as scope:
            async with sb.process(["sh", "-c", "echo $$; exec sleep 1000"]) as p:
                pid = int(await p.stdout.receive())
                ps = (await sb.exec(["ps"])).text
                assert any(line.split()[0] == str(pid) and "sleep" in line for line in ps.splitlines()[1:])
                scope.cancel()
        assert await gone_in_guest(sb, pid), "the cancelled command still runs in the guest"

        # a guest-side timeout kills it and says so
        async with sb.process(["sleep", "100"], timeout=0.5) as p:
            assert await p.wait() == 128 + signal.SIGKILL and p.timed_out
        assert sb.pending_waiters == 0
    await assert_no_stray_tasks()


async def test_files_round_trip_with_modes_and_guest_errors(make_config: MakeConfig, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "a.txt").write_bytes(b"alpha\n")
    (tree / "sub" / "run.sh").write_bytes(b"#!/bin/sh\necho run\n")
    (tree / "sub" / "deeper" / "big.bin").write_bytes(os.urandom(2 * 1024 * 1024 + 3))
    (tree / "sub" / "empty").write_bytes(b"")
    os.chmod(tree / "a.txt", 0o600)
    os.chmod(tree / "sub" / "run.sh", 0o755)
    os.chmod(tree / "sub" / "deeper", 0o750)
    async with Sandbox(make_config()) as sb:
        await sb.write_file("/root/note", b"hello\x00world", mode=0o640)
        assert await sb.read_file("/root/note") == b"hello\x00world"
        assert (await sb.exec(["stat", "-c", "%a", "/root/note"])).text.strip() == "640"

        assert await sb.upload(tree, "/root/tree") == []
        modes = (await sb.exec(["sh", "-c", "cd /root/tree && stat -c '%n %a' a.txt sub/run.sh sub/deeper"])).text
        assert modes.split("\n")[:3] == ["a.txt 600", "sub/run.sh 755", "sub/deeper 750"]
        assert (await sb.exec(["/root/tree/sub/run.sh"])).stdout == b"run\n"
        out = tmp_path / "back"
        assert await sb.download("/root/tree", out) == []
        for path in tree.rglob("*"):
            copy = out / path.relative_to(tree)
            assert copy.stat().st_mode == path.stat().st_mode, path
            if path.is_file():
                assert copy.read_bytes() == path.read_bytes(), path
        await sb.download("/root/tree/a.txt", tmp_path / "single")
        assert (tmp_path / "single").read_bytes() == b"alpha\n" and (tmp_path / "single").stat().st_mode & 0o777 == 0o600

        with pytest.raises(GuestOSError, match="No such file or directory") as info:
            await sb.read_file("/no/such/file")
        assert info.value.reason == "No such file or directory"
        with pytest.raises(GuestOSError, match="No such file or directory"):
            await sb.write_file("/no/such/dir/file", b"x")
        with pytest.raises(GuestOSError, match="Is a directory"):
            await sb.read_file("/root")
        with pytest.raises(GuestOSError, match="Permission denied") as info:
            await sb.write_file("/sys/vmctl-test", b"x")  # sysfs refuses new files even to root
        assert info.value.reason == "Permission denied"
        await sb.exec(["sh", "-c", "mkdir -p /mnt/small && mount -t tmpfs -o size=64k tmpfs /mnt/small"], check=True)
        with pytest.raises(GuestOSError, match="No space left on device"):
            await sb.write_file("/mnt/small/full", bytes(1024 * 1024))
        assert (await sb.exec(["ls", "-A", "/mnt/small"])).stdout == b"", "no temporary file is left"

        # a cancelled upload leaves nothing under the final name (and its temporary file goes)
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(24 * 1024 * 1024))
        upload_scope = anyio.CancelScope()

        async def upload() -> None:
            with upload_scope:
                await sb.upload(big, "/root/big.bin")

        async with anyio.create_task_group() as tg:
            tg.start_soon(upload)
            with anyio.fail_after(60):
                while b".big.bin.vmctl-" not in (await sb.exec(["ls", "-A", "/root"])).stdout:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            upload_scope.cancel()
        assert upload_scope.cancelled_caught, "the upload was still under way when cancelled"
        with anyio.fail_after(20):
            while b"big.bin" in (await sb.exec(["ls", "-A", "/root"])).stdout:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        assert sb.pending_waiters == 0
    assert not list(tmp_path.glob(".*vmctl-*")), "no partial download is left"
    await assert_no_stray_tasks()


async def test_disk_image_guest_and_a_failing_sandbox_fails_every_stream(make_config: MakeConfig,
                                                                          tmp_path: Path) -> None:  # fmt: skip
    assets = await guest.ensure_default_assets(image=True)
    assert assets.image is not None
    image = tmp_path / "root.img"
    shutil.copyfile(assets.image, image)
    async with Sandbox(make_config(image=image)) as sb:
        assert (await sb.exec(["cat", "/etc/vmctl-disk-root"])).ok, "the agent runs from the disk root"
        errors: list[BaseException] = []
        async with sb.process(["cat"]) as reader, sb.process(["sh", "-c", "echo up; exec sleep 1000"]) as other:
            assert await other.stdout.receive() == b"up\n"

            async def expect_failure(call: Callable[[], Awaitable[object]]) -> None:
                try:
                    await call()
                except BaseException as exc:  # noqa: BLE001 - collected and checked below
                    errors.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(expect_failure, reader.stdout.receive)
                tg.start_soon(expect_failure, other.wait)
                tg.start_soon(expect_failure, other.stderr.receive)
                await anyio.wait_all_tasks_blocked()
                assert sb.pid is not None
                os.kill(sb.pid, signal.SIGKILL)
        assert len(errors) == 3 and all(isinstance(e, SandboxFailed) for e in errors), errors
    await assert_no_stray_tasks()


@pytest.mark.timeout(120)
async def test_a_guest_query_to_a_stopped_agent_times_out(make_config) -> None:
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


@pytest.mark.timeout(180)
async def test_the_agent_answers_every_unknown_request_with_an_error(make_config) -> None:
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
