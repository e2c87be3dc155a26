"""`lowrank-optim bench handoff --quick`: every method runs, the report is written, runs cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowrank_optim.cli import main

__all__: list[str] = []

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = {
    "dense",
    "welore",
    "welore-taper",
    "welore-rewarmup",
    "welore-lr",
    "oneshot",
    "oneshot-late",
    "welore-halflr",
    "oneshot-late-halflr",
    "welore-matched",
    "oneshot-late-matched",
    "welore-each",
    "oneshot-late-each",
    "cuttlefish",
    "posthoc",
    "posthoc+ft",
    "scratch",
}


def test_bench_handoff_quick_runs_every_method_and_caches(tmp_path: Path) -> None:
    assert main(["bench", "handoff", "--quick", "--out", str(tmp_path)]) == 0
    for name in ("handoff_study.md", "handoff_study.json", "handoff_pareto.png",
                 "handoff_layers.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    result = json.loads((tmp_path / "handoff_study.json").read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == METHODS
    dense = rows["dense"]["eval_loss"]
    assert all(row["eval_loss"] > 0 for row in rows.values()) and dense > 0
    # the one-shot cut hands layers off, and every compressed method sits at its size
    assert rows["oneshot"]["removed"] > 0.3
    assert rows["posthoc"]["removed"] == pytest.approx(rows["welore"]["removed"], abs=0.05)
    assert len(result["layers"]) == 28  # the 9m LLaMA: 4 blocks x 7 projected matrices
    cached = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/result.json")}
    assert main(["bench", "handoff", "--quick", "--out", str(tmp_path)]) == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/result.json")} == cached


def test_handoff_trials_quick_pairs_a_trial_with_the_studys_dense_run(tmp_path: Path) -> None:
    """`python -m benchmarks.handoff_trials --quick`: a trial with a HandoffConfig override runs
    in the quick study's setting, and the report pairs it with that study's dense run."""
    from dataclasses import replace

    from benchmarks import handoff_trials
    from benchmarks.handoff_study import QUICK, Job, job_folder, run_job

    study_out = tmp_path / "study"
    study = replace(QUICK, out=str(study_out))
    run_job(study, Job("dense", 0.0, 0))
    trials = tmp_path / "trials"
    args = ["--quick", "--out", str(trials), "--study-out", str(study_out), "--seed", "0"]
    assert handoff_trials.main([*args, "--name", "half-lr", "--handoff",
                                '{"factor_lr_scale": 0.1}']) == 0
    result = json.loads((trials / "half-lr-s0" / "result.json").read_text())
    assert result["over"]["handoff"] == {"factor_lr_scale": 0.1} and result["handoffs"]
    dense = json.loads((job_folder(study, Job("dense", 0.0, 0)) / "result.json").read_text())
    gap = result["final_eval_loss"] / dense["final_eval_loss"] - 1.0
    markdown = (trials / "handoff_trials.md").read_text()
    assert f"| half-lr | {{\"factor_lr_scale\": 0.1}} | {QUICK.steps} | 0 |" in markdown
    assert f"{100 * gap:+.2f}%" in markdown
    with pytest.raises(SystemExit):  # a quick trial must not write into the kept results
        handoff_trials.main(["--quick", "--name", "x"])
