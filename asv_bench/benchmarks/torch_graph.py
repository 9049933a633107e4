"""asv benchmarks: fastxent.torch inside a PyTorch graph (the bench's torch section).

``TorchGraph.time_*`` times, per implementation of :data:`fastxent._peers.TORCH_GRAPH`
(``fastxent``, ``inplace``, ``torch``), the loss part (forward and backward
down to the logits of an ``nn.Linear``) and the whole step;
``track_peak_memory`` records the step's peak resident memory in bytes, and
``TorchGraphRatio`` the loss part's speed-up over ``F.cross_entropy``, both
measured moments apart in one process. Skipped without PyTorch.
``FASTXENT_BENCH_SMALL=1`` shrinks the shape for CI.
"""

import statistics

import numpy as np

from fastxent import _bench, _peers

SHAPE = "256x32000" if _peers.small_shapes_requested() else "8192x32000"
IMPLEMENTATIONS = ["fastxent", "inplace", "torch"]
RATIO_ROUNDS = 3

_current = {"inputs": None, "runners": {}}


def _runner(label):
    if _current["inputs"] is None:
        n, c = _peers.parse_shape(SHAPE)
        _current["inputs"] = _peers.hard_target_inputs(n, c, np.dtype("float32"),
                                                       np.random.default_rng(0))
    if label not in _current["runners"]:
        try:
            runner = _peers.TORCH_GRAPH[label](_current["inputs"])
        except _peers.PeerUnavailable as missing:
            raise NotImplementedError(str(missing)) from None
        runner.prepare()
        runner.run()  # warm-up: compiles, starts the thread pools
        _current["runners"][label] = runner
    return _current["runners"][label]


class TorchGraph:
    """The loss part, the step and the step's peak memory, per implementation."""

    params = (IMPLEMENTATIONS,)
    param_names = ["implementation"]
    number = 1
    repeat = (3, 7, 60.0)
    timeout = 900

    def setup(self, implementation):
        self.loss = _runner(implementation)
        self.step = _runner(f"{implementation} step")
        self.loss.prepare()
        self.step.prepare()

    def time_loss(self, implementation):
        self.loss.run()

    def time_step(self, implementation):
        self.step.run()

    def track_peak_memory(self, implementation):
        runner = _runner(f"{implementation} peak")
        runner.prepare()
        return runner.run()

    track_peak_memory.unit = "bytes"


class TorchGraphRatio:
    """F.cross_entropy's loss part over fastxent.torch's (higher: fastxent faster)."""

    params = (["fastxent", "inplace"],)
    param_names = ["implementation"]
    timeout = 900

    def track_speedup_over_torch(self, implementation):
        ours, theirs = _runner(implementation), _runner("torch")
        ratios = [_bench.time_sample(theirs, 1) / _bench.time_sample(ours, 3)
                  for _ in range(RATIO_ROUNDS)]
        return statistics.median(ratios)

    track_speedup_over_torch.unit = "ratio"
