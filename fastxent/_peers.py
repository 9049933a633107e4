"""The benchmark table: each fastxent kernel, its peers, and its memory limit.

One table serves ``python -m fastxent bench`` and the asv suite in
``asv_bench/``, so the peer code exists once. Each :class:`Comparison` names a
fastxent kernel with fixed options and builds, from the same inputs, a
:class:`Runner` for fastxent and for each peer:

``numpy``
    the textbook NumPy formulation (stable log-softmax, gather, softmax minus
    one-hot), always available;
``torch``
    PyTorch CPU (forward, and ``backward()`` for the ``*_with_grad`` kernels);
``jax``
    a jitted function (``jax.value_and_grad`` for the gradient kernels), the
    way optax writes these losses;
``np.copyto`` / ``x.sum``
    the memory limit: a copy reads and writes the array once (what an
    in-place loss-and-gradient must at least do), a sum reads it once (what a
    forward-only loss must at least do).

PyTorch and JAX are imported lazily, only when their runner is built, and a
missing one raises :class:`PeerUnavailable`: neither is a dependency of
fastxent. Nothing here times anything; :mod:`fastxent._bench` and the asv
suite do.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import numpy as np

import fastxent

#: Implementations in the order tables list them.
IMPLEMENTATIONS = ("fastxent", "torch", "numpy", "jax")
PEERS = ("torch", "numpy", "jax")
MEMORY_LIMITS = ("np.copyto", "x.sum")

#: The (N, C) shapes of the issue: LLM vocabularies (Llama 2, Llama 3), a
#: classifier, a medium class count (the tiled kernels) and a small class
#: count with many rows.
MAIN_SHAPES = ((8192, 32000), (2048, 128256), (4096, 1000), (6400, 64), (65536, 10))
#: Same class counts, few rows: seconds, not minutes (``--quick``, CI).
QUICK_SHAPES = ((256, 32000), (64, 128256), (1024, 1000), (256, 64), (8192, 10))

#: Share of hard targets set to ``ignore_index`` in the ignore_index variant.
IGNORED_SHARE = 0.1
LABEL_SMOOTHING = 0.1
#: The z-loss coefficient of LLM training (PaLM).
Z_LOSS = 1e-4
#: Gemma 2's final-logit softcap, and a logit scale, for the LLM options' comparisons.
SOFTCAP = 30.0
LOGIT_SCALE = 0.5
#: The LLM options' comparisons: name -> (description, cross_entropy options).
LLM_VARIANTS = {
    "cross_entropy_softcap": (f"cross-entropy with softcap={SOFTCAP} and its gradient, in place",
                              dict(softcap=SOFTCAP)),
    "cross_entropy_stats": ("cross-entropy with return_stats (lse, argmax, accuracy) and its "
                            "gradient, in place", dict(return_stats=True)),
    "cross_entropy_llm": (f"cross-entropy with logit_scale={LOGIT_SCALE}, softcap={SOFTCAP}, "
                          f"z_loss={Z_LOSS} and return_stats, and its gradient, in place",
                          dict(logit_scale=LOGIT_SCALE, softcap=SOFTCAP, z_loss=Z_LOSS,
                               return_stats=True)),
}


class PeerUnavailable(RuntimeError):
    """The library a peer runs on (PyTorch, JAX) is not installed."""


@dataclass
class Runner:
    """One implementation, ready to time on one set of inputs.

    Attributes
    ----------
    run : callable
        The timed call. It returns its results so that lazy peers (JAX) have
        finished their work when the timer stops.
    reset : callable or None
        Untimed: restores the inputs a previous ``run`` overwrote (the
        in-place kernels write the gradient over the logits). Call it before
        every timed ``run``.
    """

    run: Callable[[], Any]
    reset: Optional[Callable[[], None]] = None
    #: ``"s"``: ``run`` is timed. Otherwise ``run`` returns the measurement
    #: itself in that unit (``"B"``: bytes of peak memory), once per sample.
    unit: str = "s"

    def prepare(self) -> None:
        """Run ``reset`` if there is one (outside any timed region)."""
        if self.reset is not None:
            self.reset()


@dataclass(frozen=True)
class Comparison:
    """A fastxent kernel with fixed options, its peers and its memory limit.

    Attributes
    ----------
    name : str
        Key in :data:`COMPARISONS` (and the asv benchmark's name).
    description : str
        What is computed, for tables and docs.
    make_inputs : callable
        ``make_inputs(n, c, dtype, rng) -> dict`` of NumPy arrays; ``"x"`` is
        the (N, C) array the kernel reads (logits, log-probabilities).
    builders : dict
        Implementation name -> ``builder(inputs) -> Runner``. A builder raises
        :class:`PeerUnavailable` when its library is missing.
    limit : str
        The memory limit this kernel is held against: ``"np.copyto"`` for
        kernels that write an (N, C) array, ``"x.sum"`` for reductions.
    """

    name: str
    description: str
    make_inputs: Callable[..., Dict[str, np.ndarray]]
    builders: Dict[str, Callable[[Dict[str, np.ndarray]], Runner]] = field(repr=False)
    limit: str = "np.copyto"

    def runner(self, implementation: str, inputs: Dict[str, np.ndarray]) -> Runner:
        """Build the :class:`Runner` of ``implementation`` (a peer or a memory limit).

        Raises
        ------
        PeerUnavailable
            The peer's library is not installed.
        KeyError
            No such implementation for this comparison.
        """
        if implementation in MEMORY_LIMITS:
            return memory_limit_runner(implementation, inputs)
        return self.builders[implementation](inputs)


# --------------------------------------------------------------------------
# Inputs


def _logits(n, c, dtype, rng):
    # Standard normal logits: a typical spread, and no row dominated by one class.
    return rng.standard_normal((n, c), dtype=np.float32).astype(dtype, copy=False)


def hard_target_inputs(n, c, dtype, rng, ignored_share=0.0, weighted=False):
    """Logits and int64 class targets; optionally some ignored, optionally class weights."""
    target = rng.integers(0, c, n, dtype=np.int64)
    if ignored_share:
        target[rng.random(n) < ignored_share] = -100
    inputs = {"x": _logits(n, c, dtype, rng), "target": target}
    if weighted:
        inputs["weight"] = rng.uniform(0.5, 2.0, c).astype(dtype)
    return inputs


def soft_target_inputs(n, c, dtype, rng):
    """Logits and class probabilities of the same shape (rows sum to 1)."""
    target = rng.random((n, c), dtype=np.float32).astype(dtype, copy=False)
    target /= target.sum(axis=-1, keepdims=True)
    return {"x": _logits(n, c, dtype, rng), "target": target}


def log_prob_inputs(n, c, dtype, rng):
    """Log-probabilities (rows of log-softmax) and class targets, for nll_loss."""
    inputs = hard_target_inputs(n, c, dtype, rng)
    inputs["x"] = fastxent.log_softmax(inputs["x"])
    return inputs


def plain_inputs(n, c, dtype, rng):
    """Just the (N, C) array, for softmax, log_softmax and logsumexp."""
    return {"x": _logits(n, c, dtype, rng)}


def binary_inputs(n, c, dtype, rng):
    """Logits and independent targets in [0, 1] of the same shape (multi-label)."""
    return {"x": _logits(n, c, dtype, rng),
            "target": rng.random((n, c), dtype=np.float32).astype(dtype, copy=False)}


def work_buffer(inputs):
    """A scratch array like ``inputs["x"]``, shared by the runners of these inputs.

    In-place runners and ``np.copyto`` restore it before each call, so one
    buffer serves them all: on the LLM shapes that saves a gigabyte per runner.
    """
    if "_work" not in inputs:
        inputs["_work"] = np.empty_like(inputs["x"])
    return inputs["_work"]


def memory_limit_runner(kind, inputs):
    """``np.copyto`` of the logits into a buffer, or ``x.sum(axis=-1)``."""
    x = inputs["x"]
    if kind == "np.copyto":
        dst = work_buffer(inputs)
        return Runner(lambda: np.copyto(dst, x))
    if kind == "x.sum":
        return Runner(lambda: x.sum(axis=-1))
    raise KeyError(kind)


# --------------------------------------------------------------------------
# fastxent


def _fastxent_in_place(function, **options):
    """Builder of ``function(work, target, inplace=True)`` on a restored copy of the logits."""

    def build(inputs):
        x, target = inputs["x"], inputs["target"]
        work = work_buffer(inputs)
        weight = {"weight": inputs["weight"]} if "weight" in inputs else {}
        return Runner(lambda: function(work, target, inplace=True, **weight, **options),
                      reset=lambda: np.copyto(work, x))

    return build


def _fastxent_call(function, *names, **options):
    """Builder of ``function(*inputs[names], **options)`` on read-only inputs."""

    def build(inputs):
        args = [inputs[name] for name in names]
        return Runner(lambda: function(*args, **options))

    return build


# --------------------------------------------------------------------------
# NumPy: the textbook formulas a NumPy user writes (benchmark peers only;
# the tests' reference is tests/reference.py)


def numpy_log_softmax(x):
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def numpy_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def numpy_logsumexp(x):
    m = x.max(axis=-1)
    return m + np.log(np.exp(x - m[:, None]).sum(axis=-1))


def numpy_cross_entropy(x, target, with_grad=False):
    """Mean cross-entropy and its gradient ``(softmax - one-hot) / N``."""
    logp, rows = numpy_log_softmax(x), np.arange(len(target))
    loss = -logp[rows, target].mean()
    if not with_grad:
        return loss
    grad = np.exp(logp)
    grad[rows, target] -= 1
    return loss, grad / len(target)


def numpy_cross_entropy_options(x, target, weight=None, ignore_index=-100,
                                label_smoothing=0.0, with_grad=False):
    """The same with PyTorch's options: ``loss_i = -sum_c a_ic logp_ic`` with
    ``a`` the (smoothed, weighted) one-hot, zero on ignored rows."""
    n, c = x.shape
    keep = target != ignore_index
    w = np.ones(c, x.dtype) if weight is None else weight
    a = np.zeros_like(x)
    a[np.arange(n), np.where(keep, target, 0)] = 1 - label_smoothing
    a = (a + label_smoothing / c) * keep[:, None] * w
    total = (w[np.where(keep, target, 0)] * keep).sum()
    logp = numpy_log_softmax(x)
    loss = -(a * logp).sum() / total
    if not with_grad:
        return loss
    return loss, (np.exp(logp) * a.sum(axis=-1, keepdims=True) - a) / total


def numpy_cross_entropy_z_loss(x, target, with_grad=False):
    """Mean cross-entropy plus ``Z_LOSS * lse**2`` (PaLM), and its gradient
    ``(softmax (1 + 2 Z_LOSS lse) - one-hot) / N``."""
    n = len(x)
    m = x.max(axis=-1, keepdims=True)
    e = np.exp(x - m)
    s = e.sum(axis=-1, keepdims=True)
    lse = m + np.log(s)
    loss = (lse[:, 0] - x[np.arange(n), target] + Z_LOSS * lse[:, 0] ** 2).mean()
    if not with_grad:
        return loss
    grad = e / s * (1 + 2 * Z_LOSS * lse)
    grad[np.arange(n), target] -= 1
    return loss, grad / n


def numpy_cross_entropy_llm(x, target, with_grad=False, logit_scale=1.0, softcap=None,
                            z_loss=0.0, return_stats=False):
    """Mean cross-entropy of the scaled, capped logits plus ``z_loss * lse**2``,
    the statistics (lse, argmax, accuracy) computed alongside, and the
    gradient through the cap."""
    n = len(x)
    z = x * logit_scale if logit_scale != 1.0 else x
    if softcap is not None:
        t = np.tanh(z / softcap)
        z = softcap * t
    m = z.max(axis=-1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(axis=-1, keepdims=True)
    lse = m + np.log(s)
    loss = (lse[:, 0] - z[np.arange(n), target] + z_loss * lse[:, 0] ** 2).mean()
    if return_stats:
        predicted = x.argmax(axis=-1)
        _ = (predicted == target).mean()  # the accuracy
    if not with_grad:
        return loss
    grad = e / s * (1 + 2 * z_loss * lse)
    grad[np.arange(n), target] -= 1
    grad /= n
    if softcap is not None:
        grad *= logit_scale * (1 - t * t)
    elif logit_scale != 1.0:
        grad *= logit_scale
    return loss, grad


def numpy_soft_cross_entropy(x, target, with_grad=False):
    """Mean cross-entropy of class probabilities and its gradient ``(softmax - q) / N``."""
    logp = numpy_log_softmax(x)
    loss = -(target * logp).sum() / len(x)
    return (loss, (np.exp(logp) - target) / len(x)) if with_grad else loss


def numpy_bce_with_logits(x, target, with_grad=False):
    """Mean binary cross-entropy on logits and its gradient ``(sigmoid - t) / size``."""
    loss = (np.maximum(x, 0) - x * target + np.log1p(np.exp(-np.abs(x)))).mean()
    return (loss, (1 / (1 + np.exp(-x)) - target) / x.size) if with_grad else loss


def _numpy_cross_entropy(with_grad, **options):
    """Builder of the plain textbook loss, or of the one with options when
    there are any (``options``, or class weights among the inputs)."""

    def build(inputs):
        plain = not options and "weight" not in inputs
        function = numpy_cross_entropy if plain else numpy_cross_entropy_options
        return _numpy_builder(function, "x", "target", with_grad=with_grad, **options)(inputs)

    return build


def _numpy_builder(function, *names, **options):
    def build(inputs):
        args = [inputs[name] for name in names]
        kwargs = dict(options)
        if "weight" in inputs:
            kwargs["weight"] = inputs["weight"]
        return Runner(lambda: function(*args, **kwargs))

    return build


# --------------------------------------------------------------------------
# PyTorch


def _torch():
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as error:
        raise PeerUnavailable("PyTorch is not installed") from error
    return torch, F


def _torch_builder(make_call, with_grad, *names):
    """Builder of a PyTorch call on tensors sharing the inputs' memory.

    ``make_call(torch, F, inputs)`` returns ``loss_fn(x, *others)``. With
    ``with_grad`` each call takes a fresh leaf of the logits, so ``backward()``
    allocates and fills the gradient as in a training step.
    """

    def build(inputs):
        torch, F = _torch()
        tensors = [torch.from_numpy(inputs[name]) for name in names]
        loss_fn = make_call(torch, F, inputs)
        if not with_grad:
            def run():
                with torch.no_grad():
                    return loss_fn(*tensors)
            return Runner(run)

        x, others = tensors[0], tensors[1:]

        def run_with_grad():
            leaf = x.detach().requires_grad_(True)
            loss = loss_fn(leaf, *others)
            loss.backward()
            return loss, leaf.grad

        return Runner(run_with_grad)

    return build


def _torch_cross_entropy(**options):
    def make_call(torch, F, inputs):
        weight = torch.from_numpy(inputs["weight"]) if "weight" in inputs else None
        return lambda x, t: F.cross_entropy(x, t, weight=weight, **options)
    return make_call


def _torch_z_loss(torch, F, inputs):
    """The z-loss as PyTorch users add it to their loss."""
    return lambda x, t: F.cross_entropy(x, t) + Z_LOSS * (torch.logsumexp(x, -1) ** 2).mean()


def _torch_llm(logit_scale=1.0, softcap=None, z_loss=0.0, return_stats=False):
    """The LLM options as PyTorch users write them around ``F.cross_entropy``."""
    def make_call(torch, F, inputs):
        def loss_fn(x, t):
            z = x * logit_scale if logit_scale != 1.0 else x
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            loss = F.cross_entropy(z, t)
            if z_loss or return_stats:
                lse = torch.logsumexp(z, -1)
            if z_loss:
                loss = loss + z_loss * (lse ** 2).mean()
            if return_stats:
                with torch.no_grad():
                    predicted = x.argmax(-1)
                    _ = (predicted == t).double().mean()  # the accuracy
            return loss
        return loss_fn
    return make_call


# --------------------------------------------------------------------------
# JAX


def _jax():
    try:
        import jax
    except ImportError as error:
        raise PeerUnavailable("JAX is not installed") from error
    # float64 inputs must stay float64 (JAX truncates to float32 otherwise).
    jax.config.update("jax_enable_x64", True)
    return jax, jax.numpy


def jax_cross_entropy(jnp, jax, x, target, weight, ignore_index, label_smoothing):
    """Mean cross-entropy with PyTorch's semantics, written as optax users write it."""
    c = x.shape[-1]
    logp = jax.nn.log_softmax(x, axis=-1)
    kept = target != ignore_index
    safe_target = jnp.where(kept, target, 0)
    w = jnp.ones(c, x.dtype) if weight is None else weight
    w_target = jnp.where(kept, w[safe_target], 0)
    picked = jnp.take_along_axis(logp, safe_target[:, None], axis=-1)[:, 0]
    losses = -(1 - label_smoothing) * w_target * picked
    if label_smoothing:
        losses -= (label_smoothing / c) * kept * (logp * w).sum(axis=-1)
    return losses.sum() / w_target.sum()


def _jax_builder(make_loss, with_grad, *names):
    """Builder of ``jax.jit(loss)`` (or of its ``value_and_grad``) on device copies.

    The inputs are put on the device once, outside the timed region, and each
    call waits for its results (JAX dispatches asynchronously).
    """

    def build(inputs):
        jax, jnp = _jax()
        arrays = [jnp.asarray(inputs[name]) for name in names]
        loss = make_loss(jax, jnp, inputs)
        fn = jax.jit(jax.value_and_grad(loss) if with_grad else loss)
        return Runner(lambda: jax.block_until_ready(fn(*arrays)))

    return build


def _jax_cross_entropy(ignore_index=-100, label_smoothing=0.0):
    def make_loss(jax, jnp, inputs):
        weight = jnp.asarray(inputs["weight"]) if "weight" in inputs else None
        return lambda x, t: jax_cross_entropy(jnp, jax, x, t, weight, ignore_index,
                                              label_smoothing)
    return make_loss


def _jax_z_loss(jax, jnp, inputs):
    def loss(x, t):
        lse = jax.scipy.special.logsumexp(x, axis=-1)
        return jnp.mean(lse - jnp.take_along_axis(x, t[:, None], axis=-1)[:, 0]
                        + Z_LOSS * lse ** 2)
    return loss


def _jax_llm(logit_scale=1.0, softcap=None, z_loss=0.0, return_stats=False):
    def make_loss(jax, jnp, inputs):
        def loss(x, t):
            z = x * logit_scale
            if softcap is not None:
                z = softcap * jnp.tanh(z / softcap)
            lse = jax.scipy.special.logsumexp(z, axis=-1)
            return jnp.mean(lse - jnp.take_along_axis(z, t[:, None], axis=-1)[:, 0]
                            + z_loss * lse ** 2)
        return loss
    return make_loss


def _jax_soft_cross_entropy(jax, jnp, inputs):
    return lambda x, t: -(t * jax.nn.log_softmax(x, axis=-1)).sum() / x.shape[0]


def _jax_bce(jax, jnp, inputs):
    # optax.sigmoid_binary_cross_entropy's formulation, averaged.
    return lambda x, t: -(t * jax.nn.log_sigmoid(x) + (1 - t) * jax.nn.log_sigmoid(-x)).mean()


# --------------------------------------------------------------------------
# The table


def _cross_entropy_variant(name, description, make_inputs, **options):
    """The in-place loss-and-gradient comparison of one cross_entropy option set."""
    return Comparison(
        name, description, make_inputs,
        {"fastxent": _fastxent_in_place(fastxent.cross_entropy_with_grad, **options),
         "numpy": _numpy_cross_entropy(with_grad=True, **options),
         "torch": _torch_builder(_torch_cross_entropy(**options), True, "x", "target"),
         "jax": _jax_builder(_jax_cross_entropy(**options), True, "x", "target")})


def _loss_and_grad(*args, **options):
    """``cross_entropy_with_grad``'s loss and gradient (its statistics, when
    asked for, are computed and dropped)."""
    return fastxent.cross_entropy_with_grad(*args, **options)[:2]


def _ignoring(n, c, dtype, rng):
    return hard_target_inputs(n, c, dtype, rng, ignored_share=IGNORED_SHARE)


def _weighted(n, c, dtype, rng):
    return hard_target_inputs(n, c, dtype, rng, weighted=True)


_COMPARISONS = [
    Comparison(
        "cross_entropy", "mean cross-entropy of class targets, forward only",
        hard_target_inputs,
        {"fastxent": _fastxent_call(fastxent.cross_entropy, "x", "target"),
         "numpy": _numpy_cross_entropy(with_grad=False),
         "torch": _torch_builder(_torch_cross_entropy(), False, "x", "target"),
         "jax": _jax_builder(_jax_cross_entropy(), False, "x", "target")},
        limit="x.sum"),
    _cross_entropy_variant("cross_entropy_with_grad",
                           "cross-entropy and its gradient, written over the logits",
                           hard_target_inputs),
    Comparison(
        "cross_entropy_soft_targets",
        "cross-entropy of class probabilities and its gradient, in place",
        soft_target_inputs,
        {"fastxent": _fastxent_in_place(fastxent.cross_entropy_with_grad),
         "numpy": _numpy_builder(numpy_soft_cross_entropy, "x", "target", with_grad=True),
         "torch": _torch_builder(_torch_cross_entropy(), True, "x", "target"),
         "jax": _jax_builder(_jax_soft_cross_entropy, True, "x", "target")}),
    _cross_entropy_variant("cross_entropy_weighted",
                           "cross-entropy with class weights and its gradient, in place",
                           _weighted),
    _cross_entropy_variant("cross_entropy_ignore_index",
                           f"cross-entropy with {IGNORED_SHARE:.0%} targets ignored and its "
                           "gradient, in place", _ignoring, ignore_index=-100),
    _cross_entropy_variant("cross_entropy_label_smoothing",
                           f"cross-entropy with label_smoothing={LABEL_SMOOTHING} and its "
                           "gradient, in place", hard_target_inputs,
                           label_smoothing=LABEL_SMOOTHING),
    Comparison(
        "cross_entropy_z_loss",
        f"cross-entropy with z_loss={Z_LOSS} and its gradient, in place", hard_target_inputs,
        {"fastxent": _fastxent_in_place(fastxent.cross_entropy_with_grad, z_loss=Z_LOSS),
         "numpy": _numpy_builder(numpy_cross_entropy_z_loss, "x", "target", with_grad=True),
         "torch": _torch_builder(_torch_z_loss, True, "x", "target"),
         "jax": _jax_builder(_jax_z_loss, True, "x", "target")}),
    *(Comparison(
        name, description, hard_target_inputs,
        {"fastxent": _fastxent_in_place(_loss_and_grad, **options),
         "numpy": _numpy_builder(numpy_cross_entropy_llm, "x", "target", with_grad=True,
                                 **options),
         "torch": _torch_builder(_torch_llm(**options), True, "x", "target"),
         "jax": _jax_builder(_jax_llm(**options), True, "x", "target")})
      for name, (description, options) in LLM_VARIANTS.items()),
    Comparison(
        "nll_loss", "negative log-likelihood of log-probabilities",
        log_prob_inputs,
        {"fastxent": _fastxent_call(fastxent.nll_loss, "x", "target"),
         "numpy": _numpy_builder(lambda lp, t: -lp[np.arange(len(t)), t].mean(), "x", "target"),
         "torch": _torch_builder(lambda torch, F, inputs: F.nll_loss, False, "x", "target"),
         "jax": _jax_builder(
             lambda jax, jnp, inputs: lambda lp, t: -jnp.take_along_axis(
                 lp, t[:, None], axis=-1).mean(), False, "x", "target")},
        limit="x.sum"),
    Comparison(
        "log_softmax", "log-softmax into a new array",
        plain_inputs,
        {"fastxent": _fastxent_call(fastxent.log_softmax, "x"),
         "numpy": _numpy_builder(numpy_log_softmax, "x"),
         "torch": _torch_builder(lambda torch, F, inputs: lambda x: torch.log_softmax(x, -1),
                                 False, "x"),
         "jax": _jax_builder(lambda jax, jnp, inputs: lambda x: jax.nn.log_softmax(x, axis=-1),
                             False, "x")}),
    Comparison(
        "softmax", "softmax into a new array",
        plain_inputs,
        {"fastxent": _fastxent_call(fastxent.softmax, "x"),
         "numpy": _numpy_builder(numpy_softmax, "x"),
         "torch": _torch_builder(lambda torch, F, inputs: lambda x: torch.softmax(x, -1),
                                 False, "x"),
         "jax": _jax_builder(lambda jax, jnp, inputs: lambda x: jax.nn.softmax(x, axis=-1),
                             False, "x")}),
    Comparison(
        "logsumexp", "logsumexp of each row",
        plain_inputs,
        {"fastxent": _fastxent_call(fastxent.logsumexp, "x"),
         "numpy": _numpy_builder(numpy_logsumexp, "x"),
         "torch": _torch_builder(lambda torch, F, inputs: lambda x: torch.logsumexp(x, -1),
                                 False, "x"),
         "jax": _jax_builder(
             lambda jax, jnp, inputs: lambda x: jax.scipy.special.logsumexp(x, axis=-1),
             False, "x")},
        limit="x.sum"),
    Comparison(
        "bce_with_logits", "mean binary cross-entropy on logits, forward only",
        binary_inputs,
        {"fastxent": _fastxent_call(fastxent.binary_cross_entropy_with_logits, "x", "target"),
         "numpy": _numpy_builder(numpy_bce_with_logits, "x", "target"),
         "torch": _torch_builder(
             lambda torch, F, inputs: F.binary_cross_entropy_with_logits, False, "x", "target"),
         "jax": _jax_builder(_jax_bce, False, "x", "target")},
        limit="x.sum"),
    Comparison(
        "bce_with_logits_with_grad",
        "binary cross-entropy on logits and its gradient, written over the logits",
        binary_inputs,
        {"fastxent": _fastxent_in_place(fastxent.binary_cross_entropy_with_logits_with_grad),
         "numpy": _numpy_builder(numpy_bce_with_logits, "x", "target", with_grad=True),
         "torch": _torch_builder(
             lambda torch, F, inputs: F.binary_cross_entropy_with_logits, True, "x", "target"),
         "jax": _jax_builder(_jax_bce, True, "x", "target")}),
]

# --------------------------------------------------------------------------
# The softmax Jacobian family: softmax/log_softmax backward and the
# cross-entropy Hessian-vector product. They run on the inputs of the other
# comparisons (``hard_target_inputs``): the logits stand in for the incoming
# gradient, and what else they need (softmax's output, a direction) is added
# to the inputs the first time a builder asks for it.


def softmax_output(inputs, log=False):
    """softmax (``log``: log_softmax) of the logits, kept in the inputs."""
    key = "log_softmax" if log else "softmax"
    if key not in inputs:
        inputs[key] = (fastxent.log_softmax if log else fastxent.softmax)(inputs["x"])
    return inputs[key]


def direction(inputs):
    """A standard normal direction of the logits' shape (the HVP's vector)."""
    if "vector" not in inputs:
        x = inputs["x"]
        rng = np.random.default_rng(12345)
        inputs["vector"] = rng.standard_normal(x.shape, dtype=np.float32).astype(x.dtype,
                                                                                copy=False)
    return inputs["vector"]


def numpy_softmax_backward(g, o):
    return o * (g - (g * o).sum(axis=-1, keepdims=True))


def numpy_log_softmax_backward(g, o):
    return g - np.exp(o) * g.sum(axis=-1, keepdims=True)


def numpy_cross_entropy_hvp(x, target, v):
    """The mean cross-entropy's Hessian times ``v``: ``(p v - p (p . v)) / N``."""
    p = numpy_softmax(x)
    pv = p * v
    return (pv - p * pv.sum(axis=-1, keepdims=True)) / len(x)


def _fastxent_backward(log):
    """``(log_)softmax_backward(work, output, inplace=True)``, ``work`` the
    incoming gradient (the logits) restored before each call."""
    function = fastxent.log_softmax_backward if log else fastxent.softmax_backward

    def build(inputs):
        x, output = inputs["x"], softmax_output(inputs, log)
        work = work_buffer(inputs)
        return Runner(lambda: function(work, output, inplace=True),
                      reset=lambda: np.copyto(work, x))

    return build


def _numpy_backward(log):
    function = numpy_log_softmax_backward if log else numpy_softmax_backward

    def build(inputs):
        x, output = inputs["x"], softmax_output(inputs, log)
        return Runner(lambda: function(x, output))

    return build


def _torch_backward(log):
    """PyTorch's backward kernel, ``torch._(log_)softmax_backward_data``."""

    def build(inputs):
        torch, _ = _torch()
        g = torch.from_numpy(inputs["x"])
        o = torch.from_numpy(softmax_output(inputs, log))
        kernel = torch._log_softmax_backward_data if log else torch._softmax_backward_data
        return Runner(lambda: kernel(g, o, -1, g.dtype))

    return build


def _jax_backward(log):
    def build(inputs):
        jax, jnp = _jax()
        g, o = jnp.asarray(inputs["x"]), jnp.asarray(softmax_output(inputs, log))
        if log:
            fn = jax.jit(lambda g, o: g - jnp.exp(o) * g.sum(axis=-1, keepdims=True))
        else:
            fn = jax.jit(lambda g, o: o * (g - (g * o).sum(axis=-1, keepdims=True)))
        return Runner(lambda: jax.block_until_ready(fn(g, o)))

    return build


def _fastxent_hvp(inputs):
    x, target, v = inputs["x"], inputs["target"], direction(inputs)
    out = work_buffer(inputs)
    return Runner(lambda: fastxent.cross_entropy_hvp(x, target, v, out=out))


def _numpy_hvp(inputs):
    x, target, v = inputs["x"], inputs["target"], direction(inputs)
    return Runner(lambda: numpy_cross_entropy_hvp(x, target, v))


def _torch_hvp(inputs):
    """PyTorch's double backward: the gradient with ``create_graph=True``,
    then the gradient of its product with the direction."""
    torch, F = _torch()
    x, target = torch.from_numpy(inputs["x"]), torch.from_numpy(inputs["target"])
    v = torch.from_numpy(direction(inputs))

    def run():
        leaf = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(leaf, target), leaf, create_graph=True)
        (hvp,) = torch.autograd.grad(grad, leaf, grad_outputs=v)
        return hvp

    return Runner(run)


