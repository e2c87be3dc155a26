"""Layer-wise updates on ``DistributedDataParallel``: a parameter steps once its bucket is reduced.

DDP's reducer copies each gradient into a bucket and calls the model's communication hook when
every gradient of that bucket is there (``register_comm_hook``, ``GradBucket``). This module's
hook is the one :class:`~lowrank_optim.LayerwiseOptimizer` registers: it launches the bucket's
all-reduce and, once that future has completed, steps the bucket's parameters on the averaged
gradient. It is DDP's own optimizer-in-backward mechanism (``_apply_optim_in_backward_hook``,
which DDP installs for ``_apply_optimizer_in_backward``) with three differences that mechanism
cannot express: one optimizer and one scheduler for the whole model, gradient accumulation in
low-rank coordinates, and the window's earlier micro-batches folded into the reduction.

With ``k`` micro-batches per step, the first ``k - 1`` backward passes run under ``no_sync``:
no hook is called, and the layer-wise optimizer folds each local gradient into its accumulator
(``sum_i G_i``, or ``sum_i P^T G_i`` for a projected parameter whose basis is fixed for the next
step) and frees it, as in one process. In the ``k``-th backward, for a bucket's parameters on
``R`` ranks (rank ``j`` holds the local last gradient ``G_k^j``, full sums ``F^j``, low-rank sums
``L^j``):

    buffer  <- (G_k^j + F^j) / R    all-reduced (sum): the mean of the window's full gradient
    low     <- L^j / R              all-reduced (sum), one flat fp32 tensor per bucket
    step with  G = buffer  (full)  or  P^T G_k + low = P^T G  (projected; P agrees on all ranks)

which is the regular DDP step's gradient, up to the rounding of ``P^T`` applied before the
mean. The updates of a bucket run on the autograd thread when the *next* bucket is handed to
the hook (so they overlap that bucket's all-reduce) and, for the last bucket, at the end of
backward; the optimizer is never entered from two threads. The reducer is told that the
optimizer runs in backward (``reducer._set_optimizer_in_backward()``, as DDP does for its own
in-backward optimizers), so it does not copy reduced buckets back into ``.grad``; each
parameter's ``.grad`` is freed as soon as its bucket has copied it.

Memory: DDP keeps its buckets (one gradient's worth) for the life of the wrapper; layer-wise
updates remove the second copy, the ``.grad`` tensors regular DDP keeps next to them (with
``gradient_as_bucket_view=True`` they were views of the buckets already), and the full-size
accumulation of a window.

Limits: a parameter that no rank used in the whole window, under
``find_unused_parameters=True``, sits in its bucket as zeros and steps with a zero gradient
(regular DDP leaves its ``.grad`` alone; the hook cannot tell globally unused from zero). DDP
takes one communication hook, so a model with another hook (compression) is refused.
"""

import weakref
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.futures import Future

__all__ = ["BucketSink", "LayerwiseCommHook", "attach"]


