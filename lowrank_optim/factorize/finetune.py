"""WeLore's own use of the factors: fine-tune only the low-rank components (LRCs).

Jaiswal et al., "From GaLore to WeLore", ICML 2025: after data-free compression, training only
the ``up``/``down`` factors of the LRCs (everything else frozen) recovers the compressed model
as well as or better than full fine-tuning, with about 3x throughput and 0.6x memory on
LLaMA-2 7B, because frozen tensors need no gradient and no AdamW moments. A parameter
``p`` that AdamW trains costs ``|p|`` bytes-per-element three times over: the gradient and the
two moments ``m, v``; :func:`trainable_lrc` reports what freezing saves on that account.

The data-free distillation recipe the benchmarks use for encoders lives in
``benchmarks/distill_support.py``: it is a study, not part of the library.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowrank_optim.factorize.lowrank_linear import LowRankLinear

__all__ = ["ADAMW_STATES", "LrcTrainable", "is_norm", "trainable_lrc"]

#: Tensors AdamW keeps per trained element besides the weight: the gradient, ``m`` and ``v``.
ADAMW_STATES = 3


@dataclass(frozen=True)
class LrcTrainable:
    """What :func:`trainable_lrc` left trainable, and the gradient + AdamW bytes it avoids."""

    trainable_parameters: int
    frozen_parameters: int
    trainable_names: tuple[str, ...]
    bytes_saved: int

    @property
    def total_parameters(self) -> int:
        return self.trainable_parameters + self.frozen_parameters

    def __str__(self) -> str:
        share = self.trainable_parameters / max(self.total_parameters, 1)
        return (
            f"trainable {self.trainable_parameters:,} of {self.total_parameters:,} parameters "
            f"({share:.1%}); gradients + AdamW state avoided: {self.bytes_saved / 2**20:.1f} MiB"
        )


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and the models' own norm classes (``LlamaRMSNorm``, ...)."""
    builtin = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)
    return isinstance(module, builtin) or "norm" in type(module).__name__.lower()


def trainable_lrc(
    model: nn.Module, train_norms: bool = False, verbose: bool = True
) -> LrcTrainable:
    """Freeze everything except the ``LowRankLinear`` factors (and norms if ``train_norms``).

    Only ``requires_grad`` changes, so the model works unchanged in a ``Trainer`` (which builds
    its optimizer from trainable parameters only) or an accelerate loop (build the optimizer
    from ``[p for p in model.parameters() if p.requires_grad]``). The LRC biases stay frozen,
    as in WeLore, where only the factors are tuned.
    """
    keep: set[int] = set()
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            keep.update((id(module.up), id(module.down)))
        elif train_norms and is_norm(module):
            keep.update(id(p) for p in module.parameters(recurse=False))
    if not any(isinstance(module, LowRankLinear) for module in model.modules()):
        raise ValueError(
            f"{type(model).__name__} has no LowRankLinear layer to train; compress it first "
            "(lowrank_optim.factorize.compress.compress_model or factorize.factorize_model)"
        )
    trainable, frozen, saved, names = 0, 0, 0, []
    for name, parameter in model.named_parameters():  # tied tensors are listed once
        train = id(parameter) in keep
        parameter.requires_grad_(train)
        if train:
            trainable += parameter.numel()
            names.append(name)
        else:
            frozen += parameter.numel()
            saved += ADAMW_STATES * parameter.numel() * parameter.element_size()
    summary = LrcTrainable(trainable, frozen, tuple(names), saved)
    if verbose:
        print(summary)
    return summary
