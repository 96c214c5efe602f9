"""Guest I/O on real QEMU: processes with live streams, file transfers, the C agent.

Three boots: one for processes, one for files, one disk-image guest that is then killed under
running streams; then one boot each for what a hostile guest (root inside) can make a download
or an upload do: modes, special files and links, a symlink swapped in on the host mid-download,
destinations that exist, and an agent replaced by tests/hostile_files_agent.c. Nothing here
sleeps in place of an event: each wait is for something the guest or the controller reports.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from tests.conftest import assert_no_stray_tasks
from vmctl import (
    GuestError,
    GuestOSError,
    InvalidArgument,
    Sandbox,
    SandboxConfig,
    SandboxFailed,
    SandboxState,
    VmctlTimeout,
    guest,
)

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
        assert await sb.download("/root/tree", out, keep_modes=True) == []  # whatever the umask
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


def host_modes(top: Path) -> dict[str, int]:
    """``{relative path: st_mode & 0o7777}`` for ``top`` ("") and everything under it."""
    found = {"": top.lstat().st_mode & 0o7777}
    for path in top.rglob("*"):
        found[str(path.relative_to(top))] = path.lstat().st_mode & 0o7777
    return found


HOSTILE_MODES = (
    "mkdir -p /root/h/sdir /root/h/wdir && cd /root/h && echo x > suid && echo y > sgid && echo z > plain"
    " && echo w > wdir/inner && chmod 4755 suid && chmod 2755 sgid && chmod 644 plain && chmod 1777 sdir"
    " && chmod 777 wdir && chmod 666 wdir/inner && chmod 6777 /root/h"
)


async def test_a_download_drops_setuid_setgid_and_sticky_bits_and_applies_the_umask(make_config: MakeConfig,
                                                                                    tmp_path: Path) -> None:  # fmt: skip
    async with Sandbox(make_config()) as sb:
        await sb.exec(["sh", "-c", HOSTILE_MODES], check=True)
        guest = (await sb.exec(["stat", "-c", "%a %n", "/root/h/suid", "/root/h/sgid", "/root/h/sdir"])).text
        assert guest.split("\n")[:3] == ["4755 /root/h/suid", "2755 /root/h/sgid", "1777 /root/h/sdir"]
        old = os.umask(0o022)
        try:
            for umask in (0o022, 0o077):
                os.umask(umask)
                out = tmp_path / f"umask{umask:03o}"
                assert await sb.download("/root/h", out) == []
                assert host_modes(out) == {
                    "": 0o777 & ~umask, "suid": 0o755 & ~umask, "sgid": 0o755 & ~umask, "plain": 0o644 & ~umask,
                    "sdir": 0o777 & ~umask, "wdir": 0o777 & ~umask, "wdir/inner": 0o666 & ~umask,
                }, f"umask {umask:03o}"
                assert all(p.lstat().st_uid == os.getuid() for p in out.rglob("*"))
                assert (out / "suid").read_bytes() == b"x\n"
                single = tmp_path / f"suid{umask:03o}"
                await sb.download("/root/h/suid", single)
                assert single.stat().st_mode & 0o7777 == 0o755 & ~umask

            # the guest's modes when asked for, still without setuid, setgid or sticky bits
            os.umask(0o077)
            kept = tmp_path / "kept"
            assert await sb.download("/root/h", kept, keep_modes=True) == []
            assert host_modes(kept) == {
                "": 0o777, "suid": 0o755, "sgid": 0o755, "plain": 0o644, "sdir": 0o777, "wdir": 0o777,
                "wdir/inner": 0o666,
            }
            await sb.download("/root/h/sgid", tmp_path / "sgid-kept", keep_modes=True)
            assert (tmp_path / "sgid-kept").stat().st_mode & 0o7777 == 0o755
        finally:
            os.umask(old)
    await assert_no_stray_tasks()


SPECIAL_FILES = (
    "mkdir -p /root/s/sub && cd /root/s && echo nl > 'new\nline' && echo dash > ./-dash && echo in > sub/file"
    " && ln -s /etc/passwd link && ln -s / rootlink && ln -s ../../../../../tmp up && ln -s /root sub/dirlink"
    " && mknod chr c 1 3 && mknod blk b 7 0 && mkfifo fifo"
    # a socket: busybox syslogd binds /dev/log, here /root/s in a mount namespace of its own
    " && unshare -m sh -c 'mount --bind /root/s /dev && syslogd -O /tmp/syslog.out"
    " && while [ ! -S /dev/log ]; do usleep 10000; done && killall -9 syslogd' && mv log sock"
)


async def test_a_download_skips_and_reports_links_devices_fifos_and_sockets(make_config: MakeConfig,
                                                                            tmp_path: Path) -> None:  # fmt: skip
    victim = tmp_path / "victim"
    victim.write_bytes(b"host data\n")
    async with Sandbox(make_config()) as sb:
        await sb.exec(["sh", "-c", SPECIAL_FILES], check=True)
        out = tmp_path / "out"
        skipped = await sb.download("/root/s", out)
        assert sorted(skipped) == sorted(f"/root/s/{n}" for n in
                                         ["link", "rootlink", "up", "sub/dirlink", "chr", "blk", "fifo", "sock"])
        # only files and directories reach the host; a name with a newline is kept as it is
        kinds = {str(p.relative_to(out)): stat.S_IFMT(p.lstat().st_mode) for p in out.rglob("*")}
        assert kinds == {"new\nline": stat.S_IFREG, "-dash": stat.S_IFREG, "sub": stat.S_IFDIR,
                         "sub/file": stat.S_IFREG}
        assert (out / "new\nline").read_bytes() == b"nl\n"

        # a single file downloaded onto a host symlink replaces the link, never writes through it
        link = tmp_path / "link"
        link.symlink_to(victim)
        await sb.download("/root/s/sub/file", link)
        assert not link.is_symlink() and link.read_bytes() == b"in\n"
        assert victim.read_bytes() == b"host data\n"
        # a tree is never downloaded onto anything that exists, a dangling symlink included
        dangling = tmp_path / "dangling"
        dangling.symlink_to(tmp_path / "nowhere")
        with pytest.raises(InvalidArgument, match="exists"):
            await sb.download("/root/s", dangling)
        # a guest special file named directly is refused, not opened
        for special in ("fifo", "chr", "sock"):
            with pytest.raises(InvalidArgument, match="neither a file nor a directory"):
                await sb.download(f"/root/s/{special}", tmp_path / special)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "link", "out", "victim"]
    await assert_no_stray_tasks()


async def test_a_symlink_swapped_into_a_download_under_way_is_never_followed(make_config: MakeConfig,
                                                                              tmp_path: Path) -> None:  # fmt: skip
    """Someone on the host replaces a directory the download has finished with a symlink to a
    directory of theirs, while the download still runs: the download never goes through it."""
    size = 32 * 1024 * 1024
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (victim / "keep").write_bytes(b"mine\n")
    out = tmp_path / "out"
    async with Sandbox(make_config(memory_mib=384)) as sb:
        await sb.exec(["sh", "-c", "mkdir -p /root/r/a /root/r/b && chmod 777 /root/r/a /root/r/b"
                       f" && dd if=/dev/zero of=/root/r/a/big bs=1M count={size >> 20} 2>/dev/null"
                       " && cp /root/r/a/big /root/r/b/big"], check=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: sb.download("/root/r", out, keep_modes=True))
            with anyio.fail_after(60):
                while True:  # one directory done, the other's file under way: stop the guest there
                    sizes = {d: max([p.stat().st_size for p in (part / d).glob("*big*")], default=-1)
                             for part in tmp_path.glob(".out.vmctl-*") for d in "ab"}
                    done = [d for d, n in sizes.items() if n == size]
                    if done and any(0 <= n < size // 2 for n in sizes.values()):
                        await sb.pause()
                        break
                    await anyio.sleep(0.005)
            [partial] = tmp_path.glob(".out.vmctl-*")
            assert any(0 <= p.stat().st_size < size for p in partial.glob("*/*big*")), "still under way"
            (partial / done[0]).rename(tmp_path / "moved")
            (partial / done[0]).symlink_to(victim)
            await sb.resume()
        assert (out / ("b" if done[0] == "a" else "a") / "big").stat().st_size == size
    assert victim.stat().st_mode & 0o7777 == 0o700, "the download changed a directory through a symlink"
    assert sorted(p.name for p in victim.iterdir()) == ["keep"] and (victim / "keep").read_bytes() == b"mine\n"
    await assert_no_stray_tasks()


async def test_an_upload_replaces_files_merges_into_directories_and_refuses_a_kind_change(make_config: MakeConfig,
                                                                                          tmp_path: Path) -> None:  # fmt: skip
    tree = tmp_path / "tree"
    (tree / "adir").mkdir(parents=True)
    (tree / "same").write_bytes(b"new\n")
    (tree / "added").write_bytes(b"added\n")
    (tree / "adir" / "x").write_bytes(b"x\n")
    os.chmod(tree, 0o755)
    os.chmod(tree / "adir", 0o755)
    async with Sandbox(make_config()) as sb:
        await sb.exec(["sh", "-c", "mkdir -p /root/u/adir && cd /root/u && echo old > same && echo keep > keep"
                       " && echo secret > /root/secret && ln -s /root/secret ln && mkdir isdir && echo f > afile"
                       " && chmod 700 /root/u && chmod 750 adir"], check=True)

        async def listing(*paths: str) -> list[str]:
            return (await sb.exec(["stat", "-c", "%a %n", *paths])).text.split("\n")[:len(paths)]

        # a tree into a directory that exists: merged, files of the same name replaced, the rest
        # kept, and the directories that were there keep their modes
        assert await sb.upload(tree, "/root/u") == []
        assert await sb.read_file("/root/u/same") == b"new\n"
        assert await sb.read_file("/root/u/keep") == b"keep\n"
        assert await sb.read_file("/root/u/adir/x") == b"x\n"
        assert await listing("/root/u", "/root/u/adir") == ["700 /root/u", "750 /root/u/adir"]

        # a file onto a file or a symlink replaces it (the link itself, not what it points to)
        one = tmp_path / "one"
        one.write_bytes(b"one\n")
        await sb.upload(one, "/root/u/ln")
        assert (await sb.exec(["test", "-L", "/root/u/ln"])).exit_code == 1
        assert await sb.read_file("/root/secret") == b"secret\n"

        # a file never replaces a directory, a tree never replaces a file: refused, nothing changed
        with pytest.raises(GuestOSError, match="Is a directory") as refused:
            await sb.upload(one, "/root/u/isdir")
        assert refused.value.errno == errno.EISDIR
        with pytest.raises(GuestOSError, match="exists and is not a directory") as refused:
            await sb.upload(tree, "/root/u/afile")
        assert refused.value.errno == errno.ENOTDIR
        assert await sb.read_file("/root/u/afile") == b"f\n"
        assert (await sb.exec(["sh", "-c", "ls -A /root/u/isdir; ls -A /root/u | grep vmctl"])).stdout == b""
    await assert_no_stray_tasks()


async def test_a_hostile_agent_cannot_make_a_download_escape_its_target_or_plant_modes(make_config: MakeConfig,
                                                                                       tmp_path: Path) -> None:  # fmt: skip
    """The real agent replaced, as root in the guest, by one that lists what no file system
    holds (tests/hostile_files_agent.c says what it answers)."""
    binary = tmp_path / "hostile"
    await anyio.run_process(["gcc", "-static", "-O2", "-o", str(binary), str(Path(__file__).with_name("hostile_files_agent.c"))])
    escaped = Path("/tmp/escaped")
    escaped.unlink(missing_ok=True)
    async with Sandbox(make_config()) as sb:
        assert await sb.upload(binary, "/root/hostile") == []
        with pytest.raises(GuestError, match="restarted"):  # the hostile agent's READY ends this call
            await sb.exec(["sh", "-c", "mv /root/hostile /sbin/vmctl-agent && kill -9 $(pidof vmctl-agent)"])
        old = os.umask(0o022)
        try:
            out = tmp_path / "out"
            assert await sb.download("/modes", out) == ["/modes/odd"]  # a kind it does not know: skipped
            assert host_modes(out) == {"": 0o755, "f": 0o755, "d": 0o755}, "mode 0xffffffff became"
            assert (out / "f").read_bytes() == b"hostile\n"
            assert await sb.download("/modes", tmp_path / "kept", keep_modes=True) == ["/modes/odd"]
            assert host_modes(tmp_path / "kept") == {"": 0o777, "f": 0o777, "d": 0o777}
            for remote, refusal in [("/dup", "listed 'twice' twice"), ("/dotdot", "malformed listing"),
                                    ("/slash", "malformed listing"), ("/deep", "deeper than 128 directories"),
                                    ("/long", "a name of 300 bytes")]:  # fmt: skip
                with pytest.raises(GuestError, match=refusal):
                    await sb.download(remote, tmp_path / "refused")
        finally:
            os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile", "kept", "out"], "a partial download is left"
    assert not escaped.exists()
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
    from vmctl.agent import protocol as proto

    sandbox_id = "m1probe"
    async with Sandbox(make_config(), id=sandbox_id, detached=True) as sb:
        agent_socket = sb.run_dir / "agent.sock"  # type: ignore[operator]
    replies: list[tuple[int, int, bytes]] = []
    try:
        with anyio.fail_after(60):
            async with await anyio.connect_unix(agent_socket) as stream:
                await stream.send(b"".join(proto.pack(0x3E, n) for n in (1, 2, 3)) + proto.pack(proto.FrameType.PING, 4))
                buffer = b""
                while not any(kind == proto.FrameType.PONG for kind, _, _ in replies):
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
    errs = sorted((rid, proto.parse_error(payload)[1]) for kind, rid, payload in replies if kind == proto.FrameType.ERROR)
    assert errs == [(n, "unknown request type 0x3e") for n in (1, 2, 3)], replies
