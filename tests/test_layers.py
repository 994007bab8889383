"""Layers one by one: gradient checks, hand-computed values, im2col/col2im.

All gradient checks run in float64 with central differences (eps = 1e-6),
whose truncation + rounding error is ~1e-9 relative for O(1) gradients, so a
correct backward scores far below the 1e-6 bound used here.  Inputs to the
piecewise layers (ReLU family, max pooling) are built to stay well away from
kinks and ties (>= 1e-2 apart), so the finite differences never cross one.
"""
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnn_core import reference
from cnn_core.errors import ShapeError, SpecError
from cnn_core.gradcheck import gradcheck_layer
from cnn_core import im2col as im2col_module
from cnn_core.backend import openblas_core
from cnn_core.im2col import (col2im, col2im_gemm, conv_input_grad, conv_output_size, im2col, matmul_column_blocks,
                             matmul_inner_blocks, matmul_row_blocks, matmul_transposed_blocks, pad_nhwc)
from cnn_core.layers import (ELU, ZERO_ROW, BatchNorm2D, Conv2D, Dense, Dropout, Flatten, LeakyReLU, MaxPool2D,
                             ReLU, Residual, SiLU, relu_values)
from cnn_core.rng import uniform

F64 = np.float64
TOL = 1e-6


def built(layer, in_shape, seed=0, dtype=F64):
    layer.build(in_shape, np, dtype, np.random.default_rng(seed))
    return layer


def assert_gradcheck(layer, x, train=True, tol=TOL, expect=None, **kw):
    report = gradcheck_layer(layer, x, train=train, **kw)
    assert set(report) == {"input", *layer.parameters}
    if expect is not None:
        assert set(layer.parameters) == set(expect)
    bad = {k: v for k, v in report.items() if not v < tol}
    assert not bad, f"gradient check failed: {report}"
    return report


def away_from_zero(rng, shape, low=0.05, high=2.0):
    """Random values with |x| in [low, high] and random signs (no kinks within eps)."""
    return rng.uniform(low, high, shape) * rng.choice([-1.0, 1.0], shape)


def distinct_values(rng, shape, gap=0.01):
    """A random permutation of evenly spaced values: no ties, every pair >= gap apart."""
    n = int(np.prod(shape))
    return ((rng.permutation(n) - n / 2) * gap).reshape(shape)


# --------------------------------------------------------------------------- Conv2D

CONV_CASES = [
    # (H, W, C_in), C_out, kernel, stride, padding
    ((5, 5, 1), 2, 3, 1, 0),
    ((6, 6, 2), 3, 3, 1, 1),
    ((7, 9, 3), 4, 3, 2, 1),
    ((7, 9, 2), 3, (3, 2), 1, 2),
    ((7, 9, 2), 3, 3, 2, 2),
    ((8, 6, 2), 3, (3, 2), (2, 1), (1, 2)),
    ((6, 7, 2), 2, 1, 2, 0),             # stride > kernel: skipped pixels get zero gradient
    ((6, 6, 5), 3, 3, 1, 1),
    ((5, 6, 4), 2, (3, 2), 1, (1, 2)),   # padding == kernel width
    ((5, 5, 4), 2, 1, 1, 1),             # 1x1 kernel with padding
    ((7, 9, 2), 3, 3, (1, 2), (0, 1)),   # stride 1 along H only (not the stride-1 path), padding along W only
    ((3, 5, 2), 2, 3, 1, 0),             # kernel as tall as the input: one output row per kernel row
]


@pytest.fixture(params=["patch_major", "row_major"])
def conv_columns(request, monkeypatch):
    """Run a conv test through both column layouts, whatever C_in is."""
    import cnn_core.layers as layers_module
    monkeypatch.setattr(layers_module, "PATCH_MAJOR_MAX_CHANNELS", 64 if request.param == "patch_major" else 0)
    return request.param


@pytest.mark.parametrize("in_shape,c_out,kernel,stride,padding", CONV_CASES)
def test_conv2d_gradcheck(in_shape, c_out, kernel, stride, padding, conv_columns):
    rng = np.random.default_rng(1)
    layer = built(Conv2D(c_out, kernel, stride, padding), in_shape)
    layer.parameters["bias"][...] = rng.standard_normal(c_out)
    x = rng.standard_normal((2, *in_shape))
    assert_gradcheck(layer, x, expect={"weight", "bias"}, max_entries=None)


@pytest.mark.parametrize("in_shape,c_out,kernel,stride,padding", CONV_CASES)
def test_conv2d_output_shape_and_param_shapes(in_shape, c_out, kernel, stride, padding):
    layer = built(Conv2D(c_out, kernel, stride, padding), in_shape)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    ho = (in_shape[0] + 2 * ph - kh) // sh + 1
    wo = (in_shape[1] + 2 * pw - kw) // sw + 1
    assert layer.out_shape == (ho, wo, c_out)
    assert layer.parameters["weight"].shape == (c_out, in_shape[2], kh, kw)
    assert layer.parameters["bias"].shape == (c_out,)
    out, _ = layer.forward(np.zeros((3, *in_shape)))
    assert out.shape == (3, ho, wo, c_out)


@pytest.mark.parametrize("in_shape,c_out,kernel,stride,padding",
                         [c for c in CONV_CASES if isinstance(c[3], int) and isinstance(c[4], int)])
def test_conv2d_matches_nchw_reference(in_shape, c_out, kernel, stride, padding, conv_columns):
    """Forward and backward equal the straightforward NCHW im2col (square stride/padding)."""
    rng = np.random.default_rng(2)
    layer = built(Conv2D(c_out, kernel, stride, padding), in_shape)
    layer.parameters["bias"][...] = rng.standard_normal(c_out)
    w, b = layer.parameters["weight"], layer.parameters["bias"]
    x_nchw = rng.standard_normal((3, in_shape[2], in_shape[0], in_shape[1]))
    out, cache = layer.forward(np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1)))
    ref_out, ref_cache = reference.conv2d_forward(x_nchw, w, b, stride, padding)
    np.testing.assert_allclose(out.transpose(0, 3, 1, 2), ref_out, rtol=1e-12, atol=1e-12)

    dout_nchw = rng.standard_normal(ref_out.shape)
    dx, grads = layer.backward(np.ascontiguousarray(dout_nchw.transpose(0, 2, 3, 1)), cache)
    rdx, rdw, rdb = reference.conv2d_backward(dout_nchw, ref_cache)
    np.testing.assert_allclose(dx.transpose(0, 3, 1, 2), rdx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["weight"], rdw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["bias"], rdb, rtol=1e-12, atol=1e-12)


def test_conv2d_window_major_input_gradient_with_stride_2(conv_columns):
    """A stride-2 conv feeding a fused 2x3 pool takes a window-major dout; its dx is the plain one.
    (In a model such a conv is often the first layer, whose dx is never asked for.)"""
    rng = np.random.default_rng(7)
    layer = built(Conv2D(3, 3, stride=2, padding=1), (11, 11, 2))     # 6x6 outputs
    x = rng.standard_normal((2, 11, 11, 2))
    dout = rng.standard_normal((2, 6, 6, 3))
    _, cache = layer.forward(x)
    dx_plain, _ = layer.backward(dout, cache)
    layer.pool_windows = (2, 3)
    _, cache = layer.forward(x)
    # (n, ho' a, wo' b, o) -> (a, b, n, ho', wo', o), flattened to (a*gw + b, ...)
    dout_windows = dout.reshape(2, 3, 2, 2, 3, 3).transpose(2, 4, 0, 1, 3, 5).reshape(6, 2, 3, 2, 3)
    dx_windows, _ = layer.backward(dout_windows, cache)
    np.testing.assert_allclose(dx_windows, dx_plain, rtol=1e-13, atol=1e-13)


def test_layer_specs_keep_every_setting():
    for layer in (MaxPool2D(3, stride=1), BatchNorm2D(momentum=0.2, eps=1e-3)):
        rebuilt = type(layer)(**{k: v for k, v in layer.spec().items() if k not in ("type", "name")})
        assert rebuilt.config() == layer.config() and vars(rebuilt) == vars(layer)


def test_conv2d_hand_values():
    """A 1x1-channel 3x3 input with a 2x2 kernel: each output is a hand-summed window."""
    layer = built(Conv2D(1, 2), (3, 3, 1))
    layer.parameters["weight"][...] = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    layer.parameters["bias"][...] = 0.5
    x = np.arange(9.0).reshape(1, 3, 3, 1)      # [[0,1,2],[3,4,5],[6,7,8]]
    out, cache = layer.forward(x)
    # top-left: 0*1 + 1*2 + 3*3 + 4*4 = 27; each step right adds 1*(1+2+3+4) = 10, down adds 3*10
    np.testing.assert_allclose(out[0, :, :, 0], [[27.5, 37.5], [57.5, 67.5]])
    dx, grads = layer.backward(np.ones_like(out), cache)
    # each input pixel receives the sum of the kernel taps that touch it
    np.testing.assert_allclose(dx[0, :, :, 0], [[1, 3, 2], [4, 10, 6], [3, 7, 4]])
    np.testing.assert_allclose(grads["weight"][0, 0], [[0 + 1 + 3 + 4, 1 + 2 + 4 + 5], [3 + 4 + 6 + 7, 4 + 5 + 7 + 8]])
    np.testing.assert_allclose(grads["bias"], [4.0])


