"""Numba's on-disk cache for the CPU kernels, keyed by all of their sources.

Numba keeps a cached function while the file that defines it is unchanged.
The kernels in ``_cpu_kernels.py`` inline code from ``_lanes.py``,
``_tiles.py``, ``_fastmath.py``, ``_formulas.py`` and ``_host.py``: edited
or upgraded alone, those would
leave stale machine code in the cache, silently. The locators here give the
kernels' cache entries a stamp made from every one of those files, so a
change to any of them recompiles.

They extend Numba's own locators (same cache directories, same order: a
``NUMBA_CACHE_DIR``, else the package's ``__pycache__``, else the user-wide
cache). If a future Numba moves these internals, ``install`` does nothing
and Numba's default applies.
"""

from __future__ import annotations

import functools
import hashlib
import os

#: The files whose code ends up in the compiled CPU kernels.
# ``_spec.py``: the kernels are compiled against its options record.
KERNEL_SOURCES = ("_cpu_kernels.py", "_lanes.py", "_tiles.py", "_fastmath.py", "_formulas.py",
                  "_half.py", "_host.py", "_spec.py", "_jacobian_kernels.py",
                  "_dask_kernels.py", "_divergence_kernels.py", "_distill_kernels.py")

_HERE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def sources_stamp(py_file: str) -> str:
    """A digest of the contents of ``py_file`` and of the kernel sources."""
    digest = hashlib.sha256()
    for path in (py_file,) + tuple(os.path.join(_HERE, name) for name in KERNEL_SOURCES):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def install() -> bool:
    """Put the kernel locators first in Numba's list; True where done."""
    try:
        from numba.core import caching

        def public_or_private(name):  # public names in recent Numba, "_" in older ones
            return getattr(caching, name, None) or getattr(caching, "_" + name)

        bases = tuple(public_or_private(name) for name in (
            "UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator"))
        impl = public_or_private("CacheImpl")
        locators = impl._locator_classes
    except (ImportError, AttributeError):
        return False
    if any(getattr(cls, "_fastxent", False) for cls in locators):
        return True
    ours = [_kernel_locator(base) for base in bases]
    impl._locator_classes = ours + list(locators)
    return True


def _kernel_locator(base):
    class KernelLocator(base):
        _fastxent = True

        def get_source_stamp(self):
            return sources_stamp(os.path.abspath(self._py_file))

        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.dirname(os.path.abspath(py_file)) != _HERE:
                return None
            return super().from_function(py_func, py_file)

    KernelLocator.__name__ = KernelLocator.__qualname__ = "Kernel" + base.__name__
    return KernelLocator
