"""Argument checks: a call's arguments in, one checked spec out.

The first step of every public function: it picks the device from the
arrays, converts host inputs (lists, scalars) to NumPy arrays, checks every
shape, dtype and option value, and returns the spec (``_spec``) with the
backend module that runs it (``_dispatch``). Everything here looks only at
shapes, dtypes and option values, so the same checks serve NumPy arrays and
GPU arrays alike, and all of them run before any kernel writes. The one
data-dependent check, class indices in range, is done by the backends
(``_host.scan_hard_targets``) before their kernels write.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import operator
from typing import NamedTuple

import numpy as np

from . import _dispatch
from ._half import half_dtype
from ._host import as_host_array, on_gpu
from ._spec import (BCESpec, ClassProblem, CrossEntropySpec, DistillationSpec, DivergenceSpec,
                    ReductionSpec, SoftmaxSpec)

REDUCTIONS = ("none", "mean", "sum")
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
DEVICES = ("auto", "cpu", "cuda")
_INT64 = np.iinfo(np.int64)


class _Described(NamedTuple):
    """Shape and dtype of a GPU array of another library (a PyTorch CUDA
    tensor's dtype is not a NumPy dtype), read from its
    ``__cuda_array_interface__``."""

    shape: tuple
    dtype: np.dtype


def _describe(a):
    """``a``, or for a foreign GPU array, its shape and NumPy dtype."""
    if a is None or type(a) is np.ndarray:
        return a
    interface = getattr(a, "__cuda_array_interface__", None)
    if interface is None:
        return a
    return _Described(tuple(interface["shape"]), np.dtype(interface["typestr"]))


def device_arg(device, *arrays) -> str:
    """The device a call runs on, "cpu" or "cuda", from ``device`` and the arrays.

    ``auto``: GPU arrays (anything with ``__cuda_array_interface__``) run on
    the GPU, host arrays on the CPU; a mix is refused. ``cpu`` refuses GPU
    arrays. ``cuda`` runs on the GPU and copies host inputs there.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    gpu = [on_gpu(a) for a in arrays if a is not None]
    if device == "auto":
        if any(gpu) and not all(gpu):
            raise ValueError("some inputs are on the GPU and some on the host: pass them all on "
                             "one device, or choose one with device='cpu' or device='cuda'")
        return "cuda" if any(gpu) else "cpu"
    if device == "cpu" and any(gpu):
        raise ValueError("device='cpu' but some inputs are GPU arrays: copy them to the host")
    return device


def _arrays(arrays):
    """Host inputs as NumPy arrays (lists and scalars converted); GPU arrays as given."""
    return tuple(a if on_gpu(a) else as_host_array(a) for a in arrays)


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


def z_loss_arg(z_loss) -> float:
    try:
        z = float(z_loss)
    except (TypeError, ValueError):
        raise TypeError(f"z_loss must be a float, got {z_loss!r}") from None
    if not 0.0 <= z < math.inf:  # also refuses NaN
        raise ValueError(f"z_loss must be finite and at least 0.0, got {z_loss!r}")
    return z


def logit_scale_arg(logit_scale) -> float:
    if isinstance(logit_scale, (bool, np.bool_)):
        raise TypeError(f"logit_scale must be a float, got {logit_scale!r}")
    try:
        scale = float(logit_scale)
    except (TypeError, ValueError):
        raise TypeError(f"logit_scale must be a float, got {logit_scale!r}") from None
    if not math.isfinite(scale):
        raise ValueError(f"logit_scale must be finite, got {logit_scale!r}")
    return scale


def softcap_arg(softcap) -> float:
    """The softcap as the kernels take it: 0.0 for None (no cap)."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, (bool, np.bool_)):
        raise TypeError(f"softcap must be a float or None, got {softcap!r}")
    try:
        cap = float(softcap)
    except (TypeError, ValueError):
        raise TypeError(f"softcap must be a float or None, got {softcap!r}") from None
    if not 0.0 < cap < math.inf:  # also refuses NaN
        raise ValueError(f"softcap must be a finite number above 0 (or None), got {softcap!r}")
    return cap


def stats_arg(return_stats) -> bool:
    if not isinstance(return_stats, (bool, np.bool_)):
        raise TypeError(f"return_stats must be True or False, got {return_stats!r}")
    return bool(return_stats)


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


def float_dtype(dtype, name="logits", half=False) -> np.dtype:
    """The float dtype computations run in for an input of ``dtype``.

    float32 and float64 are kept; integers and booleans become float64, as
    NumPy's ufuncs would make them; float16 and bfloat16 compute in float32
    where the function takes them (``half``); anything else is refused.
    """
    dtype = np.dtype(dtype)
    if dtype in FLOAT_DTYPES:
        return dtype
    if half_dtype(dtype):
        if half:
            return np.dtype(np.float32)
        raise TypeError(f"{name} of dtype {dtype} are not supported by this function yet: "
                        f"cast them to float32")
    if dtype.kind in "iub":
        return np.dtype(np.float64)
    if dtype.kind == "f":
        raise TypeError(f"{name} of dtype {dtype} are not supported: use float32 or float64")
    raise TypeError(f"{name} must be real numbers (float32 or float64), got dtype {dtype}")


def class_problem(logits, axis, name="logits", allow_empty=False, half=False) -> ClassProblem:
    logits = _describe(logits)
    shape = tuple(logits.shape)
    if len(shape) == 0:
        raise ValueError(f"{name} must have at least one dimension (the class axis), got a scalar")
    dtype = float_dtype(logits.dtype, name, half)
    axis = axis_arg(axis, len(shape), name)
    if shape[axis] == 0 and not allow_empty:
        raise ValueError(f"{name} have zero classes (axis {axis} of shape {shape} is empty)")
    return ClassProblem(shape, axis, dtype)


def cross_entropy_spec(logits, target, weight, ignore_index, reduction, label_smoothing,
                       axis, device, name="logits", z_loss=0.0, logit_scale=1.0, softcap=None,
                       return_stats=False) -> CrossEntropySpec:
    problem = class_problem(logits, axis, name, half=True)
    target, weight = _describe(target), _describe(weight)
    reduction = reduction_arg(reduction)
    smoothing = smoothing_arg(label_smoothing)
    z_loss = z_loss_arg(z_loss)
    logit_scale = logit_scale_arg(logit_scale)
    softcap = softcap_arg(softcap)
    return_stats = stats_arg(return_stats)
    ignore_index = index_arg(ignore_index, "ignore_index")
    if not _INT64.min <= ignore_index <= _INT64.max:  # class indices are int64
        raise ValueError(f"ignore_index must be between {_INT64.min} and {_INT64.max} "
                         f"(a 64-bit integer), got {ignore_index}")
    t_dtype = np.dtype(target.dtype)
    t_shape = tuple(target.shape)
    if t_dtype.kind == "f" or half_dtype(t_dtype):
        if t_shape != problem.shape:
            raise ValueError(
                f"float targets are class probabilities and must have the {name}' shape "
                f"{problem.shape}, got {t_shape}; class indices must be integers")
        float_dtype(t_dtype, "target", half=True)
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
    return CrossEntropySpec(problem, soft, reduction, smoothing, ignore_index, device, z_loss,
                            logit_scale, softcap, return_stats)


def check_weight(weight, length, name):
    shape = tuple(weight.shape)
    if shape != (length,):
        raise ValueError(f"{name} must be a 1-D array of {length} values (one per class), "
                         f"got shape {shape}")
    if np.dtype(weight.dtype).kind not in "iuf" and not half_dtype(weight.dtype):
        raise TypeError(f"{name} must hold real numbers, got dtype {weight.dtype}")


def check_grad_out(out, shape, dtype, name="out", storage=None):
    """``out=`` must take the gradient exactly: same shape and dtype, writable.

    Inputs of a 16-bit ``storage`` dtype (float16, bfloat16) compute in
    float32 (``dtype``): their results go into either dtype, not the other
    16-bit one."""
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(out).__name__}")
    out = _describe(out)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if storage is not None and half_dtype(storage) and np.dtype(out.dtype) in (storage, dtype):
        pass
    elif storage is not None and half_dtype(storage):
        raise TypeError(f"{name} has dtype {out.dtype}, expected {storage} (the input's dtype) "
                        f"or {dtype}")
    elif np.dtype(out.dtype) != dtype:
        raise TypeError(f"{name} has dtype {out.dtype}, expected {dtype}")
    flags = getattr(out, "flags", None)
    if flags is not None and not getattr(flags, "writeable", True):
        raise ValueError(f"{name} is read-only")


def check_inplace(logits, name="logits"):
    """``inplace=True`` needs a writable float array (float16, bfloat16,
    float32, float64) to write into."""
    logits = _describe(logits)
    dtype = np.dtype(getattr(logits, "dtype", np.dtype(object)))
    if not hasattr(logits, "shape") or not (dtype in FLOAT_DTYPES or half_dtype(dtype)):
        raise TypeError(f"inplace=True needs {name} as a float32 or float64 array, "
                        f"got {type(logits).__name__} of dtype {dtype} (float16 and bfloat16 "
                        f"work where the function takes them)")
    flags = getattr(logits, "flags", None)
    if flags is not None and not getattr(flags, "writeable", True):
        raise ValueError(f"inplace=True but {name} is read-only")


def bce_spec(logits, target, weight, pos_weight, reduction, device) -> BCESpec:
    logits, target = _describe(logits), _describe(target)
    weight, pos_weight = _describe(weight), _describe(pos_weight)
    shape = tuple(logits.shape)
    dtype = float_dtype(logits.dtype, half=True)
    reduction = reduction_arg(reduction)
    if tuple(target.shape) != shape:
        raise ValueError(f"target shape {tuple(target.shape)} must equal the logits' shape {shape}")
    float_dtype(target.dtype, "target", half=True)
    for name, arr in (("weight", weight), ("pos_weight", pos_weight)):
        if arr is None:
            continue
        float_dtype(arr.dtype, name, half=True)
        try:
            np.broadcast_shapes(tuple(arr.shape), shape)
        except ValueError:
            raise ValueError(f"{name} of shape {tuple(arr.shape)} does not broadcast to the "
                             f"logits' shape {shape}") from None
        if np.broadcast_shapes(tuple(arr.shape), shape) != shape:
            raise ValueError(f"{name} of shape {tuple(arr.shape)} would enlarge the logits' "
                             f"shape {shape} when broadcast")
    return BCESpec(shape, dtype, reduction, device)


def grad_destination(logits, out, inplace, shape, dtype, storage=None):
    """Where the gradient goes: ``"new"``, ``out`` (checked), or the logits.

    ``storage``: the call's 16-bit dtype, where another input than the
    logits may be the one that has it; the logits' dtype by default."""
    if inplace:
        if out is not None and out is not logits:
            raise ValueError("pass either out= or inplace=True, not both")
        return logits
    if out is not None:
        if storage is None:
            storage = np.dtype(_describe(logits).dtype)
        check_grad_out(out, shape, dtype, storage=storage)
        return out
    return "new"


# --------------------------------------------------------------------------
# A call's arguments in; out: the backend, the spec, the arrays as the
# backend takes them and, for gradients, the gradient's destination


def cross_entropy_call(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                       logit_scale, softcap, return_stats, axis, device, out, inplace, with_grad):
    device = device_arg(device, logits, target, weight)
    if with_grad and inplace:
        check_inplace(logits)  # before a list would be converted into a new array
    arrays = _arrays((logits, target, weight))
    spec = cross_entropy_spec(*arrays, ignore_index, reduction, label_smoothing, axis, device,
                              z_loss=z_loss, logit_scale=logit_scale, softcap=softcap,
                              return_stats=return_stats)
    grad = None
    if with_grad:
        grad = grad_destination(arrays[0], out, inplace, spec.problem.shape, spec.problem.dtype)
    return _dispatch.backend(device), spec, arrays, grad


def nll_call(log_probs, target, weight, ignore_index, reduction, axis, device):
    device = device_arg(device, log_probs, target, weight)
    arrays = _arrays((log_probs, target, weight))
    t_dtype = np.dtype(_describe(arrays[1]).dtype)
    if t_dtype.kind not in "iu":
        raise TypeError(f"nll_loss needs integer class indices as target, got dtype {t_dtype}")
    spec = cross_entropy_spec(*arrays, ignore_index, reduction, 0.0, axis, device, "log_probs")
    return _dispatch.backend(device), spec, arrays


def softmax_call(x, axis, out, device):
    if out is not None and not (hasattr(out, "shape") and hasattr(out, "dtype")):
        # a list would become a new array that the caller never sees
        raise TypeError(f"out must be an array, got {type(out).__name__}")
    device = device_arg(device, x, out)
    (xa,) = _arrays((x,))
    # zero classes: an empty result, as torch.softmax gives
    spec = SoftmaxSpec(class_problem(xa, axis, "x", allow_empty=True, half=True), device)
    if out is not None:
        check_grad_out(out, spec.problem.shape, spec.problem.dtype,
                       storage=np.dtype(_describe(xa).dtype))
    return _dispatch.backend(device), spec, xa


def logsumexp_call(x, axis, device):
    device = device_arg(device, x)
    (xa,) = _arrays((x,))
    spec = SoftmaxSpec(class_problem(xa, axis, "x", allow_empty=True, half=True), device)
    return _dispatch.backend(device), spec, xa


def bce_call(logits, target, weight, pos_weight, reduction, device, out, inplace, with_grad):
    device = device_arg(device, logits, target, weight, pos_weight)
    if with_grad and inplace:
        check_inplace(logits)
    arrays = _arrays((logits, target, weight, pos_weight))
    spec = bce_spec(*arrays, reduction, device)
    grad = None
    if with_grad:
        grad = grad_destination(arrays[0], out, inplace, spec.shape, spec.dtype)
    return _dispatch.backend(device), spec, arrays, grad


# --------------------------------------------------------------------------
# The softmax Jacobian family (``fastxent.jacobian``)


def _same_shape(a, b, name_a, name_b):
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{name_b} has shape {tuple(b.shape)}, but {name_a} has shape "
                         f"{tuple(a.shape)}: they must be the same")


