"""WeLoreAdamW: GaLore training that hands converged layers off to low-rank factors.

Jaiswal et al., "From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge from Low-Rank
Gradients", ICML 2025. Layers whose gradient subspace stabilizes are the ones whose weights
become low-rank; once a projected layer has been stable for a while (see
:mod:`lowrank_optim.stability`), its weight ``W`` (``m x n``) is replaced by
``LowRankLinear`` factors ``U`` (``m x k``) and ``D`` (``k x n``), with ``k`` from WeLore's
data-free global-threshold rank selection, and the factors train with plain AdamW from then on.
Weight, gradient and optimizer-state memory, and the layer's FLOPs, drop from ``mn`` to
``k (m + n)``.

Usage (one extra line in the training loop)::

    optimizer = WeLoreAdamW(param_groups, lr=1e-3, handoff=HandoffConfig(...), model=model)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model = optimizer.maybe_handoff(model)   # may return a new DDP wrapper

Without ``maybe_handoff`` calls it is exactly :class:`GaLoreAdamW`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lowrank_optim import state_keys as keys
from lowrank_optim.basis_storage import read_basis
from lowrank_optim.config import HandoffConfig, ProjectionConfig, StabilityConfig
from lowrank_optim.errors import CheckpointMismatchError
from lowrank_optim.factorize import LowRankLinear, dense_weight_of, replace_module
from lowrank_optim.handoff import (
    HandoffCandidate,
    Refusal,
    choose_ranks,
    factor_moments,
    find_candidates,
    projected_linears,
    shrink_tail_,
    top_subspace,
)
from lowrank_optim.optim.galore_adamw import GaLoreAdamW
from lowrank_optim.placement import refuse_sharded_handoff
from lowrank_optim.projection import LEFT, RIGHT
from lowrank_optim.stability import OVERLAP_HISTORY, STABLE_SINCE, latest

__all__ = ["WeLoreAdamW"]

#: Group key marking the plain-AdamW group that receives the factors of projected group ``i``.
FACTORS_OF = "welore_factors_of"
#: Factor-state key: the factor's step count at its hand-off (for the re-warm-up ramp).
HANDOFF_STEP = "handoff_step"
_CHECKPOINT_KEY = "welore"


class WeLoreAdamW(GaLoreAdamW):
    """GaLoreAdamW plus stability tracking plus WeLore hand-offs to low-rank factors.

    Args:
        params, lr, betas, eps, weight_decay, projection, stability, on_bad_gradient: as
            :class:`GaLoreAdamW`.
        handoff: when and how layers are handed off (:class:`HandoffConfig`).
        model: the model the parameters belong to; needed by :meth:`maybe_handoff` (unless
            passed there) and to resume a checkpoint taken after hand-offs.

    What is handed off: the projected weights of ``nn.Linear`` layers and of transformers'
    ``Conv1D`` layers (GPT-2; weight stored ``in x out``, so its moments are transposed on the
    way to the factors). Never handed off, each with one warning naming the layer: a frozen
    weight (``requires_grad=False``; see :meth:`_unfrozen`), a weight held by two modules (tied
    weights or a shared module: refused before anything changes, so the tie is kept), an INT8
    ``QuantizedLinear`` and any other module type.

    For every projected param group the constructor appends one (initially empty) plain-AdamW
    group that will hold that group's factors, with the same hyper-parameters, so that learning
    rate schedulers created afterwards drive the factors too.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        projection: ProjectionConfig | None = None,
        stability: StabilityConfig | None = None,
        handoff: HandoffConfig | None = None,
        on_bad_gradient: str = "raise",
        model: nn.Module | None = None,
    ) -> None:
        if handoff is not None and not isinstance(handoff, HandoffConfig):
            raise ValueError(f"Invalid handoff: {handoff!r}; expected a HandoffConfig")
        self.handoff_config = handoff or HandoffConfig()
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            projection=projection,
            stability=stability,
            on_bad_gradient=on_bad_gradient,
        )
        self.model = model
        #: layer name -> {"rank": k, "shape": [m, n], "group": source group index}, in order
        self.plan: dict[str, dict[str, Any]] = {}
        self.handoffs: list[dict[str, Any]] = []
        #: layer name -> plan entry plus "start", "last", "basis", "left": layers being tapered
        self.tapering: dict[str, dict[str, Any]] = {}
        self._warned: set[tuple[str, str]] = set()  # (layer, why): each warning only once
        if model is not None:
            self._warn_refusals(find_candidates(_unwrap(model), self, self.is_projected)[1])
        for index, group in enumerate(list(self.param_groups)):
            if group.get("rank") is not None:
                self.add_param_group(self._factor_group(group, index))

    def _factor_group(self, source: dict[str, Any], index: int) -> dict[str, Any]:
        hyper = ("betas", "eps", "weight_decay", "on_bad_gradient")
        group: dict[str, Any] = {"params": [], FACTORS_OF: index}
        group.update({key: source[key] for key in hyper})
        # See HandoffConfig.factor_lr_scale: the factors keep the step size the projected
        # weight was trained with, lr * scale, unless the user sets another ratio.
        ratio = self.handoff_config.factor_lr_scale
        group["lr"] = source["lr"] * (source["scale"] if ratio is None else ratio)
        if "param_names" in source:
            group["param_names"] = []
        return group

    def _factor_group_of(self, source_index: int) -> dict[str, Any]:
        for group in self.param_groups:
            if group.get(FACTORS_OF) == source_index:
                return group
        raise RuntimeError(f"no factor group for param group {source_index}")

    # ---------------------------------------------------------------------------- hand-off
    def current_step(self) -> int:
        """The largest step count over the projected parameters (0 before the first step)."""
        steps = [
            int(self.state[param][keys.STEP])
            for group in self.param_groups
            for param in group["params"]
            if self.is_projected(group, param) and param in self.state
        ]
        return max(steps, default=0)

    def ready_for_handoff(self, param: torch.Tensor, step: int) -> bool:
        """Stable for at least ``min_stable_steps``, per the stability criterion."""
        state = self.state.get(param)
        if not state or state[STABLE_SINCE] < 0:
            return False
        return step - state[STABLE_SINCE] >= self.handoff_config.min_stable_steps

    def ready_layers(self, candidates: list[HandoffCandidate], step: int) -> list[HandoffCandidate]:
        """The candidates that may be handed off at check step ``step`` (``HandoffConfig.trigger``).

        ``stable``: each layer on its own, once stable long enough. ``step``: all of them, at the
        first check step at or after ``start_step`` only (the one-shot baseline).
        """
        config = self.handoff_config
        if config.trigger == "step":
            return list(candidates) if step == self._first_check() else []
        if config.end_step is not None and step >= config.end_step:
            return list(candidates)  # the window has closed: whatever qualifies goes now
        return [c for c in candidates if self.ready_for_handoff(c.module.weight, step)]

    def handoff_due(self, step: int | None = None) -> bool:
        """Whether :meth:`maybe_handoff` looks at the layers at ``step`` (default: now).

        True at check steps from ``start_step`` on (with ``trigger="step"``, at the one check
        step of the one-shot cut only). ``current_step`` counts the projected layers still
        dense, so it is 0, and this False, once all of them are handed off. A training loop can
        use it to evaluate the model just before a possible hand-off.
        """
        config = self.handoff_config
        step = self.current_step() if step is None else step
        if config.trigger == "step":
            return step == self._first_check()
        return step >= max(config.start_step, 1) and step % config.check_every == 0

    def _first_check(self) -> int:
        """The first check step at or after ``start_step`` (and after step 0)."""
        config = self.handoff_config
        return -(-max(config.start_step, 1) // config.check_every) * config.check_every

    def maybe_handoff(self, model: nn.Module | None = None) -> nn.Module:
        """Hand off the layers that qualify now; returns the model to keep training.

        Cheap on most steps: it only looks at the state unless the step is a check step and at
        least one layer is ready. A ``DistributedDataParallel`` model is unwrapped, changed and
        re-wrapped (with its original options), so gradients of the new factors are reduced;
        every rank takes the same decisions because weights and optimizer state agree across
        ranks.
        """
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("maybe_handoff needs the model: pass it, or WeLoreAdamW(model=...)")
        step = self.current_step()
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        module = model.module if ddp else model
        changed = self._advance_tapers(module, step)
        if self.handoff_due(step):
            changed = self._select(module, step) or changed
        if not changed:
            return model
        new_model = _rewrap(model, module) if ddp else module
        if self.model is model:
            self.model = new_model
        return new_model

    def _select(self, module: nn.Module, step: int) -> bool:
        """Choose the layers that go at this check step: hand them off, or start tapering them."""
        config = self.handoff_config
        refuse_sharded_handoff(self, step)  # FSDP2-sharded layers cannot be handed off yet
        candidates, refusals = find_candidates(module, self, self.is_projected)
        self._warn_refusals(refusals)
        candidates = [c for c in self._unfrozen(candidates, step) if c.name not in self.tapering]
        ready = self.ready_layers(candidates, step)
        if not ready:
            return False
        ranks = self.layer_ranks(candidates)
        changed = False
        for candidate in ready:
            rows, cols = candidate.module.weight.shape
            rank = ranks[candidate.name]
            reduction = 1.0 - rank / min(rows, cols)
            if reduction <= config.min_ratio or rank * (rows + cols) >= rows * cols:
                continue
            if config.taper_steps > 0:
                self._start_taper(candidate, rank, step)
            else:
                self._handoff(module, candidate, rank, step)
                changed = True
        return changed

    # ------------------------------------------------------------------------------ taper
    def _start_taper(self, candidate: HandoffCandidate, rank: int, step: int) -> None:
        dense = candidate.dense_weight()
        basis, left = top_subspace(dense, rank)
        self.tapering[candidate.name] = {
            "rank": rank,
            "shape": list(dense.shape),
            "group": candidate.group_index,
            "start": step,
            "last": step,
            "basis": basis,
            "left": left,
        }

    def _advance_tapers(self, module: nn.Module, step: int) -> bool:
        """Shrink each tapering layer's tail toward zero; hand off the layers whose taper ended.

        The tail is scaled so that it falls linearly from its size at the start to zero at
        ``start + taper_steps`` (however often this runs). A frozen layer's taper pauses.
        """
        end_offset = self.handoff_config.taper_steps
        changed = False
        for name, entry in list(self.tapering.items()):
            layer = module.get_submodule(name)
            if not layer.weight.requires_grad or step <= entry["last"]:
                continue
            end = entry["start"] + end_offset
            keep = max(end - step, 0) / max(end - entry["last"], 1)
            shrink_tail_(dense_weight_of(layer), entry["basis"], entry["left"], keep)
            entry["last"] = step
            if step >= end:
                del self.tapering[name]
                candidate = HandoffCandidate(name, layer, entry["group"])
                self._handoff(module, candidate, entry["rank"], step)
                changed = True
        return changed

    def _warn_once(self, layer: str, why: str, message: str) -> None:
        if (layer, why) not in self._warned:
            self._warned.add((layer, why))
            warnings.warn(message, stacklevel=4)  # the caller of maybe_handoff / __init__

    def _warn_refusals(self, refusals: list[Refusal]) -> None:
        """One warning per projected weight that can never be handed off (see find_candidates)."""
        for refusal in refusals:
            self._warn_once(refusal.name, "refused", refusal.message())

    def _unfrozen(self, candidates: list[HandoffCandidate], step: int) -> list[HandoffCandidate]:
        """The candidates whose weight trains; a frozen one is never handed off.

        A hand-off replaces ``W`` by its rank-``k`` truncation (the layer's function changes by
        the truncation error) and trains the factors: both break the promise of a frozen layer
        (``requires_grad=False``) not to change. Its stability record is also stale: it has had
        no gradient since it was frozen. Frozen layers are left out of the rank selection too,
        so the target reduction is met on the layers that can be handed off. A frozen layer
        that would be ready otherwise gets one warning; unfrozen, it becomes a candidate again.
        """
        frozen = [c for c in candidates if not c.weight.requires_grad]
        for candidate in self.ready_layers(frozen, step):
            self._warn_once(
                candidate.name,
                "frozen",
                f"{candidate.name} is frozen (requires_grad=False): not handed off while "
                "frozen, since a hand-off would change its weight to a low-rank approximation "
                "and train the factors",
            )
        return [c for c in candidates if c.weight.requires_grad]

    def layer_ranks(self, candidates: list[HandoffCandidate]) -> dict[str, int]:
        """Ranks for the dense projected layers under WeLore's global threshold (the target
        counts the rank that earlier hand-offs removed); subclasses may allocate otherwise."""
        spectra = {
            c.name: torch.linalg.svdvals(c.module.weight.detach().float()) for c in candidates
        }
        committed = [*self.plan.values(), *self.tapering.values()]
        planned_full = sum(min(entry["shape"]) for entry in committed)
        removed = sum(min(entry["shape"]) - entry["rank"] for entry in committed)
        total = planned_full + sum(min(c.module.weight.shape) for c in candidates)
        return choose_ranks(spectra, removed, total, self.handoff_config.target_reduction)

    def _handoff(self, root: nn.Module, candidate: HandoffCandidate, rank: int, step: int) -> None:
        linear, weight = candidate.module, candidate.weight
        dense = candidate.dense_weight()  # out x in, a view of the weight
        state = self.state.pop(weight, {})
        bits = self.param_groups[candidate.group_index].get("proj_bits")
        bases = {
            key: basis
            for key in (LEFT, RIGHT)
            if (basis := read_basis(state, key, bits, weight.dtype)) is not None
        }
        factored = LowRankLinear.from_linear(linear, rank)
        if linear.bias is not None:
            factored.bias = linear.bias  # same Parameter: its AdamW state stays valid
        error = factored.relative_error(dense.detach())
        fresh = self.handoff_config.moments == "fresh"
        up_state, down_state = self._factor_states(
            state, bases, factored, fresh, transposed=candidate.transposed
        )
        replace_module(root, candidate.name, factored)
        self._move_to_factor_group(candidate, weight, factored)
        self.state[factored.up] = up_state
        self.state[factored.down] = down_state
        weight.grad = None
        rows, cols = dense.shape
        self.plan[candidate.name] = {
            "rank": rank,
            "shape": [rows, cols],
            "group": candidate.group_index,
        }
        self.handoffs.append(
            {
                "step": step,
                "layer": candidate.name,
                "rank": rank,
                "full_rank": min(rows, cols),
                "params_before": rows * cols,
                "params_after": rank * (rows + cols),
                "relative_error": error,
                "overlap": latest(state, OVERLAP_HISTORY),
                "stable_since": int(state.get(STABLE_SINCE, -1)),
            }
        )

    def _factor_states(
        self,
        state: dict[str, Any],
        bases: dict[str, torch.Tensor],
        factored: LowRankLinear,
        fresh: bool,
        *,
        transposed: bool = False,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """AdamW states of the new factors: carried moments (same step count) or zeros.

        ``transposed``: the state belongs to a weight stored ``in x out`` (a ``Conv1D``); the
        carried moments are turned to the factors' ``out x in`` orientation.
        """
        states: list[dict[str, Any]] = []
        carried = None
        if not fresh and bases:
            exp_avg, exp_avg_sq = self.moment_storage.read(state)
            carried = factor_moments(
                exp_avg, exp_avg_sq, bases, factored.up, factored.down, transposed=transposed
            )
        for index, factor in enumerate((factored.up, factored.down)):
            factor_state: dict[str, Any] = {}
            self.moment_storage.init(factor_state, tuple(factor.shape), factor)
            if carried is None:
                factor_state[keys.STEP] = 0
            else:
                factor_state[keys.STEP] = int(state[keys.STEP])
                self.moment_storage.write(factor_state, *carried[index])
            factor_state[HANDOFF_STEP] = factor_state[keys.STEP]
            states.append(factor_state)
        return states[0], states[1]

    def _move_to_factor_group(
        self, candidate: HandoffCandidate, weight: torch.Tensor, factored: LowRankLinear
    ) -> None:
        source = self.param_groups[candidate.group_index]
        position = next((i for i, p in enumerate(source["params"]) if p is weight), None)
        if position is None:  # find_candidates and _check_plan rule this out
            raise RuntimeError(
                f"{candidate.name}: its weight is not in param group {candidate.group_index}"
            )
        del source["params"][position]
        if "param_names" in source:
            del source["param_names"][position]
        target = self._factor_group_of(candidate.group_index)
        target["params"].extend([factored.up, factored.down])
        if "param_names" in target:
            target["param_names"].extend([f"{candidate.name}.up", f"{candidate.name}.down"])

    # ------------------------------------------------------------------------ re-warm-up
    def _step_group(
        self,
        group: dict[str, Any],
        indices: Sequence[int],
        low_rank_grads: Mapping[int, torch.Tensor],
    ) -> None:
        """Factor groups step each re-warm-up stage with its own scaled ``lr``.

        A factor that has taken ``j`` steps since its hand-off (this one included) steps with
        ``lr * min(1, j / (rewarmup_steps + 1))``; factors past their ramp share one call, so
        the fused kernel still sees the whole group on most steps.
        """
        ramp = self.handoff_config.rewarmup_steps
        if ramp == 0 or FACTORS_OF not in group:
            super()._step_group(group, indices, low_rank_grads)
            return
        stages: dict[float, list[int]] = {}
        for index in indices:
            state = self.state.get(group["params"][index], {})
            start = state.get(HANDOFF_STEP)  # absent in checkpoints older than the ramp
            taken = ramp + 1 if start is None else int(state[keys.STEP]) + 1 - int(start)
            stages.setdefault(min(1.0, taken / (ramp + 1)), []).append(index)
        for factor, members in stages.items():
            staged = group if factor == 1.0 else {**group, "lr": group["lr"] * factor}
            super()._step_group(staged, members, low_rank_grads)

    def handoff_report(self) -> list[dict[str, Any]]:
        """One record per hand-off: step, layer, rank, parameters before/after, error, overlap."""
        return [dict(record) for record in self.handoffs]

    # --------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[_CHECKPOINT_KEY] = {
            "plan": {name: dict(entry) for name, entry in self.plan.items()},
            "handoffs": [dict(record) for record in self.handoffs],
            "tapering": {name: dict(entry) for name, entry in self.tapering.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint; hand-offs it records are first re-applied to the attached model.

        The re-applied layers get factors of the recorded shapes (values come from the model's
        own state dict, loaded afterwards), so the parameter layout matches the checkpoint.
        Raises :class:`CheckpointMismatchError`, before the model or the optimizer changes, when
        the checkpoint's hand-offs cannot be those of this optimizer and model: a layer this
        optimizer handed off at another rank, shape or group, or not at all in the checkpoint
        (a hand-off cannot be undone), or a recorded layer that the model lacks, that is of
        another type or shape, or whose weight is not in the recorded projected param group.
        """
        saved = state_dict.get(_CHECKPOINT_KEY, {"plan": {}, "handoffs": []})
        saved_plan = {name: _plan_entry(name, entry) for name, entry in saved["plan"].items()}
        self._check_own_handoffs(saved_plan)
        pending = {name: entry for name, entry in saved_plan.items() if name not in self.plan}
        if pending:
            if self.model is None:
                raise ValueError(
                    f"This checkpoint was taken after {len(pending)} hand-off(s) "
                    f"({', '.join(list(pending)[:3])}...); construct WeLoreAdamW(model=...) so "
                    "they can be re-applied before loading"
                )
            self._reapply(pending)
        super().load_state_dict(state_dict)
        self.handoffs = [dict(record) for record in saved["handoffs"]]
        self.tapering = {
            name: {**entry, "basis": entry["basis"].clone()}
            for name, entry in saved.get("tapering", {}).items()
        }

    def _check_own_handoffs(self, saved_plan: dict[str, dict[str, Any]]) -> None:
        """Every hand-off this optimizer made must be in the checkpoint, at the same rank,
        shape and group: otherwise the saved factor moments have other shapes than the
        factors, or there are none for them."""
        for name, mine in self.plan.items():
            theirs = saved_plan.get(name)
            if theirs is None:
                raise CheckpointMismatchError(
                    f"This optimizer handed off layer {name!r} (rank {mine['rank']}, shape "
                    f"{mine['shape']}), but the checkpoint has it dense; a hand-off cannot be "
                    "undone: load the checkpoint into a fresh model and optimizer"
                )
            differs = [
                f"{key} {theirs[key]} in the checkpoint vs {key} {mine[key]} here"
                for key in ("rank", "shape", "group")
                if theirs[key] != mine[key]
            ]
            if differs:
                raise CheckpointMismatchError(
                    f"Layer {name!r} was handed off differently: {'; '.join(differs)}. Its "
                    "saved factor moments do not fit this optimizer's factors: load the "
                    "checkpoint into a fresh model and optimizer"
                )

    def _reapply(self, pending: dict[str, dict[str, Any]]) -> None:
        """Re-apply recorded hand-offs: all are checked first, then all are applied."""
        module = _unwrap(self.model)
        modules = dict(module.named_modules())
        candidates = {c.name: c for c in projected_linears(module, self, self.is_projected)}
        checked = [
            (self._pending_candidate(name, entry, modules, candidates), entry)
            for name, entry in pending.items()
        ]
        for candidate, entry in checked:
            weight = candidate.weight
            rows, cols = entry["shape"]
            factored = LowRankLinear(cols, rows, entry["rank"], False, weight.device, weight.dtype)
            if candidate.module.bias is not None:
                factored.bias = candidate.module.bias
            self.state.pop(weight, None)
            replace_module(module, candidate.name, factored)
            self._move_to_factor_group(candidate, weight, factored)
            self.plan[candidate.name] = dict(entry)

    def _pending_candidate(
        self,
        name: str,
        entry: dict[str, Any],
        modules: dict[str, nn.Module],
        candidates: dict[str, HandoffCandidate],
    ) -> HandoffCandidate:
        """The layer a recorded hand-off applies to, or CheckpointMismatchError saying why not."""
        rank, shape, group = entry["rank"], entry["shape"], entry["group"]
        saved = (
            f"Checkpoint hands off layer {name!r} (rank {rank}, shape {shape} as out x in, "
            f"param group {group})"
        )
        layer = modules.get(name)
        if layer is None:
            raise CheckpointMismatchError(f"{saved}, but the model has no module {name!r}")
        dense = dense_weight_of(layer)
        if dense is None:
            raise CheckpointMismatchError(
                f"{saved}, but the model's {name!r} is a {type(layer).__name__}; only nn.Linear "
                "and transformers Conv1D layers are handed off"
            )
        if list(dense.shape) != shape:
            raise CheckpointMismatchError(
                f"{saved}, but the model's {name!r} has shape {list(dense.shape)}"
            )
        if not 1 <= rank <= min(shape):
            raise CheckpointMismatchError(f"{saved}: rank {rank} is not in [1, {min(shape)}]")
        if not 0 <= group < len(self.param_groups):
            raise CheckpointMismatchError(
                f"{saved}, but this optimizer has param groups 0..{len(self.param_groups) - 1}"
            )
        if self.param_groups[group].get("rank") is None:
            raise CheckpointMismatchError(
                f"{saved}, but this optimizer's param group {group} is not projected"
            )
        candidate = candidates.get(name)
        if candidate is None:
            raise CheckpointMismatchError(
                f"{saved}, but this optimizer cannot hand it off: its weight is not projected "
                "here, or it is tied to another module"
            )
        if candidate.group_index != group:
            raise CheckpointMismatchError(
                f"{saved}, but its weight is in param group {candidate.group_index} here"
            )
        return candidate


def _plan_entry(name: str, entry: Any) -> dict[str, Any]:
    """A checkpoint's hand-off record with ``rank``, ``shape`` and ``group`` as Python ints."""
    try:
        rank, group = int(entry["rank"]), int(entry["group"])
        shape = [int(size) for size in entry["shape"]]
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointMismatchError(
            f"Checkpoint hand-off record of layer {name!r} is malformed ({entry!r}); expected "
            "rank (int), shape ([rows, cols]) and group (int)"
        ) from error
    if len(shape) != 2:
        raise CheckpointMismatchError(
            f"Checkpoint hand-off record of layer {name!r} has shape {shape}; expected [rows, cols]"
        )
    return {**entry, "rank": rank, "shape": shape, "group": group}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _rewrap(old: nn.parallel.DistributedDataParallel, module: nn.Module) -> nn.Module:
    """A new DDP wrapper around the changed module, with the old wrapper's options."""
    return nn.parallel.DistributedDataParallel(
        module,
        device_ids=old.device_ids,
        output_device=old.output_device,
        broadcast_buffers=old.broadcast_buffers,
        find_unused_parameters=old.find_unused_parameters,
        gradient_as_bucket_view=old.gradient_as_bucket_view,
    )
