"""im2col / col2im for channels-last (NHWC) tensors.

pscnn keeps activations channels-last inside the network: the im2col matrix of
an NHWC tensor has the channel axis contiguous, and the convolution's output
``cols @ W`` is already NHWC, with no transpose on the way in or out (the
layout torch calls ``channels_last``).

Everything is vectorized over samples and pixels: each column matrix is one
strided copy (row-major for layers with many input channels, patch-major for
layers with few), and col2im's only Python loop is over the ``kh*kw`` kernel
offsets (9 for a 3x3 kernel), each iteration adding a whole strided slab.
They work unchanged on NumPy and CuPy arrays.
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module, openblas_core


# OpenBLAS's SkylakeX kernels (what numpy's wheels run on AVX-512 CPUs, AMD's
# included) multiply without packing their operands when M*N*K is at most this;
# above it they pack both, which for a thin product costs more than the arithmetic.
# Measured on an AMD EPYC, one thread: conv1's (25088, 10) @ (10, 32) at 7-15 ns a
# row in blocks of 3125 rows (M*N*K = 1e6) against 36-50 ns in blocks of 3126 or
# more.  Its Haswell kernels (AVX2 CPUs) have no such path: there the blocks made
# the seed model's step 2-3% slower, so they are used on SkylakeX only.
UNPACKED_GEMM_MAX_MNK = 1_000_000
UNPACKED_GEMM_CORES = ("SkylakeX",)


def _blocks_pay(xp) -> bool:
    """Whether splitting a product into blocks within UNPACKED_GEMM_MAX_MNK pays here:
    NumPy on OpenBLAS's SkylakeX kernels (a GPU would pay a launch per block)."""
    return xp is np and openblas_core() in UNPACKED_GEMM_CORES


