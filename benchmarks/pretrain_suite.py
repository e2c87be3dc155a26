"""Small-LLaMA pretraining suite: fixed vs adaptive refresh gap, and WeLore hand-offs.

Four runs with one seed and one data order through the same loop
(`lowrank_optim.train.run_pretraining`):

* torch AdamW;
* GaLoreAdamW with GaLore's fixed refresh gap (the baseline for both questions below);
* GaLoreAdamW with the adaptive gap (`StabilityConfig(policy="overlap")`): refreshes saved,
  wall time saved, eval loss (issue: subspace stabilization);
* WeLoreAdamW: hand-off steps, projected parameters removed, memory and step time before and
  after, eval loss against GaLoreAdamW (issue: WeLore hand-off);
* GaLoreAdamW8bit (fixed gap) and QGaLoreAdamW (INT8 weights, INT4 bases, Q-GaLore's lazy
  refresh): eval loss against GaLoreAdamW (issue: quantized variants).

    python -m benchmarks.pretrain_suite             # about 60 minutes on 2 CPU cores
    python -m benchmarks.pretrain_suite --steps 60  # smoke run
    python -m benchmarks.pretrain_suite --steps 20 --batch-size 2 --seq-len 32 --out /tmp/suite

`lowrank-optim bench quality` draws these runs' loss curves into one plot (benchmarks/quality.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, interleaved_medians, markdown_table, write_json
from lowrank_optim.cli.plots import plot_losses, plot_stability, read_records
from lowrank_optim.train import PretrainConfig, run_pretraining

__all__ = ["build_parser", "configs", "main", "run_logs", "runs_cache"]

BYTES = 4  # fp32 weights, gradients and states


def configs(args: argparse.Namespace) -> dict[str, PretrainConfig]:
    base = PretrainConfig(
        model=args.model,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        rank=args.rank,
        update_proj_gap=args.gap,
        eval_every=max(args.steps // 15, 1),
        checkpoint_every=10**9,
        progress=False,
        stability_threshold=args.threshold,
        stability_patience=args.patience,
        handoff_start=args.handoff_start,
        target_reduction=args.target,
        min_ratio=args.min_ratio,
    )
    out = Path(args.out) / "runs" / "pretrain_suite"
    return {
        "torch AdamW": replace(base, optimizer="adamw", out_dir=str(out / "adamw")),
        "GaLoreAdamW (fixed gap)": replace(
            base, optimizer="galore_adamw", stability_policy="fixed", out_dir=str(out / "galore")
        ),
        "GaLoreAdamW (adaptive gap)": replace(
            base,
            optimizer="galore_adamw",
            stability_policy="overlap",
            out_dir=str(out / "galore_adaptive"),
        ),
        # The hand-off asks "has this subspace settled enough to factorize the weight?", the
        # adaptive gap "can this refresh wait?": separate thresholds (--handoff-threshold).
        "WeLoreAdamW": replace(
            base,
            optimizer="welore_adamw",
            stability_policy="fixed",
            stability_threshold=args.handoff_threshold,
            out_dir=str(out / "welore"),
        ),
        "GaLoreAdamW8bit": replace(
            base,
            optimizer="galore_adamw8bit",
            stability_policy="fixed",
            out_dir=str(out / "galore8bit"),
        ),
        "QGaLoreAdamW": replace(
            base,
            optimizer="q_galore_adamw",
            stability_policy="qgalore",
            out_dir=str(out / "qgalore"),
        ),
        "GaLoreAdamW8bit (4-bit moments)": replace(
            base,
            optimizer="galore_adamw4bit",
            stability_policy="fixed",
            out_dir=str(out / "galore4bit"),
        ),
        "QGaLoreAdamW (4-bit moments)": replace(
            base,
            optimizer="q_galore_adamw4bit",
            stability_policy="qgalore",
            out_dir=str(out / "qgalore4bit"),
        ),
    }


def runs_cache(out: Path) -> Path:
    """The summaries of the suite's runs under results folder ``out``, by label."""
    return Path(out) / "pretrain_suite_runs.json"


def run_logs(runs: dict[str, PretrainConfig]) -> dict[str, Path]:
    """The JSONL metrics log of each run, by label."""
    return {label: Path(config.out_dir) / "metrics.jsonl" for label, config in runs.items()}


