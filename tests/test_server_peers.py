"""The parameter server's peer table against many peers and hostile ones: what each peer, or a
peer making up ids, can make the server keep or log.  In-process servers (``in_process``), driven
message by message over loopback sockets."""
from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from pscnn import protocol as P
from test_server_robustness import in_process  # noqa: F401  (a fixture)

pytestmark = pytest.mark.timeout(120)


def recount(srv) -> Counter:
    """The role counts, counted afresh from the peer table."""
    return Counter({role: 0 for role in P.ROLES}) + Counter(p.role for p in srv.peers.values())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_role_counts_are_the_peer_tables_after_any_joins_rejoins_byes_and_deaths(in_process, seed):
    """hello's "server full", status and "is there an evaluator" read per-role counts kept as peers
    come and go, instead of walking the table on every message (85 us with 1,000 peers): after any
    sequence of joins, rejoins under the same id as the other role, refusals of a full server,
    byes, deaths and returns, they are the table's own count, and status says so."""
    rng = random.Random(seed)
    server = in_process(max_workers=3, checkpoint_every=0, peer_timeout=10.0)
    srv = server.srv
    raws = [server.client() for _ in range(8)]
    for step in range(120):
        raw = rng.choice(raws)
        op = rng.choice(["hello", "hello", "bye", "death"])
        if op == "hello":           # a join, a rejoin as the same or the other role, or a return
            role = rng.choice(P.ROLES)
            full = raw.wid not in srv.peers or srv.peers[raw.wid].role != role
            full = full and sum(p.role == role for p in srv.peers.values()) >= 3
            reply = server.call(raw, P.HELLO, {"role": role, "name": raw.wid})
            assert reply.type == (P.ERROR if full else P.WELCOME), (step, reply.body)
        elif op == "bye" and raw.wid in srv.peers:
            assert server.call(raw, P.BYE, {"reason": "test"}).type == P.ACK
        elif op == "death" and raw.wid in srv.peers:
            srv.peers[raw.wid].last_seen -= 60.0
            srv._housekeeping(time.monotonic())
            assert raw.wid not in srv.peers
        assert srv.role_counts == recount(srv), (step, op)
        status = server.call(raw, P.STATUS).body["progress"]
        assert (status["trainers"], status["evaluators"]) == (recount(srv)["trainer"], recount(srv)["evaluator"])
