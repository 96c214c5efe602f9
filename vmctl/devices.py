"""Device models. Each device is one description that renders both ways: QEMU arguments for
cold plug (in the config, before start) and QMP commands for hotplug, so the two cannot drift.

QEMU 7.2 takes JSON for ``-device``, ``-blockdev``, ``-netdev`` and ``-object``, which is exactly
what ``device_add``, ``blockdev-add``, ``netdev_add`` and ``object-add`` take over QMP; only
character devices need two spellings (``-chardev`` has no JSON form).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeGuard, get_args

from vmctl.core.pathprobe import expand_path, probe
from vmctl.errors import Problem

ID_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,19}\Z")
HOSTFWD_PATTERN = re.compile(r"^(tcp|udp):(\d{1,3}(\.\d{1,3}){3})?:\d{1,5}-(\d{1,3}(\.\d{1,3}){3})?:\d{1,5}\Z")
PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]\Z")
MAC_PATTERN = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}\Z")
TAP_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}\Z")

BlockDriver = Literal["virtio-scsi", "virtio-blk", "virtio-mmio"]
ImageFormat = Literal["raw", "qcow2"]


@dataclass(frozen=True)
class QmpCommand:
    name: str
    arguments: Mapping[str, Any]


@dataclass(frozen=True)
class Backend:
    """A host-side part of a device: ``kind`` is blockdev, netdev, object or chardev."""

    kind: str
    spec: Mapping[str, Any]
    key: str  # the id QEMU knows it by (node-name or id)

    def cold_args(self) -> list[str]:
        if self.kind == "chardev":
            return ["-chardev", _chardev_string(self.spec)]
        if self.kind == "fsdev":  # QemuOpts only, and no QMP command at all (9p is cold-plugged only)
            opts = [f"{k}={str(v).replace(',', ',,')}" for k, v in self.spec.items() if k != "driver"]
            return ["-fsdev", ",".join([str(self.spec["driver"]), *opts])]
        return [f"-{self.kind}", json.dumps(self.spec, separators=(",", ":"))]

    def add_command(self) -> QmpCommand:
        if self.kind == "chardev":
            return QmpCommand("chardev-add", _chardev_qmp(self.spec))
        name = {"blockdev": "blockdev-add", "netdev": "netdev_add", "object": "object-add"}[self.kind]
        return QmpCommand(name, self.spec)

    def del_command(self) -> QmpCommand:
        name, arg = {
            "blockdev": ("blockdev-del", "node-name"),
            "netdev": ("netdev_del", "id"),
            "object": ("object-del", "id"),
            "chardev": ("chardev-remove", "id"),
        }[self.kind]
        return QmpCommand(name, {arg: self.key})


def _chardev_string(spec: Mapping[str, Any]) -> str:
    path = str(spec["path"]).replace(",", ",,")
    server = "on" if spec.get("server") else "off"
    return f"socket,id={spec['id']},path={path},server={server}" + (",wait=off" if spec.get("server") else "")


def _chardev_qmp(spec: Mapping[str, Any]) -> dict[str, Any]:
    data = {"addr": {"type": "unix", "data": {"path": str(spec["path"])}}, "server": bool(spec.get("server"))}
    if spec.get("server"):
        data["wait"] = False
    return {"id": spec["id"], "backend": {"type": "socket", "data": data}}


@dataclass(frozen=True)
class Placement:
    """Where a device sits: a PCI bus (and address), a SCSI target, or nothing (virtio-mmio)."""

    bus: str | None = None
    addr: str | None = None
    scsi_id: int | None = None


@dataclass(frozen=True)
class DeviceContext:
    """What rendering needs from the sandbox config."""

    machine: str = "q35"
    block_driver: BlockDriver = "virtio-scsi"
    io_threads: bool = False
    cache_set: bool = False
    cache_direct: bool = False
    cache_noflush: bool = False
    vhost_net: bool = False
    shared_memory: bool = False
    #: guest RAM that a backend such as virtiofsd can map (memfd shared; not a template clone's)
    ram_shared: bool = True
    #: what user-mode NICs reach (SandboxConfig.network): "none" adds restrict=on; "egress" is
    #: rendered as slirp here and handed to passt by the hypervisor
    network: str = "egress"

    @property
    def pci(self) -> bool:
        return self.machine != "microvm"


class Device(ABC):
    """A device a sandbox can have. Subclasses are frozen dataclasses with an optional ``id``."""

    kind: ClassVar[str]
    id: str | None

    def problems(self, ctx: DeviceContext) -> list[Problem]:
        out = []
        if self.id is not None and not ID_PATTERN.fullmatch(self.id):
            out.append(
                Problem(f"{self.kind}.id", f"{self.id!r}: 1-20 letters, digits, '_' or '-', starting with a letter")
            )
        elif self.id is not None and RESERVED_IDS.match(self.id):
            out.append(Problem(f"{self.kind}.id", f"{self.id!r} is an id vmctl uses itself; pick another"))
        return out

    def needs_slot(self, ctx: DeviceContext) -> str | None:
        """``pci`` or ``scsi`` when the device takes a slot on that bus, else None."""
        return "pci" if ctx.pci else None

    def backends(self, dev_id: str, ctx: DeviceContext) -> list[Backend]:
        return []

    @abstractmethod
    def frontend(self, dev_id: str, ctx: DeviceContext, where: Placement) -> dict[str, Any]: ...

    def cold_args(self, dev_id: str, ctx: DeviceContext, where: Placement) -> list[str]:
        args: list[str] = []
        for backend in self.backends(dev_id, ctx):
            args += backend.cold_args()
        return args + ["-device", json.dumps(self.frontend(dev_id, ctx, where), separators=(",", ":"))]

    def plug_commands(self, dev_id: str, ctx: DeviceContext, where: Placement) -> list[QmpCommand]:
        commands = [b.add_command() for b in self.backends(dev_id, ctx)]
        return commands + [QmpCommand("device_add", self.frontend(dev_id, ctx, where))]

    def ack(self) -> str:
        """How QEMU acknowledges a plug: ``acpi`` (an ``ACPI_DEVICE_OST`` for CPUs and DIMMs) or
        ``return`` (the command's return; the guest then shows disks and NICs)."""
        return "acpi" if self.kind in ("cpu", "memory") else "return"

    def cleanup_commands(self, dev_id: str, ctx: DeviceContext) -> list[QmpCommand]:
        """What to delete after QEMU confirmed the device is gone (backends, last added first)."""
        return [b.del_command() for b in reversed(self.backends(dev_id, ctx))]


def _placed(props: dict[str, Any], where: Placement) -> dict[str, Any]:
    if where.bus is not None:
        props["bus"] = where.bus
    if where.addr is not None:
        props["addr"] = where.addr
    return props


@dataclass(frozen=True)
class BlockDevice(Device):
    """A disk image file. The guest sees it as /dev/vdX (virtio-blk) or /dev/sdX (virtio-scsi).

    With ``overlay=True`` the image is a read-only base under a per-sandbox qcow2 overlay that
    takes the guest's writes (QEMU's backing chain): many sandboxes can share one base. The
    overlay lives in the sandbox's run directory and goes with it, unless ``overlay_file`` names
    where to keep it (an existing one is used again: the disk as that sandbox left it)."""

    kind: ClassVar[str] = "block"
    path: Path = field(default=Path())
    read_only: bool = False
    id: str | None = None
    driver: BlockDriver | None = None
    format: ImageFormat | None = None
    io_thread: bool | None = None
    overlay: bool = False
    overlay_file: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", expand_path(self.path).absolute())
        if isinstance(self.overlay_file, str | os.PathLike):
            object.__setattr__(self, "overlay_file", expand_path(self.overlay_file).absolute())

    def problems(self, ctx: DeviceContext) -> list[Problem]:
        out = super().problems(ctx)
        if not probe(self.path, "file"):
            out.append(Problem("block.path", f"{self.path} does not exist or is not a file"))
        if self.driver is not None and self.driver not in get_args(BlockDriver):
            out.append(Problem("block.driver", f"{self.driver!r}: use one of {', '.join(get_args(BlockDriver))}"))
            return out
        if self.format is not None and self.format not in get_args(ImageFormat):
            out.append(Problem("block.format", f"{self.format!r}: use one of {', '.join(get_args(ImageFormat))}"))
        if self.overlay and self.read_only:
            out.append(Problem("block.overlay", "an overlay takes a disk's writes; a read_only disk needs none: "
                                                "set one of them"))  # fmt: skip
        if self.overlay_file is not None:
            if not self.overlay:
                out.append(Problem("block.overlay_file", "names where an overlay is kept: set overlay=True too"))
            elif not probe(self.overlay_file.parent, "dir"):
                out.append(Problem("block.overlay_file", f"directory {self.overlay_file.parent} does not exist"))
            elif self.overlay_file == self.path:
                out.append(Problem("block.overlay_file", "must not be the base image itself"))
        driver = self.driver or ctx.block_driver
        if driver == "virtio-mmio" and ctx.pci:
            out.append(Problem("block.driver", "virtio-mmio needs machine='microvm'"))
        if driver != "virtio-mmio" and not ctx.pci:
            out.append(Problem("block.driver", f"{driver} needs PCI; on microvm use virtio-mmio"))
        return out

    def effective_driver(self, ctx: DeviceContext) -> BlockDriver:
        return self.driver or ("virtio-mmio" if not ctx.pci else ctx.block_driver)

    def needs_slot(self, ctx: DeviceContext) -> str | None:
        driver = self.effective_driver(ctx)
        return {"virtio-blk": "pci", "virtio-scsi": "scsi", "virtio-mmio": None}[driver]

    def image_format(self) -> str:
        """``raw`` unless ``format`` says otherwise: never guessed from the file's first bytes,
        which a guest can write (a planted qcow2 header could point QEMU at a host file)."""
        return self.format or "raw"

    def backends(self, dev_id: str, ctx: DeviceContext) -> list[Backend]:
        """The file and format nodes; with an overlay, the base's two (read-only) first, then the
        overlay's, whose ``backing`` is the base's node: QEMU never follows a backing file name
        written inside an image, and the base is never opened for writing."""
        if not self.overlay:
            return self._nodes(dev_id, self.path, self.image_format(), ctx, read_only=self.read_only)
        assert self.overlay_file is not None, "the sandbox fills in the overlay file (with_defaults)"
        base = self._nodes(f"{dev_id}-base", self.path, self.image_format(), ctx, read_only=True)
        top = self._nodes(dev_id, self.overlay_file, "qcow2", ctx, read_only=False, backing=f"{dev_id}-base-fmt")
        return base + top

    @staticmethod
    def _nodes(name: str, path: Path, fmt_driver: str, ctx: DeviceContext, *, read_only: bool,
               backing: str | None = None) -> list[Backend]:  # fmt: skip
        file_node: dict[str, Any] = {"driver": "file", "filename": str(path), "node-name": f"{name}-file",
                                     "read-only": read_only}  # fmt: skip
        fmt: dict[str, Any] = {"driver": fmt_driver, "file": f"{name}-file", "node-name": f"{name}-fmt",
                               "read-only": read_only}  # fmt: skip
        if fmt_driver == "qcow2":
            fmt["backing"] = backing  # a qcow2 never opens a backing file named inside the image
        if ctx.cache_set:
            cache = {"direct": ctx.cache_direct, "no-flush": ctx.cache_noflush}
            file_node["cache"] = fmt["cache"] = cache
        return [Backend("blockdev", file_node, f"{name}-file"), Backend("blockdev", fmt, f"{name}-fmt")]

    def frontend(self, dev_id: str, ctx: DeviceContext, where: Placement) -> dict[str, Any]:
        driver = self.effective_driver(ctx)
        props: dict[str, Any] = {"id": dev_id, "drive": f"{dev_id}-fmt", "serial": dev_id}
        iothread = ctx.io_threads if self.io_thread is None else self.io_thread
        if driver == "virtio-scsi":
            return {"driver": "scsi-hd", **props, "bus": "scsi0.0", "channel": 0, "scsi-id": where.scsi_id, "lun": 0}
        if driver == "virtio-mmio":
            return {"driver": "virtio-blk-device", **props}
        if iothread:
            props["iothread"] = "iothread0"
        return _placed({"driver": "virtio-blk-pci", **props}, where)


@dataclass(frozen=True)
class NetworkDevice(Device):
    """virtio-net. ``backend="user"`` needs no privileges (``hostfwd`` like "tcp:127.0.0.1:2222-:22");
    ``backend="tap"`` uses (or creates, as root) the tap interface ``tap_name``."""

    kind: ClassVar[str] = "network"
    backend: Literal["user", "tap"] = "user"
    hostfwd: tuple[str, ...] = ()
    tap_name: str | None = None
    mac: str | None = None
    id: str | None = None

    def problems(self, ctx: DeviceContext) -> list[Problem]:
        out = super().problems(ctx)
        if self.backend not in ("user", "tap"):
            out.append(Problem("network.backend", "must be 'user' or 'tap'"))
        for rule in self.hostfwd:
            if not HOSTFWD_PATTERN.match(rule):
                out.append(Problem("network.hostfwd", f"{rule!r}: use 'tcp:127.0.0.1:HOSTPORT-:GUESTPORT'"))
        if self.hostfwd and self.backend != "user":
            out.append(Problem("network.hostfwd", "port forwarding needs backend='user'"))
        if self.backend == "tap":
            if not self.tap_name or not TAP_NAME.match(self.tap_name):
                out.append(Problem("network.tap_name", "a tap interface name of 1-15 letters, digits, '_', '.', '-'"))
            if not Path("/dev/net/tun").exists():
                out.append(Problem("network.backend", "the host has no /dev/net/tun; use backend='user'"))
        if self.mac is not None and not MAC_PATTERN.match(self.mac):
            out.append(Problem("network.mac", f"{self.mac!r}: use six lower-case hex pairs like 52:54:00:12:34:56"))
        return out

    def backends(self, dev_id: str, ctx: DeviceContext) -> list[Backend]:
        spec: dict[str, Any] = {"type": self.backend, "id": f"{dev_id}-net"}
        if self.backend == "user" and self.hostfwd:
            spec["hostfwd"] = [{"str": loopback_forward(rule)} for rule in self.hostfwd]
        if self.backend == "user" and ctx.network == "none":
            spec["restrict"] = True  # the guest reaches nothing; port forwards still come in
        if self.backend == "tap":
            spec.update({"ifname": self.tap_name, "script": "no", "downscript": "no"})
            if ctx.vhost_net:
                spec["vhost"] = True
        return [Backend("netdev", spec, f"{dev_id}-net")]

    def frontend(self, dev_id: str, ctx: DeviceContext, where: Placement) -> dict[str, Any]:
        props: dict[str, Any] = {"id": dev_id, "netdev": f"{dev_id}-net"}
        if self.mac:
            props["mac"] = self.mac
        if not ctx.pci:
            return {"driver": "virtio-net-device", **props}
        return _placed({"driver": "virtio-net-pci", **props}, where)


def loopback_forward(rule: str) -> str:
    """A ``hostfwd`` rule that names no host address listens on 127.0.0.1, not on every interface."""
    proto, rest = rule.split(":", 1)
    return f"{proto}:127.0.0.1{rest}" if rest.startswith(":") else rule


@dataclass(frozen=True)
class VsockDevice(Device):
    kind: ClassVar[str] = "vsock"
    guest_cid: int = 3
    id: str | None = None

    def problems(self, ctx: DeviceContext) -> list[Problem]:
        out = super().problems(ctx)
        if not 3 <= self.guest_cid < 2**32 - 1:
            out.append(Problem("vsock.guest_cid", "must be between 3 and 2^32-2"))
        if not Path("/dev/vhost-vsock").exists():
            out.append(Problem("vsock", "the host has no /dev/vhost-vsock: 'modprobe vhost_vsock' first"))
        return out

    def frontend(self, dev_id: str, ctx: DeviceContext, where: Placement) -> dict[str, Any]:
        driver = "vhost-vsock-pci" if ctx.pci else "vhost-vsock-device"
        return _placed({"driver": driver, "id": dev_id, "guest-cid": self.guest_cid}, where)


@dataclass(frozen=True)
class VfioDevice(Device):
    """A host PCI device passed through (``host_address`` like "0000:01:00.0", bound to vfio-pci)."""

    kind: ClassVar[str] = "vfio"
    host_address: str = ""
    id: str | None = None

    def problems(self, ctx: DeviceContext) -> list[Problem]:
        out = super().problems(ctx)
        if not PCI_ADDRESS.match(self.host_address):
            out.append(Problem("vfio.host_address", f"{self.host_address!r}: use DDDD:BB:SS.F, e.g. 0000:01:00.0"))
        elif not Path(f"/sys/bus/pci/devices/{self.host_address}").exists():
            out.append(Problem("vfio.host_address", f"no PCI device {self.host_address} on this host"))
        elif not Path(f"/sys/bus/pci/devices/{self.host_address}/iommu_group").exists():
            out.append(Problem("vfio.host_address", f"{self.host_address} has no IOMMU group: enable the IOMMU"))
        if not ctx.pci:
            out.append(Problem("vfio", "VFIO needs a PCI machine"))
        return out

    def frontend(self, dev_id: str, ctx: DeviceContext, where: Placement) -> dict[str, Any]:
        return _placed({"driver": "vfio-pci", "id": dev_id, "host": self.host_address}, where)


def _vhost_user_problems(kind: str, socket: Path, ctx: DeviceContext) -> list[Problem]:
    """A vhost-user backend maps guest RAM (it must be shared) and sits on PCI."""
    out = _socket_problems(f"{kind}.socket", socket)
    if not ctx.shared_memory:
        out.append(Problem(kind, "the vhost-user backend must map guest memory: set shared_memory=True in the config"))
    if not ctx.pci:
        out.append(Problem(kind, "vhost-user devices need a PCI machine (q35 or pc)"))
    return out


def _socket_problems(field_name: str, path: Path) -> list[Problem]:
    try:
        if stat.S_ISSOCK(path.stat().st_mode):
            return []
        return [Problem(field_name, f"{path} is not a unix socket")]
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return [Problem(field_name, f"{path} does not exist: start the vhost-user backend first")]


@dataclass(frozen=True)
class VhostUserBlockDevice(Device):
    """A disk served by a vhost-user backend (e.g. qemu-storage-daemon) on ``socket``."""

    kind: ClassVar[str] = "vhost-user-block"
    socket: Path = field(default=Path())
    id: str | None = None

    def problems(self, ctx: DeviceContext) -> list[Problem]:
        return super().problems(ctx) + _vhost_user_problems(self.kind, Path(self.socket), ctx)

    def backends(self, dev_id: str, ctx: DeviceContext) -> list[Backend]:
        return [Backend("chardev", {"id": f"{dev_id}-chr", "path": str(self.socket)}, f"{dev_id}-chr")]

    def frontend(self, dev_id: str, ctx: DeviceContext, where: Placement) -> dict[str, Any]:
        return _placed({"driver": "vhost-user-blk-pci", "id": dev_id, "chardev": f"{dev_id}-chr"}, where)


@dataclass(frozen=True)
class VhostUserNetDevice(Device):
    """A NIC served by a vhost-user backend (e.g. a DPDK switch) on ``socket``."""

    kind: ClassVar[str] = "vhost-user-net"
    socket: Path = field(default=Path())
    mac: str | None = None
    id: str | None = None

    def problems(self, ctx: DeviceContext) -> list[Problem]:
        out = super().problems(ctx) + _vhost_user_problems(self.kind, Path(self.socket), ctx)
        if self.mac is not None and not MAC_PATTERN.match(self.mac):
            out.append(Problem("vhost-user-net.mac", f"{self.mac!r}: use six lower-case hex pairs like 52:54:00:12:34:56"))
        return out

    def backends(self, dev_id: str, ctx: DeviceContext) -> list[Backend]:
        return [
            Backend("chardev", {"id": f"{dev_id}-chr", "path": str(self.socket)}, f"{dev_id}-chr"),
            Backend(
                "netdev", {"type": "vhost-user", "id": f"{dev_id}-net", "chardev": f"{dev_id}-chr"}, f"{dev_id}-net"
            ),
        ]

    def frontend(self, dev_id: str, ctx: DeviceContext, where: Placement) -> dict[str, Any]:
        # vectors=0: with MSI-X vectors, QEMU 7.2 under TCG crashes as the guest starts a vhost-user NIC
        props: dict[str, Any] = {"driver": "virtio-net-pci", "id": dev_id, "netdev": f"{dev_id}-net", "vectors": 0}
        if self.mac:
            props["mac"] = self.mac
        return _placed(props, where)


@dataclass(frozen=True)
class SerialPort(Device):
    """An extra virtio-serial port named ``name`` in the guest, as a unix socket on the host.

    vmctl listens on ``socket`` (it is created in the sandbox's run directory when not given)."""

    kind: ClassVar[str] = "serial"
    name: str = "org.vmctl.port"
    socket: Path | None = None
    id: str | None = None

    def problems(self, ctx: DeviceContext) -> list[Problem]:
        out = super().problems(ctx)
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", self.name):
            out.append(Problem("serial.name", f"{self.name!r}: 1-64 letters, digits, '_', '.', '-'"))
        return out

    def needs_slot(self, ctx: DeviceContext) -> str | None:
        return None

    def backends(self, dev_id: str, ctx: DeviceContext) -> list[Backend]:
        assert self.socket is not None, "the sandbox fills in the socket path"
        return [Backend("chardev", {"id": f"{dev_id}-chr", "path": str(self.socket), "server": True}, f"{dev_id}-chr")]

    def frontend(self, dev_id: str, ctx: DeviceContext, where: Placement) -> dict[str, Any]:
        return {
            "driver": "virtserialport",
            "id": dev_id,
            "bus": "vser0.0",
            "chardev": f"{dev_id}-chr",
            "name": self.name,
        }


#: where a share may not be mounted in the guest: the guest's own system directories
_SYSTEM_MOUNTS = ("/", "/proc", "/sys", "/dev", "/run", "/tmp", "/etc", "/bin", "/sbin", "/usr", "/lib", "/lib64")
GUEST_PATH_PATTERN = re.compile(r"^(/[A-Za-z0-9._+@-]{1,64}){1,16}\Z")


def is_guest_path(path: object) -> bool:
    """An absolute guest path vmctl passes to the guest: plain characters, no ``.`` or ``..`` parts."""
    return isinstance(path, str) and GUEST_PATH_PATTERN.fullmatch(path) is not None \
        and not any(part in (".", "..") for part in path.split("/"))  # fmt: skip
SHARE_TAG_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,36}\Z")  # virtio-fs tags: at most 36 bytes
ShareCache = Literal["auto", "always", "none"]
ShareProtocol = Literal["virtiofs", "9p"]
#: the original's 9p msize (bytes), and the most the guest's virtio transport takes
DEFAULT_MSIZE_9P = 8192
MAX_MSIZE_9P = 512000
#: what a fleet or a pool fills into a share's host path, per member (each directory made if missing)
MEMBER_PLACEHOLDERS = ("index", "id")


