"""Per-parameter storage rules of every optimizer the memory estimate knows.

Each rule maps one parameter (:class:`ParamSpec`) and a GaLore rank to ``(component, bytes)``
rows, written from the implementation's own allocation code (see :mod:`.estimate` for the
formulas and the papers). ``tests/test_memory.py`` checks every rule against a real optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowrank_optim.projection import effective_rank, low_rank_shape, resolve_sides
from lowrank_optim.quant.blockwise4bit import BLOCKSIZE4
from lowrank_optim.quant.blockwise8bit import BLOCKSIZE, MIN_QUANTIZED_NUMEL

__all__ = [
    "BASIS_GROUP",
    "BNB_BLOCKSIZE",
    "BNB_CODEBOOK_BYTES",
    "ESTIMATE_METHODS",
    "MIN_QUANTIZED",
    "TORCHAO_BLOCKSIZE",
    "WEIGHT_GROUP",
    "ParamSpec",
    "Rows",
    "int8_weight",
]

# Our own storage facts come from the code that allocates the state (quant.blockwise8bit's
# BLOCKSIZE and MIN_QUANTIZED_NUMEL, quant.blockwise4bit's BLOCKSIZE4). Two of ours are not
# named constants there yet, only defaults:
#: Values per quantization group of a 4/8-bit projection basis (``basis_storage``'s group).
BASIS_GROUP = 256
#: Inputs per fp32 scale of an INT8 weight (``QuantizedLinear``'s default ``group_size``).
WEIGHT_GROUP = 256

# The peers' facts, which only their code defines (the tests check them against it).
#: bitsandbytes' 8-bit optimizers: values per fp32 absmax of a moment.
BNB_BLOCKSIZE = 256
#: torchao's AdamW8bit / AdamW4bit: values per fp32 scale, by bits.
TORCHAO_BLOCKSIZE = {8: 256, 4: 128}
#: bitsandbytes' ``min_8bit_size`` and torchao's default: smaller states stay unquantized.
MIN_QUANTIZED = 4096
#: bitsandbytes' two code books (signed, unsigned) of 2**8 fp32 entries, shared by all states.
BNB_CODEBOOK_BYTES = 2 * 2**8 * 4
_STEP = 4  # torch.optim-style fp32 scalar step tensor (ours keep an int: no tensor bytes)
_SHAPE_ENTRY = 8  # int64 entries of stored shapes


@dataclass(frozen=True)
class ParamSpec:
    """One parameter or buffer: name, shape, dtype, and whether GaLore projects it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    projected: bool = False
    buffer: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def esize(self) -> int:
        return torch.empty((), dtype=self.dtype, device="meta").element_size()


# ----------------------------------------------------------------------- storage rules
Rows = list[tuple[str, int]]


def _low_rank(spec: ParamSpec, rank: int, clip: bool = True) -> tuple[int, int]:
    """``(moment numel, basis numel)`` under galore-torch's ``std`` side choice."""
    r = effective_rank(rank, spec.shape) if clip else rank
    moments = math.prod(low_rank_shape("std", spec.shape, r))
    uses_left, _ = resolve_sides("std", spec.shape)
    return moments, (spec.shape[0] if uses_left else spec.shape[1]) * r


def _full(numel: int, esize: int) -> Rows:
    return [("moments", 2 * numel * esize)]


def _ours_8bit(numel: int, ndim: int, esize: int) -> Rows:
    if numel < MIN_QUANTIZED_NUMEL:
        return _full(numel, esize)
    blocks = math.ceil(numel / BLOCKSIZE)
    return [("moments", 2 * numel), ("moment_meta", 2 * 4 * blocks + _SHAPE_ENTRY * ndim)]


def _ours_4bit(numel: int, ndim: int, esize: int) -> Rows:
    if numel < MIN_QUANTIZED_NUMEL:
        return _full(numel, esize)
    meta = 2 * 4 * math.ceil(numel / BLOCKSIZE4) + _SHAPE_ENTRY * ndim
    return [("moments", 2 * math.ceil(numel / 2)), ("moment_meta", meta)]


_OUR_MOMENTS = {"8bit": _ours_8bit, "4bit": _ours_4bit}


def _ours(storage: str, bits: int | None) -> Callable[..., Rows]:
    """Our optimizers: int steps and host-side metric histories add no tensor bytes."""

    def rows(spec: ParamSpec, rank: int) -> Rows:
        def moments(numel: int, ndim: int) -> Rows:
            if storage == "full":
                return _full(numel, spec.esize)
            return _OUR_MOMENTS[storage](numel, ndim, spec.esize)

        if not spec.projected:
            return moments(spec.numel, len(spec.shape))
        low, basis = _low_rank(spec, rank)
        out = moments(low, 2)
        if bits is None:
            return [*out, ("projection", basis * spec.esize)]
        codes = math.ceil(basis / 2) if bits == 4 else basis
        meta = 8 * math.ceil(basis / BASIS_GROUP) + 2 * _SHAPE_ENTRY
        return [*out, ("projection", codes), ("projection_meta", meta)]

    return rows


