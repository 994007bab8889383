"""The client side (worker.client, worker.trainer, worker.evaluator) against a server that misbehaves.

A fake server, a ZeroMQ ROUTER on 127.0.0.1 served by a thread of this test,
answers each request from a script: replies built with ``pscnn.protocol``, or
packed by hand where the protocol would refuse to build them.  Opposite it runs
the real client code, either in this process (``Client``, ``Trainer.loop``),
where the test looks at what it did, or as ``pscnn worker`` / ``pscnn
evaluator`` subprocesses, where the test looks at the exit status and stderr:
one ``pscnn: error:`` line, no traceback.  Every wait is bounded
(``--give-up-after``, subprocess timeouts, the fake's poll), and a script
ends in silence where a client that loops for ever would otherwise hang the
test: the client then gives up after ``give_up_after`` and the test fails.
"""
from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import msgpack
import pytest
import zmq

from cnn_core.errors import ConfigError
from cnn_core.model import build_model
from pscnn import protocol as P
from pscnn.cli import _name, build_parser
from pscnn.launcher import LocalCluster, child_env, query_status
from worker import client as client_module
from worker import trainer as trainer_module
from pscnn.names import MAX_NAME_BYTES, MAX_NAME_CHARS, ROUTING_ID_BYTES
from worker.client import (FAILURE_PAUSE_S, HEARTBEAT_MAX_S, HEARTBEAT_MIN_S, MAX_FAILURES_IN_A_ROW, MAX_RETRY_S,
                           MIN_RETRY_S, BadReply, Client,
                           ServerError, ServerUnreachable, TooManyFailures)
from worker.trainer import Trainer
from helpers import exit_error_line
from test_server_robustness import start_serving

pytestmark = pytest.mark.timeout(120)

LIGHT = build_model("light").spec
RUN = {"seed": 0, "batch_size": 64, "num_samples": 640, "epochs": 1, "mode": "async", "test_limit": 0}
BATCHES = 10                                # 640 samples in batches of 64
GIVE_UP_S = 5.0                             # how long a client waits on a silent fake


# ---------------------------------------------------------------- replies

def welcome(run: dict | None = None, model=None, heartbeat_s: float = 1.0, incarnation: str = "fake") -> tuple:
    """``incarnation``: another one than an earlier welcome's is a restarted server."""
    return (P.WELCOME, {"worker_id": "w", "role": "trainer", "model": LIGHT if model is None else model,
                        "run": dict(RUN) if run is None else run, "incarnation": incarnation,
                        "heartbeat_s": heartbeat_s})


def task(**over) -> tuple:
    return (P.TASK, {"version": 0, "epoch": 0, "batch": 0, "lease": 1, "held_s": 0.0, **over})


def wait(retry_s: float) -> tuple:
    return (P.WAIT, {"retry_s": retry_s, "held_s": 0.0, "reason": "test"})


def error(code: str, message: str) -> tuple:
    return (P.ERROR, {"code": code, "message": message})


def weights(done: bool) -> tuple:
    model = build_model("light")
    return (P.WEIGHTS, {"version": 3, "epoch": 0, "done": done, "updates": 3}, {**model.params, **model.state})


def message(reply: tuple) -> P.Message:
    mtype, body, *arrays = reply
    return P.Message(mtype, body=body, arrays=arrays[0] if arrays else {})


STOP = (P.STOP, {"version": 0, "reason": "training finished"})
ACK = (P.ACK, {})
SILENCE = None                              # no answer: the client resends, then gives up


class Unchecked:
    """A reply whose header is packed by hand: what pscnn.protocol would refuse to build."""

    def __init__(self, mtype: str, body: dict, **header):
        self.mtype, self.body, self.header = mtype, body, header     # header: keys to add or override

    def frames(self, seq: int) -> list:
        return [msgpack.packb({"v": P.PROTOCOL_VERSION, "type": self.mtype, "wid": "", "seq": seq,
                               "body": self.body, "arrays": [], **self.header}, use_bin_type=True)]


# ---------------------------------------------------------------- the fake server

class FakeServer:
    """A ROUTER that answers each request of a type with the next of that type's scripted replies.

    The last reply of a list is repeated; hello defaults to a good welcome, bye
    to an ack; heartbeats (not done) and, unless scripted, status requests
    (started) are answered.  A resend (the
    same wid and seq) gets the same reply again, as from the real server's
    cache, except after a hand-packed reply, which the client may have dropped
    as malformed: then it gets the next one.  ``received``: the decoded
    requests, resends and heartbeats left out.
    """

    def __init__(self, **replies):
        self.replies = {P.HELLO: [welcome()], P.BYE: [ACK], **{k: list(v) for k, v in replies.items()}}
        self.received: list[P.Message] = []
        self.problems: list[str] = []
        # What a heartbeat gets: a message, or raw frames; a test may swap it at any time.
        self.heartbeat_reply = lambda: P.Message(P.HEARTBEAT, body={"done": False})
        self.status_reply = lambda: P.Message(P.STATUS, body={"progress": {"started": True, "done": False}})
        self._last: tuple = (None, None, None)          # wid, seq, frames of the last reply (None: not cached)
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)        # a client that reconnects keeps its id, as on the server
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-server", daemon=True)
        self._thread.start()

    def of_type(self, mtype: str) -> list[P.Message]:
        return [m for m in self.received if m.type == mtype]

    def _next(self, mtype: str):
        queue = self.replies.get(mtype)
        if not queue:
            self.problems.append(f"unscripted {mtype}")
            return SILENCE
        return queue.pop(0) if len(queue) > 1 else queue[0]

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.sock.poll(50, zmq.POLLIN):
                    continue
                rid, *frames = self.sock.recv_multipart()
                try:
                    msg = P.decode(frames)
                except P.ProtocolError as exc:
                    self.problems.append(f"undecodable request: {exc}")
                    continue
                if msg.type == P.HEARTBEAT or msg.type == P.STATUS and P.STATUS not in self.replies:
                    out = self.heartbeat_reply() if msg.type == P.HEARTBEAT else self.status_reply()
                    self.sock.send_multipart([rid, *(P.encode(out) if isinstance(out, P.Message) else out)])
                    continue
                wid, seq, cached = self._last
                if (msg.wid, msg.seq) == (wid, seq) and cached is not None:
                    self.sock.send_multipart([rid, *cached])
                    continue
                self.received.append(msg)
                reply = self._next(msg.type)
                if reply is SILENCE:
                    self._last = (msg.wid, msg.seq, None)
                    continue
                if isinstance(reply, Unchecked):
                    out, cached = reply.frames(msg.seq), None
                else:
                    out = message(reply)
                    out.seq = msg.seq
                    out = cached = [bytes(f) for f in P.encode(out)]
                self._last = (msg.wid, msg.seq, cached)
                self.sock.send_multipart([rid, *out])
        finally:
            self.sock.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the fake server did not stop"


