"""The claims of SECURITY.md, one test each where a test can check them.

Most need no QEMU: the permissions vmctl gives what it creates, the refusal of directories it
must not trust, and how untrusted strings are validated or escaped are visible in the paths
module, the config validation and the argv ``build_command`` returns. Sockets are checked on a
running sandbox (the fake QEMU uses the same listening sockets); what only a real QEMU shows
(seccomp, uid, no shell, the exec path into the guest) is checked on one real boot.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import assert_no_stray_tasks
from vmctl import ConfigError, HostError, InvalidArgument, Sandbox, SandboxConfig, SandboxState
from vmctl.agent.client import AgentClient
from vmctl.agent.files import write_local
from vmctl.agent.protocol import parse_spawn, spawn_payload
from vmctl.core import paths
from vmctl.devices import BlockDevice, NetworkDevice, SerialPort
from vmctl.hypervisors.base import RunPaths
from vmctl.hypervisors.cmdline import SECCOMP, build_command
from vmctl.hypervisors.jail import jail_user
from vmctl.testing import FakeQemu, fake_config

MakeConfig = Callable[..., SandboxConfig]
UID = os.getuid()


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def argv_for(config: SandboxConfig, tmp_path: Path, *, sandbox_id: str = "sb-test",
             log_dir: Path | None = None) -> list[str]:  # fmt: skip
    """QEMU's argv for ``config`` as vmctl would launch it (accelerator and binary resolved)."""
    resolved = config.replace(accel="tcg", qemu_binary=Path(sys.executable))
    run_dir = tmp_path / "run"
    return build_command(resolved, RunPaths(run_dir, log_dir or run_dir), sandbox_id,
                         {"qmp": 3, "console": 4, "agent": 5})  # fmt: skip


def option_values(argv: list[str], flag: str) -> list[str]:
    return [value for option, value in zip(argv, argv[1:], strict=False) if option == flag]


def parse_qemu_opts(text: str) -> tuple[str, dict[str, str]]:
    """Split a QEMU option string the way QEMU does: ',' separates, ',,' is a literal comma."""
    parts, current, i = [], "", 0
    while i < len(text):
        if text[i] == "," and text[i + 1 : i + 2] == ",":
            current, i = current + ",", i + 2
        elif text[i] == ",":
            parts.append(current)
            current, i = "", i + 1
        else:
            current, i = current + text[i], i + 1
    parts.append(current)
    values: dict[str, str] = {}
    for part in parts[1:]:
        key, _, value = part.partition("=")
        assert key not in values, f"{key} appears twice in {text!r}: an injected option"
        values[key] = value
    return parts[0], values


