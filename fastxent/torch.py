"""fastxent's losses inside PyTorch's autograd: functions and ``nn.Module``s.

Drop-in replacements for ``torch.nn.functional.cross_entropy``,
``nll_loss``, ``binary_cross_entropy_with_logits``, ``binary_cross_entropy``,
``kl_div``, ``linear_cross_entropy``, ``softmax`` and ``log_softmax``
(backward by ``fastxent.softmax_backward`` and ``log_softmax_backward``),
fastxent's ``distillation_loss``, and the modules ``CrossEntropyLoss``,
``BCEWithLogitsLoss``, ``BCELoss``, ``KLDivLoss`` and ``DistillationLoss``: the same
signatures and PyTorch's layout (the class dimension is 1, or 0 for a
single unbatched row), computed by fastxent's fused kernels.

Importing this module imports PyTorch; ``import fastxent`` alone never does.

How a call runs
---------------
Each loss is a PyTorch custom operator (``torch.library.custom_op``, in the
``fastxent`` namespace) with an autograd formula and a fake-tensor
implementation, so ``torch.compile(fullgraph=True)`` traces it without a
graph break. Its forward calls fastxent's ``*_with_grad`` function, which
computes the loss and d loss / d input in one pass into one buffer; the
backward scales that buffer by ``grad_output`` (a scalar, or per row for
``reduction="none"``) in place and returns it. When no gradient is needed
(``torch.no_grad()``, or an input that does not require grad) only the
forward kernel runs.

CPU tensors reach the kernels as NumPy views (``Tensor.numpy()``, no copy;
bfloat16 through an int16 view seen as ``ml_dtypes.bfloat16``);
CUDA tensors as themselves, through ``__cuda_array_interface__`` (see
:func:`_on_current_stream`; unverified on GPU hardware).

Adding a fused loss
-------------------
A loss whose fastxent function has a ``*_with_grad`` twin (``out=``,
``inplace=`` keywords) is one :class:`FusedLoss` entry passed to
:func:`_fused_op`, and a public function that maps PyTorch's arguments onto
the op's (see ``cross_entropy`` below).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

try:
    import torch
except ImportError as error:  # pragma: no cover - exercised in a subprocess test
    raise ImportError("fastxent.torch needs PyTorch, which is not installed: "
                      "python -m pip install torch (fastxent itself needs only NumPy "
                      "and Numba)") from error

import numpy as np

from . import _validate
from . import distillation as _distillation
from . import divergences as _divergences
from . import losses as _losses

Tensor = torch.Tensor

__all__ = ["BCELoss", "BCEWithLogitsLoss", "CrossEntropyLoss", "DistillationLoss", "KLDivLoss",
           "binary_cross_entropy", "binary_cross_entropy_with_logits", "cross_entropy",
           "distillation_loss", "empty_cache", "kl_div", "linear_cross_entropy", "log_softmax",
           "nll_loss", "repeatable_backward", "reuse_gradient_buffers", "softmax"]


# --------------------------------------------------------------------------
# Tensors to the arrays fastxent's functions take, and back

def _bfloat16() -> np.dtype:
    """ml_dtypes' bfloat16, the NumPy dtype fastxent reads bfloat16 arrays as."""
    try:
        import ml_dtypes
    except ImportError as error:
        raise ImportError("fastxent.torch: a CPU bfloat16 tensor reaches fastxent's kernels as "
                          "an ml_dtypes.bfloat16 array, and ml_dtypes is not installed: "
                          "python -m pip install ml_dtypes (or cast the tensor to "
                          "float32)") from error
    return np.dtype(ml_dtypes.bfloat16)


def _array(t: Optional[Tensor]):
    """A CPU tensor as a NumPy view of its memory (no copy); a CUDA tensor as is.

    NumPy has no bfloat16: a bfloat16 tensor's bits cross as an int16 view,
    seen as ``ml_dtypes.bfloat16`` (still no copy)."""
    if t is None:
        return None
    t = t.detach()
    if t.device.type == "cpu":
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(_bfloat16())
        return t.numpy()
    return t  # exposes __cuda_array_interface__


def _tensor(result, like: Tensor) -> Tensor:
    """A fastxent result (NumPy scalar or array, or a CUDA tensor) as a tensor of ``like``'s
    device and dtype (the dtype the fake tensors promise: a 16-bit input's float32 loss
    is rounded to the input's dtype, as PyTorch's losses return it)."""
    if isinstance(result, Tensor):
        return result
    if isinstance(result, np.ndarray):
        if result.dtype.name == "bfloat16":
            tensor = torch.from_numpy(result.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(result)
        return tensor.to(device=like.device, dtype=like.dtype)
    return torch.tensor(result, dtype=like.dtype, device=like.device)


class _on_current_stream:
    """Run fastxent's GPU kernels ordered after, and before, PyTorch's current stream.

    fastxent launches on CUDA's legacy default stream, which is PyTorch's
    default stream: then nothing is needed. Under ``torch.cuda.stream(s)``,
    whose streams do not synchronize with the default one, the kernels wait
    for ``s`` and ``s`` waits for them. (numba-cuda also synchronizes on the
    stream a tensor's ``__cuda_array_interface__`` names.) Unverified on GPU
    hardware: no GPU was available where this was written.
    """

    def __init__(self, t: Tensor):
        self.stream = None
        if t.device.type == "cuda":
            current = torch.cuda.current_stream(t.device)
            if current != torch.cuda.default_stream(t.device):
                self.stream = current

    def __enter__(self):
        if self.stream is not None:
            self.stream.synchronize()

    def __exit__(self, *exc):
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.default_stream(self.stream.device))
        return False


