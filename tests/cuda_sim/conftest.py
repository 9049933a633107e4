"""GPU kernel tests under Numba's CUDA simulator.

Collected only in a process started with ``NUMBA_ENABLE_CUDASIM=1`` (by
``tests/test_cuda_sim.py``): the variable must be set before numba is first
imported, and the PTX test needs the real numba-cuda in the main process.
"""

import os

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    collect_ignore_glob = ["*.py"]
else:
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
