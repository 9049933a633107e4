"""The fixed-order vector sums of ``fastxent._lanes``.

Their order is part of the reproducibility guarantee: the plain sum is
checked bit for bit against a NumPy emulation of the documented order; the
other sums (whose products LLVM may fuse into FMAs) against float64 sums.
"""

import numpy as np
import pytest
from numba import njit

from fastxent._fastmath import FASTMATH
from fastxent._lanes import (BLOCK, LANES, capped_exp_slopes, capped_exp_sums, capped_grad,
                              exp_sum, exp_sum_inplace, lane_dot, row_argmax, row_max,
                              scale_minus, soft_sums)

LENGTHS = [0, 1, LANES - 1, LANES, LANES + 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 37]
DTYPES = [np.float32, np.float64]


@njit(fastmath=FASTMATH)
def _dot(x, w, shift):
    return lane_dot(x, w, shift)


@njit(fastmath=FASTMATH)
def _exp_sum(x, m, ahead=None):
    return exp_sum(x, m, ahead)


@njit(fastmath=FASTMATH)
def _exp_sum_inplace(g, m, ahead=None):
    return exp_sum_inplace(g, m, ahead)


@njit(fastmath=FASTMATH)
def _soft_sums(x, q, w, keep, uniform, m, ahead=None):
    return soft_sums(x, q, w, keep, uniform, m, ahead)


@njit(fastmath=FASTMATH)
def _scale_minus(e, g, k1, k2, w):
    scale_minus(e, g, k1, k2, w)


@njit(fastmath=FASTMATH)
def _row_max(x, copy_to):
    return row_max(x, copy_to)


@njit(fastmath=FASTMATH)
def _row_argmax(x, copy_to):
    return row_argmax(x, copy_to)


@njit(fastmath=FASTMATH)
def _capped_exp_sums(x, z, w, a, cap, m):
    return capped_exp_sums(x, z, w, a, cap, m, None)


@njit(fastmath=FASTMATH)
def _capped_exp_slopes(x, g, a, cap, m):
    return capped_exp_slopes(x, g, a, cap, m, None)


@njit(fastmath=FASTMATH)
def _capped_grad(g, w, k1, k2, m, inv_cap, k):
    capped_grad(g, w, k1, k2, m, inv_cap, k)


