"""The hand-off where pretraining really happens (issue #25): 15+ tokens per parameter.

Every earlier hand-off study trained 0.2-0.65 tokens per parameter; GaLore's paper pretrains at
13-18. This study trains at 15.8.

Setting (:class:`Regime`), and why:

* **Model**: ``benchmarks/configs/llama_byte96.json``, a LLaMA with hidden 96, intermediate 256,
  4 layers, 4 heads, on byte-level tokens (vocabulary 257): 492K parameters, of which the 28
  projected attention and MLP matrices hold 442K (90%). The shipped ``9m`` holds only 43% in its
  projected matrices with the corpus' 4096-token BPE (its embeddings dominate) and takes 29
  minutes per run at 15 tokens per parameter on one thread even with bytes; at hidden 64 a run
  is too short for the refresh gap (4 refreshes in all). Hidden 96 is the smallest width at
  which a run has 19 refreshes and the whole study fits in about 3 hours of 2-core time.
* **Data**: the built-in corpus (the standard library's source, 30 MB), byte-level: 7.8M
  training tokens, about a quarter of one epoch, so no window is seen twice.
* **Length**: 3800 steps of 8 x 256 tokens = 7.78M tokens = 15.8 tokens per parameter.
* **GaLore's recipe**: lr 1e-2, scale 0.25, rank 24 (hidden / 4), gap 200, 10% warm-up then
  cosine to 10%; the hand-off window is 40%-60% of the run, target 0.8 of the rank.

Methods (the same data order per seed):

1. ``dense``: GaLoreAdamW to the end;
2. ``welore``: WeLoreAdamW with the library's defaults, only the window and the target set;
   ``welore-fixed`` is the same with every factor at its group's lr (``factor_step="fixed"``),
   the simplest rule, run to decide whether the matched step earns its place;
3. ``oneshot``: every qualifying layer at the window's end;
4. ``posthoc``: method 1's final model compressed by WeLore to method 2's size, as is and after
   an LRC-only fine-tune on 10% of the tokens (``posthoc+ft``);
5. ``scratch``: method 2's final factorized shapes from step 0, spectral (balanced SVD)
   initialisation, AdamW, best of 3 lrs;
6. ``cuttlefish``: Cuttlefish's stable-rank switch and ranks (``benchmarks/handoff_methods``).

Equal compute: ``welore-flops`` and ``oneshot-flops`` train methods 2 and 3 on more tokens, so
that their analytic training FLOPs equal the dense run's; ``posthoc-flops`` fine-tunes method
1's compressed model with the FLOPs the hand-off saved.

Every run's result is cached under ``--out`` (its checkpoint too, so an interrupted run resumes);
the study continues where it stopped, across sessions.

    python -m benchmarks.handoff_regime            # the study, 2 runs at a time (1 thread each)
    python -m benchmarks.handoff_regime --quick    # smoke run: a few steps, a minute
    python -m benchmarks.handoff_regime --report   # tables and plots from the cache only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import IMPORT_ROOT, RESULTS, child_env, module_command
from benchmarks.regime_flops import Shapes, run_flops, shapes_of
from lowrank_optim.train import PretrainConfig, run_pretraining

__all__ = ["METHODS", "QUICK", "Regime", "RegimeJob", "cached", "jobs_of", "main", "run_job"]

METHODS = (
    "dense", "welore", "welore-fixed", "oneshot", "cuttlefish", "posthoc", "scratch",
    "welore-flops", "oneshot-flops", "posthoc-flops",
)
#: The rule every factor step follows in each in-training method (set explicitly, so that a
#: cached run never depends on the package's default): ``(factor_step, factor_step_relax)``.
_FACTOR_RULES = {"welore-fixed": ("fixed", 0)}
_DEFAULT_RULE = ("matched-each", 100)


@dataclass(frozen=True)
class Regime:
    """The study's settings (``--quick`` shrinks them to a smoke run)."""

    model: str = "benchmarks/configs/llama_byte96.json"  # relative to the checkout
    tokenizer: str = "byte"
    steps: int = 3800
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-2
    scale: float = 0.25
    rank: int = 24
    gap: int = 200
    handoff_start: float = 0.4
    handoff_end: float = 0.6
    threshold: float = 0.7
    patience: int = 2
    min_ratio: float = 0.5
    target: float = 0.8
    seeds: tuple[int, ...] = (0, 1, 2)
    scratch_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    finetune_fraction: float = 0.1
    eval_every: int = 190
    eval_batches: int = 32
    corpus_bytes: int = 30_000_000
    out: str = "benchmarks/results/runs/handoff_regime"

    @property
    def model_path(self) -> str:
        path = Path(self.model)
        return str(path if path.is_absolute() else IMPORT_ROOT / path)

    def base(self, seed: int, folder: Path, steps: int | None = None) -> PretrainConfig:
        steps = steps or self.steps
        return PretrainConfig(
            model=self.model_path,
            tokenizer=self.tokenizer,
            steps=steps,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            lr=self.lr,
            scale=self.scale,
            rank=self.rank,
            update_proj_gap=self.gap,
            stability_threshold=self.threshold,
            stability_patience=self.patience,
            handoff_start=self.handoff_start,
            handoff_end=self.handoff_end,
            target_reduction=self.target,
            min_ratio=self.min_ratio,
            handoff_factor_step=_DEFAULT_RULE[0],
            handoff_factor_step_relax=_DEFAULT_RULE[1],
            eval_every=self.eval_every if steps == self.steps else max(steps // 20, 1),
            eval_batches=self.eval_batches,
            checkpoint_every=max(steps // 10, 1),
            corpus_bytes=self.corpus_bytes,
            seed=seed,
            progress=False,
            out_dir=str(folder),
        )


QUICK = Regime(
    steps=40, batch_size=2, seq_len=32, rank=8, gap=10, patience=1, seeds=(0,),
    scratch_lrs=(3e-3,), eval_every=10, eval_batches=2, corpus_bytes=400_000,
)


@dataclass(frozen=True)
class RegimeJob:
    """One cached run: ``method`` at ``seed`` (``lr``: the scratch baseline's)."""

    method: str
    seed: int
    lr: float | None = None

    @property
    def name(self) -> str:
        lr = f"-lr{self.lr:g}" if self.lr is not None else ""
        return f"{self.method}{lr}-s{self.seed}"


def folder_of(regime: Regime, job: RegimeJob) -> Path:
    return Path(regime.out) / job.name


def _settings(regime: Regime) -> dict[str, Any]:
    values = asdict(regime)
    for key in ("out", "seeds", "scratch_lrs"):
        del values[key]  # which runs, not how
    return json.loads(json.dumps(values))


def cached(regime: Regime, job: RegimeJob) -> dict[str, Any] | None:
    """The cached result of ``job``, if one was made with these settings."""
    path = folder_of(regime, job) / "result.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if result.get("settings") == _settings(regime) else None


def _require(regime: Regime, job: RegimeJob) -> dict[str, Any]:
    result = cached(regime, job)
    if result is None:
        raise RuntimeError(f"{job.name} has not run yet")
    return result


def _records(path: Path, kind: str) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, filter(str.strip, lines)) if r.get("kind") == kind]


