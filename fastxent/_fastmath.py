"""Vectorizable math for the CPU kernels.

LLVM vectorizes a loop only when every call in it has a vector form. With the
llvmlite wheels there is no SVML, so ``math.exp`` stays a scalar ``expf`` call
and the loop runs one element at a time. The functions here are emitted as
plain LLVM instructions (range reduction, a polynomial, and ``2**n`` built by
an integer-to-float bit cast), which the loop vectorizer turns into AVX code.

Accuracy (checked in ``tests/test_fastmath.py`` against float64/long double):

* ``fast_exp``: float32 within 2 ulp (relative error below 2.4e-7), float64
  within 2 ulp (below 4.5e-16), for arguments whose exponential is a normal
  number (float32: ``-87.3 <= x <= 88.3``, float64: ``-708.3 <= x <= 709.0``).
  Just below, results are subnormal approximations or 0; they are exactly 0
  for ``x < -87.7`` (float32) / ``x < -708.8`` (float64) and for ``-inf``. NaN
  gives NaN. Above the upper bound the result is undefined (not ``inf``):
  the kernels only exponentiate logits minus their row's max, never above 0,
  so no element pays for an overflow check. The kernels' own vector loops
  (``_lanes``, ``_tiles``) take whole AVX-512 vectors of float32 through a
  cheaper exponential (``_exp_table_ir``: within 2 ulp, 1.06 measured; exactly
  0 below ``-127 ln 2``); scalar code and other CPUs keep the polynomial.
* ``fast_log``: float32 and float64 within 3 ulp (2.8 measured), for positive
  normal arguments; ``log(0) = -inf``, ``log(inf) = inf``, negative or NaN
  gives NaN. Used for the logarithms of a block's row sums (``_log_block``).
* ``log1p_unit``: ``log(1 + e)`` for ``e`` in [0, 1] within 2 ulp (1.39 float32,
  1.45 float64 measured), relative to the result even for tiny ``e``. Used by
  BCE for ``log1p(exp(-|x|))``.
* ``maximum``: IEEE 754-2019 ``maximum`` (NaN-propagating), which LLVM can
  vectorize as a reduction, unlike Python's ``max``.
"""

from __future__ import annotations

import functools
import math
import struct

from llvmlite import ir
from numba import types
from numba.core import cgutils, codegen, config
from numba.extending import intrinsic

#: The fast-math flags the kernels use: flags that keep NaN and inf
#: semantics (no ``nnan``/``ninf``), so that bad values propagate as in
#: PyTorch, and no ``reassoc``, so that the order of every sum is the one the
#: code states and results are reproducible whatever vector width LLVM picks.
FASTMATH = {"nsz", "arcp", "contract", "afn"}


def _float_args(*args):
    for a in args:
        if not isinstance(a, types.Float):
            return False
    return True


def _prefer_wide_vectors(builder):
    """Ask LLVM to vectorize the calling function with 512-bit registers.

    On AVX-512 Intel server CPUs LLVM defaults to 256-bit vectors; the
    exp/log polynomials are compute-bound and run about 1.6x faster at full
    width. The string attribute is ignored by targets without 512-bit vectors.
    llvmlite's attribute set only lists flag attributes, so the key-value
    attribute is added to the underlying set directly.
    """
    attrs = builder.function.attributes
    try:
        set.add(attrs, '"prefer-vector-width"="512"')
        set.add(attrs, '"min-legal-vector-width"="512"')
    except TypeError:  # a future llvmlite with a different attribute type
        pass


@functools.cache
def native_vector_bytes() -> int:
    """Bytes in one vector register of the CPU Numba compiles for: 64 with
    AVX-512, 32 with AVX, else 16 (SSE, NEON).

    The kernels' vectors have a fixed number of lanes (their sums' order
    depends on it); on a narrower CPU LLVM splits each into several
    registers, and code that keeps many such vectors live must know it, or
    it runs out of registers (AVX2 has 16) and spills to the stack.
    """
    features = config.CPU_FEATURES
    if features is None:
        features = codegen.get_host_cpu_features()
    enabled = {f[1:] for f in features.split(",") if f.startswith("+")}
    if "avx512f" in enabled:
        return 64
    return 32 if "avx" in enabled else 16


