"""What a built guest's ``manifest.json`` says, read by validation (the base layer) without
importing the builder (vmctl.guest, which writes it)."""

from __future__ import annotations

import json
from pathlib import Path

#: the file beside a built guest's kernel and initrd
MANIFEST = "manifest.json"
#: the manifest's key saying the initramfs mounts ``root=`` and switches to it
SWITCHES_ROOT = "initrd_switches_root"


def initrd_switches_root(initrd: Path) -> bool:
    """Whether ``initrd`` is vmctl's default initramfs, which mounts ``root=`` and switches to it."""
    try:
        manifest = json.loads((initrd.parent / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return initrd.name == "initrd.img" and manifest.get(SWITCHES_ROOT) is True
