"""worker.trainer.Trainer without sockets: what a step (real or synthetic, --compute-ms) pushes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cnn_core import memory
from cnn_core.data import batch_index
from cnn_core.errors import ConfigError, DataError
from cnn_core.model import build_model
from pscnn import protocol as P
from worker.client import STALL_S, BadReply
from worker.trainer import Trainer


def welcome(model: str, **over) -> P.Message:
    spec = build_model(model).spec
    run = {"seed": 0, "batch_size": 64, "num_samples": 640, "epochs": 1, "mode": "async", "test_limit": 0, **over}
    return P.Message(P.WELCOME, body={"worker_id": "w", "role": "trainer", "model": spec, "run": run,
                                      "incarnation": "x", "heartbeat_s": 1.0})


def test_synthetic_steps_push_one_read_only_zero_buffer_in_the_model_layout():
    trainer = Trainer(SimpleNamespace(wid="w-1"), compute_ms=0.0)
    trainer.setup(welcome("light"))
    task = {"epoch": 0, "batch": 9, "version": 0, "lease": 1}
    result, first = trainer.compute(task)
    _, second = trainer.compute({**task, "batch": 3})
    assert result["count"] == 64 and result["loss"] == 0.0
    assert second is first                              # built once, not allocated per step
    assert first.specs == P.model_layout(trainer.model)
    assert not first.flat.flags.writeable and not first.flat.any()
    frames = P.encode(P.Message(P.PUSH, "w", 1, {**{k: task[k] for k in ("epoch", "batch", "lease")},
                                                 "base_version": 0, "loss": 0.0, "correct": 0, "count": 64,
                                                 "timing": {"compute_s": 0.0}}, first))
    assert np.shares_memory(np.asarray(frames[1]), first.flat)    # sent as is, no copy

    trainer.setup(welcome("seed"))                      # a server with another model: a new buffer
    _, third = trainer.compute(task)
    assert third.specs == P.model_layout(trainer.model) and third.flat.size > first.flat.size


def test_a_batch_gradient_depends_on_the_weights_and_the_batch_not_the_worker(mnist_dir):
    """Dropout masks are seeded from (run seed, epoch, batch): two workers with different
    histories push bit-identical gradients for the same batch, so a sync round's sum does
    not depend on which worker computed which batch."""
    trainers = []
    for wid in ("w-a", "w-b"):
        t = Trainer(SimpleNamespace(wid=wid), mnist_dir=mnist_dir)
        t.setup(welcome("light"))
        trainers.append(t)
    a, b = trainers
    a.compute({"epoch": 0, "batch": 3})                 # a's dropout stream has moved on; b's has not
    task = {"epoch": 0, "batch": 5}
    (result_a, push_a), (result_b, push_b) = a.compute(task), b.compute(task)
    assert result_a["loss"] == result_b["loss"]
    np.testing.assert_array_equal(push_a.flat, push_b.flat)
    _, other_epoch = b.compute({"epoch": 1, "batch": 5})  # other images, other masks
    assert not np.array_equal(push_a.flat, other_epoch.flat)


def test_a_short_last_batch_is_counted_as_it_is_in_synthetic_steps():
    trainer = Trainer(SimpleNamespace(wid="w-1"), compute_ms=0.0)
    trainer.setup(welcome("light", num_samples=100))
    task = {"epoch": 0, "batch": 0, "version": 0, "lease": 1}
    assert trainer.compute(task)[0]["count"] == 64
    assert trainer.compute({**task, "batch": 1})[0]["count"] == 36     # 100 = 64 + 36


def test_a_batch_is_its_slice_of_the_epochs_permutation_of_the_runs_seed():
    """The worker derives a batch's images itself, so it must use the permutation of the task's
    epoch, and that of a restarted server's seed once it joined it."""
    trainer = Trainer(SimpleNamespace(wid="w-1"), compute_ms=0.0)
    trainer.setup(welcome("light"))
    n = trainer.run["num_samples"]
    trainer.data = (np.arange(n), np.arange(n))         # image i is i
    for epoch, batch in [(0, 0), (0, 9), (1, 0), (1, 4), (0, 4)]:
        x, y = trainer.batch(epoch, batch)
        np.testing.assert_array_equal(x, batch_index(n, 64, 0, epoch)[batch])
        np.testing.assert_array_equal(y, x)
    trainer.setup(welcome("light", seed=7))             # the same model and size: the data stays
    np.testing.assert_array_equal(trainer.batch(0, 4)[0], batch_index(n, 64, 7, 0)[4])      # epoch 0 again


