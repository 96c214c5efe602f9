"""Fuzzing the input edges: configs and fleet specs, guest-agent replies and a hostile QMP peer.

Each input either works or gives a clear vmctl error: ``ConfigError`` naming the field,
``GuestError`` / ``VmctlTimeout`` from the agent, ``QMPError`` / ``VmctlTimeout`` from QMP. Never
another exception, never a hang (every network case is bounded), never a leaked task or socket.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import assert_no_stray_tasks, short_dir, socket_fd_count
from vmctl import Sandbox, SandboxConfig, SandboxState
from vmctl.agent import client as agent_module
from vmctl.agent import protocol as proto
from vmctl.agent.client import GUEST_FRAMES, AgentClient, GuestError
from vmctl.agent.protocol import FrameType
from vmctl.agent.results import ExecResult, parse_block_devices, parse_cpu_list, parse_memory
from vmctl.core.qmp import QmpSession
from vmctl.devices import DEVICE_TYPES
from vmctl.errors import (
    ConfigError,
    GuestDisconnected,
    OutputLimitExceeded,
    QMPDisconnected,
    QMPError,
    SandboxFailed,
    VmctlError,
    VmctlTimeout,
)
from vmctl.fleets.spec import FLEET_FIELDS, FleetSpec, load_fleet_spec
from vmctl.hypervisors.base import RunPaths
from vmctl.hypervisors.cmdline import build_command
from vmctl.testing import FakeQemu, fake_config

CONFIG_FIELDS = sorted(f.name for f in dataclasses.fields(SandboxConfig))
DEVICE_FIELDS = sorted({f.name for cls in DEVICE_TYPES.values() for f in dataclasses.fields(cls)})
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def assets(tmp_path: Path) -> dict[str, str]:
    """Placeholder kernel, initrd and disk, so fuzzed configs get past "file missing"."""
    for name in ("kernel", "initrd", "disk.img"):
        (tmp_path / name).write_bytes(b"placeholder\n")
    return {"kernel": str(tmp_path / "kernel"), "initrd": str(tmp_path / "initrd"), "disk": str(tmp_path / "disk.img")}


# -- strategies ------------------------------------------------------------------------------

HOSTILE_STRINGS = [
    "", "/", "/dev/null", "/nonexistent/file", "~nosuchuser4711/kernel", "~/kernel", "a\0b", "relative.img", "..",
    "x" * 1_000_000, "/" + "a/" * 50_000, "\0" * 1000, "ünïcødé ✓ 𝔘", "\u202ered", "-device", "a,b=c", "tcp:1.2.3.4:1-:2",
    "virtio-blk", "virtio-mmio", "q35", "microvm", "raw", "qcow2", "vmdk", "tap", "user", "52:54:00:12:34:56",
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([10**100, -(10**100), 2**63, 2**64 + 1, -1, 0, 1, 3, 256, 4096]),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(HOSTILE_STRINGS),
)
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8,
)


def device_tables(assets: dict[str, str]) -> st.SearchStrategy[dict[str, Any]]:
    plausible: dict[str, st.SearchStrategy[Any]] = {
        "path": st.sampled_from([assets["disk"], "disk.img", "~nosuchuser4711/d", "a\0b"]),
        "read_only": st.booleans(),
        "driver": st.sampled_from(["virtio-blk", "virtio-scsi", "virtio-mmio", "floppy"]),
        "format": st.sampled_from(["raw", "qcow2", "vmdk"]),
        "id": st.sampled_from(["d1", "disk1", "rp0", "x" * 30, "1abc", "bad id"]),
        "backend": st.sampled_from(["user", "tap", "vde"]),
        "hostfwd": st.lists(st.sampled_from(["tcp:127.0.0.1:2222-:22", "bogus", "udp::1-:2"]), max_size=2),
        "mac": st.sampled_from(["52:54:00:12:34:56", "zz:zz"]),
        "guest_cid": st.integers(-5, 2**33),
        "socket": st.sampled_from(["/nonexistent.sock", "/dev/null", "a\0b"]),
    }
    return st.fixed_dictionaries(
        {"type": st.one_of(st.sampled_from(sorted(DEVICE_TYPES)), junk)},
        optional={name: st.one_of(junk, plausible.get(name, junk)) for name in DEVICE_FIELDS},
    )


def config_mappings(assets: dict[str, str]) -> st.SearchStrategy[dict[Any, Any]]:
    plausible: dict[str, st.SearchStrategy[Any]] = {
        "machine": st.sampled_from(["q35", "pc", "microvm", "isapc"]),
        "accel": st.sampled_from(["auto", "kvm", "tcg", "hvf"]),
        "vcpus": st.integers(-2, 300),
        "max_vcpus": st.integers(-2, 300),
        "memory_mib": st.integers(0, 10**7),
        "block_driver": st.sampled_from(["virtio-scsi", "virtio-blk", "virtio-mmio", "ide"]),
        "kernel_params": st.one_of(
            st.dictionaries(st.text(max_size=10), st.one_of(st.text(max_size=10), st.integers(), junk), max_size=3),
            st.lists(st.one_of(st.text(max_size=12), st.tuples(st.text(max_size=5), st.text(max_size=5))), max_size=3),
        ),
        "hypervisor_params": st.one_of(
            st.dictionaries(
                st.sampled_from(["rtc", "global", "drive", "-rtc", "Rtc"]), st.text(max_size=12), max_size=3
            ),
            st.lists(
                st.sampled_from(["global=a.b=1", "global=c.d=2", "rtc=base=utc", "readconfig=/etc/x"]), max_size=3
            ),
        ),
        "devices": st.lists(st.one_of(device_tables(assets), junk), max_size=3),
        "memory_path": st.sampled_from(["/tmp/vmctl-fuzz-mem", "/nonexistent/dir/mem", "a\0b"]),
    }
    return st.fixed_dictionaries(
        {
            "kernel": st.one_of(st.just(assets["kernel"]), junk),
            "initrd": st.one_of(st.just(assets["initrd"]), junk),
        },
        optional={
            **{
                name: st.one_of(junk, plausible.get(name, junk))
                for name in CONFIG_FIELDS
                if name not in ("kernel", "initrd")
            },
            "no_such_field": junk,
            1: junk,  # not even a string key
        },
    )


def toml_value(value: Any) -> str | None:
    """A TOML rendering of ``value`` (None where TOML has no such value)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        items = [toml_value(v) for v in value]
        return "[" + ", ".join(i for i in items if i is not None) + "]"
    if isinstance(value, dict):
        pairs = [(json.dumps(str(k), ensure_ascii=False), toml_value(v)) for k, v in value.items()]
        return "{" + ", ".join(f"{k} = {v}" for k, v in pairs if v is not None) + "}"
    raise TypeError(value)


