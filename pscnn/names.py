"""Client names and ids: the one rule the CLI, the client and the protocol share.

A client id (wid) is NAME-xxxxxxxx (8 hex digits, so a restarted worker of the
same name is a new peer).  The protocol caps a wid at MAX_NAME_LEN printable
characters, and ZeroMQ caps a routing id (the wid in UTF-8) at 255 bytes.  This
module imports nothing heavy, so ``pscnn worker --name`` is checked before
numpy and zmq load (and before ``--threads`` takes effect).
"""
from __future__ import annotations

MAX_NAME_LEN = 128                      # a wid, and an array name, in the protocol
ROUTING_ID_BYTES = 255                  # ZeroMQ's limit on a socket's routing id
WID_SUFFIX_LEN = 9                      # "-" and 8 hex digits
MAX_NAME_CHARS = MAX_NAME_LEN - WID_SUFFIX_LEN
MAX_NAME_BYTES = ROUTING_ID_BYTES - WID_SUFFIX_LEN


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a client's name (its wid must fit the protocol and ZeroMQ), or None."""
    if not name.isprintable():
        return "must be printable (no tabs, newlines or other control characters)"
    if len(name) > MAX_NAME_CHARS:
        return f"must be at most {MAX_NAME_CHARS} characters (the client id adds {WID_SUFFIX_LEN}), got {len(name)}"
    size = len(name.encode())
    if size > MAX_NAME_BYTES:
        return (f"must be at most {MAX_NAME_BYTES} bytes in UTF-8 (a ZeroMQ routing id holds "
                f"{ROUTING_ID_BYTES}, the client id adds {WID_SUFFIX_LEN}), got {size}")
    return None
