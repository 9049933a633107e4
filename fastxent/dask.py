"""fastxent's losses over Dask arrays, on one machine or a ``dask.distributed`` cluster.

Logits are a 2-D Dask array ``(N, C)``, chunked along the rows, the classes
or both. Each function builds a lazy graph and returns Dask arrays (a 0-d
array for ``reduction="mean"`` or ``"sum"``); nothing runs until they are
computed.

* One chunk along the classes (rows chunked): each block is one call of the
  NumPy function (:func:`fastxent.cross_entropy` ...), its fused kernel.
* Several chunks along the classes (a vocabulary-parallel layout): each
  block yields per-row partials (max, sum of exp(x - max), the target's
  logit, the smoothing or soft-target sums), merged for each row in class
  order into its log-sum-exp and loss; the gradient blocks are then written
  from the merged row coefficients, one task per block.

On a ``dask.distributed`` worker each task sets Numba's threads to the
worker's thread count (the nanny limits OpenMP and MKL, not Numba), and
tasks running at once on a worker take the serial kernels (``_cpu``'s
lock), so they are safe and give the same bits.

Requires ``dask`` (``pip install 'fastxent[dask]'``).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Tuple

try:
    import dask
    import dask.array as da
except ImportError as error:  # pragma: no cover - exercised in a subprocess test
    raise ImportError("fastxent.dask needs dask: pip install 'fastxent[dask]' "
                      "(dask[array] and distributed)") from error

import operator

import numba
import numpy as np
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from . import _validate
from . import losses as _losses
from ._host import raise_bad_target
from ._spec import CEOptions

Reduction = Literal["none", "mean", "sum"]

__all__ = ["cross_entropy", "cross_entropy_with_grad", "logsumexp", "log_softmax", "softmax",
           "numba_threads"]


# --------------------------------------------------------------------------
# Threads on a worker


def numba_threads() -> int:
    """Set Numba's threads for the calling task and return their number.

    On a ``dask.distributed`` worker: the worker's thread count (at most
    Numba's pool size), so that a worker of one thread runs its kernels on
    one core. Elsewhere (the synchronous or threaded scheduler) Numba's
    setting is left alone. ``numba.set_num_threads`` holds for the calling
    thread only, hence a call at the start of every task.
    """
    try:
        from distributed import get_worker
        worker = get_worker()
    except (ImportError, ValueError):
        return numba.get_num_threads()
    wanted = max(1, min(int(worker.state.nthreads), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
    return wanted


# --------------------------------------------------------------------------
# Checks at graph construction


def _as_logits(logits, name="logits"):
    x = logits if isinstance(logits, da.Array) else da.asarray(logits)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D Dask array (N, C) in fastxent.dask, "
                         f"got shape {x.shape}")
    if any(np.isnan(n) for n in x.shape):
        raise ValueError(f"{name} has unknown chunk sizes: call .compute_chunk_sizes() first")
    if x.dtype.kind in "iub":
        x = x.astype(np.float64)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    return x


def _as_target(target, x):
    """A Dask array as given; anything else as a NumPy array (class indices
    held here are checked at graph construction)."""
    return target if isinstance(target, da.Array) else np.asarray(target)


def _check(x, t, weight, ignore_index, reduction, label_smoothing, z_loss, logit_scale,
           softcap, return_stats):
    """The NumPy function's checks on arrays of the given shapes and dtypes
    (zero-stride stand-ins: no memory, no kernel), so that the errors are
    its messages, raised now."""
    stand_in_x = np.broadcast_to(np.zeros((), x.dtype), x.shape)
    stand_in_t = np.broadcast_to(np.zeros((), t.dtype), t.shape)
    _validate.cross_entropy_call(stand_in_x, stand_in_t, weight, ignore_index, reduction,
                                 label_smoothing, z_loss, logit_scale, softcap, return_stats,
                                 -1, "cpu", None, False, False)


def _weight_array(weight, dtype):
    if weight is None:
        return None
    if isinstance(weight, da.Array):
        weight = weight.compute()
    return np.ascontiguousarray(np.asarray(weight), dtype=dtype)


# --------------------------------------------------------------------------
# Tasks


def _bad_row(t, n_classes, ignore_index):
    bad = np.flatnonzero((t != ignore_index) & ((t < 0) | (t >= n_classes)))
    return int(bad[0]) if bad.size else -1


def _raise_bad(t, bad, offset, n_rows, n_classes, ignore_index):
    raise_bad_target(offset + bad, {offset + bad: t[bad]}, (n_rows,), n_classes, ignore_index)


def _denominator(target_blocks, weight, ignore_index, n_classes):
    """The mean's denominator of class indices: the summed weights of the
    valid targets not ignored (out-of-range targets are reported by the
    blocks), float64, in block order."""
    numba_threads()
    total = 0.0
    for t in target_blocks:
        t = np.asarray(t)
        valid = (t != ignore_index) & (t >= 0) & (t < n_classes)
        if weight is None:
            total += float(np.count_nonzero(valid))
        else:
            total += float(np.sum(weight[t[valid]], dtype=np.float64))
    return total


def _row_block(x, t, weight, options, reduction, with_grad, denominator, post_scale, offset,
               n_rows):
    """One block of whole rows through the NumPy function. For a mean, the
    block's sum with the weights divided by the global denominator (or,
    ``post_scale``, the sum divided afterwards), so that the blocks' sums
    add up to the mean."""
    numba_threads()
    kwargs = dict(options)
    block_reduction = reduction
    if reduction == "mean":
        block_reduction = "sum"
        if denominator != 0.0 and not post_scale:
            base = np.ones(x.shape[1]) if weight is None else weight.astype(np.float64)
            weight = base * (1.0 / denominator)
    try:
        if with_grad:
            loss, grad = _losses.cross_entropy_with_grad(x, t, weight=weight,
                                                         reduction=block_reduction, **kwargs)
        else:
            loss, grad = _losses.cross_entropy(x, t, weight=weight, reduction=block_reduction,
                                               **kwargs), None
    except IndexError:
        bad = _bad_row(np.asarray(t), x.shape[1], options["ignore_index"])
        if bad < 0:
            raise
        _raise_bad(t, bad, offset, n_rows, x.shape[1], options["ignore_index"])
    if reduction == "mean" and post_scale and denominator != 0.0:
        loss = loss / denominator
        if grad is not None:
            grad *= grad.dtype.type(1.0 / denominator)
    if reduction == "none":
        return loss, grad
    return np.float64(loss), grad


def _total(parts, denominator, reduction, dtype):
    """The sum of the blocks' float64 sums, in block order, as the logits' dtype;
    a mean with nothing to average is NaN, as the NumPy function."""
    numba_threads()
    total = float(np.sum(np.asarray(parts, dtype=np.float64)))
    if reduction == "mean" and denominator == 0.0:
        total = float("nan")
    return np.asarray(total, dtype=dtype)


def _partials(x, t, q, w, c0, keep, uniform, smoothing, soft):
    from . import _dask_kernels as K
    numba_threads()
    x = _row_contiguous(x)
    out = np.empty((x.shape[0], K.PARTS))
    if soft:
        K.partials_soft(x, _row_contiguous(np.asarray(q, dtype=x.dtype)), w, keep, uniform, out)
    else:
        K.partials_hard(x, np.ascontiguousarray(t, dtype=np.int64), w, c0, smoothing, out)
    return out


def _merge(parts, t, weight, ignore_index, smoothing, z_loss, n_classes, soft, offset, n_rows):
    """A row block's losses (float64), gradient coefficients and denominator."""
    from . import _dask_kernels as K
    numba_threads()
    stacked = np.ascontiguousarray(np.stack(parts, axis=1))
    n = stacked.shape[0]
    losses, coefs = np.empty(n), np.empty((n, 4))
    opts = CEOptions(None, ignore_index, float(smoothing), False, float(z_loss))
    if soft:
        K.merge_soft(stacked, opts, losses, coefs)
        return losses, coefs, float(n)
    y = np.ascontiguousarray(t, dtype=np.int64)
    bad, denominator = K.merge_hard(stacked, y, weight, ignore_index, opts, n_classes, losses,
                                    coefs)
    if bad >= 0:
        _raise_bad(y, bad, offset, n_rows, n_classes, ignore_index)
    return losses, coefs, denominator


