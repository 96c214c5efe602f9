"""The QEMU side of :class:`FakeQemu`: the backend, its launcher and the fake process, which
serves the real QMP wire protocol (greeting, capabilities, commands with ids, events, scripted
replies, delays and faults) and a console on the listening sockets a real QEMU would inherit, and
hands the agent socket to :class:`vmctl.testing.agent.FakeAgent`."""

from __future__ import annotations

import inspect
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
from anyio.abc import SocketListener, SocketStream, TaskGroup

from vmctl.agent.results import ExecResult
from vmctl.config import SandboxConfig
from vmctl.hypervisors.base import VmProcess
from vmctl.hypervisors.qemu import QemuHypervisor
from vmctl.testing.agent import FakeAgent, default_exec

ExecHandler = Callable[[list[bytes], bytes], "ExecResult | Awaitable[ExecResult]"]
CommandHandler = Callable[[Mapping[str, Any]], Any]
#: How a scripted reply goes wrong: answered under an id nobody asked for, without its id, as a
#: line that is not JSON, cut off halfway with the connection closed, or as one line longer than
#: the QMP client reads (qemu.qmp's limit is 10 MiB).
ReplyFault = Literal["wrong-id", "no-id", "garbage", "truncate", "huge"]
HUGE_REPLY_BYTES = 11 * 1024 * 1024


@dataclass(frozen=True)
class QmpErrorReply:
    """Script a QMP error reply: ``{"error": {"class": ..., "desc": ...}}``."""

    error_class: str = "GenericError"
    desc: str = "scripted failure"


def fake_config(directory: Path, **overrides: Any) -> SandboxConfig:
    """A valid config for the fake: placeholder kernel and initrd files in ``directory``."""
    for name in ("fake-kernel", "fake-initrd"):
        (directory / name).write_bytes(b"not a kernel\n")
    values: dict[str, Any] = {"kernel": directory / "fake-kernel", "initrd": directory / "fake-initrd",
                              "memory_mib": 256, "accel": "tcg"}  # fmt: skip
    values.update(overrides)
    return SandboxConfig(**values)


