"""Every per-row and per-element formula, written once for both devices.

Each function is plain scalar Python: ``_cpu_kernels`` compiles it with
``numba.njit(inline="always")`` and ``_cuda_kernels`` with
``cuda.jit(device=True)``, so the CPU's rows, tiles and blocks and the GPU's
kernels compute a loss from the same expression. A formula calls no other
function (each device compiles it alone) and takes the row's sums as the
device computed them: the CPU with fixed-order vector lanes after the max
pass, the GPU in one online pass. The transcendental functions are the
device's own (vectorizable polynomials on the CPU, libdevice on the GPU) and
reach a formula as arguments.

Notation: a row of logits x_c, its max m, s = sum_c exp(x_c - m), so that
lse = m + log(s) and p_c = exp(x_c - m) / s; eps the label smoothing, C the
number of classes, w_c the class weights (1 without weights).
"""

from __future__ import annotations

import math

import numpy as np


def hard_target_row(m, log_s, s, x_target, w_target, w_sum, w_dot, options, scale,
                    n_classes):
    """Loss of a row against class t and its gradient's coefficients.

    loss = (1-eps) w_t (lse - x_t) + eps/C (W lse - sum_c w_c x_c), as
    PyTorch, W = sum_c w_c; written with ``w_dot`` = sum_c w_c (x_c - m) and
    lse - x_t formed as (m - x_t) + log(s), so that logits of magnitude 1e16
    and more keep log(s). The gradient is
    grad_c = e_c k1 - k2 w_c - kt [c = t], with e_c = exp(x_c - m),
    k1 = scale ((1-eps) w_t + eps W/C) / s, k2 = scale eps/C, kt = scale (1-eps) w_t.
    ``options`` is the call's ``_spec.CEOptions``. Its z-loss (PaLM's; Liger's
    ``lse_square_scale``) adds w_t z lse**2 to the loss, weighted by the
    target's class weight as the cross-entropy is, and so
    d/dx_c = 2 w_t z lse p_c to the gradient: scale 2 w_t z lse / s to k1.
    Returns (loss, k1, k2, kt), float64.
    """
    smoothing = options.smoothing
    keep = 1.0 - smoothing
    loss = keep * w_target * ((m - x_target) + log_s)
    if smoothing > 0.0:
        loss += smoothing / n_classes * (w_sum * log_s - w_dot)
    k1 = scale * (keep * w_target + smoothing * w_sum / n_classes) / s
    k2 = scale * smoothing / n_classes
    kt = scale * keep * w_target
    z = options.z_loss
    if z > 0.0:
        lse = m + log_s
        loss += w_target * z * lse * lse
        k1 += scale * 2.0 * w_target * z * lse / s
    return loss, k1, k2, kt


def softcapped(tanh_y, cap):
    """A logit under Gemma 2's softcap: z = cap tanh(y), y = scale x / cap
    (``tanh_y``: the device's tanh of y)."""
    return cap * tanh_y


def softcap_slope(z, scale, inv_cap):
    """dz/dx of ``softcapped``: scale (1 - tanh(y)**2) = scale (1 - (z/cap)**2),
    from z itself, so that the backward needs only the capped row
    (``inv_cap`` = 1/cap: a product, not a division, per element). Without a
    cap, z = scale x and dz/dx = scale."""
    t = z * inv_cap
    return scale * (1.0 - t * t)


def smoothed_target(q, keep, uniform):
    """A class probability mixed with the uniform distribution: keep q + uniform
    (keep = 1-eps, uniform = eps/C); times w_c with weights."""
    return keep * q + uniform


def soft_target_row(m, log_s, s, total, q_dot, options, scale):
    """Loss of a row against probabilities and its gradient's coefficient.

    With q'_c the smoothed (and weighted) targets, ``total`` = sum_c q'_c and
    ``q_dot`` = sum_c q'_c (x_c - m): loss = total lse - sum_c q'_c x_c
    = total log(s) - q_dot, and grad_c = e_c k1 - scale q'_c with
    k1 = scale total / s. ``options`` is the call's ``_spec.CEOptions``; its
    z-loss adds z lse**2 to the loss (each row once, as the mean counts it)
    and scale 2 z lse / s to k1 (see ``hard_target_row``). Returns (loss, k1).
    """
    loss, k1 = total * log_s - q_dot, scale * total / s
    z = options.z_loss
    if z > 0.0:
        lse = m + log_s
        loss += z * lse * lse
        k1 += scale * 2.0 * z * lse / s
    return loss, k1


