"""Images with real software and copy-on-write disks, with real QEMU: a Debian image boots and runs
python3; images from a tarball and from a directory, and the errors for roots that cannot work;
sandboxes, a fleet, a template's clones and a snapshot's restore each writing their own overlay
over one read-only base, which stays as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import anyio
import pytest

from vmctl import Fleet, FleetError, InvalidArgument, Sandbox, SandboxConfig, guest
from vmctl.devices import BlockDevice, DeviceContext
from vmctl.errors import HostError
from vmctl.fleets.fleet import refuse_shared_writable_disks
from vmctl.guest.image import inside

pytestmark = pytest.mark.qemu
BUSYBOX = Path("/bin/busybox")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def debian_image() -> guest.BuiltImage:
    """One small Debian image (minbase + python3) per session; from the cache after the first."""
    events: list[guest.ImageProgress] = []
    try:
        built = anyio.run(lambda: guest.build_image(debian=True, packages=["python3"], progress=events.append))
    except HostError as exc:
        if "mmdebstrap" in str(exc) and ("mirror" in str(exc) or "install" in str(exc)):
            pytest.skip(f"no Debian image: {exc}")  # Debian's mirror is unreachable, or no mmdebstrap
        raise
    assert events and events[-1].step == "done", "the progress callback saw the build through"
    if not built.cached:
        print(f"\nDebian image built in {built.build_seconds:.1f} s, {built.size_bytes // 2**20} MiB")
    return built


@pytest.fixture(scope="session")
def busybox_root(assets: guest.GuestAssets) -> Path:
    """The default guest's small busybox root image (64 MiB): quick to boot, a fine shared base."""
    built = anyio.run(lambda: guest.ensure_default_assets(image=True))
    assert built.image is not None
    return built.image


def tiny_root(tree: Path) -> Path:
    """The smallest root vmctl can run: a static busybox as /bin/sh."""
    (tree / "bin").mkdir(parents=True)
    shutil.copyfile(BUSYBOX, tree / "bin" / "busybox")
    (tree / "bin" / "busybox").chmod(0o755)
    (tree / "bin" / "sh").symlink_to("busybox")
    (tree / "etc").mkdir()
    (tree / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return tree


# -- building -----------------------------------------------------------------------------------


async def test_debian_image_boots_and_runs_python(assets: guest.GuestAssets, debian_image: guest.BuiltImage) -> None:
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, image=debian_image.image, memory_mib=256,
                           image_overlay=True)  # fmt: skip
    before = sha256(debian_image.image)
    started = time.monotonic()
    async with Sandbox(config) as sb:
        boot = time.monotonic() - started
        result = await sb.exec(["python3", "-c", "print(1+1)"], check=True)
        assert result.text == "2\n"
        release = (await sb.exec(["cat", "/etc/os-release"], check=True)).text
        assert "bookworm" in release
        # Debian's own tools come first; busybox only fills gaps (no poweroff in minbase)
        where = (await sb.exec(["sh", "-c", "command -v ls; command -v poweroff; readlink /bin/sh"], check=True)).text
        assert where.split() == ["/usr/bin/ls", "/run/vmctl/bin/poweroff", "dash"]
    print(f"\nDebian image: ready after {boot:.2f} s")
    assert sha256(debian_image.image) == before


async def test_a_second_build_comes_from_the_cache(debian_image: guest.BuiltImage) -> None:
    again = await guest.build_image(debian=True, packages=["python3"])
    assert again.cached and again.image == debian_image.image and again.build_seconds == 0
    with pytest.raises(InvalidArgument, match="size_mib"):
        await guest.build_image(debian=True, packages=["python3"], size_mib=1)


async def test_image_build_errors_name_the_fix(tmp_path: Path) -> None:
    empty = tmp_path / "empty-root"
    (empty / "etc").mkdir(parents=True)
    with pytest.raises(InvalidArgument, match=r"no /bin/sh.*install a shell"):
        await guest.build_image(from_dir=empty)
    big = tiny_root(tmp_path / "big-root")
    (big / "blob").write_bytes(os.urandom(40 * 2**20))
    with pytest.raises(InvalidArgument, match=r"size_mib: 20 MiB is too small.*about \d+ MiB.*--size \d+"):
        await guest.build_image(from_dir=big, size_mib=20)
    with pytest.raises(InvalidArgument, match="exactly one source"):
        await guest.build_image(debian=True, from_dir=big)
    with pytest.raises(InvalidArgument, match="packages"):
        await guest.build_image(from_dir=big, packages=["python3"])
    assert not list((tmp_path).glob("**/.build-*"))


