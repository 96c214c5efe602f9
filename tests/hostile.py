"""A hostile guest agent for real-QEMU tests (its source and modes: tests/hostile_agent.c).

:func:`take_over` puts it in place of the C agent inside a running default guest, as a root user
of the guest could: it replaces ``/sbin/vmctl-agent`` (which /init restarts whenever it exits),
kills the running agent from a detached shell, and returns once the hostile one has the port.
:func:`initrd` makes a copy of the default initramfs whose agent is the hostile one from boot.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from vmctl import Sandbox
from vmctl.guest import cpio

SOURCE = Path(__file__).with_name("hostile_agent.c")
LISTENING = "hostile agent listening"


def binary(cache: Path) -> bytes:
    """The hostile agent, compiled statically (cached under ``cache`` by its source)."""
    source = SOURCE.read_bytes()
    target = cache / f"hostile-agent-{hashlib.sha256(source).hexdigest()[:16]}"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        subprocess.run(["gcc", "-static", "-O2", "-o", str(partial), str(SOURCE)], check=True)
        partial.replace(target)
    return target.read_bytes()


async def _until(lines: AsyncIterator[str], text: str) -> None:
    async for line in lines:
        if text in line:
            return
    raise AssertionError(f"the console ended before {text!r}")


async def take_over(sb: Sandbox, program: bytes, mode: str) -> None:
    """Replace the guest's agent with the hostile ``program`` doing ``mode``; return once it
    listens on the agent port."""
    await sb.write_file("/etc/hostile-mode", mode.encode() + b"\n")
    await sb.write_file("/tmp/hostile-agent", program, mode=0o755)
    lines = sb.console_lines()  # from now: the line cannot be missed
    # The rename is atomic (the running agent keeps its file); the kill waits a moment in a
    # detached shell so that this exec's own exit reaches the host first.
    swap = ("mv /tmp/hostile-agent /sbin/vmctl-agent && "
            "setsid sh -c 'sleep 0.5; kill -9 \"$0\"' $PPID </dev/null >/dev/null 2>&1 &")  # fmt: skip
    (await sb.exec(["sh", "-c", swap])).check()
    with anyio.fail_after(60):
        await _until(lines, LISTENING)


def initrd(default: Path, program: bytes, mode: str, target: Path) -> Path:
    """The default initramfs with the hostile agent (doing ``mode``) as /sbin/vmctl-agent: the
    kernel unpacks a second archive appended to the first over it."""
    extra = target.with_suffix(".extra")
    with extra.open("wb") as out:
        cpio.write_newc(out, [cpio.file_entry("sbin/vmctl-agent", program, 0o755),
                              cpio.file_entry("etc/hostile-mode", mode.encode() + b"\n")])  # fmt: skip
    target.write_bytes(default.read_bytes() + extra.read_bytes())
    extra.unlink()
    return target
