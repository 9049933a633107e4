"""Numba's cache of the CPU kernels is invalidated by any kernel source.

The kernels inline ``_lanes.py``, ``_tiles.py`` and ``_fastmath.py``; Numba alone would
keep a kernel cached while ``_cpu_kernels.py`` is unchanged (see
``fastxent/_cache.py``).
"""

import ast
import os
import shutil
import subprocess
import sys

import fastxent
from fastxent import _cache

_PROBE = """
import numpy as np
from fastxent import _cpu_kernels, _host
_host.scan_hard_targets(np.array([0, 1]), 2, -100, None)
stats = _host.scan_hard_targets.stats
print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
"""


def _run(root):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["PYTHONPATH"] = str(root)
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    hits, misses = map(int, done.stdout.split())
    return hits, misses


def test_editing_an_inlined_source_recompiles(tmp_path):
    package = os.path.dirname(fastxent.__file__)
    shutil.copytree(package, tmp_path / "fastxent",
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert _run(tmp_path) == (0, 1)  # compiled, written to the cache
    assert _run(tmp_path) == (1, 0)  # loaded from it
    with open(tmp_path / "fastxent" / "_lanes.py", "a") as f:
        f.write("\n# an edit\n")
    assert _run(tmp_path) == (0, 1)  # stale: compiled again
    assert _run(tmp_path) == (1, 0)


def _package_imports(path):
    """The package modules (``_name.py``) a source file imports relatively."""
    tree = ast.parse(open(path).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module + ".py")
            else:
                found.update(alias.name + ".py" for alias in node.names)
    return found


def test_every_source_the_kernels_compile_is_in_the_stamp():
    """The modules ``_cpu_kernels`` imports, and theirs in turn, supply the
    intrinsics compiled into the kernels: an edit to any of them must change
    the cache stamp (``_tiles.py`` was once left out, and an edit to it ran
    stale machine code)."""
    package = os.path.dirname(fastxent.__file__)
    seen, todo = set(), ["_cpu_kernels.py"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_package_imports(os.path.join(package, name)))
    seen.discard("_cache.py")  # the stamp's own code, imported for install()
    assert seen <= set(_cache.KERNEL_SOURCES), sorted(seen - set(_cache.KERNEL_SOURCES))
