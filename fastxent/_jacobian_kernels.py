"""CPU kernels of the softmax Jacobian: the backward of softmax and
log_softmax, the full Jacobian, and the cross-entropy Hessian-vector product.

Each works on the canonical row form of ``_cpu_kernels`` (2-D ``(rows, C)``
or 3-D ``(A, C, B)``, row ``r`` through ``_row``), one fused pass per row:
the row's sums with the fixed-order lanes of ``_lanes``, then one map
writing the result, while the row is still in cache. No temporary of the
input's size is made. The per-element and per-row formulas are those of
``_formulas`` (shared with ``_cuda_jacobian_kernels``).
"""
from __future__ import annotations

import numpy as np
from numba import prange
from numba.extending import overload

from . import _formulas as F
from ._cpu_kernels import (_JIT_OPTIONS, _Kernel, _by_targets, _cast_like, _class_weight, _jit,
                           _row, _weight_sum, _zero)
from ._host import scan_hard_targets
from ._lanes import (exp_dot_into, exp_sum_inplace, lane_dot, minus_exp_times, row_max,
                     soft_sums, sum_ahead)

softmax_backward_element = _jit(F.softmax_backward_element, inline=True)
softmax_jacobian_element = _jit(F.softmax_jacobian_element, inline=True)
hard_target_curvature = _jit(F.hard_target_curvature, inline=True)
soft_target_curvature = _jit(F.soft_target_curvature, inline=True)
hessian_vector_element = _jit(F.hessian_vector_element, inline=True)
mean_scale = _jit(F.mean_scale, inline=True)


# --------------------------------------------------------------------------
# Row routines. The in-place variants read and write one array (``go``):
# two arguments that are the same buffer would fail LLVM's overlap check
# and run element by element.


@_jit
def _softmax_backward_row(go, o, g, inplace, inner, r):
    """g <- o (go - sum(go o)) for row ``r`` (``g`` is ``go`` when ``inplace``)."""
    gor = _row(go, r, inner)
    orow = _row(o, r, inner)
    dot = _cast_like(lane_dot(gor, orow, 0.0), gor)
    if inplace:
        for c in range(gor.shape[0]):
            gor[c] = softmax_backward_element(orow[c], gor[c], dot)
    else:
        gr = _row(g, r, inner)
        for c in range(gor.shape[0]):
            gr[c] = softmax_backward_element(orow[c], gor[c], dot)


@_jit
def _log_softmax_backward_row(go, o, g, inplace, inner, r):
    """g <- go - exp(o) sum(go) for row ``r`` (``g`` is ``go`` when ``inplace``)."""
    gor = _row(go, r, inner)
    orow = _row(o, r, inner)
    # the output's row is prefetched meanwhile: the map below then reads
    # both rows from cache
    total = _cast_like(sum_ahead(gor, orow), gor)
    # log_softmax_backward_element over the row, emitted as vector code
    if inplace:
        minus_exp_times(gor, orow, total, gor)
    else:
        minus_exp_times(gor, orow, total, _row(g, r, inner))


@_jit
def _jacobian_row(x, out, inner, r):
    """out[r] <- diag(p) - p p^T, p the softmax of row ``r`` (max-shifted).
    The last row of ``out[r]`` holds p until it is itself written."""
    xr = _row(x, r, inner)
    jr = out[r]
    C = xr.shape[0]
    p = jr[C - 1]
    m = row_max(xr, p)
    inv_s = _cast_like(1.0 / exp_sum_inplace(p, m, None), p)
    for c in range(C):
        p[c] = p[c] * inv_s
    one, zero = _cast_like(1.0, p), _cast_like(0.0, p)
    for i in range(C - 1):
        ji = jr[i]
        pi = p[i]
        for j in range(C):
            ji[j] = softmax_jacobian_element(pi, p[j], one if i == j else zero)
    last = p[C - 1]
    for j in range(C):
        p[j] = softmax_jacobian_element(last, p[j], one if j == C - 1 else zero)