def _result_of(folder: Path, summary: dict[str, Any], optimizer: str) -> dict[str, Any]:
    metrics = folder / "metrics.jsonl"
    return {
        "optimizer": optimizer,
        "final_eval_loss": summary["final_eval_loss"],
        "steps": summary.get("steps"),
        "wall_seconds": summary["wall_seconds"],
        "mean_step_seconds": summary.get("mean_step_seconds"),
        "parameters_start": summary["parameters_start"],
        "parameters_end": summary["parameters_end"],
        "handoffs": _records(metrics, "handoff"),
        "eval_curve": [[r["step"], r["loss"]] for r in _records(metrics, "eval")],
    }


# ----------------------------------------------------------------------------------- runs
def _train(config: PretrainConfig, optimizer: str, factory: Any = None) -> dict[str, Any]:
    folder = Path(config.out_dir)
    resume = (folder / "checkpoint.pt").exists()
    summary = run_pretraining(replace(config, resume=resume), factory)
    return _result_of(folder, summary, optimizer)


def _welore_config(regime: Regime, job: RegimeJob, steps: int | None = None) -> PretrainConfig:
    config = regime.base(job.seed, folder_of(regime, job), steps)
    config = replace(config, optimizer="welore_adamw")
    step_rule, relax = _FACTOR_RULES.get(job.method, _DEFAULT_RULE)
    config = replace(config, handoff_factor_step=step_rule, handoff_factor_step_relax=relax)
    if job.method.startswith("oneshot"):  # every qualifying layer when the window closes
        config = replace(config, handoff_trigger="step", handoff_start=regime.handoff_end)
    return config


