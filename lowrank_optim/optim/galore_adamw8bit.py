"""GaLoreAdamW8bit: GaLoreAdamW with its Adam moments kept in blockwise 8-bit form.

Combines GaLore's low-rank projection (Zhao et al., ICML 2024) with 8-bit optimizer states
(Dettmers et al., ICLR 2022), as galore-torch's ``GaLoreAdamW8bit`` does, but through
bitsandbytes' functional quantization with keyword arguments (bitsandbytes 0.50 reordered the
positional ones, which silently stopped galore-torch's 8-bit updates) and on CPU as well as CUDA.
The update math runs in fp32; only storage is 8-bit. Moments of fewer than 4096 elements stay in
full precision. Everything else (projection, refresh, stability, checkpoints) is GaLoreAdamW's.
"""

from __future__ import annotations

from lowrank_optim.moment_storage import Blockwise8bitMoments, MomentStorage
from lowrank_optim.optim.galore_adamw import GaLoreAdamW

__all__ = ["GaLoreAdamW8bit"]


class GaLoreAdamW8bit(GaLoreAdamW):
    """:class:`GaLoreAdamW` whose moments (low-rank and dense alike) are stored in 8 bits."""

    moment_storage: MomentStorage = Blockwise8bitMoments()
