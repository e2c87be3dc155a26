"""Data-free recovery of a compressed encoder by distillation (used by the benchmarks only).

After WeLore's data-free compression (Jaiswal et al., "From GaLore to WeLore", 2024), the
dense model's mean-pooled sentence embeddings are distilled into the compressed one,
``L = 1 - cos(e_student, e_teacher)``, on docstrings harvested from the Python standard library
(no download, like the built-in pretraining corpus). Training only the low-rank components is
:func:`lowrank_optim.factorize.trainable_lrc`; this file holds the corpus and the loop.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_optim.train.data import stdlib_corpus_files

__all__ = [
    "distill_embeddings",
    "embedding_cosine",
    "mean_pooled",
    "sentence_embeddings",
    "stdlib_docstrings",
]


def stdlib_docstrings(
    max_files: int | None = None, min_chars: int = 40, max_chars: int = 600
) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` first paragraphs of the standard library's docstrings.

    Parsed with :mod:`ast` (nothing is imported, so no module's side effects run). Whole files
    go to one split (every fifth file is held out), so held-out text is not a near-copy of a
    training sentence from the same module.
    """
    train: list[str] = []
    held_out: list[str] = []
    seen: set[str] = set()
    files = [p for p in stdlib_corpus_files() if "test" not in p.parts and p.name != "__main__.py"]
    for index, path in enumerate(files[:max_files]):
        target = held_out if index % 5 == 0 else train
        for text in _docstrings_of(path):
            if min_chars <= len(text) <= max_chars and text not in seen:
                seen.add(text)
                target.append(text)
    return train, held_out


def _docstrings_of(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return []  # a few stdlib files are deliberately invalid (lib2to3 fixtures and the like)
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef))]
    texts = []
    for node in nodes:
        doc = ast.get_docstring(node)
        if doc:
            texts.append(re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip())
    return texts


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states where ``mask`` is 1 (sentence-transformers' pooling)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def sentence_embeddings(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 128,
    batch_size: int = 64,
) -> torch.Tensor:
    """Mean-pooled last hidden states of ``texts``, without gradients."""
    outputs = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            outputs.append(mean_pooled(hidden, batch["attention_mask"]))
    return torch.cat(outputs)


def embedding_cosine(
    student: nn.Module,
    teacher_embeddings: torch.Tensor,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 128,
) -> float:
    """Mean cosine similarity of the student's embeddings of ``texts`` to the teacher's."""
    training = student.training
    student.eval()
    embeddings = sentence_embeddings(student, tokenizer, texts, max_length)
    student.train(training)
    return float(F.cosine_similarity(embeddings, teacher_embeddings, dim=-1).mean())


def distill_embeddings(
    student: nn.Module,
    teacher_embeddings: torch.Tensor,
    tokenizer: Any,
    texts: Sequence[str],
    optimizer: torch.optim.Optimizer,
    steps: int,
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 0,
    scheduler: Any = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Minimize ``1 - cos(e_student, e_teacher)`` over random batches of ``texts``.

    ``teacher_embeddings[i]`` is the dense model's embedding of ``texts[i]``, computed once up
    front: the teacher never runs inside the loop. The student runs in eval mode (no dropout):
    it is matching a deterministic target, and dropout noise only slows a short recovery.
    Returns the loss of every step.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"Invalid steps/batch_size: {steps}/{batch_size}; both must be >= 1")
    if len(texts) != len(teacher_embeddings):
        raise ValueError(
            f"{len(texts)} texts but {len(teacher_embeddings)} teacher embeddings; must match"
        )
    generator = random.Random(seed)
    order: list[int] = []
    losses = []
    student.eval()
    for step in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(texts)))
            generator.shuffle(fresh)
            order += fresh
        chosen, order = order[:batch_size], order[batch_size:]
        batch = tokenizer(
            [texts[i] for i in chosen],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        embeddings = mean_pooled(student(**batch).last_hidden_state, batch["attention_mask"])
        loss = 1.0 - F.cosine_similarity(embeddings, teacher_embeddings[chosen], dim=-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
