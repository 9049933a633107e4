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
from ._cpu_kernels import (_JIT_OPTIONS, _Kernel, _at, _by_targets, _cast_like, _class_weight,
                           _jit, _row, _tile, _tile_count, _transform, _weight_sum, _zero,
                           hard_target_row, smoothed_target, soft_target_row, softcap_slope)
from ._host import scan_hard_targets
from ._lanes import (exp_dot_into, exp_sum_inplace, lane_dot, minus_exp_times, row_max,
                     soft_sums, sum_ahead)

softmax_backward_element = _jit(F.softmax_backward_element, inline=True)
softmax_jacobian_element = _jit(F.softmax_jacobian_element, inline=True)
hard_target_curvature = _jit(F.hard_target_curvature, inline=True)
soft_target_curvature = _jit(F.soft_target_curvature, inline=True)
hessian_vector_element = _jit(F.hessian_vector_element, inline=True)
softcap_second_slope = _jit(F.softcap_second_slope, inline=True)
transformed_hvp_element = _jit(F.transformed_hvp_element, inline=True)
mean_scale = _jit(F.mean_scale, inline=True)


# --------------------------------------------------------------------------
# Row routines, on 1-D views of one row. The in-place variants read and
# write one array (``go``): two arguments that are the same buffer would
# fail LLVM's overlap check and run element by element.


@_jit
def _backward_views(gor, orow, gr, inplace, log):
    """gr <- the gradient through softmax (``log``: log_softmax) of one row:
    o (go - sum(go o)), or go - exp(o) sum(go). ``inplace``: into ``gor``."""
    if log:
        # the output's row is prefetched meanwhile: the map below then reads
        # both rows from cache
        total = _cast_like(sum_ahead(gor, orow), gor)
        # log_softmax_backward_element over the row, emitted as vector code
        if inplace:
            minus_exp_times(gor, orow, total, gor)
        else:
            minus_exp_times(gor, orow, total, gr)
    else:
        dot = _cast_like(lane_dot(gor, orow, 0.0), gor)
        if inplace:
            for c in range(gor.shape[0]):
                gor[c] = softmax_backward_element(orow[c], gor[c], dot)
        else:
            for c in range(gor.shape[0]):
                gr[c] = softmax_backward_element(orow[c], gor[c], dot)


@_jit
def _backward_row(go, o, g, inplace, inner, log, r):
    """Row ``r`` of the canonical arrays (``g`` is ``go`` when ``inplace``)."""
    _backward_views(_row(go, r, inner), _row(o, r, inner), _row(g, r, inner), inplace, log)


# Rows whose classes are strided (the (A, C, B) form, a class axis that is
# not the last in memory) are worked on a tile at a time (``_cpu_kernels._tile``,
# up to 16 rows at once): gathered into contiguous rows, computed there, the
# results scattered back. A tile's rows are neighbours in memory, so the
# gather reads whole cache lines, where a strided row alone reads one
# element of each.


@_jit
def _gather(rows, buf):
    """buf[i, c] <- rows[i, c], the rows' index innermost (adjacent in memory)."""
    n, C = rows.shape
    for c in range(C):
        for i in range(n):
            buf[i, c] = rows[i, c]


@_jit
def _scatter(buf, rows):
    n, C = rows.shape
    for c in range(C):
        for i in range(n):
            rows[i, c] = buf[i, c]


@_jit
def _backward_tile(go, o, g, inner, log, k):
    rows, r0, step = _tile(go, k, inner)
    n, C = rows.shape
    bg = np.empty((n, C), go.dtype)
    bo = np.empty((n, C), go.dtype)
    _gather(rows, bg)
    _gather(_tile(o, k, inner)[0], bo)
    for i in range(n):
        _backward_views(bg[i], bo[i], bg[i], True, log)
    _scatter(bg, _tile(g, k, inner)[0])


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


@_jit(inline=True)
def _hvp_finish(gr, vr, m, s, sev, alpha, beta):
    """g <- p (alpha v - (alpha - beta) p.v), ``gr`` holding exp(x - m)."""
    pv = sev / s
    k1 = _cast_like(alpha / s, gr)
    k2 = _cast_like((alpha - beta) * pv / s, gr)
    for c in range(gr.shape[0]):
        gr[c] = hessian_vector_element(gr[c], vr[c], k1, k2)