@functools.cache
def cpu_has(feature: str) -> bool:
    """Whether the CPU Numba compiles for has ``feature`` (LLVM's name, e.g.
    ``avx512f``): not known, so false, where ``NUMBA_CPU_NAME`` names a CPU
    and ``NUMBA_CPU_FEATURES`` does not list its features."""
    features = config.CPU_FEATURES
    if features is None:
        if config.CPU_NAME is not None:
            return False
        features = codegen.get_host_cpu_features()
    return f"+{feature}" in features.split(",")


def table_exp_instructions() -> bool:
    """Whether vectors of float32 take the table exponential (AVX-512F's
    ``vpermd``, see ``_exp_table_ir``)."""
    return cpu_has("avx512f")


def _suffix(ty):
    """The type suffix of an overloaded LLVM intrinsic (``f32``, ``v16f32``)."""
    if isinstance(ty, ir.VectorType):
        return f"v{ty.count}{ty.element.intrinsic_name}"
    return ty.intrinsic_name


def _call(builder, name, ty, *args):
    fn = builder.module.declare_intrinsic(f"{name}.{_suffix(ty)}", (),
                                          ir.FunctionType(ty, [ty] * len(args)))
    return builder.call(fn, list(args))


def _const(ty, value):
    """A constant of float or integer type ``ty``, or of vector type ``ty``
    with every element ``value``."""
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [ir.Constant(ty.element, value)] * ty.count)
    return ir.Constant(ty, value)


def _horner_ir(builder, x, coefs):
    """sum_k coefs[-1 - k] x^k (coefficients highest power first)."""
    fty = x.type
    p = _const(fty, coefs[0])
    for coef in coefs[1:]:
        p = _call(builder, "llvm.fmuladd", fty, p, x, _const(fty, coef))
    return p


def _element(ty):
    return ty.element if isinstance(ty, ir.VectorType) else ty


def _int_like(ty, bits):
    """The integer type of ``bits`` bits, as a vector if ``ty`` is one."""
    if isinstance(ty, ir.VectorType):
        return ir.VectorType(ir.IntType(bits), ty.count)
    return ir.IntType(bits)


@intrinsic
def maximum(typingctx, a, b):
    """``max(a, b)`` that returns NaN if either is NaN, and vectorizes."""
    if not (_float_args(a, b) and a == b):
        return None

    def codegen(context, builder, sig, args):
        _prefer_wide_vectors(builder)
        return _call(builder, "llvm.maximum", args[0].type, *args)

    return a(a, b), codegen


# exp(r) = 1 + r + r^2 P(r) on |r| <= ln2/2, P fitted to minimize the
# relative error of exp(r) (least squares on Chebyshev nodes in 50-digit
# arithmetic, reweighted towards equal ripple). float32: P of degree 4,
# error 3.1e-9 before rounding (Cephes's degree 5 buys precision float32
# cannot hold); float64: degree 9, error 3.6e-18 (a Taylor series needs
# degree 11): one and two multiply-adds fewer per element than those. The
# rounding of the last steps dominates: 1.23 ulp (float32) and 1.28 ulp
# (float64) at most on tests/test_fastmath.py's grid.
_EXP32 = dict(
    poly=(0.0013814582489430904, 0.008368712849915028, 0.04166838899254799,
          0.1666652113199234, 0.4999999403953552),
    ln2_hi=0.693359375, ln2_lo=-2.12194440e-4,
    bias=127, mant=23, bits=32,
)
_EXP64 = dict(
    poly=(2.5000147922691382e-08, 2.763024175275668e-07, 2.7557586070447566e-06,
          2.4801493112718456e-05, 0.00019841269506932113, 0.0013888888943622028,
          0.008333333333494309, 0.04166666666653017, 0.16666666666666413,
          0.5000000000000011),
    ln2_hi=6.93145751953125e-1, ln2_lo=1.42860682030941723212e-6,
    bias=1023, mant=52, bits=64,
)