def toml_table(name: str, table: dict[Any, Any]) -> str:
    lines = [f"[{name}]"]
    for key, value in table.items():
        rendered = toml_value(value)
        if rendered is not None:
            lines.append(f"{json.dumps(str(key), ensure_ascii=False)} = {rendered}")
    return "\n".join(lines) + "\n"


# -- configs ---------------------------------------------------------------------------------


def field_root(field: str) -> str:
    return re.split(r"[\[.]", field, maxsplit=1)[0]


def check_config_outcome(make: Callable[[], SandboxConfig], allowed_roots: set[str]) -> SandboxConfig | None:
    """Either a config that works (round-trips and renders a QEMU command line) or a
    ConfigError whose every problem names a field; any other exception fails the test."""
    try:
        config = make()
    except ConfigError as exc:
        assert exc.problems, "a ConfigError without problems"
        for problem in exc.problems:
            assert problem.message, problem
            assert field_root(problem.field) in allowed_roots, f"problem does not name a field: {problem}"
        return None
    assert SandboxConfig.from_mapping(config.to_mapping()) == config, "to_mapping does not round-trip"
    resolved = config.replace(accel="tcg", qemu_binary=Path(sys.executable))
    argv = build_command(
        resolved, RunPaths(Path("/run/x"), Path("/run/x")), "sb-x", {"qmp": 3, "console": 4, "agent": 5}
    )
    assert all(isinstance(a, str) and "\0" not in a for a in argv), "an argument QEMU cannot receive"
    return config


@FUZZ
@given(data=st.data())
def test_random_mappings_give_a_config_or_a_config_error(data: st.DataObject, assets: dict[str, str]) -> None:
    mapping = data.draw(config_mappings(assets))
    roots = {*CONFIG_FIELDS, "VMCTL_ACCEL", *(str(k) for k in mapping)}
    check_config_outcome(lambda: SandboxConfig.from_mapping(mapping), roots)


@FUZZ
@given(data=st.data())
def test_random_toml_gives_a_config_or_a_config_error(data: st.DataObject, assets: dict[str, str]) -> None:
    mapping = data.draw(config_mappings(assets))
    text = toml_table("sandbox", {k: v for k, v in mapping.items() if isinstance(k, str)})
    roots = {*CONFIG_FIELDS, "VMCTL_ACCEL", "<toml>", "sandbox", *(str(k) for k in mapping)}
    check_config_outcome(lambda: SandboxConfig.from_toml(text), roots)


