"""Fixed-order sums over a row, written as LLVM vector code.

Every sum in the kernels has its order fixed by the code, so that results do
not depend on how LLVM compiles a loop (serial or parallel variant, vector
width, a cache written by another process): the fast-math flags leave out
``reassoc``. Without it LLVM keeps a sum loop scalar, and a loop over an
explicit array of partial sums does not vectorize either (the vectorizer
cannot prove that the scratch array and the row do not overlap), and a
scalar sum is many times slower than a vector loop.

The intrinsics here emit the loop themselves on ``<LANES x T>`` vectors (T
the rows' float type). The order, for every function: the row is cut into
blocks of ``BLOCK`` elements; in a block, lane ``j`` sums the terms of
elements ``j, j + LANES, j + 2 LANES, ...``, in T (the block's last vector,
if partial, is a masked one: its missing lanes add 0); the lanes are folded
pairwise (lane ``j`` plus lane ``j + 8``, then ``j + 4``, ``j + 2``,
``j + 1``); and the total, in float64, gains ``float64(lanes)`` block after
block. The float64 totals keep float32 sums of 100000 terms accurate.

Functions (rows are 1-D arrays of one float type; ``w`` may be None):

* ``lane_dot(x, w, shift)``: sum of ``w * (x - shift)`` (of ``x - shift``
  without ``w``).
* ``exp_sum(x, m, ahead)``: sum of ``exp(x - m)``.
* ``exp_sum_inplace(g, m, ahead)``: ``g <- exp(g - m)``, returns the sum.
  Both prefetch the row ``ahead`` (None: none) as they go: a kernel passes
  the next row, which memory then streams in while this one is computed.
* ``soft_sums(x, q, w, keep, uniform, m, ahead)``: ``(sum q', sum q' *
  (x - m))`` with ``q' = (keep * q + uniform) * w``, prefetching ``ahead``.
* ``capped_exp_sums(x, z, w, a, cap, m, ahead)``: ``z <- cap tanh(a x)``
  (the softcap), returns ``(sum exp(z - m), sum w (z - m))``;
  ``capped_exp_slopes(x, g, a, cap, m, ahead)``: ``g <- exp(z - m) (1 - t^2)``,
  t = tanh(a x), returns ``sum exp(z - m)``;
  ``capped_grad(g, w, k1, k2, m, inv_cap, k)``: the gradient from the capped
  row ``g`` holds, ``g <- (k1 exp(g - m) - k2 w) k (1 - (g inv_cap)^2)``.
* ``half_row_max(x, copy_to, brain)``, ``half_exp_sum(x, g, m, ahead,
  brain)``, ``scale_minus_half(e, g, k1, k2, w, brain)``: ``row_max``,
  ``exp_sum`` (storing into ``g`` unless None) and ``scale_minus`` (into
  ``g``) where ``x`` or ``g`` is a row of 16-bit float bits (uint16;
  ``brain``, a literal: bfloat16, else float16), converted in registers:
  the kernels for 16-bit logits read and write their rows once.
* ``row_argmax(x, copy_to)``: ``row_max``'s value, the first index holding
  it and whether the row holds a NaN, in the same sweep.
* ``row_max(x, copy_to)``: the largest value of ``x`` that is not NaN
  (-inf if none; exact in any order: ``max_lanes`` lanes), copying ``x``
  into ``copy_to`` on the way unless it is None. A NaN in the row needs no
  flag of its own: ``exp(NaN - m)`` makes the row's sum NaN, and with it
  every loss, gradient and softmax of the row.

The exponential is ``_fastmath``'s, on whole vectors. Rows may be strided:
a row whose type does not promise unit stride is checked when called, and a
strided one is gathered (and scattered) lane by lane: same order, same bits.
"""

from __future__ import annotations

import math

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._fastmath import (_call, _const, _exp_ir, _prefer_wide_vectors, _tanh_ir, cpu_has,
                        native_vector_bytes)

#: Partial sums per vector (one 512-bit register of float32).
LANES = 16
#: Native registers per accumulator of the max: its order does not matter,
#: and four independent registers keep its loop from waiting on one.
MAX_REGISTERS = 4
#: Elements per block: the lanes are folded into the float64 total per block.
BLOCK = 512
#: Lanes of ``scale_minus_half``'s vectors (a map: no order to keep): two
#: registers of float32 round into one register of bfloat16 bits with one
#: shuffle, where one register takes a shift and a narrowing store (twice
#: as slow on AMD Zen 4).
HALF_STORE_LANES = 32


def _i32(v):
    return ir.Constant(ir.IntType(32), v)