def _exp_ir(builder, x):
    """exp of a float, double or vector of them, up to the overflow bound
    (see module doc)."""
    fty = x.type
    if _table_exp_fits(fty):
        return _exp_table_ir(builder, x)
    k = _EXP32 if isinstance(_element(fty), ir.FloatType) else _EXP64
    ity = _int_like(fty, k["bits"])

    def c(v):
        return _const(fty, v)

    def fma(a, b, d):
        return _call(builder, "llvm.fmuladd", fty, a, b, d)

    # Raise x to -bias * ln 2, where n = -bias makes 2^n the bits of +0.0:
    # the result is then exactly 0 for -inf and far below, from one max
    # instruction instead of a compare and a select after the fact. In this
    # operand order x86's max returns x when x is NaN, so NaN passes.
    floor = c(-k["bias"] * math.log(2.0))
    x = builder.select(builder.fcmp_ordered(">", floor, x), floor, x)

    # Round x*log2(e) to the nearest integer n by adding 1.5*2^mant: the sum's
    # low mantissa bits then hold n, so 2^n comes from integer arithmetic on
    # those bits with no float-to-int conversion (which is undefined for NaN
    # and costs two more instructions per vector). No fast-math flags here:
    # they would let LLVM fold the add and subtract away.
    magic = c(1.5 * 2.0 ** k["mant"])
    t = fma(x, c(1.4426950408889634), magic)
    n = builder.fsub(t, magic)
    r = fma(n, c(-k["ln2_hi"]), x)
    r = fma(n, c(-k["ln2_lo"]), r)
    # exp(r) = 1 + r + r^2 * P(r)
    p = fma(builder.fmul(r, r), _horner_ir(builder, r, k["poly"]), builder.fadd(r, c(1.0)))
    # bits(t) - bits(magic) = n; 2^n has the bits (n + bias) << mant.
    offset = _const(ity, k["bias"] - _float_bits(1.5 * 2.0 ** k["mant"], k["bits"]))
    two_n = builder.bitcast(builder.shl(builder.add(builder.bitcast(t, ity), offset),
                                        _const(ity, k["mant"])), fty)
    return builder.fmul(p, two_n)


# exp(x) = 2^k 2^(j/16) exp(r), n = 16k + j = round(16 x / ln 2), |r| <= ln2/32:
# the 16 values 2^(j/16) fill one AVX-512 register and a permute instruction
# picks each lane's, which leaves exp(r) to a cubic (Taylor, error r^4/24 <
# 1e-8 before rounding): 7 multiplies or multiply-adds per vector where the
# degree-6 polynomial on |r| <= ln2/2 takes 10, and those are what the
# exponential sweeps wait on (one 512-bit multiply-add per cycle on AMD Zen
# 4). Only for whole 512-bit vectors of float32: scalar code keeps
# ``_exp_ir``'s polynomial, which LLVM can vectorize without a permute.
_EXP_TABLE = tuple(struct.unpack("<I", struct.pack("<f", 2.0 ** (j / 16)))[0]
                   for j in range(16))
_EXP_TABLE_SCALE = 16.0 / math.log(2.0)
# ln2/16 in two parts: n * hi is exact for |n| < 2^12 (hi has 12 bits)
_EXP_TABLE_LN2_HI, _EXP_TABLE_LN2_LO = 0.0433197021484375, 1.9966364561696537e-06


def _table_exp_fits(fty) -> bool:
    return (isinstance(fty, ir.VectorType) and isinstance(fty.element, ir.FloatType)
            and fty.count % 16 == 0 and table_exp_instructions())


