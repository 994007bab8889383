"""The client's reliability layer (worker.client): resends, reconnects, backoff, deadlines, heartbeats.

Two kinds of test.  The schedule tests run ``Client._roundtrip`` against a
simulated network and a simulated clock: ``time.monotonic`` in worker.client
is a counter that moves only when the client waits (a poll advances it by its
timeout), and the sockets are stand-ins that record what is sent, when, and on
which socket.  So a schedule of resends over a minute of silence is checked
exactly, in milliseconds, with no real waiting and nothing that a slow machine
could make flaky.  The other tests put a real ZeroMQ ROUTER on 127.0.0.1 (a
free port), served by a thread of this test, opposite a real ``Client``: that
the resend reaches the server under the same sequence number, that a silent
server sees a new connection, that a duplicate reply is not taken for the
next request's answer.  Every wait is bounded: the simulated clock refuses to
run past a limit, and the real tests give up after a few seconds.
"""
from __future__ import annotations

import logging
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from helpers import one_line_naming
from pscnn import curve
from pscnn import protocol as P
from worker import client as client_module
from worker.client import HELD_LIMIT_FACTOR, Client, ServerUnreachable

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
ENDPOINT = "tcp://127.0.0.1:9"              # never reached: the simulated network stands in for it


# ================================================================ a simulated clock and network

class OverTime(Exception):
    """The simulated clock ran past the test's limit: the client would have waited for ever."""


class SimSocket:
    """A DEALER stand-in: records its options, what is sent on it, and each poll's timeout.

    ``poll`` advances the simulated clock by its timeout unless ``net.on_poll``
    delivers a reply first; a negative timeout is refused, since ZeroMQ takes
    it to mean "wait for ever".
    """

    def __init__(self, net: "SimNet"):
        self.net = net
        self.options: dict = {}
        self.endpoint = None
        self.closed = False
        self.inbox: list[list[bytes]] = []

    def setsockopt(self, option, value) -> None:
        self.options[option] = value

    def connect(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def send_multipart(self, frames, copy: bool = True, flags: int = 0) -> None:
        assert not self.closed, "sent on a closed socket"
        self.net.sent.append((self.net.now, self, [bytes(f) for f in frames]))

    def poll(self, timeout=None, flags=zmq.POLLIN) -> int:
        assert timeout is not None and timeout >= 0, f"poll({timeout}): ZeroMQ would wait for ever"
        self.net.polls.append(timeout)
        if not self.inbox and self.net.on_poll is not None and timeout > 0:     # a peek (0) waits for nothing
            self.net.on_poll(self, timeout)
        if self.inbox:
            return zmq.POLLIN
        self.net.advance(timeout / 1000)
        return 0

    def recv(self, flags: int = 0, copy: bool = True):
        frames = self.inbox[0]
        frame = frames.pop(0)
        if not frames:
            self.inbox.pop(0)
        self.net.advance(self.net.recv_s)
        return SimpleNamespace(buffer=frame, more=bool(frames))

    def close(self, linger=None) -> None:
        self.closed = True

    def get_monitor_socket(self, events=None) -> "SimMonitor":
        self.monitor = SimMonitor()
        return self.monitor

    def disable_monitor(self) -> None:
        pass


class SimMonitor:
    """A socket monitor's stand-in (pscnn.curve.HandshakeWatch): ``events`` holds what a test
    delivers (:func:`monitor_event`), none unless it does."""

    def __init__(self):
        self.events: list[list[bytes]] = []

    def poll(self, timeout=None, flags=zmq.POLLIN) -> int:
        return zmq.POLLIN if self.events else 0

    def recv_multipart(self, flags: int = 0) -> list[bytes]:
        return self.events.pop(0)

    def close(self, linger=None) -> None:
        pass


class SimNet:
    """The simulated clock (``now``) and the sockets the client opened (it stands in for its zmq.Context)."""

    def __init__(self, limit_s: float):
        self.start = self.now = 1000.0
        self.limit = self.start + limit_s
        self.sockets: list[SimSocket] = []
        self.sent: list[tuple] = []                 # (time, socket, frames)
        self.polls: list[int] = []                  # each poll's timeout in ms
        self.on_poll = None                         # (socket, timeout_ms) -> None; may fill socket.inbox
        self.recv_s = 0.0                           # how long reading one reply takes
        self.terminated = False

    def advance(self, seconds: float) -> None:
        self.now += seconds
        if self.now > self.limit:
            raise OverTime(f"still waiting {self.now - self.start:.1f} s (simulated) after the request")

    def monotonic(self) -> float:
        return self.now

    def socket(self, kind) -> SimSocket:
        assert kind == zmq.DEALER
        self.sockets.append(SimSocket(self))
        return self.sockets[-1]

    def send_times(self) -> list[float]:
        return [t - self.start for t, _, _ in self.sent]

    def term(self) -> None:
        assert all(sock.closed for sock in self.sockets), "the context ended before its sockets were closed"
        self.terminated = True


def reply_frames(mtype: str, seq: int, body: dict | None = None) -> list[bytes]:
    return [bytes(f) for f in P.encode(P.Message(mtype, "", seq, body or {}))]


@pytest.fixture
def sim(monkeypatch):
    """sim(limit_s, **client_kwargs) -> (client, net): a Client whose clock and sockets are simulated."""

    def make(limit_s: float, **kwargs) -> tuple[Client, SimNet]:
        net = SimNet(limit_s)
        monkeypatch.setattr(client_module, "time", SimpleNamespace(monotonic=net.monotonic, sleep=net.advance))
        # no server to ask for its status (a request held asks whether it is at the start barrier)
        monkeypatch.setattr(client_module, "query_status", lambda endpoint, timeout, keys: None)
        # the stand-ins have no file for zmq.Poller to wait on; a monitor's event ends the wait at once, as there
        monkeypatch.setattr(curve.HandshakeWatch, "poll", lambda watch, timeout_ms: bool(
            watch.sock.poll(0 if watch.monitor.events else timeout_ms)))
        client = Client(ENDPOINT, "trainer", heartbeat=False, **kwargs)
        client.ctx = net
        return client, net
    return make


def monitor_event(kind: int) -> list[bytes]:
    """A socket monitor's event, as libzmq sends it (16-bit kind, 32-bit value; the endpoint)."""
    return [struct.pack("=hi", kind, 0), ENDPOINT.encode()]


# what a socket monitor says of a connection made, dropped and made again: a handshake on each
MADE_AND_MADE_AGAIN = (zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_SUCCEEDED)


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 2) for a, b in zip(times, times[1:])]


# ================================================================ the resend schedule

def assert_no_busy_wait(net) -> None:
    """Polls that wait (timeout > 0): at most two a send; the peeks (timeout 0) for a reply
    already there, one before each wait at most."""
    waits = [t for t in net.polls if t > 0]
    assert len(waits) <= 2 * len(net.sent), f"{len(waits)} waiting polls for {len(net.sent)} sends: a busy wait"
    assert len(net.polls) - len(waits) <= len(waits) + 1, f"polls {net.polls}: peeks without waits, a busy wait"


def test_silence_is_met_with_resends_then_reconnects_that_back_off_up_to_the_cap(sim):
    """The schedule on silence: resend every resend_s; from reconnect_s of silence on, each
    resend goes on a freshly opened socket and the interval doubles, up to max_backoff_s;
    give up at give_up_after.  A client whose backoff does not grow hammers a dead server
    (and every other client's reconnect) for as long as it is down; one whose backoff has
    no cap, or starts at the cap, notices a restarted server minutes late; one that
    reconnects from the first resend throws away a reply that was merely slow."""
    client, net = sim(60, give_up_after=30.0, resend_s=1.0, reconnect_s=3.0, max_backoff_s=5.0)
    with pytest.raises(ServerUnreachable, match="no usable answer from .* for 30 s"):
        client.request(P.WORK)
    assert gaps(net.send_times()) == [1.0, 1.0, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0], net.send_times()
    assert_no_busy_wait(net)
    # given up at the deadline: not early, and not a backoff's length late
    assert 30.0 < net.now - net.start < 30.1


class StoppedClock(datetime):
    """datetime whose now() is 12:00:00.2: what the log's clock times are read against (rounded to
    the second, a moment after a whole one)."""

    @classmethod
    def now(cls, tz=None):
        return cls(2026, 1, 1, 12, 0, 0, 200_000)


def test_a_fractional_give_up_after_is_said_as_given(sim, caplog, monkeypatch):
    """--give-up-after 7.5 read "for up to 8 s" and "for 8 s" in the worker's log (0.4: "for 0 s")."""
    monkeypatch.setattr(client_module, "datetime", StoppedClock, raising=False)
    client, net = sim(60, give_up_after=7.5, resend_s=1.0, reconnect_s=3.0, max_backoff_s=5.0)
    with caplog.at_level(logging.INFO, logger="pscnn.client"), pytest.raises(ServerUnreachable) as exc:
        client.request(P.WORK)
    assert str(exc.value) == f"no usable answer from {ENDPOINT} for 7.5 s"
    assert [r.getMessage() for r in caplog.records] == [
        f"no answer from {ENDPOINT} for 3.0 s; reconnecting, and again up to 5 s apart until it answers; giving "
        "up at 12:00:05, after 7.5 s without one (--give-up-after)"]


def test_no_server_at_the_address_is_said_once_with_when_it_gives_up_and_the_flag(sim, caplog, monkeypatch):
    """A worker started with no server listening retries for its whole --give-up-after (600 s). Its one
    line said "(for up to 600 s)": not until when (600 s from what?), nor which flag changes it."""
    monkeypatch.setattr(client_module, "datetime", StoppedClock, raising=False)
    client, net = sim(700, give_up_after=600.0, resend_s=1.0, reconnect_s=3.0, max_backoff_s=5.0)
    with caplog.at_level(logging.INFO, logger="pscnn.client"), pytest.raises(ServerUnreachable):
        client.request(P.WORK)
    assert len(net.sockets) > 100                       # it reconnected every 5 s for 10 minutes...
    assert [r.getMessage() for r in caplog.records] == [  # ... and said so once, at the first
        f"no answer from {ENDPOINT} for 3.0 s; reconnecting, and again up to 5 s apart until it answers; giving "
        "up at 12:09:57, after 600 s without one (--give-up-after)"]


def test_every_resend_is_the_same_request_and_each_reconnect_opens_a_new_socket(sim):
    """The server applies a push once per (worker id, seq): a resend under a new number would
    be a second push of the same gradients.  A reconnect must close the old socket (ZeroMQ
    would keep stale messages queued on it, and a long outage would leak one socket per
    reconnect) and open a new one under the same routing id (its worker id and a secret token,
    pscnn.names.routing_id), so that the server's replies (ROUTER_HANDOVER) reach the client
    across reconnects."""
    client, net = sim(60, give_up_after=30.0, resend_s=1.0, reconnect_s=3.0, max_backoff_s=5.0)
    with pytest.raises(ServerUnreachable):
        client.request(P.WORK)
    first = net.sent[0][2]
    assert P.decode(first).seq == client.seq
    assert all(frames == first for _, _, frames in net.sent), "a resend differs from the request"
    reconnect_at = [3.0, 5.0, 9.0, 14.0, 19.0, 24.0, 29.0]
    assert len(net.sockets) == 1 + len(reconnect_at)
    for sock in net.sockets:
        assert sock.options.get(zmq.ROUTING_ID) == client.routing_id and sock.endpoint == ENDPOINT
    assert all(sock.closed for sock in net.sockets[:-1]), "a reconnect left the old socket open"
    # each resend from the first reconnect on goes out on a socket of its own, the newest at the time
    on = [net.sockets.index(sock) for _, sock, _ in net.sent]
    assert on == [0, 0, 0, *range(1, len(net.sockets))], on
    assert [round(net.sent[i][0] - net.start) for i in range(3, len(net.sent))] == reconnect_at


