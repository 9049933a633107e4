"""Public functions and loss objects, with PyTorch's semantics.

Every function checks its arguments completely before any kernel runs, so a
call that raises has written nothing (``inplace=True`` included).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Tuple

import numpy as np
from numpy.typing import ArrayLike

from . import _dispatch
from ._validate import (bce_spec, check_grad_out, check_inplace, class_problem,
                        cross_entropy_spec, reduction_arg, smoothing_arg)

Reduction = Literal["none", "mean", "sum"]
Device = Literal["auto", "cpu", "cuda"]


def _grad_destination(logits, out, inplace, dtype):
    """"new", or the array the gradient is written into (checked)."""
    if inplace:
        if out is not None and out is not logits:
            raise ValueError("pass either out= or inplace=True, not both")
        check_inplace(logits)
        return logits
    if out is not None:
        check_grad_out(out, logits.shape, dtype)
        return out
    return "new"


def cross_entropy(logits: ArrayLike, target: ArrayLike, *, weight: Optional[ArrayLike] = None,
                  ignore_index: int = -100, reduction: Reduction = "mean",
                  label_smoothing: float = 0.0, axis: int = -1, device: Device = "auto") -> Any:
    """Cross-entropy between logits and class targets, as ``torch.nn.functional.cross_entropy``.

    Parameters
    ----------
    logits : array_like, shape (..., C) or (C,)
        Unnormalized scores; the class axis is ``axis`` (last by default, use
        ``axis=1`` for PyTorch's ``(N, C, d1, ...)`` layout). float32 or
        float64; integers are converted to float64.
    target : array_like
        Class indices (any integer dtype) of the logits' shape without the
        class axis, or class probabilities (floats) of the logits' shape.
    weight : array_like of shape (C,), optional
        A rescaling weight per class.
    ignore_index : int, default -100
        Class index whose targets add nothing to the loss or to the mean's
        denominator (hard targets only). May be a valid class index.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``mean`` divides the sum of weighted losses by the sum of the weights
        of the targets not ignored (by the number of rows for probabilities).
    label_smoothing : float in [0, 1], default 0
        Mixes the target with the uniform distribution, as in PyTorch.
    axis : int, default -1
        The class axis.
    device : {"auto", "cpu", "cuda"}, default "auto"
        ``auto`` runs where the arrays are.

    Returns
    -------
    loss : NumPy scalar of the logits' dtype, or an array of the batch shape
        for ``reduction="none"`` (a device array for GPU inputs).
    """
    loss, _ = _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing,
                             axis, device, None, False, with_grad=False)
    return loss


def cross_entropy_with_grad(logits: ArrayLike, target: ArrayLike, *,
                            weight: Optional[ArrayLike] = None, ignore_index: int = -100,
                            reduction: Reduction = "mean", label_smoothing: float = 0.0,
                            axis: int = -1, out: Optional[np.ndarray] = None,
                            inplace: bool = False, device: Device = "auto") -> Tuple[Any, Any]:
    """Cross-entropy and its gradient with respect to the logits, in one pass.

    Takes the arguments of :func:`cross_entropy`, and:

    Parameters
    ----------
    out : ndarray, optional
        Array of the logits' shape and dtype to write the gradient into.
    inplace : bool, default False
        Write the gradient over ``logits`` (which must be a writable float32
        or float64 array) and return it: no new array of the logits' size.

    Returns
    -------
    loss, grad
        ``grad`` is d loss / d logits; for ``reduction="none"`` the gradient
        of the sum of the per-element losses (``loss.sum().backward()``).
    """
    return _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing,
                          axis, device, out, inplace, with_grad=True)


def _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing, axis,
                   device, out, inplace, with_grad):
    backend, (x, t, w) = _dispatch.select(device, logits, target, weight)
    if inplace and x is not logits and not _dispatch.on_gpu(logits):
        # A list cannot receive the gradient. (GPU logits are converted to a
        # zero-copy device view, which can.)
        check_inplace(logits)
    out = _dispatch.destination(backend, out)
    spec = cross_entropy_spec(x, t, w, ignore_index, reduction, label_smoothing, axis)
    grad = _grad_destination(x, out, inplace, spec.problem.dtype) if with_grad else None
    return backend.cross_entropy(spec, x, t, w, grad)


def nll_loss(log_probs: ArrayLike, target: ArrayLike, *, weight: Optional[ArrayLike] = None,
             ignore_index: int = -100, reduction: Reduction = "mean", axis: int = -1,
             device: Device = "auto") -> Any:
    """Negative log-likelihood of class indices, as ``torch.nn.functional.nll_loss``.

    ``log_probs`` holds log-probabilities (e.g. from :func:`log_softmax`);
    the loss of a row is ``-weight[t] * log_probs[t]``. Other arguments as in
    :func:`cross_entropy` (class indices only).
    """
    backend, (lp, t, w) = _dispatch.select(device, log_probs, target, weight)
    if np.dtype(t.dtype).kind not in "iu":
        raise TypeError(f"nll_loss needs integer class indices as target, got dtype {t.dtype}")
    spec = cross_entropy_spec(lp, t, w, ignore_index, reduction, 0.0, axis, "log_probs")
    return backend.nll_loss(spec, lp, t, w)


def _softmax(x, axis, out, device, log):
    if out is not None and not (hasattr(out, "shape") and hasattr(out, "dtype")):
        # checked before dispatch, which would turn a list into a new array
        # that the result is written to and the caller never sees
        raise TypeError(f"out must be an array, got {type(out).__name__}")
    backend, (xa, o) = _dispatch.select(device, x, out)
    problem = class_problem(xa, axis, "x")
    if o is not None:
        check_grad_out(o, xa.shape, problem.dtype)
    return backend.softmax(problem, xa, o, log)


def log_softmax(x: ArrayLike, axis: int = -1, out: Optional[np.ndarray] = None, *,
                device: Device = "auto") -> Any:
    """``x - logsumexp(x)`` along ``axis``, as ``torch.log_softmax``.

    ``out`` may be ``x`` itself (computed in place).
    """
    return _softmax(x, axis, out, device, log=True)


def softmax(x: ArrayLike, axis: int = -1, out: Optional[np.ndarray] = None, *,
            device: Device = "auto") -> Any:
    """``exp(x - logsumexp(x))`` along ``axis``, as ``torch.softmax``.

    ``out`` may be ``x`` itself (computed in place).
    """
    return _softmax(x, axis, out, device, log=False)


def logsumexp(x: ArrayLike, axis: int = -1, *, device: Device = "auto") -> Any:
    """``log(sum(exp(x)))`` along ``axis``, as ``torch.logsumexp``.

    Rows of ``-inf`` give ``-inf``, rows holding ``+inf`` give ``+inf``, and an
    empty axis gives ``-inf``. Returns an array of ``x``'s shape without ``axis``.
    """
    backend, (xa,) = _dispatch.select(device, x)
    problem = class_problem(xa, axis, "x", allow_empty=True)
    return backend.logsumexp(problem, xa)


def binary_cross_entropy_with_logits(logits: ArrayLike, target: ArrayLike, *,
                                     weight: Optional[ArrayLike] = None,
                                     pos_weight: Optional[ArrayLike] = None,
                                     reduction: Reduction = "mean",
                                     device: Device = "auto") -> Any:
    """Binary cross-entropy on logits, as ``torch.nn.functional.binary_cross_entropy_with_logits``.

    Parameters
    ----------
    logits, target : array_like of the same shape
        Scores and target probabilities in [0, 1].
    weight : array_like, optional
        Broadcast to the logits' shape; multiplies each element's loss.
    pos_weight : array_like, optional
        Weight of the positive term, broadcast to the logits' shape (one per
        class along the last axis, typically).
    reduction : {"mean", "sum", "none"}
        ``mean`` averages over all elements.
    """
    loss, _ = _bce(logits, target, weight, pos_weight, reduction, device, None, False, False)
    return loss


def binary_cross_entropy_with_logits_with_grad(
        logits: ArrayLike, target: ArrayLike, *, weight: Optional[ArrayLike] = None,
        pos_weight: Optional[ArrayLike] = None, reduction: Reduction = "mean",
        out: Optional[np.ndarray] = None, inplace: bool = False,
        device: Device = "auto") -> Tuple[Any, Any]:
    """:func:`binary_cross_entropy_with_logits` and its gradient, in one pass.

    ``out`` and ``inplace`` as in :func:`cross_entropy_with_grad`.
    """
    return _bce(logits, target, weight, pos_weight, reduction, device, out, inplace, True)


def _bce(logits, target, weight, pos_weight, reduction, device, out, inplace, with_grad):
    backend, (x, t, w, pw) = _dispatch.select(device, logits, target, weight, pos_weight)
    if inplace and x is not logits and not _dispatch.on_gpu(logits):
        check_inplace(logits)
    out = _dispatch.destination(backend, out)
    spec = bce_spec(x, t, w, pw, reduction)
    grad = _grad_destination(x, out, inplace, spec.dtype) if with_grad else None
    return backend.bce_with_logits(spec, x, t, w, pw, grad)


class _LossWithGrad:
    """Shared call/backward protocol of the loss objects."""

    def __init__(self):
        self._grad = None

    def backward(self) -> Any:
        """The gradient of the last call's loss with respect to its logits."""
        if self._grad is None:
            raise RuntimeError("backward() needs a loss computed first: call the loss object "
                               "on logits and targets")
        return self._grad

    def _store(self, result):
        loss, self._grad = result
        return loss


