"""asv benchmarks: every public fastxent kernel, its peers and the memory limit.

Each ``time_*`` class times one entry of :data:`fastxent._peers.COMPARISONS`
over (shape, dtype, implementation), where the implementation is fastxent,
a peer (``numpy``, ``torch``, ``jax``: skipped when not installed) or the
memory limit ``np.copyto``. Peers sharing the parametrization puts their
times next to fastxent's in ``asv show`` and the html pages, and lets
``asv compare`` show that a peer stayed put while fastxent moved (a control
for machine noise). ``MemoryLimitRatio.track_*`` records fastxent's time over
``np.copyto``'s, both measured moments apart in the same process.
``SmallBatches`` and ``SmallBatchRatio`` time the small-batch table of
:data:`fastxent._peers.SMALL_BATCH` (per-call overhead at 32 to 1024 rows).

Shapes: small C, medium C (the tiled kernels), a classifier, an LLM
vocabulary. The LLM shape is 1 GB per
float32 array; ``FASTXENT_BENCH_SMALL=1`` shrinks every shape for CI.
"""

import numpy as np

from fastxent import _bench, _peers

if _peers.small_shapes_requested():
    SHAPES = ["1024x10", "256x64", "64x1000", "8x32000"]
else:
    SHAPES = ["65536x10", "6400x64", "4096x1000", "8192x32000"]
DTYPES = ["float32", "float64"]
IMPLEMENTATIONS = ["fastxent", "np.copyto", "numpy", "torch", "jax"]

#: Rounds the track_ ratio takes the median of.
RATIO_ROUNDS = 5

# asv re-runs teardown() and setup() around every timed call (number = 1,
# so that in-place kernels always see pristine logits). Rebuilding gigabyte
# inputs and recompiling JAX each time would take longer than the timing, so
# the inputs and runners of the current parameter set live here: setup()
# only restores the logits. One parameter set at a time: a new one evicts
# the previous before allocating. (asv also runs each parameter set in its
# own process, which frees everything when it ends.)
_current = {"key": None, "inputs": None, "runners": {}}


def _inputs(comparison, shape, dtype):
    key = (comparison.make_inputs, shape, dtype)
    if _current["key"] != key:
        _current.update(key=None, inputs=None, runners={})  # free before allocating
        n, c = _peers.parse_shape(shape)
        _current["inputs"] = comparison.make_inputs(n, c, np.dtype(dtype),
                                                    np.random.default_rng(0))
        _current["key"] = key
    return _current["inputs"]


def _runner(comparison, shape, dtype, implementation):
    """The cached, warmed-up runner; NotImplementedError (asv: skip) if its peer is missing."""
    inputs = _inputs(comparison, shape, dtype)
    key = (comparison.name, implementation)
    if key not in _current["runners"]:
        try:
            runner = comparison.runner(implementation, inputs)
        except _peers.PeerUnavailable as missing:
            raise NotImplementedError(str(missing)) from None
        runner.prepare()
        runner.run()  # compiles (Numba cache load, JAX jit) outside the timings
        _current["runners"][key] = runner
    return _current["runners"][key]


def free_inputs():
    """Drop the cached inputs and runners (and the memory they hold)."""
    _current.update(key=None, inputs=None, runners={})


class _KernelBenchmark:
    """Times one comparison's implementations; subclasses name the comparison."""

    comparison = None
    params = (SHAPES, DTYPES, IMPLEMENTATIONS)
    param_names = ["shape", "dtype", "implementation"]
    # One call per sample, with setup() (restoring the logits) before each.
    number = 1
    repeat = (3, 10, 30.0)
    timeout = 600

    def setup(self, shape, dtype, implementation):
        self.runner = _runner(_peers.COMPARISONS[self.comparison], shape, dtype,
                              implementation)
        self.runner.prepare()

    def teardown(self, shape, dtype, implementation):
        # Only this instance's reference: the next sample's setup() reuses the
        # cached arrays (see _current), which go with the parameter set.
        self.runner = None

    def time_kernel(self, shape, dtype, implementation):
        self.runner.run()


class CrossEntropy(_KernelBenchmark):
    """cross_entropy, forward only (mean over class targets)."""

    comparison = "cross_entropy"


class CrossEntropyWithGrad(_KernelBenchmark):
    """cross_entropy_with_grad(inplace=True): loss and gradient over the logits."""

    comparison = "cross_entropy_with_grad"