def test_a_request_held_back_while_heartbeats_are_answered_is_resent_without_reconnecting(sim):
    """At a sync barrier the server holds a request for as long as the slowest worker takes,
    and answers the heartbeats meanwhile.  The client does not reconnect: a reconnect would
    drop the reply the server is about to send.  Its copy is not lost on a live connection,
    so it resends only as a safety net, backing off (up to give_up_after, here 2 s); it
    gives up after HELD_LIMIT_FACTOR times give_up_after, not at give_up_after, and not never."""
    client, net = sim(100, give_up_after=2.0, resend_s=1.0, reconnect_s=3.0, max_backoff_s=5.0)

    def heartbeats_answered(sock, timeout_ms):
        client.heard_at = net.now           # what the heartbeat thread does on each answered heartbeat
    net.on_poll = heartbeats_answered
    with pytest.raises(ServerUnreachable, match="answered heartbeats but held our work request back"):
        client.request(P.WORK)
    assert len(net.sockets) == 1, "reconnected while the server answered heartbeats"
    assert gaps(net.send_times())[0] == 1.0 and set(gaps(net.send_times())[1:]) == {2.0}, net.send_times()
    assert_no_busy_wait(net)
    assert HELD_LIMIT_FACTOR * 2.0 < net.now - net.start < HELD_LIMIT_FACTOR * 2.0 + 1.1


def test_a_push_held_back_on_a_live_slow_link_is_not_resent_every_second(sim):
    """A push (1.7 MB of gradients for the seed model) and its task (1.7 MB of weights) take
    seconds on a slow link, and the server answers every copy with a task of its own.  Resent
    every second while the heartbeats said the server lived, the copies and their answers
    saturated a 1 MB/s link: each push waited longer than the last (answered 3.4, 10, 22, 43, 79 s in).
    A copy on a live connection is not lost: the resends back off from resend_s, and none
    comes within RTT_FACTOR of the last round trip (3.5 s here)."""
    client, net = sim(60, give_up_after=600.0, resend_s=1.0, reconnect_s=3.0, max_backoff_s=5.0)
    client.last_rtt_s = 3.5

    def heartbeats_answered(sock, timeout_ms):
        client.heard_at = net.now
    net.on_poll = heartbeats_answered
    with pytest.raises(OverTime):
        client.request(P.WORK)      # (a push's body is checked before it goes: the same wait for a work request)
    assert gaps(net.send_times()) == [14.0] * 4, net.send_times()       # every second: 60 copies
    assert len(net.sockets) == 1
    # it wakes about once a heartbeat period, to see whether their answers stopped (not a busy wait)
    waits = [t for t in net.polls if t > 0]
    assert len(waits) <= (net.now - net.start) / client.heartbeat_s + len(net.sent), net.polls

    fast, net = sim(30, give_up_after=600.0, resend_s=1.0, reconnect_s=3.0, max_backoff_s=5.0)    # a fast link

    def answered(sock, timeout_ms):
        fast.heard_at = net.now
    net.on_poll = answered
    with pytest.raises(OverTime):
        fast.request(P.WORK)
    assert gaps(net.send_times()) == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0], net.send_times()


def test_a_request_whose_connection_dropped_and_was_made_again_is_resent_on_the_turn_that_reads_so(sim):
    """Heartbeats answered, the safety net would resend the request after resend_s (30 s here).  Its
    connection drops 2 s in and ZeroMQ makes it again: the copy sent on it may be lost with it.  The
    client resends on the loop turn that reads so from the socket monitor, on the same socket, and
    the safety net counts from that copy."""
    client, net = sim(40, give_up_after=600.0, resend_s=30.0, max_backoff_s=30.0)
    client._open()
    first, again = (monitor_event(kind) for kind in MADE_AND_MADE_AGAIN)
    net.sockets[0].monitor.events.append(first)
    seen: dict = {}

    def server(sock, timeout_ms):
        client.heard_at = net.now
        if "dropped" not in seen and net.now - net.start >= 2.0:
            seen["dropped"] = net.now - net.start
            sock.monitor.events.append(again)
        elif "dropped" in seen and "sent_by_the_next_wait" not in seen:
            seen["sent_by_the_next_wait"] = len(net.sent)
    net.on_poll = server
    with pytest.raises(OverTime):
        client.request(P.WORK)
    assert seen["sent_by_the_next_wait"] == 2, (seen, net.send_times())
    times = net.send_times()
    assert len(times) == 3 and times[1] - seen["dropped"] <= 2 * client.heartbeat_s, (seen, times)
    assert gaps(times)[1] == 30.0, times
    assert len(net.sockets) == 1
    # it wakes about once a heartbeat period, to see whether their answers stopped (not a busy wait)
    waits = [t for t in net.polls if t > 0]
    assert len(waits) <= (net.now - net.start) / client.heartbeat_s + len(net.sent), net.polls


def test_a_connection_dropped_and_made_again_before_a_request_goes_costs_it_no_second_copy(sim):
    """A drop made good while no request was out (a trainer computing) lost nothing: the next request
    goes on the new connection, once, not twice (a push's copy is its gradients again)."""
    client, net = sim(20, give_up_after=600.0, resend_s=30.0, max_backoff_s=30.0)
    client._open()
    net.sockets[0].monitor.events += [monitor_event(kind) for kind in MADE_AND_MADE_AGAIN]
    with pytest.raises(OverTime):
        client.request(P.WORK)
    assert net.send_times() == [0.0]


