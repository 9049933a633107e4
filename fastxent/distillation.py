"""Knowledge distillation: a student's logits against a teacher's, fused.

Per row, with temperature T, P = softmax(teacher / T) and
Q = softmax(student / T), the divergence is one of

- ``forward_kl``: KL(P || Q) = sum P (log P - log Q),
- ``reverse_kl``: KL(Q || P),
- ``jsd``: beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q,

times T**2 (Hinton et al.: gradient sizes then do not change with T). With
class indices ``target`` and ``alpha > 0`` a row's loss is
alpha * CE(student at T = 1, target) + (1 - alpha) * divergence.

The teacher is dense (the student's shape) or top-k: a tuple
``(indices, values)`` of the student's shape with k in place of the
classes, every other class being -inf for the teacher; no dense teacher is
built. Each row is one fused pass on the CPU (maxima, log-sum-exps,
divergence, gradient), written over the student's logits with
``inplace=True``. Every share follows torch's ``kl_div`` (xlogy): a
probability of 0 adds 0 times the other log, so a student logit of -inf
where the teacher has mass gives inf, and -inf in both gives nan, as torch.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike

from . import _validate
from .losses import Device, _LossWithGrad

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DistillationReduction = Literal["none", "batchmean", "sum"]
Teacher = Union[ArrayLike, Tuple[ArrayLike, ArrayLike]]


def distillation_loss(student_logits: ArrayLike, teacher_logits: Teacher, *,
                      divergence: Divergence = "forward_kl", beta: float = 0.5,
                      temperature: float = 1.0, target: Optional[ArrayLike] = None,
                      alpha: float = 0.0, ignore_index: int = -100,
                      reduction: DistillationReduction = "batchmean", axis: int = -1,
                      device: Device = "auto") -> Any:
    """Distillation loss of a student's logits against a teacher's.

    Parameters
    ----------
    student_logits : array_like, shape (..., C)
        The student's logits; class axis ``axis`` (``axis=1`` for PyTorch's
        ``(N, C, d1, ...)`` layout). float32 or float64, or float16 or
        ``ml_dtypes.bfloat16`` (computed in float32).
    teacher_logits : array_like or tuple (indices, values)
        Dense: of the student's shape. Top-k: integer ``indices`` and
        ``values`` of the student's shape with k (1 <= k <= C) in place of
        the class axis, each row's indices distinct and in [0, C). Logits
        of the student's dtypes.
    divergence : {"forward_kl", "reverse_kl", "jsd"}, default "forward_kl"
    beta : float in (0, 1), default 0.5
        The JSD's mixture weight of the teacher (used by ``jsd`` only, always checked).
    temperature : float > 0, default 1
        Both distributions are softmaxes of the logits over T; the
        divergence is multiplied by T**2.
    target : array_like of integers, optional
        Class indices of the batch shape. Rows whose target is
        ``ignore_index`` add nothing (and leave ``batchmean``'s count).
    alpha : float in [0, 1], default 0
        The cross-entropy's weight (student at T = 1 against ``target``);
        needs ``target``.
    ignore_index : int, default -100
    reduction : {"batchmean", "sum", "none"}, default "batchmean"
        ``batchmean`` divides the sum by the number of rows not ignored (all
        rows without ``target``).
    axis : int, default -1
    device : {"auto", "cpu", "cuda"}, default "auto"

    Returns
    -------
    Scalar of the computing dtype (float64 if either logits are float64,
    else float32), or the row losses of the batch shape for
    ``reduction="none"``.
    """
    backend, spec, (x, tv, ti, y), _ = _validate.distillation_call(
        student_logits, teacher_logits, divergence, beta, temperature, target, alpha,
        ignore_index, reduction, axis, device, None, False, False)
    return backend.distillation(spec, x, tv, ti, y, None)[0]


def distillation_loss_with_grad(student_logits: ArrayLike, teacher_logits: Teacher, *,
                                divergence: Divergence = "forward_kl", beta: float = 0.5,
                                temperature: float = 1.0, target: Optional[ArrayLike] = None,
                                alpha: float = 0.0, ignore_index: int = -100,
                                reduction: DistillationReduction = "batchmean", axis: int = -1,
                                out: Optional[np.ndarray] = None, inplace: bool = False,
                                device: Device = "auto") -> Tuple[Any, Any]:
    """:func:`distillation_loss` and its gradient with respect to the student's logits.

    Per row (before the reduction's scale and beside alpha's CE share),
    the gradient is T (Q - P) for ``forward_kl``, T Q (log Q - log P - KL(Q || P))
    for ``reverse_kl`` and T (1 - beta) Q (log(Q / M) - KL(Q || M)) for ``jsd``.

    Parameters
    ----------
    out : ndarray, optional
        Array of the student's shape and the computing dtype for the
        gradient; for a 16-bit student computing in float32, also of the
        student's dtype (rounded to nearest even).
    inplace : bool, default False
        Write the gradient over ``student_logits`` (a writable array of the
        computing dtype, or a 16-bit student computing in float32) and
        return it.
    Other parameters as in :func:`distillation_loss`.

    Returns
    -------
    (loss, gradient)
        The gradient is new in the student's dtype for a 16-bit student
        computing in float32, else in the computing dtype.
    """
    backend, spec, (x, tv, ti, y), dest = _validate.distillation_call(
        student_logits, teacher_logits, divergence, beta, temperature, target, alpha,
        ignore_index, reduction, axis, device, out, inplace, True)
    return backend.distillation(spec, x, tv, ti, y, dest)


class DistillationLoss(_LossWithGrad):
    """Distillation loss for training loops.

    ``loss = criterion(student_logits, teacher_logits, target)`` computes the
    loss and its gradient in one pass; ``criterion.backward()`` returns the
    gradient with respect to the student's logits. Options are the keywords
    of :func:`distillation_loss_with_grad`.

    Examples
    --------
    >>> criterion = DistillationLoss(temperature=2.0, alpha=0.5)
    >>> loss = criterion(student, teacher, labels)      # doctest: +SKIP
    >>> dstudent = criterion.backward()                 # doctest: +SKIP
    """

    def __init__(self, *, divergence: Divergence = "forward_kl", beta: float = 0.5,
                 temperature: float = 1.0, alpha: float = 0.0, ignore_index: int = -100,
                 reduction: DistillationReduction = "batchmean", axis: int = -1,
                 inplace: bool = False, device: Device = "auto"):
        super().__init__()
        self.options = dict(divergence=divergence, beta=beta, temperature=temperature,
                            alpha=alpha, ignore_index=ignore_index, reduction=reduction,
                            axis=axis, inplace=inplace, device=device)

    def __call__(self, student_logits: ArrayLike, teacher_logits: Teacher,
                 target: Optional[ArrayLike] = None) -> Any:
        return self._store(distillation_loss_with_grad(student_logits, teacher_logits,
                                                       target=target, **self.options))

    forward = __call__
