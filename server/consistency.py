"""The consistency modes' own state and rules: a sync round (BSP), and SSP's bound on clocks.

The server applies them: it leases the batches, applies the gradients and answers the trainers
(ParameterServer._push_sync, _maybe_close_round, _give_task, _release_parked).
"""
from __future__ import annotations


class SyncRound:
    """sync mode: the round being computed.

    Its members are the trainers holding a lease of the current version; the round closes once the
    gradient of every member has arrived (or the members that died were dropped from it).
    """

    def __init__(self):
        self.members: dict[str, tuple[int, int]] = {}   # worker id -> (epoch, batch) it was leased
        # worker id -> (push body, grads, state): the received frames, kept until the round closes
        self.arrived: dict[str, tuple] = {}

    def complete(self) -> bool:
        """Whether a gradient arrived, and those of every member."""
        return bool(self.arrived) and all(w in self.arrived for w in self.members)

    def in_batch_order(self) -> list:
        """The arrived ``[(worker id, (push body, grads, state)), ...]`` in the order of their batches.

        Summed in batch order, not arrival order: float addition does not associate, and the sum
        must not depend on which worker was faster.
        """
        return sorted(self.arrived.items(), key=lambda item: (item[1][0]["epoch"], item[1][0]["batch"]))

    def clear(self) -> None:
        self.members.clear()
        self.arrived.clear()


def ssp_floor(peers: dict, leases) -> int | None:
    """The slowest clock among the trainers at work (holding one of ``leases``), or None.

    A trainer without a lease computes nothing that could go stale: it is
    between tasks, told to wait, not yet asking, or hung with its lease
    expired.  Counting it would let one silent trainer stall the run.
    """
    # Walks the leases, not the peers: asked at every task request, it must not cost
    # more with a thousand idle peers connected.
    at_work = (peers.get(lease.worker) for lease in leases)
    return min((p.clock for p in at_work if p is not None and p.role == "trainer"), default=None)


def ssp_start_clock(peer, peers: dict, floor: int | None) -> int:
    """The clock of a trainer that (re)starts from the newest weights (joining, or back after its
    lease expired): ``floor``, the slowest at work, or with none at work the slowest of the other
    ``peers``; never lower than its own."""
    if floor is None:
        floor = min((p.clock for p in peers.values() if p.role == "trainer" and p is not peer), default=0)
    return max(peer.clock, floor)


def ssp_within_bound(clock: int, floor: int | None, staleness: int) -> bool:
    """Whether a trainer at ``clock`` may have its next task: at most ``staleness`` pushes ahead of
    ``floor``, the slowest trainer at work (None: none at work)."""
    return floor is None or clock - floor <= staleness
