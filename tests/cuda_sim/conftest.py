"""GPU kernel tests under Numba's CUDA simulator.

Collected only in a process started with ``NUMBA_ENABLE_CUDASIM=1`` (by
``tests/test_cuda_sim.py``): the variable must be set before numba is first
imported, and the PTX test needs the real numba-cuda in the main process.
"""

import os
import sys

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    collect_ignore_glob = ["*.py"]
else:
    # The simulator runs a block's threads as Python threads while its block
    # manager polls them in a loop that keeps the GIL for whole switch
    # intervals, and across cores each hand-over of the GIL wakes a thread on
    # another core. One core and 0.5 ms slices run the suite 4x faster (either
    # alone gains little).
    sys.setswitchinterval(5e-4)
    if hasattr(os, "sched_setaffinity"):  # Linux; threads started later inherit it
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})

    @pytest.fixture(autouse=True)
    def small_blocks(monkeypatch):
        """Blocks of 8 threads (16 for rows cached above 48 KiB) in "warps"
        of 4: the simulator runs each thread as a Python thread, and small
        warps still exercise every reduction stage (shuffles, then shared
        memory across warps)."""
        from fastxent import _cuda, _cuda_kernels

        monkeypatch.setattr(_cuda, "THREADS_PER_BLOCK", 8)
        monkeypatch.setattr(_cuda, "WIDE_THREADS_PER_BLOCK", 16)
        monkeypatch.setattr(_cuda_kernels, "WARP", 4)
