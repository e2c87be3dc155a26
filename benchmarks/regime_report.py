"""Tables and plots of the regime study, from its cached results only (missing runs are left out
and named, so a partial study reports what it has)."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table, pyplot, refresh_results_md, write_json
from benchmarks.handoff_regime import Regime, RegimeJob, _all_jobs, cached
from benchmarks.handoff_report import spearman
from benchmarks.regime_flops import run_flops, shapes_of

__all__ = ["bootstrap_spearman", "collect", "report", "spearman"]

#: The short setting the per-layer claim is contrasted with (issue #14's study, 0.2 tokens per
#: parameter): its stability-driven runs at target 0.8.
SHORT = Path(__file__).resolve().parent / "results" / "runs" / "handoff_study"


def bootstrap_spearman(
    pairs: list[tuple[float, float]], resamples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Spearman over ``pairs`` with a 95% percentile bootstrap interval (pairs resampled)."""
    rng = random.Random(seed)
    x, y = [p[0] for p in pairs], [p[1] for p in pairs]
    values = []
    for _ in range(resamples):
        sample = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        value = spearman([p[0] for p in sample], [p[1] for p in sample])
        if value == value:  # a resample of one repeated pair has no ranks to correlate (NaN)
            values.append(value)
    values.sort()
    if not values:
        return {"rho": spearman(x, y), "low": None, "high": None, "pairs": len(pairs)}
    return {"rho": spearman(x, y), "low": values[int(0.025 * len(values))],
            "high": values[int(0.975 * len(values)) - 1], "pairs": len(pairs)}


def layer_pairs(results: list[dict[str, Any]], never: float) -> list[tuple[float, float]]:
    """(step its subspace became stable, relative truncation error at its rank) per handed-off
    layer of each run; a layer sent by the deadline without ever being stable counts as
    ``never`` (later than any stable one)."""
    pairs = []
    for result in results:
        for record in result["handoffs"]:
            stable = record.get("stable_since")
            pairs.append((float(stable) if stable is not None else never,
                          float(record["relative_error"])))
    return pairs


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _entries(regime: Regime, job: RegimeJob, result: dict[str, Any]) -> list[tuple[str, float]]:
    name = job.method if job.method != "scratch" else "scratch"
    entries = [(name, result["final_eval_loss"])]
    if job.method.startswith("posthoc"):
        label = "posthoc+ft" if job.method == "posthoc" else "posthoc+ft-flops"
        entries = ([("posthoc", result["final_eval_loss"])] if job.method == "posthoc" else [])
        entries.append((label, result["finetuned_eval_loss"]))
    return entries


def collect(regime: Regime) -> dict[str, Any]:
    shapes = shapes_of(regime)
    projected = sum(m * n for m, n in shapes.projected.values())
    jobs = _all_jobs(regime)
    results = {job: r for job in jobs if (r := cached(regime, job)) is not None}
    dense = {job.seed: r for job, r in results.items() if job.method == "dense"}
    rows: dict[str, list[dict[str, Any]]] = {}
    scratch = [j for j in results if j.method == "scratch"]
    best_lr = None
    if scratch:
        seed0 = [j for j in scratch if j.seed == regime.seeds[0]]
        best_lr = min(seed0, key=lambda j: results[j]["final_eval_loss"]).lr if seed0 else None
    for job, result in results.items():
        if job.method == "scratch" and job.lr != best_lr:
            continue
        flops = run_flops(result, shapes, regime)
        if result.get("factorized_from_start"):  # scratch: factorized from step 0
            removed = sum(shapes.projected[h["layer"]][0] * shapes.projected[h["layer"]][1]
                          - h["params_after"] for h in result["factorized_from_start"])
        else:
            removed = sum(h["params_before"] - h["params_after"] for h in result["handoffs"])
        for name, loss in _entries(regime, job, result):
            base = dense.get(job.seed)
            rows.setdefault(name, []).append({
                "seed": job.seed, "loss": loss, "removed": removed / projected,
                "vs_dense": loss / base["final_eval_loss"] - 1.0 if base else None,
                "flops": flops["total"] / run_flops(base, shapes, regime)["total"] if base
                else None,
                "parameters_end": result["parameters_end"], "steps": flops["steps"],
                "mean_step_seconds": result.get("mean_step_seconds"),
            })
    table = []
    for name, runs in rows.items():
        loss, loss_std = _stats([r["loss"] for r in runs])
        paired = [r["vs_dense"] for r in runs if r["vs_dense"] is not None]
        delta, delta_std = _stats(paired) if paired else (None, None)
        flops = [r["flops"] for r in runs if r["flops"] is not None]
        table.append({
            "method": name, "seeds": sorted(r["seed"] for r in runs), "eval_loss": loss,
            "eval_loss_std": loss_std, "vs_dense": delta, "vs_dense_std": delta_std,
            "removed": statistics.fmean(r["removed"] for r in runs),
            "flops_vs_dense": statistics.fmean(flops) if flops else None,
            "parameters_end": statistics.fmean(r["parameters_end"] for r in runs),
            "steps": statistics.fmean(r["steps"] for r in runs),
        })
    flat = []
    for result in dense.values():
        curve = result["eval_curve"]
        cut = [loss for step, loss in curve if step <= 0.9 * regime.steps]
        if cut:
            flat.append(1.0 - curve[-1][1] / cut[-1])
    welore = [r for j, r in results.items() if j.method == "welore"]
    short = [json.loads(p.read_text()) for p in sorted(SHORT.glob("welore-t0.8-s*/result.json"))]
    claim = {}
    if sum(len(r["handoffs"]) for r in welore) > 2:
        claim["regime"] = bootstrap_spearman(layer_pairs(welore, float(regime.steps + 1)))
    if short:
        claim["short"] = bootstrap_spearman(layer_pairs(short, 10_000.0))
    missing = [job.name for job in jobs if job not in results]
    curves = {f"{j.method}-s{j.seed}": {"flops": run_flops(r, shapes, regime)["curve"],
                                        "loss": r["eval_curve"],
                                        "parameters_end": r["parameters_end"]}
              for j, r in results.items() if r.get("eval_curve") and j.seed == regime.seeds[0]
              and (j.method != "scratch" or j.lr == best_lr)}
    parameters = dense[min(dense)]["parameters_start"] if dense else None
    return {"rows": table, "dense_last_tenth_improvement": flat, "per_layer_claim": claim,
            "missing": missing, "curves": curves, "projected": projected,
            "parameters": parameters, "best_scratch_lr": best_lr}