def half_call_dtype(named):
    """The 16-bit dtype of a call of the softmax Jacobian family, or None.

    ``named``: (argument name, dtype) of the call's float array inputs.
    Where one of them is float16 or bfloat16 the call computes in float32
    and returns that dtype; every other one must then be of that dtype or
    float32 (no mixed 16-bit dtypes, no float64 or integers beside them).
    """
    first = next(((name, np.dtype(d)) for name, d in named if half_dtype(d)), None)
    if first is None:
        return None
    first_name, storage = first
    for name, dtype in named:
        dtype = np.dtype(dtype)
        if dtype != storage and dtype != np.dtype(np.float32):
            raise TypeError(f"{name} has dtype {dtype}, but {first_name} has dtype {storage}: "
                            f"with 16-bit inputs (computed in float32) pass {name} as "
                            f"{storage} or float32")
    return storage


def softmax_backward_call(grad_output, output, axis, out, inplace, device):
    """(backend, spec, (grad_output, output), destination): the spec's dtype
    is the one both arrays compute in (float64 if either is; float32 for
    16-bit inputs, whose result is their 16-bit dtype: ``half_call_dtype``),
    the destination ``"new"``, ``out`` (checked) or ``grad_output`` itself."""
    if inplace:
        check_inplace(grad_output, "grad_output")
    if out is not None and not (hasattr(out, "shape") and hasattr(out, "dtype")):
        raise TypeError(f"out must be an array, got {type(out).__name__}")
    device = device_arg(device, grad_output, output, out)
    go, o = _arrays((grad_output, output))
    gd, od = _describe(go), _describe(o)
    _same_shape(gd, od, "grad_output", "output")
    dtypes = {float_dtype(gd.dtype, "grad_output", half=True),
              float_dtype(od.dtype, "output", half=True)}
    storage = half_call_dtype((("grad_output", gd.dtype), ("output", od.dtype)))
    dtype = np.dtype(np.float64) if np.dtype(np.float64) in dtypes else np.dtype(np.float32)
    if inplace and np.dtype(gd.dtype) != np.dtype(od.dtype):
        raise TypeError(f"inplace=True needs grad_output and output of one dtype, got "
                        f"{gd.dtype} and {od.dtype}")
    problem = class_problem(_Described(tuple(gd.shape), dtype), axis, "grad_output",
                            allow_empty=True)
    dest = grad_destination(go, out, inplace, problem.shape, dtype,
                            storage=dtype if storage is None else storage)
    return _dispatch.backend(device), SoftmaxSpec(problem, device), (go, o), dest


