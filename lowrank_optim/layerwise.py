"""Layer-wise updates: each parameter steps inside backward and its gradient is freed at once.

GaLore (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
ICML 2024, Sec. 4.3 "per-layer weight updates") fits a 7B model in 24 GB partly by never holding
all gradients at once: a ``register_post_accumulate_grad_hook`` on every parameter runs the
optimizer on that parameter as soon as autograd has produced its gradient, then drops the
gradient. The gradient peak falls from ``sum_l |G_l|`` to ``max_l |G_l|``.

Published implementations drop gradient accumulation, build one optimizer and one scheduler per
parameter (so the schedule advances once per parameter) and cannot clip. Here, with
``k = accumulation_steps`` micro-batches per optimizer step and ``G = sum_i G_i``:

* the update runs inside the ``k``-th backward; in earlier ones each gradient is folded into an
  accumulator and freed. A projected parameter whose next step keeps its basis ``P`` accumulates
  ``R = sum_i P^T G_i = P^T G`` (linear, so exact up to rounding): ``r x n`` instead of ``m x n``
  (in fp32, and only where that is smaller than the full sum).
  Dense parameters, and projected ones whose next step needs ``G`` itself (the first step, a
  basis refresh, whose SVD runs on ``G``, and the captured-energy record just after it), keep
  the full sum, as the non-layer-wise optimizer would;
* there is one real optimizer, and at the end of the boundary backward its ``step()`` is called
  once with no gradients left, so one learning-rate scheduler on it (and any step hooks) count
  exactly one step per optimizer step;
* clipping is per parameter by default (``clip="parameter"``):
  ``G_l <- G_l * min(1, c / (||G_l|| + 1e-6))`` (torch's ``clip_grad_norm_`` formula on one
  tensor). For a parameter that accumulated ``R = P^T G``, the norm is ``||R||``: the part of
  ``G`` the update uses;
* ``clip="previous_global"`` clips by the global norm, exactly measured, of the *previous*
  step: ``G_l <- G_l * min(1, c / (N_{t-1} + 1e-6))`` with ``N_t^2 = sum_l ||G_l||^2`` summed
  as the step's parameters go by (one all-reduce per step under FSDP2; none under DDP, whose
  gradients are already averaged). The global norm of step ``t`` is known only after its last
  gradient, when every other parameter has stepped; the alternative, deferring all updates of
  a window until then, would hold every gradient at once, which is what layer-wise updates
  avoid. So the norm lags one step and step 1 is not clipped. Where a window accumulated
  ``R = P^T G``, ``||R||`` enters the sum (with ``accumulation_steps=1``, or on the steps that
  need ``G``, it is ``||G||``: exactly the norm ``clip_grad_norm_`` would take).

Under ``DistributedDataParallel`` (pass the DDP wrapper as ``model``) a parameter steps once its
bucket has been all-reduced: the wrapper registers a DDP communication hook
(:mod:`lowrank_optim.distributed.layerwise_ddp`). Run the first ``k - 1`` backward passes of a
window under ``model.no_sync()``; their gradients are accumulated locally (in low-rank
coordinates where that is smaller) and folded into the last backward's all-reduce.

Under FSDP2 (``fully_shard``; pass the root module as ``model``) a parameter steps once its
reduce-scatter has produced its row shard: FSDP2 calls the parameter's post-accumulate-grad
hook itself after assigning the sharded ``.grad`` (:mod:`lowrank_optim.distributed.layerwise_fsdp`).
Each rank accumulates and steps its own rows (``G_k Q`` for a right-projected weight). Either
let every backward reduce-scatter, or run the first ``k - 1`` under
``model.set_requires_gradient_sync(False)`` (FSDP then keeps the unsharded sum until the last).

Not supported, and refused with an error: a process group of more than
one rank with neither a DDP wrapper nor FSDP2 parameters (nothing would reduce the gradients),
FSDP2 without its root module as ``model`` (a backward FSDP does not reduce fires no hook, so
only the module's outputs tell that it ran), the last backward of a window without gradient
sync (DDP ``no_sync`` or FSDP2 ``set_requires_gradient_sync(False)``), a DDP
wrapper that already has a communication hook (DDP takes one), closures, and optimizers other
than :class:`~lowrank_optim.optim.GaLoreAdamW` and its subclasses (an accelerate-wrapped
optimizer included). Hugging Face ``Trainer`` calls ``optimizer.step()`` itself, so there use
the optimizer without this wrapper. WeLore hand-offs work through
:meth:`LayerwiseOptimizer.maybe_handoff`, which moves the hooks onto the new factors (and onto
the new DDP wrapper; under FSDP2 onto the sharded factors, which FSDP2 hooks after their
reduce-scatter like the weights they replace).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable
from torch.utils.hooks import RemovableHandle

from lowrank_optim.errors import NonFiniteGradientError
from lowrank_optim.optim.galore_adamw import GaLoreAdamW
from lowrank_optim.optim.groups import validate_step_hyperparameters
from lowrank_optim.optim.welore_adamw import WeLoreAdamW
from lowrank_optim.projection import effective_rank, low_rank_shape, project

if TYPE_CHECKING:
    from types import ModuleType

    from lowrank_optim.distributed.layerwise_ddp import LayerwiseCommHook
    from lowrank_optim.distributed.layerwise_fsdp import BackwardFollower

__all__ = ["LayerwiseOptimizer"]

_CHECKPOINT_KEY = "layerwise"
_CLIP_MODES = ("parameter", "previous_global")
_UNREDUCED_MESSAGE = (
    "Layer-wise updates in a process group of {world} ranks need the DistributedDataParallel "
    "wrapper as model= (LayerwiseOptimizer(optimizer, ddp_model)): its communication hook "
    "steps each parameter after its gradient is all-reduced. Without it each parameter would "
    "step on its local gradient and the ranks would diverge."
)
_FSDP_MODEL_MESSAGE = (
    "Layer-wise updates on FSDP2-sharded parameters need the fully_shard-ed root module as "
    "model= (LayerwiseOptimizer(optimizer, model)): a backward under "
    "set_requires_gradient_sync(False) fires no parameter hook, so only the model's outputs "
    "tell that it ran and closed a micro-step."
)
_FSDP_MIXED_MESSAGE = (
    "Layer-wise updates on FSDP2 need every parameter of the optimizer sharded by fully_shard; "
    "{name} is a plain tensor, whose gradient no rank would reduce"
)


class LayerwiseOptimizer:
    """Drives a GaLore-family optimizer one parameter at a time, inside backward.

    Args:
        optimizer: a :class:`GaLoreAdamW` (or subclass: 8-bit, Q-GaLore, WeLore). Build the
            learning-rate scheduler on it, as without layer-wise updates.
        model: the model: the DDP wrapper (its communication hook steps), the FSDP2 root
            module (required there: its outputs count backward passes), and for
            :meth:`maybe_handoff` (optional in one process).
        accumulation_steps: backward passes per optimizer step; the update happens in the last.
        max_grad_norm: clip to this norm (``None``: off).
        clip: ``"parameter"`` (each parameter's gradient to ``max_grad_norm``) or
            ``"previous_global"`` (all of them by the previous step's global norm).

    Example:
        >>> optimizer = GaLoreAdamW(groups, lr=1e-2)
        >>> scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        >>> layerwise = LayerwiseOptimizer(optimizer, model, accumulation_steps=4)
        >>> for index, batch in enumerate(loader):
        ...     (model(**batch).loss / 4).backward()   # steps in every 4th backward
        ...     if layerwise.micro_step == 0:          # that backward closed a window
        ...         scheduler.step()
    """

    def __init__(
        self,
        optimizer: GaLoreAdamW,
        model: nn.Module | None = None,
        *,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        clip: str = "parameter",
    ) -> None:
        if not isinstance(optimizer, GaLoreAdamW):
            raise TypeError(
                f"Invalid optimizer: {type(optimizer).__name__}; layer-wise updates need "
                "GaLoreAdamW, GaLoreAdamW8bit, QGaLoreAdamW or WeLoreAdamW (pass the optimizer "
                "itself, not one wrapped by accelerate)"
            )
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int):
            raise ValueError(
                f"Invalid accumulation_steps: {accumulation_steps!r}; must be an integer >= 1"
            )
        if accumulation_steps < 1:
            raise ValueError(
                f"Invalid accumulation_steps: {accumulation_steps!r}; must be an integer >= 1"
            )
        if max_grad_norm is not None and not (
            isinstance(max_grad_norm, int | float)
            and not isinstance(max_grad_norm, bool)
            and math.isfinite(max_grad_norm)
            and max_grad_norm > 0
        ):
            raise ValueError(
                f"Invalid max_grad_norm: {max_grad_norm!r}; must be a positive finite number "
                "or None"
            )
        if clip not in _CLIP_MODES:
            raise ValueError(f"Invalid clip: {clip!r}; allowed: {', '.join(_CLIP_MODES)}")
        fsdp = _sharded_helpers(optimizer)
        ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if ddp is None and fsdp is None and world > 1:
            raise ValueError(_UNREDUCED_MESSAGE.format(world=world))
        if fsdp is not None and model is None:
            raise ValueError(_FSDP_MODEL_MESSAGE)
        self.optimizer = optimizer
        self.model = model
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.clip = clip
        #: the global gradient norm of the last optimizer step (``clip="previous_global"``)
        self.previous_norm: float | None = None
        self._square_sum = torch.zeros((), dtype=torch.float32)  # of the step being taken
        #: backward passes finished in the current accumulation window (0 right after a step)
        self.micro_step = 0
        #: optimizer steps taken through this wrapper
        self.optimizer_steps = 0
        # Accumulated gradients of the window: full sums, or P^T G sums of projected params.
        self._full: dict[torch.Tensor, torch.Tensor] = {}
        self._low: dict[torch.Tensor, torch.Tensor] = {}
        self._hooks: dict[torch.Tensor, RemovableHandle] = {}
        self._locations: dict[torch.Tensor, tuple[int, int]] = {}
        self._queued_for: int | None = None  # graph task that holds our end-of-backward callback
        #: (group, index) of the parameters updated in this step so far
        self._stepped: list[tuple[int, int]] = []
        self._ddp_hook: LayerwiseCommHook | None = None
        self._reduced: frozenset[torch.Tensor] = frozenset()  # parameters DDP reduces
        # FSDP2: the helpers of lowrank_optim.distributed.layerwise_fsdp (None without DTensors).
        self._fsdp: ModuleType | None = fsdp
        self._follower: BackwardFollower | None = None
        self._sync_hooks()
        if ddp is not None:
            self._attach(ddp)
        if fsdp is not None:
            self._follower = fsdp.BackwardFollower(model, self._on_backward)

    def _attach(self, ddp: nn.parallel.DistributedDataParallel) -> None:
        """Step each parameter DDP reduces from the wrapper's communication hook."""
        from lowrank_optim.distributed.layerwise_ddp import attach

        if self._ddp_hook is not None:
            self._ddp_hook.detach()
        self._ddp_hook = attach(ddp, self)
        # DDP's own list leaves out the parameters it was told to ignore (they are not reduced).
        managed = getattr(ddp, "_module_parameters", None)
        if managed is None:
            managed = [p for p in ddp.module.parameters() if p.requires_grad]
        self._reduced = frozenset(managed)

    # ------------------------------------------------------------------------------- hooks
    def _sync_hooks(self) -> None:
        """Hook exactly the trainable parameters the optimizer holds now."""
        locations = {
            param: (group_index, index)
            for group_index, group in enumerate(self.optimizer.param_groups)
            for index, param in enumerate(group["params"])
            if param.requires_grad
        }
        for param in [p for p in self._hooks if p not in locations]:
            self._hooks.pop(param).remove()
        for param in locations:
            if param not in self._hooks:
                self._hooks[param] = param.register_post_accumulate_grad_hook(self._on_grad)
        self._locations = locations

    def accumulator_numel(self) -> dict[str, int]:
        """Elements held between backward passes: ``{"full": ..., "low_rank": ...}``."""
        return {
            "full": sum(grad.numel() for grad in self._full.values()),
            "low_rank": sum(low.numel() for low in self._low.values()),
        }

    def remove_hooks(self) -> None:
        """Detach from the parameters; backward then accumulates ``.grad`` as usual."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()

    def _queue_end_of_backward(self) -> None:
        task = torch._C._current_graph_task_id()
        if self._queued_for != task:
            # Runs once after this whole backward: counts the micro-step, closes the window.
            Variable._execution_engine.queue_callback(self._end_of_backward)
            self._queued_for = task

    def _on_backward(self) -> None:
        """FSDP2: a backward through the model's outputs starts (before any reduce-scatter)."""
        self._queue_end_of_backward()
        if self.closes_window() and not self._fsdp.reduces_gradients(self.model):  # type: ignore[union-attr]
            raise RuntimeError(
                f"The last backward of an accumulation window ({self.accumulation_steps} "
                "backward passes) runs under set_requires_gradient_sync(False): FSDP2 does not "
                "reduce-scatter its gradients, so no parameter can step. Disable gradient sync "
                "only for the first accumulation_steps - 1 backward passes."
            )

    def _on_grad(self, param: torch.Tensor) -> None:
        self._queue_end_of_backward()
        if self._ddp_hook is not None and param in self._reduced:
            if self._ddp_hook.syncs:
                return  # DDP's reducer copies .grad into its bucket; the comm hook steps it
            if self.closes_window():
                raise RuntimeError(
                    f"The last backward of an accumulation window ({self.accumulation_steps} "
                    "backward passes) ran under DistributedDataParallel.no_sync(): its "
                    "gradients are never all-reduced, so no parameter can step. Run the first "
                    "accumulation_steps - 1 forward/backward passes under no_sync() and the "
                    "last outside it."
                )
        grad = param.grad
        param.grad = None  # freed now: the point of layer-wise updates
        if grad is None:
            return
        if self._fsdp is not None:
            grad = self._fsdp.local_rows(grad)  # FSDP2: this rank's rows, already averaged
        if self.closes_window():
            self._step_parameter(param, grad)
        else:
            self._accumulate(param, grad)

    # ------------------------------------------------- DDP (BucketSink of layerwise_ddp)
    def closes_window(self) -> bool:
        """Whether the running backward is the last of its accumulation window."""
        return self.micro_step == self.accumulation_steps - 1

    def take_full(self, param: torch.Tensor) -> torch.Tensor | None:
        """Remove ``param``'s full-size sum of the window (DDP adds it to the bucket)."""
        return self._full.pop(param, None)

    def take_low(self, param: torch.Tensor) -> torch.Tensor | None:
        """Remove ``param``'s ``sum P^T G_i`` of the window (DDP all-reduces it)."""
        return self._low.pop(param, None)

    def step_reduced(
        self, param: torch.Tensor, grad: torch.Tensor, low: torch.Tensor | None
    ) -> None:
        """Step on an all-reduced gradient: ``grad`` already holds the window's full sums."""
        if param not in self._locations:
            param.grad = grad.clone()  # DDP reduces it, the optimizer does not hold it
            return
        if low is not None:
            self._low[param] = low
        self._step_parameter(param, grad)

    def accumulate_reduced(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """A backward outside no_sync that does not close the window: keep its mean gradient
        (a bucket view, so copied if kept whole); the boundary's all-reduce of the sums is then
        still right, since the mean of a value every rank holds is that value."""
        if param not in self._locations:
            param.grad = grad.clone()  # DDP reduces it, the optimizer does not hold it
            return
        self._accumulate(param, grad, owned=False)

    def _bases(self, param: torch.Tensor) -> dict[str, torch.Tensor] | None:
        group_index, _ = self._locations[param]
        return self.optimizer.next_step_bases(self.optimizer.param_groups[group_index], param)

    def _accumulate(self, param: torch.Tensor, grad: torch.Tensor, owned: bool = True) -> None:
        if param in self._full:
            self._full[param].add_(grad)
            return
        bases = self._bases(param)
        if bases is None or not self._low_rank_saves_memory(param):
            # The window's first gradient becomes the sum, as autograd's own accumulation does.
            self._full[param] = grad if owned else grad.clone()
            return
        # Low-rank sums are small, so keep them in fp32: bf16 sums lose the low bits.
        low = project(grad, bases).float()
        if param in self._low:
            self._low[param].add_(low)
        else:
            self._low[param] = low

    def _low_rank_saves_memory(self, param: torch.Tensor) -> bool:
        """Whether an fp32 ``P^T G`` sum is smaller than the full sum (not if r ~ min(m, n)).

        Decided on the global shape, so that every FSDP2 rank decides alike."""
        group = self.optimizer.param_groups[self._locations[param][0]]
        rank = effective_rank(group["rank"], param.shape)
        low_numel = math.prod(low_rank_shape(group["proj_type"], param.shape, rank))
        return low_numel * 4 < param.numel() * param.dtype.itemsize

    def _step_parameter(self, param: torch.Tensor, grad: torch.Tensor | None) -> None:
        group_index, index = self._locations[param]
        if not self._stepped:
            # Before the window's first update: a bad lr set since the last step must not
            # leave the parameters that step before its group updated and the rest not.
            validate_step_hyperparameters(self.optimizer.param_groups)
        low = self._low.pop(param, None)
        if low is not None:
            bases = self._bases(param)
            if grad is not None and bases is not None:  # bases are fixed inside a window
                low.add_(project(grad, bases).float())
            self._clip_(param, low)
            self._step_one(group_index, index, {index: low})
            return
        total = self._full.pop(param, None)
        if total is None:
            total = grad
        elif grad is not None:
            total.add_(grad)
        if total is None:
            return
        self._clip_(param, total)
        param.grad = total if self._fsdp is None else self._fsdp.as_sharded_grad(param, total)
        try:
            self._step_one(group_index, index)
        finally:
            param.grad = None

    def _step_one(
        self, group_index: int, index: int, low_rank_grads: dict[int, torch.Tensor] | None = None
    ) -> None:
        """Step one parameter; a non-finite gradient is reported with what already stepped.

        The optimizer's own :class:`NonFiniteGradientError` says no update was applied, which
        holds for ``optimizer.step()``; here each parameter steps inside backward as its
        gradient arrives, so the ones before it in this step are already updated. Checking
        every gradient first would hold them all at once, which layer-wise updates exist to
        avoid, so the error says exactly which parameters moved instead.
        """
        try:
            self.optimizer.step_parameters(group_index, [index], low_rank_grads)
        except NonFiniteGradientError as error:
            # Names only now: looking them up on every step would sit on the backward's path.
            stepped, self._stepped = self._stepped, []
            name_of = self.optimizer.param_name
            groups = self.optimizer.param_groups
            message = _partial_step_message(
                name_of(groups[group_index], index), [name_of(groups[g], i) for g, i in stepped]
            )
            raise NonFiniteGradientError(message) from error
        self._stepped.append((group_index, index))

    def _clip_(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """``grad *= min(1, max_norm / (norm + 1e-6))``, torch's clip_grad_norm_ formula, with
        ``norm`` this gradient's (under FSDP2 over all ranks' rows) or the previous step's
        global one, whose square sum this gradient joins."""
        if self.max_grad_norm is None:
            return
        if self.clip == "previous_global":
            rows = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
            self._square_sum = self._square_sum.to(rows.device) + rows
            if self.previous_norm is None:
                return  # step 1: no global norm is known yet
            coefficient = min(1.0, self.max_grad_norm / (self.previous_norm + 1e-6))
            if coefficient < 1.0:
                grad.mul_(coefficient)
            return
        if self._fsdp is not None:
            norm = self._fsdp.square_sum(param, grad).sqrt()
        else:
            norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        coefficient = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
        grad.mul_(coefficient.to(grad.dtype))

    def _close_global_norm(self) -> None:
        """The step's global norm, for the next step's clip (FSDP2: rows summed over ranks)."""
        if self.max_grad_norm is None or self.clip != "previous_global":
            return
        total = self._square_sum
        self._square_sum = torch.zeros((), dtype=torch.float32)
        if self._fsdp is not None:
            total = self._fsdp.sum_over_ranks(self._flat_params()[0], total)
        self.previous_norm = float(total.sqrt())

    def _end_of_backward(self) -> None:
        self._queued_for = None
        if self._ddp_hook is not None:
            self._ddp_hook.finish()  # the last buckets' updates (or accumulation)
        if self.micro_step < self.accumulation_steps - 1:
            self.micro_step += 1
            return
        # Parameters that got gradients earlier in the window but none in its last backward.
        for param in list(self._low) + list(self._full):
            if param in self._reduced:
                name = self.optimizer.param_name(*self._name_of(param))
                raise RuntimeError(
                    f"Parameter {name} accumulated gradients in this window but DDP did not "
                    "reduce it in the window's last backward, so its ranks disagree; use it in "
                    "every backward, or build DDP with find_unused_parameters=True"
                )
            self._step_parameter(param, None)
        self._check_unhooked_gradients()
        self._close_global_norm()
        self._stepped = []
        # No gradient is left, so this updates nothing; it lets a scheduler built on the
        # optimizer (and any step hooks) see exactly one step per optimizer step.
        self.optimizer.step()
        self.micro_step = 0
        self.optimizer_steps += 1

    def _name_of(self, param: torch.Tensor) -> tuple[dict[str, Any], int]:
        group_index, index = self._locations[param]
        return self.optimizer.param_groups[group_index], index

    def _check_unhooked_gradients(self) -> None:
        for group in self.optimizer.param_groups:
            for index, param in enumerate(group["params"]):
                if param.grad is not None and param not in self._hooks:
                    name = self.optimizer.param_name(group, index)
                    raise RuntimeError(
                        f"Parameter {name} has a gradient but no layer-wise hook: it joined the "
                        "optimizer after LayerwiseOptimizer was built (add_param_group or a "
                        "hand-off through optimizer.maybe_handoff). Call "
                        "LayerwiseOptimizer.maybe_handoff(model) for hand-offs, or build a new "
                        "LayerwiseOptimizer after add_param_group."
                    )

    # ------------------------------------------------------------------ optimizer interface
    def step(self, closure: Callable[[], float] | None = None) -> None:
        """Check that the last backward closed an accumulation window (the update is done).

        The parameters were updated inside that backward, so loops written for a regular
        optimizer keep their shape; calling it after a backward that did not close a window
        means the loop and ``accumulation_steps`` disagree, and is refused.
        """
        if closure is not None:
            raise ValueError(
                "Layer-wise updates with a closure are not supported: parameters step inside "
                "backward, so a closure cannot re-evaluate the loss before the update. Call "
                "loss.backward() yourself, or use the optimizer without LayerwiseOptimizer."
            )
        if self.micro_step != 0:
            raise RuntimeError(
                f"step() called after {self.micro_step} of {self.accumulation_steps} backward "
                "passes: layer-wise updates step inside the last backward of each window. Call "
                "step() only after every accumulation_steps-th backward."
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients of hooked parameters are already freed; accumulators are kept."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def maybe_handoff(self, model: nn.Module | None = None) -> nn.Module:
        """``WeLoreAdamW.maybe_handoff``, then hooks moved from handed-off weights to factors.

        Only between optimizer steps (``micro_step == 0``): no window sum is pending, so nothing
        accumulated for a removed weight is lost. On DDP a re-wrapped model gets the
        communication hook. On FSDP2 the hand-off is in place: the factors join the weight's
        FSDP2 parameter group as sharded ``DTensor`` parameters (the same objects the optimizer
        now holds), so FSDP2 fires their post-accumulate-grad hooks after its reduce-scatter,
        and the root module, whose outputs :class:`BackwardFollower` hooks, stays the same.
        """
        if not isinstance(self.optimizer, WeLoreAdamW):
            raise TypeError(
                f"maybe_handoff needs a WeLoreAdamW; this LayerwiseOptimizer drives a "
                f"{type(self.optimizer).__name__}"
            )
        if self.micro_step != 0:
            raise RuntimeError(
                f"maybe_handoff called after {self.micro_step} of {self.accumulation_steps} "
                "backward passes; hand off only between optimizer steps"
            )
        previous = self.model
        model = self.optimizer.maybe_handoff(model if model is not None else self.model)
        self.model = model
        self._sync_hooks()
        # Bookkeeping keyed by parameter: drop whatever belonged to a removed weight (empty
        # between steps; kept in step with the parameters the optimizer holds).
        for sums in (self._full, self._low):
            for param in [p for p in sums if p not in self._locations]:
                del sums[param]
        if self._follower is not None and model is not previous:
            # FSDP2: a hand-off returns the same root; one that did not would need its outputs.
            self._follower.detach()
            self._follower = self._fsdp.BackwardFollower(model, self._on_backward)  # type: ignore[union-attr]
        if isinstance(model, nn.parallel.DistributedDataParallel) and model is not previous:
            self._attach(model)  # a hand-off re-wrapped DDP: the new wrapper needs the hook
        return model

    # ------------------------------------------------------------------------ checkpoints
    def _flat_params(self) -> list[torch.Tensor]:
        return [param for group in self.optimizer.param_groups for param in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state dict plus the window: micro-step and accumulated gradients.

        Tensors only (loads with ``weights_only=True``); accumulators are keyed by the
        parameter's position over all param groups, as torch keys optimizer state.
        """
        position = {param: n for n, param in enumerate(self._flat_params())}
        return {
            "optimizer": self.optimizer.state_dict(),
            _CHECKPOINT_KEY: {
                "accumulation_steps": self.accumulation_steps,
                "micro_step": self.micro_step,
                "optimizer_steps": self.optimizer_steps,
                "previous_norm": self.previous_norm,
                "full": {position[p]: grad for p, grad in self._full.items()},
                "low_rank": {position[p]: low for p, low in self._low.items()},
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict` output (after hand-offs, with the dense model, as usual)."""
        saved = state_dict[_CHECKPOINT_KEY]
        if int(saved["micro_step"]) >= self.accumulation_steps:
            raise ValueError(
                f"Checkpoint was saved after {saved['micro_step']} backward passes of a window; "
                f"this LayerwiseOptimizer has accumulation_steps={self.accumulation_steps}"
            )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._sync_hooks()
        params = self._flat_params()
        self._full, self._low = {}, {}
        for position, grad in saved["full"].items():
            param = params[int(position)]
            self._check_shape("full", param, grad, self._local_shape(param, tuple(param.shape)))
            self._full[param] = grad.to(device=param.device, dtype=param.dtype)
        for position, low in saved["low_rank"].items():
            param = params[int(position)]
            group = self.optimizer.param_groups[self._locations[param][0]]
            if self.optimizer.next_step_bases(group, param) is None:
                raise ValueError(
                    f"Checkpoint holds a low-rank gradient for parameter {position}, whose next "
                    "step needs the full gradient; the optimizer state does not match it"
                )
            rank = effective_rank(group["rank"], param.shape)
            expected = low_rank_shape(group["proj_type"], param.shape, rank)
            self._check_shape("low-rank", param, low, self._local_shape(param, expected))
            self._low[param] = low.to(device=param.device)
        self.micro_step = int(saved["micro_step"])
        self.optimizer_steps = int(saved["optimizer_steps"])
        previous = saved.get("previous_norm")  # absent in checkpoints of older versions
        self.previous_norm = None if previous is None else float(previous)

    def _local_shape(self, param: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
        """FSDP2: each rank saves (and loads) its own rows of the window's sums."""
        return shape if self._fsdp is None else self._fsdp.local_shape(param, shape)

    @staticmethod
    def _check_shape(
        kind: str, param: torch.Tensor, value: torch.Tensor, expected: tuple[int, ...]
    ) -> None:
        if tuple(value.shape) != expected:
            raise ValueError(
                f"Checkpoint {kind} gradient has shape {tuple(value.shape)}; the parameter of "
                f"shape {tuple(param.shape)} needs {expected}"
            )


def _partial_step_message(name: str, stepped: list[str]) -> str:
    """What a non-finite gradient of ``name`` left behind in a layer-wise step."""
    if stepped:
        more = len(stepped) - 3
        shown = ", ".join(stepped[:3]) + (f" and {more} more" if more > 0 else "")
        moved = f"{len(stepped)} parameter(s) of this step were already updated ({shown})"
    else:
        moved = "no parameter of this step had been updated yet"
    return (
        f"Non-finite (NaN or Inf) gradient in {name}: it was not updated. Layer-wise updates "
        f"step each parameter inside backward as its gradient arrives, so {moved}, and the "
        "ones after it were not (this error stops the backward). Load the last checkpoint to "
        "undo the partial step, or pass on_bad_gradient='skip' to skip bad updates with a "
        "warning"
    )


def _sharded_helpers(optimizer: GaLoreAdamW) -> ModuleType | None:
    """:mod:`lowrank_optim.distributed.layerwise_fsdp` if the parameters are FSDP2 DTensors
    (all of them, or refused), else ``None``; loads nothing distributed otherwise."""
    if "torch.distributed.tensor" not in sys.modules:
        return None  # without torch.distributed.tensor loaded no parameter is a DTensor
    from lowrank_optim.distributed import layerwise_fsdp

    where = [
        (group, index, layerwise_fsdp.is_sharded(param))
        for group in optimizer.param_groups
        for index, param in enumerate(group["params"])
    ]
    if not any(sharded for _, _, sharded in where):
        return None
    for group, index, sharded in where:
        if not sharded:
            raise ValueError(_FSDP_MIXED_MESSAGE.format(name=optimizer.param_name(group, index)))
    return layerwise_fsdp
