"""The network's layers, each with a hand-derived forward and backward.

Conventions (CS231n style, so the caller owns all per-step memory):

* ``forward(x, train) -> (out, cache)``; ``backward(dout, cache, need_dx)
  -> (dx, grads)``.  ``grads`` has the same keys as ``parameters``; a layer
  never updates its own parameters (optimizers do that, on the parameter
  server in a distributed run).
* ``parameters`` holds trained arrays (``"weight"``, ``"bias"``), ``state``
  holds non-trained ones (BatchNorm running statistics).  The model exposes
  both under dotted names (``"conv1.weight"``) as the *same* array objects, so
  updating them in place changes the layer.
* Image tensors are channels-last, (N, H, W, C), inside the network (see
  ``im2col.py`` for why); weights keep the usual (out, in, kh, kw) layout so
  conv weights compare directly with other frameworks (dense weights are
  (in, out): PyTorch's ``Linear.weight`` transposed).  :class:`Model` converts
  its (N, C, H, W) input once, and :class:`Flatten` emits (C, H, W) order.
* ``build(in_shape, xp, dtype, rng)`` infers shapes (``in_shape`` excludes the
  batch axis) and He-initializes parameters; it returns the output shape.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import get_array_module as _xp
from .config import is_integer, number_in
from .errors import ShapeError, SpecError
from .im2col import (col2im_gemm, conv_input_grad, conv_output_size, im2col, im2col_t_with_ones, input_grad_matrix,
                     matmul_column_blocks, matmul_inner_blocks, matmul_row_blocks, matmul_transposed_blocks, pad_nhwc)
from .rng import uniform

# A conv layer with at most this many input channels (grayscale or RGB input)
# builds patch-major columns: see im2col_t_with_ones.
PATCH_MAJOR_MAX_CHANNELS = 3


def column_sums(a):
    """(M, K) -> (K,): sums over rows as a GEMV, 5x faster than ``a.sum(axis=0)``
    on a tall (50176, 32) float32 gradient (0.31 vs 1.57 ms), where numpy's
    pairwise reduction walks the short rows one at a time."""
    return _xp(a).ones(a.shape[0], dtype=a.dtype) @ a


# numpy's maximum runs its SIMD loop only when both operands are contiguous
# arrays; against the scalar 0 it takes an element-by-element loop, several
# times slower.  So relu_values compares with rows of this many zeros.
ZERO_ROW = 8192
_ZERO_ROWS: dict = {}


def relu_values(x, out=None):
    """``maximum(x, 0)`` into ``out`` (a new array if None; ``x`` itself is
    fine), bit for bit as numpy gives it (NaN kept, -0.0 -> 0.0).

    On NumPy a contiguous ``x`` is compared with a read-only row of ZERO_ROW
    zeros, broadcast over rows of that length (see ZERO_ROW).
    """
    xp = _xp(x)
    if xp is not np or not x.flags.c_contiguous:
        return xp.maximum(x, 0, out=out)
    zeros = _ZERO_ROWS.get(x.dtype)
    if zeros is None:
        zeros = _ZERO_ROWS[x.dtype] = np.zeros(ZERO_ROW, dtype=x.dtype)
        zeros.flags.writeable = False
    if out is None:
        out = np.empty_like(x)
    flat, out_flat = x.reshape(-1), out.reshape(-1)
    head = flat.size - flat.size % ZERO_ROW
    np.maximum(flat[:head].reshape(-1, ZERO_ROW), zeros, out=out_flat[:head].reshape(-1, ZERO_ROW))
    np.maximum(flat[head:], zeros[:flat.size - head], out=out_flat[head:])
    return out


def _pair(value, what: str) -> tuple[int, int]:
    """An int or a 2-sequence of ints -> (a, b), with a clear error otherwise."""
    if is_integer(value):
        return int(value), int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(is_integer(v) for v in value):
        return int(value[0]), int(value[1])
    raise SpecError(f"{what} must be an int or a pair of ints, got {value!r}")


def shape_of(value) -> str:
    """An array's shape, or what the value is when it is not an array (for messages)."""
    shape = getattr(value, "shape", None)
    return str(tuple(shape)) if shape is not None else f"a {type(value).__name__}"


