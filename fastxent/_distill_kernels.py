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

from numba import types
from numba.extending import intrinsic

from . import _formulas as F
from ._cpu_kernels import _Kernel, _cast_like, _jit, _next_row, _row
from ._fastmath import _exp_ir, fast_exp
from ._lanes import (_access, _emit_lanes, _is_ahead, _is_row, _is_scalar, _result, _setup,
                     row_max, scale_minus)

forward_kl_element = _jit(F.forward_kl_element, inline=True)
forward_kl_grad = _jit(F.forward_kl_grad, inline=True)
reverse_kl_element = _jit(F.reverse_kl_element, inline=True)
reverse_kl_grad = _jit(F.reverse_kl_grad, inline=True)
jsd_element = _jit(F.jsd_element, inline=True)
jsd_grad = _jit(F.jsd_grad, inline=True)
distill_ce_grad = _jit(F.distill_ce_grad, inline=True)

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2


# --------------------------------------------------------------------------
# The forward KL's fast sweeps, in fixed-order vector lanes (``_lanes``):
# rows of finite logits. A row where a sum comes out non-finite (a logit of
# -inf or inf, NaN) is computed again by the exact row routines below, which
# give torch's xlogy answers; nothing is written before that check.


def _tempered_sums(with_e1):
    @intrinsic
    def tempered_sums(typingctx, x, t, mx, mt, inv_t):
        """(sum eq, sum ep, sum ep (t - x), sum exp(x - mx) or 0) in float64,
        with eq = exp((x - mx) inv_t), ep = exp((t - mt) inv_t); ``t`` None:
        (sum eq, sum exp(x - mx) or 0)."""
        if not (_is_row(x) and (isinstance(t, types.NoneType) or _is_row(t, x.dtype))
                and _is_scalar(mx) and _is_scalar(mt) and _is_scalar(inv_t)):
            return None
        dense = not isinstance(t, types.NoneType)
        n_sums = (3 if dense else 1) + with_e1

        def body(builder, values, scalars):
            xv, tv = values
            smx, smt, sinv = scalars
            d = builder.fsub(xv, smx)
            terms = [_exp_ir(builder, builder.fmul(d, sinv))]
            if dense:
                ep = _exp_ir(builder, builder.fmul(builder.fsub(tv, smt), sinv))
                terms += [ep, builder.fmul(ep, builder.fsub(tv, xv))]
            if with_e1:
                terms.append(_exp_ir(builder, d))
            return terms, None

        def codegen(context, builder, sig, args):
            rows, scalars = _setup(context, builder, sig, args, (0, 1), (2, 3, 4))
            sums = _emit_lanes(context, builder, rows, scalars, body, n_sums)
            if not with_e1:
                sums.append(context.get_constant(types.float64, 0.0))
            return _result(context, builder, sig, sums)

        return types.UniTuple(types.float64, 4 if dense else 2)(x, t, mx, mt, inv_t), codegen

    return tempered_sums


tempered_sums = _tempered_sums(False)
tempered_sums_ce = _tempered_sums(True)


def _forward_kl_map(with_e1):
    @intrinsic
    def forward_kl_map(typingctx, x, t, mx, mt, inv_t, kq, kp, k1, g):
        """g <- kq eq - kp ep + k1 exp(x - mx) (``t`` None: no ep term; the
        last term only ``with_e1``); ``g`` may be ``x``. The forward KL's
        gradient T (Q - P) and the CE's softmax, their row constants folded
        into kq, kp, k1."""
        if not (_is_row(x) and (isinstance(t, types.NoneType) or _is_row(t, x.dtype))
                and _is_row(g, x.dtype) and g.mutable):
            return None

        def body(builder, values, scalars):
            xv, tv = values
            smx, smt, sinv, skq, skp, sk1 = scalars
            d = builder.fsub(xv, smx)
            out = builder.fmul(skq, _exp_ir(builder, builder.fmul(d, sinv)))
            if with_e1:
                out = builder.fadd(out, builder.fmul(sk1, _exp_ir(builder, d)))
            if tv is not None:
                ep = _exp_ir(builder, builder.fmul(builder.fsub(tv, smt), sinv))
                out = builder.fsub(out, builder.fmul(skp, ep))
            return [], out

        def codegen(context, builder, sig, args):
            rows, scalars = _setup(context, builder, sig, args, (0, 1), (2, 3, 4, 5, 6, 7))
            _emit_lanes(context, builder, rows, scalars, body, 0,
                        target=_access(context, builder, sig, args, 8))
            return context.get_dummy_value()

        return types.none(x, t, mx, mt, inv_t, kq, kp, k1, g), codegen

    return forward_kl_map


