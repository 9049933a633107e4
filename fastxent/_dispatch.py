"""Selects the backend module that runs a checked call: ``_cpu`` or ``_cuda``
(``_cpu_linear`` or ``_cuda_linear`` for the fused linear head).

``_cuda`` (and with it ``numba.cuda``) is imported only when a call runs on
the GPU, never with ``fastxent`` itself.
"""

from __future__ import annotations


def backend(device: str):
    """The backend module for a spec's device ("cpu" or "cuda")."""
    if device == "cpu":
        from . import _cpu

        return _cpu
    from . import _cuda

    return _cuda


def linear_backend(device: str):
    """The fused linear + cross-entropy's module for a device: ``_cpu_linear``
    or ``_cuda_linear``, each above its backend (it runs the backend's
    cross-entropy on every chunk)."""
    if device == "cpu":
        from . import _cpu_linear

        return _cpu_linear
    from . import _cuda_linear

    return _cuda_linear


def gpu_description() -> str:
    """A line saying whether fastxent can use a GPU here, and which."""
    try:
        from numba import cuda
    except ImportError as exc:  # pragma: no cover - numba always ships a cuda module
        return f"unavailable (numba.cuda cannot be imported: {exc})"
    try:
        if not cuda.is_available():
            return "none usable (no CUDA driver or device found; install fastxent[cuda] on a GPU machine)"
        device = cuda.get_current_device()
        name = device.name.decode() if isinstance(device.name, bytes) else device.name
        cc = ".".join(str(v) for v in device.compute_capability)
        simulated = " (CUDA simulator)" if getattr(cuda, "simulator", None) else ""
        return f"{name}, compute capability {cc}{simulated}"
    except Exception as exc:  # a broken driver must not break `info`
        return f"none usable ({type(exc).__name__}: {exc})"
