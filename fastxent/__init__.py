"""fastxent: fused, Numba-accelerated cross-entropy losses and their gradients."""

from .losses import (BCEWithLogitsLoss, CrossEntropyLoss, binary_cross_entropy_with_logits,
                     binary_cross_entropy_with_logits_with_grad, cross_entropy,
                     cross_entropy_with_grad, log_softmax, logsumexp, nll_loss, softmax)

# Fused linear + cross-entropy
from .linear import (LinearCrossEntropyLoss, linear_cross_entropy,
                     linear_cross_entropy_with_grad)

__version__ = "0.1.0"

__all__ = [
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy_with_logits_with_grad",
    "cross_entropy",
    "cross_entropy_with_grad",
    "log_softmax",
    "logsumexp",
    "nll_loss",
    "softmax",
    # Fused linear + cross-entropy
    "LinearCrossEntropyLoss",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
]
