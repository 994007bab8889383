"""MNIST: reading and verifying IDX files, downloading them, and batching.

Where the data comes from, in order of precedence (:func:`resolve_mnist_dir`):

1. an explicit ``mnist_dir`` argument, or
2. the ``MNIST_DIR`` environment variable -- both name a folder that already
   holds the four files; it may be read-only and is never written to;
3. the download cache (:func:`default_cache_dir`), filled from the mirrors in
   ``PSCNN_MNIST_MIRRORS`` (comma-separated) or :data:`DEFAULT_MIRRORS`.

Every load checks the md5 of the *decompressed* bytes against the official
release, so a corrupt or foreign file is caught before it trains a model
(about 0.1 s of md5 for the 47 MB of training images; decompression costs
more than hashing).  Files may be gzip-compressed or raw: gzip is detected by
its magic bytes, not by the file name.

Shuffling is a pure function of ``(seed, epoch)`` (:func:`epoch_permutation`),
so the parameter server and every worker agree on the batches of an epoch
without exchanging index lists.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import logging
import math
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .backend import resolve_dtype
from .config import is_integer
from .errors import ConfigError, DataError, ShapeError
from .text import for_count

__all__ = [
    "MNIST_FILES",
    "DEFAULT_MIRRORS",
    "MEAN",
    "STD",
    "read_idx",
    "download_file",
    "download_mnist",
    "download_from_args",
    "default_cache_dir",
    "resolve_mnist_dir",
    "load_mnist",
    "normalize",
    "epoch_permutation",
    "batch_index",
    "batch_length",
    "iterate_batches",
    "training_set_size",
]

log = logging.getLogger(__name__)

#: The four files of the official release.  ``md5`` is the digest of the
#: decompressed IDX bytes: re-compressed copies (different gzip headers) of
#: the same data still match it.  Looked up at call time, so tests may patch it.
MNIST_FILES: dict[str, dict] = {
    "train-images": {
        "filename": "train-images-idx3-ubyte.gz",
        "md5": "6bbc9ace898e44ae57da46a324031adb",
        "count": 60000,
        "item_shape": (28, 28),
        "magic": 0x00000803,
        "split": "train",
    },
    "train-labels": {
        "filename": "train-labels-idx1-ubyte.gz",
        "md5": "a25bea736e30d166cdddb491f175f624",
        "count": 60000,
        "item_shape": (),
        "magic": 0x00000801,
        "split": "train",
    },
    "test-images": {
        "filename": "t10k-images-idx3-ubyte.gz",
        "md5": "2646ac647ad5339dbf082846283269ea",
        "count": 10000,
        "item_shape": (28, 28),
        "magic": 0x00000803,
        "split": "test",
    },
    "test-labels": {
        "filename": "t10k-labels-idx1-ubyte.gz",
        "md5": "27ae3e4e09519cfbb04c329615203637",
        "count": 10000,
        "item_shape": (),
        "magic": 0x00000801,
        "split": "test",
    },
}

#: Base URLs tried in order.  yann.lecun.com comes last: it is often slow or
#: refuses downloads outright, while the two buckets serve the same files.
DEFAULT_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

#: Mean and standard deviation of the training pixels scaled to [0, 1].
MEAN, STD = 0.1307, 0.3081

SPLITS = ("train", "test")
NUM_CLASSES = 10

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
_MAX_BACKOFF_S = 30.0
# The low-speed limit (curl's --speed-limit / --speed-time): an attempt whose
# mirror delivers fewer bytes than this per second, over a window of
# ``timeout`` seconds, fails.  The per-operation timeout alone lets a mirror
# that trickles a byte every few seconds hold a download for days.
_MIN_BYTES_PER_S = 1024
# A download's temporary file untouched this long belongs to a downloader that
# was killed (a live one writes at least every ``timeout`` seconds, or fails).
_ABANDONED_PART_S = 3600
_USER_AGENT = "pscnn-mnist-downloader/0.1"

# IDX element type codes (third byte of the magic number) -> big-endian dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# What the magic numbers of the MNIST release hold, for messages naming a file of the wrong kind.
_MNIST_KINDS = {0x00000801: "labels", 0x00000803: "images"}

# What a path is that lstat finds and stat does not, for messages.
_BROKEN_LINK = "a broken symbolic link (its target is missing, or a loop)"


# --------------------------------------------------------------------------- #
# IDX files
# --------------------------------------------------------------------------- #
def read_idx(path, expected_md5: str | None = None, expected_count: int | None = None, *,
             expected_magic: int | None = None, expected_item_shape: Sequence[int] | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw) into a NumPy array.

    The file is rejected with a one-line :class:`DataError` naming it when it
    is missing, not decodable gzip, has a bad magic number or header, has a
    magic number other than ``expected_magic``, declares a different number
    of items than ``expected_count`` or items of another shape than
    ``expected_item_shape``, holds fewer or more data bytes than its header
    declares, or when the md5 of its decompressed bytes differs from
    ``expected_md5``.  The header is checked before the sizes, so a file of
    the wrong kind is reported as such, not as truncated.

    Args:
        path: the file.  Compression is detected from the gzip magic bytes.
        expected_md5: hex md5 of the decompressed content, or ``None``.
        expected_count: required length of the first dimension, or ``None``.
        expected_magic: required magic number (element type and number of
            dimensions), e.g. ``0x00000803`` for MNIST images, or ``None``.
        expected_item_shape: required dimensions after the first, e.g.
            ``(28, 28)``, or ``None``.

    Returns:
        A writable, native-byte-order array of the shape in the header,
        e.g. ``(60000, 28, 28)`` uint8 for images or ``(60000,)`` uint8 for
        labels.
    """
    path = Path(path)
    # Streamed, the header first: no more data is read than the checked header
    # declares, so a gzip bomb or a huge file cannot exhaust the memory.
    with _open_content(path) as stream:
        content = bytearray()
        _read_into(stream, content, 4, path)
        if len(content) < 4:
            raise DataError(f"{path}: truncated IDX header: {len(content)} bytes, need at least 4")
        magic = int.from_bytes(content[:4], "big")
        type_code, ndim = content[2], content[3]
        if content[:2] != b"\x00\x00" or type_code not in _IDX_DTYPES or ndim == 0:
            raise DataError(
                f"{path}: not an IDX file: magic number 0x{magic:08x} "
                f"(expected 0x00000801 for labels or 0x00000803 for images)"
            )
        dtype = _IDX_DTYPES[type_code]
        if expected_magic is not None and magic != expected_magic:
            # Before any size: the dimensions of a file of another kind mean nothing here.
            raise DataError(f"{path}: magic 0x{magic:08x} is {_magic_kind(magic, dtype, ndim)}, "
                            f"expected {_MNIST_KINDS.get(expected_magic, 'magic')} (0x{expected_magic:08x})")
        header_len = 4 + 4 * ndim
        _read_into(stream, content, header_len - 4, path)
        if len(content) < header_len:
            raise DataError(
                f"{path}: truncated IDX header: {len(content)} bytes, the {ndim} dimensions need {header_len}"
            )
        dims = tuple(int.from_bytes(content[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
        shape_txt = "x".join(map(str, dims))
        if expected_item_shape is not None and dims[1:] != tuple(expected_item_shape):
            item = "x".join(map(str, expected_item_shape)) or "scalar"
            raise DataError(f"{path}: header declares {shape_txt}: items of shape {'x'.join(map(str, dims[1:]))}, "
                            f"expected {item} items")
        if expected_count is not None and dims[0] != expected_count:
            raise DataError(f"{path}: holds {dims[0]} items, expected {expected_count}")

        # Python ints: the product of four uint32 dims overflows int64.
        expected_bytes = math.prod(dims) * dtype.itemsize
        _read_into(stream, content, expected_bytes, path)
        actual_bytes = len(content) - header_len
        # One chunk more tells trailing bytes from none (a bomb's tail is not
        # counted out), and reaching the end checks the gzip CRC.
        _read_into(stream, content, _CHUNK, path)
    trailing = len(content) - header_len - actual_bytes
    if actual_bytes < expected_bytes:
        raise DataError(
            f"{path}: truncated: header declares {shape_txt} ({expected_bytes} data bytes) "
            f"but only {actual_bytes} follow"
        )
    if trailing:
        raise DataError(
            f"{path}: {'at least ' if trailing == _CHUNK else ''}{trailing} unexpected trailing bytes "
            f"after the {shape_txt} data the header declares"
        )
    if expected_md5 is not None:
        digest = hashlib.md5(content).hexdigest()
        if digest != expected_md5.lower():
            raise DataError(
                f"{path}: checksum mismatch: md5 of the decompressed content is {digest}, "
                f"expected {expected_md5.lower()} (corrupt, or not the official file)"
            )

    arr = np.frombuffer(content, dtype=dtype, count=math.prod(dims), offset=header_len)
    # astype copies: the result owns its memory in native byte order
    # instead of a view over the decompressed bytes.
    return arr.reshape(dims).astype(dtype.newbyteorder("="))


def _magic_kind(magic: int, dtype: np.dtype, ndim: int) -> str:
    """What an IDX magic number says the file is, in words."""
    kind = _MNIST_KINDS.get(magic)
    if kind is not None:
        return f"an {kind} file" if kind[0] in "aeiou" else f"a {kind} file"
    return f"a {dtype.name} IDX file with {ndim} {for_count(ndim, 'dimension')}"


@contextlib.contextmanager
def _open_content(path: Path):
    """The file opened for reading its content: decompressed when it starts with the gzip magic."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an IDX file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {_one_line(exc.strerror or exc)}") from None
    with fh:
        try:
            is_gzip = fh.read(2) == _GZIP_MAGIC
            fh.seek(0)
        except OSError as exc:
            raise DataError(f"{path}: cannot read: {_one_line(exc.strerror or exc)}") from None
        yield gzip.GzipFile(fileobj=fh) if is_gzip else fh


def _read_into(stream, buf: bytearray, n: int, path: Path) -> None:
    """Append up to ``n`` more bytes of ``stream`` to ``buf`` (fewer at its end).

    A chunk at a time: memory follows the bytes there are, not ``n`` (a
    header may declare terabytes; ``read(n)`` would allocate them at once).
    """
    end = len(buf) + n
    try:
        while len(buf) < end and (chunk := stream.read(min(_CHUNK, end - len(buf)))):
            buf += chunk
    except (OSError, EOFError, zlib.error) as exc:
        if isinstance(stream, gzip.GzipFile):
            raise DataError(f"{path}: corrupt or truncated gzip data: {_one_line(exc)}") from None
        raise DataError(f"{path}: cannot read: {_one_line(getattr(exc, 'strerror', None) or exc)}") from None


class _ContentTooLarge(DataError):
    """A file's decompressed content runs past the size it must have."""


def _content_md5(path: Path, size: int | None = None) -> str:
    """md5 of the file's decompressed content, streamed (no full copy in memory).

    With ``size``, content running past it raises :class:`_ContentTooLarge`
    within a chunk: a gzip bomb is not decompressed to its end.
    """
    digest = hashlib.md5()
    read = 0
    with _open_content(path) as stream:
        try:
            while chunk := stream.read(_CHUNK):
                read += len(chunk)
                if size is not None and read > size:
                    break
                digest.update(chunk)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data: {_one_line(exc)}") from None
    if size is not None and read > size:
        raise _ContentTooLarge(f"{path}: decompresses to more than the {size} bytes the file has")
    return digest.hexdigest()


# --------------------------------------------------------------------------- #
# Downloading
# --------------------------------------------------------------------------- #
class _AttemptFailed(Exception):
    """One download attempt from one URL failed; ``transient`` says retry it."""

    def __init__(self, reason: str, transient: bool):
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


def download_file(
    urls: str | Sequence[str],
    dest,
    md5: str,
    retries: int = 3,
    timeout: float = 30,
    progress: bool = True,
    *,
    backoff: float = 1.0,
    size: int | None = None,
) -> Path:
    """Download one file, verify it, and move it into place atomically.

    The URLs (mirrors of the same file) are tried in order.  A mirror that
    fails permanently (HTTP 4xx, wrong checksum) is dropped; one that fails
    transiently (HTTP 5xx/408/429, timeout, connection error, cut-off
    transfer) is tried again in the next round, after ``backoff * 2**k``
    seconds (capped at 30 s).  There are ``1 + retries`` rounds.

    Each attempt writes a temporary file next to ``dest``, checks the md5 of
    its decompressed content, and only then ``os.replace``-s it onto
    ``dest``.  So ``dest`` is never seen half-written or unverified, and
    several processes may download into the same cache at once: the last
    rename wins, and all of them wrote the same verified bytes.

    Args:
        urls: one URL or a sequence of mirror URLs of the file.
        dest: where the file ends up; its folder is created.
        md5: hex md5 of the *decompressed* content (of the raw bytes when the
            file is not gzip).
        retries: extra rounds over the transiently failing mirrors.
        timeout: seconds each socket operation may block; also the window
            over which a transfer must average 1 KiB/s (a mirror trickling
            slower fails, transiently).
        progress: show a tqdm progress bar (only on a terminal).
        backoff: first delay between rounds, in seconds.
        size: bytes of the decompressed content, when known: a mirror that
            sends more than any encoding of it can take (:func:`_max_download`),
            or a file decompressing to more, is cut off and dropped, instead
            of filling the disk or decompressing a gzip bomb to its end.

    Returns:
        ``dest`` as a Path.

    Raises:
        DataError: every mirror failed (the message lists each one's last
            failure), or ``dest``'s folder cannot be written.
    """
    url_list = [urls] if isinstance(urls, str) else list(urls)
    if not url_list or not all(isinstance(u, str) and u for u in url_list):
        raise ConfigError(f"urls must be a non-empty URL or sequence of URLs, got {urls!r}")
    md5 = _check_md5(md5)
    retries = _check_int("retries", retries, 0)
    if not timeout > 0:
        raise ConfigError(f"timeout must be > 0 seconds, got {timeout!r}")
    if not backoff >= 0:
        raise ConfigError(f"backoff must be >= 0 seconds, got {backoff!r}")
    size = None if size is None else _check_int("size", size, 0)

    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:     # mkdir says no more than "File exists"
        what = _BROKEN_LINK if dest.parent.is_symlink() and not dest.parent.exists() else "a file"
        raise DataError(f"{dest.parent}: is {what}, not a folder to download into") from None
    except OSError as exc:
        raise DataError(f"{dest.parent}: cannot create download folder: {_one_line(exc.strerror or exc)}") from None

    _remove_abandoned_parts(dest)
    failures: dict[str, str] = {}
    pending = url_list
    for round_ in range(retries + 1):
        if round_:
            delay = min(backoff * 2 ** (round_ - 1), _MAX_BACKOFF_S)
            log.warning("download of %s failed (%s); retrying in %.1f s", dest.name,
                        "; ".join(failures[u] for u in pending), delay)
            time.sleep(delay)
        still_transient = []
        for url in pending:
            try:
                _fetch_verified(url, dest, md5, timeout, progress, size)
                return dest
            except _AttemptFailed as exc:
                failures[url] = exc.reason
                if exc.transient:
                    still_transient.append(url)
        pending = still_transient
        if not pending:
            break
    tried = "; ".join(f"{url}: {reason}" for url, reason in failures.items())
    raise DataError(f"{dest}: download failed from every mirror ({tried})")


def _part_prefix(dest: Path) -> str:
    """How the names of ``dest``'s temporary download files start (they end in ``.part``)."""
    return f".{dest.name}."


def _remove_abandoned_parts(dest: Path) -> None:
    """Remove temporary files of ``dest`` that a killed downloader left (a
    shared cache is written by several processes, so only the long-untouched)."""
    prefix, cutoff = _part_prefix(dest), time.time() - _ABANDONED_PART_S
    with contextlib.suppress(OSError):
        for entry in os.scandir(dest.parent):
            if not (entry.name.startswith(prefix) and entry.name.endswith(".part")):
                continue
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    log.info("removed %s, left by a download that was killed", entry.path)


def _fetch_verified(url: str, dest: Path, md5: str, timeout: float, progress: bool, size: int | None) -> None:
    """One attempt: stream ``url`` into a temp file, verify, rename onto ``dest``."""
    # A unique name in dest's folder: os.replace is only atomic within one
    # file system, and concurrent downloaders must not share a temp file.
    tmp = dest.parent / f"{_part_prefix(dest)}{os.getpid()}.{secrets.token_hex(4)}.part"
    try:
        # O_EXCL: never follow or clobber something already there.  Mode
        # 0o666 lets the umask decide, like a normally created file (a
        # shared cache stays readable by the other users).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise DataError(f"{tmp}: cannot create temporary file: {_one_line(exc.strerror or exc)}") from None
    # Only now is there a file to remove: unlinking one never created fails
    # with EROFS, not ENOENT, on a read-only file system.
    try:
        with os.fdopen(fd, "wb") as out:
            _stream_to(url, out, dest, timeout, progress, None if size is None else _max_download(size))
            try:
                out.flush()
                os.fsync(out.fileno())  # the renamed file must not be empty after a crash
            except OSError as exc:
                raise DataError(f"{tmp}: cannot write download: {_one_line(exc.strerror or exc)}") from None
        try:
            digest = _content_md5(tmp, size)
        except _ContentTooLarge as exc:
            raise _AttemptFailed(f"downloaded data too large ({_one_line(exc)})", transient=False) from None
        except DataError as exc:
            # Typically a transfer cut off without a Content-Length to notice it.
            raise _AttemptFailed(f"downloaded data unreadable ({_one_line(exc)})", transient=True) from None
        if digest != md5:
            raise _AttemptFailed(f"checksum mismatch: md5 of decompressed content {digest}, expected {md5}",
                                 transient=False)
        try:
            os.replace(tmp, dest)
        except OSError as exc:  # e.g. a directory in dest's place: no mirror can fix that
            raise DataError(f"{dest}: cannot put the download in place: {_one_line(exc.strerror or exc)}") from None
        tmp = None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _stream_to(url: str, out, dest: Path, timeout: float, progress: bool, limit: int | None) -> None:
    """Copy the body of ``url`` into the open file ``out``, with a progress bar.

    A body longer than ``limit`` bytes (declared or sent) is a permanent failure.

    Network problems become :class:`_AttemptFailed`; local write errors
    become :class:`DataError` (no mirror can fix a full disk).
    """
    try:
        # Inside the try: Request itself raises ValueError for a URL without a
        # scheme ("unknown url type") or with a malformed host ("[::1").
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        response = urllib.request.urlopen(request, timeout=timeout)
    except Exception as exc:  # noqa: BLE001  (classified below)
        raise _network_failure(exc, timeout) from None
    with response:
        # None without a Content-Length (file:// responses have no attribute at all).
        total = getattr(response, "length", None)
        if limit is not None and total is not None and total > limit:
            raise _AttemptFailed(f"Content-Length {total} is larger than the file can be ({limit} bytes)",
                                 transient=False)
        received = 0
        # read1 returns what has arrived (read would wait for a whole chunk), so
        # the low-speed check below runs however slowly the bytes come.
        read_some = getattr(response, "read1", response.read)
        window_start, window_received = time.monotonic(), 0
        # disable=None: tqdm shows the bar only when stderr is a terminal.
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                  disable=None if progress else True, file=sys.stderr) as bar:
            while True:
                try:
                    # One byte past the limit at most: enough to know the body is too long.
                    chunk = read_some(_CHUNK if limit is None else min(_CHUNK, limit + 1 - received))
                except Exception as exc:  # noqa: BLE001
                    raise _network_failure(exc, timeout) from None
                if not chunk:
                    break
                elapsed = time.monotonic() - window_start
                if elapsed >= timeout:
                    window_bytes = received + len(chunk) - window_received
                    if window_bytes < _MIN_BYTES_PER_S * elapsed:
                        raise _AttemptFailed(f"transfer too slow: {window_bytes} bytes in {elapsed:.1f} s "
                                             f"(the least is {_MIN_BYTES_PER_S} bytes/s)", transient=True)
                    window_start, window_received = time.monotonic(), received + len(chunk)
                if limit is not None and received + len(chunk) > limit:
                    raise _AttemptFailed(f"body larger than the file can be ({limit} bytes)", transient=False)
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise DataError(f"{dest}: cannot write download: {_one_line(exc.strerror or exc)}") from None
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise _AttemptFailed(f"transfer cut off after {received} of {total} bytes", transient=True)


def _max_download(size: int) -> int:
    """Most bytes a download of ``size`` bytes of content may take: raw, or gzip'd.

    Incompressible data grows by 5 bytes per deflate block (zlib's are 16 KiB;
    1/64 allows blocks of 320 bytes), plus gzip's header with its optional
    name and comment fields.
    """
    return size + size // 64 + (1 << 16)


def _network_failure(exc: Exception, timeout: float) -> _AttemptFailed:
    """Describe a failed request in one line and say whether retrying may help."""
    if isinstance(exc, urllib.error.HTTPError):
        exc.close()
        # 408/429 and 5xx are the server's momentary trouble; other 4xx
        # (404, 403 ...) will answer the same next time.
        transient = exc.code >= 500 or exc.code in (408, 429)
        return _AttemptFailed(f"HTTP {exc.code} {_one_line(exc.reason)}", transient)
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            return _AttemptFailed(f"timed out after {timeout} s", transient=True)
        if isinstance(reason, FileNotFoundError):  # a file:// mirror without the file
            return _AttemptFailed("file not found", transient=False)
        # Socket errors (refused, reset, DNS) come as OSError reasons and may
        # pass; a string reason ("unknown url type") or a local file's
        # permission problem will not.
        transient = isinstance(reason, OSError) and not isinstance(reason, (PermissionError, IsADirectoryError))
        return _AttemptFailed(_one_line(getattr(reason, "strerror", None) or reason), transient)
    if isinstance(exc, TimeoutError):
        return _AttemptFailed(f"timed out after {timeout} s", transient=True)
    if isinstance(exc, (OSError, http.client.HTTPException)):
        return _AttemptFailed(f"{type(exc).__name__}: {_one_line(exc)}", transient=True)
    # ValueError for a malformed URL or an unknown scheme: retrying cannot help.
    return _AttemptFailed(f"{type(exc).__name__}: {_one_line(exc)}", transient=False)


def download_mnist(
    cache_dir=None,
    mirrors: str | Sequence[str] | None = None,
    retries: int = 3,
    timeout: float = 30,
    progress: bool = True,
    *,
    files: Iterable[str] | None = None,
    backoff: float = 1.0,
) -> Path:
    """Download whichever MNIST files are missing from, or bad in, ``cache_dir``.

    A file already there, gzip'd or decompressed, is kept when the md5 of its
    decompressed content matches; otherwise the .gz is downloaded again and
    atomically replaced.

    Args:
        cache_dir: the folder; default :func:`default_cache_dir`.
        mirrors: base URL(s) that hold the files under their official names;
            default ``PSCNN_MNIST_MIRRORS`` (comma-separated), else
            :data:`DEFAULT_MIRRORS`.
        retries, timeout, progress, backoff: as in :func:`download_file`.
        files: logical names (keys of :data:`MNIST_FILES`) to fetch; default all four.

    Returns:
        ``cache_dir`` as a Path.
    """
    folder = (_expand_home(cache_dir, "the download folder", NO_HOME_DOWNLOAD_REMEDY) if cache_dir is not None
              else default_cache_dir(NO_HOME_DOWNLOAD_REMEDY))
    bases = _mirror_list(mirrors)
    for name in _check_file_names(files):
        info = MNIST_FILES[name]
        dest = folder / info["filename"]
        # The file load_mnist would read: the .gz, else its decompressed twin (which a fresh .gz shadows).
        present = _find_file(folder, name)
        if present is not None:
            try:
                if _content_md5(present, _content_size(info)) == info["md5"]:
                    # download_file's cleanup never runs for a file kept: a downloader
                    # killed before another one finished left its temporary file for good.
                    _remove_abandoned_parts(dest)
                    continue
            except DataError:
                pass
            log.warning("%s is corrupt or not the official file; downloading it again", present)
        download_file([base + info["filename"] for base in bases], dest, info["md5"],
                      retries=retries, timeout=timeout, progress=progress, backoff=backoff, size=_content_size(info))
    return folder


def download_from_args(args) -> int:
    """``pscnn download``: fetch and verify MNIST, and print its folder, absolute: what it prints is
    for MNIST_DIR, read from other folders too."""
    print(download_mnist(args.dir, progress=not args.no_progress).absolute())
    return 0


def _content_size(info: dict) -> int:
    """Bytes of an MNIST file's decompressed content: its IDX header and data."""
    itemsize = _IDX_DTYPES[info["magic"] >> 8 & 0xFF].itemsize
    return 4 + 4 * (1 + len(info["item_shape"])) + info["count"] * math.prod(info["item_shape"]) * itemsize


NO_HOME_REMEDY = ("set MNIST_DIR (or --mnist-dir) to a folder holding the MNIST files, or PSCNN_CACHE_DIR to a "
                  "folder to download them into")
# A download reads neither MNIST_DIR nor --mnist-dir: only where to download to helps it
NO_HOME_DOWNLOAD_REMEDY = ("give pscnn download --dir a folder to download the MNIST files into, or set "
                           "PSCNN_CACHE_DIR to one")


def default_cache_dir(remedy: str = NO_HOME_REMEDY) -> Path:
    """Where downloads go: ``$PSCNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/pscnn/mnist``,
    else ``~/.cache/pscnn/mnist``.  ``PSCNN_CACHE_DIR`` names the MNIST folder itself.

    DataError, ending in ``remedy``, when it is under a home folder there is none of (no
    ``HOME``, and a user id without a passwd entry, as in a container run with ``--user``)."""
    explicit = os.environ.get("PSCNN_CACHE_DIR")
    if explicit:
        return _expand_home(explicit, "PSCNN_CACHE_DIR", remedy)
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "pscnn" / "mnist"
    return _expand_home("~/.cache/pscnn/mnist", "the MNIST download cache", remedy)


def _expand_home(path, what: str, remedy: str = NO_HOME_REMEDY) -> Path:
    """``path`` with ``~`` expanded; DataError naming ``what`` and ``remedy`` where there is no
    home folder (pathlib's RuntimeError "Could not determine home directory" was a traceback)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise DataError(f"{what} {path} needs a home folder, and there is none (HOME is unset and "
                        f"user id {os.getuid()} has no passwd entry): {remedy}") from None


def _mirror_list(mirrors) -> list[str]:
    """Base URLs, each ending in '/', from the argument, the environment or the defaults."""
    if mirrors is None:
        env = os.environ.get("PSCNN_MNIST_MIRRORS")
        if env is not None and env.strip():
            mirrors = [m.strip() for m in env.split(",") if m.strip()]
            if not mirrors:     # only commas: say which setting, not "got []"
                raise ConfigError(f"PSCNN_MNIST_MIRRORS={env!r} names no mirror: set it to comma-separated "
                                  f"base URLs, or unset it")
        else:
            mirrors = DEFAULT_MIRRORS
    elif isinstance(mirrors, str):  # one mirror, not a sequence of characters
        mirrors = [mirrors]
    mirrors = list(mirrors)
    if not mirrors or not all(isinstance(m, str) and m.strip("/") for m in mirrors):
        raise ConfigError(f"mirrors must be one or more base URLs, got {mirrors!r}")
    return [m if m.endswith("/") else m + "/" for m in mirrors]


# --------------------------------------------------------------------------- #
# Locating the data
# --------------------------------------------------------------------------- #
def resolve_mnist_dir(mnist_dir=None, download: bool = True, *, files: Iterable[str] | None = None,
                      progress: bool = True) -> Path:
    """The folder to read MNIST from, downloading into the cache if needed.

    Precedence: ``mnist_dir`` > ``$MNIST_DIR`` > :func:`default_cache_dir`.
    A given folder (argument or ``MNIST_DIR``) must already hold the files
    (``.gz`` or decompressed); it is never written to, so it may be
    read-only or shared.  Only the cache is ever downloaded into.

    Args:
        mnist_dir: a folder holding the files, or ``None``.
        download: fetch files missing from the cache (else raise).
        files: logical names that must be present; default all four.
        progress: a download shows its progress bar (only on a terminal).

    Raises:
        DataError: a given folder does not exist or lacks a file (the message
            names both), or the cache lacks one and ``download`` is false.
    """
    return _resolve(mnist_dir, download, _check_file_names(files), progress)[0]


def _resolve(mnist_dir, download: bool, names: list[str], progress: bool) -> tuple[Path, bool]:
    """``(folder, is_cache)``; see :func:`resolve_mnist_dir`."""
    if mnist_dir is not None or os.environ.get("MNIST_DIR"):
        # Given by the caller (--mnist-dir, PSCNN_MNIST_DIR), or else by MNIST_DIR: say which.
        what = "MNIST folder" if mnist_dir is not None else "MNIST folder (from MNIST_DIR)"
        folder = _expand_home(mnist_dir if mnist_dir is not None else os.environ["MNIST_DIR"], what)
        if not folder.is_dir():
            raise DataError(f"{folder}: {what} does not exist or is not a folder")
        _check_not_directories(folder, names, broken_links=True)
        missing = [MNIST_FILES[n]["filename"] for n in names if _find_file(folder, n) is None]
        if missing:
            raise DataError(f"{folder}: {what} lacks {', '.join(missing)}")
        return folder, False

    folder = default_cache_dir()
    # A download replaces a broken link in the cache; without one, it reads as missing.
    _check_not_directories(folder, names, broken_links=not download)
    missing_names = [n for n in names if _find_file(folder, n) is None]
    if missing_names:
        if not download:
            missing = ", ".join(MNIST_FILES[n]["filename"] for n in missing_names)
            raise DataError(f"{folder}: MNIST cache lacks {missing} and download=False "
                            f"(set MNIST_DIR to a folder holding the files, or allow downloading)")
        try:
            download_mnist(folder, files=missing_names, progress=progress)
        except DataError as exc:
            # offline, the way out is a copy of the files, which the mirrors' errors do not say
            raise DataError(f"{exc}; to use a copy of the MNIST files instead, set MNIST_DIR (or --mnist-dir) "
                            f"to the folder holding them") from None
    return folder, True


def _check_not_directories(folder: Path, names: list[str], broken_links: bool) -> None:
    """DataError for a file that is there only as a directory (or another non-file),
    and with ``broken_links`` as a symbolic link to nothing (a loop, an unmounted volume).

    Without this it would read as missing (which ``ls`` contradicts), and a download
    could not replace a directory.
    """
    for name in names:
        if _find_file(folder, name) is not None:
            continue
        filename = MNIST_FILES[name]["filename"]
        for candidate in (filename, filename.removesuffix(".gz")):
            path = folder / candidate
            if path.is_dir():
                raise DataError(f"{path}: is a directory, not the MNIST file {filename}")
            if path.exists():
                raise DataError(f"{path}: is not a regular file, not the MNIST file {filename}")
            if broken_links and path.is_symlink():    # exists() follows the link: only lstat sees it
                raise DataError(f"{path}: is {_BROKEN_LINK}, not the MNIST file {filename}")


def _find_file(folder: Path, name: str) -> Path | None:
    """The file for logical ``name`` in ``folder``: the .gz, else its decompressed twin."""
    filename = MNIST_FILES[name]["filename"]
    for candidate in (filename, filename.removesuffix(".gz")):
        path = folder / candidate
        if path.is_file():
            return path
    return None


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #
def normalize(images_uint8, dtype="float32") -> np.ndarray:
    """Scale raw pixels to the model's input: ``(x / 255 - MEAN) / STD``.

    Args:
        images_uint8: ``(N, H, W)`` or ``(N, 1, H, W)`` uint8 pixels.
        dtype: ``"float32"`` or ``"float64"``.

    Returns:
        A new ``(N, 1, H, W)`` array of ``dtype``.
    """
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8:
        raise ShapeError(f"normalize expects uint8 pixels, got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim != 4 or images.shape[1] != 1:
        raise ShapeError(f"normalize expects images of shape (N, H, W) or (N, 1, H, W), got {images.shape}")
    out = images.astype(resolve_dtype(dtype))
    # One multiply and one subtract in place, rather than three temporaries.
    out *= 1.0 / (255.0 * STD)
    out -= MEAN / STD
    return out


_normalize = normalize  # load_mnist's ``normalize`` flag shadows the function


def load_mnist(
    split: str = "train",
    mnist_dir=None,
    limit: int | None = None,
    dtype="float32",
    normalize: bool = True,
    download: bool = True,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of MNIST, verified against the official md5 digests.

    Args:
        split: ``"train"`` (60000 items) or ``"test"`` (10000).
        mnist_dir: folder holding the files; see :func:`resolve_mnist_dir`.
        limit: keep only the first ``limit`` items (all when ``None`` or
            larger than the split).
        dtype: float dtype of normalized images.
        normalize: scale images with :func:`normalize`; when false the
            images are the raw uint8 pixels (``dtype`` is then unused).
        download: allow downloading missing files into the cache.
        progress: a download shows its progress bar (only on a terminal).

    Returns:
        ``(x, y)``: ``x`` of shape ``(N, 1, 28, 28)`` (``dtype``, or uint8
        when not normalized) and ``y`` of shape ``(N,)`` int64 in ``0..9``.
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None:
        limit = _check_int("limit", limit, 0)
    if normalize:
        resolve_dtype(dtype)  # fail on a bad dtype before reading 47 MB
    names = [f"{split}-images", f"{split}-labels"]
    folder, is_cache = _resolve(mnist_dir, download, names, progress)

    images = _read_mnist_file(folder, names[0], repair=is_cache and download, progress=progress)
    labels = _read_mnist_file(folder, names[1], repair=is_cache and download, progress=progress)
    if labels.max(initial=0) >= NUM_CLASSES:
        raise DataError(f"{_find_file(folder, names[1])}: label {int(labels.max())} outside 0..{NUM_CLASSES - 1}")
    if len(images) != len(labels):  # only possible with patched MNIST_FILES counts
        raise DataError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")

    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = _normalize(images, dtype) if normalize else images[:, None]
    return x, labels.astype(np.int64)


def _read_mnist_file(folder: Path, name: str, repair: bool, progress: bool) -> np.ndarray:
    """Read and check one MNIST file; a bad file in the cache is downloaded again once."""
    info = MNIST_FILES[name]
    path = _find_file(folder, name)
    # Kind and shape first: a labels file in the images' place is named as such.
    checks = {"expected_md5": info["md5"], "expected_count": info["count"], "expected_magic": info["magic"],
              "expected_item_shape": tuple(info["item_shape"])}
    try:
        arr = read_idx(path, **checks)
    except DataError as exc:
        if not repair:
            raise
        log.warning("%s; downloading it again", exc)
        # No unlink: download_mnist replaces a bad .gz atomically (another
        # process may be reading it), and a fresh .gz shadows a bad raw twin.
        download_mnist(folder, files=[name], progress=progress)
        path = folder / info["filename"]
        arr = read_idx(path, **checks)
    return arr


# --------------------------------------------------------------------------- #
# Shuffling and batching
# --------------------------------------------------------------------------- #
def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of ``n`` items for ``epoch``: a pure function of its arguments.

    Seeding with the pair ``[seed, epoch]`` gives every epoch an independent
    stream without any state carried between epochs, so a restarted server
    or any worker recomputes exactly the same order.

    Returns:
        ``(n,)`` int64, a permutation of ``0..n-1``.
    """
    n = _check_int("n", n, 0)
    seed = _check_int("seed", seed, 0)
    epoch = _check_int("epoch", epoch, 0)
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_index(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = False) -> list[np.ndarray]:
    """The epoch's batches as index arrays into the dataset.

    Consecutive ``batch_size`` slices of :func:`epoch_permutation`; every
    index appears exactly once, in a final short batch unless ``drop_last``
    (which drops those ``n % batch_size`` indices instead).

    Returns:
        A list of ``ceil(n / batch_size)`` (``floor`` with ``drop_last``)
        int64 arrays of shape ``(batch_size,)`` (the last possibly shorter).
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    perm = epoch_permutation(n, seed, epoch)
    stop = len(perm) - len(perm) % batch_size if drop_last else len(perm)
    return [perm[i:i + batch_size] for i in range(0, stop, batch_size)]


def training_set_size(train_limit: int) -> int:
    """The images a run trains on: MNIST's training set, or its first ``train_limit`` (0: all).

    Known before the data is read (:func:`load_mnist` refuses a file of another count), so a run's
    length, and what depends on it, is checked before 47 MB are read."""
    size = MNIST_FILES["train-images"]["count"]
    return min(train_limit or size, size)


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Batches in an epoch of ``n`` samples: the last one may be short (no ``drop_last``)."""
    return -(-n // batch_size)


def batch_length(n: int, batch_size: int, batch: int) -> int:
    """Samples in batch number ``batch`` of :func:`batch_index` (without ``drop_last``).

    ``batch_size``, or fewer for the last batch of an epoch; what a worker's
    push must report as its count and what the parameter server weighs it by.
    """
    return max(0, min(batch_size, n - batch * batch_size))


def iterate_batches(x, y, batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                    drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(xb, yb)`` batches of aligned rows of ``x`` and ``y``.

    Args:
        x: ``(N, ...)`` inputs; y: ``(N, ...)`` targets.
        batch_size: rows per batch (the last may be shorter unless ``drop_last``).
        seed, epoch: pick the order through :func:`batch_index` when ``shuffle``.
        shuffle: false yields the rows in order (as views, no copying).

    Yields:
        ``(xb, yb)`` with ``xb.shape == (B, ...)`` and ``yb.shape == (B, ...)``.
    """
    # Validate now, not at the first next(): a generator would defer the error.
    batch_size = _check_int("batch_size", batch_size, 1)
    if len(x) != len(y):
        raise ShapeError(f"x and y differ in length: {len(x)} vs {len(y)}")
    n = len(x)
    if shuffle:
        batches = batch_index(n, batch_size, seed, epoch, drop_last=drop_last)
        return ((x[idx], y[idx]) for idx in batches)
    stop = n - n % batch_size if drop_last else n
    return ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, stop, batch_size))


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def _check_int(name: str, value, minimum: int) -> int:
    if not is_integer(value):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_md5(md5) -> str:
    if not isinstance(md5, str) or len(md5) != 32 or any(c not in "0123456789abcdefABCDEF" for c in md5):
        raise ConfigError(f"md5 must be 32 hex digits, got {md5!r}")
    return md5.lower()


def _check_file_names(files) -> list[str]:
    if files is None:
        return list(MNIST_FILES)
    names = [files] if isinstance(files, str) else list(files)
    unknown = [n for n in names if n not in MNIST_FILES]
    if unknown:
        raise ConfigError(f"unknown MNIST file name(s) {unknown}: expected some of {list(MNIST_FILES)}")
    return names


def _one_line(obj) -> str:
    """``str(obj)`` with newlines folded, so error messages stay one line."""
    return " ".join(str(obj).split())
