"""Small models and training loops shared by the tests."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_optim import StabilityConfig

__all__ = [
    "MATRIX_GROUP",
    "MatrixNet",
    "TEARDOWN_ABORT",
    "TinyNet",
    "gradient_stream",
    "check_torchrun",
    "joined",
    "make_batches",
    "matrix_batches",
    "matrix_groups",
    "roundtrip",
    "run_stream",
    "split_groups",
    "train_steps",
]


class TinyNet(nn.Module):
    """Two linears of different aspect ratios (wide and tall) plus a norm: every code path."""

    def __init__(
        self, dtype: torch.dtype = torch.float32, seed: int = 0, square: bool = False
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        # square=True makes both matrices 12 x 12 (for degenerate checks of every proj_type)
        hidden, outputs = (12, 12) if square else (20, 6)
        self.up = nn.Linear(12, hidden, dtype=dtype)
        self.down = nn.Linear(hidden, outputs, dtype=dtype)
        self.norm = nn.LayerNorm(hidden, dtype=dtype)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.norm(self.up(inputs))))


def split_groups(model: nn.Module, **projected: Any) -> list[dict[str, Any]]:
    matrices = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() != 2]
    return [{"params": others}, {"params": matrices, **projected}]


def make_batches(
    count: int, dtype: torch.dtype, seed: int = 1, outputs: int = 6
) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(16, 12, generator=generator).to(dtype),
            torch.randn(16, outputs, generator=generator).to(dtype),
        )
        for _ in range(count)
    ]


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, ...]],
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    losses = []
    for index, (inputs, targets) in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        loss = (model(inputs) - targets).float().square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if after_step is not None:
            after_step(index)
    return losses


def roundtrip(obj: Any) -> Any:
    """``torch.save`` then ``torch.load(weights_only=True)``: what Trainer does on resume."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ------------------------------------------------------------------ the matrix's larger model
#: Keys of MatrixNet's projected group. ``right`` keeps FSDP2's sharded rows local (the only
#: side FSDP2 accepts) and ``gram_eigh`` is the refresh the sharded Gram path reproduces.
MATRIX_GROUP = {
    "rank": 4,
    "update_proj_gap": 4,
    "scale": 0.5,
    "proj_type": "right",
    "refresh": "gram_eigh",
}


class MatrixNet(nn.Module):
    """Four linears whose moments are stored quantized where they reach 4096 elements.

    ==========  =============  ==========  ===================================================
    layer       weight         group       moments
    ==========  =============  ==========  ===================================================
    ``first``   320 x 16       dense       5120: quantized
    ``narrow``  25 x 320       projected   25 x 4: full precision; uneven FSDP2 shards (13 + 12)
    ``wide``    1536 x 25      projected   1536 x 4 = 6144: quantized
    ``out``     5 x 1536       dense       7680: quantized; uneven FSDP2 shards (3 + 2 rows)
    ==========  =============  ==========  ===================================================

    Biases are dense and small. The same model runs on every placement of the matrix.
    """

    QUANTIZED = ("first.weight", "wide.weight", "out.weight")

    def __init__(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        self.first = nn.Linear(16, 320, dtype=dtype)
        self.narrow = nn.Linear(320, 25, dtype=dtype)
        self.wide = nn.Linear(25, 1536, dtype=dtype)
        self.out = nn.Linear(1536, 5, dtype=dtype)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in self.parameters():
                fan_in = param.shape[-1] if param.dim() == 2 else 16
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.first(inputs))
        hidden = torch.tanh(self.narrow(hidden))
        return self.out(torch.tanh(self.wide(hidden)))


def matrix_groups(model: nn.Module, **overrides: Any) -> list[dict[str, Any]]:
    """MatrixNet's groups: ``narrow`` and ``wide`` weights projected, the rest dense.

    The projected weights have few columns (320 and 25), so the ``right`` bases' Gram
    matrices stay small: a refresh is cheap on the CI's two cores.
    """
    named = dict(model.named_parameters())
    projected = [named[name] for name in ("narrow.weight", "wide.weight")]
    dense = [p for name, p in named.items() if not any(p is q for q in projected)]
    return [{"params": dense}, {"params": projected, **MATRIX_GROUP, **overrides}]


def matrix_batches(
    count: int, dtype: torch.dtype = torch.float32, seed: int = 1, batch: int = 16
) -> list[tuple[torch.Tensor, ...]]:
    """Inputs and learnable targets (a fixed smooth function of the inputs, plus noise)."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(16, 5, generator=generator) / 4
    batches = []
    for _ in range(count):
        inputs = torch.randn(batch, 16, generator=generator)
        targets = torch.tanh(inputs @ teacher) + 0.05 * torch.randn(batch, 5, generator=generator)
        batches.append((inputs.to(dtype), targets.to(dtype)))
    return batches


# ------------------------------------------------------------- a stream of low-rank gradients
def gradient_stream(
    count: int, rows: int = 96, cols: int = 256, seed: int = 0
) -> list[torch.Tensor]:
    """Gradients near a fixed rank-8 subspace plus noise: what GaLore is built for."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(rows, 8, generator=generator)).Q
    return [
        basis @ torch.randn(8, cols, generator=generator) * 0.1
        + 0.01 * torch.randn(rows, cols, generator=generator)
        for _ in range(count)
    ]


