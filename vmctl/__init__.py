"""vmctl: asyncio-native control of sandbox virtual machines on QEMU."""

from vmctl import compat, guest
from vmctl.agent.processes import GuestProcess, GuestStdin, GuestStream, ProcessContext
from vmctl.agent.results import ExecResult, GuestBlockDevice, GuestMemory
from vmctl.config import SandboxConfig
from vmctl.core.heap import settle_gc
from vmctl.core.qmp import limit_commands_in_flight
from vmctl.core.state import SandboxState, Transition, Trigger
from vmctl.devices import (
    BlockDevice,
    CpuDevice,
    Device,
    DimmDevice,
    NetworkDevice,
    SerialPort,
    SharedDirectory,
    VfioDevice,
    VhostUserBlockDevice,
    VhostUserNetDevice,
    VsockDevice,
)
from vmctl.errors import (
    ConfigError,
    FleetError,
    GuestCommandFailed,
    GuestDisconnected,
    GuestError,
    GuestOSError,
    GuestUnresponsive,
    HostError,
    HotplugError,
    HotplugTimeout,
    IllegalTransition,
    InvalidArgument,
    NodeLost,
    NotSupported,
    OutputLimitExceeded,
    PoolError,
    PoolTimeout,
    Problem,
    QMPCommandError,
    QMPDisconnected,
    QMPError,
    ReadyTimeout,
    SandboxBusy,
    SandboxFailed,
    SandboxNotFound,
    VmctlError,
    VmctlTimeout,
)
from vmctl.fleets.fleet import Fleet, FleetEvent, FleetEventKind, Outcome
from vmctl.fleets.pool import PoolEvent, PoolEventKind, PoolStats, SandboxPool
from vmctl.hypervisors.base import Capabilities
from vmctl.machine.hotplug import DeviceState, PluggedDevice
from vmctl.params import Param, deserialize_params, serialize_params
from vmctl.sandbox.facade import Sandbox

__version__ = "0.1.0"

__all__ = [
    "BlockDevice",
    "Capabilities",
    "ConfigError",
    "CpuDevice",
    "Device",
    "DimmDevice",
    "DeviceState",
    "ExecResult",
    "Fleet",
    "FleetError",
    "FleetEvent",
    "FleetEventKind",
    "GuestBlockDevice",
    "GuestCommandFailed",
    "GuestDisconnected",
    "GuestError",
    "GuestOSError",
    "GuestUnresponsive",
    "GuestProcess",
    "GuestStdin",
    "GuestStream",
    "GuestMemory",
    "HostError",
    "HotplugError",
    "HotplugTimeout",
    "IllegalTransition",
    "InvalidArgument",
    "NetworkDevice",
    "NodeLost",
    "NotSupported",
    "OutputLimitExceeded",
    "Outcome",
    "Param",
    "PoolError",
    "PoolEvent",
    "PoolEventKind",
    "PoolStats",
    "PoolTimeout",
    "ProcessContext",
    "PluggedDevice",
    "Problem",
    "QMPCommandError",
    "QMPDisconnected",
    "QMPError",
    "ReadyTimeout",
    "Sandbox",
    "SandboxConfig",
    "SandboxBusy",
    "SandboxFailed",
    "SandboxPool",
    "SandboxNotFound",
    "SandboxState",
    "SerialPort",
    "SharedDirectory",
    "Transition",
    "Trigger",
    "VfioDevice",
    "VhostUserBlockDevice",
    "VhostUserNetDevice",
    "VmctlError",
    "VmctlTimeout",
    "VsockDevice",
    "__version__",
    "deserialize_params",
    "guest",
    "limit_commands_in_flight",
    "serialize_params",
    "settle_gc",
]

compat.install()
