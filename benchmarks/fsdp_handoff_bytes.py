"""Bytes and per-rank memory of WeLore hand-offs under FSDP2, at the LLaMA-1B shapes.

Run through ``python -m benchmarks.fsdp_comm --handoff [--quick]`` (this module has no ``main``).

Measured at 2 ranks (gloo, CPU, one thread per rank): one LLaMA-1B decoder layer's seven linears
(q, k, v, o ``2048 x 2048``; gate, up ``5461 x 2048``; down ``2048 x 5461``) in one
``fully_shard`` unit under a ``fully_shard``-ed root, trained one step by ``WeLoreAdamW``
(right projection, GaLore rank :data:`GALORE_RANK`), then ``model = optimizer.maybe_handoff(
model)`` with ``trigger="step"``: the real FSDP2 path (:func:`lowrank_optim.distributed.handoff.
hand_off_sharded_layer`: sharded factorization, moment carry, error sums, FSDP2 group surgery).
The only change to the optimizer is the rank: WeLore's global threshold runs (its spectra are
taken and counted: :func:`lowrank_optim.distributed.spectra.owner_spectra`, each matrix's by its
owner rank, keeping the top vectors of the layers that may go) but every matrix is then handed
off at the fixed :data:`HANDOFF_RANK`, from those vectors (route ``shared``), so the bytes are
those of a known rank (random weights have no meaningful WeLore ranks).
:class:`lowrank_optim.distributed.CollectiveCounter` wraps the spectra and each hand-off; the
counts must equal :func:`handoff_payload` and :func:`spectra_payload`, which give 4 and 8 ranks
(:func:`every_rank_spectrum_payload`: the route the spectra took before, for comparison).
Each rank's local weight, gradient and optimizer-state bytes before and after are counted too
and must equal :func:`rank_memory`, which gives the whole model at 2, 4 and 8 ranks.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
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

from benchmarks.common import markdown_table, write_json
from lowrank_optim import HandoffConfig, WeLoreAdamW
from lowrank_optim.distributed import CollectiveCounter
from lowrank_optim.distributed.factorize import (
    gram_peak_bytes,
    sketch_peak_bytes,
    weight_gather_bytes,
)
from lowrank_optim.distributed.handoff import handoff_route
from lowrank_optim.distributed.sharding import rows_per_rank
from lowrank_optim.distributed.spectra import (
    owner_spectra_bytes,
    owner_spectra_peak_bytes,
    shared_factors_bytes,
    shared_factors_peak_bytes,
)
from lowrank_optim.distributed.spectrum_routes import choose_spectrum
from lowrank_optim.handoff import largest_handoff_rank

__all__ = [
    "GALORE_RANK",
    "HANDOFF_RANK",
    "every_rank_spectrum_payload",
    "handoff_payload",
    "rank_memory",
    "run",
    "spectra_payload",
]

HANDOFF_RANK = 128  # the hand-off rank k of the byte tables (as --handoff-formulas)
GALORE_RANK = 512  # the GaLore rank r of the moments carried (as the refresh tables)
LAYERS = 24
WORLDS = (2, 4, 8)
MEASURED_WORLD = 2
OVERSAMPLE, POWER_ITERS = 10, 2  # factorize_sharded's defaults
ITEM = 4  # fp32 weights and state

#: one decoder layer's projected linears, (out, in); ``--quick`` uses :data:`QUICK_LAYER`.
LAYER_1B = {
    "self_attn.q_proj": (2048, 2048),
    "self_attn.k_proj": (2048, 2048),
    "self_attn.v_proj": (2048, 2048),
    "self_attn.o_proj": (2048, 2048),
    "mlp.gate_proj": (5461, 2048),
    "mlp.up_proj": (5461, 2048),
    "mlp.down_proj": (2048, 5461),
}
QUICK_LAYER = {  # both routes: gram for the square one, sketch for the MLP
    "self_attn.q_proj": (96, 96),
    "self_attn.o_proj": (96, 96),
    "mlp.gate_proj": (256, 96),
    "mlp.down_proj": (96, 256),
}
QUICK_RANKS = {"handoff": 6, "galore": 8}


# ------------------------------------------------------------------------------ formulas
def _effective(rank: int, shape: tuple[int, int]) -> int:
    return min(rank, *shape)


def handoff_payload(
    shape: tuple[int, int],
    world: int,
    rank: int = HANDOFF_RANK,
    galore_rank: int = GALORE_RANK,
    route: str = "shared",
    factor_step: str | None = None,
) -> dict[str, Any]:
    """Payload bytes, by collective, of one sharded hand-off of an fp32 ``shape`` (factorize,
    carry of the right-projected moments, error sums, and unless ``factor_step`` (None: the
    package default) is ``fixed`` the four squared step norms of the factors' lr multipliers),
    its wire bytes per rank (ring: all-reduce ``2 (R-1)/R``, all-gather ``(R-1)/R`` of the
    payload; a broadcast: received once), the factorization's per-rank peak, and the same for
    gathering the weight. ``route``: ``shared`` (the factors from the check step's spectra: the
    owner's top-k vectors broadcast, and for a wide matrix a k x n fp64 all-reduce), or
    ``auto``, the second pass taken without them (:func:`handoff_route`: gram or sketch)."""
    rows, cols = shape
    width = max(1, min(rank + OVERSAMPLE, rows, cols))
    broadcast = 0
    if route == "shared":
        shared = shared_factors_bytes(rows, cols, rank)
        reduce, gather, broadcast = shared["all_reduce"], 0, shared["broadcast"]
        peak = shared_factors_peak_bytes(rows, cols, rank, world)
    else:
        route = handoff_route(rows, cols, rank, world)
    if route == "gram":
        reduce, gather = 8 * cols * cols, 0
        peak = gram_peak_bytes(rows, cols, rank, world)
    elif route == "sketch":
        reduce = (POWER_ITERS + 1) * cols * width * ITEM
        # one tall-skinny QR of the sketch and one per power iteration, each all-gathering the
        # R blocks, as ``sketch_factorize_bytes`` counts them (the QRs of the replicated n x l
        # are local)
        gather = (POWER_ITERS + 1) * world * width * width * ITEM
        peak = sketch_peak_bytes(rows, cols, rank, world, oversample=OVERSAMPLE)
    carry = 2 * rank * _effective(galore_rank, shape) * ITEM  # one k x r block per moment
    reduce += carry + 2 * 8  # + ||W - U D||^2 and ||W||^2 in fp64
    if (factor_step or HandoffConfig().factor_step) != "fixed":  # None: the package default
        reduce += 4 * 8  # + the fp64 squared step norms behind the factors' lr multipliers
    scale = (world - 1) / world
    gathered = weight_gather_bytes(rows, cols, world)
    return {
        "route": route,
        "all_reduce": reduce,
        "all_gather_single": gather,
        "broadcast": broadcast,
        "payload": reduce + gather + broadcast,
        "carry": carry,
        "wire_per_rank": round(scale * (2 * reduce + gather)) + broadcast,
        "peak_per_rank": peak,
        "gather_payload": gathered,
        "gather_wire_per_rank": round(scale * gathered),
        "gather_peak_per_rank": rows * cols * ITEM,
    }


def every_rank_spectrum_payload(shape: tuple[int, int], world: int) -> dict[str, Any]:
    """Payload and wire bytes of one matrix's spectrum computed on every rank, the route the
    check step took before the owner-computed spectra
    (:func:`lowrank_optim.distributed.spectrum_routes.sharded_spectrum`, route ``auto``)."""
    rows, cols = shape
    route = choose_spectrum(rows, cols, world)
    scale = (world - 1) / world
    if route == "gram":
        payload, wire = 8 * cols * cols, round(scale * 2 * 8 * cols * cols)
    else:  # column panels of the weight, all-gathered one at a time
        payload = weight_gather_bytes(rows, cols, world)
        wire = round(scale * payload)
    return {"route": route, "payload": payload, "wire_per_rank": wire}


def spectra_payload(
    shapes: list[tuple[int, int]], world: int, min_ratio: float | None = None
) -> dict[str, Any]:
    """WeLore's spectra of the matrices ``shapes`` (in candidate order) at one check step, owner
    by owner (:func:`lowrank_optim.distributed.spectra.owner_spectra_bytes`): every rank's
    counted bytes and wire, the busiest rank's, and the per-rank peak when the top vectors of
    every matrix are kept for its hand-off (``min_ratio``: :class:`HandoffConfig`'s)."""
    ratio = HandoffConfig().min_ratio if min_ratio is None else min_ratio
    per_rank = owner_spectra_bytes(shapes, world)
    keep = [largest_handoff_rank(m, n, ratio) for m, n in shapes]
    peaks = owner_spectra_peak_bytes(shapes, world, keep)
    return {
        "per_rank": per_rank,
        "wire_per_rank": max(entry["wire"] for entry in per_rank),
        "peak_per_rank": max(peaks),
        "peaks": peaks,
        "keep": keep,
    }


def _shard(shape: tuple[int, ...], world: int) -> int:
    """Elements of the busiest rank's ``Shard(0)`` block (``torch.chunk``: the first rank)."""
    return max(rows_per_rank(shape[0], world)) * math.prod(shape[1:])


def rank_memory(
    specs: list[tuple[tuple[int, ...], bool]],
    world: int,
    galore_rank: int,
    handoff_rank: dict[tuple[int, int], int] | None = None,
) -> dict[str, int]:
    """Weight, gradient and optimizer-state bytes (fp32) on the busiest rank under FSDP2.

    ``specs``: ``(shape, projected)`` of every parameter. Every parameter is ``Shard(0)`` (rows
    by ``torch.chunk``), its gradient likewise. State: AdamW moments (2 per element of the
    shard; WeLoreAdamW's steps are Python ints) for dense parameters and factors; a projected
    ``m x n`` matrix keeps ``m_i x r`` moments and the replicated ``n x r`` basis.
    ``handoff_rank``: shape -> ``k`` of the hand-offs done (every projected matrix of that
    shape becomes ``up`` ``m x k`` and ``down`` ``k x n``, both ``Shard(0)``).
    """
    out = {"weights": 0, "gradients": 0, "optimizer_states": 0}
    for shape, projected in specs:
        if projected and handoff_rank is not None and tuple(shape) in handoff_rank:
            k = handoff_rank[tuple(shape)]
            parts = [((shape[0], k), False), ((k, shape[1]), False)]
        else:
            parts = [(shape, projected)]
        for part, still_projected in parts:
            local = _shard(part, world)
            out["weights"] += local * ITEM
            out["gradients"] += local * ITEM
            if still_projected:
                r = _effective(galore_rank, part)
                local_rows = max(rows_per_rank(part[0], world))
                out["optimizer_states"] += (2 * local_rows * r + part[1] * r) * ITEM
            else:
                out["optimizer_states"] += 2 * local * ITEM
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------- measurement
class _FixedRankWeLore(WeLoreAdamW):
    """WeLoreAdamW whose hand-offs use one fixed rank, with collectives counted."""

    fixed_rank = HANDOFF_RANK
    measured: dict[str, Any]

    def layer_ranks(self, candidates: list[Any]) -> dict[str, int]:
        start = time.perf_counter()
        with CollectiveCounter() as counter:
            chosen = super().layer_ranks(candidates)  # the spectra, as maybe_handoff takes them
        owned = {id(s): s for s in self.check_step_decompositions.values()}  # this check step
        self.measured["spectra"] = {
            "bytes": dict(counter.bytes),
            "calls": dict(counter.calls),
            "seconds": time.perf_counter() - start,
            "welore_ranks": chosen,
            "peak_bytes": max((s.peak_bytes for s in owned.values()), default=0),
        }
        return {candidate.name: self.fixed_rank for candidate in candidates}

    def hand_off(self, root: nn.Module, candidate: Any, rank: int, step: int) -> None:
        start = time.perf_counter()
        with CollectiveCounter() as counter:
            super().hand_off(root, candidate, rank, step)
        record = self.handoffs[-1]
        self.measured["handoffs"][candidate.name] = {
            "bytes": dict(counter.bytes),
            "calls": dict(counter.calls),
            "seconds": time.perf_counter() - start,
            "route": record["factorize"],
            "peak_bytes": record["peak_bytes"],
            "rank": record["rank"],
        }


def _layer(shapes: dict[str, tuple[int, int]]) -> nn.Module:
    block = nn.Module()
    for name, (rows, cols) in shapes.items():
        parent, child = name.split(".")
        if not hasattr(block, parent):
            block.add_module(parent, nn.Module())
        getattr(block, parent).add_module(child, nn.Linear(cols, rows, bias=False))
    return block


def _set_grads(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        local = torch.randn(param.to_local().shape, generator=generator)
        param.grad = DTensor.from_local(
            local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
        )


def _local_bytes(value: Any) -> int:
    if isinstance(value, DTensor):
        value = value.to_local()
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _memory(model: nn.Module, optimizer: WeLoreAdamW) -> dict[str, int]:
    params = list(model.parameters())
    out = {
        "weights": sum(_local_bytes(p) for p in params),
        "gradients": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer_states": sum(
            _local_bytes(v) for p in params for v in optimizer.state.get(p, {}).values()
        ),
    }
    out["total"] = sum(out.values())
    return out


def _worker(rank: int, port: int, out: str, shapes: dict, ranks: dict) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=MEASURED_WORLD, timeout=datetime.timedelta(minutes=30)
    )
    torch.manual_seed(0)
    model = nn.Sequential(_layer(shapes))
    fully_shard(model[0])
    fully_shard(model)
    weights = [module.weight for module in model.modules() if isinstance(module, nn.Linear)]
    group = {
        "params": weights,
        "rank": ranks["galore"],
        "update_proj_gap": 1000,
        "scale": 0.25,
        "proj_type": "right",
    }
    config = HandoffConfig(trigger="step", start_step=1, check_every=1)
    optimizer = _FixedRankWeLore([group], lr=1e-3, model=model, handoff=config)
    optimizer.fixed_rank = ranks["handoff"]
    optimizer.measured = {"handoffs": {}}
    _set_grads(model, seed=1 + rank)
    optimizer.step()
    before = _memory(model, optimizer)
    dist.barrier()
    start = time.perf_counter()
    with CollectiveCounter() as counter:
        model = optimizer.maybe_handoff(model)
    seconds = time.perf_counter() - start
    _set_grads(model, seed=11 + rank)
    optimizer.step()  # the factors train: their gradients and AdamW state exist
    after = _memory(model, optimizer)
    result = {
        **optimizer.measured,
        "total_bytes": dict(counter.bytes),
        "seconds": seconds,
        "memory_before": before,
        "memory_after": after,
    }
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()


def measure(shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> dict[str, Any]:
    """Spawn the 2 gloo ranks; rank 0's counts (the busiest rank: ``torch.chunk`` rows)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        out = str(Path(directory) / "measured.pt")
        mp.spawn(_worker, args=(port, out, shapes, ranks), nprocs=MEASURED_WORLD)
        return torch.load(out, weights_only=False)


# ------------------------------------------------------------------------------ report
_UNIT = {"MiB": 2**20}  # --quick's tiny shapes are reported in KiB


def _mib(value: float) -> str:
    return f"{value / _UNIT['MiB']:.2f}"


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise RuntimeError(f"measured bytes disagree with the formula: {what}")


def _model_specs(quick: bool) -> tuple[list[tuple[tuple[int, ...], bool]], str]:
    """``(shape, projected)`` of every parameter of LLaMA-1B (a meta-device model, projected
    set as ``lowrank_param_groups(model, "attn-mlp")``), or of ``--quick``'s tiny LLaMA."""
    from lowrank_optim.memory import param_specs
    from lowrank_optim.train.models import (
        build_llama_on_meta,
        load_llama_config,
        tiny_llama_config,
    )

    if quick:
        config = tiny_llama_config(vocab_size=96, hidden=96, layers=2, heads=4, intermediate=256)
        name = "tiny LLaMA (hidden 96, 2 layers)"
    else:
        config, name = load_llama_config("1b"), "LLaMA-1B"
    specs = param_specs(build_llama_on_meta(config).float())
    return [(s.shape, s.projected) for s in specs if not s.buffer], name


def run(quick: bool, folder: Path) -> dict[str, Any]:
    """Measure, check against the formulas, write ``fsdp_comm_handoff.{json,md}`` to ``folder``."""
    shapes = QUICK_LAYER if quick else LAYER_1B
    ranks = QUICK_RANKS if quick else {"handoff": HANDOFF_RANK, "galore": GALORE_RANK}
    k, r = ranks["handoff"], ranks["galore"]
    layers = 2 if quick else LAYERS
    _UNIT["MiB"] = 2**10 if quick else 2**20
    unit = "KiB" if quick else "MiB"
    start = time.perf_counter()
    measured = measure(shapes, ranks)
    wall = time.perf_counter() - start
    write_json("fsdp_comm_handoff", {"quick": quick, "measured": measured}, folder)  # if unequal

    # 1. the measured hand-off of every matrix of one layer against the formula at 2 ranks
    per_matrix, rows = {}, []
    for name, shape in shapes.items():
        got = measured["handoffs"][f"0.{name}"]
        want = handoff_payload(shape, MEASURED_WORLD, k, r)
        for op in ("all_reduce", "all_gather_single", "broadcast"):
            _check(got["bytes"].get(op, 0) == want[op], f"{name} {op}")
        _check(got["route"] == want["route"], f"{name} route")
        per_matrix[name] = {"measured": got, "formula": want}
        rows.append(
            [
                f"{name} {shape[0]}x{shape[1]}",
                got["route"],
                _mib(got["bytes"].get("all_reduce", 0)),
                _mib(got["bytes"].get("broadcast", 0)),
                _mib(want["payload"]),
                _mib(want["wire_per_rank"]),
                _mib(want["gather_wire_per_rank"]),
                _mib(got["peak_bytes"]),
                _mib(want["peak_per_rank"]),
                _mib(want["gather_peak_per_rank"]),
                f"{got['seconds']:.1f}",
            ]
        )
    layer_spectra = spectra_payload(list(shapes.values()), MEASURED_WORLD)
    spectra_want = layer_spectra["per_rank"][0]  # rank 0's counts
    spectra_got = sum(measured["spectra"]["bytes"].values())
    for op in ("gather", "all_gather_single"):
        _check(measured["spectra"]["bytes"].get(op, 0) == spectra_want[op], f"spectra {op}")
    _check(spectra_got == sum(measured["spectra"]["bytes"].values()), "spectra ops")
    _check(measured["spectra"]["peak_bytes"] <= layer_spectra["peaks"][0], "spectra peak")
    _check(not set(measured["spectra"]["bytes"]) - {"gather", "all_gather_single"}, "spectra ops")
    _check(
        sum(measured["total_bytes"].values())
        == spectra_got
        + sum(
            m["measured"]["bytes"].get(op, 0)
            for m in per_matrix.values()
            for op in ("all_reduce", "all_gather_single", "broadcast")
        ),
        "maybe_handoff total",
    )

    # 2. per-rank memory: the measured layer against the formula, then the whole model
    layer_specs = [(shape, True) for shape in shapes.values()]
    block_before = rank_memory(layer_specs, MEASURED_WORLD, r)
    block_after = rank_memory(layer_specs, MEASURED_WORLD, r, {s: k for s in shapes.values()})
    _check(measured["memory_before"] == block_before, "memory before the hand-offs")
    _check(measured["memory_after"] == block_after, "memory after the hand-offs")

    # 3. the whole model at 2, 4, 8 ranks
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes.values():
        counts[shape] = counts.get(shape, 0) + layers
    totals, total_rows = {}, []
    for world in WORLDS:
        f = {s: handoff_payload(s, world, k, r) for s in counts}
        before = {s: every_rank_spectrum_payload(s, world) for s in counts}
        spectra = spectra_payload(list(shapes.values()) * layers, world)
        entry = {
            key: sum(f[s][key] * c for s, c in counts.items())
            for key in ("payload", "wire_per_rank", "gather_payload", "gather_wire_per_rank")
        }
        entry["spectra_wire_per_rank"] = spectra["wire_per_rank"]
        entry["spectra_peak_per_rank"] = spectra["peak_per_rank"]
        entry["spectra_per_rank"] = spectra["per_rank"]
        entry["every_rank_spectra_wire_per_rank"] = sum(
            before[s]["wire_per_rank"] * c for s, c in counts.items()
        )
        entry["largest_peak_per_rank"] = max(f[s]["peak_per_rank"] for s in counts)
        entry["weight_bytes"] = sum(s[0] * s[1] * ITEM * c for s, c in counts.items())
        totals[str(world)] = entry
        total_rows.append(
            [
                world,
                "measured x" + str(layers) if world == MEASURED_WORLD else "formula",
                _mib(entry["payload"]),
                _mib(entry["wire_per_rank"]),
                _mib(entry["gather_wire_per_rank"]),
                f"{entry['wire_per_rank'] / entry['gather_wire_per_rank']:.2f}",
                _mib(entry["spectra_wire_per_rank"]),
                _mib(entry["every_rank_spectra_wire_per_rank"]),
                _mib(entry["spectra_peak_per_rank"]),
                _mib(entry["largest_peak_per_rank"]),
            ]
        )

    target = HandoffConfig().target_reduction
    specs, model_name = _model_specs(quick)
    projected_shapes = {tuple(s) for s, p in specs if p}
    kept = {s: max(1, round((1 - target) * min(s))) for s in projected_shapes}
    fixed = {s: k for s in projected_shapes}
    memory, memory_rows = {}, []
    for world in WORLDS:
        cases = {
            "before (GaLore, dense)": rank_memory(specs, world, r),
            f"after, {target:.0%} of rank removed": rank_memory(specs, world, r, kept),
            f"after, k = {k}": rank_memory(specs, world, r, fixed),
        }
        memory[str(world)] = cases
        for label, m in cases.items():
            memory_rows.append(
                [world, label]
                + [_mib(m[key]) for key in ("weights", "gradients", "optimizer_states", "total")]
            )

    payload = {
        "quick": quick,
        "handoff_rank": k,
        "galore_rank": r,
        "layers": layers,
        "measured_world": MEASURED_WORLD,
        "wall_seconds": wall,
        "layer_shapes": {n: list(s) for n, s in shapes.items()},
        "measured": measured,
        "per_matrix": per_matrix,
        "whole_model": totals,
        "memory_model": model_name,
        "memory_ranks_kept": {f"{s[0]}x{s[1]}": v for s, v in kept.items()},
        "memory": memory,
        "layer_memory_measured": {
            "before": measured["memory_before"],
            "after": measured["memory_after"],
        },
    }
    write_json("fsdp_comm_handoff", payload, folder)
    command = "python -m benchmarks.fsdp_comm --handoff" + (" --quick" if quick else "")
    kept_text = ", ".join(f"{s[0]}x{s[1]}: k = {v}" for s, v in sorted(kept.items()))
    lines = [
        f"# FSDP2: WeLore hand-offs, bytes and per-rank memory, {model_name}",
        "",
        f"`OMP_NUM_THREADS=1 {command}` ({wall:.0f} s). fp32; {unit}. One decoder layer's "
        f"matrices in one `fully_shard` unit under a `fully_shard`-ed root, {MEASURED_WORLD} gloo "
        "CPU ranks, one `WeLoreAdamW` step (right projection, GaLore rank "
        f"{r}), then `model = optimizer.maybe_handoff(model)` (`trigger='step'`): the real "
        "FSDP2 hand-off (`hand_off_sharded_layer`). WeLore's threshold runs (its spectra are "
        f"counted) but every matrix goes at the fixed rank k = {k}. Bytes are counted by "
        "`CollectiveCounter` around each hand-off (factorization, moment carry: one all-reduce "
        "of 2 k x r, error sums: 16 B) on rank 0, and equal the formulas byte for byte (the run "
        "raises otherwise). Route `shared`: the factors come from the check step's spectra (the "
        "owner broadcasts its top-k singular vectors; a wide matrix adds one k x n fp64 "
        "all-reduce), no second pass over the weight. Wire/rank: ring all-reduce 2 (R-1)/R, "
        "all-gather (R-1)/R of the payload, broadcast received once. Gather: all-gathering "
        "the weight instead (what the sharded factorization "
        "avoids), which holds the whole m x n weight on every rank.",
        "",
        f"## One hand-off of each matrix of one layer, {MEASURED_WORLD} ranks (measured)",
        "",
        markdown_table(
            [
                "matrix",
                "route",
                "all-reduce (measured)",
                "broadcast (measured)",
                "payload (formula)",
                "wire/rank",
                "gather wire/rank",
                "peak/rank (measured)",
                "factorize peak (formula)",
                "gathered weight",
                "s",
            ],
            rows,
        ),
        "",
        "Peak (measured) is the hand-off record's `peak_bytes`: the factorization's or the "
        "moment carry's live tensors, whichever is larger; the formula column is the "
        "factorization's alone. Times are on a shared, loaded 2-core host.",
        "",
        f"## Every projected matrix of the model ({layers} layers)",
        "",
        markdown_table(
            [
                "ranks",
                "source",
                "hand-off payload",
                "hand-off wire/rank",
                "gather wire/rank",
                "ratio",
                "spectra wire/rank (per check)",
                "before: every-rank spectra",
                "spectra peak/rank",
                "largest hand-off peak/rank",
            ],
            total_rows,
        ),
        "",
        f"The {MEASURED_WORLD}-rank hand-off columns are one measured layer times {layers} "
        "(every layer has the same shapes). Spectra: WeLore's singular values of every "
        "candidate at one check step (`owner_spectra`), all of the model's matrices at once, "
        "for the busiest rank: each matrix has one owner rank (eigensolves balanced), the other "
        "ranks send it their rows in blocks (a gather to the owner alone), the owner builds the "
        "fp64 Gram (W^T W, or W W^T for a wide matrix) and decomposes it, then one all-gather "
        "of the fp64 singular values gives every rank every spectrum. Wire/rank: the larger of "
        "what the rank sends and receives (the formula `owner_spectra_bytes`, checked on the "
        f"measured layer: rank 0 counted {_mib(spectra_got)} {unit} of gather and all-gather "
        f"payload at {MEASURED_WORLD} ranks, equal to it). Before: the same spectra computed on "
        "every rank (`sharded_spectrum`: an fp64 Gram all-reduce, or the weight's column panels "
        "all-gathered). Spectra peak: the owner's fp64 Gram and eigenvectors (2 d^2 + d values) "
        "plus the top singular vectors it keeps, for the hand-off, of every matrix it owns that "
        "may go now (here: all; up to the largest rank `min_ratio` allows, d/2 at the default "
        f"0.5, fp32; measured {_mib(measured['spectra']['peak_bytes'])} {unit} on rank 0 for "
        "the one layer, within the formula).",
        "",
        f"## Per-rank memory before and after the hand-offs, {model_name}",
        "",
        markdown_table(
            ["ranks", "state", "weights", "gradients", "optimizer state", "total"], memory_rows
        ),
        "",
        "Busiest rank (`torch.chunk` rows: the first), fp32, every parameter `Shard(0)` "
        "(`fully_shard` per decoder layer and at the root), one gradient per trainable "
        "parameter. Before: WeLoreAdamW's GaLore phase, projected matrices (attention and MLP) "
        f"with m_i x {r} moments and the replicated n x {r} basis; embeddings, norms and head "
        "with AdamW moments. After: every projected matrix handed off, its factors trained by "
        f"AdamW (both `Shard(0)`). `{target:.0%} of rank removed`: the default "
        f"`HandoffConfig().target_reduction` taken as a fixed fraction per matrix ({kept_text}; "
        "WeLore's own threshold spreads it unevenly, and skips matrices below `min_ratio`). "
        f"Checked on the measured layer at {MEASURED_WORLD} ranks: rank 0's local weights, "
        "gradients and state before and after equal these formulas byte for byte "
        f"(before {_mib(block_before['total'])}, after {_mib(block_after['total'])} {unit}).",
        "",
    ]
    (folder / "fsdp_comm_handoff.md").write_text("\n".join(lines))
    return payload
