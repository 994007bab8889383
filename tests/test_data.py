"""Tests of cnn_core.data: IDX reading and checks, the downloader, batching.

Real-MNIST tests read the folder named by MNIST_DIR (CI sets it to
../shared/mnist).  Everything else builds tiny IDX files in tmp_path and
serves them from a local http.server, so no test touches the network or the
user's cache.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import socket
import stat
import threading
import time
import urllib.error
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cnn_core import data
from cnn_core.errors import ConfigError, DataError, ShapeError
from helpers import error_line, one_line_naming

REAL_MNIST = os.environ.get("MNIST_DIR")
needs_real_mnist = pytest.mark.skipif(
    not REAL_MNIST, reason="MNIST_DIR is not set: no folder with the real MNIST files to test against"
)

# Known facts about the official release, independent of this code.
TRAIN_FIRST_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
TEST_FIRST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


# --------------------------------------------------------------------------- #
# helpers and fixtures
# --------------------------------------------------------------------------- #
def idx_bytes(arr: np.ndarray) -> bytes:
    """Serialize ``arr`` (uint8 or big-endian-able int32) as an IDX file."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
    header = bytes([0, 0, codes[arr.dtype], arr.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def snapshot(folder: Path) -> dict:
    """Name -> (size, mtime_ns, mode) of every entry: any write shows up."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode) for p in folder.iterdir()}


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No test sees the caller's MNIST_DIR/cache/mirrors; the cache is in tmp_path.

    The mirrors point at a closed local port, so a test that downloads by
    mistake fails fast instead of reaching the internet.
    """
    for var in ("MNIST_DIR", "XDG_CACHE_HOME", "PSCNN_MNIST_MIRRORS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PSCNN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "DEFAULT_MIRRORS", ("http://127.0.0.1:1/not-a-mirror/",))
    return tmp_path / "cache"


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch):
    """A folder holding four small but valid MNIST-format .gz files.

    MNIST_FILES is patched with their md5s and counts, so every check the real
    data goes through runs here too, in milliseconds.
    Returns ``(folder, {name: array}, {name: decompressed bytes})``.
    """
    rng = np.random.default_rng(1234)
    counts = {"train": 12, "test": 5}
    arrays = {}
    for split, n in counts.items():
        arrays[f"{split}-images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{split}-labels"] = rng.integers(0, 10, size=n, dtype=np.uint8)
    folder = tmp_path / "tiny"
    folder.mkdir()
    raw = {}
    for name, arr in arrays.items():
        raw[name] = idx_bytes(arr)
        (folder / data.MNIST_FILES[name]["filename"]).write_bytes(gzip.compress(raw[name]))
        monkeypatch.setitem(data.MNIST_FILES[name], "md5", md5(raw[name]))
        monkeypatch.setitem(data.MNIST_FILES[name], "count", len(arr))
    return folder, arrays, raw


class LocalServer:
    """A threaded HTTP server on 127.0.0.1 with scripted responses per path.

    ``route(path, *responses)``: each response is ``(status, body)``,
    ``(status, body, declared_length)`` (``None``: no Content-Length, the end of
    the body is the end of the connection) or ``(status, body, declared_length,
    seconds_per_byte)`` (the body trickles out a byte at a time); they are
    served in order and the last one repeats.  Unrouted paths get 404.
    ``hits`` counts requests.
    """

    def __init__(self):
        self.routes: dict[str, list] = {}
        self.hits: Counter = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802  (http.server's naming)
                with server._lock:
                    server.hits[self.path] += 1
                    script = server.routes.get(self.path, [(404, b"not found")])
                    response = script.pop(0) if len(script) > 1 else script[0]
                status, body, *declared = response
                self.send_response(status)
                if not declared or declared[0] is not None:
                    self.send_header("Content-Length", str(declared[0] if declared else len(body)))
                self.end_headers()
                try:
                    if len(declared) > 1:
                        for i in range(len(body)):
                            self.wfile.write(body[i:i + 1])
                            self.wfile.flush()
                            time.sleep(declared[1])
                    else:
                        self.wfile.write(body)
                except OSError:  # a client that hangs up on an oversized or slow body
                    pass

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def route(self, path: str, *responses) -> None:
        self.routes[path] = list(responses)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(request):
    srv = LocalServer()
    request.addfinalizer(srv.close)
    return srv


def fetch(urls, dest, md5_hex, **kw):
    """download_file with test-friendly defaults (no bar, short backoff)."""
    kw.setdefault("progress", False)
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 5)
    return data.download_file(urls, dest, md5_hex, **kw)


@pytest.fixture
def payload():
    """A small gzip'd IDX file: ``(gz bytes, md5 of the decompressed bytes)``."""
    raw = idx_bytes(np.arange(200, dtype=np.uint8).reshape(8, 5, 5))
    return gzip.compress(raw), md5(raw)


# --------------------------------------------------------------------------- #
# the real MNIST files
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def real_train():
    return data.load_mnist("train", mnist_dir=REAL_MNIST, download=False)


@needs_real_mnist
def test_real_train_split(real_train):
    x, y = real_train
    assert x.shape == (60000, 1, 28, 28) and x.dtype == np.float32
    assert y.shape == (60000,) and y.dtype == np.int64
    assert y[:10].tolist() == TRAIN_FIRST_LABELS
    assert np.bincount(y, minlength=10).tolist() == TRAIN_CLASS_COUNTS
    # MEAN/STD are the training set's own statistics, so it normalizes to 0/1.
    assert abs(float(x.mean())) < 1e-3
    assert abs(float(x.std()) - 1.0) < 1e-3
    assert float(x.min()) == pytest.approx(-data.MEAN / data.STD, abs=1e-5)
    assert float(x.max()) == pytest.approx((1 - data.MEAN) / data.STD, abs=1e-5)


@needs_real_mnist
def test_real_test_split_via_env_never_writes(monkeypatch, isolated_env):
    folder = Path(REAL_MNIST)
    before = snapshot(folder)
    monkeypatch.setenv("MNIST_DIR", REAL_MNIST)
    x, y = data.load_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert y[:10].tolist() == TEST_FIRST_LABELS
    assert set(np.unique(y).tolist()) == set(range(10))
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1.0) < 0.05  # other split: roughly 0/1
    assert snapshot(folder) == before
    assert not isolated_env.exists(), "nothing may be downloaded when MNIST_DIR is set"


@needs_real_mnist
def test_real_files_pass_md5_and_count():
    for info in data.MNIST_FILES.values():
        arr = data.read_idx(Path(REAL_MNIST) / info["filename"], info["md5"], info["count"])
        assert arr.shape == (info["count"], *info["item_shape"]) and arr.dtype == np.uint8
        assert arr.flags.writeable


@needs_real_mnist
def test_real_file_checksum_mismatch_names_file():
    path = Path(REAL_MNIST) / data.MNIST_FILES["test-labels"]["filename"]
    with pytest.raises(DataError, match="checksum mismatch") as exc:
        data.read_idx(path, expected_md5="0" * 32)
    one_line_naming(exc.value, path)


@needs_real_mnist
def test_real_limit_and_raw_pixels(real_train):
    x_raw, y = data.load_mnist("train", mnist_dir=REAL_MNIST, limit=100, normalize=False)
    assert x_raw.shape == (100, 1, 28, 28) and x_raw.dtype == np.uint8
    np.testing.assert_array_equal(y, real_train[1][:100])
    np.testing.assert_allclose(data.normalize(x_raw), real_train[0][:100], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- #
# read_idx on generated files
# --------------------------------------------------------------------------- #
IMAGES = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)


def test_read_idx_raw_and_gzip_detected_by_content_not_suffix(tmp_path):
    raw = idx_bytes(IMAGES)
    gz_named_idx = tmp_path / "images.idx"
    raw_named_gz = tmp_path / "images.gz"
    gz_named_idx.write_bytes(gzip.compress(raw))
    raw_named_gz.write_bytes(raw)
    for path in (gz_named_idx, raw_named_gz):
        arr = data.read_idx(path, expected_md5=md5(raw), expected_count=3)
        np.testing.assert_array_equal(arr, IMAGES)
        assert arr.dtype == np.uint8


def test_read_idx_labels_and_multibyte_types(tmp_path):
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    (tmp_path / "l").write_bytes(idx_bytes(labels))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "l"), labels)
    ints = np.array([[-2, 70000], [1, 2**31 - 1]], dtype=np.int32)
    (tmp_path / "i").write_bytes(idx_bytes(ints))
    arr = data.read_idx(tmp_path / "i")
    np.testing.assert_array_equal(arr, ints)
    assert arr.dtype.isnative  # big-endian on disk, native in memory


