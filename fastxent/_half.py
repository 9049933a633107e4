"""16-bit floating-point storage: float16 and bfloat16 held as uint16.

Numba's CPU target types neither float16 nor bfloat16 arrays, so the CPU
backend reads their bits as ``uint16`` views and converts them here, a
block of rows at a time, to and from the float32 the kernels compute in:

- bfloat16 is the upper half of a float32: widening shifts the bits left by
  16; narrowing rounds to nearest even by adding ``0x7fff`` plus the lowest
  kept bit before the shift, and keeps a NaN a (quiet) NaN.
- float16 widens and narrows with LLVM's ``fpext``/``fptrunc`` of ``half``
  (round to nearest even), which vectorize to F16C's ``vcvtph2ps`` and
  ``vcvtps2ph`` on x86-64 CPUs with AVX2.

bfloat16 comes from ``ml_dtypes`` (the dtype JAX and TensorFlow give
NumPy); it is recognized by its name, so ``ml_dtypes`` is needed only by
whoever makes such an array.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from . import _cache
from . import _formulas as F

_cache.install()

_JIT_OPTIONS = dict(cache=True, error_model="numpy", nogil=True)

#: Names of the 16-bit float dtypes the CPU backend takes.
HALF_NAMES = ("float16", "bfloat16")


def half_dtype(dtype) -> bool:
    """Whether ``dtype`` is float16 or (ml_dtypes') bfloat16."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        return False
    return dtype.itemsize == 2 and dtype.name in HALF_NAMES


def half_of(*arrays):
    """The dtype of the first 16-bit array of ``arrays`` (None skipped), or
    None: the one 16-bit dtype of a call that ``_validate`` allows only one of."""
    for a in arrays:
        if a is not None and half_dtype(a.dtype):
            return np.dtype(a.dtype)
    return None


@intrinsic
def _f16_to_f32(typingctx, bits):
    """The float32 value of float16 ``bits`` (a uint16)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _f32_to_f16(typingctx, value):
    """The float16 bits (a uint16) of float32 ``value``, rounded to nearest even."""
    if value != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(value), codegen


@intrinsic
def _bits_to_f32(typingctx, bits):
    """The float32 of the low 32 bits of integer ``bits``."""
    if not isinstance(bits, types.Integer) or bits.bitwidth < 32:
        return None

    def codegen(context, builder, sig, args):
        low = args[0]
        if sig.args[0].bitwidth > 32:
            low = builder.trunc(low, ir.IntType(32))
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _f32_to_bits(typingctx, value):
    if value != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(value), codegen


@numba.njit(inline="always", **_JIT_OPTIONS)
def _bf16_to_f32(bits):
    return _bits_to_f32(np.uint32(bits) << np.uint32(16))


_bf16_bits_of_f32_bits = numba.njit(inline="always", **_JIT_OPTIONS)(F.bf16_bits_of_f32_bits)


@numba.njit(inline="always", **_JIT_OPTIONS)
def _f32_to_bf16(value):
    return _bf16_bits_of_f32_bits(_f32_to_bits(value))


#: Elements per parallel work item of the conversions.
_BLOCK = 1 << 15


def _widen(src, dst, brain):
    n = src.size
    for b in prange((n + _BLOCK - 1) // _BLOCK):
        stop = min(n, (b + 1) * _BLOCK)
        if brain:
            for i in range(b * _BLOCK, stop):
                dst[i] = _bf16_to_f32(src[i])
        else:
            for i in range(b * _BLOCK, stop):
                dst[i] = _f16_to_f32(src[i])


def _narrow(src, dst, brain):
    n = src.size
    for b in prange((n + _BLOCK - 1) // _BLOCK):
        stop = min(n, (b + 1) * _BLOCK)
        if brain:
            for i in range(b * _BLOCK, stop):
                dst[i] = _f32_to_bf16(src[i])
        else:
            for i in range(b * _BLOCK, stop):
                dst[i] = _f32_to_f16(src[i])


#: Inputs under this many elements convert serially (as the kernels, see
#: ``_cpu_kernels``): waking the threads costs more than the work.
PARALLEL_MIN_ELEMENTS = 1 << 16
_WIDEN = (numba.njit(**_JIT_OPTIONS)(_widen), numba.njit(parallel=True, **_JIT_OPTIONS)(_widen))
_NARROW = (numba.njit(**_JIT_OPTIONS)(_narrow),
           numba.njit(parallel=True, **_JIT_OPTIONS)(_narrow))


def _bits(a):
    """The flat uint16 view of a C-contiguous 16-bit array."""
    return a.reshape(-1).view(np.uint16)


def widen(a) -> np.ndarray:
    """A new C-contiguous float32 array of the values of 16-bit ``a``."""
    a = np.asarray(a)
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    out = np.empty(a.shape, np.float32)
    if a.size:
        _WIDEN[a.size >= PARALLEL_MIN_ELEMENTS](_bits(a), out.reshape(-1),
                                                a.dtype.name == "bfloat16")
    return out


def narrow_into(dest, values) -> None:
    """Write float32 ``values`` (C-contiguous, ``dest``'s shape) into the
    16-bit array ``dest``, rounded to nearest even."""
    if not values.size:
        return
    brain = dest.dtype.name == "bfloat16"
    kernel = _NARROW[values.size >= PARALLEL_MIN_ELEMENTS]
    if dest.flags.c_contiguous:
        kernel(values.reshape(-1), _bits(dest), brain)
        return
    tmp = np.empty(values.shape, dest.dtype)
    kernel(values.reshape(-1), _bits(tmp), brain)
    np.copyto(dest, tmp)


def narrow(values, dtype) -> np.ndarray:
    """A new array of ``dtype`` (16-bit) holding float32 ``values`` rounded."""
    out = np.empty(values.shape, dtype)
    narrow_into(out, np.ascontiguousarray(values, dtype=np.float32))
    return out
