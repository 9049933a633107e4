"""Kernels of the class-sharded layout of ``fastxent.dask``.

Logits chunked along the classes reach a row's log-sum-exp in two steps:
each block of classes [c0, c1) yields per-row partials (``block_partials``),
the partials of a row are merged in block order into its loss and its
gradient's coefficients (``merge_partials``, the formulas of ``_formulas``),
and each gradient block is then written from the merged coefficients
(``gradient_block``). Sums over a row use the fixed-order lanes of
``_lanes``; the merge is a left fold over the blocks in class order, so the
bits do not depend on the scheduler or the thread count.

Partials of a row, float64 (``PARTS`` columns):
0 m_k, the block's max; 1 s_k = sum exp(x - m_k); 2 a_k, 3 b_k: for class
indices W_k = sum w_c and sum w_c (x_c - m_k) (the smoothing term), for
probabilities sum q'_c and sum q'_c (x_c - m_k); 4 the target's logit when
the target falls in the block (else 0).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from . import _cache
from . import _formulas as F
from ._cpu_kernels import _JIT_OPTIONS, _Kernel
from ._fastmath import fast_exp, fast_log
from ._lanes import exp_sum, lane_dot, row_max, soft_sums

_cache.install()

PARTS = 5

_hard_target_row = numba.njit(inline="always", **_JIT_OPTIONS)(F.hard_target_row)
_soft_target_row = numba.njit(inline="always", **_JIT_OPTIONS)(F.soft_target_row)
_gradient_element = numba.njit(inline="always", **_JIT_OPTIONS)(F.gradient_element)
_log_sum_exp = numba.njit(inline="always", **_JIT_OPTIONS)(F.log_sum_exp)
_log_softmax_element = numba.njit(inline="always", **_JIT_OPTIONS)(F.log_softmax_element)


def _partials_hard(x, y, w, c0, smoothing, out):
    """Partials of each row of the block ``x`` (rows, classes c0..c0+width)
    against class indices ``y``; ``w`` the block of class weights or None."""
    width = x.shape[1]
    for r in prange(x.shape[0]):
        row = x[r]
        m = row_max(row, None)
        out[r, 0] = m
        out[r, 1] = exp_sum(row, m, None)
        out[r, 2] = 0.0
        out[r, 3] = 0.0
        out[r, 4] = 0.0
        if smoothing:
            if w is None:
                out[r, 2] = float(width)
            else:
                out[r, 2] = lane_dot(w, None, 0.0)
            out[r, 3] = lane_dot(row, w, m)
        t = y[r] - c0
        if t >= 0 and t < width:
            out[r, 4] = row[t]
    return 0


def _partials_soft(x, q, w, keep, uniform, out):
    """Partials of each row of the block ``x`` against the block of
    probabilities ``q``, smoothed as keep q + uniform."""
    for r in prange(x.shape[0]):
        row = x[r]
        m = row_max(row, None)
        out[r, 0] = m
        out[r, 1] = exp_sum(row, m, None)
        total, dot = soft_sums(row, q[r], w, keep, uniform, m, None)
        out[r, 2] = total
        out[r, 3] = dot
        out[r, 4] = 0.0
    return 0


def _merged_row(parts, r):
    """(m, s, a, b, x_t) of row ``r`` merged over its blocks, in block order."""
    n_blocks = parts.shape[1]
    m = -math.inf
    for k in range(n_blocks):
        if parts[r, k, 0] > m:
            m = parts[r, k, 0]
    s = 0.0
    a = 0.0
    b = 0.0
    xt = 0.0
    for k in range(n_blocks):
        mk = parts[r, k, 0]
        if mk != -math.inf:
            s += parts[r, k, 1] * fast_exp(mk - m)
            b += parts[r, k, 3] + (mk - m) * parts[r, k, 2]
        a += parts[r, k, 2]
        xt += parts[r, k, 4]
    return m, s, a, b, xt


def _merge_hard(parts, y, weight, ignore_index, opts, n_classes, losses, coefs):
    """Losses and gradient coefficients of rows against class indices.

    ``coefs[r]`` = (m, k1, k2, kt) for scale 1 (``gradient_block`` scales
    them); returns the first bad row (-1 if none) and the mean's
    denominator, the sum of the targets' weights."""
    n_rows = losses.shape[0]
    bad = -1
    for r in range(n_rows):
        t = y[r]
        if t != ignore_index and (t < 0 or t >= n_classes):
            bad = r
            break
    if bad >= 0:
        return bad, 0.0
    denominator = 0.0
    for r in range(n_rows):
        t = y[r]
        if t != ignore_index:
            denominator += 1.0 if weight is None else weight[t]
    for r in prange(n_rows):
        t = y[r]
        m, s, w_sum, w_dot, xt = _merged_row(parts, r)
        if t == ignore_index:
            losses[r] = 0.0
            coefs[r, 0] = m
            coefs[r, 1] = 0.0
            coefs[r, 2] = 0.0
            coefs[r, 3] = 0.0
            continue
        w_t = 1.0 if weight is None else weight[t]
        loss, k1, k2, kt = _hard_target_row(m, fast_log(s), s, xt, w_t, w_sum, w_dot, opts,
                                            1.0, n_classes)
        losses[r] = loss
        coefs[r, 0] = m
        coefs[r, 1] = k1
        coefs[r, 2] = k2
        coefs[r, 3] = kt
    return -1, denominator


