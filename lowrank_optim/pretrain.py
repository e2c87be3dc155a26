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
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_optim.checkpoint import atomic_save, load_checkpoint, remove_stale_temporaries
from lowrank_optim.config import HandoffConfig, ProjectionConfig, StabilityConfig
from lowrank_optim.factory import OPTIMIZER_NAMES, OptimizerSpec, build_optimizer
from lowrank_optim.memory import current_memory_bytes, optimizer_state_bytes
from lowrank_optim.models import LLAMA_SIZES
from lowrank_optim.reporting import MetricsWriter

__all__ = [
    "PretrainConfig",
    "add_arguments",
    "check_pretrain_config",
    "run",
    "run_pretraining",
]


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
    stability_threshold: float = 0.7
    stability_patience: int = 2
    stability_policy: str = "fixed"
    handoff_start: float = 0.4
    target_reduction: float = 0.8
    min_ratio: float = 0.5
    handoff_end: float = 0.6
    handoff_trigger: str = "stable"
    handoff_rewarmup: int = 0
    handoff_taper: int = 0
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
        """Refuse any setting that would crash later or silently wreck training.

        Each message names the field, its value and what is allowed. Examples of what this
        stops: ``min_lr_ratio < 0`` makes the cosine schedule's learning rate negative (the
        loss then rises), ``grad_clip = nan`` turns clipping off without a word (``nan > 0``
        is false), ``warmup_ratio < 0`` gives a warm-up factor of ``(step + 1) / 1``.
        """
        check_pretrain_config(self)

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
            trigger=self.handoff_trigger,
            rewarmup_steps=self.handoff_rewarmup,
            taper_steps=self.handoff_taper,
            end_step=int(self.handoff_end * self.steps) if self.handoff_end < 1.0 else None,
        )
        return OptimizerSpec(
            name=self.optimizer,
            lr=self.lr,
            weight_decay=self.weight_decay,
            projection=projection,
            stability=stability,
            handoff=handoff,
        )


