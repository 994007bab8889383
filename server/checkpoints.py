"""The run folder's checkpoint as this server writes it: the file, what the last one written holds,
when the next periodic one is due, and why the last could not be written.

What a checkpoint holds besides the model and the optimizer is the server's state
(ParameterServer._checkpoint_extra); reading it back is resume.py's.
"""
from __future__ import annotations

import json
import os
import time

from cnn_core.checkpoint import save_model_checkpoint

from .resume import CHECKPOINT_NAME


class CheckpointFile:
    """OUT/checkpoint.npz, as this server writes it."""

    # Clocks run on while nothing else changes: a checkpoint that differs from the last only in
    # them is not written again (a SIGKILL then loses the paused seconds from the run's clocks,
    # not a batch; a stop writes one anyway)
    CLOCKS = ("train_seconds", "wall_seconds")

    def __init__(self, out: str):
        self.path = os.path.join(out, CHECKPOINT_NAME)
        # The next periodic checkpoint is due --checkpoint-every after this: set when one is
        # written, fails to be, or is skipped
        self.period_start = time.monotonic()
        self.version: int | None = None     # of the last checkpoint written (this incarnation)
        self.holds_final_eval = False       # whether that checkpoint holds the final evaluation
        self._content: str | None = None    # what that checkpoint holds (see _content_of)
        self.failing: str | None = None     # why the last checkpoint could not be written

    def write(self, model, optimizer, version: int, extra: dict) -> None:
        """Write ``model`` and ``optimizer`` at ``version``, with ``extra`` (the run's state) in its meta."""
        save_model_checkpoint(self.path, model, optimizer, step=version, extra=extra)
        self.period_start = time.monotonic()
        self.version = version
        self.holds_final_eval = "final_eval" in extra
        self._content = self._content_of(version, extra)

    def unchanged(self, version: int, extra: dict) -> bool:
        """Whether a checkpoint now would hold what the last one written does (its clocks aside)."""
        return self._content_of(version, extra) == self._content

    def from_before_this_server(self) -> bool:
        """Whether the folder holds a checkpoint and this server has written none."""
        return self.version is None and os.path.exists(self.path)

    def last_text(self) -> str:
        """The checkpoint a --resume would continue from, in words."""
        if self.version is not None:
            return f"version {self.version}, the last checkpoint written"
        if os.path.exists(self.path):
            return "the checkpoint there already (from before this server started)"
        return "nothing: no checkpoint was written yet"

    def _content_of(self, version: int, extra: dict) -> str:
        """What a checkpoint of ``extra`` holds, its clocks left out: the version (the weights, the
        model state and the optimizer's change only with it) and the rest of ``extra`` (the epoch
        position, evaluations, counters)."""
        held = {k: v for k, v in extra.items() if k not in self.CLOCKS}
        return json.dumps({"version": version, "extra": held}, sort_keys=True)
