"""The options beyond torch's functions (``z_loss``, ``logit_scale``,
``softcap``, ``return_stats``) on the GPU, under the
CUDA simulator: the CPU's option grid and reference (``tests/parity``),
on a pairwise covering array of it with the GPU's class counts."""

from __future__ import annotations

import pytest

from tests.parity import CUDA, case_id, check_options, option_cases


@pytest.mark.parametrize("case", option_cases("cuda"), ids=case_id)
def test_options_match_torch(case):
    check_options(CUDA, **case)


@pytest.mark.parametrize("C", [3, 12, 40])  # one lane per row .. a whole block
def test_argmax_takes_the_first_maximum_and_nan(C):
    """``predicted`` on the GPU: ``torch.argmax`` of the logits as given (the
    group reduction of (value, index) pairs), and every row's lse, ignored
    rows included."""
    import numpy as np
    import torch

    import fastxent
    from tests.parity import torch_ce_options

    rng = np.random.default_rng(6)
    x = rng.integers(-3, 3, (6, C)).astype(np.float64)  # many ties
    x[1, :] = 2.0
    x[2, C // 2] = np.nan
    x[3, [1, C - 1]] = np.nan
    x[4, :] = -np.inf
    y = rng.integers(0, C, 6)
    y[0] = -100
    _, _, stats = fastxent.cross_entropy_with_grad(CUDA.put(x), CUDA.put(y), softcap=1.0,
                                                   return_stats=True)
    expect = torch.argmax(torch.from_numpy(x), dim=-1).numpy()
    np.testing.assert_array_equal(CUDA.get(stats.predicted), expect)
    finite = np.isfinite(x).all(axis=1)
    _, _, t_lse, _ = torch_ce_options(x[finite], np.where(y[finite] < 0, 0, y[finite]),
                                      softcap=1.0)
    np.testing.assert_allclose(CUDA.get(stats.lse)[finite], t_lse, rtol=1e-12)