def _grad_block(x, merged, t, reduction, denominator, q, w, c0, keep, uniform):
    """A gradient block from its row block's ``_merge`` (losses, coefficients, denominator)."""
    from . import _dask_kernels as K
    numba_threads()
    coefs = merged[1]
    scale = 1.0 / denominator if reduction == "mean" and denominator != 0.0 else 1.0
    x = _row_contiguous(x)
    # in the logits' type, as the fused kernel: float32 blocks run float32 vectors
    # (m is a logit; k1, k2, kt round to 6e-8 relative)
    element = x.dtype.type
    coefs, scale, keep, uniform = coefs.astype(x.dtype), element(scale), element(keep), \
        element(uniform)
    g = np.empty(x.shape, x.dtype)
    if q is not None:  # a block of probabilities
        K.gradient_soft(x, coefs, scale, _row_contiguous(np.asarray(q, dtype=x.dtype)), w,
                        keep, uniform, not x.flags.c_contiguous, g)
    else:
        K.gradient_hard(x, coefs, scale, np.ascontiguousarray(t, dtype=np.int64), w, c0,
                        not x.flags.c_contiguous, g)
    return g


def _merged_losses(merged, dtype):
    """A row block's losses (``reduction="none"``) from its ``_merge``."""
    return merged[0].astype(dtype)


