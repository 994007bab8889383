"""The server's work accounting as a state machine, driven by hypothesis (RuleBasedStateMachine).

A real ParameterServer, in this process, its socket swapped for a list its replies land in, and a
clock that moves only when the test says, is handed protocol messages from a few trainers that
join, ask for work, push (fresh, resent with the same sequence number, stale, under a lease that
expired, with a NaN loss), leave, die, are cut off and come back, rejoin under their own id or a
new one, while time passes past the lease and peer timeouts, in random order, in each mode
(async, sync, ssp with staleness 0 and 1).  After every step:

* no batch of any epoch went into the weights twice (the gradients carry their batch's number,
  read where the store applies them), and the epoch's applied batches are the work queue's;
* each batch of the current epoch is in exactly one place: applied, leased, pending, or waiting
  in a sync round; none is lost (its epoch would never end) or held twice;
* a resent push changes nothing and gets the first answer again;
* sync: a round whose live members have all arrived is closed, whoever died or left;
* ssp: a trainer gets a batch only within the staleness bound of the slowest trainer at work;
* the staleness histogram is what the applied pushes' base versions say.

At the end the trainers still alive finish the run honestly: every batch of every epoch must be
applied exactly once, within a bounded number of rounds (no hang on a dead worker).

Reproducible: derandomize=True and no example database (hypothesis's cache goes to a temporary
folder: tests/conftest.py).
"""
from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from pscnn import protocol as P
from pscnn.launcher import free_port
from pscnn.names import heartbeat_routing_id
from server.config import ServerConfig
from server.server import ParameterServer

pytestmark = pytest.mark.timeout(300)

# report_multiple_bugs=False: one bug shrunk, not each distinct failure it causes (minutes each)
STATEFUL = settings(deadline=None, derandomize=True, database=None, max_examples=40, stateful_step_count=30,
                    report_multiple_bugs=False, suppress_health_check=[HealthCheck.too_slow])
# A linear model: 7,850 weights, so that a step costs nothing next to the bookkeeping under test
TINY_MODEL = {"input_shape": [1, 28, 28], "layers": [{"type": "flatten"}, {"type": "dense", "name": "fc", "units": 10}]}
BATCHES_PER_EPOCH = 4
EPOCHS = 2
SLOTS = 3                               # trainer processes at most at once (each may be replaced)
LEASE_TIMEOUT = 30.0
PEER_TIMEOUT = 10.0
# The honest end: rounds of each live trainer's turn.  A round in which no batch was applied or handed out
# is followed by a lease timeout; IDLE_ROUNDS of those in a row, and the run hangs.
DRAIN_ROUNDS = 100
IDLE_ROUNDS = 3


class FakeTime:
    """The ``time`` module as the server's code sees it: ``monotonic`` moves only by ``advance``."""

    def __init__(self):
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name):
        return getattr(time, name)


FAKE_TIME = FakeTime()


class Outbox:
    """The server's socket: what it sends is kept, by routing id, for the test to read."""

    def __init__(self):
        self.sent: list[tuple[bytes, P.Message]] = []

    def send_multipart(self, frames, copy=True):
        self.sent.append((bytes(frames[0]), P.decode(frames[1:])))

    def take(self) -> list[tuple[bytes, P.Message]]:
        sent, self.sent = self.sent, []
        return sent

    def close(self, linger=None):
        pass


def marker(epoch: int, batch: int) -> int:
    """The number a push's gradient carries for its batch (0 is no push's)."""
    return 1 + epoch * BATCHES_PER_EPOCH + batch


class Trainer:
    """One trainer process as the server sees it: an id, its sequence numbers, and what it holds."""

    def __init__(self, wid: str):
        self.wid = wid
        self.rid = wid.encode()
        self.heartbeat_rid = heartbeat_routing_id(self.rid)     # the one the server takes its heartbeats from
        self.seq = 0
        self.alive = True               # False: the process died (it sends nothing more)
        self.cut = False                # cut off from the server: what either sends is lost, until it reconnects
        self.joined = False             # welcomed, and not told since that it is not in the run
        self.stopped = False            # told the run is over: it exits
        self.awaiting: tuple | None = None      # (seq, type, frames) of the request not answered yet
        self.last: tuple | None = None          # (seq, type, frames, reply) of the last request answered
        self.tasks: list[dict] = []     # leases it holds, as it believes (the server may have expired them)
        self.pushed: list[dict] = []    # tasks it pushed, or held when it rejoined: stale pushes send these