# --------------------------------------------------------------------------
# Gradient buffers kept from step to step (CPU)

class _GradientBuffers:
    """The last gradient buffers of each shape, reused once nothing holds them.

    A new CPU tensor of a gigabyte costs more in page faults (the kernel
    zeroing fresh pages) than fastxent's loss and gradient cost to compute.
    A training loop allocates the same gradient every step, so the buffer of
    the last step is kept (as a private alias of its memory) and reused when
    autograd, the caller and every view have let go of it: only this alias
    still refers to its memory. Up to ``MAX_ENTRIES`` shapes; CUDA tensors
    come from PyTorch's own caching allocator instead.
    """

    MAX_ENTRIES = 4

    def __init__(self):
        self.enabled = True
        self.lock = threading.Lock()
        self.entries: "OrderedDict[tuple, Tensor]" = OrderedDict()

    @staticmethod
    def _key(like: Tensor) -> tuple:
        return tuple(like.shape), like.dtype, like.device

    @staticmethod
    def _unused(alias: Tensor) -> bool:
        # The alias is private (only this cache holds it); every other
        # tensor on its memory (the gradient autograd handed on, a leaf's
        # .grad, views, autograd's saved copies) holds the storage too. So
        # the memory is free when only the alias and the storage object
        # asked for here hold it.
        return torch._C._storage_Use_Count(alias.untyped_storage()._cdata) <= 2

    def take(self, like: Tensor) -> Tensor:
        """A buffer of ``like``'s shape and dtype, contiguous: a kept one if it is free."""
        if self.enabled and like.device.type == "cpu":
            with self.lock:
                alias = self.entries.pop(self._key(like), None)
            if alias is not None and self._unused(alias):
                return alias
            del alias  # still in use: it lives on with its users
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)

    def keep(self, buffer: Tensor) -> None:
        """Remember ``buffer`` (the gradient just written) for a later step."""
        if not self.enabled or buffer.device.type != "cpu":
            return
        with self.lock:
            self.entries[self._key(buffer)] = buffer.detach()
            while len(self.entries) > self.MAX_ENTRIES:
                self.entries.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


_BUFFERS = _GradientBuffers()


def empty_cache() -> None:
    """Forget the gradient buffers kept for reuse (their memory is freed once unused)."""
    _BUFFERS.clear()


def reuse_gradient_buffers(enabled: bool = True) -> None:
    """Keep each shape's last gradient buffer to reuse in the next step (the default).

    Off, every forward that needs a gradient allocates a new buffer (and
    pays its page faults); on, one buffer per shape (up to four) stays
    allocated between steps.
    """
    _BUFFERS.enabled = bool(enabled)
    if not enabled:
        _BUFFERS.clear()


# --------------------------------------------------------------------------
# The fused losses: a forward that writes the gradient once, a backward that scales it

@dataclass(frozen=True)
class FusedLoss:
    """What it takes to make a fastxent loss a PyTorch operator.

    name : the operator's name, ``fastxent::<name>``.
    schema : the operator's arguments after ``Tensor input`` and before
        ``bool with_grad``, in TorchScript schema syntax; ``str reduction``
        must be among them.
    forward : ``(input, *args) -> loss``, fastxent's function on arrays.
    with_grad : ``(input, *args, out=, inplace=) -> (loss, grad)``.
    batch_shape : ``(input_shape) -> shape`` of the per-row losses
        (``reduction="none"``).
    grad_dim : the dimension ``grad_output`` of ``reduction="none"`` is
        broadcast along to scale the gradient (the class dimension), or
        ``None`` when the losses have the input's shape.
    """

    name: str
    schema: str
    forward: Callable
    with_grad: Callable
    batch_shape: Callable[[tuple], tuple]
    grad_dim: Callable[[int], Optional[int]]


def _class_dim(ndim: int) -> int:
    # PyTorch's layout: (C,), (N, C) or (N, C, d1, ...).
    return 0 if ndim == 1 else 1


def _without_class_dim(shape: tuple) -> tuple:
    d = _class_dim(len(shape))
    return tuple(shape[:d]) + tuple(shape[d + 1:])


def _reduction_of(spec: FusedLoss, args) -> str:
    names = [part.split()[-1] for part in spec.schema.split(",")]
    return args[names.index("reduction")]


def _run(spec: FusedLoss, input: Tensor, args, grad):
    """Loss (and gradient into ``grad``: a tensor, ``"inplace"`` or ``None``) as tensors."""
    arrays = [_array(a) if isinstance(a, Tensor) or a is None else a for a in args]
    with _on_current_stream(input):
        if grad is None:
            return _tensor(spec.forward(_array(input), *arrays), input)
        if grad == "inplace":
            loss, _ = spec.with_grad(_array(input), *arrays, inplace=True)
        else:
            loss, _ = spec.with_grad(_array(input), *arrays, out=_array(grad))
        return _tensor(loss, input)


class repeatable_backward:
    """Context manager: losses computed inside it allow several backwards (``retain_graph=True``).

    By default a loss's backward scales the gradient buffer its forward
    wrote in place and hands it to autograd, so a second backward through
    the same forward raises ``RuntimeError``. Inside this context the buffer
    is kept as the forward wrote it and each backward returns a scaled copy
    (one more buffer of the input's size per backward, as with PyTorch's
    own losses): what ``torch.autograd.gradcheck`` and other repeated
    backwards need.
    """

    _state = threading.local()  # per thread, as torch.no_grad() is

    @classmethod
    def active(cls) -> bool:
        return getattr(cls._state, "depth", 0) > 0

    def __enter__(self):
        self._state.depth = getattr(self._state, "depth", 0) + 1
        return self

    def __exit__(self, *exc):
        self._state.depth -= 1
        return False


