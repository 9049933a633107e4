"""The CPU backend: brings NumPy arrays to the kernels' row form and back.

Each function takes a checked spec (``_spec``) and the caller's arrays,
picks the layout strategy (direct rows, blocks or tiles: one kernel each in
``_cpu_kernels``), runs it and returns NumPy results. The functions of
``_cuda`` have the same names and signatures.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from . import _cpu_kernels as K
from ._fastmath import native_vector_bytes
from ._formulas import mean_scale
from ._half import half_dtype, half_of, narrow, narrow_into, widen
from ._host import (bad_uint64_target, finish_loss, raise_bad_target, raise_outside_unit,
                    row_stats, scan_hard_targets)
from ._spec import BCESpec, CEOptions, ClassProblem, CrossEntropySpec, ReductionSpec
from ._tiles import TILE

#: Rows of more classes than this, contiguous along the classes, take the
#: direct kernels (one row at a time).
SHORT_ROW = 128
#: Rows contiguous along the classes take the tiled kernels (see ``_tiles``)
#: up to this many classes, by the CPU's vector register size in bytes:
#: their tiles are transposed in registers, and above these counts the
#: transposes cost more than the per-row work they batch, against the block
#: kernels.
TRANSPOSED_TILE_CLASSES = {
    64: {np.dtype(np.float32): 64, np.dtype(np.float64): 16},
    32: {np.dtype(np.float32): 64, np.dtype(np.float64): 40},
}
#: Rows whose class is contiguous across rows (PyTorch's (N, C, d) layout, a
#: transposed array) need no transpose, and their tiles beat the blocks at
#: every class count measured: up to this many (a tile's scratch is C x 16).
TILE_CLASSES = 1 << 16
#: Rows strided both ways load each tile element on its own: their tiles win
#: while a tile's scratch (C x 16 elements) stays in cache, up to this many
#: bytes (2048 classes in float32, 1024 in float64).
STRIDED_TILE_BYTES = 1 << 17

# Row forms: ROWS is (rows, C), a view when the class axis can be moved
# last without copying; SLABS is (outer, C, inner), a view of any C-ordered
# array, used for PyTorch's (N, C, d1, ...) layout.
ROWS, SLABS = 2, 3


def _try_view(a, shape):
    """``a`` reshaped without copying, or None where that needs a copy."""
    view = a.view()
    try:
        view.shape = shape
    except AttributeError:
        return None
    return view


def _form_shape(problem: ClassProblem, form: int) -> tuple:
    if form == ROWS:
        return (problem.n_rows, problem.n_classes)
    return (problem.outer, problem.n_classes, problem.inner)


def _as_form(a, problem: ClassProblem, form: int):
    """A view of ``a`` in the given row form, or None."""
    if form == ROWS:
        if problem.axis != a.ndim - 1:
            a = np.moveaxis(a, problem.axis, -1)
        return _try_view(a, _form_shape(problem, ROWS))
    return _try_view(a, _form_shape(problem, SLABS))


def _from_form(rows, problem: ClassProblem, form: int):
    """The caller's view (the input's shape) of an array in row form."""
    if form == SLABS:
        return rows.reshape(problem.shape)
    moved = rows.reshape(problem.batch_shape + (problem.n_classes,))
    return moved if problem.axis == moved.ndim - 1 else np.moveaxis(moved, -1, problem.axis)


def rows_of(a, problem: ClassProblem, form: int | None = None):
    """(array in row form, form): a view where possible, else a copy.

    Strided 2-D views (slices, transposes) are read in place: the kernels
    take strides, and contiguous rows take the vectorized path.
    """
    forms = (ROWS, SLABS) if form is None else (form,)
    for f in forms:
        view = _as_form(a, problem, f)
        if view is not None:
            return view, f
    f = forms[0]
    if f == ROWS:
        return np.ascontiguousarray(np.moveaxis(a, problem.axis, -1)).reshape(
            _form_shape(problem, ROWS)), f
    return np.ascontiguousarray(a).reshape(_form_shape(problem, SLABS)), f


def _direct(x_rows, form) -> bool:
    """Whether the direct kernels apply: long rows, contiguous along the classes."""
    return (form == ROWS and x_rows.shape[1] > SHORT_ROW
            and x_rows.strides[1] == x_rows.itemsize)


def _tiled(x_rows) -> bool:
    """Whether the tiled kernels apply (2-D rows or 3-D slabs, the classes
    on axis 1)."""
    n_classes, item = x_rows.shape[1], x_rows.itemsize
    # The stride from a row of a tile to the next (see ``_cpu_kernels._tile``):
    # across rows in 2-D, along the inner axis of slabs at least a tile wide,
    # else from slab to slab.
    wide_slabs = x_rows.ndim == 3 and x_rows.shape[2] >= TILE
    across_rows = x_rows.strides[2] if wide_slabs else x_rows.strides[0]
    if x_rows.strides[1] == item:
        limit = TRANSPOSED_TILE_CLASSES[64 if native_vector_bytes() >= 64 else 32][x_rows.dtype]
    elif across_rows == item:
        limit = TILE_CLASSES
    else:
        limit = STRIDED_TILE_BYTES // (TILE * item)
    return 0 < n_classes <= limit


def _inner(problem: ClassProblem, form: int) -> int:
    """The kernels' ``inner`` argument: the class stride, in rows, of SLABS."""
    return problem.inner if form == SLABS else 1


