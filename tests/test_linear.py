"""Fused linear + cross-entropy (``fastxent.linear``) on the CPU.

Loss and the three gradients against ``torch.nn.functional.linear_cross_entropy``
(2-D inputs; its only shapes) and against ``F.cross_entropy(F.linear(...))``
(3-D inputs, z_loss), in float64 with autograd, over reductions, class
weights, ignore_index, label smoothing, probability targets, bias, and chunk
sizes that do and do not divide N. Then determinism across thread counts,
the memory bound, the loss object, the refusals, and 16-bit inputs (float16,
bfloat16) against float64 torch on their upcast values.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastxent
from tests import parity
from tests.test_half import BF16, F16, HALF, check_grad, check_loss

N, H, C = 9, 4, 6
CHUNKS = (1, 7, N, N + 1)
TARGETS = ("hard", "ignored", "valid_ignore", "soft")
REDUCTIONS = ("mean", "sum", "none")


def _inputs(target_kind, batch=(N,), seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(batch + (H,)).astype(dtype)
    w = (rng.standard_normal((C, H)) * 1.5).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    ignore_index = -100
    if target_kind == "soft":
        t = rng.random(batch + (C,))
        t = (t / t.sum(-1, keepdims=True)).astype(dtype)
    else:
        t = rng.integers(0, C, batch)
        flat = t.reshape(-1)
        if target_kind == "ignored":
            flat[[1, 4]] = -100
        elif target_kind == "valid_ignore":
            ignore_index = int(flat[2])
    return x, w, b, t, ignore_index


def _torch_twin(x, w, b, t, *, weight, ignore_index, reduction, label_smoothing, z_loss=0.0,
                use_linear_ce=True):
    """Loss and gradients of torch's float64 autograd."""
    X = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    W = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    B = None if b is None else torch.tensor(b, dtype=torch.float64, requires_grad=True)
    T = torch.tensor(t)
    if T.dtype.is_floating_point:
        T = T.to(torch.float64)
    cw = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    kw = dict(weight=cw, ignore_index=ignore_index, label_smoothing=label_smoothing)
    if use_linear_ce and x.ndim == 2 and z_loss == 0.0:
        if T.dtype.is_floating_point:
            kw["ignore_index"] = None  # torch's linear_cross_entropy refuses one for probabilities
        loss = F.linear_cross_entropy(X, W, T, linear_bias=B, reduction=reduction, **kw)
    else:
        logits = F.linear(X, W, B).reshape(-1, C)
        soft = T.dtype.is_floating_point
        tt = T.reshape(-1, C) if soft else T.reshape(-1)
        rows = F.cross_entropy(logits, tt, reduction="none", **kw)
        if soft:
            row_w = torch.ones(rows.shape, dtype=torch.float64)
        else:
            kept = tt != ignore_index
            cls_w = torch.ones(C, dtype=torch.float64) if cw is None else cw
            row_w = torch.where(kept, cls_w[tt.clamp(0, C - 1)], 0.0)
        rows = rows + z_loss * row_w * torch.logsumexp(logits, -1) ** 2
        if reduction == "none":
            loss = rows.reshape(x.shape[:-1])
        elif reduction == "sum":
            loss = rows.sum()
        else:
            loss = rows.sum() / row_w.sum()
    loss.sum().backward()
    return (loss.detach().numpy(), X.grad.numpy(), W.grad.numpy(),
            None if B is None else B.grad.numpy())


def _check(ours, theirs, rtol=1e-10, atol=1e-12):
    for name, a, e in zip(("loss", "grad_input", "grad_linear_weight", "grad_linear_bias"),
                          ours, theirs):
        if e is None:
            assert a is None, name
            continue
        np.testing.assert_allclose(np.asarray(a, dtype=np.float64), e, rtol=rtol, atol=atol,
                                   err_msg=name)


GRID = list(itertools.product(REDUCTIONS, (False, True), TARGETS, (0.0, 0.2), (False, True),
                              CHUNKS))


@pytest.mark.parametrize("reduction,weighted,target,smoothing,bias,chunk", GRID,
                         ids=["-".join(map(str, g)) for g in GRID])
