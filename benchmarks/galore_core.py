"""GaLore core benchmark: AdamW vs galore-torch vs ours (SVD / randomized, keep / rotate).

One script run = one seed, one data order, every method through the same training loop
(`lowrank_optim.train.run_pretraining`). Reports eval loss, optimizer-state bytes, mean
optimizer-step time as a ratio to torch AdamW (timed interleaved on the same gradients, with
refreshes amortized, and also as measured inside each training run), and the refresh time per
matrix (exact SVD vs warm-started randomized) at the LLaMA 60M, 350M and 1B shapes.

    python -m benchmarks.galore_core            # ~15 minutes on 2 CPU cores
    python -m benchmarks.galore_core --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, interleaved_medians, markdown_table, write_json
from lowrank_optim import GaLoreAdamW, ProjectionConfig, StabilityConfig
from lowrank_optim.factory import lowrank_param_groups
from lowrank_optim.projection import randomized_basis, svd_basis
from lowrank_optim.stability import subspace_overlap
from lowrank_optim.train import PretrainConfig, run_pretraining

#: Timed beside the others (not trained: its losses are torch AdamW's).
FUSED_ADAMW = "torch AdamW (fused)"

REFRESH_SHAPES = {  # (rows, cols, rank): GaLore's ranks for these sizes
    "60M": [(512, 512, 128), (1376, 512, 128)],
    "350M": [(1024, 1024, 256), (2736, 1024, 256)],
    "1B": [(2048, 2048, 512), (5461, 2048, 512)],
}


def galore_torch_factory(rank: int, gap: int, scale: float):
    from galore_torch import GaLoreAdamW as PeerGaLoreAdamW

    def build(model: torch.nn.Module) -> torch.optim.Optimizer:
        groups = lowrank_param_groups(model, "attn-mlp")
        projected = groups[-1]
        projected.pop("projection")
        projected["params"] = [param for _, param in projected["params"]]
        groups[0]["params"] = [param for _, param in groups[0]["params"]]
        projected.update(rank=rank, update_proj_gap=gap, scale=scale, proj_type="std")
        return PeerGaLoreAdamW(groups, lr=base.lr, weight_decay=base.weight_decay)

    base = PretrainConfig()
    return build


def ours_factory(config: PretrainConfig, refresh: str, transfer: str):
    def build(model: torch.nn.Module) -> torch.optim.Optimizer:
        projection = ProjectionConfig(
            rank=config.rank,
            update_proj_gap=config.update_proj_gap,
            scale=config.scale,
            refresh=refresh,
            moment_transfer=transfer,
        )
        return GaLoreAdamW(
            lowrank_param_groups(model, "attn-mlp", projection),
            lr=config.lr,
            weight_decay=config.weight_decay,
            stability=StabilityConfig(policy="fixed"),
        )

    return build


def methods_under_test(base: PretrainConfig) -> list[tuple[str, Any]]:
    """(label, optimizer factory) for every method, peers reported when they cannot load."""
    methods: list[tuple[str, Any]] = [
        (
            "torch AdamW",
            lambda model: torch.optim.AdamW(
                model.parameters(), lr=base.lr, weight_decay=base.weight_decay
            ),
        ),
    ]
    try:
        methods.append(
            (
                "galore-torch GaLoreAdamW",
                galore_torch_factory(base.rank, base.update_proj_gap, base.scale),
            )
        )
    except ImportError as error:
        print(f"galore-torch unavailable ({error}); pip install --no-deps galore-torch")
    for refresh in ("svd", "randomized"):
        for transfer in ("keep", "rotate"):
            methods.append((f"ours {refresh}/{transfer}", ours_factory(base, refresh, transfer)))
    return methods


def pretraining_runs(steps: int, out: Path) -> list[dict[str, Any]]:
    base = PretrainConfig(
        steps=steps, progress=False, eval_every=max(steps // 6, 1), checkpoint_every=10**9
    )
    rows = []
    for label, factory in methods_under_test(base):
        slug = label.replace(" ", "_").replace("/", "-")
        config = PretrainConfig(**{**base.__dict__, "out_dir": str(out / slug)})
        started = time.perf_counter()
        summary = run_pretraining(config, optimizer_factory=factory)
        seconds = time.perf_counter() - started
        print(f"{label}: eval {summary['final_eval_loss']:.4f} in {seconds:.0f}s")
        rows.append({"method": label, **{k: v for k, v in summary.items() if k != "step_seconds"}})
    return rows


def previous_runs(steps: int) -> list[dict[str, Any]]:
    """The pretraining rows of the last full run of this script, which must have ``steps``."""
    previous = json.loads((RESULTS / "galore_core.json").read_text())
    if previous["steps"] != steps:
        raise ValueError(
            f"Invalid --reuse-runs: results/galore_core.json has {previous['steps']} steps, "
            f"not {steps}; run without --reuse-runs"
        )
    # "method" names each run; older files also carry a misleading "optimizer" field.
    return [{k: v for k, v in run.items() if k != "optimizer"} for run in previous["runs"]]


def interleaved_step_times(
    factories: dict[str, Any], gap: int, rounds: int, seed: int = 0
) -> dict[str, float]:
    """Median optimizer-step time per method, refreshes amortized, methods interleaved.

    Every method steps the same 9M LLaMA with the same real gradients; each round times
    ``2 * gap`` steps of every method in turn (so two refreshes of a GaLore optimizer fall in
    each window), which cancels machine-load drift between methods that sequential runs suffer.
    """
    from lowrank_optim.train import build_corpus
    from lowrank_optim.train.models import build_llama, load_llama_config

    base = PretrainConfig()
    corpus = build_corpus(vocab_size=base.vocab_size, max_bytes=base.corpus_bytes)
    ids = corpus.train_tokens[: base.batch_size * base.seq_len].long().view(base.batch_size, -1)
    models, optimizers = {}, {}
    for label, factory in factories.items():
        model = build_llama(
            load_llama_config(base.model, vocab_size=corpus.tokenizer.vocab_size), seed=seed
        )
        model(input_ids=ids, labels=ids).loss.backward()
        models[label], optimizers[label] = model, factory(model)
        optimizers[label].step()  # state creation and the first refresh are not timed
    steps = {label: optimizer.step for label, optimizer in optimizers.items()}
    return interleaved_medians(steps, rounds, 2 * gap)


def refresh_timings(
    repeats: int, shapes_by_size: dict[str, list[tuple[int, int, int]]] | None = None
) -> list[dict[str, Any]]:
    """SVD and randomized refresh times of the matrices of ``shapes_by_size`` (default: every
    size of :data:`REFRESH_SHAPES`), ``repeats`` times each."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for size, shapes in (REFRESH_SHAPES if shapes_by_size is None else shapes_by_size).items():
        for rows_, cols, rank in shapes:
            # A gradient with a decaying spectrum, and a drifted copy (the next refresh's input).
            grad = torch.randn(rows_, cols, generator=generator) / torch.arange(1, cols + 1) ** 0.5
            drifted = grad + 0.1 * torch.randn(rows_, cols, generator=generator) / cols**0.5
            target, next_target = (grad, drifted) if rows_ <= cols else (grad.T, drifted.T)
            previous = svd_basis(target, rank)
            svd_times, fast_times = [], []
            for _ in range(repeats):
                tick = time.perf_counter()
                exact = svd_basis(next_target, rank)
                svd_times.append(time.perf_counter() - tick)
                tick = time.perf_counter()
                fast = randomized_basis(
                    next_target, rank, previous, power_iters=1, oversample=8, generator=generator
                )
                fast_times.append(time.perf_counter() - tick)
            rows.append(
                {
                    "config": size,
                    "shape": [rows_, cols],
                    "rank": rank,
                    "svd_seconds": statistics.median(svd_times),
                    "randomized_seconds": statistics.median(fast_times),
                    "speedup": statistics.median(svd_times) / statistics.median(fast_times),
                    "overlap_with_svd": subspace_overlap(exact, fast),
                }
            )
            print(rows[-1])
    return rows