def test_payload_paths_resolve_inside_the_tree(tmp_path: Path) -> None:
    """An absolute symlink in a foreign root (merged /usr: /sbin -> /usr/sbin) points into the
    tree, never at the host's directory of that name."""
    (tmp_path / "usr" / "sbin").mkdir(parents=True)
    (tmp_path / "sbin").symlink_to("/usr/sbin")
    assert inside(tmp_path, "sbin/vmctl-agent") == tmp_path / "usr" / "sbin" / "vmctl-agent"
    (tmp_path / "etc").symlink_to("../../../../usr")
    assert inside(tmp_path, "etc/passwd") == tmp_path / "usr" / "passwd"  # ".." stops at the tree's root


async def test_from_tar_image_boots(assets: guest.GuestAssets, tmp_path: Path) -> None:
    tree = tiny_root(tmp_path / "rootfs")
    tar = tmp_path / "rootfs.tar"
    with tarfile.open(tar, "w") as t:
        t.add(tree, arcname=".")
    events: list[str] = []
    built = await guest.build_image(from_tar=tar, size_mib=32, rebuild=True, progress=lambda e: events.append(e.step))
    assert built.source == f"tar:{tar}" and built.size_bytes == 32 * 2**20
    assert {"unpack", "payload", "mke2fs", "done"} <= set(events)
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, image=built.image, memory_mib=256,
                           image_overlay=True)  # fmt: skip
    async with Sandbox(config) as sb:
        out = (await sb.exec(["sh", "-c", "ls /etc/vmctl-disk-root /usr/lib/vmctl/busybox && echo from-tar"],
                             check=True)).text  # fmt: skip
        assert out.endswith("from-tar\n")


# -- overlays: rendering and fleet rules (no QEMU) ------------------------------------------------


def test_overlay_renders_a_read_only_base_under_a_qcow2_overlay(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(b"\0" * 2**20)
    disk = BlockDevice(path=base, overlay=True, overlay_file=tmp_path / "top.qcow2")
    nodes = [b.spec for b in disk.backends("disk0", DeviceContext())]
    assert nodes == [
        {"driver": "file", "filename": str(base), "node-name": "disk0-base-file", "read-only": True},
        {"driver": "raw", "file": "disk0-base-file", "node-name": "disk0-base-fmt", "read-only": True},
        {"driver": "file", "filename": str(tmp_path / "top.qcow2"), "node-name": "disk0-file", "read-only": False},
        {"driver": "qcow2", "file": "disk0-file", "node-name": "disk0-fmt", "read-only": False,
         "backing": "disk0-base-fmt"},
    ]  # fmt: skip
    qcow2_base = BlockDevice(path=base, format="qcow2", overlay=True, overlay_file=tmp_path / "t.qcow2")
    base_fmt = qcow2_base.backends("d", DeviceContext())[1].spec
    assert base_fmt["read-only"] is True and base_fmt["backing"] is None  # never a name from inside the base
    problems = BlockDevice(path=base, overlay=True, read_only=True).problems(DeviceContext())
    assert [p.field for p in problems] == ["block.overlay"]
    problems = BlockDevice(path=base, overlay_file=tmp_path / "x.qcow2").problems(DeviceContext())
    assert [p.field for p in problems] == ["block.overlay_file"]


def test_fleet_accepts_overlays_and_refuses_real_sharing(assets: guest.GuestAssets, tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(b"\0" * 2**20)
    make = lambda **kw: SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, **kw)  # noqa: E731
    refuse_shared_writable_disks([make(image=base, image_overlay=True)] * 2)
    refuse_shared_writable_disks([make(devices=[BlockDevice(path=base, overlay=True)])] * 2)
    with pytest.raises(FleetError, match="share writable disks"):
        refuse_shared_writable_disks([make(image=base)] * 2)
    with pytest.raises(FleetError, match="share writable disks"):  # a base another member writes to
        refuse_shared_writable_disks([make(image=base, image_overlay=True), make(devices=[BlockDevice(path=base)])])
    kept = BlockDevice(path=base, overlay=True, overlay_file=tmp_path / "kept.qcow2")
    with pytest.raises(FleetError, match="kept.qcow2"):
        refuse_shared_writable_disks([make(devices=[kept])] * 2)


# -- overlays with QEMU -----------------------------------------------------------------------------


async def test_two_sandboxes_share_one_base_through_overlays(assets: guest.GuestAssets, busybox_root: Path,
                                                             tmp_path: Path) -> None:  # fmt: skip
    data = tmp_path / "data.img"
    await anyio.run_process(["mke2fs", "-q", "-t", "ext4", str(data), "16M"])
    before = {p: sha256(p) for p in (busybox_root, data)}
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, image=busybox_root, image_overlay=True,
                           memory_mib=256, devices=[BlockDevice(path=data, overlay=True, id="data")])  # fmt: skip
    async with Sandbox(config) as a, Sandbox(config) as b:
        overlays = [sb.run_dir / f"{i}.overlay.qcow2" for sb in (a, b) for i in ("root", "data")]  # type: ignore[operator]
        assert all(p.is_file() for p in overlays)
        assert '"backing":"root-base-fmt"' in " ".join(a.command_line)
        for name, sb in (("a", a), ("b", b)):
            await sb.exec(["sh", "-c", f"echo {name} > /root/who && mkdir -p /mnt && mount /dev/sdb /mnt && "
                                       f"echo {name} > /mnt/who && sync"], check=True)  # fmt: skip
        for name, sb in (("a", a), ("b", b)):
            assert (await sb.exec(["cat", "/root/who", "/mnt/who"], check=True)).text == f"{name}\n{name}\n"
    assert not any(p.exists() for p in overlays), "the overlays go with their sandboxes"
    assert {p: sha256(p) for p in before} == before, "the bases are untouched"