@FUZZ
@given(text=st.text(max_size=300), raw=st.binary(max_size=300))
def test_garbage_toml_text_and_files_give_config_errors(text: str, raw: bytes, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        SandboxConfig.from_toml("[sandbox]\n" + text + "\nkernel = 5\n")  # kernel = 5 is wrong whatever text holds
    path = tmp_path / "garbage.toml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError) as info:
        SandboxConfig.from_toml(path)
    assert all(p.field in (str(path), "sandbox") for p in info.value.problems), info.value


def with_assets(value: Any, assets: dict[str, str]) -> Any:
    """``value`` with the placeholders KERNEL and DISK replaced by the placeholder files."""
    if isinstance(value, dict):
        return {k: with_assets(v, assets) for k, v in value.items()}
    if isinstance(value, list):
        return [with_assets(v, assets) for v in value]
    return {"KERNEL": assets["kernel"], "DISK": assets["disk"]}.get(value, value) if isinstance(value, str) else value


HOSTILE_CONFIGS: dict[str, dict[Any, Any]] = {
    "unknown user in ~": {"kernel": "~nosuchuser4711/k"},
    "path of the wrong type": {"entropy_source": 5},
    "initrd of the wrong type with an image": {"initrd": 5, "image": "KERNEL"},
    "template flags that are not booleans": {"boot_from_template": "yes", "devices_state_path": 5, "memory_path": 5},
    "NUL in a path QEMU would open": {
        "boot_to_be_template": True,
        "memory_path": "/tmp/\0x",
        "devices_state_path": "/tmp/y",
    },  # fmt: skip
    "NUL in the kernel path": {"kernel": "a\0b"},
    "a device that is a string": {"devices": ["ab"]},
    "devices that are a number": {"devices": 5},
    "device id that is a number": {"devices": [{"type": "block", "path": "DISK", "id": 5}]},
    "device path with an unknown user": {"devices": [{"type": "block", "path": "~nosuchuser4711/d"}]},
    "hostfwd rule that is a number": {"devices": [{"type": "network", "hostfwd": [5]}]},
    "hostfwd that is a number": {"devices": [{"type": "network", "hostfwd": 5}]},
    "hostfwd that is one string": {"devices": [{"type": "network", "hostfwd": "tcp:127.0.0.1:2222-:22"}]},
    "mac that is a number": {"devices": [{"type": "network", "mac": 5}]},
    "vsock cid that is a string": {"devices": [{"type": "vsock", "guest_cid": "x"}]},
    "vfio address that is a number": {"devices": [{"type": "vfio", "host_address": 5}]},
    "vhost-user socket with NUL": {"devices": [{"type": "vhost-user-block", "socket": "a\0b"}]},
    "vhost-user socket that is a number": {"devices": [{"type": "vhost-user-block", "socket": 5}]},
    "serial name that is a number": {"devices": [{"type": "serial", "name": 5}]},
    "read_only that is a string": {"devices": [{"type": "block", "path": "DISK", "read_only": "yes"}]},
    "unknown block driver": {"devices": [{"type": "block", "path": "DISK", "driver": "floppy"}]},
    "image format that opens other files": {"devices": [{"type": "block", "path": "DISK", "format": "vmdk"}]},
    "kernel param with NUL": {"kernel_params": {"a": "b\0"}},
    "huge vcpus": {"vcpus": 10**100},
    "NaN memory slots": {"memory_slots": float("nan")},
    "two non-string unknown keys": {1: 2, (3,): 4},
    "a megabyte of kernel params": {"kernel_params": {"k": "x" * 1_000_000}},
}


@pytest.mark.parametrize("overrides", HOSTILE_CONFIGS.values(), ids=HOSTILE_CONFIGS.keys())
def test_hostile_configs_are_config_errors_naming_the_field(overrides: dict[Any, Any], assets: dict[str, str]) -> None:
    mapping = {"kernel": assets["kernel"], "initrd": assets["initrd"], **with_assets(overrides, assets)}
    with pytest.raises(ConfigError) as info:
        SandboxConfig.from_mapping(mapping)
    named = {field_root(p.field) for p in info.value.problems}
    assert named & {str(k) for k in overrides}, f"{info.value} does not name {list(overrides)}"


def test_hypervisor_params_with_a_repeated_option_round_trip(assets: dict[str, str]) -> None:
    config = SandboxConfig.from_mapping({"kernel": assets["kernel"], "initrd": assets["initrd"],
                                         "hypervisor_params": ["global=a.b=1", "global=c.d=2"]})  # fmt: skip
    assert config.qemu_extra_args() == ["-global", "a.b=1", "-global", "c.d=2"]
    assert SandboxConfig.from_mapping(config.to_mapping()) == config, "a repeated -global was lost"


# -- fleet specs -----------------------------------------------------------------------------


def check_fleet_outcome(path: Path, assets: dict[str, str], allowed_roots: set[str]) -> FleetSpec | None:
    try:
        spec = load_fleet_spec(path, default_kernel=Path(assets["kernel"]), default_initrd=Path(assets["initrd"]))
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            named = problem.field == str(path) or field_root(problem.field) in allowed_roots
            assert named, f"problem does not name a field: {problem}"
        return None
    assert 1 <= spec.size <= 256 and 1 <= spec.max_concurrent_starts <= 256
    assert spec.command_timeout is None or 0 < spec.command_timeout < math.inf
    assert all(argv and all(isinstance(a, str) for a in argv) for argv in spec.commands)
    return spec


def fleet_tables(assets: dict[str, str]) -> st.SearchStrategy[dict[str, Any]]:
    plausible: dict[str, st.SearchStrategy[Any]] = {
        "size": st.integers(-1, 300),
        "max_concurrent_starts": st.integers(-1, 300),
        "command_timeout": st.one_of(st.floats(), st.integers(-5, 10**6)),
        "commands": st.lists(st.lists(st.one_of(st.text(max_size=8), junk), max_size=3), max_size=3),
        "devices": st.lists(st.one_of(device_tables(assets), junk), max_size=2),
    }
    return st.fixed_dictionaries(
        {}, optional={**{name: st.one_of(junk, plausible.get(name, junk)) for name in FLEET_FIELDS}, "bogus": junk}
    )


@FUZZ
@given(data=st.data())
def test_random_fleet_specs_give_a_spec_or_a_config_error(data: st.DataObject, assets: dict[str, str],
                                                           tmp_path: Path) -> None:  # fmt: skip
    fleet = data.draw(fleet_tables(assets))
    sandbox = {k: v for k, v in data.draw(config_mappings(assets)).items() if isinstance(k, str)}
    del sandbox["kernel"], sandbox["initrd"]  # the defaults apply, as in `vmctl fleet`
    extra = data.draw(st.sampled_from(["", "[other]\nx = 1\n", "sandbox = 5\n", "fleet = 5\n"]))
    path = tmp_path / "fleet.toml"
    text = extra + toml_table("fleet", fleet) + toml_table("sandbox", sandbox) if not extra.startswith(("sandbox", "fleet")) \
        else extra + toml_table("fleet", fleet)  # fmt: skip
    path.write_text(text)
    check_fleet_outcome(path, assets, {"fleet", "sandbox", "other"})


@pytest.mark.parametrize(
    "text",
    [
        "[fleet]\ncommand_timeout = nan\n",
        "[fleet]\ncommand_timeout = inf\n",
        "[fleet]\nsize = 1e3\n",
        "[fleet]\nsize = 99999999999999999999999\n",
        "[fleet]\n[sandbox]\ndevices = 5\n",
        '[fleet]\ndevices = [{type = "block", path = "disk.img"}]\n[sandbox]\ndevices = 5\n',
        '[fleet]\ndevices = [{type = "block", path = "disk.img"}]\n[sandbox]\ndevices = "abc"\n',
        '[fleet]\ndevices = ["abc"]\n',
        '[fleet]\ndevices = [{type = "block", path = "~nosuchuser4711/d.img"}]\n',
        '[fleet]\ndevices = [{type = "block", path = "disk.img", read_only = "no"}]\n',
        '[fleet]\ncommands = [["sh", "-c", "\\u0000"], "ls"]\n',
        '[fleet]\n[sandbox]\nkernel = "\\u0000"\n',
    ],
)
def test_hostile_fleet_specs_are_config_errors(text: str, assets: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_fleet_spec(path, default_kernel=Path(assets["kernel"]), default_initrd=Path(assets["initrd"]))
    assert all(field_root(p.field) in ("fleet", "sandbox") for p in info.value.problems), info.value


def test_unreadable_fleet_spec_files_are_config_errors(tmp_path: Path) -> None:
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[fleet]\n")
    for path in (binary, tmp_path / "missing.toml", tmp_path, Path("/tmp/a\0b.toml")):
        with pytest.raises(ConfigError):
            load_fleet_spec(path)
        with pytest.raises(ConfigError):
            SandboxConfig.from_toml(path)


# -- guest-agent frames ----------------------------------------------------------------------


@asynccontextmanager
async def agent_peer(respond: Callable[[SocketStream, int], Awaitable[None]]) -> AsyncIterator[AgentClient]:
    """An AgentClient connected to a fake agent that reads one request frame and calls
    ``respond(stream, request_id)``; the fake closes the connection when ``respond`` returns."""
    with short_dir() as directory:
        path = directory / "agent.sock"
        listener = await anyio.create_unix_listener(path)

        async def serve() -> None:
            async with listener, await listener.accept() as stream:
                reader = BufferedByteReceiveStream(stream)
                length, _, _, request_id = proto.unpack_header(await reader.receive_exactly(proto.HEADER_SIZE))
                await reader.receive_exactly(length)
                await respond(stream, request_id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            client = AgentClient(path)
            await tg.start(client.serve)
            try:
                yield client
            finally:
                tg.cancel_scope.cancel()


THEIRS = 0x7FFF_FFFF_0000_0001  # an id of nobody's request
frame_parts = st.tuples(
    st.sampled_from([*map(int, proto.FrameType), 0, 0x3F, 0x7F, 0xFF]),
    st.sampled_from([0, 1, 2, 3, 255]),
    st.sampled_from(["mine", "mine", "theirs", 0]),
    st.one_of(st.binary(max_size=40), st.sampled_from([b"", proto.i32(0) + b"\0", proto.i32(7) + b"\1",
                                                        proto.u32(5), b"\xff" * 5])),
)  # fmt: skip
hostile = st.one_of(
    st.builds(lambda p: ("frame", p), frame_parts),
    st.builds(lambda b: ("raw", b), st.binary(min_size=1, max_size=60)),
)


def render(item: tuple[str, Any], request_id: int) -> bytes:
    kind, value = item
    if kind == "raw":
        return bytes(value)
    frame_type, stream, who, payload = value
    rid = request_id if who == "mine" else THEIRS if who == "theirs" else 0
    return proto.HEADER.pack(len(payload), frame_type, stream, 0, rid) + payload


@settings(max_examples=80, deadline=None)
@given(items=st.lists(hostile, min_size=1, max_size=6))
def test_hostile_agent_frames_give_a_result_or_a_guest_error(items: list[tuple[str, Any]]) -> None:
    """The fake agent answers an exec with hostile frames (any type, stream, id and payload, or
    raw garbage) and hangs up: the caller gets a result (if the frames happen to make one) or a
    GuestError, at once."""

    async def main() -> None:
        async def respond(stream: SocketStream, request_id: int) -> None:
            await stream.send(b"".join(render(item, request_id) for item in items))

        async with agent_peer(respond) as client:
            with anyio.fail_after(5):
                try:
                    result = await client.exec(["true"])
                except GuestError as exc:
                    assert str(exc)
                else:
                    assert isinstance(result, ExecResult)
            assert client.pending == 0
        await assert_no_stray_tasks()

    anyio.run(main)


@settings(max_examples=40, deadline=None)
@given(items=st.lists(frame_parts, max_size=4), code=st.integers(-300, 300), out=st.binary(max_size=100))
def test_frames_for_other_requests_do_not_disturb_a_pending_one(items: list[Any], code: int, out: bytes) -> None:
    async def main() -> None:
        async def respond(stream: SocketStream, request_id: int) -> None:
            for frame_type, stream_no, _, payload in items:  # well-formed frames of known types, for another id
                if frame_type in GUEST_FRAMES and stream_no <= 2:
                    await stream.send(proto.pack(frame_type, THEIRS, payload, stream_no))
            await stream.send(proto.pack(FrameType.DATA, request_id, out, 1) + proto.pack(FrameType.EOF, request_id, b"", 1)
                              + proto.pack(FrameType.EOF, request_id, b"", 2)
                              + proto.pack(FrameType.EXIT, request_id, proto.i32(code) + b"\0"))  # fmt: skip
            await anyio.sleep_forever()

        async with agent_peer(respond) as client:
            with anyio.fail_after(5):
                result = await client.exec(["true"])
            assert (result.exit_code, result.stdout, result.stderr) == (code, out, b"")
            assert client.pending == 0

    anyio.run(main)


async def test_a_huge_frame_is_a_guest_error_at_once() -> None:
    """A header announcing more than the 1 MiB limit fails the connection without reading on."""

    async def respond(stream: SocketStream, request_id: int) -> None:
        await stream.send(proto.HEADER.pack(proto.MAX_PAYLOAD + 1, FrameType.DATA, 1, 0, request_id))
        await anyio.sleep_forever()

    async with agent_peer(respond) as client:
        with anyio.fail_after(5), pytest.raises(GuestError, match="broke the protocol.*limit"):
            await client.exec(["true"])
        assert client.pending == 0
        with pytest.raises(GuestError, match="broke the protocol"):
            await client.ping()  # the connection stays failed
    await assert_no_stray_tasks()


async def test_an_endless_stream_of_output_is_an_output_limit_error() -> None:
    """A guest that sends output without end (ignoring credit) cannot fill the controller."""

    async def respond(stream: SocketStream, request_id: int) -> None:
        chunk = proto.pack(FrameType.DATA, request_id, b"x" * proto.CHUNK, 1)
        for _ in range(80):
            await stream.send(chunk)
        await anyio.sleep_forever()

    async with agent_peer(respond) as client:
        with anyio.fail_after(20), pytest.raises(OutputLimitExceeded, match="output limit"):
            await client.exec(["true"], output_limit=4 * 1024 * 1024)
        assert client.pending == 0
    await assert_no_stray_tasks()


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([(0x7F, 0, b"")], "unknown type 0x7f"),
        ([(FrameType.DATA, 7, b"x")], "stream 7"),
        ([(FrameType.EXIT, 0, b"\0\0\0")], "malformed frame.*EXIT"),
        ([(FrameType.ERROR, 0, b"\1")], "malformed frame.*errno"),
        ([(FrameType.CREDIT, 0, b"12345")], "malformed frame.*CREDIT"),
        ([(FrameType.ERROR, 0, proto.i32(2) + b"/x: No such file or directory")], "No such file"),
        ([(FrameType.SPAWN, 0, b"")], "unknown type 0x02"),
        ([(FrameType.CREDIT, 1, proto.u32(5))], "unexpected frame"),
        ([(FrameType.READY, 0, proto.u32(1) + b"b1"), (FrameType.READY, 0, proto.u32(1) + b"b2")], "restarted"),
        ([(FrameType.READY, 5, b"")], "malformed READY"),
        ([(FrameType.READY, 0, proto.u32(1) + b"b" * (proto.MAX_BOOT_ID + 1))], "malformed READY"),
    ],
)
async def test_malformed_agent_frames_are_guest_errors(frames: list[tuple[int, int, bytes]], match: str) -> None:
    async def respond(stream: SocketStream, request_id: int) -> None:
        for frame_type, stream_no, payload in frames:
            rid = 0 if frame_type == FrameType.READY and payload else request_id
            if frame_type == FrameType.READY and not payload:
                rid = 5
            await stream.send(proto.pack(frame_type, rid, payload, stream_no))
        await anyio.sleep_forever()

    async with agent_peer(respond) as client:
        with anyio.fail_after(5), pytest.raises(GuestError, match=match):
            await client.exec(["true"])
        assert client.pending == 0


async def test_truncated_frame_then_hang_up_is_a_disconnect() -> None:
    async def respond(stream: SocketStream, request_id: int) -> None:
        await stream.send(proto.pack(FrameType.EXIT, request_id, proto.i32(0) + b"\0")[:10])

    async with agent_peer(respond) as client:
        with anyio.fail_after(5), pytest.raises(GuestDisconnected):
            await client.exec(["true"])
        assert client.pending == 0


async def test_a_reply_under_the_wrong_id_is_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "TIMEOUT_GRACE", 0.05)

    async def respond(stream: SocketStream, request_id: int) -> None:
        await stream.send(proto.pack(FrameType.EXIT, request_id + 1, proto.i32(0) + b"\0"))
        await anyio.sleep_forever()

    async with agent_peer(respond) as client:
        with anyio.fail_after(5), pytest.raises(VmctlTimeout, match="did not answer"):
            await client.exec(["true"], timeout=0.5)
        assert client.pending == 0
        with anyio.move_on_after(0.1):  # no exec timeout: the caller's own scope bounds it
            await client.ping()
        assert client.pending == 0


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(st.text(max_size=60), st.sampled_from(["0-4294967295", "0-65535,0-65535", "3-1", "²", "١-٣"])))
def test_guest_query_parsers_never_crash(text: str) -> None:
    try:
        cpus = parse_cpu_list(text)
    except GuestError:
        pass
    else:
        assert all(isinstance(c, int) and c >= 0 for c in cpus) and len(cpus) <= 1 << 16
    try:
        memory = parse_memory(text)
    except GuestError:
        pass
    else:
        assert memory.total_kib >= 0
    assert all(d.size_bytes >= 0 for d in parse_block_devices(text))
    meminfo = f"MemTotal: {text}\nMemFree: 1 kB\nMemAvailable: 1 kB\n"
    try:
        parse_memory(meminfo)
    except GuestError:
        pass
    parse_block_devices(f"vda {text} serial\n")


