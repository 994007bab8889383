"""Whole models: presets, specs and their errors, forward/backward, gradient checks.

Gradient checks run in float64 (central differences, eps = 1e-6); see
test_layers.py for why 1e-6 is a safe bound for a correct backward.
"""
import contextlib
import copy
import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from cnn_core import PRESETS, build_model, softmax_cross_entropy
from cnn_core import im2col as im2col_module
from cnn_core import layers as layers_module
from cnn_core import model as model_module
from cnn_core.config import nests_within
from cnn_core.errors import ConfigError, ShapeError, SpecError
from cnn_core.gradcheck import gradcheck_model
from cnn_core.im2col import input_grad_matrix
from cnn_core.layers import Conv2D, Dropout, MaxPool2D, ReLU
from cnn_core.model import execution_order
from cnn_core.reference import ReferenceModel
from cnn_core.rng import uniform
from pscnn import protocol as P

SEED_SHAPES = {
    "conv1.weight": (32, 1, 3, 3), "conv1.bias": (32,),
    "conv2.weight": (64, 32, 3, 3), "conv2.bias": (64,),
    "fc1.weight": (3136, 128), "fc1.bias": (128,),
    "fc2.weight": (128, 10), "fc2.bias": (10,),
}
LIGHT_SHAPES = {
    "conv1.weight": (8, 1, 3, 3), "conv1.bias": (8,),
    "conv2.weight": (16, 8, 3, 3), "conv2.bias": (16,),
    "fc1.weight": (784, 32), "fc1.bias": (32,),
    "fc2.weight": (32, 10), "fc2.bias": (10,),
}

# Every layer type, conv stride 2, a residual block and overlapping pooling, on a small input.
SMALL_SPEC = {
    "input_shape": [2, 9, 8],
    "layers": [
        {"type": "conv2d", "name": "c1", "out_channels": 4, "kernel": 3, "stride": 2, "padding": 1},  # (5,4,4)
        {"type": "batchnorm2d", "name": "bn1"},
        {"type": "leaky_relu", "alpha": 0.1},
        {"type": "residual", "name": "res", "layers": [
            {"type": "conv2d", "name": "ca", "out_channels": 4, "kernel": 3, "padding": 1},
            {"type": "elu"},
            {"type": "conv2d", "name": "cb", "out_channels": 4, "kernel": [3, 1], "padding": [1, 0]},
        ]},
        {"type": "silu"},
        {"type": "conv2d", "name": "c2", "out_channels": 3, "kernel": [2, 3], "padding": 1},             # (6,4,3)
        {"type": "relu"},
        {"type": "maxpool2d", "kernel": 3, "stride": 2},                                                 # (2,1,3)
        {"type": "flatten"},
        {"type": "dropout", "p": 0.3},
        {"type": "dense", "name": "fc", "units": 5},
    ],
}


def with_dropout(spec, p):
    spec = copy.deepcopy(PRESETS[spec] if isinstance(spec, str) else spec)
    for layer in spec["layers"]:
        if layer["type"] == "dropout":
            layer["p"] = p
    return spec


def batch(n, shape=(1, 28, 28), classes=10, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *shape)).astype(dtype), rng.integers(0, classes, n)


# --------------------------------------------------------------------------- presets

def test_seed_preset_names_shapes_and_count():
    model = build_model("seed", seed=0)
    assert {k: tuple(v.shape) for k, v in model.params.items()} == SEED_SHAPES
    assert list(model.params) == list(SEED_SHAPES)            # layer order
    assert model.num_parameters() == 421_642
    assert 32 * 9 + 32 + 64 * 32 * 9 + 64 + 3136 * 128 + 128 + 128 * 10 + 10 == 421_642
    assert all(v.dtype == np.float32 for v in model.params.values())
    assert model.state == {} and model.num_classes == 10
    assert [lyr.type_name for lyr in model.layers] == [
        "conv2d", "relu", "maxpool2d", "conv2d", "relu", "maxpool2d", "flatten", "dense", "relu", "dropout", "dense"]
    assert model.layers[9].p == 0.25
    assert "421,642" in model.summary()


def test_summary_columns_fit_long_names_and_shapes():
    # Fixed widths: a 12-character name ran into its type ("leaky_relu12leaky_relu"), a long shape into the count.
    spec = {"input_shape": [1, 1000, 1000], "layers": [
        {"type": "leaky_relu", "name": "a_rather_long_layer_name"}, {"type": "flatten"}, {"type": "dense", "units": 2}]}
    lines = build_model(spec).summary().splitlines()
    assert lines[1].split()[:2] == ["a_rather_long_layer_name", "leaky_relu"]
    assert lines[1].split()[-1] == "0" and lines[-1].split() == ["total", "2,000,002"]
    assert len({len(line) for line in lines}) == 1          # the counts right-aligned in one column


def test_light_preset_names_shapes():
    model = build_model("light", seed=0, dtype="float64")
    assert {k: tuple(v.shape) for k, v in model.params.items()} == LIGHT_SHAPES
    assert model.num_parameters() == 80 + 1168 + 25_120 + 330
    assert all(v.dtype == np.float64 for v in model.params.values())


def test_presets_are_not_aliased():
    model = build_model("light")
    model.spec["layers"][0]["out_channels"] = 99
    assert PRESETS["light"]["layers"][0]["out_channels"] == 8
    assert build_model("light").params["conv1.weight"].shape == (8, 1, 3, 3)


def test_he_init_scale_and_zero_biases():
    model = build_model("seed", seed=3, dtype="float64")
    for name, fan_in in [("conv2.weight", 32 * 9), ("fc1.weight", 3136)]:
        assert model.params[name].std() == pytest.approx(math.sqrt(2 / fan_in), rel=0.02)
    for name in ("conv1.bias", "conv2.bias", "fc1.bias", "fc2.bias"):
        assert np.all(model.params[name] == 0)


# --------------------------------------------------------------------------- forward / backward

@pytest.mark.parametrize("train", [True, False])
def test_forward_shapes_and_dtype(train):
    model = build_model("light", seed=0)
    x, _ = batch(5)
    out = model.forward(x, train=train)
    assert out.shape == (5, 10) and out.dtype == np.float32
    assert np.all(np.isfinite(out))


def test_forward_casts_float64_input_to_model_dtype():
    model = build_model("light", seed=0)
    x, _ = batch(3)
    out32 = model.forward(x, train=False)
    out64in = model.forward(x.astype(np.float64), train=False)
    assert out64in.dtype == np.float32
    np.testing.assert_array_equal(out32, out64in)


def test_backward_keys_shapes_and_leaves_params_alone():
    model = build_model("light", seed=0)
    before = {k: v.copy() for k, v in model.params.items()}
    x, y = batch(6)
    loss, d = softmax_cross_entropy(model.forward(x, train=True), y)
    grads = model.backward(d)
    assert list(grads) == list(model.params)
    for k, g in grads.items():
        assert g.shape == model.params[k].shape and g.dtype == np.float32, k
        assert np.all(np.isfinite(g)) and np.any(g != 0), k
        np.testing.assert_array_equal(model.params[k], before[k])
    assert loss == pytest.approx(math.log(10), rel=0.5)


def test_backward_needs_a_training_forward():
    model = build_model("light", seed=0)
    x, y = batch(2)
    with pytest.raises(ShapeError, match="forward"):
        model.backward(np.zeros((2, 10), dtype=np.float32))
    model.forward(x, train=False)
    with pytest.raises(ShapeError, match="forward"):
        model.backward(np.zeros((2, 10), dtype=np.float32))
    _, d = softmax_cross_entropy(model.forward(x, train=True), y)
    model.backward(d)
    with pytest.raises(ShapeError):      # caches are released after one backward
        model.backward(d)


def test_in_place_param_updates_change_the_model():
    model = build_model("light", seed=0, dtype="float64")
    x, _ = batch(4, dtype=np.float64)
    out0 = model.forward(x, train=False)
    model.params["fc2.bias"][...] += 1.5
    np.testing.assert_allclose(model.forward(x, train=False), out0 + 1.5, rtol=1e-13, atol=1e-13)
    model.params["conv1.weight"] *= 0.5           # also in place
    out2 = model.forward(x, train=False)
    assert np.max(np.abs(out2 - out0 - 1.5)) > 1e-3
    assert model.params["conv1.weight"] is model.layers[0].parameters["weight"]


def test_load_arrays_round_trip_and_errors():
    a, b = build_model("light", seed=1), build_model("light", seed=2)
    x, _ = batch(3)
    assert not np.array_equal(a.forward(x, train=False), b.forward(x, train=False))
    b.load_arrays({k: v.copy() for k, v in a.params.items()})
    np.testing.assert_array_equal(a.forward(x, train=False), b.forward(x, train=False))
    with pytest.raises(ShapeError, match="missing"):
        b.load_arrays({"fc2.bias": np.zeros(10)})
    bad = {k: v.copy() for k, v in a.params.items()}
    bad["fc2.bias"] = np.zeros(11)
    with pytest.raises(ShapeError, match="fc2.bias"):
        b.load_arrays(bad)


@pytest.mark.parametrize("n,chunk", [(100, 32), (64, 32), (7, 3), (5, 8), (0, 4)])
def test_evaluation_in_chunks_equals_one_pass(n, chunk, monkeypatch):
    """On the CPU an evaluation pass runs in near-equal chunks of at most CPU_CHUNK
    images; the logits are those of one pass (float64: up to the GEMMs' rounding)."""
    model = build_model(SMALL_SPEC, seed=3, dtype="float64")
    x, _ = batch(n, (2, 9, 8), 5, seed=n, dtype=np.float64)
    monkeypatch.setattr(model_module.Model, "CPU_CHUNK", 10_000)
    whole = model.forward(x, train=False)
    monkeypatch.setattr(model_module.Model, "CPU_CHUNK", chunk)
    sizes = []
    run = model._run
    monkeypatch.setattr(model, "_run", lambda h, train: sizes.append(len(h)) or run(h, train))
    np.testing.assert_allclose(model.forward(x, train=False), whole, rtol=1e-12, atol=1e-14)
    count = max(1, -(-n // chunk))
    assert len(sizes) == count and sum(sizes) == n and max(sizes) - min(sizes) <= 1
    assert model._caches is None


def test_predict_matches_argmax_in_batches():
    model = build_model("light", seed=0)
    x, _ = batch(25)
    np.testing.assert_array_equal(model.predict(x, batch_size=7), model.forward(x, train=False).argmax(axis=1))


@pytest.mark.parametrize("shape", [(2, 1, 28, 27), (2, 28, 28, 1), (1, 28, 28), (2, 3, 28, 28)])
def test_wrong_input_shape_raises(shape):
    model = build_model("light")
    with pytest.raises(ShapeError, match=r"\(N, 1, 28, 28\)"):
        model.forward(np.zeros(shape, dtype=np.float32))


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, bool])
def test_wrong_input_dtype_raises(dtype):
    model = build_model("light")
    with pytest.raises(ShapeError, match="floating point"):
        model.forward(np.zeros((2, 1, 28, 28), dtype=dtype))


