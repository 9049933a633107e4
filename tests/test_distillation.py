"""distillation_loss(_with_grad) and DistillationLoss against PyTorch in
float64 with autograd: ``log_softmax`` at temperature, ``kl_div``, the JSD
formula, and the top-k teacher as a dense tensor of -inf with its k values
scattered in. The GPU kernels run the same table in the simulator
(``tests/cuda_sim/test_distillation_gpu.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastxent
from fastxent import DistillationLoss, distillation_loss, distillation_loss_with_grad

N, C, D = 7, 13, 3
KINDS = ("forward_kl", "reverse_kl", "jsd")
IGNORE = -100


def torch_twin(student, teacher, *, divergence="forward_kl", beta=0.5, temperature=1.0,
               target=None, alpha=0.0, ignore_index=IGNORE, reduction="batchmean", axis=-1):
    """(loss, gradient wrt the student) in float64 torch autograd; ``teacher``
    dense (-inf outside a top-k teacher's classes)."""
    s = torch.tensor(np.moveaxis(np.asarray(student, np.float64), axis, -1),
                     requires_grad=True)
    t = torch.tensor(np.moveaxis(np.asarray(teacher, np.float64), axis, -1))
    T = temperature
    log_q, log_p = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        div = F.kl_div(log_q, p, reduction="none").sum(-1)
    elif divergence == "reverse_kl":
        div = F.kl_div(log_p, q, reduction="none").sum(-1)
    else:
        log_m = (beta * p + (1 - beta) * q).log()
        div = (beta * F.kl_div(log_m, p, reduction="none").sum(-1)
               + (1 - beta) * F.kl_div(log_m, q, reduction="none").sum(-1))
    row = (1 - alpha) * T * T * div
    count = row.numel()
    if target is not None:
        y = torch.tensor(np.asarray(target, np.int64))
        keep = y != ignore_index
        ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.clamp(min=0).reshape(-1),
                             reduction="none").reshape(y.shape)
        row = torch.where(keep, row + alpha * ce, torch.zeros_like(row))
        count = keep.sum()
    loss = {"sum": row.sum(), "batchmean": row.sum() / count, "none": row}[reduction]
    (loss if reduction != "none" else loss.sum()).backward()
    return loss.detach().numpy(), np.moveaxis(s.grad.numpy(), -1, axis)


def inputs(layout, dtype, seed=0):
    rng = np.random.default_rng(seed)
    shape = (N, C) if layout == "rows" else (N, C, D)
    s = (rng.normal(size=shape) * 2).astype(dtype)
    t = (rng.normal(size=shape) * 2).astype(dtype)
    y = rng.integers(0, C, size=(N,) if layout == "rows" else (N, D))
    y.reshape(-1)[[1, 4]] = IGNORE
    return s, t, y, (-1 if layout == "rows" else 1)


def topk_of(teacher, k, axis):
    """(indices, values) of the k largest, shuffled within each row, and the
    dense teacher of -inf with those values scattered in."""
    idx = np.argsort(-teacher, axis=axis, kind="stable").take(np.arange(k), axis=axis)
    idx = np.flip(idx, axis=axis).copy()  # not in class order
    vals = np.take_along_axis(teacher, idx, axis=axis)
    dense = np.full_like(teacher, -np.inf)
    np.put_along_axis(dense, idx, vals, axis=axis)
    return idx, vals, dense


