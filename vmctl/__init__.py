"""vmctl: asyncio-native control of sandbox virtual machines on QEMU."""

from vmctl import guest
from vmctl.agent import ExecResult, GuestBlockDevice, GuestCommandFailed, GuestMemory, InvalidArgument
from vmctl.config import SandboxConfig
from vmctl.errors import (
    ConfigError,
    GuestError,
    HostError,
    IllegalTransition,
    NotSupported,
    Problem,
    QMPCommandError,
    QMPDisconnected,
    QMPError,
    ReadyTimeout,
    SandboxFailed,
    VmctlError,
    VmctlTimeout,
)
from vmctl.hypervisors.base import Capabilities
from vmctl.params import Param, deserialize_params, serialize_params
from vmctl.sandbox import Sandbox
from vmctl.state import SandboxState, Transition, Trigger

__version__ = "0.1.0"

__all__ = [
    "Capabilities",
    "ConfigError",
    "ExecResult",
    "GuestBlockDevice",
    "GuestCommandFailed",
    "GuestError",
    "GuestMemory",
    "HostError",
    "IllegalTransition",
    "InvalidArgument",
    "NotSupported",
    "Param",
    "Problem",
    "QMPCommandError",
    "QMPDisconnected",
    "QMPError",
    "ReadyTimeout",
    "Sandbox",
    "SandboxConfig",
    "SandboxFailed",
    "SandboxState",
    "Transition",
    "Trigger",
    "VmctlError",
    "VmctlTimeout",
    "__version__",
    "deserialize_params",
    "guest",
    "serialize_params",
]