def _hvp_row(x, y, q, v, opts, wsum, scale, g, inner, r):
    """Row ``r`` of the Hessian-vector product into ``g`` (class indices
    ``y`` or probabilities ``q``, the other None)."""
    raise NotImplementedError  # only called from compiled code


@_jit(inline=True)
def _hvp_finish(gr, vr, m, s, sev, alpha, beta):
    """g <- p (alpha v - (alpha - beta) p.v), ``gr`` holding exp(x - m)."""
    pv = sev / s
    k1 = _cast_like(alpha / s, gr)
    k2 = _cast_like((alpha - beta) * pv / s, gr)
    for c in range(gr.shape[0]):
        gr[c] = hessian_vector_element(gr[c], vr[c], k1, k2)


def _hvp_hard_row(x, y, q, v, opts, wsum, scale, g, inner, r):
    gr = _row(g, r, inner)
    t = y[r]
    if t == opts.ignore_index:
        _zero(gr)
        return
    xr = _row(x, r, inner)
    vr = _row(v, r, inner)
    m = row_max(xr, None)
    s, sev = exp_dot_into(xr, m, vr, gr)
    lse = np.float64(m) + np.log(s)
    alpha, beta = hard_target_curvature(_class_weight(opts.weight, t), wsum, lse, opts, scale,
                                        xr.shape[0])
    _hvp_finish(gr, vr, m, s, sev, alpha, beta)


def _hvp_soft_row(x, y, q, v, opts, wsum, scale, g, inner, r):
    gr = _row(g, r, inner)
    xr = _row(x, r, inner)
    vr = _row(v, r, inner)
    C = xr.shape[0]
    m = row_max(xr, None)
    # the targets' total mass, before ``g`` (which may hold the logits) is written
    total, _ = soft_sums(xr, _row(q, r, inner), opts.weight, _cast_like(1.0 - opts.smoothing, xr),
                         _cast_like(opts.smoothing / C, xr), m, None)
    s, sev = exp_dot_into(xr, m, vr, gr)
    lse = np.float64(m) + np.log(s)
    alpha, beta = soft_target_curvature(total, lse, opts, scale)
    _hvp_finish(gr, vr, m, s, sev, alpha, beta)


overload(_hvp_row, jit_options=_JIT_OPTIONS)(
    lambda x, y, q, v, opts, wsum, scale, g, inner, r:
    _by_targets(y, _hvp_hard_row, _hvp_soft_row))


# --------------------------------------------------------------------------
# Kernels (parallel and serial, see ``_cpu_kernels._Kernel``)


def _softmax_backward(go, o, g, inplace, n_rows, inner, log):
    if log:
        for r in prange(n_rows):
            _log_softmax_backward_row(go, o, g, inplace, inner, r)
    else:
        for r in prange(n_rows):
            _softmax_backward_row(go, o, g, inplace, inner, r)


def _softmax_jacobian(x, out, inner):
    for r in prange(out.shape[0]):
        _jacobian_row(x, out, inner, r)


def _cross_entropy_hvp(x, y, q, v, opts, g, n_rows, inner):
    """Hessian of the cross-entropy (with respect to the logits) times ``v``,
    into ``g``. Returns the first bad target or -1 (checked before writing)."""
    C = x.shape[1]
    w = opts.weight
    if y is None:
        bad, denominator = -1, float(n_rows)
    else:
        bad, denominator = scan_hard_targets(y, C, opts.ignore_index, w)
    if bad >= 0:
        return bad
    scale = mean_scale(opts.mean, denominator)
    wsum = _weight_sum(w, C)
    for r in prange(n_rows):
        _hvp_row(x, y, q, v, opts, wsum, scale, g, inner, r)
    return -1


softmax_backward = _Kernel(_softmax_backward)
softmax_jacobian = _Kernel(_softmax_jacobian)
cross_entropy_hvp = _Kernel(_cross_entropy_hvp)
