"""The trainer and the evaluator against a server whose replies pass the protocol but make no sense.

Replies that decode fine but must not be used: weights with a NaN or Inf or a
negative BatchNorm variance, of the wrong dtype, name or shape; a negative or impossible ``held_s``; a task of
an epoch outside the run; a server that refuses every push; an evaluator told
"done" with nothing to score, or whose final report is refused; heartbeats
that say "done" while every pull says otherwise.  Each is refused as a bad
reply (one escaped log line, counted towards ``MAX_FAILURES_IN_A_ROW``), and a
server that keeps sending them ends the worker with one line and a non-zero
status.

The fake server and its helpers are those of ``test_client_replies``.  Every
script that would keep a broken client busy ends in silence, so the client
gives up after ``GIVE_UP_S`` and the test fails instead of hanging.
"""
from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cnn_core.model import build_model
from pscnn import protocol as P
from pscnn.launcher import child_env
import test_client_replies
from helpers import exit_error_line, popen_taking_ctrl_c
from test_client_replies import (ACK, GIVE_UP_S, LOOPS, MAX_FAILURES_IN_A_ROW, RUN, SILENCE, STOP, Unchecked, error,
                                 message, pscnn, run_loop, task, trainer_on, wait, welcome)
from worker import evaluator as evaluator_module
from worker.client import BadReply, Client, TooManyFailures
from worker.evaluator import FinalReportRefused, run_evaluator
from worker.trainer import Trainer, check_weights, leave_on_signal

pytestmark = pytest.mark.timeout(120)

fake = test_client_replies.fake            # the fixtures: fake(**replies) -> FakeServer; connect(server) -> Client
connect = test_client_replies.connect

PARAMS = {k: np.array(v) for k, v in build_model("light").params.items()}
LAST = list(PARAMS)[-1]                     # 'fc2.bias'


def task_with(arrays: dict, **over) -> tuple:
    """A task carrying weights (the fake encodes them; one dtype: one FlatArrays frame)."""
    return (*task(**over), arrays)


def pull_reply(done: bool, arrays: dict | None = None, version: int = 3) -> tuple:
    body = {"version": version, "epoch": 0, "done": done, "updates": version}
    return (P.WEIGHTS, body, arrays) if arrays else (P.WEIGHTS, body)


def with_value(name: str, value) -> dict:
    """The light model's parameters with ``name`` filled with ``value``."""
    return {k: np.full_like(v, value) if k == name else v for k, v in PARAMS.items()}


def warnings_with(caplog, *needles: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and all(n in r.getMessage() for n in needles)]


@pytest.fixture
def evaluator(mnist_dir):
    """evaluator(server, every=...) -> run_evaluator in this process, not niced."""

    def start(server, every: float = 0.05, test_limit: int = 100) -> int:
        return run_evaluator(server.endpoint, every=every, test_limit=test_limit, mnist_dir=mnist_dir,
                             give_up_after=GIVE_UP_S, nice=0)
    return start


# ================================================================ 1: a server that refuses every push

@LOOPS
@pytest.mark.parametrize("code", ["bad_push", "non_finite"])
def test_a_server_that_refuses_every_push_ends_the_trainer(fake, connect, overlapped, code):
    """A valid task answers each work request, an error each push: the tasks must not start
    the count again, or the trainer asks and pushes for ever ("1 of 5" each time).  Our
    pushes are finite: "non_finite" is no excuse."""
    server = fake(work=[task()] * (4 * MAX_FAILURES_IN_A_ROW) + [SILENCE], push=[error(code, "refused")])
    trainer = trainer_on(connect(server))
    with pytest.raises(TooManyFailures, match=f"{MAX_FAILURES_IN_A_ROW} failed requests in a row.*{code}: refused"):
        run_loop(trainer, overlapped)
    assert MAX_FAILURES_IN_A_ROW <= len(server.of_type(P.PUSH)) <= MAX_FAILURES_IN_A_ROW + 1


@LOOPS
@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_a_trainer_whose_nan_pushes_are_refused_goes_on(fake, connect, monkeypatch, overlapped, bad):
    """A diverging run: the server refuses each NaN push and decides itself when the run has
    diverged (server.NONFINITE_LIMIT, more than MAX_FAILURES_IN_A_ROW); until then the
    trainer goes on with the next batch."""
    refused = [error("non_finite", "push: the loss is NaN or Inf; gradient rejected")] * (3 * MAX_FAILURES_IN_A_ROW)
    server = fake(work=[task()], push=[*refused, STOP])
    trainer = trainer_on(connect(server))
    compute = trainer.compute

    def diverged(body):
        result, arrays = compute(body)
        if bad == "loss":
            return {**result, "loss": float("nan")}, arrays
        return result, type(arrays)(arrays.specs, np.full_like(arrays.flat, np.inf))
    monkeypatch.setattr(trainer, "compute", diverged)
    assert run_loop(trainer, overlapped) == 0
    assert len(server.of_type(P.PUSH)) == 3 * MAX_FAILURES_IN_A_ROW + 1


@LOOPS
def test_a_push_the_server_accepts_clears_the_refused_ones(fake, connect, overlapped):
    """Four refused pushes, one acknowledged, four refused again: never five in a row."""
    refused = [error("bad_push", "refused")] * (MAX_FAILURES_IN_A_ROW - 1)
    accepted = (P.TASK, {**task()[1], "ack": {"applied": True, "staleness": 0}})
    server = fake(work=[task()], push=[*refused, accepted, *refused, STOP])
    assert run_loop(trainer_on(connect(server)), overlapped) == 0
    assert len(server.of_type(P.PUSH)) == 2 * (MAX_FAILURES_IN_A_ROW - 1) + 2


def test_a_worker_whose_pushes_are_all_refused_exits_with_one_line(fake):
    server = fake(work=[task()] * (4 * MAX_FAILURES_IN_A_ROW) + [SILENCE], push=[error("bad_push", "refused")])
    exit_error_line(pscnn("worker", server.endpoint), 1, "failed requests in a row", "bad_push: refused")


# ================================================================ 2: weights that must not be trained on