# -- a hostile QMP peer ----------------------------------------------------------------------

GREETING = b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}}\n'
TEN_MIB_PLUS = 11 * 1024 * 1024


class CommandReader:
    """Commands from the client: a stream of JSON objects, not necessarily newline-terminated."""

    def __init__(self, stream: SocketStream) -> None:
        self._stream = stream
        self._buffer = ""

    async def read(self) -> dict[str, Any]:
        while True:
            text = self._buffer.lstrip()
            try:
                command, end = json.JSONDecoder().raw_decode(text)
            except json.JSONDecodeError:
                self._buffer = text + (await self._stream.receive()).decode()
                continue
            self._buffer = text[end:]
            return command  # type: ignore[no-any-return]


async def read_command(reader: CommandReader) -> dict[str, Any]:
    return await reader.read()


async def handshake(stream: SocketStream, reader: CommandReader) -> None:
    await stream.send(GREETING)
    command = await read_command(reader)
    await stream.send(json.dumps({"return": {}, "id": command.get("id")}).encode() + b"\n")


Script = Callable[[SocketStream, CommandReader], Awaitable[None]]


@asynccontextmanager
async def qmp_peer(script: Script) -> AsyncIterator[Path]:
    """A raw QMP peer on a unix socket running ``script`` for one client; yields the path."""
    with short_dir() as directory:
        path = directory / "qmp.sock"
        listener = await anyio.create_unix_listener(path)

        async def serve() -> None:
            async with listener, await listener.accept() as stream:
                try:
                    await script(stream, CommandReader(stream))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
                    pass  # the client hung up first

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            try:
                yield path
            finally:
                tg.cancel_scope.cancel()