def softmax_jacobian_call(x, axis, device):
    """(backend, spec, x): 16-bit ``x`` computes in float32 (the spec's
    dtype) and its Jacobian comes back in ``x``'s dtype."""
    device = device_arg(device, x)
    (xa,) = _arrays((x,))
    spec = SoftmaxSpec(class_problem(xa, axis, "x", allow_empty=True, half=True), device)
    return _dispatch.backend(device), spec, xa


def cross_entropy_hvp_call(logits, target, vector, weight, ignore_index, reduction,
                           label_smoothing, z_loss, logit_scale, softcap, axis, device, out):
    """(backend, spec, (logits, target, vector, weight), out): 16-bit logits
    or vector (``half_call_dtype``) compute in float32 and the product comes
    back in their 16-bit dtype (``out=`` of it or float32); 16-bit soft
    targets and weights are taken as ``cross_entropy`` takes them."""
    if out is not None and not (hasattr(out, "shape") and hasattr(out, "dtype")):
        raise TypeError(f"out must be an array, got {type(out).__name__}")
    device = device_arg(device, logits, target, vector, weight, out)
    x, t, v, w = _arrays((logits, target, vector, weight))
    spec = cross_entropy_spec(x, t, w, ignore_index, reduction, label_smoothing, axis, device,
                              z_loss=z_loss, logit_scale=logit_scale, softcap=softcap)
    xd, vd = _describe(x), _describe(v)
    _same_shape(xd, vd, "logits", "vector")
    float_dtype(vd.dtype, "vector", half=True)
    storage = half_call_dtype((("logits", xd.dtype), ("vector", vd.dtype)))
    if out is not None:
        check_grad_out(out, spec.problem.shape, spec.problem.dtype, storage=storage)
    return _dispatch.backend(device), spec, (x, t, v, w), out


