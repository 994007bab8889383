"""Unit tests of the wire protocol (pscnn/protocol.py): round trips and every validation path.

No sockets except one in-process ZeroMQ pair (zero-copy receive); no server.
"""
from __future__ import annotations

import math
import re

import msgpack
import numpy as np
import pytest
import zmq

from cnn_core.flat import FlatArrays, same_layout
from pscnn import protocol as P
from helpers import one_line_naming

PUSH_BODY = {"epoch": 0, "batch": 3, "lease": 7, "base_version": 2, "loss": 2.25, "correct": 10, "count": 64,
             "timing": {"compute_s": 0.5, "comm_s": 0.01, "wait_s": 0.0}}

# One valid body per message type, with every optional field present.
FULL_BODIES = {
    P.HELLO: {"role": "trainer", "name": "w0", "pid": 123, "host": "h", "device": "cpu"},
    P.WELCOME: {"worker_id": "w0-1", "role": "trainer", "model": {"layers": [{"type": "relu"}]},
                "run": {"seed": 0}, "incarnation": "abc", "heartbeat_s": 2},
    P.WORK: {},
    P.PUSH: PUSH_BODY,
    P.TASK: {"version": 5, "epoch": 1, "batch": 2, "lease": 9, "held_s": 0.0, "ack": {"applied": True}},
    P.WAIT: {"retry_s": 0.05, "held_s": 1.5, "reason": "epoch draining", "ack": {"applied": False}},
    P.PULL: {"have_version": -1},
    P.WEIGHTS: {"version": 3, "epoch": 0, "done": False, "updates": 3, "scored": True},
    P.EVAL_REPORT: {"version": 3, "final": True, "metrics": {"test_accuracy": 0.9, "test_loss": 0.3}},
    P.HEARTBEAT: {"version": 1, "done": False},
    P.STATUS: {"progress": {"version": 1, "loss": None}},
    P.BYE: {"reason": "done"},
    P.ACK: {"ack": {"applied": True, "staleness": 0}},
    P.STOP: {"version": 10, "reason": "training finished", "ack": {"applied": True}},
    P.ERROR: {"code": "bad_message", "message": "nope"},
}


def _minimal(mtype: str) -> dict:
    return {k: v for k, v in FULL_BODIES[mtype].items() if P.SCHEMAS[mtype][k][1]}


def test_every_schema_has_a_test_body():
    assert set(FULL_BODIES) == set(P.SCHEMAS)


@pytest.mark.parametrize("mtype", sorted(P.SCHEMAS))
@pytest.mark.parametrize("which", ["full", "minimal"])
def test_round_trip_every_type(mtype, which):
    body = FULL_BODIES[mtype] if which == "full" else _minimal(mtype)
    msg = P.Message(mtype, "worker-1", 42, body, {"a": np.arange(6, dtype=np.float32).reshape(2, 3)})
    frames = P.encode(msg)
    assert len(frames) == 2
    out = P.decode([bytes(memoryview(f)) for f in frames])
    assert (out.type, out.wid, out.seq, out.body) == (mtype, "worker-1", 42, body)
    np.testing.assert_array_equal(out.arrays["a"], msg.arrays["a"])


@pytest.mark.parametrize("dtype", P.ALLOWED_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (2, 3, 4), (1,) * 8])
def test_round_trip_arrays(dtype, shape):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal(shape) * 100).astype(dtype)
    frames = P.encode(P.Message(P.ACK, arrays={"x": arr}))
    out = P.decode([bytes(memoryview(f)) for f in frames]).arrays["x"]
    assert out.dtype == np.dtype(dtype) and out.shape == shape
    np.testing.assert_array_equal(out, arr)
    assert not out.flags.writeable


def test_round_trip_many_arrays_keeps_order_and_non_contiguous_input():
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    arrays = {"t": base.T, "s": base[:, ::2], "z": np.zeros(0, np.uint8), "i": np.array(7, np.int64)}
    out = P.decode([bytes(memoryview(f)) for f in P.encode(P.Message(P.ACK, arrays=arrays))]).arrays
    assert list(out) == ["t", "s", "z", "i"]
    for k, v in arrays.items():
        assert out[k].shape == v.shape
        np.testing.assert_array_equal(out[k], v)