def _same_view(a, b) -> bool:
    return (a.shape == b.shape and a.strides == b.strides
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])


class _Output:
    """Where a kernel writes a result the size of the input.

    ``dest`` None: a new array. Otherwise the caller's array (``out=`` or the
    logits for ``inplace=True``): written directly when it has the row form
    and overlaps no input, else through a temporary copied in at the end, so
    a result never overwrites an input it still has to read.
    """

    def __init__(self, dest, x_rows, problem, form, inputs):
        self.dest, self.problem, self.form = dest, problem, form
        self.inplace = False
        self.rows = None
        if dest is not None:
            view = _as_form(dest, problem, form)
            # ``dest`` the logits themselves: its view in the rows' form is
            # the rows (``rows_of`` made the same view, or a copy if none)
            if view is not None and (dest is inputs[0] or _same_view(view, x_rows)):
                self.rows, self.inplace = view, True
            elif view is not None and not any(np.may_share_memory(dest, a) for a in inputs
                                              if isinstance(a, np.ndarray)):
                self.rows = view
        self.copy_back = dest is not None and self.rows is None
        if self.rows is None:
            self.rows = np.empty(_form_shape(problem, form), dtype=problem.dtype)

    def result(self):
        if self.dest is None:
            return _from_form(self.rows, self.problem, self.form)
        if self.copy_back:
            np.copyto(self.dest, _from_form(self.rows, self.problem, self.form))
        return self.dest


def _hard_targets(target, spec: CrossEntropySpec):
    """Class indices as the flat int64 array the kernels read (which check
    their range). uint64 indices above 2**63 - 1 would wrap to negative
    int64 values, which could even equal ``ignore_index``: those are
    refused here, before a kernel runs."""
    flat = target.reshape(-1)
    if flat.dtype == np.int64 and flat.flags.c_contiguous:
        return flat
    y = np.ascontiguousarray(flat, dtype=np.int64)
    if flat.dtype == np.uint64:
        bad = bad_uint64_target(flat, -1)
        if bad >= 0:
            problem = spec.problem
            scanned, _ = scan_hard_targets(y, problem.n_classes, spec.ignore_index, None)
            bad = bad if scanned < 0 else min(bad, scanned)
            raise_bad_target(bad, flat, problem.batch_shape, problem.n_classes,
                             spec.ignore_index)
    return y


def _weight(weight, dtype):
    return None if weight is None else np.ascontiguousarray(weight, dtype=dtype)


def _reduce(losses, total, denominator, reduction, problem: ClassProblem):
    if reduction == "none":
        return losses.astype(problem.dtype).reshape(problem.batch_shape)
    return finish_loss(total, denominator, reduction, problem.dtype)


def _ce_kernel(x_rows, form, options=False):
    """The cross-entropy kernel for rows of this shape, layout and form
    (``options``: with the LLM options or statistics)."""
    if _direct(x_rows, form):
        return K.cross_entropy_direct_options if options else K.cross_entropy_direct
    if _tiled(x_rows):
        return K.cross_entropy_tiles
    return K.cross_entropy_blocks


