"""The GPU kernels compile to PTX for sm_90, and "performance on paper".

Runs with the real numba-cuda (no GPU needed: ``cuda.compile_ptx`` only
needs NVVM, shipped by ``numba-cuda[cu13]``), in this process, which must not
have the CUDA simulator enabled (see ``test_cuda_sim.py`` for the kernels'
results).
"""

from __future__ import annotations

import functools
import re

import pytest
from numba import config

from tests.ptx_loops import innermost_loops

if config.ENABLE_CUDASIM:  # pragma: no cover - the simulator cannot make PTX
    pytest.fail("test_cuda_compile.py needs the real numba-cuda: unset NUMBA_ENABLE_CUDASIM",
                pytrace=False)

from numba import cuda, types as T  # noqa: E402

from fastxent import _cuda_kernels as K  # noqa: E402

CC = (9, 0)
FLOATS = {"float32": T.float32, "float64": T.float64}
i64, f64 = T.int64, T.float64


def _ce_sig(ft, soft, weighted, grad, llm=False):
    """x, y, q, g, losses, lse, predicted, n_rows, n_classes, inner, group,
    wsum, scale, and the fields of ``_spec.CEOptions``: weight, ignore_index,
    smoothing, mean, z_loss, logit_scale, softcap. ``llm``: with
    return_stats' arrays."""
    a = ft[::1]
    return (a, None if soft else i64[::1], a if soft else None, a if grad else None, f64[::1],
            f64[::1] if llm else None, i64[::1] if llm else None,
            i64, i64, i64, i64, f64, f64, a if weighted else None, i64, f64, T.boolean, f64,
            f64, f64)


def _sig(*args):
    return tuple(T.none if a is None else a for a in args)


def _kernels(dtype):
    """(name, python function, signature) of every kernel, for one float type."""
    ft = FLOATS[dtype]
    a = ft[::1]
    out = []
    for cached in (False, True):
        for soft in (False, True):
            for llm in (False, True):
                out.append((f"ce soft={soft} llm={llm} cached={cached}", K.ce_py(dtype, cached),
                            _sig(*_ce_sig(ft, soft, True, True, llm))))
        for log in (False, True):
            out.append((f"softmax log={log} cached={cached}", K.softmax_py(dtype, cached, log),
                        (a, a, i64, i64, i64, i64)))
    out.append(("logsumexp", K.logsumexp_py(dtype), (a, a, i64, i64, i64, i64)))
    out.append(("bce", K.bce_py(dtype), (a, a, a, a, a, a, f64[::1], i64, f64)))
    out.append(("nll", K.nll_py(), _sig(a, i64[::1], a, f64[::1], i64, i64, i64, i64)))
    out.append(("cast", K.cast_py, (f64[::1], a)))
    for ndim in (1, 2, 3):
        strided, contiguous = T.Array(ft, ndim, "A"), T.Array(ft, ndim, "C")
        out.append((f"strided_copy gather {ndim}-D", K.strided_copy_py(ndim),
                    (strided, contiguous, i64)))
        out.append((f"strided_copy scatter {ndim}-D", K.strided_copy_py(ndim),
                    (contiguous, strided, i64)))
    return out


@functools.lru_cache(maxsize=None)
def _ptx(fn, sig):
    ptx, _ = cuda.compile_ptx(fn, sig, cc=CC)
    return ptx


@pytest.mark.parametrize("dtype", sorted(FLOATS))
def test_every_kernel_compiles_without_spills(dtype):
    kernels = _kernels(dtype) + [("sum", K.sum_py, (f64[::1], f64[::1]))]
    for name, fn, sig in kernels:
        ptx = _ptx(fn, sig)
        assert ".target sm_90" in ptx, name
        assert "ld.local" not in ptx and "st.local" not in ptx, f"{name} spills to local memory"
        if name.split()[0] in ("ce", "softmax", "logsumexp", "sum"):
            assert "shfl.sync.bfly" in ptx, f"{name} reduces without warp shuffles"
            assert not re.search(r"\s(atom|red)\.", ptx), f"{name} uses atomics"


