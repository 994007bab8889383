"""Opt-in peer authentication and encryption: ZeroMQ's CURVE, with ``zmq.auth``.

Without keys, anyone who reaches the server's port may join as a trainer, push
gradients, take up ``--max-workers`` places and read the weights.  With them,
every connection is encrypted and the server admits only clients whose public
key it holds; ZeroMQ's ZAP handler (a :class:`~zmq.auth.thread.ThreadAuthenticator`)
refuses the others during the handshake, before any message reaches the server.
Both sides import this module: no socket is secured anywhere else.

``pscnn keys DIR`` (:func:`make_keys`) writes ZeroMQ certificates (the format
of ``zmq.auth.create_certificates``), one folder per role, each holding only
what that role needs::

    DIR/server/server.key_secret         the server's key pair       (pscnn server --keys DIR/server)
    DIR/server/server.key                its public key
    DIR/server/authorized/NAME.key       each client's public key    (the clients it admits)
    DIR/NAME/NAME.key_secret             a client's key pair         (pscnn worker --keys DIR/NAME)
    DIR/NAME/NAME.key                    its public key (to authorize it on another server)
    DIR/NAME/server.key                  the server's public key

Folders are made mode 0700 and secret certificates 0600.  Several processes may
share one client folder (every worker container of a Compose service): the key
says who may join, not which worker is which.  But a worker id is bound to the key it
joined with (:func:`sender_key`): the server refuses a message under a peer's id from a
client holding another key, so no key holder can act as another's peer.  The server's
own folder serves as a client's too, and the server admits its own key: ``pscnn status``
in the server's container (its healthcheck) reads the same ``PSCNN_KEYS`` as the server.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from cnn_core.errors import PscnnError
from cnn_core.text import for_count
from pscnn import protocol as P
from pscnn.cli import given_flag

log = logging.getLogger("pscnn.curve")

SERVER_NAME = "server"
AUTHORIZED = "authorized"
PUBLIC, SECRET = ".key", ".key_secret"
KEY_CHARS = 40                  # a Z85-encoded 32-byte Curve25519 key
# Handshakes that failed without a reason before a client with keys looks into why: one may be a
# connection cut mid-handshake, a few in a row a server that cannot decrypt our hello (the wrong
# server.key), or a peer that closes every connection before the handshake (a proxy in front of a
# server that is down), which ZeroMQ's monitor reports alike (:func:`peer_greeting`).
SILENT_FAILURES_LIMIT = 3
# How long a client waits for the greeting on the connection that tells those apart, and how
# often it makes one while they go on.
GREETING_TIMEOUT_S, GREETING_PROBE_EVERY_S = 0.5, 2.0
# How long a client's socket goes without a handshake before the client asks the peer's greeting whether
# it is a ZeroMQ peer at all, and a plain client's whether it is a CURVE server
# (:meth:`HandshakeWatch._unanswered_checked`; at most half the caller's time, :meth:`HandshakeWatch.check`);
# a pscnn server's I/O thread answers a handshake at once, however busy the server is.
PROBE_AFTER_S = 0.5
# The first byte of ZeroMQ's greeting (ZMTP 3: a signature of 0xFF, 8 bytes, 0x7F), sent on every new
# connection before anything is read.
ZMTP_SIGNATURE_START = b"\xff"
# A ZeroMQ greeting's signature and major version 3, for which a ZeroMQ peer sends the rest of its own.
ZMTP_SIGNATURE_AND_VERSION = b"\xff" + bytes(7) + b"\x01\x7f\x03"
# What the probe sends (:func:`peer_greeting`): that, for a ZeroMQ peer to send its greeting, whose security
# mechanism is at bytes 12-31 (NUL-padded) of 64, and then wait for the rest of ours, which never comes: it
# reads no mechanism of ours to refuse.  Then a line's end, which a line-based service that waits for the
# client to speak first (an HTTP server) answers: without it, it was as silent as a stopped server.
ZMTP_PROBE = ZMTP_SIGNATURE_AND_VERSION + b"\r\n"
ZMTP_GREETING_BYTES, ZMTP_MECHANISM = 64, slice(12, 32)
# A whole plain greeting, as a plain client's ZeroMQ sends it (ZMTP 3.0, mechanism NULL, not as a server),
# for a CURVE server to read the mechanism and refuse it (:meth:`HandshakeWatch._plain_refusal_told`).
ZMTP_NULL_GREETING = ZMTP_SIGNATURE_AND_VERSION + b"\x00" + b"NULL".ljust(20, b"\0") + b"\x00" + bytes(31)
# Refused client keys the server names in its log, one line each; later ones are refused silently.
REFUSALS_LOGGED = 100
KEYS_HINT = "pscnn keys DIR makes DIR/server for the server and DIR/client-N for each client"


class KeysError(PscnnError, OSError):
    """A key folder or certificate that is missing, unreadable or malformed (the message names it)."""


class HandshakeFailed(PscnnError):
    """The server and this client could not agree on a connection: a key the server refused, or
    CURVE on one side only.  Retrying cannot help, so the client stops, saying which and the remedy."""


@dataclass(frozen=True)
class ServerKeys:
    """What ``pscnn server --keys FOLDER`` reads: its key pair and the public keys it admits (its own among them)."""

    folder: Path
    public: bytes
    secret: bytes
    authorized: dict                # Z85 public key (bytes, as the ZAP handler gets it) -> its name (file stem)

    def name(self, user_id: str) -> str:
        """The name of the authorized key a :func:`sender_key` is (its file's in authorized/; "server": its own)."""
        return self.authorized.get(user_id.encode("ascii", "replace"), user_id)


@dataclass(frozen=True)
class ClientKeys:
    """What a client's ``--keys FOLDER`` reads: its key pair, and the server's public key (the server's
    folder: its own key pair, and its public key)."""

    folder: Path
    certificate: Path               # its secret certificate, named in messages
    public: bytes
    secret: bytes
    server_public: bytes


# --------------------------------------------------------------------------- making keys

def make_keys(folder, clients) -> list[Path]:
    """Write a server key pair and one client key pair per name in ``clients`` under ``folder``
    (see the module docs) -> the folders made, the server's first.

    KeysError if ``folder`` already holds a server's keys (new ones would lock out every
    client given the old), or a client folder of one of the names exists.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise KeysError(f"{folder} is a file, not a folder for keys")
    server_dir = folder / SERVER_NAME
    for path in [server_dir, *(folder / name for name in clients)]:
        if path.exists():
            raise KeysError(f"{path} already exists: choose another folder for new keys "
                            "(or remove it; clients holding its keys would then be refused)")
    try:
        _private_folder(folder)
        _private_folder(server_dir)
        _private_folder(server_dir / AUTHORIZED)
        server_public, _ = _certificates(server_dir, SERVER_NAME)
        made = [server_dir]
        for name in clients:
            client_dir = folder / name
            _private_folder(client_dir)
            public, _ = _certificates(client_dir, name)
            (server_dir / AUTHORIZED / public.name).write_bytes(public.read_bytes())
            (client_dir / server_public.name).write_bytes(server_public.read_bytes())
            made.append(client_dir)
    except OSError as exc:
        raise KeysError(f"cannot write keys into {folder}: {exc.strerror or exc}") from None
    return made


def _private_folder(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _certificates(folder: Path, name: str) -> tuple[Path, Path]:
    """A new key pair NAME.key / NAME.key_secret in ``folder``; the secret one readable by its owner only."""
    public, secret = zmq.auth.create_certificates(folder, name)
    os.chmod(secret, stat.S_IRUSR | stat.S_IWUSR)      # the folder (0700) hid it until now
    return Path(public), Path(secret)


# --------------------------------------------------------------------------- reading keys

def _read_certificate(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) keys of a certificate file; KeysError naming it if it is missing or malformed."""
    if not path.is_file():
        raise KeysError(f"{path}: no such certificate file ({KEYS_HINT})")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise KeysError(f"{path}: cannot read it: {exc.strerror or exc}{_owner_hint(path)}") from None
    except (ValueError, IndexError):
        raise KeysError(f"{path}: not a ZeroMQ certificate (no public-key line)") from None
    if secret and secret_key is None:
        raise KeysError(f"{path}: has no secret-key line: a secret certificate (*{SECRET}) is needed")
    if secret:
        _warn_if_others_may_read(path)
    for what, key in (("public-key", public), ("secret-key", secret_key)):
        if key is not None and not _is_key(key):
            raise KeysError(f"{path}: its {what} is not a {KEY_CHARS}-character Z85 key")
    return public, secret_key


# Secret certificates already warned about as readable by others: once per file and process.
_WARNED_READABLE: set[Path] = set()


def _warn_if_others_may_read(path: Path) -> None:
    """Warn once if ``path`` (a secret certificate) is readable by its group or others: a warning, not a
    refusal, as Compose and Kubernetes often mount secrets with broad modes the user cannot change."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if os.name != "posix" or not mode & (stat.S_IRGRP | stat.S_IROTH) or path in _WARNED_READABLE:
        return
    _WARNED_READABLE.add(path)
    log.warning("%s holds a secret key, yet its mode %04o lets %s read it: chmod 600 %s", path, mode,
                "other users" if mode & stat.S_IROTH else "its group", path)


def _is_key(key: bytes) -> bool:
    if len(key) != KEY_CHARS:
        return False
    try:
        z85.decode(key)
    except (ValueError, KeyError, TypeError):
        return False
    return True


def _owner_hint(path: Path) -> str:
    """Whose ``path`` is, when that is not this process's user: key folders and secrets are their
    owner's only, and a container's user (uid 10001 in pscnn's image) is not the one who made them."""
    try:
        owner = path.stat().st_uid
    except OSError:
        return ""
    return f" (it belongs to uid {owner}, and this process runs as uid {os.getuid()})" if owner != os.getuid() else ""


def _folder(path) -> Path:
    """``path`` as a key folder this process may read; KeysError otherwise."""
    folder = Path(path)
    if not folder.is_dir():
        raise KeysError(f"{given_flag('keys')} {folder}: no such folder ({KEYS_HINT})")
    if not os.access(folder, os.R_OK | os.X_OK):    # else each file in it would read as missing
        raise KeysError(f"{given_flag('keys')} {folder}: cannot read the folder: permission denied"
                        f"{_owner_hint(folder)}")
    return folder


def server_keys(path) -> ServerKeys:
    """The server's keys from its folder (``DIR/server``); KeysError naming what is missing or bad."""
    folder = _folder(path)
    if not (folder / (SERVER_NAME + SECRET)).exists() and any(folder.glob("*" + SECRET)):
        raise KeysError(f"{given_flag('keys')} {folder} holds a client's keys; the server takes DIR/server "
                        f"(with {SERVER_NAME + SECRET})")
    public, secret = _read_certificate(folder / (SERVER_NAME + SECRET), secret=True)
    authorized_dir = folder / AUTHORIZED
    if not authorized_dir.is_dir():
        raise KeysError(f"{authorized_dir}: no such folder of authorized client keys ({KEYS_HINT})")
    authorized = {}
    for path in sorted(authorized_dir.glob("*" + PUBLIC)):     # one key in two files: the first name
        authorized.setdefault(_read_certificate(path, secret=False)[0], path.stem)
    if not authorized:
        raise KeysError(f"{authorized_dir}: holds no client public key (*{PUBLIC}), so every client would be refused")
    authorized.setdefault(public, SERVER_NAME)          # its own: pscnn status beside it
    return ServerKeys(folder, public, secret, authorized)


def client_keys(path) -> ClientKeys:
    """A client's keys from its folder (``DIR/NAME``); KeysError naming what is missing or bad."""
    folder = _folder(path)
    if (folder / (SERVER_NAME + SECRET)).exists():        # the server's folder (pscnn status beside the server)
        public, secret = _read_certificate(folder / (SERVER_NAME + SECRET), secret=True)
        return ClientKeys(folder, folder / (SERVER_NAME + SECRET), public, secret, public)
    secrets = sorted(folder.glob("*" + SECRET))
    if len(secrets) != 1:
        found = ", ".join(p.name for p in secrets) if secrets else "none"
        # none, beside a server's folder: the folder pscnn keys made, not one of the client folders in it
        hint = f" ({KEYS_HINT})" if not secrets and (folder / SERVER_NAME).is_dir() else ""
        raise KeysError(f"{given_flag('keys')} {folder}: expected one client secret certificate (*{SECRET}), "
                        f"found {found}{hint}")
    public, secret = _read_certificate(secrets[0], secret=True)
    server_public, _ = _read_certificate(folder / (SERVER_NAME + PUBLIC), secret=False)
    return ClientKeys(folder, secrets[0], public, secret, server_public)


# --------------------------------------------------------------------------- securing sockets

def secure_server(sock, keys: ServerKeys) -> None:
    """Make ``sock`` (before it binds) a CURVE server: every connection encrypted and, with
    :func:`start_authenticator` on its context, every client's key checked."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def secure_client(sock, keys: ClientKeys | None) -> None:
    """Make ``sock`` (before it connects) a CURVE client of the server whose key ``keys`` holds; None: plain."""
    if keys is None:
        return
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server_public


# The ZAP user id ZeroMQ puts on every message received over CURVE: what the ZAP handler answered
# for the connection's key, which zmq.auth makes the client's Z85 public key.
USER_ID = "User-Id"


def sender_key(frames) -> str:
    """The Z85 public key (text) whose holder sent ``frames``, a message a CURVE server's ROUTER received
    (copy=False; the routing id first): each connection's, as its handshake proved it.

    Read from the first frame past the routing id: libzmq before 4.3.5 (pyzmq 25's wheels, and the
    pyzmq of a system libzmq 4.3.4) gave the routing id frame of a message polled first no metadata
    at all, and reading it raised ZMQError (EINVAL)."""
    return frames[1].get(USER_ID)


class AuthorizedKeys:
    """The ZAP handler's credentials provider: admits the keys of ``keys.authorized``, and logs each
    key it refuses once (up to REFUSALS_LOGGED of them: a scan must not flood the log)."""

    def __init__(self, keys: ServerKeys):
        self.keys = keys
        self.refused: set[bytes] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys.authorized:
            return True
        if key not in self.refused and len(self.refused) < REFUSALS_LOGGED:
            self.refused.add(key)
            log.warning("refused a client whose CURVE public key %s is not in %s%s", key.decode("ascii", "replace"),
                        self.keys.folder / AUTHORIZED,
                        f" (the last of {REFUSALS_LOGGED} refused keys logged)"
                        if len(self.refused) == REFUSALS_LOGGED else "")
        return False


def start_authenticator(ctx, keys: ServerKeys):
    """Start ZeroMQ's ZAP handler on ``ctx``, admitting ``keys.authorized``; ``.stop()`` it after use."""
    from zmq.auth.thread import ThreadAuthenticator  # noqa: PLC0415  (a server with keys only)
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("pscnn.curve.zap"))
    auth.start()
    auth.configure_curve_callback("*", AuthorizedKeys(keys))
    return auth


# --------------------------------------------------------------------------- handshake failures

HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
# What a plain client watches: a handshake failed without a reason means something to a client with
# keys only (SILENT_FAILURES_LIMIT), and a peer that accepts and closes at once (a TCP proxy in front of
# a server that is down) makes one on each reconnect, ~10 a second, read only when a request goes.
PLAIN_HANDSHAKE_EVENTS = HANDSHAKE_EVENTS & ~zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


class HandshakeWatch:
    """Watches a client socket's handshakes (a ZeroMQ socket monitor), so that a refusal is said at
    once: ZeroMQ itself only reconnects and fails again, and the client heard nothing until it
    gave up (``--give-up-after``, 600 s).

    It also says when the connection dropped and was made again (:meth:`check`): ZeroMQ does that
    unseen, and a request sent on the dropped connection is lost with it.  A handshake succeeds on
    each new connection, and a connecting socket makes one only once the last dropped, so a second
    handshake says so.  EVENT_DISCONNECTED is not watched: unread events block the I/O thread, and
    so every socket of the context, once about 2000 are queued (libzmq 4.3.5), and it doubled their rate.
    For the same reason a plain client does not watch handshakes that failed without a reason
    (:data:`PLAIN_HANDSHAKE_EVENTS`), and a client's heartbeats' thread reads the monitor between
    requests (:meth:`drain`): a client with keys idle against a peer that accepts and closes got one
    on each reconnect.  A client whose socket makes no handshake asks the peer's greeting instead
    whether it is a ZeroMQ peer, and a plain client whether it is a CURVE server (:meth:`_unanswered_checked`).

    ``keys``: the client's (None: plain).  One watch follows the sockets a client reopens
    (:meth:`watch`), counting handshakes that failed without a reason across them.  ``retries``:
    whether its caller retries until the server answers (a Client), or asks once (query_status),
    which the line about a peer that closes before its greeting says.
    """

    def __init__(self, endpoint: str, keys: ClientKeys | None, retries: bool = True):
        self.endpoint, self.keys, self.retries = endpoint, keys, retries
        self.sock = self.monitor = None
        # The monitor is read by the thread making requests and, between them, by the heartbeats'
        # (drain); a ZeroMQ socket is one thread's at a time.
        self._lock = threading.Lock()
        self.silent_failures = 0            # since the last handshake that succeeded
        self.handshaken = False             # a handshake succeeded on the watched socket
        self.remade = False                 # ... and another since, not yet said by check()
        self.refusal: str | None = None     # a handshake refused for a reason, for check() to raise
        self.refused_as_plain = False       # ... a plain client's by a CURVE server, not yet told it (check)
        self.probe_due = 0.0                # monotonic time from which the peer's greeting is asked again
        self.greeting: bytes | None = None  # what it brought the last time (_greeting)
        self.closed_unheard_said = False    # the warning that the peer closes before its greeting, since a success
        self.watched_at = 0.0               # monotonic time the watched socket was given (watch)

    def watch(self, sock) -> None:
        """Watch ``sock`` (before it connects) instead of the socket watched so far."""
        self.close()
        with self._lock:
            self.sock = sock
            self.monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS if self.keys is not None
                                                   else PLAIN_HANDSHAKE_EVENTS)
            self.handshaken = False
            self.watched_at = time.monotonic()

    def poll(self, timeout_ms: int) -> bool:
        """Wait up to ``timeout_ms`` for a message on the watched socket, or an event of its monitor
        (for :meth:`check` to read); whether a message is there."""
        with self._lock:
            poller = zmq.Poller()
            poller.register(self.sock, zmq.POLLIN)
            poller.register(self.monitor, zmq.POLLIN)
            return self.sock in dict(poller.poll(timeout_ms))

    def drain(self) -> None:
        """Read what the monitor holds, for the next :meth:`check` to act on; at once, without reading
        if another thread is reading it (a request in progress)."""
        if self._lock.acquire(blocking=False):
            try:
                self._read()
            finally:
                self._lock.release()

    def check(self, deadline: float = math.inf) -> bool:
        """Raise :class:`HandshakeFailed` if a handshake failed for a reason that retrying cannot change;
        else whether the connection dropped and was made again since the last call.  ``deadline``
        (monotonic): the caller's, which the greeting probe does not outlast."""
        with self._lock:
            self._read()
        # a deadline closer than twice PROBE_AFTER_S (pscnn status --timeout 0.3) is asked at half its time:
        # else never, and a plain status of a CURVE server said "no answer" 8 times in 16
        probe_after = min(PROBE_AFTER_S, (deadline - self.watched_at) / 2)
        unanswered = self.sock is not None and not self.handshaken \
            and time.monotonic() >= self.watched_at + probe_after
        silent = self.keys is not None and self.silent_failures >= SILENT_FAILURES_LIMIT
        if self.refusal is None and (unanswered or silent):
            # One probe a period, whose greeting both looks at: a CURVE client's socket that made no handshake
            # probed, and its third silent failure came just after, waited for the next probe to be told its key.
            if time.monotonic() >= self.probe_due:
                self.greeting = self._greeting(deadline)
            self._unanswered_checked(self.greeting)
            if silent and self.refusal is None:
                self._silent_failures_checked(self.greeting)
        if self.refusal is not None:
            if self.refused_as_plain:
                self.refused_as_plain = False
                self._plain_refusal_told(deadline)
            raise HandshakeFailed(self.refusal)
        remade, self.remade = self.remade, False
        return remade

    def _silent_failures_checked(self, greeting: bytes | None) -> None:
        """Raise :class:`HandshakeFailed` if a ZeroMQ server answers at the endpoint (its ``greeting``), so that
        it is our hello it could not read; log once if the peer closes connections before it says a word (a
        proxy whose server is down: retried, as a server that is down is).  ZeroMQ's monitor says alike of
        both (a handshake failed without a reason, then disconnected), so a connection of our own asks."""
        if greeting and greeting.startswith(ZMTP_SIGNATURE_START):
            if greeting_mechanism(greeting) not in (None, b"CURVE"):
                # A plain server: its refusal of our mechanism, which ZeroMQ reports when it reads the
                # server's greeting before the server has closed the connection on ours (not always)
                raise HandshakeFailed(self._failure(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                                                    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH))
            raise HandshakeFailed(
                f"the CURVE handshake with {self.endpoint} failed {self.silent_failures} times in a row: "
                f"the server could not read our hello; is {self.keys.folder / (SERVER_NAME + PUBLIC)} the "
                "public key of this server (of its server.key_secret)?")
        if greeting == b"" and not self.closed_unheard_said:
            self.closed_unheard_said = True
            log.warning("the connection to %s closed before the CURVE handshake began (%d %s in a row), "
                        "without a byte of ZeroMQ's greeting: is the server down behind a proxy?%s", self.endpoint,
                        self.silent_failures, for_count(self.silent_failures, "time"),
                        " retrying until it answers" if self.retries else "")

    def _unanswered_checked(self, greeting: bytes | None) -> None:
        """The refusal, for :meth:`check` to raise, if what answers at the endpoint of this client (its
        ``greeting``) is no ZeroMQ peer, or, for a plain client, a CURVE server.

        A service of another protocol never completes ZeroMQ's handshake, and libzmq reports nothing: the
        client waited out --give-up-after (600 s) and said "no usable answer".  A CURVE server closes the
        connection on a plain client's greeting, and ZeroMQ reports the mismatch only when it read the
        server's greeting before that close: between two processes, about one connection in three.  The
        others fail without a reason, which a plain client does not watch (:data:`PLAIN_HANDSHAKE_EVENTS`),
        and pscnn status said "no answer" (a quarter of the time with --timeout 1).  Silence and a close are
        left to the retries: a server that is stopped, or down behind a proxy, may answer yet."""
        if greeting and not greeting.startswith(ZMTP_SIGNATURE_START):
            answer = P.one_line(" ".join(greeting.decode("latin-1").split()), 60)
            self.refusal = (f"{self.endpoint} is not a ZeroMQ peer (it answered '{answer}'): another service "
                            "listens there, not a pscnn server")
        elif self.keys is None and greeting_mechanism(greeting or b"") == b"CURVE":
            self._refused(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH)

    def _plain_refusal_told(self, deadline: float) -> None:
        """Send the CURVE server that refused this plain client a whole plain greeting, on a connection of
        our own, so that its log says a plain client was refused (:class:`RefusedHandshakes`).  Of a plain
        client's and a CURVE server's ZeroMQ, the one that reads the other's mechanism first closes the
        connection, and the other sees it lost, not refused: a refused plain pscnn worker was not in the
        server's log 2 times in 8 between two processes.  This connection's greeting is whole before a byte
        of the server's is read, so the server reads its mechanism.  Until ``deadline`` at the latest."""
        self._greeting(deadline, sent=ZMTP_NULL_GREETING)

    def _greeting(self, deadline: float, sent: bytes = ZMTP_PROBE) -> bytes | None:
        """The peer's greeting on a connection of our own (TCP, or the Unix socket of an ipc:// endpoint), for
        ``sent`` (:func:`peer_greeting`), asked until ``deadline`` at the latest; then not again for
        GREETING_PROBE_EVERY_S.  None if there was no time to ask."""
        timeout = min(GREETING_TIMEOUT_S, deadline - time.monotonic())
        if timeout <= 0:
            return None
        self.probe_due = time.monotonic() + GREETING_PROBE_EVERY_S
        address = P.tcp_address(self.endpoint)
        if address is None:
            return unix_peer_greeting(P.ipc_path(self.endpoint), timeout, sent)
        return peer_greeting(*address, timeout, sent)

    def _read(self) -> None:
        """Take in the events the monitor holds (the caller holds the lock)."""
        from zmq.utils.monitor import recv_monitor_message  # noqa: PLC0415
        while self.monitor is not None and self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.silent_failures, self.closed_unheard_said = 0, False
                self.remade, self.handshaken = self.remade or self.handshaken, True
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self.silent_failures += 1
            elif kind in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                self._refused(kind, value)

    def _refused(self, kind: int, value: int) -> None:
        """Note a handshake refused for a reason (the first such), for :meth:`check` to raise."""
        if self.refusal is None:
            self.refusal = self._failure(kind, value)
            self.refused_as_plain = self.keys is None and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH

    def _failure(self, kind: int, value: int) -> str:
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            public = self.keys.certificate.with_suffix(PUBLIC) if self.keys else None
            return (f"{self.endpoint} refused this client's CURVE key (ZAP status {value}): add its public key"
                    + (f" ({public})" if public else "") + " to the server's authorized folder "
                    "(its --keys FOLDER/authorized), or give --keys the folder of a client it admits")
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            if self.keys is not None:
                return (f"{self.endpoint} does not use CURVE: start the server with --keys, or run this "
                        "client without --keys")
            return (f"{self.endpoint} requires CURVE authentication: give --keys FOLDER (or PSCNN_KEYS), a client "
                    f"folder the server authorizes ({KEYS_HINT})")
        return (f"the handshake with {self.endpoint} failed ({_protocol_error(value)}): is it a pscnn server of "
                "this release?")

    def close(self) -> None:
        """Stop watching (before the watched socket closes)."""
        with self._lock:
            if self.monitor is not None:
                _stop_monitor(self.sock, self.monitor)
            self.sock = self.monitor = None