def _jax_hvp(inputs):
    jax, jnp = _jax()
    x, target = jnp.asarray(inputs["x"]), jnp.asarray(inputs["target"])
    v = jnp.asarray(direction(inputs))

    def loss(z):
        return jax_cross_entropy(jnp, jax, z, target, None, -100, 0.0)

    fn = jax.jit(lambda x, v: jax.jvp(jax.grad(loss), (x,), (v,))[1])
    return Runner(lambda: jax.block_until_ready(fn(x, v)))


_COMPARISONS += [
    Comparison(
        "softmax_backward",
        "softmax's backward (gradient through softmax), written over the incoming gradient",
        hard_target_inputs,
        {"fastxent": _fastxent_backward(False), "numpy": _numpy_backward(False),
         "torch": _torch_backward(False), "jax": _jax_backward(False)}),
    Comparison(
        "log_softmax_backward",
        "log_softmax's backward, written over the incoming gradient",
        hard_target_inputs,
        {"fastxent": _fastxent_backward(True), "numpy": _numpy_backward(True),
         "torch": _torch_backward(True), "jax": _jax_backward(True)}),
    Comparison(
        "cross_entropy_hvp",
        "mean cross-entropy's Hessian (w.r.t. the logits) times a vector, into out=",
        hard_target_inputs,
        {"fastxent": _fastxent_hvp, "numpy": _numpy_hvp, "torch": _torch_hvp,
         "jax": _jax_hvp}),
]

