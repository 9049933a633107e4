"""Property tests (hypothesis) against the float64 reference.

Shapes, dtypes, options and extreme values are drawn; the properties are
the ones cross-entropy has whatever the options: the loss is >= 0, it does
not change when a constant is added to a row, each gradient row sums to 0
(the gradient of a row is (sum_c a_c) p - a for the loss -sum_c a_c log p_c,
so this holds with weights, smoothing and soft targets alike), the gradient
is the loss's derivative (finite differences, float64), and all of it
agrees with the reference.
"""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastxent
from tests import reference as ref

finite = st.floats(-50, 50, allow_nan=False, allow_infinity=False, width=32)
extreme = st.one_of(finite, st.sampled_from([-1e4, 1e4, -1e30, 1e30, 0.0, -0.0]))


@st.composite
def problems(draw, values=finite, dtypes=(np.float64, np.float32)):
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(["rows", "ncd"]))
    C = draw(st.integers(1, 9))
    if layout == "rows":
        shape, axis = (draw(st.integers(1, 6)), C), -1
    else:
        shape, axis = (draw(st.integers(1, 3)), C, draw(st.integers(1, 3))), 1
    x = draw(hnp.arrays(np.float64, shape, elements=values)).astype(dtype)
    batch = shape[:axis % len(shape)] + shape[axis % len(shape) + 1:]
    soft = draw(st.booleans())
    if soft:
        q = draw(hnp.arrays(np.float64, shape, elements=st.floats(0, 1)))
        q = q + 1e-3
        target = (q / q.sum(axis=axis, keepdims=True)).astype(dtype)
    else:
        target = draw(hnp.arrays(np.int64, batch, elements=st.integers(0, C - 1)))
    kw = dict(axis=axis, reduction=draw(st.sampled_from(["mean", "sum", "none"])),
              label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])))
    if draw(st.booleans()):
        kw["weight"] = draw(hnp.arrays(np.float64, (C,), elements=st.floats(0.1, 3))).astype(dtype)
    if not soft and draw(st.booleans()):
        kw["ignore_index"] = draw(st.integers(0, C - 1))
    return x, target, kw


def _tol(dtype):
    return (1e-9, 1e-11) if dtype == np.float64 else (2e-5, 1e-5)


@given(problems())
def test_matches_reference(p):
    x, target, kw = p
    loss, grad = fastxent.cross_entropy_with_grad(x, target, **kw)
    r_loss, r_grad = ref.cross_entropy_with_grad(x.astype(np.float64), target, **kw)
    rtol, atol = _tol(x.dtype)
    np.testing.assert_allclose(loss, r_loss, rtol=rtol, atol=atol * max(1, np.abs(x).max()))
    np.testing.assert_allclose(grad, r_grad, rtol=rtol, atol=atol)


@given(problems(values=extreme, dtypes=(np.float64,)))
def test_extreme_values_match_reference(p):
    x, target, kw = p
    loss, grad = fastxent.cross_entropy_with_grad(x, target, **kw)
    r_loss, r_grad = ref.cross_entropy_with_grad(x, target, **kw)
    np.testing.assert_allclose(loss, r_loss, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(grad, r_grad, rtol=1e-9, atol=1e-12)
    assert np.all(np.isfinite(grad))


@given(problems())
def test_loss_is_nonnegative_and_gradient_rows_sum_to_zero(p):
    x, target, kw = p
    kw["reduction"] = "none"
    loss, grad = fastxent.cross_entropy_with_grad(x, target, **kw)
    # -sum a_c log p_c with a_c >= 0 and log p_c <= 0; rounding may give -tiny
    assert np.all(loss >= -1e-6 * max(1.0, float(np.abs(x).max())))
    sums = np.moveaxis(grad, kw["axis"], -1).sum(axis=-1, dtype=np.float64)
    scale = 1.0 if "weight" not in kw else float(np.max(kw["weight"]))
    assert np.all(np.abs(sums) <= (1e-12 if x.dtype == np.float64 else 2e-6) * scale * 10)


@given(problems(dtypes=(np.float64,)), st.floats(-1e3, 1e3))
def test_shift_invariance(p, shift):
    x, target, kw = p
    loss, grad = fastxent.cross_entropy_with_grad(x, target, **kw)
    loss_s, grad_s = fastxent.cross_entropy_with_grad(x + shift, target, **kw)
    scale = 1 + abs(shift) + np.abs(x).max()
    np.testing.assert_allclose(loss_s, loss, rtol=1e-9, atol=1e-12 * scale * x.shape[kw["axis"]])
    np.testing.assert_allclose(grad_s, grad, rtol=1e-7, atol=1e-12 * scale)
    lse, lse_s = fastxent.logsumexp(x, axis=kw["axis"]), fastxent.logsumexp(x + shift, axis=kw["axis"])
    np.testing.assert_allclose(lse_s - shift, lse, rtol=0, atol=1e-12 * scale)


@settings(max_examples=15)  # up to 2 * 54 loss calls per example
@given(problems(dtypes=(np.float64,)))
def test_gradient_matches_finite_differences(p):
    x, target, kw = p
    reduction = kw.pop("reduction")

    def total(z):
        value = fastxent.cross_entropy(z, target, reduction=reduction, **kw)
        return float(np.sum(value))

    _, grad = fastxent.cross_entropy_with_grad(x, target, reduction=reduction, **kw)
    assume(np.isfinite(total(x)))
    h = 1e-5
    fd = np.empty_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        fd[i] = (total(xp) - total(xm)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-6)


@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 7)),
                  elements=st.floats(-30, 30)),
       st.data())
def test_bce_gradient_and_loss_against_reference(x, data):
    t = data.draw(hnp.arrays(np.float64, x.shape, elements=st.floats(0, 1)))
    pw = data.draw(st.one_of(st.none(), hnp.arrays(np.float64, x.shape[-1:],
                                                   elements=st.floats(0.1, 5))))
    loss, grad = fastxent.binary_cross_entropy_with_logits_with_grad(x, t, pos_weight=pw,
                                                                     reduction="sum")
    r_loss, r_grad = ref.bce_with_logits_with_grad(x, t, pos_weight=pw, reduction="sum")
    assert loss >= -1e-9
    np.testing.assert_allclose(loss, r_loss, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(grad, r_grad, rtol=1e-9, atol=1e-12)
