"""Tables and plots of the hand-off study (benchmarks/handoff_study.py), from its cache alone.

* ``handoff_study.md`` / ``.json``: the headline table (mean +- std over seeds), every target,
  training cost, and the per-layer test of the seed paper's claim;
* ``handoff_pareto.png``: final eval loss against the share of projected-matrix parameters
  removed, one line per method, error bars over seeds;
* ``handoff_layers.png``: per layer, when its gradient subspace became stable and its final
  overlap (dense GaLore run), against its WeLore rank reduction and reconstruction error;
* ``handoff_gap.png``: each timing policy's eval loss relative to dense along the run (mean
  +- std over seeds, at the bar's target), which shows what each hand-off costs and when.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import markdown_table, pyplot, write_json

__all__ = ["layer_claim", "paired_against_welore", "report", "spearman"]

LABELS = {
    "dense": "GaLoreAdamW, dense",
    "welore": "WeLoreAdamW (stability-driven; factor_step fixed)",
    "welore-taper": "WeLoreAdamW (stability-driven, tapered)",
    "welore-rewarmup": "WeLoreAdamW (stability-driven, factor lr re-warm-up)",
    "welore-lr": "WeLoreAdamW, factors at lr (before this change)",
    "oneshot": "one-shot (all at the window's start)",
    "oneshot-late": "one-shot (all at the window's end; factor_step fixed)",
    "welore-halflr": "WeLoreAdamW (stability-driven), factors at lr x scale / 2",
    "oneshot-late-halflr": "one-shot (all at the window's end), factors at lr x scale / 2",
    "welore-matched": "WeLoreAdamW (stability-driven), factor_step matched",
    "oneshot-late-matched": "one-shot (all at the window's end), factor_step matched",
    "welore-each": "WeLoreAdamW (stability-driven), factor_step matched-each",
    "oneshot-late-each": "one-shot (all at the window's end), factor_step matched-each",
    "welore-capped": "WeLoreAdamW (stability-driven), factor_step capped",
    "oneshot-late-capped": "one-shot (all at the window's end), factor_step capped",
    "welore-relax": "WeLoreAdamW (stability-driven), matched-each relaxing to 1 over 100 steps "
    "(the default)",
    "oneshot-late-relax": "one-shot (all at the window's end), matched-each relaxing over 100",
    "oneshot-mid": "one-shot (all at the window's middle; factor_step fixed)",
    "oneshot-mid-each": "one-shot (all at the window's middle), factor_step matched-each",
    "cuttlefish": "Cuttlefish (stable-rank switch)",
    "posthoc": "post-hoc WeLore, no fine-tune",
    "posthoc+ft": "post-hoc WeLore + LRC fine-tune",
    "scratch": "factorized from scratch (AdamW, best lr)",
}


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    rx, ry = ranks(xs), ranks(ys)
    if len(xs) < 3 or statistics.pstdev(rx) == 0 or statistics.pstdev(ry) == 0:
        return float("nan")
    return statistics.correlation(rx, ry)


def layer_claim(study: Any, seed: int) -> list[dict[str, Any]]:
    """Per projected layer of the dense run: stability (when, final overlap) and WeLore's verdict.

    The rank reduction is WeLore's at the headline target on the final dense weights (one global
    threshold over the min/max-normalized spectra); the error is the relative Frobenius error of
    the rank-k truncation, ``sqrt(sum_{i>k} s_i^2 / sum_i s_i^2)``.
    """
    from benchmarks.handoff_study import Job, job_folder
    from lowrank_optim.checkpoint import load_checkpoint
    from lowrank_optim.factorize import normalized_spectrum, solve_threshold

    folder = job_folder(study, Job("dense", 0.0, seed))
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    result_path = folder / "result.json"
    result = json.loads(result_path.read_text())
    if "spectra" not in result:  # kept with the result: checkpoints are not kept in git
        weights = load_checkpoint(folder / "checkpoint.pt")["model"]
        result["spectra"] = {
            name: torch.linalg.svdvals(weights[name].float()).tolist()
            for name in dict.fromkeys(r["name"] for r in records if r.get("kind") == "subspace")
            if name in weights
        }
        result_path.write_text(json.dumps(result, indent=1) + "\n")
    last: dict[str, dict[str, Any]] = {}
    stable_since: dict[str, int] = {}
    streak: dict[str, int] = {}
    for record in records:  # the study's criterion, recomputed: the run may predate it
        if record.get("kind") != "subspace":
            continue
        name, overlap = record["name"], record["last_overlap"]
        last[name] = record
        met = overlap is not None and overlap >= study.threshold
        streak[name] = streak.get(name, 0) + 1 if met else 0
        if streak[name] >= study.patience and name not in stable_since:
            stable_since[name] = int(record["step"])
    spectra = {name: torch.tensor(values) for name, values in result["spectra"].items()}
    threshold = solve_threshold(spectra, study.headline)
    rows = []
    for name, values in spectra.items():
        kept = max(int((normalized_spectrum(values) >= threshold).sum()), 1)
        energy = values.square()
        rows.append(
            {
                "layer": name.removesuffix(".weight"),
                "module_type": last[name]["module_type"],
                "stable_since": stable_since.get(name, -1),
                "final_overlap": last[name]["last_overlap"],
                "rank_reduction": 1.0 - kept / values.numel(),
                "relative_error": float((energy[kept:].sum() / energy.sum()).sqrt()),
            }
        )
    return rows


def allocation_check(study: Any, seed: int, removed: float) -> dict[str, float] | None:
    """Eval loss of the dense run's final model compressed, with no fine-tune, to ``removed`` of
    its projected-matrix parameters under four rank allocations: WeLore's global threshold,
    Cuttlefish's (stable rank x full rank / stable rank at init), the stable rank alone, and
    one rank share for all. ``None`` without the run's checkpoint (not kept in git)."""
    from benchmarks.handoff_methods import match_parameters, scaled_plan, stable_rank
    from benchmarks.handoff_study import Job, job_folder, projected_total
    from lowrank_optim.checkpoint import load_checkpoint
    from lowrank_optim.factorize import factorize_model
    from lowrank_optim.train import build_corpus, evaluate, validation_batches
    from lowrank_optim.train.models import build_llama, load_llama_config

    path = job_folder(study, Job("dense", 0.0, seed)) / "checkpoint.pt"
    if not path.exists():
        return None
    corpus = build_corpus(max_bytes=study.corpus_bytes)
    config = load_llama_config(study.model, vocab_size=corpus.tokenizer.vocab_size)
    val = validation_batches(corpus.val_tokens, study.batch_size, study.seq_len, study.eval_batches)
    weights = load_checkpoint(path)["model"]
    initial = build_llama(config, seed=seed).state_dict()
    projected, shapes = projected_total(study)
    budget = round((1.0 - removed) * projected)
    names = {name: f"{name}.weight" for name in shapes}
    spectra = {n: torch.linalg.svdvals(weights[w].float()) for n, w in names.items()}
    now = {n: stable_rank(weights[w]) for n, w in names.items()}
    plans = {
        "welore": match_parameters(spectra, shapes, budget, study.min_ratio),
        "cuttlefish": scaled_plan(
            {n: now[n] * min(shapes[n]) / stable_rank(initial[w]) for n, w in names.items()},
            shapes,
            budget,
        ),
        "stable_rank": scaled_plan(now, shapes, budget),
        "uniform": scaled_plan({n: float(min(shapes[n])) for n in shapes}, shapes, budget),
    }
    losses = {}
    for label, plan in plans.items():
        model = build_llama(config, seed=seed)
        model.load_state_dict(weights)
        losses[label] = evaluate(factorize_model(model, plan), val)
    return losses


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(mean: float, std: float, digits: int = 4) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def paired_against_welore(
    rows: list[dict[str, Any]], reference: str = "welore"
) -> list[dict[str, Any]]:
    """Per target, every method's loss cost minus the stability-driven ``reference``'s (a
    WeLore method), seed by seed.

    Paired over seeds (the same data order and initialization), so seed-to-seed variation of
    the dense baseline cancels: a positive mean is a method doing worse than the reference.
    ``wins`` counts the seeds on which the reference is better.
    """
    pairs = []
    for welore in (r for r in rows if r["method"] == reference):
        for other in rows:
            if other["target"] != welore["target"] or other["method"] in (reference, "dense"):
                continue
            seeds = sorted(set(welore["deltas"]) & set(other["deltas"]))
            if len(seeds) < 2:
                continue
            gaps = [other["deltas"][s] - welore["deltas"][s] for s in seeds]
            pairs.append({
                "method": other["method"], "reference": reference,
                "target": welore["target"], "seeds": len(seeds),
                "gap": statistics.fmean(gaps), "gap_std": statistics.stdev(gaps),
                "wins": sum(gap > 0 for gap in gaps),
            })
    return pairs


