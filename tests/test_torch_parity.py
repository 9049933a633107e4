"""fastxent against PyTorch (CPU), option by option and in combination.

``COMPARISONS`` maps each public function to its torch twin; the tests below
iterate over it. Shapes are small: every new dtype / layout / None-ness
combination is a Numba compile, so parametrizations vary option *values*
(reduction, ignore_index, smoothing), which cost nothing, across a few
compiled variants.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastxent
from tests import reference as ref

TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-6)}
# float32 loss against the float64 reference; float32 gradient against torch's
LOSS32_RTOL = 2e-6
GRAD32_ATOL = 1e-6


def _t(a):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


def _torch_ce(x, y, axis=-1, **kw):
    """torch's cross-entropy (loss, grad) with the class axis moved to 1."""
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, axis, 1))).requires_grad_(True)
    yt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(y, axis, 1) if y.dtype.kind == "f"
                                               else y))
    kw = dict(kw)
    kw["weight"] = _t(kw.get("weight"))
    loss = F.cross_entropy(xt, yt, **kw)
    (loss.sum() if kw.get("reduction") == "none" else loss).backward()
    return loss.detach().numpy(), np.moveaxis(xt.grad.numpy(), 1, axis)


def _torch_bce(x, t, **kw):
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    kw = {k: (_t(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    loss = F.binary_cross_entropy_with_logits(xt, _t(t), **kw)
    (loss.sum() if kw.get("reduction") == "none" else loss).backward()
    return loss.detach().numpy(), xt.grad.numpy()


def _torch_unary(fn):
    def twin(x, axis=-1):
        return fn(torch.from_numpy(np.ascontiguousarray(x)), dim=axis).numpy()
    return twin


def _torch_nll(lp, y, axis=-1, **kw):
    lpt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(lp, axis, 1)))
    kw = dict(kw)
    kw["weight"] = _t(kw.get("weight"))
    return F.nll_loss(lpt, torch.from_numpy(y), **kw).numpy()


#: fastxent function -> (torch twin, float64 reference, kind)
COMPARISONS = {
    fastxent.cross_entropy: (lambda *a, **k: _torch_ce(*a, **k)[0], ref.cross_entropy, "ce"),
    fastxent.cross_entropy_with_grad: (_torch_ce, ref.cross_entropy_with_grad, "ce_grad"),
    fastxent.nll_loss: (_torch_nll, ref.nll_loss, "nll"),
    fastxent.log_softmax: (_torch_unary(torch.log_softmax), ref.log_softmax, "unary"),
    fastxent.softmax: (_torch_unary(torch.softmax), ref.softmax, "unary"),
    fastxent.logsumexp: (_torch_unary(torch.logsumexp), ref.logsumexp, "unary"),
    fastxent.binary_cross_entropy_with_logits: (lambda *a, **k: _torch_bce(*a, **k)[0],
                                                lambda *a, **k: ref.bce_with_logits_with_grad(
                                                    *a, **k)[0], "bce"),
    fastxent.binary_cross_entropy_with_logits_with_grad: (_torch_bce,
                                                          ref.bce_with_logits_with_grad,
                                                          "bce_grad"),
}
IDS = {f: f.__name__ for f in COMPARISONS}
DTYPES = [np.float64, np.float32]
REDUCTIONS = ["mean", "sum", "none"]

# (shape, axis): plain rows, (N, T, C) with the class axis last, torch's (N, C, d1, d2)
LAYOUTS = {"2d": ((6, 5), -1), "ntc": ((2, 3, 5), -1), "ncdd": ((2, 5, 3, 2), 1)}


def _problem(layout, dtype, soft, seed=0):
    shape, axis = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    C = shape[axis]
    batch = shape[:axis % len(shape)] + shape[axis % len(shape) + 1:]
    if soft:
        q = rng.random(shape)
        y = (q / q.sum(axis=axis, keepdims=True)).astype(dtype)
    else:
        y = rng.integers(0, C, batch)
        flat = y.reshape(-1)
        flat[::3] = 2  # class 2 is common: ignore_index=2 removes several rows, not all
    w = (rng.random(C) + 0.5).astype(dtype)
    return x, y, w, axis


def _check(ours, theirs, dtype, what, loss_ref=None):
    """float64 against torch at 1e-10; float32 loss against the float64
    reference at 2e-6, gradient against torch's at 1e-6 absolute."""
    ours = np.asarray(ours)
    if dtype == np.float64:
        np.testing.assert_allclose(ours, theirs, **TOL[np.float64], err_msg=what)
    elif what == "grad":
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=GRAD32_ATOL, err_msg=what)
    else:
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6, err_msg=what)
        if loss_ref is not None:
            np.testing.assert_allclose(ours.astype(np.float64), loss_ref, rtol=LOSS32_RTOL,
                                       atol=1e-7, err_msg=what + " vs float64 reference")