class _RowAccess:
    """Vector loads and stores of one 1-D array argument.

    ``remaining`` (None: a whole vector) limits an access to the lanes
    below it: masked loads and stores for a contiguous row, lane by lane
    for a strided one (masked-off lanes read element ``index`` again and
    write nothing). Masked-off lanes of a load hold no particular value.
    """

    def __init__(self, context, builder, aryty, value):
        ary = context.make_array(aryty)(context, builder, value)
        self.data = ary.data
        self.size = builder.extract_value(ary.shape, 0)
        self.stride = builder.extract_value(ary.strides, 0)
        self.itemsize = context.get_abi_sizeof(context.get_data_type(aryty.dtype))
        self.unit_stride_type = aryty.layout in "CF"

    @property
    def value_type(self):
        """The LLVM type of the values the loop computes with."""
        return self.data.type.pointee

    def unit_stride(self, builder):
        """Whether the row's elements are adjacent (checked when called)."""
        return builder.icmp_signed("==", self.stride, ir.Constant(self.stride.type, self.itemsize))

    def _pointer(self, builder, index, contiguous):
        if contiguous:
            return builder.gep(self.data, [index], inbounds=True)
        byte = builder.bitcast(self.data, ir.IntType(8).as_pointer())
        byte = builder.gep(byte, [builder.mul(index, self.stride)], inbounds=True)
        return builder.bitcast(byte, self.data.type)

    def _masked(self, builder, name, vty, args):
        fnty = ir.FunctionType(vty if name == "load" else ir.VoidType(),
                               [a.type for a in args])
        suffix = f"v{vty.count}{vty.element.intrinsic_name}.p0"
        fn = builder.module.declare_intrinsic(f"llvm.masked.{name}.{suffix}", (), fnty)
        return builder.call(fn, args)

    def _lane_index(self, builder, index, j, remaining):
        """index + j, or index where lane j is masked off (always in bounds)."""
        at = builder.add(index, ir.Constant(index.type, j))
        if remaining is None:
            return at
        return builder.select(builder.icmp_signed("<", ir.Constant(index.type, j), remaining),
                              at, index)

    def load(self, builder, index, vty, contiguous, mask=None, remaining=None):
        if contiguous:
            ptr = builder.bitcast(self._pointer(builder, index, True), vty.as_pointer())
            if mask is None:
                return builder.load(ptr, align=self.itemsize)
            return self._masked(builder, "load", vty,
                                [ptr, _i32(self.itemsize), mask, ir.Constant(vty, None)])
        vec = ir.Constant(vty, ir.Undefined)
        for j in range(vty.count):
            at = self._lane_index(builder, index, j, remaining)
            value = builder.load(self._pointer(builder, at, False), align=self.itemsize)
            vec = builder.insert_element(vec, value, _i32(j))
        return vec

    def prefetch(self, builder, index, count):
        """Start loading elements [index, index + count) into cache (for
        writing: the kernels overwrite the rows they prefetch, or read them)."""
        byte = builder.bitcast(self.data, ir.IntType(8).as_pointer())
        fnty = ir.FunctionType(ir.VoidType(), [byte.type] + [ir.IntType(32)] * 3)
        fn = builder.module.declare_intrinsic("llvm.prefetch.p0", (), fnty)
        start = builder.mul(index, self.stride)
        for line in range(0, count * self.itemsize, 64):
            # a plain (not inbounds) address: prefetching past the row is harmless
            at = builder.gep(byte, [builder.add(start, ir.Constant(start.type, line))])
            builder.call(fn, [at, _i32(1), _i32(3), _i32(1)])

    def store(self, builder, index, value, contiguous, mask=None, remaining=None):
        vty = value.type
        if contiguous:
            ptr = builder.bitcast(self._pointer(builder, index, True), vty.as_pointer())
            if mask is None:
                builder.store(value, ptr, align=self.itemsize)
            else:
                self._masked(builder, "store", vty, [value, ptr, _i32(self.itemsize), mask])
            return
        for j in range(vty.count):
            at = builder.add(index, ir.Constant(index.type, j))
            lane = builder.extract_element(value, _i32(j))
            if remaining is None:
                builder.store(lane, self._pointer(builder, at, False), align=self.itemsize)
            else:
                in_row = builder.icmp_signed("<", ir.Constant(index.type, j), remaining)
                with builder.if_then(in_row):
                    builder.store(lane, self._pointer(builder, at, False), align=self.itemsize)


class _HalfAccess(_RowAccess):
    """A row of 16-bit float bits (uint16) that the loop sees as float32:
    loads widen in registers, stores round to nearest even (``brain``:
    bfloat16, else float16), with ``_half``'s conversions, bit for bit.

    float16 is LLVM's ``fpext``/``fptrunc`` of ``half`` (F16C's
    ``vcvtph2ps``/``vcvtps2ph``); bfloat16 a shift left by 16 to widen and,
    to narrow, ``(u + 0x7fff + ((u >> 16) & 1)) >> 16`` with a NaN kept
    quiet, ``(u >> 16) | 0x40``, in integer vector instructions, or where
    the CPU has AVX-512 BF16 by its conversion instruction, save for
    subnormals (``_bf16_bits_avx512``).
    """

    def __init__(self, context, builder, aryty, value, brain):
        super().__init__(context, builder, aryty, value)
        self.brain = brain

    @property
    def value_type(self):
        return ir.FloatType()

    def load(self, builder, index, vty, contiguous, mask=None, remaining=None):
        bits = super().load(builder, index, ir.VectorType(ir.IntType(16), vty.count),
                            contiguous, mask, remaining)
        if not self.brain:
            return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), vty.count)),
                                 vty)
        i32 = ir.VectorType(ir.IntType(32), vty.count)
        return builder.bitcast(builder.shl(builder.zext(bits, i32), _splat_int(i32, 16)), vty)

    def store(self, builder, index, value, contiguous, mask=None, remaining=None):
        n = value.type.count
        if self.brain and n % 32 == 0 and bf16_instructions():
            bits = _bf16_bits_avx512(builder, value)
        elif self.brain:
            bits = _bf16_bits(builder, value)
        else:
            bits = builder.bitcast(builder.fptrunc(value, ir.VectorType(ir.HalfType(), n)),
                                   ir.VectorType(ir.IntType(16), n))
        super().store(builder, index, bits, contiguous, mask, remaining)


