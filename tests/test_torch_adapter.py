"""fastxent.torch: the losses as PyTorch operators, against torch.nn in float64.

Gradients are checked three ways: ``torch.autograd.gradcheck`` (finite
differences) inside ``repeatable_backward`` (gradcheck runs several
backwards through one forward), and the default path (the forward's buffer
scaled in place by the backward) against PyTorch's autograd, for every
option, reduction and layout.
"""

import gc
import subprocess
import sys
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import fastxent.torch as ft  # noqa: E402

D = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _logits(shape, seed=0, requires_grad=True):
    x = torch.randn(shape, generator=_gen(seed), dtype=D) * 2
    return x.requires_grad_(requires_grad)


def _classes(shape, c, seed=1):
    return torch.randint(0, c, shape, generator=_gen(seed))


# --------------------------------------------------------------------------
# The cases: (fastxent.torch call, torch.nn.functional call, input shape)

C = 5

_LAYOUTS = {
    "NC": ((6, C), (6,)),
    "NCd": ((2, C, 3), (2, 3)),
    "C": ((C,), ()),
}


def _ce_case(layout, reduction, weighted=False, ignore=False, smoothing=0.0, soft=False):
    shape, batch = _LAYOUTS[layout]
    if soft:
        target = torch.softmax(torch.randn(shape, generator=_gen(2), dtype=D), _dim(shape))
    else:
        target = _classes(batch, C)
        if ignore:
            target = target.clone()
            target.view(-1)[0] = 3  # a valid class, ignored
    options = dict(reduction=reduction, label_smoothing=smoothing)
    if weighted:
        options["weight"] = torch.rand(C, generator=_gen(3), dtype=D) + 0.5
    if ignore:
        options["ignore_index"] = 3
    return (lambda x, **extra: ft.cross_entropy(x, target, **options, **extra),
            lambda x: F.cross_entropy(x, target, **options), shape)


def _dim(shape):
    return 0 if len(shape) == 1 else 1


CE_CASES = {
    f"ce-{layout}-{reduction}{'-w' if w else ''}{'-ig' if ig else ''}{'-ls' if ls else ''}":
        (layout, reduction, w, ig, ls, False)
    for layout in ("NC", "NCd")
    for reduction in ("mean", "sum", "none")
    for w, ig, ls in ((False, False, 0.0), (True, True, 0.1))
}
CE_CASES.update({
    "ce-C-mean": ("C", "mean", False, False, 0.0, False),
    "ce-NC-mean-ig": ("NC", "mean", False, True, 0.0, False),
    "ce-NC-mean-ls": ("NC", "mean", False, False, 0.2, False),
    "ce-NC-soft-mean": ("NC", "mean", False, False, 0.0, True),
    "ce-NCd-soft-none-w-ls": ("NCd", "none", True, False, 0.1, True),
})


def _case(name):
    if name.startswith("ce-"):
        return _ce_case(*CE_CASES[name][:2], weighted=CE_CASES[name][2],
                        ignore=CE_CASES[name][3], smoothing=CE_CASES[name][4],
                        soft=CE_CASES[name][5])
    if name.startswith("nll-"):
        _, layout, reduction, extra = name.split("-")
        shape, batch = _LAYOUTS[layout]
        target = _classes(batch, C)
        options = dict(reduction=reduction)
        if extra == "wig":
            options.update(weight=torch.rand(C, generator=_gen(3), dtype=D) + 0.5,
                           ignore_index=int(target.view(-1)[0]))
        return (lambda x, **more: ft.nll_loss(x, target, **options, **more),
                lambda x: F.nll_loss(x, target, **options), shape)
    _, reduction, extra = name.split("-")
    shape = (4, 3, C)
    target = torch.rand(shape, generator=_gen(2), dtype=D)
    options = dict(reduction=reduction)
    if extra == "wpw":
        options.update(weight=torch.rand(3, 1, generator=_gen(3), dtype=D),
                       pos_weight=torch.rand(C, generator=_gen(4), dtype=D) + 0.5)
    return (lambda x, **more: ft.binary_cross_entropy_with_logits(x, target, **options, **more),
            lambda x: F.binary_cross_entropy_with_logits(x, target, **options), shape)


