"""Host directories in the guest over virtio-fs (SharedDirectory), on real QEMU: cold and hot
plugs, what the guest can reach through a share (nothing outside it), read-only enforced on
the host, and no virtiofsd left behind on any path."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from vmctl import (
    ConfigError,
    Fleet,
    GuestError,
    NotSupported,
    Sandbox,
    SandboxConfig,
    SandboxPool,
    SandboxState,
    SharedDirectory,
    VmctlError,
    guest,
)
from vmctl.hypervisors import jail

from .conftest import processes_left, virtiofsd_processes

pytestmark = pytest.mark.qemu
MakeConfig = Callable[..., SandboxConfig]


def tree(tmp_path: Path, name: str, files: dict[str, str]) -> Path:
    top = tmp_path / name
    top.mkdir()
    for rel, text in files.items():
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_text(text)
    return top


async def sh(sb: Sandbox, script: str) -> tuple[int, str]:
    r = await sb.exec(["sh", "-c", script])
    return r.exit_code, r.text + r.stderr.decode(errors="replace")


async def test_a_cold_read_only_share_and_a_hot_writable_one(make_config: MakeConfig, tmp_path: Path,
                                                            runtime_dir: Path) -> None:  # fmt: skip
    data = tree(tmp_path, "data", {"a.txt": "from the host\n", "sub/b.txt": "nested\n"})
    out = tmp_path / "out"
    out.mkdir()
    config = make_config(devices=[SharedDirectory(host_path=data, guest_path="/data")])
    async with Sandbox(config) as sb:
        row = next(d for d in sb.devices if isinstance(d.device, SharedDirectory))
        assert row.guest_path == "/data" and not row.hotplugged
        assert (await sb.exec(["cat", "/data/a.txt", "/data/sub/b.txt"], check=True)).text == "from the host\nnested\n"
        mounts = (await sb.exec(["cat", "/proc/mounts"], check=True)).text
        assert any(line.split()[1:3] == ["/data", "virtiofs"] and "ro" in line.split()[3].split(",")
                   for line in mounts.splitlines()), mounts  # fmt: skip
        code, said = await sh(sb, "echo x > /data/new")
        assert code != 0 and not (data / "new").exists(), said
        # the guest's root remounting it read-write changes nothing: read-only is the host's
        code, said = await sh(sb, "mount -o remount,rw /data && echo x > /data/new")
        assert code != 0 and not (data / "new").exists(), said
        (data / "later.txt").write_text("written on the host while mounted\n")
        assert (await sb.exec(["cat", "/data/later.txt"], check=True)).text == "written on the host while mounted\n"
        daemons = virtiofsd_processes()
        assert daemons, "each share has its virtiofsd"

        hot = await sb.hotplug(SharedDirectory(host_path=out, guest_path="/out", read_only=False, id="results"))
        assert hot.guest_path == "/out" and hot.hotplugged
        await sb.exec(["sh", "-c", "mkdir /out/build && echo built > /out/build/result"], check=True)
        assert (out / "build" / "result").read_text() == "built\n"
        assert (out / "build" / "result").stat().st_uid == os.geteuid()

        async with sb.process(["sh", "-c", "cd /out && echo ready && sleep 30"]) as busy:
            assert (await busy.stdout.receive()).startswith(b"ready")
            with pytest.raises(VmctlError, match="in use"):
                await sb.unplug("results")
            assert "results" in [d.id for d in sb.devices], "a share in use stays plugged"
            await busy.signal(9)
            await busy.wait()
        await sb.unplug("results")
        assert "results" not in [d.id for d in sb.devices]
        code, _ = await sh(sb, "grep -q ' /out virtiofs ' /proc/mounts")
        assert code != 0, "unmounted in the guest before the device went"
        assert len(virtiofsd_processes()) < len(daemons) + 1
    assert virtiofsd_processes() == []
    assert (out / "build" / "result").read_text() == "built\n", "the host keeps what the guest wrote"


async def test_read_only_is_the_hosts_even_without_the_jail(make_config: MakeConfig, tmp_path: Path,
                                                           runtime_dir: Path) -> None:  # fmt: skip
    """With QEMU unjailed (no jail helper for virtiofsd), a read-only share is still a read-only
    bind in virtiofsd's own mount namespace: guest root remounting it read-write writes nothing."""
    data = tree(tmp_path, "data", {"a.txt": "x\n"})
    async with Sandbox(make_config(jail=False, devices=[SharedDirectory(host_path=data, guest_path="/data")])) as sb:
        code, said = await sh(sb, "mount -o remount,rw /data; echo y > /data/a.txt; echo z > /data/new")
        assert (data / "a.txt").read_text() == "x\n" and not (data / "new").exists(), said
        assert (await sb.exec(["cat", "/data/a.txt"], check=True)).text == "x\n"
    assert virtiofsd_processes() == []


