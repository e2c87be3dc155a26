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
* :class:`Blockwise4bitMoments`: torchao's 4-bit states (Li et al., NeurIPS 2023): packed 4-bit
  codes, one fp32 absmax per block of 128, a dynamic-exponent map for the first moment and a
  linear map without zero for the second; same small-tensor rule.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from lowrank_optim import state_keys as keys
from lowrank_optim.quant.blockwise4bit import BLOCKSIZE4
from lowrank_optim.quant.blockwise8bit import BACKENDS, BLOCKSIZE, MIN_QUANTIZED_NUMEL
from lowrank_optim.state_keys import (
    EXP_AVG_ABSMAX,
    EXP_AVG_CODES,
    EXP_AVG_SQ_ABSMAX,
    EXP_AVG_SQ_CODES,
    MOMENT_SHAPE,
)

__all__ = [
    "EXP_AVG_ABSMAX",
    "EXP_AVG_CODES",
    "EXP_AVG_SQ_ABSMAX",
    "EXP_AVG_SQ_CODES",
    "FULL",
    "MISSING",
    "MOMENT_SHAPE",
    "QUANTIZED",
    "WORKING_CHUNK",
    "Blockwise4bitMoments",
    "Blockwise8bitMoments",
    "FullPrecisionMoments",
    "MomentStorage",
    "as_fp32",
    "stored_layout",
]

#: Elements of a moment widened to fp32 at once when it is updated or initialized in ranges
#: (4 MiB of fp32): bounds the working copies of quantized and 16-bit moments.
WORKING_CHUNK = 1 << 20

#: How a checkpoint's state entry holds its moments, by the keys present (see ``stored_layout``).
FULL, QUANTIZED, MISSING = "full", "quantized", "missing"
_LAYOUT_DESCRIPTIONS = {
    FULL: f"full-precision moments ({keys.EXP_AVG}, {keys.EXP_AVG_SQ})",
    QUANTIZED: f"quantized moments ({EXP_AVG_CODES}, {EXP_AVG_ABSMAX}, ...)",
    MISSING: "no moments",
}


def stored_layout(entry: Mapping[str, Any]) -> str:
    """``FULL``, ``QUANTIZED`` or ``MISSING``: how ``entry`` (one parameter's state) keeps its
    moments, read from its keys alone (a checkpoint says nothing else about its storage)."""
    if EXP_AVG_CODES in entry:
        return QUANTIZED
    if keys.EXP_AVG in entry and keys.EXP_AVG_SQ in entry:
        return FULL
    return MISSING