def _scale(spec: FusedLoss, grad: Tensor, grad_output: Tensor, reduction: str,
           in_place: bool) -> Tensor:
    """``grad * grad_output``: in place in eager mode (``in_place``), else a new tensor."""
    if reduction == "none":
        dim = spec.grad_dim(grad.dim())
        factor = grad_output if dim is None else grad_output.unsqueeze(dim)
    else:
        factor = grad_output
    if type(grad) is not Tensor or not in_place:
        return grad * factor  # traced (torch.compile), or a repeatable backward
    if (reduction != "none" and grad_output.device.type == "cpu"
            and grad_output.item() == 1.0):
        return grad  # loss.backward(): the gradient is already the answer
    return grad.mul_(factor)


def _consume(ctx, name: str) -> None:
    """Mark an eager forward's buffer as handed over; refuse a second backward."""
    if getattr(ctx, "consumed", False):
        raise RuntimeError(f"fastxent.torch.{name}: a second backward through the same loss "
                           f"(retain_graph=True) is not supported by default: the first "
                           f"backward handed the gradient buffer to autograd. Compute the "
                           f"loss inside `with fastxent.torch.repeatable_backward():` to "
                           f"allow it (one more buffer per backward).")
    ctx.consumed = True


def _refuse_double_backward(name: str) -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(f"fastxent.torch.{name} does not support double backward "
                           f"(backward(create_graph=True) or torch.autograd.grad with "
                           f"create_graph=True): its gradient is computed by a kernel, not "
                           f"by differentiable PyTorch operations")


def _fused_op(spec: FusedLoss):
    """Register ``fastxent::<spec.name>``: its kernels, fake tensors and autograd."""
    schema = f"(Tensor input, {spec.schema}, bool with_grad) -> (Tensor, Tensor)"

    def compute(input, *rest):
        *args, with_grad = rest
        if not with_grad:
            return _run(spec, input, args, None), input.new_empty(0)
        grad = _BUFFERS.take(input)
        loss = _run(spec, input, args, grad)
        _BUFFERS.keep(grad)
        return loss, grad

    op = torch.library.custom_op(f"fastxent::{spec.name}", compute, mutates_args=(),
                                 schema=schema)

    @op.register_fake
    def _(input, *rest):
        *args, with_grad = rest
        if _reduction_of(spec, args) == "none":
            loss = input.new_empty(spec.batch_shape(tuple(input.shape)))
        else:
            loss = input.new_empty(())
        return loss, input.new_empty(tuple(input.shape) if with_grad else (0,))

    def setup_context(ctx, inputs, output):
        *args, with_grad = inputs[1:]
        ctx.reduction = _reduction_of(spec, args)
        ctx.in_place = not repeatable_backward.active()
        # The buffer is not a result: autograd must not build a zero
        # gradient of its size for it in the backward.
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[1])

    def backward(ctx, grad_loss, _unused):
        _refuse_double_backward(spec.name)
        n_args = len(spec.schema.split(",")) + 1
        if grad_loss is None:  # the loss got no gradient (gradcheck's undefined-grad check)
            return (None,) * (n_args + 1)
        in_place = ctx.in_place and type(grad_loss) is Tensor  # eager
        if in_place:
            _consume(ctx, spec.name)
        (grad,) = ctx.saved_tensors
        return (_scale(spec, grad, grad_loss, ctx.reduction, in_place),) + (None,) * n_args

    op.register_autograd(backward, setup_context=setup_context)
    return op


class _InPlace(torch.autograd.Function):
    """A fused loss whose gradient is written over its input (``inplace_backward=True``).

    Eager only: a custom operator may not return a tensor that aliases its
    input, and under ``torch.compile`` the compiler plans buffers itself.
    """

    @staticmethod
    def forward(ctx, input, spec, reduction, *args):
        ctx.spec, ctx.reduction, ctx.n_args = spec, reduction, len(args)
        ctx.in_place = not repeatable_backward.active()
        loss = _run(spec, input, args, "inplace")
        ctx.grad = input.detach()  # the input's memory, now the gradient
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        _refuse_double_backward(ctx.spec.name)
        grad = ctx.grad
        if ctx.in_place:
            _consume(ctx, ctx.spec.name)
            ctx.grad = None
        return (_scale(ctx.spec, grad, grad_loss, ctx.reduction, ctx.in_place), None, None) + \
            (None,) * ctx.n_args


def _check_inplace_allowed(name: str, input: Tensor) -> None:
    """Refuse ``inplace_backward=True`` where autograd (or a view) still needs the input."""
    why = None
    if input.is_leaf:
        why = ("it is a leaf tensor that requires grad: its value is a parameter or an "
               "input of yours, and its .grad would be its own memory")
    elif input._use_count() > 1:
        why = "another autograd operation saved it for its backward"
    else:
        # The storage is referenced by this tensor, the storage object asked
        # here, and (for a view such as logits.view(-1, C)) its base.
        expected = 2 + (input._base is not None)
        if torch._C._storage_Use_Count(input.untyped_storage()._cdata) > expected:
            why = ("other tensors share its memory (views of it, or an operation that "
                   "saved its output for the backward)")
    if why is not None:
        raise RuntimeError(f"fastxent.torch.{name}(inplace_backward=True) would write the "
                           f"gradient over its input, but {why}. Use inplace_backward=False "
                           f"(the default), or pass a tensor nothing else uses (e.g. the "
                           f"output of the last layer, used only by the loss).")


