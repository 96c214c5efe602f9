"""The sandbox: the facade users drive (:mod:`.facade`), where its guest comes from
(:mod:`.origin`), how what QEMU reports reaches it (:mod:`.events`), the hypervisor's task
(:mod:`.hvtask`) and run-state control: pause, resume, saves (:mod:`.runstate`)."""

from vmctl.sandbox.facade import Sandbox

__all__ = ["Sandbox"]
