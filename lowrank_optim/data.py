"""The built-in corpus, local and Hugging Face datasets, tokenizers and resumable batches.

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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from lowrank_optim.checkpoint import atomic_save

__all__ = [
    "VALIDATION_EVERY",
    "BPETokenizer",
    "ByteTokenizer",
    "Corpus",
    "TokenBatches",
    "Tokenizer",
    "build_corpus",
    "default_cache_dir",
    "encode_documents",
    "load_hf_dataset",
    "load_local_dataset",
    "split_documents",
    "stdlib_corpus_files",
    "train_bpe_tokenizer",
    "validation_batches",
]

VALIDATION_EVERY = 20
LOCAL_SUFFIXES = (".txt", ".py", ".md")
EOS_TOKEN = "<eos>"
# Bump when the cache layout or the encoding changes, so stale caches are never reused.
_CACHE_VERSION = 2


@runtime_checkable
class Tokenizer(Protocol):
    """What training needs of a tokenizer: ids in, ids out, a vocabulary size and an EOS id."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def default_cache_dir() -> Path:
    """``$LOWRANK_OPTIM_CACHE`` or ``~/.cache/lowrank_optim``."""
    override = os.environ.get("LOWRANK_OPTIM_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "lowrank_optim"


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
        raise ValueError(f"Dataset has {len(documents)} document(s); need at least 2 to split")
    validation = [d for i, d in enumerate(documents) if i % every == 1]
    training = [d for i, d in enumerate(documents) if i % every != 1]
    return training, validation


# --------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """UTF-8 bytes as tokens (0..255) plus an end-of-document token (256); needs no training."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        """The text's UTF-8 bytes."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; EOS is dropped and broken UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE from the ``tokenizers`` library behind the :class:`Tokenizer` protocol.

    ``backend`` is the ``tokenizers.Tokenizer`` itself, for anything the protocol lacks.
    """

    def __init__(self, backend: Any) -> None:
        eos_id = backend.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise ValueError(f"BPE tokenizer has no {EOS_TOKEN} token; retrain it")
        self.backend = backend
        self.vocab_size = int(backend.get_vocab_size())
        self.eos_id = int(eos_id)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        """Load a tokenizer saved by :func:`train_bpe_tokenizer`."""
        from tokenizers import Tokenizer as Backend

        return cls(Backend.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOS appended)."""
        return self.backend.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the Rust backend."""
        return [encoding.ids for encoding in self.backend.encode_batch(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; EOS tokens are dropped."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, cache_path: str | os.PathLike[str] | None = None
) -> BPETokenizer:
    """Train (or load from ``cache_path``) a byte-level BPE with an ``<eos>`` token.

    Byte-level means every string round-trips exactly: ``decode(encode(x)) == x``. Training is
    deterministic for given texts. ``cache_path`` is trusted as is: callers key it by corpus
    and vocabulary size (as :func:`build_corpus` does).
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(
            f"Invalid vocab_size: {vocab_size}; a byte-level BPE needs at least "
            f"{len(alphabet) + 1} (256 bytes and EOS)"
        )
    if cache_path is not None and Path(cache_path).is_file():
        return BPETokenizer.from_file(cache_path)
    backend = Backend(models.BPE())
    # use_regex=False would merge across spaces; GPT-2's split keeps tokens word-like.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        show_progress=False,
        initial_alphabet=alphabet,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    if cache_path is not None:
        _atomic_write_text(Path(cache_path), backend.to_str())
    return BPETokenizer(backend)


def _atomic_write_text(path: Path, text: str) -> None:
    # A per-process temporary name: data-parallel ranks may build the same cache at once.
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """One 1-D ``int32`` tensor: each document's tokens followed by EOS."""
    batch_encode = getattr(tokenizer, "encode_batch", None)
    encoded = batch_encode(list(texts)) if batch_encode else [tokenizer.encode(t) for t in texts]
    ids: list[int] = []
    for document in encoded:
        ids.extend(document)
        ids.append(tokenizer.eos_id)
    return torch.tensor(ids, dtype=torch.int32)


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    """A tokenizer with its encoded training and validation token streams."""

    tokenizer: Tokenizer
    train_tokens: torch.Tensor
    val_tokens: torch.Tensor
    description: str


def _looks_local(dataset: str) -> bool:
    # A mistyped local path must fail at once, not after the hub client's retries.
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
    if Path(dataset).expanduser().exists() or _looks_local(dataset):
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
        _atomic_write_text(shortcut, json.dumps(record))
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


# --------------------------------------------------------------------------- batches


class TokenBatches(Iterator[torch.Tensor]):
    """Endless ``(batch, seq_len)`` ``int64`` windows of a token stream, seeded and resumable.

    The stream is cut into non-overlapping windows; each epoch visits them in a permutation
    drawn from ``seed`` and the epoch number (a leftover short of a batch is skipped). The
    position is two integers (``epoch``, ``index``), so ``state_dict``/``load_state_dict``
    resume exactly. ``batch_size`` is the global batch: with ``world_size > 1`` each rank takes
    its contiguous slice of every global batch (rank 0 rows ``[0, B/W)``, rank 1 the next),
    so the ranks together see exactly what one process with the global batch sees.
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
        if tokens.dim() != 1:
            raise ValueError(f"Invalid tokens: shape {tuple(tokens.shape)}; need a 1-D stream")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"Invalid batch_size={batch_size}, seq_len={seq_len}; need >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"Invalid rank={rank} for world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"Invalid batch_size: {batch_size}; must be divisible by world_size {world_size}"
            )
        # Leave the last token out of every window so that each window's next token exists,
        # for callers that shift labels themselves.
        windows = (tokens.numel() - 1) // seq_len
        if windows < batch_size:
            raise ValueError(
                f"Corpus of {tokens.numel()} tokens has {windows} windows of {seq_len}; "
                f"need at least batch_size={batch_size}. Use a larger corpus or shorter windows."
            )
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.windows = windows
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        # A private generator: sampling never touches (or depends on) the global RNG.
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
        return self.tokens[starts[:, None] + torch.arange(self.seq_len)].long()

    def state_dict(self) -> dict[str, int]:
        """The position plus what defines the order, as plain ints."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "windows": self.windows,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state``'s position; refuses a state of a different order or corpus."""
        for name in ("seed", "batch_size", "seq_len", "windows"):
            # Older states lack the shape fields; the seed was always recorded.
            if name in state and int(state[name]) != getattr(self, name):
                raise ValueError(
                    f"Batch state has {name}={state[name]}; this sampler has "
                    f"{getattr(self, name)}. Resume with the same corpus and batch settings."
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)


def validation_batches(
    tokens: torch.Tensor, batch_size: int, seq_len: int, count: int
) -> list[torch.Tensor]:
    """The first ``count`` batches of consecutive ``int64`` windows: a fixed evaluation set."""
    windows = (tokens.numel() - 1) // seq_len
    needed = batch_size * count
    if windows < needed:
        raise ValueError(
            f"Validation split has {windows} windows of {seq_len} tokens; {count} batches of "
            f"{batch_size} need {needed}. Use a larger corpus or fewer eval batches."
        )
    usable = tokens[: needed * seq_len].long().view(count, batch_size, seq_len)
    return list(usable)