# --------------------------------------------------------------------------
# Divergences on probabilities (``fastxent.divergences``)


def kl_inputs(n, c, dtype, rng):
    """Log-probabilities (rows of log-softmax) and target probabilities."""
    inputs = soft_target_inputs(n, c, dtype, rng)
    inputs["x"] = fastxent.log_softmax(inputs["x"])
    return inputs


def probability_inputs(n, c, dtype, rng):
    """Probabilities in (0, 1) and independent targets in [0, 1] (multi-label)."""
    inputs = binary_inputs(n, c, dtype, rng)
    inputs["x"] = fastxent.softmax(inputs["x"])  # in (0, 1): any probabilities do
    return inputs


def numpy_kl_div(x, target, with_grad=False):
    """KL per row (``batchmean``) and its gradient ``-target / N``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        xlogy = np.where(target > 0, target * np.log(target), 0)
    loss = (xlogy - target * x).sum() / len(x)
    return (loss, -target / len(x)) if with_grad else loss


def numpy_binary_cross_entropy(x, target, with_grad=False):
    """Mean BCE of probabilities (logs clamped at -100) and torch's gradient."""
    loss = -(target * np.maximum(np.log(x), -100)
             + (1 - target) * np.maximum(np.log1p(-x), -100)).mean()
    if not with_grad:
        return loss
    return loss, (x - target) / np.maximum(x * (1 - x), 1e-12) / x.size