NLL_CASES = [f"nll-{layout}-{reduction}-{extra}" for layout in ("NC", "NCd")
             for reduction in ("mean", "sum", "none") for extra in ("plain", "wig")]
BCE_CASES = [f"bce-{reduction}-{extra}" for reduction in ("mean", "sum", "none")
             for extra in ("plain", "wpw")]
ALL_CASES = list(CE_CASES) + NLL_CASES + BCE_CASES
FUSED_CASES = list(CE_CASES) + BCE_CASES


def _backward_and_grad(loss, x, seed=5):
    """d(sum(loss * v))/dx for a fixed random v (v = 1.5 for a scalar loss)."""
    if loss.dim() == 0:
        v = torch.tensor(1.5, dtype=D)
    else:
        v = torch.rand(loss.shape, generator=_gen(seed), dtype=D) + 0.5
    (g,) = torch.autograd.grad(loss, x, v)
    return g


@pytest.mark.parametrize("name", ALL_CASES)
def test_gradcheck(name):
    ours, _, shape = _case(name)
    x = _logits(shape)
    with ft.repeatable_backward():
        assert torch.autograd.gradcheck(ours, (x,))


@pytest.mark.parametrize("name", ALL_CASES)
def test_loss_and_gradient_match_torch(name):
    ours, theirs, shape = _case(name)
    x = _logits(shape)
    loss, expected = ours(x), theirs(x)
    assert loss.shape == expected.shape and loss.dtype == expected.dtype
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_backward_and_grad(loss, x), _backward_and_grad(expected, x),
                               rtol=1e-10, atol=1e-12)
    # loss.backward() (grad_output 1: the buffer is returned unscaled)
    x2 = _logits(shape)
    ours(x2).sum().backward()
    x3 = _logits(shape)
    theirs(x3).sum().backward()
    torch.testing.assert_close(x2.grad, x3.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", FUSED_CASES)
def test_inplace_backward_matches_torch(name):
    ours, theirs, shape = _case(name)
    w = _logits(shape)
    x = w * 1.0  # not a leaf: an intermediate only the loss uses
    loss = ours(x, inplace_backward=True)
    expected = theirs(w.detach())
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-10, atol=1e-12)
    g = _backward_and_grad(loss, w)
    w2 = _logits(shape)
    torch.testing.assert_close(g, _backward_and_grad(theirs(w2), w2), rtol=1e-10, atol=1e-12)


def test_float32_matches_torch():
    x = torch.randn(64, 1000, generator=_gen(), dtype=torch.float32, requires_grad=True)
    y = _classes((64,), 1000)
    loss = ft.cross_entropy(x, y, label_smoothing=0.1)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    expected = F.cross_entropy(x64, y, label_smoothing=0.1)
    expected.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) <= 2e-6 * abs(expected.item())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_z_loss_matches_its_definition(reduction):
    x = _logits((6, C))
    y = _classes((6,), C)
    loss = ft.cross_entropy(x, y, reduction=reduction, z_loss=0.01)
    x2 = _logits((6, C))
    rows = F.cross_entropy(x2, y, reduction="none") + 0.01 * torch.logsumexp(x2, 1) ** 2
    expected = rows.mean() if reduction == "mean" else rows
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_backward_and_grad(loss, x), _backward_and_grad(expected, x2),
                               rtol=1e-10, atol=1e-12)