def logsumexp_axes_call(x, axis, keepdims, device):
    """logsumexp over a tuple of axes (or one, with ``keepdims``; or of a
    0-d array, whose axis 0 or -1 reduces nothing)."""
    device = device_arg(device, x)
    (xa,) = _arrays((x,))
    described = _describe(xa)
    shape = tuple(described.shape)
    dtype = float_dtype(described.dtype, "x", half=True)
    axes = axis if isinstance(axis, tuple) else (axis,)
    normalized = tuple(axis_arg(a, max(len(shape), 1), "x") for a in axes)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"axis {axis} repeats an axis")
    if not shape:
        normalized = ()  # a 0-d array: its only "axis" holds one value
    return (_dispatch.backend(device),
            ReductionSpec(shape, tuple(sorted(normalized)), bool(keepdims), dtype, device), xa)

# Fused linear + cross-entropy: input (..., H), linear_weight (C, H)


def chunk_size_arg(chunk_size):
    if chunk_size is None:
        return None
    chunk = index_arg(chunk_size, "chunk_size")
    if chunk < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk}")
    return chunk


def linear_cross_entropy_call(input, linear_weight, target, linear_bias, weight, ignore_index,
                              reduction, label_smoothing, chunk_size, device, ce_options):
    """The linear head's module (``_dispatch.linear_backend``), the checked
    spec and the arrays ``(x, w, b, target, weight)``.

    ``x`` is the input as (N, H) and the target as (N,) indices or (N, C)
    probabilities (views where the layout allows). ``ce_options`` are the
    further keyword options of :func:`cross_entropy_spec` (``z_loss``...).
    """
    from ._linear import default_chunk_rows
    from ._spec import LinearCrossEntropySpec

    device = device_arg(device, input, linear_weight, target, linear_bias, weight)
    arrays = _arrays((input, linear_weight, target, linear_bias, weight))
    x, w, t, b, cw = (_describe(a) for a in arrays)
    x_shape = tuple(x.shape)
    if len(x_shape) == 0:
        raise ValueError("input must have at least one dimension (the hidden features), "
                         "got a scalar")
    dtype = float_dtype(x.dtype, "input", half=True)
    # 16-bit input computes in float32; linear_weight and linear_bias must match its storage
    storage = np.dtype(x.dtype)
    if storage != dtype and not half_dtype(storage):
        raise TypeError(f"input must be float32, float64, float16 or bfloat16, "
                        f"got dtype {x.dtype}")
    if len(w.shape) != 2:
        raise ValueError(f"linear_weight must be 2-D (classes, hidden features), "
                         f"got shape {tuple(w.shape)}")
    n_classes, hidden = (int(v) for v in w.shape)
    if hidden != x_shape[-1]:
        raise ValueError(f"linear_weight of shape {tuple(w.shape)} needs input with "
                         f"{hidden} features on its last axis, got input shape {x_shape}")
    if n_classes == 0:
        raise ValueError("linear_weight has zero rows (zero classes)")
    if np.dtype(w.dtype) != storage:
        raise TypeError(f"linear_weight has dtype {w.dtype}, but input has dtype {storage}: "
                        f"pass both in one dtype")
    if b is not None:
        if tuple(b.shape) != (n_classes,):
            raise ValueError(f"linear_bias must have shape ({n_classes},) (one value per "
                             f"class), got {tuple(b.shape)}")
        if np.dtype(b.dtype) != storage:
            raise TypeError(f"linear_bias has dtype {b.dtype}, but input has dtype {storage}")
    params = list(inspect.signature(cross_entropy_spec).parameters)
    # the options after the arguments (the per-row statistics are not gathered across chunks)
    known = [p for p in params[params.index("name") + 1:]
             if p != "return_stats"]
    unknown = sorted(set(ce_options) - set(known))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)} for linear_cross_entropy "
                        f"(cross-entropy options: {', '.join(known)})")
    batch_shape = x_shape[:-1]
    logits = _Described(batch_shape + (n_classes,), dtype)
    ce = cross_entropy_spec(logits, t, cw, ignore_index, reduction, label_smoothing, -1, device,
                            **ce_options)
    n_rows = ce.problem.n_rows
    rows_problem = ClassProblem((n_rows, n_classes), 1, dtype)
    ce = dataclasses.replace(ce, problem=rows_problem)  # keeps every option field
    chunk = chunk_size_arg(chunk_size)
    if chunk is None:
        chunk = default_chunk_rows(n_rows, n_classes, hidden, dtype.itemsize)
    spec = LinearCrossEntropySpec(ce, batch_shape, hidden, max(1, min(chunk, n_rows)),
                                  storage if half_dtype(storage) else None)
    xa, wa, ta, ba, cwa = arrays
    xa = xa.reshape(n_rows, hidden)
    ta = ta.reshape((n_rows, n_classes) if ce.soft else (n_rows,))
    return _dispatch.linear_backend(device), spec, (xa, wa, ba, ta, cwa)


