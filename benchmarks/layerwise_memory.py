"""Peak memory of one training step with and without layer-wise updates (issue #17).

LLaMA 60M and 130M (fp32, CPU), on 1 process and on 2 (DDP over gloo): torch AdamW, GaLoreAdamW
stepping after backward, and GaLoreAdamW through :class:`lowrank_optim.LayerwiseOptimizer`
(each parameter steps inside backward and its gradient is freed at once; on 2 processes in
DDP's communication hook). Each cell builds the model and optimizer, takes one warm-up step
(the optimizer state then exists), and measures the next step's peak beyond what was resident
before it (:func:`lowrank_optim.memory.measure_peak`: RSS high-water mark on CPU, the
allocator's peak on CUDA). On 2 processes the larger of the two ranks' peaks is reported.

The question is whether the gradients of all layers ever coexist. A regular step holds every
``.grad`` at once when backward ends (DDP keeps its buckets besides); a layer-wise step holds
one at a time, so its peak should fall by about the full gradient's size (the "gradient" column).

    python -m benchmarks.layerwise_memory           # 60M and 130M, 1 and 2 processes
    python -m benchmarks.layerwise_memory --quick   # tiny config, to a temporary folder

The methods of one (config, processes) pair run one after another in the same processes, each
measured from its own baseline after the previous one's tensors were freed.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks.common import RESULTS, markdown_table, write_json
from lowrank_optim import GaLoreAdamW, LayerwiseOptimizer, ProjectionConfig
from lowrank_optim.factory import lowrank_param_groups
from lowrank_optim.memory import measure_peak
from lowrank_optim.train.models import build_llama, load_llama_config, tiny_llama_config

__all__ = ["METHODS", "main", "measure_cell", "report"]

METHODS = ("adamw", "galore", "galore_layerwise")
RANKS = {"tiny": 16, "60m": 128, "130m": 256}  # GaLore's ranks for these sizes
MB = 2**20


def config_of(name: str) -> Any:
    if name == "tiny":
        return tiny_llama_config(vocab_size=512, hidden=128, layers=2, heads=4, intermediate=344)
    return load_llama_config(name)


def _optimizer(method: str, model: nn.Module, name: str) -> torch.optim.Optimizer:
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    projection = ProjectionConfig(rank=RANKS[name], update_proj_gap=200, scale=0.25)
    return GaLoreAdamW(lowrank_param_groups(model, "attn-mlp", projection), lr=1e-3)


def measure_method(name: str, method: str, batch: int, seq: int) -> dict[str, Any]:
    """One cell on this process (a DDP rank when a process group is up)."""
    torch.manual_seed(0)
    module = build_llama(config_of(name), seed=0)
    optimizer = _optimizer(method, module, name)
    distributed = dist.is_available() and dist.is_initialized()
    model: nn.Module = nn.parallel.DistributedDataParallel(module) if distributed else module
    layerwise = None
    if method == "galore_layerwise" and isinstance(optimizer, GaLoreAdamW):
        layerwise = LayerwiseOptimizer(optimizer, model)
    vocab = module.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if layerwise is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            layerwise.step()
        return float(loss)

    step()  # warm-up: lazily created optimizer state exists from here on
    peak = measure_peak(step)
    params = list(module.parameters())
    result = {
        "peak_mb": peak.peak_bytes / MB,
        "baseline_mb": peak.baseline_bytes / MB,
        "gradient_mb": sum(p.numel() * p.element_size() for p in params) / MB,
        "largest_gradient_mb": max(p.numel() * p.element_size() for p in params) / MB,
        "method_of_measurement": peak.method,
    }
    if layerwise is not None:
        layerwise.remove_hooks()
    return result


def _rank(rank: int, world: int, port: int, name: str, batch: int, seq: int, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        timeout = datetime.timedelta(seconds=600)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    results = {}
    for method in METHODS:
        results[method] = measure_method(name, method, batch, seq)
        gc.collect()  # the previous method's model and state are gone before the next baseline
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def measure_cell(name: str, world: int, batch: int, seq: int) -> dict[str, dict[str, Any]]:
    """Every method on ``world`` fresh processes; per method, the largest peak of any rank."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank, args=(world, port, name, batch, seq, folder), nprocs=world)
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]
    return {
        method: max((r[method] for r in ranks), key=lambda x: x["peak_mb"]) for method in METHODS
    }


def report(payload: dict[str, Any]) -> str:
    """The markdown table: peak per cell, and what layer-wise updates saved against a gradient."""
    rows = []
    for cell in payload["cells"]:
        methods = cell["methods"]
        saved = methods["galore"]["peak_mb"] - methods["galore_layerwise"]["peak_mb"]
        for method in METHODS:
            row = methods[method]
            label = method if cell["processes"] == 1 else f"{method} + DDP"
            rows.append(
                [
                    cell["config"],
                    cell["processes"],
                    label,
                    f"{row['baseline_mb']:.0f}",
                    f"{row['peak_mb']:.0f}",
                    f"{row['gradient_mb']:.0f}",
                    f"{saved:.0f}" if method == "galore_layerwise" else "",
                ]
            )
    headers = [
        "config",
        "processes",
        "method",
        "resident before (MB)",
        "step peak above it (MB)",
        "gradient (MB)",
        "saved by layer-wise (MB)",
    ]
    return (
        "# Layer-wise updates: peak memory of one training step\n\n"
        f"batch {payload['batch']} x sequence {payload['seq']} per process, fp32, "
        f"{payload['measured_with']}.\n\n" + markdown_table(headers, rows) + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny config, temporary folder")
    parser.add_argument("--configs", nargs="+", default=None, help="default: 60m 130m")
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="folder (default: results)")
    args = parser.parse_args(argv)
    configs = args.configs or (["tiny"] if args.quick else ["60m", "130m"])
    for name in configs:
        if name not in RANKS:
            raise SystemExit(f"Invalid config: {name!r}; allowed: {', '.join(RANKS)}")
    seq = 32 if args.quick else args.seq
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="layerwise_memory_")) if args.quick else RESULTS
    )
    cells = []
    for name in configs:
        for world in args.processes:
            methods = measure_cell(name, world, args.batch, seq)
            cells.append({"config": name, "processes": world, "methods": methods})
    measured_with = cells[0]["methods"]["adamw"]["method_of_measurement"]
    payload = {"batch": args.batch, "seq": seq, "measured_with": measured_with, "cells": cells}
    write_json("layerwise_memory", payload, out)
    (out / "layerwise_memory.md").write_text(report(payload))
    print(report(payload))
    print(f"wrote {out / 'layerwise_memory.json'} and {out / 'layerwise_memory.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
