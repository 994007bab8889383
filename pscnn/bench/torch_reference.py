"""The PyTorch twin of a pscnn model, for cross-checks and same-run comparisons.

Built from the pscnn model itself (its layers and inferred shapes), so the
reference cannot drift from the preset it stands for.  torch is never a
run-time dependency: callers pass the imported module.
"""
from __future__ import annotations

from cnn_core.model import build_model


def torch_model(torch, spec="seed", dropout: float | None = None, copy_weights_from=None, dtype=None):
    """An ``nn.Sequential`` equivalent to ``spec`` (conv2d, relu, maxpool2d, flatten, dense, dropout).

    Its modules line up with the pscnn model's layers (``zip(model.layers, net)``).
    ``dropout`` overrides every dropout's p (0.0 for exact gradient comparisons);
    ``dtype`` (e.g. ``torch.float64``) casts the modules; ``copy_weights_from``
    (a pscnn Model of that spec) then loads its weights: conv weights map
    directly, dense weights are transposed ((in, out) vs torch's (out, in)).
    """
    nn = torch.nn
    model = copy_weights_from or build_model(spec)
    layers = []
    for layer in model.layers:
        kind = layer.type_name
        if kind == "conv2d":
            mod = nn.Conv2d(layer.in_shape[2], layer.out_channels, layer.kernel, layer.stride, layer.padding)
        elif kind == "dense":
            mod = nn.Linear(layer.in_shape[0], layer.units)
        elif kind == "maxpool2d":
            mod = nn.MaxPool2d(layer.kernel, layer.stride)
        elif kind == "relu":
            mod = nn.ReLU()
        elif kind == "flatten":
            mod = nn.Flatten()
        elif kind == "dropout":
            mod = nn.Dropout(layer.p if dropout is None else dropout)
        else:
            raise ValueError(f"torch_model: no torch equivalent wired for layer type {kind!r}")
        layers.append(mod)
    net = nn.Sequential(*layers)
    if dtype is not None:
        net = net.to(dtype)
    if copy_weights_from is not None:
        with torch.no_grad():
            for layer, mod in zip(model.layers, net):
                if layer.parameters:
                    weight = torch.from_numpy(layer.parameters["weight"].copy())
                    mod.weight.copy_(weight.T if layer.type_name == "dense" else weight)
                    mod.bias.copy_(torch.from_numpy(layer.parameters["bias"].copy()))
    return net
