"""The GPU path of the fused linear + cross-entropy, in the CUDA simulator.

The products are the caller's library's (CuPy, PyTorch); here a NumPy
stand-in registered in ``_cuda_linear.STAND_INS`` does them on the
simulator's device arrays, and fastxent's CUDA kernel (simulated) the loss.
Against the same torch float64 twin as the CPU tests (``tests/test_linear.py``),
and 16-bit inputs, which the library multiplies in 16 bits (float32 sums).
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

import fastxent
from fastxent import _cuda_linear, _linear
from tests.test_linear import C, N, _check, _inputs, _torch_twin


def _host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def _wide(a):
    """16-bit values as float32, as CuPy and PyTorch multiply and sum them
    (float32 accumulation, one rounding of the result)."""
    a = _host(a)
    return a.astype(np.float32) if a.dtype.itemsize == 2 else a


def _numpy_stand_in(like, dtype):
    def matmul(a, b, out):
        out.copy_to_device(np.ascontiguousarray(_wide(a) @ _wide(b), dtype=out.dtype))

    def put(a, value):
        a.copy_to_device(np.ascontiguousarray(value, dtype=a.dtype))

    return _linear.MatrixOps(
        matmul, lambda shape, dt: cuda.device_array(shape, dtype=dt),
        lambda shape, dt: cuda.to_device(np.zeros(shape, dtype=dt)),
        lambda z, b: put(z, _host(z) + _host(b)),
        lambda z, acc: put(acc, _host(acc) + _wide(z).sum(axis=0)),
        lambda a, b: put(a, _host(a) + _host(b)),
        lambda a, s: put(a, _host(a) * a.dtype.type(s)),
        lambda dst, src: put(dst, _host(src)),
        cast=lambda a, dt: cuda.to_device(_host(a).astype(dt)))


@pytest.fixture(autouse=True)
def numpy_products(monkeypatch):
    monkeypatch.setattr(_cuda_linear, "STAND_INS",
                        [(lambda a: type(a).__name__ == "FakeCUDAArray", _numpy_stand_in)])


@pytest.mark.parametrize("chunk", (4, N + 1))
@pytest.mark.parametrize("target", ("ignored", "soft"))
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_gpu_matches_torch(reduction, target, chunk):
    x, w, b, t, ignore_index = _inputs(target, seed=12)
    weight = np.random.default_rng(13).random(C) + 0.5
    dx, dw, db, dt = (cuda.to_device(a) for a in (x, w, b, t))
    loss, gx, gw, gb = fastxent.linear_cross_entropy_with_grad(
        dx, dw, dt, linear_bias=db, weight=cuda.to_device(weight), ignore_index=ignore_index,
        reduction=reduction, label_smoothing=0.1, z_loss=0.01, chunk_size=chunk)
    ours = tuple(_host(a) for a in (loss, gx, gw, gb))
    theirs = _torch_twin(x, w, b, t, weight=weight, ignore_index=ignore_index,
                         reduction=reduction, label_smoothing=0.1, z_loss=0.01)
    _check(ours, theirs)


def test_gpu_refuses_a_bad_class_index_before_any_product():
    x, w, b, t, _ = _inputs("hard", seed=14)
    t[5] = C
    products = []

    def counting(like, dtype):
        ops = _numpy_stand_in(like, dtype)
        return ops._replace(matmul=lambda *args: products.append(1) or ops.matmul(*args))

    _cuda_linear.STAND_INS.insert(0, (lambda a: type(a).__name__ == "FakeCUDAArray", counting))
    with pytest.raises(IndexError, match="out of range"):
        fastxent.linear_cross_entropy_with_grad(cuda.to_device(x), cuda.to_device(w),
                                                cuda.to_device(t), chunk_size=2)
    assert products == []
    t[5] = 0  # the same call with a good index does run the products
    fastxent.linear_cross_entropy_with_grad(cuda.to_device(x), cuda.to_device(w),
                                            cuda.to_device(t), chunk_size=2)
    assert products


def test_gpu_without_a_known_library_is_refused(monkeypatch):
    monkeypatch.setattr(_cuda_linear, "STAND_INS", [])
    x, w, b, t, _ = _inputs("hard", seed=15)
    with pytest.raises(TypeError, match="CuPy arrays or PyTorch CUDA tensors"):
        fastxent.linear_cross_entropy(cuda.to_device(x), cuda.to_device(w), cuda.to_device(t))



#: unit roundoff of each 16-bit type
UNIT = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


@pytest.mark.parametrize("dtype,bias,target,chunk", [
    ("float16", True, "ignored", 4), ("bfloat16", False, "soft", N),
    ("bfloat16", True, "ignored", N + 1), ("float16", False, "soft16", 3)])
def test_gpu_half(dtype, bias, target, chunk, monkeypatch):
    """16-bit input, weight, bias: the library's 16-bit products and the
    16-bit cross-entropy kernel on each logits chunk. To first order in the
    unit roundoff u: the logits x W^T (+ b) are rounded at most twice, so
    each moves by at most 2 u Z (Z: the largest |x W^T| or |z|) and each
    probability by at most 4 u Z of itself; the gradient of the logits, each
    product and the mean's scaling are rounded once each (u of the terms'
    magnitudes each), and the float32 sums are far below that. So each
    gradient element is within one 16-bit ulp (the final rounding) plus
    4 u (1 + Z) times the sum of the magnitudes of its terms (|p| + |y|
    against |W| or |x|, over the mean's denominator) of the float64 value;
    the loss within 4 u (1 + Z) relative."""
    import ml_dtypes

    from tests.test_half import ulp

    dt = np.dtype(np.float16) if dtype == "float16" else np.dtype(ml_dtypes.bfloat16)
    from fastxent import _cuda_linear

    x, w, b, t, ignore_index = _inputs(target[:4], seed=17)
    x, w, b = (a.astype(dt) for a in (x, w, b))
    b = b if bias else None
    if target == "soft16":
        t = t.astype(dt)
    reduction = "mean"
    kernel_logits = []  # the dtype of each chunk the kernel is handed
    real = _cuda_linear.cross_entropy  # the backend's, as the linear loop calls it
    monkeypatch.setattr(_cuda_linear, "cross_entropy",
                        lambda spec, z, *a: kernel_logits.append(z.dtype) or real(spec, z, *a))
    dx, dw, dt_ = (cuda.to_device(a) for a in (x, w, t))
    loss, gx, gw, gb = fastxent.linear_cross_entropy_with_grad(
        dx, dw, dt_, linear_bias=None if b is None else cuda.to_device(b),
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk)
    assert type(loss) is np.float32
    assert kernel_logits == [dt] * -(-N // chunk)
    wide = [None if a is None else a.astype(np.float64) for a in (x, w, b)]
    t = t.astype(np.float64) if t.dtype.kind != "i" else t
    theirs = _torch_twin(wide[0], wide[1], wide[2], t, weight=None, ignore_index=ignore_index,
                         reduction=reduction, label_smoothing=0.0, use_linear_ce=False)
    z = wide[0] @ wide[1].T + (0.0 if b is None else wide[2])
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    if target != "ignored":
        y, rows = t, np.ones(N)
    else:
        kept = t != ignore_index
        y = np.eye(C)[np.where(kept, t, 0)] * kept[:, None]
        rows = kept.astype(np.float64)
    a = (p * rows[:, None] + y) / rows.sum()  # magnitudes of d loss / d logits
    z_max = max(np.abs(z).max(), np.abs(wide[0] @ wide[1].T).max())
    u = UNIT[dtype] * (1.0 + z_max)
    np.testing.assert_allclose(loss, theirs[0], rtol=4 * u)
    for name, g, e, terms in (("grad_input", gx, theirs[1], a @ np.abs(wide[1])),
                              ("grad_linear_weight", gw, theirs[2], a.T @ np.abs(wide[0])),
                              ("grad_linear_bias", gb, theirs[3], a.sum(0))):
        if e is None:
            assert g is None, name
            continue
        g = _host(g)
        assert g.dtype == dt, name
        error = np.abs(g.astype(np.float64) - e)
        bound = ulp(e, dt) + 4 * u * terms
        assert np.all(error <= bound), (name, np.max(error / bound))
