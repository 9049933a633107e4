"""CPU kernels: Numba loops over rows, one fused pass per row.

Every kernel works on the canonical problem built by ``_validate``: the
logits as a 2-D array ``(rows, C)`` (the class axis is the last one) or a 3-D
array ``(A, C, B)`` (the class axis is in the middle, as in PyTorch's
``(N, C, d1, ...)`` layout; row ``r`` is ``x[r // B, :, r % B]``). ``_row``
hides the difference, so each kernel is written once.

A row routine computes, for one row, the max shift, the log-sum-exp, the loss
and (when given somewhere to write it) the gradient. The exponentials are
computed once: they are written into the gradient row, which stays in cache,
and scaled there in a second sweep. Gradients may be written over the logits
(``g is x``): each element is read before it is written.

Losses of the rows are returned in float64 and summed by the caller in a
fixed order, so results do not depend on the number of threads.
"""

from __future__ import annotations

import threading
import types as pytypes

import numba
import numpy as np
from numba import prange, types
from numba.extending import overload

from ._fastmath import FASTMATH, fast_exp, fast_log, maximum

_JIT_OPTIONS = dict(cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)


def _jit(fn=None, *, inline=False):
    """Compile a helper with the project's options.

    ``inline=True`` inlines it into its callers at Numba's level: a call
    per row of a few classes costs more than the row's arithmetic.
    """
    def wrap(f):
        return numba.njit(inline="always" if inline else "never", **_JIT_OPTIONS)(f)

    return wrap if fn is None else wrap(fn)


def _row(a, r, inner):
    """Row ``r`` of a canonical 2-D ``(rows, C)`` or 3-D ``(A, C, B)`` array."""
    raise NotImplementedError  # only called from compiled code


