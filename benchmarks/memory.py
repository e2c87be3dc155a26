"""Memory profile: weights, optimizer states, gradients and peaks of GaLore-family optimizers.

LLaMA 60M .. 7B in bf16 (GaLore's table, Zhao et al. 2024, with its ranks), every method:
torch AdamW, bitsandbytes and torchao 8/4-bit AdamW, galore-torch, APOLLO, and ours. Every
config gets the formula-level estimate from a meta-device model
(:func:`lowrank_optim.memory.estimate`); the configs in ``--measure`` are also built, stepped
once (sequence ``--seq``), accounted exactly (:func:`lowrank_optim.memory.account`) and their
peak measured (:func:`lowrank_optim.memory.measure_peak`). The exact and estimated breakdowns
are compared entry by entry. WeLoreAdamW is shown after hand-offs at a plan that keeps half of
each projected matrix's parameters (:func:`lowrank_optim.memory.welore_plan`).

    python -m benchmarks.memory                 # about 10 minutes on 2 CPU cores
    lowrank-optim bench memory --quick          # smoke run, tiny config, to a temporary folder

A peer whose package is not installed (galore-torch, apollo-torch, ...) is a row marked "not
run" with the command that installs it; it gets no numbers, estimated or measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, environment, markdown_table, pyplot, refresh_results_md
from benchmarks.peers import run_method
from lowrank_optim.memory import (
    ESTIMATE_METHODS,
    account,
    estimate,
    estimate_matrix,
    measure_peak,
    param_specs,
    welore_plan,
)
from lowrank_optim.train.models import (
    build_llama,
    build_llama_on_meta,
    load_llama_config,
    tiny_llama_config,
)

RANKS = {
    "tiny": 16,
    "9m": 64,
    "20m": 64,
    "60m": 128,
    "130m": 256,
    "350m": 256,
    "1b": 512,
    "7b": 1024,
}
#: GaLore (Zhao et al., 2024): BF16 optimizer states in GB, full-rank -> GaLore.
PUBLISHED = {"60m": (0.23, 0.13), "130m": (0.51, 0.28), "350m": (1.37, 0.54), "1b": (5.20, 1.78)}
OURS = tuple(name for name, (label, _) in ESTIMATE_METHODS.items() if "(ours)" in label)
MATRIX_METHODS = ("adamw", "bnb_adamw8bit", "torchao_adamw8bit", "galore_torch", "apollo", *OURS)
GB = 1e9  # GaLore's "G" is decimal
#: Peer method -> (module it imports, pip package that provides it).
PEER_PACKAGES = {
    "bnb_adamw8bit": ("bitsandbytes", "bitsandbytes"),
    "torchao_adamw8bit": ("torchao", "torchao"),
    "torchao_adamw4bit": ("torchao", "torchao"),
    "galore_torch": ("galore_torch", "galore-torch"),
    "apollo": ("apollo_torch", "apollo-torch"),
}


def missing_package(method: str) -> str | None:
    """Why ``method`` cannot run here (its peer package is not installed), else None."""
    if method not in PEER_PACKAGES:
        return None
    module, package = PEER_PACKAGES[method]
    if importlib.util.find_spec(module) is not None:
        return None
    return f"{package} is not installed (pip install {package})"


def config_of(name: str) -> Any:
    if name == "tiny":
        return tiny_llama_config(vocab_size=512, hidden=128, layers=2, heads=4, intermediate=344)
    return load_llama_config(name)


def layerwise_wrapper() -> tuple[Any, str | None]:
    """``LayerwiseOptimizer`` if the package has it, else the reason it is skipped."""
    try:
        from lowrank_optim.layerwise import LayerwiseOptimizer
    except ImportError as error:
        return None, f"lowrank_optim.layerwise not available ({error})"
    return LayerwiseOptimizer, None


def warm_up() -> None:
    """Import the peers and run one tiny step, so one-time costs (imports, thread pools, kernel
    caches) do not land in the first measured peak."""
    for module in ("bitsandbytes", "torchao.optim", "galore_torch", "apollo_torch"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            continue  # its rows say "not run" and how to install it
        try:
            __import__(module)
        except Exception as error:  # reported per method later, when it is used
            print(f"warm-up: cannot import {module}: {error}")
    for method in ("adamw", "galore_adamw"):
        model = build_llama(config_of("tiny"), seed=0, dtype=torch.bfloat16)
        run_method(method, model, RANKS["tiny"], 16)


def measure(method: str, config: Any, rank: int, seq: int, plan: Any, wrap: Any) -> dict:
    """Build, step, account and peak-measure one method on a real bf16 model."""
    model = build_llama(config, seed=0, dtype=torch.bfloat16)
    start = time.perf_counter()
    try:
        peak = measure_peak(
            lambda: run_method(method, model, rank, seq, plan=plan, wrap=wrap), interval=0.005
        )
    except Exception as error:  # a peer that cannot run here is reported, not omitted
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}"}
    exact = account(model, peak.result)
    record = {
        "exact": exact,
        "peak_bytes": peak.peak_bytes,
        "peak_method": peak.method,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return record


def run_config(name: str, args: argparse.Namespace, wrapper: Any) -> dict[str, Any]:
    config, rank = config_of(name), RANKS[name]
    specs = param_specs(build_llama_on_meta(config).to(torch.bfloat16))
    plan = welore_plan(specs, keep=0.5)
    rows: dict[str, Any] = {}
    for method in args.methods:
        label = ESTIMATE_METHODS[method][0]
        reason = missing_package(method)
        if reason is not None:
            print(f"[{name}] not run: {label}: {reason}", flush=True)
            rows[label] = {"method": method, "not_run": reason}
            continue
        method_plan = plan if method == "welore_adamw" else None
        variants = [(label, None)]
        if wrapper is not None and method in OURS and method != "welore_adamw":
            variants.append((f"{label} + layer-wise", wrapper))
        for variant, wrap in variants:
            est = estimate(specs, method, rank, plan=method_plan, layerwise=wrap is not None)
            row: dict[str, Any] = {"method": method, "estimate": est.to_dict()}
            if name in args.measure:
                print(f"[{name}] measuring {variant}", flush=True)
                got = measure(method, config, rank, args.seq, method_plan, wrap)
                if "exact" in got:
                    exact = got.pop("exact")
                    # Layer-wise frees each gradient inside backward: compare without them.
                    strip = {k: v for k, v in est.entries.items() if k[1] != "gradients"}
                    row["exact_matches_estimate"] = (
                        exact.entries == est.entries if wrap is None else exact.entries == strip
                    )
                    row["exact"] = exact.to_dict()
                row.update(got)
            rows[variant] = row
    return {
        "rank": rank,
        "parameters": sum(s.numel for s in specs if not s.buffer),
        "welore_plan_layers": len(plan),
        "methods": rows,
    }


def gb(value: float) -> str:
    return f"{value / GB:.3f}"


def config_table(name: str, result: dict[str, Any]) -> str:
    published = PUBLISHED.get(name)
    rows = []
    for label, row in result["methods"].items():
        if "not_run" in row:
            rows.append([label, f"not run: {row['not_run']}", *[""] * 7])
            continue
        s = row["estimate"]["summary"]
        pub = ""
        if published and row["method"] == "adamw":
            pub = f"{published[0]:.2f}"
        elif published and row["method"] in ("galore_torch", "galore_adamw"):
            pub = f"{published[1]:.2f}"
        peak = (
            "error: " + row["error"][:80]
            if "error" in row
            else (
                gb(row["peak_bytes"]) + ("*" if "torchao" in row["method"] else "")
                if "peak_bytes" in row
                else ""
            )
        )
        match = {True: "yes", False: "NO"}.get(row.get("exact_matches_estimate"), "")
        rows.append(
            [
                label,
                gb(s["weights"]),
                gb(s["optimizer_states"]),
                gb(s["weights_and_states"]),
                pub,
                gb(s["gradients"]),
                gb(s["quantization_metadata"]),
                peak,
                match,
            ]
        )
    headers = [
        "method",
        "weights",
        "optimizer states",
        "total (w + states)",
        "published states",
        "gradients",
        "quant. metadata",
        "measured peak",
        "exact = est.",
    ]
    return markdown_table(headers, rows)


def matrix_table() -> str:
    rows = []
    for shape, rank in (((2048, 2048), 512), ((5461, 2048), 512)):
        for method in MATRIX_METHODS:
            got = estimate_matrix(shape, method, rank)
            rows.append(
                [
                    f"{shape[0]}x{shape[1]}",
                    rank,
                    ESTIMATE_METHODS[method][0],
                    f"{got['weights'] / 2**20:.2f}",
                    f"{got['optimizer_states'] / 2**20:.2f}",
                ]
            )
    return markdown_table(["matrix", "rank", "method", "weights (MiB)", "state (MiB)"], rows)


def headline(results: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Optimizer states (GB) per config and method; the lowest-state check; Q-GaLore at 1B."""
    names = list(results)
    labels = list(next(iter(results.values()))["methods"])
    rows = [
        [label] + [_states_cell(results[n]["methods"][label]) for n in names] for label in labels
    ]
    rows.append(
        ["published full-rank (GaLore paper)"]
        + [f"{PUBLISHED[n][0]:.2f}" if n in PUBLISHED else "" for n in names]
    )
    rows.append(
        ["published GaLore (GaLore paper)"]
        + [f"{PUBLISHED[n][1]:.2f}" if n in PUBLISHED else "" for n in names]
    )
    facts: dict[str, Any] = {"lowest_state": {}}
    for n in names:
        states = {
            label: row["estimate"]["summary"]["optimizer_states"]
            for label, row in results[n]["methods"].items()
            if "estimate" in row
        }
        best = min(states, key=states.get)
        facts["lowest_state"][n] = {
            "method": best,
            "ours": results[n]["methods"][best]["method"] in OURS,
        }
        methods = results[n]["methods"]
        if "adamw" in args_methods(methods) and "q_galore_adamw" in args_methods(methods):
            q = _by_method(methods, "q_galore_adamw")["estimate"]["summary"]["weights_and_states"]
            a = _by_method(methods, "adamw")["estimate"]["summary"]["weights_and_states"]
            facts.setdefault("qgalore_fraction_of_adamw", {})[n] = q / a
    return markdown_table(["optimizer states (GB)", *names], rows), facts


