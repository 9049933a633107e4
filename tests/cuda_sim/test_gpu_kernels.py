"""The GPU backend against the parity table, under the CUDA simulator.

``test_parity_table`` runs every function of ``tests/parity.py``'s
``COMPARISONS`` on the GPU against the same torch twins, float64 reference
and tolerances as the CPU tests (``tests/test_torch_parity.py``), over a
covering array of the same grid (``parity.device_cases("cuda")``). Shapes
are tiny: the simulator runs every CUDA thread as a Python thread. C = 3
gives a thread per row, C = 12 a 4-thread "warp" per row, C = 40 the whole
8-thread block on a row (shuffles, then shared memory). The tests after it
are the GPU's own: rows kept in shared memory or (``SHARED_BYTES_CAP`` = 0)
read twice, the shared-memory opt-in, in place and ``out=``, strided device
arrays, errors, device selection; they compare with the table's twins.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

import fastxent
from fastxent import _cuda
from tests import parity
from tests.parity import COMPARISONS, CUDA, GPU_CLASSES, GRIDS, check_close, twin

CASES = parity.device_cases("cuda")
torch_ce = twin(fastxent.cross_entropy_with_grad)


def _host(a):
    return CUDA.get(a)


@pytest.mark.parametrize("fn,case", CASES, ids=parity.case_id)
def test_parity_table(fn, case):
    parity.check(fn, CUDA, **case)


def test_every_table_entry_runs_on_the_gpu():
    assert {f.__name__ for f in COMPARISONS} == parity.public_functions()
    assert {fn for fn, _ in CASES} == set(COMPARISONS)
    for fn, (_, _, kind) in COMPARISONS.items():
        grid = GRIDS[parity.CHECKS[kind]]
        cases = [c for f, c in CASES if f is fn]
        for name, values in grid.items():  # every value of every dimension, per function
            assert {repr(c[name]) for c in cases} == {repr(v) for v in values}, (fn, name)
        if "layout" in grid:  # a thread, a warp, a block per row
            assert {c["C"] for c in cases} == set(GPU_CLASSES), fn


# --------------------------------------------------------------------------
# Rows cached in shared memory or read twice, and the launch plans


@pytest.mark.parametrize("cache_bytes", [0, None])
@pytest.mark.parametrize("soft", [False, True])
def test_cross_entropy_large_rows_cached_or_not_in_place(cache_bytes, soft, monkeypatch):
    monkeypatch.setattr(_cuda, "SHARED_BYTES_CAP", cache_bytes)
    x, t, w, _, options = parity.target_problem("2d", np.float64,
                                                "soft" if soft else "hard_ignored", seed=7, C=40)
    kw = dict(weight=w, label_smoothing=0.1, **options)
    ref_loss, ref_grad = torch_ce(x, t, **kw)
    xd = cuda.to_device(x)
    loss, grad = fastxent.cross_entropy_with_grad(xd, cuda.to_device(t), weight=cuda.to_device(w),
                                                  label_smoothing=0.1, inplace=True, **options)
    check_close(loss, ref_loss, np.float64, "loss")
    check_close(_host(xd), ref_grad, np.float64, "grad")  # written over the logits
    assert grad is xd


def _record_plans(monkeypatch):
    """The launch plans of the row kernels, in order."""
    plans = []
    plan = _cuda.plan_row_launch

    def recording(*args, **kwargs):
        plans.append(plan(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(_cuda, "plan_row_launch", recording)
    return plans


@pytest.mark.parametrize("refused", [False, True])
@pytest.mark.parametrize("soft", [False, True])
def test_rows_above_the_default_shared_limit_opt_in_or_fall_back(soft, refused, monkeypatch):
    """A default limit of 600 bytes makes the 40-class float64 rows (320 or
    640 bytes, plus 512 of scratch) need the opt-in: they run cached with the
    wide block of 16 threads, or, when the opt-in is refused, uncached."""
    monkeypatch.setattr(_cuda, "DEFAULT_BLOCK_SHARED_BYTES", 600)
    if refused:
        monkeypatch.setattr(_cuda, "_opt_in_shared", lambda *args: 0)
    plans = _record_plans(monkeypatch)
    x, t, _, _ = parity.problem("2d", np.float64, soft, seed=8, C=40)
    ref_loss, ref_grad = torch_ce(x, t, label_smoothing=0.1)
    loss, grad = fastxent.cross_entropy_with_grad(cuda.to_device(x), cuda.to_device(t),
                                                  label_smoothing=0.1)
    check_close(loss, ref_loss, np.float64, "loss")
    check_close(_host(grad), ref_grad, np.float64, "grad")
    last = plans[-1]
    if refused:
        assert not last.cached and last.threads == 8, plans
    else:
        assert last.opt_in and last.cached and last.threads == last.group == 16, plans
        assert last.shared_bytes == (2 if soft else 1) * 40 * 8
    probs = fastxent.softmax(cuda.to_device(x))
    check_close(_host(probs), twin(fastxent.softmax)(x), np.float64, "softmax")
    assert plans[-1].cached != refused and plans[-1].threads == (8 if refused else 16)


# --------------------------------------------------------------------------
# out= and in place


def test_cross_entropy_loss_only_and_out():
    x, y, _, _ = parity.problem("2d", np.float32, False, seed=3, C=12)
    ref_loss, ref_grad = torch_ce(x, y)
    check_close(fastxent.cross_entropy(cuda.to_device(x), cuda.to_device(y)), ref_loss,
                np.float32, "loss")
    out = cuda.to_device(np.full_like(x, 7.0))
    loss, grad = fastxent.cross_entropy_with_grad(cuda.to_device(x), cuda.to_device(y), out=out)
    assert grad is out
    check_close(loss, ref_loss, np.float32, "loss")
    check_close(_host(out), ref_grad, np.float32, "grad")


@pytest.mark.parametrize("C", [3, 40])
@pytest.mark.parametrize("fn", [fastxent.log_softmax, fastxent.softmax],
                         ids=lambda f: f.__name__)
def test_softmax_out_and_in_place(fn, C):
    x, _, _, axis = parity.problem("ncdd", np.float32, False, seed=C, C=C)
    expect = np.moveaxis(twin(fn)(np.moveaxis(x, axis, -1)), -1, axis)
    out = cuda.to_device(np.full_like(x, 7.0))
    assert fn(cuda.to_device(x), axis=axis, out=out) is out
    check_close(_host(out), expect, np.float32, fn.__name__)
    xd = cuda.to_device(x)
    assert fn(xd, axis=axis, out=xd) is xd
    check_close(_host(xd), expect, np.float32, fn.__name__)


def test_nonfinite_rows_match_cpu():
    x = np.array([[0.0, np.inf, 1.0], [np.nan, 0.0, 1.0], [-np.inf] * 3, [1.0, 2.0, -np.inf]])
    y = np.array([0, 1, 2, 1])
    cpu = fastxent.cross_entropy_with_grad(x, y, reduction="none", device="cpu")
    gpu = fastxent.cross_entropy_with_grad(x, y, reduction="none", device="cuda")
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(b, a, rtol=1e-12)
    lse = fastxent.logsumexp(x, device="cuda")
    np.testing.assert_allclose(lse, twin(fastxent.logsumexp)(x), rtol=1e-12)


# --------------------------------------------------------------------------
# Errors before any write, and device selection


def test_target_out_of_range_raises_before_any_write():
    x = np.arange(12.0).reshape(4, 3)
    xd = cuda.to_device(x)
    out = cuda.to_device(np.full_like(x, 5.0))
    with pytest.raises(IndexError, match="target 3 at position \\(2,\\)"):
        fastxent.cross_entropy_with_grad(xd, cuda.to_device(np.array([0, 1, 3, 0])), out=out)
    with pytest.raises(IndexError):
        fastxent.cross_entropy_with_grad(xd, cuda.to_device(np.array([0, -1, 0, 0])),
                                         inplace=True)
    np.testing.assert_array_equal(xd.copy_to_host(), x)
    np.testing.assert_array_equal(out.copy_to_host(), 5.0)
    with pytest.raises(IndexError):
        fastxent.nll_loss(xd, cuda.to_device(np.array([0, 1, 9, 0])))


def test_bad_shapes_and_options_raise():
    xd = cuda.to_device(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="batch shape"):
        fastxent.cross_entropy(xd, cuda.to_device(np.zeros(3, dtype=np.int64)))
    with pytest.raises(ValueError, match="label_smoothing"):
        fastxent.cross_entropy(xd, cuda.to_device(np.zeros(4, dtype=np.int64)),
                               label_smoothing=2.0)
    with pytest.raises(ValueError, match="expected"):
        fastxent.softmax(xd, out=cuda.to_device(np.zeros((3, 4))))


def test_device_selection():
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 0])
    xd, yd = cuda.to_device(x), cuda.to_device(y)
    cpu_loss, cpu_grad = fastxent.cross_entropy_with_grad(x, y)
    # auto: device arrays in, device arrays out (the loss a host scalar)
    loss, grad = fastxent.cross_entropy_with_grad(xd, yd)
    assert cuda.devicearray.is_cuda_ndarray(grad) and isinstance(loss, np.float32)
    np.testing.assert_allclose(grad.copy_to_host(), cpu_grad, rtol=1e-5, atol=1e-7)
    assert cuda.devicearray.is_cuda_ndarray(fastxent.logsumexp(xd))
    # cuda with host arrays: copied over, NumPy results; inplace writes back
    loss, grad = fastxent.cross_entropy_with_grad(x, y, device="cuda")
    assert isinstance(grad, np.ndarray)
    np.testing.assert_allclose(grad, cpu_grad, rtol=1e-5, atol=1e-7)
    x2 = x.copy()
    loss, grad = fastxent.cross_entropy_with_grad(x2, y, device="cuda", inplace=True)
    assert grad is x2
    np.testing.assert_allclose(x2, cpu_grad, rtol=1e-5, atol=1e-7)
    assert isinstance(fastxent.cross_entropy(x, y, reduction="none", device="cuda"), np.ndarray)
    # mixed, or GPU arrays with device="cpu": refused
    with pytest.raises(ValueError, match="some inputs are on the GPU"):
        fastxent.cross_entropy(xd, y)
    with pytest.raises(ValueError, match="device='cpu'"):
        fastxent.cross_entropy(xd, yd, device="cpu")
    with pytest.raises(ValueError, match="device must be"):
        fastxent.cross_entropy(x, y, device="gpu")


def test_conversions_and_edge_shapes():
    rng = np.random.default_rng(2)
    # integer logits compute in float64; float64 probabilities for float32
    # logits are converted on the device (as on the CPU)
    xi = rng.integers(-3, 3, (4, 5))
    y = np.array([0, 4, 2, 1])
    np.testing.assert_allclose(
        fastxent.cross_entropy(cuda.to_device(xi), cuda.to_device(y)),
        twin(fastxent.cross_entropy)(xi.astype(np.float64), y), rtol=1e-12)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    q = rng.random((4, 5))
    q /= q.sum(1, keepdims=True)
    cpu = fastxent.cross_entropy(x, q)
    gpu = fastxent.cross_entropy(cuda.to_device(x), cuda.to_device(q))
    assert gpu.dtype == np.float32
    np.testing.assert_allclose(gpu, cpu, rtol=1e-6)
    # a single row (1-D logits): a 0-d result for reduction="none"
    one = fastxent.cross_entropy(x[0], np.int64(2), reduction="none", device="cuda")
    np.testing.assert_allclose(one, twin(fastxent.cross_entropy)(x[:1], np.array([2])),
                               rtol=1e-6)
    # no rows: mean is NaN, sum is 0, as in PyTorch
    empty = cuda.to_device(np.zeros((0, 5)))
    no_y = cuda.to_device(np.zeros(0, dtype=np.int64))
    assert np.isnan(fastxent.cross_entropy(empty, no_y))
    assert fastxent.cross_entropy(empty, no_y, reduction="sum") == 0.0
    # logsumexp over an empty axis is -inf
    lse = fastxent.logsumexp(cuda.to_device(np.zeros((3, 0))))
    np.testing.assert_array_equal(lse.copy_to_host(), np.full(3, -np.inf))
    # 0-d BCE
    loss, grad = fastxent.binary_cross_entropy_with_logits_with_grad(
        np.float64(0.3), np.float64(1.0), reduction="none", device="cuda")
    ref_loss, ref_grad = twin(fastxent.binary_cross_entropy_with_logits_with_grad)(
        np.float64(0.3), np.float64(1.0))
    assert loss.shape == () and grad.shape == ()
    np.testing.assert_allclose([loss, grad], [ref_loss, ref_grad], rtol=1e-12)


# --------------------------------------------------------------------------
# Strided (non-contiguous) device arrays: gathered, and scattered back into


@pytest.mark.parametrize("C", [12, 40])
def test_strided_logits_targets_and_weights(C):
    """Column slices and a transpose (class axis 0) of device arrays, with
    strided targets and weights, give torch's loss and gradient."""
    rng = np.random.default_rng(20 + C)
    base = rng.standard_normal((5, 2 * C)).astype(np.float32)
    y = rng.integers(0, C, 10)
    w = rng.random(2 * C).astype(np.float32) + 0.5
    xd, yd, wd = cuda.to_device(base), cuda.to_device(y), cuda.to_device(w)
    assert not xd[:, ::2].is_c_contiguous()
    loss, grad = fastxent.cross_entropy_with_grad(xd[:, ::2], yd[::2], weight=wd[1::2],
                                                  label_smoothing=0.1)
    ref, ref_grad = torch_ce(base[:, ::2], y[::2], weight=w[1::2], label_smoothing=0.1)
    check_close(loss, ref, np.float32, "loss")
    check_close(_host(grad), ref_grad, np.float32, "grad")
    # the transpose of a (2C, 5) array, classes along axis 0
    xt = cuda.to_device(np.ascontiguousarray(base[:, :C].T))
    losses = fastxent.cross_entropy(xt.T, yd[:5], axis=-1, reduction="none")
    check_close(_host(losses), torch_ce(base[:, :C], y[:5], reduction="none")[0], np.float32,
                "loss")
    losses = fastxent.cross_entropy(xt, yd[:5], axis=0, reduction="none")
    check_close(_host(losses), torch_ce(base[:, :C], y[:5], reduction="none")[0], np.float32,
                "loss")


