"""``python -m fastxent bench --dask``: fastxent.dask on a LocalCluster against one NumPy call.

Side by side in one process, rounds interleaved, medians reported:

* ``numpy``: :func:`fastxent.cross_entropy_with_grad` on the whole array,
  Numba on ``threads`` threads (2 by default: the cluster's cores);
* ``dask rows``: :func:`fastxent.dask.cross_entropy_with_grad` on a
  LocalCluster of ``workers`` processes x 1 thread, logits in row chunks
  (``row_chunk`` rows), already on the workers; the gradient stays there
  (persisted, as a training step keeps it) and the loss comes back;
* ``dask classes``: the same with ``class_chunks`` chunks along the classes
  (the vocabulary-sharded layout: all rows in one chunk), and with the
  classes' chunks and the rows' chunks of ``row_chunk`` both.

Then the throughput (rows per second) of the row layout against the
number of workers (1 .. ``workers``), one cluster each.
"""

from __future__ import annotations

import statistics
import time
from typing import List, Optional, Sequence

import numpy as np

SHAPE = (8192, 32000)
QUICK_SHAPE = (1024, 2000)


def _block(seed, rows, n_classes, dtype):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, n_classes), dtype=np.float32) * 3).astype(dtype)


def _logits_on_workers(client, shape, row_chunk, dtype):
    """The logits, generated block by block on the workers (no copy through
    the client), and the same array in this process."""
    import dask
    import dask.array as da

    n_rows, n_classes = shape
    starts = range(0, n_rows, row_chunk)
    blocks = [da.from_delayed(dask.delayed(_block, pure=True)(i, min(row_chunk, n_rows - s),
                                                                n_classes, dtype),
                              (min(row_chunk, n_rows - s), n_classes), dtype)
              for i, s in enumerate(starts)]
    on_workers = client.persist(da.concatenate(blocks))
    local = np.concatenate([_block(i, min(row_chunk, n_rows - s), n_classes, dtype)
                            for i, s in enumerate(starts)])
    return on_workers, local


def _time_dask(client, logits, target):
    from distributed import wait

    import fastxent.dask as fxd

    start = time.perf_counter()
    # loss and gradient in one persist: they share their block tasks
    loss, grad = client.persist(list(fxd.cross_entropy_with_grad(logits, target)))
    wait([loss, grad])
    value = float(loss.compute())
    seconds = time.perf_counter() - start
    del loss, grad
    return seconds, value


def _time_numpy(logits, target):
    import fastxent

    start = time.perf_counter()
    loss, grad = fastxent.cross_entropy_with_grad(logits, target)
    seconds = time.perf_counter() - start
    del grad
    return seconds, float(loss)


def _cluster(workers):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, memory_limit=0)
    return cluster, Client(cluster)


def bench_dask(shape: Sequence[int] = SHAPE, row_chunk: int = 1024, class_chunks: int = 4,
               workers: int = 2, threads: int = 2, rounds: int = 3, dtype: str = "float32",
               scaling: bool = True) -> dict:
    """Print the table; return the medians (seconds) and ratios."""
    import numba

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    dtype = np.dtype(dtype)
    n_rows, n_classes = shape
    target = np.random.default_rng(1).integers(0, n_classes, n_rows)
    cluster, client = _cluster(workers)
    try:
        rows, local = _logits_on_workers(client, shape, row_chunk, dtype)
        class_width = -(-n_classes // class_chunks)
        layouts = {"dask rows": rows,
                   "dask classes": client.persist(rows.rechunk((n_rows, class_width))),
                   "dask both": client.persist(rows.rechunk((row_chunk, class_width)))}
        times = {"numpy": [], **{name: [] for name in layouts}}
        _time_numpy(local, target)  # compile, warm up
        for logits in layouts.values():
            _time_dask(client, logits, target)
        for _ in range(rounds):
            t_np, want = _time_numpy(local, target)
            times["numpy"].append(t_np)
            for name, logits in layouts.items():
                seconds, got = _time_dask(client, logits, target)
                assert abs(got - want) <= 2e-6 * abs(want) + 1e-12, (name, got, want)
                times[name].append(seconds)
        del rows, layouts
    finally:
        client.close()
        cluster.close()
    medians = {k: statistics.median(v) for k, v in times.items()}
    # ratios of each round's pair, then their median (drift between rounds cancels)
    ratios = {k: statistics.median(t / n for t, n in zip(times[k], times["numpy"]))
              for k in times if k != "numpy"}
    print(f"fastxent.dask: cross_entropy_with_grad, {n_rows}x{n_classes} {dtype}, "
          f"{rounds} rounds (medians)")
    labels = {"numpy": f"numpy call, {threads} Numba threads",
              "dask rows": f"dask, {workers} workers x 1 thread, rows/{row_chunk}",
              "dask classes": f"dask, {workers} workers x 1 thread, {class_chunks} chunks of C",
              "dask both": f"dask, {workers} workers x 1 thread, rows/{row_chunk} x "
                           f"{class_chunks} chunks of C"}
    width = max(len(label) for label in labels.values())
    for name, label in labels.items():
        ratio = "" if name == "numpy" else f"   {ratios[name]:.2f}x numpy"
        print(f"  {label:{width}s} {medians[name] * 1e3:9.1f} ms{ratio}")
    result = {"medians": medians, "ratios": ratios, "throughput": {}}
    if scaling:
        del local
        print("  throughput of the row layout against workers (1 thread each):")
        for n_workers in range(1, workers + 1):
            cluster, client = _cluster(n_workers)
            try:
                logits, _ = _logits_on_workers(client, shape, row_chunk, dtype)
                _time_dask(client, logits, target)
                seconds = statistics.median(_time_dask(client, logits, target)[0]
                                            for _ in range(rounds))
                del logits
            finally:
                client.close()
                cluster.close()
            result["throughput"][n_workers] = n_rows / seconds
            print(f"    {n_workers} worker(s)  {n_rows / seconds:12,.0f} rows/s")
    return result


def main(quick: bool = False, rounds: Optional[int] = None,
         shapes: Optional[List[str]] = None, threads: Optional[int] = None,
         dtype: str = "float32") -> int:
    from fastxent._peers import parse_shape

    shape = parse_shape(shapes[0]) if shapes else (QUICK_SHAPE if quick else SHAPE)
    bench_dask(shape, row_chunk=128 if quick else 1024, rounds=rounds or (1 if quick else 3),
               threads=threads or 2, dtype=dtype)
    return 0
