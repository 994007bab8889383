"""Array-module selection: NumPy on the CPU, CuPy on a GPU, one code path.

Layers never import numpy or cupy directly for computation; they ask
:func:`get_array_module` for the module that owns their arrays, so the same
forward/backward code runs on both.  The module is chosen once, when a model
is built (``device="cpu"`` or ``"gpu"``).
"""
from __future__ import annotations

import functools

import numpy as np

from .errors import ConfigError

_DTYPES = {"float32": np.float32, "float64": np.float64}


# pyproject.toml's extras: the CuPy wheel each installs, and the CUDA major version its driver must support.
GPU_EXTRAS = (("gpu", "cupy-cuda12x", 12), ("gpu-cuda13", "cupy-cuda13x", 13))


def _cupy_or_reason():
    """(the cupy module, None) when a CUDA device is usable, else (None, why not, in words).

    ``import cupy`` succeeds on machines without a GPU, so availability is
    checked with ``cupy.is_available()`` as well.
    """
    try:
        import cupy  # noqa: PLC0415  (optional dependency)
    except Exception as exc:  # noqa: BLE001  (ImportError, or anything from a broken CUDA install)
        if isinstance(exc, ImportError) and exc.name == "cupy":
            return None, f"CuPy is not installed: install {_extras_advice()}"
        return None, f"CuPy fails to import ({type(exc).__name__}: {exc})"
    try:
        if cupy.is_available():
            return cupy, None
    except Exception:  # noqa: BLE001  (the device query below says why)
        pass
    return None, _no_device_reason(cupy)


def _extras_advice() -> str:
    """Which extra to install for which driver, in words."""
    return " or ".join(f"pscnn's {extra} extra ({wheel}) for a CUDA {major} driver"
                       for extra, wheel, major in GPU_EXTRAS)


def _no_device_reason(cupy) -> str:
    """Why an importable CuPy has no usable device: the CUDA error, and the driver against the wheel."""
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        error = "no CUDA device found" if count == 0 else "its CUDA devices are not usable"
    except Exception as exc:  # noqa: BLE001  (CUDARuntimeError, or a CUDA library missing)
        error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    reason = f"CuPy finds no usable CUDA device ({error})"
    try:
        driver = int(cupy.cuda.runtime.driverGetVersion())     # 12040 is CUDA 12.4; 0: no driver
    except Exception:  # noqa: BLE001
        driver = None
    if driver == 0:
        return f"{reason}: no NVIDIA driver is loaded"
    supports = driver // 1000 if driver else None
    too_new = [(wheel, major) for _, wheel, major in GPU_EXTRAS
               if supports is not None and supports < major and _installed(wheel)]
    if too_new:             # the commonest failure: a cupy-cuda13x wheel on a CUDA 12 driver
        wheel, major = too_new[0]
        fits = [(extra, fit) for extra, fit, fit_major in GPU_EXTRAS if fit_major <= supports]
        advice = f"install pscnn's {fits[-1][0]} extra ({fits[-1][1]}) in its place" if fits else "update the driver"
        return (f"{reason}: {wheel} needs a CUDA {major} driver, and this one supports CUDA "
                f"{supports}.{driver % 1000 // 10}; {advice}")
    return f"{reason}; {_extras_advice()}"


def _installed(distribution: str) -> bool:
    """Whether the Python distribution (a CuPy wheel) is installed."""
    from importlib import metadata  # noqa: PLC0415
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def cupy_module():
    """Return the cupy module when a CUDA device is usable, else ``None``."""
    return _cupy_or_reason()[0]


def gpu_available() -> bool:
    return cupy_module() is not None


def array_module(device: str):
    """The array module for ``device`` ("cpu" or "gpu"); an error saying why there is no GPU."""
    if device == "cpu":
        return np
    if device == "gpu":
        cp, reason = _cupy_or_reason()
        if cp is None:
            raise ConfigError(f"device 'gpu' requested but {reason}")
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


@functools.cache
def openblas_core() -> str | None:
    """The kernel family numpy's OpenBLAS chose for this CPU ("SkylakeX", "Haswell", ...), as
    threadpoolctl reports it; None when numpy's BLAS is not OpenBLAS or threadpoolctl is not
    installed (optional: the `fast` extra, and the test extra, bring it).

    OpenBLAS picks its kernels at load (or as ``OPENBLAS_CORETYPE`` says); only
    some of them have the small-matrix paths ``cnn_core.im2col`` shapes its
    products for.
    """
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415
    except ImportError:
        return None
    found = [info for info in threadpool_info() if info.get("internal_api") == "openblas" and info.get("architecture")]
    # numpy's own first (numpy.libs/ in its wheels): another package may bring an OpenBLAS of its own
    found.sort(key=lambda info: "numpy" not in str(info.get("filepath", "")))
    return str(found[0]["architecture"]) if found else None


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
