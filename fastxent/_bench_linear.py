"""``python -m fastxent bench --linear``: the fused linear + cross-entropy.

Per (N, H, C) shape, float32 (or float64), forward + backward with the
three gradients:

``matmul``
    The three matrix products alone: fastxent's own loop (``_linear.run``)
    with the loss kernel left out, so the same NumPy products on the same
    chunks and blocks, and the same additions of the weight's gradient.
``matmul whole``
    The same three products on whole matrices (``x @ W.T``, then the N x C
    result ``@ W`` and ``.T @ x``): what the BLAS does without chunks.
``fastxent``
    ``linear_cross_entropy_with_grad`` (default chunk size).
``torch chunked``
    ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())`` + backward.
``torch unfused``
    ``F.cross_entropy(F.linear(x, W), t)`` + backward (the N x C logits).

Times are medians over interleaved rounds (one call per sample: these are
seconds each), ratios per round. Memory: each implementation runs once more
in a child process of its own, which resets its resident-set peak
(``/proc/self/clear_refs``) after the inputs exist and a warm-up call (512
rows, 4096 classes, the same H) has compiled everything and had the BLAS
touch its packing buffers, then reads it (``VmHWM``) after the call; the
figure is that peak minus the resident set before the call and minus the
returned gradients, as a share of the N x C float32 logits.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

#: The issue's shapes: (N, H, C).
LINEAR_SHAPES = ((8192, 1024, 32000), (4096, 2048, 128256))
QUICK_LINEAR_SHAPES = ((512, 256, 4000),)
IMPLEMENTATIONS = ("matmul", "matmul whole", "fastxent", "torch chunked", "torch unfused")
#: The implementations timed but not measured for memory (no loss).
PRODUCTS_ONLY = ("matmul", "matmul whole")
IGNORED_SHARE = 0.05


def parse_linear_shape(text: str) -> tuple:
    try:
        n, h, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a linear shape is NxHxC (e.g. 8192x1024x32000), got {text!r}") \
            from None
    return n, h, c


def linear_inputs(n, h, c, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h), dtype=np.float32).astype(dtype, copy=False)
    w = rng.standard_normal((c, h), dtype=np.float32).astype(dtype, copy=False)
    w *= dtype.type(1.0 / np.sqrt(h))
    t = rng.integers(0, c, n)
    t[rng.random(n) < IGNORED_SHARE] = -100
    return x, w, t


def runner(name: str, x, w, t):
    """A no-argument call of implementation ``name`` returning its results."""
    if name == "fastxent":
        import fastxent

        return lambda: fastxent.linear_cross_entropy_with_grad(x, w, t)
    if name == "matmul whole":
        def whole():
            z = x @ w.T
            return z @ w, z.T @ x

        return whole
    if name == "matmul":
        from . import _validate
        from ._cpu_linear import OPS
        from ._linear import run

        backend, spec, (xa, wa, ba, ta, cwa) = _validate.linear_cross_entropy_call(
            x, w, t, None, None, -100, "sum", 0.0, None, "cpu", {})

        def no_loss(chunk_spec, z, target, weight, grad):
            return 0.0, None

        # fastxent's loop with the loss kernel left out: the same products,
        # in the same chunks and blocks, and the same additions.
        return lambda: run(spec, xa, wa, None, ta, None, 1.0, True, OPS, no_loss,
                           lambda total, losses: total)
    import torch
    import torch.nn.functional as F

    X, W, T = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(t)
    if name == "torch chunked":
        options = torch.nn.LinearCrossEntropyOptions()

        def loss_of(xl, wl):
            return F.linear_cross_entropy(xl, wl, T, options=options)
    elif name == "torch unfused":
        def loss_of(xl, wl):
            return F.cross_entropy(F.linear(xl, wl), T)
    else:
        raise KeyError(name)

    def run():
        xl = X.detach().requires_grad_(True)
        wl = W.detach().requires_grad_(True)
        loss = loss_of(xl, wl)
        loss.backward()
        return loss, xl.grad, wl.grad

    return run


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_child(name: str, n: int, h: int, c: int, dtype: str, threads: int) -> dict:
    """In this (child) process: the peak resident bytes a call adds."""
    _set_threads(threads)
    dtype = np.dtype(dtype)
    # Compiles, starts thread pools and has the BLAS touch its packing
    # buffers (tens of MiB, made once per process, whatever the call): the
    # hidden size of the measured call and more classes than
    # ``_cpu.SHORT_ROW``, so that the kernel it runs (direct rows) is compiled.
    small = linear_inputs(512, h, 4096, dtype)
    runner(name, *small)()
    x, w, t = linear_inputs(n, h, c, dtype)
    call = runner(name, x, w, t)
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS") * 1024
    result = call()
    peak = _status_kib("VmHWM") * 1024
    grads = (x.nbytes + w.nbytes)  # grad_input and grad_linear_weight
    return dict(peak_above=peak - before, above_grads=peak - before - grads,
                logits=n * c * 4)


def _set_threads(threads: Optional[int]):
    if threads is None:
        return
    import numba

    numba.set_num_threads(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass


def memory_in_child(name, shape, dtype, threads) -> Optional[dict]:
    n, h, c = shape
    code = ("import json, sys; from fastxent._bench_linear import measure_memory_child as m; "
            f"print(json.dumps(m({name!r}, {n}, {h}, {c}, {str(dtype)!r}, {threads!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=os.environ.copy())
    if done.returncode != 0:
        return dict(error=done.stderr.strip().splitlines()[-1] if done.stderr else "failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_linear(shapes: Sequence[tuple], dtype, rounds: int, threads: Optional[int],
                 memory: bool = True, stream=None) -> List[str]:
    """Time and measure every implementation at each shape; returns the table's lines."""
    stream = sys.stdout if stream is None else stream
    dtype = np.dtype(dtype)
    _set_threads(threads)
    available = list(IMPLEMENTATIONS)
    try:
        import torch  # noqa: F401
    except ImportError:
        available = ["matmul", "matmul whole", "fastxent"]
    header = (["shape"] + available + ["fastxent/matmul", "fastxent/matmul whole"]
              + [f"{p}/fastxent" for p in available if p.startswith("torch")]
              + [f"mem {p}" for p in available if p not in PRODUCTS_ONLY])
    rows = [header]
    for shape in shapes:
        small = linear_inputs(64, 32, 128, dtype)
        for name in available:  # compiles, starts thread pools (a large warm-up costs minutes)
            runner(name, *small)()
        x, w, t = linear_inputs(*shape, dtype)
        calls = {name: runner(name, x, w, t) for name in available}
        samples: Dict[str, List[float]] = {name: [] for name in available}
        for r in range(rounds):
            shift = r % len(available)
            for name in available[shift:] + available[:shift]:
                print(f"  {shape}: round {r + 1}/{rounds} {name}", file=sys.stderr, flush=True)
                start = time.perf_counter()
                calls[name]()
                samples[name].append(time.perf_counter() - start)
        del calls
        row = ["x".join(map(str, shape))]
        row += [f"{statistics.median(samples[name]):.2f} s" for name in available]

        def ratio(a, b):
            return statistics.median(p / q for p, q in zip(samples[a], samples[b]))

        row.append(f"{ratio('fastxent', 'matmul'):.3f}")
        row.append(f"{ratio('fastxent', 'matmul whole'):.3f}")
        row += [f"{ratio(p, 'fastxent'):.2f}" for p in available if p.startswith("torch")]
        print(f"  {shape}: times " + ", ".join(f"{p} {samples[p]}" for p in available),
              file=sys.stderr, flush=True)
        del x, w, t
        for name in available:
            if name in PRODUCTS_ONLY:
                continue
            if not memory:
                row.append("-")
                continue
            print(f"  {shape}: memory {name} (child process)", file=sys.stderr, flush=True)
            m = memory_in_child(name, shape, dtype, threads)
            if "error" in m:
                row.append(f"failed ({m['error'][:40]})")
            else:
                row.append(f"{100 * m['above_grads'] / m['logits']:.1f}% "
                           f"({m['above_grads'] / 2**20:.0f} MiB)")
        rows.append(row)
        # each shape's figures as soon as they exist (a large run takes many minutes)
        print("  " + " | ".join(f"{h}: {v}" for h, v in zip(header, row)), file=sys.stderr,
              flush=True)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(wd) for cell, wd in zip(r, widths)) for r in rows]
    lines += ["",
              "matmul: the three products alone (fastxent's loop without the loss kernel); matmul "
              "whole: the same products on whole matrices (N x C logits); fastxent: "
              "linear_cross_entropy_with_grad; torch chunked: F.linear_cross_entropy with "
              "LinearCrossEntropyOptions(); torch unfused: F.cross_entropy(F.linear(...)). "
              "All forward + backward (three gradients for fastxent).",
              "mem: peak resident bytes above the inputs and the returned gradients, as a share "
              "of the N x C float32 logits (a child process per figure)."]
    print("\n".join(lines), file=stream)
    return lines