def _exp_table_ir(builder, x):
    """``_exp_ir`` of a vector of 16k float32 by the 16-entry table (above):
    within 2 ulp (1.0 measured) where the result is normal, exactly 0 below
    ``-127 ln 2`` (x is raised to it, where n = -2032 picks 2^-127 * 1 whose
    bits are +0.0) and for -inf, a subnormal approximation (off by less
    than the smallest normal number) between that and -87.3, NaN for NaN."""
    fty = x.type
    i32 = ir.VectorType(ir.IntType(32), fty.count)

    def c(v):
        return _const(fty, v)

    def fma(a, b, d):
        return _call(builder, "llvm.fmuladd", fty, a, b, d)

    floor = c(-127 * math.log(2.0))
    x = builder.select(builder.fcmp_ordered(">", floor, x), floor, x)
    # n by the magic-number rounding of ``_exp_ir``: the low bits of t's
    # bits hold n, the lowest four of them j, the permute's index.
    magic = c(1.5 * 2.0 ** 23)
    t = fma(x, c(_EXP_TABLE_SCALE), magic)
    n = builder.fsub(t, magic)
    r = fma(n, c(-_EXP_TABLE_LN2_HI), x)
    r = fma(n, c(-_EXP_TABLE_LN2_LO), r)
    # exp(r) - 1 = r (1 + r (1/2 + r/6))
    u = builder.fmul(fma(fma(r, c(1.0 / 6.0), c(0.5)), r, c(1.0)), r)
    # 2^(j/16) 2^k: the table's bits plus k in the exponent field; the
    # bits of magic shifted by 19 leave nothing, so (bits(t) & ~15) << 19
    # is exactly k << 23.
    t_bits = builder.bitcast(t, i32)
    scale = builder.shl(builder.and_(t_bits, _const(i32, ~15)), _const(i32, 19))
    permute = builder.module.declare_intrinsic(
        "llvm.x86.avx512.permvar.si.512", (),
        ir.FunctionType(ir.VectorType(ir.IntType(32), 16), [ir.VectorType(ir.IntType(32), 16)] * 2))
    table = ir.Constant(ir.VectorType(ir.IntType(32), 16),
                        [ir.Constant(ir.IntType(32), b) for b in _EXP_TABLE])
    parts = []
    for k in range(0, fty.count, 16):
        index = t_bits if fty.count == 16 else builder.shuffle_vector(
            t_bits, t_bits, ir.Constant(ir.VectorType(ir.IntType(32), 16),
                                        [ir.Constant(ir.IntType(32), i) for i in range(k, k + 16)]))
        parts.append(builder.call(permute, [table, index]))
    while len(parts) > 1:
        parts = [builder.shuffle_vector(a, b, ir.Constant(
                    ir.VectorType(ir.IntType(32), 2 * a.type.count),
                    [ir.Constant(ir.IntType(32), i) for i in range(2 * a.type.count)]))
                 for a, b in zip(parts[0::2], parts[1::2])]
    two_n = builder.bitcast(builder.add(parts[0], scale), fty)
    return fma(two_n, u, two_n)


def _float_bits(value, bits):
    fmt = ("<f", "<I") if bits == 32 else ("<d", "<Q")
    return struct.unpack(fmt[1], struct.pack(fmt[0], value))[0]


@intrinsic
def fast_exp(typingctx, x):
    """``exp(x)`` built from instructions LLVM can vectorize (see module doc)."""
    if not _float_args(x):
        return None

    def codegen(context, builder, sig, args):
        _prefer_wide_vectors(builder)
        return _exp_ir(builder, args[0])

    return x(x), codegen


# log(m) for m in [sqrt(1/2), sqrt(2)) through s = (m-1)/(m+1):
# log(m) = 2*atanh(s) = 2*(s + s^3/3 + s^5/5 + ...), |s| <= 0.1716.
_LOG32 = dict(terms=5, bits=32, mant=23, bias=127)   # s^11/11 term < 6e-10
_LOG64 = dict(terms=10, bits=64, mant=52, bias=1023)  # s^21/21 term < 4e-18


def _atanh_series_ir(builder, s, terms):
    """2 atanh(s) = 2 (s + s^3/3 + ... + s^(2 terms + 1) / (2 terms + 1)),
    in Horner form in s^2."""
    fty = s.type
    s2 = builder.fmul(s, s)
    p = _const(fty, 1.0 / (2 * terms + 1))
    for j in range(terms - 1, -1, -1):
        p = _call(builder, "llvm.fmuladd", fty, p, s2, _const(fty, 1.0 / (2 * j + 1)))
    return builder.fmul(builder.fmul(_const(fty, 2.0), s), p)