async def test_a_virtiofsd_that_dies_fails_the_sandbox_at_once(make_config: MakeConfig, tmp_path: Path,
                                                               runtime_dir: Path) -> None:  # fmt: skip
    """Its share's I/O would hang in the guest: the sandbox fails, naming the share, instead."""
    data = tree(tmp_path, "data", {"a.txt": "x\n"})
    async with Sandbox(make_config(devices=[SharedDirectory(host_path=data, guest_path="/data")])) as sb:
        for pid in virtiofsd_processes():
            with contextlib.suppress(ProcessLookupError):  # its sandboxed child goes with it
                os.kill(pid, signal.SIGKILL)
        assert await sb.wait_for_state(SandboxState.FAILED, timeout=30) is SandboxState.FAILED
        assert "virtiofsd of share share0" in sb.failure
    assert virtiofsd_processes() == []
    with pytest.raises(ConfigError) as info:  # microvm's virtio is legacy: virtiofsd cannot serve it
        make_config(machine="microvm", devices=[SharedDirectory(host_path=data, guest_path="/data")])
    assert info.value.fields == ("devices[0].share",) and "q35" in str(info.value)


async def test_nothing_outside_the_share_is_reachable(make_config: MakeConfig, tmp_path: Path,
                                                      runtime_dir: Path) -> None:  # fmt: skip
    secret = tmp_path / "secret.txt"
    secret.write_text("host-secret\n")
    shared = tree(tmp_path, "shared", {"inside.txt": "inside\n"})
    (shared / "abs-link").symlink_to(secret)  # planted on the host side
    (shared / "rel-link").symlink_to("../secret.txt")
    (shared / "etc-link").symlink_to("/etc")
    config = make_config(devices=[SharedDirectory(host_path=shared, guest_path="/mnt/s", read_only=False)])
    async with Sandbox(config) as sb:
        for path in ("/mnt/s/abs-link", "/mnt/s/rel-link", "/mnt/s/../secret.txt", "/mnt/s/etc-link/hostname"):
            _, said = await sh(sb, f"cat {path}")
            assert "host-secret" not in said, path
        _, said = await sh(sb, "cat /mnt/s/etc-link/passwd")  # the guest's own /etc, not the host's
        assert Path("/etc/passwd").read_text() != said
        # a link the guest makes points into the guest, whatever its target names
        await sb.exec(["sh", "-c", f"ln -s {secret} /mnt/s/guest-link && ln -s /etc /mnt/s/g-etc"], check=True)
        _, said = await sh(sb, "cat /mnt/s/guest-link")
        assert "host-secret" not in said
        assert os.readlink(shared / "guest-link") == str(secret), "a link is stored as written, never followed"
        # no device nodes: the guest's root cannot plant one in the host's directory
        code, said = await sh(sb, "mknod /mnt/s/disk b 8 0")
        assert code != 0 and not (shared / "disk").exists(), said
        # the share's root is its top: '..' from it is the guest's own root
        listing = (await sb.exec(["ls", "/mnt/s/.."], check=True)).text.split()
        assert "s" in listing and "secret.txt" not in listing
        code, said = await sh(sb, "ls /mnt/s/../../")
        assert "secret.txt" not in said
    assert virtiofsd_processes() == []


