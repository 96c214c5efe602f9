"""``vmctl fleet SPEC``: boot a fleet, run the spec's commands in each member, report.

A live table (rich) shows each member while booting and running; a summary table (or JSON with
``--json``) follows. The exit code is 0 only if every member booted and every command exited 0.
With ``--ray ADDRESS`` (or ``auto``) the fleet is a :class:`vmctl.cluster.ClusterFleet` on that
Ray cluster (the spec's ``template`` means one per node), and each member's node is shown.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.live import Live
from rich.table import Table

from vmctl.agent.results import ExecResult
from vmctl.fleets.fleet import Fleet, FleetEvent, FleetEventKind, Outcome
from vmctl.fleets.spec import load_fleet_spec
from vmctl.guest import ensure_default_assets


class _Execs(Protocol):
    """What a job needs of a member: a local :class:`Sandbox` or a remote one."""

    id: str

    async def exec(self, argv: list[str], *, timeout: float | None = ...) -> ExecResult: ...


@dataclass
class _Row:
    status: str = "waiting"
    boot: str = ""
    exits: list[int] = field(default_factory=list)
    error: str = ""
    node: str = ""


def _render(rows: dict[str, _Row], title: str, *, nodes: bool = False) -> Table:
    table = Table(title=title)
    for column in ("sandbox", *(("node",) if nodes else ()), "status", "boot", "exit codes", "error"):
        table.add_column(column)
    for sandbox_id, row in rows.items():
        table.add_row(sandbox_id, *((row.node[:12],) if nodes else ()), row.status, row.boot,
                      " ".join(map(str, row.exits)), row.error[:80])  # fmt: skip
    return table


async def run_fleet_command(spec_path: Path, *, as_json: bool, ray_address: str | None = None) -> int:
    assets = await ensure_default_assets()
    spec = load_fleet_spec(spec_path, default_kernel=assets.kernel, default_initrd=assets.initrd)
    console = Console(stderr=as_json)
    started = time.monotonic()
    rows = {f"fleet-{i}": _Row() for i in range(spec.size)}
    on_ray = ray_address is not None

    def _table(rows: dict[str, _Row], title: str) -> Table:
        return _render(rows, title, nodes=on_ray)

    with Live(_table(rows, "vmctl fleet"), console=console, transient=as_json, refresh_per_second=8) as live:

        def on_event(event: FleetEvent) -> None:
            row = rows[event.sandbox_id]
            if event.kind is FleetEventKind.BOOTING and on_ray:
                row.node = event.detail
            if event.kind is FleetEventKind.READY:
                row.boot = event.detail
            if event.kind is FleetEventKind.LOST:
                row.error = event.detail
            if event.kind in (FleetEventKind.BOOT_FAILED, FleetEventKind.ERROR):
                row.error = event.detail
            if event.kind is not FleetEventKind.STOPPED or row.status in ("booting", "ready", "running"):
                row.status = event.kind.value
            live.update(_table(rows, "vmctl fleet"))

        async def job(sb: _Execs) -> list[ExecResult]:
            results = []
            for argv in spec.commands:
                result = await sb.exec(list(argv), timeout=spec.command_timeout)
                results.append(result)
                rows[sb.id].exits.append(result.exit_code)
                live.update(_table(rows, "vmctl fleet"))
            return results

        if ray_address is not None:
            from vmctl import cluster

            cluster.connect(ray_address, log_to_driver=False)
            remote = cluster.ClusterFleet(spec.sandbox, size=spec.size, max_concurrent_starts=spec.max_concurrent_starts,
                                          fail_fast=spec.fail_fast, on_event=on_event, template=spec.template)  # fmt: skip
            async with remote:
                outcomes: list[tuple[Any, Outcome[list[ExecResult]]]] = await remote.map(job)
            summary = remote.summary()
            for row in summary:
                rows[row["id"]].node = row["node"]
            template_seconds = remote.prepare_seconds if spec.template else None
        else:
            fleet = Fleet(spec.sandbox, size=spec.size, max_concurrent_starts=spec.max_concurrent_starts,
                          fail_fast=spec.fail_fast, on_event=on_event, template=spec.template)  # fmt: skip
            async with fleet:
                outcomes = await fleet.map(job)
            summary = fleet.summary()
            template_seconds = fleet.template_seconds
        live.update(_table(rows, "vmctl fleet: done"))
    report = _report(summary, outcomes, time.monotonic() - started, template_seconds)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        ok = sum(m["ok"] for m in report["members"])
        console.print()
        console.print(f"{ok}/{len(report['members'])} sandboxes ok in {report['seconds']:.1f}s"
                      + (f" (template built in {template_seconds:.1f}s)" if template_seconds else ""))  # fmt: skip
    return 0 if report["ok"] else 1


def _report(summary: list[dict[str, Any]], outcomes: list[tuple[Any, Outcome[list[ExecResult]]]],
            seconds: float, template_seconds: float | None) -> dict[str, Any]:  # fmt: skip
    members = []
    for row, (_sandbox, outcome) in zip(summary, outcomes, strict=True):
        results = outcome.value or []
        member = {
            **row,
            "exit_codes": [r.exit_code for r in results],
            "stdout": [r.stdout.decode(errors="replace") for r in results],
            "stderr": [r.stderr.decode(errors="replace") for r in results],
            "error": row["error"] or (str(outcome.error) if outcome.error else None),
        }
        member["ok"] = outcome.ok and all(r.ok for r in results)
        members.append(member)
    return {"ok": all(m["ok"] for m in members), "seconds": seconds, "template_seconds": template_seconds,
            "members": members}  # fmt: skip
