"""Host-side helpers that both backends and the front door use; a leaf.

Array-kind probes (is it on the GPU), the check of class indices (a scan of
the targets, compiled), the error it raises, and the last step of a mean or
sum reduction. Nothing here imports a backend.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from . import _cache

_cache.install()  # before any function is compiled with cache=True


def on_gpu(a) -> bool:
    """Whether ``a`` is a GPU array (it exposes ``__cuda_array_interface__``)."""
    if type(a) is np.ndarray:  # the common case, without probing attributes
        return False
    # Device arrays of Numba's CUDA simulator (``FakeCUDAArray``, used by the
    # GPU tests on machines without a GPU) do not expose the interface.
    return hasattr(a, "__cuda_array_interface__") or type(a).__name__ == "FakeCUDAArray"


def as_host_array(a):
    """A host input as a NumPy array (lists and scalars converted); None stays None."""
    if a is None or type(a) is np.ndarray:
        return a
    return np.asarray(a)


@numba.njit(cache=True, nogil=True)
def scan_hard_targets(y, n_classes, ignore_index, w):
    """Check class indices; return (first bad position or -1, sum of weights).

    The sum of ``w[t]`` over targets that are not ignored (their count without
    weights) is the denominator of PyTorch's mean reduction. The check and
    the count are one branch-free (vectorized) sweep; the weights, a gather,
    are summed in row order.
    """
    n_bad = 0
    kept = 0
    for r in range(y.shape[0]):
        t = y[r]
        keep = np.int64(t != ignore_index)
        kept += keep
        n_bad += keep & np.int64((t < 0) | (t >= n_classes))
    if n_bad:
        for r in range(y.shape[0]):
            t = y[r]
            if t != ignore_index and (t < 0 or t >= n_classes):
                return r, 0.0
    if w is None:
        return -1, float(kept)
    total = 0.0
    for r in range(y.shape[0]):
        t = y[r]
        if t != ignore_index:
            total += w[t]
    return -1, total


def bad_uint64_target(flat, bad: int) -> int:
    """``bad`` moved to the first uint64 target above 2**63 - 1, if earlier:
    the int64 view the kernels read wraps those to negative values, which
    could even equal ``ignore_index``; every such value is out of range."""
    huge = np.flatnonzero(flat > np.iinfo(np.int64).max)
    if huge.size and (bad < 0 or huge[0] < bad):
        return int(huge[0])
    return bad


def raise_bad_target(bad_row: int, targets_flat, batch_shape: tuple, n_classes: int,
                     ignore_index: int):
    """Raise IndexError for the target found out of range at ``bad_row``."""
    value = int(targets_flat[bad_row])
    position = np.unravel_index(bad_row, batch_shape) if batch_shape else ()
    position = tuple(int(i) for i in position)
    raise IndexError(
        f"target {value} at position {position} is out of range for {n_classes} classes "
        f"(valid: 0 to {n_classes - 1}, or ignore_index={ignore_index})")


def raise_outside_unit(count):
    """BCE's input check: ``count`` elements outside [0, 1] (or NaN)."""
    raise ValueError(f"input must hold probabilities in [0, 1] (binary_cross_entropy takes "
                     f"probabilities; use binary_cross_entropy_with_logits for logits): "
                     f"{count} element(s) outside [0, 1] or NaN")


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


def row_stats(spec, lse, predicted, y, weight, denominator: float):
    """The ``CrossEntropyStats`` of a call from its rows' float64 log-sum-exp
    and argmax (host arrays), its class indices (int64, flat; None for
    probabilities), its class weights (or None) and the mean's denominator.

    The z-loss term is the kernels' ``z_loss * lse**2``, weighted as the loss
    (the target's class weight; ignored rows add 0), reduced as the loss.
    """
    from ._spec import CrossEntropyStats  # a leaf: records only

    problem = spec.problem
    dtype = problem.dtype
    if y is None:
        kept = None
        terms = spec.z_loss * lse * lse
        accuracy = None
    else:
        kept = y != spec.ignore_index
        row_weight = np.where(kept, 1.0, 0.0)
        if weight is not None:
            row_weight = row_weight * np.asarray(weight, dtype=np.float64)[np.where(kept, y, 0)]
        terms = spec.z_loss * row_weight * lse * lse
        n_kept = int(np.count_nonzero(kept))
        accuracy = (float(np.count_nonzero((predicted == y) & kept)) / n_kept if n_kept
                    else math.nan)
    if spec.reduction == "none":
        z_term = terms.astype(dtype).reshape(problem.batch_shape)
    else:
        z_term = finish_loss(float(np.sum(terms)), denominator, spec.reduction, dtype)
    return CrossEntropyStats(lse.astype(dtype).reshape(problem.batch_shape), z_term, accuracy,
                             predicted.reshape(problem.batch_shape))
