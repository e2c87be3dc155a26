"""The built-in corpus, local and Hugging Face datasets, split and cached as token streams.

The built-in corpus is the Python standard library's own source: about 30 MB of real text that
exists wherever Python does, so every command and test runs offline. Documents go to the
training or the validation split whole (every 20th is held out), so validation text is unseen.
Encoded corpora are cached on disk under a key derived from their content, tokenizer and
vocabulary size, so a second run starts in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowrank_optim.checkpoint import atomic_save
from lowrank_optim.train.cache import atomic_write_text, default_cache_dir
from lowrank_optim.train.errors import NotEnoughDataError
from lowrank_optim.train.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    encode_documents,
    train_bpe_tokenizer,
)

__all__ = [
    "LOCAL_SUFFIXES",
    "VALIDATION_EVERY",
    "Corpus",
    "build_corpus",
    "load_hf_dataset",
    "load_local_dataset",
    "looks_local",
    "split_documents",
    "stdlib_corpus_files",
]

VALIDATION_EVERY = 20
LOCAL_SUFFIXES = (".txt", ".py", ".md")
# Bump when the cache layout or the encoding changes, so stale caches are never reused.
_CACHE_VERSION = 2


# --------------------------------------------------------------------------- documents


def stdlib_corpus_files(max_bytes: int | None = None) -> list[Path]:
    """The standard library's ``.py`` files in sorted order, capped at ``max_bytes`` in total.

    The first file is always kept, so a tiny cap still yields a non-empty corpus.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise FileNotFoundError(f"No Python source files under {root}: no built-in corpus")
    chosen: list[Path] = []
    total = 0
    for path in files:
        size = path.stat().st_size
        if max_bytes is not None and chosen and total + size > max_bytes:
            break
        chosen.append(path)
        total += size
    return chosen


def _read(path: Path) -> str:
    # A few stdlib test files are deliberately not UTF-8; replacing keeps them usable text.
    return path.read_text(encoding="utf-8", errors="replace")


def _read_jsonl(path: Path) -> list[str]:
    documents = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{number}: each JSONL line needs a string 'text' field")
        documents.append(record["text"])
    return documents


