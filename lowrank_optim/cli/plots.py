"""Matplotlib figures: the JSONL metrics log's losses and stability heat maps (see
:mod:`lowrank_optim.reporting`), and the singular-value spectra of ``lowrank-optim compress``.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

import torch

from lowrank_optim.factorize import normalized_spectrum
from lowrank_optim.factorize.compress import module_type_of
from lowrank_optim.train.records import read_records

__all__ = [
    "check_stability_log",
    "plot_losses",
    "plot_spectra",
    "plot_stability",
    "read_records",
]


def check_stability_log(log_path: str | os.PathLike[str]) -> int:
    """The number of ``subspace`` records in ``log_path``; errors name what is wrong.

    ``FileNotFoundError`` if it is missing, ``ValueError`` if it is not a JSONL log or holds no
    subspace records (plain AdamW logs none; GaLore-family runs log them every refresh gap).
    """
    count = len(read_records(log_path, kind="subspace"))
    if not count:
        raise ValueError(
            f"{log_path} holds no 'subspace' records; log them with MetricsWriter.log_subspace "
            "(pretrain does for GaLore-family optimizers)"
        )
    return count


def plot_stability(
    log_path: str | os.PathLike[str], output: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Heat map of subspace overlap (layers x steps) and a per-module-type summary.

    Left: each row is a projected layer, each column a logged step, the colour its last
    overlap ``||P_old^T P_new||_F^2 / r`` (1 = the subspace did not move). Right, top: mean
    overlap per module type (q, k, v, o, gate, up, down) over steps. Right, bottom: the fraction
    of each type's layers that meet the stability criterion.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from lowrank_optim.reporting import MODULE_TYPES

    records = read_records(log_path, kind="subspace")
    if not records:
        raise ValueError(f"{log_path} holds no 'subspace' records; log them with MetricsWriter")
    steps = sorted({int(r["step"]) for r in records})
    layers = list(dict.fromkeys(r["name"] for r in records))
    step_index = {step: i for i, step in enumerate(steps)}
    layer_index = {name: i for i, name in enumerate(layers)}
    overlap = np.full((len(layers), len(steps)), np.nan)
    by_type: dict[str, dict[int, list[tuple[float, bool]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        value = math.nan if r["last_overlap"] is None else float(r["last_overlap"])
        overlap[layer_index[r["name"]], step_index[int(r["step"])]] = value
        by_type[r["module_type"]][int(r["step"])].append((value, bool(r["stable"])))

    figure = plt.figure(figsize=(14, max(4.0, 0.18 * len(layers) + 2)))
    grid = figure.add_gridspec(2, 2, width_ratios=(1.6, 1.0))
    heat = figure.add_subplot(grid[:, 0])
    image = heat.imshow(
        overlap, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest"
    )
    heat.set_xlabel("step")
    heat.set_ylabel("layer")
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).astype(int)
    heat.set_xticks(ticks, [str(steps[t]) for t in ticks])
    if len(layers) <= 60:
        heat.set_yticks(range(len(layers)), [_short(name) for name in layers], fontsize=6)
    figure.colorbar(image, ax=heat, label="subspace overlap")
    heat.set_title("overlap of consecutive bases")

    mean_axis = figure.add_subplot(grid[0, 1])
    stable_axis = figure.add_subplot(grid[1, 1], sharex=mean_axis)
    ordered = [t for t in MODULE_TYPES if t in by_type] + sorted(set(by_type) - set(MODULE_TYPES))
    for kind in ordered:
        xs = sorted(by_type[kind])
        means = [_finite_mean([v for v, _ in by_type[kind][x]]) for x in xs]
        stable = [np.mean([s for _, s in by_type[kind][x]]) for x in xs]
        mean_axis.plot(xs, means, label=kind)
        stable_axis.plot(xs, stable, label=kind)
    mean_axis.set_ylabel("mean overlap")
    mean_axis.set_ylim(0.0, 1.05)
    mean_axis.legend(fontsize=7, ncol=4)
    mean_axis.set_title("per module type")
    stable_axis.set_ylabel("fraction stable")
    stable_axis.set_xlabel("step")
    stable_axis.set_ylim(-0.05, 1.05)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _short(name: str) -> str:
    return name.removeprefix("model.").removesuffix(".weight").replace("layers.", "L")


def plot_losses(
    log_paths: str | os.PathLike[str] | dict[str, str | os.PathLike[str]],
    output: str | os.PathLike[str],
    title: str | None = None,
) -> Path:
    """Train and eval loss against step, for one run or several (``{label: log_path}``).

    Hand-off steps recorded in a log are marked with vertical ticks on its eval curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = log_paths if isinstance(log_paths, dict) else {"": log_paths}
    figure, (train_axis, eval_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, path in runs.items():
        train = read_records(path, kind="train")
        evals = read_records(path, kind="eval")
        handoffs = sorted({int(r["step"]) for r in read_records(path, kind="handoff")})
        if train:
            train_axis.plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
        if evals:
            line = eval_axis.plot(
                [r["step"] for r in evals], [r["loss"] for r in evals], marker="o", label=label
            )
            for step in handoffs:
                eval_axis.axvline(step, color=line[0].get_color(), alpha=0.15, linewidth=1)
    for axis, name in ((train_axis, "train loss"), (eval_axis, "eval loss")):
        axis.set_xlabel("step")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
        if len(runs) > 1:
            axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def plot_spectra(
    spectra: dict[str, torch.Tensor], threshold: float | None, output: str | Path
) -> Path:
    """One panel per module type: every layer's normalized spectrum against ``i / rank``.

    Curves that drop fast (heavy tails) lose many values under the dashed global threshold;
    that is where WeLore's non-uniform ranks come from.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    for name, values in spectra.items():
        groups[module_type_of(name)].append((name, normalized_spectrum(values)))
    columns = min(len(groups), 4)
    rows = -(-len(groups) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for axis, (kind, curves) in zip(axes.flat, groups.items(), strict=False):
        colours = plt.cm.viridis(torch.linspace(0, 1, len(curves)).tolist())
        for colour, (name, curve) in zip(colours, curves, strict=True):
            position = torch.arange(curve.numel()) / max(curve.numel() - 1, 1)
            axis.plot(position.tolist(), curve.tolist(), color=colour, lw=1, label=name)
        if threshold is not None:
            axis.axhline(threshold, color="red", ls="--", lw=1)
        axis.set_title(kind, fontsize=9)
        axis.set_xlabel("singular value index / rank")
        axis.set_ylabel("normalized value")
    for axis in list(axes.flat)[len(groups) :]:
        axis.set_visible(False)
    figure.suptitle("Normalized singular-value spectra (dashed: WeLore global threshold)")
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output
