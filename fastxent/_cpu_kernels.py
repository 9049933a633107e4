"""CPU kernels: Numba loops over rows, one fused pass per row.

Every kernel works on the canonical problem ``_cpu`` makes of its input: the
logits as a 2-D array ``(rows, C)`` (the class axis is the last one) or a 3-D
array ``(A, C, B)`` (the class axis is in the middle, as in PyTorch's
``(N, C, d1, ...)`` layout; row ``r`` is ``x[r // B, :, r % B]``). ``_row``
hides the difference, so each kernel is written once.

There is one cross-entropy kernel per layout strategy (direct rows, blocks,
tiles). Each takes class indices or class probabilities (the other None)
and the options record ``_spec.CEOptions``; both are resolved when compiling,
so a kernel is compiled for what a call uses and nothing else. The loss and
gradient coefficients of a row come from ``_formulas``, shared with the GPU.

A row routine computes, for one row, the max shift, the log-sum-exp, the loss
and (when given somewhere to write it) the gradient. The exponentials are
computed once: they are written into the gradient row, which stays in cache,
and scaled there in a second sweep. Gradients may be written over the logits
(``g is x``): each element is read before it is written.

Results are bit-for-bit reproducible: rows are independent, the losses of
the rows are summed in a fixed order, and every sum inside a row has its
order fixed by the code (the vector loops of ``_lanes``), not left to the
compiler: the fast-math flags leave out ``reassoc``, so the vector width
LLVM picks in one compilation or another (serial, parallel, cached by
another process) cannot change a bit.
"""
from __future__ import annotations

import threading
import types as pytypes

import numba
import numpy as np
from numba import prange, types
from numba.extending import overload

from . import _cache
from . import _formulas as F
from ._fastmath import (FASTMATH, TANH_SMALL, fast_exp, fast_log, fast_tanh, log1p_unit,
                        tanh_small)
from ._half import _bf16_to_f32, _f16_to_f32, _f32_to_bf16, _f32_to_f16
from ._host import scan_hard_targets
from ._lanes import (capped_exp_slopes, capped_exp_sums, capped_grad, exp_sum, exp_sum_inplace,
                     half_exp_sum, half_row_max, lane_dot, row_argmax, row_max, scale_minus,
                     scale_minus_half, soft_sums)
from ._tiles import TILE, tile_dot, tile_exp_sums, tile_in, tile_max, tile_out, tile_scale_minus

# Before any kernel is defined: their cache entries depend on every source
# they inline, not only on this file.
_cache.install()

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


def _next_row(a, r, inner):
    """The row after ``r`` (``r`` itself for the last row): the row to prefetch."""
    raise NotImplementedError  # only called from compiled code


@overload(_next_row, jit_options=_JIT_OPTIONS, inline="always")
def _next_row_impl(a, r, inner):
    if isinstance(a, types.Array) and a.ndim == 2:
        return lambda a, r, inner: a[min(r + 1, a.shape[0] - 1)]
    if isinstance(a, types.Array) and a.ndim == 3:
        return lambda a, r, inner: _row(a, min(r + 1, a.shape[0] * inner - 1), inner)
    return None


def _tile_count(a, inner):
    """Tiles of the rows of a canonical array (see ``_tile``)."""
    raise NotImplementedError  # only called from compiled code


