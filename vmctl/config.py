"""SandboxConfig: what a sandbox is made of, validated once, immutable afterwards.

Validation collects every problem (each naming its field and the fix) and raises one
:class:`~vmctl.errors.ConfigError` before anything starts. Defaults follow the original
hypervisor layer: 1 vCPU, max vCPUs = host CPUs, 2048 MiB, one PCI bridge, virtio-scsi.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from vmctl import host
from vmctl.core.guestmanifest import initrd_filesystems, initrd_switches_root
from vmctl.core.pathprobe import expand_path, probe
from vmctl.core.tomlfile import fill_defaults, read_toml_text, relative_to
from vmctl.devices import (
    DEFAULT_MSIZE_9P,
    MAX_MSIZE_9P,
    BlockDevice,
    BlockDriver,
    Device,
    DeviceContext,
    SharedDirectory,
    device_from_mapping,
    device_to_mapping,
    is_guest_path,
)
from vmctl.errors import ConfigError, Problem
from vmctl.params import Param, machine_option_problem, normalize_machine_options, normalize_params, serialize_params

Accel = Literal["auto", "kvm", "tcg"]
Machine = Literal["q35", "pc", "microvm"]
Network = Literal["egress", "none", "host"]

ACCEL_ENV = "VMCTL_ACCEL"
MAX_VCPUS_LIMIT = 240
MIN_MEMORY_MIB = 64
MAX_PCI_BRIDGES = 16
MAX_MEMORY_SLOTS = 256
KERNEL_CMDLINE_MAX = 2048
DEFAULT_TCG_TB_SIZE_MIB = 256  # measured: bench/README.md, "TCG translation cache"
MAX_TCG_TB_SIZE_MIB = 16384

_KERNEL_KEY = re.compile(r"^[A-Za-z0-9_.\-/]+\Z")
_KERNEL_VALUE = re.compile(r"^[^\s\"'\\\x00-\x1f\x7f]*\Z")
_QEMU_KEY = re.compile(r"^[a-z][a-z0-9-]*\Z")
_QEMU_VALUE = re.compile(r"^[^\x00-\x1f\x7f]*\Z")

#: QEMU options hypervisor_params may add. An allowlist, because many QEMU options open host
#: files (-parallel file:, -trace file=, -drive, -readconfig), expose the host filesystem
#: (-virtfs) or listen on the network (-gdb, -vnc): none of those can be passed this way.
ALLOWED_QEMU_OPTIONS = frozenset({"rtc", "smbios", "icount", "global", "boot", "k", "uuid"})

#: The sub-options each allowed option may carry (None: checked by a pattern instead). Left out
#: on purpose because they open host files: smbios file= / path=, icount rr= / rrfile= /
#: rrsnapshot=, boot splash=.
_QEMU_SUBOPTIONS: dict[str, frozenset[str] | None] = {
    "rtc": frozenset({"base", "clock", "driftfix"}),
    "smbios": frozenset(
        {
            "type",
            "vendor",
            "version",
            "date",
            "release",
            "uefi",
            "manufacturer",
            "product",
            "serial",
            "uuid",
            "sku",
            "family",
            "asset",
            "location",
            "part",
            "speed",
            "sock_pfx",
            "max-speed",
            "current-speed",
            "processor-id",
            "value",
        }
    ),  # fmt: skip
    "icount": frozenset({"shift", "align", "sleep"}),
    "boot": frozenset({"order", "once", "menu", "strict", "reboot-timeout", "splash-time"}),
    "global": None,
    "k": None,
    "uuid": None,
}
_IMPLIED_SUBOPTION = {"icount": "shift", "boot": "order"}
_KEYMAP = re.compile(r"[a-z]{2}(-[a-z]{2,3})?\Z")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
_GLOBAL = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+=[^/]*\Z")
_GLOBAL_DENIED = frozenset({"romfile", "file", "filename", "path", "logfile", "chardev", "drive", "netdev", "fd"})

_ASSETS = ("kernel", "initrd", "image", "firmware", "qemu_binary")


def _path(value: object) -> Path | None:
    if value is None or value == "":
        return None
    if isinstance(value, str | os.PathLike):
        return expand_path(value).absolute()
    return value  # type: ignore[return-value]  # reported by validation as a wrong type


@dataclass(frozen=True, kw_only=True)
class SandboxConfig:
    """Everything about one sandbox's virtual machine. Immutable; see :meth:`replace`."""

    # assets (kernel is required; its None default only lets validation name it in ConfigError)
    kernel: Path = None  # type: ignore[assignment]
    initrd: Path | None = None
    image: Path | None = None
    #: the image is a read-only base under a per-sandbox qcow2 overlay (see BlockDevice.overlay)
    image_overlay: bool = False
    firmware: Path | None = None
    qemu_binary: Path | None = None
    # machine
    machine: Machine = "q35"
    #: extra ``-machine`` options from an allowlist (the original's MachineAccelerators):
    #: ``("usb=off", "nvdimm")`` or ``"usb=off,nvdimm"``; a bare name means ``=on``
    machine_accelerators: tuple[str, ...] = ()
    accel: Accel = "auto"
    vcpus: int = 1
    #: the most vCPUs it can grow to; None: the starting host's CPU count (at least vcpus)
    max_vcpus: int | None = None
    memory_mib: int = 2048
    memory_slots: int = 10
    #: the most memory it can grow to; None: the starting host's memory
    max_memory_mib: int | None = None
    pci_bridges: int = 1
    #: the ``msize`` (bytes) a 9p share is mounted with in the guest (the original's Msize9p)
    msize_9p: int = DEFAULT_MSIZE_9P
    # block devices
    block_driver: BlockDriver = None  # type: ignore[assignment]  # virtio-scsi, or virtio-mmio on microvm
    block_cache_set: bool = False
    block_cache_direct: bool = False
    block_cache_noflush: bool = False
    disable_block_devices: bool = False
    io_threads: bool = False
    # params
    kernel_params: tuple[Param, ...] = ()
    hypervisor_params: tuple[Param, ...] = ()
    # memory and CPU behaviour
    debug: bool = False
    mem_prealloc: bool = False
    huge_pages: bool = False
    #: let vhost-user backends you run yourself plug in (hot too): QEMU then reaches their sockets
    #: by host path, so its jail keeps the host's mount namespace (guest RAM is a shared memfd anyway)
    shared_memory: bool = False
    #: the original's realtime: guest memory locking is decided explicitly, by ``mlock``
    #: (``-overcommit mem-lock=on|off``); with realtime on and mlock off, guest memory stays swappable
    realtime: bool = False
    mlock: bool = False
    disable_nesting_checks: bool = False
    #: TCG's translation-block cache in MiB (``-accel tcg,tb-size=``); QEMU's own default is 1 GiB
    tcg_tb_size_mib: int = DEFAULT_TCG_TB_SIZE_MIB
    # devices
    vsock: bool = False
    disable_vhost_net: bool = False
    entropy_source: Path = Path("/dev/urandom")
    #: VFIO devices hot-plug onto the root bus (``pcie.0`` / ``pci.0``) instead of a root port
    hotplug_vfio_on_root_bus: bool = False
    #: a directory in the guest: the agent runs the executables in its ``start`` subdirectory once
    #: the guest is up (a failing one fails the start) and in ``stop`` before a clean stop
    guest_hook_path: str | None = None
    # cold-plugged devices (present from boot; hot-added ones go through Sandbox.hotplug)
    devices: tuple[Device, ...] = ()
    # templates
    boot_to_be_template: bool = False
    boot_from_template: bool = False
    memory_path: Path | None = None
    devices_state_path: Path | None = None
    # the jail around QEMU (vmctl.hypervisors.jail)
    #: what user-mode NICs reach: "egress" (the outside through passt, never the host's own
    #: services), "none" (nothing; port forwards still work) or "host" (slirp: 10.0.2.2 is the host)
    network: Network = "egress"
    #: False: QEMU runs as before the jail (the controller's uid, namespaces, environment)
    jail: bool = True
    #: the cgroup's memory limit; None: guest RAM (or max_memory_mib) plus the measured overhead
    memory_limit_mib: int | None = None
    #: console.log is rotated (one old file, console.log.1) when it reaches this size
    console_log_limit_mib: int = 16

    def __post_init__(self) -> None:
        problems: list[Problem] = []
        for name in (*_ASSETS, "entropy_source", "memory_path", "devices_state_path"):
            object.__setattr__(self, name, _path(getattr(self, name)))
        if self.entropy_source is None:  # "" means the default, as for qemu_binary
            object.__setattr__(self, "entropy_source", Path("/dev/urandom"))
        devices, device_problems = _normalize_devices(self.devices)
        object.__setattr__(self, "devices", () if device_problems else devices)
        problems.extend(device_problems)
        for name in ("kernel_params", "hypervisor_params"):
            try:
                object.__setattr__(self, name, normalize_params(getattr(self, name)))
            except TypeError as exc:
                problems.append(Problem(name, str(exc)))
                object.__setattr__(self, name, ())
        try:
            object.__setattr__(self, "machine_accelerators", normalize_machine_options(self.machine_accelerators))
        except TypeError as exc:
            problems.append(Problem("machine_accelerators", str(exc)))
            object.__setattr__(self, "machine_accelerators", ())
        defaulted: set[str] = set()
        if self.block_driver is None:
            object.__setattr__(self, "block_driver", "virtio-mmio" if self.machine == "microvm" else "virtio-scsi")
            defaulted.add("block_driver")
        object.__setattr__(self, "_defaulted", frozenset(defaulted))
        problems.extend(_validate(self))
        if problems:
            raise ConfigError(problems)

    # -- construction helpers -------------------------------------------------------------

    def replace(self, **changes: Any) -> SandboxConfig:
        """A copy with ``changes`` applied, validated again; defaults are worked out again."""
        for name in getattr(self, "_defaulted", ()):
            changes.setdefault(name, None)
        return dataclasses.replace(self, **changes)

    def with_custom_assets(self, **assets: str | os.PathLike[str] | None) -> SandboxConfig:
        """Per-sandbox assets that take precedence over the configured ones; each must exist.

        A custom ``initrd`` replaces a configured ``image`` and the other way round.
        """
        problems = [Problem(f"custom_assets.{k}", "unknown asset; use one of " + ", ".join(_ASSETS))
                    for k in assets if k not in _ASSETS]  # fmt: skip
        chosen = {k: _path(v) for k, v in assets.items() if k in _ASSETS and v is not None}
        for name, path in chosen.items():
            if path is not None and not probe(path):
                problems.append(Problem(f"custom_assets.{name}", f"{path} does not exist"))
        if problems:
            raise ConfigError(problems)
        if "initrd" in chosen:
            chosen.setdefault("image", None)
        if "image" in chosen:
            chosen.setdefault("initrd", None)
        return self.replace(**chosen)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base_dir: Path | None = None) -> SandboxConfig:
        """Build from a TOML-like table; relative paths are taken from ``base_dir``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted((k for k in data if k not in known), key=str)
        if unknown:
            raise ConfigError([Problem(str(k), f"unknown field; known fields: {', '.join(sorted(known))}")
                               for k in unknown])  # fmt: skip
        values = dict(data)
        if base_dir is not None:
            for name in (*_ASSETS, "entropy_source", "memory_path", "devices_state_path"):
                raw = values.get(name)
                if isinstance(raw, str) and raw and not expand_path(raw).is_absolute():
                    values[name] = base_dir / raw
            if isinstance(values.get("devices"), list):
                values["devices"] = [
                    relative_to(d, base_dir) if isinstance(d, Mapping) else d for d in values["devices"]
                ]
        return cls(**values)

    from_dict = from_mapping

    def to_mapping(self) -> dict[str, Any]:
        """A TOML/JSON-ready table that :meth:`from_mapping` turns back into an equal config."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in getattr(self, "_defaulted", ()):  # let defaults be worked out again
                continue
            if value is None:
                continue
            if isinstance(value, Path):
                value = str(value)
            elif f.name == "kernel_params":
                value = serialize_params(value, "=")
            elif f.name == "hypervisor_params":  # a table, unless an option repeats (-global often does)
                keys = [k for k, _ in value]
                value = dict(value) if len(set(keys)) == len(keys) else serialize_params(value, "=")
            elif f.name == "devices":
                value = [device_to_mapping(d) for d in value]
            elif f.name == "machine_accelerators":
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_toml(cls, source: str | os.PathLike[str], *, table: str | None = "sandbox",
                  defaults: Mapping[str, Any] | None = None) -> SandboxConfig:  # fmt: skip
        """Load from a TOML file (or TOML text): the ``[sandbox]`` table, or the top level.

        ``defaults`` fill fields the table leaves out (see :func:`fill_defaults`): the CLI and
        fleet specs pass the default guest's kernel and initrd, so one table means one thing."""
        path = Path(source) if not (isinstance(source, str) and "\n" in source) else None
        text = read_toml_text(path) if path else str(source)
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([Problem(str(path or "<toml>"), f"not valid TOML: {exc}")]) from None
        if table is not None:
            if table not in data or not isinstance(data[table], dict):
                raise ConfigError([Problem(table, f"missing [{table}] table")])
            data = data[table]
        return cls.from_mapping(fill_defaults(data, defaults or {}), base_dir=path.parent.absolute() if path else None)

    # -- derived values ---------------------------------------------------------------------

    def for_host(self, saved: Mapping[str, Any] | None = None) -> SandboxConfig:
        """This config as it runs here: the limits left unset (``max_vcpus``, ``max_memory_mib``)
        taken from ``saved`` (a template's record) or else from this host.

        Done where the sandbox starts, never at construction: a config built on a Ray driver
        must not carry the driver's CPU count and memory to the node that runs it."""
        saved = saved or {}
        fills: dict[str, Any] = {}
        if self.max_vcpus is None:
            fills["max_vcpus"] = saved.get("max_vcpus") or min(MAX_VCPUS_LIMIT, max(host.cpu_count(), self.vcpus))
        if self.max_memory_mib is None:
            fills["max_memory_mib"] = saved.get("max_memory_mib") or max(host.total_memory_mib(), self.memory_mib)
        return self.replace(**fills) if fills else self

    def effective_accel(self) -> Accel:
        """``accel`` after the ``VMCTL_ACCEL`` override (``auto`` is resolved at start)."""
        env = os.environ.get(ACCEL_ENV, "").strip()
        return env if env in get_args(Accel) else self.accel  # type: ignore[return-value]

    def device_context(self) -> DeviceContext:
        return DeviceContext(machine=self.machine, block_driver=self.block_driver, io_threads=self.io_threads,
                             cache_set=self.block_cache_set, cache_direct=self.block_cache_direct,
                             cache_noflush=self.block_cache_noflush,
                             vhost_net=not self.disable_vhost_net and Path("/dev/vhost-net").exists(),
                             network=self.network,
                             shared_memory=self.shared_memory or self.huge_pages,
                             ram_shared=self.guest_ram_shared)  # fmt: skip

    @property
    def unshared_devices(self) -> tuple[Device, ...]:
        """The devices but the shares: what a template holds (QEMU cannot save a share) and a
        clone's snapshot records in its config (its shares are rows of their own)."""
        return tuple(d for d in self.devices if not isinstance(d, SharedDirectory))

    @property
    def guest_ram_shared(self) -> bool:
        """Guest RAM that a vhost-user backend (a share's virtiofsd) can map: a memfd shared
        with it on a boot; on a template clone with shares in its config, a copy of its own of
        the template's memory file (a clone without maps that file privately, which no backend
        can see into); never on a template (QEMU cannot save a virtio-fs device into it)."""
        if self.boot_to_be_template:
            return False
        return not self.boot_from_template or any(d.kind == "share" for d in self.devices)

    @property
    def memory_hotplug_possible(self) -> bool:
        return self.machine != "microvm" and self.memory_slots > 0 and (self.max_memory_mib or 0) > self.memory_mib

    def kernel_cmdline(self) -> str:
        return " ".join(serialize_params(self.kernel_params, "="))

    def qemu_extra_args(self) -> list[str]:
        return serialize_params([Param(f"-{k}" if k else k, v) for k, v in self.hypervisor_params], "")


