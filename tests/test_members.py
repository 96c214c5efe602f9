"""What Fleet, SandboxPool and ClusterFleet share (vmctl/members.py), checked on the local two;
tests/test_cluster.py checks the cluster fleet against the same expectations."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assert_no_stray_tasks
from vmctl import Fleet, FleetError, SandboxPool
from vmctl.testing import FakeQemu, fake_config

#: what every owner logs when the user's ``on_event`` raises (and it goes on)
CALLBACK_FAILED = "{owner} on_event callback failed"


def broken_display(event: object) -> None:
    raise RuntimeError("the progress display broke")


def assert_callback_failure_reported(stderr: str, owner: str) -> None:
    assert CALLBACK_FAILED.format(owner=owner) in stderr, stderr
    assert "the progress display broke" in stderr


async def test_a_fleet_logs_a_failing_on_event_callback_and_goes_on(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    async with Fleet(fake_config(tmp_path), size=2, backend=FakeQemu(), on_event=broken_display) as fleet:
        results = await fleet.map(lambda sb: sb.exec(["true"]))
        assert [outcome.ok for _, outcome in results] == [True, True]
    assert_callback_failure_reported(capsys.readouterr().err, "fleet")
    await assert_no_stray_tasks()


async def test_a_pool_logs_a_failing_on_event_callback_and_goes_on(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    async with SandboxPool(fake_config(tmp_path), size=1, template=False, backend=FakeQemu(),
                           on_event=broken_display) as pool:  # fmt: skip
        async with pool.acquire(timeout=30) as sb:
            assert (await sb.exec(["true"])).ok
    assert_callback_failure_reported(capsys.readouterr().err, "pool")
    await assert_no_stray_tasks()


def test_every_fleet_checks_its_size_and_configs_alike(tmp_path: Path) -> None:
    from vmctl.cluster import ClusterFleet

    config = fake_config(tmp_path)
    for owner in (Fleet, ClusterFleet):
        with pytest.raises(FleetError, match="size: a fleet needs at least one sandbox"):
            owner([])
        with pytest.raises(FleetError, match="size: give either one config and a size"):
            owner([config, config], size=3)
        with pytest.raises(FleetError, match="max_concurrent_starts: must be at least 1"):
            owner(config, size=2, max_concurrent_starts=0)
