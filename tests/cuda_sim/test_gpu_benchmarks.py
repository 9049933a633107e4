"""The GPU asv benchmarks (asv_bench/benchmarks/gpu.py) run, under the simulator.

On CI's machines without a GPU asv skips them (n/a); here their code runs
on a tiny shape, and the timed fastxent call is checked for its result.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "asv_bench"))
from benchmarks import gpu  # noqa: E402

SHAPE = "4x48"


def test_fastxent_benchmark_computes_the_gradient_in_place():
    bench = gpu.GpuCrossEntropyWithGrad()
    bench.setup(SHAPE, "fastxent")
    x = bench.inputs.pristine.copy_to_host().astype(np.float64)
    y = bench.inputs.target.copy_to_host()
    bench.time_kernel(SHAPE, "fastxent")
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    np.testing.assert_allclose(bench.inputs.logits.copy_to_host(), p / len(y), atol=1e-7)


def test_copy_benchmark_restores_the_logits():
    bench = gpu.GpuCrossEntropyWithGrad()
    bench.setup(SHAPE, "copy")
    bench.inputs.logits.copy_to_device(np.zeros((4, 48), np.float32))
    bench.time_kernel(SHAPE, "copy")
    np.testing.assert_array_equal(bench.inputs.logits.copy_to_host(),
                                  bench.inputs.pristine.copy_to_host())


def test_torch_benchmark_is_skipped_without_a_cuda_torch():
    torch = pytest.importorskip("torch")
    assert not torch.cuda.is_available()
    with pytest.raises(NotImplementedError):
        gpu.GpuCrossEntropyWithGrad().setup(SHAPE, "torch")


def test_theoretical_bandwidth_of_an_h100_sxm():
    class H100:  # the attributes numba-cuda reads from the driver
        MEMORY_CLOCK_RATE = 2_619_000  # kHz
        GLOBAL_MEMORY_BUS_WIDTH = 5120  # bits

    assert gpu.theoretical_bandwidth(H100()) == pytest.approx(3.352e12, rel=1e-3)
