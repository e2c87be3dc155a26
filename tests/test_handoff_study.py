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
    "welore-capped",
    "oneshot-late-capped",
    "welore-relax",
    "oneshot-late-relax",
    "oneshot-mid",
    "oneshot-mid-each",
    "cuttlefish",
    "posthoc",
    "posthoc+ft",
    "scratch",
}


def test_bench_handoff_quick_runs_every_method_and_caches(tmp_path: Path) -> None:
    assert main(["bench", "handoff", "--quick", "--out", str(tmp_path)]) == 0
    for name in ("handoff_study.md", "handoff_study.json", "handoff_pareto.png",
                 "handoff_layers.png", "handoff_gap.png"):
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
    # the gap to dense along the run: zero before any hand-off, the final gap at the end
    gap = rows["oneshot-late"]["gap_curve"]
    assert gap[0][1] == 0.0 and gap[-1][1] == pytest.approx(rows["oneshot-late"]["vs_dense"])
    assert "## The gap to dense along the run" in (tmp_path / "handoff_study.md").read_text()
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


def _fake_run(folder: Path, loss: float, multipliers: list[float] | None = None) -> None:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"final_eval_loss": loss}))
    records = [{"kind": "train", "step": 1}]
    if multipliers is not None:
        records.append(
            {"kind": "handoff", "step": 400, "layer": "a", "lr_multipliers": multipliers}
        )
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_main_job_factor_lr_report_pairs_each_variant_with_its_own_lrs_dense(
    tmp_path: Path,
) -> None:
    from benchmarks.main_job_factor_lr import report

    for seed, (dense, fixed, each) in enumerate([(4.0, 4.04, 4.02), (3.0, 3.06, 3.03)]):
        _fake_run(tmp_path / f"dense-s{seed}", dense)
        _fake_run(tmp_path / f"fixed-s{seed}", fixed, [1.0, 1.0])
        _fake_run(tmp_path / f"each-s{seed}", each, [0.5, 1.5])
    _fake_run(tmp_path / "lr3e-3-dense-s0", 5.0)
    _fake_run(tmp_path / "lr3e-3-double-s0", 5.5, [1.0, 1.0])
    text = report(str(tmp_path), [0, 1])
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    fixed_row = lines["WeLoreAdamW, lr 1e-2, factors at lr x scale (factor_step fixed)"]
    assert "+1.50% ± 0.71%" in fixed_row and "+1.00%, +2.00%" in fixed_row
    each_row = lines["WeLoreAdamW, lr 1e-2, factor_step matched-each"]
    # paired against fixed: -0.5 and -1.0 points
    assert "+0.75% ± 0.35%" in each_row and "-0.75% ± 0.35%" in each_row and "1.00" in each_row
    # the 3e-3 variant is measured against the 3e-3 dense run, not the 1e-2 one
    assert "+10.00%" in lines["WeLoreAdamW, lr 3e-3, factors at 2 x lr x scale"]
