"""``python -m fastxent bench``: fastxent against the memory limit and its peers.

For each (N, C) shape it times, side by side in interleaved rounds:

* fastxent ``cross_entropy_with_grad(..., inplace=True)`` (the logits are
  restored from a pristine copy before each call, outside the timed region),
* fastxent forward-only ``cross_entropy``,
* the memory limit: ``np.copyto`` of the same array (one read, one write:
  the least an in-place loss-and-gradient can do) and ``x.sum(axis=-1)``
  (one read: the least a forward-only loss can do),
* the installed peers: PyTorch CPU forward + backward, the textbook NumPy
  loss and gradient, and JAX's jitted ``value_and_grad`` (see
  :mod:`fastxent._peers`, shared with the asv suite).

Each round times every implementation once (a sample: the median of calls
lasting about ``SAMPLE_SECONDS``), in a rotating order, after a short pause
(``COOLDOWN_SECONDS``), and the table reports medians over rounds; each
ratio is the median over rounds of the ratio of the two samples taken in
that round. On a busy machine only the ratios of one run mean anything:
they compare times taken moments apart.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import _peers

#: Rows of the table: (column label, comparison, implementation).
COLUMNS = (
    ("fastxent", "cross_entropy_with_grad", "fastxent"),
    ("fwd", "cross_entropy", "fastxent"),
    ("copyto", "cross_entropy_with_grad", "np.copyto"),
    ("sum", "cross_entropy", "x.sum"),
    ("torch", "cross_entropy_with_grad", "torch"),
    ("numpy", "cross_entropy_with_grad", "numpy"),
    ("jax", "cross_entropy_with_grad", "jax"),
)

#: Ratio columns: (label, numerator column, denominator column).
RATIOS = (
    ("fastxent/copyto", "fastxent", "copyto"),
    ("fwd/sum", "fwd", "sum"),
    ("torch/fastxent", "torch", "fastxent"),
    ("numpy/fastxent", "numpy", "fastxent"),
    ("jax/fastxent", "jax", "fastxent"),
)

DEFAULT_ROUNDS = 7
QUICK_ROUNDS = 3
#: Each timed sample repeats the call until it lasts at least this long, so
#: that sub-millisecond kernels are not measured at the timer's resolution.
SAMPLE_SECONDS = 0.05
QUICK_SAMPLE_SECONDS = 0.005
#: Pause before each sample. OpenMP and Eigen thread pools (PyTorch's, JAX's,
#: Numba's own) keep spinning for a while after a call; on a machine with
#: few cores the next implementation timed would share them with those
#: spinning threads. The pause lets each one run on a quiet machine, as it
#: does in a program that uses only it.
COOLDOWN_SECONDS = 0.1


class ProgressBar:
    """A one-line text progress bar on a stream (stderr): no dependency."""

    def __init__(self, total: int, stream=None, width: int = 30):
        self.total = max(total, 1)
        self.done = 0
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self._last_line_length = 0
        # Logs and pipes get a line per tenth of the way, not a \r-redrawn line.
        isatty = getattr(self.stream, "isatty", None)
        self.interactive = bool(isatty and isatty())
        self._last_tenth = -1

    def step(self, label: str = "") -> None:
        """Advance by one and redraw with ``label`` (what runs next)."""
        self.done = min(self.done + 1, self.total)
        self.show(label)

    def show(self, label: str = "") -> None:
        """Redraw the bar."""
        filled = int(self.width * self.done / self.total)
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] "
                f"{self.done}/{self.total} {label}")
        if not self.interactive:
            tenth = 10 * self.done // self.total
            if tenth != self._last_tenth:
                self._last_tenth = tenth
                self.stream.write(line + "\n")
                self.stream.flush()
            return
        # Pad over the previous line's tail: labels vary in length.
        padding = " " * max(0, self._last_line_length - len(line))
        self.stream.write("\r" + line + padding)
        self.stream.flush()
        self._last_line_length = len(line)

    def close(self) -> None:
        """Erase the bar so that the table starts on a clean line."""
        if not self.interactive:
            return
        self.stream.write("\r" + " " * self._last_line_length + "\r")
        self.stream.flush()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_header(dtype, rounds: int) -> List[str]:
    """Lines describing the machine and the libraries, printed above the table."""
    import numba

    import fastxent

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = "not started"
    lines = [
        f"cpu              {cpu_model()}",
        f"cores            {os.cpu_count()} logical, {usable} usable by this process",
        f"numba threads    {numba.get_num_threads()} (threading layer: {layer})",
        f"versions         fastxent {fastxent.__version__}, python {platform.python_version()}, "
        f"numpy {np.__version__}, numba {numba.__version__}",
    ]
    peers = []
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        peers.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    if "jax" in sys.modules:
        peers.append(f"jax {sys.modules['jax'].__version__}")
    lines.append(f"peers            {', '.join(peers) if peers else 'none installed'}")
    lines.append(f"dtype, rounds    {np.dtype(dtype).name}, median of {rounds} interleaved rounds")
    return lines


@dataclass
class Timing:
    """Seconds per call of one implementation, one sample per round."""

    samples: List[float]
    unavailable: Optional[str] = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    def ratio_to(self, other: "Timing") -> float:
        """Median over rounds of this sample over ``other``'s sample of the
        same round: samples of one round are taken moments apart, so a
        machine whose speed drifts from round to round (a shared machine's
        memory bandwidth does, by up to half) moves both alike."""
        if not self.samples or len(self.samples) != len(other.samples):
            return float("nan")
        return statistics.median(a / b for a, b in zip(self.samples, other.samples))


def time_sample(runner: _peers.Runner, number: int) -> float:
    """Median seconds per call over ``number`` calls, each after an untimed reset.

    The median, not the mean: with PyTorch's and JAX's thread pools loaded
    in the same process, a parallel call now and then waits milliseconds for
    a thread the OS scheduled away (seen on 2 cores: 3 calls of 12 taking 7
    ms where the rest took 0.3 ms), which a program using one library alone
    does not see.
    """
    times = []
    for _ in range(number):
        runner.prepare()
        start = time.perf_counter()
        runner.run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate(runner: _peers.Runner, sample_seconds: float) -> int:
    """Calls per sample so that a sample lasts about ``sample_seconds``.

    The first call (already made, as warm-up) compiled what needed compiling;
    these are timed.
    """
    typical = time_sample(runner, 3)
    return max(1, min(1000, int(sample_seconds / max(typical, 1e-9))))


def bench_shape(shape, dtype, rounds: int, sample_seconds: float, progress: ProgressBar,
                seed: int = 0, cooldown: float = COOLDOWN_SECONDS) -> Dict[str, Timing]:
    """Time every column of :data:`COLUMNS` on one shape; returns label -> Timing."""
    n, c = shape
    rng = np.random.default_rng(seed)
    # The forward and the in-place kernels read the same logits and targets.
    inputs = _peers.hard_target_inputs(n, c, dtype, rng)
    runners: Dict[str, _peers.Runner] = {}
    timings: Dict[str, Timing] = {}
    label_shape = _peers.format_shape(shape)
    for label, comparison, implementation in COLUMNS:
        progress.step(f"{label_shape} warm-up {label}")
        try:
            runner = _peers.COMPARISONS[comparison].runner(implementation, inputs)
            runner.prepare()
            runner.run()  # compiles (Numba, JAX), starts thread pools
        except _peers.PeerUnavailable as missing:
            timings[label] = Timing([], unavailable=str(missing))
            continue
        runners[label] = runner
        timings[label] = Timing([])
    numbers = {label: calibrate(runner, sample_seconds) for label, runner in runners.items()}
    labels = list(runners)
    for round_index in range(rounds):
        # Rotating the order spreads any drift of the machine over all columns.
        shift = round_index % max(len(labels), 1)
        for label in labels[shift:] + labels[:shift]:
            progress.step(f"{label_shape} round {round_index + 1}/{rounds} {label}")
            time.sleep(cooldown)
            timings[label].samples.append(time_sample(runners[label], numbers[label]))
    for _ in range(len(COLUMNS) * rounds - len(labels) * rounds):
        progress.step(label_shape)  # the unavailable peers' share of the bar
    return timings


def _format_time(seconds: float) -> str:
    if seconds != seconds:  # nan: not measured
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def format_table(results: Dict[str, Dict[str, Timing]]) -> List[str]:
    """Times (medians over rounds) and ratios (medians of the rounds'
    ratios), one line per shape."""
    time_labels = [label for label, _, _ in COLUMNS]
    ratio_labels = [label for label, _, _ in RATIOS]
    header = ["shape"] + time_labels + ratio_labels
    rows = []
    for shape, timings in results.items():
        medians = {label: timings[label].median for label in time_labels}
        row = [shape] + [_format_time(medians[label]) for label in time_labels]
        for _, numerator, denominator in RATIOS:
            ratio = timings[numerator].ratio_to(timings[denominator])
            row.append("-" if ratio != ratio else f"{ratio:.2f}")
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in
                       enumerate(zip(header, widths)))]
    for row in rows:
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in
                               enumerate(zip(row, widths))))
    return lines


def legend(results: Dict[str, Dict[str, Timing]]) -> List[str]:
    """What the columns mean, and which peers were skipped."""
    lines = [
        "fastxent: cross_entropy_with_grad(inplace=True); fwd: cross_entropy; "
        "copyto: np.copyto of the logits;",
        "sum: x.sum(axis=-1); torch: F.cross_entropy + backward(); numpy: log-softmax, "
        "gather, softmax - one-hot;",
        "jax: jit(value_and_grad). Times are medians per call; ratios are medians of each "
        "round's ratio;",
        "a ratio below 1 means the numerator is faster.",
    ]
    skipped = {label: t.unavailable for timings in results.values()
               for label, t in timings.items() if t.unavailable}
    for label, why in skipped.items():
        lines.append(f"{label}: skipped ({why})")
    return lines


def main(quick: bool = False, rounds: Optional[int] = None,
         shapes: Optional[Sequence[str]] = None, dtype: str = "float32",
         threads: Optional[int] = None, stream=None) -> int:
    """Run the benchmark and print the machine header and the table.

    Parameters
    ----------
    quick : bool
        Small shapes (:data:`fastxent._peers.QUICK_SHAPES`), few rounds,
        short samples: well under a minute.
    rounds : int, optional
        Interleaved rounds; the table reports the median over them.
    shapes : sequence of str, optional
        ``"NxC"`` shapes, overriding the defaults.
    dtype : {"float32", "float64"}
        Dtype of the logits.
    threads : int, optional
        Threads for Numba and PyTorch (default: their own defaults).
        XLA's pool is not resized: set ``XLA_FLAGS`` before starting.
    stream : file, optional
        Where the table goes (stdout by default); the progress bar goes to stderr.

    Returns
    -------
    int
        The exit status (0).
    """
    import numba

    stream = sys.stdout if stream is None else stream
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise SystemExit(f"--dtype must be float32 or float64, not {dtype}")
    if threads is not None:
        if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
            raise SystemExit(f"--threads must be between 1 and "
                             f"{numba.config.NUMBA_NUM_THREADS} (NUMBA_NUM_THREADS)")
        numba.set_num_threads(threads)
        try:
            _peers._torch()[0].set_num_threads(threads)
        except _peers.PeerUnavailable:
            pass
    if shapes:
        try:
            shape_list = [_peers.parse_shape(s) for s in shapes]
        except ValueError as error:
            raise SystemExit(str(error)) from None
    else:
        shape_list = list(_peers.QUICK_SHAPES if quick else _peers.MAIN_SHAPES)
    if rounds is None:
        rounds = QUICK_ROUNDS if quick else DEFAULT_ROUNDS
    if rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, not {rounds}")
    sample_seconds = QUICK_SAMPLE_SECONDS if quick else SAMPLE_SECONDS

    progress = ProgressBar(len(shape_list) * len(COLUMNS) * (rounds + 1))
    results: Dict[str, Dict[str, Timing]] = {}
    start = time.perf_counter()
    try:
        for shape in shape_list:
            results[_peers.format_shape(shape)] = bench_shape(
                shape, dtype, rounds, sample_seconds, progress,
                cooldown=0.0 if quick else COOLDOWN_SECONDS)
    finally:
        progress.close()
    print("\n".join(machine_header(dtype, rounds)), file=stream)
    print(file=stream)
    print("\n".join(format_table(results)), file=stream)
    print(file=stream)
    print("\n".join(legend(results)), file=stream)
    print(f"({time.perf_counter() - start:.0f} s)", file=stream)
    return 0
