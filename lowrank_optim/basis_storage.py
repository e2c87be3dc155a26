"""How projection bases are stored between refreshes: as the parameter's dtype, or in 4/8 bits.

Q-GaLore (Zhang et al., 2024) stores the projection matrices in 4 bits: group-wise (256 values)
asymmetric min/max codes. Here two 4-bit codes share a byte (the reference spends a byte on
each) and the group minimum is kept as a float offset, so a group whose values all share one
sign is never clipped. A basis is dequantized when it is used; the refresh itself and the
metrics run in fp32 on the dequantized basis.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["BASIS_BITS", "basis_fixed_dtype_keys", "read_basis", "write_basis"]

BASIS_BITS = (None, 4, 8)
_GROUP = 256
_PARTS = ("codes", "scale", "offset")


def _part(key: str, part: str) -> str:
    return f"{key}_{part}"


def basis_fixed_dtype_keys(keys: tuple[str, ...]) -> frozenset[str]:
    """The fp32 scale/offset entries of quantized bases (kept fp32 when a checkpoint loads)."""
    return frozenset(_part(key, part) for key in keys for part in ("scale", "offset"))


def write_basis(
    state: dict[str, Any], key: str, basis: torch.Tensor, bits: int | None, dtype: torch.dtype
) -> None:
    """Store ``basis`` under ``key``: in ``dtype`` when ``bits`` is None, else quantized."""
    if bits is None:
        state[key] = basis.to(dtype)
        return
    from lowrank_optim.quant import quantize_groupwise

    quantized = quantize_groupwise(basis.float(), bits=bits, group_size=_GROUP)
    for part in _PARTS:
        state[_part(key, part)] = quantized[part]
    state[_part(key, "shape")] = torch.tensor(tuple(basis.shape), dtype=torch.int64)


def read_basis(
    state: dict[str, Any], key: str, bits: int | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """The basis under ``key`` in ``dtype`` (dequantized if stored in bits), or None if absent."""
    if bits is None:
        return state.get(key)
    if _part(key, "codes") not in state:
        return None
    from lowrank_optim.quant import dequantize_groupwise

    shape = tuple(int(d) for d in state[_part(key, "shape")])
    parts = {part: state[_part(key, part)] for part in _PARTS}
    return dequantize_groupwise(parts, shape, bits, _GROUP, dtype=dtype)
