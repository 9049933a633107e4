"""``c += a @ b`` with the BLAS NumPy ships with.

NumPy's ``matmul`` cannot accumulate into ``out``: a sum of products needs a
scratch product and an add, which reads and writes the sum once more per
product. The fused linear + cross-entropy adds each chunk's share to the
C x H ``grad_linear_weight`` (1 GiB at 128256 x 2048 float32), so that extra
pass is most of its cost beyond the products. The GEMM of the BLAS takes
``beta = 1`` and accumulates in the same pass.

NumPy's wheels bundle OpenBLAS as ``scipy-openblas`` (prefixed symbols, 64-bit
integers in the ``64`` build); it is already loaded by NumPy, so ``ctypes``
only looks its symbols up: the same library and threads as ``matmul``.
Elsewhere (another BLAS, or no such file) ``matmul_add`` is None and callers
keep the scratch product.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import numpy as np

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112

#: (symbol prefix and suffix, integer type) of the bundled builds
_FLAVOURS = (("scipy_cblas_{}gemm64_", ctypes.c_int64), ("scipy_cblas_{}gemm", ctypes.c_int32))


def _library_files():
    root = os.path.dirname(np.__file__)
    patterns = [os.path.join(root + ".libs", "*openblas*"),  # Linux, Windows
                os.path.join(root, ".dylibs", "*openblas*")]  # macOS
    return sorted(f for p in patterns for f in glob.glob(p))


@functools.cache
def _gemm(dtype_char: str):
    """The ctypes GEMM of the bundled OpenBLAS for ``"s"`` or ``"d"``, or None."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception:  # pragma: no cover - NumPy builds without the config
        return None
    if blas.get("name") != "scipy-openblas":
        return None
    real = ctypes.c_float if dtype_char == "s" else ctypes.c_double
    for path in _library_files():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for pattern, integer in _FLAVOURS:
            fn = getattr(lib, pattern.format(dtype_char), None)
            if fn is None:
                continue
            enum, ptr = ctypes.c_int, ctypes.c_void_p
            fn.argtypes = [enum, enum, enum, integer, integer, integer, real, ptr, integer,
                           ptr, integer, real, ptr, integer]
            fn.restype = None
            return fn
    return None


def _operand(a):
    """(transpose flag, leading dimension) of a 2-D operand BLAS reads
    without a copy, or None."""
    item = a.itemsize
    s0, s1 = a.strides
    rows, cols = a.shape
    if (s1 == item or cols == 1) and s0 % item == 0 and s0 // item >= max(1, cols):
        return _NO_TRANS, max(1, s0 // item)
    if (s0 == item or rows == 1) and s1 % item == 0 and s1 // item >= max(1, rows):
        return _TRANS, max(1, s1 // item)
    return None


def matmul_add(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> bool:
    """``c += a @ b`` in one GEMM; False (nothing done) where the bundled
    BLAS is absent or the arrays are not float32/float64 of one dtype in
    layouts it reads directly (``c`` C-contiguous)."""
    dtype = c.dtype
    if dtype not in (np.float32, np.float64) or a.dtype != dtype or b.dtype != dtype:
        return False
    m, k = a.shape
    n = b.shape[1]
    if b.shape[0] != k or c.shape != (m, n) or not c.flags.c_contiguous or not c.flags.writeable:
        return False
    if m == 0 or n == 0 or k == 0:  # nothing to add
        return True
    fn = _gemm("s" if dtype == np.float32 else "d")
    ta, tb = _operand(a), _operand(b)
    if fn is None or ta is None or tb is None:
        return False
    fn(_ROW_MAJOR, ta[0], tb[0], m, n, k, 1.0, a.ctypes.data, ta[1], b.ctypes.data, tb[1],
       1.0, c.ctypes.data, max(1, n))
    return True


def available() -> bool:
    """Whether ``matmul_add`` runs in the BLAS (float32)."""
    return _gemm("s") is not None

