"""Our optimizers inside Hugging Face Trainer, accelerate and the torchrun example."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import check_torchrun, roundtrip

from lowrank_optim import (
    GaLoreAdamW,
    GaLoreAdamW8bit,
    HandoffConfig,
    ProjectionConfig,
    StabilityConfig,
    WeLoreAdamW,
)
from lowrank_optim.factorize import LowRankLinear
from lowrank_optim.factory import lowrank_param_groups
from lowrank_optim.train.models import build_llama, tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "torchrun_pretrain.py"
VOCAB = 64
PROJECTION = ProjectionConfig(rank=4, update_proj_gap=2, scale=0.5)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model() -> torch.nn.Module:
    config = tiny_llama_config(VOCAB, hidden=32, layers=1, heads=4, intermediate=64)
    return build_llama(config, seed=0)


class TokenDataset(torch.utils.data.Dataset):
    """Random token windows held in memory; labels are the inputs (causal LM)."""

    def __init__(self, count: int = 16, length: int = 8) -> None:
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (count, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def assert_same_weights(first: torch.nn.Module, second: torch.nn.Module, exact: bool) -> None:
    for (name, a), (other, b) in zip(
        first.named_parameters(), second.named_parameters(), strict=True
    ):
        assert name == other
        if exact:
            assert torch.equal(a, b), f"{name} differs"
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} differs")


# ---------------------------------------------------------------------------------- Trainer
def make_trainer(
    out: Path,
    optimizer_class: type,
    pattern: str,
    callbacks: list[Any] | None = None,
    projection: ProjectionConfig = PROJECTION,
    **extra: Any,
) -> Any:
    from transformers import Trainer, TrainingArguments

    model = tiny_model()
    groups = lowrank_param_groups(model, pattern, projection)
    if optimizer_class is WeLoreAdamW:
        extra = {"model": model, **extra}
    optimizer = optimizer_class(groups, lr=1e-2, weight_decay=0.01, **extra)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + 0.2 * step))
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        save_strategy="steps",
        save_steps=3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=TokenDataset(),
        optimizers=(optimizer, scheduler),
        callbacks=callbacks,
    )


@pytest.mark.parametrize(
    ("optimizer_class", "pattern"),
    [(GaLoreAdamW, "attn"), (GaLoreAdamW8bit, "mlp"), (WeLoreAdamW, "all-linear")],
)
def test_trainer_resume_from_checkpoint_matches_uninterrupted(
    tmp_path, optimizer_class, pattern
) -> None:
    uninterrupted = make_trainer(tmp_path, optimizer_class, pattern)
    uninterrupted.train()
    checkpoint = tmp_path / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file()
    # What Trainer does on resume: our state must load with weights_only=True.
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert any("exp_avg" in str(entry) for entry in saved["state"].values())

    resumed = make_trainer(tmp_path / "resumed", optimizer_class, pattern)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == uninterrupted.state.global_step == 6
    assert_same_weights(uninterrupted.model, resumed.model, exact=True)
    assert not torch.equal(uninterrupted.model.lm_head.weight, tiny_model().lm_head.weight)


def test_welore_handoff_callback_inside_trainer_and_resume(tmp_path) -> None:
    from lowrank_optim.integrations.huggingface import WeLoreHandoffCallback, prepare_resume

    # A refresh every step makes layers stable from step 2, so hand-offs precede checkpoint-3.
    eager = {
        "stability": StabilityConfig(policy="fixed", threshold=0.01, patience=1),
        "handoff": HandoffConfig(start_step=2, target_reduction=0.7, min_ratio=0.4, check_every=2),
        "projection": ProjectionConfig(rank=4, update_proj_gap=1, scale=0.5),
    }
    trainer = make_trainer(
        tmp_path, WeLoreAdamW, "attn-mlp", callbacks=[WeLoreHandoffCallback()], **eager
    )
    trainer.train()
    records = [entry for entry in trainer.state.log_history if "welore_handoff" in entry]
    assert records, "no hand-off happened inside Trainer"
    assert any(isinstance(module, LowRankLinear) for module in trainer.model.modules())
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))

    # Resume from a checkpoint taken after hand-offs: the dense model gets its factors back.
    checkpoint = tmp_path / "checkpoint-3"
    assert torch.load(checkpoint / "optimizer.pt", weights_only=True)["welore"]["plan"]
    resumed = make_trainer(
        tmp_path / "resumed", WeLoreAdamW, "attn-mlp", callbacks=[WeLoreHandoffCallback()], **eager
    )
    prepare_resume(resumed.model, resumed.optimizer, checkpoint)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert_same_weights(trainer.model, resumed.model, exact=True)


# ------------------------------------------------------------------------------- accelerate
@pytest.mark.parametrize("optimizer_class", [GaLoreAdamW, WeLoreAdamW])
def test_accelerate_prepare_trains_and_state_dict_round_trips(optimizer_class) -> None:
    from accelerate import Accelerator

    loader = torch.utils.data.DataLoader(TokenDataset(), batch_size=4, shuffle=False)

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = tiny_model()
        groups = lowrank_param_groups(model, "attn-mlp", PROJECTION)
        extra = {"model": model} if optimizer_class is WeLoreAdamW else {}
        return model, optimizer_class(groups, lr=1e-2, **extra)

    def train(model, optimizer, batches, backward) -> None:
        for batch in batches:
            backward(model(**batch).loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    reference, reference_optimizer = build()
    train(reference, reference_optimizer, list(loader), lambda loss: loss.backward())

    accelerator = Accelerator(cpu=True)
    model, optimizer = build()
    model, optimizer, prepared = accelerator.prepare(model, optimizer, loader)
    batches = list(prepared)
    train(model, optimizer, batches[:2], accelerator.backward)
    saved = roundtrip({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    copy_model, copy_optimizer = build()
    copy_model, copy_optimizer = accelerator.prepare(copy_model, copy_optimizer)
    copy_model.load_state_dict(saved["model"])
    copy_optimizer.load_state_dict(saved["optimizer"])
    train(model, optimizer, batches[2:], accelerator.backward)
    train(copy_model, copy_optimizer, batches[2:], accelerator.backward)
    assert_same_weights(model, copy_model, exact=True)
    assert_same_weights(reference, model, exact=False)


# --------------------------------------------------------------------------- torchrun example
TINY_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def example_setup(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny model JSON, a private corpus cache and arguments for a seconds-long run."""
    folder = tmp_path_factory.mktemp("torchrun")
    config = folder / "tiny.json"
    config.write_text(json.dumps(TINY_LLAMA))
    # Global batch 8: one process runs 4 micro-batches of 2, two processes 2 each.
    args = [
        *("--model", str(config), "--optimizer", "galore_adamw", "--steps", "4"),
        *("--batch-size", "8", "--micro-batch-size", "2", "--seq-len", "16", "--rank", "4"),
        *("--update-proj-gap", "2", "--vocab-size", "300", "--corpus-bytes", "100000"),
        *("--eval-every", "100", "--lr", "0.01"),
    ]
    return folder, args


