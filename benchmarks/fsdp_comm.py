"""FSDP2 communication and state of GaLoreAdamW at the LLaMA-1B shapes, rank 512.

    nice -n 19 python -m benchmarks.fsdp_comm                 # real steps on the 2048 x 2048
    nice -n 19 python -m benchmarks.fsdp_comm --step-shapes "attention q/k/v/o" \
        "mlp gate/up" "mlp down"                               # all three (minutes per refresh)

Measured at 2 ranks (gloo, CPU, one thread per rank), for the matrices in ``--step-shapes``, with
:class:`lowrank_optim.distributed.CollectiveCounter` around ``optimizer.step()`` on a
``fully_shard``-ed ``Linear``: bytes per plain step, per refresh step (both strategies, Gram
all-reduce and all-gather) and on the captured-energy step after it; per-rank optimizer-state
bytes (local shards of the moments plus the replicated basis); and the time of a refresh step
and of the collective alone. 4 and 8 ranks come from the formulas in
:mod:`lowrank_optim.distributed.refresh`, which the 2-rank measurement checks.

"payload" is the tensor handed to the collective; "wire/rank" is what a ring algorithm sends
per rank: ``2 (R - 1) / R`` payloads for an all-reduce, ``(R - 1) / R`` for an all-gather.
Writes ``results/fsdp_comm.json`` and ``results/fsdp_comm.md``.

    python -m benchmarks.fsdp_comm --handoff-formulas       # seconds: formulas only, no ranks

prints the bytes of one WeLore hand-off of every matrix (:mod:`lowrank_optim.distributed.
factorize`: the route ``auto`` takes, its payload and wire bytes per rank, its per-rank peak)
at 2, 4 and 8 ranks, against gathering the weight, at rank ``HANDOFF_RANK``.

    OMP_NUM_THREADS=1 python -m benchmarks.fsdp_comm --handoff [--quick] [--out DIR]  # ~1 min

measures the hand-off of one 1B decoder layer on 2 ranks through ``maybe_handoff`` (bytes per
hand-off and of WeLore's spectra, per-rank weight + gradient + state before and after), checks
it against the formulas and writes ``results/fsdp_comm_handoff.{json,md}`` with the whole model
at 2, 4 and 8 ranks (:mod:`benchmarks.fsdp_handoff_bytes`; ``--quick``: tiny shapes, to a
temporary folder unless ``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from benchmarks.common import RESULTS, markdown_table, write_json
from benchmarks.fsdp_handoff_bytes import GALORE_RANK, HANDOFF_RANK, handoff_payload
from benchmarks.fsdp_handoff_bytes import run as run_handoff
from lowrank_optim import GaLoreAdamW
from lowrank_optim.distributed import (
    CollectiveCounter,
    choose_strategy,
    gather_refresh_bytes,
    gram_refresh_bytes,
)
from lowrank_optim.distributed.refresh import gather_rows
from lowrank_optim.distributed.sharding import rows_per_rank
from lowrank_optim.quant import blockwise8_nbytes

__all__ = ["main"]

RANK = 512
LAYERS = 24
#: LLaMA-1B linears (out x in) and how many of each a decoder layer has.
SHAPES = {
    "attention q/k/v/o": ((2048, 2048), 4),
    "mlp gate/up": ((5461, 2048), 2),
    "mlp down": ((2048, 5461), 1),
}
WORLDS = (2, 4, 8)
MEASURED_WORLD = 2
REPEATS = 3


# -------------------------------------------------------------------------------- formulas
def state_bytes(shape: tuple[int, int], world: int, rank: int, eight_bit: bool) -> int:
    """Largest rank's optimizer state for one right-projected matrix (moments + basis, fp32)."""
    rows, cols = shape
    local = max(rows_per_rank(rows, world)) * rank
    moments = 2 * (blockwise8_nbytes(local) if eight_bit else 4 * local)
    return moments + 4 * cols * rank


