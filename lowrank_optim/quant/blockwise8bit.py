"""8-bit blockwise storage for Adam moments, delegated to bitsandbytes.

This follows the 8-bit optimizers of Dettmers et al. (2022): a tensor is cut into blocks of
``BLOCKSIZE`` = 256 values; each block keeps one fp32 ``absmax`` and every value is stored as the
uint8 index of the nearest entry of a *dynamic* (exponent + linear fraction) code book ``Q``::

    code_i = argmin_j |x_i / absmax_b - Q_j|,      deq_i = Q[code_i] * absmax_b

so ``|x_i - deq_i| <= absmax_b * max_gap(Q) / 2`` (see :func:`blockwise8_error_bound`). The
first moment uses the signed map, the second moment (non-negative) the unsigned map, which
spends its extra bit on resolution, as bitsandbytes' own 8-bit Adam does.

We do not write our own quantizer. Two backends produce the same format (the same sorted
256-entry dynamic map, uint8 indices into it, one fp32 absmax per block of 256), so states are
interchangeable between them:

* ``bitsandbytes`` (default): ``bitsandbytes.functional.quantize_blockwise``, which runs on CPU
  from 0.50 on. Every call passes KEYWORD arguments, because 0.50 re-ordered the positional ones
  (that silently broke galore-torch's 8-bit path).
* ``torchao``: the primitives of torchao's own 8-bit optimizers (``torchao.optim.quant_utils``:
  ``scale_tensor``, ``quantize_8bit_with_qmap``, ``dequant_with_qmap``), for users who have
  torchao but not a bitsandbytes build for their platform.

Only plain tensors (codes, absmax) come back, so an optimizer state built from them loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor

__all__ = [
    "BACKENDS",
    "BLOCKSIZE",
    "MIN_QUANTIZED_NUMEL",
    "blockwise8_error_bound",
    "blockwise8_nbytes",
    "dequantize_blockwise8",
    "dynamic_map",
    "quantize_blockwise8",
]

BLOCKSIZE = 256
"""Values per block; each block stores one fp32 absmax (Dettmers et al., 2022 use 2048 on GPU;
256 is bitsandbytes' optimizer default and keeps outliers local)."""

MIN_QUANTIZED_NUMEL = 4096
"""Tensors with fewer elements stay fp32: their absolute saving is negligible and the 8-bit
round trip costs accuracy (bitsandbytes uses the same threshold for its optimizers)."""

_BNB_MIDPOINT_SLACK = 2e-5
"""Measured tie-breaking tolerance of bitsandbytes' code search (normalized units)."""

BACKENDS = ("bitsandbytes", "torchao")

_MAPS: dict[tuple[str, bool, str], Tensor] = {}


def _bnb_functional() -> ModuleType:
    # Imported lazily: bitsandbytes is slow to import and prints backend notices, which
    # users of the other quant formats should not pay for.
    import bitsandbytes.functional as bnb_f

    return bnb_f


def dynamic_map(
    signed: bool, device: torch.device | str = "cpu", backend: str = "bitsandbytes"
) -> Tensor:
    """The backend's 256-entry dynamic code book (sorted), cached per device, sign and backend.

    bitsandbytes and torchao build the same map (Dettmers et al., 2022); each backend uses its
    own so that it does not need the other installed.
    """
    dev = torch.device(device)
    key = (str(dev), bool(signed), _check_backend(backend))
    if key not in _MAPS:
        if backend == "torchao":
            from torchao.optim.quant_utils import create_dynamic_map

            code = torch.tensor(create_dynamic_map(signed=bool(signed)))
        else:
            code = _bnb_functional().create_dynamic_map(signed=bool(signed))
        _MAPS[key] = code.to(device=dev, dtype=torch.float32)
    return _MAPS[key]


def blockwise8_error_bound(signed: bool) -> float:
    """Largest ``|x - deq| / absmax_block`` for nearest rounding onto the dynamic map.

    The normalized value lies in ``[-1, 1]`` (signed) or ``[0, 1]`` (unsigned); the error is at
    most half the widest gap between neighbouring codes, or the distance from an end of that
    interval to the nearest code (the signed map has no -1 entry). bitsandbytes' kernel is not
    exactly nearest for values within ~1.5e-5 of a midpoint (measured on CPU with a dense
    sweep of [-1, 1]), so ``_BNB_MIDPOINT_SLACK`` is added. About 0.0071 for the signed map and
    0.0036 for the unsigned one.
    """
    q = dynamic_map(signed).sort().values
    lo = -1.0 if signed else 0.0
    half_gap = float((q[1:] - q[:-1]).max()) / 2.0
    return max(half_gap, float(q[0]) - lo, 1.0 - float(q[-1])) + _BNB_MIDPOINT_SLACK


def _check_input(x: Tensor, signed: bool) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"blockwise 8-bit quantization needs a floating tensor, got {x.dtype}")
    if not signed and x.numel() > 0 and bool((x < 0).any()):
        raise ValueError(
            "signed=False (unsigned map, second moment) got negative values; min="
            f"{float(x.min()):.3g}"
        )


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; allowed: {', '.join(BACKENDS)}")
    return backend


