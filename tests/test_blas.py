"""``_blas.matmul_add``: ``c += a @ b`` in NumPy's bundled OpenBLAS, against
the float64 product, for the layouts the fused linear head passes (a
transposed chunk of logits, a slice of rows of the input) and the ones it
must refuse untouched."""

from __future__ import annotations

import numpy as np
import pytest

from fastxent import _blas


def _twin(a, b, c):
    return c.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)


@pytest.mark.parametrize("dtype", (np.float32, np.float64))
@pytest.mark.parametrize("a_layout", ("rows", "transposed"))
@pytest.mark.parametrize("b_layout", ("rows", "transposed", "row_slice"))
def test_accumulates_the_product(dtype, a_layout, b_layout):
    rng = np.random.default_rng(3)
    m, k, n = 37, 19, 23
    a = rng.standard_normal((m, k)) if a_layout == "rows" else rng.standard_normal((k, m)).T
    if b_layout == "rows":
        b = rng.standard_normal((k, n))
    elif b_layout == "transposed":
        b = rng.standard_normal((n, k)).T
    else:  # rows of a wider array: a leading dimension larger than n
        b = rng.standard_normal((k + 9, n + 5))[4:4 + k, 2:2 + n]
    a, b = a.astype(dtype), b.astype(dtype)
    c = rng.standard_normal((m, n)).astype(dtype)
    want = _twin(a, b, c)
    assert _blas.matmul_add(a, b, c)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(c, want, rtol=tol, atol=tol * k)
    # the same bits as NumPy's product and add, on this BLAS (a fixed K order)
    a2 = rng.standard_normal((m, k)).astype(dtype)
    c2 = rng.standard_normal((m, n)).astype(dtype)
    plain = c2 + a2 @ b
    assert _blas.matmul_add(a2, b, c2)
    np.testing.assert_array_equal(c2, plain)


@pytest.mark.parametrize("case", ("mixed dtypes", "strided c", "read-only c", "float16",
                                  "shape"))
def test_refuses_without_writing(case):
    rng = np.random.default_rng(4)
    a = rng.standard_normal((5, 4)).astype(np.float32)
    b = rng.standard_normal((4, 6)).astype(np.float32)
    c = np.zeros((5, 6), np.float32)
    if case == "mixed dtypes":
        b = b.astype(np.float64)
    elif case == "strided c":
        c = np.zeros((5, 12), np.float32)[:, ::2]
    elif case == "read-only c":
        c.flags.writeable = False
    elif case == "float16":
        a, b, c = a.astype(np.float16), b.astype(np.float16), c.astype(np.float16)
    else:
        c = np.zeros((6, 5), np.float32)
    before = c.copy()
    assert not _blas.matmul_add(a, b, c)
    np.testing.assert_array_equal(c, before)


def test_found_with_numpys_bundled_openblas():
    """NumPy's wheels ship scipy-openblas: there the accumulating product must
    be found, or the linear head silently loses its one-pass update."""
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    assert _blas.available() == (blas.get("name") == "scipy-openblas")
