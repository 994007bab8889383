"""The parameter server's peer table against many peers and hostile ones: what each peer, or a
peer making up ids, can make the server keep or log.  In-process servers (``in_process``), driven
message by message over loopback sockets."""
from __future__ import annotations

import json
import logging
import random
import re
import time
from collections import Counter
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np
import pytest

from cnn_core.checkpoint import load_checkpoint
from cnn_core.metrics import time_to_accuracy
from helpers import new_bests
from pscnn import protocol as P
from server.evaluations import EvaluationHistory
from test_server_robustness import in_process  # noqa: F401  (a fixture)
from test_server_robustness import (_climbing_accuracy, _evaluator, _push_all, _report, _trainer, grads_like,
                                   push_body)

pytestmark = pytest.mark.timeout(120)


def recount(srv) -> Counter:
    """The role counts, counted afresh from the peer table."""
    return Counter({role: 0 for role in P.ROLES}) + Counter(p.role for p in srv.peers.values())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_role_counts_are_the_peer_tables_after_any_joins_rejoins_byes_and_deaths(in_process, seed):
    """hello's "server full", status and "is there an evaluator" read per-role counts kept as peers
    come and go, instead of walking the table on every message (85 us with 1,000 peers): after any
    sequence of joins, rejoins under the same id as the other role, refusals of a full server,
    byes, deaths and returns, they are the table's own count, and status says so."""
    rng = random.Random(seed)
    server = in_process(max_workers=3, checkpoint_every=0, peer_timeout=10.0)
    srv = server.srv
    raws = [server.client() for _ in range(8)]
    joined = {}                 # raw -> the id it was last welcomed under
    for step in range(120):
        raw = rng.choice(raws)
        op = rng.choice(["hello", "hello", "new id", "bye", "death"])
        if op in ("hello", "new id"):   # a join, a rejoin as the same or the other role, a return, or a
            role = rng.choice(P.ROLES)  # hello under a new id from a connection: its peer's place, if any
            leaving = srv.peers.get(joined.get(raw))
            full = leaving is None or leaving.role != role
            full = full and sum(p.role == role for p in srv.peers.values()) >= 3
            if op == "new id":
                raw.wid = f"raw-{step}"
            reply = server.call(raw, P.HELLO, {"role": role, "name": raw.wid})
            assert reply.type == (P.ERROR if full else P.WELCOME), (step, reply.body)
            if not full:
                joined[raw] = raw.wid
        elif op == "bye" and raw.wid in srv.peers:
            assert server.call(raw, P.BYE, {"reason": "test"}).type == P.ACK
        elif op == "death" and raw.wid in srv.peers:
            srv.peers[raw.wid].last_seen -= 60.0
            srv._housekeeping(time.monotonic())
            assert raw.wid not in srv.peers
        assert srv.role_counts == recount(srv), (step, op)
        assert srv.peer_on_connection == {p.rid: p for p in srv.peers.values()}, (step, op)
        status = server.call(raw, P.STATUS).body["progress"]
        assert (status["trainers"], status["evaluators"]) == (recount(srv)["trainer"], recount(srv)["evaluator"])


def test_one_connection_saying_hello_under_new_ids_holds_one_place(in_process):
    """A connection saying hello under a new id each time took every --max-workers place (and
    kept them, its heartbeats under each id from that connection): honest workers were refused
    "server full".  Each such hello replaces the peer that joined from the connection, whose lease
    goes back at once; a rejoin under the same id, and a worker of a new connection, are as before."""
    server = in_process(max_workers=2)
    srv, mallory = server.srv, server.client()
    for i in range(4):
        mallory.wid = f"made-up-{i}"
        assert server.call(mallory, P.HELLO, {"role": "trainer", "name": mallory.wid}).type == P.WELCOME
        if i == 0:
            assert server.call(mallory, P.WORK).type == P.TASK and srv.work.held_by("made-up-0")
    assert sorted(srv.peers) == ["made-up-3"] and not srv.work.held_by("made-up-0")
    honest = server.join_trainer()
    assert srv.role_counts["trainer"] == 2
    mallory.wid = "made-up-2"
    refused = server.call(mallory, P.WORK)
    assert refused.type == P.ERROR and refused.body["code"] == "unknown_worker", refused.body
    assert "replaced (its connection said hello as made-up-3)" in refused.body["message"]
    assert server.call(honest, P.HELLO, {"role": "trainer", "name": honest.wid}).type == P.WELCOME    # a rejoin
    assert sorted(srv.peers) == sorted([honest.wid, "made-up-3"])
    assert (srv.drops["replaced"], srv.drops["rejoined"]) == (3, 1)      # summary.json's peers_dropped


