"""Client names and ids: the one rule the CLI, the client and the protocol share.

A client id (wid) is NAME-xxxxxxxx (8 hex digits, so a restarted worker of the
same name is a new peer).  Its ZeroMQ routing id is the wid and a secret token,
WID/yyyyyyyyyyyyyyyy (16 hex digits, see :func:`routing_id`); its heartbeat socket's
is the wid and a hash of that (:func:`heartbeat_routing_id`).  The protocol caps
a wid at MAX_NAME_LEN printable characters, and ZeroMQ caps a routing id (in
UTF-8) at 255 bytes.  This module imports nothing heavy, so ``pscnn worker
--name`` is checked before numpy and zmq load (and before ``--threads`` takes
effect).
"""
from __future__ import annotations

import hashlib
import re
import secrets

MAX_NAME_LEN = 128                      # a wid, and an array name, in the protocol
ROUTING_ID_BYTES = 255                  # ZeroMQ's limit on a socket's routing id
WID_SUFFIX_LEN = 9                      # "-" and 8 hex digits
MAX_NAME_CHARS = MAX_NAME_LEN - WID_SUFFIX_LEN
ROUTE_TOKEN_LEN = 17                    # "/" and 16 hex digits
MAX_NAME_BYTES = ROUTING_ID_BYTES - WID_SUFFIX_LEN - ROUTE_TOKEN_LEN
_ROUTE_TOKEN = re.compile(r"/[0-9a-f]{16}\Z")
_ROUTE_TOKEN_BYTES = re.compile(rb"/[0-9a-f]{16}\Z")


def routing_id(wid: str) -> bytes:
    """A client's ZeroMQ routing id: its ``wid``, which others may know (status, logs), and a
    secret token.  The server's ROUTER sends each reply to the routing id its request came
    from, and hands a routing id over to the newest connection that claims it (a client's
    reconnect): with the wid alone, anyone who knew it could connect under it and take the
    client's replies.  One per client, kept across its reconnects."""
    return f"{wid}/{secrets.token_hex(8)}".encode()


def heartbeat_routing_id(request_routing_id: bytes) -> bytes:
    """The routing id of a client's heartbeat socket, made from its request socket's
    (:func:`routing_id`): the same wid before another token, a hash of that routing id.  A heartbeat
    keeps a peer counted alive, so the server takes one under a peer's id only from the connection
    the peer joined from or from this one, which it makes too; nobody without the secret token can."""
    token = hashlib.blake2b(request_routing_id, digest_size=8, person=b"pscnn-heartbeat").hexdigest()
    wid = _ROUTE_TOKEN_BYTES.sub(b"", request_routing_id)[:ROUTING_ID_BYTES - ROUTE_TOKEN_LEN]
    return wid + b"/" + token.encode()


def without_route_token(text: str) -> str:
    """A routing id as a log may show it: a pscnn client's without its secret token (its wid)."""
    return _ROUTE_TOKEN.sub("", text)


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a client's name (its wid must fit the protocol and ZeroMQ), or None."""
    if not name.isprintable():
        return "must be printable (no tabs, newlines or other control characters)"
    if len(name) > MAX_NAME_CHARS:
        return f"must be at most {MAX_NAME_CHARS} characters (the client id adds {WID_SUFFIX_LEN}), got {len(name)}"
    size = len(name.encode())
    if size > MAX_NAME_BYTES:
        return (f"must be at most {MAX_NAME_BYTES} bytes in UTF-8 (a ZeroMQ routing id holds "
                f"{ROUTING_ID_BYTES}, the client id adds {WID_SUFFIX_LEN} and the routing id {ROUTE_TOKEN_LEN}), "
                f"got {size}")
    return None
