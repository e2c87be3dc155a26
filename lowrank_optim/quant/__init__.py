"""Quantized storage primitives: 8-bit blockwise moments, group-wise projections, INT8 weights.

* :mod:`.blockwise8bit`: Adam moments in 8 bits via bitsandbytes or torchao (Dettmers et al., 2022).
* :mod:`.blockwise4bit`: Adam moments in 4 bits via torchao (Li et al., 2023).
* :mod:`.groupwise`: 4/8-bit asymmetric min/max groups for projection matrices (Q-GaLore,
  Zhang et al., 2024), with a float offset so same-signed groups are not clipped.
* :mod:`.int8_weights`: symmetric INT8 weight codes with stochastic rounding (Q-GaLore).
* :mod:`.quantized_linear`: ``QuantizedLinear`` and model conversion helpers.

Everything stored is a plain tensor, so checkpoints load with ``torch.load(weights_only=True)``.
"""

from lowrank_optim.quant.blockwise4bit import (
    BLOCKSIZE4,
    blockwise4_nbytes,
    dequantize_blockwise4,
    quantize_blockwise4,
)
from lowrank_optim.quant.blockwise8bit import (
    BACKENDS,
    BLOCKSIZE,
    MIN_QUANTIZED_NUMEL,
    blockwise8_error_bound,
    blockwise8_nbytes,
    dequantize_blockwise8,
    dynamic_map,
    quantize_blockwise8,
)
from lowrank_optim.quant.groupwise import (
    dequantize_groupwise,
    groupwise_nbytes,
    pack_int4,
    quantize_groupwise,
    unpack_int4,
)
from lowrank_optim.quant.int8_weights import (
    compute_int8_scales,
    dequantize_weight_int8,
    int8_weight_nbytes,
    quantize_weight_int8,
    stochastic_round_int8,
)
from lowrank_optim.quant.quantized_linear import (
    QuantizedLinear,
    dequantize_model,
    quantize_model,
    quantized_linear_owners,
)

__all__ = [
    "BACKENDS",
    "BLOCKSIZE",
    "BLOCKSIZE4",
    "MIN_QUANTIZED_NUMEL",
    "QuantizedLinear",
    "blockwise4_nbytes",
    "blockwise8_error_bound",
    "blockwise8_nbytes",
    "compute_int8_scales",
    "dequantize_blockwise4",
    "dequantize_blockwise8",
    "dequantize_groupwise",
    "dequantize_model",
    "dequantize_weight_int8",
    "dynamic_map",
    "groupwise_nbytes",
    "int8_weight_nbytes",
    "pack_int4",
    "quantize_blockwise4",
    "quantize_blockwise8",
    "quantize_groupwise",
    "quantize_model",
    "quantize_weight_int8",
    "quantized_linear_owners",
    "stochastic_round_int8",
    "unpack_int4",
]
