"""Quality: loss curves of the GaLore-family optimizers on the small-LLaMA pretraining run.

The runs are ``benchmarks/pretrain_suite.py``'s: torch AdamW, GaLoreAdamW with a fixed and an
adaptive refresh gap, WeLoreAdamW, and GaLoreAdamW8bit and QGaLoreAdamW with 8-bit and 4-bit
moments, on the 9M LLaMA, one seed, one data order, one training loop
(``lowrank_optim.train.run_pretraining``). This script
draws every run's train and eval loss into one plot (``quality_loss.png``) and tabulates the
final losses against torch AdamW's (``quality.md``, ``quality.json``).

By default nothing is trained: the plot and table are drawn again from the recorded runs
(``pretrain_suite_runs.json`` and the run logs under ``runs/pretrain_suite/`` of ``--runs``).
``--run`` trains the suite first (every flag this script does not know goes to
``pretrain_suite.py``, e.g. ``--steps``); ``--quick`` trains every method for a few steps of a
tiny batch in a temporary folder, as a smoke test.

    lowrank-optim bench quality                       # redraw from benchmarks/results, seconds
    lowrank-optim bench quality --run                 # retrain: about 60 minutes on 2 CPU cores
    lowrank-optim bench quality --quick --out /tmp/quality   # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import pretrain_suite
from benchmarks.common import RESULTS, markdown_table, refresh_results_md, write_json
from lowrank_optim.cli.plots import plot_losses, read_records

__all__ = ["QUICK_SUITE_ARGS", "main", "method_rows", "render"]

#: ``--quick``: pretrain_suite's flags for a few steps of a tiny batch (eval every step).
QUICK_SUITE_ARGS = (
    "--steps", "20", "--gap", "5", "--rank", "8", "--batch-size", "2", "--seq-len", "32",
)  # fmt: skip
BASELINE = "torch AdamW"
NOT_RECORDED = "not recorded: train it with `lowrank-optim bench quality --run`"
#: A results folder may hold the summaries without the logs (e.g. copied without ``runs/``).
NO_LOG = "no loss curve: its run log is missing (`bench quality --run` writes it)"


def suite_logs(runs: Path) -> dict[str, Path]:
    """Every pretrain_suite method's metrics log under results folder ``runs``, by label."""
    args = pretrain_suite.build_parser().parse_args(["--out", str(runs)])
    return pretrain_suite.run_logs(pretrain_suite.configs(args))


def recorded_summaries(runs: Path) -> dict[str, dict[str, Any]]:
    cache = pretrain_suite.runs_cache(runs)
    if not cache.exists():
        raise SystemExit(
            f"No recorded runs: {cache} does not exist; train them with "
            "`lowrank-optim bench quality --run` (or --quick for a smoke run)"
        )
    return json.loads(cache.read_text())


def curve(log: Path, kind: str) -> list[list[float]]:
    """``[step, loss]`` pairs of one kind of record (``train`` or ``eval``)."""
    return [[record["step"], record["loss"]] for record in read_records(log, kind=kind)]


def logged_curves(log: Path, steps: int) -> tuple[list, list, str]:
    """Train and eval curves of a run's log, and a note when they cannot be drawn.

    A log that ends before the recorded run's last step was rewritten after the run (a newer,
    unfinished run in the same folder): its curves would not belong to the table's numbers.
    """
    if not log.exists():
        return [], [], NO_LOG
    train, evals = curve(log, "train"), curve(log, "eval")
    last = max((step for step, _ in train), default=0)
    if last < steps:
        return [], [], f"no loss curve: its run log ends at step {last} of {steps}"
    return train, evals, ""


def method_rows(
    summaries: dict[str, dict[str, Any]], logs: dict[str, Path]
) -> list[dict[str, Any]]:
    """One row per suite method: final losses, change vs torch AdamW, cost and both curves
    (empty, with a note, where the log is missing), or why there is none."""
    baseline = summaries.get(BASELINE, {}).get("final_eval_loss")
    rows = []
    for label, log in logs.items():
        summary = summaries.get(label)
        if summary is None:
            rows.append({"method": label, "ok": False, "reason": NOT_RECORDED})
            continue
        eval_loss = summary["final_eval_loss"]
        train, evals, note = logged_curves(log, summary["steps"])
        rows.append(
            {
                "method": label,
                "ok": True,
                "optimizer": summary["optimizer"],
                "steps": summary["steps"],
                "final_train_loss": summary["final_train_loss"],
                "final_eval_loss": eval_loss,
                "perplexity": summary["perplexity"],
                "eval_loss_change_vs_adamw": eval_loss / baseline - 1 if baseline else None,
                "optimizer_state_bytes": summary["optimizer_state_bytes"],
                "parameters_end": summary["parameters_end"],
                "tokens_per_second": summary["tokens_per_second"],
                "wall_seconds": summary["wall_seconds"],
                "train_curve": train,
                "eval_curve": evals,
                "note": note,
            }
        )
    return rows


