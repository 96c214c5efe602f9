"""vmctl beyond one host: sandboxes on the nodes of a Ray cluster (``pip install 'vmctl[ray]'``).

Ray schedules and carries; vmctl runs QEMU. Each node that can run QEMU declares the
``vmctl_host`` custom resource (``ray start ... --resources '{"vmctl_host": 1}'``); a driver gets
one host actor per such node (:mod:`vmctl.cluster.hostservice`), which owns the sandboxes there.
:class:`ClusterFleet` is a :class:`~vmctl.Fleet` placed by a Ray placement group;
:class:`RemoteSandbox` proxies a sandbox's coroutines to its host actor and can
:meth:`~RemoteSandbox.move_to` another node; :func:`start_detached` / :func:`attach` keep a
sandbox in a named, detached actor that outlives its driver. Importing this module does not need
Ray; using it does (:class:`~vmctl.errors.HostError` says how to install it).
"""

from vmctl.cluster.fleet import ClusterFleet, ClusterMember
from vmctl.cluster.hosts import hosts, shutdown_hosts
from vmctl.cluster.hostservice import HostInfo
from vmctl.cluster.raysetup import HOST_RESOURCE, connect, qemu_nodes
from vmctl.cluster.remote import RemoteSandbox, attach, start_detached

__all__ = [
    "HOST_RESOURCE",
    "ClusterFleet",
    "ClusterMember",
    "HostInfo",
    "RemoteSandbox",
    "attach",
    "connect",
    "hosts",
    "qemu_nodes",
    "shutdown_hosts",
    "start_detached",
]
