"""Distillation on the GPU, under the CUDA simulator: the table of
``tests/test_distillation.py`` (a covering subset, tiny shapes) against the
same float64 torch twin, cached rows and rows read twice, a top-k teacher,
in place and refused input."""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

from fastxent import _cuda, distillation_loss, distillation_loss_with_grad
from tests.test_distillation import C, N, close, inputs, topk_of, torch_twin

# (divergence, temperature, alpha, reduction, layout, dtype): every pair of
# values of the CPU grid's axes appears in some row; rows alternately
# cached in shared memory and read twice (``SHARED_BYTES_CAP`` = 0)
CASES = [
    ("forward_kl", 0.5, 0.0, "batchmean", "rows", np.float64),
    ("forward_kl", 4.0, 0.3, "none", "slabs", np.float32),
    ("forward_kl", 1.0, 0.3, "sum", "rows", np.float32),
    ("reverse_kl", 1.0, 0.3, "batchmean", "slabs", np.float64),
    ("reverse_kl", 4.0, 0.0, "sum", "rows", np.float64),
    ("reverse_kl", 0.5, 0.3, "none", "rows", np.float32),
    ("jsd", 4.0, 0.3, "batchmean", "rows", np.float32),
    ("jsd", 0.5, 0.3, "sum", "slabs", np.float64),
    ("jsd", 1.0, 0.0, "none", "slabs", np.float32),
]


@pytest.mark.parametrize("divergence,temperature,alpha,reduction,layout,dtype,cache_bytes",
                         [case + ((0, None)[i % 2],) for i, case in enumerate(CASES)])
def test_dense_teacher_matches_torch(divergence, temperature, alpha, reduction, layout, dtype,
                                     cache_bytes, monkeypatch):
    monkeypatch.setattr(_cuda, "SHARED_BYTES_CAP", cache_bytes)
    s, t, y, axis = inputs(layout, dtype)
    opts = dict(divergence=divergence, beta=0.3, temperature=temperature,
                target=y if alpha else None, alpha=alpha, reduction=reduction, axis=axis)
    want_loss, want_grad = torch_twin(s, t, **opts)
    if alpha:
        opts["target"] = cuda.to_device(y)
    loss, grad = distillation_loss_with_grad(cuda.to_device(s), cuda.to_device(t), **opts)
    if reduction == "none":
        loss = loss.copy_to_host()
    np.testing.assert_allclose(loss, want_loss, **close(dtype))
    np.testing.assert_allclose(grad.copy_to_host(), want_grad, **close(dtype))


@pytest.mark.parametrize("divergence,k,layout,cache_bytes", [("forward_kl", 1, "rows", 0),
                                                             ("jsd", 5, "slabs", None),
                                                             ("reverse_kl", C, "rows", None),
                                                             ("forward_kl", 5, "slabs", 0)])
def test_topk_teacher_in_place_matches_torch(divergence, k, layout, cache_bytes, monkeypatch):
    monkeypatch.setattr(_cuda, "SHARED_BYTES_CAP", cache_bytes)
    s, t, y, axis = inputs(layout, np.float64, seed=1)
    idx, vals, dense = topk_of(t, k, axis)
    opts = dict(divergence=divergence, temperature=2.0, target=y, alpha=0.25, axis=axis)
    want_loss, want_grad = torch_twin(s, dense, **opts)
    x = cuda.to_device(s)
    loss, grad = distillation_loss_with_grad(x, (cuda.to_device(idx), cuda.to_device(vals)),
                                             inplace=True, **dict(opts, target=cuda.to_device(y)))
    assert grad is x
    np.testing.assert_allclose(loss, want_loss, **close(np.float64))
    np.testing.assert_allclose(x.copy_to_host(), want_grad, **close(np.float64))
    host = distillation_loss(s, (idx, vals), device="cuda", **opts)
    np.testing.assert_allclose(host, want_loss, **close(np.float64))