async def silent(stream: SocketStream, reader: CommandReader) -> None:
    await anyio.sleep_forever()


def sends(data: bytes, *, then_close: bool = False) -> Script:
    async def script(stream: SocketStream, reader: CommandReader) -> None:
        await stream.send(data)
        if not then_close:
            await anyio.sleep_forever()

    return script


def replies(make: Callable[[dict[str, Any]], bytes], *, then_close: bool = False) -> Script:
    """Greets, negotiates, then answers the next command with ``make(command)``."""

    async def script(stream: SocketStream, reader: CommandReader) -> None:
        await handshake(stream, reader)
        await stream.send(make(await read_command(reader)))
        if not then_close:
            await anyio.sleep_forever()

    return script


def line(message: object) -> bytes:
    return json.dumps(message).encode() + b"\n"


async def refuse_negotiation(stream: SocketStream, reader: CommandReader) -> None:
    await stream.send(GREETING)
    command = await read_command(reader)
    await stream.send(line({"error": {"class": "GenericError", "desc": "no"}, "id": command.get("id")}))
    await anyio.sleep_forever()


CONNECT_CASES: dict[str, tuple[Script, type[VmctlError]]] = {
    "garbage bytes": (sends(b"\x00\xff\xfe garbage\n"), QMPDisconnected),
    "a greeting that is not JSON": (sends(b"hello, I am QEMU\n"), QMPDisconnected),
    "a greeting that is a JSON array": (sends(b"[1, 2, 3]\n"), QMPDisconnected),
    "a greeting without QMP": (sends(b'{"hello": 1}\n'), QMPDisconnected),
    "a greeting with the wrong shape": (sends(b'{"QMP": "yes"}\n'), QMPDisconnected),
    "a greeting longer than the client reads": (sends(b'{"QMP": "' + b"x" * TEN_MIB_PLUS + b'"}\n'), QMPDisconnected),
    "half a greeting, then hang up": (sends(GREETING[:30], then_close=True), QMPDisconnected),
    "hang up at once": (sends(b"", then_close=True), QMPDisconnected),
    "no greeting at all": (silent, VmctlTimeout),
    "negotiation refused": (refuse_negotiation, QMPDisconnected),
}


