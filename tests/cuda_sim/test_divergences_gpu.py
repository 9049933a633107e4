"""kl_div and binary_cross_entropy on the GPU, under the CUDA simulator:
the CPU tests' cases, torch twins and tolerances (``tests/test_divergences``)
with ``device="cuda"``, on tiny shapes."""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

import fastxent
from tests.test_divergences import P, _bce_case, _layout, check, torch_bce, torch_kl


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["rows", "ncd", "strided"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_against_torch(dtype, layout, reduction, log_target):
    rng = np.random.default_rng(hash((layout, reduction, log_target)) % 2**32)
    x, t, axis = _layout(rng, layout, dtype)
    if log_target:
        t = np.log(np.where(t == 0, 0.5, t)).astype(dtype)
    ref_loss, ref_grad = torch_kl(x, t, reduction, log_target, axis)
    loss, grad = fastxent.kl_div_with_grad(x, t, reduction=reduction, log_target=log_target,
                                           axis=axis, device="cuda")
    assert grad.dtype == dtype and grad.shape == x.shape
    check(loss, grad, ref_loss, ref_grad, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_shape", [None, (7,), (5, 1)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_binary_cross_entropy_against_torch(dtype, weight_shape, reduction):
    rng = np.random.default_rng(7)
    x, t = _bce_case(rng, (5, 7), dtype)
    w = None if weight_shape is None else rng.uniform(0.5, 2, weight_shape).astype(dtype)
    ref_loss, ref_grad = torch_bce(x, t, w, reduction)
    loss, grad = fastxent.binary_cross_entropy_with_grad(x, t, weight=w, reduction=reduction,
                                                         device="cuda")
    check(loss, grad, ref_loss, ref_grad, dtype)


@pytest.mark.parametrize("fn", ["kl", "bce"])
def test_device_arrays_in_place(fn):
    rng = np.random.default_rng(8)
    if fn == "kl":
        x, t, _ = _layout(rng, "rows", np.float64)
        call, ref = fastxent.kl_div_with_grad, torch_kl(x, t, "sum", False, -1)
    else:
        x, t = _bce_case(rng, (6, 9), np.float64)
        call, ref = fastxent.binary_cross_entropy_with_grad, torch_bce(x, t, None, "sum")
    xd = cuda.to_device(x)
    loss, grad = call(xd, cuda.to_device(t), reduction="sum", inplace=True)
    assert grad is xd
    check(loss, xd.copy_to_host(), *ref, np.float64)
    out = cuda.to_device(np.zeros_like(x))
    loss, grad = call(cuda.to_device(x), cuda.to_device(t), reduction="sum", out=out)
    check(loss, out.copy_to_host(), *ref, np.float64)


@pytest.mark.parametrize("mode", ["out", "inplace"])
def test_bce_outside_unit_refused_before_writes(mode):
    x = P.copy()
    x[2, 1] = 1.5
    xd = cuda.to_device(x)
    out = cuda.to_device(np.full_like(x, 7.0)) if mode == "out" else None
    with pytest.raises(ValueError, match=r"input must hold probabilities in \[0, 1\]"):
        fastxent.binary_cross_entropy_with_grad(xd, cuda.to_device(np.zeros_like(x)), out=out,
                                                inplace=mode == "inplace")
    np.testing.assert_array_equal(xd.copy_to_host(), x)
    if out is not None:
        assert np.all(out.copy_to_host() == 7.0)




# -- float16 and bfloat16 (issue 19) --------------------------------------------
# The kernels read the 16-bit values, compute in float32 and round to nearest
# even as the CPU does: each case of the CPU tests' 2-wise grid (HALF_GRID) is
# held to the CPU's result on the same inputs, as tests/cuda_sim/test_half_gpu.py
# does; 16-bit inputs and targets go to the device as 16-bit device arrays.

from tests.cuda_sim.test_half_gpu import SUM_ORDER, get, put, within_one_ulp  # noqa: E402
from tests.test_divergences import BF16, F16, HALF_GRID, _half_case  # noqa: E402


def _half_call(fn, reduction, t, w, axis):
    if fn == "bce":
        return lambda x, **kw: fastxent.binary_cross_entropy_with_grad(
            x, t, weight=w, reduction=reduction, **kw)
    return lambda x, **kw: fastxent.kl_div_with_grad(
        x, t, reduction=reduction, log_target=fn == "kl_log_target", axis=axis, **kw)


@pytest.mark.parametrize("case", HALF_GRID, ids=lambda c: "-".join(map(str, c.values())))
def test_half_matches_the_cpu(case):
    fn, dtype, reduction, dest = case["fn"], case["dtype"], case["reduction"], case["dest"]
    if fn == "bce" and reduction == "batchmean":
        reduction = "mean"
    x, t, w, axis = _half_case(fn, dtype, case["layout"], case["weight"])
    cpu_call = _half_call(fn, reduction, t, w, axis)
    gpu_call = _half_call(fn, reduction, put(t), put(w), axis)
    out_dtype = np.float32 if dest == "out32" else dtype
    cpu_loss, cpu_grad = cpu_call(x, **({"out": np.empty(x.shape, out_dtype)}
                                        if dest == "out32" else {}))
    xd = cuda.to_device(np.ascontiguousarray(x).view(np.uint16)).view(dtype)
    if case["layout"] == "strided":  # a transposed device view, as the host array
        xd = cuda.to_device(np.ascontiguousarray(x.T).view(np.uint16)).view(dtype).T
    if dest == "inplace":
        loss, grad = gpu_call(xd, inplace=True)
        assert grad is xd
    elif dest.startswith("out"):
        out = put(np.full(x.shape, np.nan, out_dtype))
        loss, grad = gpu_call(xd, out=out)
        assert grad is out
    else:
        loss, grad = gpu_call(xd)
    loss, grad = get(loss), get(grad)
    assert np.asarray(loss).dtype == np.float32
    np.testing.assert_allclose(np.asarray(loss, np.float64), np.asarray(cpu_loss, np.float64),
                               rtol=SUM_ORDER, atol=1e-7)
    if dest == "out32":
        assert grad.dtype == np.float32
        np.testing.assert_allclose(grad, cpu_grad, rtol=1e-6, atol=1e-7)
    else:
        within_one_ulp(np.asarray(grad), np.asarray(cpu_grad), dtype, "grad")


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
def test_half_bce_outside_unit_refused_before_writes(dtype):
    x = np.full((4, 3), 0.25, dtype)
    x[2, 1] = 1.5
    xd = put(x)
    with pytest.raises(ValueError, match=r"input must hold probabilities in \[0, 1\].*1 elem"):
        fastxent.binary_cross_entropy_with_grad(xd, put(np.zeros((4, 3), dtype)), inplace=True)
    np.testing.assert_array_equal(get(xd).view(np.uint16), x.view(np.uint16))