@pytest.fixture
def fake():
    """fake(**replies) -> a started FakeServer; all of them are stopped afterwards."""
    servers: list[FakeServer] = []

    def start(**replies) -> FakeServer:
        servers.append(FakeServer(**replies))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
    for server in servers:
        assert not server.problems, server.problems


@pytest.fixture
def connect():
    """connect(server, name=None, heartbeat=False) -> a Client that said hello; all closed afterwards."""
    clients: list[Client] = []

    def make(server: FakeServer, name: str | None = None, heartbeat: bool = False) -> Client:
        c = Client(server.endpoint, "trainer", name=name, give_up_after=GIVE_UP_S, heartbeat=heartbeat)
        clients.append(c)
        c.connect()
        return c

    yield make
    for c in clients:
        c.close()


def trainer_on(client: Client) -> Trainer:
    t = Trainer(client, compute_ms=0.0)     # synthetic: no MNIST, zero gradients
    t.setup(message(welcome()))
    return t


def run_loop(trainer: Trainer, overlapped: bool) -> int:
    return trainer.loop_overlapped() if overlapped else trainer.loop()


LOOPS = pytest.mark.parametrize("overlapped", [False, True], ids=["loop", "overlapped"])


# ---------------------------------------------------------------- the CLI as a subprocess

def pscnn(role: str, endpoint: str, *flags: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "pscnn.cli", role, "--server", endpoint, "--give-up-after", str(GIVE_UP_S), *flags]
    if role == "worker":
        argv += ["--compute-ms", "0"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=90, env=child_env(), check=False)


def clean_exit(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]


# ================================================================ 1: a server that refuses us

def test_a_full_server_refuses_a_worker_with_one_line(tmp_path):
    cluster = LocalCluster(tmp_path / "run")
    holder = zmq.Context.instance().socket(zmq.DEALER)
    holder.setsockopt(zmq.LINGER, 0)
    try:
        start_serving(cluster, ["--model", "light", "--train-limit", "640", "--batch-size", "64", "--mode", "async",
                                "--checkpoint-every", "0", "--max-workers", "1", "--peer-timeout", "120",
                                "--out", str(cluster.out)])       # the holder below stays "alive" throughout
        holder.connect(cluster.endpoint)                  # the one trainer the server takes
        holder.send_multipart(P.encode(P.Message(P.HELLO, "holder-1", 1, {"role": "trainer"})))
        assert holder.poll(10_000, zmq.POLLIN), cluster.log_tail("server")
        assert P.decode(holder.recv_multipart()).type == P.WELCOME

        proc = pscnn("worker", cluster.endpoint)
        exit_error_line(proc, 1, "refused our hello", "full: server full (1 ")
    finally:
        holder.close(linger=0)
        cluster.close()


def test_a_hello_answered_with_a_task_is_one_line(fake):
    server = fake(hello=[task()])
    exit_error_line(pscnn("worker", server.endpoint), 1, "answered our hello with 'task', not a welcome")


