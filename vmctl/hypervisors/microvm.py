"""The microvm backend: QEMU's ``-M microvm`` (x86), virtio over virtio-mmio, no PCI, no ACPI hotplug.

Everything but what differs is the QEMU backend's: launch, QMP, console, agent and lifecycle.
What differs: the argument list (``cmdline.build_command`` renders virtio-mmio devices and adds
the ``tsc_early_khz`` hint that keeps the guest from hanging while calibrating its clock) and the
capabilities, which say no hotplug of any kind, so hotplug requests are refused up front.
"""

from __future__ import annotations

from vmctl.hypervisors.base import Capabilities
from vmctl.hypervisors.qemu import QemuHypervisor


class MicrovmHypervisor(QemuHypervisor):
    name = "microvm"

    def capabilities(self) -> Capabilities:
        return Capabilities(
            block_hotplug=False,
            cpu_hotplug=False,
            memory_hotplug=False,
            network_hotplug=False,
            vsock=self.effective_config().vsock,
            templates=False,
            snapshots=True,
        )