def test_handshakes_failed_while_the_server_was_down_are_forgotten_once_one_succeeds(sim, tmp_path):
    """A client with keys idle between requests: three handshakes failed without a reason (its server down
    behind a proxy, say), then one succeeded (the server is back).  The next request read the third failure
    and ended the client, saying its server.key might be the wrong key, before it read the success."""
    curve.make_keys(tmp_path / "keys", ["client-0"])
    client, net = sim(20, give_up_after=600.0, keys=curve.client_keys(tmp_path / "keys" / "client-0"))
    client._open()
    failed = monitor_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    succeeded = monitor_event(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    net.sockets[0].monitor.events += [failed] * curve.SILENT_FAILURES_LIMIT + [succeeded]
    with pytest.raises(OverTime):       # resent on silence until the test's limit: no HandshakeFailed
        client.request(P.WORK)
    assert net.send_times()[0] == 0.0


def test_a_request_whose_heartbeats_fall_silent_meanwhile_is_resent_on_the_silence_schedule(sim):
    """Heartbeats answered when the request went, then silence (the server restarted, or the
    cable was cut): the long spacing of resends on a live connection must not delay the
    reconnect that reaches a restarted server; from two heartbeat periods of silence on, the
    schedule on silence applies."""
    client, net = sim(60, give_up_after=30.0, resend_s=1.0, reconnect_s=3.0, max_backoff_s=5.0)
    client.heartbeat_s = 2.0
    client.last_rtt_s = 10.0                    # a live link would wait 40 s before a resend
    client.heard_at = net.now                   # the last heartbeat answered as the request went
    with pytest.raises(ServerUnreachable, match="no usable answer"):
        client.request(P.WORK)
    times = net.send_times()
    assert round(times[1], 2) == 4.0, times     # the first resend as the silence begins, not at 40 s
    assert len(net.sockets) > 1, "never reconnected to a silent server"
    assert_no_busy_wait(net)


def test_a_request_held_at_the_start_barrier_waits_for_it_and_says_why(sim, caplog, monkeypatch):
    """A server started with --wait-for-workers 2 --start-timeout 3600 holds the first trainer's
    work request until the second asks.  That trainer said nothing about why for --give-up-after
    (600 s), then warned and gave up at ten times that, while the server would have waited an
    hour, and started without it.  The server's status says its barrier holds: the trainer says
    so from the start, again every give_up_after, and waits for as long as it holds."""
    client, net = sim(200, give_up_after=2.0, resend_s=1.0, reconnect_s=3.0, max_backoff_s=5.0)
    opened_at = net.now + 49.5                  # far past HELD_LIMIT_FACTOR * give_up_after (20 s)
    asked: list[float] = []

    def status(endpoint, timeout, keys):
        if net.now < opened_at:
            asked.append(round(net.now - net.start))
        return {"started": net.now >= opened_at, "done": False, "ready": 1, "wait_for_workers": 2}
    monkeypatch.setattr(client_module, "query_status", status)

    def server(sock, timeout_ms):
        client.heard_at = net.now               # heartbeats answered all along
        if net.now >= opened_at and not sock.inbox:
            sock.inbox.append(reply_frames(P.TASK, client.seq, {"version": 0, "epoch": 0, "batch": 0, "lease": 1,
                                                                "held_s": 50.0}))
    net.on_poll = server
    with caplog.at_level(logging.INFO, logger="pscnn.client"):
        reply = client.request(P.WORK)
    assert reply.type == P.TASK
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert all(level == logging.INFO for level, _ in lines), lines
    assert lines[0][1] == ("waiting at the server's start barrier for 2 s: it hands out work once 2 trainers ask "
                           "for it (1 ready now), or its --start-timeout after the first of them asked; our work "
                           "request waits for it"), lines
    assert asked[:3] == [2, 4, 6] and len(lines) == len(asked) > 20, (asked, lines)    # one per barrier answer
    assert net.now - net.start > HELD_LIMIT_FACTOR * 2.0


def test_the_start_barrier_line_says_how_long_the_server_can_hold_it(sim, caplog, monkeypatch):
    """A server whose status gives the seconds its --start-timeout leaves: the line says them (it
    said only "or its --start-timeout after the first of them asked")."""
    client, net = sim(201, give_up_after=2.0, resend_s=1.0, reconnect_s=3.0, max_backoff_s=5.0)
    opened_at = net.now + 3.5
    monkeypatch.setattr(client_module, "query_status", lambda endpoint, timeout, keys: {
        "started": net.now >= opened_at, "done": False, "ready": 1, "wait_for_workers": 2, "start_in_s": 597.4})

    def server(sock, timeout_ms):
        client.heard_at = net.now
        if net.now >= opened_at and not sock.inbox:
            sock.inbox.append(reply_frames(P.TASK, client.seq, {"version": 0, "epoch": 0, "batch": 0, "lease": 1,
                                                                "held_s": 3.5}))
    net.on_poll = server
    with caplog.at_level(logging.INFO, logger="pscnn.client"):
        assert client.request(P.WORK).type == P.TASK
    assert caplog.records[0].getMessage() == (
        "waiting at the server's start barrier for 2 s: it hands out work once 2 trainers ask for it (1 ready "
        "now), or in 597 s at the latest (its --start-timeout); our work request waits for it")


def test_a_give_up_after_shorter_than_the_heartbeat_period_does_not_give_up_on_a_live_server(sim):
    """Heartbeats are answered a period apart (2 s by default, and a round trip).  With
    --give-up-after 2, a sync worker whose push waited for a straggler found 2 s since the last
    answer between two of them, and gave up ("no usable answer ... for 2 s", exit 1) on a
    server that answered every heartbeat.  The silence allowed is two periods at least."""
    client, net = sim(100, give_up_after=2.0, resend_s=1.0, reconnect_s=3.0, max_backoff_s=5.0)
    client.heartbeat_s = 2.0
    period = 2.05                               # a period and a round trip between two answers
    answered_at = net.now + 6 * period          # the straggler's gradient arrives
    client.heard_at = net.now                   # a heartbeat answered as the request went

    def server(sock, timeout_ms):
        client.heard_at = net.start + int((net.now - net.start) / period) * period
        if net.now >= answered_at and not sock.inbox:
            sock.inbox.append(reply_frames(P.TASK, client.seq, {"version": 1, "epoch": 0, "batch": 2, "lease": 3,
                                                                "held_s": 12.0}))
    net.on_poll = server
    assert client.request(P.WORK).type == P.TASK
    assert_no_busy_wait(net)


def test_a_request_whose_server_went_silent_is_not_said_to_be_held_back(sim, caplog):
    """A push sent as the server stopped (a restart), with --give-up-after 3 under two heartbeat
    periods (4 s): the worker logged "server did not answer a heartbeat", then "WARNING the server
    holds our push request back (3 s so far) while it answers heartbeats", then gave up on its
    silence.  That warning is for a server that answers heartbeats; this one had stopped."""
    client, net = sim(100, give_up_after=3.0, resend_s=1.0, reconnect_s=3.0, max_backoff_s=5.0)
    client.heartbeat_s = 2.0
    client._hb_thread = SimpleNamespace(join=lambda timeout=None: None, is_alive=lambda: False)  # heartbeats on

    def server(sock, timeout_ms):           # one heartbeat answered after the request went, then silence
        if net.now - net.start >= 0.5 and not client.heard_at:
            client.heard_at = net.now
    net.on_poll = server
    with caplog.at_level(logging.INFO, logger="pscnn.client"), \
            pytest.raises(ServerUnreachable, match="no usable answer from .* for 4 s"):
        client.request(P.WORK)      # (a push's body is checked before it goes: the same wait for a work request)
    assert "holds our work request back" not in caplog.text, caplog.text


def test_a_request_sent_before_the_first_heartbeat_answer_waits_for_it(sim):
    """The first heartbeat goes a period after the welcome: a request held from the start (the
    start barrier) with a --give-up-after shorter than that gave up before any heartbeat could
    be answered.  With heartbeats on, the silence allowed is two periods from the start too."""
    client, net = sim(100, give_up_after=0.5, resend_s=1.0, reconnect_s=3.0, max_backoff_s=5.0)
    client.heartbeat_s = 2.0
    client._hb_thread = SimpleNamespace(join=lambda timeout=None: None, is_alive=lambda: False)  # heartbeats on

    def server(sock, timeout_ms):
        if net.now - net.start >= 2.0:
            client.heard_at = net.now           # the first heartbeat answered, a period in
        if net.now - net.start >= 3.0 and not sock.inbox:
            sock.inbox.append(reply_frames(P.WAIT, client.seq, {"retry_s": 0.05, "held_s": 3.0, "reason": "test"}))
    net.on_poll = server
    assert client.request(P.WORK).type == P.WAIT


def test_silence_after_the_server_said_it_is_done_ends_the_request_after_reconnect_s(sim):
    """Once the heartbeats said training is over, a silent server has finished and gone: the
    worker stops after reconnect_s.  Waiting out give_up_after (10 minutes by default)
    leaves every worker hanging at the end of each run; giving up at once would drop a
    final answer that is merely slow."""
    client, net = sim(100, give_up_after=60.0, resend_s=1.0, reconnect_s=3.0, max_backoff_s=5.0)
    client.server_done.set()

    def done_heartbeats(sock, timeout_ms):
        client.heard_at = net.now
    net.on_poll = done_heartbeats
    with pytest.raises(ServerUnreachable, match="the server finished training and stopped answering"):
        client.request(P.WORK)
    assert 3.0 < net.now - net.start < 3.0 + 1.1


def test_a_stale_reply_read_late_is_skipped_and_the_next_wait_is_never_negative(sim):
    """An answer to an earlier request (a duplicate the server sent for a resend) is dropped,
    not returned as this request's answer: a trainer would act on an old task.  Reading it
    may take the client past the moment of its next resend; the wait that follows must be
    0, not negative: ZeroMQ takes a negative poll timeout as "wait for ever", and the
    worker would hang."""
    client, net = sim(60, give_up_after=30.0, resend_s=1.0, reconnect_s=3.0, max_backoff_s=5.0)
    client.seq = 40                         # this request is number 41; the stale reply answers number 40
    net.recv_s = 0.5                        # a big reply, slow to read
    # what each poll brings: (seconds until it arrives, its seq relative to the request's), or silence
    script = iter([(0.9, -1), None, (0.1, 0)])

    def deliver(sock, timeout_ms):
        step = next(script, None)
        if step is not None:
            delay, offset = step
            net.advance(delay)
            seq = client.seq + offset
            sock.inbox.append(reply_frames(P.STOP, seq, {"version": seq, "reason": "r"}))
    net.on_poll = deliver
    reply = client.request(P.WORK)
    assert reply.seq == 41 and reply.body["version"] == 41, reply
    assert len(net.sent) == 2                       # the request, and its resend once the stale reply was read
    assert all(t >= 0 for t in net.polls), net.polls


class EndlessInbox(list):
    """A SimSocket's inbox that never runs dry: ``frames`` again after each message read."""

    def __init__(self, frames: list[bytes]):
        super().__init__([frames])
        self.frames = frames

    def __getitem__(self, index):
        return list(self.frames)

    def pop(self, index=-1):
        return list(self.frames)


@pytest.mark.parametrize("stream", ["malformed", "stale"])
def test_a_server_streaming_replies_we_cannot_use_is_given_up_on_in_one_line(sim, caplog, stream):
    """A server answering with an endless stream of replies the client cannot use (garbage, or
    answers to an earlier request) kept its socket readable: the deadlines, checked only while
    nothing waited there, never came, and each malformed reply was a warning line of its own
    (5,196 lines in 2 s from a real server sending garbage)."""
    client, net = sim(60, give_up_after=5.0, resend_s=1.0, reconnect_s=3.0, max_backoff_s=5.0)
    client.seq = 40                         # this request is number 41
    net.recv_s = 0.001                      # a reply read every millisecond, for ever
    frames = [b"\xc1 not msgpack"] if stream == "malformed" else reply_frames(P.STOP, 40, {"version": 1, "reason": "r"})

    def stream_replies(sock, timeout_ms):
        sock.inbox = EndlessInbox(frames)
    net.on_poll = stream_replies
    with caplog.at_level(logging.INFO, logger="pscnn.client"), pytest.raises(ServerUnreachable) as exc:
        client.request(P.WORK)
    assert 5.0 < net.now - net.start <= 5.0 + client.resend_s + net.recv_s
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if stream == "malformed":
        assert str(exc.value).startswith(f"no usable answer from {ENDPOINT} for 5 s; its last reply was malformed: "
                                         "header is not valid msgpack")
        # msgpack's C extension gives no reason; its pure-Python fallback (msgpack 1.0.0 to 1.0.4 on Python 3.11,
        # MSGPACK_PUREPYTHON) adds one: "(FormatError: Unknown header: 0xc1)"
        assert len(warnings) == 1, warnings[:3]
        assert warnings[0] in ("ignoring a malformed reply: header is not valid msgpack (FormatError)",
                               "ignoring a malformed reply: header is not valid msgpack (FormatError: Unknown header: "
                               "0xc1)"), warnings
    else:
        assert str(exc.value) == f"no usable answer from {ENDPOINT} for 5 s" and not warnings, warnings[:3]


def test_a_client_stopped_past_its_deadline_asks_again_before_it_gives_up(sim, caplog):
    """A worker stopped (Ctrl-Z, SIGSTOP, a debugger) for longer than give_up_after while its
    request waited, then continued: the server never had a chance to answer a process that did not
    run.  It gave up at once on SIGCONT ("no usable answer for 2 s") and exited 1 with the server
    there; now it resends, and takes the answer."""
    client, net = sim(60, give_up_after=2.0, resend_s=1.0, reconnect_s=3.0, max_backoff_s=5.0)
    frozen = []

    def stopped_then_answered(sock, timeout_ms):
        if not frozen:
            net.advance(10.0)                       # stopped in its first wait, for five deadlines
            frozen.append(net.now)
        elif net.sent[-1][0] >= frozen[0]:          # a resend since it runs again: the server answers it
            sock.inbox.append(reply_frames(P.STOP, client.seq, {"version": 1, "reason": "r"}))
    net.on_poll = stopped_then_answered
    with caplog.at_level(logging.INFO, logger="pscnn.client"):
        reply = client.request(P.WORK)
    assert reply.type == P.STOP and reply.seq == client.seq
    assert "this process did not run for 10.0 s" in caplog.text, caplog.text
    assert client.last_rtt_s < 2.0                  # the stop is not the server's round trip either


def test_goodbye_to_a_silent_server_is_given_up_after_two_seconds(sim):
    """close(say_bye=True) runs as a worker exits, often because the server stopped answering:
    the goodbye is given two seconds, not give_up_after (ten minutes by default), or every
    worker of a dead server hangs that long on its way out."""
    client, net = sim(100, give_up_after=600.0)
    client._open()
    client.close(say_bye=True, reason="error")
    assert 2.0 < net.now - net.start < 2.1
    assert {P.decode(frames).type for _, _, frames in net.sent} == {P.BYE}
    assert client.sock is None and all(sock.closed for sock in net.sockets) and net.terminated


def test_goodbye_to_a_server_that_answers_heartbeats_only_is_given_up_without_a_word(sim, caplog):
    """An evaluator's goodbye after its final report, while the server wrote the run's results
    (answering heartbeats, not yet the goodbye), logged "WARNING the server holds our bye request
    back (2 s so far) ..." then "no answer ... for 3.0 s; reconnecting ... (for up to 2 s)", the
    last lines of its log.  A goodbye is given up after its two seconds, quietly."""
    client, net = sim(100, give_up_after=600.0)
    client.heartbeat_s = 2.0
    client._hb_thread = SimpleNamespace(join=lambda timeout=None: None, is_alive=lambda: False)  # heartbeats on

    def heartbeats_answered(sock, timeout_ms):
        client.heard_at = net.now
    net.on_poll = heartbeats_answered
    client._open()
    with caplog.at_level(logging.INFO, logger="pscnn.client"):
        client.close(say_bye=True, reason="final evaluation sent")
    assert not caplog.records, caplog.text
    assert 2.0 < net.now - net.start < 2.1


# ================================================================ heartbeats

def test_the_heartbeat_answer_is_awaited_in_short_slices(sim):
    """The heartbeat thread waits up to heartbeat_s (up to HEARTBEAT_MAX_S, a minute) for an
    answer, in polls of at most a quarter second so that close() is not held up: one long
    poll would keep close() waiting until its join timed out, and leave the thread running after it."""
    client, net = sim(100)
    client.heartbeat_s = 30.0
    sock = net.socket(zmq.DEALER)
    assert client._heartbeat_answered(sock) is False
    assert 29.9 < net.now - net.start < 30.3
    assert net.polls and max(net.polls) <= 251, net.polls


class StopAfter:
    """Stands in for Client._closing: records each wait's timeout; "closing" from the ``n``-th wait on."""

    def __init__(self, n: int):
        self.n, self.waits = n, []

    def wait(self, timeout=None) -> bool:
        self.waits.append(timeout)
        return len(self.waits) >= self.n

    def is_set(self) -> bool:
        return len(self.waits) >= self.n

    def set(self) -> None:
        self.n = 0


def test_heartbeats_go_at_the_period_the_server_asked_for(sim):
    """The server sets the heartbeat period (max(0.2, peer_timeout / 5)); a client that beat
    at the fastest allowed period regardless would multiply the server's heartbeat load,
    one that beat slower than asked would be declared dead by it."""
    client, net = sim(100)
    client.heartbeat_s = 1.5
    client._closing = StopAfter(3)

    answers: list[float] = []

    def answered(sock, timeout_ms):         # the server answers each heartbeat once
        if len(answers) < len(net.sent):
            answers.append(net.now)
            sock.inbox.append(reply_frames(P.HEARTBEAT, 0, {"done": False}))
    net.on_poll = answered
    client._heartbeats()
    assert client._closing.waits == [1.5, 1.5, 1.5] and len(answers) == len(net.sent) == 2
    assert client.heard_at > 0, "an answered heartbeat did not count"
    assert net.sockets[0].closed


def test_a_server_streaming_heartbeat_answers_does_not_keep_the_heartbeat_thread_reading(sim):
    """The thread read every answer waiting before its next heartbeat: a server streaming them
    (faster than the thread reads) kept it reading for good, and it never beat again nor saw
    close().  It reads a few a pass now, and goes on beating at its period."""
    client, net = sim(100)
    client.heartbeat_s = 1.0
    client._closing = StopAfter(3)
    net.recv_s = 0.001                      # an answer read every millisecond, for ever

    def stream_answers(sock, timeout_ms):
        sock.inbox = EndlessInbox(reply_frames(P.HEARTBEAT, 0, {"done": False}))
    net.on_poll = stream_answers
    client._heartbeats()
    assert client._closing.waits == [1.0, 1.0, 1.0] and len(net.sent) == 2, (client._closing.waits, len(net.sent))
    assert client.heard_at > 0


def test_a_server_that_said_training_is_over_then_trains_again_is_no_longer_taken_for_done(sim):
    """A server restarted with --resume after it said training is over (its heartbeats' "done") trains
    again, and says so: the client must forget the "done", else a silence of the restarted server (a
    checkpoint, a restart) ends its request after reconnect_s instead of --give-up-after."""
    client, net = sim(100)
    client.heartbeat_s = 1.0
    client._closing = StopAfter(3)
    said = [True, False]                    # heartbeat n's "done"
    answered: set = set()

    def server(sock, timeout_ms):           # the server answers each heartbeat once
        n = len(net.sent) - 1
        if n not in answered:
            answered.add(n)
            sock.inbox.append(reply_frames(P.HEARTBEAT, 0, {"done": said[n]}))
    net.on_poll = server
    client._heartbeats()
    assert answered == {0, 1}
    assert not client.server_done.is_set(), "a server that trains again is still taken for done"


def test_the_heartbeat_socket_backs_off_its_reconnects_as_the_request_socket_does(sim):
    """While the server is down the heartbeat socket tries it again and again.  With ZeroMQ's default
    (no maximum, so no backoff) it tried every 100 ms for as long as it was down (measured: 67 tries
    in 10 s, against 9 with a 2 s maximum), while the request socket backed off to 2 s."""
    client, net = sim(100)
    client._closing = StopAfter(1)
    client._heartbeats()
    client._open()
    heartbeat, request = net.sockets
    for option in (zmq.RECONNECT_IVL, zmq.RECONNECT_IVL_MAX):
        assert heartbeat.options.get(option) == request.options[option], (option, heartbeat.options)
    assert request.options[zmq.RECONNECT_IVL_MAX] > request.options[zmq.RECONNECT_IVL]


def test_a_heartbeat_answered_unknown_worker_is_not_called_unanswered(sim, caplog):
    """A worker the server dropped (stopped past --peer-timeout, cut off) and now back: the server
    answers its heartbeat with unknown_worker.  The log said "server did not answer a heartbeat",
    blaming a server that had answered, next to the line that it does not know us."""
    client, net = sim(100)
    client.heartbeat_s = 1.0
    client._closing = StopAfter(3)

    answered: list[float] = []

    def forgot_us(sock, timeout_ms):        # the server answers each heartbeat once: it does not know us
        if len(answered) < len(net.sent):
            answered.append(net.now)
            sock.inbox.append(reply_frames(P.ERROR, 0, {"code": "unknown_worker", "message": "send hello"}))
    net.on_poll = forgot_us
    with caplog.at_level(logging.INFO, logger="pscnn.client"):
        client._heartbeats()
    assert len(answered) == 2 and client.wake.is_set()
    assert "did not answer" not in caplog.text, caplog.text
    assert client.heard_at == 0.0, "an unknown_worker answer counted as a heartbeat answered"


@pytest.mark.parametrize("done", [False, True])
def test_a_heartbeat_unanswered_is_an_info_line_saying_what_next(sim, caplog, done):
    """A server writing a checkpoint or its results, or restarting, misses a heartbeat routinely:
    a client joining a finished run, whose server then wrote its results, logged a WARNING
    "server did not answer a heartbeat", as did every client of a server restarted with --resume.
    It is one INFO line that says what goes on, and the line on the server's return says how long
    the silence was.  A server that said training is over may be gone: that is said instead."""
    client, net = sim(100)
    client.heartbeat_s = 1.0
    client._closing = StopAfter(4)
    waits = client._closing.wait
    client._closing.wait = lambda timeout=None: net.advance(timeout) or waits(timeout)     # a period between beats
    answers = [True, False, True]               # heartbeat n: answered, silent, answered again
    heard: set = set()

    def server(sock, timeout_ms):
        n = len(net.sent) - 1
        if n not in heard and answers[n]:
            heard.add(n)
            sock.inbox.append(reply_frames(P.HEARTBEAT, 0, {"done": done}))
    net.on_poll = server
    with caplog.at_level(logging.DEBUG, logger="pscnn.client"):
        client._heartbeats()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    said = ("server did not answer a heartbeat; it said training is over, so it may be writing its results, "
            "or gone") if done else \
        "server did not answer a heartbeat within 1 s (busy, restarting or gone); still sending one every 1 s"
    assert lines == [(logging.INFO, said), (logging.INFO, "server answers heartbeats again (silent for 2.0 s)")], lines


def test_a_heartbeat_unanswered_after_its_socket_was_made_anew_is_the_servers_silence(sim, caplog, monkeypatch):
    """A heartbeat that could not go (its connection dropped for good: zmq.Again) makes the socket anew
    and waits a period again; the next one unanswered is the server's silence, not a pause of this
    process: the pass before, cut short, is not counted into the next one's time."""
    client, net = sim(100)
    client.heartbeat_s = 2.0
    client._closing = StopAfter(3)
    waits = client._closing.wait
    client._closing.wait = lambda timeout=None: net.advance(timeout) or waits(timeout)     # a period between beats
    send = SimSocket.send_multipart

    def first_fails(sock, frames, copy=True, flags=0):
        if sock is net.sockets[0]:
            raise zmq.Again()
        send(sock, frames, copy, flags)
    monkeypatch.setattr(SimSocket, "send_multipart", first_fails)
    with caplog.at_level(logging.INFO, logger="pscnn.client"):
        client._heartbeats()
    assert len(net.sockets) == 2 and len(net.sent) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["server did not answer a heartbeat within 2 s (busy, restarting or gone); still sending one "
                     "every 2 s"], lines


def test_a_heartbeat_unanswered_while_this_process_was_stopped_is_not_called_the_servers_silence(sim, caplog):
    """A client stopped (SIGSTOP, Ctrl-Z) while it awaited a heartbeat's answer, then continued, found
    its wait over before it could read the answer, and logged "server did not answer a heartbeat",
    then "server answers heartbeats again (silent for 32.2 s)": its own stop, blamed on the server.
    Its clock says it did not run (the pass took 30 s more than two periods): it says that instead."""
    client, net = sim(100)
    client.heartbeat_s = 1.0
    client._closing = StopAfter(4)
    waits = client._closing.wait
    client._closing.wait = lambda timeout=None: net.advance(timeout) or waits(timeout)     # a period between beats
    heard: set = set()

    def server(sock, timeout_ms):           # answers each heartbeat; the first one's answer while we were stopped
        n = len(net.sent)
        if n == 1 and n not in heard:
            heard.add(n)
            net.advance(30.0)               # stopped: the answer is read only at the next heartbeat
            return
        if n not in heard:
            heard.add(n)
            sock.inbox.append(reply_frames(P.HEARTBEAT, 0, {"done": False}))
    net.on_poll = server
    with caplog.at_level(logging.DEBUG, logger="pscnn.client"):
        client._heartbeats()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [(logging.INFO, "this process did not run for 29.3 s or more (stopped or suspended) while it "
                                    "awaited a heartbeat's answer; not counted as the server's silence")], lines
    assert client.heard_at > 0


# ================================================================ against a real ZeroMQ socket

class Router:
    """A ROUTER on a free port of 127.0.0.1, served by a thread: ``answer(rid, msg, accepted)`` -> replies.

    ``requests`` holds (routing id, decoded message) for each request received,
    resends included, heartbeats left out; ``accepted``: the connections the
    socket accepted so far (a client that reconnects makes a new one).
    """

    def __init__(self, answer):
        self.answer = answer
        self.requests: list[tuple[bytes, P.Message]] = []
        self.accepted = 0
        self.heartbeats = 0                 # answered so far
        self.errors: list[str] = []
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_ACCEPTED)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="router", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(50))
                if self.monitor in ready:
                    if recv_monitor_message(self.monitor)["event"] == zmq.EVENT_ACCEPTED:
                        self.accepted += 1
                if self.sock not in ready:
                    continue
                rid, *frames = self.sock.recv_multipart()
                msg = P.decode(frames)
                if msg.type == P.HEARTBEAT:
                    self.sock.send_multipart([rid, *P.encode(P.Message(P.HEARTBEAT, body={"done": False}))])
                    self.heartbeats += 1
                    continue
                self.requests.append((rid, msg))
                for mtype, body in self.answer(rid, msg, self.accepted):
                    self.sock.send_multipart([rid, *P.encode(P.Message(mtype, "", msg.seq, body))])
        except Exception as exc:                    # noqa: BLE001  (reported by close())
            self.errors.append(repr(exc))
        finally:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.sock.close(linger=0)

    def of_type(self, mtype: str) -> list[tuple[bytes, P.Message]]:
        return [(rid, m) for rid, m in self.requests if m.type == mtype]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the router thread did not stop"
        assert not self.errors, self.errors


