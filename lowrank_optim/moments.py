"""Adam moment math on lists of tensors, shared by the dense and the low-rank paths.

Kingma & Ba (2015) with decoupled weight decay (Loshchilov & Hutter, 2019), in the exact form
``torch.optim.AdamW`` uses, so that a degenerate GaLore step reproduces it:

    m_t = beta1 m_{t-1} + (1 - beta1) g_t
    v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
    d_t = (m_t / (1 - beta1^t)) / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)

The caller applies ``d_t``: to the parameter directly (dense AdamW) or after projecting it back
to full space (GaLore). The lists are processed with ``torch._foreach_*`` kernels, which is what
``torch.optim`` itself uses to avoid one Python round trip per tensor.
"""

from __future__ import annotations

import math

import torch

__all__ = ["adam_directions", "update_moments_"]


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


def adam_directions(
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    beta1: float,
    beta2: float,
    eps: float,
) -> list[torch.Tensor]:
    """Bias-corrected Adam directions ``d_t`` (new tensors) for moments at the given steps."""
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, [math.sqrt(1.0 - beta2**step) for step in steps])
    torch._foreach_add_(denominators, eps)
    directions = torch._foreach_div(exp_avgs, denominators)
    torch._foreach_mul_(directions, [1.0 / (1.0 - beta1**step) for step in steps])
    return directions
