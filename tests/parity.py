"""The parity table, shared by the CPU and the GPU tests.

``COMPARISONS`` maps each public fastxent function to its PyTorch twin and
its float64 twin in ``tests/reference.py`` (the one reference), with the
kind of check it gets. ``check(fn, device, **case)`` runs one case of the
grid on a device (``CPU`` or ``CUDA``): the inputs are built on the host,
moved to the device (``numba.cuda.to_device``), the result is brought back
(``copy_to_host``) and held to the twins with the same tolerances on both
devices:

* float64 against torch at rtol 1e-10;
* float32 against torch at rtol 1e-5 (gradients: 1e-6 absolute), and
  float32 losses against the float64 reference at rtol 2e-6.

The grid: ``LAYOUTS`` x ``DTYPES`` x weights x ``TARGETS`` (class ids with
no ignored one, with ignored ones at the default -100, with a *valid* class
as ``ignore_index``, class probabilities) x ``SMOOTHINGS`` x ``REDUCTIONS``.
``tests/test_torch_parity.py`` runs all of it on the CPU (5 classes);
``tests/cuda_sim/test_gpu_kernels.py`` runs ``device_cases("cuda")``: every
function of the table, with the class count as one more dimension
(``GPU_CLASSES``), over a covering array in which every 3 values of any 3
dimensions meet in some case (the full product is too slow for the CUDA
simulator).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import fastxent
from tests import reference as ref

# --------------------------------------------------------------------------
# tolerances and checks

TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-6)}
# float32 loss against the float64 reference; float32 gradient against torch's
LOSS32_RTOL = 2e-6
GRAD32_ATOL = 1e-6


def check_close(ours, theirs, dtype, what, loss_ref=None):
    """float64 against torch at 1e-10; float32 loss against the float64
    reference at 2e-6, gradient against torch's at 1e-6 absolute."""
    ours = np.asarray(ours)
    if dtype == np.float64:
        np.testing.assert_allclose(ours, theirs, **TOL[np.float64], err_msg=what)
    elif what == "grad":
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=GRAD32_ATOL, err_msg=what)
    else:
        np.testing.assert_allclose(ours, theirs, **TOL[np.float32], err_msg=what)
        if loss_ref is not None:
            np.testing.assert_allclose(ours.astype(np.float64), loss_ref, rtol=LOSS32_RTOL,
                                       atol=1e-7, err_msg=what + " vs float64 reference")


@dataclass(frozen=True)
class Device:
    """Where a case runs: inputs go there with ``put``, results come back with ``get``."""

    name: str

    def put(self, a):
        if a is None or self.name == "cpu":
            return a
        from numba import cuda
        return cuda.to_device(np.ascontiguousarray(a))

    def get(self, a):
        return a.copy_to_host() if hasattr(a, "copy_to_host") else a

    def is_array(self, a):
        """``a`` is an array of this device (a NumPy array, a device array)."""
        if self.name == "cpu":
            return isinstance(a, np.ndarray)
        from numba import cuda
        return cuda.devicearray.is_cuda_ndarray(a)


CPU = Device("cpu")
CUDA = Device("cuda")


def check_loss_type(device, loss, dtype, reduction):
    """A NumPy scalar of the logits' dtype, or an array of this device for "none"."""
    if reduction == "none":
        assert device.is_array(loss) and loss.dtype == dtype, type(loss)
    else:
        assert type(loss) is np.dtype(dtype).type, type(loss)


# --------------------------------------------------------------------------
# the torch twins (host arrays in, NumPy results out)


def tensor(a):
    """A torch tensor of a host array (0-d stays 0-d), or None."""
    if a is None:
        return None
    a = np.asarray(a)
    return torch.from_numpy(a if a.flags.c_contiguous else np.ascontiguousarray(a))


def torch_ce(x, y, axis=-1, **kw):
    """torch's cross-entropy (loss, grad) with the class axis moved to 1."""
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, axis, 1))).requires_grad_(True)
    yt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(y, axis, 1) if y.dtype.kind == "f"
                                               else y))
    kw = dict(kw)
    kw["weight"] = tensor(kw.get("weight"))
    loss = F.cross_entropy(xt, yt, **kw)
    (loss.sum() if kw.get("reduction") == "none" else loss).backward()
    return loss.detach().numpy(), np.moveaxis(xt.grad.numpy(), 1, axis)


