"""An evaluator's report: the metrics it may hold, checked, and as a checkpoint keeps them.

The server logs them, keeps the final one in its checkpoints and writes it to
summary.json; a resumed server checks the checkpoint's copy the same way.
"""
from __future__ import annotations

import math

from cnn_core.config import is_number, is_real
from cnn_core.data import MNIST_FILES

METRIC_KEYS = ("test_accuracy", "test_loss", "per_class_accuracy", "precision", "recall", "confusion_matrix",
               "count", "eval_seconds")
# How far a rate may be from the one its confusion matrix gives: float32 rounding passes, while a
# rate of N test images moves in steps of 1/N, 1e-4 for MNIST's 10,000.
RATE_TOLERANCE = 1e-6


def checkpointable_metrics(m: dict) -> dict:
    """A final evaluation's metrics (an evaluator's report, or the server's own scoring) as a checkpoint
    keeps them: only METRIC_KEYS, and a NaN or infinite loss as None (the loader accepts finite numbers)."""
    kept = {k: v for k, v in m.items() if k in METRIC_KEYS}
    loss = kept.get("test_loss")
    if loss is not None and not math.isfinite(loss):
        kept["test_loss"] = None
    return kept


def metrics_problem(m: dict, classes: int) -> str | None:
    """Why an evaluator's metrics cannot be used, or None.

    They are logged, kept in checkpoints (whose loader accepts only finite
    numbers: a NaN or infinite loss is kept as null) and written to
    summary.json, so each must be what ``cnn_core.metrics.evaluate`` makes for
    a model of ``classes`` classes: each in range, and together consistent
    (:func:`_confusion_problem`).
    """
    def num(v, low=-math.inf, high=math.inf):
        return is_number(v) and low <= v <= high

    unknown = sorted(set(m) - set(METRIC_KEYS), key=str)
    if unknown:
        return f"unknown metrics {unknown}; known: {', '.join(METRIC_KEYS)}"[:300]
    if not num(m.get("test_accuracy"), 0, 1):
        return "test_accuracy must be a number in [0, 1]"
    loss = m.get("test_loss")         # NaN or inf: a diverged model's loss, a real measurement
    if loss is not None and not (is_real(loss) and (math.isnan(loss) or loss >= 0)):
        return "test_loss must be a number >= 0 (NaN or inf for a diverged model) or nil"
    for key in ("per_class_accuracy", "precision", "recall"):
        v = m.get(key)
        if v is not None and not (isinstance(v, list) and len(v) == classes and all(num(x, 0, 1) for x in v)):
            return f"{key} must be a list of {classes} numbers in [0, 1] (one per class)"
    cm = m.get("confusion_matrix")
    if cm is not None and not (isinstance(cm, list) and len(cm) == classes and all(
            isinstance(row, list) and len(row) == classes and all(num(x, 0) and x == int(x) for x in row)
            for row in cm)):
        return f"confusion_matrix must be {classes} rows of {classes} counts (integers >= 0)"
    test_images = MNIST_FILES["test-labels"]["count"]       # at call time: tests may patch it
    count = m.get("count")
    if count is not None and not (num(count, 1, test_images) and count == int(count)):
        return f"count must be an integer in [1, {test_images}] (test images scored, of MNIST's {test_images})"
    if m.get("eval_seconds") is not None and not num(m["eval_seconds"], 0):
        return "eval_seconds must be a finite number >= 0"
    return None if cm is None else _confusion_problem(m, cm, count, test_images)


def _confusion_problem(m: dict, cm: list, count, test_images: int) -> str | None:
    """Why the rates of ``m`` (its accuracy, and per class) are not those its confusion matrix
    ``cm`` (checked well-formed) gives, or its count not the images ``cm`` counts, or None.

    Each is in range alone, but summary.json, the confusion-matrix plot and the time to
    accuracy showed an accuracy of 0.99 beside a matrix counting no image right (or none).
    """
    scored = sum(sum(row) for row in cm)
    if not 1 <= scored <= test_images:      # how many is not said: a sum past float's range has no format
        return (f"confusion_matrix must count 1 to {test_images} test images (MNIST's), "
                f"not {'none' if scored == 0 else 'more'}")
    if count is not None and scored != count:
        return f"confusion_matrix counts {int(scored)} test images, but count is {int(count)}"
    right = [cm[k][k] for k in range(len(cm))]
    if abs(m["test_accuracy"] - sum(right) / scored) > RATE_TOLERANCE:
        return (f"test_accuracy {m['test_accuracy']:.6g} is not the confusion matrix's "
                f"({int(sum(right))} of {int(scored)} right: {sum(right) / scored:.6g})")
    of_class = [sum(row) for row in cm]                                   # rows: the true class
    predicted = [sum(row[k] for row in cm) for k in range(len(cm))]       # columns: the predicted one
    for key, totals in (("per_class_accuracy", of_class), ("recall", of_class), ("precision", predicted)):
        rates = m.get(key)
        if rates is None:
            continue
        for k, (rate, total) in enumerate(zip(rates, totals)):
            made = right[k] / total if total else 0.0       # cnn_core.metrics: 0 for a class of no images
            if abs(rate - made) > RATE_TOLERANCE:
                return f"{key} of class {k} is {rate:.6g}, but the confusion matrix gives {made:.6g}"
    return None
