"""Every per-parameter state entry of the low-rank optimizers, declared once.

Each key is either *checkpointed* (saved by ``state_dict()`` and read back as it is) or
*rebuilt* (recomputed from checkpointed entries after a load; none today). Every entry is a
tensor, a Python number or a list of floats, never a Python object, which is why the state
loads with ``torch.load(weights_only=True)`` (the Distributed Shampoo split into checkpointed
and rebuilt keys).

Modules that own a key's meaning re-export it (``stability.OVERLAP_HISTORY``,
``projection.LEFT``, ``moment_storage.EXP_AVG_CODES``); the string lives only here.
"""

from __future__ import annotations

__all__ = [
    "BASIS_PARTS",
    "CHECKPOINTED",
    "ENERGY_HISTORY",
    "EXP_AVG",
    "EXP_AVG_ABSMAX",
    "EXP_AVG_CODES",
    "EXP_AVG_SQ",
    "EXP_AVG_SQ_ABSMAX",
    "EXP_AVG_SQ_CODES",
    "GROWTHS_PENDING",
    "HANDOFF_STEP",
    "LR_MULTIPLIER",
    "LAST_REFRESH",
    "LEADING_HISTORY",
    "LEFT",
    "MOMENT_SHAPE",
    "NEXT_REFRESH",
    "OVERLAP_HISTORY",
    "REBUILT",
    "REFRESHES",
    "REFRESHES_FAILED",
    "REFRESHES_SKIPPED",
    "REFRESH_GAP",
    "RIGHT",
    "STABLE_SINCE",
    "STABLE_STREAK",
    "STEP",
    "WORLD_SIZE",
    "basis_part",
]

# -- the step and the refresh schedule (optimizer core)
STEP = "step"  # int: steps taken (a number, as galore-torch keeps it: no tensor bytes)
REFRESH_GAP = "refresh_gap"  # int: current steps between refreshes (adaptive)
NEXT_REFRESH = "next_refresh"  # int: step at which the next refresh happens
LAST_REFRESH = "last_refresh"  # int: step of the last successful refresh (0 = none yet)
REFRESHES = "refreshes"  # int: refreshes done
REFRESHES_SKIPPED = "refreshes_skipped"  # int: base-gap refreshes the adaptive gap saved
REFRESHES_FAILED = "refreshes_failed"  # int: refreshes skipped on a bad gradient or SVD

# -- Adam moments (moment_storage): plain tensors, or blockwise codes of a storage that quantizes
EXP_AVG = "exp_avg"  # first moment; low-rank shape for projected parameters
EXP_AVG_SQ = "exp_avg_sq"  # second moment; same shape
EXP_AVG_CODES = "exp_avg_codes"  # uint8: quantized first moment (8 or 4 bits per value)
EXP_AVG_ABSMAX = "exp_avg_absmax"  # fp32: one absmax per quantization block
EXP_AVG_SQ_CODES = "exp_avg_sq_codes"
EXP_AVG_SQ_ABSMAX = "exp_avg_sq_absmax"
MOMENT_SHAPE = "moment_shape"  # int64: logical shape of quantized moments

# -- projection bases (basis_storage): the basis itself, or its group-wise 4/8-bit parts
LEFT = "basis_left"  # m x r basis P (G -> P^T G)
RIGHT = "basis_right"  # n x r basis Q (G -> G Q)
#: Suffixes of a quantized basis's entries: ``f"{LEFT}_{part}"`` (codes, fp32 scale/offset,
#: int64 shape).
BASIS_PARTS = ("codes", "scale", "offset", "shape")

# -- stability metrics (stability)
OVERLAP_HISTORY = "overlap_history"  # list[float]: overlap at each refresh after the first
ENERGY_HISTORY = "energy_history"  # list[float]: energy of the first gradient after a refresh
LEADING_HISTORY = "leading_similarity_history"  # list[float]: Q-GaLore's signal per refresh
STABLE_STREAK = "stable_streak"  # int: consecutive refreshes below the overlap threshold
STABLE_SINCE = "stable_since"  # int: step the layer became stable (0 = not stable)
GROWTHS_PENDING = "refreshes_since_growth"  # int: Q-GaLore policy's refreshes since a growth

# -- placement (distributed.placement) and hand-off (WeLoreAdamW)
WORLD_SIZE = "fsdp_world_size"  # int: ranks the FSDP2-sharded state was laid out for
HANDOFF_STEP = "handoff_step"  # int: step count a factor's state started from at its hand-off
LR_MULTIPLIER = "lr_multiplier"  # float: a factor's own multiplier on its group's lr


def basis_part(key: str, part: str) -> str:
    """The state key of one part (``BASIS_PARTS``) of the quantized basis ``key``."""
    return f"{key}_{part}"


#: Keys saved by ``state_dict()`` and loaded back as they are.
CHECKPOINTED = frozenset(
    {
        STEP,
        REFRESH_GAP,
        NEXT_REFRESH,
        LAST_REFRESH,
        REFRESHES,
        REFRESHES_SKIPPED,
        REFRESHES_FAILED,
        EXP_AVG,
        EXP_AVG_SQ,
        EXP_AVG_CODES,
        EXP_AVG_ABSMAX,
        EXP_AVG_SQ_CODES,
        EXP_AVG_SQ_ABSMAX,
        MOMENT_SHAPE,
        LEFT,
        RIGHT,
        *(basis_part(side, part) for side in (LEFT, RIGHT) for part in BASIS_PARTS),
        OVERLAP_HISTORY,
        ENERGY_HISTORY,
        LEADING_HISTORY,
        STABLE_STREAK,
        STABLE_SINCE,
        GROWTHS_PENDING,
        WORLD_SIZE,
        HANDOFF_STEP,
        LR_MULTIPLIER,
    }
)
#: Keys recomputed after a load instead of saved (none: every entry is checkpointed).
REBUILT: frozenset[str] = frozenset()
