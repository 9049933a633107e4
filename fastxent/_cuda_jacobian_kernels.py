"""CUDA kernels of the softmax Jacobian family: backward of softmax and
log_softmax, the full Jacobian, the cross-entropy Hessian-vector product.

Imported only by ``_cuda``. Layout, work split, reductions and the
``cached`` variants (a whole block on one row kept in dynamic shared
memory) are those of ``_cuda_kernels`` (see its docstring), whose helpers
these kernels use; the formulas are ``_formulas``' (shared with
``_jacobian_kernels`` on the CPU).

Memory traffic per element, cached: ``softmax_backward`` reads
``grad_output`` and ``output`` once (both kept in shared memory) and writes
once; ``log_softmax_backward`` keeps ``grad_output`` and reads ``output``
in its second pass; ``cross_entropy_hvp`` keeps the logits and the vector
(class indices; probabilities are read once more, in the first pass).

float16 and bfloat16 arrays (the ``*_storage`` dtype names of the kernels'
builders) are read and written as their 16 bits and computed in float32
(``_cuda_kernels._io``): the shared-memory copies hold float32 values, and
16-bit results are rounded to nearest even as they are stored. Soft targets
and class weights reach the kernels as float32.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import cuda

from . import _formulas as F
from ._cuda_kernels import (NEG_INF, SCRATCH, _cap_factors, _finish_sum, _float_type,
                            _group_max_sum, _group_sum, _hard_gradient, _hard_row, _hard_sums,
                            _io, _online, _online_row_pass, _row_slot, _row_start, _row_target,
                            _shared_type, _storage, _target_mass, _transformed,
                            gradient_element, soft_target_row, softcap_slope, softmax_element)
from ._spec import CEOptions

_device = cuda.jit(device=True, inline=True)
softmax_backward_element = _device(F.softmax_backward_element)
log_softmax_backward_element = _device(F.log_softmax_backward_element)
softmax_jacobian_element = _device(F.softmax_jacobian_element)
hard_target_curvature = _device(F.hard_target_curvature)
soft_target_curvature = _device(F.soft_target_curvature)
hessian_vector_element = _device(F.hessian_vector_element)
softcap_second_slope = _device(F.softcap_second_slope)
transformed_hvp_element = _device(F.transformed_hvp_element)


def _loader(storage, dtype):
    """``load(a, i)`` of an array of dtype name ``storage`` (None: ``dtype``)."""
    return _io(storage or np.dtype(dtype).name, _float_type(dtype))[0]


def _storer(storage, dtype):
    """``store(a, i, v)`` into an array of dtype name ``storage`` (None: ``dtype``)."""
    return _io(storage or np.dtype(dtype).name, _float_type(dtype))[1]


@lru_cache(maxsize=None)
def softmax_backward_py(dtype, cached, log, go_storage=None, o_storage=None, g_storage=None):
    """``g`` <- the gradient through softmax (``log``: log_softmax) of the
    rows of ``go`` (the gradient of the output) and ``o`` (the output);
    ``g`` may be ``go``. ``*_storage``: the arrays' dtype names where they
    differ from ``dtype`` (16-bit, computed in float32). Dynamic shared
    memory (cached): 2C values (C for ``log``)."""
    FT = _float_type(dtype)
    ST = _shared_type(FT)
    load_go, load_o = _loader(go_storage, dtype), _loader(o_storage, dtype)
    store_g = _storer(g_storage, dtype)

    def softmax_backward(go, o, g, n_rows, n_classes, inner, group):
        scratch = cuda.shared.array(SCRATCH, ST)
        cache = cuda.shared.array(0, ST)
        offset, lane, base, step = _row_slot(group)
        while base < n_rows:
            r = base + offset
            active = r < n_rows
            start = _row_start(r, n_classes, inner)
            acc = FT(0.0)  # sum(go) (log), sum(go o)
            if active:
                for c in range(lane, n_classes, group):
                    i = start + c * inner
                    gv = load_go(go, i)
                    if cached:
                        cache[c] = gv
                    if log:
                        acc += gv
                    else:
                        ov = load_o(o, i)
                        if cached:
                            cache[n_classes + c] = ov
                        acc += gv * ov
            acc = _group_sum(acc, group, scratch)
            if active:
                for c in range(lane, n_classes, group):
                    i = start + c * inner
                    if cached:
                        gv = cache[c]
                    else:
                        gv = load_go(go, i)
                    if log:
                        store_g(g, i, log_softmax_backward_element(gv, math.exp(load_o(o, i)),
                                                                   acc))
                    else:
                        if cached:
                            ov = cache[n_classes + c]
                        else:
                            ov = load_o(o, i)
                        store_g(g, i, softmax_backward_element(ov, gv, acc))
            base += step

    return softmax_backward


@lru_cache(maxsize=None)
def softmax_jacobian_py(dtype, x_storage=None, out_storage=None):
    """``out[r*C*C + i*C + j]`` <- p_i (delta_ij - p_j), p the softmax of row r.
    Storage as in ``softmax_backward_py``."""
    FT = _float_type(dtype)
    ST = _shared_type(FT)
    first_pass = _online_row_pass(dtype, False, x_storage)
    load_x, store_out = _loader(x_storage, dtype), _storer(out_storage, dtype)

    def softmax_jacobian(x, out, n_rows, n_classes, inner, group):
        scratch = cuda.shared.array(SCRATCH, ST)
        one, zero = FT(1.0), FT(0.0)
        offset, lane, base, step = _row_slot(group)
        while base < n_rows:
            r = base + offset
            active = r < n_rows
            start = _row_start(r, n_classes, inner)
            m, s = first_pass(x, start, active, lane, group, n_classes, inner, scratch, scratch)
            s = _finish_sum(m, s)
            if active:
                inv_s = FT(1.0 / np.float64(s))
                first = r * n_classes * n_classes
                for k in range(lane, n_classes * n_classes, group):
                    i = k // n_classes
                    j = k - i * n_classes
                    p_i = softmax_element(math.exp(load_x(x, start + i * inner) - m), inv_s)
                    p_j = softmax_element(math.exp(load_x(x, start + j * inner) - m), inv_s)
                    store_out(out, first + k,
                              softmax_jacobian_element(p_i, p_j, one if i == j else zero))
            base += step

    return softmax_jacobian


@lru_cache(maxsize=None)
def cross_entropy_hvp_py(dtype, cached, x_storage=None, v_storage=None, g_storage=None):
    """``g`` <- the Hessian of the cross-entropy (w.r.t. the logits ``x``)
    times ``v``, row by row: class indices ``y`` (int64) or probabilities
    ``q`` (the other None); ``wsum``, ``scale`` and the ``CEOptions`` fields
    as in ``_cuda_kernels.ce_py``. Three passes: the online max and sum (and
    the targets' mass), sum exp(x - m) v, the product. Dynamic shared memory
    (cached): 2C values (the logits, then their exponentials; the vector).
    Storage of the logits, the vector and the product as in
    ``softmax_backward_py``."""
    FT = _float_type(dtype)
    ST = _shared_type(FT)
    load_x, load_v = _loader(x_storage, dtype), _loader(v_storage, dtype)
    store_g = _storer(g_storage, dtype)

    def hvp(x, y, q, v, g, n_rows, n_classes, inner, group, wsum, scale,
            w, ignore_index, smooth, mean, z_loss):
        scratch = cuda.shared.array(SCRATCH, ST)
        cache = cuda.shared.array(0, ST)
        opts = CEOptions(w, ignore_index, smooth, mean, z_loss)  # the record the formulas read
        zero = FT(0.0)
        one = FT(1.0)
        keep_q = FT(1.0 - smooth)
        uniform_q = FT(smooth / n_classes)
        offset, lane, base, step = _row_slot(group)
        while base < n_rows:
            r = base + offset
            active = r < n_rows
            t, take = _row_target(y, r, active, ignore_index)
            start = _row_start(r, n_classes, inner)
            m = FT(NEG_INF)
            s = zero
            total = zero  # soft: the targets' weighted mass
            if take:
                for c in range(lane, n_classes, group):
                    i = start + c * inner
                    xv = load_x(x, i)
                    if cached:
                        cache[c] = xv
                        cache[n_classes + c] = load_v(v, i)
                    m, s = _online(m, s, xv, one)
                    if q is not None:
                        total += _target_mass(q, i, w, c, keep_q, uniform_q)
            m, s = _group_max_sum(m, s, group, scratch)
            if q is not None:
                total = _group_sum(total, group, scratch)
            s = _finish_sum(m, s)
            dot = zero  # sum exp(x - m) v
            if take:
                for c in range(lane, n_classes, group):
                    if cached:
                        e = math.exp(cache[c] - m)
                        cache[c] = e
                        dot += e * cache[n_classes + c]
                    else:
                        i = start + c * inner
                        dot += math.exp(load_x(x, i) - m) * load_v(v, i)
            dot = _group_sum(dot, group, scratch)
            m64, s64 = np.float64(m), np.float64(s)
            lse = m64 + math.log(s64)
            if q is not None:
                alpha, beta = soft_target_curvature(np.float64(total), lse, opts, scale)
            else:
                wt = 1.0
                if w is not None:
                    if take:
                        wt = np.float64(w[t])
                alpha, beta = hard_target_curvature(wt, wsum, lse, opts, scale, n_classes)
            k1 = FT(alpha / s64)
            k2 = FT((alpha - beta) * (np.float64(dot) / s64) / s64)
            if take:
                for c in range(lane, n_classes, group):
                    i = start + c * inner
                    if cached:
                        e = cache[c]
                        vv = cache[n_classes + c]
                    else:
                        e = math.exp(load_x(x, i) - m)
                        vv = load_v(v, i)
                    store_g(g, i, hessian_vector_element(e, vv, k1, k2))
            elif active:
                for c in range(lane, n_classes, group):
                    store_g(g, start + c * inner, zero)
            base += step

    return hvp


@lru_cache(maxsize=None)
def cross_entropy_hvp_transformed_py(dtype, cached, x_storage=None, v_storage=None,
                                     g_storage=None):
    """``cross_entropy_hvp_py`` when the options transform the logits,
    u = f(x) (``logit_scale``, ``softcap``; two more parameters): per element
    f' (H_u (f' v)) + r f'' v, r = d loss / d u (``transformed_hvp_element``).
    Pass 1: u as each logit is loaded, the online max and sum, the target's
    u (class indices) or the targets' mass and sum q' u (probabilities), and
    sum w u for label smoothing; pass 2: sum exp(u - m) f' v; pass 3: the
    product, e recomputed from u. A kernel of its own, so that the plain
    one's loads stay as they were. Dynamic shared memory (cached): 2C values
    (u; the vector). Storage as in ``cross_entropy_hvp_py``."""
    FT = _float_type(dtype)
    ST = _shared_type(FT)
    load_x, load_v = _loader(x_storage, dtype), _loader(v_storage, dtype)
    store_g = _storer(g_storage, dtype)

    def hvp(x, y, q, v, g, n_rows, n_classes, inner, group, wsum, scale,
            w, ignore_index, smooth, mean, z_loss, logit_scale, softcap):
        scratch = cuda.shared.array(SCRATCH, ST)
        cache = cuda.shared.array(0, ST)
        opts = CEOptions(w, ignore_index, smooth, mean, z_loss, logit_scale, softcap)
        zero = FT(0.0)
        one = FT(1.0)
        keep_q = FT(1.0 - smooth)
        uniform_q = FT(smooth / n_classes)
        scale_f = FT(scale)
        k = FT(logit_scale)
        cap = FT(softcap)
        cap_arg, inv_cap = _cap_factors(logit_scale, softcap)
        cap_arg, inv_cap = FT(cap_arg), FT(inv_cap)
        offset, lane, base, step = _row_slot(group)
        while base < n_rows:
            r = base + offset
            active = r < n_rows
            t, take = _row_target(y, r, active, ignore_index)
            start = _row_start(r, n_classes, inner)
            m = FT(NEG_INF)
            s = zero
            a1 = zero  # soft: sum of q'; hard: u[t]
            a2 = zero  # soft: sum of q' u; hard (smoothing): sum of w u
            if take:
                for c in range(lane, n_classes, group):
                    i = start + c * inner
                    u = _transformed(load_x(x, i), k, cap, cap_arg)
                    if cached:
                        cache[c] = u
                        cache[n_classes + c] = load_v(v, i)
                    m, s = _online(m, s, u, one)
                    if q is not None:
                        qc = _target_mass(q, i, w, c, keep_q, uniform_q)
                        a1 += qc
                        a2 += qc * u
                    else:
                        a1, a2 = _hard_sums(a1, a2, u, c, t, w, smooth)
            m, s = _group_max_sum(m, s, group, scratch)
            a1 = _group_sum(a1, group, scratch)
            a2 = _group_sum(a2, group, scratch)
            s = _finish_sum(m, s)
            dot = zero  # sum exp(u - m) f' v
            if take:
                for c in range(lane, n_classes, group):
                    if cached:
                        u = cache[c]
                        vv = cache[n_classes + c]
                    else:
                        i = start + c * inner
                        u = _transformed(load_x(x, i), k, cap, cap_arg)
                        vv = load_v(v, i)
                    dot += math.exp(u - m) * softcap_slope(u, k, inv_cap) * vv
            dot = _group_sum(dot, group, scratch)
            m64, s64 = np.float64(m), np.float64(s)
            log_s = math.log(s64)
            lse = m64 + log_s
            if q is not None:
                _, k1 = soft_target_row(m64, log_s, s64, np.float64(a1),
                                        np.float64(a2) - np.float64(a1) * m64, opts, scale)
                k2 = kt = 0.0
                alpha, beta = soft_target_curvature(np.float64(a1), lse, opts, scale)
            else:
                _, k1, k2, kt, wt = _hard_row(m64, log_s, s64, a1, a2, t, take, w, wsum,
                                              smooth, opts, scale, n_classes)
                alpha, beta = hard_target_curvature(wt, wsum, lse, opts, scale, n_classes)
            ka = FT(alpha / s64)
            kb = FT((alpha - beta) * (np.float64(dot) / s64) / s64)
            k1_f, k2_f, kt_f = FT(k1), FT(k2), FT(kt)
            if take:
                for c in range(lane, n_classes, group):
                    i = start + c * inner
                    if cached:
                        u = cache[c]
                        vv = cache[n_classes + c]
                    else:
                        u = _transformed(load_x(x, i), k, cap, cap_arg)
                        vv = load_v(v, i)
                    e = math.exp(u - m)
                    slope = softcap_slope(u, k, inv_cap)
                    if q is not None:
                        grad_u = gradient_element(
                            e, k1_f, scale_f * _target_mass(q, i, w, c, keep_q, uniform_q))
                    else:
                        grad_u = _hard_gradient(e, k1_f, k2_f, kt_f, w, c, t)
                    store_g(g, i, transformed_hvp_element(
                        hessian_vector_element(e, slope * vv, ka, kb), slope, grad_u,
                        softcap_second_slope(u, slope, k, inv_cap), vv))
            elif active:
                for c in range(lane, n_classes, group):
                    store_g(g, start + c * inner, zero)
            base += step

    return hvp


# Compiled (lazily, per argument types) kernels. Storage names equal to the
# compute dtype are None (``_cuda_kernels._storage``): one cache key each.

@lru_cache(maxsize=None)
def softmax_backward(dtype, cached, log, go_storage=None, o_storage=None, g_storage=None):
    return cuda.jit(softmax_backward_py(np.dtype(dtype).name, cached, log,
                                        *(_storage(n, dtype)
                                          for n in (go_storage, o_storage, g_storage))))


@lru_cache(maxsize=None)
def softmax_jacobian(dtype, x_storage=None, out_storage=None):
    return cuda.jit(softmax_jacobian_py(np.dtype(dtype).name, _storage(x_storage, dtype),
                                        _storage(out_storage, dtype)))


@lru_cache(maxsize=None)
def cross_entropy_hvp(dtype, cached, x_storage=None, v_storage=None, g_storage=None):
    return cuda.jit(cross_entropy_hvp_py(np.dtype(dtype).name, cached,
                                         *(_storage(n, dtype)
                                           for n in (x_storage, v_storage, g_storage))))


@lru_cache(maxsize=None)
def cross_entropy_hvp_transformed(dtype, cached, x_storage=None, v_storage=None,
                                  g_storage=None):
    return cuda.jit(cross_entropy_hvp_transformed_py(
        np.dtype(dtype).name, cached, *(_storage(n, dtype)
                                        for n in (x_storage, v_storage, g_storage))))
