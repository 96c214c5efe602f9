"""VM templates: boot one sandbox to be a template, start clones that load its state instead of booting."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vmctl import ConfigError, Sandbox, SandboxConfig, SandboxState

pytestmark = pytest.mark.qemu
MakeConfig = Callable[..., SandboxConfig]


async def test_template_then_clones(make_config: MakeConfig, tmp_path: Path) -> None:
    memory, state = tmp_path / "template.mem", tmp_path / "template.state"
    template = make_config(boot_to_be_template=True, memory_path=memory, devices_state_path=state)
    started = time.monotonic()
    async with Sandbox(template) as tsb:
        cold_boot = time.monotonic() - started
        assert tsb.state is SandboxState.PAUSED, "a template waits paused at its ready point"
    assert state.is_file() and state.stat().st_size > 0
    assert memory.stat().st_size == 256 * 1024 * 1024
    assert not list(tmp_path.glob(".*partial")), "the state file was written atomically"

    clone = make_config(boot_from_template=True, memory_path=memory, devices_state_path=state)
    started = time.monotonic()
    async with Sandbox(clone) as a:
        clone_ready = time.monotonic() - started
        assert a.state is SandboxState.RUNNING
        await a.exec(["sh", "-c", "echo only-in-a > /tmp/mark"], check=True)
        async with Sandbox(clone) as b:
            r = await b.exec(["cat", "/tmp/mark"])
            assert r.exit_code != 0, "clones do not share what they write"
            assert (await b.exec(["uname", "-r"], check=True)).text.strip()
        assert (await a.exec(["cat", "/tmp/mark"], check=True)).text == "only-in-a\n"
    assert clone_ready < cold_boot, (clone_ready, cold_boot)

    drifted = make_config(boot_from_template=True, memory_path=memory, devices_state_path=state, vcpus=2, max_vcpus=5)
    with pytest.raises(ConfigError) as info:
        async with Sandbox(drifted):
            pytest.fail("a clone that no longer matches its template must not start")
    assert set(info.value.fields) == {"vcpus", "max_vcpus"} and "template has 1" in str(info.value)


async def test_a_clones_snapshot_restores_after_its_template_is_gone(make_config: MakeConfig, tmp_path: Path) -> None:
    memory, state = tmp_path / "template.mem", tmp_path / "template.state"
    async with Sandbox(make_config(boot_to_be_template=True, memory_path=memory, devices_state_path=state)):
        pass
    async with Sandbox(make_config(boot_from_template=True, memory_path=memory, devices_state_path=state)) as clone:
        await clone.exec(["sh", "-c", "echo in-the-clone > /tmp/mark"], check=True)
        snap = await clone.snapshot(tmp_path / "snap")
    memory.unlink()
    state.unlink()
    async with Sandbox.restore(snap) as restored:  # the snapshot holds all of the clone's RAM
        assert not restored.config.boot_from_template
        assert (await restored.exec(["cat", "/tmp/mark"], check=True)).text == "in-the-clone\n"


@pytest.mark.timeout(180)
async def test_a_microvm_template_is_refused_before_any_qemu_starts(make_config, tmp_path) -> None:
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
