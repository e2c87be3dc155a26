"""Hugging Face Trainer: our optimizers as ``Trainer(optimizers=(opt, sched))``, plus hand-offs.

``Trainer`` saves ``optimizer.state_dict()`` with ``torch.save`` and loads it back with
``torch.load(weights_only=True)``; our state is plain tensors and numbers, so resuming from
``checkpoint-N`` just works. Hand-offs change the model's structure, and the Trainer loads the
weights (non-strictly) *before* the optimizer state, whose load re-applies the hand-offs with
new factors: :class:`WeLoreHandoffCallback` keeps the factor weights the model had no place for
when they loaded and copies them into those factors before the first step, so
``trainer.train(resume_from_checkpoint=...)`` resumes bit for bit. Without the callback, call
:func:`prepare_resume` before ``trainer.train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from lowrank_optim.errors import CheckpointMismatchError
from lowrank_optim.factorize import LowRankLinear, dense_weight_of
from lowrank_optim.handoff import unwrap
from lowrank_optim.optim.welore_adamw import CHECKPOINT_KEY, WeLoreAdamW

__all__ = [
    "OPTIMIZER_FILE",
    "OPTIMIZER_FILES",
    "WeLoreHandoffCallback",
    "WeightLoad",
    "WeightLoadWatch",
    "optimizer_state_file",
    "prepare_resume",
    "restore_factor_values",
    "unwrap_optimizer",
]

OPTIMIZER_FILE = "optimizer.pt"
#: Where a checkpoint keeps the optimizer state: Trainer's ``checkpoint-N``, then accelerate's
#: ``save_state`` folder (its first optimizer).
OPTIMIZER_FILES = (OPTIMIZER_FILE, "optimizer.bin")
#: Parameter names of a ``LowRankLinear`` that a dense layer does not have.
FACTOR_KEYS = frozenset(name for name, _ in LowRankLinear(1, 1, 1, bias=False).named_parameters())

# Models whose checkpoint hand-offs prepare_resume re-applied: their weights load into factors.
_PREPARED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def unwrap_optimizer(optimizer: Any) -> Any:
    """Our optimizer inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself).

    ``AcceleratedOptimizer`` is itself a ``torch.optim.Optimizer`` holding the real one under
    ``.optimizer``, so unwrapping follows that attribute, not the type.
    """
    while True:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer or not hasattr(inner, "param_groups"):
            return optimizer
        optimizer = inner


# ------------------------------------------------------------------ what a weights load gave
@dataclass(frozen=True)
class WeightLoad:
    """One ``load_state_dict`` of the model: what it held then and what it was given."""

    #: names of the modules that were ``LowRankLinear`` already (their factors loaded)
    factored: frozenset[str]
    #: every key of the loaded state dict
    arrived: frozenset[str]
    #: the loaded tensors the model had no place for: factors of layers still dense then
    unexpected: Mapping[str, torch.Tensor]


class WeightLoadWatch:
    """Records the latest ``load_state_dict`` of ``module`` (a load_state_dict pre-hook).

    Only the tensors the model has no key for are kept (factor weights, small), until
    :meth:`take` hands them over.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.last: WeightLoad | None = None
        self.handle = module.register_load_state_dict_pre_hook(self._record)

    def _record(
        self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *_: Any
    ) -> None:
        own = set(module.state_dict().keys())
        given = {key[len(prefix) :]: value for key, value in state_dict.items()}
        self.last = WeightLoad(
            factored=frozenset(
                name for name, layer in module.named_modules() if isinstance(layer, LowRankLinear)
            ),
            arrived=frozenset(given),
            unexpected={key: value for key, value in given.items() if key not in own},
        )

    def take(self) -> WeightLoad | None:
        """The latest load since the last call (None if none), forgetting it."""
        last, self.last = self.last, None
        return last


def restore_factor_values(module: nn.Module, optimizer: Any, load: WeightLoad) -> None:
    """Give the factors that the optimizer's load re-applied *after* ``load`` their values.

    The Trainer loads the weights before the optimizer state: a layer handed off in the
    checkpoint was still dense then, so its factor weights were unexpected keys, and the
    optimizer's load then replaced the layer by new factors. Their values are copied from
    ``load``. Raises :class:`CheckpointMismatchError` when a re-applied factor's value never
    arrived, or when the weights hold factors of a layer that is still dense (no optimizer
    state re-applied its hand-off): either way training would go on from wrong weights.
    """
    modules = dict(module.named_modules())
    _refuse_factors_of_dense_layers(modules, load)
    plan = optimizer.plan if isinstance(optimizer, WeLoreAdamW) else {}
    with torch.no_grad():
        for name in plan:
            layer = modules.get(name)
            if name in load.factored or not isinstance(layer, LowRankLinear):
                continue
            for local, param in layer.named_parameters():
                _fill_factor(name, f"{name}.{local}", param, load)


def _fill_factor(layer: str, key: str, param: torch.Tensor, load: WeightLoad) -> None:
    """Copy ``load``'s value of ``key`` into ``param``; keys the dense layer loaded (its bias,
    carried over by the hand-off) are already right."""
    value = load.unexpected.get(key)
    if value is None:
        if key in load.arrived:
            return
        raise CheckpointMismatchError(
            f"The checkpoint's optimizer state re-applies the hand-off of {layer!r}, but its "
            f"model weights have no {key!r}: refusing to train factors whose values never arrived"
        )
    if value.shape != param.shape:
        raise CheckpointMismatchError(
            f"Checkpoint weight {key!r} has shape {list(value.shape)}, but the re-applied "
            f"factor has shape {list(param.shape)}"
        )
    param.copy_(value)