def close(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", (np.float64, np.float32))
@pytest.mark.parametrize("layout", ("rows", "slabs"))
@pytest.mark.parametrize("reduction", ("batchmean", "sum", "none"))
@pytest.mark.parametrize("alpha", (0.0, 0.3))
@pytest.mark.parametrize("temperature", (0.5, 1.0, 4.0))
@pytest.mark.parametrize("divergence", KINDS)
def test_dense_teacher_matches_torch(divergence, temperature, alpha, reduction, layout, dtype):
    s, t, y, axis = inputs(layout, dtype)
    target = y if alpha else None
    opts = dict(divergence=divergence, beta=0.3, temperature=temperature, target=target,
                alpha=alpha, reduction=reduction, axis=axis)
    loss, grad = distillation_loss_with_grad(s, t, **opts)
    want_loss, want_grad = torch_twin(s, t, **opts)
    assert grad.dtype == dtype and grad.shape == s.shape
    np.testing.assert_allclose(loss, want_loss, **close(dtype))
    np.testing.assert_allclose(grad, want_grad, **close(dtype))
    np.testing.assert_allclose(distillation_loss(s, t, **opts), want_loss, **close(dtype))


@pytest.mark.parametrize("dtype", (np.float64, np.float32))
@pytest.mark.parametrize("layout", ("rows", "slabs"))
@pytest.mark.parametrize("k", (1, 5, C))
@pytest.mark.parametrize("divergence", KINDS)
def test_topk_teacher_matches_torch(divergence, k, layout, dtype):
    s, t, y, axis = inputs(layout, dtype, seed=1)
    idx, vals, dense = topk_of(t, k, axis)
    # reverse KL against a teacher of zero mass where the student has some is
    # inf, its gradient nan/inf, as torch's; without targets there, as the
    # twin's ``where`` would carry those nans into the ignored rows
    infinite = divergence == "reverse_kl" and k < C
    opts = dict(divergence=divergence, temperature=2.0, target=None if infinite else y,
                alpha=0.0 if infinite else 0.25, axis=axis)
    loss, grad = distillation_loss_with_grad(s, (idx, vals), **opts)
    want_loss, want_grad = torch_twin(s, dense, **opts)
    assert np.isinf(loss) == infinite
    np.testing.assert_allclose(loss, want_loss, **close(dtype))
    np.testing.assert_allclose(grad, want_grad, **close(dtype))


@pytest.mark.parametrize("dtype", (np.float64, np.float32))
@pytest.mark.parametrize("k", (1, 5, C))
def test_topk_forward_kl_without_targets(k, dtype):
    """The forward KL against a top-k teacher without the cross-entropy share
    (the exponentials stored in the gradient's row), new and in place; rows
    with -inf at a teacher's class in the student or the teacher (the exact
    routine, which must still see the logits) and one holding a NaN."""
    s, t, _, axis = inputs("rows", dtype, seed=2)
    idx, vals, dense = topk_of(t, k, axis)
    s[0, idx[0, 0]] = -np.inf
    s[2, 5] = np.nan
    if k > 1:  # a teacher's value of -inf: P = 0 there, as torch's xlogy
        vals[3, 0] = dense[3, idx[3, 0]] = -np.inf
    loss, grad = distillation_loss_with_grad(s, (idx, vals), temperature=2.0, reduction="none")
    want_loss, want_grad = torch_twin(s, dense, temperature=2.0, reduction="none")
    assert np.isinf(loss[0]) and np.isnan(loss[2]) and np.isnan(grad[2]).all()
    np.testing.assert_allclose(loss, want_loss, **close(dtype))
    np.testing.assert_allclose(grad, want_grad, **close(dtype))
    x = s.copy()
    loss2, grad2 = distillation_loss_with_grad(x, (idx, vals), temperature=2.0,
                                               reduction="none", inplace=True)
    assert grad2 is x
    np.testing.assert_array_equal(loss2, loss)
    np.testing.assert_array_equal(x, grad)


def test_topk_indices_of_any_integer_dtype_and_batchmean_counts_kept_rows():
    s, t, y, axis = inputs("rows", np.float64)
    idx, vals, dense = topk_of(t, 5, axis)
    loss = distillation_loss(s, (idx.astype(np.int32), vals), target=y)
    want, _ = torch_twin(s, dense, target=y)
    np.testing.assert_allclose(loss, want, rtol=1e-12)
    # every row ignored: 0 / 0, as torch's mean of nothing
    assert np.isnan(distillation_loss(s, t, target=np.full(N, IGNORE)))


def test_inplace_out_and_loss_object():
    s, t, y, axis = inputs("slabs", np.float32)
    opts = dict(divergence="jsd", beta=0.7, temperature=4.0, target=y, alpha=0.5, axis=axis)
    want_loss, want_grad = torch_twin(s, t, **opts)
    out = np.empty_like(s)
    loss, grad = distillation_loss_with_grad(s, t, out=out, **opts)
    assert grad is out
    np.testing.assert_allclose(out, want_grad, **close(np.float32))
    x = s.copy()
    loss2, grad2 = distillation_loss_with_grad(x, t, inplace=True, **opts)
    assert grad2 is x
    np.testing.assert_array_equal(x, out)
    assert loss2 == loss
    crit = DistillationLoss(divergence="jsd", beta=0.7, temperature=4.0, alpha=0.5, axis=1)
    np.testing.assert_allclose(crit(s, t, y), want_loss, **close(np.float32))
    np.testing.assert_array_equal(crit.backward(), out)


def test_minus_infinity_as_torch():
    s, t, _, _ = inputs("rows", np.float64)
    s[0, 3] = -np.inf   # the teacher has mass there: inf
    s[1, 2] = t[1, 2] = -np.inf  # both: torch's 0 * -inf, nan
    loss, grad = distillation_loss_with_grad(s, t, reduction="none")
    want_loss, want_grad = torch_twin(s, t, reduction="none")
    assert np.isinf(loss[0]) and np.isnan(loss[1])
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-15)