def test_a_step_reports_its_batch_size_and_its_correct_predictions(mnist_dir):
    trainer = Trainer(SimpleNamespace(wid="w-1"), mnist_dir=mnist_dir)
    trainer.setup(welcome("light", num_samples=100))
    result, _ = trainer.compute({"epoch": 0, "batch": 1})
    xb, yb = trainer.batch(0, 1)
    trainer.model.reseed((0, 0, 1))                     # the same dropout masks: the same logits
    _, logits, _ = trainer.model.loss_and_grads(xb, yb)
    assert result["count"] == len(yb) == 36
    assert result["correct"] == int((logits.argmax(axis=1) == yb).sum())


def test_a_run_of_another_size_reloads_the_training_set_and_one_larger_than_mnist_is_refused(mnist_dir):
    trainer = Trainer(SimpleNamespace(wid="w-1"), mnist_dir=mnist_dir)
    trainer.setup(welcome("light", num_samples=640))
    trainer.setup(welcome("light", num_samples=320))   # a restarted server trains on fewer images
    assert len(trainer.data[0]) == len(trainer.data[1]) == 320
    with pytest.raises(DataError, match="trains on 60001 images, but this worker's MNIST training set has 60000"):
        trainer.setup(welcome("light", num_samples=60001))


def test_a_batch_of_the_server_that_this_machine_cannot_hold_is_refused_before_the_data_loads(monkeypatch):
    """The server's batch size against this worker's memory (the server cannot know it): one line
    before the training set loads (MNIST_DIR names nothing here), not a MemoryError at the first
    batch; a synthetic trainer (--compute-ms), which computes nothing, is not checked."""
    monkeypatch.setattr(memory, "available_memory", lambda: 1)
    trainer = Trainer(SimpleNamespace(wid="w-1"), mnist_dir="/nonexistent/mnist")
    with pytest.raises(ConfigError, match=r"^the server's batch size 64: a training step on 64 images would take "
                                          r"an estimated [0-9.]+ GB of memory \(layer '[a-z0-9]+' the most"):
        trainer.setup(welcome("light"))
    Trainer(SimpleNamespace(wid="w-1"), compute_ms=0.0).setup(welcome("light"))
    # --no-memory-check: past the check, to the training set that is not there
    with pytest.raises(DataError):
        Trainer(SimpleNamespace(wid="w-1"), mnist_dir="/nonexistent/mnist", check_memory=False).setup(welcome("light"))


def test_a_rejoin_to_the_same_model_and_batch_is_not_checked_against_memory_again(monkeypatch, mnist_dir):
    """A rejoin to the run it trained in has run here, and MemAvailable no longer counts the data
    and weights this worker holds: not refused then; a new batch size is checked again."""
    trainer = Trainer(SimpleNamespace(wid="w-1"), mnist_dir=mnist_dir)
    trainer.setup(welcome("light"))
    monkeypatch.setattr(memory, "available_memory", lambda: 1)
    trainer.setup(welcome("light", seed=7))
    with pytest.raises(ConfigError, match="^the server's batch size 128: "):
        trainer.setup(welcome("light", batch_size=128))


BN_SPEC = {"input_shape": [1, 28, 28], "layers": [
    {"type": "conv2d", "name": "conv1", "out_channels": 2, "kernel": 3, "padding": 1},
    {"type": "batchnorm2d", "name": "bn1"}, {"type": "relu"}, {"type": "flatten"},
    {"type": "dense", "name": "fc1", "units": 10}]}


def test_a_push_carries_the_batchnorm_statistics_after_the_gradients():
    """The server adopts the workers' BatchNorm statistics (it has no data to compute them):
    without them in the push, it would evaluate and checkpoint the initial ones."""
    trainer = Trainer(SimpleNamespace(wid="w-1"), compute_ms=0.0)
    trainer.setup(welcome(BN_SPEC))
    _, push = trainer.compute({"epoch": 0, "batch": 0, "version": 0, "lease": 1})
    assert push.specs == P.model_layout(trainer.model)
    assert list(push)[-2:] == ["bn1.running_mean", "bn1.running_var"]
    np.testing.assert_array_equal(push["bn1.running_var"], trainer.model.state["bn1.running_var"])