def test_a_server_whose_host_does_not_resolve_is_said_so():
    """ZeroMQ retries a name that does not resolve without a word: a misspelt --server read as a
    server that does not answer ("no answer ...; reconnecting"), for --give-up-after (600 s)."""
    proc = pscnn("worker", "tcp://no-such-host.invalid:5555", "--give-up-after", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "tcp://no-such-host.invalid:5555: its host does not resolve (" in proc.stderr, proc.stderr[-3000:]
    for endpoint in ("tcp://127.0.0.1:5555", "tcp://eth0;127.0.0.1:5555", "tcp://[::1]:5555", "ipc:///tmp/pscnn-x"):
        assert client_module.unresolved_host(endpoint) is None, endpoint


# ================================================================ 2: names whose client id cannot fit

@pytest.mark.parametrize("name,limit", [("x" * (MAX_NAME_CHARS + 1), f"at most {MAX_NAME_CHARS} characters"),
                                        ("x" * 130, f"at most {MAX_NAME_CHARS} characters"),
                                        ("é" * 125, f"at most {MAX_NAME_CHARS} characters"),
                                        ("€" * (MAX_NAME_BYTES // 3 + 1), f"at most {MAX_NAME_BYTES} bytes")])
def test_the_cli_refuses_a_name_whose_client_id_cannot_fit(capsys, name, limit):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["worker", "--name", name])
    assert exit_.value.code == 2
    assert limit in capsys.readouterr().err


@pytest.mark.parametrize("name", ["x" * MAX_NAME_CHARS, "€" * (MAX_NAME_BYTES // 3) + "x" * (MAX_NAME_BYTES % 3)],
                         ids=["longest-ascii", "most-bytes"])
def test_the_longest_names_the_cli_takes_make_clients_the_server_can_reach(fake, connect, name):
    assert _name(name) == name                          # the CLI takes it: one rule, pscnn.names
    server = fake()
    c = connect(server, name=name)
    hello = server.of_type(P.HELLO)[0]
    assert hello.wid == c.wid and hello.wid.startswith(name) and len(hello.wid) <= P.MAX_NAME_LEN
    assert len(c.routing_id) <= ROUTING_ID_BYTES
    with pytest.raises(ConfigError, match="client name"):
        Client(server.endpoint, "trainer", name=name + "x")


# ================================================================ 3: error replies, bounded

@LOOPS
def test_a_trainer_gives_up_after_so_many_error_replies_in_a_row(fake, connect, overlapped):
    # silence after the limit: a trainer that kept on asking would give up as unreachable instead
    server = fake(work=[error("boom", "no")] * MAX_FAILURES_IN_A_ROW + [SILENCE])
    trainer = trainer_on(connect(server))
    with pytest.raises(TooManyFailures, match=f"{MAX_FAILURES_IN_A_ROW} failed requests in a row.*boom: no"):
        run_loop(trainer, overlapped)
    assert len(server.of_type(P.WORK)) == MAX_FAILURES_IN_A_ROW


@LOOPS
def test_a_streak_of_failures_is_retried_after_a_growing_pause(fake, connect, monkeypatch, overlapped):
    # One refusal is routine (a push whose lease moved on): the next request goes at once.
    # From the second failure in a row on, the trainer pauses, twice as long each time.
    server = fake(work=[error("boom", "no"), task(), error("boom", "no"), error("boom", "no"), STOP],
                  push=[error("stale", "lease moved")])
    trainer = trainer_on(connect(server))
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    assert run_loop(trainer, overlapped) == 0
    pauses = [s for s in slept if s]                    # sleep(0): the task's (absent) synthetic compute
    assert pauses == [FAILURE_PAUSE_S, 2 * FAILURE_PAUSE_S], slept


@LOOPS
def test_fewer_error_replies_in_a_row_are_survived(fake, connect, overlapped):
    # a task starts the count again; the refused push and the errors after it make one too few
    errors = [error("boom", "no")] * (MAX_FAILURES_IN_A_ROW - 1)
    server = fake(work=[*errors, task(), *errors[1:], STOP], push=[error("stale", "lease moved")])
    assert run_loop(trainer_on(connect(server)), overlapped) == 0
    assert len(server.of_type(P.PUSH)) == 1


def test_a_worker_answered_only_with_errors_exits_with_one_line(fake):
    server = fake(work=[error("boom", "no")] * MAX_FAILURES_IN_A_ROW + [SILENCE])
    exit_error_line(pscnn("worker", server.endpoint), 1, "failed requests in a row",
                    "refused our work request: boom: no")
    (bye,) = server.of_type(P.BYE)                      # its lease goes back at once, not after --peer-timeout
    assert bye.body["reason"] == "error"


@LOOPS
def test_a_server_that_forgets_the_trainer_every_time_is_given_up(fake, connect, overlapped):
    server = fake(work=[error("unknown_worker", "who?")] * (2 * MAX_FAILURES_IN_A_ROW) + [SILENCE])
    trainer = trainer_on(connect(server))
    with pytest.raises(TooManyFailures, match="did not know us.*joined it again"):
        run_loop(trainer, overlapped)
    assert len(server.of_type(P.HELLO)) == 1 + MAX_FAILURES_IN_A_ROW


# ================================================================ 5: a wait's retry_s

@LOOPS
def test_a_waits_retry_s_is_clamped(fake, connect, monkeypatch, overlapped):
    # -1 would raise, 1e9 park the trainer for good, 0 make it ask again at once, for ever
    server = fake(work=[wait(-1.0), wait(1e9), wait(0.0), STOP])
    trainer = trainer_on(connect(server))
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)     # record, do not sleep
    assert run_loop(trainer, overlapped) == 0
    assert slept.count(MIN_RETRY_S) == 2 and MAX_RETRY_S in slept, slept
    assert all(MIN_RETRY_S <= s <= MAX_RETRY_S for s in slept), slept


@LOOPS
def test_a_server_that_answers_only_wait_is_given_up(fake, connect, overlapped, monkeypatch):
    # Every request answered (heartbeats too), each with a wait: the trainer was parked for good.
    # Like a request held back, it is given up after HELD_LIMIT_FACTOR times give_up_after.  The
    # factor is made small rather than give_up_after: a 0.05 s give_up_after also bounds each
    # answer's silence, which a loaded machine overran ("no usable answer ... for 0.05 s").
    monkeypatch.setattr(trainer_module, "HELD_LIMIT_FACTOR", 0.1)
    server = fake(work=[wait(0.0)])
    client = connect(server)
    client.give_up_after = 5.0                  # given up after 0.5 s of waits
    with pytest.raises(ServerUnreachable, match="answered every request with 'wait' for"):
        run_loop(trainer_on(client), overlapped)
    assert not server.of_type(P.PUSH)


@LOOPS
def test_a_trainer_stopped_while_told_to_wait_does_not_count_that_time_as_waiting(fake, connect, monkeypatch,
                                                                                 overlapped):
    # Stopped (SIGSTOP, Ctrl-Z) in a wait's sleep for longer than the waits' limit, then continued:
    # it gave up at once at the next wait ("answered every request with 'wait' for 100 s"), the
    # server there and about to hand out work.  The server said "wait" for milliseconds, not 100 s.
    server = fake(work=[wait(0.01)] * 3 + [STOP])
    client = connect(server)
    client.give_up_after = 1.0                  # waits given up after 10 s of them
    real_monotonic, real_sleep = time.monotonic, time.sleep

    def stopped_in_the_first_sleep(seconds):
        real_sleep(seconds)
        monkeypatch.setattr(time, "monotonic", lambda: real_monotonic() + 100.0)     # from now on
        monkeypatch.setattr(time, "sleep", real_sleep)
    monkeypatch.setattr(time, "sleep", stopped_in_the_first_sleep)
    assert run_loop(trainer_on(client), overlapped) == 0
    assert len(server.of_type(P.WORK)) == 4


def test_after_a_wait_an_overlapped_trainer_computes_what_it_holds_before_asking_again(fake, connect):
    server = fake(work=[task(), wait(0.0), task(batch=1), STOP], push=[STOP])
    assert trainer_on(connect(server)).loop_overlapped() == 0
    assert [m.type for m in server.received if m.type in (P.WORK, P.PUSH)][:3] == [P.WORK, P.WORK, P.PUSH]


# ================================================================ 5b: the worker's flags

@pytest.mark.parametrize("mode,first", [("async", [P.WORK, P.WORK, P.PUSH]), ("sync", [P.WORK, P.PUSH])])
def test_overlap_makes_a_worker_hold_two_leases_in_async_mode_only(fake, mode, first):
    # two, not more (each is a push staler); and a sync round (or an ssp clock) counts one
    # batch per worker: a second lease would wait for ever
    server = fake(hello=[welcome(run={**RUN, "mode": mode})], work=[task(), task(batch=1), STOP], push=[STOP])
    proc = pscnn("worker", server.endpoint, "--overlap")
    clean_exit(proc)
    assert [m.type for m in server.received if m.type in (P.WORK, P.PUSH)][:3] == first
    # the warning says what the worker does instead (it said only that the flag does not apply)
    assert ("the server runs sync: --overlap applies to async mode only; computing one batch at a time"
            in proc.stderr) == (mode == "sync"), proc.stderr


@pytest.mark.parametrize("before,after", [("async", "sync"), ("sync", "async")])
def test_an_overlap_trainer_takes_the_loop_of_the_mode_of_a_server_it_rejoins(fake, connect, caplog, before, after):
    """A trainer rejoining a new server on its endpoint (a new run, of another --mode) kept the loop
    chosen at the start: with --overlap, two leases on a sync server, which refused every second work
    request (1,000 warnings "too_many_leases" on each side for a 1,000-step run, each counted in the
    run's rejected_messages); or one batch at a time on an async one.  It takes the new mode's loop,
    and says so."""
    params = dict(build_model("light").params)        # a rejoined server's first task carries its weights
    server = fake(hello=[welcome(run={**RUN, "mode": before}), welcome(run={**RUN, "mode": after}, incarnation="new")],
                  work=[(*task(batch=b), params) for b in range(4)] + [STOP],
                  push=[error("unknown_worker", "who?"), STOP])
    trainer = Trainer(connect(server), compute_ms=0.0, overlap=True)
    trainer.setup(message(welcome(run={**RUN, "mode": before})))
    with caplog.at_level(logging.INFO, logger="pscnn.worker"):
        assert trainer.work() == 0
    rejoined = max(i for i, m in enumerate(server.received) if m.type == P.HELLO)
    assert [m.type for m in server.received[rejoined + 1:] if m.type in (P.WORK, P.PUSH)][:3] == \
        ([P.WORK, P.PUSH] if after == "sync" else [P.WORK, P.WORK, P.PUSH])
    said = ("the server runs sync now: --overlap applies to async mode only; computing one batch at a time"
            if after == "sync" else
            "the server runs async now: computing each batch while the previous push travels (--overlap)")
    assert said in caplog.messages, caplog.text


def test_a_worker_gives_up_after_its_give_up_after(fake):
    server = fake(work=[SILENCE])
    server.heartbeat_reply = lambda: [b"garbage"]       # no answer either: the server is silent
    proc = pscnn("worker", server.endpoint)             # --give-up-after GIVE_UP_S
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"no usable answer from {server.endpoint} for {GIVE_UP_S:.0f} s; giving up" in proc.stderr


# ================================================================ 6: tasks that do not fit the run

BAD_TASKS = {"batch past the epoch": ({"batch": 10**6}, "batch 1000000"),
             "batch = batches per epoch": ({"batch": BATCHES}, f"batch {BATCHES} is not one of the run's {BATCHES}"),
             "negative batch": ({"batch": -1}, "batch -1"),
             "negative epoch": ({"epoch": -1}, "epoch -1 < 0"),
             "negative lease": ({"lease": -1}, "lease -1 < 0"),
             "negative version": ({"version": -1}, "version -1 < 0")}


@LOOPS
@pytest.mark.parametrize("case", BAD_TASKS)
def test_a_bad_task_is_skipped_and_logged(fake, connect, caplog, case, overlapped):
    fields, needle = BAD_TASKS[case]
    server = fake(work=[task(**fields), STOP], push=[STOP])
    with caplog.at_level(logging.WARNING, logger="pscnn.client"):
        assert run_loop(trainer_on(connect(server)), overlapped) == 0
    assert not server.of_type(P.PUSH)
    assert len(server.of_type(P.WORK)) == 2
    assert any("bad task" in r.getMessage() and needle in r.getMessage() for r in caplog.records), caplog.text


def test_a_worker_given_only_bad_tasks_exits_with_one_line(fake):
    server = fake(work=[task(batch=10**6)] * MAX_FAILURES_IN_A_ROW + [SILENCE])
    exit_error_line(pscnn("worker", server.endpoint), 1, "failed requests in a row", "bad task", "batch 1000000")


def test_a_reply_of_the_wrong_type_is_skipped(fake, connect):
    server = fake(work=[(P.WEIGHTS, {"version": 0, "epoch": 0, "done": False, "updates": 0}), STOP])
    assert trainer_on(connect(server)).loop() == 0
    assert len(server.of_type(P.WORK)) == 2


# ================================================================ 7: welcomes the client cannot use

BAD_WELCOMES = {"no run settings": (welcome(run={}), "no run setting 'seed'"),
                "seed not an int": (welcome(run={**RUN, "seed": "x"}), "'seed' = 'x'"),
                "negative seed": (welcome(run={**RUN, "seed": -1}), "'seed' = -1"),
                "batch size 0": (welcome(run={**RUN, "batch_size": 0}), "'batch_size' = 0, not an integer >= 1"),
                "bool num_samples": (welcome(run={**RUN, "num_samples": True}), "'num_samples' = True"),
                "mode not a string": (welcome(run={**RUN, "mode": 3}), "'mode' = 3"),
                "test_limit not an int": (welcome(run={**RUN, "test_limit": "all"}), "'test_limit' = 'all'"),
                "empty model": (welcome(model={}), "model spec cannot be built"),
                "unknown layer": (welcome(model={"input_shape": [1, 28, 28], "layers": [{"type": "magic"}]}),
                                  "unknown layer type 'magic'"),
                # few parameters, but 10028 x 10028 values per channel and image: gigabytes a batch
                "huge activations": (welcome(model={"input_shape": [1, 28, 28], "layers": [
                    {"type": "conv2d", "out_channels": 4, "kernel": 3, "padding": 5000},
                    {"type": "conv2d", "out_channels": 1, "kernel": 3, "stride": 10000},
                    {"type": "flatten"}, {"type": "dense", "units": 10}]}), "values through the layers")}


@pytest.mark.parametrize("case", BAD_WELCOMES)
def test_a_bad_welcome_is_refused_naming_the_setting(case):
    reply, needle = BAD_WELCOMES[case]
    trainer = Trainer(SimpleNamespace(wid="w-1"), compute_ms=0.0)
    with pytest.raises(BadReply, match="the server's") as exc:
        trainer.setup(message(reply))
    assert needle in str(exc.value)


def test_a_model_that_does_not_take_mnist_is_refused(mnist_dir):
    spec = {"input_shape": [3, 32, 32], "layers": [{"type": "flatten"}, {"type": "dense", "units": 10}]}
    trainer = Trainer(SimpleNamespace(wid="w-1"), mnist_dir=mnist_dir)
    with pytest.raises(BadReply, match=r"takes input \[3, 32, 32\], but the images are \[1, 28, 28\]"):
        trainer.setup(message(welcome(model=spec)))


@pytest.mark.parametrize("role", ["worker", "evaluator"])
def test_a_bad_welcome_ends_the_cli_with_one_line(fake, role, mnist_file_names):
    run = {} if role == "worker" else {**RUN, "test_limit": "all"}
    server = fake(hello=[welcome(run=run)])
    exit_error_line(pscnn(role, server.endpoint), 1, "welcome", "'seed'" if role == "worker" else "'test_limit'")


# ================================================================ 8: heartbeat periods

@pytest.mark.parametrize("asked,used", [(0.0, HEARTBEAT_MIN_S), (-5.0, HEARTBEAT_MIN_S), (1e300, HEARTBEAT_MAX_S),
                                        (1.5, 1.5)])
def test_the_heartbeat_period_is_clamped(fake, connect, asked, used):
    c = connect(fake(hello=[welcome(heartbeat_s=asked)]), heartbeat=True)
    assert c.heartbeat_s == used


def test_a_huge_heartbeat_period_does_not_crash_the_worker(fake):
    server = fake(hello=[welcome(heartbeat_s=1e300)], work=[STOP])
    clean_exit(pscnn("worker", server.endpoint))


# ================================================================ 9: the evaluator's pulls

@pytest.mark.parametrize("reply,needle", [(task(), "answered our pull with 'task', not weights"),
                                          (error("boom", "no"), "refused our pull request: boom: no")],
                         ids=["task", "error"])
def test_an_evaluator_answered_with_no_weights_exits_with_one_line(fake, mnist_dir, reply, needle):
    server = fake(pull=[reply] * MAX_FAILURES_IN_A_ROW + [SILENCE])
    proc = pscnn("evaluator", server.endpoint, "--mnist-dir", mnist_dir, "--test-limit", "100")
    exit_error_line(proc, 1, "failed requests in a row", needle)
    assert len(server.of_type(P.PULL)) == MAX_FAILURES_IN_A_ROW


def test_an_evaluator_survives_a_bad_pull_reply_and_scores_the_next(fake, mnist_dir):
    server = fake(pull=[task(), error("boom", "no"), weights(done=True)], eval_report=[ACK])
    clean_exit(pscnn("evaluator", server.endpoint, "--mnist-dir", mnist_dir, "--test-limit", "100"))
    reports = server.of_type(P.EVAL_REPORT)
    assert len(reports) == 1 and reports[0].body["final"] and reports[0].body["version"] == 3
    assert reports[0].body["metrics"]["count"] == 100     # --test-limit


# ================================================================ 10: the server's words in our log

FORGED = "12:00:00 ERROR   worker: FORGED"


def test_a_stop_reason_is_logged_on_one_line(caplog):
    trainer = Trainer(SimpleNamespace(wid="w-1"), compute_ms=0.0)
    with caplog.at_level(logging.INFO, logger="pscnn.worker"):
        trainer._stopped(P.Message(P.STOP, body={"version": 0, "reason": f"finished\n{FORGED}\x1b[2J"}))
    (record,) = caplog.records
    assert "\n" not in record.getMessage() and "\x1b" not in record.getMessage()
    assert "finished\\n" + FORGED in record.getMessage()


def test_an_error_reply_is_one_line():
    exc = ServerError("bo\nom", f"no\n{FORGED}", "work request")
    assert str(exc) == f"the server refused our work request: bo\\nom: no\\n{FORGED}"
    assert P.one_line("x" * 1000, 10) == "x" * 7 + "..." and P.one_line("x" * 10, 10) == "x" * 10


def test_a_stop_reason_with_a_newline_forges_no_log_line(fake):
    # Refused by decode where the protocol requires a line (the client resends and gets
    # the plain stop); logged escaped where it does not.
    server = fake(work=[Unchecked(P.STOP, {"version": 0, "reason": f"finished\n{FORGED}"}), STOP])
    proc = pscnn("worker", server.endpoint)
    clean_exit(proc)
    assert not any(line.startswith(FORGED) for line in proc.stderr.splitlines()), proc.stderr


# ================================================================ a request the server holds back

def test_a_request_held_back_while_heartbeats_are_answered_is_not_silence(fake):
    """At the start barrier (or a sync round) the server holds a trainer's request for as long
    as it takes: a client whose heartbeats are answered must not give up, nor reconnect."""
    server = fake(hello=[welcome(heartbeat_s=0.2)], work=[SILENCE] * 3 + [STOP])
    client = Client(server.endpoint, "trainer", give_up_after=2.0, heartbeat=True)
    try:
        client.connect()
        t0 = time.monotonic()
        reply = client.request(P.WORK)                 # answered after 3 resends, 1, 2 and 2 s apart
        assert reply.type == P.STOP
        assert time.monotonic() - t0 > 2.0             # longer than give_up_after: heartbeats counted
    finally:
        client.close()


def test_a_request_held_at_the_start_barrier_outlasts_the_held_limit(fake, caplog, monkeypatch):
    """A trainer at a start barrier that outlasted ten times its --give-up-after gave up (exit 1)
    while the server, which its --start-timeout bounds, still waited for the others.  The
    server's status says its barrier holds: the trainer waits, and says why."""
    # A held limit of 2 x 1 s, not 10 x 0.3 s: give_up_after also bounds the hello's silence and the
    # heartbeats' gaps, and a loaded machine took up to 0.19 s for a hello (0.26 s between heartbeats).
    monkeypatch.setattr(client_module, "HELD_LIMIT_FACTOR", 2)
    server = fake(hello=[welcome(heartbeat_s=0.2)], work=[SILENCE] * 5 + [STOP])
    server.status_reply = lambda: P.Message(P.STATUS, body={"progress": {
        "started": False, "done": False, "ready": 1, "wait_for_workers": 2}})
    client = Client(server.endpoint, "trainer", give_up_after=1.0, heartbeat=True)
    try:
        client.connect()
        with caplog.at_level(logging.INFO, logger="pscnn.client"):
            reply = client.request(P.WORK)             # answered after 5 resends, 1 s apart: past 2 x 1 s
        assert reply.type == P.STOP
    finally:
        client.close()
    said = [r.getMessage() for r in caplog.records if "start barrier" in r.getMessage()]
    assert said and "once 2 trainers ask for it (1 ready now)" in said[0], caplog.text


# `pscnn ...` given up on a request held back, or on waits, after 0.5 s of them (HELD_LIMIT_FACTOR
# 0.1 of a --give-up-after of 5 s), each answer, the hello's too, still allowed 5 s.  (A --give-up-after
# of 0.1 s allowed the hello 0.1 s, which a loaded machine can overrun: no goodbye is owed then.)
SHORT_HELD_LIMIT = """
import sys
from worker import client, trainer
client.HELD_LIMIT_FACTOR = trainer.HELD_LIMIT_FACTOR = 0.1
from pscnn.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("held", ["held back", "told to wait"])
def test_a_worker_that_gives_up_on_a_server_still_answering_says_goodbye(fake, held):
    """A trainer given up on a server that answers heartbeats but holds its request back (or
    answers only "wait") for ten times --give-up-after exited without a word to it: the server
    kept its lease, and counted it in a sync round, until its --peer-timeout.  It says goodbye
    (exit status 1 all the same)."""
    server = fake(hello=[welcome(heartbeat_s=0.2)], work=[SILENCE] if held == "held back" else [wait(0.0)])
    proc = subprocess.run([sys.executable, "-c", SHORT_HELD_LIMIT, "worker", "--server", server.endpoint,
                           "--give-up-after", "5", "--compute-ms", "0"],
                          capture_output=True, text=True, timeout=90, env=child_env(), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [m.body["reason"] for m in server.of_type(P.BYE)] == ["gave up waiting for an answer"], proc.stderr[-3000:]


@pytest.mark.parametrize("answer", [lambda: P.error("unknown_worker", "who?"), lambda: [b"garbage"],
                                    lambda: P.Message(P.ACK)], ids=["error", "garbage", "ack"])
def test_heartbeats_answered_with_anything_but_a_heartbeat_are_no_answer(fake, answer):
    """Only a well-formed heartbeat reply says the server is alive and holds the request back on
    purpose; anything else let a request wait for ever, with not a line logged."""
    server = fake(hello=[welcome(heartbeat_s=0.2)], work=[SILENCE])
    server.heartbeat_reply = answer
    client = Client(server.endpoint, "trainer", give_up_after=1.0, heartbeat=True)
    try:
        client.connect()
        with pytest.raises(ServerUnreachable, match="no usable answer from .* for 1 s"):
            client.request(P.WORK)
    finally:
        client.close()


def test_silence_after_the_heartbeats_said_training_is_over_is_a_clean_exit(fake):
    """The server finished and went away: the worker stops after reconnect_s, with status 0
    (not after --give-up-after, nor with status 1 as for a server that died)."""
    server = fake(hello=[welcome(heartbeat_s=0.2)], work=[SILENCE])
    server.heartbeat_reply = lambda: P.Message(P.HEARTBEAT, body={"done": True})
    proc = pscnn("worker", server.endpoint)
    clean_exit(proc)
    assert "the server finished training and stopped answering" in proc.stderr, proc.stderr[-3000:]


class SeqZero(Unchecked):
    """An error whose seq is 0: the server's answer to a request it could not read a seq from."""

    def frames(self, seq: int) -> list:
        return super().frames(0)


def test_an_error_about_a_request_the_server_could_not_read_is_its_answer(fake, connect):
    server = fake(work=[SeqZero(P.ERROR, {"code": "bad_version", "message": "protocol version 2 is not supported"})])
    with pytest.raises(ServerError, match="refused our work request: bad_version: protocol version 2"):
        connect(server).request(P.WORK)
    assert len(server.of_type(P.WORK)) == 1             # answered at once: no resend, no waiting to give up


def test_a_round_trip_is_timed(fake, connect):
    client = connect(fake(work=[STOP]))
    client.last_rtt_s = 0.0
    client.request(P.WORK)
    assert client.last_rtt_s > 0


def test_a_request_held_back_for_good_is_logged_and_given_up(fake, caplog, monkeypatch):
    """Heartbeats answered, the request never: logged once it is held longer than give_up_after,
    given up after HELD_LIMIT_FACTOR times that (it waited for ever)."""
    # 2 x 1.2 s, not 4 x 0.6 s: give_up_after also bounds the hello's silence and the heartbeats' gaps,
    # and a loaded machine took up to 0.19 s for a hello (0.26 s between heartbeats).
    monkeypatch.setattr(client_module, "HELD_LIMIT_FACTOR", 2)
    server = fake(hello=[welcome(heartbeat_s=0.2)], work=[SILENCE])
    client = Client(server.endpoint, "trainer", give_up_after=1.2, heartbeat=True)
    try:
        client.connect()
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="pscnn.client"), \
                pytest.raises(ServerUnreachable, match="answered heartbeats but held our work request back for"):
            client.request(P.WORK)
        assert time.monotonic() - t0 >= 2 * 1.2
        held = [r.getMessage() for r in caplog.records if "holds our work request back" in r.getMessage()]
        assert len(held) == 1 and "waiting up to 2.4 s in all" in held[0], held
    finally:
        client.close()


def test_the_done_flag_follows_the_heartbeats_and_a_new_welcome(fake):
    """A restarted server trains again: what the last one said must not end the worker."""
    server = fake(hello=[welcome(heartbeat_s=0.2)])
    server.heartbeat_reply = lambda: P.Message(P.HEARTBEAT, body={"done": True})
    client = Client(server.endpoint, "trainer", give_up_after=5.0, heartbeat=True)
    try:
        client.connect()
        assert client.server_done.wait(5.0)
        server.heartbeat_reply = lambda: P.Message(P.HEARTBEAT, body={"done": False})
        deadline = time.monotonic() + 5.0
        while client.server_done.is_set():
            assert time.monotonic() < deadline, "a heartbeat saying done: false did not clear the flag"
            time.sleep(0.05)
        client.server_done.set()
        client.connect()                            # a new welcome
        assert not client.server_done.is_set()
    finally:
        client.close()


def test_status_prints_the_servers_progress_and_fails_when_nothing_answers(fake, capsys):
    """``pscnn status`` is a container healthcheck: exit 0 with the progress as JSON, 1 on silence."""
    import json

    from pscnn.cli import main
    server = fake(status=[(P.STATUS, {"progress": {"version": 12, "epoch": 1}})])
    assert main(["status", "--server", server.endpoint, "--timeout", "5"]) == 0
    assert json.loads(capsys.readouterr().out) == {"version": 12, "epoch": 1}
    silent = fake(status=[SILENCE])
    assert main(["status", "--server", silent.endpoint, "--timeout", "0.2"]) == 1
    out, err = capsys.readouterr()
    assert not out and f"no answer from {silent.endpoint} within 0.2 s" in err


def test_status_of_a_host_that_does_not_resolve_says_so(capsys):
    """`pscnn status --server tcp://no-such-host.invalid:5555` said "no answer ... within 2 s", as for a
    server that is down: a misspelt host name read as a stopped server."""
    from pscnn.cli import main
    endpoint = "tcp://no-such-host.invalid:5555"
    assert main(["status", "--server", endpoint, "--timeout", "0.2"]) == 1
    out, err = capsys.readouterr()
    assert not out and f"no answer from {endpoint} within 0.2 s: its host does not resolve (" in err, err


def test_status_answered_with_an_error_is_not_a_healthy_server(fake, capsys):
    """A healthcheck must fail when what answers is not a pscnn server of this protocol."""
    from pscnn.cli import main
    server = fake(status=[error("bad_version", "protocol version 2 is not supported (this side speaks 3)")])
    with pytest.raises(BadReply, match=r"answered a status request with 'error' \(bad_version: protocol version 2"):
        query_status(server.endpoint, timeout=5.0)
    assert main(["status", "--server", server.endpoint, "--timeout", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pscnn: error:") and "bad_version" in err[0], err


def test_status_answered_by_something_else_names_the_endpoint(fake, capsys):
    """Another service on the port: "pscnn: error: header is not valid msgpack (...)" named nothing."""
    from pscnn.cli import main

    class NotPscnn(Unchecked):
        def frames(self, seq: int) -> list:
            return [b"HTTP/1.0 200 OK\r\n\r\nhello"]
    server = fake(status=[NotPscnn("", {})])
    assert main(["status", "--server", server.endpoint, "--timeout", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"pscnn: error: {server.endpoint} answered a status request with what is not a pscnn message: "
        "header is not valid msgpack"), err


@pytest.mark.parametrize("progress, needle", [
    ({"version": 1, b"epoch": 0}, "not supported between instances of 'bytes' and 'str'"),
    ({"version": msgpack.ExtType(1, b"x")}, "Object of type bytes is not JSON serializable"),
    ({"loss": float("nan")}, "Out of range float values are not JSON compliant"),
])
def test_status_whose_progress_is_not_json_is_one_line(fake, capsys, progress, needle):
    """pscnn status prints the progress as JSON: a bytes key or an ext value was a traceback
    from json.dumps, and a NaN printed as NaN, which no JSON reader takes."""
    from pscnn.cli import main
    server = fake(status=[Unchecked(P.STATUS, {"progress": progress})])
    assert main(["status", "--server", server.endpoint, "--timeout", "5"]) == 1
    out, err = capsys.readouterr()
    err = err.strip().splitlines()
    assert not out and len(err) == 1, err
    assert err[0].startswith(f"pscnn: error: {server.endpoint} answered a status request with a progress that "
                             "is not JSON: ") and needle in err[0], err


# ================================================================ what a worker checks before connecting

@pytest.mark.parametrize("role", ["worker", "evaluator"])
def test_a_missing_mnist_folder_fails_at_once_without_a_server(role, tmp_path):
    """Nothing listens at the endpoint: the worker would retry for --give-up-after seconds;
    its own missing data is known before that, and said in one line."""
    argv = [sys.executable, "-m", "pscnn.cli", role, "--server", "tcp://127.0.0.1:9", "--give-up-after", "60",
            "--mnist-dir", str(tmp_path / "absent")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=50, env=child_env(), check=False)
    exit_error_line(proc, 1, str(tmp_path / "absent"), "does not exist")


@pytest.mark.parametrize("role", ["worker", "evaluator"])
def test_sigterm_while_mnist_downloads_is_a_clean_stop(role, tmp_path):
    """docker stop during the first run's download: in a container the role is PID 1, which
    ignores a signal it has no handler for, so one must be there already.  Here (not PID 1)
    the signal used to kill it outright, leaving the partial download in the cache."""
    mirror = socket.create_server(("127.0.0.1", 0))        # takes the request, never answers
    cache = tmp_path / "cache"
    env = {**child_env(), "PSCNN_CACHE_DIR": str(cache),
           "PSCNN_MNIST_MIRRORS": f"http://127.0.0.1:{mirror.getsockname()[1]}/"}
    env.pop("MNIST_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "pscnn.cli", role, "--server", "tcp://127.0.0.1:9"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        mirror.settimeout(60)
        conn, _ = mirror.accept()                           # the download is under way
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        mirror.close()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and not list(cache.glob(".*.part"))


def test_giving_up_on_malformed_replies_says_they_were_malformed(fake):
    """The server answered, badly: "no answer" alone would send the user looking for a dead server."""
    server = fake(work=[Unchecked(P.TASK, {"bogus": 1})])
    client = Client(server.endpoint, "trainer", give_up_after=1.5, heartbeat=False)
    try:
        client.connect()
        with pytest.raises(client_module.ServerUnreachable,
                           match=r"no usable answer from .* for 1.5 s; its last reply was malformed: task: unknown fields"):
            client.request(P.WORK)
    finally:
        client.close()


def test_a_server_of_another_protocol_version_is_one_line_at_once(fake):
    """Its replies never become ours: the client resent its hello for --give-up-after (600 s
    by default), then said "no usable answer", naming a header key of the newer version."""
    newer = P.PROTOCOL_VERSION + 1
    server = fake(hello=[Unchecked(P.ERROR, {"code": "bad_version", "message": "not supported"}, v=newer, flags=0)])
    client = Client(server.endpoint, "trainer", give_up_after=GIVE_UP_S, heartbeat=False)
    try:
        with pytest.raises(BadReply, match=rf"answered our hello in another protocol version: protocol version "
                                           rf"{newer} is not supported \(this side speaks {P.PROTOCOL_VERSION}\)"):
            client.connect()
    finally:
        client.close()
    assert len(server.of_type(P.HELLO)) == 1        # not resent


def test_a_server_replaced_by_another_protocol_version_mid_run_is_one_error_not_two(fake, connect):
    """The goodbye after that error is a courtesy: its own BadReply must not replace the first."""
    newer = Unchecked(P.ERROR, {"code": "bad_version", "message": "not supported"}, v=P.PROTOCOL_VERSION + 1)
    server = fake(work=[newer], bye=[newer])
    client = connect(server)
    with pytest.raises(BadReply, match="answered our work in another protocol version"):
        client.request(P.WORK)
    client.close(say_bye=True)
    assert len(server.of_type(P.BYE)) == 1


def test_a_long_backoff_does_not_make_the_give_up_late(fake, monkeypatch):
    """Each wait for a reply ends by the give-up moment: with resends 30 s apart, a client
    told to give up after 1 s waited the whole 30 s before it looked at the clock again."""
    import zmq
    server = fake(work=[SILENCE])
    client = Client(server.endpoint, "trainer", give_up_after=1.0, resend_s=30.0, reconnect_s=60.0,
                    max_backoff_s=60.0, heartbeat=False)
    waits_ms: list[int] = []
    poll = zmq.Socket.poll

    def recorded(sock, timeout=None, flags=zmq.POLLIN):
        if sock is client.sock:
            waits_ms.append(timeout)
        return poll(sock, timeout, flags)

    try:
        client.connect()
        monkeypatch.setattr(zmq.Socket, "poll", recorded)
        with pytest.raises(ServerUnreachable, match="no usable answer from .* for 1 s"):
            client.request(P.WORK)
    finally:
        client.close()
    assert waits_ms and max(waits_ms) <= 1001, waits_ms


def test_an_answer_that_arrived_while_the_caller_was_busy_past_a_deadline_is_read(fake, connect, monkeypatch):
    """submit, then a batch computed for longer than the give-up limit: the answer had long
    arrived, but result() checked its deadlines first and raised "no usable answer"."""
    server = fake(work=[task()])
    client = connect(server)
    pending = client.submit(P.WORK)
    assert client.sock.poll(10_000, zmq.POLLIN)           # the answer is here, not yet read
    later = time.monotonic() + 10 * GIVE_UP_S            # the caller was busy that long
    monkeypatch.setattr(client_module, "time", SimpleNamespace(monotonic=lambda: later, sleep=time.sleep))
    assert pending.result().type == P.TASK


CLOSED_CLIENT_THREADS = """
import json, os
import numpy as np
import zmq
from zmq.utils.garbage import gc
from pscnn import protocol as P
from worker.client import Client


def threads():
    # by id: libzmq names its threads (ZMQbg/IO/0, ZMQbg/Reaper) from inside them, later than it starts them
    return sorted(int(task) for task in os.listdir("/proc/self/task"))

gc.start()                              # pyzmq's collector of zero-copy frames, and its context's threads
before = threads()
peer_ctx = zmq.Context()
peer = peer_ctx.socket(zmq.ROUTER)      # a server that never answers
port = peer.bind_to_random_port("tcp://127.0.0.1")
client = Client(f"tcp://127.0.0.1:{port}", "trainer", heartbeat=False)
client.submit(P.WORK, {}, {"w": np.ones(1_000_000, np.float32)})   # 4 MB, sent zero-copy
during = threads()
client.close()
peer.close(linger=0)
peer_ctx.term()
print(json.dumps({"before": before, "during": during, "after": threads()}))
"""


def test_a_closed_client_leaves_no_zeromq_thread_to_hand_a_frame_back_as_the_process_exits():
    """A trainer that gave up on a server cut off by its cable exited -6, not 1 (CI, once):
    libzmq's I/O thread handed a zero-copy frame back to pyzmq's collector as the interpreter
    exited and took the collector's sockets down, and libzmq aborted ("Assertion failed:
    pfd.revents & POLLIN").  close() ends the client's own context (P.own_context): every
    frame is back, and no thread of it is left to run at the exit."""
    proc = subprocess.run([sys.executable, "-c", CLOSED_CLIENT_THREADS], capture_output=True, text=True,
                          timeout=60, env=child_env())
    assert proc.returncode == 0, proc.stderr
    threads = json.loads(proc.stdout)
    assert len(threads["during"]) > len(threads["before"]), threads      # the client's context ran threads
    assert threads["after"] == threads["before"], threads               # and none of them is left
