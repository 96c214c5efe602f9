"""What a built guest's ``manifest.json`` says, read by validation (the base layer) without
importing the builder (vmctl.guest, which writes it)."""

from __future__ import annotations

import json
from pathlib import Path

#: the file beside a built guest's kernel and initrd
MANIFEST = "manifest.json"
#: the manifest's key saying the initramfs mounts ``root=`` and switches to it
SWITCHES_ROOT = "initrd_switches_root"
#: the manifest's key listing the share file systems the guest can mount (``virtiofs``, ``9p``)
FILESYSTEMS = "share_filesystems"


def initrd_switches_root(initrd: Path) -> bool:
    """Whether ``initrd`` is vmctl's default initramfs, which mounts ``root=`` and switches to it."""
    manifest = _manifest(initrd)
    return manifest is not None and manifest.get(SWITCHES_ROOT) is True


def _manifest(initrd: Path) -> dict[str, object] | None:
    try:
        manifest = json.loads((initrd.parent / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and initrd.name == "initrd.img" else None


def initrd_filesystems(initrd: Path) -> frozenset[str] | None:
    """The share file systems a built guest can mount; None when it is not vmctl's build (or an
    older one that does not say): then only the mount in the guest can tell."""
    manifest = _manifest(initrd)
    found = manifest.get(FILESYSTEMS) if manifest else None
    return frozenset(str(f) for f in found) if isinstance(found, list) else None