@dataclass(frozen=True)
class SharedDirectory(Device):
    """A host directory mounted in the guest at ``guest_path`` over virtio-fs.

    vmctl runs a ``virtiofsd`` per share (jailed: it sees only ``host_path``, in the sandbox's
    cgroup) and the agent mounts it; the plug returns once the guest has it mounted.
    ``read_only`` is enforced on the host (a read-only bind under virtiofsd), not by the guest's
    mount options. ``tag`` is the virtio-fs tag the guest mounts (the device id when not given);
    ``cache`` is virtiofsd's cache mode (``auto``: the guest revalidates after a timeout;
    ``none``: every access reaches the host, for a directory the host changes meanwhile)."""

    kind: ClassVar[str] = "share"
    host_path: Path = field(default=Path())
    guest_path: str = ""
    read_only: bool = True
    tag: str | None = None
    cache: ShareCache = "auto"
    id: str | None = None
    #: ``virtiofs`` (a virtiofsd per share; cold or hot, snapshots) or ``9p`` (QEMU serves the
    #: directory itself; cold only, for guests whose kernel has 9p: ``vmctl guest build --kernel generic``)
    protocol: ShareProtocol = "virtiofs"
    #: the vhost-user socket between QEMU and virtiofsd (vmctl makes it in the run directory)
    socket: Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.host_path, str | os.PathLike):
            object.__setattr__(self, "host_path", expand_path(self.host_path).absolute())
        if isinstance(self.socket, str):  # read back from a record
            object.__setattr__(self, "socket", Path(self.socket))

    def problems(self, ctx: DeviceContext) -> list[Problem]:
        out = super().problems(ctx)
        fixed, placeholders = self.member_template()
        unknown = placeholders - set(MEMBER_PLACEHOLDERS)
        if unknown:
            out.append(Problem("share.host_path", f"{self.host_path}: unknown placeholder(s) "
                                                  f"{', '.join(sorted(unknown))}; use {{index}} or {{id}}"))  # fmt: skip
        elif placeholders and not probe(fixed, "dir"):
            out.append(Problem("share.host_path", f"{fixed} (where each member's directory goes) does not exist"))
        elif not placeholders and not probe(self.host_path, "dir"):
            out.append(Problem("share.host_path", f"{self.host_path} does not exist or is not a directory"))
        guest = self.guest_path
        if not is_guest_path(guest):
            out.append(Problem("share.guest_path", f"{guest!r}: an absolute path in the guest such as /workspace "
                                                   "(letters, digits, '._+@-'; no '.' or '..' parts)"))  # fmt: skip
        elif isinstance(guest, str) and guest.rstrip("/") in _SYSTEM_MOUNTS or guest.startswith(("/proc/", "/sys/", "/dev/")):
            out.append(Problem("share.guest_path", f"{guest} is one of the guest's own system directories; "
                                                   "mount the share elsewhere, e.g. /workspace"))  # fmt: skip
        if self.tag is not None and not SHARE_TAG_PATTERN.fullmatch(str(self.tag)):
            out.append(Problem("share.tag", f"{self.tag!r}: 1-36 letters, digits, '_', '.', '-'"))
        if self.cache not in get_args(ShareCache):
            out.append(Problem("share.cache", f"{self.cache!r}: use one of {', '.join(get_args(ShareCache))}"))
        if self.socket is not None and self.socket.parent.name != "q":
            out.append(Problem("share.socket", "vmctl makes the share's socket itself; leave it unset"))
        if self.protocol not in get_args(ShareProtocol):
            out.append(Problem("share.protocol", f"{self.protocol!r}: use virtiofs or 9p"))
        elif self.protocol == "9p" and self.cache != "auto":
            out.append(Problem("share.cache", "cache is virtiofsd's; a 9p share has none: leave it 'auto'"))
        if self.protocol == "virtiofs" and not ctx.ram_shared:
            out.append(Problem("share", "virtiofsd must map guest memory, which a template keeps in its file "
                                        "(QEMU cannot save a virtio-fs device into a template: give the clones "
                                        "the share instead), and which a clone without shares in its config maps "
                                        "privately (put a share in the clone's config to plug more later)"))  # fmt: skip
        return out

    def member_template(self) -> tuple[Path, set[str]]:
        """The part of ``host_path`` before any ``{placeholder}``, and the placeholders named."""
        parts = self.host_path.parts
        named = {m for part in parts for m in re.findall(r"\{([^{}]*)\}", part)}
        first = next((i for i, part in enumerate(parts) if "{" in part or "}" in part), len(parts))
        return Path(*parts[:first]) if first else Path("/"), named

    def for_member(self, **values: str) -> SharedDirectory:
        """This share with ``{index}`` / ``{id}`` in its host path filled in."""
        path = str(self.host_path)
        for name, value in values.items():
            path = path.replace("{" + name + "}", value)
        return dataclasses.replace(self, host_path=Path(path))

    def mount_tag(self, dev_id: str) -> str:
        return self.tag or dev_id

    @property
    def over_virtiofs(self) -> bool:
        return self.protocol == "virtiofs"

    def backends(self, dev_id: str, ctx: DeviceContext) -> list[Backend]:
        if not self.over_virtiofs:  # QEMU serves it from inside its jail, where it is bound at the same path
            # writable: the guest's owners, modes and device nodes are kept in xattrs, never made for
            # real in the host's directory (QEMU may run as root: no setuid file, no /dev/sda there)
            model = "none" if self.read_only else "mapped-xattr"
            spec = {"driver": "local", "id": f"{dev_id}-fs", "path": str(self.host_path), "security_model": model}
            if self.read_only:
                spec["readonly"] = "on"
            return [Backend("fsdev", spec, f"{dev_id}-fs")]
        assert self.socket is not None, "the sandbox fills in the socket path"
        return [Backend("chardev", {"id": f"{dev_id}-fs", "path": str(self.socket)}, f"{dev_id}-fs")]

    def cleanup_commands(self, dev_id: str, ctx: DeviceContext) -> list[QmpCommand]:
        return super().cleanup_commands(dev_id, ctx) if self.over_virtiofs else []  # no fsdev_del

    def frontend(self, dev_id: str, ctx: DeviceContext, where: Placement) -> dict[str, Any]:
        if not self.over_virtiofs:
            driver = "virtio-9p-pci" if ctx.pci else "virtio-9p-device"
            return _placed({"driver": driver, "id": dev_id, "fsdev": f"{dev_id}-fs",
                            "mount_tag": self.mount_tag(dev_id)}, where)  # fmt: skip
        driver = "vhost-user-fs-pci" if ctx.pci else "vhost-user-fs-device"
        return _placed({"driver": driver, "id": dev_id, "chardev": f"{dev_id}-fs", "tag": self.mount_tag(dev_id)},
                       where)  # fmt: skip


