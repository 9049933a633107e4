"""Short rows, sixteen at a time and transposed, as LLVM vector code.

A row of a few dozen classes is too short to vectorize along: the max, the
sum and the logarithm of each row would be horizontal (across the lanes of a
register) and cost more than the row's exponentials. The kernels for short
rows therefore work on *tiles*: ``TILE`` rows copied transposed into a
scratch array ``t`` of shape ``(classes, TILE)``, so that ``t[c]`` holds
class ``c`` of the sixteen rows, one row per lane. Rows whose classes are
strided (a class contiguous across rows, as in the ``(N, C, d)`` layout)
need no transpose and take the tiles at much greater lengths (``_cpu.py``
decides).
Every per-row quantity (max, sum, log, the gradient's coefficients) is then
a vector with one lane per row, and every sweep is a loop over the classes
of vertical vector operations.

Functions (``t`` is a C-contiguous ``(C, TILE)`` array of the rows' float
type, or its first ``C`` rows; per-row arrays hold ``TILE`` elements):

* ``tile_in(src, t)``: ``t[c, i] = src[i, c]`` for the ``n <= TILE`` rows of
  ``src`` (shape ``(n, C)``, any strides); lanes ``i >= n`` are 0. Rows
  contiguous along the classes are transposed in registers, 16 classes at
  a time in squares of one register per row (``transpose_width``; the last
  1 to 3 classes of a row gathered), so ``t`` needs ``C`` rounded up to 16
  rows (rows past ``C`` hold no particular values); rows contiguous along
  the rows (a class contiguous across them) are copied a vector per class.
* ``tile_out(t, dst)``: the reverse, ``dst[i, c] = t[c, i]``, writing
  nothing outside ``dst``'s elements (rows back to back may be written
  past a row's end, with the next rows' own values stored after).
* ``tile_max(t, m)``: ``m`` gets each row's largest value that is not NaN
  (-inf if none): a NaN reaches the row's results through its exponential,
  as in ``_lanes.row_max``.
* ``tile_exp_sums(t, m, s, log_s, store)``: ``s = sum_c exp(t[c] - m)`` and
  ``log(s)`` in float64; ``store``: the exponentials replace ``t``.
* ``tile_dot(t, q, w, keep, uniform, m, total, dot)``: ``total = sum_c q'``
  and ``dot = sum_c q' (t[c] - m)`` in float64, with
  ``q' = (keep q[c] + uniform) w[c]`` (``q`` None: ``q' = w[c]``; ``w``
  None: 1).
* ``tile_scale_minus(t, k1, k2, w, q, kq)``:
  ``t[c] <- t[c] k1 - (kq q[c] + k2) w[c]`` (``q``, ``w`` None: left out).

Sums run over the classes in order: groups of ``GROUP`` classes are summed
in the rows' type and the groups' sums added in float64 (one lane per row),
at least as accurate as the lane sums of ``_lanes`` used for long rows. The
order depends on nothing but the code, so results are reproducible.
"""

from __future__ import annotations

import math

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._fastmath import _const, _exp_ir, _log_ir, _prefer_wide_vectors, native_vector_bytes

#: Rows per tile: the lanes of a vector.
TILE = 16
#: Classes left at the end of a row from which the transposes beat one
#: gather (or scatter) per class.
_TRANSPOSE_MIN = 4
#: Independent running maxima in ``tile_max``.
_MAX_CHAINS = 4
#: Classes summed in the rows' type before a float64 total (see ``_group_sums``).
GROUP = 8


def _i32(v):
    return ir.Constant(ir.IntType(32), v)


def _i64(v):
    return ir.Constant(ir.IntType(64), v)


def _splat(builder, value, vty):
    vec = builder.insert_element(ir.Constant(vty, ir.Undefined), value, _i32(0))
    return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(ir.IntType(32), vty.count),
                                                        None))


def _vector_type(context, dtype):
    return ir.VectorType(context.get_data_type(dtype), TILE)


