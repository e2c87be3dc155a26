"""The optimizer classes: thin shells that compose projection, moments and stability."""

from lowrank_optim.optim.galore_adamw import GaLoreAdamW

__all__ = ["GaLoreAdamW"]
