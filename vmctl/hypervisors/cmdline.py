"""QEMU's argument list for a config: one pure function, so every field's effect is testable.

The monitor, console and agent chardevs take listening sockets vmctl created itself and passes
by file descriptor: the socket files exist (mode 0600 inside a 0700 directory) before QEMU runs,
and connecting never races QEMU's start-up.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path

from vmctl import host
from vmctl.config import SandboxConfig
from vmctl.hypervisors.base import PlacedDevice, RunPaths
from vmctl.hypervisors.placement import clone_ram, cold_devices, cold_share_ports

AGENT_PORT_NAME = "org.vmctl.agent"
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


#: Kernel parameters that skip work a sandbox guest does not need, measured under TCG
#: (bench/README.md, "Where cold boot goes"): the crypto self-tests (~0.35 s; the KDF one ignores
#: cryptomgr.notests, ~0.13 s, and its initcall is nothing but the test), the 64 MiB bounce buffer
#: the kernel sets aside, zeroes and keeps once memory hotplug can reach above 4 GiB (virtio
#: needs none), probing a PS/2 mouse and keyboard nobody attaches, and rewriting the ~9,000
#: ``lock`` prefixes of the kernel's text for a single CPU (noreplace-smp: each rewrite is a
#: ``text_poke`` with two CR3 switches, each a full TLB flush under TCG: 0.05-0.1 s at boot, and
#: the first CPU hotplug would put them all back the same way), and the PCIe port services (AER
#: and PME on each root port, ~0.04 s of probing for one): QEMU's q35 hot-plugs through ACPI
#: (acpiphp; its _OSC keeps native PCIe hotplug), which pcie_ports=compat leaves as it is.
FAST_BOOT_PARAMS = ("cryptomgr.notests", "initcall_blacklist=crypto_kdf108_init", "swiotlb=noforce",
                    "i8042.noaux", "i8042.nokbd", "i8042.nopnp", "noreplace-smp", "pcie_ports=compat")  # fmt: skip


def kernel_cmdline(config: SandboxConfig) -> str:
    """Our base parameters first, the user's after them (so the user's win)."""
    # no_timer_check: on a loaded host (many TCG guests at once) the kernel's IO-APIC timer test
    # can fail and panic the boot; a virtual timer needs no check (Kata passes it too)
    base = ["console=ttyS0", "panic=1", "reboot=t", "no_timer_check", *FAST_BOOT_PARAMS]
    base += ["debug", "vmctl.debug=1"] if config.debug else ["quiet"]
    if config.memory_hotplug_possible:
        base.append("memhp_default_state=online_movable")  # hot-added memory stays removable
    base += _clock_params(config)
    # the guest loads every driver before its agent starts (see guest/files/init) when devices are
    # there from boot, or when a template is saved at ready: else each clone would finish the job
    if config.devices or config.boot_to_be_template:
        base.append("vmctl.sync_modules=1")
    if config.image is not None:
        root = "/dev/sda" if config.device_context().pci and config.block_driver == "virtio-scsi" else "/dev/vda"
        base += [f"root={root}", "rootfstype=ext4", "rw"]
    user = config.kernel_cmdline()
    return " ".join(base + ([user] if user else []))


def _clock_params(config: SandboxConfig) -> list[str]:
    """Under TCG the guest's TSC is the host's (QEMU reads the host counter), so the guest need
    not calibrate it (slow, and it hangs on microvm without HPET or a PM timer) nor distrust it
    and fall back to the emulated HPET, whose every read is a trip into QEMU."""
    if config.accel != "tcg" and config.machine != "microvm":
        return []
    khz = host.tsc_khz()
    out = [f"tsc_early_khz={khz}"] if khz else []
    # (nolapic_timer would skip the local APIC timer's 100 ms calibration, /init 0.08 s sooner,
    # but leaves the guest without high-resolution timers and ticking periodically: idle guests
    # then cost the host CPU, and 4 clones at once answered 1.3x later)
    return out + (["tsc=reliable"] if config.accel == "tcg" else [])


def accel_option(config: SandboxConfig) -> str:
    """``-accel``: KVM, or TCG with the translation cache the config asks for."""
    return "kvm" if config.accel == "kvm" else f"tcg,tb-size={config.tcg_tb_size_mib}"


def opt(value: object) -> str:
    """A value safe inside a QEMU option list (commas doubled)."""
    return str(value).replace(",", ",,")


def build_command(config: SandboxConfig, paths: RunPaths, sandbox_id: str, fds: Mapping[str, int],
                  *, incoming: bool = False, devices: Sequence[PlacedDevice] | None = None,
                  restored: Sequence[PlacedDevice] = (), boot_files: Mapping[str, Path] | None = None) -> list[str]:  # fmt: skip
    """The full argv (binary first) for ``config``; ``fds`` maps qmp/console/agent to listening fds.

    ``incoming``: QEMU waits for a saved state (a snapshot) instead of booting. ``devices``: the
    cold devices as :func:`vmctl.hypervisors.placement.cold_devices` places them (worked out here when not given).
    ``restored``: devices a snapshot's guest had hot-plugged, recreated at their places so the
    saved device state finds them. ``boot_files``: where QEMU finds the kernel, initrd or firmware
    when not at the config's paths (inside a jail's mount namespace)."""
    assert config.qemu_binary is not None and config.accel in ("kvm", "tcg"), "resolve the config first"
    c = config
    boot = {"kernel": c.kernel, "initrd": c.initrd, "firmware": c.firmware, **(boot_files or {})}
    pci = c.machine != "microvm"
    argv = [str(c.qemu_binary), "-name", f"{sandbox_id},debug-threads=on", "-S", "-nodefaults",
            "-no-user-config", "-display", "none", "-msg", "timestamp=on",
            "-machine", ",".join([c.machine, "memory-backend=mem0", *c.machine_accelerators]),
            "-accel", accel_option(c)]  # fmt: skip
    if c.accel == "kvm":
        nested = host.running_in_vm() and not c.disable_nesting_checks
        argv += ["-cpu", "host,pmu=off" if nested else "host"]
    argv += ["-smp", f"{c.vcpus},maxcpus={c.max_vcpus},sockets=1,dies=1,cores={c.max_vcpus},threads=1"]
    argv += _memory(c, clone_ram(paths.run_dir))
    if c.mlock or c.realtime:  # realtime decides locking explicitly: off leaves guest memory swappable
        argv += ["-overcommit", f"mem-lock={'on' if c.mlock else 'off'}"]
    argv += ["-kernel", str(boot["kernel"]), "-append", kernel_cmdline(c)]
    if c.initrd is not None and not (c.boot_from_template or incoming):
        # a guest that resumes from saved state never reads its initramfs again, and QEMU would
        # keep a private copy of it in memory (fw_cfg): clones and restores go without
        argv += ["-initrd", str(boot["initrd"])]
    if c.firmware is not None:
        argv += ["-bios", str(boot["firmware"])]
    bus = "pci" if pci else "device"  # virtio over PCI, or over virtio-mmio on microvm
    argv += [
        "-chardev", f"socket,id=qmp,fd={fds['qmp']},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"socket,id=console0,fd={fds['console']},server=on,wait=off",  # vmctl writes console.log
        "-serial", "chardev:console0",
        "-chardev", f"socket,id=agent0,fd={fds['agent']},server=on,wait=off",
        "-device", f"virtio-serial-{bus},id=vser0",
        "-device", f"virtserialport,bus=vser0.0,chardev=agent0,name={AGENT_PORT_NAME}",
        "-object", f"rng-random,id=rng0,filename={opt(c.entropy_source)}",
        "-device", f"virtio-rng-{bus},rng=rng0",
        "-action", "reboot=shutdown,panic=pause",
    ]  # fmt: skip
    if pci:
        argv += ["-device", "pvpanic-pci"]
    argv += _bridges(c)
    if c.io_threads:
        argv += ["-object", "iothread,id=iothread0"]
    if pci and c.block_driver == "virtio-scsi" and not c.disable_block_devices:
        argv += ["-device", "virtio-scsi-pci,id=scsi0" + (",iothread=iothread0" if c.io_threads else "")]
    placed = cold_devices(c, paths, sandbox_id) if devices is None else devices
    for dev_id, device, where in [*placed, *restored]:
        argv += device.cold_args(dev_id, c.device_context(), where)
    if c.vsock:
        argv += ["-device", f"vhost-vsock-{bus},id=vsock0,guest-cid={secrets.randbelow(2**31) + 3}"]
    if c.boot_from_template or incoming:
        argv += ["-incoming", "defer"]
    argv += ["-sandbox", SECCOMP]
    argv += c.qemu_extra_args()
    return argv


def _memory(c: SandboxConfig, own_copy: Path) -> list[str]:
    size = f"{c.memory_mib}M"
    mem = [f"size={size}"]
    if c.memory_hotplug_possible:
        mem += [f"slots={c.memory_slots}", f"maxmem={c.max_memory_mib}M"]
    if c.boot_from_template and c.guest_ram_shared:  # a clone with shares: its own copy, mapped shared
        backend = f"memory-backend-file,id=mem0,size={size},mem-path={opt(own_copy)},share=on"
    elif c.boot_to_be_template or c.boot_from_template:
        share = "on" if c.boot_to_be_template else "off"
        backend = f"memory-backend-file,id=mem0,size={size},mem-path={opt(c.memory_path)},share={share}"
    elif c.huge_pages:
        backend = f"memory-backend-file,id=mem0,size={size},mem-path=/dev/hugepages,share=on"
    else:  # a vhost-user backend (a share's virtiofsd, hot-plugged too) maps guest RAM: shared, a memfd
        backend = f"memory-backend-memfd,id=mem0,size={size},share=on"
    if c.mem_prealloc:
        backend += ",prealloc=on"
    return ["-m", ",".join(mem), "-object", backend]


def _bridges(c: SandboxConfig) -> list[str]:
    out: list[str] = []
    if c.machine == "microvm":
        return out  # no PCI at all
    for i in range(c.pci_bridges):
        if c.machine == "q35":
            out += ["-device", f"pcie-root-port,id=rp{i},bus=pcie.0,chassis={i + 1}"]
        else:
            out += ["-device", f"pci-bridge,id=br{i},bus=pci.0,chassis_nr={i + 1}"]
    for i, port in enumerate(cold_share_ports(c)):
        out += ["-device", f"pcie-root-port,id={port},bus=pcie.0,chassis={c.pci_bridges + 1 + i}"]
    return out
