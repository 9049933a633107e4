"""``python -m fastxent bench``: fastxent against the memory limit and its peers.

Three sections, each a table of times (and, in ``torch``, peak memory) and ratios:

``main`` (per (N, C) shape)
    fastxent ``cross_entropy_with_grad(..., inplace=True)`` (the logits are
    restored from a pristine copy before each call, outside the timed
    region) and the forward-only ``cross_entropy``; the memory limit,
    ``np.copyto`` of the same array (one read, one write: the least an
    in-place loss-and-gradient can do) and ``x.sum(axis=-1)`` (one read: the
    least a forward-only loss can do); the installed peers: PyTorch CPU
    forward + backward, the textbook NumPy loss and gradient, and JAX's
    jitted ``value_and_grad`` (see :mod:`fastxent._peers`, shared with the
    asv suite).
``small`` (small batches of a 10-class classifier)
    ``cross_entropy_with_grad`` against NumPy's textbook forward and
    gradient and PyTorch's forward + ``backward()``, ``cross_entropy``
    against NumPy's forward, and the ``CrossEntropyLoss`` object's call and
    ``backward()`` against the function: there the time per call is mostly
    the work done in Python around the kernel.
``torch`` (``fastxent.torch`` inside a PyTorch graph; ``--torch`` alone)
    ``fastxent.torch.cross_entropy`` (also with ``inplace_backward=True``)
    against ``F.cross_entropy`` on logits an ``nn.Linear`` made: the loss's
    forward and backward down to the logits, the whole step
    (``loss.backward()`` into the layer), and the step's peak resident
    memory (Linux's high-water mark, reset before each step).

Each round times every implementation once (a sample: the median of calls
lasting about ``SAMPLE_SECONDS``), in a rotating order, after a short pause
(``COOLDOWN_SECONDS``), and the table reports medians over rounds; each
ratio is the median over rounds of the ratio of the two samples taken in
that round. On a busy machine only the ratios of one run mean anything:
they compare times taken moments apart.

``--markdown [PATH]`` also writes the run as a Markdown document
(``docs/benchmarks.md`` by default): the machine, the tables, the legend
and the command that produced it.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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

#: The small-batch section's ratio columns (its time columns are
#: :data:`fastxent._peers.SMALL_BATCH`).
SMALL_RATIOS = (
    ("numpy/fastxent", "numpy", "fastxent"),
    ("torch/fastxent", "torch", "fastxent"),
    ("numpy fwd/fwd", "numpy fwd", "fwd"),
    ("object/fastxent", "object", "fastxent"),
)

#: Where ``--markdown`` writes when given no path.
DEFAULT_MARKDOWN = "docs/benchmarks.md"

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


def register_description() -> str:
    """The vector registers the CPU kernels are compiled for, e.g. ``512 bits (AVX-512)``."""
    from ._fastmath import native_vector_bytes

    size = native_vector_bytes()
    name = {64: "AVX-512", 32: "AVX2, no AVX-512"}.get(size, "SSE or NEON")
    return f"{size * 8} bits ({name})"


def _memory() -> str:
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            kib = int(meminfo.readline().split()[1])
        return f"{kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def machine_facts(dtype, rounds: int) -> List[Tuple[str, str]]:
    """(what, value) pairs describing the machine and the libraries."""
    import numba

    import fastxent

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    threads = numba.get_num_threads()  # starts the thread pool, if not yet started
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = "not started"
    facts = [
        ("cpu", cpu_model()),
        ("vector registers", register_description()),
        ("cores", f"{os.cpu_count()} logical, {usable} usable by this process"),
        ("memory", _memory()),
        ("numba threads", f"{threads} (threading layer: {layer})"),
        ("versions", f"fastxent {fastxent.__version__}, python {platform.python_version()}, "
                     f"numpy {np.__version__}, numba {numba.__version__}"),
    ]
    peers = []
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        peers.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    if "jax" in sys.modules:
        peers.append(f"jax {sys.modules['jax'].__version__}")
    facts.append(("peers", ", ".join(peers) if peers else "none installed"))
    facts.append(("dtype, rounds",
                  f"{np.dtype(dtype).name}, median of {rounds} interleaved rounds"))
    return facts


def machine_header(dtype, rounds: int) -> List[str]:
    """Lines describing the machine and the libraries, printed above the table."""
    return [f"{what:<16} {value}" for what, value in machine_facts(dtype, rounds)]


@dataclass
class Timing:
    """Seconds per call of one implementation, one sample per round."""

    samples: List[float]
    unavailable: Optional[str] = None
    #: ``"s"`` for times; ``"B"`` for the torch section's peak memory.
    unit: str = "s"

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    def ratio_to(self, other: "Timing") -> float:
        """Median over rounds of this sample over ``other``'s sample of the
        same round: samples of one round are taken moments apart, so a
        machine whose speed drifts from round to round (a shared machine's
        memory bandwidth does, by up to half) moves both alike."""
        if (not self.samples or len(self.samples) != len(other.samples)
                or 0 in other.samples):
            return float("nan")
        return statistics.median(a / b for a, b in zip(self.samples, other.samples))


def time_sample(runner: _peers.Runner, number: int) -> float:
    """Median seconds per call over ``number`` calls, each after an untimed reset.

    The median, not the mean: with PyTorch's and JAX's thread pools loaded
    in the same process, a parallel call now and then waits milliseconds for
    a thread the OS scheduled away, which a program using one library alone
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