@dataclass(frozen=True)
class CpuDevice(Device):
    """A hot-added vCPU (``resize_vcpus`` makes these; they are rows of the device table so that
    attach and snapshot restore know them too). Acknowledged by ``ACPI_DEVICE_OST``."""

    kind: ClassVar[str] = "cpu"
    driver: str = "qemu64-x86_64-cpu"
    socket_id: int = 0
    core_id: int = 0
    thread_id: int = 0
    id: str | None = None

    def problems(self, ctx: DeviceContext) -> list[Problem]:
        return [Problem("cpu", "vCPUs are not plugged as devices: use vcpus/max_vcpus or resize_vcpus()")]

    def needs_slot(self, ctx: DeviceContext) -> str | None:
        return None

    def frontend(self, dev_id: str, ctx: DeviceContext, where: Placement) -> dict[str, Any]:
        return {"driver": self.driver, "id": dev_id, "socket-id": self.socket_id, "core-id": self.core_id,
                "thread-id": self.thread_id}  # fmt: skip


MIB = 1024 * 1024


@dataclass(frozen=True)
class DimmDevice(Device):
    """Hot-added memory: a ``pc-dimm`` backed by RAM (``resize_memory`` makes these). Acknowledged
    by ``ACPI_DEVICE_OST``; removable because the guest onlines it as movable."""

    kind: ClassVar[str] = "memory"
    size_mib: int = 128
    id: str | None = None
    #: backed by shared memory (memfd), as all guest RAM must be when vhost-user backends map it
    shared: bool = False
    #: where QEMU put it (recorded after the plug): a restore must put it at the same address
    addr: int | None = None
    slot: int | None = None

    def problems(self, ctx: DeviceContext) -> list[Problem]:
        return [Problem("memory", "memory is not plugged as a device: use memory_mib or resize_memory()")]

    def needs_slot(self, ctx: DeviceContext) -> str | None:
        return None

    def backends(self, dev_id: str, ctx: DeviceContext) -> list[Backend]:
        spec: dict[str, Any] = {"qom-type": "memory-backend-ram", "id": f"{dev_id}-mem", "size": self.size_mib * MIB}
        if self.shared:
            spec.update({"qom-type": "memory-backend-memfd", "share": True})
        return [Backend("object", spec, f"{dev_id}-mem")]

    def frontend(self, dev_id: str, ctx: DeviceContext, where: Placement) -> dict[str, Any]:
        props: dict[str, Any] = {"driver": "pc-dimm", "id": dev_id, "memdev": f"{dev_id}-mem"}
        if self.addr is not None:
            props["addr"] = self.addr
        if self.slot is not None:
            props["slot"] = self.slot
        return props