@pytest.mark.parametrize(("script", "error"), CONNECT_CASES.values(), ids=CONNECT_CASES.keys())
async def test_hostile_peer_at_connect_is_a_clear_error(script: Script, error: type[VmctlError]) -> None:
    sockets = socket_fd_count()
    session = QmpSession("fuzz")
    async with qmp_peer(script) as path:
        with anyio.fail_after(20), pytest.raises(error):  # a short limit only where the timeout is the point
            await session.connect(path, timeout=0.5 if error is VmctlTimeout else 10)
        assert not session.connected
    await session.close()
    await assert_no_stray_tasks()
    assert socket_fd_count() <= sockets, "a socket was left open"


EXECUTE_CASES: dict[str, tuple[Script, type[VmctlError], str]] = {
    "reply under an id nobody asked": (replies(lambda c: line({"return": {}, "id": "nobody"})), VmctlTimeout,
                                       "no reply"),
    "reply without an id": (replies(lambda c: line({"return": {}})), VmctlTimeout, "no reply"),
    "error without an id": (replies(lambda c: line({"error": {"class": "X", "desc": "y"}})), QMPDisconnected,
                            "connection lost"),
    "an id that is a list": (replies(lambda c: line({"return": {}, "id": [1]})), QMPDisconnected, "connection lost"),
    "garbage instead of a reply": (replies(lambda c: b"}}}{{{\n"), QMPDisconnected, "connection lost"),
    "a JSON number": (replies(lambda c: b"5\n"), QMPDisconnected, "connection lost"),
    "half a reply, then hang up": (replies(lambda c: line({"return": {"status": "running"}, "id": c["id"]})[:20],
                                           then_close=True), QMPDisconnected, "connection lost"),
    "an error reply of the wrong shape": (replies(lambda c: line({"error": "boom", "id": c["id"]})), QMPError,
                                          "malformed"),
    "an error reply without desc": (replies(lambda c: line({"error": {"class": "X"}, "id": c["id"]})), QMPError,
                                    "malformed"),
    "a reply longer than the client reads": (replies(lambda c: line({"return": "x" * TEN_MIB_PLUS, "id": c["id"]})),
                                             QMPDisconnected, "connection lost"),
    "nothing at all": (replies(lambda c: b""), VmctlTimeout, "no reply"),
    "hang up instead of replying": (replies(lambda c: b"", then_close=True), QMPDisconnected, "connection lost"),
}  # fmt: skip


