"""server.consistency: SSP's clocks."""
from server.consistency import ssp_floor, ssp_start_clock
from server.peers import Peer
from server.work import Lease


def peer(wid, clock, role="trainer"):
    return Peer(wid=wid, role=role, name=wid, rid=wid.encode(), last_seen=0.0, clock=clock)


def lease(worker, batch):
    return Lease(epoch=0, batch=batch, lease_id=batch, worker=worker, deadline=1.0, size=1)


def test_a_trainer_back_at_work_starts_from_the_slowest_other_trainer_not_its_own_clock():
    peers = {p.wid: p for p in (peer("back", 2), peer("other", 7), peer("ev", 0, role="evaluator"))}
    # none at work: the slowest of the other trainers (itself and the evaluator aside)
    assert ssp_start_clock(peers["back"], peers, ssp_floor(peers, [])) == 7
    # at work: the slowest of those holding a lease
    peers["slow"] = peer("slow", 4)
    assert ssp_start_clock(peers["back"], peers, ssp_floor(peers, [lease("slow", 0), lease("other", 1)])) == 4
    # never lower than its own
    assert ssp_start_clock(peer("ahead", 9), peers, 4) == 9