BAD_VALUES = {"nan": (with_value(LAST, np.nan), f"NaN or Inf in '{LAST}'"),
              "inf": (with_value("conv1.weight", -np.inf), "NaN or Inf in 'conv1.weight'"),
              "int64": ({k: np.ones(v.shape, np.int64) for k, v in PARAMS.items()},
                        "'conv1.weight' of dtype int64, but the model's is float32"),
              "float64": ({LAST: PARAMS[LAST].astype(np.float64)}, f"'{LAST}' of dtype float64")}


@LOOPS
@pytest.mark.parametrize("case", BAD_VALUES)
def test_a_task_with_unusable_weight_values_is_refused(fake, connect, caplog, case, overlapped):
    arrays, needle = BAD_VALUES[case]
    server = fake(work=[task_with(arrays), STOP], push=[STOP])
    trainer = trainer_on(connect(server))
    before = trainer.model.params.flat.copy()
    with caplog.at_level(logging.WARNING, logger="pscnn.client"):
        assert run_loop(trainer, overlapped) == 0
    assert not server.of_type(P.PUSH)                   # not trained on
    np.testing.assert_array_equal(trainer.model.params.flat, before)        # not loaded either
    (line,) = warnings_with(caplog, "the server sent a task", needle)
    assert line.endswith(" (1 failure in a row; giving up at 5)") and "\n" not in line


@LOOPS
def test_the_weights_a_task_carries_are_loaded_before_its_batch_is_computed(fake, connect, overlapped):
    sent = with_value(LAST, 0.25)
    server = fake(work=[task_with(sent), STOP], push=[STOP])
    trainer = trainer_on(connect(server))
    assert run_loop(trainer, overlapped) == 0
    for name, value in sent.items():
        np.testing.assert_array_equal(trainer.model.params[name], value)


def test_an_overlapped_push_names_the_version_of_the_weights_its_batch_was_computed_on(fake, connect):
    """Holding one task, an overlapped trainer asks for a second, whose reply brings newer weights,
    and computes the first batch on those.  Its push named the first task's version, so the
    server recorded the gradient as staler than it was."""
    server = fake(work=[task_with(PARAMS, version=0, batch=0, lease=1),
                        task_with(with_value(LAST, 0.25), version=5, batch=1, lease=2)], push=[STOP])
    assert run_loop(trainer_on(connect(server)), True) == 0
    (push,) = server.of_type(P.PUSH)
    assert (push.body["batch"], push.body["base_version"]) == (0, 5)


def test_check_weights_finds_the_array_with_a_nan_in_one_flat_buffer():
    model = build_model("light")
    flat = P.decode(P.encode(P.Message(P.TASK, body=task()[1], arrays=with_value("fc1.weight", 1.0))))
    assert type(flat.arrays).__name__ == "FlatArrays"
    check_weights(model, flat.arrays)                   # finite: fine
    one_nan = with_value("fc1.weight", 1.0)
    one_nan["fc1.weight"][3, 4] = np.nan
    decoded = P.decode(P.encode(P.Message(P.TASK, body=task()[1], arrays=one_nan))).arrays
    with pytest.raises(BadReply, match=r"^the server sent weights with NaN or Inf in 'fc1\.weight'$"):
        check_weights(model, decoded)


def test_an_evaluator_does_not_score_nan_weights(fake, evaluator):
    server = fake(pull=[pull_reply(True, with_value(LAST, np.nan))] * MAX_FAILURES_IN_A_ROW + [SILENCE],
                  eval_report=[ACK])
    with pytest.raises(TooManyFailures, match=f"failed requests in a row.*NaN or Inf in '{LAST}'"):
        evaluator(server)
    assert not server.of_type(P.EVAL_REPORT)
    assert len(server.of_type(P.PULL)) == MAX_FAILURES_IN_A_ROW


def test_an_evaluator_scores_finite_weights_that_overflow_without_numpys_warnings(fake, evaluator, recwarn):
    """Finite weights are scored, and may overflow on the way: the final report says so (a NaN loss),
    and NumPy's RuntimeWarnings (two lines each on stderr) are not printed, as in pscnn train."""
    huge = {k: np.full_like(v, 3e38) if k.endswith("weight") else v for k, v in PARAMS.items()}
    server = fake(pull=[pull_reply(True, huge)], eval_report=[ACK])
    assert evaluator(server) == 0
    [report] = server.of_type(P.EVAL_REPORT)
    assert report.body["final"] and not np.isfinite(report.body["metrics"]["test_loss"])
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in recwarn]


# A model with state: a BatchNorm's running mean and variance travel with the weights.
BATCH_NORM = {"input_shape": [1, 28, 28], "layers": [
    {"type": "conv2d", "out_channels": 4, "kernel": 3}, {"type": "batchnorm2d", "name": "bn"}, {"type": "relu"},
    {"type": "flatten"}, {"type": "dense", "units": 10}]}


def negative_variance() -> tuple[dict, dict]:
    """(BATCH_NORM's spec as built, its weights with a running variance of -1: finite, but no layer runs with it)."""
    model = build_model(BATCH_NORM)
    return model.spec, {**model.params, **model.state, "bn.running_var": np.full_like(model.state["bn.running_var"], -1)}


@LOOPS
def test_a_task_whose_batchnorm_variance_is_negative_is_refused(fake, connect, caplog, overlapped):
    """The server refuses such a state in a push; a trainer that loaded it trained on with it and
    pushed it back, each push refused, until it gave up on the server."""
    spec, arrays = negative_variance()
    server = fake(hello=[welcome(model=spec)], work=[task_with(arrays), STOP], push=[STOP])
    trainer = Trainer(connect(server), compute_ms=0.0)
    trainer.setup(message(welcome(model=spec)))
    with caplog.at_level(logging.WARNING, logger="pscnn.client"):
        assert run_loop(trainer, overlapped) == 0
    assert not server.of_type(P.PUSH)
    assert (trainer.model.state["bn.running_var"] == 1).all()           # not loaded
    (line,) = warnings_with(caplog, "the server sent a task whose state 'bn.running_var' holds a negative variance")
    assert "\n" not in line


def test_an_evaluator_does_not_score_weights_whose_batchnorm_variance_is_negative(fake, evaluator):
    """Scored, every output was NaN: a loss of NaN and the accuracy of always guessing 0, reported as
    the run's final evaluation."""
    spec, arrays = negative_variance()
    server = fake(hello=[welcome(model=spec)], eval_report=[ACK],
                  pull=[pull_reply(True, arrays)] * MAX_FAILURES_IN_A_ROW + [SILENCE])
    with pytest.raises(TooManyFailures, match="the server sent weights whose state 'bn.running_var' holds a "
                                              r"negative variance \(-1\)"):
        evaluator(server)
    assert not server.of_type(P.EVAL_REPORT)


