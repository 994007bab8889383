"""Optimizers and learning-rate schedules.

Expected values are written out from the textbook formulas (scalar arithmetic
per element), never from the implementation under test.
"""
import json
import math

import numpy as np
import pytest

from cnn_core.errors import CheckpointError, ConfigError, ShapeError
from cnn_core.flat import FlatArrays
from cnn_core.optim import MIN_EPS, OPTIMIZERS, SGD, Adam, AdamW, Optimizer, build_optimizer
from cnn_core.schedules import (ConstantSchedule, CosineSchedule, StepSchedule, WarmupSchedule,
                                build_schedule)

W0 = [1.0, -2.0]
GRADS = [[0.5, -1.0], [-0.25, 2.0], [1.0, 0.0]]


def run(opt: Optimizer, w0=W0, grads=GRADS, dtype=np.float64):
    """Apply ``opt`` to one parameter "w" for each gradient; returns the weights after each step."""
    params = {"w": np.array(w0, dtype=dtype)}
    history = []
    for g in grads:
        opt.step(params, {"w": np.array(g, dtype=dtype)})
        history.append(params["w"].copy())
    return history


def reference(rule, state, w0=W0, grads=GRADS):
    """Per-element scalar reference: ``rule(i, k, w, g, state) -> new w`` for step k = 1, 2, ..."""
    w = list(w0)
    history = []
    for k, g in enumerate(grads, start=1):
        w = [rule(i, k, w[i], g[i], state) for i in range(len(w))]
        history.append(np.array(w))
    return history


def assert_history(actual, expected, rtol=1e-12, atol=1e-12):
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected, strict=True), start=1):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"step {step}")


# ---------------------------------------------------------------------- SGD
def test_sgd_plain_hand_values():
    hist = run(SGD(lr=0.1))
    # w -= 0.1 * g
    assert_history(hist, [[0.95, -1.9], [0.975, -2.1], [0.875, -2.1]])


def test_sgd_momentum_hand_values():
    hist = run(SGD(lr=0.1, momentum=0.9))
    # v = 0.9 v + g;  w -= 0.1 v
    # v1 = [0.5, -1]          w1 = [0.95, -1.9]
    # v2 = [0.2, 1.1]         w2 = [0.93, -2.01]
    # v3 = [1.18, 0.99]       w3 = [0.812, -2.109]
    assert_history(hist, [[0.95, -1.9], [0.93, -2.01], [0.812, -2.109]])


def test_sgd_nesterov_hand_values():
    hist = run(SGD(lr=0.1, momentum=0.9, nesterov=True))
    # v = 0.9 v + g;  w -= 0.1 (g + 0.9 v)
    # v1 = [0.5, -1]     step1 = [0.95, -1.9]     w1 = [0.905, -1.81]
    # v2 = [0.2, 1.1]    step2 = [-0.07, 2.99]    w2 = [0.912, -2.109]
    # v3 = [1.18, 0.99]  step3 = [2.062, 0.891]   w3 = [0.7058, -2.1981]
    assert_history(hist, [[0.905, -1.81], [0.912, -2.109], [0.7058, -2.1981]])


def test_nesterov_equals_cs231n_lookahead_and_differs_from_momentum():
    lr, mu = 0.1, 0.9

    def cs231n_nesterov(i, k, w, g, state):
        # CS231n: v_prev = v; v = mu v - lr g; w += -mu v_prev + (1 + mu) v
        v_prev = state.get(i, 0.0)
        v = state[i] = mu * v_prev - lr * g
        return w - mu * v_prev + (1 + mu) * v

    def cs231n_momentum(i, k, w, g, state):
        v = state[i] = mu * state.get(i, 0.0) - lr * g
        return w + v

    nesterov = run(SGD(lr=lr, momentum=mu, nesterov=True))
    momentum = run(SGD(lr=lr, momentum=mu))
    assert_history(nesterov, reference(cs231n_nesterov, {}))
    assert_history(momentum, reference(cs231n_momentum, {}))
    # The first step differs already: Nesterov moves by lr * (1 + mu) * g.
    np.testing.assert_allclose(W0[0] - nesterov[0][0], lr * (1 + mu) * 0.5)
    np.testing.assert_allclose(W0[0] - momentum[0][0], lr * 0.5)
    assert not np.allclose(nesterov[-1], momentum[-1])


# ---------------------------------------------------------------------- adaptive rules
def test_adagrad_hand_values():
    lr, eps = 0.1, 1e-8
    hist = run(build_optimizer("adagrad", lr=lr, eps=eps))
    # cache += g^2;  w -= lr g / (sqrt(cache) + eps)
    w1 = [1.0 - lr * 0.5 / (0.5 + eps), -2.0 + lr * 1.0 / (1.0 + eps)]
    w2 = [w1[0] + lr * 0.25 / (math.sqrt(0.25 + 0.0625) + eps),
          w1[1] - lr * 2.0 / (math.sqrt(1.0 + 4.0) + eps)]
    w3 = [w2[0] - lr * 1.0 / (math.sqrt(0.3125 + 1.0) + eps), w2[1]]
    assert_history(hist, [w1, w2, w3])
    np.testing.assert_allclose(hist[0], [0.9, -1.9], atol=1e-8)


def test_rmsprop_hand_values():
    lr, rho, eps = 0.01, 0.9, 1e-8
    hist = run(build_optimizer("rmsprop", lr=lr, rho=rho, eps=eps))
    # cache = rho cache + (1 - rho) g^2;  w -= lr g / (sqrt(cache) + eps)
    c1 = [0.1 * 0.25, 0.1 * 1.0]
    w1 = [1.0 - lr * 0.5 / (math.sqrt(c1[0]) + eps), -2.0 + lr * 1.0 / (math.sqrt(c1[1]) + eps)]
    c2 = [0.9 * c1[0] + 0.1 * 0.0625, 0.9 * c1[1] + 0.1 * 4.0]
    w2 = [w1[0] + lr * 0.25 / (math.sqrt(c2[0]) + eps), w1[1] - lr * 2.0 / (math.sqrt(c2[1]) + eps)]
    c3 = [0.9 * c2[0] + 0.1 * 1.0, 0.9 * c2[1]]
    w3 = [w2[0] - lr * 1.0 / (math.sqrt(c3[0]) + eps), w2[1]]
    assert_history(hist, [w1, w2, w3])
    # First step: lr / sqrt(1 - rho) per unit of sign(g), i.e. about 0.0316.
    np.testing.assert_allclose(hist[0], [1.0 - 0.01 / math.sqrt(0.1), -2.0 + 0.01 / math.sqrt(0.1)], rtol=1e-7)


def adam_rule(lr, b1, b2, eps, decay=0.0):
    def rule(i, k, w, g, state):
        m = state[("m", i)] = b1 * state.get(("m", i), 0.0) + (1 - b1) * g
        v = state[("v", i)] = b2 * state.get(("v", i), 0.0) + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** k)
        v_hat = v / (1 - b2 ** k)
        w = w * (1 - lr * decay)
        return w - lr * m_hat / (math.sqrt(v_hat) + eps)
    return rule


