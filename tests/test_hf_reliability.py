"""Trainer and accelerate after hand-offs: resumes that continue bit for bit, or refuse."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_integrations import (
    PROJECTION,
    TokenDataset,
    assert_same_weights,
    make_trainer,
    tiny_model,
)

from lowrank_optim import (
    GaLoreAdamW,
    HandoffConfig,
    ProjectionConfig,
    StabilityConfig,
    WeLoreAdamW,
)
from lowrank_optim.errors import CheckpointMismatchError
from lowrank_optim.factorize import LowRankLinear
from lowrank_optim.factory import lowrank_param_groups
from lowrank_optim.integrations.huggingface import (
    WeLoreHandoffCallback,
    prepare_resume,
    unwrap_optimizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")

#: A refresh every step makes layers stable from step 2: hand-offs at step 2, before a save at 3.
EAGER = {
    "stability": StabilityConfig(policy="fixed", threshold=0.01, patience=1),
    "handoff": HandoffConfig(start_step=2, target_reduction=0.7, min_ratio=0.4, check_every=2),
    "projection": ProjectionConfig(rank=4, update_proj_gap=1, scale=0.5),
}


def welore_trainer(out: Path, callbacks: list[Any] | None = None) -> Any:
    """make_trainer's WeLoreAdamW run (6 steps, saves at 3 and 6) with EAGER hand-offs."""
    return make_trainer(out, WeLoreAdamW, "attn-mlp", callbacks=callbacks, **EAGER)


@pytest.fixture(scope="module")
def handed_off(tmp_path_factory) -> tuple[Any, Path]:
    """An uninterrupted run with hand-offs at step 2, and its checkpoint-3 taken after them."""
    out = tmp_path_factory.mktemp("handed_off")
    trainer = welore_trainer(out, callbacks=[WeLoreHandoffCallback()])
    trainer.train()
    checkpoint = out / "checkpoint-3"
    assert torch.load(checkpoint / "optimizer.pt", weights_only=True)["welore"]["plan"]
    return trainer, checkpoint


# ------------------------------------------------------------------------ Trainer resume (1)
def test_trainer_resume_after_handoffs_without_prepare_resume_matches_uninterrupted(
    tmp_path, handed_off
) -> None:
    uninterrupted, checkpoint = handed_off
    resumed = welore_trainer(tmp_path, callbacks=[WeLoreHandoffCallback()])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    assert any(isinstance(module, LowRankLinear) for module in resumed.model.modules())
    assert_same_weights(uninterrupted.model, resumed.model, exact=True)


def test_trainer_resume_refuses_factor_weights_without_optimizer_state(
    tmp_path, handed_off
) -> None:
    """save_only_model-like checkpoint: the weights hold factors that nothing re-applies."""
    _, checkpoint = handed_off
    copy = shutil.copytree(checkpoint, tmp_path / "checkpoint-3")
    (copy / "optimizer.pt").unlink()
    resumed = welore_trainer(tmp_path / "out", callbacks=[WeLoreHandoffCallback()])
    with pytest.raises(CheckpointMismatchError, match="dense here"):
        resumed.train(resume_from_checkpoint=str(copy))


def test_trainer_resume_refuses_callback_added_after_init(tmp_path, handed_off) -> None:
    _, checkpoint = handed_off
    resumed = welore_trainer(tmp_path)
    resumed.add_callback(WeLoreHandoffCallback())
    with pytest.raises(RuntimeError, match="did not see the model's weights load"):
        resumed.train(resume_from_checkpoint=str(checkpoint))


def test_prepare_resume_refuses_folder_without_optimizer_state(tmp_path) -> None:
    model = tiny_model()
    optimizer = WeLoreAdamW(lowrank_param_groups(model, "attn-mlp", PROJECTION), model=model)
    with pytest.raises(FileNotFoundError, match=r"optimizer\.pt or optimizer\.bin"):
        prepare_resume(model, optimizer, tmp_path)


# ------------------------------------------------------------------------ accelerate (2)
def accelerate_run(accelerator: Any) -> tuple[torch.nn.Module, Any, Any]:
    """A WeLoreAdamW run (EAGER hand-offs, a decaying LR) prepared by ``accelerator``."""
    model = tiny_model()
    groups = lowrank_param_groups(model, "attn-mlp", EAGER["projection"])
    optimizer = WeLoreAdamW(
        groups, lr=1e-2, model=model, stability=EAGER["stability"], handoff=EAGER["handoff"]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + 0.2 * step))
    return accelerator.prepare(model, optimizer, scheduler)


