"""Shared directories (virtio-fs) against the other ways files reach a guest, side by side.

In one sandbox (default guest, 1 vCPU, 1 GiB so a 256 MiB file fits in the guest's tmpfs):

- one 256 MiB file, host to guest: read through a share (``cat`` in the guest), against
  ``sb.upload`` into the guest's tmpfs, against a hot-plugged raw virtio-blk disk read whole;
  and guest to host: written to a share (``dd``, fsync), against written to tmpfs and
  ``sb.download``-ed, against written to the disk (fsync);
- a tree of 5,000 small files (a source checkout: 50 directories, 100-4,000 bytes each): time
  until the guest has read every file, through a share, through ``sb.upload`` then the read, and
  through an ext4 image made on the host (``mkfs.ext4 -d``) hot-plugged and mounted;
- hot-plugging a share until the guest has it mounted, against hot-plugging a disk until the
  guest shows it (and each unplug);
- controller cost: the PSS of each share's ``virtiofsd`` (with its jail helper);
- template clones: start to first answer without a share and with one (its RAM copy and plug);
- 9p (Debian's generic kernel, cold shares): the same file and tree at the original's msize
  (8192) and at 512000.

Prints a table with the load average and writes JSON to bench/results/.

    python bench/shares.py [--rounds 5] [--files 5000] [--mib 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from accel import pin_accel  # noqa: E402  (bench/ is run as scripts)

from vmctl import BlockDevice, Sandbox, SandboxConfig, SharedDirectory, guest

RESULTS = Path(__file__).parent / "results"
MIB = 1024 * 1024


async def timed(work: Any) -> float:
    started = time.perf_counter()
    await work
    return time.perf_counter() - started


async def guest_sh(sb: Sandbox, script: str) -> float:
    started = time.perf_counter()
    await sb.exec(["sh", "-c", script], check=True, timeout=600)
    return time.perf_counter() - started


def make_tree(top: Path, files: int) -> int:
    rng = random.Random(7)
    total = 0
    for i in range(files):
        path = top / f"dir{i % 50:02d}" / f"file{i:05d}.c"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = rng.randint(100, 4000)
        path.write_bytes(rng.randbytes(size))
        total += size
    return total


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def share_processes() -> list[int]:
    """virtiofsd and the jail helper in front of it (its parent, named like vmctl's helper)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(b"virtiofsd" in a for a in argv[:3]):
                out.append(int(entry.name))
    return out


async def big_file(sb: Sandbox, work: Path, mib: int) -> dict[str, float]:
    nbytes = mib * MIB
    shared = work / "big-share"
    shared.mkdir()
    with (shared / "big").open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))
    disk = work / "big.img"
    shutil.copyfile(shared / "big", disk)
    os.sync()  # every way starts from the same clean host page cache
    out: dict[str, float] = {}
    share = await sb.hotplug(SharedDirectory(host_path=shared, guest_path="/big", read_only=False))
    out["share_read"] = await guest_sh(sb, "cat /big/big > /dev/null")
    out["share_write"] = await guest_sh(sb, f"dd if=/dev/zero of=/big/out bs=1048576 count={mib} conv=fsync 2>/dev/null")
    await sb.unplug(share)
    out["upload"] = await timed(sb.upload(shared / "big", "/tmp/big"))
    await sb.exec(["rm", "/tmp/big"], check=True)
    write = await guest_sh(sb, f"dd if=/dev/zero of=/tmp/out bs=1048576 count={mib} 2>/dev/null")
    out["download"] = write + await timed(sb.download("/tmp/out", work / "down"))
    await sb.exec(["rm", "/tmp/out"], check=True)
    disk_row = await sb.hotplug(BlockDevice(path=disk, driver="virtio-blk"))
    out["disk_read"] = await guest_sh(sb, f"dd if={disk_row.guest_path} of=/dev/null bs=1048576 2>/dev/null")
    out["disk_write"] = await guest_sh(sb, f"dd if=/dev/zero of={disk_row.guest_path} bs=1048576 count={mib} "
                                           "conv=fsync 2>/dev/null")  # fmt: skip
    await sb.unplug(disk_row)
    for name in ("big-share", "big.img", "down"):
        target = work / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    return {k: v for k, v in out.items()} | {"mib_s_share_read": nbytes / MIB / out["share_read"],
                                             "mib_s_upload": nbytes / MIB / out["upload"]}  # fmt: skip