def test_adam_hand_values():
    hist = run(Adam(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8))
    assert_history(hist, reference(adam_rule(0.1, 0.9, 0.999, 1e-8), {}))
    # Step 1 moves every coordinate by lr * sign(g) (m_hat = g, v_hat = g^2).
    np.testing.assert_allclose(hist[0], [0.9, -1.9], atol=1e-8)
    # Step 2, first coordinate, written out: m = 0.9*0.05 + 0.1*(-0.25) = 0.02,
    # v = 0.999*0.00025 + 0.001*0.0625 = 0.00031225.
    w1 = 1.0 - 0.1 * 0.5 / (0.5 + 1e-8)
    m_hat, v_hat = 0.02 / (1 - 0.81), 0.00031225 / (1 - 0.999 ** 2)
    np.testing.assert_allclose(hist[1][0], w1 - 0.1 * m_hat / (math.sqrt(v_hat) + 1e-8), rtol=1e-12)


def test_adamw_hand_values_and_decoupled_decay():
    lr, wd = 0.1, 0.1
    hist = run(AdamW(lr=lr, weight_decay=wd))
    assert_history(hist, reference(adam_rule(lr, 0.9, 0.999, 1e-8, decay=wd), {}))
    # Step 1: w * (1 - 0.01) - 0.1 * sign(g)
    np.testing.assert_allclose(hist[0], [0.99 - 0.1, -1.98 + 0.1], atol=1e-8)


def test_adamw_decay_is_not_rescaled_like_l2():
    # With zero gradients AdamW shrinks the weights by exactly (1 - lr wd) per step,
    zeros = [[0.0, 0.0]] * 3
    hist = run(AdamW(lr=0.1, weight_decay=0.5), grads=zeros)
    assert_history(hist, [[1.0 * 0.95 ** k, -2.0 * 0.95 ** k] for k in (1, 2, 3)])
    # whereas Adam's coupled l2 gradient (l2 * w) is normalized away: each step
    # moves by about lr whatever the weight's size.
    hist_l2 = run(Adam(lr=0.1, l2=0.5), grads=zeros)
    np.testing.assert_allclose(hist_l2[0], [0.9, -1.9], atol=1e-7)


# ---------------------------------------------------------------------- regularization
def test_adamw_decay_uses_the_scheduled_lr():
    # torch.optim.AdamW decays by the rate of this step: during warm-up, lr * (k / 2) for step k.
    zeros = [[0.0, 0.0]] * 2
    hist = run(AdamW(lr=0.1, weight_decay=0.5, schedule={"name": "constant", "warmup_steps": 2}), grads=zeros)
    assert_history(hist, [[0.975, -1.95], [0.975 * 0.95, -1.95 * 0.95]])


def test_l2_and_l1_are_added_to_the_gradient():
    w0, g = [1.0, -2.0, 0.0], [[0.5, -1.0, 0.25]]
    # g' = g + l2 w + l1 sign(w); sign(0) = 0 so a zero weight gets no L1 push.
    hist = run(SGD(lr=0.1, l2=0.5, l1=0.2), w0=w0, grads=g)
    g_eff = [0.5 + 0.5 * 1.0 + 0.2, -1.0 + 0.5 * -2.0 - 0.2, 0.25]
    assert_history(hist, [[w0[i] - 0.1 * g_eff[i] for i in range(3)]])
    hist = run(SGD(lr=0.1, l1=0.2), w0=w0, grads=g)
    assert_history(hist, [[1.0 - 0.1 * 0.7, -2.0 + 0.1 * 1.2, 0.0 - 0.1 * 0.25]])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_l2_equals_gradient_plus_l2_w(name):
    # Any rule with l2 equals the same rule fed dw + l2 * w by hand.
    w0, grads = np.array([0.3, -1.2, 2.0]), [np.array([0.1, 0.4, -0.7]), np.array([-0.5, 0.2, 0.3])]
    a = build_optimizer(name, lr=0.05, l2=0.3)
    b = build_optimizer(name, lr=0.05)
    pa, pb = {"w": w0.copy()}, {"w": w0.copy()}
    for g in grads:
        a.step(pa, {"w": g})
        b.step(pb, {"w": g + 0.3 * pb["w"]})
    np.testing.assert_allclose(pa["w"], pb["w"], rtol=1e-14)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("reg", [{}, {"l2": 0.1, "l1": 0.01}])
def test_gradients_are_never_modified(name, reg):
    g = np.array([0.5, -1.0, 0.25])
    keep = g.copy()
    opt = build_optimizer(name, lr=0.1, **reg)
    opt.step({"w": np.array([1.0, 2.0, 3.0])}, {"w": g})
    np.testing.assert_array_equal(g, keep)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_float32_stays_float32(name):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    w64 = w.astype(np.float64)
    opt, opt64 = build_optimizer(name, lr=0.01, l2=1e-3), build_optimizer(name, lr=0.01, l2=1e-3)
    for _ in range(3):
        g = rng.standard_normal((4, 3)).astype(np.float32)
        opt.step({"w": w}, {"w": g})
        opt64.step({"w": w64}, {"w": g.astype(np.float64)})
    assert w.dtype == np.float32
    assert all(a.dtype == np.float32 for a in opt.state["w"].values() if isinstance(a, np.ndarray))
    np.testing.assert_allclose(w, w64, rtol=1e-5, atol=1e-6)


def test_update_is_in_place_and_returns_w_and_state():
    opt = Adam(lr=0.1)
    w = np.array([1.0, -2.0])
    state = {}
    out, state_out = opt.update(w, np.array([0.5, -1.0]), state, 0.1)
    assert out is w and state_out is state
    assert set(state) == {"m", "v", "step"} and state["step"] == 1
    np.testing.assert_allclose(w, [0.9, -1.9], atol=1e-8)


@pytest.mark.parametrize("config", [{"name": "sgd"}, {"name": "sgd", "momentum": 0.9}, {"name": "adam"},
                                    {"name": "rmsprop", "l2": 0.1}])
def test_update_refuses_a_gradient_of_another_shape(config):
    """A (4,) gradient for a (3, 4) parameter broadcast over every row, a wrong update without a word
    (step checks its gradients; update, the per-parameter rule it documents, did not)."""
    opt = build_optimizer({**config, "lr": 0.1})
    w, state = np.ones((3, 4)), {}
    for dw, got in ((np.ones(4), r"numpy float64 \(4,\)"), ([1.0] * 12, "a list")):
        with pytest.raises(ShapeError, match=rf"^{config['name']}.update: the gradient is {got} but the parameter "
                                             r"is numpy float64 \(3, 4\)$"):
            opt.update(w, dw, state, 0.1)
    np.testing.assert_array_equal(w, np.ones((3, 4)))
    assert state == {}


# ---------------------------------------------------------------------- step / schedules in optimizers
def test_step_uses_schedule_and_counts():
    opt = SGD(lr=0.1, schedule={"name": "step", "step_size": 2, "gamma": 0.5})
    params = {"w": np.array([1.0])}
    lrs = [opt.step(params, {"w": np.array([1.0])}) for _ in range(5)]
    assert lrs == [0.1, 0.1, 0.05, 0.05, 0.025]
    assert opt.t == 5 and opt.current_lr() == 0.025
    np.testing.assert_allclose(params["w"], [1.0 - sum(lrs)])


