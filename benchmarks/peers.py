"""Build every optimizer the memory and throughput benchmarks compare, and bring it to its
steady state.

The peers (bitsandbytes, torchao, galore-torch, apollo-torch) are imported here, in the
benchmarks, never by the library: ``lowrank_optim.memory`` only describes their storage
(:mod:`lowrank_optim.memory.rules`), and ``tests/test_memory.py`` checks that description
against the optimizers this module builds.

Each method gets the model, GaLore's param-group split (projected attention/MLP matrices,
everything else dense) and a rank; :func:`run_method` then takes one training step (forward,
backward, ``step()``), so every lazily created state tensor exists and the gradients are still
alive, which is the moment :func:`~lowrank_optim.memory.accounting.account` measures.

Two methods need more than a step:

* ``torchao_adamw*``: torchao compiles its step with ``torch.compile``, which takes about a
  minute per parameter shape on a CPU; its state is therefore created with torchao's own
  ``_new_buffer`` (the call its ``step()`` makes on first use) when ``torchao_step=False``.
* ``welore_adamw``: after the first step, the layers of a hand-off plan are handed off through
  ``WeLoreAdamW``'s own hand-off routine, and a second step trains the factors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowrank_optim.memory.estimate import ESTIMATE_METHODS

__all__ = ["build_method", "run_method", "train_step"]


def _plain_groups(model: nn.Module, rank: int, **projected: Any) -> list[dict[str, Any]]:
    """GaLore's split as galore-torch-style groups of bare tensors."""
    from lowrank_optim.factory import lowrank_param_groups

    groups = lowrank_param_groups(model, "attn-mlp")
    dense = [p for _, p in groups[0]["params"]]
    matrices = [p for _, p in groups[-1]["params"]]
    return [
        {"params": dense},
        {"params": matrices, "rank": rank, "update_proj_gap": 200, "proj_type": "std", **projected},
    ]


def build_method(name: str, model: nn.Module, rank: int) -> torch.optim.Optimizer:
    """The optimizer ``name`` (a key of ``ESTIMATE_METHODS``) over ``model``, GaLore's recipe.

    ``q_galore_adamw`` converts the projected linears of ``model`` to INT8 ``QuantizedLinear``
    in place, as :func:`lowrank_optim.factory.build_optimizer` does.
    """
    from lowrank_optim.config import ProjectionConfig
    from lowrank_optim.factory import OptimizerSpec, build_optimizer

    if name not in ESTIMATE_METHODS:
        raise ValueError(f"Invalid method: {name!r}; allowed: {', '.join(ESTIMATE_METHODS)}")
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    if name == "bnb_adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    if name.startswith("torchao_"):
        from torchao.optim import AdamW4bit, AdamW8bit

        return (AdamW8bit if name.endswith("8bit") else AdamW4bit)(model.parameters(), lr=1e-3)
    if name == "galore_torch":
        from galore_torch import GaLoreAdamW as PeerGaLoreAdamW

        return PeerGaLoreAdamW(_plain_groups(model, rank, scale=0.25), lr=1e-3)
    if name == "apollo":
        from apollo_torch import APOLLOAdamW

        groups = _plain_groups(model, rank, scale=1.0, proj="random", scale_type="channel")
        return APOLLOAdamW(groups, lr=1e-3)
    projection = ProjectionConfig(rank=rank)
    return build_optimizer(model, OptimizerSpec(name=name, lr=1e-3, projection=projection))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer | None, tokens: int) -> None:
    """Forward and backward on one random sequence of ``tokens``, then ``optimizer.step()``."""
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, tokens), generator=generator)
    device = next(model.parameters()).device
    ids = ids.to(device)
    model(input_ids=ids, labels=ids).loss.backward()
    if optimizer is not None:
        optimizer.step()


def _init_torchao_state(optimizer: torch.optim.Optimizer) -> None:
    # What torchao's step() creates on first use (torchao/optim/adam.py), without compiling.
    # `_new_buffer` is torchao's private helper: calling it keeps the state exactly torchao's.
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = optimizer._new_buffer(param, True)
                state["exp_avg_sq"] = optimizer._new_buffer(param, False)


def _hand_off(optimizer: torch.optim.Optimizer, model: nn.Module, plan: dict[str, int]) -> None:
    from lowrank_optim.handoff import projected_linears

    step = optimizer.current_step()
    for candidate in projected_linears(model, optimizer, optimizer.is_projected):
        if candidate.name in plan:
            optimizer.hand_off(model, candidate, plan[candidate.name], step)


def run_method(
    name: str,
    model: nn.Module,
    rank: int,
    tokens: int,
    *,
    plan: dict[str, int] | None = None,
    torchao_step: bool = False,
    wrap: Callable[[torch.optim.Optimizer, nn.Module], Any] | None = None,
) -> torch.optim.Optimizer:
    """Build ``name`` on ``model`` and take the step(s) that create all of its state.

    ``plan`` (``welore_adamw``): module name -> rank of the layers to hand off after step one.
    ``wrap``: e.g. ``lambda opt, model: LayerwiseOptimizer(opt, model)``; the steps then happen
    inside backward and no gradient is left afterwards.
    """
    if wrap is not None and plan:
        raise ValueError("run_method: a hand-off plan and a wrapper cannot be combined")
    optimizer = build_method(name, model, rank)
    driver = wrap(optimizer, model) if wrap is not None else None
    if name.startswith("torchao_") and not torchao_step:
        train_step(model, None, tokens)
        _init_torchao_state(optimizer)
        return optimizer
    train_step(model, None if driver is not None else optimizer, tokens)
    if name == "welore_adamw" and plan:
        _hand_off(optimizer, model, plan)
        for param in model.parameters():
            param.grad = None
        train_step(model, None if driver is not None else optimizer, tokens)
    return optimizer
