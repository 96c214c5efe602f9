"""Saving and loading a VM's device state over QMP, for VM templates.

QEMU runs with ``-sandbox on,spawn=deny``, so ``exec:`` migration targets are out: vmctl opens the
file itself and hands the descriptor to QEMU over the QMP socket (``getfd``), then migrates to
``fd:NAME``. Guest RAM is not in the stream: it lives in the template's shared memory file and
the ``x-ignore-shared`` capability skips it, which is what makes clones cheap.

Completion is event-driven: the ``events`` capability makes QEMU send ``MIGRATION`` events, which
the hypervisor's event pump feeds to :class:`MigrationTracker`.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from vmctl.core.qmp import QmpEvent, QmpSession
from vmctl.core.waiting import Broadcast
from vmctl.errors import QMPDisconnected, QMPError, VmctlError

FINAL = frozenset({"completed", "failed", "cancelled"})
MAX_BANDWIDTH = 10 * 1024**3  # bytes/s: the default (128 MiB/s) would throttle a local file


class MigrationTracker:
    """Follows ``MIGRATION`` events so callers can wait for the end of a migration."""

    def __init__(self) -> None:
        self.status = "none"
        self.error = ""
        self._changed = Broadcast()

    def on_event(self, event: QmpEvent) -> None:
        if event.name == "MIGRATION":
            self.status = str(event.data.get("status", ""))
            self._changed.notify()

    async def wait_final(self, qmp: QmpSession) -> str:
        """The migration's final status; :class:`QMPDisconnected` at once if QEMU goes away."""
        # Ask once as well: the final event may have come before we started waiting.
        info = await qmp.execute("query-migrate")
        if info.get("status") in FINAL:
            self.status = info["status"]
        async with anyio.create_task_group() as tg:

            async def watch_connection() -> None:
                await qmp.wait_disconnected()
                tg.cancel_scope.cancel()

            tg.start_soon(watch_connection)
            while self.status not in FINAL:
                await self._changed.wait()
            tg.cancel_scope.cancel()
        if self.status not in FINAL:
            raise QMPDisconnected("QMP connection lost while QEMU was migrating (QEMU exited?)")
        if self.status == "failed":
            with anyio.move_on_after(5):
                try:
                    self.error = str((await qmp.execute("query-migrate")).get("error-desc", ""))
                except VmctlError:
                    pass
        return self.status


async def _prepare(qmp: QmpSession, *, skip_shared: bool) -> None:
    # x-ignore-shared leaves out RAM in shared memory backends: right for templates (clones map
    # the file), wrong for a snapshot of a guest whose RAM is shared (huge pages): it must be saved.
    capabilities = [{"capability": "x-ignore-shared", "state": skip_shared}, {"capability": "events", "state": True}]
    await qmp.execute("migrate-set-capabilities", {"capabilities": capabilities})


async def save_device_state(qmp: QmpSession, tracker: MigrationTracker, path: Path, *, skip_shared: bool) -> None:
    """Write the paused VM's device state to ``path`` atomically (a partial file never shows)."""
    await _prepare(qmp, skip_shared=skip_shared)
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        await qmp.send_fd(fd, "vmctl-save")
        await qmp.execute("migrate", {"uri": "fd:vmctl-save"})
        try:
            status = await tracker.wait_final(qmp)
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                try:  # QEMU holds its own copy of the fd: stop it writing
                    await qmp.execute("migrate_cancel")
                    await tracker.wait_final(qmp)
                except VmctlError:
                    pass  # QEMU is gone or refused: the original error (or cancellation) goes on
            raise
        if status != "completed":
            why = f": {tracker.error}" if tracker.error else ""
            raise QMPError(f"saving device state ended {status}{why}")
        os.fsync(fd)
        os.replace(partial, path)
    finally:
        os.close(fd)
        partial.unlink(missing_ok=True)


async def load_device_state(qmp: QmpSession, tracker: MigrationTracker, path: Path, *, skip_shared: bool) -> None:
    """Load device state saved by :func:`save_device_state` into a QEMU started with -incoming defer."""
    await _prepare(qmp, skip_shared=skip_shared)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        await qmp.send_fd(fd, "vmctl-load")
        await qmp.execute("migrate-incoming", {"uri": "fd:vmctl-load"})
        status = await tracker.wait_final(qmp)
        if status != "completed":
            why = f": {tracker.error}" if tracker.error else ""
            raise QMPError(f"loading device state from {path} ended {status}{why}")
    finally:
        os.close(fd)