def _jax_kl_div(jax, jnp, inputs):
    return lambda x, t: (jax.scipy.special.xlogy(t, t) - t * x).sum() / x.shape[0]


def _jax_binary_cross_entropy(jax, jnp, inputs):
    return lambda x, t: -(t * jnp.maximum(jnp.log(x), -100.0)
                          + (1 - t) * jnp.maximum(jnp.log1p(-x), -100.0)).mean()


_COMPARISONS += [
    Comparison(
        "kl_div_with_grad",
        "KL divergence (batchmean) of log-probabilities and its gradient, written over them",
        kl_inputs,
        {"fastxent": _fastxent_in_place(fastxent.kl_div_with_grad, reduction="batchmean"),
         "numpy": _numpy_builder(numpy_kl_div, "x", "target", with_grad=True),
         "torch": _torch_builder(
             lambda torch, F, inputs: lambda x, t: F.kl_div(x, t, reduction="batchmean"),
             True, "x", "target"),
         "jax": _jax_builder(_jax_kl_div, True, "x", "target")}),
    Comparison(
        "binary_cross_entropy_with_grad",
        "binary cross-entropy of probabilities and its gradient, written over them",
        probability_inputs,
        {"fastxent": _fastxent_in_place(fastxent.binary_cross_entropy_with_grad),
         "numpy": _numpy_builder(numpy_binary_cross_entropy, "x", "target", with_grad=True),
         "torch": _torch_builder(
             lambda torch, F, inputs: F.binary_cross_entropy, True, "x", "target"),
         "jax": _jax_builder(_jax_binary_cross_entropy, True, "x", "target")}),
]