def refresh_counts(log: Path) -> tuple[int, int]:
    """(refreshes done, refreshes skipped) summed over layers, from the last subspace rows."""
    rows = read_records(log, kind="subspace")
    last = max(r["step"] for r in rows)
    final = [r for r in rows if r["step"] == last]
    return sum(r["refreshes"] for r in final), sum(r["refreshes_skipped"] for r in final)


def projected_parameters(log: Path) -> int:
    rows = read_records(log, kind="subspace")
    first = min(r["step"] for r in rows)
    return sum(r["shape"][0] * r["shape"][1] for r in rows if r["step"] == first)


def stability_by_type(log: Path) -> dict[str, Any]:
    """Per module type: first step at which half of its layers were stable; final overlap."""
    rows = read_records(log, kind="subspace")
    summary: dict[str, Any] = {}
    for kind in sorted({r["module_type"] for r in rows}):
        steps = sorted({r["step"] for r in rows if r["module_type"] == kind})
        half_stable = None
        for step in steps:
            layer_rows = [r for r in rows if r["module_type"] == kind and r["step"] == step]
            if sum(r["stable"] for r in layer_rows) * 2 >= len(layer_rows):
                half_stable = step
                break
        final = [
            r["last_overlap"]
            for r in rows
            if r["module_type"] == kind and r["step"] == steps[-1] and r["last_overlap"]
        ]
        summary[kind] = {
            "half_stable_step": half_stable,
            "final_mean_overlap": statistics.fmean(final) if final else None,
        }
    return summary


def handoff_step_times(config: PretrainConfig, log: Path, rounds: int = 3) -> dict[str, float]:
    """Median seconds of one whole training step before and after the run's hand-offs.

    Both models are rebuilt here: the dense one with GaLoreAdamW (as before any hand-off) and
    one with the WeLore run's hand-offs applied (its layers, its ranks; factors on plain AdamW,
    as after the hand-offs). Forward, backward and optimizer step on the same batch are timed in
    turn (``interleaved_medians``), ``update_proj_gap`` steps per window so every window holds
    one refresh per projected layer. In-run step times mix in evaluation and the load of other
    processes; this comparison does not.
    """
    from lowrank_optim.factorize import LayerRank, RankPlan, factorize_model
    from lowrank_optim.factory import build_optimizer
    from lowrank_optim.train import build_corpus
    from lowrank_optim.train.models import build_llama, load_llama_config

    corpus = build_corpus(vocab_size=config.vocab_size, max_bytes=config.corpus_bytes)
    tokens = corpus.train_tokens[: config.batch_size * config.seq_len].long()
    ids = tokens.view(config.batch_size, -1)
    llama = load_llama_config(config.model, vocab_size=corpus.tokenizer.vocab_size)
    spec = replace(config, optimizer="galore_adamw").optimizer_spec()
    dense = build_llama(llama, seed=config.seed)
    handed_off = build_llama(llama, seed=config.seed)
    modules = dict(handed_off.named_modules())
    plan = RankPlan(
        {
            record["layer"]: LayerRank(
                int(record["rank"]), tuple(modules[record["layer"]].weight.shape), True
            )
            for record in read_records(log, kind="handoff")
        }
    )
    factorize_model(handed_off, plan)

    def training_step(model: Any) -> Any:
        dense_left = any(
            type(module) is torch.nn.Linear and ("attn" in name or "mlp" in name)
            for name, module in model.named_modules()
        )
        # Once every projected layer is handed off, everything left trains with plain AdamW,
        # as WeLoreAdamW's factor groups do.
        optimizer = (
            build_optimizer(model, spec)
            if dense_left
            else torch.optim.AdamW(model.parameters(), lr=spec.lr)
        )

        def run() -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        run()  # state creation and the first refresh are not timed
        return run

    actions = {"before": training_step(dense), "after": training_step(handed_off)}
    return interleaved_medians(actions, rounds, config.update_proj_gap)


