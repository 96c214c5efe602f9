"""Detached sandboxes: QEMU outlives the controller; other processes attach, list, exec and stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from vmctl import (
    BlockDevice,
    Sandbox,
    SandboxBusy,
    SandboxConfig,
    SandboxFailed,
    SandboxNotFound,
    SandboxState,
    guest,
)
from vmctl.core import reaper
from vmctl.core.state import Trigger

from .conftest import assert_no_stray_tasks, qemu_processes

pytestmark = pytest.mark.qemu

STARTER = """
import sys, anyio
from vmctl import Sandbox, SandboxConfig
async def main():
    config = SandboxConfig(kernel=sys.argv[1], initrd=sys.argv[2], memory_mib=256)
    async with Sandbox(config, id="keeper", detached=True) as sb:
        await sb.exec(["sh", "-c", "echo written-by-the-first-controller > /tmp/mark"], check=True)
    print(sb.pid)
anyio.run(main)
"""


def vmctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmctl.cli", *args], capture_output=True, text=True, timeout=300)


def alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


async def test_a_detached_sandbox_outlives_its_controller_and_is_attached_from_this_process(
    assets: guest.GuestAssets, runtime_dir: Path
) -> None:
    starter = await anyio.run_process([sys.executable, "-c", STARTER, str(assets.kernel), str(assets.initrd)],
                                      stderr=subprocess.PIPE)  # fmt: skip
    pid = int(starter.stdout.decode().split()[-1])
    assert alive(pid), "QEMU died with the controller that started it"

    async with Sandbox.attach("keeper") as sb:
        assert sb.state is SandboxState.RUNNING
        assert sb.pid == pid
        assert (await sb.exec(["cat", "/tmp/mark"], check=True)).text == "written-by-the-first-controller\n"
        await sb.pause()
    assert sb.state is SandboxState.DETACHED
    assert alive(pid)

    async with Sandbox.attach("keeper") as sb:
        # the state is rebuilt from QEMU: it was left paused
        assert sb.state is SandboxState.PAUSED
        assert sb.history[-1].trigger is Trigger.FOUND_PAUSED
        await sb.resume()
        assert (await sb.exec(["cat", "/tmp/mark"])).exit_code == 0
        with pytest.raises(SandboxBusy, match="attached by another controller"):
            async with Sandbox.attach("keeper"):
                pass
        await sb.stop()
    assert sb.state is SandboxState.STOPPED
    assert not alive(pid)
    assert not (runtime_dir / "detached" / "keeper").exists()
    with pytest.raises(SandboxNotFound):
        Sandbox.attach("keeper")
    await assert_no_stray_tasks()


async def test_hotplugged_devices_are_known_after_attach(
    make_config: Callable[..., SandboxConfig], tmp_path: Path
) -> None:
    disk = tmp_path / "data.img"
    disk.write_bytes(b"\0" * (8 << 20))
    async with Sandbox(make_config(pci_bridges=2), id="plugged", detached=True) as sb:
        plugged = await sb.hotplug(BlockDevice(path=disk, id="data"))
    async with Sandbox.attach("plugged") as sb:
        known = {d.id: d for d in sb.devices}
        assert known["data"].guest_path == plugged.guest_path
        names = {d.name for d in await sb.guest_block_devices()}
        assert plugged.guest_path is not None and plugged.guest_path.removeprefix("/dev/") in names
        await sb.unplug("data")
        assert "data" not in {d.id for d in sb.devices}
        await sb.stop()


async def test_a_record_whose_qemu_is_gone_is_reported_and_cleaned_where_no_reaper_removed_it(
    make_config: Callable[..., SandboxConfig], runtime_dir: Path
) -> None:
    """Its reaper removes a detached sandbox's files when QEMU ends (test_controller_death.py);
    where the reaper was killed too, the next ``vmctl ps`` reports the record once and removes it."""
    async with Sandbox(make_config(), id="doomed", detached=True) as sb:
        pid = sb.pid
    reaper_pid = reaper.reaper_pid()
    assert pid is not None and reaper_pid is not None
    reaper_fd = os.pidfd_open(reaper_pid)
    os.kill(reaper_pid, signal.SIGKILL)  # nothing else may remove the record
    with anyio.fail_after(10):
        await anyio.wait_readable(reaper_fd)
    os.close(reaper_fd)
    pidfd = os.pidfd_open(pid)
    os.kill(pid, signal.SIGKILL)
    with anyio.fail_after(10):
        await anyio.wait_readable(pidfd)  # readable once the process is gone
    os.close(pidfd)
    listed = json.loads(vmctl("ps", "--json").stdout)
    assert [(row["id"], row["status"]) for row in listed] == [("doomed", "stale")]
    assert not (runtime_dir / "detached" / "doomed").exists()
    with pytest.raises(SandboxNotFound):
        Sandbox.attach("doomed")


async def test_cli_start_ps_exec_stop(assets: guest.GuestAssets, runtime_dir: Path) -> None:
    started = vmctl("start", "--id", "cli-one", "--memory", "256")
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == "cli-one"
    again = vmctl("start", "--id", "cli-one")
    assert again.returncode == 1 and "already exists" in again.stderr

    listed = json.loads(vmctl("ps", "--json").stdout)
    assert [(r["id"], r["state"], r["memory_mib"]) for r in listed] == [("cli-one", "running", 256)]
    assert "cli-one" in vmctl("ps").stdout

    ran = vmctl("exec", "cli-one", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (ran.returncode, ran.stdout, ran.stderr.splitlines()[-1]) == (7, "out\n", "err")

    stopped = vmctl("stop", "cli-one")
    assert stopped.returncode == 0, stopped.stderr
    assert qemu_processes(str(runtime_dir)) == []
    missing = vmctl("exec", "cli-one", "--", "true")
    assert missing.returncode == 1 and "no detached sandbox named 'cli-one'" in missing.stderr


async def test_detach_is_refused_for_an_ordinary_sandbox(make_config: Callable[..., SandboxConfig]) -> None:
    from vmctl import NotSupported

    async with Sandbox(make_config()) as sb:
        with pytest.raises(NotSupported, match="detached=True"):
            await sb.detach()
        assert sb.state is SandboxState.RUNNING


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", "-x", "x" * 64, "web\n"])
def test_ids_that_could_escape_the_state_dir_are_refused(bad: str, runtime_dir: Path) -> None:
    from vmctl import InvalidArgument

    with pytest.raises(InvalidArgument, match="id: "):
        Sandbox.attach(bad)
    assert list(runtime_dir.iterdir()) == []  # nothing was created on the way to the refusal


def reapers_of(controller: int) -> list[int]:
    """Live reaper processes started by the process ``controller``."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            ours = b"vmctl/core/reaper.py" in b" ".join(argv) and argv[-2:-1] == [str(controller).encode()]
            if entry.name.isdigit() and ours and alive(int(entry.name)):
                out.append(int(entry.name))
        except OSError:
            pass
    return out


async def test_attaching_from_the_cli_leaves_no_reaper_behind(
    make_config: Callable[..., SandboxConfig], runtime_dir: Path
) -> None:
    """One reaper watches a detached sandbox (this process's): each ``vmctl exec`` attaching to
    it starts one of its own, which must end with the command instead of watching too."""
    async with Sandbox(make_config(), id="visited", detached=True):
        pass
    for _ in range(2):
        cli = await anyio.open_process([sys.executable, "-m", "vmctl.cli", "exec", "visited", "--", "true"])
        assert await cli.wait() == 0
        await cli.aclose()
        with anyio.fail_after(5):
            while reapers_of(cli.pid):  # noqa: ASYNC110 - not our child: nothing to wait on
                await anyio.sleep(0.02)
    async with Sandbox.attach("visited") as sb:
        await sb.stop()
    assert not (runtime_dir / "detached").exists()


VMCTL = str(Path(sys.executable).with_name("vmctl"))


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


@pytest.mark.timeout(180)
async def test_a_detached_sandbox_whose_guest_panics_leaves_no_qemu_and_no_record(make_config, monkeypatch) -> None:
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