WELCOME = (P.WELCOME, {"worker_id": "w", "role": "trainer", "model": {}, "run": {}, "incarnation": "t",
                       "heartbeat_s": 0.2})
STOP = (P.STOP, {"version": 0, "reason": "r"})
ACK = (P.ACK, {})


@pytest.fixture
def router():
    """router(answer) -> a started Router; clients(...) -> a Client; all closed afterwards."""
    made: list = []

    def start(answer) -> Router:
        made.append(Router(answer))
        return made[-1]
    yield start
    for r in made:
        r.close()


@pytest.fixture
def clients():
    made: list[Client] = []

    def make(endpoint: str, **kwargs) -> Client:
        kwargs = {"give_up_after": 5.0, "heartbeat": False, **kwargs}
        made.append(Client(endpoint, "trainer", **kwargs))
        return made[-1]
    yield make
    for c in made:
        c.close()


def test_a_request_the_server_missed_is_resent_under_the_same_sequence_number(router, clients):
    """The first copy is lost; the resend is what the server answers.  Under a new number
    the server would take the resend for a second request (a push applied twice)."""
    def answer(rid, msg, accepted):
        if msg.type == P.HELLO:
            return [WELCOME]
        return [STOP] if len(server.of_type(P.WORK)) > 1 else []    # ignore the first copy
    server = router(answer)
    client = clients(server.endpoint, resend_s=0.05, reconnect_s=5.0)
    client.connect()
    assert client.request(P.WORK).type == P.STOP
    work = [m for _, m in server.of_type(P.WORK)]          # 2, or more on a slow machine: each a copy
    assert len(work) >= 2 and {(m.wid, m.seq) for m in work} == {(client.wid, client.seq)}, work


