"""float16 and bfloat16 inputs (issue 19), against float64 PyTorch on the
same (upcast) values.

The kernels compute in float32, so the loss is held to 1e-5 relative and
each gradient (softmax, log_softmax) element to one unit in the last place
of the 16-bit type of the float64 value, or, where terms cancel, to 2e-6 of
the largest magnitude of the float64 gradient (what float32 arithmetic can
promise). The parity table's grid (``tests/parity.py``) runs on the 16-bit
dtypes: every layout, weight, target kind, smoothing, reduction and LLM
option, in place, into ``out=`` (16-bit and float32) and into a new array.
The 16-bit sweeps of ``_lanes`` and the direct 16-bit kernel built on them
are held to the float32 path's bits on the widened values. The softmax
Jacobian family (``tests/jacobian_parity.py``'s float64 torch twins) is held
to the same per-element bound, its 16-bit results to the float32 call's on
the widened values, rounded.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
from numba import njit

import fastxent
from fastxent import _half
from fastxent._fastmath import FASTMATH
from fastxent._lanes import (BLOCK, LANES, exp_sum_inplace, half_exp_sum, half_row_max, row_max,
                             scale_minus, scale_minus_half)
from tests import jacobian_parity as jp
from tests import parity
from tests import reference as ref
from tests.parity import LAYOUTS, LLM_OPTIONS, REDUCTIONS, SMOOTHINGS, TARGETS

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALF = [F16, BF16]
IDS = ["f16", "bf16"]
#: explicit mantissa bits of each 16-bit type, and its smallest ulp (subnormals)
MANTISSA = {F16: (10, 2.0 ** -24), BF16: (7, 2.0 ** -133)}
LOSS_RTOL = 1e-5
CANCEL = 2e-6


def ulp(values, dtype):
    """One unit in the last place of ``dtype`` at each of ``values`` (float64)."""
    bits, smallest = MANTISSA[dtype]
    a = np.abs(np.asarray(values, np.float64))
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    return np.maximum(2.0 ** (exponent - bits), smallest)


def check_grad(ours, expect, dtype, what="grad"):
    """Each element within one 16-bit ulp of the float64 value, or within
    ``CANCEL`` of the largest magnitude."""
    assert ours.dtype == dtype, (what, ours.dtype)
    ours = np.asarray(ours, np.float64)
    expect = np.asarray(expect, np.float64)
    error = np.abs(ours - expect)
    bound = np.maximum(ulp(expect, dtype), CANCEL * np.max(np.abs(expect), initial=0.0))
    bad = ~(error <= bound)
    assert not bad.any(), (f"{what}: {bad.sum()} element(s) off, worst at "
                           f"{np.unravel_index(np.argmax(error - bound), error.shape)}: "
                           f"{ours[bad][:4]} vs {expect[bad][:4]}")


def check_loss(ours, expect, reduction, what="loss"):
    """float32 losses within 1e-5 relative of float64."""
    if reduction == "none":
        assert isinstance(ours, np.ndarray) and ours.dtype == np.float32, (what, type(ours))
    else:
        assert type(ours) is np.float32, (what, type(ours))
    np.testing.assert_allclose(np.asarray(ours, np.float64), expect, rtol=LOSS_RTOL, atol=1e-7,
                               err_msg=what)


def half_problem(layout, dtype, target, C=None, seed=0):
    """``parity.target_problem`` in ``dtype`` (logits, soft targets and
    weights rounded to it) and the same values in float64 for torch."""
    x, y, w, axis, options = parity.target_problem(layout, np.float32, target, seed, C)
    x = x.astype(dtype)
    w = w.astype(dtype)
    if y.dtype.kind == "f":
        y = y.astype(dtype)
    wide = lambda a: a.astype(np.float64) if a.dtype.kind != "i" else a  # noqa: E731
    return (x, y, w), (wide(x), wide(y), wide(w)), axis, options


def run_all_ways(x, y, axis, kw):
    """cross_entropy_with_grad into a new array, in place, into 16-bit and
    float32 ``out=``, plus cross_entropy: (loss, grad) of each, checked equal."""
    results = {"new": fastxent.cross_entropy_with_grad(x, y, axis=axis, **kw)}
    inplace = x.copy()
    results["inplace"] = fastxent.cross_entropy_with_grad(inplace, y, axis=axis, inplace=True,
                                                          **kw)
    assert results["inplace"][1] is inplace
    for name, dtype in (("out16", x.dtype), ("out32", np.float32)):
        out = np.full(x.shape, np.nan, dtype)
        results[name] = fastxent.cross_entropy_with_grad(x, y, axis=axis, out=out, **kw)
        assert results[name][1] is out
    loss_only = fastxent.cross_entropy(x, y, axis=axis, **kw)
    stats = kw.get("return_stats", False)
    for name, result in results.items():
        loss = result[0]
        np.testing.assert_array_equal(np.asarray(loss), np.asarray(results["new"][0]), name)
        if name != "out32":  # float32 out= holds the unrounded gradient
            np.testing.assert_array_equal(result[1].view(np.uint16),
                                          results["new"][1].view(np.uint16), name)
    np.testing.assert_allclose(np.asarray(loss_only[0] if stats else loss_only, np.float64),
                               np.asarray(results["new"][0], np.float64), rtol=1e-6)
    return results


# --------------------------------------------------------------------------
# cross-entropy: the parity table's grid


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
@pytest.mark.parametrize("layout,C", [(lay, None) for lay in LAYOUTS] + [("2d", 300)])
@pytest.mark.parametrize("target", TARGETS)
def test_cross_entropy_grid(dtype, layout, C, target):
    (x, y, w), (x64, y64, w64), axis, options = half_problem(layout, dtype, target, C)
    for weighted, smoothing, reduction in itertools.product([False, True], SMOOTHINGS,
                                                            REDUCTIONS):
        kw = dict(reduction=reduction, label_smoothing=smoothing, **options)
        results = run_all_ways(x, y, axis, dict(kw, weight=w if weighted else None))
        t_loss, t_grad = parity.torch_ce(x64, y64, axis=axis,
                                         **dict(kw, weight=w64 if weighted else None))
        case = f"{weighted=} {smoothing=} {reduction=}"
        check_loss(results["new"][0], t_loss, reduction, case)
        check_grad(results["new"][1], t_grad, dtype, case)
        g32 = results["out32"][1]
        np.testing.assert_allclose(g32, t_grad, rtol=0, atol=1e-6, err_msg=case)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
@pytest.mark.parametrize("llm", list(LLM_OPTIONS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cross_entropy_llm_options(dtype, llm, layout):
    for target, reduction in itertools.product(TARGETS, REDUCTIONS):
        (x, y, w), (x64, y64, w64), axis, options = half_problem(layout, dtype, target)
        kw = dict(LLM_OPTIONS[llm], reduction=reduction, label_smoothing=0.2, **options)
        stats = kw.pop("return_stats", False)
        results = run_all_ways(x, y, axis, dict(kw, weight=w, return_stats=stats))
        t_loss, t_grad, t_lse, t_z = parity.torch_ce_options(x64, y64, axis=axis, weight=w64,
                                                             **kw)
        case = f"{target=} {reduction=}"
        check_loss(results["new"][0], t_loss, reduction, case)
        check_grad(results["new"][1], t_grad, dtype, case)
        if stats:
            st = results["new"][2]
            assert st.lse.dtype == np.float32
            np.testing.assert_allclose(st.lse, t_lse, rtol=LOSS_RTOL, err_msg=case)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_strided_logits_and_module(dtype):
    """A transposed (strided) 16-bit view, written in place through the
    view; CrossEntropyLoss with backward() into the 16-bit dtype."""
    (x, y, w), (x64, y64, w64), axis, _ = half_problem("2d", dtype, "hard", C=40)
    base = np.ascontiguousarray(x.T)
    view = base.T  # x's values, strided along the classes
    t_loss, t_grad = parity.torch_ce(x64, y64, weight=w64)
    loss, grad = fastxent.cross_entropy_with_grad(view, y, weight=w, inplace=True)
    assert grad is view
    check_loss(loss, t_loss, "mean")
    check_grad(base.T, t_grad, dtype)
    module = fastxent.CrossEntropyLoss(weight=w, label_smoothing=0.1)
    t_loss, t_grad = parity.torch_ce(x64, y64, weight=w64, label_smoothing=0.1)
    check_loss(module(x, y), t_loss, "mean")
    check_grad(module.backward(), t_grad, dtype)


def test_rounding_is_to_nearest_even():
    """The gradient written is float32's value rounded to nearest even:
    bit for bit what ml_dtypes and NumPy make of the float32 gradient."""
    x, y, _, _ = parity.problem("2d", np.float32, soft=False, C=300)
    for dtype in HALF:
        xh = x.astype(dtype)
        _, g16 = fastxent.cross_entropy_with_grad(xh, y, reduction="sum")
        _, g32 = fastxent.cross_entropy_with_grad(xh, y, reduction="sum",
                                                  out=np.empty(x.shape, np.float32))
        np.testing.assert_array_equal(g16.view(np.uint16), g32.astype(dtype).view(np.uint16))


# --------------------------------------------------------------------------
# softmax, log_softmax, logsumexp, nll_loss, BCE


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
@pytest.mark.parametrize("layout,C", [(lay, None) for lay in LAYOUTS] + [("2d", 300)])
def test_softmax_family(dtype, layout, C):
    (x, y, _), (x64, _, _), axis, _ = half_problem(layout, dtype, "hard", C)
    for fn, reference in ((fastxent.softmax, ref.softmax),
                          (fastxent.log_softmax, ref.log_softmax)):
        expect = reference(x64, axis=axis)
        check_grad(fn(x, axis=axis), expect, dtype, fn.__name__)
        out = np.empty(x.shape, dtype)
        assert fn(x, axis=axis, out=out) is out
        check_grad(out, expect, dtype, fn.__name__ + " out=")
        out32 = np.empty(x.shape, np.float32)
        fn(x, axis=axis, out=out32)
        np.testing.assert_allclose(out32, expect, rtol=2e-6, atol=1e-6)
    lse = fastxent.logsumexp(x, axis=axis)
    assert lse.dtype == np.float32
    np.testing.assert_allclose(lse, ref.logsumexp(x64, axis=axis), rtol=LOSS_RTOL)
    lp = ref.log_softmax(x64, axis=axis).astype(dtype)
    for reduction in REDUCTIONS:
        ours = fastxent.nll_loss(lp, y, axis=axis, reduction=reduction)
        check_loss(ours, ref.nll_loss(lp.astype(np.float64), y, axis=axis, reduction=reduction),
                   reduction, "nll_loss")


@pytest.mark.parametrize("dtype,axes,keepdims", [(F16, (0, 2), False), (BF16, (2, 0), True),
                                                  (F16, (), True), (BF16, (1, -1), False)],
                         ids=["f16-02", "bf16-20-keep", "f16-none", "bf16-1-1"])
def test_logsumexp_over_axes(dtype, axes, keepdims):
    """logsumexp over a tuple of axes takes 16-bit inputs and returns float32."""
    x = (np.random.default_rng(6).standard_normal((3, 4, 5)) * 4).astype(dtype)
    x[0, 0, 0] = -np.inf
    x64 = x.astype(np.float64)
    got = fastxent.logsumexp(x[:, ::-1], axes, keepdims=keepdims)
    with np.errstate(divide="ignore"):  # the -inf element alone, for axes=()
        expect = np.log(np.sum(np.exp(x64[:, ::-1]), axis=axes, keepdims=keepdims))
    assert got.dtype == np.float32 and got.shape == expect.shape
    np.testing.assert_allclose(got, expect, rtol=LOSS_RTOL)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
@pytest.mark.parametrize("shape", list(parity.BCE_SHAPES))
def test_binary_cross_entropy(dtype, shape):
    for weights, reduction in itertools.product(parity.BCE_WEIGHTS, REDUCTIONS):
        x, t, kw = parity.bce_problem(shape, np.float32, weights)
        x, t = x.astype(dtype), t.astype(dtype)
        kw = {k: v.astype(dtype) for k, v in kw.items()}
        kw64 = {k: v.astype(np.float64) for k, v in kw.items()}
        x64, t64 = x.astype(np.float64), t.astype(np.float64)
        r_loss, r_grad = ref.bce_with_logits_with_grad(x64, t64, reduction=reduction, **kw64)
        loss, grad = fastxent.binary_cross_entropy_with_logits_with_grad(
            x, t, reduction=reduction, **kw)
        loss_only = fastxent.binary_cross_entropy_with_logits(x, t, reduction=reduction, **kw)
        # the elementwise terms cancel (see parity.check_bce): held to their size
        w_, pw_ = kw64.get("weight", 1.0), kw64.get("pos_weight", 1.0)
        terms = (np.abs(x64) + (1 + (pw_ - 1) * t64) * (np.abs(x64) + 1.0)) * w_
        scale = {"none": terms, "sum": terms.sum(), "mean": terms.mean()}[reduction]
        for ours in (loss, loss_only):
            assert np.asarray(ours).dtype == np.float32
            assert np.all(np.abs(np.asarray(ours, np.float64) - r_loss)
                          <= LOSS_RTOL * np.abs(r_loss) + 2e-7 * scale), (weights, reduction)
        check_grad(grad, r_grad, dtype, f"{weights} {reduction}")
        xi = x.copy()
        _, gi = fastxent.binary_cross_entropy_with_logits_with_grad(
            xi, t, reduction=reduction, inplace=True, **kw)
        assert gi is xi
        check_grad(xi, r_grad, dtype, f"in place {weights} {reduction}")


# --------------------------------------------------------------------------
# the softmax Jacobian family: computed in float32, results in the 16-bit dtype

JACOBIAN_LAYOUTS = jp.TABLE_LAYOUTS  # rows, (N, C, d), the class axis first


def half_backward_problem(layout, dtype, log, C=None):
    """(grad_output, output, axis, float64 torch result): 16-bit
    ``grad_output`` and the 16-bit (log_)softmax of 16-bit logits."""
    x, g, axis = jp.inputs(layout, np.float32, C=C)
    x, g = x.astype(dtype), g.astype(dtype)
    o = (fastxent.log_softmax if log else fastxent.softmax)(x, axis=axis)
    assert o.dtype == dtype
    return g, o, axis, jp.torch_backward(g.astype(np.float64), o.astype(np.float64), axis, log)


def check_float32(ours, expect, what):
    """A float32 result (``out=`` float32) against float64: float32 arithmetic."""
    assert ours.dtype == np.float32, what
    scale = max(1.0, float(np.abs(expect).max(initial=0.0)))
    np.testing.assert_allclose(ours, expect, rtol=2e-5, atol=2e-7 * scale, err_msg=what)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
@pytest.mark.parametrize("layout", JACOBIAN_LAYOUTS)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_backward(dtype, layout, log):
    """New, into 16-bit and float32 ``out=``, in place (a strided view too),
    with a float32 grad_output or output beside the 16-bit one; the 16-bit
    result is the float32 result rounded to nearest even, bit for bit."""
    fn = fastxent.log_softmax_backward if log else fastxent.softmax_backward
    g, o, axis, expect = half_backward_problem(layout, dtype, log)
    g_before = g.copy()
    new = fn(g, o, axis=axis)
    check_grad(new, expect, dtype, "new")
    np.testing.assert_array_equal(g.view(np.uint16), g_before.view(np.uint16))
    out = np.full(g.shape, np.nan, dtype)
    assert fn(g, o, axis=axis, out=out) is out
    out32 = np.full(g.shape, np.nan, np.float32)
    assert fn(g, o, axis=axis, out=out32) is out32
    check_float32(out32, expect, "out32")
    np.testing.assert_array_equal(out.view(np.uint16), new.view(np.uint16))
    np.testing.assert_array_equal(new.view(np.uint16), out32.astype(dtype).view(np.uint16))
    inplace = g.copy()
    assert fn(inplace, o, axis=axis, inplace=True) is inplace
    np.testing.assert_array_equal(inplace.view(np.uint16), new.view(np.uint16))
    base = np.ascontiguousarray(np.swapaxes(g, 0, -1))
    view = np.swapaxes(base, 0, -1)  # g's values, strided
    assert fn(view, o, axis=axis, inplace=True) is view
    np.testing.assert_array_equal(np.swapaxes(base, 0, -1).view(np.uint16), new.view(np.uint16))
    # a float32 array beside the 16-bit one: the result is still 16-bit
    for what, (go, oo) in (("float32 grad_output", (g.astype(np.float32), o)),
                           ("float32 output", (g, o.astype(np.float32)))):
        check_grad(fn(go, oo, axis=axis), expect, dtype, what)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
@pytest.mark.parametrize("layout", JACOBIAN_LAYOUTS)
def test_softmax_jacobian(dtype, layout):
    """The (..., C, C) Jacobian in the 16-bit dtype, against float64 torch;
    a logit of 60 (exp overflows float16 without the max shift)."""
    x, _, axis = jp.inputs(layout, np.float32)
    x = x.astype(dtype)
    x.flat[0] = 60.0
    got = fastxent.softmax_jacobian(x, axis=axis)
    expect = jp.torch_jacobian(x.astype(np.float64), axis)
    assert got.shape == expect.shape
    check_grad(got, expect, dtype)
    wide = fastxent.softmax_jacobian(x.astype(np.float32), axis=axis)
    np.testing.assert_array_equal(got.view(np.uint16), wide.astype(dtype).view(np.uint16))
    empty = fastxent.softmax_jacobian(np.zeros((0, 3), dtype))
    assert empty.dtype == dtype and empty.shape == (0, 3, 3)


def half_hvp_problem(layout, dtype, target, C=None):
    """``jp.hvp_problem`` with 16-bit logits, vector, weights and soft
    targets, and the same values in float64."""
    x, y, v, w, axis, options = jp.hvp_problem(layout, np.float32, target, C=C)
    x, v, w = x.astype(dtype), v.astype(dtype), w.astype(dtype)
    if y.dtype.kind == "f":
        y = y.astype(dtype)
    wide = lambda a: a.astype(np.float64) if a.dtype.kind != "i" else a  # noqa: E731
    return (x, y, v, w), (wide(x), wide(y), wide(v), wide(w)), axis, options


#: The product's options, every pair of values at least once (``parity.covering``):
#: the 16-bit path adds widening and rounding around the float32 kernels,
#: whose whole grid is ``tests/test_jacobian.py``'s.
HVP_OPTIONS = parity.covering(dict(dtype=HALF, weighted=[False, True], smoothing=[0.0, 0.2],
                                   reduction=REDUCTIONS, z_loss=[0.0, jp.Z_LOSS],
                                   llm=list(jp.HVP_LLM)), strength=2)


@pytest.mark.parametrize("layout", JACOBIAN_LAYOUTS)
@pytest.mark.parametrize("target", jp.HVP_TARGETS)
def test_cross_entropy_hvp(layout, target):
    """Weights, smoothing, reductions, z-loss, logit_scale and softcap, in
    either 16-bit dtype, against torch's float64 double backward: new, into
    16-bit and float32 ``out=``, the 16-bit result the float32 one rounded."""
    for case in HVP_OPTIONS:
        dtype, weighted, smoothing, reduction, z_loss, llm = case.values()
        (x, y, v, w), (x64, y64, v64, w64), axis, options = half_hvp_problem(layout, dtype,
                                                                             target)
        kw = dict(reduction=reduction, label_smoothing=smoothing, z_loss=z_loss, **options,
                  **jp.HVP_LLM[llm])
        case = str(case)
        expect = jp.torch_hvp(x64, y64, v64, axis=axis, weight=w64 if weighted else None, **kw)
        kw["weight"] = w if weighted else None
        new = fastxent.cross_entropy_hvp(x, y, v, axis=axis, **kw)
        check_grad(new, expect, dtype, case)
        out32 = np.full(x.shape, np.nan, np.float32)
        assert fastxent.cross_entropy_hvp(x, y, v, axis=axis, out=out32, **kw) is out32
        check_float32(out32, expect, case)
        np.testing.assert_array_equal(new.view(np.uint16), out32.astype(dtype).view(np.uint16))
        out = np.full(x.shape, np.nan, dtype)
        assert fastxent.cross_entropy_hvp(x, y, v, axis=axis, out=out, **kw) is out
        np.testing.assert_array_equal(out.view(np.uint16), new.view(np.uint16))


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_cross_entropy_hvp_of_mixed_and_overlapping_arrays(dtype):
    """16-bit logits with a float32 vector, float32 logits with a 16-bit
    vector: a 16-bit product; ``out=`` the 16-bit logits themselves."""
    (x, y, v, _), (x64, y64, v64, _), axis, _ = half_hvp_problem("2d", dtype, "hard")
    expect = jp.torch_hvp(x64, y64, v64, axis=axis)
    for what, (xa, va) in (("float32 vector", (x, v.astype(np.float32))),
                           ("float32 logits", (x.astype(np.float32), v))):
        check_grad(fastxent.cross_entropy_hvp(xa, y, va), expect, dtype, what)
    xo = x.copy()
    assert fastxent.cross_entropy_hvp(xo, y, xo, out=xo) is xo
    check_grad(xo, jp.torch_hvp(x64, y64, x64), dtype, "out= the logits and vector")


# --------------------------------------------------------------------------
# bad input, refused before anything is written


def test_read_only_half_logits_refused_in_place():
    x, y, _, _ = parity.problem("2d", np.float32, soft=False)
    for dtype in HALF:
        xh = x.astype(dtype)
        xh.flags.writeable = False
        before = xh.copy()
        with pytest.raises(ValueError, match="read-only"):
            fastxent.cross_entropy_with_grad(xh, y, inplace=True)
        with pytest.raises(ValueError, match="read-only"):
            fastxent.binary_cross_entropy_with_logits_with_grad(xh, xh, inplace=True)
        np.testing.assert_array_equal(xh.view(np.uint16), before.view(np.uint16))


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_out_of_another_dtype_refused(dtype):
    x, y, _, _ = parity.problem("2d", np.float32, soft=False)
    xh = x.astype(dtype)
    for other in (BF16 if dtype == F16 else F16, np.float64):
        out = np.full(x.shape, 7, other)
        with pytest.raises(TypeError, match="out has dtype"):
            fastxent.cross_entropy_with_grad(xh, y, out=out)
        with pytest.raises(TypeError, match="out has dtype"):
            fastxent.softmax(xh, out=out)
        with pytest.raises(TypeError, match="out has dtype"):
            fastxent.binary_cross_entropy_with_logits_with_grad(xh, xh, out=out)
        assert np.all(out.astype(np.float64) == 7)


def test_jacobian_family_refuses_mixed_dtypes_by_name():
    """The Jacobian family's 16-bit inputs share one 16-bit dtype (float32
    beside them is fine): the other 16-bit dtype, or float64, is a TypeError
    naming the argument, raised before anything is written; so is an ``out=``
    of the other 16-bit dtype or of float64, and in place over a grad_output
    of another dtype than the output's."""
    g = np.full((3, 4), 0.25, F16)
    y = np.zeros(3, np.int64)
    for other in (BF16, np.dtype(np.float64)):
        o = np.full((3, 4), 0.25, other)
        # named: the argument not of the first 16-bit argument's dtype
        if other == BF16:
            reversed_ = "output has dtype float16, but grad_output has dtype bfloat16"
            reversed_hvp = "vector has dtype float16, but logits has dtype bfloat16"
        else:
            reversed_ = "grad_output has dtype float64, but output has dtype float16"
            reversed_hvp = "logits has dtype float64, but vector has dtype float16"
        for fn in (fastxent.softmax_backward, fastxent.log_softmax_backward):
            with pytest.raises(TypeError, match=f"output has dtype {other}, but grad_output "
                                                f"has dtype float16"):
                fn(g, o)
            with pytest.raises(TypeError, match=reversed_):
                fn(o, g)
        with pytest.raises(TypeError, match=f"vector has dtype {other}, but logits has dtype "
                                            f"float16"):
            fastxent.cross_entropy_hvp(g, y, o)
        with pytest.raises(TypeError, match=reversed_hvp):
            fastxent.cross_entropy_hvp(o, y, g)
        out = np.full((3, 4), 7, other)
        with pytest.raises(TypeError, match="out has dtype"):
            fastxent.softmax_backward(g, g, out=out)
        with pytest.raises(TypeError, match="out has dtype"):
            fastxent.cross_entropy_hvp(g, y, g, out=out)
        assert np.all(out.astype(np.float64) == 7)
    inplace = g.copy()
    with pytest.raises(TypeError, match="inplace=True needs grad_output and output of one"):
        fastxent.softmax_backward(inplace, g.astype(np.float32), inplace=True)
    np.testing.assert_array_equal(inplace.view(np.uint16), g.view(np.uint16))


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_hvp_bad_target_refused_before_writes(dtype):
    """A class index out of range: an IndexError before the 16-bit ``out=``
    (the logits themselves, too) is written."""
    x = (np.random.default_rng(5).standard_normal((4, 3)) * 3).astype(dtype)
    bad = np.array([0, 1, 3, 1])
    out = np.full(x.shape, 7, dtype)
    with pytest.raises(IndexError, match=r"target 3 at position \(2,\)"):
        fastxent.cross_entropy_hvp(x, bad, x, out=out)
    assert np.all(out.astype(np.float64) == 7)
    xo = x.copy()
    with pytest.raises(IndexError):
        fastxent.cross_entropy_hvp(xo, bad, xo, out=xo)
    np.testing.assert_array_equal(xo.view(np.uint16), x.view(np.uint16))


