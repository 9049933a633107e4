"""fastxent.torch's kl_div, binary_cross_entropy and distillation_loss (and
their modules), and 16-bit CPU tensors through cross_entropy, against
PyTorch in float64.

Each loss is checked by ``gradcheck`` (finite differences, inside
``repeatable_backward``) and against the same loss written with PyTorch
operations, its gradient taken with a non-uniform ``grad_output`` for
``reduction="none"`` (the forward's buffer scaled per element or per row).
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import fastxent.torch as ft  # noqa: E402

D = torch.float64
C = 5


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, seed, scale=2.0):
    return torch.randn(shape, generator=_gen(seed), dtype=D) * scale


def _grad(loss, x, seed=9):
    """d(sum(loss * v))/dx for a fixed random v (1.5 for a scalar loss)."""
    if loss.dim() == 0:
        v = torch.tensor(1.5, dtype=loss.dtype)
    else:
        v = (torch.rand(loss.shape, generator=_gen(seed), dtype=D) + 0.5).to(loss.dtype)
    (g,) = torch.autograd.grad(loss, x, v)
    return g


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------
# The cases: name -> (input maker, fastxent.torch call, PyTorch call)

def _log_probs(shape=(4, C), seed=0):
    return torch.log_softmax(_randn(shape, seed), -1).requires_grad_(True)


def _kl_case(reduction, log_target):
    t = torch.log_softmax(_randn((4, C), 1), -1)
    if not log_target:
        t = t.exp()
        t[0, 0] = 0.0  # xlogy(0, 0) = 0
    kw = dict(reduction=reduction, log_target=log_target)
    return (_log_probs, lambda x, **more: ft.kl_div(x, t, **kw, **more),
            lambda x: F.kl_div(x, t, **kw))


def _probs(shape=(4, C), seed=0):
    # away from 0 and 1, where finite differences would step outside [0, 1]
    return (torch.rand(shape, generator=_gen(seed), dtype=D) * 0.8 + 0.1).requires_grad_(True)


def _bce_case(reduction, weighted):
    t = torch.rand((4, C), generator=_gen(1), dtype=D)
    kw = dict(reduction=reduction)
    if weighted:
        kw["weight"] = torch.rand((C,), generator=_gen(2), dtype=D) + 0.5
    return (_probs, lambda x, **more: ft.binary_cross_entropy(x, t, **kw, **more),
            lambda x: F.binary_cross_entropy(x, t, **kw))


def _student(shape=(4, C), seed=0):
    return _randn(shape, seed).requires_grad_(True)


def _reference_distillation(s, t, divergence="forward_kl", beta=0.5, temperature=1.0,
                            target=None, alpha=0.0, ignore_index=-100, reduction="batchmean"):
    """The distillation loss written with PyTorch operations (class dim 1, or 0 for (C,));
    ``t`` dense, -inf where a top-k teacher holds nothing."""
    d = 0 if s.dim() == 1 else 1
    T = temperature
    log_q, log_p = F.log_softmax(s / T, d), F.log_softmax(t / T, d)
    q, p = log_q.exp(), log_p.exp()

    def kl(a, log_a, log_b):  # xlogy: a probability of 0 adds 0
        return (torch.xlogy(a, a) - a * log_b).sum(d)

    if divergence == "forward_kl":
        div = kl(p, log_p, log_q)
    elif divergence == "reverse_kl":
        div = kl(q, log_q, log_p)
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        div = beta * kl(p, log_p, log_m) + (1 - beta) * kl(q, log_q, log_m)
    rows = T * T * div
    kept = torch.ones(rows.shape, dtype=torch.bool)
    if target is not None:
        kept = target != ignore_index
        if alpha > 0:
            safe = torch.where(kept, target, torch.zeros_like(target))
            ce = F.cross_entropy(s, safe, reduction="none")
            rows = alpha * ce + (1 - alpha) * rows
        rows = torch.where(kept, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / kept.sum()


def _topk_teacher(shape, k, seed):
    """(indices, values) of k distinct classes per row, along dim 1, and the dense
    teacher they stand for (-inf elsewhere)."""
    dense = _randn(shape, seed)
    values, indices = dense.topk(k, dim=1)
    full = torch.full(shape, -torch.inf, dtype=D).scatter(1, indices, values)
    return (indices, values), full


def _distill_case(layout, divergence, reduction, temperature=1.0, alpha=0.0, ignore=False,
                  topk=False):
    shape = {"NC": (4, C), "NCd": (2, C, 3)}[layout]
    batch = shape[:1] + shape[2:]
    if topk:
        teacher, dense = _topk_teacher(shape, 3, 1)
    else:
        teacher = dense = _randn(shape, 1)
    kw = dict(divergence=divergence, temperature=temperature, reduction=reduction)
    if alpha or ignore:
        target = torch.randint(0, C, batch, generator=_gen(3))
        if ignore:
            target.view(-1)[0] = -100
        kw.update(target=target, alpha=alpha)
    if divergence == "jsd":
        kw["beta"] = 0.3
    return (lambda: _student(shape), lambda x, **more: ft.distillation_loss(x, teacher, **kw,
                                                                            **more),
            lambda x: _reference_distillation(x, dense, **kw))


CASES = {}
for _r in ("mean", "sum", "batchmean", "none"):
    for _lt in (False, True):
        CASES[f"kl-{_r}-{'log' if _lt else 'prob'}"] = lambda r=_r, lt=_lt: _kl_case(r, lt)
for _r in ("mean", "sum", "none"):
    for _w in (False, True):
        CASES[f"bce-{_r}{'-w' if _w else ''}"] = lambda r=_r, w=_w: _bce_case(r, w)
for _div in ("forward_kl", "reverse_kl", "jsd"):
    for _r in ("batchmean", "sum", "none"):
        CASES[f"distill-NC-{_div}-{_r}"] = lambda d=_div, r=_r: _distill_case("NC", d, r)
CASES.update({
    "distill-NC-forward_kl-T2": lambda: _distill_case("NC", "forward_kl", "batchmean", 2.0),
    "distill-NC-jsd-T3-alpha": lambda: _distill_case("NC", "jsd", "batchmean", 3.0, 0.4, True),
    "distill-NCd-reverse_kl-alpha-none": lambda: _distill_case("NCd", "reverse_kl", "none",
                                                               1.5, 0.3, True),
    "distill-NC-forward_kl-ignore": lambda: _distill_case("NC", "forward_kl", "batchmean",
                                                          ignore=True),
    "distill-NC-forward_kl-topk": lambda: _distill_case("NC", "forward_kl", "batchmean", 2.0,
                                                        topk=True),
    "distill-NCd-jsd-topk-alpha-none": lambda: _distill_case("NCd", "jsd", "none", 1.0, 0.5,
                                                             True, topk=True),
})


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck(name):
    make, ours, _ = CASES[name]()
    with ft.repeatable_backward():
        assert torch.autograd.gradcheck(ours, (make(),))


@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_gradient_match_torch(name):
    make, ours, theirs = CASES[name]()
    x, x2 = make(), make()
    loss, expected = ours(x), theirs(x2)
    assert loss.shape == expected.shape and loss.dtype == expected.dtype
    _close(loss, expected)
    _close(_grad(loss, x), _grad(expected, x2))
    # loss.backward(): a grad_output of 1 hands the buffer on unscaled
    x3, x4 = make(), make()
    ours(x3).sum().backward()
    theirs(x4).sum().backward()
    _close(x3.grad, x4.grad)


def test_no_memory_of_a_previous_scaling():
    """Two losses in a row reuse the gradient buffer: the second is not scaled twice."""
    make, ours, theirs = CASES["distill-NC-forward_kl-none"]()
    for _ in range(3):
        x, x2 = make(), make()
        _close(_grad(ours(x), x), _grad(theirs(x2), x2))


@pytest.mark.parametrize("name", ["distill-NC-forward_kl-batchmean",
                                  "distill-NCd-reverse_kl-alpha-none",
                                  "distill-NCd-jsd-topk-alpha-none"])
def test_distillation_inplace_backward_matches_torch(name):
    make, ours, theirs = CASES[name]()
    w = make()
    x = w * 1.0  # not a leaf: an intermediate only the loss uses
    loss = ours(x, inplace_backward=True)
    w2 = make()
    expected = theirs(w2)
    _close(loss.detach(), expected.detach())
    _close(_grad(loss, w), _grad(expected, w2))


def test_modules_equal_the_functions():
    x, t = _log_probs(), torch.softmax(_randn((4, C), 1), -1)
    module = ft.KLDivLoss(reduction="batchmean")
    assert isinstance(module, torch.nn.Module)
    _close(module(x, t), ft.kl_div(x, t, reduction="batchmean"))
    lt = torch.log(t)
    _close(ft.KLDivLoss(reduction="sum", log_target=True)(x, lt),
           torch.nn.KLDivLoss(reduction="sum", log_target=True)(x, lt))
    p, weight = _probs(), torch.rand((C,), generator=_gen(2), dtype=D)
    ours, theirs = ft.BCELoss(weight=weight), torch.nn.BCELoss(weight=weight)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    _close(ours(p, t), theirs(p, t))
    _close(ours(p, t), ft.binary_cross_entropy(p, t, weight=weight))
    s, teacher = _student(), _randn((4, C), 1)
    y = torch.randint(0, C, (4,), generator=_gen(3))
    kw = dict(divergence="jsd", beta=0.2, temperature=2.0, alpha=0.3, ignore_index=1,
              reduction="sum")
    module = ft.DistillationLoss(**kw)
    assert isinstance(module, torch.nn.Module)
    _close(module(s, teacher, y), ft.distillation_loss(s, teacher, target=y, **kw))
    w = _student()
    x2 = w * 1.0
    got = ft.DistillationLoss(inplace_backward=True)(x2, teacher)
    _close(got.detach(), ft.distillation_loss(s, teacher).detach())
    # PyTorch's deprecated size_average / reduce are read as PyTorch reads them
    with pytest.warns(UserWarning, match="size_average"):
        legacy = ft.kl_div(x, t, size_average=False)
    _close(legacy, F.kl_div(x, t, reduction="sum"))


# --------------------------------------------------------------------------
# torch.compile

def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    t = torch.softmax(_randn((4, C), 1), 1)
    teacher = _randn((4, C), 2)
    topk, _ = _topk_teacher((4, C), 2, 4)
    y = torch.randint(0, C, (4,), generator=_gen(3))
    row_weights = torch.arange(1, 5, dtype=D)

    def step(s, q):
        log_q = torch.log_softmax(s, 1)
        kl = ft.kl_div(log_q, t, reduction="batchmean")
        kl_rows = ft.kl_div(log_q, t.log(), reduction="none", log_target=True)
        bce = ft.binary_cross_entropy(q, t, reduction="sum")
        distill = ft.distillation_loss(s, teacher, temperature=2.0, target=y, alpha=0.5)
        rows = ft.distillation_loss(s, topk, divergence="jsd", reduction="none")
        return kl + (kl_rows.sum(1) * row_weights).sum() + bce + distill + \
            (rows * row_weights).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s1, s2 = _student(), _student()
    q1, q2 = _probs(), _probs()
    got = compiled(s1, q1)
    got.backward()
    expected = step(s2, q2)
    expected.backward()
    _close(got, expected)
    _close(s1.grad, s2.grad)
    _close(q1.grad, q2.grad)
    with torch.no_grad():
        _close(compiled(s1, q1), expected.detach())


# --------------------------------------------------------------------------
# What PyTorch users expect

def _distill(x, **kw):
    return ft.distillation_loss(x, _randn((4, C), 1), **kw)


def test_distillation_inplace_backward_refuses_what_autograd_still_needs():
    leaf = _student()
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="inplace_backward=True.*leaf"):
        _distill(leaf, inplace_backward=True)
    assert torch.equal(leaf.detach(), before)
    w = _student()
    x = w * 1.0
    other = x.sin()  # sin saves its input for its backward
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match="another autograd operation saved it"):
        _distill(x, inplace_backward=True)
    assert torch.equal(x.detach(), before)
    other.sum().backward()  # still correct
    torch.testing.assert_close(w.grad, before.cos())
    with pytest.raises(RuntimeError, match="other tensors share its memory"):
        _distill(w.exp(), inplace_backward=True)  # exp saves its output


def test_no_gradient_computed_when_none_is_needed(monkeypatch):
    def no(*args, **kwargs):
        raise AssertionError("a gradient was computed")

    for name in ("kl_div_with_grad", "binary_cross_entropy_with_grad"):
        monkeypatch.setattr(ft._divergences, name, no)
    monkeypatch.setattr(ft._distillation, "distillation_loss_with_grad", no)
    x, p, s = _log_probs(), _probs(), _student()
    t = torch.softmax(_randn((4, C), 1), 1)
    teacher = _randn((4, C), 2)
    with torch.no_grad():
        losses = [ft.kl_div(x, t), ft.binary_cross_entropy(p, t),
                  ft.distillation_loss(s, teacher, inplace_backward=True)]
    assert not any(loss.requires_grad for loss in losses)
    _close(losses[0], F.kl_div(x, t).detach())
    _close(losses[2], _reference_distillation(s, teacher).detach())
    assert ft.kl_div(x.detach(), t).grad_fn is None
    with pytest.raises(AssertionError, match="a gradient was computed"):
        ft.distillation_loss(s, teacher)


def test_double_backward_is_refused():
    x, p, s = _log_probs(), _probs(), _student()
    t = torch.softmax(_randn((4, C), 1), 1)
    for loss, wrt in ((ft.kl_div(x, t), x), (ft.binary_cross_entropy(p, t), p),
                      (ft.distillation_loss(s, _randn((4, C), 2)), s)):
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, wrt, create_graph=True)


def test_targets_and_teachers_that_require_grad_are_refused():
    x, p, s = _log_probs(), _probs(), _student()
    t = torch.softmax(_randn((4, C), 1), 1).requires_grad_(True)
    with pytest.raises(ValueError, match="kl_div: target requires grad.*target.detach"):
        ft.kl_div(x, t)
    with pytest.raises(ValueError, match="binary_cross_entropy: target requires grad"):
        ft.binary_cross_entropy(p, t)
    with pytest.raises(ValueError, match="weight requires grad"):
        ft.binary_cross_entropy(p, t.detach(), weight=torch.ones(C, dtype=D,
                                                                 requires_grad=True))
    teacher = _randn((4, C), 2).requires_grad_(True)
    with pytest.raises(ValueError, match="teacher_logits requires grad.*student_logits only"):
        ft.distillation_loss(s, teacher)
    (indices, values), _ = _topk_teacher((4, C), 2, 4)
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        ft.distillation_loss(s, (indices, values.requires_grad_(True)))
    with torch.no_grad():  # nothing is differentiated: allowed
        ft.kl_div(x, t)
        ft.distillation_loss(s, teacher)
    _close(ft.distillation_loss(s, teacher.detach()),
           _reference_distillation(s, teacher.detach()))


def test_bad_teachers_and_inputs_are_refused_clearly():
    s = _student()
    with pytest.raises(TypeError, match="teacher_logits must be a tensor of the student's "
                                        "dtype torch.float64, got torch.float32"):
        ft.distillation_loss(s, torch.zeros(4, C))
    with pytest.raises(ValueError, match="tuple \\(indices, values\\)"):
        ft.distillation_loss(s, (torch.zeros(4, 2, dtype=torch.long),))
    with pytest.raises(ValueError, match="divergence must be one of"):
        ft.distillation_loss(s, _randn((4, C), 1), divergence="kl")
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
        ft.binary_cross_entropy(_student(), torch.rand(4, C, dtype=D))


# --------------------------------------------------------------------------
# 16-bit CPU tensors through cross_entropy

HALF = {"bf16": torch.bfloat16, "f16": torch.float16}
MANTISSA = {torch.bfloat16: (7, 2.0 ** -133), torch.float16: (10, 2.0 ** -24)}


def _ulp(values, dtype):
    """One unit in the last place of ``dtype`` at each of ``values`` (float64)."""
    bits, smallest = MANTISSA[dtype]
    a = values.abs()
    exponent = torch.floor(torch.log2(torch.where(a > 0, a, torch.ones_like(a))))
    return torch.clamp(2.0 ** (exponent - bits), min=smallest)


def _check_half_grad(ours, expect, dtype):
    """Each element within one ulp of the 16-bit type of the float64 gradient, or
    within 2e-6 of its largest magnitude (where terms cancel)."""
    assert ours.dtype == dtype
    bound = torch.clamp(_ulp(expect, dtype), min=2e-6 * expect.abs().max().item())
    error = (ours.double() - expect).abs()
    assert (error <= bound).all(), (error - bound).max()


def _check_half_loss(ours, expect, dtype):
    """The float32 loss (within 1e-5 relative of float64) rounded to the input's
    dtype: within half an ulp of it plus 1e-5 relative."""
    assert ours.dtype == dtype and ours.shape == expect.shape
    bound = 0.5 * _ulp(expect, dtype) + 1e-5 * expect.abs()
    assert ((ours.double() - expect).abs() <= bound).all(), (ours, expect)


def _check_half_backward(loss, expected, x, x64, reduction, dtype):
    """The 16-bit ``loss`` and its float64 twin ``expected`` (of ``x`` and
    ``x64``): the loss, then the gradient after a backward through both."""
    _check_half_loss(loss.detach(), expected.detach(), dtype)
    if reduction == "none":
        # powers of two: the in-place scaling by grad_output is exact, so the
        # gradient is still the kernel's rounding of the float64 value
        v = 2.0 ** torch.randint(-2, 3, loss.shape, generator=_gen(5)).double()
        loss.backward(v.to(dtype))
        expected.backward(v)
    else:
        loss.backward()
        expected.backward()
    _check_half_grad(x.grad, x64.grad, dtype)


@pytest.mark.parametrize("dtype", list(HALF.values()), ids=list(HALF))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(16, 300), (3, 7, 2)], ids=["long-rows", "NCd"])
def test_half_cross_entropy_matches_float64(dtype, reduction, shape):
    batch = shape[:1] + shape[2:]
    x = (_randn(shape, 0)).to(dtype).requires_grad_(True)
    y = torch.randint(0, shape[1], batch, generator=_gen(1))
    y.view(-1)[1] = 3
    kw = dict(reduction=reduction, label_smoothing=0.1, ignore_index=3)
    loss = ft.cross_entropy(x, y, **kw)
    x64 = x.detach().double().requires_grad_(True)
    expected = F.cross_entropy(x64, y, **kw)
    _check_half_backward(loss, expected, x, x64, reduction, dtype)


@pytest.mark.parametrize("dtype", list(HALF.values()), ids=list(HALF))
def test_half_inplace_soft_targets_and_compile(dtype):
    x64 = _randn((8, 200), 0)
    soft = torch.softmax(_randn((8, 200), 1), 1).to(dtype)
    w = x64.to(dtype).requires_grad_(True)
    loss = ft.cross_entropy(w * 1.0, soft, inplace_backward=True)
    loss.backward()
    ref = x64.to(dtype).double().requires_grad_(True)
    expected = F.cross_entropy(ref, soft.double())
    expected.backward()
    _check_half_loss(loss.detach(), expected.detach(), dtype)
    _check_half_grad(w.grad, ref.grad, dtype)
    # the fake tensors promise the input's dtype: compiled and eager agree
    torch._dynamo.reset()
    y = torch.randint(0, 200, (8,), generator=_gen(2))
    compiled = torch.compile(lambda v: ft.cross_entropy(v, y, reduction="none").sum(),
                             fullgraph=True, backend="aot_eager")
    a, b = x64.to(dtype).requires_grad_(True), x64.to(dtype).requires_grad_(True)
    got = compiled(a)
    got.backward()
    eager = ft.cross_entropy(b, y, reduction="none").sum()
    eager.backward()
    assert got.dtype == dtype
    assert torch.equal(got, eager) and torch.equal(a.grad, b.grad)


def test_half_bfloat16_crosses_without_a_copy():
    x = torch.randn(4, 6).bfloat16()
    a = ft._array(x)
    assert a.dtype.name == "bfloat16" and a.ctypes.data == x.data_ptr()
    assert torch.equal(ft._tensor(a, x), x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_half_softmax_forward_and_backward(name, dtype):
    """16-bit softmax / log_softmax through autograd: the output and the
    gradient in the input's dtype, each element within one unit in the last
    place of the float64 result or 2e-6 of its largest magnitude. The
    backward works from the saved 16-bit output, as PyTorch's does: its
    float64 twin takes the same output."""
    ours_fn, theirs_fn = getattr(ft, name), getattr(torch, name)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 37, generator=g, dtype=torch.float64) * 3).to(dtype).requires_grad_(True)
    up = torch.randn(4, 37, generator=g, dtype=torch.float64).to(dtype)
    out = ours_fn(x, 1)
    (grad,) = torch.autograd.grad(out, x, up)
    expect_out = theirs_fn(x.detach().double(), 1)
    o, u = out.detach().double(), up.double()
    if name == "softmax":
        expect_grad = o * (u - (o * u).sum(1, keepdim=True))
    else:
        expect_grad = u - o.exp() * u.sum(1, keepdim=True)
    for ours, expect in ((out, expect_out), (grad, expect_grad)):
        assert ours.dtype == dtype
        err = (ours.double() - expect).abs()
        ulp = expect.to(dtype).double().abs() * torch.finfo(dtype).eps
        assert torch.all((err <= ulp) | (err <= 2e-6 * expect.abs().max())), err.max()


def test_bfloat16_without_ml_dtypes_says_what_is_missing():
    code = ("import sys; sys.modules['ml_dtypes'] = None\n"
            "import torch, fastxent.torch as ft\n"
            "ft.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))\n"
            "try:\n"
            "    ft.cross_entropy(torch.randn(2, 3).bfloat16(), torch.tensor([0, 1]))\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=str(Path(__file__).parents[1]))
    assert "ml_dtypes is not installed" in result.stdout, result.stdout + result.stderr


# --------------------------------------------------------------------------
# 16-bit CPU tensors through kl_div and binary_cross_entropy


@pytest.mark.parametrize("dtype", list(HALF.values()), ids=list(HALF))
@pytest.mark.parametrize("fn,reduction", [("kl", "batchmean"), ("kl_log_target", "none"),
                                          ("bce", "mean")])
def test_half_divergences_match_float64(dtype, fn, reduction):
    if fn == "bce":
        x = (torch.rand((4, C), generator=_gen(0), dtype=D) * 0.8 + 0.1).to(dtype)
        t = torch.rand((4, C), generator=_gen(1), dtype=D).to(dtype)
        w = (torch.rand((C,), generator=_gen(2), dtype=D) + 0.5).to(dtype)
        ours = lambda v: ft.binary_cross_entropy(v, t, weight=w, reduction=reduction)  # noqa
        theirs = lambda v: F.binary_cross_entropy(v, t.double(), weight=w.double(),  # noqa
                                                  reduction=reduction)
    else:
        log_target = fn == "kl_log_target"
        x = torch.log_softmax(_randn((4, C), 0), -1).to(dtype)
        t = torch.log_softmax(_randn((4, C), 1), -1)
        t = (t if log_target else t.exp()).to(dtype)
        ours = lambda v: ft.kl_div(v, t, reduction=reduction, log_target=log_target)  # noqa
        theirs = lambda v: F.kl_div(v, t.double(), reduction=reduction,  # noqa
                                    log_target=log_target)
    x.requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    _check_half_backward(ours(x), theirs(x64), x, x64, reduction, dtype)


@pytest.mark.parametrize("dtype", list(HALF.values()), ids=list(HALF))
def test_half_distillation_matches_float64(dtype):
    """16-bit CPU student and teacher tensors (the top-k values too) cross
    as 16-bit arrays: loss in the student's dtype, gradient within one ulp."""
    s = _randn((5, 9), 0).to(dtype).requires_grad_(True)
    teacher = _randn((5, 9), 1).to(dtype)
    idx = torch.topk(teacher.double(), 4, dim=1).indices
    for t in (teacher, (idx, teacher.gather(1, idx))):
        s.grad = None
        loss = ft.distillation_loss(s, t, divergence="jsd", temperature=2.0)
        loss.backward()
        dense = teacher.double() if not isinstance(t, tuple) else torch.full(
            (5, 9), -torch.inf, dtype=torch.float64).scatter(1, idx, t[1].double())
        s64 = s.detach().double().requires_grad_(True)
        expected = _reference_distillation(s64, dense, divergence="jsd", temperature=2.0)
        expected.backward()
        _check_half_loss(loss.detach(), expected.detach(), dtype)
        _check_half_grad(s.grad, s64.grad, dtype)