def _validate(c: SandboxConfig) -> list[Problem]:
    problems: list[Problem] = []

    def bad(name: str, message: str) -> None:
        problems.append(Problem(name, message))

    mistyped = _check_types(c, bad)
    # assets
    if c.kernel is None:
        bad("kernel", "required: path to the guest kernel (vmctl guest build makes one)")
    for name in _ASSETS:
        path = getattr(c, name)
        if isinstance(path, Path) and not probe(path, "file"):
            bad(name, f"{path} does not exist or is not a file")
    if c.initrd is None and c.image is None:
        bad("initrd", "set initrd or image: the guest needs a root filesystem")
    if isinstance(c.initrd, Path) and c.image is not None and not initrd_switches_root(c.initrd):
        bad("image", "set initrd or image, not both (only vmctl's default initramfs may come with an image: "
                     "it loads the disk drivers and switches to the image)")  # fmt: skip
    if c.network not in get_args(Network):
        bad("network", f"{c.network!r}: use one of {', '.join(get_args(Network))}")
    if c.image_overlay is True and c.image is None:
        bad("image_overlay", "puts the image under a per-sandbox overlay: set image too")
    if c.image is not None and c.disable_block_devices:
        bad("disable_block_devices", "an image root filesystem needs block devices; unset one of them")
    if c.accel not in get_args(Accel):
        bad("accel", f"must be one of {', '.join(get_args(Accel))}")
    env_accel = os.environ.get(ACCEL_ENV, "").strip()
    if env_accel and env_accel not in get_args(Accel):
        bad(ACCEL_ENV, f"environment variable must be one of {', '.join(get_args(Accel))}")
    if c.machine not in get_args(Machine):
        bad("machine", f"must be one of {', '.join(get_args(Machine))}")
    if (c.block_cache_direct or c.block_cache_noflush) and not c.block_cache_set:
        bad("block_cache_set", "block_cache_direct and block_cache_noflush only apply with block_cache_set=true")
    if c.block_driver not in get_args(BlockDriver):
        bad("block_driver", f"must be one of {', '.join(get_args(BlockDriver))}")
    elif (c.block_driver == "virtio-mmio") != (c.machine == "microvm"):
        bad(
            "block_driver", "microvm has no PCI: use block_driver='virtio-mmio' with machine='microvm' (and only there)"
        )
    _check_sizes(c, bad, mistyped)
    _check_params(c, bad)
    _check_machine_and_hooks(c, bad)
    _check_shares(c, bad)
    _check_host_features(c, bad)
    _check_templates(c, bad)
    _check_devices(c, problems)
    return problems


