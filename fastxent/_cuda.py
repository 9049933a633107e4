"""The GPU backend: the functions of ``_cpu`` on CUDA device arrays.

``_dispatch.backend`` imports this module only when a call runs on the GPU,
so ``numba.cuda`` is never imported with ``fastxent`` itself.

Arrays. Each function first turns every input into a Numba device array
(zero-copy for arrays exposing ``__cuda_array_interface__``, such as CuPy
arrays and PyTorch CUDA tensors; a copy for host arrays, with
``device="cuda"``) and remembers the caller's object. Results the size of an
input come back in the caller's form: a PyTorch tensor for a PyTorch
tensor, a CuPy array for a CuPy array, a Numba device array otherwise, and
a NumPy array where the input was on the host. Mean and sum losses are host
NumPy scalars of the logits' dtype (the reduction's result is copied back:
one synchronisation per call). Strided GPU inputs (slices, transposes,
broadcasts) are gathered into C-contiguous device buffers by a kernel
(``_contiguous``), and a strided ``out=`` or in-place destination is
written through such a buffer and scattered into at the end: the same
results as contiguous inputs, for one more read and write of each element.

16-bit floats. float16 and bfloat16 logits (cross-entropy, softmax,
log_softmax, logsumexp, BCE with logits) and log-probabilities (nll_loss)
stay 16-bit on the device: the kernels read them, compute in float32 and
write 16-bit results (``_cuda_kernels._io``); losses are float32. Numba
types no bfloat16 array, so bfloat16 arrays are handed to kernels, copied
and gathered as their ``uint16`` bits (``_kernel_array``, ``_bits``).
Cross-entropy's 16-bit soft targets and class weights are widened to
float32 first (``_contiguous``); BCE's 16-bit targets and weights, like the
divergences' targets, are read as 16 bits.

Target checks copy the class indices to the host (N integers) and scan
them there (``_host.scan_hard_targets``), so an out-of-range target raises
``IndexError`` before any kernel writes.

Shared memory. A row worked on by a whole block is kept in shared memory
(read from global memory once) when it fits: up to 48 KiB per block on any
GPU, and up to the device's opt-in maximum
(``MAX_SHARED_MEMORY_PER_BLOCK_OPTIN``: 227 KiB on H100 and H200, so C up to
58048 float32 or 28992 float64 with class indices, half that with class
probabilities) once the kernel has opted in. numba-cuda 0.30 has no API for
the opt-in (NVIDIA/numba-cuda issue #94), so ``_opt_in_shared`` sets
``CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`` with
``cuKernelSetAttribute`` on the handle of numba-cuda's compiled kernel (a
private attribute), once per kernel and device. Such blocks are few per SM,
so they get ``WIDE_THREADS_PER_BLOCK`` threads, or as many as the compiled
kernel can launch. If the opt-in or the launch is refused, the uncached
variant runs instead, with a ``SharedMemoryOptInWarning``.
``plan_row_launch`` makes these decisions from sizes alone.

What the tests check without a GPU: the kernels' results under Numba's
CUDA simulator (``tests/cuda_sim``, which also runs the opt-in launch path
with the driver call a no-op); the launch decisions and the opt-in's
bookkeeping and fallbacks against stand-ins for the kernel and the driver
(``tests/test_cuda_launch.py``); the PTX and ptxas's register and spill
report for sm_90 (``tests/test_cuda_compile.py``). What needs a GPU to
check: that the driver accepts the attribute on numba-cuda's kernel handle
and a launch with more than 48 KiB then succeeds, the register-limited
block size read at run time, and the speed.
"""

from __future__ import annotations

import math
import sys
import threading
import warnings
from typing import NamedTuple

import numpy as np
from numba import cuda

from . import _cuda_kernels as K
from ._formulas import mean_scale
from ._half import half_dtype, half_of
from ._host import (bad_uint64_target, finish_loss, on_gpu, raise_bad_target,
                    raise_outside_unit, row_stats, scan_hard_targets)
from ._spec import BCESpec, CEOptions, ClassProblem, CrossEntropySpec, ReductionSpec

#: Threads per block (a power of two, at most 1024; at least 32 on a GPU).
#: The simulator tests patch it small.
THREADS_PER_BLOCK = 256
#: Threads per block for a row cached in more than the default 48 KiB of
#: shared memory: such blocks are few per SM (one above 114 KB), so they need
#: more threads to keep enough loads in flight. Lowered at run time to what
#: the compiled kernel can launch (its registers: ptxas gives the fused
#: cross-entropy 75 to 102 registers per thread on sm_90, so 512 threads).
WIDE_THREADS_PER_BLOCK = 1024
#: Columns per thread below which rows share a block: a row gets the
#: smallest power-of-two group of threads giving each about this many.
ELEMENTS_PER_THREAD = 4
#: Shared memory (static + dynamic) any block may use without opting in.
DEFAULT_BLOCK_SHARED_BYTES = 48 * 1024
#: The opt-in maximum per block of H100 and H200 (227 KiB), taken as the
#: device's under the simulator, which has no such limit.
SIMULATED_BLOCK_SHARED_BYTES = 232448
#: Optional cap on the shared memory per block of the cached kernels (None:
#: the device's opt-in maximum). Tests set it to 0 for the uncached kernels.
SHARED_BYTES_CAP = None
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
            d = cuda.as_cuda_array(a)  # keeps the strides of a view
            setattr(d, _ORIGIN, a)
        return d
    host = np.asarray(a)
    # copy(order="C"), not ascontiguousarray, which turns 0-d into 1-d
    host = host if host.flags.c_contiguous else host.copy(order="C")
    if half_dtype(host.dtype):  # copied as bits: Numba knows no bfloat16
        d = cuda.to_device(host.view(np.uint16)).view(host.dtype)
    else:
        d = cuda.to_device(host)
    setattr(d, _ORIGIN, a)
    return d