def test_gradcheck_layer_refuses_a_float32_layer():
    # It used to run, and report 1.5e-2 for the weight of a correct float32 conv (the 1e-6 step rounds away).
    layer = built(Conv2D(2, 3), (5, 5, 1), dtype=np.dtype(np.float32))
    with pytest.raises(ShapeError, match="gradcheck_layer needs a float64 layer .* conv2d.weight is float32"):
        gradcheck_layer(layer, np.random.default_rng(0).standard_normal((2, 5, 5, 1)))
    assert_gradcheck(built(ReLU(), (5, 5, 1), dtype=np.dtype(np.float32)),     # no parameters: x is made float64
                     away_from_zero(np.random.default_rng(1), (2, 5, 5, 1)))


def test_gradcheck_layer_checks_a_models_layer_as_it_runs_alone(monkeypatch):
    """The seed model fuses conv1 -> relu1 -> maxpool1 (conv1's output window-major, maxpool1 applying
    relu1).  gradcheck_layer refused maxpool1's (N, H, W, C) input as not window-major, and checked
    relu1 as the identity, so that a ReLU whose backward forgot its mask passed.  Each is checked as
    it runs alone now, and the model's fusion is as it was afterwards."""
    from cnn_core.model import build_model
    layers = {layer.name: layer for layer in build_model("seed", dtype="float64").layers}
    rng = np.random.default_rng(0)
    inputs = {"conv1": rng.standard_normal((2, 28, 28, 1)), "relu1": away_from_zero(rng, (2, 28, 28, 32)),
              "maxpool1": distinct_values(rng, (2, 28, 28, 32))}       # no ties within a window
    for name, x in inputs.items():
        assert_gradcheck(layers[name], x)
    fused = (layers["conv1"].pool_windows, layers["maxpool1"].windows_first, layers["maxpool1"].relu_after,
             layers["relu1"].applied_by_pool)
    assert fused == ((2, 2), True, True, True)
    monkeypatch.setattr(ReLU, "backward", lambda self, dout, cache, need_dx=True: (dout, {}))   # no mask
    assert gradcheck_layer(layers["relu1"], inputs["relu1"])["input"] > 0.5


def test_gradcheck_layer_refuses_an_unbuilt_layer_or_a_wrong_input_shape():
    # Both failed deep inside the layer's forward (TypeError on a None shape, a matmul ValueError).
    x = np.random.default_rng(0).standard_normal((2, 5, 5, 1))
    with pytest.raises(ShapeError, match=r"gradcheck_layer needs a built layer: call conv2d.build\("):
        gradcheck_layer(Conv2D(2, 3), x)
    layer = built(Conv2D(2, 3), (5, 5, 1))
    with pytest.raises(ShapeError, match=r"gradcheck_layer: conv2d takes input \(N, 5, 5, 1\), got shape \(2, 1, 5, 5"):
        gradcheck_layer(layer, x.transpose(0, 3, 1, 2))       # NCHW, the model's layout, not the layer's
    with pytest.raises(ShapeError, match=r"takes input \(N, 5, 5, 1\), got shape \(5, 5, 1\)"):
        gradcheck_layer(layer, x[0])                          # no batch axis


def test_gradcheck_layer_catches_a_wrong_backward(monkeypatch):
    """Every layer check here asserts a report below TOL, which a vacuous checker also gives (with
    an all-zero output weighting R, say, both gradients read 0): a backward 10% off in the input
    gradient, or in one parameter's, must read far above it, and only where it is wrong."""
    rng = np.random.default_rng(3)
    layer = built(Dense(4), (6,))
    layer.parameters["bias"][...] = rng.standard_normal(4)
    x = rng.standard_normal((5, 6))
    right = Dense.backward

    def off_by(dx_scale: float, weight_scale: float):
        def backward(self, dout, cache, need_dx=True):
            dx, grads = right(self, dout, cache, need_dx)
            return dx * dx_scale, {**grads, "weight": grads["weight"] * weight_scale}
        return backward
    monkeypatch.setattr(Dense, "backward", off_by(1.1, 1.0))
    report = gradcheck_layer(layer, x, max_entries=None)
    assert report["input"] > 1e-2 and report["weight"] < TOL and report["bias"] < TOL, report
    monkeypatch.setattr(Dense, "backward", off_by(1.0, 1.1))
    report = gradcheck_layer(layer, x, max_entries=None)
    assert report["weight"] > 1e-2 and report["input"] < TOL and report["bias"] < TOL, report


def test_conv2d_backward_without_dx():
    layer = built(Conv2D(2, 3, padding=1), (4, 4, 1))
    out, cache = layer.forward(np.random.default_rng(0).standard_normal((2, 4, 4, 1)))
    dx, grads = layer.backward(np.ones_like(out), cache, need_dx=False)
    assert dx is None and set(grads) == {"weight", "bias"}


def test_conv2d_bad_config_and_input():
    with pytest.raises(SpecError, match="out_channels"):
        Conv2D(0)
    with pytest.raises(SpecError, match="kernel"):
        Conv2D(2, kernel=(3, 3, 3))
    with pytest.raises(SpecError, match="padding"):
        Conv2D(2, padding=-1)
    with pytest.raises(SpecError, match="does not fit"):
        built(Conv2D(2, kernel=5), (4, 6, 1))
    with pytest.raises(SpecError, match="image input"):
        built(Conv2D(2), (16,))


def _shape_error(layer, what, expected: str, got: tuple):
    """The one-line ShapeError a layer gives for an input or dout of the wrong shape."""
    return pytest.raises(ShapeError, match=rf"^{layer.type_name} {layer.name}: {what} must have shape "
                                           rf"{re.escape(expected)}, got {re.escape(str(got))}")


def test_layers_refuse_a_wrong_input_shape_in_one_line():
    # Each failed deep inside NumPy (a matmul or reshape ValueError, an IndexError) or, for a
    # pool, returned an output of the wrong shape; the layer now names itself and both shapes.
    conv = built(Conv2D(4, 3, padding=1, name="c"), (8, 8, 3))
    for got in ((2, 3, 8, 8), (2, 8, 8, 1), (8, 8, 3), (2, 7, 8, 3)):      # NCHW, channels, no batch axis, H
        with _shape_error(conv, "input", "(N, 8, 8, 3)", got):
            conv.forward(np.zeros(got))
    with pytest.raises(ShapeError, match=r"channels-last: N, H, W, C"):
        conv.forward(np.zeros((2, 3, 8, 8)))
    dense = built(Dense(5, name="d"), (10,))
    for got in ((2, 11), (10,)):
        with _shape_error(dense, "input", "(N, 10)", got):
            dense.forward(np.zeros(got))
    pool = built(MaxPool2D(2, name="p"), (8, 8, 3))
    for got in ((8, 8), (2, 8, 8, 4), (2, 6, 8, 3)):
        with _shape_error(pool, "input", "(N, 8, 8, 3)", got):
            pool.forward(np.zeros(got))
    for layer in (built(BatchNorm2D(name="b"), (4, 4, 3)), built(Flatten(name="f"), (4, 4, 3)),
                  built(Residual([ReLU(name="r")], name="res"), (4, 4, 3))):
        with _shape_error(layer, "input", "(N, 4, 4, 3)", (2, 4, 4, 2)):
            layer.forward(np.zeros((2, 4, 4, 2)))
    with pytest.raises(ShapeError, match=r"^dense d: input must have shape \(N, 10\), got a list$"):
        dense.forward([[0.0] * 10])
    with pytest.raises(ShapeError, match=r"^conv2d c2: not built; call build\("):
        Conv2D(4, name="c2").forward(np.zeros((2, 8, 8, 3)))


def test_an_unbuilt_dropout_says_so():
    # It failed on its None key deep in the random stream: "unsupported operand type(s) for &=".
    with pytest.raises(ShapeError, match=r"^dropout drop: not built; call build\("):
        Dropout(0.5, name="drop").forward(np.ones((2, 3)))
    np.testing.assert_array_equal(Dropout(0.5).forward(np.ones((2, 3)), train=False)[0], np.ones((2, 3)))


