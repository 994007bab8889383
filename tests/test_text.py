"""cnn_core.text.for_count: the one helper for every word of pscnn's output that agrees with a count."""
from __future__ import annotations

from cnn_core.text import for_count


def test_the_plural_is_one_plus_s_unless_given():
    assert [for_count(n, "worker") for n in (0, 1, 2)] == ["workers", "worker", "workers"]
    assert [for_count(n, "epoch") for n in (1, 2)] == ["epoch", "epochs"]        # not "epoches"
    assert [for_count(n, "batch", "batches") for n in (1, 2)] == ["batch", "batches"]
    assert [for_count(n, "was", "were") for n in (0, 1, 2)] == ["were", "was", "were"]
    assert [for_count(n, "refused report", "refused reports") for n in (1, 2)] == ["refused report",
                                                                                 "refused reports"]
