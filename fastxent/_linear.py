"""The chunk loop of the fused linear + cross-entropy, for both backends.

Rows of the input are taken ``chunk`` at a time. A chunk's logits are one
matrix product into a buffer reused by every chunk; the backend's fused
cross-entropy kernel turns them into their gradient in place (the gradient
of the chunk's *sum* of losses); two more products then give the chunk's
rows of ``grad_input`` and add its share to ``grad_linear_weight``. A mean
is one scale of the three gradients at the end, by the denominator over all
rows (known before the loop). No array of N x C is ever made.

The products are the caller's library's (``ops``); the loss is the
backend's ``cross_entropy`` (``ce``). Both are passed in, so this module
imports neither backend. Every sum here runs in a fixed order (chunks in
row order, the kernel's own fixed-order sums, BLAS products that do not
split their inner dimension across threads), so results do not depend on
the number of Numba threads.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

from ._spec import ClassProblem, LinearCrossEntropySpec

#: ``chunk_size=None`` makes chunks of at least this many bytes of logits...
CHUNK_BYTES = 16 << 20
#: ... and of at least this share of all the N x C logits: BLAS products of
#: a few hundred rows run near their full speed (at H = 1024, C = 32000 on 2
#: threads, 128 rows make the three products 1.3x slower than whole-matrix
#: ones, 320 rows 1.1x), and 4% keeps the memory above the inputs and the
#: gradients under 5% of the logits with the scratch blocks below.
CHUNK_SHARE = 0.04
#: Chunk rows from ``CHUNK_SHARE`` are rounded down to a multiple of this.
CHUNK_ROUND = 32
#: ``chunk_size=None`` takes at least this many rows (when there are as many):
#: the products' inner dimension for ``grad_linear_weight``, below which BLAS
#: loses speed and each chunk's update of the C x H gradient costs more.
MIN_CHUNK_ROWS = 64
#: Bytes of the chunk's gradient (m rows x a block of classes) per
#: accumulating product (``MatrixOps.matmul_add``): OpenBLAS packs up to
#: about 14000 columns of that operand per thread (17 MiB at 320 rows, 2
#: threads: 3% of the 8192 x 32000 logits), so the classes go in blocks.
ACCUMULATE_PANEL_BYTES = 2 << 20
#: Bytes of the scratch block a chunk's ``grad_linear_weight`` share is made
#: in before it is added, where the library has no accumulating product
#: (``MatrixOps.matmul_add``).
ACCUMULATE_BYTES = 4 << 20
def default_chunk_rows(n_rows: int, n_classes: int, hidden: int, itemsize: int) -> int:
    """Rows per chunk when ``chunk_size`` is None.

    The larger of: the rows that fill ``CHUNK_BYTES`` (16 MiB: 131 rows of
    32000 float32 classes), a power of two; and ``CHUNK_SHARE`` (4%) of the
    rows, a multiple of ``CHUNK_ROUND`` (320 of 8192). At least
    ``MIN_CHUNK_ROWS``; and when the hidden size is large against the
    classes (H * 4 > C), at least H / 4 rows, so that each chunk's rank-m
    update of the C x H ``grad_linear_weight`` does enough work per element
    it rewrites. Never more than the rows there are.
    """
    rows = max(1, CHUNK_BYTES // max(1, n_classes * itemsize))
    rows = 1 << (rows.bit_length() - 1)
    rows = max(rows, int(CHUNK_SHARE * n_rows) // CHUNK_ROUND * CHUNK_ROUND, MIN_CHUNK_ROWS)
    if hidden * 4 > n_classes:
        rows = max(rows, hidden // 4)
    return max(1, min(rows, n_rows))


class MatrixOps(NamedTuple):
    """The array library's pieces the loop needs.

    ``matmul(a, b, out)`` writes ``a @ b`` into ``out``; ``empty(shape,
    dtype)`` and ``zeros(shape, dtype)`` make arrays; ``add_rows(z, bias)``
    adds a bias row to every row of ``z`` in place; ``col_sum(z, acc)`` adds
    the column sums of ``z`` to ``acc``; ``add_into(a, b)`` adds ``b`` to
    ``a`` in place; ``scale(a, s)`` multiplies in place; ``copy(dst, src)``
    copies ``src`` (any strides) into ``dst``; ``matmul_add(a, b, c)``, where
    the library has it, adds ``a @ b`` to ``c`` in one product and returns
    whether it could (else the loop makes the product in a scratch block
    and adds it); ``cast(a, dtype)``, needed only for 16-bit storage on the
    GPU, is a new array of ``a`` in ``dtype`` (rounded to nearest even).
    """

    matmul: Callable
    empty: Callable
    zeros: Callable
    add_rows: Callable
    col_sum: Callable
    add_into: Callable
    scale: Callable
    copy: Callable
    matmul_add: Optional[Callable] = None
    cast: Optional[Callable] = None


def _accumulate(ops: MatrixOps, z, xc, gw, itemsize: int) -> bool:
    """``gw += z.T @ xc`` by ``ops.matmul_add`` in blocks of classes of
    ``ACCUMULATE_PANEL_BYTES``; False (nothing added) where it cannot."""
    if ops.matmul_add is None:
        return False
    m, c = z.shape
    step = max(1, min(c, ACCUMULATE_PANEL_BYTES // max(1, m * itemsize)))
    for c0 in range(0, c, step):
        c1 = min(c, c0 + step)
        if not ops.matmul_add(z[:, c0:c1].T, xc, gw[c0:c1]):
            if c0 == 0:
                return False
            # the blocks share dtypes and strides: a later one cannot differ
            raise RuntimeError("internal error: an accumulating product refused a block")
    return True


def run(spec: LinearCrossEntropySpec, x, w, b, target, weight, denominator: float,
        with_grad: bool, ops: MatrixOps, ce: Callable, finish: Callable,
        widen_rows: Callable = None, storage=None):
    """The loss and, with ``with_grad``, ``(grad_x, grad_w, grad_b)``.

    ``x`` is (N, H), ``w`` (C, H), ``b`` (C,) or None, ``target`` (N,) class
    indices or (N, C) probabilities, all in the spec's dtype where float,
    except that ``x`` may be stored in another dtype when ``widen_rows``
    (a chunk of its rows -> the same rows in the spec's dtype) is given.
    ``storage`` (a 16-bit dtype, GPU) is the dtype of ``x``, ``w`` and ``b``
    when the library multiplies them as they are: the logits chunk, whose
    gradient the kernel writes in place in 16 bits, and ``grad_x`` are
    then 16-bit; ``grad_w`` and ``grad_b`` are summed in the spec's dtype
    and cast to ``storage`` at the end.
    ``ce(chunk_spec, z, t, weight, grad)`` is the backend's cross-entropy;
    ``finish(total, per_row_losses)`` makes the returned loss;
    ``denominator`` is the mean's over all rows (the sum of the kept
    targets' class weights, or N for probabilities).
    """
    ce_spec = spec.ce
    dtype = ce_spec.problem.dtype
    n, h = spec.n_rows, spec.hidden
    c = ce_spec.problem.n_classes
    chunk = spec.chunk_rows
    # The kernel sums each chunk; "none" keeps the per-row losses.
    chunk_reduction = "none" if ce_spec.reduction == "none" else "sum"
    losses = ops.empty((n,), dtype) if chunk_reduction == "none" else None
    io = dtype if storage is None else storage
    buf = ops.empty((min(chunk, n), c), io)
    gx = gw = gb = tmp = None
    if with_grad:
        gx = ops.empty((n, h), io)
        gw = ops.zeros((c, h), dtype)
        gb = None if b is None else ops.zeros((c,), dtype)
        block = max(1, min(c, ACCUMULATE_BYTES // max(1, h * dtype.itemsize)))
        # grad_input's rows as their transpose, H x m (see below)
        gx_t = ops.empty((h * min(chunk, n),), io)
    w_t = w.T
    total = 0.0
    specs = {}
    grad = buf if with_grad else None
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        m = stop - start
        z = buf[:m]
        xc = x[start:stop]
        if widen_rows is not None:
            xc = widen_rows(xc)
        ops.matmul(xc, w_t, z)
        if b is not None:
            ops.add_rows(z, b)
        chunk_spec = specs.get(m)
        if chunk_spec is None:
            chunk_spec = specs[m] = dataclasses.replace(
                ce_spec, problem=ClassProblem((m, c), 1, dtype), reduction=chunk_reduction)
        loss, _ = ce(chunk_spec, z, target[start:stop], weight, grad if grad is None else z)
        if losses is None:
            total += float(loss)
        else:
            losses[start:stop] = loss
        if not with_grad:
            continue
        # z now holds d(sum of the chunk's losses) / d logits.
        # grad_input's rows z @ W, taken as (W.T @ z.T).T: OpenBLAS runs the
        # product of a short wide z and a tall W (inner dimension C) 1.7x
        # (320 rows) to 10x (64 rows) slower than its transpose, whose
        # output, H x m, is then copied into the rows (m x H: little).
        gxt = gx_t[: h * m].reshape(h, m)
        ops.matmul(w_t, z.T, gxt)
        ops.copy(gx[start:stop], gxt.T)
        # grad_linear_weight += z.T @ xc: accumulating products where the
        # library has them, which read and write the C x H sum once per chunk
        if not _accumulate(ops, z, xc, gw, dtype.itemsize):
            # else in blocks of classes, the first chunk written in place
            # (not 16-bit storage: its products go through a scratch of its
            # dtype): one product of all C classes had the BLAS take a
            # chunk-sized buffer of its own (35 MiB at 320 x 32000, H = 1024)
            for c0 in range(0, c, block):
                c1 = min(c, c0 + block)
                if start == 0 and storage is None:
                    ops.matmul(z[:, c0:c1].T, xc, gw[c0:c1])
                    continue
                if tmp is None:
                    tmp = ops.empty((block, h), io)
                share = tmp[: c1 - c0]
                ops.matmul(z[:, c0:c1].T, xc, share)
                ops.add_into(gw[c0:c1], share)
        if gb is not None:
            ops.col_sum(z, gb)
    loss = finish(total, losses)
    if not with_grad:
        return loss, None
    if ce_spec.reduction == "mean":
        s = 1.0 / denominator if denominator != 0.0 else float("nan")
        for g in (gx, gw, gb):
            if g is not None:
                ops.scale(g, s)
    if storage is not None:
        gw = ops.cast(gw, storage)
        gb = None if gb is None else ops.cast(gb, storage)
    return loss, (gx, gw, gb)