forward_kl_map = _forward_kl_map(False)
forward_kl_map_ce = _forward_kl_map(True)


@intrinsic
def tempered_exp_store(typingctx, x, g, mx, inv_t, ahead):
    """``g <- exp((x - mx) inv_t)`` (``g`` may be ``x``); returns their sum in
    float64, the same lanes and bits as ``tempered_sums``'s first. ``ahead``
    is prefetched on the way. With a top-k teacher (P = 0 off its k classes)
    the forward KL's gradient is then one product and k corrections."""
    if not (_is_row(x) and _is_row(g, x.dtype) and g.mutable and _is_scalar(mx)
            and _is_scalar(inv_t) and _is_ahead(ahead, x)):
        return None

    def body(builder, values, scalars):
        e = _exp_ir(builder, builder.fmul(builder.fsub(values[0], scalars[0]), scalars[1]))
        return [e], e

    def codegen(context, builder, sig, args):
        rows, scalars = _setup(context, builder, sig, args, (0,), (2, 3))
        return _result(context, builder, sig, _emit_lanes(
            context, builder, rows, scalars, body, 1, target=_access(context, builder, sig, args, 1),
            ahead=_access(context, builder, sig, args, 4)))

    return types.float64(x, g, mx, inv_t, ahead), codegen


@_jit(inline=True)
def _sums(xr, tr, mx, mt, inv_t, with_ce):
    if with_ce:
        return tempered_sums_ce(xr, tr, mx, mt, inv_t)
    return tempered_sums(xr, tr, mx, mt, inv_t)


@_jit(inline=True)
def _map(xr, tr, mx, mt, inv_t, kq, kp, k1, gr, with_ce):
    if with_ce:
        forward_kl_map_ce(xr, tr, mx, mt, inv_t, kq, kp, k1, gr)
    else:
        forward_kl_map(xr, tr, mx, mt, inv_t, kq, kp, k1, gr)


@_jit
def _fast_forward_dense(xr, tr, gr, target, temperature, alpha, scale, write):
    """(done, loss): the forward KL of a row of finite values through the
    vector sweeps; done False (nothing written) where a sum is not finite."""
    inv_t = 1.0 / temperature
    mx = row_max(xr, None)
    mt = row_max(tr, None)
    with_ce = target >= 0 and alpha > 0.0
    sq, sp, a, s1 = _sums(xr, tr, mx, mt, _cast_like(inv_t, xr), with_ce)
    log_sq, log_sp = math.log(sq), math.log(sp)
    divergence = inv_t * a / sp - (float(mt) - float(mx)) * inv_t - log_sp + log_sq
    loss = (1.0 - alpha) * temperature * temperature * divergence
    if with_ce:
        loss += alpha * ((float(mx) + math.log(s1)) - float(xr[target]))
    if not (math.isfinite(loss) and math.isfinite(float(mx)) and math.isfinite(float(mt))):
        return False, 0.0
    if write:
        kt = scale * (1.0 - alpha) * temperature
        ka = scale * alpha if with_ce else 0.0
        _map(xr, tr, mx, mt, _cast_like(inv_t, xr), _cast_like(kt / sq, xr),
             _cast_like(kt / sp, xr), _cast_like(ka / s1 if with_ce else 0.0, xr), gr, with_ce)
        if with_ce:
            gr[target] = gr[target] - ka
    return True, loss


