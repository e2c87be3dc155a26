"""Checkpoints of a ``lowrank-optim pretrain`` run: save, restore, and what resuming reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_optim.checkpoint import atomic_save, load_checkpoint
from lowrank_optim.train.config import PretrainConfig
from lowrank_optim.train.errors import ResumeError

__all__ = [
    "PAYLOAD_KEYS",
    "finished_summary",
    "load_run",
    "no_checkpoint_message",
    "restore_run",
    "save_run",
]

#: What every :func:`save_run` payload holds; newer ones also hold ``settings``.
PAYLOAD_KEYS = ("step", "optimizer", "model", "scheduler", "batches", "rng")
#: What loading a readable payload into this run's objects raises when it does not fit them.
_UNFITTING = (KeyError, TypeError, ValueError, RuntimeError, IndexError)


def save_run(
    path: Path,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    batches: Any,
    step: int,
    settings: dict[str, Any] | None = None,
) -> None:
    """Atomically save everything a resumed run needs to continue bit for bit.

    ``settings`` (:func:`lowrank_optim.train.resume.run_settings`) lets a resumed run refuse
    changed settings by name instead of failing, or silently differing, later.
    """
    # Optimizer first in the payload order matters only for readers; on load it is restored
    # first so that WeLore hand-offs re-shape the model before its weights are loaded.
    atomic_save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "model": model.state_dict(),
            "scheduler": scheduler.state_dict(),
            "batches": batches.state_dict(),
            "rng": torch.get_rng_state(),
            "settings": settings,
        },
        path,
    )


def no_checkpoint_message(config: PretrainConfig) -> str:
    """The error of ``--resume`` without a checkpoint in ``config.out_dir``."""
    path = Path(config.out_dir) / "checkpoint.pt"
    return (
        f"Cannot resume: no checkpoint at {path}; to start a new run in {config.out_dir}, "
        "run without --resume (resume=False)"
    )


def finished_summary(out: Path, step: int, last_step: int) -> dict[str, Any] | None:
    """The recorded summary of a run whose checkpoint is already at ``last_step``, else None.

    Resuming such a run has nothing to train; it reports the run and writes nothing.
    """
    path = out / "summary.json"
    if step < last_step or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: the resumed run evaluates and writes a new one
    if not isinstance(summary, dict):
        return None
    return {**summary, "already_finished": True, "checkpoint_step": step}


def _first_line(error: BaseException) -> str:
    """``Type: first sentence`` of an error (torch's messages run over many lines)."""
    text = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_run(path: Path, config: PretrainConfig) -> dict[str, Any]:
    """The :func:`save_run` payload at ``path``; ``FileNotFoundError`` if there is none.

    A file that is empty, truncated, garbage or not such a payload raises :class:`ResumeError`
    naming it, instead of torch's ``EOFError``, ``RuntimeError`` or a ``KeyError`` later.
    """
    try:
        payload = load_checkpoint(path, missing=no_checkpoint_message(config))
    except FileNotFoundError:
        raise
    # Only the file is read here, and torch.load raises whatever its decoders meet in a bad
    # one: EOFError (empty), RuntimeError (a truncated zip), UnpicklingError or struct.error
    # (garbage), OSError (unreadable). Each means the same: this file is no checkpoint.
    except Exception as error:
        raise ResumeError(
            f"Cannot resume: {path} is not a readable checkpoint ({_first_line(error)}); it is "
            "empty, truncated or another kind of file: restore it from a copy, or start a new "
            "run without --resume"
        ) from None
    missing = [key for key in PAYLOAD_KEYS if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise ResumeError(
            f"Cannot resume: {path} is not a checkpoint of lowrank-optim pretrain (it has no "
            f"{', '.join(missing)}); restore it from a copy, or start a new run without --resume"
        )
    return payload


def restore_run(
    payload: dict[str, Any],
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    batches: Any,
    path: Path | None = None,
) -> int:
    """Load a :func:`save_run` payload into the run's objects; returns its step.

    A payload that does not fit them (saved by another optimizer or model, e.g. before the
    settings were recorded) raises :class:`ResumeError` naming ``path`` and the mismatch.
    """
    try:
        optimizer.load_state_dict(payload["optimizer"])
        model.load_state_dict(payload["model"])
        scheduler.load_state_dict(payload["scheduler"])
        batches.load_state_dict(payload["batches"])
        torch.set_rng_state(payload["rng"])
        return int(payload["step"])
    except _UNFITTING as error:
        raise ResumeError(
            f"Cannot resume from {path or 'the checkpoint'}: it does not fit this run "
            f"({_first_line(error)}); resume with the settings it was saved with, or start a new "
            "run without --resume"
        ) from None
