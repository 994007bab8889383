"""Optimizers: SGD (momentum, Nesterov), AdaGrad, RMSProp, Adam, AdamW.

Each optimizer is a per-parameter update rule in the CS231n style,
``update(w, dw, state, lr) -> (w, state)``, with one ``state`` dict per
parameter name, plus :meth:`Optimizer.step` that applies the rule to a whole
``params`` dict.  That split is what the parameter server needs: it owns the
weights and the optimizer state, receives gradients and calls ``step``.

Conventions
-----------
* ``w`` is updated **in place** (the model's layers hold the same arrays) and
  the gradient arrays are never modified.
* Arrays may be NumPy or CuPy; scalars are Python floats, so float32 weights
  stay float32 (no float64 promotion) and the update costs no temporaries:
  each optimizer keeps two scratch buffers sized to its largest parameter.
* ``step`` number ``t`` (0 for the first update) gets ``lr = schedule(t)``.

Regularization
--------------
``l2`` and ``l1`` add ``l2 * w + l1 * sign(w)`` to the gradient before the
rule sees it (the gradients of ``0.5 * l2 * ||w||^2 + l1 * ||w||_1``), for every
optimizer.  For adaptive methods such a coupled penalty is rescaled per
coordinate by the running gradient statistics, so weights with large
gradients are barely decayed.  AdamW's ``weight_decay`` is *decoupled*
(Loshchilov & Hutter): it shrinks the weights directly, ``w *= 1 - lr *
weight_decay``, outside the adaptive rescaling, which is what usually works
better with Adam.  Penalties apply to every parameter passed in, biases included.

The update formulas match ``torch.optim`` (SGD, Adagrad, RMSprop, Adam, AdamW)
with the same hyperparameters; ``tests/test_optim.py`` checks them by hand and
against torch.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .config import is_integer, named_config, number_in
from .errors import CheckpointError, ConfigError, ShapeError
from .flat import FlatArrays, same_layout
from .schedules import Schedule, build_schedule


# float32's smallest normal number: a smaller eps rounds to 0 (or a subnormal) in float32 weights, and
# an eps of 0 there made the first update 0 / 0 = NaN wherever a gradient was 0 (a dead ReLU's weights).
MIN_EPS = float(np.finfo(np.float32).tiny)


def _eps(value, who: str) -> float:
    """An optimizer's ``eps``, checked: a number in [MIN_EPS, inf); ConfigError naming ``who`` otherwise."""
    eps = number_in(value, f"{who}: eps", 0.0, low_open=True)
    if eps < MIN_EPS:
        raise ConfigError(f"{who}: eps must be at least {MIN_EPS:.3g}, float32's smallest normal number "
                          f"(a smaller one is subnormal or 0 in float32, where 0 / (0 + eps) is NaN), got {eps:g}")
    return eps


def _describe(arr) -> str:
    kind = "cupy" if backend.get_array_module(arr) is not np else "numpy"
    return f"{kind} {arr.dtype} {tuple(arr.shape)}"


