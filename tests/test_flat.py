"""cnn_core.flat: named arrays back to back in one buffer, and models built on it."""
import copy
import operator

import numpy as np
import pytest

from cnn_core import build_model
from cnn_core.errors import ShapeError
from cnn_core.flat import FlatArrays, all_finite, same_layout


def test_pack_lays_arrays_back_to_back_as_views():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([7, 8, 9], dtype=np.float32)
    fa = FlatArrays.pack({"w": w, "b": b})
    assert fa.specs == (("w", (2, 3)), ("b", (3,)))
    np.testing.assert_array_equal(fa.flat, np.arange(10, dtype=np.float32)[[0, 1, 2, 3, 4, 5, 7, 8, 9]])
    fa["b"][1] = -1                     # a view: writes land in the buffer
    assert fa.flat[7] == -1 and b[1] == 8   # ... and pack copied its inputs
    fa.flat[0] = 42
    assert fa["w"][0, 0] == 42
    assert list(fa) == ["w", "b"] and dict(fa).keys() == {"w", "b"}


def test_names_are_fixed_but_in_place_operators_work():
    fa = FlatArrays.zeros([("a", (2,)), ("s", ())], np.float64)
    fa["a"] += 3                        # Python stores the same object back: allowed
    np.testing.assert_array_equal(fa.flat, [3, 3, 0])
    with pytest.raises(TypeError, match="names are fixed"):
        fa["a"] = np.ones(2)
    for mutate in (lambda: fa.pop("a"), lambda: fa.update(a=1), lambda: fa.clear(), lambda: fa.__delitem__("a"),
                   lambda: operator.ior(fa, {"a": 1})):    # fa |= ...: replaced the view with 1, silently
        with pytest.raises(TypeError, match="names are fixed"):
            mutate()
    assert fa.specs == (("a", (2,)), ("s", ()))
    assert fa["a"].base is fa.flat


def test_copy_and_deepcopy_own_their_buffers():
    fa = FlatArrays.pack({"x": np.ones((2, 2))})
    for other in (fa.copy(), copy.deepcopy(fa)):
        assert isinstance(other, FlatArrays) and other.specs == fa.specs
        other["x"][...] = 5
        np.testing.assert_array_equal(fa["x"], 1.0)
        assert other.flat[0] == 5


def test_bad_buffers_and_dtypes_are_named():
    with pytest.raises(ShapeError, match=r"buffer of shape \(5,\) cannot hold 2 arrays of 6 elements"):
        FlatArrays([("a", (2,)), ("b", (4,))], np.zeros(5))
    with pytest.raises(ShapeError, match="duplicate array names"):
        FlatArrays([("a", (2,)), ("a", (1,))], np.zeros(3))
    with pytest.raises(ShapeError, match="'b' has dtype float64, expected float32"):
        FlatArrays.pack({"a": np.zeros(2, np.float32), "b": np.zeros(2)})


def test_pack_checks_against_the_dtype_asked_for():
    with pytest.raises(ShapeError, match="'a' has dtype float32, expected float64"):
        FlatArrays.pack({"a": np.zeros(2, np.float32)}, dtype=np.float64)
    assert FlatArrays.pack({"a": np.zeros(2)}, dtype="float64").flat.dtype == np.float64
    empty = FlatArrays.pack({}, dtype=np.float64)       # a model without state: no arrays, the same dtype
    assert empty.flat.dtype == np.float64 and empty.flat.size == 0 and not empty


def test_all_finite_is_exact_where_the_sum_of_squares_overflows():
    huge = np.full(4, 1e30, np.float32)                 # finite; the sum of its squares is inf in float32
    assert all_finite(huge)
    for bad in (np.nan, np.inf, -np.inf):
        other = huge.copy()
        other[2] = bad
        assert not all_finite(other)
    assert all_finite(np.zeros(0, np.float32))


def test_same_layout():
    a = FlatArrays.pack({"w": np.zeros((2, 2), np.float32)})
    assert same_layout(a, a.copy())
    assert not same_layout(a, FlatArrays.pack({"w": np.zeros(4, np.float32)}))
    assert not same_layout(a, FlatArrays.pack({"w": np.zeros((2, 2))}))
    assert not same_layout(a, dict(a))


RESIDUAL_SPEC = {"input_shape": [1, 6, 6], "layers": [
    {"type": "conv2d", "name": "stem", "out_channels": 3, "kernel": 3, "padding": 1},
    {"type": "residual", "name": "res", "layers": [
        {"type": "conv2d", "name": "a", "out_channels": 3, "kernel": 3, "padding": 1},
        {"type": "batchnorm2d", "name": "bn"},
        {"type": "residual", "name": "inner", "layers": [
            {"type": "conv2d", "name": "b", "out_channels": 3, "kernel": 3, "padding": 1}]}]},
    {"type": "flatten"}, {"type": "dense", "name": "out", "units": 4}]}


@pytest.mark.parametrize("spec", ["seed", RESIDUAL_SPEC], ids=["seed", "nested-residual"])
def test_model_parameters_are_views_of_one_buffer_the_layers_use(spec):
    model = build_model(spec, seed=0, dtype="float64")
    assert isinstance(model.params, FlatArrays)
    assert model.params.flat.size == model.num_parameters()
    x = np.random.default_rng(0).standard_normal((2, *model.spec["input_shape"]))
    before = model.forward(x, train=False)
    model.params.flat[...] = 0.0        # zero every parameter through the buffer
    after = model.forward(x, train=False)
    assert np.abs(before).max() > 0 and np.array_equal(after, np.zeros_like(after))


def test_the_layout_cache_is_bounded_and_keeps_serving_the_layouts_in_use():
    """A peer cycling through made-up layouts (each message of a server decodes one) must not
    pin memory, nor crowd the model's own layout out of the cache for good."""
    from cnn_core import flat
    mine = (("w", (3, 2)), ("b", (2,)))
    FlatArrays(mine, np.zeros(8, np.float32))
    for i in range(5 * flat._LAYOUTS_MAX):
        FlatArrays(((f"junk{i}-" + "x" * 100, (1,)),), np.zeros(1, np.float32))
        assert len(flat._LAYOUTS) <= flat._LAYOUTS_MAX
    FlatArrays(mine, np.zeros(8, np.float32))
    assert mine in flat._LAYOUTS
