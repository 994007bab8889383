"""The server's parameters, model state and optimizer.

The weights live in a cnn_core Model built from the run's spec (NumPy,
float32), so checkpoints and evaluation use the engine's own code.  Gradients
are *applied* here, by a cnn_core optimizer; they are computed by workers.

Replies carry immutable per-version snapshots: ZeroMQ sends array frames
without copying, so the live arrays, which the optimizer changes in place,
must never be handed to a socket.

The hot path is flat (cnn_core.flat): the model's parameters are one buffer,
a worker's push arrives as one frame laid out as :attr:`push_specs`, the
optimizer updates the whole buffer in one blocked pass, and a snapshot is one
copy sent as one frame.  Pushes laid out otherwise (any order of the same
names) are accepted too, at the price of one copy.
"""
from __future__ import annotations

import numpy as np

from cnn_core.errors import PscnnError
from cnn_core.flat import FlatArrays, all_finite
from cnn_core.model import build_model
from cnn_core.optim import build_optimizer
from pscnn.protocol import ProtocolError, model_layout


class TrainingDiverged(PscnnError):
    """The weights became non-finite: a run cannot continue from there."""

    ADVICE = "Lower --lr or --momentum, or add --warmup-steps"


class ParameterStore:
    def __init__(self, model_spec, optimizer_config: dict, seed: int = 0):
        self.model = build_model(model_spec, seed=seed, dtype="float32", device="cpu")
        self.optimizer = build_optimizer(optimizer_config)
        self.version = 0
        self._snapshot: tuple[int, FlatArrays] | None = None
        # What a push carries, in order: every parameter's gradient, then the model state.
        self.push_specs = model_layout(self.model)
        self._num_params = self.params.flat.shape[0]
        self.push_specs_size = self._num_params + sum(int(v.size) for v in self.state.values())
        self.push_bytes = self.push_specs_size * self.params.flat.dtype.itemsize

    @property
    def params(self) -> FlatArrays:
        return self.model.params

    @property
    def state(self) -> dict:
        return self.model.state

    # ------------------------------------------------------------------ validation
    def check_push_arrays(self, arrays: dict) -> tuple[FlatArrays, dict]:
        """Split a push's arrays into (grads, state) after checking every one.

        Gradients must name exactly the model's parameters with the same
        shapes, as float32, all finite; state arrays (BatchNorm statistics)
        must be known state names, same shapes, finite, and values their layer
        can run with (no negative BatchNorm variance).  ProtocolError
        otherwise, naming the first offending array; nothing is changed.
        ``grads`` is a FlatArrays laid out like :attr:`params` (a view of the
        received frame when the push follows :attr:`push_specs`).
        """
        if (isinstance(arrays, FlatArrays) and arrays.specs == self.push_specs
                and arrays.flat.dtype == self.params.flat.dtype):
            if not all_finite(arrays.flat):
                self._check_finite(arrays)                  # names the culprit
            grads = FlatArrays(self.params.specs, arrays.flat[:self._num_params])
            state = {k: arrays[k] for k in self.state}
            self._check_state(state)
            return grads, state
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
        self._check_finite(arrays)
        self._check_state(state)
        return FlatArrays.pack({name: grads[name] for name in self.params}), state

    @staticmethod
    def _check_finite(arrays: dict) -> None:
        for name, arr in arrays.items():
            if not np.isfinite(arr).all():
                raise ProtocolError(f"push: {name!r} contains NaN or Inf; gradient rejected", "non_finite")

    def _check_state(self, state: dict) -> None:
        """ProtocolError for a pushed state array no layer can run with.  Adopted, a negative
        BatchNorm variance made every evaluation NaN and every checkpoint one --resume refuses."""
        for name, arr in state.items():
            problem = self.model.state_problem(name, arr)
            if problem:
                raise ProtocolError(f"push: state {name!r} {problem}; push rejected", "bad_arrays")

    # ------------------------------------------------------------------ updates
    def apply(self, grads: dict, state: dict | None = None, batches: int = 1) -> float:
        """One optimizer step (version + 1) for ``batches`` batches; adopts pushed state.  Returns the lr.

        The new version's snapshot is written by the optimizer as it goes
        (``copy_to``): every version is sent to at least the worker that made it.
        """
        _, before = self.snapshot()
        buf = np.empty(self.push_specs_size, dtype=self.params.flat.dtype)
        with np.errstate(over="ignore", invalid="ignore"):    # overflow is detected just below
            lr = self.optimizer.step(self.params, grads, schedule_steps=batches, copy_to=buf)
        if not all_finite(buf[:self._num_params]):
            # Finite gradients, non-finite weights: the step size is too large for
            # this model.  Keep the last finite weights for the record and stop.
            self.params.flat[...] = before.flat[:self._num_params]
            raise TrainingDiverged(f"training diverged: the update to version {self.version + 1} (lr {lr:.4g}) "
                                   f"made the weights non-finite; kept version {self.version}. "
                                   + TrainingDiverged.ADVICE)
        for name, arr in (state or {}).items():
            self.state[name][...] = arr
        self.version += 1
        self._snapshot = (self.version, self._freeze(buf))
        return lr

    def apply_mean(self, members: list) -> float:
        """Sync mode: one step with the sample-weighted mean of a round's gradients.

        ``members``: ``[(grads, state, weight), ...]`` as from check_push_arrays,
        each weighted by its batch size, summed in the order given (float
        addition does not associate: the caller fixes the order).  The mean of
        one gradient is that gradient, applied as it is, with no rounding
        through ``weight`` and ``1 / weight``.  Returns the lr.
        """
        if len(members) == 1:
            grads, state, _ = members[0]
            return self.apply(grads, state)
        total, state_sum, state_weight = None, {}, {}
        for grads, state, weight in members:
            w = np.float32(weight)
            if total is None:
                total = FlatArrays(grads.specs, grads.flat * w)
            else:
                total.flat += grads.flat * w
            for k, v in state.items():
                # Summed in float64: a finite float32 variance times a batch size overflowed to Inf,
                # the mean then went to every worker (which refuse it) and into the checkpoint.
                weighted = v.astype(np.float64) * weight
                if k in state_sum:
                    state_sum[k] += weighted
                else:
                    state_sum[k] = weighted
                # a push may leave the state out: each array is the mean of those that sent it
                state_weight[k] = state_weight.get(k, 0) + weight
        inv = np.float32(1.0 / sum(weight for _, _, weight in members))
        total.flat *= inv
        for k, v in state_sum.items():
            v /= state_weight[k]
        return self.apply(total, state_sum, batches=len(members))

    # ------------------------------------------------------------------ replies
    def snapshot(self) -> tuple[int, FlatArrays]:
        """(version, params then state in one read-only buffer), copied once per version."""
        if self._snapshot is None or self._snapshot[0] != self.version:
            buf = np.empty(self.push_specs_size, dtype=self.params.flat.dtype)
            buf[:self._num_params] = self.params.flat
            self._snapshot = (self.version, self._freeze(buf))
        return self._snapshot

    def _freeze(self, buf) -> FlatArrays:
        """``buf`` holding the parameters: add the state, make it read-only, view it in model_layout."""
        start = self._num_params
        for value in self.state.values():          # model_layout: the state follows the parameters
            buf[start:start + value.size] = value.reshape(-1)
            start += value.size
        buf.flags.writeable = False                  # before the views are made: they inherit it
        return FlatArrays(self.push_specs, buf)
