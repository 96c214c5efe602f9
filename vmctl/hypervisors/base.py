"""The async hypervisor interface a :class:`~vmctl.Sandbox` drives.

It mirrors the original layer's operations (create, start, wait ready, pause, resume, save,
stop, disconnect, capabilities, effective config, console, vCPU thread ids) as coroutines. A
hypervisor never changes sandbox state: it reports what QEMU says through :class:`Events`
and the sandbox's state machine decides.

A hypervisor is configured once, by what it is given: the config, its run paths, a
:class:`LaunchPlan` (boot, restore, clone or attach; which devices go on the command line) and
a :class:`Launcher` that starts the process (QEMU itself, or a test double such as
:class:`vmctl.testing.FakeQemu`). Nothing is set on it from outside afterwards.
"""

from __future__ import annotations

import enum
import socket
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from anyio.abc import TaskGroup, TaskStatus

from vmctl.config import SandboxConfig
from vmctl.core.qmp import QmpEvent
from vmctl.core.waiting import Failure
from vmctl.devices import Device, Placement

#: a device on the command line: its id, its description and where it sits
PlacedDevice = tuple[str, Device, Placement]


@dataclass(frozen=True)
class Capabilities:
    """What this hypervisor and machine can do for this config."""

    block_hotplug: bool
    cpu_hotplug: bool
    memory_hotplug: bool
    network_hotplug: bool
    pause: bool = True
    vsock: bool = False
    templates: bool = True
    snapshots: bool = True
    #: shared directories can be hot-plugged (PCI slots free, guest RAM virtiofsd can map)
    share_hotplug: bool = False

    @classmethod
    def of_pci_machine(cls, c: SandboxConfig) -> Capabilities:
        """What a q35 or pc machine offers for ``c``: hotplug needs free root ports or bridge
        slots (SCSI disks a controller), vCPUs and memory room to grow."""
        return cls(
            block_hotplug=not c.disable_block_devices and (c.pci_bridges > 0 or c.block_driver == "virtio-scsi"),
            cpu_hotplug=(c.max_vcpus or 1) > c.vcpus,
            memory_hotplug=c.memory_hotplug_possible,
            network_hotplug=c.pci_bridges > 0,
            vsock=c.vsock,
            share_hotplug=c.pci_bridges > 0 and c.guest_ram_shared,
        )


@dataclass(frozen=True)
class RunPaths:
    """Files of one sandbox inside its private (0700) run directory."""

    run_dir: Path
    log_dir: Path

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def console_socket(self) -> Path:
        return self.run_dir / "console.sock"

    @property
    def agent_socket(self) -> Path:
        return self.run_dir / "agent.sock"

    @property
    def console_log(self) -> Path:
        return self.log_dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.log_dir / "qemu.log"

    @property
    def qemu_dir(self) -> Path:
        """Where QEMU itself may create files (serial-port sockets): owned by the jail user."""
        return self.run_dir / "q"


class Start(enum.Enum):
    """Where the guest comes from."""

    BOOT = "boot"  # a cold boot
    CLONE = "clone"  # a VM template's device state, RAM mapped from its file
    RESTORE = "restore"  # a snapshot's memory and device state
    ATTACH = "attach"  # a QEMU that already runs (a detached sandbox)


@dataclass(frozen=True)
class LaunchPlan:
    """How to bring the VM up. ``devices`` are the cold-plugged ones (ids and places worked out
    once, see :func:`vmctl.hypervisors.placement.cold_devices`); ``restored`` are the devices a
    snapshot's guest had hot-plugged, recreated on the command line at the same places."""

    start: Start = Start.BOOT
    incoming: Path | None = None  # RESTORE / CLONE: the saved state to load
    attach_pid: int | None = None  # ATTACH: the running QEMU
    detached: bool = False  # QEMU may outlive this controller
    devices: Sequence[PlacedDevice] = ()
    restored: Sequence[PlacedDevice] = ()
    #: shares plugged once the guest runs, not on the command line: a saved state has none (QEMU
    #: cannot save virtio-fs). A restore puts each back where the guest knew it; a clone's go to
    #: free slots (placement None). The flag: a row kept in records as hot-plugged (a restore's
    #: hot shares, and a clone's, which sit on hotplug ports); False: a config share on its own port.
    deferred: Sequence[tuple[str, Device, Placement | None, bool]] = ()

    @property
    def resumes_a_guest(self) -> bool:
        """The guest's agent announced itself before this controller existed: ask it instead."""
        return self.start is not Start.BOOT


class Events(Protocol):
    """Where a hypervisor reports what happened; implemented by the sandbox."""

    def on_qmp_event(self, event: QmpEvent) -> None: ...
    def on_process_exit(self, returncode: int, stderr_tail: str, *, requested: bool) -> None:
        """QEMU exited; ``requested`` when vmctl itself asked it to (stop, quit, kill on teardown)."""

    def on_fault(self, reason: str) -> None: ...
    def on_console_line(self, line: str) -> None: ...


class VmProcess(Protocol):
    """What the backend needs of a running QEMU (real or fake)."""

    @property
    def pid(self) -> int | None: ...
    @property
    def returncode(self) -> int | None: ...
    async def wait(self) -> int: ...
    def kill(self) -> None: ...
    def stderr_lines(self) -> AsyncIterator[str]: ...
    async def aclose(self) -> None: ...