def test_window_major_pool_refuses_a_plain_input():
    conv, pool = built(Conv2D(2, 3, padding=1, name="c"), (4, 4, 1)), built(MaxPool2D(2, name="p"), (4, 4, 2))
    conv.pool_windows, pool.windows_first = (2, 2), True
    out, _ = conv.forward(np.ones((3, 4, 4, 1)))
    assert out.shape == (4, 3, 2, 2, 2)
    assert pool.forward(out)[0].shape == (3, 2, 2, 2)
    with _shape_error(pool, "window-major input", "(4, N, 2, 2, 2)", (3, 4, 4, 2)):
        pool.forward(np.ones((3, 4, 4, 2)))
    with _shape_error(pool, "window-major input", "(4, N, 2, 2, 2)", (2, 3, 2, 2, 2)):
        pool.forward(np.ones((2, 3, 2, 2, 2)))          # the windows of another pool size


def test_layers_refuse_a_dout_of_the_wrong_shape():
    # A wrong dout failed in a matmul or broadcast, or (ReLU family, dropout: a (1, D) dout
    # against a (N, D) cache) broadcast silently into a wrong gradient.
    rng = np.random.default_rng(0)
    cases = [(built(Conv2D(4, 3, padding=1, name="c"), (8, 8, 3)), (2, 8, 8, 3)),
             (built(Dense(5, name="d"), (10,)), (2, 10)),
             (built(MaxPool2D(2, name="p"), (8, 8, 3)), (2, 8, 8, 3)),
             (built(Flatten(name="f"), (4, 4, 3)), (2, 4, 4, 3)),
             (built(BatchNorm2D(name="b"), (4, 4, 3)), (2, 4, 4, 3)),
             (built(Dropout(0.5, name="drop"), (6,)), (3, 6))]
    cases += [(built(layer, (6,)), (3, 6)) for layer in (ReLU(name="r"), LeakyReLU(name="l"), ELU(name="e"),
                                                          SiLU(name="s"))]
    for layer, in_shape in cases:
        out, cache = layer.forward(rng.standard_normal(in_shape))
        wrong = (1, *out.shape[1:])                     # broadcastable, and the batch axis is wrong
        with _shape_error(layer, "dout", str(out.shape), wrong):
            layer.backward(np.ones(wrong), cache)
        layer.backward(np.ones(out.shape), cache)      # the right shape still goes through


# --------------------------------------------------------------------------- Dense

def test_dense_gradcheck_and_values():
    rng = np.random.default_rng(3)
    layer = built(Dense(4), (6,))
    assert layer.parameters["weight"].shape == (6, 4) and layer.parameters["bias"].shape == (4,)
    layer.parameters["bias"][...] = rng.standard_normal(4)
    x = rng.standard_normal((5, 6))
    out, _ = layer.forward(x)
    np.testing.assert_allclose(out, x @ layer.parameters["weight"] + layer.parameters["bias"], rtol=1e-14)
    assert_gradcheck(layer, x, expect={"weight", "bias"}, max_entries=None)


def test_dense_he_init_statistics():
    layer = built(Dense(500), (200,), seed=7)
    w = layer.parameters["weight"]
    assert abs(w.std() - np.sqrt(2 / 200)) < 0.02 * np.sqrt(2 / 200)
    assert abs(w.mean()) < 5 * np.sqrt(2 / 200) / np.sqrt(w.size)
    assert np.all(layer.parameters["bias"] == 0)


def test_dense_init_scale_multiplies_the_he_weights():
    plain = built(Dense(4), (6,), seed=3).parameters["weight"]
    scaled = built(Dense(4, init_scale=0.1), (6,), seed=3).parameters["weight"]     # a NumPy type, not a dtype
    np.testing.assert_array_equal(scaled, plain * 0.1)


def test_dense_needs_flat_input():
    with pytest.raises(SpecError, match="flatten"):
        built(Dense(3), (4, 4, 1))


# --------------------------------------------------------------------------- MaxPool2D

@pytest.mark.parametrize("in_shape,kernel,stride", [
    ((4, 6, 2), 2, 2),           # disjoint, tiles the input
    ((7, 7, 2), 3, 2),           # overlapping
    ((5, 7, 2), 2, 2),           # disjoint, last row/column left over
    ((8, 7, 2), 3, 3),           # disjoint, not divisible: leftover rows and a column
    ((7, 8, 1), 2, 3),           # stride > kernel: gaps between windows
    ((6, 7, 2), (3, 2), (2, 1)),  # non-square, overlapping along W
    ((6, 7, 2), 2, (2, 1)),       # overlapping along W only: disjoint along H
])
def test_maxpool_gradcheck(in_shape, kernel, stride):
    rng = np.random.default_rng(4)
    layer = built(MaxPool2D(kernel, stride), in_shape)
    x = distinct_values(rng, (2, *in_shape))
    assert_gradcheck(layer, x, max_entries=None)


def test_maxpool_leftover_rows_get_zero_gradient():
    rng = np.random.default_rng(5)
    layer = built(MaxPool2D(3, 3), (8, 7, 2))
    assert layer.out_shape == (2, 2, 2)
    x = distinct_values(rng, (2, 8, 7, 2))
    x[:, 6:, :, :] += 100.0          # the largest values sit where no window reaches
    x[:, :, 6:, :] += 100.0
    out, cache = layer.forward(x)
    assert out.max() < 50.0
    dx, _ = layer.backward(np.ones_like(out), cache)
    assert np.all(dx[:, 6:, :, :] == 0) and np.all(dx[:, :, 6:, :] == 0)
    # exactly one input per window receives the gradient
    assert dx.sum() == out.size and np.count_nonzero(dx) == out.size


def test_maxpool_forward_hand_values():
    layer = built(MaxPool2D(2, 2), (4, 4, 1))
    x = np.array([[1, 5, 2, 0], [3, 4, 8, 7], [0, -1, -3, -2], [-4, 6, -5, -9]], dtype=F64).reshape(1, 4, 4, 1)
    out, _ = layer.forward(x)
    np.testing.assert_array_equal(out[0, :, :, 0], [[5, 8], [6, -2]])


def test_maxpool_ties_disjoint_go_to_first_maximum():
    layer = built(MaxPool2D(2, 2), (4, 4, 1))
    x = np.array([[1, 3, 2, 2],
                  [3, 0, 2, 2],
                  [0, 0, 7, 1],
                  [0, 0, 7, 7]], dtype=F64).reshape(1, 4, 4, 1)
    out, cache = layer.forward(x)
    np.testing.assert_array_equal(out[0, :, :, 0], [[3, 2], [0, 7]])
    dout = np.array([[10.0, 20.0], [30.0, 40.0]]).reshape(1, 2, 2, 1)
    dx, _ = layer.backward(dout, cache)
    np.testing.assert_array_equal(dx[0, :, :, 0], [[0, 10, 20, 0],
                                                   [0, 0, 0, 0],
                                                   [30, 0, 40, 0],
                                                   [0, 0, 0, 0]])


def test_maxpool_ties_overlapping_go_to_first_maximum():
    layer = built(MaxPool2D(3, 2), (5, 5, 1))
    dout = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    # constant input: every window's first maximum is its top-left pixel
    out, cache = layer.forward(np.ones((1, 5, 5, 1)))
    dx, _ = layer.backward(dout, cache)
    expected = np.zeros((5, 5))
    expected[0, 0], expected[0, 2], expected[2, 0], expected[2, 2] = 1, 2, 3, 4
    np.testing.assert_array_equal(dx[0, :, :, 0], expected)
    # (1,1) and (2,2) tie in window (0,0), where (1,1) comes first; the other
    # three windows contain only (2,2), so it collects their gradients (shared pixel)
    x = np.zeros((1, 5, 5, 1))
    x[0, 1, 1, 0] = x[0, 2, 2, 0] = 5.0
    out, cache = layer.forward(x)
    np.testing.assert_array_equal(out[0, :, :, 0], 5.0)
    dx, _ = layer.backward(dout, cache)
    expected = np.zeros((5, 5))
    expected[1, 1], expected[2, 2] = 1, 2 + 3 + 4
    np.testing.assert_array_equal(dx[0, :, :, 0], expected)


@pytest.mark.parametrize("k,s,hw", [(2, 2, 6), (2, 2, 7), (3, 2, 7), (3, 3, 8)])
def test_maxpool_many_ties_match_reference_argmax(k, s, hw):
    """Integer inputs with many ties: same routing as an explicit first-argmax."""
    rng = np.random.default_rng(6)
    x_nchw = rng.integers(0, 3, (3, 2, hw, hw)).astype(F64)
    layer = built(MaxPool2D(k, s), (hw, hw, 2))
    out, cache = layer.forward(np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1)))
    ref_out, ref_cache = reference.maxpool_forward(x_nchw, k, s)
    np.testing.assert_array_equal(out.transpose(0, 3, 1, 2), ref_out)
    dout = rng.standard_normal(ref_out.shape)
    dx, _ = layer.backward(np.ascontiguousarray(dout.transpose(0, 2, 3, 1)), cache)
    np.testing.assert_array_equal(dx.transpose(0, 3, 1, 2), reference.maxpool_backward(dout, ref_cache))