def _nan_pixel(x):
    x = x.copy()
    x[3, 0, 5, 7] = np.nan
    return x


X8, Y8 = batch(8)
# What the engine's public calls refuse, each in one line naming the problem (an engine audit
# found each of these a traceback from inside NumPy, or silently wrong).
BAD_CALLS = {
    "input a list": (lambda m: m.forward(X8.tolist()), ShapeError, r"must have shape \(N, 1, 28, 28\), got a list"),
    "input with NaN": (lambda m: m.loss_and_grads(_nan_pixel(X8), Y8), ShapeError,
                       r"model input contains NaN or Inf \(in sample 3 of 8"),
    "input beyond float32": (lambda m: m.forward(np.full((2, 1, 28, 28), 1e300)), ShapeError,
                             "NaN or Inf .*beyond float32"),
    "predict batch 0": (lambda m: m.predict(X8, batch_size=0), ConfigError, "batch_size must be an int >= 1, got 0"),
    "predict batch -1": (lambda m: m.predict(X8, batch_size=-1), ConfigError, "got -1"),
    "predict batch 2.5": (lambda m: m.predict(X8, batch_size=2.5), ConfigError, "got 2.5"),
    "predict a list": (lambda m: m.predict(X8.tolist()), ShapeError, "got a list"),
    "dlogits of another K": (lambda m: (m.forward(X8), m.backward(np.zeros((8, 11), np.float32))), ShapeError,
                             r"dlogits must have the logits' shape \(8, 10\), got \(8, 11\)"),
    "dlogits 1-d": (lambda m: (m.forward(X8), m.backward(np.zeros(8, np.float32))), ShapeError, r"got \(8,\)"),
    "dlogits of ints": (lambda m: (m.forward(X8), m.backward(np.zeros((8, 10), np.int64))), ShapeError,
                        "dlogits must be floating point, got dtype int64"),
    "assign a list": (lambda m: m.assign({"fc2.bias": [0.0] * 10}), ShapeError,
                      "fc2.bias: needs a floating-point array, got list"),
    "assign ints": (lambda m: m.assign({"fc2.bias": np.zeros(10, np.int64)}), ShapeError, "got int64"),
    "assign None": (lambda m: m.assign(None), ShapeError, "Model.assign: arrays must be a dict name -> array, "
                    "got NoneType"),
    "load_arrays a list": (lambda m: m.load_arrays(list(m.params.values())), ShapeError,
                           "Model.load_arrays: arrays must be a dict name -> array, got list"),
    # Any kind but "params" loaded into the state: an empty dict "loaded" the weights of a model without state.
    "load_arrays of kind weights": (lambda m: m.load_arrays({}, kind="weights"), ConfigError,
                                    "Model.load_arrays: kind must be 'params' or 'state', got 'weights'"),
    "reseed a string": (lambda m: m.reseed("abc"), ConfigError, "reseed: seed must be an int >= 0"),
    "reseed negative": (lambda m: m.reseed(-5), ConfigError, "got -5"),
    "reseed a float in a list": (lambda m: m.reseed([1, 2.5]), ConfigError, r"got \[1, 2.5\]"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_calls_are_refused_in_one_line(case):
    call, error, needle = BAD_CALLS[case]
    model = build_model("light", seed=0)
    before = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(error, match=needle) as exc:
        call(model)
    assert "\n" not in str(exc.value)
    for k, v in model.params.items():
        np.testing.assert_array_equal(v, before[k])


def test_backward_casts_float64_dlogits_to_the_models_dtype():
    model = build_model("light", seed=0)
    logits = model.forward(X8)
    grads = model.backward(softmax_cross_entropy(logits.astype(np.float64), Y8)[1])
    assert {g.dtype for g in grads.values()} == {np.dtype(np.float32)}


@pytest.mark.parametrize("seed", ["abc", None, -1, 1.5, True])
def test_a_model_seed_must_be_a_non_negative_int(seed):
    with pytest.raises(ConfigError, match=f"model seed must be an int >= 0, got {seed!r}"):
        build_model("light", seed=seed)


def test_a_model_dtype_must_be_named():
    with pytest.raises(ConfigError, match="unsupported dtype None"):
        build_model("light", dtype=None)


@pytest.mark.parametrize("n, hw", [(0, 4), (1, 1)])
def test_batchnorm_refuses_a_training_batch_without_a_variance(n, hw):
    """An empty batch (or one value per channel) has no variance: the running statistics
    became NaN (or took a variance of 0) for good, and every later evaluation with them."""
    model = build_model({"input_shape": [1, hw, hw], "layers": [
        {"type": "conv2d", "out_channels": 2, "kernel": 1}, {"type": "batchnorm2d", "name": "bn"},
        {"type": "flatten"}, {"type": "dense", "units": 3}]})
    state = {k: v.copy() for k, v in model.state.items()}
    with pytest.raises(ShapeError, match=f"batchnorm2d bn: a training batch needs more than one value per "
                                         f"channel, got {n * hw * hw}"):
        model.loss_and_grads(np.zeros((n, 1, hw, hw), np.float32), np.zeros(n, np.int64))
    for k, v in model.state.items():
        np.testing.assert_array_equal(v, state[k])
    two = np.arange(2 * hw * hw, dtype=np.float32).reshape(2, 1, hw, hw)      # two values a channel: fine
    model.loss_and_grads(two, np.zeros(2, np.int64))
    assert all(np.isfinite(v).all() for v in model.state.values())


def test_a_batch_a_later_batchnorm_refuses_leaves_the_earlier_ones_statistics_as_they_were():
    """bn_a (4x4, 16 values a channel for one image) took the batch into its running statistics,
    then bn_b (1x1 after the pool, one value) refused it: a refused step changed the model."""
    model = build_model({"input_shape": [1, 4, 4], "layers": [
        {"type": "batchnorm2d", "name": "bn_a"}, {"type": "maxpool2d", "kernel": 4},
        {"type": "residual", "name": "res", "layers": [{"type": "batchnorm2d", "name": "bn_b"}]},
        {"type": "flatten"}, {"type": "dense", "units": 3}]})
    state = {k: v.copy() for k, v in model.state.items()}
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    for run in (lambda: model.loss_and_grads(x, np.zeros(1, np.int64)), lambda: model.forward(x, train=True)):
        with pytest.raises(ShapeError, match=r"^batchnorm2d bn_b: a training batch needs more than one value per "
                                             r"channel, got 1 \(batch 1 of 1x1\)$"):
            run()
        for k, v in model.state.items():
            np.testing.assert_array_equal(v, state[k], err_msg=k)
    model.forward(x, train=False)                                   # evaluation takes one image
    model.loss_and_grads(np.concatenate([x, x + 1]), np.zeros(2, np.int64))


@pytest.mark.parametrize("logits, needle", [
    (np.array([[0, 5, 0], [3, 0, 0]]), "logits must be floating point, got dtype int64"),
    (np.zeros((2, 0)), r"logits must be \(N, K\) with K >= 1 classes, got shape \(2, 0\)"),
    (np.zeros(2), r"got shape \(2,\)")])
def test_softmax_cross_entropy_refuses_logits_it_cannot_differentiate(logits, needle):
    with pytest.raises(ShapeError, match=needle):
        softmax_cross_entropy(logits, np.array([0, 0]))


def test_softmax_cross_entropy_takes_logits_as_a_list():
    loss, d = softmax_cross_entropy([[0.0, 5.0, 0.0], [3.0, 0.0, 0.0]], [0, 0])
    want_loss, want_d = softmax_cross_entropy(np.array([[0.0, 5.0, 0.0], [3.0, 0.0, 0.0]]), np.array([0, 0]))
    assert loss == want_loss
    np.testing.assert_array_equal(d, want_d)


# --------------------------------------------------------------------------- specs

def test_build_from_dict_and_json_equal_preset():
    ref = build_model("light", seed=5)
    for spec in (PRESETS["light"], json.dumps(PRESETS["light"]), "  " + json.dumps(PRESETS["light"], indent=2)):
        model = build_model(spec, seed=5)
        for k, v in ref.params.items():
            np.testing.assert_array_equal(model.params[k], v)


@pytest.mark.parametrize("spec", ["seed", "light", SMALL_SPEC])
def test_spec_round_trip(spec):
    a = build_model(spec, seed=7, dtype="float64")
    text = json.dumps(a.spec)                      # JSON-able
    for again in (a.spec, text):
        b = build_model(again, seed=7, dtype="float64")
        assert b.spec == a.spec
        assert list(b.params) == list(a.params) and list(b.state) == list(a.state)
        for k, v in a.params.items():
            np.testing.assert_array_equal(b.params[k], v)
    assert all("name" in entry for entry in a.spec["layers"])


def test_auto_names_and_nested_names():
    model = build_model(SMALL_SPEC, dtype="float64")
    names = [lyr.name for lyr in model.layers]
    assert names == ["c1", "bn1", "leaky_relu1", "res", "silu1", "c2", "relu1", "maxpool1", "flatten1",
                     "dropout1", "fc"]
    assert list(model.state) == ["bn1.running_mean", "bn1.running_var"]
    assert list(model.params) == ["c1.weight", "c1.bias", "bn1.weight", "bn1.bias",
                                  "res.ca.weight", "res.ca.bias", "res.cb.weight", "res.cb.bias",
                                  "c2.weight", "c2.bias", "fc.weight", "fc.bias"]
    assert model.params["res.cb.weight"].shape == (4, 4, 3, 1)


def _spec(*layers, input_shape=(1, 8, 8)):
    return {"input_shape": list(input_shape), "layers": list(layers)}


FLAT_TAIL = ({"type": "flatten"}, {"type": "dense", "units": 3})

BAD_SPECS = [
    ("nope", "unknown model preset 'nope'"),
    ("{not json", "not valid JSON"),
    ('[{"type": "relu"}]', "model spec must be a name or a dict, got list"),   # was "unknown model preset"
    (42, "preset name, dict or JSON"),
    ({"layers": [{"type": "flatten"}, {"type": "dense", "units": 2}]}, "input_shape"),
    (_spec(*FLAT_TAIL, input_shape=(1, 8)), "input_shape"),
    (_spec(*FLAT_TAIL, input_shape=(1, 0, 8)), "input_shape"),
    ({"input_shape": [1, 8, 8]}, "'layers' must be a non-empty list"),
    (_spec(), "'layers' must be a non-empty list"),
    (_spec({"type": "conv3d", "out_channels": 2}, *FLAT_TAIL), "unknown layer type 'conv3d'"),
    (_spec({"type": ["relu"]}, *FLAT_TAIL), "unknown layer type"),
    (_spec({"out_channels": 2}, *FLAT_TAIL), "must be a dict with a 'type'"),
    (_spec("relu", *FLAT_TAIL), "must be a dict with a 'type'"),
    (_spec({"type": "conv2d", "name": "big", "out_channels": 2, "kernel": 9}, *FLAT_TAIL), "big: kernel .* does not fit"),
    (_spec({"type": "maxpool2d", "kernel": 9}, *FLAT_TAIL), "does not fit"),
    (_spec({"type": "dense", "units": 3}), "add a flatten layer"),
    (_spec({"type": "conv2d", "out_channels": 2}), "last layer must output"),
    (_spec({"type": "relu", "name": "x"}, {"type": "flatten", "name": "x"}, {"type": "dense", "units": 2}),
     r"duplicate layer names \['x'\]"),
    (_spec({"type": "relu"}, {"type": "relu", "name": "relu1"}, *FLAT_TAIL), "duplicate layer names"),
    (_spec({"type": "conv2d", "out_channels": 2, "kernal": 3}, *FLAT_TAIL), "conv2d 'conv1': unknown option 'kernal'"),
    (_spec({"type": "conv2d", "out_channels": 2.5}, *FLAT_TAIL), "out_channels must be a positive int"),
    (_spec({"type": "conv2d", "out_channels": 2, "kernel": "3"}, *FLAT_TAIL), "kernel must be an int or a pair"),
    (_spec({"type": "conv2d", "out_channels": 2, "stride": 0}, *FLAT_TAIL), "stride must be >= 1"),
    (_spec({"type": "dropout", "p": 1.0}, *FLAT_TAIL), "p must lie in"),
    (_spec({"type": "dropout", "p": "half"}, *FLAT_TAIL), "dropout1: p must be a number, got 'half'"),
    (_spec({"type": "dense", "units": 0}), "units must be a positive int"),
    (_spec({"type": "batchnorm2d"}, {"type": "flatten"}, {"type": "batchnorm2d"}, {"type": "dense", "units": 2}),
     "batchnorm2: needs an image input"),
    (_spec({"type": "residual", "name": "r", "layers": [{"type": "conv2d", "out_channels": 3, "padding": 1}]},
           *FLAT_TAIL), "residual r: .*must keep the shape"),
    (_spec({"type": "residual", "layers": []}, *FLAT_TAIL), "non-empty 'layers'"),
    (_spec({"type": "residual", "layers": [{"type": "relu"}], "extra": 1}, *FLAT_TAIL),
     r"residual 'residual1': unknown option 'extra' \(options: layers\)"),
    (_spec({"type": "residual", "name": "r", "layers": [
        {"type": "conv2d", "name": "c", "out_channels": 1, "padding": 1},
        {"type": "conv2d", "name": "c", "out_channels": 1, "padding": 1}]}, *FLAT_TAIL),
     r"residual r: duplicate layer names \['c'\]"),
    (_spec({"type": "residual", "layers": [{"type": "softmax"}]}, *FLAT_TAIL), "unknown layer type 'softmax'"),
]


@pytest.mark.parametrize("spec,match", BAD_SPECS, ids=[f"bad{i}" for i in range(len(BAD_SPECS))])
def test_bad_specs_raise_one_line_spec_error(spec, match):
    with pytest.raises(SpecError, match=match) as info:
        build_model(spec)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300, message


def test_absurd_parameter_count_refused_before_allocating(monkeypatch):
    """The reviewer's 78.5G-parameter dense layer: one line naming the layer, its count and the cap."""
    import cnn_core.layers as layers_module

    def no_allocation(*args, **kwargs):
        raise AssertionError("a parameter was allocated before the size check")
    monkeypatch.setattr(layers_module, "_he_normal", no_allocation)
    spec = {"input_shape": [1, 28, 28], "layers": [{"type": "flatten"}, {"type": "dense", "units": 100_000_000}]}
    with pytest.raises(SpecError) as info:
        build_model(json.dumps(spec))
    message = str(info.value)
    assert "dense 'dense1'" in message and "78,500,000,000 parameters" in message, message
    assert f"{model_module.MAX_PARAMETERS:,}" in message and "\n" not in message


def test_parameter_cap_counts_the_whole_model(monkeypatch):
    """Layers each under the cap but together over it; counted as build_model would allocate them."""
    monkeypatch.setattr(model_module, "MAX_PARAMETERS", 1000)
    spec = _spec({"type": "conv2d", "name": "c", "out_channels": 4, "kernel": 3},     # 40, to (6, 6, 4)
                 {"type": "flatten"}, {"type": "dense", "name": "a", "units": 2},   # 145 x 2 = 290 (330)
                 {"type": "dense", "name": "b", "units": 300},                      # 3 x 300 = 900 (1,230)
                 {"type": "dense", "units": 3})                                     # 301 x 3 = 903 (2,133)
    with pytest.raises(SpecError, match=r"would have 1,230 parameters by dense 'b' \(900\), more than the 1,000"):
        build_model(spec)
    monkeypatch.setattr(model_module, "MAX_PARAMETERS", 2133)
    assert build_model(spec).num_parameters() == 2133                              # exactly at the cap: fine


def test_activations_too_big_for_memory_are_refused_before_allocating(monkeypatch):
    """40 weights, but a padding of 5000 on 28x28: a batch asked for gigabytes (a MemoryError
    traceback).  Counted per image: outputs, a conv's padded input and columns, residual insides."""
    spec = _spec({"type": "conv2d", "out_channels": 4, "kernel": 3, "padding": 5000},
                 {"type": "conv2d", "out_channels": 1, "kernel": 3, "stride": 10000}, *FLAT_TAIL,
                 input_shape=(1, 28, 28))
    with pytest.raises(SpecError, match=r"one image would take 1,809,412,431 values through the layers, "
                                        r"more than the 67,108,864 a model may take"):
        build_model(spec)
    # (8x8 + padded 10x10 + columns 8x8x9) + 192 + 3; a residual block's insides count too
    small = _spec({"type": "conv2d", "out_channels": 1, "kernel": 3, "padding": 1}, *FLAT_TAIL)
    assert model_module._image_values(build_model(small).layers, (8, 8, 1)) == 64 + 100 + 576 + 64 + 3
    block = _spec({"type": "residual", "layers": [{"type": "relu"}]}, *FLAT_TAIL)
    assert model_module._image_values(build_model(block).layers, (8, 8, 1)) == 64 + 64 + 64 + 3
    monkeypatch.setattr(model_module, "MAX_IMAGE_VALUES", 64 + 100 + 576 + 64 + 3)
    build_model(small)                                                            # exactly at the cap: fine
    monkeypatch.setattr(model_module, "MAX_IMAGE_VALUES", 64 + 100 + 576 + 64 + 2)
    with pytest.raises(SpecError, match="one image would take 807 values"):
        build_model(small)


BATCH_NORM_SPEC = _spec({"type": "conv2d", "name": "conv1", "out_channels": 16, "kernel": 3, "padding": 1},
                        {"type": "batchnorm2d"}, {"type": "relu"}, {"type": "maxpool2d", "kernel": 2, "stride": 2},
                        {"type": "flatten"}, {"type": "dense", "name": "fc1", "units": 10}, input_shape=(1, 28, 28))


# A dropout of a conv's 25,088 values an image, whose mask dominates a step: up to 41 images a
# chunked step draws it for the whole batch (Dropout.MAX_BATCH_MASK_VALUES), not a chunk's rows.
CONV_DROPOUT_SPEC = _spec({"type": "conv2d", "name": "conv1", "out_channels": 32, "kernel": 3, "padding": 1},
                          {"type": "dropout", "name": "drop", "p": 0.25}, {"type": "maxpool2d", "kernel": 28},
                          {"type": "flatten"}, {"type": "dense", "name": "fc1", "units": 10}, input_shape=(1, 28, 28))
# A BatchNorm's normalized input and an ELU's derivative factor, kept inside a residual block.
RESIDUAL_KEEPS_SPEC = _spec({"type": "conv2d", "name": "conv1", "out_channels": 16, "kernel": 3, "padding": 1},
                            {"type": "residual", "name": "res", "layers": [{"type": "batchnorm2d"}, {"type": "elu"}]},
                            {"type": "maxpool2d", "kernel": 2, "stride": 2}, {"type": "flatten"},
                            {"type": "dense", "name": "fc1", "units": 10}, input_shape=(1, 28, 28))
# Weights that dominate a step: an optimizer's slots, each of the weights' size, are most of it.
WIDE_DENSE_SPEC = _spec({"type": "flatten"}, {"type": "dense", "name": "fc1", "units": 2048}, {"type": "relu"},
                        {"type": "dense", "name": "fc2", "units": 10}, input_shape=(1, 28, 28))


def step_peak_bytes(model, n: int, optimizer=None) -> int:
    """tracemalloc's peak over a training step on ``n`` images (:meth:`Model.loss_and_grads`, then
    ``optimizer``'s update, of which this is the second: its slots made by the first), plus what
    the step holds from before: the images, the weights and the optimizer's slots."""
    import tracemalloc
    x = np.random.default_rng(0).standard_normal((n, 1, 28, 28)).astype(np.float32)
    y = np.arange(n) % 10
    if optimizer is not None:
        optimizer.step(model.params, model.loss_and_grads(x, y)[2])
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        grads = model.loss_and_grads(x, y)[2]
        if optimizer is not None:
            optimizer.step(model.params, grads)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    slots = len(optimizer.slots()) if optimizer is not None else 0
    return peak + x.nbytes + (1 + slots) * model.params.flat.nbytes


@pytest.mark.parametrize("spec, n", [("seed", 64), ("seed", 1024), (BATCH_NORM_SPEC, 64), (BATCH_NORM_SPEC, 256),
                                     (CONV_DROPOUT_SPEC, 17), (CONV_DROPOUT_SPEC, 41), (CONV_DROPOUT_SPEC, 64),
                                     (RESIDUAL_KEEPS_SPEC, 64)])
def test_training_step_bytes_is_near_the_memory_a_step_takes(spec, n):
    """The estimate behind pscnn train's up-front refusal of a batch that cannot fit: within
    0.75-1.25x of tracemalloc's peak over a step (its images and weights added), whether the step
    runs in chunks (the dense layers' inputs kept over the whole batch, a dropout's mask drawn
    for the whole batch: the estimate was 1.37-1.63x short of CONV_DROPOUT_SPEC's at 17 and 41
    images, counting a chunk's rows of it) or whole (BatchNorm; 1.62x short of RESIDUAL_KEEPS_SPEC's,
    the arrays kept by the layers of a residual block left out)."""
    model = build_model(spec)
    estimate, layer, most = model.training_step_bytes(n)
    assert layer in {layer.name for layer in model.layers} and 0 < most < estimate
    measured = step_peak_bytes(model, n)
    assert 0.75 <= measured / estimate <= 1.25, (measured, estimate)


@pytest.mark.parametrize("optimizer", [{"name": "sgd", "lr": 0.01, "momentum": 0.9}, {"name": "adam", "lr": 0.001},
                                       {"name": "sgd", "lr": 0.01}])
def test_training_step_bytes_counts_the_slots_of_an_optimizer_in_the_process(optimizer):
    """pscnn train's optimizer lives in its process: SGD with momentum keeps a velocity, Adam two
    moments, each of the weights' size, which the estimate left out (Adam's step on this model
    took 1.9x of it)."""
    from cnn_core.optim import build_optimizer
    model = build_model(WIDE_DENSE_SPEC)
    opt = build_optimizer(optimizer)
    estimate = model.training_step_bytes(64, len(opt.slots()))[0]
    assert estimate - model.training_step_bytes(64)[0] == len(opt.slots()) * model.params.flat.nbytes
    measured = step_peak_bytes(model, 64, opt)
    assert 0.75 <= measured / estimate <= 1.25, (measured, estimate)


@pytest.mark.parametrize("spec", ["seed", "light", SMALL_SPEC])
def test_planned_parameter_counts_match_the_built_model(spec):
    model = build_model(spec)
    c, h, w = model.spec["input_shape"]
    shape = (h, w, c)
    for layer in model.layers:
        shape, count = layer.plan(shape)
        assert shape == layer.out_shape, layer.name
        assert count == sum(int(v.size) for v in layer.parameters.values()), layer.name


BOOL_OPTIONS = [
    ({"type": "conv2d", "out_channels": True}, "out_channels must be a positive int, got True"),
    ({"type": "conv2d", "out_channels": 2, "kernel": True}, "kernel must be an int or a pair"),
    ({"type": "conv2d", "out_channels": 2, "stride": [1, True]}, "stride must be an int or a pair"),
    ({"type": "conv2d", "out_channels": 2, "padding": False}, "padding must be an int or a pair"),
    ({"type": "maxpool2d", "kernel": True}, "kernel must be an int or a pair"),
    ({"type": "maxpool2d", "stride": True}, "stride must be an int or a pair"),
    ({"type": "dense", "units": True}, "units must be a positive int, got True"),
    ({"type": "dense", "units": 3, "init_scale": True}, "init_scale must be a number"),
    ({"type": "dropout", "p": False}, "p must be a number, got False"),
    ({"type": "leaky_relu", "alpha": True}, "alpha must be a number, got True"),
    ({"type": "elu", "alpha": True}, "alpha must be a number, got True"),
    ({"type": "batchnorm2d", "momentum": True}, "momentum must be a number, got True"),
    ({"type": "batchnorm2d", "eps": False}, "eps must be a number, got False"),
]


NAN, INF = float("nan"), float("inf")
NUMBER_OPTIONS = [
    ({"type": "dense", "units": 3, "init_scale": INF}, r"init_scale must lie in \[0.0, 100.0\], got inf"),
    ({"type": "dense", "units": 3, "init_scale": 1e308}, r"init_scale must lie in \[0.0, 100.0\], got 1e\+308"),
    ({"type": "dense", "units": 3, "init_scale": "2"}, "init_scale must be a number, got '2'"),
    ({"type": "dropout", "p": NAN}, r"p must lie in \[0.0, 1.0\), got nan"),
    ({"type": "leaky_relu", "alpha": NAN}, r"alpha must lie in \[0.0, 1.0\], got nan"),
    ({"type": "leaky_relu", "alpha": INF}, r"alpha must lie in \[0.0, 1.0\], got inf"),
    ({"type": "leaky_relu", "alpha": "x"}, "alpha must be a number, got 'x'"),
    ({"type": "elu", "alpha": INF}, r"alpha must lie in \[0.0, 100.0\], got inf"),
    ({"type": "elu", "alpha": -1}, r"alpha must lie in \[0.0, 100.0\], got -1.0"),
    ({"type": "batchnorm2d", "momentum": NAN}, r"momentum must lie in \[0.0, 1.0\], got nan"),
    ({"type": "batchnorm2d", "eps": INF}, r"eps must lie in \(0.0, 1.0\], got inf"),
    ({"type": "batchnorm2d", "eps": 0}, r"eps must lie in \(0.0, 1.0\], got 0.0"),
]


@pytest.mark.parametrize("layer, match", NUMBER_OPTIONS,
                         ids=[f"{lyr['type']}-{m.split()[0]}-{i}" for i, (lyr, m) in enumerate(NUMBER_OPTIONS)])
def test_number_options_must_be_finite_and_in_range(layer, match):
    """A non-finite or absurd option would only show up later, as a NaN loss blamed on the learning rate."""
    tail = (FLAT_TAIL if layer["type"] != "dense" else ({"type": "dense", "units": 3},))
    head = ({"type": "flatten"},) if layer["type"] == "dense" else ()
    with pytest.raises(SpecError, match=match):
        build_model(_spec(*head, layer, *tail))


def test_a_spec_with_unknown_keys_is_refused():
    spec = _spec({"type": "flatten"}, {"type": "dense", "units": 10})
    with pytest.raises(SpecError, match=r"model spec: unknown keys \['dtype'\]; a spec has 'input_shape' and"):
        build_model({**spec, "dtype": "float16"})


@pytest.mark.parametrize("layer, match", BOOL_OPTIONS, ids=[f"{lyr['type']}-{m.split()[0]}" for lyr, m in BOOL_OPTIONS])
def test_booleans_are_not_numbers_in_any_layer_option(layer, match):
    """JSON's true is not 1: every integer (and number) option of every layer refuses it."""
    tail = (FLAT_TAIL if layer["type"] != "dense" else ({"type": "dense", "units": 3},))
    head = ({"type": "flatten"},) if layer["type"] == "dense" else ()
    with pytest.raises(SpecError, match=match):
        build_model(_spec(*head, layer, *tail))


@pytest.mark.parametrize("layer, message", [
    ({"type": "maxpool2d", "name": "pool1", "size": 2},
     "maxpool2d 'pool1': unknown option 'size' (options: kernel, stride)"),
    ({"type": "conv2d", "out_channels": 2, "kernal": 3, "pad": 1},
     "conv2d 'conv1': unknown options 'kernal', 'pad' (options: out_channels, kernel, stride, padding)"),
    ({"type": "relu", "alpha": 0.1}, "relu 'relu1': unknown option 'alpha' (it takes no options)"),
    ({"type": "conv2d", "kernel": 3}, "conv2d 'conv1': missing option 'out_channels'"),
    ({"type": "residual", "name": "r"}, "residual 'r': missing option 'layers'"),
])
def test_unknown_and_missing_layer_options_are_named(layer, message):
    """The spec's words, not Python's: no __init__(), no 'keyword argument'."""
    with pytest.raises(SpecError) as info:
        build_model(_spec(layer, *FLAT_TAIL))
    assert str(info.value) == message


@pytest.mark.parametrize("name", [5, ["a"], "res.c"])
def test_layer_names_must_be_strings_without_dots(name):
    """A dot splits "<layer>.<param>": inside a residual block it used to end in a bare StopIteration."""
    spec = _spec({"type": "residual", "name": "r", "layers": [
        {"type": "conv2d", "name": name, "out_channels": 1, "padding": 1}]}, *FLAT_TAIL)
    with pytest.raises(SpecError, match="name must be a string without '.'"):
        build_model(spec)


def test_bad_json_message_names_position():
    with pytest.raises(SpecError, match="line 1 column"):
        build_model('{"input_shape": [1, 8, 8], "layers": [}')


def _nested_residuals(depth):
    block = {"type": "relu"}
    for _ in range(depth):
        block = {"type": "residual", "layers": [block]}
    return {"input_shape": [1, 4, 4], "layers": [block, {"type": "flatten"}, {"type": "dense", "units": 2}]}


def test_residual_blocks_nest_as_deep_as_a_header_carries_and_no_deeper():
    """400 nested blocks exhausted Python's recursion (a RecursionError traceback from
    `pscnn train --model`), and JSON thousands of brackets deep did in json.loads."""
    assert build_model(_nested_residuals(10)).forward(np.ones((1, 1, 4, 4), np.float32)).shape == (1, 2)
    assert nests_within({"body": {"model": _nested_residuals(10)}}, P.MAX_DEPTH)   # a welcome header
    for spec in (_nested_residuals(11), json.dumps(_nested_residuals(400)),
                 '{"input_shape": ' + "[" * 5000 + "]" * 5000 + "}"):
        with pytest.raises(SpecError, match="model spec nests maps and lists more than 24 deep"):
            build_model(spec)


def test_unknown_device_and_dtype():
    from cnn_core.errors import ConfigError
    with pytest.raises(ConfigError, match="device"):
        build_model("light", device="tpu")
    with pytest.raises(ConfigError, match="dtype"):
        build_model("light", dtype="float16")


# --------------------------------------------------------------------------- gradient checks
#
# cnn_core.gradcheck.gradcheck_model measures each parameter's error against its
# gradient scale, max_i |analytic_i - numeric_i| / max_i |analytic_i|, less the
# central differences' own rounding: a correct backward reads ~0 and a wrong one
# (a missing term, a transposed weight, a misrouted max) ~1e-1.

def test_small_model_gradcheck_float64():
    """conv stride 2, batchnorm, residual, leaky_relu/elu/silu, relu+maxpool, dropout (train), dense."""
    model = build_model(SMALL_SPEC, seed=1, dtype="float64")
    rng = np.random.default_rng(2)
    for k, v in model.params.items():             # non-trivial BN affine and biases
        if k.endswith("bias") or k.startswith("bn1."):
            v[...] += 0.3 * rng.standard_normal(v.shape)
    x = rng.standard_normal((4, 2, 9, 8))
    y = rng.integers(0, 5, 4)
    report = gradcheck_model(model, x, y, max_entries=60)
    assert set(report) == set(model.params)
    # c1.bias feeds straight into BatchNorm, which subtracts the batch mean: its
    # exact gradient is 0 and its numeric one rounding noise (~1e-10), which the
    # check used to read as a 100% error.
    assert np.max(np.abs(model.backward(softmax_cross_entropy(model.forward(x), y)[1])["c1.bias"])) < 1e-12
    assert max(report.values()) < 1e-6, report


def test_light_model_gradcheck_float64():
    model = build_model("light", seed=3, dtype="float64")
    rng = np.random.default_rng(4)
    for k, v in model.params.items():
        if k.endswith("bias"):
            v[...] = 0.1 * rng.standard_normal(v.shape)
    x = rng.standard_normal((3, 1, 28, 28))
    y = np.array([0, 3, 9])
    report = gradcheck_model(model, x, y, max_entries=25)    # dropout active, mask fixed per pass
    assert set(report) == set(LIGHT_SHAPES)
    assert max(report.values()) < 1e-6, report


def test_gradcheck_catches_a_wrong_backward(monkeypatch):
    """The check above is not vacuous: a backward that drops ELU's alpha fails it."""
    from cnn_core.layers import ELU
    model = build_model(SMALL_SPEC, seed=1, dtype="float64")
    x = np.random.default_rng(5).standard_normal((4, 2, 9, 8))
    y = np.array([0, 1, 2, 3])
    monkeypatch.setattr(ELU, "backward", lambda self, dout, cache, need_dx=True: (
        np.where(cache[0] > 0, dout, dout * cache[1]), {}))
    report = gradcheck_model(model, x, y, max_entries=20)
    assert report["res.ca.weight"] > 1e-3, report


def test_gradcheck_model_rejects_float32():
    with pytest.raises(ShapeError, match="float64"):
        gradcheck_model(build_model("light"), *batch(2))


def test_gradcheck_model_refuses_evaluation_mode_as_a_pscnn_error():
    # It ran an evaluation pass, then raised a bare ValueError (no PscnnError for a CLI to print).
    with pytest.raises(ConfigError, match="gradcheck_model needs train=True .* got train=False"):
        gradcheck_model(build_model("light", dtype="float64"), *batch(2), train=False)


# --------------------------------------------------------------------------- vs the NCHW reference

REF_SPEC = {   # overlapping pooling, conv stride 2 / padding 2, ReLU->MaxPool twice (swapped in execution)
    "input_shape": [2, 13, 11],
    "layers": [
        {"type": "conv2d", "name": "conv1", "out_channels": 5, "kernel": 3, "stride": 2, "padding": 2},  # (8,7,5)
        {"type": "relu"},
        {"type": "maxpool2d", "kernel": 3, "stride": 2},                                                  # (3,3,5)
        {"type": "conv2d", "name": "conv2", "out_channels": 6, "kernel": [2, 3], "padding": 1},           # (4,3,6)
        {"type": "relu"},
        {"type": "maxpool2d", "kernel": 2, "stride": 2},                                                  # (2,1,6)
        {"type": "flatten"},
        {"type": "dense", "name": "fc1", "units": 7},
        {"type": "relu"},
        {"type": "dropout", "p": 0.5},
        {"type": "dense", "name": "fc2", "units": 4},
    ],
}


def assert_grads_close(grads, ref_grads, rtol=1e-10):
    assert set(grads) == set(ref_grads)
    for k, g in grads.items():
        scale = np.max(np.abs(ref_grads[k]))
        assert scale > 0, k
        err = np.max(np.abs(g - ref_grads[k])) / scale
        assert err < rtol, f"{k}: {err}"


@pytest.mark.parametrize("spec,shape,classes", [("seed", (1, 28, 28), 10), ("light", (1, 28, 28), 10),
                                                (REF_SPEC, (2, 13, 11), 4)])
def test_model_matches_reference_model(spec, shape, classes):
    model = build_model(with_dropout(spec, 0.0), seed=11, dtype="float64")
    rng = np.random.default_rng(12)
    for k, v in model.params.items():
        if k.endswith("bias"):
            v[...] = 0.1 * rng.standard_normal(v.shape)
    x, y = batch(8, shape, classes, seed=13, dtype=np.float64)
    logits = model.forward(x, train=True)
    loss, d = softmax_cross_entropy(logits, y)
    grads = model.backward(d)
    ref_loss, ref_grads = ReferenceModel(model).loss_and_grads(x, y)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert_grads_close(grads, ref_grads)


def test_relu_maxpool_swap_exact_with_ties():
    """Integer data and weights: many exact ties and all-nonpositive windows.

    Pooling before the ReLU must route gradients exactly as ReLU-then-pool does
    (the reference runs the original order).
    """
    spec = with_dropout(REF_SPEC, 0.0)
    model = build_model(spec, seed=0, dtype="float64")
    assert execution_order(model.layers) == [0, 2, 1, 3, 5, 4, 6, 7, 8, 9, 10]
    rng = np.random.default_rng(14)
    for k in ("conv1.weight", "conv2.weight"):
        model.params[k][...] = rng.integers(-1, 2, model.params[k].shape)
    model.params["conv1.bias"][...] = [0, -1, -5, 1, 0]
    model.params["conv2.bias"][...] = [0, -2, 0, -9, 1, 0]
    x = rng.integers(-1, 2, (6, 2, 13, 11)).astype(np.float64)
    y = rng.integers(0, 4, 6)
    loss, d = softmax_cross_entropy(model.forward(x, train=True), y)
    grads = model.backward(d)
    ref_loss, ref_grads = ReferenceModel(model).loss_and_grads(x, y)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for k, g in grads.items():
        np.testing.assert_allclose(g, ref_grads[k], rtol=1e-10, atol=1e-13, err_msg=k)


FUSED_SPEC = {   # two convs with few input channels, each followed by ReLU -> 2x2 pool: both fused
    "input_shape": [1, 12, 8],
    "layers": [
        {"type": "conv2d", "name": "conv1", "out_channels": 3, "kernel": 3, "padding": 1},   # (12,8,3)
        {"type": "relu"},
        {"type": "maxpool2d", "kernel": 2},                                                  # (6,4,3)
        {"type": "conv2d", "name": "conv2", "out_channels": 2, "kernel": 3, "padding": 1},   # needs dx
        {"type": "relu"},
        {"type": "maxpool2d", "kernel": 2},                                                  # (3,2,2)
        {"type": "flatten"},
        {"type": "dense", "name": "fc", "units": 4},
    ],
}


def _fused_pairs(model):
    return [(conv.name, conv.pool_windows) for conv in model.layers if getattr(conv, "pool_windows", None)]


def test_conv_pool_plan():
    seed = build_model("seed")
    assert _fused_pairs(seed) == [("conv1", (2, 2)), ("conv2", (2, 2))]
    assert [conv.patch_major for conv in seed.layers if isinstance(conv, Conv2D)] == [True, False]  # 1 and 32 inputs
    assert [p.windows_first for p in seed.layers if isinstance(p, MaxPool2D)] == [True, True]
    assert _fused_pairs(build_model(FUSED_SPEC)) == [("conv1", (2, 2)), ("conv2", (2, 2))]
    assert _fused_pairs(build_model(REF_SPEC)) == []                        # overlapping pool; 5 channels
    odd = copy.deepcopy(FUSED_SPEC)
    odd["input_shape"] = [1, 13, 8]               # conv1's 13 rows do not tile into 2x2 windows; conv2's 6 do
    assert _fused_pairs(build_model(odd)) == [("conv2", (2, 2))]
    overlapping = copy.deepcopy(FUSED_SPEC)
    overlapping["input_shape"] = [1, 13, 9]       # pool1 (stride 1) leaves 12 x 8 for conv2
    overlapping["layers"][2] = {"type": "maxpool2d", "kernel": 2, "stride": 1}
    assert _fused_pairs(build_model(overlapping)) == [("conv2", (2, 2))]


def test_fused_conv_pool_exact_with_ties():
    """Integer data and weights (many exact ties), through both fused pairs, one of which
    needs its input gradient: the same loss and gradients as the unfused NCHW reference."""
    model = build_model(FUSED_SPEC, seed=0, dtype="float64")
    rng = np.random.default_rng(15)
    for k in ("conv1.weight", "conv2.weight"):
        model.params[k][...] = rng.integers(-1, 2, model.params[k].shape)
    model.params["conv1.bias"][...] = [0, -1, 1]
    model.params["conv2.bias"][...] = [1, 0]
    x = rng.integers(-1, 2, (5, 1, 12, 8)).astype(np.float64)
    y = rng.integers(0, 4, 5)
    logits = model.forward(x, train=True)
    loss, d = softmax_cross_entropy(logits, y)
    grads = model.backward(d)
    ref_loss, ref_grads = ReferenceModel(model).loss_and_grads(x, y)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for k, g in grads.items():
        np.testing.assert_allclose(g, ref_grads[k], rtol=1e-10, atol=1e-13, err_msg=k)
    np.testing.assert_array_equal(model.forward(x, train=False), logits)     # no dropout: eval == train


@pytest.mark.parametrize("columns", ["patch_major", "row_major"])
def test_fused_equals_unfused_with_stride_2_and_non_square_windows(columns, monkeypatch):
    """A stride-2 conv into a 2x2 pool and a conv into a 3x1 pool: fused and unfused
    paths give the same loss and gradients (integer data: ties everywhere), whichever
    way the convs build their columns."""
    import cnn_core.layers as layers_module
    if columns == "row_major":
        monkeypatch.setattr(layers_module, "PATCH_MAJOR_MAX_CHANNELS", 0)
    spec = {"input_shape": [2, 17, 13], "layers": [
        {"type": "conv2d", "name": "conv1", "out_channels": 3, "kernel": 3, "stride": 2, "padding": 2},  # (10,8,3)
        {"type": "relu"}, {"type": "maxpool2d", "kernel": 2},
        {"type": "conv2d", "name": "conv2", "out_channels": 2, "kernel": 2, "padding": 1},              # (6,5,2)
        {"type": "relu"}, {"type": "maxpool2d", "kernel": [3, 1], "stride": [3, 1]},
        {"type": "flatten"}, {"type": "dense", "name": "fc", "units": 4}]}

    def loss_and_grads(fused):
        model = build_model(spec, seed=0, dtype="float64")
        if not fused:
            for layer in model.layers:
                if isinstance(layer, MaxPool2D):
                    layer.windows_first = False
                elif hasattr(layer, "pool_windows"):
                    layer.pool_windows = None
        rng = np.random.default_rng(1)
        for k in ("conv1.weight", "conv2.weight"):
            model.params[k][...] = rng.integers(-1, 2, model.params[k].shape)
        x = rng.integers(-1, 2, (4, 2, 17, 13)).astype(np.float64)
        loss, d = softmax_cross_entropy(model.forward(x, train=True), rng.integers(0, 4, 4))
        return model, loss, model.backward(d)

    fused, loss, grads = loss_and_grads(True)
    assert _fused_pairs(fused) == [("conv1", (2, 2)), ("conv2", (3, 1))]
    assert [conv.patch_major for conv in fused.layers if isinstance(conv, Conv2D)] == [columns == "patch_major"] * 2
    _, ref_loss, ref_grads = loss_and_grads(False)
    assert loss == pytest.approx(ref_loss, rel=1e-14)
    for k, g in grads.items():
        np.testing.assert_allclose(g, ref_grads[k], rtol=1e-12, atol=1e-14, err_msg=k)


def test_fused_conv_pool_gradcheck_float64():
    model = build_model(FUSED_SPEC, seed=4, dtype="float64")
    rng = np.random.default_rng(5)
    for k, v in model.params.items():
        if k.endswith("bias"):
            v[...] = 0.1 * rng.standard_normal(v.shape)
    x = rng.standard_normal((3, 1, 12, 8))
    report = gradcheck_model(model, x, np.array([0, 3, 1]), max_entries=30)
    assert max(report.values()) < 1e-6, report


def test_pool_relu_plan():
    seed = build_model("seed")
    assert [p.relu_after for p in seed.layers if isinstance(p, MaxPool2D)] == [True, True]
    assert [r.applied_by_pool for r in seed.layers if isinstance(r, ReLU)] == [True, True, False]   # fc1's: no pool
    for activation, fused in (("relu", True), ("silu", False)):      # pool -> ReLU as written; SiLU is no ReLU
        model = build_model({"input_shape": [1, 8, 8], "layers": [
            {"type": "maxpool2d", "kernel": 2}, {"type": activation},
            {"type": "flatten"}, {"type": "dense", "units": 2}]})
        assert model.layers[0].relu_after is fused
        assert getattr(model.layers[1], "applied_by_pool", False) is fused


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pool_relu_fused_equals_unfused_bit_for_bit(dtype):
    """The seed model with the ReLUs applied by the pools against the same model with them
    apart: loss, logits and every gradient bit for bit, in a chunked step (70 images: three
    chunks of uneven size) on images with blank borders and weights of few values (ties
    in every pool), and in evaluation."""
    models = [build_model("seed", seed=3, dtype=dtype) for _ in range(2)]
    for layer in models[1].layers:
        if isinstance(layer, (MaxPool2D, ReLU)):
            layer.relu_after = layer.applied_by_pool = False
    rng = np.random.default_rng(18)
    weights = {k: rng.integers(-2, 3, v.shape) * 0.25 for k, v in models[0].params.items()}
    x = np.zeros((70, 1, 28, 28))
    x[:, :, 6:22, 6:22] = rng.integers(0, 3, (70, 1, 16, 16)) * 0.5
    y = rng.integers(0, 10, 70)
    results = []
    for model in models:
        model.assign(weights)
        results.append((model.loss_and_grads(x, y), model.forward(x, train=False)))
    ((loss, logits, grads), eval_logits), ((ref_loss, ref_logits, ref_grads), ref_eval) = results
    assert loss == ref_loss
    for got, want in [(logits, ref_logits), (eval_logits, ref_eval), *((grads[k], ref_grads[k]) for k in grads)]:
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    assert all(np.count_nonzero(g) for g in grads.values())


def test_unfused_lifts_everything_the_models_plans_set(monkeypatch):
    """gradcheck_layer lifted the fusion flags by a list of their names of its own, apart from the plan_*
    functions that set them: a flag a new plan sets and the list lacked would be left set, the layer
    checked fused.  unfused() lives beside the plans now; a layer of a model built with every fusion
    is, within it, as the same model's built with no plan run, and as planned again after it."""
    spec = {"input_shape": [1, 8, 8], "layers": [
        {"type": "conv2d", "out_channels": 2, "kernel": 3, "padding": 1}, {"type": "relu"},
        {"type": "maxpool2d", "kernel": 2}, {"type": "flatten"}, {"type": "dense", "units": 2}]}
    planned = build_model(spec)
    plans = [name for name in vars(model_module) if name.startswith("plan_")]
    assert len(plans) >= 2, plans
    for name in plans:
        monkeypatch.setattr(model_module, name, lambda layers, order: None)
    unplanned = build_model(spec)
    for layer, alone in zip(planned.layers, unplanned.layers, strict=True):
        before = dict(vars(layer))
        with pytest.raises(RuntimeError), model_module.unfused(layer):
            assert vars(layer).keys() == vars(alone).keys(), layer.name
            raise RuntimeError("a check that fails inside")
        assert vars(layer) == before, layer.name
    fused = [type(layer).__name__ for layer, alone in zip(planned.layers, unplanned.layers)
             if vars(layer).keys() != vars(alone).keys()]
    assert fused == ["Conv2D", "ReLU", "MaxPool2D"]         # every plan fired here: the test has something to lift


def test_execution_order_rules():
    from cnn_core.layers import ELU, SiLU
    mk = [ReLU(), MaxPool2D(), ReLU(), ReLU(), MaxPool2D(), SiLU(), MaxPool2D(), MaxPool2D(), ReLU(), ELU()]
    assert execution_order(mk) == [1, 0, 2, 4, 3, 5, 6, 7, 8, 9]
    assert execution_order([]) == []
    assert execution_order([ReLU()]) == [0]


# --------------------------------------------------------------------------- softmax cross-entropy

def test_softmax_cross_entropy_hand_values():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 4.0, 0.5]])
    y = np.array([2, 1, 0])
    z = [math.exp(1) + math.exp(2) + math.exp(3), 3.0, math.exp(-1) + math.exp(4) + math.exp(0.5)]
    expected = (-(3 - math.log(z[0])) + math.log(3) - (-1 - math.log(z[2]))) / 3
    loss, d = softmax_cross_entropy(logits, y)
    assert isinstance(loss, float)
    assert loss == pytest.approx(expected, rel=1e-14)
    p = np.exp(logits) / np.array(z)[:, None]
    p[np.arange(3), y] -= 1
    np.testing.assert_allclose(d, p / 3, rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(d.sum(axis=1), 0.0, atol=1e-15)


def test_softmax_cross_entropy_gradient_finite_differences():
    rng = np.random.default_rng(15)
    logits = rng.standard_normal((4, 6)) * 3
    y = rng.integers(0, 6, 4)
    _, d = softmax_cross_entropy(logits, y)
    eps = 1e-6
    num = np.zeros_like(logits)
    for idx in np.ndindex(logits.shape):
        lp, lm = logits.copy(), logits.copy()
        lp[idx] += eps
        lm[idx] -= eps
        num[idx] = (softmax_cross_entropy(lp, y)[0] - softmax_cross_entropy(lm, y)[0]) / (2 * eps)
    np.testing.assert_allclose(d, num, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_large_logits_are_stable(dtype):
    logits = np.array([[1e4, 0.0, -1e4], [-1e4, -1e4, -1e4 + 2.0], [1e4, 1e4, 0.0]], dtype=dtype)
    y = np.array([0, 2, 1])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, d = softmax_cross_entropy(logits, y)
    # row 0: ~0; row 1: -log(e^2 / (2 + e^2)); row 2: log 2
    expected = (0.0 + math.log(1 + 2 * math.exp(-2)) + math.log(2)) / 3
    assert loss == pytest.approx(expected, rel=1e-6)
    assert d.dtype == dtype and np.all(np.isfinite(d))
    np.testing.assert_allclose(d[0], [0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(d[2], [0.5 / 3, -0.5 / 3, 0], atol=1e-7)
    loss_wrong, _ = softmax_cross_entropy(np.array([[1e4, 0.0]], dtype=dtype), np.array([1]))
    assert loss_wrong == pytest.approx(1e4, rel=1e-6)
    # a -inf logit away from the label is a probability of 0, not a NaN
    loss_inf, d_inf = softmax_cross_entropy(np.array([[0.0, -np.inf], [-np.inf, 1.0]], dtype=dtype), np.array([0, 1]))
    assert loss_inf == 0.0
    np.testing.assert_array_equal(d_inf, np.zeros((2, 2), dtype=dtype))


def test_softmax_cross_entropy_gives_a_non_finite_loss_for_non_finite_logits_not_an_error():
    """The documented contract the divergence checks rely on (pscnn train, the server's push check):
    they read the scalar loss; an exception here would replace their "diverged" report."""
    with np.errstate(invalid="ignore", over="ignore"):
        for bad in (np.nan, np.inf):
            logits = np.zeros((3, 4), np.float32)
            logits[1, 2] = bad
            loss, _ = softmax_cross_entropy(logits, np.array([0, 2, 3]))
            assert not math.isfinite(loss)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_of_a_certain_prediction_is_plus_zero(dtype):
    """It was -0.0 (the log-likelihood 0.0, negated): a batch predicted with certainty (float32
    margins above ~17) printed its loss as -0.0000."""
    logits = np.array([[100.0, -100.0], [-100.0, 100.0]], dtype=dtype)
    loss, _ = softmax_cross_entropy(logits, np.array([0, 1]))
    assert loss == 0.0 and math.copysign(1.0, loss) == 1.0 and f"{loss:.4f}" == "0.0000"


@pytest.mark.parametrize("y,match", [
    (np.array([0, 10, 1]), r"\[0, 10\), got range \[0, 10\]"),
    (np.array([0, -1, 1]), r"\[0, 10\), got range \[-1, 1\]"),
    (np.array([0, 1]), r"shape \(3,\)"),
    (np.array([[0], [1], [2]]), r"shape \(3,\)"),
    (np.array([0.0, 1.0, 2.0]), "integers"),
    (np.array([True, False, True]), "integers"),
])
def test_softmax_cross_entropy_label_validation(y, match):
    with pytest.raises(ShapeError, match=match):
        softmax_cross_entropy(np.zeros((3, 10)), y)


def test_softmax_cross_entropy_needs_2d_logits():
    with pytest.raises(ShapeError, match=r"\(N, K\)"):
        softmax_cross_entropy(np.zeros(10), np.array([1]))


def test_softmax_cross_entropy_accepts_lists_and_uint_labels():
    logits = np.zeros((2, 4))
    for y in ([1, 3], np.array([1, 3], dtype=np.uint8)):
        loss, _ = softmax_cross_entropy(logits, y)
        assert loss == pytest.approx(math.log(4))


# --------------------------------------------------------------------------- loss_and_grads

def _whole_batch_step(model, x, y):
    logits = model.forward(x, train=True)
    loss, dlogits = softmax_cross_entropy(logits, y)
    return loss, logits, model.backward(dlogits)


# A residual block with its own dropout, and dropout on images (inside the part
# that runs in chunks): each chunk must draw its own rows of both masks.
DROPOUT_SPEC = {"input_shape": [1, 8, 8], "layers": [
    {"type": "conv2d", "name": "c1", "out_channels": 4, "kernel": 3, "padding": 1},
    {"type": "relu"}, {"type": "maxpool2d", "kernel": 2}, {"type": "dropout", "p": 0.3},
    {"type": "flatten"}, {"type": "dense", "name": "d1", "units": 12},
    {"type": "residual", "name": "res", "layers": [
        {"type": "dense", "name": "inner", "units": 12}, {"type": "dropout", "p": 0.5}]},
    {"type": "dense", "name": "out", "units": 5}]}


@pytest.mark.parametrize("spec,shape,classes", [("seed", (1, 28, 28), 10), (DROPOUT_SPEC, (1, 8, 8), 5)])
@pytest.mark.parametrize("n,chunk", [(64, 32), (33, 32), (100, 32), (10, 3), (7, 1), (5, 8), (0, 4)])
def test_loss_and_grads_in_chunks_equals_the_whole_batch(spec, shape, classes, n, chunk, monkeypatch):
    """Chunks of at most CPU_CHUNK images, dropout masks included, give the whole
    batch's loss, logits and gradients (float64: only the summation order differs),
    two steps in a row (each dropout's counter advances once per batch)."""
    monkeypatch.setattr(model_module.Model, "CPU_CHUNK", chunk)
    chunked, whole = (build_model(spec, seed=4, dtype="float64") for _ in range(2))
    for m in (chunked, whole):
        m.reseed((1, 2, 3))
    x, y = batch(n, shape, classes, seed=n, dtype=np.float64)
    for _ in range(2):
        loss, logits, grads = chunked.loss_and_grads(x, y)
        want_loss, want_logits, want_grads = _whole_batch_step(whole, x, y)
        assert loss == pytest.approx(want_loss, rel=1e-13)
        np.testing.assert_allclose(logits, want_logits, rtol=1e-12, atol=1e-14)   # BLAS may block rows differently
        assert list(grads) == list(whole.params)
        for k in grads:
            np.testing.assert_allclose(grads[k], want_grads[k], rtol=1e-11, atol=1e-15, err_msg=k)
    dropouts = [lyr for lyr in model_module._all_layers(chunked.layers) if isinstance(lyr, Dropout)]
    assert len(dropouts) == (1 if spec == "seed" else 2)
    assert all(lyr.draws == 2 and lyr.batch_mask is None and lyr.sample_offset == 0 for lyr in dropouts)
    assert chunked._caches is None


def test_a_chunked_step_draws_each_dropout_mask_once_for_the_batch(monkeypatch):
    """Each dropout draws the whole batch's mask once, before the first chunk, and each chunk
    takes its rows: one draw per batch, not per chunk, and bit for bit the masks of drawing each
    chunk's own rows (``uniform(..., offset=)``), which chunks drew before."""
    monkeypatch.setattr(model_module.Model, "CPU_CHUNK", 3)
    model = build_model(DROPOUT_SPEC, seed=4)
    model.reseed((1, 2, 3))
    dropouts = [lyr for lyr in model_module._all_layers(model.layers) if isinstance(lyr, Dropout)]
    draws, masks = [], {lyr: [] for lyr in dropouts}      # both are named dropout1
    monkeypatch.setattr(layers_module, "uniform", lambda *args, **kw: draws.append(args) or uniform(*args, **kw))

    def recording(layer):
        forward = layer.forward

        def record(x, train=True):
            out, mask = forward(x, train)
            masks[layer].append(mask.copy())
            return out, mask
        return record
    for layer in dropouts:
        layer.forward = recording(layer)
    n = 10
    model.loss_and_grads(*batch(n, (1, 8, 8), 5, seed=1))
    assert len(draws) == len(dropouts) == 2
    bounds = model._chunk_bounds(n, train=True)
    assert len(bounds) == 5
    for layer in dropouts:
        per_sample = math.prod(layer.in_shape)
        scale = np.float32(1 / (1 - layer.p))
        for (lo, hi), mask in zip(itertools.pairwise(bounds), masks[layer], strict=True):
            want = (uniform(np, layer.key, 0, (hi - lo, *layer.in_shape), np.float32, offset=lo * per_sample)
                    >= layer.p) * scale
            np.testing.assert_array_equal(mask.view(np.uint32), want.view(np.uint32), err_msg=layer.name)
        assert layer.draws == 1 and layer.batch_mask is None and layer.sample_offset == 0


def test_a_chunked_step_draws_a_large_dropout_mask_a_chunk_at_a_time(monkeypatch):
    """A dropout mask over MAX_BATCH_MASK_VALUES for the batch (a dropout after a conv) is drawn a
    chunk's rows at a time, as chunks drew before: drawn whole it outweighed the chunks' own
    arrays.  One draw number a step all the same, and bit for bit the batch's draw's rows."""
    monkeypatch.setattr(model_module.Model, "CPU_CHUNK", 3)
    model = build_model(DROPOUT_SPEC, seed=4)
    dropouts = [lyr for lyr in model_module._all_layers(model.layers) if isinstance(lyr, Dropout)]
    n = 10
    # the smaller dropout's mask fits, the larger's does not
    sizes = sorted(n * math.prod(lyr.in_shape) for lyr in dropouts)
    assert sizes[0] < sizes[1]
    monkeypatch.setattr(Dropout, "MAX_BATCH_MASK_VALUES", sizes[0])
    large = max(dropouts, key=lambda lyr: math.prod(lyr.in_shape))
    draws = []
    monkeypatch.setattr(layers_module, "uniform", lambda *args, **kw: draws.append(args[3]) or uniform(*args, **kw))
    masks = []
    forward = large.forward

    def record(x, train=True):
        out, mask = forward(x, train)
        masks.append(mask.copy())
        return out, mask
    large.forward = record
    model.loss_and_grads(*batch(n, (1, 8, 8), 5, seed=1))
    bounds = model._chunk_bounds(n, train=True)
    assert sorted(shape[0] for shape in draws) == sorted([n] + [hi - lo for lo, hi in itertools.pairwise(bounds)])
    whole = (uniform(np, large.key, 0, (n, *large.in_shape), np.float32) >= large.p) * np.float32(1 / (1 - large.p))
    np.testing.assert_array_equal(np.concatenate(masks).view(np.uint32), whole.view(np.uint32))
    for layer in dropouts:
        assert layer.draws == 1 and layer.batch_mask is None and layer.batch_draw is None
    model.loss_and_grads(*batch(n, (1, 8, 8), 5, seed=1))
    assert large.draws == 2


def test_a_pass_in_chunks_makes_each_convs_weight_matrices_once(monkeypatch):
    """A chunked training step and an evaluation in chunks make each conv's weight matrices once
    a pass, not once a chunk, with bit for bit the values of making them per chunk; the next
    pass, after the weights changed, makes them again from the new weights."""
    made = []
    monkeypatch.setattr(layers_module, "input_grad_matrix", lambda w: made.append(w.shape) or input_grad_matrix(w))
    model, per_chunk = build_model("seed", seed=2), build_model("seed", seed=2)
    per_chunk._holding_weight_matrices = contextlib.nullcontext       # as before: made by every chunk
    x, y = batch(64)
    assert len(model._chunk_bounds(64, train=True)) == 5
    for _ in range(2):
        made.clear()
        loss, logits, grads = model.loss_and_grads(x, y)
        assert made == [(64, 32, 3, 3)]      # conv2's, for its four chunks; conv1 takes no input gradient
        assert all(conv.held_matrices is None for conv in model._convs)
        want_loss, want_logits, want_grads = per_chunk.loss_and_grads(x, y)
        assert loss == want_loss
        for got, want in [(logits, want_logits), *((grads[k], want_grads[k]) for k in grads)]:
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        for m, g in ((model, grads), (per_chunk, want_grads)):
            for k, v in m.params.items():
                v -= np.float32(0.1) * g[k]
    np.testing.assert_array_equal(model.forward(x, train=False).view(np.uint32),
                                  per_chunk.forward(x, train=False).view(np.uint32))
    assert all(conv.held_matrices is None for conv in model._convs)


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-12), ("float32", 2e-5)])
def test_blocked_products_give_the_plain_products_step(dtype, rtol, monkeypatch):
    """The seed model's step with its conv products in blocks (OpenBLAS's SkylakeX kernels)
    and without (its other kernels): the same loss, logits and gradients but for rounding."""
    x, y = batch(64)
    matmul, batched = np.matmul, []

    def counting_matmul(a, b, **kwargs):               # the blocks run as batched matmuls
        batched.append(a.ndim == 3)
        return matmul(a, b, **kwargs)
    results = []
    for core in ("SkylakeX", "Haswell"):
        monkeypatch.setattr(im2col_module, "openblas_core", lambda core=core: core)
        with monkeypatch.context() as patch:
            patch.setattr(np, "matmul", counting_matmul)
            results.append(build_model("seed", seed=0, dtype=dtype).loss_and_grads(x, y))
        # per chunk of 16: conv1 forward and weight gradient, conv2 forward, weight and input
        # gradients, fc1 forward and input gradient
        assert sum(batched) == (4 * 7 if core == "SkylakeX" else 0), core
        batched.clear()
    (loss, logits, grads), (want_loss, want_logits, want_grads) = results
    assert loss == pytest.approx(want_loss, rel=rtol)
    np.testing.assert_allclose(logits, want_logits, rtol=rtol, atol=rtol * np.abs(want_logits).max())
    for k in grads:
        np.testing.assert_allclose(grads[k], want_grads[k], rtol=rtol, atol=rtol * np.abs(want_grads[k]).max(),
                                   err_msg=k)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_chunked_step_takes_each_dense_weight_gradient_over_the_whole_batch(dtype):
    """The chunks' dense inputs and output gradients go into one product each, not one a chunk
    summed after (fc1's 1.6 MB gradient written and added again for every chunk)."""
    model = build_model("seed", seed=0, dtype=dtype)
    x, y = batch(2 * model.CPU_CHUNK + 5, dtype=np.dtype(dtype))      # three chunks, uneven
    inputs, douts = {}, {}
    for layer in model.layers:
        if layer.type_name == "dense":
            forward, backward = layer.forward, layer.backward
            layer.forward = lambda h, train, f=forward, n=layer.name: inputs.setdefault(n, []).append(h) or f(h, train)
            layer.backward = (lambda d, c, b=backward, n=layer.name, **kw:
                              douts.setdefault(n, []).append(d) or b(d, c, **kw))
    grads = model.loss_and_grads(x, y)[2]
    assert sorted(inputs) == ["fc1", "fc2"] and all(len(v) == 3 for v in [*inputs.values(), *douts.values()])
    for name in inputs:
        want = np.concatenate(inputs[name]).T @ np.concatenate(douts[name])
        np.testing.assert_array_equal(grads[f"{name}.weight"], want, err_msg=name)
        np.testing.assert_array_equal(grads[f"{name}.bias"], sum(d.sum(axis=0) for d in douts[name]), err_msg=name)


def test_loss_and_grads_runs_in_chunks_on_the_cpu(monkeypatch):
    """The seed model at batch 64 runs as four chunks of 16, each forward then backward."""
    model = build_model("seed", seed=0)
    calls = []
    forward, backward = model.layers[0].forward, model.layers[0].backward
    monkeypatch.setattr(model.layers[0], "forward", lambda h, train: calls.append(("f", len(h))) or forward(h, train))
    monkeypatch.setattr(model.layers[0], "backward",
                        lambda d, c, need_dx: calls.append(("b", c[1].shape[1])) or backward(d, c, need_dx))
    model.loss_and_grads(*batch(64))
    assert calls == [("f", 16), ("b", 16 * 28 * 28)] * 4


def test_loss_and_grads_runs_batchnorm_models_whole(monkeypatch):
    """Batch statistics couple the samples: such a model never runs in chunks, so its
    gradients and running statistics are exactly those of one whole-batch step."""
    monkeypatch.setattr(model_module.Model, "CPU_CHUNK", 2)
    chunked, whole = (build_model(SMALL_SPEC, seed=5, dtype="float64") for _ in range(2))
    x, y = batch(7, (2, 9, 8), 5, seed=1, dtype=np.float64)
    loss, logits, grads = chunked.loss_and_grads(x, y)
    want_loss, want_logits, want_grads = _whole_batch_step(whole, x, y)
    assert loss == want_loss
    np.testing.assert_array_equal(logits, want_logits)
    for k in grads:
        np.testing.assert_array_equal(grads[k], want_grads[k])
    for k in chunked.state:
        np.testing.assert_array_equal(chunked.state[k], whole.state[k])


@pytest.mark.parametrize("labels,needle", [
    (np.array([0, 1, 5, 2, 0]), r"labels must lie in \[0, 5\), got range \[0, 5\]"),
    (np.array([0, 1, -1, 2, 0], dtype=np.int8), r"labels must lie in \[0, 5\), got range \[-1, 2\]"),
    (np.array([0.0, 1.0, 2.0, 3.0, 4.0]), "labels must be integers, got dtype float64"),
    (np.array([0, 1, 2]), r"labels must have shape \(5,\), got \(3,\)")])
def test_refused_labels_leave_the_batchnorm_statistics_as_they_were(labels, needle):
    """The forward pass ran, moving the running mean and variance towards the batch, before the loss
    refused the labels: a refused step changed the model."""
    model = build_model(SMALL_SPEC, seed=0)
    state = {k: v.copy() for k, v in model.state.items()}
    x, _ = batch(5, (2, 9, 8), 5)
    with pytest.raises(ShapeError, match=needle):
        model.loss_and_grads(x, labels)
    for k, v in model.state.items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)