def test_step_rejects_mismatched_grads_and_changes_nothing():
    opt = Adam(lr=0.1)
    params = {"conv1.weight": np.ones((2, 3)), "conv1.bias": np.zeros(2)}
    good = {"conv1.weight": np.ones((2, 3)), "conv1.bias": np.ones(2)}
    cases = [
        ({"conv1.weight": good["conv1.weight"]}, "no gradient for parameter conv1.bias"),
        ({**good, "fc9.weight": np.ones(1)}, "gradient fc9.weight has no matching parameter"),
        ({**good, "conv1.bias": np.ones(3)}, "gradient for conv1.bias is numpy float64 (3,)"),
        ({**good, "conv1.weight": np.ones((2, 3), dtype=np.float32)}, "conv1.weight is numpy float32"),
        ({**good, "conv1.bias": [1.0, 1.0]}, "gradient for conv1.bias is a list"),
        (list(good.values()), "grads must be a dict name -> array, got list"),
        (None, "grads must be a dict name -> array, got NoneType"),
    ]
    for grads, message in cases:
        with pytest.raises(ShapeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            opt.step(params, grads)
    with pytest.raises(ShapeError, match="params must be a dict name -> array, got list"):
        opt.step(list(params.values()), good)
    assert opt.t == 0 and opt.state == {}
    np.testing.assert_array_equal(params["conv1.bias"], 0.0)


def test_step_rejects_a_bad_schedule_steps_before_updating():
    # -3 or 1.5 used to be applied and added to t; only the next step then failed ("schedule step must be >= 0").
    opt = SGD(lr=0.1, schedule={"name": "step", "step_size": 2, "gamma": 0.5})
    params = {"w": np.ones(2)}
    for bad in (-3, 1.5, True, "2", None):
        with pytest.raises(ConfigError, match=f"sgd.step: schedule_steps must be an int >= 0, got {bad!r}"):
            opt.step(params, {"w": np.ones(2)}, schedule_steps=bad)
    assert opt.t == 0
    np.testing.assert_array_equal(params["w"], 1.0)
    assert opt.step(params, {"w": np.ones(2)}, schedule_steps=np.int64(3)) == 0.1
    assert opt.t == 3 and type(opt.t) is int and opt.current_lr() == 0.05


def test_step_with_schedule_steps_0_updates_without_moving_the_schedule():
    opt = SGD(lr=0.1, schedule={"name": "step", "step_size": 1, "gamma": 0.5})
    params = {"w": np.ones(2)}
    assert opt.step(params, {"w": np.ones(2)}, schedule_steps=0) == 0.1
    assert opt.t == 0 and opt.current_lr() == 0.1
    np.testing.assert_allclose(params["w"], 0.9)


def test_step_rejects_a_parameter_that_changed_shape():
    opt = SGD(lr=0.1, momentum=0.9)
    opt.step({"w": np.ones(3)}, {"w": np.ones(3)})
    with pytest.raises(ShapeError, match=r"parameter w has shape \(4,\) but its optimizer state has shape \(3,\)"):
        opt.step({"w": np.ones(4)}, {"w": np.ones(4)})


# ---------------------------------------------------------------------- state_dict
def _grad_stream(seed, params, n):
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(n)]


def _fresh_params():
    rng = np.random.default_rng(1)
    return {"conv1.weight": rng.standard_normal((4, 1, 3, 3)), "conv1.bias": rng.standard_normal(4),
            "fc1.weight": rng.standard_normal((6, 2))}


def _stepped(config, grads):
    """(params, optimizer): a fresh optimizer of ``config`` applied to fresh params for each of ``grads``."""
    params, opt = _fresh_params(), build_optimizer(config)
    for g in grads:
        opt.step(params, g)
    return params, opt


