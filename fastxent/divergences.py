"""KL divergence and binary cross-entropy on probabilities, with PyTorch's
semantics (``torch.nn.functional.kl_div`` and ``binary_cross_entropy``).

Both are elementwise: one pass over the input and the target (and the
weight), the loss summed in a fixed order (the same bits for any number of
threads), the gradient with respect to the input written in the same pass,
over the input itself when asked (``inplace=True``).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Tuple

import numpy as np
from numpy.typing import ArrayLike

from . import _validate
from .losses import _LossWithGrad

KLReduction = Literal["none", "mean", "sum", "batchmean"]
Reduction = Literal["none", "mean", "sum"]
Device = Literal["auto", "cpu", "cuda"]


def kl_div(input: ArrayLike, target: ArrayLike, *, reduction: KLReduction = "mean",
           log_target: bool = False, axis: int = -1, device: Device = "auto") -> Any:
    """KL divergence of ``target`` from ``input``, as ``torch.nn.functional.kl_div``.

    Parameters
    ----------
    input : array_like
        Log-probabilities (e.g. from :func:`fastxent.log_softmax`): float32,
        float64, or float16 and ``ml_dtypes.bfloat16``, computed in float32
        (integers become float64).
    target : array_like of the same shape
        Probabilities, or log-probabilities with ``log_target=True``, of any
        of those dtypes.
    reduction : {"mean", "batchmean", "sum", "none"}
        As torch: ``mean`` averages over every element (torch's default,
        which is not the KL divergence of the rows); ``batchmean`` divides the
        sum by the size of the first axis, ``input.size(0)`` (the number of
        distributions of an (N, C) input; nothing for a 0-d input).
    log_target : bool, default False
        ``target`` holds log-probabilities. Without it, a target of 0 adds
        0 (``xlogy(0, 0) = 0``, as torch), unless the input there is infinite.
    axis : int, default -1
        The axis along which each distribution lies, checked to exist (the
        functions are elementwise; ``batchmean`` is torch's, above).

    Returns
    -------
    loss
        A scalar of the input's float type, or for ``reduction="none"`` an
        array of the input's shape holding ``target * (log(target) - input)``;
        float32 for 16-bit inputs.
    """
    loss, _ = _kl(input, target, reduction, log_target, axis, device, None, False, False)
    return loss


def kl_div_with_grad(input: ArrayLike, target: ArrayLike, *, reduction: KLReduction = "mean",
                     log_target: bool = False, axis: int = -1,
                     out: Optional[np.ndarray] = None, inplace: bool = False,
                     device: Device = "auto") -> Tuple[Any, Any]:
    """:func:`kl_div` and its gradient with respect to ``input``, in one pass.

    ``out`` and ``inplace`` as in :func:`fastxent.cross_entropy_with_grad`
    (``inplace=True`` writes the gradient over ``input``). For
    ``reduction="none"`` the gradient is that of the sum of the elements.
    The gradient has the input's dtype: a 16-bit input's is computed in
    float32 and rounded to nearest even, and ``out=`` may then be of the
    input's dtype or float32 (not the other 16-bit one).
    """
    return _kl(input, target, reduction, log_target, axis, device, out, inplace, True)


def _kl(input, target, reduction, log_target, axis, device, out, inplace, with_grad):
    if out is None and reduction in ("mean", "sum", "batchmean") and type(log_target) is bool:
        result = _small(input, target, "kl_log_target" if log_target else "kl", reduction, axis,
                        device, inplace, with_grad)
        if result is not None:
            return result
    backend, spec, (x, t, w), grad = _validate.kl_div_call(
        input, target, reduction, log_target, axis, device, out, inplace, with_grad)
    return backend.divergence(spec, x, t, w, grad)


def binary_cross_entropy(input: ArrayLike, target: ArrayLike, *,
                         weight: Optional[ArrayLike] = None, reduction: Reduction = "mean",
                         device: Device = "auto") -> Any:
    """Binary cross-entropy of probabilities, as ``torch.nn.functional.binary_cross_entropy``.

    Parameters
    ----------
    input : array_like
        Probabilities in [0, 1]; anything outside (or NaN) raises
        ``ValueError`` before anything is written. Each log is clamped at
        -100, as torch, so inputs of exactly 0 and 1 give finite losses.
        float32, float64, or float16 and ``ml_dtypes.bfloat16`` (computed in
        float32, the loss float32).
    target : array_like of the same shape
        Target probabilities, of any of those dtypes.
    weight : array_like, optional
        Broadcast to the input's shape; multiplies each element's loss. Any
        float dtype.
    reduction : {"mean", "sum", "none"}
        ``mean`` averages over all elements.
    """
    loss, _ = _bce(input, target, weight, reduction, device, None, False, False)
    return loss


def binary_cross_entropy_with_grad(input: ArrayLike, target: ArrayLike, *,
                                   weight: Optional[ArrayLike] = None,
                                   reduction: Reduction = "mean",
                                   out: Optional[np.ndarray] = None, inplace: bool = False,
                                   device: Device = "auto") -> Tuple[Any, Any]:
    """:func:`binary_cross_entropy` and its gradient with respect to ``input``.

    The gradient is torch's, ``weight (input - target) / max(input (1 - input), 1e-12)``
    (finite at 0 and 1; for float16 inputs of exactly 0 or 1 it overflows to
    infinity when rounded). ``out``, ``inplace`` and 16-bit gradients as in
    :func:`kl_div_with_grad`.
    """
    return _bce(input, target, weight, reduction, device, out, inplace, True)


def _bce(input, target, weight, reduction, device, out, inplace, with_grad):
    if out is None and weight is None and reduction in ("mean", "sum"):
        result = _small(input, target, "bce", reduction, -1, device, inplace, with_grad)
        if result is not None:
            return result
    backend, spec, (x, t, w), grad = _validate.binary_cross_entropy_call(
        input, target, weight, reduction, device, out, inplace, with_grad)
    return backend.divergence(spec, x, t, w, grad)


def _small(input, target, kind, reduction, axis, device, inplace, with_grad):
    """The small-batch fast path: a reduced loss of two C-contiguous NumPy
    arrays of one float dtype and shape, too small for the threads, run on
    the serial kernel without the general checks (the same bits as the
    general path, which sees them as one flat row too). None when the call
    is not of that kind; the general path then checks and runs it."""
    if (type(input) is not np.ndarray or type(target) is not np.ndarray
            or device not in ("auto", "cpu") or type(axis) is not int):
        return None
    dtype = input.dtype
    if (dtype not in _FLOATS or target.dtype != dtype or input.shape != target.shape
            or not 0 < input.size < _SMALL or not -input.ndim <= axis < input.ndim
            or not input.flags.c_contiguous or not target.flags.c_contiguous
            or (inplace and not (with_grad and input.flags.writeable))):
        return None
    from . import _cpu
    return _cpu.divergence_small(input, target, kind, reduction, axis, inplace, with_grad)


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
#: Elements below which the kernels run serially (``_cpu_kernels._Kernel``).
_SMALL = 1 << 16


class KLDivLoss(_LossWithGrad):
    """KL divergence for training loops, as ``torch.nn.KLDivLoss``.

    ``loss = criterion(input, target)`` computes the loss and its gradient
    with respect to ``input`` in one pass; ``criterion.backward()`` returns
    that gradient. Options are the keywords of :func:`kl_div_with_grad`;
    with ``inplace=True`` the gradient overwrites the input.
    """

    def __init__(self, *, reduction: KLReduction = "mean", log_target: bool = False,
                 axis: int = -1, inplace: bool = False, device: Device = "auto"):
        super().__init__()
        self.reduction = _validate.kl_reduction_arg(reduction)
        self.log_target = log_target
        self.axis = axis
        self.inplace = inplace
        self.device = device

    def __call__(self, input: ArrayLike, target: ArrayLike) -> Any:
        return self._store(kl_div_with_grad(input, target, reduction=self.reduction,
                                            log_target=self.log_target, axis=self.axis,
                                            inplace=self.inplace, device=self.device))

    forward = __call__