@pytest.mark.parametrize("k,s", [(2, 2), (3, 3)])
@pytest.mark.parametrize("relu_after", [False, True])
def test_maxpool_backward_routes_by_the_training_forwards_masks(k, s, relu_after):
    """With disjoint windows a training forward takes the first-maximum masks that backward routes
    by, while its input is still in cache: overwriting that input afterwards changes no gradient.
    An evaluation-mode forward keeps no masks; backward then compares the input with the output
    itself, the same routing as an explicit first argmax."""
    rng = np.random.default_rng(17)
    layer = built(MaxPool2D(k, s), (7, 7, 2))
    layer.relu_after = relu_after
    x = rng.integers(-2, 3, (3, 7, 7, 2)).astype(F64)      # ties, and windows whose max is <= 0
    dout = rng.standard_normal((3, *layer.out_shape))
    out, eval_cache = layer.forward(x.copy(), train=False)
    expected, _ = layer.backward(dout, eval_cache)
    x_nchw = x.transpose(0, 3, 1, 2)
    _, ref_cache = reference.maxpool_forward(x_nchw, k, s)
    routed = dout * (out > 0) if relu_after else dout      # the ReLU's backward first
    np.testing.assert_array_equal(expected.transpose(0, 3, 1, 2),
                                  reference.maxpool_backward(routed.transpose(0, 3, 1, 2), ref_cache))
    trained = x.copy()
    _, cache = layer.forward(trained, train=True)
    trained[...] = 0.0                 # compared again, every window would tie at zero
    dx, _ = layer.backward(dout, cache)
    np.testing.assert_array_equal(bits(dx), bits(expected))


def bits(a):
    """An array's bytes as unsigned integers: equal only if bit for bit equal (-0.0, NaN payloads)."""
    return np.ascontiguousarray(a).view(np.dtype(f"u{a.dtype.itemsize}"))


@pytest.mark.parametrize("k,s,hw,windows_first", [(2, 2, 6, False), (2, 2, 7, False), (3, 2, 7, False),
                                                  (2, 2, 6, True), ((3, 1), (3, 1), 6, True)])
@pytest.mark.parametrize("dtype", [np.float32, F64])
def test_maxpool_relu_after_is_pool_then_relu_bit_for_bit(k, s, hw, windows_first, dtype):
    """relu_after: the same output and input gradient, bit for bit, as the pool followed by
    a ReLU, on integer inputs (ties everywhere, windows whose max is 0 or negative, -0.0)
    with NaN and -inf in some windows, and a gradient with signed values, zeros and a NaN;
    and that gradient is, bit for bit, the ReLU's times each window's first-maximum mask."""
    rng = np.random.default_rng(16)
    plain, fused = (built(MaxPool2D(k, s), (hw, hw, 3), dtype=dtype) for _ in range(2))
    relu = built(ReLU(), plain.out_shape, dtype=dtype)
    fused.relu_after = True
    x = rng.integers(-2, 2, (4, hw, hw, 3)).astype(dtype)
    x[x == 0] = rng.choice([0.0, -0.0], int((x == 0).sum()))
    x[0, 0, 0, 0], x[1, 2, 1, 2], x[2, 1, 1, 1] = np.nan, -np.inf, np.inf
    if windows_first:                  # as a conv with pool_windows hands it over
        (kh, kw), (ho, wo, c) = plain.kernel, plain.out_shape
        x = np.ascontiguousarray(x[:, :ho * kh, :wo * kw].reshape(4, ho, kh, wo, kw, c).transpose(2, 4, 0, 1, 3, 5)
                                 .reshape(kh * kw, 4, ho, wo, c))
        plain.windows_first = fused.windows_first = True
    pooled, pool_cache = plain.forward(x)
    out, relu_cache = relu.forward(pooled)
    fused_out, fused_cache = fused.forward(x)
    np.testing.assert_array_equal(bits(fused_out), bits(out))
    dout = rng.integers(-2, 3, out.shape).astype(dtype)
    dout[dout == 0] = rng.choice([0.0, -0.0], int((dout == 0).sum()))
    dout.reshape(-1)[7] = np.nan
    relu_dout = relu.backward(dout, relu_cache)[0]
    dx, _ = plain.backward(relu_dout, pool_cache)
    fused_dx, _ = fused.backward(dout, fused_cache)
    np.testing.assert_array_equal(bits(fused_dx), bits(dx))
    expected, taken = np.zeros_like(x), np.zeros(pooled.shape, dtype=bool)     # first maxima, by hand
    overlapping = any(s < k for s, k in zip(plain.stride, plain.kernel))
    for win in plain._windows(windows_first):
        hit = (x[win] == pooled) & ~taken
        taken |= hit
        if overlapping:
            expected[win] += relu_dout * hit
        else:                          # assigned: 0.0 + -0.0 would lose a zero's sign
            expected[win] = relu_dout * hit
    np.testing.assert_array_equal(bits(dx), bits(expected))
    assert np.isnan(fused_out).any() and (fused_out == 0).any() and not np.isnan(dx).all()


def test_maxpool_kernel_too_large():
    with pytest.raises(SpecError, match="does not fit"):
        built(MaxPool2D(5), (4, 4, 1))


# --------------------------------------------------------------------------- activations

@pytest.mark.parametrize("layer,fn", [
    (ReLU(), lambda x: np.maximum(x, 0)),
    (LeakyReLU(0.1), lambda x: np.where(x > 0, x, 0.1 * x)),
    (LeakyReLU(), lambda x: np.where(x > 0, x, 0.01 * x)),
    (ELU(), lambda x: np.where(x > 0, x, np.exp(x) - 1)),
    (ELU(0.7), lambda x: np.where(x > 0, x, 0.7 * (np.exp(x) - 1))),
    (SiLU(), lambda x: x / (1 + np.exp(-x))),
], ids=["relu", "leaky0.1", "leaky_default", "elu", "elu0.7", "silu"])
def test_activation_values_and_gradcheck(layer, fn):
    rng = np.random.default_rng(7)
    built(layer, (3, 4, 2))
    x = away_from_zero(rng, (2, 3, 4, 2), high=4.0)
    out, _ = layer.forward(x)
    np.testing.assert_allclose(out, fn(x), rtol=1e-14, atol=1e-15)
    assert_gradcheck(layer, x, max_entries=None)


@pytest.mark.parametrize("dtype", [np.float32, F64])
@pytest.mark.parametrize("size", [0, 1, 7, ZERO_ROW - 1, ZERO_ROW, 3 * ZERO_ROW + 5])
def test_relu_values_is_numpys_maximum_bit_for_bit(size, dtype):
    """Every length around the zero row's (none, a part, whole rows, rows and a tail), NaN,
    infinities and both zeros; into a new array, in place, and from a strided view or an array
    in Fortran order."""
    rng = np.random.default_rng(17)
    x = rng.standard_normal(size).astype(dtype)
    specials = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0], dtype=dtype)
    x[:6] = specials[:min(size, 6)]
    expected = np.maximum(x, 0)
    assert (bits(expected)[:6] != bits(x)[:6]).any() or size < 6     # -0.0 -> 0.0 and -inf -> 0.0 changed
    np.testing.assert_array_equal(bits(relu_values(x)), bits(expected))
    grid = x[:size - size % 4].reshape(-1, 4)
    np.testing.assert_array_equal(bits(relu_values(grid[:, ::2])), bits(np.maximum(grid[:, ::2], 0)))
    flipped = grid.T.copy().T           # Fortran order: a new array keeps it, and no flat view of it exists
    np.testing.assert_array_equal(bits(relu_values(flipped)), bits(np.maximum(grid, 0)))
    assert relu_values(flipped, out=flipped) is flipped
    np.testing.assert_array_equal(bits(flipped), bits(np.maximum(grid, 0)))
    in_place = x.copy()
    assert relu_values(in_place, out=in_place) is in_place
    np.testing.assert_array_equal(bits(in_place), bits(expected))


def test_activations_on_flat_input():
    rng = np.random.default_rng(8)
    x = away_from_zero(rng, (4, 6))
    for layer in (ReLU(), LeakyReLU(0.2), ELU(), SiLU()):
        assert_gradcheck(built(layer, (6,)), x, max_entries=None)


