"""One template sandbox for many clones, as fleets and pools use it.

The template boots once (``boot_to_be_template``), saves its state and stops; its two files live
in a private directory under the runtime dir, removed when the caller's exit stack closes (after
every clone is gone). The returned config starts a clone of it. The directory is named and marked
like a run directory (``sb-...`` with an owner file), so if its controller dies without cleaning
up (SIGKILL), its reaper removes it (and failing that, the next sandbox started sweeps it).
"""

from __future__ import annotations

import tempfile
from contextlib import AsyncExitStack
from pathlib import Path

from vmctl.config import SandboxConfig
from vmctl.core import reaper
from vmctl.core.paths import remove_tree, runtime_dir, write_owner
from vmctl.hypervisors.base import Backend
from vmctl.sandbox.facade import Sandbox


async def boot_template(config: SandboxConfig, stack: AsyncExitStack, *, id: str,  # noqa: A002
                        backend: Backend | None, start_timeout: float) -> SandboxConfig:  # fmt: skip
    """Boot ``config`` to be a template whose files go when ``stack`` closes; the clones' config."""
    work = Path(tempfile.mkdtemp(prefix=f"sb-{id}-", dir=runtime_dir()))
    write_owner(work)
    reaper.add_dir(work)  # removed by the reaper should this process die first
    stack.callback(remove_tree, work)  # registered first: runs after everything else
    files = {"memory_path": work / "template.mem", "devices_state_path": work / "template.state"}
    # a template cannot hold a share (QEMU cannot save virtio-fs): its clones plug them once they run
    template = config.replace(boot_to_be_template=True, devices=config.unshared_devices, **files)
    async with Sandbox(template, id=id, backend=backend, start_timeout=start_timeout):
        pass
    return config.replace(boot_from_template=True, **files)
