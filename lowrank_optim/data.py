"""The built-in corpus, local and Hugging Face datasets, tokenizers and resumable batches.

The built-in corpus is the Python standard library's own source: about 30 MB of real text that
exists wherever Python does, so every command and test runs offline. Files go to the training
or the validation split whole (every 20th file is held out), so validation text is unseen.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from lowrank_optim.checkpoint import atomic_save

__all__ = [
    "ByteTokenizer",
    "Corpus",
    "TokenBatches",
    "Tokenizer",
    "build_corpus",
    "cache_dir",
    "encode_documents",
    "load_hf_dataset",
    "load_local_dataset",
    "stdlib_corpus_files",
    "train_bpe_tokenizer",
    "validation_batches",
]

VALIDATION_EVERY = 20


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def cache_dir() -> Path:
    """``$LOWRANK_OPTIM_CACHE`` or ``~/.cache/lowrank_optim``."""
    return Path(os.environ.get("LOWRANK_OPTIM_CACHE", Path.home() / ".cache" / "lowrank_optim"))


def stdlib_corpus_files(max_bytes: int | None = None) -> list[Path]:
    """The standard library's ``.py`` files in a fixed order, capped at ``max_bytes`` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise FileNotFoundError(f"No Python source files under {root}: no built-in corpus")
    chosen, total = [], 0
    for path in files:
        size = path.stat().st_size
        if max_bytes is not None and total + size > max_bytes and chosen:
            break
        chosen.append(path)
        total += size
    return chosen


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def load_local_dataset(path: str | os.PathLike[str]) -> list[str]:
    """Documents from a text file, a directory of ``.txt``/``.py``/``.md`` files, or JSONL."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".py", ".md"))
        if not files:
            raise ValueError(f"Dataset directory {path} has no .txt, .py or .md files")
        return [_read(p) for p in files]
    if not path.is_file():
        raise ValueError(f"Dataset {str(path)!r} is neither a file nor a directory")
    if path.suffix in (".jsonl", ".json"):
        documents = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number}: each JSONL line needs a string 'text' field")
            documents.append(record["text"])
        return documents
    return [_read(path)]


def load_hf_dataset(
    name: str,
    split: str = "train",
    text_field: str = "text",
    streaming: bool = True,
    max_documents: int = 10_000,
    **kwargs: Any,
) -> list[str]:
    """Up to ``max_documents`` texts of a Hugging Face dataset (needs a network or HF cache)."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split, streaming=streaming, **kwargs)
    except Exception as error:  # the hub client raises many types; all mean "cannot load"
        raise RuntimeError(
            f"Could not load Hugging Face dataset {name!r} (split {split!r}): {error}. Offline, "
            "pass a local .txt/.jsonl file or directory with --dataset instead."
        ) from error
    documents = []
    for record in dataset:
        if text_field not in record:
            raise ValueError(f"Dataset {name!r} has no field {text_field!r}: {sorted(record)}")
        documents.append(str(record[text_field]))
        if len(documents) >= max_documents:
            break
    return documents


class ByteTokenizer:
    """Bytes as tokens (0..255) plus an end-of-document token (256)."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE from the ``tokenizers`` library behind the :class:`Tokenizer` protocol."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.vocab_size = int(backend.get_vocab_size())
        self.eos_id = int(backend.token_to_id("<eos>"))

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, cache_path: Path | None = None
) -> BPETokenizer:
    """Train (or load from ``cache_path``) a byte-level BPE with an ``<eos>`` token."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if cache_path is not None and cache_path.is_file():
        return BPETokenizer(Backend.from_file(str(cache_path)))
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_path.with_suffix(".tmp")
        backend.save(str(temporary))
        os.replace(temporary, cache_path)
    return BPETokenizer(backend)


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """One 1-D ``int32`` tensor: each document's tokens followed by EOS."""
    batch_encode = getattr(tokenizer, "encode_batch", None)
    encoded = batch_encode(list(texts)) if batch_encode else [tokenizer.encode(t) for t in texts]
    ids: list[int] = []
    for document in encoded:
        ids.extend(document)
        ids.append(tokenizer.eos_id)
    return torch.tensor(ids, dtype=torch.int32)


@dataclass(frozen=True)
class Corpus:
    tokenizer: Tokenizer
    train_tokens: torch.Tensor
    val_tokens: torch.Tensor
    description: str


