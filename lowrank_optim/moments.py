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
"""

from __future__ import annotations

import math

import torch

__all__ = ["adam_denominators", "adam_step_sizes", "update_moments_"]


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
