"""Metrics against hand-computed confusion matrices, and evaluate() on a real model."""
import json
import math
import warnings

import numpy as np
import pytest

from cnn_core.errors import ConfigError, ShapeError
from cnn_core.losses import softmax_cross_entropy
from cnn_core.metrics import (RunningMean, accuracy, confusion_matrix, evaluate, per_class_accuracy,
                              precision_recall, thin_evaluations, time_to_accuracy)
from cnn_core.model import build_model
from helpers import new_bests

# 3 classes, 8 samples.  Class 2 is never predicted; pairs (true, pred):
# (0,0) (0,0) (0,1) (1,1) (1,1) (1,0) (2,1) (2,0)
Y_TRUE = np.array([0, 0, 0, 1, 1, 1, 2, 2])
Y_PRED = np.array([0, 0, 1, 1, 1, 0, 1, 0])
CM = [[2, 1, 0],
      [1, 2, 0],
      [1, 1, 0]]


def test_accuracy_from_labels_and_logits():
    assert accuracy(Y_PRED, Y_TRUE) == 4 / 8
    logits = np.eye(3)[Y_PRED] * 5.0 - 1.0          # argmax == Y_PRED
    assert accuracy(logits, Y_TRUE) == 0.5
    assert accuracy(np.array([1, 2]), np.array([1, 2])) == 1.0
    assert isinstance(accuracy(Y_PRED, Y_TRUE), float)


def test_accuracy_errors():
    with pytest.raises(ShapeError, match="3 predictions for 2 labels"):
        accuracy(np.array([0, 1, 2]), np.array([0, 1]))
    with pytest.raises(ShapeError, match="no samples"):
        accuracy(np.zeros(0, dtype=int), np.zeros(0, dtype=int))
    with pytest.raises(ShapeError, match="must hold integer labels"):
        accuracy(np.array([0.0, 1.0]), np.array([0, 1]))


def test_confusion_matrix_hand_computed():
    cm = confusion_matrix(Y_TRUE, Y_PRED, num_classes=3)
    assert cm.dtype == np.int64 and cm.shape == (3, 3)
    assert cm.tolist() == CM
    # Default 10 classes: the same counts in the top-left corner, zeros elsewhere.
    cm10 = confusion_matrix(Y_TRUE, Y_PRED)
    assert cm10.shape == (10, 10) and cm10[:3, :3].tolist() == CM and cm10.sum() == 8
    assert confusion_matrix(np.zeros(0, dtype=int), np.zeros(0, dtype=int), 2).tolist() == [[0, 0], [0, 0]]


def test_confusion_matrix_matches_a_loop():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 10, 500), rng.integers(0, 10, 500)
    expected = np.zeros((10, 10), dtype=np.int64)
    for t, q in zip(y, p, strict=True):
        expected[t, q] += 1
    np.testing.assert_array_equal(confusion_matrix(y, p), expected)


@pytest.mark.parametrize("args, error, message", [
    ((Y_TRUE, Y_PRED[:-1], 3), ShapeError, "y_true has 8 labels but y_pred has 7"),
    ((Y_TRUE, Y_PRED, 2), ShapeError, r"y_true holds label 2 outside \[0, 2\)"),
    ((Y_TRUE, -Y_PRED, 3), ShapeError, r"y_pred holds label -1 outside \[0, 3\)"),
    ((Y_TRUE.reshape(2, 4), Y_PRED.reshape(2, 4), 3), ShapeError, "y_true must be 1-d"),
    ((Y_TRUE, Y_PRED, 0), ConfigError, "num_classes must be a positive integer"),
])
def test_confusion_matrix_errors(args, error, message):
    with pytest.raises(error, match=message):
        confusion_matrix(*args)