def test_strided_class_probabilities_and_kdim_layout():
    rng = np.random.default_rng(23)
    base = rng.standard_normal((3, 12, 4)).astype(np.float64)
    q = rng.random((3, 12, 4))
    q /= q.sum(axis=1, keepdims=True)
    xd, qd = cuda.to_device(base), cuda.to_device(q)
    # (N, C, d) = (3, 12, 2) views, classes on axis 1
    loss, grad = fastxent.cross_entropy_with_grad(xd[:, :, ::2], qd[:, :, 1::2], axis=1)
    ref, ref_grad = torch_ce(base[:, :, ::2], q[:, :, 1::2], axis=1)
    check_close(loss, ref, np.float64, "loss")
    check_close(_host(grad), ref_grad, np.float64, "grad")


@pytest.mark.parametrize("C", [12, 40])
def test_in_place_and_out_into_strided_views(C):
    """The gradient is scattered into the view; the rest of its array is
    untouched."""
    rng = np.random.default_rng(30 + C)
    base = rng.standard_normal((5, 2 * C))
    y = rng.integers(0, C, 5)
    ref, ref_grad = torch_ce(base[:, 1::2], y, reduction="sum")
    xd = cuda.to_device(base)
    view = xd[:, 1::2]
    loss, grad = fastxent.cross_entropy_with_grad(view, cuda.to_device(y), reduction="sum",
                                                  inplace=True)
    assert grad is view
    check_close(loss, ref, np.float64, "loss")
    after = xd.copy_to_host()
    check_close(after[:, 1::2], ref_grad, np.float64, "grad")
    np.testing.assert_array_equal(after[:, ::2], base[:, ::2])
    # out= a strided view of another array
    out_base = cuda.to_device(np.full((5, 2 * C), 7.0))
    out = out_base[:, ::2]
    loss, grad = fastxent.cross_entropy_with_grad(cuda.to_device(base)[:, 1::2],
                                                  cuda.to_device(y), reduction="sum", out=out)
    assert grad is out
    after = out_base.copy_to_host()
    check_close(after[:, ::2], ref_grad, np.float64, "grad")
    np.testing.assert_array_equal(after[:, 1::2], 7.0)


