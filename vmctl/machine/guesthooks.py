"""The original's guest hooks: executables in a guest directory (``guest_hook_path``) that the
agent runs in name order, from its ``start`` subdirectory once the guest is up and from ``stop``
before a clean stop. Their output goes to the guest's console (so to ``console.log``); the first
one that fails stops the rest and is reported by name and exit code.

What the guest answers is untrusted: the name it reports is cut to printable characters and a
bounded length, and the code must be a number.
"""

from __future__ import annotations

import re
from typing import Any

from vmctl.agent.client import AgentClient
from vmctl.config import SandboxConfig
from vmctl.errors import GuestError, VmctlError
from vmctl.hypervisors.base import Start

#: how long one phase's hooks may take together (a hook that hangs fails the start)
HOOK_TIMEOUT = 60.0

# $1 the hook directory, $2 the phase, $3 the sandbox id. On failure: "<name> <code>" on stdout.
_RUN = r"""
d="$1/$2"
[ -d "$d" ] || exit 0
for h in "$d"/*; do
    [ -f "$h" ] && [ -x "$h" ] || continue
    echo "vmctl: running $2 hook ${h##*/}" > /dev/console
    VMCTL_SANDBOX_ID="$3" VMCTL_HOOK="$2" "$h" "$2" < /dev/null > /dev/console 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || { echo "${h##*/} $rc"; exit 5; }
done
exit 0
"""
_REPORT = re.compile(r"([!-~]{1,64}) (\d{1,3})")


async def run(agent: AgentClient, hook_path: str, phase: str, sandbox_id: str, timeout: float = HOOK_TIMEOUT) -> None:
    """Run ``phase``'s hooks; a GuestError naming the one that failed and its exit code."""
    result = await agent.exec(["sh", "-c", _RUN, "sh", hook_path, phase, sandbox_id], timeout=timeout,
                              output_limit=4096)  # fmt: skip
    if result.ok:
        return
    if result.timed_out:
        raise GuestError(f"the guest's {phase} hooks in {hook_path}/{phase} did not finish within {timeout:.0f}s")
    found = _REPORT.fullmatch(result.text.strip().splitlines()[-1] if result.text.strip() else "")
    name, code = (found.group(1), found.group(2)) if found else ("?", str(result.exit_code))
    raise GuestError(f"guest {phase} hook {name!r} in {hook_path}/{phase} failed with exit code {code} "
                     "(its output is in the console log)")  # fmt: skip


async def at_start(agent: AgentClient, config: SandboxConfig, start: Start, sandbox_id: str) -> None:
    """A new guest's start hooks: a boot's or a clone's (not a template's, nor a restored or
    attached guest's, which started before)."""
    if config.guest_hook_path and start in (Start.BOOT, Start.CLONE) and not config.boot_to_be_template:
        await run(agent, config.guest_hook_path, "start", sandbox_id)


async def before_stop(agent: AgentClient, config: SandboxConfig, sandbox_id: str, timeout: float, log: Any) -> None:
    """The stop hooks before a clean stop; one that fails is logged and the stop goes on."""
    if not config.guest_hook_path:
        return
    try:
        await run(agent, config.guest_hook_path, "stop", sandbox_id, timeout=min(timeout, HOOK_TIMEOUT))
    except VmctlError as exc:
        log.warning("a guest stop hook failed; stopping anyway", error=str(exc))
