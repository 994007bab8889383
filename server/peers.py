"""What the server knows of its clients: a peer it serves, one it dropped, the reply it keeps for a
resend, and the ids of the workers whose gradients it applied."""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

from pscnn import protocol as P


class RecentIds(OrderedDict):
    """Worker id -> name, of the ``limit`` ids added or touched last; ``count``: the ids ever added
    (one forgotten, then added again, counts twice: only after ``limit`` others came since)."""

    def __init__(self, limit: int, items: dict | None = None, count: int = 0):
        super().__init__()
        self.limit = limit
        self.count = 0
        for wid, name in (items or {}).items():
            self.add(wid, name)
        self.count = max(self.count, count)     # a checkpoint's count includes the ids it no longer held

    def add(self, wid: str, name: str) -> None:
        if wid in self:
            self.move_to_end(wid)
        else:
            self.count += 1
        self[wid] = name
        if len(self) > self.limit:
            self.popitem(last=False)


@dataclass
class KeptReply:
    """A peer's last reply, kept to answer a resend of its request (ParameterServer._resend).

    One that carried weights is kept without them: each async trainer's task carried another
    version's, and 2,048 trainers kept 2,048 copies of the model (3.5 GB).  A weak reference to
    them is kept: while ZeroMQ still queues an answer that carries them, a resend gets them too.
    """
    frames: list | None = None          # the reply as sent, when it carried no weights
    message: P.Message | None = None    # the reply, less its weights, when it carried some
    weights: weakref.ref | None = None  # the buffer of the weights it carried (a snapshot's, FlatArrays.flat)


@dataclass
class Peer:
    wid: str
    role: str
    name: str
    rid: bytes                          # the routing id it joined from: its requests must come from it
    last_seen: float
    last_seq: int = -1
    last_type: str = P.HELLO            # the type of request last_seq numbered
    cached_reply: KeptReply | None = None   # the reply to last_seq (resent on duplicates: see _resend)
    pending: bool = False               # last_seq's reply is parked (sync barrier / ssp)
    parked_since: float = 0.0
    parked_ack: dict | None = None
    known_version: int = -1             # newest weights version this peer was sent
    clock: int = 0                      # ssp: pushes applied
    in_round: bool = False              # sync: its push waits in the round (SyncRound.arrived) until it closes
    clock_behind: bool = False          # ssp: held no lease for a while (joined, lease expired or gone with
                                        # its batch, told to wait, push refused): catches up at its next task
    nonfinite_streak: int = 0           # its NaN/Inf pushes (of batches it held) since its last finite one
    told_to_stop: bool = False
    replied_at: float = 0.0             # when the server last answered it (time.monotonic())
    push_window: tuple = (0.0, 0.0)     # its current push: (the answer before it, its arrival)
    last_applied_arrival: float | None = None   # its last push applied: arrival, as in the step records' timeline
    pulled: tuple | None = None         # evaluator: (version, training clock) of the weights it was sent last
    key: str | None = None              # CURVE: the Z85 public key it joined with, bound to its id (None: plain)


@dataclass
class DroppedPeer:
    """A peer the server forgot (declared dead, left, rejoined), until it says hello again."""
    name: str
    why: str
    at: float                           # time.monotonic() when dropped
    refused: int = 0                    # its messages refused since
    key: str | None = None              # CURVE: the key it joined with, which alone may rejoin under its id
    rid: bytes = b""                    # the routing id it joined from, which alone may rejoin under its id

    @property
    def reason(self) -> str:
        """``why`` without its details: "declared dead", "left", "rejoined", ... (summary.json's
        peers_dropped keys)."""
        return self.why.split(" (")[0]