def test_conversions_match_ml_dtypes_and_numpy():
    """The 16-bit conversions, bit for bit, on every float16 / bfloat16 value
    widened, and on float32 values at and around each rounding tie (ties to
    even), NaN, infinities, overflow and subnormals."""
    rng = np.random.default_rng(3)
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ties = (rng.integers(0, 1 << 16, 4096, dtype=np.uint32) << 16)
    near = np.concatenate([ties | 0x8000, ties | 0x7fff, ties | 0x8001])  # bf16 ties and neighbours
    f16_ties = rng.integers(0, 1 << 32, 4096, dtype=np.uint64).astype(np.uint32) & ~np.uint32(0x1fff) | 0x1000
    values = np.concatenate([near, f16_ties, rng.integers(0, 1 << 32, 8192, dtype=np.uint64)
                             .astype(np.uint32)]).view(np.float32)
    values = np.concatenate([values, np.float32([np.nan, np.inf, -np.inf, 7e4, -7e4, 1e-8,
                                                 3e38, 6e-8, -0.0])])
    for dtype in HALF:
        halves = every.view(dtype)
        wide = _half.widen(halves)
        np.testing.assert_array_equal(wide, halves.astype(np.float32))
        with np.errstate(all="ignore"):
            expect = values.astype(dtype)
        ours = _half.narrow(values, dtype)
        nan = np.isnan(values)
        np.testing.assert_array_equal(ours.view(np.uint16)[~nan], expect.view(np.uint16)[~nan])
        assert np.isnan(ours.astype(np.float32)[nan]).all()