async def test_virtiofsd_is_jailed_in_the_sandbox_cgroup(make_config: MakeConfig, tmp_path: Path,
                                                          runtime_dir: Path) -> None:  # fmt: skip
    if os.geteuid() != 0 or not jail.status_allows("namespaces"):
        pytest.skip("the jail's namespaces need root")
    shared = tree(tmp_path, "shared", {"f": "x"})
    async with Sandbox(make_config(devices=[SharedDirectory(host_path=shared, guest_path="/work")])) as sb:
        pids = virtiofsd_processes()
        assert pids
        qemu_cgroup = Path(f"/proc/{sb.hypervisor.qemu_pid}/cgroup").read_text()
        for pid in pids:
            assert Path(f"/proc/{pid}/cgroup").read_text() == qemu_cgroup, "virtiofsd joins the sandbox's cgroup"
            assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
            assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
            root_entries = sorted(os.listdir(f"/proc/{pid}/root"))
            assert "root" not in root_entries and "home" not in root_entries, root_entries
    assert virtiofsd_processes() == []


async def test_a_cancelled_start_leaves_no_virtiofsd(make_config: MakeConfig, tmp_path: Path,
                                                     runtime_dir: Path) -> None:  # fmt: skip
    shared = tree(tmp_path, "shared", {"f": "x"})
    sb = Sandbox(make_config(devices=[SharedDirectory(host_path=shared, guest_path="/work")]))
    seen: set[int] = set()
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def cancel_once_virtiofsd_runs() -> None:
                while True:  # the start's steps as the hypervisor reports them (startup_timings)
                    try:
                        timings = sb.hypervisor.startup_timings
                    except VmctlError:  # not created yet
                        timings = {}
                    if "shares" in timings:
                        seen.update(virtiofsd_processes())
                        scope.cancel()
                        return
                    await anyio.sleep(0.005)

            tg.start_soon(cancel_once_virtiofsd_runs)
            async with sb:
                pytest.fail("the start should have been cancelled")
    assert seen and processes_left(seen) == []
    assert sb.state is SandboxState.STOPPED
    assert virtiofsd_processes() == []


async def test_a_cancelled_hotplug_leaves_no_virtiofsd_behind(make_config: MakeConfig, tmp_path: Path,
                                                               runtime_dir: Path) -> None:  # fmt: skip
    """Cancelled at any point, a share either made it into the table (and unplugs as usual) or
    left nothing: no virtiofsd, no socket."""
    shared = tree(tmp_path, "shared", {"f": "x"})
    async with Sandbox(make_config(pci_bridges=2)) as sb:
        for n, after in enumerate((0.0, 0.002, 0.01, 0.03, 0.1, 5.0)):
            with anyio.move_on_after(after):
                await sb.hotplug(SharedDirectory(host_path=shared, guest_path=f"/s{n}", id=f"s{n}"))
            rows = [d.id for d in sb.devices if isinstance(d.device, SharedDirectory)]
            assert bool(virtiofsd_processes()) == bool(rows), (after, rows)  # (virtiofsd forks its sandboxed child)
            sockets = {p.name for p in (sb.run_dir / "q").glob("*.fs.sock")} if sb.run_dir else set()
            assert sockets <= {f"{r}.fs.sock" for r in rows}, (after, sockets)
            for row in rows:
                await sb.unplug(row)
            assert virtiofsd_processes() == []
    assert virtiofsd_processes() == []


