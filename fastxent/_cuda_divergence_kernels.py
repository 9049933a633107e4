"""CUDA kernels of the elementwise divergences (``fastxent.divergences``).

Imported only by ``_cuda``. Laid out as ``_cuda_kernels.bce_py``: a
grid-stride loop over the flat elements, each thread adding its elements'
losses in float64 into ``partials[thread]`` (a fixed order for a given
launch), summed afterwards by ``_cuda_kernels.sum_kernel``. Per element:
the input and the target are loaded once (and the weight, when given), the
gradient stored once. float16 and bfloat16 inputs, targets and gradients
are read and written as 16 bits and computed in float32 (``_cuda_kernels._io``).
The formulas are ``_formulas``' (shared with ``_divergence_kernels`` on the
CPU); log and exp are libdevice's.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import cuda

from . import _formulas as F
from ._cuda_kernels import _float_type, _io

#: Which divergence a kernel computes (one compiled kernel each).
KINDS = ("kl", "kl_log_target", "bce")

_device = cuda.jit(device=True, inline=True)
kl_element = _device(F.kl_element)
kl_log_target_element = _device(F.kl_log_target_element)
bce_prob_element = _device(F.bce_prob_element)


@lru_cache(maxsize=None)
def divergence_py(dtype, kind, x_storage=None, t_storage=None, g_storage=None):
    """The kernel of divergence ``kind`` for float type ``dtype``.

    ``w``: a full-size weight (of ``dtype``) or None; ``g``: the gradient (may
    be ``x``) or None; ``elements``: per-element losses (reduction "none", of
    ``dtype``) or None. ``x_storage``, ``t_storage``, ``g_storage``: the dtype
    names of the input, the target and the gradient where they differ from
    ``dtype`` (16-bit values computed in float32, see ``_io``).
    """
    FT = _float_type(dtype)
    name = np.dtype(dtype).name
    load_x = _io(x_storage or name, FT)[0]
    load_t = _io(t_storage or name, FT)[0]
    store_g = _io(g_storage or name, FT)[1]
    if kind not in KINDS:
        raise ValueError(f"unknown divergence {kind!r}")
    is_kl, is_log_target = kind == "kl", kind == "kl_log_target"
    eps = F.BCE_GRAD_EPS

    def divergence(x, t, w, g, elements, partials, n, scale):
        one = FT(1.0)
        zero = FT(0.0)
        nan = FT(math.nan)
        neg_inf = FT(-math.inf)
        scale_f = FT(scale)
        first = cuda.grid(1)
        acc = 0.0
        for i in range(first, n, cuda.gridsize(1)):
            xc = load_x(x, i)
            tc = load_t(t, i)
            if is_kl:
                # (guarded: the simulator's math.log raises where libdevice's
                # gives -inf or NaN; a negative target gives NaN as torch)
                log_t = math.log(tc) if tc > zero else (zero if tc == zero else nan)
                loss, grad = kl_element(xc, tc, log_t, zero)
            elif is_log_target:
                loss, grad = kl_log_target_element(xc, tc, math.exp(tc))
            else:
                log_x = math.log(xc) if xc > zero else neg_inf
                log_1mx = math.log(one - xc) if xc < one else neg_inf
                loss, grad = bce_prob_element(xc, tc, log_x, log_1mx, one, FT(eps))
            if w is not None:
                loss = loss * w[i]
                grad = grad * w[i]
            if elements is not None:
                elements[i] = loss
            if g is not None:
                store_g(g, i, grad * scale_f)
            acc += loss
        partials[first] = acc

    return divergence


@lru_cache(maxsize=None)
def outside_unit_py(storage="float64"):
    """The check of an input of dtype name ``storage`` (16-bit read as 16
    bits): per thread, how many of its elements of ``x`` lie outside [0, 1]
    or are NaN; BCE's input check, run before the loss kernel writes."""
    load = _io(storage, _float_type(storage if storage == "float64" else "float32"))[0]

    def outside_unit(x, counts, n):
        first = cuda.grid(1)
        bad = 0
        for i in range(first, n, cuda.gridsize(1)):
            v = load(x, i)
            if not (v >= 0.0 and v <= 1.0):
                bad += 1
        counts[first] = bad

    return outside_unit


@lru_cache(maxsize=None)
def divergence(dtype, kind, x_storage=None, t_storage=None, g_storage=None):
    return cuda.jit(divergence_py(np.dtype(dtype).name, kind, x_storage, t_storage, g_storage))


@lru_cache(maxsize=None)
def outside_unit(storage="float64"):
    return cuda.jit(outside_unit_py(storage))
