"""Counting what the optimizer's collectives move: calls and payload bytes, per operation.

The sharded optimizer calls ``torch.distributed.all_reduce`` and ``all_gather_single``
through the module attribute at call time, so a context that wraps those two attributes sees
every optimizer collective (and nothing of FSDP2's own, which go through its internal paths).
The payload is the tensor handed to the collective: the all-reduced tensor, or the all-gather's
output (``R`` blocks). Wire traffic per rank follows from the algorithm (ring all-reduce about
``2 (R - 1) / R`` times its payload, all-gather ``(R - 1) / R``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["CollectiveCounter"]

_WRAPPED = ("all_reduce", "all_gather_single")


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
            self.bytes[name] += tensor.numel() * tensor.element_size()
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