#: The timing policies drawn along the run (``handoff_gap.png``), where present.
GAP_METHODS = (
    "welore", "oneshot", "oneshot-mid", "oneshot-late", "cuttlefish",
    "welore-each", "oneshot-mid-each", "oneshot-late-each", "welore-relax",
)


def _gap_rows(rows: list[dict[str, Any]], target: float) -> list[dict[str, Any]]:
    return [
        row
        for method in GAP_METHODS
        for row in rows
        if row["method"] == method and row["target"] == target and row.get("gap_curve")
    ]


def _gap_plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(8, 5))
    for row in rows:
        steps, means, stds = zip(*row["gap_curve"], strict=True)
        means = [100 * m for m in means]
        line = axis.plot(steps, means, marker="o", markersize=3, label=LABELS[row["method"]])
        axis.fill_between(
            steps,
            [m - 100 * s for m, s in zip(means, stds, strict=True)],
            [m + 100 * s for m, s in zip(means, stds, strict=True)],
            color=line[0].get_color(),
            alpha=0.12,
        )
    axis.axhline(0.0, color="grey", linewidth=0.8)
    _finish(
        figure, axis, path, "step", "eval loss vs dense GaLoreAdamW, same seed (%)",
        "Hand-off timing: the gap to dense along the run (mean ± std over seeds)", legend_size=7,
    )