def formulas(shape: tuple[int, int], world: int) -> dict[str, Any]:
    rows, cols = shape
    gram = gram_refresh_bytes(cols)
    gather = gather_refresh_bytes(rows, cols, world)
    group = {"refresh": "gram_eigh"}
    return {
        "step_bytes": 4,  # one fp32 finite-flag per sharded matrix
        "energy_step_bytes": 4 + 16,
        "gram_payload": gram,
        "gram_wire_per_rank": round(2 * (world - 1) / world * gram),
        "gather_payload": gather,
        "gather_wire_per_rank": round((world - 1) / world * gather),
        "auto": choose_strategy(group, shape),
        "state_per_rank": state_bytes(shape, world, RANK, eight_bit=False),
        "state_per_rank_8bit": state_bytes(shape, world, RANK, eight_bit=True),
        "adamw_state_per_rank": 2 * 4 * max(rows_per_rank(rows, world)) * cols,
    }


def handoff_table() -> str:
    """One hand-off of every 1B matrix at 2, 4 and 8 ranks, from the formulas (seconds)."""
    rows = []
    for world in WORLDS:
        for name, (shape, count) in SHAPES.items():
            f = handoff_payload(shape, world)
            rows.append(
                [
                    f"{name} {shape[0]}x{shape[1]} (x{count * LAYERS})",
                    world,
                    f["route"],
                    _mb(f["wire_per_rank"]),
                    _mb(f["gather_wire_per_rank"]),
                    _mb(f["peak_per_rank"]),
                    _mb(f["gather_peak_per_rank"]),
                ]
            )
        total = {
            key: sum(handoff_payload(s, world)[key] * c * LAYERS for s, c in SHAPES.values())
            for key in ("wire_per_rank", "gather_wire_per_rank")
        }
        rows.append(
            [
                "every matrix",
                world,
                "",
                _mb(total["wire_per_rank"]),
                _mb(total["gather_wire_per_rank"]),
                "",
                "",
            ]
        )
    header = [
        "matrix",
        "ranks",
        "route",
        "hand-off wire/rank",
        "gather wire/rank",
        "hand-off peak/rank",
        "gathered weight",
    ]
    return (
        f"# One WeLore hand-off under FSDP2 (formulas), fp32 LLaMA-1B, rank {HANDOFF_RANK}, "
        f"moments of GaLore rank {GALORE_RANK} carried\n\n" + markdown_table(header, rows) + "\n"
    )


# ---------------------------------------------------------------------------- measurement
def _local_bytes(state: dict[str, Any]) -> tuple[int, int]:
    """``(moments + basis, everything else)`` held by this rank, in bytes."""
    core = other = 0
    for key, value in state.items():
        if isinstance(value, DTensor):
            value = value.to_local()
        if isinstance(value, torch.Tensor):
            size = value.numel() * value.element_size()
            if key in ("exp_avg", "exp_avg_sq", "basis_right"):
                core += size
            else:
                other += size
    return core, other


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise RuntimeError(f"measured bytes disagree with the formula: {what}")


def _sharded_weight(shape: tuple[int, int]) -> tuple[DTensor, torch.Tensor]:
    """A ``fully_shard``-ed ``Linear`` weight of ``shape`` with a random gradient shard."""
    rows, cols = shape
    torch.manual_seed(0)
    layer = nn.Linear(cols, rows, bias=False)
    fully_shard(layer)
    weight = layer.weight
    generator = torch.Generator().manual_seed(dist.get_rank())
    local = torch.randn(weight.to_local().shape, generator=generator)
    weight.grad = DTensor.from_local(
        local, weight.device_mesh, weight.placements, shape=weight.shape, stride=weight.stride()
    )
    return weight, local


def _collective_seconds(shape: tuple[int, int], strategy: str) -> float:
    """Median time of the refresh's collective alone (the same calls the refresh makes)."""
    rows, cols = shape
    weight, local = _sharded_weight(shape)
    group = weight.device_mesh.get_group()
    times = []
    for _ in range(REPEATS):
        dist.barrier()
        start = time.perf_counter()
        if strategy == "gram":
            dist.all_reduce(torch.zeros(cols, cols), group=group)
        else:
            gather_rows(local, rows, group)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure_steps(shape: tuple[int, int], strategy: str) -> dict[str, Any]:
    """Bytes and time of real ``optimizer.step()`` calls: refresh, captured energy, plain."""
    weight, _ = _sharded_weight(shape)
    group = {
        "params": [weight],
        "rank": RANK,
        "proj_type": "right",
        "refresh": "gram_eigh",
        "fsdp_refresh": strategy,
        "update_proj_gap": 200,
    }
    optimizer = GaLoreAdamW([group], lr=1e-3)
    counters, seconds = [], []
    for _ in range(3):
        dist.barrier()
        start = time.perf_counter()
        with CollectiveCounter() as counter:
            optimizer.step()
        seconds.append(time.perf_counter() - start)
        counters.append(counter)
    core, other = _local_bytes(optimizer.state[weight])
    return {
        "refresh_step_bytes": counters[0].total_bytes(),
        "energy_step_bytes": counters[1].total_bytes(),
        "step_bytes": counters[2].total_bytes(),
        "refresh_step_s": seconds[0],
        "plain_step_s": seconds[2],
        "state_per_rank": core,
        "other_state_per_rank": other,
    }