class CrossEntropySoftTargets(_KernelBenchmark):
    """cross_entropy_with_grad(inplace=True) with class-probability targets."""

    comparison = "cross_entropy_soft_targets"


class CrossEntropyWeighted(_KernelBenchmark):
    """cross_entropy_with_grad(inplace=True) with class weights."""

    comparison = "cross_entropy_weighted"


class CrossEntropyIgnoreIndex(_KernelBenchmark):
    """cross_entropy_with_grad(inplace=True) with 10% of the targets ignored."""

    comparison = "cross_entropy_ignore_index"


class CrossEntropyLabelSmoothing(_KernelBenchmark):
    """cross_entropy_with_grad(inplace=True, label_smoothing=0.1)."""

    comparison = "cross_entropy_label_smoothing"


class CrossEntropyZLoss(_KernelBenchmark):
    """cross_entropy_with_grad(inplace=True, z_loss=1e-4)."""

    comparison = "cross_entropy_z_loss"


class CrossEntropySoftcap(_KernelBenchmark):
    """cross_entropy_with_grad(inplace=True, softcap=30)."""

    comparison = "cross_entropy_softcap"


class CrossEntropyStats(_KernelBenchmark):
    """cross_entropy_with_grad(inplace=True, return_stats=True)."""

    comparison = "cross_entropy_stats"


class CrossEntropyLLM(_KernelBenchmark):
    """cross_entropy_with_grad(inplace=True) with logit_scale, softcap, z_loss, return_stats."""

    comparison = "cross_entropy_llm"


class NllLoss(_KernelBenchmark):
    """nll_loss of log-probabilities."""

    comparison = "nll_loss"


class LogSoftmax(_KernelBenchmark):
    """log_softmax into a new array."""

    comparison = "log_softmax"


class Softmax(_KernelBenchmark):
    """softmax into a new array."""

    comparison = "softmax"


class Logsumexp(_KernelBenchmark):
    """logsumexp of each row."""

    comparison = "logsumexp"


class BCEWithLogits(_KernelBenchmark):
    """binary_cross_entropy_with_logits, forward only."""

    comparison = "bce_with_logits"


class BCEWithLogitsWithGrad(_KernelBenchmark):
    """binary_cross_entropy_with_logits_with_grad(inplace=True)."""

    comparison = "bce_with_logits_with_grad"


class KLDivWithGrad(_KernelBenchmark):
    """kl_div_with_grad(reduction="batchmean", inplace=True)."""

    comparison = "kl_div_with_grad"


class BinaryCrossEntropyWithGrad(_KernelBenchmark):
    """binary_cross_entropy_with_grad(inplace=True) on probabilities."""

    comparison = "binary_cross_entropy_with_grad"


class SoftmaxBackward(_KernelBenchmark):
    """softmax_backward(inplace=True) against torch._softmax_backward_data."""

    comparison = "softmax_backward"


class LogSoftmaxBackward(_KernelBenchmark):
    """log_softmax_backward(inplace=True) against torch._log_softmax_backward_data."""

    comparison = "log_softmax_backward"


class CrossEntropyHVP(_KernelBenchmark):
    """cross_entropy_hvp(out=) against PyTorch's double backward."""

    comparison = "cross_entropy_hvp"


class MemoryLimitRatio:
    """fastxent's time over np.copyto's, per kernel: 1 is the memory-bandwidth limit.

    Both are timed in the same process, in alternating samples (median of
    :data:`RATIO_ROUNDS` each), so the ratio holds on a busy machine better
    than two separate time_ results do. Forward-only kernels and reductions
    read the array once and write nothing, so they can go below 1.
    """

    params = (list(_peers.COMPARISONS), SHAPES, DTYPES)
    param_names = ["kernel", "shape", "dtype"]
    unit = "ratio"
    timeout = 600

    def setup(self, kernel, shape, dtype):
        comparison = _peers.COMPARISONS[kernel]
        self.fastxent = _runner(comparison, shape, dtype, "fastxent")
        self.copyto = _runner(comparison, shape, dtype, "np.copyto")

    def teardown(self, kernel, shape, dtype):
        self.fastxent = self.copyto = None
        free_inputs()

    def track_fastxent_over_copyto(self, kernel, shape, dtype):
        number = {name: _bench.calibrate(runner, _bench.SAMPLE_SECONDS)
                  for name, runner in (("fastxent", self.fastxent), ("copyto", self.copyto))}
        fastxent_samples, copyto_samples = [], []
        for _ in range(RATIO_ROUNDS):
            fastxent_samples.append(_bench.time_sample(self.fastxent, number["fastxent"]))
            copyto_samples.append(_bench.time_sample(self.copyto, number["copyto"]))
        return float(np.median(fastxent_samples) / np.median(copyto_samples))