def quantize_blockwise8(
    x: Tensor, signed: bool, backend: str = "bitsandbytes"
) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` to ``(codes uint8 [numel], absmax fp32 [ceil(numel/256)])``.

    ``signed`` picks the dynamic map: True for the first moment, False for the second.
    ``backend`` is ``bitsandbytes`` or ``torchao`` (same format, see the module docstring).
    """
    _check_input(x, signed)
    _check_backend(backend)
    flat = x.detach().reshape(-1).to(torch.float32).contiguous()
    if flat.numel() == 0:
        return (
            torch.empty(0, dtype=torch.uint8, device=x.device),
            torch.empty(0, dtype=torch.float32, device=x.device),
        )
    code = dynamic_map(signed, flat.device, backend)
    if backend == "torchao":
        from torchao.optim.quant_utils import quantize_8bit_with_qmap, scale_tensor

        # torchao scales whole blocks only: pad with zeros, which never raise a block's absmax.
        padded = torch.nn.functional.pad(flat, (0, -flat.numel() % BLOCKSIZE))
        normalized, absmax = scale_tensor(padded, BLOCKSIZE)
        codes = quantize_8bit_with_qmap(normalized, code)[: flat.numel()]
        return codes, absmax.to(torch.float32)
    codes, state = _bnb_functional().quantize_blockwise(A=flat, code=code, blocksize=BLOCKSIZE)
    # Keep only plain tensors: QuantState objects do not survive weights_only loading.
    return codes, state.absmax.to(torch.float32)


def dequantize_blockwise8(
    codes: Tensor,
    absmax: Tensor,
    shape: torch.Size | tuple[int, ...],
    signed: bool,
    backend: str = "bitsandbytes",
) -> Tensor:
    """Inverse of :func:`quantize_blockwise8`; returns an fp32 tensor of ``shape``."""
    _check_backend(backend)
    numel = math.prod(shape)
    if codes.dtype != torch.uint8 or codes.numel() != numel:
        raise ValueError(
            f"codes must be uint8 with {numel} elements for shape {tuple(shape)}, got "
            f"{codes.dtype} with {codes.numel()}"
        )
    if absmax.numel() != math.ceil(numel / BLOCKSIZE):
        raise ValueError(
            f"absmax has {absmax.numel()} blocks, expected {math.ceil(numel / BLOCKSIZE)}"
        )
    if numel == 0:
        return torch.empty(tuple(shape), dtype=torch.float32, device=codes.device)
    if backend == "torchao":
        from torchao.optim.quant_utils import dequant_with_qmap

        padded = torch.nn.functional.pad(codes.reshape(-1), (0, -numel % BLOCKSIZE))
        code = dynamic_map(signed, codes.device, backend)
        out = dequant_with_qmap(padded, code, absmax.float())
        return out[:numel].to(torch.float32).reshape(tuple(shape))
    out = _bnb_functional().dequantize_blockwise(
        A=codes.reshape(-1),
        absmax=absmax.to(torch.float32),
        code=dynamic_map(signed, codes.device),
        blocksize=BLOCKSIZE,
    )
    return out.to(torch.float32).reshape(tuple(shape))


def blockwise8_nbytes(numel: int) -> int:
    """Bytes held by one quantized tensor: one uint8 code per value + one fp32 absmax per block."""
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return numel + 4 * math.ceil(numel / BLOCKSIZE)
