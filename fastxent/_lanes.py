"""Fixed-order sums over a row, written as LLVM vector code.

Every sum in the kernels has its order fixed by the code, so that results do
not depend on how LLVM compiles a loop (serial or parallel variant, vector
width, a cache written by another process): the fast-math flags leave out
``reassoc``. Without it LLVM keeps a sum loop scalar, and a loop over an
explicit array of partial sums does not vectorize either (the vectorizer
cannot prove that the scratch array and the row do not overlap): such sums
ran at about 0.4 ns per element, 20 times slower than a vector loop.

The intrinsics here emit the loop themselves on ``<LANES x T>`` vectors (T
the rows' float type). The order, for every function: the row is cut into
blocks of ``BLOCK`` elements; in a block, lane ``j`` sums the terms of
elements ``j, j + LANES, j + 2 LANES, ...`` of the block's whole vectors, in
T; the lanes are folded pairwise (lane ``j`` plus lane ``j + 8``, then
``j + 4``, ``j + 2``, ``j + 1``); the block's leftover elements are summed in
order in T; and the total, in float64, gains ``float64(lanes) +
float64(leftover)`` block after block. The float64 totals keep float32 sums
of 100000 terms accurate.

Functions (rows are 1-D arrays of one float type; ``w`` may be None):

* ``lane_dot(x, w, shift)``: sum of ``w * (x - shift)`` (of ``x - shift``
  without ``w``).
* ``exp_sum(x, m)``: sum of ``exp(x - m)``.
* ``exp_sum_inplace(g, m)``: ``g <- exp(g - m)``, returns the sum.
* ``soft_sums(x, q, w, keep, uniform, m)``: ``(sum q', sum q' * (x - m))``
  with ``q' = (keep * q + uniform) * w``.
* ``row_max(x, copy_to)``: the IEEE maximum of ``x`` (NaN-propagating, exact
  in any order), copying ``x`` into ``copy_to`` on the way unless it is None.

The exponential is ``_fastmath``'s, on whole vectors. Rows may be strided:
a row whose type does not promise unit stride is checked when called, and a
strided one is gathered lane by lane (same order, same bits).
"""

from __future__ import annotations

import math

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._fastmath import _call, _const, _exp_ir, _prefer_wide_vectors

#: Partial sums per vector (one 512-bit register of float32).
LANES = 16
#: Elements per block: the lanes are folded into the float64 total per block.
BLOCK = 512


class _RowAccess:
    """Loads and stores of one 1-D array argument, as vectors or scalars."""

    def __init__(self, context, builder, aryty, value):
        ary = context.make_array(aryty)(context, builder, value)
        self.data = ary.data
        self.size = builder.extract_value(ary.shape, 0)
        self.stride = builder.extract_value(ary.strides, 0)
        self.itemsize = context.get_abi_sizeof(context.get_data_type(aryty.dtype))
        self.unit_stride_type = aryty.layout in "CF"

    def _pointer(self, builder, index, contiguous):
        if contiguous:
            return builder.gep(self.data, [index], inbounds=True)
        byte = builder.bitcast(self.data, ir.IntType(8).as_pointer())
        byte = builder.gep(byte, [builder.mul(index, self.stride)], inbounds=True)
        return builder.bitcast(byte, self.data.type)

    def load(self, builder, index, vty, contiguous):
        """Element ``index`` (scalar ``vty`` None) or the vector from it."""
        if vty is None:
            return builder.load(self._pointer(builder, index, contiguous), align=self.itemsize)
        if contiguous:
            ptr = builder.bitcast(self._pointer(builder, index, True), vty.as_pointer())
            return builder.load(ptr, align=self.itemsize)
        vec = ir.Constant(vty, ir.Undefined)
        for j in range(vty.count):
            at = builder.add(index, ir.Constant(index.type, j))
            vec = builder.insert_element(vec, self.load(builder, at, None, False),
                                         ir.Constant(ir.IntType(32), j))
        return vec

    def store(self, builder, index, value, contiguous):
        if not isinstance(value.type, ir.VectorType):
            builder.store(value, self._pointer(builder, index, contiguous), align=self.itemsize)
        elif contiguous:
            ptr = builder.bitcast(self._pointer(builder, index, True), value.type.as_pointer())
            builder.store(value, ptr, align=self.itemsize)
        else:
            for j in range(value.type.count):
                at = builder.add(index, ir.Constant(index.type, j))
                self.store(builder, at, builder.extract_element(value, ir.Constant(ir.IntType(32), j)),
                           False)


def _indices(js):
    js = list(js)
    return ir.Constant(ir.VectorType(ir.IntType(32), len(js)), js)


