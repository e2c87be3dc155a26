"""Throughput: optimizer-step and whole-step time as ratios to torch AdamW, and refresh time.

One run measures, on the small LLaMA of ``lowrank_optim.train.PretrainConfig()`` (the 9M
config, its batch and rank, fed the corpus tokens that ``galore_core.interleaved_step_times``
uses), every method of the memory benchmark plus torch's fused AdamW: torch AdamW (default and
``fused=True``), bitsandbytes AdamW8bit, torchao AdamW8bit and AdamW4bit, galore-torch, APOLLO
and ours (GaLoreAdamW; GaLoreAdamW8bit and QGaLoreAdamW with 8-bit and with 4-bit moments;
WeLoreAdamW after hand-offs). Every optimizer is built and brought to its steady state by
:func:`benchmarks.peers.run_method` (GaLore's recipe: refresh gap 200).

* Whole training step (zero_grad, forward, backward, step) on one batch of real tokens:
  ``gap`` steps per method per round, one refresh of every projected matrix in each window.
* Optimizer step alone, on fixed real gradients (those of each model's last whole step):
  ``2 * gap`` steps per method per round, so two refreshes of every projected matrix fall in
  each window (refreshes amortized).

Both are medians over the rounds of :func:`common.interleaved_medians` (the methods timed in
turn within each round, so drifting machine load hits all of them alike), reported in ms and as
ratios to torch AdamW (default) and torch AdamW (fused). On CUDA every timed call ends with a
synchronize, and tokens/s are reported for the whole step. The refresh time per matrix, exact
SVD vs warm-started randomized, at the 60M, 350M and 1B shapes, is
``galore_core.refresh_timings`` (CPU tensors). Writes ``throughput.json``, ``throughput.md``
and ``throughput.png`` (the ratios as bars) into ``--out``.

    lowrank-optim bench throughput            # about 30 minutes on 2 CPU cores
    lowrank-optim bench throughput --quick --out /tmp/throughput   # smoke run, seconds
    python -m benchmarks.throughput --methods adamw adamw_fused galore_adamw --rounds 5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import galore_core
from benchmarks.common import (
    RESULTS,
    interleaved_medians,
    markdown_table,
    pyplot,
    refresh_results_md,
    write_json,
)
from benchmarks.peers import build_method, run_method, train_step
from lowrank_optim.memory import param_specs, welore_plan
from lowrank_optim.memory.rules import ESTIMATE_METHODS
from lowrank_optim.train import PretrainConfig

__all__ = ["METHODS", "main", "measure", "render"]

#: Method keys: the memory benchmark's (``ESTIMATE_METHODS``) plus torch's fused AdamW.
BASELINE, FUSED = "adamw", "adamw_fused"
METHODS = (BASELINE, FUSED, *(m for m in ESTIMATE_METHODS if m != BASELINE))
TORCHAO_SKIPPED = (
    "skipped in --quick: torchao compiles its step (torch.compile), about a minute per "
    "parameter shape on a CPU"
)
#: ``--quick`` defaults: a 2-layer LLaMA, a tiny batch, short windows (refreshes are then not
#: amortized), no 1B refresh shapes and no torch.compile; explicit flags still win.
QUICK = {
    "model": "tiny",
    "batch_size": 2,
    "seq_len": 32,
    "rounds": 2,
    "window": 4,
    "repeats": 1,
    "refresh_configs": ["60M", "350M"],
}


def label_of(method: str) -> str:
    if method == BASELINE:
        return "torch AdamW (default)"
    if method == FUSED:
        return "torch AdamW (fused)"
    label = ESTIMATE_METHODS[method][0]
    return f"{label}, after hand-offs" if method == "welore_adamw" else label


@dataclass
class Workload:
    """The model every method trains, its fixed batch, and the device it runs on."""

    config: Any  # a transformers LlamaConfig
    ids: torch.Tensor
    rank: int
    device: torch.device

    def fresh_model(self) -> nn.Module:
        from lowrank_optim.train.models import build_llama

        # One seed for every method: identical weights, hence identical first gradients.
        return build_llama(self.config, seed=0).to(self.device)

    def synchronize(self) -> None:
        # CUDA kernels run asynchronously: without this a timer would see only the launches.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def build_workload(args: argparse.Namespace) -> Workload:
    """The LLaMA config and a batch of real corpus tokens (as ``interleaved_step_times``)."""
    from lowrank_optim.train import build_corpus
    from lowrank_optim.train.models import load_llama_config, tiny_llama_config

    base = PretrainConfig()
    corpus = build_corpus(vocab_size=base.vocab_size, max_bytes=base.corpus_bytes)
    vocab = corpus.tokenizer.vocab_size
    if args.model == "tiny":
        config = tiny_llama_config(vocab, hidden=128, layers=2, heads=4, intermediate=344)
    else:
        config = load_llama_config(args.model, vocab_size=vocab)
    tokens = corpus.train_tokens[: args.batch_size * args.seq_len].long()
    ids = tokens.view(args.batch_size, args.seq_len).to(args.device)
    return Workload(config, ids, args.rank, torch.device(args.device))


def fused_adamw(model: nn.Module, rank: int) -> torch.optim.Optimizer:
    """The memory benchmark's AdamW on torch's fused kernel: its hyperparameters, only the
    implementation differs."""
    recipe = build_method(BASELINE, model, rank)
    hyper = {key: recipe.defaults[key] for key in ("lr", "betas", "eps", "weight_decay")}
    return torch.optim.AdamW(model.parameters(), **hyper, fused=True)


@dataclass
class Trainee:
    """One method's model and optimizer, past the steps that create state and first bases."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    work: Workload

    @classmethod
    def build(cls, method: str, work: Workload) -> Trainee:
        model = work.fresh_model()
        seq = work.ids.shape[1]
        if method == FUSED:
            optimizer = fused_adamw(model, work.rank)
            train_step(model, optimizer, seq)
        else:
            # WeLore: every projected matrix handed off at half its parameters, as in the memory
            # benchmark (no trained weights exist here to select ranks from).
            plan = welore_plan(param_specs(model)) if method == "welore_adamw" else None
            optimizer = run_method(method, model, work.rank, seq, plan=plan, torchao_step=True)
        return cls(model, optimizer, work)

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.work.synchronize()

    def training_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model(input_ids=self.work.ids, labels=self.work.ids).loss.backward()
        self.optimizer.step()
        self.work.synchronize()

    def refresh_gap(self) -> int:
        """Steps between basis refreshes (1 for optimizers without a projection)."""
        gaps = [
            int(g["update_proj_gap"])
            for g in self.optimizer.param_groups
            if g.get("update_proj_gap")
        ]
        return max(gaps, default=1)


