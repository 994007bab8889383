"""Words of pscnn's output that must agree with a count: one helper for every package.

It lives in cnn_core, the package every other one imports and that imports none of them
(the engine's own lines need it too), and imports nothing itself.
"""
from __future__ import annotations


def for_count(count: int, one: str, many: str | None = None) -> str:
    """The word of the two that goes with ``count``: ``one`` for 1 ("worker", "was"), else ``many``.

    ``many`` defaults to ``one`` + "s" ("workers", "epochs"); give it where the plural is another
    ("batches", "were"): no rule guesses it ("epoch" and "batch" end alike).
    """
    if count == 1:
        return one
    return one + "s" if many is None else many