def _fold(builder, vec, add):
    """Lanes combined pairwise: lane j with lane j + width/2, halving the width."""
    width = vec.type.count
    while width > 1:
        half = width // 2
        lo = builder.shuffle_vector(vec, vec, _indices(range(half)))
        hi = builder.shuffle_vector(vec, vec, _indices(range(half, width)))
        vec = add(lo, hi)
        width = half
    return builder.extract_element(vec, ir.Constant(ir.IntType(32), 0))


def _emit_lanes(context, builder, rows, scalars, body, n_sums, target=None, combine="sum"):
    """Emit the blocked lane loop; returns ``n_sums`` float64 results.

    ``rows``: _RowAccess objects to load (None for an absent optional row),
    the first one gives the length. ``scalars``: LLVM values of the rows'
    float type. ``body(builder, values, scalars)`` gets the rows' elements
    (vectors in the main loop, scalars in the leftover loop; None for absent
    rows) and the scalars in the same shape, and returns ``(terms, stored)``:
    ``n_sums`` values to combine and a value to store into the row
    ``target`` (or None). ``combine``: "sum", or "max" for the IEEE maximum
    (NaN-propagating; exact, so its order does not matter).
    """
    _prefer_wide_vectors(builder)
    fty = rows[0].data.type.pointee
    vty = ir.VectorType(fty, LANES)
    f64 = ir.DoubleType()
    intp = rows[0].size.type
    size = rows[0].size
    present = [r for r in rows + [target] if r is not None]
    start = 0.0 if combine == "sum" else -math.inf

    def add(a, b):
        if combine == "sum":
            return builder.fadd(a, b)
        return _call(builder, "llvm.maximum", a.type, a, b)

    totals = [cgutils.alloca_once_value(builder, ir.Constant(f64, start)) for _ in range(n_sums)]
    lanes = [cgutils.alloca_once(builder, vty) for _ in range(n_sums)]
    leftovers = [cgutils.alloca_once(builder, fty) for _ in range(n_sums)]

    def splat(value):
        vec = builder.insert_element(ir.Constant(vty, ir.Undefined), value,
                                     ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(ir.IntType(32), LANES),
                                                            None))

    vector_scalars = [splat(s) for s in scalars]

    def widen(value):
        return value if fty == f64 else builder.fpext(value, f64)

    def step(index, vector, contiguous, accumulators):
        vty_or_none = vty if vector else None
        values = [None if r is None else r.load(builder, index, vty_or_none, contiguous)
                  for r in rows]
        terms, stored = body(builder, values, vector_scalars if vector else scalars)
        if stored is not None and target is not None:
            target.store(builder, index, stored, contiguous)
        for acc, term in zip(accumulators, terms):
            builder.store(add(builder.load(acc), term), acc)

    def loop(contiguous):
        block = ir.Constant(intp, BLOCK)
        with cgutils.for_range_slice(builder, ir.Constant(intp, 0), size, block, intp) as (b0, _):
            rest = builder.sub(size, b0)
            n = builder.select(builder.icmp_signed("<", rest, block), rest, block)
            full = builder.and_(n, ir.Constant(intp, -LANES))
            for acc in lanes:
                builder.store(_const(vty, start), acc)
            for acc in leftovers:
                builder.store(ir.Constant(fty, start), acc)
            with cgutils.for_range_slice(builder, b0, builder.add(b0, full),
                                         ir.Constant(intp, LANES), intp) as (c, _):
                step(c, True, contiguous, lanes)
            with cgutils.for_range_slice(builder, builder.add(b0, full), builder.add(b0, n),
                                         ir.Constant(intp, 1), intp) as (c, _):
                step(c, False, contiguous, leftovers)
            for total, acc, left in zip(totals, lanes, leftovers):
                block = add(widen(_fold(builder, builder.load(acc), add)), widen(builder.load(left)))
                builder.store(add(builder.load(total), block), total)

    if all(r.unit_stride_type for r in present):
        loop(True)
    else:
        unit = ir.Constant(intp, present[0].itemsize)
        all_unit = cgutils.true_bit
        for r in present:
            if not r.unit_stride_type:
                all_unit = builder.and_(all_unit, builder.icmp_signed("==", r.stride, unit))
        with builder.if_else(all_unit, likely=True) as (then, otherwise):
            with then:
                loop(True)
            with otherwise:
                loop(False)
    return [builder.load(t) for t in totals]


def _is_row(a, dtype=None):
    return (isinstance(a, types.Array) and a.ndim == 1 and isinstance(a.dtype, types.Float)
            and (dtype is None or a.dtype == dtype))


