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
