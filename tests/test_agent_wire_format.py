"""The two ends of the agent protocol agree: the C agent's frame types and sizes are the values
``vmctl.agent.protocol`` uses. The C side numbers most types by enum increments, so a type added or
moved there shifts the ones after it; this test reads the C source as the compiler would."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vmctl.agent import protocol as proto
from vmctl.agent.protocol import FrameType

AGENT_SOURCE = Path(proto.__file__).parents[1] / "guest" / "files" / "vmctl-agent.c"


def c_frame_types(source: str) -> dict[str, int]:
    """``T_NAME`` -> value for the first C enum that declares ``T_`` names (implicit values follow
    the one before, as in C)."""
    match = re.search(r"enum\s*\{([^}]*\bT_[A-Z]+[^}]*)\}", source)
    assert match, "no enum of T_ frame types in the agent's source"
    body = re.sub(r"/\*.*?\*/", "", match.group(1), flags=re.DOTALL)
    values: dict[str, int] = {}
    nxt = 0
    for item in (part.strip() for part in body.split(",")):
        if not item:
            continue
        name, _, value = (s.strip() for s in item.partition("="))
        nxt = int(value, 0) if value else nxt
        values[name] = nxt
        nxt += 1
    return values


def c_defines(source: str) -> dict[str, int]:
    """Numeric ``#define``s of the forms the agent uses: ``16``, ``(1u << 20)``, ``(256 * 1024)``."""
    out = {}
    for name, expr in re.findall(r"^#define\s+([A-Z_]+)\s+([0-9xu*<() ]+?)\s*$", source, re.MULTILINE):
        expr = expr.strip("() ").replace("u", "")
        if "<<" in expr:
            base, shift = (int(x, 0) for x in expr.split("<<"))
            out[name] = base << shift
        elif "*" in expr:
            left, right = (int(x, 0) for x in expr.split("*"))
            out[name] = left * right
        else:
            out[name] = int(expr, 0)
    return out


def test_the_c_agent_and_agentproto_number_every_frame_type_alike() -> None:
    from_c = c_frame_types(AGENT_SOURCE.read_text())
    from_python = {f"T_{member.name}": member.value for member in FrameType}
    assert from_c == from_python


@pytest.mark.parametrize(("c_name", "value"), [("HDR", proto.HEADER_SIZE), ("MAX_PAYLOAD", proto.MAX_PAYLOAD),
                                               ("CHUNK", proto.CHUNK), ("STDIN_WINDOW", proto.STDIN_WINDOW),
                                               ("VERSION", proto.PROTOCOL_VERSION)])  # fmt: skip
def test_the_c_agent_and_agentproto_agree_on_sizes(c_name: str, value: int) -> None:
    assert c_defines(AGENT_SOURCE.read_text())[c_name] == value


def test_the_enum_reader_follows_implicit_values_as_c_does() -> None:
    """The reader must fail on a real mismatch: a type inserted in the middle shifts the rest."""
    shifted = c_frame_types("enum { T_PING = 0x01, T_NEW, T_SPAWN, /* c */ T_READY = 0x40, T_PONG };")
    assert shifted == {"T_PING": 1, "T_NEW": 2, "T_SPAWN": 3, "T_READY": 0x40, "T_PONG": 0x41}
    assert shifted["T_SPAWN"] != FrameType.SPAWN
