"""Launch decisions of the GPU row kernels, without a GPU.

``plan_row_launch`` is pure (sizes and limits in, geometry out). The opt-in
to more than 48 KiB of shared memory per block and its fallbacks are run
against stand-ins for the compiled kernel and the driver call, so this checks
fastxent's logic (what is asked, once, and what happens on a refusal), not
the driver: that needs a GPU (see the README).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from numba import config

if config.ENABLE_CUDASIM:  # pragma: no cover
    pytest.fail("test_cuda_launch.py needs the real numba-cuda: unset NUMBA_ENABLE_CUDASIM",
                pytrace=False)

from numba.cuda.cudadrv import driver as numba_driver  # noqa: E402

from fastxent import _cuda  # noqa: E402
from fastxent._spec import ClassProblem  # noqa: E402

H100_OPTIN = 232448  # CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN on H100 and H200
DEFAULT = 48 * 1024
MAX_DYNAMIC = (numba_driver.binding.CUfunction_attribute
               .CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)


# --------------------------------------------------------------------------
# plan_row_launch


def test_llm_vocabulary_rows_are_cached_with_the_h100_opt_in():
    plan = _cuda.plan_row_launch(8192, 32000, 4, 1, 256, H100_OPTIN, 1024)
    assert plan == _cuda.RowLaunch(blocks=8192, threads=1024, group=1024, cached=True,
                                   shared_bytes=128000, opt_in=True)
    # without the opt-in, the same rows are read twice by 256-thread blocks
    plan = _cuda.plan_row_launch(8192, 32000, 4, 1, 256, DEFAULT, 1024)
    assert plan == _cuda.RowLaunch(blocks=8192, threads=256, group=256, cached=False,
                                   shared_bytes=0, opt_in=False)


@pytest.mark.parametrize("itemsize,cache_rows,limit,largest", [
    (4, 1, H100_OPTIN, 58048),   # (232448 - 64 * 4 scratch) / 4
    (8, 1, H100_OPTIN, 28992),
    (4, 2, H100_OPTIN, 29024),   # class probabilities cached too
    (8, 2, H100_OPTIN, 14496),
    (4, 1, DEFAULT, 12224),
    (8, 1, DEFAULT, 6080),
])
def test_largest_cached_row(itemsize, cache_rows, limit, largest):
    fits = _cuda.plan_row_launch(100, largest, itemsize, cache_rows, 256, limit, 1024)
    assert fits.cached and fits.shared_bytes == cache_rows * largest * itemsize
    assert fits.shared_bytes + 64 * itemsize <= limit
    over = _cuda.plan_row_launch(100, largest + 1, itemsize, cache_rows, 256, limit, 1024)
    assert not over.cached and over.shared_bytes == 0 and over.threads == 256


def test_rows_under_48_kib_keep_the_default_block():
    plan = _cuda.plan_row_launch(1000, 12224, 4, 1, 256, H100_OPTIN, 1024)
    assert plan.cached and not plan.opt_in and plan.threads == plan.group == 256
    plan = _cuda.plan_row_launch(1000, 12225, 4, 1, 256, H100_OPTIN, 1024)
    assert plan.cached and plan.opt_in and plan.threads == plan.group == 1024


def test_small_rows_share_a_block_and_are_not_cached():
    plan = _cuda.plan_row_launch(1000, 100, 4, 1, 256, H100_OPTIN, 1024)
    assert plan.group == 32 and not plan.cached and plan.blocks == 125  # 8 rows a block
    assert _cuda.plan_row_launch(10**8, 3, 4, 1, 256, H100_OPTIN).blocks == _cuda.MAX_BLOCKS
    assert not _cuda.plan_row_launch(10, 50000, 4, 0, 256, H100_OPTIN).cached  # logsumexp


# --------------------------------------------------------------------------
# The opt-in, against stand-ins for the compiled kernel and the driver


class FakeKernel:
    """What ``_opt_in_shared`` reads of a numba-cuda ``_Kernel``."""

    shared_mem_per_block = 256
    max_threads_per_block = 768  # e.g. limited by registers

    def __init__(self):
        self.cufunc = SimpleNamespace(handle="kernel-handle", device=SimpleNamespace(id=0))
        self._codelibrary = SimpleNamespace(get_cufunc=lambda: self.cufunc)


class FakeDispatcher:
    """A kernel dispatcher: compiles once, launches record their geometry."""

    def __init__(self, cached, refuse_launch=False):
        self.cached = cached
        self.refuse_launch = refuse_launch
        self.kernel = FakeKernel()
        self.compiled = []
        self.launches = []

    def typeof_pyval(self, value):
        return type(value).__name__

    def compile(self, argtypes):
        self.compiled.append(argtypes)
        return self.kernel

    def __getitem__(self, launch):
        def run(*args):
            if self.refuse_launch:
                raise RuntimeError("CUDA_ERROR_INVALID_VALUE")
            self.launches.append(launch)
        return run


def _patch_driver(monkeypatch, set_attribute):
    # through __dict__: getattr on the driver would try to load the CUDA library
    monkeypatch.setitem(numba_driver.driver.__dict__, "cuKernelSetAttribute", set_attribute)


@pytest.fixture
def driver_calls(monkeypatch):
    """Calls to ``cuKernelSetAttribute``, which succeeds; a fresh grant cache."""
    calls = []
    monkeypatch.setattr(_cuda, "_GRANTED", {})
    _patch_driver(monkeypatch, lambda *args: calls.append(args))
    return calls


def test_opt_in_sets_the_attribute_once_per_kernel(driver_calls):
    dispatcher = FakeDispatcher(True)
    args = (np.zeros(3), None, 5, 0.5)
    assert _cuda._opt_in_shared(dispatcher, args, 128000, H100_OPTIN) == 768
    assert driver_calls == [(MAX_DYNAMIC, H100_OPTIN - 256, "kernel-handle", 0)]
    assert dispatcher.compiled == [("ndarray", "NoneType", "int", "float")]
    assert _cuda._opt_in_shared(dispatcher, args, H100_OPTIN - 256, H100_OPTIN) == 768
    assert len(driver_calls) == 1  # cached
    assert _cuda._opt_in_shared(dispatcher, args, H100_OPTIN - 255, H100_OPTIN) == 0


def test_refused_opt_in_warns_once_and_is_not_retried(monkeypatch):
    calls = []

    def refuse(*args):
        calls.append(args)
        raise RuntimeError("CUDA_ERROR_INVALID_VALUE")

    monkeypatch.setattr(_cuda, "_GRANTED", {})
    _patch_driver(monkeypatch, refuse)
    dispatcher = FakeDispatcher(True)
    with pytest.warns(_cuda.SharedMemoryOptInWarning, match="INVALID_VALUE"):
        assert _cuda._opt_in_shared(dispatcher, (1,), 128000, H100_OPTIN) == 0
    assert _cuda._opt_in_shared(dispatcher, (1,), 128000, H100_OPTIN) == 0
    assert len(calls) == 1


def test_opt_in_without_a_driver_falls_back(monkeypatch):
    """No GPU here: the real driver call fails, which must not raise."""
    monkeypatch.setattr(_cuda, "_GRANTED", {})
    with pytest.warns(_cuda.SharedMemoryOptInWarning):
        assert _cuda._opt_in_shared(FakeDispatcher(True), (1,), 128000, H100_OPTIN) == 0


def _launch(monkeypatch, kernels):
    """``_launch_rows`` for 8192 x 32000 float32 on a pretend H100."""
    monkeypatch.setattr(_cuda, "_block_shared_limit", lambda: H100_OPTIN)
    problem = ClassProblem((8192, 32000), 1, np.dtype(np.float32))
    _cuda._launch_rows(kernels.__getitem__, problem, 1, lambda group: (0.0, group))


def test_launch_opts_in_with_the_widest_block_the_kernel_allows(monkeypatch, driver_calls):
    kernels = {True: FakeDispatcher(True), False: FakeDispatcher(False)}
    _launch(monkeypatch, kernels)
    # 768 threads allowed by the kernel: blocks of 512
    assert kernels[True].launches == [(8192, 512, 0, 128000)] and not kernels[False].launches
    assert len(driver_calls) == 1


def test_refused_launch_falls_back_to_the_uncached_kernel(monkeypatch, driver_calls):
    kernels = {True: FakeDispatcher(True, refuse_launch=True), False: FakeDispatcher(False)}
    with pytest.warns(_cuda.SharedMemoryOptInWarning, match="launch with 128000 bytes"):
        _launch(monkeypatch, kernels)
    assert kernels[False].launches == [(8192, 256, 0, 0)]
    kernels[True].refuse_launch = False
    _launch(monkeypatch, kernels)  # not tried again
    assert not kernels[True].launches and len(kernels[False].launches) == 2
    assert len(driver_calls) == 1