def _merged_total(merged, denominator, reduction, dtype):
    """The mean or sum over all row blocks' ``_merge`` results, in block order."""
    total = _total([np.sum(m[0]) for m in merged], 0.0, "sum", np.float64)
    if reduction == "mean":
        return _mean(total, denominator, dtype)
    return np.asarray(total, dtype)


def _row_contiguous(a):
    a = np.asarray(a)
    return a if a.strides[1] == a.itemsize or a.shape[1] <= 1 else np.ascontiguousarray(a)


def _lse_merge(parts):
    from . import _dask_kernels as K
    numba_threads()
    stacked = np.ascontiguousarray(np.stack(parts, axis=1))
    n = stacked.shape[0]
    lse, m, log_s = np.empty(n), np.empty(n), np.empty(n)
    K.merge_lse(stacked, lse, m, log_s)
    return lse, m, log_s


def _softmax_task(x, merged, log):
    from . import _dask_kernels as K
    numba_threads()
    x = _row_contiguous(x)
    out = np.empty(x.shape, x.dtype)
    K.softmax_block(x, merged[1].astype(x.dtype), merged[2].astype(x.dtype), log,
                    not x.flags.c_contiguous, out)
    return out


# --------------------------------------------------------------------------
# Graph construction


def _delayed_blocks(a):
    """The blocks of a 2-D (or 1-D) Dask array as a NumPy array of Delayed."""
    return a.to_delayed(optimize_graph=False)


def _offsets(chunks):
    return np.concatenate([[0], np.cumsum(chunks)]).astype(int)


class _Blocks:
    """A Dask array built task by task: each block's key is the array's own
    (name, i[, k]), computed by its task directly. ``from_delayed`` and
    ``block`` would add an alias task per block, and on a small cluster each
    task costs a scheduler round trip (about 2 ms here) beside its work."""

    def __init__(self, prefix, token):
        self.name = f"{prefix}-{dask.base.tokenize(*token)}"
        self.layer, self.deps = {}, []

    def _arg(self, value):
        if isinstance(value, Delayed):
            self.deps.append(value)
            return value.key
        if isinstance(value, list):
            return [self._arg(v) for v in value]
        return value

    def put(self, index, fn, *args):
        self.layer[(self.name,) + tuple(index)] = (fn,) + tuple(self._arg(a) for a in args)

    def array(self, chunks, dtype):
        graph = HighLevelGraph.from_collections(self.name, self.layer, dependencies=self.deps)
        return da.Array(graph, self.name, chunks, dtype=dtype)


class _Graph:
    """Tasks written key by key, for the graphs whose ``dask.delayed`` calls
    would cost a noticeable share of their run: ``put`` a task (a function
    and its arguments, keys of other tasks among them, in lists too) under a
    key of ``key``; ``array`` makes a Dask array of the tasks of one prefix,
    with every task in its graph."""

    def __init__(self, token, collections):
        self.token, self.layer, self.collections = token, {}, collections

    def key(self, prefix, *index):
        return (f"{prefix}-{self.token}",) + index

    def put(self, key, fn, *args):
        self.layer[key] = (fn,) + args
        return key

    def array(self, prefix, chunks, dtype):
        name = f"{prefix}-{self.token}"
        graph = HighLevelGraph.from_collections(name, dict(self.layer),
                                                dependencies=self.collections)
        return da.Array(graph, name, chunks, dtype=dtype)


