"""All-or-nothing file writes, shared by checkpoints and run folders."""
from __future__ import annotations

import contextlib
import os
import uuid


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
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
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