class CrossEntropyPlan:
    """A cross-entropy call on the CPU, prepared once for arrays of given
    shapes, strides and dtypes and options (a checked spec).

    Calling it runs the kernel on such arrays. Where the logits' row form is
    a view obtained by ``reshape`` (every C-contiguous input), the plan keeps
    that view's shape, the kernel and its compiled entry point, so that a
    call does no more than make the views and run the kernel: this is what
    a small batch's time is made of. Otherwise each call goes the general
    way (``rows_of`` and ``_Output``).
    """

    def __init__(self, spec: CrossEntropySpec, logits, target, grad):
        self.spec = spec
        problem = spec.problem
        self.dtype = problem.dtype
        self.options = (spec.ignore_index, spec.smoothing, spec.reduction == "mean",
                        spec.z_loss, spec.logit_scale, spec.softcap)
        self.grad = None if grad is None else ("new" if isinstance(grad, str) else "out")
        self.inplace = grad is not None and grad is logits
        if self.inplace:
            self.grad = "inplace"
        # The fast way: logits (and soft targets) of the kernels' dtype whose
        # row form is a view that ``reshape`` makes. Only views are tried
        # here: any other call goes the general way, which makes the copy.
        self.row_shape = x_rows = None
        if type(logits) is np.ndarray and logits.dtype == self.dtype and self.grad != "out":
            for form in (ROWS, SLABS):  # in ``rows_of``'s order
                x_rows = _as_form(logits, problem, form)
                if x_rows is not None:
                    self.form = form
                    break
        if x_rows is not None and (self.form == SLABS or problem.axis == logits.ndim - 1):
            view = logits.reshape(x_rows.shape)
            if np.may_share_memory(view, logits) and view.strides == x_rows.strides:
                self.row_shape = x_rows.shape
        if spec.soft and self.row_shape is not None:
            if (np.dtype(target.dtype) != self.dtype
                    or not np.may_share_memory(target.reshape(self.row_shape), target)):
                self.row_shape = None
        # the LLM options allocate their outputs or scratch each call: the general way
        self.fast = self.row_shape is not None and not (spec.stats or spec.transformed)
        if not self.fast:
            return
        # what a fast call does, decided here once
        self.kernel = _ce_kernel(x_rows, self.form)
        self.inner = _inner(problem, self.form)
        self.soft = spec.soft
        self.reshape_x = logits.shape != self.row_shape
        self.reshape_q = spec.soft and target.shape != self.row_shape
        self.whole_y = (not spec.soft and target.ndim == 1 and target.dtype == np.int64
                        and target.flags.c_contiguous)
        self.new_grad = self.grad == "new"
        self.reshape_g = self.new_grad and self.row_shape != problem.shape
        self.serial = logits.size < self.kernel.PARALLEL_MIN_ELEMENTS
        self.no_weight = CEOptions(None, *self.options)
        self.reduced = spec.reduction != "none"
        self.mean = spec.reduction == "mean"
        self.scalar = self.dtype.type
        self._scratch = threading.local()
        self._entry = None

    def __call__(self, logits, target, weight, grad=None):
        if not self.fast:
            return self._general(logits, target, weight, grad)
        x = logits.reshape(self.row_shape) if self.reshape_x else logits
        if self.soft:
            y, q = None, (target.reshape(self.row_shape) if self.reshape_q else target)
        else:
            q = None
            y = target if self.whole_y else _hard_targets(target, self.spec)
        if weight is None:
            options = self.no_weight
        else:
            options = CEOptions(np.ascontiguousarray(weight, dtype=self.dtype), *self.options)
        if self.inplace:
            g = x
        else:
            g = np.empty(self.row_shape, self.dtype) if self.new_grad else None
        problem = self.spec.problem
        if self.reduced:  # the row losses are scratch: one array per thread
            losses = getattr(self._scratch, "losses", None)
            if losses is None:
                losses = self._scratch.losses = np.empty(problem.n_rows)
        else:
            losses = np.empty(problem.n_rows)
        args = (x, y, q, options, g, self.inplace, losses, self.inner, None, None)
        if not self.serial:
            bad, total, denominator = self.kernel(*args)
        else:
            if self._entry is None:
                self._entry = self.kernel.serial_entry(args)
            bad, total, denominator = self._entry(*args)
        if bad >= 0:
            raise_bad_target(bad, y, problem.batch_shape, problem.n_classes,
                             self.spec.ignore_index)
        if self.mean and denominator != 0.0:
            loss = self.scalar(total / denominator)
        else:
            loss = _reduce(losses, total, denominator, self.spec.reduction, problem)
        if g is None:
            return loss, None
        if self.inplace:
            return loss, logits
        return loss, (g.reshape(problem.shape) if self.reshape_g else g)

    def _general(self, logits, target, weight, grad):
        spec, problem = self.spec, self.spec.problem
        if half_dtype(logits.dtype):
            return self._half(logits, target, weight, grad)
        x = np.asarray(logits, dtype=problem.dtype)
        x_rows, form = rows_of(x, problem)
        if spec.soft:
            y, q = None, rows_of(np.asarray(target, dtype=problem.dtype), problem, form)[0]
        else:
            y, q = _hard_targets(np.asarray(target), spec), None
        opts = CEOptions(_weight(weight, problem.dtype), *self.options)
        out = g = None
        inplace = False
        if grad is not None:
            out = _Output(None if isinstance(grad, str) else grad, x_rows, problem, form,
                          (x, target, weight))
            g, inplace = out.rows, out.inplace
        losses = np.empty(problem.n_rows)
        # the LLM options' kernels (see _cpu_kernels): statistics' arrays,
        # of no rows when only the transform is asked for
        stats = (None, None)
        if spec.transformed or spec.stats:
            n = problem.n_rows if spec.stats else 0
            stats = (np.empty(n), np.empty(n, np.int64))
        bad, total, denominator = _ce_kernel(x_rows, form, stats[0] is not None)(
            x_rows, y, q, opts, g, inplace, losses, _inner(problem, form), *stats)
        if bad >= 0:
            raise_bad_target(bad, y, problem.batch_shape, problem.n_classes, spec.ignore_index)
        loss = _reduce(losses, total, denominator, spec.reduction, problem)
        grad = None if out is None else out.result()
        if not spec.stats:
            return loss, grad
        return loss, grad, row_stats(spec, *stats, y, opts.weight, denominator)


    def _half(self, logits, target, weight, grad):
        """16-bit logits: widened to float32, the float32 call, its gradient
        narrowed into the 16-bit destination (a float32 ``out=`` is written
        directly)."""
        direct = self._half_direct(logits, target, weight, grad)
        if direct is not None:
            return direct
        x = widen(logits)
        if self.spec.soft and half_dtype(target.dtype):
            target = widen(target)
        float_out = grad is not None and not isinstance(grad, str) and grad is not logits \
            and grad.dtype == np.float32
        g = grad if (grad is None or float_out) else x
        result = CrossEntropyPlan(self.spec, x, target, g)(x, target, weight, g)
        if grad is None or float_out:
            return result
        if isinstance(grad, str):
            dest = narrow(result[1], logits.dtype)
        else:
            narrow_into(grad, result[1])
            dest = grad
        return (result[0], dest) + tuple(result[2:])


    def _half_direct(self, logits, target, weight, grad):
        """Long contiguous rows of 16-bit logits, class indices, no LLM
        options, the gradient (if any) new, in place or into a 16-bit
        ``out=`` of the logits' dtype: the kernel that reads and writes the
        16-bit rows itself (``cross_entropy_direct_half``). None otherwise."""
        spec, problem = self.spec, self.spec.problem
        if spec.soft or spec.transformed or spec.stats or problem.axis != logits.ndim - 1:
            return None
        x_rows = _as_form(logits, problem, ROWS)
        if x_rows is None or not _direct(x_rows, ROWS):
            return None
        g_rows = None
        if isinstance(grad, str):
            grad = np.empty(problem.shape, logits.dtype)
            g_rows = grad.reshape(x_rows.shape)
        elif grad is logits:
            g_rows = x_rows
        elif grad is not None:
            g_rows = _as_form(grad, problem, ROWS) if grad.dtype == logits.dtype else None
            if (g_rows is None or g_rows.strides[1] != g_rows.itemsize
                    or np.may_share_memory(grad, logits)):
                return None
        y = _hard_targets(np.asarray(target), spec)
        opts = CEOptions(_weight(weight, problem.dtype), *self.options)
        losses = np.empty(problem.n_rows)
        bits = x_rows.view(np.uint16)
        bad, total, denominator = K.cross_entropy_direct_half(
            bits, y, opts, None if g_rows is None else g_rows.view(np.uint16), losses,
            logits.dtype.name == "bfloat16")
        if bad >= 0:
            raise_bad_target(bad, y, problem.batch_shape, problem.n_classes, spec.ignore_index)
        return _reduce(losses, total, denominator, spec.reduction, problem), grad