def ready(trainer: Trainer) -> bool:
    """Whether ``trainer`` may send a new request: its last one was answered.  (A client sends one
    request at a time: one still waiting for its answer is resent, not followed by another; see
    resend_push.)"""
    return trainer.awaiting is None


class WorkAccounting(RuleBasedStateMachine):
    mode = "async"
    staleness = 0                       # ssp's bound

    def __init__(self):
        super().__init__()
        self.folder = tempfile.TemporaryDirectory(prefix="pscnn-stateful-")
        self.srv = ParameterServer(ServerConfig(
            mode=self.mode, staleness=self.staleness, epochs=EPOCHS, batch_size=16, model=TINY_MODEL,
            train_limit=16 * BATCHES_PER_EPOCH, bind=f"tcp://127.0.0.1:{free_port()}", out=self.folder.name,
            checkpoint_every=0, lease_timeout=LEASE_TIMEOUT, peer_timeout=PEER_TIMEOUT,
            final_eval_timeout=1e9))    # the end waits for an evaluator: it never scores MNIST here
        self.srv.open()                 # the run folder's writer; the socket is replaced by an outbox
        self.srv.sock.close(linger=0)
        self.srv.ctx.term()
        self.srv.sock = self.outbox = Outbox()
        self.applied: list[int] = []    # markers, in the order the store applied them
        self.updates = 0                # optimizer steps the store took
        self.expected_staleness = Counter()
        self.ssp_breaches: list[str] = []
        self._spy_on_the_store()
        self._spy_on_leases()
        self.trainers = [Trainer(f"t{slot}-0") for slot in range(SLOTS)]
        self.spawned = [1] * SLOTS

    def teardown(self):
        try:
            self._finish_honestly()
        finally:
            self.srv.writer.close()
            self.srv.plots.join()
            self.folder.cleanup()

    # ------------------------------------------------------------------ what the server does
    def _spy_on_the_store(self) -> None:
        """Record each gradient the store applies, by the batch number it carries."""
        store, apply, apply_mean = self.srv.store, self.srv.store.apply, self.srv.store.apply_mean
        inside_mean = []

        def record(grads):
            bias = np.asarray(grads["fc.bias"])
            self.applied.append(int(round(float(bias[0]))))
            return int(round(float(bias[1])))       # its base version

        def spied_apply(grads, state=None, batches=1):
            if not inside_mean:
                base = record(grads)
                self.expected_staleness[store.version - base] += 1
            lr = apply(grads, state, batches)
            self.updates += 1
            return lr

        def spied_apply_mean(members):
            for grads, _, _ in members:
                record(grads)
                self.expected_staleness[0] += 1     # a sync round's pushes are all of its version
            inside_mean.append(True)
            try:
                return apply_mean(members)
            finally:
                inside_mean.pop()
        store.apply, store.apply_mean = spied_apply, spied_apply_mean

    def _spy_on_leases(self) -> None:
        """ssp: note every lease granted to a trainer more than ``staleness`` pushes ahead of the slowest at work."""
        work, lease = self.srv.work, self.srv.work.lease

        def spied_lease(worker, now, version=0):
            if self.mode == "ssp" and worker in self.srv.peers:
                at_work = [self.srv.peers[w].clock for w in {le.worker for le in work.leases.values()}
                           if w in self.srv.peers]
                clock = self.srv.peers[worker].clock
                if at_work and clock - min(at_work) > self.staleness:
                    self.ssp_breaches.append(f"{worker} at clock {clock} leased a batch, the slowest at work at "
                                             f"{min(at_work)}")
            return lease(worker, now, version)
        work.lease = spied_lease

    # ------------------------------------------------------------------ talking to it
    def send(self, trainer: Trainer, mtype: str, body: dict | None = None, arrays: dict | None = None,
             frames: list | None = None, rid: bytes | None = None) -> None:
        """Hand the server one message from ``trainer`` (``frames``: these, sent again), then read every reply."""
        if frames is None:
            trainer.seq += 1
            frames = P.encode(P.Message(mtype, trainer.wid, trainer.seq, body or {}, arrays or {}))
            trainer.awaiting = (trainer.seq, mtype, frames)
        self.srv._on_frames_guarded([zmq.Frame(rid or trainer.rid), *[zmq.Frame(bytes(f)) for f in frames]])
        self.deliver()

    def deliver(self) -> None:
        """Hand every reply the server sent to the trainer it is for."""
        by_rid = {t.rid: t for t in self.trainers}
        for rid, reply in self.outbox.take():
            trainer = by_rid.get(rid)
            if trainer is None or not trainer.alive or trainer.cut:     # replaced since, dead or cut off: lost
                continue
            if trainer.awaiting is None or reply.seq != trainer.awaiting[0]:
                continue                                    # a reply to a request given up on
            seq, mtype, frames = trainer.awaiting
            trainer.awaiting, trainer.last = None, (seq, mtype, frames, reply)
            self._take(trainer, reply)
        assert self.srv.rejected["internal_error"] == 0, "a message tripped a server bug (see the log)"

    def _take(self, trainer: Trainer, reply: P.Message) -> None:
        if reply.type == P.WELCOME:
            trainer.joined = True
        elif reply.type == P.TASK:
            trainer.tasks.append(dict(reply.body))
        elif reply.type == P.STOP:
            trainer.stopped = True
            trainer.alive = False       # it exits, without a goodbye
        elif reply.type == P.ERROR and reply.body["code"] == "unknown_worker":
            trainer.joined = False

    def push_batch(self, trainer: Trainer, task: dict, loss: float | None = 2.3) -> None:
        """Push ``task``'s gradient; ``loss`` None: one with a NaN or Inf loss, which the server refuses."""
        grads = {name: np.zeros(value.shape, value.dtype) for name, value in self.srv.store.params.items()}
        grads["fc.bias"][0] = marker(task["epoch"], task["batch"])
        grads["fc.bias"][1] = task["version"]
        body = {"epoch": task["epoch"], "batch": task["batch"], "lease": task["lease"],
                "base_version": task["version"], "loss": loss, "correct": 3, "count": 16,
                "timing": {"compute_s": 0.01, "comm_s": 0.0, "wait_s": 0.0}}
        self.send(trainer, P.PUSH, body, grads)

    def hello(self, trainer: Trainer) -> None:
        trainer.pushed += trainer.tasks         # a rejoin gives up its leases: the server requeues them
        trainer.tasks = []
        self.send(trainer, P.HELLO, {"role": "trainer", "name": trainer.wid, "pid": 1, "host": "test"})

    def pass_time(self, seconds: float) -> None:
        """``seconds`` go by; the trainers alive heartbeat meanwhile, then the server does its housekeeping."""
        FAKE_TIME.advance(seconds)
        for t in self.trainers:
            if t.alive and t.joined and not t.cut:
                self.send(t, P.HEARTBEAT, frames=P.encode(P.Message(P.HEARTBEAT, t.wid, 0)), rid=t.heartbeat_rid)
        self.srv._housekeeping(FAKE_TIME.now)
        self.deliver()

    # ------------------------------------------------------------------ rules
    # Each rule acts on one of the trainers it applies to (``pick``), and runs only when there is one:
    # drawn among every rule, most steps found nobody joined and did nothing.
    def at_work(self, pick: int, has=lambda t: True) -> Trainer | None:
        """The ``pick``-th (modulo) trainer alive and in the run for which ``has`` holds, or None."""
        them = [t for t in self.trainers if t.alive and t.joined and not t.cut and has(t)]
        return them[pick % len(them)] if them else None

    def idle_slots(self) -> list[int]:
        """The slots whose trainer is not at work: never joined, gone, dead or cut off."""
        return [slot for slot, t in enumerate(self.trainers) if not (t.alive and t.joined and not t.cut)]

    @precondition(lambda self: self.idle_slots())
    @rule(pick=st.integers(0, SLOTS - 1), new_process=st.booleans())
    def join(self, pick, new_process):
        """A trainer says hello: a new process (new id) in a slot not at work, or the one there again."""
        slot = self.idle_slots()[pick % len(self.idle_slots())]
        t = self.trainers[slot]
        if new_process or t.stopped or not t.alive:
            self.spawned[slot] += 1
            t = self.trainers[slot] = Trainer(f"t{slot}-{self.spawned[slot]}")
        t.cut = False
        self.hello(t)

    def may_ask(self, t: Trainer) -> bool:
        """A trainer asks for work with its last request answered and fewer batches than it may hold
        (one in sync, two with --overlap): asked with more, the server only refuses it."""
        return ready(t) and len(t.tasks) < (1 if self.mode == "sync" else ParameterServer.MAX_LEASES_PER_WORKER)

    @precondition(lambda self: self.at_work(0, self.may_ask))
    @rule(pick=st.integers(0, SLOTS - 1))
    def ask_for_work(self, pick):
        self.send(self.at_work(pick, self.may_ask), P.WORK)

    @precondition(lambda self: self.at_work(0, lambda t: ready(t) and (t.tasks or t.pushed)))
    @rule(pick=st.integers(0, SLOTS - 1), kind=st.sampled_from(["newest", "oldest", "stale", "nan"]),
          which=st.integers(0, 7))
    def push(self, pick, kind, which):
        """Push a batch it holds (its lease may have expired meanwhile), or again one pushed already
        (or held before a rejoin) as a new request; or a batch it holds with a NaN loss (refused: the
        batch goes back to the queue)."""
        t = self.at_work(pick, lambda t: ready(t) and (t.tasks or t.pushed))
        if kind == "stale" and t.pushed or not t.tasks:
            self.push_batch(t, t.pushed[which % len(t.pushed)])
            return
        task = t.tasks.pop(-1 if kind == "newest" else 0)
        t.pushed.append(task)
        self.push_batch(t, task, None if kind == "nan" else 2.3)

    @precondition(lambda self: any(t.alive and not t.cut and (t.last and t.last[1] == P.PUSH
                                                              or t.awaiting and t.awaiting[1] == P.PUSH)
                                   for t in self.trainers))
    @rule(pick=st.integers(0, SLOTS - 1))
    def resend_push(self, pick):
        """The client resends its last push with the same sequence number: answered, never applied again."""
        them = [t for t in self.trainers if t.alive and not t.cut and (t.awaiting and t.awaiting[1] == P.PUSH
                                                                       or t.awaiting is None and t.last
                                                                       and t.last[1] == P.PUSH)]
        if not them:            # its last push answered, and a request since still waiting
            return
        t = them[pick % len(them)]
        if t.awaiting is not None:
            seq, frames, first = t.awaiting[0], t.awaiting[2], None
        else:
            seq, frames, first = t.last[0], t.last[2], t.last[3]
        applied_before = len(self.applied)
        self.srv._on_frames_guarded([zmq.Frame(t.rid), *[zmq.Frame(bytes(f)) for f in frames]])
        again = [reply for rid, reply in self.outbox.take() if rid == t.rid]
        assert len(self.applied) == applied_before, "a resent push was applied again"
        if t.wid not in self.srv.peers:     # dropped meanwhile (declared dead while cut off): told to say hello
            assert [r.body.get("code") for r in again] == ["unknown_worker"], again
            t.joined = False
            return
        if first is None:
            assert again == [], f"a push still waiting was answered on its resend: {again}"
            return
        assert [(r.type, r.seq) for r in again] == [(first.type, seq)], (again, first)
        for field in ("ack", "epoch", "batch", "lease", "code"):
            assert again[0].body.get(field) == first.body.get(field), (field, again[0].body, first.body)

    @precondition(lambda self: self.at_work(0))
    @rule(pick=st.integers(0, SLOTS - 1), how=st.sampled_from(["goodbye", "death", "cut"]))
    def go_away(self, pick, how):
        """The trainer leaves with a goodbye, its process dies where it is (its leases and requests
        are the server's to settle), or its network is cut until it reconnects."""
        t = self.at_work(pick)
        if how == "goodbye":
            t.pushed += t.tasks
            t.tasks = []
            self.send(t, P.BYE, {"reason": "test"})
            t.joined = False
        elif how == "death":
            t.alive = False
        else:
            t.cut = True

    @precondition(lambda self: any(t.alive and t.cut for t in self.trainers))
    @rule(pick=st.integers(0, SLOTS - 1))
    def reconnect(self, pick):
        them = [t for t in self.trainers if t.alive and t.cut]
        self.back(them[pick % len(them)])

    def back(self, trainer: Trainer) -> None:
        """``trainer``'s network is back: it resends its request still unanswered, as its client does."""
        trainer.cut = False
        if trainer.awaiting is not None:
            self.send(trainer, trainer.awaiting[1], frames=trainer.awaiting[2])

    @rule(seconds=st.sampled_from([1.0, PEER_TIMEOUT + 1.0, LEASE_TIMEOUT + 1.0]))
    def time_passes(self, seconds):
        self.pass_time(seconds)

    # ------------------------------------------------------------------ invariants
    @invariant()
    def no_batch_is_applied_twice(self):
        repeated = [m for m, n in Counter(self.applied).items() if n > 1]
        assert not repeated, f"batches applied twice (markers): {repeated}; applied in order: {self.applied}"
        assert self.srv.store.version == self.updates, (self.srv.store.version, self.updates)
        work = self.srv.work
        if not work.done:
            this_epoch = {m - 1 - work.epoch * BATCHES_PER_EPOCH for m in self.applied
                          if (m - 1) // BATCHES_PER_EPOCH == work.epoch}
            assert this_epoch == work.applied, (this_epoch, work.applied)
            assert len(self.applied) == work.epoch * BATCHES_PER_EPOCH + len(work.applied)

    @invariant()
    def every_batch_is_in_exactly_one_place(self):
        work = self.srv.work
        if work.done:
            return
        waiting = [b["batch"] for b, _, _ in self.srv.sync_round.arrived.values()]
        places = [*work.applied, *work.leases, *work.pending, *waiting]
        assert sorted(places) == list(range(BATCHES_PER_EPOCH)), \
            (f"applied {sorted(work.applied)}, leased {sorted(work.leases)}, pending {list(work.pending)}, "
             f"in the round {waiting}")
        assert set(work.pending) == work._queued

    @invariant()
    def a_sync_round_with_every_member_in_is_closed(self):
        if self.mode != "sync":
            return
        members, arrived = self.srv.sync_round.members, self.srv.sync_round.arrived
        assert not (arrived and all(w in arrived for w in members)), (members, list(arrived))
        assert all(w in self.srv.peers for w in members), (members, list(self.srv.peers))

    @invariant()
    def ssp_leases_stay_within_the_bound(self):
        assert not self.ssp_breaches, self.ssp_breaches

    @invariant()
    def staleness_is_recorded_as_applied(self):
        assert +self.srv.staleness == +self.expected_staleness, (self.srv.staleness, self.expected_staleness)

    # ------------------------------------------------------------------ the honest end
    def _finish_honestly(self) -> None:
        """The trainers alive (one at least) work until the run is over; every batch applied once."""
        if not any(t.alive for t in self.trainers):
            self.join(0, True)
        idle = 0
        for _ in range(DRAIN_ROUNDS):
            if self.srv.over or idle > IDLE_ROUNDS:
                break
            applied_before, tasks_given = len(self.applied), 0
            for t in self.trainers:
                if not t.alive:
                    continue
                if t.cut:
                    self.back(t)
                if not t.joined and t.awaiting is None:
                    self.hello(t)
                if not t.joined or t.awaiting is not None:
                    continue
                if t.tasks:
                    task = t.tasks.pop(0)
                    t.pushed.append(task)
                    self.push_batch(t, task)
                else:
                    self.send(t, P.WORK)
                tasks_given += t.awaiting is None and t.last[3].type == P.TASK
            idle = 0 if len(self.applied) > applied_before or tasks_given else idle + 1
            if idle:
                self.pass_time(LEASE_TIMEOUT + 1.0)     # stuck on someone: leases expire, the dead are found out
        if self.srv.failure is not None:    # NaN pushes enough to call the run diverged: it ends there
            return
        assert self.srv.work.done, (f"the run hung at epoch {self.srv.work.epoch}: {self.srv.work.progress()}, "
                                    f"round {self.srv.sync_round.members} {list(self.srv.sync_round.arrived)}")
        assert sorted(self.applied) == [marker(e, b) for e in range(EPOCHS) for b in range(BATCHES_PER_EPOCH)]


# ssp with staleness 0 holds a trainer back at its first push ahead; a larger bound seldom binds in 30 steps
@pytest.mark.parametrize("mode, staleness", [("async", 0), ("sync", 0), ("ssp", 0), ("ssp", 1)])
def test_every_batch_is_applied_once_whatever_the_trainers_do(mode, staleness, monkeypatch, caplog):
    caplog.set_level(logging.ERROR, logger="pscnn.server")     # its warnings (leases expired, ...) by the thousand
    # The server's modules read the clock as time.monotonic(): each sees the fake one instead (not the
    # time module itself, which hypothesis reads to bound its shrinking).
    for name, module in list(sys.modules.items()):
        if (name == "server" or name.startswith("server.")) and getattr(module, "time", None) is time:
            monkeypatch.setattr(module, "time", FAKE_TIME)
    machine = type(f"WorkAccounting_{mode}_{staleness}", (WorkAccounting,), {"mode": mode, "staleness": staleness})
    run_state_machine_as_test(machine, settings=STATEFUL)