def test_a_request_held_back_while_heartbeats_are_answered_is_resent_less_often_than_they_go(router, clients):
    """A server that holds a request back for 20 heartbeats (0.2 s apart) and answers them: the
    copy on the live connection is not lost, and the client's copies back off (0.05 s, doubling,
    up to 0.8 s here), so fewer arrive than heartbeats.  Resent every resend_s, 4 copies came
    for each heartbeat; on a slow link they saturated it."""
    held_from: list[int] = []

    def answer(rid, msg, accepted):
        if msg.type == P.HELLO:
            return [WELCOME]
        if not held_from:
            held_from.append(server.heartbeats)
        return [STOP] if server.heartbeats - held_from[0] >= 20 else []
    server = router(answer)
    client = clients(server.endpoint, heartbeat=True, resend_s=0.05, max_backoff_s=0.8, give_up_after=30.0)
    client.connect()
    for _ in range(500):                                # the first heartbeat answered: the server lives
        if client.heard_at:
            break
        time.sleep(0.01)
    assert client.heard_at, "no heartbeat answered"
    assert client.request(P.WORK).type == P.STOP
    copies = len(server.of_type(P.WORK))
    assert 1 < copies < server.heartbeats - held_from[0], (copies, server.heartbeats - held_from[0])


def test_a_silent_server_sees_the_client_reconnect_under_its_routing_id(router, clients):
    """After reconnect_s of silence the client opens a new connection (a server that restarted,
    or a connection ZeroMQ believes alive but is not, is reached again); the server knows it by
    the same routing id as before (its worker id and a secret token), so its reply reaches the
    new connection."""
    def answer(rid, msg, accepted):
        if msg.type == P.HELLO:
            return [WELCOME]
        return [STOP] if accepted >= 2 else []         # answer only once the client reconnected
    server = router(answer)
    client = clients(server.endpoint, resend_s=0.05, reconnect_s=0.2, max_backoff_s=0.4)
    client.connect()
    assert client.request(P.WORK).type == P.STOP
    assert server.accepted >= 2
    assert {rid for rid, _ in server.requests} == {client.routing_id}
    assert client.routing_id.startswith(client.wid.encode() + b"/")


def test_a_duplicate_reply_is_not_taken_for_the_next_requests_answer(router, clients):
    """The server answers each copy of a resent request (from its cache), so a duplicate of an
    answer may still be queued when the next request goes out.  It carries the old sequence
    number and must be dropped: a trainer that took it would compute an old task again."""
    def answer(rid, msg, accepted):
        if msg.type == P.HELLO:
            return [WELCOME]
        if len(server.of_type(P.WORK)) == 1:
            return [(P.WAIT, {"retry_s": 0.05, "held_s": 0.0, "reason": "first"})] * 2    # and a duplicate
        return [STOP]
    server = router(answer)
    client = clients(server.endpoint, resend_s=30.0, give_up_after=60.0)     # no resend within the test
    client.connect()
    assert client.request(P.WORK).type == P.WAIT
    second = client.request(P.WORK)
    assert second.type == P.STOP and second.seq == client.seq


def test_a_submitted_request_is_sent_once(router, clients):
    """submit() sends at once and result() collects the answer; result() must not send the
    request again (a trainer's push carries its gradients: twice the traffic, every batch)."""
    server = router(lambda rid, msg, accepted: [WELCOME] if msg.type == P.HELLO else [ACK])
    client = clients(server.endpoint, resend_s=30.0, give_up_after=60.0)    # no resend within the test
    client.connect()
    pending = client.submit(P.WORK)
    assert pending.result().type == P.ACK
    client.request(P.WORK)                              # the next answer is its own, not a leftover
    work = [m.seq for _, m in server.of_type(P.WORK)]
    assert work == [pending.msg.seq, client.seq], work
    assert server.accepted <= 1, "a new connection for a request: each one throws away what is queued"


def test_a_reply_frame_longer_than_any_message_is_refused_unread(router, clients, monkeypatch):
    """A frame longer than the protocol allows (the server may announce any length) is refused by
    ZeroMQ from its length prefix, closing the connection, instead of being received whole into
    our memory and only then found malformed.  MAX_MESSAGE_BYTES made small: the test sends 2 MB."""
    monkeypatch.setattr(P, "MAX_MESSAGE_BYTES", 1 << 20)
    big = np.zeros(1 << 19, dtype=np.float32)             # 2 MB

    def answer(rid, msg, accepted):
        if msg.type == P.HELLO:
            return [WELCOME]
        header = P.encode(P.Message(P.ACK, "", msg.seq, {}))[0]
        server.sock.send_multipart([rid, header, big], copy=False)
        return []
    server = router(answer)
    client = clients(server.endpoint, give_up_after=1.0, resend_s=0.2)
    client.connect()
    with pytest.raises(ServerUnreachable) as exc:
        client.request(P.WORK)
    assert "malformed" not in str(exc.value), "the oversized reply was received"
    assert server.accepted >= 2                             # the connection was closed, and made again


class CuttableProxy:
    """A TCP proxy on a free port of 127.0.0.1 in front of ``upstream`` (tcp://127.0.0.1:PORT), run by a
    thread: each connection it accepts is forwarded on a new one of its own, in the order accepted (0,
    1, ...).  :meth:`swallow_then_cut` makes one connection die under what the client sends next, as
    one a NAT forgot or a reset ended does, while the others live on."""

    def __init__(self, upstream: str):
        host, _, port = upstream.removeprefix("tcp://").rpartition(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted = 0
        self.cut = threading.Event()            # a doomed connection swallowed what came and was closed
        self.errors: list[str] = []
        self._doomed: set[int] = set()
        self._pairs: dict[int, tuple[socket.socket, socket.socket]] = {}
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="proxy", daemon=True)
        self._thread.start()

    def swallow_then_cut(self, index: int) -> None:
        """Connection ``index`` discards the next bytes its client sends, then closes both its sides."""
        self._doomed.add(index)

    def _drop(self, index: int) -> None:
        for sock in self._pairs.pop(index, ()):
            self._selector.unregister(sock)
            sock.close()

    def _serve(self) -> None:
        self._selector.register(self.listener, selectors.EVENT_READ, None)
        try:
            while not self._stop.is_set():
                for key, _ in self._selector.select(0.05):
                    if key.data is None:
                        client, _ = self.listener.accept()
                        upstream = socket.create_connection(self.upstream)
                        index, self.accepted = self.accepted, self.accepted + 1
                        self._pairs[index] = (client, upstream)
                        self._selector.register(client, selectors.EVENT_READ, (index, client, upstream))
                        self._selector.register(upstream, selectors.EVENT_READ, (index, upstream, client))
                        continue
                    index, source, sink = key.data
                    if index not in self._pairs:        # closed earlier in this pass
                        continue
                    try:
                        data = source.recv(1 << 16)
                    except OSError:
                        data = b""
                    if data and index in self._doomed and source is self._pairs[index][0]:
                        self._drop(index)
                        self.cut.set()
                    elif not data:
                        self._drop(index)
                    else:
                        sink.sendall(data)
        except Exception as exc:                    # noqa: BLE001  (reported by close())
            self.errors.append(repr(exc))
        finally:
            for index in list(self._pairs):
                self._drop(index)
            self._selector.close()
            self.listener.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the proxy thread did not stop"
        assert not self.errors, self.errors


@pytest.fixture
def proxy():
    """proxy(upstream) -> a started CuttableProxy; all closed afterwards."""
    made: list[CuttableProxy] = []

    def start(upstream: str) -> CuttableProxy:
        made.append(CuttableProxy(upstream))
        return made[-1]
    yield start
    for p in made:
        p.close()


def test_a_request_whose_connection_alone_dropped_is_resent_once_it_is_made_again(router, clients, proxy):
    """The request connection dies under a request (it never reaches the server) while the heartbeat
    connection lives on.  ZeroMQ makes the connection again at once, but the copy is lost with the old
    one; heartbeats are answered, so the safety-net resend alone (resend_s, 30 s here) would send it
    again.  The client sees its connection made again (a socket monitor) and resends at once: the
    request reaches the server before it has answered a few more heartbeats (0.2 s apart), not after
    the 150 the safety net takes."""
    def answer(rid, msg, accepted):
        if msg.type == P.HELLO:
            return [WELCOME]
        return [STOP] if msg.type == P.WORK else []     # a status (asked of a request held): no answer
    server = router(answer)
    relay = proxy(server.endpoint)
    # give_up_after 2 s: once the relay is closed below, a request still waiting gives up soon
    client = clients(relay.endpoint, heartbeat=True, resend_s=30.0, max_backoff_s=30.0, give_up_after=2.0)
    client.connect()                        # its hello went on the relay's connection 0, heartbeats go on 1
    for _ in range(500):
        if client.heard_at:
            break
        time.sleep(0.01)
    assert client.heard_at, "no heartbeat answered"
    relay.swallow_then_cut(0)
    outcome: list = []

    def ask() -> None:
        try:
            outcome.append(client.request(P.WORK))
        except Exception as exc:            # noqa: BLE001  (asserted below)
            outcome.append(exc)
    requester = threading.Thread(target=ask, name="requester", daemon=True)
    requester.start()
    for _ in range(1000):                   # the request swallowed, the connection made again
        if relay.cut.is_set() and relay.accepted >= 3:
            break
        time.sleep(0.01)
    assert relay.cut.is_set() and relay.accepted >= 3, (relay.cut.is_set(), relay.accepted)
    beats_at_reconnect = server.heartbeats
    for _ in range(3000):
        if server.of_type(P.WORK) or server.heartbeats - beats_at_reconnect >= 10:
            break
        time.sleep(0.01)
    beats_before_resend = server.heartbeats - beats_at_reconnect
    arrived = len(server.of_type(P.WORK))
    relay.close()                           # ends a request still waiting (its heartbeats fall silent)
    requester.join(timeout=30)
    assert not requester.is_alive(), "the request did not end"
    assert arrived, f"not resent in the {beats_before_resend} heartbeats after its connection was made again"
    assert isinstance(outcome[0], P.Message) and outcome[0].type == P.STOP and outcome[0].seq == client.seq, outcome


