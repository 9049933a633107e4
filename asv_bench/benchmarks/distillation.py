"""asv benchmarks: the distillation losses (``fastxent._bench_distill``).

``dense`` and ``top-k`` (k = 64) are ``distillation_loss_with_grad(...,
inplace=True)`` (forward KL, T = 2), ``torch`` the same loss in PyTorch
(forward + backward), ``cross-entropy`` the hard-target
``cross_entropy_with_grad(inplace=True)`` the top-k form is held against,
``copyto`` the memory floor. The in-place runners refill their input with
``np.copyto`` first: ``copyto``'s time is inside theirs (the
``python -m fastxent bench --distillation`` table subtracts it).
``FASTXENT_BENCH_SMALL=1`` shrinks the shape for CI.
"""

import numpy as np

from fastxent import _bench_distill, _peers

SHAPES = ["256x4000"] if _peers.small_shapes_requested() else ["8192x32000"]
IMPLEMENTATIONS = ["copyto", "dense", "top-k", "cross-entropy", "torch"]

_current = {"shape": None, "runners": None}


class TimeDistillation:
    params = (SHAPES, IMPLEMENTATIONS)
    param_names = ["shape", "implementation"]
    number = 1
    timeout = 600

    def setup(self, shape, implementation):
        if _current["shape"] != shape:
            _current.update(shape=None, runners=None)
            n, c = _peers.parse_shape(shape)
            _current["runners"] = _bench_distill._runners(n, c, np.dtype(np.float32))
            _current["shape"] = shape
        runner = _current["runners"].get(implementation)
        if runner is None:
            raise NotImplementedError(f"{implementation} is not installed")
        runner()  # compiled and warm
        self.runner = runner

    def time_distillation(self, shape, implementation):
        self.runner()
