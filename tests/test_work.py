"""server.work.WorkQueue: leases, exactly-once completion, requeues, and who may push what."""
from collections import deque

import pytest

from server.work import WorkQueue


def queue(num_samples=10, batch_size=4, epochs=2, lease_timeout=5.0, **kw):
    return WorkQueue(num_samples, batch_size, epochs, lease_timeout, **kw)


def test_an_epoch_is_every_batch_once_and_the_last_one_short():
    q = queue()
    leases = [q.lease("w", 0.0) for _ in range(3)]
    assert [lease.batch for lease in leases] == [0, 1, 2]
    assert [lease.size for lease in leases] == [4, 4, 2]
    assert q.lease("w", 0.0) is None                        # draining: everything is leased
    assert [q.complete(0, b) for b in (0, 1)] == [True, True]
    assert q.complete(0, 1) is False                        # a second push for a batch: dropped
    assert q.complete(0, 2) is True and q.epoch == 1        # the epoch advances once all are in
    assert q.complete(0, 0) is False                        # the old epoch is over
    for b in range(3):
        q.lease("w", 0.0)
        q.complete(1, b)
    assert q.done and q.lease("w", 0.0) is None
    assert q.progress()["batches_done"] == q.progress()["batches_total"] == 6


def test_a_push_counts_only_under_a_lease_its_sender_was_given_this_epoch():
    q = queue(lease_timeout=5.0)
    a = q.lease("a", 0.0)
    assert q.granted("a", 0, a.batch, a.lease_id)
    assert not q.granted("b", 0, a.batch, a.lease_id)          # another worker's lease
    assert not q.granted("a", 0, a.batch, a.lease_id + 1)      # a lease id never given
    assert not q.granted("a", 0, a.batch + 1, a.lease_id)      # the lease is for another batch
    assert not q.granted("a", 0, 2, 999)                       # a batch nobody was given yet
    # a's lease expires and the batch goes to b: both may push for it, the first one counts
    assert q.expire(10.0) == [("a", a.batch)]
    b = q.lease("b", 10.0)
    assert b.batch == a.batch and b.lease_id != a.lease_id
    assert q.granted("a", 0, a.batch, a.lease_id) and q.granted("b", 0, b.batch, b.lease_id)
    assert q.complete(0, a.batch) and not q.complete(0, b.batch)
    # the next epoch forgets this one's leases
    for lease in (q.lease("a", 10.0), q.lease("a", 10.0)):
        q.complete(0, lease.batch)
    assert q.epoch == 1
    assert not q.granted("a", 0, a.batch, a.lease_id) and not q.granted("a", 1, a.batch, a.lease_id)


def test_a_requeued_batch_completed_by_its_old_holder_leaves_the_queue():
    """A late push under an expired lease is applied: the requeued batch must not be leased
    again (another worker would compute it for nothing, and hold up a sync round)."""
    q = queue()
    a = q.lease("a", 0.0)
    assert q.expire(10.0) == [("a", a.batch)] and list(q.pending) == [a.batch, 1, 2]
    assert q.complete(0, a.batch)
    assert a.batch not in q.pending and q.progress()["pending"] == q.batches_per_epoch - 1
    assert [q.lease("b", 10.0).batch for _ in range(2)] == [1, 2]
    assert q.lease("b", 10.0) is None


def test_released_leases_go_to_the_front_and_only_the_workers_own():
    q = queue(num_samples=16)
    a1, b1, a2 = q.lease("a", 0.0), q.lease("b", 0.0), q.lease("a", 0.0)
    assert sorted(q.release_worker("a")) == [a1.batch, a2.batch]
    assert list(q.pending) == [a2.batch, a1.batch, 3]         # each requeued batch goes to the front
    assert set(q.leases) == {b1.batch}
    assert q.release(0, b1.batch) and not q.release(0, b1.batch)
    assert q.requeued_total == 3


def test_a_release_naming_an_old_epoch_leaves_this_epochs_lease_alone():
    """A rejected push for (epoch 0, batch b) must not requeue the lease on batch b of epoch 1,
    which its holder is still computing."""
    q = queue()
    for b in range(q.batches_per_epoch):
        q.lease("w", 0.0)
        q.complete(0, b)
    assert q.epoch == 1
    lease = q.lease("a", 0.0)
    assert lease.batch == 0 and lease.epoch == 1
    assert q.release(0, 0) is False
    assert q.leases[0] is lease and 0 not in q.pending and q.requeued_total == 0
    assert q.release(1, 0) is True and list(q.pending) == [0, 1, 2]