def _bits(d):
    """A 16-bit float device array as its ``uint16`` bits (any strides), for
    copies (Numba types no bfloat16 array); other arrays as they are."""
    return d.view(np.uint16) if half_dtype(d.dtype) else d


def _kernel_array(d):
    """``d`` as a kernel reads it: bfloat16 as its bits (``_cuda_kernels._io``)."""
    return d.view(np.uint16) if np.dtype(d.dtype).name == "bfloat16" else d


def _to_host(d):
    """A host copy of device array ``d`` (16-bit floats copied as bits)."""
    if half_dtype(d.dtype):
        return d.view(np.uint16).copy_to_host().view(d.dtype)
    return d.copy_to_host()


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
        return _to_host(d)
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
    host = _to_host(dest)
    if isinstance(origin, np.ndarray):
        np.copyto(origin, host.reshape(origin.shape))
        return origin
    return host


def _host_copy(a):
    """A host NumPy copy (device arrays) or view (host arrays)."""
    if _is_numba_array(a):
        return _to_host(_contiguous(a, a.dtype))
    return np.asarray(a)


def _flat(d):
    """The 1-D form kernels index; ``d`` must be C-contiguous (gathered by
    ``_contiguous``): numba-cuda refuses to reshape a strided array, and the
    simulator would silently reshape a copy, so this says so on both."""
    if not _is_contiguous(d):
        raise AssertionError(f"internal error: a strided array (strides {d.strides}) reached "
                             f"a kernel without being gathered")
    return d.reshape(d.size)


def _is_contiguous(d) -> bool:
    return d.size == 0 or d.is_c_contiguous()


def _address(d) -> int:
    """Address of element 0 (a host address under the simulator)."""
    iface = getattr(d, "__cuda_array_interface__", None) or d.__array_interface__
    return iface["data"][0]


def _extent(d):
    """(first, last + 1) byte addresses the elements of ``d`` lie in."""
    start = _address(d)
    reach = [(n - 1) * stride for n, stride in zip(d.shape, d.strides)]
    return (start + sum(r for r in reach if r < 0),
            start + sum(r for r in reach if r > 0) + d.dtype.itemsize)


def _same_view(a, b) -> bool:
    """Whether ``a`` and ``b`` are the same elements of the same memory."""
    return (_address(a), tuple(a.shape), tuple(a.strides), np.dtype(a.dtype)) == \
        (_address(b), tuple(b.shape), tuple(b.strides), np.dtype(b.dtype))


def _overlaps(a, b) -> bool:
    if b is None or a.size == 0 or b.size == 0:
        return False
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    return a0 < b1 and b0 < a1


def _copy_strided(src, dst) -> None:
    """``dst`` <- ``src`` (same shape, any strides), converted to ``dst``'s dtype."""
    n = src.size
    if n:
        if np.dtype(src.dtype) == np.dtype(dst.dtype):  # 16-bit floats: their bits
            src, dst = _bits(src), _bits(dst)
        threads = _threads()
        blocks = min(math.ceil(n / threads), MAX_BLOCKS)
        K.strided_copy(len(src.shape))[blocks, threads](src, dst, n)


def _contiguous(d, dtype):
    """``d`` as a C-contiguous device array of ``dtype``: ``d`` itself where
    it is one, else a copy made on the device (a strided view gathered, or
    converted)."""
    dtype = np.dtype(dtype)
    contiguous = _is_contiguous(d)
    if contiguous and np.dtype(d.dtype) == dtype:
        return d
    if half_dtype(d.dtype) and np.dtype(d.dtype) != dtype:
        # 16-bit floats widened: gathered as bits first, then converted
        d = _contiguous(d, d.dtype)
        out = cuda.device_array(d.shape, dtype=dtype)
        if d.size:
            threads = _threads()
            blocks = min(math.ceil(d.size / threads), MAX_BLOCKS)
            K.widen(np.dtype(d.dtype).name)[blocks, threads](_flat(_kernel_array(d)),
                                                             _flat(out))
        return out
    out = cuda.device_array(d.shape, dtype=dtype)
    if d.size == 0:
        return out
    if contiguous:
        threads = _threads()
        blocks = min(math.ceil(d.size / threads), MAX_BLOCKS)
        K.cast[blocks, threads](_flat(d), _flat(out))
    else:
        _copy_strided(d, out)
    return out


def _small_to_device(a, dtype):
    """Weights: small, needed on the host too (sums, target scan)."""
    host = np.ascontiguousarray(_host_copy(a), dtype=dtype)
    return host, cuda.to_device(host)


