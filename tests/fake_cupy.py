"""A stand-in for CuPy that runs on NumPy but refuses what real CuPy refuses.

The GPU path (``device="gpu"``) runs only where a CUDA device is lent, so a
NumPy-only call slipped into the shared engine code would otherwise go unseen
until then.  Installed as ``sys.modules["cupy"]`` (:func:`install`), this module
makes ``cnn_core.backend`` take it for CuPy with a usable device, and its arrays
(:class:`DeviceArray`, which wraps an ndarray) behave as CuPy's do where the two
libraries differ:

* a host ndarray mixed into a device computation (``dev + host``, a ufunc's
  argument or ``out=``, ``dev[...] = host``) is a TypeError, as in CuPy;
* implicit conversion to the host (``np.asarray(dev)``, ``np.array(dev)``) is a
  TypeError: ``.get()`` (``cnn_core.backend.to_numpy``) is the way, as in CuPy;
* the ndarray methods and the numpy functions CuPy lacks are AttributeErrors
  (the lists were taken from CuPy 14.2's ``dir()``), and ``a @= b`` rebinds
  instead of writing in place, since ``cupy.ndarray`` has no ``__imatmul__``;
* iterating over a device array is refused: CuPy allows it, at a device-to-host
  copy per element, which the engine never wants.

It also counts the host-to-device and device-to-host copies and the
synchronizing reads of a device value (``float()``, ``int()``, ``bool()``,
``.item()``), so tests can pin how often a training step pays for them.

Run as a script, it runs pytest with the fake installed: ``python
tests/fake_cupy.py -m gpu tests/`` runs the GPU tests here, so that they are
known to work (as tests) before a GPU is lent to run them.
"""
from __future__ import annotations

import sys
import types

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

# From CuPy 14.2: sorted(set(dir(numpy.ndarray)) - set(dir(cupy.ndarray))), and the same for the modules
# (the names NumPy has and CuPy lacks; private ones left out).
NDARRAY_ONLY = frozenset({
    "__array_interface__", "__array_struct__", "__array_wrap__", "ctypes", "getfield", "resize",
    "setfield", "setflags", "to_device"})
MODULE_ONLY = frozenset({
    "False_", "ScalarType", "True_", "asmatrix", "block", "bmat", "busday_count", "busday_offset",
    "busdaycalendar", "bytes_", "char", "character", "clongdouble", "complex256", "core", "ctypeslib",
    "datetime64", "datetime_as_string", "datetime_data", "dtypes", "einsum_path", "emath", "errstate", "f2py",
    "flexible", "float128", "frompyfunc", "fromregex", "geomspace", "get_include", "getbufsize", "geterr",
    "geterrcall", "histogram_bin_edges", "info", "insert", "is_busday", "isnat", "little_endian", "longdouble",
    "ma", "matrix", "matvec", "memmap", "nanpercentile", "nanquantile", "ndenumerate", "nditer", "nested_iters",
    "object_", "polyder", "polydiv", "polyint", "rec", "recarray", "record", "sctypeDict", "setbufsize", "seterr",
    "seterrcall", "show_runtime", "spacing", "str_", "strings", "test", "timedelta64", "typecodes", "unstack",
    "vecdot", "vecmat", "void"})

# What crossed between host and device, reset by install().
counts = {"h2d": 0, "d2h": 0, "sync_reads": 0}


def _mixed(what: str) -> TypeError:
    return TypeError(f"fake cupy: {what} mixes a host numpy.ndarray with device arrays; CuPy refuses it "
                     "(move it with cupy.asarray first)")


def _unwrap(value, what: str):
    """DeviceArray -> its ndarray, recursively through lists, tuples and dicts; a host ndarray is refused."""
    if isinstance(value, DeviceArray):
        return value._a
    if isinstance(value, np.ndarray):
        raise _mixed(what)
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v, what) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v, what) for k, v in value.items()}
    return value


def _wrap(value):
    """ndarray results -> DeviceArray (recursively through tuples and lists); a NumPy scalar (a
    reduction's result) -> a 0-d DeviceArray, as CuPy keeps it on the device; anything else as it is."""
    if isinstance(value, np.ndarray):
        return DeviceArray(value)
    if isinstance(value, np.generic):
        return DeviceArray(np.asarray(value))
    if isinstance(value, (list, tuple)):
        return type(value)(_wrap(v) for v in value)
    return value


def _call(fn, what: str):
    def call(*args, **kwargs):
        out = kwargs.get("out")
        result = fn(*_unwrap(args, what), **_unwrap(kwargs, what))
        return out if out is not None else _wrap(result)
    return call


