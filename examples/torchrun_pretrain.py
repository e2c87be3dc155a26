"""Pretrain LLaMA with any lowrank_optim optimizer under torchrun: the pattern to copy.

    torchrun --nproc_per_node 2 examples/torchrun_pretrain.py --model 9m --optimizer welore_adamw
    torchrun --nproc_per_node 8 examples/torchrun_pretrain.py --model 1b --dtype bfloat16 \\
        --batch-size 512 --micro-batch-size 16 --seq-len 256 --rank 512 --lr 0.01

One global batch per optimizer step, split over ranks and micro-batches (gradient
accumulation with ``no_sync`` on all but the last micro-batch), gradient clipping, cosine
schedule with warm-up, DDP over gloo (CPU) or NCCL (GPU). With WeLoreAdamW, one extra line
(``ddp_model = optimizer.maybe_handoff(ddp_model)``) hands converged layers off to low-rank
factors and re-wraps DDP. Rank 0 writes ``OUT/metrics.jsonl``.

``--layerwise`` (one process only) steps every parameter inside backward and frees its gradient
at once (:class:`lowrank_optim.LayerwiseOptimizer`), accumulating over the micro-batches and
clipping each parameter's gradient to ``--grad-clip`` (a global norm needs every gradient at
once, which layer-wise updates never hold):

    python examples/torchrun_pretrain.py --model 9m --optimizer galore_adamw --layerwise
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import runpy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lowrank_optim.config import HandoffConfig, ProjectionConfig, StabilityConfig
from lowrank_optim.data import TokenBatches, build_corpus, validation_batches
from lowrank_optim.factory import OPTIMIZER_NAMES, OptimizerSpec, build_optimizer
from lowrank_optim.layerwise import LayerwiseOptimizer
from lowrank_optim.models import LLAMA_SIZES, build_llama, load_llama_config
from lowrank_optim.pretrain import cosine_with_warmup, evaluate
from lowrank_optim.reporting import MetricsWriter


def add_common_arguments(
    parser: argparse.ArgumentParser, optimizers: tuple[str, ...], optimizer: str, out_dir: str
) -> None:
    """The flags this script shares with ``fsdp_pretrain.py`` (model, data, schedule, GaLore)."""
    parser.add_argument("--model", default="9m", help=f"{', '.join(LLAMA_SIZES)} or a JSON path")
    parser.add_argument("--optimizer", default=optimizer, choices=optimizers)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="global sequences per step")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="per rank per pass")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
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
    parser.add_argument("--out-dir", default=out_dir)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, OPTIMIZER_NAMES, "welore_adamw", "runs/torchrun")
    parser.add_argument("--handoff-start", type=float, default=0.4, help="fraction of steps")
    parser.add_argument("--target-reduction", type=float, default=0.6)
    parser.add_argument(
        "--layerwise",
        action="store_true",
        help="step each parameter inside backward (one process only, not with DDP)",
    )
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="shard with FSDP2 instead of DDP: runs examples/fsdp_pretrain.py with these flags "
        "(galore_adamw, galore_adamw8bit, welore_adamw without hand-offs; DCP checkpoints)",
    )
    return parser.parse_args()


def main() -> None:
    if "--fsdp" in sys.argv[1:]:
        # The FSDP2 loop differs (fully_shard per layer, DTensor state, DCP checkpoints), so it
        # lives in its own file; the flags are the same.
        sys.argv.remove("--fsdp")
        runpy.run_path(str(Path(__file__).with_name("fsdp_pretrain.py")), run_name="__main__")
        return
    args = parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if args.layerwise and world_size > 1:
        raise SystemExit(
            f"--layerwise with DDP (world size {world_size}) is not supported: a parameter would "
            "step before DDP has all-reduced its gradient. Run --layerwise in one process, or "
            "drop --layerwise under torchrun."
        )
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    per_pass = args.micro_batch_size * world_size
    if args.batch_size % per_pass:
        raise ValueError(
            f"Invalid --batch-size {args.batch_size}: must be a multiple of micro-batch-size x "
            f"world size = {per_pass}"
        )
    accumulation = args.batch_size // per_pass

    # Rank 0 tokenizes first and fills the cache; the others then read it.
    if rank != 0 and world_size > 1:
        dist.barrier()
    corpus = build_corpus(vocab_size=args.vocab_size, max_bytes=args.corpus_bytes)
    if rank == 0 and world_size > 1:
        dist.barrier()

    config = load_llama_config(args.model, vocab_size=corpus.tokenizer.vocab_size)
    model = build_llama(config, seed=args.seed, dtype=getattr(torch, args.dtype), device=device)
    spec = OptimizerSpec(
        name=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        projection=ProjectionConfig(
            rank=args.rank, update_proj_gap=args.update_proj_gap, scale=args.scale
        ),
        stability=StabilityConfig(policy="fixed", threshold=0.6, patience=2),
        handoff=HandoffConfig(
            start_step=int(args.handoff_start * args.steps),
            target_reduction=args.target_reduction,
            check_every=args.update_proj_gap,
        ),
    )
    optimizer = build_optimizer(model, spec)  # before DDP: WeLoreAdamW keeps the module
    ddp_model = DistributedDataParallel(model) if world_size > 1 else model
    layerwise = (
        LayerwiseOptimizer(
            optimizer,
            model,
            accumulation_steps=accumulation,
            max_grad_norm=args.grad_clip if args.grad_clip > 0 else None,
        )
        if args.layerwise
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
    val = [
        b.to(device)
        for b in validation_batches(corpus.val_tokens, args.micro_batch_size, args.seq_len, 4)
    ]
    writer = MetricsWriter(Path(args.out_dir) / "metrics.jsonl") if rank == 0 else None

    for step in range(1, args.steps + 1):
        local_batch = next(batches).to(device)
        step_loss = torch.zeros((), device=device)
        for index, micro in enumerate(local_batch.split(args.micro_batch_size)):
            last = index == accumulation - 1
            sync = contextlib.nullcontext() if last or world_size == 1 else ddp_model.no_sync()
            with sync:
                loss = ddp_model(input_ids=micro, labels=micro).loss / accumulation
                loss.backward()
            step_loss += loss.detach()
        if world_size > 1:
            dist.all_reduce(step_loss)
            step_loss /= world_size
        if layerwise is not None:
            layerwise.step()  # the last backward stepped every parameter; this checks it did
        else:
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), args.grad_clip)
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if layerwise is not None and hasattr(optimizer, "maybe_handoff"):
            ddp_model = layerwise.maybe_handoff(ddp_model)  # moves the hooks onto new factors
        elif hasattr(optimizer, "maybe_handoff"):
            ddp_model = optimizer.maybe_handoff(ddp_model)
        if writer is not None:
            writer.write(
                {
                    "kind": "train",
                    "step": step,
                    "loss": float(step_loss),
                    "lr": scheduler.get_last_lr()[0],
                }
            )
            if step % args.eval_every == 0 or step == args.steps:
                module = ddp_model.module if world_size > 1 else ddp_model
                eval_loss = evaluate(module, val)
                writer.write(
                    {
                        "kind": "eval",
                        "step": step,
                        "loss": eval_loss,
                        "perplexity": math.exp(min(eval_loss, 50.0)),
                    }
                )
                print(f"step {step}: train {float(step_loss):.4f} eval {eval_loss:.4f}", flush=True)
    if writer is not None:
        writer.close()
    if world_size > 1:
        # Every rank reaches this point before any tears gloo down: a rank that destroys its
        # process group while a peer is still in a collective aborts the peer at exit.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
