"""The hand-off's cost on the main job (``lowrank-optim pretrain``), by factor-lr rule and lr.

Issue #14 asks for hand-off defaults that hold beyond the study's own setting. The study
(:mod:`benchmarks.handoff_study`, LLaMA 20m, 1000 steps) fixes one setting; this runs the
package's main job (LLaMA 9m, 600 steps, batch 16 x 128, the hand-off window at 40%-60% of the
steps, target 0.8 of the rank) with each factor-lr rule of ``HandoffConfig.factor_step``, at
GaLore's recipe lr (1e-2, the default since this change) and at the former default 3e-3, and
on byte-level tokens (bytes instead of the 4096-token BPE: another input
distribution and a model whose projected matrices hold more of its parameters), and pairs each
run with dense GaLoreAdamW of the same lr, tokens and seed (same initialization and batches).

Every variant passes its lr and factor-lr settings explicitly, so its cached run never depends
on the package's defaults. Runs are cached in ``<out>/<variant>-s<seed>`` (a finished run's
``summary.json``); two run at a time with one thread each.

    python -m benchmarks.main_job_factor_lr                 # seeds 0-2 of the 1e-2 variants
    python -m benchmarks.main_job_factor_lr --report        # the table from the cache only
    python -m benchmarks.main_job_factor_lr --variants lr3e-3-dense --seeds 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, child_env, markdown_table

__all__ = ["VARIANTS", "main", "report", "run_variant"]

OUT = "benchmarks/results/runs/main_job_factor_lr"

BYTES = ("--tokenizer", "byte")


def _dense(label: str, lr: str, *extra: str) -> tuple[str, list[str]]:
    return label, ["--optimizer", "galore_adamw", "--lr", lr, *extra]


def _welore(label: str, lr: str, rule: str, *extra: str) -> tuple[str, list[str]]:
    # the rule and its relaxation spelled out, so that a variant never follows the default
    relax = [] if "--handoff-factor-step-relax" in extra else ["--handoff-factor-step-relax", "0"]
    return label, ["--lr", lr, "--handoff-factor-step", rule, *relax, *extra]


#: Variant -> (what it is, its ``lowrank-optim pretrain`` options). ``dense`` variants are the
#: reference of the variants with the same prefix (same lr and tokens).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "dense": _dense("GaLoreAdamW, dense, lr 1e-2", "1e-2"),
    "fixed": _welore("WeLoreAdamW, lr 1e-2, factors at lr x scale (factor_step fixed)", "1e-2",
                     "fixed"),
    "matched": _welore("WeLoreAdamW, lr 1e-2, factor_step matched", "1e-2", "matched"),
    "each": _welore("WeLoreAdamW, lr 1e-2, factor_step matched-each", "1e-2", "matched-each"),
    "capped": _welore("WeLoreAdamW, lr 1e-2, factor_step capped", "1e-2", "capped"),
    "relax": _welore("WeLoreAdamW, lr 1e-2, matched-each relaxing to 1 over 100 steps", "1e-2",
                     "matched-each", "--handoff-factor-step-relax", "100"),
    "byte-dense": _dense("GaLoreAdamW, dense, lr 1e-2, byte-level tokens", "1e-2", *BYTES),
    "byte-fixed": _welore("WeLoreAdamW, lr 1e-2, byte-level tokens, factor_step fixed", "1e-2",
                          "fixed", *BYTES),
    "byte-each": _welore("WeLoreAdamW, lr 1e-2, byte-level tokens, factor_step matched-each",
                         "1e-2", "matched-each", *BYTES),
    "byte-capped": _welore("WeLoreAdamW, lr 1e-2, byte-level tokens, factor_step capped",
                           "1e-2", "capped", *BYTES),
    "byte-relax": _welore("WeLoreAdamW, lr 1e-2, byte-level tokens, matched-each relaxing to 1 "
                          "over 100 steps", "1e-2", "matched-each", "--handoff-factor-step-relax",
                          "100", *BYTES),
    "lr3e-3-dense": _dense("GaLoreAdamW, dense, lr 3e-3 (the former default)", "3e-3"),
    "lr3e-3-fixed": _welore("WeLoreAdamW, lr 3e-3, factor_step fixed", "3e-3", "fixed"),
    "lr3e-3-double": _welore("WeLoreAdamW, lr 3e-3, factors at 2 x lr x scale", "3e-3", "fixed",
                             "--handoff-factor-lr-scale", "0.5"),
    "lr3e-3-matched": _welore("WeLoreAdamW, lr 3e-3, factor_step matched", "3e-3", "matched"),
}
DEFAULT_VARIANTS = ("dense", "fixed", "matched", "each")


def _folder(out: str, variant: str, seed: int) -> Path:
    return Path(out) / f"{variant}-s{seed}"


def _command(out: str, variant: str, seed: int) -> list[str]:
    options = VARIANTS[variant][1]
    folder = str(_folder(out, variant, seed))
    runner = "import sys; from lowrank_optim.cli import main; sys.exit(main())"
    return [sys.executable, "-c", runner, "pretrain", "--seed", str(seed), "--out-dir", folder,
            "--no-progress", *options]


def run_variant(out: str, jobs: list[tuple[str, int]], parallel: int = 2) -> None:
    """Run the ``(variant, seed)`` jobs that have no finished run yet, ``parallel`` at a time
    (one thread each: two 2-thread runs on 2 cores slow each other down several times)."""
    pending = [job for job in jobs if not (_folder(out, *job) / "summary.json").exists()]
    running: list[subprocess.Popen] = []
    env = child_env(OMP_NUM_THREADS="1")
    while pending or running:
        while pending and len(running) < parallel:
            variant, seed = pending.pop(0)
            print(f"start {variant}-s{seed}", flush=True)
            _folder(out, variant, seed).mkdir(parents=True, exist_ok=True)
            log = (_folder(out, variant, seed) / "stdout.txt").open("w")
            running.append(subprocess.Popen(_command(out, variant, seed), env=env, stdout=log,
                                            stderr=subprocess.STDOUT))
        running[0].wait()
        if running[0].returncode != 0:
            raise RuntimeError(f"a run failed (exit {running[0].returncode}): {running[0].args}")
        running.pop(0)


def _summary(out: str, variant: str, seed: int) -> dict[str, Any] | None:
    folder = _folder(out, variant, seed)
    if not (folder / "summary.json").exists():
        return None
    summary = json.loads((folder / "summary.json").read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    handoffs = [r for r in records if r.get("kind") == "handoff" and r.get("layer")]
    # "lr_multiplier" (one for both factors): runs made before matched-each existed
    multipliers = [
        m for r in handoffs for m in r.get("lr_multipliers", [r.get("lr_multiplier", 1.0)] * 2)
    ]
    return {
        "loss": float(summary["final_eval_loss"]),
        "layers": len(handoffs),
        "steps": sorted({int(r["step"]) for r in handoffs}),
        "multiplier": statistics.fmean(multipliers) if multipliers else None,
    }


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):+.2f}% ± {100 * std:.2f}%"


def report(out: str, seeds: list[int]) -> str:
    """The markdown table of every cached variant: cost against dense at the same lr, seed by
    seed, and paired against ``fixed`` at the same lr."""
    rows = []
    for variant, (label, _) in VARIANTS.items():
        if variant.endswith("dense"):
            continue
        prefix = variant[: -len(variant.split("-")[-1])]  # "", "byte-" or "lr3e-3-"
        deltas, against_fixed, multipliers = [], [], []
        for seed in seeds:
            mine = _summary(out, variant, seed)
            dense = _summary(out, f"{prefix}dense", seed)
            fixed = _summary(out, f"{prefix}fixed", seed)
            if mine is None or dense is None:
                continue
            deltas.append(mine["loss"] / dense["loss"] - 1)
            if fixed is not None:
                against_fixed.append(mine["loss"] / dense["loss"] - fixed["loss"] / dense["loss"])
            if mine["multiplier"] is not None:
                multipliers.append(mine["multiplier"])
        if not deltas:
            continue
        rows.append([
            label, len(deltas), _mean_std(deltas),
            ", ".join(f"{100 * d:+.2f}%" for d in deltas),
            _mean_std(against_fixed) if variant != f"{prefix}fixed" and against_fixed else "–",
            f"{statistics.fmean(multipliers):.2f}" if multipliers else "–",
        ])
    dense_rows = [
        [VARIANTS[v][0], ", ".join(f"{s['loss']:.4f}" for s in found)]
        for v in VARIANTS
        if v.endswith("dense")
        and (found := [s for seed in seeds if (s := _summary(out, v, seed)) is not None])
    ]
    return "\n\n".join([
        "# The hand-off on the main job, by factor-lr rule (issue #14)",
        "`lowrank-optim pretrain` (LLaMA 9m, 600 steps, window 40%-60%, target 0.8 of the "
        "rank: 28 layers at step 400, 67% of projected parameters removed), final eval loss "
        "against dense GaLoreAdamW at the same lr and seed. `python -m "
        "benchmarks.main_job_factor_lr` (cached in `" + OUT + "`).",
        markdown_table(
            ["variant", "seeds", "vs dense", "per seed", "minus fixed's (paired)",
             "mean lr multiplier"],
            rows,
        ),
        markdown_table(["dense run", "final eval loss per seed"], dense_rows),
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        choices=sorted(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="the table from the cache only")
    args = parser.parse_args(argv)
    if not args.report:
        run_variant(args.out, [(v, s) for s in args.seeds for v in args.variants], args.parallel)
    text = report(args.out, [0, 1, 2] if args.report else args.seeds)
    (RESULTS / "main_job_factor_lr.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