GOOD = idx_bytes(IMAGES)
CORRUPTIONS = {
    "unknown element type": (b"\x00\x00\x0a\x03" + GOOD[4:], "not an IDX file: magic number 0x00000a03"),
    "zero dimensions": (b"\x00\x00\x08\x00" + GOOD[4:], "not an IDX file: magic number 0x00000800"),
    "magic not starting with zeros": (b"PK\x03\x04" + GOOD[4:], "not an IDX file"),
    # A valid type code and dimension count, but the magic's two leading bytes are not zero.
    "first magic byte not zero": (b"\x01\x00\x08\x03" + GOOD[4:], "not an IDX file: magic number 0x01000803"),
    "second magic byte not zero": (b"\x00\x01\x08\x03" + GOOD[4:], "not an IDX file: magic number 0x00010803"),
    "empty": (b"", "truncated IDX header"),
    "header cut in the dims": (GOOD[:10], "truncated IDX header"),
    "data cut short": (GOOD[:-7], "truncated: header declares 3x4x5 (60 data bytes) but only 53 follow"),
    "trailing bytes": (GOOD + b"\x00" * 5, "5 unexpected trailing bytes"),
    "data one byte short": (GOOD[:-1], "truncated: header declares 3x4x5 (60 data bytes) but only 59 follow"),
    "one trailing byte": (GOOD + b"\x00", "1 unexpected trailing bytes"),
}


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_read_idx_rejects_malformed_files(tmp_path, case, compress):
    content, expected = CORRUPTIONS[case]
    path = tmp_path / "bad-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(content) if compress else content)
    with pytest.raises(DataError) as exc:
        data.read_idx(path)
    assert expected in one_line_naming(exc.value, path)