@pytest.mark.parametrize("config", [
    {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "l2": 1e-3},
    {"name": "sgd", "lr": 0.05},
    {"name": "adagrad", "lr": 0.05, "l1": 1e-3},
    {"name": "rmsprop", "lr": 0.01},
    {"name": "adam", "lr": 0.01, "schedule": {"name": "cosine", "total_steps": 8, "warmup_steps": 3}},
    {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
])
def test_restored_optimizer_continues_bit_exactly(config):
    grads = _grad_stream(7, _fresh_params(), 8)
    params_a, opt_a = _stepped(config, grads)                # uninterrupted
    # Interrupted at step 4: state and config go through JSON / plain arrays.
    params_b, opt_b = _stepped(config, grads[:4])
    saved = opt_b.state_dict()
    saved_params = {k: v.copy() for k, v in params_b.items()}
    saved_config = json.loads(json.dumps(opt_b.config()))
    for g in grads[4:6]:        # the original keeps running: the snapshot must be a copy
        opt_b.step(params_b, g)
    # Resume in a fresh optimizer built from the JSON config.
    params_c, opt_c = saved_params, build_optimizer(saved_config)
    opt_c.load_state_dict(saved, params=params_c)
    assert opt_c.t == 4
    for g in grads[4:]:
        opt_c.step(params_c, g)
    for name in params_a:
        np.testing.assert_array_equal(params_c[name], params_a[name], err_msg=name)


FLAT_CONFIGS = [
    {"name": "sgd", "lr": 0.05, "momentum": 0.9, "l2": 1e-3},
    {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "l1": 1e-3},
    {"name": "sgd", "lr": 0.05},
    {"name": "adagrad", "lr": 0.05},
    {"name": "rmsprop", "lr": 0.01, "rho": 0.5},
    {"name": "adam", "lr": 0.01, "l2": 1e-2},
    {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
]


@pytest.mark.parametrize("config", FLAT_CONFIGS, ids=lambda c: c["name"])
def test_flat_update_equals_per_name_update_bit_for_bit(config, monkeypatch):
    # A block of 5 elements: blocks straddle parameter boundaries and the last one is short.
    monkeypatch.setattr(Optimizer, "FLAT_BLOCK", 5)
    grads = _grad_stream(3, _fresh_params(), 6)
    per_name, opt_a = _fresh_params(), build_optimizer(config)
    flat, opt_b = FlatArrays.pack(_fresh_params()), build_optimizer(config)
    for g in grads:
        opt_a.step(per_name, g)
        opt_b.step(flat, FlatArrays.pack(g))
    for name in per_name:
        np.testing.assert_array_equal(flat[name], per_name[name], err_msg=name)
    sd_a, sd_b = opt_a.state_dict(), opt_b.state_dict()
    assert set(sd_a) == set(sd_b)
    for key in sd_a:
        np.testing.assert_array_equal(sd_b[key], sd_a[key], err_msg=key)
    # The per-name state arrays are views of one buffer per slot (what makes it one pass).
    def owner(a):
        while a.base is not None:
            a = a.base
        return a

    for slot in opt_b._slots():
        assert len({id(owner(opt_b.state[name][slot])) for name in flat}) == 1
        assert owner(opt_b.state["conv1.weight"][slot]).size == flat.flat.size


@pytest.mark.parametrize("config", FLAT_CONFIGS[:1] + FLAT_CONFIGS[5:6], ids=lambda c: c["name"])
def test_flat_update_adopts_loaded_state_and_mixes_with_per_name_steps(config):
    grads = _grad_stream(4, _fresh_params(), 6)
    reference, _ = _stepped(config, grads)
    # Per-name steps, a checkpoint, then flat steps resumed from it.
    params, opt = _stepped(config, grads[:2])
    flat = FlatArrays.pack(params)
    opt.step(flat, FlatArrays.pack(grads[2]))                  # per-name state adopted into flat buffers
    restored = build_optimizer(config)
    restored.load_state_dict(opt.state_dict(), params=flat)    # ... and again after a checkpoint load
    for g in grads[3:]:
        restored.step(flat, FlatArrays.pack(g))
    for name in reference:
        np.testing.assert_array_equal(flat[name], reference[name], err_msg=name)


def test_flat_update_with_disagreeing_per_parameter_counters_equals_the_per_name_update():
    """One Adam step counter drives a flat update; a loaded state whose parameters have
    different counters (a hand-edited state) must be updated name by name, each with its own
    bias correction, not with one counter for all."""
    rng = np.random.default_rng(5)
    start = {"a": rng.standard_normal(4), "b": rng.standard_normal((2, 3))}
    sd = {"t": np.array(5, dtype=np.int64),
          "step/a": np.array(1, dtype=np.int64), "step/b": np.array(5, dtype=np.int64)}
    for name, w in start.items():
        sd[f"m/{name}"] = 0.1 * rng.standard_normal(w.shape)
        sd[f"v/{name}"] = 0.01 + rng.random(w.shape)
    grads = {name: rng.standard_normal(w.shape) for name, w in start.items()}
    per_name, opt_a = {k: v.copy() for k, v in start.items()}, Adam(lr=0.01)
    flat, opt_b = FlatArrays.pack(start), Adam(lr=0.01)
    opt_a.load_state_dict(sd, params=per_name)
    opt_b.load_state_dict(sd, params=flat)
    opt_a.step(per_name, grads)
    opt_b.step(flat, FlatArrays.pack(grads))
    for name in start:
        np.testing.assert_array_equal(flat[name], per_name[name], err_msg=name)
    assert opt_b.state["a"]["step"] == 2 and opt_b.state["b"]["step"] == 6
    assert opt_a.state["a"]["step"] == 2 and opt_a.state["b"]["step"] == 6


@pytest.mark.parametrize("counters_agree", [True, False])
def test_step_copy_to_receives_the_updated_weights(counters_agree, monkeypatch):
    # Disagreeing Adam counters (a hand-edited state) take the name-by-name path, which copies at the end.
    monkeypatch.setattr(Optimizer, "FLAT_BLOCK", 5)
    rng = np.random.default_rng(6)
    flat = FlatArrays.pack({"a": rng.standard_normal(4), "b": rng.standard_normal((2, 3))})
    opt = Adam(lr=0.01)
    if not counters_agree:
        sd = {"t": np.array(1, dtype=np.int64), "step/a": np.array(1, dtype=np.int64),
              "step/b": np.array(2, dtype=np.int64), "m/a": np.zeros(4), "v/a": np.zeros(4),
              "m/b": np.zeros((2, 3)), "v/b": np.zeros((2, 3))}
        opt.load_state_dict(sd, params=flat)
    copy = np.full(flat.flat.size + 3, -7.0)
    opt.step(flat, FlatArrays.pack({"a": np.ones(4), "b": np.ones((2, 3))}), copy_to=copy)
    assert not np.array_equal(flat.flat[:4], np.zeros(4))
    np.testing.assert_array_equal(copy[:flat.flat.size], flat.flat)
    np.testing.assert_array_equal(copy[flat.flat.size:], -7.0)        # past the weights: untouched


def test_step_copy_to_needs_flat_params_and_a_long_enough_1d_array():
    flat = FlatArrays.pack({"w": np.ones(3)})
    opt = SGD(lr=0.1)
    for params, grads, copy in (({"w": np.ones(3)}, {"w": np.ones(3)}, np.empty(3)),
                                (flat, FlatArrays.pack({"w": np.ones(3)}), np.empty(2)),
                                (flat, FlatArrays.pack({"w": np.ones(3)}), np.empty((3, 1)))):
        with pytest.raises(ShapeError, match="copy_to needs flat params and a 1-d array at least as long"):
            opt.step(params, grads, copy_to=copy)
    assert opt.t == 0


def test_flat_update_rejects_state_of_another_shape():
    params = FlatArrays.pack({"w": np.ones(3)})
    opt = SGD(lr=0.1, momentum=0.9)
    opt.step({"w": np.ones(4)}, {"w": np.ones(4)})
    with pytest.raises(ShapeError, match=r"parameter w has shape \(3,\) but its optimizer state has shape \(4,\)"):
        opt.step(params, FlatArrays.pack({"w": np.ones(3)}))
    np.testing.assert_array_equal(params["w"], 1.0)
    # The same after a flat step: the state is then a view of the optimizer's flat buffer.
    opt = SGD(lr=0.1, momentum=0.9)
    opt.step(FlatArrays.pack({"w": np.ones(4)}), FlatArrays.pack({"w": np.ones(4)}))
    with pytest.raises(ShapeError, match=r"parameter w has shape \(3,\) but its optimizer state has shape \(4,\)"):
        opt.step(params, FlatArrays.pack({"w": np.ones(3)}))
    np.testing.assert_array_equal(params["w"], 1.0)


def test_state_dict_layout():
    opt = Adam(lr=0.1)
    params = {"conv1.weight": np.ones((2, 1, 3, 3), dtype=np.float32), "fc1.bias": np.ones(3, dtype=np.float32)}
    opt.step(params, {k: np.full_like(v, 0.5) for k, v in params.items()})
    sd = opt.state_dict()
    assert set(sd) == {"t", "m/conv1.weight", "v/conv1.weight", "step/conv1.weight",
                       "m/fc1.bias", "v/fc1.bias", "step/fc1.bias"}
    assert sd["t"].shape == () and sd["t"].dtype == np.int64 and int(sd["t"]) == 1
    assert sd["m/conv1.weight"].dtype == np.float32 and sd["m/conv1.weight"].shape == (2, 1, 3, 3)
    np.testing.assert_allclose(sd["m/fc1.bias"], 0.05)
    assert sd["m/fc1.bias"] is not opt.state["fc1.bias"]["m"]
    assert set(SGD(lr=0.1).state_dict()) == {"t"}


def test_load_state_dict_without_params_places_state_on_next_step():
    params = {"w": np.ones(3, dtype=np.float32)}
    a = Adam(lr=0.1)
    a.step(params, {"w": np.ones(3, dtype=np.float32)})
    b = Adam(lr=0.1)
    b.load_state_dict(a.state_dict())
    pb = {"w": params["w"].copy()}
    a.step(params, {"w": np.full(3, 0.5, dtype=np.float32)})
    b.step(pb, {"w": np.full(3, 0.5, dtype=np.float32)})
    np.testing.assert_array_equal(pb["w"], params["w"])
    assert b.state["w"]["m"].dtype == np.float32


@pytest.mark.parametrize("flat", [False, True])
def test_state_loaded_without_params_for_some_parameters_only_is_refused_on_the_next_step(flat):
    """With params, load_state_dict refuses a state that lacks a parameter; without them the next step
    gave that parameter fresh zeros (Adam's first, bias-corrected step) beside the others' loaded
    state, silently.  The step refuses it as the load would have, and changes nothing."""
    params = {"w": np.ones(3, dtype=np.float32), "b": np.ones(2, dtype=np.float32)}
    if flat:
        params = FlatArrays.pack(params)
    grads = {k: np.full_like(v, 0.5) for k, v in params.items()}
    if flat:
        grads = FlatArrays.pack(grads)
    a = Adam(lr=0.1)
    a.step(params, grads)
    b = Adam(lr=0.1)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.endswith("/b")})
    before = {k: v.copy() for k, v in params.items()}
    with pytest.raises(ShapeError, match="adam optimizer state: no state for parameter b"):
        b.step(params, grads)
    for k, v in before.items():
        np.testing.assert_array_equal(params[k], v)
    assert b.t == 1