async def test_shares_refused_where_they_cannot_work(make_config: MakeConfig, tmp_path: Path,
                                                     runtime_dir: Path) -> None:  # fmt: skip
    shared = tree(tmp_path, "shared", {"f": "x"})
    share = SharedDirectory(host_path=shared, guest_path="/work")
    with pytest.raises(ConfigError) as info:
        make_config(devices=[share], boot_to_be_template=True, memory_path=tmp_path / "m",
                    devices_state_path=tmp_path / "s")  # fmt: skip
    assert info.value.fields == ("devices[0].share",) and "template" in str(info.value)
    for bad, field in [({"guest_path": "/proc"}, "share.guest_path"), ({"guest_path": "work"}, "share.guest_path"),
                       ({"guest_path": "/a/../etc"}, "share.guest_path"), ({"tag": "x" * 40}, "share.tag"),
                       ({"host_path": tmp_path / "missing"}, "share.host_path")]:  # fmt: skip
        args = {"host_path": shared, "guest_path": "/work", **bad}
        with pytest.raises(ConfigError) as info:
            make_config(devices=[SharedDirectory(**args)])  # type: ignore[arg-type]
        assert info.value.fields == (f"devices[0].{field.removeprefix('share.')}",), (bad, info.value)
    with pytest.raises(ConfigError) as info:
        make_config(devices=[SharedDirectory(host_path=tmp_path / "{member}", guest_path="/w")])
    assert info.value.fields == ("devices[0].host_path",) and "{index} or {id}" in str(info.value)
    with pytest.raises(ConfigError) as info:  # {index} belongs to fleets and pools
        async with Sandbox(make_config(devices=[SharedDirectory(host_path=tmp_path / "{index}", guest_path="/w")])):
            pytest.fail("a lone sandbox has no index")
    assert info.value.fields == ("devices[0].host_path",) and not (tmp_path / "{index}").exists()
    assert virtiofsd_processes() == []
    async with Sandbox(make_config(devices=[share])) as sb:
        await sb.pause()
        with pytest.raises(NotSupported, match="resume"):  # its guest must unmount the share for the save
            await sb.snapshot(tmp_path / "snap")
        assert not (tmp_path / "snap").exists() and sb.state is SandboxState.PAUSED


async def test_a_snapshot_restores_its_shares_mounted(make_config: MakeConfig, tmp_path: Path,
                                                      runtime_dir: Path) -> None:  # fmt: skip
    data = tree(tmp_path, "data", {"a.txt": "read-only data\n"})
    out = tmp_path / "out"
    out.mkdir()
    async with Sandbox(make_config(devices=[SharedDirectory(host_path=data, guest_path="/data")])) as sb:
        await sb.hotplug(SharedDirectory(host_path=out, guest_path="/out", read_only=False, id="results"))
        await sb.exec(["sh", "-c", "echo before > /out/f && echo in-memory > /tmp/mark"], check=True)
        # a file the guest holds open on a share: the save is refused, naming it, before anything is written
        async with sb.process(["sh", "-c", "exec 3</data/a.txt; echo ready; sleep 60"]) as busy:
            assert (await busy.stdout.receive()).startswith(b"ready")
            with pytest.raises(GuestError, match="/data") as info:
                await sb.snapshot(tmp_path / "refused")
            assert "pids" in str(info.value) and not (tmp_path / "refused").exists()
            await busy.signal(9)
            await busy.wait()
        await sb.exec(["umount", "/out"], check=True)  # unmounted by the guest itself: still saved, mounted after
        snap = await sb.snapshot(tmp_path / "snap")
        # the sandbox goes on with both shares mounted again
        assert (await sb.exec(["cat", "/data/a.txt"], check=True)).text == "read-only data\n"
        await sb.exec(["sh", "-c", "echo after > /out/g"], check=True)
        assert (out / "g").read_text() == "after\n"
        assert {d.id: d.guest_path for d in sb.devices if isinstance(d.device, SharedDirectory)} == \
            {"share0": "/data", "results": "/out"}  # fmt: skip
    assert virtiofsd_processes() == []
    (out / "host-side").write_text("written while no sandbox ran\n")
    out.rename(tmp_path / "elsewhere")  # a hot share's directory gone since the save: said before QEMU starts
    with pytest.raises(ConfigError) as info:
        async with Sandbox.restore(snap):
            pytest.fail("restored without its share's directory")
    assert info.value.fields == ("devices.results.host_path",)
    (tmp_path / "elsewhere").rename(out)
    async with Sandbox.restore(snap) as restored:
        assert (await restored.exec(["cat", "/tmp/mark"], check=True)).text == "in-memory\n", "the saved guest"
        said = (await restored.exec(["cat", "/data/a.txt", "/out/f", "/out/host-side"], check=True)).text
        assert said == "read-only data\nbefore\nwritten while no sandbox ran\n"
        await restored.exec(["sh", "-c", "echo restored > /out/h"], check=True)
        assert (out / "h").read_text() == "restored\n"
        code, _ = await sh(restored, "echo x > /data/new")
        assert code != 0 and not (data / "new").exists(), "still read-only"
        rows = {d.id: d for d in restored.devices if isinstance(d.device, SharedDirectory)}
        assert rows["results"].hotplugged and not rows["share0"].hotplugged
        assert rows["results"].guest_path == "/out" and rows["share0"].guest_path == "/data"
        await restored.unplug("share0")  # a config share sits on a port of its own: it can go too
        code, _ = await sh(restored, "grep -q ' /data virtiofs ' /proc/mounts")
        assert code != 0
    assert virtiofsd_processes() == []


