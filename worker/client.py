"""The client side of the protocol, with reliability in its own layer.

:class:`Client` gives trainers and the evaluator one call, :meth:`Client.request`,
which sends a message and returns the server's answer, whatever happens in
between (the "Lazy Pirate" pattern):

* each request carries (worker id, sequence number); on silence it is resent
  with the *same* number every ``resend_s`` (the server answers a resend from
  its reply cache and never applies a push twice);
* while heartbeats are answered the server lives, and a copy sent on a live
  connection is not lost (ZeroMQ over TCP loses one with its connection: a
  cut cable silences the heartbeats too, a restarted server does not answer
  them): such a request is resent only as a safety net, each copy twice as
  long after the last (from ``resend_s`` up to ``max_backoff_s``), never
  sooner than RTT_FACTOR round trips (``last_rtt_s``) nor later than
  ``give_up_after``.  Each copy of a push carries its gradients, and the
  server answers each with its own task: resent every second, they saturated
  a slow link (congestion collapse);
* a request whose connection alone dropped and was made again (ZeroMQ does so unseen:
  a reset, a NAT that forgot it) is resent at once, on the turn that reads so from the
  socket's monitor (:class:`~pscnn.curve.HandshakeWatch`): the copy on the old connection
  may be lost, and the heartbeats, on a connection of their own, are answered meanwhile;
* after ``reconnect_s`` of silence the socket is closed and reopened (ZeroMQ
  would otherwise keep stale messages queued) and resends back off
  exponentially, up to ``max_backoff_s``;
* after ``give_up_after`` seconds without any answer, :class:`ServerUnreachable`
  (time this process did not run, stopped or suspended, is not the server's silence);
  an answered heartbeat (a well-formed heartbeat reply: garbage or an error
  does not count) counts as an answer: a request the server holds back on
  purpose (at the start barrier, a sync round, an SSP bound) is not silence,
  but it is logged once it is held longer than ``give_up_after``, and given
  up after HELD_LIMIT_FACTOR times that: a server whose heartbeats live on
  while it never answers requests must not hold a worker for good.  The
  exception: the server's start barrier, which its own --start-timeout
  bounds; a request held past ``reconnect_s`` asks the server's status, and
  the time its status says the barrier holds is logged, and not held against it;
* a server that does not know this client (it restarted) answers
  ``unknown_worker``: the client says hello again and raises :class:`Rejoined`
  so the caller restarts its loop from a fresh task;
* a reply in another protocol version (a server of another pscnn release) is
  a :class:`BadReply` at once: resending cannot change the server's version;
* a handshake the server refused (a CURVE key it does not admit, CURVE on one
  side only: :mod:`pscnn.curve`) is a :class:`~pscnn.curve.HandshakeFailed`
  at the first silence, not silence until ``give_up_after``.

What the server says is not trusted further than :func:`protocol.decode`
checks it: a refusal is a :class:`ServerError`, a reply the client cannot use
(the wrong type, a heartbeat period or a task that makes no sense) a
:class:`BadReply`; both are :class:`~cnn_core.errors.PscnnError`, so the CLI
prints one line.  The trainer and the evaluator survive a few of them in a row
(:class:`FailureStreak`), not an endless run.  Numbers the client acts on are
clamped (``heartbeat_s``, a wait's ``retry_s``), and text from the server is
logged through :func:`protocol.one_line`.

A background thread sends heartbeats on its own socket, so a trainer stays
alive at the server during a long computation, and logs when the server stops
answering them.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket as pysocket
import threading
import time
import uuid
from datetime import datetime, timedelta

import zmq

from cnn_core.config import is_number
from cnn_core.errors import ConfigError, PscnnError
from cnn_core.text import for_count
from pscnn import curve
from pscnn import protocol as P
from pscnn.names import WID_SUFFIX_LEN, heartbeat_routing_id, name_problem, routing_id

log = logging.getLogger("pscnn.client")

# The heartbeat period the client accepts from a welcome.  The server sends
# max(0.2, peer_timeout / 5); 0 would flood it, 1e300 overflows a thread timeout.
HEARTBEAT_MIN_S, HEARTBEAT_MAX_S = 0.2, 60.0
# The longest a "wait" may make a trainer sleep (the server sends 0.05): a
# negative retry_s crashes time.sleep, a huge one parks the worker for good
# while its heartbeats keep it alive at the server.
MAX_RETRY_S = 2.0
# ... and the shortest: a retry_s of 0 would make the trainer ask again at once, for ever.
MIN_RETRY_S = 0.01
# Error or unusable replies in a row that a trainer or the evaluator survives.
# A working server answers a trainer's work request with a task, wait or stop,
# so a rejected push is followed by a good reply; five failures in a row mean
# the server refuses everything, and retrying for ever would hide it.
MAX_FAILURES_IN_A_ROW = 5
# The pause after the second failure in a row; it doubles with each further one.
FAILURE_PAUSE_S = 0.05
# A request's wait that ends this much later than it was to: the process did not run meanwhile
# (SIGSTOP, Ctrl-Z, a debugger, a paused VM), and that time is not the server's silence.
STALL_S = 1.0
# A request held back while heartbeats are answered gives up after this many
# times give_up_after (600 s by default: 100 minutes).  What a working server
# holds back for (a sync round, an SSP bound) takes seconds; its start barrier
# may take as long as its --start-timeout, and is not given up while it holds.
HELD_LIMIT_FACTOR = 10
# A request resent while heartbeats are answered waits at least this many of the last request's
# round trips: on a slow link a push and its task take seconds each way, and a copy resent before
# the first could be answered only added another pair to the queue.
RTT_FACTOR = 4
# ZeroMQ's wait before it makes a dropped connection again (request and heartbeat sockets), doubling
# up to the maximum while the server refuses it.
RECONNECT_IVL_MS, RECONNECT_IVL_MAX_MS = 100, 2000
# Heartbeat answers read in one pass of the heartbeat thread, the rest left for the next: one comes
# a heartbeat, a few after a stall.  A server streaming them kept the thread reading for good: no
# more heartbeats went, and close() gave up waiting for it.
MAX_HEARTBEAT_ANSWERS_A_PASS = 16


class ServerUnreachable(Exception):
    """No answer from the server for ``give_up_after`` seconds (or, once it said
    training is over, for ``reconnect_s``).  ``answering``: the server still answers
    heartbeats, but held our request back (or said only "wait") for too long: it
    hears a goodbye."""

    def __init__(self, message: str, answering: bool = False):
        super().__init__(message)
        self.answering = answering


class ServerError(PscnnError):
    """The server rejected a request (an ``error`` reply).  ``request``: which one, for the message."""

    def __init__(self, code: str, message: str, request: str | None = None):
        self.code = P.one_line(code, 64)
        self.message = P.one_line(message)
        what = f"the server refused our {request}: " if request else ""
        super().__init__(f"{what}{self.code}: {self.message}")


class BadReply(PscnnError):
    """The server answered with something this client cannot use: the wrong message
    type, or fields that make no sense (a task outside the run, a welcome without a seed)."""


class DroppedByServer(PscnnError):
    """The server told this trainer to stop and dropped it (its pushes were NaN or Inf while
    another trainer's were finite) while the run goes on.  ``exit_status``: the CLI's, 3, told
    apart from a failure (1): ``pscnn run`` names such a trainer but does not fail a run that
    completes without it."""

    exit_status = 3


class TooManyFailures(PscnnError):
    """The server answered :data:`MAX_FAILURES_IN_A_ROW` requests in a row with an error
    or an unusable reply, or forgot us again each time we joined."""


class FailureStreak:
    """Counts failed requests in a row: each is logged, the last of too many is raised.

    ``reset()`` on every usable answer.  The caller retries after :meth:`failed`
    returns; the streak bounds how often.
    """

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.count = 0

    def reset(self) -> None:
        self.count = 0

    def failed(self, exc: Exception, then: str) -> None:
        """Count ``exc``; raise :class:`TooManyFailures` naming it if it is one too many.

        From the second failure in a row on, pause before the caller retries
        (FAILURE_PAUSE_S, doubling each time): one refusal is routine (a push
        whose lease moved on), and the next request should go at once; a
        streak means something is wrong, and may clear in a moment.
        """
        self.count += 1
        if self.count >= MAX_FAILURES_IN_A_ROW:
            raise TooManyFailures(f"giving up after {self.count} failed requests in a row to {self.endpoint}; "
                                  f"the last: {exc}")
        if isinstance(exc, Rejoined) and exc.restarted and self.count == 1:
            # a server's restart (--resume): routine, not a warning; counted all the same, to
            # bound a server that forgets us every time
            log.info("%s; %s", exc, then)
            return
        log.warning("%s; %s (%d %s in a row; giving up at %d)", exc, then, self.count,
                    for_count(self.count, "failure"), MAX_FAILURES_IN_A_ROW)
        if self.count > 1:
            time.sleep(FAILURE_PAUSE_S * 2 ** (self.count - 2))


class Rejoined(Exception):
    """The server had forgotten us; we said hello again.  ``welcome`` is its answer; ``restarted``:
    it came from a new incarnation of the server (a restart, say with --resume: routine), else the
    same server had dropped us (declared dead, say), which ``why`` (its words) explains."""

    def __init__(self, welcome: P.Message, restarted: bool, why: str):
        super().__init__("the server restarted; joined it again" if restarted
                         else f"the server did not know us ({why}); joined it again")
        self.welcome = welcome
        self.restarted = restarted


class Client:
    def __init__(self, endpoint: str, role: str, name: str | None = None, device: str = "cpu",
                 give_up_after: float = 600.0, resend_s: float = 1.0, reconnect_s: float = 3.0,
                 max_backoff_s: float = 5.0, heartbeat: bool = True, keys: curve.ClientKeys | None = None):
        self.endpoint = endpoint
        self.keys = keys                        # CURVE: this client's key pair and the server's public key
        self.role = role
        host = pysocket.gethostname()
        self.name = name or f"{role}-{host[:64]}-{os.getpid()}"     # [:64]: the wid must fit (pscnn.names)
        problem = name_problem(self.name)
        if problem:
            raise ConfigError(f"client name {self.name[:60]!r}: {problem}")
        self.wid = f"{self.name}-{uuid.uuid4().hex[:WID_SUFFIX_LEN - 1]}"
        self.routing_id = routing_id(self.wid)
        self.device = device
        self.give_up_after = give_up_after
        self.resend_s = resend_s
        self.reconnect_s = reconnect_s
        self.max_backoff_s = max_backoff_s
        self.ctx = P.own_context()              # terminated by close()
        self.sock = None
        self.handshakes = curve.HandshakeWatch(endpoint, keys)     # on the request socket
        self.seq = 0
        self.welcome: P.Message | None = None
        self.heartbeat_s = 2.0
        self._want_heartbeat = heartbeat
        self._hb_thread = None
        self._closing = threading.Event()
        self.server_done = threading.Event()    # the last heartbeat answer said training is over
        # Set by a heartbeat answer that asks for a request now: training is over (server_done newly
        # set), or the server does not know us (it restarted: the next request joins again).  The
        # caller clears it; the evaluator waits on it between pulls.
        self.wake = threading.Event()
        self.heard_at = 0.0                     # monotonic time of the last well-formed heartbeat answer
        self.last_rtt_s = 0.0

    # ------------------------------------------------------------------ public API
    def connect(self) -> P.Message:
        """Say hello (retrying until the server answers); returns the welcome."""
        problem = unresolved_host(self.endpoint)
        if problem:             # may be a server not started yet (Compose): say so, and retry as for one down
            log.warning("%s: its host does not resolve (%s); retrying until it does, for up to %g s",
                        self.endpoint, problem, self.give_up_after)
        self.welcome = self._hello()
        if self._want_heartbeat and self._hb_thread is None:
            self._hb_thread = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
            self._hb_thread.start()
        return self.welcome

    def request(self, mtype: str, body: dict | None = None, arrays: dict | None = None) -> P.Message:
        """Send one request and return the answer (see the module docs for failures)."""
        msg = self._message(mtype, body, arrays)
        return self._answer(self._roundtrip(msg), msg.type)

    def submit(self, mtype: str, body: dict | None = None, arrays: dict | None = None) -> "Pending":
        """Send one request now; ``.result()`` on the returned handle waits for its answer.

        The caller works in between (a trainer computes its next batch while
        its push travels).  One request in flight at a time: collect the
        answer before the next ``request`` or ``submit``.  Resends and
        reconnects happen inside ``result()``, as in :meth:`request`.
        """
        msg = self._message(mtype, body, arrays)
        return Pending(self, msg, *self._send_first(msg))

    def _message(self, mtype: str, body: dict | None = None, arrays: dict | None = None) -> P.Message:
        """The next request from this client: its id and a new sequence number."""
        return P.Message(mtype, self.wid, self._next_seq(), body or {}, arrays or {})

    def _send_first(self, msg: P.Message) -> tuple[list, float]:
        """Send ``msg`` once, opening the socket if needed -> (its frames, for resends; the time sent)."""
        if self.sock is None:
            self._open()
        self.handshakes.check()     # a drop made good before this request goes lost none of it: not one after
        frames = P.encode(msg)
        sent_at = time.monotonic()
        self._send(frames)
        return frames, sent_at

    def _send(self, frames: list) -> None:
        """Send ``frames`` on the request socket, never blocking.

        A connection ZeroMQ dropped for a protocol error (a frame over MAXMSGSIZE, see :meth:`_open`)
        is not made again, and a DEALER with none blocks in send for good: reopen the socket.
        A message that still cannot go is lost like one the server missed, and resent.
        """
        try:
            self.sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.handshakes.check()     # the connection was refused, and no new one will do better
            log.info("no connection to %s to send on; reconnecting", self.endpoint)
            self._open()
            try:
                self.sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass

    def _answer(self, reply: P.Message, request: str) -> P.Message:
        """A reply, or the exception that an error reply means."""
        if reply.type == P.ERROR:
            if reply.body["code"] == "unknown_worker":
                # said once, by the caller (FailureStreak): a restart is routine, a drop a warning
                before = self.welcome.body["incarnation"] if self.welcome is not None else None
                self.welcome = self._hello()
                raise Rejoined(self.welcome, restarted=self.welcome.body["incarnation"] != before,
                               why=P.one_line(reply.body["message"], 300))
            raise ServerError(reply.body["code"], reply.body["message"], f"{request} request")
        return reply

    def close(self, say_bye: bool = False, reason: str = "done") -> None:
        self._closing.set()
        if say_bye and self.sock is not None:
            try:
                self._roundtrip(self._message(P.BYE, {"reason": reason}),
                                give_up_after=2.0)
            except (ServerUnreachable, PscnnError):     # ProtocolError, BadReply: it heard us, or cannot
                pass
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=5.0)      # it notices _closing within a quarter second
        self.handshakes.close()
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
        if self._hb_thread is None or not self._hb_thread.is_alive():
            self.ctx.term()     # every frame we sent is back (P.own_context); a thread's open socket would hold it

    # ------------------------------------------------------------------ internals
    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _hello(self) -> P.Message:
        body = {"role": self.role, "name": self.name, "pid": os.getpid(), "host": pysocket.gethostname(),
                "device": self.device}
        reply = self._roundtrip(self._message(P.HELLO, body))
        self.server_done.clear()                # a new welcome: what an earlier server said is over
        if reply.type == P.ERROR:
            raise ServerError(reply.body["code"], reply.body["message"], f"hello ({self.endpoint})")
        if reply.type != P.WELCOME:
            raise BadReply(f"{self.endpoint} answered our hello with {reply.type!r}, not a welcome")
        asked = float(reply.body["heartbeat_s"])
        self.heartbeat_s = min(max(asked, HEARTBEAT_MIN_S), HEARTBEAT_MAX_S)
        if self.heartbeat_s != asked:
            log.warning("the server asked for a heartbeat every %g s; sending one every %g s", asked, self.heartbeat_s)
        return reply

    def _open(self) -> None:
        self.handshakes.check()         # what the socket given up on said of its handshakes (a refusal)
        self.handshakes.close()
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = self._dealer(P.MAX_MESSAGE_BYTES)
        # The same secret routing id on every socket: the server (ROUTER_HANDOVER) reaches us across
        # reconnects, and nobody else can claim it (pscnn.names.routing_id).
        self.sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
        self.handshakes.watch(self.sock)
        P.connect(self.sock, self.endpoint)

    def _dealer(self, max_message_bytes: int):
        """A DEALER for the server, not yet connected, with what both of a client's sockets need.

        No linger; reconnects from RECONNECT_IVL_MS, doubling up to RECONNECT_IVL_MAX_MS (without a
        maximum ZeroMQ tries a server that is down every 100 ms for as long as it is down); frames up
        to ``max_message_bytes``, no frame the protocol accepts being longer (a longer one is refused
        from its length prefix, closing the connection, before it takes our memory, as on the
        server: P.max_frame_bytes); CURVE with the client's keys, if it has them.
        """
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        curve.secure_client(sock, self.keys)
        return sock

    def _check_deadlines(self, msg: P.Message, now: float, t0: float, quiet_from: float, limit: float,
                         malformed: str | None, held_from: float, silence_limit: float) -> None:
        """ServerUnreachable once the request sent at ``t0`` has waited past a limit with no reply
        (``quiet_from``: when the server's silence began, allowed ``silence_limit``; ``held_from``:
        when its holding the request back began to count, after any start barrier; see :meth:`_roundtrip`)."""
        if now - quiet_from > silence_limit:
            raise ServerUnreachable(f"no usable answer from {self.endpoint} for {silence_limit:g} s"
                                    + (f"; its last reply was malformed: {malformed}" if malformed else ""))
        if now - held_from > HELD_LIMIT_FACTOR * limit:
            raise ServerUnreachable(f"{self.endpoint} answered heartbeats but held our {msg.type} request "
                                    f"back for {now - held_from:.0f} s", answering=True)
        if self.server_done.is_set() and now - t0 > self.reconnect_s:
            raise ServerUnreachable(f"the server finished training and stopped answering ({self.endpoint})")

    def _roundtrip(self, msg: P.Message, give_up_after: float | None = None,
                   sent: tuple[list, float] | None = None) -> P.Message:
        """Send ``msg`` until its reply (same seq) arrives; resend/reconnect/back off on silence.

        ``sent``: (frames, time) of a message already sent once (:meth:`submit`).
        """
        limit = self.give_up_after if give_up_after is None else give_up_after
        # A given limit is a goodbye's (close()): short, and given up without a word; the server
        # may be writing its results, or gone, and no line about it helps the user.
        parting = give_up_after is not None
        frames, t0 = sent if sent is not None else self._send_first(msg)
        # The server's silence runs from the request, the last answered heartbeat (a server that
        # answers those is alive and holds the request back on purpose, up to a point), or the end
        # of a stall of this process, whichever is latest: a client stopped past its deadline, then
        # continued, gave up at once (exit 1, the server there), though it had not run to hear it.
        resumed_at = 0.0

        def quiet_from() -> float:
            if parting:             # its two seconds are the whole wait: heartbeats answered do not extend it
                return max(t0, resumed_at)
            return max(t0, self.heard_at, resumed_at)

        def silence_limit() -> float:
            # Answered heartbeats come a period (and a round trip) apart: a shorter limit gave up
            # on a live server between two of them (--give-up-after 2 with the default 2 s
            # period: a sync worker waiting for a straggler exited 1).
            if parting or not (self.heard_at or self._hb_thread is not None):
                return limit
            return max(limit, 2 * self.heartbeat_s)
        backoff = self.resend_s
        sent_at = t0
        malformed = None                    # the last reply we could not decode: "no answer" would mislead
        held_logged = False
        barrier_seen_at = 0.0               # when the server's status last said its start barrier holds
        barrier_asked_at = None             # when we last asked it
        at_barrier = False                  # what it said then

        def held_from() -> float:
            return max(t0, barrier_seen_at)

        def barrier_due() -> float:
            # when to ask the server's status next whether its start barrier holds (see below)
            if parting:
                return math.inf
            return t0 + min(self.reconnect_s, limit) if barrier_asked_at is None else barrier_asked_at + limit
        live_resends = 0                    # copies resent while heartbeats were answered

        def answering() -> bool:
            # a heartbeat answered within two periods (as silence_limit allows between two)
            return self.heard_at > 0 and time.monotonic() - self.heard_at < 2 * self.heartbeat_s

        def resend_after() -> float:
            """Seconds from the last copy sent to the next (see the module docs)."""
            if not answering():
                return backoff
            spaced = max(min(self.resend_s * 2 ** live_resends, self.max_backoff_s), RTT_FACTOR * self.last_rtt_s)
            return min(spaced, max(limit, self.resend_s))       # several before the held limit gives up
        reconnects = 0                      # the first is logged; the rest, one every max_backoff_s, at DEBUG only
        checked_at = time.monotonic()       # when the deadlines were last checked
        while True:
            now = time.monotonic()
            # A reply already here is read before any deadline is checked: the caller may have been
            # busy past one (a batch computed after submit) while its answer waited.  Not for more
            # than resend_s: a server streaming replies we cannot use kept us reading, never giving up.
            if now - checked_at >= self.resend_s or not self.sock.poll(0, zmq.POLLIN):
                checked_at = now
                # a refused handshake: said now, not after the deadline
                if self.handshakes.check():
                    # The connection dropped and ZeroMQ made it again: a copy sent on the old one may
                    # be lost with it, and, heartbeats answered, only the safety net would resend it.
                    log.debug("our connection to %s dropped and is made again; resending our %s request",
                              self.endpoint, msg.type)
                    self._send(frames)
                    sent_at = now
                # Held while the server lives: is it its start barrier?  Asked once it outlasts a
                # reconnect's wait (or give_up_after, if shorter: before the warning below), then
                # every give_up_after, so the log says why we wait, and the held limit does not
                # cut short a barrier the server's --start-timeout bounds.
                if self.heard_at > t0 and now >= barrier_due():
                    barrier_asked_at = now
                    was_at_barrier, at_barrier = at_barrier, self._at_start_barrier(msg, now - t0)
                    if at_barrier or was_at_barrier:    # (lifted since the last look: the hold counts from now)
                        barrier_seen_at = time.monotonic()
                    now = time.monotonic()      # the status took a moment: not a stall of ours
                self._check_deadlines(msg, now, t0, quiet_from(), limit, malformed, held_from(), silence_limit())
                # said once a heartbeat is answered past that: a server that went silent meanwhile
                # (a restart) is not holding it (it is given up on its silence)
                if now - held_from() > limit and self.heard_at > held_from() + limit and not held_logged \
                        and not parting:
                    held_logged = True
                    log.warning("the server holds our %s request back (%.0f s so far) while it answers "
                                "heartbeats; waiting up to %g s in all", msg.type, now - held_from(),
                                HELD_LIMIT_FACTOR * limit)
            # Until the next resend, but never past the moment we would give up: a backoff
            # of max_backoff_s would otherwise make the give-up that much late; nor past the
            # moment to ask about the start barrier, nor, while heartbeats are answered, past
            # the moment their silence would begin (the schedule on silence then applies).
            ask_at = barrier_due()
            wait = max(0.0, min(sent_at + resend_after(), quiet_from() + silence_limit(),
                                ask_at if ask_at > now else math.inf,
                                self.heard_at + 2 * self.heartbeat_s if answering() else math.inf) - now)
            ready = self.handshakes.poll(int(wait * 1000) + 1)     # woken by a reply or a connection's event
            stalled = time.monotonic() - (now + wait)
            if stalled > STALL_S:
                log.info("this process did not run for %.1f s (stopped or suspended); not counted as the "
                         "server's silence", stalled)
                t0 += stalled                   # nor as the time it held the request
                resumed_at = time.monotonic()
            if ready:
                try:
                    reply = P.decode_message(*P.recv_message(self.sock))
                except P.ProtocolError as exc:
                    if exc.code == "bad_version":       # it will never speak ours: retrying cannot help
                        raise BadReply(f"{self.endpoint} answered our {msg.type} in another protocol version: "
                                       f"{P.one_line(exc, 200)}; run the same pscnn release on the "
                                       "server and its workers") from None
                    # one line a request: a server streaming garbage had one written for each reply
                    text = P.one_line(exc, 200)
                    log.log(logging.DEBUG if malformed else logging.WARNING, "ignoring a malformed reply: %s", text)
                    malformed = text
                    continue
                if reply.seq == msg.seq or reply.type == P.ERROR and reply.seq == 0:
                    self.last_rtt_s = time.monotonic() - t0
                    return reply
                continue                    # an answer to an earlier resend: already handled
            now = time.monotonic()
            if now - sent_at >= resend_after():
                if answering():
                    live_resends += 1
                elif now - quiet_from() >= self.reconnect_s:
                    if reconnects or parting:
                        log.debug("no answer from %s for %.1f s; reconnecting again", self.endpoint, now - t0)
                    else:
                        # said once, and when it gives up and how not to: "(for up to 600 s)" left a user of a
                        # worker started before its server (or with none) to guess from when, and how to change it
                        # (to the nearest second: 596.9 s ahead is not said a second early)
                        give_up_at = datetime.now() + timedelta(seconds=quiet_from() + silence_limit() - now + 0.5)
                        log.info("no answer from %s for %.1f s; reconnecting, and again up to %g s apart until "
                                 "it answers; giving up at %s, after %g s without one (--give-up-after)",
                                 self.endpoint, now - t0, self.max_backoff_s, give_up_at.strftime("%H:%M:%S"),
                                 silence_limit())
                    reconnects += 1
                    self._open()
                    backoff = min(backoff * 2, self.max_backoff_s)
                self._send(frames)
                sent_at = now

    def _at_start_barrier(self, msg: P.Message, held_s: float) -> bool:
        """Whether the server's status says its start barrier holds (--wait-for-workers), logged
        with its count of trainers ready; False when it does not, or does not answer in time."""
        try:
            progress = query_status(self.endpoint, timeout=1.0, keys=self.keys)
        except PscnnError:          # not a status we can read: the held limit applies as before
            return False
        if not progress or progress.get("started", True) or progress.get("done"):
            return False
        start_in = progress.get("start_in_s")
        limit = (f"or in {start_in:.0f} s at the latest (its --start-timeout)"
                 if is_number(start_in)
                 else "or its --start-timeout after the first of them asked")     # a server that does not say
        log.info("waiting at the server's start barrier for %.0f s: it hands out work once %s trainers ask "
                 "for it (%s ready now), %s; our %s request waits for it", held_s,
                 P.one_line(progress.get("wait_for_workers", "?"), 20), P.one_line(progress.get("ready", "?"), 20),
                 limit, msg.type)
        return True

    def _heartbeats(self) -> None:
        """Background: a heartbeat every heartbeat_s on a socket of its own."""
        def open_socket():
            sock = self._dealer(P.MAX_HEADER_BYTES)     # a heartbeat's answer is a header alone
            # the one routing id besides the request socket's the server takes our heartbeats from
            sock.setsockopt(zmq.ROUTING_ID, heartbeat_routing_id(self.routing_id))
            P.connect(sock, self.endpoint)
            return sock
        sock = open_socket()
        frames = P.encode(P.Message(P.HEARTBEAT, self.wid, 0, {}))
        silent_since = None
        waited_from = time.monotonic()          # when this pass's wait for the period began
        try:
            while not self._closing.wait(self.heartbeat_s):
                # between requests nobody else reads the request socket's monitor, and a full one stops
                # every socket of the process, this one too (curve.HandshakeWatch)
                self.handshakes.drain()
                try:
                    sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                except zmq.Again:               # its connection dropped for good (see _send): a new one
                    sock.close(linger=0)
                    sock = open_socket()
                    waited_from = time.monotonic()
                    continue
                sent_at = time.monotonic()
                answered = self._heartbeat_answered(sock)
                if self._closing.is_set():
                    break
                forgotten = False               # it answered, but does not know us: not silence, and the
                                                # request in hand learns it too and joins again
                if answered:
                    answered = False            # only a well-formed heartbeat reply counts
                    for _ in range(MAX_HEARTBEAT_ANSWERS_A_PASS):
                        if not sock.poll(0, zmq.POLLIN):
                            break
                        try:
                            answer = P.decode_message(*P.recv_message(sock))
                        except P.ProtocolError:
                            continue
                        if answer.type == P.ERROR and answer.body["code"] == "unknown_worker":
                            forgotten = True
                            self.wake.set()
                            continue
                        if answer.type != P.HEARTBEAT:
                            continue
                        answered = True
                        if answer.body.get("done"):
                            if not self.server_done.is_set():
                                self.wake.set()
                            self.server_done.set()
                        else:                   # a restarted server trains again
                            self.server_done.clear()
                # A pass is a period's wait and at most a period for the answer; any longer, and this
                # process did not run (SIGSTOP, Ctrl-Z, a suspended VM): an answer it could not read
                # in time is not the server's silence
                paused_s = time.monotonic() - waited_from - 2 * self.heartbeat_s
                waited_from = time.monotonic()
                if answered:
                    self.heard_at = time.monotonic()
                    if silent_since is not None:
                        log.info("server answers heartbeats again (silent for %.1f s)", self.heard_at - silent_since)
                    silent_since = None
                elif silent_since is None and not forgotten and paused_s > STALL_S:
                    log.info("this process did not run for %.1f s or more (stopped or suspended) while it awaited a "
                             "heartbeat's answer; not counted as the server's silence", paused_s)
                elif silent_since is None and not forgotten:
                    # INFO: a server writing a checkpoint or its results, or restarting, misses one
                    # routinely; what matters is said by the request in hand (it gives up after
                    # --give-up-after of silence, or soon after the server said training is over)
                    silent_since = sent_at
                    if self.server_done.is_set():
                        log.info("server did not answer a heartbeat; it said training is over, so it may be "
                                 "writing its results, or gone")
                    else:
                        log.info("server did not answer a heartbeat within %g s (busy, restarting or gone); "
                                 "still sending one every %g s", self.heartbeat_s, self.heartbeat_s)
        finally:
            sock.close(linger=0)

    def _heartbeat_answered(self, sock) -> bool:
        """Whether an answer arrives within heartbeat_s; polled in short slices so close() need not wait it out."""
        deadline = time.monotonic() + self.heartbeat_s
        while not self._closing.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if sock.poll(int(min(left, 0.25) * 1000) + 1, zmq.POLLIN):
                return True
        return False


def unresolved_host(endpoint: str, timeout: float = 2.0) -> str | None:
    """Why the host of a ``tcp://HOST:PORT`` endpoint does not resolve (the resolver's words), or None.

    ZeroMQ connects to a name that does not resolve without a word, and retries in the
    background: a misspelt ``--server`` read as a server that does not answer, for
    ``--give-up-after`` (600 s).  A resolver that has not answered within ``timeout``
    is left to it (None): its lookup runs in a thread, so a slow DNS neither holds up
    the start nor a SIGTERM, which waits for the main thread's call to return.
    """
    address = P.tcp_address(endpoint)
    if address is None:
        return None
    return P.look_up(address[0], None, timeout)[1]


def retry_delay(reply: P.Message) -> float:
    """A wait's ``retry_s``, clamped to MIN_RETRY_S..MAX_RETRY_S."""
    return min(max(float(reply.body["retry_s"]), MIN_RETRY_S), MAX_RETRY_S)


class Pending:
    """A request sent by :meth:`Client.submit`, whose answer is collected later."""

    def __init__(self, client: Client, msg: P.Message, frames: list, sent_at: float):
        self.client, self.msg, self.frames, self.sent_at = client, msg, frames, sent_at

    def result(self) -> P.Message:
        """Wait for the answer (resending on silence); raises like :meth:`Client.request`."""
        return self.client._answer(self.client._roundtrip(self.msg, sent=(self.frames, self.sent_at)), self.msg.type)


def exit_status_unreachable(client: Client, exc: ServerUnreachable, logger) -> int:
    """Close ``client`` after the server went silent: 0 if it had said training was over.

    A server that still answers is told we leave: it hands our lease out, and stops counting us
    in a sync round, at once, not after its --peer-timeout."""
    client.close(say_bye=exc.answering, reason="gave up waiting for an answer")
    if client.server_done.is_set():
        logger.info("%s; exiting", exc)
        return 0
    logger.error("%s; giving up", exc)
    return 1


def query_status(endpoint: str, timeout: float = 1.0, keys: curve.ClientKeys | None = None) -> dict | None:
    """The server's progress dict, or None if it does not answer within ``timeout``.

    A one-shot request: no hello, no retries (a healthcheck must not linger).
    BadReply if what answers is not a pscnn server of this protocol version
    (its error reply must not pass for a healthy server); HandshakeFailed if
    it refused the connection (``keys``: a client's, for a server with CURVE).
    """
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_HEADER_BYTES)     # the answer is a header alone (see Client._open)
    curve.secure_client(sock, keys)
    handshakes = curve.HandshakeWatch(endpoint, keys, retries=False)     # one request, no retries
    handshakes.watch(sock)
    try:
        P.connect(sock, endpoint)
        P.send(sock, P.Message(P.STATUS, f"status-{os.getpid()}", 0, {}))
        deadline = time.monotonic() + timeout
        # checked at least four times in a short timeout: the greeting probe goes at half of it (HandshakeWatch.check)
        check_every_s = min(0.1, timeout / 4)
        while not sock.poll(int(min(max(deadline - time.monotonic(), 0.0), check_every_s) * 1000), zmq.POLLIN):
            handshakes.check(deadline)
            if time.monotonic() >= deadline:
                return None
        try:
            reply = P.decode_message(*P.recv_message(sock))
        except P.ProtocolError as exc:      # e.g. another service on that port: say which endpoint
            raise BadReply(f"{endpoint} answered a status request with what is not a pscnn message: "
                           f"{exc}") from None
        if reply.type != P.STATUS:          # e.g. an error: another protocol version answered
            raise BadReply(f"{endpoint} answered a status request with {reply.type!r}"
                           + (f" ({P.one_line(reply.body['code'])}: {P.one_line(reply.body['message'])})"
                              if reply.type == P.ERROR else ""))
        progress = reply.body.get("progress", {})
        try:        # what pscnn status prints: strict JSON (a pscnn server sends nothing else)
            json.dumps(progress, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise BadReply(f"{endpoint} answered a status request with a progress that is not JSON: "
                           f"{P.one_line(exc, 200)}") from None
        return progress
    finally:
        handshakes.close()
        sock.close(linger=0)


def status_from_args(args) -> int:
    """``pscnn status``: print the server's progress as JSON; exit 0 if it answered."""
    import sys  # noqa: PLC0415
    progress = query_status(args.server, args.timeout, curve.client_keys(args.keys) if args.keys else None)
    if progress is None:
        # asked only now: a name that resolves to nothing reads as a server that is down
        unresolved = unresolved_host(args.server)
        print(f"pscnn status: no answer from {args.server} within {args.timeout:g} s"
              + (f": its host does not resolve ({unresolved})" if unresolved else ""), file=sys.stderr)
        return 1
    print(json.dumps(progress, indent=2, sort_keys=True))
    return 0