def test_bad_topk_refused_before_any_write():
    s, t, _, _ = inputs("rows", np.float64)
    idx, vals, _ = topk_of(t, 5, -1)
    for row, value in ((2, C), (4, int(idx[4, 0]))):
        bad = idx.copy()
        bad[row, 3] = value
        x = cuda.to_device(s)
        with pytest.raises(ValueError, match=f"row at position \\({row},\\)"):
            distillation_loss_with_grad(x, (cuda.to_device(bad), cuda.to_device(vals)),
                                        inplace=True)
        np.testing.assert_array_equal(x.copy_to_host(), s)
    assert N == s.shape[0]


# 16-bit student and teacher logits: the kernel reads them (bfloat16 as
# bits), computes as for float32 and rounds the gradient; held to the CPU's
# 16-bit result (``tests/cuda_sim/test_half_gpu.py``'s bounds), whose own
# tests hold it to float64 torch.
def _half_gpu_cases():
    from tests.parity import covering
    return covering(dict(dtype=("float16", "bfloat16"), divergence=("forward_kl", "reverse_kl",
                                                                    "jsd"),
                         layout=("rows", "slabs"), teacher=("same", "float32", "topk"),
                         dest=("new", "inplace", "out16", "out32"), cached=(0, None)),
                    strength=2)


@pytest.mark.parametrize("case", _half_gpu_cases(), ids=lambda c: "-".join(map(str, c.values())))
def test_half_logits_match_the_cpu(case, monkeypatch):
    import ml_dtypes
    from tests.cuda_sim.test_half_gpu import SUM_ORDER, get, put, within_one_ulp
    monkeypatch.setattr(_cuda, "SHARED_BYTES_CAP", case["cached"])
    dtype = np.dtype(np.float16 if case["dtype"] == "float16" else ml_dtypes.bfloat16)
    s, t, y, axis = inputs(case["layout"], np.float32, seed=2)
    s = s.astype(dtype)
    if case["teacher"] == "topk":
        idx, vals, _ = topk_of(t, 5, axis)
        teacher, on_gpu = (idx, vals.astype(dtype)), (cuda.to_device(idx), put(vals.astype(dtype)))
    else:
        teacher = t.astype(dtype if case["teacher"] == "same" else np.float32)
        on_gpu = put(teacher)
    opts = dict(divergence=case["divergence"], beta=0.3, temperature=2.0, target=y,
                alpha=0.25, reduction="none" if case["layout"] == "rows" else "batchmean",
                axis=axis)
    if case["divergence"] == "reverse_kl" and case["teacher"] == "topk":
        opts.update(target=None, alpha=0.0)  # infinite where the teacher has no mass
    cpu_loss, cpu_grad = distillation_loss_with_grad(s, teacher, **opts)
    if opts["target"] is not None:
        opts["target"] = cuda.to_device(y)
    x = put(s)
    extra = {}
    if case["dest"] == "inplace":
        extra["inplace"] = True
    elif case["dest"] != "new":
        out = put(np.full(s.shape, np.nan, dtype if case["dest"] == "out16" else np.float32))
        extra["out"] = out
    loss, grad = distillation_loss_with_grad(x, on_gpu, **opts, **extra)
    assert grad is extra.get("out", x if extra.get("inplace") else grad)
    np.testing.assert_allclose(get(loss), cpu_loss, rtol=SUM_ORDER, atol=1e-7)
    assert np.asarray(get(loss)).dtype == np.float32
    if case["dest"] == "out32":
        _, g32 = distillation_loss_with_grad(s.astype(np.float32), teacher if case["teacher"]
                                             == "topk" else teacher.astype(np.float32),
                                             **dict(opts, target=y if opts["target"] is not None
                                                    else None))
        np.testing.assert_allclose(get(grad), g32, rtol=2e-6, atol=1e-7)
    else:
        within_one_ulp(get(grad), cpu_grad, dtype, case)
