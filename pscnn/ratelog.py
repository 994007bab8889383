"""Log lines of one kind at a bounded rate: the server's and the evaluator's, one helper for both.

It imports only the standard library and :mod:`cnn_core.text` (its counts' words), so the
server and its clients share it as they share :mod:`pscnn.protocol`.
"""
from __future__ import annotations

import logging
import time

from cnn_core.text import for_count

# The window of a line that may repeat for a whole run (a refused evaluation report): the first one,
# then at most one a minute, with the count of those held back
REMINDER_WINDOW_S = 60.0


class RateLimitedLog:
    """Log lines of one kind, at most ``limit`` of them each ``window_s`` seconds (``limit`` 0: every one).

    For the lines a peer makes a process write as often as it sends (the server: a rejected
    message, a hello from an id it made up; the evaluator: a report its server refuses).  Beyond
    the limit a line is only counted, and :meth:`flush` (called now and then) says how many in one
    line once their window is over: "N more <what> in the last S s" (``what``: the
    line's noun, singular and plural, as the count needs).  A line of another
    ``reason`` than the last one is logged whatever the count, after that count: a limit must
    not hide that the reason changed.
    """

    def __init__(self, logger: logging.Logger, what: tuple[str, str], limit: int, note: str = "",
                 window_s: float = 1.0):
        self.logger = logger
        self.what = what                # what the lines are: ("rejected message", "rejected messages")
        self.limit = limit
        self.note = note                # appended to the summary line
        self.window_s = window_s
        self.window_start = 0.0         # time.monotonic() when the current window began
        self.lines = 0                  # lines of this kind in the current window, logged or not
        self.unlogged = 0
        self.level = logging.INFO       # the highest level of the unlogged lines
        self.reason = None              # the reason of the current window's lines

    def log(self, level: int, fmt: str, *args, reason=None) -> None:
        now = time.monotonic()
        if reason != self.reason or now - self.window_start >= self.window_s:
            self.flush(now, final=True)
            self.window_start, self.lines, self.reason = now, 0, reason
        self.lines += 1
        if not self.limit or self.lines <= self.limit:
            self.logger.log(level, fmt, *args)
        else:
            self.unlogged += 1
            self.level = max(self.level, level)

    def flush(self, now: float, final: bool = False) -> None:
        """Say how many lines went unlogged, once their window is over (``final``: at once)."""
        if self.unlogged and (final or now - self.window_start >= self.window_s):
            self.logger.log(self.level, "%d more %s in the last %.1f s %s not logged one by one%s", self.unlogged,
                            for_count(self.unlogged, *self.what), now - self.window_start,
                            for_count(self.unlogged, "was", "were"), self.note)
            self.unlogged, self.level = 0, logging.INFO
