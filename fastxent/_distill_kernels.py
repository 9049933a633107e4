"""CPU kernels of the distillation losses (``fastxent.distillation``).

One fused pass per row over the student's and the teacher's logits, on the
canonical row form of ``_cpu_kernels`` (2-D ``(rows, C)`` or 3-D
``(A, C, B)``, row ``r`` through ``_row``): the maxima, the two
log-sum-exps at temperature T (and the student's at T = 1 for the
cross-entropy share), the divergence, then the gradient written over the
student's row when in place. No temporary of the input's size; a top-k
teacher is read as its k (index, value) pairs, walked in class order. The
per-element formulas are those of ``_formulas`` (shared with
``_cuda_distill_kernels``). Sums run in class order, row losses in row
order: the same bits for any thread count.
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from . import _formulas as F
from ._cpu_kernels import _Kernel, _jit, _row

forward_kl_element = _jit(F.forward_kl_element, inline=True)
forward_kl_grad = _jit(F.forward_kl_grad, inline=True)
reverse_kl_element = _jit(F.reverse_kl_element, inline=True)
reverse_kl_grad = _jit(F.reverse_kl_grad, inline=True)
jsd_element = _jit(F.jsd_element, inline=True)
jsd_grad = _jit(F.jsd_grad, inline=True)
distill_ce_grad = _jit(F.distill_ce_grad, inline=True)

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2


@_jit(inline=True)
def _share(kind, p, log_p, q, log_q, beta):
    """(the class's share of the divergence, its share of KL(Q || M))."""
    if kind == FORWARD_KL:
        return forward_kl_element(p, log_p, log_q), 0.0
    if kind == REVERSE_KL:
        return reverse_kl_element(q, log_q, log_p), 0.0
    share, q_share, _ = jsd_element(p, q, log_p, log_q, beta)
    return share, q_share


@_jit(inline=True)
def _grad(kind, p, log_p, q, log_q, divergence, kl_qm, beta, kt):
    if kind == FORWARD_KL:
        return forward_kl_grad(p, q, kt)
    if kind == REVERSE_KL:
        return reverse_kl_grad(q, log_q, log_p, divergence, kt)
    _, _, log_m = jsd_element(p, q, log_p, log_q, beta)
    return jsd_grad(q, log_q, log_m, kl_qm, beta, kt)


@_jit(inline=True)
def _student_sums(xr, inv_t, with_ce):
    """(max s, log sum exp((s - max) / T), log sum exp(s - max) or 0)."""
    ms = -np.inf
    for c in range(xr.shape[0]):
        v = float(xr[c])
        if v > ms or v != v:
            ms = v
    ss = 0.0
    s1 = 0.0
    for c in range(xr.shape[0]):
        d = float(xr[c]) - ms
        ss += math.exp(d * inv_t)
        if with_ce:
            s1 += math.exp(d)
    return ms, math.log(ss), (math.log(s1) if with_ce else 0.0)


@_jit(inline=True)
def _teacher_sums(tr, inv_t):
    mt = -np.inf
    for c in range(tr.shape[0]):
        v = float(tr[c])
        if v > mt or v != v:
            mt = v
    st = 0.0
    for c in range(tr.shape[0]):
        st += math.exp((float(tr[c]) - mt) * inv_t)
    return mt, math.log(st)


@_jit
def _dense_row(xr, tr, gr, target, kind, beta, temperature, alpha, scale, write):
    """The row's loss; its gradient (scaled by ``scale``) into ``gr`` when
    ``write``. ``target`` < 0: no cross-entropy share."""
    inv_t = 1.0 / temperature
    with_ce = target >= 0 and alpha > 0.0
    ms, log_ss, log_s1 = _student_sums(xr, inv_t, with_ce)
    mt, log_st = _teacher_sums(tr, inv_t)
    divergence = 0.0
    kl_qm = 0.0
    C = xr.shape[0]
    for c in range(C):
        log_p = (float(tr[c]) - mt) * inv_t - log_st
        log_q = (float(xr[c]) - ms) * inv_t - log_ss
        share, q_share = _share(kind, math.exp(log_p), log_p, math.exp(log_q), log_q, beta)
        divergence += share
        kl_qm += q_share
    loss = (1.0 - alpha) * temperature * temperature * divergence
    ce = 0.0
    if with_ce:
        ce = (ms + log_s1) - float(xr[target])
        loss += alpha * ce
    if write:
        kt = scale * (1.0 - alpha) * temperature
        ka = scale * alpha
        for c in range(C):
            s = float(xr[c])
            log_p = (float(tr[c]) - mt) * inv_t - log_st
            log_q = (s - ms) * inv_t - log_ss
            g = _grad(kind, math.exp(log_p), log_p, math.exp(log_q), log_q, divergence, kl_qm,
                      beta, kt)
            if with_ce:
                g += distill_ce_grad(math.exp(s - ms - log_s1), 1.0, 1.0 if c == target else 0.0,
                                     ka)
            gr[c] = g
    return loss


@_jit
def _topk_row(xr, ir, vr, gr, target, kind, beta, temperature, alpha, scale, write):
    """As ``_dense_row``, the teacher given by its k (index, value) pairs,
    every other class -inf (P = 0 there)."""
    inv_t = 1.0 / temperature
    with_ce = target >= 0 and alpha > 0.0
    ms, log_ss, log_s1 = _student_sums(xr, inv_t, with_ce)
    mt, log_st = _teacher_sums(vr, inv_t)
    k = ir.shape[0]
    order = np.argsort(ir)  # the pairs in class order, walked beside the row
    divergence = 0.0
    kl_qm = 0.0
    C = xr.shape[0]
    j = 0
    for c in range(C):
        log_p = -np.inf
        p = 0.0
        if j < k and ir[order[j]] == c:
            log_p = (float(vr[order[j]]) - mt) * inv_t - log_st
            p = math.exp(log_p)
            j += 1
        log_q = (float(xr[c]) - ms) * inv_t - log_ss
        share, q_share = _share(kind, p, log_p, math.exp(log_q), log_q, beta)
        divergence += share
        kl_qm += q_share
    loss = (1.0 - alpha) * temperature * temperature * divergence
    if with_ce:
        loss += alpha * ((ms + log_s1) - float(xr[target]))
    if write:
        kt = scale * (1.0 - alpha) * temperature
        ka = scale * alpha
        j = 0
        for c in range(C):
            log_p = -np.inf
            p = 0.0
            if j < k and ir[order[j]] == c:
                log_p = (float(vr[order[j]]) - mt) * inv_t - log_st
                p = math.exp(log_p)
                j += 1
            s = float(xr[c])
            log_q = (s - ms) * inv_t - log_ss
            g = _grad(kind, p, log_p, math.exp(log_q), log_q, divergence, kl_qm, beta, kt)
            if with_ce:
                g += distill_ce_grad(math.exp(s - ms - log_s1), 1.0, 1.0 if c == target else 0.0,
                                     ka)
            gr[c] = g
    return loss


@_jit
def _zero_row(gr):
    for c in range(gr.shape[0]):
        gr[c] = 0.0


@_jit
def _row_target(y, r, ignore_index):
    """Row ``r``'s class index, -1 without targets, -2 for an ignored row."""
    if y.shape[0] == 0:
        return -1
    t = y[r]
    return -2 if t == ignore_index else t


def _distill(x, teacher, indices, g, y, n_rows, inner, kind, beta, temperature, alpha,
             ignore_index, scale, write, topk, losses):
    """Row losses into ``losses`` (0 for ignored rows), the gradient into
    ``g`` when ``write``. ``y`` of no elements: no targets. Targets and
    top-k indices are checked by the caller before this runs."""
    for r in prange(n_rows):
        t = _row_target(y, r, ignore_index)
        if t == -2:
            losses[r] = 0.0
            if write:
                _zero_row(_row(g, r, inner))
            continue
        if topk:
            losses[r] = _topk_row(_row(x, r, inner), _row(indices, r, inner),
                                  _row(teacher, r, inner), _row(g, r, inner), t, kind, beta,
                                  temperature, alpha, scale, write)
        else:
            losses[r] = _dense_row(_row(x, r, inner), _row(teacher, r, inner),
                                   _row(g, r, inner), t, kind, beta, temperature, alpha, scale,
                                   write)
    total = 0.0
    for r in range(n_rows):  # in row order: the same bits for any thread count
        total += losses[r]
    return total


def _bad_topk(indices, n_rows, inner, n_classes, flags):
    """Index of the first row of ``indices`` holding a class out of range
    (flag 1) or a class twice (flag 2), as (row, flag); (-1, 0) if none."""
    for r in prange(n_rows):
        ir = _row(indices, r, inner)
        flag = 0
        for i in range(ir.shape[0]):
            if ir[i] < 0 or ir[i] >= n_classes:
                flag = 1
        if flag == 0:
            s = np.sort(ir)
            for i in range(1, s.shape[0]):
                if s[i] == s[i - 1]:
                    flag = 2
        flags[r] = flag
    for r in range(n_rows):
        if flags[r] != 0:
            return r, flags[r]
    return -1, 0


distill = _Kernel(_distill)
bad_topk = _Kernel(_bad_topk)
