"""Tokenizers of the training corpus: raw bytes, or a byte-level BPE trained locally.

Both satisfy the :class:`Tokenizer` protocol; :func:`encode_documents` turns documents into one
token stream with an end-of-document token after each.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from lowrank_optim.train.cache import atomic_write_text

__all__ = [
    "EOS_TOKEN",
    "BPETokenizer",
    "ByteTokenizer",
    "Tokenizer",
    "encode_documents",
    "train_bpe_tokenizer",
]

EOS_TOKEN = "<eos>"


@runtime_checkable
class Tokenizer(Protocol):
    """What training needs of a tokenizer: ids in, ids out, a vocabulary size and an EOS id."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...



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
        atomic_write_text(Path(cache_path), backend.to_str())
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

