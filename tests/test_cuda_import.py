"""The CPU package must work where no CUDA library is installed: importing
fastxent and running on NumPy arrays never imports ``numba.cuda``."""

import subprocess
import sys

CODE = """
import sys
import numpy as np
import fastxent
loss, grad = fastxent.cross_entropy_with_grad(np.array([[1.0, 2.0, 0.5]]), np.array([1]))
assert abs(loss - 0.4643687841) < 1e-9, loss
bad = sorted(m for m in sys.modules if m.startswith(("numba.cuda", "numba_cuda", "fastxent._cuda")))
assert not bad, bad
"""


def test_cpu_calls_do_not_import_numba_cuda():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
