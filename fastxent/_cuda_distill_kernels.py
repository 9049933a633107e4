"""CUDA kernels of the distillation losses (``fastxent.distillation``).

Imported only by ``_cuda``. Layout, work split and reductions are those of
``_cuda_kernels`` (a group of threads per row, grid-stride over rows); the
formulas are ``_formulas``' (shared with ``_distill_kernels`` on the CPU).
Row arithmetic runs in float64 (the sums and the divergence), as on the CPU.

Passes per row: (1) online max and sum of exp of the student at T and at
T = 1 and of the teacher at T (the ``cached`` variant keeps both rows in
dynamic shared memory: two global loads per element, the only ones);
(2) the divergence (and KL(Q || M) for the JSD), summed over the group;
(3) the gradient, one global store per element. A top-k teacher is its k
(index, value) pairs, sorted by class on the host (N x k values): each
class finds its teacher logit by a binary search of the row's k classes.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import cuda

from . import _formulas as F
from ._cuda_kernels import (_F64_SHARED, NEG_INF, SCRATCH, _finish_sum, _group_max_sum,
                            _group_sum, _io, _online, _row_slot, _row_start, _shared_type,
                            _float_type)

_device = cuda.jit(device=True, inline=True)
forward_kl_element = _device(F.forward_kl_element)
forward_kl_grad = _device(F.forward_kl_grad)
reverse_kl_element = _device(F.reverse_kl_element)
reverse_kl_grad = _device(F.reverse_kl_grad)
jsd_element = _device(F.jsd_element)
jsd_grad = _device(F.jsd_grad)
distill_ce_grad = _device(F.distill_ce_grad)

FORWARD_KL, REVERSE_KL = 0, 1


@_device
def _share(kind, p, log_p, q, log_q, beta):
    if kind == FORWARD_KL:
        return forward_kl_element(p, log_p, log_q), 0.0
    if kind == REVERSE_KL:
        return reverse_kl_element(q, log_q, log_p), 0.0
    share, q_share, log_m = jsd_element(p, q, log_p, log_q, beta)
    return share, q_share


@_device
def _grad(kind, p, log_p, q, log_q, divergence, kl_qm, beta, kt):
    if kind == FORWARD_KL:
        return forward_kl_grad(p, q, kt)
    if kind == REVERSE_KL:
        return reverse_kl_grad(q, log_q, log_p, divergence, kt)
    share, q_share, log_m = jsd_element(p, q, log_p, log_q, beta)
    return jsd_grad(q, log_q, log_m, kl_qm, beta, kt)


@_device
def _class_grad(kind, p, log_p, xv, inv_t, lse_q, lse_1, divergence, kl_qm, beta, kt, ka,
                with_ce, hit):
    log_q = xv * inv_t - lse_q
    g = _grad(kind, p, log_p, math.exp(log_q), log_q, divergence, kl_qm, beta, kt)
    if with_ce:
        g += distill_ce_grad(math.exp(xv - lse_1), 1.0, hit, ka)
    return g


@_device
def _topk_position(idx, t_start, k, inner, c):
    """The position of class ``c`` among a row's k sorted classes, or -1."""
    lo, hi = 0, k
    while lo < hi:
        mid = (lo + hi) // 2
        if idx[t_start + mid * inner] < c:
            lo = mid + 1
        else:
            hi = mid
    if lo < k and idx[t_start + lo * inner] == c:
        return lo
    return -1