# ================================================================ 3: held_s

HELD = {"negative task": (lambda: task(held_s=-5.0), "held_s -5.0 < 0"),
        "negative wait": (lambda: (P.WAIT, {"retry_s": 0.0, "held_s": -5.0, "reason": "test"}), "held_s -5.0 < 0"),
        "longer than the request": (lambda: task(held_s=1e9), "held_s 1e+09 is longer than our request took")}


@LOOPS
@pytest.mark.parametrize("case", HELD)
def test_a_push_reply_with_an_impossible_held_s_is_refused(fake, connect, caplog, case, overlapped):
    """held_s becomes the next push's wait_s: negative, the client's own encode refused it and
    the worker died blaming itself; huge, it went to the server as a measurement."""
    reply, needle = HELD[case]
    server = fake(work=[task()], push=[reply(), STOP])
    with caplog.at_level(logging.WARNING, logger="pscnn.client"):
        assert run_loop(trainer_on(connect(server)), overlapped) == 0
    assert warnings_with(caplog, "from the server", needle), caplog.text
    for push in server.of_type(P.PUSH):
        assert 0.0 <= push.body["timing"].get("wait_s", 0.0) < 10.0, push.body


def every_round_trip_takes(client, seconds: float, monkeypatch) -> None:
    """The client's round trips, as the trainer reads them (``last_rtt_s``), last ``seconds`` each."""
    roundtrip = client._roundtrip

    def timed(*args, **kwargs):
        reply = roundtrip(*args, **kwargs)
        client.last_rtt_s = seconds
        return reply
    monkeypatch.setattr(client, "_roundtrip", timed)


def test_a_push_reports_the_time_held_as_waiting_and_the_rest_of_the_round_trip_as_communication(
        fake, connect, monkeypatch):
    server = fake(work=[task()], push=[task(held_s=0.2), STOP])
    client = connect(server)
    every_round_trip_takes(client, 0.5, monkeypatch)
    assert trainer_on(client).loop() == 0
    first, second = (push.body["timing"] for push in server.of_type(P.PUSH))
    assert (first["comm_s"], first["wait_s"]) == (0.5, 0.0)             # the work request's round trip
    assert second["wait_s"] == 0.2 and second["comm_s"] == pytest.approx(0.3)


@LOOPS
@pytest.mark.parametrize("after", ["a work request", "a push"])
def test_the_time_slept_on_a_wait_and_the_work_requests_after_it_count_in_the_next_push(
        fake, connect, monkeypatch, overlapped, after):
    """An async epoch draining: the server answers "wait", the trainer sleeps and asks again.  That
    time went unreported (the next push counted the last push's round trip alone), so a worker
    idle at every epoch's end reported no waiting at all."""
    # Two waits for the pushes: overlapped, it sleeps only with no push in flight (the second's).
    replies = {"work": [wait(0.3), task()], "push": [STOP]} if after == "a work request" else \
              {"work": [task()], "push": [wait(0.3), wait(0.3), STOP]}
    server = fake(**replies)
    client = connect(server)
    every_round_trip_takes(client, 0.1, monkeypatch)
    assert run_loop(trainer_on(client), overlapped) == 0
    timing = server.of_type(P.PUSH)[-1].body["timing"]
    assert timing["wait_s"] == pytest.approx(0.3)
    if not overlapped:          # its pushes' time is the time it waited on them, not their round trip
        assert timing["comm_s"] == pytest.approx(0.2)      # two round trips: work, work (or push, work)


@LOOPS
def test_a_push_names_the_task_it_answers(fake, connect, overlapped):
    server = fake(work=[task_with(PARAMS, version=7, epoch=0, batch=3, lease=42)], push=[STOP])
    assert run_loop(trainer_on(connect(server)), overlapped) == 0
    (push,) = server.of_type(P.PUSH)
    assert {k: push.body[k] for k in ("epoch", "batch", "lease", "base_version", "count")} == \
        {"epoch": 0, "batch": 3, "lease": 42, "base_version": 7, "count": 64}


@LOOPS
def test_a_task_without_weights_of_another_version_than_the_trainers_is_refused(fake, connect, caplog, overlapped):
    """A server sends a trainer weights whenever it holds another version; a task without them names
    the version the trainer holds.  One naming another was taken for "the weights you hold are this
    version": the batch was computed on version 3 and pushed as computed on version 5."""
    no_weights = task(version=5, batch=1)
    server = fake(work=[task_with(PARAMS, version=3), no_weights, STOP], push=[no_weights, STOP])
    with caplog.at_level(logging.WARNING, logger="pscnn.client"):
        assert run_loop(trainer_on(connect(server)), overlapped) == 0
    assert [(m.body["batch"], m.body["base_version"]) for m in server.of_type(P.PUSH)] == [(0, 3)]
    assert warnings_with(caplog, "bad task from the server: version 5 comes with no weights, but we hold version 3")


@LOOPS
def test_a_trainer_that_rejoins_takes_the_new_servers_run(fake, connect, overlapped):
    server = fake(hello=[welcome(), welcome(run={**RUN, "num_samples": 320})],
                  work=[error("unknown_worker", "who?"), STOP])
    trainer = trainer_on(connect(server))
    assert run_loop(trainer, overlapped) == 0
    assert len(server.of_type(P.HELLO)) == 2 and trainer.run["num_samples"] == 320


EXPERIMENTS = Path(__file__).resolve().parents[1] / "docs" / "experiments.md"


def experiments_grep(log: str) -> re.Pattern:
    """What docs/experiments.md's ``grep -E 'PATTERN' LOG`` looks for in ``log``."""
    found = re.search(rf"^grep -E '([^']+)' {re.escape(log)}$", EXPERIMENTS.read_text(), re.M)
    assert found, f"docs/experiments.md greps {log} no more"
    return re.compile(found.group(1))


def experiments_quotes(start: str) -> list[re.Pattern]:
    """docs/experiments.md's quotes of a log line that begins with ``start``, each ``...`` in one
    standing for any text (the quote may wrap over lines)."""
    quotes = re.findall(rf"`({re.escape(start)}[^`]*)`", EXPERIMENTS.read_text())
    return [re.compile(".+".join(map(re.escape, " ".join(q.split()).split("..."))) + "$") for q in quotes]