def load_local_dataset(path: str | os.PathLike[str]) -> list[str]:
    """Documents from a ``.txt``/``.py``/``.md`` file, a directory of them, or JSONL.

    A JSONL file (``.jsonl``) holds one object per line with a string ``"text"`` field. A
    directory is read recursively in sorted order; each file is one document.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise ValueError(f"Dataset directory {path} has no .txt, .py or .md files")
        return [_read(p) for p in files]
    if not path.is_file():
        raise ValueError(f"Dataset {str(path)!r} is neither a file nor a directory")
    if path.suffix == ".jsonl":
        documents = _read_jsonl(path)
    elif path.suffix in LOCAL_SUFFIXES:
        documents = [_read(path)]
    else:
        raise ValueError(
            f"Unsupported dataset file {path.name!r}; use .jsonl (a 'text' field per line), "
            ".txt, .py, .md, or a directory of such text files"
        )
    if not documents:
        raise ValueError(f"Dataset {path} holds no documents")
    return documents


def load_hf_dataset(
    name: str,
    split: str = "train",
    text_field: str = "text",
    streaming: bool = True,
    max_documents: int = 10_000,
    **kwargs: Any,
) -> list[str]:
    """Up to ``max_documents`` texts of a Hugging Face dataset (needs a network or HF cache).

    ``kwargs`` go to ``datasets.load_dataset`` (e.g. ``name="wikitext-2-raw-v1"``).
    Streaming reads only the documents used instead of downloading the whole dataset.
    """
    import datasets

    if max_documents < 1:
        raise ValueError(f"Invalid max_documents: {max_documents}; must be positive")
    try:
        dataset = datasets.load_dataset(name, split=split, streaming=streaming, **kwargs)
        documents: list[str] = []
        for record in dataset:
            if text_field not in record:
                raise ValueError(
                    f"Dataset {name!r} has no field {text_field!r}; fields: {sorted(record)}"
                )
            documents.append(str(record[text_field]))
            if len(documents) >= max_documents:
                break
    except ValueError:
        raise
    except Exception as error:  # the hub client raises many types; all mean "cannot load"
        raise RuntimeError(
            f"Could not load Hugging Face dataset {name!r} (split {split!r}): "
            f"{type(error).__name__}: {error}. Offline, use the built-in corpus or pass a local "
            ".txt/.jsonl file or directory as the dataset instead."
        ) from error
    if not documents:
        raise ValueError(f"Hugging Face dataset {name!r} split {split!r} is empty")
    return documents


def split_documents(
    documents: Sequence[str], every: int = VALIDATION_EVERY
) -> tuple[list[str], list[str]]:
    """``(train, validation)``: every ``every``-th document (index 1, 1+every, ...) validates.

    Starting at index 1 rather than 0 keeps a two-document corpus splittable.
    """
    if len(documents) < 2:
        raise NotEnoughDataError(
            f"Dataset has {len(documents)} document(s); need at least 2 to split off validation"
        )
    validation = [d for i, d in enumerate(documents) if i % every == 1]
    training = [d for i, d in enumerate(documents) if i % every != 1]
    return training, validation



# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    """A tokenizer with its encoded training and validation token streams."""

    tokenizer: Tokenizer
    train_tokens: torch.Tensor
    val_tokens: torch.Tensor
    description: str


def looks_local(dataset: str) -> bool:
    """Whether ``dataset`` names a local path (by its prefix or suffix), not a hub dataset.

    A mistyped local path must fail at once, not after the hub client's retries.
    """
    return dataset.startswith((".", "/", "~")) or dataset.endswith((".jsonl", *LOCAL_SUFFIXES))


def _cap(documents: list[str], max_bytes: int | None) -> list[str]:
    if max_bytes is None:
        return documents
    kept: list[str] = []
    total = 0
    for document in documents:
        size = len(document.encode("utf-8"))
        if kept and total + size > max_bytes:
            break
        kept.append(document)
        total += size
    return kept


def _documents(
    dataset: str | os.PathLike[str] | None, max_bytes: int | None
) -> tuple[list[str], str]:
    """``(documents, description)`` of the built-in corpus, a local path or a hub dataset."""
    if dataset is None:
        files = stdlib_corpus_files(max_bytes)
        description = (
            f"Python {sysconfig.get_python_version()} standard library, {len(files)} files"
        )
        return [_read(p) for p in files], description
    dataset = str(dataset)
    if Path(dataset).expanduser().exists() or looks_local(dataset):
        documents = _cap(load_local_dataset(dataset), max_bytes)
        return documents, f"{dataset}, {len(documents)} documents"
    documents = _cap(load_hf_dataset(dataset), max_bytes)
    return documents, f"Hugging Face {dataset}, {len(documents)} documents"


def _fingerprint(documents: Sequence[str]) -> str:
    # Content, not paths or mtimes: edits anywhere (or another Python version) change the key.
    digest = hashlib.sha256()
    for document in documents:
        data = document.encode("utf-8", errors="replace")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _load_tokens(path: Path) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        tokens = torch.load(path, weights_only=True)
    except Exception:  # an unreadable cache is rebuilt, never fatal
        return None
    if not isinstance(tokens, dict):
        return None
    valid = all(isinstance(tokens.get(name), torch.Tensor) for name in ("train", "val"))
    return tokens if valid else None


def build_corpus(
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    max_bytes: int | None = 6_000_000,
    cache_dir: str | os.PathLike[str] | None = None,
    dataset: str | os.PathLike[str] | None = None,
) -> Corpus:
    """Tokenizer plus train/validation token tensors, cached on disk by content.

    ``dataset`` is ``None`` (the standard library), a local path (see
    :func:`load_local_dataset`) or a Hugging Face dataset name. ``max_bytes`` caps the text
    read. The BPE is trained on the training split only. ``cache_dir`` defaults to
    :func:`default_cache_dir`; each corpus gets a sub-folder named by a hash of its content,
    the tokenizer kind and the vocabulary size.
    """
    if tokenizer not in ("bpe", "byte"):
        raise ValueError(f"Invalid tokenizer: {tokenizer!r}; allowed: bpe, byte")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"Invalid max_bytes: {max_bytes}; must be positive or None")
    vocab_key = vocab_size if tokenizer == "bpe" else ByteTokenizer.vocab_size
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    shortcut = None
    if dataset is None:
        shortcut = _stat_shortcut(root, stdlib_corpus_files(max_bytes), tokenizer, vocab_key)
        cached = _load_shortcut(shortcut, tokenizer)
        if cached is not None:
            return cached
    documents, description = _documents(dataset, max_bytes)
    training, validation = split_documents(documents)
    identity = f"v{_CACHE_VERSION}:{_fingerprint(documents)}:{tokenizer}:{vocab_key}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    folder = root / f"{tokenizer}{vocab_key}-{key}"
    if tokenizer == "byte":
        tok: Tokenizer = ByteTokenizer()
    else:
        tok = train_bpe_tokenizer(training, vocab_size, folder / "tokenizer.json")
    tokens_path = folder / "tokens.pt"
    tokens = _load_tokens(tokens_path)
    if tokens is None:
        tokens = {
            "train": encode_documents(tok, training),
            "val": encode_documents(tok, validation),
        }
        atomic_save(tokens, tokens_path)
    if shortcut is not None:
        record = {"folder": folder.name, "description": description}
        atomic_write_text(shortcut, json.dumps(record))
    return Corpus(tok, tokens["train"], tokens["val"], description)


def _stat_shortcut(root: Path, files: Sequence[Path], tokenizer: str, vocab_key: int) -> Path:
    """Where the built-in corpus's stat-keyed shortcut lives.

    The content key needs every file read and hashed (about a second for 6 MB); the standard
    library does not change under a given path, size and modification time, so those
    (as ``make`` trusts them) key a small record naming the content-keyed cache folder.
    """
    digest = hashlib.sha256(f"v{_CACHE_VERSION}:{tokenizer}:{vocab_key}".encode())
    for path in files:
        info = path.stat()
        digest.update(f"\0{path}\0{info.st_size}\0{info.st_mtime_ns}".encode())
    return root / "stdlib-shortcuts" / f"{digest.hexdigest()[:24]}.json"


def _load_shortcut(shortcut: Path, tokenizer: str) -> Corpus | None:
    """The cached corpus the shortcut names, or None (absent or unreadable: rebuild)."""
    try:
        record = json.loads(shortcut.read_text(encoding="utf-8"))
        folder = shortcut.parent.parent / str(record["folder"])
        description = str(record["description"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    tokens = _load_tokens(folder / "tokens.pt")
    if tokens is None:
        return None
    if tokenizer == "byte":
        tok: Tokenizer = ByteTokenizer()
    else:
        try:
            tok = BPETokenizer.from_file(folder / "tokenizer.json")
        except Exception:  # missing or unreadable (the Rust library raises plain Exception)
            return None
    return Corpus(tok, tokens["train"], tokens["val"], description)

