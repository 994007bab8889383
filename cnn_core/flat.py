"""Named arrays laid back to back in one flat buffer.

The parameter server's hot path is one push and one reply per training step,
each carrying the whole model.  Kept as one contiguous buffer, the model
travels as one ZeroMQ frame, is validated with one reduction, and is updated by
the optimizer in one pass over memory instead of one per parameter.

:class:`FlatArrays` is a dict ``name -> view`` (so everything that takes a
dict of arrays takes it) that also knows the buffer behind the views::

    fa = FlatArrays.pack({"w": np.ones((2, 3)), "b": np.zeros(3)})
    fa.flat          # (9,) the buffer; fa["w"] is fa.flat[:6].reshape(2, 3)
    fa.specs         # (("w", (2, 3)), ("b", (3,))): hashable, cheap to compare

Writing into a view writes the buffer and back.  The set of names is fixed:
assigning or deleting a key raises, because a replaced array would no longer
be part of the buffer.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .errors import ShapeError


def _offsets(specs) -> list[int]:
    offsets, n = [], 0
    for _, shape in specs:
        offsets.append(n)
        n += math.prod(shape)
    offsets.append(n)
    return offsets


# specs -> (normalized specs, offsets).  A server sees the same few layouts on
# every message; normalizing them each time cost more than the rest of a view.
# Bounded: a peer cycling through made-up layouts must not pin the server's
# memory (each may hold 256 long names), nor crowd out the real ones for good.
_LAYOUTS: dict = {}
_LAYOUTS_MAX = 64


def _layout(specs) -> tuple[tuple, list[int]]:
    try:
        hit = _LAYOUTS.get(specs)
    except TypeError:                   # unhashable (lists inside): normalize, don't cache
        hit, specs = None, tuple(specs)
    if hit is None:
        norm = tuple((str(name), tuple(int(d) for d in shape)) for name, shape in specs)
        hit = (norm, _offsets(norm))
        if len(_LAYOUTS) >= _LAYOUTS_MAX:     # start over: the layouts in use come back at once
            _LAYOUTS.clear()
        _LAYOUTS[norm] = hit
    return hit


class FlatArrays(dict):
    """dict name -> view of one 1-d buffer ``flat``, in ``specs`` order.

    Parameters
    ----------
    specs : sequence of (name, shape); names unique.
    flat : 1-d array (NumPy or CuPy) of exactly ``sum(prod(shape))`` elements;
        the views share its memory and dtype.
    """

    __slots__ = ("flat", "specs")

    def __init__(self, specs, flat):
        specs, offsets = _layout(specs)
        if flat.ndim != 1 or flat.shape[0] != offsets[-1]:
            raise ShapeError(f"FlatArrays: a buffer of shape {tuple(flat.shape)} cannot hold "
                             f"{len(specs)} arrays of {offsets[-1]} elements in all")
        views = {name: flat[offsets[i]:offsets[i + 1]].reshape(shape) for i, (name, shape) in enumerate(specs)}
        if len(views) != len(specs):
            raise ShapeError("FlatArrays: duplicate array names")
        super().__init__(views)
        self.flat = flat
        self.specs = specs

    # ------------------------------------------------------------------ constructors
    @classmethod
    def zeros(cls, specs, dtype, xp=np) -> "FlatArrays":
        """Zero-filled arrays of ``specs`` in a new buffer of ``dtype`` (module ``xp``)."""
        specs, offsets = _layout(specs)
        return cls(specs, xp.zeros(offsets[-1], dtype=dtype))

    @classmethod
    def pack(cls, arrays, dtype=None) -> "FlatArrays":
        """Copy ``arrays`` (name -> array, one array module) into a new buffer, in their order.

        ``dtype`` defaults to the first array's; every array must have that
        dtype (a ShapeError names the first that differs).
        """
        specs = tuple((name, tuple(arr.shape)) for name, arr in arrays.items())
        if not specs:
            return cls((), np.empty(0, dtype=dtype or np.float32))
        first = next(iter(arrays.values()))
        xp = backend.get_array_module(first)
        dtype = np.dtype(dtype or first.dtype)
        out = cls(specs, xp.empty(_layout(specs)[1][-1], dtype=dtype))
        for name, arr in arrays.items():
            if arr.dtype != dtype:
                raise ShapeError(f"FlatArrays.pack: {name!r} has dtype {arr.dtype}, expected {dtype}")
            out[name][...] = arr
        return out

    def copy(self) -> "FlatArrays":
        """The same names and shapes over a copy of the buffer."""
        return FlatArrays(self.specs, self.flat.copy())

    # ------------------------------------------------------------------ a fixed set of names
    def _fixed(self, *_args, **_kwargs):
        raise TypeError("FlatArrays: the names are fixed; write into the arrays instead "
                        "(fa[name][...] = value)")

    __delitem__ = pop = popitem = setdefault = update = clear = __ior__ = _fixed   # |= is update, bypassing __setitem__

    def __setitem__(self, name, value):
        # ``fa[name] *= 2`` updates the view in place, then stores the same object back.
        if dict.get(self, name) is not value:
            self._fixed()

    def __reduce__(self):       # copy.deepcopy: rebuild the views over a copied buffer
        return (FlatArrays, (self.specs, self.flat))

    def __repr__(self) -> str:
        return f"FlatArrays({len(self.specs)} arrays, {self.flat.size:,} x {self.flat.dtype})"


def all_finite(flat) -> bool:
    """No NaN or Inf in the 1-d array ``flat`` (NumPy or CuPy).

    One reduction instead of ``isfinite`` per element (a parameter server's
    check of every push and every update, ``pscnn train``'s of every update):
    a NaN or Inf makes the sum of squares non-finite; so can overflow, and then
    the exact check decides.
    """
    xp = backend.get_array_module(flat)
    with np.errstate(over="ignore", invalid="ignore"):
        square_sum = xp.dot(flat, flat)
    return bool(xp.isfinite(square_sum)) or bool(xp.isfinite(flat).all())


def same_layout(a, b) -> bool:
    """True when ``a`` and ``b`` are both FlatArrays with equal specs and dtype."""
    return (isinstance(a, FlatArrays) and isinstance(b, FlatArrays) and a.specs == b.specs
            and a.flat.dtype == b.flat.dtype)