def _normalize_devices(value: Any) -> tuple[tuple[Device, ...], list[Problem]]:
    if value is None:
        return (), []
    if isinstance(value, Device | Mapping | str | bytes) or not isinstance(value, Iterable):
        return (), [Problem("devices", "must be a list of devices (or of tables with a 'type')")]
    out: list[Device] = []
    problems = []
    for i, item in enumerate(value):
        try:
            out.append(item if isinstance(item, Device) else device_from_mapping(item))
        except TypeError as exc:
            problems.append(Problem(f"devices[{i}]", str(exc)))
    return tuple(out), problems


def _check_devices(c: SandboxConfig, problems: list[Problem]) -> None:
    ctx = c.device_context()
    seen: set[str] = set()
    for i, device in enumerate(c.devices):
        for problem in device.problems(ctx):
            problems.append(Problem(f"devices[{i}].{problem.field.split('.', 1)[-1]}", problem.message))
        if device.id is not None:
            if device.id in seen:
                problems.append(Problem(f"devices[{i}].id", f"{device.id!r} is used twice"))
            seen.add(device.id)
        if c.disable_block_devices and device.kind == "block":
            problems.append(Problem(f"devices[{i}]", "block devices are disabled (disable_block_devices)"))


def _check_types(c: SandboxConfig, bad: Any) -> set[str]:
    """Report fields of the wrong type; returns their names (their range checks are skipped)."""
    mistyped: set[str] = set()
    for f in dataclasses.fields(c):
        value = getattr(c, f.name)
        if f.type in ("bool",) and not isinstance(value, bool):
            bad(f.name, f"must be true or false, not {value!r:.200}")
        elif f.type in ("int", "int | None") and not (
            (isinstance(value, int) and not isinstance(value, bool)) or (value is None and "None" in str(f.type))
        ):
            bad(f.name, f"must be an integer, not {value!r:.200}")
            mistyped.add(f.name)
        elif f.type in ("Path | None", "Path") and value is not None and not isinstance(value, Path):
            bad(f.name, f"must be a path, not {value!r:.200}")
        elif isinstance(value, Path) and "\0" in str(value):
            bad(f.name, "a path may not contain NUL bytes")
    return mistyped


