"""The wire protocol between the parameter server and its clients.

Both sides import this module; no message is built anywhere else.

A message is a ZeroMQ multipart message::

    [header, payload_0, payload_1, ...]

* ``header`` is a small msgpack map: ``{"v": PROTOCOL_VERSION, "type": str,
  "wid": sender id, "seq": int, "body": {...}, "arrays": [[name, dtype,
  shape], ...]}``.
* one payload frame per dtype, in the order the dtypes first appear in
  ``arrays``: the raw bytes of that dtype's arrays back to back, C order and
  native byte order, in ``arrays`` order.  A model (all float32) is one frame: the sender hands over
  a :class:`~cnn_core.flat.FlatArrays` buffer without copying
  (``copy=False``), and the receiver gets read-only views of the ZeroMQ frame,
  as a FlatArrays when the message has one dtype.  A whole model is one frame
  instead of one per parameter (docs/scaling.md, section 1, has the measurements).

No pickle anywhere.  :func:`decode` validates everything it is given: header
size, msgpack well-formedness, the protocol version, the message type, the
body's fields and their types (per type, :data:`SCHEMAS`), how deeply maps and lists
nest (:data:`MAX_DEPTH`: a deeper header would exhaust Python's recursion
limit wherever it is printed or written out), the array specs
(names, allowed dtypes, shapes), the frame count, and each frame's length.
Anything wrong raises :class:`ProtocolError` with a one-line reason, which the
server sends back as an ``error`` message and logs.
"""
from __future__ import annotations

import errno
import math
import socket as pysocket
import threading
from dataclasses import dataclass, field

import msgpack
import numpy as np
import zmq

from cnn_core.config import nests_within
from cnn_core.errors import PscnnError
from cnn_core.flat import FlatArrays
from cnn_core.text import for_count
from pscnn.names import MAX_NAME_LEN

