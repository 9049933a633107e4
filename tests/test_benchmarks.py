"""The benchmark machinery loads and runs: the asv suite and ``python -m fastxent bench``.

These tests never judge a timing (CI machines are noisy and shared); they
check that every benchmark is discoverable, that a quick asv run records
results, that the CLI prints its table, and that every peer computes what
fastxent computes (a peer that solves another problem makes its ratio
meaningless).
"""

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastxent import _bench, _peers
from tests import jacobian_parity, parity, reference as ref

ROOT = Path(__file__).resolve().parents[1]
ASV_DIR = ROOT / "asv_bench"
SMALL_SHAPE, DTYPE = "64x1000", "float32"  # one of the FASTXENT_BENCH_SMALL shapes


def _subprocess_env(home):
    env = dict(os.environ)
    env["FASTXENT_BENCH_SMALL"] = "1"
    # asv keeps its machine description in ~/.asv-machine.json: a private
    # HOME keeps the developer's own file out of the tests.
    env["HOME"] = str(home)
    # The suite imports fastxent: this checkout's, whichever one is installed
    # (asv drops PYTHONPATH and passes ASV_PYTHONPATH on as it).
    env["ASV_PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                          env.get("ASV_PYTHONPATH")]))
    return env


def _run(args, env, timeout=300):
    result = subprocess.run(args, cwd=ASV_DIR, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def asv_config(tmp_path_factory):
    """asv.conf.json with absolute paths and results, html and envs in a temporary dir."""
    pytest.importorskip("asv")
    from asv import util

    tmp = tmp_path_factory.mktemp("asv")
    conf = util.load_json(str(ASV_DIR / "asv.conf.json"), js_comments=True)
    conf.update(repo=str(ROOT), benchmark_dir=str(ASV_DIR / "benchmarks"),
                results_dir=str(tmp / "results"), html_dir=str(tmp / "html"),
                env_dir=str(tmp / "env"))
    path = tmp / "asv.conf.json"
    path.write_text(json.dumps(conf))
    return path


def test_asv_check_finds_no_problems(asv_config, tmp_path):
    result = _run([sys.executable, "-m", "asv", "check", "--python=same",
                   "--config", str(asv_config)], _subprocess_env(tmp_path))
    assert "No problems found" in result.stdout + result.stderr


def test_asv_quick_run_records_results(asv_config, tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("asv --set-commit-hash needs the git checkout")
    env = _subprocess_env(tmp_path)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    _run([sys.executable, "-m", "asv", "machine", "--yes", "--machine", "ci",
          "--config", str(asv_config)], env)
    # Every kernel's fastxent benchmark, every implementation of one kernel,
    # and one ratio, on one small shape: each parameter set costs asv a
    # process, so the whole grid would take minutes here.
    selection = [
        rf"time_kernel\('{SMALL_SHAPE}', '{DTYPE}', 'fastxent'\)",
        rf"CrossEntropyWithGrad\.time_kernel\('{SMALL_SHAPE}', '{DTYPE}'",
        rf"track_fastxent_over_copyto\('cross_entropy_with_grad', '{SMALL_SHAPE}', '{DTYPE}'\)",
    ]
    args = [sys.executable, "-m", "asv", "run", "--python=same", "--quick", "--show-stderr",
            "--machine", "ci", "--set-commit-hash", commit, "--config", str(asv_config)]
    for regex in selection:
        args += ["--bench", regex]
    _run(args, env)

    results_dir = json.loads(asv_config.read_text())["results_dir"]
    files = [p for p in Path(results_dir, "ci").glob("*.json") if p.name != "machine.json"]
    assert len(files) == 1
    results = json.loads(files[0].read_text())
    columns = results["result_columns"]
    recorded = {name: dict(zip(columns, row)) for name, row in results["results"].items()}

    kernel_classes = {name for name in recorded if name.endswith(".time_kernel")}
    assert len(kernel_classes) == len(_peers.COMPARISONS)
    for name in kernel_classes:
        params = recorded[name]["params"]
        values = recorded[name]["result"]
        combos = [(s, d, i) for s in params[0] for d in params[1] for i in params[2]]
        measured = dict(zip(combos, values))
        key = (repr(SMALL_SHAPE), repr(DTYPE), repr("fastxent"))
        assert measured[key] is not None and measured[key] > 0, name

    with_grad = recorded["kernels.CrossEntropyWithGrad.time_kernel"]
    params = with_grad["params"]
    combos = [(s, d, i) for s in params[0] for d in params[1] for i in params[2]]
    measured = dict(zip(combos, with_grad["result"]))
    for implementation in ("fastxent", "np.copyto", "numpy"):  # always installed
        key = (repr(SMALL_SHAPE), repr(DTYPE), repr(implementation))
        assert measured[key] is not None, implementation

    ratio = recorded["kernels.MemoryLimitRatio.track_fastxent_over_copyto"]
    assert any(value is not None and value > 0 for value in ratio["result"])


def test_cli_bench_quick_prints_its_table():
    result = subprocess.run([sys.executable, "-m", "fastxent", "bench", "--quick"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "cpu " in out and "numba threads" in out
    for label, _, _ in _bench.RATIOS:
        assert label in out
    for shape in _peers.QUICK_SHAPES:
        assert _peers.format_shape(shape) in out
    assert "/" in result.stderr and "[" in result.stderr  # the progress bar


def test_cli_info_names_the_vector_registers():
    from fastxent._fastmath import native_vector_bytes

    result = subprocess.run([sys.executable, "-m", "fastxent", "info"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines()
                if line.startswith("vector registers"))
    assert f"{native_vector_bytes() * 8} bits" in line


def test_cli_bench_options(capsys):
    import numba

    numba_threads = numba.get_num_threads()
    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch else None
    try:
        assert _bench.main(quick=True, rounds=1, shapes=["16x7"], dtype="float64",
                           threads=1) == 0
    finally:  # --threads resizes process-wide pools: give the other tests theirs back
        numba.set_num_threads(numba_threads)
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(torch_threads or torch.get_num_threads())
    out = capsys.readouterr().out
    assert "16x7" in out and "float64" in out and "numba threads    1" in out


def test_cli_bench_jacobian_section(capsys):
    """``--jacobian`` runs the softmax Jacobian table alone, with its ratios."""
    assert _bench.main(quick=True, rounds=1, shapes=["16x7"], jacobian=True) == 0
    out = capsys.readouterr().out
    assert "16x7" in out
    for label, _, _ in _bench.JACOBIAN_RATIOS:
        assert label in out
    assert "fwd/sum" not in out  # the main table did not run
    assert "--jacobian" in _bench.command_line(jacobian=True)


def test_cli_bench_half_section(capsys):
    """``--half`` runs the 16-bit table alone, with its ratios."""
    assert _bench.main(quick=True, rounds=1, shapes=["16x300"], half=True) == 0
    out = capsys.readouterr().out
    assert "16x300" in out
    for label, _, _ in _bench.HALF.ratios:
        assert label in out
    assert "fwd/sum" not in out
    assert "--half" in _bench.command_line(half=True)


def test_half_section_columns_compute_the_same_gradient():
    """The 16-bit columns and torch's bfloat16 one solve the float32
    column's problem (to the 16-bit types' precision)."""
    inputs = _peers.hard_target_inputs(16, 300, np.dtype(np.float32), np.random.default_rng(2))
    for label in ("bf16", "fp16", "f32", "torch bf16"):
        try:
            runner = _peers.HALF[label](inputs)
        except _peers.PeerUnavailable:
            continue
        x = {"bf16": "bfloat16", "fp16": "float16", "torch bf16": "bfloat16"}.get(label)
        x = inputs["x"] if x is None else _peers.half_logits(inputs, x)
        expected = ref.cross_entropy_with_grad(x.astype(np.float64), inputs["target"])
        runner.prepare()
        loss, grad = runner.run()
        if hasattr(grad, "detach"):
            loss, grad = loss.float().item(), grad.float().numpy()
        tol = 1e-5 if label != "torch bf16" else 1e-2
        np.testing.assert_allclose(float(loss), expected[0], rtol=tol, err_msg=label)
        np.testing.assert_allclose(np.asarray(grad, np.float64), expected[1], rtol=0,
                                   atol=np.abs(expected[1]).max() * 1e-2, err_msg=label)


def test_parse_shape():
    assert _peers.parse_shape("8192x32000") == (8192, 32000)
    assert _peers.format_shape((8192, 32000)) == "8192x32000"
    with pytest.raises(ValueError):
        _peers.parse_shape("8192")


class _ScriptedClock:
    """Stands in for ``time`` in ``_bench``: each run takes the next scripted
    duration, resets take none."""

    def __init__(self, durations):
        self.now, self.durations = 0.0, list(durations)

    def perf_counter(self):
        return self.now

    def run(self):
        self.now += self.durations.pop(0)


def test_a_sample_is_the_median_call_so_a_stalled_call_does_not_weigh(monkeypatch):
    clock = _ScriptedClock([1e-3, 7e-3, 1e-3, 1e-3, 2e-3])
    monkeypatch.setattr(_bench, "time", clock)
    resets = []
    runner = _peers.Runner(clock.run, reset=lambda: resets.append(clock.now))
    assert _bench.time_sample(runner, 5) == pytest.approx(1e-3)
    assert len(resets) == 5 and not clock.durations
    clock.durations = [4e-3, 1.0, 3e-3]
    assert _bench.calibrate(runner, 0.05) == 12  # 50 ms / the median 4 ms


def test_ratios_pair_the_samples_of_one_round_so_drift_between_rounds_cancels():
    """fastxent takes 1.2 times copyto's time in the rounds where the machine
    stays as it was: the table says 1.20. The machine slows down threefold
    from round 3 on, and copyto happened to be sampled slow three times,
    fastxent twice: the medians of the times (1.2 ms over 3 ms) would say
    0.40."""
    timings = {label: _bench.Timing([]) for label, _, _ in _bench.COLUMNS}
    timings["copyto"] = _bench.Timing([1e-3, 1e-3, 3e-3, 3e-3, 3e-3])
    timings["fastxent"] = _bench.Timing([1.2e-3, 1.2e-3, 3.6e-3, 3.6e-3, 1.2e-3])
    header, row = _bench.format_table({"8x8": timings})
    ratios = dict(zip([label for label, _, _ in _bench.RATIOS],
                      row.split()[-len(_bench.RATIOS):]))
    assert ratios["fastxent/copyto"] == "1.20"
    assert ratios["fwd/sum"] == "-" and ratios["torch/fastxent"] == "-"  # not measured
    assert math.isnan(_bench.Timing([1.0]).ratio_to(_bench.Timing([1.0, 2.0])))


def _seconds(cell):
    """A formatted time and half its last digit's unit (the rounding), or None for "-"."""
    if cell == "-":
        return None
    value, unit = cell.split()
    scale = {"s": 1.0, "ms": 1e-3, "us": 1e-6}[unit]
    decimals = len(value.split(".")[1]) if "." in value else 0
    return float(value) * scale, 0.5 * 10.0 ** -decimals * scale


def _pipe_table(lines, title):
    """The rows (lists of cells) of the Markdown table under heading ``## title``."""
    start = lines.index(f"## {title}") + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_markdown_holds_the_run_and_its_ratios_match_its_times(tmp_path):
    """A real run (one tiny shape per section, one round): the document has
    its banner, machine, both tables and the command; and in each row every
    ratio is the ratio of the two times printed beside it (with one round,
    the median of the rounds' ratios is that ratio), up to their rounding."""
    import io

    path = tmp_path / "docs" / "bench.md"
    stream = io.StringIO()
    assert _bench.main(quick=True, rounds=1, shapes=["16x7"], small_shapes=["8x5"],
                       markdown=path, stream=stream) == 0
    text = path.read_text()
    lines = text.splitlines()
    command = ("python -m fastxent bench --quick --rounds 1 --shapes 16x7 --small-shapes 8x5 "
               f"--markdown {path}")
    assert lines[0] == f"<!-- generated by `{command}`: do not edit by hand -->"
    assert lines[lines.index("## Command") + 3] == command
    machine = dict(row[:2] for row in _pipe_table(lines, "Machine")[2:])
    assert machine["cpu"] == _bench.cpu_model()
    assert machine["vector registers"] == _bench.register_description()
    assert machine["dtype, rounds"].startswith("float32, median of 1 ")
    assert f"wrote {path}" in stream.getvalue()

    for section, shape in ((_bench.MAIN, "16x7"), (_bench.SMALL, "8x5")):
        header, separator, *rows = _pipe_table(lines, section.title)
        assert header == ["shape"] + section.labels + [r[0] for r in section.ratios]
        assert set(separator) <= {"---", "---:"}
        assert [row[0] for row in rows] == [shape]
        cells = dict(zip(header, rows[0]))
        assert _seconds(cells["fastxent"]) is not None and _seconds(cells["fwd"]) is not None
        for label, numerator, denominator in section.ratios:
            top, bottom = _seconds(cells[numerator]), _seconds(cells[denominator])
            if top is None or bottom is None:  # a peer not installed
                assert cells[label] == "-"
                continue
            ratio = float(cells[label])
            low = (top[0] - top[1]) / (bottom[0] + bottom[1])
            high = (top[0] + top[1]) / (bottom[0] - bottom[1])
            assert low - 0.005 <= ratio <= high + 0.005, (label, cells)
        # The plain-text table printed the same numbers.
        assert " ".join(rows[0]).replace(" ", "") in stream.getvalue().replace(" ", "")


def test_markdown_table_shows_the_medians_and_the_rounds_ratios():
    """Times are medians over rounds, ratios the median of each round's
    ratio: fastxent's samples 2, 4, 3 ms against copyto's 1, 1, 2 ms give
    3.0 ms, 1.0 ms and 2.00 (the rounds' ratios 2, 4, 1.5), not the 3.00 of
    the medians."""
    timings = {label: _bench.Timing([]) for label in _bench.MAIN.labels}
    timings["fastxent"] = _bench.Timing([2e-3, 4e-3, 3e-3])
    timings["copyto"] = _bench.Timing([1e-3, 1e-3, 2e-3])
    timings["torch"] = _bench.Timing([], unavailable="PyTorch is not installed")
    document = _bench.markdown_document([("cpu", "a CPU")], [(_bench.MAIN, {"8x8": timings})],
                                        "python -m fastxent bench --markdown")
    lines = document.splitlines()
    header, _, row = _pipe_table(lines, "Main shapes")
    cells = dict(zip(header, row))
    assert cells["shape"] == "8x8"
    assert (cells["fastxent"], cells["copyto"], cells["fwd"]) == ("3.0 ms", "1.0 ms", "-")
    assert cells["fastxent/copyto"] == "2.00" and cells["torch/fastxent"] == "-"
    assert "- torch: skipped (PyTorch is not installed)" in lines
    assert _pipe_table(lines, "Machine")[2:] == [["cpu", "a CPU"]]


def _as_float64(value):
    if hasattr(value, "detach"):  # torch
        value = value.detach()
    return np.asarray(value, dtype=np.float64)


def _divergences():
    """tests/test_divergences (imported when used: it needs torch)."""
    from tests import test_divergences
    return test_divergences


#: What each comparison computes, from the tests' float64 reference: the
#: peers (NumPy's textbook formulas among them) are checked against it, never
#: used as a reference themselves.
EXPECTED = {
    "cross_entropy": lambda i: (ref.cross_entropy(i["x"], i["target"]),),
    "cross_entropy_with_grad": lambda i: ref.cross_entropy_with_grad(i["x"], i["target"]),
    "cross_entropy_soft_targets": lambda i: ref.cross_entropy_with_grad(i["x"], i["target"]),
    "cross_entropy_weighted": lambda i: ref.cross_entropy_with_grad(i["x"], i["target"],
                                                                    weight=i["weight"]),
    "cross_entropy_ignore_index": lambda i: ref.cross_entropy_with_grad(i["x"], i["target"]),
    "cross_entropy_label_smoothing": lambda i: ref.cross_entropy_with_grad(
        i["x"], i["target"], label_smoothing=_peers.LABEL_SMOOTHING),
    "cross_entropy_z_loss": lambda i: parity.torch_ce_z_loss(i["x"], i["target"],
                                                             z_loss=_peers.Z_LOSS),
    **{name: (lambda i, o=options: parity.torch_ce_options(
        i["x"], i["target"], **{k: v for k, v in o.items() if k != "return_stats"})[:2])
       for name, (_, options) in _peers.LLM_VARIANTS.items()},
    "nll_loss": lambda i: (ref.nll_loss(i["x"], i["target"]),),
    "log_softmax": lambda i: (ref.log_softmax(i["x"]),),
    "softmax": lambda i: (ref.softmax(i["x"]),),
    "logsumexp": lambda i: (ref.logsumexp(i["x"]),),
    "bce_with_logits": lambda i: ref.bce_with_logits_with_grad(i["x"], i["target"])[:1],
    "bce_with_logits_with_grad": lambda i: ref.bce_with_logits_with_grad(i["x"], i["target"]),
    # the softmax Jacobian family: the logits stand in for the incoming gradient
    "softmax_backward": lambda i: (jacobian_parity.torch_backward(
        i["x"], ref.softmax(i["x"]), -1, False),),
    "log_softmax_backward": lambda i: (jacobian_parity.torch_backward(
        i["x"], ref.log_softmax(i["x"]), -1, True),),
    "cross_entropy_hvp": lambda i: (jacobian_parity.torch_hvp(
        i["x"], i["target"], _peers.direction(i)),),
    # divergences on probabilities: torch's float64 autograd (tests/test_divergences)
    "kl_div_with_grad": lambda i: _divergences().torch_kl(i["x"], i["target"], "batchmean",
                                                          False, -1),
    "binary_cross_entropy_with_grad": lambda i: _divergences().torch_bce(
        i["x"], i["target"], None, "mean"),
}


def test_every_comparison_has_its_expected_results():
    assert set(EXPECTED) == set(_peers.COMPARISONS)


@pytest.mark.parametrize("name", list(_peers.COMPARISONS))
def test_every_implementation_computes_the_reference(name):
    """fastxent and each peer solve the comparison's problem (a peer that
    solves another problem makes its ratio meaningless)."""
    comparison = _peers.COMPARISONS[name]
    inputs = comparison.make_inputs(16, 7, np.dtype(np.float64), np.random.default_rng(1))
    expected = [np.asarray(e, dtype=np.float64) for e in EXPECTED[name](inputs)]
    checked = []
    for implementation in _peers.IMPLEMENTATIONS:
        try:
            runner = comparison.runner(implementation, inputs)
        except _peers.PeerUnavailable:
            continue
        runner.prepare()
        result = runner.run()
        result = result if isinstance(result, tuple) else (result,)
        assert len(result) == len(expected), implementation
        for theirs, wanted in zip(result, expected):
            np.testing.assert_allclose(_as_float64(theirs), wanted, rtol=1e-9, atol=1e-12,
                                       err_msg=f"{name}: {implementation}")
        checked.append(implementation)
    assert {"fastxent", "numpy"} <= set(checked)


# --------------------------------------------------------------------------
# The torch section (fastxent.torch inside a PyTorch graph)


def test_torch_section_prints_its_table():
    pytest.importorskip("torch")
    stream = io.StringIO()
    assert _bench.main(quick=True, rounds=1, shapes=["64x1000"], torch_section=True,
                       stream=stream) == 0
    out = stream.getvalue()
    for label in _bench.TORCH.labels + [label for label, _, _ in _bench.TORCH.ratios]:
        assert label in out
    assert "64x1000" in out and "MiB" in out


def test_torch_section_columns_compute_the_same_loss_and_gradient():
    torch = pytest.importorskip("torch")
    inputs = _peers.hard_target_inputs(64, 1000, np.dtype("float64"), np.random.default_rng(0))
    results = {}
    for label in ("fastxent", "inplace", "torch"):
        runner = _peers.TORCH_GRAPH[label](inputs)
        runner.prepare()
        loss, (grad,) = runner.run()
        results[label] = (loss.item(), grad.clone())
    for label in ("fastxent", "inplace"):
        assert results[label][0] == pytest.approx(results["torch"][0], rel=1e-12)
        torch.testing.assert_close(results[label][1], results["torch"][1], rtol=1e-10,
                                   atol=1e-14)
    for label in ("fastxent step", "torch step", "fastxent peak"):
        runner = _peers.TORCH_GRAPH[label](inputs)
        runner.prepare()
        assert runner.run() is not None


def test_cli_bench_dask_section():
    """``bench --dask --quick`` starts its clusters, checks the losses agree
    with the NumPy call's and prints its table."""
    result = subprocess.run([sys.executable, "-m", "fastxent", "bench", "--dask", "--quick"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for label in ("numpy call", "rows/128", "4 chunks of C", "rows/128 x 4 chunks of C",
                  "1 worker(s)", "2 worker(s)"):
        assert label in out, label


def test_cli_bench_distillation_section(capsys):
    """``--distillation`` runs the distillation table alone, with its three ratios."""
    from fastxent.__main__ import main

    assert main(["bench", "--distillation", "--shapes", "16x200", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "distillation 16x200 float32" in out
    for label in ("dense / copyto", "torch / dense", "top-k / cross-entropy"):
        assert label in out