@lru_cache(maxsize=None)
def distill_py(dtype, cached, topk, x_storage=None, t_storage=None, g_storage=None):
    """Row losses into ``losses`` (0 for ignored rows) and, when ``write``,
    the gradient into ``g`` (which may be ``x``). Dense teacher ``t`` of
    ``x``'s layout, or (``topk``) values ``t`` and indices ``idx`` of k per
    row, sorted by class. ``y`` of no elements: no targets. Dynamic shared memory (cached):
    2C values (C for top-k). ``*_storage``: the dtype names ``x``, ``t`` and
    ``g`` hold (``_cuda_kernels._io``; default ``dtype``), 16-bit ones read
    and written directly, computed in float32."""
    FT = _float_type(dtype)
    ST = _shared_type(FT)
    name = np.dtype(dtype).name
    load_x = _io(x_storage or name, FT)[0]
    load_t = _io(t_storage or name, FT)[0]
    store_g = _io(g_storage or name, FT)[1]

    @_device
    def log_p_topk(t, idx, t_start, k, inner, c, inv_t, lse_p):
        """log P of class ``c`` of a top-k teacher (-inf outside its classes)."""
        i = _topk_position(idx, t_start, k, inner, c)
        if i < 0:
            return NEG_INF
        return float(load_t(t, t_start + i * inner)) * inv_t - lse_p

    def distill(x, t, idx, g, y, losses, n_rows, n_classes, k, inner, group, kind, beta,
                temperature, alpha, ignore_index, scale, write):
        scratch = cuda.shared.array(SCRATCH, _F64_SHARED)
        cache = cuda.shared.array(0, ST)
        inv_t = 1.0 / temperature
        kt = scale * (1.0 - alpha) * temperature
        ka = scale * alpha
        offset, lane, base, step = _row_slot(group)
        while base < n_rows:
            r = base + offset
            active = r < n_rows
            start = _row_start(r, n_classes, inner)
            t_start = _row_start(r, k, inner) if topk else start
            target = -1
            if active and y.shape[0] > 0:
                target = y[r]
                if target == ignore_index:
                    target = -2
            with_ce = target >= 0 and alpha > 0.0
            # (1) maxima and sums of exp
            mq, sq = NEG_INF, 0.0
            m1, s1 = NEG_INF, 0.0
            mp, sp = NEG_INF, 0.0
            if active:
                for c in range(lane, n_classes, group):
                    xv = load_x(x, start + c * inner)
                    if cached:
                        cache[c] = xv
                    mq, sq = _online(mq, sq, float(xv) * inv_t, 1.0)
                    m1, s1 = _online(m1, s1, float(xv), 1.0)
                    if not topk:
                        tv = load_t(t, start + c * inner)
                        if cached:
                            cache[n_classes + c] = tv
                        mp, sp = _online(mp, sp, float(tv) * inv_t, 1.0)
                if topk:
                    for i in range(lane, k, group):
                        mp, sp = _online(mp, sp, float(load_t(t, t_start + i * inner)) * inv_t,
                                         1.0)
            mq, sq = _group_max_sum(mq, sq, group, scratch)
            m1, s1 = _group_max_sum(m1, s1, group, scratch)
            mp, sp = _group_max_sum(mp, sp, group, scratch)
            lse_q = mq + math.log(_finish_sum(mq, sq))
            lse_1 = m1 + math.log(_finish_sum(m1, s1))
            lse_p = mp + math.log(_finish_sum(mp, sp))
            # (2) the divergence
            div, kl_qm = 0.0, 0.0
            x_target = 0.0
            if active:
                if with_ce:
                    x_target = float(load_x(x, start + target * inner))
                for c in range(lane, n_classes, group):
                    xv = float(cache[c]) if cached else float(load_x(x, start + c * inner))
                    log_q = xv * inv_t - lse_q
                    if topk:
                        log_p = log_p_topk(t, idx, t_start, k, inner, c, inv_t, lse_p)
                    else:
                        tv = cache[n_classes + c] if cached else load_t(t, start + c * inner)
                        log_p = float(tv) * inv_t - lse_p
                    share, q_share = _share(kind, math.exp(log_p), log_p, math.exp(log_q), log_q,
                                            beta)
                    div += share
                    kl_qm += q_share
            div = _group_sum(div, group, scratch)
            kl_qm = _group_sum(kl_qm, group, scratch)
            if active and lane == 0:
                loss = 0.0
                if target != -2:
                    loss = (1.0 - alpha) * temperature * temperature * div
                    if with_ce:
                        loss += alpha * (lse_1 - x_target)
                losses[r] = loss
            # (3) the gradient
            if write:
                if active:
                    for c in range(lane, n_classes, group):
                        i = start + c * inner
                        if target == -2:
                            store_g(g, i, 0.0)
                            continue
                        xv = float(cache[c]) if cached else float(load_x(x, i))
                        if topk:
                            log_p = log_p_topk(t, idx, t_start, k, inner, c, inv_t, lse_p)
                        else:
                            tv = cache[n_classes + c] if cached else load_t(t, i)
                            log_p = float(tv) * inv_t - lse_p
                        store_g(g, i, _class_grad(kind, math.exp(log_p), log_p, xv, inv_t,
                                                  lse_q, lse_1, div, kl_qm, beta, kt, ka,
                                                  with_ce, 1.0 if c == target else 0.0))
            if cached:
                cuda.syncthreads()  # the next rows' cache after this row's reads
            base += step

    return distill


@lru_cache(maxsize=None)
def distill(dtype, cached, topk, x_storage=None, t_storage=None, g_storage=None):
    return cuda.jit(distill_py(np.dtype(dtype).name, cached, topk, x_storage, t_storage,
                               g_storage))