async def small_files(sb: Sandbox, work: Path, files: int) -> dict[str, Any]:
    tree = work / "tree"
    total = make_tree(tree, files)
    os.sync()
    read = "find {0} -type f -exec cat {{}} + | wc -c"
    out: dict[str, Any] = {"files": files, "bytes": total}
    started = time.perf_counter()
    share = await sb.hotplug(SharedDirectory(host_path=tree, guest_path="/tree"))
    out["share_available"] = time.perf_counter() - started
    out["share"] = out["share_available"] + await guest_sh(sb, read.format("/tree"))
    await sb.unplug(share)
    out["upload_available"] = await timed(sb.upload(tree, "/tmp/tree"))
    out["upload"] = out["upload_available"] + await guest_sh(sb, read.format("/tmp/tree"))
    await sb.exec(["rm", "-rf", "/tmp/tree"], check=True)
    image = work / "tree.ext4"
    made = time.perf_counter()
    done = await anyio.run_process(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "96M"], check=False)
    if done.returncode == 0:
        mkfs = time.perf_counter() - made
        started = time.perf_counter()
        disk = await sb.hotplug(BlockDevice(path=image, driver="virtio-blk", read_only=True))
        mounted = await sb.exec(["sh", "-c", f"mkdir -p /mnt/t && mount -o ro {disk.guest_path} /mnt/t"])
        if mounted.ok:
            out["disk_available"] = mkfs + time.perf_counter() - started
            await guest_sh(sb, read.format("/mnt/t"))
            out["disk"] = mkfs + time.perf_counter() - started
            out["disk_mkfs"] = mkfs
            await sb.exec(["umount", "/mnt/t"], check=True)
        else:
            out["disk_error"] = mounted.stderr.decode(errors="replace").strip()[:200]
        await sb.unplug(disk)
    shutil.rmtree(tree)
    image.unlink(missing_ok=True)
    return out


async def hotplug_rounds(sb: Sandbox, work: Path, rounds: int) -> dict[str, Any]:
    shared = work / "hp-share"
    shared.mkdir()
    disk = work / "hp.img"
    disk.write_bytes(b"\0" * 16 * MIB)
    times: dict[str, list[float]] = {"share_plug": [], "share_unplug": [], "disk_plug": [], "disk_unplug": []}
    pss: list[int] = []
    for _ in range(rounds):
        started = time.perf_counter()
        share = await sb.hotplug(SharedDirectory(host_path=shared, guest_path="/hp"))
        times["share_plug"].append(time.perf_counter() - started)
        pss.append(sum(pss_kib(p) for p in share_processes()))
        times["share_unplug"].append(await timed(sb.unplug(share)))
        started = time.perf_counter()
        row = await sb.hotplug(BlockDevice(path=disk, driver="virtio-blk", read_only=True))
        times["disk_plug"].append(time.perf_counter() - started)
        times["disk_unplug"].append(await timed(sb.unplug(row)))
    return {k: statistics.median(v) for k, v in times.items()} | {"virtiofsd_pss_kib": statistics.median(pss)}


async def nine_p(config: SandboxConfig, work: Path, mib: int, files: int, msize: int) -> dict[str, float]:
    """The same big file and tree through a cold 9p share (generic kernel), at ``msize``."""
    big, tree = work / f"9p-big-{msize}", work / f"9p-tree-{msize}"
    big.mkdir()
    with (big / "big").open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))
    make_tree(tree, files)
    os.sync()
    shares = (SharedDirectory(host_path=big, guest_path="/big", protocol="9p"),
              SharedDirectory(host_path=tree, guest_path="/tree", protocol="9p"))  # fmt: skip
    async with Sandbox(config.replace(devices=shares, msize_9p=msize)) as sb:
        out = {"read": await guest_sh(sb, "cat /big/big > /dev/null"),
               "tree": await guest_sh(sb, "find /tree -type f -exec cat {} + | wc -c")}  # fmt: skip
    shutil.rmtree(big)
    shutil.rmtree(tree)
    return out


