"""vmctl.cluster on a three-node Ray cluster on this machine (ray.cluster_utils.Cluster), with
real QEMU guests. One cluster for the module (it takes ~6 s and ~1.2 GiB); everything listens on
loopback only. The node-loss test kills a node's raylet, so it runs last.

Host actors get the test's VMCTL_RUNTIME_DIR through runtime_env (vmctl.cluster forwards the
driver's VMCTL_* variables), so the per-test leak check in conftest.py covers their sandboxes
too; each test ends with ``shutdown_hosts()`` so the next test's host actors see its own dir.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

# Read when Ray is imported: without it Ray hands the driver the machine's external address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray", reason="vmctl.cluster needs Ray: pip install 'vmctl[ray]'")

from tests.conftest import qemu_processes  # noqa: E402
from vmctl import (  # noqa: E402
    BlockDevice,
    ConfigError,
    GuestCommandFailed,
    IllegalTransition,
    InvalidArgument,
    NodeLost,
    SandboxConfig,
    SandboxState,
    SharedDirectory,
    cluster,  # noqa: E402
)
from vmctl.fleets.fleet import FleetEvent, FleetEventKind  # noqa: E402

pytestmark = pytest.mark.qemu

BOOT_ID = ["cat", "/proc/sys/kernel/random/boot_id"]


@dataclass
class RayCluster:
    address: str
    nodes: list[Any]  # ray.cluster_utils node handles, head first
    cluster: Any

    def node_id(self, i: int) -> str:
        return str(self.nodes[i].node_id)

    def raylet_pid(self, i: int) -> int:
        return int(self.nodes[i].all_processes["raylet"][0].process.pid)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    from ray.cluster_utils import Cluster

    loopback = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "resources": {cluster.HOST_RESOURCE: 1}}
    # a lost node is noticed within ~2 s (Ray's default is ~15 s or more)
    fast_health = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                   "health_check_failure_threshold": 3}  # fmt: skip
    c = Cluster(initialize_head=True, head_node_args={**loopback, "include_dashboard": False,
                                                      "_system_config": fast_health})  # fmt: skip
    try:
        nodes = [c.head_node, c.add_node(**loopback), c.add_node(**loopback)]
        c.wait_for_nodes()
        ray.init(address=c.address, _node_ip_address="127.0.0.1", log_to_driver=False)
        yield RayCluster(c.address, nodes, c)
    finally:
        ray.shutdown()
        c.shutdown()


def listeners_of(pids: set[int]) -> list[str]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            found.append(line.split()[3])
    return found


def ray_and_qemu_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"ray" in cmdline or b"qemu-system" in cmdline or b"gcs_server" in cmdline or b"raylet" in cmdline:
                pids.add(int(entry.name))
    return pids


async def test_a_fleet_spreads_over_three_nodes_with_a_template_per_node(
        ray_cluster: RayCluster, make_config: Callable[..., SandboxConfig]) -> None:  # fmt: skip
    events: list[FleetEvent] = []
    try:
        async with cluster.ClusterFleet(make_config(), size=3, strategy="SPREAD", template=True,
                                        on_event=events.append) as fleet:  # fmt: skip
            assert len(set(fleet.nodes)) == 3, "SPREAD put one member on each node"
            results = await fleet.map(lambda sb: sb.exec(BOOT_ID, check=True))
            assert all(o.ok for _, o in results), [o.error for _, o in results]
            assert len({o.value.stdout for _, o in results if o.value}) == 3, "three guests"

            sb = fleet.sandboxes[0]
            await sb.write_file("/root/note", b"hello")
            assert await sb.read_file("/root/note") == b"hello"
            await sb.pause()
            assert sb.state is SandboxState.PAUSED
            with pytest.raises(IllegalTransition):  # the vmctl error type, rebuilt on the driver
                await sb.pause()
            await sb.resume()
            with pytest.raises(InvalidArgument, match="timeout"):  # the timeout reaches the node's stop
                await sb.stop(timeout=-1)
            assert (await sb.refresh()) is SandboxState.RUNNING
            with pytest.raises(GuestCommandFailed) as failed:
                await sb.exec(["sh", "-c", "echo oops >&2; exit 3"], check=True)
            assert failed.value.result.exit_code == 3 and b"oops" in failed.value.result.stderr

            async with sb.process(["sh", "-c", "echo first; read line; echo got $line; echo err >&2; exit 4"]) as p:
                assert await p.stdout.receive() == b"first\n"  # while the command still runs
                await p.stdin.send(b"hi\n")
                await p.stdin.aclose()
                assert await p.stdout.read_all() == b"got hi\n" and await p.stderr.read_all() == b"err\n"
                assert await p.wait() == 4 and p.returncode == 4

            infos = await cluster.hosts()
            assert {i.node_id for i in infos} == {ray_cluster.node_id(i) for i in range(3)}
            assert all(len(i.sandboxes) == 1 and i.free_memory_mib > 0 and not i.restarted for i in infos)

            bad = [a for a in listeners_of(ray_and_qemu_pids())
                   if not a.startswith(("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:"))]  # fmt: skip
            assert bad == [], f"listening beyond loopback: {bad}"
            summary = fleet.summary()
            assert [row["node"] for row in summary] == fleet.nodes
            assert all(row["state"] == "running" and row["boot_seconds"] for row in summary)
        assert all(sb.state is SandboxState.STOPPED for sb in fleet.sandboxes)
        assert sum(e.kind is FleetEventKind.READY for e in events) == 3
    finally:
        await cluster.shutdown_hosts()


async def test_a_cluster_fleet_logs_a_failing_on_event_callback_as_the_local_fleet_does(
        ray_cluster: RayCluster, make_config: Callable[..., SandboxConfig],
        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from tests.test_members import assert_callback_failure_reported, broken_display

    try:
        async with cluster.ClusterFleet(make_config(), size=1, strategy="PACK", on_event=broken_display) as fleet:
            results = await fleet.map(lambda sb: sb.exec(["true"]))
            assert [outcome.ok for _, outcome in results] == [True]
    finally:
        await cluster.shutdown_hosts()
    assert_callback_failure_reported(capsys.readouterr().err, "fleet")


async def test_move_to_another_node_keeps_the_guest(
        ray_cluster: RayCluster, make_config: Callable[..., SandboxConfig], tmp_path: Path) -> None:  # fmt: skip
    disk = tmp_path / "data.img"
    disk.write_bytes(b"\0" * (8 << 20))
    out, gone = tmp_path / "out", tmp_path / "gone"
    out.mkdir()
    gone.mkdir()
    try:
        async with cluster.ClusterFleet(make_config(pci_bridges=3), size=1, strategy="PACK", wait=False) as fleet:
            ready = [m async for m in fleet.as_ready()]
            assert [m.sandbox for m in ready] == fleet.sandboxes and ready[0].boot_seconds
            sb = fleet.sandboxes[0]
            boot_id = (await sb.exec(BOOT_ID, check=True)).stdout
            await sb.write_file("/root/note", b"kept")
            plugged = await sb.hotplug(BlockDevice(path=disk, id="data"))
            assert plugged.guest_path and plugged.guest_path.startswith("/dev/")
            await sb.hotplug(SharedDirectory(host_path=out, guest_path="/out", read_only=False, id="out"))
            await sb.hotplug(SharedDirectory(host_path=gone, guest_path="/gone", id="gone"))
            source = sb.node
            target = next(ray_cluster.node_id(i) for i in range(3) if ray_cluster.node_id(i) != source)
            gone.rmdir()  # its virtiofsd still serves it here; the target node has no such directory
            with pytest.raises(ConfigError) as info:
                await sb.move_to(target[:12])
            assert info.value.fields == ("devices.gone.host_path",) and "before moving" in str(info.value)
            assert sb.node == source and sb.state is SandboxState.RUNNING, "refused before anything was saved"
            await sb.unplug("gone")
            started = time.monotonic()
            await sb.move_to(target[:12])
            moved_in = time.monotonic() - started
            assert sb.node == target and sb.state is SandboxState.RUNNING
            assert (await sb.exec(BOOT_ID, check=True)).stdout == boot_id, "the same guest, not a new boot"
            assert await sb.read_file("/root/note") == b"kept"
            await sb.exec(["sh", "-c", "echo after-the-move > /out/moved"], check=True)
            assert (out / "moved").read_text() == "after-the-move\n", "the share is mounted again on the target"
            assert [d.id for d in await sb.devices() if d.id == "data"] == ["data"], "hot-plugged disk moved too"
            await sb.unplug("data")
            infos = {i.node_id: i for i in await cluster.hosts()}
            assert infos[target].sandboxes == (sb.id,) and infos[source].sandboxes == ()
            assert moved_in < 60
        assert sb.state is SandboxState.STOPPED
    finally:
        await cluster.shutdown_hosts()


DRIVER = """
import anyio, os, sys
from vmctl import SandboxConfig, cluster
cluster.connect(sys.argv[1], _node_ip_address="127.0.0.1", log_to_driver=False)
async def main():
    config = SandboxConfig(kernel=sys.argv[2], initrd=sys.argv[3], memory_mib=256)
    sb = await cluster.start_detached(config, "keeper")
    await sb.write_file("/root/note", b"from the first driver")
    print(sb.node)