#: A column: its label and ``builder(inputs) -> Runner``.
Column = Tuple[str, Callable[[Dict[str, np.ndarray]], _peers.Runner]]


@dataclass(frozen=True)
class Section:
    """One table of the benchmark: its columns, ratios and legend."""

    name: str
    title: str
    columns: Tuple[Column, ...]
    ratios: Tuple[Tuple[str, str, str], ...]
    legend: Tuple[str, ...]

    @property
    def labels(self) -> List[str]:
        return [label for label, _ in self.columns]


def _comparison_column(label, comparison, implementation):
    return label, lambda inputs: _peers.COMPARISONS[comparison].runner(implementation, inputs)


MAIN = Section(
    "main", "Main shapes",
    tuple(_comparison_column(*column) for column in COLUMNS), RATIOS,
    ("fastxent: cross_entropy_with_grad(inplace=True); fwd: cross_entropy.",
     "copyto: np.copyto of the logits; sum: x.sum(axis=-1) (the memory limits).",
     "torch: F.cross_entropy + backward(); numpy: log-softmax, gather, softmax - one-hot; "
     "jax: jit(value_and_grad)."))

SMALL = Section(
    "small", "Small batches",
    tuple(_peers.SMALL_BATCH.items()), SMALL_RATIOS,
    ("fastxent: cross_entropy_with_grad (a new gradient); numpy: the textbook forward and "
     "gradient; torch: F.cross_entropy + backward().",
     "fwd: cross_entropy; numpy fwd: the textbook forward.",
     "object: CrossEntropyLoss()(logits, target) then backward()."))

TORCH = Section(
    "torch", "Inside a PyTorch graph (fastxent.torch)",
    tuple(_peers.TORCH_GRAPH.items()),
    (("torch/fastxent", "torch", "fastxent"), ("torch/inplace", "torch", "inplace"),
     ("step torch/fastxent", "torch step", "fastxent step"),
     ("step torch/inplace", "torch step", "inplace step"),
     ("peak torch/fastxent", "torch peak", "fastxent peak"),
     ("peak torch/inplace", "torch peak", "inplace peak")),
    ("fastxent: fastxent.torch.cross_entropy; inplace: the same with inplace_backward=True; "
     "torch: F.cross_entropy.",
     "fastxent, inplace, torch: the loss's forward and backward down to d loss / d logits, "
     f"on logits an nn.Linear({_peers.TORCH_GRAPH_FEATURES}, C) made (untimed).",
     "step: linear(h), the loss, loss.backward() into the layer's parameters.",
     "peak: resident memory the step added at its peak (Linux VmHWM), one step per round; "
     "the gradient buffer fastxent.torch keeps between steps counts as the step's."))

