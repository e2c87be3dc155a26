"""Settings of one pretraining run (:class:`PretrainConfig`), validated as they are made."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowrank_optim.config import FACTOR_STEPS, HandoffConfig, ProjectionConfig, StabilityConfig
from lowrank_optim.factory import OPTIMIZER_NAMES, OptimizerSpec
from lowrank_optim.train.data import looks_local
from lowrank_optim.train.models import LLAMA_SIZES

__all__ = ["DTYPES", "TOKENIZERS", "PretrainConfig", "check_pretrain_config"]


@dataclass
class PretrainConfig:
    """Settings of one pretraining run; the defaults finish in a few minutes on 2 CPU cores."""

    model: str = "9m"
    optimizer: str = "welore_adamw"
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 1e-2
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
    handoff_factor_lr_scale: float | None = None
    handoff_factor_step: str = "matched-each"
    handoff_factor_step_relax: int = 100
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
    #: step each parameter inside backward (LayerwiseOptimizer); GaLore-family optimizers only
    layerwise: bool = False
    #: with layerwise: clip each parameter ("parameter") or by the last step's global norm
    layerwise_clip: str = "parameter"
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
            factor_lr_scale=self.handoff_factor_lr_scale,
            factor_step=self.handoff_factor_step,
            factor_step_relax=self.handoff_factor_step_relax,
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


#: Tokenizers of the built-in corpus pipeline (:func:`lowrank_optim.train.data.build_corpus`).
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
    choice("layerwise_clip", ("parameter", "previous_global"))
    if config.layerwise and config.optimizer in ("adamw", "adamw8bit"):
        raise ValueError(
            f"Invalid optimizer for layerwise: {config.optimizer!r}; layer-wise updates need a "
            "GaLore-family optimizer (galore_adamw, galore_adamw8bit, galore_adamw4bit, "
            "q_galore_adamw, q_galore_adamw4bit, welore_adamw)"
        )
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
    choice("handoff_factor_step", FACTOR_STEPS)
    for name in ("handoff_rewarmup", "handoff_taper", "handoff_factor_step_relax"):
        value = getattr(config, name)
        if not _is_int(value) or value < 0:
            raise ValueError(f"Invalid {name}: {value!r}; must be an integer >= 0")
    if config.handoff_factor_lr_scale is not None:
        _number_in("handoff_factor_lr_scale", config.handoff_factor_lr_scale, 0.0, inf,
                   open_low=True)
    _number_in("target_reduction", config.target_reduction, 0.0, 1.0, open_low=True, open_high=True)
    _number_in("min_ratio", config.min_ratio, 0.0, 1.0, open_high=True)
    if config.dataset is not None and (not isinstance(config.dataset, str) or not config.dataset):
        raise ValueError(
            f"Invalid dataset: {config.dataset!r}; a local path, a Hugging Face dataset name, "
            "or None for the built-in corpus"
        )
    if config.dataset is not None:
        local = Path(config.dataset).expanduser()
        if looks_local(config.dataset) and not local.exists():
            raise ValueError(
                f"Invalid dataset: {config.dataset!r} does not exist; give an existing .jsonl, "
                ".txt, .py, .md file or folder, or a Hugging Face dataset name"
            )
    if not isinstance(config.out_dir, str | Path) or not str(config.out_dir):
        raise ValueError(f"Invalid out_dir: {config.out_dir!r}; must be a folder path")
    if not isinstance(config.extra, dict):
        raise ValueError(f"Invalid extra: {config.extra!r}; must be a dict")