def test_a_share_in_toml(tmp_path: Path, make_config: MakeConfig) -> None:
    (tmp_path / "checkout").mkdir()
    base = make_config()
    (tmp_path / "sb.toml").write_text(
        f'[sandbox]\nkernel = "{base.kernel}"\ninitrd = "{base.initrd}"\n'
        'devices = [{type = "share", host_path = "checkout", guest_path = "/workspace", read_only = false}]\n'
    )
    config = SandboxConfig.from_toml(tmp_path / "sb.toml")
    (share,) = config.devices
    assert isinstance(share, SharedDirectory)
    assert (share.host_path, share.guest_path, share.read_only) == (tmp_path / "checkout", "/workspace", False)
    assert SandboxConfig.from_mapping(config.to_mapping()) == config


async def test_a_pool_of_clones_with_a_shared_checkout_and_a_writable_directory_each(
        make_config: MakeConfig, tmp_path: Path, runtime_dir: Path) -> None:  # fmt: skip
    """The README's walk-through: a read-only checkout in every member of a template pool, a
    build writing to each member's own directory, one member saved and restored with both."""
    checkout = tree(tmp_path, "checkout", {"main.c": "int main(void) { return 0; }\n", "lib/util.h": "#pragma once\n"})
    builds = tmp_path / "builds"
    builds.mkdir()
    config = make_config(pci_bridges=2, devices=[
        SharedDirectory(host_path=checkout, guest_path="/src"),
        SharedDirectory(host_path=builds / "{index}", guest_path="/out", read_only=False)])  # fmt: skip
    async with SandboxPool(config, size=2) as pool:
        assert pool.template, "members are template clones"
        async with pool.acquire(timeout=120) as first, pool.acquire(timeout=120) as second:
            for sb in (first, second):
                await sb.exec(["sh", "-c", f"cp -r /src /out/tree && echo {sb.id} > /out/who"], check=True)
                code, _ = await sh(sb, "echo x > /src/new")
                assert code != 0, "the checkout is read-only in every member"
            made = {(d / "who").read_text().strip(): d for d in builds.iterdir() if (d / "who").exists()}
            assert set(made) == {first.id, second.id}, "each member wrote into a directory of its own"
            assert all(d.name.isdigit() for d in builds.iterdir()), "{index}: one directory per member"
            for d in made.values():
                assert (d / "tree" / "lib" / "util.h").read_text() == "#pragma once\n"
            snap = await first.snapshot(tmp_path / "snap")
            mine = made[first.id]
    assert virtiofsd_processes() == []
    async with Sandbox.restore(snap) as restored:
        assert (await restored.exec(["cat", "/src/main.c"], check=True)).text.startswith("int main")
        await restored.exec(["sh", "-c", "echo again > /out/after-restore"], check=True)
        assert (mine / "after-restore").read_text() == "again\n", "the member's own directory, mounted again"
    assert virtiofsd_processes() == []


