"""``pscnn server --resume`` against hand-edited checkpoints and changed settings;
the warning for starting over on an unfinished run; the worker count after a resume.

One real checkpoint is made once per module: a server subprocess (loopback only)
in sync mode, two trainers speaking the protocol by hand (raw DEALER sockets)
for three rounds, an evaluator's report, then SIGTERM, which checkpoints.  Each
test copies that run folder and edits the copy's checkpoint (its ``__meta__``
JSON or its arrays) with the checkpoint code itself.

``pscnn server`` is run in-process through ``pscnn.cli.main`` with
``ParameterServer.serve`` stubbed out: the flags, the config and the resume
are the real ones, a refused checkpoint is one ``pscnn: error:`` line and exit
1 (an exception escaping ``main`` would be a traceback), and an accepted one
returns 0 at once instead of serving.  Two checks run the real command in a
subprocess too.  No timed assertions: every wait is bounded and only fails
the test when it runs out.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zmq

from cnn_core.checkpoint import load_checkpoint, load_model_checkpoint, save_checkpoint, save_model_checkpoint
from cnn_core.errors import CheckpointError
from cnn_core.metrics import time_to_accuracy
from cnn_core.model import build_model
from cnn_core.optim import build_optimizer
from cnn_core.runlog import RunWriter
from pscnn import protocol as P
from pscnn.cli import main, parse_args
from pscnn.launcher import LocalCluster, free_port, print_report, query_status
from server.evaluations import EvaluationHistory
from server.server import ParameterServer
from helpers import counted_model_builds, error_line, new_bests
from test_server_robustness import (InProcess, Raw, _climbing_accuracy, _evaluator, _push_all, _report, _trainer,
                                   grads_like, push_body, start_serving)

pytestmark = pytest.mark.timeout(300)

# 10 batches of 64 an epoch, 2 epochs, sync rounds of two batches.
FLAGS = ["--model", "light", "--train-limit", "640", "--batch-size", "64", "--epochs", "2", "--mode", "sync",
         "--optimizer", "sgd", "--seed", "0", "--checkpoint-every", "0", "--test-limit", "256",
         "--log-level", "INFO"]
ROUNDS_BEFORE_STOP = 3
# A start barrier for two trainers: else the server may take w0's first push before w1's request
# (two connections, no order between them on a busy machine) and close a round of w0 alone.
BOTH_IN_EVERY_ROUND = ("--wait-for-workers", "2")
REPLY_TIMEOUT = 10.0


# ---------------------------------------------------------------- clients speaking the protocol by hand

class HandTrainer(Raw):
    """A trainer of raw frames (test_server_robustness.Raw): the weights and the task it holds,
    its pushes so far, and whether it was told to stop."""

    def __init__(self, endpoint: str, name: str):
        super().__init__(endpoint, f"{name}-{uuid.uuid4().hex[:8]}")
        self.weights: dict | None = None
        self.task: P.Message | None = None
        self.pushes = 0
        self.stopped = False


def train(endpoint: str, names: list[str], pushes_each: int | None) -> list[HandTrainer]:
    """Trainers ``names`` take tasks and push constant gradients: ``pushes_each`` times each
    (then they hold their next task unpushed), or until told to stop (None)."""
    clients = [HandTrainer(endpoint, n) for n in names]
    for c in clients:
        c.hello("trainer")
    for c in clients:                  # both ask before either pushes: each sync round has both
        c.send(c.frames(P.WORK))
    deadline = time.monotonic() + 120
    while not all(c.stopped or (pushes_each is not None and c.pushes >= pushes_each and c.task) for c in clients):
        assert time.monotonic() < deadline, "the trainers did not get through their work"
        for c in clients:
            if c.stopped or not c.sock.poll(20, zmq.POLLIN):
                continue
            reply = P.decode(c.sock.recv_multipart())
            assert reply.type in (P.TASK, P.WAIT, P.STOP), (reply.type, reply.body)
            if reply.type == P.STOP:
                c.stopped = True
            elif reply.type == P.WAIT:
                time.sleep(reply.body.get("retry_s", 0.05))
                c.send(c.frames(P.WORK))
            else:
                c.weights = reply.arrays or c.weights
                c.task = reply
                if pushes_each is None or c.pushes < pushes_each:
                    c.send(c.frames(P.PUSH, push_body(c.task), grads_like(c.weights)))
                    c.pushes += 1
                    c.task = None
    return clients


def start_server(out: Path, *flags: str) -> LocalCluster:
    cluster = LocalCluster(out)
    start_serving(cluster, [*FLAGS, "--out", str(out), *flags])
    return cluster


@contextlib.contextmanager
def serving(out: Path, *flags: str):
    """A server on ``out``, and a list for the clients a test connects: all closed afterwards."""
    cluster = start_server(out, *flags)
    clients: list[Raw] = []
    try:
        yield cluster, clients
    finally:
        for c in clients:
            c.close()
        cluster.close()


def evaluator(endpoint: str, clients: list) -> Raw:
    ev = Raw(endpoint, f"ev-{uuid.uuid4().hex[:8]}")
    clients.append(ev)
    ev.hello("evaluator")
    return ev


def stop_with_sigterm(cluster: LocalCluster) -> None:
    cluster.kill("server", signal.SIGTERM)
    assert cluster.wait("server", 60) == 0, cluster.log_tail("server", 30)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A run folder whose server was stopped (SIGTERM) after 3 sync rounds of 2 trainers:
    checkpoint version 3, epoch 0 with batches 0-5 applied, one evaluation, no summary.json."""
    out = tmp_path_factory.mktemp("resume") / "run"
    with serving(out, *BOTH_IN_EVERY_ROUND) as (cluster, clients):
        clients += train(cluster.endpoint, ["w0", "w1"], ROUNDS_BEFORE_STOP)
        reply = evaluator(cluster.endpoint, clients).call(
            P.EVAL_REPORT, {"version": 2, "final": False, "metrics": {"test_accuracy": 0.5, "test_loss": 1.5}})
        assert reply.type == P.ACK, reply.body
        st = query_status(cluster.endpoint, timeout=REPLY_TIMEOUT)
        assert st["version"] == ROUNDS_BEFORE_STOP and st["applied_in_epoch"] == 2 * ROUNDS_BEFORE_STOP, st
        stop_with_sigterm(cluster)
    assert (out / "checkpoint.npz").exists() and not (out / "summary.json").exists()
    return out


def test_a_server_whose_terminal_closed_checkpoints_as_on_sigterm(tmp_path):
    """SIGHUP (the terminal closed, an ssh session dropped) killed the server at once: no
    checkpoint, no line, everything since the last periodic checkpoint lost."""
    out = tmp_path / "run"
    with serving(out, *BOTH_IN_EVERY_ROUND) as (cluster, clients):
        clients += train(cluster.endpoint, ["w0", "w1"], 1)
        cluster.kill("server", signal.SIGHUP)
        assert cluster.wait("server", 60) == 0, cluster.log_tail("server", 30)
        assert "interrupted: writing a checkpoint" in cluster.log_tail("server", 10)
    assert load_checkpoint(out / "checkpoint.npz")[1]["step"] == 1


@pytest.fixture
def run(interrupted, tmp_path) -> Path:
    """A copy of the interrupted run's folder, to edit."""
    return Path(shutil.copytree(interrupted, tmp_path / "run"))


def edit_meta(folder: Path, change) -> None:
    path = folder / "checkpoint.npz"
    arrays, meta = load_checkpoint(path)
    change(meta)
    save_checkpoint(path, arrays, meta)


def edit_arrays(folder: Path, change) -> None:
    path = folder / "checkpoint.npz"
    arrays, meta = load_checkpoint(path)
    change(arrays)
    save_checkpoint(path, arrays, meta)


@pytest.fixture
def server_cli(monkeypatch, capsys, caplog):
    """``pscnn server FLAGS --out FOLDER ARGS`` in-process, serve() stubbed: (exit code, stderr lines, server)."""
    made = []

    def stub_serve(self):
        made.append(self)
        return 0

    monkeypatch.setattr(ParameterServer, "serve", stub_serve)

    def run_cli(folder: Path, *args: str, flags=FLAGS):
        capsys.readouterr()
        caplog.clear()
        code = main(["server", "--bind", f"tcp://127.0.0.1:{free_port()}", *flags, "--out", str(folder), *args])
        err = capsys.readouterr().err
        return code, err.splitlines(), (made.pop() if made else None)

    return run_cli


def refused(result, *needles: str) -> str:
    code, lines, srv = result
    assert code == 1 and srv is None, f"accepted (exit {code}): {lines}"
    return error_line("\n".join(lines), *needles, starts="pscnn: error: --resume: ", alone=True)


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


# ---------------------------------------------------------------- 1. every field read back is checked

def _set(*keys, value):
    def change(meta):
        target = meta
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    return change


def _del(*keys):
    def change(meta):
        target = meta
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]
    return change


def _eval(**over):
    return _set("extra", "evaluations", value=[{"seconds": 1.0, "version": 2, "test_accuracy": 0.5,
                                                "test_loss": 1.5, "final": False, **over}])