def test_loss_and_grads_checks_labels_before_running(monkeypatch):
    model = build_model("light", seed=0)
    x, y = batch(64)
    with pytest.raises(ShapeError, match=r"labels must have shape \(64,\), got \(63,\)"):
        model.loss_and_grads(x, y[:63])
    with pytest.raises(ShapeError, match=r"labels must lie in \[0, 10\)"):
        model.loss_and_grads(x, np.full(64, 10))
    with pytest.raises(ShapeError, match=r"model input must have shape"):
        model.loss_and_grads(x[:, :, :27], y)
    assert all(lyr.batch_mask is None and lyr.sample_offset == 0 for lyr in model.layers if isinstance(lyr, Dropout))


def test_softmax_cross_entropy_total_divides_by_the_whole_batch():
    """Two chunks with ``total`` add up to the whole batch's loss and gradient rows."""
    logits = np.random.default_rng(3).standard_normal((6, 4))
    y = np.array([0, 3, 1, 1, 2, 0])
    loss, d = softmax_cross_entropy(logits, y)
    parts = [softmax_cross_entropy(logits[a:b], y[a:b], total=6) for a, b in ((0, 2), (2, 6))]
    assert parts[0][0] + parts[1][0] == pytest.approx(loss, rel=1e-15)
    np.testing.assert_array_equal(np.concatenate([parts[0][1], parts[1][1]]), d)
    for bad in (1, 0, 2.0, True):
        with pytest.raises(ShapeError, match="total must be an int >= the 2 rows"):
            softmax_cross_entropy(logits[:2], y[:2], total=bad)