#: Comparison name -> :class:`Comparison`, in the order of the tables.
COMPARISONS: Dict[str, Comparison] = {c.name: c for c in _COMPARISONS}


# --------------------------------------------------------------------------
# Small batches: a classifier's training step, where per-call overhead counts

#: (N, C) of the small-batch table: float32 batches of a 10-class classifier.
SMALL_BATCH_SHAPES = ((32, 10), (128, 10), (1024, 10))


def _loss_object(inputs):
    """``CrossEntropyLoss()`` called, then ``backward()``: a training step's use."""
    x, target = inputs["x"], inputs["target"]
    criterion = fastxent.CrossEntropyLoss()

    def run():
        loss = criterion(x, target)
        return loss, criterion.backward()

    return Runner(run)


#: The small-batch table: column label -> ``builder(inputs) -> Runner`` on
#: :func:`hard_target_inputs`. Nothing is in place: each call returns a new
#: gradient, as a training loop's first try does.
SMALL_BATCH: Dict[str, Callable[[Dict[str, np.ndarray]], Runner]] = {
    "fastxent": _fastxent_call(fastxent.cross_entropy_with_grad, "x", "target"),
    "numpy": _numpy_builder(numpy_cross_entropy, "x", "target", with_grad=True),
    "torch": _torch_builder(_torch_cross_entropy(), True, "x", "target"),
    "fwd": _fastxent_call(fastxent.cross_entropy, "x", "target"),
    "numpy fwd": _numpy_builder(numpy_cross_entropy, "x", "target"),
    "object": _loss_object,
}