def test_many_rows_run_in_parallel_with_the_same_bits():
    """Above the serial threshold (65536 elements) the rows run in parallel;
    the result matches torch and is the same for any thread count."""
    import numba
    rng = np.random.default_rng(5)
    s = rng.normal(size=(300, 257)).astype(np.float32)
    t = rng.normal(size=(300, 257)).astype(np.float32)
    y = rng.integers(0, 257, 300)
    opts = dict(divergence="forward_kl", temperature=2.0, target=y, alpha=0.5)
    loss, grad = distillation_loss_with_grad(s, t, **opts)
    want_loss, want_grad = torch_twin(s, t, **opts)
    np.testing.assert_allclose(loss, want_loss, **close(np.float32))
    np.testing.assert_allclose(grad, want_grad, **close(np.float32))
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        loss1, grad1 = distillation_loss_with_grad(s, t, **opts)
    finally:
        numba.set_num_threads(threads)
    assert loss1 == loss
    np.testing.assert_array_equal(grad1, grad)


# --------------------------------------------------------------------------
# Bad input, refused before anything is written


def _refused(exc, match, student, teacher, **opts):
    before = student.copy()
    with pytest.raises(exc, match=match):
        distillation_loss_with_grad(student, teacher, inplace=True, **opts)
    np.testing.assert_array_equal(student, before)


def test_bad_inputs_refused_before_any_write():
    s, t, y, _ = inputs("rows", np.float64)
    idx, vals, _ = topk_of(t, 5, -1)
    bad = idx.copy()
    bad[3, 2] = C
    _refused(ValueError, "out of range", s, (bad, vals))
    bad = idx.copy()
    bad[3, 2] = -1
    _refused(ValueError, "out of range", s, (bad, vals))
    bad = idx.copy()
    bad[5, 1] = bad[5, 4]
    _refused(ValueError, "a class twice.*\\(5,\\)", s, (bad, vals))
    _refused(ValueError, "shape", s, t[:, :-1])
    _refused(ValueError, "does not match", s, (idx[:-1], vals[:-1]))
    _refused(ValueError, "shape", s, (idx[:, :4], vals))
    _refused(TypeError, "integers", s, (idx.astype(float), vals))
    _refused(ValueError, "k=14", s, (np.zeros((N, C + 1), np.int64), np.zeros((N, C + 1))))
    for beta in (0.0, 1.0, -0.5, 2.0):
        _refused(ValueError, "beta must be in \\(0, 1\\)", s, t, divergence="jsd", beta=beta)
    _refused(ValueError, "divergence", s, t, divergence="kl")
    _refused(ValueError, "temperature", s, t, temperature=0.0)
    _refused(ValueError, "alpha", s, t, alpha=1.5, target=y)
    _refused(ValueError, "target is None", s, t, alpha=0.5)
    _refused(ValueError, "batch shape", s, t, target=y[:-1], alpha=0.5)
    bad_y = y.copy()
    bad_y[6] = C
    _refused(IndexError, "out of range", s, t, target=bad_y, alpha=0.5)
    _refused(ValueError, "reduction", s, t, reduction="mean")
    with pytest.raises(TypeError, match="inplace=True needs student_logits"):
        distillation_loss_with_grad(s.astype(np.float32), t, inplace=True)


def test_exported():
    assert {"distillation_loss", "distillation_loss_with_grad",
            "DistillationLoss"} <= set(fastxent.__all__)


# --------------------------------------------------------------------------
# 16-bit student and teacher logits (issue 19's contract, tests/test_half.py)

def _half_cases():
    from tests.parity import covering
    return covering(dict(dtype=("float16", "bfloat16"), divergence=KINDS,
                         temperature=(0.5, 4.0), alpha=(0.0, 0.3),
                         reduction=("batchmean", "sum", "none"), layout=("rows", "slabs"),
                         teacher=("same", "float32", "other")), strength=2)


