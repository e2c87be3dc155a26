"""Pretrain LLaMA with any lowrank_optim optimizer under torchrun (DDP or FSDP2): a pattern to copy.

    torchrun --nproc_per_node 2 examples/torchrun_pretrain.py --model 9m --optimizer welore_adamw
    torchrun --nproc_per_node 8 examples/torchrun_pretrain.py --model 1b --dtype bfloat16 \\
        --batch-size 512 --micro-batch-size 16 --seq-len 256 --rank 512 --lr 0.01

One global batch per optimizer step, split over ranks and micro-batches (gradient
accumulation with ``no_sync`` on all but the last micro-batch), gradient clipping, cosine
schedule with warm-up, DDP over gloo (CPU) or NCCL (GPU). The steps are the package's one
training loop, :func:`lowrank_optim.train.train_steps`; this script builds the pieces (corpus,
model, optimizer, placement) and logs. With WeLoreAdamW the loop's one extra line

    model = optimizer.maybe_handoff(model)

hands converged layers off to low-rank factors and re-wraps DDP. Rank 0 writes
``OUT/metrics.jsonl``.

``--layerwise`` steps every parameter inside backward and frees its gradient at once
(:class:`lowrank_optim.LayerwiseOptimizer`), accumulating over the micro-batches (in low-rank
coordinates where that is smaller) and clipping each parameter's gradient to ``--grad-clip`` (a
global norm needs every gradient at once, which layer-wise updates never hold). Under torchrun
each parameter steps in DDP's communication hook once its bucket is all-reduced; with
``--fsdp`` in the hook FSDP2 fires once its reduce-scatter has produced the row shard:

    python examples/torchrun_pretrain.py --model 9m --optimizer galore_adamw --layerwise
    torchrun --nproc_per_node 2 examples/torchrun_pretrain.py --optimizer galore_adamw --layerwise
    torchrun --nproc_per_node 2 examples/torchrun_pretrain.py --fsdp --layerwise

``--fsdp`` shards parameters, gradients and optimizer state by rows with FSDP2 instead
(``examples/fsdp_pretrain.py`` is the same run with ``--fsdp`` implied): every decoder layer
and then the root get ``fully_shard``, the optimizer is built on the sharded (``DTensor``)
parameters and projects on the right (``proj_type="right"``, rows stay local, no communication
per step) with ``refresh="gram_eigh"`` (one all-reduce or all-gather per refresh; see
:mod:`lowrank_optim.distributed.refresh`). Gradient accumulation skips the reduce-scatter on all
but the last micro-batch. ``--checkpoint-dir`` saves model, optimizer, schedule and data
position with ``torch.distributed.checkpoint`` (at ``--save-at`` or the last step) and, with
``--resume``, loads them first; the resumed run continues bit for bit. ``welore_adamw`` (the
default, as under DDP) hands layers off in place on FSDP2 too: each layer is factorized shard by
shard and its factors join the layer's FSDP2 unit (:mod:`lowrank_optim.distributed.handoff`).
The checkpoint carries the hand-off plan, and ``--resume`` re-applies it to the freshly sharded
model before loading (:func:`lowrank_optim.distributed.load_sharded_checkpoint`).

The hand-off window is that of ``lowrank-optim pretrain``: layers whose gradient subspace is
stable go from ``--handoff-start`` (a fraction of the steps) on, checked every
``--update-proj-gap`` steps, and whatever qualifies goes at ``--handoff-end``; WeLore's global
threshold picks the ranks for ``--target-reduction``. Rank 0 prints each hand-off (step, layer,
rank) and logs it to ``metrics.jsonl``.

    torchrun --nproc_per_node 2 examples/torchrun_pretrain.py --fsdp --model 9m
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lowrank_optim.config import HandoffConfig, ProjectionConfig, StabilityConfig
from lowrank_optim.factory import OPTIMIZER_NAMES, OptimizerSpec, build_optimizer
from lowrank_optim.layerwise import LayerwiseOptimizer
from lowrank_optim.reporting import MetricsWriter
from lowrank_optim.train import (
    LLAMA_SIZES,
    DataParallel,
    FullyShardedParallel,
    LoopHooks,
    Parallel,
    StepResult,
    TokenBatches,
    build_corpus,
    build_llama,
    cosine_with_warmup,
    load_llama_config,
    train_steps,
    validation_batches,
)
from lowrank_optim.train.config import PretrainConfig
from lowrank_optim.train.parallel import dcp_state, load_dcp_state
from lowrank_optim.train.records import json_safe

__all__ = ["FSDP_OPTIMIZERS", "main", "parse_args"]

#: Optimizers that run on FSDP2 (QGaLoreAdamW's INT8 weights cannot be sharded).
FSDP_OPTIMIZERS = ("galore_adamw", "galore_adamw8bit", "welore_adamw", "adamw")
#: The hand-off and stability defaults of ``lowrank-optim pretrain``.
PRETRAIN = {field.name: field.default for field in dataclasses.fields(PretrainConfig)}


def parse_args(argv: Sequence[str], fsdp: bool) -> argparse.Namespace:
    """The flags of a DDP run, or (``fsdp``) of an FSDP2 run: same model, data and schedule."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="9m", help=f"{', '.join(LLAMA_SIZES)} or a JSON path")
    optimizers = FSDP_OPTIMIZERS if fsdp else OPTIMIZER_NAMES
    parser.add_argument("--optimizer", default="welore_adamw", choices=optimizers)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="global sequences per step")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="per rank per pass")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2, help="peak lr (GaLore's recipe)")
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument(
        "--grad-clip", type=float, default=1.0, help="max gradient norm, 0 for none"
    )
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--update-proj-gap", type=int, default=50)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--corpus-bytes", type=int, default=6_000_000)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="runs/fsdp" if fsdp else "runs/torchrun")
    window = "fraction of --steps"
    parser.add_argument(
        "--handoff-start", type=float, default=PRETRAIN["handoff_start"], help=window
    )
    parser.add_argument(
        "--handoff-end",
        type=float,
        default=PRETRAIN["handoff_end"],
        help=f"{window} by which every qualifying layer goes; 1: no deadline",
    )
    parser.add_argument("--target-reduction", type=float, default=PRETRAIN["target_reduction"])
    parser.add_argument("--min-ratio", type=float, default=PRETRAIN["min_ratio"])
    parser.add_argument(
        "--layerwise",
        action="store_true",
        help="step each parameter inside backward (one process, DDP or FSDP2)",
    )
    if fsdp:
        parser.add_argument("--checkpoint-dir", default=None, help="DCP directory to save to")
        parser.add_argument(
            "--save-at", type=int, default=None, help="step to save at (default: the last)"
        )
        parser.add_argument("--resume", action="store_true", help="load --checkpoint-dir first")
        return parser.parse_args(argv)
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="shard with FSDP2 instead of DDP (galore_adamw, galore_adamw8bit, welore_adamw, "
        "adamw; DCP checkpoints: --checkpoint-dir, --save-at, --resume)",
    )
    return parser.parse_args(argv)