def _log_ir(builder, y):
    """log of a float, double or vector of them (see module doc)."""
    fty = y.type
    k = _LOG32 if isinstance(_element(fty), ir.FloatType) else _LOG64
    ity = _int_like(fty, k["bits"])

    def c(v):
        return _const(fty, v)

    def ic(v):
        return _const(ity, v)

    def fma(a, b, d):
        return _call(builder, "llvm.fmuladd", fty, a, b, d)

    mant = k["mant"]
    bits = builder.bitcast(y, ity)
    # Split y = 2^e * m with m in [sqrt(1/2), sqrt(2)): shift the mantissa
    # range by the bits of sqrt(1/2) before extracting the exponent.
    sqrt_half_bits = builder.bitcast(c(math.sqrt(0.5)), ity)
    shifted = builder.sub(bits, sqrt_half_bits)
    e = builder.ashr(shifted, ic(mant))
    m_bits = builder.sub(bits, builder.shl(e, ic(mant)))
    m = builder.bitcast(m_bits, fty)
    ef = builder.sitofp(e, fty)
    s = builder.fdiv(builder.fsub(m, c(1.0)), builder.fadd(m, c(1.0)))
    log_m = _atanh_series_ir(builder, s, k["terms"])
    res = fma(ef, c(0.6931471805599453), log_m)
    # Special values: 0 -> -inf, inf -> inf, negative or NaN -> NaN,
    # subnormals are treated as 0 (they only occur for y < 1.2e-38 / 2.2e-308).
    tiny = c(1.1754943508222875e-38 if k["bits"] == 32 else 2.2250738585072014e-308)
    res = builder.select(builder.fcmp_ordered("<", y, tiny), c(-math.inf), res)
    res = builder.select(builder.fcmp_ordered("==", y, c(math.inf)), c(math.inf), res)
    res = builder.select(builder.fcmp_unordered("<", y, c(0.0)), c(math.nan), res)
    return res


@intrinsic
def fast_log(typingctx, y):
    """``log(y)`` built from instructions LLVM can vectorize (see module doc)."""
    if not _float_args(y):
        return None

    def codegen(context, builder, sig, args):
        _prefer_wide_vectors(builder)
        return _log_ir(builder, args[0])

    return y(y), codegen


# log1p(e) = e + e^2 Q(e) on [0, 1], Q a polynomial: no division, where
# 2 atanh(e / (2 + e)) needs one (a division costs as much as the rest of
# the logarithm: BCE's elementwise loop ran 1.25x faster without it). Q is
# Chebyshev interpolation of (log1p(e) - e) / e^2 in 50-digit arithmetic
# (mpmath.chebyfit), highest power first: degree 8 (float32, error 2.9e-8)
# and 19 (float64, 5.9e-17). The first two terms are exact, so the result is
# accurate relative to itself for tiny e.
_LOG1P_Q = {
    32: (-0.004466211601265708, 0.0252240543466626, -0.06675772506317361,
         0.11561845446366749, -0.1584756572045947, 0.1985410623120243,
         -0.24986526168187279, 0.33332841887371345, -0.4999999698308403),
    64: (3.496499999517753e-05, -0.00038701111085803037, 0.002030846248409763,
         -0.006761419498849802, 0.016177448292083774, -0.030006248922024147,
         0.045718328874219644, -0.06024571849605114, 0.07206052783890503,
         -0.0816358369873179, 0.09044038405818781, -0.09989940978337618,
         0.11109469727104494, -0.12499802193640867, 0.14285697368176903,
         -0.1666666569676973, 0.19999999965822401, -0.2499999999935962,
         0.33333333333328546, -0.49999999999999994),
}


@intrinsic
def log1p_unit(typingctx, e):
    """``log(1 + e)`` for ``e`` in [0, 1], to full relative precision for
    small ``e``, from instructions LLVM can vectorize."""
    if not _float_args(e):
        return None

    def codegen(context, builder, sig, args):
        _prefer_wide_vectors(builder)
        x = args[0]
        bits = 32 if isinstance(_element(x.type), ir.FloatType) else 64
        x2 = builder.fmul(x, x)
        q = _horner_ir(builder, x, _LOG1P_Q[bits])
        return _call(builder, "llvm.fmuladd", x.type, x2, q, x)

    return e(e), codegen