def _worker(rank: int, world: int, port: int, out: str, stepped: list[str]) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30)
    )
    results: dict[str, Any] = {}
    for name, (shape, _) in SHAPES.items():
        results[name] = {}
        for strategy in ("gram", "gather"):
            entry = {"collective_s": _collective_seconds(shape, strategy)}
            if name in stepped:
                entry.update(_measure_steps(shape, strategy))
            results[name][strategy] = entry
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def _measure_all(stepped: list[str]) -> dict[str, Any]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        out = str(Path(directory) / "measured.pt")
        mp.spawn(_worker, args=(MEASURED_WORLD, port, out, stepped), nprocs=MEASURED_WORLD)
        return torch.load(out)


# ------------------------------------------------------------------------------- reporting
def _mb(value: float) -> str:
    return f"{value / 2**20:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--step-shapes",
        nargs="*",
        default=["attention q/k/v/o"],
        choices=list(SHAPES),
        help="matrices to run real optimizer steps on (each refresh is an n x n eigh per rank; "
        "the 5461-wide one takes minutes); the others get formulas and collective timings",
    )
    parser.add_argument(
        "--handoff-formulas",
        action="store_true",
        help="print the hand-off bytes and peaks from the formulas only (seconds), and stop",
    )
    parser.add_argument(
        "--handoff",
        action="store_true",
        help="measure the FSDP2 hand-off of one LLaMA-1B layer at 2 ranks (bytes, per-rank "
        "memory), check it against the formulas, write results/fsdp_comm_handoff.{md,json}",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="with --handoff: tiny shapes (seconds), written to a temporary folder unless --out",
    )
    parser.add_argument("--out", type=Path, help="with --handoff: the results folder")
    args = parser.parse_args(argv)
    if args.handoff_formulas:
        print(handoff_table())
        return 0
    if args.handoff:
        out = args.out or (
            Path(tempfile.mkdtemp(prefix="fsdp_handoff_")) if args.quick else RESULTS
        )
        out.mkdir(parents=True, exist_ok=True)
        run_handoff(args.quick, out)
        path = out / "fsdp_comm_handoff.md"
        print(path.read_text())
        print(f"wrote {path} and fsdp_comm_handoff.json to {out}")
        return 0
    if args.quick or args.out:
        parser.error("--quick and --out go with --handoff")
    measured = _measure_all(args.step_shapes)
    computed = {
        name: {str(world): formulas(shape, world) for world in WORLDS}
        for name, (shape, _) in SHAPES.items()
    }
    for name in args.step_shapes:  # the formulas must match what was counted
        expected = computed[name][str(MEASURED_WORLD)]
        got = measured[name]
        _check(got["gram"]["refresh_step_bytes"] == expected["gram_payload"] + 4, name)
        _check(got["gather"]["refresh_step_bytes"] == expected["gather_payload"] + 4, name)
        for strategy in ("gram", "gather"):
            _check(got[strategy]["step_bytes"] == expected["step_bytes"], name)
            _check(got[strategy]["energy_step_bytes"] == expected["energy_step_bytes"], name)
            # rank 0 holds the larger shard, which the formula reports
            _check(got[strategy]["state_per_rank"] == expected["state_per_rank"], name)

    rows = []
    for name, (shape, count) in SHAPES.items():
        for world in WORLDS:
            f = computed[name][str(world)]
            stepped = world == MEASURED_WORLD and name in args.step_shapes
            source = "measured" if stepped else "formula"
            rows.append(
                [
                    f"{name} {shape[0]}x{shape[1]} (x{count * LAYERS})",
                    world,
                    source,
                    f["step_bytes"],
                    _mb(f["gram_payload"]),
                    _mb(f["gram_wire_per_rank"]),
                    _mb(f["gather_payload"]),
                    _mb(f["gather_wire_per_rank"]),
                    f["auto"],
                    _mb(f["state_per_rank"]),
                    _mb(f["state_per_rank_8bit"]),
                    _mb(f["adamw_state_per_rank"]),
                ]
            )
    totals = []
    for world in WORLDS:

        def total(key: str, world: int = world) -> float:
            return sum(computed[n][str(world)][key] * c * LAYERS for n, (_, c) in SHAPES.items())

        auto_wire = sum(
            computed[n][str(world)][f"{computed[n][str(world)]['auto']}_wire_per_rank"] * c * LAYERS
            for n, (_, c) in SHAPES.items()
        )
        totals.append(
            [
                world,
                total("step_bytes"),
                _mb(total("gram_wire_per_rank")),
                _mb(total("gather_wire_per_rank")),
                _mb(auto_wire),
                _mb(total("state_per_rank")),
                _mb(total("state_per_rank_8bit")),
                _mb(total("adamw_state_per_rank")),
            ]
        )
    timing = []
    for name, (shape, _) in SHAPES.items():
        for strategy in ("gram", "gather"):
            m = measured[name][strategy]
            f = computed[name][str(MEASURED_WORLD)]
            stepped = name in args.step_shapes
            timing.append(
                [
                    f"{name} {shape[0]}x{shape[1]}",
                    strategy,
                    _mb(f[f"{strategy}_payload"]),
                    f"{m['collective_s'] * 1e3:.1f}",
                    f"{m['refresh_step_s']:.2f}" if stepped else "not run",
                    f"{m['plain_step_s'] * 1e3:.1f}" if stepped else "not run",
                ]
            )

    write_json(
        "fsdp_comm",
        {
            "rank": RANK,
            "layers": LAYERS,
            "measured_world": MEASURED_WORLD,
            "measured": measured,
            "computed": computed,
        },
    )
    lines = [
        "# FSDP2: GaLoreAdamW communication and state, LLaMA-1B shapes, rank 512",
        "",
        "`nice -n 19 python -m benchmarks.fsdp_comm`. Right projection (`proj_type='right'`,",
        "rows sharded), `refresh='gram_eigh'`. Bytes per matrix; MiB unless said. The 2-rank",
        "row is measured (collectives counted around `optimizer.step()`, gloo, CPU) and equals",
        "the formula; 4 and 8 ranks are the formula. Step bytes: one fp32 finite-flag per",
        "matrix per step (+16 B of captured-energy sums on the step after a refresh).",
        "",
        markdown_table(
            [
                "matrix",
                "ranks",
                "source",
                "step B",
                "gram payload",
                "gram wire/rank",
                "gather payload",
                "gather wire/rank",
                "auto",
                "state/rank",
                "state/rank 8-bit",
                "AdamW state/rank",
            ],
            rows,
        ),
        "",
        f"Whole model ({LAYERS} layers, projected matrices only), per refresh of every matrix:",
        "",
        markdown_table(
            [
                "ranks",
                "step B",
                "gram wire/rank",
                "gather wire/rank",
                "auto wire/rank",
                "state/rank",
                "state/rank 8-bit",
                "AdamW state/rank",
            ],
            totals,
        ),
        "",
        f"Refresh at {MEASURED_WORLD} ranks (gloo, one thread per rank): payload, the collective "
        "alone (median of 3), the whole refresh step (collective + Gram + fp32 eigh + first "
        "projected update) and a plain step, where real steps were run (`--step-shapes`). "
        "Timings were taken on a shared machine under load from other jobs (niced): compare "
        "rows with each other, not with other machines.",
        "",
        markdown_table(
            [
                "matrix",
                "strategy",
                "refresh MiB",
                "collective ms",
                "refresh step s",
                "plain step ms",
            ],
            timing,
        ),
        "",
    ]
    path = RESULTS / "fsdp_comm.md"
    path.write_text("\n".join(lines))
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
