"""cnn_core: pscnn's from-scratch CNN engine (NumPy, or CuPy on a GPU).

Public API::

    from cnn_core import build_model, softmax_cross_entropy
    model = build_model("seed", seed=0, dtype="float32")
    logits = model.forward(x, train=True)             # x: (N, 1, 28, 28)
    loss, dlogits = softmax_cross_entropy(logits, y)  # y: (N,) int labels
    grads = model.backward(dlogits)                   # same keys/shapes as model.params
    loss, logits, grads = model.loss_and_grads(x, y)  # the same step, in cache-sized chunks
"""
from .backend import array_module, get_array_module, gpu_available, to_numpy
from .errors import CheckpointError, ConfigError, DataError, PscnnError, ShapeError, SpecError
from .losses import softmax_cross_entropy
from .model import PRESETS, Model, build_model

__all__ = [
    "PRESETS", "Model", "build_model", "softmax_cross_entropy",
    "array_module", "get_array_module", "gpu_available", "to_numpy",
    "PscnnError", "SpecError", "ShapeError", "DataError", "CheckpointError", "ConfigError",
]