def matmul_row_blocks(a, b):
    """``a @ b`` for a tall (M, K) ``a``: one batched matmul over blocks of rows
    that each stay within UNPACKED_GEMM_MAX_MNK, the rows left over in one more.

    The same sums per row as ``a @ b``, though the unpacked kernel may round them
    differently (bit for bit on the AMD build machine); plain ``a @ b`` where the
    blocks do not pay (:func:`_blocks_pay`).
    """
    xp = get_array_module(a)
    m, k = a.shape
    n = b.shape[1]
    rows = UNPACKED_GEMM_MAX_MNK // max(k * n, 1)
    if rows < 1 or m <= rows or not _blocks_pay(xp):
        return a @ b
    b = xp.ascontiguousarray(b)                # a transposed view (a dense layer's dout.T) made the blocks 0.9x
    out = xp.empty((m, n), dtype=xp.result_type(a, b))
    head = m - m % rows
    xp.matmul(a[:head].reshape(head // rows, rows, k), b, out=out[:head].reshape(head // rows, rows, n))
    if head < m:
        xp.matmul(a[head:], b, out=out[head:])
    return out


def matmul_inner_blocks(a, b):
    """``a @ b`` for a short, wide (M, K) ``a`` and a tall (K, N) ``b``: the sum of
    products over blocks of K that each stay within UNPACKED_GEMM_MAX_MNK, taken
    MAX_SUMMED_BLOCKS blocks at a time.

    The sum runs in another order than ``a @ b``'s (float rounding apart, the
    same); plain ``a @ b`` where the blocks do not pay (:func:`_blocks_pay`).
    """
    xp = get_array_module(a)
    m, k = a.shape
    n = b.shape[1]
    step = UNPACKED_GEMM_MAX_MNK // max(m * n, 1)
    if step < 1 or k <= step or not _blocks_pay(xp):
        return a @ b
    head = k - k % step
    blocks = head // step
    out = None
    # A batched matmul per MAX_SUMMED_BLOCKS blocks rather than the plain product
    # once there are more: a first layer of 1024-2048 channels ran 2.5-3.5x faster
    # in blocks, and its partial products stay within 16 times the output.
    for first in range(0, blocks, MAX_SUMMED_BLOCKS):
        count = min(MAX_SUMMED_BLOCKS, blocks - first)
        rows = slice(first * step, (first + count) * step)
        part = xp.matmul(a[:, rows].reshape(m, count, step).transpose(1, 0, 2),
                         b[rows].reshape(count, step, n)).sum(axis=0)
        if out is None:
            out = part
        else:
            out += part
    if head < k:
        out += a[:, head:] @ b[head:]
    return out


# The width of the column blocks of :func:`matmul_column_blocks`, and the most
# blocks of K it and :func:`matmul_transposed_blocks` sum (and
# :func:`matmul_inner_blocks` sums at a time): the partial products take that many
# times the output's memory (a conv2d of 1024 output channels on a 28x28 input
# would have summed 837 in its weight gradient, 1 GB of partials for a 1.2 MB
# output, 9x slower than whole; a first layer of 2048 channels 261 in its weight
# gradient, 21 MB of partials for an 82 KB output).  For the seed model's fc1, (32, 3136) @
# (3136, 128), in isolation on the AMD build machine: 1.27x the whole product in 7
# blocks of 448 rows and 64 columns, 1.18-1.21x with 16 or 32 columns.
COLUMN_BLOCK_COLUMNS = 64
MAX_SUMMED_BLOCKS = 16


def matmul_column_blocks(a, b):
    """``a @ b`` for a short (M, K) ``a`` and a (K, N) ``b`` (a dense layer's
    forward), in blocks of K and COLUMN_BLOCK_COLUMNS columns of ``b``, each
    within UNPACKED_GEMM_MAX_MNK (:func:`_summed_k_blocks`).

    For fc1's chunk of 32 the blocks are 448 rows, OpenBLAS's own K blocking on
    SkylakeX, and the logits came out bit for bit.
    """
    width = COLUMN_BLOCK_COLUMNS
    return _summed_k_blocks(a, b, width, UNPACKED_GEMM_MAX_MNK // max(a.shape[0] * width, 1))


def _summed_k_blocks(a, b, width: int, most: int):
    """``a @ b`` for an (M, K) ``a`` (a transposed view too) and a (K, N) ``b``:
    one batched matmul over near-equal blocks of at most ``most`` rows of K and
    ``width`` columns of ``b``, then summed over K; the rows of K left over in
    one more product.

    The sum runs in another order than ``a @ b``'s (float rounding apart, the
    same).  Plain ``a @ b`` where the blocks do not pay (:func:`_blocks_pay`), N
    is not a multiple of ``width``, or K takes one block or more than
    MAX_SUMMED_BLOCKS.
    """
    xp = get_array_module(a)
    m, k = a.shape
    n = b.shape[1]
    blocks = -(-k // most) if most else 0
    if not 1 < blocks <= MAX_SUMMED_BLOCKS or n % width or not _blocks_pay(xp):
        return a @ b
    step = k // blocks                         # near-equal blocks: fewer than `blocks` rows left over
    head = blocks * step
    parts = xp.matmul(a[:, :head].reshape(m, blocks, step).transpose(1, 0, 2),
                      b[:head].reshape(blocks, step, n // width, width).transpose(2, 0, 1, 3))   # (N/width, blocks, M, width)
    out = parts.sum(axis=1).transpose(1, 0, 2).reshape(m, n)
    if head < k:
        out += a[:, head:] @ b[head:]
    return out


# The width of the column blocks of :func:`matmul_transposed_blocks`: the unpacked
# kernel then reads each row of a block as one 64-byte cache line (16 float32).
# For the seed model's conv2 weight gradient, (6272, 64).T @ (6272, 288), in
# isolation on the AMD build machine: 1.16-1.25x the whole product in blocks of 16
# columns and 224-448 rows, 1.06-1.08x in blocks of 16 columns and 784-896 rows
# (the full bound), 0.87-0.93x in blocks of 32 columns.
TRANSPOSED_BLOCK_COLUMNS = 16


def matmul_transposed_blocks(a, b):
    """``a.T @ b`` for a tall (K, M) ``a`` and a (K, N) ``b``, in blocks of K
    rows and TRANSPOSED_BLOCK_COLUMNS columns of ``b``, each within half of
    UNPACKED_GEMM_MAX_MNK (see there; :func:`_summed_k_blocks`, whose blocks of
    ``a.T`` are views of ``a``'s rows).
    """
    width = TRANSPOSED_BLOCK_COLUMNS
    return _summed_k_blocks(a.T, b, width, UNPACKED_GEMM_MAX_MNK // 2 // max(a.shape[1] * width, 1))


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial output length of a convolution/pooling along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


def pad_nhwc(x, ph: int, pw: int):
    """Zero-pad H and W of ``x`` (N,H,W,C) -> (N,H+2ph,W+2pw,C).

    Writing into a preallocated zero array is ~2x faster than ``np.pad``.
    """
    if ph == 0 and pw == 0:
        return x
    xp = get_array_module(x)
    n, h, w, c = x.shape
    out = xp.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=x.dtype)
    out[:, ph:ph + h, pw:pw + w, :] = x
    return out


def patch_view(x_padded, kh: int, kw: int, sh: int, sw: int):
    """Every kernel window of a padded NHWC tensor, as a zero-copy strided view.

    x_padded: (N, Hp, Wp, C)  ->  (N, Ho, Wo, kh, kw, C).
    """
    xp = get_array_module(x_padded)
    x_padded = xp.ascontiguousarray(x_padded)
    n, hp, wp, c = x_padded.shape
    ho = (hp - kh) // sh + 1
    wo = (wp - kw) // sw + 1
    s_n, s_h, s_w, s_c = x_padded.strides
    return xp.lib.stride_tricks.as_strided(
        x_padded, shape=(n, ho, wo, kh, kw, c), strides=(s_n, s_h * sh, s_w * sw, s_h, s_w, s_c))


def im2col(x_padded, kh: int, kw: int, sh: int, sw: int, pool_windows=(1, 1)):
    """Patches of an already padded NHWC tensor as rows of a matrix.

    x_padded: (N, Hp, Wp, C)  ->  cols: (N*Ho*Wo, kh*kw*C), columns ordered
    (kernel row, kernel column, channel), matching ``W.transpose(2,3,1,0)``
    of a (out, in, kh, kw) weight.

    Rows are ordered (n, ho, wo); with ``pool_windows=(gh, gw)`` they are
    window-major instead, as in :func:`im2col_t_with_ones`, so ``cols @ W``
    is gh*gw contiguous blocks for the max pool that follows.  The copy is
    the same either way: runs of kw*C contiguous floats.

    One reshape copies the strided windows out in a single pass (about 3x
    faster than copying one kernel offset at a time).
    """
    windows = patch_view(x_padded, kh, kw, sh, sw)
    n, ho, wo, _, _, c = windows.shape
    gh, gw = pool_windows
    if (gh, gw) != (1, 1):
        windows = windows.reshape(n, ho // gh, gh, wo // gw, gw, kh, kw, c).transpose(2, 4, 0, 1, 3, 5, 6, 7)
    return windows.reshape(n * ho * wo, kh * kw * c)


def im2col_t_with_ones(x_padded, kh: int, kw: int, sh: int, sw: int, pool_windows=(1, 1)):
    """Patch-major column matrix of a padded NHWC tensor, plus a row of ones.

    x_padded: (N, Hp, Wp, C)  ->  cols_t: (kh*kw*C + 1, N*Ho*Wo), rows ordered
    (kernel row, kernel column, channel) like :func:`im2col`'s columns, then a
    final row of ones, so ``cols_t.T @ vstack([wmat, bias])`` adds the bias
    inside the GEMM and ``cols_t @ dout2d`` yields the bias gradient as its
    last row.

    Output positions are ordered (n, ho, wo); with ``pool_windows=(gh, gw)``
    (gh divides Ho, gw divides Wo) they are ordered window-major instead,
    (a, b, n, ho', wo') with ho = gh*ho' + a and wo = gw*wo' + b: the GEMM's
    output is then gh*gw contiguous blocks, one per position in a gh x gw
    pooling window, which a following max pool reduces with contiguous passes.

    For a layer with few input channels (a grayscale or RGB input layer) the
    transposed copy writes long rows: measured 7x faster than :func:`im2col`
    (0.17 vs 1.25 ms for the seed model's conv1 at batch 64), whose copy runs
    only C floats at a time; and folding the bias saves an add and a
    reduction over the (N*Ho*Wo, O) output.  It is one copy (one kernel on a
    GPU).
    """
    xp = get_array_module(x_padded)
    windows = patch_view(x_padded, kh, kw, sh, sw)
    n, ho, wo, _, _, c = windows.shape
    gh, gw = pool_windows
    windows = windows.reshape(n, ho // gh, gh, wo // gw, gw, kh, kw, c)
    cols_t = xp.empty((kh * kw * c + 1, n * ho * wo), dtype=x_padded.dtype)
    cols_t[:-1].reshape(kh, kw, c, gh, gw, n, ho // gh, wo // gw)[...] = windows.transpose(5, 6, 7, 2, 4, 0, 1, 3)
    cols_t[-1] = 1
    return cols_t


def col2im(dcols, padded_shape, kh: int, kw: int, sh: int, sw: int):
    """Adjoint of :func:`im2col`: scatter-add column gradients back to pixels.

    dcols: (N*Ho*Wo, kh*kw*C)  ->  dx_padded: ``padded_shape`` = (N, Hp, Wp, C).
    Overlapping windows (stride < kernel) accumulate, as the chain rule needs.
    """
    xp = get_array_module(dcols)
    n, hp, wp, c = padded_shape
    ho = (hp - kh) // sh + 1
    wo = (wp - kw) // sw + 1
    d6 = dcols.reshape(n, ho, wo, kh, kw, c)
    dx = xp.zeros(padded_shape, dtype=dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            dx[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] += d6[:, :, :, i, j, :]
    return dx


def col2im_gemm(dout2d, wmat, padded_shape, kh: int, kw: int, sh: int, sw: int):
    """``col2im(dout2d @ wmat.T, ...)`` without materializing the column matrix.

    dout2d: (N*Ho*Wo, O), wmat: (kh*kw*C, O)  ->  dx_padded: ``padded_shape``.

    One small GEMM per kernel offset yields a contiguous (N, Ho, Wo, C) slab
    that is added into ``dx`` with long contiguous runs; the single big GEMM
    + :func:`col2im` instead scatters rows 32 floats at a time from a
    ``kh*kw`` times larger matrix, which is memory-bound and measured slower.
    """
    xp = get_array_module(dout2d)
    n, hp, wp, c = padded_shape
    ho = (hp - kh) // sh + 1
    wo = (wp - kw) // sw + 1
    w_blocks = wmat.reshape(kh, kw, c, -1)
    dx = xp.zeros(padded_shape, dtype=dout2d.dtype)
    for i in range(kh):
        for j in range(kw):
            slab = (dout2d @ w_blocks[i, j].T).reshape(n, ho, wo, c)
            dx[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] += slab
    return dx


def input_grad_matrix(weight):
    """weight: (O, C, kh, kw) -> the (kw*O, kh*C) matrix :func:`conv_input_grad` multiplies by:
    ``wmat[(k, o), (i, c)] = weight[o, c, i, kw-1-k]``."""
    o, c, kh, kw = weight.shape
    return weight[:, :, :, ::-1].transpose(3, 0, 2, 1).reshape(kw * o, kh * c)


def conv_input_grad(dout, weight, in_hw, padding, pool_windows=None, wmat=None):
    """Input gradient of a stride-1 convolution: one GEMM and kh row-shifted adds.

    dout: (N, Ho, Wo, O), or window-major (gh*gw, N, Ho/gh, Wo/gw, O) when
    ``pool_windows=(gh, gw)``; weight: (O, C, kh, kw); in_hw: (H, W);
    padding: (ph, pw); wmat: ``input_grad_matrix(weight)`` when the caller
    holds it already  ->  dx: (N, H, W, C), contiguous.

    With stride 1, ``dx[n,y,x,c] = sum_{i,j,o} dout[n, y+ph-i, x+pw-j, o] *
    weight[o,c,i,j]``.  The sums over j and o, for every kernel row i at once,
    are one GEMM over width-windows of dout (zero-padded by kw-1 columns on
    each side): (N*Ho*W, kw*O) @ (kw*O, kh*C).  The sum over i then adds kh
    slabs shifted by whole rows, each a run of W*C contiguous floats per row.
    For the seed model's conv2 this is ~20% faster in isolation than
    :func:`col2im_gemm`, whose nine K=64 GEMMs each add a slab shifted by a
    row and a column.
    """
    xp = get_array_module(dout)
    o, c, kh, kw = weight.shape
    h, w = in_hw
    ph, pw = padding
    if pool_windows is None:
        n, ho, wo = dout.shape[:3]
    else:
        gh, gw = pool_windows
        n, ho, wo = dout.shape[1], dout.shape[2] * gh, dout.shape[3] * gw
    padded = xp.empty((n, ho, wo + 2 * (kw - 1), o), dtype=dout.dtype)     # dout, kw-1 zero columns each side
    padded[:, :, :kw - 1] = 0
    padded[:, :, kw - 1 + wo:] = 0
    inner = padded[:, :, kw - 1:kw - 1 + wo]
    if pool_windows is None:
        inner[...] = dout
    else:                                      # back from window-major in the same copy
        for a in range(gh):
            for b in range(gw):
                inner[:, a::gh, b::gw] = dout[a * gw + b]
    # windows[n, yo, x, k] = padded[n, yo, pw + x + k] = dout[n, yo, x + pw - (kw-1-k)]
    s_n, s_h, s_w, s_c = padded.strides
    windows = xp.lib.stride_tricks.as_strided(padded[:, :, pw:], shape=(n, ho, w, kw, o),
                                              strides=(s_n, s_h, s_w, s_w, s_c))
    if wmat is None:
        wmat = input_grad_matrix(weight)
    rows = matmul_row_blocks(windows.reshape(n * ho * w, kw * o), wmat).reshape(n, ho, w, kh, c)
    # dx[:, y] = sum_i rows[:, y + ph - i, :, i], for the y where that row exists
    first = next((i for i in range(kh) if i <= ph and ho + i - ph >= h), None)    # covers every y
    if first is None:
        dx = xp.zeros((n, h, w, c), dtype=dout.dtype)
    else:
        dx = rows[:, ph - first:ph - first + h, :, first].copy()
    for i in range(kh):
        y0, y1 = max(0, i - ph), min(h, ho + i - ph)
        if i != first and y0 < y1:
            dx[:, y0:y1] += rows[:, y0 + ph - i:y1 + ph - i, :, i]
    return dx