def parse_shape(text: str) -> tuple:
    """``"8192x32000"`` -> ``(8192, 32000)``."""
    try:
        n, c = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a shape is NxC, e.g. 8192x32000; got {text!r}") from None
    if n < 1 or c < 1:
        raise ValueError(f"shape {text!r} must be positive")
    return n, c


def format_shape(shape) -> str:
    """``(8192, 32000)`` -> ``"8192x32000"``."""
    return "x".join(str(d) for d in shape)


def small_shapes_requested() -> bool:
    """Whether ``FASTXENT_BENCH_SMALL`` asks for the small shapes (CI)."""
    return os.environ.get("FASTXENT_BENCH_SMALL", "").strip() not in ("", "0")


# --------------------------------------------------------------------------
# Inside a PyTorch graph: fastxent.torch against torch.nn.functional

#: Features of the ``nn.Linear`` that makes the logits of the torch section:
#: few, so that the loss, not the matrix product, is what a step measures.
TORCH_GRAPH_FEATURES = 16
#: (N, C) of the torch section: an LLM vocabulary, and a quick one.
TORCH_GRAPH_SHAPES = ((8192, 32000),)
TORCH_GRAPH_QUICK_SHAPES = ((256, 32000),)


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise PeerUnavailable(f"/proc/self/status has no {key}")