@pytest.mark.parametrize("mangle", [
    lambda gz: gz[: len(gz) // 2],                    # download cut off
    lambda gz: gz[:10] + b"\xff" * (len(gz) - 10),   # deflate stream garbage
    lambda gz: gz[:-8] + b"\x00" * 8,               # CRC/length trailer wrong
], ids=["truncated", "garbage", "bad-crc"])
def test_read_idx_rejects_corrupt_gzip(tmp_path, mangle):
    path = tmp_path / "images.gz"
    path.write_bytes(mangle(gzip.compress(GOOD)))
    with pytest.raises(DataError, match="corrupt or truncated gzip") as exc:
        data.read_idx(path)
    one_line_naming(exc.value, path)


def test_read_idx_checksum_and_count(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(GOOD)
    with pytest.raises(DataError, match=f"md5 of the decompressed content is {md5(GOOD)}") as exc:
        data.read_idx(path, expected_md5="f" * 32)
    one_line_naming(exc.value, path)
    with pytest.raises(DataError, match="holds 3 items, expected 60000") as exc:
        data.read_idx(path, expected_count=60000)
    one_line_naming(exc.value, path)
    # md5 of the gzip wrapper is not what is checked: the decompressed bytes are.
    path.write_bytes(gzip.compress(GOOD))
    data.read_idx(path, expected_md5=md5(GOOD).upper())


def test_read_idx_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope-idx1-ubyte.gz"
    with pytest.raises(DataError, match="file not found") as exc:
        data.read_idx(missing)
    one_line_naming(exc.value, missing)
    with pytest.raises(DataError, match="is a directory") as exc:
        data.read_idx(tmp_path)
    one_line_naming(exc.value, tmp_path)


def test_gzip_bomb_is_rejected_without_decompressing_it(tiny_mnist):
    # A valid header and 5 images, then 128 MiB of zeros in a 128 KiB .gz: read
    # whole, it was all decompressed into memory before its size was checked.
    import tracemalloc
    import zlib
    folder, arrays, raw = tiny_mnist
    path = folder / data.MNIST_FILES["test-images"]["filename"]
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    path.write_bytes(bomb.compress(raw["test-images"]) + b"".join(bomb.compress(zeros) for _ in range(128))
                     + bomb.flush())
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="unexpected trailing bytes after the 5x28x28 data") as exc:
            data.load_mnist("test", mnist_dir=folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_line_naming(exc.value, path)
    assert peak < 16 << 20, f"{peak} bytes allocated to reject a bomb"


# --------------------------------------------------------------------------- #
# normalize and load_mnist on tiny files
# --------------------------------------------------------------------------- #
def test_normalize_values_shapes_and_dtypes():
    imgs = np.array([[[0, 255], [51, 0]]], dtype=np.uint8)  # (1, 2, 2)
    out = data.normalize(imgs)
    assert out.shape == (1, 1, 2, 2) and out.dtype == np.float32
    expected = (imgs[:, None] / 255.0 - data.MEAN) / data.STD
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    out64 = data.normalize(imgs[:, None], dtype="float64")  # (N, 1, H, W) accepted too
    assert out64.dtype == np.float64 and out64.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(out64, expected, rtol=1e-12)
    with pytest.raises(ShapeError, match="uint8"):
        data.normalize(imgs.astype(np.float32))
    with pytest.raises(ShapeError, match=r"\(N, H, W\)"):
        data.normalize(np.zeros((2, 3, 28, 28), dtype=np.uint8))
    with pytest.raises(ConfigError, match="dtype"):
        data.normalize(imgs, dtype="int8")


def test_load_mnist_tiny_folder(tiny_mnist):
    folder, arrays, _ = tiny_mnist
    x, y = data.load_mnist("train", mnist_dir=folder)
    assert x.shape == (12, 1, 28, 28) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x, data.normalize(arrays["train-images"]))
    np.testing.assert_array_equal(y, arrays["train-labels"])

    x, y = data.load_mnist("test", mnist_dir=folder, limit=3, dtype="float64")
    assert x.shape == (3, 1, 28, 28) and x.dtype == np.float64
    np.testing.assert_array_equal(y, arrays["test-labels"][:3])
    assert len(data.load_mnist("test", mnist_dir=folder, limit=10**6)[0]) == 5  # limit clamps like a slice
    x, y = data.load_mnist("test", mnist_dir=folder, limit=0)
    assert x.shape == (0, 1, 28, 28) and y.shape == (0,)
    x, _ = data.load_mnist("test", mnist_dir=folder, normalize=False)
    np.testing.assert_array_equal(x[:, 0], arrays["test-images"])


def test_load_mnist_reads_decompressed_files(tiny_mnist, tmp_path):
    src, arrays, raw = tiny_mnist
    folder = tmp_path / "unzipped"
    folder.mkdir()
    for name in ("test-images", "test-labels"):  # only the split being loaded is needed
        (folder / data.MNIST_FILES[name]["filename"].removesuffix(".gz")).write_bytes(raw[name])
    x, y = data.load_mnist("test", mnist_dir=folder)
    np.testing.assert_array_equal(y, arrays["test-labels"])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        data.load_mnist("train", mnist_dir=folder)


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "val"}, "split must be 'train' or 'test'"),
    ({"limit": -1}, "limit must be >= 0"),
    ({"limit": 2.5}, "limit must be an integer"),
    ({"dtype": "int8"}, "unsupported dtype"),
])
def test_load_mnist_validates_arguments(tiny_mnist, kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load_mnist(mnist_dir=tiny_mnist[0], **kwargs)


def test_load_mnist_rejects_out_of_range_labels(tiny_mnist, monkeypatch):
    folder, _, _ = tiny_mnist
    bad = idx_bytes(np.array([1, 2, 10, 3, 4], dtype=np.uint8))
    path = folder / data.MNIST_FILES["test-labels"]["filename"]
    path.write_bytes(gzip.compress(bad))
    monkeypatch.setitem(data.MNIST_FILES["test-labels"], "md5", md5(bad))
    with pytest.raises(DataError, match="label 10 outside 0..9") as exc:
        data.load_mnist("test", mnist_dir=folder)
    one_line_naming(exc.value, path)


def _labels_carrying_images_magic(folder: Path, split: str) -> Path:
    """The reviewer's file: the images file's header (and some of its pixels) where the labels belong."""
    images = gzip.decompress((folder / data.MNIST_FILES[f"{split}-images"]["filename"]).read_bytes())
    path = folder / data.MNIST_FILES[f"{split}-labels"]["filename"]
    path.write_bytes(gzip.compress(images[:len(images) // 2]))
    return path


def test_mnist_file_of_the_wrong_kind_is_named_before_its_sizes(tiny_mnist):
    folder, arrays, _ = tiny_mnist
    path = _labels_carrying_images_magic(folder, "test")
    with pytest.raises(DataError) as exc:
        data.load_mnist("test", mnist_dir=folder)
    msg = one_line_naming(exc.value, path)
    assert msg.endswith("magic 0x00000803 is an images file, expected labels (0x00000801)"), msg
    assert "truncated" not in msg

    # Labels as 32-bit floats (type code 0x0D): the magic, not "truncated: header declares ...".
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + len(arrays["test-labels"]).to_bytes(4, "big")
                     + arrays["test-labels"].astype(">f4").tobytes()[:7])
    with pytest.raises(DataError) as exc:
        data.load_mnist("test", mnist_dir=folder)
    assert one_line_naming(exc.value, path).endswith(
        "magic 0x00000d01 is a float32 IDX file with 1 dimension, expected labels (0x00000801)")

    # And labels where the images belong.
    images = folder / data.MNIST_FILES["train-images"]["filename"]
    images.write_bytes((folder / data.MNIST_FILES["train-labels"]["filename"]).read_bytes())
    with pytest.raises(DataError) as exc:
        data.load_mnist("train", mnist_dir=folder)
    assert one_line_naming(exc.value, images).endswith(
        "magic 0x00000801 is a labels file, expected images (0x00000803)")


def test_mnist_file_dimensions_checked_before_sizes(tiny_mnist):
    folder, _, _ = tiny_mnist
    path = folder / data.MNIST_FILES["test-images"]["filename"]
    # Right magic, items of the wrong shape, and far fewer bytes than the header declares.
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((5, 28, 27), dtype=np.uint8))[:100]))
    with pytest.raises(DataError) as exc:
        data.load_mnist("test", mnist_dir=folder)
    msg = one_line_naming(exc.value, path)
    assert "items of shape 28x27, expected 28x28 items" in msg and "truncated" not in msg, msg
    # A count other than the release's, cut short: the count is what is wrong.
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((60000, 28, 28), dtype=np.uint8))[:5000]))
    with pytest.raises(DataError) as exc:
        data.load_mnist("test", mnist_dir=folder)
    assert one_line_naming(exc.value, path).endswith("holds 60000 items, expected 5")