@_jit
def _hvp_transformed(xr, qr, vr, gr, t, opts, wsum, scale):
    """One row of the product when the options transform the logits,
    u = f(x) (``logit_scale``, ``softcap``): H_x v = f' (H_u (f' v)) + r f'' v
    with r = d loss / d u (``hard_target_row``'s or ``soft_target_row``'s
    gradient). Against class ``t``, or probabilities ``qr`` (not None).
    Two scratch rows: u, and f' v; ``gr`` (which may be ``xr``) takes
    exp(u - m) until the last sweep writes the product."""
    C = xr.shape[0]
    logit_scale, cap = opts.logit_scale, opts.softcap
    k = _cast_like(logit_scale, xr)
    inv = _cast_like(1.0 / cap if cap != 0.0 else 0.0, xr)
    u = np.empty(C, xr.dtype)
    fv = np.empty(C, xr.dtype)
    _transform(xr, u, u[:0], logit_scale, cap, False)
    for c in range(C):
        fv[c] = softcap_slope(u[c], k, inv) * vr[c]
    m = row_max(u, None)
    w, smooth = opts.weight, opts.smoothing
    keep = _cast_like(1.0 - smooth, xr)
    uniform = _cast_like(smooth / C, xr)
    if qr is None:
        dot = lane_dot(u, w, m) if smooth > 0.0 else 0.0
        ut = u[t]
    else:
        total, qum = soft_sums(u, qr, w, keep, uniform, m, None)
    s, sev = exp_dot_into(u, m, fv, gr)
    log_s = np.log(s)
    lse = np.float64(m) + log_s
    if qr is None:
        wt = _class_weight(w, t)
        _, k1, k2, kt = hard_target_row(np.float64(m), log_s, s, np.float64(ut), wt, wsum, dot,
                                        opts, scale, C)
        alpha, beta = hard_target_curvature(wt, wsum, lse, opts, scale, C)
        keep_s, uniform_s = 0.0, k2
    else:
        _, k1 = soft_target_row(np.float64(m), log_s, s, total, qum, opts, scale)
        kt = 0.0
        alpha, beta = soft_target_curvature(total, lse, opts, scale)
        keep_s, uniform_s = scale * (1.0 - smooth), scale * smooth / C
    ka = _cast_like(alpha / s, xr)
    kb = _cast_like((alpha - beta) * (sev / s) / s, xr)
    k1, kt = _cast_like(k1, xr), _cast_like(kt, xr)
    keep_s, uniform_s = _cast_like(keep_s, xr), _cast_like(uniform_s, xr)
    one = _cast_like(1.0, xr)
    for c in range(C):
        e, uc = gr[c], u[c]
        slope = softcap_slope(uc, k, inv)
        # d loss / d u_c: the gradient's element before the chain rule
        if qr is None:
            r = k1 * e - uniform_s * _at(w, c, one)
            if c == t:
                r -= kt
        else:
            r = k1 * e - smoothed_target(qr[c], keep_s, uniform_s) * _at(w, c, one)
        gr[c] = transformed_hvp_element(hessian_vector_element(e, fv[c], ka, kb), slope, r,
                                        softcap_second_slope(uc, slope, k, inv), vr[c])


@_jit
def _hvp_hard_views(xr, vr, gr, t, opts, wsum, scale):
    """One row of the product against class ``t`` (``gr`` may be ``xr``)."""
    if t == opts.ignore_index:
        _zero(gr)
        return
    if opts.logit_scale != 1.0 or opts.softcap != 0.0:
        _hvp_transformed(xr, None, vr, gr, t, opts, wsum, scale)
        return
    m = row_max(xr, None)
    s, sev = exp_dot_into(xr, m, vr, gr)
    lse = np.float64(m) + np.log(s)
    alpha, beta = hard_target_curvature(_class_weight(opts.weight, t), wsum, lse, opts, scale,
                                        xr.shape[0])
    _hvp_finish(gr, vr, m, s, sev, alpha, beta)


@_jit
def _hvp_soft_views(xr, qr, vr, gr, opts, scale):
    """One row of the product against probabilities ``qr`` (``gr`` may be ``xr``)."""
    if opts.logit_scale != 1.0 or opts.softcap != 0.0:
        _hvp_transformed(xr, qr, vr, gr, 0, opts, 0.0, scale)
        return
    C = xr.shape[0]
    m = row_max(xr, None)
    # the targets' total mass, before ``gr`` (which may hold the logits) is written
    total, _ = soft_sums(xr, qr, opts.weight, _cast_like(1.0 - opts.smoothing, xr),
                         _cast_like(opts.smoothing / C, xr), m, None)
    s, sev = exp_dot_into(xr, m, vr, gr)
    lse = np.float64(m) + np.log(s)
    alpha, beta = soft_target_curvature(total, lse, opts, scale)
    _hvp_finish(gr, vr, m, s, sev, alpha, beta)