def test_matches_torch_linear_cross_entropy(reduction, weighted, target, smoothing, bias, chunk):
    x, w, b, t, ignore_index = _inputs(target)
    b = b if bias else None
    weight = np.random.default_rng(5).random(C) + 0.5 if weighted else None
    ours = fastxent.linear_cross_entropy_with_grad(
        x, w, t, linear_bias=b, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=smoothing, chunk_size=chunk)
    theirs = _torch_twin(x, w, b, t, weight=weight, ignore_index=ignore_index,
                         reduction=reduction, label_smoothing=smoothing)
    _check(ours, theirs)
    loss_only = fastxent.linear_cross_entropy(
        x, w, t, linear_bias=b, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=smoothing, chunk_size=chunk)
    np.testing.assert_array_equal(loss_only, ours[0])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk", (1, 7, 12, 13))
def test_3d_input_matches_torch_reference(target, reduction, chunk):
    """(B, T, H) inputs against F.cross_entropy(F.linear(...)) (torch's
    linear_cross_entropy takes 1-D and 2-D inputs only)."""
    x, w, b, t, ignore_index = _inputs(target, batch=(3, 4), seed=1)
    weight = np.random.default_rng(6).random(C) + 0.5
    ours = fastxent.linear_cross_entropy_with_grad(
        x, w, t, linear_bias=b, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=0.1, chunk_size=chunk)
    assert ours[1].shape == x.shape
    theirs = _torch_twin(x, w, b, t, weight=weight, ignore_index=ignore_index,
                         reduction=reduction, label_smoothing=0.1)
    _check(ours, theirs)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk", (1, 7, N + 1))
def test_z_loss_matches_torch_reference(target, reduction, chunk):
    x, w, b, t, ignore_index = _inputs(target, seed=2)
    weight = np.random.default_rng(7).random(C) + 0.5
    ours = fastxent.linear_cross_entropy_with_grad(
        x, w, t, linear_bias=b, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=0.1, z_loss=0.05, chunk_size=chunk)
    theirs = _torch_twin(x, w, b, t, weight=weight, ignore_index=ignore_index,
                         reduction=reduction, label_smoothing=0.1, z_loss=0.05)
    _check(ours, theirs)


def test_torch_chunked_path_agrees():
    """torch's chunked path (options=LinearCrossEntropyOptions) gives the
    same figures as its reference and as ours."""
    x, w, b, t, _ = _inputs("ignored", seed=3)
    ours = fastxent.linear_cross_entropy_with_grad(x, w, t, linear_bias=b, chunk_size=2)
    X = torch.tensor(x, requires_grad=True)
    W = torch.tensor(w, requires_grad=True)
    B = torch.tensor(b, requires_grad=True)
    loss = F.linear_cross_entropy(
        X, W, torch.tensor(t), linear_bias=B, ignore_index=-100,
        options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2))
    loss.backward()
    _check(ours, (loss.detach().numpy(), X.grad.numpy(), W.grad.numpy(), B.grad.numpy()))


@pytest.mark.parametrize("chunk", (None, 5))
def test_float32_against_float64_torch(chunk):
    rng = np.random.default_rng(4)
    n, h, c = 40, 16, 300
    x = rng.standard_normal((n, h)).astype(np.float32)
    w = (rng.standard_normal((c, h)) * 0.5).astype(np.float32)
    t = rng.integers(0, c, n)
    t[3] = -100
    ours = fastxent.linear_cross_entropy_with_grad(x, w, t, chunk_size=chunk)
    assert all(a.dtype == np.float32 for a in ours[:3]) and ours[3] is None
    theirs = _torch_twin(x, w, None, t, weight=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0)
    _check(ours, theirs, rtol=1e-5, atol=1e-6)


def test_default_chunk_rows():
    from fastxent._linear import default_chunk_rows
    assert default_chunk_rows(8192, 32000, 1024, 4) == 320  # 4% of the rows
    assert default_chunk_rows(4096, 128256, 2048, 4) == 160
    assert default_chunk_rows(1024, 32000, 1024, 4) == 128  # 16 MiB
    assert default_chunk_rows(10, 32000, 1024, 4) == 10
    assert default_chunk_rows(8192, 1000, 64, 4) == 4096  # 16 MiB of 1000 classes
    assert default_chunk_rows(8192, 40000, 16384, 8) == 4096  # H / 4: H * 4 > C


