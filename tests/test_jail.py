"""The jail around QEMU, on a real QEMU as root: its user, namespaces, environment, cgroup,
network modes and console log cap. Everything else in the suite also runs jailed as root."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from vmctl import ConfigError, Sandbox, SandboxConfig, SandboxFailed
from vmctl.devices import NetworkDevice, loopback_forward
from vmctl.hypervisors import cgroups, handover, jail
from vmctl.hypervisors.base import RunPaths
from vmctl.hypervisors.qemu import CappedLog

MakeConfig = Callable[..., SandboxConfig]
ROOT = os.geteuid() == 0
as_root = pytest.mark.skipif(not ROOT, reason="the jail's user, namespaces and cgroups need a root controller")
needs_passt = pytest.mark.skipif(jail.passt_path() is None, reason="passt is not installed (scripts/setup adds it)")


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def cgroup_dirs(run_dir: Path) -> list[Path]:
    """Every cgroup directory of the sandbox whose run dir this is (in any hierarchy)."""
    version, _ = cgroups.detect()
    if version is None:
        return []
    group = cgroups.Cgroup(jail.cgroup_name(RunPaths(run_dir, run_dir)), version)
    return [d for d in group.dirs.values() if d.exists()]


def passt_processes(marker: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"passt" in (entry / "cmdline").read_bytes().split(b"\0")[0] \
                    and marker.encode() in (entry / "cmdline").read_bytes():  # fmt: skip
                out.append(int(entry.name))
        except OSError:
            pass
    return out


# -- without QEMU --------------------------------------------------------------------------------


def test_the_operator_switch_picks_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMCTL_JAIL", "off")
    assert jail.operator_parts() == set()
    assert all(not ok for part, (ok, _) in jail.host_status().items() if part in jail.PARTS)
    monkeypatch.setenv("VMCTL_JAIL", "user,cgroup,bogus")
    assert jail.operator_parts() == {"user", "cgroup"}
    monkeypatch.delenv("VMCTL_JAIL")
    assert jail.operator_parts() == set(jail.PARTS)
    monkeypatch.setenv("VMCTL_JAIL_USER", "1234:5678")
    assert jail.jail_user()[:2] == (1234, 5678)


def test_network_mode_is_validated_and_forwards_default_to_loopback(make_config: MakeConfig) -> None:
    with pytest.raises(ConfigError, match="network"):
        make_config(network="everywhere")
    assert loopback_forward("tcp::2222-:22") == "tcp:127.0.0.1:2222-:22"
    assert loopback_forward("tcp:0.0.0.0:2222-:22") == "tcp:0.0.0.0:2222-:22"
    assert handover._passt_forward("tcp:127.0.0.1:2222-:22") == ["-t", "127.0.0.1/2222:22"]  # noqa: SLF001
    assert handover._passt_forward("udp::53-:53") == ["-u", "127.0.0.1/53:53"]  # noqa: SLF001


@pytest.mark.parametrize(("field", "value", "says"), [
    ("console_log_limit_mib", None, "must be an integer"),  # found by test_fuzz: it raised TypeError
    ("console_log_limit_mib", 0, "at least 1"),
    ("memory_limit_mib", "lots", "must be an integer"),
    ("memory_limit_mib", 16, "at least"),
])  # fmt: skip
def test_the_jails_limits_are_checked_with_a_config_error(make_config: MakeConfig, field: str, value: object,
                                                          says: str) -> None:  # fmt: skip
    with pytest.raises(ConfigError, match=says) as info:
        make_config(**{field: value})
    assert field in info.value.fields


def test_a_capped_log_rotates_once_and_never_grows_past_its_limit(tmp_path: Path) -> None:
    log = CappedLog(tmp_path / "console.log", 1000)
    for i in range(500):
        log.write(f"line {i:05d}\n".encode())
    log.close()
    assert (tmp_path / "console.log").stat().st_size <= 1000
    assert (tmp_path / "console.log.1").stat().st_size <= 1000
    assert (tmp_path / "console.log").read_text().splitlines()[-1] == "line 00499"


def sb_kernel_is_inside(sb: Sandbox, root: Path) -> bool:
    assert sb.run_dir is not None
    kernel = sb.run_dir / "q" / "kernel"
    return str(kernel) in sb.command_line and (root / str(kernel).lstrip("/")).stat().st_size > 1_000_000


# -- real QEMU, jailed ------------------------------------------------------------------------------


@as_root
async def test_qemu_runs_as_the_jail_user_with_nothing_of_the_controllers(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMCTL_TEST_SECRET", "hunter2")
    async with Sandbox(make_config()) as a, Sandbox(make_config()) as b:
        assert a.hypervisor.jail == dict.fromkeys(jail.PARTS, "on")
        pid = a.pid
        assert pid is not None and pid != a.hypervisor.pid, "QEMU runs behind the jail's outer process"
        st = status(pid)
        uid, gid, _ = jail.jail_user()
        assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(gid)] * 4
        assert st["Groups"] == "" and st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
        assert st["NSpid"].split()[-1] == "1", "QEMU is PID 1 of its own PID namespace"
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"hunter2" not in environ and b"VMCTL_TEST_SECRET" not in environ
        assert sorted(environ.rstrip(b"\0").split(b"\0")) == sorted(f"{k}={v}".encode() for k, v in jail.MINIMAL_ENV.items())
        for ns in ("mnt", "pid", "ipc", "net"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        root = Path(f"/proc/{pid}/root")
        assert a.run_dir is not None and b.run_dir is not None
        assert (root / str(a.run_dir / "q").lstrip("/")).is_dir(), "its own directory is there"
        assert not (root / str(a.run_dir / "qmp.sock").lstrip("/")).exists(), "the controller's run dir is not"
        assert not (root / str(b.run_dir).lstrip("/")).exists(), "another sandbox's run dir is not"
        assert not (root / str(Path.home()).lstrip("/")).exists(), "the controller's home is not"
        assert sb_kernel_is_inside(a, root)
        assert sorted(p.name for p in root.iterdir() if p.name not in ("lib32", "libx32")) == \
            ["bin", "dev", "etc", "lib", "lib64", "proc", "sbin", "tmp", "usr"]  # fmt: skip
        assert (await a.exec(["echo", "ok"], check=True)).text == "ok\n"


@as_root
async def test_jail_false_and_the_host_switch_keep_the_old_behaviour(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Sandbox(make_config(jail=False)) as sb:
        assert sb.hypervisor.qemu_pid == sb.pid and status(sb.pid or 0)["Uid"].split()[0] == "0"
        assert set(sb.hypervisor.jail.values()) == {"turned off for this sandbox (SandboxConfig.jail=False)"}
    monkeypatch.setenv("VMCTL_JAIL", "cgroup,env")
    async with Sandbox(make_config()) as sb:
        parts = sb.hypervisor.jail
        assert parts["cgroup"] == "on" and parts["user"].startswith("left out by VMCTL_JAIL")
        pid = sb.hypervisor.qemu_pid
        assert pid is not None and status(pid)["Uid"].split()[0] == "0"
        assert b"VMCTL_JAIL" not in Path(f"/proc/{pid}/environ").read_bytes()


@as_root
async def test_the_cgroup_holds_qemu_with_its_limits_and_goes_with_the_sandbox(make_config: MakeConfig) -> None:
    async with Sandbox(make_config(vcpus=1, max_vcpus=1)) as sb:
        assert sb.run_dir is not None
        run_dir = sb.run_dir
        dirs = cgroup_dirs(run_dir)
        assert dirs, "the cgroup exists while QEMU runs"
        pid = sb.hypervisor.qemu_pid
        procs = {int(p) for d in dirs for p in (d / "cgroup.procs").read_text().split()}
        assert pid in procs and sb.hypervisor.pid in procs
        by_name = {d.parts[4] if len(d.parts) > 4 else "": d for d in dirs}
        memory = by_name.get("memory")
        if memory is not None:  # cgroup v1 here
            assert int((memory / "memory.limit_in_bytes").read_text()) == (256 + jail.MEMORY_OVERHEAD_MIB) * 2**20
            assert (by_name["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "200000"
            assert (by_name["pids"] / "pids.max").read_text().strip() == str(jail.PIDS_MAX)
    assert not cgroup_dirs(run_dir), "gone after stop"


@as_root
async def test_a_qemu_over_its_memory_limit_fails_clearly_and_leaves_no_cgroup(make_config: MakeConfig) -> None:
    sb = Sandbox(make_config(memory_mib=512, mem_prealloc=True, memory_limit_mib=128), start_timeout=60)
    with pytest.raises(SandboxFailed, match="cgroup's memory limit \\(128 MiB"):
        async with sb:
            pass
    assert sb.run_dir is None or not cgroup_dirs(sb.run_dir)
    assert not [d for d in cgroup_dirs_any() if d.name.startswith(sb.id)]


def cgroup_dirs_any() -> list[Path]:
    version, _ = cgroups.detect()
    if version is None:
        return []
    parent = cgroups.Cgroup("x", version).path.parent
    return [p for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []


@as_root
async def test_a_cancelled_start_leaves_no_cgroup(make_config: MakeConfig) -> None:
    before = {p.name for p in cgroup_dirs_any()}
    for delay in (0.05, 0.3, 1.0):
        sb = Sandbox(make_config())
        with anyio.move_on_after(delay):
            async with sb:
                await anyio.sleep_forever()
        assert {p.name for p in cgroup_dirs_any()} <= before, f"cancelled after {delay}s"


async def test_a_flooding_guest_leaves_a_capped_console_log(make_config: MakeConfig) -> None:
    async with Sandbox(make_config(console_log_limit_mib=1)) as sb:
        lines: list[str] = []

        async def follow() -> None:
            async for line in sb.console_lines():
                lines.append(line)

        log = sb.console_log_path
        assert log is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await sb.exec(["sh", "-c", "yes 0123456789abcdefghijklmnopqrstuvwxyz0123456789 | head -c 2500000 > /dev/ttyS0; "
                                       "echo vmctl-flood-done > /dev/ttyS0"], timeout=240, check=True)  # fmt: skip
            with anyio.fail_after(60):
                while "vmctl-flood-done" not in log.read_text(errors="replace")[-200:]:  # noqa: ASYNC110
                    await anyio.sleep(0.1)
            tg.cancel_scope.cancel()
        assert len(lines) > 100, "the live stream went on"
        assert log.stat().st_size <= 2**20 and log.with_name("console.log.1").stat().st_size <= 2**20
        assert log.read_text().splitlines()[-1].endswith("vmctl-flood-done"), "the newest lines are kept"


# -- guest networking -------------------------------------------------------------------------------


@pytest.fixture
def host_service() -> Iterator[int]:
    """A TCP service on the host's 127.0.0.1 that answers every connection with a line."""
    proc = subprocess.Popen(["python3", "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    try:
        yield port
    finally:
        proc.kill()
        proc.wait()


SERVER = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1", 0)); s.listen(8)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"host-secret\\n"); c.close()
"""


async def guest_address(sb: Sandbox, iface: str = "eth0") -> str:
    """The address the guest's init configured by DHCP (it does so on its own)."""
    with anyio.fail_after(30):
        while True:
            out = (await sb.exec(["ip", "-4", "-o", "addr", "show", "dev", iface])).text
            if " inet " in out:
                return out.split(" inet ")[1].split()[0]
            await anyio.sleep(0.3)


async def fetch(sb: Sandbox, host: str, port: int) -> str:
    result = await sb.exec(["sh", "-c", f"nc -w 3 {host} {port} < /dev/null"], timeout=20)
    return result.text


@as_root
@needs_passt
async def test_by_default_the_guest_cannot_reach_host_loopback_services(make_config: MakeConfig, host_service: int) -> None:
    async with Sandbox(make_config(devices=[NetworkDevice()])) as sb:
        assert sb.config.network == "egress" and sb.hypervisor.jail["netns"] == "on"
        address = await guest_address(sb)
        assert address, "the NIC got an address without hand-work"
        assert [d.address for d in sb.devices] == [address], "and the device table reports it"
        gateway = (await sb.exec(["sh", "-c", "ip route | awk '/default/ {print $3}'"])).text.strip()
        for target in ("10.0.2.2", gateway, "127.0.0.1"):
            assert "host-secret" not in await fetch(sb, target, host_service), target
        passts = passt_processes("vmctl-passt-")
        assert passts, "passt serves the NIC"
    assert not set(passts) & set(passt_processes("vmctl-passt-")), "and goes with the sandbox"


@as_root
async def test_network_host_reaches_host_loopback_as_before(make_config: MakeConfig, host_service: int) -> None:
    async with Sandbox(make_config(devices=[NetworkDevice()], network="host")) as sb:
        assert sb.hypervisor.jail["netns"].startswith("a NIC needs the host's network")
        assert await guest_address(sb) == "10.0.2.15/24"
        assert "host-secret" in await fetch(sb, "10.0.2.2", host_service)


async def test_network_none_reaches_nothing_but_port_forwards_come_in(make_config: MakeConfig, host_service: int) -> None:
    nic = NetworkDevice(hostfwd=("tcp::0-:23",))
    async with Sandbox(make_config(devices=[nic], network="none")) as sb:
        await guest_address(sb)
        assert "host-secret" not in await fetch(sb, "10.0.2.2", host_service)


@pytest.fixture
def outside_server() -> Iterator[tuple[str, int]]:
    """'Outside': a server in a network namespace behind a veth pair, reached as the host would."""
    ns, host_if, peer_if = "vmctl-egress-t", "vmeg0", "vmeg1"

    def sh(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True)

    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    sh("ip", "netns", "add", ns)
    server = None
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns", ns)
        sh("ip", "addr", "add", "198.51.100.1/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "-n", ns, "addr", "add", "198.51.100.2/24", "dev", peer_if)
        sh("ip", "-n", ns, "link", "set", peer_if, "up")
        server = subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c", SERVER.replace("host-secret", "outside"),
                                   "198.51.100.2"], stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert server.stdout is not None
        yield "198.51.100.2", int(server.stdout.readline())
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@as_root
@needs_passt
async def test_egress_reaches_a_server_outside_the_host(make_config: MakeConfig, outside_server: tuple[str, int]) -> None:
    async with Sandbox(make_config(devices=[NetworkDevice()])) as sb:
        await guest_address(sb)
        assert "outside" in await fetch(sb, *outside_server)


def test_doctor_reports_each_jail_part(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from vmctl.cli.main import main

    main(["doctor", "--json"])
    parts = json.loads(capsys.readouterr().out)["jail"]
    assert set(parts) == {*jail.PARTS, "passt"}
    assert parts["user"]["active"] is ROOT and parts["env"]["active"] is True
    monkeypatch.setenv("VMCTL_JAIL", "env")
    main(["doctor"])
    out = capsys.readouterr().out
    assert re.search(r"^jail user +off: left out by VMCTL_JAIL=env$", out, re.M)
    assert re.search(r"^jail env +on: ", out, re.M)


@as_root
async def test_a_disk_hot_plugged_after_attach_gets_a_fresh_fd_set(make_config: MakeConfig, tmp_path: Path) -> None:
    from vmctl.devices import BlockDevice

    disks = {}
    for name in ("first", "second"):
        disks[name] = tmp_path / f"{name}.img"
        disks[name].write_bytes(name.encode().ljust(8 << 20, b"\0"))
    config = make_config(pci_bridges=2, block_driver="virtio-blk", devices=[BlockDevice(path=disks["first"], id="first")])
    async with Sandbox(config, id="jailed-attach", detached=True):
        pass
    async with Sandbox.attach("jailed-attach") as sb:
        second = await sb.hotplug(BlockDevice(path=disks["second"], id="second"))
        assert second.guest_path is not None
        head = await sb.exec(["head", "-c", "6", second.guest_path], check=True)
        assert head.stdout == b"second", "the new disk, not the one in the first fd set"
        await sb.stop()
