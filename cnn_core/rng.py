"""Counter-based random numbers for dropout masks: a pure function of (key, counter).

A pscnn trainer reseeds its model's dropout before every batch (from the run
seed, the epoch and the batch; see ``Model.reseed``).  A stateful generator
makes that expensive on a GPU: a new CuPy ``Generator`` initializes its
cuRAND states on the device every time (32,768 XORWOW states by default, in
CuPy's source; ``benchmarks/gpu_check.py`` times both).  Here reseeding is
setting two integers, and a draw is a few elementwise integer passes that run
unchanged on NumPy and CuPy, so CPU and GPU draw *identical* masks.

The numbers are SplitMix64 (Steele, Lea and Flood, "Fast splittable
pseudorandom number generators", OOPSLA 2014; the generator behind Java's
``SplittableRandom``): element ``i`` of draw ``counter`` under ``key`` is
``mix(start + (i + 1) * GOLDEN)``, where ``start`` is itself a mix of the key
and the counter, and ``mix`` is SplitMix64's output function.  Two draws
overlap only if their starts lie within a draw's length of each other along
the GOLDEN sequence: about one chance in 2**64 / length.
"""
from __future__ import annotations

import math

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15          # 2**64 / golden ratio, odd: i * GOLDEN visits every value
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_MASK = (1 << 64) - 1


def mix64(z: int) -> int:
    """SplitMix64's output function on one Python int (a bijection of 64-bit values)."""
    z &= _MASK
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK
    return z ^ (z >> 31)


# On the CPU a draw runs in chunks that stay in L2 cache across its dozen passes:
# 5.8 against 13.7 ms for 1.6M values in one piece (NumPy's own Generator: 3.9).
# On a GPU it is one piece: each pass is one kernel launch.
CPU_CHUNK = 1 << 15


def uniform(xp, key: int, counter: int, shape, dtype=np.float32, offset: int = 0):
    """Floats in [0, 1) of ``shape``, a pure function of ``(key, counter)``.

    ``xp``: numpy or cupy (where the array is made); ``key``, ``counter``:
    non-negative ints.  float32 values are multiples of 2**-24, float64 of
    2**-53, so every one is exact and strictly below 1.

    ``offset``: where in the draw's element sequence to start.  Elements
    ``offset .. offset + prod(shape) - 1`` of a larger draw are the same values
    as that draw's slice, so any part of a draw can be drawn alone.
    """
    dtype = np.dtype(dtype)
    bits = 24 if dtype == np.float32 else 53
    start = mix64(mix64(key) ^ mix64(counter + GOLDEN))
    n = math.prod(shape)
    out = xp.empty(n, dtype=dtype)
    chunk = max(1, min(n, CPU_CHUNK if xp is np else n))
    steps = xp.arange(1, chunk + 1, dtype=xp.uint64)        # uint64 products wrap modulo 2**64, as SplitMix64's do
    steps *= xp.uint64(GOLDEN)
    z, tmp = xp.empty(chunk, dtype=xp.uint64), xp.empty(chunk, dtype=xp.uint64)
    for lo in range(0, n, chunk):
        k = min(chunk, n - lo)
        zk, tk = z[:k], tmp[:k]
        xp.add(steps[:k], xp.uint64((start + (offset + lo) * GOLDEN) & _MASK), out=zk)    # the SplitMix64 states
        for shift, factor in ((30, _MIX1), (27, _MIX2)):
            xp.right_shift(zk, xp.uint64(shift), out=tk)     # uint64 shifts: no promotion to int64
            zk ^= tk
            zk *= xp.uint64(factor)
        xp.right_shift(zk, xp.uint64(31), out=tk)
        zk ^= tk
        xp.right_shift(zk, xp.uint64(64 - bits), out=tk)       # the top bits, as the float's mantissa
        part = out[lo:lo + k]
        part[...] = tk
        part *= dtype.type(2.0 ** -bits)
    return out.reshape(shape)