def problems_of(**fields: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        fake_config(fields.pop("directory"), **fields)
    return {p.field: p.message for p in info.value.problems}


# -- directories and files vmctl creates ------------------------------------------------------------


def test_runtime_and_cache_dirs_are_created_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMCTL_RUNTIME_DIR", str(tmp_path / "deep" / "runtime"))
    monkeypatch.setenv("VMCTL_CACHE_DIR", str(tmp_path / "cache"))
    for made in (paths.runtime_dir(), paths.cache_dir()):
        assert mode(made) == 0o700 and made.stat().st_uid == UID
    run = paths.make_run_dir()
    assert run.parent == tmp_path / "deep" / "runtime" and run.name.startswith("sb-")
    assert mode(run) == 0o700 and run.stat().st_uid == UID


def test_an_existing_dir_of_ours_is_made_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    loose.chmod(0o777)
    monkeypatch.setenv("VMCTL_RUNTIME_DIR", str(loose))
    assert paths.runtime_dir() == loose and mode(loose) == 0o700


@pytest.mark.parametrize("variable", ["VMCTL_RUNTIME_DIR", "VMCTL_CACHE_DIR"])
def test_a_symlinked_dir_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    monkeypatch.setenv(variable, str(tmp_path / "link"))
    with pytest.raises(HostError, match="symlink"):
        paths.runtime_dir() if variable == "VMCTL_RUNTIME_DIR" else paths.cache_dir()
    assert list(real.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another uid needs root")
def test_a_foreign_owned_runtime_dir_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o700)
    os.chown(planted, 65534, 65534)
    monkeypatch.setenv("VMCTL_RUNTIME_DIR", str(planted))
    with pytest.raises(HostError, match="belongs to uid 65534"):
        paths.make_run_dir()
    assert list(planted.iterdir()) == []


async def test_a_planted_tmp_runtime_dir_fails_the_start_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without VMCTL_RUNTIME_DIR or XDG_RUNTIME_DIR the run dirs live in /tmp/vmctl-UID, which any
    local user could create first (here: a symlink to a directory they control)."""
    shared_tmp = tmp_path / "tmp"
    attacker = tmp_path / "attacker"
    shared_tmp.mkdir()
    attacker.mkdir()
    (shared_tmp / f"vmctl-{UID}").symlink_to(attacker)
    monkeypatch.delenv("VMCTL_RUNTIME_DIR")
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    fake = FakeQemu()
    sb = Sandbox(fake_config(tmp_path), backend=fake)
    with pytest.raises(HostError, match="symlink"):
        async with sb:
            pytest.fail("must not start in a planted directory")
    assert sb.state is SandboxState.FAILED and fake.processes == []
    assert list(attacker.iterdir()) == [], "nothing was created through the planted link"
    await assert_no_stray_tasks()


@pytest.mark.parametrize("planted", ["dangling-symlink", "file"])
def test_a_planted_dangling_symlink_or_file_is_refused_with_a_host_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planted: str
) -> None:
    path = tmp_path / "runtime"
    if planted == "file":
        path.write_text("not a directory")
    else:
        path.symlink_to(tmp_path / "not-yet")
    monkeypatch.setenv("VMCTL_RUNTIME_DIR", str(path))
    with pytest.raises(HostError, match="symlink or not a directory"):
        paths.runtime_dir()
    assert not (tmp_path / "not-yet").exists()


async def test_run_dir_sockets_and_log_dir_are_private(tmp_path: Path, runtime_dir: Path) -> None:
    log_dir = tmp_path / "logs"
    async with Sandbox(fake_config(tmp_path), backend=FakeQemu(), log_dir=log_dir) as sb:
        run_dir = sb.run_dir
        assert run_dir is not None and run_dir.parent == runtime_dir
        assert mode(run_dir) == 0o700 and run_dir.stat().st_uid == UID
        for name in ("qmp.sock", "console.sock", "agent.sock"):
            info = os.lstat(run_dir / name)
            assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600, name
            assert info.st_uid == UID
        assert mode(log_dir / sb.id) == 0o700, "the kept logs are private too"
    assert not run_dir.exists()


async def test_snapshot_dir_and_state_are_private(tmp_path: Path) -> None:
    replies = {"migrate-set-capabilities": {}, "migrate-set-parameters": {}, "getfd": {}, "migrate": {},
               "query-migrate": {"status": "completed"}}  # fmt: skip  # the fake has no migration of its own
    async with Sandbox(fake_config(tmp_path), backend=FakeQemu(replies=replies)) as sb:
        snap = await sb.snapshot(tmp_path / "snap")
    assert mode(snap) == 0o700
    assert mode(snap / "state") == 0o600, "the saved state holds all of the guest's memory"


@pytest.mark.qemu
async def test_a_template_memory_file_is_private(make_config: MakeConfig, tmp_path: Path) -> None:
    memory = tmp_path / "template.mem"
    config = make_config(boot_to_be_template=True, memory_path=memory, devices_state_path=tmp_path / "template.state")
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def stop_once_created() -> None:
                with anyio.fail_after(60):
                    while not memory.exists():  # noqa: ASYNC110 - QEMU creates it at start-up, no event says so
                        await anyio.sleep(0.005)
                scope.cancel()

            tg.start_soon(stop_once_created)
            async with Sandbox(config):
                await anyio.sleep_forever()
    assert memory.exists()
    assert mode(memory) & 0o077 == 0, f"guest memory file is {oct(mode(memory))}"


# -- QEMU's command line -------------------------------------------------------------------------------


def test_qemu_runs_sandboxed_and_without_defaults(tmp_path: Path) -> None:
    argv = argv_for(fake_config(tmp_path), tmp_path)
    assert option_values(argv, "-sandbox") == [SECCOMP]
    assert SECCOMP == "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    assert {"-nodefaults", "-no-user-config"} <= set(argv) and option_values(argv, "-display") == ["none"]
    assert not {"-runas", "-daemonize", "-chroot", "-run-with", "-readconfig"} & set(argv)
    assert all(isinstance(a, str) and "\0" not in a for a in argv)


@pytest.mark.parametrize("bad", ["a,b", "a\nb", "../x", "-rf", "", "a b", ".hidden", "a/b", "x" * 64, "é"])
def test_malicious_sandbox_ids_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(InvalidArgument, match="id"):
        Sandbox(fake_config(tmp_path), id=bad)


def test_a_sandbox_id_is_one_value_of_name(tmp_path: Path) -> None:
    assert option_values(argv_for(fake_config(tmp_path), tmp_path, sandbox_id="web-1.a_b"), "-name") == [
        "web-1.a_b,debug-threads=on"
    ]


def test_paths_inside_qemu_option_strings_have_their_commas_doubled(tmp_path: Path) -> None:
    """A path holding ',' (or '=', or a newline) cannot add options to the option string it is in."""
    evil = ",share=on,x=\ny"
    entropy = tmp_path / f"rng{evil}"
    entropy.write_bytes(b"")
    memory = tmp_path / f"mem{evil}"
    socket_path = tmp_path / f"port{evil}.sock"
    log_dir = tmp_path / f"log{evil}"
    config = fake_config(tmp_path, entropy_source=entropy, boot_to_be_template=True, memory_path=memory,
                         devices_state_path=tmp_path / "state", devices=[SerialPort(name="p", socket=socket_path)])  # fmt: skip
    argv = argv_for(config, tmp_path, log_dir=log_dir)
    objects = dict(parse_qemu_opts(o) for o in option_values(argv, "-object"))
    assert objects["rng-random"]["filename"] == str(entropy)
    assert objects["memory-backend-file"]["mem-path"] == str(memory)
    assert objects["memory-backend-file"]["share"] == "on"
    chardevs = {values["id"]: values for _, values in map(parse_qemu_opts, option_values(argv, "-chardev"))}
    assert "logfile" not in chardevs["console0"], "vmctl writes console.log itself (capped)"
    assert chardevs["port0-chr"]["path"] == str(socket_path)
    assert chardevs["port0-chr"]["server"] == "on"


def test_disk_paths_go_to_qemu_as_json_and_images_never_name_a_backing_file(tmp_path: Path) -> None:
    weird = tmp_path / 'a,b=c\n"}.img'
    weird.write_bytes(b"QFI\xfb" + b"\0" * 508)  # looks like qcow2 but is not declared so
    qcow = tmp_path / "q.img"
    qcow.write_bytes(b"")
    config = fake_config(
        tmp_path, devices=[BlockDevice(path=weird, id="weird"), BlockDevice(path=qcow, format="qcow2")]
    )
    nodes = {n["node-name"]: n for n in map(json.loads, option_values(argv_for(config, tmp_path), "-blockdev"))}
    assert nodes["weird-file"]["filename"] == str(weird)
    assert nodes["weird-fmt"]["driver"] == "raw", "the format is never guessed from the image's bytes"
    assert nodes["disk0-fmt"]["driver"] == "qcow2" and nodes["disk0-fmt"]["backing"] is None


@pytest.mark.parametrize(
    "params",
    [
        {"init": "/bin/sh -c reboot"},
        {"a": 'x"y'},
        {"a": "x'y"},
        {"a": "x\\y"},
        {"a": "x\ny"},
        {"a": "x\ty"},
        {"a b": "1"},
        {"a;b": "1"},
        {"$(id)": "1"},
    ],  # fmt: skip
)
def test_kernel_params_that_could_break_out_are_refused(tmp_path: Path, params: dict[str, str]) -> None:
    found = problems_of(directory=tmp_path, kernel_params=params)
    assert list(found) == ["kernel_params[0]"], found


def test_kernel_params_pass_verbatim_after_vmctls_own(tmp_path: Path) -> None:
    config = fake_config(tmp_path, kernel_params={"console": "ttyS1,115200", "quiet": ""})
    append = option_values(argv_for(config, tmp_path), "-append")
    assert len(append) == 1 and append[0].endswith(" console=ttyS1,115200 quiet")
    assert append[0].startswith("console=ttyS0 ")


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"drive": "file=/etc/shadow,format=raw"}, "not allowed"),
        ({"chardev": "file,id=x,path=/etc/passwd"}, "not allowed"),
        ({"device": "virtio-9p-pci,fsdev=x"}, "not allowed"),
        ({"readconfig": "/etc/qemu.conf"}, "not allowed"),
        ({"runas": "nobody"}, "not allowed"),
        ({"sandbox": "off"}, "not allowed"),
        ({"-rtc": "base=utc"}, "QEMU option name"),
        ({"rtc": "-drive"}, "may not start with '-'"),
        ({"rtc": "base=utc\n-drive file=/etc/shadow"}, "control characters"),
    ],
)
def test_hypervisor_params_outside_the_allowlist_are_refused(tmp_path: Path, params: dict[str, str], says: str) -> None:
    found = problems_of(directory=tmp_path, hypervisor_params=params)
    assert list(found) == ["hypervisor_params[0]"] and says in found["hypervisor_params[0]"], found


def test_allowed_hypervisor_params_come_after_the_sandbox_option(tmp_path: Path) -> None:
    argv = argv_for(fake_config(tmp_path, hypervisor_params={"rtc": "base=utc"}), tmp_path)
    assert argv[-2:] == ["-rtc", "base=utc"] and argv.index("-sandbox") < argv.index("-rtc")


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"smbios": "file=/etc/shadow"}, id="smbios-file-reads-a-host-file"),
        pytest.param({"icount": "shift=auto,rr=record,rrfile=/etc/passwd"}, id="icount-rrfile-truncates-a-host-file"),
        pytest.param(
            {"global": "virtio-rng-pci.romfile=/etc/shadow"}, id="global-romfile-maps-a-host-file-into-the-guest"
        ),
        pytest.param({"boot": "splash=/root/secret.jpg"}, id="boot-splash-reads-a-host-file"),
    ],
)
def test_allowlisted_options_cannot_open_host_files(tmp_path: Path, params: dict[str, str]) -> None:
    found = problems_of(directory=tmp_path, hypervisor_params=params)
    assert list(found) == ["hypervisor_params[0]"]


@pytest.mark.parametrize("bad", ["a,b", "x\ny", "-x", "1abc", "a" * 21, "qmp", "rp0", "root", "cpu3", "scsi0"])
def test_malicious_device_ids_are_refused(tmp_path: Path, bad: str) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"")
    found = problems_of(directory=tmp_path, devices=[BlockDevice(path=disk, id=bad)])
    assert list(found) == ["devices[0].id"], found


async def test_a_malicious_hotplug_id_never_reaches_qemu(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"")
    fake = FakeQemu()
    async with Sandbox(fake_config(tmp_path), backend=fake) as sb:
        with pytest.raises(ConfigError) as info:
            await sb.hotplug(BlockDevice(path=disk, id='x","driver":"vfio-pci'))
        assert info.value.fields == ("block.id",)
        assert not {"blockdev-add", "device_add"} & set(fake.commands())


@pytest.mark.parametrize(
    "device",
    [
        NetworkDevice(hostfwd=("tcp::2222-:22,guestfwd=tcp:10.0.2.1:1-cmd:sh",)),
        NetworkDevice(backend="tap", tap_name="tap0,script=/tmp/x"),
        NetworkDevice(mac="52:54:00:12:34:56,x"),
    ],  # fmt: skip
)
def test_network_strings_that_could_add_options_are_refused(tmp_path: Path, device: NetworkDevice) -> None:
    found = problems_of(directory=tmp_path, devices=[device])
    assert found and all(field.startswith("devices[0].") for field in found), found


# -- commands run in the guest ---------------------------------------------------------------------------

NASTY = ["$(id)", "`id`", "'", "'\\''", '"', "a b", "x\ny\n", "*", "~", "-n", "--", "", "\\", "$HOME", ";reboot"]


def test_exec_argv_reaches_the_guest_verbatim() -> None:
    """argv travels as NUL-terminated strings that the C agent hands to execvp: no shell parses it."""
    args = [a.encode() for a in NASTY] + [b"\xff\xfe", "é".encode()]
    env = {b"A": b"$(id) ;x", b"B": b""}
    assert parse_spawn(spawn_payload(args, env, b"/tmp", 0, 1)) == (args, env, b"/tmp", 0, 1)


async def test_exec_refuses_what_cannot_be_passed_verbatim() -> None:
    agent = AgentClient(Path("/nonexistent"))
    with pytest.raises(InvalidArgument, match="NUL"):
        await agent.exec(["echo", "a\0b"])
    with pytest.raises(InvalidArgument, match="list of arguments"):
        await agent.exec("rm -rf /")  # type: ignore[arg-type]


# -- one real QEMU ---------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


@pytest.mark.qemu
async def test_real_qemu_runs_confined_as_us_and_exec_is_verbatim(make_config: MakeConfig, tmp_path: Path) -> None:
    sentinel = os.open(tmp_path / "controller-secret", os.O_RDONLY | os.O_CREAT, 0o600)
    os.set_inheritable(sentinel, True)  # even an inheritable fd of the controller must not reach QEMU
    try:
        async with Sandbox(make_config()) as sb:
            outer = sb.hypervisor.pid  # the process vmctl started: QEMU, or the jail's outer process
            assert outer is not None
            jailed = sb.hypervisor.jail.get("user") == "on"
            pid = sb.pid
            assert pid is not None and pid == sb.hypervisor.qemu_pid
            status = proc_status(pid)
            if jailed:  # as root: the jail user, behind the jail's outer process (PID namespace)
                uid, gid, _ = jail_user()
                assert status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split()[0] == str(gid)
                assert proc_status(outer)["PPid"] == str(os.getpid()), "the jail's outer process is our child"
                assert status["PPid"] == str(outer)
            else:
                assert status["Uid"].split() == [str(UID)] * 4 and status["Gid"].split()[0] == str(os.getgid())
                assert status["PPid"] == str(os.getpid()), "QEMU is our child: no shell or wrapper in between"
            assert status["Seccomp"] == "2", "-sandbox on installed a seccomp filter"
            assert status["NoNewPrivs"] == "1"
            assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1] == [a.encode() for a in sb.command_line]
            assert os.getsid(pid) == outer, "QEMU has its own session (a Ctrl-C for the controller misses it)"
            fds = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
            assert str(tmp_path / "controller-secret") not in fds
            if outer != pid:
                outer_fds = [os.readlink(fd) for fd in Path(f"/proc/{outer}/fd").iterdir()]
                assert not [f for f in outer_fds if f.startswith(("socket:", str(tmp_path)))], "only QEMU holds them"
            run_dir = sb.run_dir
            assert run_dir is not None and mode(run_dir) == 0o700
            assert {mode(run_dir / n) for n in ("qmp.sock", "console.sock", "agent.sock")} == {0o600}

            literal = "$(id); 'x' \n"
            result = await sb.exec(["printf", "%s", literal])
            assert result.stdout == literal.encode() and result.exit_code == 0
            result = await sb.exec(["sh", "-c", 'for a in "$@"; do printf "[%s]" "$a"; done', "sh", *NASTY])
            assert result.stdout == "".join(f"[{a}]" for a in NASTY).encode()
    finally:
        os.close(sentinel)


def test_a_remote_download_replaces_a_planted_symlink_and_never_writes_through_it(tmp_path: Path) -> None:
    """What ``RemoteSandbox.download`` writes on the driver (``guestfiles.write_local``): a new
    file, mode 0o666 minus the umask, renamed onto the target; a directory there is refused.
    (It wrote through a symlink at the target, into whatever file the link named.)"""
    victim = tmp_path / "victim"
    victim.write_bytes(b"host data\n")
    target = tmp_path / "result"
    target.symlink_to(victim)
    old = os.umask(0o027)
    try:
        write_local(target, b"from the guest\n")
    finally:
        os.umask(old)
    assert not target.is_symlink() and target.read_bytes() == b"from the guest\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert victim.read_bytes() == b"host data\n"
    with pytest.raises(InvalidArgument, match="is a directory"):
        write_local(tmp_path, b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result", "victim"]


async def test_a_passt_directory_left_when_even_the_reaper_was_killed_is_swept_unless_in_use(tmp_path: Path) -> None:
    from vmctl.hypervisors.handover import sweep_stale_passt_dirs

    old, in_use, young = (tmp_path / f"vmctl-passt-{name}" for name in ("old", "inuse", "young"))
    for d in (old, in_use, young):
        d.mkdir(mode=0o700)
    for d in (old, in_use):
        os.utime(d, (0, 0))  # long past the start-up window
    holder_argv = [sys.executable, "-c", "import time; time.sleep(30)", f"{in_use}/net0.sock"]  # as passt names it
    async with await anyio.open_process(holder_argv) as holder:
        try:
            with anyio.fail_after(5):
                while b"net0.sock" not in Path(f"/proc/{holder.pid}/cmdline").read_bytes():  # noqa: ASYNC110 - its exec
                    await anyio.sleep(0.005)
            assert sweep_stale_passt_dirs(tmp_path, os.getuid()) == [old]
            assert sweep_stale_passt_dirs(tmp_path, os.getuid() + 1) == []  # another user's are left alone
        finally:
            holder.kill()
    assert not old.exists() and in_use.is_dir() and young.is_dir()


async def test_a_console_follower_nobody_reads_holds_a_bounded_number_of_bytes() -> None:
    """Console lines are the guest's (up to 64 KiB each): a follower that stops reading keeps at
    most ``FOLLOWER_BYTES`` of them (it used to keep 1,000 lines: 64 MiB), and reads on after."""
    from vmctl.agent.console import FOLLOWER_BYTES, ConsoleFanout

    fanout = ConsoleFanout()
    follower = fanout.follow()
    first = await anext_after_push(fanout, follower, "ready")
    assert first == "ready"
    for _ in range(1000):
        fanout.push("x" * 65536)
    held = fanout._followers[0]  # noqa: SLF001 - the size is what this test is about
    assert held.size <= FOLLOWER_BYTES and held.dropped > 0
    assert len(await follower.__anext__()) == 65536  # what it kept is still in order
    fanout.close()
    assert [line async for line in follower] and fanout._followers == []  # noqa: SLF001


async def anext_after_push(fanout: object, follower: Any, line: str) -> str:
    fanout.push(line)  # type: ignore[attr-defined]
    return str(await follower.__anext__())
