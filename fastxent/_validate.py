"""Argument checks, and the canonical problem every backend solves.

Everything here looks only at shapes, dtypes and option values, so the same
checks serve NumPy arrays and GPU arrays alike; every check runs before any
kernel writes. Data-dependent checks (class indices in range) are done by
``check_targets`` on a host copy of the targets.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np

REDUCTIONS = ("none", "mean", "sum")
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def reduction_arg(reduction) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return reduction


def smoothing_arg(label_smoothing) -> float:
    try:
        eps = float(label_smoothing)
    except (TypeError, ValueError):
        raise TypeError(f"label_smoothing must be a float, got {label_smoothing!r}") from None
    if not 0.0 <= eps <= 1.0:  # also refuses NaN
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing!r}")
    return eps


def index_arg(value, name) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def axis_arg(axis, ndim, name="logits") -> int:
    axis = index_arg(axis, "axis")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for {name} with {ndim} dimension(s)")
    return axis % ndim


def float_dtype(dtype, name="logits") -> np.dtype:
    """The float dtype computations run in for an input of ``dtype``.

    float32 and float64 are kept; integers and booleans become float64, as
    NumPy's ufuncs would make them; anything else is refused.
    """
    dtype = np.dtype(dtype)
    if dtype in FLOAT_DTYPES:
        return dtype
    if dtype.kind in "iub":
        return np.dtype(np.float64)
    if dtype.kind == "f":
        raise TypeError(f"{name} of dtype {dtype} are not supported: use float32 or float64")
    raise TypeError(f"{name} must be real numbers (float32 or float64), got dtype {dtype}")


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


def class_problem(logits, axis, name="logits", allow_empty=False) -> ClassProblem:
    shape = tuple(logits.shape)
    if len(shape) == 0:
        raise ValueError(f"{name} must have at least one dimension (the class axis), got a scalar")
    dtype = float_dtype(logits.dtype, name)
    axis = axis_arg(axis, len(shape), name)
    if shape[axis] == 0 and not allow_empty:
        raise ValueError(f"{name} have zero classes (axis {axis} of shape {shape} is empty)")
    return ClassProblem(shape, axis, dtype)


@dataclass(frozen=True)
class CrossEntropySpec:
    """A checked cross-entropy (or NLL) call, independent of the device."""

    problem: ClassProblem
    soft: bool
    reduction: str
    smoothing: float
    ignore_index: int


def cross_entropy_spec(logits, target, weight, ignore_index, reduction, label_smoothing,
                       axis, name="logits") -> CrossEntropySpec:
    problem = class_problem(logits, axis, name)
    reduction = reduction_arg(reduction)
    smoothing = smoothing_arg(label_smoothing)
    ignore_index = index_arg(ignore_index, "ignore_index")
    t_dtype = np.dtype(target.dtype)
    t_shape = tuple(target.shape)
    if t_dtype.kind == "f":
        if t_shape != problem.shape:
            raise ValueError(
                f"float targets are class probabilities and must have the {name}' shape "
                f"{problem.shape}, got {t_shape}; class indices must be integers")
        float_dtype(t_dtype, "target")
        if ignore_index >= 0:
            raise ValueError("ignore_index is not supported with class-probability targets "
                             f"(got ignore_index={ignore_index}), as in PyTorch")
        soft = True
    elif t_dtype.kind in "iu":
        if t_shape != problem.batch_shape:
            raise ValueError(
                f"target shape {t_shape} does not match the batch shape {problem.batch_shape} "
                f"of {name} with shape {problem.shape} (class axis {problem.axis})")
        soft = False
    else:
        raise TypeError(f"target must hold integer class indices or float class probabilities, "
                        f"got dtype {t_dtype}")
    if weight is not None:
        check_weight(weight, problem.n_classes, "weight")
    return CrossEntropySpec(problem, soft, reduction, smoothing, ignore_index)


def check_weight(weight, length, name):
    shape = tuple(weight.shape)
    if shape != (length,):
        raise ValueError(f"{name} must be a 1-D array of {length} values (one per class), "
                         f"got shape {shape}")
    if np.dtype(weight.dtype).kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {weight.dtype}")


def check_targets(bad_row: int, targets_flat, problem: ClassProblem, ignore_index: int):
    """Raise IndexError for the target found out of range at ``bad_row``."""
    if bad_row < 0:
        return
    value = int(targets_flat[bad_row])
    position = np.unravel_index(bad_row, problem.batch_shape) if problem.batch_shape else ()
    position = tuple(int(i) for i in position)
    raise IndexError(
        f"target {value} at position {position} is out of range for {problem.n_classes} classes "
        f"(valid: 0 to {problem.n_classes - 1}, or ignore_index={ignore_index})")


def check_grad_out(out, shape, dtype, name="out"):
    """``out=`` must take the gradient exactly: same shape and dtype, writable."""
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if np.dtype(out.dtype) != dtype:
        raise TypeError(f"{name} has dtype {out.dtype}, expected {dtype}")
    flags = getattr(out, "flags", None)
    if flags is not None and not getattr(flags, "writeable", True):
        raise ValueError(f"{name} is read-only")


def check_inplace(logits, name="logits"):
    """``inplace=True`` needs a writable float32/float64 array to write into."""
    dtype = np.dtype(getattr(logits, "dtype", np.dtype(object)))
    if not hasattr(logits, "shape") or dtype not in FLOAT_DTYPES:
        raise TypeError(f"inplace=True needs {name} as a float32 or float64 array, "
                        f"got {type(logits).__name__} of dtype {dtype}")
    flags = getattr(logits, "flags", None)
    if flags is not None and not getattr(flags, "writeable", True):
        raise ValueError(f"inplace=True but {name} is read-only")


def finish_loss(total: float, denominator: float, reduction: str, dtype):
    """A mean or sum reduction as a NumPy scalar of the logits' dtype."""
    if reduction == "sum":
        return dtype.type(total)
    # IEEE division as NumPy's (0/0 is NaN, x/0 is +-inf), in Python floats:
    # np.errstate alone costs more than the rest of a small call's reduction.
    total, denominator = float(total), float(denominator)
    if denominator != 0.0:
        return dtype.type(total / denominator)
    if total == 0.0 or math.isnan(total):
        return dtype.type(math.nan)
    return dtype.type(math.copysign(math.inf, total) * math.copysign(1.0, denominator))


@dataclass(frozen=True)
class BCESpec:
    shape: tuple
    dtype: np.dtype
    reduction: str


def bce_spec(logits, target, weight, pos_weight, reduction) -> BCESpec:
    shape = tuple(logits.shape)
    dtype = float_dtype(logits.dtype)
    reduction = reduction_arg(reduction)
    if tuple(target.shape) != shape:
        raise ValueError(f"target shape {tuple(target.shape)} must equal the logits' shape {shape}")
    float_dtype(target.dtype, "target")
    for name, arr in (("weight", weight), ("pos_weight", pos_weight)):
        if arr is None:
            continue
        float_dtype(arr.dtype, name)
        try:
            np.broadcast_shapes(tuple(arr.shape), shape)
        except ValueError:
            raise ValueError(f"{name} of shape {tuple(arr.shape)} does not broadcast to the "
                             f"logits' shape {shape}") from None
        if np.broadcast_shapes(tuple(arr.shape), shape) != shape:
            raise ValueError(f"{name} of shape {tuple(arr.shape)} would enlarge the logits' "
                             f"shape {shape} when broadcast")
    return BCESpec(shape, dtype, reduction)
