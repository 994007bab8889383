"""The server's parameters, model state and optimizer.

The weights live in a cnn_core Model built from the run's spec (NumPy,
float32), so checkpoints and evaluation use the engine's own code.  Gradients
are *applied* here, by a cnn_core optimizer; they are computed by workers.

Replies carry immutable per-version snapshots: ZeroMQ sends array frames
without copying, so the live arrays, which the optimizer changes in place,
must never be handed to a socket.
"""
from __future__ import annotations

import numpy as np

from cnn_core.model import build_model
from cnn_core.optim import build_optimizer
from pscnn.protocol import ProtocolError


class ParameterStore:
    def __init__(self, model_spec, optimizer_config: dict, seed: int = 0):
        self.model = build_model(model_spec, seed=seed, dtype="float32", device="cpu")
        self.optimizer = build_optimizer(optimizer_config)
        self.version = 0
        self._snapshot: tuple[int, dict] | None = None
        self._grad_sum: dict | None = None     # sync mode: running sum of member gradients
        self._state_sum: dict | None = None
        self._sum_weight = 0
        self._batches = 0

    @property
    def params(self) -> dict:
        return self.model.params

    @property
    def state(self) -> dict:
        return self.model.state

    # ------------------------------------------------------------------ validation
    def check_push_arrays(self, arrays: dict) -> tuple[dict, dict]:
        """Split a push's arrays into (grads, state) after checking every one.

        Gradients must name exactly the model's parameters with the same
        shapes, as float32, all finite; state arrays (BatchNorm statistics)
        must be known state names, same shapes, finite.  ProtocolError
        otherwise, naming the first offending array; nothing is changed.
        """
        grads, state = {}, {}
        for name, arr in arrays.items():
            if name in self.params:
                target, kind = self.params[name], "gradient"
                grads[name] = arr
            elif name in self.state:
                target, kind = self.state[name], "state"
                state[name] = arr
            else:
                raise ProtocolError(f"push: unknown array {name!r} (not a parameter or state of this model)",
                                    "bad_arrays")
            if arr.dtype != target.dtype:
                raise ProtocolError(f"push: {kind} {name!r} has dtype {arr.dtype}, expected {target.dtype}",
                                    "bad_arrays")
            if arr.shape != target.shape:
                raise ProtocolError(f"push: {kind} {name!r} has shape {arr.shape}, expected {target.shape}",
                                    "bad_arrays")
        missing = [n for n in self.params if n not in grads]
        if missing:
            raise ProtocolError(f"push: missing gradients for {missing[:5]}", "bad_arrays")
        for name, arr in arrays.items():
            if not np.isfinite(arr).all():
                raise ProtocolError(f"push: {name!r} contains NaN or Inf; gradient rejected", "non_finite")
        return grads, state

    # ------------------------------------------------------------------ updates
    def apply(self, grads: dict, state: dict | None = None, batches: int = 1) -> float:
        """One optimizer step (version + 1) for ``batches`` batches; adopts pushed state.  Returns the lr."""
        lr = self.optimizer.step(self.params, grads, schedule_steps=batches)
        for name, arr in (state or {}).items():
            self.state[name][...] = arr
        self.version += 1
        return lr

    def accumulate(self, grads: dict, state: dict, weight: int) -> None:
        """Sync mode: add one member's gradient, weighted by its batch size."""
        w = np.float32(weight)
        if self._grad_sum is None:
            self._grad_sum = {k: np.multiply(g, w) for k, g in grads.items()}
            self._state_sum = {k: np.multiply(s, w) for k, s in state.items()}
        else:
            for k, g in grads.items():
                self._grad_sum[k] += g * w if weight != 1 else g
            for k, s in state.items():
                if k in self._state_sum:
                    self._state_sum[k] += s * w
                else:
                    self._state_sum[k] = np.multiply(s, w)
        self._sum_weight += weight
        self._batches += 1

    def apply_accumulated(self) -> float | None:
        """Sync mode: apply the sample-weighted mean of the accumulated gradients."""
        if self._grad_sum is None:
            return None
        inv = np.float32(1.0 / self._sum_weight)
        for g in self._grad_sum.values():
            g *= inv
        for s in self._state_sum.values():
            s *= inv
        lr = self.apply(self._grad_sum, self._state_sum, batches=self._batches)
        self.discard_accumulated()
        return lr

    def discard_accumulated(self) -> None:
        self._grad_sum, self._state_sum, self._sum_weight, self._batches = None, None, 0, 0

    # ------------------------------------------------------------------ replies
    def snapshot(self) -> tuple[int, dict]:
        """(version, {name: array}) of params and state, copied once per version, never mutated."""
        if self._snapshot is None or self._snapshot[0] != self.version:
            arrays = {k: v.copy() for k, v in self.params.items()}
            arrays.update({k: v.copy() for k, v in self.state.items()})
            for arr in arrays.values():
                arr.flags.writeable = False
            self._snapshot = (self.version, arrays)
        return self._snapshot
