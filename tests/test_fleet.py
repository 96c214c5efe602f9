"""Fleets: bounded boots, failure isolation, teardown on every path, and the fleet CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from tests.conftest import assert_no_stray_tasks, qemu_processes
from vmctl import ConfigError, ExecResult, SandboxState, guest
from vmctl.fleets.fleet import Fleet, FleetEvent, FleetEventKind
from vmctl.fleets.spec import load_fleet_spec
from vmctl.testing import FakeQemu, fake_config


async def test_bounded_concurrent_boots_and_per_member_results(tmp_path: Path) -> None:
    booting = 0
    peak = 0
    events: list[FleetEvent] = []

    def on_event(event: FleetEvent) -> None:
        nonlocal booting, peak
        events.append(event)
        booting += {FleetEventKind.BOOTING: 1, FleetEventKind.READY: -1, FleetEventKind.BOOT_FAILED: -1}.get(
            event.kind, 0
        )
        peak = max(peak, booting)

    fake = FakeQemu(ready_delay=0.05, exec_handler=lambda argv, stdin: ExecResult(0, argv[0], b""))
    async with Fleet(fake_config(tmp_path), size=6, max_concurrent_starts=2, backend=fake, on_event=on_event) as fleet:
        assert len(fleet.running) == 6
        results = await fleet.map(lambda sb: sb.exec([sb.id]))
    assert peak == 2, "never more than max_concurrent_starts boots at once"
    assert [(sb.id, outcome.value.stdout) for sb, outcome in results] == [  # type: ignore[union-attr]
        (f"fleet-{i}", f"fleet-{i}".encode()) for i in range(6)]  # fmt: skip
    assert all(sb.state is SandboxState.STOPPED for sb in fleet.sandboxes)
    assert sum(e.kind is FleetEventKind.STOPPED for e in events) == 6
    await assert_no_stray_tasks()


async def test_a_member_that_fails_to_boot_is_reported_and_the_rest_go_on(tmp_path: Path) -> None:
    good, bad = FakeQemu(), FakeQemu(ready_delay=None)
    backends = iter([good, bad, good])

    def backend(*args: object, **kwargs: object) -> object:
        return next(backends)(*args, **kwargs)

    async with Fleet(fake_config(tmp_path), size=3, backend=backend, start_timeout=0.5) as fleet:  # type: ignore[arg-type]
        results = await fleet.map(lambda sb: sb.exec(["echo", "ok"]))
    assert [o.ok for _, o in results] == [True, False, True]
    assert "did not report ready" in str(results[1][1].error)
    assert [m.sandbox.id for m in fleet.failed] == ["fleet-1"]


async def test_fail_fast_stops_everyone(tmp_path: Path) -> None:
    fake = FakeQemu(ready_delay=None)
    with pytest.raises(Exception, match="failed to boot"):
        async with Fleet(fake_config(tmp_path), size=3, backend=fake, start_timeout=0.3, fail_fast=True):
            pytest.fail("fail_fast must not enter the block")
    await assert_no_stray_tasks()


async def test_a_job_error_is_kept_and_does_not_stop_the_others(tmp_path: Path) -> None:
    async with Fleet(fake_config(tmp_path), size=3, backend=FakeQemu()) as fleet:

        async def job(sb: object) -> str:
            if getattr(sb, "id", "") == "fleet-1":
                raise RuntimeError("boom in fleet-1")
            return "fine"

        results = await fleet.map(job)  # type: ignore[arg-type]
    assert [(o.value, str(o.error) if o.error else None) for _, o in results] == [
        ("fine", None), (None, "boom in fleet-1"), ("fine", None)]  # fmt: skip


async def test_cancelling_the_fleet_tears_everything_down(tmp_path: Path, runtime_dir: Path) -> None:
    with anyio.move_on_after(0.3):
        async with Fleet(fake_config(tmp_path), size=4, backend=FakeQemu()) as fleet:
            await fleet.map(lambda sb: sb.exec(["sleep", "30"]))
    assert all(sb.state is SandboxState.STOPPED for sb in fleet.sandboxes)
    assert list(runtime_dir.iterdir()) == []
    await assert_no_stray_tasks()


def test_bad_fleet_specs_name_the_field(tmp_path: Path) -> None:
    spec = tmp_path / "f.toml"
    spec.write_text('[fleet]\nsize = 0\ncommands = [["ok"], "not a list"]\nbogus = 1\n[sandbox]\nvcpus = "two"\n')
    with pytest.raises(ConfigError) as info:
        load_fleet_spec(spec, default_kernel=spec, default_initrd=spec)
    assert {"fleet.size", "fleet.commands[1]", "fleet.bogus", "sandbox.vcpus"} <= set(info.value.fields)
    spec.write_text("[sandbox]\n")
    with pytest.raises(ConfigError, match=r"missing \[fleet\]"):
        load_fleet_spec(spec)


@pytest.mark.qemu
def test_fleet_cli_runs_the_example_and_reports_json(assets: guest.GuestAssets, runtime_dir: Path) -> None:
    example = Path(__file__).parent.parent / "examples" / "fleet.toml"
    out = subprocess.run([sys.executable, "-m", "vmctl.cli", "fleet", str(example), "--json"],
                         capture_output=True, text=True, timeout=600, env=os.environ)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["ok"] and len(report["members"]) == 3
    for member in report["members"]:
        assert member["state"] == "stopped" and member["exit_codes"] == [0, 0]
        assert member["stdout"][0].startswith("cpus=1 mem_kb=") and member["boot_seconds"] > 0
    assert qemu_processes(str(runtime_dir)) == []


@pytest.mark.qemu
async def test_one_member_killed_mid_run_is_reported_while_the_others_finish(
    assets: guest.GuestAssets, runtime_dir: Path
) -> None:
    from vmctl import SandboxConfig

    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, memory_mib=256)
    async with Fleet(config, size=3, max_concurrent_starts=3) as fleet:

        async def job(sb: object) -> str:
            from vmctl import Sandbox

            assert isinstance(sb, Sandbox)
            if sb.id == "fleet-1":
                assert sb.pid is not None
                os.kill(sb.pid, signal.SIGKILL)
            return (await sb.exec(["sh", "-c", "sleep 1; echo done"], check=True)).text

        results = await fleet.map(job)
    assert [o.ok for _, o in results] == [True, False, True]
    assert results[0][1].value == "done\n" and "code -9" in str(results[1][1].error)
    assert [sb.state for sb in fleet.sandboxes] == [SandboxState.STOPPED, SandboxState.FAILED, SandboxState.STOPPED]
    assert qemu_processes(str(runtime_dir)) == []


async def test_fail_fast_does_not_wait_for_the_other_boots(tmp_path: Path) -> None:
    slow, broken = FakeQemu(ready_delay=30), FakeQemu(ready_delay=None)
    backends = iter([broken, slow, slow, slow])

    def backend(*args: object, **kwargs: object) -> object:
        return next(backends)(*args, **kwargs)

    with anyio.fail_after(10):  # not 30 s per slow member
        with pytest.raises(Exception, match="failed to boot"):
            async with Fleet(fake_config(tmp_path), size=4, backend=backend, start_timeout=0.3,  # type: ignore[arg-type]
                             fail_fast=True):  # fmt: skip
                pytest.fail("fail_fast must not enter the block")


def test_members_cannot_share_a_writable_disk(tmp_path: Path) -> None:
    from vmctl import BlockDevice
    from vmctl.fleets.fleet import FleetError

    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 512)
    with pytest.raises(FleetError, match="share writable disks"):
        Fleet(fake_config(tmp_path, devices=[BlockDevice(path=disk)]), size=2)
    Fleet(fake_config(tmp_path, devices=[BlockDevice(path=disk, read_only=True)]), size=2)
    spec = tmp_path / "f.toml"
    spec.write_text(f'[fleet]\nsize = 2\ndevices = [{{type = "block", path = "{disk}"}}]\n[sandbox]\n')
    with pytest.raises(ConfigError) as info:
        load_fleet_spec(spec, default_kernel=disk, default_initrd=disk)
    assert "fleet.devices" in info.value.fields
    spec.write_text('[fleet]\nsize = 1\ndevices = [{type = "block", path = "missing.img"}]\n[sandbox]\n')
    with pytest.raises(ConfigError) as info:
        load_fleet_spec(spec, default_kernel=disk, default_initrd=disk)
    assert info.value.fields == ("fleet.devices[0].path",)
    spec.write_text("[fleet]\nsize = 1\n[sandbox]\n")
    spec.write_text('sandbox = "abc"\n[fleet]\nsize = 1\n')
    with pytest.raises(ConfigError, match="sandbox"):
        load_fleet_spec(spec, default_kernel=disk, default_initrd=disk)


@pytest.mark.qemu
async def test_a_template_fleet_starts_independent_clones(assets: guest.GuestAssets, runtime_dir: Path) -> None:
    from vmctl import SandboxConfig

    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, memory_mib=256)
    async with Fleet(config, size=3, max_concurrent_starts=3, template=True) as fleet:
        assert fleet.template_seconds is not None and len(fleet.running) == 3
        assert all(m.boot_seconds is not None and m.boot_seconds < fleet.template_seconds for m in fleet.members)
        await fleet.sandboxes[0].exec(["sh", "-c", "echo mine > /root/x"], check=True)
        seen = await fleet.map(lambda sb: sb.exec(["cat", "/root/x"]))
    assert [o.value.exit_code for _, o in seen] == [0, 1, 1], "a file written in one clone is not in another"  # type: ignore[union-attr]
    assert list(runtime_dir.iterdir()) == [], "the template's files went with the fleet"