def gradient_element(e, k1, k2):
    """One gradient element from its exponential e = exp(x_c - m): e k1 - k2
    (k2 the element's target term: ``scale q'_c``, or ``k2 w_c``)."""
    return e * k1 - k2


def log_softmax_element(x, m, log_s):
    """log p_c = (x_c - m) - log(s), the shift taken first (as
    ``torch.log_softmax`` rounds it)."""
    return (x - m) - log_s


def softmax_element(e, inv_s):
    """p_c = exp(x_c - m) / s, as e times 1/s."""
    return e * inv_s


def log_sum_exp(m, log_s):
    """lse = m + log(s) for a finite max; an infinite max is the answer
    itself (rows of -inf give -inf, rows holding +inf give +inf, as
    ``torch.logsumexp``): the caller checks the row for NaN there."""
    if math.isinf(m):
        return m
    return m + log_s


def nll_row(log_prob_target, w_target):
    """Negative log-likelihood of a row: -w_t log p_t."""
    return -w_target * log_prob_target


def mean_scale(mean, denominator):
    """The gradient's scale: 1/denominator for a mean (1 where that is 0:
    every target ignored, and the gradient is 0 anyway)."""
    if mean and denominator != 0.0:
        return 1.0 / denominator
    return 1.0


def bce_label_weight(pos_weight, t, one):
    """BCE's weight of the positive term: 1 + (pos_weight - 1) t."""
    return one + (pos_weight - one) * t


def bce_element(x, t, label_weight, e, log1p_e, one):
    """(loss, gradient) of binary cross-entropy with logits for one element.

    loss = (1 - t) x - l log_sigmoid(x) with l the label weight and
    log_sigmoid(x) = min(x, 0) - log(1 + exp(-|x|)); ``e`` = exp(-|x|),
    ``log1p_e`` = log(1 + e). The terms in x are gathered first: for x < 0
    and t = 0 the loss is then log1p(e) exactly, where the formula as written
    cancels x against x (PyTorch loses every digit there).
    grad = l sigmoid(x) - l + 1 - t. ``one`` is 1 in the element's type, so
    float32 elements are computed in float32. Both before the element weight.
    """
    if x < 0:
        loss = x * (one - t - label_weight) + label_weight * log1p_e
    else:
        loss = (one - t) * x + label_weight * log1p_e
    inv = one / (one + e)
    sigmoid = inv if x >= 0 else e * inv
    return loss, label_weight * sigmoid - label_weight + one - t


# --------------------------------------------------------------------------
# The softmax Jacobian and the cross-entropy Hessian (see docs/design.md,
# "The softmax Jacobian and the Hessian-vector product").
#
# With p = softmax(x), D_j p_i = p_i (delta_ij - p_j): J = diag(p) - p p^T,
# symmetric, and it is also the Hessian of lse(x) = log sum exp(x). A row's
# cross-entropy is a * lse(x) minus a linear function of x (a = the row's
# weight in the loss), so its Hessian is a J; the z-loss z w lse**2 adds
# 2 z w (grad lse grad lse^T + lse J) = 2 z w (p p^T + lse J). The Hessian
# of a row applied to v is therefore alpha (p*v - p (p.v)) + beta p (p.v),
# with (alpha, beta) the row's curvature weights below.


def softmax_backward_element(o, grad_o, dot):
    """Gradient through softmax: o_c (g_c - sum_k g_k o_k) = (J g)_c, o = p
    (J symmetric: also the Jacobian-vector product)."""
    return o * (grad_o - dot)


def log_softmax_backward_element(grad_o, exp_o, total):
    """Gradient through log_softmax: g_c - p_c sum_k g_k, p_c = exp(o_c)
    (the Jacobian of log p is I - 1 p^T). The CPU emits this expression as
    vector code (``_lanes.minus_exp_times``), as ``scale_minus`` does
    ``gradient_element``'s."""
    return grad_o - exp_o * total


def softmax_jacobian_element(p_i, p_j, same):
    """J_ij = p_i (delta_ij - p_j); ``same`` is 1 on the diagonal, else 0."""
    return p_i * (same - p_j)


