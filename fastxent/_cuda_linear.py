"""The GPU backend's fused linear + cross-entropy.

The caller's array library does the matrix products, on its current stream
(CuPy's ``matmul``, PyTorch's ``torch.matmul``), into chunk buffers of that
library; ``_cuda.cross_entropy`` (fastxent's CUDA kernel) turns each chunk's
logits into their gradient in place. The loop is ``_linear.run``.
float16 and bfloat16 inputs stay 16-bit: the library multiplies them as
they are (float32 sums, CuPy and PyTorch's own), the 16-bit kernel reads
and writes each 16-bit logits chunk, ``grad_linear_weight`` and
``grad_linear_bias`` are summed in float32 and cast at the end.

Unverified on hardware: this path has run only under Numba's CUDA
simulator, with a NumPy stand-in for the products (``STAND_INS``, which the
simulator tests fill), until it has run on a GPU.
"""

from __future__ import annotations

import sys

import numpy as np

from . import _linear
from ._cuda import _hard_targets, _small_to_device, cross_entropy
from ._spec import LinearCrossEntropySpec

#: ``(probe(array) -> bool, ops_factory(array, dtype) -> MatrixOps)`` for
#: array kinds other than CuPy's and PyTorch's (the simulator tests put a
#: NumPy stand-in here).
STAND_INS: list = []


def _cupy_ops(like, dtype):
    cp = sys.modules["cupy"]

    def matmul(a, b, out):
        cp.matmul(a, b, out=out)

    def add_rows(z, bias):
        cp.add(z, bias, out=z)

    def col_sum(z, acc):
        acc += z.sum(axis=0)

    def add_into(a, b):
        cp.add(a, b, out=a)

    def scale(a, s):
        cp.multiply(a, a.dtype.type(s), out=a)

    def cast(a, dtype):
        return a.astype(dtype)

    return _linear.MatrixOps(matmul, cp.empty, cp.zeros, add_rows, col_sum, add_into, scale,
                             cp.copyto, cast=cast)


def _torch_ops(like, dtype):
    torch = sys.modules["torch"]

    def torch_dtype(dtype):
        # float32, float64, float16, bfloat16: the same names in torch
        return getattr(torch, np.dtype(dtype).name)

    def empty(shape, dtype):
        return torch.empty(shape, dtype=torch_dtype(dtype), device=like.device)

    def zeros(shape, dtype):
        return torch.zeros(shape, dtype=torch_dtype(dtype), device=like.device)

    def matmul(a, b, out):
        torch.matmul(a, b, out=out)

    def add_rows(z, bias):
        z.add_(bias)

    def col_sum(z, acc):
        acc.add_(z.sum(dim=0))

    def add_into(a, b):
        a.add_(b)

    def scale(a, s):
        a.mul_(s)

    def copy(dst, src):
        dst.copy_(src)

    def cast(a, dtype):
        return a.to(torch_dtype(dtype))

    return _linear.MatrixOps(matmul, empty, zeros, add_rows, col_sum, add_into, scale, copy,
                             cast=cast)


def matrix_ops(like, dtype) -> _linear.MatrixOps:
    """The products of the library ``like`` (the caller's input) comes from."""
    package = type(like).__module__.split(".")[0]
    if package == "cupy":
        return _cupy_ops(like, dtype)
    if package == "torch":
        return _torch_ops(like, dtype)
    for probe, factory in STAND_INS:
        if probe(like):
            return factory(like, dtype)
    raise TypeError(
        "linear_cross_entropy on the GPU needs CuPy arrays or PyTorch CUDA tensors (their "
        f"library does the matrix products), got {type(like).__module__}."
        f"{type(like).__name__}")


def _detached(a):
    """PyTorch tensors that track gradients, detached: the gradients are
    computed here, not recorded by autograd."""
    detach = getattr(a, "detach", None)
    return a if detach is None else detach()


def linear_cross_entropy(spec: LinearCrossEntropySpec, x, w, b, target, weight,
                         with_grad: bool):
    """Loss and, with ``with_grad``, ``(grad_input, grad_w, grad_b)``, as device
    arrays of the caller's library."""
    ce = spec.ce
    dtype = ce.problem.dtype
    x, w, b = (None if a is None else _detached(a) for a in (x, w, b))
    ops = matrix_ops(x, dtype)
    w_host = None if weight is None else _small_to_device(weight, dtype)[0]
    if ce.soft:
        denominator = float(ce.problem.n_rows)
    else:
        _, denominator = _hard_targets(ce, target, w_host)  # checks every index first
    reduction = ce.reduction

    def finish(total, losses):
        from ._host import finish_loss

        if reduction == "none":
            return losses.reshape(spec.batch_shape)
        return finish_loss(total, denominator, reduction, dtype)

    # 16-bit x, w, b: the library multiplies them as they are, the kernel
    # reads and writes the 16-bit logits chunk (see _linear.run's storage)
    loss, grads = _linear.run(spec, x, w, b, target, w_host, denominator, with_grad, ops,
                              cross_entropy, finish, storage=spec.storage)
    if grads is None:
        return loss, None
    gx, gw, gb = grads
    return loss, (gx.reshape(spec.batch_shape + (spec.hidden,)), gw, gb)
