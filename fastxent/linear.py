"""Fused linear + cross-entropy: the loss of hidden states against a
vocabulary without ever making the logits.

``linear_cross_entropy(input, linear_weight, target)`` is
``cross_entropy(input @ linear_weight.T + linear_bias, target)``, as
``torch.nn.functional.linear_cross_entropy``, computed a chunk of rows at a
time: a chunk's logits are one matrix product (the caller's BLAS: NumPy's
``matmul``) into one reused buffer, fastxent's fused kernel turns them into
their gradient in place, and two more products give the chunk's share of
the input's and the weight's gradients. No N x C array is allocated.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from numpy.typing import ArrayLike

from . import _validate
from .losses import Device, Reduction


def _linear_ce(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
               label_smoothing, chunk_size, device, ce_options, with_grad):
    backend, spec, (x, w, b, t, cw) = _validate.linear_cross_entropy_call(
        input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
        label_smoothing, chunk_size, device, ce_options)
    return backend.linear_cross_entropy(spec, x, w, b, t, cw, with_grad)


def linear_cross_entropy(input: ArrayLike, linear_weight: ArrayLike, target: ArrayLike, *,
                         linear_bias: Optional[ArrayLike] = None,
                         weight: Optional[ArrayLike] = None, ignore_index: int = -100,
                         reduction: Reduction = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, chunk_size: Optional[int] = None,
                         device: Device = "auto", **options: Any) -> Any:
    """Cross-entropy of ``input @ linear_weight.T + linear_bias`` against ``target``.

    As ``torch.nn.functional.linear_cross_entropy``; the logits are never
    made whole (see the module's docstring).

    Parameters
    ----------
    input : array_like, shape (..., H)
        Hidden states (float32, float64, float16 or ``ml_dtypes.bfloat16``),
        one row per target.
    linear_weight : array_like, shape (C, H)
        The output layer's weight (e.g. an LLM head or tied embedding), in
        the input's dtype. On the CPU a 16-bit one is widened to a float32
        copy (C x H x 4 bytes) for the products, which run in float32; on
        the GPU the library multiplies the 16-bit arrays as they are.
    target : array_like
        Class indices of shape ``input.shape[:-1]``, or class probabilities
        of shape ``input.shape[:-1] + (C,)``.
    linear_bias : array_like of shape (C,), optional
        Added to every row of logits; in the input's dtype.
    weight, ignore_index, reduction, label_smoothing, z_loss
        As in :func:`fastxent.cross_entropy`; ``mean`` divides by the
        denominator over all rows, not per chunk.
    chunk_size : int, optional
        Rows of logits made at a time. None picks them from N, C and H:
        4% of the rows (a multiple of 32: 320 of 8192, 160 of 4096), or as
        many as fill a 16 MiB buffer if that is more, at least 64, and at
        least H / 4 when H * 4 > C. Memory above the inputs and gradients is
        about one chunk's logits plus 5 MiB.
    device : {"auto", "cpu", "cuda"}, default "auto"
        ``auto`` runs where the arrays are. GPU arrays must come from a
        library whose matrix product fastxent can call (CuPy, PyTorch).
    **options
        Further options of :func:`fastxent.cross_entropy`, passed on to the
        per-chunk kernel.

    Returns
    -------
    loss : scalar of the input's dtype, or an array of ``input.shape[:-1]``
        for ``reduction="none"``; float32 for 16-bit inputs.
    """
    loss, _ = _linear_ce(input, linear_weight, target, linear_bias, weight, ignore_index,
                         reduction, label_smoothing, chunk_size, device,
                         dict(z_loss=z_loss, **options), with_grad=False)
    return loss


def linear_cross_entropy_with_grad(input: ArrayLike, linear_weight: ArrayLike,
                                   target: ArrayLike, *,
                                   linear_bias: Optional[ArrayLike] = None,
                                   weight: Optional[ArrayLike] = None, ignore_index: int = -100,
                                   reduction: Reduction = "mean", label_smoothing: float = 0.0,
                                   z_loss: float = 0.0, chunk_size: Optional[int] = None,
                                   device: Device = "auto",
                                   **options: Any) -> Tuple[Any, Any, Any, Any]:
    """The loss of :func:`linear_cross_entropy` and its three gradients, in one pass.

    Returns
    -------
    loss, grad_input, grad_linear_weight, grad_linear_bias
        Gradients of the loss (for ``reduction="none"``, of the sum of the
        per-row losses) with respect to ``input`` (its shape),
        ``linear_weight`` (C, H) and ``linear_bias`` (C,); the last is None
        without a bias. For float32 inputs every sum runs in float32. For
        float16 / bfloat16 inputs the sums run in float32 too and the
        gradients come back in the input's dtype, rounded to nearest even
        (on the CPU once, at the end; on the GPU the logits chunk, its
        gradient and each product are 16-bit too, see ``docs/usage.md``).
    """
    loss, (gx, gw, gb) = _linear_ce(input, linear_weight, target, linear_bias, weight,
                                    ignore_index, reduction, label_smoothing, chunk_size, device,
                                    dict(z_loss=z_loss, **options), with_grad=True)
    return loss, gx, gw, gb


class LinearCrossEntropyLoss:
    """A fused linear + cross-entropy loss with fixed options.

    ``loss = fn(input, linear_weight, target, linear_bias=None)`` computes
    the loss and keeps its gradients; ``fn.backward()`` returns them as
    ``(grad_input, grad_linear_weight, grad_linear_bias)``.

    Parameters
    ----------
    weight, ignore_index, reduction, label_smoothing, z_loss, chunk_size, device, **options
        As in :func:`linear_cross_entropy`.
    """

    def __init__(self, *, weight: Optional[ArrayLike] = None, ignore_index: int = -100,
                 reduction: Reduction = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, chunk_size: Optional[int] = None,
                 device: Device = "auto", **options: Any):
        self.weight = weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.chunk_size = chunk_size
        self.device = device
        self.options = dict(z_loss=z_loss, **options)
        self._grads = None

    def __call__(self, input: ArrayLike, linear_weight: ArrayLike, target: ArrayLike,
                 linear_bias: Optional[ArrayLike] = None) -> Any:
        self._grads = None
        loss, self._grads = _linear_ce(input, linear_weight, target, linear_bias, self.weight,
                                       self.ignore_index, self.reduction, self.label_smoothing,
                                       self.chunk_size, self.device, self.options,
                                       with_grad=True)
        return loss

    def backward(self) -> Tuple[Any, Any, Any]:
        """``(grad_input, grad_linear_weight, grad_linear_bias)`` of the last call."""
        if self._grads is None:
            raise RuntimeError("backward() needs a call first: loss = fn(input, "
                               "linear_weight, target)")
        grads, self._grads = self._grads, None
        return grads