META_EDITS = {
    # the reviewer's tracebacks
    "extra null": (_set("extra", value=None), "field extra must be a JSON object"),
    "step not a number": (_set("step", value="x"), "field step must be an integer"),
    "train_seconds text": (_set("extra", "train_seconds", value="abc"), "field extra.train_seconds must be a finite"),
    "staleness key x": (_set("extra", "staleness", value={"x": 3}), "field extra.staleness has key \"x\""),
    "contributors a list": (_set("extra", "contributors", value=[1, 2]), "field extra.contributors must be a JSON"),
    "applied null": (_set("extra", "work", "applied", value=None), "field extra.work.applied must be a list"),
    # the reviewer's silently accepted ones
    "epoch 99": (_set("extra", "work", "epoch", value=99), "field extra.work.epoch is 99, outside 0..2"),
    "applied out of the epoch": (_set("extra", "work", "applied", value=[99999, -1]),
                                 "field extra.work.applied holds 99999, not a batch of the epoch (0..9)"),
    "mode bogus": (_set("extra", "mode", value="bogus"), "field extra.mode must be one of sync, async, ssp"),
    # more of the same
    "applied twice": (_set("extra", "work", "applied", value=[0, 1, 1]), "field extra.work.applied lists a batch"),
    "applied a whole epoch": (_set("extra", "work", "applied", value=list(range(10))),
                              "field extra.work.applied lists all 10 batches of epoch 0"),
    "applied after the last epoch": (lambda m: m["extra"]["work"].update(epoch=2, applied=[0]),
                                     "field extra.work.applied lists 1 applied batches after the run's last epoch"),
    "applied bool": (_set("extra", "work", "applied", value=[True]), "field extra.work.applied holds true"),
    "applied one past the epoch": (_set("extra", "work", "applied", value=[10]),
                                   "field extra.work.applied holds 10, not a batch of the epoch (0..9)"),
    "epoch negative": (_set("extra", "work", "epoch", value=-1), "field extra.work.epoch is -1"),
    "epochs zero": (_set("extra", "work", "epochs", value=0), "field extra.work.epochs is 0"),
    "step negative": (_set("step", value=-4), "field step is -4"),
    "step float": (_set("step", value=3.5), "field step must be an integer"),
    # counts that travel in replies (status, tasks): past 64 bits, every one failed
    "step past 64 bits": (_set("step", value=2**64), f"field step is {2**64}, outside 0..{2**62}"),
    "samples past 64 bits": (_set("extra", "samples_applied", value=2**64), "field extra.samples_applied is 1844"),
    "requeues past 64 bits": (_set("extra", "lease_requeues", value=2**64), "field extra.lease_requeues is 1844"),
    "seed past the largest": (_set("extra", "seed", value=2**63), f"field extra.seed is {2**63}, outside 0..{2**63 - 1}"),
    "samples negative": (_set("extra", "samples_applied", value=-64), "field extra.samples_applied is -64"),
    "samples text": (_set("extra", "samples_applied", value="many"), "field extra.samples_applied must be"),
    "train_seconds NaN": (_set("extra", "train_seconds", value=float("nan")), "field extra.train_seconds must be"),
    "train_seconds negative": (_set("extra", "train_seconds", value=-1.0), "field extra.train_seconds is -1.0"),
    "staleness count negative": (_set("extra", "staleness", value={"0": -2}), "field extra.staleness[0] is -2"),
    "staleness not a map": (_set("extra", "staleness", value=[0]), "field extra.staleness must be a JSON object"),
    "contributor name": (_set("extra", "contributors", value={"w": 5}), "field extra.contributors[\"w\"] must be"),
    "evaluations not a list": (_set("extra", "evaluations", value={}), "field extra.evaluations must be a list"),
    "evaluation of a future version": (_eval(version=99), "field extra.evaluations[0].version is 99, outside 0..3"),
    "evaluation accuracy 7": (_eval(test_accuracy=7), "field extra.evaluations[0].test_accuracy is 7, outside 0..1"),
    "evaluation loss text": (_eval(test_loss="low"), "field extra.evaluations[0].test_loss must be"),
    "evaluation final 1": (_eval(final=1), "field extra.evaluations[0].final must be true or false"),
    "evaluation seconds missing": (lambda m: m["extra"]["evaluations"][0].pop("seconds"),
                                   "field extra.evaluations[0].seconds is missing"),
    "evaluations thinned past the step": (_set("extra", "evaluations_thinned_through", value=99),
                                          "field extra.evaluations_thinned_through is 99, outside -1..3"),
    "work missing": (_del("extra", "work"), "field extra.work is missing"),
    "mode missing": (_del("extra", "mode"), "field extra.mode is missing"),
    "seed text": (_set("extra", "seed", value="zero"), "field extra.seed must be an integer"),
    "workers_most negative": (_set("extra", "workers_most", value=-1), "field extra.workers_most is -1"),
    "contributors_count below the ids kept": (_set("extra", "contributors_count", value=1),
                                              "field extra.contributors_count is 1, outside 2.."),
    "run_id a number": (_set("extra", "run_id", value=7), "field extra.run_id must be 12 hex digits, got 7"),
    "peer_ids of numbers": (_set("extra", "peer_ids", value=[1, 2]),
                            "field extra.peer_ids must be a list of worker ids"),
    "worker_seconds a list": (_set("extra", "worker_seconds", value=[1.0]),
                              "field extra.worker_seconds must be a JSON object, got [1.0]"),
    "worker_seconds without a part": (_set("extra", "worker_seconds", value={"compute": 1.0}),
                                      "field extra.worker_seconds must have the keys compute, network, server"),
    "worker_seconds negative": (_set("extra", "worker_seconds", value={"compute": -1.0, "network": 0, "server": 0}),
                                "field extra.worker_seconds.compute is -1.0, below 0.0"),
    "optimizer null": (_set("optimizer", value=None), "optimizer"),
    "optimizer a string": (_set("optimizer", value="sgd"), "'optimizer' must be null or an object"),
    "model spec garbage": (_set("model_spec", value={"layers": 5}), "field model_spec cannot be built"),
}


@pytest.mark.parametrize("case", list(META_EDITS))
def test_a_hand_edited_checkpoint_field_is_refused_in_one_line_naming_it_and_the_file(run, server_cli, case):
    change, needle = META_EDITS[case]
    edit_meta(run, change)
    refused(server_cli(run, "--resume"), needle, str(run / "checkpoint.npz"))


def _poison(name: str, value: float):
    def change(arrays):
        a = arrays[name].copy()
        a.reshape(-1)[0] = value
        arrays[name] = a
    return change


@pytest.mark.parametrize("name,value,needle", [
    ("param/fc1.weight", np.nan, "param fc1.weight holds NaN or Inf"),
    ("param/conv1.bias", np.inf, "param conv1.bias holds NaN or Inf"),
    ("optim/velocity/fc2.weight", -np.inf, "optimizer state velocity/fc2.weight holds NaN or Inf"),
])
def test_nan_or_inf_in_the_weights_or_the_optimizer_state_is_refused(run, server_cli, name, value, needle):
    edit_arrays(run, _poison(name, value))
    refused(server_cli(run, "--resume"), needle, str(run / "checkpoint.npz"))


