"""Smoke test of ``benchmarks/layerwise_memory.py``: the quick mode on one process."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.layerwise_memory import METHODS, main


def test_layerwise_memory_quick_writes_its_table(tmp_path: Path) -> None:
    assert main(["--quick", "--processes", "1", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "layerwise_memory.json").read_text())
    (cell,) = payload["cells"]
    assert cell["config"] == "tiny" and cell["processes"] == 1
    assert set(cell["methods"]) == set(METHODS)
    for row in cell["methods"].values():
        assert row["peak_mb"] >= 0 and row["baseline_mb"] > 0
        assert row["gradient_mb"] > row["largest_gradient_mb"] > 0
    table = (tmp_path / "layerwise_memory.md").read_text()
    assert "saved by layer-wise" in table and "galore_layerwise" in table
