"""fastxent: fused, Numba-accelerated cross-entropy losses and their gradients."""

from ._spec import CrossEntropyStats
from .losses import (BCEWithLogitsLoss, CrossEntropyLoss, binary_cross_entropy_with_logits,
                     binary_cross_entropy_with_logits_with_grad, cross_entropy,
                     cross_entropy_with_grad, log_softmax, logsumexp, nll_loss, softmax)
from .divergences import (KLDivLoss, binary_cross_entropy, binary_cross_entropy_with_grad,
                          kl_div, kl_div_with_grad)
from .jacobian import (cross_entropy_hvp, log_softmax_backward, softmax_backward,
                       softmax_jacobian)
from .distillation import (DistillationLoss, distillation_loss,
                           distillation_loss_with_grad)
from .linear import (LinearCrossEntropyLoss, linear_cross_entropy,
                     linear_cross_entropy_with_grad)

__version__ = "0.1.0"

__all__ = [
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "CrossEntropyStats",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy_with_logits_with_grad",
    "cross_entropy",
    "cross_entropy_with_grad",
    "log_softmax",
    "logsumexp",
    "nll_loss",
    "softmax",
    # divergences on probabilities
    "KLDivLoss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_grad",
    "kl_div",
    "kl_div_with_grad",
    # the softmax Jacobian family
    "cross_entropy_hvp",
    "log_softmax_backward",
    "softmax_backward",
    "softmax_jacobian",
    # Fused linear + cross-entropy
    "LinearCrossEntropyLoss",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    # Distillation from teacher logits
    "DistillationLoss",
    "distillation_loss",
    "distillation_loss_with_grad",
]
