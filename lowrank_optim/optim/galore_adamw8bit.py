"""GaLoreAdamW8bit: GaLoreAdamW with its Adam moments kept in blockwise 8-bit form.

Combines GaLore's low-rank projection (Zhao et al., ICML 2024) with 8-bit optimizer states
(Dettmers et al., ICLR 2022), as galore-torch's ``GaLoreAdamW8bit`` does, but through
bitsandbytes' functional quantization with keyword arguments (bitsandbytes 0.50 reordered the
positional ones, which silently stopped galore-torch's 8-bit updates) or torchao's 8-bit
optimizer primitives, on CPU as well as CUDA. The update math runs in fp32; only storage is
8-bit. Moments of fewer than 4096 elements stay in full precision. Everything else (projection,
refresh, stability, checkpoints) is GaLoreAdamW's.

``moment_bits=4`` stores them in 4 bits instead, with torchao's 4-bit optimizer-state format (Li
et al., "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023): half the moment bytes
again, for the embedding and output layers that GaLore leaves dense and that dominate the state
of small models.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lowrank_optim.moment_storage import (
    Blockwise4bitMoments,
    Blockwise8bitMoments,
    MomentStorage,
)
from lowrank_optim.optim.galore_adamw import GaLoreAdamW

__all__ = ["MOMENT_BITS", "GaLoreAdamW8bit", "moment_storage_for"]

#: Bits per stored moment value that the quantized optimizers offer.
MOMENT_BITS = (8, 4)


def moment_storage_for(moment_bits: int, quant_backend: str) -> MomentStorage:
    """The blockwise moment storage of ``moment_bits`` bits (4-bit states come from torchao)."""
    if moment_bits not in MOMENT_BITS:
        raise ValueError(f"Invalid moment_bits: {moment_bits!r}; allowed: 8, 4")
    if moment_bits == 4:
        if quant_backend != "torchao":
            raise ValueError(
                f"Invalid quant_backend for 4-bit moments: {quant_backend!r}; allowed: torchao "
                "(bitsandbytes has no 4-bit optimizer-state format)"
            )
        return Blockwise4bitMoments()
    return Blockwise8bitMoments(quant_backend)


class GaLoreAdamW8bit(GaLoreAdamW):
    """:class:`GaLoreAdamW` whose moments (low-rank and dense alike) are stored in 8 bits.

    Args:
        params, lr, betas, eps, weight_decay, projection, stability, on_bad_gradient: as
            :class:`GaLoreAdamW`.
        quant_backend: ``bitsandbytes`` (default for 8 bits) or ``torchao``. Both write the
            same 8-bit format (the same dynamic map, uint8 codes, fp32 absmax per block of 256),
            so a checkpoint written with one loads with the other. 4-bit moments are torchao's.
        moment_bits: 8 (default) or 4.
    """

    moment_storage: MomentStorage = Blockwise8bitMoments()

    def __init__(
        self,
        params: Iterable[Any],
        *args: Any,
        quant_backend: str | None = None,
        moment_bits: int = 8,
        **kwargs: Any,
    ) -> None:
        # Validated before the param groups are built, so a bad backend fails first.
        backend = quant_backend or ("torchao" if moment_bits == 4 else "bitsandbytes")
        self.moment_storage = moment_storage_for(moment_bits, backend)
        super().__init__(params, *args, **kwargs)
