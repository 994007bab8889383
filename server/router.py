"""The server's ROUTER socket: its queues and TCP keepalive, and the open-files limit its peers'
connections need (ParameterServer.open sets them before it binds)."""
from __future__ import annotations

import math

import zmq

from cnn_core.text import for_count

# Messages queued from one peer's connection before ZeroMQ stops reading it (the peer's sends then
# wait; nothing is lost): each may be a push of the model's size.  A client has one request in
# flight per socket, resent only after a second of silence, and its heartbeats on a socket of their own.
RECEIVE_QUEUE = 16
# Replies queued for one peer's connection that its kernel buffers cannot take yet (beyond it, ZeroMQ
# drops them; a client resends a request left unanswered for a second, and gets the reply kept for it).
# Each pins the weights snapshot it carries: with 256, an evaluator pulling while the run trained and
# never reading held ~230 versions of the model (390 MB of seed's).  Not fewer: ZeroMQ learns late what
# the peer's connection took from the queue, so a queue this short can look full to a peer that reads
# every reply before it asks again, and the reply is dropped (one request and its reply at a time, on
# 127.0.0.1: 5 of 80,000 replies with 4, 2 of 280,000 with 16, none of 200,000 with 32 or 260,000 with 64).
SEND_QUEUE = 64
# TCP keepalive probes on a peer's connections once they are silent for --peer-timeout, then one each
# fifth of it, KEEPALIVE_PROBES unanswered closing them.  A host gone without closing its connections
# (a power cut, a preempted VM, a cable cut for good) left them open for good, with nothing queued on
# them for TCP to give up on: two file descriptors per vanished peer, for as long as the server ran.
# A live host's kernel answers the probes, whatever its process does.
KEEPALIVE_PROBES = 5
# The longest idle time and interval Linux takes (a longer one fails every accept)
KEEPALIVE_MAX_S = 32767

# Connections a peer holds open at the server (its requests' socket and its heartbeats'), and the
# file descriptors the server needs besides (its run folder's files, its log, ZeroMQ's own).
CONNECTIONS_PER_PEER = 2
FILES_BESIDES_PEERS = 64


def configure_router(sock, max_frame_bytes: int, peer_timeout: float) -> None:
    """Set ROUTER socket ``sock``'s options: frames up to ``max_frame_bytes``, TCP keepalive after
    ``peer_timeout`` of silence, and the queues of each peer's connection."""
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)   # a reconnecting client takes its id back
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.SNDHWM, SEND_QUEUE)
    sock.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)     # see KEEPALIVE_PROBES
    for option, seconds in ((zmq.TCP_KEEPALIVE_IDLE, peer_timeout), (zmq.TCP_KEEPALIVE_INTVL, peer_timeout / 5)):
        sock.setsockopt(option, min(KEEPALIVE_MAX_S, max(1, math.ceil(seconds))))
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_PROBES)
    # No ZMQ_HEARTBEAT_IVL / _TIMEOUT, although they would close a cut-off peer's connections
    # sooner (TCP gives one with unsent data up after ~15 minutes): with them libzmq 4.3.5 aborted the server
    # ("Assertion failed: !_io_error", libzmq issues #4364, #4767) under a flapping cable,
    # in 5 of 7 runs of tests/test_network.py's flapping test.


def raise_open_files_limit(max_workers: int) -> str | None:
    """Raise this process's soft limit on open files, up to its hard limit, to what ``max_workers``
    trainers and as many evaluators need; a warning if even the hard limit is short, else None.

    Each connection takes a file descriptor.  At a soft limit of 256, 244 peers used them all;
    the next ones were never answered (not even refused), status requests neither, ZeroMQ's
    thread spun on the failing accept, and the checkpoint could not be written.
    """
    try:
        import resource  # noqa: PLC0415  (POSIX; elsewhere the limit stays as it is)
    except ImportError:
        return None
    needed = 2 * max_workers * CONNECTIONS_PER_PEER + FILES_BESIDES_PEERS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    except (ValueError, OSError):   # a hard limit the kernel caps lower (macOS): keep the soft one
        pass
    if soft >= needed:
        return None
    fit = max(1, (soft - FILES_BESIDES_PEERS) // (2 * CONNECTIONS_PER_PEER))
    return (f"this server may open {soft} files at once (ulimit -n), but --max-workers {max_workers} "
            f"{for_count(max_workers, 'trainer')} and as many evaluators need up to {needed}: peers beyond the limit "
            f"would go unanswered and the checkpoint could not be written; raise the hard limit (ulimit -Hn) "
            f"or run with --max-workers {fit}")