class AcceptAndClose:
    """A TCP listener on a free port of 127.0.0.1 that accepts each connection and closes it at once, as a
    TCP proxy in front of a server that is down does; run by a thread.  ``accepted``: the connections so far.
    A ZeroMQ client makes its connection again each time, and its monitor hears of each handshake failed."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.listener.settimeout(0.05)
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="accept-and-close", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self.listener.accept()
                except TimeoutError:
                    continue
                conn.close()
                self.accepted += 1
        finally:
            self.listener.close()

    def wait_for_accepted(self, count: int) -> int:
        """Wait (bounded: about 30 s) until ``count`` connections were accepted; how many were."""
        for _ in range(3000):
            if self.accepted >= count:
                break
            time.sleep(0.01)
        return self.accepted

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the accept-and-close thread did not stop"


@pytest.fixture
def accept_and_close(monkeypatch):
    """An AcceptAndClose listener, closed afterwards.  The clients' reconnect interval is lowered to 1 ms
    (ZeroMQ's shortest), so that the ~10 reconnects a second of 100 ms pile up events in seconds, not minutes."""
    monkeypatch.setattr(client_module, "RECONNECT_IVL_MS", 1)
    peer = AcceptAndClose()
    yield peer
    peer.close()


# Monitor events libzmq 4.3.5 queues unread (the monitor's send and receive high-water marks, 1000
# each); its I/O thread, every socket's of the context, waits to queue the next.
MONITOR_EVENTS_QUEUED_AT_MOST = 2000


# A client with keys opens its request socket to ENDPOINT (reconnecting every 1 ms), says "open", and
# closes it once a line comes on its stdin, then says "closed".  A process of its own: a close() that
# waits for good holds the GIL, and would stop the test's process with it.
CLOSE_WHEN_TOLD = """
import sys
from pscnn import curve
from worker import client as client_module
client_module.RECONNECT_IVL_MS = 1
client = client_module.Client(sys.argv[1], "evaluator", heartbeat=False, keys=curve.client_keys(sys.argv[2]))
client._open()
print("open", flush=True)
sys.stdin.readline()
client.close()
print("closed", flush=True)
"""


def test_a_client_whose_monitor_is_full_still_closes(accept_and_close, tmp_path):
    """A client with keys idle between requests (an evaluator's --every) while its request socket
    reconnects to a peer that accepts and closes: each failed handshake is an event on its monitor,
    unread.  Once the queue is full, libzmq's I/O thread waits to queue the next while holding the
    lock that disable_monitor() takes; close() took it first and waited for good (the evaluator never
    exited)."""
    curve.make_keys(tmp_path / "keys", ["client-0"])
    child = subprocess.Popen([sys.executable, "-c", CLOSE_WHEN_TOLD, accept_and_close.endpoint,
                              str(tmp_path / "keys" / "client-0")], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "open\n", child.stderr.read()
        # one more than the queue holds: the event of that connection is the one libzmq waits to queue
        full = MONITOR_EVENTS_QUEUED_AT_MOST + 1
        assert accept_and_close.wait_for_accepted(full) >= full, accept_and_close.accepted
        time.sleep(0.2)                 # for the client to hear the last connection closed
        try:
            out, err = child.communicate("close\n", timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"close() did not return ({accept_and_close.accepted} connections accepted)")
        assert child.returncode == 0 and out == "closed\n", (child.returncode, out, err[-2000:])
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def test_a_plain_client_idle_between_requests_keeps_reconnecting_to_a_peer_that_accepts_and_closes(
        accept_and_close, clients):
    """A plain client idle between requests (an evaluator's --every, a trainer held for its round) while
    its request socket reconnects to a peer that accepts and closes.  Each failed handshake was an event
    on its monitor, read only when a request goes; once about 2000 were queued, libzmq's I/O thread,
    every socket's of the process, waited: the socket stopped reconnecting, and the heartbeats stopped
    with it.  Twice that many connections are made now."""
    client = clients(accept_and_close.endpoint)
    client._open()                      # the request socket, as between two requests
    enough = 2 * MONITOR_EVENTS_QUEUED_AT_MOST + 1
    assert accept_and_close.wait_for_accepted(enough) >= enough, \
        f"the client stopped reconnecting after {accept_and_close.accepted} connections"


def _idle_with_heartbeats(client: Client) -> None:
    """``client`` as between two requests after its welcome: its request socket open, and its heartbeats
    sent every HEARTBEAT_MIN_S by their thread (no hello: nothing at the peer answers one)."""
    client.heartbeat_s = client_module.HEARTBEAT_MIN_S
    client._open()
    client._hb_thread = threading.Thread(target=client._heartbeats, name="heartbeat", daemon=True)
    client._hb_thread.start()


def test_a_curve_client_idle_between_requests_keeps_reconnecting_and_its_heartbeats_going(
        accept_and_close, clients, tmp_path):
    """A client with keys idle between requests (an evaluator's --every) while its sockets reconnect to a peer
    that accepts and closes (a proxy in front of a server that is down).  Each failed handshake of its request
    socket is an event on its monitor, which was read only while a request went: once about 2000 were queued,
    libzmq's I/O thread, every socket's of the process, waited, and both sockets stopped reconnecting (its
    heartbeats with them) until the next request.  The heartbeats' thread reads the monitor now."""
    curve.make_keys(tmp_path / "keys", ["client-0"])
    client = clients(accept_and_close.endpoint, keys=curve.client_keys(tmp_path / "keys" / "client-0"))
    _idle_with_heartbeats(client)
    # the heartbeats' socket connects about as often as the request socket: both had stopped at ~4000 in all
    enough = 4 * MONITOR_EVENTS_QUEUED_AT_MOST + 1
    assert accept_and_close.wait_for_accepted(enough) >= enough, \
        f"the client stopped reconnecting after {accept_and_close.accepted} connections"


def test_a_curve_client_whose_connections_close_before_a_greeting_is_not_told_its_key_is_wrong(
        accept_and_close, clients, tmp_path, caplog):
    """The same peer, a proxy in front of a server that is down, is not a server that could not read our
    hello: ZeroMQ's monitor says alike of both (a handshake failed without a reason, then disconnected), and
    the next request ended the client, saying server.key might be the wrong key.  It is retried as a server
    that is down is, and one line says what was seen."""
    curve.make_keys(tmp_path / "keys", ["client-0"])
    client = clients(accept_and_close.endpoint, give_up_after=1.0,
                     keys=curve.client_keys(tmp_path / "keys" / "client-0"))
    _idle_with_heartbeats(client)
    accept_and_close.wait_for_accepted(100)         # a few dozen handshakes failed, each on a new connection
    with caplog.at_level(logging.WARNING, logger="pscnn.curve"), pytest.raises(ServerUnreachable):
        client.request(P.WORK)
    said = [r.getMessage() for r in caplog.records if r.name == "pscnn.curve"]
    assert len(said) == 1, said
    one_line_naming(said[0], accept_and_close.endpoint, "closed before the CURVE handshake began",
                    "without a byte of ZeroMQ's greeting", "behind a proxy")


def test_a_status_query_with_keys_to_a_peer_that_closes_before_a_greeting_does_not_say_it_retries(
        accept_and_close, tmp_path, caplog):
    """query_status (pscnn status, pscnn run's progress, a healthcheck) asks once.  Against a proxy in front of a
    server that is down, its line about the connections closed before ZeroMQ's greeting ended "retrying until
    it answers", and pscnn status then said "no answer ... within 1 s" and exited 1."""
    curve.make_keys(tmp_path / "keys", ["client-0"])
    with caplog.at_level(logging.WARNING, logger="pscnn.curve"):
        # several seconds: ZeroMQ's 100 ms reconnects fail the three handshakes the probe waits for
        progress = client_module.query_status(accept_and_close.endpoint, timeout=3.0,
                                              keys=curve.client_keys(tmp_path / "keys" / "client-0"))
    assert progress is None
    said = [r.getMessage() for r in caplog.records if r.name == "pscnn.curve"]
    assert len(said) == 1, said
    one_line_naming(said[0], accept_and_close.endpoint, "closed before the CURVE handshake began", "behind a proxy")
    assert "retrying" not in said[0], said[0]


def test_a_status_query_with_keys_to_a_peer_that_closes_before_a_greeting_keeps_to_its_timeout(
        accept_and_close, tmp_path, monkeypatch):
    """The greeting probe that looks into the failed handshakes had its own 0.5 s and a host lookup that
    nothing bounded, both on top of the query's timeout (pscnn status --timeout 1 took 1.36 s).  Here
    the lookup answers only once the query is over: the query must not wait for it."""
    curve.make_keys(tmp_path / "keys", ["client-0"])
    released, lookups, answered = threading.Event(), [], threading.Event()
    real_getaddrinfo = socket.getaddrinfo

    def lookup_held_until_released(*args, **kwargs):
        lookups.append(args[0])
        released.wait(30)           # bounded: the old code waited this long, then went on
        answered.set()
        return real_getaddrinfo(*args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", lookup_held_until_released)
    try:
        # several seconds: ZeroMQ's 100 ms reconnects fail the three handshakes the probe waits for
        progress = client_module.query_status(accept_and_close.endpoint, timeout=3.0,
                                              keys=curve.client_keys(tmp_path / "keys" / "client-0"))
        assert progress is None
        assert lookups, "the probe never looked the host up: nothing was tested"
        assert not answered.is_set(), "the query waited for the probe's host lookup"
    finally:
        released.set()


def test_a_peer_that_resets_the_connection_before_a_greeting_is_told_from_one_that_is_silent():
    """A proxy in front of a server that is down may reset the connection (RST) instead of closing it:
    that too is a peer that closed before ZeroMQ's greeting (b""), which the greeting probe says, not
    a connection that was not made or brought nothing (None), which it passes over in silence."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)

        def reset_one() -> None:
            conn, _ = listener.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # close with a reset
            conn.close()
        thread = threading.Thread(target=reset_one, name="reset-one", daemon=True)
        thread.start()
        try:
            assert curve.peer_greeting("127.0.0.1", str(listener.getsockname()[1]), timeout=30.0) == b""   # a bound: the reset comes first
        finally:
            thread.join(30)


def test_a_peer_that_closed_before_the_probe_could_send_is_one_that_closed_before_a_greeting(monkeypatch):
    """A peer that closed (and reset) the connection before the probe's bytes went makes the send fail
    with EPIPE: that is a peer that closed before ZeroMQ's greeting (b""), not an address to skip."""
    class ClosedUnderneath(socket.socket):
        def sendall(self, data, flags=0):
            raise BrokenPipeError(32, "Broken pipe")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        monkeypatch.setattr(curve.socket, "socket", ClosedUnderneath)
        assert curve.peer_greeting("127.0.0.1", str(listener.getsockname()[1]), timeout=30.0) == b""


class OneConnection:
    """A TCP listener on a free port of 127.0.0.1 that accepts one connection, sends it ``first`` (if
    any), and holds it open until closed (each wait bounded: about 30 s); run by a thread."""

    def __init__(self, first: bytes | None):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)  # a closed listener does not wake accept(): it looks again this often
        self.address = self.listener.getsockname()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(first,), name="one-connection", daemon=True)
        self._thread.start()

    def _serve(self, first: bytes | None) -> None:
        for _ in range(600):
            if self._closing.is_set():
                return
            try:
                conn, _ = self.listener.accept()
                break
            except TimeoutError:
                continue
        else:
            return
        with conn:
            if first is not None:
                conn.sendall(first)
            self._closing.wait(30)

    def close(self) -> None:
        self._closing.set()
        self._thread.join(60)
        self.listener.close()


def _tcp_addresses(*addresses) -> tuple[list, None]:
    """What protocol.look_up gives for a host with these (host, port) addresses, in this order."""
    return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address) for address in addresses], None


# A plain ZeroMQ peer's whole greeting, as libzmq 4.3 sends it: signature, version 3.1, mechanism NULL
PLAIN_GREETING = curve.ZMTP_PROBE[:10] + b"\x03\x01" + b"NULL".ljust(20, b"\0") + bytes(32)


def test_the_greeting_probe_tries_each_address_of_the_host_in_turn(monkeypatch):
    """A host that resolves to several addresses (localhost: ::1 and 127.0.0.1) is tried at each, as
    socket.create_connection does: one that refuses the connection is not the host's answer."""
    with socket.socket() as unused:     # a port nothing listens on: refused
        unused.bind(("127.0.0.1", 0))
        refused = unused.getsockname()
    greeter = OneConnection(PLAIN_GREETING)
    try:
        monkeypatch.setattr(P, "look_up", lambda host, port, timeout: _tcp_addresses(refused, greeter.address))
        assert curve.peer_greeting("server.example", "5555", timeout=30.0) == PLAIN_GREETING
    finally:
        greeter.close()


def test_the_greeting_probe_gives_up_at_its_timeout_with_addresses_left(monkeypatch):
    """An address that takes the connection and says nothing has the whole timeout; the addresses
    after it are not tried once it is spent (a probe within its caller's deadline)."""
    silent, greeter = OneConnection(None), OneConnection(PLAIN_GREETING)
    try:
        monkeypatch.setattr(P, "look_up", lambda host, port, timeout: _tcp_addresses(silent.address, greeter.address))
        assert curve.peer_greeting("server.example", "5555", timeout=0.2) is None
    finally:
        silent.close()
        greeter.close()