def test_a_peer_whose_hello_has_no_name_goes_by_its_id(in_process):
    """A hello's name is optional: a peer without one goes by its id, in the peer table and in the
    reason its connection's next hello, under another id, gives for replacing it."""
    server = in_process()
    srv, raw = server.srv, server.client()
    first = raw.wid
    assert server.call(raw, P.HELLO, {"role": "trainer"}).type == P.WELCOME
    assert srv.peers[first].name == first
    raw.wid = "made-up-0"
    assert server.call(raw, P.HELLO, {"role": "trainer"}).type == P.WELCOME
    assert srv.peers["made-up-0"].name == "made-up-0"
    assert srv.dropped[first].why == "replaced (its connection said hello as made-up-0)"


def _counted(lines: list[str], logged: str, what: str) -> tuple[int, list[int]]:
    """(lines containing ``logged``, the N of each "N more <what>(s) in the last S s" summary)."""
    rx = re.compile(rf"^(\d+) more {what}s? in the last \d+\.\d s (?:was|were) not logged one by one")
    return sum(logged in line for line in lines), [int(m.group(1)) for m in map(rx.match, lines) if m]


def test_a_peer_joining_and_leaving_under_new_ids_does_not_flood_the_log(in_process, caplog):
    """Each hello from a new id was logged, and each bye, whatever their rate: a peer making up an id
    for each hello and leaving at once wrote two lines a message.  Beyond what any real run makes
    (every peer the server admits joining, or leaving, within one second, and at least 64) they
    are counted, and one line a second says how many."""
    server = in_process(max_workers=2)
    raw = server.client()
    srv, cycles = server.srv, 0
    with caplog.at_level(logging.INFO, logger="pscnn.server"):
        # until both kinds went past their limit within one second (bounded: a slow machine may not at once)
        while cycles < 200 or not (srv.log_joins.unlogged and srv.log_leaves.unlogged) and cycles < 20_000:
            raw.wid = f"made-up-{cycles}"
            assert server.call(raw, P.HELLO, {"role": "trainer", "name": raw.wid}).type == P.WELCOME
            assert server.call(raw, P.BYE, {"reason": "again"}).type == P.ACK
            cycles += 1
        for limited in srv.rate_limited_logs:
            limited.flush(time.monotonic(), final=True)
    lines = [r.getMessage() for r in caplog.records]
    for logged, what in (("trainer joined: made-up-", "join"), ("left (again)", "leave")):
        count, mores = _counted(lines, logged, what)
        assert mores and count + sum(mores) == cycles, (what, count, mores)
    records = (Path(srv.cfg.out) / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 2 * cycles           # metrics.jsonl records every join and leave


def test_a_run_starting_with_64_workers_logs_every_join(in_process, caplog):
    """The joins of a real run are never summarised: 64 trainers and the evaluator joining at once."""
    server = in_process()
    with caplog.at_level(logging.INFO, logger="pscnn.server"):
        for i in range(65):
            raw = server.client()
            role = "evaluator" if i == 64 else "trainer"
            assert server.call(raw, P.HELLO, {"role": role, "name": f"worker-{i}"}).type == P.WELCOME
    joins = [r.getMessage() for r in caplog.records if " joined: worker-" in r.getMessage()]
    assert len(joins) == 65 and joins[-1].startswith("evaluator joined: worker-64"), joins[-3:]


def test_an_evaluator_reporting_every_version_cannot_grow_the_history_past_its_bound(in_process, caplog):
    """The history kept one record per version reported: an evaluator reporting every version (or
    all old ones at once) grew it, in memory, in every checkpoint and in summary.json, by a record
    per update.  Beyond EVAL_RECORDS_AT_ONCE plus one a second served, a new version's report is
    refused with an error and a log line; a version recorded already is acknowledged as before,
    and the final evaluation is always the run's result."""
    server = in_process(epochs=2)
    _push_all(server, _trainer(server))
    srv = server.srv
    srv.EVAL_RECORDS_AT_ONCE, srv.EVAL_RECORDS_PER_S = 5, 0.0
    ev = _evaluator(server)
    with caplog.at_level(logging.INFO, logger="pscnn.server"):
        replies = [server.call(ev, P.EVAL_REPORT, {"version": v, "final": False, "metrics": {"test_accuracy": 0.5}})
                   for v in range(12)]
    assert [r.type for r in replies] == [P.ACK] * 5 + [P.ERROR] * 7, [r.body for r in replies]
    refused = replies[-1].body
    assert refused["code"] == "too_many_evaluations", refused
    assert refused["message"] == ("eval_report: version 11 not recorded: this server records 5 evaluations, then "
                                  "one for each second it has served (5 so far); evaluate less often (--every)")
    assert [e["version"] for e in srv.history.evaluations] == [0, 1, 2, 3, 4]
    # one line, then a count once the minute is over: an honest evaluator with a tiny --every is
    # refused most reports for the rest of the run (7 lines here, as many as reports, before)
    assert sum("rejected eval_report from" in r.getMessage() for r in caplog.records) == 1
    srv.log_too_many_evaluations.flush(time.monotonic() + 60)
    assert "6 more eval_reports refused as too many in the last" in caplog.records[-1].getMessage()
    assert srv.rejected["too_many_evaluations"] == 7
    _report(server, ev, 3, False, 0.5)                      # recorded already: acknowledged
    srv.EVAL_RECORDS_PER_S, srv.t_start = 1.0, srv.t_start - 2.5    # two more seconds served: two more
    assert [server.call(ev, P.EVAL_REPORT, {"version": v, "final": False, "metrics": {"test_accuracy": 0.5}}).type
            for v in (5, 6, 7)] == [P.ACK, P.ACK, P.ERROR]
    _report(server, ev, srv.store.version, True, 0.75)     # the final one, past the bound
    assert srv.history.evaluations[-1] == {**srv.history.evaluations[-1], "version": srv.store.version, "final": True}
    assert srv.final_eval["test_accuracy"] == 0.75 and server.call(ev, P.STATUS).type == P.STATUS


def test_a_long_stream_of_evaluations_is_kept_in_a_bounded_history(in_process, monkeypatch):
    """The history (in memory, in every checkpoint, in summary.json) kept every record: a week-long
    run's 60,000, megabytes of JSON rewritten at every checkpoint.  Past EvaluationHistory.CAP it is
    thinned: the bests (summary.json's time to accuracy is that of every record), the final one,
    the newest; metrics.jsonl keeps every record.  A version thinned out is not recorded again,
    by this server or by one resumed from its checkpoint (which would adopt the logged ones)."""
    monkeypatch.setattr(EvaluationHistory, "CAP", 40)
    monkeypatch.setattr(EvaluationHistory, "NEWEST", 5)
    server = in_process(epochs=16)                      # 160 updates
    _push_all(server, _trainer(server))
    srv = server.srv
    srv.EVAL_RECORDS_AT_ONCE = 1000                     # not the bound on how fast reports come
    ev = _evaluator(server)
    for version in range(srv.store.version):
        _report(server, ev, version, False, _climbing_accuracy(version))
    _report(server, ev, srv.store.version, True, 0.995)
    assert len(srv.history.evaluations) <= 40 and srv.history.evaluations[-1]["final"]
    assert [e["version"] for e in srv.history.evaluations[-5:]] == list(range(srv.store.version - 4, srv.store.version + 1))
    srv.writer.flush()
    logged = [json.loads(line) for line in Path(srv.writer.metrics_path).read_text().splitlines()]
    every = [{"seconds": r["train_seconds"], "version": r["version"], "test_accuracy": r["test_accuracy"]}
             for r in logged if r["kind"] == "eval"]
    assert [e["version"] for e in every] == list(range(srv.store.version + 1))
    srv._write_summary(time.monotonic())
    summary = json.loads((Path(srv.cfg.out) / "summary.json").read_text())
    assert len(summary["evaluations"]) == len(srv.history.evaluations)
    by_time = sorted(every, key=lambda e: e["seconds"])
    assert summary["time_to_accuracy"] == time_to_accuracy(by_time) and len(summary["time_to_accuracy"]) == 4
    kept = {e["version"] for e in srv.history.evaluations}
    assert all(e["version"] in kept for e in new_bests(every))

    thinned_out = next(v for v in range(srv.store.version) if v not in srv.history._evaluation_at)
    _report(server, ev, thinned_out, False, 0.5)        # acknowledged, not recorded again
    assert thinned_out not in srv.history._evaluation_at
    assert srv._checkpoint()
    srv.writer.close()
    kept = load_checkpoint(Path(srv.cfg.out) / "checkpoint.npz")[1]["extra"]["evaluations"]
    assert kept == srv.history.evaluations
    again = in_process(Path(srv.cfg.out), epochs=16, resume=True)
    assert again.srv.history.evaluations == kept                # none of metrics.jsonl's thinned-out ones adopted
    _report(again, _evaluator(again), thinned_out, False, 0.5)
    again.srv.writer.flush()
    evals = [r for r in map(json.loads, Path(again.srv.writer.metrics_path).read_text().splitlines())
             if r["kind"] == "eval"]
    assert len(evals) == len(every)


def test_a_hello_whose_name_no_client_could_have_is_refused(in_process):
    """A hello's name may be any printable line of 4,096 characters on the wire, and the server kept
    it in the peer table, in each of the 4,096 dropped peers it remembers and in every checkpoint,
    and wrote it into every line about the peer: it is held to the client's own rule now."""
    server = in_process()
    raw = server.client()
    reply = server.call(raw, P.HELLO, {"role": "trainer", "name": "n" * 4096})
    assert reply.type == P.ERROR and reply.body["code"] == "bad_name", reply.body
    assert reply.body["message"] == "hello: name must be at most 119 characters (the client id adds 9), got 4096"
    assert server.srv.peers == {} and server.srv.rejected["bad_name"] == 1
    assert server.call(raw, P.HELLO, {"role": "trainer", "name": "n" * 119}).type == P.WELCOME


def test_what_a_leaving_peer_says_is_kept_cut_to_one_short_line(in_process):
    """A bye's reason may be 4,096 characters on the wire; it was kept whole with each of the 4,096
    dropped peers remembered (up to 64 MB), and quoted whole in the log, metrics.jsonl and every
    refusal of the peer's late messages."""
    server = in_process()
    raw = server.client()
    assert server.call(raw, P.HELLO, {"role": "trainer", "name": "talker"}).type == P.WELCOME
    assert server.call(raw, P.BYE, {"reason": "r" * 4096}).type == P.ACK
    why = server.srv.dropped[raw.wid].why
    assert why == f"left ({'r' * 197}...)", why
    refusal = server.call(raw, P.WORK).body["message"]
    assert len(refusal) < 400 and refusal.endswith("...)): send hello to rejoin"), refusal


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_a_trainer_claiming_older_weights_than_it_was_sent_cannot_grow_the_staleness_histogram(in_process, mode):
    """Staleness is the version now minus the push's base version, and each value is a key of the
    histogram (in memory, in every checkpoint, in summary.json): a trainer claiming version 0 at
    every push made one more key per update, for as long as the run lasted, and summary.json's
    staleness mean and max its invention.  A base version older than the weights its task
    carried is refused; the truth, and a late push on the weights it was sent, still count."""
    server = in_process(mode=mode, epochs=20)
    raw = server.join_trainer()
    task = server.call(raw, P.WORK)
    weights = task.arrays
    for _ in range(30):
        reply = server.call(raw, P.PUSH, push_body(task), grads_like(weights))
        assert reply.type == P.TASK and reply.body["ack"]["applied"], reply.body
        task = reply
    srv = server.srv
    before = (srv.store.version, dict(srv.staleness))
    for _ in range(3):
        lie = server.call(raw, P.PUSH, push_body(task, base_version=0), grads_like(weights))
        assert lie.type == P.ERROR and lie.body["code"] == "bad_version", lie.body
        assert lie.body["message"] == (f"push: base version 0 is older than the weights of version "
                                       f"{task.body['version']} sent with lease {task.body['lease']}; not applied")
        task = server.call(raw, P.WORK)             # its batch went back to the queue: leased again
        assert task.type == P.TASK, task.body
    assert (srv.store.version, dict(srv.staleness)) == before == (30, {0: 30})
    # a second trainer's push makes the first one's weights one version old: that staleness counts
    other = server.join_trainer()
    other_task = server.call(other, P.WORK)
    assert server.call(other, P.PUSH, push_body(other_task), grads_like(weights)).body["ack"]["applied"]
    reply = server.call(raw, P.PUSH, push_body(task), grads_like(weights))
    assert reply.body["ack"] == {"applied": True, "staleness": 1}, reply.body
    assert dict(srv.staleness) == {0: 31, 1: 1}


def reply_cache_bytes(srv) -> int:
    """The bytes that the peers' cached replies keep alive: each NumPy buffer they reach (the weights
    frames, views included) counted once, however many replies share it, plus every bytes object."""
    seen, total, todo = set(), 0, [p.cached_reply for p in srv.peers.values()]
    while todo:
        item = todo.pop()
        if isinstance(item, np.ndarray):
            while isinstance(item.base, np.ndarray):
                item = item.base
            if id(item) not in seen:
                seen.add(id(item))
                total += item.nbytes
        elif isinstance(item, (bytes, bytearray)):
            total += len(item)
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
        elif is_dataclass(item):
            todo.extend(getattr(item, f.name) for f in fields(item))
    return total


def _resend(server, raw, frames: list) -> P.Message:
    """Send ``frames`` again (a client's resend of a request the server answered already)."""
    raw.send(frames)
    server.handle_one()
    got = raw.recv(0.5)
    assert got is not None, "the server did not answer the resend"
    return got[0]


def test_the_replies_kept_for_resends_hold_no_weights_but_the_servers_newest(in_process):
    """Each peer's last reply is kept, to be sent again if the peer resends its request.  A task
    carrying weights kept them: in async, each trainer's of another version, so 2,048 trainers kept
    2,048 copies of the model (3.5 GB).  Now a reply keeps its header; a resend gets the weights of
    its version while the server's newest is that one (byte-identical), else the same lease and ack
    with the newest weights, and the next task carries weights again (the server cannot know which
    of the two the trainer took).  Either way a resent push is applied once."""
    trainers = 12
    server = in_process(train_limit=30 * 64)            # 30 batches: two tasks for each trainer, and one more
    srv = server.srv
    raws = [server.join_trainer() for _ in range(trainers)]
    tasks = [server.call(raw, P.WORK) for raw in raws]
    pushes, next_tasks = [], []
    for raw, task in zip(raws, tasks):                  # each push makes a version: each next task carries its own
        pushes.append(raw.frames(P.PUSH, push_body(task), grads_like(task.arrays)))
        raw.send(pushes[-1])
        server.handle_one()
        reply = raw.recv(0.5)[0]
        assert reply.type == P.TASK and reply.body["ack"]["applied"] and reply.arrays, reply.body
        next_tasks.append(reply)
    assert srv.store.version == trainers
    assert reply_cache_bytes(srv) < srv.store.push_bytes, (reply_cache_bytes(srv), srv.store.push_bytes)
    # The newest trainer's reply carries the newest weights: sent again as it was
    newest, first = _resend(server, raws[-1], pushes[-1]), raw.recv(0.1)
    assert first is None and newest.body["version"] == trainers and newest.arrays
    # The first trainer's carried version 1's, no longer kept: the same lease and ack, the newest weights
    resent = _resend(server, raws[0], pushes[0])
    assert resent.type == P.TASK and resent.body["version"] == trainers, resent.body
    assert resent.body["ack"] == {"applied": True, "staleness": 0}, resent.body
    live = srv.store.snapshot()[1]
    assert all(np.array_equal(resent.arrays[k], live[k]) for k in live)
    assert srv.store.version == trainers                # the resent push was not applied again
    again = server.call(raws[0], P.PUSH, push_body(resent), grads_like(live))
    assert again.type == P.TASK and again.body["ack"] == {"applied": True, "staleness": 0}, again.body
    assert again.arrays, "the next task after a rebuilt resend must carry weights"
    # An evaluator's pull, resent once its weights are no longer the newest, is answered afresh
    evaluator = server.client()
    assert server.call(evaluator, P.HELLO, {"role": "evaluator", "name": evaluator.wid}).type == P.WELCOME
    pull = evaluator.frames(P.PULL, {"have_version": -1})
    evaluator.send(pull)
    server.handle_one()
    weights = evaluator.recv(0.5)[0]
    assert weights.type == P.WEIGHTS and weights.body["version"] == trainers + 1 and weights.arrays
    assert server.call(raws[1], P.PUSH, push_body(next_tasks[1]), grads_like(live)).body["ack"]["applied"]
    resent = _resend(server, evaluator, pull)
    assert resent.type == P.WEIGHTS and resent.body["version"] == trainers + 2 and resent.arrays, resent.body
    assert reply_cache_bytes(srv) < srv.store.push_bytes


def test_the_workers_whose_gradients_were_applied_are_kept_up_to_a_bound_and_all_counted(in_process, monkeypatch):
    """The server kept the id of every worker process whose gradient was ever applied: one more per
    worker restarted, for as long as the run lasted, in memory, in every checkpoint and in
    summary.json.  It keeps the CONTRIBUTORS_MEMORY that pushed last, counts them all (status, the
    checkpoint, a --resume), and a worker that keeps pushing is never the one forgotten."""
    monkeypatch.setattr("server.server.CONTRIBUTORS_MEMORY", 4)
    server = in_process(epochs=3)
    srv = server.srv
    steady = server.join_trainer()
    steady_task = server.call(steady, P.WORK)
    raw = server.client()
    for i in range(10):                 # a worker process restarted ten times, under a new id each time
        raw.wid = f"restarted-{i}"
        assert server.call(raw, P.HELLO, {"role": "trainer", "name": "restarted"}).type == P.WELCOME
        task = server.call(raw, P.WORK)
        assert server.call(raw, P.PUSH, push_body(task), grads_like(task.arrays)).body["ack"]["applied"]
        assert server.call(raw, P.BYE, {"reason": "restart"}).type == P.ACK
        steady_task = server.call(steady, P.PUSH, push_body(steady_task), grads_like(srv.store.snapshot()[1]))
        assert steady_task.type == P.TASK and steady_task.body["ack"]["applied"], steady_task.body
    assert list(srv.contributors) == ["restarted-7", "restarted-8", "restarted-9", steady.wid]
    assert srv.contributors.count == 11 and srv.workers_most == 11
    assert server.call(steady, P.STATUS).body["progress"]["contributors"] == 11
    assert srv._checkpoint()
    srv.writer.close()
    extra = load_checkpoint(Path(srv.cfg.out) / "checkpoint.npz")[1]["extra"]
    assert len(extra["contributors"]) == 4 and extra["contributors_count"] == 11
    resumed = in_process(Path(srv.cfg.out), epochs=3, resume=True).srv
    assert dict(resumed.contributors) == dict(srv.contributors) and resumed.contributors.count == 11
    assert resumed.workers_most == 11


def test_trainers_held_back_by_the_ssp_bound_cost_one_look_at_the_leases_per_push(in_process, monkeypatch):
    """After each ssp push the server retries every parked request, and each retry found the slowest
    clock at work by walking every lease: with 2,048 trainers, 2,047 of them held back by one slow
    one, each push cost 0.76 s.  The slowest clock is now looked up once per retry pass, and again
    only after a retry leased a batch; who goes and who waits is the same."""
    server = in_process(mode="ssp", staleness=1, train_limit=40 * 64)
    srv = server.srv
    slow = [server.join_trainer() for _ in range(2)]
    slow_tasks = [server.call(raw, P.WORK) for raw in slow]
    fast = [server.join_trainer() for _ in range(8)]
    for raw in fast:                    # two pushes each: then two ahead of the slow ones, held back
        task = server.call(raw, P.WORK)
        task = server.call(raw, P.PUSH, push_body(task), grads_like(task.arrays))
        assert task.type == P.TASK, task.body
        raw.send(raw.frames(P.PUSH, push_body(task), grads_like(srv.store.snapshot()[1])))
        server.handle_one()
    assert all(srv.peers[raw.wid].parked_since for raw in fast)
    looks = []
    floor = srv._ssp_floor
    monkeypatch.setattr(srv, "_ssp_floor", lambda: looks.append(1) or floor())
    weights = srv.store.snapshot()[1]
    reply = server.call(slow[0], P.PUSH, push_body(slow_tasks[0]), grads_like(weights))
    assert reply.type == P.TASK and reply.body["ack"]["applied"], reply.body
    assert all(srv.peers[raw.wid].parked_since for raw in fast)     # the other slow one still holds them back
    assert len(looks) <= 3, len(looks)
    reply = server.call(slow[1], P.PUSH, push_body(slow_tasks[1]), grads_like(weights))
    assert reply.type == P.TASK and reply.body["ack"]["applied"], reply.body
    for raw in fast:                    # caught up: each gets its task
        got = raw.recv(0.5)
        assert got is not None and got[0].type == P.TASK and got[0].body["ack"]["applied"], got