def test_read_idx_expected_magic_and_item_shape(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(GOOD)
    arr = data.read_idx(path, expected_magic=0x00000803, expected_item_shape=(4, 5))
    np.testing.assert_array_equal(arr, IMAGES)
    with pytest.raises(DataError, match=r"magic 0x00000803 is an images file, expected labels \(0x00000801\)"):
        data.read_idx(path, expected_magic=0x00000801)
    with pytest.raises(DataError, match="items of shape 4x5, expected 28x28 items"):
        data.read_idx(path, expected_item_shape=(28, 28))


def test_mnist_file_that_is_a_directory_is_named_as_one(tiny_mnist, monkeypatch, isolated_env):
    folder, arrays, raw = tiny_mnist
    path = folder / data.MNIST_FILES["test-images"]["filename"]
    path.unlink()
    path.mkdir()
    with pytest.raises(DataError) as exc:
        data.load_mnist("test", mnist_dir=folder)
    msg = one_line_naming(exc.value, path)
    assert "is a directory" in msg and "lacks" not in msg, msg
    # With its decompressed twin there, a file, that is read: the directory is no problem then.
    (folder / "t10k-images-idx3-ubyte").write_bytes(raw["test-images"])
    x, _ = data.load_mnist("test", mnist_dir=folder, normalize=False)
    np.testing.assert_array_equal(x[:, 0], arrays["test-images"])
    # In the download cache, a directory is reported too, not downloaded over.
    (isolated_env / "t10k-labels-idx1-ubyte.gz").mkdir(parents=True)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: is a directory"):
        data.load_mnist("test", download=False)


def test_mnist_file_that_is_a_broken_symlink_is_named_as_one(tiny_mnist, mnist_mirror, isolated_env, monkeypatch):
    # A symlink loop, or a link into an unmounted volume, read as "lacks" a file that ls shows.
    folder, arrays, _ = tiny_mnist
    server, _ = mnist_mirror
    monkeypatch.setenv("PSCNN_MNIST_MIRRORS", server.url("/mnist"))
    looped = folder / data.MNIST_FILES["train-images"]["filename"]
    looped.unlink()
    looped.symlink_to(looped.name)
    dangling = folder / data.MNIST_FILES["test-labels"]["filename"]
    dangling.unlink()
    dangling.symlink_to(folder / "unmounted" / dangling.name)
    for split, path in (("train", looped), ("test", dangling)):
        with pytest.raises(DataError) as exc:
            data.load_mnist(split, mnist_dir=folder)
        msg = one_line_naming(exc.value, path)
        assert "broken symbolic link" in msg and "lacks" not in msg, msg
    # In the download cache, a download replaces the link.
    isolated_env.mkdir()
    (isolated_env / looped.name).symlink_to(looped.name)
    _, y = data.load_mnist("train")
    np.testing.assert_array_equal(y, arrays["train-labels"])
    assert (isolated_env / looped.name).is_file() and not (isolated_env / looped.name).is_symlink()


@pytest.fixture
def no_download(monkeypatch):
    """Make any download attempt fail the test loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected download: {args}")
    monkeypatch.setattr(data, "download_file", refuse)


def test_mnist_dir_read_only_never_written(tiny_mnist, monkeypatch, isolated_env, no_download):
    folder, arrays, _ = tiny_mnist
    for p in folder.iterdir():
        p.chmod(0o444)
    folder.chmod(0o555)
    try:
        before = snapshot(folder)
        monkeypatch.setenv("MNIST_DIR", str(folder))
        assert data.resolve_mnist_dir() == folder
        for split in ("train", "test"):
            _, y = data.load_mnist(split)
            np.testing.assert_array_equal(y, arrays[f"{split}-labels"])
        # A corrupt file there is reported, not "repaired" by a download.
        monkeypatch.setitem(data.MNIST_FILES["test-images"], "md5", "0" * 32)
        with pytest.raises(DataError, match="checksum mismatch") as exc:
            data.load_mnist("test")
        one_line_naming(exc.value, folder / "t10k-images-idx3-ubyte.gz")
        # Root (CI) ignores the permission bits, so compare contents and times
        # instead of relying on a PermissionError.
        assert snapshot(folder) == before
        assert not isolated_env.exists()
    finally:
        folder.chmod(0o755)


def test_mnist_dir_missing_file_names_folder_and_file(tiny_mnist, monkeypatch, no_download):
    folder, _, _ = tiny_mnist
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("MNIST_DIR", str(folder))
    with pytest.raises(DataError, match="lacks train-labels-idx1-ubyte.gz") as exc:
        data.load_mnist("train")
    msg = one_line_naming(exc.value, folder)
    assert "MNIST_DIR" in msg
    data.load_mnist("test")  # the other split is complete and still loads
    monkeypatch.setenv("MNIST_DIR", str(folder / "absent"))
    with pytest.raises(DataError, match="does not exist") as exc:
        data.resolve_mnist_dir()
    one_line_naming(exc.value, folder / "absent")
    # given explicitly (--mnist-dir): no internal argument name in the message
    with pytest.raises(DataError) as exc:
        data.resolve_mnist_dir(folder / "gone")
    assert str(exc.value) == f"{folder / 'gone'}: MNIST folder does not exist or is not a folder"


def test_explicit_dir_beats_env_beats_cache(tiny_mnist, monkeypatch, isolated_env, no_download):
    folder, _, _ = tiny_mnist
    monkeypatch.setenv("MNIST_DIR", str(folder / "absent"))
    assert data.resolve_mnist_dir(folder) == folder
    monkeypatch.setenv("MNIST_DIR", str(folder))
    assert data.resolve_mnist_dir() == folder
    monkeypatch.delenv("MNIST_DIR")
    with pytest.raises(DataError, match="MNIST cache lacks .*download=False") as exc:
        data.resolve_mnist_dir(download=False)
    one_line_naming(exc.value, isolated_env)


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PSCNN_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("PSCNN_CACHE_DIR")
    assert data.default_cache_dir() == tmp_path / "xdg" / "pscnn" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "pscnn" / "mnist"


def test_default_cache_dir_ignores_a_relative_xdg_cache_home(monkeypatch, tmp_path):
    """The XDG spec says a relative XDG_CACHE_HOME is invalid: honouring it would put the
    cache in a different folder depending on where the command runs."""
    monkeypatch.delenv("PSCNN_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "rel/cache")
    assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "pscnn" / "mnist"


def no_home(monkeypatch):
    """This process as a user with no HOME and no passwd entry (a container run with --user 54321)."""
    import pwd  # noqa: PLC0415

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)


def test_no_home_folder_is_one_line_naming_the_remedies(monkeypatch, isolated_env):
    """No HOME and no passwd entry: pathlib's "Could not determine home directory" (a RuntimeError,
    a traceback from every command that reads MNIST) is now a DataError naming MNIST_DIR and
    PSCNN_CACHE_DIR; and a folder given with ~ says which setting it came from."""
    monkeypatch.delenv("PSCNN_CACHE_DIR", raising=False)
    no_home(monkeypatch)
    with pytest.raises(DataError) as exc:
        data.resolve_mnist_dir(download=False)
    one_line_naming(exc.value, "~/.cache/pscnn/mnist", "MNIST_DIR", "PSCNN_CACHE_DIR")
    monkeypatch.setenv("MNIST_DIR", "~/mnist")
    with pytest.raises(DataError) as exc:
        data.resolve_mnist_dir()
    one_line_naming(exc.value, "MNIST folder (from MNIST_DIR) ~/mnist", "needs a home folder")
    monkeypatch.delenv("MNIST_DIR")
    monkeypatch.setenv("PSCNN_CACHE_DIR", "~/cache")
    with pytest.raises(DataError) as exc:
        data.download_mnist(progress=False)
    one_line_naming(exc.value, "PSCNN_CACHE_DIR ~/cache", "needs a home folder")


def test_a_failed_download_names_mnist_dir_as_the_way_out(monkeypatch, isolated_env):
    """Offline, `pscnn train` (run, worker, ...) ended with the mirrors' errors alone, and the user
    was not told that a copy of the files, named by MNIST_DIR, is what it needs instead."""
    monkeypatch.setattr(data.time, "sleep", lambda seconds: None)     # the retries' backoff
    with pytest.raises(DataError) as exc:
        data.resolve_mnist_dir(progress=False)
    one_line_naming(exc.value, "download failed from every mirror", "not-a-mirror", "set MNIST_DIR (or --mnist-dir)")


def test_pscnn_download_without_a_home_names_what_pscnn_download_takes(monkeypatch, isolated_env, capsys):
    """`pscnn download` with no home folder was told to set MNIST_DIR or --mnist-dir, which it does not
    read (and `pscnn download --mnist-dir` is refused): the remedies are its --dir and PSCNN_CACHE_DIR."""
    from pscnn.cli import main  # noqa: PLC0415
    monkeypatch.delenv("PSCNN_CACHE_DIR", raising=False)
    no_home(monkeypatch)
    assert main(["download", "--no-progress"]) == 1
    line = error_line(capsys.readouterr().err, "~/.cache/pscnn/mnist", "needs a home folder",
                      "pscnn download --dir", "PSCNN_CACHE_DIR", alone=True)
    assert "MNIST_DIR" not in line and "--mnist-dir" not in line, line


# --------------------------------------------------------------------------- #
# downloading from a local server
# --------------------------------------------------------------------------- #
def test_download_good_file(server, payload, tmp_path):
    gz, digest = payload
    server.route("/m/f.gz", (200, gz))
    dest = tmp_path / "dl" / "f.gz"  # the folder is created
    assert fetch(server.url("/m/f.gz"), dest, digest) == dest
    assert dest.read_bytes() == gz
    assert os.listdir(dest.parent) == ["f.gz"]  # no temp file left behind
    assert stat.S_IMODE(dest.stat().st_mode) & 0o044, "a cache file must not be private to its creator"


def test_download_raw_file_checks_raw_md5(server, tmp_path):
    raw = idx_bytes(IMAGES)
    server.route("/f", (200, raw))
    fetch([server.url("/f")], tmp_path / "f", md5(raw))
    assert (tmp_path / "f").read_bytes() == raw


def test_download_bad_checksum_leaves_nothing(server, payload, tmp_path):
    gz, _ = payload
    server.route("/f.gz", (200, gz))
    dest = tmp_path / "f.gz"
    with pytest.raises(DataError, match="checksum mismatch") as exc:
        fetch(server.url("/f.gz"), dest, "0" * 32, retries=3)
    msg = one_line_naming(exc.value, dest)
    assert server.url("/f.gz") in msg
    assert server.hits["/f.gz"] == 1, "a wrong checksum is not retried: the mirror serves other bytes"
    assert os.listdir(tmp_path) == []


def test_failed_download_keeps_existing_file(server, payload, tmp_path):
    gz, _ = payload
    server.route("/f.gz", (200, gz))
    dest = tmp_path / "f.gz"
    dest.write_bytes(b"previous content")
    with pytest.raises(DataError):
        fetch(server.url("/f.gz"), dest, "0" * 32)
    assert dest.read_bytes() == b"previous content"
    assert os.listdir(tmp_path) == ["f.gz"]


def test_download_404_then_second_mirror(server, payload, tmp_path):
    gz, digest = payload
    server.route("/good/f.gz", (200, gz))
    urls = [server.url("/missing/f.gz"), server.url("/good/f.gz")]
    fetch(urls, tmp_path / "f.gz", digest)
    assert (tmp_path / "f.gz").read_bytes() == gz
    assert server.hits == {"/missing/f.gz": 1, "/good/f.gz": 1}


def test_download_retries_transient_500(server, payload, tmp_path, caplog):
    gz, digest = payload
    server.route("/f.gz", (500, b"oops"), (200, gz))
    fetch(server.url("/f.gz"), tmp_path / "f.gz", digest, retries=2)
    assert server.hits["/f.gz"] == 2
    assert (tmp_path / "f.gz").read_bytes() == gz
    assert "HTTP 500" in caplog.text and "retrying" in caplog.text


@pytest.mark.parametrize("code", [429, 408])
def test_download_retries_rate_limit_and_request_timeout(server, payload, tmp_path, caplog, code):
    """429 (a throttled mirror, e.g. GCS) and 408 (a proxy) are momentary, like a 5xx."""
    gz, digest = payload
    server.route("/f.gz", (code, b"slow down"), (200, gz))
    fetch(server.url("/f.gz"), tmp_path / "f.gz", digest, retries=2)
    assert server.hits["/f.gz"] == 2
    assert (tmp_path / "f.gz").read_bytes() == gz
    assert f"HTTP {code}" in caplog.text and "retrying" in caplog.text


def test_download_backoff_doubles_up_to_a_cap(server, payload, tmp_path, monkeypatch):
    gz, digest = payload
    sleeps = []
    monkeypatch.setattr(data.time, "sleep", sleeps.append)
    server.route("/f.gz", (503, b"busy"), (503, b"busy"), (503, b"busy"), (200, gz))
    fetch(server.url("/f.gz"), tmp_path / "f.gz", digest, retries=3, backoff=1)
    assert sleeps == [1, 2, 4] and server.hits["/f.gz"] == 4
    sleeps.clear()
    server.route("/g.gz", (503, b"busy"), (503, b"busy"), (503, b"busy"), (200, gz))
    fetch(server.url("/g.gz"), tmp_path / "g.gz", digest, retries=3, backoff=8)
    assert sleeps == [8, 16, data._MAX_BACKOFF_S] == [8, 16, 30]


def test_download_retries_a_transfer_that_does_not_decompress(server, payload, tmp_path):
    # Half a .gz under a Content-Length that matches it: only decompressing shows the cut.
    gz, digest = payload
    server.route("/f.gz", (200, gz[:len(gz) // 2]), (200, gz))
    fetch(server.url("/f.gz"), tmp_path / "f.gz", digest, retries=1)
    assert server.hits["/f.gz"] == 2 and (tmp_path / "f.gz").read_bytes() == gz


def test_download_retries_cut_off_transfer(server, tmp_path):
    # Raw bytes: a cut-off gzip would also fail to decompress, but a cut-off
    # raw file is only caught by comparing with the Content-Length.
    raw = idx_bytes(IMAGES)
    server.route("/f", (200, raw[:30], len(raw)), (200, raw))
    fetch(server.url("/f"), tmp_path / "f", md5(raw), retries=1)
    assert server.hits["/f"] == 2
    assert os.listdir(tmp_path) == ["f"]
    server.route("/g", (200, raw[:30], len(raw)))
    with pytest.raises(DataError, match=f"transfer cut off after 30 of {len(raw)} bytes"):
        fetch(server.url("/g"), tmp_path / "g", md5(raw), retries=0)


def test_a_mirror_trickling_under_the_low_speed_limit_is_given_up(server, payload, tmp_path):
    # 200 bytes at 50 bytes/s: every read returns within the socket timeout, so
    # only the low-speed limit (1 KiB/s over `timeout` seconds) ends the attempt
    # before the mirror does; before it, the body ran its 4 s to a cut-off.
    body, digest = payload
    server.route("/slow.gz", (200, body[:200], len(body), 0.02))
    dest = tmp_path / "f.gz"
    with pytest.raises(DataError, match=r"transfer too slow: \d+ bytes in [\d.]+ s") as exc:
        fetch(server.url("/slow.gz"), dest, digest, retries=0, timeout=0.5)
    one_line_naming(exc.value, dest)
    assert os.listdir(tmp_path) == []
    # A slow mirror is a transient failure: the next round tries it again.
    server.route("/slow-then-fast.gz", (200, body[:200], len(body), 0.02), (200, body))
    fetch(server.url("/slow-then-fast.gz"), dest, digest, retries=1, timeout=0.5)
    assert server.hits["/slow-then-fast.gz"] == 2 and dest.read_bytes() == body


def test_download_removes_only_long_abandoned_temporaries(server, payload, tmp_path):
    # A downloader killed mid-transfer leaves its temporary file; the next
    # download of that file removes it once nobody has written it for an hour,
    # and leaves alone a recent one (another process may be downloading) and
    # other files' temporaries.
    body, digest = payload
    server.route("/f.gz", (200, body))
    abandoned, live = tmp_path / ".f.gz.4242.0a1b2c3d.part", tmp_path / ".f.gz.4343.0a1b2c3d.part"
    other = tmp_path / ".g.gz.4242.0a1b2c3d.part"
    for path in (abandoned, live, other):
        path.write_bytes(b"half a download")
    two_hours_ago = time.time() - 7200
    for path in (abandoned, other):
        os.utime(path, (two_hours_ago, two_hours_ago))
    fetch(server.url("/f.gz"), tmp_path / "f.gz", digest)
    assert sorted(os.listdir(tmp_path)) == sorted(["f.gz", live.name, other.name])


def test_download_gives_up_after_retries(server, payload, tmp_path):
    _, digest = payload
    server.route("/f.gz", (503, b"busy"))
    with socket.socket() as s:  # a port with nothing listening: connection refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/f.gz"
    dest = tmp_path / "f.gz"
    with pytest.raises(DataError, match="download failed from every mirror") as exc:
        fetch([server.url("/f.gz"), dead, server.url("/gone.gz")], dest, digest, retries=2)
    msg = one_line_naming(exc.value, dest)
    assert "HTTP 503" in msg and "HTTP 404" in msg and dead in msg
    assert server.hits["/f.gz"] == 3  # 1 + retries rounds
    assert server.hits["/gone.gz"] == 1  # a 404 is not retried
    assert os.listdir(tmp_path) == []


def test_download_hopeless_urls_are_not_retried(tmp_path, monkeypatch):
    sleeps = []
    monkeypatch.setattr(data.time, "sleep", sleeps.append)
    with pytest.raises(DataError) as exc:
        fetch(["nope://host/f.gz", (tmp_path / "absent.gz").as_uri(), "no-scheme/f.gz", "http://[::1/f.gz"],
              tmp_path / "f.gz", "0" * 32, retries=3)
    msg = one_line_naming(exc.value, tmp_path / "f.gz")
    assert "unknown url type" in msg and "file not found" in msg
    assert "ValueError: unknown url type: 'no-scheme/f.gz'" in msg and "ValueError: Invalid IPv6 URL" in msg
    assert sleeps == []


def test_download_from_file_url(tmp_path, payload):
    gz, digest = payload
    src = tmp_path / "mirror" / "f.gz"
    src.parent.mkdir()
    src.write_bytes(gz)
    fetch(src.parent.as_uri() + "/f.gz", tmp_path / "f.gz", digest)
    assert (tmp_path / "f.gz").read_bytes() == gz
    # an upper-case md5 is the same digest, and no backoff is a valid choice
    fetch(src.parent.as_uri() + "/f.gz", tmp_path / "g.gz", digest.upper(), backoff=0)
    assert (tmp_path / "g.gz").read_bytes() == gz


def test_a_local_mirror_file_without_read_permission_is_not_retried():
    failure = data._network_failure(urllib.error.URLError(PermissionError(13, "Permission denied")), 5)
    assert failure.reason == "Permission denied" and failure.transient is False


def test_a_mirrors_multi_line_reason_is_folded_into_one_line():
    error = urllib.error.HTTPError("http://127.0.0.1:1/x", 502, "Bad\r\n  Gateway", {}, None)
    assert data._network_failure(error, 5).reason == "HTTP 502 Bad Gateway"


def test_a_download_may_take_what_gzip_adds_to_incompressible_data():
    # 5 bytes per deflate block, allowed for blocks of 320 bytes (1/64), plus 64 KiB for gzip's header
    assert data._max_download(64_000) == 64_000 + 1_000 + 65_536


def test_concurrent_downloads_into_one_cache(server, payload, tmp_path):
    gz, digest = payload
    server.route("/f.gz", (200, gz))
    dest = tmp_path / "f.gz"
    errors = []

    def worker():
        try:
            fetch(server.url("/f.gz"), dest, digest)
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert dest.read_bytes() == gz
    assert os.listdir(tmp_path) == ["f.gz"]


def test_download_into_a_read_only_file_system_is_one_error(server, payload, tmp_path, monkeypatch):
    # On a read-only mount both creating the temp file and unlinking it (never
    # created) fail with EROFS; the cleanup's OSError escaped as a traceback.
    # Simulated, as tests cannot mount: the same two calls fail the same way.
    import errno
    gz, digest = payload
    server.route("/f.gz", (200, gz))
    real_open, real_unlink = os.open, Path.unlink

    def read_only(real):
        def call(path, *args, **kwargs):
            if str(path).endswith(".part"):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "open", read_only(real_open))
    monkeypatch.setattr(Path, "unlink", read_only(real_unlink))
    dest = tmp_path / "f.gz"
    with pytest.raises(DataError, match="cannot create temporary file: Read-only file system") as exc:
        fetch(server.url("/f.gz"), dest, digest)
    one_line_naming(exc.value, tmp_path)
    assert server.hits["/f.gz"] == 0


def test_download_onto_a_directory_is_one_error(mnist_mirror, tmp_path):
    # A directory where a file belongs in the cache: os.replace's
    # IsADirectoryError escaped `pscnn download` as a traceback.
    server, _ = mnist_mirror
    cache = tmp_path / "c"
    blocker = cache / data.MNIST_FILES["test-labels"]["filename"]
    (blocker / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="cannot put the download in place: Is a directory") as exc:
        data.download_mnist(cache, mirrors=server.url("/mnist/"), progress=False, files=["test-labels"])
    one_line_naming(exc.value, blocker)
    assert os.listdir(cache) == [blocker.name] and os.listdir(blocker) == ["sub"]  # no temp file left


def _gzip_bomb() -> bytes:
    """64 KiB of gzip, 64 MiB of zeros."""
    import zlib
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    return b"".join(bomb.compress(bytes(1 << 20)) for _ in range(64)) + bomb.flush()


@pytest.mark.parametrize("body, declared, message", [
    # an endless body filled the disk before the md5 could say it was wrong; a
    # Content-Length beyond any encoding of the file is as bad
    (lambda: bytes(16 << 20), True, r"larger than the file can be \(\d+ bytes\)"),
    (lambda: bytes(16 << 20), False, r"larger than the file can be \(\d+ bytes\)"),
    # within what a download may take, but its md5 was taken over everything it
    # decompressed to (a 47 MB bomb: 48 GB)
    (_gzip_bomb, True, r"downloaded data too large \(.*decompresses to more than the 13 bytes"),
], ids=["too-long", "too-long-undeclared", "gzip-bomb"])
def test_a_mirror_sending_more_than_the_file_can_be_is_cut_off_and_dropped(mnist_mirror, tmp_path, body,
                                                                           declared, message):
    server, _ = mnist_mirror
    name = data.MNIST_FILES["test-labels"]["filename"]
    server.route(f"/mnist/{name}", (200, body()) if declared else (200, body(), None))
    cache = tmp_path / "c"
    with pytest.raises(DataError, match=message) as exc:
        data.download_mnist(cache, mirrors=server.url("/mnist/"), progress=False, files=["test-labels"],
                            retries=1, backoff=0.01)
    one_line_naming(exc.value, cache / name)
    assert server.hits[f"/mnist/{name}"] == 1, "such a mirror is not asked again"
    assert os.listdir(cache) == []


def test_download_file_validates_arguments(tmp_path):
    with pytest.raises(ConfigError, match="md5 must be 32 hex digits"):
        fetch("http://127.0.0.1:1/x", tmp_path / "x", "abc")
    with pytest.raises(ConfigError, match="urls"):
        fetch([], tmp_path / "x", "0" * 32)
    with pytest.raises(ConfigError, match="retries must be >= 0"):
        fetch("http://127.0.0.1:1/x", tmp_path / "x", "0" * 32, retries=-1)
    with pytest.raises(ConfigError, match="md5 must be 32 hex digits, got 'ggg"):
        fetch("http://127.0.0.1:1/x", tmp_path / "x", "g" * 32)
    for urls in (["http://127.0.0.1:1/x", ""], [None]):
        with pytest.raises(ConfigError, match="urls must be a non-empty URL or sequence of URLs"):
            fetch(urls, tmp_path / "x", "0" * 32)
    with pytest.raises(ConfigError, match="timeout must be > 0 seconds, got 0"):
        fetch("http://127.0.0.1:1/x", tmp_path / "x", "0" * 32, timeout=0)
    assert os.listdir(tmp_path) == []


@pytest.fixture
def mnist_mirror(server, tiny_mnist):
    """The tiny files served under /mnist/ by the local server."""
    folder, arrays, _ = tiny_mnist
    for info in data.MNIST_FILES.values():
        server.route(f"/mnist/{info['filename']}", (200, (folder / info["filename"]).read_bytes()))
    return server, arrays


def test_load_mnist_downloads_into_cache_and_repairs(mnist_mirror, monkeypatch, isolated_env):
    server, arrays = mnist_mirror
    monkeypatch.setenv("PSCNN_MNIST_MIRRORS", " , " + server.url("/mnist"))  # blanks skipped, '/' added
    x, y = data.load_mnist("test", download=True)
    np.testing.assert_array_equal(y, arrays["test-labels"])
    assert sorted(os.listdir(isolated_env)) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert server.hits["/mnist/t10k-images-idx3-ubyte.gz"] == 1
    assert server.hits["/mnist/train-images-idx3-ubyte.gz"] == 0  # only the split asked for

    data.load_mnist("test")  # cached: no new request
    assert server.hits["/mnist/t10k-images-idx3-ubyte.gz"] == 1

    (isolated_env / "t10k-labels-idx1-ubyte.gz").write_bytes(b"corrupted")
    _, y = data.load_mnist("test")  # a bad cache file is fetched again
    np.testing.assert_array_equal(y, arrays["test-labels"])
    assert server.hits["/mnist/t10k-labels-idx1-ubyte.gz"] == 2

    (isolated_env / "t10k-labels-idx1-ubyte.gz").write_bytes(b"corrupted")
    with pytest.raises(DataError, match="not an IDX file"):  # but not when downloads are off
        data.load_mnist("test", download=False)


def test_download_mnist_fetches_only_missing_or_bad(mnist_mirror, tmp_path):
    server, _ = mnist_mirror
    cache = tmp_path / "c"
    mirror = server.url("/mnist/")
    assert data.download_mnist(cache, mirrors=mirror, progress=False) == cache
    assert sorted(os.listdir(cache)) == sorted(i["filename"] for i in data.MNIST_FILES.values())
    assert all(server.hits[f"/mnist/{i['filename']}"] == 1 for i in data.MNIST_FILES.values())

    (cache / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"not the images"))
    data.download_mnist(cache, mirrors=[server.url("/absent/"), mirror], progress=False)
    assert server.hits["/mnist/train-images-idx3-ubyte.gz"] == 2
    assert server.hits["/mnist/train-labels-idx1-ubyte.gz"] == 1  # good files are kept
    data.read_idx(cache / "train-images-idx3-ubyte.gz", data.MNIST_FILES["train-images"]["md5"])


def test_download_mnist_removes_abandoned_temporaries_of_files_it_keeps(mnist_mirror, tmp_path):
    # Only a download of the file removed them: a downloader killed within the hour before
    # another one finished left its temporary file (9 MB for the training images) for good.
    server, _ = mnist_mirror
    cache = data.download_mnist(tmp_path / "c", mirrors=server.url("/mnist/"), progress=False)
    abandoned = cache / ".train-images-idx3-ubyte.gz.4242.0a1b2c3d.part"
    live = cache / ".t10k-images-idx3-ubyte.gz.4343.0a1b2c3d.part"      # another process may be writing it
    for path in (abandoned, live):
        path.write_bytes(b"half a download")
    two_hours_ago = time.time() - 7200
    os.utime(abandoned, (two_hours_ago, two_hours_ago))
    data.download_mnist(cache, mirrors=server.url("/mnist/"), progress=False)
    assert all(n == 1 for n in server.hits.values())        # nothing fetched again
    assert not abandoned.exists() and live.exists()


def test_download_mnist_keeps_good_decompressed_files(mnist_mirror, tiny_mnist, tmp_path):
    # A folder of the decompressed files (which load_mnist reads) had all four fetched again as .gz:
    # `pscnn download` failed offline on a folder that trains fine.
    server, _ = mnist_mirror
    _, _, raw = tiny_mnist
    folder = tmp_path / "raw"
    folder.mkdir()
    for name, info in data.MNIST_FILES.items():
        (folder / info["filename"].removesuffix(".gz")).write_bytes(raw[name])
    assert data.download_mnist(folder, mirrors=server.url("/mnist/"), progress=False) == folder
    assert sum(server.hits.values()) == 0 and not list(folder.glob("*.gz"))
    # A corrupt one is still replaced: by the .gz, which load_mnist then reads first.
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"corrupted")
    data.download_mnist(folder, mirrors=server.url("/mnist/"), progress=False)
    assert dict(server.hits) == {"/mnist/t10k-labels-idx1-ubyte.gz": 1}
    assert data.load_mnist("test", folder, download=False)[1].shape == (data.MNIST_FILES["test-labels"]["count"],)


def test_pscnn_download_fills_the_cache_and_prints_it(mnist_mirror, monkeypatch, isolated_env, tmp_path, capsys):
    from pscnn.cli import main
    server, arrays = mnist_mirror
    monkeypatch.setenv("PSCNN_MNIST_MIRRORS", server.url("/mnist"))
    monkeypatch.setenv("MNIST_DIR", str(tmp_path / "elsewhere"))       # not consulted
    assert main(["download", "--no-progress"]) == 0
    assert capsys.readouterr().out == f"{isolated_env}\n"          # one line: the folder, for MNIST_DIR
    assert sorted(os.listdir(isolated_env)) == sorted(i["filename"] for i in data.MNIST_FILES.values())
    monkeypatch.setenv("MNIST_DIR", str(isolated_env))
    np.testing.assert_array_equal(data.load_mnist("train", download=False)[1], arrays["train-labels"])

    assert main(["download", "--no-progress"]) == 0                   # verified, nothing fetched again
    assert all(n == 1 for n in server.hits.values()) and capsys.readouterr().out == f"{isolated_env}\n"

    folder = tmp_path / "chosen"
    assert main(["download", "--dir", str(folder), "--no-progress"]) == 0
    assert capsys.readouterr().out == f"{folder}\n" and len(os.listdir(folder)) == 4


def test_pscnn_download_prints_an_absolute_folder(mnist_mirror, monkeypatch, tmp_path, capsys):
    # It printed "--dir mnist" back as "mnist": MNIST_DIR=$(pscnn download --dir mnist) then named
    # nothing from any other folder (a Compose file, a test run from elsewhere).
    from pscnn.cli import main
    server, _ = mnist_mirror
    monkeypatch.setenv("PSCNN_MNIST_MIRRORS", server.url("/mnist"))
    monkeypatch.chdir(tmp_path)
    assert main(["download", "--dir", "mnist", "--no-progress"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'mnist'}\n"
    monkeypatch.setenv("PSCNN_CACHE_DIR", "mnist")
    assert main(["download", "--no-progress"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'mnist'}\n"


def test_pscnn_download_names_a_mirror_variable_without_a_url(monkeypatch, tmp_path, capsys):
    # It said "mirrors must be one or more base URLs, got []": no word of the variable that was wrong.
    from pscnn.cli import main
    monkeypatch.setenv("PSCNN_MNIST_MIRRORS", " , ")
    assert main(["download", "--dir", str(tmp_path / "d"), "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == \
        "pscnn: error: PSCNN_MNIST_MIRRORS=' , ' names no mirror: set it to comma-separated base URLs, or unset it"
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("command", ["train", "run"])
def test_no_progress_turns_off_the_download_bar_too(command, monkeypatch, tmp_path, capsys):
    # --no-progress ("no progress bar") left the bars of the MNIST download before training on a terminal.
    from pscnn.cli import main
    asked = []

    def record(urls, dest, digest, *args, progress=True, **kwargs):
        asked.append(progress)
        raise DataError(f"{dest}: offline")
    monkeypatch.setattr(data, "download_file", record)
    assert main([command, "--no-progress", "--out", str(tmp_path / "run")]) == 1
    assert asked == [False] and "offline" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_pscnn_download_failure_is_one_line(monkeypatch, tmp_path, capsys):
    from pscnn.cli import main
    monkeypatch.setenv("PSCNN_MNIST_MIRRORS", "http://127.0.0.1:1/closed/")
    monkeypatch.setattr(data, "download_file", functools.partial(data.download_file, retries=0, backoff=0.01))
    assert main(["download", "--dir", str(tmp_path / "d"), "--no-progress"]) == 1
    err = capsys.readouterr()
    assert err.out == ""
    lines = err.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pscnn: error:") and "train-images-idx3-ubyte.gz" in lines[0]


def test_pscnn_download_into_a_closed_pipe_prints_no_traceback(mnist_dir):
    # `pscnn download | true`, `pscnn status | head -1`: a BrokenPipeError traceback
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "pscnn.cli", "download", "--dir", mnist_dir, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()                 # the reader is gone before the folder is printed
    try:
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_pscnn_download_into_a_file_says_it_is_one(tmp_path, capsys):
    # it said "cannot create download folder: File exists"
    from pscnn.cli import main
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main(["download", "--dir", str(a_file), "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == f"pscnn: error: {a_file}: is a file, not a folder to download into"


@pytest.mark.parametrize("target", ["absent/folder", "link"], ids=["dangling", "loop"])
def test_pscnn_download_into_a_broken_link_says_it_is_one(target, tmp_path, capsys):
    # it said "is a file, not a folder to download into"
    from pscnn.cli import main
    link = tmp_path / "link"
    link.symlink_to(tmp_path / target)
    assert main(["download", "--dir", str(link), "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == (f"pscnn: error: {link}: is a broken symbolic link (its target is "
                                               f"missing, or a loop), not a folder to download into")


# --------------------------------------------------------------------------- #
# shuffling and batching
# --------------------------------------------------------------------------- #
def test_epoch_permutation_is_a_seeded_pure_function():
    p = data.epoch_permutation(1000, seed=7, epoch=3)
    assert p.dtype == np.int64 and np.array_equal(np.sort(p), np.arange(1000))
    np.testing.assert_array_equal(p, data.epoch_permutation(1000, 7, 3))
    # The documented contract the parameter server relies on:
    np.testing.assert_array_equal(p, np.random.default_rng([7, 3]).permutation(1000))
    assert not np.array_equal(p, data.epoch_permutation(1000, 7, 4))
    assert not np.array_equal(p, data.epoch_permutation(1000, 8, 3))
    assert data.epoch_permutation(0, 0, 0).shape == (0,)
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        data.epoch_permutation(10, -1, 0)


@pytest.mark.parametrize("n, bs", [(0, 4), (1, 4), (10, 3), (12, 4), (7, 100), (60000, 128)])
def test_batch_index_covers_every_index_once(n, bs):
    batches = data.batch_index(n, bs, seed=1, epoch=2)
    assert len(batches) == -(-n // bs)
    assert all(len(b) == bs for b in batches[:-1])
    everything = np.concatenate(batches) if batches else np.empty(0, dtype=np.int64)
    np.testing.assert_array_equal(everything, data.epoch_permutation(n, 1, 2))
    assert np.array_equal(np.sort(everything), np.arange(n))

    dropped = data.batch_index(n, bs, seed=1, epoch=2, drop_last=True)
    assert len(dropped) == n // bs and all(len(b) == bs for b in dropped)
    assert [b.tolist() for b in dropped] == [b.tolist() for b in batches[: n // bs]]


def test_batch_index_validates_batch_size():
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ConfigError, match="batch_size"):
            data.batch_index(10, bad, 0, 0)


def test_iterate_batches_keeps_rows_aligned():
    n = 23
    y = np.arange(n)
    x = (y * 10).reshape(n, 1).astype(np.float32)
    seen = []
    for xb, yb in data.iterate_batches(x, y, 5, seed=3, epoch=1):
        np.testing.assert_array_equal(xb[:, 0], yb * 10)
        seen.extend(yb.tolist())
    assert seen == data.epoch_permutation(n, 3, 1).tolist()

    ordered = list(data.iterate_batches(x, y, 5, shuffle=False, drop_last=True))
    assert [yb.tolist() for _, yb in ordered] == [list(range(i, i + 5)) for i in range(0, 20, 5)]
    assert np.shares_memory(ordered[0][0], x), "unshuffled batches are views"


def test_iterate_batches_validates_eagerly():
    # Errors surface at the call, not at the first next() of a generator.
    with pytest.raises(ShapeError, match="differ in length: 3 vs 2"):
        data.iterate_batches(np.zeros(3), np.zeros(2), 1)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        data.iterate_batches(np.zeros(3), np.zeros(3), 0)


@pytest.mark.parametrize("n, bs", [(10, 4), (12, 4), (1, 64), (60_000, 64)])
def test_batch_length_is_each_batchs_size(n, bs):
    sizes = [len(b) for b in data.batch_index(n, bs, seed=0, epoch=0)]
    assert [data.batch_length(n, bs, i) for i in range(len(sizes))] == sizes
    assert data.batch_length(n, bs, len(sizes)) == 0              # past the end: no samples
    assert data.batches_per_epoch(n, bs) == len(sizes)


@pytest.mark.parametrize("train_limit, size", [(0, 60_000), (1, 1), (60_000, 60_000), (60_001, 60_000)])
def test_the_training_set_size_is_the_limit_up_to_mnists_count(train_limit, size):
    """What a server plans its epochs on before it reads the data: a limit beyond MNIST's count (a
    ServerConfig not made by the CLI, which caps it) is all of it, not batches of images that do not exist."""
    assert data.training_set_size(train_limit) == size