class Layer:
    """Base class: a layer without parameters or state."""

    type_name = "layer"
    # True for a layer whose output for one sample depends on the other samples
    # of the batch (BatchNorm's batch statistics): Model.loss_and_grads then
    # runs the batch whole instead of in chunks.
    couples_samples = False

    def __init__(self, name: str | None = None):
        self.name = name or self.type_name
        self.parameters: dict = {}
        self.state: dict = {}
        self.in_shape: tuple | None = None
        self.out_shape: tuple | None = None

    def build(self, in_shape: tuple, xp, dtype, rng) -> tuple:
        self.in_shape = tuple(in_shape)
        self.out_shape = self._infer(self.in_shape)
        self._init(xp, dtype, rng)
        return self.out_shape

    def _infer(self, in_shape: tuple) -> tuple:
        return in_shape

    def plan(self, in_shape: tuple) -> tuple[tuple, int]:
        """(output shape, parameter count) for ``in_shape``, allocating nothing.

        The model sizes every layer this way first, so that an absurd spec is
        refused before the memory for it is requested.
        """
        return self._infer(tuple(in_shape)), 0

    def bind_parameter(self, key: str, array) -> None:
        """Make ``array`` (same shape and dtype) the storage of parameter ``key``.

        The model moves every parameter into one flat buffer after building
        (cnn_core.flat) and hands each layer its view.
        """
        self.parameters[key] = array

    def _init(self, xp, dtype, rng) -> None:
        """Create parameters/state; ``rng`` is a NumPy Generator (init runs on the host)."""

    def state_problem(self, key: str, value) -> str | None:
        """What makes ``value`` (a host array) unusable as ``self.state[key]``, or None.

        Checked when a checkpoint is loaded and when a trainer pushes its state to
        the parameter server (server/store.py), beside the shape and finiteness
        checks every array gets there: a hand-edited file may hold anything.
        """
        return None

    def reseed(self, rng) -> None:
        """Restart this layer's own random stream (dropout masks) from the NumPy Generator ``rng``.

        Layers without randomness ignore it; see :meth:`cnn_core.model.Model.reseed`.
        """

    def config(self) -> dict:
        """Hyper-parameters that, with ``type`` and ``name``, rebuild this layer."""
        return {}

    def spec(self) -> dict:
        return {"type": self.type_name, "name": self.name, **self.config()}

    def forward(self, x, train: bool = True):
        raise NotImplementedError

    def backward(self, dout, cache, need_dx: bool = True):
        raise NotImplementedError

    # The checks below compare shapes only (no pass over the values), so they
    # cost nothing next to the layer's own work; a wrong layout (NCHW for
    # NHWC) or channel count otherwise failed deep inside NumPy, or broadcast.
    def _check_input(self, x) -> None:
        """ShapeError unless ``x`` is (N, *in_shape): a batch of what the layer was built for."""
        if getattr(x, "shape", ())[1:] != self.in_shape:
            self._refuse_shape("input", ("N", *self.in_shape) if self.in_shape is not None else None, x)

    def _check_dout(self, dout, shape: tuple) -> None:
        """ShapeError unless ``dout`` has ``shape``, that of the forward pass's output."""
        if getattr(dout, "shape", None) != shape:
            self._refuse_shape("dout", shape, dout)

    def _refuse_unbuilt(self) -> None:
        raise ShapeError(f"{self.type_name} {self.name}: not built; call build(in_shape, xp, dtype, rng) first")

    def _refuse_shape(self, what: str, expected, got) -> None:
        if expected is None:
            self._refuse_unbuilt()
        layout = ", ".join(map(str, expected))
        hint = " (channels-last: N, H, W, C)" if len(expected) == 4 else ""
        raise ShapeError(f"{self.type_name} {self.name}: {what} must have shape ({layout}), got {shape_of(got)}"
                         f"{hint}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}: {self.in_shape} -> {self.out_shape})"


def _he_normal(rng, shape, fan_in: int, xp, dtype):
    """He (Kaiming) normal init, std = sqrt(2 / fan_in), drawn on the host."""
    w = rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)
    return xp.asarray(w.astype(dtype))


# --------------------------------------------------------------------------- conv / dense

