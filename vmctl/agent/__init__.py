"""The guest agent, host side: the wire format (:mod:`.protocol`), what a guest's answers become
(:mod:`.results`), the client and its channels (:mod:`.client`), processes with live streams
(:mod:`.processes`), file and tree transfers (:mod:`.files`) and the console (:mod:`.console`)."""

from vmctl.agent.results import ExecResult, GuestBlockDevice, GuestMemory

__all__ = ["ExecResult", "GuestBlockDevice", "GuestMemory"]
