"""The accelerator of a benchmark run, chosen once and shared by every peer and worker process.

vmctl's own rule decides (``VMCTL_ACCEL``, else ``auto``: KVM where a guest really boots under
it, else TCG); the result is exported as ``VMCTL_ACCEL`` so processes started afterwards, and
the peers that build QEMU or libvirt configurations themselves (``plain.py``, ``libvirt_peer.py``),
use the same accelerator. Benchmarks print it with their tables.
"""

from __future__ import annotations

import os

from vmctl import SandboxConfig, guest, host
from vmctl.core.log import get_logger


async def pin_accel() -> str:
    """Resolve the accelerator (probing KVM at most once per host, as vmctl does) and export it."""
    from vmctl.hypervisors.process import resolve_accel

    assets = await guest.ensure_default_assets()
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, memory_mib=256)
    accel = await resolve_accel(config, host.find_qemu(None), get_logger("bench"))
    os.environ["VMCTL_ACCEL"] = accel
    return accel


def pinned() -> str:
    """The accelerator :func:`pin_accel` exported (a worker's parent pinned it); TCG if none was."""
    value = os.environ.get("VMCTL_ACCEL", "")
    return value if value in ("kvm", "tcg") else "tcg"
