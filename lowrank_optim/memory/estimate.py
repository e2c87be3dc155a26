"""Formula-level memory estimates from shapes alone, for models too large to build (LLaMA 1B, 7B).

The model is instantiated on the meta device (shapes and dtypes, no storage), and each method's
state is computed per parameter from the storage rules of its implementation. The result is a
:class:`~lowrank_optim.memory.accounting.MemoryBreakdown` under the same names and components as
:func:`~lowrank_optim.memory.accounting.account`, and agrees with it byte for byte on any model
both can handle (``tests/test_memory.py`` checks every method).

Per projected ``m x n`` matrix with effective rank ``r = min(rank, m, n)`` (GaLore, Zhao et al.
2024, Sec. 4): weights ``mn``, Adam moments ``2 max(m, n) r`` and a basis ``min(m, n) r``,
against ``mn + 2mn`` for AdamW. Storage rules (``b`` = bytes per element of the parameter dtype):

* AdamW (torch): ``2 mn b`` moments + a 4-byte fp32 step per parameter.
* 8-bit (ours and bitsandbytes; Dettmers et al. 2022): per moment ``numel`` uint8 codes + one
  fp32 absmax per 256 values; tensors under 4096 elements stay unquantized (ours in the
  parameter dtype, bitsandbytes in fp32); bitsandbytes keeps two shared 256-entry code books.
* torchao AdamW8bit / AdamW4bit: codes (1 or 1/2 byte per value), one fp32 scale per block of
  256 / 128, and a code book per state tensor; tensors under 4096 values or not divisible by
  the block stay in the parameter dtype.
* Q-GaLore (Zhang et al. 2024): bases as packed 4-bit codes + fp32 scale and offset per group
  of 256 + an int64 shape; projected weights as INT8 codes + an fp32 scale per 256 inputs of a
  row, and a one-element weight handle.
* WeLore after hand-off (Jaiswal et al. 2025): a handed-off ``m x n`` layer becomes factors
  ``m x k`` and ``k x n`` trained by plain AdamW: ``3 k (m + n) b`` plus steps.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from lowrank_optim.memory.accounting import SHARED, MemoryBreakdown
from lowrank_optim.memory.rules import (
    BNB_CODEBOOK_BYTES,
    ESTIMATE_METHODS,
    MIN_QUANTIZED,
    ParamSpec,
    int8_weight,
)

__all__ = [
    "ESTIMATE_METHODS",
    "ParamSpec",
    "estimate",
    "estimate_matrix",
    "param_specs",
    "welore_plan",
]


def param_specs(model: nn.Module, target_modules: str = "attn-mlp") -> list[ParamSpec]:
    """Specs of ``model``'s parameters and buffers (a meta-device model is fine), with the
    projected set chosen exactly as :func:`lowrank_optim.factory.lowrank_param_groups` does."""
    from lowrank_optim.factory import lowrank_param_groups

    projected = {id(p) for _, p in lowrank_param_groups(model, target_modules)[-1]["params"]}
    specs, seen = [], set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        tensors = [(n, t, False) for n, t in module.named_parameters(recurse=False)]
        tensors += [(n, t, True) for n, t in module.named_buffers(recurse=False)]
        for name, tensor, is_buffer in tensors:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            specs.append(
                ParamSpec(
                    prefix + name,
                    tuple(tensor.shape),
                    tensor.dtype,
                    projected=id(tensor) in projected and tensor.dim() == 2,
                    buffer=is_buffer,
                )
            )
    return specs


def welore_plan(specs: list[ParamSpec], keep: float = 0.5) -> dict[str, int]:
    """A hand-off plan: every projected ``m x n`` matrix factorized at ``k = floor(keep * mn /
    (m + n))``, i.e. keeping ``keep`` of its parameters (so WeLore's LRC conditions hold: the
    factors are smaller and, for ``keep <= 0.5``, more than half the rank is removed).

    Used where no trained weights exist to run WeLore's data-free rank selection on. Keys are
    module names (the parameter name without ``.weight``).
    """
    if not 0.0 < keep < 1.0:
        raise ValueError(f"Invalid keep: {keep!r}; must be in (0, 1)")
    plan = {}
    for spec in specs:
        if spec.projected:
            rows, cols = spec.shape
            k = max(int(keep * rows * cols / (rows + cols)), 1)
            plan[spec.name.removesuffix(".weight")] = k
    return plan


def _factor_specs(spec: ParamSpec, k: int) -> list[ParamSpec]:
    module = spec.name.removesuffix(".weight")
    rows, cols = spec.shape
    return [
        replace(spec, name=f"{module}.up", shape=(rows, k), projected=False),
        replace(spec, name=f"{module}.down", shape=(k, cols), projected=False),
    ]


def estimate(
    specs: list[ParamSpec],
    method: str,
    rank: int = 128,
    *,
    gradients: bool = True,
    plan: dict[str, int] | None = None,
    layerwise: bool = False,
) -> MemoryBreakdown:
    """The byte breakdown ``method`` would hold for a model of ``specs`` after a step.

    Args:
        specs: from :func:`param_specs` (a meta-device model is enough).
        method: a key of :data:`ESTIMATE_METHODS`.
        rank: GaLore rank of projected matrices.
        gradients: count one gradient per trainable parameter, as after ``backward()``.
        plan: ``welore_adamw`` only: module name -> rank of the hand-offs done
            (:func:`welore_plan`); handed-off layers become AdamW-trained factors.
        layerwise: per-layer updates (GaLore Sec. 4.3): only the largest gradient is alive at
            once, so gradients count ``max_l |G_l|``.
    """
    if method not in ESTIMATE_METHODS:
        raise ValueError(f"Invalid method: {method!r}; allowed: {', '.join(ESTIMATE_METHODS)}")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"Invalid rank: {rank!r}; must be an integer >= 1")
    if plan is not None and method != "welore_adamw":
        raise ValueError(f"A hand-off plan applies to welore_adamw only, not {method!r}")
    rule = ESTIMATE_METHODS[method][1]
    expanded: list[ParamSpec] = []
    for spec in specs:
        module = spec.name.removesuffix(".weight")
        if plan and spec.projected and module in plan:
            expanded += _factor_specs(spec, plan[module])
        else:
            expanded.append(spec)
    out = MemoryBreakdown()
    grads: list[tuple[str, int]] = []
    quantized_8bit = 0
    for spec in expanded:
        if method.startswith("q_galore_adamw") and spec.projected:
            for name, component, nbytes in int8_weight(spec):
                out.add(name, component, nbytes)
        else:
            out.add(spec.name, "weights", spec.numel * spec.esize)
        if spec.buffer:
            continue
        grads.append((spec.name, spec.numel * spec.esize))
        for component, nbytes in rule(spec, rank):
            out.add(spec.name, component, nbytes)
        quantized_8bit += method == "bnb_adamw8bit" and spec.numel >= MIN_QUANTIZED
    if quantized_8bit:
        # bitsandbytes' two code books are one pair of tensors shared by every quantized state.
        owner = (
            SHARED
            if quantized_8bit > 1
            else next(s.name for s in expanded if not s.buffer and s.numel >= MIN_QUANTIZED)
        )
        out.add(owner, "moment_meta", BNB_CODEBOOK_BYTES)
    if gradients and grads:
        if layerwise:
            grads = [max(grads, key=lambda item: item[1])]
        for name, nbytes in grads:
            out.add(name, "gradients", nbytes)
    return out


def estimate_matrix(
    shape: tuple[int, int], method: str, rank: int, dtype: torch.dtype = torch.bfloat16
) -> dict[str, Any]:
    """Weights and optimizer state of ONE projected ``m x n`` matrix under ``method``."""
    spec = ParamSpec("matrix.weight", tuple(shape), dtype, projected=True)
    summary = estimate([spec], method, rank, gradients=False).summary()
    return {"weights": summary["weights"], "optimizer_states": summary["optimizer_states"]}