def report(
    runs: list[dict[str, Any]], refresh: list[dict[str, Any]], step_times: dict[str, float]
) -> str:
    adamw = next(r for r in runs if r["method"] == "torch AdamW")
    table = markdown_table(
        [
            "method",
            "eval loss",
            "optimizer state (bytes)",
            "optimizer step vs AdamW",
            "vs AdamW (fused)",
            "in-run optimizer step vs AdamW",
            "wall (s)",
        ],
        [
            [
                r["method"],
                f"{r['final_eval_loss']:.4f}",
                f"{r['optimizer_state_bytes']:,}",
                f"{step_times[r['method']] / step_times['torch AdamW']:.2f}x",
                f"{step_times[r['method']] / step_times[FUSED_ADAMW]:.2f}x",
                f"{r['mean_optimizer_step_seconds'] / adamw['mean_optimizer_step_seconds']:.2f}x",
                f"{r['wall_seconds']:.0f}",
            ]
            for r in runs
        ],
    )
    timing = markdown_table(
        ["config", "shape", "rank", "SVD (ms)", "randomized (ms)", "speed-up", "overlap w/ SVD"],
        [
            [
                r["config"],
                f"{r['shape'][0]}x{r['shape'][1]}",
                r["rank"],
                f"{r['svd_seconds'] * 1e3:.0f}",
                f"{r['randomized_seconds'] * 1e3:.0f}",
                f"{r['speedup']:.1f}x",
                f"{r['overlap_with_svd']:.3f}",
            ]
            for r in refresh
        ],
    )
    default, fused = step_times["torch AdamW"], step_times[FUSED_ADAMW]
    note = (
        f"Optimizer step medians: torch AdamW {default * 1e3:.2f} ms (its default on this device, "
        f"the single-tensor loop on a CPU), torch AdamW(fused=True) {fused * 1e3:.2f} ms "
        f"({fused / default:.2f}x). Our dense and low-rank moments use the same fused kernel."
    )
    return (
        f"### Pretraining (9M LLaMA, built-in corpus)\n\n{table}\n\n{note}\n\n"
        f"### Refresh time per matrix\n\n{timing}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved step-timing rounds")
    parser.add_argument("--quick", action="store_true", help="20 steps, 1 repeat, 60M shapes")
    parser.add_argument(
        "--reuse-runs",
        action="store_true",
        help="take the pretraining runs from results/galore_core.json (same --steps; the runs "
        "are deterministic) and measure only the timings again",
    )
    args = parser.parse_args(argv)
    shapes = dict(REFRESH_SHAPES)
    if args.quick:
        args.steps, args.repeats, args.rounds = 20, 1, 1
        shapes = {"60M": REFRESH_SHAPES["60M"]}
    out = RESULTS / "runs" / "galore_core"
    runs = previous_runs(args.steps) if args.reuse_runs else pretraining_runs(args.steps, out)
    refresh = refresh_timings(args.repeats, shapes)
    base = PretrainConfig()
    timed = dict(methods_under_test(base))
    timed[FUSED_ADAMW] = lambda model: torch.optim.AdamW(
        model.parameters(), lr=base.lr, weight_decay=base.weight_decay, fused=True
    )
    step_times = interleaved_step_times(timed, base.update_proj_gap, args.rounds)
    path = write_json(
        "galore_core",
        {"steps": args.steps, "runs": runs, "refresh": refresh, "step_seconds": step_times},
    )
    markdown = report(runs, refresh, step_times)
    (RESULTS / "galore_core.md").write_text(markdown)
    print(markdown)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