def test_activation_hand_derivatives():
    x = np.array([[-2.0, -0.5, 0.5, 3.0]])
    d = np.ones_like(x)
    cases = {
        "relu": (ReLU(), [0, 0, 1, 1]),
        "leaky": (LeakyReLU(0.1), [0.1, 0.1, 1, 1]),
        "elu": (ELU(1.0), [np.exp(-2.0), np.exp(-0.5), 1, 1]),
        "silu": (SiLU(), [s * (1 + v * (1 - s)) for v, s in ((v, 1 / (1 + np.exp(-v))) for v in x[0])]),
    }
    for name, (layer, expected) in cases.items():
        built(layer, (4,))
        _, cache = layer.forward(x)
        dx, grads = layer.backward(d, cache)
        assert grads == {}
        np.testing.assert_allclose(dx[0], expected, rtol=1e-14, err_msg=name)


def test_activations_extreme_inputs_do_not_overflow():
    x = np.array([[-1000.0, -50.0, 50.0, 1000.0]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):   # underflow to 0 is fine
        elu_out, _ = built(ELU(), (4,)).forward(x)
        silu_layer = built(SiLU(), (4,))
        silu_out, cache = silu_layer.forward(x)
        dx, _ = silu_layer.backward(np.ones_like(x), cache)
    np.testing.assert_allclose(elu_out[0], [-1.0, np.expm1(-50.0), 50.0, 1000.0])
    np.testing.assert_allclose(silu_out[0], [0.0, -50.0 / (1 + np.exp(50.0)), 50.0, 1000.0], atol=1e-300)
    assert np.all(np.isfinite(dx))
    np.testing.assert_allclose(dx[0, [0, 3]], [0.0, 1.0], atol=1e-12)


def test_activations_keep_float32():
    x = np.random.default_rng(9).standard_normal((2, 5)).astype(np.float32)
    for layer in (ReLU(), LeakyReLU(0.1), ELU(), SiLU()):
        built(layer, (5,), dtype=np.float32)
        out, cache = layer.forward(x)
        dx, _ = layer.backward(np.ones_like(x), cache)
        assert out.dtype == np.float32 and dx.dtype == np.float32, layer


# --------------------------------------------------------------------------- Flatten

def test_flatten_uses_chw_order():
    layer = built(Flatten(), (3, 4, 5))
    assert layer.out_shape == (60,)
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 3, 4, 5))           # (N, H, W, C)
    out, cache = layer.forward(x)
    assert out.shape == (2, 60)
    for n, h, w, c in [(0, 0, 0, 0), (1, 2, 3, 4), (0, 1, 0, 3), (1, 0, 2, 1)]:
        assert out[n, c * 3 * 4 + h * 4 + w] == x[n, h, w, c]
    np.testing.assert_array_equal(out, x.transpose(0, 3, 1, 2).reshape(2, -1))
    dout = rng.standard_normal(out.shape)
    dx, _ = layer.backward(dout, cache)
    assert dx.shape == x.shape
    for n, h, w, c in [(0, 0, 0, 0), (1, 2, 3, 4), (0, 1, 0, 3)]:
        assert dx[n, h, w, c] == dout[n, c * 3 * 4 + h * 4 + w]
    assert_gradcheck(layer, x, max_entries=None)


def test_flatten_flat_input_is_identity():
    layer = built(Flatten(), (7,))
    x = np.arange(14.0).reshape(2, 7)
    out, cache = layer.forward(x)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(layer.backward(out, cache)[0], x)


# --------------------------------------------------------------------------- Dropout

def test_dropout_train_mask_scaling_and_backward():
    p = 0.3
    layer = built(Dropout(p), (50, 40), seed=11)
    x = np.random.default_rng(12).uniform(1.0, 2.0, (4, 50, 40))
    out, cache = layer.forward(x, train=True)
    kept = out != 0
    np.testing.assert_allclose(out[kept], x[kept] / (1 - p), rtol=1e-15)
    frac_dropped = 1 - kept.mean()
    assert abs(frac_dropped - p) < 5 * np.sqrt(p * (1 - p) / x.size)      # 8000 Bernoulli draws
    dout = np.random.default_rng(13).standard_normal(x.shape)
    dx, grads = layer.backward(dout, cache)
    assert grads == {}
    np.testing.assert_allclose(dx, np.where(kept, dout / (1 - p), 0.0), rtol=1e-15)


def test_dropout_keeps_a_unit_whose_draw_equals_p():
    # The documented mask is uniform(key, k) >= p: a draw exactly at p is kept.
    layer = built(Dropout(0.5), (64,), seed=11)
    draws = uniform(np, layer.key, 0, (1, 64), np.float64)
    p = float(np.median(draws[0, :63]))          # 63 distinct values: the median is one of them
    layer.p = p
    out, mask = layer.forward(np.ones((1, 64)), train=True)
    np.testing.assert_array_equal(mask, np.where(draws >= p, 1.0 / (1.0 - p), 0.0))
    assert out[draws == p].tolist() == [1.0 / (1.0 - p)]


def test_dropout_gradcheck_train_mode():
    layer = built(Dropout(0.4), (3, 4, 2), seed=14)
    x = np.random.default_rng(15).standard_normal((3, 3, 4, 2))
    assert_gradcheck(layer, x, train=True, max_entries=None)


def test_dropout_eval_is_identity():
    layer = built(Dropout(0.5), (10,))
    x = np.random.default_rng(16).standard_normal((3, 10))
    out, cache = layer.forward(x, train=False)
    np.testing.assert_array_equal(out, x)
    dx, _ = layer.backward(np.ones_like(x), cache)
    np.testing.assert_array_equal(dx, 1.0)


def test_dropout_p0_is_identity_in_train_mode():
    layer = built(Dropout(0.0), (10,))
    x = np.random.default_rng(17).standard_normal((3, 10))
    np.testing.assert_array_equal(layer.forward(x, train=True)[0], x)


def test_dropout_inverted_scaling_preserves_expectation():
    p = 0.5
    layer = built(Dropout(p), (100_000,), seed=18)
    x = np.full((1, 100_000), 3.0)
    out, _ = layer.forward(x, train=True)
    # each output is 0 or 6 with equal odds: mean 3, std 3; std of the mean = 3/sqrt(1e5) ~ 0.0095
    assert abs(out.mean() - 3.0) < 5 * 3.0 / np.sqrt(x.size)
    assert set(np.unique(out)) == {0.0, 6.0}


def test_dropout_masks_deterministic_per_seed_and_fresh_per_call():
    x = np.ones((2, 200))
    a, b, c = (built(Dropout(0.5), (200,), seed=s) for s in (21, 21, 22))
    a1, b1, c1 = (lyr.forward(x)[0] for lyr in (a, b, c))
    np.testing.assert_array_equal(a1, b1)
    assert not np.array_equal(a1, c1)
    a2 = a.forward(x)[0]
    assert not np.array_equal(a1, a2)          # a new mask every step
    np.testing.assert_array_equal(a2, b.forward(x)[0])


def test_dropout_float32_mask_dtype():
    layer = built(Dropout(0.5), (20,), dtype=np.float32)
    out, mask = layer.forward(np.ones((2, 20), dtype=np.float32))
    assert out.dtype == np.float32 and mask.dtype == np.float32


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_bad_p(p):
    with pytest.raises(SpecError, match=r"p must lie in \[0.0, 1.0\)"):
        Dropout(p)


# --------------------------------------------------------------------------- BatchNorm2D

def _bn(c=3, momentum=0.1, eps=1e-5, seed=19, shape=(4, 5)):
    layer = built(BatchNorm2D(momentum, eps), (*shape, c))
    rng = np.random.default_rng(seed)
    layer.parameters["weight"][...] = rng.uniform(0.5, 1.5, c)
    layer.parameters["bias"][...] = rng.standard_normal(c)
    return layer, rng


def test_batchnorm_train_gradcheck():
    layer, rng = _bn()
    x = rng.standard_normal((3, 4, 5, 3)) * 2 + 1
    report = assert_gradcheck(layer, x, train=True, expect={"weight", "bias"}, max_entries=None)
    assert set(report) == {"input", "weight", "bias"}


def test_batchnorm_train_forward_normalizes():
    layer, rng = _bn()
    x = rng.standard_normal((3, 4, 5, 3)) * 3 - 2
    out, _ = layer.forward(x, train=True)
    g, b = layer.parameters["weight"], layer.parameters["bias"]
    xhat = (out - b) / g
    np.testing.assert_allclose(xhat.mean(axis=(0, 1, 2)), 0.0, atol=1e-12)
    np.testing.assert_allclose((xhat ** 2).mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2)) / (x.var(axis=(0, 1, 2)) + 1e-5),
                               rtol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, 0.25])