def _merge_soft(parts, opts, losses, coefs):
    """Losses and gradient coefficients of rows against probabilities:
    ``coefs[r]`` = (m, k1, 1, 0) for scale 1."""
    for r in prange(losses.shape[0]):
        m, s, total, q_dot, _ = _merged_row(parts, r)
        loss, k1 = _soft_target_row(m, fast_log(s), s, total, q_dot, opts, 1.0)
        losses[r] = loss
        coefs[r, 0] = m
        coefs[r, 1] = k1
        coefs[r, 2] = 1.0
        coefs[r, 3] = 0.0
    return 0


def _gradient_hard(x, coefs, scale, y, w, c0, copy, g):
    """One gradient block against class indices: grad_c = scale (exp(x_c - m) k1
    - k2 w_c - kt [c = t]) (``_formulas.hard_target_row``)."""
    width = x.shape[1]
    for r in prange(x.shape[0]):
        m = coefs[r, 0]
        k1 = scale * coefs[r, 1]
        k2 = scale * coefs[r, 2]
        row = x[r]
        out = g[r]
        if copy:
            # rows of a strided block: copied in vector code first, so that
            # the map below reads contiguous elements (LLVM keeps strided
            # loads scalar)
            row_max(row, out)
            if w is None:
                for c in range(width):
                    out[c] = _gradient_element(fast_exp(out[c] - m), k1, k2)
            else:
                for c in range(width):
                    out[c] = _gradient_element(fast_exp(out[c] - m), k1, k2 * w[c])
        elif w is None:
            for c in range(width):
                out[c] = _gradient_element(fast_exp(row[c] - m), k1, k2)
        else:
            for c in range(width):
                out[c] = _gradient_element(fast_exp(row[c] - m), k1, k2 * w[c])
        t = y[r] - c0
        if t >= 0 and t < width:
            out[t] -= scale * coefs[r, 3]
    return 0


def _gradient_soft(x, coefs, scale, q, w, keep, uniform, copy, g):
    """One gradient block against probabilities: grad_c = scale (exp(x_c - m) k1
    - (keep q_c + uniform) w_c) (``_formulas.soft_target_row``)."""
    width = x.shape[1]
    for r in prange(x.shape[0]):
        m = coefs[r, 0]
        k1 = scale * coefs[r, 1]
        row = x[r]
        qr = q[r]
        out = g[r]
        if copy:
            row_max(row, out)
            for c in range(width):
                target = scale * (keep * qr[c] + uniform)
                if w is not None:
                    target *= w[c]
                out[c] = _gradient_element(fast_exp(out[c] - m), k1, target)
        elif w is None:
            for c in range(width):
                out[c] = _gradient_element(fast_exp(row[c] - m), k1,
                                           scale * (keep * qr[c] + uniform))
        else:
            for c in range(width):
                out[c] = _gradient_element(fast_exp(row[c] - m), k1,
                                           scale * (keep * qr[c] + uniform) * w[c])
    return 0


def _softmax_block(x, m, log_s, log, copy, out):
    """softmax (or log_softmax) of a block from each row's merged m and log(s)."""
    width = x.shape[1]
    for r in prange(x.shape[0]):
        row = x[r]
        o = out[r]
        mr = m[r]
        ls = log_s[r]
        if copy:
            row_max(row, o)
            if log:
                for c in range(width):
                    o[c] = _log_softmax_element(o[c], mr, ls)
            else:
                for c in range(width):
                    o[c] = fast_exp((o[c] - mr) - ls)
        elif log:
            for c in range(width):
                o[c] = _log_softmax_element(row[c], mr, ls)
        else:
            for c in range(width):
                o[c] = fast_exp((row[c] - mr) - ls)
    return 0


def _merge_lse(parts, lse, m_out, log_s_out):
    """Each row's log-sum-exp from its (m, s) partials."""
    for r in prange(lse.shape[0]):
        m, s, _, _, _ = _merged_row(parts, r)
        log_s = fast_log(s)
        m_out[r] = m
        log_s_out[r] = log_s
        lse[r] = _log_sum_exp(m, log_s)
    return 0


_merged_row = numba.njit(inline="always", **_JIT_OPTIONS)(_merged_row)

partials_hard = _Kernel(_partials_hard)
partials_soft = _Kernel(_partials_soft)
merge_hard = _Kernel(_merge_hard)
merge_soft = _Kernel(_merge_soft)
merge_lse = _Kernel(_merge_lse)
gradient_hard = _Kernel(_gradient_hard)
gradient_soft = _Kernel(_gradient_soft)
softmax_block = _Kernel(_softmax_block)