def test_the_real_command_refuses_a_bad_checkpoint_in_one_line_without_a_traceback(run):
    edit_meta(run, _set("extra", "staleness", value={"x": 3}))
    proc = subprocess.run([sys.executable, "-m", "pscnn.cli", "server", "--bind", f"tcp://127.0.0.1:{free_port()}",
                           *FLAGS, "--out", str(run), "--resume"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
    assert errors[0].startswith("pscnn: error: --resume: checkpoint ") and "extra.staleness" in errors[0]


def test_the_checkpoint_loader_refuses_a_malformed_optimizer_or_dtype_in_one_line(tmp_path):
    """Not only the server: load_model_checkpoint itself, on meta fields it reads."""
    model = build_model("light")
    path = tmp_path / "m.npz"
    save_model_checkpoint(path, model, build_optimizer({"name": "sgd", "lr": 0.1, "momentum": 0.9}))
    arrays, meta = load_checkpoint(path)
    for field, value, needle in (("optimizer", "sgd", "'optimizer' must be null or an object"),
                                 ("optimizer", {"lr": 1}, "'optimizer' must be null or an object"),
                                 ("dtype", 5, "'dtype' must be a string")):
        save_checkpoint(path, arrays, {**meta, field: value})
        with pytest.raises(CheckpointError, match=needle):
            load_model_checkpoint(path)


# ---------------------------------------------------------------- 2. the run's settings must match

@pytest.mark.parametrize("flag,value,needles", [
    ("--seed", "5", ["--seed 0, this run has --seed 5", "the rest of epoch 1 would train on another permutation",
                     "resume with --seed 0"]),
    ("--batch-size", "32", ["--batch-size 64, this run has --batch-size 32", "resume with --batch-size 64"]),
    ("--train-limit", "320", ["training set of 640 images, this run has 320", "resume with --train-limit 640"]),
    ("--mode", "async", ["--mode sync, this run has --mode async", "resume with --mode sync"]),
    ("--model", "seed", ["weights of --model light, this run has --model seed", "resume with --model light"]),
    ("--optimizer", "adam", ["--optimizer sgd, this run has --optimizer adam", "resume with --optimizer sgd"]),
])
def test_a_setting_that_must_match_the_checkpoint_is_refused_naming_both_values(run, server_cli, flag, value,
                                                                                 needles):
    i = FLAGS.index(flag)
    flags = [*FLAGS[:i], flag, value, *FLAGS[i + 2:]]
    refused(server_cli(run, "--resume", flags=flags), str(run / "checkpoint.npz"), *needles)


def test_momentum_sgd_resumed_without_momentum_is_refused_naming_the_momentum_to_resume_with(run, server_cli):
    """Plain SGD has no place for the checkpoint's velocity: loading it failed with "unexpected key
    'velocity/conv1.weight'", which named no setting to change."""
    refused(server_cli(run, "--resume", "--momentum", "0"), str(run / "checkpoint.npz"),
            "--momentum 0.9, this run has --momentum 0.0", "its optimizer state holds momentum SGD's velocity",
            "resume with --momentum 0.9")


def test_every_setting_that_differs_is_named_in_the_one_line(run, server_cli):
    """Refused one at a time, a user who had changed two settings (a Compose .env edited twice) fixed
    the one named, restarted, and only then learnt of the next."""
    line = refused(server_cli(run, "--resume", "--batch-size", "32", "--model", "seed", "--optimizer", "adam"))
    for needle in ("--batch-size 64, this run has --batch-size 32", "resume with --batch-size 64",
                   "weights of --model light, this run has --model seed", "resume with --model light",
                   "--optimizer sgd, this run has --optimizer adam", "resume with --optimizer sgd"):
        assert needle in line, line
    assert line.count(str(run / "checkpoint.npz")) == 1, line


def test_another_seed_for_a_finished_run_names_no_epoch_that_is_not_there(run, server_cli):
    """The message counted epochs from 0 ("the rest of epoch 0") and, for a finished run, named
    the rest of an epoch past its last."""
    edit_meta(run, lambda m: m["extra"]["work"].update(epoch=2, applied=[]))     # 2 of 2 done
    i = FLAGS.index("--seed")
    flags = [*FLAGS[:i], "--seed", "5", *FLAGS[i + 2:]]
    refused(server_cli(run, "--resume", flags=flags), "--seed 0, this run has --seed 5",
            "so an epoch added to it would train on another permutation", "resume with --seed 0")


def test_fewer_epochs_than_the_checkpoint_finished_is_refused(run, server_cli):
    edit_meta(run, lambda m: m["extra"]["work"].update(epoch=2, epochs=3, applied=[]))   # 2 of 3 done
    i = FLAGS.index("--epochs")
    flags = [*FLAGS[:i], "--epochs", "1", *FLAGS[i + 2:]]
    refused(server_cli(run, "--resume", flags=flags), "--epochs 3, this run has --epochs 1",
            "finished 2 epochs already", "resume with --epochs 3")


def test_fewer_epochs_than_the_one_under_way_is_refused(run, server_cli):
    """Stopped 6 batches into epoch 2 of 2, resumed with --epochs 1: the run was taken as complete
    at once, its weights holding those batches of a second epoch and its summary saying 1 epoch."""
    edit_meta(run, lambda m: m["extra"]["work"].update(epoch=1))     # batches 0-5 of epoch 2 applied
    i = FLAGS.index("--epochs")
    flags = [*FLAGS[:i], "--epochs", "1", *FLAGS[i + 2:]]
    refused(server_cli(run, "--resume", flags=flags), "--epochs 2, this run has --epochs 1",
            "6 batches into epoch 2", "resume with --epochs 2")


def test_as_many_epochs_as_the_checkpoint_finished_is_a_finished_run(run, server_cli):
    edit_meta(run, lambda m: m["extra"]["work"].update(epoch=1, applied=[]))    # 1 of 2 done, none of epoch 2
    i = FLAGS.index("--epochs")
    flags = [*FLAGS[:i], "--epochs", "1", *FLAGS[i + 2:]]
    code, lines, srv = server_cli(run, "--resume", flags=flags)
    assert code == 0 and srv is not None, lines
    assert (srv.work.epochs, srv.work.epoch, srv.work.applied) == (1, 1, set())


def test_the_same_settings_resume_where_the_run_stopped_without_a_warning(run, server_cli, caplog):
    code, lines, srv = server_cli(run, "--resume")
    assert code == 0 and srv is not None, lines
    assert srv.store.version == ROUNDS_BEFORE_STOP
    assert (srv.work.epoch, sorted(srv.work.applied)) == (0, list(range(2 * ROUNDS_BEFORE_STOP)))
    assert srv.samples_applied == 2 * ROUNDS_BEFORE_STOP * 64 and srv.staleness == {0: 2 * ROUNDS_BEFORE_STOP}
    assert [e["version"] for e in srv.history.evaluations] == [2] and len(srv.contributors) == 2
    assert warnings(caplog) == []


def test_more_epochs_or_another_learning_rate_are_a_legitimate_continuation(run, server_cli, caplog):
    """Training longer (more --epochs) and a changed lr keep the epoch's position; a
    changed optimizer setting is said in one warning."""
    i = FLAGS.index("--epochs")
    flags = [*FLAGS[:i], "--epochs", "5", *FLAGS[i + 2:], "--lr", "0.01"]
    caplog.set_level(logging.INFO, "pscnn.server")
    code, lines, srv = server_cli(run, "--resume", flags=flags)
    assert code == 0 and srv is not None, lines
    assert (srv.work.epochs, srv.work.epoch, len(srv.work.applied)) == (5, 0, 2 * ROUNDS_BEFORE_STOP)
    (warning,) = warnings(caplog)
    assert "optimizer settings differ" in warning and "lr 0.04 -> 0.01" in warning, warning
    assert "schedule.total_steps 20 -> 50" in warning, warning         # cosine over the run's 5 epochs
    assert "--resume: training for 5 epochs; the checkpoint's run had 2" in caplog.text


def test_a_changed_warm_up_is_named_in_the_warning(run, server_cli, caplog):
    """The changed schedule was shown whole and cut at 60 characters, before its warmup_steps: the
    warning's two sides read the same."""
    code, lines, srv = server_cli(run, "--resume", "--warmup-steps", "5")
    assert code == 0 and srv is not None, lines
    (warning,) = warnings(caplog)
    assert "(schedule.warmup_steps 10 -> 5): training continues with this run's" in warning, warning


def test_a_checkpoint_without_the_seed_is_resumed_with_a_warning(run, server_cli, caplog):
    """One written before the seed was recorded: accepted, the seed cannot be checked."""
    edit_meta(run, _del("extra", "seed"))
    code, lines, srv = server_cli(run, "--resume")
    assert code == 0 and srv is not None, lines
    (warning,) = warnings(caplog)
    assert "does not record its seed" in warning and "--seed 0" in warning


def test_plain_sgd_resumed_as_plain_sgd_is_accepted(run, server_cli):
    """Only a velocity (momentum > 0) needs momentum to resume: a plain SGD checkpoint resumed with
    --momentum 0 is the same optimizer."""
    path = run / "checkpoint.npz"
    arrays, meta = load_checkpoint(path)
    save_checkpoint(path, {k: v for k, v in arrays.items() if not k.startswith("optim/velocity/")},
                    {**meta, "optimizer": {**meta["optimizer"], "momentum": 0.0}})
    code, lines, srv = server_cli(run, "--resume", "--momentum", "0")
    assert code == 0 and srv is not None, lines


def test_a_checkpoint_without_the_most_workers_counts_its_contributors(run, server_cli):
    """One written before workers_most was recorded: the workers whose gradients it holds are the
    most it knows of, not none."""
    edit_meta(run, _del("extra", "workers_most"))
    code, lines, srv = server_cli(run, "--resume")
    assert code == 0 and srv is not None, lines
    assert srv.workers_before == 2


def test_a_checkpoints_model_spec_written_otherwise_but_building_the_same_model_is_accepted(run, server_cli):
    """A spec as written by hand (a kernel of 3, not [3, 3]) is compared by the model it builds."""
    def kernel_as_one_number(meta):
        for layer in meta["model_spec"]["layers"]:
            if layer["type"] == "conv2d":
                layer["kernel"] = layer["kernel"][0]
    edit_meta(run, kernel_as_one_number)
    code, lines, srv = server_cli(run, "--resume")
    assert code == 0 and srv is not None, lines


# ---------------------------------------------------------------- 3. starting over on an unfinished run

def test_starting_over_on_an_unfinished_runs_checkpoint_warns_once(run, server_cli, caplog):
    code, lines, srv = server_cli(run)                  # no --resume: starts over, as asked
    assert code == 0 and srv is not None and srv.store.version == 0, lines
    (warning,) = warnings(caplog)
    assert str(run) in warning and f"version {ROUNDS_BEFORE_STOP}" in warning and "--resume" in warning, warning
    assert "\n" not in warning


@pytest.mark.parametrize("changed, advice", [
    # settings --resume takes from this server's: more epochs, another learning rate
    (["--epochs", "3", "--lr", "0.5"],
     "stop this server and start it again with --resume (PSCNN_RESUME=1 in Compose)"),
    (["--batch-size", "32", "--seed", "5"],
     "stop this server and start it again with --resume and that run's settings (PSCNN_RESUME=1 in Compose); "
     "this server's differ (checkpoint {checkpoint} was written with --seed 0, this run has --seed 5: workers "
     "derive each batch from the seed, so the rest of epoch 1 would train on another permutation; resume with "
     "--seed 0; and it was written with --batch-size 64, this run has --batch-size 32: the epoch's applied "
     "batches are batches of 64; resume with --batch-size 64)"),
])
def test_a_server_starting_over_says_how_to_continue_the_earlier_run_with_its_settings(
        changed, advice, run, server_cli, caplog):
    """The warning advised "start it again with --resume" when this server's settings were not the
    folder's run's, and that --resume was refused (naming each difference) only once the user had
    stopped this server and tried it."""
    code, lines, srv = server_cli(run, *changed)
    assert code == 0 and srv is not None and srv.store.version == 0, lines
    (warning,) = warnings(caplog)
    assert warning.endswith(f"to continue that run instead, {advice.format(checkpoint=run / 'checkpoint.npz')}"), \
        warning


def test_a_checkpoint_of_version_0_is_started_over_without_a_warning(tmp_path):
    """A run stopped before its first update (every worker failed on its data) left a
    checkpoint of version 0: starting over loses nothing, so nothing is said; from
    version 1 on the warning stands."""
    from server.resume import unfinished_run_warning
    save_checkpoint(tmp_path / "checkpoint.npz", {}, {"step": 0})
    assert unfinished_run_warning(str(tmp_path)) is None
    save_checkpoint(tmp_path / "checkpoint.npz", {}, {"step": 1, "extra": {"work": {"epoch": 0, "epochs": 3}}})
    warning = unfinished_run_warning(str(tmp_path))
    assert warning is not None and "(version 1, epoch 0 of 3;" in warning


def test_checkpoint_version_reads_the_step_or_says_none(tmp_path):
    from server.resume import checkpoint_version
    assert checkpoint_version(str(tmp_path)) is None                      # no checkpoint
    (tmp_path / "checkpoint.npz").write_bytes(b"not a zip")
    assert checkpoint_version(str(tmp_path)) is None                      # unreadable
    save_checkpoint(tmp_path / "checkpoint.npz", {}, {"step": "7"})
    assert checkpoint_version(str(tmp_path)) is None                      # not a version
    save_checkpoint(tmp_path / "checkpoint.npz", {}, {"step": 7})
    assert checkpoint_version(str(tmp_path)) == 7


def test_the_latest_run_id_is_the_last_start_records_not_the_first(tmp_path):
    """A folder resumed, then started over: its metrics.jsonl holds the first run's start records, then
    the new run's; a --resume of the first run's checkpoint must see the new run's id."""
    from server.resume import latest_run_id
    assert latest_run_id(str(tmp_path)) is None                               # no metrics.jsonl
    with RunWriter(tmp_path, {}) as writer:
        writer.log("start", run_id="0123456789ab")
        writer.log("step", version=1)
        writer.log("start", run_id="0123456789ab")                             # resumed
        writer.log("start", run_id="ba9876543210")                             # started over
    assert latest_run_id(str(tmp_path)) == "ba9876543210"


def test_a_summary_as_new_as_the_checkpoint_or_without_one_is_a_finished_run(tmp_path):
    """A filesystem's clock ticks coarser than a server writes its last checkpoint and then its
    summary: the same mtime is a summary written after the checkpoint, not an unfinished run."""
    from server.resume import summary_after_checkpoint, unfinished_run_warning
    checkpoint, summary = tmp_path / "checkpoint.npz", tmp_path / "summary.json"
    save_checkpoint(checkpoint, {}, {"step": 3})
    summary.write_text("{}")
    os.utime(checkpoint, ns=(10**18, 10**18))
    os.utime(summary, ns=(10**18, 10**18))
    assert summary_after_checkpoint(str(tmp_path)) and unfinished_run_warning(str(tmp_path)) is None
    os.utime(summary, ns=(10**18 - 1, 10**18 - 1))
    assert not summary_after_checkpoint(str(tmp_path)) and unfinished_run_warning(str(tmp_path)) is not None
    checkpoint.unlink()
    assert summary_after_checkpoint(str(tmp_path))


def test_a_hand_edited_eval_line_is_not_taken_into_the_history():
    from server.resume import logged_evaluation
    line = {"kind": "eval", "train_seconds": 1.0, "version": 2, "test_accuracy": 0.5, "test_loss": 1.0, "final": False}
    assert logged_evaluation(line, 3) == {"seconds": 1.0, "version": 2, "test_accuracy": 0.5, "test_loss": 1.0,
                                          "final": False}
    for edit in ({"final": 1}, {"version": 4}, {"test_accuracy": 1.5}, {"test_loss": "low"}):
        assert logged_evaluation({**line, **edit}, 3) is None, edit


def test_the_clients_of_the_run_are_those_that_joined_since_the_start_of_the_server_that_wrote_the_checkpoint():
    from server.resume import joined_since_checkpoint
    logged = [{"kind": "start"}, {"kind": "join", "id": "gone"},
              {"kind": "start"}, {"kind": "join", "id": "before"}, {"kind": "checkpoint"},
              {"kind": "join", "id": "after"}, {"kind": "join", "id": 5}, {"kind": "start"}]
    assert joined_since_checkpoint(logged) == ["before", "after"]
    assert joined_since_checkpoint([{"kind": "join", "id": "a"}, {"kind": "start"}]) == ["a"]   # no checkpoint record


# ---------------------------------------------------------------- 4. the worker count after a resume

@pytest.fixture(scope="module")
def finished(interrupted, tmp_path_factory, mnist_dir) -> Path:
    """The interrupted run resumed by a new server and two new trainer processes (new
    worker ids), to the end: the server scores the final weights itself."""
    out = Path(shutil.copytree(interrupted, tmp_path_factory.mktemp("finished") / "run"))
    with serving(out, "--resume", "--final-eval-timeout", "0", "--mnist-dir", mnist_dir,
                 *BOTH_IN_EVERY_ROUND) as (cluster, clients):
        clients += train(cluster.endpoint, ["w2", "w3"], None)
        assert cluster.wait("server", 120) == 0, cluster.log_tail("server", 30)
    return out


def test_a_resumed_two_worker_run_reports_two_workers(finished, capsys):
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["samples_applied"] == 2 * 640
    assert len(summary["worker_ids"]) == 4               # every worker whose gradient was applied
    assert summary["workers"] == 2                       # the most at work in one incarnation
    print_report(finished / "summary.json")
    out = capsys.readouterr().out
    assert "run finished: mode sync, 2 workers, 2 epochs" in out
    assert "could not read" not in out, out          # every field of a real summary.json reads


def test_the_worker_count_survives_a_resume_that_applies_nothing(run, server_cli):
    """A server resumed only to finish (no update left for it) still reports the
    workers of the incarnation that trained."""
    code, lines, srv = server_cli(run, "--resume")
    assert code == 0 and srv is not None, lines
    assert srv.workers_most == 2 and not srv.incarnation_contributors


def test_a_finished_runs_folder_is_reused_without_a_warning(finished, tmp_path, server_cli, caplog):
    """`make run` twice: the folder's checkpoint is the finished run's (summary.json after it)."""
    folder = Path(shutil.copytree(finished, tmp_path / "again", copy_function=shutil.copy2))
    code, lines, srv = server_cli(folder)
    assert code == 0 and srv is not None, lines
    assert warnings(caplog) == []


def test_an_older_summary_does_not_hide_an_unfinished_run_started_over_since(finished, interrupted, tmp_path,
                                                                            server_cli, caplog):
    """A finished run's folder, started over, then stopped: its summary.json is the
    earlier run's, older than the new checkpoint, which is an unfinished run's."""
    folder = Path(shutil.copytree(finished, tmp_path / "again", copy_function=shutil.copy2))
    shutil.copyfile(interrupted / "checkpoint.npz", folder / "checkpoint.npz")     # newer than the summary
    summary_time = os.stat(folder / "summary.json").st_mtime_ns
    os.utime(folder / "checkpoint.npz", ns=(summary_time + 10**9, summary_time + 10**9))
    code, lines, srv = server_cli(folder)
    assert code == 0 and srv is not None, lines
    (warning,) = warnings(caplog)
    assert str(folder) in warning and "--resume" in warning


def test_a_server_stopped_after_its_summary_writes_no_checkpoint_over_the_finished_one(interrupted, tmp_path,
                                                                                      mnist_dir):
    """SIGTERM while the server lingers after the summary (an evaluator was never told to
    stop): a checkpoint then would be newer than summary.json, and the finished run's
    folder would look unfinished to the next start."""
    from server.resume import unfinished_run_warning
    out = Path(shutil.copytree(interrupted, tmp_path / "run"))
    with serving(out, "--resume", "--final-eval-timeout", "0", "--peer-timeout", "60",
                 "--mnist-dir", mnist_dir, *BOTH_IN_EVERY_ROUND) as (cluster, clients):
        evaluator(cluster.endpoint, clients)
        clients += train(cluster.endpoint, ["w2", "w3"], None)
        deadline = time.monotonic() + 60
        while not (out / "summary.json").exists():
            assert time.monotonic() < deadline and cluster.procs["server"].poll() is None, \
                cluster.log_tail("server", 30)
            time.sleep(0.05)
        final_checkpoint = os.stat(out / "checkpoint.npz").st_mtime_ns
        stop_with_sigterm(cluster)
    assert "interrupted after the run finished: no checkpoint written" in cluster.log_tail("server", 10)
    assert os.stat(out / "checkpoint.npz").st_mtime_ns == final_checkpoint
    assert unfinished_run_warning(str(out)) is None


# ---------------------------------------------------------------- 5. the evaluations logged after the checkpoint

def eval_lines(folder: Path) -> list[dict]:
    return [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]


def test_evaluations_logged_after_the_checkpoint_stay_in_the_history_and_are_not_logged_twice(run, caplog):
    """A server killed after its last checkpoint had logged evaluations the checkpoint does not
    hold: of its own version (and of older ones: an evaluator's report arrives while training
    goes on).  The resumed server's history (summary.json's evaluations) had left them out, and
    the evaluator, scoring the checkpoint's version again, had it logged a second time."""
    def resumed() -> InProcess:
        return InProcess(run, mode="sync", epochs=2, test_limit=256, resume=True, checkpoint_every=0)

    def report(server: InProcess, version: int, accuracy: float) -> None:
        ev = server.client()
        assert server.call(ev, P.HELLO, {"role": "evaluator", "name": "evaluator"}).type == P.WELCOME
        reply = server.call(ev, P.EVAL_REPORT, {"version": version, "final": False,
                                                "metrics": {"test_accuracy": accuracy, "test_loss": 1.0}})
        assert reply.type == P.ACK, reply.body

    first = resumed()           # the checkpoint's version 3, with an evaluation of version 2
    report(first, 3, 0.75)
    first.close()
    first.srv.writer.close()    # killed: no checkpoint after that report
    with open(run / "metrics.jsonl", "a") as fh:    # and an evaluation of an update the resume loses
        fh.write(json.dumps({**eval_lines(run)[-1], "version": 4, "test_accuracy": 0.8}) + "\n")

    caplog.set_level(logging.INFO, logger="pscnn.server")
    second = resumed()
    try:
        assert [(e["version"], e["test_accuracy"]) for e in second.srv.history.evaluations] == [(2, 0.5), (3, 0.75)]
        # it said "1 evaluations ... are kept"
        assert ("--resume: 1 evaluation logged after the checkpoint was written is kept in the run's history"
                in caplog.messages)
        report(second, 3, 0.76)         # the rejoined evaluator scores the checkpoint's version again
    finally:
        second.close()
        second.srv.writer.close()
    assert [e["version"] for e in eval_lines(run)] == [2, 3, 4]     # version 3 logged once


def test_an_evaluation_logged_after_the_checkpoint_keeps_the_history_in_time_order(tmp_path):
    """The evaluator pulled the checkpoint's version after the checkpoint was written, and the server
    was killed; the resumed server's training clock goes on from the checkpoint's time, so the
    adopted evaluation (logged at its pull's later time) stood after the evaluations that followed
    it: a chaos run's summary.json had version 2041 at 58.868 s, then version 2072 at 58.799 s.
    It is kept at the checkpoint's time, when its weights were there."""
    first = InProcess(tmp_path / "run", epochs=2)
    try:
        trainer = _trainer(first)
        task = first.call(trainer, P.WORK)
        assert first.call(trainer, P.PUSH, push_body(task), grads_like(task.arrays)).body["ack"]["applied"]
        assert first.srv._checkpoint()
        checkpoint_seconds = load_checkpoint(tmp_path / "run" / "checkpoint.npz")[1]["extra"]["train_seconds"]
        first.srv.t_train_start -= 50           # the evaluator pulls well after the checkpoint
        ev = _evaluator(first)
        assert first.call(ev, P.PULL, {"have_version": -1}).type == P.WEIGHTS
        assert first.call(ev, P.EVAL_REPORT, {"version": 1, "final": False, "metrics": {
            "test_accuracy": 0.5, "test_loss": 1.0}}).type == P.ACK
    finally:
        first.close()
        first.srv.writer.close()
    assert eval_lines(tmp_path / "run")[-1]["train_seconds"] >= checkpoint_seconds + 50
    again = InProcess(tmp_path / "run", epochs=2, resume=True)
    try:
        adopted = [e for e in again.srv.history.evaluations if e["version"] == 1]
        assert [e["seconds"] for e in adopted] == [checkpoint_seconds]
        assert again.srv._train_clock(time.monotonic()) >= adopted[0]["seconds"]
    finally:
        again.close()
        again.srv.writer.close()


def test_a_checkpoint_with_a_longer_history_than_kept_now_is_thinned_on_resume(tmp_path, monkeypatch, caplog):
    """A checkpoint written before the history was bounded holds every record: --resume thins it
    to EvaluationHistory.CAP (the bests: the time to accuracy stays; the final; the newest), and adopts
    none of metrics.jsonl's records of the versions thinned out."""
    first = InProcess(tmp_path / "run", epochs=16)          # 160 updates, each one scored
    try:
        _push_all(first, _trainer(first))
        first.srv.EVAL_RECORDS_AT_ONCE = 1000               # not the bound on how fast reports come
        ev = _evaluator(first)
        for version in range(first.srv.store.version):
            _report(first, ev, version, False, _climbing_accuracy(version))
        _report(first, ev, first.srv.store.version, True, 0.995)
        assert first.srv._checkpoint()
    finally:
        first.close()
        first.srv.writer.close()
    edit_meta(tmp_path / "run", lambda meta: meta["extra"].pop("evaluations_thinned_through", None))
    every = load_checkpoint(tmp_path / "run" / "checkpoint.npz")[1]["extra"]["evaluations"]
    assert len(every) == 161
    monkeypatch.setattr(EvaluationHistory, "CAP", 40)
    monkeypatch.setattr(EvaluationHistory, "NEWEST", 5)
    with caplog.at_level(logging.INFO, logger="pscnn.server"):
        again = InProcess(tmp_path / "run", epochs=16, resume=True)
    try:
        kept = again.srv.history.evaluations
        assert len(kept) <= 40 and kept[-5:] == every[-5:] and kept[-1]["final"]
        assert all(e in kept for e in new_bests(every))
        by_time = sorted(every, key=lambda e: e["seconds"])
        assert time_to_accuracy(sorted(kept, key=lambda e: e["seconds"])) == time_to_accuracy(by_time)
        assert f"--resume: the checkpoint's 161 evaluations thinned to {len(kept)}" in caplog.text
    finally:
        again.close()
        again.srv.writer.close()


# ---------------------------------------------------------------- 6. the clients of the run before a restart

def test_a_resumed_server_asks_the_runs_clients_to_rejoin_without_counting_them_refused(tmp_path, caplog):
    """Killed and resumed, a server logged every message its clients sent before they said hello
    again (heartbeats, resends) as a WARNING "rejected message ... unknown worker id" and counted it
    in rejected_messages: 6 to 19 a restart, and a clean restart's report showed "N messages
    refused" under faults.  Those of the checkpoint's clients (a trainer that pushed, an evaluator)
    are answered as before, logged once each at INFO, uncounted; an id never seen is still refused."""
    first = InProcess(tmp_path / "run", epochs=2)
    try:
        trainer = _trainer(first)
        task = first.call(trainer, P.WORK)
        assert first.call(trainer, P.PUSH, push_body(task), grads_like(task.arrays)).body["ack"]["applied"]
        evaluator_id = _evaluator(first).wid
        assert first.srv._checkpoint()
    finally:
        first.close()
        first.srv.writer.close()
    again = InProcess(tmp_path / "run", epochs=2, resume=True)
    try:
        back = {wid: Raw(again.endpoint, wid) for wid in (trainer.wid, evaluator_id)}
        stranger = Raw(again.endpoint)
        again.raws += [*back.values(), stranger]
        with caplog.at_level(logging.INFO, logger="pscnn.server"):
            replies = [again.call(back[trainer.wid], P.WORK), again.call(back[trainer.wid], P.WORK),
                       again.call(back[evaluator_id], P.HEARTBEAT), again.call(stranger, P.WORK)]
        for reply, wid in zip(replies, [trainer.wid, trainer.wid, evaluator_id, stranger.wid]):
            assert reply.type == P.ERROR and reply.body == {
                "code": "unknown_worker",
                "message": f"unknown worker id {wid!r}: send hello first (the server may have restarted)"}, reply.body
        lines = [(r.levelno, r.getMessage()) for r in caplog.records]
        back_again = "a client of the run before the restart: {} ({}); told to say hello again"
        assert lines == [
            (logging.INFO, back_again.format(trainer.wid, "work")),
            (logging.INFO, back_again.format(evaluator_id, "heartbeat")),
            (logging.WARNING, f"rejected message from {stranger.wid}: unknown worker id {stranger.wid!r}: send hello "
                              "first (the server may have restarted)")], lines
        assert again.srv.rejected == {"unknown_worker": 1}
        # back under its id, it trains on
        assert again.call(back[trainer.wid], P.HELLO, {"role": "trainer", "name": "w"}).type == P.WELCOME
        assert again.call(back[trainer.wid], P.WORK).type == P.TASK

        def peer_ids() -> list[str]:
            assert again.srv._checkpoint()
            return load_checkpoint(tmp_path / "run" / "checkpoint.npz")[1]["extra"]["peer_ids"]
        # killed again before the evaluator is back, the next server still knows it; one that never
        # comes back is not carried on past --peer-timeout
        assert peer_ids() == sorted([trainer.wid, evaluator_id])
        again.srv.t_start -= again.srv.cfg.peer_timeout
        assert peer_ids() == [trainer.wid]
    finally:
        again.close()
        again.srv.writer.close()


def _told_to_say_hello_again(server, wid: str, caplog, *requests) -> Raw:
    """``wid``, a client of the run before, sends ``requests`` ((type, body...) tuples) to the resumed
    ``server``: each is answered unknown_worker, one INFO line names the first, none is counted
    refused.  Returns the client's socket."""
    back = Raw(server.endpoint, wid)
    server.raws.append(back)
    caplog.clear()          # the earlier servers' lines
    with caplog.at_level(logging.INFO, logger="pscnn.server"):
        replies = [server.call(back, *request) for request in requests]
    assert [(r.type, r.body["code"]) for r in replies] == [(P.ERROR, "unknown_worker")] * len(requests)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if wid in r.getMessage()]
    assert lines == [(logging.INFO, f"a client of the run before the restart: {wid} ({requests[0][0]}); "
                                    "told to say hello again")], lines
    assert not server.srv.rejected
    return back


def test_a_resumed_server_asks_a_client_declared_dead_before_its_checkpoint_to_rejoin(tmp_path, caplog):
    """An evaluator stopped (SIGSTOP) past --peer-timeout was declared dead, the run finished and its
    server exited; resumed, the server logged each message of the evaluator, continued, as a WARNING
    "rejected message ... unknown worker id" (twice, and counted in rejected_messages): the checkpoint
    named only the peers still there.  It names those declared dead too: the resumed server asks the
    evaluator to say hello again, in one INFO line, uncounted."""
    first = InProcess(tmp_path / "run", epochs=1)
    try:
        _push_all(first, _trainer(first))
        evaluator = _evaluator(first)
        first.srv._housekeeping(time.monotonic() + first.srv.cfg.peer_timeout + 1)
        assert first.srv.dropped[evaluator.wid].why.startswith("declared dead")
        assert first.srv._checkpoint()
    finally:
        first.close()
        first.srv.writer.close()
    again = InProcess(tmp_path / "run", epochs=1, resume=True)
    try:
        back = _told_to_say_hello_again(again, evaluator.wid, caplog, (P.HEARTBEAT,), (P.PULL, {"have_version": 3}))
        # joined again, it is told the run is over
        assert again.call(back, P.HELLO, {"role": "evaluator", "name": "e"}).type == P.WELCOME
        assert again.call(back, P.PULL, {"have_version": -1}).body["done"]
    finally:
        again.close()
        again.srv.writer.close()


def _evaluator_joined_after_the_checkpoint(run) -> str:
    """A server in ``run`` that applied a push, wrote its checkpoint, then saw an evaluator join, and
    was killed before another: the evaluator's id."""
    first = InProcess(run, epochs=2)
    try:
        first.srv._log_start()                  # as serve() does: InProcess handles messages without it
        trainer = _trainer(first)
        task = first.call(trainer, P.WORK)
        assert first.call(trainer, P.PUSH, push_body(task), grads_like(task.arrays)).body["ack"]["applied"]
        assert first.srv._checkpoint()
        return _evaluator(first).wid            # joins after the checkpoint; no checkpoint follows
    finally:
        first.close()
        first.srv.writer.close()


def test_a_resumed_server_asks_a_client_that_joined_after_its_checkpoint_to_rejoin(tmp_path, caplog):
    """An evaluator joined after the last checkpoint, and the server was killed (SIGKILL) before the
    next one; resumed, the server logged the evaluator's messages as WARNINGs "rejected message ...
    unknown worker id" and counted them in rejected_messages (a chaos run: 2, the run's only refused
    messages not explained by a fault of a client).  Its join record in metrics.jsonl names it: the
    resumed server asks it to say hello again, in one INFO line, uncounted."""
    evaluator_wid = _evaluator_joined_after_the_checkpoint(tmp_path / "run")
    again = InProcess(tmp_path / "run", epochs=2, resume=True)
    try:
        back = _told_to_say_hello_again(again, evaluator_wid, caplog, (P.HEARTBEAT,), (P.PULL, {"have_version": 1}))
        assert again.call(back, P.HELLO, {"role": "evaluator", "name": "e"}).type == P.WELCOME
    finally:
        again.close()
        again.srv.writer.close()


def test_a_client_that_joined_after_the_checkpoint_is_known_to_a_server_resumed_twice(tmp_path, caplog):
    """As above, but the resumed server was killed too, before the evaluator came back and before a
    checkpoint of its own: the third server counted only the joins since the last start record,
    the second server's, and refused the evaluator as an unknown id (a WARNING, counted in
    rejected_messages).  The joins counted now run from the start of the server that wrote the
    checkpoint resumed."""
    evaluator_wid = _evaluator_joined_after_the_checkpoint(tmp_path / "run")
    second = InProcess(tmp_path / "run", epochs=2, resume=True)
    try:
        second.srv._log_start()                 # killed with no message handled, no checkpoint written
    finally:
        second.close()
        second.srv.writer.close()
    third = InProcess(tmp_path / "run", epochs=2, resume=True)
    try:
        _told_to_say_hello_again(third, evaluator_wid, caplog, (P.HEARTBEAT,))
    finally:
        third.close()
        third.srv.writer.close()


# ---------------------------------------------------------------- pscnn server --auto-resume (Compose's)

def test_auto_resume_continues_an_unfinished_run(run, server_cli, caplog):
    """A server restarted after a crash (restart: on-failure) without --resume started over:
    its first checkpoint replaced the run's.  --auto-resume continues the run instead."""
    caplog.set_level(logging.INFO, logger="pscnn.server")
    code, lines, srv = server_cli(run, "--auto-resume")
    assert code == 0 and srv is not None, lines
    assert srv.cfg.resume and srv.store.version == ROUNDS_BEFORE_STOP
    assert (srv.work.epoch, len(srv.work.applied)) == (0, 2 * ROUNDS_BEFORE_STOP)
    assert f"--auto-resume: {run} holds an unfinished run; continuing it" in caplog.messages
    assert warnings(caplog) == []


def test_auto_resume_continuing_a_run_still_tells_its_endpoint(run, server_cli, tmp_path):
    """--endpoint-file with --auto-resume: the server that continues the run is the one that writes where
    it listens (whoever started it waits for that file); the continuing server was built without it."""
    told = tmp_path / "server.endpoint"
    code, lines, srv = server_cli(run, "--auto-resume", "--endpoint-file", str(told))
    assert code == 0 and srv is not None and srv.cfg.resume, lines
    assert Path(srv.endpoint_file) == told


@pytest.mark.parametrize("folder", ["empty", "finished"])
def test_auto_resume_starts_a_new_run_where_there_is_none_unfinished(folder, finished, server_cli, tmp_path):
    out = tmp_path / "new" if folder == "empty" else finished
    code, lines, srv = server_cli(out, "--auto-resume")
    assert code == 0 and srv is not None, lines
    assert not srv.cfg.resume and srv.store.version == 0


@pytest.mark.parametrize("case", ["settings", "corrupt"])
def test_auto_resume_refusing_a_checkpoint_names_every_way_out_and_keeps_it(case, run, server_cli):
    """Compose restarts a server that exits 1 with the same settings, so it fails the same way each
    time: its one line says what differs and every way out (its variables' names too, which is what
    a Compose user sets), and the refused checkpoint is left as it was."""
    if case == "corrupt":
        (run / "checkpoint.npz").write_bytes(b"not an npz archive")
    before = (run / "checkpoint.npz").read_bytes()
    code, lines, srv = server_cli(run, "--auto-resume", *(["--batch-size", "32", "--model", "seed"]
                                                          if case == "settings" else []))
    assert code == 1 and srv is None, lines
    line = error_line("\n".join(lines), "--no-auto-resume (PSCNN_AUTO_RESUME=0)", "replacing that checkpoint",
                      "to keep it, give another --out (PSCNN_OUT)",
                      starts=f"pscnn: error: --auto-resume: cannot continue the unfinished run in {run}: ", alone=True)
    if case == "settings":
        assert "resume with --batch-size 64" in line and "resume with --model light" in line, line
    else:
        assert "not a valid .npz archive" in line, line
    assert (run / "checkpoint.npz").read_bytes() == before
    # the switch that undoes Compose's PSCNN_AUTO_RESUME=1 on the command line
    assert parse_args(["server", "--no-auto-resume"], {"PSCNN_AUTO_RESUME": "1"}).auto_resume is False


# ---------------------------------------------------------------- pscnn run --resume checks before it starts

def test_pscnn_run_resume_refuses_a_mismatch_before_starting_anything(run, capsys, mnist_file_names):
    """The same checks as the server's, made by `pscnn run` itself: one line on the terminal,
    and no server, worker or evaluator started (no logs written) only to fail in a log."""
    log = run / "logs" / "server.log"
    before = log.stat().st_mtime_ns if log.exists() else None
    code = main(["run", "--workers", "2", *FLAGS, "--seed", "5", "--out", str(run), "--resume", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "--seed 0" in err[0] and "--seed 5" in err[0], err
    assert (log.stat().st_mtime_ns if log.exists() else None) == before     # no server started


def test_pscnn_run_resume_builds_the_model_once_for_its_checks(run, monkeypatch, mnist_file_names):
    """pscnn run --resume built the model and its optimizer (server.server.checked_store) for its flags'
    checks, then again for the --resume checks (ParameterServer), which make the same ones: a model's
    random initialization twice before anything started (4-5 s each for 26 million parameters)."""
    built = counted_model_builds(monkeypatch)

    class Started(Exception):
        """Raised where the run would start its processes: its checks are over."""

    def no_cluster(*args, **kwargs):
        raise Started
    import pscnn.launcher as launcher
    monkeypatch.setattr(launcher, "LocalCluster", no_cluster)
    with pytest.raises(Started):
        main(["run", "--workers", "2", *FLAGS, "--out", str(run), "--resume", "--no-progress"])
    assert len(built) == 1, built


def test_pscnn_run_without_resume_warns_on_the_terminal_that_it_starts_over(run, capsys, monkeypatch,
                                                                           mnist_file_names):
    import pscnn.launcher as launcher
    monkeypatch.setattr(launcher, "_run", lambda *a: 0)               # the warning comes before anything starts
    assert main(["run", "--workers", "2", *FLAGS, "--out", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "pscnn run: " in err and str(run) in err and "--resume" in err, err


@pytest.mark.parametrize("changed, advice", [
    # settings --resume takes from this command: more epochs, another learning rate
    (["--epochs", "3", "--lr", "0.5"], "stop this run (Ctrl-C) and run the same command plus --resume"),
    (["--batch-size", "32", "--seed", "5"],
     "stop this run (Ctrl-C) and run pscnn run --resume with that run's settings; this command's differ (checkpoint "
     "{checkpoint} was written with --seed 0, this run has --seed 5: workers derive each batch from the seed, so the "
     "rest of epoch 1 would train on another permutation; resume with --seed 0; and it was written with --batch-size "
     "64, this run has --batch-size 32: the epoch's applied batches are batches of 64; resume with --batch-size 64)"),
])
def test_pscnn_run_starting_over_says_how_to_continue_the_earlier_run_with_its_settings(
        changed, advice, run, capsys, monkeypatch, mnist_file_names):
    """The warning advised "the same command plus --resume" when this command's settings were not the
    folder's run's, and that --resume was refused (naming each difference) only once the user had
    stopped this run and tried it."""
    import pscnn.launcher as launcher
    hints = []
    monkeypatch.setattr(launcher, "_run", lambda args, cluster, outputs, *a: hints.append(
        outputs.resume_hint(interrupted=True)) or 130)       # the server stopped at once, writing nothing
    assert main(["run", "--workers", "2", *FLAGS, *changed, "--out", str(run), "--no-progress"]) == 130
    [warning] = [line for line in capsys.readouterr().err.splitlines() if "unfinished run" in line]
    advice = advice.format(checkpoint=run / "checkpoint.npz")
    assert warning.endswith(f"to continue that run instead, {advice}"), warning
    assert hints == [f"pscnn run: stopped before this run's first update; the checkpoint of the unfinished run "
                     f"there before is kept: continue that run with {advice.split(' and run ', 1)[1]} (run folder "
                     f"{run})"]


def test_a_run_started_over_and_stopped_before_its_first_update_keeps_the_earlier_runs_checkpoint(run):
    """The warning's advice, "stop this run (Ctrl-C) and run the same command plus --resume": the
    stop wrote a checkpoint of version 0 over the unfinished run's, and that --resume went on from
    version 0, every update of that run lost."""
    with serving(run, *BOTH_IN_EVERY_ROUND) as (cluster, _clients):
        stop_with_sigterm(cluster)
    assert load_checkpoint(run / "checkpoint.npz")[1]["step"] == ROUNDS_BEFORE_STOP
    assert ("interrupted before the first update: no checkpoint written; the one there, from before this "
            "server started, stays") in cluster.log_tail("server", 5)


def test_a_run_started_over_and_stopped_before_its_first_update_leaves_the_earlier_runs_records(run):
    """Starting over emptied metrics.jsonl and replaced config.json at once: stopped before its first
    update, the earlier run's checkpoint kept for --resume, that run's step records were gone, and its
    folder held this run's records and settings beside that run's checkpoint."""
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "config.json")}
    with serving(run, *BOTH_IN_EVERY_ROUND) as (cluster, _clients):
        stop_with_sigterm(cluster)
    assert {name: (run / name).read_bytes() for name in before} == before


def test_a_run_started_over_replaces_the_earlier_runs_records_with_its_own_at_its_first_update(run):
    with serving(run, *BOTH_IN_EVERY_ROUND) as (cluster, clients):
        clients += train(cluster.endpoint, ["w0", "w1"], 1)
        stop_with_sigterm(cluster)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert records[0]["kind"] == "start" and records[0]["resumed"] is False, records[0]
    assert kinds.count("start") == 1 and kinds.count("join") == 2, kinds
    assert [r["version"] for r in records if r["kind"] == "step"] == [1], kinds
    assert json.loads((run / "config.json").read_text())["server"]["out"] == str(run)


def run_id(folder: Path) -> str:
    return load_checkpoint(folder / "checkpoint.npz")[1]["extra"].get("run_id")


def test_resume_refuses_an_earlier_runs_checkpoint_after_a_run_started_over_and_killed_before_its_own(
        run, server_cli):
    """A run started over in the folder (its first updates replaced metrics.jsonl), then gone before
    its first checkpoint (killed, or diverged): --resume took the earlier run's checkpoint for this
    run's, went on from it, and mixed the two runs' records in metrics.jsonl and the history."""
    earlier = run_id(run)
    with serving(run, *BOTH_IN_EVERY_ROUND) as (cluster, clients):
        clients += train(cluster.endpoint, ["w0", "w1"], 1)
        cluster.kill("server", signal.SIGKILL)
        cluster.wait("server", 60)
    line = refused(server_cli(run, "--resume"), "start the run again without --resume")
    (start,) = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "start"]
    assert run_id(run) == earlier != start["run_id"]
    assert f"checkpoint {run / 'checkpoint.npz'} is run {earlier}'s (version {ROUNDS_BEFORE_STOP})" in line
    assert f"last started by run {start['run_id']}" in line


def test_resume_refuses_a_distributed_runs_checkpoint_after_pscnn_train_ran_in_its_folder(run, server_cli,
                                                                                         mnist_dir):
    """pscnn train into a distributed run's folder left that run's checkpoint.npz beside its own results,
    and its start record had no run id: a later --resume there took the old checkpoint for the folder's
    run, went on from it and overwrote pscnn train's results.  pscnn train's start record has a run id."""
    from cnn_core.training import train as train_alone
    earlier = run_id(run)
    train_alone({"model": "light", "seed": 3, "train_limit": 128, "test_limit": 64, "batch_size": 64, "epochs": 1,
                 "mnist_dir": mnist_dir, "out": str(run)}, progress=False)
    (start,) = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "start"]
    assert re.fullmatch(r"[0-9a-f]{12}", start["run_id"]) and start["run_id"] != earlier, start
    line = refused(server_cli(run, "--resume"), "start the run again without --resume")
    assert f"is run {earlier}'s" in line and f"last started by run {start['run_id']}" in line, line


def test_resume_continues_the_run_whose_checkpoint_it_is_with_its_run_id(run, server_cli):
    """After a run started over and stopped before its first update, too: the folder is the earlier run's."""
    with serving(run, *BOTH_IN_EVERY_ROUND) as (cluster, _clients):
        stop_with_sigterm(cluster)
    code, lines, srv = server_cli(run, "--resume")
    assert code == 0 and srv.store.version == ROUNDS_BEFORE_STOP and srv.run_id == run_id(run), lines
    assert srv._checkpoint_extra()["run_id"] == run_id(run)


def test_a_checkpoint_without_a_run_id_is_resumed_and_given_one(run, server_cli):
    edit_meta(run, _del("extra", "run_id"))             # as pscnn wrote them before run ids
    code, lines, srv = server_cli(run, "--resume")
    assert code == 0 and srv.store.version == ROUNDS_BEFORE_STOP, lines
    assert srv._checkpoint_extra()["run_id"] == srv.run_id


def test_pscnn_run_stopped_as_its_start_over_warning_advises_says_the_earlier_run_can_go_on(run, capsys,
                                                                                           monkeypatch,
                                                                                           mnist_file_names):
    """It said "stopped before the first update, with nothing to continue; the same command starts the
    run again from the beginning", of the run it had been told to stop so as to continue it."""
    import pscnn.launcher as launcher
    hints = []
    monkeypatch.setattr(launcher, "_run", lambda args, cluster, outputs, *a: hints.append(
        outputs.resume_hint(interrupted=True)) or 130)       # the server stopped at once, writing nothing
    assert main(["run", "--workers", "2", *FLAGS, "--out", str(run), "--no-progress"]) == 130
    assert hints == [f"pscnn run: stopped before this run's first update; the checkpoint of the unfinished run "
                     f"there before is kept: continue that run with the same command plus --resume (run folder "
                     f"{run})"]


@pytest.fixture(scope="module")
def finished_run_resumed(finished, tmp_path_factory, mnist_dir) -> tuple[Path, int, str]:
    """`pscnn run --workers 2 --resume` of the finished run, in this process: (its run folder,
    exit status, stderr)."""
    out = Path(shutil.copytree(finished, tmp_path_factory.mktemp("rerun") / "run"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", "--workers", "2", *FLAGS, "--out", str(out), "--resume", "--no-progress",
                     "--mnist-dir", mnist_dir])
    return out, code, err.getvalue()


def test_pscnn_run_resuming_a_run_trained_to_its_end_starts_no_worker(finished_run_resumed):
    """Its server writes the results from the checkpoint and exits at once: the workers and the
    evaluator started all the same joined no server (in 2 of 3 tries), retried until the launcher
    stopped them 20 s later ("worker-0 had not exited 20 s after the run ended"), and the run
    exited 1."""
    out, code, err = finished_run_resumed
    assert code == 0, err
    assert "has trained its 2 epochs already" in err and "had not exited" not in err, err
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["server.log"]
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"


def test_a_resumed_run_trained_to_its_end_has_no_start_barrier(finished_run_resumed, finished, tmp_path):
    """It hands out no work: its log said "handing out no work until 2 trainers ask for it" and
    pscnn run's bar "waiting for the workers: 0 of 2 ready", for a run that starts no worker."""
    out, code, err = finished_run_resumed
    assert code == 0, err
    resumed_log = (out / "logs" / "server.log").read_text().split("==== ")[-1]
    assert "resumed from" in resumed_log and "handing out no work" not in resumed_log, resumed_log
    server = InProcess(Path(shutil.copytree(finished, tmp_path / "run")), mode="sync", epochs=2, test_limit=256,
                       resume=True, checkpoint_every=0, wait_for_workers=2)
    try:
        assert server.srv.progress()["started"] is True
    finally:
        server.close()
        server.srv.writer.close()


def test_a_resumed_finished_run_stopped_by_pscnn_run_logs_no_interruption(finished_run_resumed):
    """pscnn run stops its server once the results are written (it lingers for clients, and pscnn
    run starts none): its log said "interrupted after the run finished: no checkpoint written"."""
    out, code, err = finished_run_resumed
    assert code == 0, err
    resumed_log = (out / "logs" / "server.log").read_text().split("==== ")[-1]
    assert "interrupted" not in resumed_log, resumed_log
    assert resumed_log.rstrip().endswith("stopped while waiting for clients: the run had finished already, "
                                         "and its results are written"), resumed_log


def test_a_resumed_run_trained_to_its_end_is_said_so_not_as_an_epoch_with_nothing_applied(finished_run_resumed):
    """Its log said "resumed from ...: version 10, epoch 2 with 0/10 batches applied" (epochs
    counted from 0): an epoch past the run's two, with nothing trained."""
    out, code, err = finished_run_resumed
    assert code == 0, err
    resumed_log = (out / "logs" / "server.log").read_text().split("==== ")[-1]
    assert f"resumed from {out / 'checkpoint.npz'}: version 10, every epoch trained already\n" in resumed_log, \
        resumed_log


def test_a_server_resuming_a_finished_run_tells_the_clients_started_with_it_that_it_is_over(finished, tmp_path,
                                                                                            mnist_dir, capsys):
    """`pscnn server --resume` of a finished run, on its own (Compose's PSCNN_RESUME=1): it wrote
    the results and exited at once, so the workers started with it found no server and retried
    for --give-up-after (600 s), then exited 1.  It lingers --peer-timeout after writing them, as
    a server that finished the run itself does for its clients: they are told the run is over and
    exit 0."""
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    (out / "summary.json").unlink()                   # written again: the sign the results are
    cluster = LocalCluster(out)
    try:
        cluster.start_server([*FLAGS, "--out", str(out), "--resume", "--mnist-dir", mnist_dir,
                              "--peer-timeout", "60"])
        deadline = time.monotonic() + 60
        while not (out / "summary.json").exists() and cluster.procs["server"].poll() is None:
            assert time.monotonic() < deadline, cluster.log_tail("server", 30)
            time.sleep(0.1)
        assert main(["worker", "--server", cluster.endpoint, "--compute-ms", "0", "--give-up-after", "5"]) == 0, \
            capsys.readouterr().err
        assert main(["evaluator", "--server", cluster.endpoint, "--mnist-dir", mnist_dir, "--test-limit", "256",
                     "--give-up-after", "5"]) == 0, capsys.readouterr().err
        assert json.loads((out / "summary.json").read_text())["status"] == "complete"
    finally:
        cluster.close()


def test_a_resumed_run_whose_checkpoint_holds_its_final_evaluation_says_it_waits_for_none(finished, tmp_path,
                                                                                        caplog):
    """It writes its results at once: its log said "no evaluator connected; waiting up to 120 s for one"."""
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    server = InProcess(out, mode="sync", epochs=2, test_limit=256, resume=True, checkpoint_every=0)
    try:
        # pscnn run's bar said "waiting for the final evaluation" while it wrote the results
        assert server.srv.progress()["final_evaluation"] is True
        with caplog.at_level(logging.INFO, logger="pscnn.server"):
            server.srv._finish(time.monotonic())       # (then lingers for the clients started with it)
    finally:
        server.close()
        server.srv.writer.close()
    assert server.srv.summary_written, "the results were not written at once"
    assert not [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]


def test_a_finished_run_resumed_with_another_lr_keeps_the_settings_that_trained_it(finished, tmp_path, caplog):
    """Nothing trains in a resumed finished run: the warning said "training continues with this run's"
    settings, and summary.json (and config.json) named the new lr as the run's optimizer."""
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    trained_with = load_checkpoint(out / "checkpoint.npz")[1]["optimizer"]
    assert trained_with["lr"] != 0.01
    with caplog.at_level(logging.INFO, logger="pscnn.server"):
        server = InProcess(out, mode="sync", epochs=2, test_limit=256, resume=True, checkpoint_every=0,
                           optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.9})
    try:
        server.srv._finish(time.monotonic())
    finally:
        server.close()
        server.srv.writer.close()
    (warning,) = warnings(caplog)
    assert f"lr {trained_with['lr']} -> 0.01" in warning and "training continues" not in warning, warning
    assert warning.endswith("the run has trained its 2 epochs already, so nothing trains with them; its results "
                            "keep the settings that trained it"), warning
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer"] == trained_with and summary["config"]["optimizer"] == trained_with
    assert json.loads((out / "config.json").read_text())["server"]["optimizer"] == trained_with


