"""The GPU backend: the functions of ``_cpu`` on CUDA device arrays.

``_dispatch.select`` imports this module only when a call runs on the GPU,
so ``numba.cuda`` is never imported with ``fastxent`` itself.

Arrays. ``to_device_args`` turns every input into a Numba device array
(zero-copy for arrays exposing ``__cuda_array_interface__``, such as CuPy
arrays and PyTorch CUDA tensors; a copy for host arrays, with
``device="cuda"``) and remembers the caller's object. Results the size of an
input come back in the caller's form: a PyTorch tensor for a PyTorch
tensor, a CuPy array for a CuPy array, a Numba device array otherwise, and
a NumPy array where the input was on the host. Mean and sum losses are host
NumPy scalars of the logits' dtype (the reduction's result is copied back:
one synchronisation per call). GPU inputs must be C-contiguous.

Target checks copy the class indices to the host (N integers) and reuse the
CPU scan, so an out-of-range target raises ``IndexError`` before any kernel
writes.
"""

from __future__ import annotations

import math
import sys

import numpy as np
from numba import cuda

from . import _cuda_kernels as K
from ._cpu_kernels import scan_hard_targets
from ._dispatch import on_gpu
from ._validate import (BCESpec, ClassProblem, CrossEntropySpec, check_targets,
                        finish_loss)

#: Threads per block (a power of two, at most 1024; at least 32 on a GPU).
#: The simulator tests patch it small.
THREADS_PER_BLOCK = 256
#: Columns per thread below which rows share a block: a row gets the
#: smallest power-of-two group of threads giving each about this many.
ELEMENTS_PER_THREAD = 4
#: Dynamic shared memory a block may use to keep its row (the default
#: per-block limit is 48 KiB; the reduction scratch takes the rest). Rows that
#: fit are read from global memory once: float32 rows up to C = 11776 (hard
#: targets), float64 up to 5888.
SHARED_CACHE_BYTES = 46 * 1024
#: Grid size cap; kernels loop over further rows (grid-stride).
MAX_BLOCKS = 65535

_ORIGIN = "_fastxent_origin"


# --------------------------------------------------------------------------
# Arrays in and out


def _is_numba_array(a) -> bool:
    return cuda.devicearray.is_cuda_ndarray(a)


def _to_device(a):
    if on_gpu(a):
        if _is_numba_array(a):
            d = a
        else:
            d = cuda.as_cuda_array(a)
            setattr(d, _ORIGIN, a)
        if d.size and not d.is_c_contiguous():
            raise ValueError(f"GPU arrays must be C-contiguous, got one of shape {d.shape} "
                             f"with strides {d.strides}: make a contiguous copy first")
        return d
    host = np.asarray(a)
    # copy(order="C"), not ascontiguousarray, which turns 0-d into 1-d
    d = cuda.to_device(host if host.flags.c_contiguous else host.copy(order="C"))
    setattr(d, _ORIGIN, a)
    return d


def to_device_args(arrays):
    """The arrays as Numba device arrays (None stays None); see the module
    docstring. Foreign GPU arrays are wrapped with ``cuda.as_cuda_array``, so
    their ``dtype`` is a NumPy dtype for ``_validate``."""
    return tuple(None if a is None else _to_device(a) for a in arrays)


def _origin(d):
    return getattr(d, _ORIGIN, d)


def _to_caller(d, like):
    """Device array ``d`` in the form of the caller's input ``like``."""
    origin = _origin(like)
    if not on_gpu(origin):
        return d.copy_to_host()
    package = type(origin).__module__.split(".")[0]
    if package == "torch":
        return sys.modules["torch"].as_tensor(d, device=origin.device)
    if package == "cupy":
        return sys.modules["cupy"].asarray(d)
    return d


def _deliver(dest):
    """The caller's destination array after a kernel wrote ``dest``."""
    origin = _origin(dest)
    if on_gpu(origin):
        return origin
    host = dest.copy_to_host()
    if isinstance(origin, np.ndarray):
        np.copyto(origin, host.reshape(origin.shape))
        return origin
    return host


def _host(a):
    """A host NumPy copy (device arrays) or view (host arrays)."""
    return a.copy_to_host() if _is_numba_array(a) else np.asarray(a)


def _flat(d):
    return d.reshape(d.size)


def _span(d):
    iface = getattr(d, "__cuda_array_interface__", None) or d.__array_interface__
    start = iface["data"][0]
    return start, start + d.size * d.dtype.itemsize


def _same_memory(a, b) -> bool:
    return _span(a) == _span(b)