def test_batchnorm_running_stats_update_by_hand(momentum):
    layer, rng = _bn(c=2, momentum=momentum)
    rm0, rv0 = np.array([0.5, -1.0]), np.array([2.0, 0.5])
    layer.state["running_mean"][...] = rm0
    layer.state["running_var"][...] = rv0
    x = rng.standard_normal((3, 4, 5, 2)) * [1.0, 3.0] + [2.0, -1.0]
    layer.forward(x, train=True)
    m = 3 * 4 * 5
    for c in range(2):
        vals = x[..., c].ravel()
        mean = sum(vals) / m
        unbiased = sum((v - mean) ** 2 for v in vals) / (m - 1)
        assert layer.state["running_mean"][c] == pytest.approx((1 - momentum) * rm0[c] + momentum * mean, rel=1e-13)
        assert layer.state["running_var"][c] == pytest.approx((1 - momentum) * rv0[c] + momentum * unbiased, rel=1e-13)
    # evaluation mode leaves them alone
    before = {k: v.copy() for k, v in layer.state.items()}
    layer.forward(x, train=False)
    for k, v in layer.state.items():
        np.testing.assert_array_equal(v, before[k])


def test_batchnorm_eval_uses_running_stats():
    layer, rng = _bn(c=2, eps=1e-3)
    rm, rv = np.array([1.5, -0.5]), np.array([4.0, 0.25])
    layer.state["running_mean"][...] = rm
    layer.state["running_var"][...] = rv
    x = rng.standard_normal((2, 4, 5, 2))
    out, cache = layer.forward(x, train=False)
    g, b = layer.parameters["weight"], layer.parameters["bias"]
    np.testing.assert_allclose(out, (x - rm) / np.sqrt(rv + 1e-3) * g + b, rtol=1e-13)
    # batch statistics do not enter: one sample gives the same result as in the batch
    np.testing.assert_allclose(layer.forward(x[:1], train=False)[0], out[:1], rtol=1e-14)
    with pytest.raises(ShapeError, match="evaluation-mode"):
        layer.backward(np.ones_like(out), cache)


def test_batchnorm_backward_keeps_float32_over_65536_values_per_channel():
    """dx came back float64 under numpy < 2 (pyproject allows 1.24) once a channel held 65,536
    values or more (here 84 images of 28x28): float32 / a Python int that large promoted to
    float64, and the rest of the backward pass ran in float64 at twice the memory."""
    layer = built(BatchNorm2D(), (28, 28, 1), dtype=np.float32)
    x = np.random.default_rng(3).standard_normal((84, 28, 28, 1)).astype(np.float32)
    out, cache = layer.forward(x, train=True)
    dx, grads = layer.backward(np.ones_like(out), cache)
    assert dx.dtype == np.float32 and {g.dtype for g in grads.values()} == {np.dtype(np.float32)}


def test_batchnorm_refuses_any_negative_running_variance():
    layer = BatchNorm2D()
    assert "negative variance" in layer.state_problem("running_var", np.array([1.0, -1e-3]))
    assert layer.state_problem("running_var", np.array([1.0, 0.0])) is None
    assert layer.state_problem("running_mean", np.array([-5.0])) is None


def test_batchnorm_needs_image_input():
    with pytest.raises(SpecError, match="image input"):
        built(BatchNorm2D(), (10,))


# --------------------------------------------------------------------------- Residual

def _res_block(c=3):
    return Residual([Conv2D(c, 3, padding=1, name="conv_a"), ReLU(name="act"),
                     Conv2D(c, 3, padding=1, name="conv_b")], name="res")


def test_residual_gradcheck():
    rng = np.random.default_rng(23)
    layer = built(_res_block(), (5, 6, 3))
    for k, v in layer.parameters.items():
        if k.endswith("bias"):
            v[...] = 0.1 * rng.standard_normal(v.shape)
    assert set(layer.parameters) == {"conv_a.weight", "conv_a.bias", "conv_b.weight", "conv_b.bias"}
    x = rng.standard_normal((2, 5, 6, 3))
    assert_gradcheck(layer, x, max_entries=None)


def test_residual_backward_without_dx_still_runs_its_inner_chain():
    # As a model's first layer it is asked for no dx, but its inner layers need theirs.
    rng = np.random.default_rng(24)
    layer = built(_res_block(), (5, 6, 3))
    x, dout = rng.standard_normal((2, 5, 6, 3)), rng.standard_normal((2, 5, 6, 3))
    _, cache = layer.forward(x)
    _, grads = layer.backward(dout, cache, need_dx=True)
    _, grads_no_dx = layer.backward(dout, cache, need_dx=False)
    assert grads_no_dx.keys() == grads.keys()
    for k in grads:
        np.testing.assert_array_equal(grads_no_dx[k], grads[k])


def test_residual_forward_is_x_plus_inner():
    rng = np.random.default_rng(24)
    layer = built(_res_block(), (4, 4, 3))
    x = rng.standard_normal((2, 4, 4, 3))
    out, _ = layer.forward(x)
    h = x
    for inner in layer.layers:
        h, _ = inner.forward(h)
    np.testing.assert_allclose(out, x + h, rtol=1e-14)
    # parameters are the inner layers' own arrays
    assert layer.parameters["conv_a.weight"] is layer.layers[0].parameters["weight"]


def test_residual_with_batchnorm_exposes_state():
    block = Residual([Conv2D(2, 3, padding=1, name="c"), BatchNorm2D(name="bn")], name="r")
    layer = built(block, (4, 4, 2))
    assert set(layer.state) == {"bn.running_mean", "bn.running_var"}
    x = np.random.default_rng(25).standard_normal((3, 4, 4, 2))
    report = gradcheck_layer(layer, x, max_entries=None)
    # BatchNorm subtracts the per-channel mean, so a bias right before it has an
    # exactly zero gradient: the relative error of two ~0 numbers is noise.
    del report["c.bias"]
    assert max(report.values()) < TOL, report
    out, cache = layer.forward(x)
    _, grads = layer.backward(np.random.default_rng(26).standard_normal(out.shape), cache)
    assert np.max(np.abs(grads["c.bias"])) < 1e-12


@pytest.mark.parametrize("inner", [
    [Conv2D(4, 3, padding=1)],                # changes the channels
    [Conv2D(3, 3)],                           # shrinks H and W
    [MaxPool2D(2)],
])
def test_residual_shape_change_raises(inner):
    with pytest.raises(SpecError, match="must keep the shape"):
        built(Residual(inner, name="bad"), (6, 6, 3))


@pytest.mark.parametrize("inner, message", [
    # Built directly, not from a spec: a string was iterated letter by letter when built
    # (AttributeError: 'str' object has no attribute 'build'), an empty list built a block
    # that was the identity, and two inner layers of one name shared one parameter key.
    ("relu", "layers must be a non-empty list of layers, got 'relu'"),
    (["relu"], r"layers must be a non-empty list of layers, got \['relu'\]"),
    ([], r"layers must be a non-empty list of layers, got \[\]"),
    ([Conv2D(3, 3, padding=1, name="c"), Conv2D(3, 3, padding=1, name="c")], r"duplicate layer names \['c'\]"),
])
def test_residual_refuses_what_is_not_a_list_of_distinct_layers(inner, message):
    with pytest.raises(SpecError, match=f"residual bad: {message}"):
        Residual(inner, name="bad")


# --------------------------------------------------------------------------- im2col / col2im

IM2COL_CASES = [
    # N, Hp, Wp, C, kh, kw, sh, sw
    (2, 5, 5, 1, 3, 3, 1, 1),
    (2, 7, 9, 3, 3, 2, 2, 1),
    (1, 8, 6, 2, 2, 2, 2, 2),
    (3, 9, 7, 2, 3, 3, 2, 3),
    (2, 6, 7, 2, 1, 1, 2, 2),       # stride > kernel
]


def naive_im2col(x, kh, kw, sh, sw):
    n, hp, wp, c = x.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    cols = np.zeros((n * ho * wo, kh * kw * c))
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                for a in range(kh):
                    for e in range(kw):
                        for ch in range(c):
                            cols[(b * ho + i) * wo + j, (a * kw + e) * c + ch] = x[b, i * sh + a, j * sw + e, ch]
    return cols