def cross_entropy(spec: CrossEntropySpec, logits, target, weight, grad):
    """(loss, gradient or None), and the ``CrossEntropyStats`` third when
    ``spec.stats``; the gradient is computed when ``grad`` is not None.

    ``grad``: None (loss only), ``"new"`` (a new array), or an array to
    write the gradient into (``out=``, or the logits themselves).
    """
    return CrossEntropyPlan(spec, logits, target, grad)(logits, target, weight, grad)


def nll_loss(spec: CrossEntropySpec, log_probs, target, weight):
    problem = spec.problem
    lp = np.asarray(log_probs, dtype=problem.dtype)
    lp_rows, form = rows_of(lp, problem)
    y = _hard_targets(np.asarray(target), spec)
    opts = CEOptions(_weight(weight, problem.dtype), spec.ignore_index, 0.0, False, 0.0)
    losses = np.empty(problem.n_rows)
    bad, total, denominator = K.nll(lp_rows, y, opts, losses, _inner(problem, form))
    if bad >= 0:
        raise_bad_target(bad, y, problem.batch_shape, problem.n_classes, spec.ignore_index)
    return _reduce(losses, total, denominator, spec.reduction, problem)


def softmax(problem: ClassProblem, x, out, log: bool):
    if half_dtype(x.dtype):  # in float32, rounded into the 16-bit result
        if out is not None and out.dtype == np.float32:
            return softmax(problem, widen(x), out, log)
        if problem.n_rows == 0 or problem.n_classes == 0:
            return np.empty(problem.shape, x.dtype) if out is None else out
        x32 = widen(x)
        values = softmax(problem, x32, x32, log)
        if out is None:
            return narrow(values, x.dtype)
        narrow_into(out, values)
        return out
    if problem.n_rows == 0 or problem.n_classes == 0:  # nothing to compute
        return np.empty(problem.shape, problem.dtype) if out is None else out
    x = np.asarray(x, dtype=problem.dtype)
    x_rows, form = rows_of(x, problem)
    result = _Output(out, x_rows, problem, form, (x,))
    inner = _inner(problem, form)
    if _direct(x_rows, form):
        K.softmax(x_rows, result.rows, result.inplace, problem.n_rows, inner, log)
    elif _tiled(x_rows):
        K.softmax_tiled(x_rows, result.rows, inner, log)
    else:
        K.softmax_buffered(x_rows, result.rows, problem.n_rows, inner, log)
    return result.result()


