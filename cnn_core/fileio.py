"""All-or-nothing file writes, shared by checkpoints and run folders."""
from __future__ import annotations

import contextlib
import os
import re
import uuid


_TMP_ID_LEN = 12
_TMP_NAME = re.compile(rf"^\..+\.[0-9a-f]{{{_TMP_ID_LEN}}}\.tmp$")


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", encoding: str | None = None):
    """Yield a file that replaces ``path`` only once it is completely written.

    The data goes to a temporary file in the same folder (created with mode
    0666 and O_EXCL, so the usual umask applies; ``tempfile.mkstemp`` would
    leave 0600), is fsync-ed, then renamed over ``path`` (``os.replace`` is
    atomic within a file system) and the folder fsync-ed: readers see the old
    file or the new one, and a crash leaves the previous version intact.  On
    any error the temporary file is removed and the error re-raised (OSError
    for I/O problems, for the caller to turn into its own one-line error).
    Missing parent folders are created.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:_TMP_ID_LEN]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def remove_stale_temporaries(folder) -> list[str]:
    """Remove what :func:`atomic_write` left in ``folder`` when its process was killed mid-write
    (a SIGKILL during a checkpoint: ``.checkpoint.npz.<id>.tmp``, as large as the checkpoint).
    Only for a folder the caller alone writes (a run folder, under its lock).  Returns the names."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if _TMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
    return sorted(removed)


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