def _overlaps(a, b) -> bool:
    if b is None or a.size == 0 or b.size == 0:
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _as_dtype(d, dtype):
    """``d`` itself if it has ``dtype``, else a converted device copy."""
    if np.dtype(d.dtype) == dtype:
        return d
    out = cuda.device_array(d.shape, dtype=dtype)
    if d.size:
        threads = _threads()
        blocks = min(math.ceil(d.size / threads), MAX_BLOCKS)
        K.cast[blocks, threads](_flat(d), _flat(out))
    return out


def _small_to_device(a, dtype):
    """Weights: small, needed on the host too (sums, target scan)."""
    host = np.ascontiguousarray(_host(a), dtype=dtype)
    return host, cuda.to_device(host)


def _destination(grad, x, shape, dtype, inputs):
    """(array the kernel writes, caller's destination or None).

    The caller's array is written directly when it is the logits themselves
    (each element is read before it is written, by the same thread) or
    overlaps no input; otherwise through a temporary copied in at the end.
    """
    if isinstance(grad, str):
        return cuda.device_array(shape, dtype=dtype), None
    if _same_memory(grad, x) or not any(_overlaps(grad, a) for a in inputs):
        return grad, grad
    return cuda.device_array(shape, dtype=dtype), grad


def _finish_destination(written, dest, like):
    if dest is None:
        return _to_caller(written, like)
    if written is not dest:
        dest.copy_to_device(written)
    return _deliver(dest)


# --------------------------------------------------------------------------
# Launch geometry


def _threads() -> int:
    tpb = int(THREADS_PER_BLOCK)
    if tpb < 1 or tpb > 1024 or tpb & (tpb - 1):
        raise ValueError(f"THREADS_PER_BLOCK must be a power of two up to 1024, got {tpb}")
    if not K.SIMULATED and tpb < K.WARP:
        raise ValueError(f"THREADS_PER_BLOCK must be at least a warp ({K.WARP}) on a GPU")
    return tpb