def test_a_model_with_fewer_outputs_than_the_labels_is_refused(mnist_dir):
    spec = {"input_shape": [1, 28, 28], "layers": [{"type": "flatten"}, {"type": "dense", "units": 5}]}
    trainer = Trainer(SimpleNamespace(wid="w-1"), mnist_dir=mnist_dir)
    with pytest.raises(BadReply, match="the server's model has 5 outputs, but the labels go up to 9"):
        trainer.setup(welcome(spec))


# Computes one batch of random images, stopping itself (SIGSTOP) in the middle; prints its push's
# compute_s and the computation's wall time once continued.
STOPPED_WHILE_COMPUTING = """
import json, logging, os, signal, sys, time
from types import SimpleNamespace
import numpy as np
sys.path.insert(0, "tests")
from test_trainer import welcome
from worker.trainer import Trainer

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
trainer = Trainer(SimpleNamespace(wid="w-1"), compute_ms=0.0)
trainer.setup(welcome("light"))
trainer.compute_ms = None                           # the real computation, on these images
rng = np.random.default_rng(0)
trainer.data = (rng.random((640, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 640))
loss_and_grads = trainer.model.loss_and_grads

def stopped_midway(x, y):
    os.kill(os.getpid(), signal.SIGSTOP)
    return loss_and_grads(x, y)

trainer.model.loss_and_grads = stopped_midway
t0 = time.perf_counter()
result, _ = trainer.compute({"epoch": 0, "batch": 1})
print(json.dumps({"compute_s": result["compute_s"], "wall_s": time.perf_counter() - t0}))
"""


def test_a_trainer_stopped_while_it_computes_does_not_count_the_stop_as_computing():
    """A trainer stopped (SIGSTOP, Ctrl-Z) in the middle of a batch reported the whole stop as its
    compute_s: a 3-s stop of a worker computing 0.1-s batches gave a step record "compute_s": 3.09.
    Stopped here for longer than STALL_S, its push reports the computation without the stop."""
    stop_s = STALL_S + 1.0
    child = subprocess.Popen([sys.executable, "-c", STOPPED_WHILE_COMPUTING], cwd=Path(__file__).resolve().parents[1],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, status = os.waitpid(child.pid, os.WUNTRACED)       # until it stops itself (or exits: a failure)
        assert os.WIFSTOPPED(status), child.communicate(timeout=30)
        time.sleep(stop_s)                  # how long it stays stopped, not a measurement
        os.kill(child.pid, signal.SIGCONT)
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err[-3000:]
        timing = json.loads(out)
        assert timing["wall_s"] >= stop_s, timing      # the stop fell inside the computation
        assert timing["compute_s"] < stop_s, (timing, err[-3000:])
        assert "did not run for" in err and "not counted as computing" in err, err[-3000:]
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGCONT)
            child.kill()
            child.wait(10)


def _busy(seconds: float) -> None:
    """Use this process's CPU for ``seconds`` of its own time."""
    started = time.process_time()
    while time.process_time() - started < seconds:
        pass


@pytest.mark.parametrize("device, computing", [
    ("cpu", _busy),             # a batch of a big model, or on a slow CPU: it runs all along
    ("gpu", time.sleep),        # the host waits on the device without using its CPU
    ("cpu", None),              # --compute-ms: the synthetic computation sleeps
])
def test_a_computation_longer_than_a_stall_counts_whole(device, computing):
    """The pause a trainer leaves out of compute_s (it did not run: stopped, suspended) is wall time
    beyond its CPU time and --compute-ms's sleep, on the CPU only.  A computation that ran, waited on
    the GPU, or slept for --compute-ms longer than STALL_S is computing, and must count whole."""
    last_s = STALL_S + 0.3
    trainer = Trainer(SimpleNamespace(wid="w-1"), compute_ms=0.0)
    trainer.setup(welcome("light"))
    trainer.device = device             # (the model stays on the CPU: only the accounting differs)
    if computing is None:
        trainer.compute_ms = last_s * 1000
    else:
        trainer.compute_ms = None
        rng = np.random.default_rng(0)
        trainer.data = (rng.random((640, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 640))
        loss_and_grads = trainer.model.loss_and_grads

        def long_computation(x, y):
            computing(last_s)
            return loss_and_grads(x, y)
        trainer.model.loss_and_grads = long_computation
    result, _ = trainer.compute({"epoch": 0, "batch": 1})
    assert result["compute_s"] >= last_s, result