def _check_sizes(c: SandboxConfig, bad: Any, mistyped: set[str]) -> None:
    """Range checks, each skipped only when a field it reads has the wrong type (reported already)."""

    def typed(*names: str) -> bool:
        return not mistyped.intersection(names)

    if typed("memory_limit_mib") and c.memory_limit_mib is not None and c.memory_limit_mib < MIN_MEMORY_MIB:
        bad("memory_limit_mib", f"must be at least {MIN_MEMORY_MIB} MiB")
    if typed("console_log_limit_mib") and c.console_log_limit_mib < 1:
        bad("console_log_limit_mib", "must be at least 1")
    if typed("vcpus", "max_vcpus"):
        max_vcpus = c.vcpus if c.max_vcpus is None else c.max_vcpus  # unset: the host's count, at least vcpus
        if c.vcpus < 1:
            bad("vcpus", "must be at least 1")
        if max_vcpus > MAX_VCPUS_LIMIT:  # named after what the user set
            bad("vcpus" if c.max_vcpus is None else "max_vcpus", f"must be at most {MAX_VCPUS_LIMIT}")
        if c.vcpus > max_vcpus:
            bad("vcpus", f"{c.vcpus} is more than max_vcpus={max_vcpus}; raise max_vcpus or lower vcpus")
    elif typed("vcpus") and c.vcpus < 1:
        bad("vcpus", "must be at least 1")
    if typed("memory_mib"):
        host_mib = host.total_memory_mib()
        if c.memory_mib < MIN_MEMORY_MIB:
            bad("memory_mib", f"must be at least {MIN_MEMORY_MIB} MiB")
        elif c.memory_mib > host_mib:
            bad("memory_mib", f"{c.memory_mib} MiB is more than the host has ({host_mib} MiB)")
    if typed("memory_mib", "max_memory_mib"):
        max_mem = c.memory_mib if c.max_memory_mib is None else c.max_memory_mib  # unset: the host's memory
        if max_mem < c.memory_mib:
            bad("max_memory_mib", f"{max_mem} MiB is less than memory_mib={c.memory_mib}")
    if typed("memory_slots") and not 0 <= c.memory_slots <= MAX_MEMORY_SLOTS:
        bad("memory_slots", f"must be between 0 and {MAX_MEMORY_SLOTS}")
    if typed("tcg_tb_size_mib") and not 1 <= c.tcg_tb_size_mib <= MAX_TCG_TB_SIZE_MIB:
        bad("tcg_tb_size_mib", f"must be between 1 and {MAX_TCG_TB_SIZE_MIB} (MiB)")
    if typed("pci_bridges") and not 0 <= c.pci_bridges <= MAX_PCI_BRIDGES:
        bad("pci_bridges", f"must be between 0 and {MAX_PCI_BRIDGES}")


