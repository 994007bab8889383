"""Sequential models built from a spec: presets, shape inference, forward/backward.

A spec is a JSON-able dict::

    {"input_shape": [1, 28, 28],            # (C, H, W) of one image
     "layers": [{"type": "conv2d", "name": "conv1", "out_channels": 32,
                 "kernel": 3, "padding": 1}, {"type": "relu"}, ...]}

``build_model`` accepts a preset name (``"seed"``, ``"light"``), such a dict,
its JSON text, or the path of a file holding that JSON (:func:`spec_file_path`).
Layers without a name get ``<type><k>`` (``relu1``, ...).
"""
from __future__ import annotations

import copy
import functools
import inspect
import itertools
import math
from contextlib import contextmanager

import numpy as np

from .backend import array_module, resolve_dtype
from .config import config_file_path, is_integer, named_config, read_config_file, seed_value
from .errors import ConfigError, ShapeError, SpecError
from .flat import FlatArrays, all_finite
from .layers import (ELU, LAYER_TYPES, BatchNorm2D, Conv2D, Dense, Dropout, MaxPool2D, ReLU, Residual, SiLU,
                     shape_of)
from .losses import check_labels, label_range_error, softmax_cross_entropy
from .text import for_count


def _cnn_preset(c1: int, c2: int, hidden: int) -> dict:
    return {
        "input_shape": [1, 28, 28],
        "layers": [
            {"type": "conv2d", "name": "conv1", "out_channels": c1, "kernel": 3, "padding": 1},
            {"type": "relu"},
            {"type": "maxpool2d", "kernel": 2, "stride": 2},
            {"type": "conv2d", "name": "conv2", "out_channels": c2, "kernel": 3, "padding": 1},
            {"type": "relu"},
            {"type": "maxpool2d", "kernel": 2, "stride": 2},
            {"type": "flatten"},
            {"type": "dense", "name": "fc1", "units": hidden},
            {"type": "relu"},
            {"type": "dropout", "p": 0.25},
            {"type": "dense", "name": "fc2", "units": 10, "init_scale": 0.1},
        ],
    }


#: The most parameters a model may have: 400 MB of float32 weights, as much again
#: for each gradient and optimizer slot.  Checked from the spec alone, so that a
#: typo like ``"units": 100000000`` is one line, not an allocation failure.
MAX_PARAMETERS = 100_000_000
#: The most values one image may take on its way through a model: every layer's
#: output, and a convolution's padded input and im2col columns (the seed model:
#: 0.16 M).  Parameters do not bound it: a conv padding of 5000 on 28x28 images
#: has 40 weights, and a batch then asked for gigabytes.  64 M values are 256 MB
#: of float32 per image; a deep model, 20 convs of 128 channels at 28x28, takes ~20 M.
MAX_IMAGE_VALUES = 1 << 26
#: The layers whose training pass keeps, besides their output, another array of its size for
#: their backward: BatchNorm its normalized input, Dropout its mask, ELU and SiLU a factor of
#: their derivative (Model.training_step_bytes).
KEEPS_ANOTHER_OUTPUT = (BatchNorm2D, Dropout, ELU, SiLU)

PRESETS = {
    # Conv(1->32)-ReLU-Pool-Conv(32->64)-ReLU-Pool-Dense(3136->128)-ReLU-Dropout-Dense(128->10)
    "seed": _cnn_preset(32, 64, 128),
    # The same shape at a quarter of the width: fast enough for tests and CI.
    "light": _cnn_preset(8, 16, 32),
}


#: The most bytes a spec file may hold: as many as the message header that carries the spec
#: to the workers (pscnn.protocol.MAX_HEADER_BYTES, the server's welcome); specs take ~1 KB.
MAX_SPEC_FILE_BYTES = 64 * 1024


def spec_file_path(value: str) -> str | None:
    """The path a model spec string names, or None for a preset name or JSON text
    (:func:`~cnn_core.config.config_file_path`: a preset wins over a file of its name)."""
    return config_file_path(value, PRESETS)


def read_spec_file(path: str) -> dict:
    """The spec dict a JSON file holds; SpecError naming the file if it is missing, unreadable,
    larger than :data:`MAX_SPEC_FILE_BYTES`, or no JSON object."""
    return read_config_file(path, f"model spec file {path}", SpecError, MAX_SPEC_FILE_BYTES)


