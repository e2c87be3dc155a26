"""Names of the per-parameter state entries of the low-rank optimizers.

Checkpointed: everything below lives in ``optimizer.state[p]`` as a tensor or a Python int and
is saved by ``state_dict()``. Nothing is rebuilt from Python objects on load, which is why the
state loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

__all__ = [
    "EXP_AVG",
    "EXP_AVG_SQ",
    "LAST_REFRESH",
    "NEXT_REFRESH",
    "REFRESHES",
    "REFRESHES_FAILED",
    "REFRESHES_SKIPPED",
    "REFRESH_GAP",
    "STEP",
]

STEP = "step"  # int: steps taken (a number, as galore-torch keeps it: no tensor bytes)
EXP_AVG = "exp_avg"  # first moment; low-rank shape for projected parameters
EXP_AVG_SQ = "exp_avg_sq"  # second moment; same shape
REFRESH_GAP = "refresh_gap"  # int: current steps between refreshes (adaptive)
NEXT_REFRESH = "next_refresh"  # int: step at which the next refresh happens
LAST_REFRESH = "last_refresh"  # int: step of the last successful refresh (0 = none yet)
REFRESHES = "refreshes"  # int: refreshes done
REFRESHES_SKIPPED = "refreshes_skipped"  # int: base-gap refreshes the adaptive gap saved
REFRESHES_FAILED = "refreshes_failed"  # int: refreshes skipped on a bad gradient or SVD
