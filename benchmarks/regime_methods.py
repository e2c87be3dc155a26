"""The regime study's methods that are not a plain ``lowrank-optim pretrain`` run.

Cuttlefish and the factorized-from-scratch baseline go through the same pretraining loop as the
others (an optimizer factory); the post-hoc baseline compresses a finished dense run and
fine-tunes its low-rank components; :func:`step_timing` times a dense and a handed-off training
step in one process.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from benchmarks.handoff_regime import Regime, RegimeJob, _require, folder_of
from benchmarks.regime_flops import finetune_flops_per_step, run_flops, shapes_of
from lowrank_optim.train import PretrainConfig

__all__ = ["cuttlefish_factory", "post_hoc_run", "scratch_factory", "step_timing"]


def cuttlefish_factory(regime: Regime, config: PretrainConfig) -> Any:
    """Cuttlefish's switch and ranks inside the study's window, the factors on the same rule
    as WeLoreAdamW's (so that timing and ranks are the only difference)."""
    from benchmarks.handoff_methods import CuttlefishAdamW
    from lowrank_optim.config import HandoffConfig, ProjectionConfig, StabilityConfig
    from lowrank_optim.factory import lowrank_param_groups

    def build(model: torch.nn.Module) -> torch.optim.Optimizer:
        projection = ProjectionConfig(rank=regime.rank, update_proj_gap=regime.gap,
                                      scale=regime.scale)
        return CuttlefishAdamW(
            lowrank_param_groups(model, "attn-mlp", projection),
            earliest=int(regime.handoff_start * regime.steps),
            latest=int(regime.handoff_end * regime.steps),
            lr=config.lr,
            weight_decay=config.weight_decay,
            stability=StabilityConfig(threshold=regime.threshold, patience=regime.patience),
            handoff=HandoffConfig(
                start_step=1,
                check_every=regime.gap,
                target_reduction=regime.target,
                min_ratio=regime.min_ratio,
                factor_step=config.handoff_factor_step,
                factor_step_relax=config.handoff_factor_step_relax,
            ),
            model=model,
        )

    return build


def scratch_factory(ranks: dict[str, int], lr: float) -> Any:
    """The named linears factorized at ``ranks`` from step 0 (spectral init), AdamW on all."""
    from benchmarks.handoff_methods import factorized_from_scratch

    def build(model: torch.nn.Module) -> torch.optim.Optimizer:
        factorized_from_scratch(model, ranks, spectral=True)
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    return build


def _dense_model(regime: Regime, seed: int) -> tuple[torch.nn.Module, Any]:
    from lowrank_optim.checkpoint import load_checkpoint
    from lowrank_optim.train import build_corpus
    from lowrank_optim.train.models import build_llama, load_llama_config

    path = folder_of(regime, RegimeJob("dense", seed)) / "checkpoint.pt"
    if not path.exists():
        raise RuntimeError(f"the dense run of seed {seed} has no checkpoint at {path}")
    corpus = build_corpus(tokenizer=regime.tokenizer, max_bytes=regime.corpus_bytes)
    config = load_llama_config(regime.model_path, vocab_size=corpus.tokenizer.vocab_size)
    model = build_llama(config, seed=seed)
    model.load_state_dict(load_checkpoint(path)["model"])
    return model, corpus