def test_state_dict_resumes_the_epoch_and_leases_start_over():
    q = queue(num_samples=12)
    first = q.lease("a", 0.0)
    q.complete(0, first.batch)
    q.lease("a", 0.0)                                          # in flight: not saved, handed out again
    r = WorkQueue(12, 4, 2, 5.0, epoch=q.state_dict()["epoch"], applied=q.state_dict()["applied"])
    assert r.applied == {first.batch} and list(r.pending) == [1, 2]
    assert not r.granted("a", 0, 1, 2)                         # a lease of the previous incarnation


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="must all be >= 1"):
        WorkQueue(0, 4, 1, 5.0)


# ======================================================================== boundaries and corners
# Each test below pins one behaviour a mutation audit of server/work.py found unchecked: batch and
# epoch boundaries, lease deadlines, requeues after the first epoch, what progress() reports.

def finish_epoch(q, worker="w", now=0.0):
    """Lease and complete every batch of the current epoch."""
    epoch = q.epoch
    while q.epoch == epoch and not q.done:
        lease = q.lease(worker, now)
        assert q.complete(epoch, lease.batch)


def test_batch_numbers_outside_the_epoch_are_never_live():
    """Batch numbers run 0 .. batches_per_epoch - 1: a push for batch -1 or batches_per_epoch counts for nothing
    (counted, it would fill the epoch's applied set without a real batch)."""
    q = queue()
    assert q.batches_per_epoch == 3
    assert not q.is_live(0, 3) and not q.complete(0, 3)
    assert not q.is_live(0, -1) and not q.complete(0, -1)
    assert q.is_live(0, 2)
    assert q.applied == set() and q.progress()["applied_in_epoch"] == 0


def test_nothing_is_live_once_the_run_is_done():
    """After the last epoch, a push naming the current epoch number (== epochs) is not applied,
    and the queue does not count past its total."""
    q = queue()
    finish_epoch(q)
    finish_epoch(q)
    assert q.done and q.epoch == 2
    assert not q.is_live(2, 0) and q.complete(2, 0) is False
    assert q.epoch == 2 and q.applied == set()
    assert q.progress()["batches_done"] == q.progress()["batches_total"] == 6


def test_a_lease_of_this_epoch_does_not_grant_a_push_naming_another_epoch():
    """granted() checks the epoch a push names, not only the lease id and batch."""
    q = queue()
    finish_epoch(q)
    lease = q.lease("a", 0.0)
    assert (lease.epoch, lease.batch) == (1, 0)
    assert q.granted("a", 1, 0, lease.lease_id)
    assert not q.granted("a", 0, 0, lease.lease_id)
    assert not q.granted("a", 2, 0, lease.lease_id)


def test_a_lease_runs_for_lease_timeout_and_expires_only_past_its_deadline():
    """deadline = lease time + lease_timeout; expire() takes leases strictly past it."""
    q = queue(lease_timeout=5.0)
    lease = q.lease("a", 100.0)
    assert lease.deadline == 105.0
    assert q.expire(104.0) == [] and q.expire(105.0) == []
    assert q.leases[lease.batch] is lease
    assert q.expire(105.5) == [("a", lease.batch)] and lease.batch in q.pending


def test_a_completed_batch_leaves_no_lease_behind():
    """complete() drops the batch's lease: it is no longer in flight, held, or requeued when its
    worker leaves (which would hand an applied batch out again)."""
    q = queue()
    a, b = q.lease("a", 0.0), q.lease("a", 0.0)
    assert q.complete(0, a.batch)
    assert a.batch not in q.leases and q.held_by("a") == [b.batch]
    assert q.progress()["in_flight"] == 1
    assert q.release_worker("a") == [b.batch]
    assert list(q.pending) == [b.batch, 2] and q.requeued_total == 1
    assert q.expire(1e9) == []