#: The softmax Jacobian family's section (``--jacobian``): the backward of
#: softmax and log_softmax in place, the cross-entropy HVP into ``out=``.
JACOBIAN_COLUMNS = (
    ("sm_bw", "softmax_backward", "fastxent"),
    ("lsm_bw", "log_softmax_backward", "fastxent"),
    ("hvp", "cross_entropy_hvp", "fastxent"),
    ("copyto", "softmax_backward", "np.copyto"),
    ("torch sm_bw", "softmax_backward", "torch"),
    ("torch lsm_bw", "log_softmax_backward", "torch"),
    ("torch hvp", "cross_entropy_hvp", "torch"),
    ("numpy hvp", "cross_entropy_hvp", "numpy"),
)
JACOBIAN_RATIOS = (
    ("sm_bw/copyto", "sm_bw", "copyto"),
    ("lsm_bw/copyto", "lsm_bw", "copyto"),
    ("hvp/copyto", "hvp", "copyto"),
    ("torch/sm_bw", "torch sm_bw", "sm_bw"),
    ("torch/lsm_bw", "torch lsm_bw", "lsm_bw"),
    ("torch/hvp", "torch hvp", "hvp"),
    ("numpy/hvp", "numpy hvp", "hvp"),
)
#: Its default shapes: an LLM vocabulary at two batch sizes.
JACOBIAN_SHAPES = ((8192, 32000), (1024, 32000))

JACOBIAN = Section(
    "jacobian", "The softmax Jacobian",
    tuple(_comparison_column(*column) for column in JACOBIAN_COLUMNS), JACOBIAN_RATIOS,
    ("sm_bw, lsm_bw: softmax_backward / log_softmax_backward(inplace=True), the logits as "
     "the incoming gradient; hvp: cross_entropy_hvp(out=) of the mean cross-entropy.",
     "copyto: np.copyto of the logits (the memory limit).",
     "torch sm_bw, lsm_bw: torch._softmax_backward_data / _log_softmax_backward_data; "
     "torch hvp: double backward (autograd.grad with create_graph, then autograd.grad); "
     "numpy hvp: softmax, then p v - p (p . v)."))

#: The 16-bit section (``--half``): float32 logits in, the 16-bit columns
#: on bfloat16 and float16 copies of them.
HALF = Section(
    "half", "16-bit logits",
    tuple(_peers.HALF.items()),
    (("bf16/copyto", "bf16", "copyto bf16"), ("fp16/copyto", "fp16", "copyto fp16"),
     ("bf16/f32", "bf16", "f32"), ("fp16/f32", "fp16", "f32"),
     ("bf16/pass", "bf16", "pass 16"), ("f32/pass", "f32", "pass f32"),
     ("torch/bf16", "torch bf16", "bf16")),
    ("bf16, fp16, f32: cross_entropy_with_grad(inplace=True) on bfloat16, float16 and "
     "float32 logits of the same values.",
     "copyto bf16, fp16: np.copyto of the 16-bit logits (the memory limit).",
     "pass 16, pass f32: a Numba prange loop that reads and writes each element of the "
     "16-bit / float32 logits once, by the kernels' threads (their memory floor).",
     "torch bf16: F.cross_entropy + backward() on a bfloat16 tensor."))

SECTIONS = {section.name: section for section in (MAIN, SMALL, TORCH, JACOBIAN, HALF)}


