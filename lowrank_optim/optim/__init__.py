"""The optimizer classes: thin shells that compose projection, moments and stability."""

from lowrank_optim.optim.galore_adamw import GaLoreAdamW
from lowrank_optim.optim.galore_adamw8bit import GaLoreAdamW8bit
from lowrank_optim.optim.qgalore_adamw import QGaLoreAdamW
from lowrank_optim.optim.welore_adamw import WeLoreAdamW

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "QGaLoreAdamW", "WeLoreAdamW"]