def _check_shares(c: SandboxConfig, bad: Any) -> None:
    """What a share needs of the rest of the config (the device checks its own fields)."""
    if not isinstance(c.msize_9p, int) or not 4096 <= c.msize_9p <= MAX_MSIZE_9P:
        bad("msize_9p", f"{c.msize_9p!r}: between 4096 and {MAX_MSIZE_9P} bytes (the original's default: "
                        f"{DEFAULT_MSIZE_9P})")  # fmt: skip
    shared = [i for i, d in enumerate(c.devices) if isinstance(d, SharedDirectory)]
    if shared and c.machine == "microvm":
        bad(f"devices[{shared[0]}].share", "microvm's virtio-mmio devices are legacy virtio, which virtiofsd cannot "
                                           "serve (and vmctl has no 9p there): use machine='q35' for shares")  # fmt: skip
        return
    nine_p = [i for i, d in enumerate(c.devices) if isinstance(d, SharedDirectory) and d.protocol == "9p"]
    if not nine_p:
        return
    if c.boot_to_be_template or c.boot_from_template:
        bad(f"devices[{nine_p[0]}].protocol", "a 9p share cannot be in a template (QEMU cannot save a mounted "
                                              "9p export) nor be plugged into a clone (9p is cold only): use "
                                              "protocol='virtiofs'")  # fmt: skip
    kernels = initrd_filesystems(c.initrd) if isinstance(c.initrd, Path) else None
    if kernels is not None and "9p" not in kernels:
        bad(f"devices[{nine_p[0]}].protocol", "this guest's kernel has no 9p (Debian's cloud kernel): build the "
                                              "default guest from the generic kernel (vmctl guest build --kernel "
                                              "generic, or ensure_default_assets(kernel='generic')) and use its "
                                              "kernel and initrd")  # fmt: skip


