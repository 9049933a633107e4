"""The LLM options on the CPU: ``z_loss`` (PaLM's auxiliary loss on each
row's log-sum-exp), ``logit_scale``, ``softcap`` (Gemma 2) and
``return_stats``.

Against ``tests/parity.torch_ce_options`` (float64 PyTorch with autograd)
over the option grid (``tests/parity.option_cases``), which the GPU
simulator tests run too (``tests/cuda_sim/test_options_gpu.py``).
"""

from __future__ import annotations

import numpy as np
import pytest

import fastxent
import torch

from tests.parity import (CPU, case_id, check_options, option_cases, torch_ce_options,
                          torch_ce_z_loss)


@pytest.mark.parametrize("case", option_cases("cpu"), ids=case_id)
def test_options_match_torch(case):
    check_options(CPU, **case)


def test_z_loss_changes_the_result():
    """The checks above are not vacuous: z_loss moves loss and gradient."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((6, 5)) * 3, rng.integers(0, 5, 6)
    plain, g_plain = fastxent.cross_entropy_with_grad(x, y)
    z, g_z = fastxent.cross_entropy_with_grad(x, y, z_loss=1e-2)
    assert abs(z - plain) > 1e-3 and np.abs(g_z - g_plain).max() > 1e-4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_z_loss_on_large_logits_stays_finite(dtype):
    """Logits of 1e4 with z_loss 1e-4 (the LLM setting): lse**2 is 1e8."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((8, 300)) * 1e4).astype(dtype)
    y = rng.integers(0, 300, 8)
    loss, grad = fastxent.cross_entropy_with_grad(x, y, z_loss=1e-4, label_smoothing=0.1)
    t_loss, t_grad = torch_ce_z_loss(x, y, z_loss=1e-4, label_smoothing=0.1)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(np.float64(loss), t_loss, rtol=1e-5 if dtype == np.float32
                               else 1e-10)
    np.testing.assert_allclose(grad, t_grad, rtol=0, atol=1e-5 if dtype == np.float32
                               else 1e-12)


def test_z_loss_in_place_and_in_the_loss_object():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((4, 3, 7)), rng.integers(0, 7, (4, 3))
    w = rng.random(7) + 0.5
    loss, grad = fastxent.cross_entropy_with_grad(x, y, weight=w, z_loss=0.05)
    xi = x.copy()
    loss_i, grad_i = fastxent.cross_entropy_with_grad(xi, y, weight=w, z_loss=0.05,
                                                      inplace=True)
    assert grad_i is xi and loss_i == loss
    np.testing.assert_array_equal(grad_i, grad)
    crit = fastxent.CrossEntropyLoss(weight=w, z_loss=0.05)
    assert crit(x, y) == loss
    np.testing.assert_array_equal(crit.backward(), grad)


@pytest.mark.parametrize("value, exc, pattern", [
    (-1e-4, ValueError, r"z_loss must be finite and at least 0.0, got -0.0001"),
    (float("nan"), ValueError, r"z_loss must be finite and at least 0.0, got nan"),
    (float("inf"), ValueError, r"got inf"),
    ("a", TypeError, r"z_loss must be a float, got 'a'"),
])
def test_bad_z_loss_is_refused_before_writing(value, exc, pattern):
    x = np.random.default_rng(4).standard_normal((4, 3))
    before = x.copy()
    with pytest.raises(exc, match=pattern):
        fastxent.cross_entropy_with_grad(x, np.array([0, 1, 2, 1]), z_loss=value, inplace=True)
    np.testing.assert_array_equal(x, before)
    with pytest.raises(exc, match=pattern):
        fastxent.CrossEntropyLoss(z_loss=value)


