"""CUDA kernels (numba-cuda): the losses of ``_formulas`` over rows on the GPU.

Imported only by ``_cuda``, never at ``fastxent`` import time, so the CPU
package works where no CUDA library is installed.

Layout. Every array is a flat, C-contiguous device array (``strided_copy``
gathers strided inputs into such arrays and scatters results back). An input with a
class axis is seen as ``(outer, C, inner)`` (``inner`` is 1 when the class
axis is last): row ``r`` starts at ``(r // inner) * C * inner + r % inner``
and its elements are ``inner`` apart. Indices are int64 throughout, so
``N * C`` may pass 2**31.

Work split. A row is handled by a *group* of ``group`` consecutive threads
of a block (a power of two): the whole block for large C (one row per
block), a part of a warp for small C (many rows per block). Each thread
takes the columns ``lane, lane + group, ...``: neighbouring threads read
neighbouring addresses when ``inner`` is 1. Group-wide reductions are warp
shuffles, then (for a group of several warps) one value per warp through
shared memory, summed by every thread in a fixed order. Every thread of a
block runs the same number of row iterations (threads past the last row
compute on nothing), so full-mask shuffles and ``syncthreads`` are always
reached by all threads.

Passes. The first pass reads the row once and keeps a running maximum and
the sum of exponentials relative to it ("online softmax"), plus the other
sums a loss needs, in the input's float type. The gradient pass reads the
row again, or, in the ``cached`` variants (the whole block on one row whose
values fit in shared memory), reads the copy the first pass left in shared
memory: one global load and one store per element.

Infinities and NaN follow the CPU kernels exactly: a row holding NaN, or
whose maximum is infinite, has a NaN softmax, loss and gradient;
``logsumexp`` follows ``torch.logsumexp`` (rows of -inf give -inf, rows
holding +inf give +inf).

Losses of the rows are written in float64 to a buffer that ``sum_kernel``
adds up in a fixed order (no atomics), so a mean is deterministic.
"""

from __future__ import annotations

import math
import threading
from functools import lru_cache

import numpy as np
from numba import config, cuda

from . import _formulas as F
from ._spec import CEOptions

#: True under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``).
SIMULATED = bool(config.ENABLE_CUDASIM)

#: Threads per warp. The simulator tests patch it small so that tiny blocks
#: still have several "warps" and run the shared-memory stage of reductions;
#: compiled kernels read it at compile time (32 on every NVIDIA GPU).
WARP = 32
#: Most warps a block can have (1024 threads).
MAX_WARPS = 32
#: Shared scratch per block: one slot per warp for two values (max and sum).
SCRATCH = 2 * MAX_WARPS
FULL_MASK = 0xFFFFFFFF
NEG_INF = -math.inf

if SIMULATED:
    def _shfl_xor(value, offset):
        """Butterfly shuffle for the simulator, which has no shuffles.

        The simulator runs a block's threads as Python threads and its blocks
        one after another; values are exchanged through a dict on the block
        manager, with the block-wide barriers every thread reaches (see the
        module docstring: all threads run the same reductions).
        """
        th = threading.current_thread()
        box = th._manager.__dict__.setdefault("_fastxent_shuffle", {})
        th.syncthreads()  # every thread has read the previous exchange
        box[th.thread_id] = value
        th.syncthreads()
        return box[th.thread_id ^ offset]
else:
    @cuda.jit(device=True, inline=True)
    def _shfl_xor(value, offset):
        return cuda.shfl_xor_sync(FULL_MASK, value, offset)


# --------------------------------------------------------------------------
# Device helpers shared by the kernels

# The formulas of ``_formulas``, compiled for the GPU.
_device = cuda.jit(device=True, inline=True)
hard_target_row = _device(F.hard_target_row)
soft_target_row = _device(F.soft_target_row)
smoothed_target = _device(F.smoothed_target)
gradient_element = _device(F.gradient_element)
log_sum_exp = _device(F.log_sum_exp)
log_softmax_element = _device(F.log_softmax_element)
softmax_element = _device(F.softmax_element)
nll_row = _device(F.nll_row)
bce_label_weight = _device(F.bce_label_weight)
bce_element = _device(F.bce_element)
softcapped = _device(F.softcapped)
softcap_slope = _device(F.softcap_slope)


