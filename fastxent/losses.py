"""Public functions and loss objects, with PyTorch's semantics.

Each function goes one way: its arguments are checked into one spec, which
selects the backend (``_validate``, through ``_dispatch``), and the backend
runs its kernels. Every check runs before any kernel writes, so a
call that raises has written nothing (``inplace=True`` included).

Cross-entropy calls on NumPy arrays keep the CPU backend's prepared call
(``_cpu.CrossEntropyPlan``) keyed by everything the checks looked at: the
arrays' shapes, strides, dtypes and flags, and the option values. A call
with the same key skips the checks and Numba's type dispatch, which is most
of a small batch's time; the class indices are still checked every call,
by the kernel before it writes.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Tuple

import numpy as np
from numpy.typing import ArrayLike

from . import _validate
from ._spec import CrossEntropyStats
from ._validate import (logit_scale_arg, reduction_arg, smoothing_arg, softcap_arg, stats_arg,
                        z_loss_arg)

Reduction = Literal["none", "mean", "sum"]
Device = Literal["auto", "cpu", "cuda"]


def cross_entropy(logits: ArrayLike, target: ArrayLike, *, weight: Optional[ArrayLike] = None,
                  ignore_index: int = -100, reduction: Reduction = "mean",
                  label_smoothing: float = 0.0, z_loss: float = 0.0, logit_scale: float = 1.0,
                  softcap: Optional[float] = None, return_stats: bool = False, axis: int = -1,
                  device: Device = "auto") -> Any:
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
    z_loss : float >= 0, default 0
        PaLM's z-loss: each row's loss gains ``z_loss * lse**2``, lse being
        its log-sum-exp, times the target's class weight (1 for class
        probabilities); ignored rows add nothing, and the reduction is the
        cross-entropy's (same mean denominator). lse is that of the scaled,
        capped logits.
    logit_scale : float, default 1
        The logits are multiplied by it first (flash-attention's ``logit_scale``).
    softcap : float > 0, optional
        Then each scaled logit x becomes ``softcap * tanh(x / softcap)``
        (Gemma 2's final-logit softcapping); the gradient flows through the
        tanh. With ``inplace=True`` nothing of the logits' size is allocated.
    return_stats : bool, default False
        Return a :class:`CrossEntropyStats` as well: each row's ``lse``, the
        reduced ``z_loss`` term alone, the ``accuracy`` of the argmax against
        the targets (class indices only) and each row's ``predicted`` class.
    axis : int, default -1
        The class axis.
    device : {"auto", "cpu", "cuda"}, default "auto"
        ``auto`` runs where the arrays are.

    Returns
    -------
    loss : NumPy scalar of the logits' dtype, or an array of the batch shape
        for ``reduction="none"`` (a device array for GPU inputs).
    stats : CrossEntropyStats
        Only with ``return_stats=True``: ``(loss, stats)``.
    """
    result = _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing,
                            z_loss, logit_scale, softcap, return_stats, axis, device, None,
                            False, with_grad=False)
    if len(result) == 3:
        return result[0], result[2]
    return result[0]


