"""lowrank_optim: memory-efficient GaLore-family optimizers with WeLore hand-off.

Public API only; each idea lives in its own module (see the README's layout section).
"""

from lowrank_optim.config import HandoffConfig, ProjectionConfig, StabilityConfig
from lowrank_optim.errors import (
    CheckpointMismatchError,
    NonFiniteGradientError,
    SubspaceRefreshError,
)
from lowrank_optim.layerwise import LayerwiseOptimizer
from lowrank_optim.optim import GaLoreAdamW, GaLoreAdamW8bit, QGaLoreAdamW, WeLoreAdamW
from lowrank_optim.projection import available_refresh_methods, register_refresh_method

__all__ = [
    "CheckpointMismatchError",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "HandoffConfig",
    "LayerwiseOptimizer",
    "NonFiniteGradientError",
    "ProjectionConfig",
    "QGaLoreAdamW",
    "StabilityConfig",
    "SubspaceRefreshError",
    "WeLoreAdamW",
    "available_refresh_methods",
    "register_refresh_method",
]
__version__ = "0.1.0"