def _call_fused(spec: FusedLoss, op, name: str, input: Tensor, tensors, args,
                reduction: str, inplace_backward: bool, input_name: str = "input") -> Tensor:
    grad_on = torch.is_grad_enabled()
    for label, t in tensors:
        if grad_on and t is not None and t.requires_grad:
            raise ValueError(f"fastxent.torch.{name}: {label} requires grad, but fastxent "
                             f"differentiates with respect to {input_name} only; pass "
                             f"{label}.detach()")
    with_grad = grad_on and input.requires_grad
    if with_grad and inplace_backward and not torch.compiler.is_compiling():
        _check_inplace_allowed(name, input)
        loss = _InPlace.apply(input, spec, reduction, *args)
        # Any reader of the old values that the checks missed now fails in
        # its own backward with PyTorch's "modified by an inplace operation".
        torch.autograd.graph.increment_version(input)
        return loss
    loss, _ = op(input, *args, with_grad)
    return loss


# --------------------------------------------------------------------------
# The table of fused losses (add one here)

def _ce_forward(x, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                logit_scale, softcap):
    # softcap: 0.0 for none (the op's schema has no optional float)
    return _losses.cross_entropy(x, target, weight=weight, ignore_index=ignore_index,
                                 reduction=reduction, label_smoothing=label_smoothing,
                                 z_loss=z_loss, logit_scale=logit_scale,
                                 softcap=softcap or None, axis=_class_dim(x.ndim))


def _ce_with_grad(x, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                  logit_scale, softcap, out=None, inplace=False):
    return _losses.cross_entropy_with_grad(
        x, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, logit_scale=logit_scale,
        softcap=softcap or None, axis=_class_dim(x.ndim), out=out, inplace=inplace)


_CROSS_ENTROPY = FusedLoss(
    name="cross_entropy",
    schema=("Tensor target, Tensor? weight, int ignore_index, str reduction, "
            "float label_smoothing, float z_loss, float logit_scale, float softcap"),
    forward=_ce_forward, with_grad=_ce_with_grad,
    batch_shape=_without_class_dim, grad_dim=_class_dim)


def _bce_forward(x, target, weight, pos_weight, reduction):
    return _losses.binary_cross_entropy_with_logits(x, target, weight=weight,
                                                    pos_weight=pos_weight, reduction=reduction)


def _bce_with_grad(x, target, weight, pos_weight, reduction, out=None, inplace=False):
    return _losses.binary_cross_entropy_with_logits_with_grad(
        x, target, weight=weight, pos_weight=pos_weight, reduction=reduction, out=out,
        inplace=inplace)


_BCE_WITH_LOGITS = FusedLoss(
    name="binary_cross_entropy_with_logits",
    schema="Tensor target, Tensor? weight, Tensor? pos_weight, str reduction",
    forward=_bce_forward, with_grad=_bce_with_grad,
    batch_shape=lambda shape: shape, grad_dim=lambda ndim: None)



def _kl_forward(x, target, reduction, log_target):
    return _divergences.kl_div(x, target, reduction=reduction, log_target=log_target)


def _kl_with_grad(x, target, reduction, log_target, out=None, inplace=False):
    return _divergences.kl_div_with_grad(x, target, reduction=reduction,
                                         log_target=log_target, out=out, inplace=inplace)


_KL_DIV = FusedLoss(
    name="kl_div", schema="Tensor target, str reduction, bool log_target",
    forward=_kl_forward, with_grad=_kl_with_grad,
    batch_shape=lambda shape: shape, grad_dim=lambda ndim: None)


def _bce_prob_forward(x, target, weight, reduction):
    return _divergences.binary_cross_entropy(x, target, weight=weight, reduction=reduction)


def _bce_prob_with_grad(x, target, weight, reduction, out=None, inplace=False):
    return _divergences.binary_cross_entropy_with_grad(x, target, weight=weight,
                                                       reduction=reduction, out=out,
                                                       inplace=inplace)


_BCE = FusedLoss(
    name="binary_cross_entropy", schema="Tensor target, Tensor? weight, str reduction",
    forward=_bce_prob_forward, with_grad=_bce_prob_with_grad,
    batch_shape=lambda shape: shape, grad_dim=lambda ndim: None)


def _distill_options(x, teacher_values, teacher_indices, target, divergence, beta,
                     temperature, alpha, ignore_index, reduction):
    teacher = teacher_values if teacher_indices is None else (teacher_indices, teacher_values)
    return teacher, dict(divergence=divergence, beta=beta, temperature=temperature,
                         target=target, alpha=alpha, ignore_index=ignore_index,
                         reduction=reduction, axis=_class_dim(x.ndim))


def _distill_forward(x, *args):
    teacher, options = _distill_options(x, *args)
    return _distillation.distillation_loss(x, teacher, **options)


def _distill_with_grad(x, *args, out=None, inplace=False):
    teacher, options = _distill_options(x, *args)
    return _distillation.distillation_loss_with_grad(x, teacher, **options, out=out,
                                                     inplace=inplace)


_DISTILLATION = FusedLoss(
    name="distillation_loss",
    schema=("Tensor teacher_values, Tensor? teacher_indices, Tensor? target, str divergence, "
            "float beta, float temperature, float alpha, int ignore_index, str reduction"),
    forward=_distill_forward, with_grad=_distill_with_grad,
    batch_shape=_without_class_dim, grad_dim=_class_dim)

_cross_entropy_op = _fused_op(_CROSS_ENTROPY)
_bce_with_logits_op = _fused_op(_BCE_WITH_LOGITS)
_kl_div_op = _fused_op(_KL_DIV)
_bce_op = _fused_op(_BCE)
_distillation_op = _fused_op(_DISTILLATION)


