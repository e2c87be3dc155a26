"""The command line's reliability promises, second round: what ``--resume`` may change,
unreadable checkpoints, ``compress -o`` over a model, ``--grad-accum``'s meaning, runs too
short for a hand-off and too little validation data.

Tiny LLaMA, tiny corpus (one BPE corpus for the whole module), a few steps: seconds per test.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_cli_reliability import cli_args, one_line_error, records
from test_compress import _save_tiny
from test_pretrain import final_weights, tiny_run

from lowrank_optim.cli import main
from lowrank_optim.factorize import PLAN_FILE
from lowrank_optim.factorize.compress import (
    CompressionError,
    check_output_dir,
    compress_pretrained,
    load_compressed,
)
from lowrank_optim.train import PretrainConfig, run_pretraining
from lowrank_optim.train.errors import ResumeError, RunWarning
from lowrank_optim.train.summary import unreachable_handoff

__all__: list[str] = []

pytestmark = pytest.mark.usefixtures("one_thread")

REFUSAL_ADVICE = "resume with the checkpoint's value or start a new run"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path) -> dict[str, Any]:
    # test_pretrain's tiny run with GaLoreAdamW, sharing one corpus cache across the module
    settings = {**tiny_run(tmp_path, monkeypatch), "optimizer": "galore_adamw"}
    monkeypatch.setenv("LOWRANK_OPTIM_CACHE", str(cache))
    return settings


@pytest.fixture
def corpus_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    monkeypatch.setenv("LOWRANK_OPTIM_CACHE", str(cache))


@pytest.fixture(scope="module")
def stopped(
    tmp_path_factory: pytest.TempPathFactory, cache: Path
) -> Iterator[tuple[dict[str, Any], Path]]:
    """The tiny 12-step run stopped at its step-6 checkpoint; tests resume copies of it."""
    root = tmp_path_factory.mktemp("stopped")
    with pytest.MonkeyPatch.context() as patch:
        settings = {**tiny_run(root, patch), "optimizer": "galore_adamw"}
        patch.setenv("LOWRANK_OPTIM_CACHE", str(cache))
        run_pretraining(PretrainConfig(**settings, out_dir=str(root / "run"), stop_after=6))
    yield settings, root / "run"


def copy_of(stopped: tuple[dict[str, Any], Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(stopped[1], tmp_path / "run"))


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


# --------------------------------------------------------------------------- items 1 and 4


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", 0.003, "--lr changed on resume: checkpoint 0.01, now 0.003"),
        ("steps", 20, "--steps changed on resume: checkpoint 12, now 20"),
        ("target_reduction", 0.5, "--target-reduction changed on resume: checkpoint 0.8, now 0.5"),
        (
            "optimizer",
            "welore_adamw",
            "--optimizer changed on resume: checkpoint 'galore_adamw', now 'welore_adamw'",
        ),
        ("grad_accum", 2, "--grad-accum changed on resume: checkpoint 1, now 2"),
        ("eval_batches", 1, "--eval-batches changed on resume: checkpoint 2, now 1"),
    ],
)
def test_resume_refuses_a_changed_setting_by_name(
    stopped, tmp_path: Path, capsys, field: str, value: Any, message: str
):
    settings, out = stopped[0], copy_of(stopped, tmp_path)
    before = files_of(out)
    assert main(cli_args({**settings, field: value}, out, "--resume")) == 2
    one_line_error(capsys, message, REFUSAL_ADVICE)
    assert files_of(out) == before


def test_resume_names_every_changed_setting(stopped, tmp_path: Path):
    settings, out = stopped[0], copy_of(stopped, tmp_path)
    changed = {**settings, "lr": 0.003, "steps": 20, "out_dir": str(out), "resume": True}
    with pytest.raises(ResumeError, match="--steps changed .* 12, now 20; .*values or start"):
        run_pretraining(PretrainConfig(**changed))


@pytest.mark.usefixtures("corpus_cache")
def test_harmless_changes_are_recorded_and_train_bit_for_bit(stopped, tmp_path: Path):
    settings, out = stopped[0], copy_of(stopped, tmp_path)
    flags = cli_args({**settings, "eval_every": 3, "checkpoint_every": 4}, out, "--resume")
    assert main(flags) == 0
    metrics = out / "metrics.jsonl"
    [resume] = records(metrics, "resume")
    assert resume["step"] == 6
    changed = resume["changed"]
    assert changed["eval_every"] == {"checkpoint": 6, "now": 3}
    assert changed["checkpoint_every"] == {"checkpoint": 6, "now": 4}
    assert changed["stop_after"] == {"checkpoint": 6, "now": None}
    assert "resume" not in changed
    [config] = records(metrics, "config")
    assert config["eval_every"] == 6  # the run's own settings, as started
    assert [r["step"] for r in records(metrics, "eval")] == [6, 9, 12]
    straight = tmp_path / "straight"
    run_pretraining(PretrainConfig(**settings, out_dir=str(straight)))
    expected, resumed = final_weights(straight), final_weights(out)
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)


@pytest.mark.usefixtures("corpus_cache")
def test_checkpoint_without_settings_falls_back_to_the_log(stopped, tmp_path: Path):
    settings, out = stopped[0], copy_of(stopped, tmp_path)
    path = out / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    payload.pop("settings", None)  # as written before the checkpoint recorded its settings
    torch.save(payload, path)
    resumed = {**settings, "out_dir": str(out), "resume": True}
    with pytest.raises(ResumeError, match="--lr changed on resume: checkpoint 0.01, now 0.003"):
        run_pretraining(PretrainConfig(**{**resumed, "lr": 0.003}))
    (out / "metrics.jsonl").unlink()  # nothing left to compare: the restore names the mismatch
    with pytest.raises(ResumeError, match=f"from {path}: it does not fit this run .*param group"):
        run_pretraining(PretrainConfig(**{**resumed, "optimizer": "welore_adamw"}))


# --------------------------------------------------------------------------- item 3


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "other data", "a list"])
def test_unreadable_checkpoint_is_one_line_naming_it(
    stopped, tmp_path: Path, capsys, kind: str
):
    settings, whole = stopped[0], (stopped[1] / "checkpoint.pt").read_bytes()
    out = tmp_path / "broken"
    out.mkdir()
    path = out / "checkpoint.pt"
    if kind in ("other data", "a list"):
        torch.save({"weights": torch.ones(2)} if kind == "other data" else [1, 2], path)
    else:
        path.write_bytes({"empty": b"", "truncated": whole[: len(whole) // 2]}.get(kind, b"junk"))
    assert main(cli_args(settings, out, "--resume")) == 2
    line = one_line_error(capsys, f"Cannot resume: {path} is not a", "start a new run")
    assert "restore it from a copy" in line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]  # nothing written


# --------------------------------------------------------------------------- item 2


def test_compress_refuses_its_input_or_a_model_folder(tmp_path: Path, capsys):
    dense = _save_tiny("llama", tmp_path / "dense")
    other = _save_tiny("gpt2", tmp_path / "other")
    capsys.readouterr()  # transformers' progress bars of the two saves
    weights = (dense / "model.safetensors").read_bytes()
    argv = ["compress", "--target", "0.5", "--measure", "params", "--no-progress"]
    assert main([*argv, str(dense), "-o", str(dense)]) == 2
    one_line_error(capsys, "is the input model folder", "--overwrite")
    assert (dense / "model.safetensors").read_bytes() == weights
    assert not (dense / PLAN_FILE).exists()
    with pytest.raises(CompressionError, match="is the input model folder"):
        compress_pretrained(dense, dense, 0.5, measure="params", progress=False)
    assert main([*argv, str(dense), "-o", str(other)]) == 2
    one_line_error(capsys, "already holds a model (config.json, model.safetensors)", "--overwrite")
    assert main([*argv, str(dense), "-o", str(other), "--overwrite"]) == 0
    assert type(load_compressed(other)).__name__ == "LlamaForCausalLM"
    empty = tmp_path / "empty"
    empty.mkdir()
    check_output_dir(dense, empty)  # an existing empty folder is fine


# --------------------------------------------------------------------------- item 5


def test_grad_accum_steps_on_batch_size_sequences_per_micro_batch(
    tiny, tmp_path: Path, monkeypatch, capsys
):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "batch-size / grad-accum" not in text
    assert "micro-batches per optimizer step (> 0), each of --batch-size sequences" in text
    from lowrank_optim.train import models

    rows: list[int] = []
    build = models.build_llama

    def recording(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = build(*args, **kwargs)

        def record(module: torch.nn.Module, _: tuple, inputs: dict[str, Any]) -> None:
            if module.training:
                rows.append(int(inputs["input_ids"].shape[0]))

        model.register_forward_pre_hook(record, with_kwargs=True)
        return model

    monkeypatch.setattr(models, "build_llama", recording)
    settings = {**tiny, "steps": 2, "batch_size": 2, "grad_accum": 3}
    run_pretraining(PretrainConfig(**settings, out_dir=str(tmp_path / "accum")))
    assert rows == [2] * 6  # 2 steps x 3 micro-batches of --batch-size 2
    batches = torch.load(tmp_path / "accum" / "checkpoint.pt", weights_only=True)["batches"]
    assert batches["index"] == 12 and batches["epoch"] == 0  # 6 sequences per optimizer step


# --------------------------------------------------------------------------- item 6


def test_run_too_short_for_a_handoff_warns_and_says_why(tiny, tmp_path: Path, capsys):
    settings = {**tiny, "optimizer": "welore_adamw", "steps": 6, "update_proj_gap": 8}
    assert main(cli_args(settings, tmp_path / "short")) == 0
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if "warning:" in line]
    assert warned == [
        "lowrank-optim pretrain: warning: no layer can be handed off: the first hand-off check "
        "is step 8 (the first multiple of --update-proj-gap 8 at or after --handoff-start 0.4 x "
        "--steps 6 = step 2), after the last step, 6; lower --update-proj-gap or "
        "--handoff-start, or raise --steps"
    ]
    assert "none: the first hand-off check, step 8, is after the last step, 6" in captured.out
    # The case, and the defaults (600 steps), which reach their checks.
    config = PretrainConfig(steps=30)
    assert "step 50" in unreachable_handoff(config, config.optimizer_spec().handoff)
    assert unreachable_handoff(PretrainConfig(), PretrainConfig().optimizer_spec().handoff) is None
    with pytest.warns(RunWarning, match="no layer can be handed off"):
        run_pretraining(PretrainConfig(**settings, out_dir=str(tmp_path / "api")))


# --------------------------------------------------------------------------- item 7


def test_too_little_data_is_one_line_with_exit_code_2(tiny, tmp_path: Path, capsys):
    out = tmp_path / "small"
    assert main(cli_args({**tiny, "eval_batches": 500}, out)) == 2
    one_line_error(capsys, "Validation split has", "500 batches of 4 need 2000", "--eval-batches")
    one = tmp_path / "one.txt"
    one.write_text("a single document\n" * 50)
    assert main(cli_args({**tiny, "dataset": str(one)}, out)) == 2
    one_line_error(capsys, "Dataset has 1 document(s); need at least 2")