def accelerate_steps(accelerator: Any, run: tuple[Any, Any, Any], batches: list[Any]) -> None:
    """Micro-batches under ``accelerator.accumulate``, a hand-off check after each."""
    from lowrank_optim.integrations.accelerate import maybe_handoff

    model, optimizer, scheduler = run
    for batch in batches:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        maybe_handoff(optimizer, model)


@pytest.mark.parametrize("reapply", ["register_handoff_resume", "prepare_resume"])
def test_accelerate_handoff_save_load_state_continues_bit_for_bit(tmp_path, reapply) -> None:
    from accelerate import Accelerator

    from lowrank_optim.integrations.accelerate import register_handoff_resume

    # 8 micro-batches of 2, accumulated in pairs: 4 steps, hand-offs at step 2, saved after 3.
    batches = list(torch.utils.data.DataLoader(TokenDataset(), batch_size=2))
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    straight = accelerate_run(accelerator)
    accelerate_steps(accelerator, straight, batches[:6])
    assert unwrap_optimizer(straight[1]).plan, "no hand-off before the save"
    accelerator.save_state(str(tmp_path))
    accelerate_steps(accelerator, straight, batches[6:])

    fresh = Accelerator(cpu=True, gradient_accumulation_steps=2)
    resumed = accelerate_run(fresh)
    if reapply == "prepare_resume":
        prepare_resume(resumed[0], resumed[1], tmp_path)
    else:
        register_handoff_resume(fresh, resumed[0], resumed[1])
    fresh.load_state(str(tmp_path))
    accelerate_steps(fresh, resumed, batches[6:])
    assert_same_weights(straight[0], resumed[0], exact=True)


def test_accelerate_handoff_helpers_refuse_what_cannot_work() -> None:
    from lowrank_optim.integrations.accelerate import maybe_handoff, register_handoff_resume

    model = tiny_model()
    galore = GaLoreAdamW(lowrank_param_groups(model, "attn-mlp", PROJECTION))
    with pytest.raises(TypeError, match="need a WeLoreAdamW.*got GaLoreAdamW"):
        maybe_handoff(galore, model)
    welore = WeLoreAdamW(lowrank_param_groups(model, "attn-mlp", PROJECTION), model=model)
    with pytest.raises(RuntimeError, match="one process only, got 2"):
        register_handoff_resume(SimpleNamespace(num_processes=2), model, welore)


# ------------------------------------------------- Trainer-built optimizer, no groups (3)
def cls_and_kwargs_trainer(out: Path, model: torch.nn.Module, kwargs: dict[str, Any]) -> Any:
    """A Trainer that builds WeLoreAdamW itself from ``optimizer_cls_and_kwargs``."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True, disable_tqdm=True)
    return Trainer(
        model=model,
        args=args,
        train_dataset=TokenDataset(),
        optimizer_cls_and_kwargs=(WeLoreAdamW, kwargs),
    )


def test_trainer_optimizer_cls_and_kwargs_without_params_warns_nothing_projected(
    tmp_path,
) -> None:
    trainer = cls_and_kwargs_trainer(tmp_path, tiny_model(), {"lr": 1e-2})
    with pytest.warns(UserWarning, match="projected"):
        trainer.create_optimizer()


def test_trainer_optimizer_cls_and_kwargs_with_params_projects(tmp_path) -> None:
    """The remedy: ``params`` from lowrank_param_groups, which Trainer passes on as the groups.

    (A ``"model"`` key would not reach WeLoreAdamW: Trainer passes it as the params, for LOMO.)
    """
    model = tiny_model()
    groups = lowrank_param_groups(model, "attn-mlp", PROJECTION)
    trainer = cls_and_kwargs_trainer(tmp_path, model, {"params": groups, "lr": 1e-2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = unwrap_optimizer(trainer.create_optimizer())
    assert any(group.get("rank") is not None for group in optimizer.param_groups)
    assert not [w for w in caught if "projected" in str(w.message)]
