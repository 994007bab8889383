"""Opt-in CURVE authentication and encryption (pscnn.curve): the keys, the refusals, a run with them.

Everything binds 127.0.0.1 on free ports; every wait is bounded, and every process and socket a
test starts is stopped at its end.  A refused client must say so in one line naming the remedy,
long before its --give-up-after (600 s here), while the server goes on serving the others.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import zmq

from helpers import error_line, one_line_naming
from pscnn import curve
from pscnn import protocol as P
from pscnn.cli import main
from pscnn.launcher import LocalCluster, free_port, local_endpoint, make_run_keys, wait_for
from test_server_robustness import InProcess, Raw, grads_like, push_body
from worker.client import Client, query_status

ROOT = Path(__file__).resolve().parents[1]


def test_pscnn_keys_writes_one_folder_per_role_with_secrets_for_their_owner_only(tmp_path, capsys):
    assert main(["keys", str(tmp_path / "k"), "--clients", "2"]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "k" / "server") in printed and str(tmp_path / "k" / "client-1") in printed
    server = curve.server_keys(tmp_path / "k" / "server")
    clients = [curve.client_keys(tmp_path / "k" / f"client-{i}") for i in range(2)]
    # each named by its file, for the server's log lines; its own too: pscnn status beside it
    assert server.authorized == {clients[0].public: "client-0", clients[1].public: "client-1", server.public: "server"}
    assert all(c.server_public == server.public for c in clients)
    for secret in tmp_path.glob("k/**/*.key_secret"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    # new keys over old ones would lock out every client holding the old: refused, nothing replaced
    before = (tmp_path / "k" / "server" / "server.key_secret").read_bytes()
    assert main(["keys", str(tmp_path / "k")]) == 1
    error_line(capsys.readouterr().err, tmp_path / "k" / "server", "already exists")
    assert (tmp_path / "k" / "server" / "server.key_secret").read_bytes() == before
    (tmp_path / "file").write_text("")
    assert main(["keys", str(tmp_path / "file")]) == 1
    error_line(capsys.readouterr().err, tmp_path / "file", "is a file, not a folder")
    # a billion key pairs would fill the disk with inodes before it ended: a usage error, nothing written
    with pytest.raises(SystemExit) as stop:
        main(["keys", str(tmp_path / "many"), "--clients", "1000000000"])
    assert stop.value.code == 2 and "--clients: must be at most 10000" in capsys.readouterr().err
    assert not (tmp_path / "many").exists()


def _break(path, text):
    path.write_text(text)


@pytest.mark.parametrize("damage, load, named", [
    (lambda k: shutil.rmtree(k / "client-0"), "client", "client-0"),
    (lambda k: (k / "client-0" / "server.key").unlink(), "client", "server.key"),
    (lambda k: _break(k / "client-0" / "client-0.key_secret", "not a certificate\n"), "client", "client-0.key_secret"),
    (lambda k: _break(k / "client-0" / "client-0.key_secret",
                      (k / "client-0" / "client-0.key").read_text()), "client", "client-0.key_secret"),
    (lambda k: _break(k / "client-0" / "server.key", 'curve\n    public-key = "tooshort"\n'), "client", "server.key"),
    (lambda k: (k / "server" / "server.key_secret").unlink(), "server", "server.key_secret"),
    (lambda k: None, "server of a client's folder", "holds a client's keys"),
    (lambda k: None, "client of the keys' folder", "makes DIR/server for the server and DIR/client-N"),
    (lambda k: (k / "server" / "authorized" / "client-0.key").unlink(), "server", "authorized"),
    (lambda k: _break(k / "server" / "authorized" / "client-0.key", "garbage\n"), "server", "client-0.key"),
])
def test_a_missing_or_bad_key_file_is_one_line_naming_it(tmp_path, damage, load, named):
    keys = tmp_path / "k"
    curve.make_keys(keys, ["client-0"])
    damage(keys)
    with pytest.raises(curve.KeysError) as err:
        if load.startswith("server"):
            curve.server_keys(keys / ("server" if load == "server" else "client-0"))
        elif load == "client of the keys' folder":       # pscnn keys' FOLDER itself, not FOLDER/client-0
            curve.client_keys(keys)
        else:
            curve.client_keys(keys / "client-0")
    one_line_naming(err.value, named)


def test_a_key_folder_this_user_cannot_read_is_said_so_not_taken_for_missing_files(tmp_path, monkeypatch):
    """Key folders are their owner's only (0700): in a container running as another uid, every file in
    one read as missing ("no such certificate file"), which sent the user looking for the wrong thing."""
    curve.make_keys(tmp_path / "k", ["client-0"])
    monkeypatch.setattr(curve.os, "access", lambda path, mode: False)      # (root reads everything)
    monkeypatch.setattr(curve.os, "getuid", lambda: 10001)
    for load, folder in ((curve.server_keys, "server"), (curve.client_keys, "client-0")):
        with pytest.raises(curve.KeysError) as err:
            load(tmp_path / "k" / folder)
        one_line_naming(err.value, tmp_path / "k" / folder, "permission denied", "runs as uid 10001")


def test_a_worker_with_a_bad_key_folder_stops_at_once_with_the_line(tmp_path, capsys):
    # before it loads any data or waits for any server
    code = main(["worker", "--server", "tcp://127.0.0.1:1", "--keys", str(tmp_path / "nowhere")])
    assert code == 1
    error_line(capsys.readouterr().err, tmp_path / "nowhere", "no such folder")


@pytest.fixture
def keys(tmp_path):
    """A server's and a client's keys (and a LocalCluster's own, "run"), and an unauthorized client's
    that holds the server's right public key."""
    folder = tmp_path / "keys"
    curve.make_keys(folder, ["client-0", "run", "stranger"])
    (folder / "server" / "authorized" / "stranger.key").unlink()
    return folder


@pytest.fixture
def router():
    """A bare ROUTER on 127.0.0.1 (a plain or, after secure(), a CURVE server) that never answers."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    started = []

    def bind(keys: curve.ServerKeys | None = None) -> str:
        if keys is not None:
            curve.secure_server(sock, keys)
            started.append(curve.start_authenticator(ctx, keys))
        endpoint = local_endpoint(free_port())
        sock.bind(endpoint)
        return endpoint
    yield bind
    sock.close(linger=0)
    for auth in started:
        auth.stop()


def _refused(endpoint: str, keys: curve.ClientKeys | None) -> str:
    """What Client.connect raises at ``endpoint``: a HandshakeFailed, however long its give_up_after."""
    client = Client(endpoint, "trainer", heartbeat=False, give_up_after=600, keys=keys)
    try:
        with pytest.raises(curve.HandshakeFailed) as err:
            client.connect()
    finally:
        client.close()
    return str(err.value)


def test_a_curve_client_of_a_plain_server_is_told_so(router, keys):
    endpoint = router()
    one_line_naming(_refused(endpoint, curve.client_keys(keys / "client-0")), endpoint, "does not use CURVE",
                    "--keys")
    with pytest.raises(curve.HandshakeFailed, match="does not use CURVE"):
        query_status(endpoint, 30.0, curve.client_keys(keys / "client-0"))


# A CURVE server's socket in a process of its own (that of a pscnn server, without its ZAP handler, which a
# plain client never reaches): binds ENDPOINT with the keys of FOLDER ("plain": none) and says "ready"; then,
# for each line on its stdin, the number of plain clients its log would say it refused since the last
# (RefusedHandshakes), once there is one (10 s at most).
CURVE_ROUTER_PROCESS = """
import sys, zmq
from pscnn import curve
ctx = zmq.Context()
sock = ctx.socket(zmq.ROUTER)
sock.linger = 0
refused = curve.RefusedHandshakes(sock)
if sys.argv[1] != "plain":
    curve.secure_server(sock, curve.server_keys(sys.argv[1]))
sock.bind(sys.argv[2])
print("ready", flush=True)
for _ in sys.stdin:
    refused.monitor.poll(10_000)
    print(sum("without CURVE keys" in line for line in refused.failures(1000)), flush=True)
refused.close()
sock.close()
ctx.term()
"""


def _curve_router_process(keys, endpoint: str) -> subprocess.Popen:
    """The CURVE_ROUTER_PROCESS binding ``endpoint``, with the server keys in ``keys`` (None: plain)."""
    folder = "plain" if keys is None else str(keys / "server")
    server = subprocess.Popen([sys.executable, "-c", CURVE_ROUTER_PROCESS, folder, endpoint],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    assert server.stdout.readline() == "ready\n", server.stderr.read()
    return server


def _endpoint(transport: str, tmp_path) -> str:
    """A free endpoint of 127.0.0.1 ("tcp"), or a Unix socket in ``tmp_path`` ("ipc")."""
    return local_endpoint(free_port()) if transport == "tcp" else f"ipc://{tmp_path}/server.ipc"


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_a_plain_status_query_of_a_curve_server_in_another_process_is_told_so_each_time(keys, transport, tmp_path):
    """The server closes the connection on a plain client's greeting, and the client's ZeroMQ reports the
    mismatch only when it has read the server's greeting first.  In one process (one I/O thread) it always
    had; between two, pscnn status --timeout 1 said "no answer" instead, 4 times in 16 (over ipc://, where
    the greeting probe asked nothing, 6 times in 16).  Each query here (several: the race is not every
    time) must say what is wrong."""
    endpoint = _endpoint(transport, tmp_path)
    server = _curve_router_process(keys, endpoint)
    try:
        for _ in range(12):
            with pytest.raises(curve.HandshakeFailed, match=f"^{endpoint} requires CURVE authentication"):
                query_status(endpoint, 1.0)
    finally:
        if server.poll() is None:
            server.kill()
        server.communicate(timeout=10)


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_a_curve_status_query_of_a_plain_server_in_another_process_is_told_so_each_time(keys, transport, tmp_path):
    """The same race the other way round: ZeroMQ reported the mismatch about half the time, and three
    handshakes failed without a reason blamed the client's server.key, until the greeting probe read the
    server's mechanism.  Over ipc:// it read none, and the key was blamed 3 times in 16 (pscnn status)."""
    endpoint = _endpoint(transport, tmp_path)
    server = _curve_router_process(None, endpoint)
    try:
        for _ in range(20):
            with pytest.raises(curve.HandshakeFailed, match=f"^{endpoint} does not use CURVE"):
                query_status(endpoint, 30.0, curve.client_keys(keys / "client-0"))
    finally:
        if server.poll() is None:
            server.kill()
        server.communicate(timeout=10)


def test_the_greeting_probe_reads_a_unix_sockets_server_too(tmp_path, monkeypatch):
    """An ipc:// endpoint's server sends ZeroMQ's greeting on its Unix socket as a TCP one does; the probe
    took every ipc:// peer for a ZeroMQ peer of no known mechanism.  Linux's abstract names (ipc://@NAME) too."""
    monkeypatch.setattr(curve, "GREETING_TIMEOUT_S", 30.0)     # a bound, not a timing: the answer ends the wait
    ctx = zmq.Context.instance()
    endpoints = [f"ipc://{tmp_path}/plain.ipc", f"ipc://@pscnn-test-{tmp_path.name}"]
    sockets = [ctx.socket(zmq.ROUTER) for _ in endpoints]
    try:
        for sock, endpoint in zip(sockets, endpoints):
            sock.bind(endpoint)
            greeting = curve.HandshakeWatch(endpoint, None)._greeting(deadline=math.inf)
            assert curve.greeting_mechanism(greeting or b"") == b"NULL", (endpoint, greeting)
        assert curve.HandshakeWatch(f"ipc://{tmp_path}/nothing.ipc", None)._greeting(deadline=math.inf) is None
    finally:
        for sock in sockets:
            sock.close(linger=0)


def test_the_greeting_probe_of_an_endpoint_neither_tcp_nor_ipc_reads_nothing():
    """An inproc:// endpoint (a Client in the same process) has no socket of the operating system's to
    connect to: no greeting (None, as from a silent peer), not a TypeError out of the client's check."""
    assert curve.HandshakeWatch("inproc://pscnn-test", None)._greeting(deadline=math.inf) is None


@pytest.fixture
def http_server():
    """An HTTP server (the standard library's) on a free port of 127.0.0.1: another service where a pscnn
    server was expected.  Threaded: ZeroMQ's own connection holds a handler for good (no line's end comes)."""
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="http-server", daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(30)


@pytest.mark.parametrize("client_keys", [None, "client-0"], ids=["plain", "curve"])
def test_a_client_of_a_service_that_is_not_zeromq_is_told_so_at_once(http_server, keys, client_keys):
    """A service of another protocol never completes ZeroMQ's handshake, and libzmq says nothing of it: a
    worker, evaluator or pscnn status at an HTTP server's port waited out its --give-up-after (600 s here;
    --timeout 30) and said "no usable answer".  The greeting probe reads what the service answers."""
    client_keys = curve.client_keys(keys / client_keys) if client_keys else None
    with pytest.raises(curve.HandshakeFailed, match=f"^{http_server} is not a ZeroMQ peer"):
        query_status(http_server, 30.0, client_keys)
    one_line_naming(_refused(http_server, client_keys), http_server, "is not a ZeroMQ peer (it answered '<!DOCTYPE HTML>")


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_a_curve_server_in_another_process_sees_each_plain_client_it_refused(keys, transport, tmp_path):
    """Of the two ZeroMQs, the one that reads the other's mechanism first closes the connection, and the
    other sees it lost: a plain client that read the server's first was refused with no trace in the
    server's log (a plain pscnn worker, 2 times in 8 between two processes; the server logs what its
    socket's monitor reports, as the child here counts it).  Each refused query must be seen there.  Over
    a Unix socket (ipc://) the plain greeting that tells the server goes on that socket, not the probe that
    only asks the server's greeting (which the server never reads a mechanism from, and never logs)."""
    endpoint = _endpoint(transport, tmp_path)
    server = _curve_router_process(keys, endpoint)
    try:
        for _ in range(10):
            with pytest.raises(curve.HandshakeFailed, match="requires CURVE authentication"):
                query_status(endpoint, 2.0)
            server.stdin.write("report\n")
            server.stdin.flush()
            assert int(server.stdout.readline()) >= 1, "a plain client refused without the server's knowing"
    finally:
        if server.poll() is None:
            server.kill()
        server.communicate(timeout=10)


def test_the_greeting_probe_reads_a_servers_mechanism_without_sending_it_ours(keys):
    """What tells a plain server from one that cannot read our hello: each one's greeting names its
    mechanism.  The probe sends no mechanism of its own: a plain server's handshake with it fails
    for its close, not for a mismatch a server could log."""
    from zmq.utils.monitor import recv_monitor_message
    ctx = zmq.Context.instance()
    plain, secure = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    curve.secure_server(secure, curve.server_keys(keys / "server"))
    monitor = plain.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    try:
        addresses = []
        for sock in (plain, secure):
            endpoint = local_endpoint(free_port())
            sock.bind(endpoint)
            addresses.append(P.tcp_address(endpoint))
        greetings = [curve.peer_greeting(*address, timeout=30.0) for address in addresses]
        assert [len(greeting) for greeting in greetings] == [curve.ZMTP_GREETING_BYTES] * 2
        assert [curve.greeting_mechanism(greeting) for greeting in greetings] == [b"NULL", b"CURVE"]
        assert curve.greeting_mechanism(greetings[1][:20]) is None      # cut short: no mechanism to go by
        assert monitor.poll(30_000), "the plain server saw no end of the probe's handshake"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    finally:
        plain.disable_monitor()
        monitor.close(linger=0)
        for sock in (plain, secure):
            sock.close(linger=0)


def test_a_client_with_another_servers_public_key_is_told_so(router, keys, tmp_path):
    curve.make_keys(tmp_path / "other", ["client-0"])
    endpoint = router(curve.server_keys(keys / "server"))
    wrong = curve.client_keys(tmp_path / "other" / "client-0")
    one_line_naming(_refused(endpoint, wrong), endpoint, tmp_path / "other" / "client-0" / "server.key")


def _worker(endpoint: str, mnist_dir: str, *flags) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pscnn.cli", "worker", "--server", endpoint, "--mnist-dir",
                             mnist_dir, "--give-up-after", "600", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_with_curve_an_authorized_worker_trains_while_strangers_and_plain_clients_are_refused(
        tmp_path, mnist_dir, keys):
    cluster = LocalCluster(tmp_path / "run", keys=keys)
    refused = []
    try:
        cluster.start_server(["--model", "light", "--train-limit", "640", "--test-limit", "200", "--batch-size", "64",
                              "--mnist-dir", mnist_dir, "--out", str(cluster.out), "--final-eval-timeout", "0"])
        wait_for(lambda: cluster.status(0.5) is not None, 60, "the CURVE server to answer its status")
        for flags in (["--keys", str(keys / "stranger")], []):
            refused.append(_worker(cluster.endpoint, mnist_dir, *flags))
        outcomes = []
        for proc in refused:
            _, err = proc.communicate(timeout=60)       # far below their --give-up-after
            outcomes.append((proc.returncode, err))
        assert outcomes[0][0] == 1, outcomes[0][1][-2000:]
        error_line(outcomes[0][1], cluster.endpoint, "refused this client's CURVE key",
                   keys / "stranger" / "stranger.key")
        assert outcomes[1][0] == 1, outcomes[1][1][-2000:]
        error_line(outcomes[1][1], cluster.endpoint, "requires CURVE authentication", "--keys")
        # pscnn status: plain, refused in one line; with a client's keys, it answers
        plain = subprocess.run([sys.executable, "-m", "pscnn.cli", "status", "--server", cluster.endpoint,
                                "--timeout", "30"], capture_output=True, text=True, timeout=60)
        assert plain.returncode == 1
        error_line(plain.stderr, "requires CURVE authentication")
        status = subprocess.run([sys.executable, "-m", "pscnn.cli", "status", "--server", cluster.endpoint,
                                 "--keys", str(keys / "client-0")], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and json.loads(status.stdout)["version"] == 0, status.stderr
        # ... and with the server's own folder: the healthcheck in the server's container, whose PSCNN_KEYS it shares
        assert query_status(cluster.endpoint, 30.0, curve.client_keys(keys / "server")) is not None
        # the server kept serving: the authorized worker trains the whole run
        cluster.start_worker("client-0", ["--mnist-dir", mnist_dir, "--give-up-after", "60"])
        assert cluster.wait("server", 120) == 0, cluster.log_tail("server", 40)
        assert cluster.wait("client-0", 30) == 0, cluster.log_tail("client-0", 40)
        summary = json.loads((cluster.out / "summary.json").read_text())
        assert summary["samples_applied"] == 640 and summary["workers"] == 1
        server_log = cluster.log_tail("server", 200)
        assert "CURVE" in server_log and "is not in" in server_log     # the stranger's key, named
    finally:
        for proc in refused:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        cluster.close()


@pytest.mark.slow
def test_pscnn_run_with_curve_trains_end_to_end(tmp_path, mnist_dir, capsys):
    out = tmp_path / "run"
    code = main(["run", "--curve", "--workers", "2", "--model", "light", "--train-limit", "640", "--test-limit",
                 "200", "--mnist-dir", mnist_dir, "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples_applied"] == 640 and summary["workers"] == 2
    assert json.loads((out / "config.json").read_text())["server"]["keys"] == str(out / "keys" / "server")
    assert sorted(p.name for p in (out / "keys").iterdir()) == ["evaluator", "run", "server", "worker-0", "worker-1"]
    first = curve.server_keys(out / "keys" / "server").public
    assert make_run_keys(out, 1) == out / "keys"                # a later run makes its own
    assert curve.server_keys(out / "keys" / "server").public != first


SERVER_FLAGS = ["--model", "light", "--train-limit", "640", "--batch-size", "64", "--epochs", "50", "--mode", "async",
                "--checkpoint-every", "0", "--log-rejected", "0"]      # no MNIST: it never scores the weights


def _log_lines(cluster: LocalCluster, needle: str, count: int, timeout: float = 10) -> list[str]:
    """The server's log lines holding ``needle``, once there are ``count`` of them (``timeout`` s at most)."""
    found = []

    def enough() -> bool:
        found[:] = [line for line in (cluster.logs / "server.log").read_text().splitlines() if needle in line]
        return len(found) >= count
    wait_for(enough, timeout, f"{count} server log lines with {needle!r}",
             on_fail=lambda: cluster.log_tail("server", 30))
    return found


def _refused_until_logged(cluster: LocalCluster, keys: curve.ClientKeys | None, needle: str) -> str:
    """The server's log line holding ``needle`` once a client with ``keys`` was refused (at most 5 tries).

    A refused client gives up at once and closes its connection: on a loaded machine it may
    do so before the server's side of the connection has read its greeting, and the server then
    sees a connection lost, not a handshake refused (once in a few tries with two busy cores).
    A real client started again knocks again, as this does."""
    for attempt in range(5):
        _refused(cluster.endpoint, keys)
        try:
            return _log_lines(cluster, needle, 1, timeout=3)[0]
        except RuntimeError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def test_the_server_logs_clients_that_cannot_complete_a_curve_handshake(tmp_path):
    """A plain client, or one holding another server's public key, was refused in silence on the
    server's side (the ZAP handler never hears of them): its operator saw only trainers missing."""
    keys = tmp_path / "keys"
    curve.make_keys(keys, ["run"])
    curve.make_keys(tmp_path / "other", ["client-0"])
    cluster = LocalCluster(tmp_path / "run", keys=keys)
    try:
        cluster.start_server([*SERVER_FLAGS, "--out", str(cluster.out)])
        wait_for(lambda: cluster.status(0.5) is not None, 60, "the CURVE server to answer its status")
        plain = _refused_until_logged(cluster, None, "refused a client without CURVE keys")
        one_line_naming(plain, "--keys FOLDER (or PSCNN_KEYS)")
        wrong = _refused_until_logged(cluster, curve.client_keys(tmp_path / "other" / "client-0"), "could not decrypt")
        one_line_naming(wrong, "another server's public key", "server.key")
        assert cluster.status(5.0) is not None           # serving on
    finally:
        cluster.close()


def test_a_worker_id_is_bound_to_the_curve_key_it_joined_with(tmp_path):
    """A holder of another authorized key sent a push, a work request or a hello under a joined
    trainer's id, and the server took it as that trainer's: it could push in its name, take its
    leases back, or drop it with a hello.  Refused now, each in one log line, while the trainer
    trains on; the key it joined with may rejoin under its id (a client that lost its connection)."""
    keys = tmp_path / "keys"
    curve.make_keys(keys, ["client-0", "client-1", "run"])
    cluster = LocalCluster(tmp_path / "run", keys=keys)
    raws = []

    def raw(folder: str, wid: str | None = None, routing_id: bytes | None = None) -> Raw:
        raws.append(Raw(cluster.endpoint, wid, keys=curve.client_keys(keys / folder), routing_id=routing_id))
        return raws[-1]
    trainer_route = b"trainer-0/0123456789abcdef"       # a client's, kept across its reconnects
    try:
        cluster.start_server([*SERVER_FLAGS, "--out", str(cluster.out)])
        wait_for(lambda: cluster.status(0.5) is not None, 60, "the CURVE server to answer its status")
        trainer = raw("client-0", routing_id=trainer_route)
        trainer.hello("trainer")
        task = trainer.work()
        weights = task.arrays
        thief = raw("client-1", wid=trainer.wid)
        thief.seq = 100                     # ahead of the trainer's: not taken for a late duplicate
        for mtype, body, arrays in ((P.PUSH, push_body(task), grads_like(weights)), (P.WORK, {}, None),
                                    (P.HELLO, {"role": "trainer", "name": "thief"}, None)):
            reply = thief.call(mtype, body, arrays)
            assert reply.type == P.ERROR and reply.body["code"] == "wrong_key", (mtype, reply.body)
            assert "joined with another CURVE key" in reply.body["message"]
        for _ in range(3):                  # the trainer trains on: its pushes are applied, its lease was kept
            task = trainer.call(P.PUSH, push_body(task), grads_like(weights))
            assert task.type == P.TASK, task.body
        progress = cluster.status(5.0)
        assert progress["version"] == 3 and progress["trainers"] == 1, progress
        refusals = _log_lines(cluster, f"under worker id {trainer.wid}", 3)
        assert len(refusals) == 3 and "joined with CURVE key client-0) from a client with key client-1" in refusals[0], refusals
        # the same key rejoins under its id (its own seq goes on), and may after it left; another key may not
        again = raw("client-0", wid=trainer.wid, routing_id=trainer_route)     # the trainer, reconnected
        again.seq = trainer.seq
        again.hello("trainer")
        assert again.call(P.BYE, {"reason": "test"}).type == P.ACK
        for mtype, body in ((P.WORK, {}), (P.HELLO, {"role": "trainer", "name": "thief"})):
            reply = thief.call(mtype, body)     # not told why the peer was dropped, nor allowed to rejoin as it
            assert reply.type == P.ERROR and reply.body["code"] == "wrong_key", (mtype, reply.body)
        again.hello("trainer")
    finally:
        for r in raws:
            r.close()
        cluster.close()


def test_a_curve_server_reads_the_senders_key_past_the_routing_id(tmp_path, monkeypatch):
    """libzmq before 4.3.5 (pyzmq 25, pyproject's floor) gives the routing id frame of a message
    the server polled for no metadata: the server read the sender's key from it, got ZMQError, and
    answered every authorized worker's hello with internal_error.  Here the routing id frame is
    made as that libzmq gives it, whatever libzmq this machine has."""
    keys = tmp_path / "keys"
    curve.make_keys(keys, ["client-0"])
    server = InProcess(tmp_path / "run", keys=str(keys / "server"))
    raw = Raw(server.endpoint, keys=curve.client_keys(keys / "client-0"))
    handle = server.srv._on_frames_guarded

    def routing_id_without_metadata(frames):
        bare = zmq.Frame(frames[0].bytes)
        with pytest.raises(zmq.ZMQError):
            bare.get(curve.USER_ID)
        handle([bare, *frames[1:]])
    monkeypatch.setattr(server.srv, "_on_frames_guarded", routing_id_without_metadata)
    try:
        reply = server.call(raw, P.HELLO, {"role": "trainer", "name": raw.wid})
        assert reply.type == P.WELCOME, reply
        assert server.srv.peers[raw.wid].key == curve.client_keys(keys / "client-0").public.decode()
    finally:
        raw.close()
        server.srv._stop_curve()
        server.close()


def test_a_key_holder_connecting_under_a_trainers_worker_id_does_not_get_its_replies(tmp_path):
    """A client's routing id was its worker id, which others may know (status, logs).  The server's
    ROUTER hands a routing id over to the newest connection that claims it, dropping the older
    one: a holder of any authorized key who connected under a trainer's id took the trainer's
    replies, and the two connections then took the id from each other at every reconnect.  The
    routing id now carries a secret token as well: the thief's connection is another peer's, the
    trainer's requests are answered at the first try, and neither connection is dropped."""
    keys = tmp_path / "keys"
    curve.make_keys(keys, ["client-0", "client-1", "run"])
    cluster = LocalCluster(tmp_path / "run", keys=keys)
    trainer = thief = monitor = None
    try:
        cluster.start_server([*SERVER_FLAGS, "--out", str(cluster.out)])
        wait_for(lambda: cluster.status(0.5) is not None, 60, "the CURVE server to answer its status")
        # no resend, no reconnect within the test: a reply that goes astray is a ServerUnreachable
        trainer = Client(cluster.endpoint, "trainer", keys=curve.client_keys(keys / "client-0"), heartbeat=False,
                         give_up_after=10.0, resend_s=60.0, reconnect_s=60.0)
        trainer.connect()
        assert trainer.routing_id.startswith(trainer.wid.encode() + b"/")
        thief = Raw(cluster.endpoint, keys=curve.client_keys(keys / "client-1"), routing_id=trainer.wid.encode())
        monitor = thief.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        assert thief.call(P.STATUS).type == P.STATUS        # its connection is made, and known to the ROUTER
        for _ in range(2):                  # the most leases a trainer may hold
            assert trainer.request(P.WORK).type == P.TASK
        stolen = thief.recv(timeout=1.0)
        assert stolen is None, f"the thief got the trainer's reply: {stolen[0].type} {stolen[0].body}"
        assert not monitor.poll(0), "the server dropped the thief's connection for the trainer's (handover)"
    finally:
        if monitor is not None:
            thief.sock.disable_monitor()
            monitor.close(linger=0)
        for client in (trainer, thief):
            if client is not None:
                client.close()
        cluster.close()


def test_a_secret_certificate_others_may_read_is_warned_about_once_and_still_loaded(tmp_path, caplog):
    """Compose and Kubernetes often mount secrets with broad modes: such a file is used, with one
    line naming it and the remedy (it was loaded without a word)."""
    curve.make_keys(tmp_path / "k", ["client-0"])
    secrets = {"client": tmp_path / "k" / "client-0" / "client-0.key_secret",
               "server": tmp_path / "k" / "server" / "server.key_secret"}
    for path in secrets.values():
        path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="pscnn.curve"):
        for _ in range(2):
            assert curve.client_keys(tmp_path / "k" / "client-0").public
            assert curve.server_keys(tmp_path / "k" / "server").public
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    for path, line in zip(secrets.values(), warnings):
        one_line_naming(line, path, "mode 0644", "other users", f"chmod 600 {path}")
    caplog.clear()
    (tmp_path / "k" / "client-1").mkdir(mode=0o700)       # a secret readable by its group only
    for name in ("client-0.key_secret", "client-0.key", "server.key"):
        shutil.copy(tmp_path / "k" / "client-0" / name, tmp_path / "k" / "client-1" / name)
    (tmp_path / "k" / "client-1" / "client-0.key_secret").chmod(0o640)
    with caplog.at_level(logging.WARNING, logger="pscnn.curve"):
        curve.client_keys(tmp_path / "k" / "client-1")
        curve.make_keys(tmp_path / "fresh", ["client-0"])    # pscnn keys' own: 0600, nothing to say
        curve.client_keys(tmp_path / "fresh" / "client-0")
        curve.server_keys(tmp_path / "fresh" / "server")
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'k' / 'client-1' / 'client-0.key_secret'} holds a secret key, yet its mode 0640 lets its group "
        f"read it: chmod 600 {tmp_path / 'k' / 'client-1' / 'client-0.key_secret'}"]