def test_modules_are_drop_in():
    weight = torch.rand(C, generator=_gen(3), dtype=D)
    ours = ft.CrossEntropyLoss(weight=weight, ignore_index=1, label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=1, label_smoothing=0.1)
    assert isinstance(ours, torch.nn.Module)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x, y = _logits((6, C)), _classes((6,), C)
    torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=1e-10, atol=1e-12)
    pos_weight = torch.rand(C, generator=_gen(4), dtype=D)
    ours = ft.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="sum")
    theirs = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="sum")
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    t = torch.rand((6, C), generator=_gen(2), dtype=D)
    torch.testing.assert_close(ours(x, t), theirs(x, t), rtol=1e-10, atol=1e-12)
    # PyTorch's deprecated size_average / reduce are read as PyTorch reads them
    with pytest.warns(UserWarning, match="size_average"):
        legacy = ft.cross_entropy(x, y, size_average=False)
    torch.testing.assert_close(legacy, F.cross_entropy(x, y, reduction="sum"))


# --------------------------------------------------------------------------
# A small model trained both ways

def _train(criterion, steps=50):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 10)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(128, 20, generator=_gen(7), dtype=D)
    y = _classes((128,), 10, seed=8)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return np.array(losses)


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "ignore_index": 3}])
def test_training_matches_torch_nn(options):
    expected = _train(torch.nn.CrossEntropyLoss(**options))
    got = _train(ft.CrossEntropyLoss(**options))
    got_inplace = _train(ft.CrossEntropyLoss(**options, inplace_backward=True))
    assert expected[-1] < 0.8 * expected[0]  # it trained
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(got_inplace, expected, rtol=1e-6)


# --------------------------------------------------------------------------
# torch.compile

@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()

    def step(x, y, t):
        ce = ft.cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-3)
        per_row = ft.cross_entropy(x, y, reduction="none")
        bce = ft.binary_cross_entropy_with_logits(x, t)
        nll = ft.nll_loss(torch.log_softmax(x, 1), y)
        return ce + (per_row * torch.arange(6, dtype=D)).sum() + bce + nll

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    y = _classes((6,), C)
    t = torch.rand((6, C), generator=_gen(2), dtype=D)
    x1, x2 = _logits((6, C)), _logits((6, C))
    got = compiled(x1, y, t)
    got.backward()
    expected = step(x2, y, t)
    expected.backward()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
    # no gradient needed: the compiled forward alone
    with torch.no_grad():
        torch.testing.assert_close(compiled(x1, y, t), expected.detach(), rtol=1e-10,
                                   atol=1e-12)


# --------------------------------------------------------------------------
# inplace_backward's guard, and what PyTorch users expect

def _refused(x):
    with pytest.raises(RuntimeError, match="inplace_backward=True"):
        ft.cross_entropy(x, _classes((6,), C), inplace_backward=True)


def test_inplace_backward_refuses_a_leaf():
    x = _logits((6, C))
    before = x.detach().clone()
    _refused(x)
    assert torch.equal(x.detach(), before)


def test_inplace_backward_refuses_logits_saved_by_another_operation():
    w = _logits((6, C))
    x = w * 1.0
    other = x.sin()  # sin saves its input, x, for its backward
    before = x.detach().clone()
    _refused(x)
    assert torch.equal(x.detach(), before)
    other.sum().backward()  # still correct
    torch.testing.assert_close(w.grad, before.cos())


def test_inplace_backward_refuses_logits_saved_as_an_output():
    w = _logits((6, C))
    x = w.exp()  # exp saves its output, x
    _refused(x)
    _refused(x.view(6, C))


def test_inplace_backward_allows_a_view_used_only_by_the_loss():
    w = _logits((2, 3, C))
    x = w * 1.0
    y = _classes((6,), C)
    ft.cross_entropy(x.view(-1, C), y, inplace_backward=True).backward()
    w2 = _logits((2, 3, C))
    F.cross_entropy(w2.view(-1, C), y).backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-10, atol=1e-12)


