"""Every JSON decode of peer input bounds nesting depth before decoding (issue 9.1)."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.sv1.client import ClientSession
from bridge.sv1.events import ProtocolViolation
from bridge.sv1.framing import (
    MAX_JSON_DEPTH,
    BoundedDecoder,
    decode_json,
    json_too_deep,
)
from bridge.sv1.server import ServerSession
from bridge.wire.control import ControlDecodeError, decode_line, decode_params

BRIDGE = Path(__file__).resolve().parents[2] / "bridge"


def reference_depth(data: bytes) -> int:
    """The deepest nesting a JSON parser would reach, byte by byte (strings skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab', max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"\\a', max_size=4), children, max_size=3)
    ),
    max_leaves=60,
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(value=json_values, limit=st.integers(0, 12))
def test_the_depth_check_is_exact_for_valid_json(value, limit) -> None:
    data = msgspec.json.encode(value)
    assert json_too_deep(data, limit) == (reference_depth(data) > limit)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(data=st.binary(max_size=300) | st.text(alphabet='[]{}"\\,:a1 ', max_size=300).map(str.encode), limit=st.integers(0, 12))
def test_the_depth_check_never_underestimates_garbage(data, limit) -> None:
    # What a parser would reach before failing is at most the deepest unclosed prefix.
    if reference_depth(data) > limit:
        assert json_too_deep(data, limit)


def test_depth_at_the_limit_decodes_and_one_more_is_refused_before_decoding() -> None:
    at_limit = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert decode_json(at_limit) is not None
    with pytest.raises(msgspec.DecodeError, match="nested deeper than 32 levels"):
        decode_json(b"[" + at_limit + b"]")
    with pytest.raises(msgspec.DecodeError, match="nested deeper"):
        decode_json(b"[" * 100_000)  # unclosed counts
    with pytest.raises(msgspec.DecodeError, match="exceeds the 10-byte limit"):
        BoundedDecoder(max_size=10).decode(b"[1,2,3,4,5,6]")
    # Brackets inside strings are text, not nesting.
    assert decode_json(b'["' + b"[" * 5000 + b'"]') == ["[" * 5000]


def test_a_deep_line_is_a_fatal_violation_for_the_pool_side_and_the_rig_side() -> None:
    deep = b'{"id":1,"method":"mining.subscribe","params":' + b"[" * 1000 + b"]" * 1000 + b"}\n"
    events = ServerSession().receive_data(deep)
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation) and events[0].fatal
    assert "nested deeper than 32 levels" in events[0].reason
    events = ClientSession().receive_data(b'{"id":1,"result":' + b"[" * 1000 + b"]" * 1000 + b',"error":null}\n')
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation) and events[0].fatal


def test_a_deep_control_line_is_a_control_decode_error() -> None:
    with pytest.raises(ControlDecodeError, match="nested deeper"):
        decode_line(b'{"id":' + b"[" * 2000 + b"]" * 2000 + b',"method":"rm.hello","params":{}}')
    with pytest.raises(ControlDecodeError, match="nested deeper"):
        decode_params("rm.results", msgspec.Raw(b'{"v":' + b"[" * 2000 + b"]" * 2000 + b"}"))


def test_no_module_decodes_json_without_the_bounds() -> None:
    """By construction: the only unbounded decoder is the one inside BoundedDecoder."""
    raw = re.compile(r"msgspec\.(json|msgpack)\.(decode\(|Decoder\()|\bjson\.loads?\(|\bpickle\.loads?\(")
    offenders = [
        f"{path.relative_to(BRIDGE.parent)}:{number}: {line.strip()}"
        for path in sorted(BRIDGE.rglob("*.py"))
        if path != BRIDGE / "sv1" / "framing.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if raw.search(line)
    ]
    assert not offenders, "decode peer input with bridge.sv1.framing.BoundedDecoder / decode_json:\n" + "\n".join(offenders)
