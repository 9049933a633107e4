"""``z_loss``: PaLM's auxiliary loss on each row's log-sum-exp, on the CPU.

Against ``tests/parity.torch_ce_z_loss`` (float64 PyTorch with autograd)
over the option grid (``tests/parity.option_cases``), which the GPU
simulator tests run too (``tests/cuda_sim/test_gpu_kernels.py``).
"""

from __future__ import annotations

import numpy as np
import pytest

import fastxent
from tests.parity import CPU, case_id, check_z_loss, option_cases, torch_ce_z_loss


@pytest.mark.parametrize("case", option_cases("cpu"), ids=case_id)
def test_z_loss_matches_torch(case):
    check_z_loss(CPU, **case)


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
