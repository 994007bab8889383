"""The run's results, written once training is over: model.npz, then summary.json, then the plots,
drawn in a thread of their own.

The server assembles summary.json's figures from its state (ParameterServer._write_summary) and
decides when to write them (_write_final: tried again while a full disk refuses them).
"""
from __future__ import annotations

import logging
import os
import threading
from collections import Counter

from cnn_core.checkpoint import save_model_checkpoint
from cnn_core.runlog import make_plots

log = logging.getLogger("pscnn.server")


def staleness_summary(staleness: Counter) -> dict:
    """summary.json's staleness: the mean, the max and the histogram of the staleness counts."""
    total = sum(staleness.values())
    return {"mean": (sum(k * v for k, v in staleness.items()) / total) if total else 0.0,
            "max": max(staleness) if total else 0,
            "histogram": {str(k): v for k, v in sorted(staleness.items())}}


def write_results(out: str, writer, model, version: int, summary: dict) -> None:
    """Write run folder ``out``'s model.npz (``model`` at ``version``), then ``summary`` through
    ``writer`` (the run's RunWriter)."""
    # model.npz first: summary.json says the run is finished (unfinished_run_warning), and a server
    # killed between the two left a finished run without its weights, or beside an earlier run's
    save_model_checkpoint(os.path.join(out, "model.npz"), model, None, step=version,
                          metrics={"test_accuracy": summary["test_accuracy"]})
    writer.write_summary(summary)


class PlotDrawing:
    """A run folder's plots, drawn from its metrics.jsonl in a thread while the server goes on answering.

    Drawing them takes minutes for a long run: drawn in the event loop's thread, clients asking
    meanwhile (a trainer back for work, the evaluator's goodbye) heard "stop" only minutes later,
    or gave the silent server up.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None

    def start(self, out: str) -> None:
        self._thread = threading.Thread(target=self._draw, args=(out,), name="plots")
        self._thread.start()

    @property
    def drawing(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self) -> None:
        """Wait until they are drawn (at once if they never were started)."""
        if self._thread is not None:
            self._thread.join()

    @staticmethod
    def _draw(out: str) -> None:
        try:
            make_plots(out)
        except Exception as exc:   # noqa: BLE001  (plots are a convenience; the run's results are written)
            log.warning("plots failed: %s", exc)