def hard_target_curvature(w_target, w_sum, lse, options, scale, n_classes):
    """(alpha, beta) of a row against class t (see above): the row's weight
    in the loss, a = (1-eps) w_t + eps W/C (the coefficient of lse in
    ``hard_target_row``'s loss), and with the z-loss (w_t z lse**2)
    alpha = a + 2 z w_t lse, beta = 2 z w_t; both times the mean's ``scale``."""
    smoothing = options.smoothing
    a = (1.0 - smoothing) * w_target + smoothing * w_sum / n_classes
    z2 = 2.0 * options.z_loss * w_target
    return scale * (a + z2 * lse), scale * z2


def soft_target_curvature(total, lse, options, scale):
    """(alpha, beta) of a row against probabilities: its weight is
    ``total`` = sum_c q'_c (the coefficient of lse in ``soft_target_row``'s
    loss); the z-loss (z lse**2, unweighted) adds 2 z lse to alpha and
    gives beta = 2 z; both times the mean's ``scale``."""
    z2 = 2.0 * options.z_loss
    return scale * (total + z2 * lse), scale * z2


def softcap_second_slope(z, slope, scale, inv_cap):
    """d2z/dx2 of ``softcapped`` from z and its slope: with z = cap tanh(y),
    y = scale x / cap, dz/dx = scale (1 - (z/cap)**2), so
    d2z/dx2 = -2 scale (z / cap**2) dz/dx (0 without a cap: ``inv_cap`` 0)."""
    return -2.0 * scale * z * inv_cap * inv_cap * slope


def transformed_hvp_element(hv_u, slope, r, second, v):
    """(H_x v)_c for logits transformed elementwise, u = f(x), the loss
    reading u: f'_c (H_u (f' * v))_c + r_c f''_c v_c, ``hv_u`` the product
    of the Hessian in u with f' * v, ``r`` = d loss / d u_c (the chain rule
    twice; docs/design.md)."""
    return slope * hv_u + r * second * v


def hessian_vector_element(e, v, k1, k2):
    """(H v)_c = p_c (alpha v_c - (alpha - beta) (p.v)) with p_c = e_c / s:
    e_c (k1 v_c - k2), k1 = alpha / s, k2 = (alpha - beta) (p.v) / s."""
    return e * (k1 * v - k2)


# --------------------------------------------------------------------------
# Divergences on probabilities (``fastxent.divergences``): elementwise, as
# torch.nn.functional.kl_div and binary_cross_entropy. Each returns
# (loss, gradient with respect to the input) before the element weight and
# the reduction's scale; the device passes its own log / exp.


def kl_element(x, t, log_t, zero):
    """KL term of a log-probability x against a probability t.

    loss = xlogy(t, t) - t x, as torch (t log t taken as 0 where t = 0, so
    a target of 0 adds nothing unless x is infinite, where 0 * inf gives NaN
    as in torch); d loss / dx = -t. ``log_t``: the device's log(t).
    """
    xlogy = t * log_t if t != zero else zero
    return xlogy - t * x, -t


def kl_log_target_element(x, t, exp_t):
    """KL term against a log-probability target t (``log_target=True``).

    loss = exp(t) (t - x); d loss / dx = -exp(t). ``exp_t``: exp(t).
    """
    return exp_t * (t - x), -exp_t


#: The floor of x (1 - x) in BCE's gradient: torch's EPSILON = 1e-12, which
#: it rounds to float32 even for float64 inputs.
BCE_GRAD_EPS = 9.999999960041972e-13


def bce_prob_element(x, t, log_x, log_1mx, one, eps):
    """Binary cross-entropy of a probability x against t, as torch.

    loss = -(t max(log x, -100) + (1 - t) max(log(1 - x), -100)): the clamp
    keeps x = 0 and x = 1 finite. torch's backward is not the derivative of
    the clamped loss but (x - t) / max(x (1 - x), eps), eps = ``BCE_GRAD_EPS``
    (``binary_cross_entropy_backward``): kept here, so x = 0 or 1 gives a
    large finite gradient, 0 where t equals x. ``log_x``, ``log_1mx``: the
    device's log(x) and log(1 - x).
    """
    floor = -100.0 * one
    lx = log_x if log_x > floor else floor
    l1 = log_1mx if log_1mx > floor else floor
    loss = (t - one) * l1 - t * lx
    d = x * (one - x)
    d = d if d > eps else eps
    return loss, (x - t) / d


