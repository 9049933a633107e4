"""Tiles of short rows (``fastxent._tiles``) and the kernels built on them.

The intrinsics are checked one by one against NumPy (the group sums bit for
bit against an emulation of their documented order); the tiled kernels
against PyTorch on every layout a tile is cut from: contiguous rows, strided
rows, PyTorch's (N, C, d) layout with d at least a tile and narrower.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numba import njit

import fastxent
from fastxent._fastmath import FASTMATH
from fastxent._lanes import exp_sum_inplace
from fastxent import _cpu
from fastxent._tiles import (GROUP, TILE, tile_dot, tile_exp_sums, tile_in,
                             tile_max, tile_out, tile_scale_minus)

DTYPES = [np.float32, np.float64]
WIDEST = 8 * TILE
CLASSES = [1, TILE - 1, TILE, TILE + 1, 2 * TILE + 1, WIDEST]


@njit(fastmath=FASTMATH)
def _in(src, t):
    tile_in(src, t)


@njit(fastmath=FASTMATH)
def _out(t, dst):
    tile_out(t, dst)


@njit(fastmath=FASTMATH)
def _max(t, m):
    tile_max(t, m)


@njit(fastmath=FASTMATH)
def _exp_sums(t, m, s, log_s, store):
    tile_exp_sums(t, m, s, log_s, store)


@njit(fastmath=FASTMATH)
def _dot(t, q, w, keep, uniform, m, total, dot):
    tile_dot(t, q, w, keep, uniform, m, total, dot)


@njit(fastmath=FASTMATH)
def _scale_minus(t, k1, k2, w, q, kq):
    tile_scale_minus(t, k1, k2, w, q, kq)


@njit(fastmath=FASTMATH)
def _vector_exp(flat):
    exp_sum_inplace(flat, 0.0, None)


def _exp(a):
    """The kernels' exponential of whole vectors (``_lanes``' and the
    tiles' own: on AVX-512 float32 the table exponential, which scalar
    ``fast_exp`` is not)."""
    out = np.array(a, order="C")
    _vector_exp(out.reshape(-1))
    return out


def _padded(C):
    return -(-C // TILE) * TILE


def _layouts(n, C, dt, rng):
    """(name, an (n, C) view) for each layout tile_in tells apart."""
    base = rng.standard_normal((WIDEST + 5, 3 * WIDEST + 5)).astype(dt)
    return [("classes contiguous", base[:n, :C]),
            ("rows contiguous", np.ascontiguousarray(base[:C, :n]).T),
            ("strided", base[::2, ::3][:n, :C])]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("C", CLASSES)
@pytest.mark.parametrize("n", [1, 7, TILE])
def test_tile_in_transposes_and_zero_fills_and_tile_out_restores(n, C, dt):
    rng = np.random.default_rng(C * 100 + n)
    for name, src in _layouts(n, C, dt, rng):
        t = np.full((_padded(C), TILE), np.nan, dt)
        _in(src, t)
        expected = np.zeros((C, TILE), dt)
        expected[:, :n] = src.T
        np.testing.assert_array_equal(t[:C], expected, err_msg=name)
        dst = np.full_like(src, -7.0)
        _out(t, dst)
        np.testing.assert_array_equal(dst, src, err_msg=name)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("C", [4, 5, 10, 15, 20, 21, 37])
@pytest.mark.parametrize("n", [1, 2, 7, TILE])
def test_tile_out_to_rows_back_to_back_stays_inside_them(n, C, dt):
    """Rows stored back to back (a C-contiguous array) may take whole-vector
    stores past a row's end, onto the next rows, which are stored after:
    the rows come out exact and nothing past them is touched."""
    t = np.random.default_rng(C * 100 + n).standard_normal((_padded(C), TILE)).astype(dt)
    guard = TILE
    buffer = np.full(n * C + 2 * guard, -7.0, dt)
    dst = buffer[guard:guard + n * C].reshape(n, C)
    _out(t, dst)
    np.testing.assert_array_equal(dst, t[:C, :n].T)
    assert np.all(buffer[:guard] == -7.0) and np.all(buffer[guard + n * C:] == -7.0)


@pytest.mark.parametrize("dt", DTYPES)
def test_tile_out_writes_only_the_rows_and_classes_of_dst(dt):
    C, n = TILE + 3, 5
    t = np.arange(_padded(C) * TILE, dtype=dt).reshape(_padded(C), TILE)
    big = np.full((TILE, C + 4), -1.0, dt)
    _out(t, big[:n, :C])
    np.testing.assert_array_equal(big[:n, :C], t[:C, :n].T)
    assert np.all(big[n:] == -1.0) and np.all(big[:, C:] == -1.0)


def _tile(C, dt, seed=0):
    rng = np.random.default_rng(seed + C)
    return (rng.standard_normal((C, TILE)) * 4).astype(dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("C", CLASSES)
def test_tile_max_is_the_lane_max_skipping_nan(C, dt):
    t = _tile(C, dt)
    t[C // 2, 3] = np.nan
    t[:, 5] = -np.inf
    t[C - 1, 6] = np.inf
    t[:, 7] = np.nan
    t[C - 1, 8] = np.nan
    t[0, 8] = np.inf
    m = np.empty(TILE, dt)
    _max(t, m)
    expected = np.fmax.reduce(t, axis=0)  # the max of the values that are not NaN
    expected[np.isnan(expected)] = -np.inf  # none (lane 7; lane 3 when C is 1)
    np.testing.assert_array_equal(m, expected)
    assert m[5] == -np.inf and m[6] == np.inf and m[8] == np.inf


def _group_order_sum(terms):
    """The documented order: classes in groups of GROUP summed in the terms'
    type, in class order; the groups' sums added in float64."""
    total = np.zeros(terms.shape[1])
    for c0 in range(0, terms.shape[0], GROUP):
        group = np.zeros(terms.shape[1], terms.dtype)
        for c in range(c0, min(c0 + GROUP, terms.shape[0])):
            group = group + terms[c]
        total += group.astype(np.float64)
    return total


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("C", CLASSES)
@pytest.mark.parametrize("store", [True, False])
def test_tile_exp_sums_follow_the_documented_order_bit_for_bit(C, dt, store):
    t = _tile(C, dt)
    m = t.max(axis=0)
    s, log_s = np.empty(TILE), np.empty(TILE)
    original = t.copy()
    _exp_sums(t, m, s, log_s, store)
    e = _exp(original - m)
    np.testing.assert_array_equal(s, _group_order_sum(e))
    np.testing.assert_allclose(log_s, np.log(s), rtol=1e-15)
    np.testing.assert_array_equal(t, e if store else original)
    # and the sum is right, against float64
    exact = np.exp(original.astype(np.float64) - m).sum(axis=0)
    np.testing.assert_allclose(s, exact, rtol=2e-6 if dt == np.float32 else 1e-14)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("C", CLASSES)