def _scalar_type(loss, dtype, reduction):
    if reduction == "none":
        assert isinstance(loss, np.ndarray) and loss.dtype == dtype
    else:
        assert type(loss) is np.dtype(dtype).type, type(loss)


# --------------------------------------------------------------------------
# cross-entropy: every option and combination


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("weighted", [False, True], ids=["now", "w"])
@pytest.mark.parametrize("target", ["hard", "hard_ii_valid", "soft"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_combinations(dtype, layout, weighted, target, smoothing, reduction):
    x, y, w, axis = _problem(layout, dtype, soft=target == "soft")
    kw = dict(weight=w if weighted else None, reduction=reduction, label_smoothing=smoothing)
    if target == "hard_ii_valid":
        kw["ignore_index"] = 2  # a valid class id: its rows are ignored
    for fn in (fastxent.cross_entropy, fastxent.cross_entropy_with_grad):
        twin, reference, kind = COMPARISONS[fn]
        ours = fn(x, y, axis=axis, **kw)
        loss_ref, grad_ref = ref.cross_entropy_with_grad(x, y, axis=axis, **kw)
        if kind == "ce":
            _scalar_type(ours, dtype, reduction)
            _check(ours, twin(x, y, axis=axis, **kw), dtype, "loss", loss_ref)
            continue
        loss, grad = ours
        t_loss, t_grad = twin(x, y, axis=axis, **kw)
        _scalar_type(loss, dtype, reduction)
        assert grad.shape == x.shape and grad.dtype == dtype
        _check(loss, t_loss, dtype, "loss", loss_ref)
        _check(grad, t_grad, dtype, "grad")
        # the reference agrees with torch too (it is what the float32 loss is held to)
        np.testing.assert_allclose(loss_ref, t_loss, rtol=2e-6 if dtype == np.float32 else 1e-10,
                                   atol=1e-6 if dtype == np.float32 else 1e-12)


def test_ignore_index_valid_class_changes_result():
    """ignore_index=2 must actually drop the class-2 rows (else the test above is vacuous)."""
    x, y, w, axis = _problem("2d", np.float64, soft=False)
    assert (y == 2).any() and (y != 2).any()
    a = fastxent.cross_entropy(x, y, ignore_index=2)
    b = fastxent.cross_entropy(x, y)
    assert abs(a - b) > 1e-3
    _, g = fastxent.cross_entropy_with_grad(x, y, ignore_index=2, reduction="sum")
    assert np.all(g[y == 2] == 0) and np.all(g[y != 2] != 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("weighted", [False, True], ids=["now", "w"])
def test_out_and_inplace_give_the_same_gradient(dtype, layout, weighted):
    x, y, w, axis = _problem(layout, dtype, soft=False, seed=1)
    kw = dict(weight=w if weighted else None, label_smoothing=0.1, axis=axis, ignore_index=2)
    loss, grad = fastxent.cross_entropy_with_grad(x, y, **kw)
    out = np.full_like(x, np.nan)
    loss_o, grad_o = fastxent.cross_entropy_with_grad(x, y, out=out, **kw)
    assert grad_o is out
    xi = x.copy()
    loss_i, grad_i = fastxent.cross_entropy_with_grad(xi, y, inplace=True, **kw)
    assert grad_i is xi
    np.testing.assert_array_equal(grad_o, grad)
    np.testing.assert_array_equal(grad_i, grad)
    assert loss == loss_o == loss_i
    _check(grad, _torch_ce(x, y, **kw)[1], dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_inplace_soft_targets(dtype):
    x, q, w, axis = _problem("ncdd", dtype, soft=True, seed=2)
    loss, grad = fastxent.cross_entropy_with_grad(x, q, axis=axis, label_smoothing=0.3)
    xi = x.copy()
    loss_i, grad_i = fastxent.cross_entropy_with_grad(xi, q, axis=axis, label_smoothing=0.3,
                                                      inplace=True)
    assert grad_i is xi and loss_i == loss
    np.testing.assert_array_equal(grad_i, grad)


# --------------------------------------------------------------------------
# non-contiguous inputs


def _noncontiguous_cases(rng):
    base = rng.standard_normal((8, 12))
    y6 = rng.integers(0, 6, 8)
    # name: (logits view, target, axis, equivalent contiguous (rows, C) logits)
    yield "column_slice", base[:, ::2], y6, -1, np.ascontiguousarray(base[:, ::2])
    yield "row_slice", base[::2, :6], y6[:4], -1, np.ascontiguousarray(base[::2, :6])
    yield "transpose_axis0", base.T, rng.integers(0, 12, 8), 0, np.ascontiguousarray(base)
    f = np.asfortranarray(base)
    yield "fortran", f, rng.integers(0, 12, 8), -1, np.ascontiguousarray(base)
    b3 = rng.standard_normal((3, 4, 5))
    yield "3d_transposed", b3.transpose(1, 0, 2), rng.integers(0, 5, (4, 3)), -1, \
        np.ascontiguousarray(b3.transpose(1, 0, 2)).reshape(12, 5)
    b4 = rng.standard_normal((2, 6, 3, 4))
    yield "ncdd_sliced", b4[:, :, :, ::2], rng.integers(0, 6, (2, 3, 2)), 1, None


@pytest.mark.parametrize("case", list(range(6)))
def test_noncontiguous_inputs(case):
    name, x, y, axis, _ = list(_noncontiguous_cases(np.random.default_rng(3)))[case]
    assert not x.flags.c_contiguous, name
    for reduction in REDUCTIONS:
        loss, grad = fastxent.cross_entropy_with_grad(x, y, axis=axis, reduction=reduction,
                                                      label_smoothing=0.1)
        t_loss, t_grad = _torch_ce(np.ascontiguousarray(x), y, axis=axis, reduction=reduction,
                                   label_smoothing=0.1)
        np.testing.assert_allclose(loss, t_loss, rtol=1e-10, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(grad, t_grad, rtol=1e-10, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(fastxent.logsumexp(x, axis=axis),
                               ref.logsumexp(x, axis=axis), rtol=1e-12, err_msg=name)
    np.testing.assert_allclose(fastxent.log_softmax(x, axis=axis),
                               ref.log_softmax(x, axis=axis), rtol=1e-12, atol=1e-13,
                               err_msg=name)
    # the gradient written in place over the same kind of view (of a fresh base)
    xi = list(_noncontiguous_cases(np.random.default_rng(3)))[case][1]
    np.testing.assert_array_equal(xi, x)
    _, g_inplace = fastxent.cross_entropy_with_grad(xi, y, axis=axis, inplace=True)
    _, g = fastxent.cross_entropy_with_grad(x, y, axis=axis)
    assert g_inplace is xi
    # Not bit-identical: a strided destination takes the kernels' scalar
    # loops, a new contiguous one the vectorized (reassociated) sums.
    np.testing.assert_allclose(g_inplace, g, rtol=1e-14, atol=1e-17)


def test_inplace_into_strided_view_leaves_the_rest_alone():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((6, 10))
    before = base.copy()
    view = base[:, 1::2]
    y = rng.integers(0, 5, 6)
    expect = _torch_ce(np.ascontiguousarray(view), y)[1]
    _, g = fastxent.cross_entropy_with_grad(view, y, inplace=True)
    assert g is view
    np.testing.assert_allclose(base[:, 1::2], expect, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(base[:, ::2], before[:, ::2])


def test_targets_of_any_integer_dtype_and_noncontiguous():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 4))
    y = rng.integers(0, 4, 12)[::2]
    expect = fastxent.cross_entropy(x, y.astype(np.int64))
    for dt in (np.int8, np.uint8, np.int16, np.int32, np.uint32, np.int64):
        assert fastxent.cross_entropy(x, y.astype(dt)) == expect


# --------------------------------------------------------------------------
# the other functions of the table


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("weighted", [False, True], ids=["now", "w"])
def test_nll_loss(dtype, layout, weighted):
    x, y, w, axis = _problem(layout, dtype, soft=False, seed=6)
    lp = ref.log_softmax(x, axis=axis).astype(dtype)
    twin, reference, _ = COMPARISONS[fastxent.nll_loss]
    for ignore_index in (-100, 2):
        for reduction in REDUCTIONS:
            kw = dict(weight=w if weighted else None, ignore_index=ignore_index,
                      reduction=reduction)
            ours = fastxent.nll_loss(lp, y, axis=axis, **kw)
            _scalar_type(ours, dtype, reduction)
            _check(ours, twin(lp, y, axis=axis, **kw), dtype, "nll",
                   reference(lp, y, axis=axis, **kw))


@pytest.mark.parametrize("fn", [fastxent.log_softmax, fastxent.softmax, fastxent.logsumexp],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_unary(fn, dtype, layout):
    x, _, _, axis = _problem(layout, dtype, soft=False, seed=7)
    twin, reference, _ = COMPARISONS[fn]
    ours = fn(x, axis=axis)
    assert ours.dtype == dtype
    expect = twin(np.moveaxis(x, axis, -1), axis=-1)
    if fn is not fastxent.logsumexp:
        expect = np.moveaxis(expect, -1, axis)
    if dtype == np.float64:
        np.testing.assert_allclose(ours, expect, rtol=1e-10, atol=1e-12)
    else:
        np.testing.assert_allclose(ours, expect, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours, reference(x, axis=axis), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("fn", [fastxent.log_softmax, fastxent.softmax], ids=lambda f: f.__name__)
def test_unary_out_and_in_place(fn):
    x, _, _, axis = _problem("ncdd", np.float64, soft=False, seed=8)
    expect = fn(x, axis=axis)
    out = np.empty_like(x)
    assert fn(x, axis=axis, out=out) is out
    np.testing.assert_array_equal(out, expect)
    xi = x.copy()
    assert fn(xi, axis=axis, out=xi) is xi
    np.testing.assert_array_equal(xi, expect)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("weights", ["none", "weight", "pos_weight", "both"])
def test_bce_with_logits(dtype, shape, weights):
    rng = np.random.default_rng(9)
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    x.flat[0], x.flat[1] = 30.0, -30.0  # saturated sigmoid on both sides
    t = rng.random(shape).astype(dtype)
    t.flat[2:4] = (0.0, 1.0)
    kw = {}
    if weights in ("weight", "both"):
        kw["weight"] = (rng.random(shape[-1]) + 0.5).astype(dtype)
    if weights in ("pos_weight", "both"):
        kw["pos_weight"] = (rng.random(shape[-1]) * 3).astype(dtype)
    twin, reference, _ = COMPARISONS[fastxent.binary_cross_entropy_with_logits_with_grad]
    w_ = kw.get("weight", 1.0)
    pw_ = kw.get("pos_weight", 1.0)
    # float32 elementwise losses cancel ((1-t) x against l softplus(-x)), in
    # torch as here: the float32 check against the float64 reference is
    # relative to the size of the terms, not of their difference.
    terms = (np.abs(x) + (1 + (pw_ - 1) * t) * (np.abs(x) + 1.0)) * w_
    for reduction in REDUCTIONS:
        loss_only = fastxent.binary_cross_entropy_with_logits(x, t, reduction=reduction, **kw)
        loss, grad = fastxent.binary_cross_entropy_with_logits_with_grad(
            x, t, reduction=reduction, **kw)
        _scalar_type(loss, dtype, reduction)
        # loss-only and fused paths are compiled separately: equal to rounding
        np.testing.assert_allclose(loss_only, loss, rtol=4 * np.finfo(dtype).eps, atol=0)
        t_loss, t_grad = twin(x, t, reduction=reduction, **kw)
        r_loss, r_grad = reference(x, t, reduction=reduction, **kw)
        np.testing.assert_allclose(r_loss, t_loss, rtol=1e-5, atol=1e-6)
        _check(loss, t_loss, dtype, "loss")
        if dtype == np.float32:
            scale = {"none": terms, "sum": terms.sum(), "mean": terms.mean()}[reduction]
            assert np.all(np.abs(loss - r_loss) <= 2e-6 * np.abs(r_loss) + 2e-7 * scale)
        _check(grad, t_grad, dtype, "grad")
        out = np.empty_like(x)
        _, g_out = fastxent.binary_cross_entropy_with_logits_with_grad(
            x, t, reduction=reduction, out=out, **kw)
        xi = x.copy()
        _, g_in = fastxent.binary_cross_entropy_with_logits_with_grad(
            xi, t, reduction=reduction, inplace=True, **kw)
        assert g_out is out and g_in is xi
        np.testing.assert_array_equal(g_out, grad)
        # The in-place block loop is compiled separately and the gradient
        # (l sigmoid - l + 1 - t) cancels, so its bits may differ: it is held
        # to torch's gradient with the same tolerance.
        _check(g_in, t_grad, dtype, "grad")


# --------------------------------------------------------------------------
# loss objects


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_loss_object(reduction):
    x, y, w, axis = _problem("ncdd", np.float64, soft=False, seed=10)
    crit = fastxent.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1, axis=axis,
                                     reduction=reduction)
    with pytest.raises(RuntimeError, match="loss computed first"):
        crit.backward()
    loss = crit(x, y)
    t_crit = torch.nn.CrossEntropyLoss(weight=_t(w), ignore_index=2, label_smoothing=0.1,
                                       reduction=reduction)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    t_loss = t_crit(xt, torch.from_numpy(y))
    t_loss.sum().backward()
    np.testing.assert_allclose(loss, t_loss.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(crit.backward(), xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    assert crit.forward(x, y) == loss if reduction != "none" else True
    xi = x.copy()
    crit_i = fastxent.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1,
                                       axis=axis, reduction=reduction, inplace=True)
    crit_i(xi, y)
    assert crit_i.backward() is xi
    np.testing.assert_array_equal(xi, crit.backward())


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_loss_object(reduction):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((5, 3))
    t = rng.random((5, 3))
    pw = np.array([0.5, 1.0, 2.0])
    crit = fastxent.BCEWithLogitsLoss(pos_weight=pw, reduction=reduction)
    with pytest.raises(RuntimeError):
        crit.backward()
    loss = crit(x, t)
    t_crit = torch.nn.BCEWithLogitsLoss(pos_weight=_t(pw), reduction=reduction)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    t_loss = t_crit(xt, torch.from_numpy(t))
    t_loss.sum().backward()
    np.testing.assert_allclose(loss, t_loss.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(crit.backward(), xt.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_every_public_function_has_a_twin():
    names = {f.__name__ for f in COMPARISONS}
    public = {n for n in fastxent.__all__ if n[0].islower()}
    assert names == public


# --------------------------------------------------------------------------
# properties of the float64 reference itself


def test_reference_shift_invariance():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((5, 4))
    y = rng.integers(0, 4, 5)
    w = rng.random(4) + 0.1
    for kw in (dict(), dict(weight=w, label_smoothing=0.3), dict(reduction="none")):
        a, ga = ref.cross_entropy_with_grad(x, y, **kw)
        b, gb = ref.cross_entropy_with_grad(x + 123.25, y, **kw)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ga, gb, rtol=1e-10, atol=1e-13)


def test_reference_gradient_is_softmax_minus_one_hot():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((5, 4))
    y = rng.integers(0, 4, 5)
    _, g = ref.cross_entropy_with_grad(x, y, reduction="sum")
    e = np.exp(x)
    np.testing.assert_allclose(g, e / e.sum(1, keepdims=True) - np.eye(4)[y], rtol=1e-12,
                               atol=1e-15)
    # and the plain formula for the loss
    loss = ref.cross_entropy(x, y, reduction="none")
    np.testing.assert_allclose(loss, np.log(e.sum(1)) - x[np.arange(5), y], rtol=1e-12)