def _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                   logit_scale, softcap, with_grad):
    x = _as_logits(logits)
    t = _as_target(target, x)
    w = _weight_array(weight, x.dtype)
    _check(x, t, w, ignore_index, reduction, label_smoothing, z_loss, logit_scale, softcap,
           False)
    if t.dtype.kind != "f" and not isinstance(t, da.Array):
        # class indices held here: checked now (each task then gets its slice,
        # a few KB in the graph, instead of waiting on a chain of target tasks)
        bad = _bad_row(t, x.shape[1], ignore_index)
        if bad >= 0:
            _raise_bad(t, bad, 0, x.shape[0], x.shape[1], ignore_index)
    if x.numblocks[1] == 1:
        return _row_sharded(x, t, w, ignore_index, reduction, label_smoothing, z_loss,
                            logit_scale, softcap, with_grad)
    if logit_scale != 1.0 or softcap is not None:
        raise NotImplementedError("logit_scale and softcap are not supported with logits "
                                  "chunked along the classes in fastxent.dask: rechunk to "
                                  "one chunk along the classes (x.rechunk({1: -1}))")
    return _class_sharded(x, t, w, ignore_index, reduction, label_smoothing, z_loss,
                          with_grad)


def _row_sharded(x, t, w, ignore_index, reduction, label_smoothing, z_loss, logit_scale,
                 softcap, with_grad):
    """Logits in whole rows (one chunk along the classes): each row block
    through the NumPy function (``_row_block``)."""
    soft = t.dtype.kind == "f"
    n_rows, n_classes = x.shape
    delayed = dask.delayed
    row_offsets = _offsets(x.chunks[0])
    n_row_blocks = x.numblocks[0]
    xd = _delayed_blocks(x)
    if soft:
        target_rows = list(_delayed_blocks(da.asarray(t).astype(x.dtype).rechunk(x.chunks))[:, 0])
    elif isinstance(t, da.Array):
        target_rows = list(_delayed_blocks(t.rechunk((x.chunks[0],))))
    else:
        target_rows = [t[row_offsets[i]:row_offsets[i + 1]] for i in range(n_row_blocks)]

    # the mean's denominator comes from the targets alone, so no block waits
    # on the others' logits: known now (probabilities, or indices held here)
    # or one small task on the target blocks
    if reduction != "mean":
        denominator = 0.0
    elif soft:
        denominator = float(n_rows)
    elif isinstance(t, da.Array):
        denominator = delayed(_denominator, pure=True)(target_rows, w, ignore_index, n_classes)
    else:
        denominator = _denominator([t], w, ignore_index, n_classes)

    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing,
                   z_loss=z_loss, logit_scale=logit_scale, softcap=softcap)
    post_scale = soft and z_loss > 0.0
    blocks = [delayed(_row_block, nout=2, pure=True)(
        xd[i, 0], target_rows[i], w, options, reduction, with_grad, denominator, post_scale,
        int(row_offsets[i]), n_rows)
        for i in range(n_row_blocks)]
    token = [b.key for b in blocks]
    if reduction == "none":
        losses = _Blocks("fastxent-losses", token)
        for i, b in enumerate(blocks):
            losses.put((i,), operator.getitem, b, 0)
        loss = losses.array((x.chunks[0],), x.dtype)
    else:
        loss = da.from_delayed(delayed(_total, pure=True)([b[0] for b in blocks],
                                                          denominator, reduction, x.dtype),
                               (), x.dtype)
    if not with_grad:
        return loss
    grad = _Blocks("fastxent-grad", token)
    for i, b in enumerate(blocks):
        grad.put((i, 0), operator.getitem, b, 1)
    return loss, grad.array(x.chunks, x.dtype)