@_jit
def _fast_forward_topk(xr, ir, vr, gr, target, temperature, alpha, scale, write, ahead):
    """As ``_fast_forward_dense``, the teacher's k pairs: the sweeps over the
    student, then the k classes of the teacher one by one (its P is 0
    elsewhere, so they add to the gradient's P = 0 form). Without the
    cross-entropy share the student's exponentials are stored in the
    gradient's row, whose last sweep is then one product (the student's k
    logits are read first: in place, that sweep overwrites them)."""
    inv_t = 1.0 / temperature
    mx = row_max(xr, None)
    with_ce = target >= 0 and alpha > 0.0
    k = ir.shape[0]
    x_top = np.empty(k)  # the student's logits at the teacher's k classes
    finite = math.isfinite(float(mx))
    for i in range(k):
        x_top[i] = float(xr[ir[i]])
        finite = finite and math.isfinite(x_top[i]) and math.isfinite(float(vr[i]))
    # stored only when nothing can send the row to the exact routine, which
    # reads the logits: a NaN in the row makes everything NaN in both
    store = write and not with_ce and finite
    if store:
        sq, s1 = tempered_exp_store(xr, gr, mx, _cast_like(inv_t, xr), ahead), 0.0
    else:
        sq, s1 = _sums(xr, None, mx, mx, _cast_like(inv_t, xr), with_ce)
    log_sq = math.log(sq)
    mt = -np.inf
    for i in range(k):
        mt = max(mt, float(vr[i]))
    p = np.empty(k)  # the teacher's exponentials, then its probabilities
    for i in range(k):  # apart from the sum: a loop of vectors
        p[i] = fast_exp((float(vr[i]) - mt) * inv_t)
    sp = 0.0
    for i in range(k):
        sp += p[i]
    log_sp = math.log(sp)
    divergence = 0.0
    for i in range(k):
        log_p = (float(vr[i]) - mt) * inv_t - log_sp
        log_q = (x_top[i] - float(mx)) * inv_t - log_sq
        p[i] = p[i] / sp
        divergence += forward_kl_element(p[i], log_p, log_q)
    loss = (1.0 - alpha) * temperature * temperature * divergence
    xt = float(xr[target]) if with_ce else 0.0
    if with_ce:
        loss += alpha * ((float(mx) + math.log(s1)) - xt)
    if not store and not (math.isfinite(loss) and math.isfinite(float(mx))
                          and math.isfinite(mt)):
        return False, 0.0
    if write:
        kt = scale * (1.0 - alpha) * temperature
        ka = scale * alpha if with_ce else 0.0
        if store:
            scale_minus(gr, gr, _cast_like(kt / sq, gr), _cast_like(0.0, gr), None)
        else:
            _map(xr, None, mx, mx, _cast_like(inv_t, xr), _cast_like(kt / sq, xr),
                 _cast_like(0.0, xr), _cast_like(ka / s1 if with_ce else 0.0, xr), gr, with_ce)
        for i in range(k):
            gr[ir[i]] = gr[ir[i]] - kt * p[i]
        if with_ce:
            gr[target] = gr[target] - ka
    return True, loss


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
        if kind == FORWARD_KL:
            if topk:
                done, loss = _fast_forward_topk(_row(x, r, inner), _row(indices, r, inner),
                                                _row(teacher, r, inner), _row(g, r, inner), t,
                                                temperature, alpha, scale, write,
                                                _next_row(x, r, inner))
            else:
                done, loss = _fast_forward_dense(_row(x, r, inner), _row(teacher, r, inner),
                                                 _row(g, r, inner), t, temperature, alpha,
                                                 scale, write)
            if done:
                losses[r] = loss
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