@pytest.mark.parametrize("dtype", sorted(FLOATS))
@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("llm", [False, True], ids=["plain", "llm_options"])
def test_fused_cross_entropy_moves_each_element_at_most_twice(dtype, cached, llm):
    """Hard targets with gradient: a first pass (online max and sum) and a
    gradient pass. Per element: at most 2 global loads and 1 global store, 1
    load when the row is kept in shared memory. The compiler unswitches
    loops (e.g. on label smoothing), so the per-element cost is the worst
    first-pass loop plus the worst gradient-pass loop. ``llm``: the same with
    every LLM option on (logit_scale, softcap, z_loss, return_stats)."""
    ptx = _ptx(K.ce_py(dtype, cached), _sig(*_ce_sig(FLOATS[dtype], False, False, True, llm)))
    loops = innermost_loops(ptx)
    first = [lp for lp in loops if lp.stores == 0]
    second = [lp for lp in loops if lp.stores > 0]
    assert first and second, loops
    loads = max(lp.loads_per_element for lp in first) + max(lp.loads_per_element
                                                            for lp in second)
    assert loads <= (1 if cached else 2), loops
    assert all(lp.stores_per_element <= 1 for lp in loops), loops
    if cached:
        assert all(lp.shared_stores > 0 for lp in first), "first pass does not fill the cache"
    assert "ld.local" not in ptx and "st.local" not in ptx
    assert ptx.count("shfl.sync.bfly") >= 2


def _ptxas_report(ptx: str) -> str:
    """nvJitLink's verbose log of assembling ``ptx`` for sm_90 (no GPU needed)."""
    from cuda.bindings import nvjitlink

    options = ["-arch=sm_90", "-verbose"]
    handle = nvjitlink.create(len(options), options)
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel")
        nvjitlink.complete(handle)
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
    finally:
        nvjitlink.destroy(handle)
    return log.decode(errors="replace").rstrip("\x00")


@pytest.mark.parametrize("dtype", sorted(FLOATS))
@pytest.mark.parametrize("soft", [False, True])
def test_cached_cross_entropy_assembles_for_wide_blocks_without_spills(dtype, soft):
    """Rows cached above 48 KiB run in blocks of up to 1024 threads, as many
    as the kernel's registers allow (``_cuda._launch_rows``): at most 128
    registers per thread keep 512-thread blocks launchable (65536 per SM), and
    ptxas spills nothing."""
    ptx = _ptx(K.ce_py(dtype, True), _sig(*_ce_sig(FLOATS[dtype], soft, True, True)))
    log = _ptxas_report(ptx)
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", log)]
    assert registers and max(registers) <= 128, log
    assert "0 bytes spill stores, 0 bytes spill loads" in log, log
    assert not re.search(r"[1-9]\d* bytes spill", log), log


# --------------------------------------------------------------------------
# The softmax Jacobian family (``_cuda_jacobian_kernels``)

from fastxent import _cuda_jacobian_kernels as J  # noqa: E402


def _hvp_sig(ft, soft, weighted, transformed=False):
    """x, y, q, v, g, n_rows, n_classes, inner, group, wsum, scale, and the
    fields of ``_spec.CEOptions`` (with ``transformed``, logit_scale and
    softcap too)."""
    a = ft[::1]
    return _sig(a, None if soft else i64[::1], a if soft else None, a, a, i64, i64, i64, i64,
                f64, f64, a if weighted else None, i64, f64, T.boolean, f64,
                *((f64, f64) if transformed else ()))


def _jacobian_kernels(dtype):
    ft = FLOATS[dtype]
    a = ft[::1]
    out = [("softmax_jacobian", J.softmax_jacobian_py(dtype), (a, a, i64, i64, i64, i64))]
    for cached in (False, True):
        for log in (False, True):
            out.append((f"softmax_backward log={log} cached={cached}",
                        J.softmax_backward_py(dtype, cached, log), (a, a, a, i64, i64, i64, i64)))
        for soft in (False, True):
            out.append((f"hvp soft={soft} cached={cached}", J.cross_entropy_hvp_py(dtype, cached),
                        _hvp_sig(ft, soft, True)))
            out.append((f"hvp transformed soft={soft} cached={cached}",
                        J.cross_entropy_hvp_transformed_py(dtype, cached),
                        _hvp_sig(ft, soft, True, True)))
    return out


