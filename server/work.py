"""Work distribution: leased batches of a seeded per-epoch permutation.

Epoch ``e`` of the run is ``cnn_core.data.batch_index(n, batch_size, seed, e)``:
a permutation of the training set cut into batches.  A worker's shard is the
set of batches it leases.  Each batch of each epoch is *applied* exactly once:

* ``lease`` hands out the next pending batch (with a deadline);
* ``complete`` marks a batch applied, only if it is not applied yet: a second
  push for the same batch (a retried or expired lease) returns False and its
  gradient is dropped;
* an expired lease, or every lease of a worker that died or left, goes back to
  the front of the queue (``reclaim`` takes it out again for a late push that a
  sync round still counts);
* ``granted`` checks what a push claims: it counts only for the batch of a
  lease its sender holds or held this epoch (a late push under an expired
  lease still counts, under one of the batch's last GRANTS_PER_BATCH leases),
  never for a batch another worker is computing or one nobody was given yet;
  ``granted_version`` says which weights version a lease was granted with.

Workers compute a batch's indices themselves from (seed, epoch, batch), so a
lease is three integers on the wire.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from cnn_core.data import batch_length, batches_per_epoch


@dataclass
class Lease:
    epoch: int
    batch: int
    lease_id: int
    worker: str
    deadline: float
    size: int


class WorkQueue:
    # A late push counts under one of its batch's last GRANTS_PER_BATCH leases; older ones are
    # forgotten, or a trainer taking a batch and giving it back over and over (a refused push,
    # hello and bye) would grow ``grants`` for as long as the epoch lasts.
    GRANTS_PER_BATCH = 4

    def __init__(self, num_samples: int, batch_size: int, epochs: int, lease_timeout: float,
                 epoch: int = 0, applied=()):
        if num_samples < 1 or batch_size < 1 or epochs < 1:
            raise ValueError("num_samples, batch_size and epochs must all be >= 1")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.epochs = epochs
        self.lease_timeout = lease_timeout
        self.batches_per_epoch = batches_per_epoch(num_samples, batch_size)
        self.epoch = epoch
        self.applied: set[int] = set(applied)            # batches of the current epoch already applied
        self.leases: dict[int, Lease] = {}               # batch -> its current lease
        # worker -> the batches in leases it holds, in lease order: held_by is asked at every task
        # request, and walking every lease cost 43 us with 2,048 trainers at work.  Kept with leases
        # by _add_lease and _drop_lease alone.
        self._held: dict[str, dict[int, None]] = {}
        self.grants: dict[int, tuple[str, int, int]] = {}   # lease id -> (worker, batch, version): this epoch's
        self._batch_grants: dict[int, deque] = {}        # batch -> its lease ids in grants, oldest first
        self.pending: deque[int] = deque()
        # The batches in pending, for the membership tests of a push: deque.remove scans the queue, and
        # once per applied batch that cost 1.6 ms per update with --batch-size 1 (60,000 batches).
        self._queued: set[int] = set()
        self._next_lease_id = 1
        self.requeued_total = 0
        self._fill_pending()

    # ------------------------------------------------------------------ queries
    @property
    def done(self) -> bool:
        return self.epoch >= self.epochs

    def batch_size_of(self, batch: int) -> int:
        return batch_length(self.num_samples, self.batch_size, batch)

    def progress(self) -> dict:
        total = self.epochs * self.batches_per_epoch
        finished = min(self.epoch, self.epochs) * self.batches_per_epoch + (0 if self.done else len(self.applied))
        return {"epoch": self.epoch, "epochs": self.epochs, "batches_per_epoch": self.batches_per_epoch,
                "applied_in_epoch": len(self.applied), "batches_done": finished, "batches_total": total,
                "in_flight": len(self.leases), "pending": len(self.pending)}

    def is_live(self, epoch: int, batch: int) -> bool:
        """Would a gradient for (epoch, batch) still be applied?"""
        return epoch == self.epoch and not self.done and batch not in self.applied \
            and 0 <= batch < self.batches_per_epoch

    def granted(self, worker: str, epoch: int, batch: int, lease_id) -> bool:
        """Was ``worker`` given lease ``lease_id`` for (epoch, batch), this epoch (current or since expired)?"""
        return epoch == self.epoch and self.grants.get(lease_id, ())[:2] == (worker, batch)

    def granted_version(self, lease_id) -> int | None:
        """The weights version lease ``lease_id`` was granted with (this epoch), or None."""
        grant = self.grants.get(lease_id)
        return None if grant is None else grant[2]

    # ------------------------------------------------------------------ changes
    def lease(self, worker: str, now: float, version: int = 0) -> Lease | None:
        """The next pending batch for ``worker``, or None (epoch draining, or done).  ``version``:
        of the weights its task carries (a push computed on older ones is a false claim)."""
        if self.done or not self.pending:
            return None
        batch = self.pending.popleft()
        self._queued.discard(batch)
        lease = Lease(self.epoch, batch, self._next_lease_id, worker, now + self.lease_timeout,
                      self.batch_size_of(batch))
        self._next_lease_id += 1
        self._add_lease(lease)
        self.grants[lease.lease_id] = (worker, batch, version)
        recent = self._batch_grants.setdefault(batch, deque())
        recent.append(lease.lease_id)
        if len(recent) > self.GRANTS_PER_BATCH:
            del self.grants[recent.popleft()]
        return lease

    def complete(self, epoch: int, batch: int) -> bool:
        """Mark (epoch, batch) applied.  False (and nothing changes) if it is not live.

        Returns True when the batch counts; the epoch advances once all of its
        batches are applied.
        """
        if not self.is_live(epoch, batch):
            return False
        self.applied.add(batch)
        self._drop_lease(batch)
        if batch in self._queued:           # a requeued batch finished by its old holder
            self._unqueue(batch)
        if len(self.applied) == self.batches_per_epoch:
            self.epoch += 1
            self.applied = set()
            self.leases.clear()
            self._held.clear()
            self.grants.clear()
            self._batch_grants.clear()
            self._fill_pending()
        return True

    def release(self, epoch: int, batch: int, holder: str | None = None) -> bool:
        """Give one leased batch back to the queue (a rejected push).  True if requeued.

        ``holder``: only if that worker holds the lease (a pusher gives back its own
        lease, never one the batch was leased to since)."""
        lease = self.leases.get(batch)
        if lease is None or lease.epoch != epoch or holder not in (None, lease.worker):
            return False
        self._drop_lease(batch)
        self.pending.appendleft(batch)
        self._queued.add(batch)
        self.requeued_total += 1
        return True

    def held_by(self, worker: str) -> list[int]:
        """The batches ``worker`` holds leases on now."""
        return list(self._held.get(worker, ()))

    def hand_in(self, epoch: int, batch: int) -> None:
        """(epoch, batch) was computed and waits to be applied (in a sync round): no longer
        leased, so neither its lease expiring nor its worker dropping puts it back in the
        queue, where another worker could compute it again and the round count it twice."""
        lease = self.leases.get(batch)
        if lease is not None and lease.epoch == epoch:
            self._drop_lease(batch)

    def reclaim(self, epoch: int, batch: int) -> bool:
        """Take (epoch, batch) back out of the queue for a late push under its expired lease (sync:
        the round it was computed for is still open).  True if it is live and waits in the queue,
        nobody holding it since; False (and nothing changes) otherwise."""
        if not self.is_live(epoch, batch) or batch in self.leases or batch not in self._queued:
            return False            # (not queued: handed in, its push waits in the round already)
        self._unqueue(batch)
        return True

    def release_worker(self, worker: str) -> list[int]:
        """Requeue every batch leased by ``worker`` (it died or left)."""
        batches = self.held_by(worker)
        for b in batches:
            self.release(self.epoch, b)
        return batches

    def expire(self, now: float) -> list[tuple[str, int]]:
        """Requeue leases past their deadline; returns [(worker, batch), ...]."""
        expired = [(lease.worker, b) for b, lease in self.leases.items() if lease.deadline < now]
        for _, b in expired:
            self.release(self.epoch, b)
        return expired

    def postpone(self, seconds: float) -> None:
        """Move every lease's deadline ``seconds`` later (time the server did not run)."""
        for lease in self.leases.values():
            lease.deadline += seconds

    def state_dict(self) -> dict:
        """JSON-able position, for checkpoints (leases are not saved: they requeue)."""
        return {"epoch": self.epoch, "applied": sorted(self.applied), "num_samples": self.num_samples,
                "batch_size": self.batch_size, "epochs": self.epochs}

    def _add_lease(self, lease: Lease) -> None:
        self.leases[lease.batch] = lease
        self._held.setdefault(lease.worker, {})[lease.batch] = None

    def _drop_lease(self, batch: int) -> None:
        """Forget ``batch``'s lease, if it has one."""
        lease = self.leases.pop(batch, None)
        if lease is not None:
            held = self._held[lease.worker]
            del held[batch]
            if not held:                # no entry per worker that ever held a lease
                del self._held[lease.worker]

    def _unqueue(self, batch: int) -> None:
        """Take ``batch``, which is in it, out of the queue."""
        self.pending.remove(batch)
        self._queued.discard(batch)

    def _fill_pending(self) -> None:
        if not self.done:
            self.pending = deque(b for b in range(self.batches_per_epoch) if b not in self.applied)
            self._queued = set(self.pending)