def test_load_state_dict_of_only_t_is_a_fresh_start_at_that_step():
    params = {"w": np.ones(3)}
    opt = Adam(lr=0.1)
    opt.load_state_dict({"t": np.array(5, dtype=np.int64)}, params=params)
    assert opt.t == 5 and opt.state == {}
    opt.step(params, {"w": np.ones(3)})
    assert opt.t == 6 and opt.state["w"]["step"] == 1


def test_state_loaded_with_params_takes_their_dtype():
    params = {"w": np.ones(3, dtype=np.float32)}
    a = Adam(lr=0.1)
    a.step(params, {"w": np.ones(3, dtype=np.float32)})
    sd = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in a.state_dict().items()}
    b = Adam(lr=0.1)
    b.load_state_dict(sd, params=params)
    assert b.state["w"]["m"].dtype == b.state["w"]["v"].dtype == np.float32


def test_sgd_without_momentum_keeps_no_state_and_a_json_config():
    opt = SGD(lr=0.1, momentum=np.float32(0.5))
    assert json.loads(json.dumps(opt.config()))["momentum"] == 0.5
    plain = SGD(lr=0.1)
    plain.step({"w": np.ones(2)}, {"w": np.ones(2)})
    assert set(plain.state_dict()) == {"t"}


def test_load_state_dict_copies_the_callers_arrays():
    """The caller may reuse or change the dict it loaded from: the live state must not alias it."""
    params = {"w": np.array([1.0, -2.0, 0.5])}
    source = SGD(lr=0.1, momentum=0.9)
    source.step(params, {"w": np.array([0.5, -1.0, 2.0])})
    sd = source.state_dict()
    untouched = {k: v.copy() for k, v in sd.items()}
    loaded, reference = SGD(lr=0.1, momentum=0.9), SGD(lr=0.1, momentum=0.9)
    loaded.load_state_dict(sd, params=params)
    reference.load_state_dict(untouched, params=params)
    sd["velocity/w"][...] = 99.0
    p_loaded, p_reference = {"w": params["w"].copy()}, {"w": params["w"].copy()}
    g = np.array([0.25, 0.25, -0.5])
    loaded.step(p_loaded, {"w": g})
    reference.step(p_reference, {"w": g})
    np.testing.assert_array_equal(p_loaded["w"], p_reference["w"])
    np.testing.assert_array_equal(loaded.state["w"]["velocity"], reference.state["w"]["velocity"])
    np.testing.assert_array_equal(sd["velocity/w"], 99.0)       # and the step did not write into it


def test_load_state_dict_errors():
    params = {"w": np.ones(3), "b": np.ones(2)}
    opt = Adam(lr=0.1)
    opt.step(params, {k: np.ones_like(v) for k, v in params.items()})
    good = opt.state_dict()

    def broken(**changes):
        sd = dict(good)
        for key, value in changes.items():
            key = key.replace("__", "/")
            if value is None:
                sd.pop(key)
            else:
                sd[key] = value
        return sd

    cases = [
        (broken(t=None), "missing the step counter 't'"),
        (broken(t=np.array(1.5)), r"'t' must be a non-negative 0-d integer array, got float64 \(\)$"),
        (broken(t=np.array(-1)), "'t' must be a non-negative 0-d integer array, got -1$"),      # not "int64 ()"
        # Adam's step -1 would make the first update's bias correction 1 - beta1**0 = 0.
        (broken(step__w=np.array(-1)), "'step/w' must be a non-negative 0-d integer array, got -1$"),
        (broken(m__w=np.ones(4), v__w=np.ones(4)), r"m/w has shape \(4,\) but the parameter has shape \(3,\)"),
        (broken(m__w=np.ones(4)), "slots of parameter w disagree in shape"),
        (broken(v__b=None), "parameter b lacks 'v'"),
        (broken(step__b=None), "parameter b lacks 'step'"),
        ({**good, "m/": np.ones(3)}, "unexpected key 'm/'"),
        ({**good, "velocity/w": np.ones(3)}, "unexpected key 'velocity/w'; expected 't' and 'm/<param>'"),
        ({k: v for k, v in good.items() if not k.endswith("/b")}, "no state for parameter b"),
        ({**good, "m/x": np.ones(1), "v/x": np.ones(1), "step/x": np.array(1)},
         "state for x, which is not a parameter"),
        (broken(m__w=np.ones(3, dtype=np.int64)), "'m/w' must be floating point"),
    ]
    cases += [(None, "adam optimizer state must be a dict name -> array .* got NoneType"),
              (list(good.items()), "must be a dict name -> array .* got list")]
    before = {k: v.copy() for k, v in opt.state["w"].items() if isinstance(v, np.ndarray)}
    for sd, message in cases:
        with pytest.raises(CheckpointError, match=message):
            opt.load_state_dict(sd, params=params)
    # Failed loads changed nothing.
    for k, v in before.items():
        np.testing.assert_array_equal(opt.state["w"][k], v)
    assert opt.t == 1
    # Without params the optimizer's own (already built) state is the reference.
    with pytest.raises(CheckpointError, match="no state for parameter b"):
        opt.load_state_dict({k: v for k, v in good.items() if not k.endswith("/b")})


@pytest.mark.parametrize("config,slot", [({"name": "adam"}, "v"), ({"name": "adamw"}, "v"),
                                         ({"name": "adagrad"}, "cache"), ({"name": "rmsprop"}, "cache")])
def test_load_state_dict_refuses_a_negative_sum_of_squares(config, slot):
    """A hand-edited negative second moment loaded silently, and the next step's sqrt made the
    weights NaN: pscnn train then stopped as "diverged", blaming the learning rate."""
    params = {"w": np.ones(3)}
    opt = build_optimizer({**config, "lr": 0.1})
    opt.step(params, {"w": np.ones(3)})
    state = opt.state_dict()
    state[f"{slot}/w"] = np.array([0.0, -0.25, 1.0])       # zero is a sum of squares: only the negative one
    fresh = build_optimizer({**config, "lr": 0.1})
    with pytest.raises(CheckpointError, match=rf"^{config['name']} optimizer state: '{slot}/w' holds a negative "
                                              r"value \(-0.25\); it sums squared gradients, so it is >= 0$"):
        fresh.load_state_dict(state, params=params)
    assert fresh.state == {} and fresh.t == 0
    state[f"{slot}/w"][1] = 0.0
    fresh.load_state_dict(state, params=params)
    fresh.step(params, {"w": np.ones(3)})
    assert np.isfinite(params["w"]).all()


