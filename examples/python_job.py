"""The workloads walkthrough: a Debian image with python3, a warm pool of 4 sandboxes from it, and
one real job: upload a script, watch its output while it runs, fetch the file it wrote. The
sandbox is gone afterwards (a pool never hands one out twice).

    python examples/python_job.py            # about a minute the first time (the image build)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import anyio

from vmctl import SandboxConfig, SandboxPool, guest

JOB = """\
import sys, time
for step in range(3):
    print(f"step {step}", flush=True)
    time.sleep(0.2)
with open("/root/result.txt", "w") as out:
    out.write(f"python {sys.version.split()[0]} says 6 * 7 = {6 * 7}\\n")
print("done", flush=True)
"""


async def main(pool_size: int = 4) -> str:
    assets = await guest.ensure_default_assets()
    image = await guest.build_image(debian=True, packages=["python3"],
                                    progress=lambda p: print(f"[image] {p.message}", file=sys.stderr))  # fmt: skip
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, image=image.image,
                           image_overlay=True, memory_mib=512)  # every member writes its own overlay
    work = Path(tempfile.mkdtemp(prefix="vmctl-job-"))
    (work / "job.py").write_text(JOB)
    async with SandboxPool(config, size=pool_size) as pool:
        async with pool.acquire(timeout=300) as sb:
            await sb.upload(work / "job.py", "/root/job.py")
            async with sb.process(["python3", "/root/job.py"]) as job:
                async for chunk in job.stdout:  # arrives while the job runs
                    print(f"[{sb.id}] {chunk.decode()}", end="")
                assert await job.wait() == 0
            await sb.download("/root/result.txt", work / "result.txt")
            used = sb
        print(f"{used.id} is {used.state} now (the block ended: it is gone); {pool.stats().ready} ready")
        assert used.run_dir is not None and not used.run_dir.exists()
    result = (work / "result.txt").read_text()
    print(result, end="")
    return result


if __name__ == "__main__":
    anyio.run(main)
