"""Pretrain LLaMA on FSDP2 (``fully_shard``) with a GaLore-family optimizer: the pattern to copy.

    torchrun --nproc_per_node 2 examples/fsdp_pretrain.py --model 9m --optimizer galore_adamw
    torchrun --nproc_per_node 8 examples/fsdp_pretrain.py --model 1b --dtype bfloat16 \\
        --batch-size 512 --micro-batch-size 16 --seq-len 256 --rank 512 --lr 0.01 \\
        --checkpoint-dir ckpt/1b

The same run as ``examples/torchrun_pretrain.py`` with parameters, gradients and optimizer
state sharded by rows: every decoder layer and then the root get ``fully_shard``, the optimizer
is built on the sharded (``DTensor``) parameters and projects on the right (``proj_type="right"``,
rows stay local, no communication per step) with ``refresh="gram_eigh"`` (one all-reduce or
all-gather per refresh; see :mod:`lowrank_optim.distributed.refresh`). Gradient accumulation
skips the reduce-scatter on all but the last micro-batch. ``--checkpoint-dir`` saves model,
optimizer, schedule and data position with ``torch.distributed.checkpoint`` (at ``--save-at``
or the last step) and, with ``--resume``, loads them first; the resumed run continues bit for
bit. WeLore hand-offs are not available on FSDP2 (``welore_adamw`` trains as GaLore unless a
layer would be handed off, which raises). Rank 0 writes ``OUT/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torchrun_pretrain import add_common_arguments  # same folder: the shared flags

from lowrank_optim.config import HandoffConfig, ProjectionConfig, StabilityConfig
from lowrank_optim.data import TokenBatches, build_corpus, validation_batches
from lowrank_optim.factory import OptimizerSpec, build_optimizer
from lowrank_optim.models import build_llama, load_llama_config
from lowrank_optim.pretrain import cosine_with_warmup, evaluate
from lowrank_optim.reporting import MetricsWriter

__all__ = ["main"]

#: Optimizers that run on FSDP2 (QGaLoreAdamW's INT8 weights cannot be sharded).
FSDP_OPTIMIZERS = ("galore_adamw", "galore_adamw8bit", "welore_adamw", "adamw")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, FSDP_OPTIMIZERS, "galore_adamw", "runs/fsdp")
    parser.add_argument("--checkpoint-dir", default=None, help="DCP directory to save to")
    parser.add_argument(
        "--save-at", type=int, default=None, help="step to save at (default: the last)"
    )
    parser.add_argument("--resume", action="store_true", help="load --checkpoint-dir first")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
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
    if rank != 0:
        dist.barrier()
    corpus = build_corpus(vocab_size=args.vocab_size, max_bytes=args.corpus_bytes)
    if rank == 0:
        dist.barrier()

    config = load_llama_config(args.model, vocab_size=corpus.tokenizer.vocab_size)
    model = build_llama(config, seed=args.seed, dtype=getattr(torch, args.dtype), device=device)
    for layer in model.model.layers:  # one all-gather / reduce-scatter unit per decoder layer
        fully_shard(layer)
    fully_shard(model)
    spec = OptimizerSpec(
        name=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        projection=ProjectionConfig(
            rank=args.rank,
            update_proj_gap=args.update_proj_gap,
            scale=args.scale,
            proj_type="right",  # FSDP2 shards rows: project on the side that keeps them local
            refresh="gram_eigh",
        ),
        stability=StabilityConfig(policy="fixed", threshold=0.6, patience=2),
        handoff=HandoffConfig(start_step=args.steps + 1),  # no hand-offs on FSDP2
    )
    optimizer = build_optimizer(model, spec)  # after fully_shard: it holds the DTensors
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
    start = 0
    if args.resume:
        if args.checkpoint_dir is None:
            raise ValueError("Invalid --resume without --checkpoint-dir: nothing to load")
        state = _state(model, optimizer, scheduler, batches)
        dcp.load(state, checkpoint_id=args.checkpoint_dir)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["data"])
        start = scheduler.last_epoch
    val = [
        b.to(device)
        for b in validation_batches(corpus.val_tokens, args.micro_batch_size, args.seq_len, 4)
    ]
    writer = MetricsWriter(Path(args.out_dir) / "metrics.jsonl") if rank == 0 else None

    for step in range(start + 1, args.steps + 1):
        local_batch = next(batches).to(device)
        step_loss = torch.zeros((), device=device)
        for index, micro in enumerate(local_batch.split(args.micro_batch_size)):
            # Reduce-scatter gradients only after the last micro-batch of the step.
            model.set_requires_gradient_sync(index == accumulation - 1)
            loss = model(input_ids=micro, labels=micro).loss / accumulation
            loss.backward()
            step_loss += loss.detach()
        dist.all_reduce(step_loss)
        step_loss /= world_size
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(optimizer, "maybe_handoff"):
            optimizer.maybe_handoff(model)  # raises if a sharded layer would be handed off
        if args.checkpoint_dir is not None and step == (args.save_at or args.steps):
            state = _state(model, optimizer, scheduler, batches)
            dcp.save(state, checkpoint_id=args.checkpoint_dir)
        evaluating = step % args.eval_every == 0 or step == args.steps
        eval_loss = evaluate(model, val) if evaluating else None  # every rank runs forward
        if writer is not None:
            writer.write(
                {
                    "kind": "train",
                    "step": step,
                    "loss": float(step_loss),
                    "lr": scheduler.get_last_lr()[0],
                }
            )
            if eval_loss is not None:
                perplexity = math.exp(min(eval_loss, 50.0))
                writer.write(
                    {"kind": "eval", "step": step, "loss": eval_loss, "perplexity": perplexity}
                )
                print(f"step {step}: train {float(step_loss):.4f} eval {eval_loss:.4f}", flush=True)
    if writer is not None:
        writer.close()
    # Every rank reaches this point before any tears gloo down (see torchrun_pretrain.py).
    dist.barrier()
    dist.destroy_process_group()


def _state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: TokenBatches,
) -> dict[str, object]:
    """What a DCP checkpoint holds: sharded model and optimizer state, schedule, data position."""
    return {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
        "scheduler": scheduler.state_dict(),
        "data": batches.state_dict(),
    }


if __name__ == "__main__":
    main()
