"""Layer-wise updates on FSDP2: a parameter steps once its reduce-scatter has produced its shard.

FSDP2 (``fully_shard``) reduce-scatters a module's gradients in that module's post-backward and,
for each sharded ``DTensor`` parameter, assigns (or adds to) ``param.grad`` and then calls the
parameter's post-accumulate-grad hooks itself (``foreach_reduce`` in
``torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py``: the hooks in
``param._post_accumulate_grad_hooks``, the ones ``register_post_accumulate_grad_hook`` adds).
That is FSDP2's own optimizer-in-backward point, so :class:`~lowrank_optim.LayerwiseOptimizer`
keeps the hook it registers in one process: there it fires after the reduce-scatter, on the
averaged row shard ``G_k`` (``Shard(0)``), steps this rank's rows and frees the shard.

Collectives inside the hook. A step on the FSDP2 placement communicates (one all-reduce of the
finite flag per parameter, the Gram all-reduce of a basis refresh, the captured-energy sums), so
every rank must step the same parameters in the same order. They do: the hooks run on the
autograd thread, synchronously inside ``foreach_reduce``, module by module in the order in which
the post-backward hooks of the same autograd graph fire (and the root's final callback, which
visits the remaining modules in a fixed order), parameter by parameter in registration order.
Every rank runs the same model, so the same graph, so the same sequence; a rank whose forward
took another branch would already hang FSDP's own reduce-scatters.

Accumulation over ``k`` micro-batches works in both ways FSDP2 offers:

* reduce-scatter every micro-batch (the default): the hook fires every backward; the layer-wise
  optimizer folds the shard into its accumulator (``sum_i G_k,i``, or ``sum_i G_k,i Q`` for a
  right-projected weight whose basis ``Q`` is fixed for the next step: ``m_k x r`` per rank)
  and frees it. Nothing full-size outlives a module's backward;
* ``set_requires_gradient_sync(False)`` on the first ``k - 1`` (FSDP's ``no_sync``): FSDP keeps
  the unsharded sum itself and no hook fires until the ``k``-th backward reduce-scatters it.

In the second way no parameter hook marks the end of a backward, so :class:`BackwardFollower`
hooks the root module's outputs in forward: their gradient arrives first in every backward, and
the layer-wise optimizer queues its end-of-backward callback from there (after FSDP's own final
callback, which was queued earlier from the same outputs, so FSDP's last reduce-scatters and
their hooks run first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_leaves

__all__ = [
    "BackwardFollower",
    "as_sharded_grad",
    "is_sharded",
    "local_rows",
    "local_shape",
    "reduces_gradients",
    "square_sum",
    "sum_over_ranks",
]


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 parameter or gradient)."""
    return isinstance(tensor, DTensor)


def local_rows(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a ``DTensor``; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_shape(param: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` (the parameter's, or its low-rank ``m x r``) with this rank's number of rows."""
    if not isinstance(param, DTensor):
        return shape
    return (param.to_local().shape[0], *shape[1:])


def as_sharded_grad(param: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (this rank's gradient rows) as a gradient for ``param``: a ``DTensor`` laid out
    like it (uneven shards included), or ``rows`` itself for a plain parameter."""
    if not isinstance(param, DTensor):
        return rows
    return DTensor.from_local(
        rows,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def square_sum(param: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``||rows||^2`` in fp32, summed over the ranks that hold ``param``'s other rows."""
    total = torch.linalg.vector_norm(rows, dtype=torch.float32).square()
    if isinstance(param, DTensor):
        dist.all_reduce(total, group=param.device_mesh.get_group())
    return total


def sum_over_ranks(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over the ranks of ``param``'s mesh (a sum of this rank's rows)."""
    total = value.clone()
    dist.all_reduce(total, group=param.device_mesh.get_group())
    return total


def reduces_gradients(model: nn.Module) -> bool:
    """Whether the coming backward reduce-scatters (no FSDPModule in ``model`` has
    ``set_requires_gradient_sync(False)``); ``True`` where torch hides the flag."""
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        for group in getattr(state, "_fsdp_param_groups", ()):
            if not getattr(group, "reduce_grads", True):
                return False
    return True


class BackwardFollower:
    """Calls ``on_backward`` at the start of every backward through ``model``'s outputs.

    A forward hook on the root module registers a gradient hook on each output tensor that
    requires grad; the first to fire in a backward calls ``on_backward`` (which queues the
    layer-wise optimizer's end-of-backward callback and checks the window). FSDP2 fires no
    parameter hook in a backward under ``set_requires_gradient_sync(False)``, so without this
    such a backward would not be counted.
    """

    def __init__(self, model: nn.Module, on_backward: Callable[[], None]) -> None:
        self._on_backward = on_backward
        self._handle = model.register_forward_hook(self._after_forward)

    def _after_forward(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        for leaf in tree_leaves(output):
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                leaf.register_hook(self._on_output_grad)

    def _on_output_grad(self, grad: torch.Tensor) -> None:
        self._on_backward()

    def detach(self) -> None:
        """Stop following the model's forward."""
        self._handle.remove()