_MMAP_THRESHOLD_SET = []


def _allocate_large_blocks_fresh() -> None:
    """Have glibc map every block of 1 MiB or more afresh, and unmap it when freed.

    By default glibc raises this threshold as blocks are freed (up to 32
    MiB) and then serves large blocks from pages it kept: a step would then
    add no resident memory, whatever it allocates. Fixed, every large
    tensor a step allocates shows in its peak. Once per process.
    """
    if _MMAP_THRESHOLD_SET:
        return
    _MMAP_THRESHOLD_SET.append(True)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 2**20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: peaks may then read low for small shapes


def peak_memory_of(run: Callable[[], Any]) -> float:
    """Bytes of resident memory ``run()`` added at its peak (Linux: VmHWM).

    The kernel's high-water mark is reset (``/proc/self/clear_refs``) first,
    so every page a call touched counts, however briefly it lived.
    """
    _allocate_large_blocks_fresh()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
    except OSError as error:
        raise PeerUnavailable("peak memory needs Linux's /proc/self/clear_refs") from error
    before = _proc_status_bytes("VmRSS:")
    run()
    return float(_proc_status_bytes("VmHWM:") - before)


def _torch_graph(loss_name: str, part: str):
    """Builder of one column of the torch section.

    ``loss_name``: ``"fastxent"`` (``fastxent.torch.cross_entropy``),
    ``"inplace"`` (the same with ``inplace_backward=True``) or ``"torch"``
    (``F.cross_entropy``). ``part``: ``"loss"`` times the loss's forward and
    backward on logits an ``nn.Linear`` made (untimed), down to
    d loss / d logits; ``"step"`` times the step, ``linear(h)``, the loss,
    ``loss.backward()`` into the layer's parameters; ``"peak"`` measures the
    step's peak memory (bytes, see :func:`peak_memory_of`); the gradient
    buffer ``fastxent.torch`` keeps between steps counts as the step's.
    """

    def build(inputs):
        torch, F = _torch()
        try:
            import fastxent.torch as ft
        except ImportError as error:
            raise PeerUnavailable(str(error)) from error
        target = torch.from_numpy(inputs["target"].astype(np.int64))
        n, c = inputs["x"].shape
        dtype = getattr(torch, inputs["x"].dtype.name)
        generator = torch.Generator().manual_seed(0)
        h = torch.randn(n, TORCH_GRAPH_FEATURES, generator=generator, dtype=dtype)
        linear = torch.nn.Linear(TORCH_GRAPH_FEATURES, c, dtype=dtype)
        with torch.no_grad():  # the same layer in every column
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator,
                                            dtype=dtype) / TORCH_GRAPH_FEATURES ** 0.5)
            linear.bias.zero_()
        if loss_name == "torch":
            loss_fn = F.cross_entropy
        else:
            inplace = loss_name == "inplace"
            def loss_fn(x, t):
                return ft.cross_entropy(x, t, inplace_backward=inplace)

        def step():
            loss = loss_fn(linear(h), target)
            loss.backward()
            return loss

        def clear_grads():
            linear.zero_grad(set_to_none=True)

        if part == "step":
            return Runner(step, clear_grads)
        if part == "peak":
            def peak():
                # A gradient buffer kept from an earlier step is resident
                # already, so the step adds none: count it as the step's.
                kept = sum(t.numel() * t.element_size()
                           for t in ft._BUFFERS.entries.values()
                           if tuple(t.shape) == (n, c) and t.dtype == dtype)
                return peak_memory_of(step) + (kept if loss_name == "fastxent" else 0)
            return Runner(peak, clear_grads, unit="B")
        state = {}

        def fresh_logits():
            state.clear()  # the previous call's gradient goes first
            state["logits"] = linear(h)

        def loss_part():
            logits = state.pop("logits")
            loss = loss_fn(logits, target)
            return loss, torch.autograd.grad(loss, logits)

        return Runner(loss_part, fresh_logits)

    return build


