"""Analytic training FLOPs of the regime study's runs, before and after each hand-off.

Per token, a forward and backward pass through a linear layer with ``P`` weights costs ``6 P``
multiply-adds-times-two (``2 P`` forward, ``2 P`` for the input's gradient, ``2 P`` for the
weight's), and causal attention ``12 S d`` per layer (``Q K^T`` and ``A V``, ``2 S d`` each
forward, three times that with the backward; the causal mask is not discounted, as in the usual
``6 N + 12 L S d`` count of Kaplan et al. 2020). A handed-off layer of shape ``m x n`` at rank
``k`` counts ``k (m + n)`` weights from the step after its hand-off on. Embedding lookups,
norms, the loss and the optimizer step are left out: the optimizer's own cost is in the
measured step times. A fine-tune that trains only some weights skips the weight gradient of the
others: ``4 P + 2 P_trainable`` per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Shapes", "finetune_flops_per_step", "run_flops", "shapes_of"]


@dataclass(frozen=True)
class Shapes:
    """What the FLOPs count needs of a model and a batch."""

    hidden: int
    layers: int
    seq_len: int
    tokens_per_step: int
    head: int  # weights of the output projection (vocabulary x hidden)
    projected: dict[str, tuple[int, int]]

    @property
    def attention_per_token(self) -> int:
        return 12 * self.layers * self.seq_len * self.hidden

    def step_flops(self, linear_weights: int) -> int:
        return self.tokens_per_step * (6 * linear_weights + self.attention_per_token)

    @property
    def dense_linear(self) -> int:
        return self.head + sum(m * n for m, n in self.projected.values())


def shapes_of(regime: Any) -> Shapes:
    """The :class:`Shapes` of ``regime``'s model (built on the meta device: no memory)."""
    import torch

    from lowrank_optim.train import build_corpus
    from lowrank_optim.train.models import build_llama_on_meta, load_llama_config

    corpus = build_corpus(tokenizer=regime.tokenizer, max_bytes=regime.corpus_bytes)
    config = load_llama_config(regime.model_path, vocab_size=corpus.tokenizer.vocab_size)
    model = build_llama_on_meta(config)
    projected = {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ("attn" in name or "mlp" in name)
    }
    return Shapes(
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        seq_len=regime.seq_len,
        tokens_per_step=regime.batch_size * regime.seq_len,
        head=config.vocab_size * config.hidden_size,
        projected=projected,
    )


def _weights_after(shapes: Shapes, factored: dict[str, int]) -> int:
    """Linear weights once the layers in ``factored`` hold ``factored[name]`` weights each."""
    dense = {name: m * n for name, (m, n) in shapes.projected.items()}
    return shapes.head + sum(factored.get(name, size) for name, size in dense.items())


def run_flops(result: dict[str, Any], shapes: Shapes, regime: Any) -> dict[str, Any]:
    """Training FLOPs of one cached run: ``total``, ``saved`` (against the same steps dense),
    ``curve`` (``[step, FLOPs so far]`` at its eval steps) and the ``steps`` it trained.

    A post-hoc run counts its dense run and its fine-tune (``result["dense_flops"]``, added by
    the post-hoc method); the scratch baseline counts its factors from step 0.
    """
    steps = int(result.get("steps") or regime.steps)
    if "finetune_flops" in result:  # post hoc: the dense run, then the fine-tune
        total = result["dense_flops"] + result["finetune_flops"]
        return {"total": total, "saved": 0, "curve": [], "steps": steps}
    start = {h["layer"]: h["params_after"] for h in result.get("factorized_from_start", [])}
    changes = sorted((h["step"], h["layer"], h["params_after"]) for h in result["handoffs"])
    factored = dict(start)
    evals = [int(step) for step, _ in result.get("eval_curve", [])]
    total, curve, step, index = 0, [], 0, 0
    weights = _weights_after(shapes, factored)
    marks = sorted({*evals, steps, *(s for s, _, _ in changes)})
    for mark in marks:  # piecewise constant between hand-offs: no per-step loop
        total += (mark - step) * shapes.step_flops(weights)
        step = mark
        while index < len(changes) and changes[index][0] <= step:  # from the next step on
            factored[changes[index][1]] = changes[index][2]
            index += 1
        weights = _weights_after(shapes, factored)
        if mark in evals:
            curve.append([mark, total])
    dense = steps * shapes.step_flops(shapes.dense_linear)
    return {"total": total, "saved": dense - total, "curve": curve, "steps": steps}


def finetune_flops_per_step(shapes: Shapes, linear_weights: int, trainable: int) -> int:
    """FLOPs of one fine-tune step that trains ``trainable`` of the ``linear_weights``."""
    per_token = 4 * linear_weights + 2 * trainable + shapes.attention_per_token
    return shapes.tokens_per_step * per_token