class BucketSink(Protocol):
    """What the hook asks of the layer-wise optimizer (it imports no optimizer class)."""

    def closes_window(self) -> bool:
        """Whether the running backward is the last of its accumulation window."""

    def take_full(self, param: torch.Tensor) -> torch.Tensor | None:
        """Remove and return ``param``'s full-size local sum of the window (or ``None``)."""

    def take_low(self, param: torch.Tensor) -> torch.Tensor | None:
        """Remove and return ``param``'s local ``sum P^T G_i`` of the window (or ``None``)."""

    def step_reduced(
        self, param: torch.Tensor, grad: torch.Tensor, low: torch.Tensor | None
    ) -> None:
        """Step ``param`` on the averaged ``grad`` (plus the averaged low-rank sum ``low``)."""

    def accumulate_reduced(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Fold an averaged gradient (a bucket view, reused later) into the open window."""


@dataclass
class _Pending:
    """A bucket whose all-reduce has been launched; its parameters step once it completes."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    lows: list[torch.Tensor | None]
    flat_low: torch.Tensor | None
    futures: list[Future[list[torch.Tensor]]]
    closing: bool


class LayerwiseCommHook:
    """The DDP communication hook of layer-wise updates (one per DDP wrapper)."""

    def __init__(self, ddp: nn.parallel.DistributedDataParallel, sink: BucketSink) -> None:
        self.sink = sink
        self.group = ddp.process_group
        self._pending: list[_Pending] = []
        self._ddp = weakref.ref(ddp)
        #: whether the last forward with autograd on prepared DDP to reduce its backward
        self.syncs = True
        self._forward_handle = ddp.register_forward_hook(self._after_forward)

    def _after_forward(self, module: nn.Module, inputs: object, output: object) -> None:
        # DDP decides in forward whether the coming backward is reduced (no_sync around forward).
        if torch.is_grad_enabled():
            self.syncs = bool(module.require_backward_grad_sync)

    def reduce(self, state: object, bucket: dist.GradBucket) -> Future[torch.Tensor]:
        """The communication hook (DDP checks these annotations: no postponed evaluation)."""
        params, grads = bucket.parameters(), bucket.gradients()
        for param in params:
            param.grad = None  # the bucket holds its copy now
        world = self.group.size()
        closing = self.sink.closes_window()
        lows: list[torch.Tensor | None] = [None] * len(params)
        if closing:
            for grad, param in zip(grads, params, strict=True):
                full = self.sink.take_full(param)
                if full is not None:
                    grad.add_(full)
            lows = [self.sink.take_low(param) for param in params]
        buffer = bucket.buffer()
        buffer.div_(world)
        futures = [dist.all_reduce(buffer, group=self.group, async_op=True).get_future()]
        present = [low.reshape(-1) for low in lows if low is not None]
        flat_low = None
        if present:
            flat_low = torch.cat(present).div_(world)
            futures.append(dist.all_reduce(flat_low, group=self.group, async_op=True).get_future())
        # Earlier buckets step now, while this one's all-reduce is in flight.
        self.finish()
        self._pending.append(_Pending(params, grads, lows, flat_low, futures, closing))
        return futures[0].then(lambda _: buffer)

    def finish(self) -> None:
        """Wait for every launched bucket and step (or accumulate) its parameters."""
        pending, self._pending = self._pending, []
        for bucket in pending:
            for future in bucket.futures:
                future.wait()
            lows = bucket.lows
            if bucket.flat_low is not None:
                offset, lows = 0, []
                for low in bucket.lows:
                    if low is None:
                        lows.append(None)
                        continue
                    lows.append(bucket.flat_low[offset : offset + low.numel()].view_as(low))
                    offset += low.numel()
            for param, grad, low in zip(bucket.params, bucket.grads, lows, strict=True):
                if bucket.closing:
                    self.sink.step_reduced(param, grad, low)
                else:
                    self.sink.accumulate_reduced(param, grad)

    def detach(self) -> None:
        """Stop following the wrapper's forward (DDP cannot unregister a comm hook)."""
        self._forward_handle.remove()


def attach(ddp: nn.parallel.DistributedDataParallel, sink: BucketSink) -> LayerwiseCommHook:
    """Register the layer-wise hook on ``ddp`` and tell its reducer the optimizer runs in
    backward; refuses a wrapper that already has a communication hook."""
    if getattr(ddp, "_comm_hooks", None):
        names = ", ".join(getattr(hook, "__qualname__", repr(hook)) for hook, _ in ddp._comm_hooks)
        raise ValueError(
            f"This DistributedDataParallel already has a communication hook ({names}); DDP "
            "takes one, and layer-wise updates need theirs to step each bucket after its "
            "all-reduce. Build the DDP wrapper without register_comm_hook."
        )
    reducer = ddp.reducer
    if not hasattr(reducer, "_set_optimizer_in_backward"):
        raise NotImplementedError(
            "This torch's DDP reducer has no _set_optimizer_in_backward(): it would copy every "
            "reduced bucket back into .grad, so layer-wise updates on DDP need a newer torch"
        )
    hook = LayerwiseCommHook(ddp, sink)
    ddp.register_comm_hook(None, hook.reduce)
    reducer._set_optimizer_in_backward()
    return hook
