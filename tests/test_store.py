"""server.store.ParameterStore: push validation, flat updates, snapshots (no sockets)."""
import re

import numpy as np
import pytest

from cnn_core.flat import FlatArrays
from pscnn import protocol as P
from server.store import ParameterStore, TrainingDiverged

BN_SPEC = {"input_shape": [1, 6, 6], "layers": [
    {"type": "conv2d", "name": "conv1", "out_channels": 2, "kernel": 3, "padding": 1},
    {"type": "batchnorm2d", "name": "bn1"}, {"type": "relu"},
    {"type": "flatten"}, {"type": "dense", "name": "fc1", "units": 3}]}


def make_store(spec="light"):
    return ParameterStore(spec, {"name": "sgd", "lr": 0.1, "momentum": 0.9})


def received(arrays: dict) -> FlatArrays | dict:
    """What the server gets for ``arrays`` after the wire (read-only views of the frames)."""
    return P.decode([bytes(memoryview(f)) for f in P.encode(P.Message(P.ACK, arrays=arrays))]).arrays


def push_of(store, fill=0.01, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {k: (rng.standard_normal(v.shape) * fill).astype(np.float32) for k, v in store.params.items()}
    arrays.update({k: np.full(v.shape, 0.5, np.float32) for k, v in store.state.items()})
    return arrays


def test_a_push_in_the_model_layout_is_used_in_place():
    store = make_store(BN_SPEC)
    arrays = received(push_of(store))
    assert isinstance(arrays, FlatArrays) and arrays.specs == store.push_specs
    grads, state = store.check_push_arrays(arrays)
    assert grads.specs == store.params.specs
    assert np.shares_memory(grads.flat, arrays.flat)           # no copy
    assert set(state) == {"bn1.running_mean", "bn1.running_var"}


def test_a_push_in_another_order_is_accepted_and_repacked():
    store = make_store()
    ordered = push_of(store)
    shuffled = dict(reversed(list(ordered.items())))
    grads, _ = store.check_push_arrays(received(shuffled))
    assert grads.specs == store.params.specs
    for name in store.params:
        np.testing.assert_array_equal(grads[name], ordered[name])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_named_on_the_fast_path(bad):
    store = make_store()
    arrays = push_of(store)
    arrays["conv2.weight"][1, 0, 2, 2] = bad
    with pytest.raises(P.ProtocolError, match="'conv2.weight' contains NaN or Inf") as exc:
        store.check_push_arrays(received(arrays))
    assert exc.value.code == "non_finite"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_named_on_the_slow_path_too(bad):
    # A push in another order is repacked: a NaN let through there reaches the weights, and the
    # run ends as diverged instead of the one push being refused.
    store = make_store()
    arrays = push_of(store)
    arrays["conv2.weight"][1, 0, 2, 2] = bad
    shuffled = dict(reversed(list(arrays.items())))
    with pytest.raises(P.ProtocolError, match="'conv2.weight' contains NaN or Inf") as exc:
        store.check_push_arrays(received(shuffled))
    assert exc.value.code == "non_finite"


RESIDUAL_BN_SPEC = {"input_shape": [1, 6, 6], "layers": [
    {"type": "conv2d", "name": "conv1", "out_channels": 2, "kernel": 3, "padding": 1},
    {"type": "residual", "name": "res1", "layers": [{"type": "batchnorm2d", "name": "bn"}]},
    {"type": "flatten"}, {"type": "dense", "name": "fc1", "units": 3}]}


@pytest.mark.parametrize("spec,name", [(BN_SPEC, "bn1.running_var"), (RESIDUAL_BN_SPEC, "res1.bn.running_var")],
                         ids=["batchnorm", "in-residual"])
@pytest.mark.parametrize("reorder", [False, True], ids=["fast-path", "slow-path"])
def test_a_pushed_negative_batchnorm_variance_is_refused(spec, name, reorder):
    # Adopted, it made every evaluation NaN and the next checkpoint one that --resume refuses.
    store = make_store(spec)
    arrays = push_of(store)
    arrays[name][1] = -0.25
    if reorder:
        arrays = dict(reversed(list(arrays.items())))
    with pytest.raises(P.ProtocolError, match=f"push: state '{re.escape(name)}' holds a negative variance") as exc:
        store.check_push_arrays(received(arrays))
    assert exc.value.code == "bad_arrays"


def test_huge_but_finite_gradients_are_not_mistaken_for_nan():
    # Their sum of squares overflows float32; the exact check decides, and accepts.
    store = make_store()
    arrays = push_of(store)
    arrays["fc1.weight"][...] = 1e30
    grads, _ = store.check_push_arrays(received(arrays))
    assert float(grads["fc1.weight"][0, 0]) == pytest.approx(1e30, rel=1e-6)


def test_apply_updates_the_model_in_place_and_snapshots_are_frozen_per_version():
    store = make_store(BN_SPEC)
    v0, snap0 = store.snapshot()
    assert store.snapshot()[1] is snap0                          # one copy per version
    assert snap0.specs == store.push_specs and not snap0.flat.flags.writeable
    assert all(not a.flags.writeable for a in snap0.values())
    before = store.params.flat.copy()
    grads, state = store.check_push_arrays(received(push_of(store)))
    store.apply(grads, state)
    assert store.version == v0 + 1
    assert not np.array_equal(store.params.flat, before)
    np.testing.assert_array_equal(snap0.flat[:before.size], before)      # the old snapshot is untouched
    v1, snap1 = store.snapshot()
    np.testing.assert_array_equal(snap1.flat[:before.size], store.params.flat)
    np.testing.assert_array_equal(snap1["bn1.running_var"], 0.5)         # adopted pushed state
    # The model the server evaluates and checkpoints is the same buffer.
    assert store.model.layers[0].parameters["weight"] is store.params["conv1.weight"]


def test_sync_rounds_apply_the_sample_weighted_mean():
    a, b = make_store(), make_store()
    g1, g2 = push_of(a, seed=1), push_of(a, seed=2)
    members = []
    for grads in (g1, g2):
        flat, state = a.check_push_arrays(received(grads))
        members.append((flat, state, 64 if grads is g1 else 16))
    a.apply_mean(members)
    mean = FlatArrays.pack({k: (64 * g1[k] + 16 * g2[k]) / np.float32(80) for k in b.params})
    b.apply(mean)
    np.testing.assert_allclose(a.params.flat, b.params.flat, rtol=1e-6, atol=1e-7)
    assert a.optimizer.t == 2 and b.optimizer.t == 1                 # two batches move the schedule twice


def test_a_sync_round_adopts_the_sample_weighted_mean_of_the_pushed_state():
    # BatchNorm statistics are averaged like the gradients; summed, they would grow with the workers.
    store = make_store(BN_SPEC)
    members = []
    for value, weight in ((0.5, 64), (0.9, 16)):
        arrays = push_of(store, seed=weight)
        arrays.update({k: np.full(v.shape, value, np.float32) for k, v in store.state.items()})
        grads, state = store.check_push_arrays(received(arrays))
        members.append((grads, state, weight))
    store.apply_mean(members)
    for name in ("bn1.running_mean", "bn1.running_var"):
        np.testing.assert_allclose(store.state[name], (64 * 0.5 + 16 * 0.9) / 80, rtol=1e-6)
        np.testing.assert_allclose(store.snapshot()[1][name], (64 * 0.5 + 16 * 0.9) / 80, rtol=1e-6)


def test_a_sync_round_of_large_but_finite_batchnorm_variances_adopts_their_finite_mean():
    # Weighted by batch size in float32, 1e37 overflowed: the server then sent an Inf variance,
    # which every worker refuses, and checkpointed it, which --resume refuses.
    store = make_store(BN_SPEC)
    members = []
    for weight in (64, 64):
        arrays = push_of(store, seed=weight)
        arrays["bn1.running_var"][...] = 1e37
        grads, state = store.check_push_arrays(received(arrays))
        members.append((grads, state, weight))
    store.apply_mean(members)
    np.testing.assert_allclose(store.state["bn1.running_var"], 1e37, rtol=1e-6)
    assert store.state["bn1.running_var"].dtype == np.float32


def test_a_sync_round_of_one_push_applies_that_gradient_as_it_is():
    # No rounding through weight and 1 / weight: one worker's round is the plain update.
    a, b = make_store(), make_store()
    grads, state = a.check_push_arrays(received(push_of(a)))
    a.apply_mean([(grads, state, 3)])                   # x 3 then x float32(1/3) would round
    grads, state = b.check_push_arrays(received(push_of(b)))
    b.apply(grads, state)
    np.testing.assert_array_equal(a.params.flat, b.params.flat)
    assert a.version == b.version == 1


def test_an_update_that_makes_the_weights_non_finite_is_refused():
    store = ParameterStore("light", {"name": "sgd", "lr": 1e10})
    before = store.params.flat.copy()
    arrays = push_of(store)
    arrays["fc1.weight"][...] = 1e30                  # finite, but lr * g overflows float32
    grads, state = store.check_push_arrays(received(arrays))
    with pytest.raises(TrainingDiverged, match="made the weights non-finite; kept version 0"):
        store.apply(grads, state)
    np.testing.assert_array_equal(store.params.flat, before)
    assert store.version == 0 and store.snapshot()[0] == 0
