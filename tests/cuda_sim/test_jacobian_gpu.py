"""The softmax Jacobian family on the GPU, under the CUDA simulator.

The family's rows of the parity table run in ``test_gpu_kernels.py``'s
``test_parity_table`` (a covering array of ``tests/jacobian_parity.py``'s
grids with ``GPU_CLASSES``). Here: the variants that read rows twice
(``SHARED_BYTES_CAP`` = 0), strided device arrays, the softmax family's
forms (logsumexp over tuples of axes, 0-d and zero-class softmax), and
bad input refused before a kernel writes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numba import cuda

import fastxent
from fastxent import _cuda
from tests.jacobian_parity import check_backward, check_hvp, torch_backward, torch_hvp
from tests.parity import CUDA


@pytest.mark.parametrize("cache_bytes", [0, None])
@pytest.mark.parametrize("fn", [fastxent.softmax_backward, fastxent.log_softmax_backward],
                         ids=["softmax", "log_softmax"])
def test_backward_rows_cached_or_read_twice(fn, cache_bytes, monkeypatch):
    monkeypatch.setattr(_cuda, "SHARED_BYTES_CAP", cache_bytes)
    check_backward(fn, CUDA, dtype=np.float32, layout="2d", mode="inplace", C=40)


@pytest.mark.parametrize("cache_bytes", [0, None])
@pytest.mark.parametrize("target", ["hard_ignored", "soft"])
def test_hvp_rows_cached_or_read_twice(target, cache_bytes, monkeypatch):
    monkeypatch.setattr(_cuda, "SHARED_BYTES_CAP", cache_bytes)
    check_hvp(fastxent.cross_entropy_hvp, CUDA, dtype=np.float64, layout="ncd", weighted=True,
              target=target, smoothing=0.2, reduction="mean", z_loss=1e-2, C=40, mode="out")


@pytest.mark.parametrize("cache_bytes", [0, None])
@pytest.mark.parametrize("target", ["hard_ignored", "hard_ii_valid", "soft"])
@pytest.mark.parametrize("llm", ["scale", "cap"])
def test_hvp_of_scaled_and_capped_logits(llm, target, cache_bytes, monkeypatch):
    """The transformed kernel (its own variant) against torch's double
    backward of the scaled and capped loss, the CPU's table."""
    monkeypatch.setattr(_cuda, "SHARED_BYTES_CAP", cache_bytes)
    for layout, dtype in (("2d", np.float64), ("ncd", np.float32)):
        check_hvp(fastxent.cross_entropy_hvp, CUDA, dtype=dtype, layout=layout, weighted=True,
                  target=target, smoothing=0.2, reduction="mean", z_loss=1e-2, llm=llm)


def test_strided_device_arrays():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 6))
    g = rng.standard_normal((5, 6))
    o = fastxent.softmax(x, axis=0)
    # transposed views on the device: gathered, and scattered back in place
    gd, od = cuda.to_device(g.T.copy()).T, cuda.to_device(o.T.copy()).T
    result = fastxent.softmax_backward(gd, od, axis=0, inplace=True)
    np.testing.assert_allclose(result.copy_to_host(), torch_backward(g, o, 0, False),
                               rtol=1e-10, atol=1e-13)
    y = rng.integers(0, 5, 6)
    v = rng.standard_normal((5, 6))
    xd, vd = cuda.to_device(x.T.copy()).T, cuda.to_device(v.T.copy()).T
    out = cuda.to_device(np.zeros((6, 5))).T
    got = fastxent.cross_entropy_hvp(xd, cuda.to_device(y), vd, axis=0, out=out, z_loss=0.1)
    np.testing.assert_allclose(got.copy_to_host(), torch_hvp(x, y, v, axis=0, z_loss=0.1),
                               rtol=1e-10, atol=1e-13)


def test_hvp_out_over_the_logits_and_vector():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 12))
    y = rng.integers(0, 12, 4)
    xd = cuda.to_device(x)
    got = fastxent.cross_entropy_hvp(xd, cuda.to_device(y), xd, out=xd)
    assert got is xd
    np.testing.assert_allclose(xd.copy_to_host(), torch_hvp(x, y, x), rtol=1e-10, atol=1e-13)


def test_logsumexp_axes_and_softmax_forms():
    x = np.random.default_rng(4).standard_normal((3, 4, 5))
    for axes in ((0, 2), (1,), (0, 1, 2)):
        for keepdims in (False, True):
            got = fastxent.logsumexp(cuda.to_device(x), axes, keepdims=keepdims)
            expect = torch.logsumexp(torch.from_numpy(x), dim=axes, keepdim=keepdims).numpy()
            assert got.shape == expect.shape
            np.testing.assert_allclose(got.copy_to_host(), expect, rtol=1e-12)
    got = fastxent.logsumexp(cuda.to_device(x), 1, keepdims=True)
    np.testing.assert_allclose(got.copy_to_host(), torch.logsumexp(
        torch.from_numpy(x), dim=1, keepdim=True).numpy(), rtol=1e-12)
    assert fastxent.logsumexp(cuda.to_device(np.array(2.5)), 0).copy_to_host() == 2.5
    one = fastxent.softmax(cuda.to_device(np.array(2.0)))
    assert one.shape == () and one.copy_to_host() == 1.0
    assert fastxent.log_softmax(cuda.to_device(np.array(2.0))).copy_to_host() == 0.0
    empty = fastxent.softmax(cuda.to_device(np.zeros((3, 0))))
    assert empty.shape == (3, 0)


def test_bad_target_refused_before_writing():
    x = np.random.default_rng(5).standard_normal((4, 3))
    out = cuda.to_device(np.full((4, 3), 7.0))
    with pytest.raises(IndexError, match=r"target 3 at position \(2,\)"):
        fastxent.cross_entropy_hvp(cuda.to_device(x), cuda.to_device(np.array([0, 1, 3, 1])),
                                   cuda.to_device(x), out=out)
    assert np.all(out.copy_to_host() == 7.0)
    with pytest.raises(ValueError, match="output has shape"):
        fastxent.softmax_backward(cuda.to_device(x), cuda.to_device(x[:2]))