class DeviceArray(NDArrayOperatorsMixin):
    """An array "on the device": an ndarray that CuPy's rules guard (see the module docs)."""

    __slots__ = ("_a",)

    def __init__(self, array: np.ndarray):
        self._a = array

    def __imatmul__(self, other):
        return NotImplemented       # cupy.ndarray has no __imatmul__: `a @= b` is `a = a @ b` there

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        what = f"numpy.{ufunc.__name__}" + ("" if method == "__call__" else f".{method}")
        out = kwargs.get("out")
        result = getattr(ufunc, method)(*_unwrap(inputs, what), **_unwrap(kwargs, what))
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        if func.__name__ in MODULE_ONLY or not hasattr(np, func.__name__):
            raise TypeError(f"fake cupy: CuPy has no {func.__name__}")
        return _call(func, f"numpy.{func.__name__}")(*args, **kwargs)

    def get(self) -> np.ndarray:
        counts["d2h"] += 1
        return self._a.copy()

    def _read(self, convert):
        counts["sync_reads"] += 1
        return convert(self._a)

    def __float__(self):
        return self._read(float)

    def __int__(self):
        return self._read(int)

    def __bool__(self):
        return self._read(bool)

    def item(self):
        return self._read(lambda a: a.item())

    def tolist(self):
        counts["d2h"] += 1
        return self._a.tolist()

    def __iter__(self):
        raise TypeError("fake cupy: iterating over a device array copies each element to the host")

    def __len__(self):
        return len(self._a)

    def __getitem__(self, key):
        if isinstance(key, np.ndarray) or isinstance(key, tuple) and any(isinstance(k, np.ndarray) for k in key):
            counts["h2d"] += 1          # CuPy copies a host index array over, then indexes
            return DeviceArray(self._a[key])
        return DeviceArray(self._a[_unwrap(key, "an index")])

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray) and value.ndim:
            raise _mixed("assigning into a device array")   # cupy: "non-scalar numpy.ndarray cannot be used for fill"
        self._a[_unwrap(key, "an index")] = _unwrap(value, "assigning into a device array")

    def __getattr__(self, name):
        if name in NDARRAY_ONLY:
            raise AttributeError(f"fake cupy: cupy.ndarray has no attribute {name!r}")
        attr = getattr(self._a, name)
        return _call(attr, f"ndarray.{name}") if callable(attr) else _wrap(attr)

    def __repr__(self):
        return f"DeviceArray({self._a!r})"

    def __deepcopy__(self, memo):
        return DeviceArray(self._a.copy())


DeviceArray.__module__ = "cupy"        # cnn_core.backend.get_array_module keys on the type's module


def asarray(a, dtype=None, order=None):
    if isinstance(a, DeviceArray):
        return a if dtype is None or a.dtype == np.dtype(dtype) else a.astype(dtype)
    counts["h2d"] += 1
    return DeviceArray(np.array(a, dtype=dtype, order=order or "K", copy=True))


array = asarray


class _Ufunc:
    """A numpy ufunc over device arrays, with its methods (reduce, at, ...)."""

    def __init__(self, ufunc):
        self._ufunc = ufunc

    def __call__(self, *args, **kwargs):
        return _call(self._ufunc, f"cupy.{self._ufunc.__name__}")(*args, **kwargs)

    def __getattr__(self, name):
        attr = getattr(self._ufunc, name)
        return _call(attr, f"cupy.{self._ufunc.__name__}.{name}") if callable(attr) else attr


class _Device:
    id = 0

    def synchronize(self):
        counts["sync_reads"] += 1


def _module_getattr(name: str):
    if name in MODULE_ONLY or name.startswith("__"):
        raise AttributeError(f"fake cupy: module 'cupy' has no attribute {name!r}")
    attr = getattr(np, name)
    if isinstance(attr, np.ufunc):
        return _Ufunc(attr)
    if isinstance(attr, type) or not callable(attr):
        return attr                     # dtypes (cupy.float32 is numpy.float32), constants
    return _call(attr, f"cupy.{name}")


def _as_strided(x, shape=None, strides=None):
    return DeviceArray(np.lib.stride_tricks.as_strided(_unwrap(x, "as_strided"), shape=shape, strides=strides))


def make_module() -> types.ModuleType:
    """A fresh ``cupy`` module object backed by this file's arrays."""
    mod = types.ModuleType("cupy")
    mod.__version__ = "0.0-fake"
    mod.__getattr__ = _module_getattr
    mod.is_available = lambda: True
    mod.ndarray = DeviceArray
    mod.asarray = asarray
    mod.array = array
    mod.asnumpy = lambda a: a.get() if isinstance(a, DeviceArray) else np.asarray(a)
    mod.lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(as_strided=_as_strided))
    mod.cuda = types.SimpleNamespace(Device=_Device, runtime=types.SimpleNamespace(
        getDeviceProperties=lambda device: {"name": b"fake device"}))
    return mod


def install(monkeypatch) -> types.ModuleType:
    """Make ``import cupy`` give the fake (for the test's duration, via ``monkeypatch``); counts reset."""
    for key in counts:
        counts[key] = 0
    mod = make_module()
    monkeypatch.setitem(sys.modules, "cupy", mod)
    return mod


def host(value) -> np.ndarray:
    """A DeviceArray's values as a host ndarray, without counting a transfer (for assertions)."""
    return value._a if isinstance(value, DeviceArray) else np.asarray(value)


if __name__ == "__main__":
    import pytest
    sys.modules["cupy"] = make_module()
    sys.exit(pytest.main(sys.argv[1:]))
