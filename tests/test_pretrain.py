"""The ``lowrank-optim pretrain`` command end to end, on tiny settings, including a resume."""

from __future__ import annotations

import json

import pytest
import torch

from lowrank_optim.cli import main
from lowrank_optim.train import PretrainConfig, run_pretraining

TINY_MODEL = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 512,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    return tiny_run(tmp_path, monkeypatch)


def tiny_run(tmp_path, monkeypatch) -> dict:
    """Settings of a 12-step run of a 2-layer LLaMA on 1.5 MB of the built-in corpus."""
    monkeypatch.setenv("LOWRANK_OPTIM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_MODEL))
    return {
        "model": str(path),
        "steps": 12,
        "batch_size": 4,
        "seq_len": 32,
        "vocab_size": 512,
        "corpus_bytes": 1_500_000,
        "eval_every": 6,
        "eval_batches": 2,
        "checkpoint_every": 6,
        "rank": 8,
        "update_proj_gap": 4,
        "progress": False,
    }


def final_weights(out_dir) -> dict[str, torch.Tensor]:
    return torch.load(out_dir / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize("optimizer", ["galore_adamw", "adamw"])
def test_resume_continues_bit_for_bit(tiny, tmp_path, optimizer: str) -> None:
    straight = tmp_path / "straight"
    run_pretraining(PretrainConfig(**tiny, optimizer=optimizer, out_dir=str(straight)))
    split = tmp_path / "split"
    run_pretraining(PretrainConfig(**tiny, optimizer=optimizer, out_dir=str(split), stop_after=5))
    summary = run_pretraining(
        PretrainConfig(**tiny, optimizer=optimizer, out_dir=str(split), resume=True)
    )
    assert summary["steps"] == 12
    expected, resumed = final_weights(straight), final_weights(split)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    train_steps = [
        json.loads(line)["step"]
        for line in (split / "metrics.jsonl").read_text().splitlines()
        if '"kind": "train"' in line
    ]
    assert train_steps == [10, 12]  # logged every 10 steps and at the end, once each


def test_cli_pretrain_writes_metrics_plots_and_summary(tiny, tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    args = [
        "pretrain",
        "--model",
        tiny["model"],
        "--steps",
        "8",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--vocab-size",
        "512",
        "--corpus-bytes",
        "1500000",
        "--eval-every",
        "4",
        "--eval-batches",
        "2",
        "--rank",
        "8",
        "--update-proj-gap",
        "4",
        "--optimizer",
        "galore_adamw",
        "--out-dir",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "final eval loss" in printed and "optimizer state" in printed
    kinds = {json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert {"config", "train", "eval", "subspace"} <= kinds
    for name in ("loss.png", "stability.png", "summary.json", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0


def test_cli_pretrain_layerwise_matches_regular(tiny, tmp_path) -> None:
    # One process, accumulation 2 (low-rank sums between refreshes), no global clipping.
    settings = {**tiny, "steps": 6, "grad_accum": 2, "grad_clip": 0.0}
    settings.pop("progress")
    regular = tmp_path / "regular"
    run_pretraining(
        PretrainConfig(**settings, optimizer="galore_adamw", out_dir=str(regular), progress=False)
    )
    out = tmp_path / "layerwise"
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
    args = ["pretrain", *flags, "--optimizer=galore_adamw", f"--out-dir={out}", "--no-progress"]
    assert main([*args, "--layerwise"]) == 0
    # Every parameter stepped inside backward: the loop's optimizer.step() never ran.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mean_optimizer_step_seconds"] == 0.0
    expected, ours = final_weights(regular), final_weights(out)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="Invalid optimizer for layerwise: 'adamw'"):
        PretrainConfig(optimizer="adamw", layerwise=True)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("optimizer", "sgd", "optimizer: 'sgd'"),
        ("steps", 0, "steps: 0"),
        ("dtype", "float16", "dtype: 'float16'"),
        ("stop_after", -1, "stop_after: -1"),
    ],
)
def test_bad_pretrain_settings_raise(field: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PretrainConfig(**{field: value})


def test_summary_reports_handoffs_and_their_measured_cost(tiny, tmp_path) -> None:
    """The main job's hand-off line: layers, steps, projected parameters removed, eval-loss jump."""
    from lowrank_optim.train import format_summary

    out = tmp_path / "handoff"
    config = PretrainConfig(
        **{**tiny, "steps": 16, "update_proj_gap": 4},
        optimizer="welore_adamw",
        out_dir=str(out),
        handoff_start=0.5,
        handoff_trigger="step",
        target_reduction=0.8,
    )
    summary = run_pretraining(config)
    handoff = summary["handoff_summary"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    made = [r for r in records if r["kind"] == "handoff"]
    costs = [r for r in records if r["kind"] == "handoff_cost"]
    assert made and handoff["layers"] == len(made) == summary["handoffs"]
    assert handoff["steps"] == [8] and [c["step"] for c in costs] == [8]
    removed = sum(r["params_before"] - r["params_after"] for r in made)
    assert handoff["projected_parameters_removed"] == removed
    assert summary["parameters_start"] - summary["parameters_end"] == removed
    assert handoff["eval_loss_jump"] == pytest.approx(costs[0]["after"] - costs[0]["before"])
    assert f"{handoff['layers']} layers at step 8" in format_summary(summary)