def _reduction(size_average, reduce, reduction: str) -> str:
    """PyTorch's deprecated ``size_average`` / ``reduce`` arguments, as it reads them."""
    if size_average is not None or reduce is not None:
        return torch.nn._reduction.legacy_get_string(size_average, reduce)
    return reduction


# --------------------------------------------------------------------------
# Public functions

def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                  size_average: Optional[bool] = None, ignore_index: int = -100,
                  reduce: Optional[bool] = None, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  logit_scale: float = 1.0, softcap: Optional[float] = None,
                  inplace_backward: bool = False) -> Tensor:
    """``torch.nn.functional.cross_entropy`` on fastxent's fused kernel.

    Parameters
    ----------
    input : Tensor of shape (C,), (N, C) or (N, C, d1, ...)
        Logits, float32 or float64 (float16 and bfloat16 on the CPU: computed in
        float32, the loss and gradient in the input's dtype); the class
        dimension is 1 (0 for (C,)).
    target : Tensor
        Class indices (any integer dtype) of the input's shape without the
        class dimension, or class probabilities of the input's shape. Not
        differentiated (a target that requires grad is refused).
    weight, size_average, ignore_index, reduce, reduction, label_smoothing
        As in PyTorch.
    z_loss : float >= 0, default 0
        fastxent's extra: PaLM's z-loss, ``z_loss * lse**2`` added to each
        row's loss (see :func:`fastxent.cross_entropy`).
    logit_scale : float, default 1
        fastxent's extra: the logits are multiplied by it first.
    softcap : float > 0, optional
        fastxent's extra: then each becomes ``softcap * tanh(x / softcap)``
        (Gemma 2), the gradient flowing through the tanh.
    inplace_backward : bool, default False
        Write the gradient over ``input`` during the forward (no buffer of
        the logits' size): ``input``'s values are gone after the call.
        Refused (``RuntimeError``) when autograd still needs them: ``input``
        is a leaf that requires grad, or another operation saved it or its
        memory. Ignored under ``torch.compile``.

    Returns
    -------
    Tensor
        A 0-dim tensor, or the per-row losses for ``reduction="none"``.
    """
    reduction = _reduction(size_average, reduce, reduction)
    return _call_fused(_CROSS_ENTROPY, _cross_entropy_op, "cross_entropy", input,
                       (("target", target), ("weight", weight)),
                       (target, weight, int(ignore_index), reduction, float(label_smoothing),
                        float(z_loss), _validate.logit_scale_arg(logit_scale),
                        _validate.softcap_arg(softcap)),
                       reduction, inplace_backward)


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor,
                                     weight: Optional[Tensor] = None,
                                     size_average: Optional[bool] = None,
                                     reduce: Optional[bool] = None, reduction: str = "mean",
                                     pos_weight: Optional[Tensor] = None, *,
                                     inplace_backward: bool = False) -> Tensor:
    """``torch.nn.functional.binary_cross_entropy_with_logits`` on fastxent's kernel.

    ``weight`` and ``pos_weight`` broadcast to the input's shape as in
    PyTorch; ``target``, ``weight`` and ``pos_weight`` are not differentiated.
    ``inplace_backward`` as in :func:`cross_entropy`.
    """
    reduction = _reduction(size_average, reduce, reduction)
    return _call_fused(_BCE_WITH_LOGITS, _bce_with_logits_op,
                       "binary_cross_entropy_with_logits", input,
                       (("target", target), ("weight", weight), ("pos_weight", pos_weight)),
                       (target, weight, pos_weight, reduction), reduction, inplace_backward)


def kl_div(input: Tensor, target: Tensor, size_average: Optional[bool] = None,
           reduce: Optional[bool] = None, reduction: str = "mean",
           log_target: bool = False) -> Tensor:
    """``torch.nn.functional.kl_div`` on fastxent's kernel (:func:`fastxent.kl_div`).

    Parameters
    ----------
    input : Tensor
        Log-probabilities, float32 or float64 (float16 and bfloat16 on the
        CPU: computed in float32, the loss and gradient in the input's
        dtype), any shape.
    target : Tensor of the input's shape
        Probabilities, or log-probabilities with ``log_target=True``. Not
        differentiated: fastxent computes the gradient with respect to
        ``input`` only, so a target that requires grad is refused
        (``ValueError``; pass ``target.detach()``, or use PyTorch's
        ``kl_div`` to train the target).
    size_average, reduce, reduction, log_target
        As in PyTorch (``"mean"`` averages over every element; ``"batchmean"``
        divides the sum by ``input.size(0)``). Unlike PyTorch, ``"mean"``
        gives no warning.

    Returns
    -------
    Tensor
        A 0-dim tensor, or the elementwise losses for ``reduction="none"``.
    """
    reduction = _reduction(size_average, reduce, reduction)
    return _call_fused(_KL_DIV, _kl_div_op, "kl_div", input, (("target", target),),
                       (target, reduction, bool(log_target)), reduction, False)


def binary_cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                         size_average: Optional[bool] = None, reduce: Optional[bool] = None,
                         reduction: str = "mean") -> Tensor:
    """``torch.nn.functional.binary_cross_entropy`` (on probabilities) on fastxent's kernel.

    ``input`` holds probabilities in [0, 1] (float32 or float64; float16 and
    bfloat16 on the CPU, computed in float32, the loss and gradient in the
    input's dtype); one outside
    raises ``ValueError`` before anything is computed. Each log is clamped at
    -100 and the gradient is PyTorch's (finite at 0 and 1). ``weight``
    broadcasts to the input's shape. ``target`` and ``weight`` are not
    differentiated: one that requires grad is refused (``ValueError``).
    """
    reduction = _reduction(size_average, reduce, reduction)
    return _call_fused(_BCE, _bce_op, "binary_cross_entropy", input,
                       (("target", target), ("weight", weight)),
                       (target, weight, reduction), reduction, False)