@pytest.mark.parametrize("n,hp,wp,c,kh,kw,sh,sw", IM2COL_CASES)
def test_im2col_matches_naive_loop(n, hp, wp, c, kh, kw, sh, sw):
    x = np.random.default_rng(26).standard_normal((n, hp, wp, c))
    np.testing.assert_array_equal(im2col(x, kh, kw, sh, sw), naive_im2col(x, kh, kw, sh, sw))
    # a non-contiguous view gives the same result
    x_t = np.ascontiguousarray(x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(im2col(x_t, kh, kw, sh, sw), naive_im2col(x, kh, kw, sh, sw))


@pytest.mark.parametrize("n,hp,wp,c,kh,kw,sh,sw", IM2COL_CASES)
def test_col2im_is_adjoint_of_im2col(n, hp, wp, c, kh, kw, sh, sw):
    rng = np.random.default_rng(27)
    x = rng.standard_normal((n, hp, wp, c))
    cols = im2col(x, kh, kw, sh, sw)
    d = rng.standard_normal(cols.shape)
    lhs = np.sum(cols * d)
    back = col2im(d, x.shape, kh, kw, sh, sw)
    assert back.shape == x.shape
    rhs = np.sum(x * back)
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("n,hp,wp,c,kh,kw,sh,sw", IM2COL_CASES)
def test_col2im_gemm_equals_col2im_of_product(n, hp, wp, c, kh, kw, sh, sw):
    rng = np.random.default_rng(28)
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    o = 4
    d = rng.standard_normal((n * ho * wo, o))
    wmat = rng.standard_normal((kh * kw * c, o))
    np.testing.assert_allclose(col2im_gemm(d, wmat, (n, hp, wp, c), kh, kw, sh, sw),
                               col2im(d @ wmat.T, (n, hp, wp, c), kh, kw, sh, sw), rtol=1e-12, atol=1e-12)


STRIDE1_CASES = [   # n, h, w, c_in, c_out, kh, kw, ph, pw
    (2, 6, 5, 3, 4, 3, 3, 1, 1),       # "same"
    (2, 6, 7, 2, 3, 3, 3, 0, 0),       # "valid": no kernel row sees every input row
    (1, 5, 6, 2, 2, 3, 2, 2, 0),       # padding beyond the kernel: more outputs than inputs
    (2, 4, 7, 3, 2, 2, 3, 1, 2),
    (1, 5, 4, 2, 3, 1, 1, 1, 1),       # 1x1 kernel with padding
    (2, 7, 5, 2, 2, 5, 3, 2, 1),
]


@pytest.mark.parametrize("n,h,w,c,o,kh,kw,ph,pw", STRIDE1_CASES)
def test_conv_input_grad_equals_col2im_of_product(n, h, w, c, o, kh, kw, ph, pw):
    """The row-shift input gradient of a stride-1 conv = col2im of dout @ W^T, unpadded;
    window-major dout (for a 2x1 pool's windows) gives the same."""
    rng = np.random.default_rng(29)
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    weight = rng.standard_normal((o, c, kh, kw))
    dout = rng.standard_normal((n, ho, wo, o))
    wmat = weight.transpose(2, 3, 1, 0).reshape(-1, o)
    expected = col2im(dout.reshape(-1, o) @ wmat.T, (n, h + 2 * ph, w + 2 * pw, c), kh, kw, 1, 1)
    expected = expected[:, ph:ph + h, pw:pw + w]
    got = conv_input_grad(dout, weight, (h, w), (ph, pw))
    assert got.shape == (n, h, w, c) and got.flags.c_contiguous
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    if ho % 2 == 0:
        window_major = dout.reshape(n, ho // 2, 2, wo, 1, o).transpose(2, 4, 0, 1, 3, 5).reshape(2, n, ho // 2, wo, o)
        np.testing.assert_array_equal(conv_input_grad(window_major, weight, (h, w), (ph, pw), (2, 1)), got)


@pytest.mark.parametrize("gh,gw", [(2, 2), (3, 1), (1, 2)])
def test_im2col_window_major_rows(gh, gw):
    """pool_windows reorders im2col's rows window-major: (a, b, n, ho', wo'), nothing else."""
    rng = np.random.default_rng(30)
    x = rng.standard_normal((2, 8, 6, 3))                   # 3x3 kernel, stride 1: 6 x 4 outputs
    plain = im2col(x, 3, 3, 1, 1).reshape(2, 6 // gh, gh, 4 // gw, gw, 27)
    expected = plain.transpose(2, 4, 0, 1, 3, 5).reshape(-1, 27)
    np.testing.assert_array_equal(im2col(x, 3, 3, 1, 1, (gh, gw)), expected)


def _recorded_matmul_shapes(monkeypatch) -> list:
    """The (left, right) operand shapes of every np.matmul from now on: which blocks a product ran as."""
    matmul, shapes = np.matmul, []
    monkeypatch.setattr(np, "matmul", lambda x, y, **kw: shapes.append((x.shape, y.shape)) or matmul(x, y, **kw))
    return shapes


@pytest.fixture
def small_gemm_blocks(monkeypatch):
    """The blocked products on whatever BLAS runs the tests, in blocks of at most 600 M*N*K
    (a few rows each, some left over), so that placing the blocks is what gets checked."""
    monkeypatch.setattr(im2col_module, "openblas_core", lambda: "SkylakeX")
    monkeypatch.setattr(im2col_module, "UNPACKED_GEMM_MAX_MNK", 600)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matmul_row_blocks_equals_the_product(small_gemm_blocks, dtype):
    """Blocks of rows, a transposed (conv1's columns) or a plain left operand, a transposed (a dense
    layer's dout.T) or a plain right one, with rows left over: the product's values in the product's places."""
    rng = np.random.default_rng(41)
    a, b = rng.standard_normal((97, 10)).astype(dtype), rng.standard_normal((10, 8)).astype(dtype)
    for left, right in ((a, b), (np.ascontiguousarray(a.T).T, b), (a, np.ascontiguousarray(b.T).T)):
        got = matmul_row_blocks(left, right)               # 97 rows: 12 blocks of 7 (600 // 80), 13 left over
        assert got.shape == (97, 8) and got.dtype == dtype
        np.testing.assert_allclose(got, a @ b, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matmul_inner_blocks_equals_the_product(small_gemm_blocks, dtype, monkeypatch):
    """Blocks of the summed axis (conv1's weight gradient), some left over: the product, its
    partial products taken MAX_SUMMED_BLOCKS blocks at a time (a first layer of 2048 channels
    would otherwise hold hundreds at once)."""
    rng = np.random.default_rng(42)
    a, b = rng.standard_normal((10, 1003)).astype(dtype), rng.standard_normal((1003, 6)).astype(dtype)
    shapes = _recorded_matmul_shapes(monkeypatch)
    got = matmul_inner_blocks(a, b)                          # 100 blocks of 10 (600 // 60), 3 left over
    assert shapes == [((16, 10, 10), (16, 10, 6))] * 6 + [((4, 10, 10), (4, 10, 6))]
    assert got.shape == (10, 6) and got.dtype == dtype
    np.testing.assert_allclose(got, a @ b, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("product, plain, a_shape, b_shape, blocks", [
    # blocks of rows and of 16 columns (conv2's weight gradient): 600 // 2 // (3 * 16) = 6 rows a
    # block at most, so 16 blocks of 5, 11 rows left over
    (matmul_transposed_blocks, lambda a, b: a.T @ b, (91, 3), (91, 32), [((16, 3, 5), (2, 16, 5, 16))]),
    # blocks of K and of 64 columns (a dense layer's forward): 600 // (2 * 64) = 4 rows of K a block
    # at most, so 11 blocks of 3, 10 rows left over
    (matmul_column_blocks, lambda a, b: a @ b, (2, 43), (43, 128), [((11, 2, 3), (2, 11, 3, 64))]),
], ids=["transposed", "column"])
def test_summed_blocks_equal_the_product(small_gemm_blocks, dtype, monkeypatch, product, plain, a_shape, b_shape,
                                         blocks):
    """A product taken as blocks of K summed, rows of K left over: the product, in the blocks planned."""
    rng = np.random.default_rng(44)
    a, b = rng.standard_normal(a_shape).astype(dtype), rng.standard_normal(b_shape).astype(dtype)
    want = plain(a, b)
    shapes = _recorded_matmul_shapes(monkeypatch)
    got = product(a, b)
    assert shapes == blocks
    assert got.shape == want.shape and got.dtype == dtype and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


def test_matmul_transposed_blocks_with_columns_not_a_multiple_of_16_is_the_plain_product(small_gemm_blocks):
    """A width the 16-column blocks do not divide (the light model's conv2: 72) runs whole."""
    rng = np.random.default_rng(45)
    a, b = rng.standard_normal((97, 3)).astype(np.float32), rng.standard_normal((97, 72)).astype(np.float32)
    np.testing.assert_array_equal(matmul_transposed_blocks(a, b), a.T @ b)


def test_matmul_transposed_blocks_needing_more_than_max_summed_blocks_is_the_plain_product(small_gemm_blocks,
                                                                                           monkeypatch):
    """17 blocks of K (more than MAX_SUMMED_BLOCKS): the partial products would take 17 times the
    output's memory (a wide conv2d's weight gradient: hundreds), so the product runs whole."""
    rng = np.random.default_rng(48)
    a, b = rng.standard_normal((97, 3)).astype(np.float32), rng.standard_normal((97, 32)).astype(np.float32)
    shapes = _recorded_matmul_shapes(monkeypatch)
    np.testing.assert_array_equal(matmul_transposed_blocks(a, b), a.T @ b)
    assert shapes == []


def test_summed_blocks_within_one_block_of_k_are_the_plain_product(small_gemm_blocks, monkeypatch):
    """K that fits in one block has nothing to sum: the plain product, not a batched matmul of one
    block summed over an axis of length 1 (a copy of the output for nothing)."""
    rng = np.random.default_rng(49)
    a, b = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal((5, 32)).astype(np.float32)
    short, wide = rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((4, 64)).astype(np.float32)
    shapes = _recorded_matmul_shapes(monkeypatch)
    np.testing.assert_array_equal(matmul_transposed_blocks(a, b), a.T @ b)       # 5 rows of K, 6 a block
    np.testing.assert_array_equal(matmul_column_blocks(short, wide), short @ wide)   # 4 rows of K, 4 a block
    assert shapes == []


def _laid_out(array, layout: str):
    """``array``'s values C-ordered, Fortran-ordered, or as a view of every other row of a larger array."""
    if layout == "F":
        return np.asfortranarray(array)
    if layout == "strided":
        spaced = np.zeros((2 * array.shape[0],) + array.shape[1:], dtype=array.dtype)
        spaced[::2] = array
        return spaced[::2]
    return array


BLOCKED_PRODUCTS = {                                        # name -> (product, the plain product it stands for)
    "row": (matmul_row_blocks, lambda a, b: a @ b),
    "inner": (matmul_inner_blocks, lambda a, b: a @ b),
    "column": (matmul_column_blocks, lambda a, b: a @ b),
    "transposed": (matmul_transposed_blocks, lambda a, b: a.T @ b),
}


@settings(deadline=None, derandomize=True, database=None, max_examples=600)
@given(name=st.sampled_from(sorted(BLOCKED_PRODUCTS)), long=st.integers(1, 150), short=st.integers(1, 12),
       n=st.one_of(st.sampled_from([16, 48, 64, 128, 192]), st.integers(1, 140)), per_block=st.integers(0, 40),
       slack=st.floats(0, 0.99), dtype=st.sampled_from([np.float32, np.float64]),
       layouts=st.tuples(*[st.sampled_from(["C", "F", "strided"])] * 2), seed=st.integers(0, 2**32 - 1))
def test_blocked_products_equal_the_plain_product_for_any_shape(name, long, short, n, per_block, slack, dtype,
                                                                layouts, seed):
    """Every blocked product, for any shapes, bound, dtype and memory layout (N a multiple of the
    column blocks or not, the blocked axis within one block or not, rows left over or not): the plain
    product's shape, dtype and values, and no partial products beyond MAX_SUMMED_BLOCKS times the output."""
    product, plain = BLOCKED_PRODUCTS[name]
    rng = np.random.default_rng(seed)
    # a bound of about per_block rows of the split axis a block (a bound drawn alone mostly gives one
    # block or hundreds): M*N*K of one row of it
    row_cost = {"row": short * n, "inner": short * n, "column": short * im2col_module.COLUMN_BLOCK_COLUMNS,
                "transposed": 2 * short * im2col_module.TRANSPOSED_BLOCK_COLUMNS}[name]
    bound = int((per_block + slack) * row_cost)
    # the long axis is the one each product splits: a's rows (row, transposed) or the summed K (inner, column)
    a_shape, b_shape = {"row": ((long, short), (short, n)), "transposed": ((long, short), (long, n)),
                        "inner": ((short, long), (long, n)), "column": ((short, long), (long, n))}[name]
    a = _laid_out(rng.standard_normal(a_shape).astype(dtype), layouts[0])
    b = _laid_out(rng.standard_normal(b_shape).astype(dtype), layouts[1])
    want = plain(a, b)
    matmul, outputs = np.matmul, []

    def recording_matmul(x, y, **kw):
        out = matmul(x, y, **kw)
        outputs.append(out.size)
        return out
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(im2col_module, "openblas_core", lambda: "SkylakeX")
        patch.setattr(im2col_module, "UNPACKED_GEMM_MAX_MNK", bound)
        patch.setattr(np, "matmul", recording_matmul)
        got = product(a, b)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-4 if dtype == np.float32 else 1e-12)
    assert all(size <= im2col_module.MAX_SUMMED_BLOCKS * want.size for size in outputs), outputs


def test_matmul_column_blocks_runs_whole_for_odd_widths_and_too_many_blocks(small_gemm_blocks):
    """96 columns (not a multiple of 64), or 25 blocks of K (more than MAX_SUMMED_BLOCKS, whose
    partial products would take 25 times the output's memory): the plain product."""
    rng = np.random.default_rng(47)
    a = rng.standard_normal((2, 97)).astype(np.float32)
    for b in (rng.standard_normal((97, 96)).astype(np.float32), rng.standard_normal((97, 128)).astype(np.float32)):
        np.testing.assert_array_equal(matmul_column_blocks(a, b), a @ b)


def test_blocked_products_are_the_plain_product_off_skylakex(monkeypatch):
    """On OpenBLAS's other kernels, where blocks measured slower, the plain product runs."""
    monkeypatch.setattr(im2col_module, "openblas_core", lambda: "Haswell")
    monkeypatch.setattr(im2col_module, "UNPACKED_GEMM_MAX_MNK", 600)
    rng = np.random.default_rng(43)
    a, b = rng.standard_normal((97, 10)).astype(np.float32), rng.standard_normal((10, 8)).astype(np.float32)
    np.testing.assert_array_equal(matmul_row_blocks(a, b), a @ b)
    np.testing.assert_array_equal(matmul_inner_blocks(b.T, a.T), b.T @ a.T)
    c = rng.standard_normal((97, 16)).astype(np.float32)
    np.testing.assert_array_equal(matmul_transposed_blocks(a, c), a.T @ c)
    short, wide = rng.standard_normal((2, 43)).astype(np.float32), rng.standard_normal((43, 128)).astype(np.float32)
    np.testing.assert_array_equal(matmul_column_blocks(short, wide), short @ wide)


def test_openblas_core_without_threadpoolctl_is_none_and_the_products_stay_whole(monkeypatch):
    """threadpoolctl is optional: without it the kernels are unknown, and the products run whole."""
    import sys
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)      # import raises ImportError
    openblas_core.cache_clear()
    try:
        assert openblas_core() is None
        a, b = np.ones((5000, 10), np.float32), np.ones((10, 32), np.float32)
        assert not im2col_module._blocks_pay(np)
        np.testing.assert_array_equal(matmul_row_blocks(a, b), a @ b)
    finally:
        openblas_core.cache_clear()


def test_openblas_core_names_numpys_kernels_when_another_openblas_is_loaded(monkeypatch):
    """threadpoolctl lists every OpenBLAS a process loaded: numpy's kernels are the ones its products run on."""
    import sys
    import types
    fake = types.ModuleType("threadpoolctl")
    fake.threadpool_info = lambda: [
        {"internal_api": "openblas", "filepath": "/x/site-packages/other.libs/libopenblas.so", "architecture": "Haswell"},
        {"internal_api": "mkl", "filepath": "/x/libmkl_rt.so"},
        {"internal_api": "openblas", "filepath": "/x/site-packages/numpy.libs/libscipy_openblas64_.so",
         "architecture": "SkylakeX"}]
    monkeypatch.setitem(sys.modules, "threadpoolctl", fake)
    openblas_core.cache_clear()
    try:
        assert openblas_core() == "SkylakeX"
    finally:
        openblas_core.cache_clear()


def test_col2im_counts_window_coverage():
    """col2im of all-ones columns = how many windows cover each pixel."""
    ones = np.ones((4, 9))                              # 1 sample, 2x2 outputs, 3x3 kernel, 1 channel
    cover = col2im(ones, (1, 5, 5, 1), 3, 3, 2, 2)[0, :, :, 0]
    np.testing.assert_array_equal(cover, [[1, 1, 2, 1, 1],
                                          [1, 1, 2, 1, 1],
                                          [2, 2, 4, 2, 2],
                                          [1, 1, 2, 1, 1],
                                          [1, 1, 2, 1, 1]])


def test_pad_and_output_size():
    x = np.arange(6.0).reshape(1, 2, 3, 1)
    p = pad_nhwc(x, 1, 2)
    assert p.shape == (1, 4, 7, 1)
    np.testing.assert_array_equal(p[0, 1:3, 2:5, 0], x[0, :, :, 0])
    assert p.sum() == x.sum()
    assert pad_nhwc(x, 0, 0) is x
    assert conv_output_size(28, 3, 1, 1) == 28
    assert conv_output_size(7, 3, 2, 1) == 4
    assert conv_output_size(8, 3, 3, 0) == 2