@pytest.mark.parametrize("dtype", sorted(FLOATS))
def test_jacobian_kernels_compile_without_spills(dtype):
    for name, fn, sig in _jacobian_kernels(dtype):
        ptx = _ptx(fn, sig)
        assert ".target sm_90" in ptx, name
        assert "ld.local" not in ptx and "st.local" not in ptx, f"{name} spills to local memory"
        assert "shfl.sync.bfly" in ptx, f"{name} reduces without warp shuffles"
        assert not re.search(r"\s(atom|red)\.", ptx), f"{name} uses atomics"


def _traffic(ptx, cached_arrays):
    """(global loads, global stores) per element over a row's passes, the
    kernel caching ``cached_arrays`` row-sized arrays in shared memory: the
    worst loop of each kind (unswitched copies of one pass), a pass being a
    loop that stores (the last) or one that does not (the first passes). A
    first pass stores ``cached_arrays`` shared values per element, which
    ``innermost_loops`` counts as that many elements: counted back here."""
    loops = innermost_loops(ptx)
    reading = [lp for lp in loops if lp.stores == 0]
    writing = [lp for lp in loops if lp.stores > 0]
    assert reading and writing, loops
    first = max(lp.loads_per_element * (cached_arrays if lp.shared_stores else 1)
                for lp in reading)
    loads = first + max(lp.loads_per_element for lp in writing)
    return loads, max(lp.stores_per_element for lp in writing), loops


@pytest.mark.parametrize("dtype", sorted(FLOATS))
@pytest.mark.parametrize("log", [False, True])
def test_cached_backward_reads_two_arrays_once_and_writes_once(dtype, log):
    """Two global loads (grad_output, output) and one store per element;
    the uncached variant reads grad_output again (and output, without ``log``)."""
    a = FLOATS[dtype][::1]
    sig = (a, a, a, i64, i64, i64, i64)
    ptx = _ptx(J.softmax_backward_py(dtype, True, log), sig)
    loads, stores, loops = _traffic(ptx, 1 if log else 2)
    assert loads == 2 and stores == 1, loops
    assert all(lp.shared_stores > 0 for lp in loops if lp.stores == 0), loops
    loads, stores, loops = _traffic(_ptx(J.softmax_backward_py(dtype, False, log), sig), 0)
    assert loads == (3 if log else 4) and stores == 1, loops


@pytest.mark.parametrize("dtype", sorted(FLOATS))
def test_cached_hvp_reads_logits_and_vector_once_and_writes_once(dtype):
    """Class indices: two global loads (logits, vector) and one store per
    element; the middle pass (sum exp(x - m) v) runs on shared memory (no
    loop of it touches global memory)."""
    ptx = _ptx(J.cross_entropy_hvp_py(dtype, True), _hvp_sig(FLOATS[dtype], False, True))
    loads, stores, loops = _traffic(ptx, 2)
    assert loads == 2 and stores == 1, loops
    assert len([lp for lp in loops if lp.stores == 0]) == 1, loops


@pytest.mark.parametrize("dtype", sorted(FLOATS))
def test_cached_transformed_hvp_reads_logits_and_vector_once_and_writes_once(dtype):
    """logit_scale and softcap (their own kernel), class indices, no class
    weights: still two global loads and one store per element, the
    transform applied as each logit is loaded and kept in shared memory."""
    ptx = _ptx(J.cross_entropy_hvp_transformed_py(dtype, True),
               _hvp_sig(FLOATS[dtype], False, False, True))
    loads, stores, loops = _traffic(ptx, 2)
    assert loads == 2 and stores == 1, loops
    # every loop that reads global memory and writes none is the first pass
    # (the compiler makes one copy with the cap, one without): it caches
    assert all(lp.shared_stores > 0 for lp in loops if lp.stores == 0), loops