def run_example_here(monkeypatch, folder: Path, args: list[str], out: str) -> list[float]:
    """``main()`` of the example in this process (saves an interpreter start-up)."""
    spec = importlib.util.spec_from_file_location("torchrun_pretrain", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("LOWRANK_OPTIM_CACHE", str(folder / "cache"))
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), *args, "--out-dir", str(folder / out)])
    module.main()
    return train_losses(folder / out)


def train_losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if record["kind"] == "train"]


def test_torchrun_two_processes_match_one_process(monkeypatch, example_setup) -> None:
    folder, args = example_setup
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    one = run_example_here(monkeypatch, folder, args, "one")
    command = [
        sys.executable,
        *("-m", "torch.distributed.run", "--nproc_per_node", "2"),
        "--standalone",  # torchrun binds a free port itself: no pick-then-bind race
        str(EXAMPLE),
        *args,
        *("--out-dir", str(folder / "two")),
    ]
    env = {**os.environ, "LOWRANK_OPTIM_CACHE": str(folder / "cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    check_torchrun(result)
    two = train_losses(folder / "two")
    assert len(one) == len(two) == 4
    assert one[-1] < one[0]  # it trains
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)


def test_torchrun_example_layerwise_matches_regular(monkeypatch, example_setup) -> None:
    folder, args = example_setup
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    no_clip = [*args, "--grad-clip", "0"]
    regular = run_example_here(monkeypatch, folder, no_clip, "regular")
    layerwise = run_example_here(monkeypatch, folder, [*no_clip, "--layerwise"], "layerwise")
    assert layerwise == pytest.approx(regular, rel=1e-5, abs=1e-6)

    # Under torchrun (DDP, 2 ranks) each parameter steps in DDP's communication hook: the same
    # curve as one process stepping regularly (2 processes x 2 micro-batches of 2 = 4 x 2).
    command = [
        sys.executable,
        *("-m", "torch.distributed.run", "--nproc_per_node", "2"),
        "--standalone",  # torchrun binds a free port itself: no pick-then-bind race
        str(EXAMPLE),
        *no_clip,
        "--layerwise",
        *("--out-dir", str(folder / "layerwise_ddp")),
    ]
    env = {**os.environ, "LOWRANK_OPTIM_CACHE": str(folder / "cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    check_torchrun(result)
    assert train_losses(folder / "layerwise_ddp") == pytest.approx(regular, rel=1e-5, abs=1e-6)


def test_torchrun_example_fsdp_hands_off_and_resumes(example_setup) -> None:
    """``--fsdp`` with WeLoreAdamW hands layers off in place (its window: start at 0.4 of the
    4 steps, every qualifying layer by 0.6: the check at step 2), prints them on rank 0, and
    its DCP checkpoint taken after them resumes bit for bit in a new torchrun."""
    folder, args = example_setup
    checkpoint = folder / "fsdp_ckpt"
    common = [
        sys.executable,
        *("-m", "torch.distributed.run", "--nproc_per_node", "2"),
        "--standalone",  # torchrun binds a free port itself: no pick-then-bind race
        str(EXAMPLE),
        "--fsdp",
        *args,
        *("--optimizer", "welore_adamw", "--checkpoint-dir", str(checkpoint)),
    ]
    env = {**os.environ, "LOWRANK_OPTIM_CACHE": str(folder / "cache"), "OMP_NUM_THREADS": "1"}
    straight = [*common, "--save-at", "2", "--out-dir", str(folder / "fsdp")]
    result = subprocess.run(straight, env=env, capture_output=True, text=True, timeout=900)
    check_torchrun(result)
    losses = train_losses(folder / "fsdp")
    assert len(losses) == 4 and losses[-1] < losses[0]
    lines = (folder / "fsdp" / "metrics.jsonl").read_text().splitlines()
    handoffs = [r for r in map(json.loads, lines) if r["kind"] == "handoff"]
    assert handoffs and {r["step"] for r in handoffs} == {2}, handoffs
    printed = [line for line in result.stdout.splitlines() if "handed off" in line]
    assert len(printed) == len(handoffs) and printed[0].startswith("step 2: handed off model.")

    resume = [*common, "--resume", "--out-dir", str(folder / "fsdp_resumed")]
    result = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=900)
    check_torchrun(result)
    assert train_losses(folder / "fsdp_resumed") == losses[2:]


def test_torchrun_example_fsdp_flag_trains_on_two_processes(example_setup) -> None:
    """FSDP2 on 2 ranks, regular and ``--layerwise`` (each parameter steps in the hook FSDP2
    fires after its reduce-scatter): the same curve."""
    folder, args = example_setup
    env = {**os.environ, "LOWRANK_OPTIM_CACHE": str(folder / "cache"), "OMP_NUM_THREADS": "1"}
    curves = {}
    for name, extra in (("fsdp_regular", []), ("fsdp_layerwise", ["--layerwise"])):
        command = [
            sys.executable,
            *("-m", "torch.distributed.run", "--nproc_per_node", "2"),
            "--standalone",  # torchrun binds a free port itself: no pick-then-bind race
            str(EXAMPLE),
            "--fsdp",
            *args,
            *("--grad-clip", "0", "--optimizer", "galore_adamw", *extra),
            *("--out-dir", str(folder / name)),
        ]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        check_torchrun(result)
        curves[name] = train_losses(folder / name)
    losses = curves["fsdp_regular"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert curves["fsdp_layerwise"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