PROTOCOL_VERSION = 2        # 2: one payload frame per dtype (1: one frame per array)
MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAYS = 256
MAX_DEPTH = 32              # maps and lists inside a header (a model spec with residual blocks: ~12)
MAX_MESSAGE_BYTES = 256 * 1024 * 1024          # the most any message's arrays may declare
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
# must be finite), float_or_nil, str, line (a str without control characters:
# the receiver logs it, and a newline would forge a log line), bool, dict, list.
# Unknown fields are rejected.
_TIMING = "dict"
SCHEMAS: dict[str, dict[str, tuple[str, bool]]] = {
    HELLO: {"role": ("str", True), "name": ("line", False), "pid": ("int", False),
            "host": ("line", False), "device": ("line", False)},
    WELCOME: {"worker_id": ("str", True), "role": ("str", True), "model": ("dict", True),
              "run": ("dict", True), "incarnation": ("str", True), "heartbeat_s": ("float", True)},
    WORK: {},
    PUSH: {"epoch": ("int", True), "batch": ("int", True), "lease": ("int", True),
           "base_version": ("int", True), "loss": ("float_or_nil", True),     # nil: NaN or Inf
           "correct": ("int", True), "count": ("int", True), "timing": (_TIMING, True)},
    TASK: {"version": ("int", True), "epoch": ("int", True), "batch": ("int", True),
           "lease": ("int", True), "held_s": ("float", True), "ack": ("dict", False)},
    WAIT: {"retry_s": ("float", True), "held_s": ("float", True), "reason": ("line", True),
           "ack": ("dict", False)},
    PULL: {"have_version": ("int", True)},
    # scored: the server holds an evaluation of this version that the evaluator's would not
    # change (the history's record of it; once done, the run's final evaluation): no need to score it
    WEIGHTS: {"version": ("int", True), "epoch": ("int", True), "done": ("bool", True),
              "updates": ("int", True), "scored": ("bool", False)},
    EVAL_REPORT: {"version": ("int", True), "final": ("bool", True), "metrics": ("dict", True)},
    HEARTBEAT: {"version": ("int", False), "done": ("bool", False)},
    STATUS: {"progress": ("dict", False)},
    BYE: {"reason": ("line", False)},
    # not_recorded: why an eval_report acknowledged was not recorded (one that came once the run's
    # results were written, or a final one once the run had its final evaluation)
    ACK: {"ack": ("dict", False), "not_recorded": ("line", False)},
    STOP: {"version": ("int", True), "reason": ("line", True), "ack": ("dict", False),
           "dropped": ("bool", False)},     # true: this trainer is dropped, the run goes on
    ERROR: {"code": ("line", True), "message": ("line", True)},
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


def one_line(text, limit: int = 300) -> str:
    """``text`` as one printable line of at most ``limit`` characters, for a log or a reply.

    Control characters are escaped (a newline from the other side must not
    forge a log line), and a longer text is cut, ending in "...".
    """
    text = str(text)
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return line if len(text) <= limit and len(line) <= limit else line[:limit - 3] + "..."


def error(code: str, message: str, seq: int = 0) -> Message:
    """An ``error`` reply: ``code`` machine-readable, ``message`` one printable line
    (it may quote what the rejected message said of itself; the receiver logs it)."""
    return Message(ERROR, seq=seq, body={"code": code, "message": one_line(message, 1000)})


def welcome(worker_id: str, role: str, model: dict, run: dict, incarnation: str, heartbeat_s: float) -> Message:
    """The server's answer to a hello: the peer's id, the model spec and the run's settings."""
    return Message(WELCOME, body={"worker_id": worker_id, "role": role, "model": model, "run": run,
                                  "incarnation": incarnation, "heartbeat_s": heartbeat_s})


def task(version: int, epoch: int, batch: int, lease: int, held_s: float, ack: dict | None = None,
         arrays: dict | None = None) -> Message:
    """A leased batch for a trainer, with the weights of ``version`` when the trainer lacks them
    (``arrays``), and the ack of the push it answers, if any."""
    body = {"version": version, "epoch": epoch, "batch": batch, "lease": lease, "held_s": held_s}
    if ack is not None:
        body["ack"] = ack
    return Message(TASK, body=body, arrays=arrays or {})


# ---------------------------------------------------------------- encoding

def encode(msg: Message) -> list:
    """Message -> list of frames: the msgpack header, then one payload per dtype.

    A :class:`FlatArrays` of NumPy arrays goes out as its buffer, with no
    copy; other arrays are packed (one copy per dtype with several arrays).
    Give the frames to ``send_multipart(..., copy=False)``; the caller must not
    modify the arrays in place until ZeroMQ has sent them (the server sends
    immutable snapshots for exactly that reason).  Raises :class:`ProtocolError`
    for what :func:`decode` would refuse and what msgpack cannot write.
    """
    _check_envelope(msg.type, msg.wid, msg.seq)
    _check_body(msg.type, msg.body)
    arrays = msg.arrays
    if isinstance(arrays, FlatArrays) and isinstance(arrays.flat, np.ndarray) and arrays.flat.dtype.isnative:
        dtype = arrays.flat.dtype.name
        if dtype not in _DTYPES:
            raise ProtocolError(f"arrays: dtype {dtype} is not one of {ALLOWED_DTYPES}")
        specs = [[name, dtype, list(shape)] for name, shape in arrays.specs]
        frames = [arrays.flat] if specs else []
    else:
        specs, groups = [], {}
        for name, arr in arrays.items():
            arr = np.asarray(arr)
            dtype = arr.dtype.name
            if dtype not in _DTYPES:
                raise ProtocolError(f"array {name!r}: dtype {dtype} is not one of {ALLOWED_DTYPES}")
            # The receiver reads native byte order, and a dtype's name does not say it ('>f4' is
            # 'float32'): a big-endian array's bytes would arrive as other numbers.
            arr = arr.astype(_DTYPES[dtype], copy=False)
            specs.append([name, dtype, list(arr.shape)])
            groups.setdefault(dtype, []).append(arr)
        # A frame is raw bytes: one array as is (copied only if not C-contiguous), several packed.
        frames = [np.ascontiguousarray(group[0]) if len(group) == 1 else np.concatenate([a.ravel() for a in group])
                  for group in groups.values()]
    _parse_specs(msg.type, specs)       # what decode would refuse is refused here, naming the sender's error
    try:
        header = msgpack.packb({"v": PROTOCOL_VERSION, "type": msg.type, "wid": msg.wid, "seq": msg.seq,
                                "body": msg.body, "arrays": specs}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:    # a set, a lone surrogate, an int past 64 bits
        reason = " ".join(str(exc).split())[:120]
        raise ProtocolError(f"{msg.type}: the header cannot be written as msgpack ({type(exc).__name__}: "
                            f"{reason})") from None
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"{msg.type} header is {len(header)} bytes, over the {MAX_HEADER_BYTES} limit",
                            "too_large")
    return [header, *frames]


def decode(frames) -> Message:
    """Frames (bytes or zmq.Frame) -> a validated :class:`Message`.

    Array values are read-only NumPy views of the received frames (no copy);
    ``arrays`` is a :class:`FlatArrays` over the payload when every array has
    one dtype.  Raises :class:`ProtocolError` naming the first problem found.
    """
    if not frames:
        raise ProtocolError("empty message")
    raw = _buffer(frames[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header is {len(raw)} bytes, over the {MAX_HEADER_BYTES} limit", "too_large")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:   # msgpack raises several types for garbage
        reason = " ".join(str(exc).split())[:120]
        raise ProtocolError(f"header is not valid msgpack ({type(exc).__name__}"
                            + (f": {reason})" if reason else ")")) from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    if not nests_within(header, MAX_DEPTH):     # before anything formats it
        raise ProtocolError(f"header nests maps and lists more than {MAX_DEPTH} deep")
    version = header.get("v")       # first: another version's header may have other keys
    if not _is_int(version) or version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}"[:100] + f" is not supported (this side speaks "
                            f"{PROTOCOL_VERSION})", "bad_version")
    unknown = sorted(set(header) - {"v", "type", "wid", "seq", "body", "arrays"}, key=repr)
    if unknown:
        raise ProtocolError(f"header has unknown keys {unknown}"[:200])
    mtype, wid, seq = header.get("type"), header.get("wid", ""), header.get("seq", 0)
    _check_envelope(mtype, wid, seq)
    body = header.get("body", {})
    _check_body(mtype, body)
    specs = header.get("arrays", [])
    groups = _parse_specs(mtype, specs)
    if len(frames) - 1 != len(groups):
        arrays, dtypes = len(specs), len(groups)
        raise ProtocolError(f"{mtype}: header describes {arrays} {for_count(arrays, 'array')} of {dtypes} "
                            f"{for_count(dtypes, 'dtype')}, so expects {dtypes} payload {for_count(dtypes, 'frame')} "
                            f"(one per dtype), got {len(frames) - 1}")
    payloads = []
    for (dtype, members, expected), frame in zip(groups, frames[1:]):
        buf = _buffer(frame)
        if len(buf) != expected:
            n = len(members)
            raise ProtocolError(f"{mtype}: {n} {dtype} {for_count(n, 'array')} ({members[0][0]!r} ...) "
                                f"{for_count(n, 'needs', 'need')} {expected} {for_count(expected, 'byte')}, "
                                f"frame has {len(buf)}")
        flat = np.frombuffer(buf, dtype=_DTYPES[dtype])
        flat.flags.writeable = False            # a view of the received frame: never written to
        payloads.append(FlatArrays(members, flat))
    if len(payloads) == 1:
        arrays = payloads[0]
    else:
        views = {name: payload[name] for payload in payloads for name in payload}
        arrays = {spec[0]: views[spec[0]] for spec in specs}      # header order
    return Message(mtype, wid, int(seq), body, arrays)


# repr(specs) -> _parse_specs' result.  Peers send the same one or two layouts
# in every message; validating them afresh was ~2/3 of decoding a push.  repr
# tells 1, 1.0 and True apart, so a cached layout is only reused for a list
# that would validate the same way again.
_SPEC_CACHE: dict = {}
_SPEC_CACHE_MAX = 64


def _parse_specs(mtype: str, specs) -> tuple:
    """Validated header ``arrays`` -> ((dtype, ((name, shape), ...), payload bytes), ...), in payload order.

    Immutable all the way down: the cache hands the same object to every caller.
    """
    key = repr(specs) if isinstance(specs, list) and len(specs) <= MAX_ARRAYS else None
    hit = _SPEC_CACHE.get(key) if key is not None else None
    if hit is not None:
        return hit
    if key is None:
        raise ProtocolError(f"{mtype}: 'arrays' must be a list of at most {MAX_ARRAYS} specs")
    members: dict[str, list] = {}         # dtype -> [(name, shape), ...] in payload order
    names = set()
    for spec in specs:
        name, dtype, shape = _check_spec(mtype, spec)
        if name in names:
            raise ProtocolError(f"{mtype}: array {name!r} appears twice")
        names.add(name)
        members.setdefault(dtype, []).append((name, tuple(shape)))
    groups = []
    for dtype, group in members.items():
        expected = sum(math.prod(shape) for _, shape in group) * _DTYPES[dtype].itemsize
        if expected > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"{mtype}: the {dtype} arrays would exceed {MAX_MESSAGE_BYTES} bytes", "too_large")
        groups.append((dtype, tuple(group), expected))
    groups = tuple(groups)
    if len(_SPEC_CACHE) >= _SPEC_CACHE_MAX:     # a client cycling through layouts: start over
        _SPEC_CACHE.clear()
    _SPEC_CACHE[key] = groups
    return groups


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
    # An empty array holds no bytes, but NumPy still refuses a shape whose other dimensions overflow
    # its strides ("array is too big"): a ValueError the server took for a bug of its own.
    if math.prod(d for d in shape if d) * _DTYPES[dtype].itemsize > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{mtype}: an empty array's other dimensions span over {MAX_MESSAGE_BYTES} bytes, "
                            f"an invalid shape: array {name!r} of shape {shape!r}"[:200])
    return name, dtype, shape


