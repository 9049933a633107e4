"""Picks the backend (CPU or CUDA) from the arrays a call is given."""

from __future__ import annotations

import numpy as np

DEVICES = ("auto", "cpu", "cuda")


def on_gpu(a) -> bool:
    if type(a) is np.ndarray:  # the common case, without probing attributes
        return False
    # Device arrays of Numba's CUDA simulator (``FakeCUDAArray``, used by the
    # GPU tests on machines without a GPU) do not expose the interface.
    return hasattr(a, "__cuda_array_interface__") or type(a).__name__ == "FakeCUDAArray"


def _host(a):
    """NumPy view of a host input; lists and scalars become arrays."""
    if a is None or isinstance(a, np.ndarray):
        return a
    return np.asarray(a)


def select(device, *arrays):
    """(backend module, arrays ready for it) for the given inputs.

    ``auto``: GPU arrays (anything with ``__cuda_array_interface__``) run on
    the GPU, host arrays on the CPU; a mix is refused. ``cpu`` refuses GPU
    arrays. ``cuda`` runs on the GPU and copies host inputs there.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    given = [a for a in arrays if a is not None]
    gpu = [on_gpu(a) for a in given]
    if device == "auto":
        if any(gpu) and not all(gpu):
            raise ValueError("some inputs are on the GPU and some on the host: pass them all on "
                             "one device, or choose one with device='cpu' or device='cuda'")
        device = "cuda" if any(gpu) else "cpu"
    if device == "cpu":
        if any(gpu):
            raise ValueError("device='cpu' but some inputs are GPU arrays: copy them to the host")
        from . import _cpu

        return _cpu, tuple(_host(a) for a in arrays)
    from . import _cuda

    return _cuda, _cuda.to_device_args(arrays)


def destination(backend, out):
    """``out=`` in the backend's array type: unchanged for the CPU (which
    checks and writes the caller's array), a device array for the GPU."""
    if out is None or backend.__name__.endswith("._cpu"):
        return out
    return backend.to_device_args((out,))[0]


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
