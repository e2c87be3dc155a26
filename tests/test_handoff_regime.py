"""The regime study (issue #25): its smoke run, the FLOPs count and the per-layer statistics."""

from __future__ import annotations

import json

import pytest

from benchmarks import handoff_regime, resolve
from benchmarks.regime_flops import Shapes, run_flops
from benchmarks.regime_report import bootstrap_spearman, spearman


def test_quick_study_runs_every_method_and_caches(tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results"
    assert handoff_regime.main(["--quick", "--out", str(out), "--results", str(results),
                                "--parallel", "2"]) == 0
    regime = handoff_regime.QUICK
    report = json.loads((results / "handoff_regime.json").read_text())
    methods = {row["method"] for row in report["rows"]}
    assert {"dense", "welore", "welore-fixed", "oneshot", "cuttlefish", "posthoc",
            "posthoc+ft", "scratch", "welore-flops", "oneshot-flops",
            "posthoc+ft-flops"} <= methods
    assert report["missing"] == []
    rows = {row["method"]: row for row in report["rows"]}
    assert rows["dense"]["removed"] == 0 and rows["welore"]["removed"] > 0.5
    # the equal-FLOPs runs train longer than the equal-token ones
    assert rows["welore-flops"]["steps"] > regime.steps
    assert (results / "handoff_regime_flops.png").exists()
    # a second call reads the cache: no run starts again
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    assert handoff_regime.main(["--quick", "--out", str(out), "--results", str(results)]) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}


def test_bench_regime_alias():
    assert resolve("regime") == "handoff_regime"


def _shapes() -> Shapes:
    return Shapes(hidden=4, layers=1, seq_len=8, tokens_per_step=16, head=40,
                  projected={"a": (4, 4), "b": (8, 4)})


def test_flops_count_before_and_after_a_handoff():
    shapes = _shapes()
    dense_step = 16 * (6 * (40 + 16 + 32) + 12 * 1 * 8 * 4)
    result = {"steps": 10, "handoffs": [{"step": 4, "layer": "b", "params_after": 12}],
              "eval_curve": [[5, 1.0], [10, 1.0]]}
    after_step = 16 * (6 * (40 + 16 + 12) + 12 * 1 * 8 * 4)
    flops = run_flops(result, shapes, handoff_regime.QUICK)
    assert flops["total"] == 4 * dense_step + 6 * after_step
    assert flops["saved"] == 6 * (dense_step - after_step)
    assert flops["curve"] == [[5, 4 * dense_step + after_step], [10, flops["total"]]]


def test_spearman_ranks_and_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 2], [1, 1, 2, 2]) == pytest.approx(1.0)
    interval = bootstrap_spearman([(float(i), float(i) + 0.1) for i in range(20)])
    assert interval["rho"] == pytest.approx(1.0) and interval["low"] <= interval["high"]
