"""``lowrank-optim pretrain``: pretrain a small LLaMA on the built-in corpus, end to end.

With no arguments it trains the 9M LLaMA config with WeLoreAdamW on the Python standard
library's own source (tokenized with a byte-level BPE trained locally), evaluates on held-out
files, logs JSONL metrics (train, eval, per-layer subspace rows, hand-offs), checkpoints
atomically, and ends with a summary table and a loss plot. ``--resume`` continues a run bit for
bit from its last checkpoint. The steps themselves are :func:`lowrank_optim.train.loop.
train_steps`, the loop the torchrun and FSDP2 examples run too; this module adds what a
single-process run records around them (:class:`_Recorder`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_optim.checkpoint import remove_stale_temporaries
from lowrank_optim.factory import build_optimizer
from lowrank_optim.layerwise import LayerwiseOptimizer
from lowrank_optim.memory import current_memory_bytes, optimizer_state_bytes
from lowrank_optim.reporting import MetricsWriter
from lowrank_optim.train.checkpoints import finished_summary, load_run, restore_run, save_run
from lowrank_optim.train.config import PretrainConfig
from lowrank_optim.train.errors import RunWarning
from lowrank_optim.train.loop import (
    LoopHooks,
    StepResult,
    cosine_with_warmup,
    evaluate,
    train_steps,
    training_bytes,
)
from lowrank_optim.train.records import has_records, json_safe, last_logged, truncate_metrics
from lowrank_optim.train.resume import check_resume_settings, run_settings, saved_settings
from lowrank_optim.train.summary import handoff_summary, unreachable_handoff

__all__ = ["run_pretraining"]


class _Recorder(LoopHooks):
    """What ``lowrank-optim pretrain`` records around each step of the shared loop.

    Train loss every 10 steps, subspace rows after each refresh, evaluations, checkpoints, the
    eval loss just before and after each hand-off (its immediate cost) and the progress bar.
    """

    def __init__(
        self,
        config: PretrainConfig,
        *,
        optimizer: Any,
        scheduler: Any,
        batches: Any,
        val: list[torch.Tensor],
        writer: MetricsWriter,
        checkpoint_path: Path,
        last_step: int,
        initial_step: int,
    ) -> None:
        from tqdm.auto import tqdm

        from lowrank_optim.train.models import count_parameters

        self.config, self.optimizer, self.scheduler = config, optimizer, scheduler
        self.batches, self.val, self.writer = batches, val, writer
        self.checkpoint_path, self.last_step = checkpoint_path, last_step
        self.count_parameters = count_parameters
        self.settings = run_settings(config)  # saved with every checkpoint (the resume guard)
        self.train_loss, self.eval_loss = math.nan, math.nan
        self.step_times: list[tuple[int, float]] = []
        self.optimizer_seconds: list[float] = []
        self.loss_before: float | None = None
        self.tokens_per_step = config.batch_size * config.grad_accum * config.seq_len
        self.progress = tqdm(
            total=config.steps,
            initial=initial_step,
            disable=not config.progress,
            desc=f"pretrain {config.model} {config.optimizer}",
            unit="step",
        )

    def before_handoff(self, step: int, model: nn.Module) -> None:
        # The immediate cost of a hand-off: eval loss just before and just after the swap.
        self.loss_before = evaluate(model, self.val) if self.optimizer.handoff_due() else None

    def after_handoff(self, step: int, model: nn.Module, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.writer.write({"kind": "handoff", **json_safe(record)})
        if self.loss_before is not None and records:
            cost = {"step": step, "before": self.loss_before, "after": evaluate(model, self.val)}
            self.writer.write({"kind": "handoff_cost", **cost})

    def after_step(self, result: StepResult, model: nn.Module) -> None:
        config, step, writer = self.config, result.step, self.writer
        self.train_loss = result.loss
        self.optimizer_seconds.append(result.optimizer_seconds)
        self.step_times.append((step, result.seconds))
        if step % 10 == 0 or step == config.steps:
            writer.write(
                {
                    "kind": "train",
                    "step": step,
                    "loss": result.loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "step_seconds": result.seconds,
                }
            )
        if hasattr(self.optimizer, "subspace_report") and step % config.update_proj_gap == 1:
            writer.log_subspace(self.optimizer, step)
        if step % config.eval_every == 0 or step == config.steps:
            self.eval_loss = evaluate(model, self.val)
            writer.write(
                {
                    "kind": "eval",
                    "step": step,
                    "loss": self.eval_loss,
                    "perplexity": math.exp(min(self.eval_loss, 50.0)),
                    "parameters": self.count_parameters(model),
                    "training_bytes": training_bytes(model, self.optimizer),
                }
            )
        if step % config.checkpoint_every == 0 or step in (config.steps, self.last_step):
            save_run(
                self.checkpoint_path,
                model,
                self.optimizer,
                self.scheduler,
                self.batches,
                step,
                settings=self.settings,
            )
        self.progress.update(1)
        self.progress.set_postfix(
            loss=f"{result.loss:.3f}",
            tok_s=f"{self.tokens_per_step / max(result.seconds, 1e-9):,.0f}",
            mem=f"{current_memory_bytes() / 2**20:,.0f}MiB",
        )


def run_pretraining(
    config: PretrainConfig,
    optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
) -> dict[str, Any]:
    """Train as configured; returns the summary (also written to ``out_dir/summary.json``).

    ``optimizer_factory`` replaces the optimizer named in ``config`` (benchmarks use it to
    run peers such as galore-torch through the very same loop).
    """
    from lowrank_optim.train.batches import TokenBatches, validation_batches
    from lowrank_optim.train.data import build_corpus
    from lowrank_optim.train.models import build_llama, count_parameters, load_llama_config

    setup_started = time.perf_counter()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pt"
    # Temporaries of checkpoint writes that a killed run left behind (see atomic_save).
    remove_stale_temporaries(checkpoint_path)
    last_step = config.steps if config.stop_after is None else min(config.stop_after, config.steps)
    payload, resumed_changes = None, {}
    if config.resume:
        # Refuse an unreadable checkpoint or changed settings before any set-up work.
        payload = load_run(checkpoint_path, config)
        saved = saved_settings(payload, out / "metrics.jsonl")
        resumed_changes = check_resume_settings(saved, config)
        finished = finished_summary(out, int(payload["step"]), last_step)
        if finished is not None:
            return finished
    torch.manual_seed(config.seed)
    tick = time.perf_counter()
    corpus = build_corpus(
        tokenizer=config.tokenizer,
        vocab_size=config.vocab_size,
        max_bytes=config.corpus_bytes,
        dataset=config.dataset,
    )
    setup = {"corpus": time.perf_counter() - tick}
    tick = time.perf_counter()
    dtype = getattr(torch, config.dtype)
    model_config = load_llama_config(config.model, vocab_size=corpus.tokenizer.vocab_size)
    model = build_llama(model_config, seed=config.seed, dtype=dtype)
    params_start = count_parameters(model)
    setup["model"] = time.perf_counter() - tick
    tick = time.perf_counter()
    if optimizer_factory is None:
        optimizer = build_optimizer(model, config.optimizer_spec())
    else:
        optimizer = optimizer_factory(model)
    setup["optimizer"] = time.perf_counter() - tick
    _warn_if_no_handoff(config, optimizer)
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
    metrics_path = out / "metrics.jsonl"
    if payload is not None:
        step = restore_run(payload, model, optimizer, scheduler, batches, checkpoint_path)
        # Records past the checkpoint come again from the resumed steps: drop them first.
        truncate_metrics(metrics_path, step)
    else:
        metrics_path.unlink(missing_ok=True)
    setup["total"] = time.perf_counter() - setup_started
    writer = MetricsWriter(metrics_path)
    if step == 0:
        writer.write(
            {
                "kind": "config",
                "step": 0,
                **json_safe(dataclasses.asdict(config)),
                "corpus": corpus.description,
                "parameters": params_start,
            }
        )
    if payload is not None:  # the settings a resume changed (the harmless ones only)
        writer.write({"kind": "resume", "step": step, "changed": json_safe(resumed_changes)})
    recorder = _Recorder(
        config,
        optimizer=optimizer,
        scheduler=scheduler,
        batches=batches,
        val=val,
        writer=writer,
        checkpoint_path=checkpoint_path,
        last_step=last_step,
        initial_step=step,
    )
    layerwise = None
    if config.layerwise:
        # Built after restore_run: it hooks the parameters the restored optimizer holds.
        layerwise = LayerwiseOptimizer(
            optimizer,
            model,
            accumulation_steps=config.grad_accum,
            max_grad_norm=config.grad_clip if config.grad_clip > 0 else None,
            clip=config.layerwise_clip,
        )
    started, first_step = time.perf_counter(), step
    model = train_steps(
        model,
        optimizer,
        scheduler,
        batches,
        first_step=first_step,
        last_step=last_step,
        accumulation=config.grad_accum,
        grad_clip=config.grad_clip,
        layerwise=layerwise,
        hooks=recorder,
    )
    step = max(first_step, last_step)
    recorder.progress.close()
    writer.close()
    train_loss, eval_loss = recorder.train_loss, recorder.eval_loss
    if step == first_step:  # resumed at the end of a run whose summary.json is gone
        eval_loss = evaluate(model, val)
        train_loss = last_logged(metrics_path, "train", step)
    wall = time.perf_counter() - started
    step_times, optimizer_seconds = recorder.step_times, recorder.optimizer_seconds
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
        "handoff_summary": handoff_summary(optimizer, metrics_path, config.steps, last_step),
        "tokens_per_second": recorder.tokens_per_step * (step - first_step) / max(wall, 1e-9),
        "mean_optimizer_step_seconds": sum(optimizer_seconds) / max(len(optimizer_seconds), 1),
        "mean_step_seconds": sum(t for _, t in step_times) / max(len(step_times), 1),
        "step_seconds": [round(t, 5) for _, t in step_times],
        "wall_seconds": wall,
        "setup_seconds": {name: round(value, 3) for name, value in setup.items()},
    }
    summary["files"] = [str(path) for path in _plot(config, optimizer, out)]
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    return summary


def _warn_if_no_handoff(config: PretrainConfig, optimizer: Any) -> None:
    """Warn (:class:`RunWarning`) when a hand-off optimizer's run ends before its first check."""
    handoff = getattr(optimizer, "handoff_config", None)
    message = unreachable_handoff(config, handoff) if handoff is not None else None
    if message is not None:
        warnings.warn(message, RunWarning, stacklevel=3)


def _plot(config: PretrainConfig, optimizer: Any, out: Path) -> list[Path]:
    """Draw the loss (and, with subspace records, the stability) plots; the run's files."""
    from lowrank_optim.cli.plots import plot_losses, plot_stability

    metrics_path = out / "metrics.jsonl"
    files = [metrics_path, out / "checkpoint.pt"]
    files.append(
        plot_losses(metrics_path, out / "loss.png", title=f"{config.model} {config.optimizer}")
    )
    if hasattr(optimizer, "subspace_report") and has_records(metrics_path, "subspace"):
        files.append(plot_stability(metrics_path, out / "stability.png"))
    files.append(out / "summary.json")
    return files