_CHECKS = {
    "int": _is_int,
    "float": lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v),
    "float_or_nil": lambda v: v is None or _CHECKS["float"](v),
    "str": lambda v: isinstance(v, str) and len(v) <= 4096,
    # what the server writes into its log as it is: no newline or other control
    # character may forge or hide a log line
    "line": lambda v: isinstance(v, str) and len(v) <= 4096 and v.isprintable(),
    "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
}
# What each kind of field must be, as an error message says it.
_KIND_TEXT = {
    "int": "an integer",
    "float": "a finite number",
    "float_or_nil": "a finite number or nil",
    "str": "a string of at most 4096 characters",
    "line": "a string of at most 4096 printable characters (no newline or control character)",
    "bool": "true or false",
    "dict": "a map",
    "list": "a list",
}


def _check_envelope(mtype, wid, seq) -> None:
    """The header's type, sender id and sequence number, as both sides check them."""
    if not isinstance(mtype, str) or mtype not in SCHEMAS:
        raise ProtocolError(f"unknown message type {mtype!r}"[:200], "unknown_type")
    if not isinstance(wid, str) or len(wid) > MAX_NAME_LEN or not wid.isprintable():
        raise ProtocolError(f"{mtype}: 'wid' must be a string of at most {MAX_NAME_LEN} printable characters")
    if not _is_int(seq) or seq < 0:
        raise ProtocolError(f"{mtype}: 'seq' must be a non-negative integer, got {seq!r}"[:200])


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
            raise ProtocolError(f"{mtype}: field {name!r} must be {_KIND_TEXT[kind]}, got {body[name]!r}"[:300])
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