def test_per_class_accuracy_and_precision_recall():
    cm = np.array(CM)
    np.testing.assert_allclose(per_class_accuracy(cm), [2 / 3, 2 / 3, 0.0])
    precision, recall = precision_recall(cm)
    # columns: predicted 0 -> 2 of 4 right, predicted 1 -> 2 of 4, class 2 never predicted -> 0
    np.testing.assert_allclose(precision, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(recall, [2 / 3, 2 / 3, 0.0])


def test_empty_classes_give_zero_without_warnings():
    cm = np.array([[3, 0, 0], [0, 0, 0], [1, 0, 0]])   # class 1: no samples, never predicted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acc = per_class_accuracy(cm)
        precision, recall = precision_recall(cm)
    np.testing.assert_allclose(acc, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(precision, [0.75, 0.0, 0.0])
    np.testing.assert_allclose(recall, [1.0, 0.0, 0.0])
    with pytest.raises(ShapeError, match="must be square"):
        precision_recall(np.zeros((2, 3)))


@pytest.mark.parametrize("cm, message", [
    (np.array([[1.5, 0], [0, 2]]), "must hold integer counts, got dtype float64"),
    (np.array([[3, -1], [0, 2]]), r"holds a negative count \(-1\)"),
])
def test_confusion_matrix_counts_are_checked(cm, message):
    for rates in (per_class_accuracy, precision_recall):
        with pytest.raises(ShapeError, match=message):
            rates(cm)


def test_no_labels_give_an_empty_confusion_matrix():
    """Empty lists are labels too (np.asarray([]) is float64, which read as a wrong dtype)."""
    assert confusion_matrix([], [], 2).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ShapeError, match="no samples"):
        accuracy([], [])


def test_running_mean():
    m = RunningMean()
    assert math.isnan(m.mean) and m.count == 0
    m.update(2.0, count=3)
    m.update(4.0)
    assert m.mean == 2.5 and m.count == 4
    m.update(np.float32(10.0), count=0)              # an empty batch changes nothing
    assert m.mean == 2.5
    m.reset()
    assert m.count == 0 and math.isnan(m.mean)
    with pytest.raises(ConfigError, match="count must be a non-negative integer"):
        m.update(1.0, count=-1)


def test_a_reset_running_mean_starts_over():
    m = RunningMean()
    m.update(10.0, count=5)
    m.reset()
    m.update(2.0, count=2)
    assert m.mean == 2.0 and m.count == 2


class FixedLogits:
    """A stand-in model returning preset logits, to check evaluate's bookkeeping exactly."""

    xp = np

    def __init__(self, logits):
        self.logits = logits
        self.batches = []

    def forward(self, x, train=True):
        assert train is False
        idx = x[:, 0, 0, 0].astype(int)                 # each input carries its own index
        self.batches.append(len(idx))
        return self.logits[idx]


def test_evaluate_hand_computed_with_batches():
    logits = np.eye(3)[Y_PRED] * 2.0                    # predicts Y_PRED
    x = np.arange(8, dtype=np.float32).reshape(8, 1, 1, 1)
    model = FixedLogits(logits)
    result = evaluate(model, x, Y_TRUE, batch_size=3)
    assert model.batches == [3, 3, 2]
    expected_loss = softmax_cross_entropy(logits, Y_TRUE)[0]
    # Per sample: -log softmax = log(e^2 + 2) - (2 if right else 0)
    by_hand = np.mean([math.log(math.exp(2) + 2) - (2.0 if t == p else 0.0)
                       for t, p in zip(Y_TRUE, Y_PRED, strict=True)])
    assert result["loss"] == pytest.approx(by_hand, rel=1e-12)
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-12)
    assert result["accuracy"] == 0.5 and result["count"] == 8
    assert result["confusion_matrix"] == CM
    assert result["per_class_accuracy"] == pytest.approx([2 / 3, 2 / 3, 0.0])
    assert result["precision"] == pytest.approx([0.5, 0.5, 0.0])
    assert result["recall"] == pytest.approx([2 / 3, 2 / 3, 0.0])
    json.dumps(result)                                   # plain Python types only
    assert all(type(v) is float for v in result["precision"])
    assert type(result["confusion_matrix"][0][0]) is int


def test_evaluate_calls_between_batches_after_each_batch():
    model = FixedLogits(np.eye(3)[Y_PRED])
    seen = []
    evaluate(model, np.arange(8, dtype=np.float32).reshape(8, 1, 1, 1), Y_TRUE, batch_size=3,
             between_batches=lambda: seen.append(len(model.batches)))
    assert seen == [1, 2, 3]


def test_evaluate_real_model_matches_direct_computation():
    model = build_model("light", seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 50)
    result = evaluate(model, x, y, batch_size=16)
    logits = model.forward(x, train=False)
    loss, _ = softmax_cross_entropy(logits, y)
    assert result["count"] == 50
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["accuracy"] == accuracy(logits, y)
    assert result["confusion_matrix"] == confusion_matrix(y, logits.argmax(axis=1)).tolist()
    assert len(result["per_class_accuracy"]) == 10


