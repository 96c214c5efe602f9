"""The jail helper, ``vmctl-jail``: a small C program (``files/vmctl-jail.c``) compiled here on
first use and cached, as the guest agent is.

It runs once per jailed start, before QEMU, so its start-up is on every sandbox's critical path:
as a Python script it took about 55 ms of a 250 ms clone start (``bench/jail.py``), compiled it
takes about 1 ms. The cache key covers the source and the compiler, so an upgrade rebuilds it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import anyio

from vmctl.core import paths
from vmctl.errors import HostError

NAME = "vmctl-jail"
SOURCE = "vmctl-jail.c"
COMPILER_PACKAGES = "apt-get install gcc libc6-dev"

_built: Path | None = None


def compiler_available() -> bool:
    return shutil.which("gcc") is not None


def source() -> bytes:
    return (Path(__file__).parent / "files" / SOURCE).read_bytes()


async def ensure() -> Path:
    """The compiled helper (built now if this source and compiler have none in the cache)."""
    global _built
    if _built is not None and _built.is_file():
        return _built
    if not compiler_available():
        raise HostError(f"the jail helper is compiled with gcc: {COMPILER_PACKAGES} (or VMCTL_JAIL=off)")
    version = await anyio.run_process(["gcc", "--version"], check=False)
    code = source()
    key = hashlib.sha256(code + b"\0" + version.stdout).hexdigest()[:16]
    target = paths.cache_dir() / "jail" / key / NAME
    if not target.is_file():
        await anyio.to_thread.run_sync(lambda: target.parent.mkdir(mode=0o700, parents=True, exist_ok=True))
        await _compile(code, target)
    _built = target
    return target


async def _compile(code: bytes, target: Path) -> None:
    """Compile into a temporary name beside ``target``, then rename: concurrent starts (other
    processes too) never run a half-written helper."""
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        (work / SOURCE).write_bytes(code)
        done = await anyio.run_process(["gcc", "-O2", "-s", "-o", str(work / NAME), str(work / SOURCE)], check=False)
        if done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip()[-2000:]
            raise HostError(f"compiling the jail helper failed ({COMPILER_PACKAGES}?): {detail}")
        os.chmod(work / NAME, 0o755)
        os.replace(work / NAME, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