def _class_sharded(x, t, w, ignore_index, reduction, label_smoothing, z_loss, with_grad):
    """Logits chunked along the classes: per block partials, one merge per row
    block (its losses and gradient coefficients), the loss from the merges and
    each gradient block from its row's merge.

    The graph is written key by key (``_Graph``): ``dask.delayed`` calls
    took 16 ms to build this graph at 8 x 4 blocks, a twentieth of its run."""
    soft = t.dtype.kind == "f"
    n_rows, n_classes = x.shape
    n_row_blocks, n_class_blocks = x.numblocks
    row_offsets, class_offsets = _offsets(x.chunks[0]), _offsets(x.chunks[1])
    smoothing = float(label_smoothing)
    keep, uniform = 1.0 - smoothing, smoothing / n_classes
    w_blocks = [None if w is None else w[class_offsets[k]:class_offsets[k + 1]]
                for k in range(n_class_blocks)]
    collections = [x]
    q = rows_t = None
    if soft:
        q = da.asarray(t).astype(x.dtype).rechunk(x.chunks)
        collections.append(q)
    elif isinstance(t, da.Array):
        rows_t = t.rechunk((x.chunks[0],))
        collections.append(rows_t)
    token = dask.base.tokenize(x.name, q.name if soft else None,
                               rows_t.name if rows_t is not None else t, w, ignore_index,
                               reduction, smoothing, z_loss, with_grad)
    g = _Graph(token, collections)

    def target_row(i):
        if soft:
            return None
        if rows_t is not None:
            return (rows_t.name, i)
        # class indices held here (checked by the caller): each task gets its slice
        return t[row_offsets[i]:row_offsets[i + 1]]

    # the mean's denominator comes from the targets alone, so no block waits
    # on the others' logits: known now (probabilities, or indices held here)
    # or one small task on the target blocks
    if reduction != "mean":
        denominator = 0.0
    elif soft:
        denominator = float(n_rows)
    elif rows_t is not None:
        denominator = g.put(g.key("fastxent-denominator"), _denominator,
                            [target_row(i) for i in range(n_row_blocks)], w, ignore_index,
                            n_classes)
    else:
        denominator = _denominator([t], w, ignore_index, n_classes)

    # one merge task per row block, for the loss and that row's gradient blocks:
    # on a small cluster each task costs a scheduler round trip and each
    # dependency a transfer, beside the work
    merged = []
    for i in range(n_row_blocks):
        parts = [g.put(g.key("fastxent-partials", i, k), _partials, (x.name, i, k),
                       target_row(i), (q.name, i, k) if soft else None, w_blocks[k],
                       int(class_offsets[k]), keep, uniform, smoothing > 0.0, soft)
                 for k in range(n_class_blocks)]
        merged.append(g.put(g.key("fastxent-merge", i), _merge, parts, target_row(i), w,
                            ignore_index, smoothing, z_loss, n_classes, soft,
                            int(row_offsets[i]), n_rows))
    if reduction == "none":
        for i in range(n_row_blocks):
            g.put(g.key("fastxent-losses", i), _merged_losses, merged[i], x.dtype)
        loss = g.array("fastxent-losses", (x.chunks[0],), x.dtype)
    else:
        g.put(g.key("fastxent-loss"), _merged_total, merged, denominator, reduction, x.dtype)
        loss = g.array("fastxent-loss", (), x.dtype)
    if not with_grad:
        return loss
    for i in range(n_row_blocks):
        for k in range(n_class_blocks):
            g.put(g.key("fastxent-grad", i, k), _grad_block, (x.name, i, k), merged[i],
                  target_row(i), reduction, denominator, (q.name, i, k) if soft else None,
                  w_blocks[k], int(class_offsets[k]), keep, uniform)
    return loss, g.array("fastxent-grad", x.chunks, x.dtype)


def _mean(total, denominator, dtype):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(np.float64(total) / np.float64(denominator), dtype=dtype)


# --------------------------------------------------------------------------
# Public functions