def _row_launch(problem: ClassProblem, cache_rows: int):
    """(blocks, threads, group, cached, shared bytes) for a row kernel.

    ``cache_rows``: how many row-sized arrays the cached variant keeps in
    shared memory (0: the kernel has no cached variant).
    """
    tpb = _threads()
    C = problem.n_classes
    group = 1
    while group < tpb and group * ELEMENTS_PER_THREAD < C:
        group *= 2
    if group > K.WARP:
        group = tpb  # several warps on a row: the whole block
    shared = cache_rows * C * problem.dtype.itemsize
    cached = cache_rows > 0 and group == tpb and shared <= SHARED_CACHE_BYTES
    blocks = min(math.ceil(problem.n_rows / (tpb // group)), MAX_BLOCKS)
    return blocks, tpb, group, cached, (shared if cached else 0)


def _device_sum(values) -> float:
    """Sum of a float64 device array in a fixed order."""
    if values.size == 0:
        return 0.0
    out = cuda.device_array(1, dtype=np.float64)
    K.sum_kernel[1, _threads()](values, out)
    return float(out.copy_to_host()[0])


def _reduce(losses, denominator, reduction, problem: ClassProblem, like):
    if reduction == "none":
        out = _as_dtype(losses, problem.dtype)
        return _to_caller(out.reshape(problem.batch_shape), like)
    return finish_loss(_device_sum(losses), denominator, reduction, problem.dtype)


def _hard_targets(spec: CrossEntropySpec, target, w_host):
    """Targets on the device as int64, checked on a host copy; the mean's
    denominator."""
    y = np.ascontiguousarray(_host(target), dtype=np.int64).reshape(-1)
    bad, denominator = scan_hard_targets(y, spec.problem.n_classes, spec.ignore_index, w_host)
    check_targets(bad, y, spec.problem, spec.ignore_index)
    return cuda.to_device(y), denominator


# --------------------------------------------------------------------------
# The backend's functions (same names and signatures as ``_cpu``)


def cross_entropy(spec: CrossEntropySpec, logits, target, weight, grad):
    """Loss, and the gradient when ``grad`` is not None (``"new"`` or a
    device array to write into, possibly the logits)."""
    problem = spec.problem
    dtype = problem.dtype
    C = problem.n_classes
    w_host, w = (None, None) if weight is None else _small_to_device(weight, dtype)
    wsum = float(C) if w_host is None else float(w_host.sum(dtype=np.float64))
    if spec.soft:
        y, q = None, _flat(_as_dtype(target, dtype))
        denominator = float(problem.n_rows)
    else:
        (y, denominator), q = _hard_targets(spec, target, w_host), None
    x = _as_dtype(logits, dtype)
    scale = 1.0 / denominator if spec.reduction == "mean" and denominator != 0 else 1.0
    g = dest = None
    if grad is not None:
        g, dest = _destination(grad, x, problem.shape, dtype, (x, q))
    losses = cuda.device_array(problem.n_rows, dtype=np.float64)
    if problem.n_rows:
        blocks, tpb, group, cached, shared = _row_launch(problem, 2 if spec.soft else 1)
        K.ce(dtype, cached)[blocks, tpb, 0, shared](
            _flat(x), y, q, w, None if g is None else _flat(g), losses,
            problem.n_rows, C, problem.inner, group, spec.ignore_index, wsum, spec.smoothing,
            scale)
    loss = _reduce(losses, denominator, spec.reduction, problem, logits)
    return loss, (None if g is None else _finish_destination(g, dest, logits))


def nll_loss(spec: CrossEntropySpec, log_probs, target, weight):
    problem = spec.problem
    w_host, w = (None, None) if weight is None else _small_to_device(weight, problem.dtype)
    y, denominator = _hard_targets(spec, target, w_host)
    lp = _as_dtype(log_probs, problem.dtype)
    losses = cuda.device_array(problem.n_rows, dtype=np.float64)
    if problem.n_rows:
        tpb = _threads()
        blocks = min(math.ceil(problem.n_rows / tpb), MAX_BLOCKS)
        K.nll[blocks, tpb](_flat(lp), y, w, losses, problem.n_rows, problem.n_classes,
                           problem.inner, spec.ignore_index)
    return _reduce(losses, denominator, spec.reduction, problem, log_probs)


def softmax(problem: ClassProblem, x, out, log: bool):
    xd = _as_dtype(x, problem.dtype)
    written, dest = _destination("new" if out is None else out, xd, problem.shape,
                                 problem.dtype, (xd,))
    if problem.n_rows:
        blocks, tpb, group, cached, shared = _row_launch(problem, 1)
        K.softmax(problem.dtype, cached, log)[blocks, tpb, 0, shared](
            _flat(xd), _flat(written), problem.n_rows, problem.n_classes, problem.inner, group)
    return _finish_destination(written, dest, x)


def logsumexp(problem: ClassProblem, x):
    if problem.n_classes == 0 or problem.n_rows == 0:
        empty = np.full(problem.batch_shape, -np.inf, dtype=problem.dtype)
        return _to_caller(cuda.to_device(empty), x)
    xd = _as_dtype(x, problem.dtype)
    out = cuda.device_array(problem.n_rows, dtype=problem.dtype)
    blocks, tpb, group, _, _ = _row_launch(problem, 0)
    K.logsumexp(problem.dtype)[blocks, tpb](_flat(xd), out, problem.n_rows, problem.n_classes,
                                            problem.inner, group)
    return _to_caller(out.reshape(problem.batch_shape), x)


def _broadcast_operand(a, shape, dtype):
    """A flat device array of ``shape`` for a weight that broadcasts to it.

    Full-size operands stay on the device; smaller ones (a ``pos_weight`` per
    class, typically) are broadcast on the host, where they are small.
    """
    if a is None:
        return None
    if tuple(a.shape) == tuple(shape):
        return _flat(_as_dtype(a, dtype))
    host = np.ascontiguousarray(np.broadcast_to(_host(a).astype(dtype), shape))
    return _flat(cuda.to_device(host))


def bce_with_logits(spec: BCESpec, logits, target, weight, pos_weight, grad):
    """Elementwise BCE; gradient as in ``cross_entropy``."""
    shape, dtype = spec.shape, spec.dtype
    n = math.prod(shape)
    x = _as_dtype(logits, dtype)
    t = _flat(_as_dtype(target, dtype))
    w = _broadcast_operand(weight, shape, dtype)
    pw = _broadcast_operand(pos_weight, shape, dtype)
    g = dest = None
    if grad is not None:
        g, dest = _destination(grad, x, shape, dtype, (x, t, w, pw))
    elements = cuda.device_array(n, dtype=dtype) if spec.reduction == "none" else None
    tpb = _threads()
    blocks = max(1, min(math.ceil(n / tpb), MAX_BLOCKS))
    partials = cuda.device_array(blocks * tpb, dtype=np.float64)
    scale = 1.0 / n if spec.reduction == "mean" and n else 1.0
    if n:
        K.bce(dtype)[blocks, tpb](_flat(x), t, w, pw, None if g is None else _flat(g), elements,
                                  partials, n, scale)
    if spec.reduction == "none":
        loss = _to_caller(elements.reshape(shape), logits)
    else:
        total = _device_sum(partials) if n else 0.0
        loss = finish_loss(total, n, spec.reduction, dtype)
    return loss, (None if g is None else _finish_destination(g, dest, logits))