class Conv2D(Layer):
    """2-D convolution via im2col + one GEMM.

    The weight gradient is one more GEMM over the same columns; the input
    gradient is :func:`~cnn_core.im2col.conv_input_grad` for stride 1 (one
    GEMM, kh row-shifted adds) and :func:`~cnn_core.im2col.col2im_gemm`
    otherwise.

    x: (N, H, W, C_in) -> out: (N, Ho, Wo, C_out).
    parameters: ``weight`` (C_out, C_in, kh, kw), ``bias`` (C_out,).

    ``pool_windows`` = (gh, gw), set by the model when a gh x gw max pool
    with stride gh x gw follows (see ``cnn_core.model.plan_conv_pool``): the
    output is then window-major, (gh*gw, N, Ho/gh, Wo/gw, C_out), and so is
    the gradient ``backward`` receives.
    """

    type_name = "conv2d"
    pool_windows = None
    # A dict while the model runs a pass in chunks, all with the same weights
    # (Model._holding_weight_matrices): the matrices made of the weights
    # (_weight_matrix) are then made once a pass instead of once a chunk.
    held_matrices = None

    def __init__(self, out_channels: int, kernel=3, stride=1, padding=0, name=None):
        super().__init__(name)
        if not is_integer(out_channels) or out_channels < 1:
            raise SpecError(f"conv2d {self.name}: out_channels must be a positive int, got {out_channels!r}")
        self.out_channels = int(out_channels)
        self.kernel = _pair(kernel, f"conv2d {self.name}: kernel")
        self.stride = _pair(stride, f"conv2d {self.name}: stride")
        self.padding = _pair(padding, f"conv2d {self.name}: padding")
        if min(self.kernel) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise SpecError(f"conv2d {self.name}: kernel and stride must be >= 1 and padding >= 0")

    def config(self):
        return {"out_channels": self.out_channels, "kernel": list(self.kernel),
                "stride": list(self.stride), "padding": list(self.padding)}

    @property
    def patch_major(self) -> bool:
        """Columns built by ``im2col_t_with_ones``: few input channels (see there); else ``im2col``."""
        return self.in_shape[2] <= PATCH_MAJOR_MAX_CHANNELS

    def plan(self, in_shape):
        out_shape = self._infer(tuple(in_shape))
        return out_shape, self.out_channels * (in_shape[2] * self.kernel[0] * self.kernel[1] + 1)

    def _infer(self, in_shape):
        if len(in_shape) != 3:
            raise SpecError(f"conv2d {self.name}: needs an image input (H, W, C), got shape {in_shape}")
        h, w, _ = in_shape
        ho = conv_output_size(h, self.kernel[0], self.stride[0], self.padding[0])
        wo = conv_output_size(w, self.kernel[1], self.stride[1], self.padding[1])
        if ho < 1 or wo < 1:
            raise SpecError(f"conv2d {self.name}: kernel {self.kernel} does not fit input {in_shape[:2]}")
        return (ho, wo, self.out_channels)

    def _init(self, xp, dtype, rng):
        c_in = self.in_shape[2]
        kh, kw = self.kernel
        self.parameters["weight"] = _he_normal(rng, (self.out_channels, c_in, kh, kw), c_in * kh * kw, xp, dtype)
        self.parameters["bias"] = xp.zeros(self.out_channels, dtype=dtype)

    def _batch_out_shape(self, n: int, windows) -> tuple:
        """The output's shape for a batch of n: (N, Ho, Wo, O), or window-major (see the class docs)."""
        ho, wo, o = self.out_shape
        if windows:
            gh, gw = windows
            return (gh * gw, n, ho // gh, wo // gw, o)
        return (n, ho, wo, o)

    def forward(self, x, train=True):
        self._check_input(x)
        n = x.shape[0]
        kh, kw = self.kernel
        sh, sw = self.stride
        ph, pw = self.padding
        o = self.out_channels
        xpad = pad_nhwc(x, ph, pw)
        wmat = self._weight_matrix("forward")                      # (kh*kw*C, O)
        windows = self.pool_windows
        patch_major = self.patch_major
        if patch_major:                                           # the bias rides in the GEMM
            cols = im2col_t_with_ones(xpad, kh, kw, sh, sw, windows or (1, 1))   # (kh*kw*C + 1, N*Ho*Wo)
            out = matmul_row_blocks(cols.T, self._weight_matrix("forward with bias"))
        else:
            cols = im2col(xpad, kh, kw, sh, sw, windows or (1, 1))   # (N*Ho*Wo, kh*kw*C)
            out = matmul_row_blocks(cols, wmat)
            out += self.parameters["bias"]
        cache = (xpad.shape, cols, wmat, patch_major, windows)
        return out.reshape(self._batch_out_shape(n, windows)), cache

    def _weight_matrix(self, kind: str):
        """The weights as a pass multiplies by them: "forward", (kh*kw*C, O); "forward with bias",
        the same and the bias as one more row (patch-major columns); "input grad", (kw*O, kh*C)
        (:func:`~cnn_core.im2col.input_grad_matrix`).  Kept in ``held_matrices`` when that is a dict."""
        held = self.held_matrices
        if held is not None and kind in held:
            return held[kind]
        weight = self.parameters["weight"]
        if kind == "input grad":
            matrix = input_grad_matrix(weight)
        elif kind == "forward with bias":
            matrix = _xp(weight).concatenate([self._weight_matrix("forward"), self.parameters["bias"][None]])
        else:
            matrix = weight.transpose(2, 3, 1, 0).reshape(-1, self.out_channels)
        if held is not None:
            held[kind] = matrix
        return matrix

    def backward(self, dout, cache, need_dx=True):
        padded_shape, cols, wmat, patch_major, windows = cache
        self._check_dout(dout, self._batch_out_shape(padded_shape[0], windows))
        o = self.out_channels
        dout2 = dout.reshape(-1, o)                               # (N*Ho*Wo, O), in the columns' order
        h, w, c_in = self.in_shape
        kh, kw = self.kernel
        if patch_major:
            dweight_bias = matmul_inner_blocks(cols, dout2)       # (kh*kw*C + 1, O): last row is the bias's
            dweight, dbias = dweight_bias[:-1].T, dweight_bias[-1]
        else:
            # (O, kh*kw*C) rather than cols.T @ dout2: OpenBLAS packs the tall
            # column matrix faster as this product's right operand (seed conv2:
            # the training step 1.7-2.2% faster, the same values); in unpacked
            # blocks on SkylakeX, the step another 1.06x.
            dweight, dbias = matmul_transposed_blocks(dout2, cols), column_sums(dout2)
        grads = {"weight": dweight.reshape(o, kh, kw, c_in).transpose(0, 3, 1, 2).copy(), "bias": dbias}
        if not need_dx:
            return None, grads
        if self.stride == (1, 1):
            return conv_input_grad(dout, self.parameters["weight"], (h, w), self.padding, windows,
                                   self._weight_matrix("input grad")), grads
        if windows:                                               # window-major -> (N, Ho, Wo, O)
            gh, gw = windows
            n, hq, wq = dout.shape[1:4]
            dout2 = dout.reshape(gh, gw, n, hq, wq, o).transpose(2, 3, 0, 4, 1, 5).reshape(-1, o)
        ph, pw = self.padding
        dxpad = col2im_gemm(dout2, wmat, padded_shape, kh, kw, *self.stride)
        return dxpad[:, ph:ph + h, pw:pw + w, :], grads


class Dense(Layer):
    """Fully connected layer.  x: (N, D) -> out: (N, units).

    parameters: ``weight`` (D, units), ``bias`` (units,).
    ``init_scale`` multiplies the He standard deviation; the presets give the
    classifier head 0.1, so the first logits are near zero (initial loss about
    ln 10) instead of spiking the loss to 5-25 in the first updates.
    """

    type_name = "dense"
    # Beyond this the first logits overflow float32 (a run would then stop as
    # "diverged", blaming the learning rate); 1 is He's own scale.
    MAX_INIT_SCALE = 100.0

    def __init__(self, units: int, init_scale: float = 1.0, name=None):
        super().__init__(name)
        if not is_integer(units) or units < 1:
            raise SpecError(f"dense {self.name}: units must be a positive int, got {units!r}")
        self.units = int(units)
        self.init_scale = number_in(init_scale, f"dense {self.name}: init_scale", 0.0, self.MAX_INIT_SCALE,
                                    high_open=False, error=SpecError)

    def config(self):
        return {"units": self.units} if self.init_scale == 1.0 else {"units": self.units,
                                                                       "init_scale": self.init_scale}

    def plan(self, in_shape):
        out_shape = self._infer(tuple(in_shape))
        return out_shape, (in_shape[0] + 1) * self.units

    def _infer(self, in_shape):
        if len(in_shape) != 1:
            raise SpecError(f"dense {self.name}: needs a flat input (D,), got shape {in_shape}; add a flatten layer")
        return (self.units,)

    def _init(self, xp, dtype, rng):
        d = self.in_shape[0]
        w = _he_normal(rng, (d, self.units), d, xp, dtype)
        self.parameters["weight"] = w * w.dtype.type(self.init_scale) if self.init_scale != 1.0 else w
        self.parameters["bias"] = xp.zeros(self.units, dtype=dtype)

    def forward(self, x, train=True):
        self._check_input(x)
        out = matmul_column_blocks(x, self.parameters["weight"])
        out += self.parameters["bias"]
        return out, x

    def backward(self, dout, cache, need_dx=True, weight_grad=True):
        """Also ``weight_grad=False``: no weight gradient, which a chunked step
        (``Model.loss_and_grads``) takes once over the whole batch with :meth:`weight_grad_of`."""
        x = cache
        self._check_dout(dout, (x.shape[0], self.units))
        grads = {"weight": self.weight_grad_of(x, dout)} if weight_grad else {}
        grads["bias"] = dout.sum(axis=0)
        # W @ dout.T, returned as its transposed view: OpenBLAS runs it 1.5x as
        # fast as dout @ W.T for the seed model's fc1 ((3136, 128) @ (128, 32)),
        # and in row blocks 1.2x faster again.
        dx = matmul_row_blocks(self.parameters["weight"], dout.T).T if need_dx else None
        return dx, grads

    @staticmethod
    def weight_grad_of(x, dout):
        """The weight gradient for inputs ``x`` (N, D) and output gradients ``dout`` (N, units)."""
        return x.T @ dout


# --------------------------------------------------------------------------- pooling / reshaping

class MaxPool2D(Layer):
    """Max pooling.  x: (N, H, W, C) -> out: (N, Ho, Wo, C).

    The gradient of each window goes to its *first* maximum in row-major
    window order (as in PyTorch), so ties never double-count.

    ``windows_first``, set by the model for a pool that takes the output of
    a conv with ``pool_windows`` (see ``cnn_core.model.plan_conv_pool``): the
    input is window-major, (kh*kw, N, Ho, Wo, C), and so is the gradient
    ``backward`` returns; every pass is then over contiguous blocks instead
    of strided views (forward and backward measured 0.45 + 1.8 ms against
    1.2 + 3.7 ms for the seed model's maxpool1 at batch 64).

    ``relu_after``, set by the model when an exact ReLU runs right after this
    pool (see ``cnn_core.model.plan_pool_relu``): the pool applies it to its
    output in place, and backward routes no gradient from the windows whose
    output it zeroed; that ReLU then passes values and gradients through.
    """

    type_name = "maxpool2d"
    windows_first = False
    relu_after = False

    def __init__(self, kernel=2, stride=None, name=None):
        super().__init__(name)
        self.kernel = _pair(kernel, f"maxpool2d {self.name}: kernel")
        self.stride = _pair(stride if stride is not None else kernel, f"maxpool2d {self.name}: stride")
        if min(self.kernel) < 1 or min(self.stride) < 1:
            raise SpecError(f"maxpool2d {self.name}: kernel and stride must be >= 1")

    def config(self):
        return {"kernel": list(self.kernel), "stride": list(self.stride)}

    def _infer(self, in_shape):
        if len(in_shape) != 3:
            raise SpecError(f"maxpool2d {self.name}: needs an image input (H, W, C), got shape {in_shape}")
        h, w, c = in_shape
        ho = conv_output_size(h, self.kernel[0], self.stride[0], 0)
        wo = conv_output_size(w, self.kernel[1], self.stride[1], 0)
        if ho < 1 or wo < 1:
            raise SpecError(f"maxpool2d {self.name}: kernel {self.kernel} does not fit input {in_shape[:2]}")
        return (ho, wo, c)

    def _windows(self, windows_first: bool):
        """Index every kernel offset's view of the input, in row-major order."""
        kh, kw = self.kernel
        if windows_first:
            yield from range(kh * kw)
            return
        sh, sw = self.stride
        ho, wo, _ = self.out_shape
        for i in range(kh):
            for j in range(kw):
                yield (slice(None), slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw))

    def _check_input(self, x):
        if not self.windows_first:
            super()._check_input(x)
            return
        kh, kw = self.kernel                    # window-major: (kh*kw, N, Ho, Wo, C)
        shape = getattr(x, "shape", ())
        if shape[:1] != (kh * kw,) or shape[2:] != self.out_shape:
            self._refuse_shape("window-major input", (kh * kw, "N", *self.out_shape), x)

    def forward(self, x, train=True):
        self._check_input(x)
        xp = _xp(x)
        windows_first = self.windows_first
        wins = list(self._windows(windows_first))
        if len(wins) == 1:
            out = x[wins[0]].copy()
        else:                                   # the first maximum allocates: no separate copy pass
            out = xp.maximum(x[wins[0]], x[wins[1]])
            for win in wins[2:]:
                xp.maximum(out, x[win], out=out)
        if self.relu_after:
            relu_values(out, out=out)   # where out > 0 it is still each window's maximum, for backward
        (kh, kw), (sh, sw) = self.kernel, self.stride
        if not train or sh < kh or sw < kw:
            return out, (x, x.shape, out, windows_first, None)
        # With disjoint windows a training pass finds where backward routes each window's gradient
        # now, while x is in cache from the layer before, and keeps these bool masks (at most a
        # quarter of x's bytes) instead of x: backward no longer reads x from memory, and x's memory
        # goes back to the allocator while still in cache, for the next layers' arrays (the seed
        # model's step 1.01-1.04x).  Overlapping windows keep x: their masks (kh*kw bytes an output)
        # could outweigh it.
        return out, (None, x.shape, out, windows_first, self._first_maximum_hits(x, out, wins))

    def _first_maximum_hits(self, x, out, wins):
        """(len(wins), *out.shape) bool: where each window ``wins[k]`` of ``x`` holds its window's
        first maximum, the input pixel that window's gradient goes to.  With relu_after, no
        window whose output the ReLU zeroed (out <= 0) routes anything: dout * 0 there, as the
        ReLU's own backward would give."""
        xp = _xp(x)
        hits = xp.empty((len(wins), *out.shape), dtype=bool)
        taken = out <= 0 if self.relu_after else None     # windows whose maximum is routed already
        for k, win in enumerate(wins):
            hit = xp.equal(x[win], out, out=hits[k])
            if taken is not None:
                xp.greater(hit, taken, out=hit)   # hit & ~taken, in one pass
            if k < len(wins) - 1:                 # no window left to route after the last
                taken = hit.copy() if taken is None else xp.logical_or(taken, hit, out=taken)
        return hits

    def backward(self, dout, cache, need_dx=True):
        x, x_shape, out, windows_first, hits = cache
        self._check_dout(dout, out.shape)
        xp = _xp(out)
        kh, kw = self.kernel
        sh, sw = self.stride
        ho, wo, _ = self.out_shape
        h, w, _ = self.in_shape
        wins = list(self._windows(windows_first))
        if hits is None:                          # evaluation mode, or overlapping windows
            hits = self._first_maximum_hits(x, out, wins)
        # Read once instead of kh*kw times: a Flatten's gradient arrives as a transposed view.
        dout = xp.ascontiguousarray(dout)
        if sh < kh or sw < kw:                    # overlapping windows accumulate
            dx = xp.zeros(x_shape, dtype=out.dtype)
            for k, win in enumerate(wins):      # hits[k]: device arrays are indexed, not iterated (tests/fake_cupy.py)
                dx[win] += dout * hits[k]
            return dx, {}
        # Disjoint windows: each input pixel is written exactly once, so no
        # zero-fill is needed where the windows tile the whole input.
        covered = windows_first or (sh == kh and sw == kw and ho * kh == h and wo * kw == w)
        dx = (xp.empty if covered else xp.zeros)(x_shape, dtype=out.dtype)
        for k, win in enumerate(wins):
            hit = hits[k]
            # The mask cast to floats, then multiplied in place: 1.2-1.5x as fast as
            # multiplying by the bool mask, whose cast numpy buffers; the same bits.
            dx_win = dx[win]
            xp.copyto(dx_win, hit)
            dx_win *= dout
        return dx, {}


