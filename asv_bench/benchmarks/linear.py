"""asv benchmarks: the fused linear + cross-entropy (``linear_cross_entropy_with_grad``).

``LinearCrossEntropy.time_forward_backward`` times fastxent, the three
matrix products alone (fastxent's loop without the loss kernel: the floor),
PyTorch's chunked ``F.linear_cross_entropy`` and the unfused
``F.cross_entropy(F.linear(...))`` (PyTorch skipped when not installed);
``track_ratio_to_matmul`` records fastxent's time over the products',
measured moments apart in one process (the issue's target: at most 1.15);
``track_peak_memory_share`` the peak resident bytes a call adds above the
inputs and the gradients, over the N x C float32 logits (a child process).

Shapes (N x H x C): an LLM head at 32000 classes; ``FASTXENT_BENCH_SMALL=1``
shrinks it for CI. The 4096 x 2048 x 128256 shape of ``python -m fastxent
bench --linear`` takes minutes per call on two cores and is left out here.
"""

import statistics
import time

import numpy as np

from fastxent import _bench_linear as L
from fastxent import _peers

if _peers.small_shapes_requested():
    SHAPES = ["256x64x1000"]
else:
    SHAPES = ["8192x1024x32000"]

_current = {"key": None, "inputs": None}


def _inputs(shape):
    if _current["key"] != shape:
        _current.update(key=None, inputs=None)  # free before allocating
        _current["inputs"] = L.linear_inputs(*L.parse_linear_shape(shape), np.dtype("float32"))
        _current["key"] = shape
    return _current["inputs"]


def _call(name, shape):
    try:
        return L.runner(name, *_inputs(shape))
    except ImportError as missing:
        raise NotImplementedError(str(missing)) from None


class LinearCrossEntropy:
    params = (SHAPES, list(L.IMPLEMENTATIONS))
    param_names = ["shape", "implementation"]
    number = 1
    repeat = 3
    timeout = 1800

    def setup(self, shape, implementation):
        self.call = _call(implementation, shape)
        L.runner(implementation, *L.linear_inputs(64, 32, 128, np.dtype("float32")))()

    def time_forward_backward(self, shape, implementation):
        self.call()


class LinearCrossEntropyRatio:
    params = (SHAPES,)
    param_names = ["shape"]
    number = 1
    repeat = 1
    timeout = 3600

    def setup(self, shape):
        self.fast = _call("fastxent", shape)
        self.floor = _call("matmul", shape)
        self.fast()

    def track_ratio_to_matmul(self, shape):
        ratios = []
        for _ in range(3):
            start = time.perf_counter()
            self.fast()
            middle = time.perf_counter()
            self.floor()
            ratios.append((middle - start) / (time.perf_counter() - middle))
        return statistics.median(ratios)

    track_ratio_to_matmul.unit = "fastxent / products"

    def track_peak_memory_share(self, shape):
        n, h, c = L.parse_linear_shape(shape)
        m = L.memory_in_child("fastxent", (n, h, c), "float32", None)
        return m["above_grads"] / m["logits"]

    track_peak_memory_share.unit = "share of N x C logits"
