"""The end-of-run summary of a pretraining run: hand-off totals and the printed table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowrank_optim.handoff.candidates import first_check_step
from lowrank_optim.train.records import read_records

if TYPE_CHECKING:
    from lowrank_optim.config import HandoffConfig
    from lowrank_optim.train.config import PretrainConfig

__all__ = [
    "format_summary",
    "handoff_line",
    "handoff_summary",
    "no_handoff_reason",
    "unreachable_handoff",
]


def _number(value: Any, spec: str) -> str:
    # summary.json stores NaN as null: a value that was never measured.
    return "n/a" if value is None else format(value, spec)


def unreachable_handoff(config: PretrainConfig, handoff: HandoffConfig) -> str | None:
    """Why no layer can be handed off in ``config``'s run, naming the numbers; None if one can.

    WeLoreAdamW looks at the layers only at check steps (multiples of ``--update-proj-gap``
    from ``--handoff-start`` on); a run that ends before the first one hands nothing off.
    """
    first = first_check_step(handoff)
    if first <= config.steps:
        return None
    return (
        f"no layer can be handed off: the first hand-off check is step {first} (the first "
        f"multiple of --update-proj-gap {handoff.check_every} at or after --handoff-start "
        f"{config.handoff_start} x --steps {config.steps} = step {handoff.start_step}), after "
        f"the last step, {config.steps}; lower --update-proj-gap or --handoff-start, or raise "
        "--steps"
    )


def no_handoff_reason(handoff: HandoffConfig, steps: int, last_step: int) -> str:
    """Why a run that ran to ``last_step`` (of ``steps``) handed no layer off, in a few words."""
    first = first_check_step(handoff)
    if first > steps:
        return f"the first hand-off check, step {first}, is after the last step, {steps}"
    if first > last_step:
        return f"the run stopped at step {last_step}, before the first hand-off check at {first}"
    return f"no layer qualified at the hand-off checks from step {first} on"


def handoff_summary(
    optimizer: Any, metrics: Path, steps: int | None = None, last_step: int | None = None
) -> dict[str, Any] | None:
    """Layers handed off, when, the projected parameters they removed, and the eval-loss jumps
    measured around each hand-off step (from the run's log, so resumed runs count them all).

    With ``steps`` and ``last_step`` (the run's ``--steps`` and where it stopped), a run that
    handed nothing off also says why (``reason``), so that a silent zero cannot be misread.
    """
    if not hasattr(optimizer, "handoff_report"):
        return None
    records = optimizer.handoff_report()
    config = getattr(optimizer, "handoff_config", None)
    reason = None
    if not records and config is not None and steps is not None and last_step is not None:
        reason = no_handoff_reason(config, steps, last_step)
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
        "reason": reason,
    }


def handoff_line(handoff: dict[str, Any] | None, count: int) -> str:
    """The summary table's hand-off row: layers, when, parameters removed, eval-loss jump."""
    if handoff and not handoff["layers"] and handoff.get("reason"):
        return f"none: {handoff['reason']}"
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

