"""The GPU path of the fused linear + cross-entropy, in the CUDA simulator.

The products are the caller's library's (CuPy, PyTorch); here a NumPy
stand-in registered in ``_cuda_linear.STAND_INS`` does them on the
simulator's device arrays, and fastxent's CUDA kernel (simulated) the loss.
Against the same torch float64 twin as the CPU tests (``tests/test_linear.py``).
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


def _numpy_stand_in(like, dtype):
    def matmul(a, b, out):
        out.copy_to_device(np.ascontiguousarray(_host(a) @ _host(b)))

    def put(a, value):
        a.copy_to_device(np.ascontiguousarray(value, dtype=a.dtype))

    return _linear.MatrixOps(
        matmul, lambda shape, dt: cuda.device_array(shape, dtype=dt),
        lambda shape, dt: cuda.to_device(np.zeros(shape, dtype=dt)),
        lambda z, b: put(z, _host(z) + _host(b)),
        lambda z, acc: put(acc, _host(acc) + _host(z).sum(axis=0)),
        lambda a, b: put(a, _host(a) + _host(b)),
        lambda a, s: put(a, _host(a) * a.dtype.type(s)),
        lambda dst, src: put(dst, _host(src)))


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


@pytest.mark.parametrize("dtype", ("float16", "bfloat16"))
def test_gpu_refuses_half_inputs_by_name(dtype):
    """16-bit inputs run on the CPU only (so far): on the GPU a TypeError
    naming the function, before any product."""
    import ml_dtypes

    dt = np.dtype(np.float16) if dtype == "float16" else np.dtype(ml_dtypes.bfloat16)
    x, w, b, t, _ = _inputs("hard", seed=16)
    products = []

    def counting(like, dtype):
        ops = _numpy_stand_in(like, dtype)
        return ops._replace(matmul=lambda *args: products.append(1) or ops.matmul(*args))

    _cuda_linear.STAND_INS.insert(0, (lambda a: type(a).__name__ == "FakeCUDAArray", counting))
    with pytest.raises(TypeError, match="linear_cross_entropy does not take float16 or bfloat16"):
        fastxent.linear_cross_entropy_with_grad(cuda.to_device(x.astype(dt)),
                                                cuda.to_device(w.astype(dt)),
                                                cuda.to_device(t), chunk_size=2)
    assert products == []
