"""Property tests of the wire protocol (pscnn/protocol.py) with hypothesis.

* every message type round-trips through encode and decode, with any valid fields and arrays;
* encode refuses what decode would, and what msgpack cannot write, with a ProtocolError;
* whatever else arrives (random bytes, broken msgpack, wrong header or body fields, wrong
  frames, array specs that lie), decode raises ProtocolError with one short printable line,
  never another exception, and never allocates what a header declares but no frame holds.

Reproducible: derandomize=True (the same examples on every run) and no example database
(hypothesis's cache goes to a temporary folder: tests/conftest.py).  The server's side is
tests/test_server_fuzz.py.
"""
from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cnn_core.flat import FlatArrays
from pscnn import protocol as P
from test_protocol import FULL_BODIES

FUZZ = settings(deadline=None, derandomize=True, database=None, max_examples=300,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

MSGPACK_INTS = st.integers(-(2**63), 2**64 - 1)         # what msgpack can carry
CODES = {"bad_message", "bad_version", "unknown_type", "too_large"}


# ---------------------------------------------------------------- valid messages

def _line(max_size: int = 40):
    """Printable text: what a 'line' field, a wid or a name may hold (str.isprintable)."""
    return st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")),
                   max_size=max_size).filter(str.isprintable)


def _plain_values():
    """Values a map or list field may hold that compare equal after a msgpack round trip (no NaN)."""
    leaves = (st.none() | st.booleans() | MSGPACK_INTS | st.floats(allow_nan=False)
              | st.text(st.characters(codec="utf-8"), max_size=20) | st.binary(max_size=20))
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=8), inner, max_size=3),
                        max_leaves=8)


FINITE = MSGPACK_INTS | st.floats(allow_nan=False, allow_infinity=False)
FIELD_VALUES = {
    "int": MSGPACK_INTS,
    "float": FINITE,
    "float_or_nil": st.none() | FINITE,
    "str": st.text(st.characters(codec="utf-8"), max_size=60),
    "line": _line(60),
    "bool": st.booleans(),
    "dict": st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=8), _plain_values(), max_size=4),
    "list": st.lists(_plain_values(), max_size=4),
}


@st.composite
def valid_bodies(draw, mtype: str) -> dict:
    """Any body ``mtype``'s schema admits, optional fields present or not."""
    body = {}
    for name, (kind, required) in P.SCHEMAS[mtype].items():
        if required or draw(st.booleans()):
            body[name] = draw(FIELD_VALUES[kind])
    if mtype == P.HELLO:
        body["role"] = draw(st.sampled_from(P.ROLES))
    if mtype == P.PUSH:
        body["count"] = draw(st.integers(1, 2**64 - 1))
        body["correct"] = draw(st.integers(0, body["count"]))
        body["timing"] = draw(st.dictionaries(st.sampled_from(P.TIMING_FIELDS),
                                              st.integers(0, 2**64 - 1) | st.floats(0, allow_infinity=False)))
    return body


NAMES = st.text(st.characters(codec="utf-8"), min_size=1, max_size=P.MAX_NAME_LEN)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=8, min_side=0, max_side=3)


@st.composite
def valid_arrays(draw) -> dict:
    """name -> array of any allowed dtype and shape (zero-size and 0-d included), at most 6 of them."""
    names = draw(st.lists(NAMES, max_size=6, unique=True))
    return {name: draw(hnp.arrays(st.sampled_from(P.ALLOWED_DTYPES), SHAPES)) for name in names}


@st.composite
def valid_messages(draw) -> P.Message:
    mtype = draw(st.sampled_from(sorted(P.SCHEMAS)))
    arrays = draw(valid_arrays())
    if arrays and len({a.dtype for a in arrays.values()}) == 1 and draw(st.booleans()):
        arrays = FlatArrays.pack(arrays)        # the zero-copy path: a model's buffer as it is
    return P.Message(mtype, draw(_line(P.MAX_NAME_LEN)), draw(st.integers(0, 2**64 - 1)), draw(valid_bodies(mtype)),
                     arrays)


def _wire(frames) -> list[bytes]:
    """Frames as a peer receives them: bytes."""
    return [bytes(memoryview(f)) for f in frames]


def test_every_message_type_can_be_generated():
    """valid_bodies knows every type, and every body it makes for one passes its schema."""
    for mtype in P.SCHEMAS:
        @settings(FUZZ, max_examples=5)
        @given(valid_bodies(mtype))
        def check(body):
            P._check_body(mtype, body)
        check()