def optimizer_spec(args: argparse.Namespace, fsdp: bool) -> OptimizerSpec:
    """GaLore settings of the run; FSDP2 projects on the side that keeps its rows local.

    The hand-off window and the stability criterion are those of ``lowrank-optim pretrain``.
    """
    if fsdp:
        projection = ProjectionConfig(
            rank=args.rank,
            update_proj_gap=args.update_proj_gap,
            scale=args.scale,
            proj_type="right",  # FSDP2 shards rows: project on the side that keeps them local
            refresh="gram_eigh",
        )
    else:
        projection = ProjectionConfig(
            rank=args.rank, update_proj_gap=args.update_proj_gap, scale=args.scale
        )
    handoff = HandoffConfig(
        start_step=int(args.handoff_start * args.steps),
        target_reduction=args.target_reduction,
        min_ratio=args.min_ratio,
        check_every=args.update_proj_gap,
        end_step=int(args.handoff_end * args.steps) if args.handoff_end < 1.0 else None,
    )
    stability = StabilityConfig(
        policy=PRETRAIN["stability_policy"],
        threshold=PRETRAIN["stability_threshold"],
        patience=PRETRAIN["stability_patience"],
    )
    return OptimizerSpec(
        name=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        projection=projection,
        stability=stability,
        handoff=handoff,
    )