# ---------------------------------------------------------------------- config / build
def test_config_round_trip_and_json():
    opt = SGD(lr=0.1, momentum=0.9, nesterov=True, l2=1e-4,
              schedule={"name": "cosine", "total_steps": 100, "min_lr": 0.001, "warmup_steps": 5})
    cfg = opt.config()
    assert cfg == {"name": "sgd", "lr": 0.1, "l2": 1e-4, "l1": 0.0, "momentum": 0.9, "nesterov": True,
                   "schedule": {"name": "cosine", "total_steps": 100, "min_lr": 0.001, "warmup_steps": 5}}
    again = build_optimizer(json.loads(json.dumps(cfg)))
    assert type(again) is SGD and again.config() == cfg and again.schedule == opt.schedule
    assert build_optimizer(json.dumps(cfg)).config() == cfg
    for name, cls in OPTIMIZERS.items():
        opt = build_optimizer(name)
        assert type(opt) is cls and build_optimizer(opt.config()).config() == opt.config()


def test_build_optimizer_overrides_and_defaults():
    opt = build_optimizer("adamw", lr=3e-4, weight_decay=0.05)
    assert isinstance(opt, AdamW) and opt.lr == 3e-4 and opt.weight_decay == 0.05 and opt.beta2 == 0.999
    opt = build_optimizer({"name": "sgd", "lr": 0.5}, lr=0.1, momentum=0.5)
    assert opt.lr == 0.1 and opt.momentum == 0.5
    # torch's defaults (RMSprop alpha, AdamW weight_decay), and --weight-decay's documented one
    assert build_optimizer("rmsprop").rho == 0.99 and build_optimizer("adamw").weight_decay == 0.01
    assert type(build_optimizer("AdamW")) is AdamW          # names are case-insensitive


@pytest.mark.parametrize("args, message", [
    (("adamx",), r"unknown optimizer 'adamx': expected one of \['adagrad', 'adam', 'adamw', 'rmsprop', 'sgd'\]"),
    (({"lr": 0.1},), "optimizer config needs a 'name'"),
    (({"name": "sgd", "betas": 1},),
     r"sgd: unknown hyperparameter\(s\) \['betas'\]; valid: \['lr', 'schedule', 'l2', 'l1', 'momentum', 'nesterov'\]"),
    (({"name": "sgd", "momentum": 1.0},), r"sgd: momentum must lie in \[0.0, 1.0\)"),
    (({"name": "sgd", "nesterov": True},), "nesterov=True needs momentum > 0"),
    (({"name": "sgd", "nesterov": "yes", "momentum": 0.9},), "nesterov must be true or false"),
    (({"name": "adam", "lr": -1},), r"adam: lr must lie in \(0.0, inf\)"),
    (({"name": "adam", "lr": "fast"},), "adam: lr must be a number"),
    (({"name": "adam", "l2": -0.1},), "adam: l2 must lie in"),
    (({"name": "sgd", "l1": -0.1},), r"sgd: l1 must lie in \[0.0, inf\)"),
    (({"name": "adam", "l1": float("nan")},), "adam: l1 must lie in"),
    (({"name": "sgd", "l1": "0.1"},), "sgd: l1 must be a number"),
    # an int past float's range (json reads a 1 and 400 zeros as one): float() raised OverflowError
    (({"name": "sgd", "lr": 10**400},), r"sgd: lr must lie in \(0.0, inf\), got 10{400}$"),
    (({"name": "adam", "beta2": 1.0},), "adam: beta2 must lie in"),
    (({"name": "rmsprop", "eps": 0},), "rmsprop: eps must lie in"),
    # 0 in float32 weights: a zero gradient coordinate then made the first update 0 / 0 = NaN
    (({"name": "adam", "eps": 1e-50},),
     r"adam: eps must be at least 1.18e-38, float32's smallest normal number .*, got 1e-50$"),
    (({"name": "adagrad", "eps": 1e-39},), "adagrad: eps must be at least 1.18e-38"),
    (({"name": "rmsprop", "eps": 1e-45},), "rmsprop: eps must be at least 1.18e-38"),
    (({"name": "adamw", "weight_decay": -1},), "adamw: weight_decay must lie in"),
    # w *= 1 - lr * weight_decay at every update: 0 or below zeroes or flips the weights
    (({"name": "adamw", "lr": 0.01, "weight_decay": 100},),
     r"adamw: lr \* weight_decay must be below 1, .* got lr 0.01 \* weight_decay 100 = 1$"),
    (({"name": "adamw", "lr": 0.001, "weight_decay": 1e9},), r"got lr 0.001 \* weight_decay 1e\+09 = 1e\+06"),
    (({"name": "adam", "schedule": "bogus"},), "unknown schedule 'bogus'"),
    (("{not json",), "optimizer config is not valid JSON"),
    ((3,), "optimizer config must be a name or a dict"),
])
def test_build_optimizer_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        build_optimizer(*args)


@pytest.mark.parametrize("name", ["adagrad", "rmsprop", "adam", "adamw"])
def test_the_smallest_eps_keeps_float32_weights_finite_where_a_gradient_is_0(name):
    # 1e-50 was accepted and is 0 in float32: 0 / (sqrt(0) + 0) made w[0] and w[2] NaN at once
    params = {"w": np.ones(3, np.float32)}
    opt = build_optimizer({"name": name, "eps": MIN_EPS})
    for _ in range(3):
        opt.step(params, {"w": np.array([0.0, 1.0, 0.0], np.float32)})
    assert np.isfinite(params["w"]).all() and params["w"][1] < 1.0


def test_schedule_instance_must_match_lr():
    sched = StepSchedule(0.1, step_size=10)
    assert SGD(lr=0.1, schedule=sched).schedule == sched
    with pytest.raises(ConfigError, match="schedule was built for lr=0.1 but the optimizer's lr is 0.01"):
        SGD(lr=0.01, schedule=sched)


# ---------------------------------------------------------------------- schedules
def test_constant_and_step_schedules():
    const = build_schedule(None, 0.1)
    assert isinstance(const, ConstantSchedule) and [const(s) for s in (0, 1, 10 ** 6)] == [0.1] * 3
    step = build_schedule({"name": "step", "step_size": 10, "gamma": 0.5}, 0.1)
    assert [step(s) for s in (0, 9, 10, 19, 20, 25, 30)] == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125]
    tenfold = build_schedule({"name": "step", "step_size": 10}, 1.0)     # gamma 0.1 unless given
    assert [tenfold(s) for s in (9, 10, 20)] == pytest.approx([1.0, 0.1, 0.01])


def test_cosine_schedule():
    cos = build_schedule({"name": "cosine", "total_steps": 100, "min_lr": 0.01}, 0.1)
    assert isinstance(cos, CosineSchedule)
    assert cos(0) == pytest.approx(0.1)
    assert cos(25) == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.sqrt(0.5)))   # 0.0868198...
    assert cos(50) == pytest.approx(0.055)
    assert cos(100) == pytest.approx(0.01)
    assert cos(150) == pytest.approx(0.01)       # flat after the end


