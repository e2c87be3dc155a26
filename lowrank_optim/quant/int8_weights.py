"""INT8 weight storage with stochastic rounding (Q-GaLore, Zhang et al., 2024).

A weight ``W`` of shape ``[out, in]`` is cut, row by row, into groups of ``group_size``
consecutive input features. When ``in`` is not a multiple of ``group_size`` the last group of
each row is simply shorter (``ceil(in / group_size)`` groups per row): no value is padded into
the stored codes, and the scale of the short group is taken over its real values only.
Per group ``b`` (symmetric, so no zero point that could clip same-signed groups)::

    s_b    = max_{i in b} |W_i| / 127                   (fp32)
    q_i    = clamp(round(W_i / s_b), -127, 127)         (int8, nearest)
    deq_i  = q_i * s_b            =>  |W_i - deq_i| <= s_b / 2

Re-quantizing after an optimizer step with nearest rounding erases every update smaller than
``s_b / 2``. Q-GaLore therefore rounds *stochastically*: with ``y = W / s`` and ``f = y -
floor(y)``, ``q = floor(y) + 1`` with probability ``f`` and ``floor(y)`` otherwise, so
``E[q * s] = W`` for ``|W| <= 127 s`` and small updates survive in expectation. The uniform
draws come ONLY from an explicit ``torch.Generator``, whose ``get_state()`` (a uint8 tensor) can
be checkpointed, so a resumed run rounds exactly like an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "QMAX",
    "compute_int8_scales",
    "dequantize_weight_int8",
    "int8_weight_nbytes",
    "quantize_weight_int8",
    "stochastic_round_int8",
]

QMAX = 127
"""Largest code magnitude; -128 is unused so the code range is symmetric."""


def _check_group_size(group_size: int) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got group_size={group_size!r}")


def _check_weight(w: Tensor, what: str = "weight") -> None:
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise ValueError(f"{what} must be a floating tensor, got {getattr(w, 'dtype', type(w))}")
    if w.dim() != 2:
        raise ValueError(f"{what} must be 2-D [out, in], got shape {tuple(w.shape)}")


def _expand(scales: Tensor, in_features: int, group_size: int) -> Tensor:
    """Per-element scales ``[out, in]`` from per-group scales ``[out, n_groups]``."""
    n_groups = math.ceil(in_features / group_size)
    if scales.dim() != 2 or scales.shape[1] != n_groups:
        raise ValueError(
            f"scales must be [out, {n_groups}] for in={in_features}, group_size={group_size}; "
            f"got {tuple(scales.shape)}"
        )
    return scales.repeat_interleave(group_size, dim=1)[:, :in_features]


def compute_int8_scales(w: Tensor, group_size: int = 256) -> Tensor:
    """Symmetric per-group scales ``absmax / 127`` as fp32 ``[out, ceil(in / group_size)]``."""
    _check_group_size(group_size)
    _check_weight(w)
    out_f, in_f = w.shape
    pad = (-in_f) % group_size
    # Zero padding cannot raise an absmax, so the short last group's scale is its own.
    a = torch.nn.functional.pad(w.detach().to(torch.float32).abs(), (0, pad))
    return a.reshape(out_f, -1, group_size).amax(dim=2) / QMAX


def _safe(scale_full: Tensor) -> Tensor:
    # An all-zero group has scale 0; divide by 1 instead so its codes are 0 (exact).
    return torch.where(scale_full > 0, scale_full, torch.ones_like(scale_full))


def quantize_weight_int8(w: Tensor, group_size: int = 256) -> tuple[Tensor, Tensor]:
    """Nearest-rounding quantization: ``(codes int8 [out, in], scales fp32 [out, groups])``."""
    scales = compute_int8_scales(w, group_size)
    s = _safe(_expand(scales, w.shape[1], group_size))
    codes = torch.round(w.detach().to(torch.float32) / s).clamp_(-QMAX, QMAX)
    return codes.to(torch.int8), scales


def dequantize_weight_int8(
    codes: Tensor,
    scales: Tensor,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    group_size: int = 256,
) -> Tensor:
    """``codes * scale`` reshaped to ``shape`` (2-D ``[out, in]``) in ``dtype``."""
    _check_group_size(group_size)
    if codes.dtype != torch.int8:
        raise ValueError(f"codes must be int8, got dtype={codes.dtype}")
    if len(shape) != 2 or codes.numel() != math.prod(shape):
        raise ValueError(f"shape must be 2-D matching {codes.numel()} codes, got {tuple(shape)}")
    c = codes.reshape(tuple(shape)).to(torch.float32)
    return (c * _expand(scales.to(torch.float32), shape[1], group_size)).to(dtype)


def stochastic_round_int8(
    x: Tensor, scales: Tensor, generator: torch.Generator, group_size: int = 256
) -> Tensor:
    """Round ``x / scale`` to int8 codes, up with probability equal to the fractional part.

    Unbiased (``E[codes * scale] = x``) wherever ``|x| <= 127 * scale``; values beyond that are
    clamped. Random numbers are drawn only from ``generator`` (same device as ``x``).
    """
    _check_group_size(group_size)
    _check_weight(x, "x")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"an explicit torch.Generator is required, got {type(generator).__name__}")
    s = _safe(_expand(scales.to(torch.float32), x.shape[1], group_size))
    y = x.detach().to(torch.float32) / s
    low = torch.floor(y)
    u = torch.rand(y.shape, generator=generator, device=y.device, dtype=torch.float32)
    # u is uniform on [0, 1): P(u < frac) = frac, which is what makes the rounding unbiased.
    codes = low + (u < (y - low)).to(torch.float32)
    return codes.clamp_(-QMAX, QMAX).to(torch.int8)


def int8_weight_nbytes(out_features: int, in_features: int, group_size: int = 256) -> int:
    """Stored bytes: one int8 code per weight + one fp32 scale per (row, group)."""
    _check_group_size(group_size)
    if out_features < 0 or in_features < 0:
        raise ValueError(f"shape must be non-negative, got ({out_features}, {in_features})")
    return out_features * in_features + 4 * out_features * math.ceil(in_features / group_size)