def bench_shape(shape, dtype, rounds: int, sample_seconds: float, progress: ProgressBar,
                seed: int = 0, cooldown: float = COOLDOWN_SECONDS,
                section: Section = MAIN) -> Dict[str, Timing]:
    """Time every column of ``section`` on one shape; returns label -> Timing."""
    n, c = shape
    rng = np.random.default_rng(seed)
    # Every column reads the same logits and targets.
    inputs = _peers.hard_target_inputs(n, c, dtype, rng)
    runners: Dict[str, _peers.Runner] = {}
    timings: Dict[str, Timing] = {}
    label_shape = _peers.format_shape(shape)
    for label, build in section.columns:
        progress.step(f"{label_shape} warm-up {label}")
        try:
            runner = build(inputs)
            runner.prepare()
            runner.run()  # compiles (Numba, JAX), starts thread pools
        except _peers.PeerUnavailable as missing:
            timings[label] = Timing([], unavailable=str(missing))
            continue
        runners[label] = runner
        timings[label] = Timing([], unit=runner.unit)
    numbers = {label: calibrate(runner, sample_seconds) for label, runner in runners.items()
               if runner.unit == "s"}
    labels = list(runners)
    for round_index in range(rounds):
        # Rotating the order spreads any drift of the machine over all columns.
        shift = round_index % max(len(labels), 1)
        for label in labels[shift:] + labels[:shift]:
            progress.step(f"{label_shape} round {round_index + 1}/{rounds} {label}")
            time.sleep(cooldown)
            timings[label].samples.append(_sample(runners[label], numbers.get(label)))
    for _ in range(len(section.columns) * rounds - len(labels) * rounds):
        progress.step(label_shape)  # the unavailable peers' share of the bar
    return timings


def _sample(runner: _peers.Runner, number: Optional[int]) -> float:
    """A time (seconds per call), or for a measuring runner its measurement."""
    if runner.unit == "s":
        return time_sample(runner, number)
    runner.prepare()
    return float(runner.run())


def _format_bytes(size: float) -> str:
    if size != size:  # nan: not measured
        return "-"
    if size >= 2**30:
        return f"{size / 2**30:.2f} GiB"
    return f"{size / 2**20:.0f} MiB"


def _format_time(seconds: float) -> str:
    if seconds != seconds:  # nan: not measured
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    if seconds >= 1e-5:
        return f"{seconds * 1e6:.0f} us"
    return f"{seconds * 1e6:.1f} us"


def table_rows(results: Dict[str, Dict[str, Timing]], section: Section = MAIN
               ) -> List[List[str]]:
    """The header and one row per shape: times (medians over rounds) and
    ratios (medians of the rounds' ratios), formatted."""
    labels = section.labels
    rows = [["shape"] + labels + [label for label, _, _ in section.ratios]]
    for shape, timings in results.items():
        row = [shape] + [(_format_time if timings[label].unit == "s" else _format_bytes)(
            timings[label].median) for label in labels]
        for _, numerator, denominator in section.ratios:
            ratio = timings[numerator].ratio_to(timings[denominator])
            row.append("-" if ratio != ratio else f"{ratio:.2f}")
        rows.append(row)
    return rows


def format_table(results: Dict[str, Dict[str, Timing]], section: Section = MAIN) -> List[str]:
    """The table as aligned plain text, one line per shape after the header."""
    rows = table_rows(results, section)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in
                      enumerate(zip(row, widths))) for row in rows]


