"""The softmax Jacobian family on the CPU against float64 PyTorch
(``tests/jacobian_parity.py``), the softmax family's forms that torch and
SciPy accept (logsumexp over tuples of axes, 0-d and zero-class softmax),
and bad input refused before anything is written."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import fastxent
from tests import parity
from tests.jacobian_parity import COMPARISONS as JACOBIAN_TABLE
from tests.jacobian_parity import (DTYPES, HVP_TARGETS, check_backward, check_hvp,
                                   check_jacobian, hvp_problem, torch_backward, torch_hvp)
from tests.parity import CPU


#: the family's rows of the parity table, every combination of their grids
CASES = [(fn, case) for fn, case in parity.device_cases("cpu") if fn in JACOBIAN_TABLE]


@pytest.mark.parametrize("fn,case", CASES, ids=parity.case_id)
def test_parity_table(fn, case):
    parity.check(fn, CPU, **case)


@pytest.mark.parametrize("mode", ["new", "out", "inplace"])
@pytest.mark.parametrize("fn", [fastxent.softmax_backward, fastxent.log_softmax_backward],
                         ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_backward_long_rows(dtype, fn, mode):
    check_backward(fn, CPU, dtype=dtype, layout="long", mode=mode)


@pytest.mark.parametrize("layout", ["wide_slabs", "many_axis0", "ntc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_strided_rows_in_tiles(dtype, layout):
    """Rows strided along the classes go a tile of neighbours at a time:
    several tiles, a partial last one, in place, out= and new."""
    for fn in (fastxent.softmax_backward, fastxent.log_softmax_backward):
        for mode in ("new", "out", "inplace"):
            check_backward(fn, CPU, dtype=dtype, layout=layout, mode=mode)
    for target in ("hard_ignored", "soft"):
        check_hvp(fastxent.cross_entropy_hvp, CPU, dtype=dtype, layout=layout, weighted=True,
                  target=target, smoothing=0.2, reduction="mean", z_loss=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_jacobian_of_a_large_logit(dtype):
    """A logit of 80: exp(80) overflows float32, the max shift keeps it finite."""
    check_jacobian(fastxent.softmax_jacobian, CPU, dtype=dtype, layout="2d", big_logit=True)
    check_jacobian(fastxent.softmax_jacobian, CPU, dtype=dtype, layout="long", big_logit=True)


@pytest.mark.parametrize("target", ["hard_ignored", "soft"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_hvp_long_rows(dtype, target):
    check_hvp(fastxent.cross_entropy_hvp, CPU, dtype=dtype, layout="long", weighted=True,
              target=target, smoothing=0.2, reduction="mean", z_loss=1e-2)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("target", HVP_TARGETS)
@pytest.mark.parametrize("layout", ["2d", "ncd", "axis0", "long"])
@pytest.mark.parametrize("llm", ["scale", "cap"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_hvp_of_scaled_and_capped_logits(dtype, llm, layout, target, reduction):
    """logit_scale and softcap: the chain rule twice, f' (H_u (f' v)) + r f'' v,
    against torch's double backward of the transformed loss, with weights,
    smoothing and the z-loss on (rows, tiles of strided rows, long rows)."""
    check_hvp(fastxent.cross_entropy_hvp, CPU, dtype=dtype, layout=layout, weighted=True,
              target=target, smoothing=0.2, reduction=reduction, z_loss=1e-2, llm=llm)


def test_hvp_options_change_the_result():
    x, y, v, w, axis, opts = hvp_problem("2d", np.float64, "hard")
    plain = fastxent.cross_entropy_hvp(x, y, v)
    assert not np.allclose(fastxent.cross_entropy_hvp(x, y, v, softcap=2.0), plain)
    assert not np.allclose(fastxent.cross_entropy_hvp(x, y, v, logit_scale=0.7), plain)


@pytest.mark.parametrize("layout", ["2d", "ncd", "long"])
@pytest.mark.parametrize("target", ["hard_ignored", "soft"])
def test_hvp_into_out(layout, target):
    check_hvp(fastxent.cross_entropy_hvp, CPU, dtype=np.float64, layout=layout, weighted=True,
              target=target, smoothing=0.2, reduction="mean", z_loss=1e-2, mode="out")


def test_hvp_strided_inputs_and_out_over_the_logits():
    """Transposed (strided) logits, vector and out; ``out`` the logits
    themselves, and the logits as the vector too."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 9)).T  # (9, 7) strided rows
    v = rng.standard_normal((7, 9)).T
    y = rng.integers(0, 7, 9)
    expect = torch_hvp(np.ascontiguousarray(x), y, np.ascontiguousarray(v), z_loss=0.1)
    np.testing.assert_allclose(fastxent.cross_entropy_hvp(x, y, v, z_loss=0.1), expect,
                               rtol=1e-10, atol=1e-14)
    out = np.empty((7, 9)).T
    assert fastxent.cross_entropy_hvp(x, y, v, z_loss=0.1, out=out) is out
    np.testing.assert_allclose(out, expect, rtol=1e-10, atol=1e-14)
    xc = np.ascontiguousarray(x)
    same = torch_hvp(xc, y, xc)
    got = fastxent.cross_entropy_hvp(xc, y, xc, out=xc)
    assert got is xc
    np.testing.assert_allclose(xc, same, rtol=1e-10, atol=1e-14)