DEVICE_TYPES: dict[str, type[Device]] = {
    cls.kind: cls
    for cls in (
        BlockDevice,
        NetworkDevice,
        VsockDevice,
        VfioDevice,
        VhostUserBlockDevice,
        VhostUserNetDevice,
        SerialPort,
        SharedDirectory,
        CpuDevice,
        DimmDevice,
    )
}

#: Devices that arrive through resize_vcpus / resize_memory, never through hotplug()
RESIZE_KINDS = frozenset({CpuDevice.kind, DimmDevice.kind})


def device_from_mapping(data: Mapping[str, Any]) -> Device:
    """``{"type": "block", "path": "data.img"}`` -> :class:`BlockDevice` (for TOML configs).

    Raises ``TypeError`` naming the field when a value has the wrong type."""
    if not isinstance(data, Mapping):
        raise TypeError(f"a device is a table with a 'type', not {data!r:.100}")
    values = dict(data)
    kind = values.pop("type", None)
    cls = DEVICE_TYPES.get(str(kind))
    if cls is None:
        raise TypeError(f"device type {kind!r:.100}: use one of {', '.join(DEVICE_TYPES)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        hint = hints.get(name)
        if name != "kind" and hint is not None and not _type_ok(hint, value):
            raise TypeError(f"device type {kind!r}: {name} must be {_describe(hint)}, not {value!r:.100}")
    if isinstance(values.get("hostfwd"), list):
        values["hostfwd"] = tuple(values["hostfwd"])
    try:
        return cls(**values)
    except TypeError as exc:
        raise TypeError(f"device type {kind!r}: {exc}") from None


def _type_ok(hint: Any, value: Any) -> bool:
    """Whether ``value`` (from TOML or JSON) fits a device field annotated ``hint``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(arg, value) for arg in get_args(hint))
    if origin is Literal:
        return isinstance(value, str) and value in get_args(hint)
    if origin is tuple:
        return isinstance(value, list | tuple) and all(_type_ok(get_args(hint)[0], item) for item in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path:
        return isinstance(value, str | os.PathLike)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(get_args(hint)[0])}s"
    names = {type(None): "absent", bool: "true or false", int: "an integer", str: "a string", Path: "a path"}
    return names.get(hint, str(hint))


RESERVED_IDS = re.compile(
    r"^(root|rp\d+|br\d+|vser0|scsi0|vsock0|rng0|mem0|iothread0|qmp|console0|agent0|cpu\d+|dimm\d+.*)$"
)


def device_to_mapping(device: Device) -> dict[str, Any]:
    """The inverse of :func:`device_from_mapping` (paths as strings, tuples as lists)."""
    out: dict[str, Any] = {"type": device.kind}
    for f in dataclasses.fields(device):  # type: ignore[arg-type]
        value = getattr(device, f.name)
        if value is None:
            continue
        out[f.name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
    return out


def virtiofs_share(device: object) -> TypeGuard[SharedDirectory]:
    """A share served by a virtiofsd (which vmctl starts, and which snapshots set aside)."""
    return isinstance(device, SharedDirectory) and device.over_virtiofs