def _check_machine_and_hooks(c: SandboxConfig, bad: Any) -> None:
    for i, item in enumerate(c.machine_accelerators if isinstance(c.machine, str) else ()):
        why = machine_option_problem(c.machine, item)
        if why:
            bad(f"machine_accelerators[{i}]", why)
    hooks = c.guest_hook_path
    if hooks is not None and not is_guest_path(hooks):
        bad("guest_hook_path", f"{hooks!r}: an absolute directory in the guest such as /etc/vmctl/hooks "
                               "(letters, digits, '._+@-'; no '.' or '..' parts)")  # fmt: skip
    if c.hotplug_vfio_on_root_bus and c.machine == "microvm":
        bad("hotplug_vfio_on_root_bus", "microvm has no PCI bus: leave it off")


def _check_params(c: SandboxConfig, bad: Any) -> None:
    for i, (key, value) in enumerate(c.kernel_params):
        if not _KERNEL_KEY.match(key):
            bad(f"kernel_params[{i}]", f"key {key!r} may only hold letters, digits and _ . - /")
        if not _KERNEL_VALUE.match(value):
            bad(
                f"kernel_params[{i}]",
                f"value of {key!r} may not hold spaces, quotes, backslashes or control characters",
            )
    if len(c.kernel_cmdline()) > KERNEL_CMDLINE_MAX - 512:
        bad("kernel_params", f"command line longer than {KERNEL_CMDLINE_MAX - 512} bytes")
    for i, (key, value) in enumerate(c.hypervisor_params):
        name = f"hypervisor_params[{i}]"
        if not _QEMU_KEY.match(key):
            bad(name, f"option {key!r} must be a QEMU option name like 'rtc' (no leading dash)")
        elif key not in ALLOWED_QEMU_OPTIONS:
            bad(name, f"option -{key} is not allowed; allowed: {', '.join(sorted(ALLOWED_QEMU_OPTIONS))} "
                      "(vmctl manages the others through config fields and devices)")  # fmt: skip
        if not _QEMU_VALUE.match(value):
            bad(name, f"value of {key!r} may not hold control characters")
        elif value.startswith("-"):
            bad(name, f"value of {key!r} may not start with '-'")
        elif key in ALLOWED_QEMU_OPTIONS:
            problem = _qemu_value_problem(key, value)
            if problem:
                bad(name, problem)


