"""`lowrank-optim bench throughput` and `bench quality` end to end, in their --quick modes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from lowrank_optim.cli import main
from lowrank_optim.memory.rules import ESTIMATE_METHODS

__all__: list[str] = []

# Tiny models and batches: a second intra-op thread only adds contention on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
#: Every method of the memory benchmark, plus torch's fused AdamW.
THROUGHPUT_METHODS = {"adamw_fused", *ESTIMATE_METHODS}
#: pretrain_suite methods that must be there whatever else the suite adds.
CORE_SUITE_METHODS = {"torch AdamW", "GaLoreAdamW (fixed gap)", "WeLoreAdamW", "QGaLoreAdamW"}


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _outputs(folder: Path, name: str, png: str) -> tuple[dict[str, Any], str]:
    for file in (f"{name}.json", f"{name}.md", png):
        assert (folder / file).stat().st_size > 0, file
    return json.loads((folder / f"{name}.json").read_text()), (folder / f"{name}.md").read_text()


def test_bench_throughput_quick(tmp_path: Path):
    assert main(["bench", "throughput", "--quick", "--out", str(tmp_path)]) == 0
    result, markdown = _outputs(tmp_path, "throughput", "throughput.png")
    assert result["environment"]["torch"]
    rows = {row["method"]: row for row in result["methods"]}
    assert set(rows) == THROUGHPUT_METHODS
    for row in rows.values():
        # Every method is a row: timed, or saying why not (skipped, not installed, error).
        assert row["ok"] or row["reason"], row
        assert f"| {row['label']} |" in markdown
    for method in ("adamw", "adamw_fused", "galore_adamw"):
        row = rows[method]
        assert row["ok"], row
        for key in ("optimizer_step_ms", "whole_step_ms", "tokens_per_second"):
            assert _positive(row[key]), (method, key)
        for key in ("optimizer_step_vs_adamw", "whole_step_vs_fused"):
            assert _positive(row[key]), (method, key)
    assert rows["adamw"]["optimizer_step_vs_adamw"] == 1.0
    assert rows["adamw_fused"]["whole_step_vs_fused"] == 1.0
    assert rows["torchao_adamw8bit"]["reason"].startswith("skipped in --quick")
    refresh = result["refresh"]
    assert {r["config"] for r in refresh} == {"60M", "350M"}  # --quick leaves out 1B
    assert all(_positive(r["svd_seconds"]) and _positive(r["randomized_seconds"]) for r in refresh)


def test_bench_quality_quick(tmp_path: Path):
    assert main(["bench", "quality", "--quick", "--out", str(tmp_path)]) == 0
    result, markdown = _outputs(tmp_path, "quality", "quality_loss.png")
    rows = {row["method"]: row for row in result["methods"]}
    assert list(rows) == result["suite_methods"] and set(rows) >= CORE_SUITE_METHODS
    for label, row in rows.items():
        assert row["ok"], row
        assert math.isfinite(row["final_eval_loss"]) and row["train_curve"] and row["eval_curve"]
        assert f"| {label} |" in markdown
    for label in ("torch AdamW", "GaLoreAdamW (fixed gap)"):
        assert _positive(rows[label]["wall_seconds"])
        assert _positive(rows[label]["tokens_per_second"])
    assert rows["torch AdamW"]["eval_loss_change_vs_adamw"] == 0.0


def test_bench_quality_redraws_recorded_runs(tmp_path: Path):
    """The default mode trains nothing: it reads the committed summaries (the run logs, where
    present, add the curves)."""
    assert main(["bench", "quality", "--runs", str(RESULTS), "--out", str(tmp_path)]) == 0
    result, markdown = _outputs(tmp_path, "quality", "quality_loss.png")
    assert [row["method"] for row in result["methods"]] == result["suite_methods"]
    assert set(result["suite_methods"]) >= CORE_SUITE_METHODS
    assert all(row["ok"] and math.isfinite(row["final_eval_loss"]) for row in result["methods"])
    assert "| torch AdamW |" in markdown


def _digests(paths: list[Path]) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in paths if path.is_file()}


def test_bench_memory_quick_writes_to_a_temporary_folder(capsys: pytest.CaptureFixture[str]):
    """--quick without --out never touches the committed results; a peer that is not
    installed is one "not run" line saying how to install it, with no numbers and no traceback."""
    import importlib.util

    memory_files = [RESULTS / f"memory.{suffix}" for suffix in ("json", "md", "png")]
    committed = [RESULTS.parent / "RESULTS.md", *memory_files]
    before = _digests(committed)
    assert main(["bench", "memory", "--quick"]) == 0
    captured = capsys.readouterr()
    assert _digests(committed) == before
    assert "Traceback" not in captured.err
    folder = Path(captured.out.strip().splitlines()[-1].rsplit(" to ", 1)[1])
    assert folder.resolve() != RESULTS.resolve() and folder.is_dir()
    result, markdown = _outputs(folder, "memory", "memory.png")
    rows = result["configs"]["tiny"]["methods"]
    for method, package in (("galore_torch", "galore-torch"), ("apollo", "apollo-torch")):
        row = next(r for r in rows.values() if r["method"] == method)
        if importlib.util.find_spec(package.replace("-", "_")) is not None:
            continue  # installed: it runs like any other row
        reason = f"{package} is not installed (pip install {package})"
        assert row == {"method": method, "not_run": reason}
        assert f"not run: {reason}" in markdown
        assert captured.out.count(reason) >= 1 and "Traceback" not in captured.out


def test_bench_memory_plot_keeps_labels_and_legend_clear(monkeypatch: pytest.MonkeyPatch):
    """Long method labels stay inside the figure and the legend overlaps no panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks import memory

    recorded = json.loads((RESULTS / "memory.json").read_text())["configs"]
    results = {name: recorded[name] for name in list(recorded)[:1]}  # one panel, as --quick
    figures: list[Any] = []
    close = plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda *a, **k: None)
    memory.plot(results, Path("unused.png"))
    (figure,) = figures
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    box = figure.bbox
    for axis in figure.axes:
        for label in axis.get_yticklabels():
            extent = label.get_window_extent(renderer)
            assert extent.x0 >= box.x0 - 1 and extent.x1 <= box.x1 + 1, label.get_text()
    (legend,) = figure.legends
    legend_box = legend.get_window_extent(renderer)
    assert legend_box.y0 >= box.y0 - 1
    for axis in figure.axes:
        assert not legend_box.overlaps(axis.get_tightbbox(renderer))
    close(figure)