def max_frame_bytes(model_bytes: int) -> int:
    """The largest frame a server whose model payload is ``model_bytes`` accepts.

    The server sets it as ZMQ_MAXMSGSIZE, which ZeroMQ checks against a
    frame's length prefix before reading it: a longer frame closes that
    connection, unanswered, and never takes the server's memory.  Twice a
    whole model (a push of every array as float64 is exactly that, and gets
    an error reply naming the dtype) plus a header.  ZeroMQ has no bound on a
    message's number of frames; :func:`decode` rejects any frame beyond the
    header's arrays.
    """
    return min(2 * int(model_bytes) + MAX_HEADER_BYTES, MAX_MESSAGE_BYTES)


def model_layout(model) -> tuple:
    """The layout of a push and of a weights reply: every parameter, then the model state.

    ``((name, shape), ...)``, the ``specs`` of the FlatArrays both sides send:
    the server takes a push in this layout without copying it.
    """
    return model.params.specs + tuple((name, tuple(v.shape)) for name, v in model.state.items())


# ---------------------------------------------------------------- socket helpers

class EndpointError(PscnnError, OSError):
    """A ZeroMQ endpoint that cannot be bound or connected: malformed, in use, not an address of this host."""


def bind(socket, endpoint: str) -> None:
    """``socket.bind(endpoint)``; EndpointError (one line, naming the endpoint) if it cannot.

    An ``ipc://`` path where another process listens is refused: ZeroMQ would
    unlink its socket file and take the address over silently (TCP says "in use").
    An abstract name (``ipc://@NAME``), which ZeroMQ refuses itself, gets the same words.
    """
    unix_address = ipc_path(endpoint)
    if unix_address is not None and _unix_socket_listening(unix_address):
        raise EndpointError(f"cannot bind {endpoint}: another process is listening there")
    try:
        _allow_ipv6(socket, endpoint)
        socket.bind(endpoint)
    except zmq.ZMQError as exc:
        # libzmq's "No such device" (a name that is no host name or interface here) and "Cannot assign
        # requested address" (another machine's address) do not say that the host part is the problem
        hint = NOT_THIS_MACHINE if exc.errno in (errno.ENODEV, errno.EADDRNOTAVAIL) else ""
        raise EndpointError(f"cannot bind {endpoint}: {zmq.strerror(exc.errno)}{hint}") from None