def qemu_suboptions(value: str) -> list[str]:
    """Split a QEMU option value at single commas (QEMU reads ",," as a literal comma)."""
    parts, current, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += value[i]
        i += 1
    parts.append(current)
    return parts


def _qemu_value_problem(key: str, value: str) -> str | None:
    """Why an allowed option's value may not reach QEMU (it could make QEMU open a host file)."""
    if key == "k":
        return None if _KEYMAP.match(value) else f"-k takes a keyboard layout like 'en-us', not {value!r}"
    if key == "uuid":
        return None if _UUID.match(value) else f"-uuid takes a UUID, not {value!r}"
    if key == "global":
        prop = value.partition("=")[0].rpartition(".")[2]
        if not _GLOBAL.match(value) or prop in _GLOBAL_DENIED:
            return (f"-global takes 'driver.property=value' without '/' and not a file, chardev or backend "
                    f"property ({', '.join(sorted(_GLOBAL_DENIED))}); {value!r} is refused")  # fmt: skip
        return None
    allowed = _QEMU_SUBOPTIONS[key] or frozenset()
    for n, part in enumerate(qemu_suboptions(value)):
        name, has_value, _ = part.partition("=")
        if not has_value and n == 0 and key in _IMPLIED_SUBOPTION:
            continue
        if name not in allowed:
            return (f"-{key} sub-option {name!r} is not allowed (some open host files); "
                    f"allowed: {', '.join(sorted(allowed))}")  # fmt: skip
    return None