def peer_greeting(host: str, port: str, timeout: float = GREETING_TIMEOUT_S, sent: bytes = ZMTP_PROBE) -> bytes | None:
    """What a new TCP connection to ``host:port`` brings within ``timeout`` (the host's lookup
    included), up to a whole ZeroMQ greeting, for ``sent`` sent (:data:`ZMTP_PROBE`; a ZeroMQ socket's greeting
    starts with ZMTP_SIGNATURE_START; its mechanism: :func:`greeting_mechanism`); b"" if the peer closed
    (or reset) it first; None if it was not made, or nothing came.  Closed before our greeting's end, it
    is a handshake failed without a reason at a pscnn server, which does not log those
    (:class:`RefusedHandshakes`)."""
    deadline = time.monotonic() + timeout
    addresses, _ = P.look_up(host, port, timeout)     # (None: not answered in time)
    return _first_greeting([(family, kind, proto, address) for family, kind, proto, _, address in addresses or ()],
                           deadline, sent)


def unix_peer_greeting(path: str | None, timeout: float = GREETING_TIMEOUT_S, sent: bytes = ZMTP_PROBE) -> bytes | None:
    """:func:`peer_greeting` over the Unix socket at ``path`` (an ipc:// endpoint's, :func:`protocol.ipc_path`):
    ZeroMQ sends the same greeting there, and a CURVE client of a plain server over ipc:// was told its
    server.key was wrong 3 times in 16.  None for no path (an endpoint of another scheme)."""
    if path is None:
        return None
    return _first_greeting([(socket.AF_UNIX, socket.SOCK_STREAM, 0, path)], time.monotonic() + timeout, sent)