# Distillation divergences (``fastxent.distillation``). Per row, with
# temperature T, P = softmax(teacher / T), Q = softmax(student / T), and
# log P, log Q those of the row (-inf where a logit is -inf). Each pair: the
# element's share of the divergence, and its gradient with respect to the
# student's logit s_c (b = s / T, so d/ds = (1/T) d/db), before the T**2
# factor: both are multiplied by ``t2`` = T**2 (loss) and T**2 / T = T
# (gradient) by the caller through ``kt``. Shares use torch's xlogy: a
# probability of 0 contributes 0 times the other log (nan where that is
# -inf), as ``torch.nn.functional.kl_div`` does.


def forward_kl_element(p, log_p, log_q):
    """KL(P || Q) = sum_c xlogy(p, p) - p log q (``kl_div(log Q, P)``)."""
    own = p * log_p if p > 0.0 else 0.0
    return own - p * log_q


def forward_kl_grad(p, q, kt):
    """d/db_c sum_j p_j (log p_j - log q_j) = q_c sum_j p_j - p_c = q_c - p_c
    (d log q_j / d b_c = [j = c] - q_c, sum p = 1); times ``kt``."""
    return kt * (q - p)


def reverse_kl_element(q, log_q, log_p):
    """KL(Q || P) = sum_c xlogy(q, q) - q log p (``kl_div(log P, Q)``)."""
    own = q * log_q if q > 0.0 else 0.0
    return own - q * log_p


def reverse_kl_grad(q, log_q, log_p, divergence, kt):
    """With f_j = log q_j - log p_j and D = sum_j q_j f_j:
    d/db_c D = sum_j q_j ([j = c] - q_c) f_j + sum_j q_j ([j = c] - q_c)
    = q_c (f_c - D) (the second sum is q_c - q_c = 0); times ``kt``. A class
    of q_c = 0 gets 0."""
    if q > 0.0:
        return kt * q * ((log_q - log_p) - divergence)
    return 0.0 * log_p * kt


def jsd_element(p, q, log_p, log_q, beta):
    """beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q.
    Returns (share, q's share of KL(Q || M), log m): the gradient needs the
    row's KL(Q || M) and log m."""
    m = beta * p + (1.0 - beta) * q
    log_m = math.log(m) if m > 0.0 else -math.inf
    p_share = p * (log_p - log_m) if p > 0.0 else 0.0
    q_share = q * (log_q - log_m) if q > 0.0 else 0.0
    return beta * p_share + (1.0 - beta) * q_share, q_share, log_m


def jsd_grad(q, log_q, log_m, kl_qm, beta, kt):
    """d/dq_j of the JSD is (1 - beta) log(q_j / m_j) (the other terms,
    -beta p_j/m_j (1-beta) + (1-beta)(1 - q_j (1-beta)/m_j), sum to
    (1-beta)(1 - m_j/m_j) = 0); through the softmax,
    d/db_c = q_c (g_c - sum_j q_j g_j) = (1 - beta) q_c (log(q_c/m_c) - KL(Q || M));
    times ``kt``."""
    if q > 0.0:
        return kt * (1.0 - beta) * q * ((log_q - log_m) - kl_qm)
    return 0.0


def distill_ce_grad(e1, inv_s1, hit, ka):
    """The cross-entropy share at T = 1: ka (softmax(s)_c - [c = target]),
    ``e1`` = exp(s_c - max s), ``hit`` 1.0 at the target's class."""
    return ka * (e1 * inv_s1 - hit)


def bf16_bits_of_f32_bits(u):
    """The bfloat16 bits (uint16) of the float32 whose bits are ``u`` (uint32),
    rounded to nearest even as ``ml_dtypes`` and torch do: add ``0x7fff`` plus
    the lowest kept bit, then drop the low 16 bits; a NaN stays a (quiet) NaN.
    Each target brings its own float32 <-> bits reinterpretation
    (``_half`` on the CPU, ``_cuda_kernels`` on the GPU)."""
    if (u & np.uint32(0x7fffffff)) > np.uint32(0x7f800000):
        return np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
    rounding = np.uint32(0x7fff) + ((u >> np.uint32(16)) & np.uint32(1))
    return np.uint16((u + rounding) >> np.uint32(16))
