"""A short soak (bench/soak.py): random lifecycle and hotplug work on real guests leaks nothing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import qemu_processes
from vmctl import guest

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def load_soak() -> ModuleType:
    """bench/ is a directory of scripts, not a package: load soak.py from its path."""
    spec = importlib.util.spec_from_file_location("vmctl_bench_soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and annotations look their module up
    sys.path.insert(0, str(SOAK.parent))  # its sibling modules (accel.py), as when run as a script
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
        sys.path.remove(str(SOAK.parent))
    return module


@pytest.mark.qemu
def test_a_short_soak_does_the_work_and_leaks_nothing(assets: guest.GuestAssets, runtime_dir: Path) -> None:
    soak = load_soak()
    result = soak.run_soak(minutes=0.8, size=2, seed=7)

    assert result["errors"] == [], result["errors"]
    # every operation happened (each slot does each one once before picking at random)
    for op in [*soak.WEIGHTS, "start"]:
        assert result["counts"].get(op, 0) > 0, f"{op} never ran: {result['counts']}"
    assert result["counts"]["start"] >= 2 + result["counts"]["restart"]
    assert result["sandboxes_started"] == result["counts"]["start"]

    leaks = result["leaks"]
    assert leaks["fd_growth"] <= 2, f"controller fds {leaks['fds_before']} -> {leaks['fds_after']}: {leaks['new_fds']}"
    assert leaks["qemu_left"] == [] and qemu_processes(str(runtime_dir)) == []
    assert leaks["runtime_dir_left"] == [] and list(runtime_dir.iterdir()) == []
    assert leaks["stray_tasks"] == [] and not leaks["disk_dir_left"]
    assert leaks["rss_growth_running_kib"] < 32 * 1024
    assert not result["leak"], result["leak_problems"]
