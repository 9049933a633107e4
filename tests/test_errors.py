"""Bad input raises a clear error, before anything is written.

Each bad call is made three ways where it applies: plain, with ``out=`` and
with ``inplace=True``; the logits, ``out`` and the targets must be untouched
afterwards (a check that fails when a kernel runs before the error).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import fastxent

RNG = np.random.default_rng(0)
X = RNG.standard_normal((4, 3))
Y = np.array([0, 1, 2, 1])
Q = np.full((4, 3), 1 / 3)

# name: (kwargs of cross_entropy_with_grad, exception, regex the message must match)
CE_CASES = {
    "target_too_large": (dict(target=np.array([0, 1, 3, 1])), IndexError,
                         r"target 3 at position \(2,\) is out of range for 3 classes"),
    "target_negative": (dict(target=np.array([0, -1, 2, 1])), IndexError,
                        r"target -1 at position \(1,\) is out of range"),
    "target_negative_other_ignore": (dict(target=np.array([0, 1, -100, 1]), ignore_index=-1),
                                     IndexError, r"target -100 at position \(2,\).*ignore_index=-1"),
    "target_oob_2d_position": (dict(logits=X.reshape(2, 2, 3), target=np.array([[0, 1], [2, 5]])),
                               IndexError, r"target 5 at position \(1, 1\)"),
    "target_oob_axis1_position": (dict(logits=np.zeros((2, 3, 2)),
                                       target=np.array([[0, 1], [7, 2]]), axis=1),
                                  IndexError, r"target 7 at position \(1, 0\)"),
    "target_uint64_huge": (dict(target=np.array([0, 1, 2**64 - 100, 1], dtype=np.uint64)),
                           IndexError, r"target 18446744073709551516 at position \(2,\)"),
    "batch_shape_mismatch": (dict(target=np.array([0, 1, 2])), ValueError,
                             r"target shape \(3,\) does not match the batch shape \(4,\)"),
    "target_2d_for_2d_logits": (dict(target=np.zeros((4, 3), dtype=np.int64)), ValueError,
                                r"target shape \(4, 3\) does not match"),
    "soft_wrong_shape": (dict(target=np.zeros((4, 4))), ValueError,
                         r"class probabilities and must have the logits' shape \(4, 3\), got \(4, 4\)"),
    "soft_with_ignore_index": (dict(target=Q, ignore_index=0), ValueError,
                               r"ignore_index is not supported with class-probability"),
    "soft_complex": (dict(target=Q.astype(np.complex64)), TypeError,
                     r"target must hold integer class indices or float class probabilities"),
    "bool_target": (dict(target=Y.astype(bool)), TypeError, r"target must hold integer class"),
    "weight_wrong_length": (dict(weight=np.ones(4)), ValueError,
                            r"weight must be a 1-D array of 3 values .* got shape \(4,\)"),
    "weight_2d": (dict(weight=np.ones((1, 3))), ValueError, r"got shape \(1, 3\)"),
    "weight_complex": (dict(weight=np.ones(3, complex)), TypeError, r"weight must hold real"),
    "smoothing_above_1": (dict(label_smoothing=1.5), ValueError,
                          r"label_smoothing must be between 0.0 and 1.0, got 1.5"),
    "smoothing_negative": (dict(label_smoothing=-0.1), ValueError, r"got -0.1"),
    "smoothing_nan": (dict(label_smoothing=float("nan")), ValueError, r"got nan"),
    "smoothing_not_a_number": (dict(label_smoothing="a"), TypeError,
                               r"label_smoothing must be a float"),
    "unknown_reduction": (dict(reduction="avg"), ValueError,
                          r"reduction must be 'none', 'mean' or 'sum', got 'avg'"),
    "reduction_none_object": (dict(reduction=None), ValueError, r"got None"),
    "axis_out_of_range": (dict(axis=2), ValueError,
                          r"axis 2 is out of range for logits with 2 dimension"),
    "axis_negative_out_of_range": (dict(axis=-3), ValueError, r"axis -3 is out of range"),
    "axis_float": (dict(axis=1.0), TypeError, r"axis must be an integer"),
    "ignore_index_float": (dict(ignore_index=1.5), TypeError, r"ignore_index must be an integer"),
    "ignore_index_beyond_int64": (dict(ignore_index=2**70), ValueError,
                                  r"ignore_index must be between -9223372036854775808 and "
                                  r"9223372036854775807 \(a 64-bit integer\), got 1180591620717411303424"),
    "unknown_device": (dict(device="tpu"), ValueError, r"device must be 'auto', 'cpu' or 'cuda'"),
}


def _call(kw, out=None, inplace=False):
    kw = dict(kw)
    logits = kw.pop("logits", X).copy()
    target = kw.pop("target", Y)
    target_before = np.array(target, copy=True)
    logits_before = logits.copy()
    out_before = None if out is None else out.copy()
    return logits, target, target_before, logits_before, out_before, kw


@pytest.mark.parametrize("mode", ["plain", "out", "inplace"])
@pytest.mark.parametrize("case", list(CE_CASES))
def test_cross_entropy_bad_input(case, mode):
    kw, exc, pattern = CE_CASES[case]
    kw = dict(kw)
    logits = kw.pop("logits", X).copy()
    target = kw.pop("target", Y)
    target_before, logits_before = np.array(target, copy=True), logits.copy()
    out = np.full_like(logits, 7.0) if mode == "out" else None
    with pytest.raises(exc, match=pattern):
        fastxent.cross_entropy_with_grad(logits, target, out=out, inplace=mode == "inplace", **kw)
    np.testing.assert_array_equal(logits, logits_before)
    np.testing.assert_array_equal(target, target_before)
    if out is not None:
        assert np.all(out == 7.0)
    if mode == "plain":  # the loss-only function checks the same
        with pytest.raises(exc, match=pattern):
            fastxent.cross_entropy(logits, target, **kw)


def test_error_names_first_bad_target_only_after_valid_ones():
    """The position is the first bad one in C order, ignore_index rows skipped."""
    y = np.array([[0, -100, 2], [9, 1, -5]])
    with pytest.raises(IndexError, match=r"target 9 at position \(1, 0\)"):
        fastxent.cross_entropy(np.zeros((2, 3, 3)), y)


@pytest.mark.parametrize("logits,pattern", [
    (np.zeros((4, 0)), r"zero classes \(axis 1 of shape \(4, 0\) is empty\)"),
    (np.float64(1.0), r"at least one dimension"),
])
def test_bad_logits_shape(logits, pattern):
    with pytest.raises(ValueError, match=pattern):
        fastxent.cross_entropy(logits, np.zeros(np.shape(logits)[:-1], dtype=np.int64))


@pytest.mark.parametrize("logits", [X.astype(complex), X.astype(object),
                                    np.array([["a", "b", "c"]] * 4), X.astype(np.longdouble)],
                         ids=["complex", "object", "string", "longdouble"])
@pytest.mark.parametrize("fn", ["ce", "bce", "softmax", "logsumexp", "nll"])
def test_unsupported_logit_dtypes(logits, fn):
    pattern = r"logits .*(float32 or float64|not supported)"
    with pytest.raises(TypeError, match=str(logits.dtype) if fn != "softmax" else "dtype"):
        if fn == "ce":
            fastxent.cross_entropy(logits, Y)
        elif fn == "bce":
            fastxent.binary_cross_entropy_with_logits(logits, np.zeros((4, 3)))
        elif fn == "softmax":
            fastxent.softmax(logits)
        elif fn == "logsumexp":
            fastxent.logsumexp(logits)
        else:
            fastxent.nll_loss(logits, Y)
    if fn == "ce":
        with pytest.raises(TypeError, match=pattern):
            fastxent.cross_entropy(logits, Y)


def test_inplace_needs_a_writable_float_array():
    ro = X.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="inplace=True but logits is read-only"):
        fastxent.cross_entropy_with_grad(ro, Y, inplace=True)
    with pytest.raises(ValueError, match="read-only"):
        fastxent.binary_cross_entropy_with_logits_with_grad(ro, np.zeros((4, 3)), inplace=True)
    ints = np.arange(12).reshape(4, 3)
    with pytest.raises(TypeError, match="float32 or float64 array, got ndarray of dtype int64"):
        fastxent.cross_entropy_with_grad(ints, Y, inplace=True)
    np.testing.assert_array_equal(ints, np.arange(12).reshape(4, 3))
    with pytest.raises(TypeError, match="got list"):
        fastxent.cross_entropy_with_grad(X.tolist(), Y, inplace=True)
    with pytest.raises(ValueError, match="either out= or inplace=True"):
        fastxent.cross_entropy_with_grad(X.copy(), Y, out=np.empty((4, 3)), inplace=True)
    with pytest.raises(RuntimeError, match="loss computed first"):
        fastxent.CrossEntropyLoss(inplace=True).backward()


@pytest.mark.parametrize("out,exc,pattern", [
    (np.full((3, 4), 7.0), ValueError, r"out has shape \(3, 4\), expected \(4, 3\)"),
    (np.full((4, 3), 7.0, dtype=np.float32), TypeError, r"out has dtype float32, expected float64"),
    ("readonly", ValueError, r"out is read-only"),
    ([[7.0] * 3] * 4, TypeError, r"out must be an array, got list"),
])
@pytest.mark.parametrize("fn", ["ce", "bce", "softmax"])
def test_bad_out(out, exc, pattern, fn):
    if isinstance(out, str):
        out = np.full((4, 3), 7.0)
        out.flags.writeable = False
    x = X.copy()
    with pytest.raises(exc, match=pattern):
        if fn == "ce":
            fastxent.cross_entropy_with_grad(x, Y, out=out)
        elif fn == "bce":
            fastxent.binary_cross_entropy_with_logits_with_grad(x, np.zeros((4, 3)), out=out)
        else:
            fastxent.softmax(x, out=out)
    assert np.all(np.asarray(out) == 7.0)
    np.testing.assert_array_equal(x, X)


@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(target=np.zeros((4, 4))), ValueError, r"target shape \(4, 4\) must equal the logits' shape"),
    (dict(weight=np.ones(4)), ValueError, r"weight of shape \(4,\) does not broadcast"),
    (dict(pos_weight=np.ones((2, 4, 3))), ValueError, r"pos_weight of shape \(2, 4, 3\) would enlarge"),
    (dict(weight=np.ones(3, complex)), TypeError, r"weight must be real numbers"),
    (dict(target=np.zeros((4, 3), complex)), TypeError, r"target must be real numbers"),
    (dict(reduction="x"), ValueError, r"reduction must be"),
])
@pytest.mark.parametrize("mode", ["plain", "out", "inplace"])
def test_bce_bad_input(kw, exc, pattern, mode):
    kw = dict(kw)
    target = kw.pop("target", np.zeros((4, 3)))
    x = X.copy()
    out = np.full_like(x, 7.0) if mode == "out" else None
    with pytest.raises(exc, match=pattern):
        fastxent.binary_cross_entropy_with_logits_with_grad(x, target, out=out,
                                                            inplace=mode == "inplace", **kw)
    np.testing.assert_array_equal(x, X)
    if out is not None:
        assert np.all(out == 7.0)


def test_nll_loss_errors():
    with pytest.raises(TypeError, match="nll_loss needs integer class indices"):
        fastxent.nll_loss(X, Y.astype(float))
    with pytest.raises(IndexError, match=r"target 7 at position \(2,\)"):
        fastxent.nll_loss(X, np.array([0, 1, 7, 1]))
    with pytest.raises(ValueError, match="weight must be a 1-D array of 3"):
        fastxent.nll_loss(X, Y, weight=np.ones(2))


def test_unary_errors():
    for fn in (fastxent.softmax, fastxent.log_softmax, fastxent.logsumexp):
        with pytest.raises(ValueError, match=r"axis 5 is out of range for x"):
            fn(X, axis=5)
        # a 0-d array is one class, as torch takes it (no longer an error;
        # tests/test_jacobian.py checks the values): axis 0 or -1 only
        with pytest.raises(ValueError, match="axis 1 is out of range for x with 1 dimension"):
            fn(np.float64(3.0), 1)
    for fn in (fastxent.softmax, fastxent.log_softmax):
        # zero classes: an empty result, as torch.softmax gives
        assert fn(np.zeros((2, 0))).shape == (2, 0)
    # logsumexp over an empty axis is -inf, as torch.logsumexp
    np.testing.assert_array_equal(fastxent.logsumexp(np.zeros((2, 0))), [-np.inf, -np.inf])


def test_loss_objects_check_options_at_construction():
    with pytest.raises(ValueError, match="reduction must be"):
        fastxent.CrossEntropyLoss(reduction="x")
    with pytest.raises(ValueError, match="label_smoothing must be between"):
        fastxent.CrossEntropyLoss(label_smoothing=2)
    with pytest.raises(ValueError, match="reduction must be"):
        fastxent.BCEWithLogitsLoss(reduction="avg")


# --------------------------------------------------------------------------
# what is accepted: as NumPy would convert it


def test_lists_are_converted_like_numpy():
    assert fastxent.cross_entropy(X.tolist(), Y.tolist()) == fastxent.cross_entropy(X, Y)
    loss, grad = fastxent.cross_entropy_with_grad(X.tolist(), Y.tolist())
    assert isinstance(grad, np.ndarray) and grad.dtype == np.float64
    np.testing.assert_array_equal(grad, fastxent.cross_entropy_with_grad(X, Y)[1])
    with pytest.raises(ValueError, match=re.escape("inhomogeneous")):
        fastxent.cross_entropy([[1.0, 2.0], [3.0]], [0, 1])


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, bool])
def test_integer_logits_become_float64(dtype):
    xi = (np.arange(12).reshape(4, 3) % 3).astype(dtype)
    loss, grad = fastxent.cross_entropy_with_grad(xi, Y)
    assert type(loss) is np.float64 and grad.dtype == np.float64
    expect = fastxent.cross_entropy_with_grad(xi.astype(np.float64), Y)
    assert loss == expect[0]
    np.testing.assert_array_equal(grad, expect[1])
    assert fastxent.softmax(xi).dtype == np.float64


def test_one_dimensional_logits_take_a_scalar_target():
    x = np.array([1.0, 2.0, 3.0])
    loss = fastxent.cross_entropy(x, np.int64(2))
    np.testing.assert_allclose(loss, np.log(np.exp(x).sum()) - 3.0, rtol=1e-14)
    with pytest.raises(IndexError, match=r"target 3 at position \(\)"):
        fastxent.cross_entropy(x, 3)


def test_a_prepared_call_still_checks_the_data(monkeypatch):
    """A call repeating an earlier one's shapes, strides, dtypes, flags and
    options runs the plan kept by ``losses`` without the checks; what depends
    on the data (the class indices) is still checked before any write, and
    what the key leaves out is checked again."""
    from fastxent import _validate

    x = RNG.standard_normal((5, 3))
    y = np.array([0, 1, 2, 1, 0])
    fastxent.cross_entropy_with_grad(x.copy(), y, inplace=True)  # prepares the plan
    checked = []
    real = _validate.cross_entropy_call
    monkeypatch.setattr(_validate, "cross_entropy_call",
                        lambda *args: checked.append(args) or real(*args))
    for bad, pattern in ((np.array([0, 1, 3, 1, 0]), r"target 3 at position \(2,\)"),
                         (np.array([0, -1, 2, 1, 9]), r"target -1 at position \(1,\)")):
        xi = x.copy()
        with pytest.raises(IndexError, match=pattern):
            fastxent.cross_entropy_with_grad(xi, bad, inplace=True)
        np.testing.assert_array_equal(xi, x)
    assert not checked, "the prepared plan did not serve the repeated calls"
    huge = np.array([0, 1, 2**64 - 1, 1, 0], dtype=np.uint64)
    fastxent.cross_entropy_with_grad(x.copy(), y.astype(np.uint64), inplace=True)
    xi = x.copy()
    with pytest.raises(IndexError, match=r"target 18446744073709551615 at position \(2,\)"):
        fastxent.cross_entropy_with_grad(xi, huge, inplace=True)
    np.testing.assert_array_equal(xi, x)
    read_only = x.copy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fastxent.cross_entropy_with_grad(read_only, y, inplace=True)
    fastxent.cross_entropy(x, y, weight=np.ones(3))
    with pytest.raises(ValueError, match=r"weight must be a 1-D array of 3 values"):
        fastxent.cross_entropy(x, y, weight=np.ones(4))
