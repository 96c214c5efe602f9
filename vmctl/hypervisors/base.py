"""The async hypervisor interface a :class:`~vmctl.Sandbox` drives.

It mirrors the original layer's operations (create, start, wait ready, pause, resume, stop,
disconnect, capabilities, effective config, console, vCPU thread ids) as coroutines. A
hypervisor never changes sandbox state: it reports what QEMU says through :class:`Events`
and the sandbox's state machine decides.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from anyio.abc import TaskStatus

from vmctl.agent import AgentClient
from vmctl.config import SandboxConfig
from vmctl.qmp import QmpEvent


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


class Events(Protocol):
    """Where a hypervisor reports what happened; implemented by the sandbox."""

    def on_qmp_event(self, event: QmpEvent) -> None: ...
    def on_process_exit(self, returncode: int, stderr_tail: str, *, requested: bool) -> None:
        """QEMU exited; ``requested`` when vmctl itself asked it to (stop, quit, kill on teardown)."""

    def on_fault(self, reason: str) -> None: ...
    def on_console_line(self, line: str) -> None: ...


class Hypervisor(ABC):
    """One virtual machine's process, QMP session, console and agent channel."""

    name: str = "abstract"

    def __init__(self, config: SandboxConfig, paths: RunPaths, sandbox_id: str, events: Events,
                 logger: Any) -> None:  # fmt: skip
        self.config = config
        self.paths = paths
        self.sandbox_id = sandbox_id
        self.events = events
        self.log = logger
        self.agent = AgentClient(paths.agent_socket)
        #: a snapshot's device state to load instead of booting (set before ``create``)
        self.incoming: Path | None = None
        #: start QEMU so that it can outlive this process (no parent-death signal, stderr to its log)
        self.detached = False
        #: adopt this running QEMU instead of starting one (attaching to a detached sandbox)
        self.attach_pid: int | None = None
        #: leave the process running when ``run`` ends (a detached sandbox being let go)
        self.keep_running = False

    @abstractmethod
    async def create(self) -> None:
        """Resolve everything the launch needs (accelerator, arguments); starts no process."""

    @abstractmethod
    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Launch, connect, pump events until cancelled; report started once QEMU runs the guest.

        Whatever ends this task (cancellation, an error), the process is gone when it returns.
        """

    @abstractmethod
    async def wait_ready(self) -> None:
        """Return once the guest agent reported ready."""

    @abstractmethod
    async def pause(self) -> None: ...

    @abstractmethod
    async def resume(self) -> None: ...

    @abstractmethod
    async def stop(self, *, graceful: bool, timeout: float) -> None:
        """Make the process exit: guest power-off first when ``graceful``, then ``quit``, then SIGKILL."""

    @abstractmethod
    async def disconnect(self) -> None:
        """Close QMP, console and agent connections (the process is not touched)."""

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
    @abstractmethod
    def command_line(self) -> list[str]: ...


Backend = Callable[[SandboxConfig, RunPaths, str, Events, Any], Hypervisor]