def test_a_departed_workers_leases_are_requeued_in_a_later_epoch_too():
    """release_worker() requeues the leases of the current epoch, whatever its number."""
    q = queue()
    finish_epoch(q)
    lease = q.lease("a", 0.0)
    assert q.release_worker("a") == [lease.batch]
    assert lease.batch not in q.leases and list(q.pending) == [0, 1, 2] and q.requeued_total == 1


def test_expired_leases_are_requeued_in_a_later_epoch_too():
    """expire() requeues the leases of the current epoch, whatever its number."""
    q = queue(lease_timeout=5.0)
    finish_epoch(q)
    lease = q.lease("a", 0.0)
    assert q.expire(10.0) == [("a", lease.batch)]
    assert lease.batch not in q.leases and list(q.pending) == [0, 1, 2] and q.requeued_total == 1


def test_nothing_is_pending_once_the_run_is_done():
    """progress() of a finished run has no pending batches (and none in flight)."""
    q = queue()
    finish_epoch(q)
    finish_epoch(q)
    p = q.progress()
    assert q.done and p["pending"] == 0 and p["in_flight"] == 0 and len(q.pending) == 0


@pytest.mark.parametrize("sizes", [(10, 4, 0), (10, 0, 1), (0, 4, 1), (10, 4, -1)])
def test_every_size_below_one_is_refused(sizes):
    """num_samples, batch_size and epochs must each be >= 1."""
    with pytest.raises(ValueError, match="must all be >= 1"):
        WorkQueue(*sizes, 5.0)


def test_progress_counts_leases_in_flight_and_applied_batches_apart():
    """in_flight is the leases outstanding now; applied_in_epoch only the batches applied."""
    q = queue(num_samples=16)
    a, b, c = (q.lease("w", 0.0) for _ in range(3))
    p = q.progress()
    assert (p["in_flight"], p["applied_in_epoch"], p["pending"], p["batches_done"]) == (3, 0, 1, 0)
    q.complete(0, a.batch)
    q.release(0, b.batch)
    p = q.progress()
    assert (p["in_flight"], p["applied_in_epoch"], p["pending"], p["batches_done"]) == (1, 1, 2, 1)


def test_progress_of_a_queue_resumed_at_or_past_its_last_epoch_does_not_exceed_the_total():
    """batches_done never exceeds batches_total, whatever epoch and applied set the queue resumes with."""
    for kw in ({"epoch": 2}, {"epoch": 3}, {"epoch": 2, "applied": [0, 1]}):
        q = queue(**kw)
        p = q.progress()
        assert q.done and p["batches_done"] == p["batches_total"] == 6, kw
        assert q.lease("w", 0.0) is None and p["pending"] == 0


def test_a_release_naming_its_holder_gives_back_only_that_holders_lease():
    q = queue(num_samples=16)
    a = q.lease("a", 0.0)
    assert not q.release(0, a.batch, holder="b") and a.batch in q.leases
    assert q.release(0, a.batch, holder="a") and list(q.pending)[0] == a.batch


def test_a_handed_in_batch_is_neither_expired_nor_requeued_with_its_worker():
    """A sync push waits in its round unleased: requeued, another worker could compute it again."""
    q = queue(num_samples=16)
    a, b = q.lease("a", 0.0), q.lease("a", 0.0)
    q.hand_in(1, a.batch)                               # another epoch's: this epoch's lease stays
    assert a.batch in q.leases
    q.hand_in(0, a.batch)
    assert q.expire(1e9) == [("a", b.batch)] and q.release_worker("a") == []
    assert a.batch not in q.pending and q.is_live(0, a.batch)
    assert q.complete(0, a.batch) and a.batch in q.applied


def test_a_requeued_batch_is_taken_back_once_for_a_late_push_never_from_its_new_holder():
    """A sync push under an expired lease joins its round if nobody took the batch since."""
    q = queue(num_samples=16)
    a = q.lease("a", 0.0)
    assert q.expire(1e9) == [("a", a.batch)] and list(q.pending)[0] == a.batch
    assert q.reclaim(0, a.batch) and a.batch not in q.pending and a.batch not in q.leases
    assert not q.reclaim(0, a.batch)                    # waits in the round now: not twice
    b = q.lease("b", 0.0)
    assert not q.reclaim(0, b.batch) and q.leases[b.batch].worker == "b"
    assert not q.reclaim(1, q.pending[0])               # another epoch's
    assert q.complete(0, a.batch) and not q.reclaim(0, a.batch)