def test_no_gradient_computed_when_none_is_needed(monkeypatch):
    def no(*args, **kwargs):
        raise AssertionError("a gradient was computed")

    monkeypatch.setattr(ft._losses, "cross_entropy_with_grad", no)
    monkeypatch.setattr(ft._losses, "binary_cross_entropy_with_logits_with_grad", no)
    x, y = _logits((6, C)), _classes((6,), C)
    t = torch.rand((6, C), generator=_gen(2), dtype=D)
    with torch.no_grad():
        loss = ft.cross_entropy(x, y)
        ft.binary_cross_entropy_with_logits(x, t)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(x, y).detach())
    plain = x.detach()
    loss = ft.cross_entropy(plain, y)
    assert not loss.requires_grad and loss.grad_fn is None
    ft.binary_cross_entropy_with_logits(plain, t, inplace_backward=True)
    with pytest.raises(AssertionError, match="a gradient was computed"):
        ft.cross_entropy(x, y)


def test_double_backward_is_refused():
    x, y = _logits((6, C)), _classes((6,), C)
    for loss in (ft.cross_entropy(x, y), ft.nll_loss(x, y),
                 ft.binary_cross_entropy_with_logits(x, torch.rand(6, C, dtype=D))):
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, x, create_graph=True)


def test_second_backward_is_refused_unless_repeatable():
    x, y = _logits((6, C)), _classes((6,), C)
    loss = ft.cross_entropy(x, y, reduction="sum")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="repeatable_backward"):
        loss.backward()
    x2 = _logits((6, C))
    with ft.repeatable_backward():
        loss = ft.cross_entropy(x2, y, reduction="sum")
    for _ in range(3):
        loss.backward(retain_graph=True)
    x3 = _logits((6, C))
    F.cross_entropy(x3, y, reduction="sum").backward()
    torch.testing.assert_close(x2.grad, 3 * x3.grad, rtol=1e-10, atol=1e-12)


def test_a_target_or_weight_that_requires_grad_is_refused():
    x, y = _logits((6, C)), _classes((6,), C)
    soft = torch.softmax(_logits((6, C)), 1)
    with pytest.raises(ValueError, match="target requires grad"):
        ft.cross_entropy(x, soft)
    with pytest.raises(ValueError, match="weight requires grad"):
        ft.cross_entropy(x, y, weight=torch.ones(C, dtype=D, requires_grad=True))
    with torch.no_grad():  # nothing is differentiated: allowed
        ft.cross_entropy(x, soft)


def test_bad_input_is_refused_before_the_logits_are_written():
    w = _logits((6, C))
    x = w * 1.0
    before = x.detach().clone()
    with pytest.raises(IndexError):
        ft.cross_entropy(x, torch.full((6,), C), inplace_backward=True)
    assert torch.equal(x.detach(), before)


# --------------------------------------------------------------------------
# Memory, and the optional import

def test_no_memory_growth_over_1000_steps():
    psutil = pytest.importorskip("psutil")
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 100)
    criterion = ft.CrossEntropyLoss(label_smoothing=0.1)
    bce = ft.BCEWithLogitsLoss(inplace_backward=True)
    x = torch.randn(64, 16)
    y = torch.randint(0, 100, (64,))
    t = torch.rand(64, 100)

    def step(i):
        model.zero_grad(set_to_none=True)
        out = model(x)
        if i % 3 == 0:
            loss = criterion(out, y)
        elif i % 3 == 1:
            loss = ft.cross_entropy(out, y, reduction="none", inplace_backward=True).sum()
        else:
            loss = bce(out, t) + ft.nll_loss(torch.log_softmax(out, 1), y)
        loss.backward()
        return out

    process = psutil.Process()
    threads = torch.get_num_threads()
    # One PyTorch thread: on a busy 2-core machine its pool's barriers stall
    # for milliseconds a step; the allocations are the same.
    torch.set_num_threads(1)
    gc.collect()
    gc.disable()  # a reference cycle would be freed by the collector: leave it leaking
    try:
        for i in range(200):
            step(i)
        start = process.memory_info().rss
        for i in range(1000):
            last = weakref.ref(step(i))
        grown = process.memory_info().rss - start
        assert last() is None  # the logits are freed as soon as the step is over
    finally:
        gc.enable()
        torch.set_num_threads(threads)
    # one leaked 64x100 float32 gradient per step would be 25 MB
    assert grown < 4 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB"


