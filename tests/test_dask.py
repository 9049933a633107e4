"""fastxent.dask against the NumPy functions, on the local schedulers and on a
real ``dask.distributed`` LocalCluster of two worker processes.

The grid (every option, both target kinds, each chunk layout) runs on the
synchronous and threaded schedulers; a representative subset runs on the
cluster, which is started once for the module (it takes seconds).
"""

import subprocess
import sys

import dask
import numba
import dask.array as da
import numpy as np
import pytest

import fastxent as fx
import fastxent.dask as fxd

N, C = 29, 17
TOL = {np.float64: 1e-12, np.float32: 2e-6}
# (row chunks, class chunks): rows only, classes only (a chunk of one class,
# unequal chunks), both.
LAYOUTS = {
    "rows": ((8, 8, 8, 5), (C,)),
    "classes": ((N,), (1, 6, 10)),
    "both": ((15, 14), (5, 5, 7)),
}
OPTIONS = [
    {},
    {"weight": True},
    {"ignore_index": 3},
    {"label_smoothing": 0.15},
    {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-2},
]


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()


def _inputs(dtype, soft, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((N, C)) * 4).astype(dtype)
    if soft:
        t = rng.random((N, C)).astype(dtype)
        t /= t.sum(axis=1, keepdims=True)
    else:
        t = rng.integers(0, C, N)
        t[[2, 11]] = -100
        t[5] = 3
    w = (rng.random(C) + 0.5).astype(dtype)
    return x, t, w


def _kwargs(option, w):
    kw = dict(option)
    if kw.get("weight") is True:
        kw["weight"] = w
    return kw


def _close(got, want, dtype):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    scale = max(np.abs(want).max(initial=0.0), np.finfo(np.float64).tiny)
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def _check(layout, dtype, soft, option, reduction, scheduler="sync", **compute):
    x, t, w = _inputs(dtype, soft)
    kw = _kwargs(option, w)
    if soft and "ignore_index" in kw:
        kw.pop("ignore_index")
    elif "ignore_index" in kw:
        t = np.where(t == -100, kw["ignore_index"], t)
    X = da.from_array(x, chunks=LAYOUTS[layout])
    T = da.from_array(t, chunks=4 if not soft else (4, 3))
    loss, grad = fxd.cross_entropy_with_grad(X, T, reduction=reduction, **kw)
    assert grad.chunks == X.chunks
    if reduction != "none":
        assert loss.shape == ()
    loss_only = fxd.cross_entropy(X, T, reduction=reduction, **kw)
    got_loss, got_grad, got_only = dask.compute(loss, grad, loss_only, scheduler=scheduler,
                                                **compute)
    want_loss, want_grad = fx.cross_entropy_with_grad(x, t, reduction=reduction, **kw)
    assert got_loss.dtype == np.dtype(dtype) and got_grad.dtype == np.dtype(dtype)
    _close(got_loss, want_loss, dtype)
    _close(got_only, want_loss, dtype)
    _close(got_grad, want_grad, dtype)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_grid(layout, dtype, soft, option, reduction):
    _check(layout, dtype, soft, option, reduction)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_threaded_scheduler_same_bits(layout):
    """Tasks at once in threads (the serial kernels under the lock) give the
    bits of the synchronous scheduler."""
    x, t, w = _inputs(np.float32, False)
    X = da.from_array(x, chunks=LAYOUTS[layout])
    loss, grad = fxd.cross_entropy_with_grad(X, t, weight=w, label_smoothing=0.1)
    sync = dask.compute(loss, grad, scheduler="sync")
    threads = dask.compute(loss, grad, scheduler="threads", num_workers=4)
    assert sync[0].tobytes() == threads[0].tobytes()
    assert sync[1].tobytes() == threads[1].tobytes()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_family(layout, dtype):
    x, _, _ = _inputs(dtype, False)
    x[4, :] = 300.0  # large logits: the merge keeps the shift
    X = da.from_array(x, chunks=LAYOUTS[layout])
    lse, ls, sm = dask.compute(fxd.logsumexp(X), fxd.log_softmax(X), fxd.softmax(X),
                               scheduler="sync")
    _close(lse, fx.logsumexp(x, axis=-1), dtype)
    _close(ls, fx.log_softmax(x), dtype)
    _close(sm, fx.softmax(x), dtype)
    assert sm.dtype == ls.dtype == lse.dtype == np.dtype(dtype)


CLUSTER_CASES = [
    ("rows", np.float32, False, {"weight": True}, "mean"),
    ("classes", np.float64, False, {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-2},
     "mean"),
    ("both", np.float32, True, {"label_smoothing": 0.2}, "sum"),
    ("both", np.float64, False, {"ignore_index": 3}, "none"),
]


@pytest.mark.parametrize("case", CLUSTER_CASES, ids=lambda c: f"{c[0]}-{np.dtype(c[1])}")
def test_on_cluster(client, case):
    layout, dtype, soft, option, reduction = case
    _check(layout, dtype, soft, option, reduction, scheduler=client)


