"""``python -m fastxent bench --distillation``: the distillation losses.

Per (N, C) shape, side by side in one process, interleaved rounds (medians
of the per-round times and ratios):

``copyto``
    ``np.copyto`` of one N x C array (the floor: the loss reads two and
    writes one).
``dense``
    ``distillation_loss_with_grad(student, teacher, inplace=True)``
    (forward KL, temperature 2).
``torch``
    The same loss in PyTorch: ``kl_div(log_softmax(s / T), softmax(t / T))``
    times T**2, forward + backward.
``top-k``
    ``distillation_loss_with_grad(student, (indices, values), inplace=True)``
    with k = 64.
``cross-entropy``
    ``cross_entropy_with_grad(logits, target, inplace=True)`` (hard targets).
"""

from __future__ import annotations

import statistics
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

DISTILL_SHAPES = ((8192, 32000),)
QUICK_DISTILL_SHAPES = ((512, 32000),)
TOPK = 64
TEMPERATURE = 2.0


def _runners(n, c, dtype):
    import fastxent

    rng = np.random.default_rng(0)
    source = rng.standard_normal((n, c), dtype=np.float32).astype(dtype, copy=False)
    teacher = rng.standard_normal((n, c), dtype=np.float32).astype(dtype, copy=False)
    indices = np.argpartition(teacher, -TOPK, axis=1)[:, -TOPK:].copy()
    values = np.take_along_axis(teacher, indices, axis=1).copy()
    target = rng.integers(0, c, n)
    work = np.empty_like(source)

    def timed(fn, *args, **kwargs):
        start = time.perf_counter()
        fn(*args, **kwargs)
        return time.perf_counter() - start

    def copyto():
        return timed(np.copyto, work, source)

    def dense():
        np.copyto(work, source)  # the refill, untimed
        return timed(fastxent.distillation_loss_with_grad, work, teacher,
                     temperature=TEMPERATURE, inplace=True)

    def topk():
        np.copyto(work, source)
        return timed(fastxent.distillation_loss_with_grad, work, (indices, values),
                     temperature=TEMPERATURE, inplace=True)

    def cross_entropy():
        np.copyto(work, source)
        return timed(fastxent.cross_entropy_with_grad, work, target, inplace=True)

    runners = {"copyto": copyto, "dense": dense, "top-k": topk, "cross-entropy": cross_entropy}
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return runners
    s_t, t_t = torch.from_numpy(source), torch.from_numpy(teacher)

    def torch_loss():
        s = s_t.detach().requires_grad_(True)
        log_q = F.log_softmax(s / TEMPERATURE, -1)
        p = F.softmax(t_t / TEMPERATURE, -1)
        loss = F.kl_div(log_q, p, reduction="batchmean") * TEMPERATURE ** 2
        loss.backward()

    def torch_timed():
        return timed(torch_loss)

    runners["torch"] = torch_timed
    return runners


def bench_distillation(shapes: Sequence[tuple], dtype: str = "float32", rounds: int = 5,
                       threads: Optional[int] = None) -> Dict[tuple, Dict[str, float]]:
    """Print and return, per shape, the median seconds of each implementation
    (the in-place ones timed without their refill)."""
    import numba

    if threads:
        numba.set_num_threads(threads)
    dtype = np.dtype(dtype)
    results = {}
    for n, c in shapes:
        runners = _runners(n, c, dtype)
        for fn in runners.values():  # compile and warm up
            fn()
        times: Dict[str, List[float]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, fn in runners.items():
                times[name].append(fn())
        copy = times["copyto"]
        medians = {name: statistics.median(v) for name, v in times.items()}
        results[(n, c)] = medians
        print(f"distillation {n}x{c} {dtype.name}, {rounds} rounds, "
              f"{numba.get_num_threads()} threads (medians)")
        for name, value in medians.items():
            print(f"  {name:14s} {value * 1e3:10.2f} ms")
        ratio = statistics.median(t / u for t, u in zip(times["dense"], copy))
        print(f"  dense / copyto           {ratio:6.2f}  (target <= 1.7)")
        if "torch" in times:
            ratio = statistics.median(u / t for t, u in zip(times["dense"], times["torch"]))
            print(f"  torch / dense            {ratio:6.2f}  (target >= 10)")
        ratio = statistics.median(t / u for t, u in zip(times["top-k"], times["cross-entropy"]))
        print(f"  top-k / cross-entropy    {ratio:6.2f}  (target <= 1.2)")
    return results