# --------------------------------------------------------------------------
# Divergences on probabilities (``fastxent.divergences``)

KL_REDUCTIONS = ("none", "mean", "sum", "batchmean")


def kl_reduction_arg(reduction) -> str:
    if not isinstance(reduction, str) or reduction not in KL_REDUCTIONS:
        raise ValueError(f"reduction must be 'none', 'mean', 'sum' or 'batchmean', "
                         f"got {reduction!r}")
    return reduction


def _divergence_operands(input, target, weight, reduction):
    """(shape, dtype) of ``input`` with ``target`` of its shape and
    ``weight`` broadcasting to it without enlarging it."""
    input, target, weight = _describe(input), _describe(target), _describe(weight)
    shape = tuple(input.shape)
    dtype = float_dtype(input.dtype, "input", half=True)
    if tuple(target.shape) != shape:
        raise ValueError(f"target shape {tuple(target.shape)} must equal the input's shape "
                         f"{shape}")
    float_dtype(target.dtype, "target", half=True)
    if weight is not None:
        float_dtype(weight.dtype, "weight", half=True)
        try:
            full = np.broadcast_shapes(tuple(weight.shape), shape)
        except ValueError:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not broadcast to the "
                             f"input's shape {shape}") from None
        if full != shape:
            raise ValueError(f"weight of shape {tuple(weight.shape)} would enlarge the input's "
                             f"shape {shape} when broadcast")
    return shape, dtype