def _refuse_factors_of_dense_layers(modules: Mapping[str, nn.Module], load: WeightLoad) -> None:
    """CheckpointMismatchError if the weights hold factors of a layer that is dense here."""
    for key in load.unexpected:
        owner, _, leaf = key.rpartition(".")
        layer = modules.get(owner)
        if leaf in FACTOR_KEYS and layer is not None and dense_weight_of(layer) is not None:
            raise CheckpointMismatchError(
                f"Checkpoint weights hold factor {key!r}, but layer {owner!r} is dense here: no "
                "optimizer state re-applied its hand-off (checkpoint without optimizer.pt, e.g. "
                "save_only_model=True, or an optimizer other than WeLoreAdamW)"
            )


# ------------------------------------------------------------------------------ the callback
class WeLoreHandoffCallback(TrainerCallback):
    """Runs ``WeLoreAdamW.maybe_handoff`` after every optimizer step of a ``Trainer``, and
    resumes checkpoints taken after hand-offs.

    The surgery is in place on the model the Trainer holds, so nothing needs re-wrapping in a
    single process. Under multi-process DDP the Trainer's wrapper cannot be replaced from a
    callback; that combination is refused at the start of training (use
    ``examples/torchrun_pretrain.py``, whose loop re-wraps DDP, instead).

    Resuming: from ``Trainer(callbacks=[...])`` on, it watches the model's weights load
    (:class:`WeightLoadWatch`) and, at the start of training, gives the factors re-applied by
    the optimizer's load the checkpoint's values (:func:`restore_factor_values`). It must be
    there when the Trainer is built: added later (``add_callback``) or with ``model_init``, a
    resume after hand-offs is refused unless :func:`prepare_resume` was called.
    """

    def __init__(self) -> None:
        self._watch: WeightLoadWatch | None = None

    def on_init_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if model is not None and self._watch is None:
            self._watch = WeightLoadWatch(unwrap(model))

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if getattr(args, "world_size", 1) > 1:
            raise RuntimeError(
                "WeLoreHandoffCallback supports single-process Trainer runs only: hand-offs "
                "change parameters, and the Trainer's DDP wrapper cannot be rebuilt from a "
                "callback. Use examples/torchrun_pretrain.py for multi-process hand-offs."
            )
        if model is None:
            return
        module = unwrap(model)
        watched = self._watch is not None and self._watch.module is module
        load = self._watch.take() if watched else None
        inner = unwrap_optimizer(optimizer)
        if load is not None:
            restore_factor_values(module, inner, load)
        elif state.global_step > 0 and isinstance(inner, WeLoreAdamW) and inner.plan:
            _refuse_unwatched_resume(module, inner)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Forget loads after training (``load_best_model_at_end``): they resume nothing."""
        if self._watch is not None:
            self._watch.take()

    def on_step_end(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        inner = unwrap_optimizer(optimizer)
        if not isinstance(inner, WeLoreAdamW) or model is None:
            return
        before = len(inner.handoffs)
        inner.maybe_handoff(model)
        for record in inner.handoffs[before:]:
            state.log_history.append({"step": state.global_step, "welore_handoff": record})


def _refuse_unwatched_resume(module: nn.Module, optimizer: WeLoreAdamW) -> None:
    """RuntimeError: a resume re-applied hand-offs that no one gave their weights."""
    if module in _PREPARED:
        return
    raise RuntimeError(
        f"Resuming after {len(optimizer.plan)} hand-off(s), but WeLoreHandoffCallback did not "
        "see the model's weights load, so the re-applied factors hold no trained values: pass "
        "it in Trainer(callbacks=[WeLoreHandoffCallback()]) (not add_callback, not with "
        "model_init), or call prepare_resume(model, optimizer, checkpoint) before train()"
    )


# ----------------------------------------------------------------------------- prepare_resume
def optimizer_state_file(checkpoint_dir: str | os.PathLike[str]) -> Path:
    """The optimizer state of a Trainer ``checkpoint-N`` (``optimizer.pt``) or of an accelerate
    ``save_state`` folder (``optimizer.bin``); FileNotFoundError if there is none."""
    folder = Path(checkpoint_dir)
    for name in OPTIMIZER_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"No optimizer state in {str(folder)!r}: expected {' or '.join(OPTIMIZER_FILES)} (a "
        "Trainer checkpoint-N or an accelerate save_state folder)"
    )


def prepare_resume(
    model: nn.Module, optimizer: Any, checkpoint_dir: str | os.PathLike[str]
) -> None:
    """Re-apply the hand-offs recorded in ``checkpoint_dir``'s optimizer state to ``model``.

    Call it before the checkpoint's weights load, so that they load into factor layers:
    before ``trainer.train(resume_from_checkpoint=checkpoint_dir)`` (not needed with
    :class:`WeLoreHandoffCallback`) or before ``accelerator.load_state(checkpoint_dir)`` (or let
    :func:`lowrank_optim.integrations.accelerate.register_handoff_resume` call it). Only the
    hand-offs are re-applied; the optimizer state itself is loaded by the Trainer or
    accelerate. Nothing happens for other optimizers or for checkpoints without hand-offs;
    FileNotFoundError for a folder without optimizer state.
    """
    inner = unwrap_optimizer(optimizer)
    if not isinstance(inner, WeLoreAdamW):
        return
    path = optimizer_state_file(checkpoint_dir)
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    handoffs = saved.get(CHECKPOINT_KEY)
    if not handoffs or not handoffs.get("plan"):
        return
    if inner.model is None:
        inner.model = model
    inner.load_handoff_state(handoffs)
    _PREPARED.add(unwrap(model))
