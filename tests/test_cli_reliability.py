"""The command line's promises (issue #15): refused settings, one-line errors, safe resumes.

Every test uses a tiny LLaMA and corpus, so each runs in seconds on a CPU.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_pretrain import tiny_run

from lowrank_optim.cli import main
from lowrank_optim.train import PretrainConfig, run_pretraining

__all__: list[str] = []

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    # test_pretrain's tiny run, with GaLoreAdamW (no hand-offs: these tests are about the CLI)
    return {**tiny_run(tmp_path, monkeypatch), "optimizer": "galore_adamw"}


def cli_args(settings: dict[str, Any], out: Path, *extra: str) -> list[str]:
    args = ["pretrain", "--out-dir", str(out), "--no-progress", *extra]
    for name, value in settings.items():
        if name != "progress":
            args += ["--" + name.replace("_", "-"), str(value)]
    return args


def records(path: Path, kind: str) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def one_line_error(capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("lowrank-optim "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)
    return lines[0]


# --------------------------------------------------------------------------- item 9: settings


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("min_lr_ratio", -2.0, "min_lr_ratio: -2.0; must be a finite number in [0, 1]"),
        ("warmup_ratio", -3.0, "warmup_ratio: -3.0; must be a finite number in [0, 1]"),
        ("grad_clip", math.nan, "grad_clip: nan"),
        ("grad_clip", -1.0, "grad_clip: -1.0"),
        ("lr", 0.0, "lr: 0.0"),
        ("lr", math.inf, "lr: inf"),
        ("weight_decay", -0.1, "weight_decay: -0.1"),
        ("scale", 0.0, "scale: 0.0"),
        ("stability_threshold", 1.5, "stability_threshold: 1.5"),
        ("target_reduction", 1.0, "target_reduction: 1.0"),
        ("min_ratio", -0.5, "min_ratio: -0.5"),
        ("handoff_start", math.nan, "handoff_start: nan"),
        ("handoff_factor_lr_scale", 0.0, "handoff_factor_lr_scale: 0.0"),
        ("handoff_factor_lr_scale", math.inf, "handoff_factor_lr_scale: inf"),
        ("rank", 0, "rank: 0"),
        ("update_proj_gap", -4, "update_proj_gap: -4"),
        ("stability_patience", 0, "stability_patience: 0"),
        ("corpus_bytes", 0, "corpus_bytes: 0"),
        ("steps", True, "steps: True"),
        ("tokenizer", "word", "tokenizer: 'word'; allowed: bpe, byte"),
        ("refresh", "qr", "refresh: 'qr'"),
        ("stability_policy", "never", "stability_policy: 'never'"),
        ("model", "3m", "model: '3m'; allowed: 9m"),
        ("dataset", "./no/such/file.txt", "dataset: './no/such/file.txt' does not exist"),
    ],
)
def test_every_numeric_and_named_setting_is_validated(field: str, value: Any, message: str):
    with pytest.raises(ValueError, match="^" + re.escape(f"Invalid {message}")):
        PretrainConfig(**{field: value})


def test_defaults_and_boundaries_are_accepted():
    PretrainConfig()
    PretrainConfig(warmup_ratio=0.0, min_lr_ratio=1.0, grad_clip=0.0, weight_decay=0.0)
    spec = PretrainConfig(handoff_factor_lr_scale=0.125).optimizer_spec()
    assert spec.handoff.factor_lr_scale == 0.125


# --------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["pretrain", "--steps", "-1"], ["steps: -1", "integer > 0"]),
        (["pretrain", "--optimizer", "sgd"], ["optimizer: 'sgd'", "welore_adamw"]),
        (["pretrain", "--min-lr-ratio", "-2"], ["min_lr_ratio: -2.0"]),
        (["pretrain", "--grad-clip", "nan"], ["grad_clip: nan"]),
        (["pretrain", "--model", "nope"], ["model: 'nope'", "9m"]),
        (["plot-stability", "{tmp}/missing.jsonl"], ["missing.jsonl", "No such file"]),
        (["plot-stability", "{tmp}/plot.png"], ["plot.png:1", "JSONL"]),
        (["plot-stability", "{tmp}/plain.txt"], ["plain.txt:1 is not valid JSON"]),
        (["plot-stability", "{tmp}/adamw.jsonl"], ["no 'subspace' records"]),
        (["bench", "no_such_benchmark"], ["'no_such_benchmark'", "memory"]),
    ],
)
def test_errors_are_one_line_with_exit_code_2(
    argv: list[str], fragments: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    (tmp_path / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary")
    (tmp_path / "plain.txt").write_text("not json at all\n")
    (tmp_path / "adamw.jsonl").write_text('{"kind": "train", "step": 10, "loss": 3.0}\n')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "pretrain":
        argv += ["--out-dir", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    one_line_error(capsys, *fragments)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_help_names_the_choices(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as finished:
        main(["pretrain", "--help"])
    assert finished.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for name in ("adamw", "galore_adamw8bit", "q_galore_adamw4bit", "welore_adamw"):
        assert name in text
    for size in ("9m", "20m", "60m", "130m", "350m", "1b", "7b"):
        assert size in text
    assert "fraction of --steps" in text and "(0.4 with 600 steps: from step 240)" in text
    assert "takes no path" in text


# --------------------------------------------------------------------------- resume


def test_resume_without_checkpoint_stops(tiny, tmp_path: Path, capsys):
    out = tmp_path / "fresh"
    assert main(cli_args(tiny, out, "--resume")) == 2
    one_line_error(capsys, "no checkpoint", "without --resume")
    assert not (out / "metrics.jsonl").exists()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_pretraining(PretrainConfig(**tiny, out_dir=str(out), resume=True))


def test_resume_of_a_finished_run_reports_it_and_changes_nothing(tiny, tmp_path: Path, capsys):
    out = tmp_path / "done"
    first = run_pretraining(PretrainConfig(**{**tiny, "steps": 6}, out_dir=str(out)))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(cli_args({**tiny, "steps": 6}, out, "--resume")) == 0
    printed = capsys.readouterr().out
    assert "already finished at step 6" in printed
    assert f"{first['final_eval_loss']:.4f}" in printed
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before
    assert json.loads((out / "summary.json").read_text())["final_eval_loss"] is not None


def test_resume_drops_records_logged_after_the_checkpoint(tiny, tmp_path: Path):
    out = tmp_path / "killed"
    run_pretraining(PretrainConfig(**tiny, out_dir=str(out), stop_after=6))
    at_six = (out / "checkpoint.pt").read_bytes()
    run_pretraining(PretrainConfig(**tiny, out_dir=str(out), resume=True))
    # As if killed after logging steps 7..12 but before the last checkpoint was written.
    (out / "checkpoint.pt").write_bytes(at_six)
    run_pretraining(PretrainConfig(**tiny, out_dir=str(out), resume=True))
    metrics = out / "metrics.jsonl"
    assert [r["step"] for r in records(metrics, "train")] == [10, 12]
    assert [r["step"] for r in records(metrics, "eval")] == [6, 12]
    assert len(records(metrics, "config")) == 1
    names_per_step: dict[int, list[str]] = {}
    for r in records(metrics, "subspace"):
        names_per_step.setdefault(r["step"], []).append(r["name"])
    assert all(len(n) == len(set(n)) for n in names_per_step.values())


def test_stale_checkpoint_temporaries_are_removed(tiny, tmp_path: Path):
    out = tmp_path / "stale"
    out.mkdir()
    stale = [out / ".checkpoint.pt.k1ll3d", out / ".checkpoint.pt.abc123"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    keep = out / "notes.txt"
    keep.write_text("mine")
    run_pretraining(PretrainConfig(**{**tiny, "steps": 2}, out_dir=str(out)))
    assert not any(path.exists() for path in stale)
    assert keep.read_text() == "mine"


# --------------------------------------------------------------------------- summary


def test_summary_names_every_file_written(tiny, tmp_path: Path, capsys):
    out = tmp_path / "files"
    assert main(cli_args({**tiny, "steps": 6}, out)) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    names = {Path(p).name for p in summary["files"]}
    assert names == {"metrics.jsonl", "checkpoint.pt", "loss.png", "stability.png", "summary.json"}
    written = {p.name for p in out.iterdir() if p.is_file()}
    assert written == names
    for path in summary["files"]:
        assert path in printed
    assert set(summary["setup_seconds"]) == {"corpus", "model", "optimizer", "total"}


# --------------------------------------------------------------------------- start-up noise


def test_torchao_import_noise_is_silenced_and_nothing_else():
    code = (
        "import logging, sys\n"
        "from lowrank_optim.cli import silence_import_noise\n"
        "silence_import_noise()\n"
        "import transformers.modeling_utils\n"
        "import torchao\n"
        "logging.getLogger('torchao').warning('another torchao warning')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert "torchao/_C" not in done.stderr, done.stderr
    assert "register_constant" not in done.stderr, done.stderr
    assert "another torchao warning" in done.stderr


# --------------------------------------------------------------------------- start-up time


def test_warm_built_in_corpus_reads_no_source_file(tmp_path: Path, monkeypatch):
    """A second start with the same standard library loads the cache without reading and
    hashing every source file (about a second of each start with the default corpus)."""
    from lowrank_optim.train import data

    first = data.build_corpus(vocab_size=300, max_bytes=300_000, cache_dir=tmp_path)

    def no_reading(path: Path) -> str:
        raise AssertionError(f"read {path} although the corpus is cached")

    monkeypatch.setattr(data, "_read", no_reading)
    second = data.build_corpus(vocab_size=300, max_bytes=300_000, cache_dir=tmp_path)
    assert second.description == first.description
    assert second.tokenizer.vocab_size == first.tokenizer.vocab_size
    assert second.train_tokens.equal(first.train_tokens)
    assert second.val_tokens.equal(first.val_tokens)
    # Another vocabulary is another corpus: built, not served from the shortcut.
    monkeypatch.undo()
    other = data.build_corpus(vocab_size=320, max_bytes=300_000, cache_dir=tmp_path)
    assert other.tokenizer.vocab_size == 320
