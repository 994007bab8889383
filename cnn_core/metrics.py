"""Classification metrics: accuracy, confusion matrix, per-class scores, evaluation.

Inputs may be NumPy or CuPy arrays; results are Python floats / NumPy arrays
(and plain lists in :func:`evaluate`, which is JSON-ready).  Classes with no
samples score 0 rather than NaN, and no division warnings are emitted.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .config import is_integer, is_number
from .errors import ConfigError, ShapeError


def _labels(arr, what: str) -> np.ndarray:
    """A 1-d integer NumPy array of labels, or ShapeError naming ``what``."""
    arr = np.asarray(backend.to_numpy(arr))
    if arr.ndim != 1:
        raise ShapeError(f"{what} must be 1-d (N,) labels, got shape {arr.shape}")
    if arr.size == 0:               # np.asarray([]) is float64: no labels are no labels, whatever the dtype
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ShapeError(f"{what} must hold integer labels, got dtype {arr.dtype}")
    return arr


def accuracy(logits_or_pred, y) -> float:
    """Fraction of correct predictions.

    ``logits_or_pred``: (N, K) scores (argmax taken) or (N,) predicted labels;
    ``y``: (N,) true labels.
    """
    pred = np.asarray(backend.to_numpy(logits_or_pred))
    if pred.ndim == 2:
        pred = pred.argmax(axis=1)
    pred = _labels(pred, "accuracy: predictions")
    y = _labels(y, "accuracy: labels")
    if pred.shape != y.shape:
        raise ShapeError(f"accuracy: {pred.shape[0]} predictions for {y.shape[0]} labels")
    if y.size == 0:
        raise ShapeError("accuracy: no samples")
    return float(np.count_nonzero(pred == y)) / y.size


def confusion_matrix(y_true, y_pred, num_classes: int = 10) -> np.ndarray:
    """(C, C) int64 counts: ``cm[i, j]`` = samples of true class i predicted as j.

    ``y_true``, ``y_pred``: (N,) integer labels in [0, num_classes).
    """
    if not is_integer(num_classes) or num_classes < 1:
        raise ConfigError(f"confusion_matrix: num_classes must be a positive integer, got {num_classes!r}")
    c = int(num_classes)
    y_true = _labels(y_true, "confusion_matrix: y_true")
    y_pred = _labels(y_pred, "confusion_matrix: y_pred")
    if y_true.shape != y_pred.shape:
        raise ShapeError(f"confusion_matrix: y_true has {y_true.shape[0]} labels but y_pred has {y_pred.shape[0]}")
    for what, arr in (("y_true", y_true), ("y_pred", y_pred)):
        if arr.size and (arr.min() < 0 or arr.max() >= c):
            bad = arr[(arr < 0) | (arr >= c)][0]
            raise ShapeError(f"confusion_matrix: {what} holds label {int(bad)} outside [0, {c})")
    # Each (true, pred) pair gets a cell index true*C + pred; one bincount counts them all.
    flat = y_true.astype(np.int64) * c + y_pred.astype(np.int64)
    return np.bincount(flat, minlength=c * c).astype(np.int64).reshape(c, c)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den as float64, 0 where den == 0 (no warnings)."""
    out = np.zeros(num.shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _check_cm(cm) -> np.ndarray:
    """A (C, C) array of counts: non-negative integers (rates from anything else mean nothing)."""
    cm = np.asarray(backend.to_numpy(cm))
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ShapeError(f"confusion matrix must be square (C, C), got shape {cm.shape}")
    if cm.dtype.kind not in "iu":
        raise ShapeError(f"confusion matrix must hold integer counts, got dtype {cm.dtype}")
    if cm.size and cm.min() < 0:
        raise ShapeError(f"confusion matrix holds a negative count ({int(cm.min())})")
    return cm


def per_class_accuracy(cm) -> np.ndarray:
    """(C,) float64: correct / total for each true class (row); 0 for a class with no samples."""
    cm = _check_cm(cm)
    return _safe_ratio(np.diag(cm), cm.sum(axis=1))


def precision_recall(cm) -> tuple[np.ndarray, np.ndarray]:
    """``(precision, recall)``, each (C,) float64, from a confusion matrix (rows true).

    precision[k] = cm[k, k] / column k sum (0 if k was never predicted);
    recall[k] = cm[k, k] / row k sum (0 if k has no samples).
    """
    cm = _check_cm(cm)
    diag = np.diag(cm)
    return _safe_ratio(diag, cm.sum(axis=0)), _safe_ratio(diag, cm.sum(axis=1))


# Test accuracies a run's summary reports the time to (MNIST's usual milestones).
ACCURACY_MILESTONES = (0.90, 0.95, 0.98, 0.99)


def time_to_accuracy(evaluations, milestones=ACCURACY_MILESTONES) -> dict:
    """The first evaluation at or above each milestone that a run reached.

    evaluations: ``[{"seconds", "version", "test_accuracy"}, ...]`` in the
    order they were made  ->  ``{"0.99": {"seconds": s, "version": v}, ...}``,
    keyed by the milestone as a string (JSON keys are strings), milestones
    never reached left out.  An accuracy that is not a number is skipped.
    """
    scored = [e for e in evaluations if _is_scored(e)]
    reached = {}
    for milestone in milestones:
        first = next((e for e in scored if e["test_accuracy"] >= milestone), None)
        if first is not None:
            reached[f"{milestone:g}"] = {"seconds": first["seconds"], "version": first["version"]}
    return reached


def _is_scored(evaluation: dict) -> bool:
    """Whether an evaluation record's test accuracy is a finite number (one to compare)."""
    # a NumPy float32 accuracy (one computed in a float32 model's dtype) is a number too
    return is_number(evaluation.get("test_accuracy"))


def thin_evaluations(evaluations: list, cap: int, newest: int, milestones=ACCURACY_MILESTONES) -> list:
    """At most ``cap`` of ``evaluations``, in their order: a run's history, bounded.

    evaluations: ``[{"seconds", "version", "test_accuracy", "final", ...}, ...]``
    in the order they were recorded.  A list of ``cap`` or fewer is returned
    as it is.  Else kept are the ``newest`` last records, every final one and
    every one that set a new best test accuracy, in order of seconds (as
    :func:`time_to_accuracy` reads a history sorted by them); of the rest, as
    many as fit, spread evenly over the seconds.  Should the bests alone not
    fit, they are spread the same way, but the first at or above each of
    ``milestones`` stays: ``time_to_accuracy`` of the result sorted by seconds
    is always that of ``evaluations`` sorted by seconds.  (More than ``cap``
    only if the newest, the finals and those firsts are more.)
    """
    if len(evaluations) <= cap:
        return list(evaluations)
    # positions in order of seconds; sorted() is stable, as time_to_accuracy's caller's sort
    by_time = sorted(range(len(evaluations)), key=lambda i: evaluations[i]["seconds"])
    bests, best = [], -math.inf
    for i in by_time:
        if _is_scored(evaluations[i]) and evaluations[i]["test_accuracy"] > best:
            bests.append(i)
            best = evaluations[i]["test_accuracy"]
    keep = set(range(len(evaluations) - newest, len(evaluations)))
    keep.update(i for i, e in enumerate(evaluations) if e["final"])
    # the first at or above a milestone sets a new best: every one before it is below the milestone
    keep.update(next(i for i in bests if evaluations[i]["test_accuracy"] >= m) for m in milestones if best >= m)
    for candidates in (bests, by_time):
        keep.update(_spread_over_time([i for i in candidates if i not in keep], cap - len(keep), evaluations))
    return [evaluations[i] for i in sorted(keep)]


def _spread_over_time(positions: list, room: int, evaluations: list) -> list:
    """Of ``positions`` in ``evaluations`` (in order of seconds) at most ``room``, evenly over
    their seconds: the first of each stretch of time that has one, the stretches as short as
    fit.  Stretches are a power of two seconds long, counted from 0: each one of twice the
    length is two of the last, so what a history thinned again keeps was kept the time
    before, and no gap opens wider than two stretches (stretches moving with the run's length
    dropped, thinning after thinning, the one record left in some: gaps of hours in a week)."""
    if len(positions) <= room:
        return positions
    if room <= 0:
        return []
    seconds = [evaluations[i]["seconds"] for i in positions]
    exponent = math.floor(math.log2(max(seconds[-1] - seconds[0], 1e-3) / room))
    while True:
        length = 2.0 ** exponent
        chosen, stretches = [], set()
        for i, s in zip(positions, seconds):
            stretch = math.floor(s / length)
            if stretch not in stretches:
                stretches.add(stretch)
                chosen.append(i)
        if len(chosen) <= room:
            return chosen
        exponent += 1


class RunningMean:
    """A weighted running mean, e.g. of per-batch losses weighted by batch size.

    >>> m = RunningMean(); m.update(2.0, count=3); m.update(4.0); m.mean
    2.5
    """

    def __init__(self):
        self.total = 0.0
        self.count = 0

    def update(self, value, count: int = 1) -> None:
        """Add ``value`` (a mean over ``count`` samples) to the running mean."""
        if not is_integer(count) or count < 0:
            raise ConfigError(f"RunningMean.update: count must be a non-negative integer, got {count!r}")
        self.total += float(value) * int(count)
        self.count += int(count)

    @property
    def mean(self) -> float:
        """The mean so far; NaN before the first sample."""
        return self.total / self.count if self.count else math.nan

    def reset(self) -> None:
        self.total = 0.0
        self.count = 0

    def __repr__(self) -> str:
        return f"RunningMean(mean={self.mean:.6g}, count={self.count})"


def evaluate(model, x, y, batch_size: int = 1000, between_batches=None) -> dict:
    """Loss and classification metrics of ``model`` on ``(x, y)``, in evaluation mode.

    ``x``: (N, C, H, W) float (NumPy or on the model's device); ``y``: (N,) int labels.
    ``between_batches``: called with no arguments after each batch of ``batch_size`` (the
    parameter server answers its messages there while it scores the final weights).
    Returns JSON-able Python types: ``loss`` (mean cross-entropy), ``accuracy``,
    ``confusion_matrix`` (C lists of C ints, rows true), ``per_class_accuracy``,
    ``precision``, ``recall`` (lists of C floats) and ``count`` (N).
    """
    from .losses import softmax_cross_entropy  # noqa: PLC0415  (keeps metrics importable alone)

    if not is_integer(batch_size) or batch_size < 1:
        raise ConfigError(f"evaluate: batch_size must be a positive integer, got {batch_size!r}")
    if not hasattr(x, "__len__") or getattr(x, "ndim", 1) == 0:     # len() would raise a bare TypeError
        raise ShapeError(f"evaluate: inputs must be an (N, C, H, W) array, got a {type(x).__name__}")
    n = len(x)
    y_host = _labels(y, "evaluate: labels")
    if y_host.shape[0] != n:
        raise ShapeError(f"evaluate: {n} inputs but {y_host.shape[0]} labels")
    if n == 0:
        raise ShapeError("evaluate: no samples")
    xp = model.xp
    loss = RunningMean()
    preds = []
    num_classes = None
    for start in range(0, n, batch_size):
        xb = xp.asarray(x[start:start + batch_size])
        yb = y_host[start:start + batch_size]
        logits = model.forward(xb, train=False)
        batch_loss, _ = softmax_cross_entropy(logits, xp.asarray(yb))
        loss.update(batch_loss, count=len(yb))
        preds.append(backend.to_numpy(logits.argmax(axis=1)))
        num_classes = logits.shape[1]
        if between_batches is not None:
            between_batches()
    y_pred = np.concatenate(preds)
    cm = confusion_matrix(y_host, y_pred, num_classes=num_classes)
    precision, recall = precision_recall(cm)
    return {
        "loss": loss.mean,
        "accuracy": float(np.trace(cm)) / n,
        "confusion_matrix": cm.tolist(),
        "per_class_accuracy": per_class_accuracy(cm).tolist(),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "count": int(n),
    }
