"""Whether a training step fits this machine's memory, checked before any data is read.

:func:`check_memory_fits` compares :meth:`~cnn_core.model.Model.training_step_bytes`'s estimate
with :func:`available_memory` (MemAvailable, or inside a container what its memory limit leaves,
if less); ``pscnn train``, each worker and ``pscnn run`` call it up front, so that a batch too big
for memory fails in one line instead of at its first step, after the data was read.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError
from .text import for_count


def available_memory(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int | None:
    """Bytes of memory a new allocation can take now without swapping: the smaller of
    ``meminfo``'s MemAvailable (Linux; else the free physical pages, os.sysconf) and what is
    left under the memory limit of the cgroup mounted at ``cgroup`` (:func:`cgroup_memory_left`);
    None where none of them says."""
    host = None
    try:
        with open(meminfo, encoding="ascii") as lines:
            for line in lines:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if host is None:
        try:
            host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            pass
    # Inside a container MemAvailable is the host's: a step that fits the host but not the
    # container's limit met the OOM killer.
    left = cgroup_memory_left(cgroup)
    known = [value for value in (host, left) if value is not None]
    return min(known) if known else None


def cgroup_memory_left(root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes left under the memory limit of the cgroup mounted at ``root`` (a container's own):
    cgroup v2's memory.max, else v1's memory/memory.limit_in_bytes, less the usage, less the
    inactive page cache the kernel reclaims before it kills (memory.stat's inactive_file, v1's
    total_inactive_file: MNIST's files read through the cache are counted as usage).  None with
    no limit: no such files, v2's "max" (v1's "no limit" is a value near 2**63, which the caller's
    min() with MemAvailable passes over)."""
    for limit_file, usage_file, stat_file, cache_key in (
            ("memory.max", "memory.current", "memory.stat", "inactive_file"),
            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",
             "total_inactive_file")):
        try:
            limit = Path(root, limit_file).read_text(encoding="ascii").strip()
            if limit == "max":
                return None
            usage = int(Path(root, usage_file).read_text(encoding="ascii"))
            limit = int(limit)
        except (OSError, ValueError):
            continue
        cache = 0
        try:
            for line in Path(root, stat_file).read_text(encoding="ascii").splitlines():
                key, _, value = line.partition(" ")
                if key == cache_key:
                    cache = int(value)
                    break
        except (OSError, ValueError):
            pass            # no cache known: the usage as it stands
        return max(0, limit - max(0, usage - cache))
    return None


#: The switch of ``pscnn train``, ``worker`` and ``run`` that skips :func:`check_memory_fits`, and its
#: variable (pscnn.cli's PSCNN_<FLAG>), named in its refusal.
SKIP_FLAG = "--no-memory-check"
SKIP_VARIABLE = "PSCNN_NO_MEMORY_CHECK"


def check_memory_fits(model, batch: int, flag: str, steps: int = 1) -> None:
    """ConfigError, before any data is read, if a training step on ``batch`` images would take
    more memory than is available (:meth:`~cnn_core.model.Model.training_step_bytes`'s
    estimate): a MemoryError, or the OOM killer, stopped the run at its first batch, after the
    data was read.  ``flag``: what set the batch, for the message.  ``steps``: how many such
    steps run at once on this machine (``pscnn run``'s workers).  On a GPU, whose memory is
    its own, nothing is checked.  The message names :data:`SKIP_FLAG`, which every command that
    checks takes: the estimate is not the step's measured peak, and may refuse a batch that fits."""
    if model.device != "cpu":
        return
    available = available_memory()
    if available is None:
        return
    need, layer, most = model.training_step_bytes(batch)
    if steps * need > available:
        images = f"{batch:,} {for_count(batch, 'image')}"
        what = f"a training step on {images}" if steps == 1 else f"{steps} training steps at once, on {images} each,"
        raise ConfigError(f"{flag}: {what} would take an estimated {steps * need / 1e9:,.2f} GB of memory "
                          f"(layer {layer!r} the most, {most / 1e9:,.2f} GB{' a step' if steps > 1 else ''}), "
                          f"more than the {available / 1e9:,.2f} GB available; "
                          + ("a smaller batch or model needs less" if steps == 1
                             else "fewer workers, a smaller batch or a smaller model need less")
                          + f"; {SKIP_FLAG} (or {SKIP_VARIABLE}=1) skips this check")