def test_a_final_evaluation_logged_after_the_checkpoint_is_not_logged_again_by_the_server(finished, tmp_path,
                                                                                        mnist_dir):
    """Killed after the final evaluation was logged, before the checkpoint that holds it: the
    resumed server, with no evaluator, scores the final weights itself, and logged that version's
    final evaluation a second time."""
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    (out / "summary.json").unlink()
    edit_meta(out, lambda meta: meta["extra"].update(
        final_eval=None, evaluations=[e for e in meta["extra"]["evaluations"] if not e["final"]]))
    server = InProcess(out, mode="sync", epochs=2, test_limit=256, resume=True, checkpoint_every=0,
                       final_eval_timeout=0, mnist_dir=mnist_dir)
    try:
        server.srv._finish(time.monotonic())       # (then lingers for the clients started with it)
    finally:
        server.close()
        server.srv.writer.close()
    assert server.srv.summary_written, "the results were not written at once"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] is not None
    assert [(e["version"], e["final"]) for e in eval_lines(out)].count((summary["updates"], True)) == 1


def test_the_final_weights_are_written_before_the_summary_that_says_the_run_is_finished(finished, tmp_path,
                                                                                       monkeypatch):
    """summary.json marks the run finished; a server killed between it and model.npz left a finished
    run without its final weights (or with an earlier run's, in a folder used before)."""
    import server.results as results_module
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    (out / "summary.json").unlink()
    (out / "model.npz").unlink()
    summary_before_model = []
    save = results_module.save_model_checkpoint

    def save_and_look(path, *args, **kwargs):
        summary_before_model.append((out / "summary.json").exists())
        return save(path, *args, **kwargs)
    monkeypatch.setattr(results_module, "save_model_checkpoint", save_and_look)
    server = InProcess(out, mode="sync", epochs=2, test_limit=256, resume=True, checkpoint_every=0)
    try:
        server.srv._finish(time.monotonic())       # (then lingers for the clients started with it)
    finally:
        server.close()
        server.srv.writer.close()
    assert (out / "summary.json").exists() and (out / "model.npz").exists()
    assert summary_before_model[-1] is False        # the last save: model.npz (checkpoints come first)