def test_applying_a_leased_batch_does_not_scan_the_queue():
    """complete() looked for every applied batch in the queue (deque.remove: a scan of every pending
    batch, and an exception when, as almost always, it was leased and not there): 1.6 ms an update
    with --batch-size 1.  Only a requeued batch is looked for there now, and taken out."""
    class Counting(deque):
        scans = 0

        def remove(self, value):
            Counting.scans += 1
            super().remove(value)
    q = queue(num_samples=1000, batch_size=1)
    q.pending = Counting(q.pending)
    for _ in range(10):
        lease = q.lease("w", 0.0)
        assert q.complete(lease.epoch, lease.batch)
    assert Counting.scans == 0
    requeued = q.lease("a", 0.0)
    assert q.release(requeued.epoch, requeued.batch) and q.complete(requeued.epoch, requeued.batch)
    assert requeued.batch not in q.pending and Counting.scans == 1
    assert q.lease("b", 0.0).batch == requeued.batch + 1


class CountedLeases(dict):
    """A lease table that counts the leases read by walking it."""

    walked = 0

    def items(self):
        for item in super().items():
            self.walked += 1
            yield item

    def values(self):
        for value in super().values():
            self.walked += 1
            yield value

    def __iter__(self):
        for key in super().__iter__():
            self.walked += 1
            yield key


def test_what_one_worker_holds_is_found_without_walking_every_lease():
    """held_by, asked at every task request (the lease limit), walked all the leases: 43 us per
    request with 2,048 trainers at work.  It reads the worker's own now, and stays the table's
    own answer through leases, completions, requeues, hand-ins, expiries and a new epoch."""
    q = queue(num_samples=4096, batch_size=1, epochs=2)
    q.leases = CountedLeases(q.leases)
    for i in range(1000):
        q.lease(f"w{i}", 0.0)
    for worker in ("w7", "w8", "w9"):
        q.lease(worker, 10.0)           # batches 1000, 1001, 1002
    assert q.held_by("w7") == [7, 1000] and q.held_by("nobody") == []
    assert q.leases.walked == 0
    q.complete(0, 7)
    q.hand_in(0, 1001)
    q.release(0, 9, holder="w9")
    assert (q.held_by("w7"), q.held_by("w8"), q.held_by("w9")) == ([1000], [8], [1002])
    q.expire(7.0)                       # the leases of time 0 go back to the queue
    assert (q.held_by("w7"), q.held_by("w8"), q.held_by("w9")) == ([1000], [], [1002])
    assert q.release_worker("w9") == [1002] and q.held_by("w9") == []
    while (lease := q.lease("w1", 0.0)) is not None:      # the rest of the epoch
        assert q.held_by("w1") == [lease.batch]
        q.complete(0, lease.batch)
    assert q.held_by("w7") == [1000]
    assert q.complete(0, 1000) and q.complete(0, 1001) and q.epoch == 1     # w7's, and w8's handed in
    assert q.held_by("w7") == q.held_by("w1") == []
    assert q.lease("w1", 0.0).batch == 0 and q.held_by("w1") == [0]


def test_a_lease_remembers_the_weights_version_it_was_granted_with():
    q = queue()
    lease = q.lease("a", 0.0, version=7)
    assert q.granted_version(lease.lease_id) == 7
    assert q.granted_version(lease.lease_id + 1) is None


def test_postpone_moves_every_deadline_later_by_the_time_given():
    q = queue(lease_timeout=5.0)
    lease = q.lease("a", 100.0)
    q.postpone(3.0)
    assert lease.deadline == 108.0
    assert q.expire(107.0) == [] and q.expire(108.5) == [("a", lease.batch)]


def test_only_a_batchs_last_grants_per_batch_leases_grant_a_late_push():
    q = queue()
    ids = []
    for _ in range(WorkQueue.GRANTS_PER_BATCH + 1):      # lease batch 0, give it back, again
        lease = q.lease("a", 0.0)
        assert lease.batch == 0
        ids.append(lease.lease_id)
        q.release(0, 0)
    assert not q.granted("a", 0, 0, ids[0])
    assert all(q.granted("a", 0, 0, i) for i in ids[1:])
    assert len(q.grants) == WorkQueue.GRANTS_PER_BATCH