def _first_greeting(addresses: list, deadline: float, sent: bytes) -> bytes | None:
    """:func:`peer_greeting` of the first of ``addresses`` ((family, type, proto, address) each) that takes
    the connection, until ``deadline``."""
    for family, kind, proto, address in addresses:    # each, as create_connection tries them
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.socket(family, kind, proto) as conn:
                conn.settimeout(left)
                conn.connect(address)
                conn.sendall(sent)
                return _received(conn, ZMTP_GREETING_BYTES, deadline)
        except (ConnectionResetError, BrokenPipeError):     # closed before our probe went: the same
            return b""
        except OSError:             # refused, unreachable, timed out: the next address
            continue
    return None


def _received(conn: socket.socket, size: int, deadline: float) -> bytes | None:
    """Up to ``size`` bytes from ``conn`` until ``deadline`` or the peer's close; None if none came
    in time, b"" if it closed (or reset) first."""
    got = b""
    try:
        while len(got) < size:
            conn.settimeout(max(deadline - time.monotonic(), 1e-3))
            chunk = conn.recv(size - len(got))
            if not chunk:
                break
            got += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        return got or None
    return got


def greeting_mechanism(greeting: bytes) -> bytes | None:
    """The security mechanism a ZMTP 3 greeting names (b"NULL": a plain peer, b"CURVE"), or None
    for a greeting cut short."""
    if len(greeting) < ZMTP_MECHANISM.stop or greeting[10] < 3:
        return None
    return greeting[ZMTP_MECHANISM].rstrip(b"\0")


