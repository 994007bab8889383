"""Synthetic clients for ``pscnn bench server``, and the raw zero-copy echo they are compared with.

    python -m pscnn.bench.synth echo --bind tcp://127.0.0.1:PORT
    python -m pscnn.bench.synth clients --endpoint E --kind pscnn|echo --count K \
        --result out.json [--model seed] [--name c0]

``clients`` runs ``count`` DEALER sockets in one thread, each with exactly
one request in flight (a worker's pattern), and never computes:

* ``pscnn``: the real protocol through :mod:`pscnn.protocol`: hello, work,
  then push (zero gradients of the whole model) -> task (with the newest
  weights) -> push ...; one *cycle* is one push and its reply;
* ``echo``: the same frames (header + one frame per array, same sizes) sent
  to the echo server, which returns them untouched; one cycle is one round
  trip.  Both directions carry the model's size, as in a pscnn cycle.

Once each of its sockets has completed a cycle, ``clients`` prints
:data:`CLIENTS_CYCLING`; the bench waits for that line from every process
before it picks the window, so that no client is still starting in it.  The
window comes on stdin as one line, ``T0 T1``: monotonic times (CLOCK_MONOTONIC
is shared by every process of the machine).  Cycles completing between them
are counted, with their latencies and bytes, and so are the error replies
answered between them; the clients stop at T1 and the result is one JSON
file.  Stdin closed before the window came (the bench gone) stops them too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid


# What the echo prints once it listens: until then its clients would connect to whatever else holds the port.
ECHO_LISTENING = "echo listening on"
# What a clients process prints once every one of its sockets has completed a cycle.
CLIENTS_CYCLING = "clients cycling"


def run_echo(bind: str) -> int:
    """A ROUTER that sends every message straight back, frames untouched (zero-copy both ways)."""
    import signal  # noqa: PLC0415

    import zmq  # noqa: PLC0415

    from pscnn import protocol as P  # noqa: PLC0415
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.RCVHWM, 10_000)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        P.bind(sock, bind)
    except P.EndpointError as exc:      # one line, as the pscnn server says it (a port taken: tried again)
        print(f"pscnn bench echo: error: {exc}", file=sys.stderr)
        sock.close(0)
        ctx.term()
        return 1
    print(f"{ECHO_LISTENING} {bind}", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        if sock.poll(100, zmq.POLLIN):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                sock.send_multipart(frames, copy=False)
    sock.close(0)
    ctx.term()
    return 0


def run_clients(args) -> int:
    import numpy as np  # noqa: PLC0415
    import zmq  # noqa: PLC0415

    from cnn_core.data import batch_length  # noqa: PLC0415
    from cnn_core.flat import FlatArrays  # noqa: PLC0415
    from cnn_core.model import build_model  # noqa: PLC0415
    from pscnn import curve  # noqa: PLC0415
    from pscnn import protocol as P  # noqa: PLC0415

    model = build_model(args.model, seed=0)
    buffer = np.zeros(sum(math.prod(shape) for _, shape in P.model_layout(model)), np.float32)
    buffer.flags.writeable = False          # shared by every socket, sent without copying
    zeros = FlatArrays(P.model_layout(model), buffer)
    keys = curve.client_keys(args.keys) if args.keys else None
    ctx = zmq.Context()
    poller = zmq.Poller()
    socks = {}
    host_prefix = f"{args.name}-{os.getpid()}"
    for i in range(args.count):
        s = ctx.socket(zmq.DEALER)
        wid = f"{host_prefix}-{i}-{uuid.uuid4().hex[:6]}"
        s.setsockopt(zmq.ROUTING_ID, wid.encode())
        s.setsockopt(zmq.LINGER, 0)
        curve.secure_client(s, keys)
        s.connect(args.endpoint)
        poller.register(s, zmq.POLLIN)
        socks[s] = {"wid": wid, "seq": 0, "sent_at": 0.0, "in_push": False, "retry_at": None,
                    "batch_size": 64, "num_samples": 0, "last_rtt": 0.0}

    echo_frames = None
    if args.kind == "echo":                 # the push's frames, built once
        push = P.Message(P.PUSH, "echo", 1, {"epoch": 0, "batch": 0, "lease": 1, "base_version": 0, "loss": 0.0,
                                             "correct": 0, "count": 64,
                                             "timing": {"compute_s": 0.0, "comm_s": 0.0, "wait_s": 0.0}}, zeros)
        echo_frames = P.encode(push)

    def frame_bytes(frames) -> int:
        return sum(len(f) if isinstance(f, (bytes, bytearray)) else getattr(f, "nbytes", None) or len(f)
                   for f in frames)

    def send(s, st, mtype, body=None, arrays=None):
        st["seq"] += 1
        frames = P.encode(P.Message(mtype, st["wid"], st["seq"], body or {}, arrays or {}))
        st["in_push"] = mtype == P.PUSH
        st["sent_bytes"] = frame_bytes(frames)
        st["sent_at"] = time.monotonic()
        s.send_multipart(frames, copy=False)

    cycles_done = []            # (completed at, round trip, bytes) of every cycle: the window's are counted at the end
    errors_done = []            # (answered at, error code) of every error reply: the window's are counted too
    not_cycled = set(socks)     # sockets still starting: once none is, the bench may open its window

    def cycled(s, st, now: float, frames) -> None:
        cycles_done.append((now, now - st["sent_at"], st["sent_bytes"] + frame_bytes(frames)))
        if s in not_cycled:
            not_cycled.discard(s)
            if not not_cycled:
                print(CLIENTS_CYCLING, flush=True)

    for s, st in socks.items():
        if echo_frames is not None:
            st["sent_bytes"] = frame_bytes(echo_frames)
            st["sent_at"] = time.monotonic()
            s.send_multipart(echo_frames, copy=False)
        else:
            send(s, st, P.HELLO, {"role": "trainer", "name": st["wid"], "pid": os.getpid(), "host": "synthetic",
                                  "device": "none"})
    window_fd, window_line = sys.stdin.fileno(), b""
    poller.register(window_fd, zmq.POLLIN)
    start = end = math.inf      # until the bench sends the window
    bench_gone = False
    stop_sent = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        timeout = max(1, int(min(0.05, end - now) * 1000))
        events = dict(poller.poll(timeout))
        if events.pop(window_fd, None):
            data = os.read(window_fd, 256)
            if not data:
                bench_gone = True
                break
            window_line += data
            if window_line.endswith(b"\n"):
                start, end = map(float, window_line.split())
                poller.unregister(window_fd)
        now = time.monotonic()
        for s, st in socks.items():                        # WAIT replies: ask again when told
            if st["retry_at"] is not None and now >= st["retry_at"]:
                st["retry_at"] = None
                send(s, st, P.WORK)
        for s in events:
            st = socks[s]
            frames = s.recv_multipart(copy=False)
            now = time.monotonic()
            if echo_frames is not None:
                cycled(s, st, now, frames)
                st["sent_at"] = time.monotonic()
                s.send_multipart(echo_frames, copy=False)
                continue
            rtt = now - st["sent_at"]
            msg = P.decode(frames)
            if msg.type in (P.TASK, P.WAIT, P.STOP) and st["in_push"]:
                cycled(s, st, now, frames)
            held = float(msg.body.get("held_s", 0.0)) if msg.type in (P.TASK, P.WAIT) else 0.0
            if msg.type == P.WELCOME:
                st["batch_size"] = int(msg.body["run"]["batch_size"])
                st["num_samples"] = int(msg.body["run"]["num_samples"])
                send(s, st, P.WORK)
            elif msg.type == P.TASK:
                b = msg.body
                send(s, st, P.PUSH, {"epoch": b["epoch"], "batch": b["batch"], "lease": b["lease"],
                                     "base_version": b["version"], "loss": 0.0, "correct": 0,
                                     "count": batch_length(st["num_samples"], st["batch_size"], b["batch"]),
                                     "timing": {"compute_s": 0.0, "comm_s": max(0.0, rtt - held),
                                                "wait_s": held}}, zeros)
            elif msg.type == P.WAIT:
                st["in_push"] = False
                st["retry_at"] = now + float(msg.body["retry_s"])
            elif msg.type == P.STOP:
                stop_sent += 1
                st["in_push"] = False
            else:                                           # error: count it and ask for work again
                code = msg.body.get("code", msg.type) if isinstance(msg.body, dict) else msg.type
                errors_done.append((now, code))
                send(s, st, P.WORK)
    for s in socks:
        s.close(0)
    ctx.term()
    if bench_gone:
        print("synthetic clients: stdin closed before the window came (the bench is gone)", file=sys.stderr)
        return 1
    result = {"count": args.count, "kind": args.kind, **window_counts(cycles_done, errors_done, start, end),
              "stopped": stop_sent, "model_bytes": int(zeros.flat.nbytes)}
    with open(args.result, "w") as fh:
        json.dump(result, fh)
    return 0


def window_counts(cycles_done: list, errors_done: list, start: float, end: float) -> dict:
    """What happened in the window [start, end] (monotonic seconds), of every cycle ``(completed at,
    round trip s, bytes)`` and every error reply ``(answered at, code)``: cycles, bytes, latencies in
    ms, and the error replies by code.  Those before it (start-up, warm-up) or after are not counted:
    the rates are per window."""
    counted = [c for c in cycles_done if start <= c[0] <= end]
    errors: dict = {}
    for at, code in errors_done:
        if start <= at <= end:
            errors[code] = errors.get(code, 0) + 1
    return {"cycles": len(counted), "bytes": sum(c[2] for c in counted),
            "latencies_ms": [round(c[1] * 1e3, 4) for c in counted], "errors": errors}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("echo", allow_abbrev=False)
    e.add_argument("--bind", required=True)
    c = sub.add_parser("clients", allow_abbrev=False)
    c.add_argument("--endpoint", required=True)
    c.add_argument("--kind", choices=["pscnn", "echo"], default="pscnn")
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--model", default="seed")
    c.add_argument("--name", default="synthetic")
    c.add_argument("--result", required=True)
    c.add_argument("--keys", default=None, help="a client's CURVE key folder (pscnn.curve), for a server with keys")
    args = p.parse_args(argv)
    from cnn_core.backend import tune_host_allocator  # noqa: PLC0415
    tune_host_allocator()       # as pscnn's entry points do: the echo and the clients stand in for its processes
    if args.what == "echo":
        return run_echo(args.bind)
    return run_clients(args)


if __name__ == "__main__":
    sys.exit(main())
