"""The parameter server's peer table against many peers and hostile ones: what each peer, or a
peer making up ids, can make the server keep or log.  In-process servers (``in_process``), driven
message by message over loopback sockets."""
from __future__ import annotations

import logging
import random
import re
import time
from collections import Counter
from pathlib import Path

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


def _counted(lines: list[str], logged: str, what: str) -> tuple[int, list[int]]:
    """(lines containing ``logged``, the N of each "N more <what> in the last S s" summary)."""
    rx = re.compile(rf"^(\d+) more {what} in the last \d+\.\d s were not logged one by one")
    return sum(logged in line for line in lines), [int(m.group(1)) for m in map(rx.match, lines) if m]


def test_a_peer_joining_and_leaving_under_new_ids_does_not_flood_the_log(in_process, caplog):
    """Each hello from a new id was logged, and each bye, whatever their rate: a peer making up an id
    for each hello and leaving at once wrote two lines a message.  Beyond what any real run makes
    (every peer the server admits joining, or leaving, within one second, and at least 64) they
    are counted, and one line a second says how many."""
    server = in_process(max_workers=2)
    raw = server.client()
    srv, cycles = server.srv, 0
    with caplog.at_level(logging.INFO, logger="pscnn.server"):
        # until both kinds went past their limit within one second (bounded: a slow machine may not at once)
        while cycles < 200 or not (srv.log_joins.unlogged and srv.log_leaves.unlogged) and cycles < 20_000:
            raw.wid = f"made-up-{cycles}"
            assert server.call(raw, P.HELLO, {"role": "trainer", "name": raw.wid}).type == P.WELCOME
            assert server.call(raw, P.BYE, {"reason": "again"}).type == P.ACK
            cycles += 1
        for limited in srv.rate_limited_logs:
            limited.flush(time.monotonic(), final=True)
    lines = [r.getMessage() for r in caplog.records]
    for logged, what in (("trainer joined: made-up-", "joins"), ("left (again)", "leaves")):
        count, mores = _counted(lines, logged, what)
        assert mores and count + sum(mores) == cycles, (what, count, mores)
    records = (Path(srv.cfg.out) / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 2 * cycles           # metrics.jsonl records every join and leave


def test_a_run_starting_with_64_workers_logs_every_join(in_process, caplog):
    """The joins of a real run are never summarised: 64 trainers and the evaluator joining at once."""
    server = in_process()
    with caplog.at_level(logging.INFO, logger="pscnn.server"):
        for i in range(65):
            raw = server.client()
            role = "evaluator" if i == 64 else "trainer"
            assert server.call(raw, P.HELLO, {"role": role, "name": f"worker-{i}"}).type == P.WELCOME
    joins = [r.getMessage() for r in caplog.records if " joined: worker-" in r.getMessage()]
    assert len(joins) == 65 and joins[-1].startswith("evaluator joined: worker-64"), joins[-3:]