def _finish(
    figure: Any, axis: Any, path: Path, xlabel: str, ylabel: str, title: str, legend_size: int
) -> None:
    """Label, legend and grid one-axis ``figure``, save it to ``path`` and close it."""
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize=legend_size, loc="upper left")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot().close(figure)


def _pareto(rows: list[dict[str, Any]], dense: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(7.5, 5))
    axis.axhspan(
        dense["eval_loss"] - dense["eval_loss_std"],
        dense["eval_loss"] + dense["eval_loss_std"],
        color="grey",
        alpha=0.2,
    )
    axis.axhline(dense["eval_loss"], color="grey", label=LABELS["dense"])
    for method in LABELS:
        if method == "dense":
            continue
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["removed"])
        if not points:
            continue
        axis.errorbar(
            [100 * p["removed"] for p in points],
            [p["eval_loss"] for p in points],
            xerr=[100 * p["removed_std"] for p in points],
            yerr=[p["eval_loss_std"] for p in points],
            marker="o",
            capsize=3,
            label=LABELS[method],
        )
    _finish(
        figure, axis, path, "projected-matrix parameters removed (%)", "final eval loss",
        "Hand-off study: eval loss vs parameters removed (mean ± std over seeds)", legend_size=8,
    )


def _layers_plot(layers: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, key, label in (
        (axes[0], "stable_since", "step at which the subspace became stable"),
        (axes[1], "final_overlap", "final subspace overlap"),
    ):
        xs = [r[key] if r[key] is not None and r[key] >= 0 else float("nan") for r in layers]
        points = axis.scatter(
            xs,
            [r["rank_reduction"] for r in layers],
            c=[r["relative_error"] for r in layers],
            cmap="viridis",
        )
        for r, x in zip(layers, xs, strict=True):
            axis.annotate(r["module_type"], (x, r["rank_reduction"]), fontsize=7)
        axis.set_xlabel(label)
        axis.set_ylabel("WeLore rank reduction at the headline target")
        axis.grid(alpha=0.3)
    figure.colorbar(points, ax=axes, label="relative reconstruction error")
    figure.suptitle("Per layer (dense GaLore run): subspace stability vs WeLore's verdict")
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def report(study: Any, collected: dict[str, Any], folder: Path) -> Path:
    """Write the markdown table, the JSON and both plots into ``folder``; returns the table."""
    from benchmarks.handoff_study import Job, cached_result

    folder.mkdir(parents=True, exist_ok=True)
    rows = collected["rows"]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    if dense is None:
        raise RuntimeError("the dense runs have not finished: nothing to compare against")
    headline = [r for r in rows if r["target"] == study.headline or r["method"] == "dense"]
    table = [
        [
            LABELS[r["method"]],
            r["seeds"],
            _fmt(100 * r["removed"], 100 * r["removed_std"], 1),
            _fmt(r["eval_loss"], r["eval_loss_std"]),
            f"{100 * r['vs_dense']:+.2f}% ± {100 * r['vs_dense_std']:.2f}%",
            f"{r['wall_seconds']:.0f}" if r["wall_seconds"] else "-",
        ]
        for r in headline
    ]
    sweep = [
        [LABELS[r["method"]], f"{r['target']:g}", r["seeds"], f"{100 * r['removed']:.1f}",
         _fmt(r["eval_loss"], r["eval_loss_std"]),
         f"{100 * r['vs_dense']:+.2f}% ± {100 * r['vs_dense_std']:.2f}%"]
        for r in rows
        if r["method"] != "dense"
    ]
    mib = 2**20
    cost = [
        [
            LABELS[r["method"]],
            f"{r['wall_seconds']:.0f}" if r["wall_seconds"] else "-",
            f"{r['training_bytes_mean'] / mib:.1f}" if r["training_bytes_mean"] else "-",
            f"{r['training_bytes_end'] / mib:.1f}" if r["training_bytes_end"] else "-",
        ]
        for r in headline
    ]
    timing = collected.get("step_seconds")
    timing_line = (
        f"Training step (forward, backward, optimizer; seed {study.seeds[0]}'s final models, "
        f"interleaved on one batch): dense GaLoreAdamW {1e3 * timing['before']:.0f} ms, after "
        f"the hand-offs {1e3 * timing['after']:.0f} ms ({timing['after'] / timing['before']:.2f}x)."
        if timing
        else "Step timing not measured in this report (`--timing`)."
    )
    dense_seeds = [seed for seed in study.seeds if cached_result(study, Job("dense", 0.0, seed))]
    layers = [row for seed in dense_seeds for row in layer_claim(study, seed)]
    stable = [r for r in layers if r["stable_since"] is not None and r["stable_since"] >= 0]
    correlations = {
        "stable_since_vs_rank_reduction": spearman(
            [r["stable_since"] for r in stable], [r["rank_reduction"] for r in stable]
        ),
        "final_overlap_vs_rank_reduction": spearman(
            [r["final_overlap"] for r in layers], [r["rank_reduction"] for r in layers]
        ),
        "final_overlap_vs_relative_error": spearman(
            [r["final_overlap"] for r in layers], [r["relative_error"] for r in layers]
        ),
    }
    welore_row = next(r for r in headline if r["method"] == "welore")
    allocations = {
        seed: check
        for seed in dense_seeds
        if (check := allocation_check(study, seed, welore_row["removed"])) is not None
    }
    allocation_rows = [
        [label, _fmt(*_mean_std([allocations[s][label] for s in allocations]))]
        for label in next(iter(allocations.values()), {})
    ]
    pairs = [
        pair
        for reference in ("welore", "welore-relax", "welore-each", "welore-matched",
                          "welore-halflr")
        for pair in paired_against_welore(rows, reference)
    ]
    paired_rows = [
        [LABELS[p["method"]], LABELS[p["reference"]], f"{p['target']:g}", p["seeds"],
         f"{100 * p['gap']:+.2f}% ± {100 * p['gap_std']:.2f}%", f"{p['wins']}/{p['seeds']}"]
        for p in pairs
    ]
    longer = collected.get("long")
    long_rows = []
    if longer:
        short = next((r for r in rows if r["method"] == "welore"
                      and r["target"] == longer["target"]), None)
        seed = str(longer["seed"])
        if short is not None and seed in short["deltas"]:
            long_rows.append([study.steps, f"{100 * short['deltas'][seed]:+.2f}%"])
        long_rows.append([longer["steps"], f"{100 * longer['vs_dense']:+.2f}%"])
        curve = [
            [step, f"{d:.4f}", f"{w:.4f}", f"{100 * (w / d - 1):+.2f}%"]
            for (step, d), (_, w) in zip(longer["dense_curve"], longer["welore_curve"], strict=True)
        ]
    _pareto(rows, dense, folder / "handoff_pareto.png")
    _layers_plot(layers, folder / "handoff_layers.png")
    gaps = _gap_rows(rows, study.bar_target)
    if gaps:
        _gap_plot(gaps, folder / "handoff_gap.png")
    gap_steps = [step for step, _, _ in gaps[0]["gap_curve"]] if gaps else []
    gap_table = [
        [LABELS[row["method"]], row["seeds"],
         *(f"{100 * mean:+.2f}" for _, mean, _ in row["gap_curve"])]
        for row in gaps
        if [step for step, _, _ in row["gap_curve"]] == gap_steps
    ]
    text = "\n\n".join(
        [
            f"# Hand-off study (headline target {study.headline:g} of the rank)",
            markdown_table(
                ["method", "seeds", "projected params removed (%)", "final eval loss",
                 "vs dense (same seed)", "wall (s)"],
                table,
            ),
            "## Training cost at the headline target",
            markdown_table(
                ["method", "wall (s)", "weights+grads+state, mean over the run (MiB)",
                 "at the end (MiB)"],
                cost,
            ),
            timing_line,
            "## Rank allocation, post hoc (dense final models, no fine-tune, "
            f"{100 * welore_row['removed']:.0f}% of projected parameters removed)",
            markdown_table(["allocation", "eval loss"], allocation_rows)
            if allocation_rows
            else "Not measured: the dense runs' checkpoints are not in this cache.",
            "## Paired against stability-driven WeLore (same seeds)",
            "The method's loss cost minus WeLore's, seed by seed (positive: WeLore is better), "
            "mean ± std over the paired seeds, and on how many seeds WeLore is better.",
            markdown_table(
                ["method", "against", "target", "seeds", "cost minus WeLore's",
                 "WeLore better"],
                paired_rows,
            ),
            *(
                [
                    f"## Twice the tokens (seed {longer['seed']}, target {longer['target']:g}, "
                    f"{100 * longer['removed']:.0f}% removed, hand-offs at steps "
                    f"{', '.join(map(str, longer['handoff_steps']))})",
                    markdown_table(["steps", "WeLoreAdamW vs dense"], long_rows),
                    markdown_table(["step", "dense eval loss", "WeLoreAdamW", "gap"], curve),
                ]
                if longer
                else []
            ),
            f"## The gap to dense along the run (target {study.bar_target:g}, % over seeds)",
            "Eval loss against dense GaLoreAdamW of the same seed at each eval step, mean over "
            "seeds (`handoff_gap.png` adds the std).",
            markdown_table(["method", "seeds", *map(str, gap_steps)], gap_table)
            if gap_table
            else "No eval curves in this cache.",
            "## Every target",
            markdown_table(
                ["method", "target", "seeds", "removed (%)", "final eval loss", "vs dense"], sweep
            ),
            "## The seed paper's claim, per layer (dense runs, all seeds)",
            "Spearman rank correlations: "
            + ", ".join(f"{k} {v:+.2f}" for k, v in correlations.items()),
        ]
    )
    path = folder / "handoff_study.md"
    path.write_text(text + "\n")
    write_json(
        "handoff_study",
        {"study": study.__dict__, **collected, "layers": layers, "correlations": correlations,
         "allocations": allocations, "paired": pairs},
        folder,
    )
    print(text)
    return path
