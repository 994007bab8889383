"""worker.trainer.Trainer without sockets: what a step (real or synthetic, --compute-ms) pushes."""
from types import SimpleNamespace

import numpy as np

from cnn_core.model import build_model
from pscnn import protocol as P
from worker.trainer import Trainer


def welcome(model: str) -> P.Message:
    spec = build_model(model).spec
    run = {"seed": 0, "batch_size": 64, "num_samples": 640, "epochs": 1, "mode": "async", "test_limit": 0}
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
