"""kl_div and binary_cross_entropy on the CPU against PyTorch's float64 autograd."""

import numba
import numpy as np
import pytest

import fastxent

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-10, atol=1e-13)}


def _log_probs(rng, shape, axis):
    x = rng.normal(size=shape) * 2
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _layout(rng, layout, dtype):
    """(input, target probabilities, axis) of a layout; the target has zeros."""
    if layout == "rows":
        shape, axis = (6, 9), -1
    elif layout == "ncd":
        shape, axis = (3, 5, 4), 1
    elif layout == "flat":
        shape, axis = (11,), -1
    else:  # a transposed (strided) view
        shape, axis = (9, 6), 0
    x = _log_probs(rng, shape, axis)
    t = np.exp(_log_probs(rng, shape, axis))
    t[rng.uniform(size=shape) < 0.25] = 0.0
    x, t = x.astype(dtype), t.astype(dtype)
    if layout == "strided":
        x, t = x.T, t.T
        axis = 1
    return x, t, axis


def torch_kl(x, t, reduction, log_target, axis):
    """torch's loss and gradient in float64 (``batchmean`` over
    ``input.size(0)``, torch's own, whatever ``axis``)."""
    X = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    T = torch.tensor(np.asarray(t, np.float64))
    loss = F.kl_div(X, T, reduction=reduction, log_target=log_target)
    loss.sum().backward()
    return loss.detach().numpy(), X.grad.numpy()