def resolve_spec(spec) -> dict:
    """Preset name, JSON text, a JSON file's path or dict -> a fresh spec dict (never aliases PRESETS)."""
    if isinstance(spec, str):
        if spec.strip() in PRESETS:     # "light " from an environment file, as a file's path and JSON are stripped
            return copy.deepcopy(PRESETS[spec.strip()])
        path = spec_file_path(spec)
        if path is not None:
            spec = read_spec_file(path)
        elif not spec.strip().startswith(("{", "[")):
            raise SpecError(f"unknown model preset {spec!r}: expected one of {sorted(PRESETS)}, a JSON spec "
                            "or a JSON spec file")
    elif not isinstance(spec, dict):
        raise SpecError(f"model spec must be a preset name, dict or JSON object, got {type(spec).__name__}")
    spec = copy.deepcopy(named_config(spec, "model spec", SpecError))
    unknown = sorted(set(spec) - {"input_shape", "layers"}, key=str)
    if unknown:                     # e.g. a "dtype" that would silently not apply
        raise SpecError(f"model spec: unknown keys {unknown}; a spec has 'input_shape' and 'layers' "
                        "(the dtype and device are chosen where the model is built)"[:300])
    shape = spec.get("input_shape")
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise SpecError(f"model spec: input_shape must be [C, H, W] of positive ints, got {shape!r}")
    if not isinstance(spec.get("layers"), list) or not spec["layers"]:
        raise SpecError("model spec: 'layers' must be a non-empty list")
    return spec


def _make_layer(entry, counters: dict):
    """One spec entry -> a Layer (recursively for residual blocks)."""
    if not isinstance(entry, dict) or "type" not in entry:
        raise SpecError(f"model spec: each layer must be a dict with a 'type', got {entry!r}")
    entry = dict(entry)
    kind = entry.pop("type")
    cls = LAYER_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise SpecError(f"model spec: unknown layer type {kind!r}; known: {sorted(LAYER_TYPES)}")
    counters[kind] = counters.get(kind, 0) + 1
    name = entry.pop("name", None)
    if name is not None and (not isinstance(name, str) or "." in name):
        # Parameters are named "<layer>.<param>": a dot would make that ambiguous.
        raise SpecError(f"{kind} layer: name must be a string without '.', got {name!r}")
    name = name or f"{kind.replace('2d', '')}{counters[kind]}"
    options, required = _options(cls)
    unknown = [key for key in entry if key not in options]
    if unknown:
        listed = f"options: {', '.join(options)}" if options else "it takes no options"
        raise SpecError(f"{kind} {name!r}: unknown {for_count(len(unknown), 'option')} "
                        f"{', '.join(map(repr, unknown))} ({listed})")
    missing = [key for key in required if key not in entry]
    if missing:
        raise SpecError(f"{kind} {name!r}: missing {for_count(len(missing), 'option')} "
                        f"{', '.join(map(repr, missing))}")
    if cls is Residual:
        inner = entry.pop("layers", None)
        if not isinstance(inner, list) or not inner:
            raise SpecError(f"residual {name}: needs a non-empty 'layers' list")
        inner_counters: dict = {}
        layers = [_make_layer(e, inner_counters) for e in inner]
        cls = functools.partial(Residual, layers)      # built, with its errors, below
    try:
        return cls(name=name, **entry)
    except SpecError:
        raise
    except (TypeError, ValueError) as exc:   # unknown keyword, or float("abc") for p/alpha/momentum
        raise SpecError(f"layer {name} ({kind}): {exc}") from None


def _options(cls) -> tuple[list[str], list[str]]:
    """(the options, the required ones) of a layer type: its constructor's keywords but ``name``."""
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name not in ("self", "name")]
    return [p.name for p in params], [p.name for p in params if p.default is inspect.Parameter.empty]


def _check_size(layers, shape: tuple) -> None:
    """SpecError when the layers on input ``shape`` would exceed MAX_PARAMETERS or
    MAX_IMAGE_VALUES; allocates nothing."""
    total = 0
    for layer in layers:
        shape, count = layer.plan(shape)
        total += count
        if count > MAX_PARAMETERS:
            raise SpecError(f"model spec: {layer.type_name} {layer.name!r} would have {count:,} parameters, "
                            f"more than the {MAX_PARAMETERS:,} a model may have")
        if total > MAX_PARAMETERS:
            raise SpecError(f"model spec: the model would have {total:,} parameters by {layer.type_name} "
                            f"{layer.name!r} ({count:,}), more than the {MAX_PARAMETERS:,} a model may have")


