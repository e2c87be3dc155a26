"""Exact byte accounting of a model and its optimizer, by component, layer and module type.

Every tensor reachable from the model (parameters, buffers, gradients) and from
``optimizer.state`` is counted once, at the bytes its elements occupy, and filed under one
component:

=================  ==========================================================================
weights            dense parameters and buffers (for ``QuantizedLinear``, its value-less handle)
weight_codes       INT8 weight codes of ``QuantizedLinear`` (Q-GaLore)
weight_scales      their fp32 per-group scales
gradients          ``param.grad``
moments            Adam moments: dense, low-rank, or their 8/4-bit codes
moment_meta        metadata of quantized moments: absmax / scales, code books, stored shapes
projection         GaLore projection bases (dense, or their packed 4/8-bit codes)
projection_meta    scale / offset / shape of quantized bases
state_other        step counters, stability histories, anything else in the state
=================  ==========================================================================

A tensor's bytes are ``element_size`` times the elements it actually addresses: a tensor
expanded with zero strides (``QuantizedLinear``'s weight handle) costs its one stored element,
not ``numel``; a tensor subclass that declares ``__tensor_flatten__`` (torchao's quantized
optimizer states) costs the sum of its inner tensors. Tensors shared between parameters'
states (bitsandbytes' code books) are counted once, under the name ``(shared)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowrank_optim import state_keys as keys
from lowrank_optim.memory.basic import tensors_in
from lowrank_optim.moment_storage import (
    EXP_AVG_ABSMAX,
    EXP_AVG_CODES,
    EXP_AVG_SQ_ABSMAX,
    EXP_AVG_SQ_CODES,
    MOMENT_SHAPE,
)
from lowrank_optim.projection import LEFT, RIGHT

__all__ = [
    "BNB_META_KEYS",
    "BNB_MOMENT_KEYS",
    "COMPONENTS",
    "MODULE_TYPES",
    "SHARED",
    "SUMMARY_GROUPS",
    "TORCHAO_CODES",
    "MemoryBreakdown",
    "account",
    "classify_state_key",
    "footprint_bytes",
    "layer_of",
    "module_type_of",
]

COMPONENTS = (
    "weights",
    "weight_codes",
    "weight_scales",
    "gradients",
    "moments",
    "moment_meta",
    "projection",
    "projection_meta",
    "state_other",
)
#: The columns of GaLore's memory table, and the quantization metadata the Q-GaLore issue asks.
SUMMARY_GROUPS: dict[str, tuple[str, ...]] = {
    "weights": ("weights", "weight_codes", "weight_scales"),
    "gradients": ("gradients",),
    "optimizer_states": ("moments", "moment_meta", "projection", "projection_meta", "state_other"),
    "quantization_metadata": ("weight_scales", "moment_meta", "projection_meta"),
}
MODULE_TYPES = ("q", "k", "v", "o", "gate", "up", "down", "embed", "norm", "head", "other")
SHARED = "(shared)"

_MODULE_PATTERNS = (
    ("q", re.compile(r"\bq_proj\b")),
    ("k", re.compile(r"\bk_proj\b")),
    ("v", re.compile(r"\bv_proj\b")),
    ("o", re.compile(r"\bo_proj\b")),
    ("gate", re.compile(r"\bgate_proj\b")),
    ("up", re.compile(r"\bup_proj\b")),
    ("down", re.compile(r"\bdown_proj\b")),
    ("embed", re.compile(r"embed|\bwte\b|\bwpe\b")),
    ("head", re.compile(r"lm_head")),
    ("norm", re.compile(r"norm")),
)
_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")

# Peers' own state keys, which only their code defines; ours come from state_keys and
# moment_storage.
#: bitsandbytes' 8-bit optimizers (``bnb.optim.Optimizer2State``): the two moments' codes.
BNB_MOMENT_KEYS = ("state1", "state2")
#: bitsandbytes' per-block absmax of each moment and the code books (``qmap``) they share.
BNB_META_KEYS = ("absmax1", "absmax2", "qmap1", "qmap2")
#: torchao's quantized state subclasses (``OptimState8bit``/``4bit``): the inner tensor that
#: holds the codes; their other inner tensors (scale, code book) are metadata.
TORCHAO_CODES = "codes"

_MOMENT_KEYS = frozenset(
    {keys.EXP_AVG, keys.EXP_AVG_SQ, EXP_AVG_CODES, EXP_AVG_SQ_CODES, *BNB_MOMENT_KEYS}
)
_MOMENT_META_KEYS = frozenset({EXP_AVG_ABSMAX, EXP_AVG_SQ_ABSMAX, MOMENT_SHAPE, *BNB_META_KEYS})
#: Our projection bases; a quantized basis keeps ``<key>_codes`` beside its scale, offset and
#: shape (``basis_storage``), and only the codes are the basis itself.
_BASIS_KEYS = (LEFT, RIGHT)
_BASIS_CODES = frozenset(f"{key}_codes" for key in _BASIS_KEYS)


def module_type_of(name: str) -> str:
    """``q, k, v, o, gate, up, down, embed, norm, head`` or ``other`` from a parameter name."""
    for kind, pattern in _MODULE_PATTERNS:
        if pattern.search(name):
            return kind
    return "other"


def layer_of(name: str) -> int | None:
    """The transformer block index in a name such as ``model.layers.3.mlp.up_proj.weight``."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _inner_tensors(tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
    """Inner tensors of a wrapper subclass (torchao's ``OptimState8bit``), else None."""
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return None
    names, _ = tensor.__tensor_flatten__()
    return [(name, getattr(tensor, name)) for name in names]


