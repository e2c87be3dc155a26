"""How Adam moments are stored between steps: full precision, or blockwise 8-bit.

The update math (:mod:`lowrank_optim.moments`) always runs in fp32 on working tensors; a storage
strategy turns the stored state into those tensors (``read``) and back (``write``), so the math
is written once and does not know how its state is kept (the torchao design). State entries are
plain tensors under named keys, so checkpoints load with ``weights_only=True``.

* :class:`FullPrecisionMoments`: ``exp_avg``/``exp_avg_sq`` in the parameter's dtype, as
  ``torch.optim.AdamW`` keeps them (16-bit moments are widened to fp32 for the math).
* :class:`Blockwise8bitMoments`: bitsandbytes' blockwise dynamic quantization (Dettmers et al.,
  "8-bit Optimizers via Block-wise Quantization", ICLR 2022): uint8 codes, one fp32 absmax per
  block of 256, a signed map for the first moment and an unsigned one for the second (or the
  same format through torchao's primitives, ``backend="torchao"``). Tensors
  under 4096 elements stay in full precision: their absmax overhead and quantization error are
  not worth the bytes saved.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch

from lowrank_optim import state_keys as keys

__all__ = ["Blockwise8bitMoments", "FullPrecisionMoments", "MomentStorage"]

EXP_AVG_CODES, EXP_AVG_ABSMAX = "exp_avg_codes", "exp_avg_absmax"
EXP_AVG_SQ_CODES, EXP_AVG_SQ_ABSMAX = "exp_avg_sq_codes", "exp_avg_sq_absmax"
MOMENT_SHAPE = "moment_shape"


def _as_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """16-bit tensors as fp32 copies; wider ones as they are (no copy)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


class MomentStorage(ABC):
    """Stores one parameter's first and second moments in its optimizer state."""

    #: State keys whose dtype is fixed by design (kept as saved when a checkpoint loads).
    fixed_dtype_keys: frozenset[str] = frozenset()
    #: Whether the moments are plain tensors under ``exp_avg``/``exp_avg_sq`` that torch's fused
    #: AdamW kernel may update in place (see :func:`lowrank_optim.moments.fused_adamw_`).
    plain_tensors: bool = False

    @abstractmethod
    def init(self, state: dict[str, Any], shape: tuple[int, ...], like: torch.Tensor) -> None:
        """Zero moments of ``shape`` for a parameter like ``like``."""

    @abstractmethod
    def read(self, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exp_avg, exp_avg_sq)`` as fp32-or-wider working tensors."""

    @abstractmethod
    def write(self, state: dict[str, Any], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        """Store working tensors back (a no-op when ``read`` returned the stored tensors)."""

    @abstractmethod
    def numel(self, state: dict[str, Any]) -> int:
        """Elements in one moment (for checking a checkpoint against the parameter)."""


class FullPrecisionMoments(MomentStorage):
    plain_tensors = True

    def init(self, state: dict[str, Any], shape: tuple[int, ...], like: torch.Tensor) -> None:
        state[keys.EXP_AVG] = like.new_zeros(shape)
        state[keys.EXP_AVG_SQ] = like.new_zeros(shape)

    def read(self, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return _as_fp32(state[keys.EXP_AVG]), _as_fp32(state[keys.EXP_AVG_SQ])

    def write(self, state: dict[str, Any], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        for key, value in ((keys.EXP_AVG, exp_avg), (keys.EXP_AVG_SQ, exp_avg_sq)):
            if state[key] is not value:
                state[key].copy_(value)

    def numel(self, state: dict[str, Any]) -> int:
        return state[keys.EXP_AVG].numel()


class Blockwise8bitMoments(MomentStorage):
    fixed_dtype_keys = frozenset({EXP_AVG_ABSMAX, EXP_AVG_SQ_ABSMAX})

    def __init__(self, backend: str = "bitsandbytes") -> None:
        from lowrank_optim.quant import BACKENDS, MIN_QUANTIZED_NUMEL

        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}; allowed: {', '.join(BACKENDS)}")
        self.backend = backend
        self.min_numel = MIN_QUANTIZED_NUMEL
        self._full = FullPrecisionMoments()

    def _quantized(self, state: dict[str, Any]) -> bool:
        return EXP_AVG_CODES in state

    def init(self, state: dict[str, Any], shape: tuple[int, ...], like: torch.Tensor) -> None:
        if math.prod(shape) < self.min_numel:
            self._full.init(state, shape, like)
            return
        state[MOMENT_SHAPE] = torch.tensor(shape, dtype=torch.int64)
        zeros = torch.zeros(shape, dtype=torch.float32, device=like.device)
        self.write(state, zeros, zeros)

    def read(self, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._quantized(state):
            return self._full.read(state)
        from lowrank_optim.quant import dequantize_blockwise8

        shape = tuple(int(d) for d in state[MOMENT_SHAPE])
        exp_avg = dequantize_blockwise8(
            state[EXP_AVG_CODES], state[EXP_AVG_ABSMAX], shape, signed=True, backend=self.backend
        )
        exp_avg_sq = dequantize_blockwise8(
            state[EXP_AVG_SQ_CODES],
            state[EXP_AVG_SQ_ABSMAX],
            shape,
            signed=False,
            backend=self.backend,
        )
        return exp_avg, exp_avg_sq

    def write(self, state: dict[str, Any], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        if keys.EXP_AVG in state:
            self._full.write(state, exp_avg, exp_avg_sq)
            return
        from lowrank_optim.quant import quantize_blockwise8

        state[EXP_AVG_CODES], state[EXP_AVG_ABSMAX] = quantize_blockwise8(
            exp_avg.float(), signed=True, backend=self.backend
        )
        # Rounding can leave -0.0 or tiny negatives after a rotation; the unsigned map needs >= 0.
        state[EXP_AVG_SQ_CODES], state[EXP_AVG_SQ_ABSMAX] = quantize_blockwise8(
            exp_avg_sq.float().clamp_min(0.0), signed=False, backend=self.backend
        )

    def numel(self, state: dict[str, Any]) -> int:
        if not self._quantized(state):
            return self._full.numel(state)
        return math.prod(int(d) for d in state[MOMENT_SHAPE])