def _values_by_layer(layers, shape: tuple) -> list[tuple]:
    """[(layer, the values one image of ``shape`` takes through it)] for ``layers`` (planned,
    not built): its output, a convolution's padded input and columns, a residual block's
    inner layers."""
    values = []
    for layer in layers:
        out, _ = layer.plan(shape)
        count = math.prod(out) + _image_values(getattr(layer, "layers", ()), shape)
        if isinstance(layer, Conv2D):
            (h, w, c), (kh, kw), (ph, pw) = shape, layer.kernel, layer.padding
            count += (h + 2 * ph) * (w + 2 * pw) * c + out[0] * out[1] * c * kh * kw
        values.append((layer, count))
        shape = out
    return values


def _image_values(layers, shape: tuple) -> int:
    """The values one image of ``shape`` takes through ``layers`` (:func:`_values_by_layer`)."""
    return sum(count for _, count in _values_by_layer(layers, shape))


class Model:
    """A sequential network with named parameters.

    Attributes
    ----------
    params : dict name -> array, in layer order (``"conv1.weight"`` ...); the
        same arrays the layers compute with, so in-place updates change the model.
        A :class:`~cnn_core.flat.FlatArrays`: every parameter is a view of one
        buffer, ``params.flat`` (sent as one frame, updated in one pass).
    state : dict name -> array of non-trained state (BatchNorm statistics).
    spec : JSON-able spec that rebuilds this architecture.
    """

    def __init__(self, spec, seed: int = 0, dtype="float32", device: str = "cpu"):
        self.spec = resolve_spec(spec)
        self.dtype = resolve_dtype(dtype)
        self.device = device
        self.xp = array_module(device)
        self.seed = seed_value(seed, "model seed", sequence_ok=False)
        counters: dict = {}
        self.layers = [_make_layer(e, counters) for e in self.spec["layers"]]
        names = [layer.name for layer in self.layers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SpecError(f"model spec: duplicate layer names {dupes}")
        c, h, w = self.spec["input_shape"]
        shape = (h, w, c)                      # channels-last inside the network
        _check_size(self.layers, shape)
        per_layer = _values_by_layer(self.layers, shape)
        values = sum(count for _, count in per_layer)
        if values > MAX_IMAGE_VALUES:
            raise SpecError(f"model spec: one image would take {values:,} values through the layers, "
                            f"more than the {MAX_IMAGE_VALUES:,} a model may take")
        rng = np.random.default_rng(self.seed)
        built: dict = {}
        self.state: dict = {}
        for layer in self.layers:
            shape = layer.build(shape, self.xp, self.dtype, rng)
            for k, v in layer.parameters.items():
                built[f"{layer.name}.{k}"] = v
            for k, v in layer.state.items():
                self.state[f"{layer.name}.{k}"] = v
        self.params = FlatArrays.pack(built, dtype=self.dtype)
        # What training_step_bytes counts per image and layer: a training pass keeps one more array
        # of its output's size for the layers of KEEPS_ANOTHER_OUTPUT, those in a residual block too
        # (but a Dropout of p 0, which draws no mask); and a chunked step holds each Dropout's mask of
        # the whole batch (Dropout.begin_batch), counted there (Dropout.batch_mask_values).
        self._step_values = [(layer.name, count + sum(math.prod(inner.out_shape) for inner in _all_layers([layer])
                                                      if isinstance(inner, KEEPS_ANOTHER_OUTPUT)
                                                      and not (type(inner) is Dropout and inner.p == 0.0)))
                             for layer, count in per_layer]
        self._dropouts_of = [(layer.name, inner) for layer in self.layers
                             for inner in _all_layers([layer]) if type(inner) is Dropout]
        for layer in self.layers:
            for k in layer.parameters:
                layer.bind_parameter(k, self.params[f"{layer.name}.{k}"])
        if len(shape) != 1:
            raise SpecError(f"model spec: the last layer must output (num_classes,), got shape {shape}")
        self.num_classes = shape[0]
        self.spec["layers"] = [layer.spec() for layer in self.layers]   # names filled in
        self._order = execution_order(self.layers)
        plan_conv_pool(self.layers, self._order)
        plan_pool_relu(self.layers, self._order)
        self._caches = None
        self._dlogits_shape = None             # the logits' shape of the pass the caches are of
        # What loss_and_grads needs to run a batch in chunks (see there).
        self._couples_samples = any(layer.couples_samples for layer in self.layers)
        self._dropouts = [layer for layer in _all_layers(self.layers) if type(layer) is Dropout]
        self._convs = [layer for layer in _all_layers(self.layers) if type(layer) is Conv2D]
        # The BatchNorm with the fewest values per channel and image: checked before a training
        # pass, which a later one refusing the batch would leave with the earlier ones' statistics moved.
        self._tightest_batch_norm = min((layer for layer in _all_layers(self.layers) if type(layer) is BatchNorm2D),
                                        key=lambda layer: layer.in_shape[0] * layer.in_shape[1], default=None)

    def reseed(self, seed) -> None:
        """Restart every random stream of the network (dropout masks) from ``seed``.

        ``seed``: an int or a sequence of ints (a NumPy SeedSequence entropy).
        A trainer reseeds with ``(run seed, epoch, batch)`` before each batch,
        so a batch's gradient depends on the weights and the batch alone, not
        on which worker computed it or what that worker computed before: a sync
        run is then the same computation whatever the timing (see
        ``server/server.py``).
        """
        rng = np.random.default_rng(seed_value(seed, "reseed: seed"))
        for layer in self.layers:
            layer.reseed(rng)

    # On the CPU a pass runs in chunks of at most CPU_CHUNK images: a chunk's
    # activations stay in cache from one layer to the next and, in
    # loss_and_grads, until the chunk's backward reads them.  For the seed model,
    # against one pass over the whole batch: a training step at batch 64 (two
    # chunks of 32) 1.09-1.22x faster; inference at batch 1000 1.4-1.6x faster
    # than in chunks of 256, the setting before (itself 1.8x faster than 1000 at
    # once).  Chunks of 16 rather than 32, once the dense weight gradients were
    # taken over the whole batch: the step at batch 64 1.06-1.07x (AMD EPYC).
    CPU_CHUNK = 16
    # On a GPU a step is bound by kernel launches, which chunks would multiply:
    # training runs whole, evaluation in chunks of GPU_EVAL_CHUNK (for memory).
    GPU_EVAL_CHUNK = 256

    def _chunk_bounds(self, n: int, train: bool) -> list[int]:
        """[0, ..., n]: the edges of the near-equal chunks a pass over n images runs in."""
        size = self.CPU_CHUNK if self.xp is np else None if train else self.GPU_EVAL_CHUNK
        count = -(-n // size) if size and n else 1
        return [n * k // count for k in range(count + 1)]

    # ------------------------------------------------------------------ compute
    def check_training_batch(self, n: int) -> None:
        """ShapeError unless the model can train on a batch of ``n`` images: a BatchNorm that sees
        1x1 maps cannot on one (no batch variance)."""
        if self._tightest_batch_norm is not None:
            self._tightest_batch_norm.check_training_batch(n)

    def training_step_bytes(self, n: int, optimizer_slots: int = 0) -> tuple[int, str, int]:
        """An estimate of the memory a training step on ``n`` images (:meth:`loss_and_grads`)
        holds at once, in bytes, with the layer that holds the most and its bytes.
        ``optimizer_slots``: the arrays of the parameters' size that an optimizer in this process
        keeps (:meth:`~cnn_core.optim.Optimizer.slots`: pscnn train's; a worker's is the server's).

        Counted: each layer's output and caches (a convolution's padded input and columns, the
        array KEEPS_ANOTHER_OUTPUT's layers keep besides, in a residual block too) for the images
        of one pass (a chunk on the CPU; the whole batch on a GPU or with a BatchNorm), the Dense
        layers' inputs and output gradients kept over the whole batch (a chunked step's, and
        their concatenation), a chunked step's dropout masks drawn for the whole batch, the
        input images, the parameters, their gradients and the optimizer's slots.  Left out: the backward pass's
        transient arrays, NumPy's and Python's own memory.  tracemalloc's peak over a step (the
        images, weights and slots included) was 0.74-1.14x this estimate for the seed model at
        batch 16 to 4,096 (and with SGD momentum and Adam at 64), a BatchNorm model at 64 and 512,
        a residual model at 128 and 512, a conv and dropout at 17 to 64, and a wide dense model
        with SGD momentum and Adam at 64 and 512; 0.66x for a conv of 256 channels at 64, and
        1.24x for a residual block of a conv and a dropout at 16 (its conv's backward transients).
        """
        bounds = self._chunk_bounds(n, train=True)
        whole = len(bounds) == 2 or self._couples_samples
        per_pass = n if whole else max(hi - lo for lo, hi in itertools.pairwise(bounds))
        values = {name: per_pass * count for name, count in self._step_values}
        if not whole:
            for layer in self.layers:
                if type(layer) is Dense:
                    values[layer.name] += 2 * n * (math.prod(layer.in_shape) + layer.units)
            for name, dropout in self._dropouts_of:
                held = dropout.batch_mask_values(n)     # a mask drawn whole: each chunk's is a view of it
                if held:
                    values[name] += held - dropout.batch_mask_values(per_pass)
        itemsize = np.dtype(self.dtype).itemsize
        fixed = n * math.prod(self.spec["input_shape"]) + (2 + optimizer_slots) * self.num_parameters()
        name, most = max(values.items(), key=lambda item: item[1])
        return itemsize * (sum(values.values()) + fixed), name, itemsize * most

    def forward(self, x, train: bool = True):
        """x: (N, C, H, W) float -> logits (N, num_classes).

        In training mode the per-layer caches are kept for :meth:`backward`
        (the whole batch in one pass; :meth:`loss_and_grads` is the faster
        step); in evaluation mode the batch runs in chunks (``_chunk_bounds``).
        """
        return self._forward(self._check_input(x), train)

    def _forward(self, x, train: bool):
        """:meth:`forward` on an input :meth:`_check_input` has checked."""
        if train:
            self.check_training_batch(x.shape[0])
            h, self._caches = self._run(x, True)
            self._dlogits_shape = h.shape
            return h
        self._caches = None
        bounds = self._chunk_bounds(x.shape[0], train=False)
        if len(bounds) == 2:
            return self._run(x, False)[0]
        with self._holding_weight_matrices():
            return self.xp.concatenate([self._run(x[lo:hi], False)[0] for lo, hi in itertools.pairwise(bounds)])

    @contextmanager
    def _holding_weight_matrices(self):
        """For a pass in chunks, all with the same weights: each conv makes the matrices it
        multiplies by once, not once a chunk (Conv2D.held_matrices; the seed model's: three
        copies of up to 18,432 values a chunk)."""
        for conv in self._convs:
            conv.held_matrices = {}
        try:
            yield
        finally:
            for conv in self._convs:
                conv.held_matrices = None

    def _run(self, x, train: bool):
        """The layers in execution order on a checked input -> (logits, caches)."""
        h = x.transpose(0, 2, 3, 1)            # NCHW -> NHWC (a view; a copy follows in conv1)
        caches = [None] * len(self.layers)
        for idx in self._order:
            h, caches[idx] = self.layers[idx].forward(h, train)
        return h, caches

    def backward(self, dlogits) -> dict:
        """dlogits: (N, num_classes) -> grads, same keys/shapes as ``params``.

        Updates nothing; the first layer's input gradient is never computed.
        """
        return self._backward(dlogits)

    def _backward(self, dlogits, dense_inputs=None) -> dict:
        """:meth:`backward`; with ``dense_inputs`` (a dict), the model's own Dense layers
        leave out their weight gradients and append their (input, output gradient) to
        ``dense_inputs[layer.name]`` instead, for a chunked step to take them over the whole batch."""
        if self._caches is None:
            raise ShapeError("Model.backward: call forward(x, train=True) first")
        if not hasattr(dlogits, "shape") or tuple(dlogits.shape) != tuple(self._dlogits_shape):
            raise ShapeError(f"Model.backward: dlogits must have the logits' shape {tuple(self._dlogits_shape)}, "
                             f"got {shape_of(dlogits)}")
        if dlogits.dtype.kind != "f":
            raise ShapeError(f"Model.backward: dlogits must be floating point, got dtype {dlogits.dtype}")
        grads: dict = {}
        d = self.xp.asarray(dlogits).astype(self.dtype, copy=False)   # else mixed-dtype gradients
        for pos in range(len(self._order) - 1, -1, -1):
            layer = self.layers[self._order[pos]]
            cache = self._caches[self._order[pos]]
            if dense_inputs is not None and type(layer) is Dense:
                dense_inputs.setdefault(layer.name, []).append((cache, d))
                d, g = layer.backward(d, cache, need_dx=pos > 0, weight_grad=False)
            else:
                d, g = layer.backward(d, cache, need_dx=pos > 0)
            for k, v in g.items():
                grads[f"{layer.name}.{k}"] = v
        self._caches = None
        return {name: grads[name] for name in self.params if name in grads}

    def loss_and_grads(self, x, y):
        """One training step's loss and gradients, without updating anything.

        x: (N, C, H, W) float, y: (N,) int labels -> ``(loss, logits, grads)``:
        the mean softmax cross-entropy (a float), the logits (N, num_classes)
        and a dict of gradients with the keys and shapes of ``params``.  The
        same values as ``softmax_cross_entropy(forward(x, train=True), y)``
        followed by ``backward``, dropout masks included, up to float rounding.

        On the CPU a batch larger than CPU_CHUNK runs as near-equal chunks,
        each through forward, loss and backward before the next, and the
        chunks' gradients are summed, but for the dense layers' weight
        gradients: one product over the whole batch's inputs and output
        gradients, kept from the chunks.  Each row's loss gradient is divided by
        the whole batch's N, and each dropout layer takes each chunk's rows of
        the batch's mask (:meth:`~cnn_core.layers.Dropout.begin_batch`).  A
        model with a layer that couples the samples (BatchNorm) and a GPU model
        run the batch whole: a GPU step is bound by kernel launches, which
        chunks would multiply.
        """
        x = self._check_input(x)
        n = x.shape[0]
        y = check_labels(y, n, self.xp)    # before any layer runs (a chunk would name its own length)
        if self._couples_samples and n and bool(((y < 0) | (y >= self.num_classes)).any()):
            # Checked again with the loss, but by then the forward pass has moved
            # the BatchNorm statistics: a refused step must leave the model as it was.
            raise label_range_error(y, self.num_classes)
        bounds = self._chunk_bounds(n, train=True)
        if len(bounds) == 2 or self._couples_samples:
            logits = self._forward(x, train=True)
            loss, dlogits = softmax_cross_entropy(logits, y)
            return loss, logits, self.backward(dlogits)
        dropouts = self._dropouts
        loss, logits, grads = 0.0, [], None
        # A dense layer's weight gradient, one GEMM over the whole batch instead of one per chunk
        # plus their sum: fc1's 1.6 MB gradient was written and added once a chunk (the step 1.02x).
        dense_inputs: dict = {}
        with self._holding_weight_matrices():
            try:
                for layer in dropouts:
                    layer.begin_batch(self.xp, n, self.dtype)
                for lo, hi in itertools.pairwise(bounds):
                    for layer in dropouts:
                        layer.sample_offset = lo
                    h, self._caches = self._run(x[lo:hi], True)
                    self._dlogits_shape = h.shape
                    chunk_loss, dlogits = softmax_cross_entropy(h, y[lo:hi], total=n)
                    chunk_grads = self._backward(dlogits, dense_inputs)
                    loss += chunk_loss
                    logits.append(h)
                    if grads is None:
                        grads = chunk_grads
                    else:
                        for name, g in chunk_grads.items():
                            grads[name] += g
            finally:
                for layer in dropouts:
                    layer.end_batch()
        for name, pairs in dense_inputs.items():
            xs, douts = zip(*pairs)
            grads[f"{name}.weight"] = Dense.weight_grad_of(self.xp.concatenate(xs), self.xp.concatenate(douts))
        return loss, self.xp.concatenate(logits), {name: grads[name] for name in self.params}

    def predict(self, x, batch_size: int = 1000):
        """Class predictions (N,) in evaluation mode, batch by batch."""
        if not is_integer(batch_size) or batch_size < 1:
            raise ConfigError(f"predict: batch_size must be an int >= 1, got {batch_size!r}")
        x = self._check_input(x)
        out = [self._forward(x[i:i + batch_size], train=False).argmax(axis=1)
               for i in range(0, len(x), batch_size)]
        return self.xp.concatenate(out) if out else self.xp.zeros(0, dtype=np.int64)

    def _check_input(self, x):
        """x: (N, C, H, W) float, finite -> the same in the model's array module and dtype; else ShapeError.

        The finiteness check is one reduction (~10 us for a batch of 64): a NaN
        pixel would make the loss and every gradient NaN, and a BatchNorm's
        running statistics NaN for good.
        """
        c, h, w = self.spec["input_shape"]
        if not hasattr(x, "ndim") or x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise ShapeError(f"model input must have shape (N, {c}, {h}, {w}), got {shape_of(x)}")
        if x.dtype.kind != "f":
            raise ShapeError(f"model input must be floating point, got dtype {x.dtype}")
        with np.errstate(over="ignore"):           # a value beyond float32 becomes Inf: refused next
            x = self.xp.asarray(x).astype(self.dtype, copy=False)
        if not all_finite(x.reshape(-1)):
            finite = self.xp.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
            raise ShapeError(f"model input contains NaN or Inf (in sample {int(self.xp.argmin(finite))} "
                             f"of {x.shape[0]}{'; or values beyond float32' if self.dtype == np.float32 else ''})")
        return x

    # ------------------------------------------------------------------ parameters
    def load_arrays(self, arrays: dict, kind: str = "params") -> None:
        """Copy ``arrays`` into ``self.params`` (or ``self.state``) in place.

        Every name must be present with the right shape; a clear ShapeError
        otherwise, and nothing is changed.  ``kind``: ``"params"`` or ``"state"``.
        """
        if kind not in ("params", "state"):     # anything else loaded into the state, silently
            raise ConfigError(f"Model.load_arrays: kind must be 'params' or 'state', got {kind!r}")
        _check_named_arrays(arrays, "Model.load_arrays")
        target = self.params if kind == "params" else self.state
        missing = [n for n in target if n not in arrays]
        extra = [n for n in arrays if n not in target]
        if missing or extra:
            raise ShapeError(f"model {kind}: missing {missing}, unexpected {extra}")
        self.assign(arrays)

    def assign(self, arrays: dict) -> None:
        """Copy any subset of parameters and state (by name) into the model, in place.

        What a worker does with the weights the server sends; unknown names,
        wrong shapes or arrays that are not floating point raise ShapeError
        before anything is copied.  Values are not checked for NaN (a pass over
        the model each step): workers check what the server sends first
        (``worker.trainer.check_weights``), checkpoints are checked on load.
        """
        _check_named_arrays(arrays, "Model.assign")
        targets = {}
        for name, value in arrays.items():
            target = self.params.get(name, self.state.get(name))
            if target is None:
                raise ShapeError(f"model has no parameter or state named {name!r}")
            if not hasattr(value, "dtype") or value.dtype.kind != "f":
                raise ShapeError(f"model {name}: needs a floating-point array, got "
                                 f"{getattr(value, 'dtype', type(value).__name__)}")
            if tuple(value.shape) != tuple(target.shape):
                raise ShapeError(f"model {name}: shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            targets[name] = target
        if self.xp is not np and isinstance(arrays, FlatArrays):
            # A server's weights are one host buffer: one copy to the device, not a synchronous one per array
            arrays = FlatArrays(arrays.specs, self.xp.asarray(arrays.flat))
        for name, target in targets.items():
            target[...] = self.xp.asarray(arrays[name])

    def state_problem(self, name: str, value) -> str | None:
        """What makes ``value`` (a host array) unusable as ``self.state[name]``, or None
        (see :meth:`cnn_core.layers.Layer.state_problem`)."""
        layer_name, _, key = name.partition(".")
        return next(layer for layer in self.layers if layer.name == layer_name).state_problem(key, value)

    def num_parameters(self) -> int:
        return int(sum(v.size for v in self.params.values()))

    def summary(self) -> str:
        """A table of layers, output shapes (channels-last) and parameter counts.

        Each column is as wide as its widest entry: a long layer name or shape ran into the next column.
        """
        rows = [("layer", "type", "output (H,W,C)", "params")]
        for layer in self.layers:
            count = sum(int(v.size) for v in layer.parameters.values())
            rows.append((layer.name, layer.type_name, str(layer.out_shape), f"{count:,}"))
        rows.append(("total", "", "", f"{self.num_parameters():,}"))
        widths = [max(len(row[col]) for row in rows) for col in range(4)]
        return "\n".join("  ".join([*(cell.ljust(width) for cell, width in zip(row[:3], widths)),
                                    row[3].rjust(widths[3])]) for row in rows)

    def __repr__(self) -> str:
        return f"Model({len(self.layers)} layers, {self.num_parameters():,} params, {self.dtype.name}, {self.device})"


def _check_named_arrays(arrays, who: str) -> None:
    """ShapeError unless ``arrays`` is a dict (name -> array): None or a list failed on ``in`` or ``.items()``."""
    if not isinstance(arrays, dict):
        raise ShapeError(f"{who}: arrays must be a dict name -> array, got {type(arrays).__name__}")


def _all_layers(layers):
    """Every layer, those inside residual blocks included, depth first."""
    for layer in layers:
        yield layer
        yield from _all_layers(getattr(layer, "layers", ()))


def execution_order(layers) -> list[int]:
    """Layer indices in the order they run: ReLU -> MaxPool runs as MaxPool -> ReLU.

    max(relu(x)) == relu(max(x)) and the gradients agree too (a window whose
    max is <= 0 gets zero gradient either way; otherwise both route it to the
    first maximum), but pooling first makes the ReLU touch 4x fewer values,
    forward and backward.  Only exact ``ReLU`` qualifies (SiLU is not monotonic).
    """
    order = list(range(len(layers)))
    pos = 0
    while pos < len(order) - 1:
        if type(layers[order[pos]]) is ReLU and type(layers[order[pos + 1]]) is MaxPool2D:
            order[pos], order[pos + 1] = order[pos + 1], order[pos]
            pos += 2
        else:
            pos += 1
    return order


def plan_conv_pool(layers, order) -> None:
    """Let a conv hand its output to the max pool that runs right after it window-major.

    When a Conv2D runs right before a MaxPool2D whose windows tile its output
    exactly (stride == kernel, dividing Ho and Wo), the conv orders its output
    positions by their offset in the pooling window (its column matrix's rows,
    at no extra cost), and the pool reduces kh*kw contiguous blocks instead of
    strided views, forward and backward.  Only the tensor passed between the
    two changes; the values, gradients and every other layer are the same.
    """
    for first, second in zip(order, order[1:]):
        conv, pool = layers[first], layers[second]
        if type(conv) is not Conv2D or type(pool) is not MaxPool2D:
            continue
        ho, wo, _ = conv.out_shape
        (kh, kw), (sh, sw) = pool.kernel, pool.stride
        if (sh, sw) == (kh, kw) and ho % kh == 0 and wo % kw == 0:
            conv.pool_windows = (kh, kw)
            pool.windows_first = True


def plan_pool_relu(layers, order) -> None:
    """Let a max pool apply the exact ReLU that runs right after it (``MaxPool2D.relu_after``).

    The ReLU's own passes go: forward, the pool clamps its fresh output in place
    instead of the ReLU allocating another; backward, the pool starts its
    routing with the ReLU's mask instead of the ReLU multiplying the gradient
    by it.  The values and gradients are bit for bit the same.
    """
    for first, second in zip(order, order[1:]):
        pool, relu = layers[first], layers[second]
        if type(pool) is MaxPool2D and type(relu) is ReLU:
            pool.relu_after = True
            relu.applied_by_pool = True


# What the plan_* functions above set on a layer to fuse its passes with a neighbour's: a conv's
# output and its pool's input window-major, a pool that applies the ReLU after it, that ReLU passing
# values through.  Kept here, beside them: a flag missing from it is one unfused() leaves set.
FUSION_FLAGS = ("pool_windows", "windows_first", "relu_after", "applied_by_pool")


@contextmanager
def unfused(layer):
    """``layer`` as it runs on its own for the block's duration, and as the model planned it after, even
    on an exception (gradcheck_layer): taken from a built model, its passes were another layout or another
    layer's work too (a max pool refused its (N, H, W, C) input as not window-major; its ReLU was the identity)."""
    fused = {name: vars(layer).pop(name) for name in FUSION_FLAGS if name in vars(layer)}
    try:
        yield layer
    finally:
        vars(layer).update(fused)


def build_model(spec="seed", seed: int = 0, dtype="float32", device: str = "cpu") -> Model:
    """Build a model from a preset name, spec dict, JSON spec or JSON spec file (see module docs)."""
    return Model(spec, seed=seed, dtype=dtype, device=device)