class Flatten(Layer):
    """(N, H, W, C) -> (N, C*H*W), in (C, H, W) order like NCHW frameworks.

    Keeping the NCHW flattening order gives ``fc1.weight`` PyTorch's feature
    order, so it is exactly the transpose of the matching ``Linear.weight``.
    """

    type_name = "flatten"

    def _infer(self, in_shape):
        if len(in_shape) == 3:
            h, w, c = in_shape
            return (c * h * w,)
        return (int(np.prod(in_shape)),)

    def forward(self, x, train=True):
        self._check_input(x)
        features = self.out_shape[0]             # not -1: an empty batch has no size to infer it from
        if x.ndim == 4:
            return x.transpose(0, 3, 1, 2).reshape(x.shape[0], features), x.shape
        return x.reshape(x.shape[0], features), x.shape

    def backward(self, dout, cache, need_dx=True):
        shape = cache
        self._check_dout(dout, (shape[0], *self.out_shape))
        if len(shape) == 4:
            n, h, w, c = shape
            return dout.reshape(n, c, h, w).transpose(0, 2, 3, 1), {}
        return dout.reshape(shape), {}


# --------------------------------------------------------------------------- activations

class ReLU(Layer):
    """max(x, 0), elementwise; any shape."""

    type_name = "relu"
    # Set by the model when the max pool that runs right before applies this
    # ReLU (MaxPool2D.relu_after): values and gradients then pass through.
    applied_by_pool = False

    def forward(self, x, train=True):
        if self.applied_by_pool:
            return x, x
        out = relu_values(x)
        return out, out          # out > 0 exactly where x > 0: no need to keep x

    def backward(self, dout, cache, need_dx=True):
        self._check_dout(dout, cache.shape)     # else a (1, D) dout broadcasts silently
        if self.applied_by_pool:
            return dout, {}
        return dout * (cache > 0), {}