def torch_bce(x, t, **kw):
    xt = torch.from_numpy(np.array(x)).requires_grad_(True)
    kw = {k: (tensor(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    loss = F.binary_cross_entropy_with_logits(xt, tensor(t), **kw)
    (loss.sum() if kw.get("reduction") == "none" else loss).backward()
    return loss.detach().numpy(), xt.grad.numpy()


def _torch_unary(fn):
    def twin(x, axis=-1):
        return fn(torch.from_numpy(np.ascontiguousarray(x)), dim=axis).numpy()
    return twin


def torch_nll(lp, y, axis=-1, **kw):
    lpt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(lp, axis, 1)))
    kw = dict(kw)
    kw["weight"] = tensor(kw.get("weight"))
    return F.nll_loss(lpt, torch.from_numpy(y), **kw).numpy()


#: fastxent function -> (torch twin, float64 reference, kind)
COMPARISONS = {
    fastxent.cross_entropy: (lambda *a, **k: torch_ce(*a, **k)[0], ref.cross_entropy, "ce"),
    fastxent.cross_entropy_with_grad: (torch_ce, ref.cross_entropy_with_grad, "ce_grad"),
    fastxent.nll_loss: (torch_nll, ref.nll_loss, "nll"),
    fastxent.log_softmax: (_torch_unary(torch.log_softmax), ref.log_softmax, "unary"),
    fastxent.softmax: (_torch_unary(torch.softmax), ref.softmax, "unary"),
    fastxent.logsumexp: (_torch_unary(torch.logsumexp), ref.logsumexp, "unary"),
    fastxent.binary_cross_entropy_with_logits: (lambda *a, **k: torch_bce(*a, **k)[0],
                                                lambda *a, **k: ref.bce_with_logits_with_grad(
                                                    *a, **k)[0], "bce"),
    fastxent.binary_cross_entropy_with_logits_with_grad: (torch_bce,
                                                          ref.bce_with_logits_with_grad,
                                                          "bce_grad"),
}


def twin(fn):
    """The torch twin of a public function."""
    return COMPARISONS[fn][0]


# --------------------------------------------------------------------------
# the grid and the problem builders

DTYPES = [np.float64, np.float32]
REDUCTIONS = ["mean", "sum", "none"]
SMOOTHINGS = [0.0, 0.2, 1.0]
WEIGHTED = [False, True]
#: class ids; some at the default ignore_index -100; ignore_index=2, a valid
#: class; class probabilities
TARGETS = ["hard", "hard_ignored", "hard_ii_valid", "soft"]
HARD_TARGETS = TARGETS[:3]

# (shape, axis): plain rows, (N, T, C) with the class axis last, torch's (N, C, d1, d2)
LAYOUTS = {"2d": ((6, 5), -1), "ntc": ((2, 3, 5), -1), "ncdd": ((2, 5, 3, 2), 1)}
#: class counts on the GPU (blocks of 8 threads in warps of 4 under the
#: simulator): a thread per row, part of a warp, the whole block with its
#: shared-memory reduction
GPU_CLASSES = [3, 12, 40]

BCE_SHAPES = {"2d": (4, 7), "3d": (2, 3, 5)}
#: "full": a weight of the logits' shape (kept whole on the GPU), with a pos_weight
BCE_WEIGHTS = ["none", "weight", "pos_weight", "both", "full"]


def problem(layout, dtype, soft, seed=0, C=None):
    """(logits, targets, class weights, axis); ``C`` replaces the layout's class count."""
    shape, axis = LAYOUTS[layout]
    a = axis % len(shape)
    if C is not None:
        shape = shape[:a] + (C,) + shape[a + 1:]
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    C = shape[a]
    batch = shape[:a] + shape[a + 1:]
    if soft:
        q = rng.random(shape)
        y = (q / q.sum(axis=axis, keepdims=True)).astype(dtype)
    else:
        y = rng.integers(0, C, batch)
        flat = y.reshape(-1)
        flat[::3] = 2  # class 2 is common: ignore_index=2 removes several rows, not all
    w = (rng.random(C) + 0.5).astype(dtype)
    return x, y, w, axis


def target_problem(layout, dtype, target, seed=0, C=None):
    """``problem`` for a kind of ``TARGETS``, with the ignore_index option it needs."""
    x, y, w, axis = problem(layout, dtype, target == "soft", seed, C)
    options = {}
    if target == "hard_ignored":
        y.reshape(-1)[1::4] = -100  # the default ignore_index: rows dropped
    elif target == "hard_ii_valid":
        options["ignore_index"] = 2  # a valid class id: its rows are ignored
    return x, y, w, axis, options


def bce_problem(shape, dtype, weights, seed=9):
    """(logits, targets, options) with saturated logits and 0/1 targets among them."""
    shape = BCE_SHAPES[shape]
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    x.flat[0], x.flat[1] = 30.0, -30.0  # saturated sigmoid on both sides
    t = rng.random(shape).astype(dtype)
    t.flat[2:4] = (0.0, 1.0)
    kw = {}
    if weights in ("weight", "both"):
        kw["weight"] = (rng.random(shape[-1]) + 0.5).astype(dtype)
    if weights in ("pos_weight", "both", "full"):
        kw["pos_weight"] = (rng.random(shape[-1]) * 3).astype(dtype)
    if weights == "full":
        kw["weight"] = (rng.random(shape) + 0.5).astype(dtype)
    return x, t, kw


def _on(device, kw):
    return {k: device.put(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}


# --------------------------------------------------------------------------
# the checks, one per kind


def check_cross_entropy(fn, device, *, dtype, layout, weighted, target, smoothing, reduction,
                        C=None, seed=0):
    x, y, w, axis, options = target_problem(layout, dtype, target, seed, C)
    kw = dict(weight=w if weighted else None, reduction=reduction, label_smoothing=smoothing,
              **options)
    torch_twin, reference, kind = COMPARISONS[fn]
    ours = fn(device.put(x), device.put(y), axis=axis, **_on(device, kw))
    expect = reference(x, y, axis=axis, **kw)
    if kind == "ce":
        check_loss_type(device, ours, dtype, reduction)
        check_close(device.get(ours), torch_twin(x, y, axis=axis, **kw), dtype, "loss", expect)
        return
    assert kind == "ce_grad", kind
    loss, grad = ours
    loss_ref = expect[0]
    t_loss, t_grad = torch_twin(x, y, axis=axis, **kw)
    check_loss_type(device, loss, dtype, reduction)
    assert device.is_array(grad) and grad.shape == x.shape and grad.dtype == dtype
    check_close(device.get(loss), t_loss, dtype, "loss", loss_ref)
    check_close(device.get(grad), t_grad, dtype, "grad")
    # the reference agrees with torch too (it is what the float32 loss is held to)
    np.testing.assert_allclose(loss_ref, t_loss, rtol=2e-6 if dtype == np.float32 else 1e-10,
                               atol=1e-6 if dtype == np.float32 else 1e-12)


def check_nll(fn, device, *, dtype, layout, weighted, target, reduction, C=None, seed=6):
    x, y, w, axis, options = target_problem(layout, dtype, target, seed, C)
    lp = ref.log_softmax(x, axis=axis).astype(dtype)
    torch_twin, reference, kind = COMPARISONS[fn]
    assert kind == "nll", kind
    kw = dict(weight=w if weighted else None, reduction=reduction, **options)
    ours = fn(device.put(lp), device.put(y), axis=axis, **_on(device, kw))
    check_loss_type(device, ours, dtype, reduction)
    check_close(device.get(ours), torch_twin(lp, y, axis=axis, **kw), dtype, "nll",
                reference(lp, y, axis=axis, **kw))


def check_unary(fn, device, *, dtype, layout, C=None, seed=7):
    x, _, _, axis = problem(layout, dtype, soft=False, seed=seed, C=C)
    torch_twin, reference, kind = COMPARISONS[fn]
    assert kind == "unary", kind
    ours = fn(device.put(x), axis=axis)
    assert device.is_array(ours) and ours.dtype == dtype
    ours = device.get(ours)
    expect = torch_twin(np.moveaxis(x, axis, -1), axis=-1)
    if fn is not fastxent.logsumexp:
        expect = np.moveaxis(expect, -1, axis)
    if dtype == np.float64:
        np.testing.assert_allclose(ours, expect, **TOL[np.float64])
    else:
        np.testing.assert_allclose(ours, expect, **TOL[np.float32])
        np.testing.assert_allclose(ours, reference(x, axis=axis), rtol=2e-6, atol=1e-6)


def check_bce(fn, device, *, dtype, shape, weights, reduction, seed=9):
    x, t, kw = bce_problem(shape, dtype, weights, seed)
    torch_twin, reference, kind = COMPARISONS[fn]
    xd, td, kwd = device.put(x), device.put(t), _on(device, kw)
    w_ = kw.get("weight", 1.0)
    pw_ = kw.get("pos_weight", 1.0)
    # float32 elementwise losses cancel ((1-t) x against l softplus(-x)), in
    # torch as here: the float32 check against the float64 reference is
    # relative to the size of the terms, not of their difference.
    terms = (np.abs(x) + (1 + (pw_ - 1) * t) * (np.abs(x) + 1.0)) * w_
    if kind == "bce":
        loss = fn(xd, td, reduction=reduction, **kwd)
        t_loss = torch_twin(x, t, reduction=reduction, **kw)
        r_loss = reference(x, t, reduction=reduction, **kw)
        # loss-only and fused paths are compiled separately: equal to rounding
        fused, _ = fastxent.binary_cross_entropy_with_logits_with_grad(
            xd, td, reduction=reduction, **kwd)
        np.testing.assert_allclose(device.get(loss), device.get(fused),
                                   rtol=4 * np.finfo(dtype).eps, atol=0)
    else:
        assert kind == "bce_grad", kind
        loss, grad = fn(xd, td, reduction=reduction, **kwd)
        t_loss, t_grad = torch_twin(x, t, reduction=reduction, **kw)
        r_loss, r_grad = reference(x, t, reduction=reduction, **kw)
    check_loss_type(device, loss, dtype, reduction)
    loss = device.get(loss)
    np.testing.assert_allclose(r_loss, t_loss, **TOL[np.float32])
    check_close(loss, t_loss, dtype, "loss")
    if dtype == np.float32:
        scale = {"none": terms, "sum": terms.sum(), "mean": terms.mean()}[reduction]
        assert np.all(np.abs(loss - r_loss) <= 2e-6 * np.abs(r_loss) + 2e-7 * scale)
    if kind == "bce":
        return
    assert device.is_array(grad) and grad.shape == x.shape and grad.dtype == dtype
    grad = device.get(grad)
    check_close(grad, t_grad, dtype, "grad")
    out = device.put(np.empty_like(x))
    _, g_out = fn(xd, td, reduction=reduction, out=out, **kwd)
    xi = device.put(x.copy())
    _, g_in = fn(xi, td, reduction=reduction, inplace=True, **kwd)
    assert g_out is out and g_in is xi
    np.testing.assert_array_equal(device.get(g_out), grad)
    # The in-place block loop is compiled separately and the gradient
    # (l sigmoid - l + 1 - t) cancels, so its bits may differ: it is held
    # to torch's gradient with the same tolerance.
    check_close(device.get(g_in), t_grad, dtype, "grad")


#: kind -> (check, the grid of its case parameters)
CHECKS = {
    "ce": check_cross_entropy,
    "ce_grad": check_cross_entropy,
    "nll": check_nll,
    "unary": check_unary,
    "bce": check_bce,
    "bce_grad": check_bce,
}
GRIDS = {
    check_cross_entropy: dict(dtype=DTYPES, layout=list(LAYOUTS), weighted=WEIGHTED,
                              target=TARGETS, smoothing=SMOOTHINGS, reduction=REDUCTIONS),
    check_nll: dict(dtype=DTYPES, layout=list(LAYOUTS), weighted=WEIGHTED,
                    target=HARD_TARGETS, reduction=REDUCTIONS),
    check_unary: dict(dtype=DTYPES, layout=list(LAYOUTS)),
    check_bce: dict(dtype=DTYPES, shape=list(BCE_SHAPES), weights=BCE_WEIGHTS,
                    reduction=REDUCTIONS),
}


def check(fn, device, **case):
    """Run one case of ``fn``'s grid on ``device`` against its twins."""
    return CHECKS[COMPARISONS[fn][2]](fn, device, **case)


# --------------------------------------------------------------------------
# the cases of a device


def covering(dims, strength=3):
    """Cases (dicts) in which every ``strength`` values of any ``strength``
    dimensions of ``dims`` (name -> values) meet at least once.

    Greedy and deterministic: each case starts from the first combination
    not yet covered and fills the other dimensions with the value that
    covers most new combinations (ties: the value used least so far).
    """
    names = list(dims)
    levels = [range(len(dims[n])) for n in names]
    subsets = list(itertools.combinations(range(len(names)), min(strength, len(names))))
    uncovered = {(s, v) for s in subsets for v in itertools.product(*(levels[i] for i in s))}
    used = [[0] * len(lv) for lv in levels]
    cases = []
    while uncovered:
        s, v = min(uncovered)
        row = dict(zip(s, v))
        for i in range(len(names)):
            if i in row:
                continue

            def gain(value, i=i):
                trial = {**row, i: value}
                return sum((sub, tuple(trial[j] for j in sub)) in uncovered
                           for sub in subsets if i in sub and all(j in trial for j in sub))

            row[i] = max(levels[i], key=lambda value, i=i: (gain(value), -used[i][value]))
        full = tuple(row[i] for i in range(len(names)))
        uncovered -= {(sub, tuple(full[j] for j in sub)) for sub in subsets}
        for i, value in enumerate(full):
            used[i][value] += 1
        cases.append({names[i]: dims[names[i]][full[i]] for i in range(len(names))})
    return cases


def device_cases(device):
    """[(fn, case)] of every function of the table on ``device``: the full
    grid on the CPU; on the GPU, a 3-wise covering array of the grid with
    the function and (for row kernels) ``GPU_CLASSES`` as dimensions."""
    out = []
    for check_fn, grid in GRIDS.items():
        fns = [f for f, (_, _, kind) in COMPARISONS.items() if CHECKS[kind] is check_fn]
        if device == "cpu":
            cases = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
            out += [(f, c) for f in fns for c in cases]
            continue
        dims = dict(fn=fns, **grid)
        if "layout" in grid:
            dims["C"] = GPU_CLASSES
        for case in covering(dims):
            out.append((case.pop("fn"), case))
    return out


def case_id(value):
    """pytest ids for ``device_cases``' entries."""
    if callable(value):
        return value.__name__
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            if k == "dtype":
                parts.append({np.float64: "f64", np.float32: "f32"}[v])
            elif k == "weighted":
                parts.append("w" if v else "now")
            elif k == "smoothing":
                parts.append(f"s{v}")
            elif k == "C":
                parts.append(f"C{v}")
            elif k == "weights":
                parts.append(f"w_{v}")
            else:
                parts.append(str(v))
        return "-".join(parts)
    return str(value)


# --------------------------------------------------------------------------
# options beyond torch's functions: a float64 torch reference with autograd
# written in a few lines, one check, run on both devices

Z_LOSS = 1e-2

#: The LLM options' combinations the option grid runs: each option alone and
#: all of them together, with and without the statistics.
LLM_OPTIONS = {
    "z": dict(z_loss=Z_LOSS),
    "z_stats": dict(z_loss=Z_LOSS, return_stats=True),
    "scale": dict(logit_scale=0.7),
    "cap": dict(softcap=3.0, z_loss=Z_LOSS),
    "all": dict(logit_scale=1.5, softcap=2.0, z_loss=Z_LOSS, return_stats=True),
}


def torch_ce_options(x, y, axis=-1, weight=None, ignore_index=-100, reduction="mean",
                     label_smoothing=0.0, z_loss=0.0, logit_scale=1.0, softcap=None):
    """Cross-entropy with the LLM options in float64 with autograd, in a few
    lines: the logits scaled (``x * logit_scale``) and capped
    (``softcap * tanh(x / softcap)``), each row's
    ``F.cross_entropy(reduction="none")`` plus ``z_loss * lse**2`` times the
    target's class weight (1 for probabilities, 0 for ignored rows), the
    cross-entropy's reduction by hand. Returns (loss, grad, lse, z-loss term
    reduced as the loss)."""
    xt = torch.from_numpy(np.moveaxis(np.asarray(x, np.float64), axis, 1).copy())
    xt.requires_grad_(True)
    v = xt * logit_scale
    if softcap is not None:
        v = softcap * torch.tanh(v / softcap)
    soft = y.dtype.kind == "f"
    yt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(y, axis, 1).astype(np.float64)
                                               if soft else y))
    wt = None if weight is None else torch.from_numpy(np.asarray(weight, np.float64))
    rows = F.cross_entropy(v, yt, weight=wt, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    lse = torch.logsumexp(v, dim=1)
    if soft:
        row_weight = torch.ones_like(lse)
        denominator = float(lse.numel())
    else:
        kept = yt != ignore_index
        safe = torch.where(kept, yt, torch.zeros_like(yt))
        w_t = torch.ones_like(lse) if wt is None else wt[safe]
        row_weight = torch.where(kept, w_t, torch.zeros_like(w_t))
        denominator = row_weight.sum()
    z_rows = row_weight * z_loss * lse ** 2
    rows = rows + z_rows

    def reduce(r):
        return {"none": r, "sum": r.sum(), "mean": r.sum() / denominator}[reduction]

    loss = reduce(rows)
    loss.sum().backward()
    return (loss.detach().numpy(), np.moveaxis(xt.grad.numpy(), 1, axis),
            lse.detach().numpy(), reduce(z_rows).detach().numpy())


def torch_ce_z_loss(x, y, axis=-1, **kw):
    """(loss, grad) of ``torch_ce_options``."""
    return torch_ce_options(x, y, axis, **kw)[:2]


def check_options(device, *, dtype, layout, weighted, target, smoothing, reduction, llm="z",
                  C=None, seed=0):
    """``cross_entropy_with_grad`` and ``cross_entropy`` with the options
    ``LLM_OPTIONS[llm]`` on ``device`` against ``torch_ce_options`` (float32
    results held as the table holds them against the float64 reference);
    with ``return_stats``, each statistic against torch too."""
    x, y, w, axis, options = target_problem(layout, dtype, target, seed, C)
    llm_kw = dict(LLM_OPTIONS[llm])
    stats = llm_kw.pop("return_stats", False)
    kw = dict(weight=w if weighted else None, reduction=reduction, label_smoothing=smoothing,
              **llm_kw, **options)
    result = fastxent.cross_entropy_with_grad(device.put(x), device.put(y), axis=axis,
                                              return_stats=stats, **_on(device, kw))
    loss_only = fastxent.cross_entropy(device.put(x), device.put(y), axis=axis,
                                       return_stats=stats, **_on(device, kw))
    assert len(result) == (3 if stats else 2)
    loss, grad = result[:2]
    t_loss, t_grad, t_lse, t_z = torch_ce_options(x, y, axis=axis, **kw)
    check_loss_type(device, loss, dtype, reduction)
    assert device.is_array(grad) and grad.shape == x.shape and grad.dtype == dtype
    rtol = 1e-10 if dtype == np.float64 else LOSS32_RTOL
    atol = 1e-12 if dtype == np.float64 else 1e-7
    if stats:
        loss_only, stats_only = loss_only
    for ours in (loss, loss_only):
        np.testing.assert_allclose(np.asarray(device.get(ours), np.float64), t_loss, rtol=rtol,
                                   atol=atol, err_msg="loss")
    np.testing.assert_allclose(device.get(grad), t_grad, rtol=rtol,
                               atol=1e-12 if dtype == np.float64 else GRAD32_ATOL,
                               err_msg="grad")
    if stats:
        for st in (result[2], stats_only):
            check_stats(device, st, x, y, axis, dtype, t_lse, t_z, reduction,
                        options.get("ignore_index", -100), rtol, atol)


def check_stats(device, stats, x, y, axis, dtype, t_lse, t_z, reduction, ignore_index, rtol,
                atol):
    """A ``CrossEntropyStats`` against torch: lse, the z-loss term, the
    argmax (``torch.argmax`` of the logits as given) and the accuracy."""
    assert isinstance(stats, fastxent.CrossEntropyStats)
    lse = device.get(stats.lse)
    assert lse.dtype == dtype and lse.shape == t_lse.shape
    np.testing.assert_allclose(lse, t_lse, rtol=rtol, atol=atol, err_msg="lse")
    z = np.asarray(device.get(stats.z_loss), np.float64)
    assert z.shape == np.shape(t_z)
    np.testing.assert_allclose(z, t_z, rtol=rtol, atol=atol, err_msg="z_loss term")
    expect = torch.argmax(torch.from_numpy(x), dim=axis).numpy()
    predicted = device.get(stats.predicted)
    assert predicted.dtype == np.int64
    np.testing.assert_array_equal(predicted, expect, err_msg="predicted")
    if y.dtype.kind == "f":
        assert stats.accuracy is None
        return
    kept = y != ignore_index
    accuracy = (expect[kept] == y[kept]).mean() if kept.any() else np.nan
    np.testing.assert_equal(stats.accuracy, accuracy)


def check_z_loss(device, **case):
    """``check_options`` with ``z_loss`` alone."""
    check_options(device, llm="z", **case)


#: The grid of the options' checks: the cross-entropy grid (label smoothing 0
#: and 0.2) and, on the CPU, class counts that take each layout strategy
#: (tiles, blocks, direct rows).
OPTION_GRID = dict(dtype=DTYPES, layout=list(LAYOUTS), weighted=WEIGHTED, target=TARGETS,
                   smoothing=[0.0, 0.2], reduction=REDUCTIONS, llm=list(LLM_OPTIONS))


def option_cases(device):
    """The cases of ``check_options`` on ``device``: every combination on the
    CPU (5 classes, and 100 and 300 for the 2-D layout); on the GPU, a
    pairwise covering array with ``GPU_CLASSES`` (the table's 3-wise one
    already runs the kernel's other options together)."""
    if device == "cpu":
        cases = [dict(zip(OPTION_GRID, v)) for v in itertools.product(*OPTION_GRID.values())]
        cases += [dict(c, C=n) for c in cases if c["layout"] == "2d" for n in (100, 300)]
        return cases
    return covering(dict(OPTION_GRID, C=GPU_CLASSES), strength=2)


# --------------------------------------------------------------------------
# The softmax Jacobian family's rows of the table (``tests/jacobian_parity.py``)

from tests import jacobian_parity as _jacobian  # noqa: E402  (its checks use the above)

COMPARISONS.update(_jacobian.COMPARISONS)
CHECKS.update(_jacobian.CHECKS)
GRIDS.update(_jacobian.GRIDS)

#: Public functions with a parity grid of their own instead of a row here:
#: the fused linear head takes a weight matrix, not logits (its grid against
#: ``F.linear_cross_entropy``: ``tests/test_linear.py``; on the GPU:
#: ``tests/cuda_sim/test_linear_gpu.py``).
OWN_SUITES = {"linear_cross_entropy", "linear_cross_entropy_with_grad",
              # tests/test_divergences.py, tests/test_distillation.py (and their simulator twins)
              "kl_div", "kl_div_with_grad", "binary_cross_entropy",
              "binary_cross_entropy_with_grad", "distillation_loss",
              "distillation_loss_with_grad"}


def public_functions():
    """The public functions the table must hold (all but ``OWN_SUITES``)."""
    return {n for n in fastxent.__all__ if n[0].islower()} - OWN_SUITES
