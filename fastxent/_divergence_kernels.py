"""CPU kernels of the elementwise divergences (``fastxent.divergences``):
KL divergence of log-probabilities and binary cross-entropy of probabilities.

The work is split as the BCE-with-logits kernel's (``_cpu_kernels._bce``):
tasks of about ``seg`` elements, each in spans of ``_SPAN`` whose losses are
summed with ``lane_dot`` in a fixed order, and the task sums again with
``lane_dot``, so the loss has the same bits for any thread count. The
element formulas are ``_formulas``' (``kl_element``, ``kl_log_target_element``,
``bce_prob_element``); the log and exp are ``_fastmath``'s, which vectorize.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from . import _formulas as F
from ._cpu_kernels import _SPAN, _Kernel, _at, _cast_like, _jit, _span, bce_tasks
from ._fastmath import fast_exp, fast_log
from ._lanes import lane_dot

#: Which divergence a kernel call computes (an argument, so that one
#: compiled kernel serves all three; LLVM hoists the test out of the loop).
KL, KL_LOG_TARGET, BCE = 0, 1, 2

kl_element = _jit(F.kl_element, inline=True)
kl_log_target_element = _jit(F.kl_log_target_element, inline=True)
bce_prob_element = _jit(F.bce_prob_element, inline=True)


@_jit(inline=True)
def _element(kind, xc, tc, w, c):
    """(loss, gradient) of element ``c`` for divergence ``kind``, times its
    weight, in the input's float type."""
    one = _cast_like(1.0, tc)
    if kind == KL:
        loss, grad = kl_element(xc, tc, fast_log(tc), one - one)
    elif kind == KL_LOG_TARGET:
        loss, grad = kl_log_target_element(xc, tc, fast_exp(tc))
    else:
        loss, grad = bce_prob_element(xc, tc, fast_log(xc), fast_log(one - xc), one,
                                      _cast_like(F.BCE_GRAD_EPS, tc))
    wc = _at(w, c, one)
    return loss * wc, grad * wc


@_jit
def _span_losses(kind, x, t, w, scale, g, losses):
    """One span: losses into ``losses``, gradient into ``g`` (None: no gradient)."""
    scale = _cast_like(scale, t)
    for c in range(t.shape[0]):
        loss, grad = _element(kind, x[c], t[c], w, c)
        losses[c] = loss
        if g is not None:
            g[c] = grad * scale


@_jit
def _span_losses_inplace(kind, g, t, w, scale, losses):
    """``_span_losses`` with the gradient replacing the input in ``g`` (one
    array read and written: see ``_cpu_kernels._bce_span_inplace``)."""
    scale = _cast_like(scale, t)
    for c in range(t.shape[0]):
        loss, grad = _element(kind, g[c], t[c], w, c)
        losses[c] = loss
        g[c] = grad * scale


@_jit(inline=True)
def _span_into(kind, x, t, w, scale, g, inplace, r, s0, n, dest):
    ts, ws = _span(t, r, s0, n), _span(w, r, s0, n)
    if g is None:
        _span_losses(kind, _span(x, r, s0, n), ts, ws, scale, None, dest)
    elif inplace:
        _span_losses_inplace(kind, _span(g, r, s0, n), ts, ws, scale, dest)
    else:
        _span_losses(kind, _span(x, r, s0, n), ts, ws, scale, _span(g, r, s0, n), dest)


@_jit
def _task(kind, x, t, w, scale, g, out, inplace, r0, r1, b0, b1):
    """Loss sum of elements [b0, b1) of rows [r0, r1) (as ``_cpu_kernels._bce_task``)."""
    total = 0.0
    if out is not None:
        for r in range(r0, r1):
            for s0 in range(b0, b1, _SPAN):
                n = min(_SPAN, b1 - s0)
                _span_into(kind, x, t, w, scale, g, inplace, r, s0, n, out[r, s0:s0 + n])
        return total
    scratch = np.empty(_SPAN, t.dtype)
    fill = 0
    for r in range(r0, r1):
        for s0 in range(b0, b1, _SPAN):
            n = min(_SPAN, b1 - s0)
            if fill + n > _SPAN:
                total += lane_dot(scratch[:fill], None, 0.0)
                fill = 0
            _span_into(kind, x, t, w, scale, g, inplace, r, s0, n, scratch[fill:fill + n])
            fill += n
    return total + lane_dot(scratch[:fill], None, 0.0)


def _divergence(x, kind, t, w, scale, g, out, inplace, losses, seg):
    """A divergence over 2-D operands in tasks of about ``seg`` elements;
    returns the loss sum (fixed order: per task, then over the tasks)."""
    n_rows, n_cols = t.shape
    rows_per, per_row, _ = bce_tasks(n_rows, n_cols, seg)
    for k in prange(losses.shape[0]):
        r0 = k // per_row * rows_per
        b0 = k % per_row * seg
        losses[k] = _task(kind, x, t, w, scale, g, out, inplace, r0, min(r0 + rows_per, n_rows),
                          b0, min(b0 + seg, n_cols))
    return lane_dot(losses, None, 0.0)


def _count_outside_unit(x, counts, seg):
    """Elements of the flat ``x`` outside [0, 1] (NaN included), counted per
    task of ``seg`` elements into ``counts``: BCE's check before it writes."""
    n = x.shape[0]
    for k in prange(counts.shape[0]):
        xs = x[k * seg:min(n, (k + 1) * seg)]
        bad = 0
        for i in range(xs.shape[0]):
            v = xs[i]
            # no short-circuit: one vectorizable expression (NaN fails v == v)
            bad += np.int32((v < 0.0) | (v > 1.0) | (v != v))
        counts[k] = bad
    return counts.sum()


divergence = _Kernel(_divergence)
count_outside_unit = _Kernel(_count_outside_unit)
