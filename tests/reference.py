"""A naive float64 NumPy reference of the losses, written from PyTorch's formulas.

Deliberately independent of fastxent's kernels: no fused passes, no fast
exp/log, plain NumPy in float64 on rows of shape (rows, C). Every function
takes the class axis as ``axis`` and returns float64 results.

Cross-entropy (``torch.nn.functional.cross_entropy``), per row i with
``logp = log_softmax(x_i)``:

* hard target t, weight w, smoothing eps, C classes::

      loss_i = (1 - eps) * (-w[t] logp[t]) + eps / C * (-sum_c w[c] logp[c])

  0 where ``t == ignore_index``; ``mean`` divides the sum by
  ``sum_i w[t_i]`` over rows not ignored (both terms, as PyTorch does).
* class probabilities q: ``q' = (1 - eps) q + eps / C``,
  ``loss_i = -sum_c w[c] q'[c] logp[c]``; ``mean`` divides by the number of rows.

Gradient: writing ``loss_i = -sum_c a_c logp_c`` (``a`` the coefficients
above), ``d loss_i / d x_j = (sum_c a_c) softmax_j - a_j``, times the
reduction's scale.
"""

from __future__ import annotations

import numpy as np


def _rows(x, axis):
    """float64 copy of ``x`` with the class axis last, as (rows, C), and the batch shape."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    return x.reshape(-1, x.shape[-1]).copy(), x.shape[:-1]


def _unrows(rows, batch_shape, axis):
    return np.moveaxis(rows.reshape(batch_shape + (rows.shape[-1],)), -1, axis)


def logsumexp(x, axis=-1):
    rows, batch = _rows(x, axis)
    out = np.empty(rows.shape[0])
    for i, r in enumerate(rows):
        m = np.max(r) if r.size else -np.inf
        if np.isnan(m):
            out[i] = np.nan
        elif np.isinf(m):
            # all -inf -> -inf; any +inf -> +inf (torch.logsumexp)
            out[i] = m
        else:
            out[i] = m + np.log(np.sum(np.exp(r - m)))
    return out.reshape(batch)


def log_softmax(x, axis=-1):
    rows, batch = _rows(x, axis)
    out = np.empty_like(rows)
    for i, r in enumerate(rows):
        m = np.max(r)
        out[i] = (r - m) - np.log(np.sum(np.exp(r - m)))
    return _unrows(out, batch, axis)


def softmax(x, axis=-1):
    rows, batch = _rows(x, axis)
    out = np.empty_like(rows)
    for i, r in enumerate(rows):
        e = np.exp(r - np.max(r))
        out[i] = e / np.sum(e)
    return _unrows(out, batch, axis)


def _reduce(losses, denominator, reduction, batch):
    if reduction == "none":
        return losses.reshape(batch)
    total = float(np.sum(losses))
    if reduction == "sum":
        return total
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.float64(total) / np.float64(denominator)


def cross_entropy_with_grad(x, target, weight=None, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, axis=-1):
    """(loss, gradient) in float64; see the module docstring."""
    rows, batch = _rows(x, axis)
    n, C = rows.shape
    w = np.ones(C) if weight is None else np.asarray(weight, dtype=np.float64)
    eps = float(label_smoothing)
    target = np.asarray(target)
    soft = target.dtype.kind == "f"
    coef = np.zeros((n, C))  # a_c of each row: loss_i = -sum_c a_c logp_c
    if soft:
        q, _ = _rows(target, axis)
        coef = w * ((1.0 - eps) * q + eps / C)
        denominator = float(n)
    else:
        t = target.reshape(-1).astype(np.int64)
        denominator = 0.0
        for i in range(n):
            if t[i] == ignore_index:
                continue
            if not 0 <= t[i] < C:
                raise IndexError(t[i])
            coef[i] = eps / C * w
            coef[i, t[i]] += (1.0 - eps) * w[t[i]]
            denominator += w[t[i]]
    losses = np.zeros(n)
    grad = np.zeros((n, C))
    for i in range(n):
        if not coef[i].any():
            continue
        logp = log_softmax(rows[i])
        with np.errstate(invalid="ignore"):
            # a 0 coefficient times a -inf log-probability adds nothing
            losses[i] = -np.sum(np.where(coef[i] != 0, coef[i] * logp, 0.0))
        grad[i] = coef[i].sum() * np.exp(logp) - coef[i]
    if reduction == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            grad = grad / denominator if denominator != 0 else grad
    return (_reduce(losses, denominator, reduction, batch), _unrows(grad, batch, axis))


def cross_entropy(x, target, **kw):
    return cross_entropy_with_grad(x, target, **kw)[0]


def nll_loss(log_probs, target, weight=None, ignore_index=-100, reduction="mean", axis=-1):
    rows, batch = _rows(log_probs, axis)
    n, C = rows.shape
    w = np.ones(C) if weight is None else np.asarray(weight, dtype=np.float64)
    t = np.asarray(target).reshape(-1).astype(np.int64)
    losses = np.zeros(n)
    denominator = 0.0
    for i in range(n):
        if t[i] == ignore_index:
            continue
        losses[i] = -w[t[i]] * rows[i, t[i]]
        denominator += w[t[i]]
    return _reduce(losses, denominator, reduction, batch)


def bce_with_logits_with_grad(x, target, weight=None, pos_weight=None, reduction="mean"):
    """(loss, gradient) of ``binary_cross_entropy_with_logits`` in float64.

    loss = (1 - t) x + l (log(1 + exp(-|x|)) + max(-x, 0)), l = 1 + (pw - 1) t,
    times the weight; d loss / dx = (1 - t) - l (1 - sigmoid(x)), times the weight.
    """
    x = np.asarray(x, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    w = 1.0 if weight is None else np.asarray(weight, dtype=np.float64)
    pw = 1.0 if pos_weight is None else np.asarray(pos_weight, dtype=np.float64)
    lw = 1.0 + (pw - 1.0) * t
    softplus_neg = np.log1p(np.exp(-np.abs(x))) + np.maximum(-x, 0.0)  # -log sigmoid(x)
    loss = ((1.0 - t) * x + lw * softplus_neg) * w
    sigmoid = 1.0 / (1.0 + np.exp(-x))
    grad = ((1.0 - t) - lw * (1.0 - sigmoid)) * w
    grad = np.broadcast_to(grad, x.shape).copy()
    loss = np.broadcast_to(loss, x.shape)
    if reduction == "none":
        return loss.copy(), grad
    if reduction == "sum":
        return float(loss.sum()), grad
    return float(loss.sum()) / loss.size if loss.size else np.nan, grad / max(loss.size, 1)