def build_corpus(
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    max_bytes: int | None = 6_000_000,
    cache: Path | None = None,
    dataset: str | None = None,
) -> Corpus:
    """Tokenizer plus train/validation token tensors, cached on disk by content."""
    if tokenizer not in ("bpe", "byte"):
        raise ValueError(f"Invalid tokenizer: {tokenizer!r}; allowed: bpe, byte")
    if dataset is None:
        files = stdlib_corpus_files(max_bytes)
        documents = [_read(p) for p in files]
        identity = f"stdlib:{Path(sysconfig.get_paths()['stdlib'])}:{len(files)}"
        description = (
            f"Python {sysconfig.get_python_version()} standard library, {len(files)} files"
        )
    elif Path(dataset).exists():
        documents = load_local_dataset(dataset)
        identity = f"local:{Path(dataset).resolve()}:{Path(dataset).stat().st_mtime_ns}"
        description = f"{dataset}, {len(documents)} documents"
    else:
        documents = load_hf_dataset(dataset)
        identity = f"hf:{dataset}:{len(documents)}"
        description = f"Hugging Face {dataset}, {len(documents)} documents"
    if len(documents) < 2:
        raise ValueError(f"Dataset has {len(documents)} document(s); need at least 2 to split")
    key = hashlib.sha256(f"{identity}:{max_bytes}:{tokenizer}:{vocab_size}".encode()).hexdigest()
    folder = (cache or cache_dir()) / key[:16]
    validation = [d for i, d in enumerate(documents) if i % VALIDATION_EVERY == 1]
    training = [d for i, d in enumerate(documents) if i % VALIDATION_EVERY != 1]
    if tokenizer == "byte":
        tok: Tokenizer = ByteTokenizer()
    else:
        tok = train_bpe_tokenizer(training, vocab_size, folder / "tokenizer.json")
    tokens_path = folder / "tokens.pt"
    if tokens_path.is_file():
        tokens = torch.load(tokens_path, weights_only=True)
    else:
        tokens = {
            "train": encode_documents(tok, training),
            "val": encode_documents(tok, validation),
        }
        atomic_save(tokens, tokens_path)
    return Corpus(tok, tokens["train"], tokens["val"], description)


class TokenBatches(Iterator[torch.Tensor]):
    """Endless ``(batch, seq_len)`` windows of a token stream, in a seeded, resumable order.

    The stream is cut into non-overlapping windows; each epoch visits them in a permutation
    drawn from ``seed + epoch``. The position is two integers (``epoch``, ``index``), so
    ``state_dict``/``load_state_dict`` resume exactly. With ``world_size > 1`` each rank takes
    its contiguous slice of every global batch: rank 0 rows ``[0, B/W)``, rank 1 the next, so
    the ranks together see exactly what one process with the global batch sees.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"Invalid batch_size: {batch_size}; must be divisible by world_size {world_size}"
            )
        windows = (tokens.numel() - 1) // seq_len
        if windows < batch_size:
            raise ValueError(
                f"Corpus of {tokens.numel()} tokens has {windows} windows of {seq_len}; "
                f"need at least batch_size={batch_size}"
            )
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.windows = windows
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.windows, generator=generator)

    def __next__(self) -> torch.Tensor:
        if self.index + self.batch_size > self.windows:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        starts = self._order[self.index : self.index + self.batch_size] * self.seq_len
        self.index += self.batch_size
        local = self.batch_size // self.world_size
        starts = starts[self.rank * local : (self.rank + 1) * local]
        offsets = torch.arange(self.seq_len)
        return self.tokens[starts[:, None] + offsets].long()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"Batch state has seed {state['seed']}; this sampler has {self.seed}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)


def validation_batches(
    tokens: torch.Tensor, batch_size: int, seq_len: int, count: int
) -> list[torch.Tensor]:
    """The first ``count`` batches of consecutive windows: a fixed evaluation set."""
    windows = (tokens.numel() - 1) // seq_len
    needed = batch_size * count
    if windows < needed:
        raise ValueError(
            f"Validation split has {windows} windows of {seq_len} tokens; {count} batches of "
            f"{batch_size} need {needed}. Use a larger corpus or fewer eval batches."
        )
    usable = tokens[: needed * seq_len].long().view(count, batch_size, seq_len)
    return list(usable)