@overload(_row, jit_options=_JIT_OPTIONS, inline="always")
def _row_impl(a, r, inner):
    if isinstance(a, types.Array) and a.ndim == 2:
        return lambda a, r, inner: a[r]
    if isinstance(a, types.Array) and a.ndim == 3:
        return lambda a, r, inner: a[r // inner, :, r % inner]
    return None


def _cast_like(value, like):
    """``value`` converted to the float type of ``like`` (an array or a scalar)."""
    raise NotImplementedError  # only called from compiled code


@overload(_cast_like, jit_options=_JIT_OPTIONS, inline="always")
def _cast_like_impl(value, like):
    if getattr(like, "dtype", like) == types.float32:
        return lambda value, like: np.float32(value)
    return lambda value, like: np.float64(value)


# --------------------------------------------------------------------------
# Row routines


# Loop shapes that LLVM vectorizes: every loop counts from 0 over one row
# (or a slice of it); a loop that reads one argument and writes another is
# not used when both may be the same buffer (LLVM's overlap check would fail
# and run it one element at a time), so rows are first copied into the
# gradient and then worked on in place. Sums are kept in the row's float
# type within blocks of _BLOCK elements (vector lanes of at most a few dozen
# terms) and in float64 across blocks: float64 lanes all along would halve
# the vector width of the exp loop.
_BLOCK = 512

#: Elements of the scratch buffer of the buffered kernels (fits in L1).
_BUFFER = 4096


@_jit
def _row_max(x):
    """Maximum of a row; NaN if the row holds a NaN."""
    m = x[0]
    for c in range(1, x.shape[0]):
        m = maximum(m, x[c])
    return m


@_jit
def _copy_row_max(x, g):
    """``_row_max`` that also copies the row into ``g``."""
    m = x[0]
    for c in range(x.shape[0]):
        xc = x[c]
        g[c] = xc
        m = maximum(m, xc)
    return m


@_jit
def _dot(x, w):
    """sum(w * x) in float64, or sum(x) when ``w`` is None."""
    n = x.shape[0]
    if n <= _BLOCK:  # one block: no slicing
        part = _cast_like(0.0, x)
        if w is None:
            for c in range(n):
                part += x[c]
        else:
            for c in range(n):
                part += w[c] * x[c]
        return np.float64(part)
    total = 0.0
    for b0 in range(0, n, _BLOCK):
        xb = x[b0:b0 + _BLOCK]
        part = _cast_like(0.0, x)
        if w is None:
            for c in range(xb.shape[0]):
                part += xb[c]
        else:
            wb = w[b0:b0 + _BLOCK]
            for c in range(xb.shape[0]):
                part += wb[c] * xb[c]
        total += part
    return total


@_jit
def _max_and_dot(x, w):
    """(max of x, sum of w * x) in one read of the row."""
    m = x[0]
    total = 0.0
    n = x.shape[0]
    for b0 in range(0, n, _BLOCK):
        xb = x[b0:b0 + _BLOCK]
        part = _cast_like(0.0, x)
        if w is None:
            for c in range(xb.shape[0]):
                m = maximum(m, xb[c])
                part += xb[c]
        else:
            wb = w[b0:b0 + _BLOCK]
            for c in range(xb.shape[0]):
                m = maximum(m, xb[c])
                part += wb[c] * xb[c]
        total += part
    return m, total


@_jit
def _exp_sum(x, m):
    """sum(exp(x - m)) in float64; ``x`` is not written."""
    total = 0.0
    n = x.shape[0]
    for b0 in range(0, n, _BLOCK):
        xb = x[b0:b0 + _BLOCK]
        part = _cast_like(0.0, x)
        for c in range(xb.shape[0]):
            part += fast_exp(xb[c] - m)
        total += part
    return total


@_jit
def _exp_sum_inplace(g, m):
    """g <- exp(g - m); returns the sum in float64."""
    total = 0.0
    n = g.shape[0]
    for b0 in range(0, n, _BLOCK):
        gb = g[b0:b0 + _BLOCK]
        part = _cast_like(0.0, g)
        for c in range(gb.shape[0]):
            e = fast_exp(gb[c] - m)
            gb[c] = e
            part += e
        total += part
    return total


@_jit
def _exp_pass(x, g, inplace):
    """(max, sum of exp(x - max)) of a row; exponentials left in ``g``.

    ``g`` None: forward only, nothing is written. ``inplace``: ``g`` is ``x``.
    Otherwise the row is copied into ``g`` during the max sweep.
    """
    if g is None:
        m = _row_max(x)
        return m, _exp_sum(x, m)
    if inplace:
        m = _row_max(g)
    else:
        m = _copy_row_max(x, g)
    return m, _exp_sum_inplace(g, m)


@_jit
def _exp_pass_dot(x, g, inplace, w):
    """``_exp_pass`` that also returns sum(w * x), read in the max sweep."""
    m, dot = _max_and_dot(x, w)  # reads only: x may be g
    if g is None:
        return m, _exp_sum(x, m), dot
    if not inplace:
        for c in range(x.shape[0]):
            g[c] = x[c]
    return m, _exp_sum_inplace(g, m), dot


@_jit(inline=True)
def _zero(g):
    for c in range(g.shape[0]):
        g[c] = 0.0


@_jit
def _scale_minus(g, k1, k2, w):
    """g <- g * k1 - k2 * w  (``- k2`` when ``w`` is None)."""
    if w is None:
        for c in range(g.shape[0]):
            g[c] = g[c] * k1 - k2
    else:
        for c in range(g.shape[0]):
            g[c] = g[c] * k1 - k2 * w[c]


@_jit(inline=True)
def _scale_minus_from(e, g, k1, k2, w):
    """g <- e * k1 - k2 * w  (``- k2`` when ``w`` is None); ``e`` is not ``g``."""
    if w is None:
        for c in range(g.shape[0]):
            g[c] = e[c] * k1 - k2
    else:
        for c in range(g.shape[0]):
            g[c] = e[c] * k1 - k2 * w[c]


@_jit(inline=True)
def _hard_coeffs(lse, s, xt, t, w, wsum, sx, smooth, scale, C):
    """Loss of a row and its gradient's coefficients, for class target ``t``.

    loss = (1-eps) w_t (lse - x_t) + eps/C (W lse - sum_c w_c x_c)
    grad = scale * (p_c ((1-eps) w_t + eps W/C) - eps w_c/C - (1-eps) w_t [c=t])
         = e_c * k1 - k2 * w_c - kt [c=t],   with p_c = e_c / s,
    W the sum of the weights (C without weights), as in PyTorch.
    """
    wt = 1.0 if w is None else np.float64(w[t])
    loss = (1.0 - smooth) * wt * (lse - xt)
    if smooth > 0.0:
        loss += smooth / C * (wsum * lse - sx)
    k1 = scale * ((1.0 - smooth) * wt + smooth * wsum / C) / s
    k2 = scale * smooth / C
    kt = scale * (1.0 - smooth) * wt
    return loss, k1, k2, kt


@_jit
def _ce_hard_row(x, g, inplace, t, w, wsum, smooth, scale):
    """Cross-entropy of one contiguous row against class ``t``; gradient into ``g``.

    The exponentials are kept in ``g`` itself between the two sweeps.
    """
    C = x.shape[0]
    xt = np.float64(x[t])
    if smooth > 0.0:
        m, s, sx = _exp_pass_dot(x, g, inplace, w)
    else:
        m, s = _exp_pass(x, g, inplace)
        sx = 0.0
    loss, k1, k2, kt = _hard_coeffs(m + np.log(s), s, xt, t, w, wsum, sx, smooth, scale, C)
    if g is not None:
        _scale_minus(g, _cast_like(k1, g), _cast_like(k2, g), w)
        g[t] = g[t] - kt
    return loss


@_jit
def _soft_sums(x, q, w, keep, uniform):
    """(sum q'_c, sum q'_c x_c) with q' = keep * q + uniform (times w)."""
    total = 0.0
    qx = 0.0
    n = x.shape[0]
    for b0 in range(0, n, _BLOCK):
        xb = x[b0:b0 + _BLOCK]
        qb = q[b0:b0 + _BLOCK]
        part_q = _cast_like(0.0, x)
        part_qx = _cast_like(0.0, x)
        if w is None:
            for c in range(xb.shape[0]):
                qc = keep * qb[c] + uniform
                part_q += qc
                part_qx += qc * xb[c]
        else:
            wb = w[b0:b0 + _BLOCK]
            for c in range(xb.shape[0]):
                qc = (keep * qb[c] + uniform) * wb[c]
                part_q += qc
                part_qx += qc * xb[c]
        total += part_q
        qx += part_qx
    return total, qx


@_jit
def _soft_grad(e, g, q, w, k1, keep_s, uniform_s):
    """g <- e * k1 - (keep_s * q + uniform_s) * w; ``e`` may be ``g`` only when
    passed as None (then the exponentials are read from ``g``)."""
    for c in range(g.shape[0]):
        qc = keep_s * q[c] + uniform_s
        if w is not None:
            qc = qc * w[c]
        if e is None:
            g[c] = g[c] * k1 - qc
        else:
            g[c] = e[c] * k1 - qc


@_jit
def _ce_soft_finish(x, e, lse, s, q, w, smooth, scale, g):
    """Loss of a row against probabilities ``q``; gradient into ``g``.

    With q'_c = (1-eps) q_c + eps/C (times w_c with weights) and S = sum q'_c:
    loss = S lse - sum_c q'_c x_c,  grad = scale * (S p_c - q'_c).
    ``x`` must still hold the logits (the sums are read first). ``e`` holds
    exp(x - max), or is None when they are in ``g``; ``s`` is their sum and
    ``lse`` the row's log-sum-exp.
    """
    C = x.shape[0]
    keep = _cast_like(1.0 - smooth, x)
    uniform = _cast_like(smooth / C, x)
    total, qx = _soft_sums(x, q, w, keep, uniform)
    loss = total * lse - qx
    if g is not None:
        _soft_grad(e, g, q, w, _cast_like(scale * total / s, g),
                   _cast_like(scale * (1.0 - smooth), g), _cast_like(scale * smooth / C, g))
    return loss


@_jit
def _ce_soft_row(x, g, inplace, q, w, smooth, scale):
    """Cross-entropy of one contiguous row against probabilities ``q``."""
    if g is None:
        m, s = _exp_pass(x, None, False)
        return _ce_soft_finish(x, None, m + np.log(s), s, q, w, smooth, scale, None)
    if not inplace:
        m, s = _exp_pass(x, g, False)
        return _ce_soft_finish(x, None, m + np.log(s), s, q, w, smooth, scale, g)
    # In place: the sums need the logits, which the exponentials replace.
    C = x.shape[0]
    keep = _cast_like(1.0 - smooth, x)
    uniform = _cast_like(smooth / C, x)
    total, qx = _soft_sums(x, q, w, keep, uniform)
    m, s = _exp_pass(x, g, True)
    _soft_grad(None, g, q, w, _cast_like(scale * total / s, g),
               _cast_like(scale * (1.0 - smooth), g), _cast_like(scale * smooth / C, g))
    return total * (m + np.log(s)) - qx


#: Rows of at most this many classes are exponentiated across rows (see
#: ``_exp_block``).
_NARROW = 16


@_jit
def _exp_block(x, r0, n, inner, finite_shift):
    """Exponentials of a block of ``n`` rows from ``r0``, in a new buffer.

    Returns (e, m, s, lse): e[i, c] = exp(x[r0+i, c] - m[i]) as a contiguous
    (n, C) array, the rows' max m, sums s (float64) and log-sum-exp lse.
    ``finite_shift``: an infinite max is not subtracted (torch.logsumexp).

    The work is laid out so that every sweep is one vectorized loop: rows
    are copied shifted into the buffer and exponentiated in one flat sweep;
    rows of at most _NARROW classes are handled transposed, a vector lane
    per row, since their own loops are too short to vectorize. Everything
    is inline: per-row calls cost more than the arithmetic of a short row.
    """
    C = x.shape[1]
    e = np.empty((n, C), x.dtype)
    m = np.empty(n, x.dtype)
    s = np.empty(n)
    if C <= _NARROW:
        e_t = np.empty((C, n), x.dtype)
        for i in range(n):
            xr = _row(x, r0 + i, inner)
            for c in range(C):
                e_t[c, i] = xr[c]
        m[:] = e_t[0]
        for c in range(1, C):
            ec = e_t[c]
            for i in range(n):
                m[i] = maximum(m[i], ec[i])
        if finite_shift:
            for i in range(n):
                if np.isinf(m[i]):
                    m[i] = 0.0
        s_part = np.zeros(n, x.dtype)
        for c in range(C):
            ec = e_t[c]
            for i in range(n):
                v = fast_exp(ec[i] - m[i])
                ec[i] = v
                s_part[i] += v
        for i in range(n):
            s[i] = s_part[i]
            er = e[i]
            for c in range(C):
                er[c] = e_t[c, i]
    else:
        for i in range(n):
            xr = _row(x, r0 + i, inner)
            mi = xr[0]
            for c in range(1, C):
                mi = maximum(mi, xr[c])
            if finite_shift and np.isinf(mi):
                mi = 0.0
            m[i] = mi
            er = e[i]
            for c in range(C):
                er[c] = xr[c] - mi
        flat = e.reshape(n * C)
        for k in range(n * C):
            flat[k] = fast_exp(flat[k])
        for i in range(n):
            s[i] = _dot(e[i], None)
    lse = np.empty(n)
    for i in range(n):  # one vectorized log for the block
        lse[i] = m[i] + fast_log(s[i])
    return e, m, s, lse


@_jit
def _rows_per_block(C):
    """Rows per block of the buffered kernels: about _BUFFER elements."""
    return max(1, _BUFFER // C)


# --------------------------------------------------------------------------
# Rows and blocks of rows. A kernel's prange body calls exactly one of these
# and stores what it returns into an argument array: Numba's parfor pass may
# drop writes through array views made inside the loop body itself.
#
# Two shapes of each: "direct" routines take one contiguous row of many
# classes and keep the exponentials in the gradient row itself; "block"
# routines take blocks of rows of any length and layout and compute the
# exponentials in a scratch buffer (see ``_exp_block``). ``_cpu.py`` picks.


@_jit
def _ce_hard_direct(x, y, w, wsum, ignore_index, smooth, scale, g, inplace, inner, r):
    t = y[r]
    if t == ignore_index:
        if g is not None:
            _zero(_row(g, r, inner))
        return 0.0
    if g is None:
        return _ce_hard_row(_row(x, r, inner), None, False, t, w, wsum, smooth, scale)
    return _ce_hard_row(_row(x, r, inner), _row(g, r, inner), inplace, t, w, wsum, smooth,
                        scale)


@_jit
def _ce_hard_block(x, y, w, wsum, ignore_index, smooth, scale, g, losses, inner, r0, n):
    C = x.shape[1]
    e, m, s, lse = _exp_block(x, r0, n, inner, False)
    for i in range(n):
        r = r0 + i
        t = y[r]
        if t == ignore_index:
            losses[r] = 0.0
            if g is not None:
                _zero(_row(g, r, inner))
            continue
        xr = _row(x, r, inner)
        sx = _dot(xr, w) if smooth > 0.0 else 0.0
        loss, k1, k2, kt = _hard_coeffs(lse[i], s[i], np.float64(xr[t]), t, w, wsum, sx,
                                        smooth, scale, C)
        losses[r] = loss
        if g is not None:
            gr = _row(g, r, inner)
            _scale_minus_from(e[i], gr, _cast_like(k1, gr), _cast_like(k2, gr), w)
            gr[t] = gr[t] - kt


@_jit
def _ce_soft_direct(x, q, w, smooth, scale, g, inplace, inner, r):
    if g is None:
        return _ce_soft_row(_row(x, r, inner), None, False, _row(q, r, inner), w, smooth,
                            scale)
    return _ce_soft_row(_row(x, r, inner), _row(g, r, inner), inplace, _row(q, r, inner), w,
                        smooth, scale)


@_jit
def _ce_soft_block(x, q, w, smooth, scale, g, losses, inner, r0, n):
    e, m, s, lse = _exp_block(x, r0, n, inner, False)
    for i in range(n):
        r = r0 + i
        if g is None:
            losses[r] = _ce_soft_finish(_row(x, r, inner), e[i], lse[i], s[i], _row(q, r, inner),
                                        w, smooth, scale, None)
        else:
            losses[r] = _ce_soft_finish(_row(x, r, inner), e[i], lse[i], s[i], _row(q, r, inner),
                                        w, smooth, scale, _row(g, r, inner))


@_jit
def _nll_row(lp, y, w, ignore_index, inner, r):
    t = y[r]
    if t == ignore_index:
        return 0.0
    v = np.float64(_row(lp, r, inner)[t])
    return -v if w is None else -np.float64(w[t]) * v


@_jit
def _softmax_direct(x, out, inplace, inner, log, r):
    o = _row(out, r, inner)
    if log:
        # o <- (x - m) - log(sum exp(x - m)), rounded as torch.log_softmax
        if inplace:
            m = _row_max(o)
            log_s = _cast_like(np.log(_exp_sum(o, m)), o)
            for c in range(o.shape[0]):
                o[c] = (o[c] - m) - log_s
        else:
            xr = _row(x, r, inner)
            m = _row_max(xr)
            log_s = _cast_like(np.log(_exp_sum(xr, m)), o)
            for c in range(o.shape[0]):
                o[c] = (xr[c] - m) - log_s
    else:
        m, s = _exp_pass(_row(x, r, inner), o, inplace)
        inv_s = _cast_like(1.0 / s, o)
        for c in range(o.shape[0]):
            o[c] = o[c] * inv_s


@_jit
def _softmax_block(x, out, inner, log, r0, n):
    C = x.shape[1]
    e, m, s, lse = _exp_block(x, r0, n, inner, False)
    for i in range(n):
        o = _row(out, r0 + i, inner)
        if log:
            xr = _row(x, r0 + i, inner)
            mi = m[i]
            log_s = _cast_like(lse[i] - mi, o)
            for c in range(C):
                o[c] = (xr[c] - mi) - log_s
        else:
            er = e[i]
            inv_s = _cast_like(1.0 / s[i], o)
            for c in range(C):
                o[c] = er[c] * inv_s


@_jit
def _logsumexp_block(x, out, inner, r0, n):
    # As torch.logsumexp: an infinite max is not subtracted, so that rows of
    # -inf give -inf and rows holding +inf give +inf (not NaN).
    e, m, s, lse = _exp_block(x, r0, n, inner, True)
    for i in range(n):
        out[r0 + i] = lse[i]


# --------------------------------------------------------------------------
# Kernels. Each is compiled twice (parallel and serial, see ``_Kernel``);
# ``prange`` is a plain ``range`` in the serial one. Block kernels cut the
# rows into blocks of ``_rows_per_block(C)`` rows.


def _ce_hard(x, y, w, wsum, ignore_index, smooth, scale, g, inplace, losses, inner):
    for r in prange(losses.shape[0]):
        losses[r] = _ce_hard_direct(x, y, w, wsum, ignore_index, smooth, scale, g, inplace,
                                    inner, r)


def _ce_hard_buffered(x, y, w, wsum, ignore_index, smooth, scale, g, losses, inner):
    n_rows, per = losses.shape[0], _rows_per_block(x.shape[1])
    for b in prange((n_rows + per - 1) // per):
        _ce_hard_block(x, y, w, wsum, ignore_index, smooth, scale, g, losses, inner, b * per,
                       min(per, n_rows - b * per))


def _ce_soft(x, q, w, smooth, scale, g, inplace, losses, inner):
    for r in prange(losses.shape[0]):
        losses[r] = _ce_soft_direct(x, q, w, smooth, scale, g, inplace, inner, r)


def _ce_soft_buffered(x, q, w, smooth, scale, g, losses, inner):
    n_rows, per = losses.shape[0], _rows_per_block(x.shape[1])
    for b in prange((n_rows + per - 1) // per):
        _ce_soft_block(x, q, w, smooth, scale, g, losses, inner, b * per,
                       min(per, n_rows - b * per))


def _nll(lp, y, w, ignore_index, losses, inner):
    for r in prange(losses.shape[0]):
        losses[r] = _nll_row(lp, y, w, ignore_index, inner, r)


def _softmax(x, out, inplace, n_rows, inner, log):
    for r in prange(n_rows):
        _softmax_direct(x, out, inplace, inner, log, r)


def _softmax_buffered(x, out, n_rows, inner, log):
    per = _rows_per_block(x.shape[1])
    for b in prange((n_rows + per - 1) // per):
        _softmax_block(x, out, inner, log, b * per, min(per, n_rows - b * per))


def _logsumexp(x, out, inner):
    n_rows, per = out.shape[0], _rows_per_block(x.shape[1])
    for b in prange((n_rows + per - 1) // per):
        _logsumexp_block(x, out, inner, b * per, min(per, n_rows - b * per))


def _log1p_unit(e):
    """log(1 + e) for e in [0, 1]."""
    raise NotImplementedError  # only called from compiled code


# log1p(e) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...),  s = e / (2 + e) in
# [0, 1/3]: no cancellation for small e (unlike log(1 + e)), one division,
# and a polynomial that vectorizes. Terms until s^(2k) / (2k+1) is below the
# type's rounding: 9 for float32, 18 for float64. The Horner steps are
# written out because a loop over a tuple of coefficients does not vectorize.


@_jit(inline=True)
def _log1p_unit32(e):
    s = e / (np.float32(2.0) + e)
    s2 = s * s
    p = np.float32(0.058823529411764705)
    p = p * s2 + np.float32(0.06666666666666667)
    p = p * s2 + np.float32(0.07692307692307693)
    p = p * s2 + np.float32(0.09090909090909091)
    p = p * s2 + np.float32(0.1111111111111111)
    p = p * s2 + np.float32(0.14285714285714285)
    p = p * s2 + np.float32(0.2)
    p = p * s2 + np.float32(0.3333333333333333)
    p = p * s2 + np.float32(1.0)
    return (s + s) * p


@_jit(inline=True)
def _log1p_unit64(e):
    s = e / (2.0 + e)
    s2 = s * s
    p = np.float64(0.02857142857142857)
    p = p * s2 + np.float64(0.030303030303030304)
    p = p * s2 + np.float64(0.03225806451612903)
    p = p * s2 + np.float64(0.034482758620689655)
    p = p * s2 + np.float64(0.037037037037037035)
    p = p * s2 + np.float64(0.04)
    p = p * s2 + np.float64(0.043478260869565216)
    p = p * s2 + np.float64(0.047619047619047616)
    p = p * s2 + np.float64(0.05263157894736842)
    p = p * s2 + np.float64(0.058823529411764705)
    p = p * s2 + np.float64(0.06666666666666667)
    p = p * s2 + np.float64(0.07692307692307693)
    p = p * s2 + np.float64(0.09090909090909091)
    p = p * s2 + np.float64(0.1111111111111111)
    p = p * s2 + np.float64(0.14285714285714285)
    p = p * s2 + np.float64(0.2)
    p = p * s2 + np.float64(0.3333333333333333)
    p = p * s2 + np.float64(1.0)
    return (s + s) * p


@overload(_log1p_unit, jit_options=_JIT_OPTIONS, inline="always")
def _log1p_unit_impl(e):
    if e == types.float32:
        return lambda e: _log1p_unit32(e)
    return lambda e: _log1p_unit64(e)


@_jit(inline=True)
def _bce_element(xc, tc, w, pw, c):
    """(loss, gradient) of binary cross-entropy with logits for one element.

    loss = (1 - t) x - l log_sigmoid(x),  l = 1 + (pos_weight - 1) t,
    grad = l sigmoid(x) - l + 1 - t, both times the weight (PyTorch's
    formula), with log_sigmoid(x) = min(x, 0) - log1p(exp(-|x|)).
    Constants in the logits' type keep float32 math in float32.
    """
    zero = _cast_like(0.0, tc)
    one = _cast_like(1.0, tc)
    e = fast_exp(-np.abs(xc))
    log1p_e = _log1p_unit(e)
    lw = one
    if pw is not None:
        lw = one + (pw[c] - one) * tc
    # (1 - t) x - l (min(x, 0) - log1p(e)), with the x terms gathered first:
    # for x < 0 and t = 0 this is log1p(e) exactly, where the formula as
    # written cancels x against x (PyTorch loses all digits there).
    if xc < zero:
        loss = xc * (one - tc - lw) + lw * log1p_e
    else:
        loss = (one - tc) * xc + lw * log1p_e
    r = one / (one + e)
    sig = r if xc >= zero else e * r
    grad = lw * sig - lw + one - tc
    if w is not None:
        loss = loss * w[c]
        grad = grad * w[c]
    return loss, grad


@_jit
def _bce_block(x, t, w, pw, scale, g, out):
    """BCE over one block; returns the loss sum in the logits' type."""
    part = _cast_like(0.0, t)
    for c in range(t.shape[0]):
        loss, grad = _bce_element(x[c], t[c], w, pw, c)
        if out is not None:
            out[c] = loss
        part += loss
        if g is not None:
            g[c] = grad * scale
    return part


@_jit
def _bce_block_inplace(g, t, w, pw, scale, out):
    """``_bce_block`` with the gradient written over the logits in ``g``.

    Reading and writing one array keeps the loop vectorizable, where two
    arguments that happen to be the same buffer would not be.
    """
    part = _cast_like(0.0, t)
    for c in range(t.shape[0]):
        loss, grad = _bce_element(g[c], t[c], w, pw, c)
        if out is not None:
            out[c] = loss
        part += loss
        g[c] = grad * scale
    return part


@_jit
def _bce_row(x, t, w, pw, scale, g, out, inplace, r):
    """Row ``r`` of BCE, in blocks summed in float64."""
    acc = 0.0
    n = t.shape[1]
    scale = _cast_like(scale, t)
    for b0 in range(0, n, _BLOCK):
        b1 = b0 + _BLOCK
        tb = t[r, b0:b1]
        wb = None
        if w is not None:
            wb = w[r, b0:b1]
        pwb = None
        if pw is not None:
            pwb = pw[r, b0:b1]
        ob = None
        if out is not None:
            ob = out[r, b0:b1]
        if g is None:
            acc += _bce_block(x[r, b0:b1], tb, wb, pwb, scale, None, ob)
        elif inplace:
            acc += _bce_block_inplace(g[r, b0:b1], tb, wb, pwb, scale, ob)
        else:
            acc += _bce_block(x[r, b0:b1], tb, wb, pwb, scale, g[r, b0:b1], ob)
    return acc


def _bce(x, t, w, pw, scale, g, out, inplace, losses):
    for r in prange(t.shape[0]):
        losses[r] = _bce_row(x, t, w, pw, scale, g, out, inplace, r)


@_jit
def scan_hard_targets(y, n_classes, ignore_index, w):
    """Check class indices; return (first bad position or -1, sum of weights).

    The sum of ``w[t]`` over targets that are not ignored (their count without
    weights) is the denominator of PyTorch's mean reduction.
    """
    total = 0.0
    for r in range(y.shape[0]):
        t = y[r]
        if t == ignore_index:
            continue
        if t < 0 or t >= n_classes:
            return r, total
        if w is None:
            total += 1.0
        else:
            total += w[t]
    return -1, total


# --------------------------------------------------------------------------
# Parallel and serial variants


class _Kernel:
    """A kernel compiled parallel and serial; calls pick one safely.

    Numba's default ``workqueue`` threading layer aborts the process when two
    Python threads run parallel regions at once. One parallel call runs at a
    time; a call that arrives meanwhile (another Python thread) runs the
    serial variant, which releases the GIL and gives the same bits.

    Inputs of fewer than ``PARALLEL_MIN_ELEMENTS`` elements run serially:
    waking the thread pool costs more than their work (tens of
    microseconds, milliseconds when the cores are busy).
    """

    _lock = threading.Lock()
    PARALLEL_MIN_ELEMENTS = 1 << 16

    def __init__(self, fn):
        self.parallel = numba.njit(parallel=True, **_JIT_OPTIONS)(fn)
        # A distinct function object keeps the serial variant's cache entry
        # apart from the parallel one's (Numba keys its cache by name).
        serial_fn = pytypes.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                         fn.__defaults__, fn.__closure__)
        serial_fn.__qualname__ = fn.__qualname__ + "_serial"
        self.serial = numba.njit(**_JIT_OPTIONS)(serial_fn)

    def __call__(self, *args):
        """Run on the arrays ``args``; the first one's size is the work."""
        if (args[0].size >= self.PARALLEL_MIN_ELEMENTS and numba.get_num_threads() > 1
                and _Kernel._lock.acquire(blocking=False)):
            try:
                return self.parallel(*args)
            finally:
                _Kernel._lock.release()
        return self.serial(*args)


ce_hard = _Kernel(_ce_hard)
ce_hard_buffered = _Kernel(_ce_hard_buffered)
ce_soft = _Kernel(_ce_soft)
ce_soft_buffered = _Kernel(_ce_soft_buffered)
nll = _Kernel(_nll)
softmax = _Kernel(_softmax)
softmax_buffered = _Kernel(_softmax_buffered)
logsumexp = _Kernel(_logsumexp)
bce = _Kernel(_bce)