def test_a_rejoin_is_an_info_line_and_a_second_in_a_row_a_warning(fake, connect, caplog):
    """A rejoin after a server's restart (--resume) is routine: besides the client's warning that
    the server did not know us, it was a second warning counting it as "1 of 5 failures in a
    row", in every worker's and the evaluator's log.  A second in a row (a server that forgets
    us every time) is still a warning, counted."""
    forgot = error("unknown_worker", "who?")
    server = fake(hello=[welcome(incarnation=f"server-{n}") for n in range(4)],
                  work=[forgot, task_with(PARAMS), forgot, STOP], push=[forgot])     # a rejoin's first task: weights
    trainer = trainer_on(connect(server))
    with caplog.at_level(logging.INFO, logger="pscnn.client"):
        assert run_loop(trainer, False) == 0
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "restarted" in r.getMessage()]
    assert [level for level, _ in lines] == [logging.INFO, logging.INFO, logging.WARNING], lines
    assert "in a row" not in lines[0][1] and lines[2][1].endswith("(2 failures in a row; giving up at 5)"), lines


@pytest.mark.parametrize("restarted", [True, False])
def test_a_rejoin_is_one_line_saying_why_and_what_next(fake, connect, caplog, restarted):
    """After a server's restart each client logged a warning ("the server does not know us:
    unknown worker id ...; joining again") and then an INFO line ("rejoined the server (it had
    restarted, or dropped us)"), for a routine event.  A new incarnation in the new welcome says
    it restarted: one INFO line.  The same server forgetting us (it had dropped us: declared
    dead, say) is one warning, with the server's reason."""
    dropped = "worker id 'w' was dropped from the run 12.3 s ago (declared dead (silent for 10.0 s))"
    server = fake(hello=[welcome(incarnation="first"), welcome(incarnation="second" if restarted else "first")],
                  work=[error("unknown_worker", dropped), STOP])
    trainer = trainer_on(connect(server))
    with caplog.at_level(logging.INFO):
        assert run_loop(trainer, False) == 0
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "pscnn.client"]
    if restarted:
        assert lines == [(logging.INFO, "the server restarted; joined it again; asking for new work")]
        # experiment 6 finds this line in a worker's log with its grep (it looked for "rejoined", the
        # word of the two lines this one replaced)
        assert experiments_grep("runs/e6-worker-a.log").search(lines[0][1]), lines
    else:
        assert lines == [(logging.WARNING, f"the server did not know us ({dropped}); joined it again; "
                                           "asking for new work (1 failure in a row; giving up at 5)")]


def test_a_trainer_that_pushed_one_batch_says_1_step_when_told_to_stop(fake, connect, caplog):
    """Its last line read "after 1 steps (64 samples)": the counts' nouns agree with them.  And
    "server says training finished after 22 steps" read as the run's count, in a run of 47
    updates: the count is said to be this trainer's."""
    server = fake(work=[task()], push=[STOP])
    trainer = trainer_on(connect(server))
    with caplog.at_level(logging.INFO, logger="pscnn.worker"):
        assert run_loop(trainer, False) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "pscnn.worker"] == [
        "server says training finished; this trainer pushed 1 batch (64 samples); exiting"]


def test_the_experiments_quote_a_trainers_last_line_as_it_reads(fake, connect, caplog):
    """docs/experiments.md sent readers to "training finished after ... steps" in the workers' logs,
    the words of a line since reworded."""
    server = fake(work=[task()], push=[task(), STOP])
    trainer = trainer_on(connect(server))
    with caplog.at_level(logging.INFO, logger="pscnn.worker"):
        assert run_loop(trainer, False) == 0
    last = [r.getMessage() for r in caplog.records if r.name == "pscnn.worker"][-1]
    quotes = experiments_quotes("server says ")
    assert quotes and all(quote.match(last) for quote in quotes), (last, [q.pattern for q in quotes])


@LOOPS
def test_a_refused_push_is_not_counted_in_the_trainers_last_line(fake, connect, caplog, overlapped):
    """With --overlap a push was counted when sent: one the server refused (a lease that moved
    on, a push lost to a restart) made the last line say "after 2 steps (128 samples)", more
    than the server applied; the plain loop counted it as 1 step."""
    server = fake(work=[task()], push=[error("stale_lease", "the lease moved on"), STOP])
    trainer = trainer_on(connect(server))
    with caplog.at_level(logging.INFO, logger="pscnn.worker"):
        assert run_loop(trainer, overlapped) == 0
    assert len(server.of_type(P.PUSH)) == 2
    assert [r.getMessage() for r in caplog.records if r.name == "pscnn.worker"] == [
        "server says training finished; this trainer pushed 1 batch (64 samples); exiting"]


@pytest.mark.parametrize("joined", [False, True])
def test_a_worker_stopped_by_a_signal_says_goodbye_only_to_a_server_it_joined(fake, caplog, joined):
    """Stopped while its server had not answered yet (started first, or never there), it said
    "saying goodbye to the server", and sent none."""
    server = fake(hello=[welcome() if joined else SILENCE])
    client = Client(server.endpoint, "trainer", give_up_after=GIVE_UP_S, heartbeat=False)
    if joined:
        client.connect()
    with caplog.at_level(logging.INFO, logger="pscnn.worker"):
        assert leave_on_signal(client, SystemExit(0)) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "pscnn.worker"] == [
        "stopped by a signal; " + ("saying goodbye to the server" if joined
                                   else "the server had not answered our hello yet")]
    assert len(server.of_type(P.BYE)) == joined


def test_a_worker_given_only_negative_held_s_exits_with_one_line(fake):
    server = fake(work=[task(held_s=-5.0)] * MAX_FAILURES_IN_A_ROW + [SILENCE])
    exit_error_line(pscnn("worker", server.endpoint), 1, "failed requests in a row", "held_s -5.0 < 0")


# ================================================================ 4: weights of names or shapes the model lacks

