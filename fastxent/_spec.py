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
from typing import NamedTuple, Optional

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
    coefficient of each row's lse**2 added to its loss.
    """

    weight: Optional[np.ndarray]
    ignore_index: int
    smoothing: float
    mean: bool
    z_loss: float


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


# --------------------------------------------------------------------------
# Fused linear + cross-entropy (``linear``)


@dataclass(frozen=True)
class LinearCrossEntropySpec:
    """A checked linear + cross-entropy call: logits = input @ W.T + b.

    ``ce`` is the cross-entropy of the (N, C) logits the call stands for
    (never made); ``batch_shape`` is the input's shape without its last
    (hidden) axis; ``chunk_rows`` the rows taken at a time.
    """

    ce: CrossEntropySpec
    batch_shape: tuple
    hidden: int
    chunk_rows: int

    @property
    def n_rows(self) -> int:
        return self.ce.problem.n_rows