async def test_fleet_of_two_on_one_base(assets: guest.GuestAssets, busybox_root: Path) -> None:
    before = sha256(busybox_root)
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, image=busybox_root, image_overlay=True,
                           memory_mib=256)  # fmt: skip
    async with Fleet(config, size=2, max_concurrent_starts=2) as fleet:

        async def job(sb: Sandbox) -> str:
            await sb.exec(["sh", "-c", f"echo {sb.id} > /root/who"], check=True)
            return (await sb.exec(["cat", "/root/who"], check=True)).text.strip()

        results = await fleet.map(job)
    assert [(sb.id, o.value) for sb, o in results] == [("fleet-0", "fleet-0"), ("fleet-1", "fleet-1")]
    assert sha256(busybox_root) == before


async def test_template_clone_with_an_overlay_root(assets: guest.GuestAssets, busybox_root: Path,
                                                   tmp_path: Path) -> None:  # fmt: skip
    before = sha256(busybox_root)
    base = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, image=busybox_root, image_overlay=True,
                         memory_mib=256)  # fmt: skip
    paths = {"memory_path": tmp_path / "tpl.mem", "devices_state_path": tmp_path / "tpl.state"}
    async with Sandbox(base.replace(boot_to_be_template=True, **paths)):
        pass
    kept = tmp_path / "tpl.state.root.qcow2"
    assert kept.is_file(), "the template keeps its overlay next to its state"
    kept_sum = sha256(kept)
    clone_config = base.replace(boot_from_template=True, **paths)
    async with Sandbox(clone_config) as one, Sandbox(clone_config) as two:
        for name, sb in (("one", one), ("two", two)):
            await sb.exec(["sh", "-c", f"echo {name} > /root/who && sync"], check=True)
        for name, sb in (("one", one), ("two", two)):
            assert (await sb.exec(["cat", "/root/who"], check=True)).text == f"{name}\n"
            assert any("root.overlay.qcow2" in a for a in sb.command_line)
    assert sha256(kept) == kept_sum and sha256(busybox_root) == before


async def test_snapshot_keeps_what_was_written_to_an_overlay_disk(assets: guest.GuestAssets, busybox_root: Path,
                                                                  tmp_path: Path) -> None:  # fmt: skip
    before = sha256(busybox_root)
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, image=busybox_root, image_overlay=True,
                           memory_mib=256)  # fmt: skip
    snap = tmp_path / "snap"
    async with Sandbox(config) as sb:
        await sb.exec(["sh", "-c", "echo kept > /root/note && sync"], check=True)
        await sb.snapshot(snap)
        await sb.exec(["sh", "-c", "echo after > /root/note && sync"], check=True)  # not in the snapshot
    assert (snap / "overlays" / "root.qcow2").is_file()
    record = json.loads((snap / "sandbox.json").read_text())
    assert record["config"]["image_overlay"] is True
    for _ in range(2):  # a snapshot can be restored again: each restore works on a copy
        async with Sandbox.restore(snap) as restored:
            # drop the page cache: what is read now comes from the restored overlay on disk
            await restored.exec(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)
            assert (await restored.exec(["cat", "/root/note"], check=True)).text == "kept\n"
            await restored.exec(["sh", "-c", "echo changed > /root/note && sync"], check=True)
    assert sha256(busybox_root) == before


def test_cli_image_build_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vmctl.cli.main import main

    (tmp_path / "root" / "etc").mkdir(parents=True)
    assert main(["guest", "build", "--debian"]) == 2  # an image source without --image
    assert "add --image" in capsys.readouterr().err
    assert main(["guest", "build", "--image", "--from-dir", str(tmp_path / "root")]) == 1
    assert "no /bin/sh" in capsys.readouterr().err


async def test_the_workloads_walkthrough(debian_image: guest.BuiltImage, assets: guest.GuestAssets, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """examples/python_job.py as the README shows it (a pool of 2 here to spare the CI machine):
    a Debian image with python3, a pool from it, a script uploaded, its output read while it
    runs, the file it wrote downloaded, and the sandbox gone afterwards."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("python_job", Path(__file__).parent.parent / "examples" / "python_job.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    result = await example.main(pool_size=2)
    assert result.startswith("python 3.11") and "6 * 7 = 42" in result
