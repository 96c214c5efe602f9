"""The vmctl command, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmctl import guest

VMCTL = [sys.executable, "-m", "vmctl.cli"]


def run(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VMCTL, *args], capture_output=True, text=True, timeout=300, env=os.environ, **kw)  # type: ignore[call-overload,no-any-return]


def test_guest_build_reuses_the_cache(assets: guest.GuestAssets) -> None:
    before = assets.initrd.stat().st_mtime_ns
    out = run("guest", "build", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["initrd"] == str(assets.initrd) and data["key"] == assets.key
    assert assets.initrd.stat().st_mtime_ns == before, "nothing changed, nothing rebuilt"


def test_doctor_json(assets: guest.GuestAssets) -> None:
    out = run("doctor", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["total_memory_mib"] > 0 and report["cpu_count"] >= 1
    assert report["qemu_version"].startswith(("7.", "8.", "9.", "10."))
    assert isinstance(report["kvm_boots_guests"], bool) and report["kvm_reason"]


@pytest.mark.qemu
def test_run_prints_output_and_exits_with_the_guest_code(assets: guest.GuestAssets) -> None:
    out = run("run", "--memory", "256", "--", "sh", "-c", "echo hello from $(uname -s); echo err >&2; exit 3")
    assert out.returncode == 3, out.stderr
    assert out.stdout == "hello from Linux\n"
    assert "err" in out.stderr


def test_run_with_bad_config_names_the_field(tmp_path: Path) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text('[sandbox]\nkernel = "/nonexistent/vmlinuz"\ninitrd = "/nonexistent/initrd"\n')
    out = run("run", "--config", str(spec), "--", "true")
    assert out.returncode == 2
    assert "kernel" in out.stderr and "does not exist" in out.stderr


def test_state_diagram() -> None:
    out = run("state-diagram")
    assert out.returncode == 0 and out.stdout.startswith("stateDiagram-v2")


def cli_env() -> dict[str, str]:
    return dict(os.environ)


@pytest.mark.timeout(180)
def test_run_with_a_config_without_kernel_or_initrd_uses_the_default_guest(assets, tmp_path) -> None:
    """`vmctl run --config FILE` whose [sandbox] table has no kernel/initrd uses the default guest,
    as a fleet spec's [sandbox] does. Base: ConfigError demanding kernel and initrd, exit 2."""
    path = tmp_path / "sandbox.toml"
    path.write_text("[sandbox]\nmemory_mib = 256\n")
    proc = subprocess.run([*VMCTL, "run", "--config", str(path), "--", "uname", "-r"],
                          capture_output=True, text=True, env=cli_env(), timeout=170)  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}"
    assert proc.stdout.strip() == assets.kernel_version