#: The torch section: column label -> ``builder(inputs) -> Runner`` on
#: :func:`hard_target_inputs`; ``peak`` columns measure bytes, not seconds.
TORCH_GRAPH: Dict[str, Callable[[Dict[str, np.ndarray]], Runner]] = {
    "fastxent": _torch_graph("fastxent", "loss"),
    "inplace": _torch_graph("inplace", "loss"),
    "torch": _torch_graph("torch", "loss"),
    "fastxent step": _torch_graph("fastxent", "step"),
    "inplace step": _torch_graph("inplace", "step"),
    "torch step": _torch_graph("torch", "step"),
    "fastxent peak": _torch_graph("fastxent", "peak"),
    "inplace peak": _torch_graph("inplace", "peak"),
    "torch peak": _torch_graph("torch", "peak"),
}


# --------------------------------------------------------------------------
# 16-bit logits (``python -m fastxent bench --half``, asv ``HalfPrecision``):
# cross_entropy_with_grad in place on bfloat16 and float16 copies of the
# float32 logits, against the float32 kernel on the float32 logits, the
# 16-bit memory limit and PyTorch on bfloat16 tensors.

#: The 16-bit section's shapes: the LLM vocabularies.
HALF_SHAPES = ((8192, 32000), (2048, 128256))


def _half_dtype(name):
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as error:
            raise PeerUnavailable("ml_dtypes is not installed (bfloat16 arrays)") from error
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np.float16)


def half_logits(inputs, name):
    """The logits in the 16-bit dtype ``name``, kept in the inputs."""
    key = "_x_" + name
    if key not in inputs:
        inputs[key] = inputs["x"].astype(_half_dtype(name))
    return inputs[key]


def _half_work(inputs, name):
    """The 16-bit scratch array, viewed as ``name``: the first half of the
    float32 columns' buffer, so that every column of the table reads and
    writes the same memory (on a shared machine some of it can be twice as
    fast as the rest, and which part a new array gets is luck)."""
    work = work_buffer(inputs).reshape(-1).view(np.uint16)[:inputs["x"].size]
    return work.reshape(inputs["x"].shape).view(_half_dtype(name))


def _half_in_place(name):
    def build(inputs):
        x, target = half_logits(inputs, name), inputs["target"]
        work = _half_work(inputs, name)
        return Runner(lambda: fastxent.cross_entropy_with_grad(work, target, inplace=True),
                      reset=lambda: np.copyto(work, x))
    return build


def _half_copyto(name):
    def build(inputs):
        x, work = half_logits(inputs, name), _half_work(inputs, name)
        return Runner(lambda: np.copyto(work, x))
    return build


def _torch_bf16(inputs):
    torch, F = _torch()
    x = torch.from_numpy(half_logits(inputs, "bfloat16").view(np.int16)).view(torch.bfloat16)
    target = torch.from_numpy(inputs["target"])

    def run():
        leaf = x.detach().requires_grad_(True)
        loss = F.cross_entropy(leaf, target)
        loss.backward()
        return loss, leaf.grad

    return Runner(run)


@functools.cache
def _in_place_passes():
    """Numba loops that read and write every element once, in parallel, by
    the threads the kernels use: the fused kernels' memory floor (one
    ``np.copyto`` thread does not reach it on every machine)."""
    import numba

    @numba.njit(parallel=True)
    def scale(a, c):
        for i in numba.prange(a.shape[0]):
            for j in range(a.shape[1]):
                a[i, j] *= c

    @numba.njit(parallel=True)
    def flip(a, bits):
        for i in numba.prange(a.shape[0]):
            for j in range(a.shape[1]):
                a[i, j] ^= bits

    return scale, flip


def _pass_f32(inputs):
    x, work = inputs["x"], work_buffer(inputs)
    scale = _in_place_passes()[0]
    return Runner(lambda: scale(work, np.float32(1.0)), reset=lambda: np.copyto(work, x))


def _pass_16(inputs):
    work = _half_work(inputs, "float16").view(np.uint16)
    flip = _in_place_passes()[1]
    return Runner(lambda: flip(work, np.uint16(0)))


#: label -> builder(inputs) -> Runner; the inputs are float32 ``hard_target_inputs``.
HALF: Dict[str, Callable[[Dict[str, np.ndarray]], Runner]] = {
    "bf16": _half_in_place("bfloat16"),
    "fp16": _half_in_place("float16"),
    "f32": _fastxent_in_place(fastxent.cross_entropy_with_grad),
    "copyto bf16": _half_copyto("bfloat16"),
    "copyto fp16": _half_copyto("float16"),
    "pass 16": _pass_16,
    "pass f32": _pass_f32,
    "torch bf16": _torch_bf16,
}
