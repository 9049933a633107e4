"""CPU and GPU compute a loss from the same formula (``fastxent/_formulas.py``).

The two devices' results may differ only by their exponential and
logarithm (the CPU's vectorized polynomials, the GPU's libdevice), never by
how a formula is written: BCE on the tails, where the formula as PyTorch
writes it cancels every digit, and cross-entropy with every option.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

import fastxent


def _ulps(a, b, scale, dtype):
    """|a - b| in units in the last place of ``scale``, a unit being at least
    the smallest normal number: the CPU's exponential flushes results below
    it to 0 or an approximation (``fastxent/_fastmath.py``)."""
    unit = np.maximum(np.spacing(np.abs(scale).astype(dtype)), np.finfo(dtype).tiny)
    unit = unit.astype(np.float64)
    return np.abs(a.astype(np.float64) - b.astype(np.float64)) / unit


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("t", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("pos_weight", [None, 2.5])
def test_bce_tails_agree_between_cpu_and_gpu(dtype, t, pos_weight):
    x = np.concatenate([np.linspace(-100, 100, 801), [-40.0, 40.0, -0.0]]).astype(dtype)
    target = np.full_like(x, t)
    kw = {} if pos_weight is None else dict(pos_weight=np.full_like(x, pos_weight))
    loss_c, grad_c = fastxent.binary_cross_entropy_with_logits_with_grad(
        x, target, reduction="none", **kw)
    device_kw = {k: cuda.to_device(v) for k, v in kw.items()}
    loss_g, grad_g = fastxent.binary_cross_entropy_with_logits_with_grad(
        cuda.to_device(x), cuda.to_device(target), reduction="none", **device_kw)
    loss_g, grad_g = loss_g.copy_to_host(), grad_g.copy_to_host()
    # the case that drifted when each device wrote its own formula: the CPU
    # gave 4.25e-18 and the GPU 0.0
    at = np.flatnonzero(x == -40.0)[0]
    if t == 0.0:
        assert loss_g[at] > 0 and _ulps(loss_c[at:at + 1], loss_g[at:at + 1], loss_c[at:at + 1],
                                        dtype).max() <= 1
    assert _ulps(loss_c, loss_g, np.maximum(np.abs(loss_c), np.abs(loss_g)), dtype).max() <= 2
    # The gradient l sigmoid(x) - l + 1 - t cancels (to 1e-3 of its terms for
    # t = 1, x = 7): held to the size of its terms.
    label_weight = 1.0 + ((pos_weight or 1.0) - 1.0) * t
    terms = np.full_like(x, max(label_weight, 1.0))
    assert _ulps(grad_c, grad_g, terms, dtype).max() <= 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("soft", [False, True])
def test_cross_entropy_rows_agree_between_cpu_and_gpu(dtype, soft):
    """Logits of magnitude 1e6 to 1e16: the loss's (m - x_t) + log(s) and
    the smoothing sums are the same formula on both devices."""
    rng = np.random.default_rng(3)
    scales = np.array([1.0, 1e6, 1e16, 1.0])[:, None]
    x = (rng.standard_normal((4, 12)) * scales).astype(dtype)
    x[3, :] = 5.0  # tied logits
    w = (rng.random(12) + 0.5).astype(dtype)
    if soft:
        t = rng.random((4, 12)).astype(dtype)
        t /= t.sum(axis=1, keepdims=True)
    else:
        t = rng.integers(0, 12, 4)
    kw = dict(weight=w, label_smoothing=0.2, reduction="none")
    loss_c, grad_c = fastxent.cross_entropy_with_grad(x, t, **kw)
    kw["weight"] = cuda.to_device(w)
    loss_g, grad_g = fastxent.cross_entropy_with_grad(cuda.to_device(x), cuda.to_device(t), **kw)
    loss_g, grad_g = loss_g.copy_to_host(), grad_g.copy_to_host()
    assert np.all(np.isfinite(loss_c)) and np.all(np.isfinite(loss_g))
    # rounding of the sums differs (lanes against an online pass): a few ulp
    # of the loss's terms, where the terms are the logits' size
    terms = np.abs(x).max(axis=1) + np.abs(loss_c) + 1.0
    assert _ulps(loss_c, loss_g, terms, dtype).max() <= 8
    np.testing.assert_allclose(grad_g, grad_c, rtol=0, atol=8 * np.finfo(dtype).eps)