class CrossEntropyLoss(_LossWithGrad):
    """Cross-entropy for training loops, as ``torch.nn.CrossEntropyLoss``.

    ``loss = criterion(logits, target)`` computes the loss and its gradient
    in one pass; ``criterion.backward()`` returns that gradient. Options are
    the keywords of :func:`cross_entropy_with_grad`; with ``inplace=True``
    the gradient overwrites the logits.

    Examples
    --------
    >>> criterion = CrossEntropyLoss(label_smoothing=0.1)
    >>> loss = criterion(logits, labels)      # doctest: +SKIP
    >>> dlogits = criterion.backward()        # doctest: +SKIP
    """

    def __init__(self, *, weight: Optional[ArrayLike] = None, ignore_index: int = -100,
                 reduction: Reduction = "mean", label_smoothing: float = 0.0, axis: int = -1,
                 inplace: bool = False, device: Device = "auto"):
        super().__init__()
        self.options = dict(weight=weight, ignore_index=ignore_index,
                            reduction=reduction_arg(reduction),
                            label_smoothing=smoothing_arg(label_smoothing), axis=axis,
                            inplace=inplace, device=device)

    def __call__(self, logits: ArrayLike, target: ArrayLike) -> Any:
        return self._store(cross_entropy_with_grad(logits, target, **self.options))

    forward = __call__


class BCEWithLogitsLoss(_LossWithGrad):
    """Binary cross-entropy on logits for training loops, as ``torch.nn.BCEWithLogitsLoss``.

    ``loss = criterion(logits, target)``, then ``criterion.backward()``
    returns d loss / d logits. Options as in
    :func:`binary_cross_entropy_with_logits_with_grad`.
    """

    def __init__(self, *, weight: Optional[ArrayLike] = None,
                 pos_weight: Optional[ArrayLike] = None, reduction: Reduction = "mean",
                 inplace: bool = False, device: Device = "auto"):
        super().__init__()
        self.options = dict(weight=weight, pos_weight=pos_weight,
                            reduction=reduction_arg(reduction), inplace=inplace, device=device)

    def __call__(self, logits: ArrayLike, target: ArrayLike) -> Any:
        return self._store(binary_cross_entropy_with_logits_with_grad(logits, target,
                                                                      **self.options))

    forward = __call__