# tanh(a) = a + a^3 P(a^2) below a = 0.55, P Chebyshev interpolation of
# (tanh(a)/a - 1)/a^2 on [0, 0.3025] in 50-digit arithmetic (mpmath.chebyfit),
# highest power first: degree 4 (float32, error 4.0e-9 relative to tanh) and
# 10 (float64, 2.3e-18). Above, (1 - e)/(1 + e) with e = exp(-2a) <= 1/3:
# 1 - e cancels at most one bit there.
#: ``tanh_small`` is as exact as ``fast_tanh`` for |y| below this.
TANH_SMALL = 0.55
_TANH_P = {
    32: (-0.006610227831114734, 0.021309388664443474, -0.05390942882746055,
         0.1333311372902087, -0.3333333200797698),
    64: (-2.060276537636634e-05, 8.511313685577671e-05, -0.0002346347410887237,
         0.0005889360520074057, -0.001455661830100716, 0.003592110378689024,
         -0.008863234397814355, 0.021869488493666944, -0.053968253967434016,
         0.13333333333332714, -0.3333333333333333),
}


def _tanh_poly_ir(builder, x):
    """x + x^3 P(x^2): tanh below ``TANH_SMALL``."""
    fty = x.type
    bits = 32 if isinstance(_element(fty), ir.FloatType) else 64
    x2 = builder.fmul(x, x)
    return _call(builder, "llvm.fmuladd", fty, builder.fmul(x, x2),
                 _horner_ir(builder, x2, _TANH_P[bits]), x)


def _tanh_ir(builder, x, skip_large=False):
    """tanh of a float or a vector of them: the odd polynomial below
    ``TANH_SMALL``, sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) above.
    ``skip_large`` (vectors): the exponential and the division only when
    some lane needs them, behind a branch; logits far from a softcap (the
    usual case) then cost the polynomial alone."""
    fty = x.type
    small = _tanh_poly_ir(builder, x)
    # NaN goes the large way, where exp(NaN) keeps it NaN
    large_lanes = builder.fcmp_unordered(">=", builder.fmul(x, x),
                                         _const(fty, TANH_SMALL * TANH_SMALL))

    def large():
        a = _call(builder, "llvm.fabs", fty, x)
        e = _exp_ir(builder, builder.fmul(a, _const(fty, -2.0)))
        one = _const(fty, 1.0)
        r = builder.fdiv(builder.fsub(one, e), builder.fadd(one, e))
        return builder.select(large_lanes, _call(builder, "llvm.copysign", fty, r, x), small)

    if not (skip_large and isinstance(fty, ir.VectorType)):
        return large()
    result = cgutils.alloca_once_value(builder, small)
    width = ir.IntType(fty.count)
    any_large = builder.icmp_unsigned("!=", builder.bitcast(large_lanes, width),
                                      ir.Constant(width, 0))
    with builder.if_then(any_large, likely=False):
        builder.store(large(), result)
    return builder.load(result)


@intrinsic
def fast_tanh(typingctx, y):
    """``tanh(y)`` from instructions LLVM can vectorize: within 2 ulp; NaN
    gives NaN, +-inf gives +-1 (the softcap of the cross-entropy kernels)."""
    if not _float_args(y):
        return None

    def codegen(context, builder, sig, args):
        _prefer_wide_vectors(builder)
        return _tanh_ir(builder, args[0])

    return y(y), codegen


@intrinsic
def tanh_small(typingctx, y):
    """``tanh(y)`` for |y| < ``TANH_SMALL`` only: the polynomial of
    ``fast_tanh`` alone (no exponential, no division), for blocks of
    arguments known to be small."""
    if not _float_args(y):
        return None

    def codegen(context, builder, sig, args):
        _prefer_wide_vectors(builder)
        return _tanh_poly_ir(builder, args[0])

    return y(y), codegen