def suite_settings(runs: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The suite's flags as recorded in its JSON; the model and steps of the runs otherwise."""
    try:
        settings = json.loads((runs / "pretrain_suite.json").read_text())["settings"]
    except (OSError, ValueError, KeyError):
        settings = {}
    done = [row for row in rows if row["ok"]]
    if done and "steps" not in settings:
        settings["steps"] = done[0]["steps"]
    keep = ("model", "steps", "rank", "gap", "batch_size", "seq_len")
    return {key: settings[key] for key in keep if key in settings}


def _change(value: float | None) -> str:
    return "" if value is None else f"{value:+.2%}"


def report(rows: list[dict[str, Any]], settings: dict[str, Any], source: str) -> str:
    described = ", ".join(f"{key} {value}" for key, value in settings.items())
    cells = []
    for row in rows:
        if not row["ok"]:
            cells.append([row["method"], *[""] * 7, row["reason"]])
            continue
        cells.append(
            [
                row["method"],
                f"{row['final_train_loss']:.4f}",
                f"{row['final_eval_loss']:.4f}",
                f"{row['perplexity']:.1f}",
                _change(row["eval_loss_change_vs_adamw"]),
                f"{row['optimizer_state_bytes'] / 2**20:.2f}",
                f"{row['tokens_per_second']:,.0f}",
                f"{row['wall_seconds']:.0f}",
                row["note"],
            ]
        )
    headers = [
        "method",
        "final train loss",
        "final eval loss",
        "perplexity",
        "eval loss vs torch AdamW",
        "optimizer state (MiB)",
        "tokens/s (in run)",
        "wall (s)",
        "note",
    ]
    return (
        f"pretrain_suite's runs ({described}; {source}), one seed and one data order through "
        "one training loop; the plot shows every run's train loss (left) and eval loss "
        "(right), WeLore's hand-off steps as faint vertical lines.\n\n"
        f"{markdown_table(headers, cells)}\n\n![quality](results/quality_loss.png)\n"
    )


def render(runs: Path, out: Path, source: str) -> Path:
    """quality.json, quality.md and quality_loss.png in ``out`` from the runs under ``runs``."""
    logs = suite_logs(runs)
    rows = method_rows(recorded_summaries(runs), logs)
    settings = suite_settings(runs, rows)
    out.mkdir(parents=True, exist_ok=True)
    drawn = {row["method"]: logs[row["method"]] for row in rows if row.get("train_curve")}
    title = f"LLaMA {settings.get('model', '?')}, {settings.get('steps', '?')} steps"
    plot_losses(drawn, out / "quality_loss.png", title=f"Pretraining loss, {title}")
    payload = {"source": source, "settings": settings, "suite_methods": list(logs), "methods": rows}
    path = write_json("quality", payload, folder=out)
    markdown = report(rows, settings, source)
    (out / "quality.md").write_text(markdown)
    print(markdown)
    refresh_results_md(out)
    return path


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """This script's flags, and the rest (pretrain_suite's, for --run and --quick)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="train the suite into --out first")
    mode.add_argument("--quick", action="store_true", help="train a few tiny steps (smoke run)")
    parser.add_argument(
        "--runs",
        type=Path,
        default=RESULTS,
        help="results folder holding the recorded runs to draw (without --run/--quick)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for quality.* (default: benchmarks/results; with --quick a temporary one)",
    )
    args, suite_args = parser.parse_known_args(argv)
    if suite_args and not (args.run or args.quick):
        parser.error(f"{' '.join(suite_args)}: pretrain_suite flags need --run or --quick")
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="quality-")) if args.quick else RESULTS
    return args, suite_args


def main(argv: list[str] | None = None) -> int:
    args, suite_args = parse_args(argv)
    if args.quick:
        # The quick runs are thrown away: only their report lands in --out.
        with tempfile.TemporaryDirectory(prefix="quality-runs-") as runs:
            pretrain_suite.main([*QUICK_SUITE_ARGS, *suite_args, "--out", runs])
            path = render(Path(runs), args.out, "a --quick smoke run")
    elif args.run:
        pretrain_suite.main([*suite_args, "--out", str(args.out)])
        path = render(args.out, args.out, "trained by `bench quality --run`")
    else:
        path = render(args.runs, args.out, f"recorded runs in {_shown(args.runs)}")
    print(f"wrote {path}")
    return 0


def _shown(folder: Path) -> str:
    """``folder`` relative to the checkout when inside it (reports should not name homes)."""
    try:
        return str(folder.resolve().relative_to(RESULTS.parent.parent))
    except ValueError:
        return str(folder)


if __name__ == "__main__":
    sys.exit(main())