@pytest.mark.parametrize("dtype", sorted(FLOATS))
@pytest.mark.parametrize("kind", ["kl", "kl_log_target", "bce"])
def test_divergence_kernels_load_twice_and_store_once_per_element(dtype, kind):
    """kl_div / binary_cross_entropy with gradient, no weight, reduced: per
    element the input and the target are loaded once and the gradient
    stored once. BCE's input check loads each element once and stores nothing per element."""
    from fastxent import _cuda_divergence_kernels as D

    a = FLOATS[dtype][::1]
    plain = _ptx(D.divergence_py(dtype, kind), _sig(a, a, None, a, None, f64[::1], i64, f64))
    full = _ptx(D.divergence_py(dtype, kind), _sig(a, a, a, a, a, f64[::1], i64, f64))
    for ptx in (plain, full):
        assert ".target sm_90" in ptx
        assert "ld.local" not in ptx and "st.local" not in ptx
    loops = innermost_loops(plain)
    assert loops, plain[-2000:]
    assert max(lp.loads_per_element for lp in loops) == 2, loops
    assert max(lp.stores_per_element for lp in loops) == 1, loops
    # (the weighted kernel is only checked to compile: ``innermost_loops``
    # counts its unrolled loop at 1.5 loads per element, less than its 3)
    check = _ptx(D.outside_unit_py(dtype), (a, i64[::1], i64))
    loops = innermost_loops(check)
    assert loops and max(lp.loads_per_element for lp in loops) == 1, loops
    assert all(lp.stores_per_element == 0 for lp in loops), loops


# Distillation (``_cuda_distill_kernels``)

from fastxent import _cuda_distill_kernels as DK  # noqa: E402


def _distill_sig(ft):
    """x, t, idx, g, y, losses, n_rows, n_classes, k, inner, group, kind,
    beta, temperature, alpha, ignore_index, scale, write."""
    a = ft[::1]
    return (a, a, i64[::1], a, i64[::1], f64[::1], i64, i64, i64, i64, i64, i64, f64, f64, f64,
            i64, f64, T.boolean)


def test_distillation_kernels_compile_without_spills():
    """Every variant in float32 (float64's dense ones are compiled below)."""
    dtype = "float32"
    for cached in (False, True):
        for topk in (False, True):
            ptx = _ptx(DK.distill_py(dtype, cached, topk), _distill_sig(FLOATS[dtype]))
            name = f"distill cached={cached} topk={topk}"
            assert ".target sm_90" in ptx, name
            assert "ld.local" not in ptx and "st.local" not in ptx, f"{name} spills"
            assert "shfl.sync.bfly" in ptx, f"{name} reduces without warp shuffles"
            assert not re.search(r"\s(atom|red)\.", ptx), f"{name} uses atomics"


@pytest.mark.parametrize("dtype", sorted(FLOATS))
def test_cached_dense_distillation_reads_two_arrays_once_and_writes_once(dtype):
    """Dense teacher, rows in shared memory: two global loads (student,
    teacher) and one store per element; the divergence pass runs on shared
    memory. Read twice (uncached): the gradient pass reads both again."""
    sig = _distill_sig(FLOATS[dtype])
    loads, stores, loops = _traffic(_ptx(DK.distill_py(dtype, True, False), sig), 2)
    assert loads == 2 and stores == 1, loops
    assert len([lp for lp in loops if lp.stores == 0]) == 1, loops
    ptx = _ptx(DK.distill_py(dtype, False, False), sig)
    loads, stores, loops = _traffic(ptx, 0)
    assert loads <= 4 and stores == 1, loops
    assert "ld.local" not in ptx and "st.local" not in ptx


# --------------------------------------------------------------------------
# float16 and bfloat16 logits (computed in float32; bfloat16 as uint16 bits)

#: the kernels' array type of each 16-bit storage
HALF_ARRAYS = {"float16": T.float16[::1], "bfloat16": T.uint16[::1]}
_WIDTH = re.compile(r"\b(ld|st)\.global(?:\.nc)?(?:\.v[24])?\.([a-z]+\d+)")


def _global_widths(ptx, loops):
    """The (op, type) of every global load and store in ``loops``' bodies."""
    lines = ptx.splitlines()
    return {m.groups() for lp in loops for line in lines[lp.first:lp.last + 1]
            for m in _WIDTH.finditer(line)}


def _half_ce_sig(storage, soft, llm=False):
    """``_ce_sig`` with 16-bit logits and gradient (float32 targets, no weights)."""
    sig = list(_sig(*_ce_sig(T.float32, soft, False, True, llm)))
    sig[0] = sig[3] = HALF_ARRAYS[storage]
    return tuple(sig)