def cross_entropy_with_grad(logits: ArrayLike, target: ArrayLike, *,
                            weight: Optional[ArrayLike] = None, ignore_index: int = -100,
                            reduction: Reduction = "mean", label_smoothing: float = 0.0,
                            z_loss: float = 0.0, logit_scale: float = 1.0,
                            softcap: Optional[float] = None, return_stats: bool = False,
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
        With ``return_stats=True``: ``(loss, grad, stats)``.
    """
    return _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing,
                          z_loss, logit_scale, softcap, return_stats, axis, device, out, inplace,
                          with_grad=True)


#: Prepared CPU cross-entropy calls, by ``_plan_key``.
_PLANS: dict = {}
#: Plans kept at most (the cache is emptied when full).
MAX_PLANS = 256


def _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                   logit_scale, softcap, return_stats, axis, device, out, inplace, with_grad):
    key = None
    if out is None and type(logits) is np.ndarray and type(target) is np.ndarray:
        # What a plan depends on. ``flags.num`` holds every flag of the
        # logits at once (a read-only array is refused for ``inplace=True``;
        # alignment is part of the compiled types).
        if weight is None:
            weight_key = None
        elif type(weight) is np.ndarray:
            weight_key = (weight.shape, weight.strides, weight.dtype)
        else:
            weight_key = False
        if weight_key is not False:
            key = (logits.shape, logits.strides, logits.dtype, logits.flags.num, target.shape,
                   target.strides, target.dtype, weight_key, ignore_index, reduction,
                   label_smoothing, z_loss, logit_scale, softcap, return_stats, axis, device,
                   inplace, with_grad)
            try:
                plan = _PLANS.get(key)
            except TypeError:  # an unhashable option, refused by the checks below
                plan = key = None
            if plan is not None:
                return plan(logits, target, weight)
    backend, spec, (x, t, w), grad = _validate.cross_entropy_call(
        logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, logit_scale,
        softcap, return_stats, axis, device, out, inplace, with_grad)
    if key is not None and spec.device == "cpu":
        plan = backend.CrossEntropyPlan(spec, x, t, grad)
        if plan.fast:
            if len(_PLANS) >= MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
        return plan(x, t, w, grad)
    return backend.cross_entropy(spec, x, t, w, grad)


def nll_loss(log_probs: ArrayLike, target: ArrayLike, *, weight: Optional[ArrayLike] = None,
             ignore_index: int = -100, reduction: Reduction = "mean", axis: int = -1,
             device: Device = "auto") -> Any:
    """Negative log-likelihood of class indices, as ``torch.nn.functional.nll_loss``.

    ``log_probs`` holds log-probabilities (e.g. from :func:`log_softmax`);
    the loss of a row is ``-weight[t] * log_probs[t]``. Other arguments as in
    :func:`cross_entropy` (class indices only).
    """
    backend, spec, (lp, t, w) = _validate.nll_call(log_probs, target, weight, ignore_index,
                                                   reduction, axis, device)
    return backend.nll_loss(spec, lp, t, w)


def _softmax(x, axis, out, device, log):
    if np.ndim(x) == 0:
        # one class: softmax 1, log_softmax 0, as torch gives for a 0-d tensor
        return _softmax_scalar(x, axis, out, device, log)
    backend, spec, xa = _validate.softmax_call(x, axis, out, device)
    return backend.softmax(spec.problem, xa, out, log)


def _softmax_scalar(x, axis, out, device, log):
    """softmax of a 0-d array: the one-class case, run as shape (1,)."""
    _validate.axis_arg(axis, 1, "x")
    flat_out = None if out is None else out.reshape(1)
    result = _softmax(x.reshape(1) if hasattr(x, "reshape") else np.reshape(x, 1), 0, flat_out,
                      device, log)
    return out if out is not None else result.reshape(())


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


def logsumexp(x: ArrayLike, axis: int | Tuple[int, ...] = -1, *, keepdims: bool = False,
              device: Device = "auto") -> Any:
    """``log(sum(exp(x)))`` along ``axis``, as ``torch.logsumexp`` and
    ``scipy.special.logsumexp``.

    ``axis`` may be a tuple of axes (all reduced at once; ``()`` reduces
    none), and a 0-d ``x`` takes axis 0 or -1 (its value is its logsumexp).
    Rows of ``-inf`` give ``-inf``, rows holding ``+inf`` give ``+inf``, and an
    empty axis gives ``-inf``. Returns an array of ``x``'s shape without the
    axes, or with them kept as size 1 for ``keepdims=True``: float32 for
    float16 and bfloat16 ``x`` (one axis or a tuple, CPU and GPU), else
    ``x``'s float dtype (float64 for integers).
    """
    if isinstance(axis, tuple) or keepdims or np.ndim(x) == 0:
        backend, spec, xa = _validate.logsumexp_axes_call(x, axis, keepdims, device)
        return backend.logsumexp_axes(spec, xa)
    backend, spec, xa = _validate.logsumexp_call(x, axis, device)
    return backend.logsumexp(spec.problem, xa)


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
    backend, spec, (x, t, w, pw), grad = _validate.bce_call(
        logits, target, weight, pos_weight, reduction, device, out, inplace, with_grad)
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
        loss, self._grad = result[:2]
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
                 reduction: Reduction = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, logit_scale: float = 1.0, softcap: Optional[float] = None,
                 return_stats: bool = False, axis: int = -1, inplace: bool = False,
                 device: Device = "auto"):
        super().__init__()
        self.options = dict(weight=weight, ignore_index=ignore_index,
                            reduction=reduction_arg(reduction),
                            label_smoothing=smoothing_arg(label_smoothing),
                            z_loss=z_loss_arg(z_loss), logit_scale=logit_scale_arg(logit_scale),
                            softcap=softcap if softcap is None else softcap_arg(softcap),
                            return_stats=stats_arg(return_stats), axis=axis, inplace=inplace,
                            device=device)
        #: The last call's ``CrossEntropyStats`` (with ``return_stats=True``), else None.
        self.stats: Optional[CrossEntropyStats] = None

    def __call__(self, logits: ArrayLike, target: ArrayLike) -> Any:
        result = cross_entropy_with_grad(logits, target, **self.options)
        self.stats = result[2] if len(result) == 3 else None
        return self._store(result)

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
