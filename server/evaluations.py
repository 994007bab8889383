"""The run's evaluation history: one record per version scored, bounded, and the final evaluation.

The server records its evaluators' reports (and its own scoring of the final weights) here; the
history goes into every checkpoint and into summary.json, and a resumed server takes it back from
the checkpoint, with the evaluations logged after that checkpoint was written.
"""
from __future__ import annotations

import logging
import math

from cnn_core.metrics import thin_evaluations, time_to_accuracy
from cnn_core.text import for_count

from .resume import logged_evaluation

log = logging.getLogger("pscnn.server")


def evaluation_record(seconds: float, version: int, accuracy: float, loss, final: bool) -> dict:
    """One entry of the evaluation history: ``seconds``, the training clock when the scored weights
    were pulled.  A diverged model's NaN or infinite loss is kept as None: the history goes into
    JSON and every checkpoint."""
    return {"seconds": round(seconds, 3), "version": version, "test_accuracy": float(accuracy),
            "test_loss": float(loss) if loss is not None and math.isfinite(loss) else None, "final": final}


def log_evaluation(writer, record: dict, metrics: dict, **extra) -> None:
    """metrics.jsonl's eval line for ``record``, scored as ``metrics`` says.  Its seconds are the
    run's clock, as every line's (pscnn bench time-to-accuracy and the plots set them against the
    step lines'); the history's, the training clock's (summary.json's time to accuracy), are its
    train_seconds.  Its test_samples: an evaluator's own --test-limit may score another test set
    than the run's (or than the server's own final scoring), and the line must say so."""
    fields = {k: v for k, v in record.items() if k != "seconds"}
    count = metrics.get("count")
    writer.log("eval", **fields, train_seconds=record["seconds"],
               test_samples=None if count is None else int(count),
               per_class_accuracy=metrics.get("per_class_accuracy"), **extra)


def final_evaluation_settled(final_eval: dict | None, final_eval_from: str | None,
                             results_written: bool) -> str | None:
    """Why a final report would not be the run's result now, if it would not: the run has its
    final evaluation (``final_eval``, scored by ``final_eval_from``), or its results are written
    without one; None while it awaits one."""
    if final_eval:
        acc = final_eval.get("test_accuracy")
        return "the run has its final evaluation already ({}{})".format(
            f"test accuracy {acc:.4f}" if isinstance(acc, float) else "no test accuracy",
            f", from {final_eval_from}" if final_eval_from else "")
    if results_written:
        return "the run's results are written already, without a final evaluation (the server could not " \
               "score the final weights)"
    return None


class EvaluationHistory:
    """The evaluation records, one per version, in the order they were recorded.

    It holds at most CAP records, thinned by thin_evaluations: the bests (time to accuracy is the
    same), the finals, the NEWEST newest, the rest spread over the run.  At one record per --every
    a week-long run made 60,000 (6 MB of JSON rewritten at every checkpoint); 1,000 are ~100 KB,
    and more points than a curve's 500 pixels show.
    """
    CAP = 1000
    NEWEST = 100

    def __init__(self, evaluations: list | None = None, thinned_through: int = -1):
        """``evaluations`` and ``thinned_through``: a checkpoint's, thinned now (a checkpoint of an
        earlier version kept every record)."""
        self.evaluations: list[dict] = list(evaluations or [])
        # The newest version whose record the bound thinned out (-1: none): every version above it
        # that was recorded is in the history, so none is recorded twice (see is_recorded)
        self.thinned_through = thinned_through
        self._evaluation_at: dict[int, int] = {}    # version -> its record's index in evaluations
        self._thin()
        # The record of the newest version scored (status's test accuracy): not the last report, which
        # a second, slower evaluator may send for an older version.
        self.newest: dict | None = max(self.evaluations, key=lambda e: e["version"], default=None)

    def is_recorded(self, version: int) -> bool:
        """Whether ``version`` was recorded (or, at or below the newest version thinned out of the
        history, may have been: not recorded now, as the history cannot tell)."""
        return version in self._evaluation_at or version <= self.thinned_through

    def record(self, record: dict) -> bool:
        """Add ``record``: one record per version.

        A version already recorded is not recorded again, except that a final
        evaluation replaces the periodic one of the same version.  So the
        history grows with training, never with the number of reports; past
        CAP records it is thinned.  False: not recorded.
        """
        at = self._evaluation_at.get(record["version"])
        if at is None and self.is_recorded(record["version"]):
            return False
        if at is None:
            self._evaluation_at[record["version"]] = len(self.evaluations)
            self.evaluations.append(record)
            if len(self.evaluations) > self.CAP:
                self._thin()
        elif record["final"] and not self.evaluations[at]["final"]:
            self.evaluations[at] = record
        else:
            return False
        if self.newest is None or record["version"] >= self.newest["version"]:
            self.newest = record
        return True

    def _thin(self) -> None:
        """The history thinned to CAP records (if over it), and indexed by version."""
        kept = thin_evaluations(self.evaluations, self.CAP, self.NEWEST)
        kept_ids = {id(e) for e in kept}
        self.thinned_through = max([self.thinned_through,
                                    *(e["version"] for e in self.evaluations if id(e) not in kept_ids)])
        self.evaluations = kept
        self._evaluation_at = {e["version"]: i for i, e in enumerate(kept)}

    def summary(self) -> dict:
        """summary.json's evaluations and time to accuracy."""
        return {"evaluations": [{"seconds": e["seconds"], "version": e["version"], "test_accuracy": e["test_accuracy"]}
                                for e in self.evaluations],
                # by the weights' time: a second, slower evaluator's report of older weights comes in later
                "time_to_accuracy": time_to_accuracy(sorted(self.evaluations, key=lambda e: e["seconds"]))}

    def adopt_logged(self, logged: list, checkpoint_version: int, checkpoint_seconds: float) -> None:
        """Add those of metrics.jsonl's ``logged`` records that score the checkpoint's versions (up to
        ``checkpoint_version``) and that the earlier server logged after writing the checkpoint.

        An evaluator's report comes in while training goes on, often of a version the checkpoint
        written meanwhile holds: logged in metrics.jsonl, but in no checkpoint.  Resumed without it,
        summary.json left that evaluation out, and the evaluator, scoring the checkpoint's version
        again, had it logged twice.  Versions above the checkpoint's are lost with their updates.
        """
        adopted = 0
        for r in logged:
            if r.get("kind") != "eval":
                continue
            record = logged_evaluation(r, checkpoint_version)
            if record is not None:
                # Pulled after the checkpoint, by a training clock this server restarts from the
                # checkpoint's time (``checkpoint_seconds``): as logged, it stood later than the
                # evaluations that follow, and the history went back in time.  Its weights are the
                # checkpoint's or older, so they were there at the checkpoint's time.
                record["seconds"] = min(record["seconds"], checkpoint_seconds)
                adopted += self.record(record)
        if adopted:
            log.info("--resume: %d %s logged after the checkpoint was written %s kept in the run's history", adopted,
                     for_count(adopted, "evaluation"), for_count(adopted, "is", "are"))