def _destination(grad, logits, x, shape, dtype, inputs):
    """(array the kernel writes, caller's destination or None).

    ``grad``: ``"new"`` or the caller's device array; ``logits``: the
    caller's logits as given, ``x``: them as the kernel reads them
    (``_contiguous``); ``inputs``: every array the kernel reads. The kernel
    writes a C-contiguous array: the caller's when it is the logits
    themselves read in place (each element is read before it is written, by
    the same thread), or overlaps no input; for strided logits written in
    place, ``x``, the gathered copy; otherwise a temporary. The last two are
    copied into the caller's array by ``_finish_destination``.
    """
    if isinstance(grad, str):
        return cuda.device_array(shape, dtype=dtype), None
    if _same_view(grad, logits):
        return (grad if x is logits else x), grad
    if _is_contiguous(grad) and not any(_overlaps(grad, a) for a in inputs):
        return grad, grad
    return cuda.device_array(shape, dtype=dtype), grad


def _finish_destination(written, dest, like):
    """The result the caller gets, once the kernel has written ``written``:
    copied (or, for a strided destination, scattered) into ``dest``."""
    if dest is None:
        return _to_caller(written, like)
    if written is not dest:
        if _is_contiguous(dest):
            dest.copy_to_device(written)
        else:
            _copy_strided(written, dest)
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


class RowLaunch(NamedTuple):
    """How a row kernel is launched (see ``plan_row_launch``)."""

    blocks: int
    threads: int  # per block
    group: int  # threads per row
    cached: bool  # the variant keeping the row in shared memory
    shared_bytes: int  # dynamic shared memory per block (0 when not cached)
    opt_in: bool  # needs more than the default 48 KiB per block