def handoff_figures(
    summary: dict[str, Any], galore: dict[str, Any], config: PretrainConfig
) -> dict[str, Any]:
    log = Path(config.out_dir) / "metrics.jsonl"
    handoffs = read_records(log, kind="handoff")
    projected = projected_parameters(log)
    removed = sum(r["params_before"] - r["params_after"] for r in handoffs)
    times = summary["step_seconds"]
    steps = len(times)
    if handoffs:
        first, last = min(r["step"] for r in handoffs), max(r["step"] for r in handoffs)
        window = max(min(first // 2, steps - last - 1, 200), 1)
        in_run_before = statistics.median(times[first - window - 1 : first - 1])
        in_run_after = statistics.median(times[steps - window :])
    else:
        first = last = None
        in_run_before = in_run_after = statistics.median(times)
    params_before, params_after = galore["parameters_end"], summary["parameters_end"]
    timed = handoff_step_times(config, log)
    return {
        "handoff_steps": sorted({r["step"] for r in handoffs}),
        "layers_handed_off": len(handoffs),
        "projected_parameters": projected,
        "projected_removed_fraction": removed / projected,
        "memory_before_bytes": 2 * BYTES * params_before + galore["optimizer_state_bytes"],
        "memory_after_bytes": 2 * BYTES * params_after + summary["optimizer_state_bytes"],
        "step_seconds_before": timed["before"],
        "step_seconds_after": timed["after"],
        "in_run_step_seconds_before": in_run_before,
        "in_run_step_seconds_after": in_run_after,
        "first_handoff": first,
        "last_handoff": last,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="9m")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--gap", type=int, default=50)
    parser.add_argument("--threshold", type=float, default=0.6, help="adaptive-gap overlap")
    parser.add_argument(
        "--handoff-threshold", type=float, default=0.5, help="overlap at which a layer is stable"
    )
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--handoff-start", type=float, default=0.4)
    parser.add_argument("--target", type=float, default=0.8, help="WeLore rank reduction")
    parser.add_argument("--min-ratio", type=float, default=0.5)
    parser.add_argument("--only", nargs="*", default=None, help="run only these labels")
    parser.add_argument(
        "--report-only", action="store_true", help="no runs: report the cached ones again"
    )
    # A tiny batch and a separate results folder make a smoke run of the whole suite cheap.
    parser.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    parser.add_argument("--seq-len", type=int, default=PretrainConfig.seq_len)
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="results folder (runs go to OUT/runs/)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs = configs(args)
    summaries = {}
    cache = runs_cache(args.out)
    if (args.only or args.report_only) and cache.exists():
        summaries = json.loads(cache.read_text())
    for label, config in runs.items():
        if args.report_only or (args.only and label not in args.only):
            continue
        summaries[label] = run_pretraining(config)
        print(f"{label}: eval {summaries[label]['final_eval_loss']:.4f}")
        cache.write_text(json.dumps(summaries))
    logs = run_logs(runs)
    fixed, adaptive = summaries["GaLoreAdamW (fixed gap)"], summaries["GaLoreAdamW (adaptive gap)"]
    fixed_done, _ = refresh_counts(logs["GaLoreAdamW (fixed gap)"])
    adaptive_done, adaptive_skipped = refresh_counts(logs["GaLoreAdamW (adaptive gap)"])
    stability = {
        "fixed_refreshes": fixed_done,
        "adaptive_refreshes": adaptive_done,
        "adaptive_skipped": adaptive_skipped,
        "refreshes_saved_fraction": 1 - adaptive_done / fixed_done,
        "wall_saved_fraction": 1 - adaptive["wall_seconds"] / fixed["wall_seconds"],
        "eval_loss_fixed": fixed["final_eval_loss"],
        "eval_loss_adaptive": adaptive["final_eval_loss"],
        "eval_loss_change": adaptive["final_eval_loss"] / fixed["final_eval_loss"] - 1,
        "by_module_type": stability_by_type(logs["GaLoreAdamW (fixed gap)"]),
    }
    welore = handoff_figures(summaries["WeLoreAdamW"], fixed, runs["WeLoreAdamW"])
    welore["eval_loss_change_vs_galore"] = (
        summaries["WeLoreAdamW"]["final_eval_loss"] / fixed["final_eval_loss"] - 1
    )
    quantized = {
        label: summaries[label]["final_eval_loss"] / fixed["final_eval_loss"] - 1
        for label in (
            "GaLoreAdamW8bit",
            "QGaLoreAdamW",
            "GaLoreAdamW8bit (4-bit moments)",
            "QGaLoreAdamW (4-bit moments)",
        )
        if label in summaries
    }
    plot_losses(
        {k: v for k, v in logs.items()},
        args.out / "pretrain_suite_loss.png",
        title=f"LLaMA {args.model} on the standard library, {args.steps} steps",
    )
    plot_stability(
        logs["GaLoreAdamW (fixed gap)"],
        args.out / "stability.png",
        title=f"Subspace overlap per layer, GaLoreAdamW, LLaMA {args.model}",
    )
    plot_stability(
        logs["WeLoreAdamW"],
        args.out / "welore_stability.png",
        title=f"Subspace overlap per layer, WeLoreAdamW, LLaMA {args.model}",
    )
    write_json(
        "pretrain_suite",
        {
            # --out is where this copy went, not a setting of the runs (and names a home).
            "settings": {key: value for key, value in vars(args).items() if key != "out"},
            "runs": {
                k: {key: v for key, v in s.items() if key != "step_seconds"}
                for k, s in summaries.items()
            },
            "stability": stability,
            "welore": welore,
            "quantized_eval_loss_change_vs_galore": quantized,
        },
        folder=args.out,
    )
    (args.out / "pretrain_suite.md").write_text(
        report(args, summaries, stability, welore, quantized)
    )
    print((args.out / "pretrain_suite.md").read_text())
    return 0


def report(
    args: argparse.Namespace,
    summaries: dict[str, Any],
    stability: dict[str, Any],
    welore: dict[str, Any],
    quantized: dict[str, float],
) -> str:
    runs = markdown_table(
        [
            "method",
            "final eval loss",
            "perplexity",
            "params at end",
            "optimizer state (MiB)",
            "wall (s)",
        ],
        [
            [
                label,
                f"{s['final_eval_loss']:.4f}",
                f"{s['perplexity']:.1f}",
                f"{s['parameters_end']:,}",
                f"{s['optimizer_state_bytes'] / 2**20:.2f}",
                f"{s['wall_seconds']:.0f}",
            ]
            for label, s in summaries.items()
        ],
    )
    adaptive = markdown_table(
        ["", "fixed gap", "adaptive gap", "change"],
        [
            [
                "refreshes (all layers)",
                stability["fixed_refreshes"],
                stability["adaptive_refreshes"],
                f"{-stability['refreshes_saved_fraction']:+.0%}",
            ],
            [
                "final eval loss",
                f"{stability['eval_loss_fixed']:.4f}",
                f"{stability['eval_loss_adaptive']:.4f}",
                f"{stability['eval_loss_change']:+.2%}",
            ],
            ["wall time", "", "", f"{-stability['wall_saved_fraction']:+.0%}"],
        ],
    )
    by_type = markdown_table(
        ["module type", "step at which half its layers were stable", "final mean overlap"],
        [
            [
                kind,
                v["half_stable_step"] or "never",
                f"{v['final_mean_overlap']:.3f}" if v["final_mean_overlap"] else "-",
            ]
            for kind, v in stability["by_module_type"].items()
        ],
    )
    handoff = markdown_table(
        ["", "value"],
        [
            ["hand-off steps", ", ".join(map(str, welore["handoff_steps"])) or "none"],
            ["layers handed off", welore["layers_handed_off"]],
            ["projected parameters removed", f"{welore['projected_removed_fraction']:.1%}"],
            [
                "weights + grads + optimizer state, before -> after",
                f"{welore['memory_before_bytes'] / 2**20:.2f} -> "
                f"{welore['memory_after_bytes'] / 2**20:.2f} MiB",
            ],
            [
                "step time, before -> after (interleaved, same batch)",
                f"{welore['step_seconds_before'] * 1e3:.0f} -> "
                f"{welore['step_seconds_after'] * 1e3:.0f} ms",
            ],
            [
                "step time in the run, before -> after (median)",
                f"{welore['in_run_step_seconds_before'] * 1e3:.0f} -> "
                f"{welore['in_run_step_seconds_after'] * 1e3:.0f} ms",
            ],
            ["final eval loss vs GaLoreAdamW", f"{welore['eval_loss_change_vs_galore']:+.2%}"],
        ],
    )
    quantized_table = markdown_table(
        ["method", "final eval loss vs GaLoreAdamW (fixed gap)"],
        [[label, f"{change:+.2%}"] for label, change in quantized.items()],
    )
    return (
        f"### Runs (LLaMA {args.model}, {args.steps} steps, rank {args.rank}, gap {args.gap})\n\n"
        f"{runs}\n\n### Adaptive refresh gap\n\n{adaptive}\n\n"
        f"### Which module types stabilized first\n\n{by_type}\n\n"
        f"### WeLore hand-off\n\n{handoff}\n\n"
        f"### Quantized variants\n\n{quantized_table}\n\n"
        "![losses](results/pretrain_suite_loss.png)\n"
    )


if __name__ == "__main__":
    sys.exit(main())
