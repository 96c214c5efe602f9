"""Descriptors handed to a real QEMU over QMP (fd sets for disks, ``getfd`` for migration).

QEMU pairs a descriptor received with SCM_RIGHTS with the next command that takes one, and a
second descriptor arriving first replaces the first: concurrent hand-overs must not interleave.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from vmctl import Sandbox, SandboxConfig

pytestmark = pytest.mark.qemu


async def test_concurrent_fd_sets_each_get_their_own_file(make_config: Callable[..., SandboxConfig],
                                                          tmp_path: Path) -> None:  # fmt: skip
    files = [tmp_path / f"disk-{i}.img" for i in range(8)]
    for f in files:
        f.write_bytes(b"\0" * 4096)
    async with Sandbox(make_config()) as sb:
        qmp = sb.hypervisor.qmp  # type: ignore[attr-defined]
        fds = [os.open(f, os.O_RDONLY | os.O_CLOEXEC) for f in files]
        try:
            async with anyio.create_task_group() as tg:
                for i, (fd, f) in enumerate(zip(fds, files, strict=True)):
                    tg.start_soon(lambda fd=fd, i=i, f=f: qmp.add_fd(fd, 100 + i, opaque=str(f)))
        finally:
            for fd in fds:
                os.close(fd)
        sets = {s["fdset-id"]: s["fds"] for s in await qmp.execute("query-fdsets") if s["fdset-id"] >= 100}
        assert sorted(sets) == list(range(100, 108))
        for set_id, entries in sets.items():
            assert len(entries) == 1
            held = os.readlink(f"/proc/{sb.pid}/fd/{entries[0]['fd']}")
            assert held == str(files[set_id - 100]) == entries[0]["opaque"], "each set holds its own file"