def _is_scalar(s):
    return isinstance(s, (types.Float, types.Integer))


def _result(context, builder, sig, sums):
    if len(sums) == 1:
        return sums[0]
    return context.make_tuple(builder, sig.return_type, sums)


def _access(context, builder, sig, args, i):
    if isinstance(sig.args[i], types.NoneType):
        return None
    return _RowAccess(context, builder, sig.args[i], args[i])


def _setup(context, builder, sig, args, row_positions, scalar_positions):
    rows = [_access(context, builder, sig, args, i) for i in row_positions]
    dtype = sig.args[row_positions[0]].dtype
    scalars = [context.cast(builder, args[i], sig.args[i], dtype) for i in scalar_positions]
    return rows, scalars


@intrinsic
def lane_dot(typingctx, x, w, shift):
    """Sum of ``w * (x - shift)`` (``x - shift`` when ``w`` is None), float64."""
    if not (_is_row(x) and (isinstance(w, types.NoneType) or _is_row(w, x.dtype))
            and _is_scalar(shift)):
        return None

    def body(builder, values, scalars):
        xv, wv = values
        term = builder.fsub(xv, scalars[0])
        if wv is not None:
            term = builder.fmul(wv, term)
        return [term], None

    def codegen(context, builder, sig, args):
        rows, scalars = _setup(context, builder, sig, args, (0, 1), (2,))
        return _result(context, builder, sig, _emit_lanes(context, builder, rows, scalars, body, 1))

    return types.float64(x, w, shift), codegen


@intrinsic
def exp_sum(typingctx, x, m):
    """Sum of ``exp(x - m)`` in float64; ``x`` is not written."""
    if not (_is_row(x) and _is_scalar(m)):
        return None

    def body(builder, values, scalars):
        return [_exp_ir(builder, builder.fsub(values[0], scalars[0]))], None

    def codegen(context, builder, sig, args):
        rows, scalars = _setup(context, builder, sig, args, (0,), (1,))
        return _result(context, builder, sig, _emit_lanes(context, builder, rows, scalars, body, 1))

    return types.float64(x, m), codegen


@intrinsic
def exp_sum_inplace(typingctx, g, m):
    """``g <- exp(g - m)``; returns the sum in float64."""
    if not (_is_row(g) and g.mutable and _is_scalar(m)):
        return None

    def body(builder, values, scalars):
        e = _exp_ir(builder, builder.fsub(values[0], scalars[0]))
        return [e], e

    def codegen(context, builder, sig, args):
        rows, scalars = _setup(context, builder, sig, args, (0,), (1,))
        return _result(context, builder, sig,
                       _emit_lanes(context, builder, rows, scalars, body, 1, target=rows[0]))

    return types.float64(g, m), codegen


@intrinsic
def soft_sums(typingctx, x, q, w, keep, uniform, m):
    """``(sum q', sum q' (x - m))`` in float64, ``q' = (keep q + uniform) w``."""
    if not (_is_row(x) and _is_row(q, x.dtype)
            and (isinstance(w, types.NoneType) or _is_row(w, x.dtype))
            and _is_scalar(keep) and _is_scalar(uniform) and _is_scalar(m)):
        return None

    def body(builder, values, scalars):
        xv, qv, wv = values
        keep_, uniform_, m_ = scalars
        qp = builder.fadd(builder.fmul(keep_, qv), uniform_)
        if wv is not None:
            qp = builder.fmul(qp, wv)
        return [qp, builder.fmul(qp, builder.fsub(xv, m_))], None

    def codegen(context, builder, sig, args):
        rows, scalars = _setup(context, builder, sig, args, (0, 1, 2), (3, 4, 5))
        return _result(context, builder, sig, _emit_lanes(context, builder, rows, scalars, body, 2))

    return types.UniTuple(types.float64, 2)(x, q, w, keep, uniform, m), codegen


@intrinsic
def row_max(typingctx, x, copy_to):
    """IEEE maximum of ``x`` (NaN if it holds a NaN), as ``x``'s type; also
    copies ``x`` into ``copy_to`` unless that is None."""
    if not (_is_row(x) and (isinstance(copy_to, types.NoneType)
                            or (_is_row(copy_to, x.dtype) and copy_to.mutable))):
        return None

    def body(builder, values, scalars):
        return [values[0]], values[0]

    def codegen(context, builder, sig, args):
        rows = [_access(context, builder, sig, args, 0)]
        target = _access(context, builder, sig, args, 1)
        result = _emit_lanes(context, builder, rows, [], body, 1, target=target, combine="max")[0]
        return context.cast(builder, result, types.float64, x.dtype)

    return x.dtype(x, copy_to), codegen
