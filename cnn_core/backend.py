"""Array-module selection: NumPy on the CPU, CuPy on a GPU, one code path.

Layers never import numpy or cupy directly for computation; they ask
:func:`get_array_module` for the module that owns their arrays, so the same
forward/backward code runs on both.  The module is chosen once, when a model
is built (``device="cpu"`` or ``"gpu"``).
"""
from __future__ import annotations

import numpy as np

from .errors import ConfigError

_DTYPES = {"float32": np.float32, "float64": np.float64}


def cupy_module():
    """Return the cupy module when a CUDA device is usable, else ``None``.

    ``import cupy`` succeeds on machines without a GPU, so availability is
    checked with ``cupy.is_available()`` as well.
    """
    try:
        import cupy  # noqa: PLC0415  (optional dependency)
    except Exception:  # ImportError, or a broken CUDA install
        return None
    try:
        return cupy if cupy.is_available() else None
    except Exception:
        return None


def gpu_available() -> bool:
    return cupy_module() is not None


def array_module(device: str):
    """The array module for ``device`` ("cpu" or "gpu"); clear error if no GPU."""
    if device == "cpu":
        return np
    if device == "gpu":
        cp = cupy_module()
        if cp is None:
            raise ConfigError("device 'gpu' requested but CuPy with a usable CUDA device is not available")
        return cp
    raise ConfigError(f"unknown device {device!r}: expected 'cpu' or 'gpu'")


def get_array_module(arr):
    """numpy or cupy, whichever owns ``arr`` (numpy for anything else)."""
    mod = type(arr).__module__
    if mod.startswith("cupy"):
        import cupy  # noqa: PLC0415
        return cupy
    return np


def resolve_dtype(dtype) -> np.dtype:
    """``"float32"``/``"float64"`` (or the numpy types) -> ``np.dtype``."""
    try:                                 # np.dtype(None) is float64: not a choice anyone made
        key = dtype if isinstance(dtype, str) else np.dtype(dtype).name if dtype is not None else None
    except TypeError:
        key = None
    if key not in _DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}: expected 'float32' or 'float64'")
    return np.dtype(_DTYPES[key])


def to_numpy(arr) -> np.ndarray:
    """A NumPy copy/view of ``arr`` (moves CuPy arrays to the host)."""
    if isinstance(arr, np.ndarray):
        return arr
    get = getattr(arr, "get", None)
    return get() if get is not None else np.asarray(arr)


def tune_host_allocator() -> bool:
    """Keep freed large buffers in the process heap (glibc only); True if applied.

    A training step allocates and frees tens of MB of activations, im2col
    matrices and gradients.  By default glibc serves each large block with a
    fresh mmap, so every step pays a page fault per 4 KiB touched (6,600 per
    step for the seed model at batch 64): ~30% of the step on a loaded
    machine, no measurable difference on a quiet one.  Raising the mmap
    threshold to its maximum (32 MiB) and the trim threshold keeps those pages
    mapped and reused.  Called by pscnn's entry points, not at import, since it
    changes the behaviour of the whole process.
    """
    import ctypes  # noqa: PLC0415
    import sys  # noqa: PLC0415
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:                 # musl or another libc: leave it alone
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) == 1
    ok &= libc.mallopt(m_trim_threshold, 1 << 30) == 1
    return bool(ok)
