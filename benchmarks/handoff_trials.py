"""Policy trials for the hand-off study (issue #14): one stability-driven WeLoreAdamW run with
``HandoffConfig`` / ``PretrainConfig`` overrides, against the study's dense run of the same seed.

The study (:mod:`benchmarks.handoff_study`) fixes its methods; this runs the questions it
raises, one override at a time, in the study's exact setting (model, data order per seed,
schedule), so a trial's eval curve is paired seed by seed with the study's dense GaLoreAdamW
curve: the same initialization and batches, so the difference is the policy's alone.

    python -m benchmarks.handoff_trials --name factor-lr-half --seed 0 --target 0.78 \\
        --handoff '{"factor_lr_scale": 0.125}'
    python -m benchmarks.handoff_trials --name window-0.6 --seed 0 --target 0.78 \\
        --config '{"steps": 1000, "eval_every": 100, "checkpoint_every": 200, "handoff_end": 0.6}'
    python -m benchmarks.handoff_trials --report     # benchmarks/results/handoff_trials.md

A trial at ``steps: 1000`` is compared with the study's twice-the-tokens dense run
(``<study out>/long``). Each trial's result (curve, hand-offs, overrides) is cached in
``<out>/<name>-s<seed>/result.json``; a finished trial is not rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, markdown_table
from benchmarks.handoff_study import QUICK, Study

__all__ = ["dense_curve", "main", "report", "run_trial", "trial_rows"]

TRIALS = "benchmarks/results/runs/handoff_trials"


def run_trial(
    study: Study,
    name: str,
    seed: int,
    target: float,
    handoff: dict[str, Any],
    config: dict[str, Any],
    out: str,
) -> dict[str, Any]:
    """Train one trial in ``study``'s setting (or return its cached result) and cache it."""
    import torch

    from lowrank_optim.factory import build_optimizer
    from lowrank_optim.train import run_pretraining

    folder = Path(out) / f"{name}-s{seed}"
    if (folder / "result.json").exists():
        return json.loads((folder / "result.json").read_text())
    torch.set_num_threads(int(os.environ.get("STUDY_THREADS", "1")))
    base = replace(
        study.base(seed, folder), optimizer="welore_adamw", target_reduction=target, **config
    )
    spec = base.optimizer_spec()
    spec = replace(spec, handoff=replace(spec.handoff, **handoff))
    resume = (folder / "checkpoint.pt").exists()
    summary = run_pretraining(
        replace(base, resume=resume), lambda model: build_optimizer(model, spec)
    )
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    result = {
        "name": name, "seed": seed, "target": target, "steps": base.steps,
        "over": {"handoff": handoff, "config": config},
        "final_eval_loss": summary["final_eval_loss"],
        "parameters_end": summary["parameters_end"],
        "eval_curve": [[r["step"], r["loss"]] for r in records if r.get("kind") == "eval"],
        "handoffs": [r for r in records if r.get("kind") == "handoff"],
    }
    (folder / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _study_folder(study: Study, study_out: str, steps: int) -> Path:
    """Where the study keeps its runs of ``steps`` steps (its own length, else ``long``)."""
    return Path(study_out) if steps == study.steps else Path(study_out) / "long"


def dense_curve(study: Study, study_out: str, seed: int, steps: int) -> dict[int, float] | None:
    """The study's dense eval curve for ``seed`` at ``steps``."""
    folder = _study_folder(study, study_out, steps)
    path = folder / f"dense-s{seed}" / "result.json"
    if not path.exists():
        return None
    return {int(step): loss for step, loss in json.loads(path.read_text())["eval_curve"]}


def trial_rows(study: Study, out: str, study_out: str) -> list[dict[str, Any]]:
    """Every cached trial against its dense run: the gap at each eval step and at the end."""
    from benchmarks.handoff_study import projected_total

    projected, _ = projected_total(study)
    trials = [json.loads(path.read_text()) for path in sorted(Path(out).glob("*/result.json"))]
    baselines = []  # the study's own stability-driven run at each trial's seed, target, length
    for key in sorted({(t["seed"], t["target"], t["steps"]) for t in trials}):
        seed, target, steps = key
        folder = _study_folder(study, study_out, steps) / f"welore-t{target:g}-s{seed}"
        if (folder / "result.json").exists():
            run = json.loads((folder / "result.json").read_text())
            baselines.append({
                "name": "baseline (the study's welore)", "seed": seed, "target": target,
                "steps": steps, "over": {"handoff": {}, "config": {}},
                "eval_curve": run["eval_curve"], "handoffs": run["handoffs"],
            })
    rows = []
    for trial in baselines + trials:
        dense = dense_curve(study, study_out, trial["seed"], trial["steps"])
        if dense is None:
            continue
        curve = trial["eval_curve"]
        gaps = {step: loss / dense[step] - 1.0 for step, loss in curve if step in dense}
        removed = sum(h["params_before"] - h["params_after"] for h in trial["handoffs"])
        rows.append({
            "name": trial["name"], "seed": trial["seed"], "target": trial["target"],
            "steps": trial["steps"], "over": trial["over"], "removed": removed / projected,
            "final_gap": gaps[max(gaps)], "gaps": gaps,
            "handoff_steps": sorted({h["step"] for h in trial["handoffs"]}),
        })
    return rows


def report(
    study: Study, out: str, study_out: str, path: Path = RESULTS / "handoff_trials.md"
) -> str:
    """The trials as a markdown table (mean ± std where a trial ran on several seeds)."""
    rows = trial_rows(study, out, study_out)
    by_name: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        by_name.setdefault((row["name"], row["steps"]), []).append(row)
    table = []
    for (name, _), runs in by_name.items():
        finals = [100 * r["final_gap"] for r in runs]
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        first = runs[0]
        table.append([
            name, json.dumps(first["over"]["handoff"] | first["over"]["config"]), first["steps"],
            ", ".join(str(r["seed"]) for r in runs), f"{100 * first['removed']:.1f}",
            f"{statistics.fmean(finals):+.2f}% ± {std:.2f}%",
            "; ".join(f"s{r['seed']}: {100 * r['final_gap']:+.2f}%" for r in runs),
        ])
    curves = [
        [f"{r['name']} s{r['seed']}", " ".join(
            f"{step}:{100 * gap:+.2f}" for step, gap in sorted(r["gaps"].items())
            if step >= 0.6 * r["steps"]
        )]
        for r in rows
    ]
    text = "\n".join([
        "# Hand-off policy trials (issue #14)",
        "",
        "Stability-driven WeLoreAdamW at the study's setting with one override each; the gap is "
        "the final eval loss against the study's dense GaLoreAdamW run of the same seed (paired: "
        "same initialization and batches). `python -m benchmarks.handoff_trials --report`.",
        "",
        markdown_table(
            ["trial", "overrides", "steps", "seeds", "removed (%)", "vs dense", "per seed"], table
        ),
        "",
        "Gap to dense along the run (eval step: gap), from 60% of the steps on:",
        "",
        markdown_table(["trial", "gap at each eval step"], curves),
        "",
    ])
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", help="the trial's name (its cache folder is <name>-s<seed>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=None, help="default: the bar target")
    parser.add_argument("--handoff", default="{}", help="HandoffConfig overrides, JSON")
    parser.add_argument("--config", default="{}", help="PretrainConfig overrides, JSON")
    parser.add_argument("--out", default=TRIALS, help="the trials' cache")
    parser.add_argument("--study-out", default=Study().out, help="the study's cache (dense runs)")
    parser.add_argument("--report", action="store_true", help="only write the report")
    parser.add_argument(
        "--quick", action="store_true", help="the study's smoke setting (with its --quick --out)"
    )
    args = parser.parse_args(argv)
    study = QUICK if args.quick else Study()
    if args.quick and args.out == TRIALS:
        parser.error("--quick needs --out (the quick trials are not kept with the results)")
    target = study.bar_target if args.target is None else args.target
    if not args.report:
        if not args.name:
            parser.error("--name is required to run a trial")
        result = run_trial(
            study,
            args.name,
            args.seed,
            target,
            json.loads(args.handoff),
            json.loads(args.config),
            args.out,
        )
        print(f"{args.name} seed {args.seed}: final eval loss {result['final_eval_loss']:.4f}")
    path = Path(args.out) / "handoff_trials.md" if args.quick else RESULTS / "handoff_trials.md"
    print(report(study, args.out, args.study_out, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
