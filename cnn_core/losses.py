"""Softmax cross-entropy: the loss, and its gradient next to it."""
from __future__ import annotations

from .backend import get_array_module
from .errors import ShapeError


def softmax_cross_entropy(logits, y, total: int | None = None):
    """Mean softmax cross-entropy and its gradient.

    logits: (N, K) float, K >= 1; y: (N,) integer labels in [0, K).
    Returns ``(loss, dlogits)``: ``loss`` a Python float (mean over N),
    ``dlogits`` (N, K) in the logits' dtype, = (softmax(logits) - onehot(y)) / N.

    NaN or Inf in the logits (a diverging model) is not an error: the loss
    comes back NaN or inf, as in PyTorch, and the caller checks that one
    scalar (``math.isfinite(loss)``) instead of a pass over the logits.
    ``pscnn train`` stops on it ("training diverged at update ...: the loss
    is nan"), the parameter server rejects a trainer's push that carries it
    (enough in a row stop the run as diverged), and an evaluation's NaN test
    loss stops ``pscnn train`` the same way.

    ``total``: when these N rows are one chunk of a larger batch of ``total``
    rows (``Model.loss_and_grads``), divide by ``total`` instead of N, so the
    chunks' losses add up to the batch's mean and each row's gradient is
    exactly the one the whole batch would give it.
    """
    xp = get_array_module(logits)
    logits = xp.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ShapeError(f"softmax_cross_entropy: logits must be (N, K) with K >= 1 classes, "
                         f"got shape {tuple(logits.shape)}")
    if logits.dtype.kind != "f":       # the gradient, cast back to integers, would be all zeros
        raise ShapeError(f"softmax_cross_entropy: logits must be floating point, got dtype {logits.dtype}")
    n, k = logits.shape
    y = check_labels(y, n, xp)
    if total is None:
        total = n
    elif not isinstance(total, int) or isinstance(total, bool) or total < max(n, 1):
        raise ShapeError(f"softmax_cross_entropy: total must be an int >= the {n} rows given, got {total!r}")
    shifted = logits - logits.max(axis=1, keepdims=True)   # exp() cannot overflow
    exp = xp.exp(shifted)
    sums = exp.sum(axis=1, keepdims=True)
    # A (N, K) mask rather than fancy indexing by label: one kernel instead of
    # several on a GPU, and it doubles as the range check: a label outside
    # [0, K) matches no column.
    onehot = y[:, None] == xp.arange(k)
    if int(onehot.sum()) != n:
        raise label_range_error(y, k)
    # log(sum exp) - the label's logit, both shifted: >= 0 as written, where negating the
    # log-likelihood read -0.0 for a batch predicted with certainty (float32 margins > ~17).
    nll = xp.log(sums[:, 0]) - xp.where(onehot, shifted, 0).sum(axis=1)
    loss = float(nll.sum() / total) if n else 0.0
    dlogits = exp / sums
    dlogits -= onehot
    dlogits /= max(total, 1)
    return loss, dlogits.astype(logits.dtype, copy=False)


def check_labels(y, n: int, xp):
    """``y`` as an array of ``xp``; ShapeError unless it is (n,) integers (no pass over the values)."""
    y = xp.asarray(y)
    if y.shape != (n,):
        raise ShapeError(f"softmax_cross_entropy: labels must have shape ({n},), got {tuple(y.shape)}")
    if y.dtype.kind not in "iu":
        raise ShapeError(f"softmax_cross_entropy: labels must be integers, got dtype {y.dtype}")
    return y


def label_range_error(y, k: int) -> ShapeError:
    """The error for labels ``y`` (non-empty) not all in [0, k)."""
    return ShapeError(f"softmax_cross_entropy: labels must lie in [0, {k}), got range "
                      f"[{int(y.min())}, {int(y.max())}]")
