"""fastxent.torch.linear_cross_entropy: the chunked linear head inside PyTorch's
autograd, against ``F.cross_entropy(F.linear(...))`` in float64."""

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import fastxent.torch as ft  # noqa: E402

D = torch.float64
N, H, C = 11, 5, 9


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _problem(batch=(N,), soft=False, bias=True, seed=0):
    x = torch.randn(batch + (H,), generator=_gen(seed), dtype=D).requires_grad_(True)
    w = torch.randn((C, H), generator=_gen(seed + 1), dtype=D).requires_grad_(True)
    b = torch.randn((C,), generator=_gen(seed + 2), dtype=D).requires_grad_(True) if bias \
        else None
    if soft:
        t = torch.rand(batch + (C,), generator=_gen(seed + 3), dtype=D)
        t = t / t.sum(-1, keepdim=True)
    else:
        t = torch.randint(0, C, batch, generator=_gen(seed + 3))
        t.view(-1)[::4] = -100
    return x, w, b, t


def _reference(x, w, b, t, weight=None, reduction="mean", label_smoothing=0.0, z_loss=0.0,
               logit_scale=1.0, softcap=None):
    """cross_entropy(linear(...)) with the LLM options in a few lines of torch."""
    z = F.linear(x, w, b) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z2, t2 = z.reshape(-1, C), t.reshape(-1) if t.dim() == z.dim() - 1 else t.reshape(-1, C)
    rows = F.cross_entropy(z2, t2, weight=weight, reduction="none",
                           label_smoothing=label_smoothing)
    if z_loss:
        lse = torch.logsumexp(z2, -1)
        if t2.dim() == 1:
            kept = t2 != -100
            w_row = kept.to(D) if weight is None else weight[t2.clamp(min=0)] * kept
        else:
            w_row = torch.ones(z2.shape[0], dtype=D)
        rows = rows + z_loss * w_row * lse ** 2
    if reduction == "none":
        return rows.reshape(t.shape if t.dim() == z.dim() - 1 else t.shape[:-1])
    if reduction == "sum":
        return rows.sum()
    if t2.dim() == 1:
        kept = t2 != -100
        denominator = kept.sum() if weight is None else (weight[t2.clamp(min=0)] * kept).sum()
    else:
        denominator = z2.shape[0]
    return rows.sum() / denominator


def _grads(loss, params):
    return torch.autograd.grad(loss, [p for p in params if p is not None])


CASES = {
    "mean": dict(),
    "sum": dict(reduction="sum"),
    "weighted": dict(weight=torch.linspace(0.5, 2.0, C, dtype=D)),
    "smoothing": dict(label_smoothing=0.1),
    "llm": dict(z_loss=1e-3, logit_scale=0.7, softcap=3.0),
    "weighted_z": dict(weight=torch.linspace(0.5, 2.0, C, dtype=D), z_loss=1e-2),
}


@pytest.mark.parametrize("chunk_size", [None, 1, 4])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bias", [True, False])
def test_loss_and_three_gradients_match_torch(case, bias, chunk_size):
    kw = CASES[case]
    x, w, b, t = _problem(bias=bias)
    ours = ft.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=chunk_size, **kw)
    theirs = _reference(x, w, b, t, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    for g, h in zip(_grads(ours, (x, w, b)), _grads(theirs, (x, w, b))):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("soft", [False, True])
def test_batched_input_and_probabilities(soft):
    x, w, b, t = _problem(batch=(2, 3), soft=soft)
    ours = ft.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.05)
    theirs = _reference(x, w, b, t, label_smoothing=0.05)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    for g, h in zip(_grads(ours, (x, w, b)), _grads(theirs, (x, w, b))):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-13)
    # and torch's own fused function (2-D inputs only)
    if not soft:
        native = F.linear_cross_entropy(x.reshape(-1, H), w, t.reshape(-1), linear_bias=b,
                                        label_smoothing=0.05)
        torch.testing.assert_close(ours, native, rtol=1e-12, atol=1e-14)


def test_a_scaled_backward_scales_the_three_gradients():
    x, w, b, t = _problem()
    ours = _grads(3.5 * ft.linear_cross_entropy(x, w, t, linear_bias=b), (x, w, b))
    theirs = _grads(3.5 * _reference(x, w, b, t), (x, w, b))
    for g, h in zip(ours, theirs):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-13)


def test_gradcheck():
    x, w, b, t = _problem(batch=(4,))
    assert torch.autograd.gradcheck(
        lambda x, w, b: ft.linear_cross_entropy(x, w, t, linear_bias=b, z_loss=1e-2),
        (x, w, b))


def test_none_reduction_gives_the_rows_and_refuses_a_gradient():
    x, w, b, t = _problem()
    with torch.no_grad():
        torch.testing.assert_close(ft.linear_cross_entropy(x, w, t, reduction="none"),
                                   _reference(x, w, None, t, reduction="none"), rtol=1e-12,
                                   atol=1e-14)
    with pytest.raises(ValueError, match="reduction='none' gives no gradient"):
        ft.linear_cross_entropy(x, w, t, reduction="none")


def test_only_the_parameters_that_require_grad_get_one():
    x, w, b, t = _problem()
    x.requires_grad_(False)
    loss = ft.linear_cross_entropy(x, w, t, linear_bias=b)
    loss.backward()
    assert x.grad is None and w.grad is not None and b.grad is not None
    torch.testing.assert_close(w.grad, _grads(_reference(x, w, b, t), (w,))[0], rtol=1e-10,
                               atol=1e-13)


def test_a_target_that_requires_grad_is_refused():
    x, w, b, _ = _problem(soft=True)
    t = torch.rand((N, C), dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="target requires grad"):
        ft.linear_cross_entropy(x, w, t)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    def step(x, w, b, t):
        return ft.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x, w, b, t = _problem()
    got = compiled(x, w, b, t)
    expected = step(x, w, b, t)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    for g, h in zip(_grads(got, (x, w, b)), _grads(expected, (x, w, b))):
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-14)
