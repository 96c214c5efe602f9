"""Host directories in a pool's sandboxes: a read-only checkout in every member, a writable
directory of its own for each member's build output, and one member saved and restored with both
mounted again. Usage: python examples/shared_build.py [WORKDIR]

WORKDIR (default: a new temporary directory) gets ``checkout/`` (a small C-like source tree made
here), ``builds/<n>/`` (one per member, made by vmctl) and ``saved/`` (the snapshot).
"""

import sys
import tempfile
from pathlib import Path

import anyio

from vmctl import Sandbox, SandboxConfig, SandboxPool, SharedDirectory, guest

# what a build does here: list the checkout and "compile" each file into the output directory
BUILD = "cd /src && for f in $(find . -name '*.c'); do mkdir -p /out/$(dirname $f); wc -c < $f > /out/$f.o; done"


async def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="vmctl-shared-build-"))
    checkout = work / "checkout"
    for n in range(20):
        path = checkout / f"lib{n % 4}" / f"file{n}.c"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"int f{n}(void) {{ return {n}; }}\n")
    (work / "builds").mkdir(exist_ok=True)

    assets = await guest.ensure_default_assets()
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, memory_mib=256, pci_bridges=2, devices=[
        SharedDirectory(host_path=checkout, guest_path="/src"),                                  # the same, read-only
        SharedDirectory(host_path=work / "builds" / "{index}", guest_path="/out", read_only=False),  # one each
    ])  # fmt: skip
    async with SandboxPool(config, size=2) as pool, pool.acquire(timeout=300) as sb:
        await sb.exec(["sh", "-c", BUILD], check=True, timeout=120)
        mine = (await sb.exec(["sh", "-c", "find /out -name '*.o' | wc -l"], check=True)).text.strip()
        print(f"{sb.id}: built {mine} objects into {work / 'builds'}")
        snapshot = await sb.snapshot(work / "saved")
        print(f"saved {sb.id} to {snapshot}")
    async with Sandbox.restore(snapshot) as restored:
        listing = await restored.exec(["sh", "-c", "ls /src && cat /out/lib0/file0.c.o"], check=True)
        print(f"restored: /src has {listing.text.split()[:4]}, /out/lib0/file0.c.o says {listing.text.split()[-1]}")
    print(f"build outputs: {sorted(p.name for p in (work / 'builds').iterdir())} in {work / 'builds'}")


if __name__ == "__main__":
    anyio.run(main)