def _hvp_row(x, y, q, v, opts, wsum, scale, g, inner, r):
    """Row ``r`` of the Hessian-vector product into ``g`` (class indices
    ``y`` or probabilities ``q``, the other None)."""
    raise NotImplementedError  # only called from compiled code


def _hvp_hard_row(x, y, q, v, opts, wsum, scale, g, inner, r):
    _hvp_hard_views(_row(x, r, inner), _row(v, r, inner), _row(g, r, inner), y[r], opts, wsum,
                    scale)


def _hvp_soft_row(x, y, q, v, opts, wsum, scale, g, inner, r):
    _hvp_soft_views(_row(x, r, inner), _row(q, r, inner), _row(v, r, inner), _row(g, r, inner),
                    opts, scale)


overload(_hvp_row, jit_options=_JIT_OPTIONS)(
    lambda x, y, q, v, opts, wsum, scale, g, inner, r:
    _by_targets(y, _hvp_hard_row, _hvp_soft_row))


def _hvp_tile(x, y, q, v, opts, wsum, scale, g, inner, k):
    """Tile ``k`` of the product (see ``_backward_tile``)."""
    raise NotImplementedError  # only called from compiled code


def _hvp_hard_tile(x, y, q, v, opts, wsum, scale, g, inner, k):
    rows, r0, step = _tile(x, k, inner)
    n, C = rows.shape
    bx = np.empty((n, C), x.dtype)
    bv = np.empty((n, C), x.dtype)
    _gather(rows, bx)
    _gather(_tile(v, k, inner)[0], bv)
    for i in range(n):
        _hvp_hard_views(bx[i], bv[i], bx[i], y[r0 + i * step], opts, wsum, scale)
    _scatter(bx, _tile(g, k, inner)[0])


def _hvp_soft_tile(x, y, q, v, opts, wsum, scale, g, inner, k):
    rows, r0, step = _tile(x, k, inner)
    n, C = rows.shape
    bx = np.empty((n, C), x.dtype)
    bv = np.empty((n, C), x.dtype)
    bq = np.empty((n, C), x.dtype)
    _gather(rows, bx)
    _gather(_tile(v, k, inner)[0], bv)
    _gather(_tile(q, k, inner)[0], bq)
    for i in range(n):
        _hvp_soft_views(bx[i], bq[i], bv[i], bx[i], opts, scale)
    _scatter(bx, _tile(g, k, inner)[0])


overload(_hvp_tile, jit_options=_JIT_OPTIONS)(
    lambda x, y, q, v, opts, wsum, scale, g, inner, k:
    _by_targets(y, _hvp_hard_tile, _hvp_soft_tile))


# --------------------------------------------------------------------------
# Kernels (parallel and serial, see ``_cpu_kernels._Kernel``)


def _softmax_backward(go, o, g, inplace, n_rows, inner, log, tiled):
    """``tiled``: rows whose classes are strided, a tile at a time."""
    if tiled:
        for k in prange(_tile_count(go, inner)):
            _backward_tile(go, o, g, inner, log, k)
    else:
        for r in prange(n_rows):
            _backward_row(go, o, g, inplace, inner, log, r)


def _softmax_jacobian(x, out, inner):
    for r in prange(out.shape[0]):
        _jacobian_row(x, out, inner, r)


def _cross_entropy_hvp(x, y, q, v, opts, g, n_rows, inner, tiled):
    """Hessian of the cross-entropy (with respect to the logits) times ``v``,
    into ``g``; ``tiled`` as in ``_softmax_backward``. Returns the first bad
    target or -1 (checked before writing)."""
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
    if tiled:
        for k in prange(_tile_count(x, inner)):
            _hvp_tile(x, y, q, v, opts, wsum, scale, g, inner, k)
    else:
        for r in prange(n_rows):
            _hvp_row(x, y, q, v, opts, wsum, scale, g, inner, r)
    return -1


softmax_backward = _Kernel(_softmax_backward)
softmax_jacobian = _Kernel(_softmax_jacobian)
cross_entropy_hvp = _Kernel(_cross_entropy_hvp)