async def test_a_clone_takes_the_shares_of_its_config(make_config: MakeConfig, tmp_path: Path,
                                                     runtime_dir: Path) -> None:  # fmt: skip
    memory, state = tmp_path / "template.mem", tmp_path / "template.state"
    async with Sandbox(make_config(boot_to_be_template=True, memory_path=memory, devices_state_path=state)):
        pass
    template_ram = memory.read_bytes()
    shared = tree(tmp_path, "shared", {"f": "for the clone\n"})
    clone = make_config(boot_from_template=True, memory_path=memory, devices_state_path=state)
    async with Sandbox(clone) as sb:  # its RAM is a private mapping of the template's file: no share can map it
        assert not sb.capabilities().share_hotplug
        with pytest.raises(NotSupported):
            await sb.hotplug(SharedDirectory(host_path=shared, guest_path="/w"))
    with pytest.raises(ConfigError) as info:
        make_config(boot_from_template=True, memory_path=memory, devices_state_path=state, pci_bridges=0,
                    devices=[SharedDirectory(host_path=shared, guest_path="/w")])  # fmt: skip
    assert info.value.fields == ("pci_bridges",)
    async with Sandbox(clone.replace(devices=(SharedDirectory(host_path=shared, guest_path="/w"),))) as sb:
        assert (await sb.exec(["cat", "/w/f"], check=True)).text == "for the clone\n"
        await sb.exec(["sh", "-c", "echo scribble > /tmp/x"], check=True)
    assert memory.read_bytes() == template_ram, "the clone wrote to a copy of its own"
    assert virtiofsd_processes() == []


@pytest.fixture(scope="module")
def generic_guest() -> guest.GuestAssets:
    """The default guest built from Debian's generic kernel (it has 9p; cached under its own key)."""
    return anyio.run(functools.partial(guest.ensure_default_assets, kernel="generic"))


async def test_9p_shares_on_the_generic_kernel_with_the_originals_msize(
        make_config: MakeConfig, generic_guest: guest.GuestAssets, tmp_path: Path, runtime_dir: Path) -> None:  # fmt: skip
    data = tree(tmp_path, "data", {"a.txt": "over 9p\n"})
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # QEMU itself writes a 9p share, as the jail's user
    shares = [SharedDirectory(host_path=data, guest_path="/data", protocol="9p"),
              SharedDirectory(host_path=out, guest_path="/out", protocol="9p", read_only=False)]  # fmt: skip
    with pytest.raises(ConfigError) as info:  # the cloud kernel has no 9p: refused before anything starts
        make_config(devices=shares)
    assert info.value.fields == ("devices[0].protocol",) and "--kernel generic" in str(info.value)
    generic = {"kernel": generic_guest.kernel, "initrd": generic_guest.initrd}
    for msize in (None, 262144):
        config = make_config(devices=shares, **generic, **({"msize_9p": msize} if msize else {}))
        assert config.msize_9p == (msize or 8192)
        async with Sandbox(config) as sb:
            assert (await sb.exec(["cat", "/data/a.txt"], check=True)).text == "over 9p\n"
            mounts = [line.split() for line in (await sb.exec(["cat", "/proc/mounts"], check=True)).text.splitlines()]
            (mount,) = [m for m in mounts if m[1] == "/data"]
            assert mount[2] == "9p" and f"msize={msize or 8192}" in mount[3] and "ro" in mount[3].split(",")
            code, _ = await sh(sb, "echo x > /data/new")
            assert code != 0 and not (data / "new").exists(), "read-only on the host side (readonly=on)"
            await sb.exec(["sh", "-c", f"echo {msize} > /out/written"], check=True)
            assert (out / "written").read_text() == f"{msize}\n"
            assert virtiofsd_processes() == [], "QEMU serves 9p itself"
            with pytest.raises(NotSupported, match="cold-plugged only"):
                await sb.hotplug(SharedDirectory(host_path=data, guest_path="/more", protocol="9p"))
            with pytest.raises(NotSupported, match="cold-plugged only"):
                await sb.unplug("share0")
            with pytest.raises(NotSupported, match="9p"):
                await sb.snapshot(tmp_path / f"snap-{msize}")
            assert not (tmp_path / f"snap-{msize}").exists()
    with pytest.raises(ConfigError) as info:
        make_config(msize_9p=100, **generic)
    assert info.value.fields == ("msize_9p",)