@pytest.mark.parametrize("storage", sorted(HALF_ARRAYS))
@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("llm", [False, True], ids=["plain", "llm_options"])
def test_half_cross_entropy_moves_two_bytes_per_element(storage, cached, llm):
    """16-bit logits, class indices, gradient over 16-bit: the loops load and
    store each element as 16 bits (``ld.global.u16``/``b16``,
    ``st.global.u16``/``b16``, never a 32-bit value), as often as the
    float32 kernel does: at most 2 loads (1 cached) and 1 store."""
    ptx = _ptx(K.ce_py("float32", cached, storage, storage), _half_ce_sig(storage, False, llm))
    assert ".target sm_90" in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx
    loops = innermost_loops(ptx)
    first = [lp for lp in loops if lp.stores == 0]
    second = [lp for lp in loops if lp.stores > 0]
    assert first and second, loops
    loads = max(lp.loads_per_element for lp in first) + max(lp.loads_per_element
                                                            for lp in second)
    assert loads <= (1 if cached else 2), loops
    assert all(lp.stores_per_element <= 1 for lp in loops), loops
    _global_accesses_of_16_bits(ptx, loops, storage)
    assert "shfl.sync.bfly" in ptx and not re.search(r"\s(atom|red)\.", ptx)


def _global_accesses_of_16_bits(ptx, loops, storage=None):
    """Every global load and store in the innermost ``loops`` moves 2 bytes
    (both kinds present); with ``storage`` "float16", through the hardware
    conversions (rounded to nearest even)."""
    widths = _global_widths(ptx, loops)
    assert widths and all(t in ("u16", "b16") for _, t in widths), widths
    assert {op for op, _ in widths} == {"ld", "st"}, widths
    if storage == "float16":
        assert "cvt.f32.f16" in ptx and "cvt.rn.f16.f32" in ptx


def _two_loads_one_store_of_16_bits(ptx, storage, *variants):
    """An elementwise 16-bit kernel's PTX (and its ``variants``, only
    compiled): no spills; per element two loads and one store, each global
    access 2 bytes; float16 through the hardware conversions."""
    for p in (ptx, *variants):
        assert ".target sm_90" in p
        assert "ld.local" not in p and "st.local" not in p
    loops = innermost_loops(ptx)
    assert loops, ptx[-2000:]
    assert max(lp.loads_per_element for lp in loops) == 2, loops
    assert max(lp.stores_per_element for lp in loops) == 1, loops
    _global_accesses_of_16_bits(ptx, loops, storage)


@pytest.mark.parametrize("storage", sorted(HALF_ARRAYS))
@pytest.mark.parametrize("kind", ["kl", "kl_log_target", "bce"])
def test_half_divergence_moves_two_bytes_per_element(storage, kind):
    """kl_div / binary_cross_entropy of a 16-bit input and target, gradient
    over 16 bits: per element the input and the target are loaded and the
    gradient stored once each, as 16 bits; BCE's check loads each 16-bit
    element once. With a float32 weight and elements, it compiles without spills."""
    from fastxent import _cuda_divergence_kernels as D

    a, f32 = HALF_ARRAYS[storage], T.float32[::1]
    fn = D.divergence_py("float32", kind, storage, storage, storage)
    ptx = _ptx(fn, _sig(a, a, None, a, None, f64[::1], i64, f64))
    full = _ptx(fn, _sig(a, a, f32, a, f32, f64[::1], i64, f64))
    _two_loads_one_store_of_16_bits(ptx, storage, full)
    check = _ptx(D.outside_unit_py(storage), (a, i64[::1], i64))
    loops = innermost_loops(check)
    assert loops and max(lp.loads_per_element for lp in loops) == 1, loops
    widths = _global_widths(check, loops)
    assert widths and all(op == "ld" and t in ("u16", "b16") for op, t in widths), widths


@pytest.mark.parametrize("storage", sorted(HALF_ARRAYS))
def test_half_bce_with_logits_moves_two_bytes_per_element(storage):
    """binary_cross_entropy_with_logits of 16-bit logits and target, gradient
    over 16 bits, reduced: per element the logits and the target are loaded
    and the gradient stored once each, as 16 bits (as the float32 kernel
    does, 2 loads and 1 store). With 16-bit weight and pos_weight and the
    float32 elements (reduction "none"), every global load is 16 bits too;
    that variant, and a float32 ``out=`` one, compile without spills."""
    a, f32 = HALF_ARRAYS[storage], T.float32[::1]
    fn = K.bce_py("float32", storage, storage, storage, storage, storage)
    ptx = _ptx(fn, _sig(a, a, None, None, a, None, f64[::1], i64, f64))
    full = _ptx(fn, _sig(a, a, a, a, a, f32, f64[::1], i64, f64))
    out32 = _ptx(K.bce_py("float32", storage, storage, storage, storage, None),
                 _sig(a, a, a, a, f32, f32, f64[::1], i64, f64))
    _two_loads_one_store_of_16_bits(ptx, storage, full, out32)
    widths = _global_widths(full, innermost_loops(full))
    assert widths and all(t in ("u16", "b16") for op, t in widths if op == "ld"), widths
    assert {t for op, t in widths if op == "st"} <= {"u16", "b16", "f32"}, widths