@pytest.mark.parametrize("chunk", (1, 3, 7, N + 1))
@pytest.mark.parametrize("path", ("accumulating", "scratch"))
def test_class_blocks_of_grad_linear_weight(monkeypatch, chunk, path):
    """grad_linear_weight's shares in blocks of classes give torch's figures:
    accumulating products of one class each, or, without them (a BLAS other
    than NumPy's bundled OpenBLAS), scratch products of 4 classes (with a
    remainder of 2) added in, with chunks of more rows than the last share's
    2 classes (three chunks and more: the third reuses the second's buffers,
    and grad_input's transposed scratch)."""
    import fastxent._cpu_linear
    import fastxent._linear

    if path == "accumulating":
        assert fastxent._cpu_linear.OPS.matmul_add is not None
        monkeypatch.setattr(fastxent._linear, "ACCUMULATE_PANEL_BYTES", 1)  # a class each
    else:
        monkeypatch.setattr(fastxent._linear, "ACCUMULATE_BYTES", 4 * H * 8)  # 4-class blocks
        monkeypatch.setattr(fastxent._cpu_linear, "OPS",
                            fastxent._cpu_linear.OPS._replace(matmul_add=None))
    x, w, b, t, ignore_index = _inputs("ignored", seed=11)
    ours = fastxent.linear_cross_entropy_with_grad(x, w, t, linear_bias=b, chunk_size=chunk,
                                                   label_smoothing=0.1)
    theirs = _torch_twin(x, w, b, t, weight=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.1)
    _check(ours, theirs)


# --------------------------------------------------------------------------
# determinism, memory


_DETERMINISM_PROBE = """
import hashlib, numpy as np, fastxent
rng = np.random.default_rng(0)
x = rng.standard_normal((300, 64)).astype(np.float32)
w = rng.standard_normal((1000, 64)).astype(np.float32)
b = rng.standard_normal(1000).astype(np.float32)
t = rng.integers(0, 1000, 300)
out = fastxent.linear_cross_entropy_with_grad(x, w, t, linear_bias=b, chunk_size=128,
                                              label_smoothing=0.1)
h = hashlib.sha256()
for a in out:
    h.update(np.ascontiguousarray(a).tobytes())
print(h.hexdigest())
"""


def _probe(numba_threads, blas_threads):
    env = dict(os.environ, NUMBA_NUM_THREADS=str(numba_threads),
               OPENBLAS_NUM_THREADS=str(blas_threads), OMP_NUM_THREADS=str(blas_threads))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _DETERMINISM_PROBE], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("blas_threads", (1, 2))
def test_same_bits_for_any_numba_thread_count(blas_threads):
    """1 or 2 Numba threads: the same bits (chunks of 128 x 1000 take the
    parallel kernels). The BLAS's own thread count is held fixed: OpenBLAS
    0.3.31's sgemm gives other bits with 2 threads than with 1 at some inner
    sizes (1000 here), which fastxent does not control (see docs/design.md)."""
    assert _probe(2, blas_threads) == _probe(1, blas_threads)


def test_same_bits_call_after_call():
    x, w, b, t, _ = _inputs("ignored", seed=8)
    runs = [fastxent.linear_cross_entropy_with_grad(x, w, t, linear_bias=b, chunk_size=4)
            for _ in range(3)]
    for other in runs[1:]:
        for a, e in zip(other, runs[0]):
            np.testing.assert_array_equal(a, e)