def kl_div_call(input, target, reduction, log_target, axis, device, out, inplace, with_grad):
    """(backend, DivergenceSpec, (input, target, None), destination)."""
    device = device_arg(device, input, target)
    if with_grad and inplace:
        check_inplace(input, "input")
    if not isinstance(log_target, (bool, np.bool_)):
        raise TypeError(f"log_target must be True or False, got {log_target!r}")
    arrays = _arrays((input, target))
    reduction = kl_reduction_arg(reduction)
    shape, dtype = _divergence_operands(arrays[0], arrays[1], None, reduction)
    axis_arg(axis, max(1, len(shape)), "input")
    # batchmean's divisor, as torch: input.size(0) (none for a 0-d input)
    n_rows = shape[0] if shape else 1
    spec = DivergenceSpec(shape, dtype, reduction, "kl_log_target" if log_target else "kl",
                          n_rows, device)
    grad = grad_destination(arrays[0], out, inplace, shape, dtype) if with_grad else None
    return _dispatch.backend(device), spec, arrays + (None,), grad


def binary_cross_entropy_call(input, target, weight, reduction, device, out, inplace,
                              with_grad):
    """(backend, DivergenceSpec, (input, target, weight), destination); the
    backend checks that the input lies in [0, 1] before it writes
    (``raise_outside_unit``)."""
    device = device_arg(device, input, target, weight)
    if with_grad and inplace:
        check_inplace(input, "input")
    arrays = _arrays((input, target, weight))
    reduction = reduction_arg(reduction)
    shape, dtype = _divergence_operands(*arrays, reduction)
    spec = DivergenceSpec(shape, dtype, reduction, "bce", 1, device)
    grad = grad_destination(arrays[0], out, inplace, shape, dtype) if with_grad else None
    return _dispatch.backend(device), spec, arrays, grad


