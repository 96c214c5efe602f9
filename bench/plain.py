"""The baseline: what a careful script does by hand with qemu-system and plain qemu.qmp.

Same QEMU command line as vmctl (built by the same function) except that QEMU creates its own
sockets (path= instead of vmctl's pre-created fd=), which the script polls for.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from accel import pinned  # (bench/ is run as scripts)
from qemu.qmp import EventListener, QMPClient

from vmctl import SandboxConfig, host
from vmctl.agent import protocol as proto
from vmctl.hypervisors.base import RunPaths
from vmctl.hypervisors.cmdline import build_command


@dataclass
class PlainVm:
    qmp: QMPClient
    agent_reader: asyncio.StreamReader
    agent_writer: asyncio.StreamWriter
    ready_seconds: float
    process: subprocess.Popen[bytes]


@asynccontextmanager
async def plain_vm(config: SandboxConfig, *, legacy: bool = False) -> AsyncIterator[PlainVm]:
    """A VM started the plain way. ``legacy``: the guest runs the old shell agent (line protocol);
    otherwise the C agent's framed protocol (vmctl/agentproto.py)."""
    run_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    paths = RunPaths(run_dir, run_dir)
    resolved = config.replace(accel=pinned(), qemu_binary=host.find_qemu(config.qemu_binary))
    argv = build_command(resolved, paths, "plain", {"qmp": 0, "console": 0, "agent": 0})
    sockets = {"qmp": paths.qmp_socket, "console0": paths.console_socket, "agent0": paths.agent_socket}
    argv = [re.sub(r"socket,id=(\w+),fd=0", lambda m: f"socket,id={m.group(1)},path={sockets[m.group(1)]}", a)
            for a in argv]  # fmt: skip
    started = time.perf_counter()
    # the baseline is deliberately the plain way: Popen, then poll for QEMU's sockets
    with open(run_dir / "qemu.log", "wb") as stderr:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)  # noqa: ASYNC220
    qmp = QMPClient("plain")
    writer = None
    ready = False
    try:
        while not (paths.qmp_socket.exists() and paths.agent_socket.exists()):  # noqa: ASYNC110
            if proc.poll() is not None:
                raise RuntimeError("QEMU exited before creating its sockets")
            await asyncio.sleep(0.005)
        await qmp.connect(str(paths.qmp_socket))
        reader, writer = await asyncio.open_unix_connection(str(paths.agent_socket))
        await qmp.execute("cont")
        if legacy:
            line = await reader.readline()
            if not line.startswith(b"READY"):
                raise RuntimeError(f"expected the agent's READY line, got {line!r}")
        else:
            length, kind, _, _ = proto.unpack_header(await reader.readexactly(proto.HEADER_SIZE))
            await reader.readexactly(length)
            if kind != proto.FrameType.READY:
                raise RuntimeError(f"expected the agent's READY frame, got type {kind:#x}")
        ready = True
        yield PlainVm(qmp, reader, writer, time.perf_counter() - started, proc)
        writer.write(b"POWEROFF 0\n" if legacy else proto.pack(proto.FrameType.POWEROFF, 1))
        await writer.drain()
        await asyncio.to_thread(proc.wait, 30)
    except Exception as exc:
        if ready:
            raise
        raise PlainVmError(f"plain VM failed to start: {exc}; {diagnose(proc, paths)}") from exc
    finally:
        if proc.poll() is None:  # first, before any await: a cancelled cleanup must still kill it
            proc.kill()
            proc.wait()  # noqa: ASYNC221
        if writer is not None:
            writer.close()
        try:
            await qmp.disconnect()
        except EOFError:
            pass  # QEMU is gone: the reader saw it first
        shutil.rmtree(run_dir, ignore_errors=True)


class PlainVmError(RuntimeError):
    """A plain VM did not get to ready; the message has QEMU's exit status and log tails."""


def diagnose(proc: subprocess.Popen[bytes], paths: RunPaths) -> str:
    """QEMU's exit status, stderr tail and console tail, for a start that failed."""
    try:
        rc: int | None = proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        rc = None
    tails = []
    for name, path in (("stderr", paths.run_dir / "qemu.log"), ("console", paths.console_log)):
        try:
            lines = path.read_text(errors="replace").splitlines()[-8:]
        except OSError:
            lines = []
        tails.append(f"{name}: " + (" | ".join(lines) if lines else "(empty)"))
    return f"QEMU {'still running' if rc is None else f'exited with {rc}'}; " + "; ".join(tails)


async def plain_disk_add(vm: PlainVm, disk: Path, dev: str, request_id: str) -> None:
    """What a careful script does to hot-add a raw disk: two blockdev-add, device_add, then the
    agent's WAITDEV until the guest shows it."""
    await vm.qmp.execute("blockdev-add", {"driver": "file", "filename": str(disk), "node-name": f"{dev}-file"})
    await vm.qmp.execute("blockdev-add", {"driver": "raw", "file": f"{dev}-file", "node-name": f"{dev}-fmt"})
    await vm.qmp.execute("device_add", {"driver": "virtio-blk-pci", "id": dev, "drive": f"{dev}-fmt",
                                        "serial": dev, "bus": "rp0"})  # fmt: skip
    rid = int.from_bytes(request_id.encode()[:8].ljust(8, b"\0"), "little")
    vm.agent_writer.write(proto.pack(proto.FrameType.WAITDEV, rid, proto.u32(300) + b"virtio\0" + dev.encode()))
    await vm.agent_writer.drain()
    length, kind, _, got = proto.unpack_header(await vm.agent_reader.readexactly(proto.HEADER_SIZE))
    payload = await vm.agent_reader.readexactly(length)
    if kind != proto.FrameType.RESULT or got != rid or payload[:1] != b"\1":
        raise PlainVmError(f"the guest did not show disk {dev}: type {kind:#x} {payload!r}")


async def plain_disk_remove(vm: PlainVm, dev: str, deleted: EventListener) -> None:
    """device_del until its DEVICE_DELETED (from ``deleted``), then delete the block nodes."""
    await vm.qmp.execute("device_del", {"id": dev})
    while (await deleted.get())["data"].get("device") != dev:
        pass  # the virtio-backend child is deleted first, without a "device" field
    await vm.qmp.execute("blockdev-del", {"node-name": f"{dev}-fmt"})
    await vm.qmp.execute("blockdev-del", {"node-name": f"{dev}-file"})