class _Array:
    """The data pointer, shape and strides (bytes) of an array argument."""

    def __init__(self, context, builder, aryty, value):
        ary = context.make_array(aryty)(context, builder, value)
        self.data = ary.data
        self.shape = cgutils.unpack_tuple(builder, ary.shape)
        self.strides = cgutils.unpack_tuple(builder, ary.strides)
        self.itemsize = context.get_abi_sizeof(context.get_data_type(aryty.dtype))
        self.vty = _vector_type(context, aryty.dtype)

    def byte_pointer(self, builder, offset):
        """Pointer to the element ``offset`` bytes past the data, as a vector pointer."""
        byte = builder.bitcast(self.data, ir.IntType(8).as_pointer())
        return builder.bitcast(builder.gep(byte, [offset]), self.vty.as_pointer())

    def element_pointer(self, builder, offset):
        byte = builder.bitcast(self.data, ir.IntType(8).as_pointer())
        return builder.bitcast(builder.gep(byte, [offset]), self.data.type)

    def row(self, builder, c):
        """Pointer to row ``c`` of a C-contiguous (rows, TILE) tile, as a vector."""
        return builder.bitcast(builder.gep(self.data, [builder.mul(c, _i64(TILE))]),
                               self.vty.as_pointer())

    def lanes(self, builder):
        """Pointer to a per-row array (TILE elements), as a vector."""
        return builder.bitcast(self.data, self.vty.as_pointer())


def _masked(builder, name, vty, args):
    fnty = ir.FunctionType(vty if name == "load" else ir.VoidType(), [a.type for a in args])
    fn = builder.module.declare_intrinsic(
        f"llvm.masked.{name}.v{vty.count}{vty.element.intrinsic_name}.p0", (), fnty)
    return builder.call(fn, args)


def _masked_load(builder, ptr, vty, mask, itemsize):
    return _masked(builder, "load", vty, [ptr, _i32(itemsize), mask, _const(vty, 0.0)])


def _masked_store(builder, value, ptr, mask, itemsize, rewritten=None):
    """Store the lanes of ``value`` that ``mask`` holds.

    ``rewritten`` (an i1, or None for false): the lanes outside the mask
    fall on memory of this call's rows that the caller writes again later,
    so the whole vector may be stored.
    """
    if native_vector_bytes() >= 64:
        _masked(builder, "store", value.type, [value, ptr, _i32(itemsize), mask])
        return

    # Without AVX-512 a masked store is microcoded on AMD CPUs (tens of
    # cycles): store the whole vector where the lanes outside are rewritten
    # later, else the lanes that are in one by one.
    def lane_by_lane():
        element = builder.bitcast(ptr, value.type.element.as_pointer())
        for j in range(value.type.count):
            with builder.if_then(builder.extract_element(mask, _i32(j))):
                builder.store(builder.extract_element(value, _i32(j)),
                              builder.gep(element, [_i64(j)]), align=itemsize)

    if rewritten is None:
        lane_by_lane()
        return
    with builder.if_else(rewritten, likely=True) as (whole, lanes):
        with whole:
            builder.store(value, ptr, align=itemsize)
        with lanes:
            lane_by_lane()


def _lanes_below(builder, count, width=TILE):
    """The mask of lanes 0 .. count - 1 of ``width`` (``count`` an i64)."""
    lanes = ir.Constant(ir.VectorType(ir.IntType(64), width), list(range(width)))
    return builder.icmp_signed("<", lanes, _splat(builder, count, lanes.type))


def _transpose(builder, rows):
    """Transpose n vectors of n lanes (n a power of two): rounds of two-input
    shuffles, each swapping the off-diagonal blocks of width d = n/2, ..., 1."""
    n = len(rows)
    d = n // 2
    while d >= 1:
        out = list(rows)
        low = [j if not j & d else n + j - d for j in range(n)]
        high = [j + d if not j & d else n + j for j in range(n)]
        for a in range(n):
            if a & d:
                continue
            b = a + d
            out[a] = builder.shuffle_vector(rows[a], rows[b], ir.Constant(
                ir.VectorType(ir.IntType(32), n), low))
            out[b] = builder.shuffle_vector(rows[a], rows[b], ir.Constant(
                ir.VectorType(ir.IntType(32), n), high))
        rows = out
        d //= 2
    return rows