def test_evaluate_errors():
    model = FixedLogits(np.zeros((4, 3)))
    x = np.zeros((4, 1, 1, 1), dtype=np.float32)
    with pytest.raises(ShapeError, match="4 inputs but 3 labels"):
        evaluate(model, x, np.zeros(3, dtype=int))
    with pytest.raises(ShapeError, match="no samples"):
        evaluate(model, x[:0], np.zeros(0, dtype=int))
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        evaluate(model, x, np.zeros(4, dtype=int), batch_size=0)
    for bad, kind in ((3.0, "float"), (None, "NoneType"), (np.float32(1), "float32"), (np.array(1.0), "ndarray")):
        with pytest.raises(ShapeError, match=f"evaluate: inputs must be an \\(N, C, H, W\\) array, got a {kind}"):
            evaluate(model, bad, np.zeros(1, dtype=int))      # was TypeError: ... has no len()


@pytest.mark.gpu
def test_evaluate_on_gpu_matches_cpu():
    from cnn_core.backend import cupy_module
    if cupy_module() is None:
        pytest.skip("needs CuPy and a CUDA device")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 40)
    cpu = evaluate(build_model("light", seed=0), x, y, batch_size=16)
    gpu = evaluate(build_model("light", seed=0, device="gpu"), x, y, batch_size=16)
    json.dumps(gpu)
    assert gpu["count"] == 40 and np.sum(gpu["confusion_matrix"]) == 40
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-4)
    # float32 on two devices: allow one near-tied argmax to flip.
    assert abs(gpu["accuracy"] - cpu["accuracy"]) <= 1 / 40


def test_time_to_accuracy_is_the_first_evaluation_at_or_above_each_milestone():
    history = [{"seconds": 3.5, "version": 0, "test_accuracy": 0.06},
               {"seconds": 16.5, "version": 300, "test_accuracy": 0.9764},     # 90% and 95% at once
               {"seconds": 29.3, "version": 560, "test_accuracy": 0.98},        # exactly 98%: reached
               {"seconds": 42.0, "version": 820, "test_accuracy": None},        # a NaN, stored as null
               {"seconds": 54.7, "version": 1070, "test_accuracy": 0.9750},     # a dip changes nothing
               {"seconds": 67.2, "version": 1170, "test_accuracy": 0.9914},
               {"seconds": 77.7, "version": 1407, "test_accuracy": 0.9915}]
    assert time_to_accuracy(history) == {"0.9": {"seconds": 16.5, "version": 300},
                                         "0.95": {"seconds": 16.5, "version": 300},
                                         "0.98": {"seconds": 29.3, "version": 560},
                                         "0.99": {"seconds": 67.2, "version": 1170}}
    assert list(time_to_accuracy(history)) == ["0.9", "0.95", "0.98", "0.99"]
    assert time_to_accuracy(history[:3], milestones=(0.5, 0.99)) == {"0.5": {"seconds": 16.5, "version": 300}}
    assert time_to_accuracy([]) == {}
    json.dumps(time_to_accuracy(history), allow_nan=False)


def test_time_to_accuracy_counts_numpy_accuracies():
    # A float32 accuracy was taken for "not a number" and skipped: the milestone read as never reached.
    history = [{"seconds": 1.0, "version": 10, "test_accuracy": np.float32(0.96)},
               {"seconds": 2.0, "version": 20, "test_accuracy": np.float64(0.99)}]
    assert time_to_accuracy(history) == {"0.9": {"seconds": 1.0, "version": 10},
                                         "0.95": {"seconds": 1.0, "version": 10},
                                         "0.98": {"seconds": 2.0, "version": 20},
                                         "0.99": {"seconds": 2.0, "version": 20}}


def test_time_to_accuracy_skips_an_infinite_accuracy():
    history = [{"seconds": 1.0, "version": 10, "test_accuracy": math.inf},
               {"seconds": 2.0, "version": 20, "test_accuracy": 0.92}]
    assert time_to_accuracy(history) == {"0.9": {"seconds": 2.0, "version": 20}}