@pytest.mark.parametrize("storage", sorted(HALF_ARRAYS))
def test_half_nll_loss_reads_two_bytes_per_row(storage):
    """nll_loss of 16-bit log-probabilities: each row's one value is loaded
    as 16 bits (the loop's other loads are the int64 targets, its stores
    the float64 row losses); no 32-bit load, no widened copy. With class
    weights (float32) it compiles without spills."""
    a = HALF_ARRAYS[storage]
    ptx = _ptx(K.nll_py(storage), _sig(a, i64[::1], None, f64[::1], i64, i64, i64, i64))
    weighted = _ptx(K.nll_py(storage),
                    _sig(a, i64[::1], T.float32[::1], f64[::1], i64, i64, i64, i64))
    for p in (ptx, weighted):
        assert ".target sm_90" in p
        assert "ld.local" not in p and "st.local" not in p
    loops = innermost_loops(ptx)
    widths = _global_widths(ptx, loops)
    loads = {t for op, t in widths if op == "ld"}
    assert loads & {"u16", "b16"}, widths
    assert all(t in ("u16", "b16") or t in ("u64", "s64", "b64") for t in loads), widths
    assert {t for op, t in widths if op == "st"} <= {"f64", "u64", "b64"}, widths
    if storage == "float16":
        assert "cvt.f32.f16" in ptx


@pytest.mark.parametrize("storage", sorted(HALF_ARRAYS))
def test_half_kernels_compile_without_spills(storage):
    """Every 16-bit variant: soft targets (float32), class weights, the
    statistics, softmax and log_softmax (16-bit and float32 results),
    logsumexp; a softmax row of 16-bit values is read and written as 16 bits."""
    a, f32 = HALF_ARRAYS[storage], T.float32[::1]
    kernels = []
    for cached in (False, True):
        for soft in (False, True):
            sig = list(_sig(*_ce_sig(T.float32, soft, True, True, True)))
            sig[0] = sig[3] = a
            kernels.append((f"ce soft={soft} cached={cached}",
                            K.ce_py("float32", cached, storage, storage), tuple(sig)))
            sig[3] = f32  # a float32 out=
            kernels.append((f"ce out32 soft={soft} cached={cached}",
                            K.ce_py("float32", cached, storage, None), tuple(sig)))
        for log in (False, True):
            kernels.append((f"softmax log={log} cached={cached}",
                            K.softmax_py("float32", cached, log, storage, storage),
                            (a, a, i64, i64, i64, i64)))
            kernels.append((f"softmax out32 log={log} cached={cached}",
                            K.softmax_py("float32", cached, log, storage, None),
                            (a, f32, i64, i64, i64, i64)))
    kernels.append(("logsumexp", K.logsumexp_py("float32", storage), (a, f32, i64, i64, i64, i64)))
    kernels.append(("widen", K.widen_py(storage), (a, f32)))
    for name, fn, sig in kernels:
        ptx = _ptx(fn, sig)
        assert ".target sm_90" in ptx, name
        assert "ld.local" not in ptx and "st.local" not in ptx, f"{name} spills to local memory"
        if name.startswith("softmax") and "out32" not in name:
            loops = innermost_loops(ptx)
            widths = _global_widths(ptx, loops)
            assert widths and all(t in ("u16", "b16") for _, t in widths), (name, widths)


@pytest.mark.parametrize("storage", sorted(HALF_ARRAYS))
def test_half_distillation_moves_two_bytes_per_element(storage):
    """16-bit student, dense teacher and gradient, rows cached: each element
    loaded (student, teacher) and stored as 16 bits, as often as the float32
    kernel does (two loads, one store)."""
    a = HALF_ARRAYS[storage]
    sig = list(_distill_sig(T.float32))
    sig[0] = sig[1] = sig[3] = a
    ptx = _ptx(DK.distill_py("float32", True, False, storage, storage, storage), tuple(sig))
    loads, stores, loops = _traffic(ptx, 2)
    assert loads == 2 and stores == 1, loops
    assert "ld.local" not in ptx and "st.local" not in ptx
    _global_accesses_of_16_bits(ptx, loops)