def _states_cell(row: dict[str, Any]) -> str:
    if "not_run" in row:
        return "not run"
    return gb(row["estimate"]["summary"]["optimizer_states"])


def args_methods(methods: dict[str, Any]) -> set[str]:
    return {row["method"] for row in methods.values()}


def _by_method(methods: dict[str, Any], method: str) -> dict[str, Any]:
    return next(row for row in methods.values() if row["method"] == method)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    names = list(results)
    # Constrained layout sizes the margins to the method labels, and the legend goes in its
    # own row below the panels ("outside"), so neither is cut off nor drawn over the bars.
    fig, axes = plt.subplots(
        1, len(names), figsize=(3.4 * len(names) + 3.0, 5.5), sharey=True, layout="constrained"
    )
    axes = [axes] if len(names) == 1 else list(axes)
    for ax, name in zip(axes, names, strict=True):
        labels = [lb for lb, row in results[name]["methods"].items() if "estimate" in row]
        summary = [results[name]["methods"][lb]["estimate"]["summary"] for lb in labels]
        weights = [s["weights"] / GB for s in summary]
        states = [s["optimizer_states"] / GB for s in summary]
        grads = [s["gradients"] / GB for s in summary]
        below = [w + st for w, st in zip(weights, states, strict=True)]
        ax.barh(labels, weights, label="weights", color="#9db4d0")
        ax.barh(labels, states, left=weights, label="optimizer states", color="#d0775b")
        ax.barh(labels, grads, left=below, label="gradients (held at once)", color="#e8d8a0")
        ax.set_title(f"LLaMA {name} (rank {results[name]['rank']})")
        ax.set_xlabel("GB (bf16)")
        ax.invert_yaxis()
    handles, legend_labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, legend_labels, loc="outside lower center", ncol=3, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict[str, Any], facts: dict[str, Any], head: str, args: Any) -> str:
    parts = [
        f"Weights and optimizer states in GB (1e9 bytes), bf16, sequence {args.seq}; formula "
        "estimates from meta-device models, which equal the exact accounting byte for byte "
        f"wherever both ran (measured: {', '.join(args.measure) or 'none'}; column "
        "'exact = est.'). 'Measured peak' is the process's peak memory increase over the "
        "already built bf16 model while the optimizer is built and its first training step "
        "(which includes the first basis refresh; two steps for WeLore) runs at batch 1: "
        "optimizer state, gradients, activations and transients (CPU: resident-set high-water "
        "mark). WeLoreAdamW is shown after hand-offs of every projected matrix at a plan "
        "keeping half of its parameters (no trained weights exist here to select ranks from). "
        "torchao's state is created by its own `_new_buffer`, not by a compiled step (which "
        "takes about a minute per shape on a CPU), so its peaks (*) leave out the step.",
        f"### Optimizer states by config\n\n{head}",
    ]
    for name, result in results.items():
        parts.append(
            f"### LLaMA {name}, rank {result['rank']}, {result['parameters']:,} "
            f"parameters\n\n{config_table(name, result)}"
        )
    parts.append(f"### One projected matrix (bf16, rank 512)\n\n{matrix_table()}")
    fractions = facts.get("qgalore_fraction_of_adamw", {})
    lines = [
        "- QGaLoreAdamW weights + optimizer states as a fraction of bf16 AdamW's: "
        + ", ".join(f"{n} {v:.1%}" for n, v in fractions.items())
        + " (target <= 45%)."
    ]
    for n, best in facts["lowest_state"].items():
        lines.append(
            f"- {n}: lowest optimizer state: {best['method']}{'' if best['ours'] else ' (a peer)'}."
        )
    ratios = facts.get("published_ratio", {})
    if ratios:
        full = [r["full_rank"] for r in ratios.values()]
        low = [r["galore"] for r in ratios.values()]
        lines.append(
            f"- Against the GaLore paper's optimizer states, our counts are {min(full):.2f}x to "
            f"{max(full):.2f}x (full rank) and {min(low):.2f}x to {max(low):.2f}x (GaLore) of "
            "the published ones. The paper does not give its per-tensor accounting; ours counts "
            "every tensor the implementations allocate (bases, step counters, metric histories "
            "and the embedding/head states in bf16)."
        )
    lines += [f"- {note}" for note in facts.get("notes", [])]
    parts.append("### Findings\n\n" + "\n".join(lines))
    parts.append("![memory](results/memory.png)")
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs", nargs="+", default=["60m", "130m", "350m", "1b", "7b"], choices=sorted(RANKS)
    )
    parser.add_argument(
        "--measure",
        nargs="*",
        default=["60m", "130m"],
        help="configs to build, step and measure (the others are estimated); add 350m if the "
        "machine has the time (about 15 minutes more on 2 CPU cores)",
    )
    parser.add_argument(
        "--methods", nargs="+", default=list(ESTIMATE_METHODS), choices=list(ESTIMATE_METHODS)
    )
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"directory for memory.* (default: {RESULTS}, or a new temporary folder with "
        "--quick, so a smoke run never overwrites the committed results)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny config only, measured")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="re-render a memory.json, measuring nothing"
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="lowrank-optim-memory-")) if args.quick else RESULTS
    if args.from_json is not None:
        return render(json.loads(args.from_json.read_text()), args)
    if args.quick:
        args.configs, args.measure, args.seq = ["tiny"], ["tiny"], 32
    args.measure = [n for n in args.measure if n in args.configs]
    wrapper, skipped = layerwise_wrapper()
    if args.measure and not args.quick:
        warm_up()
    results = {name: run_config(name, args, wrapper) for name in args.configs}
    payload = {"environment": environment(), "seq": args.seq, "measured": args.measure}
    payload["notes"] = [skipped] if skipped else []
    return render({**payload, "configs": results}, args)


