"""Group-wise asymmetric min/max quantization for projection matrices (Q-GaLore).

Q-GaLore (Zhang et al., 2024) stores GaLore's projection matrices in 4 bits, per group of 256
values. The flattened tensor is cut into groups of ``group_size`` (the last one padded by
repeating the final value, so padding never widens its range). For a group with extremes
``lo, hi`` and ``L = 2**bits - 1`` levels::

    scale  = (hi - lo) / L            (fp32)
    offset = lo                       (fp32, a real number, not an integer zero point)
    code   = clamp(round((x - offset) / scale), 0, L)
    deq    = offset + code * scale    =>  |x - deq| <= scale / 2   (exact arithmetic)

Keeping ``offset`` as a float matters: Q-GaLore's reference computes an integer zero point and
clamps it into the code range, which clips every group whose values share one sign (a group
of [5, 6] decodes to [0, 1]-ish values). 4-bit codes are packed two per byte (the reference
spends a whole byte per 4-bit code, halving the saving).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "SUPPORTED_BITS",
    "dequantize_groupwise",
    "groupwise_nbytes",
    "pack_int4",
    "quantize_groupwise",
    "unpack_int4",
]

SUPPORTED_BITS = (4, 8)


def _check_format(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got bits={bits!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got group_size={group_size!r}")


def pack_int4(codes: Tensor) -> Tensor:
    """Pack 4-bit codes (uint8 values 0..15) two per byte: even index low nibble, odd high.

    Returns ``ceil(numel / 2)`` bytes; an odd length is padded with a zero code.
    """
    if codes.dtype != torch.uint8:
        raise ValueError(f"pack_int4 expects uint8 codes, got dtype={codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() and int(flat.max()) > 15:
        raise ValueError(f"4-bit codes must be in [0, 15], got max={int(flat.max())}")
    return _pack(flat)


def _pack(flat: Tensor) -> Tensor:
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_int4`: the first ``numel`` uint8 codes."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 expects uint8, got dtype={packed.dtype}")
    if math.ceil(numel / 2) != packed.numel() or numel < 0:
        raise ValueError(f"numel={numel} does not fit {packed.numel()} packed bytes")
    flat = packed.reshape(-1)
    return torch.stack([flat & 0x0F, flat >> 4], dim=1).reshape(-1)[:numel]


def _groups(flat: Tensor, group_size: int) -> Tensor:
    """View ``flat`` as ``[n_groups, group_size]``, padding by repeating the last value."""
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.reshape(-1, group_size)


def quantize_groupwise(x: Tensor, bits: int = 4, group_size: int = 256) -> dict[str, Tensor]:
    """Quantize ``x`` to ``{"codes", "scale", "offset"}`` (plain tensors, weights_only-safe).

    ``codes`` is uint8: ``numel`` bytes for 8 bits, ``ceil(numel/2)`` packed bytes for 4 bits.
    ``scale`` and ``offset`` are fp32 with one entry per group.
    """
    _check_format(bits, group_size)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = getattr(x, "dtype", type(x).__name__)
        raise ValueError(f"quantize_groupwise needs a floating tensor, got {got}")
    flat = x.detach().reshape(-1).to(torch.float32)
    if flat.numel() == 0:
        empty = torch.empty(0, dtype=torch.float32, device=x.device)
        return {
            "codes": torch.empty(0, dtype=torch.uint8, device=x.device),
            "scale": empty,
            "offset": empty.clone(),
        }
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("quantize_groupwise got non-finite values (NaN/Inf)")
    levels = 2**bits - 1
    g = _groups(flat, group_size)
    lo, hi = g.amin(dim=1), g.amax(dim=1)
    scale = (hi - lo) / levels
    # A constant group has scale 0: divide by 1 instead so its codes are 0 and deq == offset.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((g - lo[:, None]) / safe[:, None]).clamp_(0, levels)
    codes = codes.to(torch.uint8).reshape(-1)[: flat.numel()]
    if bits == 4:
        codes = _pack(codes)
    return {"codes": codes, "scale": scale, "offset": lo}


def dequantize_groupwise(
    d: dict[str, Tensor],
    shape: torch.Size | tuple[int, ...],
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Inverse of :func:`quantize_groupwise`: ``offset + code * scale`` reshaped to ``shape``."""
    _check_format(bits, group_size)
    numel = math.prod(shape)
    n_groups = math.ceil(numel / group_size)
    scale, offset = d["scale"], d["offset"]
    if scale.numel() != n_groups or offset.numel() != n_groups:
        raise ValueError(
            f"expected {n_groups} groups for shape {tuple(shape)} and group_size={group_size}, "
            f"got scale {scale.numel()} / offset {offset.numel()}"
        )
    codes = unpack_int4(d["codes"], numel) if bits == 4 else d["codes"].reshape(-1)
    if codes.numel() != numel:
        raise ValueError(f"codes hold {codes.numel()} values, shape {tuple(shape)} needs {numel}")
    if numel == 0:
        return torch.empty(tuple(shape), dtype=dtype, device=codes.device)
    g = _groups(codes, group_size).to(torch.float32)
    deq = torch.addcmul(offset[:, None].float(), g, scale[:, None].float())
    return deq.reshape(-1)[:numel].reshape(tuple(shape)).to(dtype)


def groupwise_nbytes(numel: int, bits: int, group_size: int) -> int:
    """Stored bytes: codes (``numel`` or ``ceil(numel/2)``) + fp32 scale and offset per group."""
    _check_format(bits, group_size)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    code_bytes = math.ceil(numel / 2) if bits == 4 else numel
    return code_bytes + 8 * math.ceil(numel / group_size)
