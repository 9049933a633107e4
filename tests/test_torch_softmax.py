"""fastxent.torch.softmax and log_softmax: fastxent's forward, and
fastxent.softmax_backward / log_softmax_backward as their backward, against
torch in float64 (float32 with its tolerance)."""

import pytest

torch = pytest.importorskip("torch")

import fastxent.jacobian  # noqa: E402
import fastxent.torch as ft  # noqa: E402

D = torch.float64
PAIRS = {"softmax": (ft.softmax, torch.softmax), "log_softmax": (ft.log_softmax, torch.log_softmax)}
SHAPES = {"1d": ((7,), [0, -1]), "2d": ((5, 7), [1, 0, -1]), "3d": ((3, 4, 5), [1, 2, 0]),
          "long": ((2, 300), [1])}


def _pair(shape, dtype=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=D) * 3).to(dtype).requires_grad_(True)
    return x, torch.randn(shape, generator=g, dtype=D).to(dtype)


@pytest.mark.parametrize("dtype", [D, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", list(PAIRS))
def test_values_and_gradients_match_torch(name, shape, dtype):
    ours_fn, torch_fn = PAIRS[name]
    dims = SHAPES[shape][1]
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == D else dict(rtol=2e-6, atol=2e-6)
    for dim in dims:
        x, g = _pair(SHAPES[shape][0], dtype)
        ours = ours_fn(x, dim)
        (grad,) = torch.autograd.grad(ours, x, g)
        x64 = x.detach().to(D).requires_grad_(True)
        theirs = torch_fn(x64, dim)
        (expect,) = torch.autograd.grad(theirs, x64, g.to(D))
        assert ours.dtype == dtype and grad.dtype == dtype
        torch.testing.assert_close(ours.to(D), theirs, **tol)
        torch.testing.assert_close(grad.to(D), expect, **tol)


@pytest.mark.parametrize("name", list(PAIRS))
def test_the_backward_is_fastxents(name, monkeypatch):
    calls = []
    fn_name = f"{name}_backward"
    original = getattr(fastxent.jacobian, fn_name)

    def counted(*args, **kwargs):
        calls.append(kwargs.get("axis"))
        return original(*args, **kwargs)

    monkeypatch.setattr(fastxent.jacobian, fn_name, counted)
    x, g = _pair((3, 4, 5))
    torch.autograd.grad(PAIRS[name][0](x, 1), x, g)
    assert calls == [1]


@pytest.mark.parametrize("name", list(PAIRS))
def test_gradcheck(name):
    x, _ = _pair((3, 5))
    assert torch.autograd.gradcheck(lambda a: PAIRS[name][0](a, 1), (x,))


def test_dtype_casts_first_and_dim_is_required():
    x, _ = _pair((3, 5), torch.float32)
    y = ft.softmax(x, 1, dtype=D)
    assert y.dtype == D
    torch.testing.assert_close(y, torch.softmax(x.detach().to(D), 1), rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match="needs dim"):
        ft.log_softmax(x)


def test_double_backward_is_refused():
    x, g = _pair((3, 5))
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(ft.softmax(x, 1), x, g, create_graph=True)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    def step(x):
        return (ft.softmax(x, 1) * ft.log_softmax(x, 1)).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x, _ = _pair((4, 6))
    got, expected = compiled(x), step(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0],
                               torch.autograd.grad(expected, x)[0], rtol=1e-12, atol=1e-14)