# --------------------------------------------------------------------------
# The 16-bit sweeps of ``_lanes`` and the direct kernel built on them: the
# same bits as the float32 sweeps on the widened values, narrowed by ``_half``.

SWEEP_LENGTHS = [1, LANES - 1, LANES, 33, 64, 129, BLOCK + 1, 3 * BLOCK + 37]


@njit(fastmath=FASTMATH)
def _half_max(x, copy_to, brain):
    return half_row_max(x, copy_to, True) if brain else half_row_max(x, copy_to, False)


@njit(fastmath=FASTMATH)
def _half_exp(x, g, m, ahead, brain):
    if brain:
        return half_exp_sum(x, g, m, ahead, True)
    return half_exp_sum(x, g, m, ahead, False)


@njit(fastmath=FASTMATH)
def _half_scale(e, g, k1, k2, w, brain):
    if brain:
        scale_minus_half(e, g, k1, k2, w, True)
    else:
        scale_minus_half(e, g, k1, k2, w, False)


@njit(fastmath=FASTMATH)
def _f32_sweeps(x, m, k1, k2, w):
    """The float32 routine's sweeps: (row_max, exp_sum_inplace's sum, the
    exponentials, scale_minus of them)."""
    g = x.copy()
    big = row_max(x, None)
    s = exp_sum_inplace(g, m, None)
    e = g.copy()
    scale_minus(g, g, k1, k2, w)
    return big, s, e, g


