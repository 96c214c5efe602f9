"""vmctl on uvloop's event loop (what Ray's async actors run on when uvloop is installed).

uvloop starts processes without asyncio's ``umask`` argument and gives transports a stand-in
socket that qemu.qmp cannot pass descriptors over: a template, a clone of it (its state goes to
QEMU as a descriptor) and a hot-plugged disk (an fd set, jailed) must all work there too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vmctl import guest

pytestmark = pytest.mark.qemu
uvloop = pytest.importorskip("uvloop", reason="uvloop is in vmctl's dev extra")

SCRIPT = """
import asyncio, os, stat, sys, uvloop
from pathlib import Path
from vmctl import BlockDevice, Sandbox, SandboxConfig

async def main():
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    kernel, initrd, tmp = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    paths = {"memory_path": tmp / "t.mem", "devices_state_path": tmp / "t.state"}
    base = SandboxConfig(kernel=kernel, initrd=initrd, memory_mib=256, pci_bridges=1)
    async with Sandbox(base.replace(boot_to_be_template=True, **paths)):
        pass
    disk = tmp / "extra.img"
    disk.write_bytes(b"uvloop".ljust(1 << 20, b"\\0"))
    async with Sandbox(base.replace(boot_from_template=True, **paths)) as sb:
        plugged = await sb.hotplug(BlockDevice(path=disk, id="extra"))
        head = await sb.exec(["head", "-c", "6", plugged.guest_path], check=True)
        print(head.stdout.decode(), oct(stat.S_IMODE(os.stat(paths["memory_path"]).st_mode)), flush=True)

uvloop.run(main())
"""


def test_a_template_clone_and_hotplug_work_on_uvloop(assets: guest.GuestAssets, tmp_path: Path,
                                                     runtime_dir: Path) -> None:  # fmt: skip
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(assets.kernel), str(assets.initrd), str(tmp_path)],
                            capture_output=True, text=True, timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["uvloop", "0o600"], "the disk's bytes; guest RAM stays private"