def transpose_width(itemsize):
    """Side of the square blocks a 16 x 16 tile block is transposed in: one
    native register per row. Wider blocks span several registers per row,
    and their transposes no longer fit in the registers (AVX2 has 16)."""
    return max(1, min(TILE, native_vector_bytes() // itemsize))


def _transpose_block(builder, rows, tile, into_tile, n, c0, width):
    """Classes c0 .. c0 + 15 (those below ``c0 + width``) of rows contiguous
    along the classes, through register transposes of ``transpose_width``
    square blocks."""
    itemsize = _i64(rows.itemsize)
    side = transpose_width(rows.itemsize)
    vty = ir.VectorType(tile.vty.element, side)
    row_bytes = builder.mul(rows.shape[1], itemsize)
    back_to_back = builder.icmp_signed("==", rows.strides[0], row_bytes)
    tile_bytes = builder.mul(n, row_bytes)
    # Out of the tile, the classes' blocks go from last to first (rows in
    # order inside each): a row's partial last block may then spill onto the
    # next rows' first classes, which are stored afterwards.
    order = [(rb, cb) for cb in reversed(range(0, TILE, side)) for rb in range(0, TILE, side)]
    for rb, cb in order:
        # rows rb .. rb + side - 1, classes c0 + cb .. of the tile; none of
        # these classes left: nothing to move (tile rows past C are not read)
        with builder.if_then(builder.icmp_signed(">", width, _i64(cb)), likely=True):
            c = builder.add(c0, _i64(cb))
            class_ok = _lanes_below(builder, builder.sub(width, _i64(cb)), side)

            def row_access(i):
                in_rows = builder.icmp_signed("<", _i64(i), n)
                mask = builder.and_(class_ok, _splat(builder, in_rows, class_ok.type))
                offset = builder.add(builder.mul(_i64(i), rows.strides[0]),
                                     builder.mul(c, itemsize))
                ptr = builder.bitcast(rows.element_pointer(builder, offset), vty.as_pointer())
                # Past the row's end, the vector covers the next rows' first
                # classes, stored after this (see _copy_tile), when the rows
                # lie back to back and the vector inside the tile's rows.
                rewritten = builder.and_(back_to_back, builder.icmp_signed(
                    "<=", builder.add(offset, _i64(side * rows.itemsize)), tile_bytes))
                return ptr, mask, rewritten

            def tile_part(j):
                at = builder.add(builder.mul(builder.add(c, _i64(j)), _i64(TILE)), _i64(rb))
                return builder.bitcast(builder.gep(tile.data, [at]), vty.as_pointer())

            # Blocks wholly inside the rows use plain loads and stores:
            # masked ones cost more (see _masked_store).
            inside = builder.and_(builder.icmp_signed(">=", n, _i64(rb + side)),
                                  builder.icmp_signed(">=", width, _i64(cb + side)))
            with builder.if_else(inside, likely=True) as (whole, edge):
                for masked, branch in ((False, whole), (True, edge)):
                    with branch:
                        _move_block(builder, rows, into_tile, vty, range(rb, rb + side),
                                    row_access, tile_part, masked)


def _move_block(builder, rows, into_tile, vty, row_numbers, row_access, tile_part, masked):
    """One square block between rows and tile, transposed in registers."""
    side = vty.count
    if into_tile:
        loaded = []
        for i in row_numbers:
            ptr, mask, _ = row_access(i)
            loaded.append(_masked_load(builder, ptr, vty, mask, rows.itemsize) if masked
                          else builder.load(ptr, align=rows.itemsize))
        for j, vec in enumerate(_transpose(builder, loaded)):
            builder.store(vec, tile_part(j), align=rows.itemsize)
    else:
        loaded = [builder.load(tile_part(j), align=rows.itemsize) for j in range(side)]
        for i, vec in zip(row_numbers, _transpose(builder, loaded)):
            ptr, mask, rewritten = row_access(i)
            if masked:
                _masked_store(builder, vec, ptr, mask, rows.itemsize, rewritten)
            else:
                builder.store(vec, ptr, align=rows.itemsize)


def _gather_class(builder, rows, tile, into_tile, row_ok, c):
    """Class ``c`` of the rows, one gather (or scatter) across them: cheaper
    than a transpose for the last few classes of a row."""
    i64 = ir.IntType(64)
    lanes = ir.VectorType(i64, TILE)
    base = builder.add(builder.ptrtoint(rows.data, i64), builder.mul(c, _i64(rows.itemsize)))
    offsets = builder.mul(ir.Constant(lanes, list(range(TILE))),
                          _splat(builder, rows.strides[0], lanes))
    pointers_ty = ir.VectorType(rows.data.type, TILE)
    pointers = builder.inttoptr(builder.add(_splat(builder, base, lanes), offsets), pointers_ty)
    vty = tile.vty
    suffix = f"v{TILE}{vty.element.intrinsic_name}.v{TILE}p0"
    at = tile.row(builder, c)
    if into_tile:
        fn = builder.module.declare_intrinsic(f"llvm.masked.gather.{suffix}", (), ir.FunctionType(
            vty, [pointers_ty, ir.IntType(32), row_ok.type, vty]))
        value = builder.call(fn, [pointers, _i32(rows.itemsize), row_ok, _const(vty, 0.0)])
        builder.store(value, at, align=rows.itemsize)
    else:
        fn = builder.module.declare_intrinsic(f"llvm.masked.scatter.{suffix}", (), ir.FunctionType(
            ir.VoidType(), [vty, pointers_ty, ir.IntType(32), row_ok.type]))
        builder.call(fn, [builder.load(at, align=rows.itemsize), pointers, _i32(rows.itemsize),
                          row_ok])


def _copy_tile(builder, rows, tile, into_tile):
    """Move ``rows`` (n x C, any strides) into the tile, or the tile into it.

    Three layouts: contiguous along the classes (transposed in registers,
    the last few classes gathered), contiguous along the rows (a vector per
    class, as in PyTorch's (N, C, d1, ...) layout), or neither (element by
    element).
    """
    (n, C), (row_stride, class_stride) = rows.shape, rows.strides
    itemsize = _i64(rows.itemsize)
    vty = tile.vty
    row_ok = _lanes_below(builder, n)
    with builder.if_else(builder.icmp_signed("==", class_stride, itemsize), likely=True) as (
            classes_contiguous, other):
        with classes_contiguous:
            # blocks of TILE classes, the last first (see _transpose_block)
            blocks = builder.sdiv(builder.add(C, _i64(TILE - 1)), _i64(TILE))
            with cgutils.for_range(builder, blocks) as loop:
                c0 = builder.mul(builder.sub(builder.sub(blocks, _i64(1)), loop.index),
                                 _i64(TILE))
                width = builder.sub(C, c0)
                with builder.if_else(builder.icmp_signed(">=", width, _i64(_TRANSPOSE_MIN)),
                                     likely=True) as (block, last_few):
                    with block:
                        _transpose_block(builder, rows, tile, into_tile, n, c0, width)
                    with last_few:
                        with cgutils.for_range_slice(builder, c0, C, _i64(1)) as (c, _):
                            _gather_class(builder, rows, tile, into_tile, row_ok, c)
        with other:
            with builder.if_else(builder.icmp_signed("==", row_stride, itemsize)) as (
                    rows_contiguous, strided):
                with rows_contiguous:
                    # a full tile moves with plain loads and stores (see
                    # _transpose_block), a partial one with masked ones
                    full = builder.icmp_signed("==", n, _i64(TILE))
                    with builder.if_else(full, likely=True) as (whole, part):
                        for masked, branch in ((False, whole), (True, part)):
                            with branch, cgutils.for_range(builder, C) as loop:
                                at = rows.byte_pointer(builder,
                                                       builder.mul(loop.index, class_stride))
                                row = tile.row(builder, loop.index)
                                if into_tile:
                                    vec = (_masked_load(builder, at, vty, row_ok, rows.itemsize)
                                           if masked else builder.load(at, align=rows.itemsize))
                                    builder.store(vec, row, align=rows.itemsize)
                                else:
                                    vec = builder.load(row, align=rows.itemsize)
                                    if masked:
                                        _masked_store(builder, vec, at, row_ok, rows.itemsize)
                                    else:
                                        builder.store(vec, at, align=rows.itemsize)
                with strided:
                    with cgutils.for_range(builder, C) as loop:
                        c = loop.index
                        ptr = builder.bitcast(tile.row(builder, c), tile.data.type)
                        for i in range(TILE):
                            lane = builder.gep(ptr, [_i64(i)])
                            in_rows = builder.icmp_signed("<", _i64(i), n)
                            offset = builder.add(builder.mul(_i64(i), row_stride),
                                                 builder.mul(c, class_stride))
                            with builder.if_then(in_rows):
                                element = rows.element_pointer(builder, offset)
                                if into_tile:
                                    builder.store(builder.load(element), lane)
                                else:
                                    builder.store(builder.load(lane), element)
                            if into_tile:
                                with builder.if_then(builder.not_(in_rows)):
                                    builder.store(_const(vty.element, 0.0), lane)


def _is_tile(t, dtype=None):
    return (isinstance(t, types.Array) and t.ndim == 2 and t.layout == "C"
            and isinstance(t.dtype, types.Float) and (dtype is None or t.dtype == dtype))


def _is_lanes(a, dtype):
    return isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == dtype


def _optional(a, check):
    return isinstance(a, types.NoneType) or check(a)


def _copy_codegen(rows_arg, tile_arg, into_tile):
    """Code generation of ``tile_in``/``tile_out``: the argument positions of
    the rows and the tile, and the direction."""
    def codegen(context, builder, sig, args):
        _prefer_wide_vectors(builder)
        _copy_tile(builder, _Array(context, builder, sig.args[rows_arg], args[rows_arg]),
                   _Array(context, builder, sig.args[tile_arg], args[tile_arg]), into_tile)
        return context.get_dummy_value()

    return codegen


@intrinsic
def tile_in(typingctx, src, t):
    """``t[c, i] = src[i, c]``; lanes past ``src``'s rows are 0."""
    if not (isinstance(src, types.Array) and src.ndim == 2 and _is_tile(t, src.dtype)
            and t.mutable):
        return None
    return types.none(src, t), _copy_codegen(0, 1, True)


@intrinsic
def tile_out(typingctx, t, dst):
    """``dst[i, c] = t[c, i]`` for the rows of ``dst``."""
    if not (isinstance(dst, types.Array) and dst.ndim == 2 and dst.mutable
            and _is_tile(t, dst.dtype)):
        return None
    return types.none(t, dst), _copy_codegen(1, 0, False)


def _class_loop(builder, tile):
    return cgutils.for_range(builder, tile.shape[0])


@intrinsic
def tile_max(typingctx, t, m):
    """Each lane's largest value that is not NaN (-inf if none) into ``m``."""
    if not (_is_tile(t) and _is_lanes(m, t.dtype) and m.mutable):
        return None

    def codegen(context, builder, sig, args):
        _prefer_wide_vectors(builder)
        tile = _Array(context, builder, sig.args[0], args[0])
        out = _Array(context, builder, sig.args[1], args[1])
        vty = tile.vty
        # Four independent maxima (classes c mod 4): one compare-and-select
        # chain would wait on its own latency at every class.
        largest = [cgutils.alloca_once_value(builder, _const(vty, -math.inf))
                   for _ in range(_MAX_CHAINS)]
        C = tile.shape[0]
        chains = _i64(_MAX_CHAINS)
        with cgutils.for_range_slice(builder, _i64(0), C, chains) as (c0, _):
            for k, acc in enumerate(largest):
                c = builder.add(c0, _i64(k))
                with builder.if_then(builder.icmp_signed("<", c, C), likely=True):
                    x = builder.load(tile.row(builder, c), align=tile.itemsize)
                    best = builder.load(acc)
                    builder.store(builder.select(builder.fcmp_ordered(">", x, best), x, best), acc)
        best = builder.load(largest[0])
        for acc in largest[1:]:
            x = builder.load(acc)
            best = builder.select(builder.fcmp_ordered(">", x, best), x, best)
        builder.store(best, out.lanes(builder), align=tile.itemsize)
        return context.get_dummy_value()

    return types.none(t, m), codegen


def _widen(builder, vec):
    f64 = ir.VectorType(ir.DoubleType(), TILE)
    return vec if vec.type == f64 else builder.fpext(vec, f64)


def _group_sums(builder, tile, n_sums, terms):
    """Loop over the classes; return ``n_sums`` float64 vectors of sums.

    ``terms(c)`` emits the code for class ``c`` and returns its ``n_sums``
    term vectors. Classes are summed in groups of ``GROUP`` in the rows'
    type, in class order, and the groups' sums added in float64: as accurate
    as float64 sums to within a few units in the last place of a group, for
    a third of the cost (widening every term takes five instructions).
    """
    vty, f64 = tile.vty, ir.VectorType(ir.DoubleType(), TILE)
    totals = [cgutils.alloca_once_value(builder, _const(f64, 0.0)) for _ in range(n_sums)]
    groups = [cgutils.alloca_once(builder, vty) for _ in range(n_sums)]
    C = tile.shape[0]
    with cgutils.for_range_slice(builder, _i64(0), C, _i64(GROUP)) as (c0, _):
        for acc in groups:
            builder.store(_const(vty, 0.0), acc)
        end = builder.add(c0, _i64(GROUP))
        end = builder.select(builder.icmp_signed("<", end, C), end, C)
        with cgutils.for_range_slice(builder, c0, end, _i64(1)) as (c, _):
            for acc, term in zip(groups, terms(c)):
                builder.store(builder.fadd(builder.load(acc), term), acc)
        for total, acc in zip(totals, groups):
            builder.store(builder.fadd(builder.load(total), _widen(builder, builder.load(acc))),
                          total)
    return [builder.load(t) for t in totals]


@intrinsic
def tile_exp_sums(typingctx, t, m, s, log_s, store):
    """``s = sum_c exp(t[c] - m)``, ``log_s = log(s)`` (float64); with
    ``store`` the exponentials replace ``t``."""
    if not (_is_tile(t) and _is_lanes(m, t.dtype) and _is_lanes(s, types.float64)
            and _is_lanes(log_s, types.float64) and s.mutable and log_s.mutable
            and isinstance(store, types.Boolean)):
        return None

    def codegen(context, builder, sig, args):
        _prefer_wide_vectors(builder)
        tile = _Array(context, builder, sig.args[0], args[0])
        shift = builder.load(_Array(context, builder, sig.args[1], args[1]).lanes(builder),
                             align=tile.itemsize)
        result = cgutils.alloca_once(builder, ir.VectorType(ir.DoubleType(), TILE))

        def sweep(write):
            def term(c):
                at = tile.row(builder, c)
                e = _exp_ir(builder, builder.fsub(builder.load(at, align=tile.itemsize), shift))
                if write:
                    builder.store(e, at, align=tile.itemsize)
                return [e]
            builder.store(_group_sums(builder, tile, 1, term)[0], result)

        with builder.if_else(args[4]) as (then, otherwise):
            with then:
                sweep(True)
            with otherwise:
                sweep(False)
        result = builder.load(result)
        builder.store(result, _Array(context, builder, sig.args[2], args[2]).lanes(builder),
                      align=8)
        builder.store(_log_ir(builder, result),
                      _Array(context, builder, sig.args[3], args[3]).lanes(builder), align=8)
        return context.get_dummy_value()

    return types.none(t, m, s, log_s, store), codegen


def _is_scalar(s):
    return isinstance(s, (types.Float, types.Integer))


def _class_weight(builder, weights, c, vty):
    """``w[c]`` splatted, or None without weights."""
    if weights is None:
        return None
    at = weights.element_pointer(builder, builder.mul(c, weights.strides[0]))
    return _splat(builder, builder.load(at), vty)


def _optional_array(context, builder, sig, args, i):
    if isinstance(sig.args[i], types.NoneType):
        return None
    return _Array(context, builder, sig.args[i], args[i])


@intrinsic
def tile_dot(typingctx, t, q, w, keep, uniform, m, total, dot):
    """``total = sum_c q'``, ``dot = sum_c q' (t[c] - m)`` in float64, with
    ``q' = (keep q[c] + uniform) w[c]`` (``q`` None: ``w[c]``)."""
    if not (_is_tile(t) and _optional(q, lambda a: _is_tile(a, t.dtype))
            and _optional(w, lambda a: isinstance(a, types.Array) and a.ndim == 1
                          and a.dtype == t.dtype)
            and _is_scalar(keep) and _is_scalar(uniform) and _is_lanes(m, t.dtype)
            and _is_lanes(total, types.float64) and _is_lanes(dot, types.float64)
            and total.mutable and dot.mutable):
        return None

    def codegen(context, builder, sig, args):
        _prefer_wide_vectors(builder)
        tile = _Array(context, builder, sig.args[0], args[0])
        probs = _optional_array(context, builder, sig, args, 1)
        weights = _optional_array(context, builder, sig, args, 2)
        vty = tile.vty
        keep_ = _splat(builder, context.cast(builder, args[3], sig.args[3], t.dtype), vty)
        uniform_ = _splat(builder, context.cast(builder, args[4], sig.args[4], t.dtype), vty)
        shift = builder.load(_Array(context, builder, sig.args[5], args[5]).lanes(builder),
                             align=tile.itemsize)

        def terms(c):
            x = builder.load(tile.row(builder, c), align=tile.itemsize)
            if probs is None:
                qp = _const(vty, 1.0)
            else:
                qv = builder.load(probs.row(builder, c), align=tile.itemsize)
                qp = builder.fadd(builder.fmul(keep_, qv), uniform_)
            wc = _class_weight(builder, weights, c, vty)
            if wc is not None:
                qp = builder.fmul(qp, wc) if probs is not None else wc
            return [qp, builder.fmul(qp, builder.fsub(x, shift))]

        sums = _group_sums(builder, tile, 2, terms)
        for value, i in zip(sums, (6, 7)):
            builder.store(value,
                          _Array(context, builder, sig.args[i], args[i]).lanes(builder), align=8)
        return context.get_dummy_value()

    return types.none(t, q, w, keep, uniform, m, total, dot), codegen


@intrinsic
def tile_scale_minus(typingctx, t, k1, k2, w, q, kq):
    """``t[c] <- t[c] k1 - (kq q[c] + k2) w[c]`` (``q``, ``w`` None: left out)."""
    if not (_is_tile(t) and t.mutable and _is_lanes(k1, t.dtype) and _is_lanes(k2, t.dtype)
            and _optional(w, lambda a: isinstance(a, types.Array) and a.ndim == 1
                          and a.dtype == t.dtype)
            and _optional(q, lambda a: _is_tile(a, t.dtype)) and _is_scalar(kq)):
        return None

    def codegen(context, builder, sig, args):
        _prefer_wide_vectors(builder)
        tile = _Array(context, builder, sig.args[0], args[0])
        vty = tile.vty
        a = builder.load(_Array(context, builder, sig.args[1], args[1]).lanes(builder),
                         align=tile.itemsize)
        b = builder.load(_Array(context, builder, sig.args[2], args[2]).lanes(builder),
                         align=tile.itemsize)
        weights = _optional_array(context, builder, sig, args, 3)
        probs = _optional_array(context, builder, sig, args, 4)
        kq_ = _splat(builder, context.cast(builder, args[5], sig.args[5], t.dtype), vty)
        with _class_loop(builder, tile) as loop:
            c = loop.index
            at = tile.row(builder, c)
            shift = b
            if probs is not None:
                qv = builder.load(probs.row(builder, c), align=tile.itemsize)
                shift = builder.fadd(builder.fmul(kq_, qv), b)
            wc = _class_weight(builder, weights, c, vty)
            if wc is not None:
                shift = builder.fmul(shift, wc)
            value = builder.fsub(builder.fmul(builder.load(at, align=tile.itemsize), a), shift)
            builder.store(value, at, align=tile.itemsize)
        return context.get_dummy_value()

    return types.none(t, k1, k2, w, q, kq), codegen