def run_stream(
    build: Callable[..., torch.optim.Optimizer],
    grads: list[torch.Tensor],
    rank: int = 32,
    **kwargs: Any,
) -> tuple[nn.Parameter, torch.optim.Optimizer]:
    """Feed ``grads`` to one projected weight (gap 10, scale 1, a fixed refresh gap)."""
    weight = nn.Parameter(torch.zeros(grads[0].shape))
    optimizer = build(
        [{"params": [weight], "rank": rank, "update_proj_gap": 10, "scale": 1.0}],
        lr=1e-2,
        weight_decay=0.0,
        stability=StabilityConfig(policy="fixed"),
        **kwargs,
    )
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
    return weight, optimizer


def spawn_ranks(
    run: Callable[..., None], world: int, directory: Path, timeout_s: float, *, with_world: bool
) -> list[dict[str, Any]]:
    """Run ``run(rank, [world,] port, directory)`` on ``world`` spawned processes (gloo on a free
    local port) and return what each rank saved as ``directory / f"rank{r}.pt"``.

    Killed, with a ``TimeoutError``, after ``timeout_s`` seconds: a rank stuck in a collective
    would otherwise hang the whole suite.
    """
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = (world, port, str(directory)) if with_world else (port, str(directory))
    context = mp.spawn(run, args=args, nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not joined(context, lambda rank: (directory / f"rank{rank}.pt").exists()):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"the {world}-rank run did not finish in {timeout_s} s")
    return [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in range(world)]


#: What a C++ thread still running at interpreter exit prints before SIGABRT (libstdc++).
TEARDOWN_ABORT = "terminate called without an active exception"


def joined(context: Any, finished: Callable[[int], bool]) -> bool:
    """Whether every spawned rank has exited (waits up to a second); raises as
    ``context.join()`` does if one failed, except that a rank killed by SIGABRT *after* it
    finished (``finished(rank)``: its results are saved) counts as a clean exit.

    gloo or DDP threads torn down at interpreter exit, after the rank saved correct results,
    rarely abort with TEARDOWN_ABORT (issue #26; the package releases what it can, see
    ``lowrank_optim.handoff.wrappers.retire``). A rank that aborts before saving still fails.
    ``context.join()`` itself cannot be used: on the first non-zero exit it terminates the
    other ranks, which may still be saving.
    """
    import signal
    import time
    import warnings

    def tolerated(rank: int, code: int | None) -> bool:
        return code == -signal.SIGABRT and finished(rank)

    codes = [process.exitcode for process in context.processes]
    failed = [r for r, code in enumerate(codes) if code not in (None, 0) and not tolerated(r, code)]
    if failed:
        context.join()  # terminates the others and raises with the failed rank's traceback
    if any(code is None for code in codes):
        time.sleep(1)
        return False
    for rank, code in enumerate(codes):
        if code != 0:
            warnings.warn(f"rank {rank} aborted at exit after saving its results", stacklevel=2)
    return True


def check_torchrun(result: Any) -> None:
    """Assert a ``torchrun`` subprocess succeeded, tolerating only the rare teardown abort
    after every rank finished (TEARDOWN_ABORT, no Python traceback); the caller then checks
    the outputs the ranks wrote, so a run that aborted early still fails."""
    if result.returncode == 0:
        return
    tolerated = TEARDOWN_ABORT in result.stderr and "Traceback" not in result.stderr
    assert tolerated, result.stderr[-3000:]


def run_gloo_scenario(
    rank: int,
    world: int,
    port: int,
    directory: str,
    scenario: Callable[[int], dict[str, Any]],
    timeout_s: float,
) -> None:
    """One spawned rank: join a gloo group on ``port``, run ``scenario(rank)``, and save its
    result (or ``{"failure": traceback}``) as ``directory / f"rank{rank}.pt"``."""
    import datetime
    import os
    import traceback

    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )
    try:
        results = scenario(rank)
    except Exception:  # noqa: BLE001 - reported by the tests
        results = {"failure": traceback.format_exc()}
    dist.barrier()
    dist.destroy_process_group()
    torch.save(results, Path(directory) / f"rank{rank}.pt")


def results_or_fail(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``results`` of :func:`spawn_ranks`, or a test failure showing the first rank's error."""
    import pytest

    for result in results:
        if "failure" in result:
            pytest.fail(f"a rank failed:\n{result['failure']}")
    return results