def failure_reason(error: BaseException) -> str:
    if isinstance(error, ImportError):
        return f"not installed: {error}"
    return f"error: {type(error).__name__}: {error}"


def prepare(
    methods: Sequence[str], work: Workload, quick: bool
) -> tuple[dict[str, Trainee], dict[str, str]]:
    """The trainees that could be built and stepped, and the reason for each that could not."""
    ready: dict[str, Trainee] = {}
    failed: dict[str, str] = {}
    for method in methods:
        if quick and method.startswith("torchao_"):
            failed[method] = TORCHAO_SKIPPED
            continue
        print(f"preparing {label_of(method)}", flush=True)
        try:
            trainee = Trainee.build(method, work)
            # A trial whole step: a method that cannot train here is reported, never timed.
            trainee.training_step()
        except Exception as error:  # a peer that cannot run here is a row, not a crash
            traceback.print_exc()
            failed[method] = failure_reason(error)
            continue
        ready[method] = trainee
    return ready, failed


def ratio(value: float | None, baseline: float | None) -> float | None:
    return value / baseline if value is not None and baseline else None


def result_rows(
    methods: Sequence[str],
    failed: dict[str, str],
    step_seconds: dict[str, float],
    whole_seconds: dict[str, float],
    tokens: int,
) -> list[dict[str, Any]]:
    """One row per method, in ``methods`` order: ms, ratios, tokens/s, or the reason for none."""
    rows = []
    for method in methods:
        row: dict[str, Any] = {"method": method, "label": label_of(method)}
        if method in failed:
            rows.append({**row, "ok": False, "reason": failed[method]})
            continue
        step, whole = step_seconds[method], whole_seconds[method]
        row |= {"ok": True, "optimizer_step_ms": step * 1e3, "whole_step_ms": whole * 1e3}
        for kind, value, table in (
            ("optimizer_step", step, step_seconds),
            ("whole_step", whole, whole_seconds),
        ):
            row[f"{kind}_vs_adamw"] = ratio(value, table.get(BASELINE))
            row[f"{kind}_vs_fused"] = ratio(value, table.get(FUSED))
        row["tokens_per_second"] = tokens / whole
        rows.append(row)
    return rows


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Time every method of ``args.methods``; the payload of ``throughput.json``."""
    work = build_workload(args)
    ready, failed = prepare(args.methods, work, args.quick)
    gap = max((t.refresh_gap() for t in ready.values()), default=1)
    step_window = args.window or 2 * gap
    whole_window = args.window or gap
    # Whole steps first: the optimizer-step timing then steps each model hundreds of times on
    # one fixed gradient (that of its last whole step), which drifts the weights far from any a
    # forward pass should be timed on.
    print(f"whole step: {args.rounds} rounds x {whole_window} steps per method", flush=True)
    whole_seconds = interleaved_medians(
        {m: t.training_step for m, t in ready.items()}, args.rounds, whole_window
    )
    print(f"optimizer step: {args.rounds} rounds x {step_window} steps per method", flush=True)
    step_seconds = interleaved_medians(
        {m: t.optimizer_step for m, t in ready.items()}, args.rounds, step_window
    )
    wanted = set(args.refresh_configs)
    shapes = {name: s for name, s in galore_core.REFRESH_SHAPES.items() if name in wanted}
    refresh = galore_core.refresh_timings(args.repeats, shapes)
    parameters = sum(p.numel() for p in work.fresh_model().parameters())
    return {
        "settings": {
            "model": args.model,
            "parameters": parameters,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "rank": args.rank,
            "device": str(work.device),
            "rounds": args.rounds,
            "refresh_gap": gap,
            "optimizer_step_window": step_window,
            "whole_step_window": whole_window,
            # Every window holds the same number of refreshes only at multiples of the gap.
            "refreshes_amortized": step_window % gap == 0 and whole_window % gap == 0,
            "refresh_repeats": args.repeats,
            "quick": args.quick,
        },
        "methods": result_rows(args.methods, failed, step_seconds, whole_seconds, work.ids.numel()),
        "refresh": refresh,
    }


def _times(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}x"


def method_table(rows: list[dict[str, Any]]) -> str:
    headers = [
        "method",
        "optimizer step (ms)",
        "vs AdamW",
        "vs AdamW fused",
        "whole step (ms)",
        "vs AdamW",
        "vs AdamW fused",
        "tokens/s",
        "note",
    ]
    cells = []
    for row in rows:
        if not row["ok"]:
            cells.append([row["label"], *["n/a"] * 7, row["reason"][:160]])
            continue
        cells.append(
            [
                row["label"],
                f"{row['optimizer_step_ms']:.2f}",
                _times(row["optimizer_step_vs_adamw"]),
                _times(row["optimizer_step_vs_fused"]),
                f"{row['whole_step_ms']:.1f}",
                _times(row["whole_step_vs_adamw"]),
                _times(row["whole_step_vs_fused"]),
                f"{row['tokens_per_second']:,.0f}",
                "",
            ]
        )
    return markdown_table(headers, cells)


def refresh_table(refresh: list[dict[str, Any]]) -> str:
    return markdown_table(
        ["config", "matrix", "rank", "SVD (ms)", "randomized (ms)", "speed-up", "overlap w/ SVD"],
        [
            [
                r["config"],
                f"{r['shape'][0]}x{r['shape'][1]}",
                r["rank"],
                f"{r['svd_seconds'] * 1e3:.1f}",
                f"{r['randomized_seconds'] * 1e3:.1f}",
                f"{r['speedup']:.1f}x",
                f"{r['overlap_with_svd']:.3f}",
            ]
            for r in refresh
        ],
    )


def report(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    amortized = (
        "every window holds the same number of refreshes of each projected matrix"
        if s["refreshes_amortized"]
        else "the windows are shorter than the refresh gap, so refreshes are NOT amortized"
    )
    intro = (
        f"LLaMA {s['model']} ({s['parameters']:,} parameters), batch {s['batch_size']} x "
        f"{s['seq_len']} tokens, rank {s['rank']}, refresh gap {s['refresh_gap']}, on "
        f"{s['device']}; medians over {s['rounds']} interleaved rounds. Optimizer step: "
        f"{s['optimizer_step_window']} steps per method per round on fixed real gradients; "
        f"whole step (zero_grad, forward, backward, step): {s['whole_step_window']} per method "
        f"per round; {amortized}. Ratios above 1 are slower than the baseline. torch AdamW "
        "(default) is torch's default implementation for the device (the single-tensor loop on "
        "a CPU). Every optimizer follows GaLore's recipe as built for the memory benchmark "
        "(`benchmarks.peers.build_method`); WeLoreAdamW is timed after handing off "
        "every projected matrix at half its parameters."
    )
    return (
        f"{intro}\n\n{method_table(payload['methods'])}\n\n"
        f"### Refresh time per matrix (CPU)\n\n{refresh_table(payload['refresh'])}\n\n"
        "![throughput](results/throughput.png)\n"
    )


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Both times as ratios to each AdamW baseline: bars from 1x (the baseline) on a log axis,
    so 2x slower and 2x faster are equally long."""
    plt = pyplot()
    from matplotlib.ticker import FixedLocator, NullFormatter

    labels = [row["label"] + ("" if row["ok"] else " (n/a)") for row in rows]
    figure, axes = plt.subplots(1, 2, figsize=(13, 0.42 * len(rows) + 2.2), sharey=True)
    baselines = (("vs_adamw", "torch AdamW (default)"), ("vs_fused", "torch AdamW (fused)"))
    kinds = (
        ("optimizer_step", "optimizer step", "#d0775b"),
        ("whole_step", "whole step (zero_grad, forward, backward, step)", "#6f8fb8"),
    )
    height = 0.4
    for axis, (suffix, baseline) in zip(axes, baselines, strict=True):
        shown: list[float] = [1.0]
        for offset, (kind, name, color) in enumerate(kinds):
            present = [(i, row.get(f"{kind}_{suffix}")) for i, row in enumerate(rows)]
            present = [(i, value) for i, value in present if value]
            positions = [i + (offset - 0.5) * height for i, _ in present]
            values = [value for _, value in present]
            shown += values
            widths = [value - 1.0 for value in values]
            axis.barh(positions, widths, left=1.0, height=height, color=color, label=name)
            for y, value in zip(positions, values, strict=True):
                axis.annotate(
                    f"{value:.2f}x",
                    (value, y),
                    xytext=(3 if value >= 1 else -3, 0),
                    textcoords="offset points",
                    ha="left" if value >= 1 else "right",
                    va="center",
                    fontsize=7,
                )
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_xscale("log")
        # Powers of two as plain numbers: log-axis minor labels would overlap.
        low, high = min(shown) / 1.6, max(shown) * 1.6
        ticks = [2.0**k for k in range(-10, 11) if low <= 2.0**k <= high]
        axis.set_xlim(low, high)
        axis.xaxis.set_major_locator(FixedLocator(ticks))
        axis.set_xticklabels([f"{t:g}x" for t in ticks])
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel(f"time / {baseline} (log scale; left of 1x: faster)")
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0].invert_yaxis()
    handles, names = axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=2, frameon=False, fontsize=8)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def render(payload: dict[str, Any], out: Path) -> Path:
    """Write throughput.json, .md and .png into ``out`` (and RESULTS.md for the committed
    results); returns the JSON's path."""
    out.mkdir(parents=True, exist_ok=True)
    path = write_json("throughput", payload, folder=out)
    markdown = report(payload)
    (out / "throughput.md").write_text(markdown)
    s = payload["settings"]
    title = f"Step time vs torch AdamW, LLaMA {s['model']}, {s['device']}"
    plot(payload["methods"], out / "throughput.png", title)
    print(markdown)
    refresh_results_md(out)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    base = PretrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=base.model, help="a shipped LLaMA (9m .. 7b), a JSON path, or tiny"
    )
    parser.add_argument("--batch-size", type=int, default=base.batch_size)
    parser.add_argument("--seq-len", type=int, default=base.seq_len)
    parser.add_argument("--rank", type=int, default=base.rank)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help="steps per method per round (default: 2 x refresh gap for the optimizer step, "
        "1 x gap for the whole step, so refreshes are amortized)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="refresh timings per matrix")
    parser.add_argument(
        "--refresh-configs",
        nargs="*",
        default=list(galore_core.REFRESH_SHAPES),
        choices=list(galore_core.REFRESH_SHAPES),
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default: benchmarks/results; with --quick a new temporary one)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny model and windows, no 1B shapes, no torchao"
    )
    parser.add_argument(
        "--from-json", type=Path, default=None, help="re-render a throughput.json, timing nothing"
    )
    args = parser.parse_args(argv)
    if args.quick:
        # Quick settings are defaults, so flags given alongside --quick still win.
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="throughput-")) if args.quick else RESULTS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A re-rendered file keeps the environment it was measured in (write_json's own is older).
    payload = json.loads(args.from_json.read_text()) if args.from_json else measure(args)
    print(f"wrote {render(payload, args.out)}")
    failed = [row for row in payload["methods"] if not row["ok"]]
    if failed:
        print("no timings for: " + "; ".join(f"{r['label']}: {r['reason']}" for r in failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
