"""Counting what the optimizer's collectives move: calls and payload bytes, per operation.

The sharded optimizer calls ``torch.distributed.all_reduce``, ``all_gather_single``,
``gather`` and ``broadcast`` through the module attribute at call time, so a context that wraps
those attributes sees every optimizer collective (and nothing of FSDP2's own, which go through
its internal paths). The payload is the tensor handed to the collective on this rank: the
all-reduced or broadcast tensor, the all-gather's output (``R`` blocks), and for a gather the
block this rank sends, or on the destination the ``R`` blocks it gathers. Wire traffic per rank
follows from the algorithm (ring all-reduce about ``2 (R - 1) / R`` times its payload,
all-gather ``(R - 1) / R``; a gather: each other rank sends its block, the destination receives
``(R - 1) / R`` of its payload; a broadcast: each rank receives it once).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["CollectiveCounter"]

_WRAPPED = ("all_reduce", "all_gather_single", "gather", "broadcast")


class CollectiveCounter:
    """``with CollectiveCounter() as counter: ...``; then ``counter.calls`` / ``counter.bytes``."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self._originals: dict[str, Any] = {}

    def _wrap(self, name: str) -> Any:
        original = getattr(dist, name)

        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            handed = [tensor]
            if name == "gather":
                gathered = args[0] if args else kwargs.get("gather_list")
                handed = list(gathered) if gathered else handed  # the destination's R blocks
            self.bytes[name] += sum(t.numel() * t.element_size() for t in handed)
            return original(tensor, *args, **kwargs)

        return counted

    def __enter__(self) -> CollectiveCounter:
        for name in _WRAPPED:
            self._originals[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()

    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()