anyio.run(main)
"""


async def test_a_detached_sandbox_outlives_its_driver(
        ray_cluster: RayCluster, make_config: Callable[..., SandboxConfig]) -> None:  # fmt: skip
    config = make_config()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with anyio.fail_after(180):
        done = await anyio.run_process([sys.executable, "-c", DRIVER, ray_cluster.address, str(config.kernel),
                                        str(config.initrd)], env=env, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    node = done.stdout.decode().strip().splitlines()[-1]
    sb = await cluster.attach("keeper")
    try:
        assert sb.node == node and sb.state is SandboxState.RUNNING
        assert await sb.read_file("/root/note") == b"from the first driver"
    finally:
        await sb.stop()
    with pytest.raises(Exception, match="no detached cluster sandbox"):
        for _ in range(50):  # the actor's name is released once Ray has killed it
            await cluster.attach("keeper")
            await anyio.sleep(0.1)


async def test_the_fleet_cli_runs_on_ray_and_names_each_members_node(ray_cluster: RayCluster, tmp_path: Path) -> None:
    spec = tmp_path / "fleet.toml"
    spec.write_text('[fleet]\nsize = 2\ntemplate = true\ncommands = [["uname", "-r"]]\n\n[sandbox]\nmemory_mib = 256\n')
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with anyio.fail_after(240):
        done = await anyio.run_process([sys.executable, "-m", "vmctl.cli", "fleet", str(spec), "--json",
                                        "--ray", ray_cluster.address], env=env, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads(done.stdout)
    assert report["ok"] and len(report["members"]) == 2
    nodes = {ray_cluster.node_id(i) for i in range(3)}
    assert all(m["node"] in nodes and m["exit_codes"] == [0] for m in report["members"])
    assert len({m["node"] for m in report["members"]}) == 2, "SPREAD by default"


async def test_a_restarted_host_actor_comes_back_empty_and_says_so(
        ray_cluster: RayCluster, make_config: Callable[..., SandboxConfig], runtime_dir: Path) -> None:  # fmt: skip
    events: list[FleetEvent] = []
    try:
        async with cluster.ClusterFleet(make_config(), size=1, strategy="PACK", on_event=events.append) as fleet:
            sb = fleet.sandboxes[0]
            qemu = await sb.pid()
            before = await sb.host.info()
            os.kill(before.pid, 9)  # the actor's worker process: Ray restarts the actor (max_restarts=1)
            with anyio.fail_after(30):
                while not sb.lost:  # noqa: ASYNC110 - the fleet's watcher marks it
                    await anyio.sleep(0.2)
            assert [e.kind for e in events if e.kind is FleetEventKind.LOST] == [FleetEventKind.LOST]
            with pytest.raises(NodeLost):
                await sb.exec(["true"])
            with anyio.fail_after(60):
                while True:  # the same actor, restarted by Ray (unavailable while it restarts)
                    try:
                        after = await sb.host.actor.info.remote()
                        break
                    except ray.exceptions.ActorUnavailableError:
                        await anyio.sleep(0.2)
            assert after.restarted and after.sandboxes == () and after.incarnation != before.incarnation
            reply = await sb.host.actor.call.remote(sb.id, "exec", (["true"],), {})
            assert reply.error is not None and reply.error.kind == "NodeLost", reply
            assert "restarted" in reply.error.message
            assert qemu is not None and not running(qemu), "QEMU died with the old actor"
    finally:
        await cluster.shutdown_hosts()
        from vmctl.core.paths import sweep_stale_run_dirs

        sweep_stale_run_dirs(runtime_dir)  # the killed actor's run directory


def running(pid: int) -> bool:
    """A live process (a zombie is dead: this machine's PID 1 may never reap an orphan)."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


KILLED_DRIVER = """
import anyio, sys
from vmctl import SandboxConfig, cluster
cluster.connect(sys.argv[1], log_to_driver=False)
async def main():
    config = SandboxConfig(kernel=sys.argv[2], initrd=sys.argv[3], memory_mib=256)
    async with cluster.ClusterFleet(config, size=2, template=True) as fleet:
        print(*[await sb.pid() for sb in fleet.sandboxes], flush=True)
        await anyio.sleep(600)
anyio.run(main)
"""


async def test_a_killed_driver_takes_its_sandboxes_with_it(
        ray_cluster: RayCluster, make_config: Callable[..., SandboxConfig], runtime_dir: Path) -> None:  # fmt: skip
    config = make_config()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    driver = await anyio.open_process([sys.executable, "-c", KILLED_DRIVER, ray_cluster.address, str(config.kernel),
                                       str(config.initrd)], env=env)  # fmt: skip
    try:
        assert driver.stdout is not None
        line = b""
        with anyio.fail_after(180):
            while not line.endswith(b"\n"):
                line += await driver.stdout.receive()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2 and all(running(p) for p in pids)
    finally:
        driver.kill()
        await driver.wait()
    started = time.monotonic()
    while any(running(p) for p in pids) and time.monotonic() - started < 30:  # noqa: ASYNC110
        await anyio.sleep(0.2)
    gone_after = time.monotonic() - started
    assert not any(running(p) for p in pids), "QEMU outlived the driver's host actors"
    assert gone_after < 30
    # Ray force-kills a dead driver's actors and every process they started (the raylet is a
    # subreaper and kills a dead worker's descendants: its vmctl reaper too), so their run and
    # template directories may stay, marked with an owner that is gone: the next sandbox
    # started on the node sweeps them.
    from vmctl.core.paths import sweep_stale_run_dirs

    sweep_stale_run_dirs(runtime_dir)
    assert list(runtime_dir.iterdir()) == []


async def test_a_lost_node_fails_its_members_quickly_and_the_others_finish(
        ray_cluster: RayCluster, make_config: Callable[..., SandboxConfig], runtime_dir: Path) -> None:  # fmt: skip
    events: list[FleetEvent] = []
    victim = ray_cluster.node_id(2)
    try:
        async with cluster.ClusterFleet(make_config(), size=3, strategy="SPREAD", on_event=events.append) as fleet:
            doomed = [sb for sb in fleet.sandboxes if sb.node == victim]
            assert len(doomed) == 1
            doomed_qemu = await doomed[0].pid()

            async def job(sb: cluster.RemoteSandbox) -> bytes:
                return (await sb.exec(["sh", "-c", "touch /tmp/started; sleep 6; echo done"], check=True)).stdout

            async def kill_later() -> None:  # once the doomed member's job runs (a guest-side wait)
                await doomed[0].exec(["sh", "-c", "until [ -e /tmp/started ]; do sleep 0.05; done"], timeout=30)
                os.kill(ray_cluster.raylet_pid(2), 9)

            started = time.monotonic()
            async with anyio.create_task_group() as tg:
                tg.start_soon(kill_later)
                results = await fleet.map(job)
            took = time.monotonic() - started
            by_id = {sb.id: o for sb, o in results}
            assert isinstance(by_id[doomed[0].id].error, NodeLost), by_id[doomed[0].id]
            assert all(o.value == b"done\n" for sb, o in results if sb is not doomed[0])
            assert took < 20
            lost = [e for e in events if e.kind is FleetEventKind.LOST]
            assert [e.sandbox_id for e in lost] == [doomed[0].id]
            assert [row["state"] for row in fleet.summary()].count("lost") == 1
        for _ in range(100):  # the dead node's host actor fenced itself: its QEMU is gone
            if doomed_qemu is None or not running(doomed_qemu):
                break
            await anyio.sleep(0.1)
        assert doomed_qemu is not None and not running(doomed_qemu)
        assert qemu_processes(str(runtime_dir)) == []
    finally:
        await cluster.shutdown_hosts()
        # the dead node's run directory stays until the next sandbox on a live node sweeps it
        from vmctl.core.paths import sweep_stale_run_dirs

        sweep_stale_run_dirs(runtime_dir)