def logsumexp(problem: ClassProblem, x):
    x = widen(x) if half_dtype(x.dtype) else np.asarray(x, dtype=problem.dtype)
    if problem.n_classes == 0:
        return np.full(problem.batch_shape, -np.inf, dtype=problem.dtype)
    x_rows, form = rows_of(x, problem)
    out = np.empty(problem.n_rows, dtype=problem.dtype)
    if _direct(x_rows, form):
        K.logsumexp(x_rows, out, _inner(problem, form))
    elif _tiled(x_rows):
        K.logsumexp_tiled(x_rows, out, _inner(problem, form))
    else:
        K.logsumexp_buffered(x_rows, out, _inner(problem, form))
    return out.reshape(problem.batch_shape)


def logsumexp_axes(spec: ReductionSpec, x):
    """logsumexp over ``spec.axes``: moved last and merged into one class
    axis (a view where the layout allows, else a copy), then one kernel.
    16-bit inputs are widened to float32 first."""
    x = widen(x) if half_dtype(x.dtype) else np.asarray(x, dtype=spec.dtype)
    if not spec.axes:  # nothing summed: each element is its own logsumexp
        return np.array(x).reshape(spec.kept_shape)
    ndim, n_axes = len(spec.shape), len(spec.axes)
    kept = tuple(n for a, n in enumerate(spec.shape) if a not in spec.axes)
    moved = np.moveaxis(x, spec.axes, range(ndim - n_axes, ndim))
    merged = moved.reshape(kept + (math.prod(spec.shape[a] for a in spec.axes),))
    problem = ClassProblem(merged.shape, len(kept), spec.dtype)
    return logsumexp(problem, merged).reshape(spec.kept_shape)


#: Elements per work item of the BCE kernel.
_BCE_SEGMENT = 1 << 14


def bce_with_logits(spec: BCESpec, logits, target, weight, pos_weight, grad):
    """Elementwise BCE, seen as rows of the last axis; gradient as in
    ``cross_entropy`` (``grad`` None, ``"new"`` or an array)."""
    shape, dtype = spec.shape, spec.dtype
    if half_dtype(logits.dtype):
        return _bce_half(spec, logits, target, weight, pos_weight, grad)
    # A 0-d input is one row of one element.
    problem = ClassProblem(shape or (1,), len(shape or (1,)) - 1, dtype)
    x = np.asarray(logits, dtype=dtype).reshape(problem.shape)
    x2, _ = rows_of(x, problem, ROWS)

    def operand(a):
        if a is None:
            return None
        a = np.broadcast_to(np.asarray(a, dtype=dtype), shape).reshape(problem.shape)
        return rows_of(a, problem, ROWS)[0]

    t2, w2, pw2 = operand(target), operand(weight), operand(pos_weight)
    n = x2.size
    scale = mean_scale(spec.reduction == "mean", n)
    out = None
    g2 = None
    if grad is not None:
        dest = None if isinstance(grad, str) else grad.reshape(problem.shape)
        out = _Output(dest, x2, problem, ROWS, (x, target, weight, pos_weight))
        g2 = out.rows
    elements = np.empty(x2.shape, dtype=dtype) if spec.reduction == "none" else None
    operands = [x2, t2, w2, pw2, g2, elements]
    # Elementwise: where every operand is one contiguous block (no weights
    # broadcast along the rows), the kernel sees one long row.
    flat = [None if a is None else _try_view(a, (1, n)) for a in operands]
    if all(f is not None or a is None for f, a in zip(flat, operands)):
        operands = flat
    x2, t2, w2, pw2, g2, elements_rows = operands
    losses = np.empty(K.bce_tasks(t2.shape[0], t2.shape[1], _BCE_SEGMENT)[2])
    total = K.bce(x2, t2, w2, pw2, scale, g2, elements_rows, out is not None and out.inplace,
                  losses, _BCE_SEGMENT)
    if spec.reduction == "none":
        loss = elements.reshape(shape)
    else:
        loss = finish_loss(total, n, spec.reduction, dtype)
    if out is None:
        return loss, None
    return loss, (grad if not isinstance(grad, str) else out.result().reshape(shape))