@FUZZ
@given(valid_messages())
@example(P.Message(P.ACK, arrays={"z": np.zeros((0, 3), np.uint8), "s": np.array(7, np.int64)}))
@example(P.Message(P.PUSH, "w" * P.MAX_NAME_LEN, 2**64 - 1, dict(FULL_BODIES[P.PUSH], loss=None),
                   {"n" * P.MAX_NAME_LEN: np.full((1,) * 8, np.nan, np.float32)}))
def test_every_valid_message_round_trips(msg):
    out = P.decode(_wire(P.encode(msg)))
    assert (out.type, out.wid, out.seq, out.body) == (msg.type, msg.wid, msg.seq, msg.body)
    assert list(out.arrays) == list(msg.arrays)
    for name, sent in msg.arrays.items():
        got = out.arrays[name]
        assert (got.dtype, got.shape) == (sent.dtype, sent.shape)
        assert got.tobytes() == sent.tobytes()          # bit for bit: NaN payloads and -0.0 too
        assert not got.flags.writeable
    assert isinstance(out.arrays, FlatArrays) == (len({a.dtype for a in msg.arrays.values()}) == 1)


UNICODE = st.text(st.characters(codec=None, categories=None), max_size=8)      # lone surrogates included
ODD_VALUES = st.integers() | UNICODE | st.sets(st.integers(), max_size=2) | st.floats() | st.none()


@FUZZ
@given(valid_messages(), st.sampled_from(["type", "wid", "seq", "body", "name"]), ODD_VALUES)
@example(P.Message(P.PULL, body={"have_version": 0}), "seq", -1)
@example(P.Message(P.PULL, body={"have_version": 0}), "seq", 2**64)
@example(P.Message(P.PULL, body={"have_version": 0}), "wid", "\n")
@example(P.Message(P.PULL, body={"have_version": 0}), "type", "nope")
@example(P.Message(P.PULL, body={"have_version": 0}), "body", 2**64)
@example(P.Message(P.ACK), "name", "\ud800")
@example(P.Message(P.STATUS), "body", {1, 2})
def test_encode_sends_what_decode_takes_or_refuses_with_a_protocol_error(msg, part, value):
    """A sender's mistake is a ProtocolError naming it (not a KeyError, OverflowError,
    UnicodeEncodeError or TypeError from msgpack), and never a message its receiver refuses."""
    if part == "name":
        msg.arrays = {value: np.zeros(1, np.float32)} if isinstance(value, str) and value else msg.arrays
    elif part == "body":
        fields = sorted(P.SCHEMAS.get(msg.type, {})) or ["progress"]
        msg.body = {**msg.body, fields[0]: value}
    else:
        setattr(msg, part, value)
    try:
        frames = P.encode(msg)
    except P.ProtocolError as exc:
        assert str(exc) and "\n" not in str(exc) and len(str(exc)) <= 300, str(exc)
        return
    out = P.decode(_wire(frames))
    assert (out.type, out.wid, out.seq) == (msg.type, msg.wid, msg.seq)


# ---------------------------------------------------------------- malformed messages

def assert_refused(frames) -> P.ProtocolError:
    """decode(frames) raises ProtocolError with a known code and one short printable line; returns it."""
    try:
        msg = P.decode(frames)
    except P.ProtocolError as exc:
        text = str(exc)
        assert exc.code in CODES, (exc.code, text)
        assert text and len(text) <= 300 and text.isprintable(), repr(text)
        return exc
    raise AssertionError(f"decode accepted {msg!r} from {[bytes(f)[:60] for f in frames]}")


def decodes_or_is_refused(frames) -> None:
    """decode(frames) returns a valid Message or raises ProtocolError as assert_refused checks."""
    try:
        msg = P.decode(frames)
    except P.ProtocolError:
        assert_refused(frames)
        return
    assert msg.type in P.SCHEMAS and isinstance(msg.body, dict)


ANY_VALUE = st.recursive(
    st.none() | st.booleans() | MSGPACK_INTS | st.floats() | st.text(st.characters(codec="utf-8"), max_size=30)
    | st.binary(max_size=30) | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4) | st.sampled_from(["v", "type", "body"]),
                      inner, max_size=4),
    max_leaves=12)
PAYLOADS = st.lists(st.binary(max_size=64), max_size=3)


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=4))
@example([])
@example([b""])
@example([b"\xc1"])
def test_random_bytes_are_refused(frames):
    decodes_or_is_refused(frames)


