"""4-bit blockwise storage for Adam moments, delegated to torchao's 4-bit optimizer primitives.

Li, Chen & Zhu, "Memory Efficient Optimizers with 4-bit States" (NeurIPS 2023), as torchao's
``AdamW4bit`` implements it: a tensor is cut into blocks of ``BLOCKSIZE4`` = 128 values, each
block keeps one fp32 absmax scale, and every value is stored as the 4-bit index of the nearest
entry of a 16-entry code book ``Q``::

    code_i = argmin_j |x_i / absmax_b - Q_j|,      deq_i = Q[code_i] * absmax_b

* first moment: the signed dynamic-exponent map (3 exponent bits, torchao's
  ``create_dynamic_map(True, 3, 4)``);
* second moment: a linear map *without zero*, ``{1/16, ..., 1}``. The paper shows that a zero
  code is what makes 4-bit second moments fail: a small ``v`` rounded to 0 turns
  ``m / (sqrt(v) + eps)`` into a huge step.

We do not write our own quantizer or code books: ``scale_tensor``, ``quantize_4bit_with_qmap``,
``dequant_with_qmap`` and the two maps come from torchao. Codes are packed two per byte with
:func:`~lowrank_optim.quant.groupwise.pack_int4`, and only plain tensors come back, so an
optimizer state built from them loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowrank_optim.quant.groupwise import pack_int4, unpack_int4

__all__ = ["BLOCKSIZE4", "blockwise4_nbytes", "dequantize_blockwise4", "quantize_blockwise4"]

BLOCKSIZE4 = 128
"""Values per block (torchao's and the paper's default for 4-bit states)."""

_MAPS: dict[tuple[str, bool], Tensor] = {}


def _code_book(signed: bool, device: torch.device) -> Tensor:
    key = (str(device), bool(signed))
    if key not in _MAPS:
        from torchao.optim.subclass_4bit import get_qmap_signed, get_qmap_unsigned

        values = get_qmap_signed() if signed else get_qmap_unsigned()
        _MAPS[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return _MAPS[key]


def quantize_blockwise4(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` to ``(codes uint8 [ceil(numel / 2)], absmax fp32 [ceil(numel / 128)])``.

    ``signed`` picks the map: True for the first moment, False for the (non-negative) second.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"blockwise 4-bit quantization needs a floating tensor, got {x!r:.80}")
    if not signed and x.numel() and bool((x < 0).any()):
        raise ValueError(
            f"signed=False (unsigned map, second moment) got negative values; min={float(x.min())}"
        )
    from torchao.optim.quant_utils import quantize_4bit_with_qmap, scale_tensor

    flat = x.detach().reshape(-1).to(torch.float32)
    # torchao scales whole blocks only: zero padding never raises a block's absmax.
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % BLOCKSIZE4))
    normalized, absmax = scale_tensor(padded, BLOCKSIZE4)
    codes = quantize_4bit_with_qmap(normalized, _code_book(signed, flat.device))
    return pack_int4(codes[: flat.numel()]), absmax.to(torch.float32)


def dequantize_blockwise4(
    codes: Tensor, absmax: Tensor, shape: torch.Size | tuple[int, ...], signed: bool
) -> Tensor:
    """Inverse of :func:`quantize_blockwise4`; returns an fp32 tensor of ``shape``."""
    from torchao.optim.quant_utils import dequant_with_qmap

    numel = math.prod(shape)
    if codes.dtype != torch.uint8 or codes.numel() != math.ceil(numel / 2):
        raise ValueError(
            f"codes must be uint8 with {math.ceil(numel / 2)} bytes for shape {tuple(shape)}, "
            f"got {codes.dtype} with {codes.numel()}"
        )
    blocks = math.ceil(numel / BLOCKSIZE4)
    if absmax.numel() != blocks:
        raise ValueError(f"absmax has {absmax.numel()} blocks, expected {blocks}")
    unpacked = unpack_int4(codes, numel)
    padded = torch.nn.functional.pad(unpacked, (0, blocks * BLOCKSIZE4 - numel))
    out = dequant_with_qmap(padded, _code_book(signed, codes.device), absmax.float())
    return out[:numel].to(torch.float32).reshape(tuple(shape))


def blockwise4_nbytes(numel: int) -> int:
    """Bytes held by one quantized tensor: half a byte per value + one fp32 absmax per block."""
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return math.ceil(numel / 2) + 4 * math.ceil(numel / BLOCKSIZE4)