def test_strided_destinations_untouched_on_error():
    base = np.arange(24.0).reshape(4, 6)
    xd = cuda.to_device(base)
    out_base = cuda.to_device(np.full((4, 6), 5.0))
    bad = cuda.to_device(np.array([0, 1, 3, 0]))
    with pytest.raises(IndexError, match="target 3"):
        fastxent.cross_entropy_with_grad(xd[:, ::2], bad, inplace=True)
    with pytest.raises(IndexError, match="target 3"):
        fastxent.cross_entropy_with_grad(xd[:, ::2], bad, out=out_base[:, 1::2])
    np.testing.assert_array_equal(xd.copy_to_host(), base)
    np.testing.assert_array_equal(out_base.copy_to_host(), 5.0)


@pytest.mark.parametrize("log", [False, True])
def test_softmax_and_logsumexp_of_strided_views(log):
    rng = np.random.default_rng(40)
    base = rng.standard_normal((4, 6, 3))
    fn = fastxent.log_softmax if log else fastxent.softmax
    xd = cuda.to_device(base)
    view = xd.transpose((2, 0, 1))[:, ::2]  # (3, 2, 6), classes last
    expect = base.transpose(2, 0, 1)[:, ::2]
    check_close(_host(fn(view)), twin(fn)(expect), np.float64, fn.__name__)
    check_close(_host(fastxent.logsumexp(view, axis=1)),
                twin(fastxent.logsumexp)(expect, axis=1), np.float64, "logsumexp")
    fn(view, out=view)  # in place, through a contiguous copy
    after = xd.copy_to_host()
    check_close(after.transpose(2, 0, 1)[:, ::2], twin(fn)(expect), np.float64, fn.__name__)
    np.testing.assert_array_equal(after[1::2], base[1::2])