def test_every_benchmark_with_a_main_is_registered_and_unknown_names_are_refused():
    """`benchmarks.run` knows every module that has a main; a wrong name runs nothing."""
    import benchmarks

    with_main = {
        path.stem
        for path in RESULTS.parent.glob("*.py")
        if "\ndef main(argv: list[str] | None = None) -> int:" in path.read_text()
    }
    assert with_main == set(benchmarks.BENCHMARKS)
    assert benchmarks.resolve("handoff") == "handoff_study"
    with pytest.raises(ValueError, match=r"Invalid benchmark: 'nope'; allowed: .*memory"):
        benchmarks.run("nope", [])
    assert benchmarks.run("results_md", ["--help"]) == 0  # argparse's exit is a return code


def test_a_benchmark_child_process_imports_the_package_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """How handoff_study starts its runs: `python -m benchmarks.<name>`, from the caller's
    working directory, which need not be the repository root, and without a PYTHONPATH."""
    import subprocess

    from benchmarks.common import child_env, module_command

    monkeypatch.delenv("PYTHONPATH", raising=False)
    command = module_command("benchmarks.results_md", "--help")
    done = subprocess.run(command, cwd=tmp_path, env=child_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "RESULTS.md" in done.stdout


def test_fsdp_comm_handoff_quick(tmp_path: Path):
    """`python -m benchmarks.fsdp_comm --handoff --quick`: 2 gloo ranks hand off a tiny layer
    under FSDP2; the counted bytes and per-rank memory equal the formulas (the run raises
    otherwise), and both result files are written where --out says."""
    from benchmarks import fsdp_comm

    assert fsdp_comm.main(["--handoff", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "fsdp_comm_handoff.json").read_text())
    markdown = (tmp_path / "fsdp_comm_handoff.md").read_text()
    assert result["quick"] and set(result["whole_model"]) == {"2", "4", "8"}
    handoffs = result["measured"]["handoffs"]
    assert len(handoffs) == len(result["layer_shapes"])
    for name, entry in result["per_matrix"].items():
        assert entry["measured"]["route"] == "shared", name  # from the spectra's decomposition
        assert sum(entry["measured"]["bytes"].values()) == entry["formula"]["payload"], name
    for world, totals in result["whole_model"].items():  # the spectra move less than gathering
        assert totals["spectra_wire_per_rank"] < totals["gather_wire_per_rank"], world
    for world, cases in result["memory"].items():
        before, *after = cases.values()
        assert all(case["total"] < before["total"] for case in after), world
    assert "| 8 | formula |" in markdown and "## Per-rank memory" in markdown
