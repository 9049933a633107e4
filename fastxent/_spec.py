"""The records a checked call is described by: its problem, its options.

``_validate`` builds them from a call's arguments; the backends and their
kernels read them. Nothing here checks or computes anything.

An option of cross-entropy is a field of :class:`CEOptions`, which the
kernels receive as one argument. Whether an optional array option is given
is its type (an array, or ``None``), so the kernels are compiled with or
without it: a new option is a field here, a check in ``_validate``, a
formula in ``_formulas`` and its tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import numpy as np


@dataclass(frozen=True)
class ClassProblem:
    """Shapes of an input with a class axis, in the kernels' terms.

    The input is seen as ``outer x C x inner``: ``outer`` is the product of the
    dimensions before the class axis, ``inner`` of those after it. Rows (one
    loss each) are indexed in C order over the batch shape.
    """

    shape: tuple
    axis: int
    dtype: np.dtype

    @property
    def n_classes(self) -> int:
        return self.shape[self.axis]

    @property
    def batch_shape(self) -> tuple:
        return self.shape[: self.axis] + self.shape[self.axis + 1 :]

    @property
    def n_rows(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def outer(self) -> int:
        return math.prod(self.shape[: self.axis])

    @property
    def inner(self) -> int:
        return math.prod(self.shape[self.axis + 1 :])


class CEOptions(NamedTuple):
    """The options of a cross-entropy call, as its kernels receive them.

    ``weight`` is a contiguous array of one value per class in the logits'
    dtype, or ``None``; ``mean`` says the gradient is scaled by one over the
    mean's denominator (the sum of the weights of the targets not ignored,
    or the number of rows for class probabilities); ``z_loss`` is the
    coefficient of each row's lse**2 added to its loss. The logits are
    first multiplied by ``logit_scale``, then, when ``softcap`` is not 0, replaced by
    ``softcap * tanh(x / softcap)``; the kernels compute the loss of these
    transformed logits and multiply the gradient by their derivative.
    """

    weight: Optional[np.ndarray]
    ignore_index: int
    smoothing: float
    mean: bool
    z_loss: float
    logit_scale: float = 1.0
    softcap: float = 0.0  # 0: none


@dataclass(frozen=True)
class CrossEntropySpec:
    """A checked cross-entropy (or NLL) call, independent of the device."""

    problem: ClassProblem
    soft: bool  # class probabilities rather than class indices
    reduction: str
    smoothing: float
    ignore_index: int
    device: str  # "cpu" or "cuda"
    z_loss: float = 0.0
    logit_scale: float = 1.0
    softcap: float = 0.0  # 0: none
    stats: bool = False  # return_stats: the per-row statistics too

    @property
    def transformed(self) -> bool:
        """Whether the logits are scaled or capped before the loss."""
        return self.logit_scale != 1.0 or self.softcap != 0.0


class CrossEntropyStats(NamedTuple):
    """Statistics of a cross-entropy call's rows (``return_stats=True``).

    Attributes
    ----------
    lse : ndarray
        Each row's log-sum-exp of the (scaled, capped) logits, of the batch
        shape and the logits' float dtype (ignored rows included).
    z_loss : float
        The z-loss term alone (``z_loss * lse**2`` per row, weighted), reduced
        as the loss is: a scalar of the logits' dtype, or per row for
        ``reduction="none"``.
    accuracy : float or None
        The fraction of the rows not ignored whose ``predicted`` equals the
        target; NaN when every row is ignored; None for class probabilities.
    predicted : ndarray of int64
        Each row's argmax of the logits as given (the first index of the
        maximum on ties, a NaN counting as the maximum, as ``torch.argmax``).
    """

    lse: Any
    z_loss: Any
    accuracy: Optional[float]
    predicted: Any


@dataclass(frozen=True)
class SoftmaxSpec:
    """A checked softmax, log_softmax or logsumexp call."""

    problem: ClassProblem
    device: str


@dataclass(frozen=True)
class BCESpec:
    """A checked binary cross-entropy call (elementwise)."""

    shape: tuple
    dtype: np.dtype
    reduction: str
    device: str


@dataclass(frozen=True)
class ReductionSpec:
    """A checked logsumexp over any set of axes (a tuple, possibly empty, of
    distinct non-negative axes) of an array of ``shape``."""

    shape: tuple
    axes: tuple
    keepdims: bool
    dtype: np.dtype
    device: str

    @property
    def kept_shape(self) -> tuple:
        """The result's shape: the axes removed, or kept as 1."""
        if self.keepdims:
            return tuple(1 if a in self.axes else n for a, n in enumerate(self.shape))
        return tuple(n for a, n in enumerate(self.shape) if a not in self.axes)

# --------------------------------------------------------------------------
# Fused linear + cross-entropy (``linear``)


@dataclass(frozen=True)
class LinearCrossEntropySpec:
    """A checked linear + cross-entropy call: logits = input @ W.T + b.

    ``ce`` is the cross-entropy of the (N, C) logits the call stands for
    (never made); ``batch_shape`` is the input's shape without its last
    (hidden) axis; ``chunk_rows`` the rows taken at a time; ``storage``
    the 16-bit dtype of the input, weight and bias (None when they are in
    ``ce``'s dtype, float32 or float64).
    """

    ce: CrossEntropySpec
    batch_shape: tuple
    hidden: int
    chunk_rows: int
    storage: object = None

    @property
    def n_rows(self) -> int:
        return self.ce.problem.n_rows


# --------------------------------------------------------------------------
# Divergences on probabilities (``divergences``)


@dataclass(frozen=True)
class DivergenceSpec:
    """A checked elementwise divergence call: ``kind`` is "kl",
    "kl_log_target" or "bce"; ``n_rows`` the divisor of "batchmean" (the
    number of distributions along the call's axis)."""

    shape: tuple
    dtype: np.dtype
    reduction: str
    kind: str
    n_rows: int
    device: str


# --------------------------------------------------------------------------
# Distillation losses (``distillation``)


@dataclass(frozen=True)
class DistillationSpec:
    """A checked distillation call. ``problem`` is the student's logits;
    ``topk`` the teacher's k for a (indices, values) teacher, 0 for a dense
    one; ``kind`` 0 forward KL, 1 reverse KL, 2 JSD; ``has_target``: class
    indices given (their range is checked by the backend)."""

    problem: ClassProblem
    kind: int
    beta: float
    temperature: float
    alpha: float
    ignore_index: int
    reduction: str
    topk: int
    has_target: bool
    device: str