def distillation_loss(student_logits: Tensor, teacher_logits, *,
                      divergence: str = "forward_kl", beta: float = 0.5,
                      temperature: float = 1.0, target: Optional[Tensor] = None,
                      alpha: float = 0.0, ignore_index: int = -100,
                      reduction: str = "batchmean", inplace_backward: bool = False) -> Tensor:
    """Distillation loss of a student's logits against a teacher's
    (:func:`fastxent.distillation_loss`), differentiated with respect to the student.

    Parameters
    ----------
    student_logits : Tensor of shape (C,), (N, C) or (N, C, d1, ...)
        float32 or float64, or on the CPU bfloat16 or float16 (loss and
        gradient in that dtype); the class dimension is 1 (0 for (C,)), as in
        :func:`cross_entropy`.
    teacher_logits : Tensor, or tuple (indices, values)
        Dense: of the student's shape and dtype. Top-k: integer ``indices``
        and ``values`` (the student's dtype) of the student's shape with k in
        place of the class dimension. The teacher is a constant: one that
        requires grad is refused (``ValueError``; compute it under
        ``torch.no_grad()`` or pass ``teacher_logits.detach()``), rather
        than detached silently.
    divergence : {"forward_kl", "reverse_kl", "jsd"}, default "forward_kl"
    beta, temperature, alpha, ignore_index
        As in :func:`fastxent.distillation_loss` (the divergence is
        multiplied by ``temperature**2``; ``alpha`` weighs a cross-entropy
        against ``target`` at temperature 1).
    target : Tensor of class indices, optional
        Of the batch shape (the student's without the class dimension).
    reduction : {"batchmean", "sum", "none"}, default "batchmean"
        ``batchmean`` divides by the rows not ignored.
    inplace_backward : bool, default False
        Write the gradient over ``student_logits`` during the forward, with
        the guard of :func:`cross_entropy`.

    Returns
    -------
    Tensor
        A 0-dim tensor, or the row losses of the batch shape for ``reduction="none"``.
    """
    if isinstance(teacher_logits, (tuple, list)):
        if len(teacher_logits) != 2:
            raise ValueError("fastxent.torch.distillation_loss: a top-k teacher_logits must be "
                             f"a tuple (indices, values), got {len(teacher_logits)} items")
        indices, values = teacher_logits
    else:
        indices, values = None, teacher_logits
    if not isinstance(values, Tensor) or values.dtype != student_logits.dtype:
        raise TypeError("fastxent.torch.distillation_loss: teacher_logits must be a tensor "
                        f"of the student's dtype {student_logits.dtype}, got "
                        f"{getattr(values, 'dtype', type(values).__name__)} (cast it first: "
                        "the gradient has the student's dtype)")
    return _call_fused(_DISTILLATION, _distillation_op, "distillation_loss", student_logits,
                       (("teacher_logits", values), ("target", target)),
                       (values, indices, target, str(divergence), float(beta),
                        float(temperature), float(alpha), int(ignore_index), str(reduction)),
                       reduction, inplace_backward, input_name="student_logits")


# nll_loss: the forward is fastxent's; the gradient is one value per row at
# the target's class, built from the inputs in the backward (no buffer to keep).

@torch.library.custom_op("fastxent::nll_loss", mutates_args=())
def _nll_loss_op(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                 reduction: str) -> Tensor:
    with _on_current_stream(input):
        loss = _losses.nll_loss(_array(input), _array(target), weight=_array(weight),
                                ignore_index=ignore_index, reduction=reduction,
                                axis=_class_dim(input.dim()))
    return _tensor(loss, input)


@_nll_loss_op.register_fake
def _(input, target, weight, ignore_index, reduction):
    if reduction == "none":
        return input.new_empty(_without_class_dim(tuple(input.shape)))
    return input.new_empty(())


def _nll_setup(ctx, inputs, output):
    input, target, weight, ignore_index, reduction = inputs
    ctx.save_for_backward(target, weight)
    ctx.input_meta = (input.shape, input.dtype, input.device)
    ctx.ignore_index, ctx.reduction = ignore_index, reduction


def _nll_backward(ctx, grad_loss):
    _refuse_double_backward("nll_loss")
    target, weight = ctx.saved_tensors
    shape, dtype, device = ctx.input_meta
    dim = _class_dim(len(shape))
    kept = target != ctx.ignore_index
    safe = torch.where(kept, target, torch.zeros_like(target)).long()
    w = torch.ones((), dtype=dtype, device=device) if weight is None else weight[safe]
    w = torch.where(kept, w, torch.zeros((), dtype=dtype, device=device))
    if ctx.reduction == "mean":
        w = w * (grad_loss / w.sum())
    else:
        w = w * grad_loss
    grad = torch.zeros(shape, dtype=dtype, device=device)
    grad.scatter_(dim, safe.unsqueeze(dim), -w.unsqueeze(dim).to(dtype))
    return grad, None, None, None, None


_nll_loss_op.register_autograd(_nll_backward, setup_context=_nll_setup)


def nll_loss(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
             size_average: Optional[bool] = None, ignore_index: int = -100,
             reduce: Optional[bool] = None, reduction: str = "mean") -> Tensor:
    """``torch.nn.functional.nll_loss`` with fastxent's forward kernel.

    ``input`` holds log-probabilities, class dimension 1 (0 for (C,));
    ``target`` class indices. The gradient (one value per row, at the
    target's class) is built by PyTorch operations in the backward.
    """
    reduction = _reduction(size_average, reduce, reduction)
    if torch.is_grad_enabled() and weight is not None and weight.requires_grad:
        raise ValueError("fastxent.torch.nll_loss: weight requires grad, but fastxent "
                         "differentiates with respect to input only; pass weight.detach()")
    return _nll_loss_op(input, target, weight, int(ignore_index), reduction)