# --------------------------------------------------------------------------
# logit_scale, softcap and return_stats beyond the grid


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [7, 100, 3000])  # tiles, blocks, direct rows
def test_extreme_logits_with_softcap_and_z_loss(dtype, C):
    """Logits of 1e4 under softcap 30 and z_loss 1e-4 (the LLM setting):
    finite, and as torch; the capped logits saturate, their gradient is 0."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((9, C)) * 1e4).astype(dtype)
    y = rng.integers(0, C, 9)
    kw = dict(softcap=30.0, z_loss=1e-4, label_smoothing=0.1)
    loss, grad, stats = fastxent.cross_entropy_with_grad(x, y, return_stats=True, **kw)
    t_loss, t_grad, t_lse, _ = torch_ce_options(x, y, **kw)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(np.float64(loss), t_loss, rtol=2e-6 if dtype == np.float32
                               else 1e-10)
    np.testing.assert_allclose(grad, t_grad, rtol=0, atol=1e-6 if dtype == np.float32
                               else 1e-12)
    np.testing.assert_allclose(stats.lse, t_lse, rtol=2e-6 if dtype == np.float32 else 1e-10)


@pytest.mark.parametrize("C", [5, 100, 300])
@pytest.mark.parametrize("inplace", [False, True])
def test_argmax_takes_the_first_maximum_and_nan(C, inplace):
    """``predicted`` is ``torch.argmax`` of the logits as given (before any
    transform or in-place write): the first index on ties, a NaN above all."""
    rng = np.random.default_rng(6)
    x = rng.integers(-3, 3, (6, C)).astype(np.float64)  # many ties
    x[1, :] = 2.0
    x[2, C // 2] = np.nan
    x[3, [1, C - 1]] = np.nan
    x[4, :] = -np.inf
    y = rng.integers(0, C, 6)
    expect = torch.argmax(torch.from_numpy(x), dim=-1).numpy()
    logits = x.copy()
    _, _, stats = fastxent.cross_entropy_with_grad(logits, y, softcap=1.0, return_stats=True,
                                                   inplace=inplace)
    np.testing.assert_array_equal(stats.predicted, expect)


def test_accuracy_counts_rows_not_ignored():
    x = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [9.0, 0.0, 0.0]])
    y = np.array([0, 2, 2, -100])
    _, stats = fastxent.cross_entropy(x, y, return_stats=True)
    assert stats.accuracy == 2 / 3
    np.testing.assert_array_equal(stats.predicted, [0, 1, 2, 0])
    _, stats = fastxent.cross_entropy(x, np.full(4, -100), return_stats=True)
    assert np.isnan(stats.accuracy)
    assert np.all(np.isfinite(stats.lse))  # ignored rows keep their lse
    _, stats = fastxent.cross_entropy(x, np.full_like(x, 1 / 3), return_stats=True)
    assert stats.accuracy is None


def test_options_change_the_result():
    """The grid's checks are not vacuous: each option moves loss and gradient."""
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((6, 5)) * 3, rng.integers(0, 5, 6)
    plain, g_plain = fastxent.cross_entropy_with_grad(x, y)
    for kw in (dict(logit_scale=0.7), dict(softcap=2.0), dict(z_loss=1e-2)):
        loss, grad = fastxent.cross_entropy_with_grad(x, y, **kw)
        assert abs(loss - plain) > 1e-3 and np.abs(grad - g_plain).max() > 1e-4, kw


def test_options_in_place_and_in_the_loss_object():
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((4, 3, 300)), rng.integers(0, 300, (4, 3))
    kw = dict(logit_scale=1.3, softcap=5.0, z_loss=1e-3)
    loss, grad, stats = fastxent.cross_entropy_with_grad(x, y, return_stats=True, **kw)
    xi = x.copy()
    loss_i, grad_i, stats_i = fastxent.cross_entropy_with_grad(xi, y, inplace=True,
                                                               return_stats=True, **kw)
    assert grad_i is xi and loss_i == loss
    np.testing.assert_array_equal(grad_i, grad)
    np.testing.assert_array_equal(stats_i.lse, stats.lse)
    crit = fastxent.CrossEntropyLoss(return_stats=True, **kw)
    assert crit(x, y) == loss
    np.testing.assert_array_equal(crit.backward(), grad)
    np.testing.assert_array_equal(crit.stats.predicted, stats.predicted)
    assert fastxent.CrossEntropyLoss(**kw).stats is None


@pytest.mark.parametrize("option, value, exc, pattern", [
    ("softcap", 0.0, ValueError, r"softcap must be a finite number above 0 \(or None\), got 0.0"),
    ("softcap", -1.0, ValueError, r"softcap must be a finite number above 0"),
    ("softcap", float("inf"), ValueError, r"softcap must be a finite number above 0"),
    ("softcap", "a", TypeError, r"softcap must be a float or None, got 'a'"),
    ("logit_scale", float("nan"), ValueError, r"logit_scale must be finite, got nan"),
    ("logit_scale", float("inf"), ValueError, r"logit_scale must be finite, got inf"),
    ("logit_scale", None, TypeError, r"logit_scale must be a float, got None"),
    ("return_stats", 1, TypeError, r"return_stats must be True or False, got 1"),
])
def test_bad_llm_options_are_refused_before_writing(option, value, exc, pattern):
    x = np.random.default_rng(9).standard_normal((4, 3))
    before = x.copy()
    with pytest.raises(exc, match=pattern):
        fastxent.cross_entropy_with_grad(x, np.array([0, 1, 2, 1]), inplace=True,
                                         **{option: value})
    np.testing.assert_array_equal(x, before)
    with pytest.raises(exc, match=pattern):
        fastxent.CrossEntropyLoss(**{option: value})
