"""The softmax Jacobian family against float64 PyTorch, on any device.

Shared by the CPU tests (``tests/test_jacobian.py``, the whole grid) and
the GPU simulator tests (``tests/cuda_sim/test_jacobian_gpu.py``, a covering
array of it on tiny shapes). Inputs are built on the host, moved with the
device's ``put`` and results brought back with ``get`` (``tests/parity``).

The twins:

* ``softmax_backward``: ``torch._softmax_backward_data``;
* ``log_softmax_backward``: ``torch._log_softmax_backward_data``;
* ``softmax_jacobian``: ``torch.autograd.functional.jacobian`` of softmax,
  row by row;
* ``cross_entropy_hvp``: ``torch.func.jvp(torch.func.grad(loss), (logits,),
  (vector,))`` of the cross-entropy (plus the z-loss written out as
  ``tests.parity.torch_ce_z_loss`` does), the class axis moved to 1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import fastxent
DTYPES = [np.float64, np.float32]
# (shape, axis): plain rows, (N, C, d) (torch's layout), the class axis first,
# (N, T, C); "long": rows of the CPU's direct kernels (not in the table's grid)
LAYOUTS = {"2d": ((6, 5), -1), "ncd": ((3, 5, 4), 1), "axis0": ((5, 6), 0),
           "ntc": ((2, 3, 5), -1), "long": ((4, 300), -1),
           # several tiles of strided rows, the last one partial: slabs
           # wider than a tile (3 tiles each), the class axis first (4 tiles)
           "wide_slabs": ((3, 7, 40), 1), "many_axis0": ((7, 50), 0)}
TABLE_LAYOUTS = ["2d", "ncd", "axis0"]  # "ntc" takes the 2-D path of "2d"
#: float64 against float64 torch; float32 against float64 torch of the same inputs
TOL = {np.float64: dict(rtol=1e-10, atol=1e-13), np.float32: dict(rtol=2e-5, atol=2e-7)}


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def _shape(layout, C):
    """(shape, axis) of a layout, ``C`` (if given) replacing its class count."""
    shape, axis = LAYOUTS[layout]
    if C is not None:
        a = axis % len(shape)
        shape = shape[:a] + (C,) + shape[a + 1:]
    return shape, axis


def inputs(layout, dtype, seed=0, C=None):
    """(x, g, axis): logits and a gradient of the layout's shape."""
    shape, axis = _shape(layout, C)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    return x, g, axis


def torch_backward(g, o, axis, log):
    fn = torch._log_softmax_backward_data if log else torch._softmax_backward_data
    return fn(_t(g), _t(o), axis % g.ndim, torch.float64).numpy()


def close(ours, expect, dtype, what=""):
    tol = TOL[np.dtype(dtype).type]
    scale = max(1.0, float(np.abs(expect).max())) if expect.size else 1.0
    np.testing.assert_allclose(np.asarray(ours, np.float64), expect, rtol=tol["rtol"],
                               atol=tol["atol"] * scale, err_msg=what)


def check_backward(fn, device, *, dtype, layout, mode, C=None, seed=0):
    """``mode``: "new", "out" or "inplace"."""
    log = fn is fastxent.log_softmax_backward
    x, g, axis = inputs(layout, dtype, seed, C)
    fwd = fastxent.log_softmax if log else fastxent.softmax
    o = np.asarray(fwd(x, axis=axis))
    expect = torch_backward(g, o, axis, log)
    gd, od = device.put(g), device.put(o)
    if mode == "new":
        result = fn(gd, od, axis=axis)
    elif mode == "out":
        out = device.put(np.full(g.shape, np.nan, dtype))
        result = fn(gd, od, axis=axis, out=out)
        assert result is out
    else:
        result = fn(gd, od, axis=axis, inplace=True)
        assert result is gd
    assert device.is_array(result) and result.dtype == dtype and result.shape == g.shape
    close(device.get(result), expect, dtype, f"{fn.__name__} {mode}")
    if mode != "inplace":
        np.testing.assert_array_equal(device.get(gd), g)  # the input is kept


def torch_jacobian(x, axis):
    """d softmax / d x per row of ``x`` (class axis ``axis``), batch + (C, C)."""
    rows = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    C = rows.shape[-1]
    flat = rows.reshape(-1, C)
    jac = [torch.autograd.functional.jacobian(lambda z: torch.softmax(z, -1), _t(r)).numpy()
           for r in flat]
    return np.array(jac).reshape(rows.shape[:-1] + (C, C))


def check_jacobian(fn, device, *, dtype, layout, C=None, seed=0, big_logit=False):
    assert fn is fastxent.softmax_jacobian
    x, _, axis = inputs(layout, dtype, seed, C)
    if layout == "long":  # C x C per row: keep it small
        x = x[..., :40]
    if big_logit:
        x.flat[0] = 80.0  # exp(80) overflows float32 without the max shift
    result = fastxent.softmax_jacobian(device.put(x), axis=axis)
    assert device.is_array(result) and result.dtype == dtype
    expect = torch_jacobian(x, axis)
    assert result.shape == expect.shape
    got = device.get(result)
    assert np.all(np.isfinite(got))
    close(got, expect, dtype, "jacobian")


# --------------------------------------------------------------------------
# the Hessian-vector product

Z_LOSS = 1e-2
HVP_TARGETS = ["hard", "hard_ignored", "hard_ii_valid", "soft"]


#: The LLM options of the product's table (``check_hvp``'s ``llm``): the
#: loss then reads u = softcap tanh(logit_scale x / softcap).
HVP_LLM = {"none": {}, "scale": dict(logit_scale=0.7),
           "cap": dict(logit_scale=1.5, softcap=2.0)}