@pytest.mark.parametrize("with_q", [True, False])
@pytest.mark.parametrize("with_w", [True, False])
def test_tile_dot_against_float64(C, dt, with_q, with_w):
    rng = np.random.default_rng(C)
    t = _tile(C, dt)
    m = t.max(axis=0)
    q = rng.random((C, TILE)).astype(dt) if with_q else None
    w = rng.random(C).astype(dt) if with_w else None
    keep, uniform = 0.8, 0.2 / C
    total, dot = np.empty(TILE), np.empty(TILE)
    _dot(t, q, w, keep, uniform, m, total, dot)
    q64 = (keep * q.astype(np.float64) + uniform) if with_q else np.ones((C, TILE))
    if with_w:
        q64 = q64 * w.astype(np.float64)[:, None]
    tol = dict(rtol=1e-5, atol=1e-5) if dt == np.float32 else dict(rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(total, q64.sum(axis=0), **tol)
    np.testing.assert_allclose(dot, (q64 * (t.astype(np.float64) - m)).sum(axis=0), **tol)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("with_q", [True, False])
@pytest.mark.parametrize("with_w", [True, False])
def test_tile_scale_minus(dt, with_q, with_w):
    C = TILE + 5
    rng = np.random.default_rng(1)
    t = _tile(C, dt)
    k1, k2 = rng.random(TILE).astype(dt), rng.random(TILE).astype(dt)
    q = rng.random((C, TILE)).astype(dt) if with_q else None
    w = rng.random(C).astype(dt) if with_w else None
    kq = 0.75
    expected = t.astype(np.float64) * k1 - (kq * (q if with_q else 0.0) + k2) * (
        w[:, None] if with_w else 1.0)
    _scale_minus(t, k1, k2, w, q, kq)
    tol = dict(rtol=1e-6, atol=1e-6) if dt == np.float32 else dict(rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(t, expected, **tol)


# --------------------------------------------------------------------------
# The tiled kernels, through the public functions, against PyTorch


def _inputs(shape, dt, seed):
    """Logits in the (N, C) or (N, C, d) layout, as the views to test."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dt)
    views = [("contiguous", x)]
    if len(shape) == 2:
        views.append(("strided rows", (rng.standard_normal((2 * shape[0], shape[1] + 3)) * 3)
                      .astype(dt)[::2, 1:shape[1] + 1]))
        views.append(("transposed", np.ascontiguousarray(x.T).T))
        views.append(("strided both ways", (rng.standard_normal((2 * shape[0], 2 * shape[1]))
                                             * 3).astype(dt)[::2, 1::2]))
    return views


# Contiguous rows take the tiles up to 64 classes in float32, in float64 up
# to 16 with AVX-512 and 40 with narrower registers; the transposed views and the
# (N, C, d) layout with d >= TILE at every size; rows strided both ways
# (narrow slabs as (45, 17, 3) included) up to 2048 (float32) / 1024
# (float64): (6, 1500) falls between.
# (37, 22) and (19, 44) end in a partial square of the register transposes
# (8 x 8 or 4 x 4: masked, or lane by lane without AVX-512).
SHAPES = [(37, 1), (37, TILE + 1), (37, 22), (19, 44), (5, 64), (37, 128), (20, 300),
          (6, 1500), (3, 40, 2 * TILE + 3), (45, 17, 3), (2, 128, 20), (2, 300, 20)]


def _tol(dt):
    return dict(rtol=2e-5, atol=2e-6) if dt == np.float32 else dict(rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tiled_cross_entropy_against_torch(shape, dt):
    C = shape[1]
    rng = np.random.default_rng(sum(shape))
    target_shape = (shape[0],) + shape[2:]
    y = rng.integers(0, C, target_shape)
    y.flat[1] = -100
    w = rng.random(C).astype(dt) + 0.1
    q = rng.random(shape).astype(dt)
    q /= q.sum(axis=1, keepdims=True)
    copies = dict(_inputs(shape, dt, sum(shape)))  # for in place: same values, same layout
    for name, x in _inputs(shape, dt, sum(shape)):
        for target, kw in ((y, dict(weight=w, label_smoothing=0.1)), (y, {}),
                           (q, dict(weight=w, label_smoothing=0.2)), (q, {})):
            xt = torch.from_numpy(np.array(x)).requires_grad_(True)
            t_loss = F.cross_entropy(xt, torch.from_numpy(target),
                                     **{k: torch.from_numpy(v) if k == "weight" else v
                                        for k, v in kw.items()})
            t_loss.backward()
            loss, grad = fastxent.cross_entropy_with_grad(x, target, axis=1, **kw)
            np.testing.assert_allclose(loss, t_loss.item(), **_tol(dt), err_msg=name)
            np.testing.assert_allclose(grad, xt.grad.numpy(), **_tol(dt), err_msg=name)
            forward = fastxent.cross_entropy(x, target, axis=1, **kw)
            assert forward == loss
        losses = fastxent.cross_entropy(x, y, axis=1, reduction="none")
        t_losses = F.cross_entropy(torch.from_numpy(np.array(x)), torch.from_numpy(y),
                                   reduction="none").numpy()
        np.testing.assert_allclose(losses, t_losses, **_tol(dt), err_msg=name)
        inplace = copies[name]
        _, grad = fastxent.cross_entropy_with_grad(inplace, y, axis=1, inplace=True)
        assert grad is inplace
        np.testing.assert_array_equal(
            grad, fastxent.cross_entropy_with_grad(x, y, axis=1)[1], err_msg=name)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tiled_softmax_log_softmax_logsumexp_against_torch(shape, dt):
    for name, x in _inputs(shape, dt, sum(shape) + 1):
        xt = torch.from_numpy(np.array(x))
        np.testing.assert_allclose(fastxent.softmax(x, axis=1), torch.softmax(xt, 1).numpy(),
                                   **_tol(dt), err_msg=name)
        np.testing.assert_allclose(fastxent.log_softmax(x, axis=1),
                                   torch.log_softmax(xt, 1).numpy(), **_tol(dt), err_msg=name)
        np.testing.assert_allclose(fastxent.logsumexp(x, axis=1), torch.logsumexp(xt, 1).numpy(),
                                   **_tol(dt), err_msg=name)


@pytest.mark.parametrize("dt", DTYPES)
def test_tiled_logsumexp_of_infinite_rows_as_torch(dt):
    x = np.random.default_rng(0).standard_normal((TILE + 3, 20)).astype(dt)
    x[2] = -np.inf
    x[4, 7] = np.inf
    x[5, 1] = np.nan
    x[6, 3], x[6, 9] = np.nan, np.inf  # the max skips NaN; the result is NaN
    x[7] = -np.inf
    x[7, 19] = np.nan
    x[8, :] = np.nan
    expected = torch.logsumexp(torch.from_numpy(x), 1).numpy()
    assert np.isnan(expected[[5, 6, 7, 8]]).all()
    np.testing.assert_allclose(fastxent.logsumexp(x), expected, **_tol(dt))  # inf, NaN equal


@pytest.mark.parametrize("register_bytes", [64, 32, 16])
@pytest.mark.parametrize("dt", DTYPES)
def test_which_rows_take_the_tiles(dt, register_bytes, monkeypatch):
    """Rows contiguous along the classes up to the count for the CPU's
    registers (their tiles are transposed); a class contiguous across a
    tile's rows at any size; rows strided both ways, narrow slabs included,
    while a tile's scratch stays small."""
    monkeypatch.setattr(_cpu, "native_vector_bytes", lambda: register_bytes)
    table = _cpu.TRANSPOSED_TILE_CLASSES[64 if register_bytes == 64 else 32]
    limit = table[np.dtype(dt)]
    assert _cpu._tiled(np.zeros((5, limit), dt))
    assert not _cpu._tiled(np.zeros((5, limit + 1), dt))
    assert not _cpu._tiled(np.zeros((5, 0), dt))
    assert _cpu._tiled(np.zeros((3000, 5), dt).T)            # a transposed array
    assert _cpu._tiled(np.zeros((2, 3000, 20), dt))          # (N, C, d)
    assert _cpu._tiled(np.zeros((1, _cpu.TILE_CLASSES, TILE), dt))
    assert not _cpu._tiled(np.zeros((1, _cpu.TILE_CLASSES + 1, TILE), dt))
    strided = _cpu.STRIDED_TILE_BYTES // (TILE * np.dtype(dt).itemsize)
    assert _cpu._tiled(np.zeros((10, 3 * strided), dt)[:, ::3])
    assert not _cpu._tiled(np.zeros((10, 3 * strided + 3), dt)[:, ::3])
    # slabs narrower than a tile: a tile's rows are one position of 16 slabs
    assert _cpu._tiled(np.zeros((20, strided, TILE - 1), dt))
    assert not _cpu._tiled(np.zeros((20, strided + 1, TILE - 1), dt))