def test_hvp_reduction_none_is_sum():
    x, y, v, w, axis, opts = hvp_problem("2d", np.float64, "hard_ignored")
    np.testing.assert_array_equal(fastxent.cross_entropy_hvp(x, y, v, reduction="none"),
                                  fastxent.cross_entropy_hvp(x, y, v, reduction="sum"))


def test_hvp_z_loss_changes_the_result():
    """The z-loss's Hessian terms are checked, not vacuous."""
    x, y, v, w, axis, opts = hvp_problem("2d", np.float64, "hard")
    plain = fastxent.cross_entropy_hvp(x, y, v)
    with_z = fastxent.cross_entropy_hvp(x, y, v, z_loss=1e-2)
    assert np.abs(plain - with_z).max() > 1e-4


def test_backward_large_rows_parallel():
    """Rows past the serial threshold (the parallel kernel)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 2000)).astype(np.float32)
    g = rng.standard_normal((64, 2000)).astype(np.float32)
    for log in (False, True):
        o = (fastxent.log_softmax if log else fastxent.softmax)(x)
        fn = fastxent.log_softmax_backward if log else fastxent.softmax_backward
        expect = torch_backward(g, o, -1, log)
        np.testing.assert_allclose(fn(g, o), expect, rtol=2e-5, atol=2e-6)
    v = rng.standard_normal((64, 2000)).astype(np.float32)
    y = rng.integers(0, 2000, 64)
    expect = torch_hvp(x, y, v, label_smoothing=0.1)
    np.testing.assert_allclose(fastxent.cross_entropy_hvp(x, y, v, label_smoothing=0.1), expect,
                               rtol=2e-5, atol=2e-7 * np.abs(expect).max())


def test_backward_mixed_dtypes_compute_in_float64():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 6))
    o = fastxent.softmax(x)
    g = rng.standard_normal((3, 6)).astype(np.float32)
    result = fastxent.softmax_backward(g, o)
    assert result.dtype == np.float64
    np.testing.assert_allclose(result, torch_backward(g.astype(np.float64), o, -1, False),
                               rtol=1e-12, atol=1e-15)


def test_backward_of_no_classes_and_no_rows():
    for shape, axis in (((3, 0), -1), ((0, 4), -1), ((2, 0, 3), 1)):
        g = np.zeros(shape)
        assert fastxent.softmax_backward(g, g, axis=axis).shape == shape
        assert fastxent.log_softmax_backward(g, g, axis=axis).shape == shape
        expect = torch._softmax_backward_data(torch.zeros(shape), torch.zeros(shape),
                                              axis % len(shape), torch.float32)
        assert expect.shape == shape


# --------------------------------------------------------------------------
# logsumexp over tuples of axes; softmax of 0-d arrays and of zero classes


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axes", [(0,), (1,), (0, 2), (2, 0), (1, -1), (0, 1, 2), (-3, -2)])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_logsumexp_tuple_axes(dtype, axes, keepdims):
    x = (np.random.default_rng(6).standard_normal((3, 4, 5)) * 4).astype(dtype)
    x[0, 0, 0] = -np.inf
    got = fastxent.logsumexp(x, axes, keepdims=keepdims)
    expect = torch.logsumexp(torch.from_numpy(x.astype(np.float64)), dim=axes,
                             keepdim=keepdims).numpy()
    assert got.shape == expect.shape and got.dtype == dtype
    np.testing.assert_allclose(got, expect, rtol=1e-12 if dtype == np.float64 else 2e-6)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_logsumexp_keepdims_single_axis(axis):
    x = np.random.default_rng(7).standard_normal((3, 4))
    got = fastxent.logsumexp(x, axis, keepdims=True)
    expect = torch.logsumexp(torch.from_numpy(x), dim=axis, keepdim=True).numpy()
    assert got.shape == expect.shape
    np.testing.assert_allclose(got, expect, rtol=1e-12)


def test_logsumexp_of_strided_input_over_axes():
    x = np.random.default_rng(8).standard_normal((4, 6, 5)).transpose(2, 0, 1)[:, ::2]
    expect = torch.logsumexp(torch.from_numpy(np.ascontiguousarray(x)), dim=(0, 2)).numpy()
    np.testing.assert_allclose(fastxent.logsumexp(x, (0, 2)), expect, rtol=1e-12)


def test_logsumexp_zero_d_and_empty():
    got = fastxent.logsumexp(np.float32(2.5), 0)
    assert got.shape == () and got.dtype == np.float32 and got == 2.5
    assert fastxent.logsumexp(np.array(3.0), (-1,), keepdims=True) == 3.0
    expect = torch.logsumexp(torch.zeros((2, 0, 3)), dim=(1, 2)).numpy()
    got = fastxent.logsumexp(np.zeros((2, 0, 3)), (1, 2))
    assert got.shape == expect.shape and np.all(got == expect)  # -inf
    # no axis at all: each element is its own logsumexp (as NumPy's ()).
    x = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(fastxent.logsumexp(x, ()), x.astype(np.float64))


@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_softmax_of_zero_d(dtype, axis):
    x = np.array(2.0, dtype)
    for fn, torch_fn in ((fastxent.softmax, torch.softmax),
                         (fastxent.log_softmax, torch.log_softmax)):
        got = fn(x, axis)
        expect = torch_fn(torch.from_numpy(x), axis).numpy()
        assert got.shape == () and got.dtype == dtype and got == expect
        out = np.full((), np.nan, dtype)
        assert fn(x, axis, out=out) is out and out == expect


@pytest.mark.parametrize("shape,axis", [((3, 0), -1), ((0, 3), -1), ((2, 0, 4), 1), ((0,), 0)])
def test_softmax_of_zero_classes(shape, axis):
    for fn, torch_fn in ((fastxent.softmax, torch.softmax),
                         (fastxent.log_softmax, torch.log_softmax)):
        got = fn(np.zeros(shape, np.float32), axis)
        expect = torch_fn(torch.zeros(shape), axis)
        assert got.shape == tuple(expect.shape) and got.dtype == np.float32


# --------------------------------------------------------------------------
# bad input: refused before anything is written


def _snapshot(*arrays):
    return [a.copy() for a in arrays]


def _refuses(call, arrays, exc, pattern):
    before = _snapshot(*arrays)
    with pytest.raises(exc, match=pattern):
        call()
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)


RNG = np.random.default_rng(9)
G = RNG.standard_normal((4, 3))
O = fastxent.softmax(RNG.standard_normal((4, 3)))

BACKWARD_CASES = {
    "shapes_differ": (dict(output=O[:3]), ValueError,
                      r"output has shape \(3, 3\), but grad_output has shape \(4, 3\)"),
    "axis_out_of_range": (dict(axis=2), ValueError,
                          r"axis 2 is out of range for grad_output with 2 dimension"),
    "out_wrong_shape": (dict(out=np.zeros((3, 4))), ValueError,
                        r"out has shape \(3, 4\), expected \(4, 3\)"),
    "out_wrong_dtype": (dict(out=np.zeros((4, 3), np.float32)), TypeError,
                        r"out has dtype float32, expected float64"),
    "out_and_inplace": (dict(out=np.zeros((4, 3)), inplace=True), ValueError,
                        r"either out= or inplace=True"),
    "complex_output": (dict(output=O.astype(complex)), TypeError, r"output must be real"),
    "scalar": (dict(grad_output=np.float64(1.0), output=np.float64(1.0)), ValueError,
               r"grad_output must have at least one dimension"),
}


@pytest.mark.parametrize("fn", [fastxent.softmax_backward, fastxent.log_softmax_backward],
                         ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("name", list(BACKWARD_CASES))
def test_backward_bad_input(fn, name):
    kw, exc, pattern = BACKWARD_CASES[name]
    kw = dict(kw)
    g = kw.pop("grad_output", G.copy())
    o = kw.pop("output", O.copy())
    touched = [a for a in (g, o, kw.get("out")) if isinstance(a, np.ndarray)]
    _refuses(lambda: fn(g, o, **kw), touched, exc, pattern)


@pytest.mark.parametrize("fn", [fastxent.softmax_backward, fastxent.log_softmax_backward],
                         ids=["softmax", "log_softmax"])
def test_backward_inplace_refusals(fn):
    g, o = G.copy(), O.copy()
    g.flags.writeable = False
    _refuses(lambda: fn(g, o, inplace=True), [g, o], ValueError,
             "inplace=True but grad_output is read-only")
    g = G.astype(np.float32)
    _refuses(lambda: fn(g, O.copy(), inplace=True), [g], TypeError,
             "inplace=True needs grad_output and output of one dtype, got float32 and float64")
    with pytest.raises(TypeError, match="inplace=True needs grad_output as a float32 or float64"):
        fn([[1.0, 2.0]], [[0.5, 0.5]], inplace=True)
    o = O.copy()
    o_ro = o.copy()
    o_ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        fn(G.copy(), O.copy(), out=o_ro)


X = RNG.standard_normal((4, 3))
Y = np.array([0, 1, 2, 1])
V = RNG.standard_normal((4, 3))

HVP_CASES = {
    "target_out_of_range": (dict(target=np.array([0, 1, 3, 1])), IndexError,
                            r"target 3 at position \(2,\) is out of range for 3 classes"),
    "vector_shape": (dict(vector=V[:, :2]), ValueError,
                     r"vector has shape \(4, 2\), but logits has shape \(4, 3\)"),
    "vector_complex": (dict(vector=V.astype(complex)), TypeError, r"vector must be real"),
    "axis_out_of_range": (dict(axis=-3), ValueError, r"axis -3 is out of range for logits"),
    "out_wrong_shape": (dict(out=np.zeros((3, 4))), ValueError,
                        r"out has shape \(3, 4\), expected \(4, 3\)"),
    "out_not_array": (dict(out=[[0.0] * 3] * 4), TypeError, r"out must be an array"),
    "batch_shape": (dict(target=np.array([0, 1, 2])), ValueError,
                    r"target shape \(3,\) does not match the batch shape \(4,\)"),
    "weight_length": (dict(weight=np.ones(4)), ValueError, r"weight must be a 1-D array of 3"),
    "smoothing": (dict(label_smoothing=2.0), ValueError, r"label_smoothing must be between"),
    "z_loss": (dict(z_loss=-1.0), ValueError, r"z_loss must be finite and at least 0.0"),
    "reduction": (dict(reduction="avg"), ValueError, r"reduction must be"),
}


@pytest.mark.parametrize("name", list(HVP_CASES))
def test_hvp_bad_input(name):
    kw, exc, pattern = HVP_CASES[name]
    kw = dict(kw)
    x, y, v = kw.pop("logits", X.copy()), kw.pop("target", Y.copy()), kw.pop("vector", V.copy())
    out = kw.setdefault("out", np.full((4, 3), 7.0))
    touched = [a for a in (x, y, v, out) if isinstance(a, np.ndarray)]
    _refuses(lambda: fastxent.cross_entropy_hvp(x, y, v, **kw), touched, exc, pattern)


def test_hvp_bad_target_leaves_out_over_the_logits_untouched():
    x = X.copy()
    _refuses(lambda: fastxent.cross_entropy_hvp(x, np.array([0, 9, 1, 1]), V, out=x), [x],
             IndexError, re.escape("target 9 at position (1,)"))


def test_jacobian_and_logsumexp_bad_input():
    with pytest.raises(ValueError, match="axis 2 is out of range for x"):
        fastxent.softmax_jacobian(X, axis=2)
    with pytest.raises(ValueError, match=r"axis \(0, 0\) repeats an axis"):
        fastxent.logsumexp(X, (0, 0))
    with pytest.raises(ValueError, match="axis 2 is out of range for x"):
        fastxent.logsumexp(X, (0, 2))
    with pytest.raises(ValueError, match="axis 1 is out of range for x with 1 dimension"):
        fastxent.softmax(np.array(1.0), 1)
