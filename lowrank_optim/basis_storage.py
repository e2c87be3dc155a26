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

from lowrank_optim.state_keys import basis_part

__all__ = ["BASIS_BITS", "GROUP_SIZE", "basis_fixed_dtype_keys", "read_basis", "write_basis"]

BASIS_BITS = (None, 4, 8)
#: Values per quantization group of a stored basis (one scale and offset each; Q-GaLore's 256).
GROUP_SIZE = 256
_PARTS = ("codes", "scale", "offset")


def basis_fixed_dtype_keys(keys: tuple[str, ...]) -> frozenset[str]:
    """The fp32 scale/offset entries of quantized bases (kept fp32 when a checkpoint loads)."""
    return frozenset(basis_part(key, part) for key in keys for part in ("scale", "offset"))


def write_basis(
    state: dict[str, Any], key: str, basis: torch.Tensor, bits: int | None, dtype: torch.dtype
) -> None:
    """Store ``basis`` under ``key``: in ``dtype`` when ``bits`` is None, else quantized."""
    if bits is None:
        state[key] = basis.to(dtype)
        return
    from lowrank_optim.quant import quantize_groupwise

    quantized = quantize_groupwise(basis.float(), bits=bits, group_size=GROUP_SIZE)
    for part in _PARTS:
        state[basis_part(key, part)] = quantized[part]
    state[basis_part(key, "shape")] = torch.tensor(tuple(basis.shape), dtype=torch.int64)


def read_basis(
    state: dict[str, Any], key: str, bits: int | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """The basis under ``key`` in ``dtype`` (dequantized if stored in bits), or None if absent."""
    if bits is None:
        return state.get(key)
    if basis_part(key, "codes") not in state:
        return None
    from lowrank_optim.quant import dequantize_groupwise

    shape = tuple(int(d) for d in state[basis_part(key, "shape")])
    parts = {part: state[basis_part(key, part)] for part in _PARTS}
    return dequantize_groupwise(parts, shape, bits, GROUP_SIZE, dtype=dtype)