@cuda.jit(device=True, inline=True)
def _row_start(r, n_classes, inner):
    """Flat index of element 0 of row ``r`` in the ``(outer, C, inner)`` form."""
    return (r // inner) * n_classes * inner + r % inner


@cuda.jit(device=True, inline=True)
def _row_slot(group):
    """Where this thread starts in a grid-stride loop over rows, a ``group``
    of threads a row: (its row's offset in the block's rows, its lane in the
    group, the block's first row, the step to the block's next rows)."""
    tid = cuda.threadIdx.x
    per_block = cuda.blockDim.x // group
    return (tid // group, tid % group, np.int64(cuda.blockIdx.x) * per_block,
            np.int64(cuda.gridDim.x) * per_block)


@cuda.jit(device=True, inline=True)
def _row_target(y, r, active, ignore_index):
    """(row ``r``'s class index, whether the row counts): class 0 and
    ``active`` for probabilities (``y`` None)."""
    t = np.int64(0)
    take = active
    if y is not None:
        if active:
            t = y[r]
            take = t != ignore_index
    return t, take


@cuda.jit(device=True, inline=True)
def _cap_factors(logit_scale, softcap):
    """(logit_scale / softcap, 1 / softcap) in float64; zeros without a cap."""
    if softcap != 0.0:
        return logit_scale / softcap, 1.0 / softcap
    return 0.0, 0.0


@cuda.jit(device=True, inline=True)
def _transformed(v, x_scale, cap, cap_arg):
    """A loaded logit under the options' transform: cap tanh(v x_scale / cap)
    (``cap_arg`` = x_scale / cap), or v x_scale without a cap."""
    if cap != 0.0:
        return softcapped(math.tanh(v * cap_arg), cap)
    return v * x_scale


@cuda.jit(device=True, inline=True)
def _target_mass(q, i, w, c, keep, uniform):
    """Class ``c``'s smoothed probability (element ``i`` of ``q``), times
    its class weight."""
    qc = smoothed_target(q[i], keep, uniform)
    if w is not None:
        qc *= w[c]
    return qc


@cuda.jit(device=True, inline=True)
def _hard_sums(a1, a2, v, c, t, w, smooth):
    """The first pass's running sums for class indices, with class ``c``'s
    logit ``v``: (the target's logit, sum w v when smoothing)."""
    if c == t:
        a1 = v
    if smooth > 0.0:
        if w is None:
            a2 += v
        else:
            a2 += w[c] * v
    return a1, a2


@cuda.jit(device=True, inline=True)
def _hard_row(m, log_s, s, a1, a2, t, take, w, wsum, smooth, opts, scale, n_classes):
    """A class-index row's (loss, k1, k2, kt, the target's weight) from its
    max, log-sum and sum (float64) and ``_hard_sums``' totals."""
    wt = 1.0
    if w is not None:
        if take:
            wt = np.float64(w[t])
    w_dot = 0.0
    if smooth > 0.0:  # sum w (x - m) from the first pass's sum w x
        w_dot = np.float64(a2) - m * wsum
    loss, k1, k2, kt = hard_target_row(m, log_s, s, np.float64(a1), wt, wsum, w_dot, opts,
                                       scale, n_classes)
    return loss, k1, k2, kt, wt


@cuda.jit(device=True, inline=True)
def _hard_gradient(e, k1, k2, kt, w, c, t):
    """d loss / d x_c of a class-index row from e = exp(x_c - m) and the
    row's coefficients (float32 or the logits' float type)."""
    if w is not None:
        k2 = k2 * w[c]
    g = gradient_element(e, k1, k2)
    if c == t:
        g -= kt
    return g


@cuda.jit(device=True, inline=True)
def _online(m, s, v, one):
    """Add ``v`` to a running (max ``m``, sum of exp(x - m) ``s``).

    NaN poisons both; a run of -inf keeps ``s`` at 0 (no exp(-inf + inf)).
    """
    if v > m:
        return v, s * math.exp(m - v) + one
    if v != v:
        return v, v
    if m != m or m == NEG_INF:
        return m, s
    return m, s + math.exp(v - m)


@cuda.jit(device=True, inline=True)
def _combine(m1, s1, m2, s2):
    """Merge two running (max, sum) pairs; symmetric, so every lane of a
    butterfly ends with the same bits."""
    if m1 != m1 or m2 != m2:
        return m1 + m2, s1 + m1 + m2
    m = max(m1, m2)
    if m == NEG_INF:
        return m, s1 + s2
    return m, s1 * math.exp(m1 - m) + s2 * math.exp(m2 - m)


@cuda.jit(device=True, inline=True)
def _group_sum(v, group, scratch):
    """Sum of ``v`` over a group of threads, returned to every thread."""
    off = min(group, WARP) // 2
    while off > 0:
        v += _shfl_xor(v, off)
        off //= 2
    if group > WARP:  # the group is the whole block
        tid = cuda.threadIdx.x
        cuda.syncthreads()  # the previous reduction's readers are done
        if tid % WARP == 0:
            scratch[tid // WARP] = v
        cuda.syncthreads()
        v = scratch[0]
        for k in range(1, group // WARP):
            v += scratch[k]
    return v


@cuda.jit(device=True, inline=True)
def _group_max_sum(m, s, group, scratch):
    """Merge running (max, sum of exp) pairs over a group of threads."""
    off = min(group, WARP) // 2
    while off > 0:
        m, s = _combine(m, s, _shfl_xor(m, off), _shfl_xor(s, off))
        off //= 2
    if group > WARP:
        tid = cuda.threadIdx.x
        cuda.syncthreads()
        if tid % WARP == 0:
            scratch[tid // WARP] = m
            scratch[MAX_WARPS + tid // WARP] = s
        cuda.syncthreads()
        m = scratch[0]
        s = scratch[MAX_WARPS]
        for k in range(1, group // WARP):
            m, s = _combine(m, s, scratch[k], scratch[MAX_WARPS + k])
    return m, s


@cuda.jit(device=True, inline=True)
def _beats(v1, i1, v2, i2, none):
    """Whether candidate (v2, i2) of an argmax beats (v1, i1): the larger
    value, NaN above all, the first index on ties; an index ``none`` is no
    candidate."""
    if i2 == none:
        return False
    if i1 == none:
        return True
    nan1, nan2 = v1 != v1, v2 != v2
    if nan1 or nan2:
        return nan2 and (not nan1 or i2 < i1)
    return v2 > v1 or (v2 == v1 and i2 < i1)


@cuda.jit(device=True, inline=True)
def _group_argmax(v, i, none, group, scratch, indices):
    """The first index of the maximum over a group of threads' candidates."""
    off = min(group, WARP) // 2
    while off > 0:
        v2, i2 = _shfl_xor(v, off), _shfl_xor(i, off)
        if _beats(v, i, v2, i2, none):
            v, i = v2, i2
        off //= 2
    if group > WARP:
        tid = cuda.threadIdx.x
        cuda.syncthreads()
        if tid % WARP == 0:
            scratch[tid // WARP] = v
            indices[tid // WARP] = i
        cuda.syncthreads()
        v, i = scratch[0], indices[0]
        for k in range(1, group // WARP):
            if _beats(v, i, scratch[k], indices[k], none):
                v, i = scratch[k], indices[k]
    return i


@cuda.jit(device=True, inline=True)
def _finish_sum(m, s):
    """The row's sum of exponentials, NaN where its max is infinite (the CPU
    kernels get NaN there from exp(inf - inf) or from a row of -inf)."""
    if m == NEG_INF or m == -NEG_INF:
        return m - m
    return s


# --------------------------------------------------------------------------
# 16-bit storage (float16, bfloat16), computed in float32.
#
# numba-cuda types float16 arrays (loads and stores convert with
# ``cvt.f32.f16`` and ``cvt.rn.f16.f32``, round to nearest even, on the GPU;
# NumPy's conversions in the simulator), but no bfloat16 array: bfloat16
# arrays reach the kernels as their ``uint16`` bits, converted as the CPU
# does (``_half``): widening is a 16-bit shift, narrowing adds ``0x7fff``
# plus the lowest kept bit before the shift and keeps a NaN a quiet NaN.
# Only the float32 <-> bits reinterpretation differs between the targets.

if SIMULATED:
    def _f32_from_bits(u):
        return np.array(u, np.uint32).view(np.float32)[()]

    def _bits_of_f32(v):
        return np.array(v, np.float32).view(np.uint32)[()]
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def _f32_from_bits(u):
        return libdevice.int_as_float(np.int32(u))

    @cuda.jit(device=True, inline=True)
    def _bits_of_f32(v):
        return np.uint32(libdevice.float_as_int(v))


@cuda.jit(device=True, inline=True)
def bf16_to_f32(bits):
    """The float32 value of bfloat16 ``bits`` (a uint16)."""
    return _f32_from_bits(np.uint32(bits) << np.uint32(16))


_bf16_bits_of_f32_bits = cuda.jit(device=True, inline=True)(F.bf16_bits_of_f32_bits)


@cuda.jit(device=True, inline=True)
def f32_to_bf16(value):
    """The bfloat16 bits (uint16) of float32 ``value``, rounded to nearest even."""
    return _bf16_bits_of_f32_bits(_bits_of_f32(value))


#: Storage dtypes (names) a kernel may read or write in place of its float type.
STORAGE = ("float32", "float64", "float16", "bfloat16")


@lru_cache(maxsize=None)
def _io(storage, ft):
    """(load, store) device functions of an array holding ``storage`` values
    (a dtype name; bfloat16 as uint16 bits) computed in float type ``ft``:
    ``load(a, i)`` is ``a[i]`` as ``ft``, ``store(a, i, v)`` writes ``v``
    (an ``ft``) rounded to nearest even into a 16-bit array."""
    if storage not in STORAGE:
        raise ValueError(f"internal error: no GPU storage for dtype {storage}")
    if storage == "bfloat16":
        @cuda.jit(device=True, inline=True)
        def load(a, i):
            return bf16_to_f32(a[i])

        @cuda.jit(device=True, inline=True)
        def store(a, i, v):
            a[i] = f32_to_bf16(np.float32(v))
    else:
        @cuda.jit(device=True, inline=True)
        def load(a, i):
            return ft(a[i])

        @cuda.jit(device=True, inline=True)
        def store(a, i, v):
            a[i] = ft(v)
    return load, store


# --------------------------------------------------------------------------
# Kernels. Those with float constants are built per float type (``FT``), so
# float32 inputs are computed in float32; ``cached`` picks the variant that
# keeps the row in dynamic shared memory. Python functions are returned too
# (``*_py``), for ``cuda.compile_ptx`` in the tests.


def _float_type(dtype):
    return np.float32 if np.dtype(dtype) == np.float32 else np.float64


def _shared_type(ft):
    """dtype argument of ``cuda.shared.array``: the simulator wants a
    ``np.dtype``, compiled code the scalar type."""
    return np.dtype(ft) if SIMULATED else ft


_F64_SHARED = _shared_type(np.float64)


@lru_cache(maxsize=None)
def ce_py(dtype, cached, x_storage=None, g_storage=None):
    """Fused cross-entropy: loss per row and, when ``g`` is given, gradient.

    ``dtype``: the float type computed in; ``x_storage``, ``g_storage``:
    the dtype names of the logits and the gradient when they differ from it
    (16-bit logits computed in float32, see ``_io``).

    ``y``: int64 targets (hard) or None; ``q``: class probabilities of the
    logits' form (soft) or None; ``g``: the gradient (may be ``x`` itself)
    or None; ``lse`` (float64) and ``predicted`` (int64): each row's
    statistics, or None; ``wsum``: the sum of the class weights; ``scale``:
    the gradient's (``_formulas.mean_scale``). The last seven parameters
    are the fields of ``_spec.CEOptions`` in order (kernel parameters, so
    that a ``weight`` of None compiles away). The transform (logit_scale,
    softcap) applies to each logit as it is loaded, in both passes; the cached copy holds the transformed logits. Dynamic shared
    memory (cached): C values (hard), 2C (soft: the logits, then the
    smoothed, weighted targets).
    """
    FT = _float_type(dtype)
    ST = _shared_type(FT)
    load_x = _io(x_storage or np.dtype(dtype).name, FT)[0]
    store_g = _io(g_storage or np.dtype(dtype).name, FT)[1]

    def ce(x, y, q, g, losses, lse, predicted, n_rows, n_classes, inner, group, wsum, scale,
           w, ignore_index, smooth, mean, z_loss, logit_scale, softcap):
        scratch = cuda.shared.array(SCRATCH, ST)
        indices = cuda.shared.array(MAX_WARPS, np.int64)
        cache = cuda.shared.array(0, ST)
        # the record the formulas read
        opts = CEOptions(w, ignore_index, smooth, mean, z_loss, logit_scale, softcap)
        zero = FT(0.0)
        one = FT(1.0)
        keep_q = FT(1.0 - smooth)
        uniform_q = FT(smooth / n_classes)
        scale_f = FT(scale)
        transform = logit_scale != 1.0 or softcap != 0.0
        x_scale, cap = FT(logit_scale), FT(softcap)
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
            a1 = zero  # soft: sum of q'; hard: x[t]
            a2 = zero  # soft: sum of q' x; hard (smoothing): sum of w x
            best = FT(NEG_INF)  # the argmax of the given logits (statistics)
            best_at = np.int64(n_classes)
            # with statistics, ignored rows are read too, for their lse
            if take or (lse is not None and active):
                for c in range(lane, n_classes, group):
                    i = start + c * inner
                    v = load_x(x, i)
                    if predicted is not None:
                        if _beats(best, best_at, v, np.int64(c), n_classes):
                            best, best_at = v, np.int64(c)
                    if transform:
                        v = _transformed(v, x_scale, cap, cap_arg)
                    if cached:
                        cache[c] = v
                    m, s = _online(m, s, v, one)
                    if q is not None:
                        qc = _target_mass(q, i, w, c, keep_q, uniform_q)
                        if cached:
                            cache[n_classes + c] = qc
                        a1 += qc
                        a2 += qc * v
                    else:
                        a1, a2 = _hard_sums(a1, a2, v, c, t, w, smooth)
            m, s = _group_max_sum(m, s, group, scratch)
            a1 = _group_sum(a1, group, scratch)
            a2 = _group_sum(a2, group, scratch)
            if predicted is not None:
                best_at = _group_argmax(best, best_at, n_classes, group, scratch, indices)
            s = _finish_sum(m, s)
            m64, s64 = np.float64(m), np.float64(s)
            log_s = math.log(s64)
            if active and lane == 0:
                if lse is not None:
                    lse[r] = log_sum_exp(m64, log_s)
                if predicted is not None:
                    predicted[r] = best_at if best_at < n_classes else 0
            if q is not None:
                # sum q' (x - m) from the online pass's sum q' x
                loss, k1 = soft_target_row(m64, log_s, s64, np.float64(a1),
                                           np.float64(a2) - np.float64(a1) * m64, opts, scale)
                k2 = kt = 0.0
            else:
                loss, k1, k2, kt, _ = _hard_row(m64, log_s, s64, a1, a2, t, take, w, wsum,
                                                smooth, opts, scale, n_classes)
            if active and lane == 0:
                losses[r] = loss if take else 0.0
            if g is not None:
                if take:
                    k1_f, k2_f, kt_f = FT(k1), FT(k2), FT(kt)
                    for c in range(lane, n_classes, group):
                        i = start + c * inner
                        if cached:
                            v = cache[c]
                        else:
                            v = load_x(x, i)
                            if transform:
                                v = _transformed(v, x_scale, cap, cap_arg)
                        slope = one  # dz/dx of the transform
                        if transform:
                            if cap != zero:
                                slope = softcap_slope(v, x_scale, inv_cap)
                            else:
                                slope = x_scale
                        if q is not None:
                            if cached:
                                qc = cache[n_classes + c]
                            else:
                                qc = _target_mass(q, i, w, c, keep_q, uniform_q)
                            store_g(g, i, slope * gradient_element(math.exp(v - m), k1_f,
                                                                   scale_f * qc))
                        else:
                            store_g(g, i, slope * _hard_gradient(math.exp(v - m), k1_f, k2_f,
                                                                 kt_f, w, c, t))
                elif active:
                    for c in range(lane, n_classes, group):
                        store_g(g, start + c * inner, zero)
            base += step

    return ce


@lru_cache(maxsize=None)
def _online_row_pass(dtype, cached, x_storage=None):
    """Device function: the first pass of ``softmax`` and ``logsumexp`` over
    a row (the elements ``lane, lane + group, ...`` of each thread, when
    ``active``), keeping the values in ``cache`` when ``cached``; returns the
    row's running (max, sum of exp) merged over the group."""
    FT = _float_type(dtype)
    load_x = _io(x_storage or np.dtype(dtype).name, FT)[0]

    @cuda.jit(device=True, inline=True)
    def online_row_pass(x, start, active, lane, group, n_classes, inner, cache, scratch):
        one = FT(1.0)
        m = FT(NEG_INF)
        s = FT(0.0)
        if active:
            for c in range(lane, n_classes, group):
                v = load_x(x, start + c * inner)
                if cached:
                    cache[c] = v
                m, s = _online(m, s, v, one)
        return _group_max_sum(m, s, group, scratch)

    return online_row_pass


@lru_cache(maxsize=None)
def softmax_py(dtype, cached, log, x_storage=None, out_storage=None):
    """``out`` <- softmax or log_softmax of the rows of ``x`` (``out`` may be
    ``x``); the formulas of ``_cpu_kernels._softmax``. Storage as in
    ``ce_py``."""
    FT = _float_type(dtype)
    ST = _shared_type(FT)
    first_pass = _online_row_pass(dtype, cached, x_storage)
    load_x = _io(x_storage or np.dtype(dtype).name, FT)[0]
    store_out = _io(out_storage or np.dtype(dtype).name, FT)[1]

    def softmax(x, out, n_rows, n_classes, inner, group):
        scratch = cuda.shared.array(SCRATCH, ST)
        cache = cuda.shared.array(0, ST)
        offset, lane, base, step = _row_slot(group)
        while base < n_rows:
            r = base + offset
            active = r < n_rows
            start = _row_start(r, n_classes, inner)
            m, s = first_pass(x, start, active, lane, group, n_classes, inner, cache, scratch)
            s = _finish_sum(m, s)
            if active:
                if log:
                    log_s = FT(math.log(np.float64(s)))
                else:
                    inv_s = FT(1.0 / np.float64(s))
                for c in range(lane, n_classes, group):
                    i = start + c * inner
                    if cached:
                        v = cache[c]
                    else:
                        v = load_x(x, i)
                    if log:
                        store_out(out, i, log_softmax_element(v, m, log_s))
                    else:
                        store_out(out, i, softmax_element(math.exp(v - m), inv_s))
            base += step

    return softmax


@lru_cache(maxsize=None)
def logsumexp_py(dtype, x_storage=None):
    """``out[r]`` <- log(sum(exp(row r))), as ``torch.logsumexp``."""
    ST = _shared_type(_float_type(dtype))
    first_pass = _online_row_pass(dtype, False, x_storage)

    def logsumexp(x, out, n_rows, n_classes, inner, group):
        scratch = cuda.shared.array(SCRATCH, ST)
        offset, lane, base, step = _row_slot(group)
        while base < n_rows:
            r = base + offset
            active = r < n_rows
            start = _row_start(r, n_classes, inner)
            # no cache: ``scratch`` stands in for it, unused
            m, s = first_pass(x, start, active, lane, group, n_classes, inner, scratch, scratch)
            if active and lane == 0:
                # s is NaN for an infinite max (``_finish_sum``), which
                # ``log_sum_exp`` returns itself
                out[r] = log_sum_exp(np.float64(m), math.log(np.float64(_finish_sum(m, s))))
            base += step

    return logsumexp


@lru_cache(maxsize=None)
def bce_py(dtype, x_storage=None, t_storage=None, w_storage=None, pw_storage=None,
           g_storage=None):
    """Binary cross-entropy with logits, elementwise (``_bce_element``).

    ``w``, ``pw``: full-size weights or None; ``g``: gradient (may be ``x``)
    or None; ``elements``: per-element losses (of ``dtype``) or None. Each
    thread adds its elements' losses in float64 into ``partials[thread]`` (a
    fixed order for a given launch), summed afterwards by ``sum_kernel``.
    ``x_storage``, ``t_storage``, ``w_storage``, ``pw_storage``,
    ``g_storage``: the dtype names of the logits, the target, the weights and
    the gradient where they differ from ``dtype`` (16-bit values computed in
    float32, see ``_io``): each is loaded or stored once per element.
    """
    FT = _float_type(dtype)
    name = np.dtype(dtype).name
    load_x = _io(x_storage or name, FT)[0]
    load_t = _io(t_storage or name, FT)[0]
    load_w = _io(w_storage or name, FT)[0]
    load_pw = _io(pw_storage or name, FT)[0]
    store_g = _io(g_storage or name, FT)[1]

    def bce(x, t, w, pw, g, elements, partials, n, scale):
        one = FT(1.0)
        scale_f = FT(scale)
        first = cuda.grid(1)
        acc = 0.0
        for i in range(first, n, cuda.gridsize(1)):
            xc = load_x(x, i)
            tc = load_t(t, i)
            e = math.exp(-abs(xc))
            lw = one
            if pw is not None:
                lw = bce_label_weight(load_pw(pw, i), tc, one)
            loss, grad = bce_element(xc, tc, lw, e, FT(math.log1p(e)), one)
            if w is not None:
                wc = load_w(w, i)
                loss = loss * wc
                grad = grad * wc
            if elements is not None:
                elements[i] = loss
            if g is not None:
                store_g(g, i, grad * scale_f)
            acc += loss
        partials[first] = acc

    return bce


@lru_cache(maxsize=None)
def nll_py(lp_storage=None):
    """``losses[r]`` <- -w[t] lp[r, t] (0 for ignored rows); a thread per row.

    ``lp_storage``: the dtype name of 16-bit log-probabilities (read as 16
    bits, widened to float32 as the CPU widens them, see ``_io``); None for
    float32 and float64 ones."""
    load = _io(lp_storage, np.float32)[0] if lp_storage else _io("float64", np.float64)[0]

    def nll(lp, y, w, losses, n_rows, n_classes, inner, ignore_index):
        for r in range(cuda.grid(1), n_rows, cuda.gridsize(1)):
            t = y[r]
            if t == ignore_index:
                losses[r] = 0.0
            else:
                v = np.float64(load(lp, _row_start(np.int64(r), n_classes, inner) + t * inner))
                wt = 1.0
                if w is not None:
                    wt = np.float64(w[t])
                losses[r] = nll_row(v, wt)

    return nll


def sum_py(values, out):
    """``out[0]`` <- sum of ``values`` (float64), one block, fixed order."""
    scratch = cuda.shared.array(SCRATCH, _F64_SHARED)
    tid = cuda.threadIdx.x
    acc = 0.0
    for i in range(tid, values.shape[0], cuda.blockDim.x):
        acc += values[i]
    acc = _group_sum(acc, cuda.blockDim.x, scratch)
    if tid == 0:
        out[0] = acc


@lru_cache(maxsize=None)
def widen_py(storage):
    """``dst`` <- the values of 16-bit ``src`` (``storage``: its dtype name;
    bfloat16 as bits), into float32 or float64 ``dst`` (flat arrays)."""
    load = _io(storage, np.float32)[0]

    def widen(src, dst):
        for i in range(cuda.grid(1), dst.shape[0], cuda.gridsize(1)):
            dst[i] = load(src, i)

    return widen


def cast_py(src, dst):
    """``dst`` <- ``src`` converted to ``dst``'s dtype (flat arrays)."""
    for i in range(cuda.grid(1), dst.shape[0], cuda.gridsize(1)):
        dst[i] = src[i]


@lru_cache(maxsize=None)
def strided_copy_py(ndim):
    """``dst`` <- ``src``, two arrays of one shape with ``ndim`` dimensions and
    any strides, converted to ``dst``'s dtype: gathers a strided input into a
    contiguous buffer, or scatters a contiguous result into a strided
    destination. ``n``: the number of elements.

    Indexing an array of any strides needs an index tuple of ``ndim``
    values, so the function is generated per ``ndim``: element ``k`` (in C
    order) is ``dst[i0, i1, ...] = src[i0, i1, ...]`` with ``k`` unravelled
    over the shape, in int64.
    """
    lines = ["def strided_copy(src, dst, n):",
             "    for k in range(cuda.grid(1), n, cuda.gridsize(1)):",
             "        rest = np.int64(k)"]
    for axis in range(ndim - 1, 0, -1):
        lines += [f"        i{axis} = rest % dst.shape[{axis}]",
                  f"        rest //= dst.shape[{axis}]"]
    index = ", ".join(f"i{axis}" for axis in range(ndim))
    lines += ["        i0 = rest", f"        dst[{index}] = src[{index}]"]
    namespace = {}
    exec(compile("\n".join(lines), f"<fastxent strided_copy {ndim}-D>", "exec"),
         {"cuda": cuda, "np": np}, namespace)
    return namespace["strided_copy"]


# Compiled (lazily, per argument types) kernels.

def _storage(name, dtype):
    """None where the storage is the compute dtype itself (one cache key)."""
    return None if name is None or name == np.dtype(dtype).name else name


@lru_cache(maxsize=None)
def ce(dtype, cached, x_storage=None, g_storage=None):
    return cuda.jit(ce_py(np.dtype(dtype).name, cached, _storage(x_storage, dtype),
                          _storage(g_storage, dtype)))


@lru_cache(maxsize=None)
def softmax(dtype, cached, log, x_storage=None, out_storage=None):
    return cuda.jit(softmax_py(np.dtype(dtype).name, cached, log, _storage(x_storage, dtype),
                               _storage(out_storage, dtype)))


@lru_cache(maxsize=None)
def logsumexp(dtype, x_storage=None):
    return cuda.jit(logsumexp_py(np.dtype(dtype).name, _storage(x_storage, dtype)))


@lru_cache(maxsize=None)
def widen(storage):
    return cuda.jit(widen_py(storage))


@lru_cache(maxsize=None)
def bce(dtype, x_storage=None, t_storage=None, w_storage=None, pw_storage=None, g_storage=None):
    storages = (x_storage, t_storage, w_storage, pw_storage, g_storage)
    return cuda.jit(bce_py(np.dtype(dtype).name, *(_storage(s, dtype) for s in storages)))


@lru_cache(maxsize=None)
def nll(lp_storage=None):
    return cuda.jit(nll_py(lp_storage if lp_storage in ("float16", "bfloat16") else None))


@lru_cache(maxsize=None)
def strided_copy(ndim):
    return cuda.jit(strided_copy_py(ndim))


sum_kernel = cuda.jit(sum_py)
cast = cuda.jit(cast_py)