class LeakyReLU(Layer):
    """x if x > 0 else alpha * x; any shape."""

    type_name = "leaky_relu"

    def __init__(self, alpha: float = 0.01, name=None):
        super().__init__(name)
        self.alpha = number_in(alpha, f"leaky_relu {self.name}: alpha", 0.0, 1.0, high_open=False, error=SpecError)

    def config(self):
        return {"alpha": self.alpha}

    def forward(self, x, train=True):
        positive = x > 0
        return _xp(x).where(positive, x, x * x.dtype.type(self.alpha)), positive

    def backward(self, dout, cache, need_dx=True):
        self._check_dout(dout, cache.shape)
        return _xp(dout).where(cache, dout, dout * dout.dtype.type(self.alpha)), {}


class ELU(Layer):
    """x if x > 0 else alpha * (exp(x) - 1); any shape."""

    type_name = "elu"

    def __init__(self, alpha: float = 1.0, name=None):
        super().__init__(name)
        self.alpha = number_in(alpha, f"elu {self.name}: alpha", 0.0, 100.0, high_open=False, error=SpecError)

    def config(self):
        return {"alpha": self.alpha}

    def forward(self, x, train=True):
        xp = _xp(x)
        alpha = x.dtype.type(self.alpha)
        neg = alpha * xp.expm1(xp.minimum(x, 0))   # minimum(): no overflow for large x
        return xp.where(x > 0, x, neg), (x, neg)

    def backward(self, dout, cache, need_dx=True):
        x, neg = cache
        self._check_dout(dout, x.shape)
        alpha = x.dtype.type(self.alpha)
        return _xp(x).where(x > 0, dout, dout * (neg + alpha)), {}   # d/dx = alpha*exp(x) = neg + alpha