def footprint_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the elements ``tensor`` addresses (zero-stride dimensions hold one element)."""
    inner = _inner_tensors(tensor)
    if inner is not None:
        return sum(footprint_bytes(part) for _, part in inner)
    if tensor.numel() == 0:
        return 0
    stored = math.prod(
        size for size, stride in zip(tensor.shape, tensor.stride(), strict=True) if stride != 0
    )
    return stored * tensor.element_size()


def classify_state_key(key: str, inner: str | None = None) -> str:
    """The component of optimizer-state entry ``key`` (``inner``: a subclass's inner tensor)."""
    if inner is not None:
        return "moments" if inner == TORCHAO_CODES else "moment_meta"
    if key in _MOMENT_KEYS:
        return "moments"
    if key in _MOMENT_META_KEYS:
        return "moment_meta"
    if key in _BASIS_KEYS or key in _BASIS_CODES:
        return "projection"
    if key.startswith(_BASIS_KEYS):
        return "projection_meta"
    if "proj" in key:  # peers that keep a projector object: its tensors are the basis
        return "projection"
    return "state_other"


@dataclass
class MemoryBreakdown:
    """Bytes per ``(name, component)``; ``name`` is a parameter or buffer name (or ``SHARED``)."""

    entries: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, name: str, component: str, nbytes: int) -> None:
        if component not in COMPONENTS:
            raise ValueError(f"Invalid component: {component!r}; allowed: {', '.join(COMPONENTS)}")
        key = (name, component)
        self.entries[key] = self.entries.get(key, 0) + int(nbytes)

    def total(self, components: Iterable[str] | None = None) -> int:
        wanted = set(COMPONENTS if components is None else components)
        return sum(n for (_, component), n in self.entries.items() if component in wanted)

    def by_component(self) -> dict[str, int]:
        return {c: self.total((c,)) for c in COMPONENTS}

    def summary(self) -> dict[str, int]:
        """GaLore's columns (weights, optimizer states) plus gradients, metadata and total."""
        out = {group: self.total(parts) for group, parts in SUMMARY_GROUPS.items()}
        out["weights_and_states"] = out["weights"] + out["optimizer_states"]
        out["total"] = self.total()
        return out

    def _grouped(self, key_of: Any) -> dict[Any, dict[str, int]]:
        out: dict[Any, dict[str, int]] = {}
        for (name, component), nbytes in self.entries.items():
            row = out.setdefault(key_of(name), dict.fromkeys(COMPONENTS, 0))
            row[component] += nbytes
        return out

    def by_module_type(self) -> dict[str, dict[str, int]]:
        """Components per module type (``q`` .. ``head``, ``other``)."""
        return self._grouped(lambda name: "other" if name == SHARED else module_type_of(name))

    def by_layer(self) -> dict[str, dict[str, int]]:
        """Components per transformer block (``"0"``, ``"1"``, ...; ``"-"`` outside blocks)."""
        grouped = self._grouped(lambda name: layer_of(name))
        order = sorted(grouped, key=lambda layer: (layer is None, layer or 0))
        return {("-" if layer is None else str(layer)): grouped[layer] for layer in order}

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "components": self.by_component(),
            "by_module_type": self.by_module_type(),
            "by_layer": self.by_layer(),
        }


def _model_tensors(model: nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """``(name, component, tensor)`` for every parameter and buffer, each object once."""
    from lowrank_optim.quant import QuantizedLinear

    seen: set[int] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        quantized = isinstance(module, QuantizedLinear)
        local = list(module.named_parameters(recurse=False))
        local += list(module.named_buffers(recurse=False))
        for name, tensor in local:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            component = "weights"
            if quantized and name in ("weight_codes", "weight_scales"):
                component = name
            yield prefix + name, component, tensor


def account(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryBreakdown:
    """Every byte of ``model`` (weights, gradients) and ``optimizer``'s state, by component.

    Works for any ``nn.Module`` and any optimizer whose state holds tensors, tensor subclasses
    or Python objects with tensor attributes (galore-torch's projector, at most two levels
    deep). State of a parameter that is not in ``model`` is named ``param_groups[g][i]``.
    """
    breakdown = MemoryBreakdown()
    names: dict[int, str] = {}
    for name, component, tensor in _model_tensors(model):
        names[id(tensor)] = name
        breakdown.add(name, component, footprint_bytes(tensor))
        grad = tensor.grad if isinstance(tensor, nn.Parameter) else None
        if grad is not None:
            breakdown.add(name, "gradients", footprint_bytes(grad))
    if optimizer is None:
        return breakdown
    for group_index, group in enumerate(optimizer.param_groups):
        for index, param in enumerate(group["params"]):
            names.setdefault(id(param), f"param_groups[{group_index}][{index}]")
    items = _state_items(optimizer, names)
    uses: dict[int, int] = {}
    for _, _, tensor in items:
        uses[id(tensor)] = uses.get(id(tensor), 0) + 1
    counted: set[int] = set()
    for name, component, tensor in items:
        if id(tensor) in counted:
            continue
        counted.add(id(tensor))
        breakdown.add(SHARED if uses[id(tensor)] > 1 else name, component, footprint_bytes(tensor))
    return breakdown


def _state_items(
    optimizer: torch.optim.Optimizer, names: dict[int, str]
) -> list[tuple[str, str, torch.Tensor]]:
    items = []
    for param, state in optimizer.state.items():
        name = names.get(id(param), "(unnamed)")
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                inner = _inner_tensors(value)
                if inner is None:
                    items.append((name, classify_state_key(key), value))
                else:
                    items += [(name, classify_state_key(key, n), t) for n, t in inner]
            else:
                component = classify_state_key(key)
                items += [(name, component, t) for t in tensors_in(value)]
    return items
