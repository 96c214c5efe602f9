"""Ray for vmctl: the import (with an install hint), connecting a driver (on loopback where the
cluster is), the resource that marks a node able to run QEMU, and finding such nodes."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from vmctl.errors import HostError, InvalidArgument

HOST_RESOURCE = "vmctl_host"  # the custom resource operators declare on nodes that can run QEMU
MARK = 0.001  # how much of it one host actor or one fleet member takes: a marker, not a limit
NAMESPACE = "vmctl"  # detached sandboxes' actors live here, named "sandbox-<name>"
DETACHED_PREFIX = "sandbox-"


def require_ray() -> ModuleType:
    try:
        import ray
    except ImportError:  # pragma: no cover - depends on the install
        raise HostError("vmctl.cluster needs Ray: pip install 'vmctl[ray]'") from None
    return ray


LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def connect(address: str = "auto", **options: Any) -> None:
    """``ray.init(address)`` unless this process is connected already (options go to ``ray.init``).
    A cluster on a loopback address gets a driver on loopback too (``_node_ip_address``): Ray
    would otherwise hand the driver the machine's external address."""
    ray = require_ray()
    if address.rsplit(":", 1)[0] in LOOPBACK:
        options.setdefault("_node_ip_address", "127.0.0.1")
    if not ray.is_initialized():
        ray.init(address=address, **options)


def check_connected() -> ModuleType:
    ray = require_ray()
    if not ray.is_initialized():
        raise HostError("not connected to a Ray cluster: call vmctl.cluster.connect(address) (or ray.init) first")
    return ray


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("VMCTL_")}


def qemu_nodes() -> list[str]:
    """Ids of the live nodes that declare the ``vmctl_host`` resource."""
    ray = check_connected()
    return [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(HOST_RESOURCE, 0) > 0]


def find_node(node: str) -> str:
    """A node id from a full id or a unique prefix of one (of the ``vmctl_host`` nodes)."""
    matches = [n for n in qemu_nodes() if n.startswith(node)]
    if len(matches) != 1:
        raise InvalidArgument(f"node {node!r} matches {len(matches)} live vmctl_host nodes")
    return matches[0]
