"""What a resumed pretraining run may change: the settings guard of ``--resume``.

A checkpoint records the settings of the run that wrote it (:func:`run_settings`). Resuming
compares them field by field with the settings given now: a change that would alter what the
run trains or measures is refused, naming the flag and both values (otherwise ``--steps`` would
silently reshape the schedule and the hand-off window, ``--lr`` would be overridden by the
scheduler's restored ``base_lrs``, and the log's ``config`` record would describe another run);
the few harmless changes are returned so that the run records them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lowrank_optim.train.config import PretrainConfig
from lowrank_optim.train.errors import ResumeError
from lowrank_optim.train.records import json_safe, read_jsonl_records

__all__ = ["RESUME_MAY_CHANGE", "check_resume_settings", "run_settings", "saved_settings"]

#: The settings a resumed run may change, each because it alters neither the weights, the
#: optimizer state, the learning-rate schedule nor what an evaluation measures:
RESUME_MAY_CHANGE = frozenset(
    {
        "resume",  # the flag itself
        "stop_after",  # where this invocation stops; the schedule still spans --steps
        "progress",  # the progress bar only
        "out_dir",  # the checkpoint was found there, however the folder is spelled now
        # When checkpoint.pt is written: saving reads the state and draws no random numbers.
        "checkpoint_every",
        # When the fixed validation batches are evaluated: under no_grad, in eval mode, with no
        # random numbers drawn, so training continues bit for bit. (--eval-batches is refused:
        # it changes the validation set, and losses before and after would not compare.)
        "eval_every",
    }
)
#: Fields with no flag of their own; every other field ``name`` is ``--name-with-dashes``.
_NO_FLAG = {"extra": "extra (PretrainConfig.extra)", "progress": "--no-progress"}


def _flag(name: str) -> str:
    return _NO_FLAG.get(name, "--" + name.replace("_", "-"))


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _local_file(value: Any) -> Any:
    """An existing local path as an absolute one, so that ``tiny.json`` and ``./tiny.json``
    (or the same file named from another working directory) compare equal; else ``value``."""
    if isinstance(value, str) and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def run_settings(config: PretrainConfig) -> dict[str, Any]:
    """``config`` as plain JSON values (what a checkpoint stores), model and dataset files as
    absolute paths."""
    values = json.loads(json.dumps(json_safe(dataclasses.asdict(config)), default=str))
    for name in ("model", "dataset"):
        values[name] = _local_file(values[name])
    return values


def saved_settings(payload: Mapping[str, Any], metrics: Path) -> dict[str, Any] | None:
    """The settings a checkpoint was saved with; for checkpoints older than that record, the
    ``config`` record of the run's ``metrics.jsonl``; None if neither exists."""
    if isinstance(payload.get("settings"), dict):
        return dict(payload["settings"])
    names = {item.name for item in dataclasses.fields(PretrainConfig)}
    for _, record in read_jsonl_records(metrics):
        if record is not None and record.get("kind") == "config":
            values = {name: value for name, value in record.items() if name in names}
            for name in ("model", "dataset"):
                if name in values:
                    values[name] = _local_file(values[name])
            return values
    return None


def check_resume_settings(
    saved: Mapping[str, Any] | None, config: PretrainConfig
) -> dict[str, dict[str, Any]]:
    """The harmless settings changed since the checkpoint, ``{name: {"checkpoint", "now"}}``.

    Raises :class:`ResumeError` naming every other change (flag, checkpoint value, value now).
    Fields the checkpoint does not record (added to ``PretrainConfig`` since) are not compared.
    """
    if saved is None:
        return {}
    now = run_settings(config)
    changed = {
        name: (saved[name], value)
        for name, value in now.items()
        if name in saved and saved[name] != value
    }
    refused = [
        f"{_flag(name)} changed on resume: checkpoint {_show(old)}, now {_show(new)}"
        for name, (old, new) in changed.items()
        if name not in RESUME_MAY_CHANGE
    ]
    if refused:
        values = "value" if len(refused) == 1 else "values"
        raise ResumeError(
            "; ".join(refused) + f"; resume with the checkpoint's {values} or start a new run"
        )
    return {
        name: {"checkpoint": old, "now": new}
        for name, (old, new) in changed.items()
        if name != "resume"
    }
