"""Slow, obviously-correct reference implementations (NCHW, float64).

These are the "straightforward" versions the fast layers are tested and
benchmarked against: channels-first, float64, im2col built with a Python loop
over kernel offsets, max pooling with an explicit argmax.  Nothing here is
used for training.

:class:`ReferenceModel` runs a :class:`cnn_core.model.Model`'s architecture
(conv2d, relu, maxpool2d, flatten, dense, dropout in eval mode) with these
functions on float64 copies of its parameters.
"""
from __future__ import annotations

import numpy as np

from .losses import softmax_cross_entropy


def im2col_nchw(x: np.ndarray, kh: int, kw: int, stride: int, pad: int) -> np.ndarray:
    """x: (N, C, H, W) -> cols (N, C*kh*kw, Ho*Wo), loop over kernel offsets."""
    n, c, h, w = x.shape
    ho = (h + 2 * pad - kh) // stride + 1
    wo = (w + 2 * pad - kw) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = np.zeros((n, c, kh, kw, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
    return cols.reshape(n, c * kh * kw, ho * wo)


def col2im_nchw(cols: np.ndarray, x_shape, kh: int, kw: int, stride: int, pad: int) -> np.ndarray:
    """Adjoint of :func:`im2col_nchw`: (N, C*kh*kw, Ho*Wo) -> (N, C, H, W)."""
    n, c, h, w = x_shape
    ho = (h + 2 * pad - kh) // stride + 1
    wo = (w + 2 * pad - kw) // stride + 1
    cols = cols.reshape(n, c, kh, kw, ho, wo)
    dx = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            dx[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride] += cols[:, :, i, j]
    return dx[:, :, pad:pad + h, pad:pad + w]


def conv2d_forward(x, w, b, stride=1, pad=0):
    """x (N,C,H,W), w (O,C,kh,kw), b (O,) -> (out (N,O,Ho,Wo), cache)."""
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho = (h + 2 * pad - kh) // stride + 1
    wo = (wd + 2 * pad - kw) // stride + 1
    cols = im2col_nchw(x, kh, kw, stride, pad)
    out = w.reshape(o, -1) @ cols + b[None, :, None]          # (O,K) @ (N,K,P)
    return out.reshape(n, o, ho, wo), (x.shape, cols, w, stride, pad)


def conv2d_backward(dout, cache):
    """-> (dx, dw, db) for :func:`conv2d_forward`."""
    x_shape, cols, w, stride, pad = cache
    n, o = dout.shape[:2]
    d = dout.reshape(n, o, -1)
    dw = (d @ cols.transpose(0, 2, 1)).sum(axis=0).reshape(w.shape)
    db = d.sum(axis=(0, 2))
    dcols = w.reshape(o, -1).T @ d
    dx = col2im_nchw(dcols, x_shape, w.shape[2], w.shape[3], stride, pad)
    return dx, dw, db


def maxpool_forward(x, k=2, stride=2):
    """x (N,C,H,W) -> (out (N,C,Ho,Wo), cache); ties go to the first maximum."""
    n, c, h, w = x.shape
    ho = (h - k) // stride + 1
    wo = (w - k) // stride + 1
    windows = np.empty((n, c, ho, wo, k * k), dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            windows[..., i * k + j] = x[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
    arg = windows.argmax(axis=-1)                 # argmax returns the first maximum
    return windows.max(axis=-1), (x.shape, arg, k, stride)


def maxpool_backward(dout, cache):
    x_shape, arg, k, stride = cache
    dx = np.zeros(x_shape, dtype=dout.dtype)
    ho, wo = dout.shape[2:]
    for i in range(k):
        for j in range(k):
            dx[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride] += dout * (arg == i * k + j)
    return dx


class ReferenceModel:
    """A float64 NCHW re-implementation of a Model's forward/backward.

    Supports conv2d, relu, maxpool2d, flatten, dense and dropout (treated as
    the identity, so compare with ``train=False`` semantics or p=0).
    """

    def __init__(self, model):
        self.layers = model.layers
        self.params = {k: np.array(v, dtype=np.float64) for k, v in model.params.items()}

    def loss_and_grads(self, x, y):
        """x (N,C,H,W), y (N,) -> (loss, grads dict in the model's naming)."""
        h = np.asarray(x, dtype=np.float64)
        tape = []
        for layer in self.layers:
            kind, name = layer.type_name, layer.name
            if kind == "conv2d":
                if layer.stride[0] != layer.stride[1] or layer.padding[0] != layer.padding[1]:
                    raise ValueError("ReferenceModel: square stride/padding only")
                h, cache = conv2d_forward(h, self.params[f"{name}.weight"], self.params[f"{name}.bias"],
                                          layer.stride[0], layer.padding[0])
            elif kind == "relu":
                cache = h > 0
                h = h * cache
            elif kind == "maxpool2d":
                h, cache = maxpool_forward(h, layer.kernel[0], layer.stride[0])
            elif kind == "flatten":
                cache = h.shape
                h = h.reshape(h.shape[0], -1)
            elif kind == "dense":
                cache = h
                h = h @ self.params[f"{name}.weight"] + self.params[f"{name}.bias"]
            elif kind == "dropout":
                cache = None
            else:
                raise ValueError(f"ReferenceModel: unsupported layer type {kind}")
            tape.append((kind, name, cache))
        loss, d = softmax_cross_entropy(h, y)
        grads = {}
        for kind, name, cache in reversed(tape):
            if kind == "conv2d":
                d, grads[f"{name}.weight"], grads[f"{name}.bias"] = conv2d_backward(d, cache)
            elif kind == "relu":
                d = d * cache
            elif kind == "maxpool2d":
                d = maxpool_backward(d, cache)
            elif kind == "flatten":
                d = d.reshape(cache)
            elif kind == "dense":
                grads[f"{name}.weight"] = cache.T @ d
                grads[f"{name}.bias"] = d.sum(axis=0)
                d = d @ self.params[f"{name}.weight"].T
        return loss, grads