WRONG = {"name": ({"nope.weight": np.zeros(3, np.float32)}, "an array 'nope.weight': the model has no parameter"),
         "shape": ({"fc2.bias": np.zeros(3, np.float32)}, "'fc2.bias' of shape [3], but the model's is [10]"),
         # the rest would stay as they were: half a model trained on, or scored as the server's
         "missing": ({k: v for k, v in PARAMS.items() if k != LAST}, f"without 1 of the model's arrays (the first: "
                                                                    f"'{LAST}')")}


@LOOPS
@pytest.mark.parametrize("case", WRONG)
def test_a_task_with_weights_the_model_lacks_is_a_bad_reply(fake, connect, caplog, case, overlapped):
    arrays, needle = WRONG[case]
    server = fake(work=[task_with(arrays), STOP], push=[STOP])
    with caplog.at_level(logging.WARNING, logger="pscnn.client"):
        assert run_loop(trainer_on(connect(server)), overlapped) == 0
    assert not server.of_type(P.PUSH)
    assert warnings_with(caplog, "the server sent a task with", needle), caplog.text


def test_a_worker_sent_only_weights_the_model_lacks_exits_with_one_line(fake):
    server = fake(work=[task_with(WRONG["name"][0])] * MAX_FAILURES_IN_A_ROW + [SILENCE])
    exit_error_line(pscnn("worker", server.endpoint), 1, "failed requests in a row", "the server sent a task",
                    "'nope.weight'")


@pytest.mark.parametrize("case", WRONG)
def test_an_evaluator_sent_weights_the_model_lacks_counts_bad_replies(fake, evaluator, case):
    arrays, needle = WRONG[case]
    server = fake(pull=[pull_reply(True, arrays)] * MAX_FAILURES_IN_A_ROW + [SILENCE])
    with pytest.raises(TooManyFailures, match="failed requests in a row") as exc:
        evaluator(server)
    assert "the server sent weights with" in str(exc.value) and needle in str(exc.value)
    assert len(server.of_type(P.PULL)) == MAX_FAILURES_IN_A_ROW


def test_an_evaluator_refuses_weights_older_than_those_it_holds(fake, evaluator):
    """Versions never go back at one server (a restarted one makes the evaluator rejoin first):
    scoring version 2 after 5 would report an old model as the run's final one."""
    server = fake(pull=[pull_reply(False, PARAMS, version=5)] + [pull_reply(True, PARAMS, version=2)]
                  * MAX_FAILURES_IN_A_ROW + [SILENCE], eval_report=[ACK])
    with pytest.raises(TooManyFailures, match="weights of version 2, older than the version 5 we hold"):
        evaluator(server)
    assert [r.body["version"] for r in server.of_type(P.EVAL_REPORT)] == [5]


# ================================================================ 5: the final evaluation

def test_done_with_no_weights_to_score_is_not_a_final_evaluation(fake, evaluator):
    server = fake(pull=[pull_reply(True, version=0)] * MAX_FAILURES_IN_A_ROW + [SILENCE])
    with pytest.raises(TooManyFailures, match="training is over but sent no weights to score"):
        evaluator(server)
    assert not server.of_type(P.EVAL_REPORT)
    assert not [m for m in server.of_type(P.BYE) if m.body.get("reason") == "final evaluation sent"]



def test_done_at_a_newer_version_with_no_weights_is_not_a_final_evaluation_of_the_one_held(fake, evaluator):
    """A pull answered without weights says the ones held are the newest.  Told training was over
    at version 7 without them, the evaluator reported the version it held, 3, as the run's final
    evaluation, and exited 0."""
    server = fake(pull=[pull_reply(False, PARAMS, version=3)] + [pull_reply(True, version=7)] * MAX_FAILURES_IN_A_ROW
                  + [SILENCE], eval_report=[ACK])
    with pytest.raises(TooManyFailures, match=r"the server says version 7 is the newest, but sent no weights of it "
                                              r"\(we hold version 3\)"):
        evaluator(server)
    assert [(m.body["version"], m.body["final"]) for m in server.of_type(P.EVAL_REPORT)] == [(3, False)]


def test_an_evaluator_asks_for_newer_weights_only_and_scores_each_version_once(fake, evaluator):
    server = fake(pull=[pull_reply(False, PARAMS), pull_reply(False), pull_reply(False), pull_reply(True)],
                  eval_report=[ACK])
    assert evaluator(server) == 0
    assert [m.body["have_version"] for m in server.of_type(P.PULL)] == [-1, 3, 3, 3]
    assert [(r.body["version"], r.body["final"]) for r in server.of_type(P.EVAL_REPORT)] == [(3, False), (3, True)]
    (bye,) = server.of_type(P.BYE)
    assert bye.body["reason"] == "final evaluation sent"


def test_final_weights_scored_as_a_periodic_version_are_reported_as_final_without_scoring_again(
        fake, evaluator, monkeypatch, caplog):
    """A diverged run ends on the last version it applied, which the evaluator scored periodically:
    told the run is over, it scored the same weights on the same test set again (a second pass
    over the test set, for the same figures).  Now it reports the metrics it has as final."""
    scorings = []
    real = evaluator_module.evaluate
    monkeypatch.setattr(evaluator_module, "evaluate", lambda *a, **k: scorings.append(1) or real(*a, **k))
    server = fake(pull=[pull_reply(False, PARAMS), pull_reply(False), pull_reply(True)], eval_report=[ACK])
    with caplog.at_level(logging.INFO, logger="pscnn.evaluator"):
        assert evaluator(server) == 0
    assert len(scorings) == 1
    periodic, final = server.of_type(P.EVAL_REPORT)
    assert (periodic.body["version"], periodic.body["final"], final.body["version"], final.body["final"]) == \
        (3, False, 3, True)
    assert final.body["metrics"] == periodic.body["metrics"]
    # the last line says the evaluator exits (it ended "... (scored already) final", and then nothing)
    assert re.search(r"version 3: test accuracy [0-9.]+, loss [0-9.]+ \(scored already\), final; exiting$",
                     caplog.records[-1].getMessage()), caplog.text


def test_an_evaluator_that_rejoins_scores_the_new_servers_versions(fake, evaluator):
    """A restarted server counts its versions again: version 2 there is no older than 5 here."""
    server = fake(pull=[pull_reply(False, PARAMS, version=5), error("unknown_worker", "who?"),
                        pull_reply(True, PARAMS, version=2)], eval_report=[ACK])
    assert evaluator(server) == 0
    assert [m.body["have_version"] for m in server.of_type(P.PULL)] == [-1, 5, -1]
    assert [(r.body["version"], r.body["final"]) for r in server.of_type(P.EVAL_REPORT)] == [(5, False), (2, True)]