def plan_row_launch(n_rows: int, n_classes: int, itemsize: int, cache_rows: int, threads: int,
                    block_shared_limit: int, wide_threads: int | None = None) -> RowLaunch:
    """Launch geometry of a row kernel, from sizes and limits only (no device).

    Parameters
    ----------
    n_rows, n_classes : int
        The problem's rows and classes (C).
    itemsize : int
        Bytes per value: 4 (float32) or 8 (float64).
    cache_rows : int
        Row-sized arrays the cached variant keeps in shared memory: 1 (the
        logits), 2 (logits and class probabilities), 0 (no cached variant).
    threads : int
        Threads per block (``THREADS_PER_BLOCK``).
    block_shared_limit : int
        Shared memory, static and dynamic, one block may use: the device's
        opt-in maximum (232448 bytes on H100) once the kernel has opted in,
        else 48 KiB.
    wide_threads : int, optional
        Threads per block for a row cached above the default 48 KiB (None:
        ``threads``).

    Returns
    -------
    RowLaunch
        The row is cached when a whole block works on it (large C) and its
        ``cache_rows * C * itemsize`` bytes, plus the kernel's reduction
        scratch, fit ``block_shared_limit``; ``opt_in`` says the block needs
        more than 48 KiB.
    """
    group = 1
    while group < threads and group * ELEMENTS_PER_THREAD < n_classes:
        group *= 2
    if group > K.WARP:
        group = threads  # several warps on a row: the whole block
    shared = cache_rows * n_classes * itemsize
    static = K.SCRATCH * itemsize  # the reduction scratch, a static shared array
    cached = cache_rows > 0 and group == threads and shared + static <= block_shared_limit
    opt_in = cached and shared + static > DEFAULT_BLOCK_SHARED_BYTES
    if opt_in and wide_threads:
        threads = group = max(threads, wide_threads)
    blocks = min(math.ceil(n_rows / (threads // group)), MAX_BLOCKS)
    return RowLaunch(blocks, threads, group, cached, shared if cached else 0, opt_in)


def _block_shared_limit() -> int:
    """Shared memory one block of the cached kernels may use on this device."""
    if K.SIMULATED:
        limit = SIMULATED_BLOCK_SHARED_BYTES
    else:
        # Device caches its attributes after the first query.
        limit = int(cuda.get_current_device().MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
    limit = max(limit, DEFAULT_BLOCK_SHARED_BYTES)
    return limit if SHARED_BYTES_CAP is None else min(limit, int(SHARED_BYTES_CAP))


class SharedMemoryOptInWarning(RuntimeWarning):
    """A kernel could not get more than 48 KiB of shared memory per block and
    runs its uncached variant (correct, but reading each row twice)."""


#: Dynamic shared memory granted per (compiled kernel, device id); 0 where
#: the opt-in failed (not retried).
_GRANTED: dict = {}
_GRANTED_LOCK = threading.Lock()


def _opt_in_shared(dispatcher, args, dynamic_bytes: int, block_limit: int) -> int:
    """Let the kernel ``dispatcher`` compiles for ``args`` use ``dynamic_bytes``
    of dynamic shared memory; the most threads per block it can then launch,
    or 0 where the opt-in failed.

    numba-cuda (0.30) has no API for this (NVIDIA/numba-cuda issue #94): the
    attribute is set on the kernel's driver handle with
    ``cuKernelSetAttribute``, as numba-cuda's own ``set_shared_memory_carveout``
    does, to the device's maximum less the kernel's static shared memory,
    once per compiled kernel and device. A no-op under the simulator.
    """
    if K.SIMULATED:
        return int(WIDE_THREADS_PER_BLOCK)
    try:
        from numba.cuda.cudadrv.driver import binding, driver

        # ``compile`` returns the kernel a launch with these argument types
        # runs (compiling it now if needed).
        kernel = dispatcher.compile(tuple(dispatcher.typeof_pyval(a) for a in args))
        cufunc = kernel._codelibrary.get_cufunc()  # not public API (see above)
        device_id = cufunc.device.id
        key = (kernel, device_id)
        with _GRANTED_LOCK:
            granted = _GRANTED.get(key)
            if granted is None:
                granted = _GRANTED[key] = 0  # until the driver accepts it
                value = block_limit - int(kernel.shared_mem_per_block)
                attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
                driver.cuKernelSetAttribute(attr, value, cufunc.handle, device_id)
                granted = _GRANTED[key] = value
        if dynamic_bytes > granted:
            return 0
        return int(kernel.max_threads_per_block)
    except Exception as exc:  # a driver or numba-cuda refusal: run uncached
        warnings.warn(f"could not opt in to {dynamic_bytes} bytes of shared memory per block "
                      f"({type(exc).__name__}: {exc}); using the kernel that reads each row "
                      f"twice", SharedMemoryOptInWarning, stacklevel=4)
        return 0


def _forget_opt_in(dispatcher, args) -> None:
    """Record that a launch with the opt-in failed: later calls run uncached."""
    if not K.SIMULATED:
        kernel = dispatcher.compile(tuple(dispatcher.typeof_pyval(a) for a in args))
        with _GRANTED_LOCK:
            for key in [k for k in _GRANTED if k[0] is kernel]:
                _GRANTED[key] = 0


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _launch_rows(kernel_for, problem: ClassProblem, cache_rows: int, args_for) -> None:
    """Launch a row kernel over ``problem``'s rows.

    ``kernel_for(cached)``: the compiled kernel (dispatcher) of a variant;
    ``args_for(group)``: its arguments. The cached variant runs when the rows
    fit shared memory; above 48 KiB per block only once the kernel has opted
    in to more, with ``WIDE_THREADS_PER_BLOCK`` threads (or as many as it can
    launch). Where the opt-in or such a launch fails, the uncached variant
    runs instead (a refused launch has not started, so nothing was written).
    """
    tpb = _threads()
    sizes = (problem.n_rows, problem.n_classes, problem.dtype.itemsize, cache_rows, tpb)
    limit = _block_shared_limit()
    plan = plan_row_launch(*sizes, limit)
    if plan.opt_in:
        kernel = kernel_for(True)
        max_threads = _opt_in_shared(kernel, args_for(plan.group), plan.shared_bytes, limit)
        if max_threads >= tpb:
            wide = _power_of_two_at_most(min(int(WIDE_THREADS_PER_BLOCK), max_threads))
            plan = plan_row_launch(*sizes, limit, wide)
            if K.SIMULATED:  # nothing to refuse there; let kernel errors surface
                kernel[plan.blocks, plan.threads, 0, plan.shared_bytes](*args_for(plan.group))
                return
            try:
                kernel[plan.blocks, plan.threads, 0, plan.shared_bytes](*args_for(plan.group))
                return
            except Exception as exc:  # refused at launch (e.g. resources)
                _forget_opt_in(kernel, args_for(plan.group))
                warnings.warn(f"launch with {plan.shared_bytes} bytes of shared memory per "
                              f"block failed ({type(exc).__name__}: {exc}); using the kernel "
                              f"that reads each row twice", SharedMemoryOptInWarning,
                              stacklevel=3)
        plan = plan_row_launch(*sizes, min(limit, DEFAULT_BLOCK_SHARED_BYTES))
    kernel_for(plan.cached)[plan.blocks, plan.threads, 0, plan.shared_bytes](
        *args_for(plan.group))


def _device_sum(values) -> float:
    """Sum of a float64 device array in a fixed order."""
    if values.size == 0:
        return 0.0
    out = cuda.device_array(1, dtype=np.float64)
    K.sum_kernel[1, _threads()](values, out)
    return float(out.copy_to_host()[0])


def _reduce(losses, denominator, reduction, problem: ClassProblem, like):
    if reduction == "none":
        out = _contiguous(losses, problem.dtype)
        return _to_caller(out.reshape(problem.batch_shape), like)
    return finish_loss(_device_sum(losses), denominator, reduction, problem.dtype)


def _hard_targets(spec: CrossEntropySpec, target, w_host):
    """Targets on the device as int64, checked on a host copy; the mean's
    denominator."""
    problem = spec.problem
    host = _host_copy(target).reshape(-1)
    y = np.ascontiguousarray(host, dtype=np.int64)
    bad, denominator = scan_hard_targets(y, problem.n_classes, spec.ignore_index, w_host)
    if host.dtype == np.uint64:
        bad = bad_uint64_target(host, bad)
    if bad >= 0:
        raise_bad_target(bad, host, problem.batch_shape, problem.n_classes, spec.ignore_index)
    return cuda.to_device(y), denominator


def _targets_and_weights(spec: CrossEntropySpec, target, weight):
    """(class weights on the host and on the device, or None twice, their
    sum (C without them), class indices y or None, probabilities q or None,
    the mean's denominator) of a cross-entropy call."""
    problem = spec.problem
    dtype = problem.dtype
    w_host, w = (None, None) if weight is None else _small_to_device(weight, dtype)
    wsum = float(problem.n_classes) if w_host is None else float(w_host.sum(dtype=np.float64))
    if spec.soft:
        return w_host, w, wsum, None, _flat(_contiguous(target, dtype)), float(problem.n_rows)
    y, denominator = _hard_targets(spec, target, w_host)
    return w_host, w, wsum, y, None, denominator


def _storage_dtype(d, dtype):
    """The dtype a kernel reads ``d`` in: its own if 16-bit (computed in
    float32), else ``dtype``, the problem's."""
    return np.dtype(d.dtype) if half_dtype(d.dtype) else np.dtype(dtype)


def _gradient_destination(grad, logits):
    """``grad`` as a device array (``"new"`` and None as they are), the
    logits' own device array when the gradient goes over them."""
    if grad is None or isinstance(grad, str):
        return grad
    if grad is logits[0]:
        return logits[1]
    return _to_device(grad)


# --------------------------------------------------------------------------
# The backend's functions (same names and signatures as ``_cpu``)


def cross_entropy(spec: CrossEntropySpec, logits, target, weight, grad):
    """Loss, and the gradient when ``grad`` is not None (``"new"`` or an
    array to write into, possibly the logits)."""
    device_logits, target, weight = to_device_args((logits, target, weight))
    grad = _gradient_destination(grad, (logits, device_logits))
    logits = device_logits
    problem = spec.problem
    dtype = problem.dtype
    C = problem.n_classes
    w_host, w, wsum, y, q, denominator = _targets_and_weights(spec, target, weight)
    # 16-bit logits stay 16-bit: the kernel reads them (2 bytes an element)
    # and computes in float32 (``dtype``)
    storage = _storage_dtype(logits, dtype)
    x = _contiguous(logits, storage)
    options = CEOptions(w, spec.ignore_index, spec.smoothing, spec.reduction == "mean",
                        spec.z_loss, spec.logit_scale, spec.softcap)
    scale = mean_scale(options.mean, denominator)
    g = dest = None
    if grad is not None:
        g_dtype = storage if isinstance(grad, str) else np.dtype(grad.dtype)
        g, dest = _destination(grad, logits, x, problem.shape, g_dtype, (x, q))
    losses = cuda.device_array(problem.n_rows, dtype=np.float64)
    lse = predicted = None
    if spec.stats:
        lse = cuda.device_array(problem.n_rows, dtype=np.float64)
        predicted = cuda.device_array(problem.n_rows, dtype=np.int64)
    if problem.n_rows:
        g_flat = None if g is None else _flat(_kernel_array(g))
        g_storage = None if g is None else np.dtype(g.dtype).name
        _launch_rows(lambda cached: K.ce(dtype, cached, storage.name, g_storage), problem,
                     2 if spec.soft else 1,
                     lambda group: (_flat(_kernel_array(x)), y, q, g_flat, losses, lse, predicted,
                                    problem.n_rows, C, problem.inner, group, wsum, scale,
                                    *options))
    loss = _reduce(losses, denominator, spec.reduction, problem, logits)
    grad = None if g is None else _finish_destination(g, dest, logits)
    if not spec.stats:
        return loss, grad
    stats = row_stats(spec, lse.copy_to_host(), predicted.copy_to_host(),
                      None if y is None else y.copy_to_host(), w_host, denominator)
    return loss, grad, stats._replace(lse=_to_caller(cuda.to_device(stats.lse), logits),
                                      predicted=_to_caller(cuda.to_device(stats.predicted),
                                                           logits))


def nll_loss(spec: CrossEntropySpec, log_probs, target, weight):
    log_probs, target, weight = to_device_args((log_probs, target, weight))
    problem = spec.problem
    w_host, w = (None, None) if weight is None else _small_to_device(weight, problem.dtype)
    y, denominator = _hard_targets(spec, target, w_host)
    # 16-bit log-probabilities stay 16-bit: the kernel reads the one value
    # of each row it needs (2 bytes) and widens it to float32 (``dtype``)
    storage = _storage_dtype(log_probs, problem.dtype)
    lp = _contiguous(log_probs, storage)
    losses = cuda.device_array(problem.n_rows, dtype=np.float64)
    if problem.n_rows:
        tpb = _threads()
        blocks = min(math.ceil(problem.n_rows / tpb), MAX_BLOCKS)
        K.nll(storage.name)[blocks, tpb](_flat(_kernel_array(lp)), y, w, losses, problem.n_rows,
                                         problem.n_classes, problem.inner, spec.ignore_index)
    return _reduce(losses, denominator, spec.reduction, problem, log_probs)


def softmax(problem: ClassProblem, x, out, log: bool):
    device_x = _to_device(x)
    out = _gradient_destination(out, (x, device_x))
    x = device_x
    storage = _storage_dtype(x, problem.dtype)
    xd = _contiguous(x, storage)
    written, dest = _destination("new" if out is None else out, x, xd, problem.shape,
                                 storage if out is None else np.dtype(out.dtype), (xd,))
    if problem.n_rows and problem.n_classes:  # zero classes: an empty result
        _launch_rows(lambda cached: K.softmax(problem.dtype, cached, log, storage.name,
                                              np.dtype(written.dtype).name), problem, 1,
                     lambda group: (_flat(_kernel_array(xd)), _flat(_kernel_array(written)),
                                    problem.n_rows, problem.n_classes, problem.inner, group))
    return _finish_destination(written, dest, x)


def logsumexp(problem: ClassProblem, x):
    x = _to_device(x)
    if problem.n_classes == 0 or problem.n_rows == 0:
        empty = np.full(problem.batch_shape, -np.inf, dtype=problem.dtype)
        return _to_caller(cuda.to_device(empty), x)
    storage = _storage_dtype(x, problem.dtype)
    xd = _contiguous(x, storage)
    out = cuda.device_array(problem.n_rows, dtype=problem.dtype)
    _launch_rows(lambda cached: K.logsumexp(problem.dtype, storage.name), problem, 0,
                 lambda group: (_flat(_kernel_array(xd)), out, problem.n_rows,
                                problem.n_classes, problem.inner, group))
    return _to_caller(out.reshape(problem.batch_shape), x)


def logsumexp_axes(spec: ReductionSpec, x):
    """logsumexp over ``spec.axes``, one axis after another, the last first:
    lse over (a, b) is lse over a of lse over b (strided device arrays
    cannot be merged into one axis without a copy)."""
    result = x
    shape = spec.shape
    if not spec.axes:  # each element is its own logsumexp: one class each
        result = _to_device(x).reshape(shape + (1,))
        shape = shape + (1,)
        axes = (len(spec.shape),)
    else:
        axes = spec.axes
    for a in reversed(axes):
        result = logsumexp(ClassProblem(shape, a, spec.dtype), result)
        shape = shape[:a] + shape[a + 1:]
    return result.reshape(spec.kept_shape)


def _broadcast_operand(a, shape, dtype):
    """A flat device array of ``shape`` for a weight that broadcasts to it, of
    ``dtype`` (a 16-bit one kept as such: see ``_operand_storage``).

    Full-size operands stay on the device; smaller ones (a ``pos_weight`` per
    class, typically) are broadcast on the host, where they are small.
    """
    if a is None:
        return None
    if tuple(a.shape) == tuple(shape):
        return _flat(_contiguous(a, dtype))
    host = np.ascontiguousarray(np.broadcast_to(_host_copy(a).astype(dtype), shape))
    return _flat(_to_device(host))


def _operand_storage(d, dtype):
    """The dtype a kernel computing in ``dtype`` reads the operand ``d`` in:
    its own if 16-bit and the kernel computes in float32 (read as 16 bits,
    see ``_cuda_kernels._io``), else ``dtype``."""
    if d is not None and np.dtype(dtype) == np.float32:
        return _storage_dtype(d, dtype)
    return np.dtype(dtype)


def bce_with_logits(spec: BCESpec, logits, target, weight, pos_weight, grad):
    """Elementwise BCE; gradient as in ``cross_entropy``. 16-bit logits,
    targets and weights stay 16-bit: the kernel reads them (2 bytes an
    element), computes in float32 (``spec.dtype``) and writes a new or
    in-place gradient in the logits' dtype, rounded to nearest even (a
    float32 ``out=`` as it is); losses are float32."""
    device_logits, target, weight, pos_weight = to_device_args((logits, target, weight,
                                                                pos_weight))
    grad = _gradient_destination(grad, (logits, device_logits))
    logits = device_logits
    shape, dtype = spec.shape, spec.dtype
    n = math.prod(shape)
    storage = _operand_storage(logits, dtype)
    t_storage = _operand_storage(target, dtype)
    w_storage = _operand_storage(weight, dtype)
    pw_storage = _operand_storage(pos_weight, dtype)
    x = _contiguous(logits, storage)
    t = _flat(_contiguous(target, t_storage))
    w = _broadcast_operand(weight, shape, w_storage)
    pw = _broadcast_operand(pos_weight, shape, pw_storage)
    g = dest = None
    if grad is not None:
        g_dtype = storage if isinstance(grad, str) else np.dtype(grad.dtype)
        g, dest = _destination(grad, logits, x, shape, g_dtype, (x, t, w, pw))
    elements = cuda.device_array(n, dtype=dtype) if spec.reduction == "none" else None
    tpb = _threads()
    blocks = max(1, min(math.ceil(n / tpb), MAX_BLOCKS))
    partials = cuda.device_array(blocks * tpb, dtype=np.float64)
    scale = mean_scale(spec.reduction == "mean", n)
    if n:
        kernel = K.bce(dtype, storage.name, t_storage.name, w_storage.name, pw_storage.name,
                       None if g is None else np.dtype(g.dtype).name)
        operands = (_flat(x), t, w, pw, None if g is None else _flat(g))
        kernel[blocks, tpb](*(None if a is None else _kernel_array(a) for a in operands),
                            elements, partials, n, scale)
    if spec.reduction == "none":
        loss = _to_caller(elements.reshape(shape), logits)
    else:
        total = _device_sum(partials) if n else 0.0
        loss = finish_loss(total, n, spec.reduction, dtype)
    return loss, (None if g is None else _finish_destination(g, dest, logits))


# --------------------------------------------------------------------------
# The softmax Jacobian family (``_cuda_jacobian_kernels``)


def _result_dtype(dest, half, dtype):
    """The dtype a Jacobian-family kernel writes: the caller's ``dest``'s, or
    for a new result the call's 16-bit dtype ``half`` (None: ``dtype``)."""
    if isinstance(dest, str):
        return np.dtype(half or dtype)
    return np.dtype(dest.dtype)


def softmax_backward(problem: ClassProblem, grad_output, output, dest, log: bool):
    """Gradient through softmax (``log``: log_softmax); ``dest`` as in ``_cpu``.
    16-bit arrays are read and written as they are (computed in float32)."""
    from . import _cuda_jacobian_kernels as J

    device_go, device_o = to_device_args((grad_output, output))
    dest = _gradient_destination(dest, (grad_output, device_go))
    dtype = problem.dtype
    go = _contiguous(device_go, _storage_dtype(device_go, dtype))
    o = _contiguous(device_o, _storage_dtype(device_o, dtype))
    written, caller_dest = _destination(dest, device_go, go, problem.shape,
                                        _result_dtype(dest, half_of(go, o), dtype), (go, o))
    storages = tuple(np.dtype(a.dtype).name for a in (go, o, written))
    if problem.n_rows and problem.n_classes:
        _launch_rows(lambda cached: J.softmax_backward(dtype, cached, log, *storages), problem,
                     1 if log else 2,
                     lambda group: (_flat(_kernel_array(go)), _flat(_kernel_array(o)),
                                    _flat(_kernel_array(written)), problem.n_rows,
                                    problem.n_classes, problem.inner, group))
    return _finish_destination(written, caller_dest, device_go)


def softmax_jacobian(problem: ClassProblem, x):
    """diag(p) - p p^T per row: batch shape + (C, C), in ``x``'s dtype (16-bit
    read and written as it is, computed in float32)."""
    from . import _cuda_jacobian_kernels as J

    x = _to_device(x)
    C = problem.n_classes
    storage = _storage_dtype(x, problem.dtype)
    out = cuda.device_array(problem.n_rows * C * C, dtype=storage)
    if problem.n_rows and C:
        xd = _contiguous(x, storage)
        _launch_rows(lambda cached: J.softmax_jacobian(problem.dtype, storage.name, storage.name),
                     problem, 0,
                     lambda group: (_flat(_kernel_array(xd)), _kernel_array(out), problem.n_rows,
                                    C, problem.inner, group))
    return _to_caller(out.reshape(problem.batch_shape + (C, C)), x)


def cross_entropy_hvp(spec: CrossEntropySpec, logits, target, vector, weight, out):
    """Hessian of the cross-entropy (w.r.t. the logits) times ``vector``.
    16-bit logits and vector are read as they are and a 16-bit product
    written as it is (computed in float32); soft targets and weights are
    read as float32."""
    from . import _cuda_jacobian_kernels as J

    device_logits, target, vector, weight = to_device_args((logits, target, vector, weight))
    dest = "new" if out is None else _to_device(out)
    logits = device_logits
    problem = spec.problem
    dtype = problem.dtype
    C = problem.n_classes
    _, w, wsum, y, q, denominator = _targets_and_weights(spec, target, weight)
    x = _contiguous(logits, _storage_dtype(logits, dtype))
    v = _contiguous(vector, _storage_dtype(vector, dtype))
    options = CEOptions(w, spec.ignore_index, spec.smoothing, spec.reduction == "mean",
                        spec.z_loss, spec.logit_scale, spec.softcap)
    scale = mean_scale(options.mean, denominator)
    # written directly only into an ``out`` that overlaps no input (the
    # vector is read after the logits: never over them in place)
    result_dtype = _result_dtype(dest, half_of(x, v), dtype)
    if isinstance(dest, str):
        written, caller_dest = cuda.device_array(problem.shape, dtype=result_dtype), None
    elif _is_contiguous(dest) and not any(_overlaps(dest, a)
                                          for a in (x, q, v, logits, vector, target)):
        written = caller_dest = dest
    else:
        written, caller_dest = cuda.device_array(problem.shape, dtype=result_dtype), dest
    storages = tuple(np.dtype(a.dtype).name for a in (x, v, written))
    if problem.n_rows:
        # the options that transform the logits: a kernel of their own (two
        # more parameters), the plain one unchanged
        kernel, extra = ((J.cross_entropy_hvp_transformed,
                          (options.logit_scale, options.softcap)) if spec.transformed
                         else (J.cross_entropy_hvp, ()))
        _launch_rows(lambda cached: kernel(dtype, cached, *storages), problem, 2,
                     lambda group: (_flat(_kernel_array(x)), y, q, _flat(_kernel_array(v)),
                                    _flat(_kernel_array(written)), problem.n_rows, C,
                                    problem.inner, group, wsum, scale, options.weight,
                                    options.ignore_index, options.smoothing, options.mean,
                                    options.z_loss) + extra)
    return _finish_destination(written, caller_dest, logits)

# --------------------------------------------------------------------------
# Divergences on probabilities (``_cuda_divergence_kernels``): KL and BCE,
# laid out as ``bce_with_logits``.


def divergence(spec, input, target, weight, grad):
    """An elementwise divergence (``spec.kind``); gradient as in
    ``bce_with_logits``. BCE's inputs are checked to lie in [0, 1] by a
    kernel of their own, before anything is written."""
    from . import _cuda_divergence_kernels as D

    device_x, target, weight = to_device_args((input, target, weight))
    shape, dtype = spec.shape, spec.dtype
    n = math.prod(shape)
    # 16-bit inputs and targets stay 16-bit: the kernels read them (2 bytes
    # an element) and compute in float32 (``dtype``); weights are widened
    storage = _storage_dtype(device_x, dtype)
    x = _contiguous(device_x, storage)
    tpb = _threads()
    blocks = max(1, min(math.ceil(n / tpb), MAX_BLOCKS))
    if spec.kind == "bce" and n:
        counts = cuda.device_array(blocks * tpb, dtype=np.int64)
        D.outside_unit(storage.name)[blocks, tpb](_flat(_kernel_array(x)), counts, n)
        bad = int(counts.copy_to_host().sum())
        if bad:
            raise_outside_unit(bad)
    grad = _gradient_destination(grad, (input, device_x))
    t_storage = _storage_dtype(target, dtype)
    t = _flat(_contiguous(target, t_storage))
    w = _broadcast_operand(weight, shape, dtype)
    g = dest = None
    if grad is not None:
        g_dtype = storage if isinstance(grad, str) else np.dtype(grad.dtype)
        g, dest = _destination(grad, device_x, x, shape, g_dtype, (x, t, w))
    elements = cuda.device_array(n, dtype=dtype) if spec.reduction == "none" else None
    partials = cuda.device_array(blocks * tpb, dtype=np.float64)
    mean = spec.reduction in ("mean", "batchmean")
    denominator = spec.n_rows if spec.reduction == "batchmean" else n
    scale = mean_scale(mean, denominator)
    if n:
        kernel = D.divergence(dtype, spec.kind, storage.name, t_storage.name,
                              None if g is None else np.dtype(g.dtype).name)
        kernel[blocks, tpb](_flat(_kernel_array(x)), _kernel_array(t), w,
                            None if g is None else _flat(_kernel_array(g)), elements,
                            partials, n, scale)
    if spec.reduction == "none":
        loss = _to_caller(elements.reshape(shape), device_x)
    else:
        total = _device_sum(partials) if n else 0.0
        loss = finish_loss(total, denominator, "mean" if mean else spec.reduction, dtype)
    return loss, (None if g is None else _finish_destination(g, dest, device_x))


# --------------------------------------------------------------------------
# Distillation losses (``_cuda_distill_kernels``)


def distillation(spec, student, teacher, indices, target, dest):
    """(loss, gradient or None), as ``_cpu.distillation``. Targets and top-k
    indices are checked on host copies before a kernel writes."""
    from . import _cuda_distill_kernels as D

    device_x, t, ti, y = to_device_args((student, teacher, indices, target))
    dest = _gradient_destination(dest, (student, device_x))
    problem = spec.problem
    dtype = problem.dtype
    n_rows, C, k = problem.n_rows, problem.n_classes, spec.topk
    # 16-bit logits stay 16-bit where the call computes in float32: the
    # kernel reads them (2 bytes an element); a float64 call widens them
    half = dtype == np.float32
    x_storage = _storage_dtype(device_x, dtype) if half else dtype
    t_storage = _storage_dtype(t, dtype) if half else dtype
    if k:
        # each row's classes sorted (N x k values, on the host): the kernel
        # finds a class's teacher logit by binary search
        axis = problem.axis
        host_idx = np.asarray(_host_copy(ti)).astype(np.int64)
        order = np.argsort(host_idx, axis=axis, kind="stable")
        sorted_idx = np.take_along_axis(host_idx, order, axis)
        rows = np.moveaxis(sorted_idx, axis, -1).reshape(-1, k)
        out_of_range = ((rows[:, 0] < 0) | (rows[:, -1] >= C))
        twice = (rows[:, 1:] == rows[:, :-1]).any(axis=1)
        if out_of_range.any() or twice.any():
            row = int(np.argmax(out_of_range | twice))
            position = tuple(int(i) for i in np.unravel_index(row, problem.batch_shape))
            what = (f"a class out of range (valid: 0 to {C - 1})" if out_of_range[row]
                    else "a class twice")
            raise ValueError(f"top-k teacher indices hold {what} in the row at position "
                             f"{position}")
        idx = cuda.to_device(np.ascontiguousarray(sorted_idx).reshape(-1))
        t = _to_device(np.take_along_axis(np.asarray(_host_copy(t), dtype=t_storage), order,
                                          axis))
    else:
        idx = cuda.device_array(0, dtype=np.int64)
    if spec.has_target:
        y, kept = _hard_targets(spec, y, None)
    else:
        y, kept = cuda.device_array(0, dtype=np.int64), float(n_rows)
    x = _contiguous(device_x, x_storage)
    tv = _contiguous(t, t_storage)
    write = dest is not None
    if write:
        g_dtype = x_storage if isinstance(dest, str) else np.dtype(dest.dtype)
        written, caller_dest = _destination(dest, device_x, x, problem.shape, g_dtype,
                                            tuple(a for a in (x, tv, idx, device_x, t)
                                                  if a is not None))
    else:
        written, caller_dest = cuda.device_array(0, dtype=dtype), None
    storages = (x_storage.name, t_storage.name, np.dtype(written.dtype).name)
    scale = mean_scale(spec.reduction == "batchmean", kept)
    losses = cuda.device_array(n_rows, dtype=np.float64)
    if n_rows:
        _launch_rows(lambda cached: D.distill(dtype, cached, k > 0, *storages), problem,
                     1 if k else 2,
                     lambda group: (_flat(_kernel_array(x)), _flat(_kernel_array(tv)), idx,
                                    _flat(_kernel_array(written)), y, losses,
                                    n_rows, C, max(k, 1), problem.inner, group, spec.kind,
                                    spec.beta, spec.temperature, spec.alpha, spec.ignore_index,
                                    scale, write))
    loss = _reduce(losses, kept, "mean" if spec.reduction == "batchmean" else spec.reduction,
                   problem, device_x)
    if not write:
        return loss, None
    return loss, _finish_destination(written, caller_dest, device_x)