def torch_loss(xt, y, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
               z_loss=0.0, logit_scale=1.0, softcap=None):
    """Cross-entropy (class axis 1) plus the z-loss, summed for "none", of the
    logits scaled and capped first."""
    soft = y.dtype.is_floating_point
    xt = xt * logit_scale
    if softcap is not None:
        xt = softcap * torch.tanh(xt / softcap)
    rows = F.cross_entropy(xt, y, weight=weight, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    if z_loss:
        lse = torch.logsumexp(xt, dim=1)
        if soft:
            row_weight = torch.ones_like(lse)
        else:
            kept = y != ignore_index
            safe = torch.where(kept, y, torch.zeros_like(y))
            w_t = torch.ones_like(lse) if weight is None else weight[safe]
            row_weight = torch.where(kept, w_t, torch.zeros_like(w_t))
        rows = rows + row_weight * z_loss * lse ** 2
    if reduction == "mean":
        if soft:
            return rows.sum() / rows.numel()
        kept = y != ignore_index
        safe = torch.where(kept, y, torch.zeros_like(y))
        w_t = torch.ones(y.shape, dtype=xt.dtype) if weight is None else weight[safe]
        return rows.sum() / torch.where(kept, w_t, torch.zeros_like(w_t)).sum()
    return rows.sum()


def torch_hvp(x, y, v, axis=-1, weight=None, **kw):
    """PyTorch's double backward: jvp of the gradient, in float64."""
    xt = _t(np.moveaxis(x, axis, 1))
    vt = _t(np.moveaxis(v, axis, 1))
    soft = y.dtype.kind == "f"
    yt = _t(np.moveaxis(y, axis, 1)) if soft else torch.from_numpy(np.ascontiguousarray(y))
    wt = None if weight is None else _t(weight)
    _, hv = torch.func.jvp(torch.func.grad(lambda z: torch_loss(z, yt, weight=wt, **kw)),
                           (xt,), (vt,))
    return np.moveaxis(hv.numpy(), 1, axis)


def hvp_problem(layout, dtype, target, seed=0, C=None):
    """(x, y, v, w, axis, options) of a layout of ``LAYOUTS``, class ids and
    probabilities as the cross-entropy table builds them."""
    shape, axis = _shape(layout, C)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    a = axis % len(shape)
    C = shape[a]
    batch = shape[:a] + shape[a + 1:]
    options = {}
    if target == "soft":
        q = rng.random(shape)
        y = (q / q.sum(axis=axis, keepdims=True)).astype(dtype)
    else:
        y = rng.integers(0, C, batch)
        y.reshape(-1)[::3] = 2
        if target == "hard_ignored":
            y.reshape(-1)[1::4] = -100
        elif target == "hard_ii_valid":
            options["ignore_index"] = 2
    v = rng.standard_normal(shape).astype(dtype)
    w = (rng.random(C) + 0.5).astype(dtype)
    return x, y, v, w, axis, options


def check_hvp(fn, device, *, dtype, layout, weighted, target, smoothing, reduction, z_loss,
              C=None, mode="new", seed=0, llm="none"):
    assert fn is fastxent.cross_entropy_hvp
    x, y, v, w, axis, options = hvp_problem(layout, dtype, target, seed, C)
    kw = dict(weight=w if weighted else None, reduction=reduction, label_smoothing=smoothing,
              z_loss=z_loss, **options, **HVP_LLM[llm])
    expect = torch_hvp(x, y, v, axis=axis, **kw)
    on = {k: device.put(val) if isinstance(val, np.ndarray) else val for k, val in kw.items()}
    if mode == "out":
        out = device.put(np.full(x.shape, np.nan, dtype))
        result = fastxent.cross_entropy_hvp(device.put(x), device.put(y), device.put(v),
                                            axis=axis, out=out, **on)
        assert result is out
    else:
        result = fastxent.cross_entropy_hvp(device.put(x), device.put(y), device.put(v),
                                            axis=axis, **on)
    assert device.is_array(result) and result.dtype == dtype and result.shape == x.shape
    close(device.get(result), expect, dtype, "hvp")


# --------------------------------------------------------------------------
# the rows of ``tests/parity.py``'s table: fastxent function -> (torch twin,
# float64 reference (torch in float64 is the reference here), kind), the
# kind's check and its grid


def _twin_backward(log):
    return lambda g, o, axis=-1: torch_backward(g, o, axis, log)


COMPARISONS = {
    fastxent.softmax_backward: (_twin_backward(False), _twin_backward(False), "backward"),
    fastxent.log_softmax_backward: (_twin_backward(True), _twin_backward(True), "backward"),
    fastxent.softmax_jacobian: (torch_jacobian, torch_jacobian, "jacobian"),
    fastxent.cross_entropy_hvp: (torch_hvp, torch_hvp, "hvp"),
}
CHECKS = {"backward": check_backward, "jacobian": check_jacobian, "hvp": check_hvp}
GRIDS = {
    check_backward: dict(dtype=DTYPES, layout=TABLE_LAYOUTS, mode=["new", "out", "inplace"]),
    check_jacobian: dict(dtype=DTYPES, layout=TABLE_LAYOUTS),
    check_hvp: dict(dtype=DTYPES, layout=TABLE_LAYOUTS, weighted=[False, True],
                    target=HVP_TARGETS, smoothing=[0.0, 0.2], reduction=["mean", "sum", "none"],
                    z_loss=[0.0, Z_LOSS]),
}