def test_worker_numba_threads(client):
    """A task on a worker of one thread runs Numba on one thread."""
    def threads_in_task():
        import numba
        fxd.numba_threads()
        return numba.get_num_threads(), numba.config.NUMBA_NUM_THREADS

    in_task, pool = client.submit(threads_in_task, pure=False).result()
    assert in_task == 1
    assert pool == numba.config.NUMBA_NUM_THREADS  # Numba's pool is the machine's


def test_cluster_softmax(client):
    x, _, _ = _inputs(np.float64, False)
    X = da.from_array(x, chunks=LAYOUTS["both"])
    got = client.compute(fxd.log_softmax(X)).result()
    _close(got, fx.log_softmax(x), np.float64)


# --------------------------------------------------------------------------
# Errors


def _message(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


def test_shape_errors_at_construction():
    x, t, _ = _inputs(np.float64, False)
    X = da.from_array(x, chunks=LAYOUTS["both"])
    cases = [
        (lambda a: fxd.cross_entropy(a, t[:-1]), lambda: fx.cross_entropy(x, t[:-1])),
        (lambda a: fxd.cross_entropy(a, t, weight=np.ones(C + 1)),
         lambda: fx.cross_entropy(x, t, weight=np.ones(C + 1))),
        (lambda a: fxd.cross_entropy(a, t, reduction="avg"),
         lambda: fx.cross_entropy(x, t, reduction="avg")),
        (lambda a: fxd.cross_entropy_with_grad(a, t, label_smoothing=1.5),
         lambda: fx.cross_entropy(x, t, label_smoothing=1.5)),
        (lambda a: fxd.cross_entropy(a, np.zeros((N, C + 1))),
         lambda: fx.cross_entropy(x, np.zeros((N, C + 1)))),
    ]
    for dask_call, numpy_call in cases:
        assert _message(lambda: dask_call(X)) == _message(numpy_call)
    with pytest.raises(ValueError, match="2-D"):
        fxd.cross_entropy(da.zeros((2, 3, 4)), da.zeros((2, 3), dtype=int))
    with pytest.raises(NotImplementedError, match="chunked along the classes"):
        fxd.cross_entropy(X, t, softcap=30.0)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_bad_target(layout):
    """An out-of-range class index raises the NumPy function's error, with
    the row's position in the whole array: at graph construction when the
    targets are a NumPy array, at compute when they are a Dask array."""
    x, t, _ = _inputs(np.float64, False)
    t[20] = C + 2
    X = da.from_array(x, chunks=LAYOUTS[layout])
    want = _message(lambda: fx.cross_entropy(x, t))
    assert want[0] is IndexError
    assert _message(lambda: fxd.cross_entropy_with_grad(X, t)) == want
    loss, grad = fxd.cross_entropy_with_grad(X, da.from_array(t, chunks=7))
    assert _message(lambda: dask.compute(loss, grad, scheduler="sync")) == want


def test_all_ignored_mean_is_nan():
    x, t, _ = _inputs(np.float64, False)
    t[:] = -100
    for layout in ("rows", "classes"):
        X = da.from_array(x, chunks=LAYOUTS[layout])
        loss, grad = dask.compute(*fxd.cross_entropy_with_grad(X, t), scheduler="sync")
        want_loss, want_grad = fx.cross_entropy_with_grad(x, t)
        assert np.isnan(loss) and np.isnan(want_loss)
        np.testing.assert_array_equal(grad, want_grad)


# --------------------------------------------------------------------------
# Out of core, and the optional import


def test_out_of_core_memmap(tmp_path):
    """The README's example: the loss of logits on disk, read block by block."""
    rng = np.random.default_rng(3)
    path = tmp_path / "logits.npy"
    on_disk = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(300, 64))
    on_disk[:] = rng.standard_normal((300, 64)).astype(np.float32)
    on_disk.flush()
    targets = rng.integers(0, 64, 300)
    del on_disk

    logits = da.from_array(np.load(path, mmap_mode="r"), chunks=(64, 64))
    loss = fxd.cross_entropy(logits, targets).compute(scheduler="sync")
    want = fx.cross_entropy(np.load(path), targets)
    _close(loss, want, np.float32)
    by_classes = da.from_array(np.load(path, mmap_mode="r"), chunks=(100, 16))
    _close(fxd.cross_entropy(by_classes, targets).compute(scheduler="sync"), want, np.float32)


def test_import_fastxent_without_dask():
    code = ("import sys; sys.modules['dask'] = None\n"
            "import fastxent\n"
            "assert 'distributed' not in sys.modules\n"
            "try:\n"
            "    import fastxent.dask\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "fastxent.dask needs dask" in out and "fastxent[dask]" in out
    code = "import fastxent, sys; print('dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("layout", ["rows", "classes"])
def test_loss_and_grad_share_their_block_tasks(layout):
    """Computed together, the loss and the gradient read each block once: the
    same per-block task keys in both graphs, one per block."""
    x, t, _ = _inputs(np.float32, False)
    X = da.from_array(x, chunks=LAYOUTS[layout])
    loss, grad = fxd.cross_entropy_with_grad(X, t)
    name = "_row_block" if layout == "rows" else "fastxent-partials"

    def block_keys(collection):
        return {str(k) for k in dict(collection.__dask_graph__()) if name in str(k)}

    assert block_keys(loss) == block_keys(grad)
    assert len(block_keys(loss)) == X.npartitions