class FakeQemu:
    """Scriptable fake QEMU; pass it as ``Sandbox(config, backend=fake)``."""

    def __init__(
        self,
        *,
        ready_delay: float | None = 0.0,
        exec_handler: ExecHandler = default_exec,
        replies: Mapping[str, Any] | None = None,
        delays: Mapping[str, float] | None = None,
        hang: set[str] | frozenset[str] = frozenset(),
        drop_events: set[str] | frozenset[str] = frozenset(),
        stderr: list[str] | None = None,
        version: tuple[int, int, int] = (7, 2, 0),
        unplug: Literal["ack", "never", "guest-error"] = "ack",
        unplug_delay: float = 0.0,
        guest_names: Mapping[str, str] | None = None,
        reply_faults: Mapping[str, ReplyFault] | None = None,
    ) -> None:
        self.ready_delay = ready_delay
        self.exec_handler = exec_handler
        self.replies = dict(replies or {})
        self.delays = dict(delays or {})
        self.hang = set(hang)
        self.drop_events = set(drop_events)
        self.stderr = list(stderr or [])
        self.version = version
        self.unplug = unplug
        self.unplug_delay = unplug_delay
        self.guest_names = dict(guest_names or {})
        self.reply_faults = dict(reply_faults or {})
        self.received: list[dict[str, Any]] = []
        self.processes: list[FakeProcess] = []
        #: the fake guest's files (path -> (data, mode)), for write_file / read_file
        self.files: dict[str, tuple[bytes, int]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> QemuHypervisor:
        hv = QemuHypervisor(*args, launcher=_FakeLauncher(self), **kwargs)
        hv.name = "fake"
        return hv

    @property
    def process(self) -> FakeProcess:
        if not self.processes:
            raise RuntimeError("no sandbox has been started with this FakeQemu")
        return self.processes[-1]

    def commands(self) -> list[str]:
        return [str(c.get("execute")) for c in self.received]

    def added_devices(self) -> list[str]:
        """Ids of ``device_add`` requests in the order QEMU received them."""
        return [str(c["arguments"]["id"]) for c in self.received if c.get("execute") == "device_add"]

    async def emit(self, event: str, data: Mapping[str, Any] | None = None) -> None:
        """Send an event to the current sandbox's QMP client."""
        await self.process.emit(event, data)

    def crash(self, returncode: int = -9, stderr: str = "") -> None:
        """The process dies now: connections drop, ``returncode`` is reported."""
        if stderr:
            self.process.stderr_send(stderr)
        self.process.exit(returncode)

    async def close_qmp(self) -> None:
        """Close the QMP connection while the process stays alive."""
        await self.process.close_qmp()

    async def send_raw(self, data: bytes) -> None:
        """Write raw bytes on the QMP connection (garbage, partial JSON, huge lines)."""
        await self.process.send_qmp_raw(data)

    async def console_write(self, data: bytes) -> None:
        """Write bytes to the guest console, as the guest's serial port would."""
        await self.process.console_write(data)


class _FakeLauncher:
    """Plugs the fake into the real QEMU backend where a real QEMU process would start."""

    jails = False

    def __init__(self, fake: FakeQemu) -> None:
        self._fake = fake

    async def resolve(self, config: SandboxConfig, log: Any) -> SandboxConfig:
        return config.replace(accel="tcg", qemu_binary=Path(sys.executable))

    async def spawn(self, argv: list[str], listeners: Mapping[str, socket.socket], *, detached: bool,
                    log_path: Path, tg: TaskGroup, jail: Any = None, extra_fds: Sequence[int] = ()) -> VmProcess:  # fmt: skip
        process = FakeProcess(self._fake, {name: sock.dup() for name, sock in listeners.items()})
        for flag, value in zip(argv, argv[1:], strict=False):  # cold-plugged devices, as QEMU would see them
            if flag == "-device" and value.startswith("{"):
                props = json.loads(value)
                process.devices[str(props["id"])] = props
        self._fake.processes.append(process)
        try:
            await tg.start(process.serve)
        except BaseException:
            process.kill()  # not handed over yet: nobody else would reap it
            raise
        return process


class FakeProcess:
    """The fake's stand-in for a QEMU process: serves QMP, agent and console until it 'exits'."""

    pid = None

    def __init__(self, fake: FakeQemu, listeners: dict[str, socket.socket]) -> None:
        self.fake = fake
        self._listeners = listeners
        self.returncode: int | None = None
        self.running = True
        self._exited = anyio.Event()
        self._qmp: SocketStream | None = None
        self._qmp_lock = anyio.Lock()
        self._tg: TaskGroup | None = None
        self.devices: dict[str, dict[str, Any]] = {}
        self._console: SocketStream | None = None
        self._stderr_send, self._stderr_receive = anyio.create_memory_object_stream[str](1000)
        for line in fake.stderr:
            self.stderr_send(line)

    def stderr_send(self, text: str) -> None:
        for line in text.splitlines():
            try:
                self._stderr_send.send_nowait(line)
            except (anyio.WouldBlock, anyio.ClosedResourceError):
                pass

    async def aclose(self) -> None:
        pass

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        self.exit(-9)

    def exit(self, returncode: int) -> None:
        if self.returncode is not None:
            return
        self.returncode = returncode
        self._stderr_send.close()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        self._exited.set()

    async def stderr_lines(self) -> AsyncIterator[str]:
        async with self._stderr_receive:
            async for line in self._stderr_receive:
                yield line

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        if self.returncode is not None:  # died before it could serve
            for sock in self._listeners.values():
                sock.close()
            task_status.started()
            return
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._accept, "qmp", self._serve_qmp)
            tg.start_soon(self._accept, "agent", FakeAgent(self).serve)
            tg.start_soon(self._accept, "console", self._serve_console)
            task_status.started()

    async def _accept(self, name: str, handler: Callable[[SocketStream], Awaitable[None]]) -> None:
        """Serve one client at a time, like a QEMU chardev socket."""
        async with await SocketListener.from_socket(self._listeners[name]) as listener:
            while True:
                async with await listener.accept() as stream:
                    await handler(stream)

    # -- QMP -------------------------------------------------------------------------------

    async def _serve_qmp(self, stream: SocketStream) -> None:
        self._qmp = stream
        major, minor, micro = self.fake.version
        greeting = {"QMP": {"version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                                        "package": "vmctl-fake"}, "capabilities": ["oob"]}}  # fmt: skip
        await self._send(greeting)
        decoder = json.JSONDecoder()
        buffer = ""
        try:
            async for chunk in stream:  # QMP is a JSON stream: objects need no newline between them
                buffer += chunk.decode()
                while buffer.strip():
                    try:
                        msg, end = decoder.raw_decode(buffer.lstrip())
                    except json.JSONDecodeError:
                        break
                    buffer = buffer.lstrip()[end:]
                    await self._command(msg)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            self._qmp = None

    async def _command(self, msg: dict[str, Any]) -> None:
        self.fake.received.append(msg)
        name, args, msg_id = msg.get("execute", ""), msg.get("arguments", {}), msg.get("id")
        if name in self.fake.hang:
            return
        if name in self.fake.delays:
            await anyio.sleep(self.fake.delays[name])
        result: Any = {}
        after: Callable[[], Awaitable[None]] | None = None
        if name in self.fake.replies:
            scripted = self.fake.replies[name]
            result = scripted(args) if callable(scripted) else scripted
            if inspect.isawaitable(result):
                result = await result
        elif name == "qmp_capabilities":
            pass
        elif name == "stop":
            self.running = False
            await self.emit("STOP")
        elif name == "cont":
            self.running = True
            await self.emit("RESUME")
        elif name == "query-status":
            result = {"status": "running" if self.running else "paused", "running": self.running,
                      "singlestep": False}  # fmt: skip
        elif name == "query-cpus-fast":
            result = [{"cpu-index": 0, "thread-id": 1, "qom-path": "/machine/unattached/device[0]",
                       "target": "x86_64"}]  # fmt: skip
        elif name == "device_add":
            if args.get("id") in self.devices:
                result = QmpErrorReply("GenericError", f"Duplicate device ID '{args.get('id')}'")
            else:
                self.devices[str(args.get("id"))] = dict(args)
        elif name == "qom-list" and args.get("path") == "/machine/peripheral":
            result = [
                {"name": dev_id, "type": f"child<{props.get('driver')}>"} for dev_id, props in self.devices.items()
            ]
        elif name == "device_del":
            dev_id = str(args.get("id"))
            if dev_id not in self.devices:
                result = QmpErrorReply("DeviceNotFound", f"Device '{dev_id}' not found")
            else:
                after = self._unplug_later(dev_id)
        elif name in ("blockdev-add", "blockdev-del", "netdev_add", "netdev_del", "object-add", "object-del",
                      "chardev-add", "chardev-remove"):  # fmt: skip
            pass
        elif name == "quit":

            async def after_quit() -> None:
                await self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
                self.exit(0)

            after = after_quit
        else:
            result = QmpErrorReply("CommandNotFound", f"The command {name} has not been found")
        reply: dict[str, Any]
        if isinstance(result, QmpErrorReply):
            reply = {"error": {"class": result.error_class, "desc": result.desc}}
        else:
            reply = {"return": result}
        if msg_id is not None:
            reply["id"] = msg_id
        fault = self.fake.reply_faults.get(name)
        if fault is not None:
            await self._send_faulty(reply, fault)
        else:
            await self._send(reply)
        if after is not None:
            await after()

    async def _send_faulty(self, reply: dict[str, Any], fault: ReplyFault) -> None:
        if fault == "wrong-id":
            await self._send({**reply, "id": "nobody-asked"})
        elif fault == "no-id":
            await self._send({k: v for k, v in reply.items() if k != "id"})
        elif fault == "garbage":
            await self.send_qmp_raw(b"\x00}{ this is not JSON\n")
        elif fault == "truncate":
            data = json.dumps(reply).encode()
            await self.send_qmp_raw(data[: len(data) // 2])
            await self.close_qmp()
        elif fault == "huge":
            await self._send({**reply, "return": "x" * HUGE_REPLY_BYTES})
        else:
            raise ValueError(f"unknown reply fault {fault!r}")

    def _unplug_later(self, dev_id: str) -> Callable[[], Awaitable[None]]:
        props = self.devices[dev_id]

        async def unplug() -> None:
            if self.fake.unplug == "never":
                return
            if self._tg is None:
                return

            async def acknowledge() -> None:
                await anyio.sleep(self.fake.unplug_delay)
                if self.fake.unplug == "guest-error":
                    await self.emit(
                        "DEVICE_UNPLUG_GUEST_ERROR", {"device": dev_id, "path": f"/machine/peripheral/{dev_id}"}
                    )
                    return
                if self.devices.get(dev_id) is not props:
                    return  # already gone (or gone and plugged again): QEMU reports a removal once
                del self.devices[dev_id]
                await self.emit("DEVICE_DELETED", {"device": dev_id, "path": f"/machine/peripheral/{dev_id}"})

            self._tg.start_soon(acknowledge)

        return unplug

    def guest_name(self, bus: str, key: str) -> str | None:
        """What the fake guest calls a plugged disk or NIC (vdX / sdX / ethN by plug order)."""
        if key in self.fake.guest_names:
            return self.fake.guest_names[key]
        matches = {
            "virtio": [d for d in self.devices.values() if d.get("driver") in ("virtio-blk-pci", "virtio-blk-device")],
            "scsi": [d for d in self.devices.values() if d.get("driver") == "scsi-hd"],
            "net": [d for d in self.devices.values() if str(d.get("driver", "")).startswith("virtio-net")],
        }[bus]
        field = {"virtio": "serial", "scsi": "scsi-id", "net": "mac"}[bus]
        for index, props in enumerate(matches):
            if str(props.get(field)) == key:
                return {"virtio": f"vd{chr(97 + index)}", "scsi": f"sd{chr(97 + index)}", "net": f"eth{index}"}[bus]
        return None

    async def emit(self, event: str, data: Mapping[str, Any] | None = None) -> None:
        if event in self.fake.drop_events:
            return
        now = time.time()
        message: dict[str, Any] = {
            "event": event,
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
        }
        if data is not None:
            message["data"] = dict(data)
        await self._send(message)

    async def _send(self, message: Mapping[str, Any]) -> None:
        await self.send_qmp_raw(json.dumps(message).encode() + b"\n")

    async def send_qmp_raw(self, data: bytes) -> None:
        if self._qmp is None:
            return
        async with self._qmp_lock:
            try:
                await self._qmp.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

    async def close_qmp(self) -> None:
        if self._qmp is not None:
            await self._qmp.aclose()

    # -- console ---------------------------------------------------------------------------


    async def _serve_console(self, stream: SocketStream) -> None:
        self._console = stream
        try:
            await stream.send(b"fake console: booting\r\nvmctl-agent: ready on /dev/vport0p1\r\n")
            await anyio.sleep_forever()
        finally:
            self._console = None

    async def console_write(self, data: bytes) -> None:
        if self._console is not None:
            await self._console.send(data)

