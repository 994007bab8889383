"""Whether a training step fits this machine's memory, checked before any data is read.

:func:`check_memory_fits` compares :meth:`~cnn_core.model.Model.training_step_bytes`'s estimate
with :func:`available_memory` (MemAvailable, or what the memory limits of this process's cgroup
and its ancestors leave, if less: a container's, a systemd unit's); ``pscnn train``, each worker
and ``pscnn run`` call it up front, so that a batch too big for memory fails in one line instead
of at its first step, after the data was read.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError
from .text import for_count


def available_memory(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup",
                     own_cgroup: str = "/proc/self/cgroup") -> int | None:
    """Bytes of memory a new allocation can take now without swapping: the smaller of
    ``meminfo``'s MemAvailable (Linux; else the free physical pages, os.sysconf) and what is
    left under the memory limits of this process's cgroup and its ancestors, as ``own_cgroup``
    names it, in the hierarchy mounted at ``cgroup`` (:func:`cgroup_memory_left`); None where
    none of them says."""
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
    # Inside a container (or a systemd unit with MemoryMax) MemAvailable is the host's: a step that
    # fits the host but not the cgroup's limit met the OOM killer.
    left = cgroup_memory_left(cgroup, own_cgroup)
    known = [value for value in (host, left) if value is not None]
    return min(known) if known else None


# Each cgroup version's files, relative to a cgroup's folder: the limit, the usage, the statistics,
# and the key of the inactive page cache in them.
CGROUP_V2_FILES = ("memory.max", "memory.current", "memory.stat", "inactive_file")
CGROUP_V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file")


def cgroup_memory_left(root: str = "/sys/fs/cgroup", own_cgroup: str = "/proc/self/cgroup") -> int | None:
    """Bytes left under the tightest memory limit on this process: of its cgroup, which
    ``own_cgroup`` names (cgroup v2's ``0::/PATH``, under ``root``; v1's ``memory`` controller line,
    under ``root``/memory), and of each of its ancestors, whose limits apply too, up to ``root``
    itself (a container's own cgroup, where ``own_cgroup`` says ``/`` or names a path its
    namespace does not show).  For each: its limit less its usage, less the inactive page cache
    the kernel reclaims before it kills (memory.stat's inactive_file, v1's total_inactive_file:
    MNIST's files read through the cache are counted as usage).  None with no limit: no such
    files, v2's "max" (v1's "no limit" is a value near 2**63, which the caller's min() with
    MemAvailable passes over)."""
    v2_path, v1_path = _own_cgroup_paths(own_cgroup)
    left = [_left_under_limit(folder, CGROUP_V2_FILES) for folder in _cgroup_folders(Path(root), v2_path)]
    left += [_left_under_limit(folder, CGROUP_V1_FILES) for folder in _cgroup_folders(Path(root, "memory"), v1_path)]
    known = [value for value in left if value is not None]
    return min(known) if known else None


def _own_cgroup_paths(own_cgroup: str) -> tuple[str, str]:
    """(cgroup v2 path, v1 memory controller's path) of the process ``own_cgroup`` (a
    /proc/PID/cgroup) describes: lines ``ID:CONTROLLERS:PATH``, v2's ``0::PATH``.  ``/`` for one
    it does not name, or where it cannot be read: the cgroup mounted at the root."""
    v2_path = v1_path = "/"
    try:
        text = Path(own_cgroup).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return v2_path, v1_path
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    return v2_path, v1_path


def _cgroup_folders(mount: Path, path: str) -> list[Path]:
    """The folders of the cgroup at ``path`` under ``mount`` and of its ancestors, ``mount``
    first; those that do not exist (a path outside a container's cgroup namespace) left out."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:       # a cgroup outside this namespace's: only the mount's own is known
        parts = []
    folders = [mount]
    for part in parts:
        folders.append(folders[-1] / part)
    return [folder for folder in folders if folder.is_dir()]


def _left_under_limit(folder: Path, files: tuple) -> int | None:
    """Bytes left under the memory limit of the cgroup at ``folder``, its ``files`` those of
    :data:`CGROUP_V2_FILES` or :data:`CGROUP_V1_FILES`; None with no limit or no files."""
    limit_file, usage_file, stat_file, cache_key = files
    try:
        limit = (folder / limit_file).read_text(encoding="ascii").strip()
        if limit == "max":
            return None
        usage = int((folder / usage_file).read_text(encoding="ascii"))
        limit = int(limit)
    except (OSError, ValueError):
        return None
    cache = 0
    try:
        for line in (folder / stat_file).read_text(encoding="ascii").splitlines():
            key, _, value = line.partition(" ")
            if key == cache_key:
                cache = int(value)
                break
    except (OSError, ValueError):
        pass            # no cache known: the usage as it stands
    return max(0, limit - max(0, usage - cache))


#: The switch of ``pscnn train``, ``worker`` and ``run`` that skips :func:`check_memory_fits`, and its
#: variable (pscnn.cli's PSCNN_<FLAG>), named in its refusal.
SKIP_FLAG = "--no-memory-check"
SKIP_VARIABLE = "PSCNN_NO_MEMORY_CHECK"


def check_memory_fits(model, batch: int, flag: str, steps: int = 1, optimizer_slots: int = 0) -> None:
    """ConfigError, before any data is read, if a training step on ``batch`` images would take
    more memory than is available (:meth:`~cnn_core.model.Model.training_step_bytes`'s
    estimate): a MemoryError, or the OOM killer, stopped the run at its first batch, after the
    data was read.  ``flag``: what set the batch, for the message.  ``steps``: how many such
    steps run at once on this machine (``pscnn run``'s workers).  ``optimizer_slots``: the
    parameter-sized arrays of an optimizer in this process (pscnn train's; a worker's optimizer
    is the server's).  On a GPU, whose memory is its own, nothing is checked.  The message names
    :data:`SKIP_FLAG`, which every command that checks takes: the estimate is not the step's
    measured peak, and may refuse a batch that fits."""
    if model.device != "cpu":
        return
    available = available_memory()
    if available is None:
        return
    need, layer, most = model.training_step_bytes(batch, optimizer_slots)
    if steps * need > available:
        images = f"{batch:,} {for_count(batch, 'image')}"
        what = f"a training step on {images}" if steps == 1 else f"{steps} training steps at once, on {images} each,"
        raise ConfigError(f"{flag}: {what} would take an estimated {steps * need / 1e9:,.2f} GB of memory "
                          f"(layer {layer!r} the most, {most / 1e9:,.2f} GB{' a step' if steps > 1 else ''}), "
                          f"more than the {available / 1e9:,.2f} GB available; "
                          + ("a smaller batch or model needs less" if steps == 1
                             else "fewer workers, a smaller batch or a smaller model need less")
                          + f"; {SKIP_FLAG} (or {SKIP_VARIABLE}=1) skips this check")
