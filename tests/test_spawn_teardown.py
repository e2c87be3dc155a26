"""The test harness's tolerance of the rare abort at exit of gloo ranks (issue #26): a rank
killed by SIGABRT after it saved its results passes; one that aborts before saving fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TEARDOWN_ABORT, check_torchrun, spawn_ranks


def _save_then_abort(rank: int, port: int, directory: str) -> None:
    torch.save({"rank": rank}, Path(directory) / f"rank{rank}.pt")
    if rank == 1:
        os.abort()  # what libstdc++'s std::terminate ends in


def _abort_before_saving(rank: int, port: int, directory: str) -> None:
    if rank == 1:
        os.abort()
    torch.save({"rank": rank}, Path(directory) / f"rank{rank}.pt")


def test_an_abort_after_the_results_are_saved_is_tolerated(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="rank 1 aborted at exit after saving"):
        results = spawn_ranks(_save_then_abort, 2, tmp_path, 60, with_world=False)
    assert [r["rank"] for r in results] == [0, 1]


def test_an_abort_before_the_results_are_saved_fails(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    with pytest.raises(mp.ProcessExitedException):
        spawn_ranks(_abort_before_saving, 2, tmp_path, 60, with_world=False)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_torchrun_check_tolerates_only_the_teardown_abort() -> None:
    check_torchrun(_run("pass"))
    check_torchrun(_run(f"import os, sys; sys.stderr.write({TEARDOWN_ABORT!r}); os.abort()"))
    with pytest.raises(AssertionError):
        check_torchrun(_run("raise SystemExit(3)"))
    with pytest.raises(AssertionError):  # a Python error before the abort is a real failure
        check_torchrun(_run(f"import os, sys, traceback; traceback.print_stack(); "
                            f"sys.stderr.write('Traceback\\n{TEARDOWN_ABORT}'); os.abort()"))
