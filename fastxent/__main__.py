"""python -m fastxent: info, demo, bench."""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time

import numpy as np


def info() -> int:
    """Versions, threads, threading layer and GPU availability."""
    import numba

    import fastxent
    from fastxent import _dispatch
    from fastxent._bench import register_description

    # a call large enough to run in parallel starts Numba's thread pool
    fastxent.cross_entropy(np.zeros((256, 512), np.float32), np.zeros(256, np.int64))
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = "not started"
    rows = [
        ("fastxent", fastxent.__version__),
        ("python", platform.python_version()),
        ("numpy", np.__version__),
        ("numba", numba.__version__),
        ("platform", f"{platform.system()} {platform.machine()}"),
        ("vector registers", register_description()),
        ("cpu threads", str(numba.get_num_threads())),
        ("threading layer", layer),
        ("gpu", _dispatch.gpu_description()),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def demo(epochs: int = 30, seed: int = 0) -> int:
    """Train a one-hidden-layer MLP on synthetic data with fastxent's loss."""
    from fastxent import CrossEntropyLoss

    rng = np.random.default_rng(seed)
    n_classes, n_features, n_hidden = 10, 20, 64
    centers = rng.normal(scale=1.0, size=(n_classes, n_features))

    def make(n):
        y = rng.integers(0, n_classes, n)
        x = centers[y] + rng.normal(scale=2.0, size=(n, n_features))
        return x.astype(np.float32), y

    x_train, y_train = make(8000)
    x_test, y_test = make(2000)
    w1 = (rng.normal(size=(n_features, n_hidden)) / np.sqrt(n_features)).astype(np.float32)
    b1 = np.zeros(n_hidden, np.float32)
    w2 = (rng.normal(size=(n_hidden, n_classes)) / np.sqrt(n_hidden)).astype(np.float32)
    b2 = np.zeros(n_classes, np.float32)
    criterion = CrossEntropyLoss(label_smoothing=0.05, inplace=True)
    lr, batch = 0.1, 256
    print(f"training a {n_features}-{n_hidden}-{n_classes} MLP on {len(y_train)} samples "
          f"with fastxent.CrossEntropyLoss (label_smoothing=0.05)")
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(y_train))
        total = 0.0
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            xb, yb = x_train[idx], y_train[idx]
            h = np.maximum(xb @ w1 + b1, 0)
            logits = h @ w2 + b2
            total += float(criterion(logits, yb)) * len(idx)
            dlogits = criterion.backward()  # the logits buffer, now holding the gradient
            dh = (dlogits @ w2.T) * (h > 0)
            w2 -= lr * (h.T @ dlogits)
            b2 -= lr * dlogits.sum(0)
            w1 -= lr * (xb.T @ dh)
            b1 -= lr * dh.sum(0)
        if epoch == 1 or epoch % 5 == 0 or epoch == epochs:
            h = np.maximum(x_test @ w1 + b1, 0)
            accuracy = np.mean(np.argmax(h @ w2 + b2, axis=1) == y_test)
            print(f"epoch {epoch:3d}  train loss {total / len(y_train):.4f}  "
                  f"test accuracy {accuracy:.3f}")
    print(f"final test accuracy {accuracy:.3f} ({time.perf_counter() - start:.1f} s)")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m fastxent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, threads, threading layer, GPU")
    p_demo = sub.add_parser("demo", help="train a small NumPy MLP with fastxent")
    p_demo.add_argument("--epochs", type=int, default=30)
    p_demo.add_argument("--seed", type=int, default=0)
    p_bench = sub.add_parser("bench", help="time fastxent against np.copyto and installed peers")
    p_bench.add_argument("--quick", action="store_true", help="small shapes, few rounds")
    p_bench.add_argument("--rounds", type=int, default=None,
                         help="interleaved rounds to take the median of")
    p_bench.add_argument("--shapes", nargs="+", metavar="NxC", default=None,
                         help="shapes to time, e.g. 8192x32000 4096x1000 (the main table "
                              "only, or the small-batch one with --small)")
    p_bench.add_argument("--half", action="store_true",
                         help="only the 16-bit table: bfloat16 and float16 logits in place "
                              "against float32, np.copyto and torch (needs ml_dtypes)")
    p_bench.add_argument("--small", action="store_true",
                         help="only the small-batch table (32x10, 128x10, 1024x10)")
    p_bench.add_argument("--torch", dest="torch_section", action="store_true",
                         help="only the torch table: fastxent.torch inside a PyTorch graph "
                              "(8192x32000, or --shapes)")
    p_bench.add_argument("--jacobian", action="store_true",
                         help="only the softmax Jacobian table (softmax_backward, "
                              "log_softmax_backward, cross_entropy_hvp; 8192x32000 and "
                              "1024x32000; the PyTorch double backward needs several GB)")
    p_bench.add_argument("--small-shapes", nargs="+", metavar="NxC", default=None,
                         help="shapes of the small-batch table")
    p_bench.add_argument("--markdown", nargs="?", metavar="PATH", default=None,
                         const="docs/benchmarks.md",
                         help="also write the run as Markdown (default docs/benchmarks.md)")
    p_bench.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p_bench.add_argument("--float64", dest="dtype", action="store_const", const="float64",
                         help="same as --dtype float64")
    p_bench.add_argument("--threads", type=int, default=None,
                         help="threads for Numba and PyTorch (default: theirs)")
    # Fused linear + cross-entropy
    p_bench.add_argument("--linear", action="store_true",
                         help="only the linear table: linear_cross_entropy_with_grad against "
                              "the three matrix products and PyTorch (time and memory)")
    p_bench.add_argument("--linear-shapes", nargs="+", metavar="NxHxC", default=None,
                         help="shapes of the linear table (default 8192x1024x32000 "
                              "4096x2048x128256; heavy: minutes per round)")
    # fastxent.dask
    p_bench.add_argument("--dask", action="store_true",
                         help="only the dask table: fastxent.dask on a LocalCluster (2 worker "
                              "processes x 1 thread) against one NumPy call, row and class "
                              "chunks, and throughput against workers (8192x32000, or --shapes)")
    # Distillation
    p_bench.add_argument("--distillation", action="store_true",
                         help="only the distillation table: distillation_loss_with_grad (dense "
                              "and top-k teachers) against np.copyto, PyTorch and "
                              "cross_entropy_with_grad (8192x32000, or --shapes)")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "demo":
        return demo(args.epochs, args.seed)
    if args.command == "bench" and (args.linear or args.linear_shapes):
        from fastxent import _bench_linear as L

        shapes = ([L.parse_linear_shape(s) for s in args.linear_shapes] if args.linear_shapes
                  else list(L.QUICK_LINEAR_SHAPES if args.quick else L.LINEAR_SHAPES))
        rounds = args.rounds or (1 if args.quick else 3)
        L.bench_linear(shapes, args.dtype, rounds, args.threads)
        return 0
    if args.command == "bench" and args.dask:
        from fastxent import _bench_dask

        return _bench_dask.main(quick=args.quick, rounds=args.rounds, shapes=args.shapes,
                                threads=args.threads, dtype=args.dtype)
    if args.command == "bench" and args.distillation:
        from fastxent import _bench_distill as DB

        shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
                  if args.shapes else
                  list(DB.QUICK_DISTILL_SHAPES if args.quick else DB.DISTILL_SHAPES))
        DB.bench_distillation(shapes, args.dtype, args.rounds or (2 if args.quick else 5),
                              args.threads)
        return 0
    from fastxent import _bench

    return _bench.main(quick=args.quick, rounds=args.rounds, shapes=args.shapes,
                       dtype=args.dtype, threads=args.threads, small=args.small,
                       small_shapes=args.small_shapes, markdown=args.markdown,
                       torch_section=args.torch_section,
                       jacobian=args.jacobian, half=args.half,
                       command=shlex.join(["python", "-m", "fastxent", *argv]))


if __name__ == "__main__":
    sys.exit(main())
