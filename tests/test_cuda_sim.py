"""Runs the GPU kernel tests (``tests/cuda_sim``) under Numba's CUDA simulator.

``NUMBA_ENABLE_CUDASIM`` must be set before numba is first imported, and this
process keeps the real numba-cuda for ``test_cuda_compile.py``, so the
simulated tests run in a child pytest process.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_kernels_under_the_cuda_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    # The simulator evaluates kernels with NumPy scalars, which warn where a
    # GPU silently produces inf or NaN (rows of -inf, an infinite max).
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           "-W", "ignore::RuntimeWarning", str(ROOT / "tests" / "cuda_sim")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    summary = proc.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 100, report
    assert not re.search(r"skipped|xfail|deselected", summary), report