def flops_steps(regime: Regime, job: RegimeJob) -> int:
    """Steps at which ``job``'s method (``welore`` or ``oneshot``) spends the dense run's FLOPs:
    the equal-token run's steps times dense FLOPs over its FLOPs (the window scales along)."""
    shapes = shapes_of(regime)
    base = job.method.removesuffix("-flops")
    dense = run_flops(_require(regime, RegimeJob("dense", job.seed)), shapes, regime)
    method = run_flops(_require(regime, RegimeJob(base, job.seed)), shapes, regime)
    return round(regime.steps * dense["total"] / method["total"])


def run_job(regime: Regime, job: RegimeJob) -> dict[str, Any]:
    """Run ``job`` (or return its cached result) and cache its result."""
    if (result := cached(regime, job)) is not None:
        return result
    torch.set_num_threads(int(os.environ.get("STUDY_THREADS", "1")))
    folder = folder_of(regime, job)
    if (folder / "result.json").exists():  # made with other settings: start over
        shutil.rmtree(folder)
    method = job.method
    if method == "dense":
        config = replace(regime.base(job.seed, folder), optimizer="galore_adamw")
        result = _train(config, "GaLoreAdamW (lowrank_optim)")
    elif method in ("welore", "welore-fixed", "oneshot"):
        result = _train(_welore_config(regime, job), "WeLoreAdamW (lowrank_optim)")
    elif method in ("welore-flops", "oneshot-flops"):
        config = _welore_config(regime, job, flops_steps(regime, job))
        result = _train(config, "WeLoreAdamW (lowrank_optim)")
    elif method == "cuttlefish":
        from benchmarks.regime_methods import cuttlefish_factory

        config = regime.base(job.seed, folder)
        result = _train(config, "CuttlefishAdamW (benchmarks)",
                        cuttlefish_factory(regime, config))
    elif method == "scratch":
        from benchmarks.regime_methods import scratch_factory

        handoffs = _require(regime, RegimeJob("welore", job.seed))["handoffs"]
        ranks = {h["layer"]: int(h["rank"]) for h in handoffs}
        config = replace(regime.base(job.seed, folder), lr=job.lr)
        result = _train(config, "torch.optim.AdamW, factorized from step 0 (spectral init)",
                        scratch_factory(ranks, job.lr))
        result["factorized_from_start"] = [
            {"layer": h["layer"], "rank": h["rank"], "params_after": h["params_after"]}
            for h in handoffs
        ]
    elif method in ("posthoc", "posthoc-flops"):
        from benchmarks.regime_methods import post_hoc_run

        result = post_hoc_run(regime, job)
    else:
        raise ValueError(f"Invalid method: {method!r}; allowed: {', '.join(METHODS)}")
    result.update(asdict(job), settings=_settings(regime))
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / "result.json.tmp"
    temporary.write_text(json.dumps(result, indent=1) + "\n")
    temporary.replace(folder / "result.json")
    return result


# ------------------------------------------------------------------------------ schedule
def needs(regime: Regime, job: RegimeJob) -> list[RegimeJob]:
    """The runs whose results ``job`` reads."""
    seed, method = job.seed, job.method
    if method in ("posthoc", "posthoc-flops"):
        return [RegimeJob("dense", seed), RegimeJob("welore", seed)]
    if method in ("welore-flops", "oneshot-flops"):
        return [RegimeJob("dense", seed), RegimeJob(method.removesuffix("-flops"), seed)]
    if method == "scratch":
        sweep = [RegimeJob("scratch", regime.seeds[0], lr) for lr in regime.scratch_lrs]
        return [RegimeJob("welore", seed)] + ([] if job in sweep else sweep)
    return []


