"""pscnn.ratelog.RateLimitedLog: lines of one kind at a bounded rate (the server's and the evaluator's)."""
from __future__ import annotations

import logging

from pscnn import ratelog
from pscnn.ratelog import RateLimitedLog


def test_a_window_logs_its_first_lines_then_counts_the_rest_and_a_new_reason_at_once(monkeypatch, caplog):
    """The evaluator's refused reports: one warning, a count once the minute is over, the next one
    logged in full; a line of another reason is not held back by the count.  A count of one is
    singular (it said "1 more refused reports ... were")."""
    clock = [100.0]
    monkeypatch.setattr(ratelog.time, "monotonic", lambda: clock[0])
    logger = logging.getLogger("pscnn.test_ratelog")
    limited = RateLimitedLog(logger, ("refused report", "refused reports"), 1, window_s=60.0)

    def at(t: float, reason: str = "busy") -> None:
        clock[0] = t
        limited.log(logging.WARNING, "refused: %s", reason, reason=reason)
        limited.flush(t)

    with caplog.at_level(logging.INFO, logger="pscnn.test_ratelog"):
        for t in (100.0, 110.0, 120.0, 150.0):
            at(t)
        limited.flush(159.0)                    # the minute is not over: nothing yet
        assert [r.getMessage() for r in caplog.records] == ["refused: busy"]
        limited.flush(161.0)
        at(170.0)
        at(171.0, "full")                       # another reason: at once
        at(172.0, "full")
        limited.flush(173.0, final=True)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "refused: busy"),
        (logging.WARNING, "3 more refused reports in the last 61.0 s were not logged one by one"),
        (logging.WARNING, "refused: busy"),
        (logging.WARNING, "refused: full"),
        (logging.WARNING, "1 more refused report in the last 2.0 s was not logged one by one")]