def as_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """16-bit tensors as fp32 copies; wider ones as they are (no copy)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _store_(stored: torch.Tensor, value: torch.Tensor) -> None:
    """``stored.copy_(value)``, saturating at fp16's largest finite value (65504).

    fp32 working moments beyond fp16's range (a second moment of low-rank coordinates of a
    large gradient) would otherwise be stored as Inf: the denominator then becomes Inf, the
    parameter silently stops moving, and a later rotation turns ``Inf * 0`` into NaN.
    """
    if stored.dtype == torch.float16 and value.dtype != torch.float16:
        limit = torch.finfo(torch.float16).max
        value = value.clamp(-limit, limit)
    stored.copy_(value)


class MomentStorage(ABC):
    """Stores one parameter's first and second moments in its optimizer state."""

    #: State keys whose dtype is fixed by design (kept as saved when a checkpoint loads).
    fixed_dtype_keys: frozenset[str] = frozenset()
    #: Whether the moments are plain tensors under ``exp_avg``/``exp_avg_sq`` that torch's fused
    #: AdamW kernel may update in place (see :func:`lowrank_optim.moments.fused_adamw_`).
    plain_tensors: bool = False
    #: Whether moments of ``min_numel`` values or more are kept as codes of ``bits`` bits with
    #: one fp32 absmax per ``block_size`` values (smaller ones in full precision). The three
    #: are ``None`` for a storage that never quantizes.
    quantized: bool = False
    bits: int | None = None
    block_size: int | None = None
    min_numel: int | None = None

    #: Every state key this storage may write (the moment entries of ``state_keys``).
    state_keys: frozenset[str] = frozenset({keys.EXP_AVG, keys.EXP_AVG_SQ})
    #: Entries holding flat codes and per-block absmax values of quantized moments (if any).
    code_keys: frozenset[str] = frozenset()
    absmax_keys: frozenset[str] = frozenset()

    def quantizes(self, numel: int) -> bool:
        """Whether a moment of ``numel`` values is kept quantized (``min_numel`` or more)."""
        return self.quantized and self.min_numel is not None and numel >= self.min_numel

    def holds_quantized(self, state: Mapping[str, Any]) -> bool:
        """Whether ``state`` (written by this storage) holds its moments as codes."""
        return False

    @abstractmethod
    def init(
        self,
        state: dict[str, Any],
        shape: tuple[int, ...],
        like: torch.Tensor,
        total_numel: int | None = None,
    ) -> None:
        """Zero moments of ``shape`` for a parameter like ``like``.

        ``total_numel``: values of the whole moment when ``shape`` is one shard of it (FSDP2
        rows). Whether to quantize is decided on the whole moment, so that every rank keeps the
        same state keys (a shard can be small when the tensor is not), which DCP needs.
        """

    @abstractmethod
    def read(self, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exp_avg, exp_avg_sq)`` as fp32-or-wider working tensors."""

    @abstractmethod
    def write(self, state: dict[str, Any], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        """Store working tensors back (a no-op when ``read`` returned the stored tensors)."""

    @abstractmethod
    def numel(self, state: dict[str, Any]) -> int:
        """Elements in one moment (for checking a checkpoint against the parameter)."""

    def moment_shape(self, state: Mapping[str, Any]) -> tuple[int, ...] | None:
        """The shape of one moment in ``state`` (``None``: it holds none), for checking a
        checkpoint against the parameter: counts alone let a 48 x 8 moment load into 8 x 48."""
        if self.holds_quantized(state):
            return tuple(int(d) for d in state[MOMENT_SHAPE])
        moment = state.get(keys.EXP_AVG)
        return None if moment is None else tuple(moment.shape)

    def expected_layouts(self, numel: int | None) -> frozenset[str]:
        """Layouts (``FULL``/``QUANTIZED``) this storage keeps moments of ``numel`` values in
        (``numel=None``: not known here, e.g. a sharded parameter's local size)."""
        return frozenset({FULL})

    def layout_problem(self, entry: Mapping[str, Any], numel: int | None) -> str | None:
        """Why a checkpoint's state ``entry`` cannot hold this storage's moments of ``numel``
        values, or ``None`` if it can.

        Catches a state saved by an optimizer with another moment storage (an 8-bit state in
        :class:`GaLoreAdamW`, a full-precision one in ``GaLoreAdamW8bit``), which would otherwise
        load silently and fail later (``KeyError: 'exp_avg'``) or train on in the wrong form.
        """
        found = stored_layout(entry)
        expected = self.expected_layouts(numel)
        if found in expected:
            return None
        wanted = " or ".join(_LAYOUT_DESCRIPTIONS[layout] for layout in sorted(expected))
        moment_keys = ", ".join(sorted(key for key in entry if key.startswith(keys.EXP_AVG)))
        return (
            f"holds {_LAYOUT_DESCRIPTIONS[found]} (state keys: {moment_keys or 'none'}); "
            f"this optimizer ({type(self).__name__}) stores {wanted}"
            + ("" if numel is None else f" for a moment of {numel} values")
        )

    # Element ranges: a large moment is updated a chunk at a time, so the fp32 working copies
    # of 16-bit or quantized moments never hold more than one chunk (bitsandbytes' kernels
    # likewise work block by block). Ranges index the flattened moment.
    def ranges(self, state: dict[str, Any], numel: int, chunk: int) -> list[tuple[int, int]]:
        """``[start, stop)`` ranges of at most about ``chunk`` elements covering ``numel``."""
        return [(start, min(start + chunk, numel)) for start in range(0, numel, chunk)]

    @abstractmethod
    def read_range(
        self, state: dict[str, Any], start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat fp32-or-wider working copies of elements ``[start, stop)`` of both moments."""

    @abstractmethod
    def write_range(
        self,
        state: dict[str, Any],
        start: int,
        stop: int,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
    ) -> None:
        """Store elements ``[start, stop)`` of both moments back."""


class FullPrecisionMoments(MomentStorage):
    plain_tensors = True

    def init(
        self,
        state: dict[str, Any],
        shape: tuple[int, ...],
        like: torch.Tensor,
        total_numel: int | None = None,
    ) -> None:
        state[keys.EXP_AVG] = like.new_zeros(shape)
        state[keys.EXP_AVG_SQ] = like.new_zeros(shape)

    def read(self, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return as_fp32(state[keys.EXP_AVG]), as_fp32(state[keys.EXP_AVG_SQ])

    def write(self, state: dict[str, Any], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        for key, value in ((keys.EXP_AVG, exp_avg), (keys.EXP_AVG_SQ, exp_avg_sq)):
            if state[key] is not value:
                _store_(state[key], value)

    def numel(self, state: dict[str, Any]) -> int:
        return state[keys.EXP_AVG].numel()

    def read_range(
        self, state: dict[str, Any], start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(  # type: ignore[return-value]
            as_fp32(state[key].view(-1)[start:stop]) for key in (keys.EXP_AVG, keys.EXP_AVG_SQ)
        )

    def write_range(
        self,
        state: dict[str, Any],
        start: int,
        stop: int,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
    ) -> None:
        for key, value in ((keys.EXP_AVG, exp_avg), (keys.EXP_AVG_SQ, exp_avg_sq)):
            stored = state[key].view(-1)[start:stop]
            if stored.data_ptr() != value.data_ptr() or stored.dtype != value.dtype:
                _store_(stored, value)


class Blockwise8bitMoments(MomentStorage):
    fixed_dtype_keys = frozenset({EXP_AVG_ABSMAX, EXP_AVG_SQ_ABSMAX})
    state_keys = frozenset(
        {
            keys.EXP_AVG,
            keys.EXP_AVG_SQ,
            EXP_AVG_CODES,
            EXP_AVG_ABSMAX,
            EXP_AVG_SQ_CODES,
            EXP_AVG_SQ_ABSMAX,
            MOMENT_SHAPE,
        }
    )
    code_keys = frozenset({EXP_AVG_CODES, EXP_AVG_SQ_CODES})
    absmax_keys = frozenset({EXP_AVG_ABSMAX, EXP_AVG_SQ_ABSMAX})
    quantized = True
    #: Bits per stored value (how many code bytes a moment of ``n`` values needs).
    bits = 8
    #: Values per quantization block (each has its own absmax); ranges start on block bounds.
    block_size = BLOCKSIZE
    min_numel = MIN_QUANTIZED_NUMEL

    def __init__(self, backend: str = "bitsandbytes") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}; allowed: {', '.join(BACKENDS)}")
        self.backend = backend
        self._full = FullPrecisionMoments()

    def code_bytes(self, numel: int) -> int:
        """Bytes of codes of one quantized moment of ``numel`` values."""
        return math.ceil(numel * self.bits / 8)

    def absmax_blocks(self, numel: int) -> int:
        """Absmax entries (blocks) of one quantized moment of ``numel`` values."""
        return math.ceil(numel / self.block_size)

    # -- the quantizer: 8-bit dynamic map (bitsandbytes or torchao); 4-bit overrides these
    def _quantize(self, values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from lowrank_optim.quant import quantize_blockwise8

        return quantize_blockwise8(values, signed=signed, backend=self.backend)

    def _dequantize(
        self, codes: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], signed: bool
    ) -> torch.Tensor:
        from lowrank_optim.quant import dequantize_blockwise8

        return dequantize_blockwise8(codes, absmax, shape, signed=signed, backend=self.backend)

    def holds_quantized(self, state: Mapping[str, Any]) -> bool:
        return EXP_AVG_CODES in state

    def expected_layouts(self, numel: int | None) -> frozenset[str]:
        """Quantized from ``min_numel`` values on, full precision below (see ``init``)."""
        if numel is None:
            return frozenset({FULL, QUANTIZED})
        return frozenset({FULL if numel < self.min_numel else QUANTIZED})

    def init(
        self,
        state: dict[str, Any],
        shape: tuple[int, ...],
        like: torch.Tensor,
        total_numel: int | None = None,
    ) -> None:
        numel = math.prod(shape)
        if not self.quantizes(numel if total_numel is None else total_numel):
            self._full.init(state, shape, like)
            return
        state[MOMENT_SHAPE] = torch.tensor(shape, dtype=torch.int64)
        code_bytes, blocks = self.code_bytes(numel), self.absmax_blocks(numel)
        for codes_key, absmax_key in (
            (EXP_AVG_CODES, EXP_AVG_ABSMAX),
            (EXP_AVG_SQ_CODES, EXP_AVG_SQ_ABSMAX),
        ):
            state[codes_key] = torch.empty(code_bytes, dtype=torch.uint8, device=like.device)
            state[absmax_key] = torch.empty(blocks, dtype=torch.float32, device=like.device)
        # Quantized zeros, a chunk at a time: a quantizer's temporaries (int64 codes in torchao's
        # 4-bit search) would otherwise be several times the size of an embedding's moments.
        zeros = torch.zeros(min(numel, WORKING_CHUNK), dtype=torch.float32, device=like.device)
        for start, stop in self.ranges(state, numel, WORKING_CHUNK):
            self.write_range(state, start, stop, zeros[: stop - start], zeros[: stop - start])

    def read(self, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.holds_quantized(state):
            return self._full.read(state)
        shape = tuple(int(d) for d in state[MOMENT_SHAPE])
        exp_avg, exp_avg_sq = self.read_range(state, 0, math.prod(shape))
        return exp_avg.view(shape), exp_avg_sq.view(shape)

    def write(self, state: dict[str, Any], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        if not self.holds_quantized(state):
            self._full.write(state, exp_avg, exp_avg_sq)
            return
        state[EXP_AVG_CODES], state[EXP_AVG_ABSMAX] = self._quantize(exp_avg.float(), True)
        # Rounding can leave -0.0 or tiny negatives after a rotation; the unsigned map needs >= 0.
        state[EXP_AVG_SQ_CODES], state[EXP_AVG_SQ_ABSMAX] = self._quantize(
            exp_avg_sq.float().clamp_min(0.0), False
        )

    def numel(self, state: dict[str, Any]) -> int:
        if not self.holds_quantized(state):
            return self._full.numel(state)
        shape = tuple(int(d) for d in state[MOMENT_SHAPE])
        numel = math.prod(shape)
        stored = state[EXP_AVG_CODES].numel()
        expected = self.code_bytes(numel)
        if keys.WORLD_SIZE in state:  # FSDP2 row shards: flat codes are padded per rank
            from lowrank_optim.distributed.sharding import global_code_bytes

            expected = global_code_bytes(self, shape, int(state[keys.WORLD_SIZE]))
        if stored != expected:
            from lowrank_optim.errors import CheckpointMismatchError

            raise CheckpointMismatchError(
                f"Checkpoint moments hold {stored} code bytes for {numel} values, i.e. they were "
                f"saved with {round(8 * stored / max(numel, 1))}-bit moments; this optimizer "
                f"stores {self.bits}-bit moments"
            )
        return numel

    def ranges(self, state: dict[str, Any], numel: int, chunk: int) -> list[tuple[int, int]]:
        if not self.holds_quantized(state):
            return self._full.ranges(state, numel, chunk)
        # Whole blocks only: a block's absmax is computed over the block.
        aligned = max(chunk // self.block_size, 1) * self.block_size
        return super().ranges(state, numel, aligned)

    def _slices(self, start: int, stop: int) -> tuple[slice, slice]:
        """Slices of the codes and of the absmax that hold elements ``[start, stop)``."""
        codes = slice(start * self.bits // 8, math.ceil(stop * self.bits / 8))
        blocks = slice(start // self.block_size, math.ceil(stop / self.block_size))
        return codes, blocks

    def read_range(
        self, state: dict[str, Any], start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.holds_quantized(state):
            return self._full.read_range(state, start, stop)
        codes, blocks = self._slices(start, stop)
        return (
            self._dequantize(
                state[EXP_AVG_CODES][codes], state[EXP_AVG_ABSMAX][blocks], (stop - start,), True
            ),
            self._dequantize(
                state[EXP_AVG_SQ_CODES][codes],
                state[EXP_AVG_SQ_ABSMAX][blocks],
                (stop - start,),
                False,
            ),
        )

    def write_range(
        self,
        state: dict[str, Any],
        start: int,
        stop: int,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
    ) -> None:
        if not self.holds_quantized(state):
            self._full.write_range(state, start, stop, exp_avg, exp_avg_sq)
            return
        codes, blocks = self._slices(start, stop)
        for (codes_key, absmax_key), value, signed in (
            ((EXP_AVG_CODES, EXP_AVG_ABSMAX), exp_avg.float(), True),
            ((EXP_AVG_SQ_CODES, EXP_AVG_SQ_ABSMAX), exp_avg_sq.float().clamp_min(0.0), False),
        ):
            new_codes, new_absmax = self._quantize(value, signed)
            state[codes_key][codes].copy_(new_codes)
            state[absmax_key][blocks].copy_(new_absmax)


class Blockwise4bitMoments(Blockwise8bitMoments):
    """Moments in 4 bits through torchao (:mod:`lowrank_optim.quant.blockwise4bit`)."""

    bits = 4
    block_size = BLOCKSIZE4

    def __init__(self) -> None:
        super().__init__("torchao")

    def _quantize(self, values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from lowrank_optim.quant.blockwise4bit import quantize_blockwise4

        return quantize_blockwise4(values, signed=signed)

    def _dequantize(
        self, codes: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], signed: bool
    ) -> torch.Tensor:
        from lowrank_optim.quant.blockwise4bit import dequantize_blockwise4

        return dequantize_blockwise4(codes, absmax, shape, signed=signed)