@pytest.mark.parametrize("storage", sorted(HALF_ARRAYS))
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_half_backward_moves_two_bytes_per_element(storage, log):
    """16-bit grad_output, output and result: cached, two global loads and
    one store per element, as the float32 kernel (the uncached variant as
    many as it: 3 or 4 loads), each as 16 bits."""
    a = HALF_ARRAYS[storage]
    sig = (a, a, a, i64, i64, i64, i64)
    for cached, expected in ((True, 2), (False, 3 if log else 4)):
        ptx = _ptx(J.softmax_backward_py("float32", cached, log, storage, storage, storage), sig)
        assert "ld.local" not in ptx and "st.local" not in ptx
        loads, stores, loops = _traffic(ptx, (1 if log else 2) if cached else 0)
        assert loads == expected and stores == 1, loops
        _global_accesses_of_16_bits(ptx, loops, storage)


@pytest.mark.parametrize("storage", sorted(HALF_ARRAYS))
@pytest.mark.parametrize("transformed", [False, True], ids=["plain", "logit_scale_softcap"])
def test_half_hvp_moves_two_bytes_per_element(storage, transformed):
    """16-bit logits, vector and product, class indices, rows cached: two
    global loads (logits, vector) and one store per element, each as 16 bits."""
    a = HALF_ARRAYS[storage]
    sig = list(_hvp_sig(T.float32, False, False, transformed))
    sig[0] = sig[3] = sig[4] = a
    builder = J.cross_entropy_hvp_transformed_py if transformed else J.cross_entropy_hvp_py
    ptx = _ptx(builder("float32", True, storage, storage, storage), tuple(sig))
    assert "ld.local" not in ptx and "st.local" not in ptx
    loads, stores, loops = _traffic(ptx, 2)
    assert loads == 2 and stores == 1, loops
    _global_accesses_of_16_bits(ptx, loops, storage)


@pytest.mark.parametrize("storage", sorted(HALF_ARRAYS))
def test_half_jacobian_kernels_compile_without_spills(storage):
    """Every 16-bit variant of the family: read twice, float32 ``out=``
    (result stored as float32), soft targets and class weights (float32);
    the Jacobian reads and writes its 16-bit values as 16 bits."""
    a, f32 = HALF_ARRAYS[storage], T.float32[::1]
    kernels = [("softmax_jacobian", J.softmax_jacobian_py("float32", storage, storage),
                (a, a, i64, i64, i64, i64))]
    for cached in (False, True):
        for log in (False, True):
            kernels.append((f"softmax_backward out32 log={log} cached={cached}",
                            J.softmax_backward_py("float32", cached, log, storage, storage),
                            (a, a, f32, i64, i64, i64, i64)))
        for soft in (False, True):
            for transformed in (False, True):
                builder = (J.cross_entropy_hvp_transformed_py if transformed
                           else J.cross_entropy_hvp_py)
                sig = list(_hvp_sig(T.float32, soft, True, transformed))
                sig[0] = sig[3] = sig[4] = a
                kernels.append((f"hvp soft={soft} transformed={transformed} cached={cached}",
                                builder("float32", cached, storage, storage, storage),
                                tuple(sig)))
                sig[4] = f32
                kernels.append((f"hvp out32 soft={soft} transformed={transformed} "
                                f"cached={cached}",
                                builder("float32", cached, storage, storage), tuple(sig)))
    for name, fn, sig in kernels:
        ptx = _ptx(fn, sig)
        assert ".target sm_90" in ptx, name
        assert "ld.local" not in ptx and "st.local" not in ptx, f"{name} spills to local memory"
        assert "shfl.sync.bfly" in ptx and not re.search(r"\s(atom|red)\.", ptx), name
        if name == "softmax_jacobian":
            widths = _global_widths(ptx, innermost_loops(ptx))
            assert widths and all(t in ("u16", "b16") for _, t in widths), (name, widths)
            assert {op for op, _ in widths} == {"ld", "st"}, widths