def test_warmup_wraps_any_schedule():
    warm = build_schedule({"name": "constant", "warmup_steps": 4}, 0.1)
    assert isinstance(warm, WarmupSchedule)
    assert [warm(s) for s in range(6)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    warm_step = build_schedule({"name": "step", "step_size": 2, "gamma": 0.5, "warmup_steps": 4}, 0.2)
    # step(s) = 0.2 * 0.5 ** (s // 2), scaled by (s + 1) / 4 while s < 4
    assert [warm_step(s) for s in range(6)] == pytest.approx([0.05, 0.1, 0.075, 0.1, 0.05, 0.05])
    warm_cos = build_schedule({"name": "cosine", "total_steps": 10, "warmup_steps": 2}, 1.0)
    assert warm_cos(0) == pytest.approx(0.5) and warm_cos(5) == pytest.approx(0.5) and warm_cos(10) == 0.0


def test_a_warmed_up_schedule_keeps_its_schedules_name():
    assert build_schedule({"name": "cosine", "total_steps": 10, "warmup_steps": 2}, 0.1).name == "cosine"


def test_warmup_does_not_wrap_a_warmup():
    warm = build_schedule({"name": "constant", "warmup_steps": 4}, 0.1)
    with pytest.raises(ConfigError, match="warm-up must wrap a constant, step or cosine schedule"):
        WarmupSchedule(warm, 2)


@pytest.mark.parametrize("config", [
    None, "constant", {"name": "constant", "warmup_steps": 3},
    {"name": "step", "step_size": 5, "gamma": 0.3},
    {"name": "cosine", "total_steps": 50, "min_lr": 0.002, "warmup_steps": 7},
    '{"name": "cosine", "total_steps": 50}',
])
def test_schedule_config_round_trips(config):
    sched = build_schedule(config, 0.05)
    cfg = json.loads(json.dumps(sched.config()))
    again = build_schedule(cfg, 0.05)
    assert again == sched and again.config() == cfg
    assert [again(s) for s in range(0, 60, 7)] == [sched(s) for s in range(0, 60, 7)]


def test_schedules_with_other_base_rates_are_not_equal():
    assert build_schedule("constant", 0.1) != build_schedule("constant", 0.2)
    step = {"name": "step", "step_size": 5, "gamma": 0.5}
    assert build_schedule(step, 0.1) != build_schedule(step, 0.2)
    assert build_schedule(step, 0.1) == build_schedule(step, 0.1)


@pytest.mark.parametrize("config, message", [
    ("linear", r"unknown schedule 'linear': expected one of \['constant', 'cosine', 'step'\]"),
    ("step", r"step schedule: missing required key\(s\) \['step_size'\]"),
    ({"name": "step", "step_size": 10, "gama": 0.5},
     r"unknown key\(s\) \['gama'\]; valid keys: \['name', 'step_size', 'gamma', 'warmup_steps'\]"),
    ({"name": "step", "step_size": 0}, "step_size must be >= 1"),
    ({"name": "step", "step_size": 2.5}, "step_size must be an integer"),
    ({"name": "step", "step_size": 2, "gamma": 0}, "gamma must be a positive finite number"),
    ({"name": "step", "step_size": 2, "gamma": 1.5}, r"gamma must be in \(0, 1\]"),
    ({"name": "cosine", "total_steps": 10, "min_lr": 0.5}, r"min_lr must lie in \[0, lr=0.1\]"),
    # ints past float's range: is_number and float() raised OverflowError
    ({"name": "cosine", "total_steps": 10, "min_lr": 10**400}, "min_lr must be a finite number, got 10{400}$"),
    ({"name": "step", "step_size": 2, "gamma": -10**400}, "gamma must be a positive finite number, got -10{400}$"),
    ({"name": "cosine", "total_steps": 10, "warmup_steps": -1}, "warmup_steps must be >= 0"),
    ({"name": "constant", "warmup_steps": True}, "warmup_steps must be an integer"),
    ({"name": "constant", "warmup_steps": 1e300}, r"warmup_steps must be at most 9007199254740991, got 1e\+300"),
    ({"name": "step", "step_size": 10**20}, r"step_size must be at most 9007199254740991, got 1e\+20"),
    ({"name": "cosine", "total_steps": 2**53}, "total_steps must be at most 9007199254740991"),
    ("{oops", "schedule config is not valid JSON"),
    ([1, 2], "schedule config must be a name or a dict"),
    ({"name": ["cosine"], "total_steps": 10}, r"schedule name must be a string, one of \[.*\], got \['cosine'\]"),
    ({"name": {"step": 1}}, r"schedule name must be a string, one of \[.*\], got \{'step': 1\}"),
    ({"name": 3}, r"schedule name must be a string, one of \['constant', 'cosine', 'step'\], got 3"),
    ({}, r"schedule config needs a 'name': one of \['constant', 'cosine', 'step'\]"),
    ({"warmup_steps": 5}, "schedule config needs a 'name'"),
    ("[1, 2]", "schedule config must be a name or a dict, got list"),
    ('{"name": "cosine", "total_steps": 10, "decay": 2}', r"cosine schedule: unknown key\(s\) \['decay'\]"),
])
def test_schedule_errors(config, message):
    with pytest.raises(ConfigError, match=message):
        build_schedule(config, 0.1)


def test_schedule_rejects_bad_steps_and_lr():
    with pytest.raises(ConfigError, match="schedule step must be >= 0"):
        ConstantSchedule(0.1)(-1)
    for step in (True, np.True_, 1.0, "1"):         # True was taken for step 1
        with pytest.raises(ConfigError, match="schedule step must be an integer, got"):
            StepSchedule(0.1, step_size=1, gamma=0.5)(step)
    assert StepSchedule(0.1, step_size=1, gamma=0.5)(np.int64(2)) == 0.1 * 0.5 ** 2
    with pytest.raises(ConfigError, match="learning rate must be a positive finite number"):
        build_schedule(None, 0.0)
    # Public API: Optimizer checks lr itself, build_schedule and the classes must too.
    for make in (lambda: build_schedule("constant", float("inf")),
                 lambda: StepSchedule(float("inf"), step_size=1, gamma=0.5)):
        with pytest.raises(ConfigError, match="learning rate must be a positive finite number, got inf"):
            make()
    assert StepSchedule(1.0, step_size=1, gamma=0.5)(np.int64(2)) == 0.25


# ---------------------------------------------------------------------- torch cross-check
@pytest.mark.parametrize("ours, theirs", [
    ({"name": "sgd", "lr": 0.05, "momentum": 0.9, "l2": 0.01},
     ("SGD", {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01})),
    ({"name": "sgd", "lr": 0.05, "momentum": 0.8, "nesterov": True},
     ("SGD", {"lr": 0.05, "momentum": 0.8, "nesterov": True})),
    ({"name": "adagrad", "lr": 0.05, "eps": 1e-10}, ("Adagrad", {"lr": 0.05, "eps": 1e-10})),
    ({"name": "rmsprop", "lr": 0.01, "rho": 0.95}, ("RMSprop", {"lr": 0.01, "alpha": 0.95, "eps": 1e-8})),
    ({"name": "adam", "lr": 0.01, "beta1": 0.8, "l2": 0.01},
     ("Adam", {"lr": 0.01, "betas": (0.8, 0.999), "weight_decay": 0.01})),
    ({"name": "adamw", "lr": 0.01, "weight_decay": 0.1}, ("AdamW", {"lr": 0.01, "weight_decay": 0.1})),
])
def test_matches_torch(ours, theirs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((5, 4))
    grads = [rng.standard_normal((5, 4)) for _ in range(6)]
    params = {"w": w0.copy()}
    opt = build_optimizer(ours)
    for g in grads:
        opt.step(params, {"w": g})
    tw = torch.tensor(w0.copy(), requires_grad=True)
    topt = getattr(torch.optim, theirs[0])([tw], **theirs[1])
    for g in grads:
        tw.grad = torch.tensor(g)
        topt.step()
    np.testing.assert_allclose(params["w"], tw.detach().numpy(), rtol=1e-10, atol=1e-12)


def _torch_schedulers(lr_scheduler, opt, schedule: dict | None):
    """torch.optim.lr_scheduler's equivalent of a pscnn schedule config, or None for constant.

    Warm-up is LinearLR from 1/W to 1 over W - 1 steps (``(step + 1) / W``), chained with the
    schedule underneath so that it keeps counting global steps, as WarmupSchedule does.
    """
    if schedule is None:
        return None
    name, warmup = schedule["name"], schedule.get("warmup_steps", 0)
    inner = {"constant": lambda: None,
             "step": lambda: lr_scheduler.StepLR(opt, schedule["step_size"], schedule["gamma"]),
             "cosine": lambda: lr_scheduler.CosineAnnealingLR(opt, schedule["total_steps"],
                                                              schedule.get("min_lr", 0.0))}[name]()
    ramp = lr_scheduler.LinearLR(opt, 1.0 / warmup, 1.0, warmup - 1) if warmup else None
    chain = [s for s in (ramp, inner) if s is not None]
    return lr_scheduler.ChainedScheduler(chain) if len(chain) > 1 else chain[0]


LONG_STEPS = 150


@pytest.mark.parametrize("ours, theirs", [
    ({"name": "sgd", "lr": 0.05}, ("SGD", {"lr": 0.05})),
    ({"name": "sgd", "lr": 0.05, "momentum": 0.9, "l1": 1e-2}, ("SGD", {"lr": 0.05, "momentum": 0.9})),
    ({"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "l2": 1e-3,
      "schedule": {"name": "step", "step_size": 7, "gamma": 0.5, "warmup_steps": 20}},
     ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3})),
    ({"name": "adagrad", "lr": 0.05, "eps": 1e-10, "l2": 1e-2,
      "schedule": {"name": "cosine", "total_steps": LONG_STEPS, "warmup_steps": 10}},
     ("Adagrad", {"lr": 0.05, "eps": 1e-10, "weight_decay": 1e-2})),
    ({"name": "rmsprop", "lr": 0.01, "rho": 0.9, "l2": 1e-2, "l1": 1e-3,
      "schedule": {"name": "step", "step_size": 30, "gamma": 0.5}},
     ("RMSprop", {"lr": 0.01, "alpha": 0.9, "eps": 1e-8, "weight_decay": 1e-2})),
    ({"name": "adam", "lr": 0.01, "beta1": 0.5, "beta2": 0.9, "eps": 1e-6, "l2": 1e-2,
      "schedule": {"name": "cosine", "total_steps": LONG_STEPS, "min_lr": 0.001}},
     ("Adam", {"lr": 0.01, "betas": (0.5, 0.9), "eps": 1e-6, "weight_decay": 1e-2})),
    ({"name": "adamw", "lr": 0.01, "weight_decay": 0.05, "schedule": {"name": "constant", "warmup_steps": 20}},
     ("AdamW", {"lr": 0.01, "weight_decay": 0.05})),
], ids=lambda v: v["name"] if isinstance(v, dict) else None)
def test_matches_torch_over_many_steps_with_its_schedulers(ours, theirs):
    """150 float64 steps of two parameters (one a bias) against torch.optim and
    torch.optim.lr_scheduler: the weights and every step's rate.  ``l2`` is torch's
    ``weight_decay`` (the gradient of 0.5 * l2 * ||w||^2 added to the gradient); torch has no L1,
    so its gradient gets ``l1 * sign(w)`` added by hand, which is what ``l1`` means."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    w0 = {"w": rng.standard_normal((6, 5)), "b": rng.standard_normal(5)}
    grads = [{k: rng.standard_normal(v.shape) * (1 + 0.5 * math.sin(i / 9)) for k, v in w0.items()}
             for i in range(LONG_STEPS)]
    params = {k: v.copy() for k, v in w0.items()}
    opt = build_optimizer(ours)
    our_lrs = [opt.step(params, g) for g in grads]

    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in w0.items()}
    topt = getattr(torch.optim, theirs[0])(list(tparams.values()), **theirs[1])
    tsched = _torch_schedulers(torch.optim.lr_scheduler, topt, ours.get("schedule"))
    l1, their_lrs = ours.get("l1", 0.0), []
    for g in grads:
        their_lrs.append(topt.param_groups[0]["lr"])
        for k, tw in tparams.items():
            tw.grad = torch.tensor(g[k]) + l1 * torch.sign(tw.detach())
        topt.step()
        if tsched is not None:
            tsched.step()
    np.testing.assert_allclose(our_lrs, their_lrs, rtol=1e-12)
    for k, tw in tparams.items():
        np.testing.assert_allclose(params[k], tw.detach().numpy(), rtol=1e-10, atol=1e-12, err_msg=k)


# ---------------------------------------------------------------------- GPU (CuPy)
@pytest.mark.gpu
@pytest.mark.parametrize("config", [
    {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "l1": 1e-3},
    {"name": "adagrad", "lr": 0.05},
    {"name": "rmsprop", "lr": 0.01, "l2": 1e-3},
    {"name": "adam", "lr": 0.01},
    {"name": "adamw", "lr": 0.01, "weight_decay": 0.1, "schedule": {"name": "cosine", "total_steps": 4}},
])
def test_cupy_matches_numpy(config):
    from cnn_core.backend import cupy_module
    cp = cupy_module()
    if cp is None:
        pytest.skip("needs CuPy and a CUDA device")
    host = {k: v.astype(np.float32) for k, v in _fresh_params().items()}
    dev = {k: cp.asarray(v) for k, v in host.items()}
    grads = [{k: v.astype(np.float32) for k, v in g.items()} for g in _grad_stream(2, host, 4)]
    opt_h, opt_d = build_optimizer(config), build_optimizer(config)
    for g in grads[:2]:
        assert opt_h.step(host, g) == opt_d.step(dev, {k: cp.asarray(v) for k, v in g.items()})
    # Save on the GPU, restore without params: the state is moved to the GPU on the next step.
    saved = opt_d.state_dict()
    assert all(type(v) is np.ndarray for v in saved.values())
    opt_r = build_optimizer(config)
    opt_r.load_state_dict(saved)
    for g in grads[2:]:
        opt_h.step(host, g)
        opt_r.step(dev, {k: cp.asarray(v) for k, v in g.items()})
    for name in host:
        assert dev[name].dtype == cp.float32
        np.testing.assert_allclose(cp.asnumpy(dev[name]), host[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert all(isinstance(a, cp.ndarray) for s in opt_r.state.values() for a in s.values()
               if not isinstance(a, int))
    with pytest.raises(ShapeError, match="gradient for conv1.bias is numpy float32 .* but the parameter is cupy"):
        opt_r.step(dev, {**{k: cp.asarray(v) for k, v in grads[0].items()}, "conv1.bias": grads[0]["conv1.bias"]})
