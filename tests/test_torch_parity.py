"""fastxent against PyTorch (CPU), option by option and in combination.

The comparison table (``COMPARISONS``: each public function -> its torch
twin and its float64 reference), the case grid, the problem builders and
the checks are in ``tests/parity.py``, shared with the GPU tests
(``tests/cuda_sim``); here they run on the CPU, over the whole grid. Shapes
are small: every new dtype / layout / None-ness combination is a Numba
compile, so parametrizations vary option *values* (reduction, ignore_index,
smoothing), which cost nothing, across a few compiled variants.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import fastxent
from tests import parity
from tests import reference as ref
from tests.parity import (BCE_SHAPES, BCE_WEIGHTS, COMPARISONS, CPU, DTYPES, HARD_TARGETS,
                          LAYOUTS, REDUCTIONS, SMOOTHINGS, TARGETS, check_close, problem,
                          tensor)

torch_ce = parity.twin(fastxent.cross_entropy_with_grad)


# --------------------------------------------------------------------------
# cross-entropy: every option and combination


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("weighted", [False, True], ids=["now", "w"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("smoothing", SMOOTHINGS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_combinations(dtype, layout, weighted, target, smoothing, reduction):
    for fn in (fastxent.cross_entropy, fastxent.cross_entropy_with_grad):
        parity.check(fn, CPU, dtype=dtype, layout=layout, weighted=weighted, target=target,
                     smoothing=smoothing, reduction=reduction)


def test_ignore_index_valid_class_changes_result():
    """ignore_index=2 must actually drop the class-2 rows (else the test above is vacuous)."""
    x, y, w, axis = problem("2d", np.float64, soft=False)
    assert (y == 2).any() and (y != 2).any()
    a = fastxent.cross_entropy(x, y, ignore_index=2)
    b = fastxent.cross_entropy(x, y)
    assert abs(a - b) > 1e-3
    _, g = fastxent.cross_entropy_with_grad(x, y, ignore_index=2, reduction="sum")
    assert np.all(g[y == 2] == 0) and np.all(g[y != 2] != 0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_grid_targets_ignore_some_rows_not_all(layout):
    """The grid's "hard_ignored" and "hard_ii_valid" targets each drop some rows."""
    for target in ("hard_ignored", "hard_ii_valid"):
        x, y, w, axis, options = parity.target_problem(layout, np.float64, target)
        ignored = y == options.get("ignore_index", -100)
        assert ignored.any() and not ignored.all(), target


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("weighted", [False, True], ids=["now", "w"])
def test_out_and_inplace_give_the_same_gradient(dtype, layout, weighted):
    x, y, w, axis = problem(layout, dtype, soft=False, seed=1)
    kw = dict(weight=w if weighted else None, label_smoothing=0.1, axis=axis, ignore_index=2)
    loss, grad = fastxent.cross_entropy_with_grad(x, y, **kw)
    out = np.full_like(x, np.nan)
    loss_o, grad_o = fastxent.cross_entropy_with_grad(x, y, out=out, **kw)
    assert grad_o is out
    xi = x.copy()
    loss_i, grad_i = fastxent.cross_entropy_with_grad(xi, y, inplace=True, **kw)
    assert grad_i is xi
    np.testing.assert_array_equal(grad_o, grad)
    np.testing.assert_array_equal(grad_i, grad)
    assert loss == loss_o == loss_i
    check_close(grad, torch_ce(x, y, **kw)[1], dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_inplace_soft_targets(dtype):
    x, q, w, axis = problem("ncdd", dtype, soft=True, seed=2)
    loss, grad = fastxent.cross_entropy_with_grad(x, q, axis=axis, label_smoothing=0.3)
    xi = x.copy()
    loss_i, grad_i = fastxent.cross_entropy_with_grad(xi, q, axis=axis, label_smoothing=0.3,
                                                      inplace=True)
    assert grad_i is xi and loss_i == loss
    np.testing.assert_array_equal(grad_i, grad)


# --------------------------------------------------------------------------
# non-contiguous inputs


def _noncontiguous_cases(rng):
    base = rng.standard_normal((8, 12))
    y6 = rng.integers(0, 6, 8)
    # name: (logits view, target, axis, equivalent contiguous (rows, C) logits)
    yield "column_slice", base[:, ::2], y6, -1, np.ascontiguousarray(base[:, ::2])
    yield "row_slice", base[::2, :6], y6[:4], -1, np.ascontiguousarray(base[::2, :6])
    yield "transpose_axis0", base.T, rng.integers(0, 12, 8), 0, np.ascontiguousarray(base)
    f = np.asfortranarray(base)
    yield "fortran", f, rng.integers(0, 12, 8), -1, np.ascontiguousarray(base)
    b3 = rng.standard_normal((3, 4, 5))
    yield "3d_transposed", b3.transpose(1, 0, 2), rng.integers(0, 5, (4, 3)), -1, \
        np.ascontiguousarray(b3.transpose(1, 0, 2)).reshape(12, 5)
    b4 = rng.standard_normal((2, 6, 3, 4))
    yield "ncdd_sliced", b4[:, :, :, ::2], rng.integers(0, 6, (2, 3, 2)), 1, None


@pytest.mark.parametrize("case", list(range(6)))
def test_noncontiguous_inputs(case):
    name, x, y, axis, _ = list(_noncontiguous_cases(np.random.default_rng(3)))[case]
    assert not x.flags.c_contiguous, name
    for reduction in REDUCTIONS:
        loss, grad = fastxent.cross_entropy_with_grad(x, y, axis=axis, reduction=reduction,
                                                      label_smoothing=0.1)
        t_loss, t_grad = torch_ce(np.ascontiguousarray(x), y, axis=axis, reduction=reduction,
                                   label_smoothing=0.1)
        np.testing.assert_allclose(loss, t_loss, rtol=1e-10, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(grad, t_grad, rtol=1e-10, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(fastxent.logsumexp(x, axis=axis),
                               ref.logsumexp(x, axis=axis), rtol=1e-12, err_msg=name)
    np.testing.assert_allclose(fastxent.log_softmax(x, axis=axis),
                               ref.log_softmax(x, axis=axis), rtol=1e-12, atol=1e-13,
                               err_msg=name)
    # the gradient written in place over the same kind of view (of a fresh base)
    xi = list(_noncontiguous_cases(np.random.default_rng(3)))[case][1]
    np.testing.assert_array_equal(xi, x)
    _, g_inplace = fastxent.cross_entropy_with_grad(xi, y, axis=axis, inplace=True)
    _, g = fastxent.cross_entropy_with_grad(x, y, axis=axis)
    assert g_inplace is xi
    # Not bit-identical: a strided destination takes the kernels' scalar
    # loops, a new contiguous one the vectorized (reassociated) sums.
    np.testing.assert_allclose(g_inplace, g, rtol=1e-14, atol=1e-17)


def test_inplace_into_strided_view_leaves_the_rest_alone():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((6, 10))
    before = base.copy()
    view = base[:, 1::2]
    y = rng.integers(0, 5, 6)
    expect = torch_ce(np.ascontiguousarray(view), y)[1]
    _, g = fastxent.cross_entropy_with_grad(view, y, inplace=True)
    assert g is view
    np.testing.assert_allclose(base[:, 1::2], expect, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(base[:, ::2], before[:, ::2])


def test_targets_of_any_integer_dtype_and_noncontiguous():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 4))
    y = rng.integers(0, 4, 12)[::2]
    expect = fastxent.cross_entropy(x, y.astype(np.int64))
    for dt in (np.int8, np.uint8, np.int16, np.int32, np.uint32, np.int64):
        assert fastxent.cross_entropy(x, y.astype(dt)) == expect


# --------------------------------------------------------------------------
# the other functions of the table


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("weighted", [False, True], ids=["now", "w"])
def test_nll_loss(dtype, layout, weighted):
    for target in HARD_TARGETS:  # ignore_index -100 (none, then some, ignored) and 2
        for reduction in REDUCTIONS:
            parity.check(fastxent.nll_loss, CPU, dtype=dtype, layout=layout, weighted=weighted,
                         target=target, reduction=reduction)


@pytest.mark.parametrize("fn", [fastxent.log_softmax, fastxent.softmax, fastxent.logsumexp],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_unary(fn, dtype, layout):
    parity.check(fn, CPU, dtype=dtype, layout=layout)


@pytest.mark.parametrize("fn", [fastxent.log_softmax, fastxent.softmax], ids=lambda f: f.__name__)
def test_unary_out_and_in_place(fn):
    x, _, _, axis = problem("ncdd", np.float64, soft=False, seed=8)
    expect = fn(x, axis=axis)
    out = np.empty_like(x)
    assert fn(x, axis=axis, out=out) is out
    np.testing.assert_array_equal(out, expect)
    xi = x.copy()
    assert fn(xi, axis=axis, out=xi) is xi
    np.testing.assert_array_equal(xi, expect)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("shape", list(BCE_SHAPES))
@pytest.mark.parametrize("weights", BCE_WEIGHTS)
def test_bce_with_logits(dtype, shape, weights):
    for reduction in REDUCTIONS:
        for fn in (fastxent.binary_cross_entropy_with_logits,
                   fastxent.binary_cross_entropy_with_logits_with_grad):
            parity.check(fn, CPU, dtype=dtype, shape=shape, weights=weights,
                         reduction=reduction)


# --------------------------------------------------------------------------
# loss objects


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_loss_object(reduction):
    x, y, w, axis = problem("ncdd", np.float64, soft=False, seed=10)
    crit = fastxent.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1, axis=axis,
                                     reduction=reduction)
    with pytest.raises(RuntimeError, match="loss computed first"):
        crit.backward()
    loss = crit(x, y)
    t_crit = torch.nn.CrossEntropyLoss(weight=tensor(w), ignore_index=2, label_smoothing=0.1,
                                       reduction=reduction)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    t_loss = t_crit(xt, torch.from_numpy(y))
    t_loss.sum().backward()
    np.testing.assert_allclose(loss, t_loss.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(crit.backward(), xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    assert crit.forward(x, y) == loss if reduction != "none" else True
    xi = x.copy()
    crit_i = fastxent.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1,
                                       axis=axis, reduction=reduction, inplace=True)
    crit_i(xi, y)
    assert crit_i.backward() is xi
    np.testing.assert_array_equal(xi, crit.backward())


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_loss_object(reduction):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((5, 3))
    t = rng.random((5, 3))
    pw = np.array([0.5, 1.0, 2.0])
    crit = fastxent.BCEWithLogitsLoss(pos_weight=pw, reduction=reduction)
    with pytest.raises(RuntimeError):
        crit.backward()
    loss = crit(x, t)
    t_crit = torch.nn.BCEWithLogitsLoss(pos_weight=tensor(pw), reduction=reduction)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    t_loss = t_crit(xt, torch.from_numpy(t))
    t_loss.sum().backward()
    np.testing.assert_allclose(loss, t_loss.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(crit.backward(), xt.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_every_public_function_has_a_twin():
    names = {f.__name__ for f in COMPARISONS}
    assert names == parity.public_functions()
    assert {fn for fn, _ in parity.device_cases("cpu")} == set(COMPARISONS)


def test_gpu_cases_cover_every_three_values():
    """``device_cases("cuda")`` (the simulator's share of the grid): any 3
    values of any 3 dimensions (the function and the class count among
    them) meet in some case."""
    cases = parity.device_cases("cuda")
    for check_fn, grid in parity.GRIDS.items():
        fns = [f for f, (_, _, kind) in COMPARISONS.items() if parity.CHECKS[kind] is check_fn]
        dims = dict(fn=fns, **grid, **({"C": parity.GPU_CLASSES} if "layout" in grid else {}))
        rows = [dict(case, fn=f) for f, case in cases if f in fns]
        assert all(row.keys() == dims.keys() for row in rows)
        for names in itertools.combinations(dims, 3):
            seen = {tuple(repr(row[n]) for n in names) for row in rows}
            for values in itertools.product(*(dims[n] for n in names)):
                assert tuple(map(repr, values)) in seen, (names, values)


def test_no_test_takes_the_benchmark_peers_as_reference():
    """``tests/reference.py`` is the one float64 reference: only the
    benchmark table's own tests use ``fastxent._peers``."""
    tests = Path(__file__).resolve().parent
    allowed = {tests / "test_benchmarks.py", Path(__file__).resolve()}
    pattern = re.compile(r"_peers|numpy_(cross_entropy|soft_cross_entropy|log_softmax|"
                         r"logsumexp|bce_with_logits)")
    users = [p.relative_to(tests) for p in tests.rglob("*.py")
             if p not in allowed and pattern.search(p.read_text())]
    assert not users, users


# --------------------------------------------------------------------------
# properties of the float64 reference itself


def test_reference_shift_invariance():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((5, 4))
    y = rng.integers(0, 4, 5)
    w = rng.random(4) + 0.1
    for kw in (dict(), dict(weight=w, label_smoothing=0.3), dict(reduction="none")):
        a, ga = ref.cross_entropy_with_grad(x, y, **kw)
        b, gb = ref.cross_entropy_with_grad(x + 123.25, y, **kw)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ga, gb, rtol=1e-10, atol=1e-13)


def test_reference_gradient_is_softmax_minus_one_hot():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((5, 4))
    y = rng.integers(0, 4, 5)
    _, g = ref.cross_entropy_with_grad(x, y, reduction="sum")
    e = np.exp(x)
    np.testing.assert_allclose(g, e / e.sum(1, keepdims=True) - np.eye(4)[y], rtol=1e-12,
                               atol=1e-15)
    # and the plain formula for the loss
    loss = ref.cross_entropy(x, y, reduction="none")
    np.testing.assert_allclose(loss, np.log(e.sum(1)) - x[np.arange(5), y], rtol=1e-12)
