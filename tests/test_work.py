"""server.work.WorkQueue: leases, exactly-once completion, requeues, and who may push what."""
import pytest

from server.work import WorkQueue


def queue(num_samples=10, batch_size=4, epochs=2, lease_timeout=5.0):
    return WorkQueue(num_samples, batch_size, epochs, lease_timeout)


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