def test_no_n_by_c_array():
    """Peak memory above the inputs and the gradients stays near one chunk's
    logits: well under the N x C logits."""
    rng = np.random.default_rng(9)
    n, h, c = 2048, 16, 4096
    x = rng.standard_normal((n, h)).astype(np.float32)
    w = rng.standard_normal((c, h)).astype(np.float32)
    t = rng.integers(0, c, n)
    fastxent.linear_cross_entropy_with_grad(x, w, t, chunk_size=64)  # compiled, cached
    tracemalloc.start()
    try:
        _, gx, gw, _ = fastxent.linear_cross_entropy_with_grad(x, w, t, chunk_size=64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    logits_bytes = n * c * 4
    above = peak - gx.nbytes - gw.nbytes
    assert above <= 0.05 * logits_bytes, (above, logits_bytes)


# --------------------------------------------------------------------------
# the loss object, refusals


def test_loss_object():
    x, w, b, t, _ = _inputs("hard", seed=10)
    fn = fastxent.LinearCrossEntropyLoss(label_smoothing=0.1, chunk_size=4)
    loss = fn(x, w, t, b)
    expected = fastxent.linear_cross_entropy_with_grad(x, w, t, linear_bias=b,
                                                       label_smoothing=0.1, chunk_size=4)
    assert loss == expected[0]
    for a, e in zip(fn.backward(), expected[1:]):
        np.testing.assert_array_equal(a, e)
    with pytest.raises(RuntimeError, match="needs a call first"):
        fn.backward()


def _bad_calls():
    x, w, b, t, _ = _inputs("hard")
    return [
        (dict(input=x, linear_weight=w[:, :3], target=t), ValueError, "features"),
        (dict(input=x, linear_weight=w[0], target=t), ValueError, "2-D"),
        (dict(input=x, linear_weight=w.astype(np.float32), target=t), TypeError, "dtype"),
        (dict(input=x, linear_weight=w, target=t, linear_bias=b[:3]), ValueError, "linear_bias"),
        (dict(input=x, linear_weight=w, target=t[:4]), ValueError, "target shape"),
        (dict(input=x, linear_weight=w, target=np.where(t == t[5], C, t)), IndexError,
         "out of range"),
        (dict(input=x, linear_weight=w, target=t, chunk_size=0), ValueError, "chunk_size"),
        (dict(input=x, linear_weight=w, target=t, reduction="avg"), ValueError, "reduction"),
        (dict(input=x, linear_weight=w, target=t, weight=np.ones(3)), ValueError, "weight"),
        (dict(input=x, linear_weight=w, target=t, z_loss=-1.0), ValueError, "z_loss"),
        (dict(input=x, linear_weight=w, target=t, softcapp=3.0), TypeError, "unknown option"),
        (dict(input=x, linear_weight=w, target=t, name="x"), TypeError, "unknown option"),
        (dict(input=x, linear_weight=w, target=t, function="cross_entropy"), TypeError,
         "unknown option"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_refused(i):
    kwargs, exc, match = _bad_calls()[i]
    kwargs = dict(kwargs)
    args = [kwargs.pop(k) for k in ("input", "linear_weight", "target")]
    copies = [a.copy() for a in args]
    with pytest.raises(exc, match=match):
        fastxent.linear_cross_entropy_with_grad(*args, **kwargs)
    for a, c in zip(args, copies):
        np.testing.assert_array_equal(a, c)  # nothing written


def test_bad_class_index_refused_before_any_product(monkeypatch):
    """A bad index in the last chunk is refused before the first product."""
    from fastxent import _cpu_linear

    products = []
    ops = _cpu_linear.OPS
    monkeypatch.setattr(_cpu_linear, "OPS", ops._replace(
        matmul=lambda *args: products.append(1) or ops.matmul(*args)))
    x, w, b, t, _ = _inputs("hard", seed=16)
    t[-1] = C
    with pytest.raises(IndexError, match=r"target 6 at position \(8,\)"):
        fastxent.linear_cross_entropy_with_grad(x, w, t, chunk_size=2)
    assert products == []
    t[-1] = 0
    fastxent.linear_cross_entropy_with_grad(x, w, t, chunk_size=2)
    assert products


@pytest.mark.parametrize("chunk_size", [3, 10])
def test_llm_options_pass_through(chunk_size):
    """logit_scale, softcap and z_loss on the chunked logits, against the
    same loss of F.linear written in PyTorch; return_stats is refused."""
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    x, W, b = rng.standard_normal((10, 6)), rng.standard_normal((9, 6)), rng.standard_normal(9)
    y = rng.integers(0, 9, 10)
    loss, gx, gw, gb = fastxent.linear_cross_entropy_with_grad(
        x, W, y, linear_bias=b, softcap=2.0, logit_scale=1.5, z_loss=1e-2, chunk_size=chunk_size)
    xt, Wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, W, b))
    z = 2.0 * torch.tanh(F.linear(xt, Wt, bt) * 1.5 / 2.0)
    expected = F.cross_entropy(z, torch.tensor(y)) + 1e-2 * (torch.logsumexp(z, 1) ** 2).mean()
    expected.backward()
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-12)
    for ours, theirs in ((gx, xt), (gw, Wt), (gb, bt)):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-10, atol=1e-13)
    with pytest.raises(TypeError, match="unknown option"):
        fastxent.linear_cross_entropy(x, W, y, return_stats=True)