def _bf16_bits(builder, value):
    """The bfloat16 bits of a float32 vector, rounded to nearest even, NaN
    kept quiet (``_half._f32_to_bf16``), in integer instructions."""
    n = value.type.count
    i32 = ir.VectorType(ir.IntType(32), n)
    u = builder.bitcast(value, i32)
    lowest_kept = builder.and_(builder.lshr(u, _splat_int(i32, 16)), _splat_int(i32, 1))
    rounded = builder.add(u, builder.add(_splat_int(i32, 0x7fff), lowest_kept))
    nan = builder.fcmp_unordered("uno", value, value)
    quiet = builder.or_(u, _splat_int(i32, 0x40 << 16))
    halves = builder.bitcast(builder.select(nan, quiet, rounded),
                             ir.VectorType(ir.IntType(16), 2 * n))
    return builder.shuffle_vector(halves, halves, _indices(range(1, 2 * n, 2)))


def _bf16_bits_avx512(builder, value):
    """``_bf16_bits`` by AVX-512 BF16's ``vcvtne2ps2bf16`` (two registers
    into one, the same rounding and NaN), where no lane is subnormal: the
    instruction flushes those to zero, ``_bf16_bits`` rounds them (a branch
    that gradients of ordinary rows never take)."""
    n = value.type.count
    i16 = ir.IntType(16)
    f16x = ir.VectorType(ir.FloatType(), 16)
    convert = ir.FunctionType(ir.VectorType(_BFloat(), 32), [f16x, f16x])
    fn = builder.module.declare_intrinsic("llvm.x86.avx512bf16.cvtne2ps2bf16.512", (), convert)
    # vfpclassps's subnormal test, one instruction per register
    classify = builder.module.declare_intrinsic(
        "llvm.x86.avx512.fpclass.ps.512", (),
        ir.FunctionType(ir.VectorType(ir.IntType(1), 16), [f16x, ir.IntType(32)]))
    registers = [builder.shuffle_vector(value, value, _indices(range(k, k + 16)))
                 for k in range(0, n, 16)]
    # the first operand goes to the upper half
    parts = [builder.bitcast(builder.call(fn, [hi, lo]), ir.VectorType(i16, 32))
             for lo, hi in zip(registers[0::2], registers[1::2])]
    while len(parts) > 1:
        parts = [builder.shuffle_vector(a, b, _indices(range(2 * a.type.count)))
                 for a, b in zip(parts[0::2], parts[1::2])]
    subnormal = None
    for register in registers:
        found = builder.bitcast(builder.call(classify, [register, _i32(0x20)]), ir.IntType(16))
        subnormal = found if subnormal is None else builder.or_(subnormal, found)
    any_subnormal = builder.icmp_unsigned("!=", subnormal, ir.Constant(ir.IntType(16), 0))
    result = cgutils.alloca_once_value(builder, parts[0])
    with builder.if_then(any_subnormal, likely=False):
        builder.store(_bf16_bits(builder, value), result)
    return builder.load(result)


class _BFloat(ir.types._BaseFloatType):
    """LLVM's ``bfloat`` (llvmlite has no such type): only to declare the
    conversion intrinsic, whose result is bit-cast to integers at once."""

    null = "0.0"
    intrinsic_name = "bf16"

    def __str__(self):
        return "bfloat"


_BFloat._create_instance()


def bf16_instructions() -> bool:
    """Whether the CPU Numba compiles for has AVX-512 BF16."""
    return cpu_has("avx512bf16")


def _splat_int(ty, v):
    return ir.Constant(ty, [ir.Constant(ty.element, v)] * ty.count)