class Launcher(Protocol):
    """Starts the process behind a hypervisor: the seam a test double plugs into."""

    #: whether QEMU goes into a jail (its own user, namespaces, cgroup); a test double has none
    jails: bool

    async def resolve(self, config: SandboxConfig, log: Any) -> SandboxConfig:
        """The config as it will run: binary found, machine checked, accelerator resolved."""

    async def spawn(self, argv: list[str], listeners: Mapping[str, socket.socket], *, detached: bool,
                    log_path: Path, tg: TaskGroup, jail: Any = None, extra_fds: Sequence[int] = ()) -> VmProcess:  # fmt: skip
        """Start the process with the listening sockets; ``tg`` is the hypervisor's task group.

        ``jail`` (a :class:`vmctl.hypervisors.jail.Jail`) says how to confine it; ``extra_fds``
        are further descriptors it inherits (disks handed over, passt's end of a NIC)."""


class AgentLink(Protocol):
    """What a hypervisor needs of the guest agent's client: it connects the channel, waits for
    the guest's READY (or pings a resumed guest) and asks for a clean power-off. The client itself
    (:class:`vmctl.agent.AgentClient`) lives a layer up, with the sandbox's owners."""

    @property
    def ready(self) -> bool: ...

    async def serve(self, *, task_status: TaskStatus[None] = ...) -> None: ...

    async def ping(self) -> None: ...

    def mark_ready(self, boot_id: str = ...) -> None: ...

    async def wait_ready(self) -> str: ...

    async def poweroff(self) -> None: ...

    def fail_all(self, failure: Failure) -> None: ...


class Hypervisor(ABC):
    """One virtual machine's process, QMP session, console and agent channel."""

    name: str = "abstract"

    def __init__(self, config: SandboxConfig, paths: RunPaths, sandbox_id: str, events: Events, logger: Any, *,
                 plan: LaunchPlan, agent: AgentLink, launcher: Launcher | None = None) -> None:  # fmt: skip
        self.config = config
        self.paths = paths
        self.sandbox_id = sandbox_id
        self.events = events
        self.log = logger
        self.plan = plan
        #: the guest agent's channel: this hypervisor connects it, the sandbox talks through it
        self.agent = agent

    @abstractmethod
    async def create(self) -> None:
        """Resolve everything the launch needs (accelerator, arguments); starts no process."""

    @abstractmethod
    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Launch, connect, pump events until cancelled; report started once QEMU runs the guest.

        Whatever ends this task (cancellation, an error), the process is gone when it returns,
        unless :meth:`close` asked to keep it running.
        """

    @abstractmethod
    async def wait_ready(self) -> None:
        """Return once the guest agent reported ready (or, resuming a guest, answered)."""

    @abstractmethod
    async def pause(self) -> None: ...

    @abstractmethod
    async def resume(self) -> None: ...

    @abstractmethod
    async def save_state(self, path: Path, *, skip_shared: bool) -> None:
        """Save the paused VM's state to ``path`` (see ``capabilities().snapshots``); with
        ``skip_shared`` (templates) RAM in a shared memory file is left out."""

    @abstractmethod
    async def query_status(self) -> str:
        """QEMU's run state (``running``, ``paused``, ``shutdown``, ...)."""

    @abstractmethod
    async def stop(self, *, graceful: bool, timeout: float) -> None:
        """Make the process exit: guest power-off first when ``graceful``, then ``quit``, then SIGKILL."""

    @abstractmethod
    async def wait_exited(self) -> None:
        """Return once the process has exited."""

    @abstractmethod
    async def close(self, *, keep_running: bool) -> None:
        """Close QMP, console and agent connections and end the run task; the process is killed
        unless ``keep_running`` (a detached sandbox being let go)."""

    async def start_helpers(self, dev_id: str, device: Device) -> None:  # noqa: B027 - most devices need none
        """Start what serves ``device`` on the host (a share's virtiofsd) before it is plugged."""

    async def stop_helpers(self, dev_id: str) -> None:  # noqa: B027
        """End what :meth:`start_helpers` started, once the device is gone or its plug failed."""

    def can_start_helpers(self) -> bool:
        """Whether :meth:`start_helpers` can start anything now (not for a sandbox this
        controller attached to: its helpers would run outside the sandbox's jail)."""
        return True

    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abstractmethod
    def effective_config(self) -> SandboxConfig:
        """The config as launched: defaults filled, ``auto`` resolved, custom assets applied."""

    @abstractmethod
    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command (with the session's timeout)."""

    @abstractmethod
    async def vcpu_thread_ids(self) -> dict[int, int]:
        """vCPU index -> host thread id, for pinning and cgroups."""

    @property
    def console_path(self) -> Path:
        return self.paths.console_socket

    @property
    @abstractmethod
    def pid(self) -> int | None: ...

    @property
    def qemu_pid(self) -> int | None:
        """QEMU's own pid on the host (``pid`` may be the jail's outer process)."""
        return self.pid

    @property
    def jail(self) -> dict[str, str]:
        """Each part of the jail around QEMU: ``on``, or why it is off."""
        return {}

    @property
    @abstractmethod
    def command_line(self) -> list[str]: ...


Backend = Callable[..., Hypervisor]
"""Makes a hypervisor: called as ``backend(config, paths, sandbox_id, events, logger, plan=..., agent=...)``."""