NOT_THIS_MACHINE = (": not an address, host name or network interface of this machine (a server binds its own; "
                    "tcp://*:PORT binds every one)")


def _allow_ipv6(socket, endpoint: str) -> None:
    """ZeroMQ sockets speak IPv4 only unless told otherwise: an IPv6 literal
    (``tcp://[::1]:5555``) would fail to bind ("No such device") or connect
    silently, forever."""
    if endpoint.startswith("tcp://["):
        socket.setsockopt(zmq.IPV6, 1)


def _unix_socket_listening(path: str) -> bool:
    """Whether a process accepts connections on the Unix socket ``path`` (a stale file: no), as
    :func:`ipc_path` gives it."""
    import socket as pysocket  # noqa: PLC0415  (only for ipc:// endpoints)
    probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:                 # no such file, refused (stale), not a socket, path too long
        return False
    finally:
        probe.close()


def own_context() -> zmq.Context:
    """A ZeroMQ context for one server or client, which it terminates once its sockets are closed.

    Not the process-wide ``Context.instance()``, which nobody terminates.  Frames go zero-copy
    (:func:`send`): libzmq's I/O thread holds each until it is sent or dropped, then hands it
    back through pyzmq's garbage-collector thread.  One handed back while the interpreter
    exits, as pyzmq's atexit takes that thread's sockets down, left the I/O thread waiting on a
    socket being destroyed, and libzmq aborted the process ("Assertion failed: pfd.revents &
    POLLIN (src/signaler.cpp:238)"): a trainer that gave up on a server cut off from it by its
    cable exited -6, not 1.  ``term()`` returns only when every frame is back, while the collector
    runs, and after a socket's linger (the server's last replies) rather than cut short by the exit.
    """
    return zmq.Context()


def connect(socket, endpoint: str) -> None:
    """``socket.connect(endpoint)``; EndpointError if the endpoint is malformed.

    A well-formed endpoint with nothing behind it is not an error: ZeroMQ
    connects in the background, and the clients' timeouts handle silence.
    """
    try:
        _allow_ipv6(socket, endpoint)
        socket.connect(endpoint)
    except zmq.ZMQError as exc:
        raise EndpointError(f"cannot connect to {endpoint}: {zmq.strerror(exc.errno)}") from None


def tcp_address(endpoint: str) -> tuple[str, str] | None:
    """The host (an IPv6 address without its brackets) and port of a ``tcp://[SOURCE;]HOST:PORT``
    endpoint, as written; None for another scheme."""
    scheme, _, rest = endpoint.partition("://")
    if scheme != "tcp":
        return None
    host, _, port = rest.rpartition(";")[2].rpartition(":")
    return host.strip("[]"), port


def ipc_path(endpoint: str) -> str | None:
    """The Unix socket address of an ``ipc://PATH`` endpoint, as ``socket.connect`` takes it (libzmq's
    ``ipc://@NAME``: NAME in Linux's abstract namespace); None for another scheme."""
    scheme, _, path = endpoint.partition("://")
    if scheme != "ipc":
        return None
    return "\0" + path[1:] if path.startswith("@") else path