def render(payload: dict[str, Any], args: argparse.Namespace) -> int:
    """Write memory.json, memory.md, memory.png (and RESULTS.md for the committed results)."""
    results = payload["configs"]
    args.seq, args.measure = payload["seq"], payload["measured"]
    head, facts = headline(results)
    facts["notes"] = list(payload.get("notes", []))
    for name, result in results.items():
        for label, row in result["methods"].items():
            if "error" in row:
                facts["notes"].append(f"{label} could not run at {name}: {row['error']}")
            if "not_run" in row:
                facts["notes"].append(f"{label} not run at {name}: {row['not_run']}")
            if row.get("exact_matches_estimate") is False:
                facts["notes"].append(f"{label} at {name}: exact accounting != estimate")
    facts["published_ratio"] = published_ratios(results)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "facts": facts}
    (args.out / "memory.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / "memory.md").write_text(report(results, facts, head, args))
    plot(results, args.out / "memory.png")
    print(head)
    print(json.dumps(facts, indent=2))
    print(f"wrote memory.json, memory.md and memory.png to {args.out}")
    refresh_results_md(args.out)
    return 0


def published_ratios(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Our optimizer-state count over the GaLore paper's, per config (full rank and GaLore)."""
    ratios = {}
    for name, result in results.items():
        methods = args_methods(result["methods"])
        if name not in PUBLISHED or not {"adamw", "galore_adamw"} <= methods:
            continue
        ours = [
            _by_method(result["methods"], m)["estimate"]["summary"]["optimizer_states"] / GB
            for m in ("adamw", "galore_adamw")
        ]
        ratios[name] = {
            "full_rank": ours[0] / PUBLISHED[name][0],
            "galore": ours[1] / PUBLISHED[name][1],
        }
    return ratios


if __name__ == "__main__":
    sys.exit(main())