def _percent(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.2f}%" + (f" ± {100 * std:.2f}%" if std is not None else "")


def report(regime: Regime, folder: Path) -> None:
    """Write ``handoff_regime.md``, ``handoff_regime.json`` and ``handoff_regime_flops.png``."""
    data = collect(regime)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = regime.steps * regime.batch_size * regime.seq_len
    lines = ["# The hand-off in the real regime (issue #25)", ""]
    if data["parameters"]:
        lines += [f"Model {regime.model}: {data['parameters']:,} parameters, "
                  f"{data['projected'] / data['parameters']:.0%} in the projected matrices; "
                  f"{tokens:,} training tokens = "
                  f"{tokens / data['parameters']:.1f} tokens per parameter.", ""]
    if data["dense_last_tenth_improvement"]:
        flat = data["dense_last_tenth_improvement"]
        lines += [f"Dense eval loss over the last 10% of steps improves by "
                  f"{100 * statistics.fmean(flat):.2f}% (the bar: under 0.5%).", ""]
    rows = [[r["method"], len(r["seeds"]), f"{100 * r['removed']:.1f}%",
             f"{r['eval_loss']:.4f} ± {r['eval_loss_std']:.4f}",
             _percent(r["vs_dense"], r["vs_dense_std"]),
             "-" if r["flops_vs_dense"] is None else f"{r['flops_vs_dense']:.3f}",
             f"{r['parameters_end']:,.0f}", f"{r['steps']:.0f}"] for r in data["rows"]]
    lines += [markdown_table(["method", "seeds", "projected removed", "eval loss",
                              "vs dense (paired)", "FLOPs / dense", "parameters", "steps"],
                             rows), ""]
    for setting, claim in data["per_layer_claim"].items():
        if claim["low"] is None:
            continue
        lines.append(f"Per-layer claim ({setting}): Spearman(stable step, truncation error) = "
                     f"{claim['rho']:+.3f}, 95% bootstrap CI [{claim['low']:+.3f}, "
                     f"{claim['high']:+.3f}], {claim['pairs']} layers x seeds.")
    if data["missing"]:
        lines += ["", f"Not run yet: {', '.join(data['missing'])}."]
    (folder / "handoff_regime.md").write_text("\n".join(lines) + "\n")
    write_json("handoff_regime", {k: v for k, v in data.items() if k != "curves"}, folder)
    _plot(data, folder / "handoff_regime_flops.png")
    refresh_results_md(folder)


def _plot(data: dict[str, Any], path: Path) -> None:
    if not data["curves"]:
        return
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, curve in sorted(data["curves"].items()):
        losses = dict(map(tuple, curve["loss"]))
        points = [(flops, losses[step]) for step, flops in curve["flops"] if step in losses]
        if not points:
            continue
        x, y = zip(*points, strict=True)
        axes.plot(x, y, label=name)
        axes.annotate(f"{curve['parameters_end'] / 1e3:.0f}K", (x[-1], y[-1]), fontsize=7)
    axes.set_xlabel("training FLOPs (analytic)")
    axes.set_ylabel("eval loss")
    axes.set_title("Eval loss against training FLOPs (seed 0); ends: final parameters")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