# --------------------------------------------------------------------------
# 16-bit input, linear_weight and linear_bias (issue 19): float32 arithmetic,
# a float32 loss, gradients rounded once to the input's 16-bit dtype. Held to
# float64 torch on the same (upcast) values by ``tests.test_half``'s
# ``check_loss`` (1e-5 relative) and ``check_grad`` (one 16-bit ulp, or 2e-6 of
# the largest magnitude where terms cancel): at these sizes the float32 sums
# over H, C and N are off by a few float32 ulps of their terms, far inside
# half a 16-bit ulp, so rounding once lands within one.

HALF_GRID = parity.covering(dict(
    dtype=HALF, bias=(False, True), target=("hard", "soft16", "soft64"),
    chunk=(3, 4), reduction=REDUCTIONS), strength=2)


@pytest.mark.parametrize("case", HALF_GRID,
                         ids=["-".join(str(v) for v in c.values()) for c in HALF_GRID])
def test_half_matches_float64_torch(case):
    dtype, target = case["dtype"], case["target"]
    x, w, b, t, ignore_index = _inputs("soft" if target != "hard" else "ignored", seed=3)
    x, w, b = (a.astype(dtype) for a in (x, w, b))
    b = b if case["bias"] else None
    if target == "soft16":
        t = t.astype(dtype)
    weight = np.random.default_rng(5).random(C).astype(np.float32) + 0.5
    kw = dict(linear_bias=b, weight=weight, ignore_index=ignore_index,
              reduction=case["reduction"], chunk_size=case["chunk"])
    ours = fastxent.linear_cross_entropy_with_grad(x, w, t, **kw)
    wide = [None if a is None else a.astype(np.float64) for a in (x, w, b)]
    t64 = t.astype(np.float64) if t.dtype.kind != "i" else t
    theirs = _torch_twin(*wide[:2], wide[2], t64, weight=weight.astype(np.float64),
                         ignore_index=ignore_index, reduction=case["reduction"],
                         label_smoothing=0.0, use_linear_ce=False)
    check_loss(ours[0], theirs[0], case["reduction"])
    for name, g, e in zip(("grad_input", "grad_linear_weight", "grad_linear_bias"), ours[1:],
                          theirs[1:]):
        if e is None:
            assert g is None, name
        else:
            check_grad(g, e, dtype, name)
    loss_only = fastxent.linear_cross_entropy(x, w, t, **kw)
    np.testing.assert_array_equal(np.asarray(loss_only), np.asarray(ours[0]))
    fn = fastxent.LinearCrossEntropyLoss(weight=weight, ignore_index=ignore_index,
                                         reduction=case["reduction"], chunk_size=case["chunk"])
    np.testing.assert_array_equal(np.asarray(fn(x, w, t, b)), np.asarray(ours[0]))
    for g, e in zip(fn.backward(), ours[1:]):
        assert (g is None) == (e is None)
        if g is not None:
            np.testing.assert_array_equal(g.view(np.uint16), e.view(np.uint16))


def _mixed_half_calls():
    x, w, b, t, _ = _inputs("hard")
    f16, bf16 = (lambda a: a.astype(F16)), (lambda a: a.astype(BF16))
    return [
        (dict(input=f16(x), linear_weight=bf16(w), target=t), "linear_weight has dtype"),
        (dict(input=bf16(x), linear_weight=w.astype(np.float32), target=t),
         "linear_weight has dtype"),
        (dict(input=x.astype(np.float32), linear_weight=f16(w), target=t),
         "linear_weight has dtype"),
        (dict(input=f16(x), linear_weight=f16(w), target=t, linear_bias=bf16(b)),
         "linear_bias has dtype"),
        (dict(input=bf16(x), linear_weight=bf16(w), target=t, linear_bias=b.astype(np.float32)),
         "linear_bias has dtype"),
    ]


@pytest.mark.parametrize("i", range(len(_mixed_half_calls())))
def test_half_mixed_dtypes_refused(i):
    kwargs, match = _mixed_half_calls()[i]
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    copies = {k: v.copy() for k, v in arrays.items()}
    with pytest.raises(TypeError, match=match):
        fastxent.linear_cross_entropy_with_grad(**kwargs)
    for k, a in arrays.items():
        np.testing.assert_array_equal(a.view(np.uint8), copies[k].view(np.uint8))
