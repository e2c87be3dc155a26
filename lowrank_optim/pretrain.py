"""``lowrank-optim pretrain``: pretrain a small LLaMA on the built-in corpus, end to end.

With no arguments it trains the 9M LLaMA config with WeLoreAdamW on the Python standard
library's own source (tokenized with a byte-level BPE trained locally), evaluates on held-out
files, logs JSONL metrics (train, eval, per-layer subspace rows, hand-offs), checkpoints
atomically, and ends with a summary table and a loss plot. ``--resume`` continues a run bit for
bit from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_optim.checkpoint import atomic_save, load_checkpoint
from lowrank_optim.config import HandoffConfig, ProjectionConfig, StabilityConfig
from lowrank_optim.factory import OPTIMIZER_NAMES, OptimizerSpec, build_optimizer
from lowrank_optim.memory import current_memory_bytes, optimizer_state_bytes
from lowrank_optim.reporting import MetricsWriter

__all__ = ["PretrainConfig", "add_arguments", "run", "run_pretraining"]


@dataclass
class PretrainConfig:
    """Settings of one pretraining run; the defaults finish in a few minutes on 2 CPU cores."""

    model: str = "9m"
    optimizer: str = "welore_adamw"
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    rank: int = 32
    update_proj_gap: int = 50
    scale: float = 0.25
    refresh: str = "randomized"
    stability_threshold: float = 0.6
    stability_patience: int = 2
    stability_policy: str = "fixed"
    handoff_start: float = 0.4
    target_reduction: float = 0.6
    min_ratio: float = 0.5
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 200
    vocab_size: int = 4096
    tokenizer: str = "bpe"
    corpus_bytes: int = 6_000_000
    dataset: str | None = None
    seed: int = 0
    dtype: str = "float32"
    out_dir: str = "runs/pretrain"
    stop_after: int | None = None
    resume: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZER_NAMES:
            raise ValueError(
                f"Invalid optimizer: {self.optimizer!r}; allowed: {', '.join(OPTIMIZER_NAMES)}"
            )
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "grad_accum",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "vocab_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Invalid {name}: {value!r}; must be an integer > 0")
        if self.stop_after is not None and (
            not isinstance(self.stop_after, int) or self.stop_after <= 0
        ):
            raise ValueError(f"Invalid stop_after: {self.stop_after!r}; must be an integer > 0")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"Invalid dtype: {self.dtype!r}; allowed: float32, bfloat16")
        if not 0.0 <= self.handoff_start <= 1.0:
            raise ValueError(
                f"Invalid handoff_start: {self.handoff_start!r}; a fraction of steps in [0, 1]"
            )

    def optimizer_spec(self) -> OptimizerSpec:
        projection = ProjectionConfig(
            rank=self.rank,
            update_proj_gap=self.update_proj_gap,
            scale=self.scale,
            refresh=self.refresh,
        )
        stability = StabilityConfig(
            policy=self.stability_policy,
            threshold=self.stability_threshold,
            patience=self.stability_patience,
        )
        handoff = HandoffConfig(
            start_step=int(self.handoff_start * self.steps),
            target_reduction=self.target_reduction,
            min_ratio=self.min_ratio,
            check_every=self.update_proj_gap,
        )
        return OptimizerSpec(
            name=self.optimizer,
            lr=self.lr,
            weight_decay=self.weight_decay,
            projection=projection,
            stability=stability,
            handoff=handoff,
        )


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR factor: linear warm-up to 1, then cosine decay to ``min_ratio`` (GaLore's recipe)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor]) -> float:
    model.eval()
    losses = [float(model(input_ids=batch, labels=batch).loss) for batch in batches]
    model.train()
    return sum(losses) / len(losses)


def run_pretraining(
    config: PretrainConfig,
    optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
) -> dict[str, Any]:
    """Train as configured; returns the summary (also written to ``out_dir/summary.json``).

    ``optimizer_factory`` replaces the optimizer named in ``config`` (benchmarks use it to
    run peers such as galore-torch through the very same loop).
    """
    from lowrank_optim.data import TokenBatches, build_corpus, validation_batches
    from lowrank_optim.models import build_llama, count_parameters, load_llama_config

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pt"
    torch.manual_seed(config.seed)
    corpus = build_corpus(
        tokenizer=config.tokenizer,
        vocab_size=config.vocab_size,
        max_bytes=config.corpus_bytes,
        dataset=config.dataset,
    )
    dtype = getattr(torch, config.dtype)
    model_config = load_llama_config(config.model, vocab_size=corpus.tokenizer.vocab_size)
    model = build_llama(model_config, seed=config.seed, dtype=dtype)
    params_start = count_parameters(model)
    if optimizer_factory is None:
        optimizer = build_optimizer(model, config.optimizer_spec())
    else:
        optimizer = optimizer_factory(model)
    warmup = max(int(config.warmup_ratio * config.steps), 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: cosine_with_warmup(step, config.steps, warmup, config.min_lr_ratio),
    )
    batches = TokenBatches(
        corpus.train_tokens,
        batch_size=config.batch_size * config.grad_accum,
        seq_len=config.seq_len,
        seed=config.seed,
    )
    val = validation_batches(
        corpus.val_tokens, config.batch_size, config.seq_len, config.eval_batches
    )
    step = 0
    if config.resume and checkpoint_path.exists():
        step = _restore(checkpoint_path, model, optimizer, scheduler, batches)
    elif not config.resume:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    writer = MetricsWriter(out / "metrics.jsonl")
    if step == 0:
        writer.write(
            {
                "kind": "config",
                "step": 0,
                **_plain(dataclasses.asdict(config)),
                "corpus": corpus.description,
                "parameters": params_start,
            }
        )
    progress = _progress(config, step)
    tokens_per_step = config.batch_size * config.grad_accum * config.seq_len
    train_loss, eval_loss, started = math.nan, math.nan, time.perf_counter()
    first_step = step
    step_times: list[tuple[int, float]] = []
    optimizer_seconds: list[float] = []
    last_step = config.steps if config.stop_after is None else min(config.stop_after, config.steps)
    while step < last_step:
        tick = time.perf_counter()
        batch = next(batches)
        micro_batches = batch.chunk(config.grad_accum)
        train_loss = 0.0
        for micro in micro_batches:
            loss = model(input_ids=micro, labels=micro).loss / config.grad_accum
            loss.backward()
            train_loss += float(loss.detach())
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer_tick = time.perf_counter()
        optimizer.step()
        optimizer_seconds.append(time.perf_counter() - optimizer_tick)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if hasattr(optimizer, "maybe_handoff"):
            handoffs_before = len(optimizer.handoffs)
            model = optimizer.maybe_handoff(model)
            for record in optimizer.handoffs[handoffs_before:]:
                writer.write({"kind": "handoff", **_plain(record)})
        elapsed = time.perf_counter() - tick
        step_times.append((step, elapsed))
        if step % 10 == 0 or step == config.steps:
            writer.write(
                {
                    "kind": "train",
                    "step": step,
                    "loss": train_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "step_seconds": elapsed,
                }
            )
        if hasattr(optimizer, "subspace_report") and step % config.update_proj_gap == 1:
            writer.log_subspace(optimizer, step)
        if step % config.eval_every == 0 or step == config.steps:
            eval_loss = evaluate(model, val)
            writer.write(
                {
                    "kind": "eval",
                    "step": step,
                    "loss": eval_loss,
                    "perplexity": math.exp(min(eval_loss, 50.0)),
                }
            )
        if step % config.checkpoint_every == 0 or step in (config.steps, last_step):
            _save(checkpoint_path, model, optimizer, scheduler, batches, step)
        progress.update(1)
        progress.set_postfix(
            loss=f"{train_loss:.3f}",
            tok_s=f"{tokens_per_step / max(elapsed, 1e-9):,.0f}",
            mem=f"{current_memory_bytes() / 2**20:,.0f}MiB",
        )
    progress.close()
    writer.close()
    wall = time.perf_counter() - started
    summary = {
        "optimizer": config.optimizer if optimizer_factory is None else type(optimizer).__name__,
        "model": config.model,
        "steps": config.steps,
        "final_train_loss": train_loss,
        "final_eval_loss": eval_loss,
        "perplexity": math.exp(min(eval_loss, 50.0)),
        "parameters_start": params_start,
        "parameters_end": count_parameters(model),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "handoffs": len(getattr(optimizer, "handoffs", [])),
        "tokens_per_second": tokens_per_step * (step - first_step) / max(wall, 1e-9),
        "mean_optimizer_step_seconds": sum(optimizer_seconds) / max(len(optimizer_seconds), 1),
        "mean_step_seconds": sum(t for _, t in step_times) / max(len(step_times), 1),
        "step_seconds": [round(t, 5) for _, t in step_times],
        "wall_seconds": wall,
    }
    (out / "summary.json").write_text(json.dumps(_plain(summary), indent=2) + "\n")
    from lowrank_optim.plots import plot_losses

    plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"{config.model} {config.optimizer}")
    if hasattr(optimizer, "subspace_report"):
        from lowrank_optim.plots import plot_stability

        plot_stability(out / "metrics.jsonl", out / "stability.png")
    return summary


def _save(
    path: Path, model: nn.Module, optimizer: Any, scheduler: Any, batches: Any, step: int
) -> None:
    # Optimizer first in the payload order matters only for readers; on load it is restored
    # first so that WeLore hand-offs re-shape the model before its weights are loaded.
    atomic_save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "model": model.state_dict(),
            "scheduler": scheduler.state_dict(),
            "batches": batches.state_dict(),
            "rng": torch.get_rng_state(),
        },
        path,
    )


def _restore(path: Path, model: nn.Module, optimizer: Any, scheduler: Any, batches: Any) -> int:
    payload = load_checkpoint(path)
    optimizer.load_state_dict(payload["optimizer"])
    model.load_state_dict(payload["model"])
    scheduler.load_state_dict(payload["scheduler"])
    batches.load_state_dict(payload["batches"])
    torch.set_rng_state(payload["rng"])
    return int(payload["step"])


def _progress(config: PretrainConfig, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=config.steps,
        initial=initial,
        disable=not config.progress,
        desc=f"pretrain {config.model} {config.optimizer}",
        unit="step",
    )


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy: NaN/inf become None."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return {key: clean(value) for key, value in values.items()}


def format_summary(summary: dict[str, Any]) -> str:
    rows = [
        ("optimizer", summary["optimizer"]),
        ("model", summary["model"]),
        ("steps", summary["steps"]),
        ("final train loss", f"{summary['final_train_loss']:.4f}"),
        ("final eval loss", f"{summary['final_eval_loss']:.4f}"),
        ("eval perplexity", f"{summary['perplexity']:.2f}"),
        (
            "parameters (start -> end)",
            f"{summary['parameters_start']:,} -> {summary['parameters_end']:,}",
        ),
        ("optimizer state", f"{summary['optimizer_state_bytes'] / 2**20:.2f} MiB"),
        ("hand-offs", summary["handoffs"]),
        ("tokens / s", f"{summary['tokens_per_second']:,.0f}"),
        ("wall time", f"{summary['wall_seconds']:.0f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = PretrainConfig()
    for item in dataclasses.fields(PretrainConfig):
        if item.name in ("extra", "resume", "progress"):
            continue
        flag = "--" + item.name.replace("_", "-")
        value = getattr(defaults, item.name)
        kind = int if item.name == "stop_after" else type(value) if value is not None else str
        parser.add_argument(flag, type=kind, default=value, help=f"(default: {value})")
    parser.add_argument("--resume", action="store_true", help="continue from out-dir/checkpoint.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    values = {
        item.name: getattr(args, item.name)
        for item in dataclasses.fields(PretrainConfig)
        if item.name not in ("extra", "progress")
    }
    config = PretrainConfig(**values, progress=not args.no_progress)
    summary = run_pretraining(config)
    print(format_summary(summary))
    print(
        f"metrics: {Path(config.out_dir) / 'metrics.jsonl'}  plot: "
        f"{Path(config.out_dir) / 'loss.png'}"
    )
    return 0
