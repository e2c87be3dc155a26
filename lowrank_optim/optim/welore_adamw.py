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
from lowrank_optim.config import HandoffConfig, StabilityConfig
from lowrank_optim.factorize import worth_factorizing
from lowrank_optim.handoff import (
    FACTORS_OF,
    LR_SCALE,
    RETIRED_AT,
    HandoffCandidate,
    Refusal,
    advance_taper_,
    check_own_handoffs,
    factor_group,
    factor_group_of,
    factor_lr_stages,
    find_candidates,
    first_check_step,
    hand_off_layer,
    is_check_step,
    is_sharded_weight,
    largest_handoff_rank,
    parse_plan_entry,
    plan_entry_of,
    reapply_plan,
    refuse_sharded_handoff,
    retire,
    retired_wrapper_error,
    rewrap,
    stable_long_enough,
    taper_entry,
    unwrap,
    welore_ranks,
)
from lowrank_optim.optim.galore_adamw import GaLoreAdamW

__all__ = ["WeLoreAdamW"]

#: Key of the hand-off plan, records and tapers in :meth:`WeLoreAdamW.state_dict`.
CHECKPOINT_KEY = "welore"


class WeLoreAdamW(GaLoreAdamW):
    """GaLoreAdamW plus stability tracking plus WeLore hand-offs to low-rank factors.

    Args:
        params, lr, betas, eps, weight_decay, projection, on_bad_gradient: as
            :class:`GaLoreAdamW` (passed through to it).
        stability: the stability criterion that decides when a layer is ready
            (:class:`StabilityConfig`, as in :class:`GaLoreAdamW`).
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

    This class decides *when* (its hooks :meth:`ready_for_handoff`, :meth:`ready_layers`,
    :meth:`handoff_due`, :meth:`layer_ranks` may be overridden); :mod:`lowrank_optim.handoff`
    does the rest.
    """

    def __init__(
        self,
        params: Iterable[Any],
        *args: Any,
        stability: StabilityConfig | None = None,
        handoff: HandoffConfig | None = None,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if handoff is not None and not isinstance(handoff, HandoffConfig):
            raise ValueError(f"Invalid handoff: {handoff!r}; expected a HandoffConfig")
        self.handoff_config = handoff or HandoffConfig()
        self._factor_groups_made = False  # the constructor appends them after every group
        super().__init__(params, *args, stability=stability, **kwargs)
        self.model = model
        #: layer name -> {"rank": k, "shape": [m, n], "group": source group index}, in order
        self.plan: dict[str, dict[str, Any]] = {}
        self.handoffs: list[dict[str, Any]] = []
        #: layer name -> plan entry plus "start", "last", "basis", "left": layers being tapered
        self.tapering: dict[str, dict[str, Any]] = {}
        self._warned: set[tuple[str, str]] = set()  # (layer, why): each warning only once
        # Within one check step only (cleared after it): the layers that may go now -> the most
        # singular vectors their hand-off can use, and the FSDP2 spectra's decompositions.
        self._keep_vectors: dict[str, int] = {}
        self._decompositions: dict[str, Any] = {}
        if model is not None:
            self._warn_refusals(find_candidates(unwrap(model), self, self.is_projected)[1])
        for index, group in enumerate(list(self.param_groups)):
            if group.get("rank") is not None:
                self.add_param_group(self._factor_group(group, index))
        self._factor_groups_made = True

    def _factor_group(self, group: dict[str, Any], index: int) -> dict[str, Any]:
        return factor_group(group, index, self.handoff_config.factor_lr_scale)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As :meth:`GaLoreAdamW.add_param_group`; a projected group added after construction
        gets its factor group at once, so its layers can be handed off like the others."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if self._factor_groups_made and group.get("rank") is not None:
            super().add_param_group(self._factor_group(group, len(self.param_groups) - 1))

    # ---------------------------------------------------------------------------- hooks
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
        return stable_long_enough(self.state.get(param), step, self.handoff_config.min_stable_steps)

    def ready_layers(self, candidates: list[HandoffCandidate], step: int) -> list[HandoffCandidate]:
        """The candidates that may be handed off at check step ``step`` (``HandoffConfig.trigger``).

        ``stable``: each layer on its own, once stable long enough. ``step``: all of them, at the
        first check step at or after ``start_step`` only (the one-shot baseline).
        """
        config = self.handoff_config
        if config.trigger == "step":
            return list(candidates) if step == first_check_step(config) else []
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
        return is_check_step(self.handoff_config, self.current_step() if step is None else step)

    @property
    def check_step_decompositions(self) -> dict[str, Any]:
        """The FSDP2 spectra taken at the current check step, by layer name (empty between
        check steps and in one process): read-only, for measurements and diagnostics."""
        return dict(self._decompositions)

    def layer_ranks(self, candidates: list[HandoffCandidate]) -> dict[str, int]:
        """Ranks for the dense projected layers under WeLore's global threshold (the target
        counts the rank that earlier hand-offs removed); subclasses may allocate otherwise."""
        committed = [*self.plan.values(), *self.tapering.values()]
        return welore_ranks(
            candidates,
            committed,
            self.handoff_config.target_reduction,
            keep=self._keep_vectors,
            decompositions=self._decompositions,
        )

    # ------------------------------------------------------------------------- hand-off
    def maybe_handoff(self, model: nn.Module | None = None) -> nn.Module:
        """Hand off the layers that qualify now; returns the model to keep training.

        Cheap on most steps: it only looks at the state unless the step is a check step and at
        least one layer is ready. A ``DistributedDataParallel`` model is unwrapped, changed and
        re-wrapped (with its original options), so gradients of the new factors are reduced;
        every rank takes the same decisions because weights and optimizer state agree across
        ranks. The old wrapper is retired: a forward through it, or passing it here again,
        raises (it would not reduce the factors' gradients), so keep what this returns.
        """
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("maybe_handoff needs the model: pass it, or WeLoreAdamW(model=...)")
        if hasattr(model, RETIRED_AT):
            raise retired_wrapper_error(model)
        step = self.current_step()
        module = unwrap(model)
        changed = self._advance_tapers(module, step)
        if self.handoff_due(step):
            changed = self._select(module, step) or changed
        if not changed:
            return model
        if module is model:
            new_model = module
        else:
            new_model = rewrap(model, module)
            retire(model, step)
        if self.model is model:
            self.model = new_model
        return new_model

    def _select(self, module: nn.Module, step: int) -> bool:
        """Choose the layers that go at this check step: hand them off, or start tapering them."""
        config = self.handoff_config
        candidates, refusals = find_candidates(module, self, self.is_projected)
        self._warn_refusals(refusals)
        candidates = [c for c in self._unfrozen(candidates, step) if c.name not in self.tapering]
        ready = self.ready_layers(candidates, step)
        if not ready:
            return False
        refuse_sharded_handoff(ready, config.taper_steps)  # before anything changes
        # The FSDP2 spectra keep the top vectors of the sharded layers that may go now, so that
        # their hand-off takes its factors from the same decomposition (no second pass).
        self._keep_vectors = {
            c.name: largest_handoff_rank(*c.module.weight.shape, config.min_ratio)
            for c in ready
            if is_sharded_weight(c.weight)
        }
        try:
            ranks = self.layer_ranks(candidates)
            changed = False
            for candidate in ready:
                rows, cols = candidate.module.weight.shape
                rank = ranks[candidate.name]
                if not worth_factorizing(rank, rows, cols, config.min_ratio):
                    continue
                if config.taper_steps > 0:
                    self.tapering[candidate.name] = taper_entry(candidate, rank, step)
                else:
                    self.hand_off(module, candidate, rank, step)
                    changed = True
        finally:
            self._keep_vectors, self._decompositions = {}, {}  # the kept vectors are freed
        return changed

    def _advance_tapers(self, module: nn.Module, step: int) -> bool:
        """Shrink each tapering layer's tail; hand off the layers whose taper ended."""
        changed = False
        for name, entry in list(self.tapering.items()):
            layer = module.get_submodule(name)
            if advance_taper_(layer, entry, step, self.handoff_config.taper_steps):
                del self.tapering[name]
                candidate = HandoffCandidate(name, layer, entry["group"])
                self.hand_off(module, candidate, entry["rank"], step)
                changed = True
        return changed

    def hand_off(self, root: nn.Module, candidate: HandoffCandidate, rank: int, step: int) -> None:
        """Hand ``candidate`` off now at ``rank`` (no readiness or size test), and record it.

        An FSDP2-sharded weight (``fully_shard``) is factorized shard by shard and its factors
        join the weight's FSDP2 group (:mod:`lowrank_optim.distributed.handoff`), from the
        decomposition this check step's spectra kept when there is one (route ``shared``); its
        record also says the factorization route and this rank's peak allocation
        (``peak_bytes``).
        """
        factor_group_of(self.param_groups, candidate.group_index)  # raises before any change
        entry = plan_entry_of(candidate, rank)
        options = {
            "param_groups": self.param_groups,
            "state": self.state,
            "storage": self.moment_storage,
            "fresh": self.handoff_config.moments == "fresh",
            "factor_step": self.handoff_config.factor_step,
        }
        if is_sharded_weight(candidate.weight):
            from lowrank_optim.distributed.handoff import hand_off_sharded_layer

            spectra = self._decompositions.pop(candidate.name, None)
            done = hand_off_sharded_layer(root, candidate, rank, spectra=spectra, **options)
            fields = {**done.fields, "factorize": done.strategy, "peak_bytes": done.peak_bytes}
        else:
            fields = hand_off_layer(root, candidate, rank, **options)
        self.plan[candidate.name] = entry
        self.handoffs.append({"step": step, "layer": candidate.name, **fields})

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

    # ------------------------------------------------------------------- factor lr stages
    def _step_group(
        self,
        group: dict[str, Any],
        indices: Sequence[int],
        low_rank_grads: Mapping[int, torch.Tensor],
    ) -> None:
        """Factor groups step each lr stage with its own scaled ``lr``.

        A factor steps with ``lr * group[LR_SCALE]`` (its ratio to the projected group's lr,
        kept out of ``lr`` so that schedulers setting ``lr`` cannot drop it) times its own
        multiplier (``HandoffConfig.factor_step``; 1
        with ``fixed``) and, for ``j`` steps since its hand-off (this one included),
        ``min(1, j / (rewarmup_steps + 1))``, the multiplier relaxing to 1 over
        ``factor_step_relax`` steps; factors that share a stage share
        one call, so the fused kernel still sees whole stages.
        """
        if FACTORS_OF not in group:
            super()._step_group(group, indices, low_rank_grads)
            return
        ramp, relax = self.handoff_config.rewarmup_steps, self.handoff_config.factor_step_relax
        base = group["lr"]
        ratio = float(group[LR_SCALE])
        stages = factor_lr_stages(group, indices, self.state, ramp, relax)
        for factor, members in stages.items():
            # The group itself with its lr scaled for this stage, not a copy: the step finds
            # a parameter's name and placement by the group's identity.
            group["lr"] = base * ratio * factor
            try:
                super()._step_group(group, members, low_rank_grads)
            finally:
                group["lr"] = base

    def handoff_report(self) -> list[dict[str, Any]]:
        """One record per hand-off: step, layer, rank, parameters before/after, error, overlap."""
        return [dict(record) for record in self.handoffs]

    # --------------------------------------------------------------------------- checkpoints
    def handoff_state(self) -> dict[str, Any]:
        """The plan, hand-off records and tapers: the ``"welore"`` entry of :meth:`state_dict`.

        ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` keeps only ``state`` and
        ``param_groups``; :func:`lowrank_optim.distributed.sharded_checkpoint_state` saves this
        entry beside them.
        """
        return {
            "plan": {name: dict(entry) for name, entry in self.plan.items()},
            "handoffs": [dict(record) for record in self.handoffs],
            "tapering": {name: dict(entry) for name, entry in self.tapering.items()},
        }

    def load_handoff_state(self, saved: Mapping[str, Any]) -> None:
        """Re-apply the hand-offs of ``saved`` (a :meth:`handoff_state`) to the attached model,
        and take over its records and tapers; the optimizer state is not touched.

        The re-applied layers get factors of the recorded shapes whose values come from the
        model's state dict, loaded afterwards; on an FSDP2-sharded model (``fully_shard``) they
        are sharded and join the weight's FSDP2 group as the in-place hand-off does, so the
        parameter layout matches the checkpoint's. Raises :class:`CheckpointMismatchError`,
        before the model or the optimizer changes, when the saved hand-offs cannot be those of
        this optimizer and model: a layer this optimizer handed off at another rank, shape or
        group, or not at all in the checkpoint (a hand-off cannot be undone), or a recorded
        layer that the model lacks, that is of another type or shape, or whose weight is not in
        the recorded projected param group.
        """
        saved_plan = {name: parse_plan_entry(name, entry) for name, entry in saved["plan"].items()}
        check_own_handoffs(self.plan, saved_plan)
        pending = {name: entry for name, entry in saved_plan.items() if name not in self.plan}
        if pending:
            if self.model is None:
                raise ValueError(
                    f"This checkpoint was taken after {len(pending)} hand-off(s) "
                    f"({', '.join(list(pending)[:3])}...); construct WeLoreAdamW(model=...) so "
                    "they can be re-applied before loading (in Trainer: "
                    "optimizers=(WeLoreAdamW(groups, model=model), None), since "
                    "optimizer_cls_and_kwargs cannot pass the model)"
                )
            self.plan.update(reapply_plan(unwrap(self.model), pending, self, self.is_projected))
        self.handoffs = [dict(record) for record in saved["handoffs"]]
        self.tapering = {
            name: {**entry, "basis": entry["basis"].clone()}
            for name, entry in saved.get("tapering", {}).items()
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[CHECKPOINT_KEY] = self.handoff_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            if FACTORS_OF in group:
                # Checkpoints older than LR_SCALE kept the ratio inside the factor group's lr.
                group.setdefault(LR_SCALE, 1.0)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint; hand-offs it records are first re-applied to the attached model
        (:meth:`load_handoff_state`, which says what is refused).

        A state dict without the ``"welore"`` entry (what ``torch.distributed.checkpoint``'s
        ``set_optimizer_state_dict`` passes on) leaves the plan and records as they are: under
        FSDP2 :func:`lowrank_optim.distributed.load_sharded_checkpoint` restores them first.
        """
        saved = state_dict.get(CHECKPOINT_KEY)
        if saved is not None:
            self.load_handoff_state(saved)
        super().load_state_dict(state_dict)
