"""The CPU backend's fused linear + cross-entropy: NumPy's ``matmul`` (the
BLAS NumPy is built with) for the products, ``_cpu.cross_entropy`` (the
fused in-place kernel) for each chunk's loss and gradient. The loop itself
is ``_linear.run``.
"""

from __future__ import annotations

import numpy as np

from . import _blas, _linear
from ._cpu import cross_entropy
from ._half import narrow, widen
from ._host import bad_uint64_target, finish_loss, raise_bad_target, scan_hard_targets
from ._spec import LinearCrossEntropySpec


def _matmul(a, b, out):
    np.matmul(a, b, out=out)


def _add_rows(z, bias):
    np.add(z, bias, out=z)


def _col_sum(z, acc):
    # Column sums in row order (NumPy reduces axis 0 of a C-ordered array
    # row by row): the same bits for any thread count.
    acc += z.sum(axis=0)


def _add_into(a, b):
    np.add(a, b, out=a)


def _scale(a, s):
    np.multiply(a, a.dtype.type(s), out=a)


OPS = _linear.MatrixOps(_matmul, np.empty, np.zeros, _add_rows, _col_sum, _add_into, _scale,
                        np.copyto, _blas.matmul_add)


def _denominator(spec: LinearCrossEntropySpec, target, weight):
    """The mean's denominator over all rows, after the class indices are
    checked (all of them, before the first chunk is computed)."""
    ce = spec.ce
    if ce.soft:
        return float(ce.problem.n_rows)
    flat = target.reshape(-1)
    y = np.ascontiguousarray(flat, dtype=np.int64)
    w = None if weight is None else np.ascontiguousarray(weight, dtype=ce.problem.dtype)
    bad, denominator = scan_hard_targets(y, ce.problem.n_classes, ce.ignore_index, w)
    if flat.dtype == np.uint64:
        bad = bad_uint64_target(flat, bad)
    if bad >= 0:
        raise_bad_target(bad, flat, spec.batch_shape, ce.problem.n_classes, ce.ignore_index)
    return denominator


def linear_cross_entropy(spec: LinearCrossEntropySpec, x, w, b, target, weight,
                         with_grad: bool):
    """Loss and, with ``with_grad``, ``(grad_input, grad_w, grad_b)``.

    16-bit ``x``, ``w`` and ``b`` (one dtype) compute in float32: NumPy's
    ``matmul`` has no fast 16-bit path, so each chunk of rows is widened as
    it is taken and ``w`` once (a float32 copy, C x H x 4 bytes); the
    gradients are summed in float32 and rounded to the 16-bit dtype once,
    at the end (so ``grad_input`` is held in float32 until then too).
    """
    dtype = spec.ce.problem.dtype
    denominator = _denominator(spec, target, weight)
    storage = spec.storage
    if storage is None:
        x = np.asarray(x, dtype=dtype)
        w = np.asarray(w, dtype=dtype)
        b = None if b is None else np.asarray(b, dtype=dtype)
    else:
        w = widen(w)
        b = None if b is None else widen(b)
    if spec.ce.soft:
        target = np.asarray(target, dtype=dtype)
    reduction = spec.ce.reduction

    def finish(total, losses):
        if reduction == "none":
            return losses.reshape(spec.batch_shape)
        return finish_loss(total, denominator, reduction, dtype)

    loss, grads = _linear.run(spec, x, w, b, target, weight, denominator, with_grad, OPS,
                              cross_entropy, finish, None if storage is None else widen)
    if grads is None:
        return loss, None
    gx, gw, gb = grads
    if storage is not None:
        gx, gw = narrow(gx, storage), narrow(gw, storage)
        gb = None if gb is None else narrow(gb, storage)
    return loss, (gx.reshape(spec.batch_shape + (spec.hidden,)), gw, gb)
