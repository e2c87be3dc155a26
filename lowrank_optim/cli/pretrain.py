"""``lowrank-optim pretrain``: the command line of :func:`lowrank_optim.train.run_pretraining`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from lowrank_optim.cli.common import UsageError, one_line_warnings
from lowrank_optim.factory import OPTIMIZER_NAMES
from lowrank_optim.train.checkpoints import no_checkpoint_message
from lowrank_optim.train.config import PretrainConfig
from lowrank_optim.train.errors import RunSetupError, RunWarning
from lowrank_optim.train.models import LLAMA_SIZES
from lowrank_optim.train.pretrain import run_pretraining
from lowrank_optim.train.summary import format_summary

__all__ = ["HELP", "add_arguments", "run"]


#: ``--help`` text of each option; defaults are appended.
HELP = {
    "model": f"LLaMA size ({', '.join(LLAMA_SIZES)}) or the path of a LlamaConfig JSON file",
    "optimizer": f"one of: {', '.join(OPTIMIZER_NAMES)}",
    "steps": "optimizer steps in total (> 0)",
    "batch_size": "sequences per micro-batch (> 0); an optimizer step sees batch-size x "
    "grad-accum of them",
    "seq_len": "tokens per sequence (> 0)",
    "grad_accum": "micro-batches per optimizer step (> 0), each of --batch-size sequences, as "
    "in torch and the Trainer (--batch-size 16 --grad-accum 4: 64 sequences per step)",
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
    "layerwise_clip": "with --layerwise, how --grad-clip clips: parameter (each parameter's "
    "norm) or previous_global (the previous step's global norm)",
    "handoff_factor_lr_scale": "WeLoreAdamW: the factors' lr as a multiple of lr; None: the "
    "projection scale (lr x scale)",
    "handoff_factor_step": "WeLoreAdamW: fixed (every factor at its group's lr), matched-each "
    "(U and D each scaled so that its own term moves W as far as the layer's last GaLore step), "
    "capped (matched-each's multipliers, at most 1) or matched (both scaled together so)",
    "handoff_factor_step_relax": "WeLoreAdamW: steps over which a --handoff-factor-step "
    "multiplier returns linearly to 1 after the hand-off (0: it stays)",
    "stop_after": "stop after this many steps (of --steps; the schedule still spans --steps)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`PretrainConfig` field (``--batch-size`` for ``batch_size``)."""
    defaults = PretrainConfig()
    for item in dataclasses.fields(PretrainConfig):
        if item.name in ("extra", "resume", "progress", "layerwise"):
            continue
        flag = "--" + item.name.replace("_", "-")
        value = getattr(defaults, item.name)
        kind = {"stop_after": int, "handoff_factor_lr_scale": float}.get(
            item.name, type(value) if value is not None else str
        )
        text = HELP.get(item.name, "")
        parser.add_argument(flag, type=kind, default=value, help=f"{text} (default: {value})")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out-dir from its checkpoint.pt (a flag: it takes no path); "
        "fails if there is no checkpoint, reports a finished run without changing it",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--layerwise",
        action="store_true",
        help="step each parameter inside backward and free its gradient at once "
        "(LayerwiseOptimizer; GaLore-family optimizers; --grad-clip as --layerwise-clip says)",
    )


def run(args: argparse.Namespace) -> int:
    """Validate the options, train, print the summary table; a bad option is a UsageError.

    So are the problems found once the run starts (:class:`RunSetupError`: a changed setting on
    resume, an unreadable checkpoint, too little data); :class:`RunWarning` prints one line.
    """
    values = {
        item.name: getattr(args, item.name)
        for item in dataclasses.fields(PretrainConfig)
        if item.name not in ("extra", "progress")
    }
    try:
        config = PretrainConfig(**values, progress=not args.no_progress)
    except ValueError as error:  # a bad option value: one line, exit code 2
        raise UsageError(str(error)) from None
    if config.resume and not (Path(config.out_dir) / "checkpoint.pt").is_file():
        raise UsageError(no_checkpoint_message(config))
    try:
        with one_line_warnings("pretrain", RunWarning):
            summary = run_pretraining(config)
    except RunSetupError as error:
        raise UsageError(str(error)) from None
    if summary.get("already_finished"):
        print(
            f"{config.out_dir}: the run already finished at step {summary['checkpoint_step']} "
            "(nothing to resume); its files are left as they are"
        )
    print(format_summary(summary))
    return 0
