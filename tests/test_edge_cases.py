"""Extreme values and degenerate shapes, against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastxent
from tests import reference as ref
from tests.parity import torch_bce as _torch_bce, torch_ce as _torch_ce

DTYPES = [np.float64, np.float32]
IDS = ["f64", "f32"]


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)


def _both(x, y, **kw):
    ours = fastxent.cross_entropy_with_grad(x, y, **kw)
    return ours, _torch_ce(x, y, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_minus_inf_on_non_target_classes(dtype, smoothing):
    x = np.array([[1.0, -np.inf, 2.0, -np.inf], [-np.inf, 0.5, -np.inf, -1.0]], dtype=dtype)
    y = np.array([2, 3])
    for reduction in ("none", "sum"):
        (loss, grad), (t_loss, t_grad) = _both(x, y, reduction=reduction,
                                               label_smoothing=smoothing)
        np.testing.assert_allclose(loss, t_loss, **_tol(dtype))
        np.testing.assert_allclose(grad, t_grad, **_tol(dtype))
        if smoothing == 0.0:
            assert np.all(np.isfinite(loss))
            assert np.all(grad[np.isinf(x)] == 0.0)
            assert np.all(np.isfinite(grad))
        else:
            # the smoothing term reads every class: -log p = inf, as in torch
            assert np.all(np.isinf(loss))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "target_minus_inf"])
@pytest.mark.parametrize("n_classes", [4, 100, 300], ids=["tiles", "blocks", "direct"])
def test_a_bad_value_poisons_its_row_only(dtype, bad, n_classes):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, n_classes)).astype(dtype)
    y = np.array([0, 1, 2, 3, 1])
    x[2, 2] = bad  # row 2's target is class 2
    (loss, grad), (t_loss, t_grad) = _both(x, y, reduction="none")
    np.testing.assert_allclose(loss, t_loss, **_tol(dtype))
    np.testing.assert_allclose(grad, t_grad, **_tol(dtype))
    assert not np.isfinite(loss[2])
    assert np.all(np.isfinite(np.delete(loss, 2)))
    assert np.all(np.isfinite(np.delete(grad, 2, axis=0)))
    clean = np.delete(x, 2, axis=0)
    np.testing.assert_array_equal(np.delete(loss, 2),
                                  fastxent.cross_entropy(clean, np.delete(y, 2), reduction="none"))
    # reduced: the bad row makes the whole loss non-finite, as in torch
    (m, gm), (tm, tgm) = _both(x, y)
    np.testing.assert_allclose(m, tm, **_tol(dtype))
    np.testing.assert_allclose(gm, tgm, **_tol(dtype))
    assert not np.isfinite(m)
    # probability targets, and the softmaxes, of the same rows
    q = rng.random(x.shape).astype(dtype)
    q /= q.sum(axis=1, keepdims=True)
    (loss, grad), (t_loss, t_grad) = _both(x, q, reduction="none", label_smoothing=0.1)
    np.testing.assert_allclose(loss, t_loss, **_tol(dtype))
    np.testing.assert_allclose(grad, t_grad, **_tol(dtype))
    assert not np.isfinite(loss[2]) and np.all(np.isfinite(np.delete(loss, 2)))
    for fn, twin in ((fastxent.softmax, torch.softmax), (fastxent.log_softmax, torch.log_softmax),
                     (fastxent.logsumexp, torch.logsumexp)):
        np.testing.assert_allclose(fn(x), twin(torch.from_numpy(x), -1).numpy(), **_tol(dtype),
                                   err_msg=fn.__name__)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("scale", [1e4, 1e6, 1e30])
def test_huge_logits_stay_finite(dtype, scale):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, 5)) * scale).astype(dtype)
    y = rng.integers(0, 5, 6)
    for smoothing in (0.0, 0.3):
        (loss, grad), (t_loss, t_grad) = _both(x, y, reduction="none", label_smoothing=smoothing)
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
        np.testing.assert_allclose(loss, t_loss, rtol=1e-10 if dtype == np.float64 else 1e-5)
        np.testing.assert_allclose(grad, t_grad, **_tol(dtype))
    for fn, twin in ((fastxent.logsumexp, torch.logsumexp), (fastxent.softmax, torch.softmax),
                     (fastxent.log_softmax, torch.log_softmax)):
        ours = fn(x)
        assert np.all(np.isfinite(ours)), fn.__name__
        np.testing.assert_allclose(ours, twin(torch.from_numpy(x), dim=-1).numpy(),
                                   rtol=1e-10 if dtype == np.float64 else 1e-5, atol=1e-12)
    t = rng.random((6, 5)).astype(dtype)
    loss, grad = fastxent.binary_cross_entropy_with_logits_with_grad(x, t, reduction="none")
    t_loss, t_grad = _torch_bce(x, t, reduction="none")
    assert np.all(np.isfinite(loss))
    np.testing.assert_allclose(loss, t_loss, rtol=1e-10 if dtype == np.float64 else 1e-5)
    np.testing.assert_allclose(grad, t_grad, **_tol(dtype))


@pytest.mark.parametrize("weighted", [False, True])
def test_every_target_ignored(weighted):
    x = np.random.default_rng(2).standard_normal((4, 3))
    y = np.full(4, -100)
    w = np.array([1.0, 2.0, 3.0]) if weighted else None
    (loss, grad), (t_loss, t_grad) = _both(x, y, weight=w)
    assert np.isnan(loss) and np.isnan(t_loss)
    assert np.all(grad == 0.0)
    np.testing.assert_array_equal(grad, t_grad)
    s, gs = fastxent.cross_entropy_with_grad(x, y, weight=w, reduction="sum")
    assert s == 0.0 and np.all(gs == 0.0)
    assert np.isnan(fastxent.nll_loss(x, y, weight=w))


@pytest.mark.parametrize("logits_sign", [1.0, -1.0])
def test_mean_over_weights_summing_to_zero_divides_as_torch(logits_sign):
    # The denominator is 0 and the weighted sum is not: +-inf, as in torch
    # (and NaN where the sum is 0 too).
    x = logits_sign * np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    y = np.array([0, 1])
    w = np.array([1.0, -1.0, 0.5])
    (loss, _), (t_loss, _) = _both(x, y, weight=w)
    assert np.isinf(t_loss) and loss == t_loss
    (loss, _), (t_loss, _) = _both(np.zeros((2, 3)), y, weight=w)
    assert np.isnan(t_loss) and np.isnan(loss)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_empty_batch(dtype):
    x = np.zeros((0, 4), dtype=dtype)
    y = np.zeros(0, dtype=np.int64)
    loss, grad = fastxent.cross_entropy_with_grad(x, y)
    assert np.isnan(loss) and type(loss) is np.dtype(dtype).type
    assert grad.shape == (0, 4) and grad.dtype == dtype
    assert np.isnan(F.cross_entropy(torch.from_numpy(x), torch.from_numpy(y)).item())
    s = fastxent.cross_entropy(x, y, reduction="sum")
    assert s == 0.0 and type(s) is np.dtype(dtype).type
    assert fastxent.cross_entropy(x, y, reduction="none").shape == (0,)
    assert np.isnan(fastxent.cross_entropy(x, np.zeros((0, 4), dtype=dtype)))
    assert np.isnan(fastxent.binary_cross_entropy_with_logits(x, x))
    assert fastxent.binary_cross_entropy_with_logits(x, x, reduction="sum") == 0.0
    assert fastxent.logsumexp(x).shape == (0,)
    # (N, C, 0) in torch's layout
    x3 = np.zeros((2, 3, 0), dtype=dtype)
    assert fastxent.cross_entropy(x3, np.zeros((2, 0), dtype=np.int64), axis=1,
                                  reduction="sum") == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_one_class(dtype):
    x = np.array([[3.0], [-2.0], [1e4]], dtype=dtype)
    y = np.zeros(3, dtype=np.int64)
    for smoothing in (0.0, 0.5):
        (loss, grad), (t_loss, t_grad) = _both(x, y, label_smoothing=smoothing,
                                               reduction="none")
        np.testing.assert_array_equal(loss, np.zeros(3))
        np.testing.assert_allclose(loss, t_loss, atol=1e-12)
        np.testing.assert_allclose(grad, t_grad, atol=1e-12)
        assert np.all(grad == 0.0)
    np.testing.assert_array_equal(fastxent.softmax(x), np.ones((3, 1)))
    np.testing.assert_array_equal(fastxent.logsumexp(x), x[:, 0])


def test_float32_over_256000_classes():
    C = 256_000
    rng = np.random.default_rng(3)
    x64 = rng.standard_normal((3, C)) * 4
    x64[1, 17] = 40.0  # one dominant class
    x = x64.astype(np.float32)
    y = np.array([5, 17, C - 1])
    for smoothing in (0.0, 0.1):
        loss, grad = fastxent.cross_entropy_with_grad(x, y, label_smoothing=smoothing,
                                                      reduction="none")
        expect = ref.cross_entropy(x.astype(np.float64), y, label_smoothing=smoothing,
                                   reduction="none")
        # Within 2e-6 relative, except row 1 without smoothing (one dominant
        # class): a loss of 2e-9, the difference of two numbers near 40, that
        # no float32 computation gets to 2e-6 relative (torch float32 returns
        # -0.0); the 1e-9 absolute term covers it.
        np.testing.assert_allclose(loss, expect, rtol=2e-6, atol=1e-9)
        mean = fastxent.cross_entropy(x, y, label_smoothing=smoothing)
        np.testing.assert_allclose(mean, expect.mean(), rtol=2e-6)
        # torch's float32 gradient is itself 2e-6 off here (a float32 sum of
        # 256000 exponentials, 2e-5 relative): held to the float64 reference,
        # which it matches to 1e-8; the 1e-6 bound to torch holds for small C.
        g_ref = ref.cross_entropy_with_grad(x.astype(np.float64), y, label_smoothing=smoothing,
                                            reduction="none")[1]
        np.testing.assert_allclose(grad, g_ref, rtol=0, atol=1e-7)
        if smoothing == 0.0:  # with smoothing torch float32 is 4e-4 off here
            t_grad = _torch_ce(x, y, reduction="none")[1]
            np.testing.assert_allclose(grad, t_grad, rtol=0, atol=5e-6)
    lse = fastxent.logsumexp(x)
    np.testing.assert_allclose(lse, ref.logsumexp(x.astype(np.float64)), rtol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("padding", [0, 97, 297], ids=["tiles", "blocks", "direct"])
def test_logsumexp_infinite_rows(dtype, padding):
    """Rows of -inf give -inf and rows holding +inf give +inf, in each kind
    of kernel (``padding`` columns of -inf change no result, only the path)."""
    x = np.array([[-np.inf, -np.inf, -np.inf],
                  [1.0, np.inf, 2.0],
                  [np.inf, np.inf, 0.0],
                  [-np.inf, np.inf, -np.inf],
                  [np.nan, 1.0, 2.0],
                  [-np.inf, 0.0, -np.inf],
                  [np.nan, np.inf, 1.0],
                  [-np.inf, np.nan, -np.inf],
                  [np.nan, np.nan, np.nan]], dtype=dtype)
    x = np.concatenate([x, np.full((x.shape[0], padding), -np.inf, dtype)], axis=1)
    ours = fastxent.logsumexp(x)
    theirs = torch.logsumexp(torch.from_numpy(x), dim=-1).numpy()
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours, [-np.inf, np.inf, np.inf, np.inf, np.nan, 0.0,
                                         np.nan, np.nan, np.nan])
    np.testing.assert_array_equal(ours, ref.logsumexp(x))
    # softmax / log_softmax of the same rows, as torch
    for fn, twin in ((fastxent.softmax, torch.softmax), (fastxent.log_softmax, torch.log_softmax)):
        np.testing.assert_allclose(fn(x), twin(torch.from_numpy(x), dim=-1).numpy(),
                                   rtol=1e-6, atol=0, equal_nan=True, err_msg=fn.__name__)


def test_soft_targets_with_zero_probability_on_minus_inf_class():
    """torch computes 0 * -inf = NaN for the loss here, but a finite gradient."""
    x = np.array([[0.0, -np.inf, 1.0], [0.0, 1.0, 2.0]])
    q = np.array([[0.5, 0.0, 0.5], [0.2, 0.3, 0.5]])
    (loss, grad), (t_loss, t_grad) = _both(x, q, reduction="none")
    assert np.isnan(t_loss[0]) and np.isnan(loss[0])
    np.testing.assert_allclose(loss, t_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, t_grad, rtol=1e-12, atol=1e-15)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_tied_huge_logits_keep_the_log_of_the_tie(dtype, smoothing, soft):
    """Two tied logits of 1e30: each has probability 1/2, the loss is log 2.

    torch gets it from log_softmax = (x - max) - log(sum exp(x - max)); a
    kernel that forms lse = max + log(s) first loses the log 2 (1e30 + 0.69
    rounds to 1e30) and returns 0.
    """
    x = np.array([[1e30, 1e30], [-1e30, -1e30], [1e16, 1e16]], dtype=dtype)
    y = np.full((3, 2), 0.5, dtype=dtype) if soft else np.array([0, 1, 0])
    (loss, grad), (t_loss, t_grad) = _both(x, y, label_smoothing=smoothing, reduction="none")
    np.testing.assert_allclose(t_loss, np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(loss, t_loss, **_tol(dtype))
    np.testing.assert_allclose(grad, t_grad, **_tol(dtype))