def test_the_greeting_probe_keeps_within_its_callers_deadline(tmp_path, monkeypatch):
    """The probe into silent handshake failures took its own GREETING_TIMEOUT_S on top of its caller's
    time (pscnn status --timeout 1 took 1.36 s): with the caller's time up it probes not at all, with
    some left it has that, with no deadline its own bound."""
    watch, _, net = _curve_watch(tmp_path, monkeypatch, b"")
    timeouts = []
    monkeypatch.setattr(curve, "peer_greeting", lambda host, port, timeout=None, sent=None: timeouts.append(timeout) or b"")
    watch.monitor.events.extend(monitor_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
                                for _ in range(curve.SILENT_FAILURES_LIMIT))
    assert not watch.check(deadline=net.monotonic())
    assert timeouts == []
    assert not watch.check(deadline=net.monotonic() + 0.2)
    assert timeouts == [pytest.approx(0.2)]
    net.advance(curve.GREETING_PROBE_EVERY_S)
    assert not watch.check()
    assert timeouts == [pytest.approx(0.2), curve.GREETING_TIMEOUT_S]


def test_a_status_querys_greeting_probe_has_no_more_than_the_querys_time(accept_and_close, tmp_path, monkeypatch):
    """query_status hands its deadline to the handshake checks, whose greeting probe waits no longer
    than the time the query has left (here the probe's own bound is far longer than the query)."""
    curve.make_keys(tmp_path / "keys", ["client-0"])
    monkeypatch.setattr(curve, "GREETING_TIMEOUT_S", 1000.0)
    timeouts = []
    monkeypatch.setattr(curve, "peer_greeting", lambda host, port, timeout=None, sent=None: timeouts.append(timeout) or b"")
    # several seconds: ZeroMQ's reconnects fail the three handshakes the probe waits for
    progress = client_module.query_status(accept_and_close.endpoint, timeout=3.0,
                                          keys=curve.client_keys(tmp_path / "keys" / "client-0"))
    assert progress is None
    assert timeouts, "the query never probed: nothing was tested"
    assert all(timeout <= 3.0 for timeout in timeouts), timeouts


def _curve_watch(tmp_path, monkeypatch, greeting: bytes) -> tuple[curve.HandshakeWatch, list, SimNet]:
    """A client with keys' HandshakeWatch on a simulated monitor and clock (the SimNet's), and the
    greeting probes it makes, each answered ``greeting`` (what a connection to the endpoint brings)."""
    curve.make_keys(tmp_path / "keys", ["client-0"])
    watch = curve.HandshakeWatch(ENDPOINT, curve.client_keys(tmp_path / "keys" / "client-0"))
    watch.monitor = SimMonitor()
    net = SimNet(100)
    monkeypatch.setattr(curve, "time", SimpleNamespace(monotonic=net.monotonic))
    probes = []
    monkeypatch.setattr(curve, "peer_greeting", lambda host, port, timeout=None, sent=None: probes.append((host, port)) or greeting)
    return watch, probes, net


def _handshake_failed_without_a_reason(watch: curve.HandshakeWatch) -> bool:
    watch.monitor.events.append(monitor_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL))
    return watch.check()


def test_a_curve_client_takes_three_handshakes_failed_in_a_row_at_a_server_for_a_wrong_key(tmp_path, monkeypatch):
    """One handshake failed without a reason may be a connection cut mid-handshake, and is retried
    unasked; three in a row at a peer that sends ZeroMQ's greeting are a server that cannot read our
    hello (the wrong server.key), said at once rather than after --give-up-after."""
    watch, probes, _ = _curve_watch(tmp_path, monkeypatch, curve.ZMTP_SIGNATURE_START)
    assert not _handshake_failed_without_a_reason(watch) and not _handshake_failed_without_a_reason(watch)
    assert probes == []
    with pytest.raises(curve.HandshakeFailed, match="failed 3 times in a row: the server could not read our hello"):
        _handshake_failed_without_a_reason(watch)
    assert len(probes) == 1


def test_a_curve_client_of_a_plain_server_whose_refusal_zeromq_did_not_report_is_told_so(tmp_path, monkeypatch):
    """A plain server closes the connection on a CURVE client's greeting, and the client's ZeroMQ
    reported the mismatch only when it had read the server's greeting first: between processes, about
    half the time; otherwise three handshakes failed without a reason, and the line blamed the
    client's server.key.  The probe reads the server's mechanism (NULL) and says what is wrong."""
    watch, probes, _ = _curve_watch(tmp_path, monkeypatch, PLAIN_GREETING)
    assert not _handshake_failed_without_a_reason(watch) and not _handshake_failed_without_a_reason(watch)
    with pytest.raises(curve.HandshakeFailed, match=f"^{ENDPOINT} does not use CURVE: start the server with --keys"):
        _handshake_failed_without_a_reason(watch)
    assert len(probes) == 1


def test_a_curve_clients_probe_that_got_no_answer_is_not_taken_for_a_peer_that_closed(tmp_path, monkeypatch, caplog):
    """A probe that heard nothing in its time (a silent peer, or no time left) says nothing of a peer
    that closes connections before its greeting (a proxy whose server is down): that is a close seen."""
    watch, probes, _ = _curve_watch(tmp_path, monkeypatch, None)
    with caplog.at_level(logging.WARNING, logger="pscnn.curve"):
        for _ in range(curve.SILENT_FAILURES_LIMIT):
            assert not _handshake_failed_without_a_reason(watch)
    assert len(probes) == 1
    assert "closed before the CURVE handshake began" not in caplog.text

CURVE_GREETING = curve.ZMTP_PROBE[:10] + b"\x03\x01" + b"CURVE".ljust(20, b"\0") + bytes(32)


@pytest.mark.parametrize("greeting, refused", [(CURVE_GREETING, True), (PLAIN_GREETING, False), (b"", False),
                                               (None, False), (b"SSH-2.0-OpenSSH_9.2\r\n", True)],
                         ids=["curve", "plain", "closed", "silent", "not zeromq"])
def test_a_plain_client_of_a_curve_server_whose_refusal_zeromq_did_not_report_is_told_so(monkeypatch, greeting,
                                                                                        refused):
    """A CURVE server closes the connection on a plain client's greeting, and the client's ZeroMQ reported
    the mismatch only when it had read the server's greeting first; between processes most connections
    failed without a reason, which a plain client does not watch, and pscnn status said "no answer".
    A socket that has made no handshake for PROBE_AFTER_S asks the peer's greeting: CURVE is
    the refusal; anything else is left to the retries, and asked again only once per period."""
    watch = curve.HandshakeWatch(ENDPOINT, None)
    probes, net = _greetings_sent(monkeypatch, watch, greeting)
    watch.sock, watch.watched_at = object(), net.monotonic()
    net.advance(curve.PROBE_AFTER_S / 2)
    assert not watch.check() and probes == []           # not yet: a handshake takes a moment
    net.advance(curve.PROBE_AFTER_S / 2)
    if refused and greeting == CURVE_GREETING:
        with pytest.raises(curve.HandshakeFailed, match=f"^{ENDPOINT} requires CURVE authentication: give --keys"):
            watch.check()
        # and the server is told, with a plain greeting, so that its log says a plain client was refused
        assert probes == [curve.ZMTP_PROBE, curve.ZMTP_NULL_GREETING]
        return
    if refused:         # another service: said at once, in one line, and sent nothing more
        with pytest.raises(curve.HandshakeFailed) as err:
            watch.check()
        one_line_naming(err.value, ENDPOINT, "is not a ZeroMQ peer (it answered 'SSH-2.0-OpenSSH_9.2')")
        assert probes == [curve.ZMTP_PROBE]
        return
    assert not watch.check() and len(probes) == 1
    net.advance(0.1)
    assert not watch.check() and len(probes) == 1
    net.advance(curve.GREETING_PROBE_EVERY_S)
    assert not watch.check() and len(probes) == 2


def test_a_query_with_less_time_than_the_probes_wait_asks_the_greeting_at_half_its_time(monkeypatch):
    """A plain socket asks the peer's greeting after PROBE_AFTER_S without a handshake: pscnn status
    --timeout 0.3 never did, and said "no answer" of a CURVE server 8 times in 16 between two processes.
    With a deadline closer than twice that, it asks at half the time to the deadline."""
    watch = curve.HandshakeWatch(ENDPOINT, None)
    timeouts = []
    _, net = _greetings_sent(monkeypatch, watch, CURVE_GREETING, timeouts)
    watch.sock, watch.watched_at = object(), net.monotonic()
    deadline = watch.watched_at + curve.PROBE_AFTER_S / 2
    net.advance(curve.PROBE_AFTER_S / 8)
    assert not watch.check(deadline) and timeouts == []        # a handshake takes a moment
    net.advance(curve.PROBE_AFTER_S / 8)
    with pytest.raises(curve.HandshakeFailed, match=f"^{ENDPOINT} requires CURVE authentication"):
        watch.check(deadline)
    assert timeouts[0] == pytest.approx(curve.PROBE_AFTER_S / 4)       # the time left, no more


def test_a_short_status_query_checks_its_handshakes_before_half_its_time(accept_and_close, monkeypatch):
    """query_status checked the handshakes once per 0.1 s wait for the answer: with --timeout 0.1 the
    first check came at the deadline, too late for the greeting probe due at half of it."""
    waits, real_poll = [], zmq.Socket.poll

    def recorded_poll(sock, timeout=None, flags=zmq.POLLIN):
        waits.append(timeout)
        return real_poll(sock, timeout, flags)
    monkeypatch.setattr(zmq.Socket, "poll", recorded_poll)
    assert client_module.query_status(accept_and_close.endpoint, timeout=0.1) is None
    assert waits, "the query never waited: nothing was tested"
    assert max(waits) <= 25, waits      # ms: four checks at least, the probe's (at 50 ms) among them


def test_a_curve_clients_greeting_probe_serves_its_silent_failures_too(tmp_path, monkeypatch):
    """A CURVE client's socket that has made no handshake for PROBE_AFTER_S probes the greeting (is the peer
    ZeroMQ at all?); its third handshake failed without a reason just after is looked into with that
    greeting, not after the next probe's period."""
    watch, probes, net = _curve_watch(tmp_path, monkeypatch, CURVE_GREETING)
    watch.sock, watch.watched_at = object(), net.monotonic()
    net.advance(curve.PROBE_AFTER_S)
    assert not watch.check() and len(probes) == 1       # a CURVE server: its handshake may come yet
    assert not _handshake_failed_without_a_reason(watch) and not _handshake_failed_without_a_reason(watch)
    with pytest.raises(curve.HandshakeFailed, match="failed 3 times in a row: the server could not read our hello"):
        _handshake_failed_without_a_reason(watch)
    assert len(probes) == 1


def refusal_event(kind: int, value: int) -> list[bytes]:
    """A socket monitor's event of a handshake refused for a reason (``value``: ZeroMQ's error code)."""
    return [struct.pack("=hi", kind, value), ENDPOINT.encode()]


def _greetings_sent(monkeypatch, watch: curve.HandshakeWatch, greeting: bytes | None,
                    timeouts: list | None = None) -> tuple[list, SimNet]:
    """What ``watch`` sends on greeting probes of its own (each answered ``greeting``), on a simulated
    monitor and clock (the SimNet's); ``timeouts``: a list that gets each probe's timeout."""
    watch.monitor = SimMonitor()
    net = SimNet(100)
    monkeypatch.setattr(curve, "time", SimpleNamespace(monotonic=net.monotonic))
    ours = []

    def probe(host, port, timeout=None, sent=curve.ZMTP_PROBE):
        ours.append(sent)
        if timeouts is not None:
            timeouts.append(timeout)
        return greeting
    monkeypatch.setattr(curve, "peer_greeting", probe)
    return ours, net


