"""Copy-on-write disks: the per-sandbox qcow2 overlays over read-only base images.

An overlay disk (``BlockDevice(overlay=True)``, or ``SandboxConfig(image_overlay=True)`` for the
root) is rendered as QEMU's backing chain with the base opened read-only in its stated format and
the overlay's ``backing`` set to the base's node (see :meth:`BlockDevice.backends`). The overlay
is made here before QEMU starts, with ``qemu-img create`` and *no* backing file name in its
header: nothing in the file ever tells QEMU which host file to open. A sandbox's overlay starts
empty on a boot, as a copy of the template's on a clone, as a copy of the snapshot's on a
restore (so a snapshot can be restored many times), or as the file the user kept
(``overlay_file``) when that exists already.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import anyio

from vmctl.devices import BlockDevice, Device
from vmctl.errors import HostError, InvalidArgument
from vmctl.hypervisors.base import PlacedDevice

QCOW2_MAGIC = b"QFI\xfb"


def overlay_disks(devices: Iterable[tuple[str, Device | None]]) -> list[tuple[str, BlockDevice]]:
    """The overlay disks among ``(id, device)`` pairs, their overlay files filled in."""
    out = []
    for dev_id, device in devices:
        if isinstance(device, BlockDevice) and device.overlay:
            assert device.overlay_file is not None, "with_defaults fills in the overlay file"
            out.append((dev_id, device))
    return out


def in_run_dir(placed: Sequence[PlacedDevice], run_dir: Path) -> list[PlacedDevice]:
    """``placed`` with every overlay in ``run_dir``: a clone or a restore gets a copy of its own,
    never the file its template or snapshot was made from (nor one a user kept)."""
    out: list[PlacedDevice] = []
    for dev_id, device, where in placed:
        if isinstance(device, BlockDevice) and device.overlay:
            device = replace(device, overlay_file=run_dir / f"{dev_id}.overlay.qcow2")
        out.append((dev_id, device, where))
    return out


def virtual_size(path: Path, fmt: str) -> int:
    """The disk size a guest sees: a raw file's length, or a qcow2 header's size field (read
    here rather than by a tool that might follow the header's backing file name)."""
    if fmt == "raw":
        return path.stat().st_size
    with path.open("rb") as f:
        header = f.read(32)
    if header[:4] != QCOW2_MAGIC:
        raise InvalidArgument(f"{path} is not a qcow2 image (format='qcow2' was given)")
    return int.from_bytes(header[24:32], "big")


async def prepare(placed: Sequence[PlacedDevice], *, source: Callable[[str], Path] | None = None) -> None:
    """Give every overlay disk in ``placed`` its overlay file before QEMU opens it: a copy of
    ``source(id)`` (a template's or a snapshot's), the user's kept file, or a new empty one."""
    for dev_id, device in overlay_disks((i, d) for i, d, _ in placed):
        overlay = device.overlay_file
        assert overlay is not None
        if source is not None:
            saved = source(dev_id)
            if not saved.is_file():
                raise InvalidArgument(f"the overlay of disk {dev_id!r} is missing ({saved}): it was not saved "
                                      "with the snapshot or template")  # fmt: skip
            await anyio.to_thread.run_sync(shutil.copyfile, saved, overlay)
        elif overlay.exists():
            with overlay.open("rb") as f:
                if f.read(4) != QCOW2_MAGIC:
                    raise InvalidArgument(f"overlay_file: {overlay} exists and is not a qcow2 overlay; "
                                          "remove it or name another file")  # fmt: skip
        else:
            await create(device, overlay)


async def create(device: BlockDevice, overlay: Path) -> None:
    """An empty qcow2 the size of ``device``'s base, without a backing file name in it."""
    if shutil.which("qemu-img") is None:
        raise HostError("overlay disks are made with qemu-img: apt-get install qemu-utils")
    size = virtual_size(device.path, device.image_format())
    try:
        await anyio.run_process(["qemu-img", "create", "-q", "-f", "qcow2", str(overlay), str(size)])
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or b"").decode(errors="replace").strip()
        raise HostError(f"creating the overlay {overlay} failed: {detail}") from None
    overlay.chmod(0o600)


async def save(devices: Iterable[tuple[str, Device | None]], target: Callable[[str], Path]) -> list[Path]:
    """Copy each overlay disk's overlay to ``target(id)``. Call it while QEMU has the disks
    flushed and inactive: after a completed save of the VM's state, before it runs again."""
    saved = []
    for dev_id, device in overlay_disks(devices):
        assert device.overlay_file is not None
        dest = target(dev_id)
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        await anyio.to_thread.run_sync(shutil.copyfile, device.overlay_file, dest)
        saved.append(dest)
    return saved