async def clone_starts(config: SandboxConfig, work: Path, rounds: int) -> dict[str, float]:
    memory, state = work / "t.mem", work / "t.state"
    async with Sandbox(config.replace(boot_to_be_template=True, memory_path=memory, devices_state_path=state)):
        pass
    clone = config.replace(boot_from_template=True, memory_path=memory, devices_state_path=state)
    shared = work / "clone-share"
    shared.mkdir()
    with_share = clone.replace(devices=(SharedDirectory(host_path=shared, guest_path="/w"),))
    plain: list[float] = []
    shared_t: list[float] = []
    for _ in range(rounds):  # alternating
        for cfg, into in ((clone, plain), (with_share, shared_t)):
            started = time.perf_counter()
            async with Sandbox(cfg) as sb:
                await sb.exec(["true"])
                into.append(time.perf_counter() - started)
    return {"clone": statistics.median(plain), "clone_with_share": statistics.median(shared_t)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    accel = await pin_accel()
    assets = await guest.ensure_default_assets()
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, memory_mib=1024, pci_bridges=2, accel=accel)
    work = Path(tempfile.mkdtemp(prefix="bench-shares-"))
    load_before = os.getloadavg()
    try:
        async with Sandbox(config) as sb:
            big = await big_file(sb, work, args.mib)
            print("  big file done", flush=True)
            small = await small_files(sb, work, args.files)
            print("  small files done", flush=True)
            plug = await hotplug_rounds(sb, work, args.rounds)
            print("  hotplug done", flush=True)
        clones = await clone_starts(config.replace(memory_mib=256), work, args.rounds)
        generic = await guest.ensure_default_assets(kernel="generic")
        on_generic = config.replace(kernel=generic.kernel, initrd=generic.initrd)
        nine = {m: await nine_p(on_generic, work, args.mib, args.files, m) for m in (8192, 512000)}
        print("  9p done", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    print(f"\naccel {accel}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"({os.cpu_count()} CPUs)")  # fmt: skip
    print(f"\none {args.mib} MiB file (seconds)           share   upload/download   disk   upload/share")
    print(f"  host -> guest                        {big['share_read']:6.2f}   {big['upload']:8.2f}         "
          f"{big['disk_read']:6.2f}   {big['upload'] / big['share_read']:6.1f}x")  # fmt: skip
    print(f"  guest -> host                        {big['share_write']:6.2f}   {big['download']:8.2f}         "
          f"{big['disk_write']:6.2f}   {big['download'] / big['share_write']:6.1f}x")  # fmt: skip
    print(f"\n{small['files']} small files (s)         share   upload   ext4 disk (mkfs -d)   upload/share")
    for what, suffix in (("there to read", "_available"), ("all read", "")):
        disk = f"{small['disk' + suffix]:6.2f}" if "disk" in small else small.get("disk_error", "-")[:20]
        print(f"  {what:<28} {small['share' + suffix]:6.2f}  {small['upload' + suffix]:6.2f}   {disk:>10}"
              f"            {small['upload' + suffix] / small['share' + suffix]:6.1f}x")  # fmt: skip
    print(f"\nhotplug (median of {args.rounds}, s): share until mounted {plug['share_plug']:.3f}, "
          f"disk until seen {plug['disk_plug']:.3f} ({plug['share_plug'] / plug['disk_plug']:.2f}x); "
          f"unplug share {plug['share_unplug']:.3f}, disk {plug['disk_unplug']:.3f}")  # fmt: skip
    for msize, row in nine.items():
        print(f"9p (generic kernel, msize {msize}): {args.mib} MiB file read {row['read']:.2f} s "
              f"({row['read'] / big['share_read']:.1f}x virtio-fs), {small['files']} files read {row['tree']:.2f} s "
              f"({row['tree'] / (small['share'] - small['share_available']):.1f}x virtio-fs)")  # fmt: skip
    print(f"virtiofsd per share: {plug['virtiofsd_pss_kib'] / 1024:.1f} MiB PSS")
    print(f"template clone to first answer (median of {args.rounds}, s): {clones['clone']:.2f} without a share, "
          f"{clones['clone_with_share']:.2f} with one")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"shares-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"host": platform.node(), "accel": accel, "load_before": load_before,
                               "load_after": load_after, "big_file": big, "small_files": small, "hotplug": plug,
                               "clones": clones, "nine_p": nine}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    anyio.run(main)
