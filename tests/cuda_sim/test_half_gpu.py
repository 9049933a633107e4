"""float16 and bfloat16 logits on the GPU (issue 19), under the CUDA simulator.

The GPU kernels read the 16-bit values, compute in float32 and round their
16-bit results to nearest even, as the CPU does, so each case is held to the
CPU's 16-bit result on the same inputs: losses (float32) within float32
rounding of a different summation order (``SUM_ORDER``), each 16-bit
element within one unit in the last place of the CPU's (or, where terms
cancel, within ``CANCEL`` of the largest, the bound the CPU tests allow
against float64), a float32 ``out=`` within float32 rounding. The float64
PyTorch twins of ``tests/test_half.py`` hold the GPU to the same bounds as
the CPU tests hold the CPU. The cases are a 2-wise
covering array (``parity.covering``) of the CPU half tests' grid: dtype,
layout, C (a thread, a "warp", a block per row), target kind, weights,
smoothing, reduction, the LLM options, and the gradient's destination.
``nll_loss`` and ``binary_cross_entropy_with_logits`` are held the same way
to the CPU and to float64 (``tests/reference.py``), BCE over a 2-wise
covering array of shape, weights, reduction, destination and the dtype of
its target and weights. The softmax Jacobian family runs on tiny shapes,
held the same way to the CPU's 16-bit results and to
``tests/jacobian_parity.py``'s float64 twins.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from numba import cuda

import fastxent
from fastxent import _cuda
from fastxent import _cuda_kernels as K
from tests import jacobian_parity as jp
from tests import parity
from tests import reference as ref
from tests.parity import (BCE_SHAPES, BCE_WEIGHTS, GPU_CLASSES, HARD_TARGETS, LAYOUTS,
                          LLM_OPTIONS, REDUCTIONS, SMOOTHINGS, TARGETS)
from tests.test_half import (CANCEL, HALF, IDS, LOSS_RTOL, check_float32, check_grad, check_loss,
                             half_backward_problem, half_hvp_problem, half_problem, ulp)

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
#: float32 losses of the two devices: the same row values summed in another order
SUM_ORDER = 1e-6
DESTINATIONS = ["new", "inplace", "out16", "out32"]


def put(a):
    """A host array as a device array (16-bit floats copied as their bits)."""
    if a is None or not isinstance(a, np.ndarray):
        return a
    a = np.ascontiguousarray(a)
    if a.dtype in (F16, BF16):
        return cuda.to_device(a.view(np.uint16)).view(a.dtype)
    return cuda.to_device(a)


def get(a):
    return _cuda._to_host(a) if hasattr(a, "copy_to_host") else a


def within_one_ulp(ours, cpu, dtype, what):
    """16-bit ``ours`` and ``cpu``: same dtype, each element within one ulp
    of the CPU's, or, where terms cancel (the float32 arithmetic's order
    differs), within ``CANCEL`` of the largest magnitude, as ``check_grad``."""
    assert ours.dtype == dtype and cpu.dtype == dtype, (what, ours.dtype, cpu.dtype)
    a, b = ours.astype(np.float64), cpu.astype(np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    bound = np.maximum(ulp(b, dtype), CANCEL * np.max(np.abs(b), initial=0.0, where=~np.isnan(b)))
    close = np.abs(a - b) <= bound
    assert (same | close).all(), (what, a[~(same | close)][:4], b[~(same | close)][:4])


def _destination(dest, x, on_gpu):
    """The keyword arguments for a gradient ``dest`` ("new", "inplace",
    "out16" of ``x``'s dtype, "out32") and the ``out=`` array (or None),
    on the device where ``on_gpu``."""
    if dest == "inplace":
        return {"inplace": True}, None
    if dest in ("out16", "out32"):
        host = np.full(x.shape, np.nan, x.dtype if dest == "out16" else np.float32)
        out = put(host) if on_gpu else host
        return {"out": out}, out
    return {}, None


def _call(x, y, axis, kw, dest, on_gpu):
    """cross_entropy_with_grad into ``dest``; (loss, grad, stats or None) on the host."""
    x = x.copy()
    if on_gpu:
        xd, yd = put(x), put(y)
        kw = {k: put(v) for k, v in kw.items()}
    else:
        xd, yd = x, y
    extra, out = _destination(dest, x, on_gpu)
    result = fastxent.cross_entropy_with_grad(xd, yd, axis=axis, **kw, **extra)
    loss, grad = result[0], result[1]
    if dest == "inplace":
        assert grad is xd
    elif out is not None:
        assert grad is out
    if on_gpu:
        assert _cuda._is_numba_array(grad), type(grad)
        if kw.get("reduction") == "none":
            assert _cuda._is_numba_array(loss) and loss.dtype == np.float32, loss.dtype
        else:
            assert type(loss) is np.float32, type(loss)
    return get(loss), get(grad), (result[2] if len(result) > 2 else None)


CE_CASES = parity.covering(dict(dtype=HALF, layout=list(LAYOUTS), C=GPU_CLASSES, target=TARGETS,
                                weighted=[False, True], smoothing=SMOOTHINGS,
                                reduction=REDUCTIONS, dest=DESTINATIONS,
                                llm=[None] + list(LLM_OPTIONS)), strength=2)


def _case_id(case):
    return "-".join(f"{IDS[HALF.index(v)]}" if k == "dtype" else f"{k}={v}"
                    for k, v in case.items())


@pytest.mark.parametrize("case", CE_CASES, ids=_case_id)
def test_cross_entropy_matches_the_cpu(case):
    dtype, dest, llm = case["dtype"], case["dest"], case["llm"]
    (x, y, w), (x64, y64, w64), axis, options = half_problem(case["layout"], dtype,
                                                             case["target"], case["C"])
    kw = dict(reduction=case["reduction"], label_smoothing=case["smoothing"],
              weight=w if case["weighted"] else None, **options, **LLM_OPTIONS.get(llm, {}))
    g_loss, g_grad, g_stats = _call(x, y, axis, kw, dest, on_gpu=True)
    c_loss, c_grad, c_stats = _call(x, y, axis, kw, dest, on_gpu=False)
    np.testing.assert_allclose(g_loss, c_loss, rtol=SUM_ORDER, atol=1e-7, err_msg="loss")
    if dest == "out32":
        assert g_grad.dtype == np.float32
        np.testing.assert_allclose(g_grad, c_grad, rtol=1e-5, atol=1e-7, err_msg="grad")
    else:
        within_one_ulp(g_grad, c_grad, dtype, "grad")
    # and both as the CPU's 16-bit tests hold the CPU, against float64 torch
    t_kw = {k: v for k, v in kw.items() if k != "return_stats"}
    t_kw["weight"] = w64 if case["weighted"] else None
    if llm is None:
        t_loss, t_grad = parity.torch_ce(x64, y64, axis=axis, **t_kw)
    else:
        t_loss, t_grad, t_lse, _ = parity.torch_ce_options(x64, y64, axis=axis, **t_kw)
    check_loss(np.float32(g_loss) if case["reduction"] != "none" else g_loss, t_loss,
               case["reduction"])
    if dest != "out32":
        check_grad(g_grad, t_grad, dtype)
    if g_stats is not None:
        assert get(g_stats.lse).dtype == np.float32
        np.testing.assert_allclose(get(g_stats.lse), c_stats.lse, rtol=SUM_ORDER)
        np.testing.assert_array_equal(get(g_stats.predicted), c_stats.predicted)


def test_cross_entropy_cases_cover_the_grid():
    """Every value of every dimension runs at least once (2-wise: every pair)."""
    dims = dict(dtype=HALF, layout=list(LAYOUTS), C=GPU_CLASSES, target=TARGETS,
                dest=DESTINATIONS, llm=[None] + list(LLM_OPTIONS))
    for name, values in dims.items():
        assert {repr(c[name]) for c in CE_CASES} == {repr(v) for v in values}, name


@pytest.mark.parametrize("cache_bytes", [0, None])
@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_block_rows_cached_or_read_twice(dtype, cache_bytes, monkeypatch):
    """C = 40: the whole block on a row, the row kept in shared memory (as
    float32) or read twice from the 16-bit logits; soft 16-bit targets."""
    monkeypatch.setattr(_cuda, "SHARED_BYTES_CAP", cache_bytes)
    for target in ("hard_ignored", "soft"):
        (x, y, w), _, axis, options = half_problem("2d", dtype, target, 40)
        kw = dict(weight=w, label_smoothing=0.1, softcap=3.0, **options)
        g_loss, g_grad, _ = _call(x, y, axis, kw, "inplace", on_gpu=True)
        c_loss, c_grad, _ = _call(x, y, axis, kw, "inplace", on_gpu=False)
        np.testing.assert_allclose(g_loss, c_loss, rtol=SUM_ORDER)
        within_one_ulp(g_grad, c_grad, dtype, target)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_loss_only_host_inputs_and_strided_views(dtype):
    """cross_entropy; host 16-bit arrays with device="cuda" (NumPy results
    of the logits' dtype); a transposed device view written in place."""
    (x, y, w), (x64, y64, w64), _, _ = half_problem("2d", dtype, "hard", 12)
    loss = fastxent.cross_entropy(put(x), put(y), weight=put(w))
    assert type(loss) is np.float32
    np.testing.assert_allclose(loss, fastxent.cross_entropy(x, y, weight=w), rtol=SUM_ORDER)
    loss, grad = fastxent.cross_entropy_with_grad(x, y, weight=w, device="cuda")
    c_loss, c_grad = fastxent.cross_entropy_with_grad(x, y, weight=w)
    assert isinstance(grad, np.ndarray)
    np.testing.assert_allclose(loss, c_loss, rtol=SUM_ORDER)
    within_one_ulp(grad, c_grad, dtype, "host")
    base = put(np.ascontiguousarray(x.T))
    view = base.T  # x's values, strided along the classes
    loss, grad = fastxent.cross_entropy_with_grad(view, put(y), weight=put(w), inplace=True)
    assert grad is view
    np.testing.assert_allclose(loss, c_loss, rtol=SUM_ORDER)
    within_one_ulp(get(base).T, c_grad, dtype, "strided in place")


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
@pytest.mark.parametrize("layout,C", [(lay, 12) for lay in LAYOUTS] + [("2d", 3), ("2d", 40)])
def test_softmax_family_matches_the_cpu(dtype, layout, C):
    """softmax and log_softmax new, into 16-bit and float32 ``out=``, in
    place; logsumexp in float32."""
    (x, _, _), (x64, _, _), axis, _ = half_problem(layout, dtype, "hard", C)
    for fn, reference in ((fastxent.softmax, ref.softmax),
                          (fastxent.log_softmax, ref.log_softmax)):
        cpu = fn(x, axis=axis)
        ours = get(fn(put(x), axis=axis))
        within_one_ulp(ours, cpu, dtype, fn.__name__)
        check_grad(ours, reference(x64, axis=axis), dtype, fn.__name__)
        out = put(np.empty(x.shape, dtype))
        assert fn(put(x), axis=axis, out=out) is out
        within_one_ulp(get(out), cpu, dtype, fn.__name__ + " out=")
        out32 = put(np.empty(x.shape, np.float32))
        fn(put(x), axis=axis, out=out32)
        np.testing.assert_allclose(get(out32), fn(x, axis=axis, out=np.empty(x.shape, np.float32)),
                                   rtol=1e-6, atol=1e-7)
        xd = put(x)
        assert fn(xd, axis=axis, out=xd) is xd
        within_one_ulp(get(xd), cpu, dtype, fn.__name__ + " in place")
    lse = get(fastxent.logsumexp(put(x), axis=axis))
    assert lse.dtype == np.float32
    np.testing.assert_allclose(lse, fastxent.logsumexp(x, axis=axis), rtol=SUM_ORDER)


@pytest.mark.parametrize("dtype,axes,keepdims", [(F16, (0, 2), True), (BF16, (), False)],
                         ids=["f16-02-keep", "bf16-none"])
def test_logsumexp_over_axes_matches_the_cpu(dtype, axes, keepdims):
    """logsumexp over a tuple of axes reads 16-bit on the GPU, float32 out."""
    x = (np.random.default_rng(6).standard_normal((2, 3, 4)) * 4).astype(dtype)
    got = get(fastxent.logsumexp(put(x), axes, keepdims=keepdims))
    cpu = fastxent.logsumexp(x, axes, keepdims=keepdims)
    assert got.dtype == np.float32 and got.shape == cpu.shape
    np.testing.assert_allclose(got, cpu, rtol=SUM_ORDER)


def test_rounding_is_to_nearest_even():
    """The 16-bit gradient is the float32 gradient (a float32 ``out=``)
    rounded as ml_dtypes and NumPy round it, bit for bit."""
    x, y, _, _ = parity.problem("2d", np.float32, soft=False, C=40)
    for dtype in HALF:
        xh = x.astype(dtype)
        _, g16 = fastxent.cross_entropy_with_grad(put(xh), put(y), reduction="sum")
        out = put(np.empty(x.shape, np.float32))
        fastxent.cross_entropy_with_grad(put(xh), put(y), reduction="sum", out=out)
        np.testing.assert_array_equal(get(g16).view(np.uint16),
                                      get(out).astype(dtype).view(np.uint16))


def test_device_conversions_match_ml_dtypes_and_numpy():
    """The kernels' conversions (``_cuda_kernels._io``), bit for bit: every
    16-bit value widened, float32 values at and around each rounding tie,
    NaN, infinities, overflow, subnormals narrowed."""
    rng = np.random.default_rng(3)
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ties = rng.integers(0, 1 << 16, 512, dtype=np.uint32) << 16
    f16_ties = (rng.integers(0, 1 << 32, 512, dtype=np.uint64).astype(np.uint32)
                & ~np.uint32(0x1fff)) | 0x1000
    values = np.concatenate([ties | 0x8000, ties | 0x7fff, ties | 0x8001, f16_ties,
                             rng.integers(0, 1 << 32, 512, dtype=np.uint64).astype(np.uint32)])
    values = np.concatenate([values.view(np.float32),
                             np.float32([np.nan, np.inf, -np.inf, 7e4, -7e4, 1e-8, 3e38, 6e-8,
                                         -0.0])])
    for dtype in HALF:
        halves = every.view(dtype)
        wide = cuda.device_array(every.size, np.float32)
        K.widen(dtype.name)[64, 8](put(halves).view(np.uint16) if dtype == BF16 else put(halves),
                                   wide)
        np.testing.assert_array_equal(wide.copy_to_host(), halves.astype(np.float32))
        narrow = put(np.zeros(values.size, dtype))
        _store_kernel(dtype.name)[64, 8](cuda.to_device(values), narrow.view(np.uint16)
                                         if dtype == BF16 else narrow)
        ours = get(narrow)
        with np.errstate(all="ignore"):
            expect = values.astype(dtype)
        nan = np.isnan(values)
        np.testing.assert_array_equal(ours.view(np.uint16)[~nan], expect.view(np.uint16)[~nan])
        assert np.isnan(ours.astype(np.float32)[nan]).all()


def _store_kernel(storage):
    store = K._io(storage, np.float32)[1]

    @cuda.jit
    def kernel(values, dst):
        for i in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
            store(dst, i, values[i])

    return kernel


# --------------------------------------------------------------------------
# the softmax Jacobian family: 16-bit arrays read and written as they are

#: (layout, C, SHARED_BYTES_CAP): a thread, a "warp" and the block on a row,
#: the block's rows kept in shared memory (None) or read twice (0)
JACOBIAN_CASES = [("2d", 3, None), ("ncd", 12, None), ("axis0", 40, None), ("2d", 40, 0)]


def _jacobian_id(case):
    layout, C, cap = case
    return f"{layout}-C{C}" + ("-read_twice" if cap == 0 else "")


@pytest.mark.parametrize("case", JACOBIAN_CASES, ids=_jacobian_id)
@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_softmax_backward_matches_the_cpu(dtype, case, monkeypatch):
    """softmax_backward and log_softmax_backward new, into 16-bit and
    float32 ``out=``, in place, and with a float32 output beside the 16-bit
    grad_output."""
    layout, C, cap = case
    monkeypatch.setattr(_cuda, "SHARED_BYTES_CAP", cap)
    for log in (False, True):
        fn = fastxent.log_softmax_backward if log else fastxent.softmax_backward
        g, o, axis, expect = half_backward_problem(layout, dtype, log, C)
        cpu = fn(g, o, axis=axis)
        ours = fn(put(g), put(o), axis=axis)
        assert _cuda._is_numba_array(ours)
        within_one_ulp(get(ours), cpu, dtype, f"{fn.__name__} new")
        check_grad(get(ours), expect, dtype, fn.__name__)
        out = put(np.full(g.shape, np.nan, dtype))
        assert fn(put(g), put(o), axis=axis, out=out) is out
        within_one_ulp(get(out), cpu, dtype, f"{fn.__name__} out=")
        out32 = put(np.full(g.shape, np.nan, np.float32))
        assert fn(put(g), put(o), axis=axis, out=out32) is out32
        check_float32(get(out32), expect, f"{fn.__name__} out32")
        gd = put(g)
        assert fn(gd, put(o), axis=axis, inplace=True) is gd
        within_one_ulp(get(gd), cpu, dtype, f"{fn.__name__} in place")
        mixed = get(fn(put(g), put(o.astype(np.float32)), axis=axis))
        within_one_ulp(mixed, cpu, dtype, f"{fn.__name__} float32 output")


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
@pytest.mark.parametrize("layout,C", [("2d", 3), ("ncd", 5), ("axis0", 12)])
def test_softmax_jacobian_matches_the_cpu(dtype, layout, C):
    x, _, axis = jp.inputs(layout, np.float32, C=C)
    x = x.astype(dtype)
    x.flat[0] = 60.0
    cpu = fastxent.softmax_jacobian(x, axis=axis)
    ours = get(fastxent.softmax_jacobian(put(x), axis=axis))
    assert ours.shape == cpu.shape
    within_one_ulp(ours, cpu, dtype, "jacobian")
    check_grad(ours, jp.torch_jacobian(x.astype(np.float64), axis), dtype, "jacobian")


#: (layout, C, SHARED_BYTES_CAP, target, llm option) of the product: the
#: plain and the transformed kernel (``llm``), each cached (C = 40) and read
#: twice
HVP_CASES = [("2d", 3, None, "hard_ignored", "none"), ("ncd", 12, None, "soft", "cap"),
             ("axis0", 40, None, "hard_ii_valid", "scale"), ("2d", 40, None, "hard", "none"),
             ("2d", 40, 0, "soft", "cap")]


@pytest.mark.parametrize("case", HVP_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_cross_entropy_hvp_matches_the_cpu(dtype, case, monkeypatch):
    """Class weights, smoothing, z-loss, 16-bit soft targets: new, into
    16-bit and float32 ``out=``, and with a float32 vector beside 16-bit
    logits."""
    layout, C, cap, target, llm = case
    monkeypatch.setattr(_cuda, "SHARED_BYTES_CAP", cap)
    (x, y, v, w), (x64, y64, v64, w64), axis, options = half_hvp_problem(layout, dtype, target,
                                                                         C)
    kw = dict(label_smoothing=0.2, z_loss=jp.Z_LOSS, **options, **jp.HVP_LLM[llm])
    expect = jp.torch_hvp(x64, y64, v64, axis=axis, weight=w64, **kw)
    cpu = fastxent.cross_entropy_hvp(x, y, v, axis=axis, weight=w, **kw)
    ours = fastxent.cross_entropy_hvp(put(x), put(y), put(v), axis=axis, weight=put(w), **kw)
    assert _cuda._is_numba_array(ours)
    within_one_ulp(get(ours), cpu, dtype, "new")
    check_grad(get(ours), expect, dtype, "new")
    out = put(np.full(x.shape, np.nan, dtype))
    assert fastxent.cross_entropy_hvp(put(x), put(y), put(v), axis=axis, weight=put(w),
                                      out=out, **kw) is out
    within_one_ulp(get(out), cpu, dtype, "out=")
    out32 = put(np.full(x.shape, np.nan, np.float32))
    fastxent.cross_entropy_hvp(put(x), put(y), put(v), axis=axis, weight=put(w), out=out32,
                               **kw)
    check_float32(get(out32), expect, "out32")
    mixed = fastxent.cross_entropy_hvp(put(x), put(y), put(v.astype(np.float32)), axis=axis,
                                       weight=put(w), **kw)
    within_one_ulp(get(mixed), cpu, dtype, "float32 vector")


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_jacobian_family_strided_views_and_host_arrays(dtype):
    """Transposed 16-bit device views (gathered, written back in place);
    host 16-bit arrays with device="cuda" (NumPy results in their dtype)."""
    g, o, _, _ = half_backward_problem("2d", dtype, False)
    cpu = fastxent.softmax_backward(g.T, o.T, axis=0)
    base = put(np.ascontiguousarray(g))
    view = base.T
    assert fastxent.softmax_backward(view, put(np.ascontiguousarray(o)).T, axis=0,
                                     inplace=True) is view
    within_one_ulp(get(base).T, cpu, dtype, "strided in place")
    host = fastxent.softmax_backward(g, o, device="cuda")
    assert isinstance(host, np.ndarray)
    within_one_ulp(host, fastxent.softmax_backward(g, o), dtype, "host")
    (x, y, v, _), _, _, _ = half_hvp_problem("2d", dtype, "hard")
    out = put(np.full(x.shape[::-1], np.nan, dtype)).T
    got = fastxent.cross_entropy_hvp(put(np.ascontiguousarray(x.T)).T, put(y), put(v), out=out)
    assert got is out
    within_one_ulp(get(out), fastxent.cross_entropy_hvp(x, y, v), dtype, "strided out=")


# --------------------------------------------------------------------------
# bad input, refused before anything is written


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_out_of_another_dtype_refused_before_writes(dtype):
    x, y, _, _ = parity.problem("2d", np.float32, soft=False)
    xh = x.astype(dtype)
    for other in (BF16 if dtype == F16 else F16, np.float64):
        out = put(np.full(x.shape, 7, other))
        with pytest.raises(TypeError, match="out has dtype"):
            fastxent.cross_entropy_with_grad(put(xh), put(y), out=out)
        with pytest.raises(TypeError, match="out has dtype"):
            fastxent.softmax(put(xh), out=out)
        assert np.all(get(out).astype(np.float64) == 7)
    xd = put(xh)
    bad = y.copy()
    bad[-1] = 99
    with pytest.raises(IndexError):
        fastxent.cross_entropy_with_grad(xd, put(bad), inplace=True)
    np.testing.assert_array_equal(get(xd).view(np.uint16), xh.view(np.uint16))
    with pytest.raises(IndexError):
        fastxent.cross_entropy_hvp(xd, put(bad), xd, out=xd)
    np.testing.assert_array_equal(get(xd).view(np.uint16), xh.view(np.uint16))
    other = BF16 if dtype == F16 else F16
    with pytest.raises(TypeError, match=f"output has dtype {other}, but grad_output has dtype "
                                        f"{dtype}"):
        fastxent.softmax_backward(xd, put(xh.astype(other)), inplace=True)
    np.testing.assert_array_equal(get(xd).view(np.uint16), xh.view(np.uint16))


# --------------------------------------------------------------------------
# nll_loss: the 16-bit log-probability of each row's class read as 16 bits


def _nll_calls(lp, y, w, axis, kw):
    """nll_loss on the GPU and on the CPU, each reduction: {reduction: (gpu, cpu)}."""
    out = {}
    for reduction in REDUCTIONS:
        ours = fastxent.nll_loss(put(lp), put(y), weight=put(w), axis=axis, reduction=reduction,
                                 **kw)
        if reduction == "none":
            assert _cuda._is_numba_array(ours) and ours.dtype == np.float32, type(ours)
        else:
            assert type(ours) is np.float32, type(ours)
        out[reduction] = (get(ours), fastxent.nll_loss(lp, y, weight=w, axis=axis,
                                                       reduction=reduction, **kw))
    return out


NLL_CASES = parity.covering(dict(dtype=HALF, layout=list(LAYOUTS), C=GPU_CLASSES,
                                 target=HARD_TARGETS, weighted=[False, True]), strength=2)


@pytest.mark.parametrize("case", NLL_CASES, ids=_case_id)
def test_nll_loss_matches_the_cpu(case):
    """Every reduction: float32 losses, each row's as the CPU's bit for bit
    (the same float32 value times the same weight), reduced within
    ``SUM_ORDER``; both within the CPU tests' bound of float64."""
    dtype = case["dtype"]
    (x, y, w), (x64, y64, _), axis, options = half_problem(case["layout"], dtype, case["target"],
                                                           case["C"])
    lp = ref.log_softmax(x64, axis=axis).astype(dtype)
    w = w if case["weighted"] else None
    for reduction, (ours, cpu) in _nll_calls(lp, y, w, axis, options).items():
        if reduction == "none":
            np.testing.assert_array_equal(ours, cpu)
        else:
            np.testing.assert_allclose(ours, cpu, rtol=SUM_ORDER, atol=1e-7)
        expect = ref.nll_loss(lp.astype(np.float64), y64, axis=axis, reduction=reduction,
                              weight=None if w is None else w.astype(np.float64), **options)
        check_loss(np.float32(ours) if reduction != "none" else ours, expect, reduction,
                   f"nll_loss {reduction}")


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_nll_loss_strided_and_host_inputs(dtype):
    """A transposed device view of 16-bit log-probabilities with 16-bit
    weights; host 16-bit arrays with device="cuda" (NumPy float32 results)."""
    (x, y, w), (x64, _, _), _, _ = half_problem("2d", dtype, "hard_ignored", 12)
    lp = ref.log_softmax(x64, axis=-1).astype(dtype)
    view = put(np.ascontiguousarray(lp.T)).T  # lp's values, strided along the classes
    for reduction in REDUCTIONS:
        cpu = fastxent.nll_loss(lp, y, weight=w, reduction=reduction)
        ours = get(fastxent.nll_loss(view, put(y), weight=put(w), reduction=reduction))
        np.testing.assert_allclose(ours, cpu, rtol=SUM_ORDER, atol=1e-7, err_msg=reduction)
        host = fastxent.nll_loss(lp, y, weight=w, reduction=reduction, device="cuda")
        assert np.asarray(host).dtype == np.float32
        if reduction == "none":
            assert isinstance(host, np.ndarray)
        np.testing.assert_allclose(host, cpu, rtol=SUM_ORDER, atol=1e-7, err_msg=reduction)


# --------------------------------------------------------------------------
# binary_cross_entropy_with_logits: 16-bit logits, targets and weights read
# as 16 bits, the gradient written as 16 bits (or float32 into such an out=)


def _bce_operands(case):
    """(x, t, kw) of ``parity.bce_problem`` with 16-bit logits; the target and
    weights in the logits' dtype ("same"), the other 16-bit dtype ("other")
    or float32."""
    dtype = case["dtype"]
    x, t, kw = parity.bce_problem(case["shape"], np.float32, case["weights"])
    other = {"same": dtype, "other": BF16 if dtype == F16 else F16,
             "float32": np.dtype(np.float32)}[case["operands"]]
    return x.astype(dtype), t.astype(other), {k: v.astype(other) for k, v in kw.items()}


def _bce_call(x, t, kw, reduction, dest, on_gpu):
    """The loss alone, then binary_cross_entropy_with_logits_with_grad into
    ``dest``: (loss, grad, loss alone), on the host."""
    x = x.copy()
    if on_gpu:
        x, t = put(x), put(t)
        kw = {k: put(v) for k, v in kw.items()}
    extra, out = _destination(dest, x, on_gpu)
    loss_only = fastxent.binary_cross_entropy_with_logits(x, t, reduction=reduction, **kw)
    loss, grad = fastxent.binary_cross_entropy_with_logits_with_grad(
        x, t, reduction=reduction, **kw, **extra)
    assert grad is (x if dest == "inplace" else out if out is not None else grad)
    if on_gpu:
        assert _cuda._is_numba_array(grad), type(grad)
        for value in (loss, loss_only):
            if reduction == "none":
                assert _cuda._is_numba_array(value) and value.dtype == np.float32, value.dtype
            else:
                assert type(value) is np.float32, type(value)
    return get(loss), get(grad), get(loss_only)


BCE_CASES = parity.covering(dict(dtype=HALF, shape=list(BCE_SHAPES), weights=BCE_WEIGHTS,
                                 reduction=REDUCTIONS, dest=DESTINATIONS,
                                 operands=["same", "other", "float32"]), strength=2)


@pytest.mark.parametrize("case", BCE_CASES, ids=_case_id)
def test_bce_with_logits_matches_the_cpu(case):
    """Loss (float32) and gradient (the logits' dtype, or a float32 out=)
    as the CPU's on the same inputs, and both within the CPU tests' bounds
    of float64 (``tests/test_half.py::test_binary_cross_entropy``)."""
    dtype, reduction, dest = case["dtype"], case["reduction"], case["dest"]
    x, t, kw = _bce_operands(case)
    g_loss, g_grad, g_only = _bce_call(x, t, kw, reduction, dest, on_gpu=True)
    c_loss, c_grad, c_only = _bce_call(x, t, kw, reduction, dest, on_gpu=False)
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    kw64 = {k: v.astype(np.float64) for k, v in kw.items()}
    r_loss, r_grad = ref.bce_with_logits_with_grad(x64, t64, reduction=reduction, **kw64)
    # the elementwise terms cancel (see parity.check_bce): held to their size
    w_, pw_ = kw64.get("weight", 1.0), kw64.get("pos_weight", 1.0)
    terms = (np.abs(x64) + (1 + (pw_ - 1) * t64) * (np.abs(x64) + 1.0)) * w_
    size = {"none": terms, "sum": terms.sum(), "mean": terms.mean()}[reduction]
    for ours, cpu in ((g_loss, c_loss), (g_only, c_only)):
        assert np.asarray(ours).dtype == np.float32
        ours64, cpu64 = np.asarray(ours, np.float64), np.asarray(cpu, np.float64)
        assert np.all(np.abs(ours64 - cpu64) <= SUM_ORDER * np.abs(cpu64) + 2e-7 * size), \
            (ours, cpu)
        assert np.all(np.abs(ours64 - r_loss) <= LOSS_RTOL * np.abs(r_loss) + 2e-7 * size), \
            (ours, r_loss)
    if dest == "out32":
        assert g_grad.dtype == np.float32
        np.testing.assert_allclose(g_grad, c_grad, rtol=1e-6, atol=1e-7, err_msg="grad")
    else:
        within_one_ulp(g_grad, c_grad, dtype, "grad")
        check_grad(g_grad, r_grad, dtype)


def test_bce_cases_cover_the_grid():
    """Every value of every dimension runs at least once (2-wise: every pair)."""
    dims = dict(dtype=HALF, shape=list(BCE_SHAPES), weights=BCE_WEIGHTS, reduction=REDUCTIONS,
                dest=DESTINATIONS, operands=["same", "other", "float32"])
    for name, values in dims.items():
        assert {repr(c[name]) for c in BCE_CASES} == {repr(v) for v in values}, name


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_bce_strided_host_inputs_and_module(dtype):
    """A transposed device view of 16-bit logits written in place, with a
    strided 16-bit target; host 16-bit arrays with device="cuda" (NumPy
    results: float32 loss, 16-bit gradient); ``BCEWithLogitsLoss`` on device
    arrays."""
    x, t, kw = parity.bce_problem("2d", np.float32, "both")
    x, t = x.astype(dtype), t.astype(dtype)
    kw = {k: v.astype(dtype) for k, v in kw.items()}
    c_loss, c_grad = fastxent.binary_cross_entropy_with_logits_with_grad(x, t, **kw)
    base = put(np.ascontiguousarray(x.T))
    view = base.T  # x's values, strided
    t_view = put(np.ascontiguousarray(t.T)).T
    loss, grad = fastxent.binary_cross_entropy_with_logits_with_grad(
        view, t_view, inplace=True, **{k: put(v) for k, v in kw.items()})
    assert grad is view and type(loss) is np.float32
    np.testing.assert_allclose(loss, c_loss, rtol=SUM_ORDER)
    within_one_ulp(get(base).T, c_grad, dtype, "strided in place")
    loss, grad = fastxent.binary_cross_entropy_with_logits_with_grad(x, t, device="cuda", **kw)
    assert isinstance(grad, np.ndarray) and type(loss) is np.float32
    np.testing.assert_allclose(loss, c_loss, rtol=SUM_ORDER)
    within_one_ulp(grad, c_grad, dtype, "host")
    criterion = fastxent.BCEWithLogitsLoss(reduction="sum", **{k: put(v) for k, v in kw.items()})
    loss = criterion(put(x), put(t))
    c_sum, c_sum_grad = fastxent.binary_cross_entropy_with_logits_with_grad(
        x, t, reduction="sum", **kw)
    assert type(loss) is np.float32
    np.testing.assert_allclose(loss, c_sum, rtol=SUM_ORDER)
    within_one_ulp(get(criterion.backward()), c_sum_grad, dtype, "module")


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_nll_and_bce_read_16_bit_operands_as_they_are(dtype, monkeypatch):
    """16-bit log-probabilities, and BCE's 16-bit logits, target, full-size
    weight and per-class pos_weight, reach the kernels as 16-bit arrays:
    no kernel widens them to a float32 copy first (``_cuda_kernels.widen``)."""
    def no_widening(storage):
        raise AssertionError(f"a {storage} operand was widened before its kernel")

    monkeypatch.setattr(K, "widen", no_widening)
    (x, y, w), (x64, _, _), _, _ = half_problem("2d", dtype, "hard_ignored", 12)
    lp = ref.log_softmax(x64, axis=-1).astype(dtype)
    np.testing.assert_allclose(fastxent.nll_loss(put(lp), put(y)), fastxent.nll_loss(lp, y),
                               rtol=SUM_ORDER)
    x, t, kw = parity.bce_problem("3d", np.float32, "full")
    x, t = x.astype(dtype), t.astype(dtype)
    kw = {k: v.astype(dtype) for k, v in kw.items()}
    loss, grad = fastxent.binary_cross_entropy_with_logits_with_grad(
        put(x), put(t), **{k: put(v) for k, v in kw.items()})
    c_loss, c_grad = fastxent.binary_cross_entropy_with_logits_with_grad(x, t, **kw)
    np.testing.assert_allclose(loss, c_loss, rtol=SUM_ORDER)
    within_one_ulp(get(grad), c_grad, dtype, "grad")


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_bce_out_of_another_dtype_refused_before_writes(dtype):
    x, t, _ = parity.bce_problem("2d", np.float32, "none")
    xh, th = x.astype(dtype), t.astype(dtype)
    for other in (BF16 if dtype == F16 else F16, np.float64):
        out = put(np.full(x.shape, 7, other))
        with pytest.raises(TypeError, match="out has dtype"):
            fastxent.binary_cross_entropy_with_logits_with_grad(put(xh), put(th), out=out)
        assert np.all(get(out).astype(np.float64) == 7)