def test_weights_of_a_negative_version_are_not_scored(fake, evaluator):
    server = fake(pull=[pull_reply(True, PARAMS, version=-1)] * MAX_FAILURES_IN_A_ROW + [SILENCE])
    with pytest.raises(TooManyFailures, match="weights of version -1, below 0"):
        evaluator(server)
    assert not server.of_type(P.EVAL_REPORT)


def test_an_evaluator_refuses_a_model_that_does_not_take_mnist_before_it_pulls(fake, evaluator):
    spec = {"input_shape": [3, 32, 32], "layers": [{"type": "flatten"}, {"type": "dense", "units": 10}]}
    server = fake(hello=[welcome(model=spec)])
    with pytest.raises(BadReply, match=r"takes input \[3, 32, 32\], but the images are \[1, 28, 28\]"):
        evaluator(server)
    assert not server.of_type(P.PULL)


def test_an_evaluator_scores_the_runs_test_limit_unless_given_its_own(fake, evaluator):
    for test_limit, count in ((0, 50), (100, 100)):
        server = fake(hello=[welcome(run={**RUN, "test_limit": 50})], pull=[pull_reply(True, PARAMS)],
                      eval_report=[ACK])
        assert evaluator(server, test_limit=test_limit) == 0
        (report,) = server.of_type(P.EVAL_REPORT)
        assert report.body["metrics"]["count"] == count


def test_an_evaluator_that_rejoins_scores_the_new_servers_test_limit(fake, evaluator, caplog):
    """A server restarted with --resume may have another --test-limit: the evaluator kept scoring
    the first server's test set, and the run's final figures came from it.  It scores the new one,
    and says so once: its join line ("scoring 50 test images") was the last word on the count."""
    server = fake(hello=[welcome(run={**RUN, "test_limit": 50}), welcome(run={**RUN, "test_limit": 80}),
                         welcome(run={**RUN, "test_limit": 80})],
                  pull=[pull_reply(False, PARAMS, version=5), error("unknown_worker", "who?"),
                        pull_reply(False, PARAMS, version=2), error("unknown_worker", "who?"),
                        pull_reply(True, PARAMS, version=1)], eval_report=[ACK])
    with caplog.at_level(logging.INFO, logger="pscnn.evaluator"):
        assert evaluator(server, test_limit=0) == 0
    assert [r.body["metrics"]["count"] for r in server.of_type(P.EVAL_REPORT)] == [50, 80, 80]
    said = [r.getMessage() for r in caplog.records if "test images" in r.getMessage()]
    assert said[1:] == ["the server's run scores 80 test images (50 before); scoring those from now on"], said


def test_an_evaluator_says_nothing_of_a_rejoined_servers_test_limit_that_scores_the_same_images(
        fake, evaluator, caplog):
    """--test-limit 0 and 10000 are the same whole test set: the evaluator said "the server's run
    scores 10000 test images (10000 before); scoring those from now on", a change that was none."""
    server = fake(hello=[welcome(run={**RUN, "test_limit": 0}), welcome(run={**RUN, "test_limit": 10_000})],
                  pull=[pull_reply(False, PARAMS, version=5), error("unknown_worker", "who?"),
                        pull_reply(True, PARAMS, version=2)], eval_report=[ACK])
    with caplog.at_level(logging.INFO, logger="pscnn.evaluator"):
        assert evaluator(server, test_limit=0) == 0
    assert [r.body["metrics"]["count"] for r in server.of_type(P.EVAL_REPORT)] == [10_000, 10_000]
    assert "from now on" not in caplog.text, caplog.text


def test_an_evaluator_does_not_score_weights_the_server_has_scored_already(fake, evaluator):
    """After `pscnn server --resume`, the evaluator's first pull is of the checkpoint's version,
    which it usually scored before the restart: it scored it again, seconds of CPU for a report
    the server does not record.  The pull's answer says so now; the final evaluation still comes."""
    server = fake(pull=[(P.WEIGHTS, {**pull_reply(False)[1], "version": 5, "scored": True}, PARAMS),
                        pull_reply(False, version=5), pull_reply(True, version=5)], eval_report=[ACK])
    assert evaluator(server) == 0
    assert [(r.body["version"], r.body["final"]) for r in server.of_type(P.EVAL_REPORT)] == [(5, True)]


def test_an_evaluator_sends_no_final_report_the_run_has_already(fake, evaluator, caplog):
    """An evaluator joining a run that is over and scored (a finished run resumed, or one whose
    server scored the weights itself, or wrote the results without a score) says goodbye without
    scoring them, and its last line says it exits (it ended "...; not scoring it")."""
    server = fake(pull=[(P.WEIGHTS, {**pull_reply(True)[1], "scored": True}, PARAMS)], eval_report=[ACK])
    with caplog.at_level(logging.INFO, logger="pscnn.evaluator"):
        assert evaluator(server) == 0
    # "the run has its final evaluation already" alone was untrue once the server wrote the results
    # without one (it could not score the weights)
    assert caplog.records[-1].getMessage() == ("version 3: the run has its final evaluation already, or its "
                                               "results are written; exiting without scoring it")
    assert not server.of_type(P.EVAL_REPORT)
    (bye,) = server.of_type(P.BYE)
    assert bye.body["reason"] == "final evaluation recorded already"


def test_a_late_final_report_the_server_did_not_record_is_not_logged_as_the_runs_result(fake, evaluator, caplog):
    """Pulled before the server scored the final weights itself, scored, and sent late: the server
    acknowledges it without recording it.  The evaluator's log said "final" beside its figure (not
    summary.json's) and its goodbye "final evaluation sent"; now both say it was not recorded, why."""
    why = "the run has its final evaluation already (test accuracy 0.9000, from the server)"
    server = fake(pull=[pull_reply(True, PARAMS)], eval_report=[(P.ACK, {"not_recorded": why})])
    with caplog.at_level(logging.INFO, logger="pscnn.evaluator"):
        assert evaluator(server) == 0
    assert re.search(r"version 3: test accuracy [0-9.]+, loss [0-9.]+ \([0-9.]+ s\), final, not recorded: "
                     + re.escape(why) + "; exiting", caplog.text), caplog.text
    (bye,) = server.of_type(P.BYE)
    assert bye.body["reason"] == "final evaluation not recorded"