def _adamw(spec: ParamSpec, rank: int) -> Rows:
    return [("state_other", _STEP), *_full(spec.numel, spec.esize)]


def _bnb(spec: ParamSpec, rank: int) -> Rows:
    if spec.numel < MIN_QUANTIZED:
        return _full(spec.numel, 4)  # bitsandbytes keeps small tensors' states in fp32
    blocks = math.ceil(spec.numel / BNB_BLOCKSIZE)
    return [("moments", 2 * spec.numel), ("moment_meta", 2 * 4 * blocks)]


def _torchao(bits: int) -> Callable[..., Rows]:
    block = TORCHAO_BLOCKSIZE[bits]

    def rows(spec: ParamSpec, rank: int) -> Rows:
        if spec.numel < MIN_QUANTIZED or spec.numel % block:
            return [("state_other", _STEP), *_full(spec.numel, spec.esize)]
        codes = spec.numel if bits == 8 else spec.numel // 2
        books = 4 * sum(_torchao_codebooks(bits))
        meta = 2 * 4 * (spec.numel // block) + books
        return [("state_other", _STEP), ("moments", 2 * codes), ("moment_meta", meta)]

    return rows


def _torchao_codebooks(bits: int) -> tuple[int, int]:
    """Entries of torchao's signed and unsigned code books (read from torchao itself)."""
    if bits == 8:
        from torchao.optim.subclass_8bit import get_qmap_signed, get_qmap_unsigned
    else:
        from torchao.optim.subclass_4bit import get_qmap_signed, get_qmap_unsigned
    return len(get_qmap_signed()), len(get_qmap_unsigned())


def _galore_torch(spec: ParamSpec, rank: int) -> Rows:
    # galore-torch keeps an int step and its basis in the parameter dtype, inside a projector.
    if not spec.projected:
        return _full(spec.numel, spec.esize)
    low, basis = _low_rank(spec, rank)
    return [*_full(low, spec.esize), ("projection", basis * spec.esize)]


def _apollo(spec: ParamSpec, rank: int) -> Rows:
    # APOLLO: random projection of the un-clipped rank, and a norm-limiter scalar (0-dim).
    if not spec.projected:
        return _full(spec.numel, spec.esize)
    low, basis = _low_rank(spec, rank, clip=False)
    return [
        *_full(low, spec.esize),
        ("projection", basis * spec.esize),
        ("state_other", spec.esize),
    ]


#: method name -> (label, per-parameter state rule)
ESTIMATE_METHODS: dict[str, tuple[str, Callable[..., Rows]]] = {
    "adamw": ("torch AdamW", _adamw),
    "bnb_adamw8bit": ("bitsandbytes AdamW8bit", _bnb),
    "torchao_adamw8bit": ("torchao AdamW8bit", _torchao(8)),
    "torchao_adamw4bit": ("torchao AdamW4bit", _torchao(4)),
    "galore_torch": ("galore-torch GaLoreAdamW", _galore_torch),
    "apollo": ("apollo-torch APOLLOAdamW", _apollo),
    "galore_adamw": ("GaLoreAdamW (ours)", _ours("full", None)),
    "galore_adamw8bit": ("GaLoreAdamW8bit (ours)", _ours("8bit", None)),
    "galore_adamw4bit": ("GaLoreAdamW8bit, 4-bit moments (ours)", _ours("4bit", None)),
    "q_galore_adamw": ("QGaLoreAdamW (ours)", _ours("8bit", 4)),
    "q_galore_adamw4bit": (
        "QGaLoreAdamW, 4-bit moments (ours)",
        _ours("4bit", 4),
    ),
    "welore_adamw": ("WeLoreAdamW (ours)", _ours("full", None)),
}


def int8_weight(spec: ParamSpec) -> list[tuple[str, str, int]]:
    """``QuantizedLinear``: a one-element handle, INT8 codes and fp32 scales (its buffers)."""
    module = spec.name.removesuffix(".weight")
    rows, cols = spec.shape
    scales = 4 * rows * math.ceil(cols / WEIGHT_GROUP)
    return [
        (spec.name, "weights", spec.esize),
        (f"{module}.weight_codes", "weight_codes", rows * cols),
        (f"{module}.weight_scales", "weight_scales", scales),
    ]
