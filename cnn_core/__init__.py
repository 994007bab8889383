"""cnn_core: pscnn's from-scratch CNN engine (NumPy, or CuPy on a GPU).

Public API::

    from cnn_core import build_model, softmax_cross_entropy
    model = build_model("seed", seed=0, dtype="float32")
    logits = model.forward(x, train=True)             # x: (N, 1, 28, 28)
    loss, dlogits = softmax_cross_entropy(logits, y)  # y: (N,) int labels
    grads = model.backward(dlogits)                   # same keys/shapes as model.params
    loss, logits, grads = model.loss_and_grads(x, y)  # the same step, in cache-sized chunks
"""
from __future__ import annotations

import importlib

# Each public name and the submodule that defines it, imported on first use (PEP 562): importing
# a light submodule (cnn_core.text, cnn_core.errors) runs this file, and importing numpy here made
# pscnn's argument parsing load it before --threads could set the BLAS thread count (every
# pscnn train, server and worker ran with a thread per core, 4-5x slower on a loaded machine).
_EXPORTS = {
    "array_module": "backend", "get_array_module": "backend", "gpu_available": "backend", "to_numpy": "backend",
    "PscnnError": "errors", "SpecError": "errors", "ShapeError": "errors", "DataError": "errors",
    "CheckpointError": "errors", "ConfigError": "errors",
    "softmax_cross_entropy": "losses",
    "PRESETS": "model", "Model": "model", "build_model": "model",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
