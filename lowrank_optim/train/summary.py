"""The end-of-run summary of a pretraining run: hand-off totals and the printed table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowrank_optim.train.records import read_records

__all__ = ["format_summary", "handoff_line", "handoff_summary"]


def _number(value: Any, spec: str) -> str:
    # summary.json stores NaN as null: a value that was never measured.
    return "n/a" if value is None else format(value, spec)


def handoff_summary(optimizer: Any, metrics: Path) -> dict[str, Any] | None:
    """Layers handed off, when, the projected parameters they removed, and the eval-loss jumps
    measured around each hand-off step (from the run's log, so resumed runs count them all)."""
    if not hasattr(optimizer, "handoff_report"):
        return None
    records = optimizer.handoff_report()
    projected = sum(
        p.numel()
        for group in optimizer.param_groups
        for p in group["params"]
        if optimizer.is_projected(group, p)
    ) + sum(r["params_before"] for r in records)
    costs = read_records(metrics, kind="handoff_cost") if metrics.exists() else []
    return {
        "layers": len(records),
        "steps": sorted({int(r["step"]) for r in records}),
        "projected_parameters": projected,
        "projected_parameters_removed": sum(
            r["params_before"] - r["params_after"] for r in records
        ),
        "eval_loss_jump": sum(c["after"] - c["before"] for c in costs),
        "eval_loss_before_first": costs[0]["before"] if costs else None,
    }


def handoff_line(handoff: dict[str, Any] | None, count: int) -> str:
    """The summary table's hand-off row: layers, when, parameters removed, eval-loss jump."""
    if not handoff or not handoff["layers"]:
        return str(count)
    removed, total = handoff["projected_parameters_removed"], handoff["projected_parameters"]
    steps = handoff["steps"]
    when = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
    line = (
        f"{handoff['layers']} layers at {when}: {removed / total:.0%} of projected-matrix "
        f"parameters removed ({total:,} -> {total - removed:,})"
    )
    if handoff["eval_loss_before_first"]:
        jump = handoff["eval_loss_jump"] / handoff["eval_loss_before_first"]
        line += f"; eval loss {jump:+.1%} across the swaps themselves"
    return line


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as an aligned two-column table, ending with the files the run wrote."""
    rows = [
        ("optimizer", summary["optimizer"]),
        ("model", summary["model"]),
        ("steps", summary["steps"]),
        ("final train loss", _number(summary["final_train_loss"], ".4f")),
        ("final eval loss", _number(summary["final_eval_loss"], ".4f")),
        ("eval perplexity", _number(summary["perplexity"], ".2f")),
        (
            "parameters (start -> end)",
            f"{summary['parameters_start']:,} -> {summary['parameters_end']:,}",
        ),
        ("optimizer state", f"{summary['optimizer_state_bytes'] / 2**20:.2f} MiB"),
        ("hand-offs", handoff_line(summary.get("handoff_summary"), summary["handoffs"])),
        ("tokens / s", _number(summary["tokens_per_second"], ",.0f")),
        ("training time", f"{summary['wall_seconds']:.1f} s"),
    ]
    setup = summary.get("setup_seconds") or {}
    if setup:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in setup.items() if k != "total")
        rows.append(("set-up time", f"{setup.get('total', 0.0):.1f} s ({parts})"))
    rows += [("wrote" if i == 0 else "", path) for i, path in enumerate(summary.get("files", []))]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}".rstrip() for name, value in rows)