@pytest.mark.parametrize(("script", "error", "match"), EXECUTE_CASES.values(), ids=EXECUTE_CASES.keys())
async def test_hostile_peer_replies_are_clear_errors(script: Script, error: type[VmctlError], match: str) -> None:
    sockets = socket_fd_count()
    session = QmpSession("fuzz", command_timeout=0.5 if error is VmctlTimeout else 10)
    async with qmp_peer(script) as path:
        await session.connect(path, timeout=10)
        with anyio.fail_after(20), pytest.raises(error, match=match):
            await session.execute("query-status")
        await session.close()
    await assert_no_stray_tasks()
    assert socket_fd_count() <= sockets, "a socket was left open"


@settings(max_examples=40, deadline=None)
@given(garbage=st.binary(max_size=300), after_handshake=st.booleans())
def test_random_bytes_from_the_peer_never_hang_or_crash(garbage: bytes, after_handshake: bool) -> None:
    async def script(stream: SocketStream, reader: CommandReader) -> None:
        if after_handshake:
            await handshake(stream, reader)
            await reader.read()
        await stream.send(garbage)  # and hang up

    async def main() -> None:
        session = QmpSession("fuzz", command_timeout=0.5)
        async with qmp_peer(script) as path:
            with anyio.fail_after(10):
                try:
                    await session.connect(path, timeout=0.5)
                    await session.execute("query-status")
                except VmctlError as exc:
                    assert str(exc)
            await session.close()
        await assert_no_stray_tasks()

    anyio.run(main)


