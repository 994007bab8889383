"""An evaluator's report: the metrics it may hold, checked, and as a checkpoint keeps them.

The server logs them, keeps the final one in its checkpoints and writes it to
summary.json; a resumed server checks the checkpoint's copy the same way.
"""
from __future__ import annotations

import math

from cnn_core.config import is_number, is_real

METRIC_KEYS = ("test_accuracy", "test_loss", "per_class_accuracy", "precision", "recall", "confusion_matrix",
               "count", "eval_seconds")


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
    a model of ``classes`` classes.
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
    if m.get("count") is not None and not (num(m["count"], 0) and m["count"] == int(m["count"])):
        return "count must be an integer >= 0"
    if m.get("eval_seconds") is not None and not num(m["eval_seconds"], 0):
        return "eval_seconds must be a finite number >= 0"
    return None