def max_lanes(fty) -> int:
    """Lanes of the max's vectors for float type ``fty``: ``MAX_REGISTERS``
    native registers, at most 64: enough independent maxima to keep the
    vector units busy. A fixed 64 lanes would be 16 AVX2 registers of
    float64, which the loop would spill to the stack."""
    itemsize = 8 if isinstance(fty, ir.DoubleType) else 4
    return min(64, MAX_REGISTERS * native_vector_bytes() // itemsize)


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
    return builder.extract_element(vec, _i32(0))


def _emit_lanes(context, builder, rows, scalars, body, n_sums, target=None, combine="sum",
                ahead=None, lanes_per_vector=None):
    """Emit the blocked lane loop; returns ``n_sums`` float64 results.

    ``rows``: _RowAccess objects to load (None for an absent optional row),
    the first one gives the length. ``scalars``: LLVM values of the rows'
    float type. ``body(builder, values, scalars)`` gets vectors of the rows'
    elements (None for absent rows) and of the scalars, and returns
    ``(terms, stored)``: ``n_sums`` vectors to combine and a vector to store
    into the row ``target`` (or None). ``combine``: "sum", or "max" for the
    largest value that is not NaN (-inf if none; exact, so its order does
    not matter; one compare-and-select, x86's ``vmaxps``). A block's last,
    partial vector is masked: its missing lanes add the identity (0, -inf).
    ``ahead``: a row (the next one a kernel will read) prefetched at the same
    offsets as the loop goes, so that memory streams it while this row is
    worked on in cache. ``lanes_per_vector``: LANES for sums (their order
    depends on it), ``max_lanes`` or less for the max.
    """
    _prefer_wide_vectors(builder)
    fty = rows[0].value_type
    if lanes_per_vector is None:
        lanes_per_vector = LANES if combine == "sum" else max_lanes(fty)
    vty = ir.VectorType(fty, lanes_per_vector)
    f64 = ir.DoubleType()
    intp = rows[0].size.type
    size = rows[0].size
    present = [r for r in rows + [target] if r is not None]  # ``ahead`` need not be unit-stride
    start = 0.0 if combine == "sum" else -math.inf
    identity = _const(vty, start)

    def add(a, b):
        if combine == "sum":
            return builder.fadd(a, b)
        return builder.select(builder.fcmp_ordered(">", b, a), b, a)

    totals = [cgutils.alloca_once_value(builder, ir.Constant(f64, start)) for _ in range(n_sums)]
    lanes = [cgutils.alloca_once(builder, vty) for _ in range(n_sums)]

    def splat(value, ty):
        vec = builder.insert_element(ir.Constant(ty, ir.Undefined), value, _i32(0))
        return builder.shuffle_vector(vec, vec, ir.Constant(
            ir.VectorType(ir.IntType(32), ty.count), None))

    vector_scalars = [splat(s, vty) for s in scalars]
    lane_numbers = ir.Constant(ir.VectorType(intp, vty.count), list(range(vty.count)))

    def step(index, contiguous, remaining=None):
        mask = None
        if remaining is not None:
            mask = builder.icmp_signed("<", lane_numbers,
                                       splat(remaining, ir.VectorType(intp, vty.count)))
        values = [None if r is None else r.load(builder, index, vty, contiguous, mask, remaining)
                  for r in rows]
        if ahead is not None and remaining is None:
            ahead.prefetch(builder, index, vty.count)
        terms, stored = body(builder, values, vector_scalars)
        if stored is not None and target is not None:
            target.store(builder, index, stored, contiguous, mask, remaining)
        for acc, term in zip(lanes, terms):
            if mask is not None:
                term = builder.select(mask, term, identity)
            builder.store(add(builder.load(acc), term), acc)

    def loop(contiguous):
        block = ir.Constant(intp, BLOCK)
        with cgutils.for_range_slice(builder, ir.Constant(intp, 0), size, block, intp) as (b0, _):
            rest = builder.sub(size, b0)
            n = builder.select(builder.icmp_signed("<", rest, block), rest, block)
            full = builder.and_(n, ir.Constant(intp, -vty.count))
            for acc in lanes:
                builder.store(identity, acc)
            with cgutils.for_range_slice(builder, b0, builder.add(b0, full),
                                         ir.Constant(intp, vty.count), intp) as (c, _):
                step(c, contiguous)
            remaining = builder.sub(n, full)
            with builder.if_then(builder.icmp_signed(">", remaining, ir.Constant(intp, 0))):
                step(builder.add(b0, full), contiguous, remaining)
            for total, acc in zip(totals, lanes):
                folded = _fold(builder, builder.load(acc), add)
                builder.store(add(builder.load(total), widen(folded)), total)

    def widen(value):
        return value if fty == f64 else builder.fpext(value, f64)

    if all(r.unit_stride_type for r in present):
        loop(True)
    else:
        all_unit = cgutils.true_bit
        for r in present:
            if not r.unit_stride_type:
                all_unit = builder.and_(all_unit, r.unit_stride(builder))
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


def _is_ahead(a, like):
    """None, or a row to prefetch: of ``like``'s dtype, or 16-bit bits
    (the next row of a 16-bit kernel, at the same element offsets)."""
    return isinstance(a, types.NoneType) or _is_row(a, like.dtype) or _is_half_row(a)


def _is_half_row(a):
    return isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.uint16


@intrinsic
def exp_sum(typingctx, x, m, ahead):
    """Sum of ``exp(x - m)`` in float64; ``x`` is not written. ``ahead``
    (a row or None) is prefetched on the way."""
    if not (_is_row(x) and _is_scalar(m) and _is_ahead(ahead, x)):
        return None

    def body(builder, values, scalars):
        return [_exp_ir(builder, builder.fsub(values[0], scalars[0]))], None

    def codegen(context, builder, sig, args):
        rows, scalars = _setup(context, builder, sig, args, (0,), (1,))
        return _result(context, builder, sig, _emit_lanes(
            context, builder, rows, scalars, body, 1,
            ahead=_access(context, builder, sig, args, 2)))

    return types.float64(x, m, ahead), codegen


@intrinsic
def exp_sum_inplace(typingctx, g, m, ahead):
    """``g <- exp(g - m)``; returns the sum in float64. ``ahead`` (a row or
    None) is prefetched on the way."""
    if not (_is_row(g) and g.mutable and _is_scalar(m) and _is_ahead(ahead, g)):
        return None

    def body(builder, values, scalars):
        e = _exp_ir(builder, builder.fsub(values[0], scalars[0]))
        return [e], e

    def codegen(context, builder, sig, args):
        rows, scalars = _setup(context, builder, sig, args, (0,), (1,))
        return _result(context, builder, sig, _emit_lanes(
            context, builder, rows, scalars, body, 1, target=rows[0],
            ahead=_access(context, builder, sig, args, 2)))

    return types.float64(g, m, ahead), codegen


@intrinsic
def half_exp_sum(typingctx, x, g, m, ahead, brain):
    """``exp_sum`` of a row of 16-bit float bits ``x`` (uint16; literal
    ``brain``: bfloat16, else float16), widened in registers; the
    exponentials go into the float32 row ``g`` unless it is None. The same
    bits as ``exp_sum_inplace`` on the widened row, without storing it
    first: the max sweep then only reads the 16-bit row."""
    if not (_is_half_row(x) and isinstance(brain, types.BooleanLiteral) and _is_scalar(m)
            and (isinstance(g, types.NoneType) or (_is_row(g, types.float32) and g.mutable))
            and _is_ahead(ahead, x)):
        return None

    def body(builder, values, scalars):
        e = _exp_ir(builder, builder.fsub(values[0], scalars[0]))
        return [e], e

    def codegen(context, builder, sig, args):
        rows = [_half_access(context, builder, sig, args, 0, brain)]
        scalars = [context.cast(builder, args[2], sig.args[2], types.float32)]
        return _result(context, builder, sig, _emit_lanes(
            context, builder, rows, scalars, body, 1, target=_access(context, builder, sig, args, 1),
            ahead=_access(context, builder, sig, args, 3)))

    return types.float64(x, g, m, ahead, brain), codegen


@intrinsic
def soft_sums(typingctx, x, q, w, keep, uniform, m, ahead):
    """``(sum q', sum q' (x - m))`` in float64, ``q' = (keep q + uniform) w``;
    ``ahead`` (a row or None) is prefetched on the way."""
    if not (_is_row(x) and _is_row(q, x.dtype)
            and (isinstance(w, types.NoneType) or _is_row(w, x.dtype))
            and _is_scalar(keep) and _is_scalar(uniform) and _is_scalar(m)
            and _is_ahead(ahead, x)):
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
        return _result(context, builder, sig, _emit_lanes(
            context, builder, rows, scalars, body, 2,
            ahead=_access(context, builder, sig, args, 6)))

    return types.UniTuple(types.float64, 2)(x, q, w, keep, uniform, m, ahead), codegen


@intrinsic
def row_max(typingctx, x, copy_to):
    """The largest value of ``x`` that is not NaN (-inf if none), as ``x``'s
    type; also copies ``x`` into ``copy_to`` unless that is None.

    NaN is skipped, not propagated: a kernel's exponentials carry a NaN to
    every result of the row anyway, and a second running max for "is NaN"
    would make this sweep (the row's first read) three instructions per
    vector longer."""
    if not (_is_row(x) and (isinstance(copy_to, types.NoneType)
                            or (_is_row(copy_to, x.dtype) and copy_to.mutable))):
        return None

    def codegen(context, builder, sig, args):
        result = _max_sweep(context, builder, _access(context, builder, sig, args, 0),
                            _access(context, builder, sig, args, 1))
        return context.cast(builder, result, types.float64, x.dtype)

    return x.dtype(x, copy_to), codegen


def _max_sweep(context, builder, row, target):
    """``row_max``'s loop over ``row`` (storing into ``target`` unless None),
    as float64."""

    def body(builder, values, scalars):
        return [values[0]], values[0]

    largest = cgutils.alloca_once(builder, ir.DoubleType())
    # Rows up to 128: one register of lanes (a 64-lane partial vector
    # and its fold cost more than the row); the max is the same.
    short = builder.icmp_signed("<=", row.size, ir.Constant(row.size.type, 8 * LANES))
    widest = max_lanes(row.value_type)
    with builder.if_else(short) as (then, otherwise):
        for branch, lanes in ((then, LANES), (otherwise, widest)):
            with branch:
                found = _emit_lanes(context, builder, [row], [], body, 1, target=target,
                                    combine="max", lanes_per_vector=lanes)
                builder.store(found[0], largest)
    return builder.load(largest)


def _half_access(context, builder, sig, args, i, brain):
    return _HalfAccess(context, builder, sig.args[i], args[i], brain.literal_value)


@intrinsic
def half_row_max(typingctx, x, copy_to, brain):
    """``row_max`` of a row of 16-bit float bits ``x`` (uint16; literal
    ``brain``: bfloat16, else float16), as float32; also widens ``x`` into
    the float32 row ``copy_to`` unless that is None. One read of the 16-bit
    row, converted in registers: the widening costs no sweep of its own."""
    if not (_is_half_row(x) and isinstance(brain, types.BooleanLiteral)
            and (isinstance(copy_to, types.NoneType)
                 or (_is_row(copy_to, types.float32) and copy_to.mutable))):
        return None

    def codegen(context, builder, sig, args):
        result = _max_sweep(context, builder, _half_access(context, builder, sig, args, 0, brain),
                            _access(context, builder, sig, args, 1))
        return context.cast(builder, result, types.float64, types.float32)

    return types.float32(x, copy_to, brain), codegen


@intrinsic
def row_argmax(typingctx, x, copy_to):
    """``(m, i, nan)``: ``row_max``'s m, the first index holding it (-1 when
    no element is above -inf) and whether the row holds a NaN; copies ``x``
    into ``copy_to`` unless that is None. The max sweep is a kernel's read
    of the row from memory: the index costs it two selects per vector, where
    a search afterwards is a sweep of its own. Each of ``max_lanes`` lanes
    keeps its first largest element (a strict comparison); lanes are then
    combined by value, ties by the smaller index: exact in any order."""
    if not (_is_row(x) and (isinstance(copy_to, types.NoneType)
                            or (_is_row(copy_to, x.dtype) and copy_to.mutable))):
        return None

    def codegen(context, builder, sig, args):
        row = _RowAccess(context, builder, sig.args[0], args[0])
        target = _access(context, builder, sig, args, 1)
        fty = row.data.type.pointee
        width = max_lanes(fty)
        vty = ir.VectorType(fty, width)
        i32, i1 = ir.IntType(32), ir.IntType(1)
        ity, bty = ir.VectorType(i32, width), ir.VectorType(i1, width)
        intp = row.size.type
        minus_inf = _const(vty, -math.inf)
        best = cgutils.alloca_once_value(builder, minus_inf)
        where = cgutils.alloca_once_value(builder, ir.Constant(ity, -1))
        nan = cgutils.alloca_once_value(builder, ir.Constant(bty, 0))
        lane_ids = ir.Constant(ity, list(range(width)))
        lane_numbers = ir.Constant(ir.VectorType(intp, width), list(range(width)))

        def splat(value, ty):
            vec = builder.insert_element(ir.Constant(ty, ir.Undefined), value, _i32(0))
            return builder.shuffle_vector(vec, vec, ir.Constant(
                ir.VectorType(ir.IntType(32), ty.count), None))

        def step(index, contiguous, remaining=None):
            mask = None
            if remaining is not None:
                mask = builder.icmp_signed("<", lane_numbers,
                                           splat(remaining, ir.VectorType(intp, width)))
            v = row.load(builder, index, vty, contiguous, mask, remaining)
            if target is not None:
                target.store(builder, index, v, contiguous, mask, remaining)
            is_nan = builder.fcmp_unordered("uno", v, v)
            if mask is not None:
                v = builder.select(mask, v, minus_inf)
                is_nan = builder.and_(is_nan, mask)
            old = builder.load(best)
            above = builder.fcmp_ordered(">", v, old)
            builder.store(builder.select(above, v, old), best)
            at = builder.add(splat(builder.trunc(index, i32), ity), lane_ids)
            builder.store(builder.select(above, at, builder.load(where)), where)
            builder.store(builder.or_(builder.load(nan), is_nan), nan)

        def loop(contiguous):
            full = builder.and_(row.size, ir.Constant(intp, -width))
            with cgutils.for_range_slice(builder, ir.Constant(intp, 0), full,
                                         ir.Constant(intp, width), intp) as (c, _):
                step(c, contiguous)
            remaining = builder.sub(row.size, full)
            with builder.if_then(builder.icmp_signed(">", remaining, ir.Constant(intp, 0))):
                step(full, contiguous, remaining)

        present = [r for r in (row, target) if r is not None]
        if all(r.unit_stride_type for r in present):
            loop(True)
        else:
            unit = ir.Constant(intp, row.itemsize)
            all_unit = cgutils.true_bit
            for r in present:
                if not r.unit_stride_type:
                    all_unit = builder.and_(all_unit, builder.icmp_signed("==", r.stride, unit))
            with builder.if_else(all_unit, likely=True) as (then, otherwise):
                with then:
                    loop(True)
                with otherwise:
                    loop(False)
        values, indices = builder.load(best), builder.load(where)
        m = builder.extract_element(values, _i32(0))
        i = builder.extract_element(indices, _i32(0))
        for j in range(1, width):
            vj = builder.extract_element(values, _i32(j))
            ij = builder.extract_element(indices, _i32(j))
            better = builder.or_(builder.fcmp_ordered(">", vj, m), builder.and_(
                builder.fcmp_ordered("==", vj, m), builder.icmp_signed("<", ij, i)))
            m = builder.select(better, vj, m)
            i = builder.select(better, ij, i)
        flags = builder.bitcast(builder.load(nan), ir.IntType(width))
        any_nan = builder.icmp_unsigned("!=", flags, ir.Constant(ir.IntType(width), 0))
        return context.make_tuple(builder, sig.return_type, [
            m, builder.sext(i, ir.IntType(64)), any_nan])

    return types.Tuple((x.dtype, types.int64, types.boolean))(x, copy_to), codegen


@intrinsic
def scale_minus(typingctx, e, g, k1, k2, w):
    """``g <- e * k1 - k2 * w`` (``- k2`` when ``w`` is None): a map in masked
    vectors to the row's end, with no scalar remainder loop for short rows.
    ``e`` may be ``g``."""
    if not (_is_row(e) and _is_row(g, e.dtype) and g.mutable and _is_scalar(k1)
            and _is_scalar(k2) and (isinstance(w, types.NoneType) or _is_row(w, e.dtype))):
        return None

    def codegen(context, builder, sig, args):
        rows, scalars = _setup(context, builder, sig, args, (0, 4), (2, 3))
        _emit_lanes(context, builder, rows, scalars, _scale_minus_body, 0,
                    target=_access(context, builder, sig, args, 1))
        return context.get_dummy_value()

    return types.none(e, g, k1, k2, w), codegen


def _scale_minus_body(builder, values, scalars):
    ev, wv = values
    k1_, k2_ = scalars
    shift = k2_ if wv is None else builder.fmul(k2_, wv)
    return [], builder.fsub(builder.fmul(ev, k1_), shift)


@intrinsic
def scale_minus_half(typingctx, e, g, k1, k2, w, brain):
    """``scale_minus`` from the float32 row ``e`` into the row of 16-bit
    float bits ``g`` (uint16; literal ``brain``: bfloat16, else float16):
    each element computed as ``scale_minus`` does, then rounded to nearest
    even in registers and written as 16 bits."""
    if not (_is_row(e, types.float32) and _is_half_row(g) and g.mutable
            and isinstance(brain, types.BooleanLiteral) and _is_scalar(k1) and _is_scalar(k2)
            and (isinstance(w, types.NoneType) or _is_row(w, e.dtype))):
        return None

    def codegen(context, builder, sig, args):
        rows, scalars = _setup(context, builder, sig, args, (0, 4), (2, 3))
        _emit_lanes(context, builder, rows, scalars, _scale_minus_body, 0,
                    target=_half_access(context, builder, sig, args, 1, brain),
                    lanes_per_vector=HALF_STORE_LANES)
        return context.get_dummy_value()

    return types.none(e, g, k1, k2, w, brain), codegen


# --------------------------------------------------------------------------
# The softcap's sweeps (``_cpu_kernels._capped_hard_row``)


def _capped_ir(builder, xv, a, cap):
    """(t, z): t = tanh(a x), z = cap t, the softcap of a vector of logits."""
    t = _tanh_ir(builder, builder.fmul(xv, a), skip_large=True)
    return t, builder.fmul(cap, t)


@intrinsic
def capped_exp_slopes(typingctx, x, g, a, cap, m, ahead):
    """``g <- exp(z - m) (1 - t^2)``, t = tanh(a x), z = cap t (the softcap's
    exponentials times its slope over the logit scale; ``g`` may be ``x``);
    returns ``sum exp(z - m)`` in float64. ``ahead`` is prefetched on the way.
    Without label smoothing this is the whole gradient but for one factor:
    the gradient's second sweep is then one product (``scale_minus``)."""
    if not (_is_row(x) and _is_row(g, x.dtype) and g.mutable and _is_scalar(a)
            and _is_scalar(cap) and _is_scalar(m) and _is_ahead(ahead, x)):
        return None

    def body(builder, values, scalars):
        a_, cap_, m_ = scalars
        t = _tanh_ir(builder, builder.fmul(values[0], a_), skip_large=True)
        # z - m = cap t - m in one instruction (z itself is not stored)
        e = _exp_ir(builder, _call(builder, "llvm.fmuladd", t.type, cap_, t, builder.fneg(m_)))
        slope = builder.fsub(_const(t.type, 1.0), builder.fmul(t, t))
        return [e], builder.fmul(e, slope)

    def codegen(context, builder, sig, args):
        rows, scalars = _setup(context, builder, sig, args, (0,), (2, 3, 4))
        return _result(context, builder, sig, _emit_lanes(
            context, builder, rows, scalars, body, 1, target=_access(context, builder, sig, args, 1),
            ahead=_access(context, builder, sig, args, 5)))

    return types.float64(x, g, a, cap, m, ahead), codegen


@intrinsic
def capped_exp_sums(typingctx, x, z, w, a, cap, m, ahead):
    """``z <- cap tanh(a x)`` (``_formulas.softcapped``; not stored when ``z``
    is None; ``z`` may be ``x``); returns ``(sum exp(z - m), sum w (z - m))``
    in float64 (``z - m`` without ``w``). ``ahead`` is prefetched on the way."""
    if not (_is_row(x) and (isinstance(z, types.NoneType) or (_is_row(z, x.dtype) and z.mutable))
            and (isinstance(w, types.NoneType) or _is_row(w, x.dtype))
            and _is_scalar(a) and _is_scalar(cap) and _is_scalar(m) and _is_ahead(ahead, x)):
        return None

    def body(builder, values, scalars):
        xv, wv = values
        a_, cap_, m_ = scalars
        _, zv = _capped_ir(builder, xv, a_, cap_)
        shifted = builder.fsub(zv, m_)
        dot = shifted if wv is None else builder.fmul(wv, shifted)
        return [_exp_ir(builder, shifted), dot], zv

    def codegen(context, builder, sig, args):
        rows, scalars = _setup(context, builder, sig, args, (0, 2), (3, 4, 5))
        return _result(context, builder, sig, _emit_lanes(
            context, builder, rows, scalars, body, 2, target=_access(context, builder, sig, args, 1),
            ahead=_access(context, builder, sig, args, 6)))

    return types.UniTuple(types.float64, 2)(x, z, w, a, cap, m, ahead), codegen


@intrinsic
def capped_grad(typingctx, g, w, k1, k2, m, inv_cap, k):
    """``g <- (k1 exp(g - m) - k2 w) k (1 - (g inv_cap)^2)`` (``- k2`` when
    ``w`` is None): the gradient of a row whose capped logits ``g`` holds,
    ``_formulas.gradient_element`` times ``_formulas.softcap_slope``."""
    if not (_is_row(g) and g.mutable and (isinstance(w, types.NoneType) or _is_row(w, g.dtype))
            and all(_is_scalar(v) for v in (k1, k2, m, inv_cap, k))):
        return None

    def body(builder, values, scalars):
        zv, wv = values
        k1_, k2_, m_, inv_, k_ = scalars
        shift = k2_ if wv is None else builder.fmul(k2_, wv)
        dldz = builder.fsub(builder.fmul(_exp_ir(builder, builder.fsub(zv, m_)), k1_), shift)
        t = builder.fmul(zv, inv_)
        slope = builder.fmul(k_, builder.fsub(_const(zv.type, 1.0), builder.fmul(t, t)))
        return [], builder.fmul(dldz, slope)

    def codegen(context, builder, sig, args):
        rows, scalars = _setup(context, builder, sig, args, (0, 1), (2, 3, 4, 5, 6))
        _emit_lanes(context, builder, rows, scalars, body, 0, target=rows[0])
        return context.get_dummy_value()

    return types.none(g, w, k1, k2, m, inv_cap, k), codegen


# --------------------------------------------------------------------------
# The Hessian-vector product's sweep (``_jacobian_kernels``)


@intrinsic
def exp_dot_into(typingctx, x, m, v, g):
    """``g <- exp(x - m)``; returns ``(sum exp(x - m), sum exp(x - m) v)`` in
    float64 (``g`` may be ``x``)."""
    if not (_is_row(x) and _is_scalar(m) and _is_row(v, x.dtype) and _is_row(g, x.dtype)
            and g.mutable):
        return None

    def body(builder, values, scalars):
        e = _exp_ir(builder, builder.fsub(values[0], scalars[0]))
        return [e, builder.fmul(e, values[1])], e

    def codegen(context, builder, sig, args):
        rows, scalars = _setup(context, builder, sig, args, (0, 2), (1,))
        return _result(context, builder, sig, _emit_lanes(
            context, builder, rows, scalars, body, 2,
            target=_access(context, builder, sig, args, 3)))

    return types.UniTuple(types.float64, 2)(x, m, v, g), codegen


@intrinsic
def sum_ahead(typingctx, x, ahead):
    """Sum of ``x`` in float64, prefetching the row ``ahead`` (or None) on the way."""
    if not (_is_row(x) and _is_ahead(ahead, x)):
        return None

    def body(builder, values, scalars):
        return [values[0]], None

    def codegen(context, builder, sig, args):
        rows = [_access(context, builder, sig, args, 0)]
        return _result(context, builder, sig, _emit_lanes(
            context, builder, rows, [], body, 1, ahead=_access(context, builder, sig, args, 1)))

    return types.float64(x, ahead), codegen


@intrinsic
def minus_exp_times(typingctx, x, o, k, g):
    """``g <- x - exp(o) * k``: ``_formulas.log_softmax_backward_element`` over a
    row, in masked vectors (a plain loop around the vector exponential runs
    about 15% slower); ``g`` may be ``x``."""
    if not (_is_row(x) and _is_row(o, x.dtype) and _is_scalar(k) and _is_row(g, x.dtype)
            and g.mutable):
        return None

    def body(builder, values, scalars):
        xv, ov = values
        return [], builder.fsub(xv, builder.fmul(_exp_ir(builder, ov), scalars[0]))

    def codegen(context, builder, sig, args):
        rows, scalars = _setup(context, builder, sig, args, (0, 1), (2,))
        _emit_lanes(context, builder, rows, scalars, body, 0,
                    target=_access(context, builder, sig, args, 3))
        return context.get_dummy_value()

    return types.none(x, o, k, g), codegen