class SiLU(Layer):
    """Swish: x * sigmoid(x); any shape."""

    type_name = "silu"

    def forward(self, x, train=True):
        sig = _sigmoid(x)
        return x * sig, (x, sig)

    def backward(self, dout, cache, need_dx=True):
        x, sig = cache
        self._check_dout(dout, x.shape)
        one = x.dtype.type(1)
        return dout * (sig * (one + x * (one - sig))), {}


def _sigmoid(x):
    """Numerically stable logistic function (no overflow for large |x|)."""
    xp = _xp(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


# --------------------------------------------------------------------------- regularization / normalization

class Dropout(Layer):
    """Inverted dropout: zero with probability p, scale survivors by 1/(1-p).

    At evaluation (``train=False``) it is the identity, so inference needs no
    rescaling.  Draw k of masks since the last (re)seed is
    ``cnn_core.rng.uniform(key, k) >= p``: counter-based, so reseeding costs
    nothing and CPU and GPU draw the same masks.  ``key`` comes from the model's
    seed, then from each :meth:`~cnn_core.model.Model.reseed`.

    While :meth:`~cnn_core.model.Model.loss_and_grads` runs a batch in chunks
    (between :meth:`begin_batch` and :meth:`end_batch`; the counter advances
    once per batch), ``sample_offset`` is the index of ``x``'s first sample in
    the batch, and each chunk takes its own rows of the batch's mask.
    """

    # The most values of a mask a chunked step draws whole for the batch (4 MB of float32): one
    # draw instead of one a chunk saves its fixed cost (~35 us), but a larger mask (a dropout after
    # a conv: 25,088 values an image of 28x28x32) outweighed the chunks' own arrays (2.5x a step's
    # peak memory); it is drawn a chunk's rows at a time.
    MAX_BATCH_MASK_VALUES = 1 << 20

    type_name = "dropout"

    def __init__(self, p: float = 0.5, name=None):
        super().__init__(name)
        self.p = number_in(p, f"dropout {self.name}: p", 0.0, 1.0, error=SpecError)
        self.key: int | None = None
        self.draws = 0
        self.batch_mask = None
        self.batch_draw: int | None = None
        self.sample_offset = 0

    def config(self):
        return {"p": self.p}

    def _init(self, xp, dtype, rng):
        self.reseed(rng)

    def reseed(self, rng):
        self.key, self.draws = int(rng.integers(2**63)), 0

    def take_draw(self) -> int | None:
        """The next draw's number, the counter advanced past it; None, and no draw, when p is 0."""
        if self.p == 0.0:
            return None
        if self.key is None:        # its mask stream starts at build
            self._refuse_unbuilt()
        self.draws += 1
        return self.draws - 1

    def _mask(self, xp, draw: int, shape, dtype, offset: int = 0):
        """Elements ``offset ..`` of draw ``draw``'s mask, in ``shape``: 0 where dropped, 1/(1-p)
        where kept, in ``dtype``."""
        keep = uniform(xp, self.key, draw, shape, dtype, offset=offset) >= self.p
        return keep * np.dtype(dtype).type(1.0 / (1.0 - self.p))

    def draw_mask(self, xp, shape, dtype):
        """The next draw's mask of ``shape`` (the batch axis first); the counter advances.  None,
        and no draw, when p is 0."""
        draw = self.take_draw()
        return None if draw is None else self._mask(xp, draw, shape, dtype)

    def batch_mask_values(self, n: int) -> int:
        """How many values of a mask :meth:`begin_batch` draws whole for a batch of ``n`` samples
        (what Model.training_step_bytes counts): 0 when p is 0 or over MAX_BATCH_MASK_VALUES."""
        values = n * math.prod(self.in_shape)
        return values if self.p > 0.0 and values <= self.MAX_BATCH_MASK_VALUES else 0

    def begin_batch(self, xp, n: int, dtype) -> None:
        """Before the first chunk of a batch of ``n`` samples: the batch's mask drawn whole
        (``batch_mask``), or over MAX_BATCH_MASK_VALUES only its draw number taken (``batch_draw``),
        of which each chunk then draws its own rows."""
        if self.batch_mask_values(n):
            self.batch_mask = self.draw_mask(xp, (n, *self.in_shape), dtype)
        else:
            self.batch_draw = self.take_draw()

    def end_batch(self) -> None:
        """After a batch's last chunk (or its failure): forward draws afresh again."""
        self.batch_mask, self.batch_draw, self.sample_offset = None, None, 0

    def forward(self, x, train=True):
        if not train or self.p == 0.0:
            return x, None
        if self.batch_mask is not None:
            mask = self.batch_mask[self.sample_offset:self.sample_offset + x.shape[0]]
        elif self.batch_draw is not None:       # this chunk's rows of the batch's draw
            mask = self._mask(_xp(x), self.batch_draw, x.shape, x.dtype, offset=self.sample_offset * x[:1].size)
        else:
            mask = self.draw_mask(_xp(x), x.shape, x.dtype)
        return x * mask, mask

    def backward(self, dout, cache, need_dx=True):
        if cache is None:
            return dout, {}
        self._check_dout(dout, cache.shape)
        return dout * cache, {}


class BatchNorm2D(Layer):
    """Batch normalization over (N, H, W) for each channel; x: (N, H, W, C).

    parameters: ``weight`` (gamma, (C,)), ``bias`` (beta, (C,)).
    state: ``running_mean``, ``running_var`` (C,), updated in training mode as
    ``r = (1 - momentum) * r + momentum * batch_stat`` (unbiased variance, as in
    PyTorch); evaluation mode normalizes with them.
    """

    type_name = "batchnorm2d"
    couples_samples = True

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5, name=None):
        super().__init__(name)
        self.momentum = number_in(momentum, f"batchnorm2d {self.name}: momentum", 0.0, 1.0, high_open=False,
                                  error=SpecError)
        self.eps = number_in(eps, f"batchnorm2d {self.name}: eps", 0.0, 1.0, low_open=True, high_open=False,
                             error=SpecError)

    def config(self):
        return {"momentum": self.momentum, "eps": self.eps}

    def plan(self, in_shape):
        out_shape = self._infer(tuple(in_shape))
        return out_shape, 2 * in_shape[2]

    def _infer(self, in_shape):
        if len(in_shape) != 3:
            raise SpecError(f"batchnorm2d {self.name}: needs an image input (H, W, C), got shape {in_shape}")
        return in_shape

    def check_training_batch(self, n: int) -> None:
        """ShapeError unless a training batch of n images gives each channel more than one value.

        With one (or none) there is no batch variance: 0 (or NaN) would enter
        the running statistics for good.
        """
        h, w, _ = self.in_shape
        if n * h * w < 2:
            raise ShapeError(f"batchnorm2d {self.name}: a training batch needs more than one value per channel, "
                             f"got {n * h * w} (batch {n} of {h}x{w})")

    def state_problem(self, key, value):
        if key == "running_var" and value.size and value.min() < 0:   # sqrt(var + eps): NaN outputs in eval mode
            return f"holds a negative variance ({float(value.min()):.4g}); a variance is >= 0"
        return None

    def _init(self, xp, dtype, rng):
        c = self.in_shape[2]
        self.parameters["weight"] = xp.ones(c, dtype=dtype)
        self.parameters["bias"] = xp.zeros(c, dtype=dtype)
        self.state["running_mean"] = xp.zeros(c, dtype=dtype)
        self.state["running_var"] = xp.ones(c, dtype=dtype)

    def forward(self, x, train=True):
        self._check_input(x)
        xp = _xp(x)
        gamma, beta = self.parameters["weight"], self.parameters["bias"]
        if not train:
            inv_std = 1 / xp.sqrt(self.state["running_var"] + x.dtype.type(self.eps))
            return (x - self.state["running_mean"]) * (gamma * inv_std) + beta, None
        self.check_training_batch(x.shape[0])
        m = x.shape[0] * x.shape[1] * x.shape[2]
        mean = x.mean(axis=(0, 1, 2))
        centered = x - mean
        var = (centered * centered).mean(axis=(0, 1, 2))
        inv_std = 1 / xp.sqrt(var + x.dtype.type(self.eps))
        xhat = centered * inv_std
        mom = x.dtype.type(self.momentum)
        self.state["running_mean"] *= 1 - mom
        self.state["running_mean"] += mom * mean
        self.state["running_var"] *= 1 - mom
        self.state["running_var"] += mom * var * x.dtype.type(m / max(m - 1, 1))
        return xhat * gamma + beta, (xhat, inv_std)

    def backward(self, dout, cache, need_dx=True):
        if cache is None:
            raise ShapeError(f"batchnorm2d {self.name}: backward after an evaluation-mode forward")
        xhat, inv_std = cache
        self._check_dout(dout, xhat.shape)
        gamma = self.parameters["weight"]
        grads = {"weight": (dout * xhat).sum(axis=(0, 1, 2)), "bias": dout.sum(axis=(0, 1, 2))}
        if not need_dx:
            return None, grads
        # dx = gamma*inv_std * (dout - mean(dout) - xhat * mean(dout*xhat)), means over (N,H,W)
        # of dout's dtype: numpy < 2 made float32 / a Python int >= 65536 float64 (a batch of 84 at 28x28),
        # and dx, in float64, doubled the step's memory from here down
        m = dout.dtype.type(dout.shape[0] * dout.shape[1] * dout.shape[2])
        dx = dout - grads["bias"] / m - xhat * (grads["weight"] / m)
        dx *= gamma * inv_std
        return dx, grads