def jobs_of(regime: Regime) -> list[RegimeJob]:
    """Every run, in the order they start when their inputs are ready: a seed's dense and
    WeLoreAdamW runs first and its post-hoc compression right after them (the dense run's
    checkpoint, which it reads, is not kept in git), the equal-FLOPs runs last."""
    seeds, jobs = regime.seeds, []
    for seed in seeds:
        jobs += [RegimeJob(m, seed) for m in ("dense", "welore", "posthoc", "oneshot")]
    jobs += [RegimeJob("scratch", seeds[0], lr) for lr in regime.scratch_lrs]
    jobs += [RegimeJob(m, s) for m in ("welore-fixed", "cuttlefish") for s in seeds]
    jobs += [RegimeJob("posthoc-flops", s) for s in seeds]
    jobs += [RegimeJob(m, s) for m in ("welore-flops", "oneshot-flops") for s in seeds]
    return jobs


def best_scratch_lr(regime: Regime) -> float:
    losses = {lr: _require(regime, RegimeJob("scratch", regime.seeds[0], lr))["final_eval_loss"]
              for lr in regime.scratch_lrs}
    return min(losses, key=losses.__getitem__)


def _all_jobs(regime: Regime) -> list[RegimeJob]:
    """:func:`jobs_of` plus the scratch baseline's other seeds at its best lr, once known."""
    jobs = jobs_of(regime)
    sweep = [RegimeJob("scratch", regime.seeds[0], lr) for lr in regime.scratch_lrs]
    if all(cached(regime, job) is not None for job in sweep):
        best = best_scratch_lr(regime)
        jobs += [RegimeJob("scratch", seed, best) for seed in regime.seeds[1:]]
    return jobs


def run_all(regime: Regime, parallel: int) -> list[str]:
    """Run every missing job, ``parallel`` child processes of 1 thread each, each as soon as
    the runs it reads have finished; the names of the jobs that failed (their logs say why)."""
    running: list[tuple[RegimeJob, subprocess.Popen]] = []
    failed: list[str] = []
    env = child_env(OMP_NUM_THREADS="1", STUDY_THREADS="1")
    settings = json.dumps(asdict(regime))

    def ready(job: RegimeJob) -> bool:
        busy = {j for j, _ in running}
        return (job not in busy and job.name not in failed and cached(regime, job) is None
                and all(cached(regime, need) is not None for need in needs(regime, job)))

    while True:
        while len(running) < parallel and (todo := [j for j in _all_jobs(regime) if ready(j)]):
            job = todo[0]
            log = Path(regime.out) / f"{job.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            command = module_command("benchmarks.handoff_regime", "--job",
                                     json.dumps(asdict(job)), "--settings", settings)
            print(f"start {job.name}", flush=True)
            with log.open("w") as stream:
                process = subprocess.Popen(command, env=env, stdout=stream,
                                           stderr=subprocess.STDOUT)
            running.append((job, process))
        if not running:
            return failed
        time.sleep(2)
        for job, process in list(running):
            if process.poll() is not None:
                running.remove((job, process))
                if process.returncode:
                    failed.append(job.name)
                status = "done" if process.returncode == 0 else f"FAILED ({process.returncode})"
                print(f"{status} {job.name}", flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (tiny, a minute)")
    parser.add_argument("--out", default=None, help="cache folder of the runs")
    parser.add_argument("--results", default=None, help="where the tables and plots go")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (1 thread each)")
    parser.add_argument("--report", action="store_true", help="only report from the cache")
    parser.add_argument("--timing", action="store_true",
                        help="time a dense and a handed-off step in one process (quiet machine)")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.settings:
        values = json.loads(args.settings)
        regime = Regime(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    else:
        regime = QUICK if args.quick else Regime()
        if args.quick and args.out is None:
            import tempfile

            args.out = tempfile.mkdtemp(prefix="handoff_regime_")
        if args.out:
            regime = replace(regime, out=args.out)
    if args.job:
        run_job(regime, RegimeJob(**json.loads(args.job)))
        return 0
    failed = [] if args.report else run_all(regime, args.parallel)
    if args.timing:
        from benchmarks.regime_methods import step_timing

        timing = step_timing(regime, regime.seeds[0])
        (Path(regime.out) / "step_timing.json").write_text(json.dumps(timing) + "\n")
    from benchmarks.regime_report import report

    results = Path(args.results) if args.results else (
        Path(regime.out) if args.quick else RESULTS
    )
    report(regime, results)
    if failed:
        print(f"failed runs (see their logs in {regime.out}): {', '.join(failed)}")
        return 1
    return 0


__all__ += ["Shapes", "best_scratch_lr", "flops_steps", "folder_of", "needs", "run_all"]

if __name__ == "__main__":
    sys.exit(main())
