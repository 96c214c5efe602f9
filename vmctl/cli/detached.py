"""``vmctl start``, ``vmctl ps``, ``vmctl exec ID``, ``vmctl stop ID``: detached sandboxes from the shell."""

from __future__ import annotations

import json
import sys
from typing import Any

from vmctl.agent.results import ExecResult
from vmctl.config import SandboxConfig
from vmctl.core.qmp import QmpSession
from vmctl.core.waiting import deadline
from vmctl.errors import SandboxBusy, SandboxNotFound, VmctlError
from vmctl.machine import registry as detached
from vmctl.sandbox.facade import Sandbox

PROBE_TIMEOUT = 5.0


async def start(config: SandboxConfig, sandbox_id: str | None, as_json: bool) -> int:
    async with Sandbox(config, id=sandbox_id, detached=True) as sb:
        pid, run_dir = sb.pid, sb.run_dir
    if as_json:
        print(json.dumps({"id": sb.id, "pid": pid, "state": str(sb.state), "directory": str(run_dir)}))
    else:
        print(sb.id)
    return 0


async def probe(record: detached.Record) -> str:
    """QEMU's own word on a sandboxed nobody is attached to (a short QMP visit under the lock)."""
    try:
        lock = detached.AttachLock(record.directory, record.id)
    except SandboxBusy:
        return f"{record.last_state} (attached)"
    session = QmpSession(f"vmctl-ps-{record.id}")
    try:
        with deadline(PROBE_TIMEOUT, "asking QEMU for its state"):
            await session.connect(record.paths.qmp_socket)
            reply = await session.execute("query-status")
        return str(reply.get("status", "unknown"))
    except VmctlError as exc:
        return f"unknown ({exc})"
    finally:
        await session.close()
        lock.release()


def _uptime(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


async def ps(as_json: bool) -> int:
    rows: list[dict[str, Any]] = []
    for entry in detached.entries():
        row: dict[str, Any] = {"id": entry.id, "status": entry.status.value}
        record = entry.record
        if record is not None:
            state = await probe(record) if entry.status is detached.Status.LIVE else record.last_state
            if entry.status is detached.Status.STALE:
                state = "gone (record removed)"
            row.update(pid=record.pid, state=state, uptime_s=round(detached.uptime(record)),
                       vcpus=record.config.get("vcpus"), memory_mib=record.config.get("memory_mib"),
                       console_log=str(record.paths.console_log))  # fmt: skip
        else:
            row.update(state="starting" if entry.status is detached.Status.STARTING else "gone (removed)")
        rows.append(row)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no detached sandboxes (start one with 'vmctl start')")
        return 0
    print(f"{'ID':<20} {'PID':>8} {'STATE':<24} {'UPTIME':>8} {'VCPUS':>5} {'MEMORY':>7}")
    for row in rows:
        memory = f"{row['memory_mib']}M" if row.get("memory_mib") else "-"
        uptime = _uptime(row["uptime_s"]) if "uptime_s" in row else "-"
        print(f"{row['id']:<20} {row.get('pid', '-')!s:>8} {row['state']:<24} {uptime:>8} "
              f"{row.get('vcpus', '-')!s:>5} {memory:>7}")  # fmt: skip
    return 0


async def exec_in(sandbox_id: str, argv: list[str], timeout: float | None) -> int:
    async with Sandbox.attach(sandbox_id) as sb:
        result = await sb.exec(argv, timeout=timeout)
    return relay(result, "exec", timeout)


def relay(result: ExecResult, command: str, timeout: float | None) -> int:
    """Pass a guest command's output through; its exit code becomes ours (124 on a timeout)."""
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.flush()
    if result.timed_out:
        print(f"vmctl {command}: command timed out after {timeout}s", file=sys.stderr)
        return 124
    return result.exit_code


async def stop(sandbox_id: str, force: bool) -> int:
    """Power the guest off through a normal attach; ``force`` (or an attach that fails) kills QEMU."""
    if not force:
        try:
            async with Sandbox.attach(sandbox_id) as sb:
                await sb.stop()
            return 0
        except (SandboxNotFound, SandboxBusy):
            raise
        except VmctlError as exc:
            print(f"vmctl stop: could not attach ({exc}); killing QEMU", file=sys.stderr)
    record = detached.find(sandbox_id)
    detached.remove(record.directory)
    return 0