async def test_events_with_bad_data_keep_the_stream_going() -> None:
    events = [
        b'{"event": "RTC_CHANGE", "data": [1, 2], "timestamp": "now"}\n',
        b'{"event": "RTC_CHANGE", "data": "text", "timestamp": {"seconds": "x"}}\n',
        b'{"event": "RTC_CHANGE", "data": null, "timestamp": {"seconds": 1e999, "microseconds": []}}\n',
        b'{"event": 5, "timestamp": 7}\n',
        b'{"event": "STOP", "data": {"ok": true}, "timestamp": {"seconds": 10, "microseconds": 500000}}\n',
    ]

    async def script(stream: SocketStream, reader: CommandReader) -> None:
        await handshake(stream, reader)
        await stream.send(b"".join(events))
        await anyio.sleep_forever()

    session = QmpSession("fuzz")
    async with qmp_peer(script) as path:
        await session.connect(path)
        received = []
        with anyio.fail_after(5):
            async for event in session.events():
                received.append(event)
                if event.name == "STOP":
                    break
        held = sum(listener._queue.qsize() for listener in session._client._listeners)  # noqa: SLF001
        await session.close()
    assert held == 0, "events already read are still held by the QMP client (memory grows forever)"
    assert [e.name for e in received] == ["RTC_CHANGE", "RTC_CHANGE", "RTC_CHANGE", "5", "STOP"]
    assert [dict(e.data) for e in received[:4]] == [{}, {}, {}, {}]
    assert received[-1].data == {"ok": True} and received[-1].timestamp == 10.5


# -- the same faults against a whole sandbox (FakeQemu's fault hooks) --------------------------


@pytest.mark.parametrize("fault", ["wrong-id", "no-id"])
async def test_lost_reply_is_a_timeout_and_the_sandbox_follows_qemus_events(tmp_path: Path, fault: str) -> None:
    fake = FakeQemu(reply_faults={"stop": fault})  # type: ignore[dict-item]
    async with Sandbox(fake_config(tmp_path), backend=fake) as sb:
        with pytest.raises(VmctlTimeout, match="pause"):
            await sb.pause(timeout=0.3)
        assert sb.state is SandboxState.PAUSED, "QEMU's STOP event still counts"
        await sb.resume()
        assert sb.state is SandboxState.RUNNING and sb.failure == ""
        assert (await sb.exec(["echo", "fine"])).stdout == b"fine\n"
    assert sb.state is SandboxState.STOPPED
    await assert_no_stray_tasks()


@pytest.mark.parametrize("fault", ["garbage", "truncate", "huge"])
async def test_broken_reply_fails_the_sandbox_with_a_clear_error(tmp_path: Path, fault: str) -> None:
    fake = FakeQemu(reply_faults={"stop": fault})  # type: ignore[dict-item]
    async with Sandbox(fake_config(tmp_path), backend=fake) as sb:
        with anyio.fail_after(10), pytest.raises((SandboxFailed, QMPDisconnected)):
            await sb.pause()
        assert await sb.wait_for_state(SandboxState.FAILED, timeout=10) is SandboxState.FAILED
        assert "QMP" in sb.failure
        with pytest.raises(SandboxFailed):
            await sb.exec(["true"])
        assert sb.hypervisor.agent.pending == 0
    await assert_no_stray_tasks()


async def test_malformed_events_do_not_fail_the_sandbox(tmp_path: Path) -> None:
    fake = FakeQemu()
    async with Sandbox(fake_config(tmp_path, block_driver="virtio-blk"), backend=fake) as sb:
        for raw in (b'{"event": "ACPI_DEVICE_OST", "data": {"info": "junk"}}\n',
                    b'{"event": "ACPI_DEVICE_OST", "data": [1]}\n',
                    b'{"event": "DEVICE_DELETED", "data": {"device": ["x"]}}\n',
                    b'{"event": "RTC_CHANGE", "timestamp": {"seconds": "soon"}}\n'):  # fmt: skip
            await fake.send_raw(raw)
        await fake.send_raw(b'{"event": "STOP", "data": [], "timestamp": "now"}\n')
        assert await sb.wait_for_state(SandboxState.PAUSED, timeout=5) is SandboxState.PAUSED
        assert sb.failure == ""
        await sb.resume()
        assert (await sb.exec(["echo", "ok"])).stdout == b"ok\n"
    assert sb.state is SandboxState.STOPPED
    await assert_no_stray_tasks()


def test_a_guest_error_message_is_kept_only_up_to_its_cap() -> None:
    """An ERROR frame may carry up to 1 MiB; the exception that reaches the caller keeps 4 KiB."""
    errno, message = proto.parse_error(proto.i32(5) + b"m" * proto.MAX_PAYLOAD)
    assert errno == 5 and len(message) == proto.MAX_MESSAGE