class RankZeroLog(LoopHooks):
    """Rank 0 logs every step's loss, each evaluation and each hand-off; FSDP2 saves its DCP
    checkpoint."""

    def __init__(
        self, args: argparse.Namespace, parallel: Parallel, val: list[torch.Tensor], run: Any
    ) -> None:
        self.args, self.parallel, self.val, self.run = args, parallel, val, run
        self.writer = (
            MetricsWriter(Path(args.out_dir) / "metrics.jsonl") if parallel.is_main else None
        )

    def after_handoff(
        self, step: int, model: torch.nn.Module, records: list[dict[str, Any]]
    ) -> None:
        if self.writer is None:
            return
        for record in records:
            self.writer.write({"kind": "handoff", **json_safe(record)})
            print(
                f"step {step}: handed off {record['layer']} at rank {record['rank']} "
                f"({record['params_before']} -> {record['params_after']} parameters, "
                f"error {record['relative_error']:.3f})",
                flush=True,
            )

    def after_step(self, result: StepResult, model: torch.nn.Module) -> None:
        args, step = self.args, result.step
        checkpoint = getattr(args, "checkpoint_dir", None)
        if checkpoint is not None and step == (args.save_at or args.steps):
            import torch.distributed.checkpoint as dcp

            dcp.save(dcp_state(model, *self.run), checkpoint_id=checkpoint)
        evaluating = step % args.eval_every == 0 or step == args.steps
        # DDP: rank 0 alone, on the module; FSDP2: every rank runs the (collective) forward.
        eval_loss = self.parallel.evaluate(model, self.val) if evaluating else None
        if self.writer is None:
            return
        lr = self.run[1].get_last_lr()[0]
        self.writer.write({"kind": "train", "step": step, "loss": result.loss, "lr": lr})
        if eval_loss is not None:
            perplexity = math.exp(min(eval_loss, 50.0))
            self.writer.write(
                {"kind": "eval", "step": step, "loss": eval_loss, "perplexity": perplexity}
            )
            print(f"step {step}: train {result.loss:.4f} eval {eval_loss:.4f}", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def main(argv: Sequence[str] | None = None, *, fsdp: bool = False) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--fsdp" in argv:
        argv.remove("--fsdp")
        fsdp = True
    args = parse_args(argv, fsdp)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    layerwise_flag = getattr(args, "layerwise", False)
    distributed = fsdp or world_size > 1
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    per_pass = args.micro_batch_size * world_size
    if args.batch_size % per_pass:
        raise ValueError(
            f"Invalid --batch-size {args.batch_size}: must be a multiple of micro-batch-size x "
            f"world size = {per_pass}"
        )
    accumulation = args.batch_size // per_pass

    # Rank 0 tokenizes first and fills the cache; the others then read it.
    if rank != 0 and distributed:
        dist.barrier()
    corpus = build_corpus(vocab_size=args.vocab_size, max_bytes=args.corpus_bytes)
    if rank == 0 and distributed:
        dist.barrier()

    config = load_llama_config(args.model, vocab_size=corpus.tokenizer.vocab_size)
    model = build_llama(config, seed=args.seed, dtype=getattr(torch, args.dtype), device=device)
    if fsdp:
        parallel: Parallel = FullyShardedParallel(rank, world_size)
        model = parallel.wrap(model)
        optimizer = build_optimizer(model, optimizer_spec(args, fsdp))  # holds the DTensors
    else:
        parallel = DataParallel(rank, world_size) if world_size > 1 else Parallel()
        optimizer = build_optimizer(model, optimizer_spec(args, fsdp))  # WeLore keeps the module
        model = parallel.wrap(model)
    layerwise = (
        LayerwiseOptimizer(
            optimizer,
            model,  # DDP: the wrapper (its comm hook steps); FSDP2: the root (its outputs count)
            accumulation_steps=accumulation,
            max_grad_norm=args.grad_clip if args.grad_clip > 0 else None,
        )
        if layerwise_flag
        else None
    )
    warmup = max(int(args.warmup_ratio * args.steps), 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, args.steps, warmup, args.min_lr_ratio)
    )
    batches = TokenBatches(
        corpus.train_tokens,
        args.batch_size,
        args.seq_len,
        seed=args.seed,
        rank=rank,
        world_size=world_size,
    )
    start = _resume(args, model, optimizer, scheduler, batches) if fsdp else 0
    val = [
        b.to(device)
        for b in validation_batches(corpus.val_tokens, args.micro_batch_size, args.seq_len, 4)
    ]
    log = RankZeroLog(args, parallel, val, (optimizer, scheduler, batches))
    train_steps(
        model,
        optimizer,
        scheduler,
        batches,
        first_step=start,
        last_step=args.steps,
        accumulation=accumulation,
        grad_clip=args.grad_clip,
        parallel=parallel,
        layerwise=layerwise,
        device=device,
        hooks=log,
    )
    log.close()
    if distributed:
        # Every rank reaches this point before any tears gloo down: a rank that destroys its
        # process group while a peer is still in a collective aborts the peer at exit.
        dist.barrier()
        dist.destroy_process_group()


def _resume(
    args: argparse.Namespace,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: TokenBatches,
) -> int:
    """FSDP2 ``--resume``: load the DCP checkpoint (hand-offs included); returns the step it
    was saved at."""
    if not args.resume:
        return 0
    if args.checkpoint_dir is None:
        raise ValueError("Invalid --resume without --checkpoint-dir: nothing to load")
    # Re-applies the checkpoint's hand-offs to the freshly sharded model, then loads.
    load_dcp_state(model, optimizer, scheduler, batches, args.checkpoint_dir)
    return scheduler.last_epoch


if __name__ == "__main__":
    main()