async def test_shares_survive_detach_and_attach(make_config: MakeConfig, tmp_path: Path, runtime_dir: Path) -> None:
    data = tree(tmp_path, "data", {"a.txt": "kept across the attach\n"})
    out = tmp_path / "out"
    out.mkdir()
    async with Sandbox(make_config(pci_bridges=2, devices=[SharedDirectory(host_path=data, guest_path="/data")]),
                       id="sharing", detached=True) as sb:  # fmt: skip
        await sb.hotplug(SharedDirectory(host_path=out, guest_path="/out", read_only=False, id="out"))
    assert virtiofsd_processes(), "a detached sandbox keeps its shares' virtiofsd"
    async with Sandbox.attach("sharing") as sb:
        rows = {d.id: d.guest_path for d in sb.devices if isinstance(d.device, SharedDirectory)}
        assert rows == {"share0": "/data", "out": "/out"}
        assert (await sb.exec(["cat", "/data/a.txt"], check=True)).text == "kept across the attach\n"
        await sb.exec(["sh", "-c", "echo attached > /out/f"], check=True)
        assert (out / "f").read_text() == "attached\n"
        with pytest.raises(NotSupported, match="attached"):  # its virtiofsd would run outside the jail
            await sb.hotplug(SharedDirectory(host_path=out, guest_path="/more"))
        with pytest.raises(NotSupported, match="attached"):  # nor could its shares come back after a save
            await sb.snapshot(tmp_path / "snap")
        assert not (tmp_path / "snap").exists()
        assert (await sb.exec(["cat", "/data/a.txt"], check=True)).text == "kept across the attach\n"
        await sb.unplug("out")
        await sb.stop()
    assert virtiofsd_processes() == [], "stopping an attached sandbox ends its shares' virtiofsd too"


async def test_a_fleet_gives_each_member_its_own_directory(make_config: MakeConfig, tmp_path: Path,
                                                          runtime_dir: Path) -> None:  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    config = make_config(devices=[SharedDirectory(host_path=work / "{index}-{id}", guest_path="/w", read_only=False)])
    async with Fleet(config, size=2, id_prefix="builders") as fleet:
        for sb in fleet.sandboxes:
            await sb.exec(["sh", "-c", "echo mine > /w/f"], check=True)
    assert sorted(p.name for p in work.iterdir()) == ["0-builders-0", "1-builders-1"]
    async with Sandbox(make_config(pci_bridges=2), id="loner") as sb:  # a hot share's {id} is this sandbox's
        await sb.hotplug(SharedDirectory(host_path=tmp_path / "own-{id}", guest_path="/own", read_only=False))
        await sb.exec(["sh", "-c", "echo loner > /own/f"], check=True)
        with pytest.raises(ConfigError):  # no {index} outside a fleet
            await sb.hotplug(SharedDirectory(host_path=tmp_path / "{index}", guest_path="/idx"))
    assert (tmp_path / "own-loner" / "f").read_text() == "loner\n"
    assert all((p / "f").read_text() == "mine\n" and p.stat().st_mode & 0o777 == 0o700 for p in work.iterdir())
    assert virtiofsd_processes() == []


async def test_the_shared_build_example_runs_as_the_readme_says(tmp_path: Path, runtime_dir: Path) -> None:
    example = Path(__file__).parent.parent / "examples" / "shared_build.py"
    done = await anyio.run_process([sys.executable, str(example), str(tmp_path)], check=False)
    said = done.stdout.decode()
    assert done.returncode == 0, said + done.stderr.decode()[-2000:]
    assert "built 20 objects" in said and "file0.c.o says 27" in said, said
    built = [d for d in (tmp_path / "builds").iterdir() if any(d.rglob("*.o"))]
    assert len(built) == 1 and len(list(built[0].rglob("*.o"))) == 20, "one member built, into its own directory"
    assert (tmp_path / "saved" / "sandbox.json").is_file()
    assert virtiofsd_processes() == []