# --------------------------------------------------------------------------- determinism

def test_same_seed_same_params_different_seed_different():
    a, b, c = (build_model(SMALL_SPEC, seed=s) for s in (9, 9, 10))
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert any(not np.array_equal(a.params[k], c.params[k]) for k in a.params if k.endswith("weight"))


def test_same_seed_same_dropout_masks():
    a, b, c = (build_model("light", seed=s) for s in (21, 21, 22))
    for lyr in c.layers:     # same weights for c, so only its masks differ
        for k, v in lyr.parameters.items():
            v[...] = a.params[f"{lyr.name}.{k}"]
    x, _ = batch(8)
    outs = {m: [m.forward(x, train=True) for _ in range(3)] for m in (a, b, c)}
    for oa, ob, oc in zip(outs[a], outs[b], outs[c]):
        np.testing.assert_array_equal(oa, ob)
        assert not np.array_equal(oa, oc)
    assert not np.array_equal(outs[a][0], outs[a][1])        # a fresh mask each step
    np.testing.assert_array_equal(a.forward(x, train=False), c.forward(x, train=False))
    assert isinstance(a.layers[9], Dropout)


def test_reseed_makes_the_dropout_masks_a_function_of_the_seed_alone():
    """What a trainer relies on: after ``reseed(s)`` the masks depend on s, not on
    the model's build seed or on what it computed before (dropout inside a
    residual block included)."""
    spec = {"input_shape": [1, 6, 6], "layers": [
        {"type": "flatten"}, {"type": "dense", "units": 16}, {"type": "dropout", "p": 0.5},
        {"type": "residual", "layers": [{"type": "dense", "units": 16}, {"type": "dropout", "p": 0.5}]},
        {"type": "dense", "units": 3}]}
    a, b = build_model(spec, seed=1), build_model(spec, seed=2)
    b.assign(a.params)
    x = np.random.default_rng(0).standard_normal((5, 1, 6, 6)).astype(np.float32)
    b.forward(x, train=True)                         # b's streams have moved on; a's have not
    a.reseed((7, 0, 3))
    b.reseed((7, 0, 3))
    out_a = a.forward(x, train=True)
    np.testing.assert_array_equal(out_a, b.forward(x, train=True))
    a.reseed((7, 0, 3))
    np.testing.assert_array_equal(out_a, a.forward(x, train=True))   # the same masks again
    a.reseed((7, 0, 4))
    assert not np.array_equal(out_a, a.forward(x, train=True))       # another batch, other masks
    b.reseed((7, 0, 3))                              # the residual's inner dropout is reseeded too:
    b.layers[2].p = 0.0                              # with the outer one off, only it is left to differ
    a.reseed((7, 0, 3))
    a.layers[2].p = 0.0
    np.testing.assert_array_equal(a.forward(x, train=True), b.forward(x, train=True))
    a.reseed((7, 0, 3))
    b.reseed((7, 0, 5))
    assert not np.array_equal(a.forward(x, train=True), b.forward(x, train=True))