# The lookups still running, (host, port) -> (their thread, the list it puts its answer in): a
# CURVE client probes the greeting every GREETING_PROBE_EVERY_S, and each probe against a DNS that
# hangs left one more thread behind until the resolver gave up.
_LOOKUPS: dict = {}
_LOOKUPS_LOCK = threading.Lock()


def look_up(host: str, port: str | None, timeout: float) -> tuple[list | None, str | None]:
    """``host``'s TCP addresses, as ``socket.getaddrinfo`` gives them (with ``port``): (addresses, None);
    ([], the resolver's words) for a name that does not resolve; (None, None) if the resolver has not
    answered within ``timeout``.  The lookup runs in a thread, left to finish on its own: no socket
    timeout bounds a resolver, which a slow DNS holds for seconds, nor does a SIGTERM, which waits
    for the main thread's call to return.  A call while a lookup of the same host and port is still
    running waits for that one instead of starting another."""
    key = (host, port)
    with _LOOKUPS_LOCK:
        if key not in _LOOKUPS:
            found: list = []

            def resolve() -> None:
                try:
                    found.append((pysocket.getaddrinfo(host, port, type=pysocket.SOCK_STREAM), None))
                except (OSError, UnicodeError) as exc:      # gaierror; a label the IDNA codec refuses
                    found.append(([], one_line(getattr(exc, "strerror", None) or exc, 200)))
                finally:
                    with _LOOKUPS_LOCK:
                        del _LOOKUPS[key]
            started = threading.Thread(target=resolve, name="resolve", daemon=True)
            started.start()             # before it is listed: one that fails to start is not waited on
            _LOOKUPS[key] = (started, found)    # (its removal waits for the lock we hold)
        lookup, found = _LOOKUPS[key]
    lookup.join(timeout)
    return found[0] if found else (None, None)


# A message is a header and one payload frame per dtype; a ROUTER puts the
# sender's routing id in front.
MAX_FRAMES = 1 + len(ALLOWED_DTYPES)


def recv_message(socket, flags: int = 0, routed: bool = False) -> tuple[list, int]:
    """One whole message from ``socket`` -> (its first frames, its frame count).

    At most MAX_FRAMES frames (one more with ``routed``: a ROUTER's routing
    id) are kept, as zmq.Frames; the rest are received and dropped one by one.
    ``recv_multipart`` would keep them all, and a message of two million empty
    frames (4 MB on the wire) then cost the server 560 MB and eight seconds
    before anything could refuse it.  The caller refuses a message whose count
    is over the limit.  ``flags`` apply to the first frame (the rest of a
    message arrives with it).
    """
    keep = MAX_FRAMES + (1 if routed else 0)
    frame = socket.recv(flags, copy=False)
    frames, count = [frame], 1
    while frame.more:
        frame = socket.recv(copy=False)
        count += 1
        if count <= keep:
            frames.append(frame)
    return frames, count


def too_many_frames(count: int, routed: bool = False) -> ProtocolError | None:
    """The error for a message of ``count`` frames (see :func:`recv_message`), or None if it is within the limit."""
    if count <= MAX_FRAMES + (1 if routed else 0):
        return None
    return ProtocolError(f"a message has at most {MAX_FRAMES} frames (a header and one payload frame per dtype), "
                         f"got {count - (1 if routed else 0)}", "too_large")


def decode_message(frames: list, count: int) -> Message:
    """:func:`decode` what :func:`recv_message` received from a DEALER (no routing id)."""
    excess = too_many_frames(count)
    if excess is not None:
        raise excess
    return decode(frames)


def send(socket, msg: Message, routing_id: bytes | None = None) -> None:
    """Send ``msg`` (zero-copy for arrays); ``routing_id`` for a ROUTER socket."""
    frames = encode(msg)
    if routing_id is not None:
        frames = [routing_id, *frames]
    socket.send_multipart(frames, copy=False)


def send_frames(socket, frames: list, routing_id: bytes | None = None) -> None:
    """Send pre-encoded frames (a cached reply being resent)."""
    socket.send_multipart([routing_id, *frames] if routing_id is not None else frames, copy=False)