def documented_order_sum(terms):
    """The order the module doc states, in NumPy: lanes per block in the
    terms' type (a partial last vector padded with zeros), folded pairwise,
    into a float64 total."""
    dt = terms.dtype.type
    total = 0.0
    for b0 in range(0, terms.size, BLOCK):
        block = terms[b0:b0 + BLOCK]
        padded = np.zeros(-(-block.size // LANES) * LANES, dt)
        padded[:block.size] = block
        lanes = np.zeros(LANES, dt)
        for c0 in range(0, padded.size, LANES):
            lanes = lanes + padded[c0:c0 + LANES]
        width = LANES
        while width > 1:
            width //= 2
            lanes = lanes[:width] + lanes[width:2 * width]
        total += np.float64(lanes[0])
    return total


def _rows(n, dt, seed=0):
    rng = np.random.default_rng(seed + n)
    x = (rng.standard_normal(n) * 3).astype(dt)
    w = rng.random(n).astype(dt)
    return x, w


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("n", LENGTHS)
def test_plain_sum_follows_the_documented_order_bit_for_bit(n, dt):
    x, _ = _rows(n, dt)
    shift = dt(0.75)
    assert _dot(x, None, shift) == documented_order_sum((x - shift).astype(dt))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("n", LENGTHS)
def test_sums_match_float64(n, dt):
    x, w = _rows(n, dt)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    m = x.max() if n else dt(0.0)
    rtol = 2e-6 if dt == np.float32 else 1e-14
    e64 = np.exp((x - m).astype(np.float64))
    np.testing.assert_allclose(_dot(x, w, m), np.sum(w64 * (x64 - m)), rtol=rtol, atol=rtol * n)
    np.testing.assert_allclose(_exp_sum(x, m), e64.sum(), rtol=rtol)
    q = np.random.default_rng(n).random(n).astype(dt)
    keep, uniform = dt(0.9), dt(0.1) / max(n, 1)
    q_prime = (keep * q.astype(np.float64) + uniform) * w64
    total, qxm = _soft_sums(x, q, w, keep, uniform, m)
    np.testing.assert_allclose(total, q_prime.sum(), rtol=rtol)
    np.testing.assert_allclose(qxm, np.sum(q_prime * (x64 - m)), rtol=rtol, atol=rtol * n)
    total, qxm = _soft_sums(x, q, None, keep, uniform, m)
    np.testing.assert_allclose(total, (keep * q.astype(np.float64) + uniform).sum(), rtol=rtol)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("n", LENGTHS)
def test_inplace_exponentials_and_their_sum(n, dt):
    x, _ = _rows(n, dt)
    m = x.max() if n else dt(0.0)
    g = x.copy()
    total = _exp_sum_inplace(g, m)
    assert total == _exp_sum(x, m)
    ahead = np.ones(max(n, 1), dt)  # prefetching another row changes nothing
    assert _exp_sum(x, m, ahead) == total
    g2 = x.copy()
    assert _exp_sum_inplace(g2, m, ahead) == total
    np.testing.assert_array_equal(g2, g)
    # the argument x - m is rounded to the rows' type first
    np.testing.assert_allclose(g, np.exp((x - m).astype(np.float64)),
                               rtol=2.4e-7 if dt == np.float32 else 4.5e-16)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("n", [LANES + 3, BLOCK + 5])
def test_strided_rows_give_the_same_bits(n, dt):
    x, w = _rows(n, dt)
    m = x.max()
    wide = np.zeros((n, 3), dt)
    wide[:, 1] = x
    xs = wide[:, 1]  # a strided view of the same values
    assert not xs.flags.c_contiguous
    assert _dot(xs, None, m) == _dot(x, None, m)
    assert _dot(xs, w, m) == _dot(x, w, m)
    assert _exp_sum(xs, m) == _exp_sum(x, m)
    assert _soft_sums(xs, x, w, dt(0.5), dt(0.1), m) == _soft_sums(x, x, w, dt(0.5), dt(0.1), m)
    g = x.copy()
    total = _exp_sum_inplace(g, m)
    assert _exp_sum_inplace(xs, m) == total
    np.testing.assert_array_equal(xs, g)
    np.testing.assert_array_equal(wide[:, 0], 0.0)  # neighbours untouched
    np.testing.assert_array_equal(wide[:, 2], 0.0)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("n", LENGTHS[1:])
def test_row_max_and_copy(n, dt):
    x, _ = _rows(n, dt)
    for where in sorted({0, n // 2, n - 1}):
        y = x.copy()
        y[where] = 1e30
        g = np.zeros_like(y)
        assert _row_max(y, None) == dt(1e30) and _row_max(y, g) == dt(1e30)
        np.testing.assert_array_equal(g, y)
        y[where] = np.nan  # skipped: the kernels' exponentials carry it
        assert _row_max(y, None) == (np.delete(y, where).max() if n > 1 else -np.inf)
    assert _row_max(np.full(n, -np.inf, dt), None) == -np.inf
    assert _row_max(np.full(n, np.nan, dt), None) == -np.inf
    wide = np.zeros((n, 2), dt)
    wide[:, 0] = x
    out = np.zeros((n, 2), dt)
    assert _row_max(wide[:, 0], out[:, 1]) == x.max()
    np.testing.assert_array_equal(out[:, 1], x)
    np.testing.assert_array_equal(out[:, 0], 0.0)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("n", LENGTHS)
def test_scale_minus_writes_the_whole_row_and_nothing_else(n, dt):
    e, w = _rows(n, dt)
    k1, k2 = dt(0.5), dt(0.25)
    wide = np.full((n + 1, 2), 7.0, dt)
    g = wide[:n, 1]  # strided, with guard values around it
    # (LLVM may fuse the multiply and subtract: equal to rounding)
    tol = dict(rtol=1e-6 if dt == np.float32 else 1e-15, atol=1e-7 if dt == np.float32 else 1e-16)
    _scale_minus(e, g, k1, k2, w)
    np.testing.assert_allclose(g, e * k1 - k2 * w, **tol)
    _scale_minus(e, g, k1, k2, None)
    np.testing.assert_allclose(g, e * k1 - k2, **tol)
    np.testing.assert_array_equal(wide[:, 0], 7.0)
    assert wide[n, 1] == 7.0
    out = e.copy()  # in place: e is g
    _scale_minus(out, out, k1, k2, w)
    np.testing.assert_allclose(out, e * k1 - k2 * w, **tol)


def test_main_loop_is_vector_code():
    x = np.ones(100, np.float32)
    _exp_sum(x, np.float32(0.0))
    asm = _exp_sum.inspect_asm(_exp_sum.signatures[0])
    assert "vaddps" in asm and ("zmm" in asm or "ymm" in asm)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("n", LENGTHS[1:])
def test_row_argmax_finds_the_first_maximum_and_flags_nan(n, dt):
    rng = np.random.default_rng(n)
    x = rng.integers(-4, 4, n).astype(dt)  # many ties
    m, i, nan = _row_argmax(x, None)
    assert m == x.max() and i == int(np.argmax(x)) and not nan
    for where in sorted({0, n // 2, n - 1}):
        y = x.copy()
        y[where] = 9.0
        y[n - 1 - where] = 9.0
        g = np.zeros_like(y)
        m, i, nan = _row_argmax(y, g)
        assert (m, i, nan) == (9.0, min(where, n - 1 - where), False)
        np.testing.assert_array_equal(g, y)
        y[where] = np.nan
        m, i, nan = _row_argmax(y, None)
        assert nan and m == (np.delete(y, where).max() if n > 1 else -np.inf)
    assert _row_argmax(np.full(n, -np.inf, dt), None) == (-np.inf, -1, False)
    strided = np.zeros((n, 2), dt)
    strided[:, 1] = x
    assert _row_argmax(strided[:, 1], None)[1] == int(np.argmax(x))


def _capped_cases(n, dt):
    """Logits that keep tanh's argument below ``TANH_SMALL`` in whole vectors,
    or put a few lanes above it, or are infinite or NaN."""
    rng = np.random.default_rng(n)
    small = (rng.standard_normal(n) * 0.1).astype(dt)
    mixed = small.copy()
    mixed[::7] = (rng.standard_normal(mixed[::7].size) * 3).astype(dt)
    special = mixed.copy()
    special[::11] = np.inf
    special[5::13] = -np.inf
    return {"small": small, "mixed": mixed, "special": special}


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("n", LENGTHS[1:])
def test_capped_sweeps_match_float64(n, dt):
    """``capped_exp_sums``, ``capped_exp_slopes`` and ``capped_grad`` against
    the softcap computed in float64 (cap tanh(a x) with NumPy's tanh)."""
    a, cap, k = 1.5 / 2.0, 2.0, 1.5
    rtol = 2e-6 if dt == np.float32 else 1e-14
    w = np.random.default_rng(1).random(n).astype(dt)
    for name, x in _capped_cases(n, dt).items():
        z64 = cap * np.tanh(a * x.astype(np.float64))
        m = dt(z64.max())
        e64 = np.exp(z64 - np.float64(m))
        z = np.zeros_like(x)
        s, dot = _capped_exp_sums(x, z, w, dt(a), dt(cap), m)
        np.testing.assert_allclose(z, z64, rtol=rtol, atol=rtol, err_msg=name)
        np.testing.assert_allclose(s, e64.sum(), rtol=rtol, err_msg=name)
        np.testing.assert_allclose(dot, (w * (z64 - np.float64(m))).sum(), rtol=rtol,
                                   atol=rtol * np.abs(z64).sum(), err_msg=name)
        assert _capped_exp_sums(x, None, None, dt(a), dt(cap), m)[0] == s
        g = x.copy()  # in place
        assert _capped_exp_slopes(g, g, dt(a), dt(cap), m) == s
        np.testing.assert_allclose(g, e64 * (1 - np.tanh(a * x.astype(np.float64)) ** 2),
                                   rtol=4 * rtol, atol=rtol, err_msg=name)
        k1, k2 = dt(0.3), dt(0.01)
        g = z.copy()
        _capped_grad(g, w, k1, k2, m, dt(1 / cap), dt(k))
        expect = (k1 * e64 - k2 * w) * k * (1 - (z64 / cap) ** 2)
        np.testing.assert_allclose(g, expect, rtol=8 * rtol, atol=rtol, err_msg=name)
    nan = np.full(n, np.nan, dt)
    assert np.isnan(_capped_exp_sums(nan, None, None, dt(a), dt(cap), dt(0.0))[0])
