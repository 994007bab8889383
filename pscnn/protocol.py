"""The wire protocol between the parameter server and its clients.

Both sides import this module; no message is built anywhere else.

A message is a ZeroMQ multipart message::

    [header, array_0, array_1, ...]

* ``header`` is a small msgpack map: ``{"v": PROTOCOL_VERSION, "type": str,
  "wid": sender id, "seq": int, "body": {...}, "arrays": [[name, dtype,
  shape], ...]}``.
* each following frame is the raw bytes of one array, C order, in the order
  of ``arrays``; they are sent without copying (``copy=False``) and received
  as read-only NumPy views of the ZeroMQ frames.

No pickle anywhere.  :func:`decode` validates everything it is given: header
size, msgpack well-formedness, the protocol version, the message type, the
body's fields and their types (per type, :data:`SCHEMAS`), the array specs
(names, allowed dtypes, shapes), the frame count, and each frame's length.
Anything wrong raises :class:`ProtocolError` with a one-line reason, which the
server sends back as an ``error`` message and logs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import msgpack
import numpy as np

from cnn_core.errors import PscnnError

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAYS = 256
MAX_NAME_LEN = 128
MAX_MESSAGE_BYTES = 256 * 1024 * 1024          # also set as ZMQ_MAXMSGSIZE on the server
ALLOWED_DTYPES = ("float32", "float64", "int64", "int32", "uint8")
_DTYPES = {name: np.dtype(name) for name in ALLOWED_DTYPES}     # looked up per array on the hot path

# ---------------------------------------------------------------- message types
HELLO = "hello"              # client -> server: join (role, name, ...)
WELCOME = "welcome"          # server -> client: model spec, run config
WORK = "work"                # trainer -> server: give me a batch
PUSH = "push"                # trainer -> server: gradients of a leased batch
TASK = "task"                # server -> trainer: a leased batch (+ weights when newer) (+ ack of a push)
WAIT = "wait"                # server -> trainer: no batch now, ask again after retry_s
PULL = "pull"                # evaluator -> server: newest weights, please
WEIGHTS = "weights"          # server -> evaluator: weights (when newer than have_version)
EVAL_REPORT = "eval_report"  # evaluator -> server: test-set metrics of a version
HEARTBEAT = "heartbeat"      # either way: I am alive
STATUS = "status"            # anyone -> server: progress, please (no hello needed)
BYE = "bye"                  # client -> server: leaving
ACK = "ack"                  # server -> client: received
STOP = "stop"                # server -> client: training is over, exit
ERROR = "error"              # server -> client: your message was rejected (code, message)

ROLES = ("trainer", "evaluator")

# Body schemas: field -> (type, required).  Types: int, float (int accepted,
# must be finite), str, bool, dict, list.  Unknown fields are rejected.
_TIMING = "dict"
SCHEMAS: dict[str, dict[str, tuple[str, bool]]] = {
    HELLO: {"role": ("str", True), "name": ("str", False), "pid": ("int", False),
            "host": ("str", False), "device": ("str", False)},
    WELCOME: {"worker_id": ("str", True), "role": ("str", True), "model": ("dict", True),
              "run": ("dict", True), "incarnation": ("str", True), "heartbeat_s": ("float", True)},
    WORK: {},
    PUSH: {"epoch": ("int", True), "batch": ("int", True), "lease": ("int", True),
           "base_version": ("int", True), "loss": ("float", True), "correct": ("int", True),
           "count": ("int", True), "timing": (_TIMING, True)},
    TASK: {"version": ("int", True), "epoch": ("int", True), "batch": ("int", True),
           "lease": ("int", True), "held_s": ("float", True), "ack": ("dict", False)},
    WAIT: {"retry_s": ("float", True), "held_s": ("float", True), "reason": ("str", True),
           "ack": ("dict", False)},
    PULL: {"have_version": ("int", True)},
    WEIGHTS: {"version": ("int", True), "epoch": ("int", True), "done": ("bool", True),
              "updates": ("int", True)},
    EVAL_REPORT: {"version": ("int", True), "final": ("bool", True), "metrics": ("dict", True)},
    HEARTBEAT: {"version": ("int", False), "done": ("bool", False)},
    STATUS: {"progress": ("dict", False)},
    BYE: {"reason": ("str", False)},
    ACK: {"ack": ("dict", False)},
    STOP: {"version": ("int", True), "reason": ("str", True), "ack": ("dict", False)},
    ERROR: {"code": ("str", True), "message": ("str", True)},
}
TIMING_FIELDS = ("compute_s", "comm_s", "wait_s")


class ProtocolError(PscnnError, ValueError):
    """A message that does not follow the protocol.  ``code`` is machine-readable."""

    def __init__(self, message: str, code: str = "bad_message"):
        super().__init__(message)
        self.code = code


@dataclass
class Message:
    """One protocol message.  ``arrays`` maps name -> ndarray, in frame order."""

    type: str
    wid: str = ""
    seq: int = 0
    body: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)


# ---------------------------------------------------------------- encoding

def encode(msg: Message) -> list:
    """Message -> list of frames: the msgpack header, then one buffer per array.

    Arrays are passed as C-contiguous ndarrays (no copy when they already
    are); give them to ``send_multipart(..., copy=False)``.  The caller must
    not modify them in place until ZeroMQ has sent them (the server sends
    immutable snapshots for exactly that reason).
    """
    _check_body(msg.type, msg.body)
    specs, frames = [], []
    for name, arr in msg.arrays.items():
        arr = np.asarray(arr)
        if not arr.flags.c_contiguous:      # (np.ascontiguousarray would turn a 0-d array into 1-d)
            arr = np.array(arr, order="C")
        dtype = arr.dtype.name
        if dtype not in _DTYPES:
            raise ProtocolError(f"array {name!r}: dtype {dtype} is not one of {ALLOWED_DTYPES}")
        specs.append([name, dtype, list(arr.shape)])
        frames.append(arr)
    header = msgpack.packb({"v": PROTOCOL_VERSION, "type": msg.type, "wid": msg.wid, "seq": msg.seq,
                            "body": msg.body, "arrays": specs}, use_bin_type=True)
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"{msg.type} header is {len(header)} bytes, over the {MAX_HEADER_BYTES} limit",
                            "too_large")
    return [header, *frames]


def decode(frames) -> Message:
    """Frames (bytes or zmq.Frame) -> a validated :class:`Message`.

    Array values are read-only NumPy views of the received frames (no copy).
    Raises :class:`ProtocolError` naming the first problem found.
    """
    if not frames:
        raise ProtocolError("empty message")
    raw = _buffer(frames[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header is {len(raw)} bytes, over the {MAX_HEADER_BYTES} limit", "too_large")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:   # msgpack raises several types for garbage
        raise ProtocolError(f"header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    unknown = sorted(set(header) - {"v", "type", "wid", "seq", "body", "arrays"}, key=repr)
    if unknown:
        raise ProtocolError(f"header has unknown keys {unknown}"[:200])
    version = header.get("v")
    if not _is_int(version) or version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}"[:100] + f" is not supported (this side speaks "
                            f"{PROTOCOL_VERSION})", "bad_version")
    mtype = header.get("type")
    if not isinstance(mtype, str) or mtype not in SCHEMAS:
        raise ProtocolError(f"unknown message type {mtype!r}"[:200], "unknown_type")
    wid = header.get("wid", "")
    if not isinstance(wid, str) or len(wid) > MAX_NAME_LEN:
        raise ProtocolError(f"{mtype}: 'wid' must be a string of at most {MAX_NAME_LEN} characters")
    seq = header.get("seq", 0)
    if not _is_int(seq) or seq < 0:
        raise ProtocolError(f"{mtype}: 'seq' must be a non-negative integer, got {seq!r}"[:200])
    body = header.get("body", {})
    _check_body(mtype, body)
    specs = header.get("arrays", [])
    if not isinstance(specs, list) or len(specs) > MAX_ARRAYS:
        raise ProtocolError(f"{mtype}: 'arrays' must be a list of at most {MAX_ARRAYS} specs")
    if len(frames) - 1 != len(specs):
        raise ProtocolError(f"{mtype}: header describes {len(specs)} arrays but {len(frames) - 1} frames followed")
    arrays = {}
    for spec, frame in zip(specs, frames[1:]):
        name, dtype, shape = _check_spec(mtype, spec)
        if name in arrays:
            raise ProtocolError(f"{mtype}: array {name!r} appears twice")
        buf = _buffer(frame)
        expected = math.prod(shape) * _DTYPES[dtype].itemsize
        if len(buf) != expected:
            raise ProtocolError(f"{mtype}: array {name!r} {dtype}{tuple(shape)} needs {expected} bytes, "
                                f"frame has {len(buf)}")
        arr = np.frombuffer(buf, dtype=_DTYPES[dtype]).reshape(shape)
        arr.flags.writeable = False         # a view of the received frame: never written to
        arrays[name] = arr
    return Message(mtype, wid, int(seq), body, arrays)


def _buffer(frame):
    """bytes-like view of a frame (zmq.Frame with copy=False, or bytes)."""
    buf = getattr(frame, "buffer", frame)
    return memoryview(buf).cast("B") if not isinstance(buf, (bytes, bytearray)) else buf


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_spec(mtype: str, spec):
    if not (isinstance(spec, list) and len(spec) == 3):
        raise ProtocolError(f"{mtype}: each array spec must be [name, dtype, shape], got {spec!r}"[:200])
    name, dtype, shape = spec
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
        raise ProtocolError(f"{mtype}: array name must be a non-empty string of at most {MAX_NAME_LEN} chars")
    if dtype not in ALLOWED_DTYPES:
        raise ProtocolError(f"{mtype}: array {name!r} has dtype {dtype!r}"[:200]
                            + f"; allowed: {', '.join(ALLOWED_DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(_is_int(d) and 0 <= d < 2**31 for d in shape)):
        raise ProtocolError(f"{mtype}: array {name!r} has an invalid shape {shape!r}"[:200])
    if math.prod(shape) * _DTYPES[dtype].itemsize > MAX_MESSAGE_BYTES:   # Python ints: no overflow
        raise ProtocolError(f"{mtype}: array {name!r} would exceed {MAX_MESSAGE_BYTES} bytes", "too_large")
    return name, dtype, shape


_CHECKS = {
    "int": _is_int,
    "float": lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v),
    "str": lambda v: isinstance(v, str) and len(v) <= 4096,
    "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
}


def _check_body(mtype: str, body) -> None:
    if not isinstance(body, dict):
        raise ProtocolError(f"{mtype}: body must be a map, got {type(body).__name__}")
    schema = SCHEMAS[mtype]
    unknown = sorted(set(body) - set(schema), key=str)
    if unknown:
        raise ProtocolError(f"{mtype}: unknown fields {unknown}"[:200])
    for name, (kind, required) in schema.items():
        if name not in body:
            if required:
                raise ProtocolError(f"{mtype}: missing field {name!r}")
            continue
        if not _CHECKS[kind](body[name]):
            raise ProtocolError(f"{mtype}: field {name!r} must be {kind}, got {body[name]!r}"[:200])
    if mtype == PUSH:
        timing = body["timing"]
        for key, value in timing.items():
            if key not in TIMING_FIELDS or not _CHECKS["float"](value) or value < 0:
                raise ProtocolError(f"push: timing field {key!r}={value!r} is not one of {TIMING_FIELDS} "
                                    "with a non-negative number"[:200])
        if body["count"] < 1 or not 0 <= body["correct"] <= body["count"]:
            raise ProtocolError(f"push: count must be >= 1 and 0 <= correct <= count, got "
                                f"count={body['count']}, correct={body['correct']}")
    if mtype == HELLO and body["role"] not in ROLES:
        raise ProtocolError(f"hello: role must be one of {ROLES}, got {body['role']!r}"[:200])


# ---------------------------------------------------------------- socket helpers

def send(socket, msg: Message, routing_id: bytes | None = None) -> None:
    """Send ``msg`` (zero-copy for arrays); ``routing_id`` for a ROUTER socket."""
    frames = encode(msg)
    if routing_id is not None:
        frames = [routing_id, *frames]
    socket.send_multipart(frames, copy=False)


def send_frames(socket, frames: list, routing_id: bytes | None = None) -> None:
    """Send pre-encoded frames (a cached reply being resent)."""
    socket.send_multipart([routing_id, *frames] if routing_id is not None else frames, copy=False)