def _week_of_evaluations(count: int, seed: int = 0) -> list[dict]:
    """``count`` records as a server's history holds them: one per 10 s, each timed when its weights
    were pulled (a slower second evaluator's come in late: seconds out of order), accuracy climbing
    to ~99% with noise, a diverged dip scored as None-less NaN loss aside; the last one final."""
    rng = np.random.default_rng(seed)
    history = []
    for i in range(count):
        accuracy = 0.991 - 0.89 * math.exp(-i / 300) + rng.normal(0, 0.002)
        history.append({"seconds": round(max(0.0, 10.0 * i - rng.uniform(0, 25)), 3), "version": 7 * i,
                        "test_accuracy": float(np.clip(round(accuracy, 4), 0, 1)), "test_loss": 0.05,
                        "final": False})
    history[-1]["final"] = True
    return history


def _by_time(history: list[dict]) -> list[dict]:
    return sorted(history, key=lambda e: e["seconds"])


def test_a_thinned_history_keeps_the_bests_the_finals_the_newest_and_the_time_to_accuracy():
    """The server kept every evaluation record: a week at one per 10 s is 60,000 of them, megabytes
    of JSON in every checkpoint.  Thinned to the cap, at once (an old checkpoint's) or a record at
    a time (the server's), a history keeps, in order, every record that set a new best (so the time
    to each accuracy is the same), the final one, the newest, and the rest spread over the run."""
    full = _week_of_evaluations(60_000)
    streamed: list[dict] = []
    for record in full:
        streamed.append(record)
        if len(streamed) > 1000:
            streamed = thin_evaluations(streamed, cap=1000, newest=100)
    for thinned in (thin_evaluations(full, cap=1000, newest=100), streamed):
        assert 500 <= len(thinned) <= 1000      # stretches twice as long as fit keep half the room at least
        assert time_to_accuracy(_by_time(thinned)) == time_to_accuracy(_by_time(full))
        assert len(time_to_accuracy(_by_time(full))) == 4          # every milestone is there to keep
        place = {id(e): i for i, e in enumerate(full)}
        assert [place[id(e)] for e in thinned] == sorted(place[id(e)] for e in thinned)     # in order
        kept = {id(e) for e in thinned}
        assert all(id(e) in kept for e in new_bests(full)) and thinned[-100:] == full[-100:]
        seconds = [e["seconds"] for e in _by_time(thinned)]
        # spread: no stretch of the week without a record (a stretch is ~700 s here)
        assert seconds[0] == 0.0 and max(b - a for a, b in zip(seconds, seconds[1:])) < 3_000
    assert thin_evaluations(full[:1000], cap=1000, newest=100) == full[:1000]


def test_a_history_of_ever_better_reports_is_bounded_and_keeps_its_time_to_accuracy():
    """Bests alone can pass the cap (a hostile evaluator reports each a hair better than the last):
    they are spread over the run too, but the first at each milestone stays."""
    full = [{"seconds": float(i), "version": i, "test_accuracy": 0.1 + 0.9 * i / 5000, "test_loss": None,
             "final": False} for i in range(5000)]
    full[2500]["test_accuracy"] = math.nan      # not a number: never a best
    thinned = thin_evaluations(full, cap=200, newest=20)
    assert len(thinned) <= 200 and thinned[-20:] == full[-20:]
    assert time_to_accuracy(thinned) == time_to_accuracy(full) != {}


def _records(seconds, accuracies, finals=()):
    return [{"seconds": float(s), "version": i, "test_accuracy": a, "final": i in finals}
            for i, (s, a) in enumerate(zip(seconds, accuracies, strict=True))]


def test_a_thinned_history_keeps_a_final_record_that_is_neither_newest_nor_best():
    # A final evaluation (of a run that was resumed since) is kept wherever it lies.
    full = _records(range(10), [0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], finals=(3,))
    assert [e["version"] for e in thin_evaluations(full, cap=3, newest=1)] == [0, 3, 9]


def test_a_thinned_history_keeps_every_best_when_the_bests_exactly_fit():
    # bests 0-3 fill the room the newest leaves; 2 and 1 share a second, yet both stay.
    full = _records([0, 1, 1, 2, 0.5, 4], [0.1, 0.2, 0.3, 0.4, 0.05, 0.04])
    assert [e["version"] for e in thin_evaluations(full, cap=5, newest=1)] == [0, 1, 2, 3, 5]


def test_a_thinned_history_does_not_count_a_tie_as_a_new_best():
    full = _records(range(6), [0.5, 0.5, 0.5, 0.5, 0.5, 0.1])
    # only record 0 set a best: of the ties, the spread keeps the earliest
    assert [e["version"] for e in thin_evaluations(full, cap=3, newest=1)] == [0, 1, 5]