class SmallBatches:
    """Small batches of a 10-class classifier (:data:`fastxent._peers.SMALL_BATCH`):
    ``cross_entropy_with_grad`` against NumPy's textbook forward and gradient
    and PyTorch's forward + backward, the forward against NumPy's, and the
    ``CrossEntropyLoss`` object against the function. Calls take
    microseconds: asv times many per sample."""

    params = ([_peers.format_shape(s) for s in _peers.SMALL_BATCH_SHAPES], DTYPES,
              list(_peers.SMALL_BATCH))
    param_names = ["shape", "dtype", "implementation"]

    def setup(self, shape, dtype, implementation):
        n, c = _peers.parse_shape(shape)
        inputs = _peers.hard_target_inputs(n, c, np.dtype(dtype), np.random.default_rng(0))
        try:
            self.runner = _peers.SMALL_BATCH[implementation](inputs)
        except _peers.PeerUnavailable as missing:
            raise NotImplementedError(str(missing)) from None
        self.runner.run()  # compiles outside the timings

    def time_small_batch(self, shape, dtype, implementation):
        self.runner.run()


class SmallBatchRatio:
    """The small-batch table's ratios (:data:`fastxent._bench.SMALL_RATIOS`):
    the median over rounds of the ratio of two samples taken moments apart."""

    params = ([label for label, _, _ in _bench.SMALL_RATIOS],
              [_peers.format_shape(s) for s in _peers.SMALL_BATCH_SHAPES])
    param_names = ["ratio", "shape"]
    unit = "ratio"

    def setup(self, ratio, shape):
        _, numerator, denominator = next(r for r in _bench.SMALL_RATIOS if r[0] == ratio)
        n, c = _peers.parse_shape(shape)
        inputs = _peers.hard_target_inputs(n, c, np.dtype(np.float32), np.random.default_rng(0))
        try:
            self.runners = [_peers.SMALL_BATCH[label](inputs) for label in (numerator,
                                                                              denominator)]
        except _peers.PeerUnavailable as missing:
            raise NotImplementedError(str(missing)) from None
        for runner in self.runners:
            runner.run()

    def track_ratio(self, ratio, shape):
        numbers = [_bench.calibrate(r, _bench.SAMPLE_SECONDS) for r in self.runners]
        timings = [_bench.Timing([]), _bench.Timing([])]
        for _ in range(RATIO_ROUNDS):
            for timing, runner, number in zip(timings, self.runners, numbers):
                timing.samples.append(_bench.time_sample(runner, number))
        return timings[0].ratio_to(timings[1])


class HalfPrecision:
    """cross_entropy_with_grad(inplace=True) on bfloat16 and float16 logits
    (:data:`fastxent._peers.HALF`) beside the float32 kernel on the same
    values, ``np.copyto`` of the 16-bit array and PyTorch on bfloat16."""

    params = (["8x32000"] if _peers.small_shapes_requested()
              else [_peers.format_shape(s) for s in _peers.HALF_SHAPES], list(_peers.HALF))
    param_names = ["shape", "implementation"]
    number = 1
    repeat = (3, 10, 30.0)
    timeout = 600

    def setup(self, shape, implementation):
        n, c = _peers.parse_shape(shape)
        key = ("half", shape)
        if _current["key"] != key:
            free_inputs()
            _current["key"] = key
            _current["inputs"] = _peers.hard_target_inputs(n, c, np.dtype(np.float32),
                                                           np.random.default_rng(0))
        if implementation not in _current["runners"]:
            try:
                runner = _peers.HALF[implementation](_current["inputs"])
            except _peers.PeerUnavailable as missing:
                raise NotImplementedError(str(missing)) from None
            runner.prepare()
            runner.run()  # compiles outside the timings
            _current["runners"][implementation] = runner
        self.runner = _current["runners"][implementation]
        self.runner.prepare()

    def time_half(self, shape, implementation):
        self.runner.run()
