"""The softmax Jacobian: backward of softmax and log_softmax, the full
Jacobian, and the Hessian-vector product of cross-entropy.

With p = softmax(x) along the class axis, the Jacobian is
J = diag(p) - p p^T (D_j p_i = p_i (delta_ij - p_j)). It is symmetric, and
it is the Hessian of logsumexp, so also of cross-entropy up to each row's
weight in the loss (see ``docs/design.md``). Each function goes the way of
``losses``: arguments checked into one spec (``_validate``), then the
backend of the arrays' device runs one fused pass per row.

float16 and bfloat16 arrays compute in float32 and give their result in
their 16-bit dtype, rounded to nearest even. The 16-bit arrays of one call
share one 16-bit dtype; the others beside them must be float32 (another
16-bit dtype, float64 or integers: a TypeError naming the argument).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from numpy.typing import ArrayLike

from . import _validate
from .losses import Device, Reduction


def softmax_backward(grad_output: ArrayLike, output: ArrayLike, *, axis: int = -1,
                     out: Optional[np.ndarray] = None, inplace: bool = False,
                     device: Device = "auto") -> Any:
    """Gradient with respect to softmax's input, as ``torch._softmax_backward_data``.

    ``output * (grad_output - sum(grad_output * output, axis))``: J^T g for
    J = diag(p) - p p^T the Jacobian of ``p = softmax(x, axis)``. J is
    symmetric, so this is also the forward-mode (Jacobian-vector) product
    J v with ``grad_output = v``.

    Parameters
    ----------
    grad_output : array_like
        The gradient with respect to softmax's output (or the tangent v).
    output : array_like
        softmax's output p, of ``grad_output``'s shape.
    axis : int, default -1
        The class axis softmax was taken along.
    out : ndarray, optional
        Array of the inputs' shape and of the result's dtype to write the
        result into (with 16-bit inputs: that 16-bit dtype or float32).
    inplace : bool, default False
        Write the result over ``grad_output`` (a writable float array of
        ``output``'s dtype) and return it.
    device : {"auto", "cpu", "cuda"}, default "auto"
        ``auto`` runs where the arrays are.

    Returns
    -------
    ndarray (or a device array for GPU inputs) of the inputs' shape, in
    float64 if either input is float64, in the 16-bit dtype if either is
    float16 or bfloat16 (computed in float32), else float32.
    """
    return _backward(grad_output, output, axis, out, inplace, device, log=False)


def log_softmax_backward(grad_output: ArrayLike, output: ArrayLike, *, axis: int = -1,
                         out: Optional[np.ndarray] = None, inplace: bool = False,
                         device: Device = "auto") -> Any:
    """Gradient with respect to log_softmax's input, as ``torch._log_softmax_backward_data``.

    ``grad_output - exp(output) * sum(grad_output, axis)``, ``output`` being
    log_softmax's output (the Jacobian of log p is I - 1 p^T). Arguments and
    result as in :func:`softmax_backward`.
    """
    return _backward(grad_output, output, axis, out, inplace, device, log=True)


def _backward(grad_output, output, axis, out, inplace, device, log):
    backend, spec, (go, o), dest = _validate.softmax_backward_call(grad_output, output, axis,
                                                                   out, inplace, device)
    return backend.softmax_backward(spec.problem, go, o, dest, log)


def softmax_jacobian(x: ArrayLike, *, axis: int = -1, device: Device = "auto") -> Any:
    """The Jacobian of ``softmax(x, axis)`` for every row: diag(p) - p p^T.

    Computed from the logits with the max shift (logits of any size), as
    ``torch.autograd.functional.jacobian`` of softmax row by row. Meant for
    few classes (teaching, checking, second-order methods on small C): the
    result holds C times as many values as ``x``.

    Returns
    -------
    ndarray of shape ``batch_shape + (C, C)``, ``batch_shape`` being the
    shape of ``x`` without ``axis``; ``result[..., i, j]`` = d p_i / d x_j
    = p_i (delta_ij - p_j). In ``x``'s dtype: float16 and bfloat16 ``x``
    compute in float32, rounded to nearest even at the end.
    """
    backend, spec, xa = _validate.softmax_jacobian_call(x, axis, device)
    return backend.softmax_jacobian(spec.problem, xa)


def cross_entropy_hvp(logits: ArrayLike, target: ArrayLike, vector: ArrayLike, *,
                      weight: Optional[ArrayLike] = None, ignore_index: int = -100,
                      reduction: Reduction = "mean", label_smoothing: float = 0.0,
                      z_loss: float = 0.0, logit_scale: float = 1.0,
                      softcap: Optional[float] = None, axis: int = -1,
                      out: Optional[np.ndarray] = None, device: Device = "auto") -> Any:
    """The Hessian of :func:`~fastxent.cross_entropy` with respect to the logits, times ``vector``.

    What PyTorch's double backward gives
    (``torch.func.jvp(torch.func.grad(loss), (logits,), (vector,))``), in one
    pass: per row, ``alpha * (p * v - p * (p . v)) + beta * p * (p . v)``
    with p the row's softmax, ``alpha`` its weight in the loss (the target's
    class weight with label smoothing's share, the total weighted target
    mass for class probabilities, 0 for an ignored row, over the mean's
    denominator) and ``beta`` from the z-loss (see ``docs/design.md``).
    With ``logit_scale`` or ``softcap`` the loss reads u = f(x), and the
    product is f' * (H_u (f' * v)) + r * f'' * v, r the gradient in u.

    Parameters
    ----------
    logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, axis
        As in :func:`~fastxent.cross_entropy` (every target kind and layout).
    logit_scale, softcap
        As in :func:`~fastxent.cross_entropy`: the Hessian of the loss of the
        scaled and capped logits, with respect to the logits as given.
        ``reduction="none"`` gives each row's own Hessian, as ``"sum"``.
    vector : array_like
        The direction, of the logits' shape.
    out : ndarray, optional
        Array of the logits' shape and of the result's dtype to write the
        product into (with 16-bit inputs: that 16-bit dtype or float32).
    device : {"auto", "cpu", "cuda"}, default "auto"

    Returns
    -------
    ndarray (or a device array for GPU inputs) of the logits' shape and
    dtype; float16 or bfloat16 where the logits or ``vector`` are (computed in
    float32, the other one float32 or of the same 16-bit dtype; 16-bit soft
    targets and weights are taken as :func:`~fastxent.cross_entropy` takes
    them and do not set the result's dtype).
    """
    backend, spec, (x, t, v, w), out = _validate.cross_entropy_hvp_call(
        logits, target, vector, weight, ignore_index, reduction, label_smoothing, z_loss,
        logit_scale, softcap, axis, device, out)
    return backend.cross_entropy_hvp(spec, x, t, v, w, out)