#: Tokenizers of the built-in corpus pipeline (:func:`lowrank_optim.data.build_corpus`).
TOKENIZERS = ("bpe", "byte")
DTYPES = ("float32", "bfloat16")
_POSITIVE_INTS = (
    "steps",
    "batch_size",
    "seq_len",
    "grad_accum",
    "eval_every",
    "eval_batches",
    "checkpoint_every",
    "vocab_size",
    "rank",
    "update_proj_gap",
    "stability_patience",
    "corpus_bytes",
)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number_in(
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    """``value`` must be a finite number in the interval (NaN fails every comparison)."""
    ok = (
        _is_number(value)
        and math.isfinite(value)
        and (value > low if open_low else value >= low)
        and (value < high if open_high else value <= high)
    )
    if not ok:
        left, right = "(" if open_low else "[", ")" if open_high or math.isinf(high) else "]"
        interval = f"{left}{low:g}, {'inf' if math.isinf(high) else f'{high:g}'}{right}"
        raise ValueError(f"Invalid {name}: {value!r}; must be a finite number in {interval}")


def check_pretrain_config(config: PretrainConfig) -> None:
    """Validate every field of ``config``; raises ``ValueError`` naming the first bad one."""
    from lowrank_optim.config import HANDOFF_TRIGGERS, STABILITY_POLICIES
    from lowrank_optim.projection.registry import available_refresh_methods

    def choice(name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(config, name)
        if value not in allowed:
            raise ValueError(f"Invalid {name}: {value!r}; allowed: {', '.join(allowed)}")

    choice("optimizer", OPTIMIZER_NAMES)
    model = config.model
    if not isinstance(model, str | Path) or (
        str(model).strip().lower() not in LLAMA_SIZES and not Path(model).is_file()
    ):
        raise ValueError(
            f"Invalid model: {str(model)!r}; allowed: {', '.join(LLAMA_SIZES)} or the path of "
            "an existing LlamaConfig JSON file"
        )
    if str(model).strip().lower() not in LLAMA_SIZES:
        try:
            values = json.loads(Path(model).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"Invalid model: {str(model)!r} is not a JSON config file ({error})"
            ) from None
        if not isinstance(values, dict):
            raise ValueError(f"Invalid model: {str(model)!r} must hold a JSON object")
    for name in _POSITIVE_INTS:
        value = getattr(config, name)
        if not _is_int(value) or value <= 0:
            raise ValueError(f"Invalid {name}: {value!r}; must be an integer > 0")
    if config.stop_after is not None and (not _is_int(config.stop_after) or config.stop_after <= 0):
        raise ValueError(
            f"Invalid stop_after: {config.stop_after!r}; must be an integer > 0 or None"
        )
    if not _is_int(config.seed):
        raise ValueError(f"Invalid seed: {config.seed!r}; must be an integer")
    choice("dtype", DTYPES)
    choice("tokenizer", TOKENIZERS)
    choice("refresh", available_refresh_methods())
    choice("stability_policy", STABILITY_POLICIES)
    inf = math.inf
    # lr = 0 would train nothing; weight decay and clipping are off at 0.
    _number_in("lr", config.lr, 0.0, inf, open_low=True)
    _number_in("weight_decay", config.weight_decay, 0.0, inf)
    _number_in("grad_clip", config.grad_clip, 0.0, inf)  # 0 turns clipping off
    _number_in("scale", config.scale, 0.0, inf, open_low=True)
    # Warm-up covers warmup_ratio * steps; the cosine ends at min_lr_ratio * lr.
    _number_in("warmup_ratio", config.warmup_ratio, 0.0, 1.0)
    _number_in("min_lr_ratio", config.min_lr_ratio, 0.0, 1.0)
    _number_in("stability_threshold", config.stability_threshold, 0.0, 1.0, open_low=True)
    _number_in("handoff_start", config.handoff_start, 0.0, 1.0)
    _number_in("handoff_end", config.handoff_end, config.handoff_start, 1.0)
    choice("handoff_trigger", HANDOFF_TRIGGERS)
    for name in ("handoff_rewarmup", "handoff_taper"):
        value = getattr(config, name)
        if not _is_int(value) or value < 0:
            raise ValueError(f"Invalid {name}: {value!r}; must be an integer >= 0")
    _number_in("target_reduction", config.target_reduction, 0.0, 1.0, open_low=True, open_high=True)
    _number_in("min_ratio", config.min_ratio, 0.0, 1.0, open_high=True)
    if config.dataset is not None and (not isinstance(config.dataset, str) or not config.dataset):
        raise ValueError(
            f"Invalid dataset: {config.dataset!r}; a local path, a Hugging Face dataset name, "
            "or None for the built-in corpus"
        )
    if config.dataset is not None:
        from lowrank_optim.data import _looks_local

        local = Path(config.dataset).expanduser()
        if _looks_local(config.dataset) and not local.exists():
            raise ValueError(
                f"Invalid dataset: {config.dataset!r} does not exist; give an existing .jsonl, "
                ".txt, .py, .md file or folder, or a Hugging Face dataset name"
            )
    if not isinstance(config.out_dir, str | Path) or not str(config.out_dir):
        raise ValueError(f"Invalid out_dir: {config.out_dir!r}; must be a folder path")
    if not isinstance(config.extra, dict):
        raise ValueError(f"Invalid extra: {config.extra!r}; must be a dict")


def training_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weights + gradients of the trainable parameters + optimizer state, in bytes."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + grads + optimizer_state_bytes(optimizer)


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

    setup_started = time.perf_counter()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pt"
    # Temporaries of checkpoint writes that a killed run left behind (see atomic_save).
    remove_stale_temporaries(checkpoint_path)
    last_step = config.steps if config.stop_after is None else min(config.stop_after, config.steps)
    payload = None
    if config.resume:
        payload = load_checkpoint(checkpoint_path, missing=_no_checkpoint_message(config))
        finished = _finished_summary(out, int(payload["step"]), last_step)
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
        step = _restore(payload, model, optimizer, scheduler, batches)
        # Records past the checkpoint come again from the resumed steps: drop them first.
        _truncate_metrics(metrics_path, step)
    else:
        metrics_path.unlink(missing_ok=True)
    setup["total"] = time.perf_counter() - setup_started
    writer = MetricsWriter(metrics_path)
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
            # The immediate cost of a hand-off: eval loss just before and just after the swap.
            loss_before = evaluate(model, val) if optimizer.handoff_due() else None
            model = optimizer.maybe_handoff(model)
            for record in optimizer.handoffs[handoffs_before:]:
                writer.write({"kind": "handoff", **_plain(record)})
            if loss_before is not None and len(optimizer.handoffs) > handoffs_before:
                cost = {"step": step, "before": loss_before, "after": evaluate(model, val)}
                writer.write({"kind": "handoff_cost", **cost})
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
                    "parameters": count_parameters(model),
                    "training_bytes": training_bytes(model, optimizer),
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
    if step == first_step:  # resumed at the end of a run whose summary.json is gone
        eval_loss = evaluate(model, val)
        train_loss = _last_logged(metrics_path, "train", step)
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
        "handoff_summary": _handoff_summary(optimizer, out / "metrics.jsonl"),
        "tokens_per_second": tokens_per_step * (step - first_step) / max(wall, 1e-9),
        "mean_optimizer_step_seconds": sum(optimizer_seconds) / max(len(optimizer_seconds), 1),
        "mean_step_seconds": sum(t for _, t in step_times) / max(len(step_times), 1),
        "step_seconds": [round(t, 5) for _, t in step_times],
        "wall_seconds": wall,
        "setup_seconds": {name: round(value, 3) for name, value in setup.items()},
    }
    from lowrank_optim.plots import plot_losses

    files = [metrics_path, checkpoint_path]
    files.append(
        plot_losses(metrics_path, out / "loss.png", title=f"{config.model} {config.optimizer}")
    )
    if hasattr(optimizer, "subspace_report") and _has_records(metrics_path, "subspace"):
        from lowrank_optim.plots import plot_stability

        files.append(plot_stability(metrics_path, out / "stability.png"))
    files.append(out / "summary.json")
    summary["files"] = [str(path) for path in files]
    (out / "summary.json").write_text(json.dumps(_plain(summary), indent=2) + "\n")
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


def _no_checkpoint_message(config: PretrainConfig) -> str:
    path = Path(config.out_dir) / "checkpoint.pt"
    return (
        f"Cannot resume: no checkpoint at {path}; to start a new run in {config.out_dir}, "
        "run without --resume (resume=False)"
    )


def _finished_summary(out: Path, step: int, last_step: int) -> dict[str, Any] | None:
    """The recorded summary of a run whose checkpoint is already at ``last_step``, else None.

    Resuming such a run has nothing to train; it reports the run and writes nothing.
    """
    path = out / "summary.json"
    if step < last_step or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: the resumed run evaluates and writes a new one
    if not isinstance(summary, dict):
        return None
    return {**summary, "already_finished": True, "checkpoint_step": step}


def _read_jsonl_records(path: Path) -> list[tuple[str, dict[str, Any] | None]]:
    """``(line, record)`` pairs; ``record`` is None for a line that is not a JSON object."""
    pairs: list[tuple[str, dict[str, Any] | None]] = []
    if not path.is_file():
        return pairs
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        pairs.append((line, record if isinstance(record, dict) else None))
    return pairs


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to ``step`` (the checkpoint's); drop later ones and torn lines.

    A run killed after logging step ``s > step`` but before checkpointing ``s`` would otherwise
    log ``s`` twice once resumed. The file is replaced atomically.
    """
    pairs = _read_jsonl_records(path)
    kept = [
        line
        for line, record in pairs
        if record is not None and int(record.get("step", 0) or 0) <= step
    ]
    if len(kept) == len(pairs):
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(temporary, path)


def _last_logged(path: Path, kind: str, step: int) -> float:
    losses = [
        float(record["loss"])
        for _, record in _read_jsonl_records(path)
        if record is not None
        and record.get("kind") == kind
        and int(record.get("step", 0)) <= step
        and isinstance(record.get("loss"), int | float)
    ]
    return losses[-1] if losses else math.nan


def _has_records(path: Path, kind: str) -> bool:
    return any(record and record.get("kind") == kind for _, record in _read_jsonl_records(path))


def _restore(
    payload: dict[str, Any], model: nn.Module, optimizer: Any, scheduler: Any, batches: Any
) -> int:
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


def _number(value: Any, spec: str) -> str:
    # summary.json stores NaN as null: a value that was never measured.
    return "n/a" if value is None else format(value, spec)


def _handoff_summary(optimizer: Any, metrics: Path) -> dict[str, Any] | None:
    """Layers handed off, when, the projected parameters they removed, and the eval-loss jumps
    measured around each hand-off step (from the run's log, so resumed runs count them all)."""
    if not hasattr(optimizer, "handoff_report"):
        return None
    from lowrank_optim.plots import read_records

    records = optimizer.handoff_report()
    projected = sum(
        p.numel()
        for group in optimizer.param_groups
        for p in group["params"]
        if optimizer.is_projected(group, p)
    ) + sum(r["params_before"] for r in records)
    costs = read_records(metrics, kind="handoff_cost") if metrics.exists() else []
    return {
        "layers": len(records),
        "steps": sorted({int(r["step"]) for r in records}),
        "projected_parameters": projected,
        "projected_parameters_removed": sum(
            r["params_before"] - r["params_after"] for r in records
        ),
        "eval_loss_jump": sum(c["after"] - c["before"] for c in costs),
        "eval_loss_before_first": costs[0]["before"] if costs else None,
    }


def _handoff_line(handoff: dict[str, Any] | None, count: int) -> str:
    if not handoff or not handoff["layers"]:
        return str(count)
    removed, total = handoff["projected_parameters_removed"], handoff["projected_parameters"]
    steps = handoff["steps"]
    when = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
    line = (
        f"{handoff['layers']} layers at {when}: {removed / total:.0%} of projected-matrix "
        f"parameters removed ({total:,} -> {total - removed:,})"
    )
    if handoff["eval_loss_before_first"]:
        jump = handoff["eval_loss_jump"] / handoff["eval_loss_before_first"]
        line += f"; eval loss {jump:+.1%} across the swaps themselves"
    return line


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as an aligned two-column table, ending with the files the run wrote."""
    rows = [
        ("optimizer", summary["optimizer"]),
        ("model", summary["model"]),
        ("steps", summary["steps"]),
        ("final train loss", _number(summary["final_train_loss"], ".4f")),
        ("final eval loss", _number(summary["final_eval_loss"], ".4f")),
        ("eval perplexity", _number(summary["perplexity"], ".2f")),
        (
            "parameters (start -> end)",
            f"{summary['parameters_start']:,} -> {summary['parameters_end']:,}",
        ),
        ("optimizer state", f"{summary['optimizer_state_bytes'] / 2**20:.2f} MiB"),
        ("hand-offs", _handoff_line(summary.get("handoff_summary"), summary["handoffs"])),
        ("tokens / s", _number(summary["tokens_per_second"], ",.0f")),
        ("training time", f"{summary['wall_seconds']:.1f} s"),
    ]
    setup = summary.get("setup_seconds") or {}
    if setup:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in setup.items() if k != "total")
        rows.append(("set-up time", f"{setup.get('total', 0.0):.1f} s ({parts})"))
    rows += [("wrote" if i == 0 else "", path) for i, path in enumerate(summary.get("files", []))]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}".rstrip() for name, value in rows)


#: ``--help`` text of each option; defaults are appended.
_HELP = {
    "model": f"LLaMA size ({', '.join(LLAMA_SIZES)}) or the path of a LlamaConfig JSON file",
    "optimizer": f"one of: {', '.join(OPTIMIZER_NAMES)}",
    "steps": "optimizer steps in total (> 0)",
    "batch_size": "sequences per step (> 0)",
    "seq_len": "tokens per sequence (> 0)",
    "grad_accum": "micro-batches per step; each holds batch-size / grad-accum sequences",
    "lr": "peak learning rate (> 0)",
    "warmup_ratio": "fraction of the steps spent warming the learning rate up, in [0, 1]",
    "min_lr_ratio": "final learning rate of the cosine decay as a fraction of --lr, in [0, 1]",
    "weight_decay": "decoupled weight decay (>= 0)",
    "grad_clip": "clip the gradient norm to this value (> 0); 0 turns clipping off",
    "rank": "GaLore projection rank (> 0)",
    "update_proj_gap": "steps between projection refreshes (> 0)",
    "scale": "GaLore scale alpha of the projected-back update (> 0)",
    "refresh": "how the projection basis is recomputed (svd or randomized)",
    "stability_threshold": "subspace overlap in (0, 1] above which a layer counts as stable",
    "stability_patience": "consecutive stable refreshes before the policy acts (> 0)",
    "stability_policy": "what stability changes: fixed, overlap or qgalore",
    "handoff_start": "WeLoreAdamW: earliest hand-off as a fraction of --steps, in [0, 1] "
    "(0.4 with 600 steps: from step 240)",
    "handoff_end": "WeLoreAdamW: a fraction of --steps by which every qualifying layer is "
    "handed off even if its subspace still moves, in [handoff-start, 1]; 1: no deadline",
    "handoff_trigger": "WeLoreAdamW: stable (each layer once its subspace is stable) or step "
    "(all layers at --handoff-start, the one-shot baseline)",
    "handoff_rewarmup": "WeLoreAdamW: steps over which new factors ramp their learning rate "
    "up linearly (0: none)",
    "handoff_taper": "WeLoreAdamW: steps over which a selected layer's weight outside its "
    "top-k subspace is faded to zero before the hand-off (0: swap at once)",
    "target_reduction": "WeLore rank reduction to aim for, in (0, 1)",
    "min_ratio": "WeLore: matrices reducing less than this stay dense, in [0, 1)",
    "eval_every": "steps between evaluations (> 0)",
    "eval_batches": "validation batches per evaluation (> 0)",
    "checkpoint_every": "steps between checkpoints of out-dir/checkpoint.pt (> 0)",
    "vocab_size": "BPE vocabulary size (> 0; at least 257)",
    "tokenizer": "bpe (trained on the corpus, cached) or byte",
    "corpus_bytes": "bytes of text read from the corpus (> 0)",
    "dataset": "local .jsonl/.txt/.py/.md file or folder, or a Hugging Face dataset name; "
    "unset: the Python standard library's source",
    "seed": "random seed of the model, batches and projections",
    "dtype": "model dtype: float32 or bfloat16",
    "out_dir": "folder for metrics.jsonl, checkpoint.pt, summary.json and the plots",
    "stop_after": "stop after this many steps (of --steps; the schedule still spans --steps)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = PretrainConfig()
    for item in dataclasses.fields(PretrainConfig):
        if item.name in ("extra", "resume", "progress"):
            continue
        flag = "--" + item.name.replace("_", "-")
        value = getattr(defaults, item.name)
        kind = int if item.name == "stop_after" else type(value) if value is not None else str
        text = _HELP.get(item.name, "")
        parser.add_argument(flag, type=kind, default=value, help=f"{text} (default: {value})")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out-dir from its checkpoint.pt (a flag: it takes no path); "
        "fails if there is no checkpoint, reports a finished run without changing it",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    values = {
        item.name: getattr(args, item.name)
        for item in dataclasses.fields(PretrainConfig)
        if item.name not in ("extra", "progress")
    }
    from lowrank_optim.cli import UsageError

    try:
        config = PretrainConfig(**values, progress=not args.no_progress)
    except ValueError as error:  # a bad option value: one line, exit code 2
        raise UsageError(str(error)) from None
    if config.resume and not (Path(config.out_dir) / "checkpoint.pt").is_file():
        raise UsageError(_no_checkpoint_message(config))
    summary = run_pretraining(config)
    if summary.get("already_finished"):
        print(
            f"{config.out_dir}: the run already finished at step {summary['checkpoint_step']} "
            "(nothing to resume); its files are left as they are"
        )
    print(format_summary(summary))
    return 0