def test_bce_with_strided_inputs_and_out():
    rng = np.random.default_rng(41)
    x = rng.standard_normal((4, 10)) * 3
    t = rng.random((4, 10))
    w = rng.random((4, 10))
    xd, td, wd = cuda.to_device(x), cuda.to_device(t), cuda.to_device(w)
    out_base = cuda.to_device(np.zeros((4, 10)))
    loss, grad = fastxent.binary_cross_entropy_with_logits_with_grad(
        xd[:, ::2], td[:, 1::2], weight=wd[:, ::2], out=out_base[:, 1::2])
    ref, ref_grad = twin(fastxent.binary_cross_entropy_with_logits_with_grad)(
        x[:, ::2], t[:, 1::2], weight=w[:, ::2])
    check_close(loss, ref, np.float64, "loss")
    after = out_base.copy_to_host()
    check_close(after[:, 1::2], ref_grad, np.float64, "grad")
    np.testing.assert_array_equal(after[:, ::2], 0.0)


def test_broadcast_class_probabilities():
    """A zero-stride view (as torch's ``expand`` exports), made in the
    simulator by wrapping a broadcast NumPy view of a device array."""
    rng = np.random.default_rng(42)
    x = rng.standard_normal((5, 12))
    q = rng.random(12)
    q /= q.sum()
    qd = cuda.to_device(q)
    expanded = type(qd)(np.broadcast_to(qd._ary, (5, 12)))
    assert expanded.strides == (0, 8)
    loss, grad = fastxent.cross_entropy_with_grad(cuda.to_device(x), expanded)
    ref, ref_grad = torch_ce(x, np.broadcast_to(q, (5, 12)))
    check_close(loss, ref, np.float64, "loss")
    check_close(_host(grad), ref_grad, np.float64, "grad")