def _bce_half(spec: BCESpec, logits, target, weight, pos_weight, grad):
    """16-bit logits: as ``CrossEntropyPlan._half``."""
    x = widen(logits)
    if half_dtype(target.dtype):
        target = widen(target)
    if grad is None or (not isinstance(grad, str) and grad.dtype == np.float32
                        and grad is not logits):
        return bce_with_logits(spec, x, target, weight, pos_weight, grad)
    loss, g = bce_with_logits(spec, x, target, weight, pos_weight, x)
    if isinstance(grad, str):
        return loss, narrow(g, logits.dtype)
    narrow_into(grad, g)
    return loss, grad


# --------------------------------------------------------------------------
# The softmax Jacobian family (``_jacobian_kernels``)


def _empty_result(problem: ClassProblem, dest):
    """The result of a call with no rows or no classes: nothing to compute."""
    return np.empty(problem.shape, problem.dtype) if dest is None else dest


def _strided_classes(rows, form) -> bool:
    """Whether rows in this form are strided along the classes: the
    Jacobian kernels then take them a tile of neighbouring rows at a time."""
    return not (form == ROWS and rows.strides[1] == rows.itemsize)


def _half_family(compute, arrays, dest):
    """A call of the Jacobian family with 16-bit inputs, in one place for the
    four functions: ``arrays`` (the 16-bit ones widened to float32), the
    float32 call ``compute(*arrays, dest)`` (``dest`` None: a new array),
    and its result rounded to nearest even into a new array of the call's
    16-bit dtype or into a 16-bit ``dest`` (``out=``, or ``grad_output`` in
    place). A float32 ``dest`` takes the float32 result itself. The
    rounding writes only after the float32 call has checked the targets.
    Widening copies the inputs: simple, not the fastest (these functions
    are not the bandwidth-bound ones of training loops)."""
    storage = half_of(*arrays)
    wide = tuple(widen(a) if a is not None and half_dtype(a.dtype) else a for a in arrays)
    if dest is not None and dest.dtype == np.float32:
        return compute(*wide, dest)
    values = np.ascontiguousarray(compute(*wide, None))
    if dest is None:
        return narrow(values, storage)
    narrow_into(dest, values)
    return dest


def softmax_backward(problem: ClassProblem, grad_output, output, dest, log: bool):
    """Gradient through softmax (``log``: log_softmax) along the class axis.

    ``dest``: ``"new"``, ``out=``, or ``grad_output`` itself (in place).
    """
    from . import _jacobian_kernels as J

    dest = None if isinstance(dest, str) else dest
    if half_of(grad_output, output) is not None:
        return _half_family(lambda go, o, d: softmax_backward(problem, go, o, d, log),
                            (grad_output, output), dest)
    if problem.n_rows == 0 or problem.n_classes == 0:
        return _empty_result(problem, dest)
    go = np.asarray(grad_output, dtype=problem.dtype)
    o = np.asarray(output, dtype=problem.dtype)
    go_rows, form = rows_of(go, problem)
    o_rows, _ = rows_of(o, problem, form)
    # ``dest`` is ``grad_output``: rows read then written in place; any other
    # destination overlapping an input is written through a temporary
    result = _Output(dest, go_rows, problem, form, (go, o))
    J.softmax_backward(go_rows, o_rows, result.rows, result.inplace, problem.n_rows,
                       _inner(problem, form), log, _strided_classes(go_rows, form))
    return result.result()


def softmax_jacobian(problem: ClassProblem, x):
    """diag(p) - p p^T per row: an array of the batch shape + (C, C)."""
    from . import _jacobian_kernels as J

    if half_dtype(x.dtype):
        return _half_family(lambda xa, _: softmax_jacobian(problem, xa), (x,), None)
    C = problem.n_classes
    out = np.empty((problem.n_rows, C, C), problem.dtype)
    if problem.n_rows and C:
        x_rows, form = rows_of(np.asarray(x, dtype=problem.dtype), problem)
        J.softmax_jacobian(x_rows, out, _inner(problem, form))
    return out.reshape(problem.batch_shape + (C, C))


def cross_entropy_hvp(spec: CrossEntropySpec, logits, target, vector, weight, out):
    """Hessian of the cross-entropy (with respect to the logits) times
    ``vector``, into a new array or ``out``."""
    from . import _jacobian_kernels as J

    if half_of(logits, vector) is not None:
        return _half_family(lambda x, v, d: cross_entropy_hvp(spec, x, target, v, weight, d),
                            (logits, vector), out)
    problem = spec.problem
    dtype = problem.dtype
    x = np.asarray(logits, dtype=dtype)
    x_rows, form = rows_of(x, problem)
    v_rows = rows_of(np.asarray(vector, dtype=dtype), problem, form)[0]
    if spec.soft:
        y, q = None, rows_of(np.asarray(target, dtype=dtype), problem, form)[0]
    else:
        y, q = _hard_targets(np.asarray(target), spec), None
    opts = CEOptions(weight=_weight(weight, dtype), ignore_index=spec.ignore_index,
                     smoothing=spec.smoothing, mean=spec.reduction == "mean",
                     z_loss=spec.z_loss, logit_scale=spec.logit_scale, softcap=spec.softcap)
    result = _Output(out, x_rows, problem, form, (x, target, vector, weight))
    if result.inplace and np.may_share_memory(x, vector):
        # ``out`` is the logits, read before a row is written, but the row of
        # ``vector`` is read after: through a temporary
        result.rows = np.empty(_form_shape(problem, form), dtype)
        result.inplace, result.copy_back = False, True
    bad = J.cross_entropy_hvp(x_rows, y, q, v_rows, opts, result.rows, problem.n_rows,
                              _inner(problem, form), _strided_classes(x_rows, form))
    if bad >= 0:
        raise_bad_target(bad, y, problem.batch_shape, problem.n_classes, spec.ignore_index)
    return result.result()