@FUZZ
@given(ANY_VALUE, PAYLOADS)
def test_any_msgpack_value_as_a_header_is_refused_or_valid(header, payloads):
    decodes_or_is_refused([msgpack.packb(header, use_bin_type=True), *payloads])


HEADER_KEYS = ("v", "type", "wid", "seq", "body", "arrays")
# What an error about each header key says (one of them)
HEADER_KEY_WORDS = {"v": ["protocol version"], "type": ["message type"], "wid": ["'wid'"], "seq": ["'seq'"],
                    "body": ["body", "field"], "arrays": ["array", "payload frame"]}


def _header_of(msg: P.Message) -> dict:
    return msgpack.unpackb(P.encode(msg)[0], raw=False)


def _pack(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


@FUZZ
@given(valid_messages(), st.sampled_from(HEADER_KEYS), ANY_VALUE)
@example(P.Message(P.PULL, body={"have_version": 0}), "v", math.nan)
@example(P.Message(P.PULL, body={"have_version": 0}), "v", math.inf)
@example(P.Message(P.PULL, body={"have_version": 0}), "v", float(P.PROTOCOL_VERSION))
@example(P.Message(P.PULL, body={"have_version": 0}), "seq", math.nan)
@example(P.Message(P.PULL, body={"have_version": 0}), "wid", "w" * (P.MAX_NAME_LEN + 1))
def test_a_header_field_of_any_other_value_is_refused_naming_it_or_valid(msg, key, value):
    header = _header_of(msg)
    header[key] = value
    frames = [_pack(header), *_wire(P.encode(msg)[1:])]
    try:
        P.decode(frames)
    except P.ProtocolError:
        if not (key == "type" and isinstance(value, str) and value in P.SCHEMAS):     # its fields are wrong
            assert any(word in str(assert_refused(frames)) for word in HEADER_KEY_WORDS[key]), (key, value)


@FUZZ
@given(valid_messages(), st.sampled_from(HEADER_KEYS) | st.text(max_size=8) | st.binary(max_size=4), ANY_VALUE,
       st.booleans())
def test_a_header_key_missing_or_added_is_refused_or_valid(msg, key, value, drop):
    header = _header_of(msg)
    if drop:
        header.pop(key, None)
    else:
        header[key] = value
    decodes_or_is_refused([_pack(header), *_wire(P.encode(msg)[1:])])


@FUZZ
@given(valid_messages(), st.data())
def test_a_body_field_of_the_wrong_kind_is_refused_naming_it(msg, data):
    """Any value a field's kind does not admit is refused, and the error names the field."""
    schema = P.SCHEMAS[msg.type]
    if not schema:
        return
    name = data.draw(st.sampled_from(sorted(schema)))
    value = data.draw(ANY_VALUE.filter(lambda v: not P._CHECKS[schema[name][0]](v)))
    header = _header_of(msg)
    header["body"][name] = value
    err = assert_refused([_pack(header), *_wire(P.encode(msg)[1:])])
    assert repr(name) in str(err), str(err)


@FUZZ
@given(valid_messages(), st.text(max_size=12) | st.binary(max_size=4), ANY_VALUE)
def test_an_unknown_body_field_is_refused(msg, name, value):
    if name in P.SCHEMAS[msg.type]:
        return
    header = _header_of(msg)
    header["body"][name] = value
    err = assert_refused([_pack(header), *_wire(P.encode(msg)[1:])])
    assert "unknown fields" in str(err)


@FUZZ
@given(valid_messages(), st.data())
def test_a_required_body_field_missing_is_refused_naming_it(msg, data):
    required = sorted(n for n, (_, req) in P.SCHEMAS[msg.type].items() if req)
    if not required:
        return
    name = data.draw(st.sampled_from(required))
    header = _header_of(msg)
    del header["body"][name]
    err = assert_refused([_pack(header), *_wire(P.encode(msg)[1:])])
    assert f"missing field {name!r}" in str(err)


@FUZZ
@given(valid_messages(), st.data())
def test_frames_added_dropped_or_resized_are_refused(msg, data):
    frames = _wire(P.encode(msg))
    how = data.draw(st.sampled_from(["add", "drop", "resize"]))
    if how == "add":
        frames.insert(data.draw(st.integers(1, len(frames))), data.draw(st.binary(max_size=16)))
    elif how == "drop" and len(frames) > 1:
        del frames[data.draw(st.integers(1, len(frames) - 1))]
    elif how == "resize" and len(frames) > 1:
        i = data.draw(st.integers(1, len(frames) - 1))
        delta = data.draw(st.integers(-len(frames[i]), 16).filter(lambda d: d != 0))
        frames[i] = frames[i][:delta] if delta < 0 else frames[i] + bytes(delta)
    else:
        return
    err = assert_refused(frames)
    assert "frame" in str(err), str(err)


@FUZZ
@given(valid_messages(), st.data())
def test_a_truncated_or_corrupted_header_is_refused_or_valid(msg, data):
    frames = _wire(P.encode(msg))
    header = bytearray(frames[0])
    if data.draw(st.booleans()):
        header = header[:data.draw(st.integers(0, len(header) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            header[data.draw(st.integers(0, len(header) - 1))] = data.draw(st.integers(0, 255))
    decodes_or_is_refused([bytes(header), *frames[1:]])


# ---------------------------------------------------------------- array specs that lie

DIMS = st.integers(-(2**63), 2**64 - 1) | st.integers(-3, 3) | st.sampled_from([2**31 - 1, 2**31, 2**62]) \
    | st.booleans() | st.floats() | st.text(max_size=3) | st.none()
OVERLONG_NAMES = st.text(min_size=P.MAX_NAME_LEN + 1, max_size=3 * P.MAX_NAME_LEN)
HOSTILE_SPECS = st.lists(st.one_of(
    st.tuples(NAMES | OVERLONG_NAMES | ANY_VALUE, st.sampled_from(P.ALLOWED_DTYPES) | ANY_VALUE,
              st.lists(DIMS, max_size=10) | ANY_VALUE).map(list),
    ANY_VALUE), max_size=4)


@FUZZ
@given(HOSTILE_SPECS, PAYLOADS)
@example([["g", "float32", [0, 2**31 - 1, 2**31 - 1, 2**31 - 1]]], [b""])     # NumPy's "array is too big"
@example([["g", "float64", [2**31 - 1] * 3 + [0]]], [b""])                   # NumPy's "cannot reshape"
@example([["g", "float32", [-1]]], [b""])
@example([["g", "float32", [2**31 - 1] * 8]], [b""])
@example([["\udc80", "float32", [1]]], [b"\0" * 4])
def test_array_specs_that_lie_are_refused_without_allocating_what_they_declare(specs, payloads):
    """Frames of at most 64 bytes, whatever the header declares: decode takes under a megabyte."""
    try:
        header = _pack({"v": P.PROTOCOL_VERSION, "type": P.ACK, "body": {}, "arrays": specs})
    except (UnicodeEncodeError, OverflowError):
        return                                  # not sendable: msgpack refuses it on the way out
    tracemalloc.start()
    try:
        decodes_or_is_refused([header, *payloads])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"decode took {peak} bytes"


def test_a_name_that_is_not_utf8_is_refused():
    """msgpack strings must be UTF-8: a name (or wid, or type) of other bytes is a msgpack error."""
    placeholder = "\x01" * 4
    for key in ("wid", "name", "type"):
        header = {"v": P.PROTOCOL_VERSION, "type": placeholder if key == "type" else P.ACK,
                  "wid": placeholder if key == "wid" else "w", "body": {},
                  "arrays": [[placeholder if key == "name" else "g", "uint8", [1]]]}
        packed = _pack(header).replace(placeholder.encode(), b"\xff\xfe\xc0\x80")
        err = assert_refused([packed, b"\0"])
        assert "msgpack" in str(err) and "utf-8" in str(err).lower(), str(err)


@pytest.mark.parametrize("shape", [[2**31 - 1] * 8, [2**30, 2**30], [P.MAX_MESSAGE_BYTES + 1]])
def test_a_huge_declared_array_is_refused_before_any_allocation(shape):
    header = _pack({"v": P.PROTOCOL_VERSION, "type": P.ACK, "body": {}, "arrays": [["g", "uint8", shape]]})
    tracemalloc.start()
    try:
        err = assert_refused([header, b""])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.code == "too_large" and peak < 1 << 20


def test_hypothesis_keeps_its_cache_out_of_the_repository():
    """hypothesis wrote its cache (.hypothesis/constants/) in the working folder, the clone, even
    with database=None: tests/conftest.py now points its storage at a temporary folder."""
    from hypothesis.configuration import storage_directory
    repository = Path(__file__).resolve().parent.parent
    cache = storage_directory("constants", intent_to_write=False).path.resolve()
    assert not cache.is_relative_to(repository), cache