def test_a_periodic_report_the_server_did_not_record_is_said_so(fake, evaluator, caplog):
    why = "the run's results are written already"
    server = fake(pull=[pull_reply(False, PARAMS), pull_reply(True)],
                  eval_report=[(P.ACK, {"not_recorded": why}), (P.ACK, {"not_recorded": why})])
    with caplog.at_level(logging.INFO, logger="pscnn.evaluator"):
        assert evaluator(server) == 0
    assert re.search(r"version 3: test accuracy [0-9.]+, loss [0-9.]+ \([0-9.]+ s\), not recorded: " + re.escape(why),
                     caplog.text), caplog.text


def test_the_give_up_after_help_says_how_a_held_request_is_bounded(capsys):
    """The help said only "after this many seconds without reaching the server": a worker held
    by a server that answers (a sync round) waits ten times that, and one at the start barrier
    as long as the barrier holds."""
    from pscnn.cli import parse_args
    with pytest.raises(SystemExit):
        parse_args(["worker", "--help"], {})
    text = " ".join(capsys.readouterr().out.split())
    assert ("a request it holds back while it answers (a sync round), after ten times that, but not while its "
            "start barrier (--wait-for-workers) holds, which its --start-timeout bounds (default: 600)") in text


def test_the_evaluators_help_says_what_test_limit_0_scores(capsys):
    """--test-limit 0 scores the run's test set (the server's --test-limit), not all 10,000 images
    as the help said."""
    from pscnn.cli import parse_args
    with pytest.raises(SystemExit):
        parse_args(["evaluator", "--help"], {})
    text = " ".join(capsys.readouterr().out.split())
    assert "(0: as many as the server's --test-limit, whose 0 is all)" in text


def test_a_refused_final_report_ends_the_evaluator_with_an_error(fake, evaluator):
    server = fake(pull=[pull_reply(True, PARAMS)], eval_report=[error("bad_report", "refused")])
    with pytest.raises(FinalReportRefused,
                       match=r"final evaluation \(version 3\) was not recorded.*bad_report: refused"):
        evaluator(server)
    (report,) = server.of_type(P.EVAL_REPORT)
    assert report.body["final"]


def test_a_final_report_answered_with_no_ack_ends_the_evaluator_with_an_error(fake, evaluator):
    server = fake(pull=[pull_reply(True, PARAMS)], eval_report=[STOP])
    with pytest.raises(FinalReportRefused, match="answered our eval_report with 'stop', not an ack"):
        evaluator(server)


def test_a_refused_periodic_report_is_a_warning(fake, evaluator, caplog):
    server = fake(pull=[pull_reply(False, PARAMS), pull_reply(True)], eval_report=[error("busy", "later"), ACK])
    with caplog.at_level(logging.WARNING):
        assert evaluator(server) == 0
    assert [r.body["final"] for r in server.of_type(P.EVAL_REPORT)] == [False, True]
    assert warnings_with(caplog, "server rejected our report", "busy: later")


def test_refused_periodic_reports_are_one_warning_and_a_count_until_the_reason_changes(fake, evaluator, caplog):
    """A server refusing every periodic report (too_many_evaluations for a tiny --every on a tiny
    --test-limit) made a warning every period for the whole run.  Now the first one is a warning,
    the rest of the minute a count, and a changed reason is a warning again at once."""
    pulls = [pull_reply(False, PARAMS, version=v) for v in range(1, 8)] + [pull_reply(True, version=7)]
    reports = [error("too_many_evaluations", "less often")] * 4 + [error("busy", "later")] * 3 + [ACK]
    server = fake(pull=pulls, eval_report=reports)
    with caplog.at_level(logging.WARNING):
        assert evaluator(server) == 0
    assert len(server.of_type(P.EVAL_REPORT)) == 8
    refusals = [re.sub(r"[0-9.]+ s\b", "S s", line) for line in warnings_with(caplog, "")
                if "refused" in line or "rejected" in line]
    assert refusals == ["server rejected our report: the server refused our eval_report request: "
                        "too_many_evaluations: less often",
                        "3 more refused reports in the last S s were not logged one by one",
                        "server rejected our report: the server refused our eval_report request: busy: later",
                        "2 more refused reports in the last S s were not logged one by one"], refusals


def test_the_cli_evaluator_whose_final_report_is_refused_exits_1_with_one_line(fake, mnist_dir):
    server = fake(pull=[pull_reply(True, PARAMS)], eval_report=[error("bad_report", "refused")])
    proc = pscnn("evaluator", server.endpoint, "--mnist-dir", mnist_dir, "--test-limit", "100")
    exit_error_line(proc, 1, "final evaluation (version 3) was not recorded", "bad_report: refused")


def test_the_evaluators_flags_reach_it(monkeypatch):
    from pscnn.cli import parse_args
    seen = {}
    monkeypatch.setattr(evaluator_module, "run_evaluator", lambda endpoint, **kw: seen.update(kw, endpoint=endpoint) or 0)
    args = parse_args(["evaluator", "--server", "tcp://127.0.0.1:1", "--every", "3.5", "--test-limit", "7",
                       "--give-up-after", "9", "--name", "ev", "--keys", "/keys/evaluator"], {})
    assert evaluator_module.run_evaluator_from_args(args) == 0
    assert seen == {"endpoint": "tcp://127.0.0.1:1", "every": 3.5, "test_limit": 7, "device": "cpu",
                    "mnist_dir": None, "name": "ev", "give_up_after": 9.0, "keys": "/keys/evaluator"}


# ================================================================ 6: heartbeats say done, pulls say not

