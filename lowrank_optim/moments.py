"""Adam moment math on lists of tensors, shared by the dense and the low-rank paths.

Kingma & Ba (2015) with decoupled weight decay (Loshchilov & Hutter, 2019), in the exact form
``torch.optim.AdamW`` uses, so that a degenerate GaLore step reproduces it:

    m_t = beta1 m_{t-1} + (1 - beta1) g_t
    v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
    d_t = (m_t / (1 - beta1^t)) / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)

Here ``d_t = m_t / denominator_t`` scaled by ``step_size_t = lr / (1 - beta1^t)``; the caller
applies it to the parameter directly (dense AdamW, fused into one ``addcdiv``) or after
projecting it back to full space (GaLore). The lists are processed with ``torch._foreach_*``
kernels, which is what ``torch.optim`` itself uses to avoid one Python round trip per tensor.

Where the moments are stored as plain tensors of the parameter's dtype, :func:`fused_adamw_` runs
the whole update (both moments, both bias corrections, weight decay and the parameter update) in
torch's fused AdamW kernel instead: one pass over each tensor rather than eight. On a CPU it is
about four times faster than ``torch.optim.AdamW``'s default (single-tensor) implementation.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "adam_denominators",
    "adam_step_sizes",
    "fused_adamw_",
    "fused_kernel_applies",
    "update_moments_",
]

#: Devices and dtypes torch's fused AdamW kernel implements.
_FUSED_DEVICES = frozenset({"cpu", "cuda"})
_FUSED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
#: Tensor types the kernel takes as they are (subclasses such as ``DTensor`` are not).
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def update_moments_(
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    beta1: float,
    beta2: float,
) -> None:
    """Exponential moving averages of the gradient and its square, in place."""
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)


def adam_denominators(
    exp_avg_sqs: list[torch.Tensor], steps: list[int], beta2: float, eps: float
) -> list[torch.Tensor]:
    """``sqrt(v_t) / sqrt(1 - beta2^t) + eps`` (new tensors), per tensor of the list."""
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, [math.sqrt(1.0 - beta2**step) for step in steps])
    torch._foreach_add_(denominators, eps)
    return denominators


def adam_step_sizes(lr: float, steps: list[int], beta1: float) -> list[float]:
    """``lr / (1 - beta1^t)``: the first-moment bias correction folded into the step size."""
    return [lr / (1.0 - beta1**step) for step in steps]


def fused_kernel_applies(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
) -> bool:
    """Whether :func:`fused_adamw_` can step these lists.

    Each parameter's gradient and moments must share its dtype, device and shape (the kernel
    widens to fp32 internally, so 16-bit moments are as safe as in the foreach path), and none
    may be a tensor subclass such as ``DTensor``.
    """
    for param, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        if type(param) not in _PLAIN_TYPES or param.dtype not in _FUSED_DTYPES:
            return False
        if param.device.type not in _FUSED_DEVICES:
            return False
        for tensor in (grad, exp_avg, exp_avg_sq):
            if type(tensor) not in _PLAIN_TYPES or tensor.dtype != param.dtype:
                return False
            if tensor.device != param.device or tensor.shape != param.shape:
                return False
    return True


def _dense_layout(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s elements fill one gap-free block of memory, in any dimension order.

    True for contiguous tensors and for permutations of them (a transposed weight); false for
    slices with gaps and for broadcast (zero-stride) views. Dimensions of size 1 have no say.
    """
    if tensor.numel() == 0:
        return True
    expected = 1
    dims = zip(tensor.shape, tensor.stride(), strict=True)
    for size, stride in sorted(((s, d) for s, d in dims if s != 1), key=lambda pair: pair[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _in_layout(tensor: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself if its strides are ``layout``'s, else a copy with ``layout``'s strides."""
    if tensor.stride() == layout.stride():
        return tensor
    return torch.empty_like(layout, memory_format=torch.preserve_format).copy_(tensor)


def _kernel_operands(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four tensors, or copies of them, laid out alike in one gap-free block each.

    torch's fused kernel reads each tensor as flat memory from its data pointer and pairs the
    i-th element of the parameter with the i-th of its gradient and moments: strides that
    differ (a transposed parameter with contiguous moments, or a contiguous gradient assigned
    to it) pair unrelated elements and update the parameter silently wrong. Copies are made
    only where layouts differ (autograd gives a gradient its parameter's strides, and the
    moments of a contiguous parameter are contiguous), so the usual step copies nothing.
    """
    layout = param if _dense_layout(param) else param.contiguous()
    return (
        layout,
        _in_layout(grad, layout),
        _in_layout(exp_avg, layout),
        _in_layout(exp_avg_sq, layout),
    )


def fused_adamw_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step at step counts ``steps`` (already advanced) in torch's fused kernel.

    ``param <- (1 - lr wd) param - lr / (1 - beta1^t) * m_t / (sqrt(v_t) / sqrt(1 - beta2^t) +
    eps)``, the formula above, with the moments updated in place. Callers check
    :func:`fused_kernel_applies` first. The kernel reads the step from a tensor; the state keeps
    it as a number, so one scalar tensor per distinct step value and device is made here.

    Any layout is accepted: tensors whose strides differ from their parameter's (or a
    parameter with gaps) are stepped through working copies that are copied back
    (:func:`_kernel_operands`), so every element meets its own gradient and moments.
    """
    operands = [
        _kernel_operands(*four) for four in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)
    ]
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, (param, *_) in enumerate(operands):
        groups.setdefault((param.device, param.dtype), []).append(index)
    step_tensors: dict[tuple[torch.device, int], torch.Tensor] = {}
    for (device, _), indices in groups.items():
        for i in indices:
            if (device, steps[i]) not in step_tensors:
                step_tensors[device, steps[i]] = torch.tensor(float(steps[i]), device=device)
        param_list, grad_list, exp_avg_list, exp_avg_sq_list = (
            [operands[i][column] for i in indices] for column in range(4)
        )
        torch._fused_adamw_(
            param_list,
            grad_list,
            exp_avg_list,
            exp_avg_sq_list,
            [],
            [step_tensors[device, steps[i]] for i in indices],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            eps=eps,
            amsgrad=False,
            maximize=False,
        )
    # Working copies of the parameters and moments (the gradients are only read) go back.
    for originals, (work_param, _, work_avg, work_avg_sq) in zip(
        zip(params, exp_avgs, exp_avg_sqs, strict=True), operands, strict=True
    ):
        for original, working in zip(originals, (work_param, work_avg, work_avg_sq), strict=True):
            if working is not original:
                original.copy_(working)