def _special_float32(n, seed):
    """float32 values at and around bfloat16 and float16 rounding ties, NaN,
    infinities, overflow and subnormals of both types, zeros."""
    rng = np.random.default_rng(seed)
    ties = rng.integers(0, 1 << 16, n, dtype=np.uint32) << 16
    bits = ties | rng.choice(np.uint32([0x8000, 0x7fff, 0x8001, 0x1000, 0]), n)
    values = bits.view(np.float32).copy()
    specials = np.float32([np.nan, np.inf, -np.inf, 7e4, -7e4, 65520.0, 1e-8, 6e-8, 3e38,
                           -0.0, 0.0, 1e-39, -3e-41])
    values[:min(n, specials.size)] = specials[:n]
    return values


def _same(a, b):
    """Equal, NaN equal to NaN."""
    return a == b or (np.isnan(a) and np.isnan(b))


def _bits(a):
    return np.asarray(a).view(np.uint16 if np.asarray(a).itemsize == 2 else np.uint32)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
@pytest.mark.parametrize("n", SWEEP_LENGTHS)
def test_half_sweeps_give_the_float32_sweeps_bits(n, dtype):
    brain = dtype == BF16
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 4).astype(dtype)
    if n > 3:
        x[n // 3] = np.nan  # skipped by the max, carried by the exponentials
        x[n // 2] = -np.inf
    wide = x.astype(np.float32)
    w = rng.random(n).astype(np.float32)
    k1, k2 = np.float32(0.37), np.float32(1e-3)
    m = np.float32(np.nanmax(wide))
    big, s, e, g32 = _f32_sweeps(wide, m, k1, k2, w)
    bits = x.view(np.uint16)

    copy = np.full(n, 7.0, np.float32)
    assert _half_max(bits, copy, brain) == big == m
    np.testing.assert_array_equal(_bits(copy), _bits(wide))
    assert _half_max(bits, None, brain) == big

    ahead = np.ones(n, np.uint16)  # prefetching the next 16-bit row changes nothing
    into = np.full(n, 7.0, np.float32)
    assert _same(_half_exp(bits, into, m, ahead, brain), s)
    np.testing.assert_array_equal(_bits(into), _bits(e))
    assert _same(_half_exp(bits, None, m, None, brain), s)

    guarded = np.full((n + 1, 2), 0x5555, np.uint16)
    out = guarded[:n, 1]  # strided, with guard values around it
    for weights in (w, None):
        _half_scale(e, out, k1, k2, weights, brain)
        expect = _f32_sweeps(wide, m, k1, k2, weights)[3]
        np.testing.assert_array_equal(out, _bits(_half.narrow(expect, dtype)))
    np.testing.assert_array_equal(guarded[:, 0], 0x5555)
    assert guarded[n, 1] == 0x5555


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
@pytest.mark.parametrize("n", [LANES + 3, 97, BLOCK + 5])
def test_half_sweeps_round_like_half_and_read_strided_rows(n, dtype):
    """Rounding of ties, NaN, infinities, overflow and subnormals in the
    gradient sweep, as ``_half.narrow``; strided 16-bit rows read as
    contiguous ones."""
    brain = dtype == BF16
    e = _special_float32(n, n)
    out = np.zeros(n, np.uint16)
    with np.errstate(all="ignore"):
        expect = _bits(_half.narrow(e * np.float32(1.0) - np.float32(0.0), dtype))
        _half_scale(e, out, np.float32(1.0), np.float32(0.0), None, brain)
    nan = np.isnan(e)
    np.testing.assert_array_equal(out[~nan], expect[~nan])
    assert np.isnan(out.view(dtype).astype(np.float32)[nan]).all()

    x = (np.random.default_rng(n).standard_normal(n) * 3).astype(dtype)
    base = np.zeros((n, 3), dtype)
    base[:, 1] = x
    strided = base[:, 1].view(np.uint16)
    assert not strided.flags.c_contiguous
    m = _half_max(x.view(np.uint16), None, brain)
    a, b = np.empty(n, np.float32), np.empty(n, np.float32)
    assert _half_max(strided, a, brain) == m
    assert _half_exp(strided, b, m, None, brain) == _half_exp(x.view(np.uint16), a, m, None,
                                                               brain)
    np.testing.assert_array_equal(_bits(a), _bits(b))


def test_bfloat16_rounding_without_avx512_bf16(monkeypatch):
    """The integer rounding of bfloat16 (what CPUs without AVX-512 BF16
    run, and others for subnormal lanes) compiled alone: the same bits."""
    from fastxent import _lanes

    monkeypatch.setattr(_lanes, "bf16_instructions", lambda: False)

    @njit(fastmath=FASTMATH)
    def integer_rounding(e, g, k1, k2):
        scale_minus_half(e, g, k1, k2, None, True)

    e = _special_float32(3 * BLOCK + 37, 5)
    k1, k2 = np.float32(0.75), np.float32(2.0 ** -130)
    out, expect = np.zeros(e.size, np.uint16), np.zeros(e.size, np.uint16)
    integer_rounding(e, out, k1, k2)
    _half_scale(e, expect, k1, k2, None, True)
    np.testing.assert_array_equal(out, expect)
    assert _lanes.bf16_instructions() is False


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_direct_half_kernel_is_the_float32_path_bit_for_bit(dtype):
    """The 16-bit direct kernel (long contiguous rows, class indices) gives
    the float32 path's losses and gradients on the widened logits, rounded,
    bit for bit: weights, smoothing, z_loss, ignored rows, a NaN row, -inf
    logits; new, in place, into ``out=`` and loss only; 1 and 2 threads."""
    import numba

    rng = np.random.default_rng(19)
    n, C = 40, 2000  # 80000 elements: the parallel variant with 2 threads
    x = (rng.standard_normal((n, C)) * 4).astype(dtype)
    x[3, 7] = np.nan
    x[5, ::3] = -np.inf
    y = rng.integers(0, C, n)
    y[4] = 1
    w = (rng.random(C) + 0.5).astype(np.float32)
    threads = numba.get_num_threads()
    cases = [dict(), dict(weight=w), dict(label_smoothing=0.1),
             dict(weight=w, label_smoothing=0.2, z_loss=1e-3, ignore_index=1)]
    try:
        for kw, reduction, nthreads in itertools.product(cases, ["none", "mean"],
                                                         sorted({1, min(2, threads)})):
            numba.set_num_threads(nthreads)
            kw = dict(kw, reduction=reduction)
            case = f"{kw} threads={nthreads}"
            f32 = np.empty((n, C), np.float32)  # a float32 out=: the float32 kernels
            loss32, _ = fastxent.cross_entropy_with_grad(x, y, out=f32, **kw)
            expect = _bits(_half.narrow(f32, dtype))
            loss, grad = fastxent.cross_entropy_with_grad(x, y, **kw)
            inplace = x.copy()
            loss_in, _ = fastxent.cross_entropy_with_grad(inplace, y, inplace=True, **kw)
            out = np.full((n, C), np.nan, dtype)
            loss_out, _ = fastxent.cross_entropy_with_grad(x, y, out=out, **kw)
            loss_only = fastxent.cross_entropy(x, y, **kw)
            for name, value in (("new", loss), ("inplace", loss_in), ("out", loss_out),
                                ("loss only", loss_only)):
                np.testing.assert_array_equal(np.asarray(value), np.asarray(loss32),
                                              f"{case} {name}")
            for name, value in (("new", grad), ("inplace", inplace), ("out", out)):
                np.testing.assert_array_equal(_bits(value), expect, f"{case} {name}")
    finally:
        numba.set_num_threads(threads)