def post_hoc_run(regime: Regime, job: RegimeJob) -> dict[str, Any]:
    """The dense run's final model compressed to WeLoreAdamW's size, then LRC fine-tuned.

    ``posthoc`` fine-tunes on ``finetune_fraction`` of the training steps; ``posthoc-flops``
    with the FLOPs that the equal-token WeLoreAdamW run saved against dense.
    """
    from benchmarks.handoff_methods import post_hoc
    from lowrank_optim.factorize import trainable_lrc
    from lowrank_optim.train import TokenBatches, evaluate, validation_batches
    from lowrank_optim.train.models import count_parameters

    dense_result = _require(regime, RegimeJob("dense", job.seed))
    welore = _require(regime, RegimeJob("welore", job.seed))
    shapes = shapes_of(regime)
    model, corpus = _dense_model(regime, job.seed)
    projected = sum(m * n for m, n in shapes.projected.values())
    others = count_parameters(model) - projected
    model, report, plan = post_hoc(
        model, list(shapes.projected), welore["parameters_end"] - others, regime.min_ratio
    )
    val = validation_batches(corpus.val_tokens, regime.batch_size, regime.seq_len,
                             regime.eval_batches)
    before = evaluate(model, val)
    trainable_lrc(model, verbose=False)
    linear = shapes.head + sum(r["params_after"] for r in report) + sum(
        m * n for name, (m, n) in shapes.projected.items()
        if name not in {r["name"] for r in report})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_step = finetune_flops_per_step(shapes, linear, trainable)
    if job.method == "posthoc-flops":
        steps = max(round(run_flops(welore, shapes, regime)["saved"] / per_step), 1)
    else:
        steps = max(int(regime.finetune_fraction * regime.steps), 1)
    # The lr the dense run ended with (lr x scale x min_lr_ratio for its projected weights),
    # held: a fine-tune at the end of training, not a second warm-up.
    config = regime.base(job.seed, folder_of(regime, job))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=regime.lr * regime.scale * config.min_lr_ratio)
    # A data order of its own: the fine-tune sees tokens the dense run saw, reshuffled.
    batches = TokenBatches(corpus.train_tokens, batch_size=regime.batch_size,
                           seq_len=regime.seq_len, seed=job.seed + 1)
    tick = time.perf_counter()
    curve = []
    for step in range(1, steps + 1):
        batch = next(batches)
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % max(steps // 5, 1) == 0 and step < steps:
            curve.append([step, evaluate(model, val)])
    after = evaluate(model, val)
    curve.append([steps, after])
    return {
        "optimizer": "WeLore post hoc of GaLoreAdamW, LRC fine-tune with torch.optim.AdamW",
        "final_eval_loss": before,
        "finetuned_eval_loss": after,
        "finetune_steps": steps,
        "finetune_curve": curve,
        "finetune_seconds": time.perf_counter() - tick,
        "finetune_flops": steps * per_step,
        "dense_flops": run_flops(dense_result, shapes, regime)["total"],
        "steps": regime.steps,
        "parameters_start": dense_result["parameters_end"],
        "parameters_end": count_parameters(model),
        "handoffs": [
            {"layer": r["name"], "rank": r["rank"], "params_before": r["params_before"],
             "params_after": r["params_after"], "relative_error": r["relative_error"]}
            for r in report
        ],
        "eval_curve": [],
        "threshold": plan.threshold,
    }


def step_timing(regime: Regime, seed: int, rounds: int = 7, repeats: int = 3) -> dict[str, float]:
    """Seconds per training step (forward, backward, optimizer) of the dense run's final model
    with GaLoreAdamW and of WeLoreAdamW's final model and optimizer (factors and all), timed in
    turn on the same batch in one process (``interleaved_medians``)."""
    from benchmarks.common import interleaved_medians
    from lowrank_optim.checkpoint import load_checkpoint
    from lowrank_optim.factory import build_optimizer
    from lowrank_optim.train import build_corpus
    from lowrank_optim.train.models import build_llama, load_llama_config

    corpus = build_corpus(tokenizer=regime.tokenizer, max_bytes=regime.corpus_bytes)
    model_config = load_llama_config(regime.model_path, vocab_size=corpus.tokenizer.vocab_size)
    batch = corpus.train_tokens[: regime.batch_size * regime.seq_len].long()
    batch = batch.view(regime.batch_size, regime.seq_len)
    actions = {}
    for label, method, optimizer in (("dense", "dense", "galore_adamw"),
                                     ("welore", "welore", "welore_adamw")):
        job = RegimeJob(method, seed)
        config = replace(regime.base(seed, folder_of(regime, job)), optimizer=optimizer)
        model = build_llama(model_config, seed=seed)
        built = build_optimizer(model, config.optimizer_spec())
        payload = load_checkpoint(folder_of(regime, job) / "checkpoint.pt")
        built.load_state_dict(payload["optimizer"])  # re-applies the hand-offs first
        model = getattr(built, "model", None) or model
        model.load_state_dict(payload["model"])

        def step(model: torch.nn.Module = model, built: Any = built) -> None:
            model(input_ids=batch, labels=batch).loss.backward()
            built.step()
            built.zero_grad(set_to_none=True)

        step()  # warm-up
        actions[label] = step
    return interleaved_medians(actions, rounds, repeats)
