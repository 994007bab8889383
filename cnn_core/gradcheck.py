"""Numerical gradient checks: analytic backward vs central differences.

Everything runs in float64.  For a layer, the scalar checked is
``sum(forward(x) * R)`` with a fixed random ``R``, whose gradient w.r.t. the
output is exactly ``R``; for a model it is the softmax cross-entropy loss.
Layers that draw random numbers (dropout) get their generator reset before
every forward pass, so each pass sees the same mask.

The report maps each parameter (and ``"input"``) to its worst error relative
to that array's gradient scale, ``max|a - n| / max(max|a|, max|n|, 1e-12)``
over the checked entries.  An entrywise ratio would flag correct code: a unit
that dropout or a ReLU silenced has an exact analytic gradient of 0 while the
numeric one is rounding noise, a ratio of 1.  For the same reason a
difference within the central differences' own resolution,
``16 * float64 eps * max(|f|, 1) / eps`` (about 1e-9 for a loss near 2 and
the default step), is not counted: a gradient that is exactly 0 (a conv bias
feeding BatchNorm, which subtracts the batch mean) would otherwise read as a
100% error, measured against nothing but that noise.
"""
from __future__ import annotations

import numpy as np

from .errors import ConfigError, ShapeError
from .losses import softmax_cross_entropy
from .model import unfused


def _relative_error(analytic: np.ndarray, numeric: np.ndarray, resolution: float) -> float:
    if not analytic.size:
        return 0.0
    scale = max(float(np.max(np.abs(analytic))), float(np.max(np.abs(numeric))), 1e-12)
    return max(float(np.max(np.abs(analytic - numeric))) - resolution, 0.0) / scale


def _resolution(f0: float, eps: float) -> float:
    """How far rounding alone moves a central difference of ``f`` (float64) with step ``eps``."""
    return 16 * np.finfo(np.float64).eps * max(abs(f0), 1.0) / eps


def _reset_rngs(layers, seed: int = 1234) -> None:
    """The same dropout masks for every forward pass of a check."""
    rng = np.random.default_rng(seed)
    for layer in layers:
        layer.reseed(rng)


def _numeric_grad(f, arr: np.ndarray, eps: float, max_entries: int | None, rng) -> tuple[np.ndarray, np.ndarray]:
    """Central differences of scalar ``f()`` w.r.t. ``arr`` (perturbed in place).

    Returns (flat indices checked, numeric gradient at those indices).
    """
    flat = arr.reshape(-1)
    idx = np.arange(flat.size)
    if max_entries is not None and flat.size > max_entries:
        idx = np.sort(rng.choice(flat.size, size=max_entries, replace=False))
    num = np.empty(idx.size)
    for k, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + eps
        plus = f()
        flat[i] = old - eps
        minus = f()
        flat[i] = old
        num[k] = (plus - minus) / (2 * eps)
    return idx, num


def gradcheck_layer(layer, x: np.ndarray, train: bool = True, eps: float = 1e-6,
                    max_entries: int | None = 200, seed: int = 0) -> dict:
    """Check a *built* float64 layer at input ``x`` (channels-last for images).

    Returns ``{"input": err, "<param>": err, ...}`` (worst relative errors).
    ``x``: (N, *layer.in_shape); ShapeError otherwise, or for a layer not built.
    A layer of a built model is checked as it runs on its own, without what the model fused
    with its neighbours (:func:`cnn_core.model.unfused`); :func:`gradcheck_model` checks
    the fused passes.
    """
    with unfused(layer):
        return _gradcheck_layer(layer, x, train, eps, max_entries, seed)


def _gradcheck_layer(layer, x: np.ndarray, train: bool, eps: float, max_entries: int | None, seed: int) -> dict:
    if layer.in_shape is None:      # its forward would fail deep inside on the shapes it lacks
        raise ShapeError(f"gradcheck_layer needs a built layer: call {layer.name}.build(in_shape, np, "
                         "np.dtype('float64'), rng) first")
    not64 = [k for k, v in layer.parameters.items() if v.dtype != np.float64]
    if not64:   # a 1e-6 step is lost to float32 rounding: the report would flag a correct backward
        raise ShapeError(f"gradcheck_layer needs a float64 layer (build it with dtype float64), "
                         f"but {layer.name}.{not64[0]} is {layer.parameters[not64[0]].dtype}")
    rng = np.random.default_rng(seed)
    x = np.array(x, dtype=np.float64)
    if x.shape[1:] != layer.in_shape:
        raise ShapeError(f"gradcheck_layer: {layer.name} takes input (N, {', '.join(map(str, layer.in_shape))}), "
                         f"got shape {x.shape}")
    state0 = {k: v.copy() for k, v in layer.state.items()}

    def run(inp):
        for k, v in state0.items():   # BatchNorm's running stats must not drift between passes
            layer.state[k][...] = v
        _reset_rngs([layer])
        return layer.forward(inp, train)

    out, _ = run(x)
    r = rng.standard_normal(out.shape)
    out, cache = run(x)
    dx, grads = layer.backward(r, cache, need_dx=True)
    resolution = _resolution(float(np.sum(out * r)), eps)
    report = {}
    idx, num = _numeric_grad(lambda: float(np.sum(run(x)[0] * r)), x, eps, max_entries, rng)
    report["input"] = _relative_error(np.asarray(dx).reshape(-1)[idx], num, resolution)
    for name, p in layer.parameters.items():
        idx, num = _numeric_grad(lambda: float(np.sum(run(x)[0] * r)), p, eps, max_entries, rng)
        report[name] = _relative_error(np.asarray(grads[name]).reshape(-1)[idx], num, resolution)
    return report


def gradcheck_model(model, x: np.ndarray, y: np.ndarray, train: bool = True, eps: float = 1e-6,
                    max_entries: int | None = 100, seed: int = 0) -> dict:
    """Check a float64 model's ``backward`` against the loss's central differences.

    Returns ``{"<param name>": worst relative error, ...}``.  ``train`` must be
    True: backward needs the caches of a training-mode forward.
    """
    if model.dtype != np.float64:
        raise ShapeError("gradcheck_model needs a float64 model (build_model(..., dtype='float64'))")
    if not train:           # refused before any pass runs, as one of pscnn's errors
        raise ConfigError(f"gradcheck_model needs train=True (backward uses the training-mode caches), "
                          f"got train={train!r}")
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float64)
    state0 = {k: v.copy() for k, v in model.state.items()}

    def loss_and_grad():
        for k, v in state0.items():
            model.state[k][...] = v
        _reset_rngs(model.layers)
        return softmax_cross_entropy(model.forward(x, train=train), y)

    loss, dlogits = loss_and_grad()
    grads = model.backward(dlogits)
    resolution = _resolution(loss, eps)
    report = {}
    for name, p in model.params.items():
        idx, num = _numeric_grad(lambda: loss_and_grad()[0], p, eps, max_entries, rng)
        report[name] = _relative_error(np.asarray(grads[name]).reshape(-1)[idx], num, resolution)
    return report