def test_importing_without_torch_says_what_is_missing():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import fastxent\n"
            "try:\n"
            "    import fastxent.torch\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert "fastxent.torch needs PyTorch" in result.stdout


# --------------------------------------------------------------------------
# Gradient buffers reused from step to step

def _step_grad(x_source, keep):
    """One loss on logits made from ``x_source``; ``keep(logits)`` may hold on to its gradient."""
    logits = x_source * 1.0
    keep(logits)
    ft.cross_entropy(logits, _classes((6,), C)).backward()


def _expected_grad(seed):
    x = _logits((6, C), seed=seed)
    F.cross_entropy(x, _classes((6,), C)).backward()
    return x.grad


@pytest.mark.parametrize("hold", ["hook", "view", "leaf"])
def test_a_gradient_still_held_is_never_reused(hold):
    ft.empty_cache()
    kept = []
    first, second = _logits((6, C), seed=0), _logits((6, C), seed=1)
    if hold == "leaf":  # the buffer becomes the leaf's .grad
        ft.cross_entropy(first, _classes((6,), C)).backward()
        kept.append(first.grad)
    else:
        transform = (lambda g: g) if hold == "hook" else (lambda g: g[1:])
        _step_grad(first, lambda t: t.register_hook(lambda g: kept.append(transform(g))))
    before = kept[0].clone()
    _step_grad(second, lambda t: None)
    assert torch.equal(kept[0], before)
    torch.testing.assert_close(before, _expected_grad(0)[1:] if hold == "view"
                               else _expected_grad(0))


def test_a_free_gradient_buffer_is_reused():
    ft.empty_cache()
    pointers = []
    for seed in range(3):
        _step_grad(_logits((6, C), seed=seed),
                   lambda t: t.register_hook(lambda g: pointers.append(g.data_ptr())))
    assert len(set(pointers)) == 1
    try:
        ft.reuse_gradient_buffers(False)
        _step_grad(_logits((6, C)), lambda t: None)
        assert not ft._BUFFERS.entries
    finally:
        ft.reuse_gradient_buffers(True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_llm_options_match_their_definition(reduction):
    """``logit_scale`` and ``softcap`` (with ``z_loss``) against the same loss
    written in PyTorch, and through ``gradcheck``."""
    x = _logits((6, C))
    y = _classes((6,), C)
    kw = dict(z_loss=0.01, logit_scale=1.5, softcap=2.0)
    loss = ft.cross_entropy(x, y, reduction=reduction, **kw)
    x2 = _logits((6, C))
    z = 2.0 * torch.tanh(x2 * 1.5 / 2.0)
    rows = F.cross_entropy(z, y, reduction="none") + 0.01 * torch.logsumexp(z, 1) ** 2
    expected = rows.mean() if reduction == "mean" else rows
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_backward_and_grad(loss, x), _backward_and_grad(expected, x2),
                               rtol=1e-10, atol=1e-12)
    with ft.repeatable_backward():
        assert torch.autograd.gradcheck(
            lambda v: ft.cross_entropy(v, y, reduction=reduction, **kw), (_logits((6, C)),))
    module = ft.CrossEntropyLoss(reduction=reduction, **kw)
    torch.testing.assert_close(module(_logits((6, C)), y), expected.detach(), rtol=1e-10,
                               atol=1e-12)
    with pytest.raises(ValueError, match="softcap must be a finite number above 0"):
        ft.cross_entropy(_logits((6, C)), y, softcap=0.0)
