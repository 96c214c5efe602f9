"""A fake QEMU for tests of code that embeds vmctl: no QEMU, no guest, real sockets.

:class:`FakeQemu` is a sandbox backend. It serves the real QMP wire protocol (greeting,
capabilities negotiation, commands with ids, events) and the vmctl agent protocol on the same
listening unix sockets a real QEMU would inherit, so everything above the process (QMP session,
event pump, state machine, agent client) is the production code. The QMP side and the process
are in :mod:`.qemu`, the agent side in :mod:`.agent`. Replies, events, delays and faults are
scriptable::

    fake = FakeQemu(exec_handler=lambda argv, stdin: ExecResult(0, b"hi\\n", b""))
    async with Sandbox(config, backend=fake) as sb:
        await fake.emit("GUEST_PANICKED", {"action": "pause"})
        await sb.wait_for_state(SandboxState.FAILED)

``fake_config(tmp_path)`` makes a valid config whose kernel and initrd are placeholder files.
"""

from vmctl.testing.agent import FakeAgent, default_exec
from vmctl.testing.qemu import FakeProcess, FakeQemu, QmpErrorReply, ReplyFault, fake_config

__all__ = ["FakeAgent", "FakeProcess", "FakeQemu", "QmpErrorReply", "ReplyFault", "default_exec", "fake_config"]