def test_an_evaluator_told_done_by_heartbeats_only_still_pulls_every_t_seconds(fake, evaluator):
    """The pull's answer is authoritative: a done flag from the heartbeats that every pull
    contradicts must not make the evaluator pull in a tight loop."""
    every, span = 0.5, 3.0
    server = fake(hello=[welcome(heartbeat_s=0.2)], pull=[pull_reply(False, PARAMS), pull_reply(False)],
                  eval_report=[ACK])
    server.heartbeat_reply = lambda: P.Message(P.HEARTBEAT, body={"done": True})
    flip = threading.Timer(span, lambda: server.replies.__setitem__(P.PULL, [pull_reply(True)]))
    flip.start()
    try:
        t0 = time.monotonic()
        assert evaluator(server, every=every) == 0
        took = time.monotonic() - t0
    finally:
        flip.cancel()
        flip.join()
    pulls = len(server.of_type(P.PULL))
    assert took >= span - 0.1
    assert pulls <= span / every + 4, f"{pulls} pulls in {took:.1f} s"
    assert server.of_type(P.EVAL_REPORT)[-1].body["final"]


def test_an_evaluator_pulls_every_t_seconds_its_scoring_included(fake, evaluator, monkeypatch):
    """--every is the period from pull to pull: the evaluator waited T after each scoring, so an
    evaluation every 10 s that took 6 s came every 16 s.  Here scoring takes 0.3 s of a 0.5 s
    period: the wait after it is what is left of the period, not the whole of it."""
    every, scoring_s = 0.5, 0.3
    evaluate = evaluator_module.evaluate

    def slow_evaluate(*args, **kwargs):
        time.sleep(scoring_s)
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(evaluator_module, "evaluate", slow_evaluate)
    waits, event_wait, here = [], threading.Event.wait, threading.current_thread()

    def recorded(self, timeout=None):       # the evaluator's waits: in this thread (not the heartbeats'),
        if threading.current_thread() is here and timeout is not None:     # not a thread's start
            waits.append(timeout)
        return event_wait(self, timeout)
    monkeypatch.setattr(threading.Event, "wait", recorded)
    server = fake(pull=[pull_reply(False, PARAMS), pull_reply(True)], eval_report=[ACK])
    assert evaluator(server, every=every) == 0
    assert [(r.body["version"], r.body["final"]) for r in server.of_type(P.EVAL_REPORT)] == [(3, False), (3, True)]
    assert len(waits) == 1 and 0 <= waits[0] <= every - scoring_s, waits


def test_an_evaluator_whose_heartbeats_say_the_server_forgot_it_rejoins_without_waiting_its_period(fake, evaluator):
    """A server restarted (--resume) while the evaluator waits out a long --every: its heartbeats
    were refused ("unknown worker") and it slept on, to its next pull, past the run's final
    evaluation (the server waits --final-eval-timeout, 120 s, then scores the weights itself).
    Here the period is 10^6 s: only the heartbeats' answer can bring it back in time."""
    server = fake(hello=[welcome(heartbeat_s=0.2)], pull=[pull_reply(False, PARAMS, version=5),
                                                          error("unknown_worker", "who?"), pull_reply(True, PARAMS)],
                  eval_report=[ACK])
    server.heartbeat_reply = lambda: P.Message(P.ERROR, body={"code": "unknown_worker", "message": "who?"})
    exits = []
    scoring = threading.Thread(target=lambda: exits.append(evaluator(server, every=1e6)), daemon=True)
    scoring.start()
    scoring.join(60)                    # a bound for the old evaluator, asleep for 10^6 s
    assert exits == [0], "the evaluator slept through its heartbeats' unknown_worker"
    assert [m.body["have_version"] for m in server.of_type(P.PULL)] == [-1, 5, -1]
    assert [(r.body["version"], r.body["final"]) for r in server.of_type(P.EVAL_REPORT)] == [(5, False), (3, True)]


# ================================================================ 7: a task's epoch

@LOOPS
@pytest.mark.parametrize("epoch", [RUN["epochs"], 2**63 + 5])
def test_a_task_of_an_epoch_past_the_run_is_refused(fake, connect, caplog, epoch, overlapped):
    server = fake(work=[task(epoch=epoch), STOP], push=[STOP])
    with caplog.at_level(logging.WARNING, logger="pscnn.client"):
        assert run_loop(trainer_on(connect(server)), overlapped) == 0
    assert not server.of_type(P.PUSH)
    assert warnings_with(caplog, "bad task", f"epoch {epoch} is not one of the run's {RUN['epochs']} epochs")


# ================================================================ 7: stopped by a signal

STOPS = {"SIGTERM": (signal.SIGTERM, 0, "terminated"), "SIGHUP": (signal.SIGHUP, 0, "terminated"),
         "Ctrl-C": (signal.SIGINT, 130, "interrupted")}


@pytest.mark.parametrize("role", ["worker", "evaluator"])
@pytest.mark.parametrize("how", STOPS)
def test_a_worker_stopped_by_a_signal_says_goodbye(fake, mnist_dir, role, how):
    """docker stop, a closed terminal, Ctrl-C: the server must hear a bye, so the worker's lease
    goes back to the queue at once (SIGHUP killed it silently; Ctrl-C left without a word)."""
    sig, status, reason = STOPS[how]
    server = fake(work=[wait(0.2)], pull=[pull_reply(False, version=0)])
    proc = popen_taking_ctrl_c([sys.executable, "-m", "pscnn.cli", role, "--server", server.endpoint,
                                "--give-up-after", str(GIVE_UP_S), "--mnist-dir", mnist_dir],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        asked = P.WORK if role == "worker" else P.PULL
        deadline = time.monotonic() + 60
        while not server.of_type(asked):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=5)
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == status, err[-2000:]
    assert "Traceback" not in err and "stopped by" in err, err[-2000:]
    (bye,) = server.of_type(P.BYE)
    assert bye.body["reason"] == reason


# ================================================================ 8: a server of another protocol version

@pytest.mark.parametrize("role", ["worker", "evaluator"])
def test_a_server_of_another_protocol_version_ends_the_worker_at_once_in_one_line(fake, mnist_file_names, role):
    """Its answers were logged as malformed and the hello resent until --give-up-after (600 s by
    default), then "no usable answer" (no error line): a server that will never speak our version."""
    refusal = Unchecked(P.ERROR, {"code": "bad_version", "message": "protocol version "
                                  f"{P.PROTOCOL_VERSION} is not supported"}, v=P.PROTOCOL_VERSION + 1)
    server = fake(hello=[refusal])
    line = exit_error_line(pscnn(role, server.endpoint), 1,
                           server.endpoint, f"protocol version {P.PROTOCOL_VERSION + 1} is not supported",
                           "same pscnn release")
    assert "malformed" not in line
    assert len(server.of_type(P.HELLO)) == 1             # not resent
