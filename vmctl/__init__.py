"""vmctl: asyncio-native control of sandbox virtual machines on QEMU."""

from vmctl import guest
from vmctl.agent import ExecResult, GuestBlockDevice, GuestMemory
from vmctl.config import SandboxConfig
from vmctl.devices import (
    BlockDevice,
    CpuDevice,
    Device,
    DimmDevice,
    NetworkDevice,
    SerialPort,
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
    HostError,
    HotplugError,
    HotplugTimeout,
    IllegalTransition,
    InvalidArgument,
    NotSupported,
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
from vmctl.fleet import Fleet, FleetEvent, FleetEventKind, Outcome
from vmctl.hotplug import DeviceState, PluggedDevice
from vmctl.hypervisors.base import Capabilities
from vmctl.params import Param, deserialize_params, serialize_params
from vmctl.sandbox import Sandbox
from vmctl.state import SandboxState, Transition, Trigger

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
    "GuestMemory",
    "HostError",
    "HotplugError",
    "HotplugTimeout",
    "IllegalTransition",
    "InvalidArgument",
    "NetworkDevice",
    "NotSupported",
    "Outcome",
    "Param",
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
    "SandboxNotFound",
    "SandboxState",
    "SerialPort",
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
    "serialize_params",
]