def test_a_plain_client_whose_refusal_zeromq_reported_tells_the_server_once_asking_nothing(monkeypatch):
    """ZeroMQ reported a CURVE server's refusal of a plain client: the client knows, and asks no greeting;
    it sends the server one plain greeting, for its log, however often ZeroMQ reports the refusal
    (on each reconnect) and it is told it."""
    watch = curve.HandshakeWatch(ENDPOINT, None)
    sent, net = _greetings_sent(monkeypatch, watch, CURVE_GREETING)
    watch.sock, watch.watched_at = object(), net.monotonic()
    net.advance(2 * curve.PROBE_AFTER_S)      # long enough for a probe, were one wanted
    for _ in range(2):
        watch.monitor.events.append(refusal_event(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                                                  zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH))
        with pytest.raises(curve.HandshakeFailed, match=f"^{ENDPOINT} requires CURVE authentication"):
            watch.check()
        assert sent == [curve.ZMTP_NULL_GREETING]


@pytest.mark.parametrize("kind, value, said", [
    (zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400, "refused this client's CURVE key"),
    (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH, "does not use CURVE")],
    ids=["its-key", "plain-server"])
def test_a_curve_client_refused_sends_the_server_no_plain_greeting(tmp_path, monkeypatch, kind, value, said):
    """A plain greeting would put a plain client refused in the server's log: only a plain client
    refused by a CURVE server sends one, not a client with keys refused for its key or by a plain server."""
    curve.make_keys(tmp_path / "keys", ["client-0"])
    watch = curve.HandshakeWatch(ENDPOINT, curve.client_keys(tmp_path / "keys" / "client-0"))
    sent, _ = _greetings_sent(monkeypatch, watch, PLAIN_GREETING)
    watch.monitor.events.append(refusal_event(kind, value))
    with pytest.raises(curve.HandshakeFailed, match=said):
        watch.check()
    assert sent == []


def test_a_plain_client_gives_its_new_socket_time_for_a_handshake_before_it_asks_a_greeting(monkeypatch):
    """PROBE_AFTER_S counts from when the socket was watched, not from the watch's making:
    a socket watched long after (a reconnect) is not probed at once."""
    watch = curve.HandshakeWatch(ENDPOINT, None)
    sent, net = _greetings_sent(monkeypatch, watch, CURVE_GREETING)
    watch.monitor = None                        # watch() gives it the socket's own
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)               # never connected: no handshake
    try:
        net.advance(10 * curve.GREETING_PROBE_EVERY_S)
        watch.watch(sock)
        net.advance(curve.PROBE_AFTER_S / 2)
        assert not watch.check() and sent == []
        net.advance(curve.PROBE_AFTER_S / 2)
        with pytest.raises(curve.HandshakeFailed, match="requires CURVE authentication"):
            watch.check()
        assert sent == [curve.ZMTP_PROBE, curve.ZMTP_NULL_GREETING]
    finally:
        watch.close()
        sock.close(linger=0)
        ctx.term()


def test_a_plain_watch_without_a_socket_asks_no_greeting(monkeypatch):
    """No socket watched (none yet, or the last one closed before the next): no handshake is awaited,
    so none is overdue, however long it waits."""
    watch = curve.HandshakeWatch(ENDPOINT, None)
    sent, net = _greetings_sent(monkeypatch, watch, CURVE_GREETING)
    net.advance(10 * curve.GREETING_PROBE_EVERY_S)
    assert not watch.check() and sent == []


def test_a_greeting_has_a_mechanism_once_its_whole_mechanism_field_came():
    """The mechanism is bytes 12-31 of a ZMTP 3 greeting: one cut anywhere before byte 32 names none,
    as does a greeting of an older major version (byte 10), which has no mechanism; the plain
    greeting a refused plain client sends names NULL."""
    assert curve.greeting_mechanism(CURVE_GREETING[:32]) == b"CURVE"
    assert curve.greeting_mechanism(CURVE_GREETING[:31]) is None
    for major in (0, 1, 2):
        assert curve.greeting_mechanism(CURVE_GREETING[:10] + bytes([major]) + CURVE_GREETING[11:]) is None, major
    assert curve.greeting_mechanism(curve.ZMTP_NULL_GREETING) == b"NULL"
    assert len(curve.ZMTP_NULL_GREETING) == 64


@pytest.mark.parametrize("end", ["deadline", "reset"])
def test_the_part_of_a_greeting_that_came_before_the_probes_end_is_what_it_read(end):
    """The greeting probe reads up to a whole greeting until its deadline or the peer's close: what
    came before either is what it brings (its signature start tells a ZeroMQ peer), even when the
    deadline had passed as it came (a slow lookup or connection took the time), or a reset followed."""
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname()) as conn:
        peer, _ = listener.accept()
        with peer:
            peer.sendall(CURVE_GREETING[:12])
            if end == "reset":
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                peer.close()                    # a reset, after the bytes (ordered on the connection)
                deadline = time.monotonic() + 30.0      # a bound: the reset comes first
            else:
                with selectors.DefaultSelector() as arrived:      # the bytes are there (one segment)
                    arrived.register(conn, selectors.EVENT_READ)
                    assert arrived.select(30.0)
                deadline = time.monotonic() - 1.0
            assert curve._received(conn, curve.ZMTP_GREETING_BYTES, deadline) == CURVE_GREETING[:12]


def test_a_plain_client_whose_handshake_succeeded_asks_no_greeting(monkeypatch):
    """A plain client of a plain server: its handshakes succeed, and no probe goes, however long it waits."""
    watch = curve.HandshakeWatch(ENDPOINT, None)
    watch.sock, watch.monitor = object(), SimMonitor()
    net = SimNet(100)
    monkeypatch.setattr(curve, "time", SimpleNamespace(monotonic=net.monotonic))
    probes = []
    monkeypatch.setattr(curve, "peer_greeting", lambda host, port, timeout=None, sent=None: probes.append(timeout) or b"")
    watch.watched_at = net.monotonic()
    watch.monitor.events.append(monitor_event(zmq.EVENT_HANDSHAKE_SUCCEEDED))
    net.advance(10 * curve.GREETING_PROBE_EVERY_S)
    assert not watch.check() and probes == []


def test_the_greeting_probe_of_a_peer_that_closes_first_goes_once_per_period(tmp_path, monkeypatch):
    """A peer that closes before its greeting (a proxy whose server is down) makes a handshake fail on
    each of ZeroMQ's reconnects, and check() runs every 100 ms of a request: the probe, a connection of
    its own, goes at most once every GREETING_PROBE_EVERY_S, not once per check."""
    watch, probes, net = _curve_watch(tmp_path, monkeypatch, b"")
    for _ in range(6):
        assert not _handshake_failed_without_a_reason(watch)
        net.advance(0.1)
    assert len(probes) == 1, probes
    net.advance(curve.GREETING_PROBE_EVERY_S)
    assert not _handshake_failed_without_a_reason(watch)
    assert len(probes) == 2, probes


def test_the_line_about_a_peer_that_closes_first_is_said_again_once_a_handshake_succeeded_between(
        tmp_path, monkeypatch, caplog):
    """The server came back, then went down behind its proxy again: a second outage gets its line too."""
    watch, _, net = _curve_watch(tmp_path, monkeypatch, b"")
    with caplog.at_level(logging.WARNING, logger="pscnn.curve"):
        for outage in range(2):
            for _ in range(2 * curve.SILENT_FAILURES_LIMIT):
                _handshake_failed_without_a_reason(watch)
                net.advance(curve.GREETING_PROBE_EVERY_S)
            watch.monitor.events.append(monitor_event(zmq.EVENT_HANDSHAKE_SUCCEEDED))
            watch.check()
    said = [r.getMessage() for r in caplog.records if "closed before the CURVE handshake began" in r.getMessage()]
    assert len(said) == 2, said


def test_only_a_second_handshake_says_the_connection_was_made_again():
    """The first handshake on a socket is its connection made; each after it, the connection made
    again (a request sent on the dropped one is resent then).  Taking the first for a reconnect
    resent every first request at once."""
    watch = curve.HandshakeWatch(ENDPOINT, None)
    watch.monitor = SimMonitor()
    watch.monitor.events.append(monitor_event(zmq.EVENT_HANDSHAKE_SUCCEEDED))
    assert watch.check() is False
    watch.monitor.events.append(monitor_event(zmq.EVENT_HANDSHAKE_SUCCEEDED))
    assert watch.check() is True
    assert watch.check() is False               # said once


class SlowToNotice(threading.Event):
    """Client._closing for a heartbeat thread that is busy when close() is called: it takes
    0.3 s to notice (close() has to wait for it, not return with the thread still running)."""

    def _busy(self) -> None:
        if threading.current_thread().name == "heartbeat":
            time.sleep(0.3)

    def wait(self, timeout=None) -> bool:
        if super().wait(timeout):
            self._busy()
            return True
        return False

    def is_set(self) -> bool:
        if super().is_set():
            self._busy()
            return True
        return False


def test_connect_again_keeps_one_heartbeat_thread_and_close_stops_it_and_says_bye(router, clients):
    """A worker that rejoins says hello again: it must not start a second heartbeat thread
    (each one more socket and twice the heartbeats).  close() says goodbye (the server frees
    the worker's lease at once instead of after its peer timeout), closes the request socket,
    and returns only once the heartbeat thread has ended."""
    server = router(lambda rid, msg, accepted: [WELCOME] if msg.type == P.HELLO else [ACK])
    before = set(threading.enumerate())
    client = clients(server.endpoint, heartbeat=True)
    client._closing = SlowToNotice()
    client.connect()
    client.connect()
    beating = [t for t in set(threading.enumerate()) - before if t.name == "heartbeat"]
    assert len(beating) == 1, beating
    sock = client.sock
    client.close(say_bye=True, reason="done")
    assert not beating[0].is_alive(), "close() returned with the heartbeat thread still running"
    assert sock.closed and client.sock is None
    (bye,) = [m for _, m in server.of_type(P.BYE)]
    assert bye.body["reason"] == "done"


def test_a_closed_client_whose_heartbeats_went_terminates_its_context(router, clients):
    """close() terminates the client's own context (P.own_context) once its heartbeat thread has
    ended, as it does for a client without heartbeats: left to the exit, the context's I/O thread
    handed zero-copy frames back as the interpreter went down, and libzmq aborted (exit -6)."""
    server = router(lambda rid, msg, accepted: [WELCOME] if msg.type == P.HELLO else [ACK])
    client = clients(server.endpoint, heartbeat=True)
    client.connect()
    heartbeats = client._hb_thread
    client.close()
    assert heartbeats is not None and not heartbeats.is_alive()
    assert client.ctx.closed


def test_a_long_silence_is_one_log_line_not_one_per_reconnect(sim, caplog):
    """A server down for the whole --give-up-after (600 s) made a worker log "no answer ...;
    reconnecting" every max_backoff_s: 120 lines saying the same.  The first says it, the rest
    are DEBUG."""
    client, net = sim(700, give_up_after=600.0, resend_s=1.0, reconnect_s=3.0, max_backoff_s=5.0)
    with caplog.at_level(logging.DEBUG, logger="pscnn.client"), pytest.raises(ServerUnreachable):
        client.request(P.WORK)
    reconnecting = [r for r in caplog.records if "reconnecting" in r.getMessage()]
    assert len(reconnecting) == len(net.sockets) - 1 > 100         # each reconnect still logged ...
    assert [r.levelno for r in reconnecting].count(logging.INFO) == 1, caplog.text[-2000:]   # ... once above DEBUG
    assert "up to 5 s apart" in reconnecting[0].getMessage() and "600 s" in reconnecting[0].getMessage()