@overload(_tile_count, jit_options=_JIT_OPTIONS, inline="always")
def _tile_count_impl(a, inner):
    if isinstance(a, types.Array) and a.ndim == 2:
        return lambda a, inner: (a.shape[0] + TILE - 1) // TILE
    if isinstance(a, types.Array) and a.ndim == 3:
        def count(a, inner):
            outer = a.shape[0]
            if inner >= TILE:
                return outer * ((inner + TILE - 1) // TILE)
            return inner * ((outer + TILE - 1) // TILE)
        return count
    return None


def _tile(a, k, inner):
    """Tile ``k``: (rows, r0, step), ``rows`` a (n <= TILE, C) view of rows
    r0, r0 + step, ... Consecutive rows of a 2-D array; in the 3-D layout,
    consecutive positions of one slab (a class is then contiguous across
    the tile's rows), or, for slabs narrower than a tile, one position of
    consecutive slabs."""
    raise NotImplementedError  # only called from compiled code


@overload(_tile, jit_options=_JIT_OPTIONS, inline="always")
def _tile_impl(a, k, inner):
    if isinstance(a, types.Array) and a.ndim == 2:
        def rows_2d(a, k, inner):
            r0 = k * TILE
            return a[r0:min(r0 + TILE, a.shape[0])], r0, 1
        return rows_2d
    if isinstance(a, types.Array) and a.ndim == 3:
        def rows_3d(a, k, inner):
            outer = a.shape[0]
            if inner >= TILE:
                per_slab = (inner + TILE - 1) // TILE
                slab, b0 = k // per_slab, k % per_slab * TILE
                return a[slab, :, b0:min(b0 + TILE, inner)].T, slab * inner + b0, 1
            # The positions of one group of slabs in turn: a position's
            # tile reads one element of each cache line the next ones need.
            b, a0 = k % inner, k // inner * TILE
            return a[a0:min(a0 + TILE, outer), :, b], a0 * inner + b, inner
        return rows_3d
    return None


def _span(a, r, s0, n):
    """``a[r, s0:s0 + n]``, or None when ``a`` is None (typed None, not Optional)."""
    raise NotImplementedError  # only called from compiled code


@overload(_span, jit_options=_JIT_OPTIONS, inline="always")
def _span_impl(a, r, s0, n):
    if isinstance(a, types.NoneType):
        return lambda a, r, s0, n: None
    return lambda a, r, s0, n: a[r, s0:s0 + n]


def _at(a, c, default):
    """``a[c]``, or ``default`` when ``a`` is None (resolved when compiling)."""
    raise NotImplementedError  # only called from compiled code


@overload(_at, jit_options=_JIT_OPTIONS, inline="always")
def _at_impl(a, c, default):
    if isinstance(a, types.NoneType):
        return lambda a, c, default: default
    return lambda a, c, default: a[c]


def _label_weight(pw, c, tc, one):
    """BCE's ``1 + (pw[c] - 1) t``, or ``one`` when ``pw`` is None (resolved
    when compiling: the constant then folds out of the formulas using it)."""
    raise NotImplementedError  # only called from compiled code


@overload(_label_weight, jit_options=_JIT_OPTIONS, inline="always")
def _label_weight_impl(pw, c, tc, one):
    if isinstance(pw, types.NoneType):
        return lambda pw, c, tc, one: one
    return lambda pw, c, tc, one: bce_label_weight(pw[c], tc, one)


def _cast_like(value, like):
    """``value`` converted to the float type of ``like`` (an array or a scalar)."""
    raise NotImplementedError  # only called from compiled code


@overload(_cast_like, jit_options=_JIT_OPTIONS, inline="always")
def _cast_like_impl(value, like):
    if getattr(like, "dtype", like) == types.float32:
        return lambda value, like: np.float32(value)
    return lambda value, like: np.float64(value)


# The formulas of ``_formulas``, compiled for the CPU and inlined into
# their callers.
hard_target_row = _jit(F.hard_target_row, inline=True)
soft_target_row = _jit(F.soft_target_row, inline=True)
smoothed_target = _jit(F.smoothed_target, inline=True)
gradient_element = _jit(F.gradient_element, inline=True)
log_sum_exp = _jit(F.log_sum_exp, inline=True)
log_softmax_element = _jit(F.log_softmax_element, inline=True)
softmax_element = _jit(F.softmax_element, inline=True)
nll_row = _jit(F.nll_row, inline=True)
mean_scale = _jit(F.mean_scale, inline=True)
bce_label_weight = _jit(F.bce_label_weight, inline=True)
bce_element = _jit(F.bce_element, inline=True)
softcapped = _jit(F.softcapped, inline=True)
softcap_slope = _jit(F.softcap_slope, inline=True)


@_jit(inline=True)
def _class_weight(w, c):
    """``w[c]`` as float64, or 1 without weights."""
    return np.float64(_at(w, c, 1.0))


@_jit
def _weight_sum(w, n_classes):
    """The sum of the class weights (the number of classes without weights)."""
    if w is None:
        return float(n_classes)
    total = 0.0
    for c in range(n_classes):
        total += w[c]
    return total


# --------------------------------------------------------------------------
# Row routines
#
# Loop shapes that LLVM vectorizes: every loop counts from 0 over one row or
# a slice of it; a loop never reads one argument and writes another that may
# be the same buffer (LLVM's overlap check would fail and run it one element
# at a time), so rows are first copied into the gradient and then worked on
# in place. Sums are the fixed-order vector loops of ``_lanes``.

#: Elements per span of the BCE kernel's loss scratch.
_SPAN = 512

#: Elements of the scratch buffer of the block kernels (fits in L1).
_BUFFER = 4096


@_jit(inline=True)
def _max_pass(x, g, inplace):
    """Row max; copies the row into ``g`` unless ``g`` is None or ``x`` itself.
    Inlined, as the row routines that call it: a call per row costs more than
    a row of a thousand classes' max."""
    if g is None:
        return row_max(x, None)
    if inplace:
        return row_max(g, None)
    return row_max(x, g)


@_jit(inline=True)
def _max_argmax_pass(x, g, inplace):
    """(``_max_pass``, the row's ``torch.argmax``) in the same sweep; a row
    with a NaN is searched again (``_argmax_from``)."""
    if g is None or inplace:
        m, i, nan = row_argmax(x, None)
    else:
        m, i, nan = row_argmax(x, g)
    if nan:
        return m, _argmax_from(x, m)
    return m, max(i, 0)  # -1: every element is -inf, and the first is the argmax


@_jit(inline=True)
def _exp_pass(x, g, m, ahead):
    """sum(exp(x - m)); the exponentials replace ``g``'s copy of the row.
    The row ``ahead`` is prefetched meanwhile."""
    if g is None:
        return exp_sum(x, m, ahead)
    return exp_sum_inplace(g, m, ahead)


@_jit(inline=True)
def _zero(g):
    for c in range(g.shape[0]):
        g[c] = 0.0


@_jit
def _first_hit(row, m, c0, nan_only):
    """The first index from ``c0`` holding ``m`` or a NaN (a NaN only, with
    ``nan_only``), or -1: blocks of 256 tested by vectorized counts (over a
    block's own view: indexing the row there keeps the loop scalar), then
    the block that holds one searched."""
    C = row.shape[0]
    for b0 in range(c0, C, 256):
        block = row[b0:min(b0 + 256, C)]
        hit = np.int32(0)  # an int64 count keeps the loop scalar
        if nan_only:
            for c in range(block.shape[0]):
                hit += np.int32(block[c] != block[c])
        else:
            for c in range(block.shape[0]):
                v = block[c]
                hit += np.int32((v == m) | (v != v))
        if hit:
            for c in range(block.shape[0]):
                v = block[c]
                if v != v or (v == m and not nan_only):
                    return b0 + c
    return -1


@_jit
def _argmax_from(row, m):
    """The first index of the row's maximum, a NaN counting as the maximum
    (``torch.argmax``), from its NaN-skipping max ``m``: the first element
    equal to it or NaN, then a NaN after it, if any."""
    found = _first_hit(row, m, 0, False)
    if found < 0:
        return 0
    if row[found] != row[found]:
        return found
    later = _first_hit(row, row[found], found + 1, True)
    return found if later < 0 else later


@_jit
def _first_argmax(row):
    """The row's ``torch.argmax``."""
    return _max_argmax_pass(row, None, False)[1]


@_jit(inline=True)
def _ce_hard_row(x, g, inplace, t, opts, wsum, scale, ahead, want_argmax):
    """Cross-entropy of one contiguous row against class ``t``; gradient into ``g``.

    The exponentials are kept in ``g`` itself between the two sweeps. The
    next row, ``ahead``, is prefetched during the exponentials: memory
    streams it in while this row is computed in cache. Returns (loss, lse,
    the first argmax of the row or 0 unless ``want_argmax``): the argmax is
    found from the max while the row is still in cache, before the
    exponentials replace it.
    """
    w = opts.weight
    xt = np.float64(x[t])
    if want_argmax:
        m, arg = _max_argmax_pass(x, g, inplace)
    else:
        m, arg = _max_pass(x, g, inplace), 0
    # sum(w * (x - m)), read before the gradient replaces the row
    sx = lane_dot(x, w, m) if opts.smoothing > 0.0 else 0.0
    s = _exp_pass(x, g, m, ahead)
    log_s = np.log(s)
    loss, k1, k2, kt = hard_target_row(np.float64(m), log_s, s, xt, _class_weight(w, t),
                                       wsum, sx, opts, scale, x.shape[0])
    if g is not None:
        scale_minus(g, g, _cast_like(k1, g), _cast_like(k2, g), w)
        g[t] = g[t] - kt
    return loss, log_sum_exp(np.float64(m), log_s), arg


@_jit
def _soft_grad(e, g, q, w, k1, keep_s, uniform_s):
    """g <- e * k1 - (keep_s * q + uniform_s) * w; ``e`` None: the
    exponentials are read from ``g`` (in place)."""
    for c in range(g.shape[0]):
        qc = smoothed_target(q[c], keep_s, uniform_s)
        if w is not None:
            qc = qc * w[c]
        if e is None:
            g[c] = gradient_element(g[c], k1, qc)
        else:
            g[c] = gradient_element(e[c], k1, qc)


@_jit
def _ce_soft_finish(x, e, m, log_s, s, q, opts, scale, g):
    """Loss of a row against probabilities ``q``; gradient into ``g``.

    With q'_c = (1-eps) q_c + eps/C (times w_c with weights) and S = sum q'_c:
    loss = S lse - sum_c q'_c x_c = S log(s) - sum_c q'_c (x_c - m),
    grad = scale * (S p_c - q'_c). ``x`` must still hold the logits; ``e``
    holds exp(x - m), or is None when they are in ``g``.
    """
    C = x.shape[0]
    w, smooth = opts.weight, opts.smoothing
    keep = _cast_like(1.0 - smooth, x)
    uniform = _cast_like(smooth / C, x)
    total, qxm = soft_sums(x, q, w, keep, uniform, m, None)
    loss, k1 = soft_target_row(np.float64(m), log_s, s, total, qxm, opts, scale)
    if g is not None:
        _soft_grad(e, g, q, w, _cast_like(k1, g), _cast_like(scale * (1.0 - smooth), g),
                   _cast_like(scale * smooth / C, g))
    return loss


@_jit(inline=True)
def _ce_soft_row(x, g, inplace, q, opts, scale, ahead, q_ahead, want_argmax):
    """Cross-entropy of one contiguous row against probabilities ``q``
    (``ahead`` and the result as in ``_ce_hard_row``; ``q_ahead``, the next
    row of probabilities, is prefetched while this one's are summed)."""
    if want_argmax:
        m, arg = _max_argmax_pass(x, g, inplace)
    else:
        m, arg = _max_pass(x, g, inplace), 0
    C = x.shape[0]
    w, smooth = opts.weight, opts.smoothing
    keep = _cast_like(1.0 - smooth, x)
    uniform = _cast_like(smooth / C, x)
    # The sums read the logits before the exponentials replace them.
    total, qxm = soft_sums(x, q, w, keep, uniform, m, q_ahead)
    s = _exp_pass(x, g, m, ahead)
    log_s = np.log(s)
    loss, k1 = soft_target_row(np.float64(m), log_s, s, total, qxm, opts, scale)
    if g is not None:
        _soft_grad(None, g, q, w, _cast_like(k1, g), _cast_like(scale * (1.0 - smooth), g),
                   _cast_like(scale * smooth / C, g))
    return loss, log_sum_exp(np.float64(m), log_s), arg


@_jit
def _log_block(s):
    log_s = np.empty(s.shape[0])
    for i in range(s.shape[0]):  # one vectorized log for the block
        log_s[i] = fast_log(s[i])
    return log_s


@_jit
def _exp_wide(x, r0, n, inner):
    """Exponentials of a block of ``n`` rows from ``r0``: (e, m, s, log_s),
    e[i, c] = exp(x[r0+i, c] - m[i]) as a contiguous (n, C) array, the rows'
    max m, sums s (float64) and log(s). Rows are copied shifted into ``e``
    and exponentiated in one flat vector sweep."""
    C = x.shape[1]
    e = np.empty((n, C), x.dtype)
    m = np.empty(n, x.dtype)
    s = np.empty(n)
    for i in range(n):
        xr = _row(x, r0 + i, inner)
        mi = row_max(xr, None)
        m[i] = mi
        er = e[i]
        for c in range(C):
            er[c] = xr[c] - mi
    flat = e.reshape(n * C)
    for k in range(n * C):
        flat[k] = fast_exp(flat[k])
    for i in range(n):
        s[i] = lane_dot(e[i], None, 0.0)
    return e, m, s, _log_block(s)


@_jit
def _rows_per_block(C):
    """Rows per block of the block kernels: about _BUFFER elements."""
    return max(1, _BUFFER // C)


# --------------------------------------------------------------------------
# Rows and blocks of rows. A kernel's prange body calls exactly one of these
# and stores what it returns into an argument array: Numba's parfor pass may
# drop writes through array views made inside the loop body itself.
#
# Two shapes of each: "direct" routines take one contiguous row of many
# classes and keep the exponentials in the gradient row itself; "block"
# routines take blocks of rows of any length and layout and compute the
# exponentials in a scratch buffer (see ``_exp_wide``). Short rows, and most
# rows whose classes are strided, go through the tiled routines below
# instead. ``_cpu.py`` picks.


def _by_targets(y, hard, soft):
    """The overload implementation for class indices (``y`` an array: ``hard``)
    or class probabilities (``y`` None: ``soft``), chosen when compiling.
    (``if y is None`` would not do: Numba prunes that branch only where ``y``
    is None, and would type the probabilities' branch with ``q`` None.)"""
    return soft if isinstance(y, types.NoneType) else hard


def _ce_direct(x, y, q, opts, wsum, scale, g, inplace, inner, r):
    """Cross-entropy of row ``r`` against its class index (``y``) or its
    class probabilities (``q``; the other is None); gradient into ``g``'s row."""
    raise NotImplementedError  # only called from compiled code


def _ce_hard_direct(x, y, q, opts, wsum, scale, g, inplace, inner, r):
    # The views are made in the calls' arguments, as everywhere here: bound
    # to names first, the inlined row routine's last store was lost.
    t = y[r]
    if t == opts.ignore_index:
        if g is not None:
            _zero(_row(g, r, inner))
        return 0.0
    if g is None:
        return _ce_hard_row(_row(x, r, inner), None, False, t, opts, wsum, scale,
                            _next_row(x, r, inner), False)[0]
    return _ce_hard_row(_row(x, r, inner), _row(g, r, inner), inplace, t, opts, wsum, scale,
                        _next_row(x, r, inner), False)[0]


def _ce_soft_direct(x, y, q, opts, wsum, scale, g, inplace, inner, r):
    if g is None:
        return _ce_soft_row(_row(x, r, inner), None, False, _row(q, r, inner), opts, scale,
                            _next_row(x, r, inner), _next_row(q, r, inner), False)[0]
    return _ce_soft_row(_row(x, r, inner), _row(g, r, inner), inplace, _row(q, r, inner), opts,
                        scale, _next_row(x, r, inner), _next_row(q, r, inner), False)[0]


overload(_ce_direct, jit_options=_JIT_OPTIONS)(
    lambda x, y, q, opts, wsum, scale, g, inplace, inner, r:
    _by_targets(y, _ce_hard_direct, _ce_soft_direct))


@_jit
def _ce_hard_rows(x, y, opts, wsum, scale, g, losses, inner, r0, n, e, m, s, log_s, lse):
    """Losses and gradients of a block of rows whose exponentials are ``e``
    (and their log-sum-exp into ``lse``, unless it is None)."""
    C = x.shape[1]
    w, smooth, ignore_index = opts.weight, opts.smoothing, opts.ignore_index
    for i in range(n):
        r = r0 + i
        if lse is not None and lse.shape[0] > 0:
            lse[r] = log_sum_exp(np.float64(m[i]), log_s[i])
        t = y[r]
        if t == ignore_index:
            losses[r] = 0.0
            if g is not None:
                _zero(_row(g, r, inner))
            continue
        xr = _row(x, r, inner)
        sx = lane_dot(xr, w, m[i]) if smooth > 0.0 else 0.0
        loss, k1, k2, kt = hard_target_row(np.float64(m[i]), log_s[i], s[i], np.float64(xr[t]),
                                           _class_weight(w, t), wsum, sx, opts, scale, C)
        losses[r] = loss
        if g is not None:
            gr = _row(g, r, inner)
            scale_minus(e[i], gr, _cast_like(k1, gr), _cast_like(k2, gr), w)
            gr[t] = gr[t] - kt


@_jit
def _ce_soft_rows(x, q, opts, scale, g, losses, inner, r0, n, e, m, s, log_s, lse):
    for i in range(n):
        r = r0 + i
        if lse is not None and lse.shape[0] > 0:
            lse[r] = log_sum_exp(np.float64(m[i]), log_s[i])
        if g is None:
            losses[r] = _ce_soft_finish(_row(x, r, inner), e[i], m[i], log_s[i], s[i],
                                        _row(q, r, inner), opts, scale, None)
        else:
            losses[r] = _ce_soft_finish(_row(x, r, inner), e[i], m[i], log_s[i], s[i],
                                        _row(q, r, inner), opts, scale, _row(g, r, inner))


def _ce_block(x, y, q, opts, wsum, scale, g, losses, inner, r0, n, lse):
    """Cross-entropy of the ``n`` rows from ``r0`` (see ``_ce_direct``);
    their log-sum-exp into ``lse`` unless it is None."""
    raise NotImplementedError  # only called from compiled code


def _ce_hard_block(x, y, q, opts, wsum, scale, g, losses, inner, r0, n, lse):
    e, m, s, log_s = _exp_wide(x, r0, n, inner)
    _ce_hard_rows(x, y, opts, wsum, scale, g, losses, inner, r0, n, e, m, s, log_s, lse)


def _ce_soft_block(x, y, q, opts, wsum, scale, g, losses, inner, r0, n, lse):
    e, m, s, log_s = _exp_wide(x, r0, n, inner)
    _ce_soft_rows(x, q, opts, scale, g, losses, inner, r0, n, e, m, s, log_s, lse)


overload(_ce_block, jit_options=_JIT_OPTIONS)(
    lambda x, y, q, opts, wsum, scale, g, losses, inner, r0, n, lse:
    _by_targets(y, _ce_hard_block, _ce_soft_block))


@_jit
def _nll_direct(lp, y, w, ignore_index, inner, r):
    t = y[r]
    if t == ignore_index:
        return 0.0
    return nll_row(np.float64(_row(lp, r, inner)[t]), _class_weight(w, t))


@_jit
def _softmax_direct(x, out, inplace, inner, log, r):
    o = _row(out, r, inner)
    if log:
        # o <- (x - m) - log(sum exp(x - m)), rounded as torch.log_softmax
        if inplace:
            m = row_max(o, None)
            log_s = _cast_like(np.log(exp_sum(o, m, _next_row(out, r, inner))), o)
            for c in range(o.shape[0]):
                o[c] = log_softmax_element(o[c], m, log_s)
        else:
            xr = _row(x, r, inner)
            m = row_max(xr, None)
            log_s = _cast_like(np.log(exp_sum(xr, m, _next_row(out, r, inner))), o)
            for c in range(o.shape[0]):
                o[c] = log_softmax_element(xr[c], m, log_s)
    else:
        xr = _row(x, r, inner)
        m = _max_pass(xr, o, inplace)
        # the row the next max pass reads
        inv_s = _cast_like(1.0 / exp_sum_inplace(o, m, _next_row(x, r, inner)), o)
        for c in range(o.shape[0]):
            o[c] = softmax_element(o[c], inv_s)


@_jit
def _softmax_rows(x, out, inner, log, r0, n, e, m, s, log_s):
    C = x.shape[1]
    for i in range(n):
        o = _row(out, r0 + i, inner)
        if log:
            xr = _row(x, r0 + i, inner)
            mi = m[i]
            ls = _cast_like(log_s[i], o)
            for c in range(C):
                o[c] = log_softmax_element(xr[c], mi, ls)
        else:
            er = e[i]
            inv_s = _cast_like(1.0 / s[i], o)
            for c in range(C):
                o[c] = softmax_element(er[c], inv_s)


@_jit
def _softmax_block(x, out, inner, log, r0, n):
    e, m, s, log_s = _exp_wide(x, r0, n, inner)
    _softmax_rows(x, out, inner, log, r0, n, e, m, s, log_s)


@_jit(inline=True)
def _lse(m, log_s, row):
    """logsumexp of ``row`` from its max and log(sum exp(row - m)) (see
    ``log_sum_exp``). The max skips NaN, so a row whose max is infinite is
    looked at again for one (rare)."""
    if np.isinf(m):
        for c in range(row.shape[0]):
            if np.isnan(row[c]):
                return np.nan
    return log_sum_exp(np.float64(m), log_s)


@_jit
def _logsumexp_direct(x, inner, r):
    xr = _row(x, r, inner)
    m = row_max(xr, None)
    return _lse(m, np.log(exp_sum(xr, m, _next_row(x, r, inner))), xr)


@_jit
def _logsumexp_block(x, out, inner, r0, n):
    e, m, s, log_s = _exp_wide(x, r0, n, inner)
    for i in range(n):
        out[r0 + i] = _lse(m[i], log_s[i], _row(x, r0 + i, inner))


# --------------------------------------------------------------------------
# Tiles: TILE rows at a time, transposed (see ``_tiles``): per-row values
# are vectors across the rows. A task is a run of tiles sharing one set of
# scratch arrays. ``_cpu.py`` decides which rows take them.

#: Elements per task of the tiled kernels.
_TASK_ELEMENTS = 1 << 15


@_jit
def _tiles_per_task(C):
    return max(1, _TASK_ELEMENTS // (TILE * max(C, 1)))


@_jit
def _lane_arrays(like):
    """Four per-row arrays of a tile, of the array ``like``'s type (zeros: the
    lanes past a short tile's rows then hold ordinary numbers)."""
    a = np.zeros((4, TILE), like.dtype)
    return a[0], a[1], a[2], a[3]


@_jit
def _tile_buffer(x):
    """Scratch for one tile of ``x``'s rows: (C rounded up to TILE, TILE)."""
    C = x.shape[1]
    return np.zeros(((C + TILE - 1) // TILE * TILE, TILE), x.dtype)


def _ce_hard_tiles(x, y, q, opts, wsum, scale, g, losses, inner, k0, k1, lse):
    """Cross-entropy against class indices for tiles k0 .. k1 - 1.

    The per-row work runs over all ``TILE`` lanes without branches (lanes
    past the tile's rows and ignored rows take class 0 and are dropped at
    the end), so that LLVM turns it into vector code."""
    C = x.shape[1]
    w, smooth, ignore_index = opts.weight, opts.smoothing, opts.ignore_index
    t = _tile_buffer(x)
    tc = t[:C]
    m, a1, a2, at = _lane_arrays(x)
    s, log_s, sx, xt = _lane_arrays(losses)
    loss = np.zeros(TILE)
    unused = np.zeros(TILE)
    target = np.zeros(TILE, np.int64)
    keep = np.zeros(TILE, np.bool_)
    for k in range(k0, k1):
        rows, r0, step = _tile(x, k, inner)
        n = rows.shape[0]
        tile_in(rows, t)
        for i in range(TILE):  # the target logits, before the exponentials replace them
            tgt = y[r0 + min(i, n - 1) * step]
            keep[i] = i < n and tgt != ignore_index
            target[i] = tgt if keep[i] else 0
            xt[i] = t[target[i], i]
        tile_max(tc, m)
        if smooth > 0.0:
            tile_dot(tc, None, w, 0.0, 1.0, m, unused, sx)
        tile_exp_sums(tc, m, s, log_s, g is not None)
        for i in range(TILE):
            loss[i], a1[i], a2[i], at[i] = hard_target_row(np.float64(m[i]), log_s[i], s[i],
                                                           xt[i], _class_weight(w, target[i]),
                                                           wsum, sx[i], opts, scale, C)
        for i in range(n):
            losses[r0 + i * step] = loss[i] if keep[i] else 0.0
            if lse is not None and lse.shape[0] > 0:
                lse[r0 + i * step] = log_sum_exp(np.float64(m[i]), log_s[i])
        if g is not None:
            tile_scale_minus(tc, a1, a2, w, None, 0.0)
            for i in range(n):
                if keep[i]:
                    t[target[i], i] = t[target[i], i] - at[i]
                else:  # ignored rows: 0, even for NaN logits
                    for c in range(C):
                        t[c, i] = 0.0
            tile_out(t, _tile(g, k, inner)[0])


def _ce_soft_tiles(x, y, q, opts, wsum, scale, g, losses, inner, k0, k1, lse):
    """Cross-entropy against probabilities for tiles k0 .. k1 - 1."""
    C = x.shape[1]
    w, smooth = opts.weight, opts.smoothing
    t, qt = _tile_buffer(x), _tile_buffer(x)
    tc, qc = t[:C], qt[:C]
    m, a1, a2, _ = _lane_arrays(x)
    a2[:] = scale * smooth / C
    s, log_s, total, qxm = _lane_arrays(losses)
    loss = np.zeros(TILE)
    keep, uniform = _cast_like(1.0 - smooth, x), _cast_like(smooth / C, x)
    keep_s = _cast_like(scale * (1.0 - smooth), x)
    for k in range(k0, k1):
        rows, r0, step = _tile(x, k, inner)
        tile_in(rows, t)
        tile_in(_tile(q, k, inner)[0], qt)
        tile_max(tc, m)
        tile_dot(tc, qc, w, keep, uniform, m, total, qxm)
        tile_exp_sums(tc, m, s, log_s, g is not None)
        for i in range(TILE):  # every lane: no branch, vector code
            loss[i], a1[i] = soft_target_row(np.float64(m[i]), log_s[i], s[i], total[i], qxm[i],
                                             opts, scale)
        for i in range(rows.shape[0]):
            losses[r0 + i * step] = loss[i]
            if lse is not None and lse.shape[0] > 0:
                lse[r0 + i * step] = log_sum_exp(np.float64(m[i]), log_s[i])
        if g is not None:
            tile_scale_minus(tc, a1, a2, w, qc, keep_s)
            tile_out(t, _tile(g, k, inner)[0])


def _ce_tiles(x, y, q, opts, wsum, scale, g, losses, inner, k0, k1, lse):
    """Cross-entropy for tiles k0 .. k1 - 1 (see ``_ce_direct``)."""
    raise NotImplementedError  # only called from compiled code


overload(_ce_tiles, jit_options=_JIT_OPTIONS)(
    lambda x, y, q, opts, wsum, scale, g, losses, inner, k0, k1, lse:
    _by_targets(y, _ce_hard_tiles, _ce_soft_tiles))


@_jit
def _softmax_tiles(x, out, inner, log, k0, k1):
    """softmax or log_softmax for tiles k0 .. k1 - 1."""
    C = x.shape[1]
    t = _tile_buffer(x)
    tc = t[:C]
    m, a1, a2 = np.zeros(TILE, x.dtype), np.ones(TILE, x.dtype), np.zeros(TILE, x.dtype)
    inv_s = np.zeros(TILE, x.dtype)
    s, log_s = np.zeros(TILE), np.zeros(TILE)
    for k in range(k0, k1):
        tile_in(_tile(x, k, inner)[0], t)
        tile_max(tc, m)
        if log:
            # (x - m) - log(s), rounded as torch.log_softmax: two sweeps
            tile_exp_sums(tc, m, s, log_s, False)
            tile_scale_minus(tc, a1, m, None, None, 0.0)
            for i in range(TILE):
                a2[i] = log_s[i]
            tile_scale_minus(tc, a1, a2, None, None, 0.0)
        else:
            tile_exp_sums(tc, m, s, log_s, True)
            for i in range(TILE):
                inv_s[i] = 1.0 / s[i]
            tile_scale_minus(tc, inv_s, a2, None, None, 0.0)
        tile_out(t, _tile(out, k, inner)[0])


@_jit
def _logsumexp_tiles(x, out, inner, k0, k1):
    """logsumexp (see ``_lse``) for tiles k0 .. k1 - 1."""
    C = x.shape[1]
    t = _tile_buffer(x)
    tc = t[:C]
    m = np.zeros(TILE, x.dtype)
    s, log_s = np.zeros(TILE), np.zeros(TILE)
    for k in range(k0, k1):
        rows, r0, step = _tile(x, k, inner)
        tile_in(rows, t)
        tile_max(tc, m)
        tile_exp_sums(tc, m, s, log_s, False)
        for i in range(rows.shape[0]):
            out[r0 + i * step] = _lse(m[i], log_s[i], tc[:, i])


@_jit(inline=True)
def _bce_element(xc, tc, w, pw, c):
    """(loss, gradient) of binary cross-entropy with logits for element ``c``
    (``bce_element``), times its weight. Constants in the logits' type keep
    float32 math in float32."""
    one = _cast_like(1.0, tc)
    e = fast_exp(-np.abs(xc))
    # an overload, not ``if pw is not None``: inlined, the test would not be pruned
    lw = _label_weight(pw, c, tc, one)
    loss, grad = bce_element(xc, tc, lw, e, log1p_unit(e), one)
    wc = _at(w, c, one)
    return loss * wc, grad * wc


@_jit
def _bce_span(x, t, w, pw, scale, g, losses):
    """BCE of one span of a row: losses into ``losses``, gradient into ``g``
    (an elementwise loop: the sum is taken afterwards, so it vectorizes)."""
    scale = _cast_like(scale, t)
    for c in range(t.shape[0]):
        loss, grad = _bce_element(x[c], t[c], w, pw, c)
        losses[c] = loss
        if g is not None:
            g[c] = grad * scale


@_jit
def _bce_span_inplace(g, t, w, pw, scale, losses):
    """``_bce_span`` with the gradient replacing the logits in ``g``: one
    array read and written, where two arguments that happen to be the same
    buffer would fail LLVM's overlap check and run element by element."""
    scale = _cast_like(scale, t)
    for c in range(t.shape[0]):
        loss, grad = _bce_element(g[c], t[c], w, pw, c)
        losses[c] = loss
        g[c] = grad * scale


@_jit(inline=True)
def _bce_span_into(x, t, w, pw, scale, g, inplace, r, s0, n, dest):
    """BCE of ``n`` elements of row ``r`` from ``s0``: losses into ``dest``."""
    ts, ws, pws = _span(t, r, s0, n), _span(w, r, s0, n), _span(pw, r, s0, n)
    if g is None:
        _bce_span(_span(x, r, s0, n), ts, ws, pws, scale, None, dest)
    elif inplace:
        _bce_span_inplace(_span(g, r, s0, n), ts, ws, pws, scale, dest)
    else:
        _bce_span(_span(x, r, s0, n), ts, ws, pws, scale, _span(g, r, s0, n), dest)


@_jit
def bce_tasks(n_rows, n_cols, seg):
    """(rows per task, tasks per row, tasks) of the BCE kernel: a task is
    about ``seg`` elements, a column segment of one long row or whole short
    rows, so that few long rows and many short ones both spread over the
    threads with little per-task overhead."""
    per_row = max(1, (n_cols + seg - 1) // seg)
    rows_per = max(1, seg // max(n_cols, 1)) if per_row == 1 else 1
    return rows_per, per_row, (n_rows + rows_per - 1) // rows_per * per_row


@_jit
def _bce_task(x, t, w, pw, scale, g, out, inplace, r0, r1, b0, b1):
    """Loss sum of elements [b0, b1) of rows [r0, r1), in spans of _SPAN.

    With ``out`` (reduction "none") the elements' losses go there and no sum
    is taken; otherwise they fill a scratch span, summed each time it fills
    (in a fixed order: short rows share one vector sum).
    """
    total = 0.0
    if out is not None:
        for r in range(r0, r1):
            for s0 in range(b0, b1, _SPAN):
                n = min(_SPAN, b1 - s0)
                _bce_span_into(x, t, w, pw, scale, g, inplace, r, s0, n, out[r, s0:s0 + n])
        return total
    scratch = np.empty(_SPAN, t.dtype)
    fill = 0
    for r in range(r0, r1):
        for s0 in range(b0, b1, _SPAN):
            n = min(_SPAN, b1 - s0)
            if fill + n > _SPAN:
                total += lane_dot(scratch[:fill], None, 0.0)
                fill = 0
            _bce_span_into(x, t, w, pw, scale, g, inplace, r, s0, n, scratch[fill:fill + n])
            fill += n
    return total + lane_dot(scratch[:fill], None, 0.0)


# --------------------------------------------------------------------------
# Transformed logits and row statistics. A call with ``logit_scale``,
# ``softcap`` or ``return_stats`` goes through these routines, chosen when
# compiling, so that the plain kernels are unchanged: it passes the arrays
# ``lse_out`` and ``predicted`` (None for the plain kernels; of no rows when
# no statistics are asked for), and ``opts.logit_scale``, ``opts.softcap``.
# Which options a call uses is decided at run time, so that one more
# compiled variant of each kernel serves them all. (Arrays and floats, not
# tuples: a parallel kernel's arguments cannot be tuples of arrays.) A row's transformed logits z are written where
# its gradient goes (or into a scratch row when there is no gradient), the
# plain routine runs in place on them, and the gradient is then multiplied by
# dz/dx (kept in a scratch row: the backward needs nothing else); without a
# cap dz/dx is the scale, folded into the gradient's coefficients. Blocks and
# tiles transform their rows into a contiguous scratch block and run the
# plain routine on it. ``predicted`` is taken from the logits as given,
# before anything is written.


def _field(record, name):
    """The Numba type of field ``name`` of a NamedTuple type."""
    return dict(zip(record.fields, record.types))[name]


def _plain(opts, lse_out):
    """Whether a call needs none of the routines below (a compile-time test)."""
    return isinstance(lse_out, types.NoneType)


@_jit
def _count_big(x, a, limit):
    """How many |a x| reach ``limit`` (an int32 count: an int64 one keeps
    the loop scalar)."""
    big = np.int32(0)
    for c in range(x.shape[0]):
        big += np.int32(np.abs(x[c] * a) >= limit)
    return big


@_jit
def _capped_block(x, z, dz, a, b, k, inv, same):
    """z <- b tanh(a x) (dz <- dz/dx unless empty) for a block of a row; the
    polynomial alone where every |a x| is below ``TANH_SMALL`` (logits far
    from the cap, the usual case: no exponential, no division). ``same``:
    ``x`` is ``z``, and the loops read ``z`` alone (a loop that reads and
    writes two names for one array fails LLVM's overlap test and runs scalar)."""
    n = z.shape[0]
    small = _count_big(z if same else x, a, _cast_like(TANH_SMALL, z)) == 0
    if dz.shape[0] > 0:
        if same and small:
            for c in range(n):
                zc = softcapped(tanh_small(z[c] * a), b)
                z[c] = zc
                dz[c] = softcap_slope(zc, k, inv)
        elif same:
            for c in range(n):
                zc = softcapped(fast_tanh(z[c] * a), b)
                z[c] = zc
                dz[c] = softcap_slope(zc, k, inv)
        elif small:
            for c in range(n):
                zc = softcapped(tanh_small(x[c] * a), b)
                z[c] = zc
                dz[c] = softcap_slope(zc, k, inv)
        else:
            for c in range(n):
                zc = softcapped(fast_tanh(x[c] * a), b)
                z[c] = zc
                dz[c] = softcap_slope(zc, k, inv)
    elif same and small:
        for c in range(n):
            z[c] = softcapped(tanh_small(z[c] * a), b)
    elif same:
        for c in range(n):
            z[c] = softcapped(fast_tanh(z[c] * a), b)
    elif small:
        for c in range(n):
            z[c] = softcapped(tanh_small(x[c] * a), b)
    else:
        for c in range(n):
            z[c] = softcapped(fast_tanh(x[c] * a), b)


@_jit
def _transform(x, z, dz, logit_scale, cap, same):
    """z <- logit_scale x, or cap tanh(logit_scale x / cap) when ``cap`` is
    not 0 (``same``: z is x); dz <- dz/dx unless ``dz`` is empty. Loops read
    one array, or two distinct ones (see above)."""
    C = z.shape[0]
    if cap != 0.0:
        a, b = _cast_like(logit_scale / cap, z), _cast_like(cap, z)
        k, inv = _cast_like(logit_scale, z), _cast_like(1.0 / cap, z)
        for b0 in range(0, C, 256):
            b1 = min(b0 + 256, C)
            d = dz[b0:b1] if dz.shape[0] > 0 else dz
            _capped_block(x[b0:b1], z[b0:b1], d, a, b, k, inv, same)
    else:
        k = _cast_like(logit_scale, z)
        if same:
            for c in range(C):
                z[c] = z[c] * k
        else:
            for c in range(C):
                z[c] = x[c] * k


@_jit
def _times(g, dz):
    for c in range(g.shape[0]):
        g[c] = g[c] * dz[c]


@_jit
def _chain_out(g, dldz, dz, cap):
    """g <- dL/dz times dz/dx: ``dz`` where capped, else already folded in."""
    if cap != 0.0:
        for c in range(g.shape[0]):
            g[c] = dldz[c] * dz[c]
    else:
        for c in range(g.shape[0]):
            g[c] = dldz[c]


def _part(a, r0, n, step):
    """``a[r0 : r0 + n step : step]``, or None when ``a`` is None."""
    raise NotImplementedError  # only called from compiled code


@overload(_part, jit_options=_JIT_OPTIONS, inline="always")
def _part_impl(a, r0, n, step):
    if isinstance(a, types.NoneType):
        return lambda a, r0, n, step: None
    return lambda a, r0, n, step: a[r0:r0 + (n - 1) * step + 1:step]


def _gathered(q, k, inner, buf):
    """The rows of tile ``k`` of probabilities ``q`` copied into ``buf``'s
    first rows, or None when ``q`` is None."""
    raise NotImplementedError  # only called from compiled code


@overload(_gathered, jit_options=_JIT_OPTIONS)
def _gathered_impl(q, k, inner, buf):
    if isinstance(q, types.NoneType):
        return lambda q, k, inner, buf: None

    def copy(q, k, inner, buf):
        rows = _tile(q, k, inner)[0]
        n, C = rows.shape
        for i in range(n):
            for c in range(C):
                buf[i, c] = rows[i, c]
        return buf[:n]
    return copy


def _q_rows(q, r0, n, inner):
    """(n, C) rows ``r0 ..`` of probabilities ``q`` as a new array, or None."""
    raise NotImplementedError  # only called from compiled code


@overload(_q_rows, jit_options=_JIT_OPTIONS)
def _q_rows_impl(q, r0, n, inner):
    if isinstance(q, types.NoneType):
        return lambda q, r0, n, inner: None

    def copy(q, r0, n, inner):
        out = np.empty((n, q.shape[1]), q.dtype)
        for i in range(n):
            qr = _row(q, r0 + i, inner)
            for c in range(q.shape[1]):
                out[i, c] = qr[c]
        return out
    return copy


# The row routines as calls: the routines below make their row views
# themselves, which an inlined ``_ce_hard_row`` mishandles (see ``_ce_hard_direct``).
_ce_hard_row_called = _jit(_ce_hard_row.py_func)
_ce_soft_row_called = _jit(_ce_soft_row.py_func)


@_jit
def _capped_hard_row(xr, gr, inplace, t, opts, wsum, scale, ahead, want):
    """``_hard_row_any`` under a softcap with a positive logit scale, in two
    sweeps of the row after its max, as the plain routine. tanh is
    increasing, so the capped row's max is the cap of the row's max. The
    first sweep caps the logits and sums their exponentials; without label
    smoothing it stores exp(z - m) times the cap's slope, and the second
    sweep is one product (k1, the slope's logit scale folded in); with it,
    the first stores the capped logits and sums them, weighted, and the
    second recomputes the exponentials from them."""
    cap = opts.softcap
    a = _cast_like(opts.logit_scale / cap, xr)
    b, inv = _cast_like(cap, xr), _cast_like(1.0 / cap, xr)
    k = _cast_like(opts.logit_scale, xr)
    w = opts.weight
    if want:  # of the logits as given
        mx, arg = _max_argmax_pass(xr, None, False)
    else:
        mx, arg = row_max(xr, None), 0
    m = softcapped(fast_tanh(mx * a), b)
    zt = softcapped(fast_tanh(xr[t] * a), b)  # read before the row is overwritten
    smoothing = opts.smoothing > 0.0
    dot = 0.0
    if gr is None:
        s, dot = capped_exp_sums(xr, None, w, a, b, m, ahead)
    elif smoothing:
        s, dot = capped_exp_sums(xr, gr, w, a, b, m, ahead)
    else:
        s = capped_exp_slopes(xr, gr, a, b, m, ahead)
    log_s = np.log(s)
    loss, k1, k2, kt = hard_target_row(np.float64(m), log_s, s, np.float64(zt),
                                       _class_weight(w, t), wsum, dot if smoothing else 0.0,
                                       opts, scale, xr.shape[0])
    if gr is not None:
        if smoothing:
            capped_grad(gr, w, _cast_like(k1, gr), _cast_like(k2, gr), m, inv, k)
        else:
            scale_minus(gr, gr, _cast_like(k1 * opts.logit_scale, gr), _cast_like(0.0, gr), None)
        gr[t] = gr[t] - _cast_like(kt, gr) * softcap_slope(zt, k, inv)
    return loss, log_sum_exp(np.float64(m), log_s), arg


@_jit
def _hard_row_any(xr, gr, inplace, t, opts, wsum, scale, ahead, want, scratch):
    """(loss, lse, argmax or 0 unless ``want``) of a contiguous row against
    class ``t``, its logits transformed by the options' logit_scale and
    softcap; gradient into ``gr``. ``scratch``: a row of the row's length,
    for the transformed logits (no gradient) or their derivative."""
    logit_scale, cap = opts.logit_scale, opts.softcap
    if logit_scale == 1.0 and cap == 0.0:
        return _ce_hard_row_called(xr, gr, inplace, t, opts, wsum, scale, ahead, want)
    if cap != 0.0 and logit_scale > 0.0:
        return _capped_hard_row(xr, gr, inplace, t, opts, wsum, scale, ahead, want)
    arg = _first_argmax(xr) if want else 0  # of the logits as given
    C = xr.shape[0]
    if gr is None:
        z = scratch
        _transform(xr, z, z[:0], logit_scale, cap, False)
        loss, lse, _ = _ce_hard_row_called(z, None, False, t, opts, wsum, scale, ahead, False)
        return loss, lse, arg
    dz = scratch[:C if cap != 0.0 else 0]
    _transform(xr, gr, dz, logit_scale, cap, inplace)
    if cap == 0.0:  # dz/dx = logit_scale: folded into the coefficients
        loss, lse, _ = _ce_hard_row_called(gr, gr, True, t, opts, wsum, scale * logit_scale,
                                           ahead, False)
        return loss, lse, arg
    loss, lse, _ = _ce_hard_row_called(gr, gr, True, t, opts, wsum, scale, ahead, False)
    _times(gr, dz)
    return loss, lse, arg


@_jit
def _soft_row_any(xr, gr, inplace, qr, opts, scale, ahead, q_ahead, want, scratch):
    """``_hard_row_any`` against probabilities ``qr``."""
    logit_scale, cap = opts.logit_scale, opts.softcap
    if logit_scale == 1.0 and cap == 0.0:
        return _ce_soft_row_called(xr, gr, inplace, qr, opts, scale, ahead, q_ahead, want)
    arg = _first_argmax(xr) if want else 0
    C = xr.shape[0]
    if gr is None:
        z = scratch
        _transform(xr, z, z[:0], logit_scale, cap, False)
        loss, lse, _ = _ce_soft_row_called(z, None, False, qr, opts, scale, ahead, q_ahead,
                                           False)
        return loss, lse, arg
    dz = scratch[:C if cap != 0.0 else 0]
    _transform(xr, gr, dz, logit_scale, cap, inplace)
    if cap == 0.0:
        loss, lse, _ = _ce_soft_row_called(gr, gr, True, qr, opts, scale * logit_scale, ahead,
                                           q_ahead, False)
        return loss, lse, arg
    loss, lse, _ = _ce_soft_row_called(gr, gr, True, qr, opts, scale, ahead, q_ahead, False)
    _times(gr, dz)
    return loss, lse, arg


def _ce_hard_direct_rows(x, y, q, opts, wsum, scale, g, inplace, inner, r0, r1, losses, lse_out,
                         predicted):
    want = lse_out.shape[0] > 0
    scratch = np.empty(x.shape[1], x.dtype)
    for r in range(r0, r1):
        t = y[r]
        if t == opts.ignore_index:
            losses[r] = 0.0
            if want:  # the row's statistics all the same (any class will do)
                _, lse, arg = _hard_row_any(_row(x, r, inner), None, False, 0, opts, wsum, scale,
                                            _next_row(x, r, inner), True, scratch)
                lse_out[r], predicted[r] = lse, arg
            if g is not None:
                _zero(_row(g, r, inner))
            continue
        if g is None:
            loss, lse, arg = _hard_row_any(_row(x, r, inner), None, False, t, opts, wsum, scale,
                                           _next_row(x, r, inner), want, scratch)
        else:
            loss, lse, arg = _hard_row_any(_row(x, r, inner), _row(g, r, inner), inplace, t, opts,
                                           wsum, scale, _next_row(x, r, inner), want, scratch)
        losses[r] = loss
        if want:
            lse_out[r], predicted[r] = lse, arg


def _ce_soft_direct_rows(x, y, q, opts, wsum, scale, g, inplace, inner, r0, r1, losses, lse_out,
                         predicted):
    want = lse_out.shape[0] > 0
    scratch = np.empty(x.shape[1], x.dtype)
    for r in range(r0, r1):
        if g is None:
            loss, lse, arg = _soft_row_any(_row(x, r, inner), None, False, _row(q, r, inner),
                                           opts, scale, _next_row(x, r, inner),
                                           _next_row(q, r, inner), want, scratch)
        else:
            loss, lse, arg = _soft_row_any(_row(x, r, inner), _row(g, r, inner), inplace,
                                           _row(q, r, inner), opts, scale, _next_row(x, r, inner),
                                           _next_row(q, r, inner), want, scratch)
        losses[r] = loss
        if want:
            lse_out[r], predicted[r] = lse, arg


def _ce_direct_rows(x, y, q, opts, wsum, scale, g, inplace, inner, r0, r1, losses, lse_out,
                    predicted):
    """Rows ``r0 .. r1 - 1`` as ``_ce_direct``, with the options and statistics
    above; one scratch row serves them all."""
    raise NotImplementedError  # only called from compiled code


overload(_ce_direct_rows, jit_options=_JIT_OPTIONS)(
    lambda x, y, q, opts, wsum, scale, g, inplace, inner, r0, r1, losses, lse_out, predicted:
    _by_targets(y, _ce_hard_direct_rows, _ce_soft_direct_rows))


@_jit
def _block_transformed(x, y, q, opts, wsum, scale, g, losses, inner, r0, n, lse):
    """``_ce_block`` on logits transformed by the options (see above; the identity
    too: one compiled variant for every call with options)."""
    logit_scale, cap = opts.logit_scale, opts.softcap
    C = x.shape[1]
    z = np.empty((n, C), x.dtype)
    dz = np.empty((n, C if cap != 0.0 and g is not None else 0), x.dtype)
    for i in range(n):
        _transform(_row(x, r0 + i, inner), z[i], dz[i], logit_scale, cap, False)
    ys, part_losses, part_lse = _part(y, r0, n, 1), losses[r0:r0 + n], _part(lse, r0, n, 1)
    qs = _q_rows(q, r0, n, inner)
    if g is None:
        _ce_block(z, ys, qs, opts, wsum, scale, None, part_losses, 1, 0, n, part_lse)
        return
    _ce_block(z, ys, qs, opts, wsum, scale if cap != 0.0 else scale * logit_scale, z,
              part_losses, 1, 0, n, part_lse)
    for i in range(n):
        _chain_out(_row(g, r0 + i, inner), z[i], dz[i], cap)


def _ce_block_any(x, y, q, opts, wsum, scale, g, losses, inner, r0, n, lse_out, predicted):
    """``_ce_block`` with the options and statistics above."""
    raise NotImplementedError  # only called from compiled code


def _ce_block_plain(x, y, q, opts, wsum, scale, g, losses, inner, r0, n, lse_out, predicted):
    _ce_block(x, y, q, opts, wsum, scale, g, losses, inner, r0, n, None)


def _ce_block_general(x, y, q, opts, wsum, scale, g, losses, inner, r0, n, lse_out, predicted):
    if predicted.shape[0] > 0:
        for i in range(n):
            predicted[r0 + i] = _first_argmax(_row(x, r0 + i, inner))
    _block_transformed(x, y, q, opts, wsum, scale, g, losses, inner, r0, n, lse_out)


@_jit
def _tiles_transformed(x, y, q, opts, wsum, scale, g, losses, inner, k0, k1, lse):
    """``_ce_tiles`` on logits transformed by the options: each tile's rows are
    transformed into a scratch tile of rows, which the plain routine takes
    (the identity too: one compiled variant for every call with options)."""
    logit_scale, cap = opts.logit_scale, opts.softcap
    C = x.shape[1]
    z = np.empty((TILE, C), x.dtype)
    dz = np.empty((TILE, C if cap != 0.0 and g is not None else 0), x.dtype)
    qbuf = np.empty((TILE, C), x.dtype)
    grad_scale = scale if cap != 0.0 else scale * logit_scale
    for k in range(k0, k1):
        rows, r0, step = _tile(x, k, inner)
        n = rows.shape[0]
        for i in range(n):
            _transform(rows[i], z[i], dz[i], logit_scale, cap, False)
        zs = z[:n]
        ys, part_losses = _part(y, r0, n, step), losses[r0:r0 + (n - 1) * step + 1:step]
        qs = _gathered(q, k, inner, qbuf)
        if g is None:
            _ce_tiles(zs, ys, qs, opts, wsum, scale, None, part_losses, 1, 0, 1,
                      _part(lse, r0, n, step))
            continue
        _ce_tiles(zs, ys, qs, opts, wsum, grad_scale, zs, part_losses, 1, 0, 1,
                  _part(lse, r0, n, step))
        grows = _tile(g, k, inner)[0]
        for i in range(n):
            _chain_out(grows[i], z[i], dz[i], cap)


def _ce_tiles_any(x, y, q, opts, wsum, scale, g, losses, inner, k0, k1, lse_out, predicted):
    """``_ce_tiles`` with the options and statistics above."""
    raise NotImplementedError  # only called from compiled code


def _ce_tiles_plain(x, y, q, opts, wsum, scale, g, losses, inner, k0, k1, lse_out, predicted):
    _ce_tiles(x, y, q, opts, wsum, scale, g, losses, inner, k0, k1, None)


def _ce_tiles_general(x, y, q, opts, wsum, scale, g, losses, inner, k0, k1, lse_out, predicted):
    if predicted.shape[0] > 0:
        for k in range(k0, k1):
            rows, r0, step = _tile(x, k, inner)
            for i in range(rows.shape[0]):
                predicted[r0 + i * step] = _first_argmax(rows[i])
    _tiles_transformed(x, y, q, opts, wsum, scale, g, losses, inner, k0, k1, lse_out)


@overload(_ce_block_any, jit_options=_JIT_OPTIONS)
def _ce_block_any_impl(x, y, q, opts, wsum, scale, g, losses, inner, r0, n, lse_out, predicted):
    return _ce_block_plain if _plain(opts, lse_out) else _ce_block_general


@overload(_ce_tiles_any, jit_options=_JIT_OPTIONS)
def _ce_tiles_any_impl(x, y, q, opts, wsum, scale, g, losses, inner, k0, k1, lse_out, predicted):
    return _ce_tiles_plain if _plain(opts, lse_out) else _ce_tiles_general


def _element(a, c):
    """``a[c:c + 1]``, or None when ``a`` is None (typed None, not Optional)."""
    raise NotImplementedError  # only called from compiled code


@overload(_element, jit_options=_JIT_OPTIONS, inline="always")
def _element_impl(a, c):
    if isinstance(a, types.NoneType):
        return lambda a, c: None
    return lambda a, c: a[c:c + 1]


# The 16-bit sweeps take the format as a literal: one branch per call here.
@_jit(inline=True)
def _half_max(x, copy_to, brain):
    if brain:
        return half_row_max(x, copy_to, True)
    return half_row_max(x, copy_to, False)


@_jit(inline=True)
def _half_exp(x, g, m, ahead, brain):
    if brain:
        return half_exp_sum(x, g, m, ahead, True)
    return half_exp_sum(x, g, m, ahead, False)


@_jit(inline=True)
def _half_scale(e, g, k1, k2, w, brain):
    if brain:
        scale_minus_half(e, g, k1, k2, w, True)
    else:
        scale_minus_half(e, g, k1, k2, w, False)


@_jit
def _ce_half_hard_row(x, buf, g, t, opts, wsum, scale, ahead, brain):
    """``_ce_hard_row`` of a row of 16-bit bits ``x`` (``brain``: bfloat16,
    else float16) through the float32 scratch row ``buf``, its gradient
    rounded into ``g`` (16-bit bits, may be ``x``; or None). The 16-bit
    row is read by the max sweep, widened in registers again by the
    exponentials' (which store them into ``buf``), and written by the
    gradient's, which rounds in registers: no sweep of its own for either
    conversion. The same operations as the float32 routine on the widened
    row, so the same bits; the next row, ``ahead``, is prefetched during
    the exponentials."""
    w = opts.weight
    xt = np.float64(_bf16_to_f32(x[t]) if brain else _f16_to_f32(x[t]))
    if opts.smoothing > 0.0:
        # sum(w * (x - m)) wants the widened row: stored by the max sweep
        m = _half_max(x, buf, brain)
        sx = lane_dot(buf, w, m)
        s = exp_sum(buf, m, ahead) if g is None else exp_sum_inplace(buf, m, ahead)
    else:
        m = _half_max(x, None, brain)
        sx = 0.0
        s = _half_exp(x, None, m, ahead, brain) if g is None else _half_exp(x, buf, m, ahead, brain)
    log_s = np.log(s)
    loss, k1, k2, kt = hard_target_row(np.float64(m), log_s, s, xt, _class_weight(w, t),
                                       wsum, sx, opts, scale, buf.shape[0])
    if g is not None:
        k1f, k2f = np.float32(k1), np.float32(k2)
        _half_scale(buf, g, k1f, k2f, w, brain)
        # the target's element as the float32 routine makes it: the same
        # vector code on it alone, then its own term
        scale_minus(buf[t:t + 1], buf[t:t + 1], k1f, k2f, _element(w, t))
        buf[t] = buf[t] - kt
        g[t] = _f32_to_bf16(buf[t]) if brain else _f32_to_f16(buf[t])
    return loss


@_jit(inline=True)
def _ce_half_row(x, y, opts, wsum, scale, g, buf, brain, r):
    """``_ce_hard_direct`` on row ``r`` of 16-bit bits ``x`` (``brain``:
    bfloat16, else float16) through the float32 scratch row ``buf``, the
    gradient into ``g``'s row (16-bit bits, or None)."""
    t = y[r]
    if t == opts.ignore_index:
        if g is not None:
            for c in range(g.shape[1]):
                g[r, c] = 0
        return 0.0
    if g is None:
        return _ce_half_hard_row(x[r], buf, None, t, opts, wsum, scale, _next_row(x, r, 1), brain)
    return _ce_half_hard_row(x[r], buf, g[r], t, opts, wsum, scale, _next_row(x, r, 1), brain)


# --------------------------------------------------------------------------
# Kernels. Each is compiled twice (parallel and serial, see ``_Kernel``);
# ``prange`` is a plain ``range`` in the serial one. The cross-entropy
# kernels, one per layout strategy, take class indices ``y`` or class
# probabilities ``q`` (the other None), the options record ``opts``
# (``_spec.CEOptions``) and the statistics' arrays (see above); they check the targets before writing anything and
# return (first bad target or -1, sum of the row losses, the mean's
# denominator), the sum in a fixed order.


@_jit
def _ce_prologue(y, n_classes, n_rows, opts):
    """(first bad target or -1, the mean's denominator, the gradient's scale,
    the sum of the class weights)."""
    w = opts.weight
    if y is None:
        bad, denominator = -1, float(n_rows)
    else:
        bad, denominator = scan_hard_targets(y, n_classes, opts.ignore_index, w)
    return bad, denominator, mean_scale(opts.mean, denominator), _weight_sum(w, n_classes)


def _cross_entropy_direct(x, y, q, opts, g, inplace, losses, inner, lse_out, predicted):
    """Long rows contiguous along the classes, one at a time (without the
    LLM options and statistics: ``lse_out`` and ``predicted`` are None)."""
    bad, denominator, scale, wsum = _ce_prologue(y, x.shape[1], losses.shape[0], opts)
    if bad >= 0:
        return bad, 0.0, denominator
    for r in prange(losses.shape[0]):
        losses[r] = _ce_direct(x, y, q, opts, wsum, scale, g, inplace, inner, r)
    return -1, lane_dot(losses, None, 0.0), denominator


#: Rows per task of the direct kernel with options (which share a scratch row).
_DIRECT_TASK_ROWS = 16


def _cross_entropy_direct_half(x, y, opts, g, losses, brain):
    """Long contiguous rows of 16-bit logits (their bits, uint16; ``brain``:
    bfloat16, else float16) against class indices, without the LLM options:
    each row widened into a float32 scratch row that stays in cache, the
    float32 row routine there, the gradient rounded into ``g`` (16-bit bits,
    the logits themselves for in place, or None). Same sums, same order as
    float32 logits of the widened values."""
    n_rows, C = x.shape
    bad, denominator, scale, wsum = _ce_prologue(y, C, n_rows, opts)
    if bad >= 0:
        return bad, 0.0, denominator
    per = _DIRECT_TASK_ROWS
    for j in prange((n_rows + per - 1) // per):
        buf = np.empty(C, np.float32)
        for r in range(j * per, min(n_rows, (j + 1) * per)):
            losses[r] = _ce_half_row(x, y, opts, wsum, scale, g, buf, brain, r)
    return -1, lane_dot(losses, None, 0.0), denominator


def _cross_entropy_direct_options(x, y, q, opts, g, inplace, losses, inner, lse_out, predicted):
    """Direct rows with the LLM options or statistics (see above), in tasks
    of ``_DIRECT_TASK_ROWS`` rows."""
    bad, denominator, scale, wsum = _ce_prologue(y, x.shape[1], losses.shape[0], opts)
    if bad >= 0:
        return bad, 0.0, denominator
    n_rows, per = losses.shape[0], _DIRECT_TASK_ROWS
    for j in prange((n_rows + per - 1) // per):
        _ce_direct_rows(x, y, q, opts, wsum, scale, g, inplace, inner, j * per,
                        min(n_rows, (j + 1) * per), losses, lse_out, predicted)
    return -1, lane_dot(losses, None, 0.0), denominator


def _cross_entropy_blocks(x, y, q, opts, g, inplace, losses, inner, lse_out, predicted):
    """Blocks of ``_rows_per_block(C)`` rows of any length and layout."""
    bad, denominator, scale, wsum = _ce_prologue(y, x.shape[1], losses.shape[0], opts)
    if bad >= 0:
        return bad, 0.0, denominator
    n_rows, per = losses.shape[0], _rows_per_block(x.shape[1])
    for b in prange((n_rows + per - 1) // per):
        _ce_block_any(x, y, q, opts, wsum, scale, g, losses, inner, b * per,
                      min(per, n_rows - b * per), lse_out, predicted)
    return -1, lane_dot(losses, None, 0.0), denominator


def _cross_entropy_tiles(x, y, q, opts, g, inplace, losses, inner, lse_out, predicted):
    """Short rows, ``TILE`` at a time (``inplace`` is not needed: a tile is
    read whole before it is written)."""
    bad, denominator, scale, wsum = _ce_prologue(y, x.shape[1], losses.shape[0], opts)
    if bad >= 0:
        return bad, 0.0, denominator
    n_tiles, per = _tile_count(x, inner), _tiles_per_task(x.shape[1])
    for j in prange((n_tiles + per - 1) // per):
        _ce_tiles_any(x, y, q, opts, wsum, scale, g, losses, inner, j * per,
                      min(n_tiles, (j + 1) * per), lse_out, predicted)
    return -1, lane_dot(losses, None, 0.0), denominator


def _nll(lp, y, opts, losses, inner):
    """Negative log-likelihood; returns as the cross-entropy kernels."""
    bad, denominator, _, _ = _ce_prologue(y, lp.shape[1], losses.shape[0], opts)
    if bad >= 0:
        return bad, 0.0, denominator
    for r in prange(losses.shape[0]):
        losses[r] = _nll_direct(lp, y, opts.weight, opts.ignore_index, inner, r)
    return -1, lane_dot(losses, None, 0.0), denominator


def _softmax_tiled(x, out, inner, log):
    n_tiles, per = _tile_count(x, inner), _tiles_per_task(x.shape[1])
    for j in prange((n_tiles + per - 1) // per):
        _softmax_tiles(x, out, inner, log, j * per, min(n_tiles, (j + 1) * per))


def _logsumexp_tiled(x, out, inner):
    n_tiles, per = _tile_count(x, inner), _tiles_per_task(x.shape[1])
    for j in prange((n_tiles + per - 1) // per):
        _logsumexp_tiles(x, out, inner, j * per, min(n_tiles, (j + 1) * per))


def _softmax(x, out, inplace, n_rows, inner, log):
    for r in prange(n_rows):
        _softmax_direct(x, out, inplace, inner, log, r)


def _softmax_buffered(x, out, n_rows, inner, log):
    per = _rows_per_block(x.shape[1])
    for b in prange((n_rows + per - 1) // per):
        _softmax_block(x, out, inner, log, b * per, min(per, n_rows - b * per))


def _logsumexp(x, out, inner):
    for r in prange(out.shape[0]):
        out[r] = _logsumexp_direct(x, inner, r)


def _logsumexp_buffered(x, out, inner):
    n_rows, per = out.shape[0], _rows_per_block(x.shape[1])
    for b in prange((n_rows + per - 1) // per):
        _logsumexp_block(x, out, inner, b * per, min(per, n_rows - b * per))


def _bce(x, t, w, pw, scale, g, out, inplace, losses, seg):
    """BCE over 2-D operands in tasks of about ``seg`` elements (see
    ``bce_tasks``; a flat input is one long row); returns the loss sum."""
    n_rows, n_cols = t.shape
    rows_per, per_row, _ = bce_tasks(n_rows, n_cols, seg)
    for k in prange(losses.shape[0]):
        r0 = k // per_row * rows_per
        b0 = k % per_row * seg
        losses[k] = _bce_task(x, t, w, pw, scale, g, out, inplace, r0, min(r0 + rows_per, n_rows),
                              b0, min(b0 + seg, n_cols))
    return lane_dot(losses, None, 0.0)


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

    def serial_entry(self, args):
        """The serial variant compiled for the types of ``args``, as a function
        that skips Numba's type dispatch: for callers that keep those types
        fixed (``_cpu.CrossEntropyPlan``), where the dispatch would cost more
        than a small batch's arithmetic."""
        dispatcher = self.serial
        signature = tuple(dispatcher.typeof_pyval(a) for a in args)
        if signature not in dispatcher.overloads:
            dispatcher.compile(signature)
        return dispatcher.overloads[signature].entry_point


cross_entropy_direct = _Kernel(_cross_entropy_direct)
cross_entropy_direct_options = _Kernel(_cross_entropy_direct_options)
cross_entropy_direct_half = _Kernel(_cross_entropy_direct_half)
cross_entropy_blocks = _Kernel(_cross_entropy_blocks)
cross_entropy_tiles = _Kernel(_cross_entropy_tiles)
nll = _Kernel(_nll)
softmax = _Kernel(_softmax)
softmax_buffered = _Kernel(_softmax_buffered)
softmax_tiled = _Kernel(_softmax_tiled)
logsumexp = _Kernel(_logsumexp)
logsumexp_buffered = _Kernel(_logsumexp_buffered)
logsumexp_tiled = _Kernel(_logsumexp_tiled)
bce = _Kernel(_bce)