class Residual(Layer):
    """Residual block: out = x + f(x), with f a sequence of layers.

    f must keep the shape.  Parameters and state of the inner layers appear as
    ``"<block>.<inner>.<param>"`` (e.g. ``"res1.conv_a.weight"``).
    """

    type_name = "residual"

    def __init__(self, layers: list, name=None):
        super().__init__(name)
        if not isinstance(layers, list) or not layers or not all(isinstance(lyr, Layer) for lyr in layers):
            raise SpecError(f"residual {self.name}: layers must be a non-empty list of layers, got {layers!r}"[:300])
        names = [layer.name for layer in layers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:   # inner names key the block's parameters: a duplicate would hide one layer's
            raise SpecError(f"residual {self.name}: duplicate layer names {dupes}")
        self.layers = layers

    def spec(self):
        return {"type": self.type_name, "name": self.name, "layers": [lyr.spec() for lyr in self.layers]}

    @property
    def couples_samples(self):
        return any(layer.couples_samples for layer in self.layers)

    def build(self, in_shape, xp, dtype, rng):
        self.in_shape = tuple(in_shape)
        shape = self.in_shape
        for layer in self.layers:
            shape = layer.build(shape, xp, dtype, rng)
            for k, v in layer.parameters.items():
                self.parameters[f"{layer.name}.{k}"] = v
            for k, v in layer.state.items():
                self.state[f"{layer.name}.{k}"] = v
        self._check_kept(self.in_shape, shape)
        self.out_shape = shape
        return shape

    def plan(self, in_shape):
        shape, count = tuple(in_shape), 0
        for layer in self.layers:
            shape, n = layer.plan(shape)
            count += n
        self._check_kept(tuple(in_shape), shape)
        return shape, count

    def _check_kept(self, in_shape, out_shape) -> None:
        if out_shape != in_shape:
            raise SpecError(f"residual {self.name}: the inner layers map {in_shape} to {out_shape}; "
                            "a residual block must keep the shape")

    def reseed(self, rng):
        for layer in self.layers:
            layer.reseed(rng)

    def _inner(self, key: str) -> tuple[Layer, str]:
        """(the inner layer, its own key) for a key "<inner>.<key>", possibly nested."""
        inner, _, rest = key.partition(".")
        return next(layer for layer in self.layers if layer.name == inner), rest

    def bind_parameter(self, key, array):
        layer, rest = self._inner(key)
        layer.bind_parameter(rest, array)
        self.parameters[key] = array

    def state_problem(self, key, value):
        layer, rest = self._inner(key)
        return layer.state_problem(rest, value)

    def forward(self, x, train=True):
        self._check_input(x)
        caches = []
        h = x
        for layer in self.layers:
            h, cache = layer.forward(h, train)
            caches.append(cache)
        return x + h, caches

    def backward(self, dout, cache, need_dx=True):
        grads = {}
        d = dout
        for layer, c in zip(reversed(self.layers), reversed(cache)):
            d, g = layer.backward(d, c, need_dx=True)
            for k, v in g.items():
                grads[f"{layer.name}.{k}"] = v
        return dout + d, grads


LAYER_TYPES = {cls.type_name: cls for cls in
               (Conv2D, Dense, MaxPool2D, Flatten, ReLU, LeakyReLU, ELU, SiLU, Dropout, BatchNorm2D, Residual)}