def test_assign_copies_a_subset_in_place_and_checks_everything_first():
    model = build_model("light", seed=0)
    w = model.params["fc2.weight"]
    model.assign({"fc2.weight": np.ones(w.shape, np.float32)})
    assert model.params["fc2.weight"] is w and np.all(w == 1)
    before = model.params["fc1.bias"].copy()
    with pytest.raises(ShapeError, match="no parameter or state named 'nope'"):
        model.assign({"fc1.bias": np.zeros_like(before) + 5, "nope": np.zeros(3)})
    with pytest.raises(ShapeError, match="fc1.bias: shape"):
        model.assign({"fc1.bias": np.zeros(3, np.float32)})
    np.testing.assert_array_equal(model.params["fc1.bias"], before)   # nothing copied on error


def test_the_readmes_engine_example_runs_as_it_says():
    """README's example of the engine's API (build, forward, loss, backward, loss_and_grads) and its
    words on model.params were run by no test: a renamed function or keyword left readers code
    that raises."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.search(r"```python\n(from cnn_core import .*?)```", readme, re.S).group(1)
    rng = np.random.default_rng(0)
    names = {"x": rng.random((3, 1, 28, 28), dtype=np.float32), "y": np.array([0, 7, 9])}
    exec(compile(example, "README.md", "exec"), names)
    model, grads = names["model"], names["grads"]
    before = {name: value.copy() for name, value in model.params.items()}
    model.forward(names["x"], train=True)
    backward = model.backward(softmax_cross_entropy(names["logits"], names["y"])[1])
    # "same keys/shapes as model.params; updates nothing", and the shapes README quotes
    assert list(backward) == list(grads) == list(model.params)
    assert all(backward[k].shape == grads[k].shape == model.params[k].shape for k in grads)
    assert all(np.array_equal(before[k], model.params[k]) for k in before)
    assert model.params["conv1.weight"].shape == (32, 1, 3, 3) and model.params["fc1.weight"].shape == (3136, 128)
    assert names["logits"].shape == (3, 10) and np.isfinite(names["loss"])


def test_a_chunked_step_takes_each_dense_weight_gradient_once_not_once_a_chunk_as_well(monkeypatch):
    """Besides the one product over the whole batch, each chunk's backward took the dense weight
    gradients again (the values the same, the work meant to be saved done anyway)."""
    from cnn_core.layers import Dense
    monkeypatch.setattr(model_module.Model, "CPU_CHUNK", 2)
    spec = {"input_shape": [1, 2, 3], "layers": [{"type": "flatten"}, {"type": "dense", "name": "hidden", "units": 4},
                                                 {"type": "relu"}, {"type": "dense", "name": "out", "units": 3}]}
    model = build_model(spec, seed=1, dtype="float64")
    products, weight_grad_of = [], Dense.weight_grad_of
    monkeypatch.setattr(Dense, "weight_grad_of", staticmethod(lambda x, dout: products.append(len(x)) or
                                                              weight_grad_of(x, dout)))
    grads = model.loss_and_grads(*batch(5, (1, 2, 3), 3, seed=2, dtype=np.float64))[2]
    assert products == [5, 5], products             # one a layer, over the 5 rows of the 3 chunks
    assert list(grads) == list(model.params)