# Distillation losses (``distillation``)

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
DISTILL_REDUCTIONS = ("none", "batchmean", "sum")


def _unit_float(value, name, low_open, high_open):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    low_ok = value > 0.0 if low_open else value >= 0.0
    high_ok = value < 1.0 if high_open else value <= 1.0
    if not (low_ok and high_ok):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def distillation_call(student_logits, teacher_logits, divergence, beta, temperature, target,
                      alpha, ignore_index, reduction, axis, device, out, inplace, with_grad):
    """(backend, spec, (student, teacher values, teacher indices or None,
    target or None), gradient destination or None).

    A tuple teacher is ``(indices, values)`` of the student's shape with k
    in place of the classes; a dense teacher has the student's shape."""
    if with_grad and inplace:
        check_inplace(student_logits, "student_logits")
    topk_teacher = isinstance(teacher_logits, tuple)
    if topk_teacher:
        if len(teacher_logits) != 2:
            raise ValueError("a top-k teacher_logits must be a tuple (indices, values), got a "
                             f"tuple of {len(teacher_logits)} items")
        t_indices, t_values = teacher_logits
    else:
        t_indices, t_values = None, teacher_logits
    device = device_arg(device, student_logits, t_values, t_indices, target, out)
    x, tv, ti, y = _arrays((student_logits, t_values, t_indices, target))
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    kind = DIVERGENCES.index(divergence)
    beta = _unit_float(beta, "beta", True, True)
    alpha = _unit_float(alpha, "alpha", False, False)
    if isinstance(temperature, bool) or not isinstance(
            temperature, (int, float, np.integer, np.floating)):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if not isinstance(reduction, str) or reduction not in DISTILL_REDUCTIONS:
        raise ValueError(f"reduction must be 'none', 'batchmean' or 'sum', got {reduction!r}")
    ignore_index = index_arg(ignore_index, "ignore_index")
    problem = class_problem(x, axis, "student_logits", half=True)
    xd, vd = _describe(x), _describe(tv)
    vdtype = float_dtype(vd.dtype, "teacher_logits", half=True)
    dtype = problem.dtype
    if vdtype == np.dtype(np.float64) and dtype != vdtype:
        dtype = vdtype
        problem = ClassProblem(problem.shape, problem.axis, dtype)
    # A 16-bit student computing in float32 takes its gradient back in place.
    half_student = half_dtype(xd.dtype) and dtype == np.dtype(np.float32)
    if inplace and with_grad and np.dtype(xd.dtype) != dtype and not half_student:
        raise TypeError(f"inplace=True needs student_logits of the dtype the loss computes in "
                        f"({dtype}), got {xd.dtype}")
    k = 0
    if topk_teacher:
        idd = _describe(ti)
        if np.dtype(idd.dtype).kind not in "iu":
            raise TypeError(f"top-k teacher indices must be integers, got dtype {idd.dtype}")
        _same_shape(idd, vd, "the top-k teacher's indices", "the top-k teacher's values")
        ax, vshape = problem.axis, tuple(vd.shape)
        if (len(vshape) != len(problem.shape) or vshape[:ax] != problem.shape[:ax]
                or vshape[ax + 1:] != problem.shape[ax + 1:]):
            raise ValueError(f"top-k teacher of shape {vshape} does not match "
                             f"student_logits of shape {problem.shape}: it must have that shape "
                             f"with k in place of the class axis {ax}")
        k = vd.shape[problem.axis]
        if not 1 <= k <= problem.n_classes:
            raise ValueError(f"top-k teacher must hold between 1 and {problem.n_classes} "
                             f"classes per row, got k={k}")
    else:
        _same_shape(xd, vd, "student_logits", "teacher_logits")
    if y is not None:
        yd = _describe(y)
        if np.dtype(yd.dtype).kind not in "iu":
            raise TypeError(f"target must hold integer class indices, got dtype {yd.dtype}")
        if tuple(yd.shape) != problem.batch_shape:
            raise ValueError(f"target shape {tuple(yd.shape)} does not match the batch shape "
                             f"{problem.batch_shape} of student_logits with shape "
                             f"{problem.shape} (class axis {problem.axis})")
    elif alpha > 0.0:
        raise ValueError(f"alpha={alpha} weighs a cross-entropy against target, but target "
                         "is None")
    dest = None
    if with_grad:
        if out is not None and not inplace and not half_student:
            # A 16-bit student with a float64 teacher computes in float64:
            # its gradient goes to float64 only.
            check_grad_out(out, problem.shape, dtype)
        dest = grad_destination(x, out, inplace, problem.shape, dtype)
    spec = DistillationSpec(problem, kind, beta, temperature, alpha, ignore_index, reduction, k,
                            y is not None, device)
    return _dispatch.backend(device), spec, (x, tv, ti, y), dest
