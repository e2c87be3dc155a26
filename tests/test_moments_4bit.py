"""The 4-bit moment quantizer (torchao's format), on its own.

GaLoreAdamW8bit and QGaLoreAdamW with 4-bit moments are cells of the optimizer matrix
(``test_matrix_storage.py``, ``test_matrix_fsdp.py``, ``test_matrix_layerwise.py``)."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank_optim.quant.blockwise4bit import (
    BLOCKSIZE4,
    blockwise4_nbytes,
    dequantize_blockwise4,
    quantize_blockwise4,
)


def _max_half_gap(signed: bool) -> float:
    from torchao.optim.subclass_4bit import get_qmap_signed, get_qmap_unsigned

    book = torch.tensor(get_qmap_signed() if signed else get_qmap_unsigned())
    ends = torch.cat([torch.tensor([-1.0 if signed else 0.0]), book, torch.tensor([1.0])])
    # Nearest rounding: at most half of the widest gap, and the whole gap below the first code
    # (the unsigned map has no zero, so values under 1/16 of the absmax round up to it).
    return max(float((book[1:] - book[:-1]).max()) / 2, float(book[0] - ends[0]))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("numel", [1, 127, 128, 1001, 4096])
def test_blockwise4_error_bound_shapes_and_bytes(signed: bool, numel: int) -> None:
    generator = torch.Generator().manual_seed(numel)
    values = torch.randn(numel, generator=generator) * torch.logspace(-3, 1, numel)
    values = values if signed else values.abs()
    codes, absmax = quantize_blockwise4(values.view(1, -1), signed=signed)
    assert codes.dtype == torch.uint8 and codes.numel() == math.ceil(numel / 2)
    assert absmax.dtype == torch.float32 and absmax.numel() == math.ceil(numel / BLOCKSIZE4)
    assert codes.numel() + 4 * absmax.numel() == blockwise4_nbytes(numel)
    restored = dequantize_blockwise4(codes, absmax, (1, numel), signed=signed)
    assert restored.shape == (1, numel)
    scale = absmax.repeat_interleave(BLOCKSIZE4)[:numel]
    error = (restored.view(-1) - values) / scale
    assert float(error.abs().max()) <= _max_half_gap(signed) + 1e-6


def test_blockwise4_is_torchaos_format() -> None:
    """The codes and scales are exactly what torchao's own 4-bit optimizer state stores."""
    from torchao.optim.subclass_4bit import OptimState4bit

    values = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    for signed, data in ((True, values), (False, values.abs())):
        theirs = OptimState4bit.zeros(data.shape, signed=signed, block_size=BLOCKSIZE4)
        theirs.copy_(data)
        codes, absmax = quantize_blockwise4(data, signed=signed)
        torch.testing.assert_close(absmax, theirs.scale, rtol=0, atol=0)
        ours = dequantize_blockwise4(codes, absmax, data.shape, signed=signed)
        torch.testing.assert_close(ours, theirs.dequantize(), rtol=0, atol=0)


def test_blockwise4_bad_inputs_name_the_value() -> None:
    with pytest.raises(ValueError, match="negative values"):
        quantize_blockwise4(torch.tensor([1.0, -2.0]), signed=False)
    with pytest.raises(ValueError, match="floating tensor"):
        quantize_blockwise4(torch.tensor([1, 2]), signed=True)
    codes, absmax = quantize_blockwise4(torch.randn(300), signed=True)
    with pytest.raises(ValueError, match="150 bytes for shape"):
        dequantize_blockwise4(codes[:-1], absmax, (300,), signed=True)
    with pytest.raises(ValueError, match="absmax has 2 blocks, expected 3"):
        dequantize_blockwise4(codes, absmax[:2], (300,), signed=True)