# --------------------------------------------------------------------------
# Divergences on probabilities (``_divergence_kernels``): KL and BCE, laid
# out as ``bce_with_logits``.

_DIVERGENCE_KINDS = {"kl": 0, "kl_log_target": 1, "bce": 2}


def divergence(spec, input, target, weight, grad):
    """An elementwise divergence (``spec.kind``), gradient as in
    ``bce_with_logits``. BCE's inputs are checked to lie in [0, 1] first,
    before anything is written."""
    from . import _divergence_kernels as D
    if half_dtype(input.dtype):
        return _divergence_half(spec, input, target, weight, grad)
    shape, dtype = spec.shape, spec.dtype
    problem = ClassProblem(shape or (1,), len(shape or (1,)) - 1, dtype)
    x = np.asarray(input, dtype=dtype).reshape(problem.shape)
    if spec.kind == "bce" and x.size:
        flat = x.reshape(-1)
        counts = np.empty((flat.size + _BCE_SEGMENT - 1) // _BCE_SEGMENT, np.int64)
        bad = D.count_outside_unit(flat, counts, _BCE_SEGMENT)
        if bad:
            raise_outside_unit(int(bad))
    x2, _ = rows_of(x, problem, ROWS)

    def operand(a):
        if a is None:
            return None
        a = np.broadcast_to(np.asarray(a, dtype=dtype), shape).reshape(problem.shape)
        return rows_of(a, problem, ROWS)[0]

    t2, w2 = operand(target), operand(weight)
    n = x2.size
    if spec.reduction == "batchmean":
        scale = mean_scale(True, spec.n_rows)
    else:
        scale = mean_scale(spec.reduction == "mean", n)
    out = None
    g2 = None
    if grad is not None:
        dest = None if isinstance(grad, str) else grad.reshape(problem.shape)
        out = _Output(dest, x2, problem, ROWS, (x, target, weight))
        g2 = out.rows
    elements = np.empty(x2.shape, dtype=dtype) if spec.reduction == "none" else None
    operands = [x2, t2, w2, g2, elements]
    flat_ops = [None if a is None else _try_view(a, (1, n)) for a in operands]
    if all(f is not None or a is None for f, a in zip(flat_ops, operands)):
        operands = flat_ops
    x2, t2, w2, g2, elements_rows = operands
    losses = np.empty(K.bce_tasks(t2.shape[0], t2.shape[1], _BCE_SEGMENT)[2])
    total = D.divergence(x2, _DIVERGENCE_KINDS[spec.kind], t2, w2, scale, g2, elements_rows,
                         out is not None and out.inplace, losses, _BCE_SEGMENT)
    if spec.reduction == "none":
        loss = elements.reshape(shape)
    elif spec.reduction == "batchmean":
        loss = finish_loss(total, spec.n_rows, "mean", dtype)
    else:
        loss = finish_loss(total, n, spec.reduction, dtype)
    if out is None:
        return loss, None
    return loss, (grad if not isinstance(grad, str) else out.result().reshape(shape))


def _divergence_half(spec, input, target, weight, grad):
    """16-bit input: widened to float32 (16-bit targets and weights too),
    computed, the gradient rounded into a 16-bit result, as ``_bce_half``.
    BCE's check runs on the widened input, before anything is written."""
    x = widen(input)
    target, weight = (a if a is None or not half_dtype(a.dtype) else widen(a)
                      for a in (target, weight))
    if grad is None or (not isinstance(grad, str) and grad.dtype == np.float32):
        return divergence(spec, x, target, weight, grad)
    loss, g = divergence(spec, x, target, weight, x)
    if isinstance(grad, str):
        return loss, narrow(g, input.dtype)
    narrow_into(grad, g)
    return loss, grad


def divergence_small(input, target, kind, reduction, axis, inplace, with_grad):
    """``divergence`` of a small call (``divergences._small`` decided it is
    one): C-contiguous arrays of one float dtype and shape, a reduced loss;
    the serial kernel on them as one flat row, as ``divergence`` runs them."""
    from . import _divergence_kernels as D
    n = input.size
    x2, t2 = input.reshape(1, n), target.reshape(1, n)
    if kind == "bce":
        counts = np.empty(1, np.int64)
        bad = D.count_outside_unit.serial(input.reshape(n), counts, n)
        if bad:
            raise_outside_unit(int(bad))
    denominator = (input.shape[0] if input.ndim else 1) if reduction == "batchmean" else n
    scale = mean_scale(reduction != "sum", denominator)
    g2 = (x2 if inplace else np.empty_like(x2)) if with_grad else None
    losses = np.empty(K.bce_tasks(1, n, _BCE_SEGMENT)[2])
    total = D.divergence.serial(x2, _DIVERGENCE_KINDS[kind], t2, None, scale, g2, None,
                                inplace, losses, _BCE_SEGMENT)
    loss = finish_loss(total, denominator, "sum" if reduction == "sum" else "mean", input.dtype)
    if g2 is None:
        return loss, None
    return loss, (input if inplace else g2.reshape(input.shape))


# --------------------------------------------------------------------------
# Distillation losses (``_distill_kernels``)


def distillation(spec, student, teacher, indices, target, dest):
    """(loss, gradient or None). ``dest``: None (loss only), ``"new"``, or
    an array (``out=``, or the student's logits for ``inplace=True``).
    Targets and top-k indices are checked before anything is written."""
    from . import _distill_kernels as D

    if half_dtype(student.dtype) or half_dtype(teacher.dtype):
        return _distillation_half(spec, student, teacher, indices, target, dest)
    problem = spec.problem
    dtype = problem.dtype
    x = np.asarray(student, dtype=dtype)
    x_rows, form = rows_of(x, problem)
    inner = _inner(problem, form)
    n_rows = problem.n_rows
    if spec.topk:
        k_problem = ClassProblem(problem.shape[:problem.axis] + (spec.topk,)
                                 + problem.shape[problem.axis + 1:], problem.axis, dtype)
        t_rows = rows_of(np.asarray(teacher, dtype=dtype), k_problem, form)[0]
        i_rows = rows_of(np.asarray(indices, dtype=np.int64), k_problem, form)[0]
        bad, flag = D.bad_topk(i_rows, n_rows, inner, problem.n_classes,
                               np.empty(n_rows, np.int8))
        if bad >= 0:
            position = tuple(int(i) for i in np.unravel_index(bad, problem.batch_shape))
            problem_text = ("a class out of range (valid: 0 to "
                            f"{problem.n_classes - 1})" if flag == 1 else "a class twice")
            raise ValueError(f"top-k teacher indices hold {problem_text} in the row at "
                             f"position {position}")
    else:
        t_rows = rows_of(np.asarray(teacher, dtype=dtype), problem, form)[0]
        i_rows = np.empty((0,) * x_rows.ndim, np.int64)
    if spec.has_target:
        y = _hard_targets(np.asarray(target), spec)
        bad, kept = scan_hard_targets(y, problem.n_classes, spec.ignore_index, None)
        if bad >= 0:
            raise_bad_target(bad, y, problem.batch_shape, problem.n_classes, spec.ignore_index)
    else:
        y, kept = np.empty(0, np.int64), float(n_rows)
    out = None
    g = x_rows
    if dest is not None:
        out = _Output(None if isinstance(dest, str) else dest, x_rows, problem, form,
                      (x, teacher, indices, target))
        g = out.rows
    scale = mean_scale(spec.reduction == "batchmean", kept)
    losses = np.empty(n_rows)
    total = D.distill(x_rows, t_rows, i_rows, g, y, n_rows, inner, spec.kind, spec.beta,
                      spec.temperature, spec.alpha, spec.ignore_index, scale, out is not None,
                      spec.topk > 0, losses)
    if spec.reduction == "none":
        loss = losses.astype(dtype).reshape(problem.batch_shape)
    else:
        loss = finish_loss(total, kept, "mean" if spec.reduction == "batchmean" else "sum",
                           dtype)
    return loss, (None if out is None else out.result())


def _distillation_half(spec, student, teacher, indices, target, dest):
    """16-bit student or teacher logits: widened, the float32 (float64 with a
    float64 teacher) call, a 16-bit destination rounded from its gradient."""
    x = widen(student) if half_dtype(student.dtype) else student
    t = widen(teacher) if half_dtype(teacher.dtype) else teacher
    if dest is None or isinstance(dest, str) and not (
            half_dtype(student.dtype) and spec.problem.dtype == np.float32):
        return distillation(spec, x, t, indices, target, dest)
    if not isinstance(dest, str) and not half_dtype(dest.dtype):  # float32 or float64 out=
        return distillation(spec, x, t, indices, target, dest)
    loss, g = distillation(spec, x, t, indices, target, x if x is not student else "new")
    if isinstance(dest, str):
        return loss, narrow(g, student.dtype)
    narrow_into(dest, g)
    return loss, dest
