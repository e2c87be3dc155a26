"""Seeded, resumable training batches of a token stream, and the fixed validation batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lowrank_optim.train.errors import NotEnoughDataError

__all__ = ["TokenBatches", "validation_batches"]


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
            raise NotEnoughDataError(
                f"Corpus of {tokens.numel()} tokens has {windows} windows of {seq_len}; "
                f"need at least batch_size={batch_size} (sequences per step). Use a larger corpus "
                "or shorter windows."
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
        raise NotEnoughDataError(
            f"Validation split has {windows} windows of {seq_len} tokens; {count} batches of "
            f"{batch_size} need {needed}. Use a larger corpus or fewer eval batches "
            "(--corpus-bytes, --dataset, --eval-batches)."
        )
    usable = tokens[: needed * seq_len].long().view(count, batch_size, seq_len)
    return list(usable)