def markdown_table(results: Dict[str, Dict[str, Timing]], section: Section = MAIN) -> List[str]:
    """The table as a Markdown pipe table."""
    rows = table_rows(results, section)
    lines = ["| " + " | ".join(rows[0]) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return lines


_COMMON_LEGEND = ("Times are medians per call over the rounds; each ratio is the median of "
                  "the rounds' ratios.",
                  "A ratio below 1 means the numerator is faster.")


def legend(results: Dict[str, Dict[str, Timing]], section: Section = MAIN) -> List[str]:
    """What the columns mean, and which peers were skipped."""
    lines = list(section.legend)
    skipped = {label: t.unavailable for timings in results.values()
               for label, t in timings.items() if t.unavailable}
    for label, why in skipped.items():
        lines.append(f"{label}: skipped ({why})")
    return lines


def markdown_document(facts: Sequence[Tuple[str, str]],
                      tables: Sequence[Tuple[Section, Dict[str, Dict[str, Timing]]]],
                      command: str) -> str:
    """A run as Markdown: banner, machine, one table per section with its
    legend, and the command that produced it."""
    lines = [f"<!-- generated by `{command}`: do not edit by hand -->",
             "# fastxent benchmarks", "",
             f"Generated by `{command}`; do not edit by hand: rerun the command to update it.",
             "", "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {what} | {value} |" for what, value in facts]
    for section, results in tables:
        lines += ["", f"## {section.title}", ""]
        lines += markdown_table(results, section)
        lines.append("")
        lines += [f"- {line}" for line in legend(results, section)]
    lines += ["", "## Legend", ""] + [f"- {line}" for line in _COMMON_LEGEND]
    lines += ["", "## Command", "", "```", command, "```", ""]
    return "\n".join(lines)


def command_line(quick=False, rounds=None, shapes=None, dtype="float32", threads=None,
                 small=False, small_shapes=None, markdown=None, torch_section=False,
                 jacobian=False, half=False) -> str:
    """The ``python -m fastxent bench`` command line of these arguments."""
    args = ["python", "-m", "fastxent", "bench"]
    args += ["--quick"] if quick else []
    args += ["--small"] if small else []
    args += ["--torch"] if torch_section else []
    args += ["--jacobian"] if jacobian else []
    args += ["--half"] if half else []
    args += ["--rounds", str(rounds)] if rounds is not None else []
    args += ["--shapes", *shapes] if shapes else []
    args += ["--small-shapes", *small_shapes] if small_shapes else []
    args += ["--dtype", str(np.dtype(dtype))] if np.dtype(dtype) != np.float32 else []
    args += ["--threads", str(threads)] if threads is not None else []
    if markdown is not None:
        args += ["--markdown"] + ([] if str(markdown) == DEFAULT_MARKDOWN else [str(markdown)])
    return shlex.join(args)


def _shapes(texts):
    try:
        return [_peers.parse_shape(s) for s in texts]
    except ValueError as error:
        raise SystemExit(str(error)) from None


def main(quick: bool = False, rounds: Optional[int] = None,
         shapes: Optional[Sequence[str]] = None, dtype: str = "float32",
         threads: Optional[int] = None, stream=None, small: bool = False,
         small_shapes: Optional[Sequence[str]] = None, markdown=None,
         command: Optional[str] = None, torch_section: bool = False,
         jacobian: bool = False, half: bool = False) -> int:
    """Run the benchmark and print the machine header and the tables.

    Parameters
    ----------
    quick : bool
        Small shapes (:data:`fastxent._peers.QUICK_SHAPES`), few rounds,
        short samples: well under a minute.
    rounds : int, optional
        Interleaved rounds; the tables report the median over them.
    shapes : sequence of str, optional
        ``"NxC"`` shapes of the main section, overriding the defaults; given
        alone, the main section runs alone. With ``small``, the small
        section's shapes.
    dtype : {"float32", "float64"}
        Dtype of the logits.
    threads : int, optional
        Threads for Numba and PyTorch (default: their own defaults).
        XLA's pool is not resized: set ``XLA_FLAGS`` before starting.
    stream : file, optional
        Where the tables go (stdout by default); the progress bar goes to stderr.
    small : bool
        Run only the small-batch section.
    small_shapes : sequence of str, optional
        Shapes of the small-batch section (default
        :data:`fastxent._peers.SMALL_BATCH_SHAPES`); given, the section runs.
    markdown : str or path, optional
        Also write the run as Markdown there (``--markdown``).
    command : str, optional
        The command line to record in the Markdown (default: rebuilt from
        these arguments).
    torch_section : bool
        Run only the torch section (``fastxent.torch`` inside a PyTorch
        graph), on ``shapes`` if given. A full run (no ``shapes``, not
        ``small``) includes it.
    jacobian : bool
        Run only the softmax Jacobian section (``shapes`` its shapes, default
        :data:`JACOBIAN_SHAPES`; with ``quick``, a 16th of their rows).
    half : bool
        Run only the 16-bit section (``shapes`` its shapes, default
        :data:`fastxent._peers.HALF_SHAPES`; with ``quick``, a 32nd of their
        rows), float32 logits and their bfloat16 and float16 copies.

    Returns
    -------
    int
        The exit status (0).
    """
    import numba

    stream = sys.stdout if stream is None else stream
    if command is None:
        command = command_line(quick, rounds, shapes, dtype, threads, small, small_shapes,
                               markdown, torch_section, jacobian, half)
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
    plan: List[Tuple[Section, list]] = []
    torch_shapes = list(_peers.TORCH_GRAPH_QUICK_SHAPES if quick else _peers.TORCH_GRAPH_SHAPES)
    if half:
        plan.append((HALF, _shapes(shapes) if shapes else
                     [(n // 32 if quick else n, c) for n, c in _peers.HALF_SHAPES]))
    elif jacobian:
        plan.append((JACOBIAN, _shapes(shapes) if shapes else
                     [(n // 16 if quick else n, c) for n, c in JACOBIAN_SHAPES]))
    elif torch_section:
        plan.append((TORCH, _shapes(shapes) if shapes else torch_shapes))
    elif small:
        plan.append((SMALL, _shapes(small_shapes or shapes or [])
                     or list(_peers.SMALL_BATCH_SHAPES)))
    else:
        plan.append((MAIN, _shapes(shapes) if shapes else
                     list(_peers.QUICK_SHAPES if quick else _peers.MAIN_SHAPES)))
        if small_shapes or not shapes:
            plan.append((SMALL, _shapes(small_shapes or [])
                         or list(_peers.SMALL_BATCH_SHAPES)))
        if not shapes and not small_shapes:
            plan.append((TORCH, torch_shapes))
    if rounds is None:
        rounds = QUICK_ROUNDS if quick else DEFAULT_ROUNDS
    if rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, not {rounds}")
    sample_seconds = QUICK_SAMPLE_SECONDS if quick else SAMPLE_SECONDS

    progress = ProgressBar(sum(len(shape_list) * len(section.columns) * (rounds + 1)
                               for section, shape_list in plan))
    tables: List[Tuple[Section, Dict[str, Dict[str, Timing]]]] = []
    start = time.perf_counter()
    try:
        for section, shape_list in plan:
            results: Dict[str, Dict[str, Timing]] = {}
            for shape in shape_list:
                results[_peers.format_shape(shape)] = bench_shape(
                    shape, dtype, rounds, sample_seconds, progress,
                    cooldown=0.0 if quick else COOLDOWN_SECONDS, section=section)
            tables.append((section, results))
    finally:
        progress.close()
    print("\n".join(machine_header(dtype, rounds)), file=stream)
    for section, results in tables:
        print(file=stream)
        if len(tables) > 1:
            print(f"{section.title.lower()}:", file=stream)
        print("\n".join(format_table(results, section)), file=stream)
        print(file=stream)
        print("\n".join(legend(results, section)), file=stream)
    print("\n".join(_COMMON_LEGEND), file=stream)
    if markdown is not None:
        path = Path(markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown_document(machine_facts(dtype, rounds), tables, command),
                        encoding="utf-8")
        print(f"wrote {path}", file=stream)
    print(f"({time.perf_counter() - start:.0f} s)", file=stream)
    return 0