class RefusedHandshakes:
    """Watches a CURVE server's socket (a ZeroMQ socket monitor) for handshakes that failed for a reason
    the client alone can mend, which the server's log said nothing of: a plain client (without
    --keys), or one holding another server's public key.  A refused key is the ZAP handler's to log
    (:class:`AuthorizedKeys`).  libzmq's monitor does not say from which address a client came.
    """

    def __init__(self, sock):
        """``sock``: the server's socket, before it binds."""
        self.sock, self.monitor = sock, sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)

    def failures(self, limit: int) -> list[str]:
        """One line for each handshake failed since the last call (at most ``limit`` of them read)."""
        from zmq.utils.monitor import recv_monitor_message  # noqa: PLC0415
        lines = []
        while len(lines) < limit and self.monitor.poll(0):
            value = recv_monitor_message(self.monitor)["value"]
            if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                lines.append("refused a client without CURVE keys: give it --keys FOLDER (or PSCNN_KEYS), "
                             f"a client folder this server authorizes ({KEYS_HINT})")
            elif value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
                lines.append("refused a CURVE client whose hello this server could not decrypt: it holds another "
                             f"server's public key; give it this server's {SERVER_NAME + PUBLIC}")
            else:
                lines.append(f"a client's handshake failed ({_protocol_error(value)})")
        return lines

    def close(self) -> None:
        """Stop watching (before the socket closes)."""
        _stop_monitor(self.sock, self.monitor)


def _stop_monitor(sock, monitor) -> None:
    # What the monitor holds is read first: with about 2000 events unread, libzmq's I/O thread waits to
    # queue the next while holding the lock disable_monitor() takes, and that waited for good.
    while monitor.poll(0):
        monitor.recv_multipart()
    try:
        sock.disable_monitor()
    except zmq.ZMQError:            # the socket is closed already
        pass
    monitor.close(linger=0)


def _protocol_error(value: int) -> str:
    """A ZeroMQ handshake failure's reason, as words."""
    try:
        return zmq.Event(value).name.lower()
    except ValueError:
        return f"protocol error {value:#x}"


def keys_from_args(args) -> int:
    """``pscnn keys FOLDER --clients N``: make the keys, and say which folder goes to which role."""
    made = make_keys(args.folder, [f"client-{i}" for i in range(args.clients)])
    print(f"{made[0]}: the server's keys, for pscnn server --keys (or PSCNN_KEYS)")
    for folder in made[1:]:
        print(f"{folder}: a client's keys, for pscnn worker, evaluator or status --keys")
    return 0