def test_one_payload_frame_per_dtype_in_header_order():
    arrays = {"a": np.array([1, 2], np.float32), "i": np.array([7], np.int64), "b": np.array([3, 4, 5], np.float32)}
    frames = P.encode(P.Message(P.ACK, arrays=arrays))
    assert len(frames) == 3                     # header, the float32 payload, the int64 payload
    np.testing.assert_array_equal(np.frombuffer(frames[1], np.float32), [1, 2, 3, 4, 5])
    out = P.decode([bytes(memoryview(f)) for f in frames]).arrays
    assert list(out) == ["a", "i", "b"] and not isinstance(out, FlatArrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(out[k], v)


def test_payload_frames_that_do_not_fit_the_header_are_counted_in_agreement():
    """It said "1 arrays of 1 dtype(s), so expects 1 payload frames" and "1 float32 array(s) ... need"."""
    one = [bytes(memoryview(f)) for f in P.encode(P.Message(P.ACK, arrays={"a": np.array([1, 2], np.float32)}))]
    two = [bytes(memoryview(f)) for f in P.encode(P.Message(P.ACK, arrays={
        "a": np.array([1, 2], np.float32), "b": np.array([3], np.float32), "i": np.array([7], np.int64)}))]
    for frames, said in [
            (one[:1], "ack: header describes 1 array of 1 dtype, so expects 1 payload frame (one per dtype), got 0"),
            (two[:2], "ack: header describes 3 arrays of 2 dtypes, so expects 2 payload frames (one per dtype), got 1"),
            ([one[0], one[1][:4]], "ack: 1 float32 array ('a' ...) needs 8 bytes, frame has 4"),
            ([two[0], two[1][:4], two[2]], "ack: 2 float32 arrays ('a' ...) need 12 bytes, frame has 4")]:
        with pytest.raises(P.ProtocolError) as exc:
            P.decode(frames)
        assert str(exc.value) == said


def test_flat_arrays_travel_as_their_buffer_and_arrive_flat():
    model = FlatArrays.pack({"w": np.ones((3, 2), np.float32), "b": np.arange(2, dtype=np.float32)})
    frames = P.encode(P.Message(P.ACK, arrays=model))
    assert len(frames) == 2 and frames[1] is model.flat        # no copy on the way out
    out = P.decode([bytes(memoryview(f)) for f in frames]).arrays
    assert isinstance(out, FlatArrays) and same_layout(out, model)
    np.testing.assert_array_equal(out.flat, model.flat)
    assert not out.flat.flags.writeable and not out["w"].flags.writeable


@pytest.fixture
def pair(request):
    """Two connected inproc PAIR sockets (sender, receiver), closed afterwards."""
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    address = f"inproc://test-protocol-{request.node.name}"
    a.bind(address)
    b.connect(address)
    yield a, b
    a.close(linger=0)
    b.close(linger=0)


def test_zero_copy_read_only_views_over_zmq(pair):
    a, b = pair
    big = np.arange(100_000, dtype=np.float32)      # large enough to be sent as its own zmq buffer
    P.send(a, P.Message(P.WEIGHTS, "", 1, FULL_BODIES[P.WEIGHTS],
                        {"w": big, "s": np.array(2.5, np.float32), "e": np.zeros((0, 4), np.int32)}))
    assert b.poll(5000)
    frames = b.recv_multipart(copy=False)
    msg = P.decode(frames)
    w = msg.arrays["w"]
    np.testing.assert_array_equal(w, big)
    assert msg.arrays["s"].shape == () and float(msg.arrays["s"]) == 2.5
    assert msg.arrays["e"].shape == (0, 4)
    for arr in msg.arrays.values():
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[...] = 0
    # a view of the received frame, not a copy
    assert np.shares_memory(w, np.frombuffer(frames[1].buffer, dtype=np.uint8))


def test_recv_message_keeps_at_most_max_frames_and_counts_them_all(pair):
    a, b = pair
    good = P.encode(P.Message(P.WEIGHTS, "", 1, FULL_BODIES[P.WEIGHTS],
                              {"w": np.arange(3, dtype=np.float32), "i": np.arange(2)}))
    a.send_multipart(good)
    assert b.poll(5000)
    frames, count = P.recv_message(b)
    assert count == len(good) == 3 and [f.bytes for f in frames] == [bytes(g) for g in good]
    assert P.decode_message(frames, count).arrays["i"].tolist() == [0, 1]
    for extra, routed in ((5000, False), (P.MAX_FRAMES, False), (P.MAX_FRAMES, True)):
        a.send_multipart([b"id"] * routed + [good[0]] + [b""] * extra)
        assert b.poll(5000)
        frames, count = P.recv_message(b, routed=routed)
        assert count == 1 + routed + extra and len(frames) == P.MAX_FRAMES + routed
        error = P.too_many_frames(count, routed=routed)
        assert error.code == "too_large" and str(error).endswith(f"got {1 + extra}")
        if not routed:
            with pytest.raises(P.ProtocolError, match=f"at most {P.MAX_FRAMES} frames"):
                P.decode_message(frames, count)
    assert P.too_many_frames(P.MAX_FRAMES) is None and P.too_many_frames(P.MAX_FRAMES + 1, routed=True) is None
    assert not b.poll(50)                       # every frame of every message was taken


def test_ipv6_endpoints_bind_and_connect():
    """ZeroMQ speaks IPv4 only unless told: without zmq.IPV6 a bind to [::1] fails and a connect waits forever."""
    from pscnn.launcher import free_port
    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        endpoint = f"tcp://[::1]:{free_port()}"
        try:
            P.bind(router, endpoint)
        except P.EndpointError as exc:
            if "No such device" in str(exc):
                raise AssertionError(f"IPV6 not set on the socket: {exc}") from None
            pytest.skip(f"no IPv6 loopback here: {exc}")
        P.connect(dealer, endpoint)
        P.send(dealer, P.Message(P.STATUS, "v6", 1, {}))
        assert router.poll(5000), "nothing arrived over IPv6"
        frames, count = P.recv_message(router, routed=True)
        assert count == 2 and P.decode(frames[1:]).type == P.STATUS
    finally:
        router.close(linger=0)
        dealer.close(linger=0)


def test_every_field_kind_has_a_description_for_errors():
    assert set(P._KIND_TEXT) == set(P._CHECKS)
    assert {kind for schema in P.SCHEMAS.values() for kind, _ in schema.values()} <= set(P._KIND_TEXT)


def test_encode_refuses_bad_dtype_bad_body_and_oversized_header():
    with pytest.raises(P.ProtocolError, match="dtype"):
        P.encode(P.Message(P.ACK, arrays={"c": np.zeros(2, np.complex64)}))
    with pytest.raises(P.ProtocolError, match="missing field"):
        P.encode(P.Message(P.PULL, body={}))
    with pytest.raises(P.ProtocolError) as exc:
        P.encode(P.Message(P.STATUS, body={"progress": {f"k{i}": "x" * 1000 for i in range(100)}}))
    assert exc.value.code == "too_large"


# ---------------------------------------------------------------- decode validation

def _hdr(**over):
    """A valid header map (a pull), with fields overridden; value ``...`` deletes a field."""
    h = {"v": P.PROTOCOL_VERSION, "type": P.PULL, "wid": "w", "seq": 1, "body": {"have_version": 0}, "arrays": []}
    for k, v in over.items():
        if v is ...:
            h.pop(k, None)
        else:
            h[k] = v
    return h


def _pack(h) -> bytes:
    return msgpack.packb(h, use_bin_type=True)


def _push(body_over=None, arrays=None, frames=None, **hdr_over):
    body = {**PUSH_BODY, **(body_over or {})}
    for k, v in list(body.items()):
        if v is ...:
            del body[k]
    specs = arrays if arrays is not None else [["g", "float32", [2]]]
    data = frames if frames is not None else [b"\0" * 8] * len(specs)
    return [_pack(_hdr(type=P.PUSH, body=body, arrays=specs, **hdr_over)), *data]


BIG = "x" * 5000
CASES = {
    # name: (frames, code, a substring of the message)
    "empty message": ([], "bad_message", "empty"),
    "garbage header": ([b"\xc1\xc1\xc1 not msgpack"], "bad_message", "msgpack"),
    "truncated header": ([_pack(_hdr())[:-3]], "bad_message", "msgpack"),
    "trailing bytes": ([_pack(_hdr()) + b"\x00"], "bad_message", "msgpack"),
    "empty header frame": ([b""], "bad_message", "msgpack"),
    "header is a list": ([_pack([1, "pull"])], "bad_message", "map"),
    "header is an int": ([_pack(7)], "bad_message", "map"),
    "int map key": ([b"\x81\x01\x02"], "bad_message", "msgpack"),
    "unknown header key": ([_pack(_hdr(extra=1))], "bad_message", "unknown keys"),
    "unknown header keys str and bytes": ([_pack({**_hdr(), "zz": 1, b"yy": 2})], "bad_message", "unknown keys"),
    "oversized header": ([_pack(_hdr(wid="x" * (P.MAX_HEADER_BYTES + 10)))], "too_large", "limit"),
    "wrong version": ([_pack(_hdr(v=P.PROTOCOL_VERSION + 1))], "bad_version", "version"),
    "previous version (a frame per array)": ([_pack(_hdr(v=1))], "bad_version", "version"),
    "no version": ([_pack(_hdr(v=...))], "bad_version", "version"),
    # a newer version may add header keys: its peer must hear of the version, not of a key
    "another version with a header key of its own": ([_pack(_hdr(v=P.PROTOCOL_VERSION + 1, flags=0))],
                                                     "bad_version", f"version {P.PROTOCOL_VERSION + 1}"),
    "version as bool": ([_pack(_hdr(v=True))], "bad_version", "version"),
    "version as float": ([_pack(_hdr(v=float(P.PROTOCOL_VERSION)))], "bad_version", "version"),
    "version as string": ([_pack(_hdr(v="1"))], "bad_version", "version"),
    "unknown type": ([_pack(_hdr(type="launch_missiles"))], "unknown_type", "launch_missiles"),
    "no type": ([_pack(_hdr(type=...))], "unknown_type", "type"),
    "type is a list": ([_pack(_hdr(type=["pull"]))], "unknown_type", "type"),
    "type is a map": ([_pack(_hdr(type={"a": 1}))], "unknown_type", "type"),
    "type is bytes": ([_pack(_hdr(type=b"pull"))], "unknown_type", "type"),
    "wid too long": ([_pack(_hdr(wid="w" * (P.MAX_NAME_LEN + 1)))], "bad_message", "wid"),
    "wid not a string": ([_pack(_hdr(wid=12))], "bad_message", "wid"),
    "wid bytes": ([_pack(_hdr(wid=b"w"))], "bad_message", "wid"),
    "wid with a newline (a forged log line)": ([_pack(_hdr(wid="w\n12:00:00 INFO server: x"))], "bad_message",
                                               "printable"),
    "hello name with a newline": ([_pack(_hdr(type=P.HELLO, body={"role": "trainer", "name": "a\nb"}))],
                                  "bad_message", "'name' must be a string of at most 4096 printable"),
    "hello host with an escape code": ([_pack(_hdr(type=P.HELLO, body={"role": "trainer", "host": "\x1b[2J"}))],
                                       "bad_message", "'host' must be a string of at most 4096 printable"),
    "bye reason with a carriage return": ([_pack(_hdr(type=P.BYE, body={"reason": "done\rINFO fake"}))],
                                          "bad_message", "'reason' must be a string of at most 4096 printable"),
    "negative seq": ([_pack(_hdr(seq=-1))], "bad_message", "seq"),
    "bool seq": ([_pack(_hdr(seq=True))], "bad_message", "seq"),
    "float seq": ([_pack(_hdr(seq=1.5))], "bad_message", "seq"),
    "string seq": ([_pack(_hdr(seq=BIG * 10))], "bad_message", "seq"),
    "body not a map": ([_pack(_hdr(body=[1, 2]))], "bad_message", "body must be a map"),
    "body nil": ([_pack(_hdr(body=None))], "bad_message", "body must be a map"),
    "missing field": ([_pack(_hdr(body={}))], "bad_message", "missing field 'have_version'"),
    "unknown field": ([_pack(_hdr(body={"have_version": 0, "please": 1}))], "bad_message", "unknown fields"),
    "unknown bytes field": ([_pack(_hdr(body={"have_version": 0, b"x": 1, "y": 2}))], "bad_message",
                            "unknown fields"),
    "bool where int": ([_pack(_hdr(body={"have_version": True}))], "bad_message", "have_version"),
    "float where int": ([_pack(_hdr(body={"have_version": 1.0}))], "bad_message", "have_version"),
    "string where int": ([_pack(_hdr(body={"have_version": "1"}))], "bad_message", "have_version"),
    "int where bool": ([_pack(_hdr(type=P.WEIGHTS, body={**FULL_BODIES[P.WEIGHTS], "done": 1}))],
                       "bad_message", "done"),
    "int where scored": ([_pack(_hdr(type=P.WEIGHTS, body={**FULL_BODIES[P.WEIGHTS], "scored": 1}))],
                         "bad_message", "scored"),
    "NaN loss": (_push({"loss": float("nan")}), "bad_message", "loss"),
    "Inf loss": (_push({"loss": float("inf")}), "bad_message", "loss"),
    "-Inf held_s": ([_pack(_hdr(type=P.TASK, body={**FULL_BODIES[P.TASK], "held_s": -math.inf}))],
                    "bad_message", "held_s"),
    "string loss": (_push({"loss": "0.5"}), "bad_message", "loss"),
    "huge string": ([_pack(_hdr(type=P.BYE, body={"reason": BIG}))], "bad_message", "reason"),
    "dict where str": ([_pack(_hdr(type=P.BYE, body={"reason": {"a": 1}}))], "bad_message", "reason"),
    "timing not a map": (_push({"timing": [1.0]}), "bad_message", "timing"),
    "timing unknown key": (_push({"timing": {"compute_s": 1.0, "sleep_s": 1.0}}), "bad_message", "sleep_s"),
    "timing negative": (_push({"timing": {"compute_s": -0.5}}), "bad_message", "compute_s"),
    "timing NaN": (_push({"timing": {"comm_s": float("nan")}}), "bad_message", "comm_s"),
    "timing string": (_push({"timing": {"wait_s": "1"}}), "bad_message", "wait_s"),
    "timing bool": (_push({"timing": {"wait_s": True}}), "bad_message", "wait_s"),
    "count zero": (_push({"count": 0, "correct": 0}), "bad_message", "count"),
    "correct > count": (_push({"count": 4, "correct": 5}), "bad_message", "correct"),
    "correct negative": (_push({"correct": -1}), "bad_message", "correct"),
    "push missing timing": (_push({"timing": ...}), "bad_message", "timing"),
    "hello bad role": ([_pack(_hdr(type=P.HELLO, body={"role": "admin"}))], "bad_message", "role"),
    "hello role not str": ([_pack(_hdr(type=P.HELLO, body={"role": 1}))], "bad_message", "role"),
    "arrays not a list": (_push(arrays={"g": 1}, frames=[]), "bad_message", "arrays"),
    "spec not a triple": (_push(arrays=[["g", "float32"]]), "bad_message", "[name, dtype, shape]"),
    "spec a string": (_push(arrays=["g"]), "bad_message", "[name, dtype, shape]"),
    "spec four items": (_push(arrays=[["g", "float32", [2], 0]]), "bad_message", "[name, dtype, shape]"),
    "spec empty name": (_push(arrays=[["", "float32", [2]]]), "bad_message", "name"),
    "spec long name": (_push(arrays=[["n" * (P.MAX_NAME_LEN + 1), "float32", [2]]]), "bad_message", "name"),
    "spec int name": (_push(arrays=[[5, "float32", [2]]]), "bad_message", "name"),
    "dtype object": (_push(arrays=[["g", "object", [1]]]), "bad_message", "dtype"),
    "dtype complex": (_push(arrays=[["g", "complex64", [1]]]), "bad_message", "dtype"),
    "dtype float16": (_push(arrays=[["g", "float16", [4]]]), "bad_message", "dtype"),
    "dtype big-endian": (_push(arrays=[["g", ">f4", [2]]]), "bad_message", "dtype"),
    "dtype a list": (_push(arrays=[["g", ["float32"], [2]]]), "bad_message", "dtype"),
    "dtype huge string": (_push(arrays=[["g", BIG * 10, [2]]]), "bad_message", "dtype"),
    "negative dim": (_push(arrays=[["g", "float32", [-2]]]), "bad_message", "shape"),
    "bool dim": (_push(arrays=[["g", "float32", [True, 2]]]), "bad_message", "shape"),
    "float dim": (_push(arrays=[["g", "float32", [2.0]]]), "bad_message", "shape"),
    "too many dims": (_push(arrays=[["g", "float32", [1] * 9]]), "bad_message", "shape"),
    "shape not a list": (_push(arrays=[["g", "float32", 2]]), "bad_message", "shape"),
    "dim 2**31": (_push(arrays=[["g", "uint8", [2**31]]]), "bad_message", "shape"),
    "array over the size limit": (_push(arrays=[["g", "float32", [2**30]]]), "too_large", "exceed"),
    # Each array is under the limit (160 MB), together they are over it: answered before the frame is read.
    "arrays of one dtype over the size limit together": (
        _push(arrays=[["g", "float32", [40_000_000]], ["h", "float32", [40_000_000]]], frames=[b""]),
        "too_large", "float32 arrays would exceed"),
    # No bytes, but NumPy cannot make strides for the other dimensions: a ValueError of NumPy's got through.
    "empty array whose other dimensions overflow": (_push(arrays=[["g", "float32", [0] + [2**31 - 1] * 3]],
                                                          frames=[b""]), "bad_message", "empty array's other dim"),
    "array whose size overflows int64": (_push(arrays=[["g", "uint8", [65536] * 4]], frames=[b""]),
                                         "too_large", "exceed"),
    "too many arrays": (_push(arrays=[[f"a{i}", "uint8", [0]] for i in range(P.MAX_ARRAYS + 1)]),
                        "bad_message", "at most"),
    "fewer frames than specs": (_push(frames=[]), "bad_message", "payload frame"),
    "more frames than specs": (_push(frames=[b"\0" * 8, b"\0" * 8]), "bad_message", "payload frame"),
    "frame too short": (_push(frames=[b"\0" * 7]), "bad_message", "bytes"),
    "frame too long": (_push(frames=[b"\0" * 9]), "bad_message", "bytes"),
    "0-d frame empty": (_push(arrays=[["g", "float64", []]], frames=[b""]), "bad_message", "bytes"),
    "second dtype's frame too short": (_push(arrays=[["g", "float32", [2]], ["i", "int64", [1]]],
                                             frames=[b"\0" * 8, b"\0" * 4]), "bad_message", "'i'"),
    "a frame per array, not per dtype": (_push(arrays=[["g", "float32", [2]], ["h", "float32", [1]]],
                                               frames=[b"\0" * 8, b"\0" * 4]), "bad_message", "one per dtype"),
    "duplicate names": (_push(arrays=[["g", "float32", [2]], ["g", "float32", [2]]]), "bad_message", "twice"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_decode_rejects(name):
    frames, code, needle = CASES[name]
    with pytest.raises(P.ProtocolError) as exc:
        P.decode(frames)
    err = exc.value
    text = str(err)
    assert err.code == code, f"{name}: code {err.code!r}, message {text!r}"
    assert needle.lower() in text.lower(), f"{name}: {text!r} does not mention {needle!r}"
    assert "\n" not in text and 0 < len(text) <= 300, f"{name}: not a short one-line message: {text!r}"
    assert isinstance(err, ValueError)      # ProtocolError is also a ValueError (and a PscnnError)


def test_cached_layouts_do_not_admit_look_alikes():
    """decode caches validated array layouts; specs equal to a cached one under == (True or 2.0
    for a dimension) and other near-misses are still rejected, every time."""
    good = _push(arrays=[["g", "float32", [2, 1]]])
    for _ in range(2):                       # the second decode is served from the cache
        assert P.decode(good).arrays["g"].shape == (2, 1)
    look_alikes = {"bool dim": [["g", "float32", [2, True]]], "float dim": [["g", "float32", [2.0, 1]]],
                   "bytes name": [[b"g", "float32", [2, 1]]], "tuple-ish spec": [["g", "float32", [2, 1], 0]]}
    for name, specs in look_alikes.items():
        for _ in range(2):
            with pytest.raises(P.ProtocolError):
                P.decode(_push(arrays=specs))
        assert P.decode(good).arrays["g"].shape == (2, 1), name


def test_bodies_of_other_types_are_validated_too():
    """Every required field of every type is enforced, and wrong kinds are refused."""
    wrong = {"int": "1", "float": "1.0", "float_or_nil": "1.0", "str": 1, "line": "a\tb", "bool": 0, "dict": [],
             "list": {}}
    for mtype, schema in P.SCHEMAS.items():
        for fname, (kind, required) in schema.items():
            body = dict(FULL_BODIES[mtype])
            body[fname] = wrong[kind]
            with pytest.raises(P.ProtocolError, match=fname):
                P.decode([_pack(_hdr(type=mtype, body=body))])
            if required:
                body.pop(fname)
                with pytest.raises(P.ProtocolError, match="missing field"):
                    P.decode([_pack(_hdr(type=mtype, body=body))])


def test_boundaries_accepted():
    # the largest names, a wid of exactly MAX_NAME_LEN, 8 dims, MAX_ARRAYS arrays, a 4096-char string
    specs = [[f"a{i}", "uint8", [0]] for i in range(P.MAX_ARRAYS)]
    msg = P.decode([_pack(_hdr(type=P.ACK, body={}, wid="w" * P.MAX_NAME_LEN, arrays=specs)), b""])
    assert len(msg.arrays) == P.MAX_ARRAYS
    msg = P.decode([_pack(_hdr(type=P.BYE, body={"reason": "r" * 4096}))])
    assert len(msg.body["reason"]) == 4096
    msg = P.decode(_push(arrays=[["n" * P.MAX_NAME_LEN, "uint8", [1] * 8]], frames=[b"\x07"]))
    assert msg.arrays["n" * P.MAX_NAME_LEN].shape == (1,) * 8
    # header keys other than v/type may be left out
    msg = P.decode([_pack({"v": P.PROTOCOL_VERSION, "type": P.WORK})])
    assert (msg.wid, msg.seq, msg.body, msg.arrays) == ("", 0, {}, {})
    # a push's loss may be nil (the worker's loss was NaN or Inf; the server rejects the push)
    assert P.decode(_push({"loss": None})).body["loss"] is None
    # ints are accepted where a float is expected, and a huge (uint64) seq is fine
    msg = P.decode(_push({"loss": 3, "timing": {}}, seq=2**64 - 1))
    assert msg.seq == 2**64 - 1 and msg.body["loss"] == 3


# Fuzzing of decode (random bytes, msgpack values, mutated messages): tests/test_protocol_properties.py.


def test_error_replies_are_one_printable_line_whatever_they_quote():
    """An error quotes what a rejected message said of itself; the receiver logs it as it is."""
    msg = P.error("bad_arrays", "push: unknown array 'a\nFORGED LINE\x1b[2J\u202e' " + "y" * 2000, seq=7)
    assert msg.seq == 7 and msg.body["code"] == "bad_arrays"
    text = msg.body["message"]
    assert text.isprintable() and "\n" not in text and len(text) <= 1000
    assert "a\\nFORGED LINE\\x1b[2J\\u202e" in text
    assert P.decode(P.encode(msg)).body == msg.body
    for mtype, field in ((P.STOP, "reason"), (P.WAIT, "reason"), (P.ERROR, "message")):
        body = dict(FULL_BODIES[mtype], **{field: "done\n12:00:00 ERROR worker: FORGED"})
        with pytest.raises(P.ProtocolError, match=f"field '{field}' must be a string of at most 4096 printable"):
            P.encode(P.Message(mtype, body=body))


def test_max_frame_bytes_leaves_room_for_a_float64_push_and_is_capped():
    assert P.max_frame_bytes(1_000_000) == 2_000_000 + P.MAX_HEADER_BYTES
    assert P.max_frame_bytes(10**9) == P.MAX_MESSAGE_BYTES


def test_an_ipc_endpoint_in_use_is_refused_and_a_stale_one_is_taken(tmp_path):
    """ZeroMQ would unlink a live ipc socket file and take the address over silently."""
    ctx = zmq.Context.instance()
    endpoint = f"ipc://{tmp_path}/pscnn.ipc"
    first, second = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    try:
        P.bind(first, endpoint)
        with pytest.raises(P.EndpointError, match=rf"^cannot bind {re.escape(endpoint)}: another process is listening"):
            P.bind(second, endpoint)
        import socket as pysocket
        stale = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        stale.bind(f"{tmp_path}/stale.ipc")
        stale.close()                            # the file stays, nobody listens: what a crash leaves
        P.bind(second, f"ipc://{tmp_path}/stale.ipc")
    finally:
        first.close(0)
        second.close(0)


def test_an_abstract_ipc_name_in_use_is_refused_as_a_path_is_and_no_file_of_its_name_counts(tmp_path, monkeypatch):
    """bind probed ipc://@NAME (Linux's abstract namespace, see P.ipc_path) as the file "@NAME" in the
    working folder: a second server on the name got ZeroMQ's "Address already in use", not the
    path's words, and a Unix socket file called "@NAME" there, where another process listened,
    refused a name that nobody held."""
    import socket as pysocket
    ctx = zmq.Context.instance()
    name = f"pscnn-test-{tmp_path.name}"
    endpoint = f"ipc://@{name}"
    first, second = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    decoy = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    try:
        monkeypatch.chdir(tmp_path)
        decoy.bind(f"@{name}")                   # a file in the working folder, not the abstract name
        decoy.listen()
        P.bind(first, endpoint)
        with pytest.raises(P.EndpointError, match=rf"^cannot bind {re.escape(endpoint)}: another process is listening there$"):
            P.bind(second, endpoint)
    finally:
        first.close(0)
        second.close(0)
        decoy.close()


def test_an_ipc_endpoints_unix_socket_address_is_its_path_and_an_abstract_names_starts_with_a_nul():
    """What the greeting probe connects to for an ipc:// endpoint: its path, as written; libzmq's
    ipc://@NAME is NAME in Linux's abstract namespace, whose address starts with a NUL byte in the
    place of the @.  No other scheme has one."""
    assert P.ipc_path("ipc:///tmp/pscnn.ipc") == "/tmp/pscnn.ipc"
    assert P.ipc_path("ipc://runs/pscnn.ipc") == "runs/pscnn.ipc"
    assert P.ipc_path("ipc://@pscnn-server") == "\0pscnn-server"
    assert P.ipc_path("tcp://127.0.0.1:5555") is None and P.ipc_path("inproc://pscnn") is None


def test_bind_and_connect_errors_are_one_line_naming_the_endpoint():
    ctx = zmq.Context.instance()
    first, second = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    try:
        first.bind("tcp://127.0.0.1:*")
        endpoint = first.getsockopt(zmq.LAST_ENDPOINT).decode()
        with pytest.raises(P.EndpointError, match=rf"^cannot bind {re.escape(endpoint)}: Address already in use$"):
            P.bind(second, endpoint)
        with pytest.raises(P.EndpointError, match="^cannot connect to tcp://nowhere: Invalid argument$"):
            P.connect(second, "tcp://nowhere")
        P.connect(second, endpoint)             # nothing wrong: no error
    finally:
        first.close(0)
        second.close(0)


@pytest.mark.parametrize("endpoint, reason", [
    ("tcp://nosuch.invalid:*", "No such device"),                  # a name that is no host or interface here
    ("tcp://192.0.2.1:*", "Cannot assign requested address"),      # TEST-NET-1: never an address of this machine
])
def test_binding_another_machines_address_says_the_host_is_wrong(endpoint, reason):
    """`pscnn server --bind tcp://otherhost:5555` ended with libzmq's "No such device", which does not
    say that the host part is what to change."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    try:
        with pytest.raises(P.EndpointError) as exc:
            P.bind(sock, endpoint)
    finally:
        sock.close(0)
    one_line_naming(exc.value, f"cannot bind {endpoint}: {reason}", "not an address, host name or network "
                    "interface of this machine", "tcp://*:PORT")


# ======================================================================== boundaries and corners
# Each test below pins one behaviour a mutation audit of pscnn/protocol.py found unchecked: an
# exact size limit, a cache bound, a field kind's length limit, an encode path.

WELCOME_BODY = {"worker_id": "w0-1", "role": "trainer", "model": {}, "run": {}, "incarnation": "abc",
                "heartbeat_s": 2}


def _header(mtype=P.PULL, body=None, arrays=()):
    return {"v": P.PROTOCOL_VERSION, "type": mtype, "wid": "w", "seq": 1,
            "body": {"have_version": 0} if body is None else body, "arrays": [list(a) for a in arrays]}


def _status_header_of(size: int) -> dict:
    """A valid status header whose msgpack encoding is exactly ``size`` bytes (size > ~300)."""
    def header(n):
        return _header(P.STATUS, body={"progress": {"pad": "x" * n}})
    overhead = len(_pack(header(1000))) - 1000       # str16 framing: linear in n from 256 to 65535
    h = header(size - overhead)
    assert len(_pack(h)) == size
    return h


def _reject(frames):
    with pytest.raises(P.ProtocolError) as exc:
        P.decode(frames)
    return exc.value


# ---------------------------------------------------------------- size limits, exactly at the limit

def test_decode_accepts_a_header_of_exactly_max_header_bytes_and_refuses_one_more():
    """The header limit is inclusive: MAX_HEADER_BYTES passes, one byte more is too_large."""
    at_limit = _pack(_status_header_of(P.MAX_HEADER_BYTES))
    assert P.decode([at_limit]).type == P.STATUS
    assert _reject([_pack(_status_header_of(P.MAX_HEADER_BYTES + 1))]).code == "too_large"


def test_encode_sends_a_header_of_exactly_max_header_bytes_and_refuses_one_more():
    """encode applies the same inclusive limit as decode: whatever one side sends, the other takes."""
    h = _status_header_of(P.MAX_HEADER_BYTES)
    frames = P.encode(P.Message(P.STATUS, h["wid"], h["seq"], h["body"]))
    assert len(frames[0]) == P.MAX_HEADER_BYTES
    h = _status_header_of(P.MAX_HEADER_BYTES + 1)
    with pytest.raises(P.ProtocolError) as exc:
        P.encode(P.Message(P.STATUS, h["wid"], h["seq"], h["body"]))
    assert exc.value.code == "too_large"


def test_one_array_of_exactly_max_message_bytes_is_not_too_large():
    """An array of exactly MAX_MESSAGE_BYTES is within the limit: a missing frame is then a plain
    bad_message about its length, not too_large (nothing is allocated either way)."""
    err = _reject([_pack(_header(P.ACK, body={}, arrays=[["g", "uint8", [P.MAX_MESSAGE_BYTES]]])), b""])
    assert err.code == "bad_message" and "bytes" in str(err)
    err = _reject([_pack(_header(P.ACK, body={}, arrays=[["g", "uint8", [P.MAX_MESSAGE_BYTES + 1]]])), b""])
    assert err.code == "too_large"


def test_arrays_of_one_dtype_totalling_exactly_max_message_bytes_are_not_too_large():
    """The per-dtype payload limit is inclusive too: two float32 halves of the limit pass the size check."""
    half = P.MAX_MESSAGE_BYTES // 2 // 4
    specs = [["g", "float32", [half]], ["h", "float32", [half]]]
    err = _reject([_pack(_header(P.ACK, body={}, arrays=specs)), b""])
    assert err.code == "bad_message" and "bytes" in str(err)
    specs[1][2] = [half + 1]
    assert _reject([_pack(_header(P.ACK, body={}, arrays=specs)), b""]).code == "too_large"


def test_a_header_nested_one_level_past_max_depth_is_refused():
    """MAX_DEPTH is 32 (a header nested deeper would exhaust Python's recursion where printed):
    32 levels of maps and lists decode, 33 do not."""
    def nested(levels):              # header map: level 1, body 2, progress 3, then lists 4 .. levels
        value = []
        for _ in range(levels - 4):
            value = [value]
        return _pack(_header(P.STATUS, body={"progress": {"deep": value}}))
    assert P.MAX_DEPTH == 32
    assert P.decode([nested(32)]).type == P.STATUS
    err = _reject([nested(33)])
    assert "more than 32 deep" in str(err)


# ---------------------------------------------------------------- the layout cache

def test_the_layout_cache_stays_bounded_when_a_client_cycles_through_layouts():
    """A client sending ever new array layouts must not grow the decode cache without bound."""
    P._SPEC_CACHE.clear()
    for n in range(3 * P._SPEC_CACHE_MAX):
        msg = P.decode([_pack(_header(P.ACK, body={}, arrays=[["g", "uint8", [n]]])), b"\0" * n])
        assert msg.arrays["g"].shape == (n,)
        assert len(P._SPEC_CACHE) <= P._SPEC_CACHE_MAX


# ---------------------------------------------------------------- body fields

def test_a_str_field_of_4096_characters_is_accepted_and_4097_refused():
    """The 'str' kind (welcome's worker_id, incarnation, ...) is bounded at 4096 characters, inclusive."""
    body = dict(WELCOME_BODY, incarnation="i" * 4096)
    assert P.decode([_pack(_header(P.WELCOME, body=body))]).body["incarnation"] == "i" * 4096
    body["incarnation"] = "i" * 4097
    err = _reject([_pack(_header(P.WELCOME, body=body))])
    assert "'incarnation' must be a string of at most 4096 characters" in str(err)
    with pytest.raises(P.ProtocolError, match="incarnation"):
        P.encode(P.Message(P.WELCOME, body=body))


def test_a_push_whose_every_sample_is_correct_is_accepted():
    """correct == count (a perfect batch) is valid; only correct > count is refused."""
    body = dict(PUSH_BODY, correct=64, count=64)
    frames = P.encode(P.Message(P.PUSH, body=body, arrays={"g": np.zeros(2, np.float32)}))
    assert P.decode([bytes(memoryview(f)) for f in frames]).body["correct"] == 64
    body = dict(PUSH_BODY, correct=1, count=1)
    assert P.decode([bytes(memoryview(f)) for f in P.encode(P.Message(P.PUSH, body=body))]).body["count"] == 1


# ---------------------------------------------------------------- one_line

def test_one_line_stays_within_its_limit_when_escapes_lengthen_a_short_text():
    """A text within the limit whose control characters expand when escaped is still cut to the limit."""
    line = P.one_line("\n" * 10, 10)
    assert len(line) <= 10 and line.endswith("...") and "\n" not in line
    msg = P.error("bad_message", "\x00" * 999)            # each NUL escapes to 4 characters
    assert len(msg.body["message"]) <= 1000 and msg.body["message"].isprintable()


# ---------------------------------------------------------------- encode paths

def test_encode_refuses_a_flat_arrays_buffer_of_a_dtype_the_protocol_lacks():
    """A FlatArrays goes out as its buffer; its dtype is checked like any other array's."""
    flat = FlatArrays.pack({"w": np.ones(3, np.float16)})
    with pytest.raises(P.ProtocolError, match=r"^arrays: dtype float16 is not one of \('float32'"):
        P.encode(P.Message(P.ACK, arrays=flat))


def test_an_empty_flat_arrays_sends_no_payload_frame_and_decodes():
    """No arrays, no payload frame: an empty FlatArrays encodes as the header alone."""
    frames = P.encode(P.Message(P.ACK, arrays=FlatArrays.pack({})))
    assert len(frames) == 1
    msg = P.decode([bytes(memoryview(f)) for f in frames])
    assert msg.type == P.ACK and len(msg.arrays) == 0


@pytest.mark.parametrize("flat", [False, True], ids=["dict", "flat"])
def test_a_big_endian_array_arrives_as_the_same_numbers(flat):
    """A dtype's name does not say its byte order ('>f4' is 'float32'), and the receiver reads
    native: a big-endian array's bytes went out as they lay, and arrived as other numbers."""
    big = np.arange(3, dtype=">f4")
    arrays = FlatArrays((("g", (3,)),), big) if flat else {"g": big, "h": np.arange(2, dtype=">i8")}
    out = P.decode([bytes(memoryview(f)) for f in P.encode(P.Message(P.ACK, arrays=arrays))]).arrays
    np.testing.assert_array_equal(out["g"], [0, 1, 2])
    if not flat:
        np.testing.assert_array_equal(out["h"], [0, 1])


@pytest.mark.parametrize("layout", ["fortran", "strided"])
def test_a_lone_non_c_contiguous_array_arrives_in_c_order_over_zeromq(pair, layout):
    """The only array of its dtype goes out as its own frame: a transposed (Fortran-ordered) or
    strided array must still go out in C order, not as its memory lies."""
    a, b = pair
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    arr = base.T if layout == "fortran" else base[:, ::2]
    P.send(a, P.Message(P.ACK, arrays={"t": arr, "i": np.arange(3, dtype=np.int64)}))
    assert b.poll(5000)
    out = P.decode(b.recv_multipart(copy=False)).arrays
    np.testing.assert_array_equal(out["t"], arr)
    np.testing.assert_array_equal(out["i"], [0, 1, 2])


@pytest.mark.parametrize("arrays, error", [
    ({"": np.zeros(1, np.float32)}, "array name must be a non-empty string"),
    ({"w" * 300: np.zeros(1, np.float32)}, "array name must be a non-empty string"),
    ({"w": np.zeros((1,) * 9, np.float32)}, "has an invalid shape"),
    ({f"a{i}": np.zeros(1, np.float32) for i in range(P.MAX_ARRAYS + 1)}, f"at most {P.MAX_ARRAYS} specs"),
])
def test_encode_refuses_arrays_that_decode_would_refuse(arrays, error):
    """The sender's mistake is caught where it is made, in the same words, not as the
    receiver's error reply (or a dropped message) later."""
    with pytest.raises(P.ProtocolError, match=error):
        P.encode(P.Message(P.ACK, arrays=arrays))


def test_a_task_carries_the_ack_of_the_push_it_answers():
    ack = {"seq": 7, "applied": True}
    msg = P.decode(P.encode(P.task(3, 0, 1, 9, 0.5, ack=ack)))
    assert msg.type == P.TASK and msg.body["ack"] == ack
    assert "ack" not in P.decode(P.encode(P.task(3, 0, 1, 9, 0.5))).body


def test_model_layout_is_the_parameters_then_the_state():
    from cnn_core.model import build_model
    model = build_model({"input_shape": [1, 4, 4], "layers": [
        {"type": "conv2d", "name": "conv1", "out_channels": 2, "kernel": 3},
        {"type": "batchnorm2d", "name": "bn1"}, {"type": "flatten"},
        {"type": "dense", "name": "fc1", "units": 3}]})
    assert P.model_layout(model) == (("conv1.weight", (2, 1, 3, 3)), ("conv1.bias", (2,)),
                                     ("bn1.weight", (2,)), ("bn1.bias", (2,)),
                                     ("fc1.weight", (8, 3)), ("fc1.bias", (3,)),
                                     ("bn1.running_mean", (2,)), ("bn1.running_var", (2,)))


def test_send_with_a_routing_id_reaches_the_peer_it_names(request):
    ctx = zmq.Context.instance()
    router, dealers = ctx.socket(zmq.ROUTER), [ctx.socket(zmq.DEALER) for _ in range(2)]
    try:
        address = f"inproc://test-protocol-{request.node.name}"
        router.bind(address)
        for i, dealer in enumerate(dealers):
            dealer.setsockopt(zmq.ROUTING_ID, b"d%d" % i)
            dealer.connect(address)
        P.send(dealers[1], P.Message(P.WORK, seq=4))
        assert router.poll(5000)
        frames, count = P.recv_message(router, routed=True)
        assert count == 2 and frames[0].bytes == b"d1" and P.decode(frames[1:]).seq == 4
        P.send(router, P.Message(P.ACK, seq=4), routing_id=frames[0].bytes)
        assert dealers[1].poll(5000)
        assert P.decode_message(*P.recv_message(dealers[1])).seq == 4
        assert not dealers[0].poll(0)
    finally:
        for sock in (router, *dealers):
            sock.close(linger=0)


def test_look_up_gives_the_addresses_the_resolvers_words_or_nothing_in_time(monkeypatch):
    """One host lookup, bounded by a timeout, for the client's "its host does not resolve" and the CURVE
    greeting probe: each had a copy of its own (a thread, its timeout, the errors it takes)."""
    import socket
    import threading
    addresses, problem = P.look_up("127.0.0.1", "5555", 5.0)
    assert problem is None and addresses and {a[4][:2] for a in addresses} == {("127.0.0.1", 5555)}
    assert {a[1] for a in addresses} == {socket.SOCK_STREAM}    # TCP's alone: the probe connects to each in turn
    for host in ("no-such-host.invalid", "x" * 300):     # the resolver's error; the IDNA codec's
        addresses, problem = P.look_up(host, None, 30.0)
        assert addresses == [] and problem and "\n" not in problem, (host, problem)
        assert "Errno" not in problem, problem      # the words alone, as a user reads them in the one line
    released = threading.Event()

    def held(*args, **kwargs):
        released.wait(30)       # bounded: the look-up below must not wait for it
        raise socket.gaierror(socket.EAI_NONAME, "held")
    monkeypatch.setattr(socket, "getaddrinfo", held)
    try:
        assert P.look_up("localhost", None, 0.1) == (None, None)
    finally:
        released.set()


def test_look_up_while_the_same_lookup_hangs_waits_for_it_rather_than_start_another(monkeypatch):
    """A CURVE client probes the greeting every 2 s: against a DNS that hangs, each probe left one
    more thread in the resolver until it gave up.  Now the lookups of a host share the one in flight."""
    import socket
    import threading
    entered, released = threading.Event(), threading.Event()
    calls = []

    def held(host, *args, **kwargs):
        calls.append(host)
        entered.set()
        released.wait(30)       # bounded: released below
        raise socket.gaierror(socket.EAI_NONAME, "held")
    monkeypatch.setattr(socket, "getaddrinfo", held)
    before = {t for t in threading.enumerate() if t.name == "resolve"}
    try:
        assert P.look_up("hung.example", "5555", 0.01) == (None, None)
        assert entered.wait(30)
        for _ in range(3):
            assert P.look_up("hung.example", "5555", 0.01) == (None, None)
        started = {t for t in threading.enumerate() if t.name == "resolve"} - before
        assert len(started) == 1 and calls == ["hung.example"]
    finally:
        released.set()
    next(iter(started)).join(30)
    assert P.look_up("hung.example", "5555", 30.0) == ([], "held") and len(calls) == 2    # done: asked again