# linear_cross_entropy: the forward computes the loss and its three
# gradients chunk by chunk (fastxent.linear_cross_entropy_with_grad, no N x C
# array); the backward scales them by the loss's gradient (a scalar).

@torch.library.custom_op("fastxent::linear_cross_entropy", mutates_args=())
def _linear_ce_op(input: Tensor, linear_weight: Tensor, target: Tensor,
                  linear_bias: Optional[Tensor], weight: Optional[Tensor], ignore_index: int,
                  reduction: str, label_smoothing: float, z_loss: float, logit_scale: float,
                  softcap: float, chunk_size: int,
                  with_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from . import linear as _linear

    arrays = dict(linear_bias=_array(linear_bias), weight=_array(weight),
                  ignore_index=ignore_index, reduction=reduction,
                  label_smoothing=label_smoothing, z_loss=z_loss, logit_scale=logit_scale,
                  softcap=softcap or None, chunk_size=chunk_size or None)
    args = (_array(input), _array(linear_weight), _array(target))
    with _on_current_stream(input):
        if not with_grad:
            # (distinct empty tensors: a custom op's outputs may not alias each other)
            return (_tensor(_linear.linear_cross_entropy(*args, **arrays), input),
                    input.new_empty(0), input.new_empty(0), input.new_empty(0))
        loss, gx, gw, gb = _linear.linear_cross_entropy_with_grad(*args, **arrays)
    return (_tensor(loss, input), _tensor(gx, input), _tensor(gw, input),
            input.new_empty(0) if gb is None else _tensor(gb, input))


@_linear_ce_op.register_fake
def _(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
      label_smoothing, z_loss, logit_scale, softcap, chunk_size, with_grad):
    loss = input.new_empty(tuple(input.shape[:-1]) if reduction == "none" else ())
    if not with_grad:
        return loss, input.new_empty(0), input.new_empty(0), input.new_empty(0)
    gb = input.new_empty(0) if linear_bias is None else input.new_empty(linear_bias.shape)
    return loss, input.new_empty(input.shape), input.new_empty(linear_weight.shape), gb


def _linear_ce_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output[1:])
    ctx.has_bias = inputs[3] is not None


def _linear_ce_backward(ctx, grad_loss, *_unused):
    _refuse_double_backward("linear_cross_entropy")
    if grad_loss is None:
        return (None,) * 13
    gx, gw, gb = ctx.saved_tensors
    return (gx * grad_loss, gw * grad_loss, None, gb * grad_loss if ctx.has_bias else None) + \
        (None,) * 9


_linear_ce_op.register_autograd(_linear_ce_backward, setup_context=_linear_ce_setup)


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                         reduction: str = "mean", ignore_index: int = -100,
                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                         logit_scale: float = 1.0, softcap: Optional[float] = None,
                         chunk_size: Optional[int] = None) -> Tensor:
    """``torch.nn.functional.linear_cross_entropy`` on fastxent's chunked loop.

    ``cross_entropy(linear(input, linear_weight, linear_bias), target)``
    without the (..., C) logits: rows go ``chunk_size`` at a time through a
    matrix product and fastxent's fused kernel (see
    :func:`fastxent.linear_cross_entropy`). The forward computes the
    gradients of ``input``, ``linear_weight`` and ``linear_bias`` as it
    goes; the backward scales them.

    Parameters
    ----------
    input : Tensor of shape (..., H)
    linear_weight : Tensor of shape (C, H)
    target : Tensor
        Class indices of shape (...), or probabilities of shape (..., C).
        Not differentiated.
    linear_bias : Tensor of shape (C,), optional
    weight, reduction, ignore_index, label_smoothing
        As in PyTorch (``weight``: class weights, not differentiated).
        ``reduction="none"`` computes the per-row losses but no gradient:
        the gradients of a weighted sum of rows would need the weights in
        the chunk loop (use "sum" or "mean" to train).
    z_loss, logit_scale, softcap
        fastxent's extras, as in :func:`cross_entropy`.
    chunk_size : int, optional
        Rows per chunk (None: fastxent's default).

    Returns
    -------
    Tensor
        A 0-dim tensor, or the per-row losses for ``reduction="none"``.
    """
    grad_on = torch.is_grad_enabled()
    for label, t in (("target", target), ("weight", weight)):
        if grad_on and t is not None and t.requires_grad:
            raise ValueError(f"fastxent.torch.linear_cross_entropy: {label} requires grad, "
                             f"but it is not differentiated; pass {label}.detach()")
    with_grad = grad_on and any(t is not None and t.requires_grad
                                for t in (input, linear_weight, linear_bias))
    if with_grad and reduction == "none":
        raise ValueError("fastxent.torch.linear_cross_entropy: reduction='none' gives no "
                         "gradient (the gradients of a weighted sum of the rows would need "
                         "the weights inside the chunk loop); use reduction='sum' or "
                         "'mean' to train, or call it under torch.no_grad()")
    loss, _, _, _ = _linear_ce_op(input, linear_weight, target, linear_bias, weight,
                                  int(ignore_index), reduction, float(label_smoothing),
                                  float(z_loss), _validate.logit_scale_arg(logit_scale),
                                  _validate.softcap_arg(softcap), int(chunk_size or 0), with_grad)
    return loss


# softmax and log_softmax: the forward is fastxent's; the backward is
# fastxent.softmax_backward / log_softmax_backward of the saved output (one
# fused pass: read two arrays, write one), into a new tensor.