def _check_host_features(c: SandboxConfig, bad: Any) -> None:
    if isinstance(c.entropy_source, Path) and not probe(c.entropy_source):
        bad("entropy_source", f"{c.entropy_source} does not exist")
    if c.huge_pages:
        if host.hugepages_total() == 0 or not Path("/dev/hugepages").is_dir():
            bad("huge_pages", "the host has no huge pages: set vm.nr_hugepages and mount hugetlbfs on /dev/hugepages")
    if c.vsock and not Path("/dev/vhost-vsock").exists():
        bad("vsock", "the host has no /dev/vhost-vsock: 'modprobe vhost_vsock' or set vsock=false")


def _check_templates(c: SandboxConfig, bad: Any) -> None:
    if (c.boot_to_be_template or c.boot_from_template) and c.machine == "microvm":
        bad("boot_to_be_template" if c.boot_to_be_template else "boot_from_template",
            "VM templates are not offered on machine='microvm' (see capabilities()); use machine='q35'")  # fmt: skip
    if c.boot_to_be_template and c.boot_from_template:
        bad("boot_from_template", "boot_to_be_template and boot_from_template are exclusive")
    if (c.boot_to_be_template or c.boot_from_template) and c.memory_path is None:
        bad("memory_path", "required with a template: the file that holds guest memory")
    if c.boot_from_template:
        if c.devices_state_path is None:
            bad("devices_state_path", "required with boot_from_template: the saved device state")
        elif isinstance(c.devices_state_path, Path) and not probe(c.devices_state_path, "file"):
            bad("devices_state_path", f"{c.devices_state_path} does not exist")
        if isinstance(c.memory_path, Path) and not probe(c.memory_path, "file"):
            bad("memory_path", f"{c.memory_path} does not exist")
    if c.boot_to_be_template:
        if isinstance(c.memory_path, Path) and not probe(c.memory_path.parent, "dir"):
            bad("memory_path", f"directory {c.memory_path.parent} does not exist")
        if c.devices_state_path is None:
            bad("devices_state_path", "required with boot_to_be_template: where the device state is saved")
    if (c.boot_to_be_template or c.boot_from_template) and c.huge_pages:
        bad("huge_pages", "templates keep guest memory in memory_path; huge pages cannot be combined")
    if (c.boot_to_be_template or c.boot_from_template) and c.shared_memory:
        bad("shared_memory", "templates keep guest memory in memory_path (a clone maps it privately); "
                             "vhost-user devices cannot be combined with templates")  # fmt: skip
    clone_shares = sum(d.kind == "share" for d in c.devices) if c.boot_from_template else 0
    if isinstance(c.pci_bridges, int) and clone_shares > c.pci_bridges and c.machine != "microvm":
        bad("pci_bridges", f"a clone plugs its {clone_shares} share(s) once it runs, each on a free root port: "
                           f"raise pci_bridges to at least {clone_shares} (in the template's config too)")  # fmt: skip


def shared_writable_disks(configs: list[SandboxConfig]) -> list[str]:
    """Disk files more than one of ``configs`` would open read-write (QEMU's locks refuse that).

    Overlay disks share only their base, read-only; each sandbox writes its own overlay, so they
    are fine. A kept ``overlay_file`` named more than once is shared and writable, and so is a
    base that another sandbox opens read-write."""
    writers: dict[str, int] = {}
    bases: set[str] = set()
    for config in configs:
        disks = [BlockDevice(path=config.image, overlay=config.image_overlay)] if config.image else []
        disks += [d for d in config.devices if isinstance(d, BlockDevice) and not d.read_only]
        for disk in disks:
            if disk.overlay:
                bases.add(str(disk.path))
                if disk.overlay_file is None:
                    continue
            path = str(disk.overlay_file if disk.overlay else disk.path)
            writers[path] = writers.get(path, 0) + 1
    return sorted(p for p, n in writers.items() if n > 1 or p in bases)