def check(loss, grad, ref_loss, ref_grad, dtype):
    np.testing.assert_allclose(np.asarray(loss, np.float64), ref_loss, **TOL[dtype])
    np.testing.assert_allclose(np.asarray(grad, np.float64), ref_grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["rows", "ncd", "flat", "strided"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_against_torch(dtype, layout, reduction, log_target):
    rng = np.random.default_rng(hash((layout, reduction, log_target)) % 2**32)
    x, t, axis = _layout(rng, layout, dtype)
    if log_target:
        t = np.log(np.where(t == 0, 0.5, t)).astype(dtype)  # finite log targets
    with np.errstate(divide="ignore"):
        ref_loss, ref_grad = torch_kl(x, t, reduction, log_target, axis)
    loss, grad = fastxent.kl_div_with_grad(x, t, reduction=reduction, log_target=log_target,
                                           axis=axis)
    assert grad.dtype == dtype and grad.shape == x.shape
    assert np.asarray(loss).dtype == dtype
    check(loss, grad, ref_loss, ref_grad, dtype)
    np.testing.assert_array_equal(
        fastxent.kl_div(x, t, reduction=reduction, log_target=log_target, axis=axis), loss)


def test_kl_div_torch_meanings():
    """torch's own calls: elementwise mean, batchmean over size(0) of 2-D
    input, zeros in the target adding 0 (xlogy), -inf input where the target
    is 0 giving NaN as torch, and log-target -inf giving NaN as torch."""
    rng = np.random.default_rng(1)
    x, t, _ = _layout(rng, "rows", np.float64)
    t[0, :3] = 0.0
    x[0, 0] = -np.inf
    for reduction in ("mean", "batchmean", "none"):
        ref = F.kl_div(torch.tensor(x), torch.tensor(t), reduction=reduction).numpy()
        np.testing.assert_allclose(fastxent.kl_div(x, t, reduction=reduction), ref,
                                   rtol=1e-12, equal_nan=True)
    lt = np.log(rng.uniform(size=x.shape))
    lt[1, 1] = -np.inf
    ref = F.kl_div(torch.tensor(x), torch.tensor(lt), reduction="none", log_target=True).numpy()
    np.testing.assert_allclose(fastxent.kl_div(x, lt, reduction="none", log_target=True), ref,
                               rtol=1e-12, equal_nan=True)


def _bce_case(rng, shape, dtype):
    x = rng.uniform(size=shape)
    t = rng.uniform(size=shape)
    flat_x, flat_t = x.reshape(-1), t.reshape(-1)
    # exact 0 and 1 against every kind of target
    flat_x[:6] = [0.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    flat_t[:6] = [0.0, 1.0, 0.0, 1.0, 0.5, 0.5]
    return x.astype(dtype), t.astype(dtype)


def torch_bce(x, t, weight, reduction):
    X = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    W = None if weight is None else torch.tensor(np.asarray(weight, np.float64))
    loss = F.binary_cross_entropy(X, torch.tensor(np.asarray(t, np.float64)), weight=W,
                                  reduction=reduction)
    loss.sum().backward()
    return loss.detach().numpy(), X.grad.numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,weight_shape", [((5, 7), None), ((5, 7), (7,)),
                                                ((5, 7), (5, 1)), ((3, 4, 2), (3, 4, 2)),
                                                ((13,), None), ((), None)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_binary_cross_entropy_against_torch(dtype, shape, weight_shape, reduction):
    rng = np.random.default_rng(7)
    if shape == ():
        x, t = np.array(0.3, dtype), np.array(0.8, dtype)
    else:
        x, t = _bce_case(rng, shape, dtype)
    w = None if weight_shape is None else rng.uniform(0.5, 2, weight_shape).astype(dtype)
    ref_loss, ref_grad = torch_bce(x, t, w, reduction)
    loss, grad = fastxent.binary_cross_entropy_with_grad(x, t, weight=w, reduction=reduction)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    # the gradient at 0 and 1 is ~1e12: compare it relative to itself
    np.testing.assert_allclose(np.asarray(loss, np.float64), ref_loss, **TOL[dtype])
    np.testing.assert_allclose(np.asarray(grad, np.float64), ref_grad,
                               rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"])
    np.testing.assert_array_equal(
        fastxent.binary_cross_entropy(x, t, weight=w, reduction=reduction), loss)


@pytest.mark.parametrize("fn", ["kl", "bce"])
def test_parallel_path_matches_torch_and_thread_counts(fn):
    """One shape over the parallel threshold: torch's values, and the same
    bits with one thread as with all."""
    rng = np.random.default_rng(3)
    shape = (96, 1500)
    if fn == "kl":
        x, t, _ = _layout(rng, "rows", np.float32)
        x = _log_probs(rng, shape, -1).astype(np.float32)
        t = np.exp(_log_probs(rng, shape, -1)).astype(np.float32)
        call = lambda: fastxent.kl_div_with_grad(x, t, reduction="batchmean")  # noqa: E731
        ref = torch_kl(x, t, "batchmean", False, -1)
    else:
        x, t = _bce_case(rng, shape, np.float32)
        call = lambda: fastxent.binary_cross_entropy_with_grad(x, t)  # noqa: E731
        ref = torch_bce(x, t, None, "mean")
    loss, grad = call()
    check(loss, grad, *ref, np.float32)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        loss1, grad1 = call()
    finally:
        numba.set_num_threads(threads)
    assert loss1 == loss
    np.testing.assert_array_equal(grad1, grad)


@pytest.mark.parametrize("fn", ["kl", "bce"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inplace_and_out(fn, dtype):
    rng = np.random.default_rng(4)
    if fn == "kl":
        x, t, _ = _layout(rng, "rows", dtype)
        call = fastxent.kl_div_with_grad
    else:
        x, t = _bce_case(rng, (6, 9), dtype)
        call = fastxent.binary_cross_entropy_with_grad
    loss, grad = call(x, t, reduction="sum")
    out = np.empty_like(x)
    loss_o, grad_o = call(x, t, reduction="sum", out=out)
    assert grad_o is out
    np.testing.assert_array_equal(out, grad)
    assert loss_o == loss
    x_in = x.copy()
    loss_i, grad_i = call(x_in, t, reduction="sum", inplace=True)
    assert grad_i is x_in
    np.testing.assert_array_equal(x_in, grad)
    assert loss_i == loss


def test_kl_div_loss_object():
    rng = np.random.default_rng(5)
    x, t, _ = _layout(rng, "rows", np.float64)
    criterion = fastxent.KLDivLoss(reduction="batchmean")
    with pytest.raises(RuntimeError, match="backward"):
        criterion.backward()
    loss = criterion(x, t)
    ref_loss, ref_grad = torch_kl(x, t, "batchmean", False, -1)
    check(loss, criterion.backward(), ref_loss, ref_grad, np.float64)
    x_in = x.copy()
    criterion = fastxent.KLDivLoss(reduction="sum", log_target=True, inplace=True)
    criterion(x_in, np.log(t + 0.1))
    assert criterion.backward() is x_in
    with pytest.raises(ValueError, match="reduction must be"):
        fastxent.KLDivLoss(reduction="avg")


# -- bad inputs are refused before anything is written ------------------------

P = np.full((4, 3), 0.25)


@pytest.mark.parametrize("bad", [1.5, -0.25, np.nan])
@pytest.mark.parametrize("mode", ["plain", "out", "inplace"])
@pytest.mark.parametrize("n", [12, 1 << 17])  # serial and parallel check
def test_bce_input_outside_unit_refused_before_writes(bad, mode, n):
    x = np.full(n, 0.25)
    x[-1] = bad
    x0 = x.copy()
    out = np.full_like(x, 7.0) if mode == "out" else None
    with pytest.raises(ValueError, match=r"input must hold probabilities in \[0, 1\].*1 element"):
        fastxent.binary_cross_entropy_with_grad(x, np.zeros(n), out=out,
                                                inplace=mode == "inplace")
    np.testing.assert_array_equal(x, x0)
    if out is not None:
        assert np.all(out == 7.0)


@pytest.mark.parametrize("call,kw,exc,pattern", [
    ("kl", dict(target=np.zeros((4, 4))), ValueError, r"target shape \(4, 4\) must equal"),
    ("kl", dict(reduction="avg"), ValueError, r"'none', 'mean', 'sum' or 'batchmean'"),
    ("kl", dict(log_target="yes"), TypeError, r"log_target must be True or False"),
    ("kl", dict(axis=2), ValueError, r"axis 2 is out of range for input"),
    ("kl", dict(target=np.zeros((4, 3), complex)), TypeError, r"target must be real numbers"),
    ("bce", dict(target=np.zeros((3, 4))), ValueError, r"target shape \(3, 4\) must equal"),
    ("bce", dict(weight=np.ones(4)), ValueError, r"weight of shape \(4,\) does not broadcast"),
    ("bce", dict(weight=np.ones((2, 4, 3))), ValueError, r"weight of shape \(2, 4, 3\) would"),
    ("bce", dict(reduction="batchmean"), ValueError, r"reduction must be"),
])
@pytest.mark.parametrize("mode", ["plain", "out", "inplace"])
def test_bad_arguments_refused_before_writes(call, kw, exc, pattern, mode):
    kw = dict(kw)
    target = kw.pop("target", np.zeros((4, 3)))
    fn = fastxent.kl_div_with_grad if call == "kl" else fastxent.binary_cross_entropy_with_grad
    x = P.copy()
    out = np.full_like(x, 7.0) if mode == "out" else None
    with pytest.raises(exc, match=pattern):
        fn(x, target, out=out, inplace=mode == "inplace", **kw)
    np.testing.assert_array_equal(x, P)
    if out is not None:
        assert np.all(out == 7.0)


def test_inplace_needs_a_float_array():
    with pytest.raises(TypeError, match="inplace=True needs input as a float32 or float64"):
        fastxent.kl_div_with_grad(np.zeros((2, 3), np.int64), np.zeros((2, 3)), inplace=True)
    with pytest.raises(ValueError, match="out= or inplace=True, not both"):
        fastxent.binary_cross_entropy_with_grad(P.copy(), P, out=np.empty_like(P), inplace=True)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), ()])
def test_empty_and_scalar_inputs(shape):
    x, t, p = np.full(shape, -1.2), np.full(shape, 0.3), np.full(shape, 0.4)
    for reduction in ("none", "mean", "sum", "batchmean"):
        X = torch.tensor(x, requires_grad=True)
        loss_t = F.kl_div(X, torch.tensor(t), reduction=reduction)
        loss_t.sum().backward()
        loss, grad = fastxent.kl_div_with_grad(x, t, reduction=reduction)
        np.testing.assert_allclose(loss, loss_t.detach().numpy(), rtol=1e-12, equal_nan=True)
        np.testing.assert_allclose(grad, X.grad.numpy(), rtol=1e-12)
    for reduction in ("none", "mean", "sum"):
        loss, grad = fastxent.binary_cross_entropy_with_grad(p, t, reduction=reduction)
        ref_loss, ref_grad = torch_bce(p, t, None, reduction)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-12, equal_nan=True)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-12)


# -- float16 and bfloat16 (issue 19) --------------------------------------------
# computed in float32: held to float64 torch on the same (upcast) values with
# tests/test_half.py's bounds (loss 1e-5 relative, each 16-bit gradient element
# one ulp); a float32 out= holds the unrounded gradient.

from tests.parity import covering  # noqa: E402
from tests.test_half import BF16, F16, check_grad, check_loss  # noqa: E402

HALF_GRID = covering(dict(fn=["kl", "kl_log_target", "bce"], dtype=[F16, BF16],
                          layout=["rows", "ncd", "strided"],
                          reduction=["none", "mean", "sum", "batchmean"],
                          dest=["new", "out16", "out32", "inplace"],
                          weight=[None, "half", "float64"]), strength=2)


def _half_case(fn, dtype, layout, weight):
    """(x, t, w, axis) in 16 bits; BCE's inputs exclude 0 and 1 for float16,
    whose gradient there (~1e12) is beyond float16's range."""
    rng = np.random.default_rng(11)
    x, t, axis = _layout(rng, layout, np.float64)
    if fn == "kl_log_target":
        t = np.log(np.where(t == 0, 0.5, t))
    elif fn == "bce":
        x = rng.uniform(0.02, 0.98, size=x.shape[::-1]).T if layout == "strided" else \
            rng.uniform(0.02, 0.98, size=x.shape)
        if dtype == BF16:
            x[(0,) * x.ndim], x[(-1,) * x.ndim] = 0.0, 1.0
    w = None
    if fn == "bce" and weight is not None:
        w = rng.uniform(0.5, 2, x.shape[-1:]).astype(dtype if weight == "half" else np.float64)
    x, t = x.astype(dtype), t.astype(dtype)  # order "K": a transposed view stays one
    assert layout != "strided" or not x.flags.c_contiguous
    return x, t, w, axis


@pytest.mark.parametrize("case", HALF_GRID, ids=lambda c: "-".join(map(str, c.values())))
def test_half_against_torch(case):
    fn, dtype, reduction, dest = case["fn"], case["dtype"], case["reduction"], case["dest"]
    if fn == "bce" and reduction == "batchmean":
        reduction = "mean"
    x, t, w, axis = _half_case(fn, dtype, case["layout"], case["weight"])
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    if fn == "bce":
        ref_loss, ref_grad = torch_bce(x64, t64, None if w is None else w.astype(np.float64),
                                       reduction)
        call = lambda x_, **kw: fastxent.binary_cross_entropy_with_grad(  # noqa: E731
            x_, t, weight=w, reduction=reduction, **kw)
        loss_only = fastxent.binary_cross_entropy(x, t, weight=w, reduction=reduction)
    else:
        log_target = fn == "kl_log_target"
        ref_loss, ref_grad = torch_kl(x64, t64, reduction, log_target, axis)
        call = lambda x_, **kw: fastxent.kl_div_with_grad(  # noqa: E731
            x_, t, reduction=reduction, log_target=log_target, axis=axis, **kw)
        loss_only = fastxent.kl_div(x, t, reduction=reduction, log_target=log_target, axis=axis)
    x0 = x.copy()
    if dest == "inplace":
        x_in = x.copy()
        loss, grad = call(x_in, inplace=True)
        assert grad is x_in
    elif dest.startswith("out"):
        out = np.full(x.shape, np.nan, dtype if dest == "out16" else np.float32)
        loss, grad = call(x, out=out)
        assert grad is out
    else:
        loss, grad = call(x)
    check_loss(loss, ref_loss, reduction)
    np.testing.assert_array_equal(np.asarray(loss_only), np.asarray(loss))
    if dest == "out32":
        assert grad.dtype == np.float32
        np.testing.assert_allclose(grad, ref_grad, rtol=2e-6, atol=1e-7)
    else:
        check_grad(grad, ref_grad, dtype)
    if dest != "inplace":
        np.testing.assert_array_equal(x.view(np.uint16), x0.view(np.uint16))


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
def test_half_refusals_before_writes(dtype):
    """A 16-bit input outside [0, 1] (in place), an out= of the other 16-bit
    dtype, a read-only 16-bit input with inplace=True: refused, nothing written."""
    other = BF16 if dtype == F16 else F16
    x = np.full((3, 4), 0.25, dtype)
    x[2, 3] = 1.5
    x0 = x.copy()
    with pytest.raises(ValueError, match=r"in \[0, 1\].*1 element"):
        fastxent.binary_cross_entropy_with_grad(x, np.zeros((3, 4), dtype), inplace=True)
    np.testing.assert_array_equal(x.view(np.uint16), x0.view(np.uint16))
    out = np.full((3, 4), 7.0, other)
    with pytest.raises(TypeError, match=f"out has dtype {other}, expected {dtype}"):
        fastxent.kl_div_with_grad(x, x, out=out)
    assert np.all(out.astype(np.float32) == 7.0)
    x.flags.writeable = False
    with pytest.raises(ValueError, match="inplace=True but input is read-only"):
        fastxent.kl_div_with_grad(x, x, inplace=True)