def _softmax_ops(log: bool):
    name = "log_softmax" if log else "softmax"
    forward_fn = _losses.log_softmax if log else _losses.softmax

    def compute(input: Tensor, dim: int) -> Tensor:
        with _on_current_stream(input):
            return _tensor(forward_fn(_array(input), axis=dim), input)

    op = torch.library.custom_op(f"fastxent::{name}", compute, mutates_args=(),
                                 schema="(Tensor input, int dim) -> Tensor")

    @op.register_fake
    def _(input, dim):
        return torch.empty_like(input)

    def backward_compute(grad_output: Tensor, output: Tensor, dim: int) -> Tensor:
        from . import jacobian

        fn = jacobian.log_softmax_backward if log else jacobian.softmax_backward
        with _on_current_stream(output):
            return _tensor(fn(_array(grad_output.contiguous()), _array(output), axis=dim),
                           output)

    backward_op = torch.library.custom_op(
        f"fastxent::{name}_backward", backward_compute, mutates_args=(),
        schema="(Tensor grad_output, Tensor output, int dim) -> Tensor")

    @backward_op.register_fake
    def _(grad_output, output, dim):
        return torch.empty_like(output)

    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)

    def backward(ctx, grad_output):
        _refuse_double_backward(name)
        (output,) = ctx.saved_tensors
        return backward_op(grad_output, output, ctx.dim), None

    op.register_autograd(backward, setup_context=setup_context)
    return op


_softmax_op = _softmax_ops(False)
_log_softmax_op = _softmax_ops(True)


def _softmax_call(op, name, input, dim, dtype):
    if dim is None:
        raise TypeError(f"fastxent.torch.{name} needs dim (PyTorch's implicit choice of "
                        f"dimension is deprecated)")
    if dtype is not None:
        input = input.to(dtype)
    return op(input, int(dim))


def softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
            dtype: Optional[torch.dtype] = None) -> Tensor:
    """``torch.nn.functional.softmax`` on fastxent's kernels: forward
    :func:`fastxent.softmax`, backward :func:`fastxent.softmax_backward`.

    ``dim`` is required; ``dtype`` casts the input first, as in PyTorch.
    """
    return _softmax_call(_softmax_op, "softmax", input, dim, dtype)


def log_softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
                dtype: Optional[torch.dtype] = None) -> Tensor:
    """``torch.nn.functional.log_softmax`` on fastxent's kernels: forward
    :func:`fastxent.log_softmax`, backward :func:`fastxent.log_softmax_backward`."""
    return _softmax_call(_log_softmax_op, "log_softmax", input, dim, dtype)


# --------------------------------------------------------------------------
# Modules

class CrossEntropyLoss(torch.nn.Module):
    """``torch.nn.CrossEntropyLoss`` on fastxent's fused kernel.

    Same arguments (``weight`` a buffer, as in PyTorch), plus ``z_loss``,
    ``logit_scale``, ``softcap`` and ``inplace_backward`` (see :func:`cross_entropy`).
    """

    def __init__(self, weight: Optional[Tensor] = None, size_average=None,
                 ignore_index: int = -100, reduce=None, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 logit_scale: float = 1.0, softcap: Optional[float] = None,
                 inplace_backward: bool = False) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = _reduction(size_average, reduce, reduction)
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             z_loss=self.z_loss, logit_scale=self.logit_scale,
                             softcap=self.softcap, inplace_backward=self.inplace_backward)


class BCEWithLogitsLoss(torch.nn.Module):
    """``torch.nn.BCEWithLogitsLoss`` on fastxent's kernel (plus ``inplace_backward``)."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, reduce=None,
                 reduction: str = "mean", pos_weight: Optional[Tensor] = None, *,
                 inplace_backward: bool = False) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = _reduction(size_average, reduce, reduction)
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return binary_cross_entropy_with_logits(input, target, weight=self.weight,
                                                reduction=self.reduction,
                                                pos_weight=self.pos_weight,
                                                inplace_backward=self.inplace_backward)


class KLDivLoss(torch.nn.Module):
    """``torch.nn.KLDivLoss`` on fastxent's kernel (see :func:`kl_div`)."""

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean",
                 log_target: bool = False) -> None:
        super().__init__()
        self.reduction = _reduction(size_average, reduce, reduction)
        self.log_target = log_target

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return kl_div(input, target, reduction=self.reduction, log_target=self.log_target)


class BCELoss(torch.nn.Module):
    """``torch.nn.BCELoss`` on fastxent's kernel (see :func:`binary_cross_entropy`)."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, reduce=None,
                 reduction: str = "mean") -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.reduction = _reduction(size_average, reduce, reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


class DistillationLoss(torch.nn.Module):
    """:func:`distillation_loss` as a module: ``criterion(student_logits, teacher_logits,
    target=None)``; the options are its keywords."""

    def __init__(self, *, divergence: str = "forward_kl", beta: float = 0.5,
                 temperature: float = 1.0, alpha: float = 0.0, ignore_index: int = -100,
                 reduction: str = "batchmean", inplace_backward: bool = False) -> None:
        super().__init__()
        self.divergence = divergence
        self.beta = beta
        self.temperature = temperature
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.inplace_backward = inplace_backward

    def forward(self, student_logits: Tensor, teacher_logits,
                target: Optional[Tensor] = None) -> Tensor:
        return distillation_loss(student_logits, teacher_logits, divergence=self.divergence,
                                 beta=self.beta, temperature=self.temperature, target=target,
                                 alpha=self.alpha, ignore_index=self.ignore_index,
                                 reduction=self.reduction,
                                 inplace_backward=self.inplace_backward)