def cross_entropy(logits: Any, target: Any, *, weight: Optional[Any] = None,
                  ignore_index: int = -100, reduction: Reduction = "mean",
                  label_smoothing: float = 0.0, z_loss: float = 0.0, logit_scale: float = 1.0,
                  softcap: Optional[float] = None) -> Any:
    """Cross-entropy of a Dask array of logits, as :func:`fastxent.cross_entropy`.

    Parameters
    ----------
    logits : dask.array.Array, shape (N, C)
        float32 or float64, chunked along the rows, the classes or both.
    target : dask.array.Array or array_like
        Class indices of shape (N,), or class probabilities of shape (N, C)
        (rechunked to the logits' chunks).
    weight : array_like of shape (C,), optional
        A rescaling weight per class (a NumPy array: it travels with each task).
    ignore_index, reduction, label_smoothing, z_loss
        As :func:`fastxent.cross_entropy`.
    logit_scale, softcap
        As :func:`fastxent.cross_entropy`; logits chunked along the classes
        refuse them.

    Returns
    -------
    loss : dask.array.Array
        0-d for ``"mean"`` and ``"sum"``, shape (N,) for ``"none"``; lazy.

    Raises
    ------
    The NumPy function's errors: those its checks find from shapes, dtypes
    and options now; an out-of-range class index now when ``target`` is a
    NumPy array, when computed when it is a Dask array.
    """
    return _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing,
                          z_loss, logit_scale, softcap, with_grad=False)


def cross_entropy_with_grad(logits: Any, target: Any, *, weight: Optional[Any] = None,
                            ignore_index: int = -100, reduction: Reduction = "mean",
                            label_smoothing: float = 0.0, z_loss: float = 0.0,
                            logit_scale: float = 1.0,
                            softcap: Optional[float] = None) -> Tuple[Any, Any]:
    """Cross-entropy and its gradient, as :func:`fastxent.cross_entropy_with_grad`.

    Arguments as :func:`cross_entropy`. Returns ``(loss, grad)``, Dask arrays;
    ``grad`` has the logits' shape and chunks. Compute them together
    (``dask.compute(loss, grad)``) to share the work.
    """
    return _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing,
                          z_loss, logit_scale, softcap, with_grad=True)


def _lse_parts(x):
    """Per row block: the Delayed (lse, m, log s) merged over the class blocks."""
    xd = _delayed_blocks(x)
    merged = []
    for i in range(x.numblocks[0]):
        parts = [dask.delayed(_partials, pure=True)(xd[i, k], np.zeros(x.chunks[0][i], np.int64),
                                                     None, None, 0, 1.0, 0.0, False, False)
                 for k in range(x.numblocks[1])]
        merged.append(dask.delayed(_lse_merge, nout=3, pure=True)(parts))
    return merged


def _numpy_rows(fn, x, drop):
    def run(block):
        numba_threads()
        return fn(block, axis=-1)
    if drop:
        return x.map_blocks(run, drop_axis=1, dtype=x.dtype)
    return x.map_blocks(run, dtype=x.dtype)


def logsumexp(x: Any) -> Any:
    """log(sum(exp(x))) of each row of a 2-D Dask array, as :func:`fastxent.logsumexp`
    along the last axis. Returns a Dask array of shape (N,)."""
    x = _as_logits(x, "x")
    if x.numblocks[1] == 1:
        return _numpy_rows(_losses.logsumexp, x, drop=True)
    return da.concatenate([da.from_delayed(m[0], (x.chunks[0][i],), np.float64)
                           for i, m in enumerate(_lse_parts(x))]).astype(x.dtype)


def _softmax(x, log):
    x = _as_logits(x, "x")
    fn = _losses.log_softmax if log else _losses.softmax
    if x.numblocks[1] == 1:
        return _numpy_rows(fn, x, drop=False)
    xd = _delayed_blocks(x)
    parts = _lse_parts(x)
    out = _Blocks("fastxent-log-softmax" if log else "fastxent-softmax", [m.key for m in parts])
    for i, merged in enumerate(parts):
        for k in range(x.numblocks[1]):
            out.put((i, k), _softmax_task, xd[i, k], merged, log)
    return out.array(x.chunks, x.dtype)


def log_softmax(x: Any) -> Any:
    """log_softmax of each row of a 2-D Dask array, as :func:`fastxent.log_softmax`
    along the last axis; a Dask array of ``x``'s shape and chunks."""
    return _softmax(x, log=True)


def softmax(x: Any) -> Any:
    """softmax of each row of a 2-D Dask array, as :func:`fastxent.softmax`
    along the last axis; a Dask array of ``x``'s shape and chunks."""
    return _softmax(x, log=False)