class Optimizer:
    """Base class of the optimizers.

    Parameters
    ----------
    lr : base learning rate (> 0).
    schedule : a schedule config (dict, name, JSON text), a
        :class:`~cnn_core.schedules.Schedule` built with the same ``lr``, or
        ``None`` for a constant rate.
    l2, l1 : coupled penalties added to the gradient (see the module docs).
    **hyper : the optimizer's own hyperparameters (``HYPER`` lists them with defaults).

    Attributes
    ----------
    state : dict name -> per-parameter state dict (arrays shaped like the parameter).
    t : number of ``step`` calls applied so far.

    An optimizer is not thread-safe (it mutates ``t``, its state and scratch
    buffers): apply updates from one thread, or hold a lock around ``step``.
    """

    name = ""
    HYPER: dict = {}          # hyperparameter -> default
    SLOTS: tuple = ()         # per-parameter arrays shaped like the parameter
    SQUARES: tuple = ()       # the slots that sum or average squared gradients: >= 0 (their sqrt is taken)
    COUNTERS: tuple = ()      # per-parameter integer counters

    def __init__(self, lr: float = 0.01, schedule=None, l2: float = 0.0, l1: float = 0.0, **hyper):
        unknown = sorted(set(hyper) - set(self.HYPER))
        if unknown:
            valid = ["lr", "schedule", "l2", "l1", *self.HYPER]
            raise ConfigError(f"{self.name}: unknown hyperparameter(s) {unknown}; valid: {valid}")
        self.lr = number_in(lr, f"{self.name}: lr", 0.0, low_open=True, high=None)
        if isinstance(schedule, Schedule) and schedule.base_lr != self.lr:
            raise ConfigError(f"{self.name}: schedule was built for lr={schedule.base_lr} "
                              f"but the optimizer's lr is {self.lr}")
        self.schedule = build_schedule(schedule, self.lr)
        self.l2 = number_in(l2, f"{self.name}: l2", 0.0)
        self.l1 = number_in(l1, f"{self.name}: l1", 0.0)
        self.hyper = {**self.HYPER, **hyper}
        self._validate_hyper()
        self.state: dict[str, dict] = {}
        self.t = 0
        self._workspace: dict = {}
        # After load_state_dict without params, the arrays are NumPy and are moved
        # next to the parameters (CuPy, their dtype) on the next step.
        self._state_on_host = False

    # ------------------------------------------------------------------ subclass API
    def _validate_hyper(self) -> None:
        """Check ``self.hyper`` and copy it to attributes (subclasses)."""

    def _rule(self, w, g, state: dict, lr: float, tmp) -> None:
        """Apply the update to ``w`` in place given the regularized gradient ``g``.

        ``tmp`` is a scratch array shaped like ``w``; ``g`` must not be written
        (it may be the caller's gradient array).
        """
        raise NotImplementedError

    def _slots(self) -> tuple:
        """Names of the per-parameter arrays of this configuration."""
        return self.SLOTS

    def slots(self) -> tuple:
        """Names of the arrays of a parameter's size that this optimizer keeps for each one (SGD
        with momentum: its velocity; Adam: its two moments): what Model.training_step_bytes counts."""
        return self._slots()

    # ------------------------------------------------------------------ updates
    def update(self, w, dw, state: dict, lr: float):
        """One update of one parameter: ``w`` (any shape) in place, given ``dw`` (same shape).

        ``state`` is this parameter's state dict, filled on first use (zeros
        shaped like ``w``) and updated in place.  Returns ``(w, state)``.
        """
        if getattr(dw, "shape", None) != w.shape:     # else a (D,) gradient broadcast over every row of w
            got = _describe(dw) if hasattr(dw, "dtype") else f"a {type(dw).__name__}"
            raise ShapeError(f"{self.name}.update: the gradient is {got} but the parameter is {_describe(w)}")
        xp = backend.get_array_module(w)
        for slot in self._slots():
            if slot not in state:
                state[slot] = xp.zeros_like(w)
        for counter in self.COUNTERS:
            state.setdefault(counter, 0)
        gbuf, tmp = self._scratch(w)
        self._regularized_rule(w, dw, state, float(lr), gbuf, tmp)
        return w, state

    def _regularized_rule(self, w, dw, state: dict, lr: float, gbuf, tmp) -> None:
        """``_rule`` on ``dw`` plus the l2/l1 penalty; ``gbuf`` and ``tmp`` are scratch like ``w``."""
        if self.l2 or self.l1:
            xp = backend.get_array_module(w)
            # g = dw + l2 * w + l1 * sign(w), built in a scratch buffer: the
            # caller's gradient stays untouched.
            if self.l2:
                xp.multiply(w, self.l2, out=gbuf)
                gbuf += dw
            else:
                xp.copyto(gbuf, dw)
            if self.l1:
                xp.sign(w, out=tmp)
                tmp *= self.l1
                gbuf += tmp
            self._rule(w, gbuf, state, lr, tmp)
        else:
            self._rule(w, dw, state, lr, gbuf)

    def step(self, params: dict, grads: dict, schedule_steps: int = 1, copy_to=None) -> float:
        """Update every parameter in ``params`` in place from ``grads``; returns the lr used.

        ``grads`` must have exactly the names of ``params`` with the same
        shapes, dtypes and array module (ShapeError naming the parameter
        otherwise, raised before anything changes).  When both are
        :class:`~cnn_core.flat.FlatArrays` of one layout (a model's params and
        a gradient received by the parameter server), the rule runs once over
        the whole buffer, block by block, with the same result.

        ``schedule_steps``: how far this update moves the learning-rate
        schedule; the parameter server passes the number of batches a sync
        round averaged, so a schedule's length is counted in batches whatever
        the number of workers.  ``copy_to``: a 1-d array of at least
        ``params.flat.size`` elements (flat params only) that receives the
        updated weights, each block copied while it is still in cache: the
        parameter server's snapshot of the new version (for the seed model,
        ~0.13 ms this way against 0.17 ms for a separate copy).
        """
        if not is_integer(schedule_steps) or schedule_steps < 0:   # else added to t, failing only the next step
            raise ConfigError(f"{self.name}.step: schedule_steps must be an int >= 0, got {schedule_steps!r}")
        flat = (same_layout(params, grads)
                and backend.get_array_module(params.flat) is backend.get_array_module(grads.flat))
        if not flat:
            self._check_grads(params, grads)
        if copy_to is not None and not (isinstance(params, FlatArrays) and copy_to.ndim == 1
                                        and copy_to.shape[0] >= params.flat.shape[0]):
            raise ShapeError(f"{self.name}.step: copy_to needs flat params and a 1-d array at least as long")
        if self._state_on_host:
            self._place_state(params, error=ShapeError)
        lr = self.schedule(self.t)
        if not (flat and self._step_flat(params, grads, lr, copy_to)):
            for name, w in params.items():
                state = self.state.get(name)
                if state is None:
                    state = self.state[name] = {}
                self.update(w, grads[name], state, lr)
            if copy_to is not None:
                copy_to[:params.flat.shape[0]] = params.flat
        self.t += int(schedule_steps)
        return lr

    # Elements per block of a flat update: the blocks of the weights, gradient,
    # state and scratch stay in L2 cache across the rule's 4-8 passes (SGD with
    # momentum over the seed model: 0.40 ms in blocks of 32-64K vs 0.56 ms whole,
    # 0.60 ms in blocks of 8K, where the per-block Python overhead shows).
    FLAT_BLOCK = 65536

    def _step_flat(self, params, grads, lr: float, copy_to=None) -> bool:
        """One update of a whole flat model (``params``, ``grads``: FlatArrays, same layout).

        The per-name state arrays are views of one buffer per slot, so
        ``state_dict`` and checkpoints see the usual per-name state.  Returns
        False (nothing done) when the per-name counters disagree, which only a
        hand-edited state can cause; ``step`` then updates name by name.
        """
        slots, counters = self._flat_state(params)
        if counters is None:
            return False
        w, g = params.flat, grads.flat
        xp = backend.get_array_module(w)
        n = w.shape[0]
        block = self.FLAT_BLOCK if xp is np else max(n, 1)    # one launch per pass on a GPU
        scratch = self._workspace.get(("flat", xp.__name__, w.dtype))
        if scratch is None or scratch.shape[0] < 2 * block:
            scratch = self._workspace[("flat", xp.__name__, w.dtype)] = xp.empty(2 * block, dtype=w.dtype)
        block_state = dict(counters)
        for start in range(0, n, block):
            end = min(start + block, n)
            block_state = {**counters, **{slot: buf[start:end] for slot, buf in slots.items()}}
            size = end - start
            self._regularized_rule(w[start:end], g[start:end], block_state, lr,
                                   scratch[:size], scratch[block:block + size])
            if copy_to is not None:
                copy_to[start:end] = w[start:end]
        for state in self.state.values():
            for counter in counters:
                state[counter] = block_state[counter]
        return True

    def _flat_state(self, params) -> tuple[dict, dict | None]:
        """({slot: flat buffer}, {counter: value}) for a flat update of ``params``.

        The slot buffers are made (or rebuilt, adopting existing per-name
        arrays, e.g. after ``load_state_dict``) whenever the per-name state
        arrays are not exactly their views.  The counters are None when the
        parameters' counters differ.
        """
        names = [name for name, _ in params.specs]
        cached = self._workspace.get("flat_slots")
        fresh = (cached is not None and cached.get("specs") == params.specs
                 and all(self.state.get(name, {}).get(slot) is buf[name]
                         for slot, buf in cached["slots"].items() for name in names))
        if not fresh:
            xp = backend.get_array_module(params.flat)
            slots = {}
            for slot in self._slots():
                buf = FlatArrays.zeros(params.specs, params.flat.dtype, xp)
                for name in names:
                    old = self.state.get(name, {}).get(slot)
                    if old is not None:
                        if tuple(old.shape) != tuple(buf[name].shape):
                            raise ShapeError(f"{self.name}.step: parameter {name} has shape "
                                             f"{tuple(buf[name].shape)} but its optimizer state has shape "
                                             f"{tuple(old.shape)}")
                        buf[name][...] = old
                slots[slot] = buf
            for name in names:
                state = self.state.setdefault(name, {})
                for slot, buf in slots.items():
                    state[slot] = buf[name]
            cached = self._workspace["flat_slots"] = {"specs": params.specs, "slots": slots}
        counters = {}
        for counter in self.COUNTERS:
            values = {self.state[name].get(counter, 0) for name in names}
            if len(values) > 1:
                return {}, None
            counters[counter] = values.pop() if values else 0
        return {slot: buf.flat for slot, buf in cached["slots"].items()}, counters

    def current_lr(self) -> float:
        """The rate the next ``step`` will use."""
        return self.schedule(self.t)

    def _check_grads(self, params: dict, grads: dict) -> None:
        for what, value in (("params", params), ("grads", grads)):
            if not isinstance(value, dict):     # a list of arrays failed below in numpy ("truth value ... ambiguous")
                raise ShapeError(f"{self.name}.step: {what} must be a dict name -> array, got {type(value).__name__}")
        missing = [n for n in params if n not in grads]
        if missing:
            raise ShapeError(f"{self.name}.step: no gradient for parameter {missing[0]}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = [n for n in grads if n not in params]
        if extra:
            raise ShapeError(f"{self.name}.step: gradient {extra[0]} has no matching parameter"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        slots = self._slots()
        for name, w in params.items():
            dw = grads[name]
            if not hasattr(dw, "dtype"):
                raise ShapeError(f"{self.name}.step: gradient for {name} is a {type(dw).__name__}, not an array")
            if (dw.shape != w.shape or dw.dtype != w.dtype
                    or backend.get_array_module(dw) is not backend.get_array_module(w)):
                raise ShapeError(f"{self.name}.step: gradient for {name} is {_describe(dw)} "
                                 f"but the parameter is {_describe(w)}")
            # A parameter that changed shape under the same name (a rebuilt model)
            # would otherwise broadcast silently or fail deep inside numpy.
            state = self.state.get(name)
            slot = state.get(slots[0]) if state and slots else None
            if slot is not None and slot.shape != w.shape:
                raise ShapeError(f"{self.name}.step: parameter {name} has shape {tuple(w.shape)} "
                                 f"but its optimizer state has shape {tuple(slot.shape)}")

    def _scratch(self, w):
        """Two scratch arrays shaped like ``w``: views into one flat buffer reused across calls."""
        xp = backend.get_array_module(w)
        key = (xp.__name__, w.dtype)
        buf = self._workspace.get(key)
        size = w.size
        if buf is None or buf.size < 2 * size:
            buf = self._workspace[key] = xp.empty(2 * size, dtype=w.dtype)
        return buf[:size].reshape(w.shape), buf[size:2 * size].reshape(w.shape)

    # ------------------------------------------------------------------ config / state
    def config(self) -> dict:
        """JSON-able config; ``build_optimizer(opt.config())`` rebuilds an equal (fresh) optimizer."""
        return {"name": self.name, "lr": self.lr, "schedule": self.schedule.config(),
                "l2": self.l2, "l1": self.l1, **self.hyper}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The optimizer's state as flat NumPy arrays (copies).

        Keys: ``"t"`` (0-d int64), ``"<slot>/<param name>"`` for each array slot
        (e.g. ``"m/conv1.weight"``) and ``"<counter>/<param name>"`` (0-d int64)
        for per-parameter counters such as Adam's ``step``.
        """
        out = {"t": np.array(self.t, dtype=np.int64)}
        for name, state in self.state.items():
            for slot in self._slots():
                if slot in state:
                    # Copy: the live arrays keep changing in place after this call.
                    out[f"{slot}/{name}"] = np.array(backend.to_numpy(state[slot]), copy=True)
            for counter in self.COUNTERS:
                if counter in state:
                    out[f"{counter}/{name}"] = np.array(state[counter], dtype=np.int64)
        return out

    def load_state_dict(self, arrays: dict, params: dict | None = None) -> None:
        """Restore the state written by :meth:`state_dict`.

        The names and shapes are checked against ``params`` when given (and the
        arrays moved to their device and dtype), else against the state this
        optimizer already has, if any.  Raises CheckpointError on any mismatch,
        leaving the optimizer unchanged.
        """
        who = f"{self.name} optimizer state"
        if not isinstance(arrays, dict):    # None failed on `in` with a bare TypeError
            raise CheckpointError(f"{who} must be a dict name -> array (what state_dict returns), "
                                  f"got {type(arrays).__name__}")
        if "t" not in arrays:
            raise CheckpointError(f"{who}: missing the step counter 't'")
        t = self._counter(arrays["t"], f"{who}: 't'")
        slots, counters = self._slots(), self.COUNTERS
        new: dict[str, dict] = {}
        for key, value in arrays.items():
            if key == "t":
                continue
            kind, sep, name = key.partition("/")
            if not sep or not name or kind not in slots + counters:
                valid = ", ".join(f"'{s}/<param>'" for s in slots + counters) or "none (only 't')"
                raise CheckpointError(f"{who}: unexpected key {key!r}; expected 't' and {valid}")
            if kind in counters:
                new.setdefault(name, {})[kind] = self._counter(value, f"{who}: {key!r}")
                continue
            value = np.asarray(backend.to_numpy(value))
            if value.dtype.kind != "f":
                raise CheckpointError(f"{who}: {key!r} must be floating point, got dtype {value.dtype}")
            if kind in self.SQUARES and value.size and value.min() < 0:   # else NaN weights after the next step
                raise CheckpointError(f"{who}: {key!r} holds a negative value ({float(value.min()):.4g}); "
                                      "it sums squared gradients, so it is >= 0")
            new.setdefault(name, {})[kind] = value
        for name, state in new.items():
            absent = [k for k in slots + counters if k not in state]
            if absent:
                raise CheckpointError(f"{who}: parameter {name} lacks {', '.join(f'{k!r}' for k in absent)}")
            shapes = {tuple(state[s].shape) for s in slots}
            if len(shapes) > 1:
                raise CheckpointError(f"{who}: slots of parameter {name} disagree in shape: {sorted(shapes)}")
        if params is not None:
            self._match(new, params, who)
        elif self.state and slots:
            # Already running: the loaded state must fit the parameters seen so far.
            self._match(new, {n: s[slots[0]] for n, s in self.state.items() if slots[0] in s}, who)
        # Own copies: the caller's arrays must not alias the live state.
        for state in new.values():
            for slot in slots:
                state[slot] = np.array(state[slot], copy=True)
        self.state, self.t = new, t
        self._state_on_host = True
        if params is not None:
            self._place_state(params, error=CheckpointError)

    def _match(self, new: dict, reference: dict, who: str, error: type[Exception] = CheckpointError) -> None:
        """Names and shapes of the loaded state against ``reference`` (name -> array)."""
        slots = self._slots()
        if not slots:                                 # stateless rule: nothing per parameter
            return
        missing = [n for n in reference if n not in new]
        if missing and new:                           # an empty state is a fresh start (t only)
            raise error(f"{who}: no state for parameter {missing[0]}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = [n for n in new if n not in reference]
        if extra:
            raise error(f"{who}: state for {extra[0]}, which is not a parameter"
                        + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        for name, state in new.items():
            want = reference[name]
            got = tuple(state[slots[0]].shape)        # the slots agree in shape (load_state_dict)
            if got != tuple(want.shape):
                raise error(f"{who}: {slots[0]}/{name} has shape {got} "
                            f"but the parameter has shape {tuple(want.shape)}")

    def _place_state(self, params: dict, error) -> None:
        """Move host-side state next to ``params`` (array module and dtype); all-or-nothing.

        The state loaded without ``params`` is checked here, as it would have been with them: a
        parameter without state would otherwise start afresh beside the others' loaded state.
        """
        slots = self._slots()
        self._match(self.state, params, f"{self.name} optimizer state", error)
        for name, state in self.state.items():
            w = params[name]
            xp = backend.get_array_module(w)
            for slot in slots:
                state[slot] = xp.asarray(state[slot], dtype=w.dtype)
        self._state_on_host = False

    @staticmethod
    def _counter(value, what: str) -> int:
        value = np.asarray(backend.to_numpy(value))
        # a negative count was shown as its dtype and shape ("got int64 ()"), which are fine: show the value
        got = int(value) if value.shape == () and value.dtype.kind in "iu" else f"{value.dtype} {value.shape}"
        if isinstance(got, str) or got < 0:
            raise CheckpointError(f"{what} must be a non-negative 0-d integer array, got {got}")
        return got

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum.

    With ``momentum`` mu > 0 the velocity is kept in gradient units (as in
    torch; equivalent to CS231n's ``v = mu v - lr g`` for a constant lr, and
    better behaved when the schedule changes lr)::

        v = mu * v + g
        w -= lr * v                    # plain momentum
        w -= lr * (g + mu * v)         # Nesterov: look ahead along the new velocity
    """

    name = "sgd"
    HYPER = {"momentum": 0.0, "nesterov": False}

    def _validate_hyper(self) -> None:
        self.momentum = number_in(self.hyper["momentum"], "sgd: momentum", 0.0, 1.0)
        if not isinstance(self.hyper["nesterov"], bool):
            raise ConfigError(f"sgd: nesterov must be true or false, got {self.hyper['nesterov']!r}")
        self.nesterov = self.hyper["nesterov"]
        if self.nesterov and self.momentum == 0.0:
            raise ConfigError("sgd: nesterov=True needs momentum > 0")
        self.hyper["momentum"] = self.momentum

    def _slots(self) -> tuple:
        return ("velocity",) if self.momentum else ()

    def _rule(self, w, g, state, lr, tmp):
        xp = backend.get_array_module(w)
        if not self.momentum:
            xp.multiply(g, lr, out=tmp)
            w -= tmp
            return
        v = state["velocity"]
        v *= self.momentum
        v += g
        if self.nesterov:
            xp.multiply(v, self.momentum, out=tmp)
            tmp += g
            tmp *= lr
        else:
            xp.multiply(v, lr, out=tmp)
        w -= tmp


class AdaGrad(Optimizer):
    """AdaGrad: per-coordinate rates shrinking with the summed squared gradients.

    ``cache += g**2;  w -= lr * g / (sqrt(cache) + eps)``.  The default eps is 1e-8
    (torch's is 1e-10); with the same eps the updates match torch.optim.Adagrad's.
    """

    name = "adagrad"
    HYPER = {"eps": 1e-8}
    SLOTS = ("cache",)
    SQUARES = ("cache",)

    def _validate_hyper(self) -> None:
        self.eps = self.hyper["eps"] = _eps(self.hyper["eps"], "adagrad")

    def _rule(self, w, g, state, lr, tmp):
        xp = backend.get_array_module(w)
        cache = state["cache"]
        xp.multiply(g, g, out=tmp)
        cache += tmp
        xp.sqrt(cache, out=tmp)
        tmp += self.eps
        xp.divide(g, tmp, out=tmp)
        tmp *= lr
        w -= tmp


class RMSProp(Optimizer):
    """RMSProp: AdaGrad with a leaky (exponential moving) average of squared gradients.

    ``cache = rho * cache + (1 - rho) * g**2;  w -= lr * g / (sqrt(cache) + eps)``
    (torch's ``alpha`` is ``rho``).
    """

    name = "rmsprop"
    HYPER = {"rho": 0.99, "eps": 1e-8}
    SLOTS = ("cache",)
    SQUARES = ("cache",)

    def _validate_hyper(self) -> None:
        self.rho = self.hyper["rho"] = number_in(self.hyper["rho"], "rmsprop: rho", 0.0, 1.0)
        self.eps = self.hyper["eps"] = _eps(self.hyper["eps"], "rmsprop")

    def _rule(self, w, g, state, lr, tmp):
        xp = backend.get_array_module(w)
        cache = state["cache"]
        cache *= self.rho
        xp.multiply(g, g, out=tmp)
        tmp *= 1.0 - self.rho
        cache += tmp
        xp.sqrt(cache, out=tmp)
        tmp += self.eps
        xp.divide(g, tmp, out=tmp)
        tmp *= lr
        w -= tmp


class Adam(Optimizer):
    """Adam with bias correction (Kingma & Ba)::

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        w -= lr * (m / (1 - beta1**k)) / (sqrt(v / (1 - beta2**k)) + eps)

    where ``k`` is this parameter's update count (state ``"step"``, from 1).
    The bias corrections are folded into two scalars, so the array work is
    ``w -= (lr * sqrt(c2) / c1) * m / (sqrt(v) + eps * sqrt(c2))`` (the same
    value, one pass fewer).
    """

    name = "adam"
    HYPER = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    SLOTS = ("m", "v")
    SQUARES = ("v",)
    COUNTERS = ("step",)

    def _validate_hyper(self) -> None:
        self.beta1 = self.hyper["beta1"] = number_in(self.hyper["beta1"], f"{self.name}: beta1", 0.0, 1.0)
        self.beta2 = self.hyper["beta2"] = number_in(self.hyper["beta2"], f"{self.name}: beta2", 0.0, 1.0)
        self.eps = self.hyper["eps"] = _eps(self.hyper["eps"], self.name)

    def _rule(self, w, g, state, lr, tmp):
        xp = backend.get_array_module(w)
        k = state["step"] = state["step"] + 1
        m, v = state["m"], state["v"]
        m *= self.beta1
        xp.multiply(g, 1.0 - self.beta1, out=tmp)
        m += tmp
        v *= self.beta2
        xp.multiply(g, g, out=tmp)
        tmp *= 1.0 - self.beta2
        v += tmp
        c1 = 1.0 - self.beta1 ** k
        c2_sqrt = math.sqrt(1.0 - self.beta2 ** k)
        xp.sqrt(v, out=tmp)
        tmp += self.eps * c2_sqrt
        xp.divide(m, tmp, out=tmp)
        tmp *= lr * c2_sqrt / c1
        w -= tmp


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter).

    Before the Adam step, ``w *= 1 - lr * weight_decay`` with the scheduled lr
    (as in torch.optim.AdamW).  Unlike ``l2`` this decay does not pass through
    the gradient, so Adam's per-coordinate rescaling does not weaken it.
    ``lr * weight_decay`` must be below 1 (torch accepts more, which zeroes or flips the weights).
    """

    name = "adamw"
    HYPER = {**Adam.HYPER, "weight_decay": 0.01}

    def _validate_hyper(self) -> None:
        super()._validate_hyper()
        self.weight_decay = self.hyper["weight_decay"] = number_in(
            self.hyper["weight_decay"], "adamw: weight_decay", 0.0)
        # Every update multiplies the weights by 1 - lr * weight_decay (no schedule exceeds lr): at 1
        # or more that zeroes or flips them, and such a run trained to the end on garbage weights.
        if self.lr * self.weight_decay >= 1:
            raise ConfigError(f"adamw: lr * weight_decay must be below 1, since each update multiplies the "
                              f"weights by 1 - lr * weight_decay; got lr {self.lr:g} * weight_decay "
                              f"{self.weight_decay:g} = {self.lr * self.weight_decay:g}")

    def _rule(self, w, g, state, lr, tmp):
        # g (including any coupled l2/l1) was computed from the weights before decay.
        if self.weight_decay:
            w *= 1.0 - lr * self.weight_decay
        super()._rule(w, g, state, lr, tmp)


OPTIMIZERS = {cls.name: cls for cls in (SGD, AdaGrad, RMSProp, Adam, AdamW)}


def build_optimizer(config: dict | str, **overrides) -> Optimizer:
    """An optimizer from a name (``"adam"``), a config dict (``opt.config()``) or its JSON text.

    ``overrides`` replace config entries (``build_optimizer("sgd", lr=0.1,
    momentum=0.9)``).  Unknown names or keys raise ConfigError listing the valid ones.
    """
    config = named_config(config, "optimizer config")
    config = {**config, **overrides}
    name = config.pop("name", None)
    if name is None:
        raise ConfigError(f"optimizer config needs a 'name': one of {sorted(OPTIMIZERS)}")
    cls = OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise ConfigError(f"unknown optimizer {name!r}: expected one of {sorted(OPTIMIZERS)}")
    return cls(**config)