@pytest.mark.parametrize("case", _half_cases(), ids=lambda c: "-".join(map(str, c.values())))
def test_half_logits_match_torch(case):
    """Loss (float32) within 1e-5 of float64 torch on the same values, each
    16-bit gradient element within one ulp; in place, 16-bit ``out=`` and a
    new gradient are the same bits, float32 ``out=`` the float32 result."""
    import ml_dtypes
    from tests.test_half import check_grad, check_loss
    dtype = np.dtype(np.float16 if case["dtype"] == "float16" else ml_dtypes.bfloat16)
    other = np.dtype(ml_dtypes.bfloat16 if dtype == np.float16 else np.float16)
    s, t, y, axis = inputs(case["layout"], np.float32, seed=2)
    s = s.astype(dtype)
    t = t.astype({"same": dtype, "float32": np.float32, "other": other}[case["teacher"]])
    opts = dict(divergence=case["divergence"], beta=0.3, temperature=case["temperature"],
                target=y if case["alpha"] else None, alpha=case["alpha"],
                reduction=case["reduction"], axis=axis)
    want_loss, want_grad = torch_twin(s.astype(np.float64), t.astype(np.float64), **opts)
    loss, grad = distillation_loss_with_grad(s, t, **opts)
    check_loss(loss, want_loss, case["reduction"])
    check_grad(grad, want_grad, dtype)
    check_loss(distillation_loss(s, t, **opts), want_loss, case["reduction"])
    x = s.copy()
    _, into = distillation_loss_with_grad(x, t, inplace=True, **opts)
    out16 = np.empty_like(s)
    distillation_loss_with_grad(s, t, out=out16, **opts)
    out32 = np.empty(s.shape, np.float32)
    distillation_loss_with_grad(s, t, out=out32, **opts)
    _, g32 = distillation_loss_with_grad(s.astype(np.float32), t.astype(np.float32), **opts)
    assert into is x
    np.testing.assert_array_equal(x.view(np.uint16), grad.view(np.uint16))
    np.testing.assert_array_equal(out16.view(np.uint16), grad.view(np.uint16))
    np.testing.assert_array_equal(out32, g32)


@pytest.mark.parametrize("dtype", ("float16", "bfloat16"))
def test_half_topk_teacher_values(dtype):
    """A top-k teacher's 16-bit values, with a 16-bit student and the module."""
    import ml_dtypes
    from tests.test_half import check_grad, check_loss
    dtype = np.dtype(np.float16 if dtype == "float16" else ml_dtypes.bfloat16)
    s, t, y, axis = inputs("slabs", np.float32, seed=3)
    s, t = s.astype(dtype), t.astype(dtype)
    idx, vals, dense = topk_of(t.astype(np.float64), 5, axis)
    opts = dict(divergence="jsd", temperature=2.0, target=y, alpha=0.25, axis=axis)
    want_loss, want_grad = torch_twin(s.astype(np.float64), dense, **opts)
    loss, grad = distillation_loss_with_grad(s, (idx, vals.astype(dtype)), **opts)
    check_loss(loss, want_loss, "batchmean")
    check_grad(grad, want_grad, dtype)
    crit = DistillationLoss(divergence="jsd", temperature=2.0, alpha=0.25, axis=axis)
    check_loss(crit(s, (idx, vals.astype(dtype)), y), want_loss, "batchmean")
    check_grad(crit.backward(), want_grad, dtype)


def test_half_student_with_float64_teacher_and_refusals():
    """A float64 teacher makes the call float64, as for float32 students (no
    16-bit out= or in place then); mixed 16-bit out= is refused before any
    write."""
    import ml_dtypes
    s, t, y, _ = inputs("rows", np.float32, seed=4)
    s = s.astype(np.float16)
    loss, grad = distillation_loss_with_grad(s, t.astype(np.float64))
    want_loss, want_grad = torch_twin(s.astype(np.float64), t.astype(np.float64))
    assert type(loss) is np.float64 and grad.dtype == np.float64
    np.testing.assert_allclose(loss, want_loss, **close(np.float64))
    np.testing.assert_allclose(grad, want_grad, **close(np.float64))
    x = s.copy()
    with pytest.raises(TypeError, match="inplace=True needs student_logits"):
        distillation_loss_with_grad(x, t.astype(np.float64), inplace=True)
    np.testing.assert_array_equal(x.view(np.uint16), s.view(np.uint16))
    for dtype in (np.float16, ml_dtypes.bfloat16):
        out = np.full(s.shape, 7, dtype)
        with pytest.raises(TypeError, match="out has dtype"):
            distillation_loss_with_grad(s, t.astype(np.float64 if dtype == np.float16
                                                    else np.float32), out=out)
        assert (out.astype(np.float32) == 7).all()
